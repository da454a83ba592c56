"""Bad input: every rejected call raises what the contract says and changes nothing.

``snapshot`` records, without touching anything (no faults, no counters), everything a
call could change: free lists and free pages per node, vmstat, settings, the processes and
their VMAs and PTEs, mem_map, and the bytes of every mapped frame.
"""
import errno
import hashlib

import numpy as np
import pytest

import copyengine as ce
from copyengine.mm.memmap import PG_allocated
from copyengine.mm.pte import PTE_PRESENT, pte_pfn

PS = 4096
KiB = 1 << 10
MiB = 1 << 20


def snapshot(m, procs):
    mm = m.mem_map
    allocated = (mm.flags & PG_allocated) != 0
    snap = {
        "free": [m.free_pages(n) for n in range(m.nodes)],
        "blocks": [[sorted(b.tolist()) for b in m.buddy.free_blocks(n)] for n in range(m.nodes)],
        "vmstat": m.vmstat,
        "settings": m.settings.as_dict(),
        "pids": sorted(m.processes),
        "objects": sorted(m.objects),
        # metadata of allocated frames (a free frame's stale fields mean nothing), and
        # every frame's flags
        "mem_map": {k: hashlib.sha1(getattr(mm, k)[allocated].tobytes()).hexdigest()
                    for k in ("refcount", "pincount", "mapcount", "order", "head",
                              "owner", "index", "private")},
        "flags": hashlib.sha1(mm.flags.tobytes()).hexdigest(),
        "procs": [],
    }
    for p in procs:
        vmas = []
        for v in p.vmas:
            present = (v.ptes & PTE_PRESENT) != 0
            frames = {}
            for pfn in np.unique(pte_pfn(v.ptes[present])).tolist():
                frames[pfn] = hashlib.sha1(m.mem[pfn * m.page_size:(pfn + 1) * m.page_size]).hexdigest()
            vmas.append((v.start, v.end, v.node, v.order, v.shared, v.pgoff, v.obj.id,
                         v.ptes.tobytes(), frames))
        snap["procs"].append((p.pid, p.alive, vmas))
    return snap


def assert_unchanged(before, after):
    for k in before:
        assert before[k] == after[k], f"{k} changed by a rejected call"


class World:
    """A small machine with a varied state worth preserving."""

    def __init__(self):
        m = self.m = ce.Machine(nodes=2, node_size="4MiB")
        p = self.p = m.spawn()
        self.priv = p.mmap(8 * PS, node=0)
        p.write(self.priv, bytes(range(256)) * (8 * PS // 256))
        self.lazy = p.mmap(8 * PS, node=1, populate=False)        # pages 0-1 written, 2 zero page
        p.write(self.lazy + 100, b"lazy" * 1500)
        p.read(self.lazy + 2 * PS, 10)
        self.shared = p.mmap(4 * PS, node=1, shared=True)
        self.shm_lazy = p.mmap(4 * PS, node=1, shared=True, populate=False)
        p.write(self.shm_lazy + PS, b"one page")
        p.write(self.shared, b"shared!")
        self.big = p.mmap(2 * MiB, node=1, folio_size="2MiB")
        p.write(self.big + 12345, b"big folio")
        self.mid = p.mmap(4 * 64 * KiB, node=0, folio_size="64KiB", populate=False)
        p.write(self.mid + 64 * KiB - 2, b"straddle")
        self.c = p.fork()
        self.c.write(self.priv + PS, b"child wrote")                # one COW page
        self.pin = p.pin(self.priv + 4 * PS, PS)
        self.hole = self.priv + 6 * PS
        p.munmap(self.hole, PS)                                     # a hole inside priv
        self.poisoned = p.pfn_of(self.priv + 7 * PS)
        m.hwpoison(self.poisoned)
        self.dead = m.spawn()
        self.dead_a = self.dead.mmap(PS)
        self.dead.exit()
        self.procs = [p, self.c, self.dead]

    def snap(self):
        return snapshot(self.m, self.procs)


@pytest.fixture
def world():
    w = World()
    yield w
    w.m.close()


def check(w, fn, exc, code=None):
    before = w.snap()
    with pytest.raises(exc) as ei:
        fn()
    if code is not None:
        assert isinstance(ei.value, OSError)
        assert ei.value.errno == code, f"expected errno {code}, got {ei.value.errno}: {ei.value}"
    assert_unchanged(before, w.snap())
    return ei.value


# (label, call, exception, errno) ; calls take the World
SYSCALL_CASES = [
    # mmap
    ("mmap zero length", lambda w: w.p.mmap(0), OSError, errno.EINVAL),
    ("mmap negative length", lambda w: w.p.mmap(-PS), OSError, errno.EINVAL),
    ("mmap node too big", lambda w: w.p.mmap(PS, node=2), OSError, errno.EINVAL),
    ("mmap node negative", lambda w: w.p.mmap(PS, node=-1), OSError, errno.EINVAL),
    ("mmap folio 3KiB", lambda w: w.p.mmap(PS, folio_size="3KiB"), OSError, errno.EINVAL),
    ("mmap folio 2KiB", lambda w: w.p.mmap(PS, folio_size="2KiB"), OSError, errno.EINVAL),
    ("mmap folio 4MiB", lambda w: w.p.mmap(PS, folio_size="4MiB"), OSError, errno.EINVAL),
    ("mmap folio 12KiB", lambda w: w.p.mmap(PS, folio_size=12 * KiB), OSError, errno.EINVAL),
    ("mmap folio 0", lambda w: w.p.mmap(PS, folio_size=0), OSError, errno.EINVAL),
    ("mmap folio junk", lambda w: w.p.mmap(PS, folio_size="big"), OSError, errno.EINVAL),
    ("mmap populate too big", lambda w: w.p.mmap(8 * MiB, node=1), OSError, errno.ENOMEM),
    ("mmap populate too big shared", lambda w: w.p.mmap(5 * MiB, node=0, shared=True), OSError,
     errno.ENOMEM),
    ("mmap populate too big large", lambda w: w.p.mmap(4 * MiB, node=1, folio_size="2MiB"),
     OSError, errno.ENOMEM),
    ("mmap length type", lambda w: w.p.mmap("4096"), TypeError, None),
    ("mmap length float", lambda w: w.p.mmap(4096.0), TypeError, None),
    ("mmap node type", lambda w: w.p.mmap(PS, node="0"), TypeError, None),
    ("mmap shared type", lambda w: w.p.mmap(PS, shared=1), TypeError, None),
    ("mmap populate type", lambda w: w.p.mmap(PS, populate="yes"), TypeError, None),
    # munmap
    ("munmap unaligned", lambda w: w.p.munmap(w.priv + 1, PS), OSError, errno.EINVAL),
    ("munmap unaligned 2", lambda w: w.p.munmap(w.priv + PS // 2, 2 * PS), OSError, errno.EINVAL),
    ("munmap zero length", lambda w: w.p.munmap(w.priv, 0), OSError, errno.EINVAL),
    ("munmap negative length", lambda w: w.p.munmap(w.priv, -PS), OSError, errno.EINVAL),
    ("munmap negative address", lambda w: w.p.munmap(-PS, PS), OSError, errno.EINVAL),
    ("munmap beyond address space", lambda w: w.p.munmap(w.priv, 1 << 48), OSError, errno.EINVAL),
    ("munmap type", lambda w: w.p.munmap(str(w.priv), PS), TypeError, None),
    # read
    ("read negative n", lambda w: w.p.read(w.priv, -1), OSError, errno.EINVAL),
    ("read unmapped", lambda w: w.p.read(0x1000, 1), OSError, errno.EFAULT),
    ("read negative address", lambda w: w.p.read(-1, 2), OSError, errno.EFAULT),
    ("read past address space", lambda w: w.p.read(1 << 47, 1), OSError, errno.EFAULT),
    ("read past end", lambda w: w.p.read(w.lazy + 8 * PS - 3, 4), OSError, errno.EFAULT),
    ("read past end of untouched", lambda w: w.p.read(w.lazy + 3 * PS, 6 * PS), OSError,
     errno.EFAULT),
    ("read into hole", lambda w: w.p.read(w.priv + 5 * PS, 2 * PS), OSError, errno.EFAULT),
    ("read guard gap", lambda w: w.p.read(w.shared + 4 * PS, 1), OSError, errno.EFAULT),
    ("read across mappings", lambda w: w.p.read(w.lazy, w.shared + PS - w.lazy), OSError,
     errno.EFAULT),
    ("read poisoned", lambda w: w.p.read(w.priv + 7 * PS, 1), OSError, ce.EHWPOISON),
    ("read n type", lambda w: w.p.read(w.priv, 1.0), TypeError, None),
    ("read addr type", lambda w: w.p.read(float(w.priv), 1), TypeError, None),
    # write
    ("write unmapped", lambda w: w.p.write(0x1000, b"x"), OSError, errno.EFAULT),
    ("write negative address", lambda w: w.p.write(-2, b"xx"), OSError, errno.EFAULT),
    ("write past end", lambda w: w.p.write(w.lazy + 8 * PS - 3, b"1234"), OSError, errno.EFAULT),
    ("write past end big", lambda w: w.p.write(w.lazy, b"W" * (9 * PS)), OSError, errno.EFAULT),
    ("write past end of big folio", lambda w: w.p.write(w.big + 2 * MiB - 1, b"12"), OSError,
     errno.EFAULT),
    ("write into hole", lambda w: w.p.write(w.priv + 5 * PS, b"H" * (2 * PS)), OSError, errno.EFAULT),
    ("write across mappings", lambda w: w.p.write(w.mid + 4 * 64 * KiB - 4, b"G" * (2 * PS)),
     OSError, errno.EFAULT),
    ("write poisoned", lambda w: w.p.write(w.priv + 7 * PS, b"p"), OSError, ce.EHWPOISON),
    ("write spanning poisoned", lambda w: w.p.write(w.priv + 5 * PS, b"p" * 3 * PS), OSError,
     errno.EFAULT),
    ("write str", lambda w: w.p.write(w.priv, "text"), TypeError, None),
    ("write int", lambda w: w.p.write(w.priv, 5), TypeError, None),
    ("write non-contiguous", lambda w: w.p.write(w.priv, np.arange(10, dtype=np.uint8)[::2]),
     TypeError, None),
    # lookups
    ("node_of unmapped", lambda w: w.p.node_of(0x1000), OSError, errno.EFAULT),
    ("pfn_of unmapped", lambda w: w.p.pfn_of(w.hole), OSError, errno.EFAULT),
    ("pfn_of negative", lambda w: w.p.pfn_of(-PS), OSError, errno.EFAULT),
    ("pfn_of huge", lambda w: w.p.pfn_of(1 << 50), OSError, errno.EFAULT),
    ("node_of never touched", lambda w: w.p.node_of(w.lazy + 5 * PS), OSError, errno.ENOENT),
    ("pfn_of never touched", lambda w: w.p.pfn_of(w.lazy + 8 * PS - 1), OSError, errno.ENOENT),
    ("pfn_of never touched large", lambda w: w.p.pfn_of(w.mid + 3 * 64 * KiB), OSError,
     errno.ENOENT),
    ("node_of type", lambda w: w.p.node_of(str(w.priv)), TypeError, None),
    # pin
    ("pin zero", lambda w: w.p.pin(w.priv, 0), OSError, errno.EINVAL),
    ("pin negative", lambda w: w.p.pin(w.priv, -1), OSError, errno.EINVAL),
    ("pin past end", lambda w: w.p.pin(w.lazy + 7 * PS, 2 * PS), OSError, errno.EFAULT),
    ("pin hole", lambda w: w.p.pin(w.hole, PS), OSError, errno.EFAULT),
    ("pin poisoned", lambda w: w.p.pin(w.priv + 7 * PS, PS), OSError, ce.EHWPOISON),
    # exited process
    ("exited read", lambda w: w.dead.read(w.dead_a, 1), OSError, errno.ESRCH),
    ("exited read 0", lambda w: w.dead.read(w.dead_a, 0), OSError, errno.ESRCH),
    ("exited write", lambda w: w.dead.write(w.dead_a, b"x"), OSError, errno.ESRCH),
    ("exited write empty", lambda w: w.dead.write(w.dead_a, b""), OSError, errno.ESRCH),
    ("exited mmap", lambda w: w.dead.mmap(PS), OSError, errno.ESRCH),
    ("exited munmap", lambda w: w.dead.munmap(w.dead_a, PS), OSError, errno.ESRCH),
    ("exited pin", lambda w: w.dead.pin(w.dead_a, PS), OSError, errno.ESRCH),
    ("exited fork", lambda w: w.dead.fork(), OSError, errno.ESRCH),
    ("exited node_of", lambda w: w.dead.node_of(w.dead_a), OSError, errno.ESRCH),
    ("exited pfn_of", lambda w: w.dead.pfn_of(w.dead_a), OSError, errno.ESRCH),
    # machine-level
    ("hwpoison negative", lambda w: w.m.hwpoison(-1), ValueError, None),
    ("hwpoison too big", lambda w: w.m.hwpoison(w.m.total_frames), ValueError, None),
    ("hwpoison type", lambda w: w.m.hwpoison("3"), TypeError, None),
    ("spawn bad uid", lambda w: w.m.spawn(uid=-1), ValueError, None),
    ("spawn bad mems", lambda w: w.m.spawn(mems_allowed=[7]), ValueError, None),
    ("setting unknown", lambda w: w.m.settings.__setitem__("bogus", 1), ValueError, None),
    ("setting bad value", lambda w: w.m.settings.__setitem__("migrate_mode", "x"), ValueError, None),
    ("setting bad type", lambda w: w.m.settings.__setitem__("copy_timeout", "1"), TypeError, None),
]


@pytest.mark.parametrize("label,call,exc,code", SYSCALL_CASES, ids=[c[0] for c in SYSCALL_CASES])
def test_bad_call_changes_nothing(world, label, call, exc, code):
    check(world, lambda: call(world), exc, code)
    # the world still works afterwards
    w = world
    assert w.p.read(w.shared, 7) == b"shared!"
    assert w.c.read(w.priv + PS, 11) == b"child wrote"
    assert w.p.read(w.big + 12345, 9) == b"big folio"


def test_errors_are_oserror_subclasses_with_messages(world):
    w = world
    e = check(w, lambda: w.p.read(0x1000, 1), OSError, errno.EFAULT)
    assert e.strerror and "0x1000" in str(e)
    e = check(w, lambda: w.dead.read(w.dead_a, 1), OSError, errno.ESRCH)
    assert isinstance(e, ProcessLookupError)
    e = check(w, lambda: w.p.read(w.priv + 7 * PS, 1), OSError, ce.EHWPOISON)
    assert "hardware" in e.strerror.lower()


# ----------------------------------------------------------------------------- a full node
@pytest.fixture
def full(world):
    """The world with node 1 completely allocated (by someone outside the processes)."""
    w = world
    w.hog = w.m.alloc_folios(1, 0, w.m.free_pages(1))
    assert w.m.free_pages(1) == 0
    return w


FULL_CASES = [
    ("fault on first touch", lambda w: w.p.write(w.lazy + 5 * PS, b"x"), errno.ENOMEM),
    ("fault many", lambda w: w.p.write(w.lazy, b"y" * 8 * PS), errno.ENOMEM),
    ("cow off the zero page", lambda w: w.p.write(w.lazy + 2 * PS, b"z"), errno.ENOMEM),
    ("cow of a shared private page", lambda w: w.c.write(w.big + 5, b"c"), errno.ENOMEM),
    ("populate", lambda w: w.p.mmap(PS, node=1), errno.ENOMEM),
    ("populate large", lambda w: w.p.mmap(64 * KiB, node=1, folio_size="64KiB"), errno.ENOMEM),
    ("populate shared", lambda w: w.p.mmap(PS, node=1, shared=True), errno.ENOMEM),
    ("shared read fault", lambda w: w.p.read(w.shm_lazy + 3 * PS, 1), errno.ENOMEM),
    ("shared read fault in child", lambda w: w.c.read(w.shm_lazy, 2 * PS), errno.ENOMEM),
    ("pin of untouched", lambda w: w.p.pin(w.lazy + 6 * PS, PS), errno.ENOMEM),
    ("pin breaking cow", lambda w: w.c.pin(w.big, PS), errno.ENOMEM),
]


@pytest.mark.parametrize("label,call,code", FULL_CASES, ids=[c[0] for c in FULL_CASES])
def test_full_node_enomem_changes_nothing(full, label, call, code):
    w = full
    check(w, lambda: call(w), OSError, code)
    free0 = w.m.free_pages(0)
    assert free0 > 0                                   # never taken from the other node


def test_fork_with_pinned_pages_on_a_full_node(world):
    w = world
    pin = w.p.pin(w.lazy, PS)                          # a pinned page on node 1: fork must copy it
    w.hog = w.m.alloc_folios(1, 0, w.m.free_pages(1))
    procs_before = dict(w.m.processes)
    check(w, lambda: w.p.fork(), OSError, errno.ENOMEM)
    assert w.m.processes == procs_before               # no half-made child
    w.m.free_folios(w.hog[:1])
    c = w.p.fork()
    assert c.pfn_of(w.lazy) != w.p.pfn_of(w.lazy)
    pin.release()


def test_enomem_then_recover(full):
    w = full
    with pytest.raises(OSError):
        w.p.write(w.lazy + 5 * PS, b"x")
    w.m.free_folios(w.hog[:1])
    w.p.write(w.lazy + 5 * PS, b"x")
    assert w.p.read(w.lazy + 5 * PS, 1) == b"x" and w.p.node_of(w.lazy + 5 * PS) == 1


# ----------------------------------------------------------------------------- constructors
@pytest.mark.parametrize("kwargs,exc", [
    (dict(nodes=0), ValueError), (dict(nodes="1"), TypeError), (dict(node_size="1MiB"), ValueError),
    (dict(node_size=[1]), TypeError), (dict(page_size="16KiB"), ValueError),
    (dict(page_size=None), TypeError), (dict(engine="warp-drive"), ValueError),
])
def test_constructor_errors(kwargs, exc):
    args = dict(nodes=1, node_size="2MiB")
    args.update(kwargs)
    with pytest.raises(exc):
        ce.Machine(**args)


def test_snapshot_notices_changes(world):
    """The helper is not vacuous: real changes show up in it."""
    w = world
    changes = [
        lambda: w.p.write(w.priv + 3, b"\xff"),                      # contents only
        lambda: w.p.read(w.lazy + 5 * PS, 1),                        # a zero-page PTE
        lambda: w.p.write(w.lazy + 6 * PS, b"n"),                    # an allocation
        lambda: w.m.settings.__setitem__("migrate_mode", "async"),
        lambda: w.m.hwpoison(w.m.frames_per_node + 1000),
        lambda: w.p.munmap(w.priv, PS),
        lambda: w.c.exit(),
    ]
    for change in changes:
        before = w.snap()
        change()
        assert w.snap() != before


# ----------------------------------------------------------------------------- issue 14
def test_mmap_beyond_host_memory_is_enomem_and_changes_nothing():
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        p = m.spawn()
        a = p.mmap(PS)
        p.write(a, b"keep")
        before = snapshot(m, [p])
        with pytest.raises(OSError) as ei:
            p.mmap(1 << 45, populate=False)
        assert ei.value.errno == errno.ENOMEM
        assert_unchanged(before, snapshot(m, [p]))
        assert p.read(a, 4) == b"keep"


@pytest.mark.parametrize("which", ["pages", "nodes"])
def test_move_pages_refuses_2d_arrays(which):
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        p = m.spawn()
        a = p.mmap(2 * PS)
        p.write(a, b"x" * (2 * PS))
        pages = np.array([a, a + PS], np.int64)
        nodes = np.array([1, 1], np.int64)
        if which == "pages":
            pages = pages.reshape(2, 1)
        else:
            nodes = nodes.reshape(1, 2)
        before = snapshot(m, [p])
        with pytest.raises(TypeError, match="1-D"):
            p.move_pages(0, pages, nodes)
        assert_unchanged(before, snapshot(m, [p]))
        assert p.node_of(a) == 0
