"""Every hook result validated in one place (issue 14).

Plugins run inside the migration state machine; what they hand back is checked here,
before anything indexes with it, and a violation is a :class:`copyengine.errors.PluginError`
naming the plugin (or engine) and what was wrong. The kernel has no single equivalent: it
trusts its drivers, and a DMA driver that returns a bogus cookie or status gets a
``WARN_ON`` in dmaengine (``dma_async_is_tx_complete`` / ``dmaengine_tx_status``); a
simulator meant to run other people's code must be stricter than that.

* :func:`check_frames` - a ``copyengine_alloc_frames`` result (``get_new_folio``'s
  allocation: ``__alloc_pages`` returns a free block of the order asked for, or nothing).
* :func:`check_status` - an engine's per-folio result (``folio_mc_copy``'s return per folio).
* :func:`check_selected_engine` - a ``copyengine_select_engine`` result.
* :func:`check_engine_name` - a name given to ``register`` by ``copyengine_register_engines``.
"""
from __future__ import annotations

import numbers

import numpy as np

from .engines.base import Engine
from .errors import PluginError
from .mm.pageflags import PG_allocated, PG_hwpoison, PG_reserved

MAX_ERRNO = 4095  # include/linux/err.h: -4095..-1 are error codes

#: Characters an engine name may not hold: they separate specs and arguments
#: (``mt:4``, ``-e a,b``) or columns in ``copyengine engines`` output.
FORBIDDEN_NAME_CHARS = frozenset(",:|")


def plugin_label(impl) -> str:
    """A readable name for a hook implementation's plugin: its registered name, plus what
    it is when pluggy named it by id (a plugin object registered without a name)."""
    name, plugin = impl.plugin_name, impl.plugin
    if name.isdigit():
        kind = plugin.__name__ if isinstance(plugin, type) or hasattr(plugin, "__file__") \
            else type(plugin).__name__
        return f"{kind} (plugin {name})"
    return name


def hook_plugins(hook, skip=("core",)) -> str:
    """The plugins implementing ``hook`` (the built-in ``core`` left out), for messages."""
    names = [plugin_label(i) for i in hook.get_hookimpls() if i.plugin_name not in skip]
    return ", ".join(names) or "core"


def _int_array(obj, what):
    """``obj`` as a 1-D integer ndarray without wrapping; PluginError(what ...) otherwise.
    Accepts ndarrays of an integer dtype and lists/tuples of Python or NumPy ints."""
    if isinstance(obj, np.ndarray):
        arr = obj
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, numbers.Integral):
                raise PluginError(f"{what} holds {v!r} ({type(v).__name__}), not an int")
        try:
            arr = np.array([int(v) for v in obj], dtype=np.int64) if obj else np.empty(0, np.int64)
        except OverflowError:
            raise PluginError(f"{what} holds a value outside int64") from None
    else:
        raise PluginError(f"{what} is a {type(obj).__name__}, not an integer array")
    if arr.dtype.kind not in "iu":
        raise PluginError(f"{what} has dtype {arr.dtype}, not an integer dtype")
    if arr.ndim != 1:
        raise PluginError(f"{what} has shape {arr.shape}, not one dimension")
    return arr


def check_status(result, nr_folios, engine_name) -> np.ndarray:
    """An engine's per-folio result: exactly ``nr_folios`` ints, each 0 (copied) or a
    negative errno in -4095..-1; returned as a fresh int32 array. Values are compared
    before any narrowing, so an int64 2**32 (which would wrap to 0, "copied") is refused.
    Mirrors the per-folio return of ``folio_mc_copy`` in mm/migrate.c."""
    what = f"engine {engine_name!r} result"
    arr = _int_array(result, what)
    if len(arr) != nr_folios:
        raise PluginError(f"{what} has {len(arr)} entries for a batch of {nr_folios} folio(s)")
    if len(arr):
        hi, lo = arr.max(), arr.min()
        # Python ints: uint64 above 2**63 compares right, nothing wraps.
        if int(hi) > 0 or int(lo) < -MAX_ERRNO:
            bad = int(hi) if int(hi) > 0 else int(lo)
            raise PluginError(f"{what} holds {bad}: each entry must be 0 or -errno "
                              f"(-{MAX_ERRNO}..-1)")
    return arr.astype(np.int32)


def check_selected_engine(obj, plugin):
    """What ``copyengine_select_engine`` returned: None (keep the machine's engine) or a
    :class:`copyengine.engines.Engine`. ``plugin`` names the implementing plugin(s)."""
    if obj is None or isinstance(obj, Engine):
        return obj
    raise PluginError(f"copyengine_select_engine ({plugin}) returned {type(obj).__name__} "
                      f"{obj!r:.60}, not an Engine or None")


def check_engine_name(name) -> str:
    """A name passed to ``register()``: a non-empty str without whitespace, control
    characters (NUL included) or any of ``, : |``. Raises ValueError (a TypeError for a
    non-str): :mod:`copyengine.plugins` records the plugin as failed with that error."""
    if not isinstance(name, str):
        raise TypeError(f"bad engine name {name!r}: a str, not {type(name).__name__}")
    if not name:
        raise ValueError("bad engine name '': it must not be empty")
    for ch in name:
        if ch.isspace() or not ch.isprintable() or ch in FORBIDDEN_NAME_CHARS:
            raise ValueError(f"bad engine name {name!r}: {ch!r} is not allowed (no whitespace, "
                             "control characters, ',', ':' or '|')")
    return name


def check_frames(machine, frames, node, order, count, plugin) -> np.ndarray:
    """Heads returned by a ``copyengine_alloc_frames`` implementation, as a fresh int64
    array: at most ``count`` of them, each the head of a block of ``2**order`` frames on
    ``node`` (in range, naturally aligned) that is neither allocated (``PG_allocated``:
    the zero page is one, so is a frame in use) nor on a buddy free list (the hook must
    have taken it), nor poisoned, nor repeated (overlapping). None means no frames.
    Every check runs in NumPy before compiled code indexes with a value, so a bogus
    pfn is an error, never a wild memory access. Mirrors what ``__alloc_pages`` promises
    ``get_new_folio``: a free block of the requested order from the requested node."""
    what = f"copyengine_alloc_frames ({plugin}) for {count} block(s) of order {order} on node {node}"
    if frames is None:
        return np.empty(0, np.int64)
    arr = _int_array(frames, f"{what}: the result")
    if len(arr) > count:
        raise PluginError(f"{what} returned {len(arr)} heads, more than the {count} asked for")
    if not len(arr):
        return np.empty(0, np.int64)
    fpn = machine.frames_per_node
    lo_pfn, hi_pfn = node * fpn, (node + 1) * fpn
    nr = 1 << order
    lo, hi = int(arr.min()), int(arr.max())
    if lo < lo_pfn or hi > hi_pfn - nr:
        bad = lo if lo < lo_pfn else hi
        raise PluginError(f"{what} returned pfn {bad}, outside node {node} "
                          f"(pfns {lo_pfn}..{hi_pfn - 1})")
    heads = arr.astype(np.int64)
    if order and (heads & (nr - 1)).any():
        bad = int(heads[(heads & (nr - 1)) != 0][0])
        raise PluginError(f"{what} returned pfn {bad}, not aligned to {nr} frames")
    if len(np.unique(heads)) != len(heads):
        vals, counts = np.unique(heads, return_counts=True)
        raise PluginError(f"{what} returned pfn {int(vals[counts > 1][0])} more than once")
    pages = (heads[:, None] + np.arange(nr, dtype=np.int64)).ravel() if nr > 1 else heads
    flags = machine.mem_map.flags[pages]
    for bit, why in ((PG_reserved, "reserved (the zero page)"), (PG_hwpoison, "hardware-poisoned"),
                     (PG_allocated, "already allocated (in use)")):
        hit = (flags & bit) != 0
        if hit.any():
            raise PluginError(f"{what} returned a block holding pfn {int(pages[hit][0])}, "
                              f"which is {why}")
    # Still on a free list: the plugin made the number up instead of taking the block
    # from the allocator; handing it out would give the frames to two owners. A free
    # block containing a page has its head (free_order = k + 1) at the page's alignment
    # of some order k, at or below it.
    free_order = machine.buddy.free_order
    base = (pages // fpn) * fpn
    for k in range(machine.max_order + 1):
        h = base + ((pages - base) & ~np.int64((1 << k) - 1))
        hit = free_order[h] == k + 1
        if hit.any():
            raise PluginError(f"{what} returned a block holding pfn {int(pages[hit][0])}, "
                              "which is still free in the buddy allocator (not taken from it)")
    return heads


def reclaimable_frames(machine, frames, node, order) -> np.ndarray:
    """The heads in a refused ``copyengine_alloc_frames`` result that the plugin did take
    from the allocator (valid, unique, not allocated, not on a free list): the caller
    gives these back so that a broken hook leaks nothing. Never raises."""
    try:
        arr = _int_array(frames, "frames") if frames is not None else np.empty(0, np.int64)
    except PluginError:
        return np.empty(0, np.int64)
    out = []
    for v in np.unique(arr).tolist():
        try:
            check_frames(machine, np.array([v], np.int64), node, order, 1, "")
        except PluginError:
            continue
        out.append(v)
    return np.array(out, np.int64)


__all__ = ["plugin_label", "hook_plugins", "check_frames", "check_status", "check_selected_engine", "check_engine_name",
           "reclaimable_frames", "PluginError"]
