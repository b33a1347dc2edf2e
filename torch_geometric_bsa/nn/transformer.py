"""The BSA transformer of the paper: pre-norm blocks of (RMSNorm, attention) and (RMSNorm, SwiGLU).

The ball tree is built once per forward; every layer runs on tree-ordered, padded tensors, so there
is no per-layer permutation (except into the rotated tree on alternate layers when ``rotate=True``).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..balltree import BallTree, build_ball_tree, random_rotation
from .conv import BSAConv, FullAttentionConv, TreeLike, check_point_inputs, resolve_tree

__all__ = ["BSATransformer", "RMSNorm", "SwiGLU"]


class SwiGLU(nn.Module):
    r"""``W_2 (silu(W_1 x) * W_3 x)`` (Shazeer, 2020)."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.w13 = nn.Linear(channels, 2 * hidden, bias=False)
        self.w2 = nn.Linear(hidden, channels, bias=False)

    def reset_parameters(self):
        self.w13.reset_parameters()
        self.w2.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w13(x).chunk(2, dim=-1)
        return self.w2(F.silu(a) * b)


class RMSNorm(nn.RMSNorm):
    r"""``nn.RMSNorm`` whose weight follows the input's dtype: under bf16 autocast the input is bf16
    and an fp32 weight would keep ``F.rms_norm`` off its fused kernel (a dozen kernels instead of
    one). Statistics are still taken in fp32 by the fused kernel."""

    def forward(self, x: Tensor) -> Tensor:
        w = None if self.weight is None else self.weight.to(x.dtype)
        return F.rms_norm(x, self.normalized_shape, w, self.eps)


class _Block(nn.Module):
    def __init__(self, attn: nn.Module, channels: int, mlp_hidden: int):
        super().__init__()
        self.norm1, self.attn = RMSNorm(channels), attn
        self.norm2, self.mlp = RMSNorm(channels), SwiGLU(channels, mlp_hidden)

    def forward(self, h: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        # padded slots of h stay zero: RMSNorm and the bias-free SwiGLU map zero rows to zero
        h = h + self.attn.forward_tree(self.norm1(h), pos_t, tree)
        return h + self.mlp(self.norm2(h))


class BSATransformer(nn.Module):
    r"""Point-cloud transformer with Ball Sparse Attention (Brita et al., arXiv 2506.12541).

    ``embed -> L x [h + Attn(RMSNorm(h)), h + SwiGLU(RMSNorm(h))] -> RMSNorm -> head``, with the
    attention chosen by ``attention``: ``"bsa"`` (``BSAConv``), ``"ball"`` (ball branch only,
    Erwin-style) or ``"full"`` (SDPA over each cloud), so comparisons share one model.

    Args:
        in_channels (int): input feature size (0 for position-only input).
        out_channels (int): predicted channels per point.
        hidden_channels (int): width ``C``. num_layers (int): blocks ``L``. heads (int): heads.
        attention (str): ``"bsa"``, ``"ball"`` or ``"full"``.
        mlp_ratio (float): SwiGLU hidden size over ``C``.
        rotate (bool): alternate layers use a ball tree of randomly rotated positions (Erwin).
        dim (int): coordinate dimension. **bsa_kwargs: passed to ``BSAConv`` (ball_size,
            cmp_block, slc_block, topk, group_size, group_compression, compression, backend, ...).

    Shapes:
        - **input:** ``x`` $(|\mathcal{V}|, F_{in})$ (or a ``Data``
          holding ``x``, ``pos``, ``batch``), ``pos`` $(|\mathcal{V}|, d)$, ``batch``
          $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, F_{out})$ in input order
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, num_layers: int = 4,
                 heads: int = 4, attention: str = "bsa", mlp_ratio: float = 4.0, rotate: bool = False,
                 dim: int = 3, ball_size: int = 256, **bsa_kwargs):
        super().__init__()
        if attention not in ("bsa", "ball", "full"):
            raise ValueError(f"attention must be 'bsa', 'ball' or 'full', got {attention!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.num_layers, self.heads, self.attention, self.dim = num_layers, heads, attention, dim
        self.ball_size, self.rotate = ball_size, rotate
        self.embed = nn.Sequential(nn.Linear(in_channels + dim, hidden_channels), nn.GELU(),
                                   nn.Linear(hidden_channels, hidden_channels))

        def make_attn():
            if attention == "full":
                return FullAttentionConv(hidden_channels, heads=heads, ball_size=ball_size, dim=dim)
            return BSAConv(hidden_channels, heads=heads, ball_size=ball_size, dim=dim,
                           branches="all" if attention == "bsa" else "ball", **bsa_kwargs)

        self.blocks = nn.ModuleList(_Block(make_attn(), hidden_channels, int(mlp_ratio * hidden_channels))
                                    for _ in range(num_layers))
        self.norm = RMSNorm(hidden_channels)
        self.head = nn.Linear(hidden_channels, out_channels)
        if rotate:  # a fixed rotation, saved with the model so that a reload gives the same trees
            self.register_buffer("rotation", random_rotation(dim, torch.Generator().manual_seed(0)))

    def reset_parameters(self):
        for mod in self.modules():
            if mod is not self and hasattr(mod, "reset_parameters"):
                mod.reset_parameters()

    def forward(self, x, pos: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                tree: TreeLike = None) -> Tensor:
        if pos is None and hasattr(x, "pos"):  # a Data / Batch object
            data = x
            x, pos, batch = data.x, data.pos, getattr(data, "batch", None)
            if tree is None and getattr(data, "ball_tree", None) is not None:
                from ..transforms import get_ball_tree  # validates the cache against data.pos
                tree = get_ball_tree(data, self.ball_size)
        if x is None:
            x = pos.new_zeros(pos.size(0), 0)
        check_point_inputs(x, pos, batch, self.in_channels, self.dim, self.head.weight.dtype, self.head.weight.device)
        tree = resolve_tree(tree, pos, batch, self.ball_size)
        trees = [tree]
        if self.rotate and self.num_layers > 1:
            trees.append(build_ball_tree(pos, batch, self.ball_size, rotation=self.rotation))
        pos = pos.to(x.dtype)
        pos_ts = [t.to_tree(pos) for t in trees]
        h = trees[0].to_tree(self.embed(torch.cat([x, pos], dim=-1)))
        for i, block in enumerate(self.blocks):
            t = i % len(trees)
            if t != (i - 1) % len(trees) and i > 0:  # move between the plain and the rotated tree
                h = trees[t].to_tree(trees[1 - t].from_tree(h))
            h = block(h, pos_ts[t], trees[t])
        last = trees[(self.num_layers - 1) % len(trees)]
        return self.head(self.norm(last.from_tree(h)))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, heads={self.heads}, "
                f"attention='{self.attention}')")
