"""Gated combine of the three branches in one pass, and the masked block mean of the pooling.

``out = g_ball * o_ball + g_cmp * o_cmp + g_slc * o_slc`` with ``gates [N_pad, H, 3]`` (or their
logits: the sigmoid is applied in the kernel, and the backward folds in its derivative). With group
compression ``o_cmp`` is read per group (row ``n // q_unit`` of ``o_c``) and masked by slot validity,
so the ``repeat_interleave`` copy of the PyTorch version never exists. The backward writes the three
branch gradients, the gate gradients and (summed over each group's rows) the gradient of ``o_c`` in
one pass. Must equal the PyTorch expression in ``torch_geometric_bsa.reference.bsa_reference``.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from . import _common
from ._common import config_for, launch_rule, next_pow2

__all__ = ["gated_combine", "masked_block_mean"]


@triton.jit
def _load_gates(G, grow, rmask, LOGITS: tl.constexpr):
    # a row's three gates (float32) at G + grow (+1, +2); with LOGITS G holds logits: their sigmoid
    g0 = tl.load(G + grow, mask=rmask, other=0.0).to(tl.float32)
    g1 = tl.load(G + grow + 1, mask=rmask, other=0.0).to(tl.float32)
    g2 = tl.load(G + grow + 2, mask=rmask, other=0.0).to(tl.float32)
    if LOGITS:
        g0 = tl.sigmoid(g0)
        g1 = tl.sigmoid(g1)
        g2 = tl.sigmoid(g2)
    return g0, g1, g2


@triton.jit
def _gate_grads(do, ob, oc, os_, g0, g1, g2, LOGITS: tl.constexpr):
    # the gradients of a row's gates from float32 tiles of dO and the three branches; with LOGITS
    # the logits', dL/dg * sigmoid'(logit) = dL/dg * g (1 - g)
    dg0 = tl.sum(do * ob, 1)
    dg1 = tl.sum(do * oc, 1)
    dg2 = tl.sum(do * os_, 1)
    if LOGITS:
        dg0 = dg0 * g0 * (1.0 - g0)
        dg1 = dg1 * g1 * (1.0 - g1)
        dg2 = dg2 * g2 * (1.0 - g2)
    return dg0, dg1, dg2


@triton.jit
def _gated_rows(G, MASK, n_grp, stride_gn, stride_gh, h, H: tl.constexpr, D: tl.constexpr, QU: tl.constexpr,
                BG: tl.constexpr, BLOCK_D: tl.constexpr, LOGITS: tl.constexpr):
    # a program's rows (tiles of BG groups of QU rows, head h) and their three gates, for the forward
    # and the backward: row n of head h lives at (n * H + h) * D, its gates at n * stride_gn + h *
    # stride_gh (e.g. a view of the projection that made them); LOGITS: G holds the logits, the gates
    # are their sigmoid (in float32). With QU > 1 the compression gate is 0 at padded slots (valid)
    grp = tl.program_id(0) * BG + tl.arange(0, BG)
    R: tl.constexpr = BG * QU
    n = tl.reshape(grp[:, None] * QU + tl.arange(0, QU)[None, :], (R,))
    gv = tl.reshape((grp < n_grp)[:, None] & (tl.arange(0, QU) >= 0)[None, :], (R,))
    offs_d = tl.arange(0, BLOCK_D)
    m2 = gv[:, None] & (offs_d < D)[None, :]
    row = n * H + h
    off = row[:, None] * D + offs_d[None, :]
    g0, g1, g2 = _load_gates(G, n.to(tl.int64) * stride_gn + h * stride_gh, gv, LOGITS)
    valid = gv
    if QU > 1:  # pooled group queries: o_c row of the group, zero at padded slots
        valid = tl.load(MASK + n, mask=gv, other=0) != 0
        g1 = tl.where(valid, g1, 0.0)
    return grp, n, gv, offs_d, m2, row, off, g0, g1, g2, valid


@triton.jit
def _combine_fwd_kernel(OB, OC, OS, G, MASK, OUT, n_grp, stride_gn, stride_gh, H: tl.constexpr, D: tl.constexpr,
                        QU: tl.constexpr, BG: tl.constexpr, BLOCK_D: tl.constexpr, LOGITS: tl.constexpr = False):
    # grid: (tiles of BG groups of QU rows, heads); the rows and their gates: _gated_rows
    h = tl.program_id(1)
    grp, n, gv, offs_d, m2, row, off, g0, g1, g2, valid = _gated_rows(G, MASK, n_grp, stride_gn, stride_gh, h, H, D,
                                                                      QU, BG, BLOCK_D, LOGITS)
    crow = (n // QU) * H + h
    ob = tl.load(OB + off, mask=m2, other=0.0).to(tl.float32)
    oc = tl.load(OC + crow[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    os_ = tl.load(OS + off, mask=m2, other=0.0).to(tl.float32)
    out = g0[:, None] * ob + g1[:, None] * oc + g2[:, None] * os_
    tl.store(OUT + off, out.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _combine_bwd_kernel(DO, OB, OC, OS, G, MASK, DOB, DOC, DOS, DG, n_grp, stride_gn, stride_gh, H: tl.constexpr,
                        D: tl.constexpr, QU: tl.constexpr, BG: tl.constexpr, BLOCK_D: tl.constexpr,
                        LOGITS: tl.constexpr = False):
    # LOGITS: G holds the logits and DG gets their gradient (_gate_grads)
    h = tl.program_id(1)
    grp, n, gv, offs_d, m2, row, off, g0, g1, g2, valid = _gated_rows(G, MASK, n_grp, stride_gn, stride_gh, h, H, D,
                                                                      QU, BG, BLOCK_D, LOGITS)
    crow = (n // QU) * H + h
    do = tl.load(DO + off, mask=m2, other=0.0).to(tl.float32)
    ob = tl.load(OB + off, mask=m2, other=0.0).to(tl.float32)
    oc = tl.load(OC + crow[:, None] * D + offs_d[None, :], mask=m2, other=0.0).to(tl.float32)
    os_ = tl.load(OS + off, mask=m2, other=0.0).to(tl.float32)
    tl.store(DOB + off, (g0[:, None] * do).to(DOB.dtype.element_ty), mask=m2)
    tl.store(DOS + off, (g2[:, None] * do).to(DOS.dtype.element_ty), mask=m2)
    dg0, dg1, dg2 = _gate_grads(do, ob, oc, os_, g0, g1, g2, LOGITS)
    if QU > 1:
        dg1 = tl.where(valid, dg1, 0.0)
    tl.store(DG + row * 3, dg0.to(DG.dtype.element_ty), mask=gv)
    tl.store(DG + row * 3 + 1, dg1.to(DG.dtype.element_ty), mask=gv)
    tl.store(DG + row * 3 + 2, dg2.to(DG.dtype.element_ty), mask=gv)
    doc = g1[:, None] * do
    if QU > 1:  # sum over the group's rows: the gradient of the shared o_c row
        doc = tl.sum(tl.reshape(doc, (BG, QU, BLOCK_D)), 1)
        cr = grp * H + h
        tl.store(DOC + cr[:, None] * D + offs_d[None, :], doc.to(DOC.dtype.element_ty),
                 mask=(grp < n_grp)[:, None] & (offs_d < D)[None, :])
    else:
        tl.store(DOC + off, doc.to(DOC.dtype.element_ty), mask=m2)


@launch_rule("combine")
def _combine_rule(qu: int, d: int) -> dict:
    # BG groups of qu rows a program: at most 128 rows and 4,096 elements per head tile
    return dict(BG=max(1, min(128, 4096 // next_pow2(d)) // qu), num_warps=4)


def _gate_rows(gates: Tensor) -> Tensor:
    # the kernels read a gate row's three values side by side; the rows may be a strided view
    return gates if gates.stride(-1) == 1 else gates.contiguous()


def _logits_kw(logits: bool) -> dict:
    # squashed gates: LOGITS keeps its default (one variant less to compile when logits never come)
    return dict(LOGITS=True) if logits else {}


class GatedCombine(torch.autograd.Function):
    @staticmethod
    def forward(ctx, o_ball, o_c, o_slc, gates, mask_u8, qu, logits=False):
        n, h, d = o_ball.shape
        o_ball, o_c, o_slc = (t.contiguous() for t in (o_ball, o_c, o_slc))
        gates = _gate_rows(gates)
        out = _common.new_empty(o_ball.shape, o_ball, torch.promote_types(o_ball.dtype, gates.dtype))
        n_grp = n // qu
        cfg = config_for("combine", qu=qu, d=d)
        _combine_fwd_kernel[(triton.cdiv(n_grp, cfg["BG"]), h)](o_ball, o_c, o_slc, gates, mask_u8, out, n_grp,
                                                               gates.stride(0), gates.stride(1), H=h, D=d,
                                                               QU=qu, BLOCK_D=next_pow2(d), **_logits_kw(logits),
                                                               **cfg)
        ctx.save_for_backward(o_ball, o_c, o_slc, gates, mask_u8)
        ctx.qu, ctx.logits = qu, logits
        return out

    @staticmethod
    def backward(ctx, do):
        o_ball, o_c, o_slc, gates, mask_u8 = ctx.saved_tensors
        qu = ctx.qu
        n, h, d = o_ball.shape
        do = do.contiguous()
        dob, dos = _common.new_empty(o_ball.shape, o_ball), _common.new_empty(o_slc.shape, o_slc)
        doc = _common.new_empty(o_c.shape, o_c)
        dg = _common.new_empty(gates.shape, gates)  # contiguous, whatever the gates' strides
        n_grp = n // qu
        cfg = config_for("combine", qu=qu, d=d)
        _combine_bwd_kernel[(triton.cdiv(n_grp, cfg["BG"]), h)](do, o_ball, o_c, o_slc, gates, mask_u8, dob, doc, dos,
                                                               dg, n_grp, gates.stride(0), gates.stride(1), H=h, D=d,
                                                               QU=qu, BLOCK_D=next_pow2(d),
                                                               **_logits_kw(ctx.logits), **cfg)
        return dob, doc, dos, dg, None, None, None


def gated_combine(o_ball: Tensor, o_c: Tensor, o_slc: Tensor, gates: Tensor, mask: Tensor, q_unit: int = 1,
                  logits: bool = False) -> Tensor:
    r"""``gates[..., 0:1] * o_ball + gates[..., 1:2] * o_cmp + gates[..., 2:3] * o_slc`` in one pass.

    Args:
        o_ball, o_slc: ``[N_pad, H, D]``. o_c: ``[N_pad // q_unit, H, D]`` (per group with group
            compression, where ``o_cmp = o_c.repeat_interleave(q_unit, 0) * mask``).
        gates: ``[N_pad, H, 3]``; the output has the promoted dtype of gates and branches. mask: ``[N_pad]`` slot validity.
        q_unit: slots per compression query (1, or the group size; a power of two).
        logits: ``gates`` holds the gate logits: the kernel applies the sigmoid (in float32) and its
            backward returns the logits' gradient (no separate sigmoid launches either way).
    """
    n, h, d = o_ball.shape
    if o_c.shape != (n // q_unit, h, d) or o_slc.shape != o_ball.shape or gates.shape != (n, h, 3):
        raise ValueError(f"shape mismatch: o_ball {list(o_ball.shape)}, o_c {list(o_c.shape)}, "
                         f"o_slc {list(o_slc.shape)}, gates {list(gates.shape)} (q_unit={q_unit})")
    if q_unit & (q_unit - 1):
        raise ValueError(f"q_unit must be a power of two, got {q_unit}")
    dt = o_ball.dtype
    logits = bool(logits)
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.combine(o_ball, o_c.to(dt), o_slc.to(dt), gates, _as_u8(mask), q_unit, logits)
    return GatedCombine.apply(o_ball, o_c.to(dt), o_slc.to(dt), gates,
                              _as_u8(mask), q_unit, logits)


# ---------------------------------------------------------------------------------------------
# masked block mean (mean pooling of keys/values per compression block, of queries per group)
# ---------------------------------------------------------------------------------------------
@triton.jit
def _pool_fwd_kernel(X, MASK, OUT, n_blk, stride_x, HD: tl.constexpr, L: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, UNROLL: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bm = b < n_blk
    m2 = bm[:, None] & (c < HD)[None, :]
    acc = tl.zeros([BLOCK_B, BLOCK_C], dtype=tl.float32)
    cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    # unrolled for compression blocks and groups; a loop for ball-sized blocks (the coarse branch:
    # unrolling 256 steps took minutes to compile)
    for j in tl.range(0, L, loop_unroll_factor=UNROLL):
        n = (b * L + j).to(tl.int64)
        w = (tl.load(MASK + n, mask=bm, other=0) != 0).to(tl.float32)
        x = tl.load(X + n[:, None] * stride_x + c[None, :], mask=m2, other=0.0).to(tl.float32)
        acc += x * w[:, None]
        cnt += w
    out = acc / tl.maximum(cnt, 1.0)[:, None]
    tl.store(OUT + b[:, None] * HD + c[None, :], out.to(OUT.dtype.element_ty), mask=m2)


@triton.jit
def _pool_bwd_kernel(DOUT, MASK, DX, n_blk, HD: tl.constexpr, L: tl.constexpr, BLOCK_B: tl.constexpr,
                     BLOCK_C: tl.constexpr, UNROLL: tl.constexpr):
    b = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
    bm = b < n_blk
    m2 = bm[:, None] & (c < HD)[None, :]
    cnt = tl.zeros([BLOCK_B], dtype=tl.float32)
    for j in tl.range(0, L, loop_unroll_factor=UNROLL):
        cnt += (tl.load(MASK + b * L + j, mask=bm, other=0) != 0).to(tl.float32)
    g = tl.load(DOUT + b[:, None] * HD + c[None, :], mask=m2, other=0.0).to(tl.float32) / tl.maximum(cnt, 1.0)[:, None]
    for j in tl.range(0, L, loop_unroll_factor=UNROLL):
        n = b * L + j
        w = (tl.load(MASK + n, mask=bm, other=0) != 0).to(tl.float32)
        tl.store(DX + n[:, None] * HD + c[None, :], (g * w[:, None]).to(DX.dtype.element_ty), mask=m2)


@launch_rule("pool")
def _pool_rule(hd: int, block: int) -> dict:
    # BLOCK_B blocks x BLOCK_C of the H * D columns a program; the block's rows unrolled
    return dict(BLOCK_B=32, BLOCK_C=min(256, next_pow2(hd)), UNROLL=block if block <= 32 else 8, num_warps=4)


def _pool_grid(n_blk: int, hd: int, block: int):
    r"""``(config, grid)`` of the pooling kernels for ``n_blk`` blocks of ``block`` rows of ``hd`` columns."""
    cfg = config_for("pool", hd=hd, block=block)
    return cfg, (triton.cdiv(n_blk, cfg["BLOCK_B"]), triton.cdiv(hd, cfg["BLOCK_C"]))


class MaskedBlockMean(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mask_u8, block):
        n, h, d = x.shape
        x = _common.rows(x)  # a view of the qkv projection reads in place
        n_blk = n // block
        out = _common.new_empty((n_blk, h, d), x)
        cfg, grid = _pool_grid(n_blk, h * d, block)
        _pool_fwd_kernel[grid](x, mask_u8, out, n_blk, x.stride(0), HD=h * d, L=block, **cfg)
        ctx.save_for_backward(mask_u8)
        ctx.shape, ctx.block = x.shape, block
        return out

    @staticmethod
    def backward(ctx, dout):
        (mask_u8,) = ctx.saved_tensors
        n, h, d = ctx.shape
        dout = dout.contiguous()
        dx = _common.new_empty((n, h, d), dout)
        cfg, grid = _pool_grid(n // ctx.block, h * d, ctx.block)
        _pool_bwd_kernel[grid](dout, mask_u8, dx, n // ctx.block, HD=h * d, L=ctx.block, **cfg)
        return dx, None, None


def masked_block_mean(x: Tensor, mask: Tensor, block: int) -> Tensor:
    r"""Mean of the valid rows of each block of ``block`` consecutive rows: ``x [N, H, D]``,
    ``mask [N]`` -> ``[N // block, H, D]`` (zero for a block with no valid row). One pass each way."""
    if x.size(0) % block:
        raise ValueError(f"x has {x.size(0)} rows, not a multiple of block={block}")
    if torch.compiler.is_compiling():  # an opaque custom op for the graph (kernels/ops.py)
        from . import ops
        return ops.block_mean(x, _as_u8(mask), block)
    return MaskedBlockMean.apply(x, _as_u8(mask), block)


def _as_u8(mask: Tensor) -> Tensor:
    # the kernels read ``mask != 0``; a uint8 mask (the tree's cached one) passes as is
    if mask.dtype == torch.uint8:
        return mask
    if mask.dtype == torch.bool and mask.is_contiguous():
        return mask.view(torch.uint8)  # the bool mask's own bytes: no kernel
    return mask.to(torch.bool).to(torch.uint8)
