"""``mt[:N]``: multi-threaded batch copy with Numba, in the spirit of copy_page_lists_mt.

The series' copy_page_lists_mt() splits one batch over N kernel threads in one of two ways,
and so does this engine:

* **fewer folios than threads** — every folio is cut into chunks so that all N threads
  work (one 2 MiB folio and 4 threads: four 512 KiB chunks). Here the bytes of the batch
  are cut into N equal spans at 64-byte (cache line) granularity, so a chunk may end in
  one folio and go on in the next.
* **at least as many folios as threads** — each thread takes a contiguous block of whole
  folios. Block edges are the folio boundaries nearest the N equal byte splits, so a batch
  of mixed folio sizes stays balanced by bytes, not by folio count.

The plan (spans per thread) and the copy run in one compiled call (``_mt_copy``): the
plan is serial, then ``prange`` runs one span per thread (when only one span has bytes,
as in a job smaller than a cache line per thread, it is copied on the calling thread
without starting a parallel region). :func:`plan` shows the split.

**Copy loop.** Bytes move with ``llvm.memmove`` (libc's memmove), which on this host is
about twice as fast as an element loop over a uint64 view or a Numba slice copy. A batch
of at least :data:`NT_BYTES` (16 MiB) cannot stay in the caches anyway, so its pieces are
copied with non-temporal stores instead (32-byte vectors with LLVM's ``!nontemporal``
hint, then a fence; the seed's TODO 4): libc only makes that choice for one copy larger
than ~3/4 of the shared cache, never for the 2 MiB pieces of a batch, and a
read-for-ownership of every destination line costs about a third of the bandwidth.
Nothing is allocated on the copy path but the result array that the protocol hands to the
caller: the per-thread work arrays (descriptor prefix sums, span edges) are kept per
calling thread and grown only when a larger batch arrives.

**Machine-check safety.** The engine is mc-safe: it never reads the source of a folio
marked ``src_poisoned`` (that folio's bytes are left out of the plan) and reports
``-EHWPOISON`` for it; every other folio is reported 0. The framework then runs
``folio_mc_copy`` on the poisoned folio, which reports -EHWPOISON too without reading it.

**Threading layer.** Numba picks it once per process (``NUMBA_THREADING_LAYER``; by
default the first of tbb, omp, workqueue that loads). ``omp`` costs about 2 us per
parallel call; ``workqueue`` about 80 us and it aborts the process when two threads enter
a parallel region at once, so while it is the layer in use every parallel call of this
engine holds one process-wide lock. Creating an engine starts the layer (no compilation),
so :meth:`MtEngine.describe` names the real one. Note that GNU OpenMP (``omp``) is not
fork-safe: a child of ``os.fork()`` must not run parallel code (use ``subprocess`` or the
``spawn`` start method).

**Compilation.** The kernels use ``cache=True``: the first process ever compiles them
(a few seconds) and stores the machine code beside this file (or in Numba's user cache
directory when that is read-only); every later process loads it, compiling nothing.
"""
from __future__ import annotations

import contextlib
import os
import re
import threading

import numpy as np
from numba import njit, prange

from ..errors import EHWPOISON, EngineUnavailable
from ..hookspecs import hookimpl
from .base import Capabilities, Engine
from .memops import NT_BYTES
from .memops import copy as _copy

CACHE_LINE = 64


@njit(cache=True, nogil=True)
def _plan(memlen, src_off, dst_off, nbytes, folio, poisoned, nthreads, result, prefix, cuts):
    """Validate the job, fill ``result`` and plan the spans.

    ``prefix[i]`` is where descriptor i starts in the stream of bytes to copy (the
    descriptors of poisoned folios count 0 bytes: they are never read); ``cuts[t]`` ..
    ``cuts[t+1]`` is thread t's span of that stream. Returns the number of folio runs (a
    run: consecutive descriptors of one folio) or -(i+1) for a bad descriptor i.
    """
    nfolios = poisoned.shape[0]
    for f in range(nfolios):
        result[f] = -EHWPOISON if poisoned[f] else 0
    total = 0
    runs = 0
    last = -1
    prefix[0] = 0
    for i in range(nbytes.shape[0]):
        f = folio[i]
        n = nbytes[i]
        s = src_off[i]
        d = dst_off[i]
        if f < 0 or f >= nfolios or n < 0 or s < 0 or d < 0 or s + n > memlen or d + n > memlen:
            return -(i + 1)
        if poisoned[f]:
            n = 0
        if n > 0 and f != last:
            runs += 1
            last = f
        total += n
        prefix[i + 1] = total
    cuts[0] = 0
    cuts[nthreads] = total
    ndesc = nbytes.shape[0]
    for t in range(1, nthreads):
        x = total * t // nthreads
        if runs < nthreads:
            # fewer folios than threads: cut folios into cache-line-aligned chunks
            x -= x % CACHE_LINE
        elif 0 < x < total:
            # a contiguous block of whole folios each: snap x to the nearest run edge
            i = _find(prefix, ndesc, x)
            fi = folio[i]
            a = i
            while a > 0 and (prefix[a] == prefix[a - 1] or folio[a - 1] == fi):
                a -= 1
            b = i + 1
            while b < ndesc and (prefix[b + 1] == prefix[b] or folio[b] == fi):
                b += 1
            x = prefix[a] if x - prefix[a] <= prefix[b] - x else prefix[b]
        cuts[t] = max(x, cuts[t - 1])
    return runs


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


@njit(parallel=True, cache=True, nogil=True)
def _mt_copy(mem, src_off, dst_off, nbytes, folio, poisoned, nthreads, result, prefix, cuts,
             nt_bytes):
    """Plan, then one span per thread. The caller has set Numba's thread count. A batch
    of at least ``nt_bytes`` is copied with non-temporal stores."""
    runs = _plan(mem.shape[0], src_off, dst_off, nbytes, folio, poisoned, nthreads,
                 result, prefix, cuts)
    if runs <= 0:
        return runs
    ndesc = nbytes.shape[0]
    nt = cuts[nthreads] >= nt_bytes
    busy = 0
    for t in range(nthreads):
        if cuts[t + 1] > cuts[t]:
            busy += 1
    if busy <= 1:     # one span holds everything (one thread, a tiny job): no parallel region
        _copy_span(mem, src_off, dst_off, prefix, ndesc, 0, cuts[nthreads], nt)
        return runs
    for t in prange(nthreads):
        _copy_span(mem, src_off, dst_off, prefix, ndesc, cuts[t], cuts[t + 1], nt)
    return runs


# ----------------------------------------------------------------------------- threads
_layer_lock = threading.Lock()
_no_lock = contextlib.nullcontext()
_serialize = True      # until the layer is known to be thread-safe


def _start_threading_layer() -> str:
    """Start Numba's thread pool (no compilation) and return the layer's name.
    EngineUnavailable when no threading layer can be loaded."""
    global _serialize
    from numba.np.ufunc import parallel
    try:
        parallel._launch_threads()
        layer = parallel.threading_layer()
    except (ValueError, ImportError, OSError) as e:
        raise EngineUnavailable(f"mt needs a Numba threading layer: {e}".strip()) from None
    _serialize = layer == "workqueue"
    return layer


def _thread_count_functions():
    """(get, set) of the calling thread's Numba thread count. The public functions
    re-check the layer under two locks on every call (~1.5 us each); once the layer is
    started (and ``mt:N`` validated against NUMBA_NUM_THREADS) the runtime's own entry
    points are equivalent and ten times cheaper."""
    import numba
    from numba.np.ufunc import parallel
    get = getattr(parallel, "_get_num_threads", None)
    put = getattr(parallel, "_set_num_threads", None)
    if get is None or put is None:  # pragma: no cover - another Numba layout
        return numba.get_num_threads, numba.set_num_threads
    return get, put


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def _numba_threads() -> int:
    from numba.core import config
    return int(config.NUMBA_NUM_THREADS)


def max_threads() -> int:
    """The most threads ``mt:N`` may ask for: CPUs this process may use, capped by Numba's
    thread pool (NUMBA_NUM_THREADS)."""
    return max(1, min(cpu_count(), _numba_threads()))


def check_threads(n: int) -> int:
    """``n`` if this machine can run that many threads, else ValueError naming the maximum."""
    limit = max_threads()
    if n < 1:
        raise ValueError(f"mt:{n}: the number of threads must be at least 1 (maximum {limit})")
    if n > limit:
        raise ValueError(f"mt:{n} asks for {n} threads; the maximum on this machine is {limit} "
                         f"({cpu_count()} CPUs usable by this process, "
                         f"NUMBA_NUM_THREADS={_numba_threads()})")
    return n


def parse_threads(arg) -> int:
    """The argument of ``mt[:N]``: ``None`` -> every usable CPU; ``"N"`` -> N."""
    if arg is None:
        return max_threads()
    if not isinstance(arg, str) or not re.fullmatch(r"[0-9]+", arg):
        raise ValueError(f"mt:{arg}: the argument is a number of threads, 1..{max_threads()}")
    return check_threads(int(arg))


class MtEngine(Engine):
    """Synchronous, mc-safe, ``nthreads`` Numba threads per batch."""

    def __init__(self, nthreads: int):
        self.nthreads = check_threads(int(nthreads))
        self.capabilities = Capabilities(asynchronous=False, threads=self.nthreads, mc_safe=True)
        self.layer = _start_threading_layer()
        self._get_threads, self._set_threads = _thread_count_functions()
        self._tls = threading.local()
        self.nt_bytes = NT_BYTES

    def _work(self, ndesc):
        """This thread's work arrays (prefix sums, span edges), grown when too small."""
        tls = self._tls
        prefix = getattr(tls, "prefix", None)
        if prefix is None or prefix.shape[0] <= ndesc:
            prefix = tls.prefix = np.empty(max(ndesc + 1, 2 * (prefix.shape[0] if prefix is not None else 256)),
                                           np.int64)
            tls.cuts = np.empty(self.nthreads + 1, np.int64)
        return prefix, tls.cuts

    def copy(self, job):
        mem = job.mem
        if mem.dtype != np.uint8 or mem.ndim != 1 or not (mem.flags.c_contiguous and mem.flags.writeable):
            raise TypeError("job.mem must be a writable, contiguous 1-D uint8 array")
        result = np.empty(job.nr_folios, np.int32)
        prefix, cuts = self._work(len(job.nbytes))
        n = self.nthreads
        # Numba's thread count is per calling thread: set ours for the call, then restore.
        old = self._get_threads() if n > 1 else n
        if old != n:
            self._set_threads(n)
        try:
            with _layer_lock if _serialize else _no_lock:
                rc = _mt_copy(mem, job.src_off, job.dst_off, job.nbytes, job.folio,
                              job.src_poisoned, n, result, prefix, cuts, self.nt_bytes)
        finally:
            if old != n:
                self._set_threads(old)
        if rc < 0:
            i = -rc - 1
            raise ValueError(f"bad descriptor {i}: src_off={int(job.src_off[i])} "
                             f"dst_off={int(job.dst_off[i])} nbytes={int(job.nbytes[i])} "
                             f"folio={int(job.folio[i])} (memory {len(job.mem)} bytes, "
                             f"{job.nr_folios} folios)")
        return result

    def plan(self, job):
        """The split ``copy(job)`` makes: see :func:`plan`."""
        return plan(job, self.nthreads)

    def describe(self):
        return {"threading_layer": self.layer, "threads": self.nthreads,
                "max_threads": max_threads(), "serialized": bool(_serialize)}


def plan(job, nthreads):
    """The split ``mt:nthreads`` makes of ``job``, without copying (no threads needed): a
    list with one entry per thread, each a list of ``(folio, first_byte, end_byte)`` pieces
    (byte offsets within the folio's bytes, its descriptors taken in job order)."""
    ndesc = len(job.nbytes)
    prefix = np.empty(ndesc + 1, np.int64)
    cuts = np.empty(nthreads + 1, np.int64)
    result = np.empty(job.nr_folios, np.int32)
    rc = _plan(len(job.mem), job.src_off, job.dst_off, job.nbytes, job.folio,
               job.src_poisoned, nthreads, result, prefix, cuts)
    if rc < 0:
        raise ValueError(f"bad descriptor {-rc - 1}")
    within = np.zeros(ndesc, np.int64)   # where each descriptor starts within its folio
    seen = {}
    for i in range(ndesc):
        f = int(job.folio[i])
        within[i] = seen.get(f, 0)
        seen[f] = within[i] + (prefix[i + 1] - prefix[i])
    out = []
    for t in range(nthreads):
        lo, hi, pieces = int(cuts[t]), int(cuts[t + 1]), []
        for i in range(ndesc):
            a, b = max(lo, int(prefix[i])), min(hi, int(prefix[i + 1]))
            if a < b:
                f = int(job.folio[i])
                base = int(within[i]) - int(prefix[i])
                if pieces and pieces[-1][0] == f and pieces[-1][2] == a + base:
                    pieces[-1] = (f, pieces[-1][1], b + base)
                else:
                    pieces.append((f, a + base, b + base))
        out.append(pieces)
    return out


def make_mt(arg, machine):
    return MtEngine(parse_threads(arg))


@hookimpl
def copyengine_register_engines(register):
    register("mt", make_mt,
             "Numba threads, like copy_page_lists_mt: mt:N threads (mt = every usable CPU); "
             "fewer folios than threads cuts folios into chunks")
