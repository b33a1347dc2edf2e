"""PyG transforms: cache a ball tree on `Data` when positions are static; local-geometry input features."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch_geometric.data import Data
from torch_geometric.transforms import BaseTransform

from ._validate import check_positive_int
from .balltree import BallTree, build_ball_tree

__all__ = ["CacheBallTree", "LocalGeometry", "get_ball_tree", "local_geometry", "pos_fingerprint"]


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
        check_positive_int("ball_size", ball_size)
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


def local_geometry(pos: Tensor, k: int = 16, chunk: int = 4096) -> Tensor:
    r"""Per-point features of the neighbourhood of one cloud: ``[N, d + 1]``.

    Column 0 is the mean distance to the ``k`` nearest other points (the local spacing; a refined
    mesh around a hole shows as small spacing). Columns ``1..d`` are the offset from the point to the
    centroid of those neighbours, divided by that mean distance: about 0 inside the material, and of
    length up to about 1, pointing into the material, on a boundary or beside a hole, where the
    neighbourhood is one-sided.

    Args:
        pos (Tensor): ``[N, d]`` positions of one cloud (``N >= 2``).
        k (int): neighbours (fewer when the cloud has fewer other points).
        chunk (int): query rows per distance block (memory ``chunk x N``).
    """
    if pos.dim() != 2 or pos.size(0) < 2:
        raise ValueError(f"local_geometry needs positions [N >= 2, d], got {list(pos.shape)}")
    check_positive_int("k", k)
    k = min(k, pos.size(0) - 1)
    p = pos.to(torch.promote_types(pos.dtype, torch.float32))  # 16-bit positions computed in fp32
    feats = []
    for start in range(0, p.size(0), chunk):
        rows = p[start:start + chunk]
        # exact differences (the matmul form loses the spacing to cancellation far from the origin)
        dist = torch.cdist(rows, p, compute_mode="donot_use_mm_for_euclid_dist")
        own = torch.arange(rows.size(0), device=p.device)
        dist[own, own + start] = float("inf")  # a point is not its own neighbour
        d, idx = dist.topk(k, dim=1, largest=False)
        spacing = d.mean(1, keepdim=True)
        offset = (p[idx].mean(1) - rows) / spacing.clamp_min(torch.finfo(p.dtype).tiny)
        feats.append(torch.cat([spacing, offset], 1))
    return torch.cat(feats).to(pos.dtype)


class LocalGeometry(BaseTransform):
    r"""Appends :func:`local_geometry` features (``d + 1`` columns) to ``data.x``, or makes them
    ``data.x`` when it is missing.

    Attention over points sees where points are, but not directly where they are missing; a kNN
    message-passing model reads that from its edges. These features hand it to any model. Run it
    once, as a ``pre_transform`` or over a list of samples: it costs an ``N x N`` distance scan per
    cloud, in blocks.

    Args:
        k (int): neighbours per point.
    """

    def __init__(self, k: int = 16):
        check_positive_int("k", k)
        self.k = k

    def forward(self, data: Data) -> Data:
        if getattr(data, "pos", None) is None:
            raise ValueError("LocalGeometry needs data.pos")
        if getattr(data, "batch", None) is not None and data.batch.numel() and int(data.batch.max()) > 0:
            raise ValueError("LocalGeometry takes one cloud (a Data), not a Batch of several")
        f = local_geometry(data.pos, self.k)
        x = getattr(data, "x", None)
        data.x = f if x is None else torch.cat([x, f.to(x.dtype)], 1)
        return data

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}(k={self.k})"
