"""move_pages(2) (mm/migrate.c) and migrate_pages(2) (mm/mempolicy.c).

Addresses are looked up a run at a time with array operations (vma_lookup, the PTE,
the folio, its node) and then walked in order, as do_pages_move does: consecutive entries
for the same node are queued and flushed when the node changes or an entry is not queued.
"""
from __future__ import annotations

import errno
import numbers
from dataclasses import dataclass

import numpy as np

from ..errors import oserror
from ..mm.pageflags import PG_isolated
from ..mm.process import MPOL_MF_MOVE, MPOL_MF_MOVE_ALL
from ..mm.pte import PTE_MIGRATION, PTE_PRESENT, pte_pfn
from .accounting import SPLIT
from .fastpath import move_pages_fast, query_fast
from .core import folio_isolate_lru, migrate_pages as migrate_folios, putback_movable_folios

QUEUE = 1 << 30  # classification: the folio can be queued for migration


@dataclass
class MovePagesResult:
    """What move_pages(2) gives back: ``ret`` and one ``status`` per address."""
    ret: int
    status: list

    def __iter__(self):  # r.ret, r.status = ...; also ret, status = r
        return iter((self.ret, self.status))


# --------------------------------------------------------------------------- checks
def _int(v, what):
    if type(v) is int:  # the common case, without the ABC check
        return v
    if isinstance(v, bool) or not isinstance(v, numbers.Integral):
        raise TypeError(f"{what} must be an int, not {type(v).__name__}")
    return int(v)


def _int_array(values, what):
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise TypeError(f"{what} must be a sequence of ints, not {type(values).__name__}")
    if isinstance(values, np.ndarray):
        if values.dtype.kind not in "iu":
            raise TypeError(f"{what} must hold ints, not {values.dtype}")
        if values.ndim != 1:  # like a list of lists: not a sequence of ints (issue 14)
            raise TypeError(f"{what} must be a 1-D array, not one of shape {values.shape}")
        return values.astype(np.int64)
    lst = list(values)
    for v in lst:
        if type(v) is not int and (isinstance(v, bool) or not isinstance(v, numbers.Integral)):
            raise TypeError(f"{what} holds {v!r}, not an int")
    try:
        return np.array(lst, dtype=np.int64)
    except OverflowError:
        raise oserror(errno.EFAULT, f"{what} holds a value outside the address space") from None


def find_mm_struct(caller, pid):
    """find_mm_struct / ptrace_may_access: ESRCH for no such process, EPERM for another
    user's process without cap_sys_nice (uid 0 alone grants nothing here)."""
    pid = _int(pid, "pid")
    m = caller.machine
    target = caller if pid == 0 else m.processes.get(pid)
    if target is None or not target.alive:
        raise oserror(errno.ESRCH, f"no process with pid {pid}")
    if target is not caller and target.uid != caller.uid and not caller.cap_sys_nice:
        raise oserror(errno.EPERM, f"process {caller.pid} may not act on process {pid}")
    return target


# --------------------------------------------------------------------------- lookup
def lookup_pages(target, addrs, node, migrate_all):
    """add_page_for_migration's checks for many addresses at once. Returns (code, head,
    pfn): code is QUEUE, the node the page already sits on, or -errno."""
    m = target.machine
    mm = m.mem_map
    n = len(addrs)
    code = np.full(n, -errno.EFAULT, np.int64)
    pfn = np.full(n, -1, np.int64)
    if not target.vmas or not n:
        return code, pfn.copy(), pfn
    starts = np.fromiter((v.start for v in target.vmas), np.int64, len(target.vmas))
    ends = np.fromiter((v.end for v in target.vmas), np.int64, len(target.vmas))
    vi = np.searchsorted(starts, addrs, side="right") - 1
    inside = (vi >= 0) & (addrs < ends[np.maximum(vi, 0)])
    ptes = np.zeros(n, np.uint64)
    for k in np.unique(vi[inside]).tolist():
        sel = np.nonzero(inside & (vi == k))[0] if len(target.vmas) > 1 else np.nonzero(inside)[0]
        vma = target.vmas[k]
        ptes[sel] = vma.ptes[(addrs[sel] - vma.start) >> m.page_shift]
    present = inside & ((ptes & PTE_PRESENT) != 0)
    code[inside] = -errno.ENOENT
    code[inside & ((ptes & PTE_MIGRATION) != 0)] = -errno.EBUSY  # being migrated right now
    pfn[present] = pte_pfn(ptes[present])
    zero = present & (pfn == m.zero_pfn)
    code[zero] = -errno.EFAULT
    live = present & ~zero
    idx = np.nonzero(live)[0]
    head = np.full(n, -1, np.int64)
    if len(idx):
        p = pfn[idx]
        h = mm.head[p]
        head[idx] = h
        nid = h // m.frames_per_node
        c = np.full(len(idx), QUEUE, np.int64)
        if node is not None:
            shared = folio_mapped_shared(m, h, p)
            if not migrate_all:
                c[shared] = -errno.EACCES
            c[(mm.flags[h] & PG_isolated) != 0] = -errno.EBUSY
            c[nid == node] = node
        else:
            c = nid
        code[idx] = c
    return code, head, pfn


def folio_mapped_shared(m, heads, pfns) -> np.ndarray:
    """Is each folio mapped more than once (another process, or copy-on-write shared)?
    Per folio, not per page: a large folio whose other pages are still shared after a
    partial COW break is shared."""
    mm = m.mem_map
    shared = mm.mapcount[pfns] > 1
    large = np.nonzero(mm.order[heads] > 0)[0]
    if len(large):
        for h in np.unique(heads[large]).tolist():
            nr = 1 << int(mm.order[h])
            if (mm.mapcount[h:h + nr] > 1).any():
                shared[heads == h] = True
    return shared


# --------------------------------------------------------------------------- move_pages
def move_pages(caller, pid, pages, nodes=None, flags=MPOL_MF_MOVE) -> MovePagesResult:
    """move_pages(2). With ``nodes`` None, report where each page is (query mode).

    Call-level errors, in the kernel's order: EINVAL (flags), EPERM (MOVE_ALL without
    cap_sys_nice, or another user's process), ESRCH, then per entry ENODEV / EACCES
    (raised when that entry is reached, with ``status`` of the entries before it).
    """
    m = caller.machine
    flags = _int(flags, "flags")
    addrs = _int_array(pages, "pages")
    nodes_arr = None if nodes is None else _int_array(nodes, "nodes")
    if nodes_arr is not None and len(nodes_arr) != len(addrs):
        raise oserror(errno.EINVAL, f"{len(addrs)} pages but {len(nodes_arr)} nodes")
    if flags & ~(MPOL_MF_MOVE | MPOL_MF_MOVE_ALL):
        raise oserror(errno.EINVAL, f"flags {flags:#x}: only MPOL_MF_MOVE and MPOL_MF_MOVE_ALL")
    if flags & MPOL_MF_MOVE_ALL and not caller.cap_sys_nice:
        raise oserror(errno.EPERM, "MPOL_MF_MOVE_ALL needs cap_sys_nice")
    with m.lock:
        caller.enter()
        target = find_mm_struct(caller, pid)
        addrs = addrs & ~np.int64(m.page_size - 1)
        if nodes_arr is None:
            return MovePagesResult(0, do_pages_stat(target, addrs))
        return do_pages_move(target, addrs, nodes_arr, bool(flags & MPOL_MF_MOVE_ALL))


def do_pages_stat(target, addrs) -> list:
    """Query mode: the node of each page, -ENOENT never touched, -EFAULT unmapped or the
    zero page. Pages under migration are waited for (bounded)."""
    from ..mm.process import VmaRange
    m = target.machine
    if len(addrs):
        fast = query_fast(target, addrs)
        if fast is not None:
            return fast.tolist()

    def resolve():
        segs = []
        for a in np.unique(addrs).tolist():
            vma = target.find_vma(a)
            if vma is not None:
                i = (a - vma.start) >> m.page_shift
                segs.append(VmaRange(vma, i, i + 1))
        return segs

    target.wait_for_migration(resolve)
    code, _, _ = lookup_pages(target, addrs, None, False)
    return code.tolist()


class _Pending:
    """Entries queued for the current node (the kernel's pagelist and start index)."""

    def __init__(self):
        self.entries, self.heads, self.pfns = [], [], []

    def add(self, entries, heads, pfns):
        self.entries.append(entries)
        self.heads.append(heads)
        self.pfns.append(pfns)

    def take(self):
        """Everything queued, as three arrays; the queue is empty afterwards."""
        out = tuple(np.concatenate(x) for x in (self.entries, self.heads, self.pfns))
        self.entries, self.heads, self.pfns = [], [], []
        return out

    def __bool__(self):
        return bool(self.entries)


#: entries looked up at once after a migration changed the pages (grows while none does)
LOOKUP_WINDOW = 256


def _stoppers(code, head):
    """Entries that end a queue run: not queueable, or a folio already queued earlier in
    the same lookup (isolation would fail: -EBUSY). Returns (positions, is-duplicate)."""
    q = code == QUEUE
    dup = np.zeros(len(code), bool)
    if q.any():
        qi = np.flatnonzero(q)
        hq = head[qi]
        if len(hq) > 1 and not (hq[1:] > hq[:-1]).all():  # else all distinct
            _, first = np.unique(hq, return_index=True)
            d = np.ones(len(qi), bool)
            d[first] = False
            dup[qi[d]] = True
    return np.flatnonzero(~q | dup), dup


def do_pages_move(target, addrs, nodes, migrate_all) -> MovePagesResult:
    """do_pages_move: entries in order; runs of one node are queued and flushed when the
    node changes or an entry is not queued (its status is stored first).

    Linear in the entries: they are looked up a window at a time, and looked up again
    only after a flush migrated something (the pages after it may have changed). Whatever
    goes wrong (a hook raising, an interrupt), folios still queued are put back before
    the exception propagates."""
    m = target.machine
    n = len(addrs)
    if not n:
        return MovePagesResult(0, [])
    node = int(nodes[0])
    if (n == 1 or (nodes == node).all()) and 0 <= node < m.nodes and node in target.mems_allowed \
            and node not in m.offline_nodes:
        fast = move_pages_fast(target, addrs, node)  # None: the call needs the full path
        if fast is not None:
            return MovePagesResult(fast[0], fast[1].tolist())
    status = np.zeros(n, np.int64)
    reached = np.zeros(n, bool)
    failed = 0
    pending = _Pending()
    current = None

    def flush():
        """move_pages_and_store_status: migrate the queue, one status per entry."""
        nonlocal failed
        if not pending:
            return False
        entries, heads, pfns = pending.take()
        res = migrate_folios(m, heads, current).status_of(heads, pfns)
        status[entries] = np.where(res == 0, current, res)
        failed += int((res != 0).sum())
        return True

    runs = np.concatenate(([0], np.flatnonzero(np.diff(nodes)) + 1, [n]))
    try:
        for r in range(len(runs) - 1):
            i, j = int(runs[r]), int(runs[r + 1])
            node = int(nodes[i])
            if not 0 <= node < m.nodes or node in m.offline_nodes:  # !node_state(node, N_MEMORY)
                raise _Stop(errno.ENODEV, f"node {node} does not exist (entry {i})")
            if node not in target.mems_allowed:
                raise _Stop(errno.EACCES, f"node {node} is outside the process's cpuset (entry {i})")
            if current is not None and node != current:
                flush()
            current = node
            pos, window = i, LOOKUP_WINDOW
            while pos < j:
                hi = min(j, pos + window)
                code, head, pfn = lookup_pages(target, addrs[pos:hi], node, migrate_all)
                stops, dup = _stoppers(code, head)
                off, si, moved = 0, 0, False
                while off < hi - pos:
                    k = int(stops[si]) if si < len(stops) else hi - pos
                    if k > off:  # a run of queueable entries
                        folio_isolate_lru(m, head[off:k])
                        pending.add(np.arange(pos + off, pos + k), head[off:k].copy(), pfn[off:k].copy())
                    if k == hi - pos:
                        break
                    if not pending:  # nothing to flush: store every stopper up to the next queue run
                        e = si
                        while e + 1 < len(stops) and stops[e + 1] == stops[e] + 1:
                            e += 1
                        seg = stops[si:e + 1]
                        status[pos + seg] = np.where(dup[seg], -errno.EBUSY, code[seg])
                        si, off = e + 1, int(stops[e]) + 1
                        continue
                    status[pos + k] = -errno.EBUSY if dup[k] else code[k]
                    si, off = si + 1, k + 1
                    if flush():
                        moved = True
                        break  # folios moved: look the rest of the run up again
                end = pos + off if moved else hi
                reached[pos:end] = True
                pos = end
                window = LOOKUP_WINDOW if moved else min(2 * window, 1 << 16)
        flush()
    except _Stop as stop:
        flush()
        st = [int(s) if r_ else None for s, r_ in zip(status.tolist(), reached.tolist())]
        err = oserror(stop.errno, stop.detail)
        err.status = st
        raise err from None
    except BaseException:
        if pending:  # queued but never migrated: back on the LRU before the error propagates
            putback_movable_folios(m, pending.take()[1])
        raise
    return MovePagesResult(failed, status.tolist())


class _Stop(Exception):
    def __init__(self, code, detail):
        super().__init__(detail)
        self.errno, self.detail = code, detail


# --------------------------------------------------------------------------- migrate_pages
def node_remap(s, old, new):
    """node_remap: the node of ``new`` at the position ``s`` has in ``old`` (mod weight)."""
    new = sorted(new)
    if not new:
        return s
    return new[sorted(old).index(s) % len(new)]


def migrate_pages(caller, pid, old_nodes, new_nodes) -> int:
    """migrate_pages(2): move every page of process ``pid`` on ``old_nodes`` to
    ``new_nodes`` (do_migrate_pages' pairing). Returns the folios not migrated.

    As kernel_migrate_pages (checked against Linux 6.12): the masks are parsed first (a
    malformed one is EINVAL or TypeError), then the process is looked up (ESRCH, EPERM).
    A node id the machine does not have is in no cpuset: in ``new_nodes`` it is EPERM
    without cap_sys_nice and otherwise dropped (nodes_and with the caller's cpuset); if
    nothing is left the call is EINVAL (the error kernel_migrate_pages has set by then).
    In ``old_nodes`` such an id is ignored."""
    m = caller.machine
    old, _ = _node_mask(m, old_nodes, "old_nodes")
    new, absent = _node_mask(m, new_nodes, "new_nodes")
    with m.lock:
        caller.enter()
        target = find_mm_struct(caller, pid)
        if new & m.offline_nodes:  # a node without memory has left every cpuset (cpuset_hotplug)
            absent, new = True, new - m.offline_nodes
        if (absent or not new <= target.mems_allowed) and not caller.cap_sys_nice:
            raise oserror(errno.EPERM, "new_nodes outside the target's cpuset need cap_sys_nice")
        new = new & caller.mems_allowed
        if not new:
            raise oserror(errno.EINVAL, "no node of new_nodes is in the caller's cpuset")
        return do_migrate_pages(target, old, new, caller.cap_sys_nice)


MAX_NUMNODES = 1024


def _node_mask(m, nodes, what):
    """get_nodes: Machine.node_set's type checks, EINVAL for an id no nodemask holds
    (negative, or MAX_NUMNODES and up). Returns (the nodes of the machine named, the
    other ids)."""
    if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
        raise TypeError(f"{what} must be an iterable of ints, not {type(nodes).__name__}")
    nodes = list(nodes)
    # ids the machine lacks but a nodemask can hold (MAX_NUMNODES, 1024 in Debian's kernels)
    absent = [isinstance(n, numbers.Integral) and not isinstance(n, bool) and m.nodes <= n < MAX_NUMNODES
              for n in nodes]
    try:
        here = m.node_set([n for n, a in zip(nodes, absent) if not a], what)
    except ValueError as e:
        raise oserror(errno.EINVAL, str(e)) from None
    return here, frozenset(int(n) for n, a in zip(nodes, absent) if a)


def migrate_pairs(old, new):
    """do_migrate_pages' choice of <source, dest> node pairs, in order: a destination is,
    if possible, not itself still a source; with masks of different weights, sources that
    are also destinations are skipped ([0-7] -> [3,4,5] moves only 0,1,2,6,7)."""
    tmp = set(old)
    while tmp:
        source = dest = None
        for s in sorted(tmp):
            if len(old) != len(new) and s in new:
                continue
            d = node_remap(s, old, new)
            if s == d:
                continue
            source, dest = s, d
            if dest not in tmp:
                break
        if source is None:
            return
        tmp.discard(source)
        yield source, dest


def do_migrate_pages(target, old, new, move_all) -> int:
    """do_migrate_pages: migrate each source node's pages to its paired destination."""
    return sum(migrate_to_node(target, source, dest, move_all) for source, dest in migrate_pairs(old, new))


def migrate_to_node(target, source, dest, move_all) -> int:
    """queue_pages_range over the whole address space for folios on ``source`` (shared
    ones skipped silently unless MOVE_ALL), then migrate them. Returns folios failed."""
    m = target.machine
    mm = m.mem_map
    heads = []
    for vma in target.vmas:
        idx = np.nonzero((vma.ptes & PTE_PRESENT) != 0)[0]
        p = pte_pfn(vma.ptes[idx])
        p = p[(p != m.zero_pfn) & (p // m.frames_per_node == source)]
        if not move_all:
            p = p[~folio_mapped_shared(m, mm.head[p], p)]
        heads.append(mm.head[p])
    if not heads:
        return 0
    h = np.concatenate(heads)
    _, first = np.unique(h, return_index=True)
    h = h[np.sort(first)]
    busy = (mm.flags[h] & PG_isolated) != 0
    h = h[~busy]
    if not len(h):
        return int(busy.sum())
    folio_isolate_lru(m, h)
    res = migrate_folios(m, h, dest, m.settings["migrate_mode"])
    # migrate_pages(): a split folio counts once, as failed, its pieces' own failures not
    # at all; and 0 when every folio and piece migrated ("Return 0 in case all split
    # folios of fail-to-migrate large folios are migrated successfully")
    left = bool(((res.rc != 0) & (res.rc != SPLIT)).any())
    return int(busy.sum()) + (int(((~res.piece) & (res.rc != 0)).sum()) if left else 0)
