"""Destinations an engine may still write: kept away from everyone until it stops.

An asynchronous engine whose cancel cannot stop it at once (a DMA channel that finishes
its current descriptor, a worker thread stuck in a copy) may write a job's destinations
after the framework gave up on the job. The kernel's dmaengine_terminate_sync waits for
that; here the job's folios are undone at once (their PTEs go back to the sources) and
their destination frames are *quarantined*: allocated, owned by nobody
(``OWNER_QUARANTINE``), never handed out, until the engine calls ``Completion.retire()``.
Quarantined frames are released at the next migration, by :func:`release_quarantine`, or
at ``Machine.close()``. vmstat counts ``copy_quarantined_pages`` (ever) and
``nr_quarantined_pages`` (now).
"""
from __future__ import annotations

import time

import numpy as np

from ..mm.pageflags import OWNER_QUARANTINE, PG_nonzero


def quarantine_folios(m, completion, heads, order) -> None:
    """Keep the folios ``heads`` (order ``order``, their metadata as prep_new_page left it)
    out of the allocator until ``completion`` is retired."""
    heads = np.ascontiguousarray(heads, np.int64)
    if not len(heads):
        return
    mm = m.mem_map
    mm.prep_new_folios(heads, order, PG_nonzero)  # a late write may land: zero them before reuse
    mm.owner[m.mem_map.folio_pages(heads, np.full(len(heads), order, np.int8))] = OWNER_QUARANTINE
    m.quarantine.append((completion, heads))
    n = len(heads) << order
    m.count("copy_quarantined_pages", n)
    m.count("nr_quarantined_pages", n)


def release_quarantine(m, timeout: float = 0.0) -> int:
    """Free the quarantined folios whose engine has retired its job, waiting up to
    ``timeout`` seconds in all for the others. Call with the machine lock held. Returns
    the base pages still quarantined."""
    if not m.quarantine:
        return 0
    deadline = time.monotonic() + timeout
    keep = []
    for completion, heads in m.quarantine:
        left = deadline - time.monotonic()
        if completion.retired() or (left > 0 and completion._retired.wait(left)):
            pages = int((np.left_shift(1, m.mem_map.order[heads].astype(np.int64))).sum())
            mm = m.mem_map
            mm.flags[mm.folio_pages(heads, mm.order[heads])] |= PG_nonzero  # written late: zero before reuse
            m.free_folios(heads)
            m.count("nr_quarantined_pages", -pages)
        else:
            keep.append((completion, heads))
    m.quarantine[:] = keep
    return int(m._vmstat["nr_quarantined_pages"])
