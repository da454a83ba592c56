"""Physical memory: one lazily backed, page-aligned buffer that every node's frames live in."""
from __future__ import annotations

import mmap

import numpy as np

MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)


class PhysMem:
    """An anonymous MAP_NORESERVE mapping seen as one flat uint8 numpy array.

    Untouched frames cost no host memory, so a machine far larger than this host can be
    modelled as long as only part of it is written. ``discard`` gives host memory back
    (madvise MADV_DONTNEED), after which the frames read as zero again.
    """

    def __init__(self, nbytes: int):
        try:
            self._map = mmap.mmap(-1, nbytes, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE,
                                  prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, OverflowError) as e:  # the host refused the reservation itself
            raise ValueError(f"cannot reserve {nbytes} bytes of simulated physical memory: {e}") from None
        self.nbytes = nbytes
        self.mem = np.frombuffer(self._map, dtype=np.uint8)
        self.mem64 = self.mem.view(np.uint64)

    def discard(self, offset: int, length: int) -> None:
        """Return host memory backing [offset, offset+length) (host-page aligned)."""
        if hasattr(self._map, "madvise"):
            self._map.madvise(mmap.MADV_DONTNEED, offset, length)
        else:  # pragma: no cover - very old Pythons
            self.mem[offset:offset + length] = 0

    def close(self) -> None:
        if self._map is None:
            return
        m = self._map
        self.mem = self.mem64 = None
        self._map = None
        try:
            m.close()
        except BufferError:
            # Someone still holds a view (an engine, a test): give the host memory back anyway.
            m.madvise(mmap.MADV_DONTNEED, 0, self.nbytes)

    @property
    def closed(self) -> bool:
        return self._map is None
