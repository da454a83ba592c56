"""Splitting large folios, as mm/huge_memory.c does: split_folio, can_split_folio, and
what happens to an anonymous large folio when part of it is no longer mapped."""
from __future__ import annotations

import numpy as np

from .pageflags import PG_anon, PG_head, PG_isolated, PG_locked


def release_folios(m, heads):
    """Free folios whose last reference went; split anonymous large folios left
    partly mapped (deferred_split_folio, done at once here)."""
    mm = m.mem_map
    uh = np.unique(heads)
    dead = uh[mm.refcount[uh] == 0]
    m.free_folios(dead)
    live = uh[(mm.refcount[uh] > 0) & (mm.order[uh] > 0)]
    for h in live.tolist():
        _maybe_split(m, int(h))


def _maybe_split(m, h):
    mm = m.mem_map
    nr = 1 << int(mm.order[h])
    pages = np.arange(h, h + nr)
    if not mm.flags[h] & PG_anon or mm.pincount[h] or mm.flags[h] & (PG_locked | PG_isolated):
        return
    mapped = mm.mapcount[pages]
    if (mapped > 0).all() and int(mapped.sum()) == int(mm.refcount[h]):
        return  # still fully mapped: nothing to split
    split_folio(m, h)


def split_folio(m, h):
    """split_folio: every page of an anonymous large folio becomes an order-0 folio with
    its own references (its PTE mappings); pages no longer referenced are freed."""
    mm = m.mem_map
    nr = 1 << int(mm.order[h])
    pages = np.arange(h, h + nr)
    mm.head[pages] = pages
    mm.order[pages] = 0
    mm.flags[pages] |= PG_head
    mm.refcount[pages] = mm.mapcount[pages]
    mm.pincount[pages] = 0
    m.count("thp_split_page")
    dead = pages[mm.refcount[pages] == 0]
    m.free_folios(dead)


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
    folio holding its PTE references and an isolation reference of its own. Returns
    the pages."""
    mm = m.mem_map
    nr = 1 << int(mm.order[h])
    pages = np.arange(h, h + nr, dtype=np.int64)
    mm.head[pages] = pages
    mm.order[pages] = 0
    mm.flags[pages] |= PG_head | PG_isolated
    mm.refcount[pages] = mm.mapcount[pages] + 1
    mm.pincount[pages] = 0
    m.count("thp_split_page")
    return pages
