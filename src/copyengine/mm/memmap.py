"""mem_map: per-frame metadata as struct-of-arrays, like the kernel's array of struct page."""
from __future__ import annotations

import numpy as np

# Page flags (a subset of the kernel's, plus what the model needs).
PG_locked = np.uint32(1 << 0)      # folio lock, held across unmap..finalize of a migration
PG_hwpoison = np.uint32(1 << 1)    # hardware poisoned: never read, never handed out again
PG_head = np.uint32(1 << 2)        # head page of an allocated folio
PG_reserved = np.uint32(1 << 3)    # never freed (the zero page)
PG_anon = np.uint32(1 << 4)        # private anonymous memory (owner is an anon_vma)
PG_swapbacked = np.uint32(1 << 5)  # shared anonymous memory (owner is a shmem object)
PG_isolated = np.uint32(1 << 6)    # taken off the LRU for migration (folio_isolate_lru)
PG_nonzero = np.uint32(1 << 7)     # contents may be non-zero: zero before handing out as anon
PG_allocated = np.uint32(1 << 8)   # frame belongs to an allocated folio (not free in buddy)

# owner values that are not ids of an anon_vma or shmem object
OWNER_NONE = 0        # free, or allocated but not yet mapped (a migration destination)
OWNER_ZERO_PAGE = -1


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

    def prep_new_folios(self, heads: np.ndarray, order: int) -> np.ndarray:
        """Metadata of freshly allocated folios (prep_new_page): returns their pfns."""
        nr = 1 << order
        pfns = (heads[:, None] + np.arange(nr, dtype=np.int64)[None, :]).ravel() if nr > 1 else heads
        self.head[pfns] = np.repeat(heads, nr) if nr > 1 else heads
        self.order[pfns] = order
        self.flags[pfns] = (self.flags[pfns] & (PG_nonzero | PG_hwpoison)) | PG_allocated
        self.flags[heads] |= PG_head
        self.refcount[heads] = 1
        self.pincount[heads] = 0
        self.mapcount[pfns] = 0
        self.owner[pfns] = OWNER_NONE
        self.index[pfns] = 0
        self.private[pfns] = 0
        return pfns
