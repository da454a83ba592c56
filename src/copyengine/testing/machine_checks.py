"""Whole-machine invariants at rest: :func:`check_machine` (and the error it raises).

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
* optionally (``shadow``, a :class:`~copyengine.testing.shadow.ShadowMemory`) every byte
  every process can read is the byte last written, read straight from the page tables
  without faulting anything in, and the pins the shadow holds are exactly the machine's
  pin counts.

A failure raises :class:`InvariantError` (an AssertionError) naming the frames involved.
On a machine of a few thousand frames a check costs about a millisecond, so a state
machine can run it after every step.
"""
from __future__ import annotations

import numpy as np

from ..mm.pageflags import (OWNER_QUARANTINE, OWNER_ZERO_PAGE, PG_allocated, PG_anon, PG_head, PG_hwpoison,
                            PG_isolated, PG_locked, PG_nonzero, PG_reserved, PG_swapbacked)
from ..mm.pte import PFN_SHIFT, PTE_MIGRATION, PTE_PRESENT, PTE_WRITE

__all__ = ["InvariantError", "check_machine", "poisoned_frames", "free_frames_expected"]

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
