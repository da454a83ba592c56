"""The engine protocol: what a copy engine receives, returns and promises.

A job is a scatter-gather list over the machine's physical memory: per descriptor
``src_off``, ``dst_off``, ``nbytes`` (byte offsets into ``mem``) and ``folio`` (the batch
index of the folio it belongs to), plus ``src_poisoned`` per folio. The result is an int32
array with one entry per folio: 0 when every byte of the folio was copied, else -errno.

Synchronous engines implement ``copy(job)``. Asynchronous engines follow dmaengine's
shape (prep, submit, issue_pending, completion) in ``submit(job)``, which returns a
:class:`Completion`; the framework waits with a timeout and cancels on expiry.
"""
from __future__ import annotations

import errno
import threading
from dataclasses import asdict, dataclass

import numpy as np

from ..errors import EHWPOISON, EngineUnavailable
from .memops import NT_BYTES, copy_spans

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

    def as_dict(self):
        return asdict(self)


class CopyJob:
    """One batch copy. Arrays are read-only to engines; ``mem`` is the physical memory."""

    __slots__ = ("mem", "src_off", "dst_off", "nbytes", "folio", "src_poisoned", "nr_folios")

    def __init__(self, mem, src_off, dst_off, nbytes, folio, src_poisoned):
        self.mem = mem
        self.src_off = src_off
        self.dst_off = dst_off
        self.nbytes = nbytes
        self.folio = folio
        self.src_poisoned = src_poisoned
        self.nr_folios = len(src_poisoned)

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

    Engines fill ``result`` as folios complete, in any order, and call ``finish()`` once
    every folio has an outcome. ``wait(timeout)`` returns the result, or None on
    timeout; ``cancel()`` must guarantee that no write happens after it returns
    (dmaengine_terminate_sync). Subclasses override ``_cancel``.
    """

    def __init__(self, nr_folios: int):
        self.result = np.full(nr_folios, PENDING, np.int32)
        self._done = threading.Event()
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
        self._done.set()

    def done(self) -> bool:
        return self._done.is_set()

    def wait(self, timeout: float):
        if not self._done.wait(timeout):
            return None
        return self.result

    def cancel(self):
        with self._lock:
            self.cancelled = True
        self._cancel()

    def _cancel(self):
        """Stop outstanding work and return only when nothing will write any more."""


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
    _copy(mem, src_off, dst_off, nbytes, take)


def _copy(mem, src_off, dst_off, nbytes, take):
    nbytes = np.ascontiguousarray(nbytes, np.int64)
    nt = int(nbytes[take].sum()) >= NT_BYTES  # too big to stay cached: bypass the caches
    rc = copy_spans(mem, np.ascontiguousarray(src_off, np.int64), np.ascontiguousarray(dst_off, np.int64),
                    nbytes, take, nt)
    if rc < 0:
        raise ValueError(f"descriptor {-rc - 1} lies outside physical memory")


def folio_mc_copy(job: CopyJob, folios) -> np.ndarray:
    """mm/util.c folio_mc_copy for the given folios of a job: -EHWPOISON, never reading
    a poisoned source, else copy every descriptor of the folio (contiguous runs of
    several folios in one go). Returns their statuses."""
    folios = np.asarray(folios, dtype=np.int64)
    status = np.where(job.src_poisoned[folios], -EHWPOISON, 0).astype(np.int32)
    ok = folios[status == 0]
    if len(ok):
        want = np.zeros(job.nr_folios, np.bool_)
        want[ok] = True
        _copy(job.mem, job.src_off, job.dst_off, job.nbytes, want[job.folio])
    return status


def run_engine(engine: Engine, job: CopyJob, timeout: float) -> np.ndarray:
    """Run a job to completion: ``copy`` for a synchronous engine; for an asynchronous
    one submit, wait up to ``timeout`` seconds, and on expiry cancel it (after which it
    never writes): folios it had not completed report -ETIMEDOUT."""
    if not engine.capabilities.asynchronous:
        return engine.copy(job)
    completion = engine.submit(job)
    result = completion.wait(timeout)
    if result is None:
        completion.cancel()
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
