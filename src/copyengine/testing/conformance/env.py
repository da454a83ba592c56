"""How the kit runs an engine: its options, the kit machine, one job to completion, and
the hypothesis settings every property shares."""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass

import numpy as np
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Flaky

from ...engines.base import Engine, create_engine
from .layouts import NODE_SIZE, PAGE
from .rules import ConformanceError, _fail


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
    #: callable(engine, "small" | "large") that makes the engine take that path for the
    #: next jobs (a documented knob of the engine); None: the kit pads the job instead
    force_path: object = None


@contextlib.contextmanager
def engine_env(opts: Options, node_size: int = NODE_SIZE):
    """A small machine (2 nodes of ``node_size`` bytes, with the chosen plugins) and a
    fresh engine on it; both closed at the end. Memory is filled with a random pattern once."""
    from ...machine import Machine
    from ...plugins import get_plugin_manager, make_plugin_manager
    pm = make_plugin_manager(plugins=opts.plugins) if opts.plugins else get_plugin_manager()
    m = Machine(nodes=2, node_size=node_size, page_size=PAGE, plugin_manager=pm)
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
