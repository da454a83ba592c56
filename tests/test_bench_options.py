"""Bench options added for issues 12 and 16: --busy K (the load starts, is counted, and is
always killed), --batch (the machines' batch size), the model-overhead probe (its fields,
no timing asserted), and the per-configuration cost columns (window, CPU)."""
import pytest

from copyengine.bench import cli as bench_cli
from copyengine.bench.busy import busy
from copyengine.bench.overhead import format_overhead, measure_overhead
from copyengine.bench.runner import run_bench
from helpers import process_alive


def test_busy_starts_k_processes_and_always_kills_them():
    with busy(2) as pids:
        assert len(pids) == 2 and all(process_alive(p) for p in pids)
    assert not any(process_alive(p) for p in pids)
    with pytest.raises(RuntimeError):
        with busy(1) as pids:
            raise RuntimeError("the bench failed")
    assert not any(process_alive(p) for p in pids)
    with pytest.raises(ValueError):
        with busy(-1):
            pass


def test_bench_busy_and_batch_are_recorded(tmp_path, capsys):
    path = tmp_path / "r.json"
    rc = bench_cli.main(["--quick", "--no-progress", "--configs", "serial", "--page-size", "4KiB",
                         "--counts", "16", "--busy", "1", "--batch", "8", "--ceiling", "10",
                         "--json", str(path)])
    assert rc == 0
    import json
    res = json.loads(path.read_text())
    assert res["settings"]["busy"] == 1 and res["settings"]["batch"] == 8
    r = res["results"][0]
    assert r["verified"] and r["window_p99_us"] >= r["window_p50_us"] > 0 and r["cpu_s_per_gib"] > 0
    assert res["overhead"]["one_page_call_us"] > 0
    # a plain run keeps the trade-off chart's points, and plots them beside its JSON
    tp = res["tradeoff_plot"]
    out = capsys.readouterr().out
    assert "Trade-off: GB/s against the p99 unavailability window, 4KiB" in out and "o serial" in out
    assert tp["source"] == "rows" and tp["points"] == [
        {"config": "serial", "count": 16, "gbps": r["gbps"], "window_p99_us": r["window_p99_us"]}]
    from copyengine.bench import report
    if report.plot_available() is None:
        assert (tmp_path / "r-tradeoff.png").read_bytes()[:4] == b"\x89PNG"


def test_bad_busy_and_batch_are_refused_with_exit_2(capsys):
    for bad in (["--busy", "x"], ["--busy", "-1"], ["--batch", "0"]):
        assert bench_cli.main(bad) == 2
        assert bad[0] in capsys.readouterr().err


def test_overhead_probe_reports_its_fields():
    o = measure_overhead(folios=256, calls=5, repeat=1)
    assert set(o) >= {"one_page_call_us", "query_call_us", "metadata_us_per_4k_folio", "targets", "met"}
    assert o["one_page_call_us"] > 0 and o["query_call_us"] > 0
    assert "per 4 KiB folio" in format_overhead(o)


def test_the_batch_option_reaches_the_machines_and_every_cell_has_its_costs():
    res = run_bench(page_sizes="4KiB", counts=[256], configs=["serial", "mt:2"], repeat=2, ceiling=10.0, quick=True,
                    progress=False, batch=8)
    assert res["settings"]["batch"] == 8
    for r in res["results"]:
        assert r["verified"]
        assert r["window_p50_us"] <= r["window_p99_us"] <= r["window_max_us"]
        assert r["first_usable_us"] > 0 and r["cpu_s_per_gib"] > 0
        assert r["engines_used"] == {r["config"]: 2 * 256 // 8}  # 32 batches of 8 per timed run


def test_trace_writes_a_chrome_trace_of_the_first_row(tmp_path):
    import json
    path = tmp_path / "t.json"
    rc = bench_cli.main(["--quick", "--no-progress", "--configs", "serial,mt:2", "--page-size", "4KiB",
                         "--counts", "1024,2048", "--ceiling", "10", "--trace", str(path),
                         "--json", str(tmp_path / "r.json")])
    assert rc == 0
    doc = json.loads(path.read_text())
    ev = doc["traceEvents"]
    procs = {e["pid"]: e["args"]["name"] for e in ev if e["ph"] == "M" and e["name"] == "process_name"}
    assert sorted(procs.values()) == ["mt:2 (4KiB x1024)", "serial (4KiB x1024)"]
    for pid in procs:
        slices = [e for e in ev if e["pid"] == pid and e["ph"] == "X"]
        assert slices and min(e["ts"] for e in slices) >= 0
        assert {e["name"].split(" ")[0] for e in slices} >= {"unmap", "copy", "finalize"}
        calls = [e for e in ev if e["pid"] == pid and e["ph"] == "i"]
        assert len(calls) == 1 and calls[0]["args"]["succeeded"] == 1024
    assert "timeline" not in json.loads((tmp_path / "r.json").read_text())
    from test_trace import check_trace_event_format
    check_trace_event_format(doc)
    mt = [p for p, n in procs.items() if n.startswith("mt:2")][0]
    lanes = {e["tid"]: e["args"]["name"] for e in ev if e["pid"] == mt and e["name"] == "thread_name"}
    copies = [e for e in ev if e["pid"] == mt and e.get("cat") == "copy"]
    assert copies and {lanes[e["tid"]] for e in copies} <= {"mt worker 0", "mt worker 1"}
    phase = [e for e in ev if e["pid"] == mt and e["name"] == "copy (mt:2)"]
    for e in copies:  # each worker's slice lies inside a copy phase of its batch
        assert any(p["ts"] - 1 <= e["ts"] and e["ts"] + e["dur"] <= p["ts"] + p["dur"] + 1 for p in phase)


def test_tradeoff_runs_one_row_at_several_batch_sizes_and_plots_it(tmp_path):
    from copyengine.bench import report
    from copyengine.bench.runner import BenchError
    from copyengine.bench.tradeoff import batch_sizes, format_tradeoff, run_tradeoff, write_tradeoff_plot
    assert batch_sizes(4096, 4096) == [16, 64, 256, 512, 2048]
    assert batch_sizes(65536, 64) == [256, 1024, 4096, 8192]
    t = run_tradeoff("4KiB:256", configs=["serial", "mt:2"], repeat=1, ceiling=10.0)
    assert {(p["config"], p["batch"]) for p in t["points"]} == {
        (c, b) for c in ("serial", "mt:2") for b in (16, 64, 256, 512)}
    assert all(p["gbps"] > 0 and p["window_p99_us"] > 0 for p in t["points"])
    assert "| serial |" in format_tradeoff(t)
    if report.plot_available() is None:
        write_tradeoff_plot(t, tmp_path / "t.png")
        assert (tmp_path / "t.png").read_bytes()[:4] == b"\x89PNG"
    with pytest.raises(BenchError):
        run_tradeoff("4KiB-256")


def test_targets_list_only_the_page_sizes_that_ran():
    from copyengine.bench import report
    res = run_bench(page_sizes="64KiB", counts=[4], configs=["serial"], repeat=1, ceiling=10.0,
                    progress=False)
    text = report.format_targets(res)
    assert "64KiB x >= 4096" in text and "memory:" in text
    assert not any(line.startswith(("- 4KiB", "- 2MiB")) for line in text.splitlines())


def test_markdown_breaks_down_the_phases_of_every_configuration(tmp_path):
    from copyengine.bench import report
    res = run_bench(page_sizes="4KiB", counts=[64], configs=["serial", "mt:2"], repeat=1, ceiling=10.0,
                    progress=False)
    report.write_markdown(res, tmp_path / "r.md")
    md = (tmp_path / "r.md").read_text()
    assert "Where the time goes for serial" in md and "Where the time goes for mt:2" in md
    assert report.format_report(res).count("Where the time goes for") == 1  # the text: the best only


def test_a_third_party_column_names_its_package_and_version():
    from copyengine.bench import report
    res = {"machine": {"engines": {"serial": "built-in", "pool": "copyengine-threadpool 0.1.0"}},
           "settings": {"configs": ["serial", "pool:2"], "repeat": 1},
           "results": [{"page_size": "4KiB", "base_page": 4096, "folio_size": 4096, "count": 4, "config": c,
                        "gbps": 1.0, "gbps_min": 1.0, "gbps_max": 1.0, "repeats": 1} for c in ("serial", "pool:2")]}
    head = report.format_tables(res).splitlines()[2]
    assert head.startswith("| pages | serial | pool:2 (copyengine-threadpool 0.1.0) |")


def test_text_plot_puts_points_in_their_cells():
    from copyengine.bench.tradeoff import text_plot
    out = text_plot({"a": [(1, 0), (100, 10)], "b": [(10, 5)]}, width=11, height=5,
                    xlabel="window us", ylabel="GB/s")
    lines = out.splitlines()
    assert lines[0] == "GB/s" and lines[-2].strip() == "window us" and lines[-1] == "o a   * b"
    grid = [ln.split("|", 1)[1].ljust(11) for ln in lines[1:6]]
    assert grid[0][10] == "o" and grid[4][0] == "o" and grid[2][5] == "*"   # log x: 10 is halfway
    assert sum(ch != " " for row in grid for ch in row) == 3
    assert lines[1].split("|")[0].strip() == "10" and lines[5].split("|")[0].strip() == "0"
    assert lines[6].strip().startswith("+") and lines[7].split() == ["1", "10", "100"]
    # two series in one cell, a point off the log scale, no points at all
    both = text_plot({"a": [(10, 1)], "b": [(10, 1), (0, 1)]}, width=9, height=3)
    assert "+" in both.splitlines()[1] and "o" not in both.splitlines()[1]
    assert text_plot({}) == "(no points to plot)" == text_plot({"a": [(0, 1), (None, 2)]})
    with pytest.raises(ValueError, match="width >= 8"):
        text_plot({"a": [(1, 1)]}, width=3)


def test_plot_points_from_rows_or_from_the_tradeoff_run():
    from copyengine.bench.report import trade_points
    from copyengine.bench.tradeoff import format_tradeoff_plot, plot_points

    def row(ps, count, cfg, gbps, w, base=4096, folio=4096):
        return {"page_size": ps, "count": count, "config": cfg, "gbps": gbps, "window_p99_us": w,
                "verified": True, "base_page": base, "folio_size": folio}
    res = {"settings": {"batch": None}, "results": [
        row("4KiB", 512, "serial", 2.0, 300), row("4KiB", 4096, "serial", 3.0, 310),
        row("64KiB", 32, "serial", 1.0, 100, 65536, 65536), row("64KiB", 256, "serial", 4.0, 900, 65536, 65536),
        row("64KiB", 256, "mt:2", None, None, 65536, 65536)]}
    tp = plot_points(res)   # 64KiB: two rows of one batch each (8192 base pages), 4KiB one
    assert tp["source"] == "rows" and "64KiB" in tp["title"] and "up to x256" in tp["title"]
    assert [(p["config"], p["count"]) for p in tp["points"]] == [("serial", 32), ("serial", 256)]
    assert "o serial" in format_tradeoff_plot(tp) and "GB/s" in format_tradeoff_plot(tp)
    res["settings"]["batch"] = 8     # now no row is one batch: the page size with more rows wins
    assert "4KiB" in plot_points({**res, "results": res["results"][:4] + [row("4KiB", 64, "mt:2", 1.0, 50)]})["title"]
    res["tradeoff"] = {"row": "4KiB x4096", "points": [
        {"config": "mt:2", "batch": 16, "gbps": 1.5, "window_p99_us": 40.0, "window_p50_us": 30.0,
         "cpu_s_per_gib": 0.5}]}
    tp = plot_points(res)
    assert tp["source"] == "batch sizes" and tp["points"] == [
        {"config": "mt:2", "batch": 16, "gbps": 1.5, "window_p99_us": 40.0}]
    assert plot_points({"results": []}) is None
    assert "no verified cell" in format_tradeoff_plot(None)
    assert trade_points({"tradeoff_plot": None, "results": res["results"]}) is None
