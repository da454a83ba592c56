"""Hardware poison: poisoned frames fail accesses and never return to the allocator."""

import numpy as np
import pytest

import copyengine as ce
from copyengine.mm.memmap import PG_hwpoison, PG_reserved
from helpers import raises_errno

PS = 4096
MiB = 1 << 20


def all_frames_handed_out(m, node):
    """Allocate every free frame of ``node`` (order 0), return them, and give them back."""
    heads = m.alloc_folios(node, 0, m.free_pages(node))
    with pytest.raises(OSError):
        m.alloc_folios(node, 0, 1)
    m.free_folios(heads)
    return set(heads.tolist())


def test_ehwpoison_value():
    assert ce.EHWPOISON == 133


def test_poisoned_mapped_frame_fails_access(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, node=1)
    p.write(a, b"abcd" * PS)
    bad = p.pfn_of(a + 2 * PS)
    v = m.vmstat
    m.hwpoison(bad)
    assert m.mem_map.flags[bad] & PG_hwpoison
    assert m.vmstat["nr_hwpoison"] == v["nr_hwpoison"] + 1
    e = raises_errno(ce.EHWPOISON, p.read, a + 2 * PS, 1)
    assert e.errno == 133
    raises_errno(ce.EHWPOISON, p.read, a, 4 * PS)               # a read that covers it
    raises_errno(ce.EHWPOISON, p.write, a + 2 * PS + 7, b"x")
    # all or nothing: a write spanning a good page and the poisoned one writes nothing
    raises_errno(ce.EHWPOISON, p.write, a + PS, b"Z" * (2 * PS))
    assert p.read(a + PS, PS) == b"abcd" * (PS // 4)
    # the other pages still work
    assert p.read(a, 2 * PS) == b"abcd" * (2 * PS // 4)
    assert p.read(a + 3 * PS, 4) == b"abcd"
    assert p.pfn_of(a + 2 * PS) == bad                          # lookups still answer
    assert p.node_of(a + 2 * PS) == 1


def test_poison_twice_counts_once(machine):
    m = machine
    m.hwpoison(100)
    m.hwpoison(100)
    assert m.vmstat["nr_hwpoison"] == 1
    assert m.free_pages(0) == m.frames_per_node - 2


def test_poisoned_free_frame_is_never_handed_out(machine):
    m = machine
    node = 1
    fpn = m.frames_per_node
    victims = [fpn + 0, fpn + 1, fpn + 777, fpn + 4095, 2 * fpn - 1]
    free = m.free_pages(node)
    for pfn in victims:
        assert m.buddy.is_free(pfn)
        m.hwpoison(pfn)
        assert not m.buddy.is_free(pfn)
    assert m.free_pages(node) == free - len(victims)
    assert m.vmstat["nr_hwpoison"] == len(victims)
    got = all_frames_handed_out(m, node)
    assert len(got) == free - len(victims)
    assert not got & set(victims)
    # large orders can't be served from the blocks around the poisoned frames
    heads = m.alloc_folios(node, 9, m.free_pages(node) // 512 - 3)
    for h in heads.tolist():
        assert not any(h <= v < h + 512 for v in victims)
    m.free_folios(heads)
    with pytest.raises(OSError):
        m.alloc_folios(node, 9, fpn // 512 - 2)
    # processes never get them either
    p = m.spawn()
    a = p.mmap(m.free_pages(node) * PS, node=node)
    pfns = {p.pfn_of(a + i * PS) for i in range(0, (m.frames_per_node - len(victims)), 1)}
    assert not pfns & set(victims)
    assert m.free_pages(node) == 0
    p.exit()
    assert m.free_pages(node) == free - len(victims)


def test_poisoned_frames_never_return_after_unmap(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(8 * PS, node=1)
    free = m.free_pages(1) + 8
    bad = [p.pfn_of(a + 3 * PS), p.pfn_of(a + 5 * PS)]
    for pfn in bad:
        m.hwpoison(pfn)
    p.munmap(a, 8 * PS)
    assert m.free_pages(1) == free - 2
    for pfn in bad:
        assert not m.buddy.is_free(pfn)
        assert m.mem_map.flags[pfn] & PG_hwpoison           # stays marked
    assert not all_frames_handed_out(m, 1) & set(bad)
    p.exit()
    assert m.free_pages(1) == free - 2


def test_poisoned_page_of_a_large_folio(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    p.write(a, b"L" * (2 * MiB))
    head = p.pfn_of(a)
    bad = head + 300
    m.hwpoison(bad)
    raises_errno(ce.EHWPOISON, p.read, a + 300 * PS, 1)
    assert p.read(a + 299 * PS, PS) == b"L" * PS               # the rest of the folio is fine
    free = m.free_pages(1)
    p.munmap(a, 2 * MiB)
    assert m.free_pages(1) == free + 511                       # all but the poisoned page
    got = all_frames_handed_out(m, 1)
    assert bad not in got and head in got and head + 511 in got


def test_poisoned_page_of_a_partly_unmapped_large_folio(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    head = p.pfn_of(a)
    m.hwpoison(head + 10)
    free = m.free_pages(1)
    p.munmap(a, 20 * PS)                       # the poisoned page is unmapped; split deferred
    assert m.free_pages(1) == free and m.mem_map.order[head] == 9
    r = p.move_pages(0, [a + 20 * PS], [0])     # the migration splits it first
    assert r.ret == 0 and r.status == [0]
    assert m.free_pages(1) == free + 511       # moved or freed, all but the poisoned page
    assert not m.buddy.is_free(head + 10)
    p.exit()
    assert m.free_pages(1) == free + 511


def test_poisoned_shared_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, shared=True)
    p.write(a, b"S" * 2 * PS)
    c = p.fork()
    bad = p.pfn_of(a)
    m.hwpoison(bad)
    raises_errno(ce.EHWPOISON, p.read, a, 1)
    raises_errno(ce.EHWPOISON, c.read, a, 1)
    assert c.read(a + PS, 1) == b"S"
    free = m.free_pages()
    p.exit()
    c.exit()
    assert m.free_pages() == free + 1
    assert not m.buddy.is_free(bad)


def test_poisoned_cow_shared_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS)
    p.write(a, b"c")
    c = p.fork()
    m.hwpoison(p.pfn_of(a))
    raises_errno(ce.EHWPOISON, c.write, a, b"x")               # COW can't copy a poisoned page
    raises_errno(ce.EHWPOISON, p.read, a, 1)


def test_zero_page_keeps_its_frame(machine):
    m = machine
    z = m.zero_pfn
    p = m.spawn()
    a = p.mmap(64 * PS, populate=False)
    p.read(a, 64 * PS)
    assert p.pfn_of(a) == z
    m.hwpoison(m.frames_per_node - 1)                          # poison elsewhere on node 0
    p.write(a, b"x" * 64 * PS)
    p.exit()
    for _ in range(2):
        got = all_frames_handed_out(m, 0)
        assert z not in got
    assert m.mem_map.flags[z] & PG_reserved
    assert m.free_pages(0) == m.frames_per_node - 2
    q = m.spawn()
    b = q.mmap(PS, populate=False)
    assert q.read(b, PS) == bytes(PS) and q.pfn_of(b) == z


@pytest.mark.parametrize("pfn,exc", [(-1, ValueError), (2 * 8192, ValueError), (1 << 40, ValueError),
                                     ("5", TypeError), (5.0, TypeError), (True, TypeError),
                                     (None, TypeError)])
def test_hwpoison_bad_input(machine, pfn, exc):
    m = machine
    free, v = m.free_pages(), m.vmstat
    with pytest.raises(exc):
        m.hwpoison(pfn)
    assert m.free_pages() == free and m.vmstat == v


def test_hwpoison_numpy_int(machine):
    machine.hwpoison(np.int64(42))
    assert machine.mem_map.flags[42] & PG_hwpoison
