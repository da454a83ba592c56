"""fork's copy of an address space: dup_mmap (kernel/fork.c) and copy_page_range /
copy_present_pte / copy_nonpresent_pte (mm/memory.c). A mixin of
:class:`~.process.Process`."""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .pageflags import PG_anon, PG_nonzero
from .pte import PTE_MIGRATION, PTE_PRESENT, PTE_WRITE, mk_pte, pte_pfn
from .vma import Vma

if TYPE_CHECKING:
    from .process import Process


class ForkOps:
    """fork() of a :class:`~.process.Process` (kernel/fork.c, mm/memory.c)."""

    # ------------------------------------------------------------------ fork / exit
    def fork(self) -> "Process":
        """A child with a copy of the address space (dup_mmap): shared mappings stay shared,
        private pages are shared copy-on-write, and pinned private pages are copied at once.
        As copy_page_range's vma_needs_copy, a VMA without an anon_vma (every shared one, a
        private one that mapped only the zero page) copies no page-table entries."""
        m = self.machine
        mm = m.mem_map
        with m.lock:
            self.enter()
            # No wait on migration entries: copy_nonpresent_pte copies them to the child
            # (read-only in both, for copy-on-write), and the migration's finalize walks the
            # rmap again and maps the destination in the child too.
            # Pinned private pages need their own copy in the child: allocate first.
            copies = []
            try:
                for vma in self.vmas:
                    if vma.shared or not vma.anon_vma:
                        continue
                    present = np.nonzero((vma.ptes & PTE_PRESENT) != 0)[0]
                    pfns = pte_pfn(vma.ptes[present])
                    real = pfns != m.zero_pfn
                    pinned = np.zeros(len(pfns), bool)
                    pinned[real] = mm.pincount[mm.head[pfns[real]]] > 0
                    if pinned.any():
                        new = m.alloc_folios(vma.node, 0, int(pinned.sum()))
                        copies.append((vma, present[pinned], pfns[pinned], new))
            except OSError:
                for c in copies:
                    m.free_folios(c[3], undo=True)
                raise
            child = m.spawn(self.uid, self.cap_sys_nice, self.mems_allowed)
            child._next_addr = self._next_addr
            copied = {id(c[0]): c for c in copies}
            ps = m.page_size
            for vma in self.vmas:
                if vma.shared or not vma.anon_vma:
                    # vma_needs_copy: no anon_vma, no page-table entries copied; the child
                    # maps these pages on its first touch.
                    child._insert_vma(Vma(child, vma.start, vma.end, vma.node, vma.order, vma.obj,
                                          vma.pgoff, np.zeros_like(vma.ptes), policy=vma.policy))
                    continue
                cv = Vma(child, vma.start, vma.end, vma.node, vma.order, vma.obj, vma.pgoff,
                         vma.ptes.copy(), True, vma.policy)
                present = (vma.ptes & PTE_PRESENT) != 0
                pfns = pte_pfn(vma.ptes[present])
                share = pfns != m.zero_pfn
                c = copied.get(id(vma))
                if c is not None:
                    _, idx, old, new = c
                    for o, n in zip(old.tolist(), new.tolist()):
                        m.mem[n * ps:(n + 1) * ps] = m.mem[o * ps:(o + 1) * ps]
                    mm.flags[new] |= PG_anon | PG_nonzero
                    mm.owner[new] = vma.obj.id
                    mm.index[new] = vma.pgoff + idx
                    mm.mapcount[new] = 1
                    mm.refcount[new] = 1
                    cv.ptes[idx] = mk_pte(new, PTE_PRESENT | PTE_WRITE)
                    notpinned = np.ones(vma.npages, bool)
                    notpinned[idx] = False
                    share &= notpinned[np.nonzero(present)[0]]
                sp = pfns[share]
                mm.mapcount[sp] += 1
                np.add.at(mm.refcount, mm.head[sp], 1)
                if not vma.shared:
                    wp = np.nonzero(present)[0][share]
                    vma.ptes[wp] &= ~PTE_WRITE
                    cv.ptes[wp] &= ~PTE_WRITE
                    mig = (vma.ptes & PTE_MIGRATION) != 0
                    vma.ptes[mig] &= ~PTE_WRITE
                    cv.ptes[mig] &= ~PTE_WRITE
                child._insert_vma(cv)
            return child
