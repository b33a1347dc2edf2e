"""`BSAGPSConv`: a GPS layer (Rampasek et al., 2022) with Ball Sparse Attention as its global attention.

PyG's `GPSConv` cannot host BSA: its attention sees `x` only (dense batch, no positions). This layer
has the same local / global / MLP structure and passes `pos` (and the ball tree) to the attention.
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, Optional

import torch.nn.functional as F
from torch import Tensor, nn
from torch_geometric.nn.inits import reset
from torch_geometric.nn.resolver import activation_resolver, normalization_resolver

from ..reference import BSAConfig
from .conv import BSAConv, TreeLike, resolve_tree

__all__ = ["BSAGPSConv"]


class BSAGPSConv(nn.Module):
    r"""The GPS layer with BSA as the global attention beside any local message-passing conv:

    $$
    \mathbf{h}^{loc} = \mathrm{N}_1(\mathbf{x} + \mathrm{Conv}(\mathbf{x}, \mathcal{E})), \quad
    \mathbf{h}^{glob} = \mathrm{N}_2(\mathbf{x} + \mathrm{BSA}(\mathbf{x}, \mathbf{p})), \quad
    \mathbf{h} = \mathbf{h}^{loc} + \mathbf{h}^{glob}, \quad
    \mathbf{y} = \mathrm{N}_3(\mathbf{h} + \mathrm{MLP}(\mathbf{h}))
    $$

    (dropout after the conv, the attention and inside the MLP, as PyG's ``GPSConv``).

    Args:
        channels (int): feature size (input = output).
        conv (MessagePassing, optional): the local conv, ``channels -> channels``. Called as
            ``conv(x, pos, edge_index, **kwargs)`` when its ``forward`` takes ``pos`` (e.g.
            ``PointTransformerConv``), else ``conv(x, edge_index, **kwargs)`` (e.g. ``GINEConv``
            with ``edge_attr=...``). ``None``: global attention only.
        heads (int): BSA heads (ignored when ``attn`` is given).
        dropout (float): dropout rate.
        act (str): MLP activation (a name for PyG's activation resolver).
        act_kwargs (dict, optional): its keyword arguments.
        norm (str, optional): ``"batch_norm"`` (default, as ``GPSConv``), ``"layer_norm"``, ...
            or ``None``.
        norm_kwargs (dict, optional): keyword arguments of the norm.
        attn (BSAConv, optional): the global attention module, ``channels -> channels``; by default
            ``BSAConv(channels, heads=heads, config=config, **attn_kwargs)``.
        config (BSAConfig, optional): BSA hyper-parameters of the default ``attn``.
        attn_kwargs (dict, optional): other keywords of the default ``attn``.

    Shapes:
        - **input:** node features $(|\mathcal{V}|, C)$, positions $(|\mathcal{V}|, d)$,
          edge indices $(2, |\mathcal{E}|)$, batch vector $(|\mathcal{V}|)$ (optional),
          ball tree (optional; build it once per batch and pass it to every layer)
        - **output:** node features $(|\mathcal{V}|, C)$
    """

    def __init__(self, channels: int, conv: Optional[nn.Module], heads: int = 4, dropout: float = 0.0,
                 act: str = "relu", act_kwargs: Optional[Dict[str, Any]] = None,
                 norm: Optional[str] = "batch_norm", norm_kwargs: Optional[Dict[str, Any]] = None,
                 attn: Optional[BSAConv] = None, config: Optional[BSAConfig] = None,
                 attn_kwargs: Optional[Dict[str, Any]] = None):
        super().__init__()
        if not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be a positive int, got {channels!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        if attn is None:
            attn = BSAConv(channels, channels, heads=heads, config=config, **(attn_kwargs or {}))
        elif config is not None or attn_kwargs:
            raise ValueError("pass either attn (a built BSAConv) or config / attn_kwargs, not both")
        if not callable(getattr(attn, "forward", None)) or "pos" not in inspect.signature(attn.forward).parameters:
            raise ValueError(f"attn must take (x, pos, batch, tree) like BSAConv, got {type(attn).__name__}")
        self.channels, self.heads, self.dropout = channels, getattr(attn, "heads", heads), dropout
        self.conv, self.attn = conv, attn
        self.conv_takes_pos = conv is not None and "pos" in inspect.signature(conv.forward).parameters
        self.mlp = nn.Sequential(nn.Linear(channels, 2 * channels),
                                 activation_resolver(act, **(act_kwargs or {})), nn.Dropout(dropout),
                                 nn.Linear(2 * channels, channels), nn.Dropout(dropout))
        norm_kwargs = norm_kwargs or {}
        # no local conv, no norm1 (it would hold parameters that never get a gradient)
        self.norm1 = normalization_resolver(norm, channels, **norm_kwargs) if conv is not None else None
        self.norm2 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm3 = normalization_resolver(norm, channels, **norm_kwargs)
        self.norm_with_batch = (self.norm2 is not None
                                and "batch" in inspect.signature(self.norm2.forward).parameters)

    def reset_parameters(self):
        for mod in (self.conv, self.attn, self.mlp, self.norm1, self.norm2, self.norm3):
            if mod is not None:
                reset(mod)

    def _norm(self, norm: Optional[nn.Module], h: Tensor, batch: Optional[Tensor]) -> Tensor:
        if norm is None:
            return h
        return norm(h, batch=batch) if self.norm_with_batch else norm(h)

    def forward(self, x: Tensor, pos: Tensor, edge_index: Tensor, batch: Optional[Tensor] = None,
                tree: TreeLike = None, **kwargs) -> Tensor:
        r"""``kwargs`` go to the local conv (e.g. ``edge_attr``)."""
        hs = []
        if self.conv is not None:
            h = self.conv(x, pos, edge_index, **kwargs) if self.conv_takes_pos else self.conv(x, edge_index, **kwargs)
            h = F.dropout(h, p=self.dropout, training=self.training)
            hs.append(self._norm(self.norm1, h + x, batch))
        tree = resolve_tree(tree, pos, batch, self.attn.ball_size)
        h = self.attn(x, pos, batch, tree=tree)
        h = F.dropout(h, p=self.dropout, training=self.training)
        hs.append(self._norm(self.norm2, h + x, batch))
        out = hs[0] if len(hs) == 1 else hs[0] + hs[1]
        return self._norm(self.norm3, out + self.mlp(out), batch)

    def __repr__(self) -> str:
        return f"{self.__class__.__name__}({self.channels}, conv={self.conv}, attn={self.attn})"
