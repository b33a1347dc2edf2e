"""The one composition of BSA's branches, shared by every backend.

``compose`` is BSA as the paper writes it: the ball branch, the compressed keys (mean pooling when
none are given), the compression branch and the selection it scores, the selected blocks, the
gated sum, and the coarse branch of ``cfg.cmp_window``. A backend (``reference``, ``cpu``,
``kernels``) supplies only how each step is computed, as a ``Branches`` object; the order, the
defaults and the gating live here once.
"""
from __future__ import annotations

import contextlib
from typing import Dict, Optional, Tuple

import torch
from torch import Tensor

from .balltree import BallTree

__all__ = ["Branches", "compose", "compressed_keys"]


class Branches:
    r"""How a backend computes each step of ``compose``. Shapes: ``N = N_pad`` slots, ``H`` heads,
    ``D`` head dim; ``q_unit`` is 1, or the group size with group compression."""

    def context(self, q: Tensor):
        r"""A context the whole composition runs in (e.g. autocast off)."""
        return contextlib.nullcontext()

    def ball(self, q, k, v, pos, sigma, tree: BallTree, cfg) -> Tensor:
        r"""The ball branch, ``[N, H, D]``."""
        raise NotImplementedError

    def pool(self, k, v, tree: BallTree, block: int, stride: int) -> Tuple[Tensor, Tensor, Tensor]:
        r"""Mean-pooled keys and values ``[N // stride, H, D]`` and the block mask ``[N // stride]``."""
        raise NotImplementedError

    def block_mask(self, tree: BallTree, block: int, stride: int) -> Tensor:
        from .reference import block_mask
        return block_mask(tree, block, stride)

    def group_queries(self, q, tree: BallTree, q_unit: int) -> Tensor:
        r"""The compression branch's queries: ``q`` itself (``q_unit == 1``), or the mean of each
        group's valid queries ``[N // q_unit, H, D]``."""
        raise NotImplementedError

    def global_branches(self, q, k, v, q_cmp, q_unit: int, k_cmp, v_cmp, cmp_mask, tree: BallTree,
                        cfg) -> Tuple[Tensor, Tensor, Dict]:
        r"""The compression branch ``[N // q_unit, H, D]`` (zero at padding), the selection branch
        ``[N, H, D]`` over the blocks the compression scores pick, and what to report of the
        selection (``return_branches``)."""
        raise NotImplementedError

    def coarse(self, q_cmp, k_crs, v_crs, crs_mask, tree: BallTree, stride: int, q_unit: int) -> Tensor:
        r"""Attention of the compression queries to one pooled key per ball of their whole cloud,
        ``[N // q_unit, H, D]``."""
        raise NotImplementedError

    def combine(self, o_ball, o_c, o_slc, gates, tree: BallTree, q_unit: int) -> Tensor:
        r"""``gates[..., 0] o_ball + gates[..., 1] o_c (per slot) + gates[..., 2] o_slc``."""
        raise NotImplementedError

    def combine_logits(self, o_ball, o_c, o_slc, logits, tree: BallTree, q_unit: int) -> Tensor:
        r"""``combine`` with the gates given as logits ``[N, H, 3]`` (``gates = sigmoid(logits)``)."""
        return self.combine(o_ball, o_c, o_slc, torch.sigmoid(logits), tree, q_unit)

    def fuses(self, q: Tensor, tree: BallTree, cfg) -> bool:
        r"""Whether this call takes ``fused`` for the ball branch, the selected blocks and the gated
        sum. A backend that says yes takes ``selected=False`` in ``global_branches`` (which then
        returns no selection branch, ``None``, and the selection as ``idx`` in its dict)."""
        return False

    def fused(self, q, k, v, pos, sigma, o_c, idx, gates, tree: BallTree, cfg, q_unit: int,
              logits: bool) -> Tensor:
        r"""``combine`` (``combine_logits`` with ``logits``) of the ball branch, ``o_c`` and the
        selection branch over ``idx``, computed together."""
        raise NotImplementedError

    def add_gated(self, out, gate, o, tree: BallTree, q_unit: int) -> Tensor:
        r"""``out + gate * o`` with ``o`` at query granularity ``q_unit``, ``gate [N, H, 1]``."""
        from .reference import per_slot
        return out + gate * per_slot(o, tree.mask, q_unit)

    def finish(self, out, tree: BallTree, dtype: torch.dtype) -> Tensor:
        return out

    def per_slot(self, o, tree: BallTree, q_unit: int) -> Tensor:
        from .reference import per_slot
        return per_slot(o, tree.mask, q_unit)


def compressed_keys(branches: Branches, k: Tensor, v: Tensor, tree: BallTree, cfg, k_cmp: Optional[Tensor] = None,
                    v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None):
    r"""The compressed keys, values and mask ``compose`` uses: the given ones, mean pooling when
    none are given, the tree's block mask when only the mask is missing."""
    if k_cmp is None:
        return branches.pool(k, v, tree, cfg.cmp_block, cfg.cmp_stride)
    if cmp_mask is None:
        cmp_mask = branches.block_mask(tree, cfg.cmp_block, cfg.cmp_stride)
    return k_cmp, v_cmp, cmp_mask


def compose(branches: Branches, q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree: BallTree, cfg, *,
            sigma: Tensor, gates: Optional[Tensor] = None, k_cmp: Optional[Tensor] = None,
            v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None, return_branches: bool = False,
            gate_logits: Optional[Tensor] = None):
    r"""BSA through ``branches``: ``q, k, v [N_pad, H, D]`` in tree order, ``pos [N_pad, d]``,
    ``sigma [H]``, ``gates [N_pad, H, cfg.num_branches]`` (or their ``gate_logits``, squashed by a
    sigmoid: ``Branches.combine_logits``), optional compressed keys/values
    ``[N_pad // cmp_stride, H, D]`` and their mask. Returns ``[N_pad, H, D]`` (zero at padded
    slots), with ``return_branches`` also a dict of the branch outputs (per slot) and the selection.
    """
    with branches.context(q):
        w = cfg.cmp_window
        fuse = not return_branches and branches.fuses(q, tree, cfg)
        o_ball = None if fuse else branches.ball(q, k, v, pos, sigma, tree, cfg)
        k_cmp, v_cmp, cmp_mask = compressed_keys(branches, k, v, tree, cfg, k_cmp, v_cmp, cmp_mask)
        q_unit = cfg.group_size if cfg.group_compression else 1
        q_cmp = branches.group_queries(q, tree, q_unit)
        o_c, o_slc, selection = branches.global_branches(q, k, v, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg,
                                                         **(dict(selected=False) if fuse else {}))
        if fuse:
            out = branches.fused(q, k, v, pos, sigma, o_c, selection["idx"],
                                 gates[..., :3] if gate_logits is None else gate_logits[..., :3], tree, cfg, q_unit,
                                 logits=gate_logits is not None)
        elif gate_logits is None:
            out = branches.combine(o_ball, o_c, o_slc, gates[..., :3], tree, q_unit)
        else:
            out = branches.combine_logits(o_ball, o_c, o_slc, gate_logits[..., :3], tree, q_unit)
        o_crs = None
        if w is not None:  # the coarse global branch: one mean-pooled key per ball of the whole cloud
            m = cfg.ball_size
            k_crs, v_crs, crs_mask = branches.pool(k, v, tree, m, m)
            o_crs = branches.coarse(q_cmp, k_crs, v_crs, crs_mask, tree, m, q_unit)
            g_crs = gates[..., 3:4] if gate_logits is None else torch.sigmoid(gate_logits[..., 3:4])
            out = branches.add_gated(out, g_crs, o_crs, tree, q_unit)
        out = branches.finish(out, tree, q.dtype)
    if not return_branches:
        return out
    found = dict(ball=o_ball, cmp=branches.per_slot(o_c, tree, q_unit), slc=o_slc, **selection)
    if o_crs is not None:
        found["crs"] = branches.per_slot(o_crs, tree, q_unit)
    return out, found
