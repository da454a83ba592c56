"""Page faults, the zero page, copy-on-write, zap and the accesses that fault
(mm/memory.c: handle_mm_fault, do_anonymous_page, do_wp_page, zap_pte_range; plus
migration_entry_wait from mm/migrate.c, which the fault path calls). Faults are handled a
whole access at a time: planned, allocated in bulk, then committed. A mixin of
:class:`~.process.Process`."""
from __future__ import annotations

import errno
import time
from dataclasses import dataclass, field

import numpy as np

from ..errors import EHWPOISON, oserror
from .pageflags import PG_anon, PG_hwpoison, PG_locked, PG_nonzero, PG_swapbacked
from .huge_memory import release_folios, wp_anon_reuse
from .mempolicy_alloc import policy_alloc_plan
from .pmd import fault_around, huge_zero, map_cached_pmds
from .pte import PTE_MIGRATION, PTE_PRESENT, PTE_WRITE, mk_pte, pte_pfn
from .mmap import ADDRESS_LIMIT, VmaRange, _check_int

def pfn_runs(pfns: np.ndarray):
    """Split a pfn sequence into runs of consecutive frames: (start index, pfn, length)."""
    if not len(pfns):
        return []
    brk = np.nonzero(np.diff(pfns) != 1)[0] + 1
    starts = np.concatenate(([0], brk))
    lens = np.diff(np.concatenate((starts, [len(pfns)])))
    return list(zip(starts.tolist(), pfns[starts].tolist(), lens.tolist()))


@dataclass
class FaultPlan:
    """What faulting one :class:`~.mmap.VmaRange` needs, worked out before anything
    changes (the all-or-nothing fault: plan, allocate, commit)."""
    #: (order, page indices) to fill with new folios, order 0 first-fit when large fails
    new: list = field(default_factory=list)
    #: the allocated heads, one array per entry of ``new``
    heads: list = field(default_factory=list)
    #: page indices to map the zero page at (a read fault of private anonymous memory)
    zero: np.ndarray | None = None
    #: (page indices, pfns) of page-cache pages to map (shared memory)
    map_cached: tuple | None = None
    #: page indices whose read-only PTE is made writable in place (do_wp_page reuse)
    reuse: np.ndarray | None = None
    #: (page indices, old pfns) to copy on write, and the new heads for them
    cow: tuple | None = None
    cow_heads: np.ndarray | None = None
    #: a huge zero page was mapped for this range (counted as an anon_vma user)
    huge_zero: bool = False


class MemoryOps:
    """Faults, COW, zap, read/write and PTE lookups of a :class:`~.process.Process` (mm/memory.c)."""

    def wait_for_migration(self, resolve):
        """Run ``resolve()`` (-> segments) until none of its PTEs is a migration entry,
        waiting for migrations to finish (bounded by the setting migration_wait_timeout)."""
        m = self.machine
        deadline = None
        while True:
            segs = resolve()
            if not any(self._under_migration(s) for s in segs):
                return segs
            now = time.monotonic()
            if deadline is None:
                deadline = now + m.settings["migration_wait_timeout"]
            if now >= deadline:
                raise oserror(errno.ETIMEDOUT, "waited too long on a migration entry")
            m.cond.wait(deadline - now)
            self.enter()


    def _under_migration(self, seg) -> bool:
        """A migration entry in the range, or (shared memory) a page-cache folio that is
        locked for migration: faulting it in now would map a frame about to change."""
        ptes = seg.vma.ptes[seg.i0:seg.i1]
        if (ptes & PTE_MIGRATION).any():
            return True
        if not seg.vma.shared:
            return False
        none = np.nonzero(ptes == 0)[0]
        if not len(none):
            return False
        cached = seg.vma.obj.cache[seg.vma.pgoff + seg.i0 + none]
        cached = cached[cached >= 0]
        mm = self.machine.mem_map
        return bool(len(cached)) and bool((mm.flags[mm.head[cached]] & PG_locked).any())

    def _zap(self, vma, i0, i1) -> np.ndarray:
        """zap_pte_range: clear PTEs, drop map counts and references; returns the heads touched."""
        m = self.machine
        mm = m.mem_map
        ptes = vma.ptes[i0:i1]
        pfns = pte_pfn(ptes[(ptes & PTE_PRESENT) != 0])
        pfns = pfns[pfns != m.zero_pfn]
        ptes[:] = 0
        if not len(pfns):
            return pfns
        mm.mapcount[pfns] -= 1
        heads = mm.head[pfns]
        np.add.at(mm.refcount, heads, -1)
        return heads

    def _release_object(self, obj):
        """The last VMA of an object is gone: truncate a shmem object's page cache."""
        m = self.machine
        m.objects.pop(obj.id, None)
        if obj.shared:
            pfns = obj.cache[obj.cache >= 0]
            heads = np.unique(m.mem_map.head[pfns])
            obj.cache[:] = -1
            m.mem_map.refcount[heads] -= 1
            m.free_folios(heads[m.mem_map.refcount[heads] == 0])

    def _release_folios(self, heads):
        """Drop folios whose last reference went; see :func:`huge_memory.release_folios`."""
        release_folios(self.machine, heads)

    # ------------------------------------------------------------------ faults
    def _plan(self, seg, write):
        """Work out what faulting seg's pages needs; raise EHWPOISON before changing anything."""
        m = self.machine
        mm = m.mem_map
        vma = seg.vma
        ptes = vma.ptes[seg.i0:seg.i1]
        present = (ptes & PTE_PRESENT) != 0
        cur = pte_pfn(ptes[present])
        if len(cur) and (mm.flags[cur] & PG_hwpoison).any():
            bad = cur[(mm.flags[cur] & PG_hwpoison) != 0][0]
            raise oserror(EHWPOISON, f"frame {bad} is poisoned")
        plan = FaultPlan()
        none_idx = np.nonzero(~present)[0] + seg.i0
        if len(none_idx):
            if vma.shared:
                pg = vma.pgoff + none_idx
                cached = vma.obj.cache[pg]
                have = cached >= 0
                if have.any():
                    cp = cached[have]
                    if (mm.flags[cp] & PG_hwpoison).any():
                        raise oserror(EHWPOISON, "a page of the shared object is poisoned")
                    plan.map_cached = (none_idx[have], cp)
                    map_cached_pmds(self, seg, plan)
                if not write:
                    fault_around(self, seg, none_idx, plan)
                holes = none_idx[~have]
                if len(holes):
                    plan.new = self._plan_new(vma, holes, cache=vma.obj.cache)
            elif write:
                plan.new = self._plan_new(vma, none_idx, cache=None)
            else:
                plan.zero = huge_zero(self, vma, none_idx, plan)
        if write and not vma.shared:
            ro = present & ((ptes & PTE_WRITE) == 0)
            if ro.any():
                idx = np.nonzero(ro)[0] + seg.i0
                old = pte_pfn(vma.ptes[idx])
                heads = mm.head[old]
                excl = (old != m.zero_pfn) & (mm.mapcount[old] == 1) & (mm.pincount[heads] == 0)
                if excl.any():
                    # reuse only if no other page of the folio is mapped elsewhere or referenced
                    uh = np.unique(heads[excl])
                    ok = {int(h) for h in uh.tolist() if self._folio_exclusive(int(h))}
                    excl &= np.fromiter((int(h) in ok for h in heads.tolist()), bool, len(heads))
                reuse, cow = wp_anon_reuse(m, vma, idx, old, excl)
                plan.reuse = reuse
                plan.cow = (idx[cow], old[cow])
        seg.plan = plan
        return plan

    def _folio_exclusive(self, h):
        mm = self.machine.mem_map
        nr = 1 << int(mm.order[h])
        mc = mm.mapcount[h:h + nr]
        return bool((mc <= 1).all()) and int(mc.sum()) + self._cache_refs(h) == int(mm.refcount[h])

    def _cache_refs(self, h):
        return 1 if self.machine.mem_map.flags[h] & PG_swapbacked else 0

    def _plan_new(self, vma, idx, cache):
        """Split the pages to allocate into naturally aligned large folios where the whole
        aligned range is inside the VMA and untouched, and single pages otherwise."""
        o = vma.order
        if o == 0:
            return [(0, idx)]
        nr = 1 << o
        base_vpn = vma.start >> self.machine.page_shift
        groups = np.unique((base_vpn + idx) >> o)
        first = (groups << o) - base_vpn
        inside = (first >= 0) & (first + nr <= vma.npages)
        big = []
        for g0 in first[inside].tolist():
            rng = slice(g0, g0 + nr)
            if (vma.ptes[rng] == 0).all() and (cache is None or (cache[vma.pgoff + g0:vma.pgoff + g0 + nr] < 0).all()):
                big.append(g0)
        out = []
        small = idx
        if big:
            big = np.array(big, np.int64)
            out.append((o, (big[:, None] + np.arange(nr)[None, :]).ravel()))
            covered = np.zeros(vma.npages, bool)
            covered[out[0][1]] = True
            small = idx[~covered[idx]]
        if len(small):
            out.append((0, small))
        return out

    def _alloc_plans(self, segs):
        """Allocate every folio the plans need, all or nothing (ENOMEM frees what was taken)."""
        m = self.machine
        got = []
        try:
            for s in segs:
                if s.vma.policy is not None:  # an mbind(2) policy picks the node(s)
                    policy_alloc_plan(m, s, got)
                    continue
                p = s.plan
                p.heads, planned, p.new = [], p.new, []
                for order, idx in planned:
                    if order:
                        # A large folio the node cannot supply falls back to base pages,
                        # as the mTHP fault path does.
                        heads = m.alloc_folios_upto(s.vma.node, order, len(idx) >> order)
                        got.append(heads)
                        if len(heads):
                            p.new.append((order, idx[:len(heads) << order]))
                            p.heads.append(heads)
                        # Only the pages this access touches fall back (alloc_anon_folio
                        # maps one order-0 page for the faulting address), not the
                        # whole aligned range the large folio would have covered.
                        idx = idx[len(heads) << order:]
                        idx = idx[(idx >= s.i0) & (idx < s.i1)]
                        if not len(idx):
                            continue
                    heads = m.alloc_folios(s.vma.node, 0, len(idx))
                    got.append(heads)
                    p.new.append((0, idx))
                    p.heads.append(heads)
                cow = p.cow
                p.cow_heads = None
                if cow is not None and len(cow[0]):
                    heads = m.alloc_folios(s.vma.node, 0, len(cow[0]))
                    got.append(heads)
                    p.cow_heads = heads
        except OSError:
            for heads in got:
                m.free_folios(heads, undo=True)
            raise

    def _commit(self, seg, lo, hi):
        """Install what _plan/_alloc_plans prepared; zero new memory outside [lo, hi)."""
        m = self.machine
        mm = m.mem_map
        vma, p = seg.vma, seg.plan
        obj = vma.obj
        shift = m.page_shift
        ps = m.page_size
        fresh = []
        if not obj.shared and (p.new or p.huge_zero or p.cow_heads is not None):
            vma.anon_vma = True  # anon_vma_prepare
        for (order, idx), heads in zip(p.new, p.heads):
            nr = 1 << order
            pfns = (heads[:, None] + np.arange(nr)[None, :]).ravel() if nr > 1 else heads
            mm.owner[pfns] = obj.id
            mm.index[pfns] = vma.pgoff + idx
            mm.mapcount[pfns] = 1
            if obj.shared:
                mm.flags[pfns] |= PG_swapbacked
                obj.cache[vma.pgoff + idx] = pfns
                mm.refcount[heads] = nr + 1
            else:
                mm.flags[pfns] |= PG_anon
                mm.refcount[heads] = nr
            vma.ptes[idx] = mk_pte(pfns, PTE_PRESENT | PTE_WRITE)
            fresh.append((idx, pfns))
            m.count("pgfault", len(heads))  # one fault maps a whole new folio
        if p.map_cached is not None:
            idx, pfns = p.map_cached
            mm.mapcount[pfns] += 1
            np.add.at(mm.refcount, mm.head[pfns], 1)
            vma.ptes[idx] = mk_pte(pfns, PTE_PRESENT | PTE_WRITE)
            m.count("pgfault", len(idx))
        if p.zero is not None:
            vma.ptes[p.zero] = mk_pte(np.full(len(p.zero), m.zero_pfn), PTE_PRESENT)
            m.count("pgfault", len(p.zero))
        if p.reuse is not None and len(p.reuse):
            vma.ptes[p.reuse] |= PTE_WRITE
            m.count("pgfault", len(p.reuse))
        if p.cow_heads is not None:
            idx, old = p.cow
            new = p.cow_heads
            mem = m.mem
            for o, n in zip(old.tolist(), new.tolist()):
                if o == m.zero_pfn:
                    if mm.flags[n] & PG_nonzero:
                        mem[n * ps:(n + 1) * ps] = 0
                else:
                    mem[n * ps:(n + 1) * ps] = mem[o * ps:(o + 1) * ps]
            mm.flags[new] |= PG_anon | PG_nonzero
            mm.owner[new] = obj.id
            mm.index[new] = vma.pgoff + idx
            mm.mapcount[new] = 1
            mm.refcount[new] = 1
            vma.ptes[idx] = mk_pte(new, PTE_PRESENT | PTE_WRITE)
            real = old != m.zero_pfn
            if real.any():
                ro = old[real]
                mm.mapcount[ro] -= 1
                heads = mm.head[ro]
                np.add.at(mm.refcount, heads, -1)
                self._release_folios(heads)
            m.count("pgfault", len(idx))
            m.count("cow_fault", len(idx))
        # clear_page for fresh frames that may hold old data, except bytes about to be written
        for idx, pfns in fresh:
            dirty = (mm.flags[pfns] & PG_nonzero) != 0
            if not dirty.any():
                continue
            va = vma.start + (idx << shift)
            covered = (va >= lo) & (va + ps <= hi)
            need = pfns[dirty & ~covered]
            for _, pfn, n in pfn_runs(np.sort(need)):
                m.mem[pfn * ps:(pfn + n) * ps] = 0
            mm.flags[need] &= ~PG_nonzero

    def _access(self, addr, length, write, data=None):
        """Fault in [addr, addr+length) (all or nothing), then copy ``data`` in (a write),
        or bytes out (a read). A write fault without data only populates (pin, MAP_POPULATE)."""
        segs = self.wait_for_migration(lambda: self.span(addr, length))
        for s in segs:
            self._plan(s, write)
        self._alloc_plans(segs)
        # Fresh frames are zeroed except for bytes that data is about to overwrite.
        lo, hi = (addr, addr + length) if data is not None else (0, 0)
        for s in segs:
            self._commit(s, lo, hi)
        if write and data is None:
            return segs
        pfns = np.concatenate([pte_pfn(s.vma.ptes[s.i0:s.i1]) for s in segs])
        return self._copy_pages(pfns, addr, length, data)

    def _copy_pages(self, pfns, addr, length, data):
        m = self.machine
        ps = m.page_size
        mem = m.mem
        first = addr & (ps - 1)
        out = None if data is not None else bytearray(length)
        src = memoryview(data) if data is not None else None
        pos = 0
        for i, pfn, n in pfn_runs(pfns):
            lo = pfn * ps + (first if i == 0 else 0)
            hi = (pfn + n) * ps
            take = min(hi - lo, length - pos)
            if data is not None:
                mem[lo:lo + take] = np.frombuffer(src[pos:pos + take], np.uint8)
            else:
                out[pos:pos + take] = mem[lo:lo + take].tobytes() if take < 4096 else memoryview(mem[lo:lo + take])
            pos += take
        if data is not None:
            m.mem_map.flags[pfns[pfns != m.zero_pfn]] |= PG_nonzero
            return None
        return bytes(out)

    # ------------------------------------------------------------------ read / write
    def _check_range(self, addr, length):
        addr = _check_int(addr, "addr")
        if addr < 0 or addr + length > ADDRESS_LIMIT:
            raise oserror(errno.EFAULT, f"address {addr:#x} outside the address space")
        return addr

    def write(self, addr, data) -> None:
        """Write bytes at ``addr`` (any alignment, across pages, folios and mappings).
        EFAULT if any byte is unmapped (nothing is written), EHWPOISON for a poisoned page."""
        try:
            data = memoryview(data).cast("B")
        except TypeError:
            raise TypeError(f"data must be a contiguous bytes-like object, not {type(data).__name__}") from None
        addr = self._check_range(addr, len(data))
        if not len(data):
            self.enter()  # ESRCH after exit, even for an empty write
            return
        with self.machine.lock:
            self.enter()
            self._access(addr, len(data), True, data)

    def read(self, addr, n) -> bytes:
        """Read ``n`` bytes at ``addr``; never-written private pages read as zeros (the zero page)."""
        n = _check_int(n, "n")
        if n < 0:
            raise oserror(errno.EINVAL, f"read length must be >= 0, got {n}")
        addr = self._check_range(addr, n)
        if n == 0:
            self.enter()  # ESRCH after exit, even for an empty read
            return b""
        with self.machine.lock:
            self.enter()
            return self._access(addr, n, False)

    # ------------------------------------------------------------------ lookups
    def _lookup_pte(self, addr):
        addr = _check_int(addr, "addr")
        m = self.machine
        with m.lock:
            self.enter()

            def resolve():
                vma = self.find_vma(addr) if 0 <= addr < ADDRESS_LIMIT else None
                if vma is None:
                    raise oserror(errno.EFAULT, f"address {addr:#x} is not mapped")
                i = (addr - vma.start) >> m.page_shift
                return [VmaRange(vma, i, i + 1)]

            s = self.wait_for_migration(resolve)[0]
            pte = s.vma.ptes[s.i0]
            if not pte & PTE_PRESENT:
                raise oserror(errno.ENOENT, f"no page is mapped at {addr:#x} (never touched)")
            return int(pte_pfn(pte))

    def pfn_of(self, addr) -> int:
        """Frame number of the page mapped at ``addr`` (ENOENT if never touched)."""
        return self._lookup_pte(addr)

    def node_of(self, addr) -> int:
        """Node of the page mapped at ``addr``, like get_mempolicy(MPOL_F_NODE|MPOL_F_ADDR)."""
        return self._lookup_pte(addr) // self.machine.frames_per_node
