"""vanilla (mainline's move-then-copy loop, compiled, one call per batch) and serial (the
series' batched folio_mc_copy) are two schedules of the same work: on the same scenario
they give the same statuses, the same vmstat counters and the same memory contents,
hwpoison, pins, shared folios, large folios and copy faults included."""
from hypothesis import given, strategies as st

import copyengine as ce
from copyengine.testing.faults import CopyFaults, plugin_manager, poison_page
from copyengine.testing.invariants import check_machine
from helpers import pattern

PS = 4096
COUNTERS = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
            "thp_migration_split", "pgalloc", "pgfree", "nr_hwpoison")


def run(engine, sc, faults=None):
    plugins = [faults] if faults is not None else []
    with ce.Machine(nodes=2, node_size="16MiB", plugin_manager=plugin_manager(*plugins)) as m:
        m.set_engine(engine)
        m.settings["nr_max_batched_migration"] = sc["batch"]
        p = m.spawn(cap_sys_nice=sc["all"])
        a = p.mmap(sc["small"] * PS)
        p.write(a, pattern(sc["small"] * PS, 1))
        b = p.mmap(2 << 20, folio_size="2MiB") if sc["thp"] else None
        if b is not None:
            p.write(b, pattern(2 << 20, 2))
        s = p.mmap(4 * PS, shared=True)
        p.write(s, pattern(4 * PS, 3))
        child = p.fork() if sc["fork"] else None
        pins = [p.pin(a + (i % sc["small"]) * PS, PS) for i in sc["pins"]]
        for i in sc["poison"]:
            poison_page(p, a + (i % sc["small"]) * PS)
        addrs = [a + i * PS for i in range(sc["small"])] + [s + i * PS for i in range(4)]
        if b is not None:
            addrs += [b, b + 5 * PS]
        nodes = [sc["nodes"][i % len(sc["nodes"])] for i in range(len(addrs))]
        r = p.move_pages(0, addrs, nodes, flags=ce.MPOL_MF_MOVE_ALL if sc["all"] else ce.MPOL_MF_MOVE)
        where = []
        for x in addrs:
            try:
                where.append(p.node_of(x))
            except OSError as e:
                where.append(-e.errno)
        contents = []
        for x in addrs:
            try:
                contents.append(p.read(x, PS))
            except OSError as e:
                contents.append(-e.errno)
        for pin in pins:
            pin.release()
        if child is not None:
            contents.append(child.read(a, sc["small"] * PS) if not sc["poison"] else None)
        check_machine(m)
        return r.ret, r.status, {k: m.vmstat[k] for k in COUNTERS}, where, contents


scenarios = st.fixed_dictionaries({
    "small": st.integers(1, 24),
    "batch": st.sampled_from([1, 3, 8, 512]),
    "thp": st.booleans(),
    "fork": st.booleans(),
    "all": st.booleans(),
    "poison": st.lists(st.integers(0, 23), max_size=2, unique=True),
    "pins": st.lists(st.integers(0, 23), max_size=2, unique=True),
    "nodes": st.lists(st.integers(0, 1), min_size=1, max_size=4),
})


@given(scenarios)
def test_vanilla_and_serial_agree_on_everything(sc):
    assert run("vanilla", sc) == run("serial", sc)


@given(scenarios, st.integers(0, 2 ** 16))
def test_vanilla_and_serial_agree_under_copy_faults(sc, seed):
    a = run("vanilla", sc, CopyFaults("raise", probability=0.5, seed=seed))
    b = run("serial", sc, CopyFaults("raise", probability=0.5, seed=seed))
    assert a == b


def test_vanilla_undoes_a_poisoned_folio_and_nothing_else():
    sc = dict(small=8, batch=512, thp=False, fork=False, all=False, poison=[3], pins=[],
              nodes=[1])
    ret, status, counters, where, contents = run("vanilla", sc)
    assert status[3] == -ce.EHWPOISON and ret == 1
    assert [s for i, s in enumerate(status) if i != 3] == [1] * (len(status) - 1)
    assert where[3] == 0 and contents[3] == -ce.EHWPOISON
    assert counters["pgmigrate_fail"] == 1 and counters["pgmigrate_success"] == 7 + 4
