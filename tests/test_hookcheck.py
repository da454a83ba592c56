"""copyengine.hookcheck: every hook result validated in one place, errors naming the plugin."""
import numpy as np
import pytest

import copyengine as ce
from copyengine.errors import PluginError
from copyengine.hookcheck import (check_engine_name, check_frames, check_selected_engine,
                                  check_status, reclaimable_frames)


@pytest.fixture
def m():
    with ce.Machine(nodes=2, node_size="8MiB") as m:
        yield m


# ------------------------------------------------------------------ check_status
@pytest.mark.parametrize("res", [np.zeros(3, np.int32), np.array([0, -5, -4095], np.int64),
                                 [0, -12, 0], (0, 0, np.int16(-1)), np.zeros(3, np.uint8)])
def test_status_accepts_valid(res):
    out = check_status(res, 3, "eng")
    assert out.dtype == np.int32 and out.shape == (3,)
    assert out.tolist() == [int(v) for v in res]


def test_status_returns_a_copy_not_the_engines_array():
    res = np.zeros(2, np.int32)
    out = check_status(res, 2, "eng")
    res[0] = -5
    assert out[0] == 0


@pytest.mark.parametrize("res, why", [
    (np.array([0, 2**32, 0], np.int64), "4294967296"),
    (np.array([0, 1, 0]), "holds 1"),
    (np.array([0, -4096, 0]), "-4096"),
    (np.array([0, 2**63 + 5, 0], np.uint64), "9223372036854775813"),
    (np.zeros(3, bool), "dtype bool"),
    (np.zeros(3, np.float64), "dtype float64"),
    (np.zeros((3, 1), np.int32), "shape"),
    (np.zeros(4, np.int32), "4 entries"),
    (np.zeros(2, np.int32), "2 entries"),
    ([0, 0], "2 entries"),
    ([0, True, 0], "True"),
    ([0, 0.0, 0], "0.0"),
    ([0, None, 0], "None"),
    ([0, 2**70, 0], "int64"),
    (None, "NoneType"),
    ("000", "str"),
    (0, "int"),
])
def test_status_refuses(res, why):
    with pytest.raises(PluginError, match="engine 'myeng'") as ei:
        check_status(res, 3, "myeng")
    assert why in str(ei.value)


def test_status_empty_batch():
    assert check_status([], 0, "e").shape == (0,)
    with pytest.raises(PluginError):
        check_status([], 1, "e")


# ------------------------------------------------------------------ check_selected_engine
def test_selected_engine(m):
    assert check_selected_engine(None, "p") is None
    assert check_selected_engine(m.engine, "p") is m.engine
    for bad in ("serial", 3, object(), [m.engine]):
        with pytest.raises(PluginError, match=r"\(mypolicy\)"):
            check_selected_engine(bad, "mypolicy")


# ------------------------------------------------------------------ check_engine_name
@pytest.mark.parametrize("name", ["serial", "my-dma", "dma_2", "x.y", "ünï"])
def test_engine_name_ok(name):
    assert check_engine_name(name) == name


@pytest.mark.parametrize("name", ["", "a b", " a", "a\n", "a\tb", "a\x00", "a\x7f", "a,b", "a:b",
                                  "a|b", "a\u2028b", "a\u00a0b"])
def test_engine_name_refused(name):
    with pytest.raises(ValueError, match="bad engine name"):
        check_engine_name(name)


@pytest.mark.parametrize("name", [None, 3, b"serial"])
def test_engine_name_not_str(name):
    with pytest.raises(TypeError, match="bad engine name"):
        check_engine_name(name)


# ------------------------------------------------------------------ check_frames
def test_frames_valid(m):
    for order in (0, 3, m.max_order):
        got = m.buddy.alloc(1, order, 4)
        out = check_frames(m, got, 1, order, 4, "p")
        assert out.dtype == np.int64 and out.tolist() == got.tolist()
        assert check_frames(m, got.tolist(), 1, order, 5, "p").tolist() == got.tolist()
        m.buddy.free(got, order)
    assert check_frames(m, None, 0, 0, 3, "p").shape == (0,)
    assert check_frames(m, [], 0, 0, 3, "p").shape == (0,)


def _refused(m, frames, node, order, count, why):
    free = m.free_pages()
    with pytest.raises(PluginError, match=r"copyengine_alloc_frames \(badalloc\)") as ei:
        check_frames(m, frames, node, order, count, "badalloc")
    assert why in str(ei.value)
    assert m.free_pages() == free  # checking takes nothing


def test_frames_refused(m):
    fpn = m.frames_per_node
    got = m.buddy.alloc(1, 0, 3)
    _refused(m, np.array([m.zero_pfn]), 0, 0, 1, "reserved")
    _refused(m, [int(got[0]), int(got[0])], 1, 0, 2, "more than once")
    _refused(m, got, 1, 0, 2, "more than the 2")
    _refused(m, [10**12], 1, 0, 1, "outside node 1")
    _refused(m, [2**63 - 1], 1, 0, 1, "outside")
    _refused(m, np.array([2**64 - 1], np.uint64), 1, 0, 1, "outside")
    _refused(m, [-1], 1, 0, 1, "outside")
    _refused(m, [int(got[0])], 0, 0, 1, "outside node 0")   # node 1's frame for node 0
    _refused(m, [2 * fpn - 1], 1, 1, 1, "outside")           # block runs past the node
    _refused(m, np.array([float(got[0])]), 1, 0, 1, "float64")
    _refused(m, [True], 1, 0, 1, "True")
    _refused(m, np.array([[got[0]]]), 1, 0, 1, "shape")
    _refused(m, "12", 1, 0, 1, "str")
    m.buddy.free(got, 0)
    # A number made up, still on a free list: it was never taken from the allocator.
    _refused(m, [fpn + 100], 1, 0, 1, "still free")
    # Unaligned, and overlapping blocks.
    blk = m.buddy.alloc(1, 2, 2)
    _refused(m, [int(blk[0]) + 1], 1, 2, 1, "not aligned")
    m.buddy.free(blk, 2)


def test_frames_refuses_in_use_and_poisoned(m):
    p = m.spawn()
    a = p.mmap(1 << 16, node=1)
    p.write(a, b"x")
    _refused(m, [p.pfn_of(a)], 1, 0, 1, "already allocated")
    got = m.buddy.alloc(1, 0, 1)
    m.buddy.free(got, 0)
    m.hwpoison(int(got[0]))
    _refused(m, got, 1, 0, 1, "hardware-poisoned")


def test_reclaimable_frames(m):
    got = m.buddy.alloc(1, 0, 2)
    bad = [int(got[0]), int(got[0]), m.zero_pfn, 10**15, int(got[1])]
    assert sorted(reclaimable_frames(m, bad, 1, 0).tolist()) == sorted(got.tolist())
    assert reclaimable_frames(m, "junk", 1, 0).shape == (0,)
    m.buddy.free(got, 0)


class BadAlloc:
    """An allocation hook (a real pluggy plugin) returning what ``frames(machine, node,
    order, count)`` says once armed; before that it lets the buddy allocator decide."""

    def __init__(self, frames):
        self.frames, self.armed = frames, False

    @ce.hookimpl(tryfirst=True)
    def copyengine_alloc_frames(self, machine, node, order, count):
        return self.frames(machine, node, order, count) if self.armed else None


@pytest.mark.parametrize("kind", ["zero", "twice", "range", "negative", "inuse", "float", "free"])
def test_machine_refuses_bad_frames_and_leaks_nothing(kind):
    """Machine.alloc_folios (the fault path) checks the hook's heads: a PluginError naming
    the plugin, the blocks the hook did take given back, the machine consistent, and no
    segfault for a wild pfn (issue 14)."""
    from copyengine.plugins import make_plugin_manager
    from copyengine.testing.invariants import check_machine
    victim = []

    def frames(m, node, order, count):
        if kind == "free":   # a made-up number still on the free list
            return np.array([m.buddy.free_blocks(node)[m.max_order][0]])
        if kind == "float":  # nothing taken: the numbers are not frames at all
            return np.arange(count, dtype=np.float64) + m.frames_per_node
        got = m.buddy.alloc(node, order, count - 1)  # taken from the allocator: must come back
        last = {"zero": m.zero_pfn, "twice": got[0], "range": 1 << 40, "negative": -3,
                "inuse": victim[0] if victim else 0}.get(kind)
        return np.r_[got, last]

    hook = BadAlloc(frames)
    pm = make_plugin_manager(entry_points=False, plugins=[hook])
    with ce.Machine(nodes=2, node_size="8MiB", plugin_manager=pm, engine="serial") as m:
        p = m.spawn()
        a = p.mmap(m.page_size)
        p.write(a, b"keep")
        victim.append(p.pfn_of(a))
        hook.armed = True
        free, stat = m.free_pages(), m.vmstat["pgalloc"]
        with pytest.raises(PluginError, match=r"copyengine_alloc_frames \(.*BadAlloc"):
            p.mmap(4 * m.page_size, populate=True)
        assert m.free_pages() == free and m.vmstat["pgalloc"] == stat
        assert p.read(a, 4) == b"keep"
        check_machine(m)


def test_refused_frames_name_the_one_plugin_that_returned_them():
    from copyengine.plugins import make_plugin_manager

    class Quiet:      # implements the hook but lets the next one decide
        @ce.hookimpl
        def copyengine_alloc_frames(self, machine, node, order, count):
            return None

    bad = BadAlloc(lambda m, node, order, count: np.array([m.zero_pfn]))
    pm = make_plugin_manager(entry_points=False)
    pm.register(Quiet(), name="quiet-allocator")
    pm.register(bad, name="zero-giver")
    bad.armed = True
    with ce.Machine(nodes=2, node_size="8MiB", plugin_manager=pm, engine="serial") as m:
        p = m.spawn()
        with pytest.raises(PluginError) as ei:
            p.mmap(m.page_size)
        msg = str(ei.value)
        assert "(zero-giver)" in msg and "quiet-allocator" not in msg
