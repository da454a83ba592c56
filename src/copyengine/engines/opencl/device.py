"""Opening the OpenCL device the engine copies with, and its zero-copy view of memory.

This is the dmaengine provider side (a driver's probe: ``dma_async_device_register`` and
the channel resources it sets up): the device is discovered (``PYOPENCL_CTX`` when set,
else a CPU device, PoCL first), its copy kernels built, and a probe at creation checks that
writes through ``CL_MEM_USE_HOST_PTR`` buffers land in host memory (and host writes are
seen by the device) without map/unmap; a device that copies instead is unavailable.
:class:`_MemBuffers` then lays such buffers over consecutive sub-ranges of the machine's
physical memory (a device limits one buffer to ``CL_DEVICE_MAX_MEM_ALLOC_SIZE``).
"""
from __future__ import annotations

import mmap
import os
import threading
import time

import numpy as np

from ...errors import EngineUnavailable
from .source import KERNEL_SRC, NT_KERNEL_SRC

#: seconds a probe command may take at engine creation
PROBE_TIMEOUT = 30.0


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
