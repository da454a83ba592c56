"""The buddy allocator, raw and through Machine.alloc_folios/free_folios."""
import errno
import random

import numpy as np
import pytest
from hypothesis import given, strategies as st

import copyengine as ce
from copyengine.mm.buddy import BuddyAllocator
from copyengine.mm.memmap import PG_allocated, PG_head


def expand(blocks_per_order):
    """Frames covered by free_blocks()'s per-order head lists."""
    out = []
    for k, heads in enumerate(blocks_per_order):
        for h in heads.tolist():
            out.extend(range(h, h + (1 << k)))
    return out


def block_sets(b, node):
    return [sorted(x.tolist()) for x in b.free_blocks(node)]


# ----------------------------------------------------------------------------- raw buddy
class BuddyModel:
    """Reference: which frames are free, per node."""

    def __init__(self, nodes, fpn, max_order):
        self.nodes, self.fpn, self.max_order = nodes, fpn, max_order
        self.free = [set(range(n * fpn, (n + 1) * fpn)) for n in range(nodes)]

    def has_aligned_free(self, node, order):
        nr = 1 << order
        base = node * self.fpn
        for start in range(base, base + self.fpn, nr):
            if all(f in self.free[node] for f in range(start, start + nr)):
                return True
        return False


def check_buddy(b, model):
    for node in range(model.nodes):
        frames = expand(b.free_blocks(node))
        assert len(frames) == len(set(frames)), "a frame is on two free lists"
        assert set(frames) == model.free[node]
        assert b.free_pages(node) == len(model.free[node])
        blocks = b.free_blocks(node)
        for k, heads in enumerate(blocks):
            assert ((heads - node * model.fpn) % (1 << k) == 0).all(), "misaligned free block"
            # fully merged: no two free buddies of the same order below max_order
            if k < model.max_order:
                hs = set(heads.tolist())
                for h in hs:
                    buddy = node * model.fpn + ((h - node * model.fpn) ^ (1 << k))
                    assert buddy not in hs, f"free buddies {h} and {buddy} of order {k} not merged"
    assert b.free_pages() == sum(len(f) for f in model.free)


ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 1), st.integers(0, 3), st.integers(1, 12)),
    st.tuples(st.just("free"), st.integers(0, 10 ** 6)),
    st.tuples(st.just("take_off"), st.integers(0, 127)),
), max_size=40)


@given(ops)
def test_buddy_against_model(oplist):
    fpn, max_order = 64, 3
    b = BuddyAllocator(2, fpn, max_order)
    model = BuddyModel(2, fpn, max_order)
    held = []         # (head, order)
    taken = set()     # frames taken off for good
    check_buddy(b, model)
    for op in oplist:
        if op[0] == "alloc":
            _, node, order, count = op
            heads = b.alloc(node, order, count)
            assert len(heads) <= count
            for h in heads.tolist():
                frames = set(range(h, h + (1 << order)))
                assert h // fpn == node, "block from the wrong node"
                assert h % (1 << order) == 0
                assert frames <= model.free[node], "frame handed out twice"
                model.free[node] -= frames
                held.append((h, order))
            if len(heads) < count:
                assert not model.has_aligned_free(node, order), "ENOMEM while a block was free"
        elif op[0] == "free":
            if not held:
                continue
            h, order = held.pop(op[1] % len(held))
            b.free(np.array([h]), order)
            model.free[h // fpn] |= set(range(h, h + (1 << order)))
        else:
            pfn = op[1]
            node = pfn // fpn
            was_free = pfn in model.free[node]
            assert b.is_free(pfn) == was_free
            assert b.take_off(pfn) == was_free
            if was_free:
                model.free[node].discard(pfn)
                taken.add(pfn)
            assert not b.is_free(pfn)
        check_buddy(b, model)
    # free everything still held: back to full max-order blocks except around taken frames
    for h, order in held:
        b.free(np.array([h]), order)
        model.free[h // fpn] |= set(range(h, h + (1 << order)))
    check_buddy(b, model)
    if not taken:
        for node in range(2):
            blocks = b.free_blocks(node)
            assert all(len(x) == 0 for x in blocks[:max_order])
            assert sorted(blocks[max_order].tolist()) == list(range(node * fpn, (node + 1) * fpn, 8))


def test_alloc_exact_is_all_or_nothing():
    b = BuddyAllocator(1, 32, 2)
    before = block_sets(b, 0)
    with pytest.raises(OSError) as ei:
        b.alloc_exact(0, 2, 9)
    assert ei.value.errno == errno.ENOMEM
    assert block_sets(b, 0) == before
    heads = b.alloc_exact(0, 2, 8)
    assert sorted(heads.tolist()) == list(range(0, 32, 4))
    assert b.free_pages() == 0


def test_buddy_rejects_bad_geometry():
    with pytest.raises(ValueError):
        BuddyAllocator(1, 100, 3)


# ----------------------------------------------------------------------------- through the machine
def small_machine():
    return ce.Machine(nodes=2, node_size="4MiB")   # 1024 frames per node, max order 9


machine_ops = st.lists(st.one_of(
    st.tuples(st.just("alloc"), st.integers(0, 1), st.sampled_from([0, 0, 1, 2, 4, 9]),
              st.integers(1, 40)),
    st.tuples(st.just("free"), st.integers(0, 10 ** 6)),
), max_size=25)


@given(machine_ops)
def test_machine_alloc_free_accounting(oplist):
    with small_machine() as m:
        fpn = m.frames_per_node
        start_blocks = [block_sets(m.buddy, n) for n in range(2)]
        held = {}           # head -> order
        owned = set()       # frames allocated
        for op in oplist:
            if op[0] == "alloc":
                _, node, order, count = op
                free_before = [m.free_pages(n) for n in range(2)]
                vm = m.vmstat
                try:
                    heads = m.alloc_folios(node, order, count)
                except OSError as e:
                    assert e.errno == errno.ENOMEM
                    assert [m.free_pages(n) for n in range(2)] == free_before
                    assert m.vmstat == vm
                    continue
                assert len(heads) == count
                assert m.vmstat["pgalloc"] == vm["pgalloc"] + (count << order)
                for h in heads.tolist():
                    frames = set(range(h, h + (1 << order)))
                    assert not frames & owned, "frame handed out twice"
                    assert m.zero_pfn not in frames
                    assert h // fpn == node and h % (1 << order) == 0
                    assert (m.mem_map.head[h:h + (1 << order)] == h).all()
                    assert (m.mem_map.order[h:h + (1 << order)] == order).all()
                    assert m.mem_map.flags[h] & PG_head
                    assert (m.mem_map.flags[h:h + (1 << order)] & PG_allocated).all()
                    assert m.mem_map.refcount[h] == 1
                    owned |= frames
                    held[h] = order
                # exact accounting per node: nothing taken from the other node
                assert m.free_pages(node) == free_before[node] - (count << order)
                assert m.free_pages(1 - node) == free_before[1 - node]
            elif held:
                keys = sorted(held)
                h = keys[op[1] % len(keys)]
                order = held.pop(h)
                m.free_folios([h])
                owned -= set(range(h, h + (1 << order)))
                assert not m.mem_map.flags[h] & PG_allocated
            for n in range(2):
                assert m.free_pages(n) == fpn - (n == 0) - sum(1 for f in owned if f // fpn == n)
                free_frames = set(expand(m.buddy.free_blocks(n)))
                assert not free_frames & owned
        # free in mixed batches grouped by order
        heads = np.array(sorted(held), np.int64)
        if len(heads):
            m.free_folios(heads)
        assert [block_sets(m.buddy, n) for n in range(2)] == start_blocks
        assert m.free_pages() == m.total_frames - 1


@pytest.mark.parametrize("node", [0, 1])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_split_then_merge_round_trip(node, seed):
    with small_machine() as m:
        initial = block_sets(m.buddy, node)
        n_free = m.free_pages(node)
        heads = m.alloc_folios(node, 0, n_free)                  # splits every block
        assert len(set(heads.tolist())) == n_free
        assert m.free_pages(node) == 0
        assert all(len(x) == 0 for x in m.buddy.free_blocks(node))
        order = list(heads.tolist())
        random.Random(seed).shuffle(order)
        # give them back in a few batches, in random order
        for chunk in np.array_split(np.array(order, np.int64), 7):
            m.free_folios(chunk)
        assert block_sets(m.buddy, node) == initial              # merged back
        if node == 1:
            assert block_sets(m.buddy, 1)[m.max_order] == list(range(1024, 2048, 512))
        big = m.alloc_folios(1, m.max_order, 2) if node == 1 else None
        if big is not None:
            assert sorted(big.tolist()) == [1024, 1536]


def test_fragmentation_enomem_for_large_order():
    with small_machine() as m:
        heads = m.alloc_folios(1, 0, 1024)
        m.free_folios(heads[heads % 2 == 0])                      # every other page free
        assert m.free_pages(1) == 512
        before = block_sets(m.buddy, 1)
        vm = m.vmstat
        for order in (1, 2, 9):
            with pytest.raises(OSError) as ei:
                m.alloc_folios(1, order, 1)
            assert ei.value.errno == errno.ENOMEM
            assert block_sets(m.buddy, 1) == before
            assert m.vmstat == vm
        # enough pages in total: order 0 works and takes exactly the scattered ones
        got = m.alloc_folios(1, 0, 512)
        assert sorted(got.tolist()) == list(range(1024, 2048, 2))
        # freeing the odd ones merges everything back
        m.free_folios(got)
        m.free_folios(heads[heads % 2 == 1])
        assert block_sets(m.buddy, 1)[9] == [1024, 1536]


def test_enomem_is_per_node_no_fallback():
    with small_machine() as m:
        node0 = m.alloc_folios(0, 0, m.free_pages(0))
        assert m.free_pages(0) == 0
        free1 = m.free_pages(1)
        with pytest.raises(OSError) as ei:
            m.alloc_folios(0, 0, 1)
        assert ei.value.errno == errno.ENOMEM
        assert m.free_pages(1) == free1
        # a partial request is all or nothing
        with pytest.raises(OSError):
            m.alloc_folios(1, 0, free1 + 1)
        assert m.free_pages(1) == free1
        # processes: memory bound to node 0 is never taken from node 1
        p = m.spawn()
        with pytest.raises(OSError) as ei:
            p.mmap(4096, node=0)
        assert ei.value.errno == errno.ENOMEM
        assert p.vmas == []
        a = p.mmap(8192, node=0, populate=False)
        with pytest.raises(OSError) as ei:
            p.write(a, b"x")
        assert ei.value.errno == errno.ENOMEM
        assert m.free_pages(1) == free1
        b = p.mmap(8192, node=1)
        assert p.node_of(b) == 1 and m.free_pages(1) == free1 - 2
        m.free_folios(node0[:1])
        p.write(a, b"x")
        assert p.node_of(a) == 0 and m.free_pages(0) == 0


def test_free_folios_empty_is_noop(machine):
    vm = machine.vmstat
    machine.free_folios(np.array([], np.int64))
    machine.free_folios([])
    assert machine.vmstat == vm
