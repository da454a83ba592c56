"""The kit's check that an engine's small-job path and large-job path give identical results.

Engines copy a small job differently from a large one to keep its fixed cost down (the
threadpool engine's unplanned ``copy_small``, one thread instead of a pool, fewer
commands), and a job's size changes how it is cut (OpenCL segments are total / (channels *
DEPTH) bytes, so a folio lands in another segment and on another channel in a larger
job). Whatever the path, the plan must be the same: the same bytes copied, the same
poisoned folios left alone, the same status for every folio. The kernel has the same
concern where ``migrate_pages_batch`` copies one folio or a whole batch: the outcome of a
folio must not depend on its neighbours.

:func:`check_paths` draws random layouts (the ones of :mod:`.layouts`, at most 8 folios,
so at most 32 descriptors) and runs each twice on the same memory:

* once as it is (the small job), once padded with filler folios (48 of 4 KiB and three of
  1 MiB, before or after the layout's descriptors) in memory the layout does not use: more
  descriptors and bytes than the small-job thresholds of the bundled engines (the
  threadpool's is 16 descriptors), and enough bytes to change how opencl cuts segments;
* or, when the engine has a documented knob (``force_path``, see
  :class:`~.env.Options`), the same job once with ``force_path(engine, "small")`` and once
  with ``force_path(engine, "large")``.

The per-folio statuses must be equal, and memory byte for byte everywhere except the
filler's destinations; an engine that may decline folios (``may_decline``) is compared on
the folios both runs report 0. Then each run must also pass the kit's usual rules (a path
that agrees with a wrong path is still wrong). A disagreement raises
:class:`~.rules.ConformanceError` naming the first folio and byte that differ.
"""
from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

from ...engines.base import CopyJob
from .env import _hyp, _run_property, engine_env, run_engine
from .layouts import NODE_SIZE, PAGE, fill, layouts
from .rules import _check_outcome, _check_result, _fail

#: the kit machine of this check has nodes twice the usual size: layouts use the lower
#: half of memory as always, the filler the upper half
NODE = 2 * NODE_SIZE
#: filler folios: (size, count)
FILLER = ((PAGE, 48), (1 << 20, 3))
#: most folios in a compared layout (each cut into at most 4 descriptors)
MAX_FOLIOS = 8


def filler(nr_folios):
    """(src, dst, nbytes, folio) of the filler folios, numbered after ``nr_folios`` layout
    folios: sources from 2 * NODE_SIZE on, destinations from 3 * NODE_SIZE on, a page
    apart (so that they stay separate descriptors after any coalescing)."""
    s, d, n = [], [], []
    pos = 0
    for size, count in FILLER:
        for _ in range(count):
            s.append(2 * NODE_SIZE + pos)
            d.append(3 * NODE_SIZE + pos)
            n.append(size)
            pos += size + PAGE
    assert pos <= NODE_SIZE
    f = list(range(nr_folios, nr_folios + len(s)))
    return [np.array(x, np.int64) for x in (s, d, n, f)]


def padded_job(job, first=False) -> CopyJob:
    """``job`` with the filler folios' descriptors after (or, ``first``, before) its own."""
    pad = filler(job.nr_folios)
    own = (job.src_off, job.dst_off, job.nbytes, job.folio)
    arrays = [np.concatenate((p, o) if first else (o, p)) for o, p in zip(own, pad)]
    poisoned = np.concatenate((job.src_poisoned, np.zeros(len(pad[0]), bool)))
    return CopyJob(job.mem, *arrays, poisoned)


def _run(engine, job, path, opts):
    if opts.force_path is not None:
        opts.force_path(engine, path)
    return run_engine(engine, job, opts.timeout)


def _folio_at(job, offset):
    hit = np.flatnonzero((job.dst_off <= offset) & (offset < job.dst_off + job.nbytes))
    return int(job.folio[hit[0]]) if len(hit) else None


def compare_paths(m, engine, layout, seed, opts, pad_first=False):
    """Run one layout as a small and as a large job; raise ConformanceError when the
    statuses or the bytes differ, or when either run breaks the kit's rules."""
    mem = m.mem
    small = layout.job(mem)
    large = padded_job(small, pad_first) if opts.force_path is None else layout.job(mem)
    fill(mem, large, seed)
    before = mem.copy()
    how = ("forced through force_path" if opts.force_path is not None
           else f"padded with filler {'before' if pad_first else 'after'} it")
    ctx = f"engine {engine.name!r}, job: {layout.describe()}, large job {how}"
    res_a = _run(engine, small, "small", opts)
    mem_a = mem.copy()
    mem[:] = before
    res_b = _run(engine, large, "large", opts)
    mem_b = mem.copy()
    _check_result(res_a, small, "the small job's result")
    _check_result(res_b, large, "the large job's result")
    nf = small.nr_folios
    a, b = np.asarray(res_a), np.asarray(res_b)[:nf]
    same = np.ones(len(mem), bool)      # bytes both runs must agree on
    for d, n, f in zip(large.dst_off.tolist(), large.nbytes.tolist(), large.folio.tolist()):
        if f >= nf:
            same[d:d + n] = False        # the filler's destinations exist in one run only
    if opts.may_decline:
        for d, n, f in zip(small.dst_off.tolist(), small.nbytes.tolist(), small.folio.tolist()):
            if a[f] != 0 or b[f] != 0:
                same[d:d + n] = False    # declined in one run: the CPU copies it later
    else:
        differ = np.flatnonzero(a != b)
        if len(differ):
            f = int(differ[0])
            _fail(f"the small-job and large-job paths disagree: folio {f} reported {int(a[f])} "
                  f"as a small job and {int(b[f])} as a large one; {ctx}")
    diff = np.flatnonzero((mem_a != mem_b) & same)
    if len(diff):
        where = int(diff[0])
        _fail(f"the small-job and large-job paths disagree on {len(diff)} byte(s), first at "
              f"offset {where} (0x{where:x}, folio {_folio_at(small, where)}): "
              f"{int(mem_a[where])} as a small job, {int(mem_b[where])} as a large one; {ctx}")
    caps = engine.capabilities
    _check_outcome(mem, before, large, np.asarray(res_b), caps, opts.may_decline,
                   ctx + " (the large job)")
    mem[:] = mem_a
    _check_outcome(mem, before, small, np.asarray(res_a), caps, opts.may_decline,
                   ctx + " (the small job)")


def check_paths(opts):
    """Random layouts as small and as large jobs give identical statuses and bytes."""
    if opts.force_path is not None and not callable(opts.force_path):
        raise TypeError(f"force_path must be a callable(engine, 'small' | 'large') or None, "
                        f"not {type(opts.force_path).__name__}")
    with engine_env(opts, node_size=NODE) as (m, engine):
        @_hyp(opts, layouts(granule=opts.granule, max_folios=MAX_FOLIOS),
              st.integers(0, 2 ** 32 - 1), st.booleans())
        def run(layout, seed, pad_first):
            compare_paths(m, engine, layout, seed, opts, pad_first)
        _run_property(run)
