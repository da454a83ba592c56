"""The auto policy: conformance, choices from the cost model, idle CPUs, availability,
per-Machine state, and the engine_choice event."""
import os

import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import auto, auto_model
from copyengine.testing import EngineConformance
from helpers import set_auto_models as _models


class TestAutoConformance(EngineConformance):
    engine_spec = "auto"


@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="32MiB") as machine:
        machine.set_engine("auto")
        yield machine


def test_is_the_default_engine():
    with ce.Machine(nodes=2, node_size="8MiB") as machine:
        assert machine.engine_spec == "auto"
        assert isinstance(machine.engine, auto.AutoEngine)


def test_candidates_cover_serial_every_power_of_two_threads_and_opencl():
    assert auto.candidate_specs(1) == ["serial", "mt:1", "opencl"]
    assert auto.candidate_specs(6) == ["serial", "mt:1", "mt:2", "mt:4", "mt:6", "opencl"]
    assert auto.candidate_specs(16) == ["serial", "mt:1", "mt:2", "mt:4", "mt:8", "mt:16", "opencl"]


def test_picks_the_least_predicted_time(m, monkeypatch):
    e = m.engine
    e._ensure()
    fast_big = (50e-6, 40e9)     # costly to start, fast per byte
    cheap = (1e-6, 5e9)          # cheap to start, slow per byte
    models = {spec: (1.0, 1e6) for spec in e.engines}   # everything else: hopeless
    models["serial"] = cheap
    two = "mt:2" if "mt:2" in e.engines else "mt:1"
    models[two] = fast_big
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 64)
    e._calls = 1  # keep exploration out of these choices
    assert e.choose(4096) == "serial"
    e._calls = 1
    assert e.choose(64 << 20) == two


def test_fewer_idle_cpus_than_measured_slow_a_candidate_down(m, monkeypatch):
    """opencl (two CPU threads here) measured with 2 free CPUs is predicted half as fast
    when one is free: it loses to serial unless it is more than twice as fast."""
    e = m.engine
    e._ensure()
    if "opencl" not in e.engines or e.engines["opencl"].capabilities.threads < 2:
        pytest.skip("needs an OpenCL device with two threads")
    big = max(64 << 20, e.engines["opencl"].capabilities.min_bytes)
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-6, 1e9, 1)
    models["opencl"] = (1e-6, 1.5e9, 2)
    _models(e, models)
    for idle, expected in ((2, "opencl"), (1, "serial")):
        monkeypatch.setattr(e, "idle", lambda idle=idle: idle)
        e._calls = 1
        assert e.choose(big) == expected
        assert e.last_idle == idle
    assert e.last_predicted["opencl"] == pytest.approx(2 * e.models["opencl"].predict(big))
    e.models["opencl"].bandwidth = 3e9          # twice as fast even on one CPU: still worth it
    e._calls = 1
    assert e.choose(big) == "opencl"
    e.models["opencl"].bandwidth, e.models["opencl"].cpus = 1.5e9, 1   # measured on one CPU
    e._calls = 1
    assert e.choose(big) == "opencl"            # ... is not slowed down further


def test_mt_is_not_slowed_down_by_busy_cpus(m, monkeypatch):
    """mt's threads claim work: with one CPU free, mt:2 keeps its measured prediction."""
    e = m.engine
    e._ensure()
    if "mt:2" not in e.engines:
        pytest.skip("needs two CPUs for mt:2")
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-6, 1e9, 1)
    models["mt:2"] = (1e-6, 1.5e9, 2)
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 1)
    e._calls = 1
    assert e.choose(64 << 20) == "mt:2"
    assert e.last_predicted["mt:2"] == pytest.approx(e.models["mt:2"].predict(64 << 20))


def test_respects_an_engines_minimum_size(m, monkeypatch):
    e = m.engine
    e._ensure()
    if "opencl" not in e.engines:
        pytest.skip("no OpenCL device here")
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["serial"] = (1e-3, 1e9)
    models["opencl"] = (1e-9, 1e15)  # "free", but only above its min_bytes
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 64)
    small = e.engines["opencl"].capabilities.min_bytes - 1
    e._calls = 1
    assert e.choose(small) == "serial"
    e._calls = 1
    assert e.choose(small + 1) == "opencl"


def test_observations_correct_the_model():
    model = auto_model._Model(1e-6, 1e9)
    before = model.predict(1 << 20)
    for _ in range(50):
        model.observe(1 << 20, 2 * before)
    assert model.predict(1 << 20) == pytest.approx(2 * before, rel=0.01)
    # another size class keeps its own correction
    assert model.predict(4096) == pytest.approx(1e-6 + 4096 / 1e9)


def test_exploration_revisits_the_least_recently_measured(m, monkeypatch):
    e = m.engine
    e._ensure()
    models = _models(e, {k: (1e-6, 1e9) for k in e.engines})
    models["serial"].bandwidth = 1e9 * 1.5  # serial always predicted best, the rest near it
    monkeypatch.setattr(e, "idle", lambda: 64)
    size = 64 << 20  # above every engine's minimum (opencl declines small batches)
    seen, explored = set(), 0
    calls = 60 * len(e.engines)
    for _ in range(calls):
        spec = e.choose(size)
        seen.add(spec)
        explored += e.last_reason == "exploring"
        models[spec].observe(size, models[spec].predict(size))
    assert seen == set(e.engines)
    # each exploration is predicted to lose a third of serial's time; the budget pays for
    # about one in 1/3 / _EXPLORE_SHARE choices
    assert explored <= calls * auto._EXPLORE_SHARE / (1 / 3) + 1


def test_exploring_costs_at_most_its_share(m, monkeypatch):
    """Exploration is paid from a budget of _EXPLORE_SHARE of the predicted copy time:
    a candidate predicted twice as slow is tried about once in 1/_EXPLORE_SHARE choices,
    never in the first _EXPLORE_GAP."""
    e = m.engine
    e._ensure()
    models = _models(e, {k: (1.0, 1e6) for k in e.engines})
    models["serial"] = auto_model._Model(1e-6, 2e9)
    models["mt:1"] = auto_model._Model(1e-6, 1e9)   # twice serial's time
    e.models.update(models)
    monkeypatch.setattr(e, "idle", lambda: 64)
    picks = [e.choose(64 << 20) for _ in range(200)]
    assert "mt:1" not in picks[:auto._EXPLORE_GAP]
    assert 1 <= picks.count("mt:1") <= 200 * auto._EXPLORE_SHARE + 1
    assert set(picks) == {"serial", "mt:1"}


def test_unavailable_engines_are_never_candidates(monkeypatch):
    """An engine that cannot be created here (not registered, or EngineUnavailable) is
    left out with its reason; auto still copies, with what there is."""
    from copyengine.plugins import make_plugin_manager
    pm = make_plugin_manager(builtins=["serial", "auto"], entry_points=False)
    with ce.Machine(nodes=2, node_size="8MiB", plugin_manager=pm) as machine:
        assert machine.engine_spec == "auto"
        engines = machine.engine._ensure()
        assert set(engines) == {"serial"}
        assert "mt:1" in machine.engine.unavailable and "opencl" in machine.engine.unavailable
        p = machine.spawn()
        a = p.mmap(1 << 20)
        p.write(a, b"k" * (1 << 20))
        assert p.move_pages(0, [a + 4096 * i for i in range(256)], [1] * 256).ret == 0
        assert p.read(a, 1 << 20) == b"k" * (1 << 20)
        assert machine.engine.choices == {"serial": 1}


def test_migrates_correctly_and_reports_its_choices(m):
    p = m.spawn()
    a = p.mmap(8 << 20, folio_size="2MiB")
    data = np.random.default_rng(1).integers(0, 256, 8 << 20, dtype=np.uint8).tobytes()
    p.write(a, data)
    b = p.mmap(1 << 20)
    p.write(b, data[:1 << 20])
    r = p.move_pages(0, [a + (2 << 20) * i for i in range(4)] + [b + 4096 * i for i in range(256)],
                     [1] * 260)
    assert r.ret == 0 and set(r.status) == {1}
    assert p.read(a, 8 << 20) == data and p.read(b, 1 << 20) == data[:1 << 20]
    assert sum(m.engine.choices.values()) >= 2
    assert set(m.engine.choices) <= set(m.engine.engines)
    d = m.engine.describe()
    assert "serial" in d["candidates"] and d["cpus"] >= 1


def test_idle_cpus_reads_proc_stat(monkeypatch):
    monkeypatch.setattr(auto.IdleCpus, "_own", classmethod(lambda cls: 0.0))
    idle = auto.IdleCpus(4, period=0.0)
    samples = iter([(1000, 2000), (1300, 2400)])  # 300 of 400 ticks idle: 3 of 4 CPUs
    monkeypatch.setattr(auto.IdleCpus, "_read", staticmethod(lambda: next(samples)))
    idle()
    assert idle() == 3
    busy = auto.IdleCpus(4, period=0.0)
    samples2 = iter([(1000, 2000), (1000, 2400)])  # nothing idle: still one, the caller's
    monkeypatch.setattr(auto.IdleCpus, "_read", staticmethod(lambda: next(samples2)))
    busy()
    assert busy() == 1


def test_idle_cpus_count_this_processs_own_work_as_available(monkeypatch):
    """The previous batch's copy threads kept every CPU busy: that is us, not a
    neighbour, so all CPUs stay available to the next batch."""
    idle = auto.IdleCpus(2, period=0.0)
    samples = iter([(1000, 2000), (1000, 2200)])   # no idle tick in 200
    own = iter([500.0, 700.0])                      # ... all 200 of them ours
    monkeypatch.setattr(auto.IdleCpus, "_read", staticmethod(lambda: next(samples)))
    monkeypatch.setattr(auto.IdleCpus, "_own", classmethod(lambda cls: next(own)))
    idle()
    assert idle() == 2


def test_exploration_skips_candidates_predicted_far_slower(m, monkeypatch):
    e = m.engine
    e._ensure()
    models = _models(e, {k: (1e-6, 1e8) for k in e.engines})   # all 10x slower than serial
    models["serial"].bandwidth = 1e9
    monkeypatch.setattr(e, "idle", lambda: 64)
    assert {e.choose(64 << 20) for _ in range(300)} == {"serial"}


def _migrate_some(machine, nbytes=1 << 20):
    p = machine.spawn()
    a = p.mmap(nbytes)
    p.write(a, b"q" * nbytes)
    r = p.move_pages(0, [a + 4096 * i for i in range(nbytes // 4096)], [1] * (nbytes // 4096))
    assert r.ret == 0 and p.read(a, nbytes) == b"q" * nbytes


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs 2 CPUs")
def test_a_machine_restricted_to_one_cpu_does_not_change_later_machines():
    """Issue 14: no state outlives its Machine. One made while this thread may run on one
    CPU only has no mt:2; one made afterwards has it, with its own measurements."""
    allowed = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {min(allowed)})
    try:
        with ce.Machine(nodes=2, node_size="8MiB") as narrow:
            _migrate_some(narrow)
            assert narrow.engine.cpus == 1
            assert "mt:2" not in narrow.engine.engines and "mt:2" not in narrow.engine.models
            narrow_models = narrow.engine.models
    finally:
        os.sched_setaffinity(0, allowed)
    with ce.Machine(nodes=2, node_size="8MiB") as wide:
        _migrate_some(wide)
        e = wide.engine
        assert e.cpus == len(allowed) and "mt:2" in e.engines and "mt:2" not in e.unavailable
        assert all(e.models[s] is not narrow_models.get(s) for s in e.models)
        for spec, model in e.models.items():                # mt:2 clearly best
            model.overhead, model.bandwidth, model.ratio = 1e-6, 1e9 if spec == "mt:2" else 2e8, {}
        e.idle = lambda: 2
        e._calls = 1
        assert e.choose(4 << 20) == "mt:2"     # below opencl's minimum: it is no candidate


def test_machines_do_not_share_measurements():
    with ce.Machine(nodes=2, node_size="8MiB") as a, ce.Machine(nodes=2, node_size="8MiB") as b:
        a.engine._ensure()
        b.engine._ensure()
        assert set(a.engine.models) == set(b.engine.models)
        assert not set(map(id, a.engine.models.values())) & set(map(id, b.engine.models.values()))
        a.engine.models["serial"].observe(1 << 20, 1.0)       # a terrible batch on a ...
        assert b.engine.models["serial"].ratio == {}          # ... is not b's


def test_engine_choice_event_says_why():
    from copyengine.plugins import make_plugin_manager

    class Watch:
        def __init__(self):
            self.events = []

        @ce.hookimpl
        def copyengine_migration_event(self, machine, event, info):
            if event in ("engine_choice", "batch_copy"):
                self.events.append((event, dict(info)))

    watch = Watch()
    pm = make_plugin_manager(entry_points=False, plugins=[watch])
    with ce.Machine(nodes=2, node_size="8MiB", plugin_manager=pm) as machine:
        _migrate_some(machine)
        choices = [i for ev, i in watch.events if ev == "engine_choice"]
        assert len(choices) == sum(machine.engine.choices.values()) >= 1
        info = choices[-1]
        assert info["engine"] == machine.engine.last_choice
        assert info["engine"] in info["predicted_us"] and "serial" in info["predicted_us"]
        assert info["reason"] in ("least predicted time", "exploring", "only serial fits",
                                  "more threads, predicted within 15% of the least",
                                  "the last choice at this size, no other predicted 10% faster")
        assert set(info["basis"]) == set(info["predicted_us"])
        # describe() (what the bench keeps) counts the same choices by engine and reason
        told = {}
        for i in choices:
            told.setdefault(i["engine"], {}).setdefault(i["reason"], 0)
            told[i["engine"]][i["reason"]] += 1
        assert machine.engine.describe()["reasons"] == told
        assert set(info["basis"].values()) <= {"measured", "measured nearby", "calibrated"}
        assert 1 <= info["idle_cpus"] <= info["cpus"] == machine.engine.cpus
        assert info["nbytes"] == 1 << 20
        least = min(info["predicted_us"].values())
        if info["reason"] == "least predicted time":
            assert info["predicted_us"][info["engine"]] == least
        elif info["reason"].startswith("more threads"):
            assert least < info["predicted_us"][info["engine"]] <= 1.15 * least + 0.01


def test_a_near_tie_goes_to_more_threads(m, monkeypatch):
    e = m.engine
    e._ensure()
    if "mt:2" not in e.engines:
        pytest.skip("needs two CPUs for mt:2")
    models = {spec: (1.0, 1e6) for spec in e.engines}
    models["mt:1"] = (1e-6, 1e9, 1)
    models["mt:2"] = (1e-6, 1e9 / 1.1, 2)       # predicted 10% slower: a tie
    _models(e, models)
    monkeypatch.setattr(e, "idle", lambda: 2)
    e._calls = 1
    assert e.choose(64 << 20) == "mt:2" and e.last_reason.startswith("more threads")
    e.models["mt:2"].bandwidth = 1e9 / 1.3      # 30% slower: not a tie
    e._calls = 1
    assert e.choose(64 << 20) == "mt:1" and e.last_reason == "least predicted time"


def test_delegate_and_record_let_a_caller_run_the_copy(m, monkeypatch):
    """A framework with its own fast path for an engine asks auto where a batch goes and
    reports the time back: the choice is counted and corrects that engine's model."""
    e = m.engine
    e._ensure()
    monkeypatch.setattr(e, "idle", lambda: 64)
    # mt:2 calibrated 10x faster than the rest: three times slower than that, still the best
    _models(e, {s: (1e-6, 2e10 if s == "mt:2" else 2e9, 1) for s in e.engines})
    spec, engine = e.delegate(4 << 20)
    assert spec == "mt:2" and engine is e.engines[spec] and e.last_predicted[spec] > 0
    before = e.models[spec].predict(4 << 20)
    for _ in range(4):
        spec2, _ = e.delegate(4 << 20)
        assert spec2 == spec                           # the last choice stays
        e.record(spec, 4 << 20, 3 * before)
        if _ == 0:                                     # one batch moves nothing ...
            assert e.models[spec].predict(4 << 20) == pytest.approx(before)
    assert e.models[spec].predict(4 << 20) == pytest.approx(3 * before, rel=0.01)
    assert e.choices[spec] == 4 and e.last_choice == spec
