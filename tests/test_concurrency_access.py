"""Many threads accessing one process at once, and waiting on migration entries."""
import errno
import random
import threading
import time

import numpy as np
import pytest

import copyengine as ce
from copyengine.mm.pte import PTE_MIGRATION, PTE_PRESENT, PTE_WRITE, mk_pte, pte_pfn

PS = 4096
KiB = 1 << 10
MiB = 1 << 20


def run_threads(targets, timeout=30):
    errors = []
    barrier = threading.Barrier(len(targets))

    def wrap(fn):
        def run():
            try:
                barrier.wait()
                fn()
            except BaseException as e:  # noqa: BLE001 - reported below
                errors.append(e)
        return run

    threads = [threading.Thread(target=wrap(t), daemon=True) for t in targets]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout)
    assert not any(t.is_alive() for t in threads), "a thread hung"
    if errors:
        raise errors[0]


def test_disjoint_regions_many_threads():
    with ce.Machine(nodes=2, node_size="16MiB") as m:
        p = m.spawn()
        maps = [
            (p.mmap(MiB, node=0, populate=False), MiB),
            (p.mmap(2 * MiB, node=1, folio_size="2MiB", populate=False), 2 * MiB),
            (p.mmap(MiB, node=1, shared=True, populate=False), MiB),
            (p.mmap(MiB, node=0, folio_size="64KiB"), MiB),
        ]
        nthreads = 8
        # each thread owns a strip of every mapping; strips share folios and pages
        # (strip boundaries are not page aligned) but never bytes
        regions = {t: [] for t in range(nthreads)}
        for a, size in maps:
            strip = size // nthreads - 123
            for t in range(nthreads):
                regions[t].append((a + t * (size // nthreads) + 61, strip))
        final = {}

        def worker(t):
            rng = random.Random(t)
            for it in range(40):
                addr, n = rng.choice(regions[t])
                off = rng.randrange(0, n - 1)
                ln = rng.randrange(1, min(n - off, 20000) + 1)
                data = bytes([(t * 31 + it) & 0xFF]) * ln
                p.write(addr + off, data)
                # read back what this thread wrote: nobody else touches these bytes
                assert p.read(addr + off, ln) == data
            final[t] = True

        shadow = {a: bytearray(size) for a, size in maps}
        lock = threading.Lock()
        log = []

        def logged_worker(t):
            # the same worker, but recording every write in lock order to rebuild the result
            rng = random.Random(1000 + t)
            for it in range(40):
                addr, n = rng.choice(regions[t])
                off = rng.randrange(0, n - 1)
                ln = rng.randrange(1, min(n - off, 20000) + 1)
                data = bytes([(t * 31 + it) & 0xFF]) * ln
                p.write(addr + off, data)
                with lock:
                    log.append((addr + off, data))
                assert p.read(addr + off, ln) == data

        run_threads([lambda t=t: worker(t) for t in range(nthreads)])
        assert len(final) == nthreads
        # after the first round the content of every strip is whatever its owner wrote last;
        # a second, logged round checks the whole picture against a model
        for a, size in maps:
            shadow[a][:] = p.read(a, size)
        run_threads([lambda t=t: logged_worker(t) for t in range(nthreads)])
        for addr, data in log:          # disjoint bytes: order between threads is irrelevant
            for a, size in maps:
                if a <= addr < a + size:
                    shadow[a][addr - a:addr - a + len(data)] = data
        for a, size in maps:
            assert p.read(a, size) == bytes(shadow[a])
        p.exit()
        assert m.free_pages() == m.total_frames - 1


def test_overlapping_writes_are_atomic():
    """Whole-region writes of one byte value by many threads: every read sees one
    writer's value throughout (a write is one critical section), never a torn mix."""
    with ce.Machine(nodes=2, node_size="8MiB") as m:
        p = m.spawn()
        a = p.mmap(256 * KiB, node=1, folio_size="64KiB", populate=False)
        n = 256 * KiB - 100
        values = list(range(1, 7))
        torn = []

        def writer(v):
            for _ in range(30):
                p.write(a + 50, bytes([v]) * n)

        def reader():
            for _ in range(60):
                got = p.read(a + 50, n)
                if len(set(got)) != 1 or (got[0] not in values and got[0] != 0):
                    torn.append(sorted(set(got))[:5])

        run_threads([lambda v=v: writer(v) for v in values] + [reader, reader])
        assert not torn
        final = p.read(a + 50, n)
        assert len(set(final)) == 1 and final[0] in values
        assert p.read(a, 50) == bytes(50)


def test_concurrent_first_touch_faults_account_exactly():
    with ce.Machine(nodes=2, node_size="8MiB") as m:
        p = m.spawn()
        free = m.free_pages(1)
        a = p.mmap(512 * PS, node=1, populate=False)
        nthreads = 8

        def toucher(t):
            # every thread touches every page (same pages, racing faults), some read first
            order = list(range(512))
            random.Random(t).shuffle(order)
            for i in order:
                if (i + t) % 3 == 0:
                    p.read(a + i * PS, 1)
                p.write(a + i * PS + 8 * t, bytes([t + 1]) * 8)

        run_threads([lambda t=t: toucher(t) for t in range(nthreads)])
        assert m.free_pages(1) == free - 512                 # each page allocated once
        expect = b"".join(bytes([t + 1]) * 8 for t in range(nthreads))
        for i in range(512):
            assert p.read(a + i * PS, 8 * nthreads) == expect
        pfns = {p.pfn_of(a + i * PS) for i in range(512)}
        assert len(pfns) == 512 and m.zero_pfn not in pfns


def test_fork_exit_churn_with_concurrent_writes():
    with ce.Machine(nodes=2, node_size="8MiB") as m:
        start = m.free_pages()
        p = m.spawn()
        a = p.mmap(64 * PS, node=0)
        s = p.mmap(16 * PS, node=1, shared=True)
        stop = threading.Event()
        seen = []

        def forker():
            try:
                for i in range(25):
                    c = p.fork()
                    snap = c.read(a, 64 * PS)
                    c.write(a + (i % 64) * PS, b"child")          # COW in the child
                    assert c.read(a, 64 * PS)[:(i % 64) * PS] == snap[:(i % 64) * PS]
                    c.write(s + i, b"#")                           # shared: visible to p
                    seen.append(snap)
                    c.exit()
            finally:
                stop.set()

        def writer(t):
            k = 0
            while not stop.is_set():
                page = (t * 7 + k) % 64
                p.write(a + page * PS, bytes([t]) * PS)
                assert p.read(a + page * PS, PS) in (bytes([u]) * PS for u in range(4))
                k += 1

        run_threads([forker] + [lambda t=t: writer(t) for t in range(4)])
        assert len(seen) == 25
        assert p.read(s, 25) == b"#" * 25
        p.exit()
        assert m.free_pages() == start
        assert not m.processes


# ----------------------------------------------------------------------------- migration entries
def _set_migration_entry(m, vma, i):
    with m.lock:
        old = vma.ptes[i].copy()
        assert old & PTE_PRESENT
        vma.ptes[i] = mk_pte(pte_pfn(old), PTE_MIGRATION | PTE_WRITE)
    return old


def _restore(m, vma, i, old):
    with m.lock:
        vma.ptes[i] = old
        m.cond.notify_all()


@pytest.mark.parametrize("access", ["read", "write", "node_of"])
def test_access_waits_on_a_migration_entry(machine, access):
    """Accesses wait on a migration entry. munmap, fork and exit do not (zap_pte_range
    drops the entry, copy_nonpresent_pte copies it): tests/test_copy_window.py and
    tests/test_core_safety.py run them inside a real migration's copy."""
    m = machine
    p = m.spawn()
    a = p.mmap(4 * PS, node=1)
    p.write(a, b"before")
    vma = p.vmas[0]
    old = _set_migration_entry(m, vma, 0)
    result, errors = [], []

    def run():
        try:
            if access == "read":
                result.append(p.read(a, 6))
            elif access == "write":
                p.write(a + 2, b"AFTER")
                result.append(p.read(a, 7))
            elif access == "node_of":
                result.append(p.node_of(a))
            elif access == "munmap":
                p.munmap(a, PS)
                result.append("unmapped")
            elif access == "exit":
                p.exit()
                result.append("exited")
            else:
                result.append(p.fork())
        except BaseException as e:  # noqa: BLE001
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(0.3)
    assert t.is_alive(), f"{access} did not wait on the migration entry"
    assert not result and not errors
    # other pages, and other processes, are not blocked meanwhile
    assert p.read(a + PS, 1) == b"\0"
    _restore(m, vma, 0, old)
    t.join(5)
    assert not t.is_alive()
    assert not errors, errors
    if access == "read":
        assert result == [b"before"]
    elif access == "write":
        assert result == [b"beAFTER"]
    elif access == "node_of":
        assert result == [1]
    elif access == "munmap":
        with pytest.raises(OSError):
            p.read(a, 1)
    elif access == "exit":
        assert not p.alive and m.free_pages() == m.total_frames - 1
    else:
        assert result[0].read(a, 6) == b"before"


def test_migration_entry_wait_times_out(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(2 * PS)
    p.write(a, b"x" * 2 * PS)
    vma = p.vmas[0]
    m.settings["migration_wait_timeout"] = 0.2
    old = _set_migration_entry(m, vma, 1)
    free, v = m.free_pages(), m.vmstat
    t0 = time.monotonic()
    with pytest.raises(OSError) as ei:
        p.read(a, 2 * PS)
    waited = time.monotonic() - t0
    assert ei.value.errno == errno.ETIMEDOUT
    assert 0.15 <= waited < 3
    with pytest.raises(OSError) as ei:
        p.write(a + PS, b"y")
    assert ei.value.errno == errno.ETIMEDOUT
    assert m.free_pages() == free and m.vmstat == v
    assert p.read(a, PS) == b"x" * PS                          # the other page is fine
    _restore(m, vma, 1, old)
    assert p.read(a + PS, 2) == b"xx"


def test_migration_entry_waiters_in_threads_time_out_independently(machine):
    m = machine
    p = m.spawn()
    a = p.mmap(PS)
    m.settings["migration_wait_timeout"] = 0.3
    old = _set_migration_entry(m, p.vmas[0], 0)
    codes = []

    def reader():
        try:
            p.read(a, 1)
        except OSError as e:
            codes.append(e.errno)

    ts = [threading.Thread(target=reader, daemon=True) for _ in range(4)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(5)
    assert codes == [errno.ETIMEDOUT] * 4
    _restore(m, p.vmas[0], 0, old)
    assert p.read(a, 1) == b"\0"
