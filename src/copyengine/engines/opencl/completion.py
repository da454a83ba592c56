"""Completion of one opencl job: segment events settle folios, bounded waits and cancel.

This mirrors dmaengine's completion side: each segment is a dma cookie whose last command
(in-order queue) completes it; an event callback, or the waiter's poll (whichever sees it
first; pyopencl runs callbacks on a fresh thread that must win the GIL), settles it,
records its folios (a folio is done when every segment touching it is) and issues that
channel's next segment, at most ``DEPTH`` per channel on the device (``issue_pending``).
Folios complete out of order across channels; ``wait(timeout)`` is bounded
(``dma_sync_wait``). ``cancel()`` is ``dmaengine_terminate_sync``: it stops issuing (under
the lock the callbacks take) and waits, bounded by the engine's ``drain_timeout``, until
every issued command completed; a command that cannot be drained in that time makes
``_cancel`` return False and the job retires once it has (the framework quarantines its
destinations meanwhile). Nothing can stop a command the device already runs, so cancel
takes up to DEPTH segments per channel (a few ms).
"""
from __future__ import annotations

import errno
import threading
import time
from collections import deque

import numpy as np

from ..base import PENDING, Completion
from .plan import DEPTH

#: wait() polls issued events every POLL_MIN seconds at first, backing off to POLL_MAX
POLL_MIN = 20e-6
POLL_MAX = 2e-3
#: seconds cancel() and close() wait for issued commands to drain
DRAIN_TIMEOUT = 30.0


class OpenCLCompletion(Completion):
    """Per-folio completion of one batch, filled by segment events in any order."""

    def __init__(self, engine, nr_folios, spans=None):
        super().__init__(nr_folios)
        self._spans = spans  # the job's span list (a trace recorder is attached) or None
        self._lock = threading.RLock()
        self._cond = threading.Condition(self._lock)
        self._engine = engine
        self._mb = None      # the memory buffers this batch copies within
        self._queued = [deque() for _ in range(engine.channels)]
        self._inflight = set()
        self._left = 0
        self._folio_left = np.zeros(nr_folios, np.int64)
        self.log = []        # (channel, segment index, status) in completion order
        self.segments = 0
        self._callbacks = 0  # event callbacks registered and not run yet

    # called by the engine while planning, before start()
    def _add(self, seg):
        self._queued[seg.channel].append(seg)
        self._left += 1
        self.segments += 1

    def _start(self):
        with self._lock:
            if self._left == 0:
                self._done.set()
                return
            for ch in range(len(self._queued)):
                for _ in range(DEPTH):
                    if not self._issue_next(ch, flush=False):
                        break
            self._engine._flush()
            if self._left == 0:
                self._done.set()

    def _issue_next(self, ch, flush=True):
        """Issue channel ch's next segment (lock held). False when none is left."""
        q = self._queued[ch]
        if not q or self.cancelled:
            return False
        seg = q.popleft()
        if self._spans is not None:
            seg.t0 = time.perf_counter()
        try:
            seg.event = self._engine._enqueue(seg, self._mb, flush)
        except Exception:
            self._settle(seg, -errno.EIO)
            return True
        self._inflight.add(seg)
        try:
            seg.event.set_callback(self._engine._cl.command_execution_status.COMPLETE,
                                   lambda status, seg=seg: self._on_event(seg, status))
            self._callbacks += 1
        except Exception:
            pass  # no callback: cancel() and the engine's poll still see the event's status
        return True

    def _settle(self, seg, status):
        """A segment's commands ended (lock held): record its folios, issue the next one."""
        self._inflight.discard(seg)
        seg.keep = None
        self._left -= 1
        if not self.cancelled:
            self.log.append((seg.channel, seg.index, status))
            f = seg.folios
            if status == 0 and not seg.failed:
                self._folio_left[f] -= 1
                ready = f[(self._folio_left[f] == 0) & (self.result[f] == PENDING)]
                self.result[ready] = 0
                done = len(ready)
            else:
                self.result[f] = -errno.EIO
                done = 0
            if self._spans is not None and seg.t0 is not None:
                # host-side times: from enqueue to the callback or poll that saw the
                # segment done; folios: those this segment completed (each counted once)
                self._spans.append((f"opencl channel {seg.channel}", seg.t0,
                                    time.perf_counter(), done))
            self._issue_next(seg.channel)
            if self._left == 0:
                self._done.set()
        self._cond.notify_all()

    def _on_event(self, seg, status):
        try:
            with self._lock:
                self._callbacks -= 1
                self._cond.notify_all()
                if seg in self._inflight:
                    self._settle(seg, 0 if status == 0 else -errno.EIO)
        except Exception:  # never let an exception escape into pyopencl's callback thread
            pass

    def _poll(self):
        """Settle issued segments whose event finished without (or before) a callback."""
        for seg in list(self._inflight):
            try:
                st = seg.event.command_execution_status
            except Exception:
                continue
            if st <= 0:
                self._settle(seg, 0 if st == 0 else -errno.EIO)

    def wait(self, timeout: float):
        """The result once every folio has an outcome, or None after ``timeout`` seconds.

        Besides sleeping on the completion, the waiter polls the issued events (every
        20 us, backing off to 2 ms): a pyopencl callback runs on a fresh thread that must
        win the GIL, which can take milliseconds on a busy machine, while the device is
        long done. Whoever notices a completion first settles it (and issues the next
        segment)."""
        deadline = time.monotonic() + max(0.0, float(timeout))
        interval = POLL_MIN
        while True:
            if self._done.is_set():
                return self.result
            with self._lock:
                self._poll()
            left = deadline - time.monotonic()
            if left <= 0:
                return self.result if self._done.is_set() else None
            if self._done.wait(min(left, interval)):
                return self.result
            interval = min(interval * 2, POLL_MAX)

    def _cancel(self):
        deadline = time.monotonic() + self._engine.drain_timeout
        with self._lock:
            for q in self._queued:
                self._left -= len(q)
                q.clear()
            while True:
                self._poll()
                if not self._inflight:
                    break
                left = deadline - time.monotonic()
                if left <= 0:  # the device may still write: the framework quarantines the job
                    threading.Thread(target=self._retire_when_drained, daemon=True).start()
                    return False
                self._cond.wait(min(left, 0.005))
        self._done.set()
        self._wait_callbacks(max(0.0, min(1.0, deadline - time.monotonic())))
        self._engine._forget(self)

    def _retire_when_drained(self, limit=3600.0):
        """After a cancel that could not wait the device out: retire the job once no
        command group runs any more (polled; bounded, after which it stays quarantined)."""
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            with self._lock:
                self._poll()
                if not self._inflight:
                    self._done.set()
                    self._engine._forget(self)
                    self.retire()
                    return
            time.sleep(0.01)

    def _wait_callbacks(self, timeout):
        """Let pending event callbacks run (bounded). They only record or drop a
        completion; waiting matters at interpreter exit, where a pyopencl callback thread
        that starts after finalization began aborts the process."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while self._callbacks > 0:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(min(left, 0.005))
        return True
