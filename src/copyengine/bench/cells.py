"""The bench's results: the runs of one (page size, count, configuration) as a
:class:`Cell`, its JSON entry, and the issue's targets judged on them."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

import numpy as np

from ..migrate.core import PHASES
from . import scenarios as sc

MiB, GiB = 1 << 20, 1 << 30


@dataclass
class Cell:
    """The runs of one (page size, count, config)."""
    ps: sc.PageSize
    count: int
    config: str
    seconds: list = field(default_factory=list)
    phases: list = field(default_factory=list)
    error: str | None = None
    unavailable: bool = False
    engines_used: dict = field(default_factory=dict)
    checks: str = ""
    cpu: list = field(default_factory=list)          # CPU seconds of each timed run
    windows: list = field(default_factory=list)      # per timed run: every folio's window, us
    first_usable: list = field(default_factory=list)  # per timed run: call start -> first remap, us
    trace: dict | None = None                         # the last timed run's Chrome trace (first row)
    seq: list = field(default_factory=list)           # global order of each timed run (interleaving)
    warmup_seq: list = field(default_factory=list)    # and of each untimed one
    worker_pid: int | None = None                     # the process that ran it
    memory: dict | None = None                        # what the row cost that process (runner._memory)
    auto: dict | None = None                          # auto's choices and their reasons over the row

    def add(self, r: dict, seq: int, timed: bool) -> None:
        """One run's sample, as a worker returns it (worker.RowRunner.run)."""
        if not timed:
            self.warmup_seq.append(seq)
            return
        self.seq.append(seq)
        self.seconds.append(r["seconds"])
        self.phases.append(r["phases"])
        self.cpu.append(r["cpu"])
        self.windows.append(np.asarray(r["windows"]))
        self.first_usable.extend(r["first_usable"])
        for k, v in r["engines_used"].items():
            self.engines_used[k] = self.engines_used.get(k, 0) + v
        if r.get("trace"):
            self.trace = r["trace"]

    @property
    def nbytes(self):
        return self.count * self.ps.folio_size

    def to_json(self, ceiling):
        ok = self.error is None and not self.unavailable and bool(self.seconds)
        g = [self.nbytes / s / 1e9 for s in self.seconds] if ok else []
        med = statistics.median(g) if g else None
        out = {
            "page_size": self.ps.token, "base_page": self.ps.base_page, "folio_size": self.ps.folio_size,
            "count": self.count, "config": self.config, "bytes": self.nbytes,
            "gbps": med, "gbps_min": min(g) if g else None, "gbps_max": max(g) if g else None,
            "fraction": (med / ceiling) if (med is not None and ceiling) else None,
            "repeats": len(g), "verified": ok,
            "phases": None, "other": None, "seconds": None,
        }
        if ok:
            wall = float(np.mean(self.seconds))
            out["seconds"] = statistics.median(self.seconds)
            out["seconds_mean"] = wall
            out["runs_gbps"] = g
            out["runs_s"] = list(self.seconds)
            out["runs_seq"] = list(self.seq)
            out["warmup_seq"] = list(self.warmup_seq)
            if self.phases and all(p is not None for p in self.phases):
                ph = {k: float(np.mean([p[k] for p in self.phases])) for k in PHASES}
                out["phases"] = ph
                out["other"] = max(0.0, wall - sum(ph.values()))
                out["shares"] = {k: v / wall for k, v in ph.items()} | {"other": out["other"] / wall}
        if ok and self.cpu:
            out["cpu_s"] = statistics.median(self.cpu)
            out["cpu_s_per_gib"] = statistics.median(self.cpu) / (self.nbytes / GiB)
        if ok and self.windows:
            w = np.concatenate(self.windows)
            out["window_p50_us"] = float(np.percentile(w, 50))
            out["window_p99_us"] = float(np.percentile(w, 99))
            out["window_max_us"] = float(w.max())
        if ok and self.first_usable:
            out["first_usable_us"] = statistics.median(self.first_usable)
        if self.engines_used:
            out["engines_used"] = dict(self.engines_used)
        if self.auto:
            out["auto_choices"] = self.auto
        if self.checks:
            out["checks"] = self.checks
        if self.worker_pid is not None:
            out["worker_pid"] = self.worker_pid
        if self.unavailable:
            out["unavailable"] = True
        if self.error is not None:
            out["error"] = self.error
        return out


def _node_size(largest_bytes: int) -> int:
    slack = 16 * MiB
    want = 2 * largest_bytes + slack
    return -(-want // (2 * MiB)) * (2 * MiB)


# --------------------------------------------------------------------------- targets
#: (page size, minimum count, minimum fraction of the ceiling or None = report only)
TARGETS = (("2MiB@64KiB", 128, 0.90), ("64KiB", 4096, 0.70), ("4KiB", 65536, 0.35), ("2MiB", 128, None))


def evaluate_targets(results, ceiling, memory) -> list:
    """The issue's targets, measured: best verified configuration over the ceiling at the
    rows at or above each target's count (each such row is judged; the worst counts)."""
    out = []
    for token, min_count, want in TARGETS:
        rows = {}
        for r in results:
            if r["page_size"] != token or r["count"] < min_count or r["gbps"] is None:
                continue
            best = rows.get(r["count"])
            if best is None or r["gbps"] > best["gbps"]:
                rows[r["count"]] = r
        entry = {"page_size": token, "min_count": min_count, "target": want}
        if not rows:
            entry.update({"measured": False, "met": None, "note": "no verified row at or above this count"})
        else:
            per = [{"count": c, "config": r["config"], "gbps": r["gbps"], "fraction": r["fraction"]}
                   for c, r in sorted(rows.items())]
            worst = min(per, key=lambda x: x["fraction"] if x["fraction"] is not None else math.inf)
            entry.update({"measured": True, "rows": per, "fraction": worst["fraction"],
                          "met": (worst["fraction"] >= want) if (want is not None and worst["fraction"] is not None) else None})
        out.append(entry)
    out.append({"memory": True, "target": "peak RSS growth <= 1.1 x simulated memory touched",
                "growth_bytes": memory.get("peak_rss_growth_bytes"), "limit_bytes": memory.get("limit_bytes"),
                "met": memory.get("within_limit")})
    return out
