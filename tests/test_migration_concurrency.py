"""Migration racing with everything else, in the spirit of the kernel's
tools/testing/selftests/mm/migration.c: writer threads each own a region and write and
verify their own data in a loop while the main thread moves the whole range back and
forth (ping-pong) between nodes, for 4 KiB pages, 64 KiB base pages and 2 MiB folios,
private and shared across fork. Then munmap, fork and exit racing a migration of the same
range, and two threads migrating the same process at once.

Every loop is bounded by time and every thread joined with a timeout; after each race
the machine is checked for consistency and, once every process exits, for leaks.
"""
import errno
import random
import threading
import time

import pytest

import copyengine as ce
from copyengine.testing.invariants import check_machine
from helpers import pattern

PS = 4096
MiB = 1 << 20
EBUSY = errno.EBUSY
DURATION = 0.6     # seconds of ping-pong per test
JOIN = 20.0        # seconds a thread may take to notice it should stop


class Threads:
    """Run functions in threads until ``stop``; collect their exceptions."""

    def __init__(self):
        self.stop = threading.Event()
        self.errors = []
        self.threads = []

    def start(self, fn, *args):
        def run():
            try:
                fn(*args)
            except BaseException as e:  # noqa: BLE001 - reported by join()
                self.errors.append(e)
                self.stop.set()
        t = threading.Thread(target=run, daemon=True)
        self.threads.append(t)
        t.start()
        return t

    def join(self):
        self.stop.set()
        for t in self.threads:
            t.join(JOIN)
        assert not any(t.is_alive() for t in self.threads), "a thread did not stop"
        if self.errors:
            raise self.errors[0]


class Writer:
    """Owns [start, start+length) of ``proc``: writes pieces of a pattern at random
    places and reads them back, and now and then checks the whole region."""

    def __init__(self, proc, start, length, seed, ps):
        self.proc, self.start, self.length, self.seed = proc, start, length, seed
        self.base = pattern(2 * length, seed)
        self.expect = bytearray(proc.read(start, length))
        self.ps = ps
        self.iterations = 0

    def run(self, stop):
        rng = random.Random(self.seed)
        p, start, length = self.proc, self.start, self.length
        k = 0
        while k == 0 or not stop.is_set():      # at least one round, however late it starts
            n = rng.randrange(1, min(length, 3 * self.ps))
            off = rng.randrange(0, length - n + 1)
            src = (k * 4099) % length
            data = self.base[src:src + n]
            p.write(start + off, data)
            got = p.read(start + off, n)
            assert got == data, f"writer {self.seed}: read back differs at +{off:#x} ({n} bytes)"
            self.expect[off:off + n] = data
            if k % 8 == 0:
                assert p.read(start, length) == self.expect, f"writer {self.seed}: region corrupted"
            k += 1
            self.iterations = k

    def verify(self):
        assert self.proc.read(self.start, self.length) == self.expect


def ping_pong(caller, targets, pages, nodes, deadline, flags, allowed_busy):
    """Move ``pages`` of every pid in ``targets`` to the next node of ``nodes`` in turn
    until ``deadline``. Returns the number of move_pages calls."""
    calls = 0
    i = 0
    while time.monotonic() < deadline:
        node = nodes[i % len(nodes)]
        i += 1
        for pid in targets:
            r = caller.move_pages(pid, pages, [node] * len(pages), flags=flags)
            calls += 1
            for s in r.status:
                assert s == node or (allowed_busy and s == -EBUSY), f"status {s} moving to {node}"
            assert r.ret == 0
    return calls


# ----------------------------------------------------------------------------- ping-pong
KINDS = {
    "4k": dict(page="4KiB", size=64 * PS, folio=None),
    "64k": dict(page="64KiB", size=16 * 65536, folio=None),
    "2m": dict(page="4KiB", size=4 * 2 * MiB, folio="2MiB"),
}


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("sharing", ["private", "fork_private", "map_shared"])
def test_ping_pong_with_writers(kind, sharing):
    k = KINDS[kind]
    node_size = "64MiB" if k["page"] == "64KiB" else "32MiB"
    with ce.Machine(nodes=2, node_size=node_size, page_size=k["page"]) as m:
        ps = m.page_size
        free0 = [m.free_pages(n) for n in range(2)]
        p = m.spawn(cap_sys_nice=True)
        size = k["size"]
        a = p.mmap(size, shared=sharing == "map_shared", folio_size=k["folio"])
        init = pattern(size, 1)
        p.write(a, init)
        procs = [p]
        if sharing != "private":
            procs.append(p.fork())
            procs[-1].read(a, size)  # fork copies no PTEs of a shared mapping (vma_needs_copy)
        # each process gets two writers, each owning its own quarter (or half) of the range
        nw = 2 * len(procs)
        part = size // nw
        writers = [Writer(procs[i % len(procs)], a + i * part, part, 10 + i, ps) for i in range(nw)]
        th = Threads()
        for w in writers:
            th.start(w.run, th.stop)
        # one address per folio: a second address of a queued folio would be -EBUSY
        step = 2 * MiB if k["folio"] else ps
        pages = [a + 7 * PS * (k["folio"] is not None) + i for i in range(0, size, step)]
        flags = ce.MPOL_MF_MOVE_ALL if len(procs) > 1 else ce.MPOL_MF_MOVE
        try:
            calls = ping_pong(p, [q.pid for q in procs], pages, [1, 0], time.monotonic() + DURATION,
                              flags, allowed_busy=False)
        finally:
            th.join()
        assert calls >= 2
        assert all(w.iterations > 0 for w in writers)
        for w in writers:
            w.verify()
        # what the others wrote: shared memory sees it, a private copy never does
        for i, w in enumerate(writers):
            for q in procs:
                got = q.read(w.start, w.length)
                if q is w.proc or sharing == "map_shared":
                    assert got == w.expect
                else:
                    assert got == init[i * part:(i + 1) * part]
        check_machine(m)
        # one more round trip with everything quiet, then no leak
        for q in procs:
            r = p.move_pages(q.pid, pages, [1] * len(pages), flags=flags)
            assert r.status == [1] * len(pages)
        for q in procs:
            q.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == free0


# ----------------------------------------------------------------------------- races with munmap / fork / exit
def _mover(stop, caller, pid, pages, flags, out):
    node = 1
    while not out or not stop.is_set():         # at least one call
        try:
            r = caller.move_pages(pid, pages, [node] * len(pages), flags=flags)
        except OSError as e:
            if e.errno == errno.ESRCH:   # the target exited
                out.append("esrch")
                return
            raise
        for s in r.status:
            assert s in (node, -errno.EFAULT, -EBUSY), f"status {s}"
        out.append(r.status)
        node ^= 1


@pytest.mark.parametrize("folio", [None, "2MiB"])
def test_munmap_races_migration(folio):
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        free0 = [m.free_pages(n) for n in range(2)]
        p = m.spawn()
        rng = random.Random(5)
        deadline = time.monotonic() + DURATION
        rounds = 0
        while time.monotonic() < deadline or rounds < 3:
            size = 4 * MiB if folio else 128 * PS
            a = p.mmap(size, folio_size=folio)
            data = pattern(size, rounds)
            p.write(a, data)
            pages = [a + i * PS for i in range(0, size // PS, 1 if not folio else 64)]
            out = []
            th = Threads()
            th.start(_mover, th.stop, p, 0, pages, ce.MPOL_MF_MOVE, out)
            time.sleep(rng.uniform(0, 0.01))
            # unmap the middle (splitting a large folio), check the rest, then all of it
            cut = size // 4
            p.munmap(a + cut, cut + PS)
            assert p.read(a, cut) == data[:cut]
            assert p.read(a + 2 * cut + PS, size - 2 * cut - PS) == data[2 * cut + PS:]
            time.sleep(rng.uniform(0, 0.005))
            p.munmap(a, size)
            time.sleep(0.002)
            th.join()
            assert out, "the mover never completed a call"
            check_machine(m)
            rounds += 1
        p.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == free0


def test_fork_races_migration():
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        free0 = [m.free_pages(n) for n in range(2)]
        p = m.spawn(cap_sys_nice=True)
        size = 64 * PS
        a = p.mmap(size)
        b = p.mmap(2 * MiB, folio_size="2MiB")
        data, bdata = pattern(size, 3), pattern(2 * MiB, 4)
        p.write(a, data)
        p.write(b, bdata)
        pages = [a + i * PS for i in range(64)] + [b]
        out = []
        th = Threads()
        th.start(_mover, th.stop, p, 0, pages, ce.MPOL_MF_MOVE_ALL, out)
        deadline = time.monotonic() + DURATION
        children = 0
        try:
            while time.monotonic() < deadline or children < 3:
                c = p.fork()
                assert c.read(a, size) == data and c.read(b, 2 * MiB) == bdata
                c.write(a + children % 64 * PS, b"child")     # COW break in the child only
                assert p.read(a, size) == data
                c.exit()
                children += 1
        finally:
            th.join()
        assert out
        assert p.read(a, size) == data and p.read(b, 2 * MiB) == bdata
        check_machine(m)
        p.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == free0


@pytest.mark.parametrize("folio", [None, "2MiB"])
def test_exit_races_migration(folio):
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        free0 = [m.free_pages(n) for n in range(2)]
        rng = random.Random(7)
        mover = m.spawn(uid=1000)
        deadline = time.monotonic() + DURATION
        rounds = 0
        while time.monotonic() < deadline or rounds < 3:
            p = m.spawn(uid=1000)
            size = 4 * MiB if folio else 128 * PS
            a = p.mmap(size, folio_size=folio)
            p.write(a, pattern(size, rounds))
            pages = [a + i * PS for i in range(0, size // PS, 1 if not folio else 128)]
            out = []
            th = Threads()
            th.start(_mover, th.stop, mover, p.pid, pages, ce.MPOL_MF_MOVE, out)
            time.sleep(rng.uniform(0, 0.01))
            p.exit()
            # the mover ends by itself once the target is gone
            th.threads[0].join(JOIN)
            assert not th.threads[0].is_alive()
            th.join()
            assert out and out[-1] == "esrch"
            check_machine(m)
            rounds += 1
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == free0


# ----------------------------------------------------------------------------- two migrators
@pytest.mark.parametrize("folio", [None, "2MiB"])
def test_two_migrators_same_process(folio):
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        free0 = [m.free_pages(n) for n in range(2)]
        p = m.spawn(uid=1000)
        q = m.spawn(uid=1000)
        size = 4 * 2 * MiB if folio else 128 * PS
        a = p.mmap(size, folio_size=folio)
        p.write(a, pattern(size, 8))
        writers = [Writer(p, a + i * size // 2, size // 2, 20 + i, PS) for i in range(2)]
        pages = [a + i * PS for i in range(0, size // PS, 1 if not folio else 16)]
        seen = {"moved": 0, "busy": 0}
        lock = threading.Lock()

        def migrator(caller, pid, first):
            node = first
            calls = 0
            while calls == 0 or not th.stop.is_set():
                calls += 1
                r = caller.move_pages(pid, pages, [node] * len(pages))
                for s in r.status:
                    assert s in (node, -EBUSY), f"status {s} moving to {node}"
                assert 0 <= r.ret <= sum(1 for s in r.status if s == -EBUSY)
                with lock:
                    seen["moved"] += sum(1 for s in r.status if s == node)
                    seen["busy"] += sum(1 for s in r.status if s == -EBUSY)
                node ^= 1

        th = Threads()
        for w in writers:
            th.start(w.run, th.stop)
        th.start(migrator, p, 0, 1)
        th.start(migrator, q, p.pid, 0)
        time.sleep(DURATION)
        th.join()
        assert seen["moved"] > 0
        for w in writers:
            assert w.iterations > 0
            w.verify()
        check_machine(m)
        p.exit()
        check_machine(m)
        assert [m.free_pages(n) for n in range(2)] == free0


def test_migrate_pages_races_move_pages():
    """migrate_pages(2) of the whole process against move_pages of part of it."""
    with ce.Machine(nodes=2, node_size="32MiB") as m:
        free0 = [m.free_pages(n) for n in range(2)]
        p = m.spawn(uid=1000)
        size = 96 * PS
        a = p.mmap(size)
        b = p.mmap(2 * MiB, folio_size="2MiB")
        p.write(b, pattern(2 * MiB, 9))
        bdata = p.read(b, 2 * MiB)
        p.write(a, pattern(size, 10))
        writers = [Writer(p, a, size, 30, PS)]
        th = Threads()
        counts = []

        def whole(stop):
            src = 0
            while not counts or not stop.is_set():
                n = p.migrate_pages(0, [src], [src ^ 1])
                assert 0 <= n
                counts.append(n)
                src ^= 1

        def part(stop):
            node = 1
            for _ in iter(lambda: stop.is_set(), True):
                r = p.move_pages(0, [b, a + PS], [node, node])
                assert all(s in (node, -EBUSY) for s in r.status)
                node ^= 1

        th.start(writers[0].run, th.stop)
        th.start(whole, th.stop)
        th.start(part, th.stop)
        time.sleep(DURATION)
        th.join()
        assert counts
        writers[0].verify()
        assert p.read(b, 2 * MiB) == bdata
        check_machine(m)
        p.exit()
        assert [m.free_pages(n) for n in range(2)] == free0
