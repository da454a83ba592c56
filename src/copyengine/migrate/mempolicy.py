"""Memory policies and the callers of migration that are not system calls on pages:
mbind(2) (mm/mempolicy.c: do_mbind, mbind_range, queue_pages_range, interleave_nid),
memory offline (mm/memory_hotplug.c: offline_pages, do_migrate_range) and demotion
(mm/vmscan.c: demote_folio_list).

A VMA's policy is ``Vma.policy``: None (the default: faults allocate on ``Vma.node``,
the node the mapping was created for, which stands in for the task's local node) or a
:class:`MemPolicy`. Faults in a VMA with a policy allocate through
:func:`copyengine.mm.mempolicy_alloc.policy_alloc_plan` (mm/: the fault path needs it).

Offline nodes are ``Machine.offline_nodes``: the allocator hands out nothing there
(``Machine.alloc_folios`` is ENOMEM, ``alloc_folios_upto`` returns nothing), so a fault
of a VMA without a policy whose node is offline fails with ENOMEM (this model binds a
mapping to its node), while policies fall back to the next node as described below.
"""
from __future__ import annotations

import errno
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import oserror
from ..mm.pageflags import OWNER_QUARANTINE, PG_allocated, PG_head, PG_isolated
from ..mm.pte import PTE_MIGRATION, PTE_PRESENT, pte_pfn
from ..uapi import (MPOL_BIND, MPOL_DEFAULT, MPOL_INTERLEAVE, MPOL_LOCAL, MPOL_MF_MOVE, MPOL_MF_MOVE_ALL,
                    MPOL_MF_STRICT, MPOL_PREFERRED, MR_DEMOTION, MR_MEMORY_HOTPLUG, MR_MEMPOLICY_MBIND)
from .accounting import SPLIT
from .core import MIGRATE_ASYNC, MIGRATE_SYNC, folio_isolate_lru, migrate_pages as migrate_folios

MPOL_MODES = (MPOL_DEFAULT, MPOL_PREFERRED, MPOL_BIND, MPOL_INTERLEAVE, MPOL_LOCAL)
MPOL_MF_VALID = MPOL_MF_STRICT | MPOL_MF_MOVE | MPOL_MF_MOVE_ALL


@dataclass(frozen=True)
class MemPolicy:
    """struct mempolicy: ``mode`` (MPOL_PREFERRED, MPOL_BIND or MPOL_INTERLEAVE) and
    ``nodes``, sorted."""
    mode: int
    nodes: tuple

    def candidates(self, m, ilx):
        """The nodes to try for folios of interleave index ``ilx`` (an array), attempt by
        attempt: a (attempts, len(ilx)) array, -1 where nothing is left. BIND: the nodes
        of the mask in id order (the kernel takes the nearest first; every node is as
        near here). PREFERRED: the preferred node (the first of the mask), then every
        other node from the next id on, wrapping. INTERLEAVE: interleave_nid's node (the
        ilx % weight-th node of the mask), then every other node likewise."""
        ilx = np.asarray(ilx, np.int64)
        mask = np.array(self.nodes, np.int64)
        if self.mode == MPOL_BIND:
            return np.repeat(mask[:, None], len(ilx), axis=1)
        first = mask[ilx % len(mask)] if self.mode == MPOL_INTERLEAVE else np.full(len(ilx), mask[0])
        return (first[None, :] + np.arange(m.nodes)[:, None]) % m.nodes

    def allowed(self):
        """The nodes a folio may sit on and conform (queue_folio_required's nodemask)."""
        return frozenset(self.nodes)


def _int(v, what):
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    return int(v)


# --------------------------------------------------------------------------- faults
# --------------------------------------------------------------------------- migration
def migrate_with_fallback(m, heads, choose, mode, reason):
    """Migrate folios to the node ``choose(heads, k)`` names for attempt k (-1: none
    left); folios (or pieces of split ones) that failed for want of memory try their
    next node. Returns (pages migrated, {errno: pages not migrated})."""
    mm = m.mem_map
    moved, failed = 0, {}
    pending = np.asarray(heads, np.int64)
    k = 0
    while len(pending):
        nodes = np.asarray(choose(pending, k), np.int64)
        gone = nodes < 0
        if gone.any():
            failed[errno.ENOMEM] = failed.get(errno.ENOMEM, 0) + int((1 << mm.order[pending[gone]].astype(np.int64)).sum())
        pending, nodes = pending[~gone], nodes[~gone]
        retry = []
        for node in np.unique(nodes).tolist():
            grp = pending[nodes == node]
            nr = dict(zip(grp.tolist(), (1 << mm.order[grp].astype(np.int64)).tolist()))
            folio_isolate_lru(m, grp)
            res = migrate_folios(m, grp, node, mode, reason=reason)
            size = np.array([1 if pc else nr[h] for h, pc in zip(res.heads.tolist(), res.piece.tolist())], np.int64)
            rc = res.rc
            moved += int(size[rc == 0].sum())
            retry.append(res.heads[rc == -errno.ENOMEM])
            for code in np.unique(rc[(rc != 0) & (rc != SPLIT) & (rc != -errno.ENOMEM)]).tolist():
                failed[-code] = failed.get(-code, 0) + int(size[rc == code].sum())
        pending = np.concatenate(retry) if retry else np.empty(0, np.int64)
        k += 1
    return moved, failed


# --------------------------------------------------------------------------- mbind
def _parse_nodes(m, mode, nodes):
    """sanitize_mpol_flags and get_nodes: the mode and the node ids (EINVAL, TypeError)."""
    if mode not in MPOL_MODES:
        raise oserror(errno.EINVAL, f"mode {mode}: not an MPOL_* mode")
    if nodes is None:
        nodes = ()
    if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
        raise TypeError(f"nodes must be an iterable of ints, not {type(nodes).__name__}")
    ids = set()
    for n in nodes:
        n = _int(n, "a node id")
        if not 0 <= n < m.nodes:
            raise oserror(errno.EINVAL, f"node {n} is not a node of this machine (0..{m.nodes - 1})")
        ids.add(n)
    return ids


def _new_policy(p, mode, ids):
    """mpol_new / mpol_set_nodemask: the new policy (None for MPOL_DEFAULT / LOCAL) or
    EINVAL."""
    m = p.machine
    if mode in (MPOL_DEFAULT, MPOL_LOCAL):
        if ids:
            raise oserror(errno.EINVAL, "MPOL_DEFAULT and MPOL_LOCAL take no nodes")
        return None
    if not ids:
        if mode == MPOL_PREFERRED:  # an empty preferred mask is local allocation
            return None
        raise oserror(errno.EINVAL, "MPOL_BIND and MPOL_INTERLEAVE need at least one node")
    ids = ids & (p.mems_allowed - m.offline_nodes)  # cpuset and N_MEMORY, as mpol_set_nodemask
    if not ids:
        raise oserror(errno.EINVAL, "no node of nodes is online and in the process's cpuset")
    if mode == MPOL_PREFERRED:
        ids = {min(ids)}
    return MemPolicy(mode, tuple(sorted(ids)))


def do_mbind(p, addr, length, mode, nodes, flags=0) -> None:
    """mbind(2), as ksys_mbind and do_mbind. Checks, in the kernel's order: the mode and
    node ids (EINVAL), flags (EINVAL), MOVE_ALL without cap_sys_nice (EPERM), alignment
    (EINVAL); an empty range then returns; then the nodes for the mode (EINVAL: none for
    BIND / INTERLEAVE, some for DEFAULT / LOCAL, none left in the cpuset and online) and,
    under the lock, a range not fully mapped (EFAULT); none of these changes anything.
    Then the policy is set on the range (mbind_range) and, with MOVE or MOVE_ALL, folios
    of the range on a node the policy does not allow are migrated (MR_MEMPOLICY_MBIND)
    to the node the policy gives them. As queue_pages_range: a folio mapped by another
    process (or copy-on-write shared) is skipped with MOVE - not a failure -, moved with
    MOVE_ALL. With STRICT, a folio that does not conform and was not moved (STRICT alone,
    busy, pinned, no memory) makes the call EIO - after the policy was set, as in Linux.
    MPOL_DEFAULT ignores STRICT. For DEFAULT / LOCAL a folio conforms on its VMA's node
    (Linux moves every folio to the local node, even one already there)."""
    m = p.machine
    addr, length = _int(addr, "addr"), _int(length, "length")
    mode, flags = _int(mode, "mode"), _int(flags, "flags")
    ids = _parse_nodes(m, mode, nodes)
    if flags & ~MPOL_MF_VALID:
        raise oserror(errno.EINVAL, f"flags {flags:#x}: only MPOL_MF_STRICT, MOVE and MOVE_ALL")
    if flags & MPOL_MF_MOVE_ALL and not p.cap_sys_nice:
        raise oserror(errno.EPERM, "MPOL_MF_MOVE_ALL needs cap_sys_nice")
    if addr % m.page_size or addr < 0:
        raise oserror(errno.EINVAL, f"addr {addr:#x} is not page aligned")
    if length < 0:
        raise oserror(errno.EINVAL, f"length {length} is negative")
    end = addr + (-(-length // m.page_size) * m.page_size)
    with m.lock:
        p.enter()
        if mode == MPOL_DEFAULT:
            flags &= ~MPOL_MF_STRICT
        if end == addr:
            return
        pol = _new_policy(p, mode, ids)
        p.span(addr, end - addr)  # EFAULT for a hole, before anything changes
        # No migration entry in the VMAs to split: a batch in flight holds them.
        p.wait_for_migration(lambda: [_seg(p, v) for v in p.find_vmas(addr, end)])
        queued, failed = _queue_pages(p, addr, end, pol, flags)
        for vma in list(p.find_vmas(addr, end)):
            mbind_range(p, vma, addr, end, pol)
        merge_vmas(p, addr - m.page_size, end + m.page_size)
        if queued:
            queued.sort(key=lambda q: q[0])
            heads = np.array([h for h, _ in queued], np.int64)

            def choose(hs, k):
                # a piece of a folio split on the way belongs to the folio queued below it
                at = np.searchsorted(heads, hs, side="right") - 1
                return np.array([_target(m, queued[i][1], h, k) for i, h in zip(at.tolist(), hs.tolist())],
                                np.int64)

            _, nf = migrate_with_fallback(m, heads, choose, MIGRATE_SYNC, MR_MEMPOLICY_MBIND)
            failed += sum(nf.values())
        if failed and flags & MPOL_MF_STRICT:
            raise oserror(errno.EIO, f"{failed} page(s) of the range do not follow the policy and were not moved")


def _seg(p, v):
    from ..mm.process import VmaRange
    return VmaRange(v, 0, v.npages)


def _target(m, queued_as, h, k):
    """alloc_migration_target_by_mpol: attempt k's node for the folio (or piece) ``h``,
    queued with (policy, home node)."""
    pol, home = queued_as
    if pol is None:
        return home if k == 0 else -1
    mm = m.mem_map
    cand = pol.candidates(m, [int(mm.index[h]) >> int(mm.order[h])])
    return int(cand[k, 0]) if k < cand.shape[0] else -1


def _queue_pages(p, start, end, pol, flags):
    """queue_pages_range with MPOL_MF_INVERT: folios of [start, end) on a node ``pol``
    does not allow. Returns ([(head, (policy, home node))], pages failed), failed being
    what STRICT reports: folios not queued that should have moved (no MOVE, isolated by
    a migration in flight)."""
    m = p.machine
    mm = m.mem_map
    shift = m.page_shift
    move = flags & (MPOL_MF_MOVE | MPOL_MF_MOVE_ALL)
    queued, seen, failed = [], set(), 0
    from .syscalls import folio_mapped_shared
    for vma in p.find_vmas(start, end):
        i0 = (max(start, vma.start) - vma.start) >> shift
        i1 = (min(end, vma.end) - vma.start) >> shift
        ptes = vma.ptes[i0:i1]
        pfn = pte_pfn(ptes[(ptes & PTE_PRESENT) != 0])
        pfn = pfn[pfn != m.zero_pfn]
        ok = pol.allowed() if pol is not None else frozenset((vma.node,))
        pfn = pfn[~np.isin(pfn // m.frames_per_node, list(ok))]
        if not len(pfn):
            continue
        heads = mm.head[pfn]
        _, first = np.unique(heads, return_index=True)
        first = np.sort(first)
        heads, pfn = heads[first], pfn[first]
        shared = folio_mapped_shared(m, heads, pfn)
        for h, sh in zip(heads.tolist(), shared.tolist()):
            if h in seen:
                continue
            seen.add(h)
            nr = 1 << int(mm.order[h])
            if not move:
                failed += nr
            elif sh and not flags & MPOL_MF_MOVE_ALL:
                continue  # "choosing not to migrate a shared folio is not counted as a failure"
            elif mm.flags[h] & PG_isolated:
                failed += nr
            else:
                queued.append((h, (pol, vma.node)))
    return queued, failed


def mbind_range(p, vma, start, end, pol):
    """mbind_range / vma_modify_policy: split ``vma`` at ``start`` and ``end`` where they
    fall inside it (split_vma), and set the policy of the part inside; :func:`merge_vmas`
    then joins neighbours that became alike (vma_merge)."""
    from ..mm.vma import Vma
    shift = p.machine.page_shift
    lo = (max(start, vma.start) - vma.start) >> shift
    hi = (min(end, vma.end) - vma.start) >> shift
    if lo == 0 and hi == vma.npages:
        vma.policy = pol
        return
    p._remove_vma(vma)
    for a, b, pl in ((0, lo, vma.policy), (lo, hi, pol), (hi, vma.npages, vma.policy)):
        if b > a:  # the page table slice is a view: the pieces share it, as munmap's split
            p._insert_vma(Vma(p, vma.start + (a << shift), vma.start + (b << shift), vma.node, vma.order,
                              vma.obj, vma.pgoff + a, vma.ptes[a:b], vma.anon_vma, policy=pl))


def merge_vmas(p, start, end):
    """vma_merge over [start, end): adjacent VMAs of one object, consecutive in it, with
    the same node, folio order, anon_vma state and policy become one (their page-table
    slices joined)."""
    from ..mm.vma import Vma
    vmas = p.find_vmas(start, end)
    i = 0
    while i + 1 < len(vmas):
        a, b = vmas[i], vmas[i + 1]
        if (a.end == b.start and a.obj is b.obj and b.pgoff == a.pgoff + a.npages and a.node == b.node
                and a.order == b.order and a.anon_vma == b.anon_vma and a.policy == b.policy):
            p._remove_vma(a)
            p._remove_vma(b)
            joined = Vma(p, a.start, b.end, a.node, a.order, a.obj, a.pgoff, np.concatenate((a.ptes, b.ptes)),
                         a.anon_vma, policy=a.policy)
            p._insert_vma(joined)
            vmas[i:i + 2] = [joined]
        else:
            i += 1


# --------------------------------------------------------------------------- hotplug / tiering
def _node_arg(m, node, what="node"):
    node = _int(node, what)
    if not 0 <= node < m.nodes:
        raise oserror(errno.EINVAL, f"{what} {node} is not a node of this machine (0..{m.nodes - 1})")
    return node


def _folios_on(m, node):
    """The allocated folio heads on ``node``, in frame order."""
    mm = m.mem_map
    lo, hi = node * m.frames_per_node, (node + 1) * m.frames_per_node
    f = mm.flags[lo:hi]
    return lo + np.flatnonzero(((f & PG_allocated) != 0) & ((f & PG_head) != 0))


def offline_pages(m, node) -> int:
    """offline_pages: take ``node`` offline, migrating every folio on it away
    (do_migrate_range, MR_MEMORY_HOTPLUG, MIGRATE_SYNC) to the next node id with room,
    wrapping (alloc_migration_target: the nearest node; all are as near here). Returns
    the pages migrated. The node is isolated first, so nothing new is allocated there
    while it drains; if anything is left it is online again afterwards, as when
    offline_pages fails, and the call raises: EBUSY if a folio could not move (pinned,
    isolated by a migration in flight, poisoned, still being written by an engine), else
    ENOMEM (no node had room). Refused with nothing changed: EINVAL for a node the
    machine lacks or a machine of one node, EBUSY for the node holding the zero page
    (reserved, unmovable memory: has_unmovable_pages). A node already offline: 0."""
    node = _node_arg(m, node)
    if m.nodes == 1:
        raise oserror(errno.EINVAL, "the only node of a machine cannot go offline")
    with m.lock:
        m.check_open()
        if node in m.offline_nodes:
            return 0
        if m.zero_pfn // m.frames_per_node == node:
            raise oserror(errno.EBUSY, f"node {node} holds reserved memory (the zero page)")
        mm = m.mem_map
        m.offline_nodes.add(node)  # start_isolate_page_range
        heads = _folios_on(m, node)
        busy = ((mm.flags[heads] & PG_isolated) != 0) | (mm.owner[heads] == OWNER_QUARANTINE)
        stuck = int((1 << mm.order[heads[busy]].astype(np.int64)).sum())
        heads = heads[~busy]

        def choose(hs, k):
            return np.full(len(hs), (node + 1 + k) % m.nodes if k < m.nodes - 1 else -1, np.int64)

        try:
            moved, failed = migrate_with_fallback(m, heads, choose, MIGRATE_SYNC, MR_MEMORY_HOTPLUG)
        except BaseException:
            m.offline_nodes.discard(node)
            raise
        nomem = failed.pop(errno.ENOMEM, 0)
        stuck += sum(failed.values())
        if stuck or nomem:
            m.offline_nodes.discard(node)  # undo_isolate_page_range
            if stuck:
                raise oserror(errno.EBUSY, f"{stuck} page(s) on node {node} could not be migrated "
                                           f"({moved} were)")
            raise oserror(errno.ENOMEM, f"no node has room for {nomem} page(s) of node {node} ({moved} migrated)")
        return moved


def online_pages(m, node) -> None:
    """online_pages: ``node`` takes allocations again. EINVAL for a node the machine
    lacks; a node already online is left as it is."""
    node = _node_arg(m, node)
    with m.lock:
        m.check_open()
        m.offline_nodes.discard(node)


def demote_folios(m, node, nr_pages) -> int:
    """demote_folio_list for a tiering policy: migrate folios of ``node`` to its
    demotion target, the next node id (EINVAL for the last node, or a target that is
    offline), MR_DEMOTION, MIGRATE_ASYNC, no fallback node. Folios are taken in page-
    table order (processes by pid, VMAs by address; which is coldest is not modelled)
    while their pages fit in ``nr_pages``; shared folios too (reclaim does not ask who
    maps a folio). Returns the base pages demoted; pinned or busy folios are left."""
    node = _node_arg(m, node)
    nr_pages = _int(nr_pages, "nr_pages")
    if nr_pages < 0:
        raise oserror(errno.EINVAL, f"nr_pages must be >= 0, got {nr_pages}")
    target = node + 1
    with m.lock:
        m.check_open()
        if target >= m.nodes or target in m.offline_nodes:
            raise oserror(errno.EINVAL, f"node {node} has no demotion target")
        mm = m.mem_map
        heads, seen, budget = [], set(), nr_pages
        for _, proc in sorted(m.processes.items()):
            for vma in proc.vmas:
                ptes = vma.ptes
                pfn = pte_pfn(ptes[((ptes & PTE_PRESENT) != 0) & ((ptes & PTE_MIGRATION) == 0)])
                pfn = pfn[(pfn // m.frames_per_node == node) & (pfn != m.zero_pfn)]
                for h in mm.head[pfn].tolist():
                    if h in seen or mm.flags[h] & PG_isolated:
                        continue
                    seen.add(h)
                    nr = 1 << int(mm.order[h])
                    if nr > budget:
                        budget = 0
                        break
                    heads.append(h)
                    budget -= nr
                if not budget:
                    break
            if not budget:
                break
        if not heads:
            return 0
        moved, _ = migrate_with_fallback(m, np.array(heads, np.int64),
                                         lambda hs, k: np.full(len(hs), target if k == 0 else -1),
                                         MIGRATE_ASYNC, MR_DEMOTION)
        return moved
