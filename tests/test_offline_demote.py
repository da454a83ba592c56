"""Machine.offline_node / online_node (offline_pages, MR_MEMORY_HOTPLUG) and
Machine.demote (demote_folio_list, MR_DEMOTION): where folios go, EBUSY / ENOMEM /
EINVAL as the kernel functions, bad input changing nothing, and a hypothesis property
that no byte is lost and every page ends off the node or the call said why."""
import errno

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import copyengine as ce
from copyengine.testing.invariants import ShadowMemory, assert_unchanged, check_machine, snapshot
from helpers import PS, pattern, raises_errno


def nodes_of(p, a, n):
    return [p.node_of(a + i * PS) for i in range(n)]


def used(m, node):
    return m.frames_per_node - m.free_pages(node)


@pytest.fixture
def m3():
    with ce.Machine(nodes=3, node_size="8MiB") as m:
        yield m


def test_offline_moves_everything_to_the_next_node(m3):
    p = m3.spawn()
    a = p.mmap(16 * PS, node=1)
    b = p.mmap(1 << 21, node=1, folio_size="2MiB")
    s = p.mmap(8 * PS, node=1, shared=True)
    p.write(a, pattern(16 * PS))
    p.write(b, pattern(1 << 21, 1))
    before = m3.vmstat
    moved = m3.offline_node(1)
    assert moved == 16 + 512 + 8
    assert used(m3, 1) == 0 and 1 in m3.offline_nodes
    assert set(nodes_of(p, a, 16)) == {2} and p.node_of(b) == 2 and p.node_of(s) == 2
    assert p.read(a, 16 * PS) == pattern(16 * PS) and p.read(b, 1 << 21) == pattern(1 << 21, 1)
    v = m3.vmstat
    assert v["pgmigrate_success_memory_hotplug"] - before.get("pgmigrate_success_memory_hotplug", 0) == moved
    check_machine(m3)


def test_offline_node_takes_no_allocations_until_online(m3):
    p = m3.spawn()
    m3.offline_node(2)
    raises_errno(errno.ENOMEM, p.mmap, 4 * PS, node=2)  # bound there, no policy: ENOMEM
    a = p.mmap(4 * PS, populate=False)
    p.mbind(a, 4 * PS, ce.MPOL_INTERLEAVE, [1, 2])  # the offline node is dropped (N_MEMORY)
    assert p.vmas[-1].policy.nodes == (1,)
    raises_errno(errno.EINVAL, p.mbind, a, 4 * PS, ce.MPOL_BIND, [2])
    c = p.mmap(4 * PS, populate=False)
    p.mbind(c, 4 * PS, ce.MPOL_PREFERRED, [1])
    p.write(c, b"x" * 4 * PS)
    assert set(nodes_of(p, c, 4)) == {1}
    assert m3.offline_node(2) == 0  # already offline
    m3.online_node(2)
    m3.online_node(2)  # already online: nothing to do
    d = p.mmap(4 * PS, node=2)
    assert set(nodes_of(p, d, 4)) == {2}
    check_machine(m3)


def test_offline_wraps_to_node_0_and_spills_to_the_next_with_room():
    with ce.Machine(nodes=3, node_size="4MiB") as m:
        p = m.spawn()
        fill = p.mmap((m.free_pages(0) - 8) * PS, node=0)  # node 0: room for 8 pages
        a = p.mmap(24 * PS, node=2)
        p.write(a, pattern(24 * PS))
        assert m.offline_node(2) == 24
        got = nodes_of(p, a, 24)
        assert got.count(0) == 8 and got.count(1) == 16
        assert p.read(a, 24 * PS) == pattern(24 * PS)
        del fill
        check_machine(m)


def test_pinned_folio_is_ebusy_after_moving_the_rest(m3):
    p = m3.spawn()
    a = p.mmap(8 * PS, node=1)
    p.write(a, pattern(8 * PS))
    pin = p.pin(a + 3 * PS, PS)
    raises_errno(errno.EBUSY, m3.offline_node, 1)
    assert nodes_of(p, a, 8) == [2, 2, 2, 1, 2, 2, 2, 2]
    assert 1 not in m3.offline_nodes  # the failed offline is undone
    assert p.read(a, 8 * PS) == pattern(8 * PS)
    pin.release()
    assert m3.offline_node(1) == 1
    check_machine(m3)


def test_no_room_is_enomem_and_the_node_stays_online():
    with ce.Machine(nodes=2, node_size="4MiB") as m:
        p = m.spawn()
        p.mmap((m.free_pages(0) - 4) * PS, node=0)
        a = p.mmap(10 * PS, node=1)
        p.write(a, pattern(10 * PS))
        raises_errno(errno.ENOMEM, m.offline_node, 1)
        assert nodes_of(p, a, 10).count(0) == 4 and 1 not in m.offline_nodes
        assert p.read(a, 10 * PS) == pattern(10 * PS)
        check_machine(m)


@pytest.mark.parametrize("call,args,code", [
    ("offline_node", (3,), errno.EINVAL),
    ("offline_node", (-1,), errno.EINVAL),
    ("offline_node", (0,), errno.EBUSY),     # the zero page: reserved, unmovable
    ("online_node", (5,), errno.EINVAL),
    ("demote", (2, 4), errno.EINVAL),        # the last node has no demotion target
    ("demote", (3, 4), errno.EINVAL),
    ("demote", (0, -1), errno.EINVAL),
])
def test_bad_input_changes_nothing(m3, call, args, code):
    p = m3.spawn()
    p.mmap(8 * PS, node=0)
    p.mmap(8 * PS, node=1)
    before = snapshot(m3)
    raises_errno(code, getattr(m3, call), *args)
    assert_unchanged(before, snapshot(m3))
    assert not m3.offline_nodes


def test_type_errors_and_one_node_machine():
    with ce.Machine(nodes=1, node_size="4MiB") as m:
        raises_errno(errno.EINVAL, m.offline_node, 0)
        raises_errno(errno.EINVAL, m.demote, 0, 1)
        with pytest.raises(TypeError):
            m.offline_node("0")
        with pytest.raises(TypeError):
            m.demote(0, 1.5)


def test_demote_takes_folios_in_page_table_order_up_to_nr_pages(m3):
    p = m3.spawn()
    q = m3.spawn()
    a = p.mmap(8 * PS, node=0)
    b = q.mmap(8 * PS, node=0)
    p.write(a, pattern(8 * PS))
    before = m3.vmstat
    assert m3.demote(0, 10) == 10
    assert nodes_of(p, a, 8) == [1] * 8 and nodes_of(q, b, 8) == [1, 1] + [0] * 6
    assert m3.vmstat["pgmigrate_success_demotion"] - before.get("pgmigrate_success_demotion", 0) == 10
    assert m3.demote(1, 0) == 0
    assert m3.demote(0, 100) == 6  # all that is left
    assert m3.demote(0, 100) == 0
    assert p.read(a, 8 * PS) == pattern(8 * PS)
    check_machine(m3)


def test_demote_whole_folios_only_and_pins_stay(m3):
    p = m3.spawn()
    a = p.mmap(64 * PS, node=0, folio_size="64KiB")  # 4 folios of 16 pages
    assert m3.demote(0, 20) == 16  # the second folio does not fit in the budget
    pin = p.pin(a + 16 * PS, PS)
    assert m3.demote(0, 48) == 32  # the pinned folio is left where it is
    assert p.node_of(a + 16 * PS) == 0 and p.node_of(a + 32 * PS) == 1
    pin.release()
    raises_errno(errno.EINVAL, m3.demote, 2, 1)
    m3.offline_node(2)
    assert m3.demote(0, 16) == 16  # node 1 is fine; its own target is offline:
    raises_errno(errno.EINVAL, m3.demote, 1, 1)
    check_machine(m3)


@settings(max_examples=20, deadline=None)
@given(ops=st.lists(st.tuples(st.sampled_from(["offline", "online", "demote", "pin", "write"]),
                              st.integers(0, 2), st.integers(0, 40)), min_size=1, max_size=8),
       seed=st.integers(0, 1000))
def test_property_no_byte_lost(ops, seed):
    with ce.Machine(nodes=3, node_size="4MiB") as m:
        p = m.spawn()
        sh = ShadowMemory(m)
        sh.spawn(p)
        rng = np.random.default_rng(seed)
        maps = []
        for node, fs in ((1, None), (2, "64KiB"), (1, None)):
            a = p.mmap(32 * PS, node=node, folio_size=fs)
            sh.mmap(p, a, 32 * PS, False)
            maps.append(a)
        pins = []
        for op, node, n in ops:
            if op == "write":
                a = maps[n % 3] + (n % 16) * PS
                data = rng.integers(0, 256, 3 * PS, dtype=np.uint8).tobytes()
                try:
                    p.write(a, data)
                    sh.write(p, a, data)
                except OSError as e:
                    assert e.errno == errno.ENOMEM  # its mapping's node is offline
            elif op == "pin" and len(pins) < 2:
                try:
                    pin = p.pin(maps[n % 3] + (n % 32) * PS, PS)
                except OSError as e:
                    assert e.errno == errno.ENOMEM
                else:
                    pins.append(pin)
                    sh.pin(pin)
            elif op == "online":
                m.online_node(node)
            elif op == "offline":
                try:
                    m.offline_node(node)
                    assert used(m, node) == 0  # nothing is left on it
                except OSError as e:
                    assert e.errno in (errno.EBUSY, errno.ENOMEM, errno.EINVAL)
                    assert node not in m.offline_nodes
                    if e.errno == errno.EINVAL:
                        assert node == 0 and m.nodes == 1
                    if e.errno == errno.EBUSY and node != 0:
                        assert pins  # only a pinned folio stays
            elif op == "demote":
                left = used(m, node)
                try:
                    got = m.demote(node, n)
                except OSError as e:
                    assert e.errno == errno.EINVAL and (node == 2 or node + 1 in m.offline_nodes)
                else:
                    assert 0 <= got <= n and used(m, node) == left - got
            check_machine(m, sh)
        for pin in pins:
            pin.release()
            sh.unpin(pin)
        check_machine(m, sh)


def test_move_pages_and_migrate_pages_refuse_an_offline_node(m3):
    p = m3.spawn()
    a = p.mmap(4 * PS, node=0)
    m3.offline_node(2)
    raises_errno(errno.ENODEV, p.move_pages, 0, [a], [2])  # do_pages_move: !node_state(N_MEMORY)
    raises_errno(errno.ENODEV, p.move_pages, 0, [a, a + PS], [2, 2])
    # the node has left every cpuset: EPERM without cap_sys_nice, dropped with it
    raises_errno(errno.EPERM, p.migrate_pages, 0, [0], [2])
    root = m3.spawn(cap_sys_nice=True)
    raises_errno(errno.EINVAL, root.migrate_pages, p.pid, [0], [2])
    assert used(m3, 2) == 0
