"""Pins: get_user_pages / pin_user_pages (mm/gup.c) and the :class:`Pin` a caller holds.
A mixin of :class:`~.process.Process`."""
from __future__ import annotations

import errno

import numpy as np

from ..errors import oserror
from .pte import pte_pfn
from .mmap import _check_int


class Pin:
    """Extra references on the folios of a range (get_user_pages with FOLL_PIN)."""

    def __init__(self, process, heads):
        self.process = process
        self.heads = heads
        self.released = False

    def release(self):
        """Drop the references (unpin_user_pages). A second release is a ValueError."""
        m = self.process.machine
        with m.lock:
            if self.released:
                raise ValueError("this pin was already released")
            m.check_open()
            mm = m.mem_map
            np.add.at(mm.pincount, self.heads, -1)
            np.add.at(mm.refcount, self.heads, -1)
            self.released = True
            # Free folios whose last reference this was; split anonymous large folios
            # left partly mapped (their unmapped pages were kept only by the pin).
            self.process._release_folios(self.heads)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if not self.released:
            self.release()


class GupOps:
    """pin_user_pages over a range of a :class:`~.process.Process` (mm/gup.c)."""

    # ------------------------------------------------------------------ pins
    def pin(self, addr, length) -> Pin:
        """Pin [addr, addr+length) like pin_user_pages(FOLL_WRITE|FOLL_LONGTERM): pages are
        faulted in writable (breaking COW) and their folios get an extra reference each."""
        m = self.machine
        length = _check_int(length, "length")
        if length <= 0:
            raise oserror(errno.EINVAL, f"pin length must be positive, got {length}")
        addr = self._check_range(addr, length)
        with m.lock:
            self.enter()
            start = addr & ~(m.page_size - 1)
            end = -(-(addr + length) // m.page_size) * m.page_size
            segs = self._access(start, end - start, True)
            pfns = np.concatenate([pte_pfn(s.vma.ptes[s.i0:s.i1]) for s in segs])
            heads = m.mem_map.head[pfns]
            np.add.at(m.mem_map.pincount, heads, 1)
            np.add.at(m.mem_map.refcount, heads, 1)
            return Pin(self, heads)
