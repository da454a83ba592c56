"""Built-in implementations of the framework hooks: allocation and engine dispatch.

They are registered like any plugin (name ``core``) and marked ``trylast`` so that every
other plugin's implementation runs first and may wrap or replace them.
"""
from __future__ import annotations

import errno

import numpy as np

from .engines.base import PENDING
from .hookspecs import hookimpl


@hookimpl(trylast=True)
def copyengine_alloc_frames(machine, node, order, count):
    return machine.buddy.alloc(node, order, count)


@hookimpl(trylast=True)
def copyengine_batch_copy(machine, engine, job):
    if not engine.capabilities.asynchronous:
        return engine.copy(job)
    completion = engine.submit(job)
    result = completion.wait(machine.settings["copy_timeout"])
    if result is None:
        # dmaengine_terminate_sync: after cancel() nothing may write; what completed stays.
        completion.cancel()
        result = completion.result.copy()
    return np.where(result == PENDING, -errno.ETIMEDOUT, result).astype(np.int32)
