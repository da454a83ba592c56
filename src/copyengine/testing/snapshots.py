"""Machine state before a call, compared after it: whole-machine snapshots for calls that
must change nothing, and :class:`PageWatch` for the entries of one call (a failed entry
exactly as before, a moved one exactly moved: the kernel's undo of a failed migration).
"""
from __future__ import annotations

import hashlib

import numpy as np

from ..mm.pageflags import PG_allocated, PG_anon, PG_head, PG_hwpoison, PG_isolated, PG_locked, PG_swapbacked
from .machine_checks import InvariantError

__all__ = ["snapshot", "diff", "assert_unchanged", "PageWatch"]


_MEMMAP_FIELDS = ("flags", "refcount", "pincount", "mapcount", "order", "head", "owner", "index",
                  "private")


def _digest(*arrays) -> str:
    h = hashlib.sha1()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()


def snapshot(m) -> dict:
    """Everything a rejected call must leave as it was, without touching anything (no
    faults, no counters): free pages and free blocks per node, vmstat, settings, the
    engine, the processes with their VMAs and PTEs, the objects and page caches, every
    mem_map field of allocated frames (``mem_map``), every frame's flags (``flags``), the
    stale fields free frames keep (``mem_map_free``), the bytes of every allocated
    frame (``memory``), and where each process's next mmap would go (``mmap_base``). Compare two with :func:`assert_unchanged` or :func:`diff`."""
    with m.lock:
        mm = m.mem_map
        alloc = (mm.flags & PG_allocated) != 0
        used = np.nonzero(alloc)[0]
        procs = {}
        for pid, p in sorted(m.processes.items()):
            procs[pid] = (p.alive, p.uid, p.cap_sys_nice, tuple(sorted(p.mems_allowed)),
                          [(v.start, v.end, v.node, v.order, v.shared, v.pgoff, v.obj.id, v.ptes.tobytes())
                           for v in p.vmas])
        objects = {oid: (type(o).__name__, len(o.vmas), o.cache.tobytes() if o.shared else None)
                   for oid, o in sorted(m.objects.items())}
        return {
            "free": [m.free_pages(nd) for nd in range(m.nodes)],
            "free_blocks": _digest(m.buddy.free_order, m.buddy.nr_free),
            "vmstat": m.vmstat,
            "settings": m.settings.as_dict(),
            "engine": m.engine_spec,
            "processes": procs,
            "next_pid": m._next_pid,
            # where each process's next mmap goes: a failed mmap may use up address space
            # (harmless, like Linux's free-area cache), so tests of failing mmaps ignore it
            "mmap_base": {pid: p._next_addr for pid, p in sorted(m.processes.items())},
            "objects": objects,
            "mem_map": {k: _digest(getattr(mm, k)[used]) for k in _MEMMAP_FIELDS},
            "flags": _digest(mm.flags),
            "mem_map_free": {k: _digest(getattr(mm, k)[~alloc]) for k in _MEMMAP_FIELDS},
            "memory": _digest(used, m.mem.reshape(-1, m.page_size)[used]),
        }


def diff(before: dict, after: dict) -> list[str]:
    """The keys of two snapshots that differ (``mem_map.refcount`` for one field)."""
    out = []
    for k in before:
        a, b = before[k], after.get(k)
        if isinstance(a, dict) and k in ("mem_map", "mem_map_free"):
            out += [f"{k}.{f}" for f in a if a[f] != b.get(f)]
        elif a != b:
            out.append(k)
    return out


def assert_unchanged(before: dict, after: dict, ignore=()) -> None:
    """Assert two snapshots are equal, except the keys in ``ignore`` (e.g.
    ``"mem_map_free"``: stale fields of free frames, which an allocation undone by
    ENOMEM rewrites without changing any state that matters)."""
    changed = [k for k in diff(before, after) if k not in ignore and k.split(".")[0] not in ignore]
    if changed:
        detail = []
        for k in changed:
            a, b = before.get(k), after.get(k)
            if k in ("vmstat", "settings"):
                detail.append(f"{k}: " + ", ".join(f"{x} {a[x]!r} -> {b.get(x)!r}" for x in a if a[x] != b.get(x)))
            elif k in ("free", "engine", "next_pid"):
                detail.append(f"{k}: {a!r} -> {b!r}")
            else:
                detail.append(k)
        raise InvariantError("changed by a call that should change nothing: " + "; ".join(detail))


# ----------------------------------------------------------------------------- exact undo
_FOLIO_FLAGS = PG_anon | PG_swapbacked | PG_head | PG_hwpoison | PG_allocated


class PageWatch:
    """What a set of ``(process, address)`` entries looked like before a call (frame,
    folio, references, map counts, flags, free pages per node), to check afterwards that
    a failed entry is exactly as before and a moved one exactly moved."""

    def __init__(self, m, entries):
        self.m = m
        mm = m.mem_map
        self.entries = list(entries)
        self.pfn = [p.pfn_of(a) for p, a in self.entries]
        self.free = [m.free_pages(n) for n in range(m.nodes)]
        heads = mm.head[self.pfn] if self.pfn else np.empty(0, np.int64)
        self.head = heads.tolist()
        self.order = mm.order[heads].tolist()
        self.ref = mm.refcount[heads].tolist()
        self.pin = mm.pincount[heads].tolist()
        self.map = mm.mapcount[self.pfn].tolist()
        self.flags = (mm.flags[self.pfn] & _FOLIO_FLAGS).tolist()
        self.hflags = (mm.flags[heads] & _FOLIO_FLAGS).tolist()

    def node(self, i) -> int:
        """The node entry ``i`` sat on before the call."""
        return self.pfn[i] // self.m.frames_per_node

    def check(self, failed=(), moved=(), target=None):
        """``failed``/``moved``: indices into the entries. Failed entries are exactly as
        before (same frame, folio, references, map count, flags, nothing locked or
        isolated); moved ones sit on ``target`` at the same offset in a folio of the same
        order, with the same references, map count and flags, their source freed (or
        kept out as poisoned)."""
        m = self.m
        mm = m.mem_map
        for i in failed:
            p, a = self.entries[i]
            pf = p.pfn_of(a)
            assert pf == self.pfn[i], f"entry {i}: frame changed from {self.pfn[i]} to {pf} on failure"
            h = mm.head[pf]
            assert h == self.head[i] and mm.order[h] == self.order[i], f"entry {i}: folio changed on failure"
            assert (mm.refcount[h], mm.pincount[h], mm.mapcount[pf]) == (self.ref[i], self.pin[i], self.map[i]), \
                f"entry {i}: references changed on failure"
            assert mm.flags[pf] & _FOLIO_FLAGS == self.flags[i], f"entry {i}: page flags changed on failure"
            assert mm.flags[h] & _FOLIO_FLAGS == self.hflags[i], f"entry {i}: folio flags changed on failure"
            assert not mm.flags[h] & (PG_locked | PG_isolated), f"entry {i}: left locked or isolated"
        for i in moved:
            p, a = self.entries[i]
            pf = p.pfn_of(a)
            assert pf != self.pfn[i] and (target is None or pf // m.frames_per_node == target), \
                f"entry {i}: not moved to node {target} (frame {self.pfn[i]} -> {pf})"
            h = mm.head[pf]
            assert pf - h == self.pfn[i] - self.head[i] and mm.order[h] == self.order[i], \
                f"entry {i}: moved into a folio of another shape"
            assert (mm.refcount[h], mm.pincount[h], mm.mapcount[pf]) == (self.ref[i], self.pin[i], self.map[i]), \
                f"entry {i}: references differ after the move"
            assert mm.flags[h] & _FOLIO_FLAGS == self.hflags[i], f"entry {i}: folio flags differ after the move"
            assert not mm.flags[h] & (PG_locked | PG_isolated), f"entry {i}: left locked or isolated"
            old = self.pfn[i]
            assert m.buddy.is_free(old) or mm.flags[old] & PG_hwpoison, \
                f"entry {i}: source frame {old} was not freed"

    def moved_pages(self, moved) -> int:
        """Base pages of the distinct folios of entries ``moved``."""
        seen = {}
        for i in moved:
            seen[self.head[i]] = 1 << self.order[i]
        return sum(seen.values())
