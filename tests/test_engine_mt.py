"""The ``mt`` engine: spec parsing, the two ways of splitting a batch, the poison rule,
work-array reuse, the threading layer, the disk cache, and migrations through it."""
import json
import os
import subprocess
import sys
import textwrap
import tracemalloc

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

import copyengine as ce
from copyengine import EHWPOISON
from copyengine.engines.base import CopyJob
from copyengine.engines.mt import MtEngine, cpu_count, max_threads, parse_threads
from copyengine.engines.mt import plan as mt_plan

pytestmark = pytest.mark.timeout(120)

MAXT = max_threads()
needs2 = pytest.mark.skipif(MAXT < 2, reason="needs 2 CPUs")
KiB, MiB = 1 << 10, 1 << 20


def make_job(sizes, poisoned=(), mem=None, split=1):
    """Folios of ``sizes`` bytes, sources packed from 0, destinations from half the
    buffer; each folio cut into ``split`` descriptors."""
    total = sum(sizes)
    if mem is None:
        mem = np.zeros(2 * total + 4096, np.uint8)
    half = len(mem) // 2 // 4096 * 4096
    s, d, n, f = [], [], [], []
    pos = 0
    for i, size in enumerate(sizes):
        edges = np.linspace(0, size, split + 1).astype(np.int64) // 8 * 8
        edges[-1] = size
        for a, b in zip(edges, edges[1:]):
            if b > a:
                s.append(pos + a), d.append(half + pos + a), n.append(b - a), f.append(i)
        pos += size
    p = np.zeros(len(sizes), bool)
    p[list(poisoned)] = True
    return CopyJob(mem, *(np.array(x, np.int64) for x in (s, d, n, f)), p)


def folio_bytes_per_thread(plan):
    return [sum(b - a for _, a, b in pieces) for pieces in plan]


# ----------------------------------------------------------------------------- specs
def test_mt_alone_is_every_usable_cpu():
    assert cpu_count() == len(os.sched_getaffinity(0))
    assert parse_threads(None) == MAXT
    with ce.Machine(nodes=2, node_size="4MiB", engine="mt") as m:
        assert m.engine.nthreads == MAXT
        assert m.engine.capabilities.threads == MAXT
        assert m.engine.capabilities.mc_safe and not m.engine.capabilities.asynchronous


@pytest.mark.parametrize("arg", ["0", "-1", "two", "1.5", "0x2"])
def test_bad_thread_counts(arg):
    with pytest.raises(ValueError, match=f"maximum {MAXT}|1..{MAXT}"):
        parse_threads(arg)


def test_too_many_threads_names_the_maximum():
    with ce.Machine(nodes=2, node_size="4MiB", engine="serial") as m:
        with pytest.raises(ValueError, match=rf"mt:{MAXT + 1}.*maximum on this machine is {MAXT}"):
            m.set_engine(f"mt:{MAXT + 1}")
        with pytest.raises(ValueError, match=f"is {MAXT}"):
            m.set_engine("mt:100000")
        assert m.engine_spec == "serial"         # the previous engine stays selected
        m.set_engine(f"mt:{MAXT}")
        assert m.engine.name == f"mt:{MAXT}"


def test_engine_refuses_what_it_cannot_run():
    with pytest.raises(ValueError, match=f"maximum on this machine is {MAXT}"):
        MtEngine(MAXT + 1)
    mem = np.zeros(1 << 16, np.uint8)
    z = np.zeros(1, np.int64)
    for bad in (mem[::2], mem.view(np.uint16), mem.reshape(2, -1)):
        with pytest.raises(TypeError, match="contiguous 1-D uint8"):
            MtEngine(1).copy(CopyJob(bad, z, z + 64, z + 8, z, np.zeros(1, bool)))
    ro = mem.copy()
    ro.flags.writeable = False
    with pytest.raises(TypeError):
        MtEngine(1).copy(CopyJob(ro, z, z + 64, z + 8, z, np.zeros(1, bool)))


def test_describe_names_the_threading_layer():
    e = MtEngine(1)
    info = e.describe()
    assert info["threading_layer"] in ("omp", "tbb", "workqueue")
    assert info["serialized"] == (info["threading_layer"] == "workqueue")
    assert info["max_threads"] == MAXT
    json.dumps(info)


# ----------------------------------------------------------------------------- chunking
def test_one_folio_many_threads_is_cut_into_chunks():
    job = make_job([2 * MiB])
    plan = mt_plan(job, 4)                # planning needs no threads
    assert [p for t in plan for p in t] == [(0, 0, 512 * KiB), (0, 512 * KiB, MiB),
                                            (0, MiB, 1536 * KiB), (0, 1536 * KiB, 2 * MiB)]


def test_fewer_folios_than_threads_cuts_folios():
    job = make_job([64 * KiB] * 3)
    plan = mt_plan(job, 4)
    assert all(plan), "every thread works"
    threads_of = {}
    for t, pieces in enumerate(plan):
        for f, a, b in pieces:
            threads_of.setdefault(f, set()).add(t)
            assert a % 64 == 0
    assert any(len(ts) > 1 for ts in threads_of.values()), "some folio is split"
    assert folio_bytes_per_thread(plan) == [48 * KiB] * 4


def test_as_many_folios_as_threads_gives_contiguous_blocks():
    job = make_job([4 * KiB] * 8)
    plan = mt_plan(job, 4)
    assert plan == [[(0, 0, 4096), (1, 0, 4096)], [(2, 0, 4096), (3, 0, 4096)],
                    [(4, 0, 4096), (5, 0, 4096)], [(6, 0, 4096), (7, 0, 4096)]]


def test_blocks_are_balanced_by_bytes_not_count():
    job = make_job([MiB] + [4 * KiB] * 8)
    plan = mt_plan(job, 2)
    assert plan[0] == [(0, 0, MiB)]
    assert [f for f, _, _ in plan[1]] == list(range(1, 9))


def test_poisoned_folios_are_left_out_of_the_plan():
    job = make_job([4 * KiB] * 4, poisoned=[1])
    plan = mt_plan(job, 2)
    assert 1 not in {f for t in plan for f, _, _ in t}


@given(sizes=st.lists(st.sampled_from([8, 64, 4096, 8192, 65536, 2 * MiB]), min_size=0, max_size=20),
       split=st.integers(1, 4), nthreads=st.integers(1, 9), data=st.data())
def test_plan_covers_every_clean_byte_once(sizes, split, nthreads, data):
    poisoned = data.draw(st.sets(st.integers(0, len(sizes) - 1), max_size=3)) if sizes else set()
    job = make_job(sizes, poisoned=poisoned, split=split)
    plan = mt_plan(job, nthreads)
    assert len(plan) == nthreads
    covered = {f: [] for f in range(len(sizes))}
    for pieces in plan:
        for f, a, b in pieces:
            covered[f].append((a, b))
    clean = [f for f in range(len(sizes)) if f not in poisoned]
    for f in range(len(sizes)):
        iv = sorted(covered[f])
        if f in poisoned:
            assert iv == []
            continue
        pos = 0
        for a, b in iv:                       # contiguous, no overlap, no gap
            assert a == pos
            pos = b
        assert pos == sizes[f]
    per_thread = folio_bytes_per_thread(plan)
    total = sum(sizes[f] for f in clean)
    if len(clean) >= nthreads:
        # whole folios, each thread a contiguous block in job order
        owner = {}
        for t, pieces in enumerate(plan):
            for f, _, _ in pieces:
                assert owner.setdefault(f, t) == t
        order = [owner[f] for f in clean]
        assert order == sorted(order)
    elif total:
        # folios cut: every thread within a cache line of an equal share
        for b in per_thread:
            assert abs(b - total / nthreads) <= 64 + 8


# ----------------------------------------------------------------------------- copying
@needs2
@pytest.mark.parametrize("sizes", [[2 * MiB], [64 * KiB] * 3, [4 * KiB] * 64, [MiB] + [4 * KiB] * 9])
def test_copy_both_ways(sizes):
    job = make_job(sizes, poisoned=[len(sizes) - 1] if len(sizes) > 1 else ())
    half = len(job.mem) // 2 // 4096 * 4096
    total = sum(sizes)
    job.mem[:total] = np.random.default_rng(1).integers(0, 256, total, dtype=np.uint8)
    e = MtEngine(2)
    res = e.copy(job)
    assert res.dtype == np.int32
    for f, size in enumerate(sizes):
        start = sum(sizes[:f])
        src, dst = job.mem[start:start + size], job.mem[half + start:half + start + size]
        if job.src_poisoned[f]:
            assert res[f] == -EHWPOISON and not dst.any()        # never read, never written
        else:
            assert res[f] == 0 and np.array_equal(src, dst)


def test_large_batch_non_temporal_path():
    from copyengine.engines.mt import NT_BYTES
    sizes = [2 * MiB] * (NT_BYTES // (2 * MiB) + 2)
    total = sum(sizes)
    mem = np.zeros(2 * total + 3 * 4096, np.uint8)
    job = make_job(sizes, poisoned=[3], mem=mem, split=3)
    job.src_off += 5            # nothing aligned: heads and tails around the 32-byte blocks
    job.dst_off += 4096 + 11
    src = np.random.default_rng(2).integers(0, 256, total + 5, dtype=np.uint8)
    mem[:total + 5] = src
    res = MtEngine(MAXT).copy(job)
    assert res.tolist() == [0, 0, 0, -EHWPOISON] + [0] * (len(sizes) - 4)
    half = len(mem) // 2 // 4096 * 4096
    out = mem[half + 4096 + 11:half + 4096 + 11 + total]
    f3 = slice(3 * 2 * MiB, 4 * 2 * MiB)
    assert not out[f3].any()
    out[f3] = src[5:][f3]
    assert np.array_equal(out, src[5:total + 5])
    assert not mem[half:half + 4096 + 11].any() and not mem[half + 4096 + 11 + total:].any()


def test_bad_descriptor_is_refused_before_any_write():
    mem = np.zeros(1 << 16, np.uint8)
    mem[:4096] = 7
    z = np.zeros(1, bool)
    for s, d, n, f in [(0, 1 << 16, 4096, 0), (-8, 8192, 8, 0), (0, 8192, -1, 0), (0, 8192, 8, 1)]:
        job = CopyJob(mem, np.array([0, s]), np.array([8192, d]), np.array([4096, n]),
                      np.array([0, f]), z)
        with pytest.raises(ValueError, match="bad descriptor 1"):
            MtEngine(1).copy(job)
        assert not mem[8192:].any()


def test_work_arrays_are_reused_and_nothing_big_is_allocated():
    sizes = [64 * KiB] * 32
    job = make_job(sizes)
    e = MtEngine(MAXT)
    e.copy(job)
    prefix = e._tls.prefix
    tracemalloc.start()
    try:
        for _ in range(5):
            e.copy(job)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert e._tls.prefix is prefix
    assert peak < 16 * KiB      # the 128-byte result array and Python's small change
    e.copy(make_job([4 * KiB] * 600))
    assert e._tls.prefix is not prefix and len(e._tls.prefix) > 600    # grown once


def test_empty_and_all_poisoned_jobs():
    e = MtEngine(MAXT)
    assert e.copy(make_job([])).shape == (0,)
    job = make_job([4096, 4096], poisoned=[0, 1])
    assert e.copy(job).tolist() == [-EHWPOISON, -EHWPOISON]
    assert not job.mem[len(job.mem) // 2 // 4096 * 4096:].any()


# ----------------------------------------------------------------------------- migration
def test_move_pages_through_mt():
    with ce.Machine(nodes=2, node_size="16MiB", engine="mt") as m:
        p = m.spawn()
        big = p.mmap(2 * MiB, folio_size="2MiB")
        small = p.mmap(16 * 4096)
        data = np.random.default_rng(3).integers(0, 256, 2 * MiB, dtype=np.uint8).tobytes()
        p.write(big, data)
        p.write(small, data[:16 * 4096])
        bad = small + 5 * 4096
        m.hwpoison(p.pfn_of(bad))
        pages = [big] + [small + i * 4096 for i in range(16)]
        r = p.move_pages(0, pages, [1] * len(pages))
        assert r.status[0] == 1 and p.read(big, 2 * MiB) == data
        for i in range(16):
            addr = small + i * 4096
            if addr == bad:
                assert r.status[1 + i] == -EHWPOISON
            else:
                assert r.status[1 + i] == 1
                assert p.read(addr, 4096) == data[i * 4096:(i + 1) * 4096]
        assert r.ret == 1


# ----------------------------------------------------------------------------- processes
def _python(code, env=None, timeout=120):
    full = dict(os.environ, **(env or {}))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, env=full, timeout=timeout)


COUNT_COMPILES = """
    import numba.core.event as ev
    compiled = []
    class L(ev.Listener):
        def on_start(self, event): compiled.append(event.data["dispatcher"].py_func.__name__)
        def on_end(self, event): pass
    ev.register("numba:compile", L())
"""


@pytest.mark.timeout(240)
def test_fresh_process_loads_kernels_from_the_cache():
    code = COUNT_COMPILES + """
    import numpy as np
    from copyengine.engines.mt import MtEngine
    from copyengine.engines.base import CopyJob
    mem = np.zeros(1 << 20, np.uint8); mem[:4096] = 1
    z = np.zeros(1, np.int64)
    res = MtEngine(1).copy(CopyJob(mem, z, z + 8192, z + 4096, z, np.zeros(1, bool)))
    assert res.tolist() == [0] and mem[8192:12288].all()
    print("COMPILED", [c for c in compiled if c.startswith("_")])
    """
    first = _python(code)            # may compile (and fill the cache) after a code change
    assert first.returncode == 0, first.stderr
    second = _python(code)
    assert second.returncode == 0, second.stderr
    assert "COMPILED []" in second.stdout, second.stdout


@needs2
@pytest.mark.timeout(240)
def test_workqueue_layer_is_serialized():
    # workqueue aborts the process when two threads enter a parallel region at once:
    # with it, mt must hold its lock around every parallel call.
    code = """
    import threading, numpy as np
    from copyengine.engines.mt import MtEngine
    from copyengine.engines.base import CopyJob
    e = MtEngine(2)
    assert e.describe()["threading_layer"] == "workqueue", e.describe()
    assert e.describe()["serialized"]
    def work(k):
        mem = np.zeros(4 << 20, np.uint8); mem[:1 << 20] = k + 1
        n = 16
        s = np.arange(n, dtype=np.int64) * 65536
        job = CopyJob(mem, s, s + (2 << 20), np.full(n, 65536, np.int64), np.arange(n), np.zeros(n, bool))
        for _ in range(200):
            assert not e.copy(job).any()
        assert (mem[2 << 20:3 << 20] == k + 1).all()
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in ts]; [t.join() for t in ts]
    print("OK")
    """
    r = _python(code, env={"NUMBA_THREADING_LAYER": "workqueue"})
    assert r.returncode == 0 and "OK" in r.stdout, (r.returncode, r.stderr[-2000:])
