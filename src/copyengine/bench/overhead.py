"""The model's own cost, measured at the start of every bench run and shown in its header:
what one move_pages() call costs beyond the copy, so that nobody reads the interpreter's
overhead as copy scheduling.

* one-page call: median wall time of a move_pages() of one 4 KiB page (ping-pong between
  the nodes), and of a query-only call (nodes None);
* metadata per folio: a call moving N 4 KiB folios, minus a memcpy of the same bytes
  measured alongside (numpy, one thread, source and destination touched), over N.

The kernel's own per-call cost is tens of microseconds; the project's targets are at most
15 us per one-page call and 0.5 us of metadata per 4 KiB folio."""
from __future__ import annotations

import gc
import statistics
import time

import numpy as np

TARGET_CALL_US = 15.0
TARGET_FOLIO_US = 0.5


def measure_overhead(engine="serial", folios=65536, calls=300, repeat=5, plugin_manager=None) -> dict:
    import copyengine as ce
    node = max(64 << 20, 2 * folios * 4096 + (16 << 20))
    with ce.Machine(nodes=2, node_size=-(-node // (2 << 20)) * (2 << 20), engine=engine,
                    plugin_manager=plugin_manager) as m:
        p = m.spawn()
        a = p.mmap(4096)
        p.write(a, b"x")
        one, query = [], []
        was = gc.isenabled()
        gc.disable()
        try:
            for i in range(calls + 20):
                t0 = time.perf_counter()
                p.move_pages(0, [a], [(i + 1) % 2])
                t1 = time.perf_counter()
                p.move_pages(0, [a])
                t2 = time.perf_counter()
                if i >= 20:
                    one.append(t1 - t0)
                    query.append(t2 - t1)
            b = p.mmap(folios * 4096)
            p.write(b, b"\x01" * (folios * 4096))
            addrs = b + 4096 * np.arange(folios, dtype=np.int64)
            src = np.ones(folios * 4096, np.uint8)
            dst = np.ones_like(src)
            moves, copies = [], []
            for r in range(repeat + 1):
                t0 = time.perf_counter()
                p.move_pages(0, addrs, np.full(folios, 1 - r % 2))
                t1 = time.perf_counter()
                np.copyto(dst, src)
                t2 = time.perf_counter()
                if r:
                    moves.append(t1 - t0)
                    copies.append(t2 - t1)
        finally:
            if was:
                gc.enable()
    call_us = statistics.median(one) * 1e6
    folio_us = (statistics.median(moves) - statistics.median(copies)) / folios * 1e6
    return {"engine": engine, "one_page_call_us": call_us, "query_call_us": statistics.median(query) * 1e6,
            "folios": folios, "metadata_us_per_4k_folio": folio_us,
            "targets": {"one_page_call_us": TARGET_CALL_US, "metadata_us_per_4k_folio": TARGET_FOLIO_US},
            "met": {"one_page_call_us": call_us <= TARGET_CALL_US,
                    "metadata_us_per_4k_folio": folio_us <= TARGET_FOLIO_US}}


def format_overhead(o) -> str:
    if not o:
        return ""
    return (f"model overhead ({o['engine']}): one-page move_pages {o['one_page_call_us']:.1f} us "
            f"(target <= {TARGET_CALL_US:g}: {'met' if o['met']['one_page_call_us'] else 'MISSED'}), "
            f"query-only {o['query_call_us']:.1f} us, metadata {o['metadata_us_per_4k_folio']:.3f} us "
            f"per 4 KiB folio over {o['folios']} folios (target <= {TARGET_FOLIO_US:g}: "
            f"{'met' if o['met']['metadata_us_per_4k_folio'] else 'MISSED'})")
