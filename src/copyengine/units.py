"""Parsing of sizes given as int bytes or strings with a binary unit ("4KiB", "2MiB")."""
from __future__ import annotations

import numbers
import re

_UNITS = {"": 1, "b": 1, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_RE = re.compile(r"^\s*(\d+)\s*([A-Za-z]*)\s*$")


def parse_size(value, what: str = "size") -> int:
    """Return a size in bytes; TypeError for a non-size type, ValueError for a bad value."""
    if isinstance(value, bool) or not isinstance(value, (numbers.Integral, str)):
        raise TypeError(f"{what} must be an int (bytes) or a string like '4KiB', not {type(value).__name__}")
    if isinstance(value, str):
        m = _RE.match(value)
        unit = m.group(2).lower() if m else None
        if not m or unit not in _UNITS:
            raise ValueError(f"{what} {value!r}: expected a number with a binary unit (B, KiB, MiB, GiB, TiB)")
        n = int(m.group(1)) * _UNITS[unit]
    else:
        n = int(value)
    if n <= 0:
        raise ValueError(f"{what} must be positive, got {value!r}")
    return n


def format_size(n: int) -> str:
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"
