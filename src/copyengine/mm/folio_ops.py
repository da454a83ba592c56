"""Compiled folio life-cycle loops over mem_map: prep_new_page and free_unref_folios.

They run per frame in Numba so that allocating or freeing a batch costs microseconds, not
one numpy call per metadata array; ``MemMap.arrays()`` passes the arrays in order.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from .buddy import free_one, free_pages_bulk
from .pageflags import PG_allocated, PG_head, PG_hwpoison, PG_nonzero, PG_reserved

_KEEP = PG_nonzero | PG_hwpoison


@njit(cache=True, nogil=True)
def prep_new_folios(heads, order, extra, flags, refcount, pincount, mapcount, order_a, head,
                    owner, index, private):
    """prep_new_page for every head: one reference, no mappings, ``extra`` flags."""
    nr = 1 << order
    for i in range(heads.shape[0]):
        h = heads[i]
        for j in range(nr):
            p = h + j
            head[p] = h
            order_a[p] = order
            flags[p] = (flags[p] & _KEEP) | PG_allocated | extra
            mapcount[p] = 0
            owner[p] = 0
            index[p] = 0
            private[p] = 0
        flags[h] |= PG_head
        refcount[h] = 1
        pincount[h] = 0


@njit(cache=True, nogil=True)
def free_folios(heads, flags, refcount, pincount, mapcount, order_a, head, owner, index, private,
                frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free):
    """Free folios to the buddy allocator; returns the base pages freed. A poisoned page
    never goes back: the rest of its folio is freed page by page (and merges).
    Returns -1, changing nothing, if a head is reserved or not allocated (double free)."""
    for i in range(heads.shape[0]):
        f = flags[heads[i]]
        if f & PG_reserved or not f & PG_allocated:
            return -1
    freed = 0
    singles = np.empty(heads.shape[0], np.int64)  # order-0 folios: freed in bulk below
    nsingle = 0
    for i in range(heads.shape[0]):
        h = heads[i]
        nr = 1 << order_a[h]
        poisoned = False
        for j in range(nr):
            p = h + j
            f = flags[p]
            if f & PG_hwpoison:
                poisoned = True
            flags[p] = f & _KEEP
            mapcount[p] = 0
            owner[p] = 0
        refcount[h] = 0
        pincount[h] = 0
        if not poisoned:
            if nr == 1:
                singles[nsingle] = h
                nsingle += 1
            else:
                free_one(h, order_a[h], frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free)
            freed += nr
        else:
            for j in range(nr):
                if not flags[h + j] & PG_hwpoison:
                    free_one(h + j, 0, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free)
                    freed += 1
    if nsingle:
        free_pages_bulk(singles[:nsingle], frames_per_node, max_order, nxt, prv, free_order,
                        free_head, nr_free)
    return freed
