"""The conformance kit's small-job / large-job check (copyengine.testing.conformance.paths):
engines whose two paths agree pass it, in both of its modes (a padded large job, or the
engine's force_path knob); a path that copies one byte less, or writes a poisoned folio's
destination that the other path leaves alone (allowed alone for an engine that is not
mc-safe, so no other check sees it), is caught and named as a disagreement."""
import errno

import numpy as np
import pytest

from copyengine.engines.base import Capabilities, CopyJob, Engine
from copyengine.testing import CHECKS, ConformanceError, EngineConformance, check_engine
from copyengine.testing.conformance import NODE_SIZE, PAGE, Options, check_paths, padded_job
from copyengine.testing.conformance.paths import FILLER, MAX_FOLIOS

NFILL = sum(count for _, count in FILLER)

pytestmark = pytest.mark.timeout(120)


class TwoPaths(Engine):
    """Jobs of at most ``small_limit`` descriptors copy descriptor by descriptor, larger
    ones in one vectorized pass over the kept descriptors; ``path`` forces one (the knob).
    ``bug`` breaks one path: "large drops a byte" or "small writes poisoned"."""

    capabilities = Capabilities(threads=1, mc_safe=False)
    small_limit = 16

    def __init__(self, bug=None):
        self.bug = bug
        self.path = None

    def copy(self, job):
        small = len(job.nbytes) <= self.small_limit if self.path is None else self.path == "small"
        mem, pois = job.mem, job.src_poisoned
        if small:
            for s, d, n, f in zip(job.src_off.tolist(), job.dst_off.tolist(),
                                  job.nbytes.tolist(), job.folio.tolist()):
                if not pois[f] or self.bug == "small writes poisoned":
                    mem[d:d + n] = mem[s:s + n]
        else:
            keep = np.flatnonzero(~pois[job.folio])
            nb = job.nbytes.copy()
            if self.bug == "large drops a byte":
                # a byte of the compared layout's folios, not of the kit's filler
                layout = job.nr_folios - (NFILL if job.nr_folios > MAX_FOLIOS else 0)
                mine = keep[job.folio[keep] < layout]
                if len(mine):
                    nb[mine[0]] -= 1
            for i in keep.tolist():
                s, d, n = int(job.src_off[i]), int(job.dst_off[i]), int(nb[i])
                mem[d:d + n] = mem[s:s + n]
        return np.where(pois, -errno.EIO, 0).astype(np.int32)


def _force(engine, path):
    engine.path = path


def _opts(bug=None, knob=False, examples=40):
    # a bug is reported as first found: shrinking it only costs time here
    return Options(lambda m: TwoPaths(bug), granule=1, max_examples=examples,
                   force_path=_force if knob else None, shrink=bug is None)


@pytest.mark.parametrize("knob", [False, True])
def test_agreeing_paths_pass(knob):
    check_paths(_opts(knob=knob))


@pytest.mark.parametrize("knob", [False, True])
def test_a_large_path_that_drops_a_byte_is_caught(knob):
    with pytest.raises(ConformanceError, match="paths disagree on 1 byte"):
        check_paths(_opts("large drops a byte", knob))


@pytest.mark.parametrize("knob", [False, True])
def test_a_small_path_that_writes_a_poisoned_destination_is_caught(knob):
    """Each run alone is allowed (not mc-safe: -EIO, destination may be written), so only
    the comparison sees it."""
    with pytest.raises(ConformanceError, match="paths disagree on [0-9]+ byte"):
        check_paths(_opts("small writes poisoned", knob, examples=80))


def test_check_engine_runs_the_new_check_with_its_knob():
    assert "small_large_paths" in CHECKS
    out = check_engine(lambda m: TwoPaths(), granule=1, max_examples=5, force_path=_force,
                       only=["small_large_paths"])
    assert out == {"small_large_paths": "passed"}
    with pytest.raises(ConformanceError, match="disagree"):
        check_engine(lambda m: TwoPaths("large drops a byte"), granule=1, max_examples=20,
                     force_path=_force, only=["small_large_paths"], shrink=False)


def test_force_path_must_be_callable():
    with pytest.raises(TypeError, match="force_path must be a callable"):
        check_engine(lambda m: TwoPaths(), force_path="small", only=["small_large_paths"])


def test_padded_job_keeps_the_layout_and_adds_clean_filler():
    s = np.array([PAGE, 3 * PAGE], np.int64)
    d = np.array([NODE_SIZE, NODE_SIZE + 8 * PAGE], np.int64)
    n = np.array([PAGE, 2 * PAGE], np.int64)
    f = np.array([0, 1], np.int64)
    job = CopyJob(None, s, d, n, f, np.array([True, False]))
    nfill = NFILL
    for first in (False, True):
        big = padded_job(job, first)
        assert big.nr_folios == 2 + nfill
        assert big.src_poisoned.tolist() == [True, False] + [False] * nfill
        own = slice(nfill, None) if first else slice(0, 2)
        assert big.src_off[own].tolist() == s.tolist() and big.folio[own].tolist() == [0, 1]
        pad = np.flatnonzero(big.folio >= 2)
        assert len(pad) == nfill and (big.src_off[pad] >= 2 * NODE_SIZE).all()
        assert (big.dst_off[pad] + big.nbytes[pad] <= 4 * NODE_SIZE).all()
        assert big.nbytes[pad].sum() > 3 << 20     # more bytes than any layout has


class TestTwoPathsKnob(EngineConformance):
    """The whole kit on an engine with a force_path knob (its paths agree)."""
    engine_factory = staticmethod(lambda m: TwoPaths())
    force_path = staticmethod(_force)
    granule = 1
    max_examples = 20
