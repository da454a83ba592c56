"""memops.copy with non-temporal stores: the aligned middle goes through copy_nt32 (a
cache line per step, the source prefetched ahead, an odd 32-byte block last), the head
and tail through memmove. Whatever the length and the alignment of either side, exactly
the named bytes change, to the source's, and a prefetch past the end of memory is
harmless."""
import mmap

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st
from numba import njit

from copyengine.engines.memops import PREFETCH_AHEAD, copy, copy_nt32, store_fence

SIZE = 1 << 20
_buf = mmap.mmap(-1, 2 * SIZE)          # page aligned, as the machine's memory
MEM = np.frombuffer(_buf, np.uint8)
MEM[:SIZE] = np.random.default_rng(7).integers(0, 256, SIZE, dtype=np.uint8)


@njit
def _copy(mem, d, s, n):
    copy(mem, d, s, n, True)
    store_fence()       # as every caller ends its loop of copies


@njit
def _nt(mem, d, s, blocks):
    copy_nt32(mem, d, s, blocks)
    store_fence()


@settings(max_examples=150, deadline=None)   # the first example compiles
@given(n=st.integers(0, 3 * 4096 + 100), src=st.integers(0, 4096), dst=st.integers(0, 4096))
def test_non_temporal_copy_writes_exactly_the_named_bytes(n, src, dst):
    d = SIZE + dst
    MEM[SIZE:] = 0
    _copy(MEM, d, src, n)
    assert (MEM[d:d + n] == MEM[src:src + n]).all()
    assert not MEM[SIZE:d].any() and not MEM[d + n:].any()


@given(blocks=st.integers(0, 70))
@settings(deadline=None)
def test_copy_nt32_copies_odd_and_even_block_counts(blocks):
    MEM[SIZE:] = 0
    _nt(MEM, SIZE + 64, 96, blocks)
    assert (MEM[SIZE + 64:SIZE + 64 + 32 * blocks] == MEM[96:96 + 32 * blocks]).all()
    assert not MEM[SIZE:SIZE + 64].any() and not MEM[SIZE + 64 + 32 * blocks:].any()


def test_prefetch_past_the_end_of_memory_is_harmless():
    blocks = 8
    end = 2 * SIZE - 32 * blocks        # the source's last block ends at the buffer's end
    MEM[end:] = MEM[:32 * blocks]
    MEM[SIZE:SIZE + 4096] = 0
    _nt(MEM, SIZE, end, blocks)         # prefetches reach PREFETCH_AHEAD bytes beyond it
    assert PREFETCH_AHEAD > 32 * blocks
    assert (MEM[SIZE:SIZE + 32 * blocks] == MEM[:32 * blocks]).all() and MEM[SIZE:SIZE + 256].any()
    assert not MEM[SIZE + 32 * blocks:SIZE + 4096].any()
