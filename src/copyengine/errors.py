"""Errors and errno values shared by the whole package."""
from __future__ import annotations

import errno as _errno
import os

#: Linux's EHWPOISON ("Memory page has hardware error"); Python's errno lacks it before 3.14.
EHWPOISON = getattr(_errno, "EHWPOISON", 133)


class EngineUnavailable(RuntimeError):
    """A copy engine cannot run on this machine (no OpenCL platform, too many threads, ...)."""


def oserror(code: int, detail: str = "") -> OSError:
    """An OSError carrying a Linux errno, with strerror and an optional detail like the kernel's."""
    msg = os.strerror(code) if code != EHWPOISON else "Memory page has hardware error"
    if detail:
        msg = f"{msg}: {detail}"
    return OSError(code, msg)


class PluginError(RuntimeError):
    """A plugin broke the hook contract (wrong result, bad frames, ...); names the plugin."""


class MachineClosedError(OSError, ValueError):
    """A call on a :class:`copyengine.Machine` (or one of its processes) after ``close()``.

    Both kinds the contract uses, like :class:`io.UnsupportedOperation`: system-call shaped
    calls (read, write, mmap, move_pages, ...) raise OSError, here with ``errno`` ENXIO
    ("no such device or address": the memory behind the address is gone); the others
    (spawn, set_engine, hwpoison) raise ValueError. One class is both, so either
    ``except`` catches it."""

    def __init__(self, detail="the machine is closed"):
        super().__init__(_errno.ENXIO, f"{os.strerror(_errno.ENXIO)}: {detail}")
