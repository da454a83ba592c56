"""Small helpers shared by the test modules (pytest puts tests/ on sys.path)."""
import numpy as np
import pytest

PS = 4096
#: the vmstat counters migration moves
MIG = ("pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
       "thp_migration_split")


def pattern(n, seed=0):
    """n reproducible pseudo-random bytes."""
    return np.random.default_rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def raises_errno(code, fn, *args, **kwargs):
    """Call fn, expect OSError with errno ``code``; return the exception."""
    with pytest.raises(OSError) as ei:
        fn(*args, **kwargs)
    assert ei.value.errno == code, f"expected errno {code}, got {ei.value.errno}: {ei.value}"
    return ei.value


def addrs(a, n, step=PS):
    return [a + i * step for i in range(n)]


def mig(m):
    v = m.vmstat
    return {k: v[k] for k in MIG}


def mig_delta(before, m, **expect):
    """Assert the migration counters changed by exactly ``expect`` (others by 0)."""
    now = mig(m)
    got = {k: now[k] - before[k] for k in MIG}
    want = {k: expect.get(k, 0) for k in MIG}
    assert got == want


def free(m):
    """Free base pages per node."""
    return [m.free_pages(n) for n in range(m.nodes)]


def process_alive(pid) -> bool:
    """True while ``pid`` runs (a zombie counts as gone)."""
    import os
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    with open(f"/proc/{pid}/stat") as f:
        return f.read().split()[2] != "Z"
