"""Fault injection through the plugin hooks: failing allocations, failing or raising
copies, engines that break, and hardware poison.

Nothing here touches the allocator or the migration code: every fault enters through a
hook a third-party plugin could implement, so what the tests prove holds for plugins too.

* :class:`AllocFaults` -- a ``copyengine_alloc_frames`` implementation that hands out fewer
  folios than asked (by node, order, probability, number of failures, or a frame budget),
  armed and disarmed around the calls under test.
* :class:`CopyFaults` -- a ``copyengine_batch_copy`` implementation standing in front of the
  chosen engine: it fails some descriptors with -EIO after scribbling on their
  destinations, raises mid-batch after copying part of it, reports nothing copied, or
  returns a malformed result.
* Engines (this module is itself a plugin): ``raisemid[:K]`` copies the first K descriptors
  of a batch (default: half), scribbles on the next one and raises. The engines of
  :mod:`copyengine.testing.engines` cover the rest: ``eio[:K]`` (fails every K-th
  descriptor, not machine-check safe), ``ooo[:US]`` (asynchronous, completes out of
  order), ``hang[:K]`` (asynchronous, completes K folios then hangs past the timeout).
  :func:`plugin_manager` registers both modules (and any fault objects) at once::

      alloc = AllocFaults(node=1, probability=0.5, seed=3)
      pm = plugin_manager(alloc)
      m = copyengine.Machine(nodes=2, node_size="8MiB", plugin_manager=pm, engine="raisemid")
      with alloc.armed():
          p.move_pages(0, pages, [1] * len(pages))

* :func:`poison_page`, :func:`poison_free_frame` -- hwpoison a mapped page or a free frame.
"""
from __future__ import annotations

import contextlib
import errno
import threading

import numpy as np

from ..engines.base import Capabilities, Engine, copy_descriptors, folio_mc_copy, run_engine
from ..hookspecs import hookimpl

__all__ = ["AllocFaults", "CopyFaults", "RaiseMidEngine", "plugin_manager", "poison_page",
           "poison_free_frame", "SCRIBBLE"]

#: the byte failing copies leave in their destinations
SCRIBBLE = 0xEE


class _Armed:
    """Shared arming logic: a seeded generator, a failure budget, a log."""

    def __init__(self, probability, count, seed, armed):
        if not 0.0 <= probability <= 1.0:
            raise ValueError(f"probability must be in [0, 1], got {probability}")
        if count is not None and count < 0:
            raise ValueError(f"count must be >= 0 or None, got {count}")
        self.probability = float(probability)
        self.count = count            # failures still to inject; None: no limit
        self.rng = np.random.default_rng(seed)
        self.enabled = armed
        self.injected = 0             # failures injected so far
        self.log = []                 # one tuple per injected failure
        self._lock = threading.Lock()

    def arm(self, count=None):
        """Start injecting (``count`` more failures at most, if given)."""
        with self._lock:
            if count is not None:
                self.count = count
            self.enabled = True

    def disarm(self):
        with self._lock:
            self.enabled = False

    @contextlib.contextmanager
    def armed(self, count=None):
        """Inject only inside the ``with`` block."""
        self.arm(count)
        try:
            yield self
        finally:
            self.disarm()

    def _fire(self) -> bool:
        """Called under the lock: is this call to fail?"""
        if not self.enabled or self.count == 0:
            return False
        if self.probability < 1.0 and self.rng.random() >= self.probability:
            return False
        return True

    def _spend(self, entry):
        self.injected += 1
        self.log.append(entry)
        if self.count is not None:
            self.count -= 1


class AllocFaults(_Armed):
    """Make frame allocation come up short (``copyengine_alloc_frames``).

    A call on a matching ``node`` (None: any) and ``order`` (None: any) fails with
    ``probability``, at most ``count`` times (None: unlimited): it hands out at most
    ``keep`` of the folios asked for (default 0). ``budget`` instead (or as well) caps
    the base pages matching calls may still take in all: once spent, every matching
    call comes up short. Migration then reports -ENOMEM per page (a large folio may be
    split and its pieces retried); a page fault raises ``OSError(ENOMEM)``.
    """

    def __init__(self, node=None, order=None, probability=1.0, count=None, keep=0, budget=None,
                 seed=0, armed=True):
        super().__init__(probability, count, seed, armed)
        if keep < 0:
            raise ValueError(f"keep must be >= 0, got {keep}")
        self.node, self.order, self.keep, self.budget = node, order, int(keep), budget

    def __repr__(self):
        return (f"AllocFaults(node={self.node}, order={self.order}, p={self.probability}, "
                f"count={self.count}, keep={self.keep}, budget={self.budget}, injected={self.injected})")

    @hookimpl(tryfirst=True)
    def copyengine_alloc_frames(self, machine, node, order, count):
        if (self.node is not None and node != self.node) or (self.order is not None and order != self.order):
            return None
        with self._lock:
            if not self.enabled or not count:
                return None
            give = count
            if self.budget is not None:
                give = min(give, max(self.budget, 0) >> order)   # the budget is spent
            if give == count and self._fire():
                give = min(count - 1, self.keep)
            got = machine.buddy.alloc(node, order, give)
            if self.budget is not None:
                self.budget -= len(got) << order
            if give < count:
                self._spend(("alloc", node, order, count, len(got)))
            return got


class CopyFaults(_Armed):
    """Break batch copies (``copyengine_batch_copy``, in front of the chosen engine).

    ``kind``:

    * ``"eio"`` -- the engine runs; then each descriptor is failed with probability
      ``fail``: its destination is scribbled on and its folio reported -EIO (an engine
      that wrote garbage and said so).
    * ``"raise"`` -- copies the first ``after`` descriptors (default: half), scribbles on
      the next, and raises RuntimeError mid-batch.
    * ``"nothing"`` -- copies nothing and reports -EIO for every folio.
    * ``"badresult"`` -- the engine runs, then a result of the wrong shape is returned.

    Each batch is affected with ``probability``, at most ``count`` batches (None: all).
    The framework must then copy the failed folios with ``folio_mc_copy`` and lose nothing.
    """

    KINDS = ("eio", "raise", "nothing", "badresult")

    def __init__(self, kind="eio", probability=1.0, count=None, fail=0.5, after=None, seed=0,
                 armed=True):
        if kind not in self.KINDS:
            raise ValueError(f"kind must be one of {', '.join(self.KINDS)}, got {kind!r}")
        super().__init__(probability, count, seed, armed)
        self.kind, self.fail, self.after = kind, float(fail), after

    def __repr__(self):
        return f"CopyFaults({self.kind!r}, p={self.probability}, count={self.count}, injected={self.injected})"

    @hookimpl(tryfirst=True)
    def copyengine_batch_copy(self, machine, engine, job):
        with self._lock:
            if not self._fire():
                return None
            self._spend((self.kind, engine.name, job.nr_folios))
            pick = self.rng.random(len(job.nbytes)) < self.fail
        if self.kind == "raise":
            k = len(job.src_off) // 2 if self.after is None else min(self.after, len(job.src_off))
            copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, range(k))
            if k < len(job.src_off):
                d = int(job.dst_off[k])
                job.mem[d:d + int(job.nbytes[k])] = SCRIBBLE
            raise RuntimeError(f"injected: engine {engine.name} fell over after {k} descriptors")
        if self.kind == "nothing":
            return np.full(job.nr_folios, -errno.EIO, np.int32)
        result = np.asarray(run_engine(engine, job, machine.settings["copy_timeout"])).astype(np.int32)
        if self.kind == "badresult":
            return np.zeros(job.nr_folios + 1, np.int32)
        for i in np.nonzero(pick)[0].tolist():
            d, n = int(job.dst_off[i]), int(job.nbytes[i])
            job.mem[d:d + n] = SCRIBBLE
            result[int(job.folio[i])] = -errno.EIO
        return result


class RaiseMidEngine(Engine):
    """Copies the first ``after`` descriptors of a batch (None: half), scribbles on the
    next one, and raises: an engine that falls over mid-batch."""
    capabilities = Capabilities(threads=1, mc_safe=True)

    def __init__(self, after=None):
        self.after = after
        self.raised = 0

    def copy(self, job):
        n = len(job.src_off)
        k = n // 2 if self.after is None else min(self.after, n)
        ok = [i for i in range(k) if not job.src_poisoned[int(job.folio[i])]]
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, ok)
        if k >= n:   # nothing left to fall over on: a clean (mc-safe) finish
            return folio_mc_copy(job, np.arange(job.nr_folios))
        d = int(job.dst_off[k])
        job.mem[d:d + int(job.nbytes[k])] = SCRIBBLE
        self.raised += 1
        raise RuntimeError(f"raisemid: fell over after {k} of {n} descriptors")


def _raisemid(arg, machine):
    if arg is None:
        return RaiseMidEngine()
    try:
        k = int(arg, 10)
    except ValueError:
        k = -1
    if k < 0:
        raise ValueError(f"raisemid:{arg}: the argument is the number of descriptors copied "
                         f"before raising, an integer >= 0")
    return RaiseMidEngine(k)


@hookimpl
def copyengine_register_engines(register):
    register("raisemid", _raisemid,
             "test: copies K descriptors (default half), scribbles on the next, raises (raisemid:K)")


def plugin_manager(*plugins, entry_points=False):
    """A plugin manager with the built-ins, :mod:`copyengine.testing.engines`, this
    module's engines, and ``plugins`` (fault objects such as :class:`AllocFaults`)."""
    import sys

    from ..plugins import make_plugin_manager
    from . import engines as test_engines
    return make_plugin_manager(entry_points=entry_points,
                               plugins=[test_engines, sys.modules[__name__], *plugins])


# ----------------------------------------------------------------------------- hwpoison
def poison_page(process, addr) -> int:
    """Hwpoison the frame mapped at ``addr`` of ``process``; returns its pfn."""
    pfn = process.pfn_of(addr)
    process.machine.hwpoison(pfn)
    return pfn


def poison_free_frame(m, node, rng=None) -> int | None:
    """Hwpoison one free frame of ``node`` (the first, or a random one with ``rng``);
    returns its pfn, or None if the node has no free frame. The frame leaves the
    allocator for good: free memory on ``node`` drops by one."""
    with m.lock:
        blocks = m.buddy.free_blocks(node)
        frames = [np.arange(h, h + (1 << k)) for k, hs in enumerate(blocks) for h in hs.tolist()]
        if not frames:
            return None
        frames = np.concatenate(frames)
        pfn = int(frames.min() if rng is None else rng.choice(frames))
        m.hwpoison(pfn)
        return pfn
