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
"""
from __future__ import annotations

import errno
from dataclasses import dataclass

import numpy as np

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


def plan_pieces(src, dst, nbytes, seg, region, chunk):
    """Coalesce contiguous descriptors (never across segments), cut at absolute source
    multiples of ``chunk`` and at destination multiples of ``region`` (buffer edges; source
    edges are chunk multiples). Returns (src, dst, nbytes, seg) of the pieces, in
    descriptor order except pieces split off at a destination edge, which come last."""
    n = len(src)
    if n > 1:
        brk = np.empty(n, bool)
        brk[0] = True
        np.not_equal(src[:-1] + nbytes[:-1], src[1:], out=brk[1:])
        brk[1:] |= dst[:-1] + nbytes[:-1] != dst[1:]
        brk[1:] |= seg[:-1] != seg[1:]
        if brk.all():
            rs, rd, rn, rseg = src, dst, nbytes, seg
        else:
            starts = np.flatnonzero(brk)
            rs, rd, rseg = src[starts], dst[starts], seg[starts]
            rn = np.add.reduceat(nbytes, starts)
    else:
        rs, rd, rn, rseg = src, dst, nbytes, seg
    base = rs // chunk
    first_end = np.minimum(rs + rn, (base + 1) * chunk)
    if (first_end == rs + rn).all():         # every run inside one chunk
        ps, pd, pn, pseg = rs, rd, rn, rseg
    else:
        k = 1 + (rs + rn - first_end + chunk - 1) // chunk
        idx = np.repeat(np.arange(len(rs)), k)
        j = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)
        ps = np.where(j == 0, rs[idx], (base[idx] + j) * chunk)
        pe = np.minimum((base[idx] + j + 1) * chunk, rs[idx] + rn[idx])
        pd = rd[idx] + (ps - rs[idx])
        pn = pe - ps
        pseg = rseg[idx]
    edge = (pd // region + 1) * region
    over = pd + pn - edge
    x = np.flatnonzero(over > 0)
    if len(x):  # a piece (<= chunk <= region) crosses at most one destination edge
        head = edge[x] - pd[x]
        ps = np.concatenate((ps, ps[x] + head))
        pd = np.concatenate((pd, edge[x]))
        pn = np.concatenate((pn, over[x]))
        pn[x] = head
        pseg = np.concatenate((pseg, pseg[x]))
    return ps, pd, pn, pseg


def plan_segments(src, dst, nb, fol, nr_folios, channels, region, nbuf, first_channel):
    """(segments, folio_left) for the descriptors left to copy (at least one): segment i
    goes to channel (first_channel + i) % channels; its commands address buffers of
    ``region`` bytes (``nbuf`` of them) with buffer-relative offsets."""
    nf = nr_folios
    if (nb > SEG_MAX).any():     # bound a segment (and so cancel latency)
        k = (nb + SEG_MAX - 1) // SEG_MAX
        j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
        off = j * SEG_MAX
        src = np.repeat(src, k) + off
        dst = np.repeat(dst, k) + off
        nb = np.minimum(np.repeat(nb, k) - off, SEG_MAX)
        fol = np.repeat(fol, k)
    n = len(nb)
    cum = np.cumsum(nb)
    total = int(cum[-1])
    target = min(SEG_MAX, max(SEG_MIN, -(-total // (channels * DEPTH))))
    if total <= target:
        bounds = np.array([0, n])
        seg_of = np.zeros(n, np.int64)
    else:    # a descriptor starts a new segment when its first byte crosses a target multiple
        cum -= nb
        cum //= target
        cuts = np.flatnonzero(cum[1:] != cum[:-1]) + 1
        bounds = np.concatenate(([0], cuts, [n]))
        seg_of = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
    nseg = len(bounds) - 1
    # folios per segment, and how many segments each folio waits for
    key = seg_of * nf + fol
    if n > 1 and (key[1:] >= key[:-1]).all():     # descriptors in folio order
        keep = np.empty(n, bool)
        keep[0] = True
        np.not_equal(key[1:], key[:-1], out=keep[1:])
        key = key[keep]
    elif n > 1:
        key = np.unique(key)
    kseg, kfol = key // nf, key % nf
    folio_left = np.bincount(kfol, minlength=nf)
    fsplit = np.searchsorted(kseg, np.arange(nseg + 1)).tolist()
    # pieces, grouped by (segment, src buffer, dst buffer, unaligned)
    ps, pd, pn, pseg = plan_pieces(src, dst, nb, seg_of, region, CHUNK)
    R = region
    odd = ((ps | pd | pn) & 7) != 0
    if nbuf == 1 and not odd.any():    # one buffer, all words: pieces in segment order
        sb = db = np.zeros(len(ps), np.int64)
        gst = np.searchsorted(pseg, np.arange(nseg))
        gend = np.append(gst[1:], len(ps))
        gseg = np.arange(nseg)
    else:
        sb, db = ps // R, pd // R
        gkey = ((pseg * nbuf + sb) * nbuf + db) * 2 + odd
        order = np.argsort(gkey, kind="stable")
        gkey, ps, pd, pn, sb, db, odd = (a[order] for a in (gkey, ps, pd, pn, sb, db, odd))
        brk = np.empty(len(gkey), bool)
        brk[0] = True
        np.not_equal(gkey[1:], gkey[:-1], out=brk[1:])
        gst = np.flatnonzero(brk)
        gend = np.append(gst[1:], len(gkey))
        gseg = gkey[gst] // (2 * nbuf * nbuf)
        ps = ps - sb * R
        pd = pd - db * R
    segbytes = np.add.reduceat(nb, bounds[:-1]).tolist()
    segs = [_Segment(i, (first_channel + i) % channels, kfol[fsplit[i]:fsplit[i + 1]],
                     segbytes[i]) for i in range(nseg)]
    for g0, g1, s in zip(gst.tolist(), gend.tolist(), gseg.tolist()):
        bs, bd = int(sb[g0]), int(db[g0])
        if odd[g0] or g1 - g0 <= SMALL_PIECES:
            segs[s].groups.extend(("copy", bs, bd, a, b, c) for a, b, c in
                                  zip(ps[g0:g1].tolist(), pd[g0:g1].tolist(), pn[g0:g1].tolist()))
        else:
            tab = np.concatenate((ps[g0:g1], pd[g0:g1], pn[g0:g1]))
            tab >>= 3
            segs[s].groups.append(("kernel", bs, bd, tab))
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
