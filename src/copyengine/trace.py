"""What one migration did, step by step: a recorder the state machine fills while it is
attached to a machine, the numbers users ask of it, and a timeline in the Chrome
trace-event format (Perfetto and chrome://tracing open it).

    with copyengine.trace.record(m) as rec:
        p.move_pages(0, addrs, nodes)
    rec.windows_us()            # per folio: unmap (migration entry in place) -> remap, in us
    rec.write_chrome_trace("migration.json")

Each batch records its phase boundaries (prepare, unmap, move, copy, finalize) on the
thread that ran it; each migrate_pages() call records the kernel's ``mm_migrate_pages``
fields (succeeded, failed, thp_succeeded, thp_failed, thp_split, large_folio_split, mode,
reason) and when its first folio was usable again. A folio's *unavailability window* is
the time from its batch's unmap to the end of its batch's finalize: batching copies
before remapping, so every folio of a batch waits for the whole batch's copy. The copy
slice is the engine call as the framework sees it (on the calling thread); an engine that
fills ``CopyJob.spans`` (``mt:N`` per worker, ``serial`` as "cpu", ``opencl`` per channel)
adds one track per worker or channel ("lane") with its own copy slices, inside that
batch's copy phase. See docs/trace.md.
"""
from __future__ import annotations

import json
import math
import os
import threading
import time
from contextlib import contextmanager

import numpy as np

PHASES = ("prepare", "unmap", "move", "copy", "finalize")


class Recorder:
    """Batches and calls of the migrations of one machine while attached."""

    def __init__(self):
        self.t0 = time.perf_counter()
        self.batches = []   # (tid, prepare, unmap, move, copy, finalize, end, folios, pages, engine)
        self.calls = []     # dicts: start, end, first_usable, and the tracepoint's fields
        self.spans = []     # (tid, lane, t0, t1, folios, engine): an engine's workers or channels
        self._lock = threading.Lock()

    # -- filled by the state machine
    def batch(self, t_prepare, t_unmap, t_move, t_copy, t_finalize, t_end, folios, pages, engine):
        with self._lock:
            self.batches.append((threading.get_ident(), t_prepare, t_unmap, t_move, t_copy, t_finalize,
                                 t_end, int(folios), int(pages), str(engine)))

    def copy_spans(self, engine, spans):
        """The slices an engine put in ``CopyJob.spans`` for one job, once it is retired.
        Each must be ``(lane, t0, t1, folios)``: a non-empty str, finite perf_counter
        seconds with t0 <= t1, an int >= 0; ValueError naming the engine otherwise, and
        none of the job's spans is kept."""
        me = threading.get_ident()
        rows = []
        for s in spans:
            ok = isinstance(s, tuple) and len(s) == 4 and isinstance(s[0], str) and s[0]
            ok = ok and all(isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t)
                            for t in s[1:3]) and s[1] <= s[2]
            if not (ok and isinstance(s[3], (int, np.integer)) and not isinstance(s[3], bool) and s[3] >= 0):
                raise ValueError(f"engine {engine}: a copy span must be (lane, t0, t1, folios) with "
                                 f"t0 <= t1 and folios >= 0, not {s!r}")
            rows.append((me, s[0], float(s[1]), float(s[2]), int(s[3]), str(engine)))
        with self._lock:
            self.spans.extend(rows)

    def first_remap_since(self, since):
        """When this thread's first batch that started after ``since`` remapped its folios."""
        me = threading.get_ident()
        with self._lock:
            ends = [b[6] for b in self.batches if b[0] == me and b[1] >= since]
        return min(ends) if ends else None

    def call(self, start, end, first_usable, **fields):
        with self._lock:
            self.calls.append(dict(start=start, end=end, first_usable=first_usable, **fields))

    # -- what users ask
    def windows_us(self) -> np.ndarray:
        """Unavailability window of every folio migrated (one entry per folio), in us."""
        if not self.batches:
            return np.empty(0)
        b = np.array([(x[6] - x[2], x[7]) for x in self.batches])
        return np.repeat(b[:, 0], b[:, 1].astype(np.int64)) * 1e6

    def first_usable_us(self) -> np.ndarray:
        """Per call: from its start to the moment its first folio was mapped again, in us."""
        return np.array([(c["first_usable"] - c["start"]) * 1e6 for c in self.calls
                         if c["first_usable"] is not None])

    def summary(self) -> dict:
        w = self.windows_us()
        f = self.first_usable_us()
        pct = (lambda a, q: float(np.percentile(a, q)) if len(a) else None)
        return {"folios": int(len(w)), "batches": len(self.batches), "calls": len(self.calls),
                "window_p50_us": pct(w, 50), "window_p99_us": pct(w, 99),
                "window_max_us": float(w.max()) if len(w) else None,
                "first_usable_p50_us": pct(f, 50)}

    # -- the timeline
    def chrome_trace(self, pid=None, name="copyengine", t0=None) -> dict:
        """The trace-event JSON object: one track per thread, one complete ("X") slice per
        phase of every batch, one track per copy lane (an engine's worker or channel, named
        by the lane; "lane (thread N)" when several migrating threads had spans) with its
        slices, and one instant ("i") event per call with its fields. ``pid``
        and ``name`` label the process track (several recorders can share one file, see
        :func:`merge`); ``t0`` is the time that becomes 0 (default: when recording began)."""
        pid = os.getpid() if pid is None else pid
        base = self.t0 if t0 is None else t0
        us = (lambda t: (t - base) * 1e6)
        events = [{"name": "process_name", "ph": "M", "pid": pid, "args": {"name": name}}]
        tids = {}
        for b in self.batches:
            tid = tids.setdefault(b[0], len(tids) + 1)
            for k, name in enumerate(PHASES):
                start, end = b[1 + k], b[2 + k]
                if end > start:
                    events.append({"name": name if name != "copy" else f"copy ({b[9]})", "cat": "migrate",
                                   "ph": "X", "pid": pid, "tid": tid, "ts": us(start), "dur": (end - start) * 1e6,
                                   "args": {"folios": b[7], "pages": b[8], "engine": b[9]}})
        for s in self.spans:  # a thread with copy spans but no batch recorded (yet)
            tids.setdefault(s[0], len(tids) + 1)
        for tid in tids.values():
            events += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid,
                        "args": {"name": f"migrating thread {tid}"}},
                       {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                        "args": {"sort_index": tid}}]
        events += self._lane_events(pid, us, tids)
        for c in self.calls:
            args = {k: v for k, v in c.items() if k not in ("start", "end", "first_usable")}
            events.append({"name": "mm_migrate_pages", "cat": "migrate", "ph": "i", "s": "p", "pid": pid,
                           "tid": 1, "ts": us(c["end"]), "args": args})
        return {"traceEvents": events, "displayTimeUnit": "ms"}

    def _lane_events(self, pid, us, tids):
        """The copy lanes' tracks (below the threads', in order of first use) and slices."""
        events, lanes = [], {}
        several = len({s[0] for s in self.spans}) > 1
        for s in self.spans:
            key = (s[0], s[1])
            if key not in lanes:
                lanes[key] = tid = len(tids) + len(lanes) + 1
                label = f"{s[1]} (thread {tids[s[0]]})" if several else s[1]
                events += [{"name": "thread_name", "ph": "M", "pid": pid, "tid": tid, "args": {"name": label}},
                           {"name": "thread_sort_index", "ph": "M", "pid": pid, "tid": tid,
                            "args": {"sort_index": tid}}]
            events.append({"name": "copy", "cat": "copy", "ph": "X", "pid": pid, "tid": lanes[key],
                           "ts": us(s[2]), "dur": (s[3] - s[2]) * 1e6,
                           "args": {"lane": s[1], "folios": s[4], "engine": s[5]}})
        return events

    def write_chrome_trace(self, path) -> None:
        with open(path, "w") as f:
            json.dump(self.chrome_trace(), f)


def merge(traces) -> dict:
    """Several :meth:`Recorder.chrome_trace` objects as one file's object."""
    return {"traceEvents": [e for t in traces for e in t["traceEvents"]], "displayTimeUnit": "ms"}


@contextmanager
def record(machine):
    """Attach a :class:`Recorder` to ``machine`` for the ``with`` block (one at a time)."""
    if machine.recorder is not None:
        raise RuntimeError("a recorder is already attached to this machine")
    rec = Recorder()
    machine.recorder = rec
    try:
        yield rec
    finally:
        machine.recorder = None
