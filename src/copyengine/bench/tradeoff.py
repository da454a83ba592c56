"""The batch-size trade-off (issue 16): batching copies before it remaps, so a larger batch
copies faster but keeps every folio of the batch unmapped longer. For one row of the
bench, each engine runs at several batch sizes (``nr_max_batched_migration``); each point
is (p99 unavailability window, GB/s), one line per engine: the curve a user picks a batch
size from.

    copyengine bench --tradeoff tradeoff.png [--tradeoff-row 4KiB:4096] [--configs ...]

A plain run shows the same trade-off from the rows it measured anyway (:func:`plot_points`:
a row of at most one batch is a batch of that many folios) as a text chart
(:func:`text_plot`), and as a PNG beside its --json/--markdown where matplotlib is present.
"""
from __future__ import annotations

import math
import os
import textwrap

from .runner import BenchError, run_bench
from .scenarios import parse_page_size

#: batch sizes tried, in base pages, as multiples of the kernel's default (HPAGE_PMD_NR)
FACTORS = (1 / 32, 1 / 8, 1 / 2, 1, 4)


def default_batch(base_page: int) -> int:
    """NR_MAX_BATCHED_MIGRATION's default, HPAGE_PMD_NR, in base pages."""
    return 512 if base_page == 4096 else 8192


def batch_sizes(base_page: int, count_pages: int) -> list[int]:
    pmd = default_batch(base_page)
    sizes = sorted({max(1, int(pmd * f)) for f in FACTORS})
    return [s for s in sizes if s <= max(count_pages, pmd)]


def run_tradeoff(row="4KiB:4096", configs=None, repeat=3, plugin_manager=None, ceiling=None,
                 progress=False) -> dict:
    """Run the row at every batch size; returns {"row", "points": [{config, batch, gbps,
    window_p99_us, window_p50_us, cpu_s_per_gib}], "ceiling_gbps"}."""
    try:
        token, count = row.split(":")
        count = int(count)
    except ValueError:
        raise BenchError(f"--tradeoff-row takes PAGE_SIZE:COUNT such as 4KiB:4096, not {row!r}") from None
    try:
        ps = parse_page_size(token)
    except ValueError as e:
        raise BenchError(str(e)) from None
    points, ceil = [], ceiling
    for batch in batch_sizes(ps.base_page, count * ps.pages_per_folio):
        res = run_bench(page_sizes=token, counts=[count], configs=configs, repeat=repeat, ceiling=ceil,
                        plugin_manager=plugin_manager, progress=progress, batch=batch,
                        model_overhead=False)
        ceil = res["ceiling_gbps"] if ceil is None else ceil
        for r in res["results"]:
            if r["verified"]:
                points.append({"config": r["config"], "batch": batch, "gbps": r["gbps"],
                               "window_p99_us": r["window_p99_us"], "window_p50_us": r["window_p50_us"],
                               "cpu_s_per_gib": r.get("cpu_s_per_gib")})
    return {"row": f"{token} x{count}", "points": points, "ceiling_gbps": ceil}


def write_tradeoff_plot(t, path) -> None:
    """GB/s against p99 window (log), one line per engine, each point labelled with its
    batch size in base pages (or, for :func:`plot_points` of rows, its folios per call)."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    key = "batch" if all("batch" in p for p in t["points"]) else "count"
    for cfg in dict.fromkeys(p["config"] for p in t["points"]):
        pts = sorted((p for p in t["points"] if p["config"] == cfg), key=lambda p: p[key])
        xs, ys = [p["window_p99_us"] for p in pts], [p["gbps"] for p in pts]
        ax.plot(xs, ys, marker="o", ms=4, label=cfg)
        for p in pts:
            ax.annotate(str(p[key]), (p["window_p99_us"], p["gbps"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("p99 unavailability window of a folio (us, unmap to remap)")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    title = f"copyengine bench: batch size trade-off, {t.get('title') or t['row']}"
    ax.set_title(textwrap.fill(title, 90) + f"\n(labels: {'batch in base pages' if key == 'batch' else 'folios per call'})",
                 fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def format_tradeoff(t) -> str:
    lines = [f"Batch-size trade-off, {t['row']}: GB/s / p99 window us per batch size (base pages)", "",
             "| config | " + " | ".join(str(b) for b in sorted({p['batch'] for p in t['points']})) + " |"]
    batches = sorted({p["batch"] for p in t["points"]})
    lines.append("|---|" + "---:|" * len(batches))
    for cfg in dict.fromkeys(p["config"] for p in t["points"]):
        by = {p["batch"]: p for p in t["points"] if p["config"] == cfg}
        lines.append(f"| {cfg} | " + " | ".join(
            f"{by[b]['gbps']:.2f} / {by[b]['window_p99_us']:.0f}" if b in by else "" for b in batches) + " |")
    return "\n".join(lines)


def plot_points(res) -> dict | None:
    """The points of the trade-off plot for a bench result: the --tradeoff row's batch
    sizes when it ran; else the rows of the page size with the most rows that are one
    batch each (a call of up to ``nr_max_batched_migration`` base pages is one batch of
    that many folios, so its rows trace the same curve at no extra cost). None when no
    verified cell has a window."""
    t = res.get("tradeoff")
    if t and t.get("points"):
        return {"source": "batch sizes", "title": f"{t['row']}, one point per batch size",
                "points": [{k: p[k] for k in ("config", "batch", "gbps", "window_p99_us")} for p in t["points"]]}
    batch = (res.get("settings") or {}).get("batch")
    by = {}
    for r in res.get("results", []):
        if r.get("verified") and r.get("gbps") and r.get("window_p99_us"):
            by.setdefault(r["page_size"], []).append(r)
    if not by:
        return None

    def one_batch(r):
        return r["count"] * (r["folio_size"] // r["base_page"]) <= (batch or default_batch(r["base_page"]))
    token = max(by, key=lambda k: (len({r["count"] for r in by[k] if one_batch(r)}), len(by[k])))
    rows = by[token]
    single = sorted({r["count"] for r in rows if one_batch(r)})
    note = f"; up to x{single[-1]} a call is one batch" if single else ""
    return {"source": "rows", "title": f"{token}, one point per row (folios per call{note})",
            "points": [{"config": r["config"], "count": r["count"], "gbps": r["gbps"],
                        "window_p99_us": r["window_p99_us"]} for r in rows]}


MARKERS = "o*x#@%&=$~ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def text_plot(series, width=64, height=14, xlabel="p99 unavailability window, us (log)", ylabel="GB/s",
              logx=True) -> str:
    """A text chart of ``series`` ({name: [(x, y), ...]}): one marker per series (the legend
    under the chart says which; "+" where several share a cell), y from 0 to the largest,
    x on a log scale (``logx``, points with x <= 0 left out). "(no points to plot)" when
    there is nothing."""
    if width < 8 or height < 3:
        raise ValueError(f"a text plot needs width >= 8 and height >= 3, not {width}x{height}")
    pts = [(name, float(x), float(y)) for name, xy in series.items() for x, y in xy
           if x is not None and y is not None and math.isfinite(x) and math.isfinite(y) and y >= 0
           and (x > 0 or not logx)]
    if not pts:
        return "(no points to plot)"
    fx = (lambda x: math.log10(x)) if logx else (lambda x: x)
    x0, x1 = min(fx(p[1]) for p in pts), max(fx(p[1]) for p in pts)
    if x1 - x0 < 1e-9:
        x0, x1 = x0 - 0.5, x1 + 0.5
    ymax = max(p[2] for p in pts) or 1.0
    col = (lambda x: round((fx(x) - x0) / (x1 - x0) * (width - 1)))
    grid = [[" "] * width for _ in range(height)]
    marker = {name: MARKERS[i % len(MARKERS)] for i, name in enumerate(series)}
    for name, x, y in pts:
        r, c = height - 1 - round(y / ymax * (height - 1)), col(x)
        grid[r][c] = marker[name] if grid[r][c] in (" ", marker[name]) else "+"
    ylab = {0: f"{ymax:.3g}", (height - 1) // 2: f"{ymax * (height - 1 - (height - 1) // 2) / (height - 1):.3g}",
            height - 1: "0"}
    lw = max(len(v) for v in ylab.values())
    lines = [f"{ylabel}"] + [f"{ylab.get(i, ''):>{lw}} |" + "".join(row).rstrip() for i, row in enumerate(grid)]
    lines.append(" " * lw + " +" + "-" * width)
    ticks = [10 ** k for k in range(math.ceil(x0 - 1e-9), math.floor(x1 + 1e-9) + 1)] if logx else []
    if len(ticks) < 2:
        ticks = [10 ** x0, 10 ** x1] if logx else [x0, x1]
    axis = [" "] * (width + 8)
    for t in ticks:
        text, c = (f"{t:.0f}" if t >= 10 else f"{t:.3g}"), col(t)
        c = max(0, min(c - len(text) // 2, width + 8 - len(text)))
        if all(ch == " " for ch in axis[max(0, c - 1):c + len(text) + 1]):
            axis[c:c + len(text)] = text
    lines.append(" " * (lw + 2) + "".join(axis).rstrip())
    lines.append(" " * (lw + 2) + xlabel)
    lines.append("   ".join(f"{marker[n]} {n}" for n in series))
    return "\n".join(lines)


def format_tradeoff_plot(tp) -> str:
    """The text chart of :func:`plot_points`' result, with its title."""
    if not tp or not tp.get("points"):
        return "Trade-off: no verified cell with an unavailability window to plot"
    series = {}
    for p in tp["points"]:
        series.setdefault(p["config"], []).append((p["window_p99_us"], p["gbps"]))
    return f"Trade-off: GB/s against the p99 unavailability window, {tp['title']}\n\n" + text_plot(series)
