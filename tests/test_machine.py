"""Machine construction, lifecycle, memory footprint, vmstat and the zero page."""
import gc

import numpy as np
import pytest

import copyengine as ce
from copyengine.mm.memmap import PG_reserved

MiB = 1 << 20
GiB = 1 << 30


def vmrss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


# ----------------------------------------------------------------------------- construction
@pytest.mark.parametrize("nodes,node_size,page_size,exp_node,exp_page", [
    (2, "32MiB", "4KiB", 32 * MiB, 4096),
    (2, 32 * MiB, 4096, 32 * MiB, 4096),
    (1, "2MiB", "4KiB", 2 * MiB, 4096),
    (3, "8MiB", "64KiB", 8 * MiB, 65536),
    (2, 64 * MiB, 65536, 64 * MiB, 65536),
    (4, "4 MiB", "64kib", 4 * MiB, 65536),
    (np.int64(2), "2MiB", np.int64(4096), 2 * MiB, 4096),
])
def test_construction(nodes, node_size, page_size, exp_node, exp_page):
    with ce.Machine(nodes=nodes, node_size=node_size, page_size=page_size) as m:
        assert m.nodes == int(nodes) and type(m.nodes) is int
        assert m.node_size == exp_node
        assert m.page_size == exp_page
        assert m.frames_per_node == exp_node // exp_page
        assert m.total_frames == m.nodes * m.frames_per_node
        assert m.mem.dtype == np.uint8 and m.mem.size == m.nodes * exp_node
        # node i owns pfns [i * fpn, (i + 1) * fpn)
        fpn = m.frames_per_node
        assert [m.node_of_pfn(i * fpn) for i in range(m.nodes)] == list(range(m.nodes))
        assert m.node_of_pfn(fpn - 1) == 0
        # every frame is free except the zero page (frame 0 of node 0)
        assert m.zero_pfn == 0
        assert m.free_pages(0) == fpn - 1
        for n in range(1, m.nodes):
            assert m.free_pages(n) == fpn
        assert m.free_pages() == m.total_frames - 1
        assert m.engine_spec == "auto"  # the default engine
        assert "Machine" in repr(m)


def test_defaults():
    with ce.Machine() as m:
        assert (m.nodes, m.node_size, m.page_size) == (2, 256 * MiB, 4096)
        assert m.hpage_pmd_nr == 512 and m.max_order == 9


def test_64k_geometry(machine64k):
    m = machine64k
    assert m.page_size == 65536
    assert m.max_order == 5                       # 2 MiB folios are order 5 of 64 KiB
    assert m.frames_per_node == 1024
    p = m.spawn()
    a = p.mmap(1)                                  # rounded up to one 64 KiB page
    assert a % 65536 == 0
    assert m.free_pages() == m.total_frames - 2
    b = p.mmap(2 * MiB, folio_size="2MiB")
    assert b % (2 * MiB) == 0
    h = p.pfn_of(b)
    assert h % 32 == 0 and m.mem_map.order[h] == 5
    p.write(b + 65530, b"0123456789ab")
    assert p.read(b + 65530, 12) == b"0123456789ab"
    p.exit()
    assert m.free_pages() == m.total_frames - 1


@pytest.mark.parametrize("kwargs,exc", [
    (dict(nodes=0), ValueError),
    (dict(nodes=-1), ValueError),
    (dict(nodes=65), ValueError),
    (dict(nodes=True), TypeError),
    (dict(nodes=2.0), TypeError),
    (dict(nodes="2"), TypeError),
    (dict(nodes=None), TypeError),
    (dict(node_size=0), ValueError),
    (dict(node_size=-2 * MiB), ValueError),
    (dict(node_size="3MiB"), ValueError),          # not a multiple of the 2 MiB largest folio
    (dict(node_size=MiB), ValueError),
    (dict(node_size=2 * MiB + 4096), ValueError),
    (dict(node_size="lots"), ValueError),
    (dict(node_size="2MB"), ValueError),
    (dict(node_size=2.0 * MiB), TypeError),
    (dict(node_size=None), TypeError),
    (dict(page_size="8KiB"), ValueError),
    (dict(page_size=2 * MiB), ValueError),
    (dict(page_size="2MiB"), ValueError),
    (dict(page_size=0), ValueError),
    (dict(page_size="4KB"), ValueError),
    (dict(page_size=4096.0), TypeError),
    (dict(page_size=True), TypeError),
    (dict(engine="no-such-engine"), ValueError),
])
def test_bad_construction(kwargs, exc):
    args = dict(nodes=1, node_size="2MiB")
    args.update(kwargs)
    with pytest.raises(exc):
        ce.Machine(**args)


# ----------------------------------------------------------------------------- lifecycle
def test_context_manager_closes():
    with ce.Machine(nodes=1, node_size="2MiB") as m:
        assert not m.closed
        p = m.spawn()
        a = p.mmap(4096)
        p.write(a, b"x")
    assert m.closed
    assert "closed" in repr(m)
    with pytest.raises(ValueError):
        m.spawn()
    with pytest.raises((ValueError, OSError)):
        p.read(a, 1)
    with pytest.raises((ValueError, OSError)):
        p.mmap(4096)
    with pytest.raises(ValueError):
        m.hwpoison(1)
    with pytest.raises(ValueError):
        m.set_engine("serial")


def test_context_manager_closes_on_exception():
    with pytest.raises(KeyError):
        with ce.Machine(nodes=1, node_size="2MiB") as m:
            raise KeyError("boom")
    assert m.closed


def test_close_is_idempotent():
    m = ce.Machine(nodes=1, node_size="2MiB")
    m.close()
    m.close()
    assert m.closed
    with m:          # entering a closed machine and leaving it again is harmless
        pass
    assert m.closed
    assert isinstance(m.vmstat, dict)   # counters stay readable


def test_close_while_a_view_is_held():
    m = ce.Machine(nodes=1, node_size="2MiB")
    p = m.spawn()
    a = p.mmap(8192)
    p.write(a, b"held")
    view = m.mem[:4096]        # someone (an engine, a test) still holds a view
    m.close()
    m.close()
    assert m.closed
    del view


def test_huge_machine_is_cheap():
    gc.collect()
    before = vmrss()
    with ce.Machine(nodes=2, node_size="32GiB") as m:
        assert m.total_frames == 2 * (32 * GiB // 4096)
        assert m.free_pages() == m.total_frames - 1
        assert m.free_pages(1) == 32 * GiB // 4096
        p = m.spawn()
        a = p.mmap(GiB, node=1, populate=False)
        p.write(a + GiB // 2 + 17, b"far away")
        assert p.read(a + GiB // 2 + 17, 8) == b"far away"
        assert p.node_of(a + GiB // 2) == 1
        assert m.free_pages(1) == 32 * GiB // 4096 - 1
        grown = vmrss() - before
        assert grown < 600 * MiB, f"a 64 GiB machine made this process grow {grown / MiB:.0f} MiB"
        p.exit()
        assert m.free_pages() == m.total_frames - 1


# ----------------------------------------------------------------------------- vmstat
DOCUMENTED = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
              "thp_migration_split")


def test_vmstat_plain_ints(machine):
    p = machine.spawn()
    a = p.mmap(64 << 10, folio_size="64KiB")
    p.write(a, b"abc")
    v = machine.vmstat
    assert isinstance(v, dict)
    for k in DOCUMENTED:
        assert k in v
    for k, val in v.items():
        assert isinstance(k, str)
        assert type(val) is int, (k, type(val))
    assert all(v[k] == 0 for k in DOCUMENTED)
    assert v["nr_free_pages"] == machine.free_pages()


def test_vmstat_is_a_snapshot(machine):
    v = machine.vmstat
    v["pgfault"] = 12345
    v["invented"] = 1
    assert machine.vmstat["pgfault"] == 0
    assert "invented" not in machine.vmstat


def test_vmstat_counts_faults_and_allocations(machine):
    m = machine
    p = m.spawn()
    v0 = m.vmstat
    a = p.mmap(10 * 4096, populate=False)
    assert m.vmstat == v0
    p.write(a, b"x" * (3 * 4096))
    v1 = m.vmstat
    assert v1["pgfault"] - v0["pgfault"] == 3
    assert v1["pgalloc"] - v0["pgalloc"] == 3
    assert v1["nr_free_pages"] == v0["nr_free_pages"] - 3
    p.read(a + 5 * 4096, 1)                   # the zero page: a fault, no allocation
    v2 = m.vmstat
    assert v2["pgfault"] - v1["pgfault"] == 1
    assert v2["pgalloc"] == v1["pgalloc"]
    p.write(a, b"y")                          # already mapped writable: no fault
    assert m.vmstat == v2
    p.munmap(a, 10 * 4096)
    v3 = m.vmstat
    assert v3["pgfree"] - v2["pgfree"] == 3
    assert v3["nr_free_pages"] == v0["nr_free_pages"]


# ----------------------------------------------------------------------------- zero page
def test_zero_page_is_reserved_for_life(machine):
    m = machine
    z = m.zero_pfn
    assert m.mem_map.flags[z] & PG_reserved
    assert not m.buddy.is_free(z)
    # allocate everything on node 0: the zero page is never among the frames handed out
    heads = m.alloc_folios(0, 0, m.free_pages(0))
    assert z not in set(heads.tolist())
    assert m.free_pages(0) == 0
    m.free_folios(heads)
    assert m.free_pages(0) == m.frames_per_node - 1
    assert not m.buddy.is_free(z)
    assert not m.mem[z * m.page_size:(z + 1) * m.page_size].any()


def test_spawn_validation(machine):
    m = machine
    p = m.spawn(uid=0, cap_sys_nice=True, mems_allowed=[1])
    assert p.pid >= 1 and type(p.pid) is int
    assert p.mems_allowed == frozenset({1})
    q = m.spawn()
    assert q.pid != p.pid
    for kwargs, exc in [(dict(uid=-1), ValueError), (dict(uid="0"), TypeError),
                        (dict(uid=True), TypeError), (dict(cap_sys_nice=1), TypeError),
                        (dict(mems_allowed=[2]), ValueError), (dict(mems_allowed=[]), ValueError),
                        (dict(mems_allowed="0"), TypeError), (dict(mems_allowed=[0.0]), TypeError),
                        (dict(mems_allowed=5), TypeError)]:
        n = len(m.processes)
        with pytest.raises(exc):
            m.spawn(**kwargs)
        assert len(m.processes) == n


# ----------------------------------------------------------------------------- host limits (issue 14)
def _mem_available():
    from copyengine.machine import _meminfo
    return _meminfo().get("MemAvailable")


def test_machine_larger_than_the_host_can_describe_is_refused_up_front():
    from copyengine.machine import METADATA_BYTES_PER_FRAME
    avail = _mem_available()
    if avail is None:
        pytest.skip("no /proc/meminfo")
    # Frames whose metadata exceeds what the host has available.
    frames = 2 * avail // METADATA_BYTES_PER_FRAME   # twice: other processes come and go
    node_size = -(-frames * 4096 // (2 * MiB)) * (2 * MiB)
    gc.collect()
    before = vmrss()
    quarter = -(-node_size // 4 // (2 * MiB)) * (2 * MiB)
    cases = [dict(nodes=1, node_size=node_size), dict(nodes=4, node_size=quarter)]
    if 2 * (4 << 40) // 4096 * METADATA_BYTES_PER_FRAME > avail:
        cases.append(dict(nodes=2, node_size="4TiB"))
    for kwargs in cases:
        with pytest.raises(ValueError, match="MemAvailable") as ei:
            ce.Machine(**kwargs)
        assert "bytes available" in str(ei.value) and "66 per frame" in str(ei.value)
    assert vmrss() - before < 64 * MiB   # refused before anything was allocated


def test_rlimit_as_is_honoured():
    import subprocess
    import sys
    code = ("import resource, copyengine as ce\n"
            "used = int([l for l in open('/proc/self/status') if l.startswith('VmSize')][0].split()[1]) * 1024\n"
            "resource.setrlimit(resource.RLIMIT_AS, (used + (1 << 30), resource.RLIM_INFINITY))\n"
            "ce.Machine(nodes=1, node_size='64MiB').close()\n"
            "try:\n    ce.Machine(nodes=2, node_size='1GiB')\n"
            "except ValueError as e:\n    print('refused:', e)\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "refused:" in r.stdout and "RLIMIT_AS" in r.stdout, r.stdout


def test_closed_machine_errors_are_of_the_contracts_kind():
    import errno
    m = ce.Machine(nodes=2, node_size="4MiB")
    p = m.spawn()
    a = p.mmap(4096)
    m.close()
    syscalls = (lambda: p.read(a, 1), lambda: p.write(a, b"x"), lambda: p.mmap(4096),
                lambda: p.munmap(a, 4096), lambda: p.move_pages(0, [a], [1]),
                lambda: p.migrate_pages(0, [0], [1]), lambda: p.pin(a, 1), lambda: p.node_of(a),
                lambda: p.pfn_of(a))
    for call in syscalls:
        with pytest.raises(OSError) as ei:
            call()
        assert ei.value.errno == errno.ENXIO and "closed" in str(ei.value)
        assert isinstance(ei.value, ce.MachineClosedError)
    for call in (lambda: m.spawn(), lambda: m.set_engine("serial"), lambda: m.hwpoison(5), lambda: p.fork()):
        with pytest.raises(ValueError, match="closed"):
            call()
