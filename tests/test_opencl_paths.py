"""The opencl engine on the conformance kit's small-job / large-job check (one planner: a
layout gives the same statuses and bytes alone and inside a large job, whatever the
channels and buffer windows), the check catching a planner that disagrees with itself,
and the timeline spans a job records when it carries a span list (issue 16).

Device tests skip (with the reason) only when no OpenCL platform/device is usable."""
import errno

import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import opencl as ocl
from copyengine.engines.base import PENDING, CopyJob
from copyengine.testing import ConformanceError
from copyengine.testing.conformance import Options, check_paths
from copyengine.testing.conformance.paths import FILLER, MAX_FOLIOS

MiB = 1 << 20
FILLER_FOLIOS = sum(count for _, count in FILLER)


@pytest.fixture(scope="module")
def device():
    try:
        return ocl.open_device()
    except ce.EngineUnavailable as e:
        try:
            _, devices = ocl._device_list(ocl._import_cl())
        except ce.EngineUnavailable:
            pytest.skip(f"no OpenCL platform: {e}")
        if not devices:
            pytest.skip("no OpenCL device")
        raise          # a device exists: the engine must work on it


def _opts(device, channels=2, max_examples=25, shrink=True, **kw):
    return Options(lambda m: ocl.OpenCLEngine(m, channels, device=device, **kw), granule=1,
                   max_examples=max_examples, shrink=shrink)


# ----------------------------------------------------------------------------- small vs large
@pytest.mark.parametrize("channels", [1, 2, 3])
def test_small_and_large_jobs_agree(device, channels):
    check_paths(_opts(device, channels))


def test_small_and_large_jobs_agree_over_buffer_windows(device):
    """1 MiB buffer windows: pieces are cut at their edges in both jobs alike."""
    check_paths(_opts(device, 2, max_buffer=ocl.CHUNK * 4))


def _layout_folios(fol, nr_folios):
    """The descriptors of the compared layout's folios in a padded job (None otherwise)."""
    if nr_folios <= MAX_FOLIOS:
        return None                            # the small job
    mine = np.flatnonzero(fol < nr_folios - FILLER_FOLIOS)
    return mine if len(mine) else None


def test_check_catches_a_planner_that_drops_a_byte(device, monkeypatch):
    """A planner that copies one byte less of a folio in a large job only: the check
    raises, naming the disagreement (not merely a bad copy)."""
    import copyengine.engines.opencl.engine as eng_mod
    plan_segments = eng_mod.plan_segments

    def drops_a_byte(src, dst, nb, fol, nr_folios, *rest):
        mine = _layout_folios(fol, nr_folios)
        if mine is not None:
            nb = nb.copy()
            nb[mine[0]] -= 1
        return plan_segments(src, dst, nb, fol, nr_folios, *rest)
    monkeypatch.setattr(eng_mod, "plan_segments", drops_a_byte)
    with pytest.raises(ConformanceError, match="paths disagree on [0-9]+ byte"):
        check_paths(_opts(device, max_examples=30, shrink=False))


def test_check_catches_a_planner_that_copies_a_poisoned_folio(device, monkeypatch):
    """A large-job planner that forgets a poisoned folio (reports it copied): the statuses
    disagree."""
    import copyengine.engines.opencl.engine as eng_mod
    prep = eng_mod.prep_descriptors

    def forgets_poison(job, nr_folios, mem_size):
        res, *rest = prep(job, nr_folios, mem_size)
        if nr_folios > MAX_FOLIOS:
            res = np.where(res == -errno.EIO, 0, res).astype(np.int32)
        return (res, *rest)
    monkeypatch.setattr(eng_mod, "prep_descriptors", forgets_poison)
    with pytest.raises(ConformanceError, match="paths disagree: folio [0-9]+ reported -5 as a "
                                               "small job and 0 as a large one"):
        check_paths(_opts(device, max_examples=60, shrink=False))


# ----------------------------------------------------------------------------- spans
@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="48MiB") as mach:
        yield mach


def _job(m, order, count):
    fb = m.page_size << order
    src = m.alloc_folios(0, order, count) * m.page_size
    dst = m.alloc_folios(1, order, count) * m.page_size
    m.mem[src[0]:src[0] + fb] = 7
    return CopyJob(m.mem, src.astype(np.int64), dst.astype(np.int64), np.full(count, fb, np.int64),
                   np.arange(count, dtype=np.int64), np.zeros(count, bool))


def _check_spans(spans, comp, result):
    assert isinstance(spans, list) and spans
    used = {ch for ch, _, _ in comp.log}
    assert {lane for lane, *_ in spans} == {f"opencl channel {ch}" for ch in used}
    assert len(spans) == comp.segments
    for lane, t0, t1, folios in spans:
        assert isinstance(t0, float) and isinstance(t1, float) and t0 <= t1
        assert isinstance(folios, int) and folios >= 0
    assert sum(s[3] for s in spans) == int((result == 0).sum())


@pytest.mark.parametrize("order,count,channels", [
    (9, 8, 2),       # 16 MiB of THPs: four segments over two channels
    (0, 300, 3),     # base pages: one small segment
    (9, 1, 2),       # one folio: one segment
])
def test_spans_one_lane_per_channel(m, device, order, count, channels):
    e = ocl.OpenCLEngine(m, channels, device=device)
    try:
        job = _job(m, order, count)
        job.spans = []
        c = e.submit(job)
        r = c.wait(20)
        assert r is not None and (r == 0).all()
        _check_spans(job.spans, c, r)
    finally:
        e.close()


def test_spans_count_a_folio_split_over_segments_once(m, device):
    """One 20 MiB descriptor (one folio) is three segments: three spans, one folio."""
    e = ocl.OpenCLEngine(m, 2, device=device)
    try:
        n = 20 * MiB
        job = CopyJob(m.mem, np.array([0], np.int64), np.array([48 * MiB], np.int64),
                      np.array([n], np.int64), np.zeros(1, np.int64), np.zeros(1, bool))
        job.spans = []
        c = e.submit(job)
        r = c.wait(20)
        assert r is not None and r[0] == 0 and c.segments == 3
        _check_spans(job.spans, c, r)
        assert sorted(s[3] for s in job.spans) == [0, 0, 1]
    finally:
        e.close()


def test_no_spans_without_a_recorder(m, device):
    """spans None (no recorder): nothing is timed or recorded."""
    e = ocl.OpenCLEngine(m, 2, device=device)
    try:
        job = _job(m, 9, 4)
        assert job.spans is None
        c = e.submit(job)
        with c._lock:
            segs = [s for q in c._queued for s in q] + list(c._inflight)
        r = c.wait(20)
        assert r is not None and (r == 0).all() and job.spans is None
        assert all(s.t0 is None for s in segs)
    finally:
        e.close()


def test_spans_of_a_poisoned_folio_count_only_copied_folios(m, device):
    e = ocl.OpenCLEngine(m, 2, device=device)
    try:
        job = _job(m, 0, 16)
        job.src_poisoned[3] = True
        job.spans = []
        c = e.submit(job)
        r = c.wait(20)
        assert r is not None and r[3] == -errno.EIO and (np.delete(r, 3) == 0).all()
        assert PENDING not in r
        _check_spans(job.spans, c, r)
    finally:
        e.close()


def test_trace_recorder_gets_opencl_lanes(device):
    """Through the framework: a recorder attached, a 16 MiB batch of THPs goes to opencl
    (above its min_bytes) and the recorder holds one lane per channel used."""
    from copyengine import trace
    with ce.Machine(nodes=2, node_size="48MiB", engine="opencl:2") as mach:
        mach.settings["nr_max_batched_migration"] = 4096        # one 16 MiB batch
        p = mach.spawn()
        a = p.mmap(16 * MiB, node=0, folio_size=2 * MiB)
        data = np.random.default_rng(3).integers(0, 256, 16 * MiB, dtype=np.uint8).tobytes()
        p.write(a, data)
        with trace.record(mach) as rec:
            r = p.move_pages(0, [a + i * 2 * MiB for i in range(8)], [1] * 8)
        assert r.status == [1] * 8 and p.read(a, 16 * MiB) == data
        ours = [s for s in rec.spans if s[1].startswith("opencl channel")]
        assert {s[1] for s in ours} == {"opencl channel 0", "opencl channel 1"}
        assert sum(s[4] for s in ours) == 8
