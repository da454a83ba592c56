"""Benchmark of the ``opencl`` engine: per-batch overhead and copy throughput.

    .venv/bin/python bench/bench_opencl.py              # everything (~1-2 min on 2 cores)
    .venv/bin/python bench/bench_opencl.py --quick      # fewer repetitions
    .venv/bin/python bench/bench_opencl.py --json out.json

Measured over a real Machine (sources on node 0, destinations on node 1, memory touched
beforehand so no first-touch fault is timed). Candidates are timed round-robin inside each
repetition (so a load spike from elsewhere hits them alike) and the median is reported:

* latency: submit() + wait() of tiny jobs (1 and 8 base pages) for opencl:1 and opencl:2,
  against the ``serial`` engine (folio_mc_copy) on the same job;
* break-even: jobs of 4 KiB and of 2 MiB folios from 64 KiB to 64 MiB, opencl:2 against
  serial - the size from which the offload pays is what ``min_bytes`` encodes (a default
  batch is at most 512 base pages: 2 MiB);
* throughput: 512 x 2 MiB and 512 x 4 KiB folios (contiguous, and scattered) for
  opencl:1/2/4 (non-temporal stores, the default on PoCL), opencl:2 with regular stores,
  serial, and one contiguous numpy copy of the same number of bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

import copyengine as ce
from copyengine.engines.base import CopyJob, folio_mc_copy
from copyengine.engines.opencl import OpenCLEngine, open_device

MiB = 1 << 20


def make_job(m, order, count, scatter=False, seed=0):
    """``count`` folios of ``order`` from node 0 to node 1, one descriptor per folio."""
    ps = m.page_size
    src = m.alloc_folios(0, order, count)
    dst = m.alloc_folios(1, order, count)
    if scatter:  # break physical contiguity (what a long-running machine looks like)
        rng = np.random.default_rng(seed)
        src, dst = rng.permutation(src), rng.permutation(dst)
    fb = ps << order
    so, do = src * ps, dst * ps
    rng = np.random.default_rng(seed)
    for s in so:
        m.mem[s:s + fb] = rng.integers(0, 256, fb, dtype=np.uint8)
    for d in do:
        m.mem[d:d + fb] = 0
    job = CopyJob(m.mem, so.astype(np.int64), do.astype(np.int64), np.full(count, fb, np.int64),
                  np.arange(count, dtype=np.int64), np.zeros(count, bool))
    return job, (src, dst)


def free_job(m, handle):
    for heads in handle:
        m.free_folios(heads)


def engine_fn(e):
    def fn(job):
        r = e.submit(job).wait(60)
        assert r is not None and not r.any(), r
    return fn


def serial(job):
    folio_mc_copy(job, np.arange(job.nr_folios))


def verify(m, job):
    for s, d, n in zip(job.src_off, job.dst_off, job.nbytes):
        assert np.array_equal(m.mem[d:d + n], m.mem[s:s + n])


def race(fns, job, reps, warmup=2):
    """Median seconds of each candidate, timed round-robin."""
    times = {k: [] for k in fns}
    for r in range(warmup + reps):
        for k, f in fns.items():
            t = time.perf_counter()
            f(job)
            if r >= warmup:
                times[k].append(time.perf_counter() - t)
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--reps", type=int, default=None)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--json", default=None, help="write the results here")
    a = ap.parse_args(argv)
    reps_small = a.reps or (50 if a.quick else 300)
    reps_big = a.reps or (3 if a.quick else 7)

    dev = open_device()
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    info = dict(dev.describe(), cpus=os.cpu_count(), python=sys.version.split()[0], loadavg=load)
    print("device:", ", ".join(f"{k}={v}" for k, v in info.items()))
    out = {"device": info, "latency_us": {}, "breakeven": [], "throughput_GBps": {}}

    with ce.Machine(nodes=2, node_size="1088MiB") as m:
        eng = {f"opencl:{c}": OpenCLEngine(m, c) for c in (1, 2, 4)}
        eng["opencl:2 regular"] = OpenCLEngine(m, 2, nontemporal=False)
        e1 = eng["opencl:1"]
        print(f"memory {m.mem.nbytes >> 20} MiB shared as {len(e1._mem.bufs)} buffer(s) of at "
              f"most {e1.region >> 20} MiB; kernel {e1.describe()['kernel']}; "
              f"min_bytes {e1.capabilities.min_bytes}")

        print("\n# per-batch latency: submit + wait of tiny jobs (median, us)")
        print(f"{'job':>12} {'serial':>9} {'opencl:1':>9} {'opencl:2':>9}")
        for count in (1, 8):
            job, h = make_job(m, 0, count, scatter=True)
            t = race({"serial": serial, "opencl:1": engine_fn(eng["opencl:1"]),
                      "opencl:2": engine_fn(eng["opencl:2"])}, job, reps_small, warmup=20)
            verify(m, job)
            free_job(m, h)
            name = f"{count}x4KiB"
            row = {k: v * 1e6 for k, v in t.items()}
            out["latency_us"][name] = row
            print(f"{name:>12} {row['serial']:9.1f} {row['opencl:1']:9.1f} {row['opencl:2']:9.1f}")

        print("\n# break-even: opencl:2 vs serial by job size (median, us; ratio > 1: opencl faster)")
        print(f"{'job':>14} {'bytes':>10} {'serial':>9} {'opencl:2':>9} {'ratio':>6}")
        sizes = ((0, (16, 64, 128, 256, 512, 2048)), (9, (1, 2, 4, 8, 16, 32)))
        for order, counts in sizes:
            for count in counts:
                job, h = make_job(m, order, count, scatter=True)
                nbytes = job.total_bytes
                reps = max(5, min(reps_small // 5, int(2e9 / nbytes) // 20))
                t = race({"serial": serial, "opencl:2": engine_fn(eng["opencl:2"])}, job, reps)
                verify(m, job)
                free_job(m, h)
                name = f"{count}x{(m.page_size << order) >> 10}KiB"
                ts, to = t["serial"] * 1e6, t["opencl:2"] * 1e6
                out["breakeven"].append({"job": name, "bytes": nbytes, "serial_us": ts, "opencl2_us": to})
                print(f"{name:>14} {nbytes:10d} {ts:9.1f} {to:9.1f} {ts / to:6.2f}")

        print("\n# throughput (median GB/s)")
        cols = ["numpy-1-copy", "serial", "opencl:1", "opencl:2", "opencl:4", "opencl:2 regular"]
        print(f"{'job':>13} " + " ".join(f"{c:>16}" for c in cols))
        for order, count, scatter in ((9, 512, False), (0, 512, False), (0, 512, True)):
            job, h = make_job(m, order, count, scatter=scatter)
            nbytes = job.total_bytes
            s0, d0 = int(job.src_off.min()), int(job.dst_off.min())
            m64 = m.mem.view(np.uint64)

            def npcopy(_job):   # the same byte count, one contiguous copy (scratch area)
                m64[d0 >> 3:(d0 + nbytes) >> 3] = m64[s0 >> 3:(s0 + nbytes) >> 3]
            fns = {"numpy-1-copy": npcopy, "serial": serial}
            fns.update({k: engine_fn(e) for k, e in eng.items()})
            t = race(fns, job, reps_big, warmup=1)
            verify(m, job)
            free_job(m, h)
            name = f"{count}x{(m.page_size << order) >> 10}KiB" + ("-scat" if scatter else "")
            row = {k: nbytes / v / 1e9 for k, v in t.items()}
            out["throughput_GBps"][name] = row
            print(f"{name:>13} " + " ".join(f"{row[c]:16.2f}" for c in cols))
        for e in eng.values():
            e.close()
    if a.json:
        with open(a.json, "w") as f:
            json.dump(out, f, indent=1)
    return out


if __name__ == "__main__":
    main()
