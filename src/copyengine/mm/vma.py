"""Virtual memory areas and the objects folios belong to (anon_vma, shmem)."""
from __future__ import annotations

import itertools

import numpy as np

_ids = itertools.count(1)


class AnonVma:
    """The rmap root of private anonymous memory (mm/rmap.c's anon_vma).

    A folio's ``owner`` is this object's id and its ``index`` the page offset; every VMA
    that may map it (the original and its forked copies) is listed in ``vmas``.
    """

    shared = False

    def __init__(self):
        self.id = next(_ids)
        self.vmas: list[Vma] = []


class Shmem:
    """The backing object of a MAP_SHARED anonymous mapping (a shmem inode).

    ``cache`` is its page cache: one pfn per page offset (-1 for a hole). The page cache
    holds one reference on each folio it contains.
    """

    shared = True

    def __init__(self, npages: int):
        self.id = next(_ids)
        self.vmas: list[Vma] = []
        self.cache = np.full(npages, -1, np.int64)


class Vma:
    """[start, end) of one process, bound to one node, with its own page table slice.

    ``pgoff`` is the page offset of ``start`` inside ``obj``; the PTE of the page at
    ``start + i * page_size`` is ``ptes[i]``. ``order`` is the folio order faults use.
    ``anon_vma`` says whether the VMA has an anon_vma (vma->anon_vma != NULL): a private
    VMA gets one on its first anonymous folio (anon_vma_prepare; a 4 KiB zero-page read
    fault does not prepare one, a huge zero page fault does); a shared one never has one.
    fork copies page-table entries only of VMAs that have one (vma_needs_copy).
    ``policy`` is its mbind(2) policy (vm_policy): None, or a migrate.mempolicy.MemPolicy.
    """

    __slots__ = ("mm", "start", "end", "node", "order", "obj", "pgoff", "ptes", "anon_vma", "policy")

    def __init__(self, mm, start, end, node, order, obj, pgoff, ptes, anon_vma=False, policy=None):
        self.mm, self.start, self.end, self.node, self.order = mm, start, end, node, order
        self.obj, self.pgoff, self.ptes = obj, pgoff, ptes
        self.anon_vma = anon_vma
        self.policy = policy

    @property
    def shared(self) -> bool:
        return self.obj.shared

    @property
    def npages(self) -> int:
        return len(self.ptes)

    def __repr__(self):
        kind = "shared" if self.shared else "private"
        return f"<Vma {self.start:#x}-{self.end:#x} {kind} node={self.node} order={self.order}>"
