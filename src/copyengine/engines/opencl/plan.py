"""The one planner of the opencl engine: a CopyJob becomes per-channel segments of commands.

This is dmaengine's *prep* step (``device_prep_dma_memcpy`` / ``_sg`` build a descriptor
chain before anything is submitted), for every job, small or large alike:

* :func:`prep_descriptors` - which folios are answered at once and never copied: a
  poisoned source gets -EIO (the engine is not machine-check safe, so it never reads it and
  the framework's ``folio_mc_copy`` then reports -EHWPOISON), a descriptor outside physical
  memory -EFAULT, one whose source and destination overlap -EINVAL, a folio with nothing to
  copy 0. The rest of the descriptors go on.
* :func:`plan_segments` - what goes to which channel in which piece: descriptors longer
  than ``SEG_MAX`` are split (a segment bounds cancel latency), the byte stream is cut
  into segments of total / (channels * DEPTH) bytes (``SEG_MIN`` .. ``SEG_MAX``) dealt
  round-robin to the channels (one dma cookie each: completion and cancellation are per
  segment), each segment knows which folios it touches (a folio is done when every segment
  touching it is), and its descriptors are coalesced and cut into pieces
  (:func:`plan_pieces`) grouped into commands: a kernel table per buffer pair, or
  ``clEnqueueCopyBuffer`` pieces (a lone piece, or bytes not made of whole 8-byte words).

:func:`plan_job` runs both on a job; the engine runs them in two steps only to take a
channel for the job (round-robin over jobs) when there is something to copy.

The segment and piece cutting is compiled (Numba, like the kernels of migrate/): one
algorithm for every job size, and it costs a small job less than the plain-Python planner
that small jobs used to take beside a NumPy one (about 25 against 45 us for four 2 MiB
folios; 2048 base pages about 70 against 130 us, on this 2-CPU host).
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np
from numba import njit

from ..base import PENDING

#: bytes one work-group copies (chunks are cut at absolute source multiples of this)
CHUNK = 256 << 10
#: a segment (one unit of completion and of cancellation latency) spans this much, or more
#: when the batch is large (total / (channels * DEPTH)), never more than SEG_MAX
SEG_MIN = 1 << 20
SEG_MAX = 8 << 20
#: segments per channel on the device at once
DEPTH = 2
#: an aligned group with at most this many pieces goes as copy-buffer commands, not a kernel
SMALL_PIECES = 1


class _Segment:
    """One unit of work on one channel (a dma cookie): its commands and, once issued, the
    event that completes it."""

    __slots__ = ("index", "channel", "folios", "nbytes", "groups", "event", "keep", "failed",
                 "t0")

    def __init__(self, index, channel, folios, nbytes):
        self.index = index
        self.channel = channel
        self.folios = folios
        self.nbytes = nbytes
        self.groups = []     # ("kernel", sb, db, table) or ("copy", sb, db, s, d, n)
        self.event = None
        self.keep = None     # table buffers alive until the segment completes
        self.failed = False  # a command of it could not be enqueued: its folios get -EIO
        self.t0 = None       # perf_counter() at enqueue, only when the job records spans


@dataclass
class Plan:
    """A planned job: ``result`` holds the final status of every folio answered at
    planning time and PENDING for the others; ``segments`` in issue order; ``folio_left``
    how many segments each folio waits for."""
    result: np.ndarray
    segments: list
    folio_left: np.ndarray


def _arrays(job, nr_folios):
    src = np.asarray(job.src_off, dtype=np.int64).ravel()
    dst = np.asarray(job.dst_off, dtype=np.int64).ravel()
    nb = np.asarray(job.nbytes, dtype=np.int64).ravel()
    fol = np.asarray(job.folio, dtype=np.int64).ravel()
    poisoned = np.asarray(job.src_poisoned, dtype=bool).ravel()
    if not len(src) == len(dst) == len(nb) == len(fol) or len(poisoned) != nr_folios:
        raise ValueError("opencl: descriptor arrays of different lengths")
    if len(fol) and (fol.min() < 0 or fol.max() >= nr_folios):
        raise ValueError("opencl: a descriptor names a folio outside the batch")
    return src, dst, nb, fol, poisoned


def prep_descriptors(job, nr_folios, mem_size):
    """(result, src, dst, nbytes, folio): the per-folio statuses decided before any copy
    (PENDING for folios still to copy) and the descriptors left to copy, in job order.
    A malformed job raises ValueError."""
    src, dst, nb, fol, poisoned = _arrays(job, nr_folios)
    res = np.full(nr_folios, PENDING, np.int32)
    bad = (nb < 0) | (src < 0) | (dst < 0) | (src > mem_size - nb) | (dst > mem_size - nb)
    ovl = ~bad & (nb > 0) & (np.abs(src - dst) < nb)
    if ovl.any():
        res[fol[ovl]] = -errno.EINVAL        # overlapping source and destination
    if bad.any():
        res[fol[bad]] = -errno.EFAULT        # outside physical memory
    res[poisoned] = -errno.EIO               # not machine-check safe: never read, say -EIO
    keep = (nb > 0) & (res[fol] == PENDING)
    has = np.zeros(nr_folios, bool)
    has[fol[keep]] = True
    res[(res == PENDING) & ~has] = 0         # nothing to copy
    if not keep.all():
        src, dst, nb, fol = src[keep], dst[keep], nb[keep], fol[keep]
    return res, src, dst, nb, fol


@njit(cache=True, nogil=True)
def _pieces(src, dst, nbytes, seg, region, chunk):
    """plan_pieces, compiled (the planner's core calls it too)."""
    n = len(src)
    rs = np.empty(n, np.int64)
    rd = np.empty(n, np.int64)
    rn = np.empty(n, np.int64)
    rg = np.empty(n, np.int64)
    r = 0
    count = 0                       # pieces after the chunk cuts
    for i in range(n):
        if (r and rs[r - 1] + rn[r - 1] == src[i] and rd[r - 1] + rn[r - 1] == dst[i]
                and rg[r - 1] == seg[i]):
            count -= (rs[r - 1] + rn[r - 1] - 1) // chunk - rs[r - 1] // chunk + 1
            rn[r - 1] += nbytes[i]
        else:
            rs[r], rd[r], rn[r], rg[r] = src[i], dst[i], nbytes[i], seg[i]
            r += 1
        count += (rs[r - 1] + rn[r - 1] - 1) // chunk - rs[r - 1] // chunk + 1
    ps = np.empty(2 * count, np.int64)
    pd = np.empty(2 * count, np.int64)
    pn = np.empty(2 * count, np.int64)
    pg = np.empty(2 * count, np.int64)
    tails = np.empty(count, np.int64)
    p = 0
    t = 0
    for j in range(r):
        s, d, left, g = rs[j], rd[j], rn[j], rg[j]
        while left > 0:
            k = min(left, chunk - s % chunk)
            ps[p], pd[p], pn[p], pg[p] = s, d, k, g
            if d // region != (d + k - 1) // region:
                tails[t] = p   # a piece (<= chunk <= region) crosses at most one edge
                t += 1
            p += 1
            s += k
            d += k
            left -= k
    for x in range(t):      # pieces split off at a destination edge come last
        q = tails[x]
        edge = (pd[q] // region + 1) * region
        head = edge - pd[q]
        ps[p], pd[p], pn[p], pg[p] = ps[q] + head, edge, pn[q] - head, pg[q]
        pn[q] = head
        p += 1
    return ps[:p], pd[:p], pn[:p], pg[:p]


def plan_pieces(src, dst, nbytes, seg, region, chunk):
    """Coalesce contiguous descriptors (never across segments), cut at absolute source
    multiples of ``chunk`` and at destination multiples of ``region`` (buffer edges; source
    edges are chunk multiples). Returns (src, dst, nbytes, seg) of the pieces, in
    descriptor order except pieces split off at a destination edge, which come last."""
    return _pieces(*(_ro(a) for a in (src, dst, nbytes, seg)), int(region), int(chunk))


@njit(cache=True, nogil=True)
def _plan(src, dst, nb, fol, nf, channels, region, nbuf):
    """The segments of plan_segments as arrays: per segment its bytes and (sorted) folios,
    per group of pieces (segment, source buffer, destination buffer, unaligned) its range
    of pieces, and the pieces (buffer-relative) with, for kernel groups, their word table."""
    n0 = len(nb)
    total = 0
    m = 0
    for i in range(n0):
        total += nb[i]
        m += (nb[i] + SEG_MAX - 1) // SEG_MAX     # bound a segment (and so cancel latency)
    target = min(SEG_MAX, max(SEG_MIN, -(-total // (channels * DEPTH))))
    S = np.empty(m, np.int64)
    D = np.empty(m, np.int64)
    N = np.empty(m, np.int64)
    F = np.empty(m, np.int64)
    G = np.empty(m, np.int64)
    sstart = np.empty(m + 1, np.int64)
    k = 0
    pos = 0
    cur = -1
    nseg = 0
    for i in range(n0):
        off = 0
        while off < nb[i]:
            c = min(SEG_MAX, nb[i] - off)
            if pos // target != cur:   # a segment starts where a descriptor crosses a target multiple
                cur = pos // target
                sstart[nseg] = k
                nseg += 1
            S[k], D[k], N[k], F[k], G[k] = src[i] + off, dst[i] + off, c, fol[i], nseg - 1
            pos += c
            off += c
            k += 1
    sstart[nseg] = m
    # folios per segment (sorted), and how many segments each folio waits for
    segbytes = np.zeros(nseg, np.int64)
    fstart = np.empty(nseg + 1, np.int64)
    folios = np.empty(m, np.int64)
    folio_left = np.zeros(nf, np.int64)
    fc = 0
    for g in range(nseg):
        fstart[g] = fc
        fs = np.sort(F[sstart[g]:sstart[g + 1]])
        last = -1
        for j in range(len(fs)):
            if fs[j] != last:
                last = fs[j]
                folios[fc] = last
                folio_left[last] += 1
                fc += 1
        segbytes[g] = N[sstart[g]:sstart[g + 1]].sum()
    fstart[nseg] = fc
    # pieces, grouped by (segment, src buffer, dst buffer, unaligned), in piece order within
    ps, pd, pn, pg = _pieces(S, D, N, G, region, CHUNK)
    npc = len(ps)
    key = np.empty(npc, np.int64)
    for j in range(npc):
        odd = 1 if (ps[j] | pd[j] | pn[j]) & 7 else 0
        key[j] = ((pg[j] * nbuf + ps[j] // region) * nbuf + pd[j] // region) * 2 + odd
    order = np.argsort(key, kind="mergesort")
    ngroups = 0
    for j in range(npc):
        if j == 0 or key[order[j]] != key[order[j - 1]]:
            ngroups += 1
    gstart = np.empty(ngroups + 1, np.int64)
    ginfo = np.empty((ngroups, 4), np.int64)     # segment, src buffer, dst buffer, unaligned
    qs = np.empty(npc, np.int64)
    qd = np.empty(npc, np.int64)
    qn = np.empty(npc, np.int64)
    g = -1
    for j in range(npc):
        o = order[j]
        if j == 0 or key[o] != key[order[j - 1]]:
            g += 1
            gstart[g] = j
            x = key[o]
            ginfo[g, 3] = x % 2
            x //= 2
            ginfo[g, 2] = x % nbuf
            x //= nbuf
            ginfo[g, 1] = x % nbuf
            ginfo[g, 0] = x // nbuf
        qs[j] = ps[o] - ginfo[g, 1] * region
        qd[j] = pd[o] - ginfo[g, 2] * region
        qn[j] = pn[o]
    gstart[ngroups] = npc
    # word tables of kernel groups: n source, n destination, n word counts per group
    tab = np.empty(3 * npc, np.int64)
    for g in range(ngroups):
        a, b = gstart[g], gstart[g + 1]
        if ginfo[g, 3] == 0 and b - a > SMALL_PIECES:
            w = b - a
            for j in range(w):
                tab[3 * a + j] = qs[a + j] >> 3
                tab[3 * a + w + j] = qd[a + j] >> 3
                tab[3 * a + 2 * w + j] = qn[a + j] >> 3
    return folio_left, segbytes, fstart, folios[:fc], gstart, ginfo, qs, qd, qn, tab


def _ro(a):
    """A read-only int64 view: the compiled planner then has one signature, whatever the
    caller's arrays (the framework's job arrays are read-only)."""
    a = np.asarray(a, dtype=np.int64)
    if a.flags.writeable:
        a = a.view()
        a.flags.writeable = False
    return a


def plan_segments(src, dst, nb, fol, nr_folios, channels, region, nbuf, first_channel):
    """(segments, folio_left) for the descriptors left to copy (at least one): segment i
    goes to channel (first_channel + i) % channels; its commands address buffers of
    ``region`` bytes (``nbuf`` of them) with buffer-relative offsets."""
    folio_left, segbytes, fstart, folios, gstart, ginfo, qs, qd, qn, tab = _plan(
        _ro(src), _ro(dst), _ro(nb), _ro(fol), int(nr_folios), int(channels), int(region),
        int(nbuf))
    fstart = fstart.tolist()
    segs = [_Segment(i, (first_channel + i) % channels, folios[fstart[i]:fstart[i + 1]], b)
            for i, b in enumerate(segbytes.tolist())]
    bounds = gstart.tolist()
    for g, (s, bs, bd, odd) in enumerate(ginfo.tolist()):
        a, b = bounds[g], bounds[g + 1]
        if odd or b - a <= SMALL_PIECES:
            segs[s].groups.extend(("copy", bs, bd, x, y, z) for x, y, z in
                                  zip(qs[a:b].tolist(), qd[a:b].tolist(), qn[a:b].tolist()))
        else:
            segs[s].groups.append(("kernel", bs, bd, tab[3 * a:3 * b]))
    return segs, folio_left


def plan_job(job, mem_size, region, channels, first_channel=0) -> Plan:
    """The whole plan of ``job`` over ``mem_size`` bytes of memory shared as buffers of
    ``region`` bytes, for ``channels`` channels starting at ``first_channel``."""
    nf = int(job.nr_folios)
    res, src, dst, nb, fol = prep_descriptors(job, nf, mem_size)
    if not len(nb):
        return Plan(res, [], np.zeros(nf, np.int64))
    nbuf = -(-int(mem_size) // int(region))
    segs, left = plan_segments(src, dst, nb, fol, nf, channels, region, nbuf, first_channel)
    return Plan(res, segs, left)
