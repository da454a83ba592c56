"""fork, copy-on-write and pins (get_user_pages-like extra references)."""
import errno

import pytest
from copyengine.mm.pageflags import PG_partially_mapped
from helpers import raises_errno

PS = 4096
KiB = 1 << 10
MiB = 1 << 20


# ----------------------------------------------------------------------------- fork / COW
def test_private_pages_shared_after_fork(machine):
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(4 * PS, node=1)
    p.write(a, b"parent data" * 1000)
    free = m.free_pages()
    c = p.fork()
    assert c.pid != p.pid and c.uid == p.uid and c.mems_allowed == p.mems_allowed
    assert m.free_pages() == free                          # nothing copied
    for i in range(4):
        pfn = p.pfn_of(a + i * PS)
        assert c.pfn_of(a + i * PS) == pfn
        assert mm.mapcount[pfn] == 2
        assert mm.refcount[pfn] == 2
    assert c.read(a, 11000) == b"parent data" * 1000
    assert [(v.start, v.end, v.node) for v in c.vmas] == [(v.start, v.end, v.node) for v in p.vmas]


@pytest.mark.parametrize("writer", ["child", "parent"])
def test_cow_separates_on_write(machine, writer):
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(3 * PS, node=1)
    p.write(a, b"A" * 3 * PS)
    c = p.fork()
    shared = p.pfn_of(a + PS)
    w, other = (c, p) if writer == "child" else (p, c)
    free, v = m.free_pages(1), m.vmstat
    w.write(a + PS + 10, b"written")
    assert m.free_pages(1) == free - 1                     # exactly one page copied
    assert m.vmstat["cow_fault"] == v["cow_fault"] + 1
    assert w.pfn_of(a + PS) != shared and other.pfn_of(a + PS) == shared
    assert w.node_of(a + PS) == 1
    assert mm.mapcount[shared] == 1 and mm.refcount[shared] == 1
    assert mm.mapcount[w.pfn_of(a + PS)] == 1
    # untouched neighbours are still shared
    assert w.pfn_of(a) == other.pfn_of(a) and mm.mapcount[w.pfn_of(a)] == 2
    # contents are independent
    assert w.read(a + PS, PS) == b"A" * 10 + b"written" + b"A" * (PS - 17)
    assert other.read(a + PS, PS) == b"A" * PS
    other.write(a + PS, b"other")                          # the last mapper reuses its page
    assert other.pfn_of(a + PS) == shared
    assert m.free_pages(1) == free - 1
    assert w.read(a + PS, 5) == b"AAAAA"
    assert other.read(a + PS, 7) == b"otherAA"


def test_cow_chain_of_three(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS)
    p.write(a, b"0")
    c1 = p.fork()
    c2 = c1.fork()
    pfn = p.pfn_of(a)
    assert c2.pfn_of(a) == pfn and m.mem_map.mapcount[pfn] == 3
    c1.write(a, b"1")
    c2.write(a, b"2")
    assert (p.read(a, 1), c1.read(a, 1), c2.read(a, 1)) == (b"0", b"1", b"2")
    assert p.pfn_of(a) == pfn                               # the original never moved
    assert len({p.pfn_of(a), c1.pfn_of(a), c2.pfn_of(a)}) == 3
    free = m.free_pages()
    for q in (p, c1, c2):
        q.exit()
    assert m.free_pages() == free + 3


def test_fork_of_the_zero_page(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, populate=False)
    p.read(a, 2 * PS)
    c = p.fork()
    # Only the zero page was ever mapped: no anon_vma, so fork copied no PTEs
    # (vma_needs_copy); the child maps the zero page on its own first read.
    raises_errno(errno.ENOENT, c.pfn_of, a)
    c.read(a, 1)
    assert c.pfn_of(a) == m.zero_pfn
    c.write(a + 1, b"c")
    assert c.read(a, 3) == b"\0c\0" and p.read(a, 3) == b"\0\0\0"
    assert p.pfn_of(a) == m.zero_pfn and p.pfn_of(a + PS) == m.zero_pfn
    raises_errno(errno.ENOENT, c.pfn_of, a + PS)


def test_fork_after_an_anonymous_page_copies_zero_page_ptes(machine):
    """Once the VMA has an anon_vma (one page written), fork copies every PTE, the
    zero-page ones too."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, populate=False)
    p.read(a, PS)
    p.write(a + PS, b"x")
    c = p.fork()
    assert c.pfn_of(a) == m.zero_pfn and c.pfn_of(a + PS) == p.pfn_of(a + PS)


def test_fork_of_untouched_memory(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS, populate=False)
    c = p.fork()
    raises_errno(errno.ENOENT, c.pfn_of, a)
    c.write(a, b"x")
    raises_errno(errno.ENOENT, p.pfn_of, a)
    assert p.read(a, 1) == b"\0"


def test_cow_of_a_large_folio_copies_one_page(machine):
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    p.write(a, bytes(range(256)) * (2 * MiB // 256))
    head = p.pfn_of(a)
    c = p.fork()
    free = m.free_pages(1)
    c.write(a + 5 * PS, b"child")
    assert m.free_pages(1) == free - 1
    assert c.pfn_of(a + 5 * PS) != head + 5
    assert mm.order[c.pfn_of(a + 5 * PS)] == 0
    assert c.pfn_of(a + 6 * PS) == head + 6 == p.pfn_of(a + 6 * PS)
    assert p.read(a + 5 * PS, 5) == bytes(range(5))
    assert c.read(a + 5 * PS, 6) == b"child\x05"
    assert c.read(a, 5 * PS) == p.read(a, 5 * PS)
    c.exit()
    assert m.free_pages(1) == free                           # child's copy freed, folio kept
    assert mm.order[head] == 9 and mm.refcount[head] == 512
    p.exit()
    assert m.free_pages(1) == free + 512


def test_shared_mapping_is_not_cow(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS, shared=True)
    c = p.fork()
    free = m.free_pages()
    c.write(a, b"both")
    assert p.read(a, 4) == b"both"
    assert m.free_pages() == free
    assert m.vmstat["cow_fault"] == 0
    assert m.mem_map.mapcount[p.pfn_of(a)] == 2


# ----------------------------------------------------------------------------- pins
def test_pin_takes_and_drops_references(machine):
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(4 * PS)
    pfn = p.pfn_of(a + PS)
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (1, 0)
    pin = p.pin(a + PS + 5, 10)                           # one page
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (2, 1)
    assert mm.pincount[p.pfn_of(a)] == 0 and mm.pincount[p.pfn_of(a + 2 * PS)] == 0
    pin2 = p.pin(a, 2 * PS)                               # overlapping pin: two pages
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (3, 2)
    assert (mm.refcount[p.pfn_of(a)], mm.pincount[p.pfn_of(a)]) == (2, 1)
    pin.release()
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (2, 1)
    with pytest.raises(ValueError):
        pin.release()
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (2, 1)
    with pin2:
        pass
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (1, 0)
    with pytest.raises(ValueError):
        pin2.release()
    assert (mm.refcount[pfn], mm.pincount[pfn]) == (1, 0)


def test_pin_context_manager(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS)
    with p.pin(a, PS) as pin:
        assert m.mem_map.pincount[p.pfn_of(a)] == 1
        assert not pin.released
    assert pin.released and m.mem_map.pincount[p.pfn_of(a)] == 0


def test_pin_faults_in_untouched_and_zero_pages(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, populate=False, node=1)
    p.read(a, PS)                                         # page 0: the zero page
    free = m.free_pages(1)
    pin = p.pin(a, 2 * PS)
    assert m.free_pages(1) == free - 2
    assert p.pfn_of(a) != m.zero_pfn and p.node_of(a) == 1
    assert m.mem_map.pincount[p.pfn_of(a + PS)] == 1
    assert p.read(a, 2 * PS) == bytes(2 * PS)
    pin.release()
    raises_errno(errno.ENOENT, p.pfn_of, a + 2 * PS)


def test_pin_breaks_cow(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS)
    p.write(a, b"orig")
    c = p.fork()
    shared = p.pfn_of(a)
    pin = p.pin(a, PS)                                    # FOLL_WRITE: the pinner gets its own copy
    assert p.pfn_of(a) != shared and c.pfn_of(a) == shared
    assert p.read(a, 4) == b"orig" == c.read(a, 4)
    p.write(a, b"PINN")
    assert c.read(a, 4) == b"orig"
    pin.release()


def test_pinned_private_pages_are_copied_at_fork(machine):
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(4 * PS, node=1)
    p.write(a, b"P" * 4 * PS)
    pin = p.pin(a + PS, 2 * PS)                            # pages 1 and 2 pinned
    free = m.free_pages(1)
    c = p.fork()
    assert m.free_pages(1) == free - 2                    # copied at once
    for i in (1, 2):
        assert c.pfn_of(a + i * PS) != p.pfn_of(a + i * PS)
        assert c.node_of(a + i * PS) == 1
        assert mm.mapcount[c.pfn_of(a + i * PS)] == 1
        assert mm.mapcount[p.pfn_of(a + i * PS)] == 1
    for i in (0, 3):                                      # unpinned: COW-shared
        assert c.pfn_of(a + i * PS) == p.pfn_of(a + i * PS)
        assert mm.mapcount[p.pfn_of(a + i * PS)] == 2
    assert c.read(a, 4 * PS) == b"P" * 4 * PS
    # the child's copies are writable and separate, the DMA target stays the parent's page
    v = m.vmstat
    c.write(a + PS, b"child")
    assert m.vmstat["cow_fault"] == v["cow_fault"]
    p.write(a + 2 * PS, b"parent")
    assert m.vmstat["cow_fault"] == v["cow_fault"]
    assert p.read(a + PS, 5) == b"PPPPP" and c.read(a + 2 * PS, 6) == b"PPPPPP"
    pin.release()
    c.exit()
    p.exit()
    assert m.free_pages() == m.total_frames - 1


def test_pinned_memory_outlives_munmap_until_release(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS)
    free = m.free_pages()
    pin = p.pin(a, 2 * PS)
    p.munmap(a, 4 * PS)
    assert m.free_pages() == free + 2                     # the pinned pages stay allocated
    pin.release()
    assert m.free_pages() == free + 4


def test_pin_outlives_exit(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, shared=True)
    start = m.free_pages() + 4
    pin = p.pin(a, 4 * PS)
    p.exit()
    assert m.free_pages() == start - 4
    pin.release()
    assert m.free_pages() == start


def test_pinned_large_folio_stays_whole_after_partial_munmap(machine):
    """6.12 keeps a partly unmapped anonymous folio whole (deferred split): neither the
    munmap nor the unpin splits it; its memory goes back when the rest is unmapped."""
    m = machine
    mm = m.mem_map
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    head = p.pfn_of(a)
    free = m.free_pages(1)
    pin = p.pin(a, 2 * MiB)
    p.munmap(a, MiB)                                      # half unmapped while pinned
    assert mm.order[head] == 9 and m.free_pages(1) == free
    pin.release()
    assert mm.order[head] == 9 and m.free_pages(1) == free
    assert mm.head[p.pfn_of(a + MiB)] == head
    p.munmap(a + MiB, MiB)
    assert m.free_pages(1) == free + 512


def test_pin_bad_input(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS)
    raises_errno(errno.EINVAL, p.pin, a, 0)
    raises_errno(errno.EINVAL, p.pin, a, -1)
    raises_errno(errno.EFAULT, p.pin, a + PS, 2 * PS)
    raises_errno(errno.EFAULT, p.pin, a - PS, PS)
    raises_errno(errno.EFAULT, p.pin, -PS, PS)
    with pytest.raises(TypeError):
        p.pin(a, "1")
    assert m.mem_map.pincount[p.pfn_of(a)] == 0
    p.exit()
    raises_errno(errno.ESRCH, p.pin, a, PS)


def test_write_fault_reuses_a_pmd_mapped_thp_whole(machine):
    """6.12's do_huge_pmd_wp_page: once the child that shared a THP is gone, the first
    write fault reuses the whole PMD (all 512 pages writable): a long-term pin taken then
    does not make later writes copy (recorded kernel run s61_82)."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    p.write(a, b"t")
    head = p.pfn_of(a)
    c = p.fork()
    c.exit()
    pin = p.pin(a + 256 * PS, 16 * PS)          # FOLL_WRITE: the write fault reuses the PMD
    p.write(a + PS, b"u" * (64 * PS))
    assert all(p.pfn_of(a + i * PS) == head + i for i in range(512))
    pin.release()


def test_write_fault_copies_a_page_of_a_pte_mapped_large_folio(machine):
    """6.12's wp_can_reuse_anon_folio never reuses a page of a large folio mapped by PTEs
    (here: once shared by fork, then split by a partial munmap): the write copies that
    page, and the folio is left mapped in part (queued for a deferred split)."""
    m = machine
    p = m.spawn()
    a = p.mmap(2 * MiB, folio_size="2MiB", node=1)
    p.write(a, b"t")
    head = p.pfn_of(a)
    c = p.fork()
    c.exit()
    p.munmap(a + 511 * PS, PS)                  # the PMD is split: PTE-mapped from now on
    p.write(a + 5 * PS, b"u")
    assert p.pfn_of(a + 5 * PS) != head + 5 and p.node_of(a + 5 * PS) == 1
    assert p.pfn_of(a + 6 * PS) == head + 6
    assert m.mem_map.flags[head] & PG_partially_mapped
    assert p.read(a + 5 * PS, 2) == b"u\x00" and p.read(a, 1) == b"t"
