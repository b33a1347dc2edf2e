"""Triton kernels for BSA. Each module names the reference function (reference.py) it must equal.

``bsa_triton`` chains them: ball kernel (ball.py), mean pooling (PyTorch), compression attention
(compressed.py, saves the LSE), streamed group top-k (topk.py), selected attention (selected.py), and
the gated sum (combine.py, one pass). Nothing here knows about PyG.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

__all__ = ["bsa_triton", "compress_mean_fast", "compression_branch"]


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


def bsa_triton(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree, cfg, *, sigma: Tensor, gates: Tensor,
               k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None,
               cmp_mask: Optional[Tensor] = None, return_branches: bool = False):
    r"""Full BSA through the Triton kernels; same signature and result as
    ``bsa_reference`` (``[N_pad, H, D]``, zero at padded slots).

    The selection's top-k runs streamed in a kernel when ``cmp_block == cmp_stride == slc_block``
    (the defaults); otherwise, and always with ``cfg.selection == "per_head"`` (the authors' rule:
    ``idx [N_pad // g, H, k']``), the selection scores come from the dense reference (O(N^2 / l)
    memory, a cloud of 65k points at ``l = 8`` needs ``H * 65k * 8k`` fp32 scores).
    """
    from .compressed import compressed_attention_triton
    from .selected import selected_attention_triton

    mask, s, g, ls = tree.mask, cfg.cmp_stride, cfg.group_size, cfg.slc_block
    # the kernels read masks as uint8 / int8: converted once per tree, not per layer
    mask_u8, mask_i8 = tree.mask_as(torch.uint8), tree.mask_as(torch.int8)
    o_ball = _ball(q, k, v, pos, sigma, mask_u8, cfg.ball_size)
    o_c, lse, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, ranges = compression_branch(
        q, k, v, tree, cfg, k_cmp, v_cmp, cmp_mask)
    w = cfg.cmp_window
    with torch.no_grad():
        if cfg.selection == "shared" and cfg.cmp_block == s == ls and (g // q_unit) & (g // q_unit - 1) == 0:
            from .plan import selection_plan
            from .topk import select_topk_triton
            svalid, granges, kk = selection_plan(tree, g, ls, cfg.topk, w)
            idx = select_topk_triton(q_cmp.detach(), k_cmp.detach(), lse, cmp_mask, svalid, ranges[:2], granges, kk)
        else:
            idx = _dense_selection(q_cmp.detach(), k_cmp.detach(), v_cmp.detach(), cmp_mask, tree, cfg, q_unit)
    o_slc = selected_attention_triton(q, k, v, idx, mask_i8, g, ls)
    from ..reference import per_slot
    from .combine import gated_combine
    out = gated_combine(o_ball, o_c, o_slc, gates[..., :3], mask_u8, q_unit)  # one pass, no repeat_interleave copy
    o_crs = None
    if w is not None:
        # the coarse global branch: one mean-pooled key per ball of the whole cloud
        m = cfg.ball_size
        from .plan import compressed_ranges
        k_crs, v_crs, crs_mask = _mean_pool(k, v, tree, m, m)
        o_crs, _ = compressed_attention_triton(q_cmp, k_crs, v_crs, crs_mask, compressed_ranges(tree, q_unit, m),
                                               ragged=tree.num_clouds > 1)
        o_crs = per_slot(o_crs, mask, q_unit)
        out = out + gates[..., 3:4] * o_crs
    if return_branches:
        branches = dict(ball=o_ball, cmp=per_slot(o_c, mask, q_unit), slc=o_slc, idx=idx)
        if o_crs is not None:
            branches["crs"] = o_crs
        return out, branches
    return out


def compression_branch(q: Tensor, k: Tensor, v: Tensor, tree, cfg, k_cmp: Optional[Tensor] = None,
                       v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None):
    r"""The compression branch of :func:`bsa_triton` and what the selection reuses from it.

    Returns ``(o_c, lse, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, ranges)``: the branch output and
    log-sum-exp at query granularity ``q_unit`` (1, or ``group_size`` with group compression), the
    (pooled) queries, the compressed keys/values and their mask (mean pooling when not given), and
    the per-row key ranges (cut to ``cfg.cmp_window`` when set).
    """
    from .compressed import compressed_attention_triton
    from .plan import compressed_ranges
    s = cfg.cmp_stride
    if k_cmp is None:
        k_cmp, v_cmp, cmp_mask = _mean_pool(k, v, tree, cfg.cmp_block, s)
    elif cmp_mask is None:
        from ..reference import block_mask
        cmp_mask = block_mask(tree, cfg.cmp_block, s)
    if cmp_mask is tree._cache.get(("block_any", cfg.cmp_block, s)):  # the compressor's (cached) mask
        cmp_mask = tree.cached(("block_any_i8", cfg.cmp_block, s), lambda: cmp_mask.to(torch.int8))
    if cfg.group_compression:
        from .combine import masked_block_mean
        q_cmp, q_unit = masked_block_mean(q, tree.mask_as(torch.uint8), cfg.group_size), cfg.group_size
    else:
        q_cmp, q_unit = q, 1
    ranges = compressed_ranges(tree, q_unit, s, window=cfg.cmp_window)
    # rows see different key ranges with several clouds or windows (a Python int: no host sync)
    ragged = tree.num_clouds > 1 or cfg.cmp_window is not None
    o_c, lse = compressed_attention_triton(q_cmp, k_cmp, v_cmp, cmp_mask, ranges, ragged=ragged)
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
