"""The cheap path of move_pages(2): a call that needs no special handling runs from its
lookups to its statuses in a few compiled calls.

Most calls of a tiering policy or a benchmark move private anonymous pages of one mapping
to one node, none of them shared, pinned, poisoned or already queued. For such a call the
kernel's order of work (do_pages_move -> add_page_for_migration for each entry ->
migrate_pages -> migrate_pages_batch: prepare, unmap, batch move, batch copy, finalize)
is kept exactly, but each step is one compiled call over the whole call's folios instead
of dozens of small array operations, and no plugin hook is dispatched because none is
implemented beyond the built-in ones (:func:`eligible_machine` checks that).

Anything unusual sends the call to the full path *before* anything changed: an entry
outside the first VMA, a shared or shmem mapping, a folio that is shared, pinned,
poisoned, partly mapped, locked or isolated, a duplicate folio, a migration entry, a node
that cannot supply every destination, an asynchronous engine, a hook implemented by a
plugin, a quarantine in force. What the cheap path then does gives the same statuses,
counters and memory contents as the full path (tests/test_fastpath.py proves it on
random calls); only plugin-visible events would differ, and it runs only when no plugin
can see them.
"""
from __future__ import annotations

import errno
import time

import numpy as np
from numba import njit

from ..engines.auto import AutoEngine
from ..engines.memops import NT_BYTES
from ..engines.serial import SerialEngine, VanillaEngine
from ..mm.buddy import alloc_blocks, free_one, rmqueue_bulk
from ..mm.folio_ops import free_folios, prep_new_folios
from ..mm.pageflags import PG_anon, PG_hwpoison, PG_isolated, PG_locked, PG_partially_mapped
from ..mm.pte import PFN_SHIFT, PTE_MIGRATION, PTE_PRESENT
from ..uapi import MR_SYSCALL
from . import kernels
from .accounting import all_migrated, count_all_migrated, count_migrate, migrate_stats
from .batch_copy import migrate_folios_batch_copy
from .core import MigrationBatch, migrate_folios_finalize, putback_movable_folios
from .core import migrate_pages as migrate_folios
from .dispatch import Dispatch

_ENOENT, _EFAULT = -errno.ENOENT, -errno.EFAULT
_BUSY = PG_locked | PG_isolated
_UNISOLATE = np.uint32(0xFFFFFFFF & ~int(PG_isolated))
_HOOKS = ("copyengine_alloc_frames", "copyengine_batch_copy", "copyengine_select_engine",
          "copyengine_migration_event")


@njit(cache=True, nogil=True)
def lookup_and_isolate(addrs, start, end, page_shift, ptes, node, fpn, zero_pfn, oid, flags,
                       refcount, pincount, mapcount, order, head, owner, status, queue, qheads, qpfns):
    """add_page_for_migration + folio_isolate_lru for every entry, where every folio to
    move is an exclusively mapped, unpinned, unpoisoned private folio of this VMA's
    anon_vma, all of one size. ``status[i]`` gets the node, -ENOENT or -EFAULT;
    ``queue[i]`` the index of the entry's folio in ``qheads`` and its page in ``qpfns``
    (or -1). Returns how many
    folios were isolated, or -1 with nothing changed when an entry needs the full path."""
    nq = 0
    bail = False
    qorder = -1
    for i in range(addrs.shape[0]):
        queue[i] = -1
        a = addrs[i]
        if a < start or a >= end:
            bail = True
            break
        pt = ptes[(a - start) >> page_shift]
        if pt == 0:
            status[i] = _ENOENT
            continue
        if (pt & PTE_MIGRATION) != 0 or (pt & PTE_PRESENT) == 0:
            bail = True
            break
        p = np.int64(pt >> PFN_SHIFT)
        if p == zero_pfn:
            status[i] = _EFAULT
            continue
        h = head[p]
        if h // fpn == node:
            status[i] = node
            continue
        f = flags[h]
        if (f & PG_anon) == 0 or (f & _BUSY) != 0 or owner[h] != oid or pincount[h] != 0:
            bail = True  # also a folio queued by an earlier entry: -EBUSY semantics
            break
        if qorder < 0:
            qorder = order[h]
        nr = 1 << order[h]
        maps = 0
        for j in range(nr):
            if (flags[h + j] & PG_hwpoison) != 0 or mapcount[h + j] > 1:
                bail = True
            maps += mapcount[h + j]
        if bail or refcount[h] != maps or (nr > 1 and maps != nr) or order[h] != qorder \
                or (flags[h] & PG_partially_mapped) != 0:
            bail = True
            break
        flags[h] |= PG_isolated
        refcount[h] += 1
        status[i] = node
        queue[i] = nq
        qheads[nq] = h
        qpfns[nq] = p
        nq += 1
    if not bail:
        return nq
    _putback(qheads, nq, flags, refcount)
    return -1


@njit(cache=True, nogil=True, inline="always")
def _putback(qheads, nq, flags, refcount):
    for t in range(nq):
        h = qheads[t]
        flags[h] &= _UNISOLATE
        refcount[h] -= 1


@njit(cache=True, nogil=True)
def alloc_destinations(qheads, nq, node, order, dst, fpn, max_order, nxt, prv, free_order, free_head,
                       nr_free, flags, refcount, pincount, mapcount, order_a, head, owner, index,
                       private):
    """get_new_folio for every isolated folio, in one go and in address order (as
    BuddyAllocator.alloc hands them out). If the node cannot supply them all, everything
    is given back (blocks freed, folios put back) and 0 is returned: the full path then
    splits or fails folios for want of memory. Else returns ``nq``."""
    if order == 0:
        got = rmqueue_bulk(node, nq, dst, max_order, nxt, prv, free_order, free_head, nr_free)
    else:
        got = alloc_blocks(node, order, nq, dst, max_order, nxt, prv, free_order, free_head, nr_free)
    if got < nq:
        for t in range(got):
            free_one(dst[t], order, fpn, max_order, nxt, prv, free_order, free_head, nr_free)
        _putback(qheads, nq, flags, refcount)
        return 0
    dst[:nq].sort()
    prep_new_folios(dst[:nq], order, np.uint32(0), flags, refcount, pincount, mapcount, order_a, head,
                    owner, index, private)
    return nq


@njit(cache=True, nogil=True)
def unmap_and_move(n, src, dst, nr, oid, owner, index, pgoff, ptes, flags, mapcount, refcount,
                   ev, ep, ef, ew, rc, moved, sel, do_move):
    """migrate_folio_unmap (try_to_migrate over the one VMA) and, for the batched flow,
    migrate_folios_batch_move of ``n`` prepared folios. Returns the migration entries
    written, or -(entries + 1), having moved nothing, if a reference check failed (a pin
    taken while an earlier batch was copying)."""
    for f in range(n):
        sel[f] = f
        flags[dst[f]] |= PG_locked
    k = kernels.unmap_vma(sel, src, nr, oid, owner, index, pgoff, ptes, flags, mapcount, refcount,
                          ev, ep, ef, ew)
    if kernels.ref_check(sel, src, flags, refcount, rc):
        return -(k + 1)
    if do_move:
        kernels.batch_move(sel, src, dst, nr, flags, owner, index, refcount, moved)
    return k


@njit(cache=True, nogil=True)
def finalize_all(sel, src, dst, nr, ev, ep, ef, ew, k, want, ptes, flags, refcount, pincount,
                 mapcount, order, head, owner, index, private, fpn, max_order, nxt, prv, free_order,
                 free_head, nr_free):
    """migrate_folios_finalize when every folio was copied: PTEs to the destinations,
    destinations unlocked and live, sources unlocked and freed, and a destination no PTE
    maps (its range was unmapped while an earlier batch copied) freed too. Returns the
    pages freed."""
    kernels.restore_vma(ev, ep, ef, ew, k, want, True, src, dst, ptes, mapcount, refcount)
    kernels.finalize_done(sel, src, dst, nr, flags, refcount)
    freed = free_folios(src, flags, refcount, pincount, mapcount, order, head, owner, index, private,
                        fpn, max_order, nxt, prv, free_order, free_head, nr_free)
    unused = 0
    for f in range(dst.shape[0]):
        if refcount[dst[f]] == 0:
            unused += 1
    if unused:
        gone = np.empty(unused, np.int64)
        j = 0
        for f in range(dst.shape[0]):
            if refcount[dst[f]] == 0:
                gone[j] = dst[f]
                j += 1
        freed += free_folios(gone, flags, refcount, pincount, mapcount, order, head, owner, index,
                             private, fpn, max_order, nxt, prv, free_order, free_head, nr_free)
    return freed


@njit(cache=True, nogil=True)
def migrate_small_inline(qheads, nq, node, fpn, oid, pgoff, ptes, vanilla, mem, page_size, freed, max_order,
                         nxt, prv, free_order, free_head, nr_free, flags, refcount, pincount, mapcount,
                         order, head, owner, index, private):
    """The rest of a small call with a CPU copy in one compiled call, the lock held
    throughout: get_new_folio, unmap, move and copy (vanilla: move then copy, folio after
    folio), finalize, for ``nq`` folios isolated by :func:`lookup_and_isolate`. Returns
    ``nq``, or 0 (everything given back and put back) when the node cannot supply the
    destinations: the full path then splits or fails folios for want of memory."""
    o = order[qheads[0]]
    dst = np.empty(nq, np.int64)
    if not alloc_destinations(qheads, nq, node, o, dst, fpn, max_order, nxt, prv, free_order, free_head,
                              nr_free, flags, refcount, pincount, mapcount, order, head, owner, index,
                              private):
        return 0
    src = qheads[:nq].copy()
    nr = np.full(nq, 1 << o, np.int64)
    npages = nq << o
    ev = np.empty(npages, np.int64)
    ep = np.empty(npages, np.int64)
    ef = np.empty(npages, np.int64)
    ew = np.empty(npages, np.uint64)
    sel = np.empty(nq, np.int64)
    rc = np.zeros(nq, np.int32)
    moved = np.zeros(nq, np.bool_)
    copied = np.zeros(nq, np.bool_)
    k = unmap_and_move(nq, src, dst, nr, oid, owner, index, pgoff, ptes, flags, mapcount, refcount,
                       ev, ep, ef, ew, rc, moved, sel, not vanilla)
    # eligible folios pass the reference check and are not poisoned: the lock is held
    if vanilla:
        kernels.vanilla_move_copy(sel, src, dst, nr, flags, owner, index, refcount, moved, mem, page_size,
                                  False, rc, copied)
    else:
        kernels.folio_copy(sel, src, dst, nr, flags, mem, page_size, False, rc, copied)
    freed[0] = finalize_all(sel, src, dst, nr, ev, ep, ef, ew, k, copied, ptes, flags, refcount,
                            pincount, mapcount, order, head, owner, index, private, fpn, max_order, nxt,
                            prv, free_order, free_head, nr_free)
    return nq


@njit(cache=True, nogil=True)
def query_nodes(addrs, start, end, page_shift, ptes, fpn, zero_pfn, head, status):
    """do_pages_stat for entries that all lie in one VMA: the node of each page, -ENOENT
    for one never touched, -EFAULT for the zero page. False (status incomplete) if a page
    is under migration: the full path waits for it."""
    for i in range(addrs.shape[0]):
        a = addrs[i]
        if a < start or a >= end:
            return False
        pt = ptes[(a - start) >> page_shift]
        if pt == 0:
            status[i] = _ENOENT
            continue
        if (pt & PTE_PRESENT) == 0:
            return False
        p = np.int64(pt >> PFN_SHIFT)
        status[i] = _EFAULT if p == zero_pfn else head[p] // fpn
    return True


def query_fast(target, addrs):
    """move_pages(2) without nodes, on the cheap path: the status array, or None."""
    vma = target.find_vma(int(addrs[0]))
    if vma is None:
        return None
    m = target.machine
    status = np.empty(len(addrs), np.int64)
    if query_nodes(addrs, vma.start, vma.end, m.page_shift, vma.ptes, m.frames_per_node, m.zero_pfn,
                   m.mem_map.head, status):
        return status
    return None


def eligible_machine(m) -> bool:
    """No plugin beyond the built-ins implements a hook the migration calls, and no
    quarantine is pending: nothing could tell the cheap path from the full one."""
    if m.quarantine:
        return False
    hook = m.pm.hook
    for name in _HOOKS:
        impls = getattr(hook, name).get_hookimpls()
        if impls and (len(impls) > 1 or impls[0].plugin_name != "core"):
            return False
    return True


def move_pages_fast(target, addrs, node):
    """do_pages_move for a call whose entries all go to ``node``, on the cheap path.
    Returns (ret, status array), or None (nothing changed) when the call needs the full
    path. Called with the machine lock held, after the call-level checks."""
    m = target.machine
    engine = m.engine
    if engine.capabilities.asynchronous or not eligible_machine(m) \
            or not (m.settings["offload_reasons"] >> MR_SYSCALL) & 1:
        return None
    vma = target.find_vma(int(addrs[0]))
    if vma is None or vma.obj.shared or len(vma.obj.vmas) != 1:
        return None
    mm = m.mem_map
    n = len(addrs)
    status = np.empty(n, np.int64)
    queue = np.empty(n, np.int64)
    qheads = np.empty(n, np.int64)
    qpfns = np.empty(n, np.int64)
    nq = lookup_and_isolate(addrs, vma.start, vma.end, m.page_shift, vma.ptes, node, m.frames_per_node,
                            m.zero_pfn, vma.obj.id, mm.flags, mm.refcount, mm.pincount, mm.mapcount,
                            mm.order, mm.head, mm.owner, status, queue, qheads, qpfns)
    if nq <= 0:
        return (0, status) if nq == 0 else None
    done = _move_small(m, vma, qheads, nq, node, engine)
    if done:
        return (0, status) if done > 0 else None
    t0 = time.perf_counter()
    heads = qheads[:nq]
    order = int(mm.order[heads[0]])
    dst = np.empty(nq, np.int64)
    if not alloc_destinations(heads, nq, node, order, dst, m.frames_per_node, m.max_order,
                              *m.buddy.lists(), *mm.arrays()):
        return None
    m._vmstat["pgalloc"] += nq << order
    m.migrate_times["prepare"] += time.perf_counter() - t0
    rc = migrate_folios_fast(m, vma, heads, qpfns[:nq], dst, order, node, engine)
    failed = rc != 0
    if failed.any():
        st = rc[queue[queue >= 0]]
        status[queue >= 0] = np.where(st == 0, node, st)
        return int(failed.sum()), status
    return 0, status


#: built-in CPU engines a small call runs inside one compiled call with (no engine call);
#: other engines opt in with ``Capabilities.inline_bytes``
_INLINE = (SerialEngine, VanillaEngine)
#: the most bytes a call may move that way (the lock is held through the copy)
INLINE_BYTES = 256 << 10


def _copy_choice(engine, nbytes):
    """The engine that copies ``nbytes`` for ``engine``: itself, or what ``auto`` delegates
    the batch to (the framework then runs that engine, or the CPU copy inline, and tells
    auto how long it took). Returns (engine, auto's spec or None)."""
    if isinstance(engine, AutoEngine):
        spec, chosen = engine.delegate(nbytes)
        return chosen, spec
    return engine, None


def _move_small(m, vma, qheads, nq, node, engine) -> int:
    """The rest of a small call in one compiled call (:func:`migrate_small_inline`) when
    the copy is the CPU's (serial, vanilla, an engine below its ``inline_bytes``, or what
    auto delegates to serial), with its counters. Returns the folios migrated, 0 when the
    call is not small (go on in batches), -1 when the full path must take it (no room)."""
    mm = m.mem_map
    order = int(mm.order[qheads[0]])
    pages = nq << order
    nbytes = pages << m.page_shift
    if nbytes > INLINE_BYTES or pages > m.settings["nr_max_batched_migration"]:
        return 0
    chosen, spec = _copy_choice(engine, nbytes)
    if type(chosen) not in _INLINE and nbytes >= chosen.capabilities.inline_bytes:
        return 0
    freed = m.scratch_freed  # the lock is held: one per machine, not one per call
    freed[0] = 0
    t0 = time.perf_counter()
    if not migrate_small_inline(qheads, nq, node, m.frames_per_node, vma.obj.id, vma.pgoff, vma.ptes,
                                not chosen.capabilities.batched, m.mem, m.page_size, freed, m.max_order,
                                *m.buddy.lists(), *mm.arrays()):
        return -1
    t1 = time.perf_counter()
    if spec is not None:
        engine.record(spec, nbytes, t1 - t0)
    m.migrate_times["fused"] += t1 - t0
    m._vmstat["pgalloc"] += pages
    m._vmstat["pgfree"] += int(freed[0])
    count_all_migrated(m, nq, order, MR_SYSCALL)
    if m.recorder is not None:  # one compiled call: its phases are not told apart
        m.recorder.batch(t0, t0, t0, t0, t0, t1, nq, pages, chosen.name)
        m.recorder.call(t0, t1, t1, **all_migrated(m, nq, order, m.settings["migrate_mode"], MR_SYSCALL))
    return nq


def migrate_folios_fast(m, vma, heads, pfns, dst, order, node, engine) -> np.ndarray:
    """migrate_pages() over eligible folios, batch after batch as the full path cuts them,
    each batch in three compiled steps (unmap + move, copy, finalize). Returns the
    per-folio outcome (0, or -errno for a folio that a concurrent hwpoison or a failing
    engine undid) and counts vmstat as migrate_pages does. An exception from the engine
    (an interrupt) propagates once the batch is settled and every other folio put back.

    The copy of a batch runs without the machine lock: if meanwhile the mapping was
    forked or split (the rmap is no longer this one VMA), the folios not yet migrated go
    to the full path (``core.migrate_pages``), which walks the whole rmap."""
    nr1 = 1 << order
    per_batch = max(m.settings["nr_max_batched_migration"] // nr1, 1)
    out = np.full(len(heads), -errno.EINTR, np.int32)
    exc, handed, unused = None, len(heads), len(heads)
    stream = (len(heads) << order) * m.page_size >= NT_BYTES  # as MigrationBatch.stream for the call
    start = time.perf_counter()
    m.get_engine()  # held like the full path holds it: a set_engine meanwhile closes it after us
    try:
        for lo in range(0, len(heads), per_batch):
            hi = min(lo + per_batch, len(heads))
            if len(vma.obj.vmas) != 1 or vma.obj.vmas[0] is not vma:
                handed = unused = lo
                break
            try:
                rc = _migrate_batch_fast(m, vma, heads[lo:hi], dst[lo:hi], order, node, engine, stream)
            except BaseException as e:  # noqa: B036 - the batch is settled; re-raised below
                exc = e
                m.free_folios(dst[hi:], undo=True)  # destinations of batches never started
                break
            if rc is None:  # a reference appeared meanwhile: the batch was undone
                handed, unused = lo, hi
                break
            out[lo:hi] = rc
    finally:
        m.put_engine(engine)
    mode = m.settings["migrate_mode"]
    if handed == len(heads) and exc is None and not out.any():  # the common case
        stats = migrate_stats(m, out, order, mode, MR_SYSCALL)
        count_migrate(m, stats)
        if m.recorder is not None:
            m.recorder.call(start, time.perf_counter(), m.recorder.first_remap_since(start), **stats)
        return out
    # -EAGAIN: an engine that could not stop had the folio undone (its destination is
    # quarantined); like the rest of what is handed on, the full path retries it
    again = np.flatnonzero(out[:handed] == -errno.EAGAIN) if exc is None else np.empty(0, np.int64)
    mine = np.ones(handed, bool)
    mine[again] = False
    stats = migrate_stats(m, out[:handed][mine], order, mode, MR_SYSCALL)
    count_migrate(m, stats)
    putback_movable_folios(m, heads[:handed][mine & (out[:handed] != 0)])
    if m.recorder is not None:
        m.recorder.call(start, time.perf_counter(), m.recorder.first_remap_since(start), **stats)
    if exc is not None:
        raise exc
    m.free_folios(dst[unused:], undo=True)
    rest = np.concatenate((again, np.arange(handed, len(heads))))
    if len(rest):
        out[rest] = migrate_folios(m, heads[rest], node).status_of(heads[rest], pfns[rest])
    return out


def _migrate_batch_fast(m, vma, heads, dst, order, node, engine, stream) -> np.ndarray:
    """One batch: unmap + move, copy, finalize. Returns the per-folio outcome. ``stream``:
    the call moves at least NT_BYTES (:attr:`MigrationBatch.stream`)."""
    mm = m.mem_map
    times = m.migrate_times
    t0 = time.perf_counter()
    b = MigrationBatch(m, heads, node, dst, order)
    b.stream = stream
    b.rmap[vma.obj.id] = [vma]
    n = len(heads)
    npages = n << order
    ev, ep, ef = (np.empty(npages, np.int64) for _ in range(3))
    ew = np.empty(npages, np.uint64)
    sel = np.empty(n, np.int64)
    batched = engine.capabilities.batched
    k = unmap_and_move(n, b.src, b.dst, b.nr, vma.obj.id, mm.owner, mm.index, vma.pgoff, vma.ptes,
                       mm.flags, mm.mapcount, mm.refcount, ev, ep, ef, ew, b.rc, b.moved, sel, batched)
    b.entries.append([vma, ev, ep, ef, ew, k if k >= 0 else -k - 1])
    if k < 0:  # pinned while an earlier batch copied: undo (destinations freed), full path next
        migrate_folios_finalize(b)
        return None
    t1 = time.perf_counter()
    nt = stream or npages * m.page_size >= NT_BYTES
    chosen = engine
    try:
        if not batched:
            kernels.vanilla_move_copy(sel, b.src, b.dst, b.nr, mm.flags, mm.owner, mm.index, mm.refcount,
                                      b.moved, m.mem, m.page_size, nt, b.rc, b.copied)
        else:
            chosen, spec = _copy_choice(engine, npages * m.page_size)
            m.lock.release()  # as dispatch.unlocked, without a generator per batch
            try:
                tc = time.perf_counter()
                if type(chosen) is SerialEngine:
                    kernels.folio_copy(sel, b.src, b.dst, b.nr, mm.flags, m.mem, m.page_size, nt, b.rc,
                                       b.copied)
                    if m.recorder is not None:  # the lane serial's own copy_folios reports
                        m.recorder.copy_spans(chosen.name, [("cpu", tc, time.perf_counter(),
                                                             int(np.count_nonzero(b.rc[sel] == 0)))])
                else:
                    migrate_folios_batch_copy(b, sel, chosen, Dispatch(m, chosen))
                if spec is not None:
                    engine.record(spec, npages * m.page_size, time.perf_counter() - tc)
            finally:
                m.lock.acquire()
    except BaseException:
        b.rc[~b.copied] = -errno.EINTR
        migrate_folios_finalize(b)
        raise
    t2 = time.perf_counter()
    if b.copied.all() and len(vma.obj.vmas) == 1 and vma.obj.vmas[0] is vma:  # no fork meanwhile
        freed = finalize_all(sel, b.src, b.dst, b.nr, ev, ep, ef, ew, k, b.copied, vma.ptes, *mm.arrays(),
                             m.frames_per_node, m.max_order, *m.buddy.lists())
        m._vmstat["pgfree"] += int(freed)
        if batched:
            m.cond.notify_all()
    else:
        migrate_folios_finalize(b)
    t3 = time.perf_counter()
    times["unmap"] += t1 - t0
    times["copy"] += t2 - t1
    times["finalize"] += t3 - t2
    if m.recorder is not None:
        m.recorder.batch(t0, t0, t1, t1, t2, t3, n, npages, chosen.name)
    return b.rc
