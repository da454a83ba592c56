"""The kit's checks of one engine, each a function of :class:`~.env.Options`: capabilities,
an empty job, random jobs (directly and through the ``copyengine_batch_copy`` hook),
poisoned folios, concurrent jobs, and for asynchronous engines cancel and timeout (the
``dmaengine_terminate_sync`` promise: nothing writes once ``cancel()`` returned)."""
from __future__ import annotations

import errno
import json
import threading
import time

import numpy as np
from hypothesis import strategies as st

from ...engines.base import PENDING, Capabilities, CopyJob, Engine
from .env import _hyp, _run_property, engine_env, run_engine
from .layouts import NODE_SIZE, PAGE, Layout, fill, layouts
from .rules import (_check_fallback, _check_outcome, _check_outside, _check_result, _fail,
                    _folio_ok)


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
