"""The rmap side of a migration batch, as mm/rmap.c serves mm/migrate.c: try_to_migrate
replaces every PTE that maps a batch's folios (in every VMA of their anon_vma or shmem
object) with a migration entry, and remove_migration_ptes points them at the source or
the destination again."""
from __future__ import annotations

import numpy as np

from ..mm.huge_memory import deferred_split_folio
from ..mm.pte import PTE_MIGRATION, PTE_WRITE, pte_pfn
from . import kernels


def try_to_migrate(b, sel) -> None:
    """Migration entries for the PTEs of folios ``sel`` of batch ``b``, their map counts
    and references dropped; what was replaced is kept in ``b.entries`` (per VMA) and the
    VMAs walked in ``b.rmap``."""
    m = b.m
    mm = m.mem_map
    src = b.src[sel]
    owners = mm.owner[src]
    uniq = owners[:1] if (owners == owners[0]).all() else np.unique(owners)
    npages = int(b.nr[sel].sum())
    for oid in uniq.tolist():
        obj = m.objects.get(oid)
        if obj is None:
            continue
        b.rmap[oid] = list(obj.vmas)  # VMAs added later (a fork in the copy) are walked at finalize
        # the anon_vma interval tree's order: by pgoff, then as inserted
        walk = sorted(obj.vmas, key=lambda v: v.pgoff) if len(obj.vmas) > 1 else obj.vmas
        large = sel[b.order[sel] > 1] if len(walk) > 1 else ()
        for vma in walk:
            ev = np.empty(npages, np.int64)
            ep = np.empty(npages, np.int64)
            ef = np.empty(npages, np.int64)
            ew = np.empty(npages, np.uint64)
            n = kernels.unmap_vma(sel, b.src, b.nr, oid, mm.owner, mm.index, vma.pgoff, vma.ptes,
                                  mm.flags, mm.mapcount, mm.refcount, ev, ep, ef, ew)
            if n:
                b.entries.append([vma, ev, ep, ef, ew, n])
                if len(large):
                    _deferred_split_on_unmap(b, large, ef[:n])


def _deferred_split_on_unmap(b, large, touched):
    """try_to_migrate removes a folio's mappings one VMA at a time, and each removal goes
    through __folio_remove_rmap: a large anonymous folio that one VMA mapped whole while
    another maps only part of it is left mapped in part for a moment, and is queued for a
    deferred split then (6.12); the destination inherits that (migrate_folio_move)."""
    m = b.m
    for f in np.intersect1d(large, touched).tolist():
        deferred_split_folio(m, int(b.src[f]))


def remove_migration_ptes(b, folios, to_src):
    """remove_migration_ptes for ``folios``: their entries point at the source (undo) or
    the destination (success) again, with map counts and references. Like the kernel's,
    it walks the rmap again: a VMA forked from one of the batch's while it was copying
    holds copies of its migration entries, and they are restored too."""
    if not len(folios) or not b.entries:
        return
    mm = b.m.mem_map
    want = np.zeros(len(b), np.bool_)
    want[folios] = True
    for e in b.entries:
        vma, ev, ep, ef, ew, n = e
        e[5] = kernels.restore_vma(ev, ep, ef, ew, n, want, not to_src, b.src, b.dst, vma.ptes,
                                   mm.mapcount, mm.refcount)
    b.entries = [e for e in b.entries if e[5]]
    for oid, seen in b.rmap.items():
        obj = b.m.objects.get(oid)
        for vma in (obj.vmas if obj is not None else ()):
            if not any(vma is v for v in seen):
                _restore_copied_entries(b, vma, want, to_src)


def _restore_copied_entries(b, vma, want, to_src):
    """The migration entries of ``vma`` (made after unmap, by fork) that name pages of
    the wanted folios, restored like the batch's own."""
    mm = b.m.mem_map
    idx = np.flatnonzero((vma.ptes & PTE_MIGRATION) != 0)
    if not len(idx):
        return
    pfn = pte_pfn(vma.ptes[idx])
    order = np.argsort(b.src)
    pos = np.searchsorted(b.src[order], mm.head[pfn])
    pos = np.minimum(pos, len(b) - 1)
    f = order[pos]
    mine = (b.src[f] == mm.head[pfn]) & want[f]
    if mine.any():
        ew = vma.ptes[idx[mine]] & PTE_WRITE
        kernels.restore_vma(idx[mine], pfn[mine], f[mine], ew, int(mine.sum()), want, not to_src, b.src, b.dst,
                            vma.ptes, mm.mapcount, mm.refcount)
