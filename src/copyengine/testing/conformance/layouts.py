"""Generated jobs for the conformance kit: random folio layouts over a kit machine's memory.

A :class:`Layout` is a batch the way the migration state machine hands one to an engine
(``migrate_folios_batch_copy`` builds one descriptor per folio; the kit also cuts folios
into several descriptors and shuffles them, which the protocol allows), drawn by the
hypothesis strategy :func:`layouts`; :func:`fill` gives it random sources and destinations
that differ in every byte.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from hypothesis import strategies as st

from ...engines.base import CopyJob

PAGE = 4096
NODE_SIZE = 4 << 20
#: bytes of folios per side (sources, destinations) of one generated job
BUDGET = 3 << 20


@dataclass
class Layout:
    """A generated job: folios (sizes, source and destination offsets), descriptor cuts
    inside each folio, poisoned folios, descriptor order."""
    sizes: list
    src: list
    dst: list
    cuts: list          # per folio: sorted byte offsets where a new descriptor starts
    poisoned: list
    order: list | None  # descriptor permutation, None for folio order

    def job(self, mem) -> CopyJob:
        s, d, n, f = [], [], [], []
        for i, size in enumerate(self.sizes):
            edges = [0] + list(self.cuts[i]) + [size]
            for a, b in zip(edges, edges[1:]):
                s.append(self.src[i] + a)
                d.append(self.dst[i] + a)
                n.append(b - a)
                f.append(i)
        arrays = [np.array(x, np.int64) for x in (s, d, n, f)]
        if self.order is not None and len(s):
            perm = np.array(self.order, np.int64)
            arrays = [a[perm] for a in arrays]
        return CopyJob(mem, *arrays, np.array(self.poisoned, bool))

    def describe(self):
        return (f"{len(self.sizes)} folios sizes={self.sizes} poisoned="
                f"{[i for i, p in enumerate(self.poisoned) if p]} "
                f"descriptors={sum(len(c) + 1 for c in self.cuts)}"
                f"{' shuffled' if self.order is not None else ''}")


def _place(draw, sizes, base, limit):
    """Page-aligned offsets for ``sizes`` in [base, limit), random order and gaps."""
    perm = draw(st.permutations(range(len(sizes))))
    gaps = draw(st.lists(st.integers(0, 2), min_size=len(sizes), max_size=len(sizes)))
    out = [0] * len(sizes)
    pos = base
    for k, i in enumerate(perm):
        pos += gaps[k] * PAGE
        out[i] = pos
        pos += sizes[i]
    assert pos <= limit
    return out


@st.composite
def layouts(draw, granule=8, min_folios=0, max_folios=12, poison=True, exactly_one_poisoned=False):
    """Hypothesis strategy of :class:`Layout` over a kit machine's memory."""
    orders = draw(st.lists(st.sampled_from([0, 0, 0, 1, 2, 3, 4, 6, 9]),
                           min_size=min_folios, max_size=max_folios))
    sizes, total = [], 0
    for o in orders:
        size = PAGE << o
        if total + size > BUDGET:
            size = PAGE
        if total + size > BUDGET:
            break
        sizes.append(size)
        total += size
    while len(sizes) < min_folios:
        sizes.append(PAGE)
    src = _place(draw, sizes, PAGE, NODE_SIZE)
    dst = _place(draw, sizes, NODE_SIZE, 2 * NODE_SIZE)
    cuts = []
    for size in sizes:
        units = size // granule
        pts = draw(st.lists(st.integers(1, units - 1), max_size=3, unique=True)) if units > 1 else []
        cuts.append(sorted(p * granule for p in pts))
    n = len(sizes)
    if exactly_one_poisoned and n:
        bad = {draw(st.integers(0, n - 1))}
    elif poison and n:
        bad = draw(st.sets(st.integers(0, n - 1), max_size=2))
    else:
        bad = set()
    poisoned = [i in bad for i in range(n)]
    ndesc = sum(len(c) + 1 for c in cuts)
    order = draw(st.none() | st.permutations(range(ndesc))) if ndesc > 1 else None
    return Layout(sizes, src, dst, cuts, poisoned, order)


def fill(mem, job, seed):
    """Random sources; destinations the complement of their sources (every byte differs)."""
    rng = np.random.default_rng(seed)
    for s, d, n in zip(job.src_off.tolist(), job.dst_off.tolist(), job.nbytes.tolist()):
        mem[s:s + n] = rng.integers(0, 256, n, dtype=np.uint8)
        mem[d:d + n] = ~mem[s:s + n]
