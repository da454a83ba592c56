"""Page-table entry words: a frame number and a few bits, like an x86 PTE.

A PTE is a uint64: ``pfn << PFN_SHIFT | bits``. Zero is pte_none (never touched). A
migration entry is a non-present PTE that still names the source frame and remembers
whether the mapping was writable (the kernel's writable/readable migration entries).
"""
import numpy as np

PTE_PRESENT = np.uint64(1 << 0)
PTE_WRITE = np.uint64(1 << 1)
PTE_MIGRATION = np.uint64(1 << 2)
PFN_SHIFT = np.uint64(4)
PTE_FLAGS = np.uint64((1 << 4) - 1)


def pte_pfn(ptes):
    """Frame numbers named by PTE words (present or migration entries) as int64."""
    return (np.asarray(ptes, dtype=np.uint64) >> PFN_SHIFT).astype(np.int64)


def mk_pte(pfns, bits):
    return (np.asarray(pfns, dtype=np.uint64) << PFN_SHIFT) | np.uint64(bits)
