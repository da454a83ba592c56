"""``copyengine bench --scenario overhead|engines|populate``: what the old bench/ scripts
measured, as scenarios of the one bench command (``tables``, the default, is the seed's
move_pages() tables of :mod:`.runner`).

* ``overhead``: the model's own cost per move_pages() call and per folio
  (:func:`.overhead.measure_overhead`, the header's figures, at full size), and the
  framework alone with the copy-nothing ``nocopy`` engine (copyengine.testing.engines):
  us per 4 KiB folio in default batches, and us per batch of one 2 MiB folio, with the
  phase split of ``Machine.migrate_times`` (mm/migrate.c's migrate_pages_batch phases).
* ``engines``: every copy engine outside the migration pipeline, through the framework's
  ``run_engine`` (what migrate_pages_batch calls): jobs from one 64-byte folio to 1 GiB in
  4 KiB and 2 MiB folios (destinations shuffled, as a migration's frames are), interleaved
  rounds, against a numpy copy of the same bytes; the per-call latency of tiny jobs and the
  size from which an engine beats ``serial`` (what ``min_bytes`` encodes) are read off it.
  And the cold start: a fresh process's first mt copy, twice, counting Numba compilations
  (the second must compile nothing: kernels come from Numba's on-disk cache).
* ``populate``: faulting in simulated memory (one ``Process.write`` over a fresh mapping:
  do_anonymous_page per base page, then the data) against numpy writing as many fresh
  bytes, interleaved; and in a spawned process the RSS growth against the memory touched.
"""
from __future__ import annotations

import gc
import json
import multiprocessing
import statistics
import subprocess
import sys
import time

import numpy as np

from . import sysinfo
from .overhead import measure_overhead

MiB, GiB = 1 << 20, 1 << 30
SCENARIOS = ("tables", "overhead", "engines", "populate")
FRAMEWORK_TARGETS = {"us_per_4k_folio": 0.5, "us_per_2m_batch": 15.0}
POPULATE_TARGETS = {"ratio": 1.5, "rss_overhead_fraction": 0.10}


def _interleaved(fns, repeat, warmup=1) -> dict:
    """Seconds of each of ``fns`` per round, rounds interleaved (a noisy moment hits all)."""
    times = {k: [] for k in fns}
    for r in range(warmup + repeat):
        for k, fn in fns.items():
            gc.disable()
            try:
                t = time.perf_counter()
                fn()
                dt = time.perf_counter() - t
            finally:
                gc.enable()
            if r >= warmup:
                times[k].append(dt)
    return times


# --------------------------------------------------------------------------- overhead
def _framework(m, p, addrs, repeat):
    n = len(addrs)

    def one(target=[0]):
        target[0] ^= 1
        r = p.move_pages(0, addrs, np.full(n, target[0]))
        if r.ret or set(r.status) != {target[0]}:
            raise RuntimeError(f"nocopy migration failed: ret={r.ret} statuses={set(r.status)}")
    phases = []

    def timed():
        before = dict(m.migrate_times)
        one()
        phases.append({k: m.migrate_times[k] - before[k] for k in before})
    t = _interleaved({"call": timed}, repeat)["call"]
    phases = phases[1:]
    return statistics.median(t), {k: statistics.median(ph[k] for ph in phases) for k in phases[0]}


def scenario_overhead(quick=False, repeat=None) -> dict:
    """The header's overhead at full size, and the framework's with nothing copied."""
    import copyengine as ce
    from ..plugins import make_plugin_manager
    from ..testing import engines as test_engines
    repeat = repeat or (3 if quick else 9)
    out = {"model": measure_overhead(folios=8192 if quick else 65536, calls=50 if quick else 300,
                                     repeat=repeat)}
    pm = make_plugin_manager(entry_points=False, plugins=[test_engines])
    n4k, n2m = (8192, 16) if quick else (65536, 64)
    with ce.Machine(nodes=2, node_size="1GiB", plugin_manager=pm, engine="nocopy") as m:
        p = m.spawn()
        a = p.mmap(n4k * 4096)
        t, split = _framework(m, p, a + 4096 * np.arange(n4k), repeat)
        out["nocopy_4KiB"] = {"folios": n4k, "batch_folios": m.settings["nr_max_batched_migration"],
                              "us_per_folio": t / n4k * 1e6,
                              "phases_us_per_folio": {k: v / n4k * 1e6 for k, v in split.items()}}
        b = p.mmap(n2m << 21, folio_size="2MiB")
        t, split = _framework(m, p, b + (2 << 20) * np.arange(n2m), repeat)
        out["nocopy_2MiB"] = {"folios": n2m, "us_per_batch": t / n2m * 1e6,   # one folio = one batch
                              "phases_us_per_batch": {k: v / n2m * 1e6 for k, v in split.items()}}
    out["targets"] = FRAMEWORK_TARGETS
    return out


def format_overhead_scenario(o) -> str:
    from .overhead import format_overhead
    f4, f2 = o["nocopy_4KiB"], o["nocopy_2MiB"]
    t = o["targets"]
    return "\n".join([
        format_overhead(o["model"]),
        f"framework alone (nocopy engine), 4 KiB folios in batches of {f4['batch_folios']}: "
        f"{f4['us_per_folio']:.3f} us/folio (target <= {t['us_per_4k_folio']:g}: "
        f"{'met' if f4['us_per_folio'] <= t['us_per_4k_folio'] else 'MISSED'})  "
        + "  ".join(f"{k} {v:.3f}" for k, v in f4["phases_us_per_folio"].items()),
        f"framework alone (nocopy engine), one 2 MiB folio per batch: {f2['us_per_batch']:.1f} us/batch "
        f"(target <= {t['us_per_2m_batch']:g}: {'met' if f2['us_per_batch'] <= t['us_per_2m_batch'] else 'MISSED'})  "
        + "  ".join(f"{k} {v:.1f}" for k, v in f2["phases_us_per_batch"].items())])


# --------------------------------------------------------------------------- engines
def _job(mem, count, fsize, base, rng):
    from ..engines.base import CopyJob
    total = count * fsize
    src = base + np.arange(count, dtype=np.int64) * fsize
    dst = base + total + rng.permutation(count).astype(np.int64) * fsize
    return CopyJob(mem, src, dst, np.full(count, fsize, np.int64), np.arange(count, dtype=np.int64),
                   np.zeros(count, bool))


ENGINE_JOBS = ((1, 64), (1, 4096), (8, 4096), (16, 4096), (256, 4096), (4096, 4096),
               (1, 2 * MiB), (8, 2 * MiB), (64, 2 * MiB), (512, 2 * MiB))
QUICK_ENGINE_JOBS = ((1, 64), (1, 4096), (256, 4096), (1, 2 * MiB), (16, 2 * MiB))

COLD_COPY = """
import json, time
t0 = time.perf_counter()
import numba.core.event as ev
compiled = []
class L(ev.Listener):
    def on_start(self, event): compiled.append(event.data["dispatcher"].py_func.__qualname__)
    def on_end(self, event): pass
ev.register("numba:compile", L())
import numpy as np
import copyengine as ce
from copyengine.engines.base import CopyJob, run_engine
m = ce.Machine(nodes=2, node_size="8MiB", engine="mt:%d")
s = np.arange(8, dtype=np.int64) * 65536 + 65536
job = CopyJob(m.mem, s, s + (8 << 20), np.full(8, 65536, np.int64), np.arange(8), np.zeros(8, bool))
t1 = time.perf_counter()
assert not run_engine(m.engine, job, 60).any()
print(json.dumps({"seconds": time.perf_counter() - t0, "first_copy_seconds": time.perf_counter() - t1,
                  "compiled": compiled}))
"""


def _cold(nthreads) -> list:
    runs = []
    for _ in range(2):
        r = subprocess.run([sys.executable, "-c", COLD_COPY % nthreads], capture_output=True, text=True,
                           timeout=300)
        if r.returncode:
            raise RuntimeError(f"cold start: {r.stderr.strip().splitlines()[-1:]}")
        runs.append(json.loads(r.stdout.strip().splitlines()[-1]))
    return runs


def scenario_engines(configs=None, quick=False, repeat=None, plugin_manager=None, cold=True) -> dict:
    """Every engine on the same jobs, interleaved, each verified; plus the cold start."""
    import copyengine as ce
    from ..engines.base import create_engine, run_engine
    from ..plugins import engine_registry, get_plugin_manager
    from .scenarios import cpus_available, mt_thread_counts
    pm = plugin_manager or get_plugin_manager()
    reg = engine_registry(pm)
    jobs = QUICK_ENGINE_JOBS if quick else ENGINE_JOBS
    repeat = repeat or (3 if quick else 7)
    specs = list(configs or ["serial"] + [f"mt:{n}" for n in mt_thread_counts(cpus_available())]
                 + ["opencl"])
    largest = max(c * f for c, f in jobs)
    rng = np.random.default_rng(1)
    out = {"jobs": [], "unavailable": {}, "repeat": repeat}
    with ce.Machine(nodes=2, node_size=-(-(2 * largest + 4 * MiB) // (4 * MiB)) * 2 * MiB, plugin_manager=pm) as m:
        mem = m.mem
        mem[:2 * largest] = rng.integers(0, 256, 2 * largest, dtype=np.uint8)
        engines = {}
        for s in specs:
            try:
                engines[s] = create_engine(s, m, reg)
            except Exception as e:
                out["unavailable"][s] = f"{type(e).__name__}: {e}"
        try:
            for count, fsize in jobs:
                job = _job(mem, count, fsize, 0, rng)
                n = count * fsize
                a, b = mem[:n], mem[n:2 * n]
                fns = {"numpy copy": lambda: np.copyto(b, a)}
                fns.update({s: (lambda e=e: run_engine(e, job, 60)) for s, e in engines.items()})
                times = _interleaved(fns, repeat)
                for s, e in engines.items():   # every engine copied every byte
                    mem[n:2 * n] = 0
                    run_engine(e, job, 60)
                    d, s0 = int(job.dst_off[-1]), int(job.src_off[-1])
                    if not np.array_equal(mem[d:d + fsize], mem[s0:s0 + fsize]):
                        raise RuntimeError(f"engine {s} did not copy the last folio of {count} x {fsize}")
                out["jobs"].append({"folios": count, "folio_size": fsize, "bytes": n,
                                    "median_us": {k: statistics.median(v) * 1e6 for k, v in times.items()},
                                    "best_us": {k: min(v) * 1e6 for k, v in times.items()}})
        finally:
            for e in engines.values():
                e.close()
    mts = [s for s in specs if s.startswith("mt:")]
    out["cold_start"] = _cold(int(mts[-1].split(":")[1]) if mts else 1) if cold else []
    return out


def _fmt_size(n):
    return f"{n // MiB} MiB" if n >= MiB and n % MiB == 0 else f"{n // 1024} KiB" if n >= 1024 else f"{n} B"


def format_engines(o) -> str:
    names = list(o["jobs"][0]["median_us"]) if o["jobs"] else []
    lines = [f"Copy engines outside migration (run_engine), median us of {o['repeat']} interleaved rounds "
             "(GB/s for jobs of 1 MiB and more):", "",
             "| job | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for j in o["jobs"]:
        cells = []
        for k in names:
            us = j["median_us"][k]
            cells.append(f"{j['bytes'] / us / 1e3:.2f} GB/s" if j["bytes"] >= MiB else f"{us:.1f} us")
        lines.append(f"| {j['folios']} x {_fmt_size(j['folio_size'])} | " + " | ".join(cells) + " |")
    for s, why in o["unavailable"].items():
        lines.append(f"{s}: not available ({why})")
    for i, r in enumerate(o["cold_start"]):
        lines.append(f"cold start {i + 1}: a fresh process's first mt copy after {r['seconds']:.2f} s, "
                     f"the copy {r['first_copy_seconds'] * 1e3:.1f} ms, {len(r['compiled'])} Numba compilation(s)")
    return "\n".join(lines)


# --------------------------------------------------------------------------- populate
def _rss_probe(conn, size):
    """In a spawned process: RSS growth of building a machine and populating ``size``."""
    import copyengine as ce
    with ce.Machine(nodes=2, node_size="4MiB") as m:   # load the compiled fault path first
        p = m.spawn()
        p.write(p.mmap(1 << 20, populate=False), b"\1" * (1 << 20))
    gc.collect()
    before = sysinfo.rss_bytes()
    sysinfo.reset_peak_rss()
    with ce.Machine(nodes=2, node_size=-(-(size + 4 * MiB) // (2 * MiB)) * 2 * MiB, page_size="4KiB") as m:
        created = sysinfo.rss_bytes()
        p = m.spawn()
        a = p.mmap(size, node=0, populate=False)
        chunk = np.full(min(size, 4 * MiB), 7, np.uint8)   # a source of its own would count
        for off in range(0, size, len(chunk)):
            p.write(a + off, chunk[:size - off])
        after = sysinfo.rss_bytes()
        touched = sysinfo.mapping_rss(m.mem.ctypes.data) or size
    conn.send({"touched_bytes": touched, "rss_growth": after["VmRSS"] - before["VmRSS"],
               "machine_metadata_bytes": created["VmRSS"] - before["VmRSS"],
               "peak_growth": after.get("VmHWM", after["VmRSS"]) - before["VmRSS"]})


def scenario_populate(size=None, quick=False, repeat=None) -> dict:
    import copyengine as ce
    size = size or (64 * MiB if quick else GiB)
    repeat = repeat or (3 if quick else 5)
    src = np.tile(np.random.default_rng(12345).integers(1, 256, 4096, dtype=np.uint8), size // 4096)
    node = -(-(size + 4 * MiB) // (2 * MiB)) * 2 * MiB

    def sim():
        with ce.Machine(nodes=2, node_size=node, page_size="4KiB") as m:
            p = m.spawn()
            a = p.mmap(size, node=0, populate=False)
            t = time.perf_counter()
            p.write(a, src)
            sim.t = time.perf_counter() - t
            if p.read(a + size - 64, 64) != src[-64:].tobytes():
                raise RuntimeError("populate: the data did not land")

    def fill():
        t = time.perf_counter()
        x = np.empty(size, np.uint8)
        x.fill(7)
        fill.t = time.perf_counter() - t
    t_sim, t_np = [], []
    for r in range(repeat + 1):     # the first round loads the compiled fault path
        sim()
        fill()
        if r:
            t_sim.append(sim.t)
            t_np.append(fill.t)
    ctx = multiprocessing.get_context("spawn")
    a, b = ctx.Pipe()
    proc = ctx.Process(target=_rss_probe, args=(b, size), daemon=True)
    proc.start()
    rss = a.recv() if a.poll(600) else None
    proc.join(10)
    if proc.is_alive():
        proc.kill()
    out = {"bytes": size, "faults": size // 4096, "write_s": statistics.median(t_sim),
           "numpy_fill_s": statistics.median(t_np), "rss": rss, "targets": POPULATE_TARGETS}
    out["ratio"] = out["write_s"] / out["numpy_fill_s"]
    if rss:
        rss["overhead_fraction"] = (rss["rss_growth"] - rss["touched_bytes"]) / rss["touched_bytes"]
    return out


def format_populate(o) -> str:
    t = o["targets"]
    lines = [f"populate {o['bytes'] / MiB:.0f} MiB ({o['faults']} faults): Process.write {o['write_s'] * 1e3:.1f} ms, "
             f"numpy fill {o['numpy_fill_s'] * 1e3:.1f} ms, ratio {o['ratio']:.2f} "
             f"(target <= {t['ratio']}: {'met' if o['ratio'] <= t['ratio'] else 'MISSED'})"]
    r = o.get("rss")
    if r:
        lines.append(f"resident memory (spawned process): grew {r['rss_growth'] / MiB:.1f} MiB for "
                     f"{r['touched_bytes'] / MiB:.1f} MiB touched, overhead {r['overhead_fraction']:.1%} "
                     f"(target < {t['rss_overhead_fraction']:.0%}: "
                     f"{'met' if r['overhead_fraction'] < t['rss_overhead_fraction'] else 'MISSED'}); "
                     f"machine metadata {r['machine_metadata_bytes'] / MiB:.1f} MiB")
    else:
        lines.append("resident memory: the probe process gave no answer")
    return "\n".join(lines)


def run_scenario(name, quick=False, repeat=None, configs=None, plugin_manager=None) -> tuple:
    """(result dict, text) of one scenario other than ``tables``."""
    if name == "overhead":
        o = scenario_overhead(quick, repeat)
        return o, format_overhead_scenario(o)
    if name == "engines":
        o = scenario_engines(configs, quick, repeat, plugin_manager)
        return o, format_engines(o)
    if name == "populate":
        o = scenario_populate(quick=quick, repeat=repeat)
        return o, format_populate(o)
    raise ValueError(f"--scenario: {name!r}: one of {', '.join(SCENARIOS)}")
