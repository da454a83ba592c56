"""Large anonymous folios that lose part of their mappings, and their splits, as
mm/huge_memory.c does them: deferred_split_folio, can_split_folio, split_folio with
zero-filled pages remapped to the shared zero page (Linux 6.12)."""
from __future__ import annotations

import numpy as np

from .pageflags import PG_anon, PG_head, PG_isolated, PG_nonzero, PG_partially_mapped
from .pte import PTE_PRESENT, PTE_WRITE, mk_pte, pte_pfn


def release_folios(m, heads):
    """After a zap (munmap, exit, COW) dropped PTE references of ``heads``: free the folios
    whose last reference went, and queue every anonymous large folio now mapped only in
    part for a deferred split (__folio_remove_rmap -> deferred_split_folio). Such a folio
    stays whole, unmapped pages included, until it is migrated (migrate_pages_batch splits
    it then). The kernel's shrinker also splits it under memory pressure: not modelled."""
    mm = m.mem_map
    uh = np.unique(heads)
    dead = uh[mm.refcount[uh] == 0]
    m.free_folios(dead)
    for h in uh[(mm.refcount[uh] > 0) & (mm.order[uh] > 1)].tolist():
        deferred_split_folio(m, int(h))


def deferred_split_folio(m, h) -> None:
    """deferred_split_folio(folio, partially_mapped=true): an anonymous folio of order > 1
    some of whose pages are mapped and some no longer is marked partially mapped (once)."""
    mm = m.mem_map
    f = mm.flags[h]
    if not f & PG_anon or f & PG_partially_mapped:
        return
    mapped = mm.mapcount[h:h + (1 << int(mm.order[h]))] > 0
    if mapped.any() and not mapped.all():
        mm.flags[h] |= PG_partially_mapped
        if mm.order[h] == m.max_order:
            m.count("thp_deferred_split_page")


def folio_test_partially_mapped(m, h) -> bool:
    return bool(m.mem_map.flags[h] & PG_partially_mapped)


def can_split_folio(m, h) -> bool:
    """can_split_folio: an anonymous folio whose only references are its mappings and
    the isolation (a pinned folio cannot be split)."""
    mm = m.mem_map
    if not mm.flags[h] & PG_anon or mm.pincount[h]:
        return False
    nr = 1 << int(mm.order[h])
    return int(mm.refcount[h]) == 1 + int(mm.mapcount[h:h + nr].sum())


def split_folio_isolated(m, h):
    """split_folio of an isolated anonymous large folio: each page becomes an order-0
    folio holding its PTE references and an isolation reference of its own. As 6.12's
    __split_huge_page (remap_page with RMP_USE_SHARED_ZEROPAGE), a mapped page whose
    contents are all zero is mapped to the shared zero page instead and keeps only the
    isolation reference (migration then finds it "freed from under us"). Returns the
    pages."""
    mm = m.mem_map
    nr = 1 << int(mm.order[h])
    pages = np.arange(h, h + nr, dtype=np.int64)
    mm.head[pages] = pages
    mm.order[pages] = 0
    mm.flags[pages] |= PG_head | PG_isolated
    mm.flags[h] &= ~PG_partially_mapped
    mm.refcount[pages] = mm.mapcount[pages] + 1
    mm.pincount[pages] = 0
    m.count("thp_split_page")
    _map_unused_to_zeropage(m, pages)
    return pages


def _map_unused_to_zeropage(m, pages):
    """try_to_map_unused_to_zeropage for every mapped page of a split anonymous folio:
    one that holds only zeros is replaced, in every PTE that maps it, by the zero page."""
    mm = m.mem_map
    mapped = pages[mm.mapcount[pages] > 0]
    if not len(mapped):
        return
    maybe = (mm.flags[mapped] & PG_nonzero) != 0   # without PG_nonzero a frame holds zeros
    zero = ~maybe
    if maybe.any():
        ps = m.page_size
        frames = m.mem.reshape(-1, ps)
        zero[maybe] = ~frames[mapped[maybe]].any(axis=1)
    zero_pages = mapped[zero]
    if not len(zero_pages):
        return
    obj = m.objects.get(int(mm.owner[zero_pages[0]]))  # the folio's anon_vma: its rmap
    for vma in (obj.vmas if obj is not None else ()):
        slot = mm.index[zero_pages] - vma.pgoff
        inside = (slot >= 0) & (slot < vma.npages)
        slot, page = slot[inside], zero_pages[inside]
        pte = vma.ptes[slot]
        hit = ((pte & PTE_PRESENT) != 0) & (pte_pfn(pte) == page)
        if hit.any():
            vma.ptes[slot[hit]] = mk_pte(np.full(int(hit.sum()), m.zero_pfn), PTE_PRESENT)
            mm.mapcount[page[hit]] -= 1   # one PTE per page per VMA: no duplicates
            mm.refcount[page[hit]] -= 1


def _pmd_mapped_range(m, vma, slot, pfn):
    """The slots of ``vma`` through which a PMD maps the THP holding ``pfn`` (at ``slot``),
    or None: its order is the PMD's, its head sits on a 2 MiB boundary inside the VMA,
    and every PTE there maps its pages in order (how a PMD mapping looks in a page table
    of PTEs; a split PMD, partly unmapped or copied on write, no longer does)."""
    mm = m.mem_map
    h = int(mm.head[pfn])
    o = 21 - m.page_shift
    if o <= 0 or int(mm.order[h]) != o:
        return None
    nr = 1 << o
    first = slot - (pfn - h)
    if first < 0 or first + nr > vma.npages or ((vma.start >> m.page_shift) + first) % nr:
        return None
    ptes = vma.ptes[first:first + nr]
    if not (ptes & PTE_PRESENT).all() or not (pte_pfn(ptes) == h + np.arange(nr)).all():
        return None
    return first, first + nr


def wp_anon_reuse(m, vma, idx, old, excl):
    """Which write faults on read-only PTEs of private anonymous pages reuse the page
    (make the PTE writable) and which copy it, as 6.12's do_wp_page and
    do_huge_pmd_wp_page decide. ``idx``: the faulting slots of ``vma``; ``old``: the pages
    they map; ``excl``: per entry, the page's folio is mapped once, by this mapping, with
    no other reference (wp_can_reuse_anon_folio's refcount test). Returns (the slots to
    make writable, a mask of the entries to copy):

    - a base page is reused when exclusive;
    - a PMD-mapped THP that is exclusive is reused whole: every PTE of its PMD becomes
      writable, not only the faulting ones; otherwise the PMD is split and the faulting
      page copied;
    - any other large folio (mapped by PTEs) is never reused: 6.12's
      wp_can_reuse_anon_folio refuses large folios, and a read-only PTE here is not
      AnonExclusive; the faulting page is copied (and its folio may become partly
      mapped)."""
    mm = m.mem_map
    large = mm.order[mm.head[old]] > 0
    if not (excl & large).any():
        return idx[excl], ~excl
    reuse = [idx[excl & ~large]]
    cow = ~excl
    done = set()
    for k in np.flatnonzero(excl & large).tolist():
        rng = _pmd_mapped_range(m, vma, int(idx[k]), int(old[k]))
        if rng is None:
            cow[k] = True
        elif rng not in done:
            done.add(rng)
            slots = np.arange(*rng)
            reuse.append(slots[(vma.ptes[slots] & PTE_WRITE) == 0])
    return np.concatenate(reuse), cow
