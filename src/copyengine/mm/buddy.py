"""The buddy allocator: per-node free lists of power-of-two blocks (mm/page_alloc.c).

Free lists are doubly linked through per-frame ``next``/``prev`` arrays, exactly like the
kernel's ``free_area[order].free_list`` threaded through struct page; ``free_order`` plays
PG_buddy + page_private (order + 1 on the head of a free block, 0 elsewhere, so that
untouched frames cost no host memory). The list operations are Numba-compiled: a batch of
512 frees is a handful of microseconds, with no Python object per page.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import oserror
import errno


@njit(cache=True, nogil=True)
def _list_add(pfn, k, node, nxt, prv, free_order, free_head, nr_free):
    h = free_head[node, k]
    nxt[pfn] = h
    prv[pfn] = -1
    if h >= 0:
        prv[h] = pfn
    free_head[node, k] = pfn
    free_order[pfn] = k + 1
    nr_free[node, k] += 1


@njit(cache=True, nogil=True)
def _list_del(pfn, k, node, nxt, prv, free_order, free_head, nr_free):
    n = nxt[pfn]
    p = prv[pfn]
    if p >= 0:
        nxt[p] = n
    else:
        free_head[node, k] = n
    if n >= 0:
        prv[n] = p
    free_order[pfn] = 0
    nr_free[node, k] -= 1


@njit(cache=True, nogil=True)
def _init_node(node, base, nblocks, max_order, nxt, prv, free_order, free_head, nr_free):
    # Added highest first so that the list head is the lowest block: allocations go upward.
    for i in range(nblocks - 1, -1, -1):
        _list_add(base + (i << max_order), max_order, node, nxt, prv, free_order, free_head, nr_free)


@njit(cache=True, nogil=True)
def _pop_smallest(node, order, max_order, nxt, prv, free_order, free_head, nr_free):
    """Take the smallest free block of at least ``order``: (head, its order), or (-1, -1)."""
    k = order
    while k <= max_order and free_head[node, k] < 0:
        k += 1
    if k > max_order:
        return -1, -1
    pfn = free_head[node, k]
    _list_del(pfn, k, node, nxt, prv, free_order, free_head, nr_free)
    return pfn, k


@njit(cache=True, nogil=True)
def alloc_blocks(node, order, count, out, max_order, nxt, prv, free_order, free_head, nr_free):
    """__rmqueue_smallest + expand, ``count`` times; returns how many blocks were found."""
    got = 0
    while got < count:
        pfn, k = _pop_smallest(node, order, max_order, nxt, prv, free_order, free_head, nr_free)
        if pfn < 0:
            break
        while k > order:  # expand(): the upper halves go back on the free lists
            k -= 1
            _list_add(pfn + (1 << k), k, node, nxt, prv, free_order, free_head, nr_free)
        out[got] = pfn
        got += 1
    return got


@njit(cache=True, nogil=True)
def rmqueue_bulk(node, count, out, max_order, nxt, prv, free_order, free_head, nr_free):
    """rmqueue_bulk: ``count`` base pages at once, smallest blocks first, each block
    handed out whole (its pages in address order); only a last partly used block is
    split, its tail going back as aligned blocks. Returns how many pages were found."""
    got = 0
    while got < count:
        pfn, k = _pop_smallest(node, 0, max_order, nxt, prv, free_order, free_head, nr_free)
        if pfn < 0:
            break
        n = 1 << k
        take = min(n, count - got)
        for j in range(take):
            out[got + j] = pfn + j
        got += take
        # the unused tail [pfn+take, pfn+n): aligned blocks whose buddies are in use
        start = pfn + take
        end = pfn + n
        while start < end:
            b = 0
            while b < k and (start & ((1 << (b + 1)) - 1)) == 0 and start + (1 << (b + 1)) <= end:
                b += 1
            _list_add(start, b, node, nxt, prv, free_order, free_head, nr_free)
            start += 1 << b
    return got


@njit(cache=True, nogil=True)
def free_pages_bulk(pfns, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free):
    """free_pcppages_bulk: free many base pages; aligned runs of consecutive pages go
    back as one block each (then merge with free buddies as usual), which is the state
    freeing them one by one would reach, without a merge walk per page."""
    s = np.sort(pfns)
    n = s.shape[0]
    i = 0
    while i < n:
        p = s[i]
        base = (p // frames_per_node) * frames_per_node
        k = 0
        while k < max_order:
            size = 1 << (k + 1)
            if ((p - base) & (size - 1)) != 0 or i + size > n or s[i + size - 1] != p + size - 1:
                break
            k += 1
        free_one(p, k, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free)
        i += 1 << k


@njit(cache=True, nogil=True)
def free_one(pfn, order, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free):
    """__free_one_page: merge the block with its buddy while the buddy is free."""
    node = pfn // frames_per_node
    base = node * frames_per_node
    k = order
    while k < max_order:
        buddy = base + ((pfn - base) ^ (1 << k))
        if free_order[buddy] != k + 1:
            break
        _list_del(buddy, k, node, nxt, prv, free_order, free_head, nr_free)
        if buddy < pfn:
            pfn = buddy
        k += 1
    _list_add(pfn, k, node, nxt, prv, free_order, free_head, nr_free)


@njit(cache=True, nogil=True)
def _free(pfns, order, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free):
    for i in range(pfns.shape[0]):
        free_one(pfns[i], order, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free)


@njit(cache=True, nogil=True)
def _take_off(pfn, frames_per_node, max_order, nxt, prv, free_order, free_head, nr_free):
    """take_page_off_buddy: pull one free frame out of whatever free block holds it."""
    node = pfn // frames_per_node
    base = node * frames_per_node
    for k in range(max_order + 1):
        head = base + ((pfn - base) & ~((1 << k) - 1))
        if free_order[head] == k + 1:
            _list_del(head, k, node, nxt, prv, free_order, free_head, nr_free)
            while k > 0:
                k -= 1
                half = head + (1 << k)
                if pfn >= half:
                    _list_add(head, k, node, nxt, prv, free_order, free_head, nr_free)
                    head = half
                else:
                    _list_add(half, k, node, nxt, prv, free_order, free_head, nr_free)
            return True
    return False


class BuddyAllocator:
    """Free lists of every node; blocks of order 0 .. ``max_order`` (2 MiB)."""

    def __init__(self, nodes: int, frames_per_node: int, max_order: int):
        if frames_per_node % (1 << max_order):
            raise ValueError("node size must be a multiple of the largest block")
        nframes = nodes * frames_per_node
        self.nodes, self.frames_per_node, self.max_order = nodes, frames_per_node, max_order
        self.nxt = np.zeros(nframes, np.int64)
        self.prv = np.zeros(nframes, np.int64)
        self.free_order = np.zeros(nframes, np.int8)
        self.free_head = np.full((nodes, max_order + 1), -1, np.int64)
        self.nr_free = np.zeros((nodes, max_order + 1), np.int64)
        self._out = np.empty(1024, np.int64)
        for node in range(nodes):
            _init_node(node, node * frames_per_node, frames_per_node >> max_order, max_order, *self.lists())

    def lists(self):
        """The free-list arrays, in the order the compiled functions take them."""
        return self.nxt, self.prv, self.free_order, self.free_head, self.nr_free

    def alloc(self, node: int, order: int, count: int) -> np.ndarray:
        """Up to ``count`` blocks of ``order`` on ``node`` (fewer when the node runs out)."""
        if count > len(self._out):
            self._out = np.empty(max(count, 2 * len(self._out)), np.int64)
        if order == 0:
            got = rmqueue_bulk(node, count, self._out, self.max_order, *self.lists())
        else:
            got = alloc_blocks(node, order, count, self._out, self.max_order, *self.lists())
        # Address order: a batch's destinations then line up with its sources (which
        # faults allocate in address order), so contiguous runs copy as one span.
        return np.sort(self._out[:got])

    def alloc_exact(self, node: int, order: int, count: int) -> np.ndarray:
        """``count`` blocks or none: ENOMEM (everything handed back) when the node cannot."""
        heads = self.alloc(node, order, count)
        if len(heads) < count:
            self.free(heads, order)
            raise oserror(errno.ENOMEM, f"node {node} cannot supply {count} block(s) of order {order}")
        return heads

    def free(self, pfns: np.ndarray, order: int) -> None:
        if not len(pfns):
            return
        pfns = np.ascontiguousarray(pfns, dtype=np.int64)
        if order == 0 and len(pfns) > 1:
            free_pages_bulk(pfns, self.frames_per_node, self.max_order, *self.lists())
        else:
            _free(pfns, order, self.frames_per_node, self.max_order, *self.lists())

    def take_off(self, pfn: int) -> bool:
        """Remove one free frame from the free lists for good; False if it is not free."""
        return bool(_take_off(pfn, self.frames_per_node, self.max_order, *self.lists()))

    def is_free(self, pfn: int) -> bool:
        base = (pfn // self.frames_per_node) * self.frames_per_node
        for k in range(self.max_order + 1):
            head = base + ((pfn - base) & ~((1 << k) - 1))
            if self.free_order[head] == k + 1:
                return True
        return False

    def free_pages(self, node: int | None = None) -> int:
        per_order = self.nr_free << np.arange(self.max_order + 1)
        return int(per_order.sum() if node is None else per_order[node].sum())

    def free_blocks(self, node: int) -> list[np.ndarray]:
        """The free heads of each order on ``node`` (walks the lists; for tests and stats)."""
        out = []
        for k in range(self.max_order + 1):
            heads, pfn = [], self.free_head[node, k]
            while pfn >= 0:
                heads.append(pfn)
                pfn = self.nxt[pfn]
            out.append(np.array(heads, np.int64))
        return out
