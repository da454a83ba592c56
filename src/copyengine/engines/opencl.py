"""The ``opencl[:CHANNELS]`` engine: an OpenCL device standing in for a DMA engine.

The machine's physical memory is shared zero-copy with the device: ``CL_MEM_USE_HOST_PTR``
buffers lie over ``machine.mem`` itself (no byte is staged). The device is PoCL's CPU
device by default (``pocl-binary-distribution`` from PyPI); pyopencl's own convention picks
another: when ``PYOPENCL_CTX`` is set, the context comes from
``pyopencl.create_some_context(interactive=False)``. Whatever the device, a probe at
creation checks that writes through such buffers land in host memory (and host writes are
seen by the device) without map/unmap; a device that copies instead is unavailable.

A device limits one buffer to ``CL_DEVICE_MAX_MEM_ALLOC_SIZE`` (1-8 GiB on PoCL), so a large
machine's memory is shared as several buffers over consecutive sub-ranges, and copies are
split at their edges.

The dmaengine shape, per batch (:meth:`OpenCLEngine.submit`):

* **prep** - one descriptor list for the whole batch: folios whose source is poisoned are
  answered -EIO at once and never read (the engine is not machine-check safe: the
  framework then runs ``folio_mc_copy``, which reports -EHWPOISON); contiguous runs are
  coalesced (also across folios: completion is tracked per *segment*, and each segment
  knows which folios it touches, so the per-folio mapping is kept); runs are cut into
  work-group chunks and at buffer edges.
* **submit / issue_pending** - the list is cut into segments (total / (channels * DEPTH),
  1 to 8 MiB each), dealt round-robin to the channels. A channel is an in-order
  command queue; each segment is one kernel launch (a table of ulong-word copies, one
  work-group per chunk of at most 256 KiB) per pair of buffers it touches, or a single
  ``clEnqueueCopyBuffer`` when it is one piece (lower latency); a piece not made of whole
  8-byte words is always a copy-buffer command. On a CPU device whose compiler has them
  the kernel uses non-temporal stores (``nontemporal=False`` turns them off). At most
  ``DEPTH`` segments per channel are on the device at a time; the rest are issued as
  earlier ones complete.
* **completion** - a segment's last event (in-order queue) completes it: an event
  callback, or the waiter's poll (whichever sees it first; pyopencl runs callbacks on a
  fresh thread that must win the GIL), records its folios (a folio is done when every
  segment touching it is) and issues that channel's next segment. Folios complete out of
  order across channels. ``wait(timeout)`` is bounded.
* **terminate_sync** - ``cancel()`` stops issuing (under the same lock the callbacks take)
  and waits, bounded by ``drain_timeout``, until every issued command has completed; after
  it returns nothing writes. A command that cannot be drained in that time raises
  RuntimeError rather than let a write land in freed memory unannounced. Nothing can stop
  a command the device already runs, so cancel takes up to DEPTH segments per channel
  (a few ms).

Descriptors outside physical memory answer -EFAULT and ones whose source and destination
overlap -EINVAL, uncopied (the framework's fallback then decides). Engines still open at
interpreter exit are closed by an ``atexit`` hook.
"""
from __future__ import annotations

import atexit
import errno
import mmap
import os
import threading
import time
import weakref
from collections import deque

import numpy as np

from ..errors import EngineUnavailable
from ..hookspecs import hookimpl
from .base import PENDING, Capabilities, Completion, Engine

DEFAULT_CHANNELS = 2
MAX_CHANNELS = 16
#: below this many bytes a batch is not worth offloading (the ``min_bytes`` capability the
#: policy reads). Measured on PoCL over 2 CPU cores (``copyengine bench --scenario engines
#: --configs serial,opencl`` repeats it): ~75 us per submit+wait of a tiny job, and
#: opencl:2 overtakes ``serial`` (folio_mc_copy) between 4 and 8 MiB for 4 KiB folios
#: and between 8 and 16 MiB for 2 MiB folios: the device copies on the very CPUs it would
#: relieve. A default batch (512 base pages) is 2 MiB.
MIN_BYTES = 8 << 20
#: bytes one work-group copies (chunks are cut at absolute source multiples of this)
CHUNK = 256 << 10
#: a segment (one unit of completion and of cancellation latency) spans this much, or more
#: when the batch is large (total / (channels * DEPTH)), never more than SEG_MAX
SEG_MIN = 1 << 20
SEG_MAX = 8 << 20
#: segments per channel on the device at once
DEPTH = 2
#: an aligned group with at most this many pieces goes as copy-buffer commands, not a kernel
SMALL_PIECES = 1
#: jobs with at most this many descriptors are validated and planned in plain Python
SMALL_DESC = 32
#: wait() polls issued events every POLL_MIN seconds at first, backing off to POLL_MAX
POLL_MIN = 20e-6
POLL_MAX = 2e-3
#: seconds cancel() and close() wait for issued commands to drain
DRAIN_TIMEOUT = 30.0
#: seconds a probe command may take at engine creation
PROBE_TIMEOUT = 30.0

KERNEL_SRC = r"""
/* tab: n source word offsets, n destination word offsets, n word counts (one per chunk) */
__kernel void copy_words_loop(__global const ulong *src, __global ulong *dst,
                              __global const long *tab, long n)
{
    size_t g = get_group_id(0);
    __global const ulong *s = src + tab[g];
    __global ulong *d = dst + tab[n + g];
    long w = tab[2 * n + g];
    for (long i = 0; i < w; i++)
        d[i] = s[i];
}

__kernel void copy_words_strided(__global const ulong *src, __global ulong *dst,
                                 __global const long *tab, long n)
{
    size_t g = get_group_id(0);
    long l = get_local_id(0), L = get_local_size(0);
    __global const ulong *s = src + tab[g];
    __global ulong *d = dst + tab[n + g];
    long w = tab[2 * n + g];
    for (long i = l; i < w; i += L)
        d[i] = s[i];
}
"""

#: The CPU kernel with non-temporal stores (Clang's __builtin_nontemporal_store, which
#: PoCL's compiler has): like the kernel's TODO in the seed, copied pages do not evict the
#: migrating CPU's cache, and large copies skip the read-for-ownership of the destination.
#: Head and tail words up to a 64-byte destination boundary are copied plainly; sources
#: may be unaligned (vload8); an sfence orders the streaming stores before completion.
NT_KERNEL_SRC = r"""
#if !defined(__has_builtin)
#error "no __has_builtin"
#elif !__has_builtin(__builtin_nontemporal_store)
#error "no __builtin_nontemporal_store"
#endif
__kernel void copy_words_nt(__global const ulong *src, __global ulong *dst,
                            __global const long *tab, long n)
{
    size_t g = get_group_id(0);
    __global const ulong *s = src + tab[g];
    __global ulong *d = dst + tab[n + g];
    long w = tab[2 * n + g];
    long h = (long)((8 - (((uintptr_t)d >> 3) & 7)) & 7);
    if (h > w)
        h = w;
    for (long i = 0; i < h; i++)
        d[i] = s[i];
    __global ulong8 *dv = (__global ulong8 *)(d + h);
    __global const ulong *sv = s + h;
    long m = (w - h) >> 3;
    for (long i = 0; i < m; i++)
        __builtin_nontemporal_store(vload8(i, sv), dv + i);
    for (long i = h + (m << 3); i < w; i++)
        d[i] = s[i];
#if defined(__x86_64__) || defined(__i386__)
    __builtin_ia32_sfence();
#endif
}
"""


# --------------------------------------------------------------------------- device setup
def _import_cl():
    try:
        import pyopencl as cl
    except Exception as e:  # ImportError, or a broken ICD loader at import time
        raise EngineUnavailable(
            f"opencl: pyopencl cannot be imported ({type(e).__name__}: {e}); "
            "install it with: pip install 'copyengine[opencl]'") from None
    return cl


def _device_list(cl):
    try:
        platforms = cl.get_platforms()
    except Exception as e:
        raise EngineUnavailable(f"opencl: no OpenCL platform ({type(e).__name__}: {e}); "
                                "install one, e.g. pip install pocl-binary-distribution") from None
    if not platforms:
        raise EngineUnavailable("opencl: no OpenCL platform found; install one, e.g. "
                                "pip install pocl-binary-distribution")
    out = []
    for p in platforms:
        try:
            out.extend(p.get_devices())
        except Exception:  # a platform without devices raises DEVICE_NOT_FOUND
            continue
    return platforms, out


def _choose_device(cl):
    """(context or None, device): PYOPENCL_CTX when set, else a CPU device, PoCL first."""
    if os.environ.get("PYOPENCL_CTX") is not None:
        try:
            ctx = cl.create_some_context(interactive=False)
        except Exception as e:
            raise EngineUnavailable(
                f"opencl: PYOPENCL_CTX={os.environ['PYOPENCL_CTX']!r} names no usable device "
                f"({type(e).__name__}: {e})") from None
        return ctx, ctx.devices[0]
    platforms, devices = _device_list(cl)
    if not devices:
        raise EngineUnavailable(
            "opencl: no OpenCL device on platform(s) "
            + ", ".join(repr(p.name) for p in platforms))
    cpus = [d for d in devices if d.type & cl.device_type.CPU]
    if not cpus:
        raise EngineUnavailable(
            "opencl: no OpenCL CPU device (found " + ", ".join(repr(d.name) for d in devices)
            + "); set PYOPENCL_CTX to choose another device")
    cpus.sort(key=lambda d: "portable computing language" not in d.platform.name.lower())
    return None, cpus[0]


def _bounded_wait(cl, events, timeout):
    """Wait for events with a deadline (callbacks + a threading.Event; polled as a
    safety net). True when every event completed (or failed); False on timeout."""
    deadline = time.monotonic() + timeout
    for ev in events:
        flag = threading.Event()
        try:
            ev.set_callback(cl.command_execution_status.COMPLETE, lambda _s, f=flag: f.set())
        except Exception:
            flag.set()
        while ev.command_execution_status > 0:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            flag.wait(min(left, 0.01))
        # let the callback run now, not during interpreter shutdown (see _close_all)
        flag.wait(max(0.0, min(1.0, deadline - time.monotonic())))
    return True


class _Device:
    """A context, the built program and what the probe found; shared by engines on one device."""

    def __init__(self, cl, ctx, device):
        self.cl = cl
        self.device = device
        self.ctx = ctx if ctx is not None else cl.Context(devices=[device])
        self.is_cpu = bool(device.type & cl.device_type.CPU)
        try:
            self.program = cl.Program(self.ctx, KERNEL_SRC).build()
        except Exception as e:
            raise EngineUnavailable(f"opencl: cannot build the copy kernel for {device.name!r}: "
                                    f"{type(e).__name__}: {str(e)[:400]}") from None
        self.kernel_name = "copy_words_loop" if self.is_cpu else "copy_words_strided"
        probe_kernel = cl.Kernel(self.program, self.kernel_name)
        if self.is_cpu:
            self.local_size = 1
        else:
            wg = probe_kernel.get_work_group_info(cl.kernel_work_group_info.WORK_GROUP_SIZE, device)
            self.local_size = int(min(256, wg, device.max_work_group_size))
        self.max_alloc = int(device.max_mem_alloc_size)
        self.base_align = max(8, int(device.mem_base_addr_align) // 8)
        self._probe(probe_kernel)
        # non-temporal stores: CPU devices whose compiler has them, checked like the rest
        self.nt_program = None
        if self.is_cpu:
            try:
                prg = cl.Program(self.ctx, NT_KERNEL_SRC).build()
                self._probe(cl.Kernel(prg, "copy_words_nt"), odd=True)
                self.nt_program = prg
            except Exception:
                self.nt_program = None

    def kernel(self, nontemporal):
        """(program, kernel name) for the engine's copies."""
        if nontemporal and self.nt_program is not None:
            return self.nt_program, "copy_words_nt"
        return self.program, self.kernel_name

    def _probe(self, kernel, odd=False):
        """Check zero-copy sharing on a private page-aligned mapping like machine.mem
        (and, with ``odd``, a copy whose source and destination are not 64-byte aligned)."""
        cl = self.cl
        size = 64 << 10
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS,
                      prot=mmap.PROT_READ | mmap.PROT_WRITE)
        a = np.frombuffer(m, dtype=np.uint8)
        half = size // 2
        try:
            buf = cl.Buffer(self.ctx, cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR, hostbuf=a)
            q = cl.CommandQueue(self.ctx, self.device)
            tab = np.array([1, half // 8 + 5, 1019] if odd else [0, half // 8, 1024], np.int64)
            tbuf = cl.Buffer(self.ctx, cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR, hostbuf=tab)
            for rnd in range(2):
                a[:half] = np.arange(half, dtype=np.uint32).view(np.uint8)[:half] + rnd + 1
                a[half:] = 0
                kernel.set_args(buf, buf, tbuf, np.int64(1))
                ev1 = cl.enqueue_nd_range_kernel(q, kernel, (self.local_size,), (self.local_size,))
                ev2 = cl.enqueue_copy(q, buf, buf, src_offset=8192, dst_offset=half + 8192,
                                      byte_count=4096 + 5)
                q.flush()
                if not _bounded_wait(cl, [ev1, ev2], PROBE_TIMEOUT):
                    raise EngineUnavailable(f"opencl: device {self.device.name!r} did not finish a "
                                            f"probe copy in {PROBE_TIMEOUT:.0f} s")
                if ev1.command_execution_status < 0 or ev2.command_execution_status < 0:
                    raise EngineUnavailable(f"opencl: device {self.device.name!r} failed a probe copy")
                k0, k1, kn = (int(x) * 8 for x in tab)
                ok = (np.array_equal(a[k1:k1 + kn], a[k0:k0 + kn])
                      and not a[half:k1].any() and not a[k1 + kn:half + 8192].any()
                      and np.array_equal(a[half + 8192:half + 8192 + 4101], a[8192:8192 + 4101])
                      and not a[half + 8192 + 4101:].any())
                if not ok:
                    raise EngineUnavailable(
                        f"opencl: device {self.device.name!r} does not share host memory "
                        "zero-copy (USE_HOST_PTR buffers are copies there)")
            del buf, tbuf, q      # every command completed (bounded wait above)
        except EngineUnavailable:
            raise
        except Exception as e:
            raise EngineUnavailable(f"opencl: probe on {self.device.name!r} failed: "
                                    f"{type(e).__name__}: {e}") from None
        finally:
            del a
            try:
                m.close()
            except BufferError:
                pass

    def describe(self):
        d = self.device
        return {"device": d.name.strip(), "platform": d.platform.name.strip(),
                "version": d.version.strip(), "driver": d.driver_version.strip(),
                "type": "|".join(n for n in ("CPU", "GPU", "ACCELERATOR", "CUSTOM")
                                 if d.type & getattr(self.cl.device_type, n, 0)) or str(d.type),
                "compute_units": int(d.max_compute_units),
                "max_mem_alloc_size": self.max_alloc}


_devices: dict = {}
_devices_lock = threading.Lock()


def open_device():
    """The shared :class:`_Device` for the chosen device; EngineUnavailable naming why not."""
    cl = _import_cl()
    ctx, device = _choose_device(cl)
    key = (device.platform.name, device.name, device.int_ptr)
    with _devices_lock:
        dev = _devices.get(key)
        if dev is None:
            dev = _Device(cl, ctx, device)
            _devices[key] = dev
        return dev


# --------------------------------------------------------------------------- memory windows
class _MemBuffers:
    """USE_HOST_PTR buffers over consecutive ``region``-byte sub-ranges of one memory array."""

    def __init__(self, dev, mem, region):
        cl = dev.cl
        if not isinstance(mem, np.ndarray) or mem.dtype != np.uint8 or mem.ndim != 1 \
                or not mem.flags.c_contiguous or not mem.flags.writeable:
            raise ValueError("opencl: physical memory must be a writable contiguous 1-D uint8 array")
        self.ptr = mem.__array_interface__["data"][0]
        if self.ptr % max(4096, dev.base_align):
            raise ValueError("opencl: physical memory must be page aligned to be shared zero-copy")
        self.size = mem.nbytes
        self.region = region
        self.bufs = []
        flags = cl.mem_flags.READ_WRITE | cl.mem_flags.USE_HOST_PTR
        for off in range(0, self.size, region):
            self.bufs.append(cl.Buffer(dev.ctx, flags, hostbuf=mem[off:off + region]))

    def matches(self, mem):
        return mem.__array_interface__["data"][0] == self.ptr and mem.nbytes == self.size

    def release(self):
        for b in self.bufs:
            try:
                b.release()
            except Exception:
                pass
        self.bufs = []


# --------------------------------------------------------------------------- planning
def plan_pieces(src, dst, nbytes, seg, region, chunk):
    """Coalesce contiguous descriptors (never across segments), cut at absolute source
    multiples of ``chunk`` and at destination multiples of ``region`` (buffer edges; source
    edges are chunk multiples). Returns (src, dst, nbytes, seg) of the pieces, in
    descriptor order except pieces split off at a destination edge, which come last."""
    n = len(src)
    if n > 1:
        brk = np.empty(n, bool)
        brk[0] = True
        np.not_equal(src[:-1] + nbytes[:-1], src[1:], out=brk[1:])
        brk[1:] |= dst[:-1] + nbytes[:-1] != dst[1:]
        brk[1:] |= seg[:-1] != seg[1:]
        if brk.all():
            rs, rd, rn, rseg = src, dst, nbytes, seg
        else:
            starts = np.flatnonzero(brk)
            rs, rd, rseg = src[starts], dst[starts], seg[starts]
            rn = np.add.reduceat(nbytes, starts)
    else:
        rs, rd, rn, rseg = src, dst, nbytes, seg
    base = rs // chunk
    first_end = np.minimum(rs + rn, (base + 1) * chunk)
    if (first_end == rs + rn).all():         # every run inside one chunk
        ps, pd, pn, pseg = rs, rd, rn, rseg
    else:
        k = 1 + (rs + rn - first_end + chunk - 1) // chunk
        idx = np.repeat(np.arange(len(rs)), k)
        j = np.arange(len(idx)) - np.repeat(np.cumsum(k) - k, k)
        ps = np.where(j == 0, rs[idx], (base[idx] + j) * chunk)
        pe = np.minimum((base[idx] + j + 1) * chunk, rs[idx] + rn[idx])
        pd = rd[idx] + (ps - rs[idx])
        pn = pe - ps
        pseg = rseg[idx]
    edge = (pd // region + 1) * region
    over = pd + pn - edge
    x = np.flatnonzero(over > 0)
    if len(x):  # a piece (<= chunk <= region) crosses at most one destination edge
        head = edge[x] - pd[x]
        ps = np.concatenate((ps, ps[x] + head))
        pd = np.concatenate((pd, edge[x]))
        pn = np.concatenate((pn, over[x]))
        pn[x] = head
        pseg = np.concatenate((pseg, pseg[x]))
    return ps, pd, pn, pseg


class _Segment:
    __slots__ = ("index", "channel", "folios", "nbytes", "groups", "event", "keep", "failed")

    def __init__(self, index, channel, folios, nbytes):
        self.index = index
        self.channel = channel
        self.folios = folios
        self.nbytes = nbytes
        self.groups = []     # ("kernel", sb, db, table) or ("copy", sb, db, s, d, n)
        self.event = None
        self.keep = None     # table buffers alive until the segment completes
        self.failed = False  # a command of it could not be enqueued: its folios get -EIO


# --------------------------------------------------------------------------- completion
class OpenCLCompletion(Completion):
    """Per-folio completion of one batch, filled by segment events in any order."""

    def __init__(self, engine, nr_folios):
        super().__init__(nr_folios)
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
            else:
                self.result[f] = -errno.EIO
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


# --------------------------------------------------------------------------- the engine
class OpenCLEngine(Engine):
    """OpenCL copy offload over zero-copy shared physical memory (see the module doc)."""

    def __init__(self, machine=None, channels=DEFAULT_CHANNELS, *, device=None,
                 max_buffer=None, drain_timeout=DRAIN_TIMEOUT, nontemporal=None,
                 min_bytes=MIN_BYTES):
        channels = _check_channels(channels)
        self.dev = device if device is not None else open_device()
        self._cl = self.dev.cl
        self.channels = channels
        limit = self.dev.max_alloc if max_buffer is None else min(int(max_buffer), self.dev.max_alloc)
        self.region = max(CHUNK, limit // CHUNK * CHUNK)
        self.drain_timeout = float(drain_timeout)
        cu = int(self.dev.device.max_compute_units) if self.dev.is_cpu else 0
        self.capabilities = Capabilities(asynchronous=True, threads=cu, channels=channels,
                                         min_bytes=int(min_bytes), max_batch=0, mc_safe=False)
        cl = self._cl
        self._queues = [cl.CommandQueue(self.dev.ctx, self.dev.device) for _ in range(channels)]
        if nontemporal and self.dev.nt_program is None:
            raise EngineUnavailable(f"opencl: no non-temporal copy kernel on {self.dev.device.name!r}")
        program, self.kernel_name = self.dev.kernel(nontemporal is not False)
        self._kernel = cl.Kernel(program, self.kernel_name)
        self._lock = threading.RLock()     # enqueue (kernel args) and buffer cache
        self._mem = None
        self._active = weakref.WeakSet()
        self._holds = []
        self._rr = 0
        self._closed = False
        if machine is not None and getattr(machine, "mem", None) is not None:
            self._mem = _MemBuffers(self.dev, machine.mem, self.region)
        _live_engines.add(self)

    # ---- planning
    def _buffers(self, mem):
        with self._lock:
            if self._mem is None or not self._mem.matches(mem):
                old, self._mem = self._mem, _MemBuffers(self.dev, mem, self.region)
                if old is not None and not self._active:
                    old.release()
            return self._mem

    def submit(self, job):
        """prep + submit + issue_pending: returns an :class:`OpenCLCompletion`."""
        if self._closed:
            raise RuntimeError("opencl: the engine is closed")
        mb = self._buffers(job.mem)
        nf = int(job.nr_folios)
        comp = OpenCLCompletion(self, nf)
        comp._mb = mb
        if len(job.nbytes) <= SMALL_DESC:
            planned = self._prep_small(comp, mb, job)
        else:
            planned = self._prep(comp, mb, job)
        if planned:
            with self._lock:
                if self._closed:   # close() ran meanwhile: issue nothing
                    raise RuntimeError("opencl: the engine is closed")
                self._active.add(comp)
        comp._start()
        return comp

    def _prep(self, comp, mb, job):
        """Validate and filter descriptors (numpy), then plan. False when nothing to copy."""
        nf = comp.result.shape[0]
        res = comp.result
        src = np.asarray(job.src_off, dtype=np.int64).ravel()
        dst = np.asarray(job.dst_off, dtype=np.int64).ravel()
        nb = np.asarray(job.nbytes, dtype=np.int64).ravel()
        fol = np.asarray(job.folio, dtype=np.int64).ravel()
        poisoned = np.asarray(job.src_poisoned, dtype=bool).ravel()
        if not len(src) == len(dst) == len(nb) == len(fol) or len(poisoned) != nf:
            raise ValueError("opencl: descriptor arrays of different lengths")
        if len(fol) and (fol.min() < 0 or fol.max() >= nf):
            raise ValueError("opencl: a descriptor names a folio outside the batch")
        size = mb.size
        bad = (nb < 0) | (src < 0) | (dst < 0) | (src > size - nb) | (dst > size - nb)
        ovl = ~bad & (nb > 0) & (np.abs(src - dst) < nb)
        if ovl.any():
            res[fol[ovl]] = -errno.EINVAL        # overlapping source and destination
        if bad.any():
            res[fol[bad]] = -errno.EFAULT        # outside physical memory
        res[poisoned] = -errno.EIO           # not machine-check safe: never read, say -EIO
        keep = (nb > 0) & (res[fol] == PENDING)
        has = np.zeros(nf, bool)
        has[fol[keep]] = True
        res[(res == PENDING) & ~has] = 0     # nothing to copy
        if not keep.all():
            src, dst, nb, fol = src[keep], dst[keep], nb[keep], fol[keep]
        if not len(src):
            return False
        self._plan(comp, mb, src, dst, nb, fol)
        return True

    def _prep_small(self, comp, mb, job):
        """_prep and _plan for a few descriptors in plain Python (numpy's per-call cost
        dominates there); the same segments, channels and commands as _plan."""
        nf = comp.result.shape[0]
        S, D, N, F = (np.asarray(a).ravel().tolist() for a in
                      (job.src_off, job.dst_off, job.nbytes, job.folio))
        pois = np.asarray(job.src_poisoned, dtype=bool).ravel().tolist()
        if not len(S) == len(D) == len(N) == len(F) or len(pois) != nf:
            raise ValueError("opencl: descriptor arrays of different lengths")
        EIO, EFAULT, EINVAL = -errno.EIO, -errno.EFAULT, -errno.EINVAL
        res = [EIO if p else PENDING for p in pois]
        size = mb.size
        for s, d, n, f in zip(S, D, N, F):
            if not 0 <= f < nf:
                raise ValueError("opencl: a descriptor names a folio outside the batch")
            if n < 0 or s < 0 or d < 0 or s > size - n or d > size - n:
                if res[f] != EIO:
                    res[f] = EFAULT
            elif n and abs(s - d) < n and res[f] not in (EIO, EFAULT):
                res[f] = EINVAL
        keep = [(s, d, n, f) for s, d, n, f in zip(S, D, N, F) if n > 0 and res[f] == PENDING]
        touched = sorted({f for *_, f in keep})
        tset = set(touched)
        for f in range(nf):
            if res[f] == PENDING and f not in tset:
                res[f] = 0
        comp.result[:] = res
        if not keep:
            return False
        items = []                          # bound a segment (and so cancel latency)
        for sdnf in keep:
            s, d, n, f = sdnf
            while n > SEG_MAX:
                items.append((s, d, SEG_MAX, f))
                s, d, n = s + SEG_MAX, d + SEG_MAX, n - SEG_MAX
            items.append((s, d, n, f))
        total = sum(it[2] for it in items)
        nch = self.channels
        target = min(SEG_MAX, max(SEG_MIN, -(-total // (nch * DEPTH))))
        parts, pos, sid = [], 0, -1             # the same cuts as _plan's
        for it in items:
            if pos // target != sid:
                sid = pos // target
                parts.append([])
            parts[-1].append(it)
            pos += it[2]
        with self._lock:
            first = self._rr
            self._rr = (self._rr + 1) % nch
        left = comp._folio_left
        R = mb.region
        for i, part in enumerate(parts):
            fset = sorted({it[3] for it in part})
            folios = np.array(fset, dtype=np.int64)
            left[folios] += 1
            seg = _Segment(i, (first + i) % nch, folios, sum(it[2] for it in part))
            # coalesce, then cut at absolute source chunk multiples and destination edges
            runs = []
            for s, d, n, _ in part:
                if runs and runs[-1][0] + runs[-1][2] == s and runs[-1][1] + runs[-1][2] == d:
                    runs[-1][2] += n
                else:
                    runs.append([s, d, n])
            groups = {}
            for s, d, n in runs:
                while n:
                    k = min(n, CHUNK - s % CHUNK, R - d % R)
                    sb, db = s // R, d // R
                    groups.setdefault((sb, db, bool((s | d | k) & 7)), []).append(
                        (s - sb * R, d - db * R, k))
                    s, d, n = s + k, d + k, n - k
            for (sb, db, odd), pieces in groups.items():
                if odd or len(pieces) <= SMALL_PIECES:
                    seg.groups.extend(("copy", sb, db, ps, pd, pn) for ps, pd, pn in pieces)
                else:
                    t = np.array(pieces, dtype=np.int64).T >> 3
                    seg.groups.append(("kernel", sb, db, t.ravel()))
            comp._add(seg)
        return True

    def _plan(self, comp, mb, src, dst, nb, fol):
        """Cut filtered descriptors into segments dealt round-robin to the channels, each
        a list of commands (kernel tables or copy-buffer pieces) per buffer pair."""
        nf = comp.result.shape[0]
        if (nb > SEG_MAX).any():     # bound a segment (and so cancel latency)
            k = (nb + SEG_MAX - 1) // SEG_MAX
            j = np.arange(int(k.sum())) - np.repeat(np.cumsum(k) - k, k)
            off = j * SEG_MAX
            src = np.repeat(src, k) + off
            dst = np.repeat(dst, k) + off
            nb = np.minimum(np.repeat(nb, k) - off, SEG_MAX)
            fol = np.repeat(fol, k)
        n = len(nb)
        nch = self.channels
        cum = np.cumsum(nb)
        total = int(cum[-1])
        target = min(SEG_MAX, max(SEG_MIN, -(-total // (nch * DEPTH))))
        if total <= target:
            bounds = np.array([0, n])
            seg_of = np.zeros(n, np.int64)
        else:
            cum -= nb
            cum //= target
            cuts = np.flatnonzero(cum[1:] != cum[:-1]) + 1
            bounds = np.concatenate(([0], cuts, [n]))
            seg_of = np.repeat(np.arange(len(bounds) - 1, dtype=np.int64), np.diff(bounds))
        nseg = len(bounds) - 1
        # folios per segment, and how many segments each folio waits for
        key = seg_of * nf + fol
        if n > 1 and (key[1:] >= key[:-1]).all():     # descriptors in folio order
            keep = np.empty(n, bool)
            keep[0] = True
            np.not_equal(key[1:], key[:-1], out=keep[1:])
            key = key[keep]
        elif n > 1:
            key = np.unique(key)
        kseg, kfol = key // nf, key % nf
        comp._folio_left[:] = np.bincount(kfol, minlength=nf)
        fsplit = np.searchsorted(kseg, np.arange(nseg + 1)).tolist()
        # pieces, grouped by (segment, src buffer, dst buffer, unaligned)
        ps, pd, pn, pseg = plan_pieces(src, dst, nb, seg_of, mb.region, CHUNK)
        R, nbuf = mb.region, len(mb.bufs)
        odd = ((ps | pd | pn) & 7) != 0
        if nbuf == 1 and not odd.any():    # one buffer, all words: pieces in segment order
            sb = db = np.zeros(len(ps), np.int64)
            gst = np.searchsorted(pseg, np.arange(nseg))
            gend = np.append(gst[1:], len(ps))
            gseg = np.arange(nseg)
        else:
            sb, db = ps // R, pd // R
            gkey = ((pseg * nbuf + sb) * nbuf + db) * 2 + odd
            order = np.argsort(gkey, kind="stable")
            gkey, ps, pd, pn, sb, db, odd = (a[order] for a in (gkey, ps, pd, pn, sb, db, odd))
            brk = np.empty(len(gkey), bool)
            brk[0] = True
            np.not_equal(gkey[1:], gkey[:-1], out=brk[1:])
            gst = np.flatnonzero(brk)
            gend = np.append(gst[1:], len(gkey))
            gseg = gkey[gst] // (2 * nbuf * nbuf)
            ps = ps - sb * R
            pd = pd - db * R
        with self._lock:
            first = self._rr
            self._rr = (self._rr + 1) % nch
        segbytes = np.add.reduceat(nb, bounds[:-1]).tolist()
        segs = [_Segment(i, (first + i) % nch, kfol[fsplit[i]:fsplit[i + 1]], segbytes[i])
                for i in range(nseg)]
        for g0, g1, s in zip(gst.tolist(), gend.tolist(), gseg.tolist()):
            bs, bd = int(sb[g0]), int(db[g0])
            if odd[g0] or g1 - g0 <= SMALL_PIECES:
                segs[s].groups.extend(("copy", bs, bd, a, b, c) for a, b, c in
                                      zip(ps[g0:g1].tolist(), pd[g0:g1].tolist(), pn[g0:g1].tolist()))
            else:
                tab = np.concatenate((ps[g0:g1], pd[g0:g1], pn[g0:g1]))
                tab >>= 3
                segs[s].groups.append(("kernel", bs, bd, tab))
        for seg in segs:
            comp._add(seg)

    # ---- issuing (called with the completion's lock held)
    def _enqueue(self, seg, mb, flush=True):
        cl = self._cl
        q = self._queues[seg.channel]
        bufs = mb.bufs
        keep = []
        ev = None
        with self._lock:
            try:
                for g in seg.groups:
                    if g[0] == "kernel":
                        _, bs, bd, tab = g
                        n = len(tab) // 3
                        tbuf = cl.Buffer(self.dev.ctx,
                                         cl.mem_flags.READ_ONLY | cl.mem_flags.COPY_HOST_PTR,
                                         hostbuf=tab)
                        keep.append(tbuf)
                        self._kernel.set_args(bufs[bs], bufs[bd], tbuf, np.int64(n))
                        ls = self.dev.local_size
                        ev = cl.enqueue_nd_range_kernel(q, self._kernel, (n * ls,), (ls,))
                    else:
                        _, bs, bd, s, d, n = g
                        ev = cl.enqueue_copy(q, bufs[bd], bufs[bs], src_offset=s, dst_offset=d,
                                             byte_count=n)
            except Exception:
                if ev is None:
                    raise        # nothing of it reached the device
                seg.failed = True  # what did is still tracked (and drained by cancel) by ev
            if flush:
                q.flush()
        seg.keep = keep
        return ev   # in-order queue: the last command's completion implies the others'

    def _flush(self):
        with self._lock:
            for q in self._queues:
                q.flush()

    def _forget(self, comp):
        with self._lock:
            self._active.discard(comp)

    # ---- testing aid
    def hold_channel(self, channel):
        """Stall a channel (a marker waiting on a user event) until the returned function
        is called: lets tests force out-of-order completion and a cancel with work in
        flight. close() releases forgotten holds."""
        cl = self._cl
        ue = cl.UserEvent(self.dev.ctx)
        with self._lock:
            cl.enqueue_marker(self._queues[channel], wait_for=[ue])
            self._queues[channel].flush()
            self._holds.append(ue)

        def release():
            with self._lock:
                if ue in self._holds:
                    self._holds.remove(ue)
                    ue.set_status(cl.command_execution_status.COMPLETE)
        return release

    # ---- protocol
    def describe(self):
        d = self.dev.describe()
        d.update(channels=self.channels, zero_copy=True,
                 buffers=len(self._mem.bufs) if self._mem is not None else 0,
                 buffer_bytes=self.region,
                 kernel=f"{self.kernel_name} (local size {self.dev.local_size})")
        return d

    def close(self):
        """Cancel jobs in flight (bounded, see cancel), release held channels, buffers."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            holds, self._holds = self._holds, []
        for ue in holds:
            ue.set_status(self._cl.command_execution_status.COMPLETE)
        for comp in list(self._active):
            if not comp.done():
                comp.cancel()
            else:
                comp._wait_callbacks(1.0)
        with self._lock:
            if self._mem is not None:
                self._mem.release()
                self._mem = None
            self._active = weakref.WeakSet()


_live_engines = weakref.WeakSet()


@atexit.register
def _close_all():
    """Close engines still open at exit: cancel their jobs and let pending pyopencl event
    callbacks run while the interpreter can still give them the GIL (a callback thread
    that first asks for it during finalization takes the process down)."""
    for e in list(_live_engines):
        try:
            e.close()
        except Exception:
            pass


def _check_channels(arg):
    if isinstance(arg, bool):
        raise TypeError("opencl channels must be an int")
    if isinstance(arg, str):
        if not (arg.isascii() and arg.isdigit()):
            raise ValueError(f"opencl:CHANNELS takes a number of channels in 1..{MAX_CHANNELS}, "
                             f"got {arg!r}")
        arg = int(arg)
    if not isinstance(arg, int):
        raise TypeError(f"opencl channels must be an int, not {type(arg).__name__}")
    if not 1 <= arg <= MAX_CHANNELS:
        raise ValueError(f"opencl channels must be in 1..{MAX_CHANNELS}, got {arg}")
    return arg


def _factory(arg, machine):
    channels = _check_channels(DEFAULT_CHANNELS if arg is None else arg)
    return OpenCLEngine(machine, channels)


@hookimpl
def copyengine_register_engines(register):
    register("opencl", _factory,
             f"OpenCL device as a DMA engine, memory shared zero-copy (PoCL CPU by default, "
             f"PYOPENCL_CTX picks another); opencl:CHANNELS command queues, 1..{MAX_CHANNELS}, "
             f"default {DEFAULT_CHANNELS}")
