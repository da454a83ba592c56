"""Hostile plugins: every way a plugin can fail, as real pluggy plugins (issue 14).

copyengine runs other people's code inside the migration state machine, as the kernel
runs DMA drivers inside ``migrate_pages_batch``. Each class here is a plugin that
misbehaves at one hook while armed (and does nothing while disarmed), so that a test can
register all of them on one plugin manager and arm one around a call:

* :class:`Raiser` - raises (any exception, ``KeyboardInterrupt`` included) in
  ``copyengine_batch_copy``, ``copyengine_select_engine``, ``copyengine_alloc_frames``
  or ``copyengine_migration_event``;
* :class:`BadResult` - ``copyengine_batch_copy`` returns a wrong type, shape or value
  (2**32 that would wrap to 0, positive, bool, float, a list of the wrong length...);
* :class:`BadSelect` - ``copyengine_select_engine`` returns something not an Engine;
* :class:`CorruptJob` - edits the job's ``dst_off`` (or tries to), then declines;
* :class:`ZeroPageWriter` - writes the shared zero page, then lets the engine copy;
* :class:`BadFrames` - ``copyengine_alloc_frames`` hands out the zero page, the same
  frame twice, a frame outside the node, a negative one, or a frame in use;
* engines registered by this module (it is a plugin too): ``hostile-late`` (asynchronous;
  its cancel cannot stop it and it writes garbage into the destinations after the
  timeout, then retires: the framework must quarantine them) and ``hostile-hang``
  (asynchronous; never completes, stops at cancel).

:func:`hostile_plugins` makes one of each; :func:`check_engine_survives` runs every one
of them around migrations that use a plugin author's engine, checking after each call
that no byte was lost and the machine is consistent (``check_machine``, ``ShadowMemory``)::

    from copyengine.testing.hostile import check_engine_survives
    print(check_engine_survives("mydma:2", plugins=["mydma.plugin"]))
"""
from __future__ import annotations

import threading

import numpy as np

from ..engines.base import Capabilities, Completion, Engine
from ..hookspecs import hookimpl
from .invariants import ShadowMemory, check_machine

__all__ = ["Raiser", "BadResult", "BadSelect", "CorruptJob", "ZeroPageWriter", "BadFrames",
           "LateEngine", "HangForeverEngine", "hostile_plugins", "plugin_manager",
           "check_engine_survives", "HOOKS", "SCRIBBLE"]

#: the byte a late writer leaves in the destinations it should no longer touch
SCRIBBLE = 0xA5

HOOKS = ("copyengine_batch_copy", "copyengine_select_engine", "copyengine_alloc_frames",
         "copyengine_migration_event")


class _Hostile:
    """Armed or not; counts how often it misbehaved (``fired``)."""

    def __init__(self, armed=False):
        self.armed = armed
        self.fired = 0

    def arm(self):
        self.armed = True
        return self

    def disarm(self):
        self.armed = False

    def _fire(self) -> bool:
        if self.armed:
            self.fired += 1
        return self.armed

    def __repr__(self):
        extra = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k not in ("armed", "fired"))
        return f"{type(self).__name__}({extra})"


class Raiser(_Hostile):
    """Raise ``exc`` (an exception class or instance; ``KeyboardInterrupt`` too) at
    ``hook`` (one of :data:`HOOKS`) while armed."""

    def __init__(self, hook, exc=RuntimeError, armed=False):
        if hook not in HOOKS:
            raise ValueError(f"hook must be one of {HOOKS}, got {hook!r}")
        super().__init__(armed)
        self.hook, self.exc = hook, exc

    def _maybe_raise(self, hook):
        if hook == self.hook and self._fire():
            exc = self.exc
            raise exc(f"hostile plugin raised in {hook}") if isinstance(exc, type) else exc

    @hookimpl(tryfirst=True)
    def copyengine_batch_copy(self, machine, engine, job):
        self._maybe_raise("copyengine_batch_copy")

    @hookimpl(tryfirst=True)
    def copyengine_select_engine(self, machine, batch, engine):
        self._maybe_raise("copyengine_select_engine")

    @hookimpl(tryfirst=True)
    def copyengine_alloc_frames(self, machine, node, order, count):
        self._maybe_raise("copyengine_alloc_frames")

    @hookimpl
    def copyengine_migration_event(self, machine, event, info):
        self._maybe_raise("copyengine_migration_event")


#: what BadResult returns, by kind: a function of the job
BAD_RESULTS = {
    "str": lambda job: "ok",
    "int": lambda job: 0,
    "short": lambda job: np.zeros(max(job.nr_folios - 1, 0), np.int32) if job.nr_folios > 1 else [0, 0],
    "long": lambda job: np.zeros(job.nr_folios + 1, np.int32),
    "2d": lambda job: np.zeros((job.nr_folios, 1), np.int32),
    "float": lambda job: np.zeros(job.nr_folios, np.float64),
    "bool": lambda job: np.zeros(job.nr_folios, bool),
    "wrap32": lambda job: np.full(job.nr_folios, 1 << 32, np.int64),
    "positive": lambda job: np.ones(job.nr_folios, np.int32),
    "errno_range": lambda job: np.full(job.nr_folios, -5000, np.int32),
    "list_of_none": lambda job: [None] * job.nr_folios,
    "list_wrong_len": lambda job: [0] * (job.nr_folios + 2),
}


class BadResult(_Hostile):
    """``copyengine_batch_copy`` copies nothing and returns a malformed result
    (:data:`BAD_RESULTS`): the framework must refuse it and copy on the CPU, or fail
    the call after settling the batch."""

    def __init__(self, kind="wrap32", armed=False):
        if kind not in BAD_RESULTS:
            raise ValueError(f"kind must be one of {sorted(BAD_RESULTS)}, got {kind!r}")
        super().__init__(armed)
        self.kind = kind

    @hookimpl(tryfirst=True)
    def copyengine_batch_copy(self, machine, engine, job):
        if self._fire():
            return BAD_RESULTS[self.kind](job)
        return None


class BadSelect(_Hostile):
    """``copyengine_select_engine`` returns ``value`` (default a string) while armed."""

    def __init__(self, value="serial", armed=False):
        super().__init__(armed)
        self.value = value

    @hookimpl(tryfirst=True)
    def copyengine_select_engine(self, machine, batch, engine):
        return self.value if self._fire() else None


class CorruptJob(_Hostile):
    """Edits the job - every destination pointed at the first one, sources poisoned
    flags cleared - then declines (returns None), so the next implementation copies.
    ``wrote`` counts the edits the arrays let through (they should be read-only)."""

    def __init__(self, armed=False):
        super().__init__(armed)
        self.wrote = 0

    @hookimpl(tryfirst=True)
    def copyengine_batch_copy(self, machine, engine, job):
        if not self._fire() or not len(job.dst_off):
            return None
        for arr, val in ((job.dst_off, int(job.dst_off[0])), (job.src_off, 0), (job.src_poisoned, False)):
            try:
                arr[...] = val
                self.wrote += 1
            except (ValueError, TypeError):
                try:  # a determined plugin: make it writable again
                    arr.setflags(write=True)
                    arr[...] = val
                    self.wrote += 1
                except (ValueError, TypeError):
                    pass
        return None


class ZeroPageWriter(_Hostile):
    """Writes ``SCRIBBLE`` over the shared zero page, then lets the engine copy: a
    never-written page must still read back zeros afterwards."""

    @hookimpl(tryfirst=True)
    def copyengine_batch_copy(self, machine, engine, job):
        if self._fire():
            ps = machine.page_size
            job.mem[machine.zero_pfn * ps:(machine.zero_pfn + 1) * ps] = SCRIBBLE
        return None


#: what BadFrames hands out in place of the last head, by kind
BAD_FRAME_KINDS = ("zero", "twice", "range", "negative", "inuse", "huge")


class BadFrames(_Hostile):
    """``copyengine_alloc_frames``: takes ``count - 1`` blocks from the buddy allocator
    and adds one bad head (:data:`BAD_FRAME_KINDS`): the zero page, a head twice, a pfn
    outside the node, a negative one, a frame in use, 2**62. The machine must refuse the
    lot (PluginError), give back what was taken, and never index memory with it."""

    def __init__(self, kind="zero", armed=False):
        if kind not in BAD_FRAME_KINDS:
            raise ValueError(f"kind must be one of {BAD_FRAME_KINDS}, got {kind!r}")
        super().__init__(armed)
        self.kind = kind

    @hookimpl(tryfirst=True)
    def copyengine_alloc_frames(self, machine, node, order, count):
        if not self._fire():
            return None
        got = machine.buddy.alloc(node, order, max(count - 1, 0))
        if self.kind == "twice" and len(got):
            bad = got[0]
        elif self.kind == "inuse":
            used = np.nonzero(machine.mem_map.flags & np.uint32(1 << 8))[0]
            bad = used[-1] if len(used) else machine.zero_pfn
        else:
            bad = {"zero": machine.zero_pfn, "range": machine.total_frames + 7, "negative": -1,
                   "huge": 1 << 62, "twice": machine.zero_pfn}[self.kind]
        return np.r_[got, np.int64(bad)].astype(np.int64)


# --------------------------------------------------------------------------- engines
class _LateCompletion(Completion):
    """Copies after ``delay`` seconds whatever happens; a cancel cannot stop it. After
    a cancel it writes SCRIBBLE instead (the worst a late DMA can do), then retires."""

    def __init__(self, job, delay):
        super().__init__(job.nr_folios)
        self.job, self.delay = job, delay
        self._go = threading.Event()
        threading.Thread(target=self._run, name="copyengine-hostile-late", daemon=True).start()

    def _run(self):
        self._go.wait(self.delay)
        job = self.job
        cancelled = self.cancelled
        for s, d, n, f in zip(job.src_off.tolist(), job.dst_off.tolist(), job.nbytes.tolist(),
                              job.folio.tolist()):
            if job.src_poisoned[f]:
                continue
            if cancelled:
                job.mem[d:d + n] = SCRIBBLE
            else:
                job.mem[d:d + n] = job.mem[s:s + n]
        if cancelled:
            self.retire()
            return
        self.complete(np.nonzero(~np.asarray(job.src_poisoned))[0], 0)
        self.complete(np.nonzero(np.asarray(job.src_poisoned))[0], -133)
        self.finish()

    def _cancel(self):
        return False   # "it may still write": the framework must quarantine


class LateEngine(Engine):
    """``hostile-late[:MS]``: asynchronous; writes its destinations ``MS`` milliseconds
    (default 200) after submit whatever happens - garbage if it was cancelled meanwhile -
    and only then retires. Use it with a ``copy_timeout`` below ``MS``."""
    capabilities = Capabilities(asynchronous=True, threads=1, channels=1, mc_safe=True)

    def __init__(self, delay=0.2):
        self.delay = delay
        self.name = "hostile-late"

    def submit(self, job):
        return _LateCompletion(job, self.delay)


class _ForeverCompletion(Completion):
    def _cancel(self):
        return True    # nothing was ever started: nothing writes


class HangForeverEngine(Engine):
    """``hostile-hang``: asynchronous; never completes a folio, never calls finish()."""
    capabilities = Capabilities(asynchronous=True, threads=1, channels=1, mc_safe=True)

    def __init__(self):
        self.name = "hostile-hang"

    def submit(self, job):
        return _ForeverCompletion(job.nr_folios)


def _ms(arg):
    if arg is None:
        return 0.2
    try:
        ms = int(arg)
    except ValueError:
        raise ValueError(f"hostile-late:MS takes milliseconds, got {arg!r}") from None
    if not 0 <= ms <= 10_000:
        raise ValueError(f"hostile-late:MS must be in 0..10000, got {ms}")
    return ms / 1000


@hookimpl
def copyengine_register_engines(register):
    register("hostile-late", lambda arg, m: LateEngine(_ms(arg)),
             "test: asynchronous, cannot be cancelled, writes garbage after a timeout (hostile-late:MS)")
    register("hostile-hang", lambda arg, m: HangForeverEngine(),
             "test: asynchronous, never completes (stops at cancel)")


# --------------------------------------------------------------------------- suites
def hostile_plugins(exceptions=(RuntimeError, KeyboardInterrupt)) -> dict:
    """One disarmed instance of every hostile plugin, by a short label."""
    out = {}
    for hook in HOOKS:
        for exc in exceptions:
            out[f"raise-{exc.__name__}-{hook.removeprefix('copyengine_')}"] = Raiser(hook, exc)
    for kind in BAD_RESULTS:
        out[f"result-{kind}"] = BadResult(kind)
    for label, value in (("str", "serial"), ("int", 3), ("class", Engine)):
        out[f"select-{label}"] = BadSelect(value)
    out["corrupt-job"] = CorruptJob()
    out["zero-page"] = ZeroPageWriter()
    for kind in BAD_FRAME_KINDS:
        out[f"frames-{kind}"] = BadFrames(kind)
    return out


def plugin_manager(hostile: dict, plugins=(), entry_points=False):
    """A plugin manager with this module's engines, the test engines, ``plugins`` and
    every plugin of ``hostile`` registered as ``hostile-LABEL`` (all disarmed)."""
    import sys

    from ..plugins import make_plugin_manager
    from . import engines as test_engines
    pm = make_plugin_manager(entry_points=entry_points,
                             plugins=[sys.modules[__name__], test_engines, *plugins])
    for label, plugin in hostile.items():  # named, so that errors say which one
        pm.register(plugin, name=f"hostile-{label}")
    return pm


def check_engine_survives(spec, *, plugins=(), entry_points=True, labels=None, rounds=2,
                          copy_timeout=0.05, node_size="8MiB") -> dict:
    """Run the hostile suite around migrations that use the engine ``spec``: for each
    hostile plugin (``labels``: a subset of :func:`hostile_plugins`' labels), arm it,
    move pages back and forth ``rounds`` times, and check after every call - whether it
    returned or raised - that every byte reads back as written and ``check_machine``
    holds. Returns ``{label: "passed (fired N[, raised X])"}`` (N: how often the plugin
    misbehaved; 0 means the engine's path never reached its hook); raises AssertionError
    (``InvariantError`` or a data mismatch) naming the plugin at the first loss. The
    batches are at least the engine's ``min_bytes`` (smaller ones never reach it), and
    the nodes are grown from ``node_size`` to hold them."""
    import copyengine as ce
    hostile = hostile_plugins()
    if labels is not None:
        unknown = set(labels) - set(hostile)
        if unknown:
            raise ValueError(f"unknown hostile plugin(s) {sorted(unknown)}; known: {sorted(hostile)}")
        hostile = {k: hostile[k] for k in labels}
    pm = plugin_manager(hostile, plugins, entry_points)
    report = {}
    from ..units import parse_size
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=pm, engine=spec) as probe:
        min_bytes = probe.engine.capabilities.min_bytes   # below it the engine is never asked
    nbytes = max(8 * 4096, -(-min_bytes // 4096) * 4096)
    node_size = max(parse_size(node_size, "node_size"), -(-(nbytes + (4 << 20)) // (2 << 20)) * (2 << 20))
    with ce.Machine(nodes=2, node_size=node_size, plugin_manager=pm, engine=spec) as m:
        m.settings["copy_timeout"] = copy_timeout
        rng = np.random.default_rng(0)
        p = m.spawn()
        shadow = ShadowMemory(m)
        shadow.spawn(p)
        npages = nbytes // m.page_size
        if npages > m.settings["nr_max_batched_migration"]:   # one batch, so min_bytes is met
            m.settings["nr_max_batched_migration"] = npages
        a = p.mmap(npages * m.page_size)
        shadow.mmap(p, a, npages * m.page_size, False)
        untouched = p.mmap(m.page_size, populate=False)   # reads the zero page
        shadow.mmap(p, untouched, m.page_size, False)
        for label, plugin in hostile.items():
            data = rng.integers(0, 256, npages * m.page_size, dtype=np.uint8).tobytes()
            p.write(a, data)
            shadow.write(p, a, data)
            raised = []
            for r in range(rounds):
                pages = [a + i * m.page_size for i in range(npages)]
                plugin.arm()
                try:
                    p.move_pages(0, pages, [(r + 1) % 2] * npages)
                except BaseException as e:   # KeyboardInterrupt from a Raiser too
                    raised.append(type(e).__name__)
                finally:
                    plugin.disarm()
                try:
                    check_machine(m, shadow)
                    got = p.read(a, len(data))
                    if got != data:
                        raise AssertionError("migrated bytes differ from those written")
                    if p.read(untouched, 16) != bytes(16):
                        raise AssertionError("a never-written page no longer reads zeros")
                except AssertionError as e:
                    raise AssertionError(f"engine {spec!r} with hostile plugin {label} "
                                         f"(round {r}): {e}") from e
            how = f"fired {plugin.fired}" + (f", raised {', '.join(sorted(set(raised)))}" if raised else "")
            report[label] = f"passed ({how})"
    return report
