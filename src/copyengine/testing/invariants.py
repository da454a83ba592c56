"""Whole-machine invariants, a shadow model of memory contents, and state snapshots.

:func:`check_machine` checks, with array operations over the whole machine, everything
that must hold whenever no call is in progress ("at rest"):

* **frames** -- every frame is exactly one of: inside one free buddy block, part of an
  allocated folio, or hwpoisoned and taken out of the allocator for good; the zero page
  is allocated and reserved for the machine's life;
* **allocator** -- the free lists are well formed (blocks aligned, inside their node,
  not overlapping, each list a chain of its node and order whose length is ``nr_free``),
  and free memory per node is exactly the frames not allocated and not poisoned;
* **folios** -- head/tail structure, order and alignment; free frames carry no state;
* **map counts** -- each page's mapcount is the number of present PTEs naming it, in every
  process; a PTE names an allocated frame of its VMA's object at the right index (so the
  rmap walk of a migration finds it), a shared VMA's PTE agrees with the page cache, and a
  private page mapped more than once is mapped read-only (copy-on-write);
* **references** -- each folio's refcount is the sum of its pages' map counts, plus one
  for the page cache (shmem), plus its pins; no folio is allocated without a reference;
* **at rest** -- no migration entries, no PG_locked or PG_isolated page anywhere;
* **rmap roots** -- every VMA is listed in its object, every object is live;
* optionally (``shadow``) every byte every process can read is the byte last written,
  read straight from the page tables without faulting anything in, and the pins the
  shadow holds are exactly the machine's pin counts.

A failure raises :class:`InvariantError` (an AssertionError) naming the frames involved.
On a machine of a few thousand frames a check costs about a millisecond, so a state
machine can run it after every step.

:func:`snapshot` records everything a rejected call must not change; compare two with
:func:`assert_unchanged` (or :func:`diff`).
"""
from __future__ import annotations

import bisect
import hashlib

import numpy as np

from ..mm.pageflags import (OWNER_QUARANTINE, OWNER_ZERO_PAGE, PG_allocated, PG_anon, PG_head, PG_hwpoison,
                            PG_isolated, PG_locked, PG_nonzero, PG_reserved, PG_swapbacked)
from ..mm.pte import PFN_SHIFT, PTE_MIGRATION, PTE_PRESENT, PTE_WRITE

__all__ = ["InvariantError", "check_machine", "ShadowMemory", "PageWatch", "snapshot", "diff",
           "assert_unchanged", "poisoned_frames", "free_frames_expected"]

_FREE_KEEP = int(PG_nonzero | PG_hwpoison)   # the only flags a free frame may carry
_SAMPLE = 8


class InvariantError(AssertionError):
    """A machine invariant does not hold; the message says which and where."""


def _fail(what, where=None):
    if where is not None:
        where = np.asarray(where).ravel()
        more = f" (+{len(where) - _SAMPLE} more)" if len(where) > _SAMPLE else ""
        what = f"{what}: {where[:_SAMPLE].tolist()}{more}"
    raise InvariantError(what)


def _expect(cond, what, bad=None):
    if not cond:
        _fail(what, bad)


# ----------------------------------------------------------------------------- helpers
def poisoned_frames(m, node=None) -> int:
    """Frames carrying PG_hwpoison (on ``node``, or the whole machine)."""
    f = m.mem_map.flags
    if node is not None:
        f = f[node * m.frames_per_node:(node + 1) * m.frames_per_node]
    return int(np.count_nonzero(f & PG_hwpoison))


def free_frames_expected(m, node) -> int:
    """Free base pages ``node`` must have once nothing is mapped or pinned: all of its
    frames but the poisoned ones (which never return) and the zero page (node 0)."""
    return m.frames_per_node - poisoned_frames(m, node) - (1 if m.zero_pfn // m.frames_per_node == node else 0)


def _free_coverage(m):
    """(free block heads, their orders, per-frame count of free blocks covering it)."""
    b = m.buddy
    n = m.total_frames
    heads = np.nonzero(b.free_order)[0]
    orders = b.free_order[heads].astype(np.int64) - 1
    sizes = np.left_shift(1, orders)
    diff_ = np.zeros(n + 1, np.int64)
    np.add.at(diff_, heads, 1)
    np.add.at(diff_, np.minimum(heads + sizes, n), -1)
    return heads, orders, np.cumsum(diff_[:n])


def _check_buddy(m):
    b = m.buddy
    fpn = m.frames_per_node
    heads, orders, cov = _free_coverage(m)
    _expect(orders.max(initial=0) <= b.max_order, "free block of an order above max_order",
            heads[orders > b.max_order])
    sizes = np.left_shift(1, orders)
    misaligned = heads[(heads % sizes) != 0]
    _expect(not len(misaligned), "free block head not aligned to its order", misaligned)
    crosses = heads[(heads // fpn) != ((heads + sizes - 1) // fpn)]
    _expect(not len(crosses), "free block crosses a node boundary", crosses)
    _expect(cov.max(initial=0) <= 1, "frames covered by two free blocks", np.nonzero(cov > 1)[0])
    node = heads // fpn
    count = np.zeros((b.nodes, b.max_order + 1), np.int64)
    np.add.at(count, (node, orders), 1)
    if not np.array_equal(count, b.nr_free):
        bad = np.argwhere(count != b.nr_free)
        _fail(f"nr_free disagrees with the free blocks at (node, order) {bad[:_SAMPLE].tolist()}: "
              f"nr_free {b.nr_free[tuple(bad.T)][:_SAMPLE].tolist()} vs blocks {count[tuple(bad.T)][:_SAMPLE].tolist()}")
    # every list is one chain of its own node and order, exactly nr_free long
    key = node * (b.max_order + 1) + orders
    is_head = np.zeros(m.total_frames, bool)
    is_head[heads] = True
    keyof = np.full(m.total_frames, -1, np.int64)
    keyof[heads] = key
    nxt, prv = b.nxt[heads], b.prv[heads]
    for arr, name in ((nxt, "next"), (prv, "prev")):
        linked = arr >= 0
        _expect((arr < m.total_frames).all(), f"free list {name} pointer outside the machine", heads[arr >= m.total_frames])
        tgt = arr[linked]
        _expect(is_head[tgt].all(), f"free list {name} pointer to a frame that is not a free block",
                heads[linked][~is_head[tgt]])
        _expect((keyof[tgt] == key[linked]).all(), f"free list {name} pointer into another list",
                heads[linked][keyof[tgt] != key[linked]])
    linked = nxt >= 0
    _expect((b.prv[nxt[linked]] == heads[linked]).all(), "free list: prev(next(x)) != x",
            heads[linked][b.prv[nxt[linked]] != heads[linked]])
    for nd in range(b.nodes):
        for k in range(b.max_order + 1):
            want = int(b.nr_free[nd, k])
            pfn, steps = int(b.free_head[nd, k]), 0
            if want == 0:
                _expect(pfn < 0, f"free list (node {nd}, order {k}) is empty but has a head {pfn}")
                continue
            _expect(b.prv[pfn] < 0, f"free list (node {nd}, order {k}) head {pfn} has a prev")
            while pfn >= 0 and steps <= want:
                steps += 1
                pfn = int(b.nxt[pfn])
            _expect(steps == want, f"free list (node {nd}, order {k}) holds {steps}"
                                   f"{'+ (a cycle?)' if steps > want else ''} blocks, nr_free says {want}")
    return cov == 1


def _all_ptes(m):
    """(pfn, vma id, page index, pte word, shared, writable) of every PTE that is not
    pte_none, over every live process, plus the VMAs."""
    vmas = [v for p in m.processes.values() for v in p.vmas]
    if not vmas:
        z = np.empty(0, np.int64)
        return vmas, z, z, z, np.empty(0, np.uint64)
    words, vid, idx = [], [], []
    for k, v in enumerate(vmas):
        nz = np.nonzero(v.ptes)[0]
        if len(nz):
            words.append(v.ptes[nz])
            idx.append(nz)
            vid.append(np.full(len(nz), k, np.int64))
    if not words:
        z = np.empty(0, np.int64)
        return vmas, z, z, z, np.empty(0, np.uint64)
    words = np.concatenate(words)
    return vmas, (words >> PFN_SHIFT).astype(np.int64), np.concatenate(vid), np.concatenate(idx), words


# ----------------------------------------------------------------------------- the check
def check_machine(m, shadow=None) -> None:
    """Check every invariant of machine ``m`` at rest (no call in progress); raise
    :class:`InvariantError` on the first violation. ``shadow``: a :class:`ShadowMemory`
    whose contents and pins must match the machine's."""
    with m.lock:
        _check_machine(m)
        if shadow is not None:
            shadow.check(m)


def _check_machine(m):
    mm = m.mem_map
    n = m.total_frames
    fpn = m.frames_per_node
    flags = mm.flags
    z = m.zero_pfn

    # ---- frames: free, allocated, or poisoned and taken off; nothing else
    free = _check_buddy(m)
    alloc = (flags & PG_allocated) != 0
    poisoned = (flags & PG_hwpoison) != 0
    taken_off = poisoned & ~alloc
    both = np.nonzero(free & alloc)[0]
    _expect(not len(both), "frames both free and allocated", both)
    pfree = np.nonzero(free & poisoned)[0]
    _expect(not len(pfree), "poisoned frames back in the allocator", pfree)
    lost = np.nonzero(~free & ~alloc & ~poisoned)[0]
    _expect(not len(lost), "frames neither free, allocated nor poisoned (lost)", lost)
    for nd in range(m.nodes):
        sl = slice(nd * fpn, (nd + 1) * fpn)
        nfree = int(np.count_nonzero(free[sl]))
        _expect(m.free_pages(nd) == nfree, f"node {nd}: free_pages() says {m.free_pages(nd)}, "
                                           f"the free lists cover {nfree} frames")
        want = fpn - int(np.count_nonzero(alloc[sl])) - int(np.count_nonzero(taken_off[sl]))
        _expect(nfree == want, f"node {nd}: {nfree} free frames, expected {want}")

    # ---- the zero page
    _expect(bool(alloc[z]) and bool(flags[z] & PG_reserved) and bool(flags[z] & PG_head)
            and mm.owner[z] == OWNER_ZERO_PAGE and mm.order[z] == 0 and mm.head[z] == z,
            f"the zero page (frame {z}) is not an allocated, reserved order-0 folio")
    reserved = np.nonzero((flags & PG_reserved) != 0)[0]
    _expect(np.array_equal(reserved, [z]), "PG_reserved on frames other than the zero page", reserved[reserved != z])
    _expect(mm.mapcount[z] == 0 and mm.pincount[z] == 0, "the zero page has map counts or pins")

    # ---- free frames carry no state
    un = ~alloc
    bad = np.nonzero(un & ((flags & ~np.uint32(_FREE_KEEP)) != 0))[0]
    _expect(not len(bad), "unallocated frames with flags other than PG_nonzero/PG_hwpoison", bad)
    for name in ("refcount", "pincount", "mapcount"):
        arr = getattr(mm, name)
        bad = np.nonzero(un & (arr != 0))[0]
        _expect(not len(bad), f"unallocated frames with a {name}", bad)
    for name in ("refcount", "pincount", "mapcount"):
        bad = np.nonzero(getattr(mm, name) < 0)[0]
        _expect(not len(bad), f"negative {name}", bad)

    # ---- nothing locked or isolated at rest
    bad = np.nonzero((flags & (PG_locked | PG_isolated)) != 0)[0]
    _expect(not len(bad), "PG_locked or PG_isolated left at rest", bad)

    # ---- folio structure
    pages = np.nonzero(alloc)[0]
    h = mm.head[pages]
    _expect(((h >= 0) & (h < n)).all(), "head pointer outside the machine", pages[(h < 0) | (h >= n)])
    _expect(alloc[h].all(), "allocated page whose head is not allocated", pages[~alloc[h]])
    o = mm.order[pages].astype(np.int64)
    _expect((o == mm.order[h]).all(), "page order differs from its head's", pages[o != mm.order[h]])
    _expect(((o >= 0) & (o <= m.max_order)).all(), "folio order out of range", pages[(o < 0) | (o > m.max_order)])
    off = pages - h
    _expect(((off >= 0) & (off < np.left_shift(1, o))).all(), "page outside its folio",
            pages[(off < 0) | (off >= np.left_shift(1, o))])
    is_head = pages == h
    flagged = (flags[pages] & PG_head) != 0
    _expect(np.array_equal(is_head, flagged), "PG_head on a tail or missing on a head", pages[is_head != flagged])
    heads = pages[is_head]
    horder = mm.order[heads].astype(np.int64)
    _expect(((heads % np.left_shift(1, horder)) == 0).all(), "folio not naturally aligned",
            heads[(heads % np.left_shift(1, horder)) != 0])
    npages = np.bincount(h, minlength=n)[heads]
    _expect(np.array_equal(npages, np.left_shift(1, horder)), "folio with pages missing or extra",
            heads[npages != np.left_shift(1, horder)])
    tails = pages[~is_head]
    bad = tails[(mm.refcount[tails] != 0) | (mm.pincount[tails] != 0)]
    _expect(not len(bad), "tail pages with a refcount or pincount", bad)
    # private or shared anonymous memory, with an owner
    kind = flags[pages] & (PG_anon | PG_swapbacked)
    user = (pages != z) & (mm.owner[pages] != OWNER_QUARANTINE)  # quarantined: nobody's, on purpose
    bad = pages[user & ~((kind == PG_anon) | (kind == PG_swapbacked))]
    _expect(not len(bad), "allocated page neither PG_anon nor PG_swapbacked (or both)", bad)
    bad = pages[user & (mm.owner[pages] <= 0)]
    _expect(not len(bad), "allocated page without an owner", bad)
    bad = pages[user & (kind != (flags[h] & (PG_anon | PG_swapbacked)))]
    _expect(not len(bad), "page of a different kind than its head", bad)

    # ---- rmap roots: processes, VMAs, objects
    for pid, p in m.processes.items():
        _expect(p.alive and p.pid == pid, f"process {pid} in the table is not alive")
        starts = [v.start for v in p.vmas]
        _expect(starts == sorted(starts) and starts == p._starts, f"process {pid}: VMA list unsorted or index stale")
        prev_end = -1
        for v in p.vmas:
            _expect(v.mm is p, f"process {pid}: {v} belongs to another process")
            _expect(v.start % m.page_size == 0 and v.end % m.page_size == 0 and v.start < v.end
                    and (v.end - v.start) >> m.page_shift == len(v.ptes), f"process {pid}: malformed {v}")
            _expect(v.start >= prev_end, f"process {pid}: overlapping VMAs at {v.start:#x}")
            prev_end = v.end
            _expect(any(x is v for x in v.obj.vmas), f"process {pid}: {v} is missing from its object's rmap list")
            _expect(m.objects.get(v.obj.id) is v.obj, f"process {pid}: the object of {v} is not live")
            _expect(0 <= v.node < m.nodes, f"process {pid}: {v} bound to a node outside the machine")
    for oid, obj in m.objects.items():
        _expect(obj.id == oid and obj.vmas, f"object {oid} is stale (no VMA maps it)")
        for v in obj.vmas:
            _expect(v.mm.alive and m.processes.get(v.mm.pid) is v.mm and any(x is v for x in v.mm.vmas),
                    f"object {oid} lists {v} of a process that no longer maps it")

    # ---- PTEs
    vmas, pfn, vid, vidx, words = _all_ptes(m)
    mig = (words & PTE_MIGRATION) != 0
    _expect(not mig.any(), "migration entries left at rest", pfn[mig])
    present = (words & PTE_PRESENT) != 0
    _expect(present.all(), "PTE words that are neither none nor present", pfn[~present])
    _expect(((pfn >= 0) & (pfn < n)).all(), "PTE naming a frame outside the machine", pfn[(pfn < 0) | (pfn >= n)])
    _expect(alloc[pfn].all(), "PTE naming a frame that is not allocated (freed under a mapping)", pfn[~alloc[pfn]])
    if len(vmas):
        shared = np.fromiter((v.shared for v in vmas), bool, len(vmas))[vid]
        objid = np.fromiter((v.obj.id for v in vmas), np.int64, len(vmas))[vid]
        pgoff = np.fromiter((v.pgoff for v in vmas), np.int64, len(vmas))[vid]
    else:
        shared = np.empty(0, bool)
        objid = pgoff = np.empty(0, np.int64)
    zero = pfn == z
    _expect(not (zero & shared).any(), "the zero page mapped in a shared mapping", vidx[zero & shared])
    writable = (words & PTE_WRITE) != 0
    _expect(not (zero & writable).any(), "the zero page mapped writable", vidx[zero & writable])
    real = ~zero
    rp = pfn[real]
    bad = rp[(mm.owner[rp] != objid[real]) | (mm.index[rp] != pgoff[real] + vidx[real])]
    _expect(not len(bad), "PTE naming a page of another object or index (the rmap walk would miss it)", bad)
    bad = rp[((flags[rp] & PG_swapbacked) != 0) != shared[real]]
    _expect(not len(bad), "shared mapping of a private page, or private mapping of a shmem page", bad)
    maps = np.bincount(rp, minlength=n)
    maps[z] = 0
    bad = np.nonzero(maps != mm.mapcount)[0]
    if len(bad):
        _fail(f"mapcount differs from the present PTEs naming the page at frames {bad[:_SAMPLE].tolist()}: "
              f"mapcount {mm.mapcount[bad[:_SAMPLE]].tolist()}, PTEs {maps[bad[:_SAMPLE]].tolist()}")
    cow = real & ~shared & writable
    bad = pfn[cow][mm.mapcount[pfn[cow]] != 1]
    _expect(not len(bad), "private page mapped more than once but writable (copy-on-write broken)", bad)

    # ---- page caches (shmem): each slot an allocated page of the object at that index
    cache_ref = np.zeros(n, np.int64)
    cached_pages = []
    for oid, obj in m.objects.items():
        if not obj.shared:
            continue
        slots = np.nonzero(obj.cache >= 0)[0]
        cp = obj.cache[slots]
        _expect(((cp >= 0) & (cp < n)).all() and alloc[cp].all(),
                f"shmem object {oid}: page cache names unallocated frames", cp[~alloc[np.clip(cp, 0, n - 1)]])
        bad = cp[(mm.owner[cp] != oid) | (mm.index[cp] != slots) | ((flags[cp] & PG_swapbacked) == 0)]
        _expect(not len(bad), f"shmem object {oid}: page cache slot names a page of another object or index", bad)
        cached_pages.append(cp)
    for v in vmas:
        if v.shared:
            idx = np.nonzero(v.ptes & PTE_PRESENT)[0]
            pf = (v.ptes[idx] >> PFN_SHIFT).astype(np.int64)
            bad = pf[v.obj.cache[v.pgoff + idx] != pf]
            _expect(not len(bad), f"{v}: PTE disagrees with the page cache", bad)
    if cached_pages:
        cp = np.concatenate(cached_pages)
        dup = np.nonzero(np.bincount(cp, minlength=n) > 1)[0]
        _expect(not len(dup), "a page in two page-cache slots", dup)
        ch = np.unique(mm.head[cp])
        cache_ref[ch] = 1
        counted = np.bincount(mm.head[cp], minlength=n)[ch]
        bad = ch[counted != np.left_shift(1, mm.order[ch].astype(np.int64))]
        _expect(not len(bad), "shmem folio only partly in the page cache", bad)
    sb = heads[((flags[heads] & PG_swapbacked) != 0) & (cache_ref[heads] == 0)]
    orphan_ok = np.array([int(mm.owner[x]) not in m.objects for x in sb.tolist()], bool)
    _expect(orphan_ok.all() if len(sb) else True,
            "shmem folio of a live object missing from its page cache", sb[~orphan_ok] if len(sb) else None)

    # ---- references: map counts + page cache + pins, and never zero
    uh = heads[(heads != z) & (mm.owner[heads] != OWNER_QUARANTINE)]
    fol_maps = np.bincount(h, weights=mm.mapcount[pages], minlength=n).astype(np.int64)
    want = fol_maps[uh] + cache_ref[uh] + mm.pincount[uh]
    bad = np.nonzero(mm.refcount[uh] != want)[0]
    if len(bad):
        b = uh[bad[:_SAMPLE]]
        _fail(f"refcount differs from map counts + page cache + pins at folios {b.tolist()}: "
              f"refcount {mm.refcount[b].tolist()}, maps {fol_maps[b].tolist()}, "
              f"cache {cache_ref[b].tolist()}, pins {mm.pincount[b].tolist()}")
    bad = uh[mm.refcount[uh] <= 0]
    _expect(not len(bad), "allocated folio with no reference (leaked)", bad)

    # ---- counters
    v = m._vmstat
    _expect(int(v["nr_hwpoison"]) == int(np.count_nonzero(poisoned)),
            f"vmstat nr_hwpoison {v['nr_hwpoison']} != {int(np.count_nonzero(poisoned))} poisoned frames")
    net = int(v["pgalloc"]) - int(v["pgfree"])
    nalloc = int(np.count_nonzero(alloc)) - 1
    _expect(nalloc <= net <= nalloc + int(np.count_nonzero(taken_off)),
            f"pgalloc - pgfree = {net}, but {nalloc} frames are allocated "
            f"({int(np.count_nonzero(taken_off))} poisoned frames taken off)")
    for k, val in v.items():
        _expect(int(val) >= 0, f"vmstat {k} is negative ({val})")


# ----------------------------------------------------------------------------- shadow
class _Seg:
    """[start, end) of one process in the shadow: ``buf`` (a uint8 array; shared
    segments of several processes hold the same array) from ``off``."""
    __slots__ = ("start", "end", "shared", "buf", "off")

    def __init__(self, start, end, shared, buf, off):
        self.start, self.end, self.shared, self.buf, self.off = start, end, shared, buf, off

    def view(self, lo, hi):
        return self.buf[self.off + lo - self.start:self.off + hi - self.start]


class ShadowMemory:
    """What every process should read, kept beside a machine by a test.

    Private mappings are copied at fork (copy-on-write is invisible to readers); shared
    mappings are one array that every process mapping them sees. Call the methods after
    the machine's call succeeded: ``mmap``, ``munmap``, ``write``, ``fork``, ``exit``,
    ``pin``/``unpin`` (pins are tracked to check pin counts exactly). ``expect(p, a, n)``
    gives the bytes a read must return; ``check(m)`` compares every readable byte of
    every process, read from the page tables without faulting, skipping poisoned frames.
    """

    def __init__(self, m):
        self.page_size = m.page_size
        self.procs: dict[int, list[_Seg]] = {}
        self.pins = []

    # -- updates
    def spawn(self, p):
        self.procs[p.pid] = []

    def mmap(self, p, addr, length, shared):
        length = -(-length // self.page_size) * self.page_size
        segs = self.procs.setdefault(p.pid, [])
        seg = _Seg(addr, addr + length, shared, np.zeros(length, np.uint8), 0)
        segs.insert(bisect.bisect([s.start for s in segs], addr), seg)

    def munmap(self, p, addr, length):
        length = -(-length // self.page_size) * self.page_size
        lo, hi = addr, addr + length
        out = []
        for s in self.procs.get(p.pid, []):
            if s.end <= lo or s.start >= hi:
                out.append(s)
                continue
            if s.start < lo:
                out.append(_Seg(s.start, lo, s.shared, s.buf, s.off))
            if s.end > hi:
                out.append(_Seg(hi, s.end, s.shared, s.buf, s.off + hi - s.start))
        self.procs[p.pid] = out

    def covers(self, p, addr, n) -> bool:
        """Is every byte of [addr, addr+n) mapped in ``p`` (n > 0)?"""
        cur, end = addr, addr + n
        for s in self.procs.get(p.pid, []):
            if s.end <= cur:
                continue
            if s.start > cur:
                return False
            cur = s.end
            if cur >= end:
                return True
        return cur >= end

    def _pieces(self, p, addr, n):
        end = addr + n
        for s in self.procs.get(p.pid, []):
            lo, hi = max(s.start, addr), min(s.end, end)
            if lo < hi:
                yield s, lo, hi

    def write(self, p, addr, data):
        data = np.frombuffer(bytes(data), np.uint8)
        for s, lo, hi in self._pieces(p, addr, len(data)):
            s.view(lo, hi)[:] = data[lo - addr:hi - addr]

    def expect(self, p, addr, n) -> bytes:
        out = bytearray(n)
        for s, lo, hi in self._pieces(p, addr, n):
            out[lo - addr:hi - addr] = s.view(lo, hi).tobytes()
        return bytes(out)

    def fork(self, parent, child):
        segs = []
        copies = {}
        for s in self.procs.get(parent.pid, []):
            if s.shared:
                segs.append(_Seg(s.start, s.end, True, s.buf, s.off))
            else:
                # pieces of one private mapping stay separate arrays in the child
                buf = copies.get(id(s))
                if buf is None:
                    buf = copies[id(s)] = s.view(s.start, s.end).copy()
                segs.append(_Seg(s.start, s.end, False, buf, 0))
        self.procs[child.pid] = segs

    def exit(self, p):
        self.procs.pop(p.pid, None)

    def pin(self, pin):
        self.pins.append(pin)

    def unpin(self, pin):
        self.pins.remove(pin)

    def mapped(self, p):
        return [(s.start, s.end, s.shared) for s in self.procs.get(p.pid, [])]

    # -- the check
    def check(self, m):
        mm = m.mem_map
        ps = m.page_size
        mem2d = m.mem.reshape(-1, ps)
        pins = np.zeros(m.total_frames, np.int64)
        live = [pn for pn in self.pins if not pn.released]
        if live:
            np.add.at(pins, np.concatenate([pn.heads for pn in live]), 1)
        bad = np.nonzero(pins != mm.pincount)[0]
        _expect(not len(bad), "pin counts differ from the pins held", bad)
        _expect(sorted(self.procs) == sorted(m.processes),
                f"processes {sorted(m.processes)} but the shadow has {sorted(self.procs)}")
        for pid, segs in self.procs.items():
            p = m.processes[pid]
            got = [(v.start, v.end, v.shared) for v in p.vmas]
            want = [(s.start, s.end, s.shared) for s in segs]
            _expect(got == want, f"process {pid}: mappings {got} but the shadow has {want}")
            for v, s in zip(p.vmas, segs):
                ptes = v.ptes
                pfn = np.where((ptes & PTE_PRESENT) != 0, (ptes >> PFN_SHIFT).astype(np.int64), -1)
                if v.shared:
                    none = pfn < 0
                    pfn[none] = v.obj.cache[v.pgoff + np.nonzero(none)[0]]
                pfn[pfn == m.zero_pfn] = -1
                has = pfn >= 0
                poisoned = np.zeros(len(pfn), bool)
                poisoned[has] = (mm.flags[pfn[has]] & PG_hwpoison) != 0
                want_b = s.view(s.start, s.end).reshape(-1, ps)
                actual = np.zeros_like(want_b)
                ok = has & ~poisoned
                actual[ok] = mem2d[pfn[ok]]
                diff_ = np.nonzero((actual != want_b).any(axis=1) & ~poisoned)[0]
                if len(diff_):
                    i = int(diff_[0])
                    col = int(np.nonzero(actual[i] != want_b[i])[0][0])
                    _fail(f"process {pid}: {len(diff_)} page(s) hold other bytes than last written; first at "
                          f"{v.start + i * ps + col:#x} (frame {int(pfn[i])}): {int(actual[i, col])} "
                          f"instead of {int(want_b[i, col])}")


# ----------------------------------------------------------------------------- snapshots
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
