"""Run scenarios on copyengine and print what the C interpreter prints on a kernel.

Output per scenario (the same lines oracle.c writes):

    scenario NAME
    call L ret=R errno=E status=S pgmig=D thpmig=D    move / query (vmstat deltas)
    call L ret=R errno=E moved=K                       migrate (pages of the caller's
                                                       regions whose node in the target changed)
    op L errno=E                                       a memory operation that failed
    final p=P r=R status=S                             every page of every live process
    end

S is a run-length list: ``v*count`` items joined by commas, ``x`` for an entry the call
left unwritten.
"""
from __future__ import annotations

import copy

from .lang import BAD_ADDR, FLAGS, NO_PID, ScenarioError, parse

PS = 4096


def rle(values) -> str:
    out, prev, n = [], None, 0
    for v in values:
        v = "x" if v is None else str(v)
        if v == prev:
            n += 1
            continue
        if prev is not None:
            out.append(prev if n == 1 else f"{prev}*{n}")
        prev, n = v, 1
    if prev is not None:
        out.append(prev if n == 1 else f"{prev}*{n}")
    return ",".join(out) or "-"


class _Proc:
    def __init__(self, proc):
        self.proc = proc
        self.regions = {}   # name -> [addr, npages, mapped(list of bool)]
        self.pins = []


class ModelRun:
    """One scenario on a fresh copyengine Machine with two nodes."""

    def __init__(self, scenario, node_size="64MiB"):
        import copyengine as ce
        self.s = scenario
        self.m = ce.Machine(nodes=2, node_size=node_size)
        self.procs = {0: _Proc(self.m.spawn(uid=0, cap_sys_nice=True))}
        self.used = {0}
        self.out = [f"scenario {scenario.name}"]

    def close(self):
        self.m.close()

    # -------------------------------------------------------------- helpers
    def _p(self, op, key="p"):
        slot = int(op.args[key])
        if slot not in self.procs:
            raise ScenarioError(f"line {op.line}: process {slot} does not exist or has exited")
        return self.procs[slot]

    def _region(self, op, p):
        r = op.args["r"]
        if r not in p.regions:
            raise ScenarioError(f"line {op.line}: region {r!r} is unknown to process {op.args['p']}")
        return p.regions[r]

    def _pages(self, op, p, need_mapped):
        reg = self._region(op, p)
        i, n = int(op.args["page"]), int(op.args["n"])
        if i + n > reg[1]:
            raise ScenarioError(f"line {op.line}: pages {i}..{i + n - 1} beyond region {op.args['r']!r}")
        if need_mapped and not all(reg[2][i:i + n]):
            raise ScenarioError(f"line {op.line}: a page of {op.args['r']!r} is unmapped in process {op.args['p']}")
        return reg, i, n

    def _addr(self, op, p, text):
        if text == "bad":
            return BAD_ADDR
        r, rest = text.split(":")
        i, _, off = rest.partition("+")
        if r not in p.regions:
            raise ScenarioError(f"line {op.line}: region {r!r} is unknown to process {op.args['p']}")
        return p.regions[r][0] + int(i) * PS + int(off or 0)

    def _target(self, op):
        t = op.args["target"]
        if t == "self":
            return 0, None
        if t == "none":
            return NO_PID, None
        slot = int(t)
        if slot not in self.used:
            raise ScenarioError(f"line {op.line}: target process {slot} was never created")
        if slot in self.procs:
            return self.procs[slot].proc.pid, self.procs[slot]
        return self._dead[slot], None

    def _vm(self):
        v = self.m.vmstat
        return v["pgmigrate_success"], v["thp_migration_success"]

    @staticmethod
    def _query(proc, addrs):
        return list(proc.move_pages(0, addrs, None).status)

    # -------------------------------------------------------------- operations
    def run(self) -> list[str]:
        self._dead = {}
        for op in self.s.ops:
            getattr(self, "op_" + op.name)(op)
        for slot in sorted(self.procs):
            p = self.procs[slot]
            for name, (a, n, mapped) in p.regions.items():
                st = self._query(p.proc, [a + i * PS for i in range(n)])
                self.out.append(f"final p={slot} r={name} status={rle(st)}")
        self.out.append("end")
        return self.out

    def _memop(self, op, fn):
        try:
            fn()
        except OSError as e:
            self.out.append(f"op {op.line} errno={e.errno}")
            return False
        return True

    def op_mmap(self, op):
        p = self._p(op)
        a = op.args
        if a["r"] in p.regions:
            raise ScenarioError(f"line {op.line}: region {a['r']!r} exists in process {a['p']}")
        n = int(a["pages"])

        def go():
            # Every region starts 2 MiB-aligned, as oracle.c places them, so that windows
            # aligned in the page table (fault-around) fall alike: a 2 MiB-aligned pad of
            # 2 MiB less the guard page puts the next mapping on a 2 MiB boundary.
            pad = p.proc.mmap((2 << 20) - PS, folio_size="2MiB", populate=False)
            p.proc.munmap(pad, (2 << 20) - PS)
            addr = p.proc.mmap(n * PS, node=int(a["node"]), shared=a["shared"] == "1",
                               folio_size="2MiB" if a["thp"] == "1" else None,
                               populate=a["populate"] == "1")
            p.regions[a["r"]] = [addr, n, [True] * n]
        self._memop(op, go)

    def op_write(self, op):
        p = self._p(op)
        reg, i, n = self._pages(op, p, True)
        v = bytes([op.line % 251 + 1])
        self._memop(op, lambda: [p.proc.write(reg[0] + (i + k) * PS, v) for k in range(n)])

    def op_read(self, op):
        p = self._p(op)
        reg, i, n = self._pages(op, p, True)
        self._memop(op, lambda: [p.proc.read(reg[0] + (i + k) * PS, 1) for k in range(n)])

    def op_pin(self, op):
        p = self._p(op)
        reg, i, n = self._pages(op, p, True)
        self._memop(op, lambda: p.pins.append(p.proc.pin(reg[0] + i * PS, n * PS)))

    def op_munmap(self, op):
        p = self._p(op)
        reg, i, n = self._pages(op, p, False)

        def go():
            p.proc.munmap(reg[0] + i * PS, n * PS)
            reg[2][i:i + n] = [False] * n
        self._memop(op, go)

    def op_fork(self, op):
        p = self._p(op)
        c = int(op.args["child"])
        if c in self.used:
            raise ScenarioError(f"line {op.line}: process slot {c} was already used")
        child = _Proc(p.proc.fork())
        child.regions = copy.deepcopy(p.regions)
        self.procs[c] = child
        self.used.add(c)

    def op_exit(self, op):
        p = self._p(op)
        slot = int(op.args["p"])
        if slot == 0:
            raise ScenarioError(f"line {op.line}: process 0 cannot exit")
        self._dead[slot] = p.proc.pid
        p.proc.exit()
        for pin in p.pins:  # io_uring buffers go with the process's last reference
            pin.release()
        del self.procs[slot]

    def op_move(self, op, query=False):
        p = self._p(op)
        addrs = [self._addr(op, p, x) for x in op.args["addrs"].split(",")]
        nodes = None if query else [int(x) for x in op.args["nodes"].split(",")]
        flags = FLAGS[op.args.get("flags", "0")] if not query else 0
        pid, _ = self._target(op)
        g0, t0 = self._vm()
        try:
            ret, st = p.proc.move_pages(pid, addrs, nodes, flags)
            err = 0
        except OSError as e:
            ret, err = -1, e.errno
            st = getattr(e, "status", None) or [None] * len(addrs)
        g1, t1 = self._vm()
        self.out.append(f"call {op.line} ret={ret} errno={err} status={rle(st)} pgmig={g1 - g0} thpmig={t1 - t0}")

    def op_query(self, op):
        self.op_move(op, query=True)

    def op_migrate(self, op):
        p = self._p(op)
        pid, _ = self._target(op)
        # pages of the caller's regions, looked up in the target (as oracle.c can)
        addrs = [a + i * PS for a, n, _m in p.regions.values() for i in range(n)]
        before = self._query_pid(p.proc, pid, addrs)
        try:
            ret, err = p.proc.migrate_pages(pid, [int(x) for x in op.args["old"].split(",")],
                                            [int(x) for x in op.args["new"].split(",")]), 0
        except OSError as e:
            ret, err = -1, e.errno
        after = self._query_pid(p.proc, pid, addrs)
        moved = sum(1 for x, y in zip(before, after) if x != y and x >= 0 and y >= 0)
        self.out.append(f"call {op.line} ret={ret} errno={err} moved={moved}")

    @staticmethod
    def _query_pid(proc, pid, addrs):
        if not addrs:
            return []
        try:
            return list(proc.move_pages(pid, addrs, None).status)
        except OSError:
            return []


def run_model(text_or_scenarios) -> str:
    """Run every scenario; returns the output text (one block per scenario)."""
    scenarios = parse(text_or_scenarios) if isinstance(text_or_scenarios, str) else text_or_scenarios
    out = []
    for s in scenarios:
        r = ModelRun(s)
        try:
            out.extend(r.run())
        finally:
            r.close()
    return "\n".join(out) + "\n"
