"""Tests of copyengine-threadpool, run after ``pip install -e plugins/copyengine-threadpool``:
discovery through the real entry point, migrations with the engines, the plan (split,
coalescing, poison), the pool's life cycle, bounded waits, and the conformance kit."""
from __future__ import annotations

import errno
import threading
import time
from importlib import metadata

import numpy as np
import pytest

import copyengine as ce
from copyengine.engines import CopyJob
from copyengine.plugins import engine_registry, make_plugin_manager, plugin_report
from copyengine.testing import EngineConformance, check_engine

import copyengine_threadpool
from copyengine_threadpool import AsyncThreadPoolEngine, ThreadPoolEngine, make_plan
from copyengine_threadpool.engine import cpu_count

DIST = "copyengine-threadpool"
NCPU = cpu_count()
#: threads the tests ask for: 2 where the machine has them
N2 = min(2, NCPU)
needs2 = pytest.mark.skipif(NCPU < 2, reason="needs 2 CPUs")
MiB = 1 << 20


def _pattern(n, seed):
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


# ----------------------------------------------------------------------------- discovery
def test_entry_point_is_installed():
    eps = [ep for ep in metadata.entry_points(group="copyengine") if ep.name == "threadpool"]
    assert eps, "pip install -e plugins/copyengine-threadpool first"
    assert eps[0].value == "copyengine_threadpool.plugin"
    assert metadata.version(DIST) == copyengine_threadpool.__version__


def test_plugin_manager_finds_pool_through_entry_point():
    pm = make_plugin_manager()
    rows = {r["name"]: r for r in plugin_report(pm)}
    assert rows["threadpool"]["status"] == "loaded", rows["threadpool"]
    assert rows["threadpool"]["source"] == f"{DIST} {copyengine_threadpool.__version__}"
    reg = engine_registry(pm)
    for name in ("pool", "pool-async"):
        assert reg[name].plugin == "threadpool"
        assert DIST in reg[name].source
        assert reg[name].description


def test_disabled_and_not_allowed(monkeypatch):
    monkeypatch.setenv("COPYENGINE_DISABLE_PLUGINS", "threadpool")
    pm = make_plugin_manager()
    assert "pool" not in engine_registry(pm)
    assert any(r["name"] == "threadpool" and r["status"] == "skipped" for r in plugin_report(pm))
    monkeypatch.delenv("COPYENGINE_DISABLE_PLUGINS")
    monkeypatch.setenv("COPYENGINE_PLUGINS", "")
    assert "pool" not in engine_registry(make_plugin_manager())
    monkeypatch.setenv("COPYENGINE_PLUGINS", "threadpool")
    assert "pool" in engine_registry(make_plugin_manager())


# ----------------------------------------------------------------------------- specs
def test_spec_default_is_every_usable_cpu():
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=make_plugin_manager()) as m:
        m.set_engine("pool")
        assert m.engine.nthreads == NCPU
        assert m.engine.capabilities.threads == NCPU
        assert m.engine.capabilities.mc_safe and not m.engine.capabilities.asynchronous
        m.set_engine("pool-async")
        assert m.engine.capabilities.asynchronous and m.engine.nthreads == NCPU


@pytest.mark.parametrize("name", ["pool", "pool-async"])
def test_spec_errors(name):
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=make_plugin_manager()) as m:
        m.set_engine("serial")
        with pytest.raises(ValueError, match=rf"maximum on this machine is {NCPU}\b"):
            m.set_engine(f"{name}:{NCPU + 1}")
        with pytest.raises(ValueError, match="at least 1"):
            m.set_engine(f"{name}:0")
        with pytest.raises(ValueError, match="at least 1"):
            m.set_engine(f"{name}:-3")
        with pytest.raises(ValueError, match="number of threads"):
            m.set_engine(f"{name}:two")
        assert m.engine_spec == "serial"     # unchanged on error
        m.set_engine(f"{name}:1")
        assert m.engine.nthreads == 1


# ----------------------------------------------------------------------------- migration
@needs2
@pytest.mark.parametrize("spec", ["pool:2", "pool-async:2"])
def test_move_pages_with_pool(spec):
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=make_plugin_manager()) as m:
        m.set_engine(spec)
        assert m.engine_spec == spec
        p = m.spawn()
        small = p.mmap(4 * MiB, node=0)                      # 1024 base pages
        huge = p.mmap(8 * MiB, node=0, folio_size="2MiB")    # 4 THPs
        data_s, data_h = _pattern(4 * MiB, 1), _pattern(8 * MiB, 2)
        p.write(small, data_s)
        p.write(huge, data_h)
        pages = [small + i * 4096 for i in range(1024)] + [huge + i * 2 * MiB for i in range(4)]
        r = p.move_pages(0, pages, [1] * len(pages))
        assert r.ret == 0
        assert r.status == [1] * len(pages)
        assert p.read(small, 4 * MiB) == data_s
        assert p.read(huge, 8 * MiB) == data_h
        assert all(p.node_of(a) == 1 for a in pages)
        vs = m.vmstat
        assert vs["pgmigrate_success"] == 1024 + 4 * 512
        assert vs["thp_migration_success"] == 4
        assert vs["pgmigrate_fail"] == 0
        # and back with migrate_pages
        assert p.migrate_pages(0, [1], [0]) == 0
        assert p.node_of(small) == 0 and p.node_of(huge) == 0
        assert p.read(small, 4 * MiB) == data_s and p.read(huge, 8 * MiB) == data_h


class _Recorder:
    """Wraps the batch-copy hook: records what the engine itself returned."""

    def __init__(self):
        self.results = []

    @ce.hookimpl(wrapper=True)
    def copyengine_batch_copy(self, machine, engine, job):
        result = yield
        self.results.append((engine.name, np.array(result), job.src_poisoned.copy()))
        return result


@needs2
@pytest.mark.parametrize("spec", ["pool:2", "pool-async:2"])
def test_hwpoison_reported_by_engine(spec):
    rec = _Recorder()
    pm = make_plugin_manager(plugins=[rec])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        m.set_engine(spec)
        p = m.spawn()
        a = p.mmap(64 * 4096, node=0)
        data = _pattern(64 * 4096, 3)
        p.write(a, data)
        m.hwpoison(p.pfn_of(a + 5 * 4096))
        r = p.move_pages(0, [a + i * 4096 for i in range(64)], [1] * 64)
        want = [1] * 64
        want[5] = -ce.EHWPOISON
        assert r.status == want
        assert r.ret == 1
        # the engine itself said -EHWPOISON for the poisoned folio and 0 for the rest
        name, res, pois = rec.results[0]
        assert name == spec
        assert (res[pois] == -ce.EHWPOISON).all() and pois.sum() == 1
        assert (res[~pois] == 0).all()
        for i in range(64):
            if i != 5:
                assert p.read(a + i * 4096, 4096) == data[i * 4096:(i + 1) * 4096]
        with pytest.raises(OSError) as e:
            p.read(a + 5 * 4096, 1)
        assert e.value.errno == ce.EHWPOISON


# ----------------------------------------------------------------------------- the plan
def _job(mem, sizes, src, dst, poisoned=None, cuts=None):
    s, d, n, f = [], [], [], []
    for i, size in enumerate(sizes):
        edges = [0] + list((cuts or {}).get(i, [])) + [size]
        for a, b in zip(edges, edges[1:]):
            s.append(src[i] + a)
            d.append(dst[i] + a)
            n.append(b - a)
            f.append(i)
    pois = np.zeros(len(sizes), bool) if poisoned is None else np.array(poisoned, bool)
    return CopyJob(mem, *(np.array(x, np.int64) for x in (s, d, n, f)), pois)


def _spans(plan):
    """Per slice: total bytes, and the folios it touches."""
    out = []
    for t, pieces in enumerate(plan.slices):
        nbytes = sum((d1 - d0) * (8 if buf.dtype == np.uint64 else 1) for buf, d0, d1, _, _ in pieces)
        out.append((nbytes, set(plan.slice_folios(t).tolist())))
    return out


def test_plan_fewer_folios_than_threads_cuts_folios_into_chunks():
    mem = np.zeros(16 * MiB, np.uint8)
    job = _job(mem, [2 * MiB], [0], [8 * MiB])
    plan = make_plan(job, 4)
    spans = _spans(plan)
    assert [b for b, _ in spans] == [512 << 10] * 4      # four 512 KiB chunks
    assert all(fs == {0} for _, fs in spans)
    # two folios, four threads: still four equal chunks, cut at cache-line multiples
    job = _job(mem, [2 * MiB, 1 * MiB], [0, 4 * MiB], [8 * MiB, 12 * MiB])
    spans = _spans(make_plan(job, 4))
    assert len(spans) == 4 and sum(b for b, _ in spans) == 3 * MiB
    assert all(b % 64 == 0 for b, _ in spans)


def test_plan_blocks_of_whole_folios_balanced_by_bytes():
    mem = np.zeros(32 * MiB, np.uint8)
    sizes = [2 * MiB] + [64 << 10] * 32              # 4 MiB, one big folio first
    src, dst, pos = [], [], 0
    for k, size in enumerate(sizes):                 # gaps: nothing coalesces
        src.append(pos)
        dst.append(16 * MiB + pos + 4096)
        pos += size + 8192
    job = _job(mem, sizes, src, dst)
    plan = make_plan(job, 2)
    assert plan.runs == 33
    spans = _spans(plan)
    assert len(spans) == 2
    assert spans[0][1] == {0} and spans[0][0] == 2 * MiB     # the big folio alone
    assert spans[1][1] == set(range(1, 33))                    # every small one
    assert not spans[0][1] & spans[1][1]                        # whole folios per thread


def test_plan_coalesces_contiguous_folios_and_shuffled_descriptors():
    mem = np.zeros(16 * MiB, np.uint8)
    n = 256
    job = _job(mem, [4096] * n, [i * 4096 for i in range(n)], [8 * MiB + i * 4096 for i in range(n)],
               cuts={i: [1024, 2048] for i in range(n)})
    perm = np.random.default_rng(0).permutation(len(job.nbytes))
    job = CopyJob(mem, job.src_off[perm], job.dst_off[perm], job.nbytes[perm], job.folio[perm],
                  job.src_poisoned)
    plan = make_plan(job, 1, max_piece=MiB)
    assert plan.runs == 1                       # 768 descriptors, one run
    assert len(plan.slices) == 1 and len(plan.slices[0]) == 1   # one 1 MiB piece
    buf, d0, d1, s0, s1 = plan.slices[0][0]
    assert buf.dtype == np.uint64 and (d1 - d0) * 8 == MiB


def test_plan_never_touches_poisoned_folios():
    mem = np.zeros(16 * MiB, np.uint8)
    sizes = [4096] * 8
    job = _job(mem, sizes, [i * 4096 for i in range(8)], [8 * MiB + i * 4096 for i in range(8)],
               poisoned=[i == 3 for i in range(8)])
    plan = make_plan(job, 1, max_piece=4096)
    pieces = plan.slices[0]
    assert len(pieces) == 7
    for buf, d0, d1, s0, s1 in pieces:
        w = 8 if buf.dtype == np.uint64 else 1
        assert not (s0 * w < 4 * 4096 and s1 * w > 3 * 4096)     # never reads folio 3
    assert plan.base.tolist() == [0, 0, 0, -ce.EHWPOISON, 0, 0, 0, 0]
    assert plan.base.dtype == np.int32


def test_unaligned_descriptors_copy_bytes():
    mem = np.random.default_rng(5).integers(0, 256, 1 * MiB, dtype=np.uint8)
    job = CopyJob(mem, np.array([3, 5000], np.int64), np.array([600001, 700003], np.int64),
                  np.array([4093, 77], np.int64), np.array([0, 1], np.int64), np.zeros(2, bool))
    before = mem.copy()
    eng = ThreadPoolEngine(N2, min_chunk=8, max_piece=1000)
    try:
        res = eng.copy(job)
    finally:
        eng.close()
    assert res.tolist() == [0, 0] and res.dtype == np.int32
    assert (mem[600001:600001 + 4093] == before[3:3 + 4093]).all()
    assert (mem[700003:700003 + 77] == before[5000:5077]).all()
    outside = np.ones(len(mem), bool)
    outside[600001:600001 + 4093] = outside[700003:700080] = False
    assert (mem[outside] == before[outside]).all()


def test_bad_descriptor_is_a_value_error():
    mem = np.zeros(MiB, np.uint8)
    job = CopyJob(mem, np.array([MiB - 8], np.int64), np.array([0], np.int64),
                  np.array([16], np.int64), np.array([0], np.int64), np.zeros(1, bool))
    eng = ThreadPoolEngine(1)
    with pytest.raises(ValueError, match="bad descriptor 0"):
        eng.copy(job)


# ----------------------------------------------------------------------------- the pool
def _pool_threads():
    return {t.ident for t in threading.enumerate() if t.name.startswith("copyengine-pool")}


@needs2
def test_pool_is_persistent_and_closed():
    before = _pool_threads()
    mem = np.random.default_rng(1).integers(0, 256, 16 * MiB, dtype=np.uint8)
    eng = ThreadPoolEngine(2, min_chunk=4096)
    assert not eng.started                 # nothing starts before a copy
    job = _job(mem, [2 * MiB] * 2, [0, 2 * MiB], [8 * MiB, 10 * MiB])
    assert eng.copy(job).tolist() == [0, 0]
    assert eng.started
    first = _pool_threads() - before
    assert len(first) == 1                               # pool:2 = caller + 1 pool thread
    for _ in range(5):
        eng.copy(job)
    assert _pool_threads() - before == first             # the same thread every time
    eng.close()
    eng.close()                                           # idempotent
    assert not (_pool_threads() & first)
    assert eng.closed
    mem[8 * MiB:12 * MiB] = 0
    assert eng.copy(job).tolist() == [0, 0]              # a closed engine copies inline
    assert (mem[8 * MiB:12 * MiB] == mem[:4 * MiB]).all()


def test_pool_one_thread_starts_no_thread():
    before = _pool_threads()
    mem = np.zeros(8 * MiB, np.uint8)
    eng = ThreadPoolEngine(1, min_chunk=4096)
    eng.copy(_job(mem, [2 * MiB], [0], [4 * MiB]))
    assert _pool_threads() == before
    eng.close()


def test_machine_close_closes_engine():
    with ce.Machine(nodes=2, node_size="4MiB", plugin_manager=make_plugin_manager()) as m:
        m.set_engine(f"pool:{N2}")
        eng = m.engine
        m.set_engine("serial")                           # set_engine closes the old one
        assert eng.closed
        m.set_engine(f"pool-async:{N2}")
        eng = m.engine
    assert eng.closed


@needs2
def test_sync_timeout_is_bounded_and_never_writes_late():
    """Pool threads busy elsewhere: the wait ends at copy_timeout, the queued slice never
    runs, its folios report -ETIMEDOUT, the caller's slice reports 0."""
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=make_plugin_manager()) as m:
        m.settings["copy_timeout"] = 0.05
        eng = ThreadPoolEngine(2, m, min_chunk=4096)
        gate = threading.Event()
        try:
            assert eng._pool.submit(gate.wait, 10)       # occupy the only pool thread
            mem = m.mem
            mem[:4 * MiB] = np.random.default_rng(2).integers(0, 256, 4 * MiB, dtype=np.uint8)
            job = _job(mem, [MiB] * 4, [i * MiB for i in range(4)],
                       [16 * MiB + i * MiB for i in range(4)])
            t0 = time.monotonic()
            res = eng.copy(job)
            assert time.monotonic() - t0 < 5
            assert res.tolist() == [0, 0, -errno.ETIMEDOUT, -errno.ETIMEDOUT]
            snap = mem.copy()
            gate.set()
            time.sleep(0.1)                               # the queued slice is dequeued now
            assert (mem == snap).all()                    # and writes nothing
            assert (mem[16 * MiB:18 * MiB] == mem[:2 * MiB]).all()
        finally:
            gate.set()
            eng.close()


@needs2
def test_async_cancel_before_start_writes_nothing():
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=make_plugin_manager()) as m:
        eng = AsyncThreadPoolEngine(2, m, min_chunk=4096)
        gates = [threading.Event(), threading.Event()]
        try:
            for g in gates:                               # both pool threads busy
                eng._pool.submit(g.wait, 10)
            mem = m.mem
            job = _job(mem, [MiB] * 4, [i * MiB for i in range(4)],
                       [16 * MiB + i * MiB for i in range(4)], poisoned=[False, True, False, False])
            mem[:4 * MiB] = 7
            snap = mem.copy()
            c = eng.submit(job)
            assert c.wait(0.01) is None
            assert c.result[1] == -ce.EHWPOISON          # known at once, never copied
            c.cancel()
            for g in gates:
                g.set()
            time.sleep(0.1)
            assert (mem == snap).all()
            assert c.result.tolist() == [-errno.EINPROGRESS, -ce.EHWPOISON,
                                         -errno.EINPROGRESS, -errno.EINPROGRESS]
        finally:
            for g in gates:
                g.set()
            eng.close()


@needs2
def test_async_completes_every_folio():
    mem = np.random.default_rng(3).integers(0, 256, 32 * MiB, dtype=np.uint8)
    eng = AsyncThreadPoolEngine(2, min_chunk=4096, max_piece=64 << 10)
    try:
        sizes = [4096] * 40 + [2 * MiB] * 3
        src, dst, pos = [], [], 0
        for s in sizes:
            src.append(pos)
            dst.append(16 * MiB + pos)
            pos += s
        job = _job(mem, sizes, src, dst)
        c = eng.submit(job)
        res = c.wait(10)
        assert res is not None and c.done()
        assert (res == 0).all()
        assert (mem[16 * MiB:16 * MiB + pos] == mem[:pos]).all()
    finally:
        eng.close()


# ----------------------------------------------------------------------------- conformance
class TestPoolConformance(EngineConformance):
    engine_spec = f"pool:{N2}"
    max_examples = 25


class TestPoolOneThreadConformance(EngineConformance):
    """pool:1: small jobs take the unplanned path (copy_small), larger ones the plan."""
    engine_spec = "pool:1"
    granule = 1
    max_examples = 25


class TestPoolAsyncConformance(EngineConformance):
    engine_spec = f"pool-async:{N2}"
    max_examples = 25


class TestPoolFineGrainedConformance(EngineConformance):
    """Every job cut into many slices and small pieces: the multi-threaded paths."""
    engine_factory = staticmethod(lambda m: ThreadPoolEngine(N2, m, min_chunk=4096, max_piece=8192))
    granule = 1
    max_examples = 25


class TestPoolAsyncFineGrainedConformance(EngineConformance):
    engine_factory = staticmethod(lambda m: AsyncThreadPoolEngine(N2, m, min_chunk=4096,
                                                                  max_piece=8192))
    max_examples = 25


def test_check_engine_front_end():
    out = check_engine("pool:1", max_examples=5, only=["capabilities", "empty_job", "random_jobs"])
    assert out == {"capabilities": "passed", "empty_job": "passed", "random_jobs": "passed"}


def _broken(cls):
    class Broken(cls):
        """The last slice raises at its first piece (a worker error)."""

        def plan(self, job):
            plan = super().plan(job)
            plan.slices[-1] = [(None, 0, 1, 0, 1)]
            return plan
    return Broken


@pytest.mark.parametrize("cls", [ThreadPoolEngine, AsyncThreadPoolEngine])
def test_worker_error_fails_only_its_folios(cls):
    mem = np.random.default_rng(4).integers(0, 256, 16 * MiB, dtype=np.uint8)
    eng = _broken(cls)(2, min_chunk=4096)
    try:
        job = _job(mem, [MiB] * 4, [i * MiB for i in range(4)], [8 * MiB + i * MiB for i in range(4)])
        if cls is ThreadPoolEngine:
            res = eng.copy(job)
        else:
            c = eng.submit(job)
            res = c.wait(10)
            assert res is not None and c.done()       # the failure is an outcome too
        assert res.tolist() == [0, 0, -errno.EIO, -errno.EIO]
        assert (mem[8 * MiB:10 * MiB] == mem[:2 * MiB]).all()
    finally:
        eng.close()


@needs2
@pytest.mark.parametrize("spec", ["pool:2", "pool-async:2"])
def test_concurrent_migrations_share_one_engine(spec):
    with ce.Machine(nodes=2, node_size="32MiB", plugin_manager=make_plugin_manager()) as m:
        m.set_engine(spec)
        errors = []

        def worker(k):
            try:
                p = m.spawn()
                a = p.mmap(2 * MiB, node=0)
                data = _pattern(2 * MiB, 10 + k)
                p.write(a, data)
                pages = list(range(a, a + 2 * MiB, 4096))
                for r in range(4):
                    res = p.move_pages(0, pages, [(r + 1) % 2] * len(pages))
                    assert res.ret == 0 and set(res.status) == {(r + 1) % 2}
                    assert p.read(a, 2 * MiB) == data
            except BaseException as e:  # noqa: BLE001
                errors.append(e)

        threads = [threading.Thread(target=worker, args=(k,)) for k in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not errors, errors[0]
