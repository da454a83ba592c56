"""The CPU engines of mainline: ``serial`` (batched folio_mc_copy) and ``vanilla``.

``vanilla`` is the flow before the series: each folio is copied inside its own move step
(migrate_folio_move -> move_to_new_folio -> folio_mc_copy). ``serial`` is the series'
single-threaded batched copy: the whole batch is copied in one call after every folio's
metadata moved (MIGRATE_NO_COPY). Both use the same folio_mc_copy.
"""
from __future__ import annotations

import numpy as np

from ..hookspecs import hookimpl
from .base import Capabilities, Engine, folio_mc_copy


class SerialEngine(Engine):
    capabilities = Capabilities(threads=1)
    batched = True

    def copy(self, job):
        return folio_mc_copy(job, np.arange(job.nr_folios))


class VanillaEngine(SerialEngine):
    """Not batched: the state machine copies each folio inside its move step."""
    batched = False


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
