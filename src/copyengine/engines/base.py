"""The engine protocol: what a copy engine receives, returns and promises.

A job is a scatter-gather list over the machine's physical memory: per descriptor
``src_off``, ``dst_off``, ``nbytes`` (byte offsets into ``mem``) and ``folio`` (the batch
index of the folio it belongs to), plus ``src_poisoned`` per folio. The result is an int32
array with one entry per folio: 0 when every byte of the folio was copied, else -errno.

Synchronous engines implement ``copy(job)``. Asynchronous engines implement one call,
``submit(job)``, which starts the copy and returns a :class:`Completion` at once (it stands
for dmaengine's prep + submit + issue_pending); the engine records outcomes on the
completion as they arrive, in any order, and the framework waits with a timeout and
cancels on expiry (dmaengine_terminate_sync).
"""
from __future__ import annotations

import errno
import threading
from dataclasses import asdict, dataclass

import numpy as np
from numba import njit

from ..errors import EHWPOISON, EngineUnavailable
from .memops import NT_BYTES, copy_spans
from .memops import copy as _copy_bytes
from .memops import store_fence
from .memops import first_outside

#: result value of a folio an asynchronous engine has not completed (yet)
PENDING = -errno.EINPROGRESS


@dataclass(frozen=True)
class Capabilities:
    """What an engine can do; the framework and the ``auto`` policy read these."""
    asynchronous: bool = False   # submit()/Completion instead of copy()
    threads: int = 1             # CPU threads it copies with
    channels: int = 0            # DMA channels / command queues, 0 for CPU engines
    min_bytes: int = 0           # below this a batch is not worth offloading (declined)
    max_batch: int = 0           # most folios per job, 0 = no limit
    mc_safe: bool = True         # reports -EHWPOISON for a poisoned source (never reads it)
    batched: bool = True         # False: the flow before the series, each folio copied in its move step
    inline_bytes: int = 0        # batches below this the engine copies on the calling CPU anyway:
                                 # the framework may copy them itself (folio_mc_copy), not calling it

    def as_dict(self):
        return asdict(self)


class CopyJob:
    """One batch copy. Arrays are read-only to engines; ``mem`` is the physical memory.

    ``spans`` is None unless a trace recorder is attached to the machine: then it is a
    list, and an engine that wants its workers or channels on the timeline appends
    ``(lane, t0, t1, folios)`` to it for each piece of work (``lane`` names the worker or
    channel, e.g. "mt worker 1" or "opencl channel 0"; ``t0``/``t1`` are
    ``time.perf_counter()`` seconds; ``folios`` how many folios the piece copied). Appending
    is thread-safe (list.append); the framework reads the list once the job is retired.

    ``stream`` is True when the migration this job belongs to moves at least ``NT_BYTES``
    in all (a large move_pages() call cut into batches): its data cannot stay cached, so
    a CPU engine should write it with non-temporal stores even when this one job is small
    (the seed's TODO 4). A hint: an engine may ignore it.
    """

    __slots__ = ("mem", "src_off", "dst_off", "nbytes", "folio", "src_poisoned", "nr_folios", "spans",
                 "stream")

    def __init__(self, mem, src_off, dst_off, nbytes, folio, src_poisoned):
        self.mem = mem
        self.src_off = src_off
        self.dst_off = dst_off
        self.nbytes = nbytes
        self.folio = folio
        self.src_poisoned = src_poisoned
        self.nr_folios = len(src_poisoned)
        self.spans = None
        self.stream = False

    @property
    def mem64(self):
        """A uint64 view of physical memory (free: the buffer is page aligned)."""
        return self.mem.view(np.uint64)

    @property
    def total_bytes(self) -> int:
        return int(self.nbytes.sum())

    def folio_bytes(self) -> np.ndarray:
        return np.bincount(self.folio, weights=self.nbytes, minlength=self.nr_folios).astype(np.int64)


class Completion:
    """Completion of an asynchronous job (a dma cookie's status, per folio).

    The engine calls ``complete(folios, status)`` as folios finish, in any order (it takes
    the completion's lock and records nothing once the job is cancelled), and ``finish()``
    once every folio has an outcome: ``wait`` returns as soon as ``finish`` is called, so
    an engine that forgets it costs the whole timeout (and the framework copies the batch
    on the CPU). ``wait(timeout)`` returns the result, or None on timeout.

    ``cancel()`` marks the job cancelled under the lock, then calls ``_cancel()`` without
    holding it (so that an engine thread blocked in ``complete`` can run). ``_cancel``
    stops outstanding work and returns True (or None) when nothing will write any more;
    an engine that cannot promise that returns False and calls ``retire()`` later, once its
    last write has landed. Until then the framework quarantines every destination of the
    job: those frames are never handed out again while the engine may still write them.
    """

    def __init__(self, nr_folios: int):
        self.result = np.full(nr_folios, PENDING, np.int32)
        self._done = threading.Event()
        self._retired = threading.Event()
        self._lock = threading.Lock()
        self.cancelled = False

    def complete(self, folios, status=0) -> bool:
        """Record an outcome for some folios; False (and nothing recorded) once cancelled."""
        with self._lock:
            if self.cancelled:
                return False
            self.result[folios] = status
            return True

    def finish(self):
        """Every folio has an outcome and the engine writes nothing more for this job."""
        self._done.set()
        self._retired.set()

    def retire(self):
        """After a cancel that could not stop the engine at once: nothing writes any more."""
        self._retired.set()

    def done(self) -> bool:
        return self._done.is_set()

    def retired(self) -> bool:
        """True once the engine can no longer write any destination of this job."""
        return self._retired.is_set()

    def wait(self, timeout: float):
        if not self._done.wait(timeout):
            return None
        return self.result

    def cancel(self) -> bool:
        """Cancel the job; True when the engine promised that nothing writes any more."""
        with self._lock:
            self.cancelled = True
        stopped = self._cancel() is not False
        if stopped:
            self._retired.set()
        return stopped

    def _cancel(self):
        """Stop outstanding work. Return True (or None) only when nothing will write any
        more; False if writes may still land (then call ``retire()`` when they have)."""


class CopyStillRunning(RuntimeError):
    """An asynchronous engine's job was cancelled but the engine may still write its
    destinations; ``completion.retired()`` turns True once it cannot any more."""

    def __init__(self, engine_name, completion):
        super().__init__(f"engine {engine_name} timed out and may still write after its cancel")
        self.completion = completion


@njit(cache=True, nogil=True)
def copy_each(mem, src_off, dst_off, nbytes, take, nt):
    """Copy every descriptor i with ``take[i]`` on its own (no merging: folio_mc_copy is
    one folio at a time). Returns 0, or -(i + 1), having copied nothing, if descriptor i
    lies outside memory."""
    bad = first_outside(mem, src_off, dst_off, nbytes, take)
    if bad:
        return bad
    for i in range(src_off.shape[0]):
        if take[i]:
            _copy_bytes(mem, dst_off[i], src_off[i], nbytes[i], nt)
    if nt:
        store_fence()   # once per batch: one per page held 4 KiB pages to 8.9 GB/s
    return 0


class Engine:
    """Base class of copy engines. Subclasses set ``capabilities`` and implement
    ``copy`` (synchronous) or ``submit`` (asynchronous)."""

    name = "engine"
    capabilities = Capabilities()

    def copy(self, job: CopyJob) -> np.ndarray:
        raise NotImplementedError

    def submit(self, job: CopyJob) -> Completion:
        raise NotImplementedError

    def describe(self) -> dict:
        """Extra facts for ``copyengine engines`` (threading layer, device...)."""
        return {}

    def close(self):
        """Release threads, queues or devices."""

    def __repr__(self):
        return f"<{type(self).__name__} {self.name}>"


def copy_descriptors(mem, src_off, dst_off, nbytes, sel=None):
    """Copy descriptors (all, or the indices ``sel``) in compiled code, merging runs that
    are contiguous in source and destination. ValueError for one outside memory."""
    n = len(src_off)
    take = np.ones(n, np.bool_)
    if sel is not None:
        take[:] = False
        take[np.asarray(list(sel) if not isinstance(sel, np.ndarray) else sel, dtype=np.int64)] = True
    nbytes = np.ascontiguousarray(nbytes, np.int64)
    nt = int(nbytes[take].sum()) >= NT_BYTES  # too big to stay cached: bypass the caches
    rc = copy_spans(mem, np.ascontiguousarray(src_off, np.int64), np.ascontiguousarray(dst_off, np.int64),
                    nbytes, take, nt)
    if rc < 0:
        raise ValueError(f"descriptor {-rc - 1} lies outside physical memory")


def folio_mc_copy(job: CopyJob, folios) -> np.ndarray:
    """mm/util.c folio_mc_copy for the given folios of a job: -EHWPOISON, never reading
    a poisoned source, else copy the folio's descriptors, one after another, with the
    primitive every CPU flow shares (``memops.copy``, non-temporal stores from
    ``NT_BYTES`` per job, or for any job of a ``stream``). Returns their statuses."""
    folios = np.asarray(folios, dtype=np.int64)
    status = np.where(job.src_poisoned[folios], -EHWPOISON, 0).astype(np.int32)
    ok = folios[status == 0]
    if len(ok):
        want = np.zeros(job.nr_folios, np.bool_)
        want[ok] = True
        nbytes = np.ascontiguousarray(job.nbytes, np.int64)
        rc = copy_each(job.mem, np.ascontiguousarray(job.src_off, np.int64),
                       np.ascontiguousarray(job.dst_off, np.int64), nbytes, want[job.folio],
                       job.stream or job.total_bytes >= NT_BYTES)
        if rc < 0:
            raise ValueError(f"descriptor {-rc - 1} lies outside physical memory")
    return status


def run_engine(engine: Engine, job: CopyJob, timeout: float) -> np.ndarray:
    """Run a job to completion: ``copy`` for a synchronous engine; for an asynchronous
    one submit, wait up to ``timeout`` seconds, and on expiry cancel it: folios it had
    not completed report -ETIMEDOUT. An engine that cannot stop at its cancel raises
    :class:`CopyStillRunning` (the caller must keep the job's destinations away from
    everyone until the completion is retired); so does an interrupt (KeyboardInterrupt)
    of the wait, after cancelling the job."""
    if not engine.capabilities.asynchronous:
        return engine.copy(job)
    completion = engine.submit(job)
    if not isinstance(completion, Completion):
        raise TypeError(f"engine {engine.name}: submit() returned {type(completion).__name__}, "
                        "not a Completion")
    try:
        result = completion.wait(timeout)
    except BaseException as e:
        if not completion.cancel():
            raise CopyStillRunning(engine.name, completion) from e
        raise
    if result is None:
        if not completion.cancel():
            raise CopyStillRunning(engine.name, completion)
        result = completion.result.copy()
    return np.where(result == PENDING, -errno.ETIMEDOUT, result).astype(np.int32)


def parse_spec(spec) -> tuple[str, str | None]:
    if not isinstance(spec, str):
        raise TypeError(f"an engine spec is a string like 'mt:4', not {type(spec).__name__}")
    if not spec or "," in spec or spec != spec.strip():
        raise ValueError(f"bad engine spec {spec!r}: a name, optionally ':' and an argument, no commas")
    name, sep, arg = spec.partition(":")
    if sep and not arg:
        raise ValueError(f"bad engine spec {spec!r}: empty argument after ':'")
    return name, (arg if sep else None)


def create_engine(spec, machine, registry) -> Engine:
    """Build the engine a spec names. ValueError for unknown names and bad arguments;
    EngineUnavailable (from the factory) when it cannot run here."""
    name, arg = parse_spec(spec)
    entry = registry.get(name)
    if entry is None:
        raise ValueError(f"unknown engine {name!r}; known engines: {', '.join(sorted(registry))}")
    engine = entry.factory(arg, machine)
    if not isinstance(engine, Engine):
        raise EngineUnavailable(f"engine {name!r} factory returned {type(engine).__name__}, not an Engine")
    engine.name = spec
    return engine
