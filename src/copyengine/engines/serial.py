"""The CPU engines of mainline: ``serial`` (batched folio_mc_copy) and ``vanilla``.

``vanilla`` is the flow before the series: each folio is copied inside its own move step
(migrate_folio_move -> move_to_new_folio -> folio_mc_copy). ``serial`` is the series'
single-threaded batched copy: the whole batch is copied in one call after every folio's
metadata moved (MIGRATE_NO_COPY). Both copy one folio at a time with the same primitive
(folio_mc_copy over ``memops.copy``, non-temporal stores for batches of ``NT_BYTES`` and
more), so the bench compares copy scheduling, not two copy loops. The state machine runs
vanilla's move-then-copy loop in one compiled call per batch
(``migrate.kernels.vanilla_move_copy``); ``VanillaEngine.copy`` is what a
``copyengine_batch_copy`` wrapper reaches when it calls through.
"""
from __future__ import annotations

import time

import numpy as np

from ..hookspecs import hookimpl
from .base import Capabilities, Engine, folio_mc_copy


class SerialEngine(Engine):
    capabilities = Capabilities(threads=1)

    def copy(self, job):
        if job.spans is None:
            return folio_mc_copy(job, np.arange(job.nr_folios))
        t0 = time.perf_counter()  # a trace recorder is attached: the job is one "cpu" slice
        status = folio_mc_copy(job, np.arange(job.nr_folios))
        job.spans.append(("cpu", t0, time.perf_counter(), int(np.count_nonzero(status == 0))))
        return status


class VanillaEngine(SerialEngine):
    """Not batched: the state machine copies each folio inside its move step."""
    capabilities = Capabilities(threads=1, batched=False)


def _no_arg(cls, name):
    def factory(arg, machine):
        if arg is not None:
            raise ValueError(f"engine {name!r} takes no argument (got {arg!r})")
        return cls()
    return factory


@hookimpl
def copyengine_register_engines(register):
    register("serial", _no_arg(SerialEngine, "serial"),
             "batched folio_mc_copy on the calling CPU (the series, one thread)")
    register("vanilla", _no_arg(VanillaEngine, "vanilla"),
             "mainline before the series: each folio copied inside its own move step")
