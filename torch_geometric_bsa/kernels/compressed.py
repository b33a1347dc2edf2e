"""Compression branch: varlen attention of every query over the compressed keys of its own cloud.

Must equal ``torch_geometric_bsa.reference.compressed_attention``. Pooling (mean or MLP) stays
in PyTorch; ``k_cmp``/``v_cmp`` arrive as tensors and receive gradients. The forward saves the
log-sum-exp (log2 units), which the top-k kernel (topk.py) reuses to normalise probabilities.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import (EMPTY_LSE as _EMPTY, LOG2E, autotune, cdiv, config_for, dkdv_step, dot_dim, dot_precision,
                      dq_step, launch_rule, launch_tuned, next_pow2, sm_count as _sm_count, softmax_finish,
                      softmax_step)
from .plan import as_int8

__all__ = ["compressed_attention_triton", "CompressedAttention"]

EMPTY_LSE = tl.constexpr(_EMPTY)


@triton.jit
def _cmp_fwd_kernel(Q, K, V, KMASK, KSTART, KEND, O, LSE, n_q,
                    stride_qn, stride_kn, stride_on, qk_scale, QB, KB,
                    H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, RAGGED: tl.constexpr):
    # grid: (query tiles, heads); each query row only sees columns in [KSTART[row], KEND[row])
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_q
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    ks = tl.load(KSTART + rows, mask=rmask, other=2147483647)
    ke = tl.load(KEND + rows, mask=rmask, other=0)
    lo = tl.min(ks, axis=0)
    hi = tl.max(ke, axis=0)
    q = tl.load(Q + rows[:, None] * stride_qn + h * D + offs_d[None, :], mask=rmask[:, None] & dmask[None, :],
                other=0.0)
    # online softmax (_common.softmax_step): running max m_i, running sum l_i, accumulator acc
    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cin = cols < hi
        kv = tl.load(KMASK + cols, mask=cin, other=0) != 0
        k = tl.load(K + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=cin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=cin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if RAGGED:
            valid = kv[None, :] & (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
            s = tl.where(valid, s, float("-inf"))
        else:  # one cloud: every row sees the same columns; rows with none are zeroed at the end
            s = s + tl.where(kv, 0.0, float("-inf"))[None, :]
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC, False)
    has = (l_i > 0) & (ke > ks)
    o, lse = softmax_finish(acc, l_i, m_i, has)
    lse = tl.where(has, lse, EMPTY_LSE)
    tl.store(O + rows[:, None] * stride_on + h * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=rmask[:, None] & dmask[None, :])
    tl.store(LSE + rows * H + h, lse, mask=rmask)


@triton.jit
def _cmp_bwd_dkdv_kernel(Q, K, V, DO, LSE, DELTA, KMASK, KSTART, KEND, QSTART, QEND, DK, DV, n_k,
                         stride_qn, stride_kn, stride_don, qk_scale, sm_scale, QB, KB, n_split,
                         H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                         BLOCK_D: tl.constexpr, PREC: tl.constexpr, RAGGED: tl.constexpr,
                         PARTIAL: tl.constexpr = False):
    # grid: (key tiles, heads, n_split); streams over the query rows of the key tile's cloud(s),
    # program ``s`` over the s-th of n_split equal slices of them. PARTIAL: DK, DV are float32
    # [n_split, n_k, H, D] partial sums (unscaled), added in order by _sum_split_kernel
    pid = tl.program_id(0)
    sid = tl.program_id(2)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < n_k
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qs = tl.load(QSTART + cols, mask=cmask, other=2147483647)
    qe = tl.load(QEND + cols, mask=cmask, other=0)
    lo = tl.min(qs, axis=0)
    hi = tl.max(qe, axis=0)
    span = tl.cdiv(tl.cdiv(tl.maximum(hi - lo, 0), n_split), BLOCK_M) * BLOCK_M
    lo = lo + sid * span
    hi = tl.minimum(hi, lo + span)
    kv = tl.load(KMASK + cols, mask=cmask, other=0) != 0
    kd_mask = cmask[:, None] & dmask[None, :]
    k = tl.load(K + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=kd_mask, other=0.0)
    v = tl.load(V + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=kd_mask, other=0.0)
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rin = rows < hi
        qd_mask = rin[:, None] & dmask[None, :]
        q = tl.load(Q + rows[:, None] * stride_qn + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
        do = tl.load(DO + rows[:, None] * stride_don + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
        lse = tl.load(LSE + rows * H + h, mask=rin, other=EMPTY_LSE)
        delta = tl.load(DELTA + rows * H + h, mask=rin, other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if RAGGED:
            ks = tl.load(KSTART + rows, mask=rin, other=2147483647)
            ke = tl.load(KEND + rows, mask=rin, other=0)
            valid = kv[None, :] & (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        else:  # empty rows carry lse = 1e30, so their P is exactly 0
            p = tl.math.exp2(s - lse[:, None] + tl.where(kv, 0.0, float("-inf"))[None, :])
        dk, dv = dkdv_step(dk, dv, p, q, do, v, delta, PREC)
    if PARTIAL:
        part = (sid * n_k + cols[:, None]).to(tl.int64) * (H * D) + h * D + offs_d[None, :]
        tl.store(DK + part, dk, mask=kd_mask)
        tl.store(DV + part, dv, mask=kd_mask)
    else:
        tl.store(DK + cols[:, None] * stride_kn + h * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kd_mask)
        tl.store(DV + cols[:, None] * stride_kn + h * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)


@triton.jit
def _sum_split_kernel(DKP, DVP, DK, DV, numel, n_split, sm_scale, BLOCK: tl.constexpr):
    # dK = sm_scale * sum_s DKP[s], dV = sum_s DVP[s], s in order (deterministic); DK, DV contiguous
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    m = offs < numel
    dk = tl.zeros([BLOCK], dtype=tl.float32)
    dv = tl.zeros([BLOCK], dtype=tl.float32)
    for s in range(n_split):
        dk += tl.load(DKP + s * numel + offs, mask=m, other=0.0)
        dv += tl.load(DVP + s * numel + offs, mask=m, other=0.0)
    tl.store(DK + offs, (dk * sm_scale).to(DK.dtype.element_ty), mask=m)
    tl.store(DV + offs, dv.to(DV.dtype.element_ty), mask=m)


@triton.jit
def _cmp_bwd_dq_kernel(Q, K, V, DO, O, LSE, DELTA, KMASK, KSTART, KEND, DQ, n_q,
                       stride_qn, stride_kn, stride_don, qk_scale, sm_scale, QB, KB,
                       H: tl.constexpr, D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, PREC: tl.constexpr, RAGGED: tl.constexpr):
    # grid: (query tiles, heads); recomputes P from the saved LSE, dS = P * (dP - delta). It runs
    # before the dK/dV kernel and stores delta_i = o_i . do_i (o and do share a layout) for it.
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < n_q
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    ks = tl.load(KSTART + rows, mask=rmask, other=2147483647)
    ke = tl.load(KEND + rows, mask=rmask, other=0)
    lo = tl.min(ks, axis=0)
    hi = tl.max(ke, axis=0)
    qd_mask = rmask[:, None] & dmask[None, :]
    q = tl.load(Q + rows[:, None] * stride_qn + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    do = tl.load(DO + rows[:, None] * stride_don + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + rows * H + h, mask=rmask, other=EMPTY_LSE)
    o = tl.load(O + rows[:, None] * stride_don + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    tl.store(DELTA + rows * H + h, delta, mask=rmask)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cin = cols < hi
        kv = tl.load(KMASK + cols, mask=cin, other=0) != 0
        k = tl.load(K + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=cin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + cols[:, None] * stride_kn + h * D + offs_d[None, :], mask=cin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        if RAGGED:
            valid = kv[None, :] & (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
            p = tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        else:
            p = tl.math.exp2(s - lse[:, None] + tl.where(kv, 0.0, float("-inf"))[None, :])
        dq, _ = dq_step(dq, p, do, k, v, delta, PREC, False)
    tl.store(DQ + rows[:, None] * stride_don + h * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=qd_mask)


# Launch configs (_common's registry): autotuned over these candidates, keyed on head dim, dtype,
# raggedness and power-of-two buckets QB, KB of the query and key counts (kernel arguments the kernels
# do not read: tiles tuned at 4k points are not the best at 1M, and a bucket re-tunes at most once
# per doubling of the size); with BSA_AUTOTUNE=0 each kernel launches its rule's one config.
def _candidates(*shapes):
    return [dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st) for m, n, w, st in shapes]


def _pinned() -> dict:
    return dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)


launch_rule("cmp_fwd", tune=_candidates((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3),
                                        (64, 128, 4, 3)))(_pinned)
# dK/dV: BLOCK_N keys stay resident, BLOCK_M query rows stream
launch_rule("cmp_dkdv", tune=_candidates((64, 128, 8, 2), (32, 128, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2),
                                         (32, 64, 4, 4)))(_pinned)
launch_rule("cmp_dq", tune=_candidates((128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 32, 4, 4),
                                       (128, 128, 8, 2)))(_pinned)


@launch_rule("cmp_split")
def _split_rule(key_tiles: int, heads: int, sms: Optional[int]) -> dict:
    # the dK/dV grid is (key tiles, heads): a layer of a few thousand points a cloud and few heads
    # gives fewer programs than two a multiprocessor, each streaming a whole cloud's queries
    # (latency-bound). Then split the query stream into about four programs a multiprocessor; from
    # two a multiprocessor on a split does not pay for its extra launch (docs/perf-notes.md,
    # "Eleventh session")
    programs = key_tiles * heads
    if not sms or programs >= 2 * sms:
        return dict(SPLIT=1)
    return dict(SPLIT=min(8, next_pow2(cdiv(4 * sms, programs))))


_KEY = ["D", "PREC", "RAGGED", "QB", "KB"]
_cmp_fwd = autotune("cmp_fwd", _KEY)(_cmp_fwd_kernel)
_cmp_dkdv = autotune("cmp_dkdv", _KEY)(_cmp_bwd_dkdv_kernel)
_cmp_dq = autotune("cmp_dq", _KEY)(_cmp_bwd_dq_kernel)


class CompressedAttention(torch.autograd.Function):
    r"""``(o, lse) = softmax(q k_cmp^T * scale) v_cmp`` per cloud; ``lse`` [Q, H] in log2 units."""

    @staticmethod
    def forward(ctx, q, k_cmp, v_cmp, kmask, kstart, kend, qstart, qend, scale, ragged=True):
        nq, h, d = q.shape
        q, k_cmp, v_cmp = _common.rows(q), k_cmp.contiguous(), v_cmp.contiguous()
        o = _common.new_empty(q.shape, q)
        lse = _common.new_empty((nq, h), q, torch.float32)
        launch_tuned(
            _cmp_fwd, "cmp_fwd", lambda meta: (cdiv(nq, meta["BLOCK_M"]), h),
            q, k_cmp, v_cmp, kmask, kstart, kend, o, lse, nq, q.stride(0), k_cmp.stride(0), o.stride(0),
            scale * LOG2E, next_pow2(nq), next_pow2(k_cmp.size(0)),
            H=h, D=d, BLOCK_D=dot_dim(d), PREC=dot_precision(q.dtype), RAGGED=ragged)
        ctx.save_for_backward(q, k_cmp, v_cmp, o, lse, kmask, kstart, kend, qstart, qend)
        ctx.scale, ctx.ragged = scale, ragged
        ctx.mark_non_differentiable(lse)
        ctx.set_materialize_grads(False)  # no zero-filled gradient for lse (a memset a layer)
        return o, lse

    @staticmethod
    def backward(ctx, do, _dlse):
        if do is None:  # o unused (gradients are not materialised)
            return (None,) * 10
        q, k_cmp, v_cmp, o, lse, kmask, kstart, kend, qstart, qend = ctx.saved_tensors
        nq, h, d = q.shape
        nk = k_cmp.size(0)
        do = do.contiguous()  # o's layout: the dQ kernel reads both with one stride
        delta = _common.new_empty((nq, h), q, torch.float32)  # written by the dQ kernel, read by dK/dV
        dq = _common.new_empty(q.shape, q)
        dk = _common.new_empty(k_cmp.shape, k_cmp)
        dv = _common.new_empty(v_cmp.shape, v_cmp)
        prec = dot_precision(q.dtype)
        scale, ragged = ctx.scale, ctx.ragged
        launch_tuned(
            _cmp_dq, "cmp_dq", lambda meta: (cdiv(nq, meta["BLOCK_M"]), h),
            q, k_cmp, v_cmp, do, o, lse, delta, kmask, kstart, kend, dq, nq,
            q.stride(0), k_cmp.stride(0), do.stride(0), scale * LOG2E, scale, next_pow2(nq), next_pow2(nk),
            H=h, D=d, BLOCK_D=dot_dim(d), PREC=prec, RAGGED=ragged)
        # tiles of 64 keys (the rule's) decide the split; the tuner may pick other key tiles
        split = config_for("cmp_split", key_tiles=cdiv(nk, 64), heads=h, sms=_sm_count(q.device))["SPLIT"]
        if split > 1:
            dkp = _common.new_empty((split, nk, h, d), q, torch.float32)
            dvp = _common.new_empty((split, nk, h, d), q, torch.float32)
        else:
            dkp, dvp = dk, dv
        launch_tuned(
            _cmp_dkdv, "cmp_dkdv", lambda meta: (cdiv(nk, meta["BLOCK_N"]), h, split),
            q, k_cmp, v_cmp, do, lse, delta, kmask, kstart, kend, qstart, qend, dkp, dvp, nk,
            q.stride(0), k_cmp.stride(0), do.stride(0), scale * LOG2E, scale, next_pow2(nq), next_pow2(nk), split,
            H=h, D=d, BLOCK_D=dot_dim(d), PREC=prec, RAGGED=ragged, PARTIAL=split > 1)
        if split > 1:
            numel = nk * h * d
            _sum_split_kernel[(cdiv(numel, 1024),)](dkp, dvp, dk, dv, numel, split, scale, BLOCK=1024, num_warps=4)
        return dq, dk, dv, None, None, None, None, None, None, None


def compressed_attention_triton(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kmask: Tensor, ranges,
                                scale: Optional[float] = None, ragged: bool = True):
    r"""Triton ``compressed_attention``: returns ``(o, lse)``.

    Args:
        q: ``[Q, H, D]`` queries (one per point, or pooled per group). k_cmp, v_cmp: ``[K, H, D]``.
        kmask: ``[K]`` compressed-key validity (int8 or bool).
        ranges: ``(kstart, kend, qstart, qend)`` int32: each query row's key range ``[Q]`` and each
            key's query-row range ``[K]`` (``plan.compressed_ranges``).
        ragged: rows see different key ranges (several clouds, or windows); ``False`` lets the
            kernel skip the per-row range test when every row sees the same keys.

    Returns:
        ``o [Q, H, D]`` and ``lse [Q, H]`` float32 in log2 units (``1e30`` where a row has no key).
    """
    d = q.size(-1)
    scale = d ** -0.5 if scale is None else scale
    if len(ranges) != 4:
        raise ValueError("ranges must be (kstart, kend, qstart, qend)")
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.compressed(q, k_cmp, v_cmp, as_int8(kmask), *ranges, float(scale), bool(ragged))
    return CompressedAttention.apply(q, k_cmp, v_cmp, as_int8(kmask), *ranges, scale, bool(ragged))
