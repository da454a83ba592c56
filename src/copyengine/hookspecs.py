"""Hook specifications: the contract between copyengine and its plugins.

A plugin is any object or module with functions marked ``@copyengine.hookimpl`` whose
names match the specifications below. Built-in engines are plugins like any other: they
live in :mod:`copyengine.engines` and register through these same hooks. Third-party
packages announce theirs through the entry-point group ``copyengine``.

Every hook receives keyword arguments; an implementation may accept any subset of them.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("copyengine")
hookimpl = pluggy.HookimplMarker("copyengine")


@hookspec
def copyengine_register_engines(register):
    """Register copy engines.

    Call ``register(name, factory, description="")`` once per engine. ``name`` is the spec
    prefix (``"mt"`` for ``"mt:4"``); ``factory(arg, machine)`` receives the text after the
    colon (or None) and the machine, and returns an :class:`copyengine.engines.Engine`. It
    raises ValueError for a bad argument and :class:`copyengine.EngineUnavailable` when
    the engine cannot run here (say why). Names never contain ``:`` or ``,``.
    """


@hookspec(firstresult=True)
def copyengine_select_engine(machine, batch, engine):
    """Choose the engine for one batch copy (policy plugins).

    ``batch`` is a :class:`copyengine.migrate.BatchInfo` (folio count, bytes, orders);
    ``engine`` is the machine's configured engine. Return an Engine to use instead, or
    None to let the next implementation (and finally the configured engine) decide.
    The first non-None result wins.
    """


@hookspec(firstresult=True)
def copyengine_batch_copy(machine, engine, job):
    """Copy one batch: return an int32 array with one entry per folio (0 or -errno).

    The built-in implementation runs ``engine`` on ``job`` (a
    :class:`copyengine.engines.CopyJob`), synchronously or through its asynchronous
    completion with the machine's ``copy_timeout``. Wrap it (``@hookimpl(wrapper=True)``)
    to trace, count, inject faults or fall back; return a result early to replace the
    engine. Folios not reported 0 are copied again with ``folio_mc_copy``.
    """


@hookspec(firstresult=True)
def copyengine_alloc_frames(machine, node, order, count):
    """Allocate ``count`` folios of ``order`` on ``node``: return an int64 array of head pfns.

    Returning fewer than ``count`` means the node could not supply them (ENOMEM); the
    caller frees what it got. The built-in implementation is the buddy allocator; a
    fault-injection plugin returns an empty array (or fewer heads) to make allocation fail
    without touching the allocator.
    """


@hookspec
def copyengine_migration_event(machine, event, info):
    """Observe migration, like a tracepoint. Return values are ignored.

    ``event`` is one of ``"batch_start"``, ``"batch_copy"``, ``"batch_end"``,
    ``"folio_fail"``; ``info`` is a dict whose arrays must not be modified.
    """
