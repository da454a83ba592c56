"""The bench's options, validated before anything runs (:func:`make_plan`), and its
stderr progress bar."""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass

from . import scenarios as sc
from . import sysinfo


class BenchError(ValueError):
    """Bad options for the bench (the CLI exits with status 2)."""



# --------------------------------------------------------------------------- options
@dataclass
class Plan:
    page_sizes: list            # of scenarios.PageSize
    counts: dict                # token -> list of counts
    configs: list               # spec strings, as given
    repeat: int
    warmup: int
    quick: bool
    counts_given: bool = False
    configs_given: bool = False


def _registry(pm):
    from ..plugins import engine_registry, get_plugin_manager
    return engine_registry(pm if pm is not None else get_plugin_manager())


def _check_spec_argument(spec, registry, pm):
    """A malformed argument (mt:0, serial:1) is a bad option, found before anything runs;
    an engine that cannot run here (EngineUnavailable) is only an n/a column later."""
    from ..engines.base import create_engine
    from ..errors import EngineUnavailable
    from ..machine import Machine
    with Machine(nodes=2, node_size="2MiB", engine="serial", plugin_manager=pm) as tiny:
        try:
            create_engine(spec, tiny, registry).close()
        except EngineUnavailable:
            pass
        except (ValueError, TypeError) as e:
            raise BenchError(f"--configs: {spec!r}: {e}") from None


def make_plan(page_sizes=None, counts=None, configs=None, repeat=None, quick=False, warmup=1,
              pm=None) -> Plan:
    """Validate and complete the options. BenchError names what is wrong."""
    from ..engines.base import parse_spec
    try:
        toks = sc.split_list(page_sizes, "--page-size") if page_sizes is not None else list(sc.DEFAULT_PAGE_SIZES)
        pss, seen = [], set()
        for t in toks:
            ps = sc.parse_page_size(t)
            if ps.token not in seen:
                seen.add(ps.token)
                pss.append(ps)
        cnt = sc.parse_counts(counts)
    except ValueError as e:
        raise BenchError(str(e)) from None
    if repeat is None:
        repeat = sc.QUICK_REPEAT if quick else sc.DEFAULT_REPEAT
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise BenchError(f"--repeat: {repeat!r}: the number of timed runs must be an integer >= 1")
    if isinstance(warmup, bool) or not isinstance(warmup, int) or warmup < 0:
        raise BenchError(f"warmup: {warmup!r}: must be an integer >= 0")
    registry = _registry(pm)
    if configs is None:
        cfgs = sc.default_configs(registry)
    else:
        try:
            cfgs = sc.split_list(configs, "--configs")
        except ValueError as e:
            raise BenchError(str(e)) from None
        out = []
        for c in cfgs:
            try:
                name, _ = parse_spec(c)
            except (ValueError, TypeError) as e:
                raise BenchError(f"--configs: {e}") from None
            if name not in registry and name not in sc.DESIGNED_ENGINES:
                missing = [n for n in sc.DESIGNED_ENGINES if n not in registry]
                raise BenchError(f"--configs: unknown engine {name!r} in {c!r}; engines here: "
                                 f"{', '.join(sorted(registry))}"
                                 + (f" (and {', '.join(missing)} once installed)" if missing else ""))
            if name in registry:
                _check_spec_argument(c, registry, pm)
            if c not in out:
                out.append(c)
        cfgs = out
    per = {ps.token: (list(cnt) if cnt else list(sc.default_counts(ps, quick))) for ps in pss}
    avail = sysinfo._meminfo().get("MemAvailable")
    for ps in pss:
        need = 2 * max(per[ps.token]) * ps.folio_size   # the source and the destination
        if need >= 1 << 47:
            raise BenchError(f"{ps.token} x{max(per[ps.token])}: far too large")
        if avail and need * 1.15 > avail:
            raise BenchError(f"{ps.token} x{max(per[ps.token])} needs {need / (1 << 30):.1f} GiB of host memory "
                             f"(source and destination of {need / 2 / (1 << 30):.1f} GiB); "
                             f"{avail / (1 << 30):.1f} GiB is available: use smaller --counts")
    return Plan(pss, per, cfgs, int(repeat), int(warmup), bool(quick),
                counts_given=cnt is not None, configs_given=configs is not None)


# --------------------------------------------------------------------------- progress
class Progress:
    """A one-line stderr progress bar weighted by bytes to move (no dependency)."""

    def __init__(self, total_units: float, enabled: bool, stream=None, width: int = 28):
        self.total = max(float(total_units), 1e-9)
        self.done = 0.0
        self.enabled = enabled
        self.stream = stream or sys.stderr
        self.width = width
        self.t0 = time.perf_counter()
        self._last = 0.0
        self.label = ""

    def advance(self, units: float, label: str | None = None):
        self.done = min(self.total, self.done + units)
        if label is not None:
            self.label = label
        self.draw()

    def draw(self, force=False):
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1:
            return
        self._last = now
        frac = self.done / self.total
        fill = int(frac * self.width)
        elapsed = now - self.t0
        eta = f" ETA {elapsed / frac - elapsed:4.0f}s" if frac > 0.02 else ""
        line = f"\r[{'#' * fill}{'.' * (self.width - fill)}] {frac * 100:3.0f}% {elapsed:4.0f}s{eta}  {self.label}"
        self.stream.write(line[:119].ljust(119))
        self.stream.flush()

    def close(self):
        if self.enabled:
            self.draw(force=True)
            self.stream.write("\r" + " " * 119 + "\r")
            self.stream.flush()
