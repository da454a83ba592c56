"""Engines for tests and benchmarks: a no-op engine and fault-injecting engines.

This module is a plugin, **not registered by default**. Register it where you need it::

    from copyengine.plugins import make_plugin_manager
    import copyengine.testing.engines as test_engines
    pm = make_plugin_manager(plugins=[test_engines])
    m = copyengine.Machine(plugin_manager=pm, engine="eio:2")

or ``copyengine -p copyengine.testing.engines engines`` on the command line.

=========  =====================================================================================
spec       behaviour
=========  =====================================================================================
nocopy     synchronous; copies nothing and reports 0 for every folio (-EHWPOISON for a poisoned
           one): what is left of a migration's time is framework overhead. It corrupts the
           destinations, so use it only to measure.
eio[:K]    synchronous, *not* machine-check safe: copies every descriptor but every K-th
           (default 3; ``eio:1`` fails them all), whose destination gets half-written with
           garbage (0xEE) and whose folio reports -EIO. Poisoned sources are read (copied)
           anyway and report -EIO, as a plain memcpy engine would: the framework's fallback
           ``folio_mc_copy`` then reports -EHWPOISON.
ooo[:US]   asynchronous, mc-safe: a worker thread copies folios in a shuffled order (fixed
           seed), waiting US microseconds (default 0) before each, and completes each folio
           on its own (completion out of order). ``cancel()`` stops it between folios and
           joins the worker: nothing writes after it returns.
hang[:K]   asynchronous: completes the first K folios (default 0), then hangs until
           cancelled and exits without writing another byte. The framework's wait times
           out, it cancels, and the CPU copies the rest.
=========  =====================================================================================
"""
from __future__ import annotations

import errno
import threading

import numpy as np

from ..errors import EHWPOISON
from ..hookspecs import hookimpl
from ..engines.base import Capabilities, Completion, Engine, copy_descriptors, folio_mc_copy


def _int_arg(name, arg, default, lo):
    if arg is None:
        return default
    try:
        v = int(arg, 10)
    except ValueError:
        raise ValueError(f"{name}:{arg}: the argument is an integer >= {lo}") from None
    if v < lo:
        raise ValueError(f"{name}:{arg}: the argument is an integer >= {lo}")
    return v


class NoCopyEngine(Engine):
    """Reports every folio copied and copies nothing (framework overhead)."""
    capabilities = Capabilities(threads=1, mc_safe=True)

    def copy(self, job):
        return np.where(job.src_poisoned, np.int32(-EHWPOISON), np.int32(0)).astype(np.int32)


class EioEngine(Engine):
    """Fails every ``every``-th descriptor with -EIO after writing garbage to half of it."""
    capabilities = Capabilities(threads=1, mc_safe=False)

    def __init__(self, every=3):
        self.every = every

    def copy(self, job):
        n = len(job.nbytes)
        failed = np.zeros(n, bool)
        failed[self.every - 1::self.every] = True
        ok = np.nonzero(~failed)[0]
        copy_descriptors(job.mem, job.src_off, job.dst_off, job.nbytes, ok)
        for i in np.nonzero(failed)[0]:
            d, nb = int(job.dst_off[i]), int(job.nbytes[i])
            job.mem[d:d + nb // 2] = 0xEE
        result = np.zeros(job.nr_folios, np.int32)
        result[job.folio[failed]] = -errno.EIO
        result[job.src_poisoned] = -errno.EIO   # read the poison: an uncontained error
        return result


class _WorkerCompletion(Completion):
    """A completion driven by one worker thread that copies folio by folio."""

    def __init__(self, job, order, delay, stop_after=None):
        super().__init__(job.nr_folios)
        self.job = job
        self.order = order
        self.delay = delay
        self.stop_after = stop_after      # hang after this many folios (None: never)
        self._wlock = threading.Lock()    # held while writing; cancel takes it to stop
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="copyengine-test-engine",
                                        daemon=True)
        self._thread.start()

    def _run(self):
        job = self.job
        for k, f in enumerate(self.order):
            if self.stop_after is not None and k >= self.stop_after:
                self._stop.wait()         # hang until cancelled, then write nothing
                return
            if self.delay and self._stop.wait(self.delay):
                return
            with self._wlock:
                if self._stop.is_set():
                    return
                status = folio_mc_copy(job, [f])
            if not self.complete([f], int(status[0])):
                return
        self.finish()

    def _cancel(self):
        with self._wlock:
            self._stop.set()
        if threading.current_thread() is not self._thread:
            self._thread.join()


class OutOfOrderEngine(Engine):
    """Asynchronous; completes folios one by one in a shuffled order."""
    capabilities = Capabilities(asynchronous=True, threads=1, channels=1, mc_safe=True)

    def __init__(self, delay_us=0, seed=0):
        self.delay = delay_us / 1e6
        self.rng = np.random.default_rng(seed)

    def submit(self, job):
        return _WorkerCompletion(job, self.rng.permutation(job.nr_folios), self.delay)


class HangEngine(Engine):
    """Asynchronous; completes ``done`` folios, then hangs until cancelled."""
    capabilities = Capabilities(asynchronous=True, threads=1, channels=1, mc_safe=True)

    def __init__(self, done=0):
        self.done = done

    def submit(self, job):
        return _WorkerCompletion(job, np.arange(job.nr_folios), 0.0, stop_after=self.done)


@hookimpl
def copyengine_register_engines(register):
    def nocopy(arg, machine):
        if arg is not None:
            raise ValueError(f"engine 'nocopy' takes no argument (got {arg!r})")
        return NoCopyEngine()

    register("nocopy", nocopy, "test: copies nothing, reports success (framework overhead)")
    register("eio", lambda arg, machine: EioEngine(_int_arg("eio", arg, 3, 1)),
             "test: fails every K-th descriptor with -EIO (eio:K, default 3); not mc-safe")
    register("ooo", lambda arg, machine: OutOfOrderEngine(_int_arg("ooo", arg, 0, 0)),
             "test: asynchronous, completes folios out of order (ooo:DELAY_US)")
    register("hang", lambda arg, machine: HangEngine(_int_arg("hang", arg, 0, 0)),
             "test: asynchronous, completes K folios then hangs until cancelled (hang:K)")
