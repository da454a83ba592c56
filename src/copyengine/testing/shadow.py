"""A shadow model of memory contents: what every process of a machine should read.

A test keeps a :class:`ShadowMemory` beside a machine, tells it every successful mmap,
munmap, write, fork, exit and pin, and has :func:`~copyengine.testing.invariants.check_machine`
(``shadow=``) compare every readable byte and every pin count with it.
"""
from __future__ import annotations

import bisect

import numpy as np

from ..mm.pageflags import PG_hwpoison
from ..mm.pte import PFN_SHIFT, PTE_PRESENT
from .machine_checks import _expect, _fail

__all__ = ["ShadowMemory"]


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
