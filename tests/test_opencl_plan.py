"""The opencl engine's one planner (engines/opencl/plan.py), without a device: for random
layouts, alone and padded into a large job, the commands copy exactly the bytes of the
folios left to copy, each once, never a poisoned source; every folio waits for exactly
the segments holding its bytes; segments are dealt round-robin from the job's channel;
bad descriptors get their errno and a malformed job a ValueError."""
import errno

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from copyengine.engines import opencl as ocl
from copyengine.engines.base import PENDING, CopyJob
from copyengine.testing.conformance import NODE_SIZE, layouts, padded_job

MEM = 4 * NODE_SIZE       # layouts use the lower half, the filler of padded_job the upper


def commands(plan, region):
    """Every command of the plan as absolute (segment, channel, src, dst, nbytes) pieces."""
    out = []
    for seg in plan.segments:
        for g in seg.groups:
            if g[0] == "copy":
                _, sb, db, s, d, n = g
                out.append((seg.index, seg.channel, sb * region + s, db * region + d, n))
            else:
                _, sb, db, tab = g
                k = len(tab) // 3
                assert k > ocl.SMALL_PIECES      # a lone piece goes as a copy command
                for s, d, n in zip(*(tab[i * k:(i + 1) * k].tolist() for i in range(3))):
                    out.append((seg.index, seg.channel, sb * region + s * 8, db * region + d * 8, n * 8))
    return out


def check_plan(job, plan, region, channels, first):
    nf = job.nr_folios
    pois = job.src_poisoned
    res = plan.result
    assert res.dtype == np.int32 and res.shape == (nf,)
    assert (res[pois] == -errno.EIO).all()
    has_bytes = np.zeros(nf, bool)
    has_bytes[job.folio[job.nbytes > 0]] = True
    assert (res[~pois] == np.where(has_bytes[~pois], PENDING, 0)).all()
    # the descriptors left to copy, by destination
    keep = ~pois[job.folio] & (job.nbytes > 0)
    order = np.argsort(job.dst_off[keep])
    D, S, N, F = (a[keep][order] for a in (job.dst_off, job.src_off, job.nbytes, job.folio))
    got = np.zeros(len(D), np.int64)            # bytes of each descriptor some command copies
    seg_folios = {seg.index: set() for seg in plan.segments}
    seg_bytes = dict.fromkeys(seg_folios, 0)
    # neighbours contiguous in source and destination may be coalesced into one piece
    M = []                                      # [dst start, dst end, src - dst]
    for d, s, n in zip(D.tolist(), S.tolist(), N.tolist()):
        if M and M[-1][1] == d and M[-1][2] == s - d:
            M[-1][1] = d + n
        else:
            M.append([d, d + n, s - d])
    M0 = np.array([m[0] for m in M], np.int64)
    pieces = commands(plan, region)
    for i, ch, s, d, n in pieces:
        assert n > 0 and ch == (first + i) % channels
        m = int(np.searchsorted(M0, d, "right")) - 1
        assert m >= 0 and d + n <= M[m][1], "a command writes outside the destinations to copy"
        assert s - d == M[m][2], "a command reads the wrong source"
        assert s // ocl.CHUNK == (s + n - 1) // ocl.CHUNK, "a piece crosses a chunk"
        assert d // region == (d + n - 1) // region, "a piece crosses a buffer edge"
        k0 = max(0, int(np.searchsorted(D, d, "right")) - 1)
        for k in range(k0, int(np.searchsorted(D, d + n, "left"))):
            part = min(d + n, D[k] + N[k]) - max(d, D[k])
            if part > 0:
                got[k] += part
                seg_folios[i].add(int(F[k]))
        seg_bytes[i] += n
    ends = sorted((d, d + n) for _, _, _, d, n in pieces)
    assert all(e0 <= d1 for (_, e0), (d1, _) in zip(ends, ends[1:])), "two commands overlap"
    assert (got == N).all(), "some bytes are copied by no command"
    left = np.zeros(nf, np.int64)
    for seg in plan.segments:
        assert set(seg.folios.tolist()) == seg_folios[seg.index]
        assert seg.nbytes == seg_bytes[seg.index] <= ocl.SEG_MAX
        left[seg.folios] += 1
    assert (plan.folio_left == left).all()
    assert [s.index for s in plan.segments] == list(range(len(plan.segments)))


@settings(deadline=None, max_examples=60)
@given(layouts(granule=1, max_folios=8), st.booleans(), st.booleans(),
       st.sampled_from([1, 2, 3, 16]), st.sampled_from([ocl.CHUNK * 4, 1 << 30]), st.integers(0, 15))
def test_one_planner_small_and_padded(layout, pad, pad_first, channels, region, first):
    job = layout.job(np.zeros(0, np.uint8))
    if pad:
        job = padded_job(job, pad_first)
    first %= channels
    plan = ocl.plan_job(job, MEM, region, channels, first)
    check_plan(job, plan, region, channels, first)


def test_segments_bound_cancel_latency():
    """40 MiB of 2 MiB folios over 2 channels: 5 segments of 8 MiB, 3 on the first channel
    (what the cancel tests of test_engine_opencl rely on)."""
    n = 20
    fb = 2 << 20
    job = CopyJob(None, np.arange(n, dtype=np.int64) * fb, (n + np.arange(n, dtype=np.int64)) * fb,
                  np.full(n, fb, np.int64), np.arange(n, dtype=np.int64), np.zeros(n, bool))
    plan = ocl.plan_job(job, 2 * n * fb, 1 << 30, 2)
    assert [s.nbytes for s in plan.segments] == [ocl.SEG_MAX] * 5
    assert [s.channel for s in plan.segments] == [0, 1, 0, 1, 0]
    check_plan(job, plan, 1 << 30, 2, 0)


def test_bad_descriptors_get_their_errno():
    size = 1 << 20
    s = np.array([0, size - 8, 8192, 12288, 16384], np.int64)
    d = np.array([65536, 131072, 8200, 131072 + 4096, size], np.int64)
    n = np.array([4096, 4096, 4096, 0, 4096], np.int64)
    f = np.arange(5, dtype=np.int64)
    pois = np.array([False, True, False, False, False])
    plan = ocl.plan_job(CopyJob(None, s, d, n, f, pois), size, 1 << 30, 2)
    # past the end and poisoned: -EIO wins (never read); overlapping: -EINVAL; empty: 0;
    # a destination at the very end: -EFAULT
    assert plan.result.tolist() == [PENDING, -errno.EIO, -errno.EINVAL, 0, -errno.EFAULT]
    assert [seg.folios.tolist() for seg in plan.segments] == [[0]]


@pytest.mark.parametrize("bad", ["lengths", "folio", "negative folio"])
def test_malformed_job_is_valueerror(bad):
    z = np.zeros(2, np.int64)
    s, d, n, f, p = z, z + 8192, z + 8, np.arange(2, dtype=np.int64), np.zeros(2, bool)
    if bad == "lengths":
        n = np.zeros(3, np.int64)
    elif bad == "folio":
        f = np.array([0, 2], np.int64)
    else:
        f = np.array([0, -1], np.int64)
    with pytest.raises(ValueError, match="opencl: "):
        ocl.plan_job(CopyJob(None, s, d, n, f, p), 1 << 20, 1 << 30, 2)


def test_plan_pieces_coalesces_then_cuts_at_chunks_and_buffer_edges():
    """Two contiguous descriptors of one segment become one run, cut at source chunk
    multiples; a piece crossing a destination buffer edge is split, its tail last; a
    third contiguous descriptor in another segment is not merged."""
    C, R = ocl.CHUNK, 4 * ocl.CHUNK
    src = np.array([C - 8, C + 100, 3 * C], np.int64)
    dst = np.array([R - 16, R - 16 + 108, 5 * R], np.int64)
    nb = np.array([108, C, 8], np.int64)
    seg = np.array([0, 0, 1], np.int64)
    ps, pd, pn, pg = ocl.plan_pieces(src, dst, nb, seg, R, C)
    got = list(zip(ps.tolist(), pd.tolist(), pn.tolist(), pg.tolist()))
    assert got == [
        (C - 8, R - 16, 8, 0),            # up to the source chunk edge
        (C, R - 8, 8, 0),                 # head up to the destination buffer edge ...
        (2 * C, R - 16 + C + 8, 100, 0),  # ... the rest of the run from the next chunk
        (3 * C, 5 * R, 8, 1),             # another segment: never merged
        (C + 8, R, C - 8, 0),             # the tail past the buffer edge comes last
    ]
