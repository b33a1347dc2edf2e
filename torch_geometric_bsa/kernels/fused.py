"""One forward launch for the ball branch, the selection branch and the gated sum.

A program takes one tile of ``R`` consecutive query rows (the ``GT`` selection groups of ``G`` rows
that the selection's union walk takes together, inside one ball) and one head. It runs the ball's
exact attention with the distance bias (as ``ball.py``), walks the tile's distinct selected blocks
(``selected.py``'s union list), reads the compression branch's output and the gates, and writes
``out = g_ball o_ball + g_cmp o_cmp + g_slc o_slc``. It also writes ``o_ball``, ``o_slc`` and both
log-sum-exps, which the backward reads: the selection's backward kernels, whose dQ launch also takes
the gated sum's backward, then the ball's, which adds its gradients to the selection's.
Must equal ``gated_combine(ball_attention_triton(...), o_c, selected_attention_triton(...))``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import config_for, dot, dot_dim, dot_precision, launch_rule, softmax_finish, softmax_step
from .ball import _ball_softmax, _load_pos, _upcast
from .combine import _load_gates
from .selected import _union_tile

__all__ = ["fusable", "fused_local_combine"]


@triton.jit
def _bsa_fwd_kernel(Q, K, V, POS, SIGMA, MASK, U, UBITS, UCNT, OC, G, OB, LSEB, OS, LSES, OUT,
                    N, stride_in, stride_pos, stride_gn, stride_gh, sm_scale,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDIM: tl.constexpr, M: tl.constexpr,
                    BLOCK_N: tl.constexpr, GS: tl.constexpr, GT: tl.constexpr, LS: tl.constexpr,
                    LS_P2: tl.constexpr, CB: tl.constexpr, NE: tl.constexpr, QU: tl.constexpr,
                    PREC: tl.constexpr, UPCAST: tl.constexpr, LOGITS: tl.constexpr):
    # grid: (N // (GT * GS) * H,), heads fastest; the tile's rows lie in one ball of M slots. The
    # two softmaxes are separate (each branch is its own attention); their states live one after
    # the other, so the registers of the first are free for the second.
    pid = tl.program_id(0)
    h = pid % H
    t = pid // H
    R: tl.constexpr = GT * GS
    rows = (t * R + tl.arange(0, R)).to(tl.int64)
    ball0 = ((t * R) // M) * M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    qk_scale = sm_scale * 1.4426950408889634
    qvalid = tl.load(MASK + rows) != 0
    q = tl.load(Q + rows[:, None] * stride_in + h * D + offs_d[None, :], mask=qvalid[:, None] & dmask, other=0.0)
    out_off = rows[:, None] * (H * D) + h * D + offs_d[None, :]

    # ---- ball: the ball's keys in BLOCK_N steps, logits scale q.k + sigma_h |p_i - p_j| (log2 units)
    xq, yq, zq = _load_pos(POS, rows, stride_pos, PDIM)
    sig2 = tl.load(SIGMA + h).to(tl.float32) * 1.4426950408889634
    m_i, l_i, acc = _ball_softmax(K, V, POS, MASK, q, xq, yq, zq, ball0, h, stride_in, stride_pos, qk_scale, sig2,
                                  M, D, BLOCK_D, PDIM, R, BLOCK_N, PREC, UPCAST, True)
    has = qvalid & (l_i > 0)
    ob, lse = softmax_finish(acc, l_i, m_i, has)
    ob = ob.to(OB.dtype.element_ty)
    tl.store(OB + out_off, ob, mask=dmask)
    tl.store(LSEB + h * N + rows, tl.where(has, lse, float("inf")))  # the ball backward's convention

    # ---- selection: the tile's distinct selected blocks, CB a step, a row keeping its group's
    cnt = tl.load(UCNT + t)
    m_i = tl.full([R], -1.0e30, tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], tl.float32)
    for c in range(0, cnt, CB):
        slot, kin, kv, same = _union_tile(U, UBITS, MASK, t, cnt, c, LS, LS_P2, CB, GS, GT, NE)
        kv_off = slot[:, None] * stride_in + h * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=kin[:, None] & dmask, other=0.0)
        v = tl.load(V + kv_off, mask=kin[:, None] & dmask, other=0.0)
        s = dot(q, tl.trans(k), PREC, UPCAST) * qk_scale
        s = tl.where(kv[None, :] & same, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC, UPCAST)
    has = qvalid & (l_i > 0)
    os_, lse = softmax_finish(acc, l_i, m_i, has)
    os_ = os_.to(OS.dtype.element_ty)
    tl.store(OS + out_off, os_, mask=dmask)
    tl.store(LSES + rows * H + h, tl.where(has, lse, 1.0e30))  # the selection backward's convention

    # ---- the gated sum, from the branch outputs as stored (the separate combine reads the same)
    g0, g1, g2 = _load_gates(G, rows * stride_gn + h * stride_gh, rows >= 0, LOGITS)
    if QU > 1:  # pooled group queries: the group's o_c row, zero at padded slots
        g1 = tl.where(qvalid, g1, 0.0)
    oc = tl.load(OC + ((rows // QU) * H + h)[:, None] * D + offs_d[None, :], mask=dmask, other=0.0).to(tl.float32)
    out = g0[:, None] * ob.to(tl.float32) + g1[:, None] * oc + g2[:, None] * os_.to(tl.float32)
    tl.store(OUT + out_off, out.to(OUT.dtype.element_ty), mask=dmask)


@launch_rule("bsa_fwd")
def _fused_rule(m: int, d: int, dtype: torch.dtype) -> dict:
    # fused: whether the forward takes this launch; rows: its union-walk tile, None for the selection's
    # (slc_fwd); larger tiles (128: the ball kernel's own rows, in 16-bit) leave the dQ pass its slc_dq
    # tiles, listed again; BLOCK_N: the ball's keys a step, as the ball kernel's
    return dict(fused=d <= 32, rows=None, BLOCK_N=min(32 if dtype == torch.float32 else 64, m), num_warps=4,
                num_stages=2)


def _walk_tiles(m: int, d: int, dtype: torch.dtype, ls: int, topk: int, g: int):
    r"""``(rows, keys, tiles)`` of the fused forward's union walk and of the selection's dQ walk:
    ``rows, keys`` for ``selected._walk``, ``tiles`` its ``(LS_P2, CB, GM, GT, NE)``."""
    from .selected import _tile_entries, _union_tiles
    rows, _, keys, _, _ = _tile_entries(config_for("slc_fwd", dtype=dtype, d=d))
    rows = config_for("bsa_fwd", m=m, d=dot_dim(d), dtype=dtype)["rows"] or rows
    dq_rows, _, dq_keys, _, _ = _tile_entries(config_for("slc_dq", dtype=dtype, d=d))
    return ((rows, keys, _union_tiles(rows, keys, ls, topk, g)),
            (dq_rows, dq_keys, _union_tiles(dq_rows, dq_keys, ls, topk, g)))


def _fits(m: int, d: int, dtype: torch.dtype, g: int, ls: int, topk: int) -> bool:
    # the selection's rule walks the union, and a walk tile's GT * G rows are whole groups that tile
    # balls of m (at least 16 rows, as a compiled tl.dot needs), in the forward and in the dQ pass
    if not config_for("slc_fwd", dtype=dtype, d=d)["union"]:
        return False
    return all(gm == g and 16 <= gt * gm and m % (gt * gm) == 0
               for _, _, (_, _, gm, gt, _) in _walk_tiles(m, d, dtype, ls, topk, g))


def fusable(m: int, d: int, dtype: torch.dtype, g: int, ls: int, topk: int) -> bool:
    r"""Whether the fused forward covers a call with balls of ``m``, head dim ``d``, groups of ``g``,
    selection blocks of ``ls`` and ``topk`` selected blocks: its rule (``bsa_fwd``) says so, the
    ball kernel covers ``m, d`` and the selection's union walk tiles the balls."""
    from .ball import supports
    return (dtype in (torch.float32, torch.float16, torch.bfloat16) and supports(m, d)
            and config_for("bsa_fwd", m=m, d=dot_dim(d), dtype=dtype)["fused"] and _fits(m, d, dtype, g, ls, topk))


class FusedLocalCombine(torch.autograd.Function):
    r"""The fused forward. The backward runs the separate kernels' backward passes on what it saved,
    with the gated sum's backward inside the selection's dQ launch (over the same union walk) and
    the ball's gradients added to the selection's in its own kernel: no combine launch, no sums."""

    @staticmethod
    def forward(ctx, q, k, v, pos, sigma, mask_u8, o_c, idx, gates, m, g, ls, qu, logits, scale):
        from .selected import _walk
        n, h, d = q.shape
        out_dtype = torch.promote_types(q.dtype, gates.dtype)
        ob, os_ = _common.new_empty(q.shape, q), _common.new_empty(q.shape, q)
        out = _common.new_empty(q.shape, q, out_dtype)
        lseb = _common.new_empty((h, n), q, torch.float32)
        lses = _common.new_empty((n, h), q, torch.float32)
        (rows, keys, tiles), (dq_rows, dq_keys, dq_tiles) = _walk_tiles(m, d, q.dtype, ls, idx.size(-1), g)
        walk = _walk(rows, rows, keys, True, False, idx, ls, g)  # one launch: the union list
        (ls_p2, cb, gm, gt), kw = walk[0]
        cfg = config_for("bsa_fwd", m=m, d=dot_dim(d), dtype=q.dtype)
        del cfg["fused"], cfg["rows"]
        _bsa_fwd_kernel[(n // (gt * g) * h,)](
            q, k, v, pos, sigma, mask_u8, kw["U"], kw["UBITS"], kw["UCNT"], o_c, gates, ob, lseb, os_, lses, out,
            n, q.stride(0), pos.stride(0), gates.stride(0), gates.stride(1), scale,
            H=h, D=d, BLOCK_D=dot_dim(d), PDIM=pos.size(1), M=m, GS=g, GT=gt, LS=ls, LS_P2=ls_p2, CB=cb,
            NE=kw["NE"], QU=qu, PREC=dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
            LOGITS=logits, **cfg)
        ctx.save_for_backward(q, k, v, pos, sigma, mask_u8, o_c, idx, gates, ob, lseb, os_, lses)
        ctx.shape = (m, g, ls, qu, logits, scale)
        ctx.walk = walk
        ctx.dq_walk = None if dq_tiles == tiles else (dq_rows, dq_keys)  # the dQ pass lists its own tiles
        return out

    @staticmethod
    def backward(ctx, do):
        from .ball import _backward as ball_backward
        from .selected import SelectedAttention, _walk
        q, k, v, pos, sigma, mask_u8, o_c, idx, gates, ob, lseb, os_, lses = ctx.saved_tensors
        m, g, ls, qu, logits, scale = ctx.shape
        # the selection's dQ launch takes the gated sum's backward first (writes the ball's and its own
        # dO, the gates' and o_c's gradients); the ball's backward then adds to its dQ, dK, dV
        dob, dos = _common.new_empty(ob.shape, ob), _common.new_empty(os_.shape, os_)
        doc, dg = _common.new_empty(o_c.shape, o_c), _common.new_empty(gates.shape, gates)
        combine = dict(GATES=gates, OB=ob, OC=o_c, DOB=dob, DOC=doc, DOS=dos, DG=dg, stride_gn=gates.stride(0),
                       stride_gh=gates.stride(1), COMBINE=True, QU=qu, **(dict(LOGITS=True) if logits else {}))
        walk = ctx.walk
        if ctx.dq_walk is not None:
            rows, keys = ctx.dq_walk
            walk = _walk(rows, rows, keys, True, False, idx, ls, g)
        grads = SelectedAttention.backward(_common.SavedCtx((q, k, v, os_, lses, mask_u8, idx), g=g, ls=ls,
                                                            scale=scale, walk=walk, combine=combine),
                                           do.contiguous())[:3]
        dq, dk, dv, dpos, dsigma = ball_backward(dob, q, k, v, ob, lseb, pos, sigma, mask_u8, m, scale,
                                                 ctx.needs_input_grad[4], ctx.needs_input_grad[3], acc=grads)
        dpos = dpos.to(pos.dtype) if dpos is not None else None
        dsigma = dsigma.to(sigma.dtype) if dsigma is not None else None
        return (dq, dk, dv, dpos, dsigma, None, doc, None, dg) + (None,) * 6


def fused_local_combine(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor, o_c: Tensor,
                        idx: Tensor, gates: Tensor, ball_size: int, group_size: int, slc_block: int,
                        q_unit: int = 1, logits: bool = False) -> Tensor:
    r"""``gated_combine(ball_attention_triton(q, k, v, pos, sigma, mask, ball_size), o_c,
    selected_attention_triton(q, k, v, idx, mask, group_size, slc_block), gates, mask, q_unit,
    logits)`` in one forward launch (plus the selection's union list).

    Args:
        q, k, v: ``[N_pad, H, D]`` tree order (views of one projection read in place).
        pos: ``[N_pad, 2 or 3]``. sigma: ``[H]``. mask: ``[N_pad]`` slot validity.
        o_c: ``[N_pad // q_unit, H, D]`` the compression branch. idx: ``[N_pad // group_size, k]``
            global selected block ids shared by the heads (``-1`` = none).
        gates: ``[N_pad, H, 3]`` (or their logits with ``logits``; a strided view is read in place).

    Returns:
        ``[N_pad, H, D]`` in the promoted dtype of ``q`` and ``gates``. The caller checks
        :func:`fusable` first; the shapes are the public wrappers' (validated there).
    """
    from .combine import _as_u8, _gate_rows
    n, h, d = q.shape
    if idx.dim() != 2 or idx.size(0) != n // group_size or gates.shape != (n, h, 3):
        raise ValueError(f"idx must be [N_pad // group_size, k] and gates [N_pad, H, 3]; got {list(idx.shape)}, "
                         f"{list(gates.shape)}")
    if not _fits(ball_size, d, q.dtype, group_size, slc_block, idx.size(1)):
        # the caller's fusable() guessed the selected count; the walk's tiles for this one do not fit
        from .ball import ball_attention_triton
        from .combine import gated_combine
        from .selected import selected_attention_triton
        o_ball = ball_attention_triton(q, k, v, pos, sigma, mask, ball_size)
        o_slc = selected_attention_triton(q, k, v, idx, mask, group_size, slc_block)
        return gated_combine(o_ball, o_c, o_slc, gates, mask, q_unit, logits)
    q, k, v = _common.shared_rows(q, k, v)
    return FusedLocalCombine.apply(q, k, v, pos.contiguous(), sigma.contiguous(), _as_u8(mask), o_c.to(q.dtype),
                                   idx.contiguous(), _gate_rows(gates), ball_size, group_size, slc_block, q_unit,
                                   bool(logits), d ** -0.5)
