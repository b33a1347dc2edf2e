"""PyG layers: `BSAConv` (Ball Sparse Attention) and `FullAttentionConv` (the dense peer).

Both work on a whole batch in ball-tree order: `forward` takes input-order tensors and builds (or
takes) the tree; `forward_tree` is the tree-order core the transformer chains without permuting.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Optional, Sequence, Tuple, Union
from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.dense.linear import Linear as LazyLinear
from torch_geometric.nn.inits import reset

from .._validate import check_tree_matches, coordinate_limit, value_checks_enabled
from ..balltree import BallTree, build_ball_tree
from .. import layer_graphs
from ..functional import ball_attention, bsa_attention, check_backend_name
from ..reference import BSAConfig, blockify, full_attention

__all__ = ["BSAConv", "FullAttentionConv", "KVCompressor", "check_point_inputs", "resolve_tree", "unpack_inputs",
           "config_from_kwargs", "value_checks_enabled"]

#: the gated branches of BSAConv, in the order of the gate's columns (``"crs"``: with ``cmp_window``)
BRANCH_NAMES = ("ball", "cmp", "slc", "crs")

TreeLike = Union[BallTree, Sequence[BallTree], None]


def check_point_inputs(x: Tensor, pos: Tensor, batch: Optional[Tensor], in_channels: Optional[int] = None,
                       dim: Optional[int] = None, weight_dtype: Optional[torch.dtype] = None,
                       weight_device: Optional[torch.device] = None) -> None:
    r"""Raises a ValueError naming the argument for malformed ``x``, ``pos`` or ``batch`` (and for an
    ``x`` whose dtype differs from the layer's ``weight_dtype`` outside autocast, or that is not on
    the layer's ``weight_device``)."""
    if not isinstance(x, Tensor) or x.dim() != 2:
        raise ValueError(f"x must be a 2-D tensor [N, C], got "
                         f"{list(x.shape) if isinstance(x, Tensor) else type(x).__name__}")
    if not isinstance(pos, Tensor) or pos.dim() != 2:
        raise ValueError(f"pos must be a 2-D tensor [N, d], got "
                         f"{list(pos.shape) if isinstance(pos, Tensor) else type(pos).__name__}")
    if x.size(0) == 0:
        raise ValueError("x is empty: BSA needs at least one point")
    if x.size(0) != pos.size(0):
        raise ValueError(f"x has {x.size(0)} points but pos has {pos.size(0)}")
    if batch is not None and (batch.dim() != 1 or batch.numel() != x.size(0)):
        raise ValueError(f"batch must have shape [{x.size(0)}] (one cloud index per point), got {list(batch.shape)}")
    if in_channels is not None and x.size(1) != in_channels:
        raise ValueError(f"x has {x.size(1)} channels but the layer expects in_channels={in_channels}")
    if dim is not None and pos.size(1) != dim:
        raise ValueError(f"pos has {pos.size(1)} coordinates but the layer was built for dim={dim}")
    if not x.is_floating_point():
        raise ValueError(f"x must be a floating-point tensor, got {x.dtype}")
    if not pos.is_floating_point():
        raise ValueError(f"pos must be a floating-point tensor, got {pos.dtype}")
    if value_checks_enabled():
        # one host sync at the model boundary (never inside a layer); skipped under CUDA-graph
        # capture and torch.compile, where a sync is an error or a graph break. Positions are
        # cast to x's dtype, and squared distances must stay finite in it (fp32: |p| < 5e18)
        limit = coordinate_limit(x.dtype, pos.size(1))
        ok = torch.stack([torch.isfinite(x).all(), (pos.abs() <= limit).all()]).tolist()  # NaN compares false
        if not ok[0]:
            raise ValueError("x contains NaN or Inf values")
        if not ok[1]:
            raise ValueError(f"pos contains NaN or Inf values, or coordinates beyond +-{limit:.3g} whose squared "
                             f"distances overflow x's dtype {x.dtype}; normalise the positions "
                             "(e.g. torch_geometric.transforms.NormalizeScale)")
    if (weight_dtype is not None and x.dtype != weight_dtype
            and not torch.is_autocast_enabled(x.device.type)):
        raise ValueError(f"x has dtype {x.dtype} but the layer's parameters are {weight_dtype}: cast x or the "
                         "module (e.g. model.to(x.dtype)), or run under torch.autocast")
    if x.device != pos.device or (batch is not None and batch.device != x.device):
        raise ValueError("x, pos and batch must be on the same device")
    if weight_device is not None and x.device != weight_device:
        raise ValueError(f"x is on {x.device} but the layer's parameters are on {weight_device}: move the "
                         f"inputs or the module (e.g. model.to(x.device))")


def resolve_tree(tree: TreeLike, pos: Tensor, batch: Optional[Tensor], ball_size: int) -> BallTree:
    r"""Uses a given tree (or concatenates per-cloud cached trees) or builds one. A given tree is
    checked against ``pos`` and ``batch`` (``_validate.check_tree_matches``: no host sync on CUDA)."""
    if tree is None:
        return build_ball_tree(pos, batch, ball_size)
    if not isinstance(tree, BallTree):
        tree = BallTree.cat(list(tree))
    if tree.ball_size != ball_size:
        raise ValueError(f"tree has ball_size={tree.ball_size} but the layer uses ball_size={ball_size}")
    check_tree_matches(tree, pos, batch)
    return tree


def relative_positions(pos_t: Tensor, tree: BallTree, dtype: Optional[torch.dtype] = None) -> Tensor:
    r"""``pos_t - c_B(i)`` (the slot's ball centroid), zero at padded slots, ``[N_pad, d]``, in
    ``dtype`` (default ``pos_t``'s).

    Memoised on the tree for this ``pos_t`` (per dtype): every layer of a model reads the same tensor.
    """
    dtype = pos_t.dtype if dtype is None else dtype

    def compute():
        if dtype != pos_t.dtype:  # a cast of the tensor in pos_t's own dtype
            return pos_t, relative_positions(pos_t, tree).to(dtype)
        centers = tree.ball_centers(pos_t).repeat_interleave(tree.ball_size, 0)
        return pos_t, (pos_t - centers) * tree.float_mask(pos_t.dtype)
    return tree.cached(("relative_positions", dtype), compute, lambda hit: hit[0] is pos_t)[1]


def _input_dtype(x: Tensor) -> torch.dtype:
    # the dtype a linear layer computes in: autocast's when it is on for x's device (autocast
    # leaves float64 as it is)
    if x.is_floating_point() and x.dtype != torch.float64 and torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return x.dtype


def unpack_inputs(x: Any, pos: Optional[Tensor], batch: Optional[Tensor], tree: TreeLike, ball_size: int,
                  who: str) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor], TreeLike]:
    r"""``(x, pos, batch, tree)`` from either tensors or a PyG ``Data``/``Batch`` passed as ``x``.

    A ``Data`` gives ``data.x`` (may be ``None``), ``data.pos``, ``data.batch`` and, when a
    ``CacheBallTree`` transform put one there and the positions are unchanged, its cached tree."""
    if isinstance(x, Tensor) or x is None:
        if pos is None:
            raise ValueError(f"{who} needs pos: call it as {who}(x, pos, batch) or {who}(data) with a "
                             "Data/Batch that holds pos")
        return x, pos, batch, tree
    if not (hasattr(x, "pos") and hasattr(x, "keys")):
        raise ValueError(f"x must be a Tensor [N, C] or a torch_geometric Data/Batch, got {type(x).__name__}")
    data = x
    if pos is not None or batch is not None:
        raise ValueError(f"{who}(data) takes pos and batch from the Data/Batch; do not pass them as well")
    if getattr(data, "pos", None) is None:
        raise ValueError(f"data.pos is None: {who} needs point positions")
    x, pos, batch = data.x, data.pos, getattr(data, "batch", None)
    if tree is None and getattr(data, "ball_tree", None) is not None:
        from ..transforms import get_ball_tree  # validates the cache against data.pos
        tree = get_ball_tree(data, ball_size)
    return x, pos, batch, tree


def config_from_kwargs(config: Optional[BSAConfig], **fields) -> BSAConfig:
    r"""The layer's ``BSAConfig``: ``config`` when given (a keyword that differs from both its
    default and ``config`` is an error: one source of truth), else one built from the keywords."""
    if config is None:
        return BSAConfig(**fields)
    if not isinstance(config, BSAConfig):
        raise ValueError(f"config must be a BSAConfig, got {type(config).__name__}")
    defaults = BSAConfig.__dataclass_fields__
    for name, value in fields.items():
        default = defaults[name].default
        if value != default and value != getattr(config, name):
            raise ValueError(f"{name}={value!r} conflicts with config.{name}={getattr(config, name)!r}: "
                             f"set it in the BSAConfig only")
    return config


_MIN_CHUNK_ROWS, _MAX_SPLITS = 256, 64


def _weight_grad(dy: Tensor, x: Tensor) -> Tensor:
    r"""``dy.mT @ x`` per batch (``dy [B, M, N]``, ``x [B, M, K]`` -> ``[B, N, K]``), split along
    ``M`` when ``M`` is long. The compression MLP's weight gradient has a tiny output (``N x K``,
    e.g. 8 x 64) and a reduction over every block of every head (``M`` ~ 30k): one batched GEMM
    runs that on ``B`` thread blocks of the GPU. Cut into ``S`` chunks of at least
    ``_MIN_CHUNK_ROWS`` rows (``S`` a power of two dividing ``M``, at most ``_MAX_SPLITS``), the
    partial products run on ``B * S`` blocks and one sum adds them, in a fixed order."""
    b, m, n = dy.shape
    s = 1
    while s < _MAX_SPLITS and m % (2 * s) == 0 and m // (2 * s) >= _MIN_CHUNK_ROWS:
        s *= 2
    if s == 1:
        return torch.bmm(dy.mT, x)
    part = torch.bmm(dy.reshape(b * s, m // s, n).mT, x.reshape(b * s, m // s, x.size(2)))
    return part.view(b, s, n, -1).sum(1)


#: ``BSAConv``'s default ``gate_bias``: the selection branch's gate logits start at -4
DEFAULT_GATE_BIAS = {"slc": -4.0}


class _BatchedLinear(torch.autograd.Function):
    r"""``x @ w.mT + b`` per batch: ``x [B, M, K]``, ``w [B, N, K]``, ``b [B, 1, N]`` -> ``[B, M, N]``.
    As ``torch.baddbmm(b, x, w.mT)``, but the weight's gradient comes out in the weight's own
    layout (``dy.mT @ x``, as ``F.linear``'s does), so no copy turns it around afterwards, and
    is split along ``M`` (``_weight_grad``)."""

    @staticmethod
    def forward(ctx, x, w, b):
        ctx.save_for_backward(x, w)
        return torch.baddbmm(b, x, w.mT)

    @staticmethod
    def backward(ctx, dy):
        x, w = ctx.saved_tensors
        dx = torch.bmm(dy, w) if ctx.needs_input_grad[0] else None
        dw = _weight_grad(dy, x) if ctx.needs_input_grad[1] else None
        db = dy.sum(1, keepdim=True) if ctx.needs_input_grad[2] else None
        return dx, dw, db


class KVCompressor(nn.Module):
    r"""Pools keys and values of each compression block into one (DESIGN §1.2b).

    ``mode="mlp"``: $\tilde k_b = \phi_k([k_j + E_{pos}(j - bs)]_j)$ with a two-layer MLP
    over the flattened block (``l * D -> D -> D``), shared by all heads; padded slots enter as
    zeros. ``mode="mean"``: the mean over the block's valid slots.
    """

    def __init__(self, head_dim: int, cmp_block: int, cmp_stride: int, mode: str = "mlp"):
        super().__init__()
        if mode not in ("mlp", "mean"):
            raise ValueError(f"compression must be 'mlp' or 'mean', got {mode!r}")
        self.head_dim, self.cmp_block, self.cmp_stride, self.mode = head_dim, cmp_block, cmp_stride, mode
        if mode == "mlp":
            self.pos_emb = nn.Parameter(torch.empty(cmp_block, head_dim))
            self.phi_k = nn.Sequential(nn.Linear(cmp_block * head_dim, head_dim), nn.GELU(),
                                       nn.Linear(head_dim, head_dim))
            self.phi_v = nn.Sequential(nn.Linear(cmp_block * head_dim, head_dim), nn.GELU(),
                                       nn.Linear(head_dim, head_dim))
        self.reset_parameters()

    def reset_parameters(self):
        if self.mode == "mlp":
            nn.init.normal_(self.pos_emb, std=0.02)
            for seq in (self.phi_k, self.phi_v):
                for layer in seq:
                    if isinstance(layer, nn.Linear):
                        layer.reset_parameters()

    def forward(self, k: Tensor, v: Tensor, tree: BallTree):
        r"""``k, v [N_pad, H, D]`` -> ``k_cmp, v_cmp [N_pad // s, H, D]``, block mask ``[N_pad // s]``."""
        l, s = self.cmp_block, self.cmp_stride
        if l == s:
            return self.compress_kv(torch.stack([k, v], 1), tree)
        kb, valid = blockify(k, tree.mask, tree.slot_batch, l, s)
        vb, _ = blockify(v, tree.mask, tree.slot_batch, l, s)
        block_mask = tree.cached(("block_any", l, s), lambda: valid.any(1))
        w = valid.to(k.dtype)[..., None, None]  # [NB, l, 1, 1]
        if self.mode == "mean":
            cnt = w.sum(1).clamp_min(1.0)
            return (kb * w).sum(1) / cnt, (vb * w).sum(1) / cnt, block_mask
        nb, l, h, d = kb.shape
        pe = self.pos_emb.to(k.dtype)[None, :, None, :]
        flat = lambda t: ((t + pe) * w).permute(0, 2, 1, 3).reshape(nb, h, l * d)  # noqa: E731
        return self.phi_k(flat(kb)), self.phi_v(flat(vb)), block_mask

    def _stack_parts(self):
        r"""The nine tensors ``_stacked`` concatenates, in its order (k's before v's per pair)."""
        (k1, _, k2), (v1, _, v2) = self.phi_k, self.phi_v
        return [self.pos_emb, k1.weight, v1.weight, k1.bias, v1.bias, k2.weight, v2.weight, k2.bias, v2.bias]

    def _stack_sizes(self):
        r"""The sizes of ``pe, w1, b1, w2, b2`` in the concatenation of ``_stack_parts``."""
        n = [p.numel() for p in self._stack_parts()]
        return [n[0], n[1] * 2, n[3] * 2, n[5] * 2, n[7] * 2]

    def _view_stacked(self, pe: Tensor, w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor):
        r"""The five flat pieces (``_stack_sizes``) as ``_stacked`` returns them (views)."""
        d = self.head_dim
        return pe.view(self.cmp_block, d), w1.view(2, d, -1), b1.view(2, 1, d), w2.view(2, d, d), b2.view(2, 1, d)

    def _stacked(self, dtype: torch.dtype):
        r"""The position embedding ``[l, D]`` and both MLPs' parameters stacked per layer (k first):
        ``w1 [2, D, l * D]``, ``b1 [2, 1, D]``, ``w2 [2, D, D]``, ``b2 [2, 1, D]``, in ``dtype``. One
        concatenation and one cast for all nine tensors (their gradients come back through one
        concatenation and one cast), instead of a cast per tensor and a stack per pair."""
        flat = torch.cat([p.reshape(-1) for p in self._stack_parts()]).to(dtype)
        return self._view_stacked(*flat.split(self._stack_sizes()))

    def compress_kv(self, kv: Tensor, tree: BallTree, stacked: Optional[Tuple[Tensor, ...]] = None):
        r"""``forward`` on keys and values given as one tensor ``kv [N_pad, 2, H, D]`` (e.g. a view of
        the layer's qkv projection): both MLPs run as one batched pass (stacked weights), in as
        few launches as the layer allows. Returns ``k_cmp, v_cmp [N_pad // s, H, D]`` and the block
        mask ``[N_pad // s]``. ``stacked``: the parameters as ``_stacked`` gives them, already cast
        (``BSAConv`` casts them with its own projection's); used when in ``kv``'s dtype."""
        l, s = self.cmp_block, self.cmp_stride
        if l != s:
            k, v = kv.unbind(1)
            return self.forward(k, v, tree)
        n, _, h, d = kv.shape
        nb = n // l
        # blocks tile the slots and never straddle clouds (cloud sizes are multiples of l)
        valid = tree.cached(("block_valid", l), lambda: tree.mask.view(-1, l))
        block_mask = tree.cached(("block_any", l, s), lambda: valid.any(1))
        kvb = kv.view(nb, l, 2, h, d).permute(2, 0, 3, 1, 4)  # [2, NB, H, l, D], a view
        dt = kv.dtype  # the memo's closures hold the dtype, not the activation (layer_graphs shares them)
        if self.mode == "mean":
            w = tree.cached(("block_weight", l, s, dt), lambda: valid.to(dt)[..., None, None])
            cnt = w.sum(1).clamp_min(1.0)  # [NB, 1, 1]
            out = (kvb * w.view(1, nb, 1, l, 1)).sum(3) / cnt.view(1, nb, 1, 1)
            return out[0], out[1], block_mask
        # the slot mask, materialised in the layout the MLP reads ([2, NB, H, l, 1], once per tree):
        # multiplied with it first, the masked input comes out contiguous as [2, NB * H, l * D]
        # (elementwise outputs follow their first operand's layout), so the flattening is a view
        w = tree.cached(("block_weight_kv", l, h, dt),
                        lambda: valid.view(1, nb, 1, l, 1).expand(2, nb, h, l, 1).to(
                            dt, memory_format=torch.contiguous_format))
        if layer_graphs._has_hooks(self):  # a hook on an MLP must see its call: the modules as written
            x = torch.mul(w, kvb + self.pos_emb.to(dt)).view(2, nb * h, l * d)
            return self.phi_k(x[0]).view(nb, h, d), self.phi_v(x[1]).view(nb, h, d), block_mask
        if stacked is None or stacked[0].dtype != dt:
            stacked = self._stacked(dt)
        pe, w1, b1, w2, b2 = stacked
        x = torch.mul(w, kvb + pe).view(2, nb * h, l * d)
        x = _BatchedLinear.apply(x, w1, b1)
        x = _BatchedLinear.apply(self.phi_k[1](x), w2, b2)
        k_cmp, v_cmp = x.view(2, nb, h, d).unbind(0)
        return k_cmp, v_cmp, block_mask


class _TreeAttentionConv(nn.Module):
    r"""Shared plumbing: input checks, tree handling, relative positions, q/k/v and output maps."""

    #: whether the tree-order forward reads the input-order side of the tree (``inv``, the point
    #: count); ``False`` keys its CUDA graphs by slots only (``layer_graphs.LayerGraphs``)
    graph_reads_points = True

    def __init__(self, in_channels: int, out_channels: Optional[int], heads: int, ball_size: int, dim: int,
                 bias: bool = True, cuda_graphs: Union[str, bool] = "auto"):
        super().__init__()
        layer_graphs.check_mode(cuda_graphs)
        self.cuda_graphs = cuda_graphs
        self._graphs = layer_graphs.LayerGraphs()
        if isinstance(heads, bool) or not isinstance(heads, numbers.Integral) or heads < 1:
            raise ValueError(f"heads must be a positive int, got {heads!r}")
        if not isinstance(in_channels, int) or (in_channels < 1 and in_channels != -1):
            raise ValueError(f"in_channels must be a positive int or -1 (lazy), got {in_channels!r}")
        if in_channels == -1 and out_channels is None:
            raise ValueError("in_channels=-1 (lazy) needs out_channels: it is the attention width")
        if dim not in (2, 3):
            raise ValueError(f"dim must be 2 or 3, got {dim}")
        self.in_channels = in_channels
        self.out_channels = in_channels if out_channels is None else out_channels
        # attention width: in_channels, or out_channels when in_channels is inferred on the first call
        # (like PointTransformerConv(-1, 64)); then a lazy linear map takes x to that width first
        width = in_channels if in_channels != -1 else self.out_channels
        if width % heads:
            raise ValueError(f"heads={heads} must divide in_channels={in_channels}" if in_channels != -1 else
                             f"heads={heads} must divide out_channels={width} (the attention width when "
                             "in_channels=-1)")
        self.channels = width
        self.heads, self.head_dim, self.ball_size, self.dim = heads, width // heads, ball_size, dim
        self.lin_in = LazyLinear(-1, width, bias=False) if in_channels == -1 else None
        self.pos_proj = nn.Linear(dim, width, bias=False)
        self.qkv = nn.Linear(width, 3 * width, bias=bias)
        self.out = nn.Linear(width, self.out_channels, bias=bias)

    def reset_parameters(self):
        for mod in (self.lin_in, self.pos_proj, self.qkv, self.out):
            if mod is not None:
                mod.reset_parameters()

    def _expected_in_channels(self) -> Optional[int]:
        if self.lin_in is None:
            return self.in_channels
        return self.lin_in.in_channels if self.lin_in.in_channels > 0 else None  # known after the first call

    def forward(self, x: Any, pos: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                tree: TreeLike = None) -> Tensor:
        r"""``x [N, C_in]``, ``pos [N, d]``, ``batch [N]`` (optional), ``tree`` (optional) ->
        ``[N, C_out]`` in input order. ``x`` may instead be a ``Data``/``Batch`` holding ``x``,
        ``pos``, ``batch`` (and a tree cached by ``CacheBallTree``)."""
        x, pos, batch, tree = unpack_inputs(x, pos, batch, tree, self.ball_size, self.__class__.__name__)
        if x is None:
            raise ValueError(f"x is None: {self.__class__.__name__} needs node features")
        check_point_inputs(x, pos, batch, self._expected_in_channels(), self.dim, self.qkv.weight.dtype,
                           self.qkv.weight.device)
        tree = resolve_tree(tree, pos, batch, self.ball_size)
        pos_t = tree.to_tree(pos.to(x.dtype))
        return tree.from_tree(self.forward_tree(tree.to_tree(x), pos_t, tree))

    def _features(self, x_t: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        if self.lin_in is not None:
            x_t = self.lin_in(x_t)
        # Erwin: features see their position relative to the ball centroid before the projection.
        # Padded slots of x_t and of the relative positions are zero, so h is zero there too. The
        # positions come in the dtype the projection computes in (cast once per tree, not per layer).
        return x_t + self.pos_proj(relative_positions(pos_t, tree, _input_dtype(x_t)))

    def _qkv(self, x_t: Tensor, pos_t: Tensor, tree: BallTree):
        h = self._features(x_t, pos_t, tree)
        q, k, v = self.qkv(h).view(-1, 3, self.heads, self.head_dim).unbind(1)
        return h, q, k, v

    def forward_tree(self, x_t: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        r"""Tree-order core: ``x_t [N_pad, C]``, ``pos_t [N_pad, d]`` -> ``[N_pad, C_out]`` (padding zero).

        On CUDA, through the layer's CUDA graphs (``cuda_graphs``, ``layer_graphs.LayerGraphs``)."""
        if self.graphs_allowed() and layer_graphs.wanted(self.cuda_graphs, x_t, tree):
            return self._graphs(self, self._forward_tree, x_t, pos_t, tree)
        return self._forward_tree(x_t, pos_t, tree)

    def _forward_tree(self, x_t: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def graphs_allowed(self) -> bool:
        r"""CUDA graphs only on the kernels' path: ``backend="torch"`` or ``"cpu"`` is a deliberate
        choice (the readable reference, double backward), and it runs as written."""
        return getattr(self, "backend", "auto") in ("auto", "triton")

    def graph_state(self) -> tuple:
        r"""The Python state the tree-order forward reads besides tensors (part of its graphs' key:
        changing it after a capture captures anew instead of replaying the old behaviour)."""
        return (type(self), self.heads, self.head_dim, self.ball_size,
                getattr(self, "cfg", None), getattr(self, "backend", None), getattr(self, "branches", None),
                getattr(self, "drop_branches", None))

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads}, "
                f"ball_size={self.ball_size})")


class BSAConv(_TreeAttentionConv):
    r"""Ball Sparse Attention layer (Brita et al., arXiv 2506.12541).

    Points are ordered by a ball tree (``build_ball_tree``); for query $i$, head
    $h$:

    $$
    \mathbf{h}_i = \mathbf{x}_i + \mathbf{W}_{pos}(\mathbf{p}_i - \mathbf{c}_{B(i)}), \qquad
    \mathbf{o}_i = \sum_{b \in \{ball, cmp, slc\}} \sigma(\mathbf{W}_g \mathbf{h}_i)_{h,b}\,
    \mathrm{softmax}\Big(\tfrac{\mathbf{q}_i^\top \mathbf{K}_b}{\sqrt{D}} + \beta_b\Big)\mathbf{V}_b,
    \qquad \mathbf{y}_i = \mathbf{W}_o \mathbf{o}_i
    $$

    where the ball branch attends to the $m$ points of the query's ball with bias
    $\beta_{ij} = \sigma_h \lVert \mathbf{p}_i - \mathbf{p}_j \rVert$, the compression branch to
    one pooled key per block of ``cmp_block`` points of the whole cloud, and the selection branch to
    the ``topk`` blocks of ``slc_block`` points with the most compressed-attention mass for the
    query's group of ``group_size`` points. Clouds of a batch never attend to each other.

    Args:
        in_channels (int): input features $C$ (also the attention width; ``heads`` divides it), or
            ``-1`` to infer it on the first call (then a linear map takes ``x`` to ``out_channels``,
            the attention width; as ``PointTransformerConv(-1, 64)``).
        out_channels (int, optional): output features (default ``in_channels``).
        heads (int): attention heads.
        ball_size (int): points per ball ``m``.
        cmp_block (int): compression block ``l``. cmp_stride (int, optional): stride ``s`` (``l``).
        slc_block (int): selection block ``l'``. topk (int): selected blocks ``k``.
        group_size (int): queries sharing a selection ``g``.
        group_compression (bool): pool queries per group in the compression branch (faster).
        cmp_window (int, optional): for very large clouds: the compression and selection see only
            the query's window of ``cmp_window`` tree-ordered slots, and a fourth gated branch
            attends to one pooled key per ball of the whole cloud (``BSAConfig``). Meant for
            clouds much larger than the window (e.g. 16,384 at 10^5-10^6 points: 0.9x the per-point
            time of 65k instead of 6x); with the window at a quarter of the cloud it cost accuracy
            in our training comparison (docs/results.md).
        compression (str or Module): ``"mlp"`` (paper) or ``"mean"`` block pooling, or a module
            ``compress(k, v, tree) -> (k_cmp, v_cmp, block_mask)`` with ``k, v [N_pad, H, D]``
            in tree order and outputs ``[N_pad // cmp_stride, H, D]``, ``[N_pad // cmp_stride]``
            (as ``KVCompressor``; the way ``PointTransformerConv`` takes ``attn_nn``).
        branches (str): ``"all"`` (BSA) or ``"ball"`` (ball attention only, Erwin-style).
        drop_branches (sequence of str): with ``branches="all"``, branches among ``"ball"``,
            ``"cmp"``, ``"slc"`` (and ``"crs"`` with ``cmp_window``) whose gate is held at 0: the
            ablation "branch removed". The branch is still computed (same time and FLOPs); the
            selection still ranks blocks by the compression scores when ``"cmp"`` is dropped.
        gate_bias (dict, optional): with ``branches="all"``, the initial bias of named branches'
            gate logits for every head; unnamed branches keep ``nn.Linear``'s initialisation
            (gates near sigmoid(0) = 0.5), and ``reset_parameters`` applies it again. Default
            (``None``): ``{"slc": -4.0}``, the selection gate starts at sigmoid(-4) = 0.02: in every
            setting measured (car and multibody, CPU and H200, 200 to 1,500 steps, 3 seeds each) a
            selection branch weighted like the others from the start cost 15-30% of test MSE
            against this start (docs/results.md, "The selection gate's starting value").
            ``{}``: ``nn.Linear``'s initialisation for every branch (every gate near 0.5, as the
            paper's code starts them).
        dim (int): coordinate dimension, 2 or 3.
        backend (str): ``"auto"`` (Triton on CUDA, the fast CPU path elsewhere), ``"torch"`` (the
            reference), ``"cpu"`` or ``"triton"``.
        selection (str): block-selection rule: ``"shared"`` (default: one selection per group for
            all heads, scored by compressed-attention probability mass, own ball allowed) or
            ``"per_head"`` (the BSA authors': per-head top-k of the compressed logits, own ball
            excluded). See ``BSAConfig``.
        config (BSAConfig, optional): all of ``ball_size, cmp_block, cmp_stride, slc_block, topk,
            group_size, group_compression, cmp_window, selection`` as one object, instead of the
            keywords.
        cuda_graphs (str or bool): on CUDA, replay the layer's forward and backward as CUDA graphs
            captured per input shape (``layer_graphs.LayerGraphs``): eager code, a fraction of the
            host time. ``"auto"`` (default): for batches up to ``layer_graphs.MAX_SLOTS`` tree slots,
            where the host paces a layer; ``True``: any size; ``False``: never. Only with
            ``backend="auto"`` or ``"triton"``: the ``"torch"`` and ``"cpu"`` paths run as written
            (e.g. for double backward, which the graphs' backward does not support).

    Shapes:
        - **input:** node features $(|\mathcal{V}|, C)$, positions $(|\mathcal{V}|, d)$,
          batch vector $(|\mathcal{V}|)$ (optional, sorted), ball tree (optional); or one
          ``Data``/``Batch`` holding ``x``, ``pos``, ``batch`` (and a cached tree)
        - **output:** node features $(|\mathcal{V}|, C_{out})$ in input order
    """

    graph_reads_points = False  # the tree-order side only: graphs keyed by slots

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, heads: int = 8,
                 ball_size: int = 256, cmp_block: int = 8, cmp_stride: Optional[int] = None,
                 slc_block: int = 8, topk: int = 16, group_size: int = 8, group_compression: bool = False,
                 compression: Union[str, nn.Module] = "mlp", branches: str = "all", dim: int = 3,
                 bias: bool = True, backend: str = "auto", cmp_window: Optional[int] = None,
                 config: Optional[BSAConfig] = None, drop_branches: Sequence[str] = (),
                 selection: str = "shared", cuda_graphs: Union[str, bool] = "auto",
                 gate_bias: Optional[Mapping[str, float]] = None):
        cfg = config_from_kwargs(config, ball_size=ball_size, cmp_block=cmp_block, cmp_stride=cmp_stride,
                                      slc_block=slc_block, topk=topk, group_size=group_size,
                                      group_compression=group_compression, cmp_window=cmp_window,
                                      selection=selection)
        super().__init__(in_channels, out_channels, heads, cfg.ball_size, dim, bias, cuda_graphs)
        if branches not in ("all", "ball"):
            raise ValueError(f"branches must be 'all' or 'ball', got {branches!r}")
        self.cfg = cfg
        names = BRANCH_NAMES[:cfg.num_branches]
        if isinstance(drop_branches, str):
            drop_branches = (drop_branches,)
        bad = [b for b in drop_branches if b not in names]
        if bad or (drop_branches and branches != "all"):
            raise ValueError(f"drop_branches takes branch names among {names} with branches='all', got "
                             f"{tuple(drop_branches)!r} (branches={branches!r})")
        self.drop_branches = tuple(b for b in names if b in drop_branches)
        if len(self.drop_branches) == len(names):
            raise ValueError(f"drop_branches={self.drop_branches!r} leaves no branch")
        if gate_bias is not None and not isinstance(gate_bias, Mapping):
            raise ValueError(f"gate_bias must map branch names to numbers, e.g. {{'slc': -4.0}}; got {gate_bias!r}")
        if gate_bias is None:  # the default start (see the docstring); none for a ball-only layer
            gate_bias = DEFAULT_GATE_BIAS if branches == "all" else {}
        gate_bias = dict(gate_bias)
        if gate_bias and (branches != "all" or any(b not in names for b in gate_bias)
                          or not all(isinstance(v, numbers.Real) and math.isfinite(v) for v in gate_bias.values())):
            raise ValueError(f"gate_bias maps branch names among {names} to finite numbers, with branches='all'; "
                             f"got {gate_bias!r} (branches={branches!r})")
        self.gate_bias = {b: float(gate_bias[b]) for b in names if b in gate_bias}
        check_backend_name(backend)  # unknown names, or "triton" without triton: fail here, not at the call
        self.branches, self.backend = branches, backend
        # sigma < 0: nearer points weigh more (Erwin initialises the distance bias this way)
        self.sigma = nn.Parameter(torch.empty(heads))
        if branches == "all":
            self.gate = nn.Linear(self.channels, self.cfg.num_branches * heads)
            # 0 for a dropped branch; not saved: the constructor argument defines it
            self.register_buffer("branch_keep", torch.tensor([float(b not in self.drop_branches) for b in names]),
                                 persistent=False)
            if isinstance(compression, nn.Module):
                for name in ("cmp_block", "cmp_stride"):
                    if getattr(compression, name, getattr(self.cfg, name)) != getattr(self.cfg, name):
                        raise ValueError(f"compression.{name}={getattr(compression, name)} differs from the "
                                         f"layer's {name}={getattr(self.cfg, name)}")
                self.compress = compression
            else:
                self.compress = KVCompressor(self.head_dim, self.cfg.cmp_block, self.cfg.cmp_stride, compression)
        self.reset_parameters()

    def reset_parameters(self):
        super().reset_parameters()
        nn.init.constant_(self.sigma, -1.0)
        if self.branches == "all":
            self.gate.reset_parameters()
            if self.gate_bias:
                names = BRANCH_NAMES[:self.cfg.num_branches]
                with torch.no_grad():
                    bias = self.gate.bias.view(self.heads, len(names))
                    for b, value in self.gate_bias.items():
                        bias[:, names.index(b)] = value
            reset(self.compress)  # a user's compression module may or may not have reset_parameters

    def _fast_compress(self) -> bool:
        r"""Whether ``compress_kv`` may stand in for the compressor's call: only when that call would
        run ``KVCompressor``'s own code and no hook (on the compressor itself) has to see it."""
        t = type(self.compress)
        return (isinstance(self.compress, KVCompressor) and t.forward is KVCompressor.forward
                and t.compress_kv is KVCompressor.compress_kv and t._stacked is KVCompressor._stacked
                and not layer_graphs._has_hooks(self.compress))

    def _qkv_gates(self, x_t: Tensor, pos_t: Tensor, tree: BallTree, fast_compress: bool):
        r"""``q, k, v [N_pad, H, D]``, ``kv [N_pad, 2, H, D]`` (k and v as one view), the gate
        logits ``[N_pad, H * B]`` and the compressor's parameters as ``KVCompressor._stacked`` gives
        them (or ``None``; with ``fast_compress``, ``_fast_compress()``'s answer), from one
        projection of ``h``: the gate's rows are appended to the qkv weight per call (one GEMM and
        one read of ``h`` instead of two; the parameters stay as they are). All are views of the
        one output."""
        h = self._features(x_t, pos_t, tree)
        c, ng = self.channels, self.gate.out_features
        if layer_graphs._has_hooks(self.qkv) or layer_graphs._has_hooks(self.gate):
            # a hook on a projection must see its call: the modules as written
            q, k, v = self.qkv(h).view(-1, 3, self.heads, self.head_dim).unbind(1)
            return q, k, v, torch.stack([k, v], 1), self.gate(h), None
        # weights and biases (with the compression MLPs' when compress_kv runs them) in one
        # concatenation and (under autocast) one cast, split as views
        parts = [self.qkv.weight, self.gate.weight, self.gate.bias]
        if self.qkv.bias is not None:
            parts.insert(2, self.qkv.bias)
        cm = self.compress
        fused_mlp = fast_compress and cm.mode == "mlp" and cm.cmp_block == cm.cmp_stride  # compress_kv's case
        cmp_parts = cm._stack_parts() if fused_mlp else []
        flat = torch.cat([p.reshape(-1) for p in parts + cmp_parts])
        if torch.is_autocast_enabled(h.device.type) and flat.dtype == torch.float32:
            flat = flat.to(torch.get_autocast_dtype(h.device.type))  # what F.linear's autocast would do
        nw = (3 * c + ng) * self.qkv.in_features
        cmp_sizes = cm._stack_sizes() if cmp_parts else []
        # one split (its gradient: one concatenation), the compressor's five pieces included
        weight, bias, *cmp_pieces = flat.split([nw, flat.numel() - nw - sum(cmp_sizes)] + cmp_sizes)
        weight = weight.view(3 * c + ng, -1)
        if self.qkv.bias is not None:
            y = F.linear(h, weight, bias)
        else:
            y = F.linear(h, weight)
        q, kv, g = y.split([c, 2 * c, ng], dim=1)
        if self.qkv.bias is None:
            g = g + bias
        kv = kv.view(-1, 2, self.heads, self.head_dim)
        k, v = kv.unbind(1)
        stacked = cm._view_stacked(*cmp_pieces) if cmp_parts else None
        return q.view(-1, self.heads, self.head_dim), k, v, kv, g, stacked

    def _forward_tree(self, x_t: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        if self.branches == "ball":
            _, q, k, v = self._qkv(x_t, pos_t, tree)
            o = ball_attention(q, k, v, pos_t, self.sigma, tree.mask, tree.ball_size, self.backend)
        else:
            fast_compress = self._fast_compress()
            q, k, v, kv, g, stacked = self._qkv_gates(x_t, pos_t, tree, fast_compress)
            gates, logits = None, g.view(-1, self.heads, self.cfg.num_branches)
            if self.drop_branches:  # the ablation squashes here; else the op does (in its combine kernel)
                gates, logits = torch.sigmoid(logits) * self.branch_keep.to(logits.dtype), None
            if fast_compress:  # compress_kv bypasses the module's call (see _fast_compress)
                k_cmp, v_cmp, cmp_mask = self.compress.compress_kv(kv, tree, stacked)
            else:
                k_cmp, v_cmp, cmp_mask = self.compress(k, v, tree)
            o = bsa_attention(q, k, v, pos_t, tree, self.cfg, sigma=self.sigma, gates=gates, gate_logits=logits,
                              k_cmp=k_cmp, v_cmp=v_cmp, cmp_mask=cmp_mask, backend=self.backend,
                              validate=False)  # checked once at the boundary, not per layer
        return self.out(o.reshape(-1, self.channels)) * tree.float_mask(o.dtype)

    def __repr__(self) -> str:
        extra = "" if self.branches == "all" else ", branches='ball'"
        if self.branches == "all" and self.cfg.cmp_window is not None:
            extra += f", cmp_window={self.cfg.cmp_window}"
        if self.branches == "all" and self.cfg.selection != "shared":
            extra += f", selection={self.cfg.selection!r}"
        if self.drop_branches:
            extra += f", drop_branches={self.drop_branches}"
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, heads={self.heads}, "
                f"ball_size={self.ball_size}{extra})")


class FullAttentionConv(_TreeAttentionConv):
    r"""Full softmax attention over each cloud (SDPA), the accuracy and speed peer of ``BSAConv``.

    Same interface and positional input as ``BSAConv``; costs $O(N_c^2)$ per cloud.

    Shapes:
        - **input:** $(|\mathcal{V}|, C)$, $(|\mathcal{V}|, d)$, $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, C_{out})$
    """

    def __init__(self, in_channels: int, out_channels: Optional[int] = None, heads: int = 8,
                 ball_size: int = 256, dim: int = 3, bias: bool = True, cuda_graphs: Union[str, bool] = "auto"):
        super().__init__(in_channels, out_channels, heads, ball_size, dim, bias, cuda_graphs)

    def _forward_tree(self, x_t: Tensor, pos_t: Tensor, tree: BallTree) -> Tensor:
        if _varlen_ok(x_t, self.head_dim):
            # FlashAttention over the packed valid points of each cloud: no padding mask, which
            # would push SDPA off its flash kernels. tree.inv lists each cloud's slots in turn.
            n, h = tree.num_points, self.heads
            hp = self._features(x_t, pos_t, tree).index_select(0, tree.inv)
            qkv = self.qkv(hp).view(n, 3, h, self.head_dim).transpose(0, 1).contiguous()  # [3, N, H, D]
            cu = tree.cached("cu_seqlens", lambda: F.pad(torch.cumsum(tree.counts, 0), (1, 0)).to(torch.int32))
            o = _varlen_attn(qkv[0], qkv[1], qkv[2], cu, cu, tree.max_slots, tree.max_slots)
            return tree.to_tree(self.out(o.reshape(n, self.channels)))
        _, q, k, v = self._qkv(x_t, pos_t, tree)
        o = full_attention(q, k, v, tree)
        return self.out(o.reshape(-1, self.channels)) * tree.float_mask(o.dtype)


def _varlen_attn(*args):
    from torch.nn.attention.varlen import varlen_attn
    return varlen_attn(*args)


def _varlen_ok(x: Tensor, head_dim: int) -> bool:
    # FlashAttention: CUDA, 16-bit (x itself, or autocast's dtype), head dims a multiple of 8 up to 256
    if not x.is_cuda or head_dim % 8 or head_dim > 256:
        return False
    dtype = torch.get_autocast_dtype("cuda") if torch.is_autocast_enabled("cuda") else x.dtype
    if dtype not in (torch.float16, torch.bfloat16):
        return False
    return _HAS_VARLEN


try:
    from torch.nn.attention import varlen as _varlen  # noqa: F401  (torch >= 2.9)
    _HAS_VARLEN = True
except ImportError:  # pragma: no cover - older torch: the dense masked SDPA path
    _HAS_VARLEN = False
