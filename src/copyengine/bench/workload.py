"""One row of the bench: N folios mapped and written by one process, moved by one
move_pages() call per run, and verified after every run.

**Verification, after every run (timed or not), outside the timing.** Before each run the
process stamps two words of every base page (its first and last 8 bytes) with values
unique to the run (a store through its page table); after it:

* ``ret`` is 0 and every status is the target node;
* every PTE of the mapping is present and names a frame on the target node, the frames of
  each folio are contiguous, and no frame is mapped twice;
* every stamp reads back (a destination that was not copied holds another run's stamps,
  or zeros), and a random sample of pattern words of every folio reads back;
* small runs (up to ``full_check_bytes``) are compared in full through ``Process.read``.

The run mirrors the user side of the seed's experiment (``do_pages_move`` of mm/migrate.c
is the code under test).
"""
from __future__ import annotations

import gc
import time

import numpy as np

from .. import trace
from ..migrate.core import PHASES
from . import scenarios as sc

MiB = 1 << 20


#: pattern word w of a row is ``w * _K + seed`` (mod 2**64): cheap to make, and every
#: word of every row differs from its neighbours and from other rows' words
_K = np.uint64(0x9E3779B97F4A7C15)


class VerifyError(Exception):
    """A run whose outcome or contents are wrong."""


class EngineFailed(Exception):
    """The engine under test did not copy (it raised, or left folios to the CPU fallback)."""


# --------------------------------------------------------------------------- checks
def _check_engine_did_the_copy(before, after):
    """A run counts only if the configured engine copied every folio: no engine error and
    no CPU fallback (vmstat, so that no observer plugin sends the calls down the full path)."""
    errors = after["copy_engine_errors"] - before["copy_engine_errors"]
    if errors:
        raise EngineFailed(f"it failed {errors} time(s) (raised or returned a bad result) and the CPU "
                           "copied instead")
    fallback = after["copy_fallback_folios"] - before["copy_fallback_folios"]
    if fallback:
        raise EngineFailed(f"{fallback} folio(s) were not copied by the engine but by the CPU fallback "
                           "(folio_mc_copy)")


# --------------------------------------------------------------------------- workload
class Workload:
    """One row: ``count`` folios of one page size, mapped and written by one process."""

    def __init__(self, m, ps: sc.PageSize, count: int, seed: int, rng):
        from ..mm.pte import PTE_MIGRATION, PTE_PRESENT, pte_pfn
        self._pte_pfn, self._present, self._migration = pte_pfn, PTE_PRESENT, PTE_MIGRATION
        self.m, self.ps, self.count = m, ps, count
        self.total = count * ps.folio_size
        self.npages = self.total // ps.base_page
        self.wpp = ps.base_page // 8            # uint64 words per base page
        self.wpf = ps.folio_size // 8           # per folio
        self.seed = np.uint64(seed)
        self.rng = rng
        self.run_tag = 0
        self.p = m.spawn()
        # populated (MAP_POPULATE: the fault path's bulk form), then written through the
        # page table: the bytes a user store would leave, without a model fault per page
        # (each configuration's worker writes its own copy of the row)
        self.a = self.p.mmap(self.total, node=0, folio_size=ps.folio_size, populate=True)
        self.vma = self.p.find_vma(self.a)
        self.i0 = (self.a - self.vma.start) // ps.base_page
        self.addrs = self.a + np.arange(count, dtype=np.int64) * ps.folio_size
        self.targets = {n: np.full(count, n, np.int64) for n in (0, 1)}
        self.node = 0
        self.pages = np.arange(self.npages, dtype=np.uint64)
        self._write_pattern()
        self._stamp()

    # ---------------------------------------------------------------- contents
    def _pattern(self, lo, hi):
        return np.arange(lo, hi, dtype=np.uint64) * _K + self.seed

    def _stamps(self, pages, tag=None):
        tag = np.uint64(self.run_tag if tag is None else tag)
        base = (tag << np.uint64(40)) | (pages.astype(np.uint64) << np.uint64(1))
        return base, base | np.uint64(1)

    def expected(self, lo, hi):
        """The words [lo, hi) of the mapping as they must read now."""
        v = self._pattern(lo, hi)
        pg = np.arange(lo // self.wpp, (hi - 1) // self.wpp + 1, dtype=np.int64)
        s0, s1 = self._stamps(pg)
        i0 = pg * self.wpp - lo
        i1 = i0 + self.wpp - 1
        k0 = (i0 >= 0) & (i0 < hi - lo)
        k1 = (i1 >= 0) & (i1 < hi - lo)
        v[i0[k0]] = s0[k0]
        v[i1[k1]] = s1[k1]
        return v

    def _write_pattern(self, chunk=1 * MiB):
        """Every word of the row, stored into its frames on node 0 through the page table,
        a folio's frames being contiguous (checked after every run), in 1 MiB pieces."""
        ptes, pfns = self.pfns()
        if not ((ptes & self._present) != 0).all() or not (pfns // self.m.frames_per_node == 0).all():
            raise VerifyError("the populated row is not all present on node 0")
        mem64 = self.m.mem.view(np.uint64)
        per = max(1, chunk // self.ps.folio_size)
        ppf = self.ps.pages_per_folio
        for f0 in range(0, self.count, per):
            f1 = min(f0 + per, self.count)
            words = self._pattern(f0 * self.wpf, f1 * self.wpf).reshape(f1 - f0, self.wpf)
            heads = pfns[f0 * ppf:f1 * ppf:ppf] * self.wpp
            if (np.diff(heads) == self.wpf).all():      # the folios are contiguous too
                mem64[heads[0]:heads[0] + words.size] = words.ravel()
            else:
                for h, w in zip(heads, words):
                    mem64[h:h + self.wpf] = w

    def pfns(self):
        ptes = self.vma.ptes[self.i0:self.i0 + self.npages]
        return ptes, self._pte_pfn(ptes)

    def _stamp(self):
        """Stores of this run's stamps through the page table (first and last word of
        every base page): the same bytes a user store would write, without one call per
        page. The pages are present and writable, and no migration is in flight."""
        self.run_tag += 1
        ptes, pfns = self.pfns()
        if not ((ptes & self._present) != 0).all():
            raise VerifyError("a page of the mapping is not present before the run")
        mem64 = self.m.mem.view(np.uint64)
        s0, s1 = self._stamps(self.pages)
        w0 = pfns * self.wpp
        mem64[w0] = s0
        mem64[w0 + self.wpp - 1] = s1

    # ---------------------------------------------------------------- runs
    def move(self, target):
        """One timed move_pages() call; returns (seconds, phase deltas, result)."""
        m = self.m
        times = getattr(m, "migrate_times", None)
        before = dict(times) if times is not None else None
        nodes = self.targets[target]
        was = gc.isenabled()
        gc.disable()
        try:
            with trace.record(m) as rec:
                c0 = time.process_time()  # every thread of the process: engine workers too
                t0 = time.perf_counter()
                r = self.p.move_pages(0, self.addrs, nodes)
                dt = time.perf_counter() - t0
                self.cpu = time.process_time() - c0
            self.recorder = rec
        finally:
            if was:
                gc.enable()
        phases = None
        if before is not None:
            phases = {k: float(times.get(k, 0.0) - before.get(k, 0.0)) for k in PHASES}
        return dt, phases, r

    def verify(self, r, target, full: bool) -> None:
        st = np.asarray(r.status)
        if st.shape != (self.count,) or not (st == target).all():
            bad = np.nonzero(st != target)[0] if st.shape == (self.count,) else [0]
            i = int(bad[0])
            raise VerifyError(f"status[{i}] = {st[i] if st.shape == (self.count,) else st!r}, "
                              f"expected {target} ({len(bad)} of {self.count} statuses wrong)")
        if r.ret != 0:
            raise VerifyError(f"move_pages returned {r.ret}, expected 0")
        ptes, pfns = self.pfns()
        present = (ptes & self._present) != 0
        if not present.all() or ((ptes & self._migration) != 0).any():
            raise VerifyError(f"{int((~present).sum())} page(s) not present after the call")
        nodes = pfns // self.m.frames_per_node
        if not (nodes == target).all():
            raise VerifyError(f"{int((nodes != target).sum())} page(s) not on node {target}")
        ppf = self.ps.pages_per_folio
        if ppf > 1:
            pf = pfns.reshape(self.count, ppf)
            if not (pf - pf[:, :1] == np.arange(ppf)).all():
                raise VerifyError("a folio's frames are not contiguous")
        if len(np.unique(pfns)) != self.npages:
            raise VerifyError("a frame is mapped twice")
        mem64 = self.m.mem.view(np.uint64)
        s0, s1 = self._stamps(self.pages)
        w0 = pfns * self.wpp
        got0, got1 = mem64[w0], mem64[w0 + self.wpp - 1]
        ok = (got0 == s0) & (got1 == s1)
        if not ok.all():
            i = int(np.nonzero(~ok)[0][0])
            raise VerifyError(f"{int((~ok).sum())} of {self.npages} base pages hold wrong stamps "
                              f"(page {i}: {int(got0[i]):#x}, expected {int(s0[i]):#x}): not copied?")
        # a random sample of pattern words: 4 per base page, at least 64 per folio; in
        # blocks of pages, so that the check's temporaries stay small beside the row (the
        # bench's memory check counts them: at 4 KiB x 65536 one block was 160 MiB)
        per_page = max(4, -(-64 // ppf))
        block = max(1, (1 << 18) // per_page)
        for lo in range(0, self.npages, block):
            hi = min(lo + block, self.npages)
            idx = self.rng.integers(1, self.wpp - 1, size=(hi - lo, per_page), dtype=np.int64)
            idx += (np.arange(lo, hi, dtype=np.int64) * self.wpp)[:, None]
            idx = idx.ravel()
            page = idx // self.wpp
            got = mem64[pfns[page] * self.wpp + (idx - page * self.wpp)]
            bad = got != idx.astype(np.uint64) * _K + self.seed
            if bad.any():
                raise VerifyError(f"{int(bad.sum())} of {len(idx)} sampled words differ "
                                  f"(first at byte {int(idx[np.argmax(bad)]) * 8} of the mapping)")
        if full:
            self.full_compare()

    def full_compare(self, chunk=2 * MiB):
        """Every byte, read back through ``Process.read``."""
        words = chunk // 8
        total_words = self.total // 8
        for lo in range(0, total_words, words):
            hi = min(lo + words, total_words)
            got = np.frombuffer(self.p.read(self.a + lo * 8, (hi - lo) * 8), np.uint64)
            want = self.expected(lo, hi)
            if not np.array_equal(got, want):
                i = int(np.argmax(got != want))
                raise VerifyError(f"full compare: word at byte {(lo + i) * 8} is {int(got[i]):#x}, "
                                  f"expected {int(want[i]):#x}")

    def run(self, full: bool):
        """Stamp, move to the other node, verify. Returns (seconds, phases)."""
        target = 1 - self.node
        self._stamp()
        dt, phases, r = self.move(target)
        self.node = target  # wherever it ended, the next run starts from a fresh check
        self.verify(r, target, full)
        return dt, phases

    def close(self):
        try:
            self.p.exit()
        except Exception:
            pass
