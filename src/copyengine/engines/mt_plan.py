"""How ``mt[:N]`` cuts a batch into chunks, copies a stretch of it, and which thread
copied what when: the planning half of :mod:`copyengine.engines.mt` (which holds the
threads that claim the chunks).

A batch is a stream of bytes (its descriptors in job order, a poisoned folio's counting
0: they are never read). :func:`_plan` validates the job and cuts that stream into chunks
(cache-line-aligned pieces of folios when there are fewer folios than threads, else
blocks of whole folios); :func:`_copy_span` copies any stretch of it; :func:`plan` shows
the chunks of a job from Python, and :func:`chunk_spans` turns the per-chunk stamps the
threads write while a trace recorder is attached into one span per thread.
"""
from __future__ import annotations

import numpy as np
from numba import njit

from ..errors import EHWPOISON
from .memops import copy as _copy
from .memops import store_fence

CACHE_LINE = 64
CHUNKS_PER_THREAD = 16   # chunks per thread (more: a late thread still finds work)
MIN_CHUNK = 16 << 10     # below this a claim's cost would show
#: largest chunk of whole folios (a 2 MiB folio is one chunk whatever this says)
MAX_CHUNK = 8 << 20
#: below this the caller copies alone: a wake (futex, an idle vCPU: 15-20 us here) costs
#: more than it saves (hot 64 KiB: 6.6 us alone, 21 with 2 threads; 1 MiB: 28 vs 40 us)
SOLO_BYTES = 1 << 20


@njit(cache=True, nogil=True)
def _plan(memlen, src_off, dst_off, nbytes, folio, poisoned, nthreads, result, prefix, edges):
    """Validate the job, fill ``result`` and cut the batch into chunks.

    ``prefix[i]`` is where descriptor i starts in the stream of bytes to copy (the
    descriptors of poisoned folios count 0 bytes: they are never read); chunk k is
    ``edges[k]`` .. ``edges[k+1]`` of that stream. Returns ``(runs, nchunks)`` (a run:
    consecutive descriptors of one folio with bytes to copy), or ``(-(i+1), 0)`` for a
    bad descriptor i.
    """
    nfolios = poisoned.shape[0]
    for f in range(nfolios):
        result[f] = -EHWPOISON if poisoned[f] else 0
    total = 0
    runs = 0
    last = -1
    prefix[0] = 0
    ndesc = nbytes.shape[0]
    for i in range(ndesc):
        f = folio[i]
        n = nbytes[i]
        s = src_off[i]
        d = dst_off[i]
        if f < 0 or f >= nfolios or n < 0 or s < 0 or d < 0 or s + n > memlen or d + n > memlen:
            return -(i + 1), 0
        if poisoned[f]:
            n = 0
        if n > 0 and f != last:
            runs += 1
            last = f
        total += n
        prefix[i + 1] = total
    edges[0] = 0
    if total == 0:
        return runs, 0
    if nthreads == 1 or total < SOLO_BYTES:
        edges[1] = total
        return runs, 1
    share = total // (nthreads * CHUNKS_PER_THREAD)
    nchunks = 0
    if runs < nthreads:
        # fewer folios than threads: cut folios into cache-line-aligned chunks
        chunk = max(MIN_CHUNK, share + CACHE_LINE - 1 - (share + CACHE_LINE - 1) % CACHE_LINE)
        x = chunk
        while x < total:
            nchunks += 1
            edges[nchunks] = x
            x += chunk
    else:
        # whole folios: cut at the first run edge at least a chunk past the last cut
        chunk = min(MAX_CHUNK, max(MIN_CHUNK, share))
        last = -1
        for i in range(ndesc):
            if prefix[i + 1] > prefix[i]:
                if folio[i] != last and prefix[i] - edges[nchunks] >= chunk:
                    nchunks += 1
                    edges[nchunks] = prefix[i]
                last = folio[i]
    nchunks += 1
    edges[nchunks] = total
    return runs, nchunks


@njit(cache=True, nogil=True)
def _find(prefix, ndesc, x):
    """The descriptor whose bytes hold stream position x: the last i with prefix[i] <= x
    (so zero-length descriptors at x are skipped)."""
    lo = 0
    hi = ndesc
    while hi - lo > 1:
        mid = (lo + hi) >> 1
        if prefix[mid] <= x:
            lo = mid
        else:
            hi = mid
    return lo


@njit(cache=True, nogil=True)
def _copy_span(mem, src_off, dst_off, prefix, ndesc, lo, hi, nt):
    """Copy stream bytes [lo, hi): the tail of one descriptor, whole ones, a head."""
    if lo >= hi:
        return
    i = _find(prefix, ndesc, lo)
    run_d = run_s = run_n = 0  # pieces contiguous on both sides are copied as one run
    while lo < hi:
        end = prefix[i + 1]
        if end > lo:
            off = lo - prefix[i]
            n = min(end, hi) - lo
            d, s = dst_off[i] + off, src_off[i] + off
            if run_n and d == run_d + run_n and s == run_s + run_n:
                run_n += n
            else:
                if run_n:
                    _copy(mem, run_d, run_s, run_n, nt)
                run_d, run_s, run_n = d, s, n
            lo += n
        i += 1
    if run_n:
        _copy(mem, run_d, run_s, run_n, nt)
    if nt:
        store_fence()   # once per chunk, before the chunk is counted done


def plan(job, nthreads):
    """The chunks ``mt:nthreads`` cuts ``job`` into, without copying: a list with one entry
    per chunk, in the order they are claimed, each a list of ``(folio, first_byte,
    end_byte)`` pieces (byte offsets within the folio's bytes, its descriptors taken in
    job order). Which thread copies a chunk is decided while copying."""
    ndesc = len(job.nbytes)
    prefix = np.empty(ndesc + 1, np.int64)
    edges = np.empty(ndesc + nthreads * CHUNKS_PER_THREAD + 3, np.int64)
    rc, nchunks = _plan(len(job.mem), job.src_off, job.dst_off, job.nbytes, job.folio,
                        job.src_poisoned, nthreads, np.empty(job.nr_folios, np.int32), prefix, edges)
    if rc < 0:
        raise ValueError(f"bad descriptor {-rc - 1}")
    within, seen = [], {}     # where each descriptor starts within its folio
    for i, f in enumerate(job.folio.tolist()):
        within.append(seen.get(f, 0))
        seen[f] = within[-1] + int(prefix[i + 1] - prefix[i])
    out = []
    for k in range(nchunks):
        lo, hi, pieces = int(edges[k]), int(edges[k + 1]), []
        for i in range(ndesc):
            a, b = max(lo, int(prefix[i])), min(hi, int(prefix[i + 1]))
            if a < b:
                f, base = int(job.folio[i]), within[i] - int(prefix[i])
                if pieces and pieces[-1][0] == f and pieces[-1][2] == a + base:
                    pieces[-1] = (f, pieces[-1][1], b + base)
                else:
                    pieces.append((f, a + base, b + base))
        out.append(pieces)
    return out


#: per chunk, while spans are wanted: the copying thread + 1 (0: nobody), then two
#: timespecs (sec, nsec) of CLOCK_MONOTONIC -- when the copy started and when it ended
STAMP = 5


@njit(cache=True, nogil=True)
def _lanes(stamps, nchunks, edges, prefix, folio, out):
    """Row L of ``out`` for thread L: its first chunk's start and last chunk's end (ns of
    CLOCK_MONOTONIC) and the folios its chunks touched (a folio is counted again only
    where another folio came between: the framework's jobs list a folio's descriptors
    together). Compiled: the bench records every run, so this must cost next to nothing."""
    out[:, 0] = np.iinfo(np.int64).max
    out[:, 1:3] = 0
    out[:, 3] = -1          # the last folio the thread touched
    ndesc = folio.shape[0]
    for k in range(nchunks):
        lane = stamps[STAMP * k] - 1
        if lane < 0 or lane >= out.shape[0]:
            continue
        out[lane, 0] = min(out[lane, 0], stamps[STAMP * k + 1] * 1_000_000_000 + stamps[STAMP * k + 2])
        out[lane, 1] = max(out[lane, 1], stamps[STAMP * k + 3] * 1_000_000_000 + stamps[STAMP * k + 4])
        i = _find(prefix, ndesc, edges[k])
        while i < ndesc and prefix[i] < edges[k + 1]:
            if prefix[i + 1] > prefix[i] and folio[i] != out[lane, 3]:
                out[lane, 2] += 1
                out[lane, 3] = folio[i]
            i += 1


def chunk_spans(stamps, nchunks, edges, prefix, folio, nthreads):
    """One ``(lane, t0, t1, folios)`` span per thread that copied chunks of a batch:
    "mt worker K" (K=0: the calling thread) from its first chunk's start to its last
    chunk's end, in ``time.perf_counter()`` seconds (on Linux that clock is
    CLOCK_MONOTONIC, the one the threads read), and how many folios its chunks touched."""
    out = np.empty((nthreads, 4), np.int64)
    _lanes(stamps, nchunks, edges, prefix, folio, out)
    return [(f"mt worker {k}", t0 / 1e9, t1 / 1e9, n) for k, (t0, t1, n, _) in enumerate(out.tolist()) if t1]
