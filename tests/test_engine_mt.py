"""The ``mt`` engine: spec parsing, the two ways of cutting a batch into chunks, the poison
rule, work-array reuse, claiming threads (late, stalled, concurrent, idle), the disk cache,
and migrations through it."""
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
from copyengine.engines import mt
from copyengine.engines.mt import (CHUNKS_PER_THREAD, MIN_CHUNK, SOLO_BYTES, MtEngine,
                                    cpu_count, max_threads, parse_threads)
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


# ----------------------------------------------------------------------------- specs
def test_mt_alone_is_every_usable_cpu():
    assert cpu_count() == len(os.sched_getaffinity(0))
    assert parse_threads(None) == MAXT
    with ce.Machine(nodes=2, node_size="4MiB", engine="mt") as m:
        assert m.engine.nthreads == MAXT
        assert m.engine.capabilities.threads == MAXT
        assert m.engine.capabilities.mc_safe and not m.engine.capabilities.asynchronous
        assert m.engine.capabilities.inline_bytes == SOLO_BYTES    # copies alone below it


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


def test_describe_names_the_threads():
    e = MtEngine(1)
    info = e.describe()
    assert info["threading_layer"] == "python-threads"
    assert info["max_threads"] == MAXT and info["threads"] == 1
    json.dumps(info)


# ----------------------------------------------------------------------------- chunking
def chunk_bytes(chunks):
    return [sum(b - a for _, a, b in pieces) for pieces in chunks]


def test_one_folio_many_threads_is_cut_into_chunks():
    job = make_job([2 * MiB])
    chunks = mt_plan(job, 4)                # planning needs no threads
    share = 2 * MiB // (4 * CHUNKS_PER_THREAD)
    assert [p for c in chunks for p in c] == [(0, k * share, (k + 1) * share)
                                              for k in range(4 * CHUNKS_PER_THREAD)]


def test_fewer_folios_than_threads_cuts_folios():
    job = make_job([500 * KiB] * 3)
    chunks = mt_plan(job, 4)
    assert len(chunks) >= 4, "every thread can find work"
    folios_of = [{f for f, _, _ in c} for c in chunks]
    assert any(len(fs) > 1 for fs in folios_of), "some chunk spans two folios"
    assert len(chunks) > 3, "some folio is cut"
    sizes = chunk_bytes(chunks)
    assert len(set(sizes[:-1])) == 1 and sizes[0] % 64 == 0 and sizes[0] >= MIN_CHUNK
    assert len(chunks) <= 4 * CHUNKS_PER_THREAD + 1


def test_as_many_folios_as_threads_gives_blocks_of_whole_folios():
    job = make_job([256 * KiB] * 8)
    chunks = mt_plan(job, 4)
    assert chunks == [[(f, 0, 256 * KiB)] for f in range(8)]   # 2 MiB / 64 < a folio
    job = make_job([4 * KiB] * 512)
    chunks = mt_plan(job, 2)
    assert len(chunks) == 2 * CHUNKS_PER_THREAD
    assert [f for c in chunks for f, _, _ in c] == list(range(512))
    assert all(a == 0 and b == 4 * KiB for c in chunks for _, a, b in c)


def test_blocks_are_shared_by_bytes_not_count():
    job = make_job([MiB] + [4 * KiB] * 8 + [MiB])
    chunks = mt_plan(job, 2)
    assert chunks[0] == [(0, 0, MiB)]
    assert [f for f, _, _ in chunks[1]] == list(range(1, 10))   # 32 KiB < a chunk: joined
    assert len(chunks) == 2


def test_small_batches_and_one_thread_are_one_chunk():
    assert len(mt_plan(make_job([4 * KiB] * 7), 2)) == 1        # below SOLO_BYTES
    assert len(mt_plan(make_job([2 * MiB] * 4), 1)) == 1
    assert mt_plan(make_job([]), 2) == []


def test_poisoned_folios_are_left_out_of_the_plan():
    job = make_job([512 * KiB] * 4, poisoned=[1])
    chunks = mt_plan(job, 2)
    assert 1 not in {f for c in chunks for f, _, _ in c}
    assert {f for c in chunks for f, _, _ in c} == {0, 2, 3}


@given(sizes=st.lists(st.sampled_from([8, 64, 4096, 8192, 65536, 2 * MiB]), min_size=0, max_size=20),
       split=st.integers(1, 4), nthreads=st.integers(1, 9), data=st.data())
def test_plan_covers_every_clean_byte_once(sizes, split, nthreads, data):
    poisoned = data.draw(st.sets(st.integers(0, len(sizes) - 1), max_size=3)) if sizes else set()
    job = make_job(sizes, poisoned=poisoned, split=split)
    chunks = mt_plan(job, nthreads)
    covered = {f: [] for f in range(len(sizes))}
    for pieces in chunks:
        assert pieces, "no empty chunk"
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
    total = sum(sizes[f] for f in clean)
    sizes_of = chunk_bytes(chunks)
    if nthreads == 1 or total < SOLO_BYTES:
        assert len(chunks) == (1 if total else 0)
    elif len(clean) >= nthreads:
        # whole folios, chunks in job order, each at least a chunk's worth but the last
        owner = {}
        for k, pieces in enumerate(chunks):
            for f, _, _ in pieces:
                assert owner.setdefault(f, k) == k
        order = [owner[f] for f in clean]
        assert order == sorted(order)
        assert all(b >= MIN_CHUNK for b in sizes_of[:-1])
    else:
        # folios cut: equal cache-line multiples, enough for every thread to take several
        assert len(set(sizes_of[:-1])) <= 1 and sizes_of[0] % 64 == 0
        assert len(chunks) <= nthreads * CHUNKS_PER_THREAD + 1


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


def test_no_numba_parallel_runtime_is_started():
    """mt's threads are its own: Numba's threading layer (and its private API) is never
    touched, so the public numba.threading_layer() still says it is not initialized."""
    code = """
    import numba, numpy as np
    from copyengine.engines.mt import MtEngine
    from copyengine.engines.base import CopyJob
    mem = np.zeros(8 << 20, np.uint8); mem[:2 << 20] = 3
    n = 32
    s = np.arange(n, dtype=np.int64) * 65536
    job = CopyJob(mem, s, s + (4 << 20), np.full(n, 65536, np.int64), np.arange(n), np.zeros(n, bool))
    e = MtEngine(%d)
    assert not e.copy(job).any() and (mem[4 << 20:6 << 20] == 3).all()
    try:
        numba.threading_layer()
    except ValueError:
        print("NOT STARTED")
    """ % MAXT
    r = _python(code)
    assert r.returncode == 0 and "NOT STARTED" in r.stdout, (r.stdout, r.stderr[-2000:])


# ----------------------------------------------------------------------------- threads
def big_job(fill):
    job = make_job([64 * KiB] * 32)
    job.mem[:2 * MiB] = fill
    return job


def dst_of(job):
    half = len(job.mem) // 2 // 4096 * 4096
    return job.mem[half:half + 2 * MiB]


def test_workers_that_never_run_do_not_hold_the_batch(monkeypatch):
    """No worker is woken (as if the scheduler never ran one): the caller claims every
    chunk and returns at once."""
    e = MtEngine(2) if MAXT >= 2 else pytest.skip("needs 2 CPUs")
    monkeypatch.setattr(mt._Pool, "_start", lambda self: None)
    job = big_job(5)
    assert not e.copy(job).any() and (dst_of(job) == 5).all()
    assert e.describe()["workers_running"] == 0


def test_a_late_worker_copies_nothing():
    """A worker that wakes after its batch finds another generation (or no chunk left)
    in the counter and touches no memory."""
    job = big_job(9)
    prefix, edges = np.empty(len(job.nbytes) + 1, np.int64), np.empty(128, np.int64)
    result = np.empty(job.nr_folios, np.int32)
    _, nchunks = mt._plan(len(job.mem), job.src_off, job.dst_off, job.nbytes, job.folio,
                          job.src_poisoned, 2, result, prefix, edges)
    assert nchunks > 1
    args = (job.mem, job.src_off, job.dst_off, prefix, len(job.nbytes), edges, nchunks, 1 << 40)
    ctl = np.zeros(mt.C_SLOTS + 1, np.int64)
    ctl[mt.C_CLAIM] = 7 << 32                                 # generation 7 is current
    assert mt._claim_and_copy(*args, ctl, 6) == 0           # a worker of generation 6
    ctl[mt.C_CLAIM] = (7 << 32) | nchunks                     # generation 7: all claimed
    assert mt._claim_and_copy(*args, ctl, 7) == 0
    ctl[mt.C_CLAIM] = 0                                       # between batches
    assert mt._claim_and_copy(*args, ctl, 7) == 0
    assert not dst_of(job).any()
    ctl[mt.C_CLAIM] = 7 << 32
    assert mt._claim_and_copy(*args, ctl, 7) == nchunks and ctl[mt.C_DONE] == nchunks
    assert (dst_of(job) == 9).all()


def test_a_stalled_worker_is_waited_for_with_a_bound(monkeypatch):
    """A claimed chunk is waited for (its bytes may still be moving), but not forever."""
    e = MtEngine(2) if MAXT >= 2 else pytest.skip("needs 2 CPUs")

    real = mt._run_batch

    def stalled(ctl, *args):               # as if a worker had claimed a chunk and stopped
        real(ctl, *args)
        ctl[mt.C_DONE] -= 1
        return False
    monkeypatch.setattr(mt, "_run_batch", stalled)
    monkeypatch.setattr(mt, "WAIT_LIMIT", 0.05)
    with pytest.raises(RuntimeError, match="held a chunk for more than 0.05 s"):
        e.copy(big_job(1))
    monkeypatch.undo()
    job = big_job(2)                       # the engine still works afterwards
    assert not e.copy(job).any() and (dst_of(job) == 2).all()


@needs2
def test_threads_sharing_one_engine():
    """Several threads call one engine at once: one batch uses the workers, the others
    copy alone; every batch is right."""
    import threading
    e = MtEngine(2)
    errors = []

    def work(k):
        try:
            for i in range(30):
                job = big_job(k * 40 + i + 1)
                assert not e.copy(job).any()
                assert (dst_of(job) == k * 40 + i + 1).all()
        except BaseException as exc:   # noqa: BLE001 - reported below
            errors.append(exc)
    ts = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    [t.start() for t in ts]
    [t.join(60) for t in ts]
    assert not errors and not any(t.is_alive() for t in ts)


@needs2
def test_idle_workers_leave_and_come_back(monkeypatch):
    import time
    monkeypatch.setattr(mt, "IDLE_EXIT", 0.05)
    e = MtEngine(2)
    assert e.describe()["workers_running"] == 0     # none before the first batch
    job = big_job(4)
    e.copy(job)
    assert e.describe()["workers_running"] == 1
    deadline = time.monotonic() + 5
    while e.describe()["workers_running"] and time.monotonic() < deadline:
        time.sleep(0.01)
    assert e.describe()["workers_running"] == 0
    job = big_job(6)
    assert not e.copy(job).any() and (dst_of(job) == 6).all()
    assert e.describe()["workers_running"] == 1
    pool = e._pool
    e.close()
    deadline = time.monotonic() + 5
    while pool.running() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.running() == 0 and e.describe()["workers_running"] == 0


@needs2
def test_a_forked_child_gets_its_own_workers():
    """Threads do not survive fork: the child's engine starts new workers and copies right
    (Numba's GNU OpenMP layer could not run parallel code in a child at all)."""
    e = MtEngine(2)
    assert not e.copy(big_job(1)).any()          # the parent's workers are running
    pid = os.fork()
    if pid == 0:                                  # pragma: no cover - the child
        ok = False
        try:
            job = big_job(8)
            ok = not e.copy(job).any() and bool((dst_of(job) == 8).all()) and e._pool.pid == os.getpid()
        finally:
            os._exit(0 if ok else 1)
    import time
    deadline = time.monotonic() + 30
    while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    if done[0] == 0:
        os.kill(pid, 9)
        os.waitpid(pid, 0)
        pytest.fail("the forked child hung")
    assert os.waitstatus_to_exitcode(done[1]) == 0
    job = big_job(3)
    assert not e.copy(job).any() and (dst_of(job) == 3).all()
