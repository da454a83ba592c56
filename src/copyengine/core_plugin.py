"""Built-in implementations of the framework hooks: allocation and engine dispatch.

They are registered like any plugin (name ``core``) and marked ``trylast`` so that every
other plugin's implementation runs first and may wrap or replace them.
"""
from __future__ import annotations

from .engines.base import run_engine
from .hookspecs import hookimpl


@hookimpl(trylast=True)
def copyengine_alloc_frames(machine, node, order, count):
    return machine.buddy.alloc(node, order, count)


@hookimpl(trylast=True)
def copyengine_batch_copy(machine, engine, job):
    return run_engine(engine, job, machine.settings["copy_timeout"])
