"""The migration state machine of mm/migrate.c, over whole-batch arrays.

For a list of isolated folios and a target node, ``migrate_pages`` cuts batches of at
most ``nr_max_batched_migration`` base pages and runs each through

1. prepare   -- allocate destinations (``get_new_folio``); -ENOMEM splits a large folio
2. unmap     -- lock the sources, replace every PTE mapping them with a migration entry
                (rmap walk), check references (extra pins: -EAGAIN, retried)
3. move      -- move metadata to the destinations without copying (MIGRATE_NO_COPY)
4. copy      -- one call for the whole batch through the copy engine (pluggy hook), with
                ``folio_mc_copy`` for every folio the engine did not report done
5. finalize  -- migration entries point at the destinations, sources are freed, waiters
                woken; or undo -- entries restored to the sources, destinations freed.

Every phase works on arrays of the whole batch (frame numbers, orders, return codes);
there is no Python object per folio or page. The ``vanilla`` engine runs the same code
one folio at a time, copying inside the move step, as mainline did before the series.
"""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass

import numpy as np

from ..engines.memops import NT_BYTES
from ..mm.huge_memory import can_split_folio, split_folio_isolated
from ..mm.pageflags import PG_isolated, PG_locked, PG_nonzero, PG_partially_mapped, PG_swapbacked
from ..uapi import MR_SYSCALL
from . import kernels
from .accounting import SPLIT, count_migrate, migrate_stats
from .batch_copy import migrate_folios_batch_copy, select_copy_engine
from .dispatch import Dispatch, unlocked
from .quarantine import quarantine_folios, release_quarantine
from .rmap import remove_migration_ptes, try_to_migrate


MIGRATE_ASYNC, MIGRATE_SYNC_LIGHT, MIGRATE_SYNC = "async", "sync_light", "sync"
NR_MAX_MIGRATE_PAGES_RETRY = 10
NR_MAX_MIGRATE_ASYNC_RETRY = 3
NR_MAX_MIGRATE_SYNC_RETRY = 7

#: the phases whose time ``Machine.migrate_times`` accumulates; "fused" is a small call
#: that ran as one compiled function (migrate/fastpath.py), its phases not told apart
PHASES = ("prepare", "unmap", "move", "copy", "finalize", "fused")


class MigrationBatch:
    """One batch in flight: per-folio arrays, and the migration entries it installed.

    ``entries`` holds, per VMA the rmap walk found, the page indices, source pfns, batch
    folio index and write bit of each PTE replaced by a migration entry (and how many are
    live): the state the kernel keeps in ``src->private`` between unmap and finalize.
    """

    def __init__(self, m, src, target, dst=None, order=None):
        """``dst`` and ``order`` (one order for all): destinations already allocated."""
        self.m = m
        self.target = target
        self.src = np.ascontiguousarray(src, np.int64)
        n = len(self.src)
        if order is None:
            self.order = m.mem_map.order[self.src].astype(np.int64)
            self.nr = np.left_shift(1, self.order)
        else:
            self.order = np.full(n, order, np.int64)
            self.nr = np.full(n, 1 << order, np.int64)
        self.dst = np.full(n, -1, np.int64) if dst is None else dst
        # too much to stay cached: the copy streams (TODO 4); the caller marks every batch
        # of a call that is (Dispatch.stream)
        self.stream = int(self.nr.sum()) * m.page_size >= NT_BYTES
        self.rc = np.zeros(n, np.int32)
        flags = np.zeros((3, n), bool)
        self.copied, self.moved, self.stray = flags  # stray: destinations an engine may still write
        self.stragglers = []  # (completion, folios) of jobs whose engine did not stop
        self.entries = []  # [vma, ev, ep, ef, ew, n]
        self.rmap = {}     # owner id -> the VMAs its rmap walk found at unmap
        self.split = []    # pages of large folios split for want of memory

    def __len__(self):
        return len(self.src)

    def pages(self, heads, sel):
        return self.m.mem_map.folio_pages(heads[sel], self.order[sel])


# --------------------------------------------------------------------------- phases
def migrate_folios_prepare(b: MigrationBatch, nosplit: bool, direct_alloc: bool = False) -> None:
    """get_new_folio for every folio: locked destinations on the target node, one bulk
    allocation per order. Without memory a large anonymous folio is split (its pages
    are migrated on their own, try_split_folio); anything else fails with -ENOMEM."""
    m = b.m
    mm = m.mem_map
    if b.order.max(initial=0) > 1:
        split_deferred_folios(b)
    need = b.rc == 0
    gone = np.flatnonzero(need & (mm.refcount[b.src] == 1))
    if len(gone):
        folio_freed_under_us(b, gone)
        need[gone] = False
    orders = np.unique(b.order[need]) if b.order.any() else (0,)
    for o in orders:
        o = int(o)
        sel = np.nonzero((b.order == o) & need)[0] if len(orders) > 1 or not need.all() else np.arange(len(b))
        got = m.alloc_folios_upto(b.target, o, len(sel), direct=direct_alloc)
        mm.flags[got] |= PG_locked  # the folio lock lives on the head
        b.dst[sel[:len(got)]] = got
        short = sel[len(got):]
        if not len(short):
            continue
        b.rc[short] = -errno.ENOMEM
        if o > 0 and not nosplit:
            for f in short.tolist():
                h = int(b.src[f])
                if can_split_folio(m, h):
                    b.split.append(split_folio_isolated(m, h))
                    b.rc[f] = SPLIT


def split_deferred_folios(b: MigrationBatch) -> None:
    """The rare folio on the deferred split queue (an anonymous large folio mapped only in
    part, mm/huge_memory.py) is split before it is migrated, as migrate_pages_batch does:
    its pages are migrated on their own (SPLIT), zero-filled ones were remapped to the
    zero page. A folio that cannot be split (pinned) is migrated whole."""
    m = b.m
    mm = m.mem_map
    for f in np.flatnonzero(b.order > 1).tolist():
        h = int(b.src[f])
        if mm.flags[h] & PG_partially_mapped and can_split_folio(m, h):
            b.split.append(split_folio_isolated(m, h))
            b.rc[f] = SPLIT


def folio_freed_under_us(b: MigrationBatch, folios) -> None:
    """migrate_folio_unmap's "folio was freed from under us": only the isolation reference
    is left (every mapping went while it waited), so there is nothing to copy; the folio
    is freed and counts as migrated."""
    if not len(folios):
        return
    mm = b.m.mem_map
    heads = b.src[folios]
    mm.flags[heads] &= ~PG_isolated
    mm.refcount[heads] = 0
    b.m.free_folios(heads)


def migrate_folio_unmap(b: MigrationBatch) -> None:
    """Lock each source, replace its PTEs in every process with migration entries
    (try_to_migrate over the rmap: every VMA of the folio's anon_vma or shmem object),
    drop their references, and check that nothing else holds one: a pinned folio gets
    -EAGAIN and its PTEs back."""
    mm = b.m.mem_map
    sel = np.nonzero((b.rc == 0) & (b.dst >= 0))[0]
    if not len(sel):
        return
    try_to_migrate(b, sel)
    mm.flags[b.src[sel]] |= PG_locked  # also folios no PTE maps any more
    if kernels.ref_check(sel, b.src, mm.flags, mm.refcount, b.rc):
        bad = sel[b.rc[sel] == -errno.EAGAIN]
        remove_migration_ptes(b, bad, to_src=True)
        kernels.unlock(bad, b.src, mm.flags)


def migrate_folios_batch_move(b: MigrationBatch, sel) -> None:
    """Move metadata (mapping, index, flags) of the folios ``sel`` to their destinations
    without copying data: migrate_folios_batch_move with MIGRATE_NO_COPY. A shmem
    folio's page-cache slot and reference move with it (folio_migrate_mapping)."""
    m = b.m
    mm = m.mem_map
    if not len(sel):
        return
    if kernels.batch_move(sel, b.src, b.dst, b.nr, mm.flags, mm.owner, mm.index, mm.refcount, b.moved):
        _move_cache(b, sel)


def _move_cache(b, sel):
    """The page-cache slots of the shmem folios among ``sel`` name their destinations."""
    mm = b.m.mem_map
    sh = sel[(mm.flags[b.src[sel]] & PG_swapbacked) != 0]
    _set_cache(b.m, b.pages(b.src, sh), b.pages(b.dst, sh))


def _set_cache(m, old_pages, new_pages):
    """Point the page-cache slots of ``old_pages`` at ``new_pages`` (shmem objects)."""
    mm = m.mem_map
    owners = mm.owner[old_pages]
    for oid in np.unique(owners).tolist():
        obj = m.objects.get(oid)
        if obj is not None:
            mine = owners == oid
            obj.cache[mm.index[old_pages[mine]]] = new_pages[mine]


def _undo_move(b, sel):
    """Give a moved folio's page-cache slot back to its source (undo of batch move)."""
    mm = b.m.mem_map
    shmem = sel[(mm.flags[b.src[sel]] & PG_swapbacked) != 0]
    if len(shmem):
        spages = b.pages(b.src, shmem)
        _set_cache(b.m, spages, spages)
        mm.refcount[b.src[shmem]] += 1
    b.moved[sel] = False


def migrate_folios_vanilla(b: MigrationBatch, sel, engine, d) -> None:
    """The flow before the series (migrate_folio_move per folio): move a folio's metadata
    and copy its data, then the next folio, in one compiled call per batch with the
    machine lock held. When a plugin wraps the copy hook, the moves come first and the
    copy goes through the hook (one folio at a time all the same: VanillaEngine.copy),
    so that tracing and fault injection see vanilla as they see every flow."""
    m = b.m
    mm = m.mem_map
    if not len(sel):
        return
    if not d.direct_copy or engine.capabilities.min_bytes or engine.capabilities.max_batch:
        migrate_folios_batch_move(b, sel)
        with unlocked(m):
            migrate_folios_batch_copy(b, sel, engine, d)
        return
    nt = b.stream or int(b.nr[sel].sum()) * m.page_size >= NT_BYTES
    if kernels.vanilla_move_copy(sel, b.src, b.dst, b.nr, mm.flags, mm.owner, mm.index, mm.refcount,
                                 b.moved, m.mem, m.page_size, nt, b.rc, b.copied):
        _move_cache(b, sel)


def migrate_folios_finalize(b: MigrationBatch) -> None:
    """migrate_folio_done / remove_migration_ptes: copied folios go live on the target
    and their sources are freed; every other folio in flight is undone (PTEs back to the
    source, destination freed, or quarantined while an engine may still write it).
    Waiters on migration entries are woken."""
    m = b.m
    mm = m.mem_map
    ok = np.nonzero(b.copied)[0]
    undo = np.nonzero(~b.copied & (b.dst >= 0))[0]
    if len(ok):
        deferred = ok[(mm.flags[b.src[ok]] & PG_partially_mapped) != 0]
        for f in deferred.tolist():  # migrate_folio_move requeues the destination
            mm.flags[b.dst[f]] |= PG_partially_mapped
            if b.order[f] == m.max_order:
                m.count("thp_deferred_split_page")
        remove_migration_ptes(b, ok, to_src=False)
        kernels.finalize_done(ok, b.src, b.dst, b.nr, mm.flags, mm.refcount)
        m.free_folios(b.src[ok])
        dst = b.dst[ok]
        unused = dst[mm.refcount[dst] == 0]  # no PTE mapped it (a split folio's hole, unmapped)
        if len(unused):
            m.free_folios(unused)
    if len(undo):
        _undo_move(b, undo[b.moved[undo]])
        remove_migration_ptes(b, undo, to_src=True)
        kernels.unlock(undo, b.src, mm.flags)
        # an engine may have written them before failing: zeroed before anyone maps them
        mm.flags[b.pages(b.dst, undo)] |= PG_nonzero
        stray = b.stray[undo]
        m.free_folios(b.dst[undo[~stray]])
        for completion, part in b.stragglers:
            for o in np.unique(b.order[part]).tolist():
                mine = part[b.order[part] == o]
                quarantine_folios(m, completion, b.dst[mine], o)
        b.dst[undo] = -1
    m.cond.notify_all()


# --------------------------------------------------------------------------- passes
def migrate_pages_batch(m, heads, target, mode, nr_pass, nosplit=False, dispatch=None):
    """migrate_pages_batch: up to ``nr_pass`` passes over one batch; -EAGAIN folios are
    retried. Returns (heads, rc, split pages): one entry per folio that reached an
    outcome, rc 0 for migrated, SPLIT for a split large folio, else -errno.

    Whatever a hook does, a batch that started is finalized or undone: an exception
    (KeyboardInterrupt included) fails the folios not yet copied with -EINTR, the batch is
    settled, no further pass runs, and ``dispatch.exc`` holds it for the caller."""
    d = dispatch or Dispatch(m, m.engine)
    times = m.migrate_times
    out_h, out_rc, split = [], [], []
    retry = np.asarray(heads, np.int64)
    for _ in range(nr_pass):
        if not len(retry) or d.exc is not None:
            break
        b = MigrationBatch(m, retry, target)
        b.stream = b.stream or d.stream
        t0 = t1 = t2 = t3 = t4 = time.perf_counter()
        engine, sel = d.engine, ()
        try:
            d.event("batch_start", target=target, folios=len(b), mode=mode)
            migrate_folios_prepare(b, nosplit, d.direct_alloc)
            t1 = time.perf_counter()
            migrate_folio_unmap(b)
            t2 = time.perf_counter()
            sel = np.nonzero((b.rc == 0) & (b.dst >= 0))[0]
            engine = select_copy_engine(b, sel, d)
            if engine.capabilities.batched:
                migrate_folios_batch_move(b, sel)
                t3 = time.perf_counter()
                with unlocked(m):
                    migrate_folios_batch_copy(b, sel, engine, d)
            else:
                t3 = time.perf_counter()
                migrate_folios_vanilla(b, sel, engine, d)
        except BaseException as e:  # noqa: B036 - settled below, re-raised by migrate_pages
            d.failed(e)
            b.rc[(b.rc == 0) & ~b.copied] = -errno.EINTR
        t4 = time.perf_counter()
        migrate_folios_finalize(b)
        t5 = time.perf_counter()
        times["prepare"] += t1 - t0
        times["unmap"] += t2 - t1
        times["move"] += t3 - t2
        times["copy"] += t4 - t3
        times["finalize"] += t5 - t4
        if m.recorder is not None and len(sel):
            m.recorder.batch(t0, t1, t2, t3, t4, t5, len(sel), int(b.nr[sel].sum()), engine.name)
        again = b.rc == -errno.EAGAIN
        if again.any() and d.exc is None:
            out_h.append(b.src[~again])
            out_rc.append(b.rc[~again])
            retry = b.src[again]
        else:
            out_h.append(b.src)
            out_rc.append(b.rc)
            retry = retry[:0]
        split.extend(b.split)
        if d.events:
            d.event("batch_end", target=target, heads=b.src, rc=b.rc)
    if len(retry):
        out_h.append(retry)
        out_rc.append(np.full(len(retry), -errno.EAGAIN if d.exc is None else -errno.EINTR, np.int32))
    return (np.concatenate(out_h) if len(out_h) != 1 else out_h[0],
            np.concatenate(out_rc) if len(out_rc) != 1 else out_rc[0],
            np.concatenate(split) if split else np.empty(0, np.int64))


# --------------------------------------------------------------------------- entry
def folio_isolate_lru(m, heads) -> None:
    """Take folios off the LRU for migration: PG_isolated and a reference each."""
    mm = m.mem_map
    mm.flags[heads] |= PG_isolated
    mm.refcount[heads] += 1


def putback_movable_folios(m, heads) -> None:
    """Folios that were not migrated go back: isolation reference dropped (freed if it
    was the last, e.g. the range was unmapped meanwhile)."""
    if not len(heads):
        return
    mm = m.mem_map
    mm.flags[heads] &= ~PG_isolated
    mm.refcount[heads] -= 1
    m.free_folios(heads[mm.refcount[heads] == 0])


def migrate_pages_sync(m, heads, target, mode, d=None):
    """migrate_pages_sync: batched MIGRATE_ASYNC passes first, then the folios still
    busy one at a time in ``mode``."""
    h, rc, split = migrate_pages_batch(m, heads, target, MIGRATE_ASYNC, NR_MAX_MIGRATE_ASYNC_RETRY,
                                       dispatch=d)
    busy = rc == -errno.EAGAIN
    if not busy.any():
        return h, rc, split
    outs_h, outs_rc, splits = [h[~busy]], [rc[~busy]], [split]
    for f in h[busy].tolist():
        h1, rc1, s1 = migrate_pages_batch(m, [f], target, mode, NR_MAX_MIGRATE_SYNC_RETRY, dispatch=d)
        outs_h.append(h1)
        outs_rc.append(rc1)
        splits.append(s1)
    return np.concatenate(outs_h), np.concatenate(outs_rc), np.concatenate(splits)


def _interrupted(heads):
    return heads, np.full(len(heads), -errno.EINTR, np.int32), np.empty(0, np.int64)


def migrate_pages(m, heads, target, mode=None, reason=MR_SYSCALL):
    """migrate_pages(): migrate isolated folios to ``target`` in batches of at most
    ``nr_max_batched_migration`` base pages. Returns (heads, rc): one outcome per folio
    and per piece of a split folio (0 migrated, SPLIT, or -errno; -EBUSY for folios
    still busy after every retry). Folios not migrated are put back; vmstat is counted.

    ``reason`` is the kernel's enum migrate_reason (copyengine.uapi.MR_*): policies see
    it, the ``offload_reasons`` setting may keep its batches on the CPU, vmstat counts
    pages per reason, and observers get the call's ``mm_migrate_pages`` record
    (migrate/accounting.py).

    If a hook raised (see :class:`Dispatch`), the batch in flight is settled, later
    batches do not run, every folio not migrated is put back and counted, and then the
    exception propagates: the machine is consistent again when the caller sees it."""
    mode = mode or m.settings["migrate_mode"]
    heads = np.asarray(heads, np.int64)
    mm = m.mem_map
    limit = m.settings["nr_max_batched_migration"]
    orders = mm.order[heads].astype(np.int64)
    ends = np.cumsum(np.left_shift(1, orders))
    res_h, res_rc, res_piece = [], [], []
    start_t = time.perf_counter()
    if m.quarantine:
        release_quarantine(m)
    engine = m.get_engine()
    d = Dispatch(m, engine, reason)
    d.stream = len(heads) > 0 and int(ends[-1]) * m.page_size >= NT_BYTES
    try:
        start = 0
        while start < len(heads):
            base = ends[start - 1] if start else 0
            stop = max(int(np.searchsorted(ends, base + limit, side="right")), start + 1)
            batch = heads[start:stop]
            if d.exc is not None:
                h, rc, split = _interrupted(batch)
            elif mode == MIGRATE_ASYNC:
                h, rc, split = migrate_pages_batch(m, batch, target, mode, NR_MAX_MIGRATE_PAGES_RETRY,
                                                   dispatch=d)
            else:
                h, rc, split = migrate_pages_sync(m, batch, target, mode, d)
            res_h.append(h)
            res_rc.append(rc)
            res_piece.append(np.zeros(len(h), bool))
            if len(split):  # the pieces of split folios: "minimal effort", one ASYNC pass
                if d.exc is not None:
                    h2, rc2, _ = _interrupted(split)
                else:
                    h2, rc2, _ = migrate_pages_batch(m, split, target, MIGRATE_ASYNC, 1, nosplit=True,
                                                     dispatch=d)
                res_h.append(h2)
                res_rc.append(rc2)
                res_piece.append(np.ones(len(h2), bool))
            start = stop
    finally:
        m.put_engine(engine)
    if not res_h:
        return MigrateResult(np.empty(0, np.int64), np.empty(0, np.int32), np.empty(0, bool))
    h, rc, piece = np.concatenate(res_h), np.concatenate(res_rc), np.concatenate(res_piece)
    rc[rc == -errno.EAGAIN] = -errno.EBUSY
    # Count by the folio sizes the caller queued (a split folio counts once, as failed).
    o = np.zeros(len(h), np.int64)
    if orders.any():
        order_of = dict(zip(heads.tolist(), orders.tolist()))
        whole = np.nonzero(~piece)[0]
        o[whole] = [order_of[x] for x in h[whole].tolist()]
    stats = migrate_stats(m, rc, o, mode, reason)
    count_migrate(m, stats)
    fail = (rc != 0) & (rc != SPLIT)
    putback_movable_folios(m, h[fail])
    if m.recorder is not None:
        m.recorder.call(start_t, time.perf_counter(), m.recorder.first_remap_since(start_t), **stats)
    if d.events and d.exc is None:
        for code in np.unique(rc[fail]).tolist():
            d.event("folio_fail", rc=int(code), heads=h[fail][rc[fail] == code])
        d.event("mm_migrate_pages", **stats)
    if d.exc is not None:
        raise d.exc
    return MigrateResult(h, rc, piece)


@dataclass
class MigrateResult:
    """Outcome of migrate_pages(): per folio queued (``piece`` False) and per page of a
    folio that was split on the way (``piece`` True): 0, SPLIT or -errno."""
    heads: np.ndarray
    rc: np.ndarray
    piece: np.ndarray

    def status_of(self, heads, pfns):
        """The outcome for entries that queued ``heads`` through the page ``pfns``."""
        whole = ~self.piece
        hs, rcs = self.heads[whole], self.rc[whole]
        if len(hs) == len(heads) and np.array_equal(hs, heads):
            res = rcs.copy()  # outcomes came back in the order queued (no retry reordered them)
        else:
            order = np.argsort(hs, kind="stable")
            res = rcs[order][np.searchsorted(hs[order], heads)]
        split = res == SPLIT
        if split.any():
            ph, prc = self.heads[self.piece], self.rc[self.piece]
            order = np.argsort(ph, kind="stable")
            res[split] = prc[order][np.searchsorted(ph[order], pfns[split])]
        return res
