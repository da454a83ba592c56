"""What a migrate_pages() call leaves behind: the vmstat counters (pgmigrate_*,
thp_migration_*, and per migration reason) and the fields of the kernel's
``mm_migrate_pages`` tracepoint, computed once from the call's per-folio outcomes."""
from __future__ import annotations

import errno

import numpy as np

from ..uapi import MIGRATE_REASON

#: result code of a large folio that was split; its pages have results of their own
SPLIT = 1


def migrate_stats(m, rc, orders, mode, reason) -> dict:
    """The mm_migrate_pages fields for outcomes ``rc`` of folios of ``orders`` (an array,
    or one order for all; a split folio counts once, as failed; -EINTR, a folio an
    exception stopped, not at all)."""
    if not isinstance(orders, np.ndarray):
        if not rc.any():
            return all_migrated(m, len(rc), orders, mode, reason)
        orders = np.full(len(rc), orders, np.int64)
    nr = np.left_shift(1, orders.astype(np.int64))
    thp = orders == m.max_order
    ok, split = rc == 0, rc == SPLIT
    failed = ~ok & ~split & (rc != -errno.EINTR)
    return dict(succeeded=int(nr[ok].sum()), failed=int(nr[failed].sum()),
                thp_succeeded=int((thp & ok).sum()), thp_failed=int((thp & (failed | split)).sum()),
                thp_split=int((thp & split).sum()), large_folio_split=int((split & (orders > 0)).sum()),
                mode=mode, reason=MIGRATE_REASON[reason])


def all_migrated(m, n, order, mode, reason) -> dict:
    """:func:`migrate_stats` of ``n`` folios of ``order`` that all migrated, in scalars."""
    thp = int(order == m.max_order)
    return dict(succeeded=n << order, failed=0, thp_succeeded=n * thp, thp_failed=0, thp_split=0,
                large_folio_split=0, mode=mode, reason=MIGRATE_REASON[reason])


def count_all_migrated(m, n, order, reason) -> None:
    """:func:`count_migrate` of ``n`` folios of ``order`` that all migrated, without the
    stats dict (the small-call path's counters: a one-page call is ~15 us in all)."""
    pages = n << order
    v = m._vmstat
    v["pgmigrate_success"] += pages
    if order == m.max_order:
        v["thp_migration_success"] += n
    v["pgmigrate_success_" + MIGRATE_REASON[reason]] += pages


def count_migrate(m, stats) -> None:
    """vmstat for one call, from :func:`migrate_stats`: the kernel's counters and, per
    reason (the kernel has only the tracepoint for that), ``pgmigrate_success_<reason>``
    and ``pgmigrate_fail_<reason>`` in base pages."""
    for field, counter in _COUNTERS:
        if stats[field]:
            m.count(counter, stats[field])
    if stats["succeeded"]:
        m.count("pgmigrate_success_" + stats["reason"], stats["succeeded"])
    if stats["failed"]:
        m.count("pgmigrate_fail_" + stats["reason"], stats["failed"])


_COUNTERS = (("succeeded", "pgmigrate_success"), ("failed", "pgmigrate_fail"),
             ("thp_succeeded", "thp_migration_success"), ("thp_failed", "thp_migration_fail"),
             ("thp_split", "thp_migration_split"))
