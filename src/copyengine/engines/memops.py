"""Compiled memory copies over physical memory, shared by the CPU engines.

``memmove`` is libc's memmove on two offsets of one array (the fastest copy the host has;
glibc switches to non-temporal stores for very large spans). ``copy_spans`` is the body of
a batched ``folio_mc_copy``: the chosen descriptors, with neighbours that are contiguous
on both sides merged into one span, as a DMA engine's coalescing would.
"""
from __future__ import annotations

from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic


@intrinsic
def memmove(typingctx, mem, dst, src, nbytes):
    """memmove(mem + dst, mem + src, nbytes) with no bounds check: callers validate."""
    sig = types.void(mem, dst, src, nbytes)

    def codegen(context, builder, signature, args):
        arr, d, s, n = args
        base = context.make_array(signature.args[0])(context, builder, arr).data
        base = builder.bitcast(base, cgutils.voidptr_t)
        cgutils.raw_memmove(builder, builder.gep(base, [d]), builder.gep(base, [s]), n, 1)
        return context.get_dummy_value()

    return sig, codegen


@njit(cache=True, nogil=True)
def copy_spans(mem, src_off, dst_off, nbytes, take):
    """Copy every descriptor i with ``take[i]``, merging neighbours contiguous in both
    source and destination into one span. Returns 0, or -(i + 1) (having copied nothing)
    if descriptor i lies outside memory."""
    size = mem.shape[0]
    n = src_off.shape[0]
    for i in range(n):
        if take[i]:
            s, d, b = src_off[i], dst_off[i], nbytes[i]
            if s < 0 or d < 0 or b < 0 or s + b > size or d + b > size:
                return -(i + 1)
    i = 0
    while i < n:
        if not take[i]:
            i += 1
            continue
        s, d, length = src_off[i], dst_off[i], nbytes[i]
        j = i + 1
        while j < n and take[j] and src_off[j] == s + length and dst_off[j] == d + length:
            length += nbytes[j]
            j += 1
        memmove(mem, d, s, length)
        i = j
    return 0
