"""The BSA transformer of the paper: pre-norm blocks of (RMSNorm, attention) and (RMSNorm, SwiGLU).

The ball tree is built once per forward; every layer runs on tree-ordered, padded tensors, so there
is no per-layer permutation (except into the rotated tree on alternate layers when ``rotate=True``).
"""
from __future__ import annotations

import dataclasses
import inspect
from collections import deque
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from torch_geometric.nn import global_add_pool, global_max_pool, global_mean_pool
from torch_geometric.nn.dense.linear import Linear as LazyLinear

from .. import layer_graphs
from ..balltree import BallTree, build_ball_tree, layout_of, random_rotation
from ..reference import BSAConfig
from .conv import BSAConv, FullAttentionConv, TreeLike, check_point_inputs, resolve_tree, unpack_inputs

__all__ = ["BSATransformer", "RMSNorm", "SwiGLU"]

# keywords a BSATransformer passes on to each BSAConv (the rest it sets itself)
BSA_KWARGS = tuple(name for name in inspect.signature(BSAConv.__init__).parameters
                   if name not in ("self", "in_channels", "out_channels", "heads", "dim", "branches", "ball_size",
                                   "config", "cuda_graphs"))
_POOLS = {"mean": global_mean_pool, "max": global_max_pool, "add": global_add_pool}


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

        self._graphs = layer_graphs.LayerGraphs(max_graphs=4)

    @property
    def graph_reads_points(self) -> bool:
        return self.attn.graph_reads_points

    def graph_state(self) -> tuple:
        return self.attn.graph_state()

    def forward(self, h: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        # on CUDA the whole block (norms, attention, MLP) replays as CUDA graphs, as the attention
        # layer alone would (cuda_graphs of the attention layer decides)
        if self.attn.graphs_allowed() and layer_graphs.wanted(self.attn.cuda_graphs, h, tree):
            return self._graphs(self, self._forward, h, pos_t, tree)
        return self._forward(h, pos_t, tree)

    def _forward(self, h: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        # padded slots of h stay zero: RMSNorm and the bias-free SwiGLU map zero rows to zero
        h = h + self.attn.forward_tree(self.norm1(h), pos_t, tree)
        return h + self.mlp(self.norm2(h))


#: ``BSATransformer(bucket_slots="auto")``: the bucket, in balls, once ragged batches showed (few
#: recurring layouts for a few percent more slots: docs/perf-notes.md, "Eleventh session")
AUTO_BUCKET_BALLS = 8


def pad_to_bucket(x: Tensor, pos: Tensor, batch: Optional[Tensor], ball_size: int, bucket_slots: int):
    r"""Appends one dummy cloud to a batch so that its ball tree has a multiple of ``bucket_slots``
    slots: ``(x, pos, batch, num_clouds, max_slots)`` with the real clouds first, the dummy cloud's
    ``>= ball_size`` points (zero features, all at the origin) last, ``num_clouds`` the real count
    and ``max_slots`` the largest padded cloud rounded up to a multiple of ``bucket_slots``; and the
    point counts of all clouds, dummy included (so that the tree build need not read them again).
    Reads the cloud sizes from the device once."""
    m = ball_size
    sizes = torch.bincount(batch).tolist() if batch is not None else [pos.size(0)]
    b, slots, largest = layout_of(sizes, m)
    extra = -(-(slots + m) // bucket_slots) * bucket_slots - slots  # whole balls, >= m
    if batch is None:
        batch = torch.zeros(pos.size(0), dtype=torch.long, device=pos.device)
    x = torch.cat([x, x.new_zeros(extra, x.size(1))])
    pos = torch.cat([pos, pos.new_zeros(extra, pos.size(1))])
    batch = torch.cat([batch, batch.new_full((extra,), b)])
    max_slots = -(-max(largest, extra) // bucket_slots) * bucket_slots
    return x, pos, batch, b, max_slots, tuple(sizes) + (extra,)


class BSATransformer(nn.Module):
    r"""Point-cloud transformer with Ball Sparse Attention (Brita et al., arXiv 2506.12541).

    ``embed -> L x [h + Attn(RMSNorm(h)), h + SwiGLU(RMSNorm(h))] -> RMSNorm -> head``, with the
    attention chosen by ``attention``: ``"bsa"`` (``BSAConv``), ``"ball"`` (ball branch only,
    Erwin-style) or ``"full"`` (SDPA over each cloud), so comparisons share one model.

    Args:
        in_channels (int): input feature size (0 for position-only input, -1 to infer it on the
            first call; run one batch before building the optimizer, as for PyG's lazy modules).
        out_channels (int): predicted channels per point (per cloud with ``pool``).
        hidden_channels (int): width ``C``. num_layers (int): blocks ``L``. heads (int): heads.
        attention (str): ``"bsa"``, ``"ball"`` or ``"full"``.
        mlp_ratio (float): SwiGLU hidden size over ``C``.
        rotate (bool): alternate layers use a ball tree of randomly rotated positions (Erwin).
        dim (int): coordinate dimension.
        ball_size (int): points per ball (or ``config.ball_size``).
        pool (str, optional): ``"mean"``, ``"max"`` or ``"add"``: pool the final point features
            per cloud (``global_mean_pool`` etc.) before the head, for one output per graph
            (classification); ``None`` (default): one output per point.
        config (BSAConfig, optional): BSA hyper-parameters as one object.
        cuda_graphs (str or bool): on CUDA, each block's forward and backward replay as CUDA graphs
            captured per batch shape (``"auto"``: up to ``layer_graphs.MAX_SLOTS`` tree slots;
            ``True``; ``False``), as in ``BSAConv``; for every ``attention``.
        bucket_slots (int, str or None): for ragged batches on CUDA: pad every batch with one
            dummy cloud (zero features, coincident points, its outputs dropped) so that its tree has
            a multiple of ``bucket_slots`` slots and a largest cloud rounded up to one, so that
            batches of similar size replay the same block graphs (each block keeps 4 shapes).
            A multiple of ``ball_size``; costs up to ``bucket_slots + ball_size`` extra slots of
            work. Clouds never attend to each other, so the real points' outputs are unchanged.
            ``"auto"`` (default): no padding until ragged batches show (more distinct layouts in
            the last calls than a block keeps graphs, or a block's graphs pause), then buckets of
            ``AUTO_BUCKET_BALLS`` (8) balls from the next call on, and the blocks capture again.
            ``None``: never pad. Not applied when a tree is passed in, nor off CUDA.
        **bsa_kwargs: passed to ``BSAConv`` (cmp_block, cmp_stride, slc_block, topk, group_size,
            group_compression, cmp_window, selection, compression, backend, bias); an unknown key raises a
            TypeError that lists the valid ones.

    Shapes:
        - **input:** ``x`` $(|\mathcal{V}|, F_{in})$ (or a ``Data``/``Batch``
          holding ``x``, ``pos``, ``batch`` and optionally a cached tree), ``pos``
          $(|\mathcal{V}|, d)$, ``batch`` $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, F_{out})$ in input order, or $(B, F_{out})$ with ``pool``
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, num_layers: int = 4,
                 heads: int = 4, attention: str = "bsa", mlp_ratio: float = 4.0, rotate: bool = False,
                 dim: int = 3, ball_size: int = 256, pool: Optional[str] = None,
                 config: Optional[BSAConfig] = None, cuda_graphs: Union[str, bool] = "auto",
                 bucket_slots: Union[int, str, None] = "auto", **bsa_kwargs):
        super().__init__()
        unknown = sorted(set(bsa_kwargs) - set(BSA_KWARGS))
        if unknown:
            raise TypeError(f"BSATransformer got unknown keyword argument(s) {unknown}; valid BSA keywords: "
                            f"{list(BSA_KWARGS)} (and config=BSAConfig(...))")
        if attention not in ("bsa", "ball", "full"):
            raise ValueError(f"attention must be 'bsa', 'ball' or 'full', got {attention!r}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if pool is not None and pool not in _POOLS:
            raise ValueError(f"pool must be None or one of {sorted(_POOLS)}, got {pool!r}")
        if not isinstance(in_channels, int) or in_channels < -1:
            raise ValueError(f"in_channels must be a non-negative int or -1 (lazy), got {in_channels!r}")
        if config is not None:
            if not isinstance(config, BSAConfig):
                raise ValueError(f"config must be a BSAConfig, got {type(config).__name__}")
            if ball_size not in (256, config.ball_size):
                raise ValueError(f"ball_size={ball_size} conflicts with config.ball_size={config.ball_size}")
            ball_size = config.ball_size
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.num_layers, self.heads, self.attention, self.dim = num_layers, heads, attention, dim
        self.ball_size, self.rotate, self.pool = ball_size, rotate, pool
        if bucket_slots is not None and bucket_slots != "auto" and (
                isinstance(bucket_slots, bool) or not isinstance(bucket_slots, int) or bucket_slots < 1
                or bucket_slots % ball_size):
            raise ValueError(f"bucket_slots must be 'auto', None or a positive multiple of ball_size={ball_size}, "
                             f"got {bucket_slots!r}")
        self.bucket_slots = bucket_slots
        self._auto_bucket: Optional[int] = None  # "auto": the bucket in force once ragged batches showed
        self._layouts: "deque[tuple]" = deque(maxlen=layer_graphs.PAUSE_WINDOW)  # "auto": recent layouts
        first = (LazyLinear(-1, hidden_channels) if in_channels == -1
                 else nn.Linear(in_channels + dim, hidden_channels))
        self.embed = nn.Sequential(first, nn.GELU(), nn.Linear(hidden_channels, hidden_channels))

        def make_attn():
            if attention == "full":
                return FullAttentionConv(hidden_channels, heads=heads, ball_size=ball_size, dim=dim,
                                         cuda_graphs=cuda_graphs)
            return BSAConv(hidden_channels, heads=heads, ball_size=ball_size, dim=dim,
                           branches="all" if attention == "bsa" else "ball", config=config,
                           cuda_graphs=cuda_graphs, **bsa_kwargs)

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
        x, pos, batch, tree = unpack_inputs(x, pos, batch, tree, self.ball_size, self.__class__.__name__)
        if x is None:
            x = pos.new_zeros(pos.size(0), 0)
        expected = self.in_channels if self.in_channels != -1 else (
            self.embed[0].in_channels - self.dim if self.embed[0].in_channels > 0 else None)
        check_point_inputs(x, pos, batch, expected, self.dim, self.head.weight.dtype, self.head.weight.device)
        n_real, num_clouds = pos.size(0), None
        bucket_slots = self._bucket()
        bucket = bucket_slots is not None and tree is None and (pos.is_cuda or layer_graphs._EMULATE)
        sizes = None
        if bucket:
            x, pos, batch, num_clouds, max_slots, sizes = pad_to_bucket(x, pos, batch, self.ball_size, bucket_slots)

        def build(rotation=None):
            if sizes is not None and layer_graphs.tree_graphs_wanted(pos):  # sizes known: not read again
                return layer_graphs.build_tree_graphed(pos, batch, self.ball_size, rotation, sizes)
            return build_ball_tree(pos, batch, self.ball_size, rotation=rotation)

        trees = [build() if bucket else resolve_tree(tree, pos, batch, self.ball_size)]
        if not bucket and tree is None and self.bucket_slots == "auto" and self._auto_bucket is None:
            self._note_layout(pos, trees[0])
        if self.rotate and self.num_layers > 1:
            trees.append(build(self.rotation))
        if bucket:  # the largest cloud as the bucket's bound: the kernels take it as an upper bound
            trees = [dataclasses.replace(t, max_slots=max_slots) for t in trees]
        pos = pos.to(x.dtype)
        pos_ts = [t.to_tree(pos) for t in trees]
        h = trees[0].to_tree(self.embed(torch.cat([x, pos], dim=-1)))
        for i, block in enumerate(self.blocks):
            t = i % len(trees)
            if t != (i - 1) % len(trees) and i > 0:  # move between the plain and the rotated tree
                h = trees[t].to_tree(trees[1 - t].from_tree(h))
            h = block(h, pos_ts[t], trees[t])
        last = trees[(self.num_layers - 1) % len(trees)]
        h = self.norm(last.from_tree(h))
        if bucket:  # the dummy cloud's points come last
            h, batch = h[:n_real], batch[:n_real]
        if self.pool is not None:  # one row per cloud: [B, C]
            h = _POOLS[self.pool](h, batch, size=num_clouds if bucket else last.num_clouds)
        return self.head(h)

    def _bucket(self) -> Optional[int]:
        r"""The bucket of slots in force: ``bucket_slots``, or with ``"auto"`` none until ragged
        batches show (more distinct layouts in the last calls than a block keeps graphs, or a
        block's graphs paused), then ``AUTO_BUCKET_BALLS`` balls (and the blocks' graphs are
        cleared, so that they capture the bucketed layouts)."""
        if self.bucket_slots != "auto":
            return self.bucket_slots
        if self._auto_bucket is None and any(b._graphs.paused for b in self.blocks):
            self._switch_to_buckets()
        return self._auto_bucket

    def _note_layout(self, pos: Tensor, tree: BallTree) -> None:
        r"""``"auto"``: once the last calls brought more distinct layouts than a block keeps graphs,
        they cannot all replay, so switch to buckets before the blocks capture and pause (a layout is
        the blocks' key: slots, clouds, the largest cloud, and points for full attention)."""
        block = self.blocks[0]
        if not (block.attn.graphs_allowed() and layer_graphs.wanted(block.attn.cuda_graphs, pos, tree)):
            return
        self._layouts.append((tree.num_slots, tree.num_clouds, tree.max_slots,
                              tree.num_points if self.attention == "full" else None))
        if len(set(self._layouts)) > block._graphs.max_graphs:
            self._switch_to_buckets()

    def _switch_to_buckets(self) -> None:
        # from the next call on: buckets of AUTO_BUCKET_BALLS balls, and the blocks capture afresh
        self._auto_bucket = AUTO_BUCKET_BALLS * self.ball_size
        for b in self.blocks:
            b._graphs.clear()

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, heads={self.heads}, "
                f"attention='{self.attention}'" + (f", pool='{self.pool}'" if self.pool else "") + ")")
