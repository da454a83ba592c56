"""The copy phase's window, made deterministic (issue 14).

The machine lock is released while a batch is copied (migrate_pages_batch drops no lock
in Linux, but the folios are locked and their PTEs are migration entries, so everything
else proceeds). A ``copyengine_batch_copy`` wrapper runs a callback just before the copy:
from it, munmap (one that splits the VMA of a page being migrated too), mmap, fork, read,
write, pin and a second migration run on the same page, its folio and its neighbours.
Accesses to a page under migration wait on its migration entry, so they run in another
thread (joined with a bound) and must see the migrated data. After each: check_machine
passes (ShadowMemory too) and every byte is intact.
"""
from __future__ import annotations

import threading

import numpy as np
import pytest

import copyengine as ce
from copyengine.plugins import make_plugin_manager
from copyengine.testing.invariants import ShadowMemory, check_machine

PS = 4096
JOIN = 10.0   # seconds any helper thread may take (they wait on migration entries)
WAIT = 3.0    # migration_wait_timeout: an access that waits longer fails with ETIMEDOUT


class BeforeCopy:
    """Runs ``callback(job)`` once, just before the next batch copy (with the machine
    lock released, as the copy runs)."""

    def __init__(self):
        self.callback = None
        self.error = None
        self.ran = 0
        self.lock_free = None

    @ce.hookimpl(wrapper=True)
    def copyengine_batch_copy(self, machine, engine, job):
        cb, self.callback = self.callback, None
        if cb is not None:
            self.lock_free = _lock_is_free(machine)
            try:
                cb(job)
                self.ran += 1
            except BaseException as e:   # kept for the test: the framework would take it
                self.error = e           # for an engine error and copy on the CPU
        return (yield)


def _lock_is_free(m):
    """True when another thread could take the machine lock now."""
    out = []
    t = threading.Thread(target=lambda: out.append(m.lock.acquire(timeout=1) and (m.lock.release() or True)))
    t.start()
    t.join(JOIN)
    return bool(out and out[0])


class World:
    def __init__(self, engine="serial", nodes=2):
        self.hook = BeforeCopy()
        pm = make_plugin_manager(entry_points=False, plugins=[self.hook])
        self.m = ce.Machine(nodes=nodes, node_size="8MiB", plugin_manager=pm, engine=engine)
        self.m.settings["migration_wait_timeout"] = WAIT
        self.shadow = ShadowMemory(self.m)
        self.p = self.spawn()
        self.rng = np.random.default_rng(7)
        self.threads = []
        self.errors = []

    def spawn(self):
        p = self.m.spawn(cap_sys_nice=True)
        self.shadow.spawn(p)
        return p

    def mmap(self, npages, shared=False, p=None, node=0, fill=True, folio_size=None):
        p = p or self.p
        a = p.mmap(npages * PS, shared=shared, node=node, folio_size=folio_size)
        self.shadow.mmap(p, a, npages * PS, shared)
        if fill:
            self.write(a, self.rng.integers(1, 256, npages * PS, dtype=np.uint8).tobytes(), p)
        return a

    def write(self, a, data, p=None):
        p = p or self.p
        p.write(a, data)
        self.shadow.write(p, a, data)

    def background(self, fn):
        """Run fn in a thread (it may wait on a migration entry); errors are kept."""
        def run():
            try:
                fn()
            except BaseException as e:   # reported by finish()
                self.errors.append(e)
        t = threading.Thread(target=run, daemon=True)
        t.start()
        self.threads.append(t)
        return t

    def before_copy(self, fn):
        self.hook.callback = fn

    def finish(self):
        for t in self.threads:
            t.join(JOIN)
            assert not t.is_alive(), "a helper thread is still waiting on a migration entry"
        if self.hook.error is not None:
            raise AssertionError(f"the window's callback failed: {self.hook.error!r}") from self.hook.error
        if self.errors:
            raise self.errors[0]
        assert self.hook.ran == 1, "the callback never ran: no batch was copied through the hook"
        assert self.hook.lock_free, "the machine lock was held during the copy"
        check_machine(self.m, self.shadow)

    def close(self):
        self.m.close()


@pytest.fixture
def w():
    world = World()
    yield world
    world.close()


def move(w, pages, node=1, p=None):
    return (p or w.p).move_pages(0, pages, [node] * len(pages))


# --------------------------------------------------------------------------- munmap
def test_munmap_splitting_the_vma_of_a_page_being_migrated(w):
    """The issue's reproducer: a 2-page mapping, move_pages of page 0, munmap of page 1
    from the window. The page's migration entry must be finalized where it lives."""
    a = w.mmap(2)
    w.before_copy(lambda job: (w.p.munmap(a + PS, PS), w.shadow.munmap(w.p, a + PS, PS)))
    r = move(w, [a])
    assert r.status == [1]
    w.finish()
    assert w.p.read(a, PS) == w.shadow.expect(w.p, a, PS)
    assert w.p.node_of(a) == 1


def test_munmap_both_neighbours_of_a_page_being_migrated(w):
    a = w.mmap(3)

    def cb(job):
        for off in (0, 2 * PS):
            w.p.munmap(a + off, PS)
            w.shadow.munmap(w.p, a + off, PS)
    w.before_copy(cb)
    assert move(w, [a + PS]).status == [1]
    w.finish()
    assert w.p.read(a + PS, PS) == w.shadow.expect(w.p, a + PS, PS)


def test_munmap_of_the_page_being_migrated(w):
    """Linux's munmap does not wait on a migration entry (zap_pte_range drops it; the
    migration then finds the folio unmapped and frees it): from the window itself, in the
    migrating thread, it must not block."""
    a = w.mmap(2)
    w.before_copy(lambda job: (w.p.munmap(a, 2 * PS), w.shadow.munmap(w.p, a, 2 * PS)))
    r = move(w, [a, a + PS])
    assert all(s in (1, -14) for s in r.status), r.status
    w.finish()
    assert w.m.free_pages() == w.m.total_frames - 1   # nothing mapped: every frame back


def test_munmap_of_a_folio_queued_for_a_later_batch(w):
    """A folio queued for a later batch is unmapped during an earlier batch's copy; its
    migration then fails and its isolated source must be freed, not leaked."""
    w.m.settings["nr_max_batched_migration"] = 1
    a = w.mmap(3)
    w.before_copy(lambda job: (w.p.munmap(a + 2 * PS, PS), w.shadow.munmap(w.p, a + 2 * PS, PS)))
    r = move(w, [a, a + PS, a + 2 * PS])
    assert r.status[:2] == [1, 1]
    w.finish()
    w.p.munmap(a, 2 * PS)
    w.shadow.munmap(w.p, a, 2 * PS)
    check_machine(w.m, w.shadow)
    assert w.m.free_pages() == w.m.total_frames - 1


# --------------------------------------------------------------------------- mmap, fork
def test_mmap_and_write_elsewhere_in_the_window(w):
    a = w.mmap(4)
    made = []

    def cb(job):
        b = w.mmap(3, node=1)
        made.append(b)
    w.before_copy(cb)
    assert move(w, [a + i * PS for i in range(4)]).status == [1] * 4
    w.finish()
    b = made[0]
    assert w.p.read(b, 3 * PS) == w.shadow.expect(w.p, b, 3 * PS)


def test_fork_in_the_window(w):
    a = w.mmap(2)
    kids = []

    def cb(job):   # fork waits for nothing: copy_nonpresent_pte copies the migration entries
        c = w.p.fork()
        w.shadow.fork(w.p, c)
        kids.append(c)
    w.before_copy(cb)
    assert move(w, [a]).status == [1]
    w.finish()
    c = kids[0]
    assert c.read(a, 2 * PS) == w.shadow.expect(c, a, 2 * PS)
    data = b"child" * 10
    w.write(a, data, c)           # copy-on-write: the parent keeps its bytes
    check_machine(w.m, w.shadow)
    assert w.p.read(a, len(data)) == w.shadow.expect(w.p, a, len(data))


# --------------------------------------------------------------------------- read, write, pin
def test_read_of_the_page_being_migrated_waits_and_sees_the_data(w):
    a = w.mmap(2)
    want = w.shadow.expect(w.p, a, 2 * PS)
    got = []
    w.before_copy(lambda job: w.background(lambda: got.append(w.p.read(a, 2 * PS))))
    assert move(w, [a]).status == [1]
    w.finish()
    assert got == [want]


def test_read_of_a_neighbour_does_not_wait(w):
    a = w.mmap(2)
    got = []
    w.before_copy(lambda job: got.append(w.p.read(a + PS, PS)))   # same thread: must not block
    assert move(w, [a]).status == [1]
    w.finish()
    assert got == [w.shadow.expect(w.p, a + PS, PS)]


def test_write_to_the_page_being_migrated_lands_after_the_move(w):
    a = w.mmap(2)
    data = b"written during the copy"

    def writer():
        w.p.write(a + 100, data)
    w.before_copy(lambda job: w.background(writer))
    assert move(w, [a]).status == [1]
    for t in w.threads:
        t.join(JOIN)
    w.shadow.write(w.p, a + 100, data)
    w.finish()
    assert w.p.read(a + 100, len(data)) == data
    assert w.p.node_of(a) == 1


def test_pin_of_the_page_being_migrated(w):
    a = w.mmap(2)
    pins = []

    def pinner():
        pins.append(w.p.pin(a, PS))
    w.before_copy(lambda job: w.background(pinner))
    assert move(w, [a]).status == [1]
    for t in w.threads:
        t.join(JOIN)
    w.shadow.pin(pins[0])
    w.finish()
    assert w.m.mem_map.pincount[pins[0].heads[0]] == 1
    assert w.p.node_of(a) == 1      # pinned after the move, on the new node
    pins[0].release()
    w.shadow.unpin(pins[0])
    check_machine(w.m, w.shadow)


def test_shared_page_read_through_the_page_cache_while_locked(w):
    """Another process maps the same shared object; its read of the page (through the
    page cache, its PTE not yet faulted) happens while the folio is locked for migration."""
    a = w.mmap(2, shared=True)
    c = w.p.fork()
    w.shadow.fork(w.p, c)
    got = []
    w.before_copy(lambda job: w.background(lambda: got.append(c.read(a, 2 * PS))))
    assert move(w, [a, a + PS]).status == [1, 1]
    w.finish()
    assert got == [w.shadow.expect(c, a, 2 * PS)]


# --------------------------------------------------------------------------- a second migration
def test_second_migration_of_the_same_page(w):
    a = w.mmap(2)
    res = []
    w.before_copy(lambda job: w.background(lambda: res.append(w.p.move_pages(0, [a], [0]))))
    assert move(w, [a]).status == [1]
    w.finish()
    # the second call either waited and moved it back, or found it busy
    assert res and res[0].status[0] in (0, 1, -16), res
    assert w.p.node_of(a) == res[0].status[0] if res[0].status[0] >= 0 else True
    assert w.p.read(a, 2 * PS) == w.shadow.expect(w.p, a, 2 * PS)


def test_second_migration_of_a_neighbour(w):
    a = w.mmap(2)
    res = []
    w.before_copy(lambda job: res.append(w.p.move_pages(0, [a + PS], [1])))   # same thread
    assert move(w, [a]).status == [1]
    w.finish()
    assert res[0].status == [1]
    assert w.p.read(a, 2 * PS) == w.shadow.expect(w.p, a, 2 * PS)


# --------------------------------------------------------------------------- its folio
def test_read_of_another_page_of_the_folio_being_migrated(w):
    a = w.mmap(16, folio_size="64KiB")
    got = []
    w.before_copy(lambda job: w.background(lambda: got.append(w.p.read(a + 9 * PS, PS))))
    assert move(w, [a]).status == [1]
    w.finish()
    assert got == [w.shadow.expect(w.p, a + 9 * PS, PS)]
    assert w.p.node_of(a + 15 * PS) == 1      # the whole folio moved


def test_munmap_of_part_of_the_folio_being_migrated(w):
    """Another thread unmaps half of the large folio being migrated: it waits for the
    migration, then splits the folio; nothing is lost or leaked."""
    a = w.mmap(16, folio_size="64KiB")

    def unmap_half():
        w.p.munmap(a + 8 * PS, 8 * PS)
    w.before_copy(lambda job: w.background(unmap_half))
    assert move(w, [a]).status == [1]
    for t in w.threads:
        t.join(JOIN)
    w.shadow.munmap(w.p, a + 8 * PS, 8 * PS)
    w.finish()
    assert w.p.read(a, 8 * PS) == w.shadow.expect(w.p, a, 8 * PS)


def test_write_to_another_page_of_the_folio_being_migrated(w):
    a = w.mmap(16, folio_size="64KiB")
    data = b"folio neighbour"
    w.before_copy(lambda job: w.background(lambda: w.p.write(a + 5 * PS + 3, data)))
    assert move(w, [a]).status == [1]
    for t in w.threads:
        t.join(JOIN)
    w.shadow.write(w.p, a + 5 * PS + 3, data)
    w.finish()
    assert w.p.read(a, 16 * PS) == w.shadow.expect(w.p, a, 16 * PS)
