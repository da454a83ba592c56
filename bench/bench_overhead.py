"""Framework overhead of a migration, measured with the copy-nothing engine.

The issue's targets: at most 0.5 us per folio for 4 KiB folios in 512-folio batches, and at
most 15 us per batch for a batch of one 2 MiB folio (4 KiB base pages). The ``nocopy``
engine (copyengine.testing.engines) reports every folio copied without copying, so what is
left is prepare, unmap, move, finalize, the syscall's lookups and the dispatch.

    python bench/bench_overhead.py [--repeat N] [--json PATH]

Prints medians over the repeats (each repeat: one move_pages() call, ping-pong between
nodes) and the per-phase split from the machine's migrate_times.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import time

import numpy as np

import copyengine as ce
from copyengine.plugins import make_plugin_manager
from copyengine.testing import engines as test_engines


def measure(m, p, addrs, repeat):
    """Median seconds of one move_pages() over ``addrs`` and the median phase split."""
    totals, phases = [], []
    n = len(addrs)
    for rep in range(repeat + 1):  # the first run warms host memory and is not counted
        before = dict(m.migrate_times)
        target = 1 - rep % 2
        gc.disable()
        t0 = time.perf_counter()
        r = p.move_pages(0, addrs, np.full(n, target))
        dt = time.perf_counter() - t0
        gc.enable()
        if r.ret or set(r.status) != {target}:
            raise SystemExit(f"migration failed: ret={r.ret} statuses={set(r.status)}")
        if rep:
            totals.append(dt)
            phases.append({k: m.migrate_times[k] - before[k] for k in before})
    med = statistics.median(totals)
    split = {k: statistics.median(ph[k] for ph in phases) for k in phases[0]}
    return med, split


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=9)
    ap.add_argument("--json", metavar="PATH")
    args = ap.parse_args(argv)
    pm = make_plugin_manager(entry_points=False, plugins=[test_engines])
    out = {}
    with ce.Machine(nodes=2, node_size="1GiB", plugin_manager=pm) as m:
        m.set_engine("nocopy")
        p = m.spawn()
        n4k = 65536
        a = p.mmap(n4k * 4096)
        t, split = measure(m, p, a + 4096 * np.arange(n4k), args.repeat)
        per_folio = t / n4k * 1e6
        out["4KiB"] = {"folios": n4k, "batch_folios": m.settings["nr_max_batched_migration"],
                       "us_per_folio": per_folio,
                       "phases_us_per_folio": {k: v / n4k * 1e6 for k, v in split.items()},
                       "target_us_per_folio": 0.5, "met": per_folio <= 0.5}
        n2m = 64
        b = p.mmap(n2m << 21, folio_size="2MiB")
        t, split = measure(m, p, b + (2 << 20) * np.arange(n2m), args.repeat)
        per_batch = t / n2m * 1e6  # one 2 MiB folio is one batch of 512 base pages
        out["2MiB"] = {"folios": n2m, "us_per_batch": per_batch,
                       "phases_us_per_batch": {k: v / n2m * 1e6 for k, v in split.items()},
                       "target_us_per_batch": 15.0, "met": per_batch <= 15.0}
    for name, row in out.items():
        unit = "us/folio" if name == "4KiB" else "us/batch"
        value = row["us_per_folio"] if name == "4KiB" else row["us_per_batch"]
        target = row.get("target_us_per_folio", row.get("target_us_per_batch"))
        ph = row.get("phases_us_per_folio", row.get("phases_us_per_batch"))
        print(f"{name:5s} {value:8.3f} {unit} (target <= {target}: {'met' if row['met'] else 'MISSED'})  "
              + "  ".join(f"{k} {v:.3f}" for k, v in ph.items()))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=2)


if __name__ == "__main__":
    main()
