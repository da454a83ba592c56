"""migrate_pages(2): every page of a process on ``old_nodes`` moves to ``new_nodes`` with
do_migrate_pages' node pairing (mm/mempolicy.c), shared folios are skipped silently
without cap_sys_nice, the return value counts folios not migrated, and the errors
(EINVAL, ESRCH, EPERM) change nothing.

The pairing, from the kernel's comment: "[2,3,4] -> [3,4,5] moves everything.
[0-7] -> [3,4,5] moves only 0,1,2,6,7."
"""
import errno

import pytest

import copyengine as ce
from copyengine.plugins import make_plugin_manager
from copyengine.testing.invariants import assert_unchanged, snapshot
from helpers import addrs, free, mig, mig_delta, pattern, raises_errno

PS = 4096
KiB = 1 << 10
MiB = 1 << 20
MIG = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
       "thp_migration_split")


class Region:
    """A mapping with known contents, to check where its pages are and what they hold."""

    def __init__(self, p, length, node, seed, **kw):
        self.p, self.length = p, length
        self.a = p.mmap(length, node=node, **kw)
        self.data = pattern(length, seed)
        p.write(self.a, self.data)
        self.ps = p.machine.page_size

    def nodes(self, p=None):
        p = p or self.p
        return {p.node_of(x) for x in addrs(self.a, self.length // self.ps, self.ps)}

    def pfns(self, p=None):
        p = p or self.p
        return [p.pfn_of(x) for x in addrs(self.a, self.length // self.ps, self.ps)]

    def intact(self, p=None):
        return (p or self.p).read(self.a, self.length) == self.data


def machine(nodes, size="32MiB", **kw):
    return ce.Machine(nodes=nodes, node_size=size, **kw)


# ----------------------------------------------------------------------------- basics
def test_moves_everything_of_every_kind():
    with machine(2) as m:
        p = m.spawn()
        small = Region(p, 40 * PS, 0, 1)
        big = Region(p, 4 * MiB, 0, 2, folio_size="2MiB")
        mid = Region(p, 256 * KiB, 0, 3, folio_size="64KiB")
        sh = Region(p, 8 * PS, 0, 4, shared=True)
        zero = p.mmap(4 * PS, populate=False)
        p.read(zero, 1)                          # the zero page: not migrated
        on1 = Region(p, 4 * PS, 1, 5)            # already on the destination
        on1_pfns = on1.pfns()
        st, fr = mig(m), free(m)
        moved = 40 + 1024 + 64 + 8
        assert p.migrate_pages(0, [0], [1]) == 0
        mig_delta(st, m, pgmigrate_success=moved, thp_migration_success=2)
        assert free(m) == [fr[0] + moved, fr[1] - moved]
        for r in (small, big, mid, sh, on1):
            assert r.nodes() == {1} and r.intact()
        assert on1.pfns() == on1_pfns
        assert p.pfn_of(zero) == m.zero_pfn
        raises_errno(errno.ENOENT, p.node_of, zero + PS)
        # large folios stay whole
        h = p.pfn_of(big.a)
        assert h % 512 == 0 and m.mem_map.order[h] == 9
        assert p.pfn_of(mid.a + 15 * PS) == p.pfn_of(mid.a) + 15
        # and back
        assert p.migrate_pages(0, [1], [0]) == 0
        for r in (small, big, mid, sh, on1):
            assert r.nodes() == {0} and r.intact()
        assert free(m)[1] == fr[1] + 4


def test_other_process_by_pid_and_self_by_zero():
    with machine(2) as m:
        p = m.spawn(uid=5)
        q = m.spawn(uid=5)
        r = Region(p, 16 * PS, 0, 6)
        assert q.migrate_pages(p.pid, [0], [1]) == 0
        assert r.nodes() == {1} and r.intact()
        assert p.migrate_pages(p.pid, [1], [0]) == 0
        assert r.nodes() == {0} and r.intact()
        # q has no memory: nothing to do
        assert q.migrate_pages(0, [0, 1], [1]) == 0


def test_noop_cases_change_nothing():
    with machine(3) as m:
        p = m.spawn()
        Region(p, 8 * PS, 0, 7)
        Region(p, 8 * PS, 1, 8)
        s0 = snapshot(m)
        assert p.migrate_pages(0, [], [1]) == 0
        raises_errno(errno.EINVAL, p.migrate_pages, 0, [0], [])  # no new node: EINVAL (6.12)
        assert p.migrate_pages(0, [0], [0]) == 0
        assert p.migrate_pages(0, [0, 1], [1, 0]) == 0   # masks are sets: identity, no swap
        assert p.migrate_pages(0, [0, 1], (1, 0, 1)) == 0
        assert p.migrate_pages(0, [2], [0]) == 0        # nothing on node 2
        assert p.migrate_pages(0, [2], [2, 0, 1]) == 0
        assert_unchanged(s0, snapshot(m))


def test_identity_pairs_are_skipped():
    with machine(3) as m:
        p = m.spawn()
        r0 = Region(p, 8 * PS, 0, 7)
        r2 = Region(p, 8 * PS, 2, 8)
        p2 = r2.pfns()
        st = mig(m)
        # equal weights: 0 -> 1, 2 -> 2 (skipped)
        assert p.migrate_pages(0, [0, 2], [1, 2]) == 0
        assert r0.nodes() == {1} and r2.pfns() == p2
        mig_delta(st, m, pgmigrate_success=8)
        assert r0.intact() and r2.intact()


# ----------------------------------------------------------------------------- node pairing
def regions_on(p, nodes, n=6, seed=100, **kw):
    return {nd: Region(p, n * PS, nd, seed + nd, **kw) for nd in nodes}


def check_moves(regions, mapping):
    for nd, r in regions.items():
        assert r.nodes() == {mapping.get(nd, nd)}, f"pages of node {nd}: {r.nodes()}"
        assert r.intact()


def test_pairing_shift_by_one_4_nodes():
    with machine(4, "8MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(4))
        assert p.migrate_pages(0, [0, 1, 2], [1, 2, 3]) == 0
        check_moves(regs, {0: 1, 1: 2, 2: 3})


def test_pairing_kernel_example_2_3_4_to_3_4_5():
    """[2,3,4] -> [3,4,5] moves everything, and each page exactly one node on (the pairs
    run 4->5, 3->4, 2->3, so pages never travel twice)."""
    with machine(6, "4MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(6))
        st = mig(m)
        assert p.migrate_pages(0, [2, 3, 4], [3, 4, 5]) == 0
        check_moves(regs, {2: 3, 3: 4, 4: 5})
        mig_delta(st, m, pgmigrate_success=18)


def test_pairing_kernel_example_0_7_to_3_4_5():
    """[0-7] -> [3,4,5] moves only 0,1,2,6,7 (0->3, 1->4, 2->5, 6->3, 7->4)."""
    with machine(8, "4MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(8))
        pf = {nd: regs[nd].pfns() for nd in (3, 4, 5)}
        st = mig(m)
        assert p.migrate_pages(0, range(8), [3, 4, 5]) == 0
        check_moves(regs, {0: 3, 1: 4, 2: 5, 6: 3, 7: 4})
        assert {nd: regs[nd].pfns() for nd in (3, 4, 5)} == pf
        mig_delta(st, m, pgmigrate_success=30)


def test_pairing_different_weights_skip_sources_that_are_destinations():
    with machine(4, "8MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(4))
        pf1 = regs[1].pfns()
        assert p.migrate_pages(0, [0, 1, 2, 3], [1]) == 0
        check_moves(regs, {0: 1, 2: 1, 3: 1})
        assert regs[1].pfns() == pf1
    with machine(4, "8MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(4))
        # [0] -> [1,2]: node 0 is the first of old, goes to the first of new
        assert p.migrate_pages(0, [0], [2, 1]) == 0
        check_moves(regs, {0: 1})
        # [1,3] -> [0,1,2]: weights differ; 1 is a destination (skipped); 3 is the 2nd
        # of old -> the 2nd of new = 1
        assert p.migrate_pages(0, [1, 3], [0, 1, 2]) == 0
        assert regs[3].nodes() == {1} and regs[0].nodes() == {1}
        assert regs[1].nodes() == {1} and regs[2].nodes() == {2}
        for r in regs.values():
            assert r.intact()


def test_pairing_rotation_3_nodes():
    with machine(3, "8MiB") as m:
        p = m.spawn()
        regs = regions_on(p, range(3), seed=7)
        assert p.migrate_pages(0, [0, 1], [1, 2]) == 0
        check_moves(regs, {0: 1, 1: 2})


# ----------------------------------------------------------------------------- sharing
@pytest.mark.parametrize("shared", [False, True], ids=["cow", "map_shared"])
def test_shared_folios_skipped_without_cap_sys_nice(shared):
    with machine(2) as m:
        p = m.spawn(cap_sys_nice=False)
        s = Region(p, 8 * PS, 0, 11, shared=shared)
        sb = Region(p, 2 * MiB, 0, 12, shared=shared, folio_size="2MiB")
        c = p.fork()
        if shared:  # fork copied no PTEs of the shared mappings: the child maps them now
            assert s.intact(c) and sb.intact(c)
        own = Region(p, 8 * PS, 0, 13)           # mapped by p only
        spf = s.pfns()
        st = mig(m)
        assert p.migrate_pages(0, [0], [1]) == 0  # skipped silently: not counted
        assert own.nodes() == {1} and own.intact()
        assert s.pfns() == spf and s.pfns(c) == spf
        assert sb.nodes() == {0} and sb.nodes(c) == {0}
        mig_delta(st, m, pgmigrate_success=8)
        assert s.intact() and s.intact(c) and sb.intact(c)
        # the child's pages once written (private) are its own and move
        if not shared:
            c.write(s.a, s.data[:PS])
            assert c.migrate_pages(0, [0], [1]) == 0
            assert c.node_of(s.a) == 1 and c.node_of(s.a + PS) == 0 and p.node_of(s.a) == 0
            assert s.intact(c) and s.intact()


def test_large_folio_partly_cow_broken_is_still_shared():
    """Sharing is judged per folio: a large folio still mapped by another process is
    skipped without cap_sys_nice even where this process maps a page of it alone."""
    with machine(2) as m:
        p = m.spawn()
        big = Region(p, 2 * MiB, 0, 23, folio_size="2MiB")
        c = p.fork()
        c.write(big.a, b"C")                     # the child's page 0 is its own now
        before = mig(m)
        assert p.migrate_pages(0, [0], [1]) == 0
        # p maps page 0 alone, but the folio is still mapped by the child: skipped
        assert c.node_of(big.a + PS) == 0 and p.node_of(big.a) == 0
        mig_delta(before, m)


@pytest.mark.parametrize("shared", [False, True], ids=["cow", "map_shared"])
def test_shared_folios_moved_with_cap_sys_nice(shared):
    with machine(2) as m:
        p = m.spawn(cap_sys_nice=True)
        s = Region(p, 8 * PS, 0, 14, shared=shared)
        sb = Region(p, 2 * MiB, 0, 12, shared=shared, folio_size="2MiB")
        c = p.fork()
        if shared:  # fork copied no PTEs of the shared mappings: the child maps them now
            assert s.intact(c) and sb.intact(c)
        st = mig(m)
        assert p.migrate_pages(c.pid, [0], [1]) == 0
        mig_delta(st, m, pgmigrate_success=8 + 512, thp_migration_success=1)
        assert s.pfns(c) == s.pfns(p) and sb.pfns(c) == sb.pfns(p)
        for r in (s, sb):
            assert r.nodes(p) == r.nodes(c) == {1}
            assert r.intact(p) and r.intact(c)
        p.write(s.a, b"P")
        if shared:
            assert c.read(s.a, 1) == b"P"
        else:
            assert c.read(s.a, 1) == s.data[:1] and c.pfn_of(s.a) != p.pfn_of(s.a)


# ----------------------------------------------------------------------------- failures counted
def test_return_counts_folios_not_migrated():
    with machine(2) as m:
        p = m.spawn()
        small = Region(p, 16 * PS, 0, 16)
        big = Region(p, 4 * MiB, 0, 17, folio_size="2MiB")
        pins = [p.pin(small.a + 3 * PS, 2 * PS), p.pin(big.a + MiB, 1)]
        bad = p.pfn_of(small.a + 9 * PS)
        m.hwpoison(bad)
        st, fr = mig(m), free(m)
        # two pinned small pages, one pinned 2 MiB folio (counts once), one poisoned page
        assert p.migrate_pages(0, [0], [1]) == 4
        mig_delta(st, m, pgmigrate_success=13 + 512, pgmigrate_fail=3 + 512,
                  thp_migration_success=1, thp_migration_fail=1)
        assert free(m) == [fr[0] + 525, fr[1] - 525]
        nodes = [p.node_of(x) for x in addrs(small.a, 16)]
        assert nodes == [1, 1, 1, 0, 0, 1, 1, 1, 1, 0, 1, 1, 1, 1, 1, 1]
        assert p.node_of(big.a) == 0 and p.node_of(big.a + 2 * MiB) == 1
        assert p.pfn_of(small.a + 9 * PS) == bad
        assert p.read(small.a, 9 * PS) == small.data[:9 * PS]
        assert p.read(small.a + 10 * PS, 6 * PS) == small.data[10 * PS:]
        assert big.intact()
        for pin in pins:
            pin.release()
        assert p.migrate_pages(0, [0], [1]) == 1     # only the poisoned page is left
        assert big.nodes() == {1} and big.intact()


def test_return_counts_enomem():
    with machine(2) as m:
        p = m.spawn()
        r = Region(p, 8 * PS, 0, 18)
        b = Region(p, 2 * MiB, 0, 19, folio_size="2MiB")
        q = m.spawn(uid=77)
        q.mmap(m.free_pages(1) * PS, node=1)
        s0 = snapshot(m)
        assert p.migrate_pages(0, [0], [1]) == 9
        s1 = snapshot(m)
        # nothing moved; only the counters changed
        assert s1["free"] == s0["free"] and s1["processes"] == s0["processes"] and s1["memory"] == s0["memory"]
        assert r.intact() and b.intact() and r.nodes() == {0}


def test_small_batches():
    events = []

    class Obs:
        @ce.hookimpl
        def copyengine_migration_event(self, event, info):
            if event == "batch_start":
                events.append(info["folios"])

    pm = make_plugin_manager(entry_points=False, plugins=[Obs()])
    with machine(2, plugin_manager=pm) as m:
        m.settings["nr_max_batched_migration"] = 8
        p = m.spawn()
        r = Region(p, 60 * PS, 0, 20)
        assert p.migrate_pages(0, [0], [1]) == 0
        assert r.nodes() == {1} and r.intact()
        assert events == [8] * 7 + [4]


@pytest.mark.parametrize("mode", ["async", "sync_light", "sync"])
def test_modes(mode):
    with machine(2) as m:
        m.settings["migrate_mode"] = mode
        p = m.spawn()
        r = Region(p, 20 * PS, 0, 21)
        b = Region(p, 2 * MiB, 0, 22, folio_size="2MiB")
        pin = p.pin(r.a, PS)
        assert p.migrate_pages(0, [0], [1]) == 1
        assert p.node_of(r.a) == 0 and p.node_of(r.a + PS) == 1 and b.nodes() == {1}
        assert r.intact() and b.intact()
        pin.release()


# ----------------------------------------------------------------------------- errors
@pytest.fixture
def world():
    with machine(2) as m:
        p = m.spawn(uid=1000)
        r = Region(p, 8 * PS, 0, 30)
        b = Region(p, 2 * MiB, 0, 31, folio_size="2MiB")
        yield m, p, r, b


def test_esrch(world):
    m, p, r, b = world
    gone = m.spawn(uid=1000)
    gone.exit()
    s0 = snapshot(m)
    for pid in (99999, gone.pid, -1):
        raises_errno(errno.ESRCH, p.migrate_pages, pid, [0], [1])
    raises_errno(errno.ESRCH, gone.migrate_pages, 0, [0], [1])
    raises_errno(errno.ESRCH, gone.migrate_pages, p.pid, [0], [1])
    assert_unchanged(s0, snapshot(m))


@pytest.mark.parametrize("uid", [0, 1001])
def test_eperm_other_uid(world, uid):
    m, p, r, b = world
    other = m.spawn(uid=uid)
    s0 = snapshot(m)
    raises_errno(errno.EPERM, other.migrate_pages, p.pid, [0], [1])
    assert_unchanged(s0, snapshot(m))
    nice = m.spawn(uid=uid, cap_sys_nice=True)
    assert nice.migrate_pages(p.pid, [0], [1]) == 0
    assert r.nodes() == {1} and b.nodes() == {1} and r.intact() and b.intact()


@pytest.mark.parametrize("old,new", [([0], [2]), ([0], [1, 1000]), ([0, 64], [2])])
def test_absent_new_nodes_are_in_no_cpuset(world, old, new):
    """As kernel_migrate_pages (checked on 6.12): the process is looked up first (ESRCH,
    ptrace's EPERM); a node the machine lacks is in no cpuset, so it is EPERM without
    cap_sys_nice and dropped with it (nothing left: EINVAL, nothing moves)."""
    m, p, r, b = world
    other = m.spawn(uid=5)
    s0 = snapshot(m)
    raises_errno(errno.EPERM, p.migrate_pages, 0, old, new)
    raises_errno(errno.ESRCH, p.migrate_pages, 99999, old, new)
    raises_errno(errno.EPERM, other.migrate_pages, p.pid, old, new)
    assert_unchanged(s0, snapshot(m))
    nice = m.spawn(uid=1000, cap_sys_nice=True)
    if 1 in new:
        assert nice.migrate_pages(p.pid, old, new) == 0
        assert r.nodes() == {1}
    else:
        s1 = snapshot(m)
        raises_errno(errno.EINVAL, nice.migrate_pages, p.pid, old, new)
        assert_unchanged(s1, snapshot(m))
    assert r.intact() and b.intact()


@pytest.mark.parametrize("old,new", [([0], [-1]), ([-1], [0]), ([0], [1024]), ([1 << 70], [1])])
def test_einval_unrepresentable_node_before_lookup(world, old, new):
    """An id no nodemask holds (negative, MAX_NUMNODES and up) is a malformed mask
    (get_nodes): EINVAL before the lookup."""
    m, p, r, b = world
    s0 = snapshot(m)
    raises_errno(errno.EINVAL, p.migrate_pages, 0, old, new)
    raises_errno(errno.EINVAL, p.migrate_pages, 99999, old, new)
    assert_unchanged(s0, snapshot(m))


@pytest.mark.parametrize("old", [[2], [0, 64], [0, 2, 1000]])
def test_absent_old_nodes_ignored(world, old):
    """Node ids in old_nodes that do not exist are ignored, as in the kernel."""
    m, p, r, b = world
    assert p.migrate_pages(0, old, [1]) == 0
    if 0 in old:
        assert r.nodes() == {1} and b.nodes() == {1}
    else:
        assert r.nodes() == {0}
    assert r.intact() and b.intact()


@pytest.mark.parametrize("args", [(0, [0.0], [1]), (0, [0], ["1"]), (0, 0, [1]), (0, [0], 1),
                                  (0, "0", [1]), ("0", [0], [1]), (None, [0], [1]),
                                  (0, [True], [1]), (0, [0], None)])
def test_type_errors(world, args):
    m, p, r, b = world
    s0 = snapshot(m)
    with pytest.raises(TypeError):
        p.migrate_pages(*args)
    assert_unchanged(s0, snapshot(m))


def test_cpuset_rules():
    with machine(4, "8MiB") as m:
        p = m.spawn(uid=1000, mems_allowed=[0, 1])
        r = Region(p, 8 * PS, 0, 32)
        q = m.spawn(uid=1000)
        s0 = snapshot(m)
        # new nodes outside the target's cpuset need cap_sys_nice
        raises_errno(errno.EPERM, p.migrate_pages, 0, [0], [2])
        raises_errno(errno.EPERM, q.migrate_pages, p.pid, [0], [1, 3])
        assert_unchanged(s0, snapshot(m))
        nice = m.spawn(uid=1000, cap_sys_nice=True)
        assert nice.migrate_pages(p.pid, [0], [3]) == 0
        assert r.nodes() == {3} and r.intact()
        # the destination is limited to the caller's cpuset: nothing left is EINVAL (6.12)
        confined = m.spawn(uid=1000, cap_sys_nice=True, mems_allowed=[0])
        s1 = snapshot(m)
        raises_errno(errno.EINVAL, confined.migrate_pages, p.pid, [3], [1])
        assert_unchanged(s1, snapshot(m))
        assert confined.migrate_pages(p.pid, [3], [0, 2]) == 0   # new & {0} = {0}
        assert r.nodes() == {0} and r.intact()
