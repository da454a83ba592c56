"""The allocation side of a memory policy at fault time (mm/mempolicy.c's
alloc_pages_mpol / interleave_nid as the fault path uses them): which node(s) the
folios a fault plans come from. The mbind(2) syscall and the policy object live in
migrate/mempolicy.py; this part sits in mm/ because the fault path (mm/process.py) needs
it and mm/ does not import migrate/."""
from __future__ import annotations

import errno

import numpy as np

from ..errors import oserror


def policy_alloc_plan(m, seg, got):
    """_alloc_plans for a VMA with a policy (alloc_pages_mpol): the folios a fault plans
    come from the policy's node(s). A large folio is tried on its first node only and
    otherwise falls back to base pages (the mTHP fault path); base pages fall back node
    by node as the policy allows, ENOMEM when none has room. Everything allocated is
    appended to ``got`` (the caller frees it all if this raises)."""
    vma, p = seg.vma, seg.plan
    pol = vma.policy
    p.heads, planned, p.new = [], p.new, []
    for order, idx in planned:
        if order:
            nr = 1 << order
            firsts = idx[::nr]
            first = pol.candidates(m, (vma.pgoff + firsts) >> order)[0]
            ok = np.zeros(len(firsts), bool)
            for node in np.unique(first).tolist():
                sel = np.flatnonzero(first == node)
                heads = m.alloc_folios_upto(node, order, len(sel))
                got.append(heads)
                if len(heads):
                    sel = sel[:len(heads)]
                    ok[sel] = True
                    p.new.append((order, (firsts[sel][:, None] + np.arange(nr)[None, :]).ravel()))
                    p.heads.append(heads)
            idx = idx[~np.repeat(ok, nr)]
            idx = idx[(idx >= seg.i0) & (idx < seg.i1)]
            if not len(idx):
                continue
        p.new.append((0, idx))
        p.heads.append(_alloc_pages(m, pol, vma.pgoff + idx, got))
    cow = p.cow
    p.cow_heads = None
    if cow is not None and len(cow[0]):
        p.cow_heads = _alloc_pages(m, pol, vma.pgoff + cow[0], got)


def _alloc_pages(m, pol, ilx, got):
    """One base page per interleave index, on the first candidate node with room; the
    heads come back in the order of ``ilx``."""
    heads = np.full(len(ilx), -1, np.int64)
    cand = pol.candidates(m, ilx)
    pending = np.arange(len(ilx))
    for k in range(cand.shape[0]):
        if not len(pending):
            break
        nodes = cand[k, pending]
        short = []
        for node in np.unique(nodes).tolist():
            sel = pending[nodes == node]
            h = m.alloc_folios_upto(node, 0, len(sel))
            got.append(h)
            heads[sel[:len(h)]] = h
            short.append(sel[len(h):])
        pending = np.concatenate(short)
    if len(pending):
        raise oserror(errno.ENOMEM, f"no node the policy {pol} allows has {len(pending)} free page(s)")
    return heads
