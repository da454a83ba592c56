"""Faults and unmaps at page-table granularity that Linux 6.12 handles per PMD or per
fault-around window (issue 13, checked against a real kernel): the huge zero page, a
2 MiB shmem folio mapped whole, fault-around, and the zap of a split shmem PMD.
Functions of a Process (``proc``), called under ``machine.lock`` from mm/process.py."""
from __future__ import annotations

import numpy as np

from .pageflags import PG_hwpoison, PG_locked
from .pte import PTE_PRESENT, pte_pfn


def pmd_order(proc):
    """The folio order of a PMD mapping (2 MiB)."""
    return (21 - proc.machine.page_shift) if proc.machine.page_shift <= 21 else -1

def split_shmem_pmds(proc, vma, i0, i1):
    """__split_huge_pmd of a file (shmem) mapping: unmapping [i0, i1) of ``vma`` cuts
    a PMD that maps a 2 MiB shmem folio; the kernel just clears such a PMD (the pages
    stay in the page cache and fault in again). Returns the page ranges to zap."""
    o = pmd_order(proc)
    if not vma.shared or vma.order != o or o <= 0:
        return []
    nr = 1 << o
    mm = proc.machine.mem_map
    base = vma.start >> proc.machine.page_shift
    out = set()
    for b in {i0, i1}:
        if not 0 < b < vma.npages or (base + b) % nr == 0:
            continue  # the cut is at the VMA's edge or on a PMD boundary
        a0 = ((base + b) // nr) * nr - base
        if a0 < 0 or a0 + nr > vma.npages:
            continue  # never PMD-mapped: the range is not inside the VMA
        ptes = vma.ptes[a0:a0 + nr]
        if not (ptes & PTE_PRESENT).all():
            continue
        pfns = pte_pfn(ptes)
        h = int(mm.head[pfns[0]])
        if int(mm.order[h]) == o and pfns[0] == h and (pfns == h + np.arange(nr)).all():
            out.add((a0, a0 + nr))
    return sorted(out)

def huge_zero(proc, vma, idx, plan):
    """do_huge_pmd_anonymous_page on a read fault: a 2 MiB-aligned range wholly inside
    a THP-eligible private VMA with no page mapped maps the huge zero page (all its
    pages read as the zero page; a write later splits it into base pages). It
    prepares the VMA's anon_vma (vmf_anon_prepare). Returns the pages to map to zero."""
    o = pmd_order(proc)
    if vma.order != o or o <= 0:
        return idx
    nr = 1 << o
    base = vma.start >> proc.machine.page_shift
    first = (np.unique((base + idx) >> o) << o) - base
    first = first[(first >= 0) & (first + nr <= vma.npages)]
    whole = [f for f in first.tolist() if not vma.ptes[f:f + nr].any()]
    if not whole:
        return idx
    plan.huge_zero = True
    big = (np.array(whole, np.int64)[:, None] + np.arange(nr)[None, :]).ravel()
    return np.union1d(idx, big)

def map_cached_pmds(proc, seg, plan):
    """do_set_pmd (finish_fault, filemap_map_pmd): a fault on a page of a 2 MiB
    shmem folio already in the page cache maps the whole folio with one PMD when its
    aligned range lies inside the VMA and nothing there is mapped yet."""
    o = pmd_order(proc)
    vma = seg.vma
    if vma.order != o or o <= 0:
        return
    mm = proc.machine.mem_map
    nr = 1 << o
    base = vma.start >> proc.machine.page_shift
    idx, pfns = plan.map_cached
    extra_i, extra_p = [], []
    for a0 in np.unique(((base + idx) >> o) << o).tolist():
        a0 -= base
        if a0 < 0 or a0 + nr > vma.npages or vma.ptes[a0:a0 + nr].any():
            continue
        cached = vma.obj.cache[vma.pgoff + a0:vma.pgoff + a0 + nr]
        h = int(cached[0])
        if h < 0 or int(mm.order[h]) != o or int(mm.head[h]) != h or not (cached == h + np.arange(nr)).all():
            continue
        extra_i.append(np.arange(a0, a0 + nr))
        extra_p.append(cached)
    if extra_i:
        i = np.concatenate([idx] + extra_i)
        p = np.concatenate([pfns] + extra_p)
        i, first = np.unique(i, return_index=True)
        plan.map_cached = (i, p[first])

def fault_around(proc, seg, idx, plan):
    """do_fault_around on a read fault of a shared page: the PTEs of the window of
    fault_around_bytes (64 KiB) around each faulting page, clamped to the VMA and its
    page table, map the pages already in the page cache (filemap_map_pages skips
    poisoned and locked ones). Adds them to plan.map_cached."""
    m = proc.machine
    mm = m.mem_map
    vma = seg.vma
    nr = max(1, (64 << 10) >> m.page_shift)
    ptrs = m.page_size // 8  # PTRS_PER_PTE
    base = vma.start >> m.page_shift
    pte_off = (base + idx) % ptrs
    start = np.maximum(pte_off - pte_off % nr, pte_off - np.minimum(pte_off, idx)) - pte_off + idx
    stop = np.minimum(np.minimum(start + nr, idx - pte_off + ptrs), vma.npages)
    want = np.zeros(vma.npages, bool)
    for a, b in set(zip(start.tolist(), stop.tolist())):
        want[a:b] = True
    want[seg.i0:seg.i1] = False  # the access's own pages are planned already
    cand = np.nonzero(want & (vma.ptes == 0))[0]
    if not len(cand):
        return
    pfns = vma.obj.cache[vma.pgoff + cand]
    ok = pfns >= 0
    cand, pfns = cand[ok], pfns[ok]
    if len(pfns):
        ok = ((mm.flags[pfns] & PG_hwpoison) == 0) & ((mm.flags[mm.head[pfns]] & PG_locked) == 0)
        cand, pfns = cand[ok], pfns[ok]
    if not len(cand):
        return
    if plan.map_cached is not None:
        keep = ~np.isin(cand, plan.map_cached[0])
        cand = np.concatenate((plan.map_cached[0], cand[keep]))
        pfns = np.concatenate((plan.map_cached[1], pfns[keep]))
    plan.map_cached = (cand, pfns)
