"""Page migration: the batched state machine (core) and the system calls (syscalls)."""
from .batch_copy import BatchInfo
from .core import MIGRATE_ASYNC, MIGRATE_SYNC, MIGRATE_SYNC_LIGHT, MigrateResult, migrate_pages
from .syscalls import MovePagesResult

__all__ = ["MIGRATE_ASYNC", "MIGRATE_SYNC", "MIGRATE_SYNC_LIGHT", "BatchInfo", "MigrateResult",
           "MovePagesResult", "migrate_pages"]
