"""Nothing is ever lost: a hypothesis state machine over the public API.

Rules spawn and end processes, map memory (sizes, folio sizes, private and shared, with
or without populate), write and read it, fork (and write in the children), pin and
release, hwpoison frames, unmap, move_pages with random nodes, flags and engines (serial,
vanilla, mt, engines that fail descriptors, complete out of order, raise mid-batch or
hang past the timeout, a copy hook failing batches, and destination allocation failing),
migrate_pages, and change settings (migrate_mode, nr_max_batched_migration).

After every step:

* every byte any process can read is the byte last written (a shadow model with private
  copy-on-write and shared semantics), and check_machine holds (frames, free lists, map
  and reference counts, the rmap, nothing locked or isolated at rest, pins exact);
* once nothing is mapped and no pin is held, free memory is back at its start, less the
  poisoned frames (which never return) and the zero page.

move_pages is checked against an oracle of do_pages_move (entries in order, queued and
flushed per node, a folio already queued is -EBUSY, already there, shared, untouched,
unmapped), down to every status, ``ret`` and the vmstat counters; calls that fail as a
whole (EPERM, ESRCH, ENODEV at the first entry...) must change nothing (snapshot).

The machines are small (3 nodes of 4 MiB, 4 KiB and 64 KiB base pages) so that nodes fill
up and -ENOMEM paths run. The number of steps scales with the hypothesis profile (ci:
fixed seed, 60 runs of up to 50 steps per page size, about 2,500 steps and 15 s each;
dev: 200 runs; soak: runs until COPYENGINE_SOAK_SECONDS, default 600, per page size).
Counts are printed at the end of each run, saved with ``record_property``, and appended
as JSON lines to the file COPYENGINE_STATEFUL_STATS names.
"""
from __future__ import annotations

import errno
import os
import time
from collections import Counter

import numpy as np
import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (RuleBasedStateMachine, initialize, invariant, precondition, rule,
                                 run_state_machine_as_test)

import copyengine as ce
from copyengine.mm.pageflags import PG_hwpoison
from copyengine.mm.pte import PFN_SHIFT, PTE_PRESENT
from copyengine.testing.faults import AllocFaults, CopyFaults, plugin_manager
from copyengine.units import parse_size
from copyengine.migrate.syscalls import migrate_pairs
from copyengine.testing.invariants import (ShadowMemory, assert_unchanged, check_machine,
                                           free_frames_expected, snapshot)

EBUSY, ENOMEM, ENOENT, EFAULT, EACCES = errno.EBUSY, errno.ENOMEM, errno.ENOENT, errno.EFAULT, errno.EACCES
EHWPOISON = ce.EHWPOISON
NODES = 3
NODE_SIZE = 4 << 20
MIG = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
       "thp_migration_split")
#: engines the state machine switches between; "faulty" is serial behind a CopyFaults hook
ENGINES = ["serial", "serial", "vanilla", "mt", "mt:1", "eio:2", "ooo", "hang:1", "raisemid", "faulty"]
MAX_POISON = {4096: 5, 65536: 2}

PROFILE = os.environ.get("COPYENGINE_HYPOTHESIS_PROFILE", "ci")
SOAK = PROFILE == "soak"
_base = settings()
#: ci: 60 runs of up to 50 steps per page size; dev: 200 runs; soak: chunks of 200 runs of 60
#: steps until the time budget is spent
EXAMPLES = 200 if SOAK else max(10, _base.max_examples)
STEPS = 60 if SOAK else 50
SOAK_SECONDS = float(os.environ.get("COPYENGINE_SOAK_SECONDS", "600"))

STATS = Counter()
#: rare and occasional choices: true for one value in the middle of the range, which
#: hypothesis neither favours (it likes the ends) nor shrinks towards
RARE = st.integers(0, 20).map(lambda x: x == 13)
SOMETIMES = st.integers(0, 8).map(lambda x: x == 5)


def _pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


class Resolved:
    """What an address of a process maps right now, read from the page tables (nothing
    faulted in): ``kind`` is "unmapped", "none" (never touched), "zero" or "page"."""
    __slots__ = ("kind", "pfn", "vma")

    def __init__(self, kind, pfn=-1, vma=None):
        self.kind, self.pfn, self.vma = kind, pfn, vma


def resolve(p, addr) -> Resolved:
    m = p.machine
    vma = p.find_vma(addr) if 0 <= addr < (1 << 47) else None
    if vma is None:
        return Resolved("unmapped")
    pte = vma.ptes[(addr - vma.start) >> m.page_shift]
    if not pte & PTE_PRESENT:
        return Resolved("none", vma=vma)
    pfn = int(pte >> PFN_SHIFT)
    return Resolved("zero" if pfn == m.zero_pfn else "page", pfn, vma)


def backing_frames(p, addr, n):
    """Frames an access to [addr, addr+n) of ``p`` would find already there (present
    PTEs, and page-cache pages of shared mappings), by page."""
    m = p.machine
    out = []
    first = addr & ~(m.page_size - 1)
    for a in range(first, addr + n, m.page_size):
        r = resolve(p, a)
        if r.kind in ("page", "zero"):
            out.append(r.pfn)
        elif r.kind == "none" and r.vma.shared:
            c = int(r.vma.obj.cache[r.vma.pgoff + ((a - r.vma.start) >> m.page_shift)])
            if c >= 0:
                out.append(c)
    return out


def folio_shared(m, h) -> bool:
    """folio_mapped_shared: any page of the folio mapped more than once."""
    mm = m.mem_map
    nr = 1 << int(mm.order[h])
    return bool((mm.mapcount[h:h + nr] > 1).any())


def mig(m):
    v = m.vmstat
    return {k: v[k] for k in MIG}


class MigrationMachine(RuleBasedStateMachine):
    page_size = 4096

    def __init__(self):
        super().__init__()
        self.alloc = AllocFaults(armed=False, seed=1)
        self.copyf = CopyFaults("eio", fail=0.5, armed=False, seed=2)
        self.m = ce.Machine(nodes=NODES, node_size=NODE_SIZE, page_size=self.page_size,
                            plugin_manager=plugin_manager(self.alloc, self.copyf))
        self.m.settings["copy_timeout"] = 0.01
        self.shadow = ShadowMemory(self.m)
        self.procs = {}          # pid -> Process (live)
        self.pins = []           # Pin objects not yet released
        self.poisoned = set()
        self.free0 = [self.m.free_pages(n) for n in range(NODES)]
        self.alloc_fault = None  # (node, order, probability) armed around migrations
        self.faulty = False      # the CopyFaults hook fails batches of whatever engine runs
        STATS["runs"] += 1

    def teardown(self):
        STATS["injected allocation failures"] += self.alloc.injected
        STATS["injected copy failures"] += self.copyf.injected
        self.m.close()

    # ------------------------------------------------------------------ helpers
    def _count(self, what):
        STATS["steps"] += 1
        STATS[what] += 1

    def _live(self):
        return sorted(self.procs)

    def _pick_proc(self, data, mapped=False):
        """A live process; with ``mapped``, one with mappings if there is one."""
        pids = self._live()
        if mapped:
            pids = [pid for pid in pids if self.shadow.procs.get(pid)] or pids
        return self.procs[data.draw(st.sampled_from(pids), label="pid")]

    def _pick_addr(self, data, p, label="addr"):
        """An address inside one of ``p``'s mappings, or (rarely) just outside them."""
        segs = self.shadow.procs.get(p.pid, [])
        if not segs or data.draw(RARE, label=f"{label} outside"):
            base = segs[-1].end if segs else (1 << 40)
            return data.draw(st.sampled_from([0x1000, base, base + 7, (1 << 40) - self.m.page_size]), label=label)
        s = segs[data.draw(st.integers(0, len(segs) - 1), label=f"{label} mapping")]
        return s.start + data.draw(st.integers(0, s.end - s.start - 1), label=f"{label} offset")

    def _migrating(self):
        """Arm the allocation faults chosen for migrations (a context manager)."""
        import contextlib
        if self.alloc_fault is None:
            return contextlib.nullcontext()
        node, order, prob = self.alloc_fault
        self.alloc.node, self.alloc.order, self.alloc.probability = node, order, prob
        return self.alloc.armed()

    def _copy_faults(self):
        if self.faulty:
            self.copyf.arm()
        else:
            self.copyf.disarm()

    def _expect_failure_changed_nothing(self, s0, ignore=()):
        assert_unchanged(s0, snapshot(self.m), ignore=ignore)

    # ------------------------------------------------------------------ processes
    @initialize(data=st.data())
    def first_process(self, data):
        p = self.m.spawn(cap_sys_nice=True)
        self.procs[p.pid] = p
        self.shadow.spawn(p)
        for _ in range(data.draw(st.integers(1, 3), label="initial mappings")):
            self._mmap(data, p)

    @precondition(lambda self: len(self.procs) < 5)
    @rule(uid=st.sampled_from([1000, 1000, 2000]), nice=st.booleans(),
          restrict=st.sampled_from([None, None, None, (0, 1), (2,)]))
    def spawn(self, uid, nice, restrict):
        self._count("spawn")
        p = self.m.spawn(uid=uid, cap_sys_nice=nice, mems_allowed=restrict)
        self.procs[p.pid] = p
        self.shadow.spawn(p)

    @precondition(lambda self: len(self.procs) > 1)
    @rule(data=st.data())
    def exit(self, data):
        self._count("exit")
        p = self._pick_proc(data)
        p.exit()
        del self.procs[p.pid]
        self.shadow.exit(p)
        with pytest.raises(OSError) as ei:
            p.read(0x1000, 1)
        assert ei.value.errno == errno.ESRCH

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def fork(self, data):
        self._count("fork")
        p = self._pick_proc(data)
        s0 = snapshot(self.m)
        try:
            c = p.fork()
        except OSError as e:
            # pinned private pages are copied at once: the only way fork can fail
            assert e.errno == ENOMEM, e
            self._expect_failure_changed_nothing(s0, ignore=("mem_map_free",))
            STATS["fork ENOMEM"] += 1
            return
        self.procs[c.pid] = c
        self.shadow.fork(p, c)

    # ------------------------------------------------------------------ mappings
    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def mmap(self, data):
        self._count("mmap")
        self._mmap(data, self._pick_proc(data))

    def _mmap(self, data, p):
        m = self.m
        ps = m.page_size
        sizes = [None] + [f for f in ("16KiB", "256KiB", "64KiB", "2MiB") if parse_size(f) > ps]
        folio = data.draw(st.sampled_from(sizes), label="folio_size")
        fsize = parse_size(folio) if folio else ps
        if fsize > ps:
            length = data.draw(st.integers(1, 2), label="folios") * fsize
            length -= data.draw(st.sampled_from([0, 0, ps, fsize // 2]), label="short by")
        else:
            length = data.draw(st.integers(1, 24), label="pages") * ps
        length -= data.draw(st.sampled_from([0, 0, 1, ps // 2]), label="unaligned by")
        node = data.draw(st.integers(0, NODES - 1), label="node")
        shared = data.draw(st.booleans(), label="shared")
        populate = data.draw(st.booleans(), label="populate")
        s0 = snapshot(m)
        try:
            a = p.mmap(length, node=node, shared=shared, folio_size=folio, populate=populate)
        except OSError as e:
            if e.errno == errno.EINVAL:
                assert node not in p.mems_allowed, e
                self._expect_failure_changed_nothing(s0)
            else:
                assert e.errno == ENOMEM and populate, e
                assert m.free_pages(node) < -(-length // ps), "ENOMEM with enough free memory"
                self._expect_failure_changed_nothing(s0, ignore=("mem_map_free", "mmap_base"))
                STATS["mmap ENOMEM"] += 1
            return
        assert a % fsize == 0
        self.shadow.mmap(p, a, length, shared)
        if data.draw(st.booleans(), label="write it"):
            payload = _pattern(length, a)
            try:
                p.write(a, payload)
                self.shadow.write(p, a, payload)
            except OSError as e:
                assert e.errno == ENOMEM, e
        if populate:
            assert all(r.kind == "page" for r in map(lambda x: resolve(p, x), range(a, a + length, ps)))
            assert all(p.node_of(x) == node for x in range(a, a + length, max(ps, length // 4)))

    @precondition(lambda self: any(self.shadow.procs.get(pid) for pid in self.procs))
    @rule(data=st.data())
    def munmap(self, data):
        self._count("munmap")
        ps = self.m.page_size
        p = self._pick_proc(data)
        segs = self.shadow.procs.get(p.pid)
        if not segs:
            return
        s = segs[data.draw(st.integers(0, len(segs) - 1), label="mapping")]
        npg = (s.end - s.start) // ps
        i0 = data.draw(st.integers(0, npg - 1), label="first page")
        # sometimes run past the mapping, over the guard gap and into the next one
        n = data.draw(st.integers(1, npg - i0 + 3), label="pages")
        a = s.start + i0 * ps
        length = n * ps - data.draw(st.sampled_from([0, 0, 1]), label="unaligned length by")
        p.munmap(a, length)
        self.shadow.munmap(p, a, length)

    # ------------------------------------------------------------------ access
    def _access_outcome(self, p, addr, n, write):
        """What an access must do: "EFAULT", "EHWPOISON", or None (succeed, or ENOMEM)."""
        if not self.shadow.covers(p, addr, n):
            return "EFAULT"
        frames = backing_frames(p, addr, n)
        if frames and (self.m.mem_map.flags[frames] & PG_hwpoison).any():
            return "EHWPOISON"
        return None

    def _enomem_possible(self, p, addr, n):
        """An access may fail with ENOMEM only if some node it needs memory from has
        fewer free pages than the access could need there: its pages, each widened to
        the naturally aligned large folio a fault would allocate (whose base pages the
        fault falls back to when no large block is free)."""
        m = self.m
        ps = m.page_size
        need = Counter()
        seen = set()
        for a in range(addr & ~(ps - 1), addr + n, ps):
            v = p.find_vma(a)
            span = ps << v.order
            lo = max(a & ~(span - 1), v.start)
            for b in range(lo, min(lo + span, v.end), ps):
                if b not in seen:
                    seen.add(b)
                    need[v.node] += 1
        return any(m.free_pages(nd) < k for nd, k in need.items())

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def write(self, data):
        self._count("write")
        m = self.m
        p = self._pick_proc(data, mapped=True)
        addr = self._pick_addr(data, p)
        n = data.draw(st.integers(1, 3 * m.page_size), label="bytes")
        payload = _pattern(n, data.draw(st.integers(0, 1 << 16), label="seed"))
        want = self._access_outcome(p, addr, n, True)
        s0 = snapshot(m) if want or self._enomem_possible(p, addr, n) else None
        try:
            p.write(addr, payload)
        except OSError as e:
            if e.errno == ENOMEM:
                assert want is None and s0 is not None, e
                self._expect_failure_changed_nothing(s0, ignore=("mem_map_free",))
                STATS["write ENOMEM"] += 1
                return
            assert e.errno == {"EFAULT": EFAULT, "EHWPOISON": EHWPOISON}.get(want), (want, e)
            self._expect_failure_changed_nothing(s0)
            STATS[f"write {want}"] += 1
            return
        assert want is None, f"write succeeded, expected {want}"
        self.shadow.write(p, addr, payload)

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def read(self, data):
        self._count("read")
        m = self.m
        p = self._pick_proc(data, mapped=True)
        addr = self._pick_addr(data, p)
        n = data.draw(st.integers(1, 3 * m.page_size), label="bytes")
        want = self._access_outcome(p, addr, n, False)
        s0 = snapshot(m) if want or self._enomem_possible(p, addr, n) else None
        try:
            got = p.read(addr, n)
        except OSError as e:
            if e.errno == ENOMEM:
                assert want is None and s0 is not None, e
                self._expect_failure_changed_nothing(s0, ignore=("mem_map_free",))
                STATS["read ENOMEM"] += 1
                return
            assert e.errno == {"EFAULT": EFAULT, "EHWPOISON": EHWPOISON}.get(want), (want, e)
            self._expect_failure_changed_nothing(s0)
            STATS[f"read {want}"] += 1
            return
        assert want is None, f"read succeeded, expected {want}"
        assert got == self.shadow.expect(p, addr, n), "read returned other bytes than last written"

    # ------------------------------------------------------------------ pins and poison
    @precondition(lambda self: self.procs and len(self.pins) < 6)
    @rule(data=st.data())
    def pin(self, data):
        self._count("pin")
        m = self.m
        p = self._pick_proc(data, mapped=True)
        addr = self._pick_addr(data, p)
        n = data.draw(st.integers(1, 2 * m.page_size), label="bytes")
        want = self._access_outcome(p, addr, n, True)
        s0 = snapshot(m) if want or self._enomem_possible(p, addr, n) else None
        try:
            pin = p.pin(addr, n)
        except OSError as e:
            if e.errno == ENOMEM:
                assert want is None and s0 is not None, e
                self._expect_failure_changed_nothing(s0, ignore=("mem_map_free",))
                STATS["pin ENOMEM"] += 1
                return
            assert e.errno == {"EFAULT": EFAULT, "EHWPOISON": EHWPOISON}.get(want), (want, e)
            self._expect_failure_changed_nothing(s0)
            STATS[f"pin {want}"] += 1
            return
        assert want is None
        STATS["pinned"] += 1
        self.pins.append(pin)
        self.shadow.pin(pin)

    @precondition(lambda self: self.pins)
    @rule(data=st.data())
    def release(self, data):
        self._count("release")
        pin = self.pins.pop(data.draw(st.integers(0, len(self.pins) - 1), label="pin"))
        pin.release()
        self.shadow.unpin(pin)
        with pytest.raises(ValueError):
            pin.release()

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def hwpoison(self, data):
        m = self.m
        if len(self.poisoned) >= MAX_POISON[m.page_size]:
            return
        self._count("hwpoison")
        if data.draw(st.booleans(), label="a mapped page"):
            p = self._pick_proc(data)
            r = resolve(p, self._pick_addr(data, p))
            if r.kind != "page":
                return
            pfn = r.pfn
        else:
            pfn = data.draw(st.integers(0, m.total_frames - 1), label="pfn")
            if pfn == m.zero_pfn:
                return
        free_before = m.free_pages(pfn // m.frames_per_node)
        was_free = m.buddy.is_free(pfn)
        m.hwpoison(pfn)
        m.hwpoison(pfn)    # a second time is a no-op
        self.poisoned.add(pfn)
        assert m.free_pages(pfn // m.frames_per_node) == free_before - (1 if was_free else 0)

    # ------------------------------------------------------------------ settings and engines
    @rule(spec=st.sampled_from(ENGINES))
    def set_engine(self, spec):
        self._count("set_engine")
        self.faulty = spec == "faulty"
        spec = "serial" if self.faulty else spec
        self.m.set_engine(spec)
        assert self.m.engine_spec == spec

    @rule(mode=st.sampled_from(["async", "sync_light", "sync"]),
          batch=st.sampled_from([1, 2, 3, 8, 32, 512, None]))
    def set_settings(self, mode, batch):
        self._count("settings")
        m = self.m
        m.settings["migrate_mode"] = mode
        m.settings["nr_max_batched_migration"] = batch or (512 if m.page_size == 4096 else 8192)
        assert m.settings.migrate_mode == mode

    @rule(fault=st.one_of(st.none(), st.tuples(st.sampled_from([None, 0, 1, 2]),
                                                st.sampled_from([None, None, 0, "max"]),
                                                st.sampled_from([0.2, 0.5, 1.0]))))
    def set_alloc_faults(self, fault):
        self._count("alloc faults")
        if fault is not None and fault[1] == "max":
            fault = (fault[0], self.m.max_order, fault[2])
        self.alloc_fault = fault

    # ------------------------------------------------------------------ migration
    def _entry_addrs(self, data, target):
        k = data.draw(st.integers(1, 10), label="entries")
        addrs = []
        for i in range(k):
            if addrs and data.draw(SOMETIMES, label="repeat"):
                a = addrs[data.draw(st.integers(0, len(addrs) - 1))]   # the same page again
                addrs.append(a + data.draw(st.sampled_from([0, 1, self.m.page_size])))
            else:
                addrs.append(self._pick_addr(data, target, f"entry {i}"))
        return addrs

    def _call_error(self, caller, target_pid, flags):
        """The call-level error move_pages must raise before doing anything, in the
        kernel's order (flags are always valid here)."""
        if flags & ce.MPOL_MF_MOVE_ALL and not caller.cap_sys_nice:
            return errno.EPERM
        target = caller if target_pid == 0 else self.procs.get(target_pid)
        if target is None:
            return errno.ESRCH
        if target is not caller and target.uid != caller.uid and not caller.cap_sys_nice:
            return errno.EPERM
        return None

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def move_pages(self, data):
        self._count("move_pages")
        m = self.m
        caller = self._pick_proc(data, mapped=True)
        target_pid = 0
        if data.draw(SOMETIMES, label="another process?"):
            target_pid = data.draw(st.sampled_from(self._live() + [max(self._live()) + 50]), label="target pid")
        target = caller if target_pid == 0 else self.procs.get(target_pid)
        flags = data.draw(st.sampled_from([ce.MPOL_MF_MOVE, ce.MPOL_MF_MOVE, ce.MPOL_MF_MOVE_ALL, 0]),
                          label="flags")
        addrs = self._entry_addrs(data, target if target is not None else caller)
        run_nodes = st.integers(0, NODES - 1)
        if data.draw(RARE, label="bad node?"):
            run_nodes = st.sampled_from([0, 1, 2, NODES, -1])
        nodes = []
        while len(nodes) < len(addrs):
            nodes += [data.draw(run_nodes, label="node")] * data.draw(st.integers(1, 4), label="run")
        nodes = nodes[:len(addrs)]
        if data.draw(SOMETIMES, label="query?"):
            self._query(caller, target_pid, target, addrs)
            return
        err = self._call_error(caller, target_pid, flags)
        s0 = snapshot(m)
        if err is not None:
            with pytest.raises(OSError) as ei:
                caller.move_pages(target_pid, addrs, nodes, flags=flags)
            assert ei.value.errno == err
            self._expect_failure_changed_nothing(s0)
            STATS[f"move_pages {errno.errorcode[err]}"] += 1
            return
        self._copy_faults()
        oracle = MovePagesOracle(m, target, addrs, nodes, bool(flags & ce.MPOL_MF_MOVE_ALL))
        v0 = m.vmstat
        with self._migrating():
            try:
                r = caller.move_pages(target_pid, addrs, nodes, flags=flags)
                ret, status, raised = r.ret, r.status, None
            except OSError as e:
                ret, status, raised = None, getattr(e, "status", None), e
        self.copyf.disarm()
        oracle.verify(ret, status, raised, v0, m.vmstat)
        if raised is not None and all(s is None for s in status):
            self._expect_failure_changed_nothing(s0)
        STATS["move_pages exact" if oracle.exact else "move_pages split"] += 1
        for s in status:
            if s is not None:
                STATS[f"status {errno.errorcode.get(-s, 'node') if s < 0 else 'node'}"] += 1

    def _query(self, caller, target_pid, target, addrs):
        STATS["move_pages query"] += 1
        err = self._call_error(caller, target_pid, 0)
        s0 = snapshot(self.m)
        if err is not None:
            with pytest.raises(OSError) as ei:
                caller.move_pages(target_pid, addrs)
            assert ei.value.errno == err
        else:
            r = caller.move_pages(target_pid, addrs)
            want = []
            for a in addrs:
                x = resolve(target, a & ~(self.m.page_size - 1))
                want.append({"unmapped": -EFAULT, "none": -ENOENT, "zero": -EFAULT}.get(
                    x.kind, x.pfn // self.m.frames_per_node))
            assert r.status == want and r.ret == 0
        self._expect_failure_changed_nothing(s0)

    @precondition(lambda self: self.procs)
    @rule(data=st.data())
    def migrate_pages(self, data):
        self._count("migrate_pages")
        m = self.m
        caller = self._pick_proc(data, mapped=True)
        target_pid = 0
        if data.draw(SOMETIMES, label="another process?"):
            target_pid = data.draw(st.sampled_from(self._live() + [max(self._live()) + 50]), label="pid")
        node_sets = st.sets(st.integers(0, NODES - 1), min_size=0, max_size=NODES)
        old = data.draw(node_sets, label="old")
        new = data.draw(node_sets, label="new")
        if data.draw(RARE, label="bad node?"):
            new = new | {NODES}
        target = caller if target_pid == 0 else self.procs.get(target_pid)
        s0 = snapshot(m)
        want_err = None  # kernel_migrate_pages' order (checked against 6.12, issue 13)
        if target is None:
            want_err = errno.ESRCH
        elif target is not caller and target.uid != caller.uid and not caller.cap_sys_nice:
            want_err = errno.EPERM
        elif not new <= target.mems_allowed and not caller.cap_sys_nice:  # NODES is in no cpuset
            want_err = errno.EPERM
        elif not new & caller.mems_allowed:
            want_err = errno.EINVAL
        if want_err is not None:
            with pytest.raises(OSError) as ei:
                caller.migrate_pages(target_pid, old, new)
            assert ei.value.errno == want_err, ei.value
            self._expect_failure_changed_nothing(s0)
            STATS[f"migrate_pages {errno.errorcode[want_err]}"] += 1
            return
        self._copy_faults()
        oracle = MigratePagesOracle(m, caller, target, old, new & caller.mems_allowed)
        v0 = m.vmstat
        with self._migrating():
            left = caller.migrate_pages(target_pid, old, new)
        self.copyf.disarm()
        oracle.verify(left, v0, m.vmstat)
        STATS["migrate_pages exact" if oracle.exact else "migrate_pages failures"] += 1

    # ------------------------------------------------------------------ invariants
    @invariant()
    def consistent(self):
        check_machine(self.m, self.shadow)

    @invariant()
    def memory_comes_back(self):
        m = self.m
        if any(self.shadow.procs.get(pid) for pid in self.procs) or self.pins:
            return
        STATS["all memory back"] += 1
        assert [m.free_pages(n) for n in range(NODES)] == [free_frames_expected(m, n) for n in range(NODES)]
        poisoned = [int(np.count_nonzero(m.mem_map.flags[n * m.frames_per_node:(n + 1) * m.frames_per_node]
                                         & PG_hwpoison)) for n in range(NODES)]
        assert [self.free0[n] - poisoned[n] for n in range(NODES)] == [m.free_pages(n) for n in range(NODES)]


class MigrationMachine64K(MigrationMachine):
    page_size = 65536


# ----------------------------------------------------------------------------- oracles
class MovePagesOracle:
    """do_pages_move, restated: entries in order; consecutive entries for one node are
    queued and flushed when the node changes or an entry is not queued; what each
    non-queued entry reports; what each queued one may report; ret; vmstat."""

    def __init__(self, m, target, addrs, nodes, move_all):
        self.m, self.target, self.nodes, self.move_all = m, target, list(nodes), move_all
        mm = m.mem_map
        ps = m.page_size
        self.pre = []
        for a in addrs:
            r = resolve(target, a & ~(ps - 1))
            if r.kind != "page":
                self.pre.append((r.kind, None))
                continue
            h = int(mm.head[r.pfn])
            nr = 1 << int(mm.order[h])
            self.pre.append(("page", dict(
                head=h, order=int(mm.order[h]), node=h // m.frames_per_node,
                shared=folio_shared(m, h), pinned=int(mm.pincount[h]) > 0,
                poisoned=bool((mm.flags[h:h + nr] & PG_hwpoison).any()))))
        self.exact = True

    def verify(self, ret, status, raised, v0, v1):
        m = self.m
        n = len(self.nodes)
        bad_at = next((i for i, nd in enumerate(self.nodes)
                       if not 0 <= nd < m.nodes or nd not in self.target.mems_allowed), None)
        if bad_at is not None:
            assert raised is not None, "a bad node must fail the call"
            code = errno.ENODEV if not 0 <= self.nodes[bad_at] < m.nodes else errno.EACCES
            assert raised.errno == code, raised
            # the bad entry is found when its run is reached
            first = bad_at
            while first > 0 and self.nodes[first - 1] == self.nodes[bad_at]:
                first -= 1
            assert len(status) == n and all(s is None for s in status[first:]), status
            assert all(s is not None for s in status[:first]), status
            upto = first
        else:
            assert raised is None, raised
            assert len(status) == n
            upto = n
        split = v1["thp_split_page"] - v0["thp_split_page"]
        allowed_fail = (-EBUSY, -ENOMEM, -EHWPOISON)
        for s in status[:upto]:
            assert s in allowed_fail + (-EFAULT, -ENOENT, -EACCES) or 0 <= s < m.nodes, s
        if split:
            # a large folio was split for want of memory: its pieces are folios of their own
            self.exact = False
            if ret is not None:
                fails = sum(1 for s in status if s in (-ENOMEM, -EHWPOISON))
                assert fails <= ret <= sum(1 for s in status if s in allowed_fail)
            return
        loc, pending, attempted = {}, [], []
        expect = [None] * n
        current = None

        def flush():
            attempted.extend((i, current) for i in pending)
            for i in pending:
                s = status[i]
                if s == current:
                    loc[self.pre[i][1]["head"]] = current
            pending.clear()

        for i in range(upto):
            node = self.nodes[i]
            if current is not None and node != current:
                flush()
            current = node
            kind, info = self.pre[i]
            if kind != "page":
                expect[i] = -ENOENT if kind == "none" else -EFAULT
                flush()
                continue
            h = info["head"]
            where = loc.get(h, info["node"])
            if where == node:
                expect[i] = node
                flush()
            elif any(self.pre[j][1]["head"] == h for j in pending):
                expect[i] = -EBUSY
                flush()
            elif info["shared"] and not self.move_all:
                expect[i] = -EACCES
                flush()
            else:
                pending.append(i)
        flush()
        succ = fail = thp_s = thp_f = failures = 0
        done = {i for i, _ in attempted}
        for i in range(upto):
            if i not in done:
                assert status[i] == expect[i], f"entry {i}: status {status[i]}, expected {expect[i]}"
        for i, node in attempted:
            s = status[i]
            info = self.pre[i][1]
            nr = 1 << info["order"]
            thp = info["order"] == m.max_order
            if s == node:
                assert not info["pinned"] and not info["poisoned"], f"entry {i}: pinned or poisoned folio moved"
                succ += nr
                thp_s += thp
                continue
            assert s in allowed_fail, f"entry {i}: status {s} moving to {node}"
            failures += 1
            fail += nr
            thp_f += thp
            if s == -EBUSY:
                assert info["pinned"], f"entry {i}: -EBUSY but not pinned"
            if s == -EHWPOISON:
                assert info["poisoned"] and not info["pinned"], f"entry {i}: -EHWPOISON"
            if info["pinned"]:
                assert s in (-EBUSY, -ENOMEM), f"entry {i}: pinned folio reported {s}"
        if ret is not None:
            assert ret == failures, f"ret {ret}, {failures} attempted migrations failed"
        got = {k: v1[k] - v0[k] for k in MIG}
        assert got == {"pgmigrate_success": succ, "pgmigrate_fail": fail, "thp_migration_success": thp_s,
                       "thp_migration_fail": thp_f, "thp_migration_split": 0}, (got, status)


class MigratePagesOracle:
    """migrate_pages(2): do_migrate_pages' pairing restated from the kernel's comment;
    with no failure, every eligible folio of the target ends where the pairing sends it,
    and pgmigrate_success counts every move."""

    def __init__(self, m, caller, target, old, new):
        self.m, self.old, self.new = m, frozenset(old), frozenset(new)
        self.move_all = caller.cap_sys_nice
        mm = m.mem_map
        self.folios = {}     # head -> (order, node, eligible)
        self.addrs = []      # (addr, head)
        for v in target.vmas:
            idx = np.nonzero(v.ptes & PTE_PRESENT)[0]
            pfns = (v.ptes[idx] >> PFN_SHIFT).astype(np.int64)
            for i, pf in zip(idx.tolist(), pfns.tolist()):
                if pf == m.zero_pfn:
                    continue
                h = int(mm.head[pf])
                if h not in self.folios:
                    self.folios[h] = (int(mm.order[h]), h // m.frames_per_node,
                                      self.move_all or not folio_shared(m, h))
                self.addrs.append((v.start + i * m.page_size, h, pf - h))
        self.target = target
        self.exact = True

    def pairs(self):
        if not self.new:
            return []
        return list(migrate_pairs(frozenset(self.old), frozenset(self.new)))

    def verify(self, left, v0, v1):
        assert isinstance(left, int) and left >= 0
        d = {k: v1[k] - v0[k] for k in MIG + ("thp_split_page",)}
        # migrate_pages() returns 0 once every folio, and every piece of a split one, moved
        assert (left == 0) == (d["pgmigrate_fail"] == 0), (left, d)
        clean = d["pgmigrate_fail"] == 0 and d["thp_split_page"] == 0
        if not clean:
            self.exact = False
            return
        where = {h: nd for h, (o, nd, ok) in self.folios.items()}
        succ = thp = 0
        for s, dst in self.pairs():
            for h, (o, _, ok) in self.folios.items():
                if ok and where[h] == s:
                    where[h] = dst
                    succ += 1 << o
                    thp += o == self.m.max_order
        assert d["pgmigrate_success"] == succ and d["thp_migration_success"] == thp, (d, succ, thp)
        assert d["thp_migration_fail"] == 0 and d["thp_migration_split"] == 0
        fpn = self.m.frames_per_node
        for a, h, off in self.addrs:
            assert self.target.pfn_of(a) // fpn == where[h], f"{a:#x}: not on node {where[h]}"


# ----------------------------------------------------------------------------- runs
def _run(cls, record_property, capsys, name):
    STATS.clear()
    t0 = time.monotonic()
    if SOAK:
        deadline = t0 + SOAK_SECONDS
        chunk = settings(settings(), max_examples=EXAMPLES, stateful_step_count=STEPS, deadline=None,
                         suppress_health_check=list(HealthCheck))
        while time.monotonic() < deadline:
            run_state_machine_as_test(cls, settings=chunk)
    else:
        run_state_machine_as_test(cls, settings=settings(settings(), max_examples=EXAMPLES,
                                                         stateful_step_count=STEPS, deadline=None))
    elapsed = time.monotonic() - t0
    record_property(f"{name}_steps", STATS["steps"])
    record_property(f"{name}_runs", STATS["runs"])
    lines = ", ".join(f"{k}={v}" for k, v in sorted(STATS.items()) if k not in ("steps", "runs"))
    with capsys.disabled():
        print(f"\n[stateful {name} profile={PROFILE}] {STATS['runs']} runs, {STATS['steps']} steps "
              f"in {elapsed:.1f}s\n  {lines}")
    path = os.environ.get("COPYENGINE_STATEFUL_STATS")
    if path:
        import json
        with open(path, "a") as f:
            f.write(json.dumps({"machine": name, "profile": PROFILE, "seconds": round(elapsed, 1),
                                **STATS}) + "\n")


@pytest.mark.timeout(0 if SOAK else 600)
def test_state_machine_4k(record_property, capsys):
    _run(MigrationMachine, record_property, capsys, "4KiB")


@pytest.mark.timeout(0 if SOAK else 600)
def test_state_machine_64k(record_property, capsys):
    _run(MigrationMachine64K, record_property, capsys, "64KiB")


# ----------------------------------------------------------------------------- the checkers bite
def _small_world():
    m = ce.Machine(nodes=2, node_size="4MiB")
    p = m.spawn()
    a = p.mmap(8 * 4096)
    p.write(a, b"a" * 8 * 4096)
    sh = p.mmap(4 * 4096, shared=True, node=1)
    p.write(sh, b"s" * 4096)
    c = p.fork()
    return m, p, c, a, sh


CORRUPTIONS = {
    "mapcount": lambda m, p, c, a, sh: m.mem_map.mapcount.__setitem__(p.pfn_of(a), 5),
    "refcount": lambda m, p, c, a, sh: m.mem_map.refcount.__setitem__(p.pfn_of(a), 9),
    "pincount": lambda m, p, c, a, sh: m.mem_map.pincount.__setitem__(p.pfn_of(a), 1),
    "locked": lambda m, p, c, a, sh: m.mem_map.flags.__setitem__(p.pfn_of(a), m.mem_map.flags[p.pfn_of(a)] | 1),
    "isolated": lambda m, p, c, a, sh: m.mem_map.flags.__setitem__(p.pfn_of(sh), m.mem_map.flags[p.pfn_of(sh)] | (1 << 6)),
    "migration entry": lambda m, p, c, a, sh: p.vmas[0].ptes.__setitem__(0, (p.vmas[0].ptes[0] & ~np.uint64(1)) | np.uint64(4)),
    "pte to a free frame": lambda m, p, c, a, sh: p.vmas[0].ptes.__setitem__(1, np.uint64((m.frames_per_node - 1) << 4 | 3)),
    "cow page writable": lambda m, p, c, a, sh: c.vmas[0].ptes.__setitem__(2, c.vmas[0].ptes[2] | np.uint64(2)),
    "rmap index": lambda m, p, c, a, sh: m.mem_map.index.__setitem__(p.pfn_of(a + 4096), 99),
    "page cache": lambda m, p, c, a, sh: p.vmas[1].obj.cache.__setitem__(0, p.pfn_of(a + 3 * 4096)),
    "free frame lost": lambda m, p, c, a, sh: m.buddy.take_off(m.frames_per_node + 77),
    "free block overlap": lambda m, p, c, a, sh: m.buddy.free_order.__setitem__(m.frames_per_node + 3, 1),
    "nr_free": lambda m, p, c, a, sh: m.buddy.nr_free.__setitem__((1, 0), m.buddy.nr_free[1, 0] + 1),
    "leaked folio": lambda m, p, c, a, sh: m.alloc_folios(0, 0, 1),
    "poisoned frame free": lambda m, p, c, a, sh: m.mem_map.flags.__setitem__(
        m.frames_per_node + 500, m.mem_map.flags[m.frames_per_node + 500] | PG_hwpoison),
    "stale rmap object": lambda m, p, c, a, sh: m.objects.pop(p.vmas[0].obj.id),
}


@pytest.mark.parametrize("what", list(CORRUPTIONS))
def test_check_machine_catches(what):
    m, p, c, a, sh = _small_world()
    with m:
        check_machine(m)
        CORRUPTIONS[what](m, p, c, a, sh)
        with pytest.raises(AssertionError):
            check_machine(m)


def test_shadow_catches_a_changed_byte_and_a_wrong_pin_count():
    m, p, c, a, sh = _small_world()
    with m:
        shadow = ShadowMemory(m)
        for q in (p, c):
            shadow.spawn(q)
        for v in p.vmas:
            shadow.mmap(p, v.start, v.end - v.start, v.shared)
        shadow.write(p, a, b"a" * 8 * 4096)
        shadow.write(p, sh, b"s" * 4096)
        shadow.fork(p, c)
        check_machine(m, shadow)
        c.write(a + 5, b"C")                  # COW: the parent still reads "a"
        with pytest.raises(AssertionError, match="other bytes"):
            check_machine(m, shadow)
        shadow.write(c, a + 5, b"C")
        check_machine(m, shadow)
        c.write(sh + 7, b"S")                 # shared: both see it
        shadow.write(c, sh + 7, b"S")
        assert shadow.expect(p, sh + 6, 3) == b"sSs"
        check_machine(m, shadow)
        m.mem[p.pfn_of(a) * 4096 + 100] ^= 1
        with pytest.raises(AssertionError, match="other bytes"):
            check_machine(m, shadow)
        m.mem[p.pfn_of(a) * 4096 + 100] ^= 1
        pin = p.pin(a, 10)
        with pytest.raises(AssertionError, match="pin"):
            check_machine(m, shadow)
        shadow.pin(pin)
        check_machine(m, shadow)
        pin.release()
        shadow.unpin(pin)
        check_machine(m, shadow)


# ----------------------------------------------------------------------------- regressions
def test_large_folio_fault_fallback_needs_only_the_touched_page():
    with ce.Machine(nodes=1, node_size="4MiB") as m:
        hog = m.spawn()
        a = hog.mmap(m.free_pages(0) * 4096)
        for i in range(0, 200, 2):                  # 100 free pages, no free 2 MiB block
            hog.munmap(a + i * 4096, 4096)
        assert m.free_pages(0) == 100 and not len(m.buddy.free_blocks(0)[9])
        p = m.spawn()
        b = p.mmap(2 << 20, folio_size="2MiB", populate=False)
        p.write(b + 5, b"x")
        assert p.read(b + 5, 1) == b"x"
        check_machine(m)
