"""The bench runner: the seed's move_pages() experiment, verified, timed and explained.

One cell = (page size, page count N = a row, configuration = a column). For each row, each
configuration's worker process (:mod:`.worker`; spawned, never forked) builds a machine
of two nodes sized for the row, maps N folios on node 0 and writes a pattern over every
byte; then the folios *ping-pong* between the nodes, one ``move_pages()`` call per run.
The runs are **interleaved**: round 1 asks every configuration of the row for one run, then
round 2, and so on, so that a noisy minute on the host hits all of them alike. The first
``warmup`` rounds are not timed (host first-touch of the simulated frames, caches, thread
pools); the next ``repeat`` are. Throughput is ``N x folio size`` bytes over the wall time
of the call (GB/s = 1e9 bytes/s); a cell's value is the median of its repeats, with the
min-max spread; the JSON keeps every sample (``runs_gbps``, ``runs_s``) and the order it
was taken in (``runs_seq``). Configurations whose rows together would not fit in the host's
memory are interleaved in groups that do (``interleave_group``).

Every run is verified outside the timing (:mod:`.workload`); a run that raises, fails a
check, or whose engine failed marks its cell failed: reported with its error, never counted.

**Where the time goes.** ``Machine.migrate_times`` accumulates the seconds of each phase of
the state machine (prepare, unmap, move, copy, finalize); the bench takes its deltas
around every timed call. What the call spends outside them is reported as ``other``.

**Memory.** Each worker measures, per row, the growth of its own peak RSS over the row
against the host memory backing the row's simulated memory (``memory.per_row``); the check
is judged per worker and page size on its largest row (``memory.per_worker``).
"""
from __future__ import annotations

import gc
import sys
import time

import numpy as np

from .. import trace
from ..migrate.core import PHASES
from . import scenarios as sc
from . import seed as seed_tables
from . import sysinfo
from .cells import TARGETS, Cell, _node_size, evaluate_targets
from .overhead import measure_overhead
from .plan import BenchError, Plan, Progress, make_plan
from .worker import LocalWorker, ProcessWorker, WorkerDied
from .workload import EngineFailed, VerifyError, Workload

SCHEMA = "copyengine-bench/1"
MiB, GiB = 1 << 20, 1 << 30

#: a worker's rows may take this fraction of the host's available memory, all together
MEMORY_SHARE = 0.6
#: a worker whose largest row touches less is reported, not judged (heap noise decides)
MEMORY_JUDGED_BYTES = 64 * MiB

__all__ = ["run_bench", "make_plan", "Plan", "Progress", "BenchError", "VerifyError", "EngineFailed",
           "Workload", "Cell", "PHASES", "SCHEMA", "TARGETS", "evaluate_targets", "interleave_groups"]


# --------------------------------------------------------------------------- steps
def _ceiling_sampler(ceiling, quick, say):
    """Returns (sample(when), samples list, ceiling dict or None until sampled)."""
    samples = []

    def sample(when):
        if ceiling is None:
            say(f"measuring the memcpy ceiling ({when}) ...")
            samples.append((when, sysinfo.measure_ceiling(quick=quick)))
    if ceiling is None:
        return sample, samples, None
    if isinstance(ceiling, dict):
        return sample, samples, dict(ceiling)
    return sample, samples, {"gbps": float(ceiling), "method": "given by the caller"}


def _best_ceiling(samples):
    """The better sample counts: other work on the host can only make a copy slower."""
    ceil = dict(max((c for _, c in samples), key=lambda c: c.get("gbps") or 0))
    if len(samples) > 1:
        ceil["samples"] = [{"when": w, "gbps": c.get("gbps"), "threads": c.get("threads"),
                            "chunked_gbps": (c.get("chunked") or {}).get("gbps")} for w, c in samples]
    return ceil


def _start_workers(configs, pm, plugins, isolate):
    """One worker per configuration: a spawned process, or this process when a plugin
    manager object was given (it cannot cross a process boundary) or ``isolate`` is False."""
    if isolate is None:
        isolate = pm is None
    workers = {}
    try:
        for spec in configs:
            workers[spec] = ProcessWorker(plugins) if isolate else LocalWorker(pm, plugins)
    except BaseException:
        _stop_workers(workers)
        raise
    return workers


def _stop_workers(workers):
    for w in workers.values():
        try:
            w.close()
        except Exception:
            pass


def interleave_groups(configs, row_bytes, available=None) -> list:
    """The configurations of a row split into groups whose rows fit in memory together
    (each holds a source and a destination of ``row_bytes`` plus slack); the runs of a
    group interleave. One group when everything fits or the host does not say."""
    if available is None:
        available = sysinfo._meminfo().get("MemAvailable")
    if not available or not configs:
        return [list(configs)] if configs else []
    need = (2 * row_bytes + 32 * MiB) * 1.1   # resident: the source and the destination
    k = max(1, int(available * MEMORY_SHARE // need))
    return [list(configs[i:i + k]) for i in range(0, len(configs), k)]


class _Row:
    """The state one row shares across its groups: the run counter and the bar."""

    def __init__(self, plan, bar, opts):
        self.plan, self.bar, self.opts = plan, bar, opts
        self.seq = 0
        self.traced = False     # the first row measured gives the --trace timeline


def _call(workers, spec, cell, method, *args, **kw):
    """A worker call whose transport failure fails the cell (and restarts the worker)."""
    try:
        return workers[spec].call(method, *args, **kw)
    except WorkerDied as e:
        cell.error = str(e)
        workers[spec] = workers[spec].restart()
        return None


def _measure_group(rs: _Row, workers, ps, count, group, seed_n) -> list:
    """Set up the row in each configuration's worker, run the rounds interleaved, end the
    row (full compare, memory). Returns the group's cells."""
    plan, bar, opts = rs.plan, rs.bar, rs.opts
    nbytes = count * ps.folio_size
    full_every = nbytes <= opts["full_check_bytes"]
    cells = [Cell(ps, count, spec) for spec in group]
    live = []
    for i, cell in enumerate(cells):
        bar.advance(0, f"{ps.token} x{count} {cell.config}: writing")
        r = _call(workers, cell.config, cell, "setup", ps.token, count, cell.config, seed_n + i, opts["batch"])
        if r is not None and r.get("error"):
            cell.error, cell.unavailable = r["error"], r["unavailable"]
        elif r is not None:
            cell.worker_pid = r["pid"]
            live.append(cell)
        bar.advance(nbytes)
    runs = plan.warmup + plan.repeat
    trace_it = not rs.traced and bool(live)
    for i in range(runs):
        timed, last = i >= plan.warmup, i == runs - 1
        for j, cell in enumerate(live):
            if cell.error is not None:
                bar.advance(nbytes)
                continue
            want = (j + 1, f"{cell.config} ({ps.token} x{count})") if (trace_it and last) else None
            r = _call(workers, cell.config, cell, "run", full=full_every, trace_as=want)
            seq, rs.seq = rs.seq, rs.seq + 1
            bar.advance(nbytes, f"{ps.token} x{count} {cell.config}")
            if r is None:
                continue
            if r.get("error"):
                cell.error = r["error"]
                continue
            cell.add(r, seq, timed)
    rs.traced = rs.traced or trace_it
    for k, cell in enumerate(live):
        # rows above final_check_bytes are compared in full in one configuration only
        full = not full_every and (nbytes <= opts["final_check_bytes"] or k == 0)
        cell.checks = ("stamps+sample+full every run" if full_every else
                       "stamps+sample every run, full after the last" if full else
                       "stamps+sample every run (full compare in another column)")
        r = _call(workers, cell.config, cell, "end_row", full)
        if r is not None:
            if r["error"] and cell.error is None:
                cell.error = r["error"]
            cell.memory = r["memory"]
            cell.auto = r.get("auto")
    for cell in cells:
        if cell.error is not None:
            cell.seconds, cell.phases = [], []
    return cells


def _measure(plan, workers, avail, opts, bar, sample_ceiling) -> list:
    """Every row of every page size; returns the cells in the order measured."""
    cells, seed_n = [], opts["seed"]
    rs = _Row(plan, bar, opts)
    for ips, ps in enumerate(plan.page_sizes):
        if not plan.quick and ips > 0:
            sample_ceiling(f"before {ps.token}")
        av = avail[ps.token]
        live = [s for s in plan.configs if av[s] is None]
        for s in plan.configs:
            if av[s] is not None:
                cells.extend(Cell(ps, c, s, error=av[s], unavailable=True) for c in plan.counts[ps.token])
        for count in plan.counts[ps.token]:
            for group in interleave_groups(live, count * ps.folio_size):
                cells.extend(_measure_group(rs, workers, ps, count, group, seed_n))
                seed_n += len(group)
    return cells


def _memory(cells) -> dict:
    """Per worker and page size, as the single-process bench judged the whole run: the
    largest growth of the worker's peak RSS over one of its rows against the largest
    simulated memory a row touched; the check is growth <= 1.1 x touched for every worker.
    Every row's own figures are in ``per_row``."""
    rows, groups = [], {}
    for c in cells:
        m = getattr(c, "memory", None)
        if not m:
            continue
        row = dict(m, page_size=c.ps.token, count=c.count, config=c.config)
        rows.append(row)
        groups.setdefault((c.config, c.ps.token), []).append(row)
    workers = []
    for (config, token), rs in groups.items():
        touched = max((r["sim_touched_bytes"] or 0) for r in rs)
        growths = [r["peak_rss_growth_bytes"] for r in rs if r["peak_rss_growth_bytes"] is not None]
        growth = max(growths) if growths else None
        workers.append({"config": config, "page_size": token, "pid": rs[-1]["pid"],
                        "sim_touched_bytes": touched, "peak_rss_growth_bytes": growth,
                        "baseline_rss_bytes": rs[-1]["baseline_rss_bytes"],
                        "peak_rss_bytes": max((r["peak_rss_bytes"] or 0) for r in rs),
                        "limit_bytes": int(touched * 1.10) if touched else None,
                        # below MEMORY_JUDGED_BYTES a few MiB of heap would decide it (--quick)
                        "within_limit": (growth <= touched * 1.10)
                        if (growth is not None and touched >= MEMORY_JUDGED_BYTES) else None})
    judged = [w for w in workers if w["within_limit"] is not None]
    worst = max(judged or [w for w in workers if w["peak_rss_growth_bytes"] is not None and w["sim_touched_bytes"]],
                key=lambda w: w["peak_rss_growth_bytes"] / w["sim_touched_bytes"], default={})
    return {
        "sim_touched_bytes": worst.get("sim_touched_bytes"),
        "sim_touched_max_bytes": max((w["sim_touched_bytes"] for w in workers), default=0),
        "sim_expected_bytes": max((2 * c.nbytes for c in cells if getattr(c, "memory", None)), default=0),
        "baseline_rss_bytes": worst.get("baseline_rss_bytes"), "peak_rss_bytes": worst.get("peak_rss_bytes"),
        "peak_rss_growth_bytes": worst.get("peak_rss_growth_bytes"), "limit_bytes": worst.get("limit_bytes"),
        "peak_reset": all(r["peak_reset"] for r in rows) if rows else None,
        "within_limit": all(w["within_limit"] for w in judged) if judged else None,
        "worst": {k: worst.get(k) for k in ("config", "page_size")} if worst else None,
        "per_worker": workers, "per_row": rows,
        "note": ("per worker process and page size: sim_touched_bytes is the host memory backing the "
                 "simulated memory of its largest row (its mapping's Rss), growth the largest growth of the "
                 "worker's peak RSS over one row, from just before that row's machine was built; "
                 f"limit = 1.1 x touched, judged where touched >= {MEMORY_JUDGED_BYTES >> 20} MiB; the "
                 "top-level figures are the worst judged worker"),
    }


def _timeline(cells) -> dict | None:
    """The Chrome trace of the first row the bench ran: the last timed run of each
    configuration, one process track per configuration, each starting at 0."""
    traced = [c.trace for c in cells if getattr(c, "trace", None)]
    return trace.merge(traced) if traced else None


def _assemble(plan, cells, info, ceil, memory, overhead, opts, isolation, t_start) -> dict:
    ceiling_gbps = float(ceil["gbps"]) if ceil.get("gbps") else None
    results = [c.to_json(ceiling_gbps) for c in cells]
    order = {ps.token: i for i, ps in enumerate(plan.page_sizes)}
    corder = {s: i for i, s in enumerate(plan.configs)}
    results.sort(key=lambda r: (order[r["page_size"]], r["count"], corder.get(r["config"], 1 << 30)))
    out = {
        "schema": SCHEMA, "machine": info, "ceiling_gbps": ceiling_gbps, "ceiling": ceil, "memory": memory,
        "settings": {"page_sizes": [ps.token for ps in plan.page_sizes], "counts": plan.counts,
                     "configs": plan.configs, "repeat": plan.repeat, "warmup": plan.warmup,
                     "quick": plan.quick, "full_check_bytes": opts["full_check_bytes"],
                     "final_check_bytes": opts["final_check_bytes"], "seed": opts["seed"],
                     "batch": opts["batch"], "isolation": isolation, "interleaved": True},
        "results": results,
        "targets": evaluate_targets(results, ceiling_gbps, memory),
        "seed_comparison": seed_tables.compare(results, int(info.get("cores") or 1)),
        "overhead": overhead,
        "timeline": _timeline(cells),
        "elapsed_s": time.perf_counter() - t_start,
    }
    out["machine"]["loadavg_end"] = sysinfo.loadavg()
    out["machine"]["memory"] = memory   # the spec names "machine"/"memory"; both point at it
    return out


# --------------------------------------------------------------------------- the run
def run_bench(page_sizes=None, counts=None, configs=None, repeat=None, quick=False, *,
              warmup=1, progress=None, plugin_manager=None, plugins=(), ceiling=None,
              full_check_bytes=16 * MiB, final_check_bytes=512 * MiB, seed=12345,
              log=None, batch=None, isolate=None, model_overhead=True) -> dict:
    """Run the bench and return the results as a dict in the JSON schema (see README).

    :param page_sizes: tokens like ``"4KiB"``, ``"2MiB@64KiB"`` (list or comma string);
        default: 4KiB, 64KiB, 2MiB, 2MiB@64KiB.
    :param counts: page counts (rows) for every page size; default: per page size, the
        seed's rows plus the target rows (``--quick``: a few small rows).
    :param configs: engine specs (columns); default: vanilla, serial, mt:1..mt:CPUS,
        opencl, auto, and every other engine a plugin registers.
    :param repeat: timed runs per cell (default 5; quick 2), after ``warmup`` untimed ones.
    :param batch: ``nr_max_batched_migration`` of every machine (base pages; default the
        kernel's HPAGE_PMD_NR): the batch size whose windows and throughput are traded.
    :param progress: True/False, or None for "when stderr is a terminal".
    :param plugin_manager: a pluggy manager object: the runs then happen in this process
        (it cannot cross a process boundary); ``plugins``: plugin module names, registered
        in every worker too.
    :param isolate: True: each configuration in its own worker process; False: all in this
        process; None (default): workers unless ``plugin_manager`` is given.
    :param model_overhead: measure the model's own overhead for the header (default).
    :param ceiling: None to measure it (in a child process, before the runs and, except
        with ``quick``, again between page sizes and after them: the best sample counts),
        a float GB/s to use as is, or a dict as :func:`sysinfo.measure_ceiling` returns.
    :raises BenchError: bad options (a ValueError).
    """
    from ..plugins import get_plugin_manager, make_plugin_manager
    plugins = [p for p in plugins if isinstance(p, str)] if plugins else []
    pm = plugin_manager if plugin_manager is not None else (
        make_plugin_manager(plugins=list(plugins)) if plugins else get_plugin_manager())
    plan = make_plan(page_sizes, counts, configs, repeat, quick, warmup, pm)
    t_start = time.perf_counter()
    say = log or (lambda msg: None)
    opts = {"full_check_bytes": full_check_bytes, "final_check_bytes": final_check_bytes, "seed": seed,
            "batch": batch}
    info = sysinfo.machine_info(pm)
    sample_ceiling, samples, ceil = _ceiling_sampler(ceiling, plan.quick, say)
    sample_ceiling("start")
    overhead = None
    if model_overhead:   # the header's figures (--tradeoff's repeated runs skip them)
        say("measuring the model's own overhead ...")
        overhead = measure_overhead(folios=8192 if plan.quick else 65536, calls=50 if plan.quick else 300,
                                    repeat=2 if plan.quick else 5, plugin_manager=pm)
    gc.collect()
    workers = _start_workers(plan.configs, plugin_manager, plugins, isolate)
    isolation = "process per configuration (spawn)" if any(w.isolated for w in workers.values()) \
        else "in-process"
    try:
        # availability per page size, probed in each configuration's own worker (which
        # also loads or compiles its code there before anything is timed)
        avail = {ps.token: {s: workers[s].call("probe", [s], ps.token)[s] for s in plan.configs}
                 for ps in plan.page_sizes}
        units = sum(c * ps.folio_size * (plan.warmup + plan.repeat + 1)
                    * sum(1 for s in plan.configs if avail[ps.token][s] is None)
                    for ps in plan.page_sizes for c in plan.counts[ps.token])
        bar = Progress(units, sys.stderr.isatty() if progress is None else bool(progress))
        try:
            cells = _measure(plan, workers, avail, opts, bar, sample_ceiling)
        finally:
            bar.close()
    finally:
        _stop_workers(workers)
    if ceiling is None:
        if not plan.quick:
            sample_ceiling("end")
        ceil = _best_ceiling(samples)
    return _assemble(plan, cells, info, ceil, _memory(cells), overhead, opts, isolation, t_start)
