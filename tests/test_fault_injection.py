"""Fault injection through the hooks (copyengine.testing.faults): every fault ends in a
completed migration or an exact undo, with the right status for every page.

Faults: destination allocation failing (all, by order, the first K calls, at random, a
frame budget), engines failing descriptors with -EIO, completing out of order, raising
mid-batch, hanging past ``copy_timeout``, returning malformed results, and hwpoisoned
sources (and poisoned free frames on the target, which must never be handed out).
After each: failed pages exactly as before (PageWatch), moved pages exactly moved, free
memory per node moved by exactly the migrated pages, every byte intact, and the whole
machine consistent (check_machine).
"""
import errno
import time

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import copyengine as ce
from copyengine.mm.pageflags import PG_hwpoison
from copyengine.testing.faults import (AllocFaults, CopyFaults, RaiseMidEngine, plugin_manager,
                                       poison_free_frame, poison_page)
from copyengine.testing.invariants import (PageWatch, assert_unchanged, check_machine,
                                           free_frames_expected, snapshot)
from helpers import pattern

PS = 4096
MiB = 1 << 20
ENOMEM, EBUSY, EHWPOISON = errno.ENOMEM, errno.EBUSY, ce.EHWPOISON
MIG = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
       "thp_migration_split")


def mig_delta(before, m):
    """The change of each migration counter since ``before`` (a vmstat snapshot)."""
    v = m.vmstat
    return {k: v[k] - before[k] for k in MIG}


class Load:
    """On node 0: ``n`` private 4 KiB pages, two 2 MiB folios, and 8 shared pages mapped
    by the process and a forked child."""

    def __init__(self, m, n=20):
        self.m = m
        p = self.p = m.spawn(cap_sys_nice=True)
        self.sh = p.mmap(8 * PS, shared=True)
        self.dsh = pattern(8 * PS, 1)
        p.write(self.sh, self.dsh)
        self.c = p.fork()
        assert self.c.read(self.sh, 8 * PS) == self.dsh  # fork copied no shared PTEs (vma_needs_copy)
        self.n = n
        self.a = p.mmap(n * PS)
        self.da = pattern(n * PS, 2)
        p.write(self.a, self.da)
        self.big = p.mmap(4 * MiB, folio_size="2MiB")
        self.dbig = pattern(4 * MiB, 3)
        p.write(self.big, self.dbig)
        self.bigs = (n, n + 1)          # entry indices of the 2 MiB folios

    def entries(self):
        p = self.p
        return ([(p, self.a + i * PS) for i in range(self.n)] + [(p, self.big), (p, self.big + 2 * MiB)]
                + [(p, self.sh + i * PS) for i in range(8)])

    def move(self, target):
        ent = self.entries()
        return self.p.move_pages(0, [a for _, a in ent], [target] * len(ent), flags=ce.MPOL_MF_MOVE_ALL)

    def intact(self, poisoned=()):
        """Every byte as written, except the pages at the (page) addresses ``poisoned``."""
        bad = set(poisoned)
        for procs, start, data in (((self.p,), self.a, self.da), ((self.p,), self.big, self.dbig),
                                   ((self.p, self.c), self.sh, self.dsh)):
            cuts = sorted(x for x in bad if start <= x < start + len(data))
            lo = start
            for x in cuts + [start + len(data)]:
                if x > lo:
                    for proc in procs:
                        assert proc.read(lo, x - lo) == data[lo - start:x - start], \
                            f"bytes at {lo:#x}..{x:#x} corrupted"
                lo = x + PS

    def big_pages(self, k):
        """Addresses of every base page of 2 MiB folio ``k``."""
        return [self.big + k * 2 * MiB + i * PS for i in range(512)]


def machine(*plugins, engine=None, **settings_):
    pm = plugin_manager(*plugins)
    m = ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm)
    if engine:
        m.set_engine(engine)
    for k, v in settings_.items():
        m.settings[k] = v
    return m


def settle(w, r, target, watch, poisoned=(), split_ok=False):
    """The common verdict: per-page statuses are the target or a failure; failed small
    pages are exactly undone, moved ones exactly moved; free memory moved by exactly the
    pages that moved (when no folio was split); bytes intact; machine consistent."""
    m = w.m
    assert len(r.status) == len(watch.entries)
    failed = [i for i, s in enumerate(r.status) if s != target]
    moved = [i for i, s in enumerate(r.status) if s == target]
    assert all(r.status[i] in (-ENOMEM, -EBUSY, -EHWPOISON) for i in failed), r.status
    assert r.ret == len(failed)
    small = lambda idx: [i for i in idx if i not in w.bigs]   # noqa: E731
    watch.check(small(failed), small(moved), target)
    if not split_ok:
        watch.check([i for i in failed if i in w.bigs], [i for i in moved if i in w.bigs], target)
        npg = watch.moved_pages(moved)
        src = 1 - target
        assert m.free_pages(target) == watch.free[target] - npg
        assert m.free_pages(src) == watch.free[src] + npg
    w.intact(poisoned)
    check_machine(m)
    return failed, moved


# ----------------------------------------------------------------------------- allocation
def test_alloc_fails_on_target_node_undoes_everything():
    alloc = AllocFaults(node=1, armed=False)
    with machine(alloc) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        big_pfns = [[w.p.pfn_of(a) for a in w.big_pages(k)] for k in (0, 1)]
        v0 = m.vmstat
        with alloc.armed():
            r = w.move(1)
        assert r.status == [-ENOMEM] * len(r.status) and r.ret == len(r.status)
        assert alloc.injected > 0
        failed, _ = settle(w, r, 1, watch, split_ok=True)
        assert m.free_pages(1) == watch.free[1] and m.free_pages(0) == watch.free[0]
        # the 2 MiB folios found no 2 MiB block: split, their pieces failed too, in place
        d = mig_delta(v0, m)
        assert d == {"pgmigrate_success": 0, "pgmigrate_fail": w.n + 8 + 1024,
                     "thp_migration_success": 0, "thp_migration_fail": 2, "thp_migration_split": 2}
        for k in (0, 1):
            assert [w.p.pfn_of(a) for a in w.big_pages(k)] == big_pfns[k]
            assert (m.mem_map.order[big_pfns[k]] == 0).all()
        # disarmed, everything moves (the split pieces as base pages)
        r = w.move(1)
        assert r.status == [1] * len(r.status) and r.ret == 0
        w.intact()
        check_machine(m)


def test_alloc_fails_for_2m_only_splits_and_migrates_the_pieces():
    alloc = AllocFaults(node=1, order=9)
    with machine(alloc) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        v0 = m.vmstat
        r = w.move(1)
        assert r.status == [1] * len(r.status) and r.ret == 0
        settle(w, r, 1, watch, split_ok=True)
        assert mig_delta(v0, m) == {"pgmigrate_success": w.n + 8 + 1024, "pgmigrate_fail": 0,
                                    "thp_migration_success": 0, "thp_migration_fail": 2,
                                    "thp_migration_split": 2}
        for k in (0, 1):
            assert all(w.p.node_of(a) == 1 for a in w.big_pages(k))
        assert m.free_pages(1) == watch.free[1] - (w.n + 8 + 1024)


@pytest.mark.parametrize("count", [1, 2, 3, 5])
def test_alloc_fails_first_k_calls(count):
    """The first K allocation calls fail: what they were for reports -ENOMEM and is
    undone exactly; later batches still run and migrate."""
    alloc = AllocFaults(node=1, count=count)
    with machine(alloc, nr_max_batched_migration=4) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        assert alloc.injected == count and alloc.count == 0
        failed, moved = settle(w, r, 1, watch, split_ok=True)
        assert failed and moved
        assert all(r.status[i] == -ENOMEM for i in failed)
        # the last shared pages come after every failure was spent
        assert r.status[-1] == 1


@pytest.mark.parametrize("seed", range(6))
def test_alloc_fails_at_random(seed):
    alloc = AllocFaults(node=1, probability=0.5, seed=seed)
    with machine(alloc, nr_max_batched_migration=8) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        failed, moved = settle(w, r, 1, watch, split_ok=True)
        assert all(r.status[i] == -ENOMEM for i in failed)
        assert alloc.injected >= 1 or not failed
        alloc.disarm()
        r = w.move(1)
        assert r.status == [1] * len(r.status)
        w.intact()
        check_machine(m)


@pytest.mark.parametrize("keep", [0, 1, 3])
def test_alloc_fault_on_page_fault_changes_nothing(keep):
    """Outside migration an allocation failure is OSError(ENOMEM) from the fault, and
    the access changes nothing (the partial allocation is handed back)."""
    alloc = AllocFaults(node=0, keep=keep, armed=False)
    with machine(alloc) as m:
        p = m.spawn()
        a = p.mmap(16 * PS, populate=False)
        p.write(a, b"before")
        s0 = snapshot(m)
        with alloc.armed():
            for call in (lambda: p.write(a + PS, b"x" * (8 * PS)), lambda: p.mmap(8 * PS),
                         lambda: p.pin(a + 4 * PS, 4 * PS),
                         lambda: p.mmap(4 * MiB, folio_size="2MiB")):
                with pytest.raises(OSError) as ei:
                    call()
                assert ei.value.errno == ENOMEM
        # the allocator's free lists are as before; only stale fields of free frames differ
        # (and the failed mmaps used up some address space)
        assert_unchanged(s0, snapshot(m), ignore=("mem_map_free", "mmap_base"))
        assert alloc.injected >= 3
        assert p.read(a, 6) == b"before"
        check_machine(m)


def test_fork_copying_pinned_pages_fails_cleanly():
    """fork must copy pinned private pages at once; when that allocation fails the fork
    fails with ENOMEM and changes nothing (found by the state machine: only stale
    fields of the handed-back free frames differ)."""
    alloc = AllocFaults(node=0, armed=False)
    with machine(alloc) as m:
        p = m.spawn()
        a = p.mmap(8 * PS)
        p.write(a, pattern(8 * PS, 9))
        pin = p.pin(a + PS, 3 * PS)
        s0 = snapshot(m)
        with alloc.armed():
            with pytest.raises(OSError) as ei:
                p.fork()
        assert ei.value.errno == ENOMEM
        assert_unchanged(s0, snapshot(m), ignore=("mem_map_free",))
        check_machine(m)
        c = p.fork()
        assert c.read(a, 8 * PS) == p.read(a, 8 * PS)
        assert c.pfn_of(a + PS) != p.pfn_of(a + PS) and c.pfn_of(a) == p.pfn_of(a)
        pin.release()
        check_machine(m)


def test_alloc_budget_partial_batches():
    alloc = AllocFaults(node=1, budget=30)
    with machine(alloc, nr_max_batched_migration=16) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        failed, moved = settle(w, r, 1, watch, split_ok=True)
        pages_on_1 = sum(1 for i in range(w.n) if w.p.node_of(w.a + i * PS) == 1)
        assert pages_on_1 + sum(1 for i in range(8) if w.p.node_of(w.sh + i * PS) == 1) <= 30
        assert failed and moved


def test_migrate_pages_counts_injected_failures():
    alloc = AllocFaults(node=1, count=1)
    with machine(alloc, nr_max_batched_migration=4) as m:
        w = Load(m)
        v0 = m.vmstat
        left = w.p.migrate_pages(0, [0], [1])
        d = mig_delta(v0, m)
        # one batch of up to 4 base pages failed: folios not migrated, counted once each
        assert 1 <= left <= 4 and d["pgmigrate_fail"] == left
        check_machine(m)
        w.intact()
        assert w.p.migrate_pages(0, [0], [1]) == 0
        check_machine(m)
        w.intact()


# ----------------------------------------------------------------------------- engines
ENGINES = ["eio:1", "eio:2", "eio:3", "ooo", "ooo:20", "hang", "hang:3", "raisemid", "raisemid:0",
           "raisemid:3"]


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("batch", [512, 5])
def test_faulty_engines_complete_every_migration(engine, batch):
    """Engines that fail descriptors, complete out of order, raise or hang past the
    timeout: every clean page still moves, the poisoned one fails alone."""
    with machine(engine=engine, nr_max_batched_migration=batch, copy_timeout=0.02) as m:
        w = Load(m)
        bad = [w.a + 5 * PS]
        poison_page(w.p, bad[0])
        watch = PageWatch(m, w.entries())
        t0 = time.monotonic()
        r = w.move(1)
        elapsed = time.monotonic() - t0
        want = [1] * len(r.status)
        want[5] = -EHWPOISON
        assert r.status == want and r.ret == 1
        settle(w, r, 1, watch, poisoned=bad)
        if engine.startswith("hang"):
            # every batch waited one copy_timeout, no more
            assert elapsed < 30
            time.sleep(0.05)           # a cancelled job never writes afterwards
            w.intact(poisoned=bad)
        if engine.startswith("raisemid"):
            assert isinstance(m.engine, RaiseMidEngine) and m.engine.raised >= 1
        r = w.move(0)
        assert r.status == [0] * len(r.status)   # the poisoned page never left node 0
        w.intact(poisoned=bad)
        check_machine(m)


@pytest.mark.parametrize("kind", CopyFaults.KINDS)
@pytest.mark.parametrize("engine", ["serial", "mt:2", "ooo", "eio:2"])
def test_copy_faults_in_front_of_any_engine(kind, engine):
    faults = CopyFaults(kind, fail=0.5, seed=7)
    events = []

    class Events:
        @ce.hookimpl
        def copyengine_migration_event(self, event, info):
            events.append((event, info.get("error")))

    with machine(faults, Events(), engine=engine, nr_max_batched_migration=6, copy_timeout=5.0) as m:
        w = Load(m)
        poison_page(w.p, w.big + 7 * PS)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        want = [1] * len(r.status)
        want[w.n] = -EHWPOISON
        assert r.status == want and r.ret == 1
        assert faults.injected >= 1
        settle(w, r, 1, watch, poisoned=[w.big + 7 * PS])
        errors = [e for ev, e in events if ev == "engine_error"]
        if kind in ("raise", "badresult"):
            assert len(errors) == faults.injected
            assert all(("RuntimeError" if kind == "raise" else "PluginError") in e for e in errors)
        else:
            assert not errors
        with pytest.raises(OSError) as ei:
            w.p.read(w.big + 7 * PS, 1)
        assert ei.value.errno == EHWPOISON


def test_copy_faults_limited_count_and_probability():
    faults = CopyFaults("nothing", probability=0.5, count=3, seed=1)
    with machine(faults, nr_max_batched_migration=2) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        assert r.status == [1] * len(r.status)
        assert faults.injected == 3 and len(faults.log) == 3
        settle(w, r, 1, watch)


def test_vanilla_goes_through_the_copy_and_alloc_hooks():
    """Wrappers see the vanilla flow as they see every flow: copy faults injected into it
    fall back to folio_mc_copy (nothing lost), allocation faults fail folios with -ENOMEM."""
    faults = CopyFaults("raise")
    alloc = AllocFaults(node=1, order=0, count=2)
    with machine(faults, alloc, engine="vanilla", nr_max_batched_migration=4) as m:
        w = Load(m)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        assert faults.injected > 0 and m.vmstat["copy_engine_errors"] == faults.injected
        failed, _ = settle(w, r, 1, watch)
        assert failed and all(r.status[i] == -ENOMEM for i in failed)


# ----------------------------------------------------------------------------- hwpoison
def test_poisoned_sources_fail_alone_with_ehwpoison():
    with machine(engine="mt:2") as m:
        w = Load(m)
        poisoned = [poison_page(w.p, w.a + 3 * PS), poison_page(w.p, w.big + 2 * MiB + 511 * PS),
                    poison_page(w.c, w.sh + 6 * PS)]
        assert m.vmstat["nr_hwpoison"] == 3
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        bad = [3, w.n + 1, w.n + 2 + 6]
        assert [i for i, s in enumerate(r.status) if s != 1] == bad
        assert all(r.status[i] == -EHWPOISON for i in bad) and r.ret == 3
        watch.check(bad, [i for i in range(len(r.status)) if i not in bad], 1)
        check_machine(m)
        for pfn in poisoned:
            assert m.mem_map.flags[pfn] & PG_hwpoison
        # everything gone: the poisoned frames never return, the rest does
        w.p.exit()
        w.c.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == [free_frames_expected(m, n) for n in range(2)]
        assert m.free_pages(0) == m.frames_per_node - 1 - 3


def test_poisoned_free_frames_on_target_are_never_destinations():
    with machine() as m:
        w = Load(m, n=40)
        rng = np.random.default_rng(5)
        bad = {poison_free_frame(m, 1, rng) for _ in range(20)}
        bad.add(poison_free_frame(m, 1))
        assert None not in bad and len(bad) == 21
        free1 = m.free_pages(1)
        assert free1 == m.frames_per_node - 21
        check_machine(m)
        r = w.move(1)
        assert r.status == [1] * len(r.status)
        w.intact()
        check_machine(m)
        used = {w.p.pfn_of(a) for _, a in w.entries()}
        used |= {w.p.pfn_of(a) for k in (0, 1) for a in w.big_pages(k)[::64]}
        assert not used & bad
        w.p.exit()
        w.c.exit()
        assert m.free_pages(1) == m.frames_per_node - 21
        check_machine(m)


def test_poison_a_free_frame_of_a_full_node_returns_none():
    with machine() as m:
        hog = m.alloc_folios(1, 0, m.free_pages(1))
        assert poison_free_frame(m, 1) is None
        m.free_folios(hog)
        assert poison_free_frame(m, 1) == m.frames_per_node
        check_machine(m)


# ----------------------------------------------------------------------------- everything at once
@settings(max_examples=max(8, settings().max_examples // 6))
@given(data=st.data())
def test_any_mix_of_faults_loses_nothing(data):
    engine = data.draw(st.sampled_from(["serial", "vanilla", "mt:2", "eio:2", "ooo", "hang:1",
                                        "raisemid"]), label="engine")
    kind = data.draw(st.sampled_from([None, *CopyFaults.KINDS]), label="copy fault")
    p_alloc = data.draw(st.sampled_from([0.0, 0.3, 1.0]), label="alloc failure probability")
    alloc_order = data.draw(st.sampled_from([None, 0, 9]), label="alloc failure order")
    batch = data.draw(st.sampled_from([1, 3, 16, 512]), label="batch")
    mode = data.draw(st.sampled_from(["async", "sync_light", "sync"]), label="mode")
    npoison = data.draw(st.integers(0, 3), label="poisoned pages")
    pinned = data.draw(st.sets(st.integers(0, 11), max_size=3), label="pinned pages")
    seed = data.draw(st.integers(0, 1000), label="seed")
    alloc = AllocFaults(node=1, order=alloc_order, probability=p_alloc, seed=seed)
    plugins = [alloc] + ([CopyFaults(kind, probability=0.7, seed=seed)] if kind else [])
    with machine(*plugins, engine=engine, nr_max_batched_migration=batch, migrate_mode=mode,
                 copy_timeout=0.02) as m:
        w = Load(m, n=12)
        rng = np.random.default_rng(seed)
        poisoned = sorted({int(x) for x in rng.choice(12, npoison, replace=False)})
        pins = [w.p.pin(w.a + i * PS, PS) for i in sorted(pinned)]
        for i in poisoned:
            poison_page(w.p, w.a + i * PS)
        watch = PageWatch(m, w.entries())
        r = w.move(1)
        failed, moved = settle(w, r, 1, watch, poisoned=[w.a + i * PS for i in poisoned], split_ok=True)
        for i in failed:
            s = r.status[i]
            if i < w.n:
                if s == -EHWPOISON:
                    assert i in poisoned
                if s == -EBUSY:
                    assert i in pinned
                if i in pinned and i not in poisoned:
                    assert s in (-EBUSY, -ENOMEM)
            if s == -ENOMEM:
                assert p_alloc > 0
        for i in poisoned:
            assert r.status[i] in (-EHWPOISON, -ENOMEM, -EBUSY)
        for pin in pins:
            pin.release()
        w.p.exit()
        w.c.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == [free_frames_expected(m, n) for n in range(2)]
