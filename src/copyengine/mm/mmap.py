"""The address space's VMAs: mmap, munmap, and VMA insert/remove/find (mm/mmap.c and
mm/vma.c: do_mmap, do_vmi_munmap, vma_link, find_vma, find_vma_intersection), with
:class:`VmaRange`, the unit a page walk hands out. A mixin of :class:`~.process.Process`."""
from __future__ import annotations

import bisect
import errno
import numbers

import numpy as np

from ..errors import oserror
from .pmd import split_shmem_pmds
from .vma import AnonVma, Shmem, Vma

MMAP_BASE = 1 << 40
ADDRESS_LIMIT = 1 << 47


def _check_int(value, what):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    return int(value)


class VmaRange:
    """One VMA's share of an access or a page walk: pages [i0, i1) of ``vma`` (the
    public unit of :meth:`Process.span` / :meth:`Process.wait_for_migration`; ``plan`` is
    the fault path's scratch slot)."""
    __slots__ = ("vma", "i0", "i1", "plan")

    def __init__(self, vma, i0, i1):
        self.vma, self.i0, self.i1, self.plan = vma, i0, i1, None



class MmapOps:
    """mmap / munmap and the VMA tree of a :class:`~.process.Process` (mm/mmap.c, mm/vma.c)."""

    def _insert_vma(self, vma):
        i = bisect.bisect(self._starts, vma.start)
        self._starts.insert(i, vma.start)
        self.vmas.insert(i, vma)
        vma.obj.vmas.append(vma)

    def _remove_vma(self, vma):
        i = self.vmas.index(vma)
        del self.vmas[i], self._starts[i]
        vma.obj.vmas.remove(vma)

    def find_vma(self, addr: int):
        i = bisect.bisect(self._starts, addr) - 1
        if i >= 0 and addr < self.vmas[i].end:
            return self.vmas[i]
        return None

    def span(self, addr: int, length: int) -> list[VmaRange]:
        """The VMAs covering [addr, addr+length) without a hole, or EFAULT."""
        shift = self.machine.page_shift
        end = addr + length
        segs, cur = [], addr
        while cur < end:
            vma = self.find_vma(cur)
            if vma is None:
                raise oserror(errno.EFAULT, f"address {cur:#x} is not mapped in process {self.pid}")
            stop = min(end, vma.end)
            segs.append(VmaRange(vma, (cur - vma.start) >> shift, ((stop - 1 - vma.start) >> shift) + 1))
            cur = vma.end
        return segs

    def find_vmas(self, start: int, end: int) -> list[Vma]:
        """The VMAs overlapping [start, end), in address order (find_vma_intersection
        walked over a range, mm/mmap.c)."""
        i = max(bisect.bisect(self._starts, start) - 1, 0)
        out = []
        while i < len(self.vmas) and self.vmas[i].start < end:
            if self.vmas[i].end > start:
                out.append(self.vmas[i])
            i += 1
        return out

    def _all_segs(self):
        return [VmaRange(v, 0, v.npages) for v in self.vmas]

    # ------------------------------------------------------------------ mmap / munmap
    def mmap(self, length, node=0, shared=False, folio_size=None, populate=True) -> int:
        """Map anonymous memory bound to ``node``; returns its page-aligned address.

        ``folio_size`` (a power of two from the base page up to 2 MiB) aligns the mapping
        and makes faults allocate naturally aligned folios of that size. With ``populate``
        every page is faulted in for writing (MAP_POPULATE); ENOMEM unmaps it again.
        """
        m = self.machine
        length = _check_int(length, "length")
        node = _check_int(node, "node")
        if not isinstance(shared, bool):
            raise TypeError(f"shared must be a bool, not {type(shared).__name__}")
        if not isinstance(populate, bool):
            raise TypeError(f"populate must be a bool, not {type(populate).__name__}")
        if length <= 0:
            raise oserror(errno.EINVAL, f"mmap length must be positive, got {length}")
        if not 0 <= node < m.nodes:
            raise oserror(errno.EINVAL, f"node {node} does not exist (nodes 0..{m.nodes - 1})")
        if folio_size is None:
            fsize = m.page_size
        else:
            from ..units import parse_size
            try:
                fsize = parse_size(folio_size, "folio_size")
            except ValueError as e:
                raise oserror(errno.EINVAL, str(e)) from None
            if fsize & (fsize - 1) or fsize < m.page_size or fsize > (2 << 20):
                raise oserror(errno.EINVAL, f"folio_size must be a power of two from "
                                            f"{m.page_size} to 2MiB, got {fsize}")
        order = (fsize // m.page_size).bit_length() - 1
        length = -(-length // m.page_size) * m.page_size
        with m.lock:
            self.enter()
            if node not in self.mems_allowed:
                raise oserror(errno.EINVAL, f"node {node} is outside the process's cpuset")
            start = -(-self._next_addr // fsize) * fsize
            if start + length > ADDRESS_LIMIT:
                raise oserror(errno.ENOMEM, "address space exhausted")
            npages = length >> m.page_shift
            try:  # the page table of a mapping larger than this host can hold (issue 14)
                ptes = np.zeros(npages, np.uint64)
            except MemoryError:
                raise oserror(errno.ENOMEM, f"no host memory for the page table of {length} bytes") from None
            if shared:
                obj, pgoff = Shmem(npages), 0
            else:
                obj, pgoff = AnonVma(), start >> m.page_shift
            m.objects[obj.id] = obj
            vma = Vma(self, start, start + length, node, order, obj, pgoff, ptes)
            self._insert_vma(vma)
            self._next_addr = start + length + m.page_size  # a guard gap between mappings
            if populate:
                try:
                    self._access(start, length, write=True)
                except OSError:
                    self._unmap_range(start, start + length)
                    raise
            return start

    def munmap(self, addr, length) -> None:
        """Unmap [addr, addr+length): a part of a mapping or of a large folio too (an
        anonymous large folio left partly mapped is split). Holes are fine, as in Linux."""
        m = self.machine
        addr = _check_int(addr, "addr")
        length = _check_int(length, "length")
        if addr % m.page_size:
            raise oserror(errno.EINVAL, f"munmap address {addr:#x} is not page aligned")
        if length <= 0:
            raise oserror(errno.EINVAL, f"munmap length must be positive, got {length}")
        length = -(-length // m.page_size) * m.page_size
        if addr < 0 or addr + length > ADDRESS_LIMIT:
            raise oserror(errno.EINVAL, "munmap range outside the address space")
        with m.lock:
            self.enter()
            self._unmap_range(addr, addr + length)

    def _unmap_range(self, start, end):
        shift = self.machine.page_shift

        def resolve():
            return [VmaRange(v, (max(start, v.start) - v.start) >> shift, (min(end, v.end) - v.start) >> shift)
                    for v in self.find_vmas(start, end)]

        # zap_pte_range does not wait on a migration entry: it drops it, and the migration
        # then finds nothing to restore there (the destination is freed if unmapped)
        segs = resolve()
        released, orphans = [], []
        for s in segs:
            vma = s.vma
            pmds = split_shmem_pmds(self, vma, s.i0, s.i1)  # before the zap changes the PTEs
            released.append(self._zap(vma, s.i0, s.i1))
            for lo, hi in pmds:
                released.append(self._zap(vma, lo, hi))
            self._remove_vma(vma)
            for lo, hi in ((0, s.i0), (s.i1, vma.npages)):
                if hi > lo:
                    self._insert_vma(Vma(self, vma.start + (lo << shift), vma.start + (hi << shift),
                                         vma.node, vma.order, vma.obj, vma.pgoff + lo,
                                         vma.ptes[lo:hi], vma.anon_vma, vma.policy))  # a view: page tables outlive VMAs
            if not vma.obj.vmas:
                orphans.append(vma.obj)
        # Drop the PTE references first, then the page cache's: releasing an object
        # first would free its folios and _release_folios would free them a second time.
        if released:
            self._release_folios(np.concatenate(released))
        for obj in orphans:
            self._release_object(obj)
