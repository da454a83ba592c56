"""The cost model of ``auto`` (:mod:`.auto`): what a batch of N bytes costs each engine.

Per engine, ``overhead + bytes / bandwidth`` measured on a scratch buffer (two regimes
for an engine that copies small batches on the calling CPU alone), corrected per
batch-size class by the batches it actually copied (:class:`_Model`); which batches count
(:func:`fresh_memory`: not those that paid the host's first touch); and how many CPUs are
free now (:class:`IdleCpus`, from /proc/stat). The policy that picks from these numbers is
:mod:`.auto`'s.
"""
from __future__ import annotations

import collections
import contextlib
import math
import mmap
import os
import threading
import time

import numpy as np

from .base import CopyJob, run_engine

try:
    import resource

    def _faults() -> int:
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt
except ImportError:  # pragma: no cover - non-Unix: no fault counts, every batch counts
    def _faults() -> int:
        return 0

#: calibration sizes: the small regime's line, the large regime's line (see the docstring)
_SMALL_SIZES = (64 << 10, 512 << 10)
_LARGE_SIZES = (2 << 20, 8 << 20)
_WINDOW = 5  # batches per size class whose median corrects the model
_OUTLIER = 4.0  # a batch this much slower than predicted is noise until it repeats
_NEAR = 2  # a size class without observations borrows one at most this many classes away


def available_cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # pragma: no cover - non-Linux
        return os.cpu_count() or 1


def fresh_memory(faults: int, nbytes: int) -> bool:
    """Did a copy of ``nbytes`` that took ``faults`` host page faults land in memory never
    touched before? A few faults are the heap's; a fresh destination takes one per 4 KiB
    (one per 2 MiB with transparent huge pages: still more than this)."""
    return faults > 2 + (nbytes >> 26)


class IdleCpus:
    """How many CPUs are free for this process: idle time plus this process's own CPU
    time, over all CPU time, between two /proc/stat samples. Counting our own time as
    available matters: the copy threads of the previous batch must not make the next
    batch think the machine is busy."""

    _CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def __init__(self, cpus: int, period: float = 0.2):
        self.cpus, self.period = cpus, period
        self._last = None  # (time, idle ticks, total ticks, own ticks)
        self._idle = cpus
        self._lock = threading.Lock()

    @staticmethod
    def _read():
        with open("/proc/stat") as f:
            fields = f.readline().split()[1:]
        ticks = [int(x) for x in fields]
        idle = ticks[3] + (ticks[4] if len(ticks) > 4 else 0)  # idle + iowait
        return idle, sum(ticks)

    @classmethod
    def _own(cls):
        t = os.times()
        return (t[0] + t[1]) * cls._CLK_TCK

    def __call__(self) -> int:
        now = time.monotonic()
        with self._lock:
            if self._last is not None and now - self._last[0] < self.period:
                return self._idle
            try:
                idle, total = self._read()
            except (OSError, ValueError, IndexError):
                load = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
                self._idle = max(1, min(self.cpus, self.cpus - int(load) + 1))
                self._last = (now, 0, 0, 0)
                return self._idle
            own = self._own()
            if self._last is not None and total > self._last[2]:
                free = (idle - self._last[1]) + (own - self._last[3])
                frac = min(1.0, free / (total - self._last[2]))
                self._idle = max(1, min(self.cpus, int(frac * self.cpus + 0.5)))
            self._last = (now, idle, total, own)
            return self._idle


class _Model:
    """overhead + bytes/bandwidth per engine, corrected per size class from observations.
    ``cpus``: the CPUs the engine's threads had while it was measured; ``small``:
    ``(overhead, bandwidth)`` for batches below ``split`` bytes, or None (one line).

    The correction is the median ratio of measured to predicted time over the last
    :data:`_WINDOW` batches of the class (the least, until there are three); a class
    without any borrows the nearest one within :data:`_NEAR` classes. One batch more than
    :data:`_OUTLIER` times slower than predicted counts only when the next is too: one
    slow batch must not rule an engine out for good."""

    def __init__(self, overhead, bandwidth, cpus=1, small=None, split=0):
        self.overhead, self.bandwidth, self.cpus = overhead, bandwidth, cpus
        self.small, self.split = small, split
        self.ratio = {}
        self.window = {}  # size class -> the last ratios measured
        self.seen = {}    # size class -> time of the last observation
        self.outlier = {}  # size class -> the last batch was an outlier, not counted

    def base(self, nbytes):
        """The calibrated prediction, before any correction."""
        overhead, bandwidth = (self.small if self.small is not None and nbytes < self.split
                               else (self.overhead, self.bandwidth))
        return overhead + nbytes / bandwidth

    def correction(self, c):
        """(ratio, basis) for size class ``c``: the median of the batches measured here
        once there are three; with fewer, the median of them and the prior (the nearest
        class measured within :data:`_NEAR`, else 1) counted as the missing ones (one noisy
        batch moves nothing, two that agree do); with none, that prior."""
        w = self.window.get(c)
        near = None
        if not w or len(w) < 3:
            for d in range(1, _NEAR + 1):
                for k in (c + d, c - d):
                    if k in self.ratio and near is None:
                        near = (self.ratio[k], "measured nearby")
        if w:
            if len(w) >= 3:
                return self.ratio[c], "measured"
            p = (near or (1.0, ""))[0]
            return sorted(list(w) + [p] * (3 - len(w)))[1], "measured"
        return near or (1.0, "calibrated")

    def predict(self, nbytes):
        return self.base(nbytes) * self.correction(_size_class(nbytes))[0]

    def observe(self, nbytes, seconds) -> bool:
        """Count one batch; False when it was set aside as a lone outlier."""
        c = _size_class(nbytes)
        r = seconds / self.base(nbytes)
        self.seen[c] = time.monotonic()
        if r > _OUTLIER * self.correction(c)[0] and not self.outlier.get(c):
            self.outlier[c] = True
            return False
        self.outlier[c] = False
        w = self.window.setdefault(c, collections.deque(maxlen=_WINDOW))
        w.append(r)
        self.ratio[c] = sorted(w)[len(w) // 2]
        return True


def _size_class(nbytes):
    return max(0, int(math.log2(max(nbytes, 1))))


class _Scratch:
    """A page-aligned buffer for calibration copies (device engines need the alignment),
    touched once so that no copy pays the page faults; shared by one calibration pass."""

    def __init__(self):
        self.buf = mmap.mmap(-1, 2 * _LARGE_SIZES[-1])
        self.mem = np.frombuffer(self.buf, np.uint8)
        self.mem[:] = 1

    def close(self):
        self.mem = None
        with contextlib.suppress(BufferError):
            self.buf.close()


def _line(engine, scratch, sizes):
    """(overhead, bandwidth) of the line through the least of two copies of each size.
    Kept short (a few ms an engine): every Machine calibrates, and beside busy Python
    threads every release of the GIL can cost a switch interval (5 ms)."""
    mem, half = scratch.mem, _LARGE_SIZES[-1]
    ys = []
    for size in sizes:
        job = CopyJob(mem, np.array([0], np.int64), np.array([half], np.int64),
                      np.array([size], np.int64), np.array([0], np.int64), np.zeros(1, bool))
        for a in (job.src_off, job.dst_off, job.nbytes, job.folio, job.src_poisoned):
            a.flags.writeable = False   # as migration's jobs: the compiled code loaded is theirs
        times = []
        for _ in range(2):      # the least of two: the first also warms (threads, buffers)
            t0 = time.perf_counter()
            run_engine(engine, job, 10.0)
            times.append(time.perf_counter() - t0)
        ys.append(min(times))
    slope = (ys[1] - ys[0]) / (sizes[1] - sizes[0])
    bandwidth = 1.0 / slope if slope > 0 else 1e12
    return max(ys[0] - sizes[0] * slope, ys[0] * 0.5, 1e-7), float(bandwidth)


def _calibrate(engine, scratch, cpus=1) -> _Model:
    """The large regime's line (2 and 8 MiB), and, for an engine that copies small batches
    on the calling CPU alone, the small regime's (64 and 512 KiB); otherwise one line
    through 64 KiB and 8 MiB."""
    split = engine.capabilities.inline_bytes
    if split > _SMALL_SIZES[-1]:
        small = _line(engine, scratch, _SMALL_SIZES)
        return _Model(*_line(engine, scratch, _LARGE_SIZES), cpus, small, split)
    return _Model(*_line(engine, scratch, (_SMALL_SIZES[0], _LARGE_SIZES[-1])), cpus)

