"""The cheap path of move_pages (migrate/fastpath.py) gives exactly what the full path
gives: statuses, ret, vmstat counters, where every page ends and what it reads, on random
calls mixing the cases it takes (private pages of one mapping to one node, 4 KiB and
large folios, never-touched and zero pages, pages already there) with the cases it must
hand to the full path before changing anything (shared, pinned, poisoned, duplicate,
mixed nodes, several mappings, no memory on the target). A passive observer plugin
forces the full path on the reference machine."""
import numpy as np
import pytest
from hypothesis import given, strategies as st

import copyengine as ce
import copyengine.migrate.syscalls as syscalls
from copyengine.plugins import make_plugin_manager
from copyengine.testing.faults import poison_page
from copyengine.testing.invariants import check_machine
from helpers import pattern

PS = 4096
COUNTERS = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
            "thp_migration_split", "pgalloc", "pgfree", "nr_hwpoison", "pgfault")


class Watcher:
    """Sees migration events: its presence alone sends every call down the full path."""

    @ce.hookimpl
    def copyengine_migration_event(self, machine, event, info):
        pass


@pytest.fixture
def fast_calls(monkeypatch):
    taken = []
    real = syscalls.move_pages_fast

    def spy(target, addrs, node):
        out = real(target, addrs, node)
        taken.append(out is not None)
        return out

    monkeypatch.setattr(syscalls, "move_pages_fast", spy)
    return taken


def run(sc, full):
    pm = make_plugin_manager(entry_points=False, plugins=[Watcher()] if full else [])
    size = "8MiB" if sc["tight"] else "32MiB"
    with ce.Machine(nodes=2, node_size=size, page_size=sc.get("page", "4KiB"), plugin_manager=pm) as m:
        PS = m.page_size  # noqa: N806 - the module's PS, for this machine
        m.set_engine(sc["engine"])
        m.settings["nr_max_batched_migration"] = sc["batch"]
        p = m.spawn()
        n = sc["pages"]
        fs = "2MiB" if sc["thp"] else None
        a = p.mmap(max(n * PS, 2 << 20) if fs else n * PS, folio_size=fs)
        written = [i for i in range(n) if i not in sc["untouched"]]
        for i in written:
            p.write(a + i * PS, pattern(64, i))
        for i in sc["read_only"]:
            if i in sc["untouched"]:
                p.read(a + i * PS, 1)  # maps the zero page (or the huge zero page)
        other = p.mmap(4 * PS) if sc["second_vma"] else None
        if other is not None:
            p.write(other, b"o" * 4 * PS)
        child = p.fork() if sc["fork"] else None
        pins = [p.pin(a + i * PS, PS) for i in sc["pins"] if i in written]
        for i in sc["poison"]:
            if i in written:
                poison_page(p, a + i * PS)
        addrs = [a + i * PS for i in sc["entries"]]
        if other is not None:
            addrs.append(other)
        nodes = [sc["node"]] * len(addrs)
        if sc["mixed"] and addrs:
            nodes[-1] = 1 - sc["node"]
        asked = p.move_pages(0, addrs).status if addrs else []  # query mode, before and after
        r = p.move_pages(0, addrs, nodes)
        asked += p.move_pages(0, addrs).status if addrs else []
        where, reads = [], []
        for x in addrs:
            try:
                where.append(p.node_of(x))
            except OSError as e:
                where.append(-e.errno)
            try:
                reads.append(p.read(x, 64))
            except OSError as e:
                reads.append(-e.errno)
        for pin in pins:
            pin.release()
        if child is not None:
            child.exit()
        check_machine(m)
        return r.ret, r.status, asked, where, reads, {k: m.vmstat[k] for k in COUNTERS}


calls = st.fixed_dictionaries({
    "page": st.sampled_from(["4KiB", "64KiB"]),
    "engine": st.sampled_from(["serial", "vanilla", "mt:1", "mt:2"]),
    "batch": st.sampled_from([1, 4, 512]),
    "pages": st.integers(1, 24),
    "thp": st.booleans(),
    "tight": st.booleans(),
    "untouched": st.lists(st.integers(0, 23), max_size=3, unique=True),
    "read_only": st.lists(st.integers(0, 23), max_size=2, unique=True),
    "second_vma": st.booleans(),
    "fork": st.booleans(),
    "pins": st.lists(st.integers(0, 23), max_size=2, unique=True),
    "poison": st.lists(st.integers(0, 23), max_size=2, unique=True),
    "entries": st.lists(st.integers(0, 23), max_size=24),
    "node": st.integers(0, 1),
    "mixed": st.booleans(),
})


@given(calls)
def test_the_cheap_path_gives_what_the_full_path_gives(sc):
    n = sc["pages"]
    sc = dict(sc, **{k: sorted({i % n for i in sc[k]}) for k in ("untouched", "read_only", "pins", "poison")},
              entries=[i % n for i in sc["entries"]])
    assert run(sc, full=False) == run(sc, full=True)


def test_the_common_call_takes_the_cheap_path(fast_calls):
    sc = dict(engine="serial", batch=512, pages=16, thp=False, tight=False, untouched=[], read_only=[],
              second_vma=False, fork=False, pins=[], poison=[], entries=list(range(16)), node=1,
              mixed=False)
    ret, status, asked, where, reads, counters = run(sc, full=False)
    assert asked == [0] * 16 + [1] * 16
    assert fast_calls == [True] and ret == 0 and status == [1] * 16 and where == [1] * 16
    assert counters["pgmigrate_success"] == 16


@pytest.mark.parametrize("case", ["pins", "poison", "fork", "dup", "second_vma"])
def test_unusual_calls_go_to_the_full_path_untouched(fast_calls, case):
    sc = dict(engine="serial", batch=512, pages=8, thp=False, tight=False, untouched=[], read_only=[],
              second_vma=case == "second_vma", fork=case == "fork", pins=[2] if case == "pins" else [],
              poison=[3] if case == "poison" else [], entries=list(range(8)) + ([1] if case == "dup" else []),
              node=1, mixed=False)
    fast = run(sc, full=False)
    assert fast_calls == [False]
    assert fast == run(sc, full=True)


def test_a_node_without_room_goes_to_the_full_path_which_reports_enomem(fast_calls):
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        p = m.spawn()
        a = p.mmap(3 << 20, node=0)
        p.write(a, b"\1" * (3 << 20))
        hog = p.mmap(3 << 20, node=1)
        p.write(hog, b"\2" * (3 << 20))
        free1 = m.free_pages(1)
        n = free1 + 3
        r = p.move_pages(0, [a + i * PS for i in range(n)], [1] * n)
        assert fast_calls == [False]
        assert r.status.count(-12) == 3 and r.status.count(1) == free1
        check_machine(m)
        assert np.frombuffer(p.read(a, 3 << 20), np.uint8).min() == 1


# ----------------------------------------------------------------------------- copy windows
class Hooked(ce.engines.Engine):
    """A synchronous engine (so the cheap path stays on) that runs ``before`` once, in its
    first copy, while the machine lock is released, then copies."""

    def __init__(self, before):
        self.before, self.ran = before, False

    def copy(self, job):
        if not self.ran:
            self.ran = True
            self.before()
        return ce.engines.folio_mc_copy(job, np.arange(job.nr_folios))


class Register:
    def __init__(self, engine):
        self.engine = engine

    @ce.hookimpl
    def copyengine_register_engines(self, register):
        register("hooked", lambda arg, machine: self.engine, "runs a callback in its first copy")


@pytest.mark.parametrize("what", ["fork", "munmap-later", "pin-later", "munmap-split"])
def test_what_happens_during_an_earlier_batch_copy_is_seen_by_later_batches(fast_calls, what):
    state = {}

    def before():
        p, a = state["p"], state["a"]
        if what == "fork":  # copies the batch's migration entries; finalize maps both
            state["child"] = p.fork()
        elif what == "munmap-later":
            p.munmap(a + 9 * PS, PS)
        elif what == "pin-later":
            state["pin"] = p.pin(a + 10 * PS, PS)
        else:
            p.munmap(a + 5 * PS, PS)  # splits the VMA while batch 1 (pages 0-3) copies

    eng = Hooked(before)
    pm = make_plugin_manager(entry_points=False, plugins=[Register(eng)])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        m.set_engine("hooked")
        m.settings["nr_max_batched_migration"] = 4
        p = m.spawn()
        a = p.mmap(12 * PS)
        data = pattern(12 * PS, 5)
        p.write(a, data)
        state.update(p=p, a=a)
        r = p.move_pages(0, [a + i * PS for i in range(12)], [1] * 12)
        assert fast_calls == [True] and eng.ran
        gone = {"munmap-later": 9, "munmap-split": 5}.get(what)
        for i in range(12):
            if i == gone:
                with pytest.raises(OSError):
                    p.read(a + i * PS, 1)
                continue
            assert p.read(a + i * PS, PS) == data[i * PS:(i + 1) * PS]
            want = -16 if what == "pin-later" and i == 10 else 1
            assert r.status[i] == want
            assert p.node_of(a + i * PS) == (0 if want != 1 else 1)
        if what == "fork":
            assert state["child"].read(a, 12 * PS) == data
        check_machine(m)
        if "pin" in state:
            state["pin"].release()
        check_machine(m)


class Counting(ce.engines.Engine):
    capabilities = ce.engines.Capabilities(inline_bytes=64 << 10)

    def __init__(self):
        self.jobs = 0

    def copy(self, job):
        self.jobs += 1
        return ce.engines.folio_mc_copy(job, np.arange(job.nr_folios))


def test_an_engine_declaring_inline_bytes_is_not_called_for_smaller_calls(fast_calls):
    eng = Counting()
    pm = make_plugin_manager(entry_points=False, plugins=[Register(eng)])
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=pm) as m:
        m.set_engine("hooked")
        p = m.spawn()
        a = p.mmap(64 * PS)
        data = pattern(64 * PS, 9)
        p.write(a, data)
        assert p.move_pages(0, [a + i * PS for i in range(8)], [1] * 8).status == [1] * 8
        assert eng.jobs == 0  # 32 KiB: copied inline, as the engine said it would on this CPU
        assert p.move_pages(0, [a + i * PS for i in range(64)], [1] * 64).ret == 0
        assert eng.jobs == 1  # 224 KiB left to move: the engine's own job
        assert fast_calls == [True, True] and p.read(a, 64 * PS) == data
        check_machine(m)
