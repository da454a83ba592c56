"""Page flags (a subset of the kernel's page-flags.h, plus what the model needs) and owner values."""
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
PG_partially_mapped = np.uint32(1 << 9)  # anon large folio on the deferred split queue (head only)

# owner values that are not ids of an anon_vma or shmem object
OWNER_NONE = 0        # free, or allocated but not yet mapped (a migration destination)
OWNER_ZERO_PAGE = -1
OWNER_QUARANTINE = -2  # a destination an engine may still write (migrate/quarantine.py)
