"""The opencl engine itself: channels (command queues), issuing commands, registration.

:class:`OpenCLEngine` is the dmaengine channel provider of this model: ``opencl:N`` opens
N in-order command queues on the device (:mod:`.device`), one per DMA channel; ``submit``
is prep + submit + issue_pending: the job is planned (:mod:`.plan`, the one planner), its
segments queued per channel, and :class:`~.completion.OpenCLCompletion` issues them and
settles folios as their events complete. ``copyengine_register_engines`` registers the
``opencl[:CHANNELS]`` spec, as any plugin would. Engines still open at interpreter exit
are closed by an ``atexit`` hook.
"""
from __future__ import annotations

import atexit
import threading
import weakref

import numpy as np

from ...errors import EngineUnavailable
from ...hookspecs import hookimpl
from ..base import Capabilities, Engine
from .completion import DRAIN_TIMEOUT, OpenCLCompletion
from .device import _MemBuffers, open_device
from .plan import CHUNK, plan_segments, prep_descriptors

DEFAULT_CHANNELS = 2
MAX_CHANNELS = 16
#: below this many bytes a batch is not worth offloading (the ``min_bytes`` capability the
#: policy reads). Measured on PoCL over 2 CPU cores (``copyengine bench --scenario engines
#: --configs serial,opencl`` repeats it): ~75 us per submit+wait of a tiny job, and
#: opencl:2 overtakes ``serial`` (folio_mc_copy) between 4 and 8 MiB for 4 KiB folios
#: and between 8 and 16 MiB for 2 MiB folios: the device copies on the very CPUs it would
#: relieve. A default batch (512 base pages) is 2 MiB.
MIN_BYTES = 8 << 20


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

    # ---- memory
    def _buffers(self, mem):
        with self._lock:
            if self._mem is None or not self._mem.matches(mem):
                old, self._mem = self._mem, _MemBuffers(self.dev, mem, self.region)
                if old is not None and not self._active:
                    old.release()
            return self._mem

    def _take_channel(self):
        """The channel a job's first segment goes to: jobs start round-robin, so that
        single-segment jobs spread over the channels."""
        with self._lock:
            first = self._rr
            self._rr = (self._rr + 1) % self.channels
            return first

    def submit(self, job):
        """prep + submit + issue_pending: returns an :class:`OpenCLCompletion`."""
        if self._closed:
            raise RuntimeError("opencl: the engine is closed")
        mb = self._buffers(job.mem)
        nf = int(job.nr_folios)
        res, src, dst, nb, fol = prep_descriptors(job, nf, mb.size)
        spans = getattr(job, "spans", None)     # a job-like object may lack the attribute
        comp = OpenCLCompletion(self, nf, spans)
        comp._mb = mb
        comp.result[:] = res
        if len(nb):
            segs, comp._folio_left = plan_segments(src, dst, nb, fol, nf, self.channels,
                                                   mb.region, len(mb.bufs), self._take_channel())
            for seg in segs:
                comp._add(seg)
            with self._lock:
                if self._closed:   # close() ran meanwhile: issue nothing
                    raise RuntimeError("opencl: the engine is closed")
                self._active.add(comp)
        comp._start()
        return comp

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
