"""The ``opencl[:CHANNELS]`` engine: exact copies over zero-copy shared physical memory,
poisoned sources, out-of-order completion across channels, timeout + cancel with no later
write, buffer-edge splitting, the unavailable path and spec validation.

Device tests skip (with the reason) only when no OpenCL platform/device is usable."""
import errno
import sys
import threading
import time

import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import opencl as ocl
from copyengine.engines.base import PENDING, CopyJob, create_engine, folio_mc_copy
from copyengine.plugins import engine_registry, make_plugin_manager

MiB = 1 << 20
PS = 4096


# ----------------------------------------------------------------------------- helpers
def _pm():
    """A plugin manager that knows ``opencl`` whether or not it is a built-in yet."""
    pm = make_plugin_manager(entry_points=False)
    if "opencl" not in engine_registry(pm):
        pm.register(ocl, name="opencl")
    return pm


def _no_platform_reason():
    """Why there is no OpenCL platform/device here, or None when there is one."""
    try:
        cl = ocl._import_cl()
        _, devices = ocl._device_list(cl)
    except ce.EngineUnavailable as e:
        return str(e)
    return None if devices else "no OpenCL device"


@pytest.fixture(scope="module")
def device():
    try:
        return ocl.open_device()
    except ce.EngineUnavailable:
        reason = _no_platform_reason()
        if reason is None:
            raise          # a platform exists: the engine must work on it
        pytest.skip(f"no OpenCL platform: {reason}")


@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=_pm()) as mach:
        yield mach


@pytest.fixture
def eng(m, device):
    e = ocl.OpenCLEngine(m, 2, device=device)
    yield e
    e.close()


class Job:
    """``count`` folios of ``order`` from node 0 to node 1 with random sources and a
    sentinel (0xA5) in the destinations; ``split`` cuts each folio into that many
    descriptors; ``shuffle`` permutes the descriptors."""

    def __init__(self, m, order, count, poisoned=(), split=1, shuffle=False, scatter=False,
                 seed=0):
        rng = np.random.default_rng(seed)
        self.m = m
        self.fb = m.page_size << order
        self.src = m.alloc_folios(0, order, count) * m.page_size
        self.dst = m.alloc_folios(1, order, count) * m.page_size
        if scatter:
            self.src, self.dst = rng.permutation(self.src), rng.permutation(self.dst)
        for s in self.src:
            m.mem[s:s + self.fb] = rng.integers(0, 256, self.fb, dtype=np.uint8)
        for d in self.dst:
            m.mem[d:d + self.fb] = 0xA5
        step = self.fb // split
        cuts = [(k * step, step if k < split - 1 else self.fb - k * step) for k in range(split)]
        s_, d_, n_, f_ = [], [], [], []
        for i in range(count):
            for off, n in cuts:
                s_.append(self.src[i] + off)
                d_.append(self.dst[i] + off)
                n_.append(n)
                f_.append(i)
        arrays = [np.array(x, np.int64) for x in (s_, d_, n_, f_)]
        if shuffle:
            perm = rng.permutation(len(s_))
            arrays = [a[perm] for a in arrays]
        pois = np.zeros(count, bool)
        pois[list(poisoned)] = True
        self.job = CopyJob(m.mem, *arrays, pois)
        self.before = m.mem.copy()

    def copied(self, i):
        s, d, n = self.src[i], self.dst[i], self.fb
        return np.array_equal(self.m.mem[d:d + n], self.m.mem[s:s + n])

    def untouched(self, i):
        d = self.dst[i]
        return bool((self.m.mem[d:d + self.fb] == 0xA5).all())

    def outside_unchanged(self, allowed):
        """No byte outside the destinations of folios in ``allowed`` changed."""
        pos = 0
        for d in sorted(int(self.dst[i]) for i in allowed):
            if not np.array_equal(self.m.mem[pos:d], self.before[pos:d]):
                return False
            pos = d + self.fb
        return np.array_equal(self.m.mem[pos:], self.before[pos:])


def run(e, job, timeout=20):
    r = e.submit(job).wait(timeout)
    assert r is not None, "the job did not complete"
    return r.copy()


# ----------------------------------------------------------------------------- specs
@pytest.mark.parametrize("spec", ["opencl:0", "opencl:abc", "opencl:99", "opencl:17",
                                  "opencl:-1", "opencl:1.5", "opencl: 2"])
def test_bad_specs_are_valueerror(m, spec):
    before = m.engine_spec
    with pytest.raises(ValueError):
        m.set_engine(spec)
    assert m.engine_spec == before              # the previous engine stays


def test_channels_parse():
    assert ocl._check_channels("1") == 1
    assert ocl._check_channels("16") == 16
    for bad in ("0", "17", "x", "", "٣"):
        with pytest.raises(ValueError):
            ocl._check_channels(bad)


def test_registered_with_description(m):
    entry = m.engines()["opencl"]
    assert "OpenCL" in entry.description


# ----------------------------------------------------------------------------- unavailable
def test_unavailable_without_pyopencl(m, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyopencl", None)     # import pyopencl -> ImportError
    with pytest.raises(ce.EngineUnavailable, match="pyopencl"):
        m.set_engine("opencl")
    assert m.engine_spec == "auto"  # the previous (default) engine stays
    with pytest.raises(ce.EngineUnavailable):
        ocl._factory("2", m)
    # a bad spec is still a ValueError, whether or not OpenCL is there
    with pytest.raises(ValueError):
        m.set_engine("opencl:0")


def test_unavailable_without_platform(m, monkeypatch):
    cl = pytest.importorskip("pyopencl")
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)
    monkeypatch.setattr(cl, "get_platforms", lambda: [])
    with pytest.raises(ce.EngineUnavailable, match="no OpenCL platform"):
        m.set_engine("opencl:2")

    def boom():
        raise cl.LogicError("clGetPlatformIDs failed: PLATFORM_NOT_FOUND_KHR")
    monkeypatch.setattr(cl, "get_platforms", boom)
    with pytest.raises(ce.EngineUnavailable, match="PLATFORM_NOT_FOUND"):
        m.set_engine("opencl")
    assert m.engine_spec == "auto"  # the previous (default) engine stays


def test_unavailable_without_devices(m, monkeypatch):
    cl = pytest.importorskip("pyopencl")
    monkeypatch.delenv("PYOPENCL_CTX", raising=False)

    class P:
        name = "Empty"

        def get_devices(self):
            raise cl.RuntimeError("clGetDeviceIDs failed: DEVICE_NOT_FOUND")
    monkeypatch.setattr(cl, "get_platforms", lambda: [P()])
    with pytest.raises(ce.EngineUnavailable, match="no OpenCL device"):
        m.set_engine("opencl")


def test_pyopencl_ctx_names_no_device(m, monkeypatch):
    cl = pytest.importorskip("pyopencl")
    monkeypatch.setenv("PYOPENCL_CTX", "97:3")

    def refuse(interactive=None, answers=None):
        raise RuntimeError("no such platform")
    monkeypatch.setattr(cl, "create_some_context", refuse)
    with pytest.raises(ce.EngineUnavailable, match="PYOPENCL_CTX"):
        m.set_engine("opencl")


def test_pyopencl_ctx_is_honoured(m, device, monkeypatch):
    cl = device.cl
    calls = []

    def some_context(interactive=None, answers=None):
        calls.append(interactive)
        return device.ctx
    monkeypatch.setenv("PYOPENCL_CTX", "0")
    monkeypatch.setattr(cl, "create_some_context", some_context)
    m.set_engine("opencl")
    assert calls == [False]
    assert m.engine.describe()["device"] == device.device.name.strip()


# ----------------------------------------------------------------------------- the engine
def test_capabilities_and_describe(eng, device):
    c = eng.capabilities
    assert c.asynchronous and c.channels == 2 and not c.mc_safe
    assert c.min_bytes > 0
    d = eng.describe()
    for k in ("device", "platform", "version"):
        assert isinstance(d[k], str) and d[k]
    assert d["channels"] == 2 and d["zero_copy"] is True


def test_set_engine_and_move_pages(m, device):
    m.set_engine("opencl:3")
    assert m.engine.capabilities.channels == 3
    p = m.spawn()
    a = p.mmap(64 * PS, node=0)
    data = np.random.default_rng(1).integers(0, 256, 64 * PS, dtype=np.uint8).tobytes()
    p.write(a, data)
    r = p.move_pages(0, [a + i * PS for i in range(64)], [1] * 64)
    assert r.ret == 0 and r.status == [1] * 64
    assert p.read(a, 64 * PS) == data
    t = p.mmap(4 * MiB, node=0, folio_size=2 * MiB)
    big = np.random.default_rng(2).integers(0, 256, 4 * MiB, dtype=np.uint8).tobytes()
    p.write(t, big)
    r = p.move_pages(0, [t, t + 2 * MiB], [1, 1])
    assert r.status == [1, 1] and p.read(t, 4 * MiB) == big


def test_move_pages_poisoned_is_ehwpoison(m, device):
    m.set_engine("opencl")
    p = m.spawn()
    a = p.mmap(8 * PS, node=0)
    p.write(a, b"\x5a" * (8 * PS))
    m.hwpoison(p.pfn_of(a + 3 * PS))
    r = p.move_pages(0, [a + i * PS for i in range(8)], [1] * 8)
    assert r.status[3] == -ce.EHWPOISON
    assert [s for i, s in enumerate(r.status) if i != 3] == [1] * 7
    assert p.read(a + 4 * PS, 4 * PS) == b"\x5a" * (4 * PS)


@pytest.mark.parametrize("order,count,split,shuffle,scatter", [
    (0, 1, 1, False, False),        # tiny: the small-job path, one copy command
    (0, 3, 1, False, True),         # small, scattered: several commands
    (0, 20, 1, False, True),        # small-job path with a kernel table
    (0, 512, 1, False, False),      # contiguous 4 KiB folios: coalesced across folios
    (0, 512, 1, True, True),        # scattered and shuffled
    (2, 100, 4, True, True),        # several descriptors per folio, shuffled
    (9, 6, 1, False, False),        # 2 MiB folios: several segments per channel
    (9, 3, 7, True, True),          # 2 MiB folios cut into odd-sized descriptors
])
def test_exact_copies(m, eng, order, count, split, shuffle, scatter):
    j = Job(m, order, count, split=split, shuffle=shuffle, scatter=scatter)
    r = run(eng, j.job)
    assert r.dtype == np.int32 and r.shape == (count,)
    assert (r == 0).all()
    assert all(j.copied(i) for i in range(count))
    assert j.outside_unchanged(range(count))


def test_regular_store_kernel(m, device):
    """The plain-store kernel (the one non-CPU or non-Clang devices get) copies exactly too."""
    e = ocl.OpenCLEngine(m, 2, device=device, nontemporal=False)
    try:
        assert e.kernel_name == "copy_words_loop"
        for order, count, split in ((0, 64, 1), (3, 20, 3), (9, 3, 5)):
            j = Job(m, order, count, split=split, shuffle=True, scatter=True, seed=order)
            assert (run(e, j.job) == 0).all()
            assert all(j.copied(i) for i in range(count))
            assert j.outside_unchanged(range(count))
            for h in (j.src, j.dst):
                m.free_folios(h // m.page_size)
    finally:
        e.close()


def test_unaligned_descriptors(m, eng):
    """Byte-granular descriptors (not multiples of 8) are copied exactly too."""
    j = Job(m, 1, 6, split=3, scatter=True)
    rng = np.random.default_rng(5)
    s, d, n, f = [], [], [], []
    for i in range(6):
        off = 0
        for size in (1, 7, 13, 4096 - 21, 8, 3, 4096 - 11):
            if off + size > j.fb:
                size = j.fb - off
            s.append(j.src[i] + off)
            d.append(j.dst[i] + off)
            n.append(size)
            f.append(i)
            off += size
        assert off == j.fb
    perm = rng.permutation(len(s))
    job = CopyJob(m.mem, *(np.array(x, np.int64)[perm] for x in (s, d, n, f)), np.zeros(6, bool))
    assert (run(eng, job) == 0).all()
    assert all(j.copied(i) for i in range(6))
    assert j.outside_unchanged(range(6))
    # and an odd-offset, odd-length descriptor in a big (numpy-planned) job
    j2 = Job(m, 0, 40, scatter=True, seed=3)
    nb = j2.job.nbytes.copy()
    nb[::3] -= 5
    job2 = CopyJob(m.mem, j2.job.src_off + 3, j2.job.dst_off + 3, nb - 3, j2.job.folio,
                   j2.job.src_poisoned)
    assert (run(eng, job2) == 0).all()
    for sidx, didx, k in zip(job2.src_off, job2.dst_off, job2.nbytes):
        assert np.array_equal(m.mem[didx:didx + k], m.mem[sidx:sidx + k])


def test_huge_descriptor_is_split(m, eng):
    """One 20 MiB descriptor (plus an odd tail) spans several segments and channels."""
    src0, dst0, n = 4 * MiB, 32 * MiB + 4 * MiB, 20 * MiB + 13
    rng = np.random.default_rng(4)
    m.mem[src0:src0 + n] = rng.integers(0, 256, n, dtype=np.uint8)
    before = m.mem.copy()
    job = CopyJob(m.mem, np.array([src0], np.int64), np.array([dst0], np.int64),
                  np.array([n], np.int64), np.zeros(1, np.int64), np.zeros(1, bool))
    c = eng.submit(job)
    r = c.wait(20)
    assert r is not None and r[0] == 0
    assert c.segments >= 3 and {ch for ch, _, _ in c.log} == {0, 1}
    assert np.array_equal(m.mem[dst0:dst0 + n], m.mem[src0:src0 + n])
    assert np.array_equal(m.mem[:dst0], before[:dst0])
    assert np.array_equal(m.mem[dst0 + n:], before[dst0 + n:])


@pytest.mark.parametrize("count", [4, 64])
def test_poisoned_source_is_eio_and_not_written(m, eng, count):
    bad = [0, count // 2, count - 1]
    j = Job(m, 0, count, poisoned=bad, scatter=True)
    r = run(eng, j.job)
    for i in range(count):
        if i in bad:
            assert r[i] == -errno.EIO and j.untouched(i)
        else:
            assert r[i] == 0 and j.copied(i)
    good = [i for i in range(count) if i not in bad]
    assert j.outside_unchanged(good)
    # the framework's fallback then says -EHWPOISON for them
    assert (folio_mc_copy(j.job, np.array(bad)) == -ce.EHWPOISON).all()


def test_framework_hook_path(m, eng):
    j = Job(m, 0, 16, poisoned=[5], scatter=True)
    r = m.pm.hook.copyengine_batch_copy(machine=m, engine=eng, job=j.job)
    assert r.dtype == np.int32
    assert r[5] == -errno.EIO and (np.delete(r, 5) == 0).all()


def test_bad_descriptors_answered_not_copied(m, eng):
    j = Job(m, 0, 4)
    size = len(m.mem)
    s = np.array([j.src[0], size - 8, j.src[2], j.src[3]], np.int64)
    d = np.array([j.dst[0], j.dst[1], j.src[2] + 8, j.dst[3]], np.int64)   # 1: past the end
    n = np.array([PS, PS, PS, 0], np.int64)                                  # 2: overlapping
    job = CopyJob(m.mem, s, d, n, np.arange(4, dtype=np.int64), np.zeros(4, bool))
    r = run(eng, job)
    assert list(r) == [0, -errno.EFAULT, -errno.EINVAL, 0]
    assert j.copied(0) and j.untouched(1) and j.untouched(3)
    assert j.outside_unchanged([0])


def test_enqueue_failure_is_eio(m, eng, monkeypatch):
    """A command the device refuses fails its folios with -EIO (the CPU fallback copies
    them); nothing hangs and nothing is written."""
    cl = eng._cl

    def refuse(*a, **k):
        raise cl.MemoryError("clEnqueueNDRangeKernel failed: OUT_OF_RESOURCES")
    monkeypatch.setattr(cl, "enqueue_nd_range_kernel", refuse)
    j = Job(m, 0, 40, scatter=True)                   # kernel tables, not copy commands
    r = run(eng, j.job)
    assert (r == -errno.EIO).all()
    assert all(j.untouched(i) for i in range(40))
    assert (folio_mc_copy(j.job, np.arange(40)) == 0).all()
    monkeypatch.undo()
    j2 = Job(m, 0, 40, scatter=True, seed=1)
    assert (run(eng, j2.job) == 0).all()


def test_empty_and_zero_length_jobs(m, eng):
    z = np.zeros(0, np.int64)
    r = run(eng, CopyJob(m.mem, z, z, z, z, np.zeros(0, bool)))
    assert r.shape == (0,) and r.dtype == np.int32
    r = run(eng, CopyJob(m.mem, z, z, z, z, np.zeros(3, bool)))
    assert list(r) == [0, 0, 0]


def test_tiny_job_below_min_bytes_still_works(m, eng):
    j = Job(m, 0, 1)
    assert j.fb < eng.capabilities.min_bytes
    for _ in range(20):
        assert run(eng, j.job)[0] == 0
    assert j.copied(0)


def test_memory_split_into_buffers(m, device):
    """A small max_buffer forces several USE_HOST_PTR buffers: copies are cut at their
    edges (runs crossing both a source and a destination edge)."""
    e = ocl.OpenCLEngine(m, 3, device=device, max_buffer=ocl.CHUNK * 4)   # 1 MiB windows
    try:
        assert len(e._mem.bufs) == len(m.mem) // (ocl.CHUNK * 4)
        rng = np.random.default_rng(9)
        R = e.region
        src0 = 5 * R - 3 * PS - 40          # crosses a source edge
        dst0 = 40 * R - 7 * PS + 16         # crosses a destination edge
        m.mem[src0:src0 + 3 * R] = rng.integers(0, 256, 3 * R, dtype=np.uint8)
        before = m.mem.copy()
        sizes = [PS * 5 + 8, R + 24, 2 * R - PS * 5 - 32]
        offs = np.cumsum([0] + sizes[:-1])
        job = CopyJob(m.mem, src0 + offs.astype(np.int64), dst0 + offs.astype(np.int64),
                      np.array(sizes, np.int64), np.array([0, 1, 1], np.int64), np.zeros(2, bool))
        assert (run(e, job) == 0).all()
        total = sum(sizes)
        assert np.array_equal(m.mem[dst0:dst0 + total], m.mem[src0:src0 + total])
        assert np.array_equal(m.mem[:dst0], before[:dst0])
        assert np.array_equal(m.mem[dst0 + total:], before[dst0 + total:])
        # and ordinary folio jobs over many windows
        j = Job(m, 9, 5, scatter=True)
        assert (run(e, j.job) == 0).all() and all(j.copied(i) for i in range(5))
    finally:
        e.close()


@pytest.mark.parametrize("channels", [1, 4, 16])
def test_channel_counts(m, device, channels):
    e = ocl.OpenCLEngine(m, channels, device=device)
    try:
        j = Job(m, 6, 40, scatter=True)
        c = e.submit(j.job)
        r = c.wait(20)
        assert r is not None and (r == 0).all()
        assert all(j.copied(i) for i in range(40))
        assert {ch for ch, _, _ in c.log} == set(range(min(channels, c.segments)))
    finally:
        e.close()


def test_out_of_order_completion_across_channels(m, eng):
    """Channel 0 is stalled: channel 1's folios complete (and are reported) first."""
    release = eng.hold_channel(0)
    try:
        j = Job(m, 9, 8)                   # 16 MiB: 4 segments, 2 per channel
        c = eng.submit(j.job)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            with c._lock:
                snap = c.result.copy()
                ch1_busy = bool(c._queued[1]) or any(g.channel == 1 for g in c._inflight)
            if not ch1_busy:
                break
            time.sleep(0.002)
        assert c.wait(0.05) is None                     # channel 0 cannot finish
        done = np.flatnonzero(snap == 0)
        waiting = np.flatnonzero(snap == PENDING)
        assert len(done) and len(waiting)
        assert all(j.copied(i) for i in done)
        assert all(j.untouched(i) for i in waiting)     # stalled: not one byte yet
        assert {ch for ch, _, _ in c.log} == {1}
    finally:
        release()
    r = c.wait(20)
    assert r is not None and (r == 0).all()
    assert all(j.copied(i) for i in range(8))
    assert [ch for ch, _, _ in c.log][-1] == 0          # the stalled channel ends last


def test_cancel_waits_for_inflight_then_nothing_writes(device):
    """cancel() with a stalled channel returns only once its issued commands drained;
    segments never issued are never written; after it returns memory stays still."""
    with ce.Machine(nodes=2, node_size="64MiB", plugin_manager=_pm()) as m:
        e = ocl.OpenCLEngine(m, 2, device=device)
        try:
            _cancel_with_stalled_channel(m, e)
        finally:
            e.close()


def _cancel_with_stalled_channel(m, eng):
    release = eng.hold_channel(0)
    j = Job(m, 9, 20)                       # 40 MiB: 5 segments of 8 MiB, 3 on channel 0
    c = eng.submit(j.job)
    assert c.segments == 5
    assert c.wait(0.05) is None
    returned = threading.Event()
    t = threading.Thread(target=lambda: (c.cancel(), returned.set()), daemon=True)
    t.start()
    assert not returned.wait(0.1)            # waiting for channel 0's issued segments
    release()
    assert returned.wait(10)
    t.join(5)
    snap = m.mem.copy()
    res = c.result.copy()
    time.sleep(0.2)
    assert np.array_equal(m.mem, snap), "memory changed after cancel() returned"
    assert np.array_equal(c.result, res)
    for i in np.flatnonzero(res == 0):
        assert j.copied(i)
    assert (res == PENDING).any()
    # channel 0's third segment was never issued: its folios are untouched
    assert any(j.untouched(i) for i in np.flatnonzero(res == PENDING))
    assert j.outside_unchanged(range(20))


def test_timeout_then_cancel_no_later_write(device):
    """A large job, a tiny wait: cancel, then nothing moves for a while."""
    with ce.Machine(nodes=2, node_size="112MiB", plugin_manager=_pm()) as m:
        e = ocl.OpenCLEngine(m, 2, device=device)
        try:
            j = Job(m, 9, 48, scatter=True)   # 96 MiB: 12 segments of 8 MiB
            c = e.submit(j.job)
            r = c.wait(0.0005)
            t0 = time.monotonic()
            c.cancel()
            assert time.monotonic() - t0 < 5
            snap = m.mem.copy()
            res = c.result.copy()
            time.sleep(0.3)
            assert np.array_equal(m.mem, snap), "memory changed after cancel() returned"
            assert np.array_equal(c.result, res)
            for i in np.flatnonzero(res == 0):
                assert j.copied(i)
            if r is None:
                assert (res == PENDING).any()
            assert j.outside_unchanged(range(48))
        finally:
            e.close()


def test_framework_timeout_falls_back(m, eng):
    m.settings["copy_timeout"] = 0.0005
    j = Job(m, 9, 8, scatter=True)
    r = m.pm.hook.copyengine_batch_copy(machine=m, engine=eng, job=j.job)
    assert set(np.unique(r)) <= {0, -errno.ETIMEDOUT}
    redo = np.flatnonzero(r != 0)
    assert (folio_mc_copy(j.job, redo) == 0).all()
    assert all(j.copied(i) for i in range(8))


def test_concurrent_submits(m, eng):
    jobs = [Job(m, 3, 30, scatter=True, seed=s) for s in range(4)]
    out = [None] * 4

    def go(k):
        out[k] = [run(eng, jobs[k].job) for _ in range(3)]
    ts = [threading.Thread(target=go, args=(k,)) for k in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(30)
    for k in range(4):
        assert all((r == 0).all() for r in out[k])
        assert all(jobs[k].copied(i) for i in range(30))


def test_close_cancels_and_refuses(m, device):
    e = ocl.OpenCLEngine(m, 2, device=device)
    e.hold_channel(1)                       # close() must release a forgotten hold
    j = Job(m, 9, 4)
    c = e.submit(j.job)
    e.close()
    assert c.done()
    snap = m.mem.copy()
    time.sleep(0.05)
    assert np.array_equal(m.mem, snap)
    with pytest.raises(RuntimeError):
        e.submit(j.job)
    e.close()                                # twice is fine


def test_machine_close_with_opencl_engine(device):
    m = ce.Machine(nodes=2, node_size="8MiB", plugin_manager=_pm(), engine="opencl:2")
    assert isinstance(m.engine, ocl.OpenCLEngine)
    m.close()
    assert m.engine._closed


def test_create_engine_names_spec(m, device):
    e = create_engine("opencl:4", m, m.engines())
    try:
        assert e.name == "opencl:4" and e.channels == 4
    finally:
        e.close()


# ----------------------------------------------------------------------------- conformance kit
def _conformance_engine(machine):
    try:
        dev = ocl.open_device()
    except ce.EngineUnavailable:
        reason = _no_platform_reason()
        if reason is None:
            raise
        pytest.skip(f"no OpenCL platform: {reason}")
    return ocl.OpenCLEngine(machine, 2, device=dev)


try:
    from copyengine.testing import EngineConformance
except ImportError:  # pragma: no cover - the kit (or hypothesis) is not there
    EngineConformance = None

if EngineConformance is not None:
    class TestOpenCLConformance(EngineConformance):
        """The engine conformance kit, byte-granular descriptors included."""
        engine_factory = staticmethod(_conformance_engine)
        granule = 1
