"""Random scenarios weighted toward the corners: THP head/tail/middle and unaligned
addresses, duplicates in one call, invalid nodes mid-array, pins, fork then child writes
or reads, munmap holes, shared memory, bad pids and flags, odd migrate_pages masks.

``scenario(chooser)`` is written against a small chooser so that the same code is a
hypothesis strategy (:func:`scenarios`) and a seeded generator (:func:`generate`).
"""
from __future__ import annotations

import random

from .lang import MAX_PROCS, THP_PAGES, Op, Scenario


class _Rand:
    def __init__(self, seed):
        self.r = random.Random(seed)

    def int(self, a, b):
        return self.r.randint(a, b)

    def pick(self, seq):
        return self.r.choice(list(seq))


class _Draw:
    def __init__(self, draw):
        from hypothesis import strategies as st
        self.draw, self.st = draw, st

    def int(self, a, b):
        return self.draw(self.st.integers(a, b))

    def pick(self, seq):
        return self.draw(self.st.sampled_from(list(seq)))


def _weighted(c, table):
    return c.pick([k for k, w in table.items() for _ in range(w)])


def scenario(c, name) -> Scenario:
    procs = {0: {}}      # slot -> {region: [npages, thp, shared, mapped list]}
    used = {0}
    exited = []
    ops = []
    nreg = [0]

    def add(opname, **kw):
        ops.append(Op(0, opname, {k: str(v) for k, v in kw.items()}))

    def mmap(p):
        thp = c.pick((0, 1, 1))
        shared = c.pick((0, 0, 0, 1))
        n = THP_PAGES * c.pick((1, 1, 2)) if thp else c.pick((1, 2, 4, 8, 16, 20))
        r = f"r{nreg[0]}"
        nreg[0] += 1
        node = c.pick((0, 0, 1))
        populate = c.pick((0, 0, 1))
        add("mmap", p=p, r=r, pages=n, thp=thp, shared=shared, node=node, populate=populate)
        procs[p][r] = [n, thp, shared, [True] * n]

    def page_of(reg):
        n = reg[0]
        return min(n - 1, c.pick([0, 1, n // 2, n - 1, c.int(0, n - 1)] + ([255, 256, 511, 512 % n] if reg[1] else [])))

    def mapped_run(p):
        regs = [(r, g) for r, g in procs[p].items() if any(g[3])]
        if not regs:
            return None
        r, g = c.pick(regs)
        i = page_of(g)
        if not g[3][i]:
            i = g[3].index(True)
        n = 1
        while c.pick((0, 1, 1)) and i + n < g[0] and g[3][i + n] and n < 64:
            n = n * 2 if i + n * 2 <= g[0] and all(g[3][i:i + n * 2]) else n + 1
        return r, g, i, n

    def addr(p):
        regs = list(procs[p].items())
        if not regs or c.pick(range(12)) == 0:
            return "bad"
        r, g = c.pick(regs)
        i = page_of(g)
        off = c.pick((0, 0, 0, 1, 2048, 4095))
        return f"{r}:{i}" + (f"+{off}" if off else "")

    def target(p):
        live = [s for s in procs if s != p]
        choice = _weighted(c, {"self": 6, "other": 3 if live else 0, "none": 1, "exited": 1 if exited else 0})
        if choice == "other":
            return str(c.pick(live))
        if choice == "exited":
            return str(c.pick(exited))
        return choice

    for _ in range(c.int(1, 2)):
        mmap(0)
    for _ in range(c.int(2, 12)):
        p = c.pick(sorted(procs))
        kind = _weighted(c, {"mmap": 1, "write": 4, "read": 2, "pin": 1, "munmap": 1,
                             "fork": 2 if len(used) < MAX_PROCS else 0,
                             "exit": 1 if p != 0 else 0, "move": 5, "query": 2, "migrate": 2})
        if kind == "mmap":
            mmap(p)
        elif kind in ("write", "read", "pin", "munmap"):
            run = mapped_run(p)
            if run is None:
                continue
            r, g, i, n = run
            add(kind, p=p, r=r, page=i, n=n)
            if kind == "munmap":
                g[3][i:i + n] = [False] * n
        elif kind == "fork":
            child = min(set(range(MAX_PROCS)) - used)
            add("fork", p=p, child=child)
            used.add(child)
            procs[child] = {r: [g[0], g[1], g[2], list(g[3])] for r, g in procs[p].items()}
            # the corner: the child writes or reads right after fork
            run = mapped_run(child)
            if run is not None and c.pick((0, 1)):
                r, g, i, n = run
                add(c.pick(("write", "read")), p=child, r=r, page=i, n=n)
        elif kind == "exit":
            add("exit", p=p)
            exited.append(p)
            del procs[p]
        elif kind in ("move", "query"):
            n = c.pick((1, 1, 2, 3, 4, 6))
            addrs = [addr(p) for _ in range(n)]
            if n > 1 and c.pick((0, 0, 1)):   # a duplicate in one call
                addrs[c.int(1, n - 1)] = addrs[0]
            if kind == "query":
                add("query", p=p, target=target(p), addrs=",".join(addrs))
                continue
            nodes = [c.pick((0, 1, 1)) for _ in range(n)]
            if c.pick(range(8)) == 0:       # an invalid node somewhere in the array
                nodes[c.int(0, n - 1)] = c.pick((2, 7, -1))
            flags = _weighted(c, {"move": 8, "all": 3, "0": 1, "bad": 1})
            add("move", p=p, target=target(p), flags=flags, addrs=",".join(addrs),
                nodes=",".join(map(str, nodes)))
        elif kind == "migrate":
            old = c.pick(("0", "1", "0,1", "0,5", "3"))
            new = c.pick(("1", "0", "0,1", "1,0", "2", "1,7"))
            add("migrate", p=p, target=target(p), old=old, new=new)
    return Scenario(name, ops)


def generate(seed: int, count: int) -> list[Scenario]:
    """``count`` scenarios from ``seed`` (deterministic)."""
    return [scenario(_Rand((seed, i).__hash__()), f"s{seed}_{i}") for i in range(count)]


def scenarios(name="h"):
    """A hypothesis strategy of scenarios."""
    from hypothesis import strategies as st

    @st.composite
    def _s(draw):
        return scenario(_Draw(draw), name)
    return _s()
