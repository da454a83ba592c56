"""Processes: mmap/munmap, faults, the zero page, read/write, shared memory, exit;
plus a hypothesis check of read/write against a shadow copy."""
import errno
from errno import EFAULT

import numpy as np
import pytest
from hypothesis import given, strategies as st

import copyengine as ce
from copyengine.mm.memmap import PG_anon, PG_swapbacked
from copyengine.mm.pageflags import PG_partially_mapped
from copyengine.testing.invariants import check_machine
from helpers import mig, mig_delta, pattern, raises_errno

PS = 4096
KiB = 1 << 10
MiB = 1 << 20


# ----------------------------------------------------------------------------- mmap
def test_mmap_private_populated(machine):
    m = machine
    p = m.spawn()
    free0 = m.free_pages(0)
    a = p.mmap(10 * PS)
    assert a % PS == 0
    assert m.free_pages(0) == free0 - 10
    assert len(p.vmas) == 1 and (p.vmas[0].start, p.vmas[0].end) == (a, a + 10 * PS)
    pfns = [p.pfn_of(a + i * PS) for i in range(10)]
    assert len(set(pfns)) == 10 and m.zero_pfn not in pfns
    for pfn in pfns:
        assert m.node_of_pfn(pfn) == 0
        assert m.mem_map.flags[pfn] & PG_anon
        assert m.mem_map.mapcount[pfn] == 1 and m.mem_map.refcount[pfn] == 1
    assert p.read(a, 10 * PS) == bytes(10 * PS)          # populated memory reads as zeros


def test_mmap_length_is_rounded_up(machine):
    p = machine.spawn()
    free0 = machine.free_pages(0)
    a = p.mmap(1)
    assert machine.free_pages(0) == free0 - 1
    p.write(a + PS - 1, b"z")
    raises_errno(errno.EFAULT, p.write, a + PS, b"z")
    b = p.mmap(PS + 1, populate=False)
    assert b >= a + PS
    assert p.vmas[-1].end - b == 2 * PS


@pytest.mark.parametrize("node", [0, 1])
def test_mmap_node_binding(machine, node):
    m = machine
    p = m.spawn()
    free = [m.free_pages(0), m.free_pages(1)]
    a = p.mmap(4 * PS, node=node, populate=False)
    assert [m.free_pages(0), m.free_pages(1)] == free       # nothing allocated yet
    p.write(a + PS + 5, b"hi")
    assert p.node_of(a + PS) == node
    free[node] -= 1
    assert [m.free_pages(0), m.free_pages(1)] == free
    p.write(a, b"x" * 4 * PS)
    assert all(p.node_of(a + i * PS) == node for i in range(4))
    assert all(m.node_of_pfn(p.pfn_of(a + i * PS)) == node for i in range(4))


def test_mmap_respects_mems_allowed(machine):
    p = machine.spawn(mems_allowed=[1])
    raises_errno(errno.EINVAL, p.mmap, PS, node=0)
    a = p.mmap(PS, node=1)
    assert p.node_of(a) == 1


@pytest.mark.parametrize("folio_size,nr", [("8KiB", 2), ("64KiB", 16), ("1MiB", 256),
                                           ("2MiB", 512), (2 * MiB, 512)])
@pytest.mark.parametrize("node", [0, 1])
def test_large_folios_naturally_aligned(machine, folio_size, nr, node):
    m = machine
    p = m.spawn()
    p.mmap(3 * PS)                                 # disturb the address cursor
    free0 = m.free_pages(node)
    size = nr * PS
    a = p.mmap(2 * size, node=node, folio_size=folio_size)
    assert a % size == 0
    assert m.free_pages(node) == free0 - 2 * nr
    for f in range(2):
        head = p.pfn_of(a + f * size)
        assert head % nr == 0
        assert m.node_of_pfn(head) == node
        assert m.mem_map.order[head] == nr.bit_length() - 1
        for i in (0, 1, nr // 2, nr - 1):
            pfn = p.pfn_of(a + f * size + i * PS)
            assert pfn == head + i
            assert m.mem_map.head[pfn] == head
            assert m.mem_map.order[pfn] == nr.bit_length() - 1
        assert m.mem_map.refcount[head] == nr        # one reference per PTE mapping it


def test_large_folio_tail_that_does_not_fit_is_small(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(64 * KiB + 3 * PS, folio_size="64KiB")
    assert m.mem_map.order[p.pfn_of(a)] == 4
    for i in range(3):
        assert m.mem_map.order[p.pfn_of(a + 64 * KiB + i * PS)] == 0


def test_large_folio_fault_falls_back_to_base_pages_when_fragmented(machine):
    """No free 2 MiB block but free single pages: the fault maps base pages (mTHP
    fallback), it does not fail with ENOMEM."""
    m = machine
    hog = m.spawn()
    # Fill node 0, then free every other page: plenty of memory, no order-9 block.
    a = hog.mmap(m.free_pages(0) * m.page_size, node=0)
    for i in range(0, m.free_pages(0) + 16384, 2):
        if a + (i + 1) * m.page_size > hog.vmas[-1].end:
            break
        hog.munmap(a + i * m.page_size, m.page_size)
    assert m.free_pages(0) >= 512
    assert not m.buddy.alloc(0, 9, 1).size
    p = m.spawn()
    b = p.mmap(2 << 20, node=0, folio_size="2MiB", populate=False)
    data = pattern(2 << 20, seed=3)
    p.write(b, data)
    assert p.read(b, 2 << 20) == data
    assert all(m.mem_map.order[p.pfn_of(b + i * m.page_size)] == 0 for i in range(0, 512, 37))
    assert {p.node_of(b + i * m.page_size) for i in range(0, 512, 37)} == {0}


def test_large_folio_faults_on_first_touch(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", populate=False, node=1)
    free1 = m.free_pages(1)
    raises_errno(errno.ENOENT, p.pfn_of, a)
    p.write(a + MiB + 3, b"abc")                     # touching any byte faults the whole folio
    assert m.free_pages(1) == free1 - 512
    head = p.pfn_of(a)
    assert head % 512 == 0 and p.pfn_of(a + MiB) == head + 256
    data = p.read(a, 2 * MiB)
    assert data[MiB + 3:MiB + 6] == b"abc"
    assert data.count(0) == 2 * MiB - 3


def test_populate_false_faults_on_first_touch(machine):
    m = machine
    p = m.spawn()
    v0 = m.vmstat
    a = p.mmap(8 * PS, populate=False)
    assert m.vmstat == v0
    for i in range(8):
        raises_errno(errno.ENOENT, p.pfn_of, a + i * PS)
        raises_errno(errno.ENOENT, p.node_of, a + i * PS)
    p.write(a + 3 * PS - 1, b"ab")                   # touches pages 2 and 3
    assert m.vmstat["pgfault"] - v0["pgfault"] == 2
    assert m.vmstat["nr_free_pages"] == v0["nr_free_pages"] - 2
    for i in (2, 3):
        assert p.pfn_of(a + i * PS) != m.zero_pfn
    raises_errno(errno.ENOENT, p.pfn_of, a)
    raises_errno(errno.ENOENT, p.pfn_of, a + 4 * PS)


# ----------------------------------------------------------------------------- zero page
def test_zero_page_for_reads_of_private_memory(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, node=1, populate=False)
    free = m.free_pages()
    assert p.read(a, 4 * PS) == bytes(4 * PS)
    assert m.free_pages() == free                     # reads allocate nothing
    for i in range(4):
        assert p.pfn_of(a + i * PS) == m.zero_pfn
        assert p.node_of(a + i * PS) == m.node_of_pfn(m.zero_pfn)
    p.write(a + PS + 10, b"data")                     # COW off the zero page, on the VMA's node
    assert p.pfn_of(a + PS) != m.zero_pfn
    assert p.node_of(a + PS) == 1
    assert m.free_pages() == free - 1
    assert p.read(a, 4 * PS) == bytes(PS + 10) + b"data" + bytes(3 * PS - 14)
    assert p.pfn_of(a) == m.zero_pfn
    assert not m.mem[m.zero_pfn * PS:(m.zero_pfn + 1) * PS].any()   # the zero page stays zero


def test_shared_memory_never_maps_the_zero_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, shared=True, populate=False, node=1)
    assert p.read(a, PS) == bytes(PS)
    pfn = p.pfn_of(a)
    assert pfn != m.zero_pfn and m.node_of_pfn(pfn) == 1
    assert m.mem_map.flags[pfn] & PG_swapbacked
    raises_errno(errno.ENOENT, p.pfn_of, a + PS)


def test_fresh_memory_never_leaks_old_contents(machine):
    """Frames freed with data in them are zeroed before anyone else sees them."""
    m = machine
    junk = b"\xa5" * (64 * KiB)
    p = m.spawn()
    for node in (0, 1):
        for fs in (None, "64KiB", "2MiB"):
            a = p.mmap(4 * MiB, node=node, folio_size=fs)
            for off in range(0, 4 * MiB, 64 * KiB):
                p.write(a + off, junk)
    p.exit()
    q = m.spawn()
    # populate, first-touch writes of a single byte, COW from the zero page, pins
    a = q.mmap(4 * MiB, node=0)
    assert q.read(a, 4 * MiB).count(0) == 4 * MiB
    b = q.mmap(4 * MiB, node=1, folio_size="2MiB", populate=False)
    for off in range(0, 4 * MiB, 256 * KiB):
        q.write(b + off + 7, b"\x01")
    data = q.read(b, 4 * MiB)
    assert data.count(0) == 4 * MiB - 16
    c = q.mmap(16 * PS, node=1, populate=False)
    q.read(c, 16 * PS)                               # zero page first
    q.write(c + 5, b"\x02")                          # then COW
    assert q.read(c, 16 * PS) == bytes(5) + b"\x02" + bytes(16 * PS - 6)
    d = q.mmap(16 * PS, node=0, populate=False, shared=True)
    q.pin(d, 16 * PS).release()
    assert q.read(d, 16 * PS) == bytes(16 * PS)
    e = q.mmap(32 * PS, node=1, populate=False, folio_size="64KiB")
    q.write(e + 64 * KiB - 1, b"\x03\x04")           # straddles two 64 KiB folios
    assert q.read(e, 32 * PS) == bytes(64 * KiB - 1) + b"\x03\x04" + bytes(64 * KiB - 1)


# ----------------------------------------------------------------------------- munmap
def test_munmap_all(machine):
    m = machine
    p = m.spawn()
    free = m.free_pages()
    v0 = m.vmstat
    a = p.mmap(16 * PS)
    b = p.mmap(4 * MiB, folio_size="2MiB", node=1)
    p.munmap(a, 16 * PS)
    p.munmap(b, 4 * MiB)
    assert p.vmas == []
    assert m.free_pages() == free
    assert m.vmstat["pgfree"] - v0["pgfree"] == 16 + 1024
    raises_errno(errno.EFAULT, p.read, a, 1)
    raises_errno(errno.EFAULT, p.read, b, 1)


def test_munmap_middle_splits_the_vma(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(8 * PS)
    data = pattern(8 * PS)
    p.write(a, data)
    free = m.free_pages()
    p.munmap(a + 2 * PS, 3 * PS)
    assert m.free_pages() == free + 3
    assert [(v.start, v.end) for v in p.vmas] == [(a, a + 2 * PS), (a + 5 * PS, a + 8 * PS)]
    assert p.read(a, 2 * PS) == data[:2 * PS]
    assert p.read(a + 5 * PS, 3 * PS) == data[5 * PS:]
    raises_errno(errno.EFAULT, p.read, a + 2 * PS, 1)
    raises_errno(errno.EFAULT, p.read, a + PS, 2 * PS)      # runs into the hole
    raises_errno(errno.EFAULT, p.write, a + 5 * PS - 1, b"xx")
    assert p.read(a + 5 * PS, 1) == data[5 * PS:5 * PS + 1]
    p.munmap(a + 2 * PS, PS)                                # a hole again: fine, nothing happens
    assert m.free_pages() == free + 3
    # the rest, across the hole, in one call
    p.munmap(a, 8 * PS)
    assert p.vmas == [] and m.free_pages() == free + 8


def test_munmap_range_spanning_mappings_and_gaps(machine):
    m = machine
    p = m.spawn()
    free = m.free_pages()
    a = p.mmap(4 * PS)
    b = p.mmap(4 * PS, node=1)
    c = p.mmap(4 * PS)
    p.write(c, b"keep")
    p.munmap(a + PS, (b + 4 * PS) - (a + PS))              # tail of a, the gap, all of b
    assert [(v.start, v.end) for v in p.vmas] == [(a, a + PS), (c, c + 4 * PS)]
    assert m.free_pages() == free - 5
    assert p.read(c, 4) == b"keep"
    p.munmap(0, 1 << 46)                                    # everything
    assert p.vmas == [] and m.free_pages() == free


def test_munmap_of_untouched_memory_frees_nothing(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(8 * PS, populate=False)
    p.read(a, PS)                                           # zero page mapped
    free, v = m.free_pages(), m.vmstat
    p.munmap(a, 8 * PS)
    assert m.free_pages() == free
    assert m.vmstat["pgfree"] == v["pgfree"]
    assert m.mem_map.flags[m.zero_pfn] and not m.buddy.is_free(m.zero_pfn)


@pytest.mark.parametrize("off_pages,npages", [(0, 1), (511, 1), (100, 50), (0, 256), (256, 256),
                                              (1, 510)])
def test_munmap_part_of_a_large_folio_defers_its_split(machine, off_pages, npages):
    """Linux 6.12: munmap of part of an anonymous THP keeps the folio whole and queues it
    for a deferred split (its unmapped pages stay allocated); the next migration of the
    folio splits it: every page counts as migrated (the unmapped ones were "freed from
    under us"), the THP as failed and split, and the unmapped pages go back."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    data = pattern(2 * MiB, seed=off_pages)
    p.write(a, data)
    head = p.pfn_of(a)
    free = m.free_pages(1)
    v = m.vmstat
    p.munmap(a + off_pages * PS, npages * PS)
    assert m.free_pages(1) == free                          # nothing freed yet
    assert m.vmstat["thp_split_page"] == v["thp_split_page"]
    assert m.vmstat["thp_deferred_split_page"] == v["thp_deferred_split_page"] + 1
    kept = [i for i in range(512) if not off_pages <= i < off_pages + npages]
    mm = m.mem_map
    assert mm.order[head] == 9 and mm.flags[head] & PG_partially_mapped
    assert mm.refcount[head] == len(kept)
    for i in kept[:3] + kept[-3:]:
        assert p.pfn_of(a + i * PS) == head + i and mm.head[head + i] == head
    for lo in (0, off_pages + npages):
        hi = off_pages if lo == 0 else 512
        if hi > lo:
            assert p.read(a + lo * PS, (hi - lo) * PS) == data[lo * PS:hi * PS]
    st = mig(m)
    r = p.move_pages(0, [a + kept[0] * PS], [0])
    assert r.ret == 0 and r.status == [0]
    mig_delta(st, m, pgmigrate_success=512, thp_migration_fail=1, thp_migration_split=1)
    assert m.vmstat["thp_split_page"] == v["thp_split_page"] + 1
    assert m.free_pages(1) == free + 512                    # moved away or freed
    for i in kept[:3] + kept[-3:]:
        pfn = p.pfn_of(a + i * PS)
        assert mm.order[pfn] == 0 and mm.head[pfn] == pfn and p.node_of(a + i * PS) == 0
    for lo in (0, off_pages + npages):
        hi = off_pages if lo == 0 else 512
        if hi > lo:
            assert p.read(a + lo * PS, (hi - lo) * PS) == data[lo * PS:hi * PS]
    check_machine(m)
    p.munmap(a, 2 * MiB)
    assert m.free_pages(1) == free + 512
    assert m.free_pages(0) == m.frames_per_node - 1          # the zero page
    assert m.buddy.free_blocks(1)[9].size == m.frames_per_node // 512   # merged back to 2 MiB


def test_split_maps_zero_filled_pages_to_the_zero_page(machine):
    """6.12's __split_huge_page remaps every mapped page of an anonymous folio that holds
    only zeros to the shared zero page (RMP_USE_SHARED_ZEROPAGE): after the migration that
    splits a partly unmapped THP, its never-written pages read as the zero page (-EFAULT
    in move_pages) and hold no frame; the written ones moved."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    p.write(a, b"\x07" * (2 * PS))                          # pages 0 and 1 hold data
    p.write(a + 300 * PS, b"\x00" * PS)                     # written, but zeros: remapped too
    p.munmap(a + 256 * PS, 64 * PS)
    free0 = m.free_pages(0)
    st = mig(m)
    r = p.move_pages(0, [a + 256 * PS, a], [1, 1])
    assert r.ret == 0 and r.status == [-EFAULT, 1]
    mig_delta(st, m, pgmigrate_success=512, thp_migration_fail=1, thp_migration_split=1)
    q = p.move_pages(0, [a, a + PS, a + 2 * PS, a + 300 * PS, a + 511 * PS])
    assert q.status == [1, 1, -EFAULT, -EFAULT, -EFAULT]
    assert m.free_pages(0) == free0 + 512 and m.free_pages(1) == m.frames_per_node - 2
    assert p.read(a, 3 * PS) == b"\x07" * (2 * PS) + bytes(PS)
    assert p.read(a + 320 * PS, 192 * PS) == bytes(192 * PS)
    p.write(a + 400 * PS, b"w")                              # a write fault copies the zero page
    assert p.node_of(a + 400 * PS) == 0 and p.read(a + 400 * PS, 2) == b"w\x00"
    check_machine(m)


def test_cow_of_a_shared_thp_page_does_not_queue_a_split(machine):
    """A child's write to one page of a THP it shares with its parent maps a copy in the
    child; the parent still maps every page, so the folio is not partially mapped."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    p.write(a, b"x" * PS)
    c = p.fork()
    v = m.vmstat
    c.write(a + 5 * PS, b"y")
    head = p.pfn_of(a)
    assert not m.mem_map.flags[head] & PG_partially_mapped
    assert m.vmstat["thp_deferred_split_page"] == v["thp_deferred_split_page"]
    p.exit()                                                 # now page 5 is mapped by no one
    assert m.mem_map.flags[head] & PG_partially_mapped
    assert m.mem_map.order[head] == 9


def test_munmap_of_a_whole_large_folio_does_not_split(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, folio_size="2MiB")
    v = m.vmstat
    p.munmap(a + 2 * MiB, 2 * MiB)
    assert m.vmstat["thp_split_page"] == v["thp_split_page"]
    assert m.mem_map.order[p.pfn_of(a)] == 9


# ----------------------------------------------------------------------------- read / write
def test_read_write_across_boundaries(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(16 * PS, populate=False)
    b = p.mmap(4 * 64 * KiB, folio_size="64KiB", node=1)
    c = p.mmap(16 * PS, shared=True)
    for base, size in ((a, 16 * PS), (b, 256 * KiB), (c, 16 * PS)):
        blob = pattern(size, seed=size)
        for off, n in ((0, 1), (PS - 3, 7), (64 * KiB - 5, 10), (3, 3 * PS), (size - 9, 9),
                       (0, size)):
            if off + n > size:
                continue
            chunk = blob[off:off + n]
            p.write(base + off, chunk)
            assert p.read(base + off, n) == chunk
        p.write(base, blob)
        assert p.read(base, size) == blob
        # numpy arrays and memoryviews are bytes-like too
        arr = np.arange(100, dtype=np.uint16)
        p.write(base + 1, arr)
        assert p.read(base + 1, 200) == arr.tobytes()
        p.write(base + 1, memoryview(b"mv"))
        assert p.read(base + 1, 2) == b"mv"
        assert p.read(base, 0) == b""
        p.write(base, b"")


def test_write_across_the_guard_gap_is_efault_and_writes_nothing(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS)
    b = p.mmap(2 * PS)
    assert b > a + 2 * PS                                  # a guard gap separates mappings
    before = p.read(a, 2 * PS), p.read(b, 2 * PS)
    free = m.free_pages()
    raises_errno(errno.EFAULT, p.write, a + 2 * PS - 4, b"x" * (b - a))
    raises_errno(errno.EFAULT, p.write, a + PS, b"y" * (PS + 1))
    raises_errno(errno.EFAULT, p.read, a + 2 * PS - 1, 2)
    assert (p.read(a, 2 * PS), p.read(b, 2 * PS)) == before
    assert m.free_pages() == free


def test_write_past_the_end_of_an_unpopulated_mapping_faults_nothing(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, populate=False)
    v = m.vmstat
    raises_errno(errno.EFAULT, p.write, a, b"z" * (4 * PS + 1))
    raises_errno(errno.EFAULT, p.read, a, 4 * PS + 1)
    assert m.vmstat == v
    for i in range(4):
        raises_errno(errno.ENOENT, p.pfn_of, a + i * PS)


# ----------------------------------------------------------------------------- shared memory / exit
def test_shared_mapping_shares_data_across_fork(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, shared=True, node=1, populate=False)
    p.write(a + 100, b"from parent")
    c = p.fork()
    assert c.read(a + 100, 11) == b"from parent"
    assert c.pfn_of(a) == p.pfn_of(a)
    c.write(a + 2 * PS, b"from child")                    # page untouched before the fork
    assert p.read(a + 2 * PS, 10) == b"from child"
    assert c.pfn_of(a + 2 * PS) == p.pfn_of(a + 2 * PS)
    p.write(a + 100, b"FROM PARENT")
    assert c.read(a + 100, 11) == b"FROM PARENT"
    free = m.free_pages()
    p.exit()
    assert m.free_pages() == free                          # the child still maps it
    assert c.read(a + 100, 11) == b"FROM PARENT"
    c.exit()
    assert m.free_pages() == free + 2


def test_shared_mapping_partly_unmapped_keeps_its_pages(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, shared=True)
    p.write(a, b"1" * 4 * PS)
    free = m.free_pages()
    p.munmap(a, PS)                       # the shmem object keeps its pages while mapped
    assert p.read(a + PS, 3 * PS) == b"1" * 3 * PS
    p.munmap(a + PS, 3 * PS)              # last mapping gone: the object is truncated
    assert m.free_pages() == free + 4


def test_exit_frees_everything(machine):
    m = machine
    start = m.free_pages()
    v0 = m.vmstat
    p = m.spawn()
    p.mmap(MiB)
    p.mmap(4 * MiB, folio_size="2MiB", node=1)
    s = p.mmap(64 * KiB, shared=True, node=1)
    u = p.mmap(MiB, populate=False)
    p.write(u + 12345, b"q" * 10000)
    p.read(u + MiB // 2, 100)
    c = p.fork()
    c.write(u + 12345, b"child")
    c.write(s, b"shared")
    pin = p.pin(u, 3 * PS)
    g = c.fork()
    assert m.free_pages() < start
    p.exit()
    p.exit()                               # idempotent
    assert not p.alive and p.pid not in m.processes
    raises_errno(errno.ESRCH, p.read, u, 1)
    c.exit()
    assert g.read(s, 6) == b"shared"
    g.exit()
    pin.release()
    assert m.free_pages() == start
    assert m.vmstat["pgalloc"] - v0["pgalloc"] == m.vmstat["pgfree"] - v0["pgfree"]
    assert not m.processes
    assert not m.objects                   # every anon_vma/shmem object is gone


# ----------------------------------------------------------------------------- shadow model
LAYOUT = [  # (length, node, shared, folio_size, populate)
    (8 * PS + 123, 0, False, None, False),
    (4 * 64 * KiB, 1, False, "64KiB", False),
    (2 * MiB + 3 * PS, 1, False, "2MiB", False),
    (6 * PS, 0, True, None, False),
    (128 * KiB, 1, True, "64KiB", True),
    (5 * PS, 0, False, "8KiB", True),
]


@st.composite
def access_ops(draw):
    n = draw(st.integers(1, 25))
    out = []
    for _ in range(n):
        kind = draw(st.sampled_from(["write", "write", "read", "fill", "oob", "fork"]))
        vi = draw(st.integers(0, len(LAYOUT) - 1))
        out.append((kind, vi, draw(st.floats(0, 1)), draw(st.integers(1, 70000)),
                    draw(st.integers(0, 255))))
    return out


@given(access_ops())
def test_read_write_against_shadow(ops):
    with ce.Machine(nodes=2, node_size="8MiB") as m:
        p = m.spawn()
        maps = []
        for length, node, shared, fs, pop in LAYOUT:
            a = p.mmap(length, node=node, shared=shared, folio_size=fs, populate=pop)
            size = -(-length // PS) * PS
            maps.append((a, size, bytearray(size)))
        children = []
        for kind, vi, frac, n, byte in ops:
            a, size, shadow = maps[vi]
            off = int(frac * (size - 1))
            n = min(n, size - off)
            if kind == "write":
                data = bytes((byte + i) & 0xFF for i in range(min(n, 300))) * (n // 300 + 1)
                data = data[:n]
                p.write(a + off, data)
                shadow[off:off + n] = data
            elif kind == "fill":
                p.write(a + off, bytes([byte]) * n)
                shadow[off:off + n] = bytes([byte]) * n
            elif kind == "read":
                assert p.read(a + off, n) == shadow[off:off + n]
            elif kind == "oob":
                # runs past the end of the mapping: nothing is written
                with pytest.raises(OSError) as ei:
                    p.write(a + size - 1 - (off % 64), b"\xee" * (66 + (off % 64)))
                assert ei.value.errno == errno.EFAULT
            else:
                # a forked child sees the same data; writes in it never leak back to
                # private memory (shared memory they do)
                c = p.fork()
                assert c.read(a, size) == shadow
                c.write(a + off, b"\x5a" * min(n, 64))
                if LAYOUT[vi][2]:
                    shadow[off:off + min(n, 64)] = b"\x5a" * min(n, 64)
                children.append(c)
        for (a, size, shadow) in maps:
            assert p.read(a, size) == shadow
        for c in children:
            c.exit()
        for (a, size, shadow) in maps:
            assert p.read(a, size) == shadow
        p.exit()
        assert m.free_pages() == m.total_frames - 1


def test_migration_of_a_thp_mapped_whole_and_in_part_queues_its_split(machine):
    """Linux 6.12: try_to_migrate removes the parent's whole mapping of a THP while the
    child still maps part of it, so the folio is queued for a deferred split on the way,
    and migrate_folio_move requeues the destination. The next migration splits it, and
    its zero-filled pages become the zero page in both processes (a recorded kernel run)."""
    m = machine
    p = m.spawn(cap_sys_nice=True)
    a = p.mmap(2 * MiB, folio_size="2MiB")
    p.write(a + 511 * PS, b"z")
    c = p.fork()
    c.munmap(a + PS, 16 * PS)                    # the child maps the folio only in part
    head = p.pfn_of(a)
    assert not m.mem_map.flags[head] & PG_partially_mapped   # the parent still maps it all
    st = mig(m)
    r = c.move_pages(0, [a + 256 * PS], [1], flags=ce.MPOL_MF_MOVE_ALL)
    assert r.ret == 0 and r.status == [1]
    mig_delta(st, m, pgmigrate_success=512, thp_migration_success=1)   # moved whole
    dst = p.pfn_of(a)
    assert m.mem_map.order[dst] == 9 and m.mem_map.flags[dst] & PG_partially_mapped
    r = p.move_pages(0, [a], [0], flags=ce.MPOL_MF_MOVE_ALL)
    assert r.ret == 0 and r.status == [0]
    mig_delta(st, m, pgmigrate_success=1024, thp_migration_success=1, thp_migration_fail=1,
              thp_migration_split=1)
    for proc in (p, c):
        q = proc.move_pages(0, [a, a + 300 * PS, a + 511 * PS])
        assert q.status[:2] == [-EFAULT, -EFAULT] and q.status[2] == 0
        assert proc.read(a + 511 * PS, 1) == b"z"
    check_machine(m)
