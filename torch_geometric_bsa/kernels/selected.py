"""Selection branch: each query group attends to the ``k * l'`` keys of its selected blocks.

Must equal ``torch_geometric_bsa.reference.selected_attention``. Forward and dQ run one program
per (``GT`` groups, head): the groups' queries are the M side of the tile (one group alone is padded
to 16 rows for ``tl.dot``), a step gathers each group's next blocks side by side and a row keeps only
its own group's keys, so each selected KV block is loaded once per group and head. dK/dV run one program per
(selection block, head) over an inverted index block -> groups that selected it (a stable sort of the
``[groups * k]`` indices, CSR offsets by a lower-bound kernel): no atomics, no scatter, and every block
writes its gradient exactly once (zero when nobody selected it). Long lists (a block picked by many
groups) are cut into chunks: all but the last go to a first launch that writes float32 partials,
and the block's own program adds them in order, so the sum stays deterministic. Why this choice:
docs/kernels.md. With one selection per head (``BSAConfig(selection="per_head")``, ``idx [groups,
H, k]``, constexpr ``PER_HEAD``) the index is inverted per (head, block).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import (LOG2E, cdiv, config_for, dkdv_step, dot_dim, dot_precision, dq_step, launch_rule, next_pow2,
                      softmax_finish, softmax_step)
from .combine import _gate_grads, _load_gates

__all__ = ["selected_attention_triton", "SelectedAttention", "invert_selection"]


@triton.jit
def _group_tile(IDX, MASK, pid, ngrp, c, H: tl.constexpr, h, LS: tl.constexpr,
                LS_P2: tl.constexpr, TOPK: tl.constexpr, CB: tl.constexpr, GM: tl.constexpr, GT: tl.constexpr,
                PER_HEAD: tl.constexpr):
    # the keys of step ``c`` for a tile of GT groups: GT x CB blocks of LS_P2 slots, group-major.
    # Returns (slot, kin, kv, same): key slots (int64), in range, valid, and [rows, keys] whether a
    # row's group selected the key (rows: GT groups of GM padded rows, as ``_group_rows``)
    j = tl.arange(0, GT * CB * LS_P2)
    jg = j // (CB * LS_P2)
    jgrp = pid * GT + jg
    bsel = c + (j // LS_P2) % CB
    if PER_HEAD:
        irow = (jgrp * H + h) * TOPK
    else:
        irow = jgrp * TOPK
    b = tl.load(IDX + irow + bsel, mask=(bsel < TOPK) & (jgrp < ngrp), other=-1)
    slot = (b * LS + j % LS_P2).to(tl.int64)
    kin = (b >= 0) & (j % LS_P2 < LS)
    kv = kin & (tl.load(MASK + slot, mask=kin, other=0) != 0)
    same = (tl.arange(0, GT * GM) // GM)[:, None] == jg[None, :]
    return slot, kin, kv, same


@triton.jit
def _group_rows(MASK, pid, ngrp, G: tl.constexpr, GM: tl.constexpr, GT: tl.constexpr):
    # a tile's query rows: GT consecutive groups of G queries, each padded to GM rows.
    # Returns (rows int64, real: a row of a group, qm: real and a valid slot)
    r = tl.arange(0, GT * GM)
    grp = pid * GT + r // GM
    real = (r % GM < G) & (grp < ngrp)
    rows = (grp * G + r % GM).to(tl.int64)  # q/k/v rows may be 3 * H * D apart: int64 offsets
    qm = real & (tl.load(MASK + rows, mask=real, other=0) != 0)
    return rows, real, qm


@triton.jit
def _union_kernel(IDX, U, UBITS, UCNT, ngrp, TOPK: tl.constexpr, GT: tl.constexpr, NE: tl.constexpr):
    # grid: (tiles of GT groups,). The tile's distinct selected blocks, in order of first appearance
    # (group-major): U[tile, :UCNT[tile]] block ids, UBITS the tile's groups that selected each one
    # (bit j = the tile's group j). An NE x NE comparison of the tile's GT * TOPK entries: no sort.
    pid = tl.program_id(0)
    e = tl.arange(0, NE)
    live = (e < GT * TOPK) & (pid * GT + e // TOPK < ngrp)
    b = tl.load(IDX + pid * (GT * TOPK) + e, mask=live, other=-1)
    ok = b >= 0
    eq = (b[:, None] == b[None, :]) & ok[:, None] & ok[None, :]
    before = e[None, :] < e[:, None]
    first = ok & (tl.max((eq & before).to(tl.int32), axis=1) == 0)
    bits = tl.sum(tl.where(eq, (1 << (e // TOPK))[None, :], 0), axis=1)  # a group holds a block once: sum = or
    at = tl.cumsum(first.to(tl.int32), axis=0) - 1
    tl.store(U + pid * NE + at, b, mask=first)
    tl.store(UBITS + pid * NE + at, bits, mask=first)
    tl.store(UCNT + pid, tl.sum(first.to(tl.int32), axis=0))


@triton.jit
def _union_tile(U, UBITS, MASK, pid, cnt, c, LS: tl.constexpr, LS_P2: tl.constexpr, CB: tl.constexpr,
                GM: tl.constexpr, GT: tl.constexpr, NE: tl.constexpr):
    # the keys of step ``c`` of the union walk: the tile's distinct blocks c .. c + CB - 1, each loaded
    # once for all GT groups. Returns (slot, kin, kv, same) as ``_group_tile``; ``same``: the row's
    # group selected the key's block
    j = tl.arange(0, CB * LS_P2)
    u = c + j // LS_P2
    b = tl.load(U + pid * NE + u, mask=u < cnt, other=-1)
    bits = tl.load(UBITS + pid * NE + u, mask=u < cnt, other=0)
    slot = (b * LS + j % LS_P2).to(tl.int64)
    kin = (b >= 0) & (j % LS_P2 < LS)
    kv = kin & (tl.load(MASK + slot, mask=kin, other=0) != 0)
    same = ((bits[None, :] >> (tl.arange(0, GT * GM) // GM)[:, None]) & 1) != 0
    return slot, kin, kv, same


@triton.jit
def _walk_bound(UCNT, pid, GT: tl.constexpr, TOPK: tl.constexpr, UNION: tl.constexpr, SKIP: tl.constexpr,
                UGT: tl.constexpr):
    # the step loop's bound. SKIP 1: a union launch leaves out the tiles whose distinct blocks are more
    # than half their entries; SKIP 2: the fallback launch (each group's own blocks) takes only those
    # tiles (union tiles of UGT groups). (A helper that returns None does not compile on a GPU.)
    if UNION:
        hi = tl.load(UCNT + pid)
        if SKIP == 1:
            hi = tl.where(_walk_keep(UCNT, pid, GT, TOPK, UNION, UGT), hi, 0)
    else:
        if SKIP == 2:
            hi = tl.where(_walk_keep(UCNT, pid, GT, TOPK, UNION, UGT), TOPK, 0)
        else:
            hi = TOPK
    return hi


@triton.jit
def _walk_keep(UCNT, pid, GT: tl.constexpr, TOPK: tl.constexpr, UNION: tl.constexpr, UGT: tl.constexpr):
    # with SKIP: whether the program writes its rows (see _walk_bound)
    if UNION:
        keep = tl.load(UCNT + pid) * 2 <= GT * TOPK
    else:
        keep = tl.load(UCNT + (pid * GT) // UGT) * 2 > UGT * TOPK
    return keep


@triton.jit
def _slc_fwd_kernel(Q, K, V, MASK, IDX, O, LSE, stride_n, stride_o, ngrp,
                    qk_scale, G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, LS: tl.constexpr,
                    LS_P2: tl.constexpr, TOPK: tl.constexpr, CB: tl.constexpr, GM: tl.constexpr,
                    BLOCK_D: tl.constexpr, PREC: tl.constexpr, GT: tl.constexpr = 1, PER_HEAD: tl.constexpr = False,
                    U=None, UBITS=None, UCNT=None, UNION: tl.constexpr = False,
                    NE: tl.constexpr = 1, SKIP: tl.constexpr = 0, UGT: tl.constexpr = 1):
    # grid: (cdiv(groups, GT), heads); rows = GT groups of G queries (each padded to GM); a step's
    # keys are each group's next CB blocks, side by side: one tl.dot for the tile, a row's scores
    # kept only on its own group's keys (``same``). PER_HEAD: IDX is [groups, H, TOPK] (one
    # selection per head), else [groups, TOPK]. UNION: a step's keys are instead CB of the tile's
    # distinct blocks (``_union_kernel``), a block picked by several of its groups loaded once
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    rows, real, qm = _group_rows(MASK, pid, ngrp, G, GM, GT)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    q = tl.load(Q + rows[:, None] * stride_n + h * D + offs_d[None, :], mask=qm[:, None] & dmask[None, :],
                other=0.0)
    m_i = tl.full([GT * GM], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([GT * GM], dtype=tl.float32)
    acc = tl.zeros([GT * GM, BLOCK_D], dtype=tl.float32)
    hi = _walk_bound(UCNT, pid, GT, TOPK, UNION, SKIP, UGT)
    for c in range(0, hi, CB):
        if UNION:
            slot, kin, kv, same = _union_tile(U, UBITS, MASK, pid, hi, c, LS, LS_P2, CB, GM, GT, NE)
        else:
            slot, kin, kv, same = _group_tile(IDX, MASK, pid, ngrp, c, H, h, LS, LS_P2, TOPK, CB, GM, GT, PER_HEAD)
        k = tl.load(K + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        s = tl.where(kv[None, :] & same, s, float("-inf"))
        m_i, l_i, acc = softmax_step(s, v, m_i, l_i, acc, PREC, False)
    has = (l_i > 0) & qm
    o, lse = softmax_finish(acc, l_i, m_i, has)
    lse = tl.where(has, lse, 1.0e30)
    if SKIP != 0:  # a scalar flag broadcast to the rows (the interpreter takes no scalar in a mask)
        real = real & ((rows * 0 + _walk_keep(UCNT, pid, GT, TOPK, UNION, UGT).to(tl.int32)) != 0)
    tl.store(O + rows[:, None] * stride_o + h * D + offs_d[None, :], o.to(O.dtype.element_ty),
             mask=real[:, None] & dmask[None, :])
    tl.store(LSE + rows * H + h, lse, mask=real)


@triton.jit
def _slc_bwd_dq_kernel(Q, K, V, DO, O, MASK, IDX, LSE, DELTA, DQ, stride_n, stride_o, ngrp, qk_scale, sm_scale,
                       G: tl.constexpr, H: tl.constexpr, D: tl.constexpr, LS: tl.constexpr,
                       LS_P2: tl.constexpr, TOPK: tl.constexpr, CB: tl.constexpr, GM: tl.constexpr,
                       BLOCK_D: tl.constexpr, PREC: tl.constexpr, GT: tl.constexpr = 1,
                       PER_HEAD: tl.constexpr = False, U=None, UBITS=None, UCNT=None, UNION: tl.constexpr = False,
                       NE: tl.constexpr = 1, SKIP: tl.constexpr = 0, UGT: tl.constexpr = 1,
                       GATES=None, OB=None, OC=None, DOB=None, DOC=None, DOS=None, DG=None, stride_gn=0, stride_gh=0,
                       COMBINE: tl.constexpr = False, QU: tl.constexpr = 1, LOGITS: tl.constexpr = False):
    # grid: (cdiv(groups, GT), heads), tiles (and UNION) as the forward's; dQ = scale * sum_j P (dP -
    # delta) k_j over each group's selected keys. COMBINE (the fused forward's backward; whole groups
    # a tile, GM == G): DO is the gradient of the gated sum, and the tile's rows first take the
    # combine's backward (combine.py): DOB, DOS (then the selection's own dO), DOC and DG
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    rows, real, qm = _group_rows(MASK, pid, ngrp, G, GM, GT)
    offs_d = tl.arange(0, BLOCK_D)
    dmask = offs_d < D
    qd_mask = qm[:, None] & dmask[None, :]
    q = tl.load(Q + rows[:, None] * stride_n + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    if COMBINE:
        do = _combine_rows(DO, GATES, OB, O, OC, DOB, DOC, DOS, DG, rows, real, qm, pid, h, stride_o, stride_gn,
                           stride_gh, H, D, BLOCK_D, GT, GM, QU, LOGITS)
        do = tl.where(qd_mask, do, 0.0)
    else:
        do = tl.load(DO + rows[:, None] * stride_o + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    lse = tl.load(LSE + rows * H + h, mask=qm, other=1.0e30)
    # delta_i = o_i . do_i, stored for the dK/dV kernel that runs next (padded rows: never read)
    o = tl.load(O + rows[:, None] * stride_o + h * D + offs_d[None, :], mask=qd_mask, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    hi = _walk_bound(UCNT, pid, GT, TOPK, UNION, SKIP, UGT)
    if SKIP != 0:  # a scalar flag broadcast to the rows (the interpreter takes no scalar in a mask)
        keep = (rows * 0 + _walk_keep(UCNT, pid, GT, TOPK, UNION, UGT).to(tl.int32)) != 0
        real = real & keep
        qm = qm & keep
    tl.store(DELTA + rows * H + h, delta, mask=qm)
    dq = tl.zeros([GT * GM, BLOCK_D], dtype=tl.float32)
    for c in range(0, hi, CB):
        if UNION:
            slot, kin, kv, same = _union_tile(U, UBITS, MASK, pid, hi, c, LS, LS_P2, CB, GM, GT, NE)
        else:
            slot, kin, kv, same = _group_tile(IDX, MASK, pid, ngrp, c, H, h, LS, LS_P2, TOPK, CB, GM, GT, PER_HEAD)
        k = tl.load(K + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        v = tl.load(V + slot[:, None] * stride_n + h * D + offs_d[None, :], mask=kin[:, None] & dmask[None, :],
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision=PREC) * qk_scale
        p = tl.where(kv[None, :] & same, tl.math.exp2(s - lse[:, None]), 0.0)
        dq, _ = dq_step(dq, p, do, k, v, delta, PREC, False)
    tl.store(DQ + rows[:, None] * stride_o + h * D + offs_d[None, :], (dq * sm_scale).to(DQ.dtype.element_ty),
             mask=real[:, None] & dmask[None, :])


@triton.jit
def _combine_rows(DO, GATES, OB, OS, OC, DOB, DOC, DOS, DG, rows, real, valid, pid, h, stride_o, stride_gn, stride_gh,
                  H: tl.constexpr, D: tl.constexpr, BLOCK_D: tl.constexpr, GT: tl.constexpr, GM: tl.constexpr,
                  QU: tl.constexpr, LOGITS: tl.constexpr):
    # the gated sum's backward for a tile's rows (as combine.py's kernel): writes the ball's and the
    # selection's dO (g * dO), the gates' gradients and o_c's (summed over a group's rows when QU > 1);
    # returns the selection's dO as stored
    offs_d = tl.arange(0, BLOCK_D)
    m2 = real[:, None] & (offs_d < D)[None, :]
    off = rows[:, None] * stride_o + h * D + offs_d[None, :]
    g0, g1, g2 = _load_gates(GATES, rows * stride_gn + h * stride_gh, real, LOGITS)
    if QU > 1:
        g1 = tl.where(valid, g1, 0.0)
    do = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    ob = tl.load(OB + off, mask=m2, other=0.0).to(tl.float32)
    os_ = tl.load(OS + off, mask=m2, other=0.0).to(tl.float32)
    oc = tl.load(OC + ((rows // QU) * H + h)[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    tl.store(DOB + off, (g0[:, None] * do).to(DOB.dtype.element_ty), mask=m2)
    dos = (g2[:, None] * do).to(DOS.dtype.element_ty)
    tl.store(DOS + off, dos, mask=m2)
    dg0, dg1, dg2 = _gate_grads(do, ob, oc, os_, g0, g1, g2, LOGITS)
    if QU > 1:
        dg1 = tl.where(valid, dg1, 0.0)
    grow = (rows * H + h) * 3
    tl.store(DG + grow, dg0.to(DG.dtype.element_ty), mask=real)
    tl.store(DG + grow + 1, dg1.to(DG.dtype.element_ty), mask=real)
    tl.store(DG + grow + 2, dg2.to(DG.dtype.element_ty), mask=real)
    doc = g1[:, None] * do
    if QU > 1:  # the tile's GT groups of QU == GM rows: each group's sum is its o_c row's gradient
        doc = tl.sum(tl.reshape(doc, (GT, GM, BLOCK_D)), 1)
        cr = pid * GT + tl.arange(0, GT)
        crow_ok = tl.max(tl.reshape(real.to(tl.int32), (GT, GM)), 1) != 0
        tl.store(DOC + (cr * H + h)[:, None] * D + offs_d[None, :], doc.to(DOC.dtype.element_ty),
                 mask=crow_ok[:, None] & (offs_d < D)[None, :])
    else:
        tl.store(DOC + (rows * H + h)[:, None] * D + offs_d[None, :], doc.to(DOC.dtype.element_ty), mask=m2)
    return dos


@triton.jit
def _slc_bwd_dkdv_kernel(Q, K, V, DO, MASK, BPTR, BGRP, SORTED, SK, SV, LSE, DELTA, DK, DV, stride_n, stride_o,
                         qk_scale, sm_scale, n_ent,
                         G: tl.constexpr, G_P2: tl.constexpr, H: tl.constexpr, D: tl.constexpr,
                         TOPK: tl.constexpr, LS: tl.constexpr, LP: tl.constexpr, GB: tl.constexpr,
                         CHUNK: tl.constexpr, BLOCK_D: tl.constexpr, PREC: tl.constexpr, PARTIAL: tl.constexpr,
                         PER_HEAD: tl.constexpr = False, nblk_head=1):
    # A block's list of selecting groups (CSR: BGRP[BPTR[b]:BPTR[b+1]], SORTED the sorted list ids of
    # the n_ent entries) is cut into chunks of CHUNK entries from BPTR[b], so that a block picked by
    # thousands of groups does not serialise the launch. A chunk that is not its list's last one is
    # full, so chunks starting at s1 < s2 have s2 >= s1 + CHUNK: the scratch row cdiv(s, CHUNK) is
    # one per chunk, and the chunk holds entry cdiv(s, CHUNK) * CHUNK (no prefix sum, no search).
    # PARTIAL: grid (cdiv(n_ent, CHUNK), heads): program p takes the chunk holding entry p * CHUNK
    #   when it is not its list's last one (else nothing) and writes its float32 dK, dV to scratch
    #   row p.
    # else: grid (selection blocks, heads): the block's last chunk (or its whole list), plus its
    #   scratch rows in order: deterministic, no atomics; every block is written (zero if unpicked).
    # PER_HEAD: the lists are per (head, block), list h * nblk_head + b; the PARTIAL grid is
    #   (chunks, 1) and takes its head from the list it lands in.
    pid = tl.program_id(0)
    qk_scale = tl.cast(qk_scale, tl.float32)  # fp64 when inductor launches the kernel
    sm_scale = tl.cast(sm_scale, tl.float32)  # fp64 when inductor launches the kernel
    h = tl.program_id(1)
    if PARTIAL:
        e0 = pid * CHUNK
        live = e0 < n_ent
        lst = tl.load(SORTED + e0, mask=live, other=-1).to(tl.int32)
        live = live & (lst >= 0)  # -1 entries (no block) sort first and belong to no list
        lst = tl.maximum(lst, 0)
        b0 = tl.load(BPTR + lst)
        start = b0 + (tl.maximum(e0 - b0, 0) // CHUNK) * CHUNK
        live = live & (start + CHUNK < tl.load(BPTR + lst + 1))  # not the list's last chunk
        if PER_HEAD:
            h = lst // nblk_head
            blk = lst % nblk_head
        else:
            blk = lst
        end = tl.where(live, start + CHUNK, start)
    else:
        blk = pid
        if PER_HEAD:
            lst = h * nblk_head + blk
        else:
            lst = blk
        b0 = tl.load(BPTR + lst)
        end = tl.load(BPTR + lst + 1)
        n_extra = tl.maximum(end - b0 - 1, 0) // CHUNK  # full chunks before the last one
        start = b0 + n_extra * CHUNK
        x0 = (b0 + CHUNK - 1) // CHUNK  # their scratch rows: x0, x0 + 1, ...
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
        smask = kd_mask & ((t * 0 + live.to(tl.int32)) != 0)[:, None]  # a program without a chunk: none
        tl.store(SK + srow, dk, mask=smask)
        tl.store(SV + srow, dv, mask=smask)
    else:
        for x in range(x0, x0 + n_extra):
            srow = ((x * LS + t)[:, None].to(tl.int64) * H + h) * D + offs_d[None, :]
            dk += tl.load(SK + srow, mask=kd_mask, other=0.0)
            dv += tl.load(SV + srow, mask=kd_mask, other=0.0)
        tl.store(DK + slot[:, None] * stride_o + h * D + offs_d[None, :], (dk * sm_scale).to(DK.dtype.element_ty),
                 mask=kd_mask)
        tl.store(DV + slot[:, None] * stride_o + h * D + offs_d[None, :], dv.to(DV.dtype.element_ty), mask=kd_mask)


@triton.jit
def _list_ptr_kernel(SORTED, PTR, n_ent, n_lists, nsteps, BLOCK: tl.constexpr):
    # grid: tiles of BLOCK lists; PTR[b] = the first sorted entry >= b (a lower bound, searched in
    # nsteps = bit_length(n_ent) halvings), for b in [0, n_lists]
    b = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    lo = tl.zeros([BLOCK], dtype=tl.int32)
    hi = lo + n_ent
    for _ in range(nsteps):
        act = lo < hi
        mid = (lo + hi) // 2
        less = tl.load(SORTED + mid, mask=act, other=0).to(tl.int32) < b
        lo = tl.where(act & less, mid + 1, lo)
        hi = tl.where(act & less, hi, tl.where(act, mid, hi))
    tl.store(PTR + b, lo, mask=b <= n_lists)


def _invert(idx: Tensor, num_lists: int):
    r"""``(ptr, order, sorted_ids)`` of ``invert_selection``, with the sorted list ids the dK/dV
    launch reads. Three launches (a cast to the narrow key, the stable sort, one lower-bound kernel)."""
    key = torch.int16 if num_lists < 2 ** 15 - 1 else torch.int32
    sorted_ids, order = torch.sort(idx.reshape(-1).to(key), stable=True)
    n_ent = sorted_ids.numel()
    ptr = _common.new_empty((num_lists + 1,), idx, torch.int32)
    block = 1024
    _list_ptr_kernel[(cdiv(num_lists + 1, block),)](sorted_ids, ptr, n_ent, num_lists,
                                                    max(1, n_ent.bit_length()), BLOCK=block, num_warps=4)
    return ptr, order, sorted_ids


def invert_selection(idx: Tensor, num_blocks: int):
    r"""Block -> entries index (CSR) of ``idx [NG, k]`` global block ids (``-1`` = none), no host sync.

    Returns ``ptr [num_blocks + 1]`` int32 and ``order [NG * k]`` int64: block ``b`` was selected by
    the flat entries ``order[ptr[b]:ptr[b+1]]`` of ``idx`` (group ``order // k``). A stable sort on the
    narrowest key type (int16 below 32,767 blocks: half the radix passes of int32); ``-1`` entries
    sort first, before ``ptr[0]``, and are never read. ``ptr`` comes from one Triton kernel (a lower
    bound per block; it equals ``torch.searchsorted`` of the sorted ids).
    """
    ptr, order, _ = _invert(idx, num_blocks)
    return ptr, order


# Launch configs (_common's registry; tiles from benchmarks/sweep_bsa.py on the H100: benchmarks.md,
# perf-notes.md). Forward and dQ: ``rows`` query rows per program (groups side by side) and ``keys``
# keys per step (each group's next blocks); dK/dV: ``rows`` query rows per step (GB groups) and
# ``steps`` steps per chunk of a block's list.
# Forward and dQ: with ``union`` (up to d = 32, both model layers) they walk the union of a tile's
# selected blocks, ``rows`` rows (8 groups of 8) a program, each distinct block loaded once for them;
# it beat the per-group tiles at both layers, where a tile's distinct blocks are ~a quarter of its
# entries (perf-notes, twelfth session). Otherwise (d = 64, per-head selection, or the optional
# ``fallback`` launch for tiles that share less than half) each group reads its own blocks,
# ``group_rows`` rows a program: small heads (d <= 16) 8 groups, d = 64 one group, whose keys fill
# the tile (top-k 16 x 8 = 128); on the op benchmark's random inputs (~94% distinct) the walk lost
# (perf-notes, eighth and twelfth sessions).
@launch_rule("slc_fwd")
def _fwd_rule(dtype: torch.dtype, d: int) -> dict:
    return dict(rows=64, group_rows=64 if d <= 16 else 1, keys=64 if dtype == torch.float32 and d > 16 else 128,
                num_warps=4, num_stages=2, union=d <= 32, fallback=False)


@launch_rule("slc_dq")
def _dq_rule(dtype: torch.dtype, d: int) -> dict:
    return _fwd_rule(dtype, d)


@launch_rule("slc_dkdv")
def _dkdv_rule(d: int) -> dict:
    if d <= 16:
        return dict(rows=32, steps=4, num_warps=2, num_stages=2)
    return dict(rows=64, steps=4, num_warps=4, num_stages=2)


@functools.lru_cache(maxsize=256)
def _tiles(rows: int, keys: int, ls: int, topk: int, g: int):
    r"""``(LS_P2, CB, GM, GT)`` of the forward and dQ tiles: a block's padded slots, blocks per group
    and step, a group's padded rows, groups per program (about ``rows`` rows and ``keys`` keys a
    step; at least 16 of each, as a compiled ``tl.dot`` needs)."""
    ls_p2 = next_pow2(ls)
    gm = next_pow2(g)
    gt = max(1, rows // gm)
    gm = max(gm, 16 // gt)  # a lone small group is padded to 16 rows
    cb = max(1, min(next_pow2(topk), keys // (gt * ls_p2)))
    cb = max(cb, 16 // (gt * ls_p2))  # blocks past TOPK load masked
    return ls_p2, cb, gm, gt


@functools.lru_cache(maxsize=256)
def _union_tiles(rows: int, keys: int, ls: int, topk: int, g: int):
    r"""``(LS_P2, CB, GM, GT, NE)`` of the union walk: groups per program and their padded rows as
    ``_tiles`` (at most 16 groups, one bit each in an int32, and at most 128 entries a tile when
    ``topk`` allows), ``CB`` distinct blocks a step (about ``keys`` keys, at least 16), ``NE`` the
    tile's padded entry count (``GT * topk``)."""
    ls_p2, _, gm, gt = _tiles(rows, keys, ls, topk, g)
    gt = min(gt, 16)
    while gt > 1 and gt * topk > 128:  # the list kernel compares NE x NE entries in registers
        gt //= 2
    ne = next_pow2(gt * topk)
    cb = min(max(1, keys // ls_p2), ne)
    cb = max(cb, cdiv(16, ls_p2))
    return ls_p2, cb, gm, gt, ne


def _tile_entries(cfg: dict):
    r"""Pops a forward or dQ launch config's tile entries: ``(rows, group_rows, keys, union, fallback)``."""
    return cfg.pop("rows"), cfg.pop("group_rows"), cfg.pop("keys"), cfg.pop("union"), cfg.pop("fallback")


def _walk(rows: int, group_rows: int, keys: int, union: bool, fallback: bool, idx: Tensor, ls: int, g: int):
    r"""The forward and dQ launches, ``[((LS_P2, CB, GM, GT), kwargs), ...]``: one over each group's
    own blocks, ``group_rows`` rows a program; or with ``union`` and a shared selection, the union
    walk over each tile's distinct blocks and their groups (listed by one ``_union_kernel`` launch),
    ``rows`` rows a program. With ``fallback`` as well, the walk leaves out the tiles whose distinct
    blocks are more than half their entries, and a second launch runs those tiles' groups over their
    own blocks, ``group_rows`` rows a program (each program of either launch decides from the list's
    count, on the device)."""
    topk = idx.size(-1)
    if not union or idx.dim() != 2:
        return [(_tiles(group_rows, keys, ls, topk, g), {})]
    ls_p2, cb, gm, gt, ne = _union_tiles(rows, keys, ls, topk, g)
    ngrp = idx.size(0)
    tiles = cdiv(ngrp, gt)
    u, bits = (_common.new_empty((tiles, ne), idx, torch.int32) for _ in range(2))
    cnt = _common.new_empty((tiles,), idx, torch.int32)
    _union_kernel[(tiles,)](idx, u, bits, cnt, ngrp, TOPK=topk, GT=gt, NE=ne, num_warps=4)
    walk = [((ls_p2, cb, gm, gt), dict(U=u, UBITS=bits, UCNT=cnt, UNION=True, NE=ne))]
    if fallback:
        fb = _tiles(group_rows, keys, ls, topk, g)
        if fb[3] > gt or gt % fb[3]:
            fb = _tiles(1, keys, ls, topk, g)  # one group a program
        walk[0][1]["SKIP"] = 1
        walk.append((fb, dict(UCNT=cnt, SKIP=2, UGT=gt)))
    return walk


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
        cfg = config_for("slc_fwd", dtype=q.dtype, d=d)
        walk = _walk(*_tile_entries(cfg), idx, ls, g)
        for (ls_p2, cb, gm, gt), kw in walk:
            _slc_fwd_kernel[(cdiv(n // g, gt), h)](
                q, k, v, mask_i8, idx, o, lse, q.stride(0), o.stride(0), n // g, scale * LOG2E,
                G=g, H=h, D=d, LS=ls, LS_P2=ls_p2, TOPK=topk, CB=cb, GM=gm, GT=gt, BLOCK_D=dot_dim(d),
                PREC=dot_precision(q.dtype), **_per_head_kw(idx), **kw, **cfg)
        ctx.save_for_backward(q, k, v, o, lse, mask_i8, idx)
        ctx.g, ctx.ls, ctx.scale = g, ls, scale
        ctx.walk = walk  # the dQ pass walks the same tiles (a compiled graph's backward lists again)
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
        cfg = config_for("slc_dq", dtype=q.dtype, d=d)
        own = _tile_entries(cfg)
        walk = getattr(ctx, "walk", None)
        if walk is None:  # the custom op's backward (kernels/ops.py) has no forward ctx: walk again
            fwd = _tile_entries(config_for("slc_fwd", dtype=q.dtype, d=d))
            walk = _walk(*(fwd if fwd[3] else own[:3] + (False, False)), idx, ls, g)
        elif not walk[0][1]:  # the forward read each group's blocks: the dQ pass too, in its own tiles
            walk = _walk(*own[:3], False, False, idx, ls, g)
        prec = dot_precision(q.dtype)
        # the fused forward's backward (fused.py): ``do`` is the gated sum's gradient, the dQ launch (one
        # union walk, whole groups a tile) runs the combine's backward first and writes this branch's dO
        combine = getattr(ctx, "combine", None) or {}
        for (ls_p2, cb, gm, gt), kw in walk:
            _slc_bwd_dq_kernel[(cdiv(n // g, gt), h)](
                q, k, v, do, o, mask_i8, idx, lse, delta, dq, q.stride(0), do.stride(0), n // g, scale * LOG2E,
                scale, G=g, H=h, D=d, LS=ls, LS_P2=ls_p2, TOPK=topk, CB=cb, GM=gm, GT=gt, BLOCK_D=dot_dim(d),
                PREC=prec, **_per_head_kw(idx), **kw, **combine, **cfg)
        _dkdv(q, k, v, combine.get("DOS", do), mask_i8, idx, lse, delta, dk, dv, g, ls, scale, prec)
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
    bptr, bgrp, sorted_ids = _invert(idx, nlists)
    g_p2 = next_pow2(g)
    cfg = config_for("slc_dkdv", d=d)
    gb = max(1, cfg.pop("rows") // g_p2)
    chunk = gb * cfg.pop("steps")
    # a scratch row per chunk that is not its list's last one, at row cdiv(chunk start, chunk) (at
    # most entries / chunk of them: a static bound, so no host read)
    nx = max(1, cdiv(idx.numel(), chunk))
    sk, sv = (torch.empty((nx, ls, h, d), device=q.device, dtype=torch.float32) for _ in range(2))
    common = dict(G=g, G_P2=g_p2, H=h, D=d, TOPK=topk, LS=ls, LP=max(16, next_pow2(ls)), GB=gb, CHUNK=chunk,
                  BLOCK_D=dot_dim(d), PREC=prec, **cfg)
    # the shared launch passes nothing new: its kernels compile and run as before the per-head rule
    extra = dict(PER_HEAD=True, nblk_head=nblk) if per_head else {}
    args = (q, k, v, do, mask_i8, bptr, bgrp, sorted_ids, sk, sv, lse, delta, dk, dv, q.stride(0), do.stride(0),
            scale * LOG2E, scale, idx.numel())
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
