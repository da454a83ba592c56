"""``auto``: a per-batch policy over the other engines (the seed's TODOs 1 and 3).

For every batch it predicts the copy time of each candidate engine -- ``serial``, ``mt:N``
for N = 1, 2, 4 ... up to the CPUs this process may use, and ``opencl`` where an OpenCL
device is present and the batch is above its minimum -- as ``overhead + bytes /
bandwidth``, and runs the fastest. The two numbers per engine are measured on a scratch
buffer the first time the engine copies (a few ms each; a candidate with a minimum batch
size when the first batch it would take arrives), then corrected from every batch it
actually runs (the median ratio of measured to predicted time over the last few batches,
per engine and batch-size class; a class not yet seen borrows the nearest seen one's), so
the model follows the machine it runs on rather than numbers written here.

**Two regimes.** An engine that copies small batches on the calling CPU alone
(``Capabilities.inline_bytes``: ``mt:N`` below 1 MiB) gets one line for batches below that
size and another, measured at 2 and 8 MiB, for those above: one line through 64 KiB (one
thread) and 8 MiB (threads woken) charged the wake-up to every byte and predicted mt:2 at
half its speed for 512 MiB batches (the bench: auto 11 GB/s against mt:2's 19).

**What an observation is worth.** A batch that took the host's page faults (its
destination never touched before: the first run into fresh frames costs 20-55x; counted
with ``getrusage``) tells nothing about the engine and is not counted; neither is a lone
batch more than :data:`_OUTLIER` times slower than predicted (a preempted copy), unless the
next one is too.

**Idle CPUs** come from /proc/stat (sampled at most every 0.2 s, and only for a batch
some candidate's prediction depends on them -- an engine with threads that is not
``mt:N``, e.g. opencl above its minimum; the load average where /proc/stat is
missing); this process's own CPU time counts as available, and so does the calling CPU.
A candidate is measured with the CPUs that were free then (``_Model.cpus``); when fewer
are free now, its predicted time grows by that ratio (its threads share what is left) --
except ``mt:N``, whose threads claim work dynamically, so that one without a CPU
costs little, and with a busy neighbour more threads still get a larger share of the CPUs
(busy bench: mt:2 1.67x mt:1 at 2MiB@64KiB x32). ``serial`` is always a candidate, so
``auto`` is never slower than the batched single-thread copy ("at worst the same").

**Ties, staying, exploring.** Predictions within :data:`_MARGIN` of the least, when they
are not both measured at this batch size, go to the ``mt:N`` with more threads
(calibration copies a hot buffer, which flatters one thread). The last choice at a batch
size stays unless another is predicted :data:`_SWITCH` faster: on a shared host one batch
moves by more than that, and each switch on noise costs a batch. A candidate not far from
the best is re-measured now and then, the least recently measured first, paid from a
budget of :data:`_EXPLORE_SHARE` of the predicted copy time so far, so that a model
measured on a busy minute cannot hide an engine for good and exploring stays cheap.

**Nothing to choose.** Below every candidate's ``inline_bytes`` (or ``min_bytes``: mt:N
copies batches under 1 MiB on the calling CPU alone, opencl declines those under 8 MiB)
every candidate would copy on the calling CPU: the batch goes to ``serial`` with no
prediction and nothing recorded (reason ``"every candidate copies on the calling CPU"``),
since a few microseconds of bookkeeping were a third of a one-page call.

**Settled choices.** Two full choices in a row that agree at a batch size, resting on
batches measured there, where no candidate depends on idle CPUs, settle it: the next
:data:`_SETTLED_RUN` batches of that size go to the same engine without predicting (their
times still correct its model), then a full choice again -- sooner if one of them takes
:data:`_SWITCH` longer than predicted. Predicting runs a few hundred lines of Python; on
a host whose CPU slept between calls that costs ~100 us (15 us warm), as much as a small
batch's copy.

**State is per engine**, so per Machine: calibration, corrections, idle-CPU samples and
the candidates that could not be created. One Machine made while the process was
restricted to one CPU does not change what a later Machine sees.

**Why it chose**: when a ``copyengine_migration_event`` observer is registered, every
batch first sends one ``"engine_choice"`` event (one per batch even when the framework
asks twice, as its small-call path does before it hands a batch on): ``{"engine",
"nbytes", "reason", "idle_cpus", "cpus", "predicted_us": {candidate: microseconds},
"basis": {candidate: how its prediction was made}}``. ``reason``: ``"least predicted
time"``, ``"more threads, predicted within 15% of the least"``, ``"the last choice at this
size, no other predicted 10% faster"``, ``"exploring"``, ``"every candidate copies on the
calling CPU"`` (no prediction: ``predicted_us`` and ``basis`` empty), ``"settled at this
size"`` (``predicted_us`` and ``basis`` those of the choice that settled it), or ``"only
serial fits"``; ``basis``: ``"measured"`` (batches of this size class), ``"measured
nearby"`` (a neighbouring class), or ``"calibrated"``. An engine never borrows another's
correction: mt:1 measured slow at 2 MiB says nothing about serial (in one bench row mt:1
copied 2 MiB batches at 0.78x serial's speed), and a borrowed slow-down hid serial for
good; an untried engine costs at most two batches to measure. The model itself
(calibration, corrections, which batches count, idle CPUs) is :mod:`.auto_model`.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass

from ..errors import EngineUnavailable
from ..hookspecs import hookimpl
from .auto_model import IdleCpus, _calibrate, _faults, _Scratch, _size_class, available_cpus, fresh_memory
from .base import Capabilities, Engine, run_engine
from .mt import MtEngine

_MARGIN = 0.15  # predictions this close are a tie: the candidate with more threads wins
_SWITCH = 0.10  # another engine must be predicted this much faster than the last choice
_EXPLORE_SHARE = 0.03  # exploring may cost this share of the predicted copy time
_EXPLORE_GAP = 16  # at least this many choices between two explorations
_EXPLORE_WITHIN = 3.0  # ... of a candidate predicted at most this much slower than the best
_SOLO = "every candidate copies on the calling CPU"
_SETTLED_RUN = 4  # batches a settled size class goes without a full choice


@dataclass(slots=True)
class _Settled:
    """A size class settled on ``engine`` (see the module docstring)."""
    engine: str
    left: int            # batches still to go without a full choice
    predicted: dict      # the settling choice's ``last_predicted`` and ``last_basis``
    basis: dict
    s_per_byte: float    # its prediction for the engine: a slower batch ends the settlement


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
        self.last_basis = {}
        self.last_idle = self.cpus
        self.choices = {}
        self.reasons = {}  # spec -> {reason: batches}: why each batch went where it went
        self.skipped = {"fresh memory": 0, "outlier": 0}  # batches not counted, and why
        self._calls = 0         # choices since the last exploration
        self._budget = 0.0      # seconds of predicted copy time exploring may still cost
        self._incumbent = {}    # size class -> the last engine chosen (not explored) for it
        self._settled = {}      # size class -> _Settled
        self._solo_below = 0    # batches below this: every candidate copies on the calling CPU
        self._pending = threading.local()  # this thread's batch between delegate and record
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
            self._solo_below = self._calling_cpu_limit()
            return self.engines

    def _calling_cpu_limit(self) -> int:
        """The batch size below which every candidate copies on the calling CPU alone
        (``inline_bytes``) or declines (``min_bytes``): nothing to choose there."""
        return min((max(e.capabilities.inline_bytes, e.capabilities.min_bytes)
                    for s, e in self.engines.items() if s != "serial"), default=1 << 62)

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
            self._solo_below = self._calling_cpu_limit()
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

    def _idle_matters(self, nbytes: int) -> bool:
        """Does any candidate for ``nbytes`` depend on idle CPUs (:meth:`_factor`)? Only
        then is /proc/stat read: the first system call after the process slept costs a
        few hundred microseconds on a VM, more than a small batch's copy."""
        return any(e.capabilities.threads > 1 and not isinstance(e, MtEngine)
                   and not (e.capabilities.min_bytes and nbytes < e.capabilities.min_bytes)
                   for e in self.engines.values())

    def predictions(self, nbytes: int, idle: int) -> dict:
        """Predicted seconds per candidate that accepts a batch of ``nbytes`` (and sets
        ``last_basis``: what each prediction rests on)."""
        out, basis, c = {}, {}, _size_class(nbytes)
        for spec, e in list(self.engines.items()):
            if e.capabilities.min_bytes and nbytes < e.capabilities.min_bytes:
                continue
            if spec not in self.models:
                with self._lock:
                    if spec not in self.models and spec in self.engines:
                        self._measure(spec)
                if spec not in self.models:
                    continue
            model = self.models[spec]
            ratio, basis[spec] = model.correction(c)
            out[spec] = model.base(nbytes) * ratio * self._factor(spec, idle)
        self.last_basis = basis
        return out

    def choose(self, nbytes: int) -> str:
        """The candidate with the least predicted time, a near tie going to more threads,
        now and then one to re-measure (sets ``last_reason``, ``last_predicted``,
        ``last_basis`` and ``last_idle``)."""
        self._ensure()
        c = _size_class(nbytes)
        self._settled.pop(c, None)
        idle_matters = self._idle_matters(nbytes)
        if idle_matters:
            self.last_idle = self.idle()
        idle = self.last_idle  # else the last sample (no candidate here depends on it)
        pred = self.last_predicted = self.predictions(nbytes, idle)
        if not pred:
            self.last_reason = "only serial fits"
            return "serial"
        basis = self.last_basis
        least = best = min(pred, key=pred.get)
        self.last_reason = "least predicted time"
        # Among those within _MARGIN of the least, the mt:N with the most threads -- unless
        # both were measured at this size: calibration copies a hot buffer, which flatters one
        # thread, and mt's extra threads claim work only when they run, so they rarely
        # cost; measured batches say what they cost.
        threads = self.engines[least].capabilities.threads
        for s, t in pred.items():
            n = self.engines[s].capabilities.threads
            if t <= (1 + _MARGIN) * pred[least] and n > threads and isinstance(self.engines[s], MtEngine) \
                    and not (basis[s] == basis[least] == "measured"):
                best, threads = s, n
        if best != least:
            self.last_reason = "more threads, predicted within 15% of the least"
        last = self._incumbent.get(c)
        if last is not None and last != best and last in pred and pred[last] <= (1 + _SWITCH) * pred[best]:
            # noise on a shared host moves predictions by more than what a switch gains
            best = last
            self.last_reason = "the last choice at this size, no other predicted 10% faster"
        self._incumbent[c] = best
        self._calls += 1
        self._budget += _EXPLORE_SHARE * pred[best]
        if self._calls >= _EXPLORE_GAP:
            # A model measured on a busy minute could hide an engine for good: re-measure
            # the least recently measured of those not far from the best, when the budget
            # pays for what it is predicted to lose
            near = [s for s, t in pred.items() if s != best and t <= _EXPLORE_WITHIN * pred[best]]
            if near:
                pick = min(near, key=lambda s: self.models[s].seen.get(c, 0.0))
                cost = max(0.0, pred[pick] - pred[best])
                if cost <= self._budget:
                    self._budget -= cost
                    self._calls = 0
                    self.last_reason = "exploring"
                    return pick
        if last == best and not idle_matters and basis[best] == "measured":
            self._settled[c] = _Settled(best, _SETTLED_RUN, pred, self.last_basis,
                                        pred[best] / nbytes)
        return best

    def _tell(self, spec, nbytes):
        """The engine_choice event, for observers (tracepoint-like: skipped when none)."""
        hook = self.machine.pm.hook.copyengine_migration_event
        if not hook.get_hookimpls():
            return
        hook(machine=self.machine, event="engine_choice",
             info={"engine": spec, "nbytes": int(nbytes), "reason": self.last_reason,
                   "idle_cpus": int(self.last_idle), "cpus": self.cpus,
                   "predicted_us": {s: round(t * 1e6, 2) for s, t in self.last_predicted.items()},
                   "basis": dict(self.last_basis)})

    def delegate(self, nbytes: int):
        """``(spec, engine)`` that a batch of ``nbytes`` goes to, the engine_choice event
        sent. For a caller that runs the copy itself (a framework with a faster path for
        some engine); it reports the time with :meth:`record`. Asked again for the same
        batch before :meth:`record` (the framework's small-call path hands a batch it
        cannot take to the batch path), it gives the same answer without choosing again."""
        pending = getattr(self._pending, "batch", None)
        if pending is not None and pending[0] == nbytes and pending[1] in self.engines:
            return pending[1], self.engines[pending[1]]
        solo = nbytes < self._solo_below and "serial" in self.engines
        settled = None if solo else self._settled.get(_size_class(nbytes))
        if solo:
            spec, self.last_reason = "serial", _SOLO
            self.last_predicted = self.last_basis = {}
        elif settled is not None and settled.left > 0 and settled.engine in self.engines:
            settled.left -= 1
            spec = settled.engine
            self.last_predicted, self.last_basis = settled.predicted, settled.basis
            self.last_reason = "settled at this size"
        else:
            spec = self.choose(nbytes)
        why = self.reasons.setdefault(spec, {})
        why[self.last_reason] = why.get(self.last_reason, 0) + 1
        self._tell(spec, nbytes)
        # fault count for record(); a solo batch teaches nothing, so skip the system call
        self._pending.batch = (nbytes, spec, 0 if solo else _faults())
        return spec, self.engines[spec]

    def record(self, spec: str, nbytes: int, seconds: float) -> None:
        """A batch of ``nbytes`` that ``spec`` copied in ``seconds``: corrects its model,
        unless the batch paid the host's first touch of its destination (page faults
        counted since :meth:`delegate`) or is a lone outlier."""
        pending = getattr(self._pending, "batch", None)
        self._pending.batch = None
        if nbytes >= self._solo_below:    # below it nothing was chosen: nothing to learn
            self._learn(spec, nbytes, seconds, pending)
        self.last_choice = spec
        self.choices[spec] = self.choices.get(spec, 0) + 1

    def _learn(self, spec, nbytes, seconds, pending):
        """Correct ``spec``'s model with one batch (see :meth:`record`)."""
        fresh = pending is not None and pending[:2] == (nbytes, spec) and \
            fresh_memory(_faults() - pending[2], nbytes)
        if fresh:
            self.skipped["fresh memory"] += 1
            return
        if spec not in self.models:
            return
        c = _size_class(nbytes)
        settled = self._settled.get(c)
        if settled is not None and settled.engine == spec and \
                seconds > (1 + _SWITCH) * settled.s_per_byte * nbytes:
            self._settled.pop(c, None)      # slower than it settled on: choose again
        factor = self._factor(spec, self.last_idle) if spec in self.engines else 1.0
        if not self.models[spec].observe(nbytes, seconds / factor):
            self.skipped["outlier"] += 1

    def copy(self, job):
        nbytes = job.total_bytes
        spec, engine = self.delegate(nbytes)
        t0 = time.perf_counter()
        try:
            res = run_engine(engine, job, self.machine.settings["copy_timeout"])
        except BaseException:
            self._pending.batch = None
            raise
        self.record(spec, nbytes, time.perf_counter() - t0)
        return res

    def describe(self):
        self._ensure()
        return {"candidates": {s: {"overhead_us": round(m.overhead * 1e6, 2),
                                   "bandwidth_gbps": round(m.bandwidth / 1e9, 2),
                                   "cpus": m.cpus,
                                   "corrections": {f"{1 << c} B": round(r, 3) for c, r in sorted(m.ratio.items())}}
                               for s, m in self.models.items() if s in self.engines},
                "unavailable": dict(self.unavailable), "cpus": self.cpus, "idle_cpus": self.idle(),
                "choices": dict(self.choices), "reasons": {s: dict(r) for s, r in self.reasons.items()},
                "not_counted": dict(self.skipped)}

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

