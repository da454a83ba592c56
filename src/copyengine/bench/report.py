"""Reports of a bench result (the dict :func:`copyengine.bench.run_bench` returns):
text/markdown tables shaped like the seed's and the trade-off chart, JSON, CSV and a plot."""
from __future__ import annotations

import csv
import json
import math
import os

from . import seed
from .overhead import format_overhead
from .runner import PHASES
from .tradeoff import format_tradeoff_plot, plot_points

CSV_FIELDS = ("page_size", "base_page", "folio_size", "count", "config", "bytes", "gbps", "gbps_min",
              "gbps_max", "fraction", "repeats", "verified", "seconds", "cpu_s_per_gib", "window_p50_us",
              "window_p99_us", "window_max_us", "first_usable_us") + PHASES + ("other", "error")


def _size(n) -> str:
    if n is None:
        return "?"
    for unit, s in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= s:
            v = n / s
            return f"{v:.0f} {unit}" if v == int(v) else f"{v:.1f} {unit}"
    return f"{n} B"


def _g(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


# --------------------------------------------------------------------------- text
def format_header(res) -> str:
    mi = res.get("machine", {})
    ceil = res.get("ceiling", {}) or {}
    layer = mi.get("numba_threading_layer") or "no threading layer"
    lines = [
        f"host {mi.get('hostname', '?')}: {mi.get('cpu', '?')}, {mi.get('cores', '?')} cores usable, "
        f"{_size(mi.get('memory_bytes'))} memory, kernel {mi.get('kernel', '?')}",
        f"Python {mi.get('python', '?')}, numpy {mi.get('numpy', '?')}, numba {mi.get('numba', '?')} "
        f"(threading layer {layer}), OpenCL: {mi.get('opencl') or 'none' + (' (' + mi['opencl_error'] + ')' if mi.get('opencl_error') else '')}",
    ]
    la, lb = mi.get("loadavg_start"), mi.get("loadavg_end")
    if la:
        busy = la[0] > 0.5 * (mi.get("cores") or 1)
        lines.append(f"load average (1 min) {la[0]:.2f} at the start" + (f", {lb[0]:.2f} at the end" if lb else "")
                     + ("  << the host was busy: other work skews these numbers" if busy else ""))
    gl = mi.get("glibc") or {}
    if gl.get("x86_non_temporal_threshold"):
        lines.append(f"glibc {gl.get('version', '?')}: memcpy non-temporal threshold "
                     f"{_size(gl['x86_non_temporal_threshold'])}"
                     + (f", GLIBC_TUNABLES={gl['GLIBC_TUNABLES']}" if gl.get("GLIBC_TUNABLES") else ""))
    if res.get("ceiling_gbps") and not ceil.get("buffer_bytes"):
        lines.append(f"ceiling: {res['ceiling_gbps']:.2f} GB/s ({ceil.get('method', 'given')})")
    elif res.get("ceiling_gbps"):
        line = (f"ceiling: {res['ceiling_gbps']:.2f} GB/s = plain memcpy of a {_size(ceil.get('buffer_bytes'))} "
                f"buffer (numpy slice copies, best of 1..{mi.get('cores', '?')} threads: {ceil.get('threads', '?')})")
        ch = ceil.get("chunked")
        if ch:
            line += f"; the same copy in {_size(ch.get('chunk_bytes'))} pieces: {ch['gbps']:.2f} GB/s"
        sm = ceil.get("samples")
        if sm:
            line += "\n  samples: " + ", ".join(f"{x['when']} {x['gbps']:.2f}" for x in sm if x.get("gbps")) + \
                    " (the best counts)"
        lines.append(line)
    else:
        lines.append("ceiling: not measured")
    st = res.get("settings", {})
    if st.get("busy"):
        lines.append(f"--busy {st['busy']}: {st['busy']} CPU-bound process(es) ran beside the bench throughout")
    if st.get("batch"):
        lines.append(f"--batch {st['batch']}: nr_max_batched_migration = {st['batch']} base pages")
    if res.get("overhead"):
        lines.append(format_overhead(res["overhead"]))
    over = [r for r in res.get("results", []) if (r.get("fraction") or 0) > 1.0]
    if over:
        lines.append(f"  << {len(over)} cell(s) above the ceiling: the ceiling was measured while the host "
                     f"was busier than during those runs; fractions are not reliable")
    return "\n".join(lines)


def _tables(res):
    """page size -> (info, counts, configs, {(count, config): result})."""
    out = {}
    for r in res.get("results", []):
        t = out.setdefault(r["page_size"], {"ps": r, "counts": [], "configs": [], "cells": {}})
        if r["count"] not in t["counts"]:
            t["counts"].append(r["count"])
        if r["config"] not in t["configs"]:
            t["configs"].append(r["config"])
        t["cells"][(r["count"], r["config"])] = r
    for t in out.values():
        t["counts"].sort()
        order = res.get("settings", {}).get("configs") or []
        t["configs"].sort(key=lambda c: order.index(c) if c in order else len(order))
    return out


def _describe(r) -> str:
    if r["folio_size"] == r["base_page"]:
        return f"{_size(r['base_page'])} base pages"
    return f"{_size(r['folio_size'])} folios on {_size(r['base_page'])} base pages"


def best_config(t) -> str | None:
    """The configuration of a table with the best median at its largest row that has
    any verified result (ties: the first)."""
    for c in sorted(t["counts"], reverse=True):
        best = None
        for cfg in t["configs"]:
            r = t["cells"].get((c, cfg))
            if r and r["gbps"] is not None and (best is None or r["gbps"] > best[1]):
                best = (cfg, r["gbps"])
        if best:
            return best[0]
    return None


def _column(res, spec) -> str:
    """A configuration's column title: a third-party engine names its package and version
    (``copyengine engines`` lists the same sources; the JSON has them in machine.engines)."""
    src = (res.get("machine", {}).get("engines") or {}).get(spec.split(":")[0])
    return spec if src in (None, "built-in", "registered") else f"{spec} ({src})"


def _phase_table(t, cfg) -> list:
    """Where the time of ``cfg``'s calls goes, per row (shares of the wall time)."""
    rows = []
    for c in t["counts"]:
        r = t["cells"].get((c, cfg))
        if not r or r["gbps"] is None or not r.get("shares"):
            continue
        sh = r["shares"]
        rows.append(f"| {c} | {_g(r['gbps'])} | {r['seconds_mean'] * 1e3:.2f} | "
                    + " | ".join(f"{sh[k] * 100:.0f}%" for k in PHASES) + f" | {sh['other'] * 100:.0f}% |")
    if not rows:
        return []
    return ["", f"Where the time goes for {cfg} (share of the call's wall time):", "",
            "| pages | GB/s | ms | " + " | ".join(PHASES) + " | other |",
            "|---:|---:|---:|" + "---:|" * (len(PHASES) + 1), *rows]


def format_tables(res, spread=True, every_phase=False) -> str:
    """Per page size: GB/s table (rows: pages, columns: configurations), each row's best
    over the ceiling, then where the time goes for the table's best configuration (for
    every configuration with ``every_phase``: the markdown report), then what it costs."""
    blocks = []
    ceiling = res.get("ceiling_gbps")
    reps = res.get("settings", {}).get("repeat")
    for token, t in _tables(res).items():
        notes, note_of = [], {}

        def note(msg):
            if msg not in note_of:
                notes.append(msg)
                note_of[msg] = len(notes)
            return f"[{note_of[msg]}]"

        cfgs = t["configs"]
        labels = [_column(res, c) for c in cfgs]
        head = f"### {token}: {_describe(t['ps'])}; move_pages() GB/s, median" + \
               (f" (min-max) of {reps} runs" if spread and reps else "")
        rows = ["| pages | " + " | ".join(labels) + " | best | of ceiling |",
                "|---:|" + "---:|" * len(cfgs) + "---|---:|"]
        for c in t["counts"]:
            cells, best = [], None
            for cfg in cfgs:
                r = t["cells"].get((c, cfg))
                if r is None:
                    cells.append("")
                elif r.get("unavailable"):
                    cells.append("n/a " + note(f"{cfg}: unavailable: {r.get('error')}"))
                elif r["gbps"] is None:
                    cells.append("FAIL " + note(f"{cfg} x{c}: {r.get('error') or 'not verified'}"))
                else:
                    s = _g(r["gbps"])
                    if spread and r["repeats"] > 1:
                        s += f" ({_g(r['gbps_min'])}-{_g(r['gbps_max'])})"
                    cells.append(s)
                    if best is None or r["gbps"] > best["gbps"]:
                        best = r
            frac = f"{best['gbps'] / ceiling:.2f}" if (best and ceiling) else "-"
            rows.append(f"| {c} | " + " | ".join(cells) + f" | {best['config'] if best else '-'} | {frac} |")
        block = [head, "", *rows]
        if notes:
            block += [""] + [f"[{i + 1}] {n}" for i, n in enumerate(notes)]
        bc = best_config(t)
        for cfg in (cfgs if every_phase else [bc] if bc else []):
            block += _phase_table(t, cfg)
        block += _cost_table(t)
        blocks.append("\n".join(block))
    return "\n\n".join(blocks)


def _cost_table(t) -> list:
    """What batching costs beside what it gains, per configuration: the p99 unavailability
    window of a folio (unmap to remap), the time until a call's first folio is usable
    again, and the CPU seconds the process spent per GiB moved (engine threads included)."""
    cfgs = [c for c in t["configs"] if any(t["cells"].get((n, c), {}).get("window_p99_us") is not None
                                           for n in t["counts"])]
    if not cfgs:
        return []
    rows = ["", "What it costs: p99 window us / first folio usable us / CPU s per GiB (all threads):", "",
            "| pages | " + " | ".join(cfgs) + " |", "|---:|" + "---:|" * len(cfgs)]
    for n in t["counts"]:
        cells = []
        for c in cfgs:
            r = t["cells"].get((n, c))
            if not r or r.get("window_p99_us") is None:
                cells.append("")
                continue
            fu = r.get("first_usable_us")
            cells.append(f"{r['window_p99_us']:.0f} / {fu:.0f} / {r.get('cpu_s_per_gib', 0):.3f}"
                         if fu is not None else f"{r['window_p99_us']:.0f} / - / {r.get('cpu_s_per_gib', 0):.3f}")
        rows.append(f"| {n} | " + " | ".join(cells) + " |")
    return rows


def format_targets(res) -> str:
    """The targets of the page sizes this run measured (and the memory check)."""
    lines = []
    run = set(res.get("settings", {}).get("page_sizes") or ())
    for t in res.get("targets", []):
        if not t.get("memory") and run and t.get("page_size") not in run:
            continue
        if t.get("memory"):
            g, lim = t.get("growth_bytes"), t.get("limit_bytes")
            mem = res.get("memory", {})
            state = "met" if t.get("met") else ("MISSED" if t.get("met") is False else "not measured")
            lines.append(f"- memory: peak RSS grew {_size(g)} for {_size(mem.get('sim_touched_bytes'))} of simulated "
                         f"memory touched (limit {_size(lim)}): {state}")
            continue
        want = t["target"]
        goal = f">= {want:.2f} of the ceiling" if want is not None else "reported"
        if not t.get("measured"):
            lines.append(f"- {t['page_size']} x >= {t['min_count']} ({goal}): not measured ({t.get('note')})")
            continue
        rows = ", ".join(f"x{r['count']}: {r['config']} {r['gbps']:.2f} GB/s = {r['fraction']:.2f}"
                         if r["fraction"] is not None else f"x{r['count']}: {r['config']} {r['gbps']:.2f} GB/s"
                         for r in t["rows"])
        state = "met" if t["met"] else ("MISSED" if t["met"] is False else "reported")
        lines.append(f"- {t['page_size']} x >= {t['min_count']} ({goal}): {state}; {rows}")
    return "\n".join(lines)


def format_auto(res) -> str:
    """Why ``auto`` chose what it chose: per row, its batches by engine and reason (warm-up
    runs included, as auto learns from them too)."""
    lines = []
    for r in res.get("results", []):
        a = r.get("auto_choices")
        if not a or not a.get("reasons"):
            continue
        picks = "; ".join(f"{spec} x{sum(why.values())} (" + ", ".join(f"{k}: {v}" for k, v in why.items()) + ")"
                          for spec, why in sorted(a["reasons"].items(), key=lambda kv: -sum(kv[1].values())))
        skipped = {k: v for k, v in (a.get("not_counted") or {}).items() if v}
        lines.append(f"- {r['page_size']} x{r['count']} {r['config']}: {picks}"
                     + (f"; batches not learned from: {skipped}" if skipped else ""))
    return "\n".join(lines)


def format_report(res, spread=True) -> str:
    parts = [format_header(res), "", format_tables(res, spread=spread)]
    tg = format_targets(res)
    if tg:
        parts += ["", "Targets (best configuration over the ceiling):", tg]
    sc = seed.format_comparison(res.get("seed_comparison") or [])
    if sc:
        parts += ["", sc]
    au = format_auto(res)
    if au:
        parts += ["", "Why auto chose (batches by engine and reason, warm-up included):", au]
    parts += ["", format_tradeoff_plot(trade_points(res))]
    failed = [r for r in res.get("results", []) if not r["verified"] and not r.get("unavailable")]
    if failed:
        parts += ["", f"{len(failed)} cell(s) FAILED and are not counted:"]
        parts += [f"- {r['page_size']} x{r['count']} {r['config']}: {r.get('error')}" for r in failed]
    if res.get("elapsed_s") is not None:
        parts += ["", f"bench time {res['elapsed_s']:.0f} s"]
    return "\n".join(parts)


def trade_points(res):
    """The trade-off plot's points: as the run recorded them (``tradeoff_plot``), else
    computed from its cells (see :func:`.tradeoff.plot_points`)."""
    return res["tradeoff_plot"] if "tradeoff_plot" in res else plot_points(res)


# --------------------------------------------------------------------------- files
def _clean(x):
    """JSON-safe: NaN/inf become null; numpy scalars become Python numbers."""
    if isinstance(x, dict):
        return {str(k): _clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_clean(v) for v in x]
    if hasattr(x, "item") and not isinstance(x, (str, bytes)):
        try:
            x = x.item()
        except Exception:
            pass
    if isinstance(x, float) and not math.isfinite(x):
        return None
    return x


def write_json(res, path) -> None:
    """Everything but the timeline (``--trace`` writes that)."""
    with open(path, "w") as f:
        json.dump(_clean({k: v for k, v in res.items() if k != "timeline"}), f, indent=1, sort_keys=False)
        f.write("\n")


def write_trace(res, path) -> None:
    """The run's timeline (Chrome trace-event JSON), or an empty one if nothing ran."""
    with open(path, "w") as f:
        json.dump(res.get("timeline") or {"traceEvents": [], "displayTimeUnit": "ms"}, f)


def write_csv(res, path) -> None:
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_FIELDS, extrasaction="ignore")
        w.writeheader()
        for r in res.get("results", []):
            row = {k: r.get(k) for k in CSV_FIELDS}
            for k in PHASES:
                row[k] = (r.get("phases") or {}).get(k)
            w.writerow({k: ("" if v is None else v) for k, v in row.items()})


def write_markdown(res, path, title="copyengine bench") -> None:
    with open(path, "w") as f:
        f.write(f"# {title}\n\n```\n{format_header(res)}\n```\n\n{format_tables(res, every_phase=True)}\n\n")
        tg = format_targets(res)
        if tg:
            f.write("## Targets (best configuration over the ceiling)\n\n" + tg + "\n")
        sc = seed.format_comparison(res.get("seed_comparison") or [])
        if sc:
            f.write("\n## The seed side by side\n\n" + sc + "\n")
        au = format_auto(res)
        if au:
            f.write("\n## Why auto chose (batches by engine and reason, warm-up included)\n\n" + au + "\n")
        failed = [r for r in res.get("results", []) if not r["verified"] and not r.get("unavailable")]
        if failed:
            f.write(f"\n## {len(failed)} failed cell(s), not counted\n\n")
            f.write("".join(f"- {r['page_size']} x{r['count']} {r['config']}: {r.get('error')}\n" for r in failed))
        title, _, chart = format_tradeoff_plot(trade_points(res)).partition("\n")
        f.write(f"\n## {title}\n" + (f"\n```\n{chart.strip()}\n```\n" if chart else ""))
        if res.get("elapsed_s") is not None:
            f.write(f"\nbench time {res['elapsed_s']:.0f} s\n")


def plot_available() -> str | None:
    """None if matplotlib can plot here, else why not."""
    try:
        import matplotlib  # noqa: F401
        return None
    except Exception as e:
        return f"--plot needs matplotlib ({type(e).__name__}: {e}); pip install copyengine[plot]"


def write_plot(res, path) -> None:
    """GB/s against pages, one line per configuration (min-max band), one panel per page
    size; the ceiling as a dashed line."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    tables = _tables(res)
    n = max(1, len(tables))
    cols = min(n, 2)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6.4 * cols, 4.2 * rows), squeeze=False)
    ceiling = res.get("ceiling_gbps")
    for ax, (token, t) in zip(axes.ravel(), tables.items()):
        for cfg in t["configs"]:
            pts = [(c, t["cells"][(c, cfg)]) for c in t["counts"]
                   if (c, cfg) in t["cells"] and t["cells"][(c, cfg)]["gbps"] is not None]
            if not pts:
                continue
            xs = [c for c, _ in pts]
            ys = [r["gbps"] for _, r in pts]
            line, = ax.plot(xs, ys, marker="o", ms=3, label=cfg)
            ax.fill_between(xs, [r["gbps_min"] for _, r in pts], [r["gbps_max"] for _, r in pts],
                            color=line.get_color(), alpha=0.15, lw=0)
        if ceiling:
            ax.axhline(ceiling, ls="--", color="gray", lw=1, label=f"ceiling {ceiling:.1f}")
        ax.set_xscale("log", base=2)
        ax.set_title(f"{token}: {_describe(t['ps'])}", fontsize=10)
        ax.set_xlabel("pages (folios) moved by one move_pages() call")
        ax.set_ylabel("GB/s")
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7, ncol=2)
    for ax in axes.ravel()[len(tables):]:
        ax.set_visible(False)
    mi = res.get("machine", {})
    fig.suptitle(f"copyengine bench: {mi.get('cpu', '')}, {mi.get('cores', '?')} cores", fontsize=10)
    fig.tight_layout()
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
