"""mbind(2) (migrate/mempolicy.py): the man page's cases, policies that later faults
follow, MPOL_MF_MOVE / MOVE_ALL / STRICT as do_mbind, bad input refused with nothing
changed, and a hypothesis property: no byte lost, every page where the policy says or
the call said why not."""
import errno

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import copyengine as ce
from copyengine.testing.invariants import ShadowMemory, assert_unchanged, check_machine, snapshot
from helpers import PS, pattern, raises_errno


def nodes_of(p, a, n):
    return [p.node_of(a + i * PS) for i in range(n)]


@pytest.fixture
def m3():
    with ce.Machine(nodes=3, node_size="16MiB") as m:
        yield m


def test_constants_have_linux_values():
    assert (ce.MPOL_DEFAULT, ce.MPOL_PREFERRED, ce.MPOL_BIND, ce.MPOL_INTERLEAVE, ce.MPOL_LOCAL) == (0, 1, 2, 3, 4)


def test_bind_move_migrates_the_range_only_and_splits_the_vma(m3):
    p = m3.spawn()
    a = p.mmap(32 * PS)
    data = pattern(32 * PS)
    p.write(a, data)
    before = m3.vmstat
    p.mbind(a + 8 * PS, 8 * PS, ce.MPOL_BIND, [2], ce.MPOL_MF_MOVE)
    assert nodes_of(p, a, 32) == [0] * 8 + [2] * 8 + [0] * 16
    assert [(v.start - a) // PS for v in p.vmas] == [0, 8, 16]  # split at both edges
    p.mbind(a + 8 * PS, 8 * PS, ce.MPOL_DEFAULT, [])
    assert len(p.vmas) == 1 and p.vmas[0].end == a + 32 * PS  # alike again: merged
    p.mbind(a + 8 * PS, 8 * PS, ce.MPOL_BIND, [2], ce.MPOL_MF_MOVE)
    assert [v.policy and v.policy.mode for v in p.vmas] == [None, ce.MPOL_BIND, None]
    assert p.read(a, 32 * PS) == data
    after = m3.vmstat
    assert after["pgmigrate_success_mempolicy_mbind"] - before.get("pgmigrate_success_mempolicy_mbind", 0) == 8
    check_machine(m3)


def test_policy_without_move_leaves_pages_but_steers_new_faults(m3):
    p = m3.spawn()
    a = p.mmap(16 * PS, populate=False)
    p.write(a, b"a" * PS)  # page 0 faulted on node 0 before the policy
    p.mbind(a, 16 * PS, ce.MPOL_BIND, [1])
    p.write(a, b"b" * 16 * PS)
    assert nodes_of(p, a, 16) == [0] + [1] * 15
    check_machine(m3)


def test_interleave_round_robin_by_page_offset(m3):
    p = m3.spawn()
    a = p.mmap(12 * PS, populate=False)
    p.mbind(a, 12 * PS, ce.MPOL_INTERLEAVE, [0, 2])
    p.write(a, b"z" * 12 * PS)
    pgoff = p.vmas[0].pgoff
    # interleave_nid: the (ilx % weight)-th node of the mask, ilx the page offset
    assert nodes_of(p, a, 12) == [(0, 2)[(pgoff + i) % 2] for i in range(12)]
    check_machine(m3)


def test_interleave_move_moves_only_pages_off_the_mask(m3):
    p = m3.spawn()
    a = p.mmap(8 * PS, node=1)
    p.mbind(a, 8 * PS, ce.MPOL_INTERLEAVE, [0, 2], ce.MPOL_MF_MOVE)
    pgoff = p.vmas[0].pgoff
    assert nodes_of(p, a, 8) == [(0, 2)[(pgoff + i) % 2] for i in range(8)]
    check_machine(m3)


def test_preferred_falls_back_when_the_node_is_full(m3):
    p = m3.spawn()
    hog = p.mmap(m3.free_pages(1) * PS, node=1)  # node 1 full
    a = p.mmap(4 * PS, populate=False)
    p.mbind(a, 4 * PS, ce.MPOL_PREFERRED, [1])
    p.write(a, b"q" * 4 * PS)
    assert nodes_of(p, a, 4) == [2] * 4  # the next node after the preferred one
    b = p.mmap(4 * PS, populate=False)
    p.mbind(b, 4 * PS, ce.MPOL_BIND, [1])
    raises_errno(errno.ENOMEM, p.write, b, b"q")  # BIND has nowhere else to go
    p.munmap(hog, PS)
    p.write(b, b"q")
    assert p.node_of(b) == 1
    check_machine(m3)


def test_default_and_local_reset_the_policy(m3):
    p = m3.spawn()
    a = p.mmap(4 * PS, populate=False)
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [2])
    p.mbind(a, 4 * PS, ce.MPOL_DEFAULT, [])
    p.write(a, b"d" * 4 * PS)
    assert nodes_of(p, a, 4) == [0] * 4
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [2], ce.MPOL_MF_MOVE)
    assert nodes_of(p, a, 4) == [2] * 4
    p.mbind(a, 4 * PS, ce.MPOL_LOCAL, (), ce.MPOL_MF_MOVE)  # back to the mapping's node
    assert nodes_of(p, a, 4) == [0] * 4 and p.vmas[0].policy is None
    check_machine(m3)


def test_shared_pages_skipped_with_move_moved_with_move_all(m3):
    p = m3.spawn(cap_sys_nice=True)
    a = p.mmap(4 * PS)
    p.write(a, pattern(4 * PS))
    c = p.fork()  # copy-on-write: every page mapped twice
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [1], ce.MPOL_MF_MOVE | ce.MPOL_MF_STRICT)  # not a failure
    assert nodes_of(p, a, 4) == [0] * 4
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [1], ce.MPOL_MF_MOVE_ALL)
    assert nodes_of(p, a, 4) == [1] * 4 and nodes_of(c, a, 4) == [1] * 4
    assert c.read(a, 4 * PS) == p.read(a, 4 * PS) == pattern(4 * PS)
    check_machine(m3)


def test_strict_without_move_is_eio_after_setting_the_policy(m3):
    p = m3.spawn()
    a = p.mmap(4 * PS)
    raises_errno(errno.EIO, p.mbind, a, 4 * PS, ce.MPOL_BIND, [1], ce.MPOL_MF_STRICT)
    assert p.vmas[0].policy.nodes == (1,)  # do_mbind applies the policy, then reports
    assert nodes_of(p, a, 4) == [0] * 4
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [0], ce.MPOL_MF_STRICT)  # every page conforms: fine
    check_machine(m3)


def test_strict_move_pinned_page_is_eio_the_rest_moves(m3):
    p = m3.spawn()
    a = p.mmap(4 * PS)
    pin = p.pin(a + PS, PS)
    raises_errno(errno.EIO, p.mbind, a, 4 * PS, ce.MPOL_BIND, [2], ce.MPOL_MF_MOVE | ce.MPOL_MF_STRICT)
    assert nodes_of(p, a, 4) == [2, 0, 2, 2]
    pin.release()
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [2], ce.MPOL_MF_MOVE | ce.MPOL_MF_STRICT)
    assert nodes_of(p, a, 4) == [2] * 4
    check_machine(m3)


def test_policy_survives_fork_and_munmap_split(m3):
    p = m3.spawn()
    a = p.mmap(8 * PS, populate=False)
    p.mbind(a, 8 * PS, ce.MPOL_BIND, [2])
    p.munmap(a + 2 * PS, PS)
    c = p.fork()
    p.write(a, b"1")
    p.write(a + 4 * PS, b"1")
    c.write(a + 6 * PS, b"1")
    assert p.node_of(a) == p.node_of(a + 4 * PS) == c.node_of(a + 6 * PS) == 2
    check_machine(m3)


def test_large_folios_follow_the_policy(m3):
    p = m3.spawn()
    a = p.mmap(1 << 21, folio_size="64KiB", populate=False)
    p.mbind(a, 1 << 21, ce.MPOL_INTERLEAVE, [1, 2])
    p.write(a, pattern(1 << 21))
    v = p.vmas[0]
    per = 16  # pages per 64 KiB folio: one node per folio (ilx = pgoff >> order)
    want = [(1, 2)[((v.pgoff + i) >> 4) % 2] for i in range(0, 512, per)]
    assert [p.node_of(a + i * PS) for i in range(0, 512, per)] == want
    assert p.read(a, 1 << 21) == pattern(1 << 21)
    check_machine(m3)


BAD = [
    (errno.EINVAL, dict(mode=7)),                                   # no such mode
    (errno.EINVAL, dict(flags=8)),                                  # unknown flag
    (errno.EINVAL, dict(off=1)),                                    # unaligned addr
    (errno.EINVAL, dict(mode=ce.MPOL_BIND, nodes=[])),              # empty mask
    (errno.EINVAL, dict(mode=ce.MPOL_INTERLEAVE, nodes=[])),
    (errno.EINVAL, dict(mode=ce.MPOL_DEFAULT, nodes=[1])),          # nodes for DEFAULT
    (errno.EINVAL, dict(mode=ce.MPOL_LOCAL, nodes=[1])),
    (errno.EINVAL, dict(nodes=[3])),                                # no such node
    (errno.EINVAL, dict(nodes=[-1])),
    (errno.EINVAL, dict(length=-PS)),
    (errno.EPERM, dict(flags=ce.MPOL_MF_MOVE_ALL)),                 # needs cap_sys_nice
    (errno.EFAULT, dict(length=64 * PS)),                           # runs past the mapping
    (errno.EFAULT, dict(off=-PS)),                                  # starts before it
]


@pytest.mark.parametrize("code,kw", BAD)
def test_bad_input_changes_nothing(m3, code, kw):
    p = m3.spawn()
    a = p.mmap(8 * PS)
    p.mmap(8 * PS)  # the guard gap after the first mapping is a hole
    args = dict(mode=ce.MPOL_BIND, nodes=[1], flags=ce.MPOL_MF_MOVE, length=8 * PS, off=0)
    args.update(kw)
    before = snapshot(m3)
    policies = [v.policy for v in p.vmas]
    raises_errno(code, p.mbind, a + args["off"], args["length"], args["mode"], args["nodes"], args["flags"])
    assert_unchanged(before, snapshot(m3))
    assert [v.policy for v in p.vmas] == policies
    check_machine(m3)


def test_type_errors_and_cpuset(m3):
    p = m3.spawn(mems_allowed=[0, 1])
    a = p.mmap(4 * PS)
    with pytest.raises(TypeError):
        p.mbind(a, 4 * PS, ce.MPOL_BIND, "1")
    with pytest.raises(TypeError):
        p.mbind(a, 4 * PS, ce.MPOL_BIND, [1.0])
    raises_errno(errno.EINVAL, p.mbind, a, 4 * PS, ce.MPOL_BIND, [2])  # only outside the cpuset
    p.mbind(a, 4 * PS, ce.MPOL_BIND, [1, 2], ce.MPOL_MF_MOVE)  # the cpuset's part is kept
    assert p.vmas[0].policy.nodes == (1,) and nodes_of(p, a, 4) == [1] * 4
    p.mbind(a, 0, ce.MPOL_BIND, [0])  # an empty range: nothing to do
    assert p.vmas[0].policy.nodes == (1,)


def shadow_recut(sh, p):
    """mbind splits and merges VMAs: cut the shadow's segments of ``p`` the same way
    (contents untouched: each piece is a view of the segment that held its start)."""
    from copyengine.testing.invariants import _Seg
    old = sh.procs[p.pid]
    out = []
    for v in p.vmas:
        s = next(s for s in old if s.start <= v.start < s.end)
        assert v.end <= max(x.end for x in old if x.buf is s.buf)
        out.append(_Seg(v.start, v.end, s.shared, s.buf, s.off + v.start - s.start))
    sh.procs[p.pid] = out


MODES = st.sampled_from([ce.MPOL_DEFAULT, ce.MPOL_PREFERRED, ce.MPOL_BIND, ce.MPOL_INTERLEAVE, ce.MPOL_LOCAL])


@settings(max_examples=25, deadline=None)
@given(ops=st.lists(st.tuples(st.integers(0, 15), st.integers(1, 16), MODES,
                              st.sets(st.integers(0, 2), max_size=3),
                              st.sampled_from([0, ce.MPOL_MF_MOVE, ce.MPOL_MF_MOVE | ce.MPOL_MF_STRICT,
                                               ce.MPOL_MF_MOVE_ALL]),
                              st.booleans()), min_size=1, max_size=6),
       seed=st.integers(0, 1000))
def test_property_no_byte_lost_pages_follow_policy(ops, seed):
    with ce.Machine(nodes=3, node_size="8MiB") as m:
        p = m.spawn(cap_sys_nice=True)
        sh = ShadowMemory(m)
        sh.spawn(p)
        a = p.mmap(16 * PS, populate=False)
        sh.mmap(p, a, 16 * PS, False)
        rng = np.random.default_rng(seed)
        c = None
        for start, n, mode, nodes, flags, fork in ops:
            n = min(n, 16 - start)
            if fork and c is None:
                c = p.fork()
                sh.fork(p, c)
            data = rng.integers(0, 256, 2 * PS, dtype=np.uint8).tobytes()
            at = a + int(rng.integers(0, 15)) * PS
            p.write(at, data)
            sh.write(p, at, data)
            nodes = sorted(nodes)
            try:
                p.mbind(a + start * PS, n * PS, mode, nodes, flags)
            except OSError as e:
                shadow_recut(sh, p)
                bad_nodes = (mode in (ce.MPOL_BIND, ce.MPOL_INTERLEAVE) and not nodes) or \
                    (mode in (ce.MPOL_DEFAULT, ce.MPOL_LOCAL) and nodes)
                assert (e.errno == errno.EINVAL and bad_nodes) or \
                    (e.errno == errno.EIO and flags & ce.MPOL_MF_STRICT), e
                continue
            shadow_recut(sh, p)
            if flags & (ce.MPOL_MF_MOVE | ce.MPOL_MF_MOVE_ALL) and mode in (ce.MPOL_BIND, ce.MPOL_INTERLEAVE,
                                                                          ce.MPOL_PREFERRED) and nodes:
                allowed = {nodes[0]} if mode == ce.MPOL_PREFERRED else set(nodes)
                for i in range(start, start + n):
                    vma = p.find_vma(a + i * PS)
                    ptes = vma.ptes[(a + i * PS - vma.start) // PS]
                    if not ptes:
                        continue
                    node = p.node_of(a + i * PS)
                    shared = int(m.mem_map.mapcount[p.pfn_of(a + i * PS)]) > 1
                    # a page off the policy is only one another process shares (MOVE skips
                    # it) or one a node without room could not take
                    assert node in allowed or (shared and not flags & ce.MPOL_MF_MOVE_ALL) or \
                        m.free_pages(min(allowed)) < 16, (i, node, allowed)
            check_machine(m, sh)
