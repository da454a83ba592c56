"""The thread-pool engines: ``pool[:N]`` (synchronous) and ``pool-async[:N]``.

How a job is copied
===================

1. **Plan** (:func:`make_plan`, vectorized NumPy, no per-folio Python loop). Descriptors
   of poisoned folios are dropped *before anything else*: they are never read. The others
   are sorted by source offset and laid end to end as one byte *stream*; neighbours whose
   sources and destinations are both contiguous are coalesced into *runs* (a freshly
   populated region migrated to a fresh node is often one run). The stream is cut into at
   most N *slices*, one per thread, like the kernel's ``copy_page_lists_mt``:

   * at least as many runs as threads: each thread gets a contiguous block of whole
     runs, the block edges being the run edges nearest to N equal byte splits (balanced
     by bytes, not by count);
   * fewer runs than threads (one 2 MiB folio, four threads): the runs themselves are cut
     into chunks, at cache-line (64 byte) multiples of the stream.

   A slice is at least ``min_chunk`` bytes (256 KiB by default): handing work to another
   thread and getting the GIL back costs some 20 to 40 us, about the time one thread
   takes to copy that much, so small batches use fewer threads (any batch under 512 KiB
   is copied by the caller alone). Slices are cut into *pieces* of at most 2 MiB, the
   unit between two looks at the cancel flag.

   The plan costs some tens of microseconds, so the synchronous engine skips it for a job
   of at most 16 descriptors that one thread copies anyway (:func:`copy_small`).

2. **Copy.** Each piece is one NumPy slice assignment, over the ``uint64`` view of memory
   when offsets and length are multiples of 8 (else over bytes). NumPy releases the GIL
   for the memcpy, so the threads really copy in parallel; the Python work per piece is a
   tuple unpack and a flag read.

3. **Threads.** Each engine owns a persistent pool of daemon threads, started at its
   first multi-slice job and stopped by :meth:`close`. The synchronous engine's caller
   copies the first slice itself (it would otherwise only wait), so ``pool:N`` runs N-1
   pool threads and ``pool:1`` none at all. The asynchronous engine hands every slice to
   its N pool threads and returns at once.

Machine-check safety and results
================================

Both engines are mc-safe: a folio with ``job.src_poisoned`` set reports ``-EHWPOISON``
(``copyengine.EHWPOISON``) and none of its bytes is read or written. Every other folio
reports 0 once all of its bytes are copied. The result is an int32 array, one entry per
folio.

Bounded waits
=============

No wait is unbounded. The synchronous engine waits for its pool threads at most the
machine's ``copy_timeout`` setting (10 s by default); on expiry it cancels the job: pool
threads stop at their next piece (queued slices never start), the caller waits at most
``stop_grace`` seconds for pieces in flight, and folios not entirely copied report
``-ETIMEDOUT`` (the framework copies them again with ``folio_mc_copy``). A piece that
does not finish within the grace period (a thread descheduled for seconds in the middle
of one memcpy) makes ``copy`` raise RuntimeError rather than report anything as done.
:meth:`close` joins the pool threads with the same bound. The asynchronous engine's
``Completion.cancel()`` stops the job the same way and returns once nothing writes any
more.

Descriptors are assumed not to overlap one another (the framework never builds such jobs);
the copy order within a job is unspecified.
"""
from __future__ import annotations

import errno
import os
import queue
import threading
import time
import weakref

import numpy as np

from copyengine import EHWPOISON
from copyengine.engines import Capabilities, Completion, Engine

#: the smallest share of a batch worth handing to another thread (a handoff costs 20-40 us)
MIN_CHUNK = 256 << 10
#: the largest piece copied between two looks at the cancel flag
MAX_PIECE = 2 << 20
#: when folios are cut into chunks, cuts fall on cache-line multiples of the stream
CACHE_LINE = 64
#: jobs of at most this many descriptors that one thread copies skip the plan
SMALL_JOB = 16
#: seconds cancel() waits for pieces in flight, and close() for the pool threads
STOP_GRACE = 10.0
#: copy_timeout when the engine's machine is gone
DEFAULT_TIMEOUT = 10.0


def cpu_count() -> int:
    """CPUs this process may run on (its affinity mask)."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def parse_threads(name: str, arg) -> int:
    """``None`` -> every CPU this process may use; ``"N"`` -> N. ValueError names the
    maximum."""
    limit = cpu_count()
    if arg is None:
        return limit
    try:
        n = int(arg, 10)
    except (TypeError, ValueError):
        raise ValueError(f"{name}:{arg}: the argument is a number of threads, 1..{limit}") from None
    if n < 1:
        raise ValueError(f"{name}:{arg}: the number of threads must be at least 1 (maximum {limit})")
    if n > limit:
        raise ValueError(f"{name}:{n} asks for {n} threads; the maximum on this machine is "
                         f"{limit} (CPUs this process may run on)")
    return n


# ----------------------------------------------------------------------------- the plan
class Plan:
    """How one job is copied (see the module docstring).

    ``base``: the result when every slice completes (-EHWPOISON for poisoned folios, 0
    for the others). ``slices[t]``: thread t's pieces, each ``(buf, d0, d1, s0, s1)`` for
    ``buf[d0:d1] = buf[s0:s1]``. ``starts[t]``: the stream position where each of its
    pieces begins, plus its end. ``bounds``: the stream position where each kept
    descriptor begins, plus the end of the stream; ``folio``: the folio of each kept
    descriptor (stream order).
    """

    __slots__ = ("base", "slices", "starts", "bounds", "folio", "nbytes", "runs")

    def __init__(self, base, slices, starts, bounds, folio, nbytes, runs):
        self.base = base
        self.slices = slices
        self.starts = starts
        self.bounds = bounds
        self.folio = folio
        self.nbytes = nbytes
        self.runs = runs

    def folios_between(self, a: int, b: int) -> np.ndarray:
        """Folios with bytes in stream positions [a, b)."""
        bounds = self.bounds
        i0 = np.searchsorted(bounds[1:], a, "right")
        i1 = np.searchsorted(bounds[:-1], b, "left")
        return self.folio[i0:i1]

    def slice_folios(self, t: int) -> np.ndarray:
        s = self.starts[t]
        return np.unique(self.folios_between(s[0], s[-1]))

    def undone_folios(self, progress) -> np.ndarray:
        """Folios some of whose bytes lie in a piece not done (``progress[t]``: pieces
        slice t completed, in order)."""
        out = [self.folios_between(s[k], s[-1]) for s, k in zip(self.starts, progress)
               if k < len(s) - 1]
        return np.unique(np.concatenate(out)) if out else np.zeros(0, np.int64)


def _check(job):
    nf = job.nr_folios
    arrays = [np.asarray(a) for a in (job.src_off, job.dst_off, job.nbytes, job.folio)]
    n = len(arrays[0])
    if any(a.shape != (n,) for a in arrays) or np.asarray(job.src_poisoned).shape != (nf,):
        raise ValueError("a job's src_off, dst_off, nbytes and folio have one entry per "
                         "descriptor, src_poisoned one per folio")
    src, dst, nb, fo = (a.astype(np.int64, copy=False) for a in arrays)
    if n:
        memlen = len(job.mem)
        bad = ((fo < 0) | (fo >= nf) | (nb < 0) | (src < 0) | (dst < 0)
               | (src + nb > memlen) | (dst + nb > memlen))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"bad descriptor {i}: src_off={int(src[i])} dst_off={int(dst[i])} "
                             f"nbytes={int(nb[i])} folio={int(fo[i])} (memory {memlen} bytes, "
                             f"{nf} folios)")
    return src, dst, nb, fo


def make_plan(job, nthreads: int, min_chunk: int = MIN_CHUNK, max_piece: int = MAX_PIECE) -> Plan:
    """Plan ``job`` for at most ``nthreads`` threads (see the module docstring)."""
    src, dst, nb, fo = _check(job)
    pois = np.asarray(job.src_poisoned, bool)
    base = np.where(pois, np.int32(-EHWPOISON), np.int32(0)).astype(np.int32)
    keep = nb > 0
    if len(fo):
        keep &= ~pois[fo]             # a poisoned folio's source is never read
    if not keep.all():
        src, dst, nb, fo = src[keep], dst[keep], nb[keep], fo[keep]
    if len(src) > 1 and (src[1:] < src[:-1]).any():
        order = np.argsort(src, kind="stable")
        src, dst, nb, fo = src[order], dst[order], nb[order], fo[order]
    bounds = np.zeros(len(src) + 1, np.int64)
    np.cumsum(nb, out=bounds[1:])
    total = int(bounds[-1])
    if total == 0:
        return Plan(base, [], [], bounds, fo, nb, 0)

    # runs: neighbours contiguous in both source and destination
    brk = np.ones(len(src), bool)
    end = src[:-1] + nb[:-1]
    brk[1:] = (end != src[1:]) | (dst[:-1] + nb[:-1] != dst[1:])
    ri = np.flatnonzero(brk)
    rstart, rsrc, rdst = bounds[ri], src[ri], dst[ri]

    k = int(max(1, min(nthreads, total // max(1, min_chunk))))
    cuts = total * np.arange(k + 1, dtype=np.int64) // k
    if k > 1:
        inner = cuts[1:-1]
        if len(ri) >= k:
            # whole runs per thread: snap each cut to the nearest run edge
            edges = np.concatenate([rstart, [total]])
            j = np.searchsorted(edges, inner, "left")
            lo, hi = edges[j - 1], edges[j]
            cuts[1:-1] = np.where(inner - lo <= hi - inner, lo, hi)
        else:
            # fewer runs than threads: cut runs into cache-line aligned chunks
            cuts[1:-1] = inner - inner % CACHE_LINE
        cuts = np.maximum.accumulate(cuts)

    b = np.concatenate([rstart, cuts[1:-1]]) if k > 1 else rstart
    if total > max_piece:             # no run is longer than max_piece otherwise
        b = np.concatenate([b, np.arange(0, total, max_piece, dtype=np.int64)])
    if len(b) != len(rstart):          # rstart alone is sorted and unique already
        b.sort()
        b = b[np.concatenate([[True], b[1:] != b[:-1]]) & (b < total)]
    e = np.empty_like(b)
    e[:-1] = b[1:]
    e[-1] = total
    r = np.searchsorted(rstart, b, "right") - 1
    off = b - rstart[r]
    ps, pd, pn = rsrc[r] + off, rdst[r] + off, e - b

    mem = job.mem
    mem64 = None
    if mem.dtype == np.uint8 and mem.ndim == 1 and len(mem) % 8 == 0 and mem.flags.c_contiguous:
        mem64 = mem.view(np.uint64)
    if mem64 is not None:
        aligned = ((ps | pd | pn) & 7) == 0
        shift = np.where(aligned, 3, 0)
        bufs = np.where(aligned, 1, 0).tolist()
    else:
        shift = np.zeros(len(ps), np.int64)
        bufs = [0] * len(ps)
    views = (mem, mem64)
    pieces = list(zip([views[x] for x in bufs], (pd >> shift).tolist(), ((pd + pn) >> shift).tolist(),
                      (ps >> shift).tolist(), ((ps + pn) >> shift).tolist()))
    first = np.searchsorted(b, cuts, "left")
    first[-1] = len(b)
    slices, starts = [], []
    for t in range(k):
        lo, hi = int(first[t]), int(first[t + 1])
        if lo < hi:
            slices.append(pieces[lo:hi])
            starts.append(np.concatenate([b[lo:hi], e[hi - 1:hi]]))
    return Plan(base, slices, starts, bounds, fo, nb, len(ri))


def copy_small(job, limit: int):
    """Copy a job of a few descriptors in the calling thread without planning (the plan's
    fixed cost, some tens of microseconds, matters for a single folio). Returns the
    result, or None -- having written nothing -- when the job's clean bytes reach
    ``limit`` (worth splitting over threads) or it is malformed (the plan reports it)."""
    mem = job.mem
    nf = job.nr_folios
    src, dst, nb, fo = (a.tolist() for a in (job.src_off, job.dst_off, job.nbytes, job.folio))
    pois = job.src_poisoned.tolist()
    if not (len(src) == len(dst) == len(nb) == len(fo)) or len(pois) != nf:
        return None
    memlen = len(mem)
    total = 0
    for s, d, n, f in zip(src, dst, nb, fo):
        if not 0 <= f < nf or n < 0 or s < 0 or d < 0 or s + n > memlen or d + n > memlen:
            return None
        if not pois[f]:
            total += n
    if total >= limit:
        return None
    mem64 = mem.view(np.uint64) if memlen % 8 == 0 and mem.dtype == np.uint8 else None
    for s, d, n, f in zip(src, dst, nb, fo):
        if pois[f] or not n:             # a poisoned folio's source is never read
            continue
        if mem64 is not None and not (s | d | n) & 7:
            mem64[d >> 3:(d + n) >> 3] = mem64[s >> 3:(s + n) >> 3]
        else:
            mem[d:d + n] = mem[s:s + n]
    return np.where(job.src_poisoned, np.int32(-EHWPOISON), np.int32(0)).astype(np.int32)


def run_inline(plan: Plan):
    """Copy every slice in the calling thread."""
    for pieces in plan.slices:
        for buf, d0, d1, s0, s1 in pieces:
            buf[d0:d1] = buf[s0:s1]


# ----------------------------------------------------------------------------- threads
class WorkerPool:
    """``n`` daemon threads serving one FIFO of tasks; started on first use."""

    def __init__(self, n: int, name: str):
        self.n = int(n)
        self.name = name
        self._q = queue.SimpleQueue()
        self._threads = []
        self._lock = threading.Lock()
        self.closed = False

    @property
    def started(self) -> bool:
        return bool(self._threads)

    def submit(self, fn, *args) -> bool:
        """Queue ``fn(*args)``; False when there is no thread to run it (a pool of 0
        threads, or a closed one): the caller then runs it itself."""
        if self.n == 0:
            return False
        with self._lock:
            if self.closed:
                return False
            if not self._threads:
                for i in range(self.n):
                    t = threading.Thread(target=self._loop, name=f"{self.name}-{i}", daemon=True)
                    t.start()
                    self._threads.append(t)
            self._q.put((fn, args))
        return True

    def _loop(self):
        while True:
            item = self._q.get()
            if item is None:
                return
            fn, args = item
            try:
                fn(*args)     # tasks record their own errors; this only keeps the thread alive
            except Exception:  # noqa: BLE001
                pass

    def close(self, timeout: float) -> bool:
        """Stop the threads once the tasks already queued are done; wait at most
        ``timeout`` seconds. True when every thread has ended. Idempotent."""
        with self._lock:
            self.closed = True
            threads = list(self._threads)
            for _ in threads:
                self._q.put(None)
            self._threads.clear()
        deadline = time.monotonic() + timeout
        me = threading.current_thread()
        for t in threads:
            if t is not me:
                t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in threads if t is not me)


QUEUED, RUNNING, ENDED = 0, 1, 2


class Run:
    """One job in flight: its slices' state and progress, and cancellation.

    ``on_slice_end(t, ok)`` is called (under the run's lock) when slice t ends, ``ok``
    when all of its pieces were copied.
    """

    def __init__(self, plan: Plan, on_slice_end=None):
        self.plan = plan
        n = len(plan.slices)
        self.progress = [0] * n
        self.state = [QUEUED] * n
        self.cancelled = False
        self.cond = threading.Condition()
        self.pending = n      # slices not ended
        self.running = 0      # slices copying now
        self.error = None
        self.on_slice_end = on_slice_end

    def run_slice(self, t: int) -> None:
        with self.cond:
            if self.state[t] != QUEUED:
                return
            if self.cancelled:      # queued, never started: nothing written
                self.state[t] = ENDED
                self.pending -= 1
                self.cond.notify_all()
                return
            self.state[t] = RUNNING
            self.running += 1
        pieces = self.plan.slices[t]
        k = 0
        ok = False
        try:
            for buf, d0, d1, s0, s1 in pieces:
                if self.cancelled:
                    break
                buf[d0:d1] = buf[s0:s1]
                k += 1
                self.progress[t] = k
            ok = k == len(pieces)
        except Exception as e:  # noqa: BLE001 - reported through the result (-EIO)
            self.error = e
        finally:
            with self.cond:
                self.state[t] = ENDED
                self.running -= 1
                self.pending -= 1
                if self.on_slice_end is not None:
                    try:
                        self.on_slice_end(t, ok)
                    except Exception as e:  # noqa: BLE001
                        self.error = e
                self.cond.notify_all()

    def wait(self, timeout: float) -> bool:
        """True once every slice has ended; False after ``timeout`` seconds."""
        with self.cond:
            return self.cond.wait_for(lambda: self.pending == 0, timeout)

    def cancel(self, grace: float) -> bool:
        """Stop: queued slices never start, running ones stop at their next piece. True
        when nothing copies any more (waits at most ``grace`` seconds for that)."""
        with self.cond:
            self.cancelled = True
            return self.cond.wait_for(lambda: self.running == 0, grace)


# ----------------------------------------------------------------------------- engines
class _PoolEngineBase(Engine):
    spec_name = "pool"

    def __init__(self, nthreads: int, machine=None, *, min_chunk: int = MIN_CHUNK,
                 max_piece: int = MAX_PIECE, stop_grace: float = STOP_GRACE):
        if isinstance(nthreads, bool) or int(nthreads) < 1:
            raise ValueError(f"nthreads must be at least 1, got {nthreads!r}")
        if int(max_piece) < 8 or int(min_chunk) < 1:
            raise ValueError("max_piece is at least 8 bytes and min_chunk at least 1 byte")
        self.nthreads = int(nthreads)
        self.min_chunk = int(min_chunk)
        self.max_piece = int(max_piece)
        self.stop_grace = float(stop_grace)
        self._machine = weakref.ref(machine) if machine is not None else None
        self._pool = WorkerPool(self._workers(), f"copyengine-{self.spec_name}")
        # an engine dropped without close() still lets its threads go (without waiting)
        weakref.finalize(self, self._pool.close, 0.0)

    def _workers(self) -> int:
        return self.nthreads

    def copy_timeout(self) -> float:
        """The machine's ``copy_timeout`` setting (seconds)."""
        m = self._machine() if self._machine is not None else None
        if m is None:
            return DEFAULT_TIMEOUT
        try:
            return float(m.settings["copy_timeout"])
        except Exception:  # noqa: BLE001 - a closed or foreign machine
            return DEFAULT_TIMEOUT

    def plan(self, job) -> Plan:
        """The plan ``copy``/``submit`` would follow (for tests and the curious)."""
        return make_plan(job, self.nthreads, self.min_chunk, self.max_piece)

    def describe(self):
        return {"threads": self.nthreads, "pool_threads": self._pool.n,
                "max_threads": cpu_count(), "min_chunk": self.min_chunk}

    @property
    def started(self) -> bool:
        """True once the pool threads run (at the first multi-threaded job)."""
        return self._pool.started

    @property
    def closed(self) -> bool:
        return self._pool.closed

    def close(self):
        """Stop the pool threads (waits at most ``stop_grace`` seconds). Idempotent; a
        closed engine still copies, in the calling thread."""
        self._pool.close(self.stop_grace)


class ThreadPoolEngine(_PoolEngineBase):
    """``pool[:N]``: synchronous; N threads copy each batch (the caller and N-1 pool
    threads)."""

    spec_name = "pool"

    def __init__(self, nthreads: int, machine=None, **kw):
        super().__init__(nthreads, machine, **kw)
        self.capabilities = Capabilities(asynchronous=False, threads=self.nthreads, mc_safe=True)

    def _workers(self):
        return self.nthreads - 1

    def copy(self, job):
        if len(job.nbytes) <= SMALL_JOB:
            limit = 2 * self.min_chunk if self.nthreads > 1 and not self._pool.closed else 1 << 62
            result = copy_small(job, limit)
            if result is not None:
                return result
        plan = self.plan(job)
        slices = plan.slices
        if len(slices) <= 1 or self._pool.closed:
            run_inline(plan)
            return plan.base
        run = Run(plan)
        inline = [t for t in range(1, len(slices)) if not self._pool.submit(run.run_slice, t)]
        run.run_slice(0)
        for t in inline:
            run.run_slice(t)
        timed_out = not run.wait(self.copy_timeout())
        if timed_out and not run.cancel(self.stop_grace):
            raise RuntimeError(f"{self.name}: a copy thread did not stop within "
                               f"{self.stop_grace} s of the job's cancellation")
        result = plan.base
        undone = plan.undone_folios(run.progress)
        if len(undone):
            result = result.copy()
            result[undone] = -errno.ETIMEDOUT if timed_out else -errno.EIO
        return result


class PoolCompletion(Completion):
    """Completion of a ``pool-async`` job: each folio completes when every slice holding
    its bytes has ended (slices end in any order, so folios complete out of order)."""

    def __init__(self, plan: Plan, nr_folios: int, stop_grace: float):
        super().__init__(nr_folios)
        self.plan = plan
        self.stop_grace = stop_grace
        self.stopped = True          # False while a cancel() could not stop the copy
        self.run = None
        nslices = len(plan.slices)
        self._need = np.zeros(nr_folios, np.int64)   # slices each folio still waits for
        self._failed = np.zeros(nr_folios, bool)
        self._of_slice = [plan.slice_folios(t) for t in range(nslices)]
        for fs in self._of_slice:
            self._need[fs] += 1
        ready = self._need == 0
        self.result[ready] = plan.base[ready]        # poisoned, or nothing to copy
        self._left = int(nr_folios - ready.sum())

    def slice_end(self, t: int, ok: bool) -> None:
        """Called by the run (under its lock) when slice t ends."""
        fs = self._of_slice[t]
        if not ok:
            self._failed[fs] = True
        self._need[fs] -= 1
        now = fs[self._need[fs] == 0]
        if not len(now):
            return
        bad = self._failed[now]
        if self.complete(now[~bad], 0) and (not bad.any() or self.complete(now[bad], -errno.EIO)):
            self._left -= len(now)
            if self._left == 0:
                self.finish()

    def _cancel(self):
        """Stop the run; False (the framework then quarantines the job's destinations)
        when a pool thread is still inside a copy after the grace period: it retires the
        job once that copy ends."""
        if self.run is None:
            return True
        self.stopped = self.run.cancel(self.stop_grace)
        if not self.stopped:
            threading.Thread(target=self._retire_when_stopped, daemon=True).start()
        return self.stopped

    def _retire_when_stopped(self, limit=3600.0):
        with self.run.cond:
            if self.run.cond.wait_for(lambda: self.run.running == 0, limit):
                self.retire()


class AsyncThreadPoolEngine(_PoolEngineBase):
    """``pool-async[:N]``: asynchronous (the dmaengine shape); N pool threads copy,
    ``submit`` returns at once and folios complete out of order."""

    spec_name = "pool-async"

    def __init__(self, nthreads: int, machine=None, **kw):
        super().__init__(nthreads, machine, **kw)
        self.capabilities = Capabilities(asynchronous=True, threads=self.nthreads, mc_safe=True)

    def submit(self, job):
        plan = self.plan(job)
        completion = PoolCompletion(plan, job.nr_folios, self.stop_grace)
        if completion._left == 0:
            completion.finish()
            return completion
        run = Run(plan, on_slice_end=completion.slice_end)
        completion.run = run
        for t in range(len(plan.slices)):
            if not self._pool.submit(run.run_slice, t):   # closed engine: copy here
                run.run_slice(t)
        return completion


def _engine_factory(cls):
    def factory(arg, machine):
        return cls(parse_threads(cls.spec_name, arg), machine)
    return factory


make_pool = _engine_factory(ThreadPoolEngine)
make_pool_async = _engine_factory(AsyncThreadPoolEngine)
