"""The engine conformance kit: the checks every copy engine must pass.

Use it from pytest with one class::

    from copyengine.testing import EngineConformance

    class TestMyEngine(EngineConformance):
        engine_spec = "mydma:2"            # any spec the plugin manager knows
        # plugins = ["mydma.plugin"]       # register plugins not installed as entry points
        # engine_factory = staticmethod(lambda machine: MyEngine())   # instead of a spec
        # granule = 8          # descriptors are multiples of this many bytes (1: any byte)
        # may_decline = False  # True: clean folios may report an errno (CPU fallback)

or without pytest: ``check_engine("mydma:2")`` runs every check and raises
:class:`ConformanceError` (an AssertionError) at the first violation.

What is checked (each a ``test_*`` method, each also a ``check_*`` function here):

* ``test_capabilities`` — capabilities are a :class:`Capabilities` with sane values,
  ``describe()`` is a JSON-able dict, ``close()`` may be called twice.
* ``test_empty_job`` — a job with no folios returns an empty int32 result.
* ``test_random_jobs`` — hypothesis draws folio counts and sizes (4 KiB .. 2 MiB),
  places sources and destinations at random, cuts folios into several descriptors (at
  ``granule`` multiples, sometimes in shuffled order) and poisons a few sources. The
  result must be an int32 array with one entry per folio, every entry 0 or a negative
  errno; a folio reported 0 has every destination byte equal to its source; a clean folio
  reports 0 (unless ``may_decline``); not one byte outside the destinations changes (not
  even a source); after the framework's ``folio_mc_copy`` fallback every clean folio is
  intact. For asynchronous engines the kit polls the completion while it runs: any folio
  reported 0, in whatever order, must already be complete.
* ``test_poisoned_folio`` — one poisoned source among clean folios fails only its folio:
  a machine-check-safe engine (``capabilities.mc_safe``) reports -EHWPOISON and leaves
  that destination untouched (it must never read the source); an engine that is not
  mc-safe reports -EIO (or -EHWPOISON) and may have written that destination; the
  fallback then reports -EHWPOISON.
* ``test_framework_path`` — the same jobs through the ``copyengine_batch_copy`` hook (the
  path the migration state machine takes), then the fallback.
* ``test_concurrent_jobs`` — two threads copy disjoint jobs with the same engine at once.
* ``test_cancel_no_write`` (asynchronous engines) — ``cancel()`` at various moments
  returns promptly; afterwards no byte of memory and no result entry changes; folios
  reported 0 before it are complete.
* ``test_timeout`` (asynchronous engines) — ``wait`` with a tiny timeout returns None or
  the result; on None the kit cancels as the framework would; the framework path with a
  tiny ``copy_timeout`` still yields intact folios after the fallback.

An engine that raises :class:`copyengine.EngineUnavailable` here (no device on this host)
makes every check of the class skip, with the reason (``skip_unavailable = False`` makes
them fail instead); ``check_engine`` lets the exception through.

Jobs are built over the memory of a small :class:`copyengine.Machine` (2 nodes of 4 MiB)
that the kit creates with the chosen plugins, so engines see the real ``job.mem`` shape.
Machine-check safety can only be observed through its effects: the kit cannot see reads,
so it checks that an mc-safe engine writes nothing of a poisoned folio.
"""
from __future__ import annotations

import contextlib
import errno
import json
import threading
import time
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Flaky

from ..engines.base import PENDING, Capabilities, CopyJob, Engine, create_engine, folio_mc_copy
from ..errors import EHWPOISON, EngineUnavailable

PAGE = 4096
NODE_SIZE = 4 << 20
#: bytes of folios per side (sources, destinations) of one generated job
BUDGET = 3 << 20
MAX_ERRNO = 4095


class ConformanceError(AssertionError):
    """An engine broke the protocol; the message says how and where."""


def _fail(msg):
    raise ConformanceError(msg)


# ----------------------------------------------------------------------------- options
@dataclass
class Options:
    """What the kit is told about the engine under test."""
    spec: object = None          # str spec, or callable(machine) -> Engine
    plugins: tuple = ()
    granule: int = 8
    may_decline: bool = False
    timeout: float = 30.0        # seconds an asynchronous job may take to complete
    settle: float = 0.05         # seconds to watch for writes after cancel()
    max_examples: int | None = None
    shrink: bool = True          # False: report the first failing example as found


@contextlib.contextmanager
def engine_env(opts: Options):
    """A small machine (with the chosen plugins) and a fresh engine on it; both closed at
    the end. Memory is filled with a random pattern once."""
    from ..machine import Machine
    from ..plugins import get_plugin_manager, make_plugin_manager
    pm = make_plugin_manager(plugins=opts.plugins) if opts.plugins else get_plugin_manager()
    m = Machine(nodes=2, node_size=NODE_SIZE, page_size=PAGE, plugin_manager=pm)
    engine = None
    try:
        if isinstance(opts.spec, str):
            engine = create_engine(opts.spec, m, m.engines())
        elif callable(opts.spec):
            engine = opts.spec(m)
        else:
            _fail("set engine_spec (a spec string) or engine_factory (machine -> Engine)")
        if not isinstance(engine, Engine):
            _fail(f"the factory returned {type(engine).__name__}, not a copyengine Engine")
        m.mem[:] = np.random.default_rng(12345).integers(0, 256, len(m.mem), dtype=np.uint8)
        yield m, engine
    finally:
        if isinstance(engine, Engine):
            engine.close()
        m.close()


# ----------------------------------------------------------------------------- layouts
@dataclass
class Layout:
    """A generated job: folios (sizes, source and destination offsets), descriptor cuts
    inside each folio, poisoned folios, descriptor order."""
    sizes: list
    src: list
    dst: list
    cuts: list          # per folio: sorted byte offsets where a new descriptor starts
    poisoned: list
    order: list | None  # descriptor permutation, None for folio order

    def job(self, mem) -> CopyJob:
        s, d, n, f = [], [], [], []
        for i, size in enumerate(self.sizes):
            edges = [0] + list(self.cuts[i]) + [size]
            for a, b in zip(edges, edges[1:]):
                s.append(self.src[i] + a)
                d.append(self.dst[i] + a)
                n.append(b - a)
                f.append(i)
        arrays = [np.array(x, np.int64) for x in (s, d, n, f)]
        if self.order is not None and len(s):
            perm = np.array(self.order, np.int64)
            arrays = [a[perm] for a in arrays]
        return CopyJob(mem, *arrays, np.array(self.poisoned, bool))

    def describe(self):
        return (f"{len(self.sizes)} folios sizes={self.sizes} poisoned="
                f"{[i for i, p in enumerate(self.poisoned) if p]} "
                f"descriptors={sum(len(c) + 1 for c in self.cuts)}"
                f"{' shuffled' if self.order is not None else ''}")


def _place(draw, sizes, base, limit):
    """Page-aligned offsets for ``sizes`` in [base, limit), random order and gaps."""
    perm = draw(st.permutations(range(len(sizes))))
    gaps = draw(st.lists(st.integers(0, 2), min_size=len(sizes), max_size=len(sizes)))
    out = [0] * len(sizes)
    pos = base
    for k, i in enumerate(perm):
        pos += gaps[k] * PAGE
        out[i] = pos
        pos += sizes[i]
    assert pos <= limit
    return out


@st.composite
def layouts(draw, granule=8, min_folios=0, max_folios=12, poison=True, exactly_one_poisoned=False):
    """Hypothesis strategy of :class:`Layout` over a kit machine's memory."""
    orders = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 6, 9]),
                           min_size=min_folios, max_size=max_folios))
    sizes, total = [], 0
    for o in orders:
        size = PAGE << o
        if total + size > BUDGET:
            size = PAGE
        if total + size > BUDGET:
            break
        sizes.append(size)
        total += size
    while len(sizes) < min_folios:
        sizes.append(PAGE)
    src = _place(draw, sizes, PAGE, NODE_SIZE)
    dst = _place(draw, sizes, NODE_SIZE, 2 * NODE_SIZE)
    cuts = []
    for size in sizes:
        units = size // granule
        pts = draw(st.lists(st.integers(1, units - 1), max_size=3, unique=True)) if units > 1 else []
        cuts.append(sorted(p * granule for p in pts))
    n = len(sizes)
    if exactly_one_poisoned and n:
        bad = {draw(st.integers(0, n - 1))}
    elif poison and n:
        bad = draw(st.sets(st.integers(0, n - 1), max_size=2))
    else:
        bad = set()
    poisoned = [i in bad for i in range(n)]
    ndesc = sum(len(c) + 1 for c in cuts)
    order = draw(st.none() | st.permutations(range(ndesc))) if ndesc > 1 else None
    return Layout(sizes, src, dst, cuts, poisoned, order)


def fill(mem, job, seed):
    """Random sources; destinations the complement of their sources (every byte differs)."""
    rng = np.random.default_rng(seed)
    for s, d, n in zip(job.src_off.tolist(), job.dst_off.tolist(), job.nbytes.tolist()):
        mem[s:s + n] = rng.integers(0, 256, n, dtype=np.uint8)
        mem[d:d + n] = ~mem[s:s + n]


# ----------------------------------------------------------------------------- checks
def _folio_ok(mem, job, f) -> bool:
    for i in np.nonzero(job.folio == f)[0]:
        s, d, n = int(job.src_off[i]), int(job.dst_off[i]), int(job.nbytes[i])
        if not np.array_equal(mem[s:s + n], mem[d:d + n]):
            return False
    return True


def _folio_untouched(mem, before, job, f) -> bool:
    for i in np.nonzero(job.folio == f)[0]:
        d, n = int(job.dst_off[i]), int(job.nbytes[i])
        if not np.array_equal(mem[d:d + n], before[d:d + n]):
            return False
    return True


def _check_result(result, job, what="result"):
    if not isinstance(result, np.ndarray):
        _fail(f"{what} is a {type(result).__name__}, not a numpy array")
    if result.dtype != np.int32 or result.shape != (job.nr_folios,):
        _fail(f"{what} must be int32 of shape ({job.nr_folios},), got {result.dtype} {result.shape}")
    bad = np.nonzero((result > 0) | (result < -MAX_ERRNO))[0]
    if len(bad):
        _fail(f"{what}[{bad[0]}] = {result[bad[0]]}: entries are 0 or a negative errno")


def _check_outside(mem, before, job, allowed_folios, ctx):
    """Nothing changed outside the destinations of ``allowed_folios``."""
    changed = np.flatnonzero(mem != before)
    if not len(changed):
        return
    allowed = np.zeros(len(mem), bool)
    ok = np.zeros(job.nr_folios, bool)
    ok[list(allowed_folios)] = True
    for d, n, f in zip(job.dst_off.tolist(), job.nbytes.tolist(), job.folio.tolist()):
        if ok[f]:
            allowed[d:d + n] = True
    stray = changed[~allowed[changed]]
    if len(stray):
        where = int(stray[0])
        _fail(f"{len(stray)} byte(s) written outside the destinations, first at offset {where} "
              f"(0x{where:x}); {ctx}")


def _check_outcome(mem, before, job, result, caps, may_decline, ctx, timed_out=False):
    """The per-folio rules on a finished result, then the fallback. ``may_decline``: any
    folio may report another errno (the CPU copies it); ``timed_out``: the framework
    cancelled the job, so any folio may report -ETIMEDOUT (never done)."""
    _check_result(result, job)
    if (result == PENDING).any():
        _fail(f"a finished job still reports -EINPROGRESS for folios "
              f"{np.nonzero(result == PENDING)[0].tolist()}; {ctx}")
    _check_outside(mem, before, job, range(job.nr_folios), ctx)
    for f in range(job.nr_folios):
        r = int(result[f])
        excused = r < 0 and (may_decline or (timed_out and r == -errno.ETIMEDOUT))
        if job.src_poisoned[f]:
            if caps.mc_safe:
                if r != -EHWPOISON and not excused:
                    _fail(f"folio {f} has a poisoned source: an mc-safe engine reports "
                          f"-EHWPOISON ({-EHWPOISON}), got {r}; {ctx}")
                if not _folio_untouched(mem, before, job, f):
                    _fail(f"folio {f} has a poisoned source, yet an mc-safe engine wrote its "
                          f"destination (it must never read that source); {ctx}")
            elif r not in (-errno.EIO, -EHWPOISON) and not excused:
                _fail(f"folio {f} has a poisoned source: an engine that is not mc-safe reports "
                      f"-EIO ({-errno.EIO}), got {r}; {ctx}")
        elif r == 0:
            if not _folio_ok(mem, job, f):
                _fail(f"folio {f} reported 0 but its destination differs from its source; {ctx}")
        elif not excused:
            _fail(f"clean folio {f} reported {r} ({errno.errorcode.get(-r, '?')}); set "
                  f"may_decline = True if the engine may leave folios to the CPU; {ctx}")
    _check_fallback(mem, job, result, ctx)


def _check_fallback(mem, job, result, ctx):
    """What the state machine does next: folio_mc_copy every folio not reported 0."""
    redo = np.nonzero(result != 0)[0]
    status = folio_mc_copy(job, redo) if len(redo) else np.zeros(0, np.int32)
    for f, s in zip(redo.tolist(), status.tolist()):
        want = -EHWPOISON if job.src_poisoned[f] else 0
        if s != want:
            _fail(f"fallback folio_mc_copy of folio {f} gave {s}, expected {want}; {ctx}")
    for f in range(job.nr_folios):
        if not job.src_poisoned[f] and not _folio_ok(mem, job, f):
            _fail(f"after the fallback, folio {f} is still not intact; {ctx}")


def run_engine(engine, job, timeout, watch=None):
    """Run ``job`` to completion, synchronously or through ``submit``/``wait``. ``watch``
    is called with a snapshot of the partial result while an asynchronous job runs."""
    if not engine.capabilities.asynchronous:
        return engine.copy(job)
    completion = engine.submit(job)
    deadline = time.monotonic() + timeout
    while not completion.done():
        if watch is not None:
            watch(completion.result.copy())
        if time.monotonic() > deadline:
            completion.cancel()
            _fail(f"an asynchronous job of {job.nr_folios} folios did not complete in {timeout} s")
        time.sleep(0.0002)
    result = completion.wait(timeout)
    if result is None:
        _fail("Completion.done() was true but wait() timed out")
    return result


def check_layout(m, engine, layout, seed, opts, framework=False):
    """One job: fill, run (directly or through the batch-copy hook), check everything."""
    mem = m.mem
    job = layout.job(mem)
    fill(mem, job, seed)
    before = mem.copy()
    caps = engine.capabilities
    ctx = f"engine {engine.name!r}, job: {layout.describe()}"
    if framework:
        result = m.pm.hook.copyengine_batch_copy(machine=m, engine=engine, job=job)
        result = np.asarray(result)
    else:
        checked = np.zeros(job.nr_folios, bool)

        def watch(partial):
            done = np.nonzero((partial == 0) & ~checked)[0]
            for f in done.tolist():
                if not _folio_ok(mem, job, f):
                    _fail(f"folio {f} was reported 0 (completed) before its bytes were all "
                          f"copied; {ctx}")
                checked[f] = True

        result = run_engine(engine, job, opts.timeout, watch)
    _check_outcome(mem, before, job, result, caps, opts.may_decline, ctx)


def _hyp(opts, *strategies):
    kw = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    if opts.max_examples is not None:
        kw["max_examples"] = opts.max_examples
    if not opts.shrink:
        kw["phases"] = [Phase.explicit, Phase.reuse, Phase.generate]

    def deco(fn):
        return settings(**kw)(given(*strategies)(fn))
    return deco


def _run_property(run):
    """Run a hypothesis property; a violation that did not reproduce on a re-run (a race)
    is still a violation: raise it as such rather than as hypothesis' Flaky."""
    try:
        run()
    except Flaky as e:
        inner = [x for x in getattr(e, "exceptions", ()) if isinstance(x, ConformanceError)]
        if not inner:
            raise
        raise ConformanceError(f"{inner[0]} [timing-dependent: it did not happen again when "
                               f"the example was re-run]") from e


def check_capabilities(opts):
    with engine_env(opts) as (m, engine):
        caps = engine.capabilities
        if not isinstance(caps, Capabilities):
            _fail(f"capabilities is a {type(caps).__name__}, not copyengine.engines.Capabilities")
        for k in ("threads", "channels", "min_bytes", "max_batch"):
            v = getattr(caps, k)
            if not isinstance(v, (int, np.integer)) or isinstance(v, bool) or v < 0:
                _fail(f"capabilities.{k} = {v!r}: a non-negative int")
        for k in ("asynchronous", "mc_safe"):
            if not isinstance(getattr(caps, k), bool):
                _fail(f"capabilities.{k} must be a bool")
        if caps.threads < 1 and caps.channels < 1:
            _fail("an engine copies with at least one thread or one channel")
        impl = "submit" if caps.asynchronous else "copy"
        if getattr(type(engine), impl) is getattr(Engine, impl):
            _fail(f"an {'a' if caps.asynchronous else ''}synchronous engine implements {impl}()")
        info = engine.describe()
        if not isinstance(info, dict):
            _fail(f"describe() returns a dict, not {type(info).__name__}")
        try:
            json.dumps(info)
        except (TypeError, ValueError) as e:
            _fail(f"describe() must be JSON-serializable: {e}")
        engine.close()   # the env closes it again: close() is idempotent


def check_empty_job(opts):
    with engine_env(opts) as (m, engine):
        z = np.zeros(0, np.int64)
        job = CopyJob(m.mem, z, z, z, z, np.zeros(0, bool))
        result = run_engine(engine, job, opts.timeout)
        _check_result(result, job, "the result of an empty job")


def check_random_jobs(opts, framework=False):
    with engine_env(opts) as (m, engine):
        @_hyp(opts, layouts(granule=opts.granule), st.integers(0, 2 ** 32 - 1))
        def run(layout, seed):
            check_layout(m, engine, layout, seed, opts, framework)
        _run_property(run)


def check_poisoned_folio(opts):
    with engine_env(opts) as (m, engine):
        @_hyp(opts, layouts(granule=opts.granule, min_folios=2, exactly_one_poisoned=True),
              st.integers(0, 2 ** 32 - 1))
        def run(layout, seed):
            check_layout(m, engine, layout, seed, opts)
        _run_property(run)


def check_framework_path(opts):
    check_random_jobs(opts, framework=True)


def check_concurrent_jobs(opts, rounds=10):
    """Two threads copy disjoint jobs with one engine at the same time."""
    with engine_env(opts) as (m, engine):
        half = NODE_SIZE // 2

        def layout(k):
            sizes = [1 << 20 if k == 0 else 64 << 10] + [PAGE] * 8
            src, dst, pos = [], [], 0
            for size in sizes:
                src.append(PAGE + k * half + pos)
                dst.append(NODE_SIZE + k * half + pos)
                pos += size
            return Layout(sizes, src, dst, [[] for _ in sizes], [False] * len(sizes), None)

        layouts_ = [layout(0), layout(1)]
        errors = []
        barrier = threading.Barrier(2)

        def worker(k):
            try:
                for r in range(rounds):
                    job = layouts_[k].job(m.mem)
                    fill(m.mem, job, 1000 * k + r)
                    barrier.wait(opts.timeout)
                    result = run_engine(engine, job, opts.timeout)
                    _check_result(result, job)
                    for f in range(job.nr_folios):
                        if result[f] == 0 and not _folio_ok(m.mem, job, f):
                            _fail(f"concurrent jobs: folio {f} of thread {k} reported 0 but "
                                  f"differs from its source (round {r})")
                        if result[f] != 0 and not opts.may_decline:
                            _fail(f"concurrent jobs: clean folio {f} reported {result[f]}")
            except BaseException as e:  # noqa: BLE001 - reported by the main thread
                errors.append(e)
                barrier.abort()

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(opts.timeout * rounds)
        real = [e for e in errors if not isinstance(e, threading.BrokenBarrierError)]
        if real:
            raise real[0]
        if errors:
            raise errors[0]


def _cancel_checked(completion, opts, ctx):
    """cancel() must return within the timeout."""
    t = threading.Thread(target=completion.cancel, daemon=True)
    t.start()
    t.join(opts.timeout)
    if t.is_alive():
        _fail(f"cancel() did not return within {opts.timeout} s; {ctx}")


def _after_cancel(m, job, completion, before, opts, mc_safe, ctx):
    mem = m.mem
    after = mem.copy()
    res = completion.result.copy()
    time.sleep(opts.settle)
    changed = np.flatnonzero(mem != after)
    if len(changed):
        _fail(f"{len(changed)} byte(s) written after cancel() returned, first at offset "
              f"{int(changed[0])}; {ctx}")
    if not np.array_equal(res, completion.result):
        _fail(f"result entries changed after cancel() returned; {ctx}")
    _check_result(res, job, "the result after cancel()")
    for f in np.nonzero(res == 0)[0].tolist():
        if job.src_poisoned[f]:
            _fail(f"poisoned folio {f} reported 0; {ctx}")
        if not _folio_ok(mem, job, f):
            _fail(f"folio {f} reported 0 before cancel() but is not intact; {ctx}")
    writable = [f for f in range(job.nr_folios) if not (job.src_poisoned[f] and mc_safe)]
    _check_outside(mem, before, job, writable, ctx)
    _check_fallback(mem, job, np.where(res == PENDING, -errno.ETIMEDOUT, res).astype(np.int32), ctx)


def _cancel_layout():
    sizes = [2 << 20, 256 << 10] + [PAGE] * 30 + [64 << 10] * 4
    src, dst, pos = [], [], PAGE
    for size in sizes:
        src.append(pos)
        dst.append(NODE_SIZE + pos)
        pos += size
    poisoned = [i == 5 for i in range(len(sizes))]
    return Layout(sizes, src, dst, [[] for _ in sizes], poisoned, None)


def check_cancel_no_write(opts, delays=(0.0, 0.0005, 0.002, 0.01)):
    with engine_env(opts) as (m, engine):
        if not engine.capabilities.asynchronous:
            return "synchronous engine: nothing to cancel"
        layout = _cancel_layout()
        for k, delay in enumerate(delays):
            job = layout.job(m.mem)
            fill(m.mem, job, k)
            before = m.mem.copy()
            ctx = f"engine {engine.name!r}, cancel after {delay * 1e3:.1f} ms"
            completion = engine.submit(job)
            if delay:
                time.sleep(delay)
            _cancel_checked(completion, opts, ctx)
            _after_cancel(m, job, completion, before, opts, engine.capabilities.mc_safe, ctx)


def check_timeout(opts):
    with engine_env(opts) as (m, engine):
        if not engine.capabilities.asynchronous:
            return "synchronous engine: no timeout"
        layout = _cancel_layout()
        job = layout.job(m.mem)
        fill(m.mem, job, 7)
        before = m.mem.copy()
        ctx = f"engine {engine.name!r}, wait(1e-6)"
        completion = engine.submit(job)
        got = completion.wait(1e-6)
        if got is None:
            _cancel_checked(completion, opts, ctx)
            _after_cancel(m, job, completion, before, opts, engine.capabilities.mc_safe, ctx)
        else:
            _check_outcome(m.mem, before, job, got, engine.capabilities, opts.may_decline, ctx)
        # the framework path with a tiny copy_timeout
        m.settings["copy_timeout"] = 1e-6
        job = layout.job(m.mem)
        fill(m.mem, job, 8)
        before = m.mem.copy()
        ctx = f"engine {engine.name!r}, framework path with copy_timeout=1e-6"
        result = np.asarray(m.pm.hook.copyengine_batch_copy(machine=m, engine=engine, job=job))
        after = m.mem.copy()
        time.sleep(opts.settle)
        if not np.array_equal(after, m.mem):
            _fail(f"bytes written after the framework cancelled the job; {ctx}")
        _check_outcome(m.mem, before, job, result, engine.capabilities, opts.may_decline, ctx,
                       timed_out=True)


# ----------------------------------------------------------------------------- front ends
CHECKS = {
    "capabilities": check_capabilities,
    "empty_job": check_empty_job,
    "random_jobs": check_random_jobs,
    "poisoned_folio": check_poisoned_folio,
    "framework_path": check_framework_path,
    "concurrent_jobs": check_concurrent_jobs,
    "cancel_no_write": check_cancel_no_write,
    "timeout": check_timeout,
}


def check_engine(spec_or_factory, *, plugins=(), granule=8, may_decline=False, timeout=30.0,
                 max_examples=None, only=None, shrink=True) -> dict:
    """Run the conformance checks on an engine; raise :class:`ConformanceError` at the
    first violation. ``spec_or_factory`` is a spec string or a callable(machine) ->
    Engine. Returns ``{check name: "passed" or "skipped: why"}``. ``timeout``: seconds an
    asynchronous job may take before the kit calls it hung (as
    :attr:`EngineConformance.timeout`). ``only``: a list of check names (see :data:`CHECKS`).
    ``shrink=False`` reports the first failing example as found (a hung engine costs
    ``timeout`` per example hypothesis tries while shrinking)."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    opts = Options(spec_or_factory, tuple(plugins), granule, may_decline, float(timeout),
                   max_examples=max_examples, shrink=bool(shrink))
    out = {}
    for name, fn in CHECKS.items():
        if only is not None and name not in only:
            continue
        skipped = fn(opts)
        out[name] = f"skipped: {skipped}" if skipped else "passed"
    return out


class EngineConformance:
    """Subclass in a pytest module (name it ``Test...``) and set ``engine_spec`` or
    ``engine_factory``; every ``test_*`` method is one check of the kit."""

    engine_spec: str | None = None
    #: callable(machine) -> Engine, used when engine_spec is None (wrap in staticmethod)
    engine_factory = None
    #: plugins to register (modules, objects or dotted names) besides the installed ones
    plugins: tuple = ()
    #: descriptor offsets and lengths are multiples of this (1: any byte)
    granule: int = 8
    #: clean folios may report an errno (the engine leaves them to the CPU fallback)
    may_decline: bool = False
    #: seconds an asynchronous job may take before the kit calls it hung
    timeout: float = 30.0
    #: hypothesis examples per property (None: the active hypothesis profile's)
    max_examples: int | None = None
    #: skip (rather than fail) every check when the engine raises EngineUnavailable here
    skip_unavailable: bool = True

    def conformance_options(self) -> Options:
        spec = self.engine_spec if self.engine_spec is not None else self.engine_factory
        return Options(spec, tuple(self.plugins), self.granule, self.may_decline,
                       self.timeout, max_examples=self.max_examples)

    def _run(self, fn):
        import pytest
        try:
            skipped = fn(self.conformance_options())
        except EngineUnavailable as e:
            if not self.skip_unavailable:
                raise
            pytest.skip(f"engine unavailable here: {e}")
        if skipped:
            pytest.skip(skipped)

    def test_capabilities(self):
        self._run(check_capabilities)

    def test_empty_job(self):
        self._run(check_empty_job)

    def test_random_jobs(self):
        self._run(check_random_jobs)

    def test_poisoned_folio(self):
        self._run(check_poisoned_folio)

    def test_framework_path(self):
        self._run(check_framework_path)

    def test_concurrent_jobs(self):
        self._run(check_concurrent_jobs)

    def test_cancel_no_write(self):
        self._run(check_cancel_no_write)

    def test_timeout(self):
        self._run(check_timeout)
