"""Pure-PyTorch Ball Sparse Attention, branch by branch (DESIGN §1.2, §1.2b).

This is the oracle every Triton kernel and the fast CPU path (``cpu.py``) are tested against. All
tensors are in tree order and padded: ``q, k, v [N_pad, H, D]``, ``pos [N_pad, d]``, ``mask [N_pad]``. Clouds are
contiguous slot ranges given by ``tree.ptr``; nothing here ever lets one cloud see another.
Written for clarity: the global branches use a dense per-cloud layout ``[B, P_max, ...]``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .compose import Branches, compose
from ._validate import check_positive_int
from .balltree import BallTree

__all__ = [
    "BSAConfig", "ball_attention", "blockify", "compress_mean", "compressed_attention",
    "selection_scores", "select_blocks", "selected_attention", "full_attention", "bsa_reference",
]


#: block-selection rules of ``BSAConfig.selection``: ours (heads share a group's selection) and the
#: BSA authors' (per-head top-k of logits, own ball excluded)
SELECTION_RULES = ("shared", "per_head")


@dataclass(frozen=True)
class BSAConfig:
    r"""Hyper-parameters of BSA (DESIGN §1.2; defaults and their provenance in docs/paper-check.md).

    Args:
        ball_size (int): points per ball ``m`` (ball branch window).
        cmp_block (int): compression block length ``l``.
        cmp_stride (int, optional): compression stride ``s`` (default ``l``: non-overlapping).
        slc_block (int): selection block length ``l'``.
        topk (int): selected blocks per query group ``k``.
        group_size (int): queries per selection group ``g``.
        group_compression (bool): pool queries per group for the compression branch too.
        cmp_window (int, optional): for large clouds. When set (a multiple of ``ball_size``), the
            compression branch and the selection only see the blocks of the query's window (the
            aligned run of ``cmp_window`` slots of its cloud that holds it: a subtree of the ball
            tree when the cloud has a power-of-two number of balls), and a fourth, **coarse**
            branch attends to one mean-pooled key per ball of the whole cloud. Costs
            ``N * (cmp_window / s + N / ball_size)`` instead of ``N * N / s``; the gates get a
            fourth column. ``None`` (default): the paper's whole-cloud compression.
        selection (str): the block-selection rule (docs/paper-check.md). ``"shared"`` (default):
            one selection per query group, shared by all heads, blocks scored by the compression
            branch's probability mass summed over heads and the group's queries; the query's own
            ball may be picked. ``"per_head"`` (the BSA authors' code): every head picks its own
            top-``k`` from the raw compressed-attention logits ``scale * q . k_cmp`` summed over
            the group's valid queries, and the blocks of the group's own ball are never picked.
    """

    ball_size: int = 256
    cmp_block: int = 8
    cmp_stride: Optional[int] = None
    slc_block: int = 8
    topk: int = 16
    group_size: int = 8
    group_compression: bool = False
    cmp_window: Optional[int] = None
    selection: str = "shared"

    def __post_init__(self):
        for name in ("ball_size", "cmp_block", "slc_block", "topk", "group_size"):
            check_positive_int(name, getattr(self, name))
        s = self.cmp_block if self.cmp_stride is None else self.cmp_stride
        if not isinstance(s, int) or s < 1 or s > self.cmp_block or self.cmp_block % s:
            raise ValueError(f"cmp_stride must be a positive divisor of cmp_block={self.cmp_block}, got {s!r}")
        for name in ("cmp_block", "slc_block", "group_size"):
            if self.ball_size % getattr(self, name):
                raise ValueError(f"{name}={getattr(self, name)} must divide ball_size={self.ball_size} "
                                 "(blocks and groups must not straddle balls or clouds)")
        object.__setattr__(self, "cmp_stride", s)
        w = self.cmp_window
        if w is not None and (not isinstance(w, int) or w < self.ball_size or w % self.ball_size):
            raise ValueError(f"cmp_window must be None or a positive multiple of ball_size={self.ball_size}, "
                             f"got {w!r}")
        if self.selection not in SELECTION_RULES:
            raise ValueError(f"selection must be one of {SELECTION_RULES}, got {self.selection!r}")

    @property
    def num_branches(self) -> int:
        r"""Gated branches: ball, compression, selection, and the coarse one with ``cmp_window``."""
        return 3 if self.cmp_window is None else 4

    def with_(self, **kw) -> "BSAConfig":
        return replace(self, **kw)


def _neg(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).min


def _acc(dtype: torch.dtype) -> torch.dtype:
    # 16-bit inputs: logits, bias and softmax in fp32 (as the kernels accumulate), so large q.k or
    # sigma * ||p_i - p_j|| cannot overflow fp16 (max 65504) into inf - inf = NaN
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _masked_softmax(logits: Tensor, valid: Tensor) -> Tensor:
    # finite fill + re-mask: rows with no valid key give zeros instead of NaN
    p = torch.softmax(logits.masked_fill(~valid, _neg(logits.dtype)), dim=-1)
    return p * valid


# ---------------------------------------------------------------------------------------------
# 1. Ball branch
# ---------------------------------------------------------------------------------------------
def ball_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor,
                   ball_size: int, scale: Optional[float] = None) -> Tensor:
    r"""Exact attention inside each ball with Erwin's distance bias.

    ``a_ij = scale * q_i.k_j + sigma_h * ||p_i - p_j||`` for ``j`` valid in the ball of ``i``.

    Args:
        q, k, v: ``[N_pad, H, D]`` tree order, ``N_pad`` a multiple of ``ball_size``.
        pos: ``[N_pad, d]``. sigma: ``[H]``. mask: ``[N_pad]`` bool.

    Returns:
        ``[N_pad, H, D]``, zero at padded queries.
    """
    n, h, d = q.shape
    m = ball_size
    scale = d ** -0.5 if scale is None else scale
    acc = _acc(q.dtype)
    qb, kb, vb = (t.reshape(-1, m, h, d).transpose(1, 2).to(acc) for t in (q, k, v))  # [nb, H, m, D]
    pb = pos.reshape(-1, m, pos.size(-1))
    pb = pb.to(_acc(pb.dtype))  # cdist has no 16-bit CPU kernel
    dist = torch.cdist(pb, pb, compute_mode="donot_use_mm_for_euclid_dist")  # [nb, m, m], exact
    logits = scale * qb @ kb.transpose(-1, -2) + sigma.view(1, h, 1, 1).to(acc) * dist[:, None].to(acc)
    valid = mask.view(-1, 1, 1, m)
    out = (_masked_softmax(logits, valid) @ vb).to(q.dtype)  # [nb, H, m, D]
    return out.transpose(1, 2).reshape(n, h, d) * mask.view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Dense per-cloud layout helpers
# ---------------------------------------------------------------------------------------------
def _dense_index(ptr: Tensor, length: int, unit: int, num_units: int) -> Tuple[Tensor, Tensor]:
    r"""Index ``[B, length // unit]`` of each cloud's units (slots, blocks, groups) and validity."""
    start = ptr[:-1] // unit
    size = (ptr[1:] - ptr[:-1]) // unit
    local = torch.arange(length // unit, device=ptr.device)
    valid = local[None] < size[:, None]
    idx = (start[:, None] + local[None]).clamp_max(max(num_units - 1, 0))
    return idx, valid


def _to_dense(x: Tensor, ptr: Tensor, length: int, unit: int = 1) -> Tuple[Tensor, Tensor]:
    r"""Tree-ordered units ``[U, ...]`` -> dense per cloud ``[B, length // unit, ...]`` and validity."""
    idx, valid = _dense_index(ptr, length, unit, x.size(0))
    return x[idx], valid


def _from_dense(xd: Tensor, ptr: Tensor, length: int, num: int, unit: int = 1) -> Tensor:
    idx, valid = _dense_index(ptr, length, unit, num)
    # invalid entries go to a spare row that is dropped: no boolean indexing (a data-dependent
    # shape that breaks torch.compile graphs); valid targets are unique, so this is deterministic
    idx = torch.where(valid, idx, num)
    out = xd.new_zeros((num + 1,) + tuple(xd.shape[2:]))
    out[idx.flatten()] = xd.flatten(0, 1)
    return out[:num]


# ---------------------------------------------------------------------------------------------
# 2. Compression branch
# ---------------------------------------------------------------------------------------------
def blockify(x: Tensor, mask: Tensor, slot_batch: Tensor, block: int, stride: int) -> Tuple[Tensor, Tensor]:
    r"""Cuts tree-ordered ``x [N_pad, ...]`` into blocks ``b = [b*stride, b*stride + block)``.

    Returns ``xb [N_pad // stride, block, ...]`` and ``valid [N_pad // stride, block]`` (slot valid
    and in the same cloud as the block's first slot).
    """
    n = x.size(0)
    nb = n // stride
    slots = torch.arange(nb, device=x.device)[:, None] * stride + torch.arange(block, device=x.device)
    inside = slots < n
    slots = slots.clamp_max(n - 1)
    valid = inside & mask[slots] & (slot_batch[slots] == slot_batch[slots[:, :1]])
    return x[slots], valid


def block_mask(tree: BallTree, block: int, stride: int) -> Tensor:
    r"""``[N_pad // stride]`` bool: compression blocks holding at least one valid slot of their cloud
    (the mask of compressed keys given without one). Memoised on the tree: every layer reuses it."""
    return tree.cached(("block_mask", block, stride),
                       lambda: blockify(tree.mask, tree.mask, tree.slot_batch, block, stride)[1].any(1))


def compress_mean(k: Tensor, v: Tensor, mask: Tensor, slot_batch: Tensor, block: int,
                  stride: int) -> Tuple[Tensor, Tensor, Tensor]:
    r"""Mean-pooled compressed keys/values ``[N_pad // s, H, D]`` and the block validity mask."""
    kb, valid = blockify(k, mask, slot_batch, block, stride)
    vb, _ = blockify(v, mask, slot_batch, block, stride)
    acc = _acc(k.dtype)  # 16-bit inputs: sum in fp32, round once
    w = valid.to(acc)[..., None, None]
    cnt = w.sum(1).clamp_min(1.0)
    kc, vc = (kb.to(acc) * w).sum(1) / cnt, (vb.to(acc) * w).sum(1) / cnt
    return kc.to(k.dtype), vc.to(v.dtype), valid.any(1)


def compressed_attention(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, cmp_mask: Tensor, tree: BallTree,
                         cmp_stride: int, scale: Optional[float] = None, return_probs: bool = False,
                         window: Optional[int] = None, return_logits: bool = False):
    r"""Every query attends to all compressed blocks of its own cloud (of its window of ``window``
    slots of the cloud, when given: blocks and queries with the same ``cloud slot // window``).

    Args:
        q: ``[Q, H, D]`` queries in tree order at granularity ``q_unit = N_pad // Q`` (1 for
            points, ``g`` for pooled group queries).
        k_cmp, v_cmp: ``[N_pad // s, H, D]``. cmp_mask: ``[N_pad // s]``.

    Returns:
        ``o [Q, H, D]`` (zero where no block is valid) and, if asked, the probabilities in the dense
        per-cloud layout ``[B, H, Qmax, NBmax]``; with ``return_logits`` instead of them the scaled
        logits ``scale * q . k_cmp`` in that layout, zero at invalid blocks and padded queries (what
        the ``"per_head"`` selection rule ranks).
    """
    n_pad = tree.num_slots
    h, d = q.shape[1:]
    scale = d ** -0.5 if scale is None else scale
    q_unit = n_pad // q.size(0)
    qd, qvalid = _to_dense(q, tree.ptr, tree.max_slots, q_unit)          # [B, Qm, H, D]
    kd, _ = _to_dense(k_cmp, tree.ptr, tree.max_slots, cmp_stride)       # [B, NB, H, D]
    vd, _ = _to_dense(v_cmp, tree.ptr, tree.max_slots, cmp_stride)
    bmask, bvalid = _to_dense(cmp_mask, tree.ptr, tree.max_slots, cmp_stride)
    acc = _acc(q.dtype)
    logits = scale * qd.transpose(1, 2).to(acc) @ kd.permute(0, 2, 3, 1).to(acc)  # [B, H, Qm, NB]
    # probabilities stay in fp32 for 16-bit inputs: rounding them to bf16 (8 bits) would turn near
    # ties of the selection scores into exact ties and flip the top-k against the fp32 result
    valid = (bmask & bvalid)[:, None, None, :]
    if window is not None:
        same = _window_mask(logits.size(2), q_unit, logits.size(3), cmp_stride, window, q.device)
        valid = valid & same
    p = _masked_softmax(logits, valid)
    # padded queries (a group: all of it padded) get zero output and no say in the selection
    qmask = tree.mask.view(-1, q_unit).any(1)
    qmd, _ = _to_dense(qmask, tree.ptr, tree.max_slots, q_unit)
    qok = (qvalid & qmd)[:, None, :, None]
    p = p * qok
    od = (p @ vd.transpose(1, 2).to(acc)).transpose(1, 2).to(q.dtype)    # [B, Qm, H, D]
    o = _from_dense(od, tree.ptr, tree.max_slots, q.size(0), q_unit)
    if return_probs and return_logits:
        return o, logits.masked_fill(~valid, 0.0) * qok
    return (o, p) if return_probs else o


def per_slot(o: Tensor, mask: Tensor, q_unit: int) -> Tensor:
    r"""A compression-branch output at query granularity ``q_unit`` (1, or ``g`` with group
    compression) as ``[N_pad, H, D]``: each group's row repeated over its slots, zero at padding."""
    return o if q_unit == 1 else o.repeat_interleave(q_unit, 0) * mask.view(-1, 1, 1)


def _window_mask(nq: int, q_unit: int, nk: int, k_unit: int, window: int, device) -> Tensor:
    r"""``[Qm, NK]`` bool: row and column units (cloud-relative slots ``i * unit``) share a window."""
    qw = torch.arange(nq, device=device) * q_unit // window
    kw = torch.arange(nk, device=device) * k_unit // window
    return qw[:, None] == kw[None, :]


# ---------------------------------------------------------------------------------------------
# 3. Selection branch
# ---------------------------------------------------------------------------------------------
def selection_scores(p_cmp: Tensor, tree: BallTree, cfg: BSAConfig, q_unit: int) -> Tensor:
    r"""Importance ``s_G(b')`` of each selection block for each query group.

    ``cfg.selection == "shared"``: ``p_cmp [B, H, Qm, NB]`` are compressed-attention probabilities at
    query granularity ``q_unit`` (1 or ``g``). Sums over heads and the group's queries, then over
    the compression blocks that overlap each selection block. Returns ``[B, NG, NS]``.

    ``cfg.selection == "per_head"``: ``p_cmp`` are the compressed logits ``scale * q . k_cmp``
    (``compressed_attention(..., return_logits=True)``: zero at invalid blocks and padded queries),
    summed over the group's queries per head, then averaged over the compression blocks that overlap
    each selection block (the identity when ``cmp_block == cmp_stride == slc_block``). The blocks of
    the group's own ball score ``-inf``. Returns ``[B, NG, H, NS]``.

    Selection blocks with no valid slot (or outside the group's window) score ``-inf``.
    """
    g, s, l, ls = cfg.group_size, cfg.cmp_stride, cfg.cmp_block, cfg.slc_block
    per_head = cfg.selection == "per_head"
    b, h = p_cmp.shape[:2]
    ph = p_cmp.float()
    ph = ph.view(b, h, -1, g // q_unit, ph.size(-1)).sum(3)    # [B, H, NG, NB]
    if not per_head:
        ph = ph.sum(1)                                           # [B, NG, NB]
    nb, ns = tree.max_slots // s, tree.max_slots // ls
    cb = torch.arange(nb, device=ph.device) * s
    sb = torch.arange(ns, device=ph.device) * ls
    overlap = ((cb[:, None] < sb[None] + ls) & (sb[None] < cb[:, None] + l)).to(ph.dtype)
    if per_head:  # logits are signed: a mean, so blocks overlapped by fewer compression blocks are not favoured
        overlap = overlap / overlap.sum(0).clamp_min(1.0)
    scores = ph @ overlap                                        # [B, (H,) NG, NS]
    slc_valid, present = _to_dense(_block_any(tree.mask, ls), tree.ptr, tree.max_slots, ls)
    valid = (slc_valid & present)[:, None, :]
    ng = scores.size(-2)
    if cfg.cmp_window is not None:  # only the blocks of the group's own window
        valid = valid & _window_mask(ng, g, ns, ls, cfg.cmp_window, scores.device)
    if per_head:
        valid = valid & ~_window_mask(ng, g, ns, ls, cfg.ball_size, scores.device)  # not the own ball
        # + 0.0 turns a -0.0 (a padded query's 0 * negative logit) into +0.0: ties stay ties
        return (scores.transpose(1, 2) + 0.0).masked_fill(~valid[:, :, None, :], -math.inf)
    return scores.masked_fill(~valid, -math.inf)


def _block_any(mask: Tensor, block: int) -> Tensor:
    return mask.view(-1, block).any(1)


def select_blocks(scores: Tensor, topk: int) -> Tuple[Tensor, Tensor]:
    r"""Top-``k`` blocks along the last dim, ties to the lower index: indices and validity, both
    ``[B, NG, k']`` (``[B, NG, H, k']`` for per-head scores)."""
    kk = min(topk, scores.size(-1))
    val, idx = torch.sort(scores, dim=-1, descending=True, stable=True)
    return idx[..., :kk], torch.isfinite(val[..., :kk])


def selected_attention(q: Tensor, k: Tensor, v: Tensor, idx: Tensor, idx_valid: Tensor, tree: BallTree,
                       cfg: BSAConfig, scale: Optional[float] = None) -> Tensor:
    r"""Each query attends to the ``k * l'`` keys of its group's selected blocks.

    Args:
        q, k, v: ``[N_pad, H, D]``. idx, idx_valid: ``[B, NG, k']`` local selection-block indices
            shared by the heads, or ``[B, NG, H, k']`` one selection per head (``"per_head"``).

    Returns:
        ``[N_pad, H, D]``, zero at padded queries and where a head has no valid block.
    """
    h, d = q.shape[1:]
    g, ls = cfg.group_size, cfg.slc_block
    scale = d ** -0.5 if scale is None else scale
    qd, _ = _to_dense(q, tree.ptr, tree.max_slots)                      # [B, P, H, D]
    kd, _ = _to_dense(k, tree.ptr, tree.max_slots)
    vd, _ = _to_dense(v, tree.ptr, tree.max_slots)
    md, mvalid = _to_dense(tree.mask, tree.ptr, tree.max_slots)
    md = md & mvalid
    if idx.dim() == 3:  # shared by the heads
        idx, idx_valid = idx[:, :, None].expand(-1, -1, h, -1), idx_valid[:, :, None].expand(-1, -1, h, -1)
    b, ng, _, kk = idx.shape
    keys = (idx[..., None] * ls + torch.arange(ls, device=idx.device)).reshape(b, ng, h, kk * ls)
    kvalid = md.gather(1, keys.view(b, -1)).view(b, ng, h, kk * ls) & idx_valid.repeat_interleave(ls, -1)
    bi = torch.arange(b, device=idx.device)[:, None, None, None]
    hi = torch.arange(h, device=idx.device)[None, None, :, None]
    ks, vs = kd[bi, keys, hi], vd[bi, keys, hi]                          # [B, NG, H, K, D]
    qg = qd.view(b, ng, g, h, d)
    acc = _acc(q.dtype)
    logits = scale * torch.einsum("bnghd,bnhkd->bnhgk", qg.to(acc), ks.to(acc))
    p = _masked_softmax(logits, kvalid[:, :, :, None, :])
    od = torch.einsum("bnhgk,bnhkd->bnghd", p, vs.to(acc)).to(q.dtype).reshape(b, ng * g, h, d)
    return _from_dense(od, tree.ptr, tree.max_slots, tree.num_slots) * tree.mask.view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Full attention (the peer, and the "full" model) and the gated sum
# ---------------------------------------------------------------------------------------------
def full_attention(q: Tensor, k: Tensor, v: Tensor, tree: BallTree, scale: Optional[float] = None) -> Tensor:
    r"""Softmax attention over every valid point of the query's cloud (SDPA on the dense layout)."""
    qd, _ = _to_dense(q, tree.ptr, tree.max_slots)
    kd, _ = _to_dense(k, tree.ptr, tree.max_slots)
    vd, _ = _to_dense(v, tree.ptr, tree.max_slots)
    md, mvalid = _to_dense(tree.mask, tree.ptr, tree.max_slots)
    attn_mask = (md & mvalid)[:, None, None, :]
    od = F.scaled_dot_product_attention(qd.transpose(1, 2), kd.transpose(1, 2), vd.transpose(1, 2),
                                        attn_mask=attn_mask, scale=scale).transpose(1, 2)
    return _from_dense(od, tree.ptr, tree.max_slots, tree.num_slots) * tree.mask.view(-1, 1, 1)


def bsa_reference(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree: BallTree, cfg: BSAConfig, *,
                  sigma: Tensor, gates: Tensor, k_cmp: Optional[Tensor] = None,
                  v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None,
                  return_branches: bool = False):
    r"""The three gated branches of BSA.

    Args:
        q, k, v: ``[N_pad, H, D]`` tree order. pos: ``[N_pad, d]``. sigma: ``[H]``.
        gates: ``[N_pad, H, B]`` branch weights (ball, compression, selection and, with
            ``cfg.cmp_window``, coarse: ``B = cfg.num_branches``), already squashed.
        k_cmp, v_cmp: ``[N_pad // s, H, D]`` compressed keys/values (e.g. from an MLP); mean
            pooling when omitted. cmp_mask: ``[N_pad // s]`` (derived from the tree when omitted).

    Returns:
        ``[N_pad, H, D]`` (zero at padded slots); with ``return_branches`` also a dict of the
        branch outputs and the selected block indices (``[B, NG, k']``, or ``[B, NG, H, k']`` with
        ``cfg.selection == "per_head"``).
    """
    return compose(REFERENCE, q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                   cmp_mask=cmp_mask, return_branches=return_branches)


class ReferenceBranches(Branches):
    r"""The readable branches of this module as ``compose.Branches`` (the oracle of the others)."""

    def ball(self, q, k, v, pos, sigma, tree, cfg):
        return ball_attention(q, k, v, pos, sigma, tree.mask, cfg.ball_size)

    def pool(self, k, v, tree, block, stride):
        return compress_mean(k, v, tree.mask, tree.slot_batch, block, stride)

    def group_queries(self, q, tree, q_unit):
        if q_unit == 1:
            return q
        wq = tree.mask.view(-1, q_unit, 1, 1).to(q.dtype)
        return (q.view(-1, q_unit, *q.shape[1:]) * wq).sum(1) / wq.sum(1).clamp_min(1.0)

    def global_branches(self, q, k, v, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg):
        o_c, p_cmp = compressed_attention(q_cmp, k_cmp, v_cmp, cmp_mask, tree, cfg.cmp_stride, return_probs=True,
                                          window=cfg.cmp_window, return_logits=cfg.selection == "per_head")
        with torch.no_grad():
            idx, idx_valid = select_blocks(selection_scores(p_cmp, tree, cfg, q_unit), cfg.topk)
        o_slc = selected_attention(q, k, v, idx, idx_valid, tree, cfg)
        return o_c, o_slc, dict(idx=idx, idx_valid=idx_valid)

    def coarse(self, q_cmp, k_crs, v_crs, crs_mask, tree, stride, q_unit):
        return compressed_attention(q_cmp, k_crs, v_crs, crs_mask, tree, stride)

    def combine(self, o_ball, o_c, o_slc, gates, tree, q_unit):
        return (gates[..., 0:1] * o_ball + gates[..., 1:2] * per_slot(o_c, tree.mask, q_unit)
                + gates[..., 2:3] * o_slc)



REFERENCE = ReferenceBranches()
