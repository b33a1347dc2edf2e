"""Selection branch: each query group attends to the ``k * l'`` keys of its selected blocks.

Must equal ``torch_geometric_bsa.reference.selected_attention``. Forward and dQ run one program
per (group, head): the group's ``g`` queries are the M side of the tile (padded to 16 for
``tl.dot``), so each selected KV block is loaded once for the whole group. dK/dV run one program per
(selection block, head) over an inverted index block -> groups that selected it (a stable sort of the
``[groups * k]`` indices, CSR offsets by ``searchsorted``): no atomics, no scatter, and every block
writes its gradient exactly once (zero when nobody selected it). Long lists (a block picked by many
groups) are cut into chunks: all but the last go to a first launch that writes float32 partials,
and the block's own program adds them in order, so the sum stays deterministic. Why this choice:
docs/kernels.md. With one selection per head (``BSAConfig(selection="per_head")``, ``idx [groups,
H, k]``, constexpr ``PER_HEAD``) the index is inverted per (head, block).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import (LOG2E, cdiv, config_for, dkdv_step, dot_dim, dot_precision, dq_step, launch_rule, next_pow2,
                      softmax_finish, softmax_step)

__all__ = ["selected_attention_triton", "SelectedAttention", "invert_selection"]


@triton.jit
def _slc_fwd_kernel(Q, K, V, MASK, IDX, O, LSE, stride_n, stride_o,
                    qk_scale, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, LS: tl.constexpr,
                    LS_P2: tl.constexpr, TOPK: tl.constexpr, CB: tl.constexpr, GM: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, PER_HEAD: tl.constexpr = False):
    # grid: (groups, heads); rows = the group's G queries (padded to GM), keys = CB blocks per step;
    # PER_HEAD: IDX is [groups, H, TOPK] (one selection per head), else [groups, TOPK]
    grp = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    r = tl.arange(0, GM)
    rows = (grp * G + r).to(tl.int64)  # q/k/v rows may be 3 * H * D apart: int64 offsets
    qm = (r < G)
    qm = qm & (tl.load(MASK + rows, mask=qm, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + rows[:, None] * stride_n + h * D + offs_d[None, :], mask=qm[:, None] & dmask[None, :],
                other=0.0)
    j = tl.arange(0, CB * LS_P2)
    m_i = tl.full([GM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GM], dtype=tl.float32)
    acc = tl.zeros([GM, BLOCK_D], dtype=tl.float32)
    if PER_HEAD:
        irow = (grp * H + h) * TOPK
    else:
        irow = grp * TOPK
    for c in range(0, TOPK, CB):
        bsel = c + j // LS_P2
        b = tl.load(IDX + irow + bsel, mask=bsel < TOPK, other=-1)
        slot = (b * LS + j % LS_P2).to(tl.int64)
        kin = (b >= 0) & (j % LS_P2 < LS)
        kv = kin & (tl.load(MASK + slot, mask=kin, other=0) != 0)
        k = tl.load(K + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(kv[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC, False)
    has = (l_i > 0) & qm
    o, lse = softmax_finish(acc, l_i, m_i, has)
    lse = tl.where(has, lse, 1.0e30)
    tl.store(O + rows[:, None] * stride_o + h * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=(r < G)[:, None] & dmask[None, :])
    tl.store(LSE + rows * H + h, lse, mask=r < G)


@triton.jit
def _slc_bwd_dq_kernel(Q, K, V, DO, O, MASK, IDX, LSE, DELTA, DQ, stride_n, stride_o, qk_scale, sm_scale,
                       G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, LS: tl.constexpr,
                       LS_P2: tl.constexpr, TOPK: tl.constexpr, CB: tl.constexpr, GM: tl.constexpr,
                       BLOCK_D: tl.constexpr, PREC: tl.constexpr, PER_HEAD: tl.constexpr = False):
    # grid: (groups, heads); dQ = scale * sum_j P (dP - delta) k_j over the group's selected keys
    grp = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    r = tl.arange(0, GM)
    rows = (grp * G + r).to(tl.int64)
    qm = (r < G)
    qm = qm & (tl.load(MASK + rows, mask=qm, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qd_mask = qm[:, None] & dmask[None, :]
    q = tl.load(Q + rows[:, None] * stride_n + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_o + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + rows * H + h, mask=qm, other=1.0e30)
    # delta_i = o_i . do_i, stored for the dK/dV kernel that runs next (padded rows: never read)
    o = tl.load(O + rows[:, None] * stride_o + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + rows * H + h, delta, mask=qm)
    j = tl.arange(0, CB * LS_P2)
    dq = tl.zeros([GM, BLOCK_D], dtype=tl.float32)
    if PER_HEAD:
        irow = (grp * H + h) * TOPK
    else:
        irow = grp * TOPK
    for c in range(0, TOPK, CB):
        bsel = c + j // LS_P2
        b = tl.load(IDX + irow + bsel, mask=bsel < TOPK, other=-1)
        slot = (b * LS + j % LS_P2).to(tl.int64)
        kin = (b >= 0) & (j % LS_P2 < LS)
        kv = kin & (tl.load(MASK + slot, mask=kin, other=0) != 0)
        k = tl.load(K + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(kv[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dq, _ = dq_step(dq, p, do, k, v, delta, PREC, False)
    tl.store(DQ + rows[:, None] * stride_o + h * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=(r < G)[:, None] & dmask[None, :])


@triton.jit
def _slc_bwd_dkdv_kernel(Q, K, V, DO, MASK, BPTR, BGRP, XPTR, SK, SV, LSE, DELTA, DK, DV, stride_n, stride_o,
                         qk_scale, sm_scale, nblk, nsteps,
                         G: tl.constexpr, G_P2: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         TOPK: tl.constexpr, LS: tl.constexpr, LP: tl.constexpr, GB: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, PARTIAL: tl.constexpr,
                         PER_HEAD: tl.constexpr = False, nblk_head=1):
    # A block's list of selecting groups (CSR: BGRP[BPTR[b]:BPTR[b+1]]) is cut into chunks of CHUNK
    # entries, so that a block picked by thousands of groups does not serialise the launch.
    # PARTIAL: grid (extra chunks, heads): program p takes the p-th chunk that is not a block's last
    #   one (XPTR[b] = extra chunks before block b; found by binary search) and writes its float32
    #   dK, dV to the scratch row p.
    # else: grid (selection blocks, heads): the block's last chunk (or its whole list), plus its
    #   scratch rows in order: deterministic, no atomics; every block is written (zero if unpicked).
    # PER_HEAD: the CSR lists are per (head, block), list h * nblk_head + b (nblk = H * nblk_head lists);
    #   the PARTIAL grid is (extra chunks, 1) and takes its head from the list it lands in.
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    if PARTIAL:
        lo = pid * 0
        hi = lo + nblk + 1
        for _ in range(nsteps):  # largest b with XPTR[b] <= pid (XPTR[0] = 0; fixed at hi = lo + 1)
            mid = (lo + hi) // 2
            ok = tl.load(XPTR + mid) <= pid
            lo = tl.where(ok, mid, lo)
            hi = tl.where(ok, hi, mid)
        live = pid < tl.load(XPTR + nblk)
        lst = tl.minimum(lo, nblk - 1)
        if PER_HEAD:
            h = lst // nblk_head
            blk = lst % nblk_head
        else:
            blk = lst
        start = tl.load(BPTR + lst) + (pid - tl.load(XPTR + lst)) * CHUNK
        end = tl.where(live, start + CHUNK, start)
    else:
        blk = pid
        if PER_HEAD:
            lst = h * nblk_head + blk
        else:
            lst = blk
        end = tl.load(BPTR + lst + 1)
        start = tl.load(BPTR + lst) + (tl.load(XPTR + lst + 1) - tl.load(XPTR + lst)) * CHUNK
    t = tl.arange(0, LP)
    slot = (blk * LS + t).to(tl.int64)
    tin = t < LS
    kv = tin & (tl.load(MASK + slot, mask=tin, other=0) != 0)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    kd_mask = tin[:, None] & dmask[None, :]
    k = tl.load(K + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([LP, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([LP, BLOCK_D], dtype=tl.float32)
    r = tl.arange(0, GB * G_P2)
    for c in range(start, end, GB):
        e = c + r // G_P2
        if PER_HEAD:
            gsel = tl.load(BGRP + e, mask=e < end, other=0) // (H * TOPK)  # flat [groups, H, TOPK] entry
        else:
            gsel = tl.load(BGRP + e, mask=e < end, other=0) // TOPK  # flat entry -> its group
        rows = (gsel * G + r % G_P2).to(tl.int64)
        qm = (e < end) & (r % G_P2 < G)
        qm = qm & (tl.load(MASK + rows, mask=qm, other=0) != 0)
        qd_mask = qm[:, None] & dmask[None, :]
        q = tl.load(Q + rows[:, None] * stride_n + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_o + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + rows * H + h, mask=qm, other=1.0e30)
        delta = tl.load(DELTA + rows * H + h, mask=qm, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(qm[:, None] & kv[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dk, dv = dkdv_step(dk, dv, p, q, do, v, delta, PREC)
    if PARTIAL:
        srow = ((pid * LS + t)[:, None].to(tl.int64) * H + h) * D + offs_d[None, :]
        smask = kd_mask & ((t * 0 + pid) < tl.load(XPTR + nblk))[:, None]  # dead programs: none
        tl.store(SK + srow, dk, mask=smask)
        tl.store(SV + srow, dv, mask=smask)
    else:
        for x in range(tl.load(XPTR + lst), tl.load(XPTR + lst + 1)):
            srow = ((x * LS + t)[:, None].to(tl.int64) * H + h) * D + offs_d[None, :]
            dk += tl.load(SK + srow, mask=kd_mask, other=0.0)
            dv += tl.load(SV + srow, mask=kd_mask, other=0.0)
        tl.store(DK + slot[:, None] * stride_o + h * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kd_mask)
        tl.store(DV + slot[:, None] * stride_o + h * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)


def invert_selection(idx: Tensor, num_blocks: int):
    r"""Block -> entries index (CSR) of ``idx [NG, k]`` global block ids (``-1`` = none), no host sync.

    Returns ``ptr [num_blocks + 1]`` int32 and ``order [NG * k]`` int64: block ``b`` was selected by
    the flat entries ``order[ptr[b]:ptr[b+1]]`` of ``idx`` (group ``order // k``). A stable sort on the
    narrowest key type (int16 below 32,767 blocks: half the radix passes of int32); ``-1`` entries
    sort first, before ``ptr[0]``, and are never read.
    """
    key = torch.int16 if num_blocks < 2 ** 15 - 1 else torch.int32
    sorted_ids, order = torch.sort(idx.reshape(-1).to(key), stable=True)
    ptr = torch.searchsorted(sorted_ids, torch.arange(num_blocks + 1, device=idx.device, dtype=key),
                             out_int32=True)
    return ptr, order


# Launch configs (_common's registry; tiles from benchmarks/sweep_bsa.py on the H100: benchmarks.md,
# perf-notes.md). Forward and dQ: ``keys`` per step (CB blocks of LS_P2 slots); dK/dV: ``rows`` query
# rows per step (GB groups) and ``steps`` steps per chunk of a block's list.
@launch_rule("slc_fwd")
def _fwd_rule(dtype: torch.dtype) -> dict:
    return dict(keys=64 if dtype == torch.float32 else 128, num_warps=4, num_stages=2)


@launch_rule("slc_dq")
def _dq_rule(dtype: torch.dtype) -> dict:
    return dict(keys=64 if dtype == torch.float32 else 128, num_warps=4, num_stages=2)


@launch_rule("slc_dkdv")
def _dkdv_rule() -> dict:
    return dict(rows=64, steps=4, num_warps=4, num_stages=2)


def _tiles(keys: int, ls: int, topk: int, g: int):
    r"""``(LS_P2, CB, GM)``: a block's padded slots, blocks per step (``keys`` keys), padded group rows."""
    ls_p2 = next_pow2(ls)
    cb = max(1, min(next_pow2(topk), keys // ls_p2))
    # a key tile of at least 16 (K of P @ V in a compiled tl.dot); blocks past TOPK load masked
    cb = max(cb, 16 // ls_p2)
    gm = max(16, next_pow2(g))
    return ls_p2, cb, gm


def _per_head_kw(idx: Tensor) -> dict:
    # the shared (default) launch passes nothing new: its kernels compile and run as before
    return dict(PER_HEAD=True) if idx.dim() == 3 else {}


class SelectedAttention(torch.autograd.Function):
    r"""Sparse attention over selected blocks; ``idx`` holds global block ids, ``[groups, k]``
    shared by the heads or ``[groups, H, k]`` per head."""

    @staticmethod
    def forward(ctx, q, k, v, mask_i8, idx, g, ls, scale):
        n, h, d = q.shape
        q, k, v = _common.shared_rows(q, k, v)  # views of one qkv projection: no copy
        topk = idx.size(-1)
        o = _common.new_empty(q.shape, q)
        lse = _common.new_empty((n, h), q, torch.float32)
        cfg = config_for("slc_fwd", dtype=q.dtype)
        ls_p2, cb, gm = _tiles(cfg.pop("keys"), ls, topk, g)
        _slc_fwd_kernel[(n // g, h)](
            q, k, v, mask_i8, idx, o, lse, q.stride(0), o.stride(0), scale * LOG2E,
            G=g, H=h, D=d, LS=ls, LS_P2=ls_p2, TOPK=topk, CB=cb, GM=gm, BLOCK_D=dot_dim(d),
            PREC=dot_precision(q.dtype), **_per_head_kw(idx), **cfg)
        ctx.save_for_backward(q, k, v, o, lse, mask_i8, idx)
        ctx.g, ctx.ls, ctx.scale = g, ls, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, mask_i8, idx = ctx.saved_tensors
        g, ls, scale = ctx.g, ctx.ls, ctx.scale
        n, h, d = q.shape
        topk = idx.size(-1)
        do = do.contiguous()  # o's layout: one stride for both
        delta = _common.new_empty((n, h), q, torch.float32)  # written by the dQ kernel, read by dK/dV
        dq, dk, dv = (_common.new_empty(q.shape, q) for _ in range(3))  # contiguous: row stride o.stride(0)
        cfg = config_for("slc_dq", dtype=q.dtype)
        ls_p2, cb, gm = _tiles(cfg.pop("keys"), ls, topk, g)
        prec = dot_precision(q.dtype)
        _slc_bwd_dq_kernel[(n // g, h)](
            q, k, v, do, o, mask_i8, idx, lse, delta, dq, q.stride(0), do.stride(0), scale * LOG2E, scale,
            G=g, H=h, D=d, LS=ls, LS_P2=ls_p2, TOPK=topk, CB=cb, GM=gm, BLOCK_D=dot_dim(d), PREC=prec,
            **_per_head_kw(idx), **cfg)
        _dkdv(q, k, v, do, mask_i8, idx, lse, delta, dk, dv, g, ls, scale, prec)
        return dq, dk, dv, None, None, None, None, None


def _dkdv(q, k, v, do, mask_i8, idx, lse, delta, dk, dv, g, ls, scale, prec):
    r"""dK, dV of the selection into ``dk, dv``: the block -> groups CSR (``invert_selection``) cut into
    chunks, a first launch for every chunk but a list's last (float32 partials) and one per list.

    Shared selection ``idx [groups, k]``: one list per block. Per-head ``idx [groups, H, k]``: one list
    per (head, block), list ``h * nblk + b`` (block ids offset by ``h * nblk`` before the sort); the
    partial launch then takes its head from the list it lands in (grid ``(chunks, 1)``)."""
    n, h, d = q.shape
    topk = idx.size(-1)
    nblk = n // ls
    per_head = idx.dim() == 3
    if per_head:
        off = (torch.arange(h, device=idx.device, dtype=idx.dtype) * nblk).view(1, h, 1)
        idx = torch.where(idx >= 0, idx + off, -1)
    nlists = h * nblk if per_head else nblk
    bptr, bgrp = invert_selection(idx, nlists)
    g_p2 = next_pow2(g)
    cfg = config_for("slc_dkdv")
    gb = max(1, cfg.pop("rows") // g_p2)
    chunk = gb * cfg.pop("steps")
    # chunks past each list's last one, their prefix sum, and a scratch row for each (at most
    # entries / chunk of them: a static bound, so no host read)
    cnt = bptr[1:] - bptr[:-1]
    xptr = F.pad(torch.cumsum(torch.div(cnt - 1, chunk, rounding_mode="floor").clamp_min_(0), 0,
                              dtype=torch.int32), (1, 0))
    nx = max(1, cdiv(idx.numel(), chunk))
    sk, sv = (torch.empty((nx, ls, h, d), device=q.device, dtype=torch.float32) for _ in range(2))
    common = dict(G=g, G_P2=g_p2, H=h, D=d, TOPK=topk, LS=ls, LP=max(16, next_pow2(ls)), GB=gb, CHUNK=chunk,
                  BLOCK_D=dot_dim(d), PREC=prec, **cfg)
    # the shared launch passes nothing new: its kernels compile and run as before the per-head rule
    extra = dict(PER_HEAD=True, nblk_head=nblk) if per_head else {}
    args = (q, k, v, do, mask_i8, bptr, bgrp, xptr, sk, sv, lse, delta, dk, dv, q.stride(0), do.stride(0),
            scale * LOG2E, scale, nlists, max(1, (nlists + 1).bit_length()))
    _slc_bwd_dkdv_kernel[(nx, 1 if per_head else h)](*args, PARTIAL=True, **extra, **common)
    _slc_bwd_dkdv_kernel[(nblk, h)](*args, PARTIAL=False, **extra, **common)


def selected_attention_triton(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, mask: Tensor, group_size: int,
                              slc_block: int, scale=None) -> Tensor:
    r"""Triton ``selected_attention`` with *global* block ids ``idx [N_pad // group_size, k]``
    shared by the heads, or ``[N_pad // group_size, H, k]`` one selection per head (``-1`` = no
    block). Zero at padded queries and where a head has no valid block."""
    d = q.size(-1)
    scale = d ** -0.5 if scale is None else scale
    mask = mask if mask.dtype == torch.int8 else mask.to(torch.int8)
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.selected(q, k, v, mask, idx.contiguous(), group_size, slc_block, float(scale))
    return SelectedAttention.apply(q, k, v, mask, idx.contiguous(), group_size, slc_block, scale)
