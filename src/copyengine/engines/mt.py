"""``mt[:N]``: multi-threaded batch copy, in the spirit of copy_page_lists_mt.

copy_page_lists_mt() splits one batch over N kernel threads. A fixed split waits for its
slowest thread: on a busy host, for one the scheduler has not run (beside one CPU-bound
process on 2 cores a static 2-way split ran 8x slower than one thread). So here the batch
is cut into **chunks that threads claim** from a shared counter (compare-and-swap), the
calling thread too. With **fewer folios than threads**, folios are cut into
cache-line-aligned chunks so that every thread can work (a chunk may end in one folio and
go on in the next); with **at least as many**, a chunk is a contiguous block of whole
folios of at least the chunk size, so mixed sizes are shared by bytes, not by count. The
chunk size is about ``1/(16 N)`` of the batch (:data:`MIN_CHUNK` .. :data:`MAX_CHUNK`, in :mod:`.mt_plan`), so
a late thread still finds work; a batch under :data:`SOLO_BYTES`, or ``mt:1``, is copied
by the caller alone. :func:`plan` shows the chunks.

**Threads.** ``mt:N`` keeps N-1 worker threads per engine, started on its first batch.
Each runs one compiled ``nogil`` loop for its whole life: it sleeps on a futex in a
shared control array, and on a new batch (its arrays published there by address) claims
and copies chunks. The caller publishes, wakes them, claims chunks itself until none is
left, and then waits only for chunks already claimed -- by threads that are running. A
worker that is never scheduled claims nothing and holds up nothing; one that wakes after
the batch finds the claim word cleared (or another generation in its high 32 bits) and
reads no memory. Workers never take the GIL while they work: a Python-level worker,
preempted while holding it, would stall the caller's return to Python for a whole time
slice (measured: 0.43 GB/s against 3.3 for mt:1 at 4KiB x512 beside a busy process).
Every wait is bounded: workers leave after :data:`IDLE_EXIT` seconds without a batch (the
next batch starts them again) and a caller waits at most :data:`WAIT_LIMIT` seconds for a
claimed chunk. One batch uses an engine's workers at a time; another thread calling the
same engine meanwhile copies its batch alone. Numba's parallel runtime is not used: a
prange region ends at a barrier that every pool thread must reach, scheduled or not.
The futex calls go through libc's ``syscall``; where its number is not known here (Linux
other than x86-64 and arm64), ``mt:N`` copies on the calling thread alone.

**Copy loop** (``memops.copy``): libc's memmove, or non-temporal stores for a batch of at
least :data:`NT_BYTES` (the seed's TODO 4); pieces contiguous on both sides are one span.
Nothing is allocated on the copy path but the result array: the work arrays (prefix sums,
chunk edges) are kept per calling thread and grown only when a larger batch arrives.

**Machine-check safety.** mc-safe: the source of a folio marked ``src_poisoned`` is never
read (its bytes are left out of the plan) and it is reported ``-EHWPOISON``; every other
folio 0. The kernels use ``cache=True``: only the first process ever compiles them.

**Timeline.** When a job carries a span list (a trace recorder is attached), each chunk's
thread stamps its CLOCK_MONOTONIC start and end (libc's vDSO ``clock_gettime``, the clock
of ``time.perf_counter`` on Linux) in compiled code, and the job gets one span per thread
that copied ("mt worker 0" is the caller); otherwise the stamps cost a branch per chunk.
"""
from __future__ import annotations

import os
import platform
import re
import sys
import threading
import time
import weakref

import numpy as np
from numba import carray, njit, types

from ..hookspecs import hookimpl
from .base import Capabilities, Engine
from .memops import (NT_BYTES, address, atomic_add, atomic_cas, atomic_load, atomic_store,
                     syscall5, voidptr)
from .mt_plan import (CHUNKS_PER_THREAD, MAX_CHUNK, MIN_CHUNK, SOLO_BYTES, STAMP, _copy_span, _plan,
                      chunk_spans, plan)

#: the planning half lives in mt_plan; these names stay importable from here
__all__ = ["MtEngine", "plan", "max_threads", "check_threads", "parse_threads", "cpu_count",
           "CHUNKS_PER_THREAD", "MIN_CHUNK", "MAX_CHUNK", "SOLO_BYTES"]

IDLE_EXIT = 5.0          # seconds a worker sleeps without a batch before it exits
WAIT_LIMIT = 30.0        # seconds a caller waits for chunks claimed by running workers
SPINS = 1 << 16          # polls of the done counter before the caller sleeps on it
_GEN_SHIFT, _IDX_MASK = 32, (1 << 32) - 1


# Layout of a pool's control array (int64). The claim word is generation << 32 | next chunk;
# 0 between batches, so that a thread holding a stale view of the fields can claim nothing.
C_CLAIM, C_DONE, C_SEQ, C_CLOSED = 0, 1, 2, 3
C_MEM, C_MEMLEN, C_SRC, C_DST, C_PREFIX, C_NDESC, C_EDGES, C_NCHUNKS, C_NTB, C_GEN = range(4, 14)
C_IDLE_TS, C_WAIT_TS = 14, 16     # timespecs (sec, nsec)
C_STAMPS, C_SLOTS = 18, 19        # address of the batch's stamps (0: no spans wanted); a flag per worker
SYS_FUTEX = {"x86_64": 202, "aarch64": 98}.get(platform.machine(), 0) if sys.platform.startswith("linux") else 0
FUTEX_WAIT_PRIVATE, FUTEX_WAKE_PRIVATE = 128, 129
#: libc's clock_gettime(2) (the vDSO: no system call), bound by name like ``syscall5``;
#: CLOCK_MONOTONIC is the clock of time.perf_counter() on Linux, so stamps need no calibration
clock_gettime = types.ExternalFunction("clock_gettime", types.intc(types.intc, types.voidptr))
CLOCK_MONOTONIC = 1


@njit(cache=True, nogil=True)
def _claim_and_copy(mem, src_off, dst_off, prefix, ndesc, edges, nchunks, nt_bytes, ctl, gen, lane=0):
    """Claim chunks of generation ``gen`` from ``ctl[C_CLAIM]`` until none is left, copying
    each and counting it done in ``ctl[C_DONE]`` (the thread that completes the batch wakes
    a caller sleeping on that word). A thread that arrives after its batch sees another
    generation (or no chunk left) and reads no memory: nothing but the control array is
    touched before a claim succeeds. Returns the number of chunks this thread copied.

    While ``ctl[C_STAMPS]`` holds an address (a trace recorder wants spans), a chunk's row
    there gets ``lane + 1`` (0: the caller, K: worker K) and the CLOCK_MONOTONIC time its
    copy started and ended, before it is counted done; otherwise this costs a branch."""
    at = atomic_load(ctl, C_STAMPS)
    stamps = carray(voidptr(at if at else address(ctl)), STAMP * nchunks if at else 0, np.int64)
    mine = 0
    while True:
        v = atomic_load(ctl, C_CLAIM)
        if (v >> _GEN_SHIFT) != gen:
            break
        k = v & _IDX_MASK
        if k >= nchunks:
            break
        if atomic_cas(ctl, C_CLAIM, v, v + 1) != v:
            continue
        if at:
            stamps[STAMP * k] = lane + 1
            clock_gettime(CLOCK_MONOTONIC, voidptr(at + 8 * (STAMP * k + 1)))
        _copy_span(mem, src_off, dst_off, prefix, ndesc, edges[k], edges[k + 1],
                   edges[nchunks] >= nt_bytes)
        if at:
            clock_gettime(CLOCK_MONOTONIC, voidptr(at + 8 * (STAMP * k + 3)))
        mine += 1
        if atomic_add(ctl, C_DONE, 1) + 1 == nchunks:
            syscall5(SYS_FUTEX, address(ctl) + 8 * C_DONE, FUTEX_WAKE_PRIVATE, 1, 0, 0)
    return mine


@njit(cache=True, nogil=True)
def _run_batch(ctl, mem, src_off, dst_off, prefix, ndesc, edges, nchunks, nt_bytes, gen,
               nworkers, spins):
    """The caller's side of one batch: publish it, wake the workers (futex), claim and copy
    chunks until none is left, then poll for the chunks others claimed. True when all are
    done."""
    atomic_store(ctl, C_DONE, 0)
    atomic_store(ctl, C_MEM, address(mem))
    atomic_store(ctl, C_MEMLEN, mem.shape[0])
    atomic_store(ctl, C_SRC, address(src_off))
    atomic_store(ctl, C_DST, address(dst_off))
    atomic_store(ctl, C_PREFIX, address(prefix))
    atomic_store(ctl, C_NDESC, ndesc)
    atomic_store(ctl, C_EDGES, address(edges))
    atomic_store(ctl, C_NCHUNKS, nchunks)
    atomic_store(ctl, C_NTB, nt_bytes)
    atomic_store(ctl, C_GEN, gen)
    atomic_store(ctl, C_CLAIM, gen << _GEN_SHIFT)
    atomic_add(ctl, C_SEQ, 1)
    syscall5(SYS_FUTEX, address(ctl) + 8 * C_SEQ, FUTEX_WAKE_PRIVATE, nworkers, 0, 0)
    _claim_and_copy(mem, src_off, dst_off, prefix, ndesc, edges, nchunks, nt_bytes, ctl, gen)
    return _wait_done(ctl, nchunks, spins, False)


@njit(cache=True, nogil=True)
def _wait_done(ctl, nchunks, spins, sleep):
    """Poll ``ctl[C_DONE]`` up to ``spins`` times, then (``sleep``) wait on it once, for at
    most the C_WAIT_TS timespec. True once every chunk is done; the claim word is then
    cleared for the next batch."""
    for _ in range(spins):
        if atomic_load(ctl, C_DONE) >= nchunks:
            atomic_store(ctl, C_CLAIM, 0)
            return True
    if sleep:
        d = atomic_load(ctl, C_DONE)
        if d < nchunks:
            syscall5(SYS_FUTEX, address(ctl) + 8 * C_DONE, FUTEX_WAIT_PRIVATE, d & _IDX_MASK,
                     address(ctl) + 8 * C_WAIT_TS, 0)
    if atomic_load(ctl, C_DONE) >= nchunks:
        atomic_store(ctl, C_CLAIM, 0)
        return True
    return False


@njit(cache=True, nogil=True)
def _worker_loop(ctl, slot):
    """A worker thread's life, all of it without the GIL: sleep on ``ctl[C_SEQ]`` (futex),
    and on every new generation map the published batch and claim chunks. Returns when
    the pool closes, or after sleeping C_IDLE_TS without a batch (clearing its slot flag
    first, unless a batch came meanwhile)."""
    last = 0     # a worker started during a batch joins it
    while atomic_load(ctl, C_CLOSED) == 0:
        seq = atomic_load(ctl, C_SEQ)
        gen = atomic_load(ctl, C_GEN)
        if gen != last:
            last = gen
            ndesc = atomic_load(ctl, C_NDESC)
            nchunks = atomic_load(ctl, C_NCHUNKS)
            # Views of the caller's arrays; read only after a claim of this generation
            # succeeds, which proves the caller is still inside the batch.
            mem = carray(voidptr(atomic_load(ctl, C_MEM)), atomic_load(ctl, C_MEMLEN), np.uint8)
            src = carray(voidptr(atomic_load(ctl, C_SRC)), ndesc, np.int64)
            dst = carray(voidptr(atomic_load(ctl, C_DST)), ndesc, np.int64)
            prefix = carray(voidptr(atomic_load(ctl, C_PREFIX)), ndesc + 1, np.int64)
            edges = carray(voidptr(atomic_load(ctl, C_EDGES)), nchunks + 1, np.int64)
            _claim_and_copy(mem, src, dst, prefix, ndesc, edges, nchunks,
                            atomic_load(ctl, C_NTB), ctl, gen, slot + 1)
            continue
        rc = syscall5(SYS_FUTEX, address(ctl) + 8 * C_SEQ, FUTEX_WAIT_PRIVATE, seq & _IDX_MASK,
                      address(ctl) + 8 * C_IDLE_TS, 0)
        if rc != 0 and atomic_load(ctl, C_SEQ) == seq:      # slept it out: leave
            if atomic_cas(ctl, C_SLOTS + slot, 1, 0) == 1:
                return 0
    atomic_store(ctl, C_SLOTS + slot, 0)
    return 1


@njit(cache=True, nogil=True)
def _wake_all(ctl, n):
    atomic_add(ctl, C_SEQ, 1)
    syscall5(SYS_FUTEX, address(ctl) + 8 * C_SEQ, FUTEX_WAKE_PRIVATE, n, 0, 0)


# ----------------------------------------------------------------------------- threads
class _Pool:
    """The N-1 worker threads of one engine and the control array they share. Workers
    hold the GIL only to start and to end: a worker preempted at any point cannot hold
    up the caller's return to Python (a Python-level worker could, holding the GIL)."""

    def __init__(self, nworkers):
        self.nworkers = nworkers
        self.pid = os.getpid()
        self.busy = threading.Lock()        # one batch at a time
        self.ctl = np.zeros(C_SLOTS + nworkers, np.int64)
        self.ctl[C_IDLE_TS] = int(IDLE_EXIT)
        self.ctl[C_IDLE_TS + 1] = int((IDLE_EXIT % 1) * 1e9)
        self.ctl[C_WAIT_TS + 1] = 1_000_000                 # 1 ms per sleep of the caller
        self.gen = 0
        self.stuck = None

    def running(self) -> int:
        return int(np.count_nonzero(self.ctl[C_SLOTS:]))

    def _start(self):
        """(Re)start the workers whose slot is free (never started, or left when idle)."""
        for i in range(self.nworkers):
            if self.ctl[C_SLOTS + i] == 0:
                self.ctl[C_SLOTS + i] = 1
                threading.Thread(target=_worker_loop, args=(self.ctl, i), daemon=True,
                                 name=f"copyengine-mt-{i + 1}").start()

    def run(self, args, stamps=None, at=0):
        """Copy one batch with the workers; the caller holds ``busy``. With ``stamps`` (an
        int64 array of at least STAMP per chunk, at address ``at``) each chunk's thread and
        times land there."""
        nchunks = args[6]
        self.gen = gen = self.gen % 0x7FFFFFFF + 1     # never 0: 0 is "no batch"
        self.ctl[C_STAMPS] = at if stamps is not None else 0  # published with the batch
        self._start()
        if _run_batch(self.ctl, *args, gen, self.nworkers, SPINS):
            return
        deadline = time.monotonic() + WAIT_LIMIT
        while not _wait_done(self.ctl, nchunks, 0, True):
            if time.monotonic() > deadline:
                # The worker may still write: keep what it reads alive, never reuse this pool.
                self.stuck = (args, stamps)
                raise RuntimeError(f"mt: a copy thread held a chunk for more than {WAIT_LIMIT} s")

    def close(self):
        self.ctl[C_CLOSED] = 1
        _wake_all(self.ctl, self.nworkers)


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
        self.capabilities = Capabilities(asynchronous=False, threads=self.nthreads, mc_safe=True,
                                         inline_bytes=SOLO_BYTES)  # below it: the calling CPU alone
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
        if pool is None or pool.pid != os.getpid() or pool.stuck is not None:
            with self._pool_lock:
                pool = self._pool
                if pool is None or pool.pid != os.getpid() or pool.stuck is not None:
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
        nt_bytes = 0 if getattr(job, "stream", False) else self.nt_bytes  # a job-like object may lack it
        args = (mem, job.src_off, job.dst_off, prefix, ndesc, edges, nchunks, nt_bytes)
        spans = job.spans
        if nchunks > 1 and SYS_FUTEX and _shareable(job.src_off) and _shareable(job.dst_off):
            pool = self._workers()
            if pool.busy.acquire(blocking=False):
                stamps, at = (None, 0) if spans is None else self._stamps(nchunks)
                try:
                    pool.run(args, stamps, at)
                finally:
                    pool.busy.release()
                if stamps is not None:
                    spans.extend(chunk_spans(stamps, nchunks, edges, prefix, job.folio, self.nthreads))
                return result
        # one chunk, or another thread is using the workers: this thread copies alone
        total = int(edges[nchunks])
        t0 = time.perf_counter() if spans is not None else 0.0
        _copy_span(mem, job.src_off, job.dst_off, prefix, ndesc, 0, total, total >= nt_bytes)
        if spans is not None:
            spans.append(("mt worker 0", t0, time.perf_counter(), int(np.count_nonzero(result == 0))))
        return result

    def _stamps(self, nchunks):
        """This thread's stamps array (see :func:`mt_plan.chunk_spans`), grown when too
        small, and its address."""
        tls = self._tls
        st = getattr(tls, "stamps", None)
        if st is None or st.shape[0] < STAMP * nchunks:
            st = tls.stamps = np.zeros(STAMP * max(nchunks, 64), np.int64)
            tls.stamps_at = st.ctypes.data
        return st, tls.stamps_at

    def plan(self, job):
        """The chunks ``copy(job)`` makes: see :func:`plan`."""
        return plan(job, self.nthreads)

    def describe(self):
        pool = self._pool
        alive = pool.running() if pool is not None else 0
        return {"threading_layer": "python-threads", "threads": self.nthreads,
                "max_threads": max_threads(), "workers_running": alive}

    def close(self):
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close()


def _shareable(a) -> bool:
    """Workers see the caller's offset arrays by address: contiguous int64 only."""
    return a.dtype == np.int64 and a.ndim == 1 and a.flags.c_contiguous


def make_mt(arg, machine):
    return MtEngine(parse_threads(arg))


@hookimpl
def copyengine_register_engines(register):
    register("mt", make_mt,
             "threads like copy_page_lists_mt: mt:N threads (mt = every usable CPU) claim "
             "chunks of the batch; fewer folios than threads cuts folios into chunks")
