"""Triton kernels for BSA. Each module names the reference function (reference.py) it must equal.

``bsa_triton`` chains them: ball kernel (ball.py), mean pooling (PyTorch), compression attention
(compressed.py, saves the LSE), streamed group top-k (topk.py), selected attention (selected.py), and
the gated sum (combine.py, one pass); where ``fused.fusable`` says so, the ball branch, the selected
blocks and the gated sum run in one forward launch (fused.py). Nothing here knows about PyG.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ..compose import Branches, compose, compressed_keys

__all__ = ["bsa_triton", "compress_mean_fast", "compression_branch", "TritonBranches"]


def compress_mean_fast(k: Tensor, v: Tensor, mask: Tensor, block: int, block_mask: Optional[Tensor] = None):
    r"""Mean pooling of keys and values over blocks of ``block`` slots that tile the clouds, one
    pass each (no gathered copy): ``k, v [N_pad, H, D]``, ``mask [N_pad]`` -> ``k_cmp, v_cmp
    [N_pad // block, H, D]`` and the block mask ``[N_pad // block]`` (``block_mask`` when given)."""
    from .combine import masked_block_mean
    if block_mask is None:
        block_mask = mask.view(-1, block).any(1)
    return masked_block_mean(k, mask, block), masked_block_mean(v, mask, block), block_mask


def _mean_pool(k: Tensor, v: Tensor, tree, block: int, stride: int):
    # blocks tile clouds exactly when stride == block (cloud sizes are multiples of ball_size, a
    # multiple of block); overlapping blocks take the reference's gather
    if stride != block:
        from ..reference import compress_mean
        return compress_mean(k, v, tree.mask, tree.slot_batch, block, stride)
    # the block mask is the compressor's memo entry: computed once per tree for every layer
    return compress_mean_fast(k, v, tree.mask_as(torch.uint8), block,
                              tree.cached(("block_any", block, block), lambda: tree.mask.view(-1, block).any(1)))


def _ball(q, k, v, pos, sigma, mask, ball_size):
    # shapes the fused kernel does not cover (balls below 16 are cheap anyway) take the reference's
    # dense per-ball attention
    from .ball import ball_attention_triton, supports
    if supports(ball_size, q.size(-1)):
        return ball_attention_triton(q, k, v, pos, sigma, mask, ball_size)
    from ..reference import ball_attention
    return ball_attention(q, k, v, pos, sigma, mask.bool(), ball_size)


class TritonBranches(Branches):
    r"""The Triton kernels as ``compose.Branches``: ball kernel, mean pooling, compression
    attention (saves the LSE), streamed group top-k, selected attention, one-pass gated sum."""

    def ball(self, q, k, v, pos, sigma, tree, cfg):
        return _ball(q, k, v, pos, sigma, tree.mask_as(torch.uint8), cfg.ball_size)

    def pool(self, k, v, tree, block, stride):
        return _mean_pool(k, v, tree, block, stride)

    def group_queries(self, q, tree, q_unit):
        if q_unit == 1:
            return q
        from .combine import masked_block_mean
        return masked_block_mean(q, tree.mask_as(torch.uint8), q_unit)

    def fuses(self, q, tree, cfg):
        from .fused import fusable
        from .plan import selected_count
        # the compiled graph keeps the separate custom ops (kernels/ops.py)
        return (cfg.selection == "shared" and not torch.compiler.is_compiling()
                and fusable(cfg.ball_size, q.size(-1), q.dtype, cfg.group_size, cfg.slc_block,
                            selected_count(tree, cfg.slc_block, cfg.topk)))

    def fused(self, q, k, v, pos, sigma, o_c, idx, gates, tree, cfg, q_unit, logits):
        from .fused import fused_local_combine
        return fused_local_combine(q, k, v, pos, sigma, tree.mask_as(torch.uint8), o_c, idx, gates, cfg.ball_size,
                                   cfg.group_size, cfg.slc_block, q_unit, logits)

    def global_branches(self, q, k, v, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg, selected=True):
        from .selected import selected_attention_triton
        o_c, lse, cmp_mask, ranges = _compression(q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg)
        g, ls = cfg.group_size, cfg.slc_block
        with torch.no_grad():
            if cfg.selection == "shared" and cfg.cmp_block == cfg.cmp_stride == ls and (g // q_unit) & (g // q_unit - 1) == 0:
                from .plan import selection_plan
                from .topk import select_topk_triton
                svalid, granges, kk = selection_plan(tree, g, ls, cfg.topk, cfg.cmp_window)
                idx = select_topk_triton(q_cmp.detach(), k_cmp.detach(), lse, cmp_mask, svalid, ranges[:2], granges, kk)
            else:
                idx = _dense_selection(q_cmp.detach(), k_cmp.detach(), v_cmp.detach(), cmp_mask, tree, cfg, q_unit)
        # the kernels read masks as int8: converted once per tree, not per layer
        o_slc = selected_attention_triton(q, k, v, idx, tree.mask_as(torch.int8), g, ls) if selected else None
        return o_c, o_slc, dict(idx=idx)

    def coarse(self, q_cmp, k_crs, v_crs, crs_mask, tree, stride, q_unit):
        from .compressed import compressed_attention_triton
        from .plan import compressed_ranges
        return compressed_attention_triton(q_cmp, k_crs, v_crs, crs_mask, compressed_ranges(tree, q_unit, stride),
                                           ragged=tree.num_clouds > 1)[0]

    def combine(self, o_ball, o_c, o_slc, gates, tree, q_unit):
        from .combine import gated_combine
        return gated_combine(o_ball, o_c, o_slc, gates, tree.mask_as(torch.uint8), q_unit)  # one pass

    def combine_logits(self, o_ball, o_c, o_slc, logits, tree, q_unit):
        from .combine import gated_combine
        # the sigmoid (and its derivative in the backward) inside the combine kernel: no launch of its own
        return gated_combine(o_ball, o_c, o_slc, logits, tree.mask_as(torch.uint8), q_unit, logits=True)


TRITON = TritonBranches()


def bsa_triton(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree, cfg, *, sigma: Tensor,
               gates: Optional[Tensor] = None, k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None,
               cmp_mask: Optional[Tensor] = None, return_branches: bool = False,
               gate_logits: Optional[Tensor] = None):
    r"""Full BSA through the Triton kernels (``compose.compose`` with ``TritonBranches``); same
    signature and result as ``bsa_reference`` (``[N_pad, H, D]``, zero at padded slots). With
    ``gate_logits`` instead of ``gates`` the combine kernel applies the sigmoid itself.

    The selection's top-k runs streamed in a kernel when ``cmp_block == cmp_stride == slc_block``
    (the defaults); otherwise, and always with ``cfg.selection == "per_head"`` (the authors' rule:
    ``idx [N_pad // g, H, k']``), the selection scores come from the dense reference (O(N^2 / l)
    memory, a cloud of 65k points at ``l = 8`` needs ``H * 65k * 8k`` fp32 scores).
    """
    return compose(TRITON, q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                   cmp_mask=cmp_mask, return_branches=return_branches, gate_logits=gate_logits)


def _compression(q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg):
    # the compression attention and what the selection reuses: (o_c, lse, cmp_mask as int8, ranges)
    from .compressed import compressed_attention_triton
    from .plan import compressed_ranges
    from .plan import as_int8
    s = cfg.cmp_stride
    cmp_mask = as_int8(cmp_mask)  # a bool mask's own bytes (a view): no kernel
    ranges = compressed_ranges(tree, q_unit, s, window=cfg.cmp_window)
    # rows see different key ranges with several clouds or windows (a Python int: no host sync)
    ragged = tree.num_clouds > 1 or cfg.cmp_window is not None
    o_c, lse = compressed_attention_triton(q_cmp, k_cmp, v_cmp, cmp_mask, ranges, ragged=ragged)
    return o_c, lse, cmp_mask, ranges


def compression_branch(q: Tensor, k: Tensor, v: Tensor, tree, cfg, k_cmp: Optional[Tensor] = None,
                       v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None):
    r"""The compression branch of :func:`bsa_triton` and what the selection reuses from it
    (benchmarks time it alone).

    Returns ``(o_c, lse, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, ranges)``: the branch output and
    log-sum-exp at query granularity ``q_unit`` (1, or ``group_size`` with group compression), the
    (pooled) queries, the compressed keys/values and their mask (mean pooling when not given), and
    the per-row key ranges (cut to ``cfg.cmp_window`` when set).
    """
    k_cmp, v_cmp, cmp_mask = compressed_keys(TRITON, k, v, tree, cfg, k_cmp, v_cmp, cmp_mask)
    q_unit = cfg.group_size if cfg.group_compression else 1
    q_cmp = TRITON.group_queries(q, tree, q_unit)
    o_c, lse, cmp_mask, ranges = _compression(q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg)
    return o_c, lse, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, ranges


def _dense_selection(q_cmp, k_cmp, v_cmp, cmp_mask, tree, cfg, q_unit):
    r"""Fallback selection for block shapes the streamed kernel does not cover, and the per-head rule:
    the reference's dense scores, converted to global block ids ``[N_pad // g, k']`` (``[N_pad // g,
    H, k']`` with ``cfg.selection == "per_head"``; -1 = invalid)."""
    from ..reference import _from_dense, compressed_attention, select_blocks, selection_scores
    cmp_mask = cmp_mask.bool()
    _, p = compressed_attention(q_cmp, k_cmp, v_cmp, cmp_mask, tree, cfg.cmp_stride, return_probs=True,
                                window=cfg.cmp_window, return_logits=cfg.selection == "per_head")
    idx, valid = select_blocks(selection_scores(p, tree, cfg, q_unit), cfg.topk)
    ng = tree.num_slots // cfg.group_size
    loc = _from_dense(torch.where(valid, idx, -1), tree.ptr, tree.max_slots, ng, cfg.group_size)
    cloud = tree.slot_batch[::cfg.group_size][:ng]
    off = (tree.ptr[cloud] // cfg.slc_block).view((ng,) + (1,) * (loc.dim() - 1))
    return torch.where(loc >= 0, loc + off, -1).to(torch.int32).contiguous()
