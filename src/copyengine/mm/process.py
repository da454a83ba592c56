"""Processes: address spaces of VMAs, page faults, copy-on-write, fork, pins and exit.

Everything that changes page tables or mem_map runs under ``machine.lock``. Faults are
handled a whole access at a time (all-or-nothing): the pages an access needs are planned,
allocated in bulk, and only then installed, so an access that fails (EFAULT, ENOMEM,
EHWPOISON) changes nothing.

The methods live in the modules that mirror the kernel's files, mixed into
:class:`Process` (mm_struct + task here): mm/mmap.py (VMAs, mmap, munmap), mm/memory.py
(faults, COW, zap, read/write), mm/gup.py (pins), mm/fork.py (fork). mm/ does not import
migrate/: move_pages, migrate_pages and mbind reach the syscall layer through
``machine.syscalls``, which machine.py wires in.
"""
from __future__ import annotations

import errno

from ..errors import oserror
from ..uapi import MPOL_MF_MOVE, MPOL_MF_MOVE_ALL, MPOL_MF_STRICT  # noqa: F401  (re-exported: tests import them here)
from .fork import ForkOps
from .gup import GupOps, Pin  # noqa: F401  (re-exported)
from .memory import MemoryOps, pfn_runs  # noqa: F401  (re-exported)
from .mmap import ADDRESS_LIMIT, MMAP_BASE, MmapOps, VmaRange  # noqa: F401  (re-exported)
from .vma import Vma

__all__ = ["ADDRESS_LIMIT", "MMAP_BASE", "MPOL_MF_MOVE", "MPOL_MF_MOVE_ALL", "MPOL_MF_STRICT", "Pin",
           "Process", "VmaRange", "pfn_runs"]


class Process(MmapOps, MemoryOps, GupOps, ForkOps):
    """A process: credentials, a cpuset (``mems_allowed``) and an address space."""

    def __init__(self, machine, pid, uid, cap_sys_nice, mems_allowed):
        self.machine = machine
        self.pid = pid
        self.uid = uid
        self.cap_sys_nice = cap_sys_nice
        self.mems_allowed = mems_allowed
        self.vmas: list[Vma] = []
        self._starts: list[int] = []
        self._next_addr = MMAP_BASE
        self.alive = True

    def __repr__(self):
        return f"<Process pid={self.pid} uid={self.uid} vmas={len(self.vmas)}{'' if self.alive else ' exited'}>"

    # ------------------------------------------------------------------ helpers
    def enter(self):
        """The check every syscall on this mm starts with: the machine is open (else
        MachineClosedError) and the process alive (else ESRCH)."""
        self.machine.check_open()
        if not self.alive:
            raise oserror(errno.ESRCH, f"process {self.pid} has exited")

    def exit(self) -> None:
        """End the process: every mapping is unmapped and its memory freed (pins taken by
        the process stay until released, like a driver's references)."""
        m = self.machine
        with m.lock:
            if not self.alive:
                return
            m.check_open()
            if self.vmas:
                self._unmap_range(self.vmas[0].start, self.vmas[-1].end)
            self.alive = False
            m.processes.pop(self.pid, None)

    # ------------------------------------------------------------------ syscalls
    def move_pages(self, pid, pages, nodes=None, flags=MPOL_MF_MOVE):
        """move_pages(2): see :func:`copyengine.migrate.syscalls.move_pages`. The machine
        wires the syscall layer in (mm/ does not import migrate/)."""
        return self.machine.syscalls.move_pages(self, pid, pages, nodes, flags)

    def migrate_pages(self, pid, old_nodes, new_nodes) -> int:
        """migrate_pages(2): see :func:`copyengine.migrate.syscalls.migrate_pages`."""
        return self.machine.syscalls.migrate_pages(self, pid, old_nodes, new_nodes)

    def mbind(self, addr, length, mode, nodes=(), flags=0) -> None:
        """mbind(2) on this process: see :func:`copyengine.migrate.mempolicy.do_mbind`."""
        self.machine.syscalls.mbind(self, addr, length, mode, nodes, flags)
