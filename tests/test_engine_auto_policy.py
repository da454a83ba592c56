"""auto's decision logic after issue 12 (auto within 0.9x of the best fixed engine on every
bench row): which batches count, the two calibration regimes, noisy batches, borrowed
corrections, staying with the last choice, a busy calibration, and one choice per batch.
Synthetic calibrations, fault counts and idle-CPU counts; nothing here is timed."""
import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import auto, auto_model
from copyengine.engines.base import Capabilities, Engine


@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="32MiB") as machine:
        machine.set_engine("auto")
        yield machine


def _models(engine, models):
    """Replace the engine's calibrated models: spec -> (overhead s, bandwidth B/s[, cpus])."""
    engine._ensure()
    table = {spec: auto_model._Model(*m) for spec, m in models.items()}
    engine.models.clear()
    engine.models.update(table)
    return table


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
    hands it to the batch path, which asks again: the same answer, one event, one count."""
    events = []
    monkeypatch.setattr(m.engine, "_tell", lambda spec, nbytes: events.append(spec))
    e = m.engine
    e._ensure()
    monkeypatch.setattr(e, "idle", lambda: 64)
    calls = e._calls
    a = e.delegate(128 << 10)
    b = e.delegate(128 << 10)
    assert a == b and events == [a[0]] and e._calls == calls + 1
    e.record(a[0], 128 << 10, 1e-5)
    e.delegate(128 << 10)                               # the next batch is chosen anew
    assert len(events) == 2 and e.choices == {a[0]: 1}


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


def test_an_unmeasured_engine_borrows_the_others_correction_at_this_size(m, monkeypatch):
    """Real 512 MiB batches run at half the hot scratch's speed for every engine: the one
    not yet tried at that size must not look twice as fast as the one that was."""
    e = m.engine
    e._ensure()
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-6, 1e9)
    models["mt:1"] = (1e-6, 1e9)
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 64)
    size = 512 << 20
    for _ in range(3):
        e.models["serial"].observe(size, 2 * e.models["serial"].base(size))
    e.choose(size)
    assert e.last_basis["serial"] == "measured" and e.last_basis["mt:1"] == "others measured"
    assert e.last_predicted["mt:1"] == pytest.approx(e.last_predicted["serial"])


def test_the_last_choice_stays_unless_another_is_clearly_faster(m, monkeypatch):
    e = m.engine
    e._ensure()
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-6, 1e9)
    models["mt:1"] = (1e-6, 1e9 / 1.05)
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 64)
    size = 64 << 20
    assert e.choose(size) == "serial"
    e.models["serial"].bandwidth = 1e9 / 1.1          # now 5% slower than mt:1: noise
    assert e.choose(size) == "serial" and e.last_reason.startswith("the last choice")
    e.models["serial"].bandwidth = 1e9 / 1.3          # now 20% slower: switch
    assert e.choose(size) == "mt:1" and e.last_reason == "least predicted time"
    assert e.choose(4 << 10) != "opencl"              # another size has its own last choice


def test_a_busy_calibration_does_not_hide_mt(m, monkeypatch):
    """Beside a busy process, calibration saw mt:2 no faster than one thread (its second
    thread was not scheduled in 8 MiB); mt:2 still takes a big batch (more threads within
    the margin), and keeps it once measured faster, whatever the idle-CPU count says."""
    e = m.engine
    e._ensure()
    if "mt:2" not in e.engines:
        pytest.skip("needs two CPUs for mt:2")
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-6, 10e9, 1)
    models["mt:1"] = (1e-6, 10e9, 1)
    models["mt:2"] = (1e-6, 9.5e9, 1)       # measured with one CPU free
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 1)
    size = 64 << 20
    assert e.choose(size) == "mt:2" and e.last_reason.startswith("more threads")
    for _ in range(3):                      # it ran at 15 GB/s
        e.models["mt:2"].observe(size, size / 15e9)
    e._calls = 1
    assert e.choose(size) == "mt:2" and e.last_reason == "least predicted time"
    assert e.last_predicted["mt:2"] < 0.7 * e.last_predicted["serial"]
    assert e.last_basis["serial"] == "calibrated"   # mt:2's speed-up is not serial's
