"""Fused Triton kernel for the ball branch (DESIGN §1.2b), forward and backward.

Must equal ``torch_geometric_bsa.reference.ball_attention``: exact softmax attention inside each
ball of ``m`` contiguous tree-ordered slots, logits ``scale * q_i.k_j + sigma_h * ||p_i - p_j||``.
The distance bias is computed in-kernel from positions (no ``[m, m]`` tensor in memory), padded keys
are masked in-kernel, padded queries get zero output; the log-sum-exp is saved for the backward.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import (config_for, dkdv_step_t, dot, dot_dim, dot_precision, dq_step, is_interpreter, launch_rule,
                      softmax_step)

__all__ = ["ball_attention_triton"]

LOG2E = _common.LOG2E


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------
@triton.jit
def _load_pos(POS, rows, stride_pos, PDIM: tl.constexpr):
    x = tl.load(POS + rows * stride_pos).to(tl.float32)
    y = tl.load(POS + rows * stride_pos + 1).to(tl.float32)
    if PDIM == 3:
        z = tl.load(POS + rows * stride_pos + 2).to(tl.float32)
    else:
        z = tl.zeros_like(x)
    return x, y, z


@triton.jit
def _pair_dist(xa, ya, za, xb, yb, zb, PDIM: tl.constexpr):
    # ||p_a - p_b|| for every (row a, column b) of the tile, fp32
    dx = xa[:, None] - xb[None, :]
    dy = ya[:, None] - yb[None, :]
    r2 = dx * dx + dy * dy
    if PDIM == 3:
        dz = za[:, None] - zb[None, :]
        r2 += dz * dz
    return tl.sqrt(r2)


@triton.jit
def _pos_grad(g, dist, xa, ya, za, xb, yb, zb, PDIM: tl.constexpr):
    # sum_b g_ab * d||p_a - p_b||/dp_a = sum_b g_ab (p_a - p_b) / r_ab, taken as 0 at r_ab = 0 (as torch.cdist)
    w = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0)
    gx = tl.sum(w * (xa[:, None] - xb[None, :]), 1)
    gy = tl.sum(w * (ya[:, None] - yb[None, :]), 1)
    if PDIM == 3:
        gz = tl.sum(w * (za[:, None] - zb[None, :]), 1)
    else:
        gz = tl.zeros_like(gx)
    return gx, gy, gz


@triton.jit
def _store_grad(PTR, off, g, mask, ACC: tl.constexpr):
    # ACC: add to what the buffer holds (the selection's gradient, in the fused forward's backward)
    if ACC:
        g += tl.load(PTR + off, mask=mask, other=0.0).to(tl.float32)
    tl.store(PTR + off, g.to(PTR.dtype.element_ty), mask=mask)


@triton.jit
def _ball_softmax(K, V, POS, MASK, q, xq, yq, zq, ball0, h, stride_in, stride_pos, qk_scale, sig2,
                  M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDIM: tl.constexpr, R: tl.constexpr,
                  BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr, UPCAST: tl.constexpr, BIAS: tl.constexpr):
    # the online softmax of R query rows (q [R, BLOCK_D], positions xq, yq, zq) over the keys of their
    # ball (slots ball0 .. ball0 + M), BLOCK_N a step, logits in log2 units: returns (m_i, l_i, acc).
    # The start is finite: a row whose keys are all padded keeps l_i = 0 instead of producing NaN
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    m_i = tl.full([R], -1.0e30, tl.float32)
    l_i = tl.zeros([R], tl.float32)
    acc = tl.zeros([R, BLOCK_D], tl.float32)
    for start in tl.range(0, M, BLOCK_N):
        cols = (ball0 + start + tl.arange(0, BLOCK_N)).to(tl.int64)
        kv_off = cols[:, None] * stride_in + h * D + offs_d[None, :]
        k = tl.load(K + kv_off, mask=dmask, other=0.0)
        v = tl.load(V + kv_off, mask=dmask, other=0.0)
        kvalid = tl.load(MASK + cols) != 0
        xk, yk, zk = _load_pos(POS, cols, stride_pos, PDIM)
        s = dot(q, tl.trans(k), DOT_PREC, UPCAST) * qk_scale
        if BIAS:
            s += sig2 * _pair_dist(xq, yq, zq, xk, yk, zk, PDIM)
        s = tl.where(kvalid[None, :], s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, DOT_PREC, UPCAST)
    return m_i, l_i, acc


@triton.jit
def _ball_fwd_kernel(Q, K, V, POS, SIGMA, MASK, O, LSE,
                     N, H, stride_in, stride_tok, stride_pos, sm_scale,
                     M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDIM: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr, BIAS: tl.constexpr = True):
    # grid: (N // BLOCK_M * H,): one program per (query tile, head), heads fastest; it loops over the
    # BLOCK_N key tiles of its ball (online softmax, FlashAttention-2 notation m_i, l_i, acc).
    # BIAS=False (benchmarks/ball_bias_cost.py only) leaves the distance bias out: not BSA's function.
    pid = tl.program_id(0)
    h = pid % H
    q0 = (pid // H) * BLOCK_M
    ball0 = (q0 // M) * M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    rows = (q0 + tl.arange(0, BLOCK_M)).to(tl.int64)
    q = tl.load(Q + rows[:, None] * stride_in + h * D + offs_d[None, :], mask=dmask, other=0.0)
    qvalid = tl.load(MASK + rows) != 0
    xq, yq, zq = _load_pos(POS, rows, stride_pos, PDIM)
    # log2 domain: exp2(x * log2 e) = exp(x)
    # fp32 scalars: inductor hands Python floats to user kernels as fp64, which would turn the
    # loop-carried softmax state into fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    sig2 = tl.load(SIGMA + h).to(tl.float32) * 1.4426950408889634

    m_i, l_i, acc = _ball_softmax(K, V, POS, MASK, q, xq, yq, zq, ball0, h, stride_in, stride_pos, qk_scale, sig2,
                                  M, D, BLOCK_D, PDIM, BLOCK_M, BLOCK_N, DOT_PREC, UPCAST, BIAS)
    has = qvalid & (l_i > 0)
    # (not _common.softmax_finish: its lse before the o store compiles to other address code here)
    l_safe = tl.where(has, l_i, 1.0)
    out = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    tl.store(O + rows[:, None] * stride_tok + h * D + offs_d[None, :], out.to(O.dtype.element_ty), mask=dmask)
    # +inf marks "no probability mass": the backward then recomputes P = 0 for that row
    tl.store(LSE + h * N + rows, tl.where(has, m_i + tl.log2(l_safe), float("inf")))


@triton.jit
def _ball_bwd_kernel(Q, K, V, O, DO, POS, SIGMA, MASK, LSE,
                     DQ, DK, DV, DSIG, DPOS,
                     N, H, stride_in, stride_tok, stride_pos, sm_scale,
                     M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDIM: tl.constexpr,
                     BLOCK: tl.constexpr, BLOCK_M1: tl.constexpr, BLOCK_N2: tl.constexpr,
                     SIGMA_GRAD: tl.constexpr, POS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
                     UPCAST: tl.constexpr, ACC: tl.constexpr = False):
    # grid: (N // BLOCK * H,): program (tile t, head h) computes dK, dV of the BLOCK keys of tile t
    # (looping over the ball's queries in BLOCK_M1 steps), then dQ of the BLOCK queries of tile t
    # (looping over the ball's keys in BLOCK_N2 steps); P is recomputed from the saved log-sum-exp
    # and delta_i = o_i . do_i is recomputed from o and do (no preprocessing pass).
    pid = tl.program_id(0)
    h = pid % H
    t0 = (pid // H) * BLOCK
    ball0 = (t0 // M) * M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    hoff = h * D
    # fp32 scalars: inductor hands Python floats to user kernels as fp64, which would turn the
    # loop-carried softmax state into fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    sigma = tl.load(SIGMA + h).to(tl.float32)
    sig2 = sigma * 1.4426950408889634
    rows = (t0 + tl.arange(0, BLOCK)).to(tl.int64)
    tile_off = rows[:, None] * stride_tok + hoff + offs_d[None, :]
    tile_in = rows[:, None] * stride_in + hoff + offs_d[None, :]
    xt, yt, zt = _load_pos(POS, rows, stride_pos, PDIM)

    # ---- 1. dK, dV for the keys of this tile (transposed tiles: rows are keys, columns queries)
    k = tl.load(K + tile_in, mask=dmask, other=0.0)
    v = tl.load(V + tile_in, mask=dmask, other=0.0)
    kvalid = tl.load(MASK + rows) != 0
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    gxk = tl.zeros([BLOCK], tl.float32)
    gyk = tl.zeros([BLOCK], tl.float32)
    gzk = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, M, BLOCK_M1):
        qrows = (ball0 + start + tl.arange(0, BLOCK_M1)).to(tl.int64)
        q_off = qrows[:, None] * stride_tok + hoff + offs_d[None, :]
        q = tl.load(Q + qrows[:, None] * stride_in + hoff + offs_d[None, :], mask=dmask, other=0.0)
        do = tl.load(DO + q_off, mask=dmask, other=0.0)
        o = tl.load(O + q_off, mask=dmask, other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(LSE + h * N + qrows)
        xq, yq, zq = _load_pos(POS, qrows, stride_pos, PDIM)
        distT = _pair_dist(xt, yt, zt, xq, yq, zq, PDIM)
        sT = dot(k, tl.trans(q), DOT_PREC, UPCAST) * qk_scale + sig2 * distT
        pT = tl.where(kvalid[:, None], tl.exp2(sT - lse[None, :]), 0.0)
        dk, dv, dsT = dkdv_step_t(dk, dv, pT, q, do, v, delta, DOT_PREC, UPCAST)
        if POS_GRAD:
            gx, gy, gz = _pos_grad(dsT, distT, xt, yt, zt, xq, yq, zq, PDIM)
            gxk += gx
            gyk += gy
            gzk += gz
    _store_grad(DK, tile_off, dk * sm_scale, dmask, ACC)
    _store_grad(DV, tile_off, dv, dmask, ACC)

    # ---- 2. dQ for the queries of this tile
    q = tl.load(Q + tile_in, mask=dmask, other=0.0)
    do = tl.load(DO + tile_off, mask=dmask, other=0.0)
    o = tl.load(O + tile_off, mask=dmask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + h * N + rows)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dsig = tl.zeros([BLOCK], tl.float32)
    gxq = tl.zeros([BLOCK], tl.float32)
    gyq = tl.zeros([BLOCK], tl.float32)
    gzq = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, M, BLOCK_N2):
        cols = (ball0 + start + tl.arange(0, BLOCK_N2)).to(tl.int64)
        kv_off = cols[:, None] * stride_in + hoff + offs_d[None, :]
        kc = tl.load(K + kv_off, mask=dmask, other=0.0)
        vc = tl.load(V + kv_off, mask=dmask, other=0.0)
        cvalid = tl.load(MASK + cols) != 0
        xk, yk, zk = _load_pos(POS, cols, stride_pos, PDIM)
        dist = _pair_dist(xt, yt, zt, xk, yk, zk, PDIM)
        s = dot(q, tl.trans(kc), DOT_PREC, UPCAST) * qk_scale + sig2 * dist
        p = tl.where(cvalid[None, :], tl.exp2(s - lse[:, None]), 0.0)
        dq, ds = dq_step(dq, p, do, kc, vc, delta, DOT_PREC, UPCAST)
        if SIGMA_GRAD:
            dsig += tl.sum(ds * dist, 1)
        if POS_GRAD:
            gx, gy, gz = _pos_grad(ds, dist, xt, yt, zt, xk, yk, zk, PDIM)
            gxq += gx
            gyq += gy
            gzq += gz
    _store_grad(DQ, tile_off, dq * sm_scale, dmask, ACC)
    if SIGMA_GRAD:
        tl.store(DSIG + pid, tl.sum(dsig, 0))
    if POS_GRAD:
        # per-head partial [N, H, PDIM]; the wrapper sums over heads
        prow = DPOS + (rows * H + h) * PDIM
        tl.store(prow, sigma * (gxq + gxk))
        tl.store(prow + 1, sigma * (gyq + gyk))
        if PDIM == 3:
            tl.store(prow + 2, sigma * (gzq + gzk))


@triton.jit
def _ball_bwd_merged_kernel(Q, K, V, O, DO, POS, SIGMA, MASK, LSE,
                            DQ, DK, DV, DSIG, DPOS,
                            N, H, stride_in, stride_tok, stride_pos, sm_scale,
                            M: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, PDIM: tl.constexpr,
                            BLOCK: tl.constexpr, BLOCK_B: tl.constexpr,
                            SIGMA_GRAD: tl.constexpr, POS_GRAD: tl.constexpr, DOT_PREC: tl.constexpr,
                            UPCAST: tl.constexpr, BIAS: tl.constexpr = True, ACC: tl.constexpr = False):
    # BIAS=False (benchmarks only, with SIGMA_GRAD and POS_GRAD off): no distance bias, as the forward's.
    # grid: (N // BLOCK * H,). Same outputs as _ball_bwd_kernel, one loop: the tile's slots are keys
    # (dK, dV) and queries (dQ) of one ball, and the ball's other slots b are queries and keys to
    # them, so the distance tile |p_t - p_b| is computed once for both roles (3 MUFU ops a pair, not 4).
    pid = tl.program_id(0)
    h = pid % H
    t0 = (pid // H) * BLOCK
    ball0 = (t0 // M) * M
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d[None, :] < D
    hoff = h * D
    # fp32 scalars: inductor hands Python floats to user kernels as fp64, which would turn the
    # loop-carried softmax state into fp64
    sm_scale = tl.cast(sm_scale, tl.float32)
    qk_scale = sm_scale * 1.4426950408889634
    sigma = tl.load(SIGMA + h).to(tl.float32)
    sig2 = sigma * 1.4426950408889634
    rows = (t0 + tl.arange(0, BLOCK)).to(tl.int64)
    tile_off = rows[:, None] * stride_tok + hoff + offs_d[None, :]
    xt, yt, zt = _load_pos(POS, rows, stride_pos, PDIM)
    tvalid = tl.load(MASK + rows) != 0
    tile_in = rows[:, None] * stride_in + hoff + offs_d[None, :]
    q_t = tl.load(Q + tile_in, mask=dmask, other=0.0)
    k_t = tl.load(K + tile_in, mask=dmask, other=0.0)
    v_t = tl.load(V + tile_in, mask=dmask, other=0.0)
    do_t = tl.load(DO + tile_off, mask=dmask, other=0.0)
    delta_t = tl.sum(tl.load(O + tile_off, mask=dmask, other=0.0).to(tl.float32) * do_t.to(tl.float32), 1)
    lse_t = tl.load(LSE + h * N + rows)
    dq = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dk = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dv = tl.zeros([BLOCK, BLOCK_D], tl.float32)
    dsig = tl.zeros([BLOCK], tl.float32)
    gx = tl.zeros([BLOCK], tl.float32)
    gy = tl.zeros([BLOCK], tl.float32)
    gz = tl.zeros([BLOCK], tl.float32)
    for start in tl.range(0, M, BLOCK_B):
        cols = (ball0 + start + tl.arange(0, BLOCK_B)).to(tl.int64)
        b_off = cols[:, None] * stride_tok + hoff + offs_d[None, :]
        b_in = cols[:, None] * stride_in + hoff + offs_d[None, :]
        q_b = tl.load(Q + b_in, mask=dmask, other=0.0)
        k_b = tl.load(K + b_in, mask=dmask, other=0.0)
        v_b = tl.load(V + b_in, mask=dmask, other=0.0)
        do_b = tl.load(DO + b_off, mask=dmask, other=0.0)
        delta_b = tl.sum(tl.load(O + b_off, mask=dmask, other=0.0).to(tl.float32) * do_b.to(tl.float32), 1)
        lse_b = tl.load(LSE + h * N + cols)
        bvalid = tl.load(MASK + cols) != 0
        if BIAS:
            xb, yb, zb = _load_pos(POS, cols, stride_pos, PDIM)
            dist = _pair_dist(xt, yt, zt, xb, yb, zb, PDIM)
            bias = sig2 * dist
        else:
            bias = 0.0
        # tile as keys, b as queries (transposed tiles)
        pT = tl.where(tvalid[:, None], tl.exp2(dot(k_t, tl.trans(q_b), DOT_PREC, UPCAST) * qk_scale + bias
                                                - lse_b[None, :]), 0.0)
        dk, dv, dsT = dkdv_step_t(dk, dv, pT, q_b, do_b, v_t, delta_b, DOT_PREC, UPCAST)
        # tile as queries, b as keys
        p = tl.where(bvalid[None, :], tl.exp2(dot(q_t, tl.trans(k_b), DOT_PREC, UPCAST) * qk_scale + bias
                                              - lse_t[:, None]), 0.0)
        dq, ds = dq_step(dq, p, do_t, k_b, v_b, delta_t, DOT_PREC, UPCAST)
        if SIGMA_GRAD:
            dsig += tl.sum(ds * dist, 1)
        if POS_GRAD:
            ax, ay, az = _pos_grad(ds + dsT, dist, xt, yt, zt, xb, yb, zb, PDIM)
            gx += ax
            gy += ay
            gz += az
    _store_grad(DQ, tile_off, dq * sm_scale, dmask, ACC)
    _store_grad(DK, tile_off, dk * sm_scale, dmask, ACC)
    _store_grad(DV, tile_off, dv, dmask, ACC)
    if SIGMA_GRAD:
        tl.store(DSIG + pid, tl.sum(dsig, 0))
    if POS_GRAD:
        prow = DPOS + (rows * H + h) * PDIM
        tl.store(prow, sigma * gx)
        tl.store(prow + 1, sigma * gy)
        if PDIM == 3:
            tl.store(prow + 2, sigma * gz)


# ---------------------------------------------------------------------------------------------
# Launch configuration (tuned on an H100, see docs/perf-notes.md "Ball kernel"); facts: ball size m,
# padded head dim d, dtype. Interpreter tiles: _common._INTERPRETER_TILES.
# ---------------------------------------------------------------------------------------------
@launch_rule("ball_fwd")
def _fwd_rule(m: int, d: int, dtype: torch.dtype) -> dict:
    if dtype == torch.float32:
        return dict(BLOCK_M=min(64, m), BLOCK_N=min(32, m), num_warps=4, num_stages=2)
    return dict(BLOCK_M=min(128, m) if d <= 64 else min(64, m), BLOCK_N=min(64, m), num_warps=4 if d <= 64 else 8,
                num_stages=3)


@launch_rule("ball_bwd")
def _bwd_rule(m: int, d: int, dtype: torch.dtype) -> dict:
    # BLOCK: the program's tile of keys (dK, dV) and queries (dQ); the two-loop kernel steps over the
    # ball's queries in BLOCK_M1 and its keys in BLOCK_N2; MERGED picks the one-loop kernel, which
    # steps over the ball in BLOCK_M1 (its BLOCK_B)
    if dtype == torch.float32 or d > 64:
        return dict(BLOCK=min(64, m), BLOCK_M1=min(32, m), BLOCK_N2=min(32, m), MERGED=False, num_warps=4,
                    num_stages=2)
    # one-loop backward, tiles of 64 (why: docs/perf-notes.md, "Ball kernel")
    return dict(BLOCK=min(64, m), BLOCK_M1=min(32, m), BLOCK_N2=min(32, m), MERGED=True, num_warps=4, num_stages=3)


def _upcast(dtype: torch.dtype) -> bool:
    return is_interpreter() and dtype == torch.bfloat16


# ---------------------------------------------------------------------------------------------
# autograd glue
# ---------------------------------------------------------------------------------------------
def _forward(q, k, v, pos, sigma, mask_u8, m, scale, bias: bool = True):
    # bias=False: without the distance bias (benchmarks/ball_bias_cost.py only; not BSA's function)
    n, h, d = q.shape
    o = _common.new_empty(q.shape, q)
    lse = _common.new_empty((h, n), q, torch.float32)
    cfg = config_for("ball_fwd", m=m, d=dot_dim(d), dtype=q.dtype)
    _ball_fwd_kernel[(n // cfg["BLOCK_M"] * h,)](
        q, k, v, pos, sigma, mask_u8, o, lse, n, h, q.stride(0), h * d, pos.stride(0), scale,
        M=m, D=d, BLOCK_D=dot_dim(d), PDIM=pos.size(1), DOT_PREC=dot_precision(q.dtype), UPCAST=_upcast(q.dtype),
        BIAS=bias, **cfg)
    return o, lse


def _backward(do, q, k, v, o, lse, pos, sigma, mask_u8, m, scale, sigma_grad, pos_grad, bias: bool = True,
              acc: Optional[tuple] = None):
    # bias=False (benchmarks only): the one-loop kernel without the distance bias, no sigma/pos gradients.
    # acc: contiguous (dq, dk, dv) that the kernel adds its gradients to (the fused forward's backward)
    n, h, d = q.shape
    if acc is None:
        dq, dk, dv = (_common.new_empty(q.shape, q) for _ in range(3))  # contiguous, whatever q's row stride
    else:
        dq, dk, dv = acc
    cfg = config_for("ball_bwd", m=m, d=dot_dim(d), dtype=q.dtype)
    blk, bm1, bn2 = cfg["BLOCK"], cfg["BLOCK_M1"], cfg["BLOCK_N2"]
    grid = n // blk * h
    dsig = _common.new_empty((grid if sigma_grad else 1,), q, torch.float32)
    dpos = _common.new_empty((n, h, pos.size(1)) if pos_grad else (1,), q, torch.float32)
    args = (q, k, v, o, do, pos, sigma, mask_u8, lse, dq, dk, dv, dsig, dpos, n, h, q.stride(0), h * d,
            pos.stride(0), scale)
    common = dict(M=m, D=d, BLOCK_D=dot_dim(d), PDIM=pos.size(1), SIGMA_GRAD=sigma_grad, POS_GRAD=pos_grad,
                  DOT_PREC=dot_precision(q.dtype), UPCAST=_upcast(q.dtype), num_warps=cfg["num_warps"],
                  num_stages=cfg["num_stages"], **(dict(ACC=True) if acc is not None else {}))
    if not bias:
        if not cfg["MERGED"] or sigma_grad or pos_grad:
            raise ValueError("bias=False takes the one-loop backward (MERGED) without sigma and pos gradients")
        common["BIAS"] = False
    if cfg["MERGED"]:
        _ball_bwd_merged_kernel[(grid,)](*args, BLOCK=blk, BLOCK_B=bm1, **common)
    else:
        _ball_bwd_kernel[(grid,)](*args, BLOCK=blk, BLOCK_M1=bm1, BLOCK_N2=bn2, **common)
    dsigma = dsig.view(-1, h).sum(0) if sigma_grad else None
    return dq, dk, dv, (dpos.sum(1) if pos_grad else None), dsigma


class BallAttentionFunction(torch.autograd.Function):
    r"""Autograd wrapper: forward saves ``o`` and the log-sum-exp; backward recomputes ``P``."""

    @staticmethod
    def forward(ctx, q, k, v, pos, sigma, mask_u8, ball_size, scale):
        o, lse = _forward(q, k, v, pos, sigma, mask_u8, ball_size, scale)
        ctx.save_for_backward(q, k, v, o, lse, pos, sigma, mask_u8)
        ctx.ball_size, ctx.scale = ball_size, scale
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, o, lse, pos, sigma, mask_u8 = ctx.saved_tensors
        sigma_grad, pos_grad = ctx.needs_input_grad[4], ctx.needs_input_grad[3]
        dq, dk, dv, dpos, dsigma = _backward(do.contiguous(), q, k, v, o, lse, pos, sigma, mask_u8,
                                             ctx.ball_size, ctx.scale, sigma_grad, pos_grad)
        dpos = dpos.to(pos.dtype) if dpos is not None else None
        dsigma = dsigma.to(sigma.dtype) if dsigma is not None else None
        return dq, dk, dv, dpos, dsigma, None, None, None


def supports(ball_size: int, head_dim: int) -> bool:
    r"""Whether the fused kernel covers these shapes: balls of a power of two in ``[16, 512]`` (its
    tiles are at least 16 wide, as compiled ``tl.dot`` needs), head dims in ``[1, 128]``."""
    return 16 <= ball_size <= 512 and ball_size & (ball_size - 1) == 0 and 1 <= head_dim <= 128


def ball_attention_triton(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor,
                          ball_size: int, scale: Optional[float] = None) -> Tensor:
    r"""Fused ball attention; equals ``torch_geometric_bsa.reference.ball_attention``.

    Args:
        q, k, v: ``[N_pad, H, D]`` tree order, fp32/fp16/bf16, ``D <= 128``.
        pos: ``[N_pad, d]``, ``d`` in ``{2, 3}``. sigma: ``[H]``. mask: ``[N_pad]`` slot validity.
        ball_size: ``m``, a power of two in ``[16, 512]`` dividing ``N_pad``.
        scale: logit scale, ``D ** -0.5`` by default.

    Returns:
        ``[N_pad, H, D]`` in ``q``'s dtype, zero at padded queries. Differentiable in q, k, v, sigma
        and pos (``d||p_i - p_j||/dp`` taken as 0 at coincident points, as ``torch.cdist`` does).
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape [N_pad, H, D]; got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    n, h, d = q.shape
    if q.dtype not in (torch.float32, torch.float16, torch.bfloat16) or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share a dtype in float32/float16/bfloat16, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not isinstance(ball_size, int) or not supports(ball_size, 1):
        raise ValueError(f"ball_size must be a power of two in [16, 512], got {ball_size!r}")
    if n % ball_size:
        raise ValueError(f"N_pad={n} must be a multiple of ball_size={ball_size}")
    if not supports(16, d):
        raise ValueError(f"head dim must be in [1, 128], got {d}")
    if pos.dim() != 2 or pos.size(0) != n or pos.size(1) not in (2, 3) or not pos.is_floating_point():
        raise ValueError(f"pos must be a float tensor [N_pad={n}, 2 or 3], got {list(pos.shape)} {pos.dtype}")
    if sigma.shape != (h,):
        raise ValueError(f"sigma must have shape [H={h}], got {list(sigma.shape)}")
    if mask.shape != (n,):
        raise ValueError(f"mask must have shape [N_pad={n}], got {list(mask.shape)}")
    scale = d ** -0.5 if scale is None else float(scale)
    if n == 0:
        return q.new_zeros(q.shape) + 0 * (k.sum() + v.sum())
    from .combine import _as_u8
    mask_u8 = _as_u8(mask)  # a contiguous bool mask's own bytes: no kernel
    q, k, v = _common.shared_rows(q, k, v)
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.ball(q, k, v, pos, sigma, mask_u8, ball_size, scale)
    return BallAttentionFunction.apply(q, k, v, pos.contiguous(), sigma.contiguous(), mask_u8, ball_size, scale)
