"""The rules a finished job must satisfy, and the error the kit raises when one is broken.

These are the engine protocol's promises (docs/plugins.md, 2.4) checked on memory and
result: one int32 status per folio, 0 or a negative errno; a folio reported 0 is entirely
copied; nothing outside the destinations changes; the machine-check rule for poisoned
sources (-EHWPOISON and untouched from an mc-safe engine, as ``copy_mc_to_kernel`` gives,
-EIO otherwise); and after the framework's ``folio_mc_copy`` fallback (mm/migrate.c) every
clean folio is intact.
"""
from __future__ import annotations

import errno

import numpy as np

from ...engines.base import PENDING, folio_mc_copy
from ...errors import EHWPOISON

MAX_ERRNO = 4095


class ConformanceError(AssertionError):
    """An engine broke the protocol; the message says how and where."""


def _fail(msg):
    raise ConformanceError(msg)


def _folio_ok(mem, job, f) -> bool:
    for i in np.nonzero(job.folio == f)[0]:
        s, d, n = int(job.src_off[i]), int(job.dst_off[i]), int(job.nbytes[i])
        if not np.array_equal(mem[s:s + n], mem[d:d + n]):
            return False
    return True


def _folio_untouched(mem, before, job, f) -> bool:
    for i in np.nonzero(job.folio == f)[0]:
        d, n = int(job.dst_off[i]), int(job.nbytes[i])
        if not np.array_equal(mem[d:d + n], before[d:d + n]):
            return False
    return True


def _check_result(result, job, what="result"):
    if not isinstance(result, np.ndarray):
        _fail(f"{what} is a {type(result).__name__}, not a numpy array")
    if result.dtype != np.int32 or result.shape != (job.nr_folios,):
        _fail(f"{what} must be int32 of shape ({job.nr_folios},), got {result.dtype} {result.shape}")
    bad = np.nonzero((result > 0) | (result < -MAX_ERRNO))[0]
    if len(bad):
        _fail(f"{what}[{bad[0]}] = {result[bad[0]]}: entries are 0 or a negative errno")


def _check_outside(mem, before, job, allowed_folios, ctx):
    """Nothing changed outside the destinations of ``allowed_folios``."""
    changed = np.flatnonzero(mem != before)
    if not len(changed):
        return
    allowed = np.zeros(len(mem), bool)
    ok = np.zeros(job.nr_folios, bool)
    ok[list(allowed_folios)] = True
    for d, n, f in zip(job.dst_off.tolist(), job.nbytes.tolist(), job.folio.tolist()):
        if ok[f]:
            allowed[d:d + n] = True
    stray = changed[~allowed[changed]]
    if len(stray):
        where = int(stray[0])
        _fail(f"{len(stray)} byte(s) written outside the destinations, first at offset {where} "
              f"(0x{where:x}); {ctx}")


def _check_outcome(mem, before, job, result, caps, may_decline, ctx, timed_out=False):
    """The per-folio rules on a finished result, then the fallback. ``may_decline``: any
    folio may report another errno (the CPU copies it); ``timed_out``: the framework
    cancelled the job, so any folio may report -ETIMEDOUT (never done)."""
    _check_result(result, job)
    if (result == PENDING).any():
        _fail(f"a finished job still reports -EINPROGRESS for folios "
              f"{np.nonzero(result == PENDING)[0].tolist()}; {ctx}")
    _check_outside(mem, before, job, range(job.nr_folios), ctx)
    for f in range(job.nr_folios):
        r = int(result[f])
        excused = r < 0 and (may_decline or (timed_out and r == -errno.ETIMEDOUT))
        if job.src_poisoned[f]:
            if caps.mc_safe:
                if r != -EHWPOISON and not excused:
                    _fail(f"folio {f} has a poisoned source: an mc-safe engine reports "
                          f"-EHWPOISON ({-EHWPOISON}), got {r}; {ctx}")
                if not _folio_untouched(mem, before, job, f):
                    _fail(f"folio {f} has a poisoned source, yet an mc-safe engine wrote its "
                          f"destination (it must never read that source); {ctx}")
            elif r not in (-errno.EIO, -EHWPOISON) and not excused:
                _fail(f"folio {f} has a poisoned source: an engine that is not mc-safe reports "
                      f"-EIO ({-errno.EIO}), got {r}; {ctx}")
        elif r == 0:
            if not _folio_ok(mem, job, f):
                _fail(f"folio {f} reported 0 but its destination differs from its source; {ctx}")
        elif not excused:
            _fail(f"clean folio {f} reported {r} ({errno.errorcode.get(-r, '?')}); set "
                  f"may_decline = True if the engine may leave folios to the CPU; {ctx}")
    _check_fallback(mem, job, result, ctx)


def _check_fallback(mem, job, result, ctx):
    """What the state machine does next: folio_mc_copy every folio not reported 0."""
    redo = np.nonzero(result != 0)[0]
    status = folio_mc_copy(job, redo) if len(redo) else np.zeros(0, np.int32)
    for f, s in zip(redo.tolist(), status.tolist()):
        want = -EHWPOISON if job.src_poisoned[f] else 0
        if s != want:
            _fail(f"fallback folio_mc_copy of folio {f} gave {s}, expected {want}; {ctx}")
    for f in range(job.nr_folios):
        if not job.src_poisoned[f] and not _folio_ok(mem, job, f):
            _fail(f"after the fallback, folio {f} is still not intact; {ctx}")
