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
        ev = doc["traceEvents"]
        slices = [e for e in ev if e["ph"] == "X"]
        assert {e["name"].split(" ")[0] for e in slices} >= {"unmap", "copy", "finalize"}
        for e in slices:
            assert isinstance(e["ts"], float) and e["dur"] >= 0 and e["pid"] and e["tid"] >= 1
        inst = [e for e in ev if e["ph"] == "i"]
        assert len(inst) == 1 and inst[0]["args"]["succeeded"] == 20
        assert any(e["ph"] == "M" and e["name"] == "thread_name" for e in ev)
        assert np.all(np.diff([e["ts"] for e in slices if e["name"] == "finalize"]) > 0)
