"""auto's decision logic after issue 12 (auto within 0.9x of the best fixed engine on every
bench row): which batches count, the two calibration regimes, noisy batches, borrowed
corrections, staying with the last choice, a busy calibration, and one choice per batch.
Synthetic calibrations, fault counts and idle-CPU counts; nothing here is timed."""
import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import auto, auto_model
from copyengine.engines.base import Capabilities, Engine
from helpers import auto_candidates_with
from helpers import set_auto_models as _models


@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="32MiB") as machine:
        machine.set_engine("auto")
        yield machine


def test_a_batch_into_fresh_memory_is_not_counted(m, monkeypatch):
    """The bench's warm-up copies into frames the host never touched: 20-55x slower, and
    two such batches in a row used to rule the chosen engine out for good. A batch that
    took the host's page faults (counted between delegate and record) is set aside."""
    e = m.engine
    e._ensure()
    monkeypatch.setattr(e, "idle", lambda: 64)
    faults = iter([0, 1 << 17, 1 << 17, 2 * (1 << 17), 2 * (1 << 17), 2 * (1 << 17)])
    monkeypatch.setattr(auto, "_faults", lambda: next(faults))
    size = 512 << 20
    spec, _ = e.delegate(size)
    before = e.models[spec].predict(size)
    for _ in range(2):                                  # two fresh batches: 50x slower
        e.record(spec, size, 50 * before)
        assert e.delegate(size)[0] == spec
    assert e.skipped["fresh memory"] == 2 and e.models[spec].predict(size) == pytest.approx(before)
    e.record(spec, size, 1.2 * before)                  # no fault: counted
    assert e.skipped["fresh memory"] == 2 and size.bit_length() - 1 in e.models[spec].window
    assert e.choices[spec] == 3


def test_fresh_memory_threshold():
    assert not auto_model.fresh_memory(0, 512 << 20)
    assert not auto_model.fresh_memory(2, 4096)          # the heap's own faults
    assert auto_model.fresh_memory(512, 2 << 20)         # one per 4 KiB page
    assert auto_model.fresh_memory(256, 512 << 20)       # one per 2 MiB huge page
    assert not auto_model.fresh_memory(8, 512 << 20)


def test_the_small_call_path_asking_twice_gets_one_choice_and_one_event(m, monkeypatch):
    """The framework's small-call path asks auto, cannot take the batch (mt:2 chosen) and
    hands it to the batch path, which asks again: the same answer, one event, one count --
    for a batch that is chosen and for one below every candidate's ``inline_bytes``."""
    events = []
    monkeypatch.setattr(m.engine, "_tell", lambda spec, nbytes: events.append(spec))
    e = m.engine
    e._ensure()
    monkeypatch.setattr(e, "idle", lambda: 64)
    for size, chosen in ((2 << 20, 1), (128 << 10, 0)):
        events.clear()
        e.choices.clear()
        calls = e._calls
        a = e.delegate(size)
        b = e.delegate(size)
        assert a == b and events == [a[0]] and e._calls == calls + chosen
        e.record(a[0], size, 1e-5)
        e.delegate(size)                                # the next batch is chosen anew
        assert len(events) == 2 and e.choices == {a[0]: 1}
        e.record(e._pending.batch[1], size, 1e-5)      # close the open batch


def test_below_every_candidates_inline_bytes_there_is_nothing_to_choose(m, monkeypatch):
    """mt:N copies a batch under 1 MiB on the calling CPU, opencl declines it: such a batch
    goes to serial with no prediction and teaches no model (a one-page call paid 7 us of
    bookkeeping, half its cost); above that limit auto chooses again."""
    e = m.engine
    e._ensure()
    limit = min(max(x.capabilities.inline_bytes, x.capabilities.min_bytes)
                for s, x in e.engines.items() if s != "serial")
    assert e._solo_below == limit > 0
    predicted = []
    real = e.predictions
    monkeypatch.setattr(e, "predictions", lambda *a: predicted.append(a) or real(*a))
    windows = {s: dict(x.window) for s, x in e.models.items()}
    for size in (4 << 10, limit - 4096):
        assert e.delegate(size)[0] == "serial" and e.last_reason == auto._SOLO
        e.record("serial", size, 1.0)                   # however slow: nothing learned
    assert predicted == [] and {s: dict(x.window) for s, x in e.models.items()} == windows
    assert e.reasons == {"serial": {auto._SOLO: 2}} and e.choices == {"serial": 2}
    e.delegate(limit)
    assert len(predicted) == 1 and e.last_reason != auto._SOLO


class _FakeClock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


class _TwoRegimeEngine(Engine):
    """Copies below 1 MiB on the caller (20 us + 5 GB/s); above it wakes a thread
    (300 us) and copies at 20 GB/s: the shape of mt:2 on a 2-core host."""

    def __init__(self, clock):
        self.clock = clock
        self.capabilities = Capabilities(threads=2, inline_bytes=1 << 20)

    def copy(self, job):
        n = job.total_bytes
        self.clock.now += 20e-6 + n / 5e9 if n < (1 << 20) else 300e-6 + n / 20e9
        return np.zeros(job.nr_folios, np.int32)


def test_calibration_keeps_an_engines_two_regimes_apart(monkeypatch):
    """A line through 64 KiB (caller alone) and 8 MiB (threads woken) charged the wake-up
    to every byte: 512 MiB batches were predicted at about half mt:2's speed."""
    clock = _FakeClock()
    monkeypatch.setattr(auto_model.time, "perf_counter", clock)
    scratch = auto_model._Scratch()
    try:
        model = auto_model._calibrate(_TwoRegimeEngine(clock), scratch, 2)
    finally:
        scratch.close()
    big, small = 512 << 20, 256 << 10
    assert model.base(big) == pytest.approx(300e-6 + big / 20e9, rel=1e-6)
    assert model.base(small) == pytest.approx(20e-6 + small / 5e9, rel=1e-6)
    one_line = (300e-6 + (8 << 20) / 20e9 - 20e-6 - (64 << 10) / 5e9) / ((8 << 20) - (64 << 10))
    assert one_line * big > 1.3 * model.base(big)       # what a single line predicted


def test_one_noisy_batch_moves_nothing_two_that_agree_do():
    model = auto_model._Model(1e-6, 1e9)
    size = 64 << 20
    before = model.predict(size)
    model.observe(size, 2 * before)
    assert model.predict(size) == pytest.approx(before)
    model.observe(size, 2 * before)
    assert model.predict(size) == pytest.approx(2 * before)
    assert model.correction(size.bit_length() - 1)[1] == "measured"


def test_an_unmeasured_engine_is_tried_not_judged_by_anothers_batches(m, monkeypatch):
    """Two engines calibrated alike, serial measured at twice its calibration at 512 MiB:
    mt:1, never tried there, keeps its calibrated prediction and gets the next batches;
    after two of them as slow, it is judged by its own and the choice stays (no faster)."""
    e = auto_candidates_with(m.engine, monkeypatch, serial=1e9, mt_1=1e9)
    size = 512 << 20
    for _ in range(3):
        e.models["serial"].observe(size, 2 * e.models["serial"].base(size))
    assert e.choose(size) == "mt:1"
    assert e.last_basis["serial"] == "measured" and e.last_basis["mt:1"] == "calibrated"
    assert e.last_predicted["mt:1"] == pytest.approx(e.last_predicted["serial"] / 2)
    for _ in range(2):
        e.models["mt:1"].observe(size, 2 * e.models["mt:1"].base(size))
    assert e.choose(size) == "mt:1" and e.last_basis["mt:1"] == "measured"
    assert e.last_predicted["mt:1"] == pytest.approx(e.last_predicted["serial"])


def test_serial_is_not_judged_by_the_slow_down_of_threads(m, monkeypatch):
    """mt:2 measured at twice its calibrated time (its threads wake; calibration's tight
    loop hides that) must not make serial, never tried at this size, look as slow: serial
    gets the batch and is measured."""
    m.engine._ensure()
    if "mt:2" not in m.engine.engines:
        pytest.skip("needs two CPUs for mt:2")
    e = auto_candidates_with(m.engine, monkeypatch, serial=10e9, mt_2=15e9)
    size = 2 << 20
    assert e.choose(size) == "mt:2"
    for _ in range(3):
        e.models["mt:2"].observe(size, 2 * e.models["mt:2"].base(size))
    assert e.choose(size) == "serial" and e.last_reason == "least predicted time"
    assert e.last_basis == {"serial": "calibrated", "mt:2": "measured"} | \
        {s: b for s, b in e.last_basis.items() if s not in ("serial", "mt:2")}


def test_a_settled_size_skips_the_prediction_for_a_few_batches(m, monkeypatch):
    """Two agreeing choices resting on measured batches settle a size class: the next
    _SETTLED_RUN batches go to the same engine without predicting (one count each, reason
    'settled', their times still teach the model), then a full choice; a batch 10% slower
    than the settled prediction ends the settlement at once."""
    e = auto_candidates_with(m.engine, monkeypatch, serial=10e9, mt_1=8e9)
    calls = []
    real = e.predictions
    monkeypatch.setattr(e, "predictions", lambda *a: calls.append(a) or real(*a))
    size = 2 << 20
    base = e.models["serial"].base(size)
    for _ in range(2):
        spec, _ = e.delegate(size)
        e.record(spec, size, base)
    assert spec == "serial" and len(calls) == 2
    assert "settled at this size" not in e.reasons["serial"]
    for _ in range(auto._SETTLED_RUN):
        spec, _ = e.delegate(size)
        assert spec == "serial" and e.last_reason == "settled at this size"
        e.record(spec, size, base)
    assert len(calls) == 2 and e.reasons["serial"]["settled at this size"] == auto._SETTLED_RUN
    assert e.choices["serial"] == 2 + auto._SETTLED_RUN
    assert len(e.models["serial"].window[size.bit_length() - 1]) == 5   # all of them taught
    assert e.delegate(size)[0] == "serial" and len(calls) == 3          # a full choice
    e.record("serial", size, base)
    assert e.delegate(size)[0] == "serial" and e.last_reason == "settled at this size"
    e.record("serial", size, 1.5 * base)                                # slower: unsettled
    assert e.delegate(size)[0] == "serial" and len(calls) == 4
    e.record("serial", size, base)
    assert e.delegate(4 << 20) and len(calls) == 5                      # another size: its own
