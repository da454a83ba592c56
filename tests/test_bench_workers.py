"""The bench's measurements cannot taint each other (issue 12): every configuration in its
own spawned worker process, runs interleaved across repeats (the JSON keeps every sample
and its order), memory checked per worker, workers and --busy load always cleaned up; and
the scenarios that replaced the bench/ scripts (issue 15). No timing is asserted."""
import json
import os
import subprocess
import sys
import time

import pytest

from copyengine.bench import cli as bench_cli
from copyengine.bench.busy import busy
from copyengine.bench.extra import run_scenario, scenario_engines, scenario_populate
from copyengine.bench.runner import interleave_groups, run_bench
from copyengine.bench.worker import ProcessWorker, WorkerDied
from copyengine.plugins import make_plugin_manager
from helpers import process_alive

FAST = dict(repeat=3, warmup=1, ceiling=10.0, progress=False, quick=True)


@pytest.fixture(scope="module")
def isolated():
    return run_bench(page_sizes="4KiB", counts=[8, 64], configs=["serial", "mt:1"], **FAST)


def test_each_configuration_runs_in_its_own_worker_process(isolated):
    assert isolated["settings"]["isolation"].startswith("process per configuration")
    pids = {r["config"]: r["worker_pid"] for r in isolated["results"]}
    assert all(r["verified"] for r in isolated["results"])
    assert len(set(pids.values())) == 2 and os.getpid() not in pids.values()
    # one worker per configuration for the whole run: the same pid on every row
    for r in isolated["results"]:
        assert r["worker_pid"] == pids[r["config"]]
    assert not any(process_alive(p) for p in pids.values())   # every worker exited at the end


def test_runs_are_interleaved_and_every_sample_is_kept(isolated):
    rows = {}
    for r in isolated["results"]:
        rows.setdefault(r["count"], {})[r["config"]] = r
    base = 0
    for count in (8, 64):
        s, m = rows[count]["serial"], rows[count]["mt:1"]
        # warm-up round (untimed), then round by round: serial, mt:1, serial, mt:1 ...
        assert s["warmup_seq"] == [base] and m["warmup_seq"] == [base + 1]
        assert s["runs_seq"] == [base + 2, base + 4, base + 6]
        assert m["runs_seq"] == [base + 3, base + 5, base + 7]
        for r in (s, m):
            assert len(r["runs_s"]) == len(r["runs_gbps"]) == 3
            assert r["gbps"] == sorted(r["runs_gbps"])[1]           # the median of the samples
        base += 8


def test_memory_is_measured_per_worker_and_row(isolated):
    mem = isolated["memory"]
    pids = {r["config"]: r["worker_pid"] for r in isolated["results"]}
    assert len(mem["per_row"]) == 4
    for row in mem["per_row"]:
        assert row["pid"] == pids[row["config"]]
        assert row["sim_touched_bytes"] > 0 and row["peak_rss_growth_bytes"] is not None
    assert {(w["config"], w["page_size"]) for w in mem["per_worker"]} == {("serial", "4KiB"), ("mt:1", "4KiB")}
    for w in mem["per_worker"]:   # judged on the worker's largest row
        rows = [r for r in mem["per_row"] if r["config"] == w["config"]]
        assert w["sim_touched_bytes"] == max(r["sim_touched_bytes"] for r in rows)
        assert w["peak_rss_growth_bytes"] == max(r["peak_rss_growth_bytes"] for r in rows)
        assert w["limit_bytes"] == int(w["sim_touched_bytes"] * 1.1)
        assert w["within_limit"] is None      # rows this small are reported, not judged
    assert mem["within_limit"] is None


def test_the_memory_check_judges_each_worker_on_its_largest_row():
    from copyengine.bench.cells import Cell
    from copyengine.bench.runner import _memory
    from copyengine.bench.scenarios import parse_page_size
    ps, mib = parse_page_size("64KiB"), 1 << 20

    def cell(config, count, touched, growth, pid):
        c = Cell(ps, count, config)
        c.memory = {"pid": pid, "sim_touched_bytes": touched * mib, "peak_rss_growth_bytes": growth * mib,
                    "baseline_rss_bytes": 100 * mib, "peak_rss_bytes": (100 + growth) * mib, "peak_reset": True}
        return c
    # a small row 20% over (heap noise) does not fail a worker whose largest row is within 1.1x
    mem = _memory([cell("a", 1, 4, 5, 1), cell("a", 2, 512, 540, 1), cell("b", 2, 512, 530, 2)])
    assert mem["within_limit"] is True and mem["worst"] == {"config": "a", "page_size": "64KiB"}
    assert mem["peak_rss_growth_bytes"] == 540 * mib and mem["limit_bytes"] == int(512 * mib * 1.1)
    mem = _memory([cell("a", 2, 512, 540, 1), cell("b", 2, 512, 600, 2)])
    assert mem["within_limit"] is False and mem["worst"]["config"] == "b"
    assert _memory([cell("a", 1, 4, 9, 1)])["within_limit"] is None


def test_a_plugin_manager_object_keeps_the_runs_in_this_process():
    res = run_bench(page_sizes="4KiB", counts=[8], configs=["serial", "vanilla"],
                    plugin_manager=make_plugin_manager(), **FAST)
    assert res["settings"]["isolation"] == "in-process"
    assert {r["worker_pid"] for r in res["results"]} == {os.getpid()}
    assert [r["runs_seq"] for r in res["results"]] == [[2, 4, 6], [3, 5, 7]]  # vanilla first, as given


def test_interleave_groups_fit_in_memory():
    g = 1 << 30
    cfgs = ["a", "b", "c", "d", "e"]
    assert interleave_groups(cfgs, g, available=100 * g) == [cfgs]
    # a row of 1 GiB needs 2 x (2 GiB + slack) x 1.1 per worker; 0.6 x 10 GiB holds 2
    assert interleave_groups(cfgs, g, available=10 * g) == [["a", "b"], ["c", "d"], ["e"]]
    assert interleave_groups(cfgs, g, available=1 * g) == [[c] for c in cfgs]   # at least one
    assert interleave_groups(cfgs, g, available=0) == [cfgs]                   # unknown: one group
    assert interleave_groups([], g, available=10 * g) == []


def test_a_worker_that_dies_is_reported_and_replaced():
    w = ProcessWorker(timeout=60)
    try:
        assert w.call("pid") == w.proc.pid != os.getpid()
        w.proc.kill()
        w.proc.join(5)
        with pytest.raises(WorkerDied, match="died"):
            w.call("pid")
        w2 = w.restart()
        assert w2.call("pid") == w2.proc.pid
        w2.close()
        assert not w2.proc.is_alive()
    finally:
        w.kill()


def test_a_worker_error_outside_a_run_is_reported_not_hung():
    w = ProcessWorker(timeout=60)
    try:
        with pytest.raises(WorkerDied, match="AttributeError"):
            w.call("no_such_method")
        assert w.call("pid") == w.proc.pid          # still serving
    finally:
        w.close()


def test_busy_load_is_killed_on_ctrl_c():
    with pytest.raises(KeyboardInterrupt):
        with busy(1) as pids:
            raise KeyboardInterrupt
    assert not any(process_alive(p) for p in pids)


def test_busy_load_exits_when_the_bench_is_killed():
    code = ("import os, sys\nfrom copyengine.bench.busy import busy\n"
            "with busy(1) as pids:\n    print(pids[0], flush=True)\n    os._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(pid)


def test_scenario_engines_measures_every_engine_on_every_job():
    o = scenario_engines(configs=["serial", "mt:1", "nosuch"], quick=True, repeat=1, cold=False)
    assert o["jobs"] and all(set(j["median_us"]) == {"numpy copy", "serial", "mt:1"} for j in o["jobs"])
    assert "nosuch" in o["unavailable"]


def test_scenario_populate_reports_ratio_and_rss():
    o = scenario_populate(size=8 << 20, repeat=1)
    assert o["faults"] == 2048 and o["ratio"] > 0
    assert o["rss"]["touched_bytes"] >= 8 << 20


def test_scenario_overhead_from_the_command_line(tmp_path, capsys):
    path = tmp_path / "o.json"
    assert bench_cli.main(["--scenario", "overhead", "--quick", "--repeat", "1", "--json", str(path)]) == 0
    assert "framework alone (nocopy engine)" in capsys.readouterr().out
    res = json.loads(path.read_text())
    assert res["scenario"] == "overhead" and res["nocopy_4KiB"]["us_per_folio"] > 0


def test_unknown_scenario_is_a_usage_error(capsys):
    assert bench_cli.main(["--scenario", "nosuch"]) == 2
    with pytest.raises(ValueError, match="--scenario"):
        run_scenario("tables")


def test_workers_exit_when_the_bench_is_killed():
    code = ("import os\nfrom copyengine.bench.worker import ProcessWorker\n"
            "w = ProcessWorker(timeout=60)\nprint(w.call('pid'), flush=True)\nos._exit(0)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    pid = int(out.stdout.split()[0])
    deadline = time.monotonic() + 10
    while process_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not process_alive(pid)
