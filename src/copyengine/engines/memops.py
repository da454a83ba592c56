"""Compiled memory copies over physical memory, shared by the CPU engines.

``memmove`` is libc's memmove on two offsets of one array (the fastest copy the host has);
``copy`` adds non-temporal stores (the seed's TODO 4) for data that cannot stay cached,
unfenced: a loop of copies ends with one :func:`store_fence` (a fence after every 4 KiB
page held a run of pages to 8.9 GB/s, 10.4 with one fence per batch: the fence waits for
the write-combining buffers to drain). ``copy_spans`` is the body of a batched
``folio_mc_copy``: the chosen descriptors, with neighbours that are contiguous on both
sides merged into one span, as a DMA engine's coalescing would.
``atomic_load``/``atomic_store``/``atomic_cas``/``atomic_add`` on an int64 array are what the ``mt``
engine's threads claim chunks with (the kernel's atomic_long_* on a shared counter).
"""
from __future__ import annotations

from llvmlite import ir
from numba import njit
from numba.core import cgutils, types
from numba.extending import intrinsic

#: a batch this large cannot stay in the caches: copy it with non-temporal stores
NT_BYTES = 16 << 20
#: from this size glibc's memmove streams by itself (its x86_non_temporal_threshold is a
#: share of the L3: 181.5 MiB on the development VM), faster than the loop below
LIBC_STREAM_BYTES = 256 << 20


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


#: how far ahead of the load the source is prefetched: a 32 MiB stream with non-temporal
#: stores ran at 21.8 GB/s on two threads without it, 24.0-24.5 with it (glibc's streaming
#: memmove of the same bytes: 24.0); 1 KiB gave 23.1-23.5, 4 KiB no more than 2 KiB
PREFETCH_AHEAD = 2048


@intrinsic
def copy_nt32(typingctx, mem, dst, src, nblocks):
    """``nblocks`` x 32 bytes from mem+src to mem+dst (32-byte aligned) with non-temporal
    stores (they bypass the caches: MOVNTDQ on x86), a cache line per step with the source
    prefetched :data:`PREFETCH_AHEAD` bytes ahead (a hint: never faults, even past the
    end). No fence: the caller ends its run of copies with :func:`store_fence` before it
    reports a folio done."""
    sig = types.void(mem, dst, src, nblocks)

    def codegen(context, builder, signature, args):
        arr, d, s, n = args
        base = context.make_array(signature.args[0])(context, builder, arr).data
        base = builder.bitcast(base, cgutils.voidptr_t)
        vec = ir.VectorType(ir.IntType(64), 4)
        hint = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        i32 = ir.IntType(32)
        prefetch = cgutils.get_or_insert_function(
            builder.module, ir.FunctionType(ir.VoidType(), [cgutils.voidptr_t, i32, i32, i32]),
            "llvm.prefetch.p0i8")

        def block(off):
            sp = builder.bitcast(builder.gep(base, [builder.add(s, off)]), vec.as_pointer())
            dp = builder.bitcast(builder.gep(base, [builder.add(d, off)]), vec.as_pointer())
            return builder.load(sp, align=1), dp

        def store(value, dp):
            builder.store(value, dp, align=32).set_metadata("nontemporal", hint)

        one = ir.Constant(n.type, 1)
        with cgutils.for_range(builder, builder.ashr(n, one)) as loop:
            off = builder.mul(loop.index, ir.Constant(n.type, 64))
            ahead = builder.add(s, builder.add(off, ir.Constant(n.type, PREFETCH_AHEAD)))
            builder.call(prefetch, [builder.gep(base, [ahead]), ir.Constant(i32, 0),
                                    ir.Constant(i32, 3), ir.Constant(i32, 1)])
            a, b = block(off), block(builder.add(off, ir.Constant(n.type, 32)))
            store(*a)
            store(*b)
        with builder.if_then(builder.icmp_signed("!=", builder.and_(n, one), ir.Constant(n.type, 0))):
            store(*block(builder.mul(builder.sub(n, one), ir.Constant(n.type, 32))))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def store_fence(typingctx):
    """A full fence: the non-temporal stores before it are globally visible after it."""
    sig = types.void()

    def codegen(context, builder, signature, args):
        builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def address(typingctx, mem):
    """The address of ``mem``'s first byte."""
    sig = types.int64(mem)

    def codegen(context, builder, signature, args):
        data = context.make_array(signature.args[0])(context, builder, args[0]).data
        return builder.ptrtoint(data, ir.IntType(64))

    return sig, codegen


def _slot(context, builder, arrty, arr, idx):
    """Pointer to ``arr[idx]`` (an int64 array), no bounds check."""
    data = context.make_array(arrty)(context, builder, arr).data
    return builder.gep(data, [idx])


@intrinsic
def atomic_load(typingctx, arr, idx):
    """``arr[idx]`` read with acquire ordering (sees every store made before the
    release that published it)."""
    sig = types.int64(arr, idx)

    def codegen(context, builder, signature, args):
        ptr = _slot(context, builder, signature.args[0], args[0], args[1])
        return builder.load_atomic(ptr, "acquire", 8)

    return sig, codegen


@intrinsic
def atomic_store(typingctx, arr, idx, value):
    """``arr[idx] = value`` with release ordering (publishes every store made before it)."""
    sig = types.void(arr, idx, value)

    def codegen(context, builder, signature, args):
        ptr = _slot(context, builder, signature.args[0], args[0], args[1])
        builder.store_atomic(args[2], ptr, "release", 8)
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def atomic_cas(typingctx, arr, idx, expected, new):
    """Compare-and-swap ``arr[idx]`` (sequentially consistent): store ``new`` if it
    holds ``expected``; returns what it held (== expected on success)."""
    sig = types.int64(arr, idx, expected, new)

    def codegen(context, builder, signature, args):
        ptr = _slot(context, builder, signature.args[0], args[0], args[1])
        pair = builder.cmpxchg(ptr, args[2], args[3], "seq_cst", "seq_cst")
        return builder.extract_value(pair, 0)

    return sig, codegen


@intrinsic
def atomic_add(typingctx, arr, idx, delta):
    """``arr[idx] += delta`` atomically (sequentially consistent); returns the old value."""
    sig = types.int64(arr, idx, delta)

    def codegen(context, builder, signature, args):
        ptr = _slot(context, builder, signature.args[0], args[0], args[1])
        return builder.atomic_rmw("add", ptr, args[2], "seq_cst")

    return sig, codegen


@njit(cache=True, nogil=True, inline="always")
def copy(mem, d, s, n, nt):
    """Copy n bytes; with ``nt`` (and no overlap) the 32-byte-aligned middle bypasses
    the caches. Not fenced: the caller ends its loop of copies with :func:`store_fence`
    when ``nt``, before it reports a folio done."""
    if not nt or n < 256 or n >= LIBC_STREAM_BYTES or abs(d - s) < n:
        memmove(mem, d, s, n)
        return
    head = (-(address(mem) + d)) & 31
    if head:
        memmove(mem, d, s, head)
    blocks = (n - head) >> 5
    copy_nt32(mem, d + head, s + head, blocks)
    done = head + (blocks << 5)
    if done < n:
        memmove(mem, d + done, s + done, n - done)


@njit(cache=True, nogil=True, inline="always")
def first_outside(mem, src_off, dst_off, nbytes, take):
    """-(i + 1) for the first descriptor i with ``take[i]`` that lies outside ``mem``, else 0."""
    size = mem.shape[0]
    for i in range(src_off.shape[0]):
        if take[i]:
            s, d, b = src_off[i], dst_off[i], nbytes[i]
            if s < 0 or d < 0 or b < 0 or s + b > size or d + b > size:
                return -(i + 1)
    return 0


@njit(cache=True, nogil=True)
def copy_spans(mem, src_off, dst_off, nbytes, take, nt):
    """Copy every descriptor i with ``take[i]``, merging neighbours contiguous in both
    source and destination into one span (with non-temporal stores if ``nt``). Returns
    0, or -(i + 1) (having copied nothing) if descriptor i lies outside memory."""
    bad = first_outside(mem, src_off, dst_off, nbytes, take)
    if bad:
        return bad
    n = src_off.shape[0]
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
        copy(mem, d, s, length, nt)
        i = j
    if nt:
        store_fence()
    return 0


@intrinsic
def voidptr(typingctx, addr):
    """The address ``addr`` as a pointer (for ``numba.carray``)."""
    sig = types.voidptr(types.int64)

    def codegen(context, builder, signature, args):
        return builder.inttoptr(args[0], cgutils.voidptr_t)

    return sig, codegen


#: libc's syscall(2), bound by name when the compiled code is loaded (so it caches). Used
#: for futex(2) from compiled code: a waiting thread then needs no GIL. It returns -1 and
#: sets errno on failure; callers here only re-check their state after it returns.
syscall5 = types.ExternalFunction(
    "syscall", types.int64(types.int64, types.int64, types.int64, types.int64, types.int64,
                           types.int64))
