"""Hook specifications: the contract between copyengine and its plugins.

This module is the engine author's manual. A plugin is any module, class or object with
functions marked ``@copyengine.hookimpl`` whose names match the specifications below.
Built-in engines are plugins like any other (:mod:`copyengine.engines.serial`,
:mod:`copyengine.engines.mt`) and register through these same hooks.

Writing a plugin
================

A minimal engine plugin (``mydma/plugin.py``)::

    import numpy as np
    import copyengine
    from copyengine.engines import Capabilities, Engine, folio_mc_copy

    class MyEngine(Engine):
        capabilities = Capabilities(threads=1, mc_safe=True)

        def copy(self, job):                         # job: copyengine.engines.CopyJob
            return folio_mc_copy(job, np.arange(job.nr_folios))   # one int32 per folio

    @copyengine.hookimpl
    def copyengine_register_engines(register):
        register("mydma", lambda arg, machine: MyEngine(), "my DMA engine")

and its announcement in ``pyproject.toml``::

    [project.entry-points.copyengine]
    mydma = "mydma.plugin"

After ``pip install``, ``copyengine engines`` lists ``mydma`` and ``Machine.set_engine("mydma")``
selects it. Check it with the conformance kit (:mod:`copyengine.testing`)::

    from copyengine.testing import EngineConformance
    class TestMyDma(EngineConformance):
        engine_spec = "mydma"

Loading rules (see :mod:`copyengine.plugins`): built-ins first, then entry points sorted by
name; ``COPYENGINE_PLUGINS`` allow-lists entry points, ``COPYENGINE_DISABLE_PLUGINS``
blocks plugins by name, ``COPYENGINE_TRACE_HOOKS=1`` traces every hook call to stderr. A
plugin that fails to import, implements an unknown ``copyengine_*`` hook, or raises in
``copyengine_register_engines`` is left out and listed by ``copyengine engines`` as failed.

Calling conventions
===================

* Every hook is called with keyword arguments; an implementation may accept any subset of
  them (pluggy passes only the names it declares), and new arguments may be added later.
* ``firstresult`` hooks stop at the first implementation returning something other than
  None. Implementations run last-registered first (so third-party plugins run before the
  built-ins); ``@hookimpl(tryfirst=True)`` / ``trylast=True`` change the order.
* To observe or alter another implementation's result, write a wrapper::

      @copyengine.hookimpl(wrapper=True)
      def copyengine_batch_copy(machine, engine, job):
          t0 = time.perf_counter()
          result = yield              # the result of the implementations below
          stats.append(time.perf_counter() - t0)
          return result

  (old-style ``hookwrapper=True`` works too.)
* Hooks may be called from several threads at once (concurrent migrations); keep plugin
  state thread-safe.

The engine protocol
===================

See :mod:`copyengine.engines.base` for the classes. In short: an :class:`~copyengine.engines.Engine`
has ``capabilities`` (a :class:`~copyengine.engines.Capabilities`) and either ``copy(job)``
(synchronous: return the per-folio int32 result) or ``submit(job)`` (asynchronous: return a
:class:`~copyengine.engines.Completion` that fills ``result`` as folios finish, in any
order, and calls ``finish()`` once all have an outcome). A job's arrays are read-only to
the engine; it may write only the bytes its descriptors name as destinations.

Results: 0 when every byte of the folio was copied, else a negative errno. The framework
copies every folio not reported 0 again with ``folio_mc_copy``, so declining a folio (say,
``-EOPNOTSUPP``) is always safe. Poisoned sources (``job.src_poisoned[f]``): a
machine-check-safe engine (``capabilities.mc_safe``) never reads the folio and reports
``-EHWPOISON``; an engine that is not mc-safe reports ``-EIO`` (it may have written
garbage to that destination) and the framework's ``folio_mc_copy`` then reports
-EHWPOISON. An asynchronous engine's ``Completion._cancel()`` returns True once nothing
writes any more, or False (then it calls ``Completion.retire()`` after its last write,
and the framework keeps the job's destinations quarantined until then).

What the framework checks
=========================

Every hook result is checked in one place (:mod:`copyengine.hookcheck`) and a violation
is a :class:`copyengine.errors.PluginError` naming the plugin: an engine's result (one
integer per folio, 0 or -errno; otherwise the job is copied on the CPU and an
``engine_error`` event says why), a policy's choice (an Engine or None), allocated frames
(free blocks of the node, never the zero page, never twice). Whatever a hook raises --
KeyboardInterrupt included -- every batch that started is finalized or undone, every
folio not migrated is put back, and only then does the exception propagate. The job's
arrays are read-only; an engine that writes the zero page is caught and the page
restored; ``Capabilities.max_batch`` and ``min_bytes`` are enforced by the dispatcher.

When no plugin implements a hook beyond the built-ins, a move_pages() call of private
pages of one mapping to one node takes a cheap path (:mod:`copyengine.migrate.fastpath`)
that calls no hook at all; implementing any of ``copyengine_alloc_frames``,
``copyengine_batch_copy``, ``copyengine_select_engine`` or ``copyengine_migration_event``
makes every call visible to it.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("copyengine")
hookimpl = pluggy.HookimplMarker("copyengine")


@hookspec
def copyengine_register_engines(register):
    """Register copy engines. Called whenever the engine registry is built (when a
    machine selects an engine, when ``copyengine engines`` lists them): keep it cheap and
    free of side effects; probe hardware in the factory, not here.

    :param register: ``register(name, factory, description="")``, called once per engine.

        * ``name`` is the spec prefix (``"mt"`` for ``"mt:4"``): a non-empty string without
          whitespace, control characters, ``:``, ``,`` or ``|`` (``hookcheck.check_engine_name``). The first plugin to register a name wins (built-ins come
          first); a later claim is ignored and reported as a conflict.
        * ``factory(arg, machine)`` receives the text after the colon (``"4"`` for
          ``"mt:4"``, or None for ``"mt"``) and the :class:`copyengine.Machine`, and returns
          a new :class:`copyengine.engines.Engine`. It raises ``ValueError`` for a bad
          argument (naming the accepted ones) and :class:`copyengine.EngineUnavailable`
          when the engine cannot run here (say why: no device, missing library...). It is
          also called with ``arg=None`` on a tiny machine to list availability, so it
          should not start expensive work until the first copy.
        * ``description`` is one line for ``copyengine engines``.

    If this hook raises, the whole plugin is left out and listed as failed.
    """


@hookspec(firstresult=True)
def copyengine_select_engine(machine, batch, engine):
    """Choose the engine for one batch copy (policy plugins such as ``auto``).

    :param machine: the :class:`copyengine.Machine` migrating.
    :param batch: a :class:`copyengine.migrate.BatchInfo` (folio count, bytes, orders,
        target node, and ``reason``: the kernel's enum migrate_reason, copyengine.uapi.MR_*).
        A batch whose reason is outside the machine's ``offload_reasons`` setting is
        copied by the CPU without asking this hook.
    :param engine: the machine's configured :class:`~copyengine.engines.Engine`.
    :return: an Engine to use for this batch instead, or None to let the next
        implementation (and finally the configured engine) decide. The first non-None
        result wins. Return an engine you keep (and close) yourself; the framework does
        not close engines returned here.
    """


@hookspec(firstresult=True)
def copyengine_batch_copy(machine, engine, job):
    """Copy one batch: return an int32 array with one entry per folio (0 or -errno).

    The migration state machine calls this once per batch, after every folio's metadata
    moved (MIGRATE_NO_COPY), then copies every folio not reported 0 again with
    ``folio_mc_copy`` (-EHWPOISON undoes the folio).

    :param machine: the :class:`copyengine.Machine`.
    :param engine: the engine chosen for this batch (see ``copyengine_select_engine``).
    :param job: a :class:`copyengine.engines.CopyJob` (descriptors over ``machine.mem``).
    :return: int32 array of ``job.nr_folios`` entries.

    The built-in implementation (plugin ``core``, ``trylast``) runs ``engine.copy(job)``,
    or for an asynchronous engine ``submit``, then ``wait`` with the machine's
    ``copy_timeout`` setting, and on timeout ``cancel`` (folios not done report
    ``-ETIMEDOUT``). Wrap it (``@hookimpl(wrapper=True)``) to trace, count, inject faults
    or fall back; return a result from a plain implementation to replace the engine.
    """


@hookspec(firstresult=True)
def copyengine_alloc_frames(machine, node, order, count):
    """Allocate ``count`` folios of ``order`` on ``node``: return an int64 array of head pfns.

    :return: the head pfns; fewer than ``count`` means the node could not supply them
        (ENOMEM) and the caller frees what it got. None lets the next implementation
        decide (the built-in buddy allocator comes last).

    A fault-injection plugin returns an empty array (or fewer heads) to make allocation
    fail without touching the allocator.
    """


@hookspec
def copyengine_migration_event(machine, event, info):
    """Observe migration, like a tracepoint. Return values are ignored.

    :param event: one of ``"batch_start"``, ``"batch_copy"``, ``"batch_end"``,
        ``"folio_fail"``, ``"engine_error"`` (an engine raised, returned a bad result or
        wrote the zero page: the CPU copied the job), ``"mm_migrate_pages"`` (once per
        migrate_pages() call, the kernel tracepoint's fields: succeeded, failed,
        thp_succeeded, thp_failed, thp_split, large_folio_split, mode, reason),
        ``"engine_choice"`` (the ``auto`` engine's choice for a batch: engine, nbytes,
        reason, idle_cpus, cpus, predicted_us per candidate).
    :param info: a dict of details; its arrays must not be modified (copy what you keep).

    An observer that raises does not stop the migration: the exception propagates from
    the migrating call once its batches are settled.
    """
