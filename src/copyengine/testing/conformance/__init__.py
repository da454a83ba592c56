"""The engine conformance kit: the checks every copy engine must pass.

Use it from pytest with one class::

    from copyengine.testing import EngineConformance

    class TestMyEngine(EngineConformance):
        engine_spec = "mydma:2"            # any spec the plugin manager knows
        # plugins = ["mydma.plugin"]       # register plugins not installed as entry points
        # engine_factory = staticmethod(lambda machine: MyEngine())   # instead of a spec
        # granule = 8          # descriptors are multiples of this many bytes (1: any byte)
        # may_decline = False  # True: clean folios may report an errno (CPU fallback)
        # force_path = staticmethod(lambda engine, path: ...)  # "small" / "large" knob

or without pytest: ``check_engine("mydma:2")`` runs every check and raises
:class:`ConformanceError` (an AssertionError) at the first violation.

What is checked (each a ``test_*`` method, each also a ``check_*`` function here):

* ``test_capabilities`` — capabilities are a :class:`Capabilities` with sane values,
  ``describe()`` is a JSON-able dict, ``close()`` may be called twice.
* ``test_empty_job`` — a job with no folios returns an empty int32 result.
* ``test_random_jobs`` — hypothesis draws folio counts and sizes (4 KiB .. 2 MiB),
  places sources and destinations at random, cuts folios into several descriptors (at
  ``granule`` multiples, sometimes in shuffled order) and poisons a few sources. The
  result must be an int32 array with one entry per folio, every entry 0 or a negative
  errno; a folio reported 0 has every destination byte equal to its source; a clean folio
  reports 0 (unless ``may_decline``); not one byte outside the destinations changes (not
  even a source); after the framework's ``folio_mc_copy`` fallback every clean folio is
  intact. For asynchronous engines the kit polls the completion while it runs: any folio
  reported 0, in whatever order, must already be complete.
* ``test_poisoned_folio`` — one poisoned source among clean folios fails only its folio:
  a machine-check-safe engine (``capabilities.mc_safe``) reports -EHWPOISON and leaves
  that destination untouched (it must never read the source); an engine that is not
  mc-safe reports -EIO (or -EHWPOISON) and may have written that destination; the
  fallback then reports -EHWPOISON.
* ``test_framework_path`` — the same jobs through the ``copyengine_batch_copy`` hook (the
  path the migration state machine takes), then the fallback.
* ``test_concurrent_jobs`` — two threads copy disjoint jobs with the same engine at once.
* ``test_cancel_no_write`` (asynchronous engines) — ``cancel()`` at various moments
  returns promptly; afterwards no byte of memory and no result entry changes; folios
  reported 0 before it are complete.
* ``test_timeout`` (asynchronous engines) — ``wait`` with a tiny timeout returns None or
  the result; on None the kit cancels as the framework would; the framework path with a
  tiny ``copy_timeout`` still yields intact folios after the fallback.
* ``test_small_and_large_paths`` — the same random layouts as a small job and as a large
  one (padded with filler folios, or through the engine's ``force_path`` knob) give
  identical per-folio statuses and identical bytes: an engine's fast small-job path and its
  large-job path must plan alike (:mod:`.paths`).

An engine that raises :class:`copyengine.EngineUnavailable` here (no device on this host)
makes every check of the class skip, with the reason (``skip_unavailable = False`` makes
them fail instead); ``check_engine`` lets the exception through.

Jobs are built over the memory of a small :class:`copyengine.Machine` (2 nodes of 4 MiB;
of 8 MiB for ``test_small_and_large_paths``, whose filler lies in the upper half) that the
kit creates with the chosen plugins, so engines see the real ``job.mem`` shape.
Machine-check safety can only be observed through its effects: the kit cannot see reads,
so it checks that an mc-safe engine writes nothing of a poisoned folio.

The kit is a package, one module per part: :mod:`.layouts` (generated jobs), :mod:`.rules`
(what a finished job must satisfy, :class:`ConformanceError`), :mod:`.env` (options, the
kit machine, running a job), :mod:`.checks` (the checks above), :mod:`.paths` (small-job
against large-job path) and :mod:`.front` (:data:`CHECKS`, :func:`check_engine`,
:class:`EngineConformance`). Every name stays importable from here.
"""
from __future__ import annotations

from .checks import (_after_cancel, _cancel_checked, _cancel_layout, check_cancel_no_write,
                     check_capabilities, check_concurrent_jobs, check_empty_job,
                     check_framework_path, check_layout, check_poisoned_folio,
                     check_random_jobs, check_timeout)
from .env import Options, _hyp, _run_property, engine_env, run_engine
from .front import CHECKS, EngineConformance, check_engine
from .layouts import BUDGET, NODE_SIZE, PAGE, Layout, _place, fill, layouts
from .paths import check_paths, compare_paths, padded_job
from .rules import (MAX_ERRNO, ConformanceError, _check_fallback, _check_outcome,
                    _check_outside, _check_result, _fail, _folio_ok, _folio_untouched)

__all__ = [
    "BUDGET", "CHECKS", "ConformanceError", "EngineConformance", "Layout", "MAX_ERRNO",
    "NODE_SIZE", "Options", "PAGE", "check_cancel_no_write", "check_capabilities",
    "check_concurrent_jobs", "check_empty_job", "check_engine", "check_framework_path",
    "check_layout", "check_paths", "check_poisoned_folio", "check_random_jobs", "check_timeout",
    "compare_paths", "engine_env", "fill", "layouts", "padded_job", "run_engine",
    # private helpers of the single module this package replaced, kept importable
    "_after_cancel", "_cancel_checked", "_cancel_layout", "_check_fallback", "_check_outcome",
    "_check_outside", "_check_result", "_fail", "_folio_ok", "_folio_untouched", "_hyp",
    "_place", "_run_property",
]
