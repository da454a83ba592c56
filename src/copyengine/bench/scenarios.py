"""What the bench measures: page sizes, page counts and configurations.

The experiment is the seed's ``move_thp`` benchmark: a process maps N folios on node 0,
writes them, and *one* ``move_pages()`` call moves them all to node 1. Throughput is the
bytes moved over the wall time of that call.

Page sizes are tokens ``FOLIO[@BASE]``:

==============  ==========================================================================
``4KiB``        4 KiB base pages, order-0 folios (x86-64 base pages)
``64KiB``       64 KiB base pages, order-0 folios (the seed's first table: arm64, 64 KiB)
``2MiB``        2 MiB folios (THP) on 4 KiB base pages (x86-64 PMD THP)
``2MiB@64KiB``  2 MiB folios (mTHP) on 64 KiB base pages (the seed's second table)
==============  ==========================================================================

Any power-of-two folio from the base page up to 2 MiB works (``16KiB``, ``512KiB@64KiB``).
Configurations are engine spec strings (``vanilla``, ``serial``, ``mt:N``, ``opencl``,
``auto``, or any engine a plugin registers); see :func:`default_configs`.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..units import parse_size

KiB, MiB = 1 << 10, 1 << 20
BASE_PAGES = (4 * KiB, 64 * KiB)
MAX_FOLIO = 2 * MiB

#: the page sizes of a default run, in table order
DEFAULT_PAGE_SIZES = ("4KiB", "64KiB", "2MiB", "2MiB@64KiB")

#: The rows of a default run. ``64KiB`` and ``2MiB@64KiB`` are the seed's rows (its two
#: tables) plus the rows the targets are stated at (64KiB x 4096); ``4KiB`` and ``2MiB``
#: (x86-64 page sizes the seed did not measure) get rows of the same bytes, up to the
#: target rows (4KiB x 65536, 2MiB x 128). Chosen so that a default run takes about two
#: minutes on a 2-core VM (see bench/README.md).
DEFAULT_COUNTS = {
    "4KiB": (512, 4096, 16384, 65536),
    "64KiB": (32, 256, 512, 768, 1024, 4096),
    "2MiB": (1, 8, 32, 128),
    "2MiB@64KiB": (1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 768, 1024),
}

#: ``--quick``: a smoke run of a few seconds (tests, CI): small rows, two repeats.
QUICK_COUNTS = {
    "4KiB": (16, 256),
    "64KiB": (8, 64),
    "2MiB": (1, 4),
    "2MiB@64KiB": (1, 4),
}
QUICK_REPEAT = 2
DEFAULT_REPEAT = 5

#: counts used for page sizes outside the tables above (a custom ``--page-size``)
FALLBACK_COUNTS_BYTES = (4 * MiB, 64 * MiB, 256 * MiB)
QUICK_FALLBACK_BYTES = (1 * MiB, 4 * MiB)

#: engine names the design names; asked for by default even when no plugin registers
#: them yet (they are then reported as unavailable columns)
DESIGNED_ENGINES = ("vanilla", "serial", "mt", "opencl", "auto")

_TOKEN = re.compile(r"^\s*([^@\s]+)\s*(?:@\s*([^@\s]+)\s*)?$")


@dataclass(frozen=True)
class PageSize:
    """One page-size token: ``folio_size`` bytes per folio on ``base_page`` base pages."""
    token: str
    folio_size: int
    base_page: int

    @property
    def order(self) -> int:
        return (self.folio_size // self.base_page).bit_length() - 1

    @property
    def pages_per_folio(self) -> int:
        return self.folio_size // self.base_page

    def describe(self) -> str:
        if self.folio_size == self.base_page:
            return f"{_fmt(self.base_page)} base pages"
        return f"{_fmt(self.folio_size)} folios on {_fmt(self.base_page)} base pages"


def _fmt(n: int) -> str:
    for unit, size in (("GiB", 1 << 30), ("MiB", MiB), ("KiB", KiB)):
        if n >= size and n % size == 0:
            return f"{n // size}{unit}"
    return f"{n}B"


def parse_page_size(token) -> PageSize:
    """``FOLIO[@BASE]`` -> :class:`PageSize`. ValueError says what is wrong.

    The base page defaults to 4 KiB, except that a bare ``64KiB`` means 64 KiB base
    pages (the seed's first table), as does any folio given with ``@64KiB``.
    """
    if not isinstance(token, str):
        raise ValueError(f"page size {token!r}: expected a string like 4KiB, 64KiB, 2MiB or 2MiB@64KiB")
    m = _TOKEN.match(token)
    if not m:
        raise ValueError(f"bad page size {token!r}: expected FOLIO[@BASE], e.g. 4KiB, 64KiB, 2MiB, 2MiB@64KiB")
    try:
        folio = parse_size(m.group(1), "folio size")
        base = parse_size(m.group(2), "base page") if m.group(2) else None
    except (ValueError, TypeError) as e:
        raise ValueError(f"bad page size {token!r}: {e}") from None
    if base is None:
        base = 64 * KiB if folio == 64 * KiB else 4 * KiB
    if base not in BASE_PAGES:
        raise ValueError(f"bad page size {token!r}: the base page must be 4KiB or 64KiB, not {_fmt(base)}")
    if folio & (folio - 1) or folio < base or folio > MAX_FOLIO:
        raise ValueError(f"bad page size {token!r}: the folio must be a power of two from the base page "
                         f"({_fmt(base)}) up to 2MiB")
    canon = _fmt(folio) if (folio == base or (base == 4 * KiB and folio != 64 * KiB)) \
        else f"{_fmt(folio)}@{_fmt(base)}"
    return PageSize(canon, folio, base)


def default_counts(ps: PageSize, quick: bool = False) -> tuple:
    table = QUICK_COUNTS if quick else DEFAULT_COUNTS
    if ps.token in table:
        return tuple(table[ps.token])
    sizes = QUICK_FALLBACK_BYTES if quick else FALLBACK_COUNTS_BYTES
    return tuple(sorted({max(1, b // ps.folio_size) for b in sizes}))


def cpus_available() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def mt_thread_counts(cpus: int) -> list[int]:
    """The ``mt:N`` columns: 1, 2, 4, ... up to the CPUs available, and the CPU count itself."""
    out, n = [], 1
    while n <= cpus:
        out.append(n)
        n *= 2
    if cpus not in out:
        out.append(cpus)
    return out


def default_configs(registry, cpus: int | None = None) -> list[str]:
    """``vanilla``, ``serial``, ``mt:1`` ... ``mt:CPUS``, ``opencl``, ``auto``, then every
    other engine a plugin registers (by its bare name), in registration order."""
    cpus = cpus_available() if cpus is None else cpus
    out = ["vanilla", "serial"] + [f"mt:{n}" for n in mt_thread_counts(cpus)] + ["opencl", "auto"]
    for name in registry:
        if name not in DESIGNED_ENGINES:
            out.append(name)
    return out


def split_list(value, what) -> list[str]:
    """A comma list from the command line (or a Python list) -> stripped items."""
    if value is None:
        return None
    if isinstance(value, str):
        items = [v.strip() for v in value.split(",")]
    else:
        items = [str(v).strip() if not isinstance(v, str) else v.strip() for v in value]
    if not items or any(not v for v in items):
        raise ValueError(f"{what}: empty item in {value!r} (a comma list like 'a,b,c')")
    return items


def parse_counts(value) -> list[int]:
    """Page counts: a comma list of positive ints (``1,8,128``; ``1k`` = 1024 allowed)."""
    if value is None:
        return None
    items = split_list(value, "--counts") if isinstance(value, str) else list(value)
    out = []
    for v in items:
        if isinstance(v, bool):
            raise ValueError(f"--counts: {v!r} is not a number of pages")
        if isinstance(v, int):
            n = v
        else:
            s = str(v).strip().lower()
            mult = 1
            if s.endswith("k"):
                s, mult = s[:-1], 1024
            try:
                n = int(s, 10) * mult
            except ValueError:
                raise ValueError(f"--counts: {v!r} is not a number of pages (positive integers, e.g. 1,8,128)") from None
        if n < 1:
            raise ValueError(f"--counts: {v!r}: a number of pages must be at least 1")
        out.append(int(n))
    return sorted(set(out))
