"""The bench runner: the seed's move_pages() experiment, verified, timed and explained.

For each page size one :class:`~copyengine.Machine` (two nodes, each sized for the largest
row: ``2 x bytes + slack``) is reused for every row and configuration. For each row (a
page count N) a process maps N folios on node 0 and writes a pattern over every byte;
then, for each configuration, the engine is selected and the folios *ping-pong* between
the nodes: every run is one ``move_pages()`` call moving all N folios to the other node.
The first ``warmup`` runs of a configuration are not timed (host first-touch of the
simulated frames, caches, Numba's thread pool); the next ``repeat`` are. Throughput is
``N x folio size`` bytes over the wall time of the call (GB/s = 1e9 bytes/s); a row's
value is the median of the repeats, with the min-max spread.

**Verification, after every run (timed or not), outside the timing.** Before each run the
process stamps two words of every base page (its first and last 8 bytes) with values
unique to the run (a store through its page table); after it:

* ``ret`` is 0 and every status is the target node;
* every PTE of the mapping is present and names a frame on the target node, the frames of
  each folio are contiguous, and no frame is mapped twice;
* every stamp reads back (a destination that was not copied holds another run's stamps,
  or zeros), and a random sample of pattern words of every folio reads back;
* small runs (up to ``full_check_bytes``) are compared in full through ``Process.read``
  after every run; every row is compared in full once more at the end of each
  configuration (up to ``final_check_bytes``; larger rows once at the end of the row).

A run that raises, fails a check, or whose engine failed (an ``engine_error`` event, or
folios the engine left to the CPU fallback) marks its (row, configuration) failed: it is
reported with its error and never counted (``gbps`` is null). The row's data is then
rebuilt from scratch for the next configuration.

**Where the time goes.** ``Machine.migrate_times`` accumulates the seconds of each phase of
the state machine (prepare, unmap, move, copy, finalize); the bench takes its deltas
around every timed call. What the call spends outside them (argument checks, the page
lookup of ``do_pages_move``, statuses) is reported as ``other``.
"""
from __future__ import annotations

import gc
import math
import statistics
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from .. import trace
from ..migrate.core import PHASES
from . import scenarios as sc
from . import seed as seed_tables
from .overhead import measure_overhead
from . import sysinfo

SCHEMA = "copyengine-bench/1"
MiB, GiB = 1 << 20, 1 << 30

#: pattern word w of a row is ``w * _K + seed`` (mod 2**64): cheap to make, and every
#: word of every row differs from its neighbours and from other rows' words
_K = np.uint64(0x9E3779B97F4A7C15)


class BenchError(ValueError):
    """Bad options for the bench (the CLI exits with status 2)."""


class VerifyError(Exception):
    """A run whose outcome or contents are wrong."""


class EngineFailed(Exception):
    """The engine under test did not copy (it raised, or left folios to the CPU fallback)."""


# --------------------------------------------------------------------------- options
@dataclass
class Plan:
    page_sizes: list            # of scenarios.PageSize
    counts: dict                # token -> list of counts
    configs: list               # spec strings, as given
    repeat: int
    warmup: int
    quick: bool
    counts_given: bool = False
    configs_given: bool = False


def _registry(pm):
    from ..plugins import engine_registry, get_plugin_manager
    return engine_registry(pm if pm is not None else get_plugin_manager())


def _check_spec_argument(spec, registry, pm):
    """A malformed argument (mt:0, serial:1) is a bad option, found before anything runs;
    an engine that cannot run here (EngineUnavailable) is only an n/a column later."""
    from ..engines.base import create_engine
    from ..errors import EngineUnavailable
    from ..machine import Machine
    with Machine(nodes=2, node_size="2MiB", engine="serial", plugin_manager=pm) as tiny:
        try:
            create_engine(spec, tiny, registry).close()
        except EngineUnavailable:
            pass
        except (ValueError, TypeError) as e:
            raise BenchError(f"--configs: {spec!r}: {e}") from None


def make_plan(page_sizes=None, counts=None, configs=None, repeat=None, quick=False, warmup=1,
              pm=None) -> Plan:
    """Validate and complete the options. BenchError names what is wrong."""
    from ..engines.base import parse_spec
    try:
        toks = sc.split_list(page_sizes, "--page-size") if page_sizes is not None else list(sc.DEFAULT_PAGE_SIZES)
        pss, seen = [], set()
        for t in toks:
            ps = sc.parse_page_size(t)
            if ps.token not in seen:
                seen.add(ps.token)
                pss.append(ps)
        cnt = sc.parse_counts(counts)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if repeat is None:
        repeat = sc.QUICK_REPEAT if quick else sc.DEFAULT_REPEAT
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise BenchError(f"--repeat: {repeat!r}: the number of timed runs must be an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BenchError(f"warmup: {warmup!r}: must be an integer >= 0")
    registry = _registry(pm)
    if configs is None:
        cfgs = sc.default_configs(registry)
    else:
        try:
            cfgs = sc.split_list(configs, "--configs")
        except ValueError as e:
            raise BenchError(str(e)) from None
        out = []
        for c in cfgs:
            try:
                name, _ = parse_spec(c)
            except (ValueError, TypeError) as e:
                raise BenchError(f"--configs: {e}") from None
            if name not in registry and name not in sc.DESIGNED_ENGINES:
                missing = [n for n in sc.DESIGNED_ENGINES if n not in registry]
                raise BenchError(f"--configs: unknown engine {name!r} in {c!r}; engines here: "
                                 f"{', '.join(sorted(registry))}"
                                 + (f" (and {', '.join(missing)} once installed)" if missing else ""))
            if name in registry:
                _check_spec_argument(c, registry, pm)
            if c not in out:
                out.append(c)
        cfgs = out
    per = {ps.token: (list(cnt) if cnt else list(sc.default_counts(ps, quick))) for ps in pss}
    avail = sysinfo._meminfo().get("MemAvailable")
    for ps in pss:
        need = 2 * max(per[ps.token]) * ps.folio_size   # the source and the destination
        if need >= 1 << 47:
            raise BenchError(f"{ps.token} x{max(per[ps.token])}: far too large")
        if avail and need * 1.15 > avail:
            raise BenchError(f"{ps.token} x{max(per[ps.token])} needs {need / (1 << 30):.1f} GiB of host memory "
                             f"(source and destination of {need / 2 / (1 << 30):.1f} GiB); "
                             f"{avail / (1 << 30):.1f} GiB is available: use smaller --counts")
    return Plan(pss, per, cfgs, int(repeat), int(warmup), bool(quick),
                counts_given=cnt is not None, configs_given=configs is not None)


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line stderr progress bar weighted by bytes to move (no dependency)."""

    def __init__(self, total_units: float, enabled: bool, stream=None, width: int = 28):
        self.total = max(float(total_units), 1e-9)
        self.done = 0.0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.label = ""

    def advance(self, units: float, label: str | None = None):
        self.done = min(self.total, self.done + units)
        if label is not None:
            self.label = label
        self.draw()

    def draw(self, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = self.done / self.total
        fill = int(frac * self.width)
        elapsed = now - self.t0
        eta = f" ETA {elapsed / frac - elapsed:4.0f}s" if frac > 0.02 else ""
        line = f"\r[{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:3.0f}% {elapsed:4.0f}s{eta}  {self.label}"
        self.stream.write(line[:119].ljust(119))
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.draw(force=True)
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()


# --------------------------------------------------------------------------- checks
def _check_engine_did_the_copy(before, after):
    """A run counts only if the configured engine copied every folio: no engine error and
    no CPU fallback (vmstat, so that no observer plugin sends the calls down the full path)."""
    errors = after["copy_engine_errors"] - before["copy_engine_errors"]
    if errors:
        raise EngineFailed(f"it failed {errors} time(s) (raised or returned a bad result) and the CPU "
                           "copied instead")
    fallback = after["copy_fallback_folios"] - before["copy_fallback_folios"]
    if fallback:
        raise EngineFailed(f"{fallback} folio(s) were not copied by the engine but by the CPU fallback "
                           "(folio_mc_copy)")


# --------------------------------------------------------------------------- workload
class Workload:
    """One row: ``count`` folios of one page size, mapped and written by one process."""

    def __init__(self, m, ps: sc.PageSize, count: int, seed: int, rng):
        from ..mm.pte import PTE_MIGRATION, PTE_PRESENT, pte_pfn
        self._pte_pfn, self._present, self._migration = pte_pfn, PTE_PRESENT, PTE_MIGRATION
        self.m, self.ps, self.count = m, ps, count
        self.total = count * ps.folio_size
        self.npages = self.total // ps.base_page
        self.wpp = ps.base_page // 8            # uint64 words per base page
        self.wpf = ps.folio_size // 8           # per folio
        self.seed = np.uint64(seed)
        self.rng = rng
        self.run_tag = 0
        self.p = m.spawn()
        self.a = self.p.mmap(self.total, node=0, folio_size=ps.folio_size, populate=False)
        self.vma = self.p.find_vma(self.a)
        self.i0 = (self.a - self.vma.start) // ps.base_page
        self.addrs = self.a + np.arange(count, dtype=np.int64) * ps.folio_size
        self.targets = {n: np.full(count, n, np.int64) for n in (0, 1)}
        self.node = 0
        self.pages = np.arange(self.npages, dtype=np.uint64)
        self._write_pattern()
        self._stamp()

    # ---------------------------------------------------------------- contents
    def _pattern(self, lo, hi):
        return np.arange(lo, hi, dtype=np.uint64) * _K + self.seed

    def _stamps(self, pages, tag=None):
        tag = np.uint64(self.run_tag if tag is None else tag)
        base = (tag << np.uint64(40)) | (pages.astype(np.uint64) << np.uint64(1))
        return base, base | np.uint64(1)

    def expected(self, lo, hi):
        """The words [lo, hi) of the mapping as they must read now."""
        v = self._pattern(lo, hi)
        pg = np.arange(lo // self.wpp, (hi - 1) // self.wpp + 1, dtype=np.int64)
        s0, s1 = self._stamps(pg)
        i0 = pg * self.wpp - lo
        i1 = i0 + self.wpp - 1
        k0 = (i0 >= 0) & (i0 < hi - lo)
        k1 = (i1 >= 0) & (i1 < hi - lo)
        v[i0[k0]] = s0[k0]
        v[i1[k1]] = s1[k1]
        return v

    def _write_pattern(self, chunk=4 * MiB):
        """The process writes every byte through ``Process.write`` (faulting it in on node 0)."""
        words = chunk // 8
        for lo in range(0, self.total // 8, words):
            hi = min(lo + words, self.total // 8)
            self.p.write(self.a + lo * 8, self._pattern(lo, hi))

    def pfns(self):
        ptes = self.vma.ptes[self.i0:self.i0 + self.npages]
        return ptes, self._pte_pfn(ptes)

    def _stamp(self):
        """Stores of this run's stamps through the page table (first and last word of
        every base page): the same bytes a user store would write, without one call per
        page. The pages are present and writable, and no migration is in flight."""
        self.run_tag += 1
        ptes, pfns = self.pfns()
        if not ((ptes & self._present) != 0).all():
            raise VerifyError("a page of the mapping is not present before the run")
        mem64 = self.m.mem.view(np.uint64)
        s0, s1 = self._stamps(self.pages)
        w0 = pfns * self.wpp
        mem64[w0] = s0
        mem64[w0 + self.wpp - 1] = s1

    # ---------------------------------------------------------------- runs
    def move(self, target):
        """One timed move_pages() call; returns (seconds, phase deltas, result)."""
        m = self.m
        times = getattr(m, "migrate_times", None)
        before = dict(times) if times is not None else None
        nodes = self.targets[target]
        was = gc.isenabled()
        gc.disable()
        try:
            with trace.record(m) as rec:
                c0 = time.process_time()  # every thread of the process: engine workers too
                t0 = time.perf_counter()
                r = self.p.move_pages(0, self.addrs, nodes)
                dt = time.perf_counter() - t0
                self.cpu = time.process_time() - c0
            self.recorder = rec
        finally:
            if was:
                gc.enable()
        phases = None
        if before is not None:
            phases = {k: float(times.get(k, 0.0) - before.get(k, 0.0)) for k in PHASES}
        return dt, phases, r

    def verify(self, r, target, full: bool) -> None:
        st = np.asarray(r.status)
        if st.shape != (self.count,) or not (st == target).all():
            bad = np.nonzero(st != target)[0] if st.shape == (self.count,) else [0]
            i = int(bad[0])
            raise VerifyError(f"status[{i}] = {st[i] if st.shape == (self.count,) else st!r}, "
                              f"expected {target} ({len(bad)} of {self.count} statuses wrong)")
        if r.ret != 0:
            raise VerifyError(f"move_pages returned {r.ret}, expected 0")
        ptes, pfns = self.pfns()
        present = (ptes & self._present) != 0
        if not present.all() or ((ptes & self._migration) != 0).any():
            raise VerifyError(f"{int((~present).sum())} page(s) not present after the call")
        nodes = pfns // self.m.frames_per_node
        if not (nodes == target).all():
            raise VerifyError(f"{int((nodes != target).sum())} page(s) not on node {target}")
        ppf = self.ps.pages_per_folio
        if ppf > 1:
            pf = pfns.reshape(self.count, ppf)
            if not (pf - pf[:, :1] == np.arange(ppf)).all():
                raise VerifyError("a folio's frames are not contiguous")
        if len(np.unique(pfns)) != self.npages:
            raise VerifyError("a frame is mapped twice")
        mem64 = self.m.mem.view(np.uint64)
        s0, s1 = self._stamps(self.pages)
        w0 = pfns * self.wpp
        got0, got1 = mem64[w0], mem64[w0 + self.wpp - 1]
        ok = (got0 == s0) & (got1 == s1)
        if not ok.all():
            i = int(np.nonzero(~ok)[0][0])
            raise VerifyError(f"{int((~ok).sum())} of {self.npages} base pages hold wrong stamps "
                              f"(page {i}: {int(got0[i]):#x}, expected {int(s0[i]):#x}): not copied?")
        # a random sample of pattern words: 4 per base page, at least 64 per folio
        per_page = max(4, -(-64 // ppf))
        idx = self.rng.integers(1, self.wpp - 1, size=(self.npages, per_page), dtype=np.int64)
        idx += (np.arange(self.npages, dtype=np.int64) * self.wpp)[:, None]
        idx = idx.ravel()
        page = idx // self.wpp
        phys = pfns[page] * self.wpp + (idx - page * self.wpp)
        got = mem64[phys]
        want = idx.astype(np.uint64) * _K + self.seed
        bad = got != want
        if bad.any():
            raise VerifyError(f"{int(bad.sum())} of {len(idx)} sampled words differ "
                              f"(first at byte {int(idx[np.argmax(bad)]) * 8} of the mapping)")
        if full:
            self.full_compare()

    def full_compare(self, chunk=8 * MiB):
        """Every byte, read back through ``Process.read``."""
        words = chunk // 8
        total_words = self.total // 8
        for lo in range(0, total_words, words):
            hi = min(lo + words, total_words)
            got = np.frombuffer(self.p.read(self.a + lo * 8, (hi - lo) * 8), np.uint64)
            want = self.expected(lo, hi)
            if not np.array_equal(got, want):
                i = int(np.argmax(got != want))
                raise VerifyError(f"full compare: word at byte {(lo + i) * 8} is {int(got[i]):#x}, "
                                  f"expected {int(want[i]):#x}")

    def run(self, full: bool):
        """Stamp, move to the other node, verify. Returns (seconds, phases)."""
        target = 1 - self.node
        self._stamp()
        dt, phases, r = self.move(target)
        self.node = target  # wherever it ended, the next run starts from a fresh check
        self.verify(r, target, full)
        return dt, phases

    def close(self):
        try:
            self.p.exit()
        except Exception:
            pass


# --------------------------------------------------------------------------- results
@dataclass
class Cell:
    """The runs of one (page size, count, config)."""
    ps: sc.PageSize
    count: int
    config: str
    seconds: list = field(default_factory=list)
    phases: list = field(default_factory=list)
    error: str | None = None
    unavailable: bool = False
    engines_used: dict = field(default_factory=dict)
    checks: str = ""
    cpu: list = field(default_factory=list)          # CPU seconds of each timed run
    windows: list = field(default_factory=list)      # per timed run: every folio's window, us
    first_usable: list = field(default_factory=list)  # per timed run: call start -> first remap, us
    recorder: object = None                           # the last timed run's trace.Recorder

    @property
    def nbytes(self):
        return self.count * self.ps.folio_size

    def to_json(self, ceiling):
        ok = self.error is None and not self.unavailable and bool(self.seconds)
        g = [self.nbytes / s / 1e9 for s in self.seconds] if ok else []
        med = statistics.median(g) if g else None
        out = {
            "page_size": self.ps.token, "base_page": self.ps.base_page, "folio_size": self.ps.folio_size,
            "count": self.count, "config": self.config, "bytes": self.nbytes,
            "gbps": med, "gbps_min": min(g) if g else None, "gbps_max": max(g) if g else None,
            "fraction": (med / ceiling) if (med is not None and ceiling) else None,
            "repeats": len(g), "verified": ok,
            "phases": None, "other": None, "seconds": None,
        }
        if ok:
            wall = float(np.mean(self.seconds))
            out["seconds"] = statistics.median(self.seconds)
            out["seconds_mean"] = wall
            out["runs_gbps"] = g
            if self.phases and all(p is not None for p in self.phases):
                ph = {k: float(np.mean([p[k] for p in self.phases])) for k in PHASES}
                out["phases"] = ph
                out["other"] = max(0.0, wall - sum(ph.values()))
                out["shares"] = {k: v / wall for k, v in ph.items()} | {"other": out["other"] / wall}
        if ok and self.cpu:
            out["cpu_s"] = statistics.median(self.cpu)
            out["cpu_s_per_gib"] = statistics.median(self.cpu) / (self.nbytes / GiB)
        if ok and self.windows:
            w = np.concatenate(self.windows)
            out["window_p50_us"] = float(np.percentile(w, 50))
            out["window_p99_us"] = float(np.percentile(w, 99))
            out["window_max_us"] = float(w.max())
        if ok and self.first_usable:
            out["first_usable_us"] = statistics.median(self.first_usable)
        if self.engines_used:
            out["engines_used"] = dict(self.engines_used)
        if self.checks:
            out["checks"] = self.checks
        if self.unavailable:
            out["unavailable"] = True
        if self.error is not None:
            out["error"] = self.error
        return out


# --------------------------------------------------------------------------- the run
def _node_size(largest_bytes: int) -> int:
    slack = 16 * MiB
    want = 2 * largest_bytes + slack
    return -(-want // (2 * MiB)) * (2 * MiB)


def _probe(configs, ps: sc.PageSize, pm) -> dict:
    """Which configurations run here: select each on a tiny machine and migrate one
    folio with it (which also loads or compiles its code before anything is timed).
    Returns spec -> None (available) or the reason it is not."""
    import copyengine as ce
    from ..errors import EngineUnavailable
    out = {}
    m = ce.Machine(nodes=2, node_size=_node_size(4 * ps.folio_size), page_size=ps.base_page,
                   plugin_manager=pm)
    try:
        for spec in configs:
            try:
                m.set_engine(spec)
            except (EngineUnavailable, ValueError, TypeError, ImportError, OSError) as e:
                out[spec] = f"{type(e).__name__}: {e}"
                continue
            except Exception as e:  # a broken factory: unavailable too, with why
                out[spec] = f"{type(e).__name__}: {e}"
                continue
            try:
                p = m.spawn()
                a = p.mmap(2 * ps.folio_size, node=0, folio_size=ps.folio_size)
                p.write(a, b"probe")
                p.move_pages(0, [a, a + ps.folio_size], [1, 1])
                p.exit()
            except Exception:
                pass  # a real failure shows (and is reported) in the measured runs
            out[spec] = None
    finally:
        m.close()
    return out


def run_bench(page_sizes=None, counts=None, configs=None, repeat=None, quick=False, *,
              warmup=1, progress=None, plugin_manager=None, plugins=(), ceiling=None,
              full_check_bytes=16 * MiB, final_check_bytes=512 * MiB, seed=12345,
              log=None, batch=None) -> dict:
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
    :param plugin_manager: the pluggy manager machines use (default: the process-wide one);
        ``plugins``: extra plugins (modules or dotted names) for a fresh manager.
    :param ceiling: None to measure it (in a child process, before the runs and, except
        with ``quick``, again after them: the better of the two counts, since other work
        on the host can only make a copy slower), a float GB/s to use as is, or a dict as
        :func:`sysinfo.measure_ceiling` returns.
    :raises BenchError: bad options (a ValueError).
    """
    import copyengine as ce
    from ..errors import EngineUnavailable
    from ..plugins import get_plugin_manager, make_plugin_manager

    if plugins:
        pm = make_plugin_manager(plugins=list(plugins))
    else:
        pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
    plan = make_plan(page_sizes, counts, configs, repeat, quick, warmup, pm)
    t_start = time.perf_counter()
    say = log or (lambda msg: None)

    info = sysinfo.machine_info(pm)
    samples = []

    def sample_ceiling(when):
        say(f"measuring the memcpy ceiling ({when}) ...")
        samples.append((when, sysinfo.measure_ceiling(quick=plan.quick)))

    if ceiling is None:
        sample_ceiling("start")
        ceil = samples[0][1]
    elif isinstance(ceiling, dict):
        ceil = dict(ceiling)
    else:
        ceil = {"gbps": float(ceiling), "method": "given by the caller"}

    say("measuring the model's own overhead ...")
    overhead = measure_overhead(folios=8192 if plan.quick else 65536, calls=50 if plan.quick else 300,
                                repeat=2 if plan.quick else 5, plugin_manager=pm)

    # availability, per page size (an engine may refuse a base page size)
    avail = {}
    for ps in plan.page_sizes:
        avail[ps.token] = _probe(plan.configs, ps, pm)

    # the work, in bytes, for the progress bar
    runs_per_cell = plan.warmup + plan.repeat
    total_units = 0.0
    for ps in plan.page_sizes:
        for c in plan.counts[ps.token]:
            n_av = sum(1 for s in plan.configs if avail[ps.token][s] is None)
            total_units += n_av * runs_per_cell * c * ps.folio_size * 1.0 + c * ps.folio_size
    show = sys.stderr.isatty() if progress is None else bool(progress)
    bar = Progress(total_units, show)

    rng = np.random.default_rng(seed)
    cells: list[Cell] = []
    memory = {"sim_touched_bytes": 0, "sim_expected_bytes": 0, "per_page_size": {}}
    gc.collect()
    base_rss = sysinfo.rss_bytes().get("VmRSS")
    hwm_reset = sysinfo.reset_peak_rss()
    if not hwm_reset:
        base_rss = sysinfo.rss_bytes().get("VmHWM", base_rss)
    seed_n = seed
    try:
        for ips, ps in enumerate(plan.page_sizes):
            if ceiling is None and not plan.quick and ips > 0:
                sample_ceiling(f"before {ps.token}")   # no machine is alive here
            counts = plan.counts[ps.token]
            av = avail[ps.token]
            live = [s for s in plan.configs if av[s] is None]
            for s in plan.configs:
                if av[s] is not None:
                    for c in counts:
                        cells.append(Cell(ps, c, s, error=av[s], unavailable=True))
            if not live:
                continue
            largest = max(counts) * ps.folio_size
            try:
                m = ce.Machine(nodes=2, node_size=_node_size(largest), page_size=ps.base_page,
                               plugin_manager=pm)
                if batch is not None:
                    m.settings["nr_max_batched_migration"] = batch
            except Exception as e:
                for c in counts:
                    for s in live:
                        cells.append(Cell(ps, c, s, error=f"machine: {type(e).__name__}: {e}"))
                continue
            phys_addr = m.mem.ctypes.data
            try:
                for count in counts:
                    seed_n += 1
                    nbytes = count * ps.folio_size
                    label = f"{ps.token} x{count}"
                    bar.advance(0, f"{label}: writing")
                    wl = None
                    try:
                        wl = Workload(m, ps, count, seed_n, rng)
                    except Exception as e:
                        for s in live:
                            cells.append(Cell(ps, count, s, error=f"setup: {type(e).__name__}: {e}"))
                        bar.advance(len(live) * runs_per_cell * nbytes + nbytes)
                        continue
                    bar.advance(nbytes)
                    row_cells = []
                    for spec in live:
                        cell = Cell(ps, count, spec)
                        row_cells.append(cell)
                        cells.append(cell)
                        bar.advance(0, f"{label} {spec}")
                        full_every = nbytes <= full_check_bytes
                        full_last = nbytes <= final_check_bytes
                        cell.checks = ("stamps+sample+full every run" if full_every else
                                       "stamps+sample every run, full after the last" if full_last else
                                       "stamps+sample every run, full at the end of the row")
                        done_units = 0
                        try:
                            if wl is None:
                                seed_n += 1
                                wl = Workload(m, ps, count, seed_n, rng)
                            try:
                                m.set_engine(spec)
                            except (EngineUnavailable, ValueError, TypeError) as e:
                                cell.error, cell.unavailable = f"{type(e).__name__}: {e}", True
                                continue
                            for i in range(plan.warmup + plan.repeat):
                                timed = i >= plan.warmup
                                last = i == plan.warmup + plan.repeat - 1
                                before = m.vmstat
                                dt, phases = wl.run(full=full_every or (last and full_last))
                                _check_engine_did_the_copy(before, m.vmstat)
                                if timed:
                                    cell.seconds.append(dt)
                                    cell.phases.append(phases)
                                    cell.cpu.append(wl.cpu)
                                    cell.windows.append(wl.recorder.windows_us())
                                    cell.first_usable.extend(wl.recorder.first_usable_us().tolist())
                                    for b in wl.recorder.batches:
                                        cell.engines_used[b[9]] = cell.engines_used.get(b[9], 0) + 1
                                    cell.recorder = wl.recorder  # the last timed run, for --trace
                                bar.advance(nbytes)
                                done_units += nbytes
                        except VerifyError as e:
                            cell.error = f"verification failed: {e}"
                        except EngineFailed as e:
                            cell.error = f"engine failed: {e}"
                        except Exception as e:
                            cell.error = f"{type(e).__name__}: {e}"
                        finally:
                            bar.advance(runs_per_cell * nbytes - done_units)
                        if cell.error is not None:
                            cell.seconds, cell.phases = [], []
                            if wl is not None:
                                wl.close()
                            wl = None   # rebuilt, clean, for the next configuration
                    if wl is not None and nbytes > final_check_bytes:
                        try:
                            wl.full_compare()
                        except VerifyError as e:
                            for cell in row_cells:
                                if cell.error is None:
                                    cell.error = f"verification failed at the end of the row: {e}"
                    if wl is not None:
                        wl.close()
                    memory["sim_expected_bytes"] = max(memory["sim_expected_bytes"], 2 * nbytes)
                phys_rss = sysinfo.mapping_rss(phys_addr)
                memory["per_page_size"][ps.token] = {"node_size": m.node_size, "phys_rss_bytes": phys_rss,
                                                     "largest_row_bytes": largest}
                if phys_rss is not None:
                    memory["sim_touched_bytes"] = max(memory["sim_touched_bytes"], phys_rss)
            finally:
                m.close()
                del m
                gc.collect()
    finally:
        bar.close()

    rss = sysinfo.rss_bytes()
    peak = rss.get("VmHWM")
    touched = memory["sim_touched_bytes"] or memory["sim_expected_bytes"]
    memory.update({
        "baseline_rss_bytes": base_rss, "peak_rss_bytes": peak,
        "peak_rss_growth_bytes": (peak - base_rss) if (peak is not None and base_rss is not None) else None,
        "limit_bytes": int(touched * 1.10) if touched else None,
        "peak_reset": hwm_reset,
    })
    g = memory["peak_rss_growth_bytes"]
    memory["within_limit"] = (g <= memory["limit_bytes"]) if (g is not None and memory["limit_bytes"]) else None
    memory["note"] = ("sim_touched_bytes: host memory backing the simulated physical memory of the largest "
                      "machine (its mapping's Rss); sim_expected_bytes: 2 x the largest row (source and "
                      "destination); limit = 1.1 x touched; growth measured from before the first machine")

    if ceiling is None and not plan.quick:
        sample_ceiling("end")
        ceil = dict(max((c for _, c in samples), key=lambda c: c.get("gbps") or 0))
        ceil["samples"] = [{"when": w, "gbps": c.get("gbps"), "threads": c.get("threads"),
                            "chunked_gbps": (c.get("chunked") or {}).get("gbps")}
                           for w, c in samples]
    ceiling_gbps = float(ceil["gbps"]) if ceil.get("gbps") else None
    results = [c.to_json(ceiling_gbps) for c in cells]
    timeline = _timeline(cells)
    order = {(ps.token): i for i, ps in enumerate(plan.page_sizes)}
    corder = {s: i for i, s in enumerate(plan.configs)}
    results.sort(key=lambda r: (order[r["page_size"]], r["count"], corder.get(r["config"], 1 << 30)))
    out = {
        "schema": SCHEMA,
        "machine": info,
        "ceiling_gbps": ceiling_gbps,
        "ceiling": ceil,
        "memory": memory,
        "settings": {"page_sizes": [ps.token for ps in plan.page_sizes], "counts": plan.counts,
                     "configs": plan.configs, "repeat": plan.repeat, "warmup": plan.warmup,
                     "quick": plan.quick, "full_check_bytes": full_check_bytes,
                     "final_check_bytes": final_check_bytes, "seed": seed, "batch": batch},
        "results": results,
        "targets": evaluate_targets(results, ceiling_gbps, memory),
        "seed_comparison": seed_tables.compare(results, int(info.get("cores") or 1)),
        "overhead": overhead,
        "timeline": timeline,
        "elapsed_s": time.perf_counter() - t_start,
    }
    out["machine"]["loadavg_end"] = sysinfo.loadavg()
    out["machine"]["memory"] = memory   # the spec names "machine"/"memory"; both point at it
    return out


def _timeline(cells) -> dict | None:
    """The Chrome trace of the first row the bench ran: the last timed run of each
    configuration, one process track per configuration, each starting at 0."""
    first = next((c for c in cells if c.recorder is not None), None)
    if first is None:
        return None
    row = [c for c in cells if (c.ps.token, c.count) == (first.ps.token, first.count) and c.recorder]
    return trace.merge(c.recorder.chrome_trace(pid=i + 1, name=f"{c.config} ({c.ps.token} x{c.count})",
                                               t0=c.recorder.batches[0][1] if c.recorder.batches else None)
                       for i, c in enumerate(row))


# --------------------------------------------------------------------------- targets
#: (page size, minimum count, minimum fraction of the ceiling or None = report only)
TARGETS = (("2MiB@64KiB", 128, 0.90), ("64KiB", 4096, 0.70), ("4KiB", 65536, 0.35), ("2MiB", 128, None))


def evaluate_targets(results, ceiling, memory) -> list:
    """The issue's targets, measured: best verified configuration over the ceiling at the
    rows at or above each target's count (each such row is judged; the worst counts)."""
    out = []
    for token, min_count, want in TARGETS:
        rows = {}
        for r in results:
            if r["page_size"] != token or r["count"] < min_count or r["gbps"] is None:
                continue
            best = rows.get(r["count"])
            if best is None or r["gbps"] > best["gbps"]:
                rows[r["count"]] = r
        entry = {"page_size": token, "min_count": min_count, "target": want}
        if not rows:
            entry.update({"measured": False, "met": None, "note": "no verified row at or above this count"})
        else:
            per = [{"count": c, "config": r["config"], "gbps": r["gbps"], "fraction": r["fraction"]}
                   for c, r in sorted(rows.items())]
            worst = min(per, key=lambda x: x["fraction"] if x["fraction"] is not None else math.inf)
            entry.update({"measured": True, "rows": per, "fraction": worst["fraction"],
                          "met": (worst["fraction"] >= want) if (want is not None and worst["fraction"] is not None) else None})
        out.append(entry)
    out.append({"memory": True, "target": "peak RSS growth <= 1.1 x simulated memory touched",
                "growth_bytes": memory.get("peak_rss_growth_bytes"), "limit_bytes": memory.get("limit_bytes"),
                "met": memory.get("within_limit")})
    return out
