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


def set_auto_models(engine, models):
    """Replace auto's calibrated models (its candidates made first): spec -> (overhead s,
    bandwidth B/s[, cpus]). Returns the new table."""
    from copyengine.engines import auto_model
    engine._ensure()
    table = {spec: auto_model._Model(*m) for spec, m in models.items()}
    engine.models.clear()
    engine.models.update(table)
    return table


def auto_candidates_with(engine, monkeypatch, idle=64, **bandwidths):
    """auto with every candidate out of the way (1 s a batch) but those named (``mt_1=1e9``
    is mt:1 at 1 GB/s, 1 us overhead), ``idle`` CPUs free, its engine returned."""
    models = {spec: (1.0, 1e6) for spec in engine._ensure()}
    models.update({k.replace("_", ":"): (1e-6, bw) for k, bw in bandwidths.items()})
    set_auto_models(engine, models)
    monkeypatch.setattr(engine, "idle", lambda: idle)
    return engine
