"""Checks on what plugins hand back (placeholder written by the lead so that migrate/ can
import it; the plugin-boundary engineer owns this module and may replace it whole,
keeping check_status and check_selected_engine with these signatures)."""
from __future__ import annotations

import numpy as np

from .engines.base import Engine
from .errors import PluginError


def check_status(result, nr_folios, engine_name) -> np.ndarray:
    """An engine's per-folio result: nr_folios ints, each 0 or -errno (-4095..-1)."""
    if isinstance(result, np.ndarray):
        arr = result
    elif isinstance(result, (list, tuple)):
        if not all(isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in result):
            raise PluginError(f"engine {engine_name} returned a result holding non-integers")
        arr = np.array(result, dtype=np.int64) if result else np.empty(0, np.int64)
    else:
        raise PluginError(f"engine {engine_name} returned {type(result).__name__}, "
                          f"expected an int32 array of {nr_folios} statuses")
    if arr.dtype.kind not in "iu" or arr.shape != (nr_folios,):
        raise PluginError(f"engine {engine_name} returned {arr.dtype}{arr.shape}, "
                          f"expected int32[{nr_folios}]")
    if len(arr) and (int(arr.max()) > 0 or int(arr.min()) < -4095):
        raise PluginError(f"engine {engine_name} returned statuses outside 0 and -4095..-1")
    return arr.astype(np.int32)


def check_selected_engine(obj, plugin):
    """What copyengine_select_engine returned: None or an Engine."""
    if obj is None or isinstance(obj, Engine):
        return obj
    raise PluginError(f"copyengine_select_engine ({plugin}) returned {type(obj).__name__}, "
                      "not an Engine or None")
