"""The batch-size trade-off (issue 16): batching copies before it remaps, so a larger batch
copies faster but keeps every folio of the batch unmapped longer. For one row of the
bench, each engine runs at several batch sizes (``nr_max_batched_migration``); each point
is (p99 unavailability window, GB/s), one line per engine: the curve a user picks a batch
size from.

    copyengine bench --tradeoff tradeoff.png [--tradeoff-row 4KiB:4096] [--configs ...]
"""
from __future__ import annotations

import os

from .runner import BenchError, run_bench
from .scenarios import parse_page_size

#: batch sizes tried, in base pages, as multiples of the kernel's default (HPAGE_PMD_NR)
FACTORS = (1 / 32, 1 / 8, 1 / 2, 1, 4)


def batch_sizes(base_page: int, count_pages: int) -> list[int]:
    pmd = 512 if base_page == 4096 else 8192
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
    batch size in base pages."""
    import matplotlib
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.2, 4.6))
    for cfg in dict.fromkeys(p["config"] for p in t["points"]):
        pts = sorted((p for p in t["points"] if p["config"] == cfg), key=lambda p: p["batch"])
        xs, ys = [p["window_p99_us"] for p in pts], [p["gbps"] for p in pts]
        ax.plot(xs, ys, marker="o", ms=4, label=cfg)
        for p in pts:
            ax.annotate(str(p["batch"]), (p["window_p99_us"], p["gbps"]), fontsize=6,
                        xytext=(3, 3), textcoords="offset points")
    ax.set_xscale("log")
    ax.set_xlabel("p99 unavailability window of a folio (us, unmap to remap)")
    ax.set_ylabel("GB/s")
    ax.set_ylim(bottom=0)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"copyengine bench: batch size trade-off, {t['row']} (labels: batch in base pages)",
                 fontsize=9)
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
