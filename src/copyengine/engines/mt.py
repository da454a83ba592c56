"""``mt[:N]``: multi-threaded batch copy, in the spirit of copy_page_lists_mt.

The series' copy_page_lists_mt() splits one batch over N kernel threads. A fixed split
waits for its slowest thread: on a busy host a thread the scheduler has not run yet holds
the whole batch (with one CPU-bound process beside it on 2 cores, a static 2-way split ran
8x slower than one thread). So here the batch is cut into **chunks that threads claim**
from a shared counter (an atomic compare-and-swap), and the calling thread claims too:

* **fewer folios than threads** -- folios are cut into cache-line-aligned chunks so that
  every thread can work (one 2 MiB folio and 2 threads: 32 chunks of 64 KiB); a chunk may
  end in one folio and go on in the next.
* **at least as many folios as threads** -- a chunk is a contiguous block of whole folios
  (a run of descriptors of one folio is never cut), at least the chunk size in bytes, so
  a batch of mixed folio sizes is shared by bytes, not by folio count.

The chunk size is about ``1/(16 N)`` of the batch (between :data:`MIN_CHUNK` and
:data:`MAX_CHUNK`), so a thread that comes late finds work, and a batch smaller than
:data:`SOLO_BYTES`, or ``mt:1``, is copied by the caller alone. :func:`plan` shows the
chunks.

**Threads.** ``mt:N`` keeps N-1 Python worker threads per engine, started on its first
batch; each sleeps on its own event, and on a batch runs a ``nogil`` compiled loop that
claims and copies chunks (the GIL is released for the whole loop). The caller wakes
them, claims chunks itself until none is left, and then waits only for chunks already
claimed -- by threads that are running. A worker that is never scheduled claims nothing
and holds up nothing; one that wakes after the batch finds a newer generation in the
counter (its high 32 bits) and goes back to sleep without touching memory. Every wait is
bounded: workers leave after :data:`IDLE_EXIT` seconds without a batch (the next batch
starts them again), and a caller waits at most :data:`WAIT_LIMIT` seconds for a claimed
chunk. One batch uses an engine's workers at a time; a second thread calling the same
engine meanwhile copies its batch alone. Numba's own parallel runtime (prange over a
threading layer) is not used: its parallel region ends at a barrier that every pool
thread must reach, scheduled or not, and workqueue cannot be entered by two threads.

**Copy loop.** Bytes move with ``llvm.memmove`` (libc's memmove), which on this host is
about twice as fast as an element loop over a uint64 view or a Numba slice copy. A batch
of at least :data:`NT_BYTES` (16 MiB) cannot stay in the caches anyway, so its pieces are
copied with non-temporal stores instead (32-byte vectors with LLVM's ``!nontemporal``
hint, then a fence; the seed's TODO 4). Pieces contiguous on both sides are copied as one
span. Nothing is allocated on the copy path but the result array that the protocol hands
to the caller: the work arrays (descriptor prefix sums, chunk edges) are kept per calling
thread and grown only when a larger batch arrives.

**Machine-check safety.** The engine is mc-safe: it never reads the source of a folio
marked ``src_poisoned`` (that folio's bytes are left out of the plan) and reports
``-EHWPOISON`` for it; every other folio is reported 0. The framework then runs
``folio_mc_copy`` on the poisoned folio, which reports -EHWPOISON too without reading it.

**Compilation.** The kernels use ``cache=True``: the first process ever compiles them
(a few seconds) and stores the machine code beside this file (or in Numba's user cache
directory when that is read-only); every later process loads it, compiling nothing.
"""
from __future__ import annotations

import os
import re
import threading
import time
import weakref

import numpy as np
from numba import njit

from ..errors import EHWPOISON
from ..hookspecs import hookimpl
from .base import Capabilities, Engine
from .memops import NT_BYTES, atomic_add, atomic_cas, atomic_load
from .memops import copy as _copy

CACHE_LINE = 64
#: chunks per thread the batch is cut into (more: a late thread still finds work)
CHUNKS_PER_THREAD = 16
#: smallest chunk: below it a claim's cost would show
MIN_CHUNK = 16 << 10
#: largest chunk of whole folios (a 2 MiB folio is one chunk whatever this says)
MAX_CHUNK = 8 << 20
#: a batch smaller than this is copied by the caller alone (waking a thread costs more)
SOLO_BYTES = 2 * MIN_CHUNK
#: seconds a worker sleeps without a batch before it exits
IDLE_EXIT = 5.0
#: seconds a caller waits for chunks claimed by running workers before giving up
WAIT_LIMIT = 30.0
#: polls of the done counter before the caller sleeps on the completion event
SPINS = 1 << 16
_GEN_SHIFT = 32
_IDX_MASK = (1 << _GEN_SHIFT) - 1


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


@njit(cache=True, nogil=True)
def _solo(mem, src_off, dst_off, prefix, ndesc, total, nt_bytes):
    """The whole stream on the calling thread."""
    _copy_span(mem, src_off, dst_off, prefix, ndesc, 0, total, total >= nt_bytes)


@njit(cache=True, nogil=True)
def _claim_and_copy(mem, src_off, dst_off, prefix, ndesc, edges, nchunks, nt_bytes, ctl, gen):
    """Claim chunks of generation ``gen`` from ``ctl[0]`` (generation << 32 | next chunk)
    until none is left, copying each and counting it done in ``ctl[1]``. A thread that
    arrives after its batch sees another generation (or no chunk left) and copies
    nothing. Returns the number of chunks this thread copied."""
    nt = edges[nchunks] >= nt_bytes
    mine = 0
    while True:
        v = atomic_load(ctl, 0)
        if (v >> _GEN_SHIFT) != gen:
            break
        k = v & _IDX_MASK
        if k >= nchunks:
            break
        if atomic_cas(ctl, 0, v, v + 1) != v:
            continue
        _copy_span(mem, src_off, dst_off, prefix, ndesc, edges[k], edges[k + 1], nt)
        atomic_add(ctl, 1, 1)
        mine += 1
    return mine


@njit(cache=True, nogil=True)
def _spin_done(ctl, nchunks, spins):
    """Poll ``ctl[1]`` (chunks done) up to ``spins`` times: True once all are done."""
    for _ in range(spins):
        if atomic_load(ctl, 1) >= nchunks:
            return True
    return False


# ----------------------------------------------------------------------------- threads
class _Pool:
    """The N-1 worker threads of one engine, and the counter they claim chunks from.

    ``ctl[0]`` is generation << 32 | next chunk, ``ctl[1]`` chunks done. ``batch`` is
    what the current generation copies (read by a worker once per wake-up); it is
    cleared when the batch ends so that no memory stays referenced."""

    def __init__(self, nworkers):
        self.nworkers = nworkers
        self.pid = os.getpid()
        self.busy = threading.Lock()        # one batch at a time
        self.state = threading.Lock()       # threads starting and leaving
        self.ctl = np.zeros(2, np.int64)
        self.gen = 0
        self.batch = None
        self.done = threading.Event()
        self.go = [threading.Event() for _ in range(nworkers)]
        self.threads = [None] * nworkers
        self.closed = False

    def _worker(self, i):
        go = self.go[i]
        while True:
            if not go.wait(IDLE_EXIT):
                with self.state:            # leave, unless woken meanwhile
                    if not go.is_set():
                        self.threads[i] = None
                        return
                continue
            go.clear()
            if self.closed:
                return
            batch = self.batch
            if batch is None:
                continue
            gen, args = batch
            batch = None
            _claim_and_copy(*args, self.ctl, gen)
            nchunks = args[6]
            args = None
            if gen == self.gen and self.ctl[1] >= nchunks:
                self.done.set()

    def _wake(self):
        with self.state:
            for i in range(self.nworkers):
                if self.threads[i] is None:
                    t = threading.Thread(target=self._worker, args=(i,), daemon=True,
                                         name=f"copyengine-mt-{i + 1}")
                    self.threads[i] = t
                    t.start()
                self.go[i].set()

    def run(self, args):
        """Copy one batch with the workers; the caller holds ``busy``."""
        nchunks = args[6]
        ctl = self.ctl
        self.gen = gen = (self.gen + 1) & 0x7FFFFFFF
        ctl[1] = 0
        self.done.clear()
        self.batch = (gen, args)
        ctl[0] = gen << _GEN_SHIFT          # publish: chunks can be claimed from here on
        self._wake()
        try:
            _claim_and_copy(*args, ctl, gen)
            # Every chunk is claimed; wait for those that running workers hold.
            if not _spin_done(ctl, nchunks, SPINS):
                deadline = time.monotonic() + WAIT_LIMIT
                while ctl[1] < nchunks:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"mt: a copy thread held a chunk for more than "
                                           f"{WAIT_LIMIT} s")
                    if self.done.wait(0.01):
                        self.done.clear()
        finally:
            self.batch = None

    def close(self):
        self.closed = True
        for go in self.go:
            go.set()


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def max_threads() -> int:
    """The most threads ``mt:N`` may ask for: the CPUs this process may use."""
    return max(1, cpu_count())


def check_threads(n: int) -> int:
    """``n`` if this machine can run that many threads, else ValueError naming the maximum."""
    limit = max_threads()
    if n < 1:
        raise ValueError(f"mt:{n}: the number of threads must be at least 1 (maximum {limit})")
    if n > limit:
        raise ValueError(f"mt:{n} asks for {n} threads; the maximum on this machine is {limit} "
                         f"({cpu_count()} CPUs usable by this process)")
    return n


def parse_threads(arg) -> int:
    """The argument of ``mt[:N]``: ``None`` -> every usable CPU; ``"N"`` -> N."""
    if arg is None:
        return max_threads()
    if not isinstance(arg, str) or not re.fullmatch(r"[0-9]+", arg):
        raise ValueError(f"mt:{arg}: the argument is a number of threads, 1..{max_threads()}")
    return check_threads(int(arg))


class MtEngine(Engine):
    """Synchronous, mc-safe; the caller and ``nthreads - 1`` workers claim chunks."""

    def __init__(self, nthreads: int):
        self.nthreads = check_threads(int(nthreads))
        self.capabilities = Capabilities(asynchronous=False, threads=self.nthreads, mc_safe=True)
        self._tls = threading.local()
        self.nt_bytes = NT_BYTES
        self._pool = None
        self._pool_lock = threading.Lock()

    def _work(self, ndesc):
        """This thread's work arrays (prefix sums, chunk edges), grown when too small."""
        tls = self._tls
        prefix = getattr(tls, "prefix", None)
        if prefix is None or prefix.shape[0] <= ndesc:
            size = max(ndesc + 1, 2 * (prefix.shape[0] if prefix is not None else 256))
            tls.prefix = prefix = np.empty(size, np.int64)
            tls.edges = np.empty(size + self.nthreads * CHUNKS_PER_THREAD + 2, np.int64)
        return prefix, tls.edges

    def _workers(self):
        """This engine's pool, made on the first parallel batch (again in a forked child:
        threads do not survive fork)."""
        pool = self._pool
        if pool is None or pool.pid != os.getpid():
            with self._pool_lock:
                pool = self._pool
                if pool is None or pool.pid != os.getpid():
                    pool = self._pool = _Pool(self.nthreads - 1)
                    weakref.finalize(self, pool.close)
        return pool

    def copy(self, job):
        mem = job.mem
        if mem.dtype != np.uint8 or mem.ndim != 1 or not (mem.flags.c_contiguous and mem.flags.writeable):
            raise TypeError("job.mem must be a writable, contiguous 1-D uint8 array")
        result = np.empty(job.nr_folios, np.int32)
        ndesc = len(job.nbytes)
        prefix, edges = self._work(ndesc)
        rc, nchunks = _plan(mem.shape[0], job.src_off, job.dst_off, job.nbytes, job.folio,
                            job.src_poisoned, self.nthreads, result, prefix, edges)
        if rc < 0:
            i = -rc - 1
            raise ValueError(f"bad descriptor {i}: src_off={int(job.src_off[i])} "
                             f"dst_off={int(job.dst_off[i])} nbytes={int(job.nbytes[i])} "
                             f"folio={int(job.folio[i])} (memory {len(job.mem)} bytes, "
                             f"{job.nr_folios} folios)")
        if nchunks == 0:
            return result
        args = (mem, job.src_off, job.dst_off, prefix, ndesc, edges, nchunks, self.nt_bytes)
        if nchunks > 1:
            pool = self._workers()
            if pool.busy.acquire(blocking=False):
                try:
                    pool.run(args)
                finally:
                    pool.busy.release()
                return result
        # one chunk, or another thread is using the workers: this thread copies alone
        _solo(mem, job.src_off, job.dst_off, prefix, ndesc, edges[nchunks], self.nt_bytes)
        return result

    def plan(self, job):
        """The chunks ``copy(job)`` makes: see :func:`plan`."""
        return plan(job, self.nthreads)

    def describe(self):
        pool = self._pool
        alive = sum(t is not None for t in pool.threads) if pool is not None else 0
        return {"threading_layer": "python-threads", "threads": self.nthreads,
                "max_threads": max_threads(), "workers_running": alive}

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def plan(job, nthreads):
    """The chunks ``mt:nthreads`` cuts ``job`` into, without copying: a list with one entry
    per chunk, in the order they are claimed, each a list of ``(folio, first_byte,
    end_byte)`` pieces (byte offsets within the folio's bytes, its descriptors taken in
    job order). Which thread copies a chunk is decided while copying."""
    ndesc = len(job.nbytes)
    prefix = np.empty(ndesc + 1, np.int64)
    edges = np.empty(ndesc + nthreads * CHUNKS_PER_THREAD + 3, np.int64)
    result = np.empty(job.nr_folios, np.int32)
    rc, nchunks = _plan(len(job.mem), job.src_off, job.dst_off, job.nbytes, job.folio,
                        job.src_poisoned, nthreads, result, prefix, edges)
    if rc < 0:
        raise ValueError(f"bad descriptor {-rc - 1}")
    within = np.zeros(ndesc, np.int64)   # where each descriptor starts within its folio
    seen = {}
    for i in range(ndesc):
        f = int(job.folio[i])
        within[i] = seen.get(f, 0)
        seen[f] = within[i] + (prefix[i + 1] - prefix[i])
    out = []
    for k in range(nchunks):
        lo, hi, pieces = int(edges[k]), int(edges[k + 1]), []
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
             "threads like copy_page_lists_mt: mt:N threads (mt = every usable CPU) claim "
             "chunks of the batch; fewer folios than threads cuts folios into chunks")
