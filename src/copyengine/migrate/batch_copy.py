"""The batch copy step (migrate_folios_batch_copy): the job an engine gets, the policy
hook that may pick another engine, the copy hook, the checks on what came back, and the
CPU fallback (folio_mc_copy) for every folio the engine did not copy.

Everything an engine returns is checked (``hookcheck``); the job it gets is read-only and
never read back; a zero page it wrote is restored; a job it may still write after its
cancel has its destinations quarantined (``quarantine``).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

from ..engines.base import CopyJob, CopyStillRunning, run_engine
from ..engines.memops import NT_BYTES
from ..engines.serial import SerialEngine
from ..errors import PluginError
from ..hookcheck import check_selected_engine, check_status, hook_plugins
from ..uapi import MR_SYSCALL
from . import kernels
from .dispatch import Dispatch


@dataclass(frozen=True)
class BatchInfo:
    """What a policy sees of a batch before its copy (copyengine_select_engine)."""
    nr_folios: int
    nr_bytes: int
    orders: np.ndarray
    page_size: int
    target: int
    reason: int = MR_SYSCALL  # enum migrate_reason (copyengine.uapi.MR_*)


def build_copy_job(b, sel) -> CopyJob:
    """The scatter-gather list of a batch: one descriptor per folio, over physical memory.
    Its arrays are read-only, and the framework never reads them back: the CPU fallback
    copies from the batch's own frame numbers."""
    m = b.m
    mm = m.mem_map
    ps = m.page_size
    src, dst, nr = b.src[sel], b.dst[sel], b.nr[sel]
    poisoned = np.empty(len(sel), np.bool_)
    kernels.folios_poisoned(sel, b.src, b.nr, mm.flags, poisoned)
    job = CopyJob(m.mem, _frozen(src * ps), _frozen(dst * ps), _frozen(nr * ps),
                  _frozen(np.arange(len(sel), dtype=np.int64)), _frozen(poisoned))
    job.stream = b.stream
    return job


def _frozen(a: np.ndarray) -> np.ndarray:
    """A read-only copy over immutable bytes: unlike a read-only flag on an array that
    owns its data, no ``setflags(write=True)`` can make it writable again."""
    return np.frombuffer(a.tobytes(), dtype=a.dtype)


def select_copy_engine(b, sel, d: Dispatch):
    """copyengine_select_engine: a policy plugin may pick another engine for this batch.
    What it returns is checked (an Engine or None), naming the plugin otherwise. A batch
    whose migration reason is outside the ``offload_reasons`` setting is copied by the CPU
    (``serial``) whatever the engine or policy."""
    if not len(sel):
        return d.engine
    m = b.m
    if not (m.settings["offload_reasons"] >> d.reason) & 1:
        cpu = SerialEngine()  # this reason may not offload: the CPU copies, as before the series
        cpu.name = "serial"
        return cpu
    if not d.select:
        return d.engine
    hook = m.pm.hook.copyengine_select_engine
    info = BatchInfo(len(sel), int(b.nr[sel].sum()) * m.page_size, b.order[sel], m.page_size, b.target,
                     d.reason)
    chosen = check_selected_engine(hook(machine=m, batch=info, engine=d.engine), hook_plugins(hook))
    return chosen or d.engine


def _engine_copy(b, part, engine, d) -> np.ndarray:
    """One job through the copy hook (or straight to the engine when nothing wraps it).
    Returns the checked per-folio result. An engine that raises or returns garbage has
    every folio of the job copied again on the CPU (event ``engine_error``); one that may
    still write after its cancel has the job's destinations quarantined and its folios
    retried later with fresh ones (-EAGAIN)."""
    m = b.m
    job = build_copy_job(b, part)
    rec = m.recorder
    if rec is not None:
        job.spans = []  # the engine may put its workers' or channels' slices here
    try:
        if d.direct_copy:
            res = run_engine(engine, job, m.settings["copy_timeout"])
        else:
            res = m.pm.hook.copyengine_batch_copy(machine=m, engine=engine, job=job)
        if rec is not None:
            rec.copy_spans(engine.name, job.spans)
        return check_status(res, len(part), engine.name)
    except CopyStillRunning as e:
        b.stray[part] = True
        b.stragglers.append((e.completion, part))
        _engine_error(d, engine, e)
        if e.__cause__ is not None and not isinstance(e.__cause__, Exception):
            raise e.__cause__  # an interrupt: settled by the caller, then propagated
        return np.full(len(part), -errno.EAGAIN, np.int32)
    except Exception as e:  # an engine that breaks must not lose the batch: CPU copies all
        _engine_error(d, engine, e)
        return np.full(len(part), -errno.EIO, np.int32)


def _engine_error(d, engine, e):
    d.m.count("copy_engine_errors")
    d.event("engine_error", engine=engine.name, error=f"{type(e).__name__}: {e}")


def _zero_page_intact(b, engine, d) -> bool:
    """The zero page must read as zeros: an engine that wrote it is caught here (one page
    to compare) and the page is cleared again."""
    m = b.m
    zp = m.zero_pfn * m.page_size
    page = m.mem[zp:zp + m.page_size]
    if not page.any():
        return True
    page[:] = 0
    _engine_error(d, engine, PluginError(f"engine {engine.name} wrote the zero page "
                                         f"(frame {m.zero_pfn}); restored, its batch copied again"))
    return False


def migrate_folios_batch_copy(b, sel, engine, dispatch=None) -> None:
    """Copy the data of every folio in ``sel`` through the copy hook (one job, or jobs of
    at most ``max_batch`` folios; none below ``min_bytes``: the engine declines those by
    its own account), then folio_mc_copy each folio the engine did not report copied.
    Runs without the machine lock: accesses to these folios wait on their migration
    entries meanwhile."""
    m = b.m
    if not len(sel):
        return
    d = dispatch or Dispatch(m, engine)
    caps = engine.capabilities
    nbytes = int(b.nr[sel].sum()) * m.page_size
    res = np.full(len(sel), -errno.EOPNOTSUPP, np.int32)
    offload = nbytes >= caps.min_bytes
    if offload:
        step = caps.max_batch if caps.max_batch > 0 else len(sel)
        for lo in range(0, len(sel), step):
            res[lo:lo + step] = _engine_copy(b, sel[lo:lo + step], engine, d)
        if not _zero_page_intact(b, engine, d):
            res[res == 0] = -errno.EIO
    stray = b.stray[sel]
    redo = sel[(res != 0) & ~stray]
    b.rc[sel] = np.where(stray, -errno.EAGAIN, res)
    b.copied[sel] = res == 0
    if len(redo):
        # below min_bytes the CPU copies by design; otherwise the engine left these folios
        m.count("copy_fallback_folios" if offload else "copy_below_min_bytes_folios", len(redo))
        mm = m.mem_map
        kernels.folio_copy(redo, b.src, b.dst, b.nr, mm.flags, m.mem, m.page_size,
                           b.stream or nbytes >= NT_BYTES, b.rc, b.copied)
    if d.events:
        d.event("batch_copy", engine=engine.name, folios=len(sel), bytes=nbytes, fallback=len(redo))
