"""``copyengine bench``: the command line of the bench.

The ``copyengine`` command wires it in with::

    from copyengine.bench import cli as bench_cli
    bench_cli.add_parser(subparsers)          # adds "bench" with its options
    ...
    return bench_cli.run(args)                # exit status: 0, 1 (a cell failed), 2 (bad options)

``python -m copyengine.bench [options]`` runs it on its own (:func:`main`).
"""
from __future__ import annotations

import argparse
import os
import sys

DESCRIPTION = """\
Reproduce the seed's move_pages() throughput tables: a process maps N folios on node 0,
writes them, and one move_pages() call moves them to node 1; GB/s = bytes moved / wall
time of that call, median of --repeat runs after one untimed warm-up, every run verified.
One table per page size (rows: pages, columns: configurations), each row's best as a
fraction of this host's memcpy ceiling, and where the time goes (prepare, unmap, move,
copy, finalize, other) for the best configuration.
"""

EPILOG = """\
page sizes: FOLIO[@BASE]: 4KiB, 64KiB (64 KiB base pages), 2MiB (2 MiB folios on 4 KiB
base pages), 2MiB@64KiB (2 MiB folios on 64 KiB base pages, as the seed on arm64).
configurations: engine specs: vanilla, serial, mt:N, opencl, auto, or a plugin's engine;
unavailable ones are reported as n/a columns.
scenarios: --scenario overhead|engines|populate replaces the old bench/*.py scripts;
--quick, --repeat, --configs (engines), --busy and --json apply to them too.
exit status: 0 all cells verified, 1 some cell failed (reported, not counted), 2 bad options.
"""


def add_parser(subparsers, name="bench"):
    """Add the ``bench`` subcommand to an argparse ``subparsers`` object; returns its parser."""
    p = subparsers.add_parser(name, help="reproduce the seed's move_pages() throughput tables",
                              description=DESCRIPTION, epilog=EPILOG,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(p)
    p.set_defaults(func=run)
    return p


def add_arguments(p):
    p.add_argument("--page-size", "--page-sizes", dest="page_size", metavar="LIST",
                   help="comma list of page sizes (default: 4KiB,64KiB,2MiB,2MiB@64KiB)")
    p.add_argument("--counts", metavar="LIST",
                   help="comma list of page counts, the rows, for every page size "
                        "(default: the seed's rows plus the target rows, per page size)")
    p.add_argument("--configs", metavar="LIST",
                   help="comma list of engine specs, the columns (default: vanilla, serial, "
                        "mt:1 .. mt:CPUS, opencl, auto, and plugin engines)")
    p.add_argument("--repeat", metavar="N", type=_int_arg("--repeat"),
                   help="timed runs per cell, after one untimed warm-up (default 5; --quick 2)")
    p.add_argument("--warmup", metavar="N", type=_int_arg("--warmup", 0), default=1,
                   help="untimed runs per cell before the timed ones (default 1)")
    p.add_argument("--json", metavar="PATH", help="write the results as JSON")
    p.add_argument("--csv", metavar="PATH", help="write one CSV row per cell")
    p.add_argument("--plot", metavar="PATH.png", help="plot GB/s against pages (needs matplotlib)")
    p.add_argument("--markdown", metavar="PATH.md", help="write the tables as markdown")
    p.add_argument("--quick", action="store_true", help="a smoke run of a few seconds (small rows, 2 repeats)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on stderr")
    p.add_argument("--no-spread", action="store_true", help="tables without the min-max spread")
    p.add_argument("--ceiling", metavar="GBPS", type=float,
                   help="use this ceiling (GB/s) instead of measuring it")
    p.add_argument("--trace", metavar="PATH.json",
                   help="write the first row's last timed run of every configuration as a Chrome "
                        "trace-event file (open it in Perfetto or chrome://tracing)")
    p.add_argument("--tradeoff", metavar="PATH.png",
                   help="also run one row at several batch sizes and plot GB/s against the p99 "
                        "unavailability window, one line per configuration (needs matplotlib)")
    p.add_argument("--tradeoff-row", metavar="SIZE:COUNT", default="4KiB:4096",
                   help="the row --tradeoff runs (default 4KiB:4096)")
    p.add_argument("--scenario", default="tables", choices=("tables", "overhead", "engines", "populate"),
                   help="tables (default): the seed's move_pages() tables; overhead: the model's cost "
                        "per call and per folio, and the framework's alone (nocopy engine); engines: "
                        "every copy engine outside migration on jobs from 64 B to 1 GiB, and the cold "
                        "start; populate: faulting memory in against numpy, and its RSS")
    p.add_argument("--busy", metavar="K", type=_int_arg("--busy", 0), default=0,
                   help="run K CPU-bound processes beside the bench for the whole run (default 0)")
    p.add_argument("--batch", metavar="PAGES", type=_int_arg("--batch"),
                   help="NR_MAX_BATCHED_MIGRATION for every machine of the run, in base pages "
                        "(default: HPAGE_PMD_NR, 512 with 4 KiB pages, 8192 with 64 KiB)")
    return p


def _int_arg(what, lo=1):
    def conv(s):
        try:
            v = int(s, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{what} takes an integer, not {s!r}") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"{what} must be at least {lo}, not {v}")
        return v
    return conv


def _err(msg) -> int:
    print(f"copyengine bench: error: {msg}", file=sys.stderr)
    return 2


def _check_out(path, what):
    if path is None:
        return None
    d = os.path.dirname(os.path.abspath(path)) or "."
    if not os.path.isdir(d):
        return f"{what} {path}: directory {d} does not exist"
    if not os.access(d, os.W_OK):
        return f"{what} {path}: directory {d} is not writable"
    if os.path.isdir(path):
        return f"{what} {path} is a directory"
    return None


def run(args) -> int:
    """Run the bench for parsed ``args``; returns the exit status (0, 1 or 2)."""
    from . import report
    from .busy import busy
    from .runner import BenchError, make_plan, run_bench
    from .tradeoff import format_tradeoff, plot_points, run_tradeoff, write_tradeoff_plot

    for path, what in ((args.json, "--json"), (args.csv, "--csv"), (args.plot, "--plot"),
                       (getattr(args, "markdown", None), "--markdown"), (getattr(args, "trace", None), "--trace")):
        msg = _check_out(path, what)
        if msg:
            return _err(msg)
    if args.plot or getattr(args, "tradeoff", None):
        msg = report.plot_available() or _check_out(getattr(args, "tradeoff", None), "--tradeoff")
        if msg:
            return _err(msg)
    if args.ceiling is not None and not args.ceiling > 0:
        return _err(f"--ceiling must be a positive number of GB/s, not {args.ceiling}")

    pm = getattr(args, "plugin_manager", None)
    plugins = list(getattr(args, "plugins", None) or getattr(args, "plugin", None) or ())
    if plugins and pm is None:
        from ..plugins import make_plugin_manager
        pm = make_plugin_manager(plugins=plugins)
    # the workers rebuild a manager from plugin names; only a manager object made some
    # other way (the API, tests) keeps the runs in this process
    run_pm = None if (plugins or pm is None or pm is _pm(None)) else pm
    try:  # validate everything before the (long) run
        make_plan(args.page_size, args.counts, args.configs, args.repeat, args.quick, args.warmup, pm=_pm(pm))
    except BenchError as e:
        return _err(str(e))

    progress = False if args.no_progress else None
    if getattr(args, "scenario", "tables") != "tables":
        return _run_scenario(args, run_pm)
    try:
        with busy(getattr(args, "busy", 0)) as load:
            res = run_bench(page_sizes=args.page_size, counts=args.counts, configs=args.configs,
                            repeat=args.repeat, quick=args.quick, warmup=args.warmup, progress=progress,
                            plugin_manager=run_pm, plugins=plugins, ceiling=args.ceiling, batch=getattr(args, "batch", None),
                            log=(lambda m: print(m, file=sys.stderr))
                            if progress is None and sys.stderr.isatty() else None)
            if getattr(args, "tradeoff", None):
                res["tradeoff"] = run_tradeoff(args.tradeoff_row, configs=args.configs,
                                               repeat=min(args.repeat or 3, 3), plugin_manager=pm,
                                               ceiling=res.get("ceiling_gbps"), progress=progress)
        res["settings"]["busy"] = len(load)
    except BenchError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        print("copyengine bench: interrupted", file=sys.stderr)
        return 130

    res["tradeoff_plot"] = plot_points(res)  # the JSON keeps the points of the chart
    print(report.format_report(res, spread=not args.no_spread))
    if res.get("tradeoff"):
        print("\n" + format_tradeoff(res["tradeoff"]))
    try:
        if args.json:
            report.write_json(res, args.json)
        if args.csv:
            report.write_csv(res, args.csv)
        if getattr(args, "markdown", None):
            report.write_markdown(res, args.markdown)
        if args.plot:
            report.write_plot(res, args.plot)
        if getattr(args, "trace", None):
            report.write_trace(res, args.trace)
        if res.get("tradeoff"):
            write_tradeoff_plot(res["tradeoff"], args.tradeoff)
        elif res["tradeoff_plot"] and (args.json or getattr(args, "markdown", None)) and not report.plot_available():
            # the chart as a PNG beside the results: local-default.json -> local-default-tradeoff.png
            write_tradeoff_plot(res["tradeoff_plot"], tradeoff_png(args.json or args.markdown))
    except OSError as e:
        print(f"copyengine bench: error: cannot write results: {e}", file=sys.stderr)
        return 1
    failed = [r for r in res["results"] if not r["verified"] and not r.get("unavailable")]
    return 1 if failed else 0


def tradeoff_png(path) -> str:
    """Where a plain run writes its trade-off PNG: beside ``path``, its suffix replaced."""
    return os.path.splitext(path)[0] + "-tradeoff.png"


def _run_scenario(args, pm) -> int:
    """``--scenario overhead|engines|populate`` (see :mod:`.extra`)."""
    import json
    from .busy import busy
    from .extra import run_scenario
    from .scenarios import split_list
    try:
        configs = split_list(args.configs, "--configs") if args.configs else None
        with busy(getattr(args, "busy", 0)) as load:
            res, text = run_scenario(args.scenario, quick=args.quick, repeat=args.repeat, configs=configs,
                                     plugin_manager=pm)
    except ValueError as e:
        return _err(str(e))
    except KeyboardInterrupt:
        print("copyengine bench: interrupted", file=sys.stderr)
        return 130
    res = {"schema": "copyengine-bench-scenario/1", "scenario": args.scenario, "busy": len(load), **res}
    print(text)
    if args.json:
        try:
            with open(args.json, "w") as f:
                json.dump(res, f, indent=1, default=float)
        except OSError as e:
            print(f"copyengine bench: error: cannot write results: {e}", file=sys.stderr)
            return 1
    return 0


def _pm(pm):
    if pm is not None:
        return pm
    from ..plugins import get_plugin_manager
    return get_plugin_manager()


def build_parser(prog="copyengine bench"):
    """A stand-alone parser with the bench's options (and ``-p PLUGIN``)."""
    p = argparse.ArgumentParser(prog=prog, description=DESCRIPTION, epilog=EPILOG,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-p", dest="plugins", action="append", metavar="MODULE",
                   help="register this plugin module (dotted name) too; repeatable")
    add_arguments(p)
    return p


def main(argv=None) -> int:
    """``python -m copyengine.bench``: parse ``argv`` and run; returns the exit status
    (argparse's own errors, such as ``--repeat x``, also give 2)."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code) if isinstance(e.code, int) else 2
    return run(args)
