"""The migration recorder and its timeline (copyengine.trace): windows, first-usable
times, the mm_migrate_pages record per call, and a Chrome trace-event file whose schema
Perfetto accepts (complete slices with ts/dur in microseconds, metadata names, instants)."""
import json

import numpy as np
import pytest

import copyengine as ce
from copyengine import trace
from copyengine.plugins import make_plugin_manager

PS = 4096


class Watcher:  # forces the full path
    @ce.hookimpl
    def copyengine_migration_event(self, machine, event, info):
        pass


@pytest.mark.parametrize("full", [False, True], ids=["cheap-path", "full-path"])
@pytest.mark.parametrize("engine", ["serial", "vanilla", "mt:2"])
def test_every_batch_and_call_is_recorded(tmp_path, engine, full):
    pm = make_plugin_manager(entry_points=False, plugins=[Watcher()] if full else [])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        m.set_engine(engine)
        m.settings["nr_max_batched_migration"] = 8
        p = m.spawn()
        a = p.mmap(20 * PS)
        p.write(a, b"\7" * 20 * PS)
        with trace.record(m) as rec:
            assert p.move_pages(0, [a + i * PS for i in range(20)], [1] * 20).ret == 0
            with pytest.raises(RuntimeError):
                with trace.record(m):
                    pass
        assert m.recorder is None
        assert [b[7] for b in rec.batches] == [8, 8, 4]
        w = rec.windows_us()
        assert len(w) == 20 and (w > 0).all()
        for b in rec.batches:
            assert b[1] <= b[2] <= b[3] <= b[4] <= b[5] <= b[6] and b[9] == engine
        assert len(rec.calls) == 1
        c = rec.calls[0]
        assert c["succeeded"] == 20 and c["failed"] == 0 and c["reason"] == "syscall_or_cpuset"
        assert c["start"] <= c["first_usable"] <= c["end"]
        s = rec.summary()
        assert s["folios"] == 20 and s["window_p50_us"] <= s["window_p99_us"] <= s["window_max_us"]
        path = tmp_path / "t.json"
        rec.write_chrome_trace(path)
        doc = json.loads(path.read_text())
        check_trace_event_format(doc)
        ev = doc["traceEvents"]
        slices = [e for e in ev if e["ph"] == "X"]
        assert {e["name"].split(" ")[0] for e in slices} >= {"unmap", "copy", "finalize"}
        for e in slices:
            assert isinstance(e["ts"], float) and e["dur"] >= 0 and e["pid"] and e["tid"] >= 1
        inst = [e for e in ev if e["ph"] == "i"]
        assert len(inst) == 1 and inst[0]["args"]["succeeded"] == 20
        assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in ev)
        assert np.all(np.diff([e["ts"] for e in slices if e["name"] == "finalize"]) > 0)


# -- the trace-event format (docs.google.com/document/d/1CvAClvFfyA5R-PhYUmn5OOQtYMH4h6I0nSsKchNAySU)
NUMBER = (int, float)


def check_trace_event_format(doc):
    """What Perfetto and chrome://tracing need of a JSON trace: a ``traceEvents`` list of
    objects; complete slices ("X") with numeric ts/dur (us, dur >= 0), instants ("i")
    with a numeric ts and a scope, metadata ("M") naming a process or thread (or its sort
    index); pid/tid ints; args objects; no NaN or infinity anywhere."""
    json.dumps(doc, allow_nan=False)
    assert isinstance(doc, dict) and isinstance(doc["traceEvents"], list)
    assert doc.get("displayTimeUnit", "ms") in ("ms", "ns")
    for e in doc["traceEvents"]:
        assert isinstance(e, dict) and isinstance(e["name"], str) and e["name"], e
        assert e["ph"] in ("X", "i", "M"), e
        assert type(e["pid"]) is int, e
        assert isinstance(e.get("args", {}), dict), e
        if e["ph"] != "M" or e["name"].startswith("thread_"):
            assert type(e["tid"]) is int, e
        if e["ph"] == "X":
            assert all(isinstance(e[k], NUMBER) and not isinstance(e[k], bool) for k in ("ts", "dur")), e
            assert e["dur"] >= 0 and isinstance(e.get("cat", ""), str), e
        elif e["ph"] == "i":
            assert isinstance(e["ts"], NUMBER) and e.get("s", "t") in ("g", "p", "t"), e
        else:
            assert e["name"] in ("process_name", "thread_name", "process_sort_index", "thread_sort_index"), e
            key = "sort_index" if e["name"].endswith("sort_index") else "name"
            assert isinstance(e["args"][key], int if key == "sort_index" else str), e


def test_the_format_check_can_fail():
    good = {"traceEvents": [{"name": "copy", "ph": "X", "pid": 1, "tid": 2, "ts": 0.5, "dur": 1}]}
    check_trace_event_format(good)
    for bad in ({"ts": "0"}, {"dur": -1}, {"tid": 1.0}, {"ph": "B"}, {"dur": float("nan")}):
        with pytest.raises((AssertionError, KeyError, ValueError)):
            check_trace_event_format({"traceEvents": [{**good["traceEvents"][0], **bad}]})


class SpanSpy:
    """Sees every job the framework hands to the copy hook."""

    def __init__(self):
        self.spans = []

    @ce.hookimpl(wrapper=True)
    def copyengine_batch_copy(self, machine, engine, job):
        self.spans.append(job.spans)
        return (yield)


def moved(m, p, npages, rounds=1):
    a = p.mmap(npages * PS)
    p.write(a, b"\5" * npages * PS)
    for r in range(rounds):
        assert p.move_pages(0, [a + i * PS for i in range(npages)], [(r + 1) % 2] * npages).ret == 0


@pytest.mark.parametrize("engine,lanes", [("serial", {"cpu"}), ("mt:2", {"mt worker 0", "mt worker 1"})])
def test_engine_spans_with_a_recorder_only(tmp_path, engine, lanes):
    """Jobs carry a span list only while a recorder is attached; the engine's slices then
    land on one track per lane, inside their batch's copy phase, in a valid trace file."""
    spy = SpanSpy()
    pm = make_plugin_manager(entry_points=False, plugins=[spy, Watcher()])
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=pm) as m:
        m.set_engine(engine)
        p = m.spawn()
        moved(m, p, 16)
        assert spy.spans and all(s is None for s in spy.spans)
        spy.spans.clear()
        with trace.record(m) as rec:
            moved(m, p, 16)
        assert spy.spans and all(isinstance(s, list) for s in spy.spans)
        assert rec.spans and {s[1] for s in rec.spans} <= lanes
        b = rec.batches[0]
        for s in rec.spans:
            assert b[4] <= s[2] <= s[3] <= b[5] and s[4] >= 1 and s[5] == engine
        assert sum(s[4] for s in rec.spans if s[1] in ("cpu", "mt worker 0")) <= 16
        path = tmp_path / "t.json"
        rec.write_chrome_trace(path)
        doc = json.loads(path.read_text())
        check_trace_event_format(doc)
        names = {e["tid"]: e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name"}
        copies = [e for e in doc["traceEvents"] if e["ph"] == "X" and e["cat"] == "copy"]
        assert copies and {names[e["tid"]] for e in copies} == {s[1] for s in rec.spans}


@pytest.mark.parametrize("full", [False, True], ids=["cheap-path", "full-path"])
def test_mt2_shows_both_threads_inside_the_copy_phase(full):
    """mt:2 over 8 MiB batches: a span per thread that copied ("mt worker 0" is the
    caller), each inside its batch's copy phase; both threads show up (a busy host may
    leave one batch to one thread, so several batches are tried)."""
    from copyengine.engines.mt import max_threads
    if max_threads() < 2:
        pytest.skip("needs 2 CPUs")
    pm = make_plugin_manager(entry_points=False, plugins=[Watcher()] if full else [])
    with ce.Machine(nodes=2, node_size="64MiB", plugin_manager=pm) as m:
        m.set_engine("mt:2")
        m.settings["nr_max_batched_migration"] = 2048
        p = m.spawn()
        with trace.record(m) as rec:
            moved(m, p, 2048, rounds=12)
        assert len(rec.batches) == 12
        for s in rec.spans:
            b = [b for b in rec.batches if b[4] <= s[2]][-1]
            assert s[3] <= b[5] and 1 <= s[4] <= 2048 and s[1] in ("mt worker 0", "mt worker 1")
        assert {s[1] for s in rec.spans} == {"mt worker 0", "mt worker 1"}
        doc = rec.chrome_trace()
        check_trace_event_format(doc)
        assert {"mt worker 0", "mt worker 1"} <= {e["args"]["name"] for e in doc["traceEvents"]
                                                  if e["name"] == "thread_name"}


def test_serial_on_the_cheap_path_shows_its_cpu_lane():
    """With no plugin, serial's batches copy inline on the cheap path; a recorder still
    gets serial's "cpu" slice inside each batch's copy phase, counting the batch's folios."""
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=make_plugin_manager(entry_points=False)) as m:
        m.set_engine("serial")
        m.settings["nr_max_batched_migration"] = 128
        p = m.spawn()
        with trace.record(m) as rec:
            moved(m, p, 512)  # 2 MiB: above the one-call small path, four batches
        assert len(rec.batches) == 4 and len(rec.spans) == 4
        for b, s in zip(rec.batches, rec.spans):
            assert s[1] == "cpu" and s[5] == "serial" and s[4] == 128
            assert b[4] <= s[2] <= s[3] <= b[5]


@pytest.mark.parametrize("span", [("", 0.0, 1.0, 1), ("x", 2.0, 1.0, 1), ("x", 0.0, 1.0, -1),
                                  ("x", 0.0, float("inf"), 1), ("x", 0.0, 1.0), ["x", 0.0, 1.0, 1],
                                  ("x", "0", 1.0, 1), ("x", 0.0, 1.0, True)])
def test_a_bad_span_is_refused_and_none_kept(span):
    rec = trace.Recorder()
    with pytest.raises(ValueError, match="engine e: a copy span must be"):
        rec.copy_spans("e", [("ok", 0.0, 1.0, 1), span])
    assert rec.spans == []
    rec.copy_spans("e", [("ok", 0.0, 1.0, np.int64(2))])
    assert rec.spans[0][1:] == ("ok", 0.0, 1.0, 2, "e")


def test_lanes_of_several_threads_are_told_apart():
    rec = trace.Recorder()
    rec.spans += [(11, "mt worker 0", rec.t0, rec.t0 + 1e-3, 4, "mt:2"),
                  (12, "mt worker 0", rec.t0, rec.t0 + 2e-3, 4, "mt:2")]
    doc = rec.chrome_trace(pid=7)
    check_trace_event_format(doc)
    names = sorted(e["args"]["name"] for e in doc["traceEvents"] if e["name"] == "thread_name")
    assert names == ["migrating thread 1", "migrating thread 2",
                     "mt worker 0 (thread 1)", "mt worker 0 (thread 2)"]
    x = [e for e in doc["traceEvents"] if e["ph"] == "X"]
    assert [e["dur"] for e in x] == pytest.approx([1e3, 2e3]) and x[0]["tid"] != x[1]["tid"]


class BadSpans:
    """A third-party engine that copies right but reports a span with its ends swapped."""

    @ce.hookimpl
    def copyengine_register_engines(self, register):
        from copyengine.engines.base import folio_mc_copy
        from copyengine.engines.serial import SerialEngine

        class Swapped(SerialEngine):
            def copy(self, job):
                if job.spans is not None:
                    job.spans.append(("lane", 2.0, 1.0, 1))
                return folio_mc_copy(job, np.arange(job.nr_folios))
        register("swapped", lambda arg, machine: Swapped(), "copies, reports a bad span")


def test_an_engine_with_a_bad_span_is_an_engine_error_and_nothing_is_lost():
    """The span is refused (none of the job's kept); the framework takes it for a broken
    engine: its batch is copied again on the CPU, every byte arrives."""
    pm = make_plugin_manager(entry_points=False, plugins=[BadSpans(), Watcher()])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        m.set_engine("swapped")
        p = m.spawn()
        a = p.mmap(8 * PS)
        p.write(a, bytes(range(256)) * 8 * 16)
        with trace.record(m) as rec:
            assert p.move_pages(0, [a + i * PS for i in range(8)], [1] * 8).ret == 0
        assert rec.spans == [] and m.vmstat["copy_engine_errors"] == 1
        assert p.read(a, 8 * PS) == bytes(range(256)) * 8 * 16
        assert p.move_pages(0, [a + i * PS for i in range(8)], [0] * 8).ret == 0   # no recorder: no span
        assert m.vmstat["copy_engine_errors"] == 1
