#!/usr/bin/env python3
"""Populate benchmark: the cost of faulting in simulated memory, against plain numpy.

What it measures (the Foundation issue's performance check):

* **copyengine**: one ``p.write`` of SIZE bytes (default 1 GiB) over a fresh, unpopulated
  private mapping of a fresh machine (2 nodes of ``--node-size``, default 2 GiB, 4 KiB base
  pages): SIZE / 4 KiB page faults (262,144 for 1 GiB), each allocating a frame, installing a
  PTE and updating mem_map, then the data copy into the simulated physical memory.
* **numpy**: ``np.empty(SIZE, np.uint8)`` then ``.fill()``: a plain write of SIZE bytes into
  fresh host memory, measured in the same run (repeats interleaved with the ones above).

The median of ``--repeat`` runs of each is reported with their ratio (target <= 1.5).
Context rows (not part of the target): the bookkeeping alone (``mmap(populate=True)``,
the same faults with no data written), numpy ``np.empty`` + ``copyto`` from the same
source buffer ``p.write`` reads, and numpy ``fill`` with numpy's transparent-hugepage hint
switched off (fresh host memory faulted 4 KiB at a time, like the simulated memory).

Resident memory is measured in a separate subprocess that builds no numpy baseline: VmRSS
from /proc/self/status before creating the machine and after the populating write; the
overhead is the growth beyond the simulated memory actually touched (target < 10%).

Usage::

    python bench/bench_populate.py [--size 1GiB] [--node-size 2GiB] [--repeat 5]
                                   [--json PATH] [--no-context] [--check]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import numpy as np

from copyengine.bench.sysinfo import reset_peak_rss, rss_bytes

RATIO_TARGET = 1.5
RSS_TARGET = 0.10
FILL = 0x5A


# ----------------------------------------------------------------------------- helpers
def parse_size(text: str) -> int:
    from copyengine.units import parse_size as ps
    return ps(int(text) if text.isdigit() else text, "size")


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"


def proc_status() -> dict:
    """VmRSS / VmHWM of this process in bytes (the bench runner's reading)."""
    return rss_bytes()


def reset_hwm() -> bool:
    """Reset VmHWM to the current RSS."""
    return reset_peak_rss()


def thp_setting() -> str:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return f.read().strip()
    except OSError:
        return "unknown"


def make_source(size: int) -> np.ndarray:
    """SIZE bytes of non-trivial data (a random 4 KiB tile repeated), resident in memory."""
    tile = np.random.default_rng(12345).integers(1, 256, 4096, dtype=np.uint8)
    src = np.empty(size, np.uint8)
    reps = size // 4096
    src[:reps * 4096].reshape(reps, 4096)[:] = tile
    src[reps * 4096:] = tile[:size - reps * 4096]
    return src


def warm_up() -> None:
    """Load the compiled (Numba) allocator paths once, outside every measurement."""
    import copyengine as ce
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        p = m.spawn()
        a = p.mmap(1 << 20, populate=False)
        p.write(a, b"\1" * (1 << 20))
        p.mmap(1 << 20)
        p.exit()


# ----------------------------------------------------------------------------- measured bodies
def sim_populate(size: int, node_size: int, src: np.ndarray) -> dict:
    """One p.write of ``src`` over a fresh mapping of a fresh machine."""
    import copyengine as ce
    with ce.Machine(nodes=2, node_size=node_size, page_size="4KiB") as m:
        p = m.spawn()
        a = p.mmap(size, node=0, populate=False)
        f0 = m.vmstat["pgfault"]
        t0 = time.perf_counter()
        p.write(a, src)
        dt = time.perf_counter() - t0
        faults = m.vmstat["pgfault"] - f0
        # spot checks: the data landed, on node 0
        for off in (0, size // 2 + 4093, size - 64):
            assert p.read(a + off, 64) == src[off:off + 64].tobytes()
        assert p.node_of(a + size - 1) == 0
        p.exit()
    return {"seconds": dt, "faults": faults}


def sim_bookkeeping(size: int, node_size: int) -> float:
    """The same faults with no data: mmap(populate=True) (fresh frames are not written)."""
    import copyengine as ce
    with ce.Machine(nodes=2, node_size=node_size, page_size="4KiB") as m:
        p = m.spawn()
        t0 = time.perf_counter()
        p.mmap(size, node=0, populate=True)
        dt = time.perf_counter() - t0
        p.exit()
    return dt


def numpy_fill(size: int) -> float:
    t0 = time.perf_counter()
    x = np.empty(size, np.uint8)
    x.fill(FILL)
    dt = time.perf_counter() - t0
    del x
    return dt


def numpy_copy(size: int, src: np.ndarray) -> float:
    t0 = time.perf_counter()
    x = np.empty(size, np.uint8)
    np.copyto(x, src)
    dt = time.perf_counter() - t0
    del x
    return dt


def numpy_fill_small_pages(size: int) -> float:
    try:
        from numpy._core.multiarray import _set_madvise_hugepage
    except ImportError:  # numpy < 2
        from numpy.core.multiarray import _set_madvise_hugepage
    old = _set_madvise_hugepage(False)
    try:
        return numpy_fill(size)
    finally:
        _set_madvise_hugepage(old)


# ----------------------------------------------------------------------------- RSS phase
def rss_probe(size: int, node_size: int) -> dict:
    """Run in a subprocess: the resident memory the simulated populate costs."""
    src = make_source(size)            # resident before the baseline: not counted
    warm_up()
    import gc
    gc.collect()
    import copyengine as ce
    hwm_reset = reset_hwm()
    before = proc_status()
    m = ce.Machine(nodes=2, node_size=node_size, page_size="4KiB")
    created = proc_status()
    p = m.spawn()
    a = p.mmap(size, node=0, populate=False)
    p.write(a, src)
    after = proc_status()
    touched = (m.total_frames - 1 - m.free_pages()) * m.page_size
    assert p.read(a + size - 16, 16) == src[-16:].tobytes()
    p.exit()
    m.close()
    del p, m
    gc.collect()
    closed = proc_status()
    grown = after["VmRSS"] - before["VmRSS"]
    return {
        "rss_before": before["VmRSS"], "rss_after_machine": created["VmRSS"],
        "rss_after_populate": after["VmRSS"], "rss_after_close": closed["VmRSS"],
        "hwm_after_populate": after["VmHWM"], "hwm_was_reset": hwm_reset,
        "touched_bytes": touched, "rss_growth": grown,
        "machine_metadata_bytes": created["VmRSS"] - before["VmRSS"],
        "overhead_bytes": grown - touched, "overhead_fraction": (grown - touched) / touched,
        "peak_overhead_fraction": ((after["VmHWM"] - before["VmRSS"] - touched) / touched
                                   if hwm_reset else None),
    }


def run_rss_subprocess(size: int, node_size: int) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--rss-probe",
           "--size", str(size), "--node-size", str(node_size)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- main
def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--size", default="1GiB", help="bytes to populate (default 1GiB)")
    ap.add_argument("--node-size", default="2GiB", help="size of each of the 2 nodes (default 2GiB)")
    ap.add_argument("--repeat", type=int, default=5, help="repeats of each measurement (median)")
    ap.add_argument("--json", metavar="PATH", help="also write every sample and result as JSON")
    ap.add_argument("--no-context", action="store_true", help="skip the context rows")
    ap.add_argument("--check", action="store_true", help="exit 1 if a target is missed")
    ap.add_argument("--rss-probe", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)

    size, node_size = parse_size(args.size), parse_size(args.node_size)
    if size % 4096 or size > node_size:
        ap.error("--size must be a multiple of 4KiB and fit in one node")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if args.rss_probe:
        print(json.dumps(rss_probe(size, node_size)))
        return 0

    src = make_source(size)
    warm_up()
    samples = {"copyengine_write": [], "numpy_fill": []}
    if not args.no_context:
        samples.update({"copyengine_bookkeeping": [], "numpy_copy": [], "numpy_fill_4k": []})
    faults = None
    for r in range(args.repeat):
        # interleave, alternating which goes first, so drifts in the host hit both alike
        steps = [("copyengine_write", lambda: sim_populate(size, node_size, src)),
                 ("numpy_fill", lambda: numpy_fill(size))]
        if r % 2:
            steps.reverse()
        if not args.no_context:
            steps += [("copyengine_bookkeeping", lambda: sim_bookkeeping(size, node_size)),
                      ("numpy_copy", lambda: numpy_copy(size, src)),
                      ("numpy_fill_4k", lambda: numpy_fill_small_pages(size))]
        for name, fn in steps:
            res = fn()
            if isinstance(res, dict):
                faults = res["faults"]
                res = res["seconds"]
            samples[name].append(res)
    del src
    rss = run_rss_subprocess(size, node_size)

    med = {k: statistics.median(v) for k, v in samples.items()}
    ratio = med["copyengine_write"] / med["numpy_fill"]
    ratio_ok = ratio <= RATIO_TARGET
    rss_ok = rss["overhead_fraction"] < RSS_TARGET

    labels = {
        "copyengine_write": f"copyengine p.write, fresh mapping ({faults:,} faults)",
        "numpy_fill": "numpy np.empty + fill (baseline)",
        "copyengine_bookkeeping": "  context: copyengine faults only (mmap populate=True)",
        "numpy_copy": "  context: numpy np.empty + copyto(source)",
        "numpy_fill_4k": "  context: numpy np.empty + fill, no hugepage hint",
    }
    width = max(len(v) for v in labels.values())
    print(f"populate {fmt_bytes(size)} of 4 KiB pages; 2 nodes x {fmt_bytes(node_size)}; "
          f"median of {args.repeat}")
    print(f"host: {platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"numpy {np.__version__}, THP {thp_setting()}")
    print()
    print(f"{'what':<{width}}  {'median s':>9}  {'GB/s':>7}  {'min s':>7}  {'max s':>7}")
    for k in samples:
        v = samples[k]
        print(f"{labels[k]:<{width}}  {med[k]:>9.3f}  {size / med[k] / 1e9:>7.2f}  "
              f"{min(v):>7.3f}  {max(v):>7.3f}")
    print()
    print(f"ratio copyengine / numpy fill: {ratio:.2f}  (target <= {RATIO_TARGET})  "
          f"{'PASS' if ratio_ok else 'MISS'}")
    if not args.no_context:
        print(f"  (context) vs numpy copyto: {med['copyengine_write'] / med['numpy_copy']:.2f}; "
              f"vs fill without hugepage hint: "
              f"{med['copyengine_write'] / med['numpy_fill_4k']:.2f}; "
              f"bookkeeping share of the write: "
              f"{med['copyengine_bookkeeping'] / med['copyengine_write']:.0%}")
    print(f"resident memory (separate process): grew {fmt_bytes(rss['rss_growth'])} for "
          f"{fmt_bytes(rss['touched_bytes'])} of simulated memory touched; overhead "
          f"{fmt_bytes(rss['overhead_bytes'])} = {rss['overhead_fraction']:.1%}  "
          f"(target < {RSS_TARGET:.0%})  {'PASS' if rss_ok else 'MISS'}")
    print(f"  machine metadata at creation: {fmt_bytes(rss['machine_metadata_bytes'])}; "
          + (f"peak overhead during the write: {rss['peak_overhead_fraction']:.1%}; "
             if rss["peak_overhead_fraction"] is not None else "")
          + f"after close: {fmt_bytes(rss['rss_after_close'] - rss['rss_before'])} above the start")

    if args.json:
        report = {
            "size": size, "node_size": node_size, "page_size": 4096, "faults": faults,
            "repeat": args.repeat, "samples_s": samples, "median_s": med,
            "ratio": ratio, "ratio_target": RATIO_TARGET, "ratio_ok": ratio_ok,
            "rss": rss, "rss_target": RSS_TARGET, "rss_ok": rss_ok,
            "host": {"machine": platform.machine(), "cpus": os.cpu_count(),
                     "python": platform.python_version(), "numpy": np.__version__,
                     "thp": thp_setting(), "platform": platform.platform()},
        }
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
        print(f"wrote {args.json}")
    return 0 if (ratio_ok and rss_ok) or not args.check else 1


if __name__ == "__main__":
    sys.exit(main())
