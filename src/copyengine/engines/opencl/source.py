"""The OpenCL C source of the copy kernels: what runs on the device for each command.

A kernel launch stands for one hardware DMA descriptor chain (the ``struct
dma_async_tx_descriptor`` a dmaengine driver builds in its prep callback): each work-group
copies one chunk of the table the planner made (:mod:`.plan`), source word offset,
destination word offset and word count per chunk, over the zero-copy buffers that lie on
the machine's physical memory.
"""
from __future__ import annotations

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
