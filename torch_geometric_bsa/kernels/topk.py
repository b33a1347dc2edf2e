"""Group selection: importance of every selection block per query group and its top-k, streamed.

Must equal ``selection_scores`` followed by
``select_blocks`` (indices where scores are not tied). No
``[groups, blocks]`` matrix is ever in memory: each program owns ``BLOCK_G`` groups, streams over the
compressed keys of their cloud, recomputes ``P = exp2(s - lse)`` per head from the log-sum-exp of the
compression forward, sums it over heads and the group's queries, and merges each tile into a running
top-k held in registers. Memory is O(groups * k).

Scores and indices are packed into one int64 key, ``bits(score) << 32 | (2^31 - 1 - index)``: a score
is a sum of probabilities (>= 0), so its float bits order like the float, and among equal scores the
lower index wins, as in the reference's stable descending sort. Invalid blocks get key -1.
Fast path: ``cmp_block == cmp_stride == slc_block`` (the defaults); other block shapes fall back to
the dense reference (documented in docs/kernels.md).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import LOG2E, cdiv, config_for, dot_dim, dot_precision, launch_rule, next_pow2
from .plan import as_int8

__all__ = ["select_topk_triton"]

@triton.jit
def _score_topk_kernel(Q, K, LSE, KMASK, SVALID, KSTART, KEND, GSTART, GEND, IDX, n_q, n_g,
                       stride_qn, stride_kn, qk_scale,
                       H: tl.constexpr, D: tl.constexpr, QPG: tl.constexpr, TOPK: tl.constexpr,
                       TOPK_P2: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr,
                       BLOCK_D: tl.constexpr, PREC: tl.constexpr):
    # grid: (group tiles,); rows = BLOCK_G groups x QPG query rows each, all heads in one program
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    R: tl.constexpr = BLOCK_G * QPG
    rows = (pid * R + tl.arange(0, R)).to(tl.int64)
    rmask = rows < n_q
    grp = pid * BLOCK_G + tl.arange(0, BLOCK_G)
    gmask = grp < n_g
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    ks = tl.load(KSTART + rows, mask=rmask, other=2147483647)
    ke = tl.load(KEND + rows, mask=rmask, other=0)
    gs = tl.load(GSTART + grp, mask=gmask, other=2147483647)
    ge = tl.load(GEND + grp, mask=gmask, other=0)
    lo = tl.minimum(tl.min(ks, axis=0), tl.min(gs, axis=0))
    hi = tl.maximum(tl.max(ke, axis=0), tl.max(ge, axis=0))
    kcol = tl.arange(0, TOPK_P2)
    # running top-k as an unsorted set; columns >= TOPK are parked at +max so they are never the min
    cur = tl.where(kcol[None, :] < TOPK, -1, 9223372036854775807).to(tl.int64) + tl.zeros([BLOCK_G, TOPK_P2],
                                                                                           dtype=tl.int64)
    for start in range(lo, hi, BLOCK_N):
        cols = start + tl.arange(0, BLOCK_N)
        cin = cols < hi
        kv = tl.load(KMASK + cols, mask=cin, other=0) != 0
        valid = kv[None, :] & (cols[None, :] >= ks[:, None]) & (cols[None, :] < ke[:, None])
        ps = tl.zeros([R, BLOCK_N], dtype=tl.float32)
        for h in range(H):
            q = tl.load(Q + rows[:, None] * stride_qn + h * D + offs_d[None, :],
                        mask=rmask[:, None] & dmask[None, :], other=0.0)
            k = tl.load(K + cols[:, None] * stride_kn + h * D + offs_d[None, :],
                        mask=cin[:, None] & dmask[None, :], other=0.0)
            lse = tl.load(LSE + rows * H + h, mask=rmask, other=1.0e30)
            s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
            ps += tl.where(valid, tl.math.exp2(s - lse[:, None]), 0.0)
        if QPG > 1:
            score = tl.sum(tl.reshape(ps, (BLOCK_G, QPG, BLOCK_N)), axis=1)
        else:
            score = ps
        sv = tl.load(SVALID + cols, mask=cin, other=0) != 0
        sv = sv[None, :] & (cols[None, :] >= gs[:, None]) & (cols[None, :] < ge[:, None])
        bits = score.to(tl.int32, bitcast=True).to(tl.int64)
        cand = tl.where(sv, (bits << 32) | (2147483647 - cols[None, :]).to(tl.int64), -1)
        # merge: while some group has a candidate above its current k-th key, swap it in
        thr = tl.min(cur, axis=1)
        best = tl.max(cand, axis=1)
        while tl.max((best > thr).to(tl.int32), axis=0) > 0:
            ins = best > thr
            pos = tl.min(tl.where(cur == thr[:, None], kcol[None, :], TOPK_P2), axis=1)
            cur = tl.where(ins[:, None] & (kcol[None, :] == pos[:, None]), best[:, None], cur)
            cand = tl.where(cand == best[:, None], -1, cand)
            thr = tl.min(cur, axis=1)
            best = tl.max(cand, axis=1)
    # emit in descending key order (score desc, index asc) like the reference's stable sort
    cur = tl.where(kcol[None, :] < TOPK, cur, -2)
    for j in tl.static_range(TOPK):
        m = tl.max(cur, axis=1)
        idx = tl.where(m >= 0, 2147483647 - (m & 4294967295), -1).to(tl.int32)
        tl.store(IDX + grp * TOPK + j, idx, mask=gmask)
        cur = tl.where(cur == m[:, None], -2, cur)


def select_topk_triton(q_cmp: Tensor, k_cmp: Tensor, lse: Tensor, kmask: Tensor, svalid: Tensor, kranges,
                       granges, topk: int, scale=None) -> Tensor:
    r"""Top-``topk`` selection blocks per query group, ``[G, topk]`` int32 *global* block indices,
    ``-1`` where fewer valid blocks exist. Blocks are scored by the probability mass the group's
    queries give them in the compression branch (compression blocks = selection blocks).

    Args:
        q_cmp: ``[Q, H, D]`` the compression branch's queries, ``Q / G`` per group (a power of two:
            the group's points, or its one pooled query). k_cmp: ``[K, H, D]``.
        lse: ``[Q, H]`` the compression branch's log-sum-exp (log2 units).
        kmask: ``[K]`` compressed-key validity. svalid: ``[K]`` int8 selection-block validity.
        kranges: ``(kstart, kend)`` int32 ``[Q]``, each row's key range (``plan.compressed_ranges``).
        granges: ``(gstart, gend)`` int32 ``[G]``, each group's candidate blocks (``plan.group_ranges``).
        topk: blocks per group (at most the blocks of the largest cloud).
    """
    n_q, h, d = q_cmp.shape
    kstart, kend = kranges
    gstart, gend = granges
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.topk(q_cmp, k_cmp, lse, kmask, svalid, kstart, kend, gstart, gend, topk,
                        float(d ** -0.5 if scale is None else scale))
    n_g = gstart.numel()
    qpg = n_q // n_g
    if qpg * n_g != n_q or qpg & (qpg - 1):
        raise ValueError(f"{n_q} query rows for {n_g} groups: rows per group must be a power of two")
    kmask = as_int8(kmask)
    idx = _common.new_empty((n_g, topk), q_cmp, torch.int32)
    scale = d ** -0.5 if scale is None else scale
    cfg = config_for("topk", qpg=qpg, n_g=n_g)
    q_cmp, k_cmp = _common.rows(q_cmp), _common.rows(k_cmp)
    _score_topk_kernel[(cdiv(n_g, cfg["BLOCK_G"]),)](
        q_cmp, k_cmp, lse, kmask, svalid, kstart, kend, gstart, gend, idx, n_q, n_g,
        q_cmp.stride(0), k_cmp.stride(0), scale * LOG2E,
        H=h, D=d, QPG=qpg, TOPK=topk, TOPK_P2=next_pow2(topk), BLOCK_D=dot_dim(d), PREC=dot_precision(q_cmp.dtype),
        **cfg)
    return idx


@launch_rule("topk")
def _rule(qpg: int, n_g: int) -> dict:
    # enough programs to fill the GPU (each holds BLOCK_G groups' top-k), at most 64 rows each, key
    # tiles of 128, 4 warps (the sweep behind it: docs/perf-notes.md, "Session of 2026-11-25
    # (afternoon)", top-k tiles); qpg: query rows per group, n_g: groups
    bg = max(16 // qpg if qpg < 16 else 1, min(64 // qpg, next_pow2(max(1, n_g // 264))))
    return dict(BLOCK_G=bg, BLOCK_N=128, num_warps=4, num_stages=2)
