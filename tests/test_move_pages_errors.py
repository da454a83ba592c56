"""move_pages(2) call-level errors, in the kernel's order, and the state after them.

EINVAL (flags), EPERM (MOVE_ALL without cap_sys_nice), ESRCH (no such process), EPERM
(another uid without cap_sys_nice), then per entry ENODEV / EACCES when that entry is
reached (entries before it processed and migrated; ``OSError.status`` carries them).
Every call that fails as a whole leaves the machine exactly as it was: free pages per
node, vmstat, mem_map, page tables and every byte of memory.
"""
import errno

import numpy as np
import pytest

import copyengine as ce
from copyengine.testing.invariants import assert_unchanged, snapshot
from helpers import addrs, pattern, raises_errno

PS = 4096
MiB = 1 << 20
EBUSY, EFAULT, ENOENT = errno.EBUSY, errno.EFAULT, errno.ENOENT


class World:
    """A machine with a process holding small pages, a 2 MiB folio, shared memory and
    copy-on-write memory shared with a forked child, a pinned page and an untouched range."""

    def __init__(self, m):
        self.m = m
        p = self.p = m.spawn(uid=1000)
        self.sh = p.mmap(4 * PS, node=1, shared=True)
        p.write(self.sh, b"shared" * 100)
        self.cow = p.mmap(4 * PS, node=0)
        self.dcow = pattern(4 * PS, 3)
        p.write(self.cow, self.dcow)
        self.child = p.fork()
        self.a = p.mmap(8 * PS, node=0)
        self.da = pattern(8 * PS, 1)
        p.write(self.a, self.da)
        self.big = p.mmap(2 * MiB, node=0, folio_size="2MiB")
        self.dbig = pattern(2 * MiB, 2)
        p.write(self.big, self.dbig)
        self.untouched = p.mmap(4 * PS, node=0, populate=False)
        self.pin = p.pin(self.a + 7 * PS, PS)
        self.other = m.spawn(uid=2000)
        self.root = m.spawn(uid=0)
        self.nice = m.spawn(uid=3000, cap_sys_nice=True)

    def pages(self):
        return addrs(self.a, 6) + [self.big, self.sh]

    def check_contents(self):
        p, c = self.p, self.child
        assert p.read(self.a, 8 * PS) == self.da
        assert p.read(self.big, 2 * MiB) == self.dbig
        assert p.read(self.cow, 4 * PS) == self.dcow == c.read(self.cow, 4 * PS)
        assert p.read(self.sh, 600) == b"shared" * 100 == c.read(self.sh, 600)


@pytest.fixture
def world(machine):
    w = World(machine)
    yield w
    w.pin.release()


@pytest.fixture
def world4():
    with ce.Machine(nodes=4, node_size="32MiB") as m:
        yield m


# ----------------------------------------------------------------------------- EINVAL flags
@pytest.mark.parametrize("flags", [ce.MPOL_MF_STRICT, ce.MPOL_MF_STRICT | ce.MPOL_MF_MOVE, 8, 16,
                                   ce.MPOL_MF_MOVE | 8, -1, 1 << 31,
                                   ce.MPOL_MF_STRICT | ce.MPOL_MF_MOVE_ALL])
def test_einval_bad_flags(world, flags):
    w = world
    s0 = snapshot(w.m)
    for caller in (w.p, w.nice):
        raises_errno(errno.EINVAL, caller.move_pages, 0, w.pages(), [1] * 8, flags=flags)
        raises_errno(errno.EINVAL, caller.move_pages, 0, w.pages(), None, flags=flags)  # query too
        # before ESRCH and EPERM
        raises_errno(errno.EINVAL, caller.move_pages, 99999, w.pages(), [1] * 8, flags=flags)
        raises_errno(errno.EINVAL, caller.move_pages, w.other.pid, w.pages(), [9] * 8, flags=flags)
    assert_unchanged(s0, snapshot(w.m))
    w.check_contents()


def test_valid_flags_accepted(world):
    w = world
    assert w.p.move_pages(0, [w.a], [0], flags=0).status == [0]
    assert w.p.move_pages(0, [w.a], [0], flags=ce.MPOL_MF_MOVE).status == [0]
    assert w.nice.move_pages(w.p.pid, [w.a], [0], flags=ce.MPOL_MF_MOVE | ce.MPOL_MF_MOVE_ALL).status == [0]
    assert w.nice.move_pages(w.p.pid, [w.a], None, flags=ce.MPOL_MF_MOVE_ALL).status == [0]


# ----------------------------------------------------------------------------- EPERM
def test_eperm_move_all_without_cap_sys_nice(world):
    w = world
    s0 = snapshot(w.m)
    for flags in (ce.MPOL_MF_MOVE_ALL, ce.MPOL_MF_MOVE_ALL | ce.MPOL_MF_MOVE):
        raises_errno(errno.EPERM, w.p.move_pages, 0, w.pages(), [1] * 8, flags=flags)
        raises_errno(errno.EPERM, w.p.move_pages, 0, w.pages(), None, flags=flags)
        raises_errno(errno.EPERM, w.root.move_pages, 0, [], [], flags=flags)  # uid 0 is not enough
        # before ESRCH and before the per-entry node checks
        raises_errno(errno.EPERM, w.p.move_pages, 99999, w.pages(), [1] * 8, flags=flags)
        raises_errno(errno.EPERM, w.p.move_pages, 0, w.pages(), [7] * 8, flags=flags)
    assert_unchanged(s0, snapshot(w.m))
    w.check_contents()


@pytest.mark.parametrize("caller", ["other", "root"])
def test_eperm_other_uid_without_cap_sys_nice(world, caller):
    w = world
    c = getattr(w, caller)
    s0 = snapshot(w.m)
    raises_errno(errno.EPERM, c.move_pages, w.p.pid, w.pages(), [1] * 8)
    raises_errno(errno.EPERM, c.move_pages, w.p.pid, w.pages())            # query mode too
    raises_errno(errno.EPERM, c.move_pages, w.p.pid, w.pages(), [5] * 8)   # before ENODEV
    raises_errno(errno.EPERM, c.move_pages, w.child.pid, [w.a], [1])
    assert_unchanged(s0, snapshot(w.m))
    w.check_contents()


def test_uid_rules(world):
    w = world
    m = w.m
    # same uid: allowed; cap_sys_nice with another uid: allowed; uid 0 acts on uid 0
    same = m.spawn(uid=1000)
    assert same.move_pages(w.p.pid, [w.a]).status == [0]
    assert w.nice.move_pages(w.p.pid, [w.a]).status == [0]
    root2 = m.spawn(uid=0)
    b = root2.mmap(PS)
    assert w.root.move_pages(root2.pid, [b], [1]).status == [1]
    # a process with cap_sys_nice is no shield against one without it, if the uid matches
    n2 = m.spawn(uid=2000, cap_sys_nice=True)
    c = n2.mmap(PS)
    assert w.other.move_pages(n2.pid, [c], [1]).status == [1]
    # ... but an unprivileged uid 0 may not act on another uid
    raises_errno(errno.EPERM, w.root.move_pages, n2.pid, [c], [0])


# ----------------------------------------------------------------------------- ESRCH
def test_esrch_unknown_and_exited(world):
    w = world
    m = w.m
    gone = m.spawn(uid=1000)
    gone.mmap(PS)
    gone.exit()
    s0 = snapshot(m)
    for pid in (99999, gone.pid, -1, -w.p.pid):
        raises_errno(errno.ESRCH, w.p.move_pages, pid, [w.a], [1])
        raises_errno(errno.ESRCH, w.p.move_pages, pid, [w.a])
        raises_errno(errno.ESRCH, w.nice.move_pages, pid, [w.a], [1], flags=ce.MPOL_MF_MOVE_ALL)
        raises_errno(errno.ESRCH, w.p.move_pages, pid, [w.a], [9])   # before ENODEV
    # ESRCH comes before the uid check (there is no task to check against)
    raises_errno(errno.ESRCH, w.other.move_pages, gone.pid, [w.a], [1])
    # an exited caller
    raises_errno(errno.ESRCH, gone.move_pages, 0, [w.a], [1])
    raises_errno(errno.ESRCH, gone.move_pages, w.p.pid, [w.a])
    assert_unchanged(s0, snapshot(m))
    w.check_contents()


# ----------------------------------------------------------------------------- ENODEV
@pytest.mark.parametrize("bad", [2, 3, 63, 64, 1000, -1, -2])
def test_enodev_at_first_entry_changes_nothing(world, bad):
    w = world
    s0 = snapshot(w.m)
    e = raises_errno(errno.ENODEV, w.p.move_pages, 0, w.pages(), [bad] + [1] * 7)
    assert e.status == [None] * 8
    e = raises_errno(errno.ENODEV, w.p.move_pages, 0, [w.a], [bad])
    assert e.status == [None]
    assert_unchanged(s0, snapshot(w.m))
    w.check_contents()


def test_enodev_at_entry_i_migrates_entries_before(world):
    w = world
    m, p = w.m, w.p
    st0 = m.vmstat
    pages = addrs(w.a, 6) + [w.big]
    e = raises_errno(errno.ENODEV, p.move_pages, 0, pages, [1, 1, 0, 1, 7, 1, 1])
    assert e.status == [1, 1, 0, 1, None, None, None]
    assert [p.node_of(x) for x in pages] == [1, 1, 0, 1, 0, 0, 0]
    st = m.vmstat
    assert st["pgmigrate_success"] - st0["pgmigrate_success"] == 3
    assert st["pgmigrate_fail"] == st0["pgmigrate_fail"]
    w.check_contents()
    # the run before the bad node is flushed even when it is the same run's node
    e = raises_errno(errno.ENODEV, p.move_pages, 0, [w.big, w.a + 5 * PS, w.a + 4 * PS],
                     [1, 1, 2])
    assert e.status == [1, 1, None]
    assert p.node_of(w.big + MiB) == 1 and p.node_of(w.a + 5 * PS) == 1 and p.node_of(w.a + 4 * PS) == 0
    w.check_contents()


def test_enodev_status_carries_lookup_results(world):
    w = world
    p = w.p
    pages = [w.untouched, 0, w.cow + PS, w.a + 7 * PS, w.a, w.a, w.a + PS]
    e = raises_errno(errno.ENODEV, p.move_pages, 0, pages, [1, 1, 1, 1, 1, 1, 2])
    # never touched, unmapped, shared (child), pinned, moved, duplicate, not reached
    assert e.status == [-ENOENT, -EFAULT, -errno.EACCES, -EBUSY, 1, -EBUSY, None]
    w.check_contents()


# ----------------------------------------------------------------------------- EACCES (cpuset)
def test_eacces_node_outside_target_cpuset(world4):
    m = world4
    p = m.spawn(uid=1000, mems_allowed=[0, 1, 2])
    a = p.mmap(8 * PS, node=0)
    data = pattern(8 * PS, 3)
    p.write(a, data)
    st0 = m.vmstat
    e = raises_errno(errno.EACCES, p.move_pages, 0, addrs(a, 5), [1, 2, 0, 3, 1])
    assert e.status == [1, 2, 0, None, None]
    assert [p.node_of(x) for x in addrs(a, 5)] == [1, 2, 0, 0, 0]
    assert m.vmstat["pgmigrate_success"] - st0["pgmigrate_success"] == 2
    assert p.read(a, 8 * PS) == data
    # ENODEV is checked first for a node that does not exist at all
    e = raises_errno(errno.ENODEV, p.move_pages, 0, [a + 6 * PS, a + 7 * PS], [1, 4])
    assert e.status == [1, None]
    # the target's cpuset decides, not the caller's
    q = m.spawn(uid=1000, mems_allowed=[0])
    s0 = snapshot(m)
    e = raises_errno(errno.EACCES, q.move_pages, p.pid, [a], [3])
    assert e.status == [None]
    assert_unchanged(s0, snapshot(m))
    assert q.move_pages(p.pid, [a + 5 * PS], [2]).status == [2]
    assert p.read(a, 8 * PS) == data
    # a process confined to node 0 may still be asked about, and its pages stay put
    b = q.mmap(PS)
    e = raises_errno(errno.EACCES, p.move_pages, q.pid, [b], [1])
    assert e.status == [None] and q.node_of(b) == 0


# ----------------------------------------------------------------------------- argument types
@pytest.mark.parametrize("args", [
    dict(pid="0"), dict(pid=0.0), dict(pid=None), dict(pid=True),
    dict(pages=[1.5]), dict(pages=["a"]), dict(pages="abc"), dict(pages=b"ab"), dict(pages=None),
    dict(pages=3), dict(pages=[True]), dict(pages=np.array([1.0])),
    dict(nodes=[1.0]), dict(nodes=["1"]), dict(nodes=[None]), dict(nodes=1), dict(nodes="1"),
    dict(nodes=[True]), dict(nodes=np.array([1.0])),
    dict(flags=2.0), dict(flags="2"), dict(flags=None),
])
def test_type_errors_change_nothing(world, args):
    w = world
    call = dict(pid=0, pages=[w.a], nodes=[1], flags=ce.MPOL_MF_MOVE)
    if "pages" in args and args["pages"] is not None and not isinstance(args["pages"], int):
        try:
            call["nodes"] = [1] * len(args["pages"])
        except TypeError:
            pass
    call.update(args)
    s0 = snapshot(w.m)
    with pytest.raises(TypeError):
        w.p.move_pages(call["pid"], call["pages"], call["nodes"], call["flags"])
    assert_unchanged(s0, snapshot(w.m))


@pytest.mark.parametrize("npages,nnodes", [(3, 2), (3, 4), (1, 0), (0, 1)])
def test_einval_length_mismatch(world, npages, nnodes):
    w = world
    s0 = snapshot(w.m)
    e = raises_errno(errno.EINVAL, w.p.move_pages, 0, addrs(w.a, npages), [1] * nnodes)
    assert getattr(e, "status", None) is None
    assert_unchanged(s0, snapshot(w.m))


# ----------------------------------------------------------------------------- per-page, not call-level
def test_bad_addresses_are_per_page(world):
    w = world
    p = w.p
    st0 = w.m.vmstat
    pages = [-PS, 0, w.a - PS, w.a + 8 * PS, 1 << 50, (1 << 63) - 1, w.untouched + 3 * PS, w.a]
    r = p.move_pages(0, pages, [1] * 8)
    assert r.ret == 0
    assert r.status == [-EFAULT] * 6 + [-ENOENT, 1]
    assert p.read(w.a, 8 * PS) == w.da
    assert w.m.vmstat["pgmigrate_success"] == st0["pgmigrate_success"] + 1
    assert p.move_pages(0, pages).status == [-EFAULT] * 6 + [-ENOENT, 1]


def test_zero_page_is_efault(world):
    w = world
    p = w.p
    p.read(w.untouched, 1)
    s0 = snapshot(w.m)
    r = p.move_pages(0, [w.untouched, w.untouched + PS], [1, 1])
    assert r == ce.migrate.MovePagesResult(0, [-EFAULT, -ENOENT])
    assert p.pfn_of(w.untouched) == w.m.zero_pfn
    assert_unchanged(s0, snapshot(w.m))


def test_lookup_failures_only_change_nothing(world):
    """A call whose every entry fails its lookup (already there, shared, never touched,
    unmapped, the zero page) changes no state at all."""
    w = world
    p = w.p
    p.read(w.untouched + PS, 1)
    s0 = snapshot(w.m)
    r = p.move_pages(0, [w.a, w.sh, w.cow, w.a + PS, w.big, 0, w.untouched, w.untouched + PS],
                     [0, 1, 1, 0, 0, 1, 1, 1])
    assert r == ce.migrate.MovePagesResult(0, [0, 1, -errno.EACCES, 0, 0, -EFAULT, -ENOENT, -EFAULT])
    assert_unchanged(s0, snapshot(w.m))
    w.check_contents()


def test_snapshot_sees_every_kind_of_change(world):
    """The checker itself: a migration, a write and a fault each show up."""
    w = world
    s0 = snapshot(w.m)
    w.p.write(w.a, w.da[:1])                      # same byte: nothing changes
    assert_unchanged(s0, snapshot(w.m))
    w.p.write(w.a, bytes([w.da[0] ^ 1]))
    with pytest.raises(AssertionError):
        assert_unchanged(s0, snapshot(w.m))
    w.p.write(w.a, w.da[:1])
    assert_unchanged(s0, snapshot(w.m))
    w.p.move_pages(0, [w.a], [1])
    with pytest.raises(AssertionError):
        assert_unchanged(s0, snapshot(w.m))
