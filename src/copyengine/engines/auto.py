"""``auto``: a per-batch policy over the other engines (the seed's TODOs 1 and 3).

For every batch it predicts the copy time of each candidate engine -- ``serial``, ``mt:N``
for N = 1, 2, 4 ... up to the CPUs this process may use, and ``opencl`` where an OpenCL
device is present and the batch is above its minimum -- as ``overhead + bytes /
bandwidth``, and runs the fastest. The two numbers per engine are measured on a scratch
buffer the first time the engine copies (about 10 ms each; a candidate with a minimum
batch size when the first batch it would take arrives), then corrected from
every batch it actually runs (the median ratio of measured to predicted time over the
last few batches, per engine and batch-size class), so the model follows the machine it
runs on rather than numbers written here.

**Idle CPUs** come from /proc/stat (sampled at most every 0.2 s; the load average where
/proc/stat is missing); this process's own CPU time counts as available, and so does the
calling CPU. A candidate is measured with the CPUs that were free then (``_Model.cpus``:
its threads, capped by the idle CPUs seen across the calibration); when fewer are free
now, its predicted time grows by that ratio (its threads share what is left) -- except
``mt:N``, whose threads claim work dynamically, so that one without a CPU costs little
(observations still correct its model). ``serial`` is always a candidate, so ``auto`` is
never slower than the batched single-thread copy, which is never slower than ``vanilla``
("at worst the same").

**State is per engine**, so per Machine: calibration, corrections, idle-CPU samples and
the candidates that could not be created. One Machine made while the process was
restricted to one CPU does not change what a later Machine sees.

**Why it chose**: when a ``copyengine_migration_event`` observer is registered, every
batch first sends an ``"engine_choice"`` event: ``{"engine", "nbytes", "reason",
"idle_cpus", "cpus", "predicted_us": {candidate: microseconds}}`` (``reason``: ``"least
predicted time"``, ``"more threads, predicted within 15% of the least"`` (calibration on a
hot buffer flatters one thread; see :meth:`AutoEngine.choose`), ``"exploring"``, or
``"only serial fits"``).
"""
from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import threading
import time

import numpy as np

from ..errors import EngineUnavailable
from ..hookspecs import hookimpl
from .base import Capabilities, CopyJob, Engine, run_engine
from .mt import MtEngine

_CALIBRATION_SIZES = (64 << 10, 8 << 20)
_WINDOW = 5  # batches per size class whose median corrects the model
_OUTLIER = 4.0  # a batch this much slower than predicted is noise until it repeats
_EXPLORE_EVERY = 32  # one batch in this many re-measures the least recently tried candidate
_EXPLORE_WITHIN = 4.0
_MARGIN = 0.15  # predictions this close are a tie: the candidate with more threads wins  # ... among those predicted at most this much slower than the best


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


class IdleCpus:
    """How many CPUs are free for this process: idle time plus this process's own CPU
    time, over all CPU time, between two /proc/stat samples. Counting our own time as
    available matters: the copy threads of the previous batch must not make the next
    batch think the machine is busy."""

    _CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, cpus: int, period: float = 0.2):
        self.cpus, self.period = cpus, period
        self._last = None  # (time, idle ticks, total ticks, own ticks)
        self._idle = cpus
        self._lock = threading.Lock()

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return idle, sum(ticks)

    @classmethod
    def _own(cls):
        t = os.times()
        return (t[0] + t[1]) * cls._CLK_TCK

    def __call__(self) -> int:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.period:
                return self._idle
            try:
                idle, total = self._read()
            except (OSError, ValueError, IndexError):
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
                self._idle = max(1, min(self.cpus, self.cpus - int(load) + 1))
                self._last = (now, 0, 0, 0)
                return self._idle
            own = self._own()
            if self._last is not None and total > self._last[2]:
                free = (idle - self._last[1]) + (own - self._last[3])
                frac = min(1.0, free / (total - self._last[2]))
                self._idle = max(1, min(self.cpus, int(frac * self.cpus + 0.5)))
            self._last = (now, idle, total, own)
            return self._idle


class _Model:
    """overhead + bytes/bandwidth per engine, corrected per size class from observations.
    ``cpus``: the CPUs the engine's threads had while it was measured.

    The correction is the median ratio of measured to predicted time over the last
    :data:`_WINDOW` batches of the class (the least, until there are three). The first
    batch of a class is not counted (it pays for first use: fresh frames, cold code), and
    one more than :data:`_OUTLIER` times slower than predicted counts only when the next
    is too: one slow batch -- the first into fresh memory takes the host's page faults,
    measured at 20-55x -- must not rule an engine out for good."""

    def __init__(self, overhead, bandwidth, cpus=1):
        self.overhead, self.bandwidth, self.cpus = overhead, bandwidth, cpus
        self.ratio = {}
        self.window = {}  # size class -> the last ratios measured
        self.seen = {}    # size class -> time of the last observation
        self.outlier = {}  # size class -> the last batch was an outlier, not counted

    def predict(self, nbytes):
        base = self.overhead + nbytes / self.bandwidth
        return base * self.ratio.get(_size_class(nbytes), 1.0)

    def observe(self, nbytes, seconds):
        base = self.overhead + nbytes / self.bandwidth
        c = _size_class(nbytes)
        r = seconds / base
        self.seen[c] = time.monotonic()
        if c not in self.outlier or (r > _OUTLIER * self.ratio.get(c, 1.0) and not self.outlier[c]):
            self.outlier[c] = True    # the first batch of a class, or a lone outlier
            return
        self.outlier[c] = False
        w = self.window.setdefault(c, collections.deque(maxlen=_WINDOW))
        w.append(r)
        self.ratio[c] = sorted(w)[len(w) // 2] if len(w) >= 3 else min(w)


def _size_class(nbytes):
    return max(0, int(math.log2(max(nbytes, 1))))


class _Scratch:
    """A page-aligned buffer for calibration copies (device engines need the alignment),
    touched once so that no copy pays the page faults; shared by one calibration pass."""

    def __init__(self):
        self.buf = mmap.mmap(-1, 2 * max(_CALIBRATION_SIZES))
        self.mem = np.frombuffer(self.buf, np.uint8)
        self.mem[:] = 1

    def close(self):
        self.mem = None
        with contextlib.suppress(BufferError):
            self.buf.close()


def _calibrate(engine, scratch, cpus=1) -> _Model:
    """The least of two copies of each of two sizes on ``scratch``: the line through them.
    Kept short (four copies, a few ms an engine): every Machine calibrates, and beside
    busy Python threads every release of the GIL can cost a switch interval (5 ms)."""
    mem, half = scratch.mem, max(_CALIBRATION_SIZES)
    xs, ys = [], []
    for size in _CALIBRATION_SIZES:
        job = CopyJob(mem, np.array([0], np.int64), np.array([half], np.int64),
                      np.array([size], np.int64), np.array([0], np.int64), np.zeros(1, bool))
        for a in (job.src_off, job.dst_off, job.nbytes, job.folio, job.src_poisoned):
            a.flags.writeable = False   # as migration's jobs: the compiled code loaded is theirs
        times = []
        for _ in range(2):      # the least of two: the first also warms (threads, buffers)
            t0 = time.perf_counter()
            run_engine(engine, job, 10.0)
            times.append(time.perf_counter() - t0)
        xs.append(size)
        ys.append(min(times))
    slope, intercept = np.polyfit(np.array(xs, float), np.array(ys, float), 1)
    bandwidth = 1.0 / slope if slope > 0 else 1e12
    return _Model(max(float(intercept), min(ys) * 0.5, 1e-7), float(bandwidth), cpus)


def candidate_specs(cpus: int) -> list[str]:
    """serial, mt:N for N = 1, 2, 4, ... and the CPU count, and opencl."""
    specs, n = ["serial"], 1
    while n <= cpus:
        specs.append(f"mt:{n}")
        n *= 2
    if cpus & (cpus - 1):
        specs.append(f"mt:{cpus}")
    return specs + ["opencl"]


class AutoEngine(Engine):
    """Chooses serial, mt:N or opencl per batch (see the module docstring). The candidate
    engines are created and calibrated on this engine's first copy; nothing is shared with
    another ``auto`` engine."""

    def __init__(self, machine):
        self.machine = machine
        self.cpus = available_cpus()
        self.idle = IdleCpus(self.cpus)
        self.capabilities = Capabilities(threads=self.cpus, mc_safe=True)
        self.engines = None
        self.models = {}        # spec -> _Model
        self.unavailable = {}   # spec -> why it cannot run here
        self.last_choice = None
        self.choices = {}
        self._calls = 0
        self._lock = threading.Lock()

    def _ensure(self):
        with self._lock:
            if self.engines is not None:
                return self.engines
            from ..plugins import engine_registry
            from .base import create_engine
            registry = engine_registry(self.machine.pm)
            made = {}
            for spec in candidate_specs(self.cpus):
                try:
                    made[spec] = create_engine(spec, self.machine, registry)
                except (ValueError, EngineUnavailable) as e:
                    self.unavailable[spec] = str(e)
            self.engines = made
            scratch = _Scratch()
            try:
                for spec in [s for s, e in made.items() if not e.capabilities.min_bytes]:
                    self._measure(spec, scratch)
            finally:
                scratch.close()
            return self.engines

    def _measure(self, spec, scratch=None):
        """Calibrate one candidate (an engine with a minimum batch size waits for the first
        batch it would take); one that cannot copy here is dropped, with the reason."""
        engine = self.engines[spec]
        probe = IdleCpus(self.cpus, period=0.0)
        probe()
        own = scratch is None
        try:
            scratch = scratch or _Scratch()
            model = _calibrate(engine, scratch, engine.capabilities.threads)
        except Exception as e:  # an engine that cannot copy here is no candidate
            self.unavailable[spec] = f"calibration failed: {type(e).__name__}: {e}"
            del self.engines[spec]
            engine.close()
            return
        finally:
            if own and scratch is not None:
                scratch.close()
        free = probe()           # the CPUs that were free while it was measured
        model.cpus = max(1, min(model.cpus, free))
        self.models[spec] = model

    def _factor(self, spec, idle):
        """How much slower ``spec`` is now than when measured: its threads get ``idle``
        CPUs at most, it had ``model.cpus``. Not for ``mt``: its threads claim work, so
        one without a CPU leaves its share to the others (measured beside a busy
        process: mt:2 0.90-1.24x mt:1, against 0.01x with a fixed split)."""
        engine = self.engines[spec]
        if isinstance(engine, MtEngine):
            return 1.0
        now = min(engine.capabilities.threads, idle)
        had = self.models[spec].cpus
        return had / now if now < had else 1.0

    def predictions(self, nbytes: int, idle: int) -> dict:
        """Predicted seconds per candidate that accepts a batch of ``nbytes``."""
        out = {}
        for spec, e in list(self.engines.items()):
            if e.capabilities.min_bytes and nbytes < e.capabilities.min_bytes:
                continue
            if spec not in self.models:
                with self._lock:
                    if spec not in self.models and spec in self.engines:
                        self._measure(spec)
                if spec not in self.models:
                    continue
            out[spec] = self.models[spec].predict(nbytes) * self._factor(spec, idle)
        return out

    def choose(self, nbytes: int) -> str:
        """The candidate with the least predicted time (sets ``last_reason``,
        ``last_predicted`` and ``last_idle``)."""
        self._ensure()
        idle = self.last_idle = self.idle()
        pred = self.last_predicted = self.predictions(nbytes, idle)
        if not pred:
            self.last_reason = "only serial fits"
            return "serial"
        self._calls += 1
        least = best = min(pred, key=pred.get)
        # Among those within _MARGIN of the best, the most threads: calibration copies a
        # hot buffer, which flatters one thread, and mt's extra threads claim work only
        # when they run, so they rarely cost (bench: mt:2 >= 0.9x mt:1 on every row).
        best = max((s for s in pred if pred[s] <= (1 + _MARGIN) * pred[best]),
                   key=lambda s: (self.engines[s].capabilities.threads, -pred[s]))
        self.last_reason = ("least predicted time" if best == least else
                            "more threads, predicted within 15% of the least")
        if self._calls % _EXPLORE_EVERY == 0:
            # A model measured on a busy machine could hide an engine for good: re-measure
            # the least recently tried of those not far from the best.
            near = [s for s, t in pred.items() if t <= _EXPLORE_WITHIN * pred[best]]
            c = _size_class(nbytes)
            pick = min(near, key=lambda spec: self.models[spec].seen.get(c, 0.0))
            if pick != best:
                self.last_reason = "exploring"
            return pick
        return best

    def _tell(self, spec, nbytes):
        """The engine_choice event, for observers (tracepoint-like: skipped when none)."""
        hook = self.machine.pm.hook.copyengine_migration_event
        if not hook.get_hookimpls():
            return
        hook(machine=self.machine, event="engine_choice",
             info={"engine": spec, "nbytes": int(nbytes), "reason": self.last_reason,
                   "idle_cpus": int(self.last_idle), "cpus": self.cpus,
                   "predicted_us": {s: round(t * 1e6, 2) for s, t in self.last_predicted.items()}})

    def delegate(self, nbytes: int):
        """``(spec, engine)`` that a batch of ``nbytes`` goes to, the engine_choice event
        sent. For a caller that runs the copy itself (a framework with a faster path for
        some engine); it reports the time with :meth:`record`."""
        spec = self.choose(nbytes)
        self._tell(spec, nbytes)
        return spec, self.engines[spec]

    def record(self, spec: str, nbytes: int, seconds: float) -> None:
        """A batch of ``nbytes`` that ``spec`` copied in ``seconds``: corrects its model."""
        factor = self._factor(spec, self.last_idle) if spec in self.engines else 1.0
        if spec in self.models:
            self.models[spec].observe(nbytes, seconds / factor)
        self.last_choice = spec
        self.choices[spec] = self.choices.get(spec, 0) + 1

    def copy(self, job):
        nbytes = job.total_bytes
        spec, engine = self.delegate(nbytes)
        t0 = time.perf_counter()
        res = run_engine(engine, job, self.machine.settings["copy_timeout"])
        self.record(spec, nbytes, time.perf_counter() - t0)
        return res

    def describe(self):
        self._ensure()
        return {"candidates": {s: {"overhead_us": round(m.overhead * 1e6, 2),
                                   "bandwidth_gbps": round(m.bandwidth / 1e9, 2),
                                   "cpus": m.cpus}
                               for s, m in self.models.items() if s in self.engines},
                "unavailable": dict(self.unavailable), "cpus": self.cpus, "idle_cpus": self.idle()}

    def close(self):
        with self._lock:
            engines, self.engines = self.engines, None
        for engine in (engines or {}).values():
            engine.close()


def _factory(arg, machine):
    if arg is not None:
        raise ValueError(f"engine 'auto' takes no argument (got {arg!r})")
    return AutoEngine(machine)


@hookimpl
def copyengine_register_engines(register):
    register("auto", _factory, "per-batch choice of serial, mt:N or opencl from measured costs and idle CPUs")
