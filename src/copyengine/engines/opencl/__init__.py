"""The ``opencl[:CHANNELS]`` engine: an OpenCL device standing in for a DMA engine.

The machine's physical memory is shared zero-copy with the device: ``CL_MEM_USE_HOST_PTR``
buffers lie over ``machine.mem`` itself (no byte is staged). The device is PoCL's CPU
device by default (``pocl-binary-distribution`` from PyPI); pyopencl's own convention picks
another: when ``PYOPENCL_CTX`` is set, the context comes from
``pyopencl.create_some_context(interactive=False)``.

The package follows the dmaengine shape, one module per part:

* :mod:`.device` - discovery, the zero-copy probe, the shared buffers over physical memory
  (a driver's probe and its resources);
* :mod:`.source` - the OpenCL C copy kernels (what a hardware descriptor chain does);
* :mod:`.plan` - the one planner, for every job: which folios are answered at once
  (poisoned sources -EIO and never read, bad descriptors -EFAULT / -EINVAL), and which
  bytes go to which channel in which segment and piece (dmaengine's prep);
* :mod:`.completion` - per-folio completion from segment events, bounded waits, cancel
  (dma cookies, ``dma_sync_wait``, ``dmaengine_terminate_sync``);
* :mod:`.engine` - :class:`OpenCLEngine` (channels are command queues; submit + issue
  pending) and the ``copyengine_register_engines`` hook.

Every name below stays importable from ``copyengine.engines.opencl``, and this module is
the plugin the plugin manager registers (it holds the hook implementation).
"""
from __future__ import annotations

from .completion import DRAIN_TIMEOUT, POLL_MAX, POLL_MIN, OpenCLCompletion
from .device import (PROBE_TIMEOUT, _bounded_wait, _choose_device, _Device, _device_list,
                     _import_cl, _MemBuffers, open_device)
from .engine import (DEFAULT_CHANNELS, MAX_CHANNELS, MIN_BYTES, OpenCLEngine, _check_channels,
                     _close_all, _factory, _live_engines, copyengine_register_engines)
from .plan import (CHUNK, DEPTH, SEG_MAX, SEG_MIN, SMALL_PIECES, Plan, _Segment, plan_job,
                   plan_pieces, plan_segments, prep_descriptors)
from .source import KERNEL_SRC, NT_KERNEL_SRC

__all__ = [
    "CHUNK", "DEFAULT_CHANNELS", "DEPTH", "DRAIN_TIMEOUT", "KERNEL_SRC", "MAX_CHANNELS",
    "MIN_BYTES", "NT_KERNEL_SRC", "OpenCLCompletion", "OpenCLEngine", "POLL_MAX", "POLL_MIN",
    "PROBE_TIMEOUT", "Plan", "SEG_MAX", "SEG_MIN", "SMALL_PIECES", "copyengine_register_engines",
    "open_device", "plan_job", "plan_pieces", "plan_segments", "prep_descriptors",
    # private names kept importable for tests and tools that used the single module
    "_Device", "_MemBuffers", "_Segment", "_bounded_wait", "_check_channels", "_choose_device",
    "_close_all", "_device_list", "_factory", "_import_cl", "_live_engines",
]
