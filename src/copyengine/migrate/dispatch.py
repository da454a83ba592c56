"""How one migrate_pages() call reaches the plugins: the engine, which hooks have
implementations beyond the built-in ones (those are called directly, without pluggy's
dispatch), migration events, and the first exception a hook raised."""
from __future__ import annotations

from contextlib import contextmanager

from ..uapi import MR_SYSCALL


@contextmanager
def unlocked(m):
    """Drop the machine lock around the copy so that accesses elsewhere proceed (and
    accesses to the batch wait on their migration entries, not on the lock)."""
    m.lock.release()
    try:
        yield
    finally:
        m.lock.acquire()


def only_builtin(hook) -> bool:
    """True when the built-in ``core`` plugin alone implements a hook: the call can then
    go straight to it (same result, without pluggy's dispatch on the hot path)."""
    impls = hook.get_hookimpls()
    return len(impls) == 1 and impls[0].plugin_name == "core"


class Dispatch:
    """How one migrate_pages() call reaches the plugins, looked up once per call: the
    engine, and which hooks have implementations beyond the built-in ones.

    ``exc`` is the first exception any hook raised during the call (an observer, a
    policy, an allocation hook, an interrupt in the copy): the batch in flight is settled
    (finalized or undone), every folio not migrated is put back, the counters are
    updated, and only then does the call raise it (:func:`migrate_pages`)."""

    __slots__ = ("m", "engine", "reason", "direct_alloc", "direct_copy", "select", "events", "exc", "stream")

    def __init__(self, m, engine, reason=MR_SYSCALL):
        hook = m.pm.hook
        self.m = m
        self.engine = engine
        self.reason = reason
        self.direct_alloc = only_builtin(hook.copyengine_alloc_frames)
        self.direct_copy = only_builtin(hook.copyengine_batch_copy)
        self.select = bool(hook.copyengine_select_engine.get_hookimpls())
        self.events = bool(hook.copyengine_migration_event.get_hookimpls())
        self.exc = None
        self.stream = False  # the call moves at least NT_BYTES (migrate_pages sets it)

    def failed(self, e: BaseException) -> None:
        """Remember the first exception; the call raises it once the machine is settled."""
        if self.exc is None:
            self.exc = e

    def event(self, event, **info) -> None:
        """A migration event to the observers (trace_mm_migrate_pages and friends). An
        observer that raises does not stop the migration: the exception is kept for the
        end of the call."""
        if not self.events:
            return
        try:
            self.m.pm.hook.copyengine_migration_event(machine=self.m, event=event, info=info)
        except BaseException as e:  # noqa: B036 - re-raised by migrate_pages once settled
            self.failed(e)
