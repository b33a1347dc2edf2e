"""PyG transforms: cache a ball tree on `Data` when positions are static."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from .balltree import BallTree, build_ball_tree

__all__ = ["CacheBallTree", "get_ball_tree", "pos_fingerprint"]


def pos_fingerprint(pos: Tensor, batch: Optional[Tensor] = None) -> Tensor:
    r"""A cheap per-cloud fingerprint of positions, ``[B, d]`` float64, that changes when any
    coordinate or the point order changes (a position-weighted sum; not a cryptographic hash)."""
    if batch is None:
        batch = torch.zeros(pos.size(0), dtype=torch.long, device=pos.device)
    num = int(batch.max()) + 1 if batch.numel() else 0
    start = torch.zeros(num + 1, dtype=torch.long, device=pos.device)
    start[1:] = torch.bincount(batch, minlength=num).cumsum(0)
    local = torch.arange(pos.size(0), device=pos.device) - start[batch]
    w = (1.0 + 0.618033988749 * local.double()).unsqueeze(1)
    return torch.zeros(num, pos.size(1), dtype=torch.float64, device=pos.device).index_add_(
        0, batch, pos.double() * w)


class CacheBallTree(BaseTransform):
    r"""Builds the ball tree of ``data.pos`` once and stores it as ``data.ball_tree`` (with a
    fingerprint of the positions in ``data.ball_tree_key``), so models skip the build each step.

    Use with static positions (e.g. as ``pre_transform`` or ``transform`` of a dataset). Models
    read the cache through ``get_ball_tree``, which rebuilds when positions have changed.
    A collated ``Batch`` holds a list of trees; models concatenate them.

    Args:
        ball_size (int): points per ball; must equal the model's ``ball_size``.
    """

    def __init__(self, ball_size: int = 256):
        if not isinstance(ball_size, int) or ball_size < 1:
            raise ValueError(f"ball_size must be a positive int, got {ball_size!r}")
        self.ball_size = ball_size

    def forward(self, data: Data) -> Data:
        if getattr(data, "pos", None) is None:
            raise ValueError("CacheBallTree needs data.pos")
        data.ball_tree = build_ball_tree(data.pos, None, self.ball_size)
        data.ball_tree_key = pos_fingerprint(data.pos)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(ball_size={self.ball_size})"


def get_ball_tree(data: Data, ball_size: int) -> BallTree:
    r"""The cached tree of ``data`` (a ``Data`` or ``Batch``) if it is still valid, else a new one."""
    batch = getattr(data, "batch", None)
    cached, key = getattr(data, "ball_tree", None), getattr(data, "ball_tree_key", None)
    if cached is not None and key is not None:
        trees = [cached] if isinstance(cached, BallTree) else list(cached)
        fresh = pos_fingerprint(data.pos, batch)
        if (all(t.ball_size == ball_size for t in trees) and key.shape == fresh.shape
                and bool(torch.allclose(key.to(fresh.device), fresh, rtol=1e-12, atol=0.0))):
            return trees[0] if len(trees) == 1 else BallTree.cat(trees)
    return build_ball_tree(data.pos, batch, ball_size)
