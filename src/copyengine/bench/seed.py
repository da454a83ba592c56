"""The seed's numbers and the bench's results side by side.

The cover letter (shared/seed.md) measured move_pages() throughput in GB/s on two NVIDIA
Grace sockets with 64 KiB base pages: vanilla Linux, then the series with 1..32 copy
threads. Absolute GB/s cannot compare across machines; its *ratios* can: vanilla/mt_1
(what batching alone does) and mt_N/mt_1 (what threads add). :func:`compare` puts the
seed's ratios beside those measured here, for every seed row the bench ran, with N capped
at this machine's usable CPUs, and flags those more than :data:`TOLERANCE` apart.
"""
from __future__ import annotations

#: configurations of the seed's tables, in its column order
SEED_CONFIGS = ("vanilla", "mt_1", "mt_2", "mt_4", "mt_8", "mt_16", "mt_32")

#: "64KB base pages, GB/s" (rows: pages), transcribed from shared/seed.md
SEED_64K = {
    32: (5.43, 4.90, 5.65, 7.31, 7.60, 8.61, 6.43),
    256: (6.95, 6.89, 9.28, 14.67, 22.41, 23.39, 23.93),
    512: (7.88, 7.26, 10.15, 17.53, 27.82, 27.88, 33.93),
    768: (7.65, 7.42, 10.46, 18.59, 28.65, 29.67, 30.76),
    1024: (7.46, 8.01, 10.90, 17.77, 27.04, 32.18, 38.80),
}

#: "2MB mTHP, GB/s" (2 MiB folios on 64 KiB base pages), transcribed from shared/seed.md
SEED_2M = {
    1: (5.94, 2.90, 6.90, 8.56, 11.16, 8.76, 6.41),
    2: (7.67, 5.57, 7.11, 12.48, 17.37, 15.68, 14.10),
    4: (8.01, 6.04, 10.25, 20.14, 22.52, 27.79, 25.28),
    8: (8.42, 7.00, 11.41, 24.73, 33.96, 32.62, 39.55),
    16: (9.41, 6.91, 12.23, 27.51, 43.95, 49.15, 51.38),
    32: (10.23, 7.15, 13.03, 29.52, 49.49, 69.98, 71.51),
    64: (9.40, 7.37, 13.88, 30.38, 52.00, 76.89, 79.41),
    128: (8.59, 7.23, 14.20, 28.39, 49.98, 78.27, 90.18),
    256: (8.43, 7.16, 14.59, 28.14, 48.78, 76.88, 92.28),
    512: (8.31, 7.78, 14.40, 26.20, 43.31, 63.91, 75.21),
    768: (8.30, 7.86, 14.83, 27.41, 46.25, 69.85, 81.31),
    1024: (8.31, 7.90, 14.96, 27.62, 46.75, 71.76, 83.84),
}

#: the bench's page size token for each seed table
SEED_TABLES = {"64KiB": SEED_64K, "2MiB@64KiB": SEED_2M}

#: a measured ratio this far from the seed's (relative) is flagged
TOLERANCE = 0.25


def seed_ratios(table, count, cpus) -> dict:
    """The seed's ratios for one row: {"vanilla/mt_1": r, "mt_2/mt_1": r, ...}, threads
    up to ``cpus``."""
    row = dict(zip(SEED_CONFIGS, table[count]))
    out = {"vanilla/mt_1": row["vanilla"] / row["mt_1"]}
    for n in (2, 4, 8, 16, 32):
        if n <= cpus:
            out[f"mt_{n}/mt_1"] = row[f"mt_{n}"] / row["mt_1"]
    return out


def _config_of(ratio_name) -> str:
    name = ratio_name.split("/")[0]
    return "vanilla" if name == "vanilla" else "mt:" + name.split("_")[1]


def compare(results, cpus) -> list:
    """One entry per (seed row, ratio) that the bench measured: page size, pages, ratio,
    seed, here (None if a configuration is missing), relative difference, flagged."""
    gbps = {(r["page_size"], r["count"], r["config"]): r.get("gbps") for r in results}
    out = []
    for token, table in SEED_TABLES.items():
        for count in table:
            base = gbps.get((token, count, "mt:1"))
            if base is None and not any(k[:2] == (token, count) for k in gbps):
                continue  # the bench did not run this row
            for name, seed in seed_ratios(table, count, cpus).items():
                top = gbps.get((token, count, _config_of(name)))
                here = top / base if (top and base) else None
                diff = (here / seed - 1) if here is not None else None
                out.append({"page_size": token, "count": count, "ratio": name, "seed": round(seed, 3),
                            "here": here, "rel_diff": diff,
                            "flagged": diff is not None and abs(diff) > TOLERANCE})
    return out


def format_comparison(entries) -> str:
    """The side-by-side section as a markdown table (rows: seed rows; columns: ratios)."""
    if not entries:
        return ""
    names = list(dict.fromkeys(e["ratio"] for e in entries))
    rows = {}
    for e in entries:
        rows.setdefault((e["page_size"], e["count"]), {})[e["ratio"]] = e
    lines = ["The seed side by side: ratios to mt_1, seed (2x Grace, 64 KiB pages) / here; "
             f"* = more than {TOLERANCE:.0%} apart", "",
             "| page size | pages | " + " | ".join(names) + " |", "|---|---:|" + "---:|" * len(names)]
    for (token, count), by in rows.items():
        cells = []
        for n in names:
            e = by.get(n)
            if e is None:
                cells.append("")
            elif e["here"] is None:
                cells.append(f"{e['seed']:.2f} / -")
            else:
                cells.append(f"{e['seed']:.2f} / {e['here']:.2f}{' *' if e['flagged'] else ''}")
        lines.append(f"| {token} | {count} | " + " | ".join(cells) + " |")
    flagged = sum(e["flagged"] for e in entries)
    compared = sum(e["here"] is not None for e in entries)
    lines += ["", f"{compared} ratios compared, {flagged} more than {TOLERANCE:.0%} from the seed's."]
    return "\n".join(lines)
