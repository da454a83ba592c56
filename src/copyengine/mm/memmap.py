"""mem_map: per-frame metadata as struct-of-arrays, like the kernel's array of struct page."""
from __future__ import annotations

import numpy as np

# Re-exported: the flags describe mem_map entries, and importers look for them here.
from .pageflags import (OWNER_NONE, OWNER_ZERO_PAGE, PG_allocated, PG_anon, PG_head, PG_hwpoison,
                        PG_isolated, PG_locked, PG_nonzero, PG_reserved, PG_swapbacked)
from .folio_ops import prep_new_folios as _prep_new_folios


__all__ = ["MemMap", "OWNER_NONE", "OWNER_ZERO_PAGE", "PG_allocated", "PG_anon", "PG_head",
           "PG_hwpoison", "PG_isolated", "PG_locked", "PG_nonzero", "PG_reserved", "PG_swapbacked"]


class MemMap:
    """Arrays indexed by page frame number.

    ``head``/``order`` say which folio a frame belongs to (tails point at their head);
    ``refcount`` and ``pincount`` are meaningful on heads, ``mapcount`` per page (PTEs
    mapping that page); ``owner`` is folio->mapping (an object id), ``index`` folio->index
    per page (page offset inside the owner); ``private`` is page->private.
    ``np.zeros`` keeps untouched metadata out of host memory, like the frames.
    """

    def __init__(self, nframes: int):
        self.nframes = nframes
        self.flags = np.zeros(nframes, np.uint32)
        self.refcount = np.zeros(nframes, np.int32)
        self.pincount = np.zeros(nframes, np.int32)
        self.mapcount = np.zeros(nframes, np.int32)
        self.order = np.zeros(nframes, np.int8)
        self.head = np.zeros(nframes, np.int64)
        self.owner = np.zeros(nframes, np.int64)
        self.index = np.zeros(nframes, np.int64)
        self.private = np.zeros(nframes, np.int64)

    def folio_pages(self, heads: np.ndarray, orders: np.ndarray) -> np.ndarray:
        """All pfns of the given folios, folio after folio."""
        nr = np.left_shift(1, orders.astype(np.int64))
        if len(nr) and nr.max() == 1:
            return heads.astype(np.int64, copy=True)
        starts = np.repeat(heads.astype(np.int64), nr)
        offs = np.arange(int(nr.sum()), dtype=np.int64) - np.repeat(np.cumsum(nr) - nr, nr)
        return starts + offs

    def arrays(self):
        """The metadata arrays in the order compiled loops take them."""
        return (self.flags, self.refcount, self.pincount, self.mapcount, self.order, self.head,
                self.owner, self.index, self.private)

    def prep_new_folios(self, heads: np.ndarray, order: int, extra=0) -> None:
        """Metadata of freshly allocated folios (prep_new_page)."""
        _prep_new_folios(np.ascontiguousarray(heads, dtype=np.int64), order, np.uint32(extra),
                        *self.arrays())

