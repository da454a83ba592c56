"""Each configuration measured in its own worker process, as pyperf does.

A configuration's runs happen in a process of their own, so that nothing one engine leaves
behind (a thread pool spinning, an OpenCL context, heap grown by another engine's buffers,
a JIT compile) lands in another engine's numbers, and so that the memory check is per
process: the growth of a worker's peak RSS over one row against the simulated memory that
row touched.

Workers are started with ``multiprocessing``'s *spawn* method, never fork: GNU OpenMP (an
engine's thread pool) is not fork-safe. A worker lives for the whole run and serves one
row at a time (:class:`RowRunner`): build a machine sized for the row, map and write the
row, then one ``move_pages()`` run per request, then verify in full and free everything.
The runner sends the requests so that configurations interleave across repeats.

:class:`LocalWorker` runs the same :class:`RowRunner` in this process (a plugin manager
object given to :func:`~copyengine.bench.run_bench` cannot cross a process boundary);
:class:`ProcessWorker` runs it in a child. Both answer the same calls with the same dicts.
Every wait on a child is bounded (``timeout``); a child that dies or hangs is killed and
its cell reported failed.
"""
from __future__ import annotations

import gc
import multiprocessing
import os
import time

import numpy as np

from ..engines.auto import AutoEngine
from . import scenarios as sc
from . import sysinfo
from .cells import _node_size
from .workload import EngineFailed, VerifyError, Workload, _check_engine_did_the_copy

#: seconds one request to a worker may take before it is killed (a 2 GiB row's set-up,
#: first touch and full compare take well under a minute on a slow host)
REQUEST_TIMEOUT = 600.0


def _describe(e) -> str:
    if isinstance(e, VerifyError):
        return f"verification failed: {e}"
    if isinstance(e, EngineFailed):
        return f"engine failed: {e}"
    return f"{type(e).__name__}: {e}"


class RowRunner:
    """One configuration's side of the bench, in whichever process runs it."""

    def __init__(self, pm=None, plugins=()):
        from ..plugins import get_plugin_manager, make_plugin_manager
        if pm is None:
            pm = make_plugin_manager(plugins=list(plugins)) if plugins else get_plugin_manager()
        self.pm = pm
        self.m = self.wl = None

    def pid(self) -> int:
        return os.getpid()

    def probe(self, configs, token) -> dict:
        """Which configurations run here: select each on a tiny machine and migrate one
        folio with it (which also loads or compiles its code before anything is timed).
        Returns spec -> None (available) or the reason it is not."""
        import copyengine as ce
        ps = sc.parse_page_size(token)
        out = {}
        # 4 MiB or two folios: more than one batch, so that the batched path's code is
        # loaded here, not in the first measured row (its memory check counts it)
        nfol = max(2, (4 << 20) // ps.folio_size)
        m = ce.Machine(nodes=2, node_size=_node_size(nfol * ps.folio_size), page_size=ps.base_page,
                       plugin_manager=self.pm)
        try:
            for spec in configs:
                try:
                    m.set_engine(spec)
                except Exception as e:  # unavailable, or a broken factory: a column saying why
                    out[spec] = f"{type(e).__name__}: {e}"
                    continue
                try:
                    p = m.spawn()
                    a = p.mmap(nfol * ps.folio_size, node=0, folio_size=ps.folio_size)
                    p.write(a, b"probe" * (nfol * ps.folio_size // 5))
                    p.move_pages(0, a + ps.folio_size * np.arange(nfol), np.ones(nfol, np.int64))
                    p.exit()
                except Exception:
                    pass  # a real failure shows (and is reported) in the measured runs
                out[spec] = None
        finally:
            m.close()
        return out

    def setup(self, token, count, spec, seed, batch=None) -> dict:
        """Build a machine for this row alone, select ``spec``, map and write the row.
        Returns {"error": ..., "unavailable": bool} or {"pid": ...}."""
        import copyengine as ce
        from ..errors import EngineUnavailable
        self.finish(collect=False)
        ps = sc.parse_page_size(token)
        gc.collect()   # one full collection (~0.1 s with Numba loaded) before the baseline
        self.reset = sysinfo.reset_peak_rss()
        rss = sysinfo.rss_bytes()
        self.base_rss = rss.get("VmRSS") if self.reset else rss.get("VmHWM", rss.get("VmRSS"))
        try:
            self.m = ce.Machine(nodes=2, node_size=_node_size(count * ps.folio_size),
                                page_size=ps.base_page, plugin_manager=self.pm)
            if batch is not None:
                self.m.settings["nr_max_batched_migration"] = batch
        except Exception as e:
            self.m = None
            return {"error": f"machine: {type(e).__name__}: {e}", "unavailable": False}
        try:
            self.m.set_engine(spec)
        except (EngineUnavailable, ValueError, TypeError) as e:
            self.finish()
            return {"error": f"{type(e).__name__}: {e}", "unavailable": True}
        try:
            self.wl = Workload(self.m, ps, count, seed, np.random.default_rng(seed))
        except Exception as e:
            self.finish()
            return {"error": f"setup: {type(e).__name__}: {e}", "unavailable": False}
        return {"pid": os.getpid()}

    def run(self, full=False, trace_as=None) -> dict:
        """One verified move_pages() run of the row: its seconds, phases, CPU seconds,
        windows, first-usable times and the engines that copied (or {"error": ...})."""
        try:
            before = self.m.vmstat
            dt, phases = self.wl.run(full=full)
            _check_engine_did_the_copy(before, self.m.vmstat)
        except Exception as e:
            return {"error": _describe(e)}
        rec = self.wl.recorder
        used = {}
        for b in rec.batches:
            used[b[9]] = used.get(b[9], 0) + 1
        out = {"seconds": dt, "phases": phases, "cpu": self.wl.cpu, "windows": rec.windows_us(),
               "first_usable": rec.first_usable_us().tolist(), "engines_used": used}
        if trace_as is not None:  # (pid, name) of its track in the run's timeline
            out["trace"] = rec.chrome_trace(pid=trace_as[0], name=trace_as[1],
                                            t0=rec.batches[0][1] if rec.batches else None)
        return out

    def end_row(self, full: bool) -> dict:
        """Compare the row in full (``full``), then measure the memory this row cost this
        process and free the machine: {"error": ... or None, "memory": {...}, "auto": auto's
        choices over the row, warm-up included, by engine and reason (None for other engines)}."""
        err = None
        auto = None
        if self.m is not None and isinstance(self.m.engine, AutoEngine):
            d = self.m.engine.describe()
            auto = {k: d[k] for k in ("choices", "reasons", "not_counted")}
        if full and self.wl is not None:
            try:
                self.wl.full_compare()
            except Exception as e:
                err = f"{_describe(e)} (the full compare at the end of the row)"
        mem = None
        if self.m is not None:
            touched = sysinfo.mapping_rss(self.m.mem.ctypes.data)
            peak = sysinfo.rss_bytes().get("VmHWM")
            mem = {"pid": os.getpid(), "node_size": self.m.node_size, "sim_touched_bytes": touched,
                   "baseline_rss_bytes": self.base_rss, "peak_rss_bytes": peak, "peak_reset": self.reset,
                   "peak_rss_growth_bytes": (peak - self.base_rss) if (peak and self.base_rss) else None}
        self.finish()
        return {"error": err, "memory": mem, "auto": auto}

    def finish(self, collect=True) -> None:
        had = self.m is not None
        if self.wl is not None:
            self.wl.close()
        if self.m is not None:
            self.m.close()
        self.m = self.wl = None
        if had and collect:
            gc.collect()   # the machine's memory goes back to the host before the next row


class LocalWorker:
    """A :class:`RowRunner` in this process, behind the worker interface."""

    isolated = False

    def __init__(self, pm=None, plugins=()):
        self._r = RowRunner(pm, plugins)

    def call(self, method, *args, **kw):
        return getattr(self._r, method)(*args, **kw)

    def close(self):
        self._r.finish()

    def restart(self):
        return self


def _orphan_guard(parent):
    """Exit as soon as the bench that started this worker is gone (even a SIGKILL of it),
    instead of finishing a long row for nobody."""
    import threading

    def watch():
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)
    threading.Thread(target=watch, daemon=True, name="orphan-guard").start()


def _serve(conn, plugins, parent=None):
    """The worker process: answer (method, args, kwargs) requests until None or EOF."""
    if parent is not None:
        _orphan_guard(parent)
    runner = RowRunner(plugins=plugins)
    while True:
        try:
            req = conn.recv()
        except (EOFError, OSError):
            break
        if req is None:
            break
        method, args, kw = req
        try:
            conn.send(("ok", getattr(runner, method)(*args, **kw)))
        except Exception as e:  # a bug in the bench itself: the caller reports it
            conn.send(("raise", f"{type(e).__name__}: {e}"))
    runner.finish()


class WorkerDied(RuntimeError):
    """A worker process died, hung past its timeout, or raised outside a run."""


class ProcessWorker:
    """A :class:`RowRunner` in a spawned child process."""

    isolated = True

    def __init__(self, plugins=(), timeout=REQUEST_TIMEOUT):
        self.plugins = tuple(plugins)
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self.timeout = timeout
        self.proc = ctx.Process(target=_serve, args=(child, tuple(plugins), os.getpid()), daemon=True,
                                name="copyengine-bench-worker")
        self.proc.start()
        child.close()

    def call(self, method, *args, **kw):
        try:
            self._conn.send((method, args, kw))
            if not self._conn.poll(self.timeout):
                self.kill()
                raise WorkerDied(f"worker pid {self.proc.pid}: no answer to {method} in {self.timeout:.0f} s")
            tag, value = self._conn.recv()
        except (EOFError, OSError, BrokenPipeError) as e:
            self.kill()
            raise WorkerDied(f"worker pid {self.proc.pid} died (exit code {self.proc.exitcode}): "
                             f"{type(e).__name__}") from None
        if tag == "raise":
            raise WorkerDied(f"worker pid {self.proc.pid}: {value}")
        return value

    def restart(self):
        """A fresh worker in place of this one (after it died or hung)."""
        self.close()
        return ProcessWorker(self.plugins, self.timeout)

    def kill(self):
        if self.proc.is_alive():
            self.proc.kill()
        self.proc.join(5)

    def close(self):
        """Ask the worker to exit; kill it if it has not within a few seconds."""
        try:
            self._conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        self.proc.join(10)
        self.kill()
        self._conn.close()
