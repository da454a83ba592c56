"""The kit's front ends: :data:`CHECKS` by name, :func:`check_engine` (no pytest needed) and
:class:`EngineConformance`, the pytest base class whose ``test_*`` methods run them."""
from __future__ import annotations

from ...errors import EngineUnavailable
from .checks import (check_cancel_no_write, check_capabilities, check_concurrent_jobs,
                     check_empty_job, check_framework_path, check_poisoned_folio,
                     check_random_jobs, check_timeout)
from .env import Options
from .paths import check_paths

CHECKS = {
    "capabilities": check_capabilities,
    "empty_job": check_empty_job,
    "random_jobs": check_random_jobs,
    "poisoned_folio": check_poisoned_folio,
    "framework_path": check_framework_path,
    "concurrent_jobs": check_concurrent_jobs,
    "cancel_no_write": check_cancel_no_write,
    "timeout": check_timeout,
    "small_large_paths": check_paths,
}


def check_engine(spec_or_factory, *, plugins=(), granule=8, may_decline=False, timeout=30.0,
                 max_examples=None, only=None, shrink=True, force_path=None) -> dict:
    """Run the conformance checks on an engine; raise :class:`ConformanceError` at the
    first violation. ``spec_or_factory`` is a spec string or a callable(machine) ->
    Engine. Returns ``{check name: "passed" or "skipped: why"}``. ``timeout``: seconds an
    asynchronous job may take before the kit calls it hung (as
    :attr:`EngineConformance.timeout`). ``only``: a list of check names (see :data:`CHECKS`).
    ``shrink=False`` reports the first failing example as found (a hung engine costs
    ``timeout`` per example hypothesis tries while shrinking). ``force_path``: a
    callable(engine, "small" | "large") making the engine take that path (see
    :class:`Options`), for ``small_large_paths``."""
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise ValueError(f"timeout must be a positive number of seconds, got {timeout!r}")
    opts = Options(spec_or_factory, tuple(plugins), granule, may_decline, float(timeout),
                   max_examples=max_examples, shrink=bool(shrink), force_path=force_path)
    out = {}
    for name, fn in CHECKS.items():
        if only is not None and name not in only:
            continue
        skipped = fn(opts)
        out[name] = f"skipped: {skipped}" if skipped else "passed"
    return out


class EngineConformance:
    """Subclass in a pytest module (name it ``Test...``) and set ``engine_spec`` or
    ``engine_factory``; every ``test_*`` method is one check of the kit."""

    engine_spec: str | None = None
    #: callable(machine) -> Engine, used when engine_spec is None (wrap in staticmethod)
    engine_factory = None
    #: plugins to register (modules, objects or dotted names) besides the installed ones
    plugins: tuple = ()
    #: descriptor offsets and lengths are multiples of this (1: any byte)
    granule: int = 8
    #: clean folios may report an errno (the engine leaves them to the CPU fallback)
    may_decline: bool = False
    #: seconds an asynchronous job may take before the kit calls it hung
    timeout: float = 30.0
    #: hypothesis examples per property (None: the active hypothesis profile's)
    max_examples: int | None = None
    #: skip (rather than fail) every check when the engine raises EngineUnavailable here
    skip_unavailable: bool = True
    #: callable(engine, "small" | "large") that makes the engine take that path (wrap in
    #: staticmethod); None: test_small_and_large_paths compares the job alone and padded
    force_path = None

    def conformance_options(self) -> Options:
        spec = self.engine_spec if self.engine_spec is not None else self.engine_factory
        return Options(spec, tuple(self.plugins), self.granule, self.may_decline,
                       self.timeout, max_examples=self.max_examples,
                       force_path=self.force_path)

    def _run(self, fn):
        import pytest
        try:
            skipped = fn(self.conformance_options())
        except EngineUnavailable as e:
            if not self.skip_unavailable:
                raise
            pytest.skip(f"engine unavailable here: {e}")
        if skipped:
            pytest.skip(skipped)

    def test_capabilities(self):
        self._run(check_capabilities)

    def test_empty_job(self):
        self._run(check_empty_job)

    def test_random_jobs(self):
        self._run(check_random_jobs)

    def test_poisoned_folio(self):
        self._run(check_poisoned_folio)

    def test_framework_path(self):
        self._run(check_framework_path)

    def test_concurrent_jobs(self):
        self._run(check_concurrent_jobs)

    def test_cancel_no_write(self):
        self._run(check_cancel_no_write)

    def test_timeout(self):
        self._run(check_timeout)

    def test_small_and_large_paths(self):
        self._run(check_paths)
