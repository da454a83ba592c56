"""The simulated NUMA machine: nodes of page frames, mem_map, allocator, processes, vmstat."""
from __future__ import annotations

import errno
import numbers
import resource
import threading
from collections import Counter
from types import SimpleNamespace

import numpy as np

from .errors import EngineUnavailable, MachineClosedError, PluginError, oserror
from .hookcheck import check_frames, hook_plugins, plugin_label, reclaimable_frames
from .migrate.mempolicy import do_mbind
from .migrate.quarantine import release_quarantine
from .migrate.syscalls import migrate_pages, move_pages
from .mm.buddy import BuddyAllocator
from .mm.folio_ops import free_folios
from .mm.memmap import MemMap
from .mm.pageflags import OWNER_ZERO_PAGE, PG_allocated, PG_hwpoison, PG_reserved
from .mm.physmem import PhysMem
from .plugins import engine_registry, get_plugin_manager
from .settings import Settings
from .units import parse_size

HPAGE_PMD_SIZE = 2 << 20
PAGE_SIZES = (4096, 65536)
MAX_NODES = 64
DEFAULT_ENGINE = "auto"

VMSTAT_COUNTERS = (
    "pgmigrate_success", "pgmigrate_fail", "thp_migration_success", "thp_migration_fail",
    "thp_migration_split", "pgfault", "pgalloc", "pgfree", "cow_fault", "thp_split_page",
    "thp_deferred_split_page",
    "nr_hwpoison", "copy_engine_errors", "copy_fallback_folios", "copy_below_min_bytes_folios",
    "copy_quarantined_pages", "nr_quarantined_pages",
)


def _monitored(pm) -> bool:
    """Hook calls are traced or monitored (pm.enable_tracing, add_hookcall_monitoring):
    then hooks go through pluggy's own dispatch, which reports them."""
    try:
        from pluggy._callers import _multicall
    except ImportError:  # another pluggy layout: always dispatch through pluggy
        return True
    return getattr(pm, "_inner_hookexec", _multicall) is not _multicall


#: Host bytes of metadata per frame: mem_map (flags, refcount, pincount, mapcount: 4 each;
#: order: 1; head, owner, index, private: 8 each) and the buddy lists (next, prev: 8 each;
#: free_order: 1). See check_host_fits.
METADATA_BYTES_PER_FRAME = 4 * 4 + 1 + 4 * 8 + 2 * 8 + 1


def _meminfo() -> dict:
    """/proc/meminfo in bytes ({} where there is none)."""
    out = {}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                key, _, rest = line.partition(":")
                fields = rest.split()
                if fields and fields[0].isdigit():
                    out[key] = int(fields[0]) * (1024 if fields[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def _address_space_used() -> int:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmSize:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def check_host_fits(nbytes: int, nframes: int) -> None:
    """Refuse (ValueError, naming the limit) a machine this host cannot hold.

    The rule: the frames' buffer is MAP_NORESERVE, so its size is bounded only by the
    address space: ``nbytes`` plus the metadata must fit under RLIMIT_AS less what the
    process already maps. The metadata arrays (``METADATA_BYTES_PER_FRAME`` per frame)
    are written as the machine is built (the buddy lists) and used - so touched - as it
    runs, and cannot be given back: they must fit in MemAvailable. Untouched frames cost
    nothing, so a machine larger than the host's RAM is fine; the frames a user writes
    are the user's to size, like overcommitted memory in Linux."""
    meta = nframes * METADATA_BYTES_PER_FRAME
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        room = soft - _address_space_used()
        if nbytes + meta > room:
            raise ValueError(f"a machine of {nbytes} bytes needs {nbytes + meta} bytes of address "
                             f"space (frames + metadata); RLIMIT_AS leaves {max(room, 0)}")
    avail = _meminfo().get("MemAvailable")
    if avail is not None and meta > avail:
        raise ValueError(f"a machine of {nframes} frames needs {meta} bytes of metadata "
                         f"({METADATA_BYTES_PER_FRAME} per frame) but the host has {avail} bytes "
                         f"available (MemAvailable); use fewer nodes, a smaller node_size or 64KiB pages")


class Machine:
    """A NUMA machine: ``nodes`` nodes of ``node_size`` bytes, base pages of ``page_size``.

    All frames live in one lazily backed buffer (node i owns pfns
    ``[i * frames_per_node, (i + 1) * frames_per_node)``); per-frame metadata lives in
    :class:`~copyengine.mm.memmap.MemMap` arrays; each node has a buddy allocator serving
    folios of order 0 up to 2 MiB. One lock (``lock``, with ``cond`` for migration-entry
    waiters) serializes page-table and mem_map updates, like mmap_lock plus the PTL.

    Sizes this host cannot hold are refused up front with a ValueError naming the limit
    (:func:`check_host_fits`: frames plus metadata within RLIMIT_AS, the metadata - 66
    bytes per frame - within MemAvailable; untouched frames cost nothing).
    After :meth:`close`, every call on the machine or its processes raises
    :class:`copyengine.errors.MachineClosedError`, which is both an ``OSError`` (errno
    ENXIO: what system-call shaped calls raise) and a ``ValueError`` (what the others raise).
    """

    def __init__(self, nodes=2, node_size="256MiB", page_size="4KiB", *, engine=None,
                 plugin_manager=None):
        if isinstance(nodes, bool) or not isinstance(nodes, numbers.Integral):
            raise TypeError(f"nodes must be an int, not {type(nodes).__name__}")
        if not 1 <= nodes <= MAX_NODES:
            raise ValueError(f"nodes must be in 1..{MAX_NODES}, got {nodes}")
        page_size = parse_size(page_size, "page_size")
        if page_size not in PAGE_SIZES:
            raise ValueError(f"page_size must be 4KiB or 64KiB, got {page_size}")
        node_size = parse_size(node_size, "node_size")
        if node_size % HPAGE_PMD_SIZE:
            raise ValueError(f"node_size must be a multiple of 2MiB (the largest folio), got {node_size}")
        check_host_fits(int(nodes) * node_size, int(nodes) * (node_size // page_size))
        self.nodes = int(nodes)
        self.page_size = page_size
        self.page_shift = page_size.bit_length() - 1
        self.node_size = node_size
        self.hpage_pmd_nr = HPAGE_PMD_SIZE // page_size
        self.max_order = self.hpage_pmd_nr.bit_length() - 1
        self.frames_per_node = node_size // page_size
        self.total_frames = self.nodes * self.frames_per_node
        self.phys = PhysMem(self.nodes * node_size)
        self.mem_map = MemMap(self.total_frames)
        self.buddy = BuddyAllocator(self.nodes, self.frames_per_node, self.max_order)
        self.lock = threading.RLock()
        self.cond = threading.Condition(self.lock)
        self.pm = plugin_manager if plugin_manager is not None else get_plugin_manager()
        self.objects = {}         # owner id -> AnonVma / Shmem (rmap roots)
        self.processes = {}       # pid -> Process
        # the syscall layer (migrate/) wired in from above, so that Process's move_pages,
        # migrate_pages and mbind reach it without mm/ importing migrate/
        self.syscalls = SimpleNamespace(move_pages=move_pages, migrate_pages=migrate_pages, mbind=do_mbind)
        self._next_pid = 1
        self._vmstat = Counter({k: 0 for k in VMSTAT_COUNTERS})
        self.settings = Settings(self)
        self.migrate_times = dict.fromkeys(("prepare", "unmap", "move", "copy", "finalize", "fused"), 0.0)
        self._closed = False
        self._engine = None
        self.engine_spec = None
        self._engine_users = {}   # id(engine) -> migrations using it
        self._retired = {}        # engines replaced while in use, closed by their last user
        self.quarantine = []      # (completion, heads): destinations an engine may still write
        self.scratch_freed = np.zeros(1, np.int64)  # the small-call path's out-count (under the lock)
        self.recorder = None      # a copyengine.trace.Recorder while one is attached
        self.offline_nodes = set()  # offline_node(): nodes that allocate nothing
        # The shared zero page: frame 0 of node 0, reserved for the machine's life.
        self.zero_pfn = int(self.buddy.alloc_exact(0, 0, 1)[0])
        mm = self.mem_map
        mm.prep_new_folios(np.array([self.zero_pfn]), 0)
        mm.flags[self.zero_pfn] |= PG_reserved
        mm.owner[self.zero_pfn] = OWNER_ZERO_PAGE
        self.set_engine(DEFAULT_ENGINE if engine is None else engine)

    # ----------------------------------------------------------------- lifecycle
    def close(self) -> None:
        """End every process and release the physical memory. Idempotent."""
        if self._closed:
            return
        self._closed = True
        with self.lock:
            late = release_quarantine(self, self.settings["copy_timeout"])
        if self._engine is not None:
            self._engine.close()
        if not late:  # else an engine may still write: the memory stays mapped (leaked), not torn down under it
            self.phys.close()

    @property
    def closed(self) -> bool:
        return self._closed

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def check_open(self):
        """Raise :class:`copyengine.errors.MachineClosedError` after close(): an OSError
        (ENXIO) for system-call shaped calls and a ValueError for the rest, in one class."""
        if self._closed:
            raise MachineClosedError()

    def __repr__(self):
        return (f"<Machine nodes={self.nodes} node_size={self.node_size} page_size={self.page_size}"
                f" engine={self.engine_spec!r}{' closed' if self._closed else ''}>")

    # ----------------------------------------------------------------- memory
    @property
    def mem(self) -> np.ndarray:
        """Physical memory as one uint8 array (frames of node i after node i-1's)."""
        return self.phys.mem

    def node_of_pfn(self, pfn):
        return pfn // self.frames_per_node

    def free_pages(self, node=None) -> int:
        """Free base pages on ``node`` (or the whole machine)."""
        return self.buddy.free_pages(node)

    def _alloc_hook(self, node: int, order: int, count: int) -> np.ndarray:
        """Call copyengine_alloc_frames and check what it returned (hookcheck.check_frames)
        before anything indexes with it. A refused result raises PluginError naming the
        plugin, after the blocks the plugin did take from the allocator are given back."""
        hook = self.pm.hook.copyengine_alloc_frames
        impls = hook.get_hookimpls()
        if len(impls) == 1 and impls[0].plugin_name == "core" and not _monitored(self.pm):
            # the built-in allocator alone (what core_plugin returns): trusted, unchecked
            return self.buddy.alloc(node, order, count)
        who = None
        if any(i.hookwrapper or i.wrapper for i in impls) or _monitored(self.pm):
            frames = hook(machine=self, node=node, order=order, count=count)
        else:
            # firstresult, called as pluggy would (last registered / tryfirst first), so
            # that a refused result names the one plugin that returned it
            kwargs = {"machine": self, "node": node, "order": order, "count": count}
            frames = None
            for impl in reversed(impls):
                frames = impl.function(*[kwargs[a] for a in impl.argnames])
                if frames is not None:
                    who = plugin_label(impl)
                    break
        try:
            return check_frames(self, frames, node, order, count, who or hook_plugins(hook))
        except PluginError:
            self.buddy.free(reclaimable_frames(self, frames, node, order), order)
            raise

    def alloc_folios(self, node: int, order: int, count: int) -> np.ndarray:
        """Allocate ``count`` folios through the allocation hook; ENOMEM (nothing kept) if short."""
        if self.offline_nodes and node in self.offline_nodes:
            raise oserror(errno.ENOMEM, f"node {node} is offline")
        heads = self._alloc_hook(node, order, count)
        if len(heads) < count:
            self.buddy.free(heads, order)
            raise oserror(errno.ENOMEM, f"node {node} cannot supply {count} folio(s) of "
                                        f"{self.page_size << order} bytes")
        self.mem_map.prep_new_folios(heads, order)
        self._vmstat["pgalloc"] += count << order
        return heads

    def alloc_folios_upto(self, node: int, order: int, count: int, *, direct=False) -> np.ndarray:
        """Like alloc_folios, but hand back however many (possibly none) the node had.
        ``direct``: the caller found only the built-in allocation hook registered, so the
        buddy allocator is called without pluggy's dispatch (the same result)."""
        if self.offline_nodes and node in self.offline_nodes:  # nothing from an offline node
            return np.empty(0, np.int64)
        if direct:
            heads = self.buddy.alloc(node, order, count)
        else:
            heads = self._alloc_hook(node, order, count)
        if len(heads):
            self.mem_map.prep_new_folios(heads, order)
            self._vmstat["pgalloc"] += len(heads) << order
        return heads

    def free_folios(self, heads, *, undo=False) -> None:
        """Give folios back to the buddy allocator (free_unref_folios). Poisoned pages
        are kept out for good; the rest of a poisoned folio is freed page by page.
        ``undo``: the folios were allocated by a call that is failing as a whole (all or
        nothing), so the allocation is taken back from pgalloc instead of counted in pgfree."""
        heads = np.ascontiguousarray(heads, dtype=np.int64)
        if not len(heads):
            return
        b = self.buddy
        freed = free_folios(heads, *self.mem_map.arrays(), b.frames_per_node, b.max_order, *b.lists())
        if freed < 0:
            raise AssertionError("freeing a reserved frame or one that is already free (double free)")
        if undo:
            self._vmstat["pgalloc"] -= int(freed)
        else:
            self._vmstat["pgfree"] += int(freed)

    def hwpoison(self, pfn) -> None:
        """Mark a frame hardware-poisoned (memory_failure). A free frame is taken out of
        the allocator at once; an allocated one when its folio is freed. Accesses to it
        raise OSError(EHWPOISON); migration of its folio fails with -EHWPOISON."""
        self.check_open()
        if isinstance(pfn, bool) or not isinstance(pfn, numbers.Integral):
            raise TypeError(f"pfn must be an int, not {type(pfn).__name__}")
        if not 0 <= pfn < self.total_frames:
            raise ValueError(f"pfn {pfn} outside the machine (0..{self.total_frames - 1})")
        pfn = int(pfn)
        with self.lock:
            mm = self.mem_map
            if mm.flags[pfn] & PG_hwpoison:
                return
            if not mm.flags[pfn] & PG_allocated:
                taken = self.buddy.take_off(pfn)
                assert taken, f"pfn {pfn} is neither allocated nor free"
            mm.flags[pfn] |= PG_hwpoison
            self._vmstat["nr_hwpoison"] += 1

    def offline_node(self, node) -> int:
        """Take ``node`` offline: see :func:`copyengine.migrate.mempolicy.offline_pages`."""
        from .migrate.mempolicy import offline_pages
        return offline_pages(self, node)

    def online_node(self, node) -> None:
        """Let ``node`` allocate again: see :func:`copyengine.migrate.mempolicy.online_pages`."""
        from .migrate.mempolicy import online_pages
        online_pages(self, node)

    def demote(self, node, nr_pages) -> int:
        """Demote up to ``nr_pages`` pages: see :func:`copyengine.migrate.mempolicy.demote_folios`."""
        from .migrate.mempolicy import demote_folios
        return demote_folios(self, node, nr_pages)

    # ----------------------------------------------------------------- processes
    def spawn(self, uid=1000, cap_sys_nice=False, mems_allowed=None):
        """A new process (empty address space) with credentials and a cpuset."""
        from .mm.process import Process
        self.check_open()
        if isinstance(uid, bool) or not isinstance(uid, numbers.Integral):
            raise TypeError(f"uid must be an int, not {type(uid).__name__}")
        if uid < 0:
            raise ValueError(f"uid must be >= 0, got {uid}")
        if not isinstance(cap_sys_nice, bool):
            raise TypeError(f"cap_sys_nice must be a bool, not {type(cap_sys_nice).__name__}")
        allowed = self.node_set(mems_allowed, "mems_allowed") if mems_allowed is not None \
            else frozenset(range(self.nodes))
        if not allowed:
            raise ValueError("mems_allowed must name at least one node")
        with self.lock:
            pid = self._next_pid
            self._next_pid += 1
            p = Process(self, pid, int(uid), cap_sys_nice, allowed)
            self.processes[pid] = p
            return p

    def node_set(self, nodes, what="node set") -> frozenset:
        """Validate an iterable of node ids (ValueError/TypeError)."""
        if isinstance(nodes, (str, bytes)) or not hasattr(nodes, "__iter__"):
            raise TypeError(f"{what} must be an iterable of ints, not {type(nodes).__name__}")
        out = set()
        for n in nodes:
            if isinstance(n, bool) or not isinstance(n, numbers.Integral):
                raise TypeError(f"{what} holds {n!r}, not an int")
            if not 0 <= n < self.nodes:
                raise ValueError(f"{what} names node {n}; this machine has nodes 0..{self.nodes - 1}")
            out.add(int(n))
        return frozenset(out)

    # ----------------------------------------------------------------- engines
    def engines(self) -> dict:
        """Registered engines by name (see :func:`copyengine.plugins.engine_registry`)."""
        return engine_registry(self.pm)

    def set_engine(self, spec) -> None:
        """Select the copy engine by spec (``"serial"``, ``"mt:4"``, ...). Raises ValueError
        or TypeError for a bad spec, EngineUnavailable when it cannot run here; the
        previous engine stays selected on any error."""
        from .engines.base import create_engine
        self.check_open()
        engine = create_engine(spec, self, self.engines())
        with self.lock:
            old, self._engine, self.engine_spec = self._engine, engine, spec
            # A migration in flight keeps the engine it started with: the last one closes it.
            if old is not None and self._engine_users.get(id(old)):
                self._retired[id(old)] = old
                old = None
        if old is not None:
            old.close()

    @property
    def engine(self):
        return self._engine

    def get_engine(self):
        """The current engine, held until put_engine(): set_engine() meanwhile does not
        close it under the caller (the migration that started with it finishes with it)."""
        with self.lock:
            engine = self._engine
            self._engine_users[id(engine)] = self._engine_users.get(id(engine), 0) + 1
            return engine

    def put_engine(self, engine) -> None:
        with self.lock:
            n = self._engine_users.get(id(engine), 0) - 1
            if n > 0:
                self._engine_users[id(engine)] = n
                return
            self._engine_users.pop(id(engine), None)
            retired = self._retired.pop(id(engine), None)
        if retired is not None:
            retired.close()

    # ----------------------------------------------------------------- counters
    @property
    def vmstat(self) -> dict:
        """A snapshot of the event counters (plain ints), like /proc/vmstat."""
        with self.lock:
            out = {k: int(v) for k, v in self._vmstat.items()}
        out["nr_free_pages"] = self.free_pages() if not self._closed else 0
        return out

    def count(self, name: str, n: int = 1) -> None:
        self._vmstat[name] += int(n)


__all__ = ["Machine", "EngineUnavailable"]
