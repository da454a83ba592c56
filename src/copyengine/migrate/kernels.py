"""Compiled loops of the migration phases, one pass over a batch's folios and pages each.

``core`` orchestrates the phases and owns their semantics; these loops only do the
per-page work (what the kernel does in try_to_migrate_one, remove_migration_pte,
folio_migrate_flags ...) without one numpy call per metadata array per phase.
Entries (the PTEs a batch replaced by migration entries) are four parallel arrays per VMA:
page index in the VMA, source pfn, batch folio index, and the PTE's write bit.
"""
from __future__ import annotations

import errno

import numpy as np
from numba import njit

from ..engines.memops import copy as _copy_bytes
from ..engines.memops import store_fence
from ..errors import EHWPOISON
from ..mm.pageflags import PG_anon, PG_hwpoison, PG_isolated, PG_locked, PG_nonzero, PG_swapbacked
from ..mm.pte import PFN_SHIFT, PTE_MIGRATION, PTE_PRESENT, PTE_WRITE

_EAGAIN = -errno.EAGAIN
_UNLOCK = np.uint32(0xFFFFFFFF & ~int(PG_locked))
_UNLOCK_ISOLATE = np.uint32(0xFFFFFFFF & ~int(PG_locked | PG_isolated))


@njit(cache=True, nogil=True)
def unmap_vma(sel, src, nr, oid, owner, index, pgoff, ptes, flags, mapcount, refcount,
              ev, ep, ef, ew):
    """try_to_migrate over one VMA: every present PTE mapping a page of the selected
    folios (owned by object ``oid``) becomes a migration entry; its map count and folio
    reference go. The sources are locked first. Returns the number of entries written."""
    k = 0
    npt = ptes.shape[0]
    for t in range(sel.shape[0]):
        f = sel[t]
        h = src[f]
        flags[h] |= PG_locked
        for j in range(nr[f]):
            p = h + j
            if owner[p] != oid:
                continue
            v = index[p] - pgoff
            if v < 0 or v >= npt:
                continue
            pt = ptes[v]
            if (pt & PTE_PRESENT) == 0 or (pt >> PFN_SHIFT) != np.uint64(p):
                continue
            w = pt & PTE_WRITE
            ptes[v] = (np.uint64(p) << PFN_SHIFT) | PTE_MIGRATION | w
            mapcount[p] -= 1
            refcount[h] -= 1
            ev[k] = v
            ep[k] = p
            ef[k] = f
            ew[k] = w
            k += 1
    return k


@njit(cache=True, nogil=True)
def ref_check(sel, src, flags, refcount, rc):
    """folio_expected_refs after unmap: the isolation reference plus the page cache's.
    Any other (a pin) makes the folio -EAGAIN. Returns how many are busy."""
    busy = 0
    for t in range(sel.shape[0]):
        f = sel[t]
        h = src[f]
        expected = 2 if flags[h] & PG_swapbacked else 1
        if refcount[h] != expected:
            rc[f] = _EAGAIN
            busy += 1
    return busy


@njit(cache=True, nogil=True)
def restore_vma(ev, ep, ef, ew, n, want, to_dst, src, dst, ptes, mapcount, refcount):
    """remove_migration_ptes for the entries of folios with ``want[f]``: point them at
    the destination (``to_dst``) or back at the source, restoring map counts and folio
    references; an entry no longer there (its range was unmapped meanwhile) is dropped.
    Entries of other folios are compacted to the front; returns their count."""
    keep = 0
    for i in range(n):
        f = ef[i]
        if not want[f]:
            ev[keep] = ev[i]
            ep[keep] = ep[i]
            ef[keep] = f
            ew[keep] = ew[i]
            keep += 1
            continue
        p = ep[i]
        cur = ptes[ev[i]]
        if (cur & ~PTE_WRITE) != (np.uint64(p) << PFN_SHIFT) | PTE_MIGRATION:
            continue  # zapped meanwhile (munmap does not wait on a migration entry)
        if to_dst:
            p = dst[f] + (p - src[f])
            refcount[dst[f]] += 1
        else:
            refcount[src[f]] += 1
        # the entry's write bit now: a fork meanwhile made it read-only (copy-on-write)
        ptes[ev[i]] = (np.uint64(p) << PFN_SHIFT) | PTE_PRESENT | (cur & PTE_WRITE)
        mapcount[p] += 1
    return keep


@njit(cache=True, nogil=True, inline="always")
def _move_one(f, src, dst, nr, flags, owner, index, refcount, moved):
    """folio_migrate_mapping + folio_migrate_flags of one folio; True for a shmem folio."""
    s, d = src[f], dst[f]
    for j in range(nr[f]):
        owner[d + j] = owner[s + j]
        index[d + j] = index[s + j]
        flags[d + j] |= flags[s + j] & (PG_anon | PG_swapbacked)
    moved[f] = True
    if flags[s] & PG_swapbacked:
        refcount[d] = 2
        refcount[s] -= 1
        return True
    refcount[d] = 1
    return False


@njit(cache=True, nogil=True)
def batch_move(sel, src, dst, nr, flags, owner, index, refcount, moved):
    """folio_migrate_mapping + folio_migrate_flags without the copy (MIGRATE_NO_COPY).
    The destination takes the page cache's reference of a shmem folio. Returns how
    many shmem folios moved (their page-cache slots are updated by the caller)."""
    nshm = 0
    for t in range(sel.shape[0]):
        if _move_one(sel[t], src, dst, nr, flags, owner, index, refcount, moved):
            nshm += 1
    return nshm


@njit(cache=True, nogil=True, inline="always")
def _poisoned(h, n, flags):
    for j in range(n):
        if flags[h + j] & PG_hwpoison:
            return True
    return False


@njit(cache=True, nogil=True)
def folio_copy(sel, src, dst, nr, flags, mem, page_size, nt, rc, copied):
    """folio_mc_copy of each selected folio, one folio after another with the same
    primitive for every flow (memops.copy; non-temporal stores when ``nt``): -EHWPOISON
    without reading a poisoned source, else 0. Offsets come from the batch's own frame
    numbers, never from a job an engine could have edited."""
    for t in range(sel.shape[0]):
        _mc_copy_one(sel[t], src, dst, nr, flags, mem, page_size, nt, rc, copied)
    if nt:
        store_fence()   # once per batch (one per 4 KiB folio cost 15%), before statuses count


@njit(cache=True, nogil=True, inline="always")
def _mc_copy_one(f, src, dst, nr, flags, mem, page_size, nt, rc, copied):
    """folio_mc_copy of folio ``f``: -EHWPOISON without reading a poisoned source."""
    if _poisoned(src[f], nr[f], flags):
        rc[f] = -EHWPOISON
        copied[f] = False
        return
    _copy_bytes(mem, dst[f] * page_size, src[f] * page_size, nr[f] * page_size, nt)
    rc[f] = 0
    copied[f] = True


@njit(cache=True, nogil=True)
def vanilla_move_copy(sel, src, dst, nr, flags, owner, index, refcount, moved, mem, page_size, nt,
                      rc, copied):
    """migrate_folio_move for one folio after another, as mainline did before the series:
    move a folio's metadata, then folio_mc_copy its data (the same primitive as
    :func:`folio_copy`), then the next folio. Returns how many shmem folios moved."""
    nshm = 0
    for t in range(sel.shape[0]):
        f = sel[t]
        if _move_one(f, src, dst, nr, flags, owner, index, refcount, moved):
            nshm += 1
        _mc_copy_one(f, src, dst, nr, flags, mem, page_size, nt, rc, copied)
    if nt:
        store_fence()
    return nshm


@njit(cache=True, nogil=True)
def folios_poisoned(sel, src, nr, flags, out):
    """Per selected folio: does any of its source pages carry PG_hwpoison?"""
    for t in range(sel.shape[0]):
        f = sel[t]
        out[t] = _poisoned(src[f], nr[f], flags)


@njit(cache=True, nogil=True)
def finalize_done(ok, src, dst, nr, flags, refcount):
    """migrate_folio_done for migrated folios, after their PTEs point at the destination:
    the destination is unlocked and loses its allocation reference, the source is
    unlocked and loses its isolation reference (the last)."""
    for t in range(ok.shape[0]):
        f = ok[t]
        d, s = dst[f], src[f]
        for j in range(nr[f]):
            flags[d + j] |= PG_nonzero
        flags[d] &= _UNLOCK
        refcount[d] -= 1
        flags[s] &= _UNLOCK_ISOLATE
        refcount[s] -= 1


@njit(cache=True, nogil=True)
def unlock(sel, heads, flags):
    for t in range(sel.shape[0]):
        flags[heads[sel[t]]] &= _UNLOCK
