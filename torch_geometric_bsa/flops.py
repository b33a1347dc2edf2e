"""Analytic FLOP counts of BSA per branch, of full attention, and of whole transformers.

A multiply-add counts as 2 FLOPs. Attention over ``K`` keys costs ``4 * D`` FLOPs per query, key
and head (``q.k`` and ``p.v``); softmax and bias terms are lower order and left out.
"""
from __future__ import annotations

from typing import Dict, Optional

from .reference import BSAConfig

__all__ = ["attention_flops", "bsa_flops", "full_attention_flops", "model_flops"]


def attention_flops(num_queries: int, keys_per_query: float, heads: int, head_dim: int) -> float:
    r"""FLOPs of softmax attention: ``4 * Q * K * H * D``."""
    return 4.0 * num_queries * keys_per_query * heads * head_dim


def full_attention_flops(n: int, heads: int, head_dim: int) -> float:
    r"""Full attention over one cloud of ``n`` points."""
    return attention_flops(n, n, heads, head_dim)


def bsa_flops(n: int, cfg: BSAConfig, heads: int, head_dim: int, compression: str = "mlp") -> Dict[str, float]:
    r"""FLOPs of each BSA branch for one cloud of ``n`` points (padded to the ball size).

    Returns a dict with ``ball``, ``cmp`` (attention over compressed keys, which also yields the
    selection scores), ``cmp_pool`` (the compression MLP), ``slc``, ``crs`` (the coarse branch of
    ``cfg.cmp_window``, else 0) and ``total``.
    """
    m = cfg.ball_size
    n_pad = -(-n // m) * m
    nb = n_pad // cfg.cmp_stride
    q_cmp = n_pad // cfg.group_size if cfg.group_compression else n_pad
    d = head_dim
    out = {
        "ball": attention_flops(n_pad, m, heads, d),
        # with a window, each query sees the blocks of its window only
        "cmp": attention_flops(q_cmp, nb if cfg.cmp_window is None else min(nb, cfg.cmp_window // cfg.cmp_stride),
                               heads, d),
        # two MLPs (k and v) of l*D -> D -> D per block and head
        "cmp_pool": (2 * 2.0 * nb * heads * (cfg.cmp_block * d * d + d * d)) if compression == "mlp" else 0.0,
        "slc": attention_flops(n_pad, min(cfg.topk * cfg.slc_block, n_pad), heads, d),
        "crs": 0.0 if cfg.cmp_window is None else attention_flops(q_cmp, n_pad // m, heads, d),
    }
    out["total"] = sum(out.values())
    return out


def model_flops(n: int, hidden: int, num_layers: int, heads: int, attention: str = "bsa",
                cfg: Optional[BSAConfig] = None, mlp_ratio: float = 4.0, in_channels: int = 3,
                out_channels: int = 1, dim: int = 3, compression: str = "mlp") -> Dict[str, float]:
    r"""Forward FLOPs of ``BSATransformer`` on one cloud of ``n`` points.

    Returns ``attention`` (the attention op of all layers), ``linear`` (embedding, q/k/v, gates,
    output projections, SwiGLU, head) and ``total``.
    """
    cfg = cfg or BSAConfig()
    d = hidden // heads
    if attention == "full":
        attn = full_attention_flops(n, heads, d)
        n_rows = n
    elif attention == "ball":
        n_rows = -(-n // cfg.ball_size) * cfg.ball_size
        attn = attention_flops(n_rows, cfg.ball_size, heads, d)
    elif attention == "bsa":
        n_rows = -(-n // cfg.ball_size) * cfg.ball_size
        attn = bsa_flops(n, cfg, heads, d, compression)["total"]
    else:
        raise ValueError(f"attention must be 'bsa', 'ball' or 'full', got {attention!r}")
    mlp_hidden = int(mlp_ratio * hidden)
    per_layer = 2.0 * n_rows * (dim * hidden + 3 * hidden * hidden + hidden * hidden + 3 * hidden * mlp_hidden)
    if attention == "bsa":
        per_layer += 2.0 * n_rows * hidden * 3 * heads  # gates
    embed = 2.0 * n * ((in_channels + dim) * hidden + hidden * hidden)
    head = 2.0 * n * hidden * out_channels
    linear = num_layers * per_layer + embed + head
    return {"attention": num_layers * attn, "linear": linear, "total": num_layers * attn + linear}
