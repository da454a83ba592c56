"""Sysctl-like machine settings: a fixed set of names, each validated on write."""
from __future__ import annotations

import numbers
from dataclasses import dataclass
from typing import Any, Callable

MIGRATE_MODES = ("async", "sync_light", "sync")


@dataclass(frozen=True)
class _Setting:
    default: Callable[[Any], Any]  # machine -> default value
    check: Callable[[str, Any, Any], Any]  # (name, value, machine) -> normalized value
    doc: str


def _int_range(lo, hi_of=None):
    def check(name, v, machine):
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"setting {name} must be an int, not {type(v).__name__}")
        hi = hi_of(machine) if hi_of else None
        if v < lo or (hi is not None and v > hi):
            raise ValueError(f"setting {name}={v} out of range [{lo}, {hi if hi is not None else 'inf'}]")
        return int(v)
    return check


def _seconds(name, v, machine):
    if isinstance(v, bool) or not isinstance(v, numbers.Real):
        raise TypeError(f"setting {name} must be a number of seconds, not {type(v).__name__}")
    if not (0 < float(v) <= 3600):
        raise ValueError(f"setting {name}={v} must be in (0, 3600] seconds")
    return float(v)


def _mode(name, v, machine):
    if not isinstance(v, str):
        raise TypeError(f"setting {name} must be a string, not {type(v).__name__}")
    if v not in MIGRATE_MODES:
        raise ValueError(f"setting {name}={v!r}: expected one of {', '.join(MIGRATE_MODES)}")
    return v


def _kernel_pmd_nr(machine) -> int:
    """HPAGE_PMD_NR of the architecture the page size stands for: 512 with 4 KiB base
    pages (x86-64, a 2 MiB PMD), 8192 with 64 KiB base pages (arm64, a 512 MiB PMD)."""
    return 512 if machine.page_size == 4096 else 8192


SETTINGS: dict[str, _Setting] = {
    "nr_max_batched_migration": _Setting(
        _kernel_pmd_nr, _int_range(1, lambda m: max(m.total_frames, _kernel_pmd_nr(m))),
        "Most base pages migrated in one batch (NR_MAX_BATCHED_MIGRATION; HPAGE_PMD_NR by "
        "default: 512 with 4 KiB base pages, 8192 with 64 KiB base pages as on arm64)."),
    "migrate_mode": _Setting(
        lambda m: "sync", _mode,
        "Mode of move_pages/migrate_pages: async, sync_light or sync (the syscalls use sync)."),
    "migration_wait_timeout": _Setting(
        lambda m: 30.0, _seconds,
        "Seconds an access waits on a migration entry before failing with ETIMEDOUT."),
    "offload_reasons": _Setting(
        lambda m: (1 << 10) - 1, _int_range(0, lambda m: (1 << 10) - 1),
        "Bit mask of migration reasons (1 << MR_*, copyengine.uapi) whose batches may use the "
        "selected engine; a batch of any other reason is copied by the CPU (serial). All by default."),
    "copy_timeout": _Setting(
        lambda m: 10.0, _seconds,
        "Seconds the framework waits for an asynchronous engine before cancelling it."),
}


class Settings:
    """Validated settings of one machine, read and written like ``m.settings["name"]``
    or ``m.settings.name``; unknown names and bad values raise and change nothing."""

    __slots__ = ("_machine", "_values")

    def __init__(self, machine):
        object.__setattr__(self, "_machine", machine)
        object.__setattr__(self, "_values", {k: s.default(machine) for k, s in SETTINGS.items()})

    @staticmethod
    def _known(name):
        if not isinstance(name, str):
            raise TypeError(f"setting names are strings, not {type(name).__name__}")
        if name not in SETTINGS:
            raise ValueError(f"unknown setting {name!r}; known: {', '.join(sorted(SETTINGS))}")
        return SETTINGS[name]

    def __getitem__(self, name):
        try:  # the hot path (read per call): a known name is a key of _values
            return self._values[name]
        except (KeyError, TypeError):
            self._known(name)
            raise

    def __setitem__(self, name, value):
        spec = self._known(name)
        self._values[name] = spec.check(name, value, self._machine)

    def __getattr__(self, name):
        if name.startswith("_"):
            raise AttributeError(name)
        try:
            return self[name]
        except ValueError as e:
            raise AttributeError(str(e)) from None

    def __setattr__(self, name, value):
        self[name] = value

    def __iter__(self):
        return iter(self._values)

    def as_dict(self) -> dict:
        return dict(self._values)

    def describe(self) -> dict:
        return {k: SETTINGS[k].doc for k in SETTINGS}

    def __repr__(self):
        return f"Settings({self._values!r})"
