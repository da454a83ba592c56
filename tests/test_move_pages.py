"""move_pages(2): query mode, moving 4 KiB / 64 KiB base pages and 2 MiB folios, the
in-order semantics the contract fixes, sharing (fork, MAP_SHARED, MOVE_ALL), pins,
hwpoison, -ENOMEM, splitting a large folio for want of a free 2 MiB block, migrate
modes and batching.

Every test checks exact statuses, ``ret``, the migration vmstat counters, free memory per
node, and that every byte of every page survives.
"""
import errno

import numpy as np
import pytest

import copyengine as ce
from copyengine.mm.memmap import PG_locked
from copyengine.plugins import make_plugin_manager
from copyengine.testing.invariants import check_machine
from helpers import addrs, free, mig, mig_delta, pattern, raises_errno

PS = 4096
KiB = 1 << 10
MiB = 1 << 20
EBUSY, ENOMEM, ENOENT, EFAULT, EACCES = errno.EBUSY, errno.ENOMEM, errno.ENOENT, errno.EFAULT, errno.EACCES
EHWPOISON = ce.EHWPOISON
MIG = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
       "thp_migration_split")


# ----------------------------------------------------------------------------- helpers

def net_alloc(m):
    v = m.vmstat
    return v["pgalloc"] - v["pgfree"]


@pytest.fixture
def m4():
    with ce.Machine(nodes=4, node_size="32MiB") as m:
        yield m


# ----------------------------------------------------------------------------- query mode
def test_query_mode_reports_node_enoent_efault(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, node=0)
    b = p.mmap(4 * PS, node=1)
    c = p.mmap(4 * PS, node=1, populate=False)   # never touched
    p.read(c + PS, 1)                              # maps the zero page
    p.write(c + 2 * PS, b"x")                      # a real page on node 1
    before, fr = m.vmstat, free(m)
    r = p.move_pages(0, [a, b + 3 * PS, c, c + PS, c + 2 * PS, 0, c + 4 * PS, a + 5])
    assert r.ret == 0
    assert r.status == [0, 1, -ENOENT, -EFAULT, 1, -EFAULT, -EFAULT, 0]
    assert m.vmstat == before and free(m) == fr
    # ret, status also unpack like a tuple
    ret, status = p.move_pages(0, [a])
    assert (ret, status) == (0, [0])


def test_query_mode_large_folio_shared_pinned_poisoned(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, node=1, folio_size="2MiB")
    b = p.mmap(4 * PS, node=0)
    pin = p.pin(b, PS)
    m.hwpoison(p.pfn_of(b + PS))
    c = p.fork()
    r = p.move_pages(0, [a, a + MiB + 17, b, b + PS, b + 2 * PS])
    assert r == ce.migrate.MovePagesResult(0, [1, 1, 0, 0, 0])
    assert c.move_pages(0, [a, b + 2 * PS]).status == [1, 0]
    # another process of the same uid, by pid
    q = m.spawn()
    assert q.move_pages(p.pid, [a, b]).status == [1, 0]
    pin.release()


def test_query_mode_after_munmap_and_empty(machine):
    p = machine.spawn()
    a = p.mmap(4 * PS)
    p.munmap(a + PS, PS)
    assert p.move_pages(0, addrs(a, 4)).status == [0, -EFAULT, 0, 0]
    assert p.move_pages(0, []) == ce.migrate.MovePagesResult(0, [])


def test_move_mode_with_no_pages(machine):
    """An empty call with nodes is valid (it once raised IndexError)."""
    p = machine.spawn()
    assert p.move_pages(0, [], []) == ce.migrate.MovePagesResult(0, [])


# ----------------------------------------------------------------------------- 4 KiB pages
def test_move_4k_pages_and_back(machine):
    m = machine
    p = m.spawn()
    n = 64
    a = p.mmap(n * PS, node=0)
    data = pattern(n * PS, 1)
    p.write(a, data)
    old = [p.pfn_of(x) for x in addrs(a, n)]
    fr, st, na = free(m), mig(m), net_alloc(m)
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r.ret == 0 and r.status == [1] * n
    assert p.read(a, n * PS) == data
    assert [p.node_of(x) for x in addrs(a, n)] == [1] * n
    assert free(m) == [fr[0] + n, fr[1] - n]
    mig_delta(st, m, pgmigrate_success=n)
    assert net_alloc(m) == na
    new = [p.pfn_of(x) for x in addrs(a, n)]
    assert not set(new) & set(old)
    assert all(m.buddy.is_free(pf) for pf in old)
    # and back
    r = p.move_pages(0, addrs(a, n), [0] * n)
    assert r.ret == 0 and r.status == [0] * n
    assert p.read(a, n * PS) == data
    assert free(m) == fr
    mig_delta(st, m, pgmigrate_success=2 * n)
    check_machine(m)


def test_move_subset_and_mixed_nodes(m4):
    m = m4
    p = m.spawn()
    n = 16
    a = p.mmap(n * PS, node=0)
    data = pattern(n * PS, 2)
    p.write(a, data)
    want = [1, 1, 2, 3, 0, 3, 3, 2]
    pages = addrs(a, 8, 2 * PS)
    st = mig(m)
    r = p.move_pages(0, pages, want)
    assert r.ret == 0 and r.status == want
    nodes = [p.node_of(x) for x in addrs(a, n)]
    assert nodes[0::2] == want and nodes[1::2] == [0] * 8
    mig_delta(st, m, pgmigrate_success=7)
    assert p.read(a, n * PS) == data
    check_machine(m)


def test_move_pages_accepts_numpy_arrays_and_flags_zero(machine):
    p = machine.spawn()
    a = p.mmap(8 * PS)
    data = pattern(8 * PS, 3)
    p.write(a, data)
    r = p.move_pages(0, np.array(addrs(a, 4), np.uint64), np.ones(4, np.int32))
    assert r.status == [1] * 4
    r = p.move_pages(0, addrs(a + 4 * PS, 4), [1] * 4, flags=0)  # flags 0 is valid in Linux
    assert r.status == [1] * 4
    assert p.read(a, 8 * PS) == data


def test_address_rounds_down_to_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS)
    data = pattern(4 * PS, 4)
    p.write(a, data)
    st = mig(m)
    r = p.move_pages(0, [a + PS + 1, a + 3 * PS - 1], [1, 1])
    assert r.status == [1, 1]
    assert [p.node_of(x) for x in addrs(a, 4)] == [0, 1, 1, 0]
    mig_delta(st, m, pgmigrate_success=2)
    # the same page through two unaligned addresses: queued once, then -EBUSY
    r = p.move_pages(0, [a + 5, a + PS - 1], [1, 1])
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY])
    assert p.read(a, 4 * PS) == data


def test_already_on_node_is_not_migrated(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(8 * PS, node=1)
    data = pattern(8 * PS, 5)
    p.write(a, data)
    pfns = [p.pfn_of(x) for x in addrs(a, 8)]
    before, fr = m.vmstat, free(m)
    r = p.move_pages(0, addrs(a, 8), [1] * 8)
    assert r == ce.migrate.MovePagesResult(0, [1] * 8)
    assert m.vmstat == before and free(m) == fr
    assert [p.pfn_of(x) for x in addrs(a, 8)] == pfns
    assert p.read(a, 8 * PS) == data


def test_in_order_same_address_twice(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS)
    p.write(a, b"abc")
    st = mig(m)
    r = p.move_pages(0, [a, a], [1, 1])
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY])
    assert p.node_of(a) == 1
    mig_delta(st, m, pgmigrate_success=1)
    # node changes between entries: the first run is flushed before the second is looked up
    r = p.move_pages(0, [a, a], [0, 1])
    assert r == ce.migrate.MovePagesResult(0, [0, 1])
    assert p.node_of(a) == 1
    mig_delta(st, m, pgmigrate_success=3)
    # the duplicate ends the run: later entries of the same node are looked up again
    r = p.move_pages(0, [a + PS, a + PS, a + PS, a], [1, 1, 1, 1])
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY, 1, 1])
    assert p.read(a, 3) == b"abc"
    check_machine(m)


def test_other_process_same_uid(machine):
    m = machine
    p = m.spawn(uid=7)
    q = m.spawn(uid=7)
    a = p.mmap(4 * PS)
    data = pattern(4 * PS, 6)
    p.write(a, data)
    r = q.move_pages(p.pid, addrs(a, 4), [1] * 4)
    assert r.status == [1] * 4
    assert p.read(a, 4 * PS) == data
    # another uid with cap_sys_nice may act too
    s = m.spawn(uid=8, cap_sys_nice=True)
    assert s.move_pages(p.pid, addrs(a, 4), [0] * 4).status == [0] * 4
    assert p.read(a, 4 * PS) == data


# ----------------------------------------------------------------------------- 64 KiB base pages
def test_move_64k_base_pages(machine64k):
    m = machine64k
    ps = m.page_size
    assert ps == 64 * KiB
    p = m.spawn()
    n = 24
    a = p.mmap(n * ps)
    data = pattern(n * ps, 7)
    p.write(a, data)
    fr, st = free(m), mig(m)
    r = p.move_pages(0, [x + 4097 for x in addrs(a, n, ps)], [1] * n)  # rounded down to 64 KiB
    assert r == ce.migrate.MovePagesResult(0, [1] * n)
    assert free(m) == [fr[0] + n, fr[1] - n]
    mig_delta(st, m, pgmigrate_success=n)
    assert p.read(a, n * ps) == data
    # a 4 KiB step inside one 64 KiB page names the same page
    r = p.move_pages(0, [a, a + PS], [0, 0])
    assert r.status == [0, -EBUSY]
    assert p.move_pages(0, [a, a + ps]).status == [0, 1]
    assert p.read(a, n * ps) == data
    check_machine(m)


def test_move_2m_folio_with_64k_base_pages(machine64k):
    m = machine64k
    ps = m.page_size
    p = m.spawn()
    a = p.mmap(4 * MiB, folio_size="2MiB")
    data = pattern(4 * MiB, 8)
    p.write(a, data)
    assert p.pfn_of(a + ps) == p.pfn_of(a) + 1
    fr, st = free(m), mig(m)
    r = p.move_pages(0, [a + ps, a + 2 * MiB + 5 * ps], [1, 1])
    assert r.status == [1, 1]
    mig_delta(st, m, pgmigrate_success=64, thp_migration_success=2)
    assert free(m) == [fr[0] + 64, fr[1] - 64]
    assert all(p.node_of(x) == 1 for x in addrs(a, 64, ps))
    assert p.pfn_of(a) % 32 == 0 and p.pfn_of(a + 31 * ps) == p.pfn_of(a) + 31
    assert p.read(a, 4 * MiB) == data
    r = p.move_pages(0, [a, a + ps, a + MiB], [0, 0, 0])
    assert r == ce.migrate.MovePagesResult(0, [0, -EBUSY, 0])
    assert p.read(a, 4 * MiB) == data


# ----------------------------------------------------------------------------- 2 MiB folios
def test_move_2m_folio_any_address_moves_whole_folio(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, folio_size="2MiB")
    assert a % (2 * MiB) == 0
    data = pattern(4 * MiB, 9)
    p.write(a, data)
    head0 = p.pfn_of(a)
    fr, st, na = free(m), mig(m), net_alloc(m)
    r = p.move_pages(0, [a + 300 * PS + 7], [1])
    assert r == ce.migrate.MovePagesResult(0, [1])
    mig_delta(st, m, pgmigrate_success=512, thp_migration_success=1)
    assert net_alloc(m) == na
    assert free(m) == [fr[0] + 512, fr[1] - 512]
    assert all(p.node_of(x) == 1 for x in addrs(a, 512))
    assert all(p.node_of(x) == 0 for x in addrs(a + 2 * MiB, 32, 16 * PS))
    h = p.pfn_of(a)
    assert h % 512 == 0 and p.pfn_of(a + 511 * PS) == h + 511
    assert m.mem_map.order[h] == 9 and m.mem_map.refcount[h] == 512
    assert m.buddy.is_free(head0)
    assert p.read(a, 4 * MiB) == data
    check_machine(m)


def test_moved_2m_folio_leaves_no_page_locked(machine):
    """Only the head carries the folio lock, and finalize drops it; a tail page left with
    PG_locked would become a locked folio of its own once the folio is split (here: by
    the next migration, as the folio is then mapped only in part)."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    p.write(a, b"q" * 100)
    assert p.move_pages(0, [a], [1]).status == [1]
    h = p.pfn_of(a)
    p.munmap(a + MiB, MiB)                 # partly mapped: queued for a deferred split
    assert not (m.mem_map.flags[h:h + 512] & PG_locked).any()
    assert p.move_pages(0, [a + PS], [0]).status == [0]   # split, then its pages migrate
    assert m.mem_map.order[h + 5] == 0 and m.mem_map.head[h + 5] == h + 5
    assert not (m.mem_map.flags[h:h + 256] & PG_locked).any()


def test_2m_folio_in_order_head_tail_middle(machine):
    """The contract's example: [head, head+4K, head+1M] -> [1, -EBUSY, 1]."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 10)
    p.write(a, data)
    st = mig(m)
    r = p.move_pages(0, [a, a + PS, a + MiB], [1, 1, 1])
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY, 1])
    mig_delta(st, m, pgmigrate_success=512, thp_migration_success=1)
    r = p.move_pages(0, [a, a], [0, 0])
    assert r == ce.migrate.MovePagesResult(0, [0, -EBUSY])
    mig_delta(st, m, pgmigrate_success=1024, thp_migration_success=2)
    assert p.read(a, 2 * MiB) == data


def test_2m_folios_mixed_with_small_pages(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(6 * MiB, folio_size="2MiB")
    b = p.mmap(8 * PS)
    da, db = pattern(6 * MiB, 11), pattern(8 * PS, 12)
    p.write(a, da)
    p.write(b, db)
    st, fr = mig(m), free(m)
    pages = [a, b, a + 2 * MiB + PS, b + PS, a + 4 * MiB + 3 * PS]
    r = p.move_pages(0, pages, [1] * 5)
    assert r == ce.migrate.MovePagesResult(0, [1] * 5)
    mig_delta(st, m, pgmigrate_success=3 * 512 + 2, thp_migration_success=3)
    assert free(m) == [fr[0] + 1538, fr[1] - 1538]
    assert p.read(a, 6 * MiB) == da and p.read(b, 8 * PS) == db


def test_smaller_large_folios_do_not_count_as_thp(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(256 * KiB, folio_size="64KiB")
    data = pattern(256 * KiB, 13)
    p.write(a, data)
    st = mig(m)
    r = p.move_pages(0, [a + PS, a + 64 * KiB], [1, 1])
    assert r.status == [1, 1]
    mig_delta(st, m, pgmigrate_success=32)
    assert [p.node_of(x) for x in addrs(a, 4, 64 * KiB)] == [1, 1, 0, 0]
    assert p.read(a, 256 * KiB) == data


# ----------------------------------------------------------------------------- sharing
def test_cow_shared_after_fork_needs_move_all(machine):
    m = machine
    p = m.spawn(cap_sys_nice=True)
    n = 8
    a = p.mmap(n * PS)
    data = pattern(n * PS, 14)
    p.write(a, data)
    c = p.fork()
    before, fr = m.vmstat, free(m)
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r == ce.migrate.MovePagesResult(0, [-EACCES] * n)
    r = p.move_pages(c.pid, addrs(a, n), [1] * n, flags=ce.MPOL_MF_MOVE)
    assert r == ce.migrate.MovePagesResult(0, [-EACCES] * n)
    assert m.vmstat == before and free(m) == fr
    st = mig(m)
    r = p.move_pages(0, addrs(a, n), [1] * n, flags=ce.MPOL_MF_MOVE_ALL)
    assert r == ce.migrate.MovePagesResult(0, [1] * n)
    mig_delta(st, m, pgmigrate_success=n)
    assert free(m) == [fr[0] + n, fr[1] - n]
    for x in addrs(a, n):
        assert p.pfn_of(x) == c.pfn_of(x) and c.node_of(x) == 1
        assert m.mem_map.mapcount[p.pfn_of(x)] == 2
    assert p.read(a, n * PS) == data and c.read(a, n * PS) == data
    # a write separates the copies; both keep their contents
    c.write(a, b"child")
    assert p.pfn_of(a) != c.pfn_of(a)
    assert p.read(a, n * PS) == data
    assert c.read(a, n * PS) == b"child" + data[5:]
    # the written page is no longer shared: MOVE moves it in the parent, the rest stays -EACCES
    r = p.move_pages(0, addrs(a, 2), [0, 0])
    assert r.status == [0, -EACCES]
    assert p.read(a, n * PS) == data and c.read(a, 5) == b"child"
    # once the child exits, nothing is shared
    c.exit()
    assert p.move_pages(0, addrs(a, n), [0] * n).status == [0] * n
    assert p.read(a, n * PS) == data
    check_machine(m)


def test_large_folio_partly_cow_broken_is_still_shared(machine):
    """Sharing is a property of the folio: a 2 MiB folio whose page 0 the child has
    copied is still mapped by the child (pages 1..511), so MPOL_MF_MOVE gives -EACCES."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 34)
    p.write(a, data)
    c = p.fork()
    c.write(a, b"C")                       # the child now has its own copy of page 0 only
    assert c.pfn_of(a + PS) == p.pfn_of(a + PS)
    before = m.vmstat
    r = p.move_pages(0, [a], [1])          # page 0 is mapped once, but its folio twice
    assert r == ce.migrate.MovePagesResult(0, [-EACCES])
    assert c.node_of(a + PS) == 0 and m.vmstat == before


def test_move_all_on_child_moves_in_parent_too(machine):
    m = machine
    p = m.spawn(cap_sys_nice=True)
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 15)
    p.write(a, data)
    c = p.fork()
    assert p.move_pages(c.pid, [a], [1]).status == [-EACCES]
    st = mig(m)
    r = p.move_pages(c.pid, [a + 5 * PS], [1], flags=ce.MPOL_MF_MOVE_ALL)
    assert r.status == [1]
    mig_delta(st, m, pgmigrate_success=512, thp_migration_success=1)
    assert p.pfn_of(a) == c.pfn_of(a) and p.node_of(a + 2 * MiB - 1) == 1
    assert p.read(a, 2 * MiB) == data and c.read(a, 2 * MiB) == data
    p.write(a + 100, b"P")
    assert c.read(a + 100, 1) == data[100:101]
    assert p.read(a + 99, 2) == data[99:100] + b"P"


def test_map_shared_across_fork(machine):
    m = machine
    p = m.spawn(cap_sys_nice=True)
    n = 8
    a = p.mmap(n * PS, shared=True)
    data = pattern(n * PS, 16)
    p.write(a, data)
    # mapped by one process only: MOVE moves it
    assert p.move_pages(0, [a], [1]).status == [1]
    c = p.fork()
    assert c.read(a, n * PS) == data  # fork copied no PTEs (vma_needs_copy): map them in the child
    before = m.vmstat
    r = c.move_pages(0, addrs(a, n), [1] * n)
    assert r.status == [1] + [-EACCES] * (n - 1)   # already there / shared
    assert m.vmstat == before
    st = mig(m)
    r = c.move_pages(0, addrs(a, n), [1] * n, flags=ce.MPOL_MF_MOVE_ALL)
    assert r == ce.migrate.MovePagesResult(0, [1] * n)
    mig_delta(st, m, pgmigrate_success=n - 1)
    for x in addrs(a, n):
        assert p.pfn_of(x) == c.pfn_of(x) and p.node_of(x) == 1
    assert p.read(a, n * PS) == data and c.read(a, n * PS) == data
    # still shared: a write by one is seen by the other, on the moved frames
    pf = p.pfn_of(a + PS)
    c.write(a + PS, b"shared!")
    assert p.read(a + PS, 7) == b"shared!" and p.pfn_of(a + PS) == pf == c.pfn_of(a + PS)
    r = p.move_pages(0, addrs(a, n), [0] * n, flags=ce.MPOL_MF_MOVE_ALL)
    assert r.status == [0] * n
    assert c.read(a + PS, 7) == b"shared!"
    c.exit()
    p.munmap(a, n * PS)
    check_machine(m)


def test_map_shared_2m_folios_move_all(machine):
    m = machine
    p = m.spawn(cap_sys_nice=True)
    a = p.mmap(2 * MiB, shared=True, folio_size="2MiB")
    data = pattern(2 * MiB, 17)
    p.write(a, data)
    c = p.fork()
    assert c.read(a, 2 * MiB) == data  # fork copied no PTEs (vma_needs_copy): map them in the child
    st = mig(m)
    assert p.move_pages(0, [a], [1]).status == [-EACCES]
    r = p.move_pages(0, [a + MiB], [1], flags=ce.MPOL_MF_MOVE_ALL)
    assert r.status == [1]
    mig_delta(st, m, pgmigrate_success=512, thp_migration_success=1)
    assert c.pfn_of(a + MiB) == p.pfn_of(a + MiB) and c.node_of(a) == 1
    assert c.read(a, 2 * MiB) == data
    p.write(a, b"zz")
    assert c.read(a, 3) == b"zz" + data[2:3]


# ----------------------------------------------------------------------------- pins
def test_pinned_page_is_ebusy_and_moves_after_release(machine):
    m = machine
    p = m.spawn()
    n = 8
    a = p.mmap(n * PS)
    data = pattern(n * PS, 18)
    p.write(a, data)
    pin = p.pin(a + 2 * PS, PS)
    old = p.pfn_of(a + 2 * PS)
    st, fr, na = mig(m), free(m), net_alloc(m)
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r.ret == 1
    assert r.status == [1, 1, -EBUSY, 1, 1, 1, 1, 1]
    mig_delta(st, m, pgmigrate_success=n - 1, pgmigrate_fail=1)
    assert free(m) == [fr[0] + n - 1, fr[1] - n + 1]
    assert net_alloc(m) == na
    assert p.pfn_of(a + 2 * PS) == old
    assert m.mem_map.refcount[old] == 2 and m.mem_map.mapcount[old] == 1
    assert p.read(a, n * PS) == data
    pin.release()
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r == ce.migrate.MovePagesResult(0, [1] * n)
    assert p.read(a, n * PS) == data
    check_machine(m)


def test_pinned_2m_folio(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, folio_size="2MiB")
    data = pattern(4 * MiB, 19)
    p.write(a, data)
    pin = p.pin(a + MiB, 10)
    st = mig(m)
    r = p.move_pages(0, [a, a + 2 * MiB, a + PS], [1, 1, 1])
    # a+PS: its folio is already queued (isolated): -EBUSY, not counted in ret
    assert r == ce.migrate.MovePagesResult(1, [-EBUSY, 1, -EBUSY])
    mig_delta(st, m, pgmigrate_success=512, pgmigrate_fail=512,
              thp_migration_success=1, thp_migration_fail=1)
    # given alone, each attempt counts
    r = p.move_pages(0, [a + PS], [1])
    assert r == ce.migrate.MovePagesResult(1, [-EBUSY])
    assert p.node_of(a) == 0 and p.node_of(a + 2 * MiB) == 1
    assert p.read(a, 4 * MiB) == data
    pin.release()
    assert p.move_pages(0, [a], [1]).status == [1]
    assert p.read(a, 4 * MiB) == data


def test_partly_unmapped_pinned_2m_folio(machine):
    """munmap of half a pinned 2 MiB folio leaves it whole (6.12 defers the split of a
    partly mapped folio): while pinned it cannot be split at migration either, -EBUSY;
    once unpinned, the next migration splits it, its unmapped half is freed, and its
    mapped pages move alone (every page counts as migrated, the THP as failed and split)."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 36)
    p.write(a, data)
    pin = p.pin(a, PS)
    fr0 = m.free_pages(0)
    p.munmap(a + MiB, MiB)
    h = p.pfn_of(a)
    assert m.mem_map.order[h] == 9 and m.free_pages(0) == fr0
    r = p.move_pages(0, [a, a + PS], [1, 1])
    assert r == ce.migrate.MovePagesResult(1, [-EBUSY, -EBUSY])
    pin.release()
    assert m.mem_map.order[h] == 9 and m.free_pages(0) == fr0   # still whole: split deferred
    fr = free(m)
    st = mig(m)
    v = m.vmstat
    r = p.move_pages(0, [a, a + PS, a + MiB - PS], [1, 1, 1])
    # a + PS: its folio is already queued (-EBUSY, and the queue is flushed: split and
    # moved); a + MiB - PS: a page of its own by then, already on node 1
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY, 1])
    mig_delta(st, m, pgmigrate_success=512, thp_migration_fail=1, thp_migration_split=1)
    assert m.vmstat["thp_split_page"] == v["thp_split_page"] + 1
    assert free(m) == [fr[0] + 512, fr[1] - 256]    # the mapped half moved, all of it freed
    assert p.read(a, MiB) == data[:MiB]
    p.exit()
    check_machine(m)
    assert free(m) == [m.frames_per_node - 1, m.frames_per_node]


@pytest.mark.parametrize("mode", ["async", "sync_light", "sync"])
def test_modes_migrate_and_pinned_is_ebusy(machine, mode):
    m = machine
    m.settings["migrate_mode"] = mode
    p = m.spawn()
    a = p.mmap(16 * PS)
    b = p.mmap(4 * MiB, folio_size="2MiB")
    da, db = pattern(16 * PS, 20), pattern(4 * MiB, 21)
    p.write(a, da)
    p.write(b, db)
    pin = p.pin(a + 5 * PS, PS)
    pinb = p.pin(b + 2 * MiB, PS)
    st = mig(m)
    r = p.move_pages(0, addrs(a, 16) + [b, b + 2 * MiB], [1] * 18)
    want = [1] * 16 + [1, -EBUSY]
    want[5] = -EBUSY
    assert r == ce.migrate.MovePagesResult(2, want)
    mig_delta(st, m, pgmigrate_success=15 + 512, pgmigrate_fail=1 + 512,
              thp_migration_success=1, thp_migration_fail=1)
    assert p.read(a, 16 * PS) == da and p.read(b, 4 * MiB) == db
    pin.release()
    pinb.release()
    r = p.move_pages(0, addrs(a, 16) + [b, b + 2 * MiB], [0] * 18)
    assert r.status == [0] * 18
    assert p.read(a, 16 * PS) == da and p.read(b, 4 * MiB) == db
    check_machine(m)


# ----------------------------------------------------------------------------- hwpoison
def test_hwpoisoned_page_fails_alone(machine):
    m = machine
    p = m.spawn()
    n = 8
    a = p.mmap(n * PS)
    data = pattern(n * PS, 22)
    p.write(a, data)
    bad = p.pfn_of(a + 3 * PS)
    m.hwpoison(bad)
    st, fr = mig(m), free(m)
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r.ret == 1
    assert r.status == [1, 1, 1, -EHWPOISON, 1, 1, 1, 1]
    mig_delta(st, m, pgmigrate_success=n - 1, pgmigrate_fail=1)
    assert free(m) == [fr[0] + n - 1, fr[1] - n + 1]
    assert p.pfn_of(a + 3 * PS) == bad
    raises_errno(EHWPOISON, p.read, a + 3 * PS, 1)
    assert p.read(a, 3 * PS) == data[:3 * PS]
    assert p.read(a + 4 * PS, 4 * PS) == data[4 * PS:]
    check_machine(m)


def test_hwpoisoned_page_of_2m_folio_fails_whole_folio(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, folio_size="2MiB")
    data = pattern(4 * MiB, 23)
    p.write(a, data)
    m.hwpoison(p.pfn_of(a + 2 * MiB + 77 * PS))
    st = mig(m)
    r = p.move_pages(0, [a, a + 2 * MiB, a + 3 * MiB], [1, 1, 1])
    assert r == ce.migrate.MovePagesResult(1, [1, -EHWPOISON, -EBUSY])
    mig_delta(st, m, pgmigrate_success=512, pgmigrate_fail=512,
              thp_migration_success=1, thp_migration_fail=1)
    r = p.move_pages(0, [a + 3 * MiB], [1])
    assert r == ce.migrate.MovePagesResult(1, [-EHWPOISON])
    assert p.read(a, 2 * MiB) == data[:2 * MiB]
    assert p.read(a + 2 * MiB, 77 * PS) == data[2 * MiB:2 * MiB + 77 * PS]
    assert p.node_of(a + 3 * MiB) == 0


# ----------------------------------------------------------------------------- -ENOMEM
def fill_node(m, node, leave=0):
    """Another process takes every free page of ``node`` but ``leave``."""
    q = m.spawn(uid=4242)
    n = m.free_pages(node) - leave
    if n > 0:
        q.mmap(n * PS, node=node)
    assert m.free_pages(node) == leave
    return q


def test_enomem_per_page_when_target_full(machine):
    m = machine
    p = m.spawn()
    n = 8
    a = p.mmap(n * PS)
    data = pattern(n * PS, 24)
    p.write(a, data)
    q = fill_node(m, 1)
    st, fr = mig(m), free(m)
    pfns = [p.pfn_of(x) for x in addrs(a, n)]
    r = p.move_pages(0, addrs(a, n), [1] * n)
    assert r == ce.migrate.MovePagesResult(n, [-ENOMEM] * n)
    mig_delta(st, m, pgmigrate_fail=n)
    assert free(m) == fr
    assert [p.pfn_of(x) for x in addrs(a, n)] == pfns
    assert p.read(a, n * PS) == data
    q.exit()
    assert p.move_pages(0, addrs(a, n), [1] * n).status == [1] * n
    assert p.read(a, n * PS) == data


def test_enomem_partial_later_batches_still_run(machine):
    m = machine
    m.settings["nr_max_batched_migration"] = 4
    p = m.spawn()
    n = 12
    a = p.mmap(n * PS)
    data = pattern(n * PS, 25)
    p.write(a, data)
    fill_node(m, 1, leave=5)
    st = mig(m)
    r = p.move_pages(0, addrs(a, n), [1] * n)
    # batches run in order: the first 5 pages found memory, every later one -ENOMEM
    assert r == ce.migrate.MovePagesResult(n - 5, [1] * 5 + [-ENOMEM] * (n - 5))
    assert [p.node_of(x) for x in addrs(a, n)] == [1 if s == 1 else 0 for s in r.status]
    mig_delta(st, m, pgmigrate_success=5, pgmigrate_fail=n - 5)
    assert m.free_pages(1) == 0
    assert p.read(a, n * PS) == data
    # then a page that fits nowhere, followed by a node that has room: still per page
    r = p.move_pages(0, [a + (n - 1) * PS, a], [1, 0])
    assert r.status == [-ENOMEM if p.node_of(a + (n - 1) * PS) == 0 else 1, 0]


def _fragment_node(m, node, free_per_block):
    """Fill ``node`` with 4 KiB pages of another process, then free ``free_per_block``
    pages in each 2 MiB block: plenty of free small pages, no free 2 MiB block."""
    q = fill_node(m, node)
    base = q.vmas[0].start
    npages = q.vmas[0].npages
    pfns = np.array([q.pfn_of(base + i * PS) for i in range(npages)])
    victim = (pfns % 512) < free_per_block
    idx = np.nonzero(victim)[0]
    # munmap runs of consecutive addresses
    brk = np.nonzero(np.diff(idx) != 1)[0] + 1
    for run in np.split(idx, brk):
        if len(run):
            q.munmap(base + int(run[0]) * PS, len(run) * PS)
    return q


def test_2m_folio_split_when_target_has_no_free_2m_block(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 26)
    p.write(a, data)
    _fragment_node(m, 1, 64)
    assert m.free_pages(1) == 16 * 64
    assert not len(m.buddy.free_blocks(1)[9])
    st, fr = mig(m), free(m)
    r = p.move_pages(0, [a + 7 * PS, a, a + 2 * MiB - 1], [1, 1, 1])
    # a: its folio is queued (-EBUSY, flush); the flush splits it and every piece moves
    assert r == ce.migrate.MovePagesResult(0, [1, -EBUSY, 1])
    mig_delta(st, m, pgmigrate_success=512, thp_migration_fail=1, thp_migration_split=1)
    assert free(m) == [fr[0] + 512, fr[1] - 512]
    assert all(p.node_of(x) == 1 for x in addrs(a, 512))
    assert p.read(a, 2 * MiB) == data
    check_machine(m)


def test_2m_folio_split_partly_fits(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    data = pattern(2 * MiB, 27)
    p.write(a, data)
    _fragment_node(m, 1, 4)      # 64 free pages on node 1
    st = mig(m)
    pages = addrs(a, 512)
    r = p.move_pages(0, pages, [1] * 512)
    nodes = [p.node_of(x) for x in pages]
    assert nodes.count(1) == 64
    # the first entry splits the folio; each page's status is that page's outcome,
    # later entries of the same (split) folio report the node they now sit on
    assert r.status[1] == -EBUSY      # a+PS: its folio was queued by the first entry
    for i, (s, nd) in enumerate(zip(r.status, nodes)):
        if i != 1:
            assert s == nd or (s == -ENOMEM and nd == 0)
    assert r.ret == sum(1 for s in r.status if s == -ENOMEM)
    v = mig(m)
    assert v["thp_migration_split"] - st["thp_migration_split"] == 1
    assert v["thp_migration_fail"] - st["thp_migration_fail"] == 1
    assert v["thp_migration_success"] == st["thp_migration_success"]
    assert v["pgmigrate_success"] - st["pgmigrate_success"] >= 64
    assert m.free_pages(1) == 0
    assert p.read(a, 2 * MiB) == data
    check_machine(m)


# ----------------------------------------------------------------------------- batching
class BatchObserver:
    def __init__(self):
        self.events = []

    @ce.hookimpl
    def copyengine_migration_event(self, machine, event, info):
        self.events.append((event, dict((k, (v.copy() if isinstance(v, np.ndarray) else v))
                                        for k, v in info.items())))

    def count(self, event):
        return sum(1 for e, _ in self.events if e == event)


@pytest.mark.parametrize("mode", ["async", "sync_light", "sync"])
def test_small_batches_migrate_everything(mode):
    obs = BatchObserver()
    pm = make_plugin_manager(entry_points=False, plugins=[obs])
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=pm) as m:
        m.settings["nr_max_batched_migration"] = 8
        m.settings["migrate_mode"] = mode
        p = m.spawn()
        n = 64
        a = p.mmap(n * PS)
        data = pattern(n * PS, 28)
        p.write(a, data)
        st = mig(m)
        r = p.move_pages(0, addrs(a, n), [1] * n)
        assert r == ce.migrate.MovePagesResult(0, [1] * n)
        assert obs.count("batch_start") == obs.count("batch_end") == n // 8
        assert all(info["folios"] == 8 for e, info in obs.events if e == "batch_start")
        assert obs.count("batch_copy") == n // 8
        mig_delta(st, m, pgmigrate_success=n)
        assert p.read(a, n * PS) == data
        # 2 MiB folios: a batch never splits a folio, one folio per batch
        obs.events.clear()
        b = p.mmap(6 * MiB, folio_size="2MiB")
        db = pattern(6 * MiB, 29)
        p.write(b, db)
        r = p.move_pages(0, [b, b + 2 * MiB, b + 4 * MiB], [1, 1, 1])
        assert r.status == [1, 1, 1]
        assert obs.count("batch_start") == 3
        assert p.read(b, 6 * MiB) == db
        check_machine(m)


@pytest.mark.parametrize("mode", ["async", "sync_light", "sync"])
def test_batches_of_odd_size_and_pinned_retries(mode):
    """A pinned folio is retried as the kernel does: ASYNC makes 10 passes; SYNC modes make
    3 batched ASYNC passes, then 7 passes of that folio alone in their own mode."""
    obs = BatchObserver()
    pm = make_plugin_manager(entry_points=False, plugins=[obs])
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=pm) as m:
        m.settings["nr_max_batched_migration"] = 5
        m.settings["migrate_mode"] = mode
        p = m.spawn()
        n = 23
        a = p.mmap(n * PS)
        data = pattern(n * PS, 30)
        p.write(a, data)
        pin = p.pin(a + 11 * PS, PS)
        st = mig(m)
        r = p.move_pages(0, addrs(a, n), [1] * n)
        want = [1] * n
        want[11] = -EBUSY
        assert r == ce.migrate.MovePagesResult(1, want)
        mig_delta(st, m, pgmigrate_success=n - 1, pgmigrate_fail=1)
        starts = [(i["folios"], i["mode"]) for e, i in obs.events if e == "batch_start"]
        if mode == "async":
            retries = [(1, "async")] * 9
        else:
            retries = [(1, "async")] * 2 + [(1, mode)] * 7
        assert starts == [(5, "async")] * 3 + retries + [(5, "async"), (3, "async")]
        assert p.read(a, n * PS) == data
        pin.release()


def test_ret_counts_only_attempted_failures():
    with ce.Machine(nodes=3, node_size="8MiB") as m:
        p = m.spawn()
        cow = p.mmap(2 * PS)
        p.write(cow, b"cow")
        c = p.fork()
        a = p.mmap(16 * PS)
        data = pattern(16 * PS, 35)
        p.write(a, data)
        u = p.mmap(4 * PS, populate=False)
        p.read(u + PS, 1)                                  # zero page
        pin = p.pin(a + PS, PS)
        m.hwpoison(p.pfn_of(a + 2 * PS))
        fill_node(m, 2)
        pages = [u, u + PS, 0, cow, a + PS, a + 2 * PS, a + 3 * PS, a + 3 * PS, a + 4 * PS, a + 5 * PS]
        nodes = [1, 1, 1, 1, 1, 1, 1, 1, 2, 2]
        st = mig(m)
        r = p.move_pages(0, pages, nodes)
        assert r.status == [-ENOENT, -EFAULT, -EFAULT, -EACCES, -EBUSY, -EHWPOISON, 1, -EBUSY,
                            -ENOMEM, -ENOMEM]
        assert r.ret == 4          # pinned, poisoned and the two that found no memory
        mig_delta(st, m, pgmigrate_success=1, pgmigrate_fail=4)
        assert p.read(a, PS * 2) == data[:2 * PS] and p.read(a + 3 * PS, 13 * PS) == data[3 * PS:]
        assert c.read(cow, 3) == b"cow"
        pin.release()


def test_default_batch_size_is_pmd_nr(machine, machine64k):
    assert machine.settings["nr_max_batched_migration"] == 512
    assert machine64k.settings["nr_max_batched_migration"] == 8192


def test_many_pages_default_batches():
    obs = BatchObserver()
    pm = make_plugin_manager(entry_points=False, plugins=[obs])
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=pm) as m:
        p = m.spawn()
        n = 1300
        a = p.mmap(n * PS)
        data = pattern(n * PS, 31)
        p.write(a, data)
        r = p.move_pages(0, addrs(a, n), [1] * n)
        assert r.ret == 0 and r.status == [1] * n
        assert [i["folios"] for e, i in obs.events if e == "batch_start"] == [512, 512, 276]
        assert p.read(a, n * PS) == data


@pytest.mark.parametrize("engine", ["serial", "vanilla", "mt"])
def test_engines_preserve_contents(machine, engine):
    m = machine
    m.set_engine(engine)
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    b = p.mmap(33 * PS)
    da, db = pattern(2 * MiB, 32), pattern(33 * PS, 33)
    p.write(a, da)
    p.write(b, db)
    m.hwpoison(p.pfn_of(b + 4 * PS))
    st = mig(m)
    r = p.move_pages(0, [a] + addrs(b, 33), [1] * 34)
    want = [1] * 34
    want[5] = -EHWPOISON
    assert r == ce.migrate.MovePagesResult(1, want)
    mig_delta(st, m, pgmigrate_success=512 + 32, pgmigrate_fail=1, thp_migration_success=1)
    assert p.read(a, 2 * MiB) == da
    assert p.read(b, 4 * PS) == db[:4 * PS] and p.read(b + 5 * PS, 28 * PS) == db[5 * PS:]
    check_machine(m)
