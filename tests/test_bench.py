"""The bench runner (copyengine.bench): tiny runs through the Python API and the CLI entry,
the JSON schema, bad options (exit 2), unavailable configurations, and failed runs that
are reported but never counted."""
import argparse
import csv
import io
import json
import math

import numpy as np
import pytest

import copyengine
from copyengine.bench import cli as bench_cli
from copyengine.bench import report, run_bench
from copyengine.bench.runner import PHASES, BenchError, Progress, evaluate_targets, make_plan
from copyengine.bench.scenarios import default_configs, mt_thread_counts, parse_counts, parse_page_size
from copyengine.engines import Capabilities, Engine, copy_descriptors
from copyengine.plugins import make_plugin_manager

KiB, MiB = 1 << 10, 1 << 20
FAST = dict(repeat=2, quick=True, progress=False, ceiling=10.0)


# --------------------------------------------------------------------------- engines that lie
class _NoCopy(Engine):
    """Reports every folio copied and copies nothing."""
    capabilities = Capabilities(threads=1)

    def copy(self, job):
        return np.zeros(job.nr_folios, np.int32)


class _HalfCopy(Engine):
    """Copies the first half of each descriptor only, and reports success."""
    capabilities = Capabilities(threads=1)

    def copy(self, job):
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes // 2)
        return np.zeros(job.nr_folios, np.int32)


class _Raises(Engine):
    capabilities = Capabilities(threads=1)

    def copy(self, job):
        raise RuntimeError("device on fire")


class _Declines(Engine):
    """Copies nothing and says so: the framework's CPU fallback copies every folio."""
    capabilities = Capabilities(threads=1)

    def copy(self, job):
        return np.full(job.nr_folios, -95, np.int32)


class _Unavailable(Engine):
    pass


def _unavailable(arg, machine):
    raise copyengine.EngineUnavailable("no such device here")


class LiarsPlugin:
    @copyengine.hookimpl
    def copyengine_register_engines(self, register):
        register("liar-nocopy", lambda arg, m: _NoCopy())
        register("liar-half", lambda arg, m: _HalfCopy())
        register("liar-raises", lambda arg, m: _Raises())
        register("liar-declines", lambda arg, m: _Declines())
        register("nodev", _unavailable)


@pytest.fixture(scope="module")
def liars_pm():
    return make_plugin_manager(plugins=[LiarsPlugin()])


@pytest.fixture(scope="module")
def quick_result():
    return run_bench(page_sizes=["4KiB", "2MiB@64KiB"], counts=[1, 8], configs=["vanilla", "serial", "mt:1"],
                     **FAST)


# --------------------------------------------------------------------------- schema
def _check_schema(res):
    assert isinstance(res["machine"], dict)
    assert isinstance(res["ceiling_gbps"], float) and res["ceiling_gbps"] > 0
    assert isinstance(res["results"], list) and res["results"]
    for r in res["results"]:
        assert isinstance(r["page_size"], str)
        assert isinstance(r["base_page"], int) and isinstance(r["folio_size"], int)
        assert isinstance(r["count"], int) and isinstance(r["config"], str)
        for k in ("gbps", "gbps_min", "gbps_max", "fraction"):
            assert r[k] is None or isinstance(r[k], float), (k, r[k])
        assert isinstance(r["repeats"], int) and isinstance(r["verified"], bool)
        if r["verified"]:
            assert r["gbps_min"] <= r["gbps"] <= r["gbps_max"]
            assert r["fraction"] == pytest.approx(r["gbps"] / res["ceiling_gbps"])
            assert set(r["phases"]) == set(PHASES)
            assert all(isinstance(v, float) and v >= 0 for v in r["phases"].values())
            assert r["other"] >= 0
            assert sum(r["shares"].values()) == pytest.approx(1.0, abs=1e-6)
        else:
            assert r["gbps"] is None and r["fraction"] is None and r["repeats"] == 0
            assert r.get("error")
    # JSON-clean: a round trip changes nothing, and nothing is NaN
    assert json.loads(json.dumps(res, allow_nan=False)) == json.loads(json.dumps(res))


def test_quick_api_run(quick_result):
    res = quick_result
    _check_schema(res)
    rows = {(r["page_size"], r["count"], r["config"]): r for r in res["results"]}
    assert set(rows) == {(ps, c, cfg) for ps in ("4KiB", "2MiB@64KiB") for c in (1, 8)
                         for cfg in ("vanilla", "serial", "mt:1")}
    for r in res["results"]:
        assert r["verified"], r.get("error")
        assert r["repeats"] == 2
        assert r["bytes"] == r["count"] * r["folio_size"]
    r = rows[("2MiB@64KiB", 8, "serial")]
    assert (r["base_page"], r["folio_size"]) == (64 * KiB, 2 * MiB)
    assert rows[("4KiB", 1, "vanilla")]["folio_size"] == 4 * KiB
    mi = res["machine"]
    for k in ("cpu", "cores", "python", "numpy", "numba", "numba_threading_layer", "opencl"):
        assert k in mi
    mem = res["memory"]
    assert mem["sim_touched_bytes"] > 0 and "peak_rss_growth_bytes" in mem
    assert res["settings"]["repeat"] == 2
    assert any(t.get("memory") for t in res["targets"])


def test_phases_add_up_to_the_wall_time(quick_result):
    for r in quick_result["results"]:
        total = sum(r["phases"].values()) + r["other"]
        assert total == pytest.approx(r["seconds_mean"], rel=1e-6, abs=1e-9)
        assert r["phases"]["copy"] > 0 or r["phases"]["fused"] > 0  # a small call: one compiled call


def test_reports(quick_result, tmp_path):
    text = report.format_report(quick_result)
    assert "### 4KiB" in text and "### 2MiB@64KiB" in text
    assert "| pages | vanilla | serial | mt:1 | best | of ceiling |" in text
    assert "Where the time goes for" in text and "finalize" in text and "other" in text
    assert "ceiling: 10.00 GB/s" in text
    report.write_json(quick_result, tmp_path / "r.json")
    assert json.loads((tmp_path / "r.json").read_text())["results"] == json.loads(json.dumps(quick_result["results"]))
    report.write_csv(quick_result, tmp_path / "r.csv")
    rows = list(csv.DictReader(open(tmp_path / "r.csv")))
    assert len(rows) == len(quick_result["results"])
    assert set(report.CSV_FIELDS) <= set(rows[0])
    report.write_markdown(quick_result, tmp_path / "r.md")
    assert "| pages |" in (tmp_path / "r.md").read_text()
    if report.plot_available() is None:
        report.write_plot(quick_result, tmp_path / "r.png")
        assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- CLI
def test_cli_main_writes_files(tmp_path, capsys):
    j, c = tmp_path / "out.json", tmp_path / "out.csv"
    rc = bench_cli.main(["--quick", "--page-size", "64KiB", "--counts", "2,4", "--configs", "serial,mt:1",
                         "--repeat", "2", "--ceiling", "8", "--no-progress", "--json", str(j), "--csv", str(c)])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert "### 64KiB" in out.out and "| 4 |" in out.out
    res = json.loads(j.read_text())
    _check_schema(res)
    assert {r["config"] for r in res["results"]} == {"serial", "mt:1"}
    assert len(list(csv.DictReader(open(c)))) == 4


def test_cli_add_parser_and_run(capsys):
    parser = argparse.ArgumentParser(prog="copyengine")
    sub = parser.add_subparsers(dest="command")
    bench_cli.add_parser(sub)
    args = parser.parse_args(["bench", "--quick", "--page-size", "2MiB", "--counts", "1", "--configs", "serial",
                              "--repeat", "1", "--ceiling", "5", "--no-progress"])
    assert args.func is bench_cli.run
    assert bench_cli.run(args) == 0
    assert "### 2MiB" in capsys.readouterr().out


@pytest.mark.parametrize("argv, words", [
    (["--page-size", "3KiB"], "page size"),
    (["--page-size", "2MiB@8KiB"], "base page"),
    (["--page-size", "4MiB"], "2MiB"),
    (["--page-size", "4KiB,,2MiB"], "empty"),
    (["--counts", "0"], "at least 1"),
    (["--counts", "x"], "not a number"),
    (["--counts", "1000000000"], "available"),
    (["--configs", "seriel"], "unknown engine"),
    (["--configs", "mt:"], "empty argument"),
    (["--configs", "serial,"], "empty"),
    (["--repeat", "0"], "at least 1"),
    (["--repeat", "two"], "integer"),
    (["--json", "/nonexistent-dir/x.json"], "does not exist"),
    (["--ceiling", "-1"], "positive"),
])
def test_bad_options_exit_2(argv, words, capsys):
    rc = bench_cli.main(["--no-progress", "--quick", *argv])
    err = capsys.readouterr().err
    assert rc == 2
    assert words in err and "error" in err


def test_bad_options_api_raise_bench_error():
    with pytest.raises(BenchError, match="page size"):
        run_bench(page_sizes=["5KiB"], **FAST)
    with pytest.raises(BenchError, match="repeat"):
        run_bench(page_sizes=["4KiB"], repeat=0, quick=True, progress=False, ceiling=1.0)
    assert issubclass(BenchError, ValueError)


# --------------------------------------------------------------------------- unavailable, failed
def test_unavailable_configs_are_columns_not_crashes(liars_pm):
    res = run_bench(page_sizes=["4KiB"], counts=[2], configs=["serial", "nodev"],
                    plugin_manager=liars_pm, **FAST)
    _check_schema(res)
    by = {r["config"]: r for r in res["results"]}
    assert by["serial"]["verified"]
    assert by["nodev"]["unavailable"] and not by["nodev"]["verified"] and by["nodev"]["gbps"] is None
    assert "no such device" in by["nodev"]["error"]
    text = report.format_report(res)
    assert "n/a" in text and "no such device" in text


def test_more_threads_than_the_machine_is_a_bad_option_naming_the_maximum(liars_pm):
    """mt:N above what the machine can run is the contract's ValueError naming the
    maximum: the bench refuses it before running anything."""
    with pytest.raises(BenchError, match="maximum"):
        run_bench(page_sizes=["4KiB"], counts=[2], configs=["serial", "mt:9999"],
                  plugin_manager=liars_pm, **FAST)


@pytest.mark.parametrize("liar", ["liar-nocopy", "liar-half", "liar-raises", "liar-declines"])
def test_failed_runs_are_reported_never_counted(liars_pm, liar):
    res = run_bench(page_sizes=["4KiB", "2MiB"], counts=[1, 64], configs=["serial", liar, "vanilla"],
                    plugin_manager=liars_pm, **FAST)
    _check_schema(res)
    for r in res["results"]:
        if r["config"] == liar:
            assert not r["verified"] and r["gbps"] is None and r["fraction"] is None and r["repeats"] == 0
            assert ("engine failed" if liar in ("liar-raises", "liar-declines") else "verification failed") \
                in r["error"], r["error"]
            assert not r.get("unavailable")
        else:  # the configurations after the failed one run on rebuilt, clean data
            assert r["verified"], r.get("error")
    text = report.format_report(res)
    assert "FAIL" in text and "not counted" in text
    # a failed cell never wins a row
    assert liar not in {r["config"] for t in res["targets"] for r in t.get("rows", ())}


def test_cli_exit_1_when_a_cell_fails(liars_pm, capsys):
    p = bench_cli.build_parser()
    args = p.parse_args(["--quick", "--page-size", "4KiB", "--counts", "4", "--configs", "serial,liar-nocopy",
                         "--repeat", "1", "--ceiling", "5", "--no-progress"])
    args.plugin_manager = liars_pm
    assert bench_cli.run(args) == 1
    assert "FAIL" in capsys.readouterr().out


def test_nocopy_stamps_catch_stale_destinations(liars_pm):
    """Ping-pong reuses frames: a destination may hold an older copy of the same data.
    Per-run stamps must still catch an engine that copies nothing, even on big rows
    checked by sampling only (no full compare after every run)."""
    res = run_bench(page_sizes=["64KiB"], counts=[512], configs=["serial", "liar-nocopy"],
                    plugin_manager=liars_pm, full_check_bytes=0, final_check_bytes=0, warmup=2, **FAST)
    by = {r["config"]: r for r in res["results"]}
    assert by["serial"]["verified"]
    assert "stamps" in by["liar-nocopy"]["error"]


# --------------------------------------------------------------------------- pieces
@pytest.mark.parametrize("token, folio, base, canon", [
    ("4KiB", 4 * KiB, 4 * KiB, "4KiB"),
    ("64KiB", 64 * KiB, 64 * KiB, "64KiB"),
    ("2MiB", 2 * MiB, 4 * KiB, "2MiB"),
    ("2MiB@64KiB", 2 * MiB, 64 * KiB, "2MiB@64KiB"),
    ("2MiB@4KiB", 2 * MiB, 4 * KiB, "2MiB"),
    ("64KiB@4KiB", 64 * KiB, 4 * KiB, "64KiB@4KiB"),
    ("64KiB@64KiB", 64 * KiB, 64 * KiB, "64KiB"),
    (" 16KiB ", 16 * KiB, 4 * KiB, "16KiB"),
])
def test_parse_page_size(token, folio, base, canon):
    ps = parse_page_size(token)
    assert (ps.folio_size, ps.base_page, ps.token) == (folio, base, canon)
    assert parse_page_size(ps.token) == ps


@pytest.mark.parametrize("token", ["", "4KB", "3KiB", "4MiB", "32KiB@64KiB", "2MiB@16KiB", "2MiB@64KiB@4KiB"])
def test_parse_page_size_rejects(token):
    with pytest.raises(ValueError):
        parse_page_size(token)


def test_counts_and_configs():
    assert parse_counts("8,1,1k,8") == [1, 8, 1024]
    assert mt_thread_counts(1) == [1]
    assert mt_thread_counts(6) == [1, 2, 4, 6]
    assert mt_thread_counts(32) == [1, 2, 4, 8, 16, 32]
    cfgs = default_configs({"serial": 0, "vanilla": 0, "mt": 0, "zdma": 0}, cpus=4)
    assert cfgs == ["vanilla", "serial", "mt:1", "mt:2", "mt:4", "opencl", "auto", "zdma"]
    plan = make_plan(page_sizes="2MiB@64KiB", quick=False)
    assert plan.counts["2MiB@64KiB"][:3] == [1, 2, 4] and 128 in plan.counts["2MiB@64KiB"]
    assert plan.repeat == 5 and plan.warmup == 1
    assert "mt:1" in plan.configs and "auto" in plan.configs


def test_progress_bar():
    s = io.StringIO()
    bar = Progress(100, True, stream=s)
    bar.advance(50, "half")
    bar.draw(force=True)
    bar.close()
    assert "\r[" in s.getvalue() and "50%" in s.getvalue() and "half" in s.getvalue()
    quiet = io.StringIO()
    bar = Progress(100, False, stream=quiet)
    bar.advance(100)
    bar.close()
    assert quiet.getvalue() == ""


def test_evaluate_targets():
    def row(ps, c, cfg, g):
        return {"page_size": ps, "count": c, "config": cfg, "gbps": g, "fraction": None if g is None else g / 10}
    results = [row("2MiB@64KiB", 128, "serial", 9.5), row("2MiB@64KiB", 128, "mt:2", 9.8),
               row("2MiB@64KiB", 256, "mt:2", 8.0), row("2MiB@64KiB", 64, "mt:2", 1.0),
               row("64KiB", 4096, "serial", None), row("4KiB", 65536, "serial", 4.0)]
    t = {x.get("page_size", "memory"): x for x in evaluate_targets(results, 10.0, {"within_limit": True})}
    assert t["2MiB@64KiB"]["met"] is False and t["2MiB@64KiB"]["fraction"] == pytest.approx(0.8)
    assert [r["config"] for r in t["2MiB@64KiB"]["rows"]] == ["mt:2", "mt:2"]
    assert t["64KiB"]["measured"] is False and t["64KiB"]["met"] is None
    assert t["4KiB"]["met"] is True
    assert t["2MiB"]["met"] is None


def test_ceiling_in_a_child_process():
    from copyengine.bench.sysinfo import measure_ceiling
    c = measure_ceiling(nbytes=8 * MiB, max_threads=2, repeat=1)
    assert c["process"] == "child" and c["verified"]
    assert c["gbps"] > 0 and math.isfinite(c["gbps"]) and set(c["per_threads"]) == {"1", "2"}
    assert c["chunked"]["gbps"] > 0


def test_auto_says_why_it_chose_in_the_json_and_the_report():
    """auto's cells carry its choices by engine and reason (one per batch, warm-up runs
    included); other engines' cells carry none; the text report lists them."""
    res = run_bench(page_sizes=["64KiB"], counts=[4], configs=["serial", "auto"], repeat=2, quick=True,
                    progress=False, ceiling=8.0)
    cells = {r["config"]: r for r in res["results"]}
    assert cells["auto"]["verified"] and "auto_choices" not in cells["serial"]
    a = cells["auto"]["auto_choices"]
    runs = cells["auto"]["repeats"] + len(cells["auto"]["warmup_seq"])  # one batch per run at 256 KiB
    assert sum(a["choices"].values()) == runs
    assert {s: sum(w.values()) for s, w in a["reasons"].items()} == a["choices"]
    text = report.format_report(res)
    assert "Why auto chose" in text and "64KiB x4 auto: " in text
