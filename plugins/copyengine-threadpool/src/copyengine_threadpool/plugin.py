"""The plugin module named by this distribution's entry point (group ``copyengine``)::

    [project.entry-points.copyengine]
    threadpool = "copyengine_threadpool.plugin"

It registers two engines. The registration hook is cheap and has no side effects:
nothing starts until an engine copies its first multi-threaded batch.
"""
from __future__ import annotations

import copyengine

from .engine import make_pool, make_pool_async


@copyengine.hookimpl
def copyengine_register_engines(register):
    register("pool", make_pool,
             "NumPy thread pool (no Numba): pool:N threads (pool = every usable CPU), "
             "mc-safe; fewer folios than threads cuts folios into chunks")
    register("pool-async", make_pool_async,
             "asynchronous NumPy thread pool: pool-async:N threads, folios complete out of order")
