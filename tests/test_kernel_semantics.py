"""Semantics matched to a real Linux 6.12 kernel (issue 13; shared/DESIGN.md "Semantic
details"): fork's vma_needs_copy, the huge zero page, shmem fault-around and the zap of a
split shmem PMD mapping."""
import errno

import numpy as np
from helpers import raises_errno

from copyengine.mm.process import MPOL_MF_MOVE
from copyengine.testing.invariants import check_machine

PS = 4096
MiB = 1 << 20


# ----------------------------------------------------------------------------- fork
def test_fork_copies_no_ptes_of_a_shared_mapping(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, shared=True)
    p.write(a, b"shared")
    c = p.fork()
    raises_errno(errno.ENOENT, c.node_of, a)
    assert c.move_pages(0, [a, a + PS]).status == [-errno.ENOENT, -errno.ENOENT]
    assert m.mem_map.mapcount[p.pfn_of(a)] == 1
    # mapped once: MPOL_MF_MOVE moves it (it would be -EACCES if the child mapped it)
    assert p.move_pages(0, [a], [1], MPOL_MF_MOVE).status == [1]
    assert c.read(a, 6) == b"shared" and c.node_of(a) == 1 and c.pfn_of(a) == p.pfn_of(a)
    assert p.move_pages(0, [a], [0], MPOL_MF_MOVE).status == [-errno.EACCES]
    check_machine(m)


def test_fork_child_write_to_shared_mapping_is_seen(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, shared=True, populate=False)
    c = p.fork()
    c.write(a + PS, b"child")
    assert p.read(a + PS, 5) == b"child" and p.pfn_of(a + PS) == c.pfn_of(a + PS)
    check_machine(m)


def test_fork_of_zero_page_only_mapping_then_parent_write(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, populate=False)
    assert p.read(a, 4 * PS) == bytes(4 * PS)
    c = p.fork()
    p.write(a, b"P")       # the parent's VMA gets an anon_vma only now
    raises_errno(errno.ENOENT, c.node_of, a)
    assert c.read(a, 1) == b"\0" and c.pfn_of(a) == m.zero_pfn
    g = c.fork()           # the child still has no anon_vma: no PTEs for the grandchild
    raises_errno(errno.ENOENT, g.node_of, a)
    check_machine(m)


def test_fork_after_munmap_split_keeps_anon_vma(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS)
    p.munmap(a + PS, PS)
    c = p.fork()
    assert c.pfn_of(a) == p.pfn_of(a) and c.pfn_of(a + 2 * PS) == p.pfn_of(a + 2 * PS)
    check_machine(m)


# ----------------------------------------------------------------------------- huge zero page
def test_read_fault_in_thp_range_maps_huge_zero_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", populate=False)
    free = m.free_pages()
    assert p.read(a + 5 * PS, 8) == bytes(8)
    assert m.free_pages() == free
    assert all(p.pfn_of(a + i * PS) == m.zero_pfn for i in (0, 1, 300, 511))
    st = p.move_pages(0, [a, a + 511 * PS], [1, 1])
    assert st.status == [-errno.EFAULT, -errno.EFAULT]
    # a later write gets a base page; the rest stays the zero page
    p.write(a + 7 * PS, b"w")
    assert p.pfn_of(a + 7 * PS) != m.zero_pfn
    assert m.mem_map.order[m.mem_map.head[p.pfn_of(a + 7 * PS)]] == 0
    assert p.pfn_of(a + 8 * PS) == m.zero_pfn
    # vmf_anon_prepare ran: fork copies the PTEs
    c = p.fork()
    assert c.pfn_of(a + 100 * PS) == m.zero_pfn
    check_machine(m)


def test_no_huge_zero_page_outside_a_whole_thp_range(machine):
    m = machine
    p = m.spawn()
    small = p.mmap(16 * PS, populate=False)
    p.read(small, 1)
    raises_errno(errno.ENOENT, p.node_of, small + PS)
    big = p.mmap(2 * MiB, folio_size="2MiB", populate=False)
    p.write(big, b"x")                    # a THP is mapped: no huge zero page over it
    p.read(big + PS, 1)
    assert p.pfn_of(big + PS) == p.pfn_of(big) + 1
    check_machine(m)


def test_huge_zero_page_needs_2mib_folios(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="64KiB", populate=False)
    p.read(a, 1)
    raises_errno(errno.ENOENT, p.node_of, a + PS)


# ----------------------------------------------------------------------------- fault-around
def test_shmem_read_fault_maps_cached_neighbours(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(64 * PS, shared=True, populate=False)
    c = p.fork()                                   # no PTEs in the child
    p.write(a, bytes(range(256)) * (40 * PS // 256))  # pages 0..39 in the page cache
    assert c.read(a + 20 * PS, 1) == bytes([0])
    # the 16-page window around page 20 (pages 16..31) is mapped, nothing else
    mapped = []
    for i in range(64):
        try:
            c.pfn_of(a + i * PS)
            mapped.append(i)
        except FileNotFoundError:
            pass
    assert mapped == list(range(16, 32))
    assert all(c.pfn_of(a + i * PS) == p.pfn_of(a + i * PS) for i in mapped)
    # a read of an uncached page maps cached neighbours only (40..47 are holes)
    c.read(a + 45 * PS, 1)
    mapped = [i for i in range(32, 64) if _present(c, a + i * PS)]
    assert mapped == [32, 33, 34, 35, 36, 37, 38, 39, 45]
    check_machine(m)


def test_fault_around_clamped_to_vma(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(32 * PS, shared=True)
    c = p.fork()
    c.munmap(a, 3 * PS)                  # the child's VMA starts at page 3
    c.read(a + 4 * PS, 1)
    # window starts at the VMA's start (page 3) and spans 16 pages: 3..18
    assert [i for i in range(3, 32) if _present(c, a + i * PS)] == list(range(3, 19))
    check_machine(m)


def test_write_fault_does_no_fault_around(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(16 * PS, shared=True)
    c = p.fork()
    c.write(a + 2 * PS, b"x")
    assert [i for i in range(16) if _present(c, a + i * PS)] == [2]


def _present(proc, addr):
    try:
        proc.pfn_of(addr)
        return True
    except FileNotFoundError:
        return False


# ----------------------------------------------------------------------------- shmem PMD split
def test_partial_munmap_of_shmem_pmd_zaps_the_rest(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, shared=True, folio_size="2MiB")
    p.write(a, b"keep")
    head = p.pfn_of(a)
    p.munmap(a + 100 * PS, PS)
    raises_errno(errno.ENOENT, p.node_of, a)
    raises_errno(errno.ENOENT, p.node_of, a + 200 * PS)
    assert m.mem_map.refcount[head] == 1        # only the page cache holds it now
    assert p.read(a, 4) == b"keep" and p.pfn_of(a) == head
    check_machine(m)


def test_aligned_munmap_of_shmem_keeps_other_pmds(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, shared=True, folio_size="2MiB")
    p.munmap(a + 2 * MiB, 2 * MiB)
    assert p.node_of(a + 5 * PS) == 0


def test_partial_munmap_of_private_thp_keeps_ptes(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB")
    p.munmap(a + 100 * PS, PS)
    assert p.node_of(a) == 0 and p.node_of(a + 200 * PS) == 0
    assert np.all([_present(p, a + i * PS) for i in (0, 99, 101, 511)])


def test_fault_on_cached_2mib_shmem_folio_maps_the_whole_pmd(machine):
    """do_set_pmd: the child's first touch of a 2 MiB shmem folio in the page cache maps
    all of it (read or write)."""
    m = machine
    p = m.spawn()
    a = p.mmap(4 * MiB, shared=True, folio_size="2MiB")
    c = p.fork()
    c.read(a + 5 * PS, 1)
    c.write(a + 2 * MiB + 7 * PS, b"w")
    for base in (a, a + 2 * MiB):
        assert all(c.pfn_of(base + i * PS) == p.pfn_of(base + i * PS) for i in (0, 200, 511))
    check_machine(m)
