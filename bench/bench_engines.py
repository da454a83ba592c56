"""Benchmark of the CPU copy engines outside the migration pipeline.

    .venv/bin/python bench/bench_engines.py            # full run (needs ~2.2 GiB of memory)
    .venv/bin/python bench/bench_engines.py --quick    # 64 MiB, fewer repeats
    .venv/bin/python bench/bench_engines.py --json results.json

What it measures, all in one process run so that the numbers compare:

1. **Throughput**: one batch of ``--folios`` folios of ``--folio-size`` (default 512 x 2 MiB
   = 1 GiB), sources packed, destinations in a shuffled order (like the frames a migration
   gets), copied by ``serial``, ``mt:1`` .. ``mt:<max>``; the baseline is a plain numpy
   slice copy of the same bytes as one contiguous block (``dst[:] = src``: libc memcpy on
   one thread). Rounds are interleaved (each round times every candidate once), so that a
   busy neighbour on a shared host hurts all alike; best and median of ``--repeats``
   rounds, and the median over rounds of the paired ratio. The CPU time other processes
   used meanwhile is printed beside. Target: mt:2 >= 0.9x the baseline.
2. **Per-call overhead** of mt (call, split, wait for the threads) on tiny jobs that
   still start a parallel region (2 folios of 64 bytes: one per thread; one 4 KiB folio:
   two chunks), and on jobs that do not (one 64-byte span, an empty job): best and median
   of interleaved rounds of many calls, with mt:1 and serial beside. Target: < 10 us. A
   parallel call needs every thread on a CPU: with a busy neighbour on the host, waking a
   worker waits for the scheduler, and the median shows it.
3. **Cold start**: a fresh ``copyengine engines`` and a fresh process's first mt copy,
   each run twice in new subprocesses, timed, counting Numba compilations (the
   ``numba:compile`` event). Target: the second runs compile nothing (kernels come from
   Numba's on-disk cache).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import numpy as np

from copyengine.engines.base import CopyJob
from copyengine.engines.mt import MtEngine, max_threads
from copyengine.engines.serial import SerialEngine


class CpuLoad:
    """CPU time other processes used while we measured, from /proc/stat and our rusage:
    on a shared host a busy neighbour takes the cores mt:N counts on."""

    def __init__(self):
        self.t0, self.busy0, self.own0 = self._sample()

    @staticmethod
    def _sample():
        try:
            with open("/proc/stat") as f:
                ticks = [int(x) for x in f.readline().split()[1:]]
            busy = (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")
        except (OSError, ValueError, IndexError):
            busy = float("nan")
        r = resource.getrusage(resource.RUSAGE_SELF)
        return time.monotonic(), busy, r.ru_utime + r.ru_stime

    def others(self) -> float:
        """CPUs' worth of work done by other processes since creation."""
        t, busy, own = self._sample()
        return max(0.0, (busy - self.busy0) - (own - self.own0)) / max(t - self.t0, 1e-9)


def interleaved(fns, repeats):
    """Time each of ``fns`` once per round, rounds interleaved so that every candidate
    sees the same neighbours; returns {name: [seconds per round]}."""
    for fn in fns.values():
        fn()                               # warm: faults the pages in, loads the kernels
    times = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t)
    return times


def throughput(nfolios, folio_size, repeats, threads):
    total = nfolios * folio_size
    mem = np.empty(2 * total, np.uint8)
    mem[:total] = np.random.default_rng(0).integers(0, 256, total, dtype=np.uint8)
    mem[total:] = 0
    perm = np.random.default_rng(1).permutation(nfolios)
    src = np.arange(nfolios, dtype=np.int64) * folio_size
    dst = total + perm.astype(np.int64) * folio_size
    job = CopyJob(mem, src, dst, np.full(nfolios, folio_size, np.int64),
                  np.arange(nfolios, dtype=np.int64), np.zeros(nfolios, bool))
    a, b = mem[:total].view(np.uint64), mem[total:].view(np.uint64)

    def baseline():
        b[:] = a

    engines = {"serial": SerialEngine(), **{f"mt:{n}": MtEngine(n) for n in threads}}
    fns = {"numpy slice copy (baseline)": baseline,
           **{name: (lambda e=e: e.copy(job)) for name, e in engines.items()}}
    load = CpuLoad()
    times = interleaved(fns, repeats)
    others = load.others()
    for name, e in engines.items():           # every engine copied every byte
        mem[total:] = 0
        assert not e.copy(job).any(), name
        assert np.array_equal(mem[dst[-1]:dst[-1] + folio_size], mem[src[-1]:src[-1] + folio_size]), name
    base = times["numpy slice copy (baseline)"]
    out = []
    for name, ts in times.items():
        paired = statistics.median(b_ / t for b_, t in zip(base, ts))
        out.append({"name": name, "best_s": min(ts), "median_s": statistics.median(ts),
                    "best_GBps": total / min(ts) / 1e9, "median_GBps": total / statistics.median(ts) / 1e9,
                    "vs_baseline_best": min(base) / min(ts),
                    "vs_baseline_paired_median": paired})
    return out, others


def overhead(calls, nthreads, rounds=9):
    """Microseconds per copy() of tiny jobs; rounds interleaved over every case."""
    mem = np.zeros(1 << 20, np.uint8)
    engines = ((f"mt:{nthreads}", MtEngine(nthreads)), ("mt:1", MtEngine(1)), ("serial", SerialEngine()))
    # 2 folios: one per thread; 1 x 4 KiB: cut in two chunks (both parallel regions);
    # 1 x 64 B: a single span, copied on the calling thread; empty: nothing to plan.
    cases = {}
    for label, n, size in (("2 folios x 64 B", 2, 64), ("1 folio x 4 KiB", 1, 4096),
                           ("8 folios x 64 B", 8, 64), ("1 folio x 64 B", 1, 64),
                           ("empty job", 0, 64)):
        s = np.arange(n, dtype=np.int64) * 4096
        job = CopyJob(mem, s, s + (1 << 19), np.full(n, size, np.int64), np.arange(n, dtype=np.int64),
                      np.zeros(n, bool))
        for name, e in engines:
            cases[f"{name}, {label}"] = (e, job)
    for e, job in cases.values():
        for _ in range(200):
            e.copy(job)
    samples = {k: [] for k in cases}
    for _ in range(rounds):
        for k, (e, job) in cases.items():
            t = time.perf_counter()
            for _ in range(calls):
                e.copy(job)
            samples[k].append((time.perf_counter() - t) / calls)
    return {k: {"best_us": min(v) * 1e6, "median_us": statistics.median(v) * 1e6}
            for k, v in samples.items()}


COUNT = """
import time
t0 = time.perf_counter()
import numba.core.event as ev
compiled = []
class L(ev.Listener):
    def on_start(self, event): compiled.append(event.data["dispatcher"].py_func.__qualname__)
    def on_end(self, event): pass
ev.register("numba:compile", L())
"""

COLD_ENGINES = COUNT + """
import io, contextlib, json
from copyengine.cli import main
with contextlib.redirect_stdout(io.StringIO()):
    main(["engines"])
print(json.dumps({"seconds": time.perf_counter() - t0, "compiled": compiled}))
"""

COLD_COPY = COUNT + """
import json, numpy as np
import copyengine as ce
from copyengine.engines.base import CopyJob
m = ce.Machine(nodes=2, node_size="8MiB", engine="mt:%d")
t1 = time.perf_counter()
s = np.arange(8, dtype=np.int64) * 65536 + 65536
job = CopyJob(m.mem, s, s + (8 << 20), np.full(8, 65536, np.int64), np.arange(8), np.zeros(8, bool))
res = m.engine.copy(job)
t2 = time.perf_counter()
assert not res.any()
print(json.dumps({"seconds": t2 - t0, "first_copy_seconds": t2 - t1, "compiled": compiled}))
"""


def cold(nthreads):
    out = {}
    for label, code in (("copyengine engines", COLD_ENGINES), ("first mt copy", COLD_COPY % nthreads)):
        runs = []
        for _ in range(2):
            t = time.perf_counter()
            r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
            wall = time.perf_counter() - t
            if r.returncode:
                raise RuntimeError(f"{label}: {r.stderr}")
            d = json.loads(r.stdout.strip().splitlines()[-1])
            d["process_wall_seconds"] = wall
            runs.append(d)
        out[label] = runs
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--folios", type=int, default=512)
    ap.add_argument("--folio-size", type=int, default=2 << 20)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--calls", type=int, default=5000, help="tiny copies per overhead sample")
    ap.add_argument("--quick", action="store_true", help="32 folios, 5 repeats, 1000 calls")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:
        args.folios, args.repeats, args.calls = 32, 5, 1000
    maxt = max_threads()
    threads = sorted({1, 2, maxt} & set(range(1, maxt + 1)))
    nthreads = min(2, maxt)
    total = args.folios * args.folio_size
    print(f"host: {os.cpu_count()} CPUs, {len(os.sched_getaffinity(0))} usable, load "
          f"{os.getloadavg()[0]:.2f}; mt threading layer {MtEngine(1).layer}")

    print(f"\n1. throughput: {args.folios} folios x {args.folio_size >> 10} KiB = "
          f"{total / 2**30:.3f} GiB, best/median of {args.repeats}")
    tp, others = throughput(args.folios, args.folio_size, args.repeats, threads)
    print(f"   (rounds interleaved; other processes kept {others:.2f} of {os.cpu_count()} CPUs "
          f"busy meanwhile; 'paired' = median over rounds of baseline time / engine time)")
    for r in tp:
        print(f"   {r['name']:<28} best {r['best_GBps']:6.2f} GB/s ({r['vs_baseline_best']:.2f}x)"
              f"   median {r['median_GBps']:6.2f} GB/s (paired {r['vs_baseline_paired_median']:.2f}x)")
    mt2 = next((r for r in tp if r["name"] == f"mt:{nthreads}"), None)

    print(f"\n2. per-call overhead (best and median of 9 interleaved rounds of {args.calls} calls)")
    load = CpuLoad()
    oh = overhead(args.calls, nthreads)
    print(f"   (other processes kept {load.others():.2f} CPUs busy meanwhile)")
    for k, v in oh.items():
        print(f"   {k:<32} best {v['best_us']:6.2f} us   median {v['median_us']:6.2f} us")

    print("\n3. cold start (fresh processes, each twice)")
    cs = cold(nthreads)
    for label, runs in cs.items():
        for i, d in enumerate(runs):
            extra = f", first copy {d['first_copy_seconds'] * 1e3:.1f} ms" if "first_copy_seconds" in d else ""
            print(f"   {label:<20} run {i + 1}: {d['process_wall_seconds']:.2f} s process, "
                  f"{d['seconds']:.2f} s in Python{extra}; compiled {len(d['compiled'])}: "
                  f"{', '.join(d['compiled']) or '-'}")

    verdict = {
        f"mt:{nthreads} >= 0.9x numpy (best of rounds)": bool(mt2 and mt2["vs_baseline_best"] >= 0.9),
        f"mt:{nthreads} >= 0.9x numpy (paired median)":
            bool(mt2 and mt2["vs_baseline_paired_median"] >= 0.9),
        f"mt:{nthreads} per-call overhead < 10 us (parallel tiny jobs, best sample)":
            max(oh[f"mt:{nthreads}, 2 folios x 64 B"]["best_us"],
                oh[f"mt:{nthreads}, 1 folio x 4 KiB"]["best_us"]) < 10,
        f"mt:{nthreads} per-call overhead < 10 us (parallel tiny jobs, median sample)":
            max(oh[f"mt:{nthreads}, 2 folios x 64 B"]["median_us"],
                oh[f"mt:{nthreads}, 1 folio x 4 KiB"]["median_us"]) < 10,
        "second cold runs compile nothing": all(not runs[1]["compiled"] for runs in cs.values()),
    }
    print("\ntargets:")
    for k, v in verdict.items():
        print(f"   {'met   ' if v else 'MISSED'} {k}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"throughput": tp, "others_cpus_during_throughput": others,
                       "overhead": oh, "cold": cs, "targets": verdict}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
