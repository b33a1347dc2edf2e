"""The fast CPU path of BSA: the same function as ``reference.bsa_reference``, in few large ops.

``backend="cpu"`` (what ``"auto"`` picks off CUDA). The ball and compression branches are
hand-written attentions over chunks (of balls, of query rows) whose backward recomputes the
probabilities per chunk, so that memory stays linear in N (the ball branch's distance bias needs a
gradient; the compression branch's probabilities also give the ``"shared"`` selection scores, so the
``N x N / l`` scores are computed once for both). The selected branch is one batched
``scaled_dot_product_attention`` call (flash-style CPU kernel), padding entering as an additive float
mask. Windows (``cfg.cmp_window``) are a reshape of the per-cloud dense layout. Every input stays in
tree order; the top-k indices are constants, as in the reference. Measurements: docs/benchmarks.md
(CPU section).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor

from .balltree import BallTree
from .compose import Branches, compose
from .reference import BSAConfig, _acc, _dense_index, compress_mean

__all__ = ["bsa_cpu", "ball_attention_cpu"]

#: score elements per chunk (selection-score pass, ball branch):
#: 1M fp32 values (4 MiB): cache-sized pieces, reused by the allocator, never N x N / l at once
CHUNK_ELEMS = 1 << 20
#: score elements per chunk of the compression branch (``_CompressedAttention``): 512K fp32 values
#: (2 MiB, one core's L2), 32 query rows of 8 heads x 2048 blocks at 16k points
CMP_CHUNK_ELEMS = 1 << 19


def _for_chunks(fn, starts, device: torch.device) -> None:
    r"""Runs ``fn(start)`` for every chunk start, each chunk's ops single-threaded and the chunks
    spread over ``torch.get_num_threads()`` Python threads (ops release the GIL).

    Chunks write disjoint slices of preallocated outputs. One intra-op parallel region per small op
    costs a barrier each; on a machine whose other processes hold the cores, every barrier waits for
    a descheduled thread (docs/benchmarks.md). Coarse chunk-level parallelism has two barriers in
    all. Plain loop when compiling, on one thread, or off the CPU. While the pool runs, the
    process-wide intra-op thread count is 1 (restored afterwards).
    """
    starts = list(starts)
    threads = 1 if torch.compiler.is_compiling() or device.type != "cpu" else torch.get_num_threads()
    if threads == 1 or len(starts) < 2:
        for s0 in starts:
            fn(s0)
        return
    from concurrent.futures import ThreadPoolExecutor
    grad = torch.is_grad_enabled()  # thread-local: the workers take the caller's mode

    def run(s0):
        with torch.set_grad_enabled(grad):
            fn(s0)
    torch.set_num_threads(1)
    try:
        with ThreadPoolExecutor(min(threads, len(starts))) as pool:
            for _ in pool.map(run, starts):  # re-raises a chunk's exception here
                pass
    finally:
        torch.set_num_threads(threads)


def _neg_mask(valid: Tensor, dtype: torch.dtype) -> Tensor:
    # finite fill (not -inf): a row with no valid key gives a finite (dropped) output instead of NaN
    return torch.zeros(valid.shape, dtype=dtype, device=valid.device).masked_fill_(~valid, torch.finfo(dtype).min)


# ---------------------------------------------------------------------------------------------
# Ball branch
# ---------------------------------------------------------------------------------------------
class _BallAttention(torch.autograd.Function):
    r"""Softmax attention inside balls with an additive bias ``sigma_h * dist + pad``, by hand.

    SDPA cannot give the gradient of its mask without falling back to its unfused math path. This
    does that path's work in chunks of balls (about ``CHUNK_ELEMS`` scores each, so that the score
    buffers are reused from the allocator and stay in the last-level cache instead of paging in
    ``num_balls * H * m * m`` fresh floats): the bias is one ``addcmul`` into the logits buffer,
    ``baddbmm_`` adds ``q k^T`` in place, and the backward recomputes the probabilities (nothing of
    size ``m * m`` is kept) and gets ``d sigma`` and ``d dist`` as batched matmuls. Products with the
    head dimension give it as their output's rows (``V^T P^T``, ``dO^T P``, ...), as in
    ``_CompressedAttention``.
    """

    @staticmethod
    def _probs(q3, k3, sigma, dist, pad, scale):
        cb, m = dist.shape[:2]
        h = sigma.numel()
        logits = torch.addcmul(pad, sigma.view(1, h, 1, 1), dist[:, None]).view(cb * h, m, m)
        return torch.softmax(logits.baddbmm_(q3 * scale, k3.transpose(1, 2)), dim=-1)

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, sigma: Tensor, dist: Tensor, pad: Tensor) -> Tensor:
        nb, h, m, d = q.shape
        scale = d ** -0.5
        step = max(1, CHUNK_ELEMS // (h * m * m))
        q3, k3, v3 = (t.reshape(nb * h, m, d) for t in (q, k, v))
        o = torch.empty_like(q3)

        def chunk(b0):
            b1 = min(nb, b0 + step)
            r = slice(b0 * h, b1 * h)
            p = _BallAttention._probs(q3[r], k3[r], sigma, dist[b0:b1], pad[b0:b1], scale)
            o[r] = torch.bmm(v3[r].transpose(1, 2), p.transpose(1, 2)).transpose(1, 2)
        _for_chunks(chunk, range(0, nb, step), q.device)
        ctx.save_for_backward(q3, k3, v3, sigma, dist, pad, o)
        ctx.shape = (nb, h, m, d)
        return o.view(nb, h, m, d)

    @staticmethod
    def backward(ctx, do: Tensor):
        q3, k3, v3, sigma, dist, pad, o = ctx.saved_tensors
        nb, h, m, d = ctx.shape
        scale = d ** -0.5
        step = max(1, CHUNK_ELEMS // (h * m * m))
        do = do.reshape(nb * h, m, d)
        delta = (do * o).sum(-1, keepdim=True)                    # rowsum(dO * O)
        dq, dk, dv = torch.empty_like(q3), torch.empty_like(k3), torch.empty_like(v3)
        dsigma = sigma.new_zeros(-(-nb // step), h)               # one row per chunk, summed after
        ddist = torch.empty_like(dist) if ctx.needs_input_grad[4] else None

        def chunk(b0):
            b1 = min(nb, b0 + step)
            r = slice(b0 * h, b1 * h)
            p = _BallAttention._probs(q3[r], k3[r], sigma, dist[b0:b1], pad[b0:b1], scale)
            dv[r] = torch.bmm(do[r].transpose(1, 2), p).transpose(1, 2)
            ds = torch.bmm(do[r], v3[r].transpose(1, 2)).sub_(delta[r]).mul_(p)   # dS = P (dP - delta)
            dq[r] = torch.bmm(k3[r].transpose(1, 2), ds.transpose(1, 2)).transpose(1, 2).mul_(scale)
            dk[r] = torch.bmm(q3[r].transpose(1, 2), ds).transpose(1, 2).mul_(scale)
            ds4 = ds.view(b1 - b0, h, m * m)
            torch.sum(torch.bmm(ds4, dist[b0:b1].reshape(b1 - b0, m * m, 1)).view(b1 - b0, h), 0,
                      out=dsigma[b0 // step])
            if ddist is not None:
                torch.bmm(sigma.view(1, 1, h).expand(b1 - b0, 1, h), ds4, out=ddist[b0:b1].view(b1 - b0, 1, m * m))
        _for_chunks(chunk, range(0, nb, step), q3.device)
        dsigma = dsigma.sum(0)
        return dq.view(nb, h, m, d), dk.view(nb, h, m, d), dv.view(nb, h, m, d), dsigma, ddist, None


def ball_attention_cpu(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor,
                       ball_size: int) -> Tensor:
    r"""``reference.ball_attention`` over ``[num_balls, H, m, D]`` in one batched pass.

    The bias ``sigma_h * ||p_i - p_j||`` uses exact fp32 distances, padded keys get the dtype's
    minimum. Returns ``[N_pad, H, D]``, zero at padded queries.
    """
    with torch.autocast(q.device.type, enabled=False):  # 16-bit inputs are computed in fp32 here
        return _ball_attention(q, k, v, pos, sigma, mask, ball_size)


def _ball_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor,
                    ball_size: int) -> Tensor:
    n, h, d = q.shape
    m = ball_size
    acc = _acc(q.dtype)
    qb, kb, vb = (t.to(acc).reshape(-1, m, h, d).transpose(1, 2).contiguous() for t in (q, k, v))  # [nb, H, m, D]
    pb = pos.to(_acc(pos.dtype)).reshape(-1, m, pos.size(-1))
    dist = torch.cdist(pb, pb, compute_mode="donot_use_mm_for_euclid_dist").to(acc)  # [nb, m, m]
    pad = _neg_mask(mask.view(-1, 1, 1, m), acc)
    out = _BallAttention.apply(qb, kb, vb, sigma.to(acc), dist, pad)               # [nb, H, m, D]
    return out.transpose(1, 2).reshape(n, h, d).to(q.dtype) * mask.view(-1, 1, 1)


# ---------------------------------------------------------------------------------------------
# Per-cloud dense layout, cut into windows
# ---------------------------------------------------------------------------------------------
def _windowed(x: Tensor, tree: BallTree, unit: int, length: int, window: int) -> Tuple[Tensor, Tensor]:
    r"""Tree-ordered units ``[U, ...]`` -> ``[B * length // window, window // unit, ...]`` (cloud after
    cloud, each cut into aligned windows of ``window`` slots) and unit validity of the same shape[:2].

    ``length`` is ``tree.max_slots`` rounded up to a multiple of ``window``. A single cloud with no
    window padding is a view.
    """
    nu, wu = length // unit, window // unit
    if tree.num_clouds == 1 and x.size(0) == nu:
        return x.reshape((-1, wu) + tuple(x.shape[1:])), torch.ones(length // window, wu, dtype=torch.bool,
                                                                 device=x.device)
    idx, valid = _dense_index(tree.ptr, length, unit, x.size(0))  # [B, nu]
    return x[idx].view((-1, wu) + tuple(x.shape[1:])), valid.view(-1, wu)


def _unwindowed(xd: Tensor, tree: BallTree, unit: int, length: int) -> Tensor:
    r"""Inverse of ``_windowed`` for ``[B * length // window, window // unit, ...]``: tree-ordered
    ``[N_pad // unit, ...]`` (a gather, so the backward is an index_add, not a scatter of zeros)."""
    num = tree.num_slots // unit
    flat = xd.reshape((-1,) + tuple(xd.shape[2:]))
    if tree.num_clouds == 1 and flat.size(0) == num:
        return flat
    first = torch.arange(num, device=xd.device) * unit
    b = tree.slot_batch[first]
    local = (first - tree.ptr[b]) // unit
    return flat[b * (length // unit) + local]


def _unit_valid(mask: Tensor, unit: int) -> Tensor:
    return mask.view(-1, unit).any(1)


# ---------------------------------------------------------------------------------------------
# Compression branch (+ the selection it drives)
# ---------------------------------------------------------------------------------------------
def _workers(num_chunks: int, device: torch.device) -> int:
    r"""How many workers ``_for_workers`` uses for ``num_chunks`` chunks."""
    if torch.compiler.is_compiling() or device.type != "cpu":
        return 1
    return max(1, min(torch.get_num_threads(), num_chunks))


def _for_workers(fn, starts, device: torch.device) -> None:
    r"""Runs ``fn(worker, start)`` for every chunk start on ``_workers`` worker threads, each with its
    own index (so that it can accumulate into its own buffer), the starts handed out one at a time
    (a worker whose core another process holds takes fewer)."""
    starts = list(starts)
    nw = _workers(len(starts), device)
    if nw == 1:
        for s0 in starts:
            fn(0, s0)
        return
    import threading
    todo, lock = iter(starts), threading.Lock()

    def work(w):
        while True:
            with lock:
                s0 = next(todo, None)
            if s0 is None:
                return
            fn(w, s0)
    _for_chunks(work, range(nw), device)


class _SharedSelection:
    r"""The ``"shared"`` selection rule over chunks of compressed-attention probabilities, as
    ``reference.selection_scores`` and ``select_blocks`` (the same operations in the same order, ties
    to the lower block index): the probabilities summed over heads and the group's valid queries,
    then over the compression blocks that overlap each selection block; top-``k`` by ``_rank_key``.

    ``chunk(p, r0)`` takes the probabilities ``[BW, H, c, Wk]`` of window rows ``r0 : r0 + c`` (``c`` a
    multiple of the group's rows) and writes the rows' top-``k`` into buffers allocated up front
    (small tensors kept between the chunks' big temporaries fragment the heap).
    """

    def __init__(self, tree: BallTree, cfg: BSAConfig, q_unit: int, length: int, window: int, kok: Tensor,
                 wq: int):
        g, s, l, ls = cfg.group_size, cfg.cmp_stride, cfg.cmp_block, cfg.slc_block
        bw, wk = kok.shape
        dev = kok.device
        ws = window // ls
        self.gq = g // q_unit                                     # query rows per group
        # query rows that count: the unit has a valid slot and lies inside its cloud
        qmask, qin = _windowed(_unit_valid(tree.mask, q_unit), tree, q_unit, length, window)
        self.qok = (qmask & qin).to(torch.float32)                # [BW, Wq]
        smask, sin = _windowed(_unit_valid(tree.mask, ls), tree, ls, length, window)
        self.sok = smask & sin                                    # [BW, Ws]
        self.overlap = None
        if not l == s == ls:  # compression blocks overlapping each selection block, within the window
            cb = torch.arange(wk, device=dev) * s
            sb = torch.arange(ws, device=dev) * ls
            self.overlap = ((cb[:, None] < sb[None] + ls) & (sb[None] < cb[:, None] + l)).float()
        self.kk = min(cfg.topk, ws)
        self.lower_first = ws - 1 - torch.arange(ws, device=dev)
        self.idx = torch.empty(bw, wq // self.gq, self.kk, dtype=torch.long, device=dev)
        self.top_key = torch.empty(bw, wq // self.gq, self.kk, dtype=torch.long, device=dev)

    def chunk(self, p: Tensor, r0: int) -> None:
        bw, _, c, wk = p.shape
        gq = self.gq
        ph = p.float().sum(1).mul_(self.qok[:, r0:r0 + c, None])          # [BW, c, Wk]
        ph = ph.view(bw, -1, gq, wk).sum(2)                                # [BW, c / gq, Wk]
        scores = ph if self.overlap is None else ph @ self.overlap         # [BW, c / gq, Ws]
        key = _rank_key(scores.contiguous(), self.sok[:, None, :], self.lower_first)
        val, top = key.topk(self.kk, dim=-1)
        self.idx[:, r0 // gq:(r0 + c) // gq] = top             # [BW, window // g, kk], window-local
        self.top_key[:, r0 // gq:(r0 + c) // gq] = val


class _CompressedAttention(torch.autograd.Function):
    r"""Softmax attention of queries ``[BW, H, Wq, D]`` over keys and values ``[BW, H, Wk, D]`` with an
    additive key bias ``[BW * H, 1, Wk]``, in chunks of query rows; optionally also the selection
    (``_SharedSelection``) from the same probabilities, so that the ``Wq x Wk`` scores are computed
    once for both.

    Every product with the small head dimension ``D`` has ``D`` as the row count of its output
    (``V^T P^T``, ``dO^T P``, ``K^T dS^T``, ``(q s)^T dS``): MKL's kernels for an output of ``D``
    columns are several times slower on these shapes (docs/perf-notes.md). The backward recomputes
    the probabilities per chunk (memory linear in the number of queries) and sums ``dK^T``, ``dV^T``
    in one buffer per worker thread.
    """

    @staticmethod
    def _probs(qs, kt, kbias, r0, r1):
        return torch.softmax(torch.baddbmm(kbias, qs[:, r0:r1], kt), dim=-1)   # [BW * H, c, Wk]

    @staticmethod
    def _rows(bh: int, wk: int, unit: int) -> int:
        return max(unit, CMP_CHUNK_ELEMS // max(1, bh * wk) // unit * unit)

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, kbias: Tensor, sel: Optional[_SharedSelection]) -> Tensor:
        bw, h, wq, d = q.shape
        wk, bh = k.size(2), bw * h
        qs = torch.mul(q, d ** -0.5).reshape(bh, wq, d)                        # [BH, Wq, D]
        kt = k.transpose(-1, -2).reshape(bh, d, wk)                            # [BH, D, Wk]
        vt = v.transpose(-1, -2).reshape(bh, d, wk)
        o = torch.empty(bh, wq, d, dtype=q.dtype, device=q.device)
        rows = _CompressedAttention._rows(bh, wk, 1 if sel is None else sel.gq)

        def chunk(r0):
            r1 = min(wq, r0 + rows)
            p = _CompressedAttention._probs(qs, kt, kbias, r0, r1)
            o[:, r0:r1] = torch.bmm(vt, p.transpose(1, 2)).transpose(1, 2)
            if sel is not None:
                sel.chunk(p.view(bw, h, r1 - r0, wk), r0)
        _for_chunks(chunk, range(0, wq, rows), q.device)
        ctx.save_for_backward(qs, kt, vt, kbias, o)
        ctx.shape = (bw, h, wq, d, wk)
        return o.view(bw, h, wq, d)

    @staticmethod
    def backward(ctx, do: Tensor):
        qs, kt, vt, kbias, o = ctx.saved_tensors
        bw, h, wq, d, wk = ctx.shape
        bh, scale = bw * h, d ** -0.5
        do = do.reshape(bh, wq, d)
        delta = (do * o).sum(-1, keepdim=True)                                 # rowsum(dO * O)
        rows = _CompressedAttention._rows(bh, wk, 1)
        starts = range(0, wq, rows)
        nw = _workers(len(starts), qs.device)
        dq = torch.empty_like(qs)
        dkt = qs.new_zeros(nw, bh, d, wk)
        dvt = qs.new_zeros(nw, bh, d, wk)

        def chunk(w, r0):
            r1 = min(wq, r0 + rows)
            p = _CompressedAttention._probs(qs, kt, kbias, r0, r1)
            doc = do[:, r0:r1]
            dvt[w].baddbmm_(doc.transpose(1, 2), p)
            ds = torch.bmm(doc, vt).sub_(delta[:, r0:r1]).mul_(p)              # dS = P (dP - delta)
            dq[:, r0:r1] = torch.bmm(kt, ds.transpose(1, 2)).transpose(1, 2).mul_(scale)
            dkt[w].baddbmm_(qs[:, r0:r1].transpose(1, 2), ds)                  # qs carries the scale
        _for_workers(chunk, starts, qs.device)
        dk = dkt.sum(0).transpose(1, 2).reshape(bw, h, wk, d)
        dv = dvt.sum(0).transpose(1, 2).reshape(bw, h, wk, d)
        return dq.view(bw, h, wq, d), dk, dv, None, None


def _compressed(q: Tensor, kc: Tensor, vc: Tensor, kvalid: Tensor, tree: BallTree, k_unit: int,
                window: Optional[int], cfg: Optional[BSAConfig] = None
                ) -> Tuple[Tensor, Optional[Tuple[Tensor, Tensor]]]:
    r"""Queries ``[Q, H, D]`` (tree order, unit ``N_pad // Q``) over compressed keys ``[N_pad // k_unit,
    H, D]`` of their cloud (window). Returns the tree-ordered output ``[Q, H, D]`` and, with ``cfg``,
    the selection of ``cfg.selection``'s rule (``_selection_slots``; the ``"shared"`` rule from this
    pass's own probabilities)."""
    h, d = q.shape[1:]
    q_unit = tree.num_slots // q.size(0)
    w = tree.max_slots if window is None else window
    length = -(-tree.max_slots // w) * w
    qw, qv = _windowed(q, tree, q_unit, length, w)           # [BW, Wq, H, D]
    kw, kv = _windowed(kc, tree, k_unit, length, w)          # [BW, Wk, H, D]
    vw, _ = _windowed(vc, tree, k_unit, length, w)
    kmask, _ = _windowed(kvalid, tree, k_unit, length, w)
    kok = kmask & kv                                          # [BW, Wk]
    bw, wq, wk = qw.size(0), qw.size(1), kw.size(1)
    qt, kt, vt = qw.transpose(1, 2), kw.transpose(1, 2), vw.transpose(1, 2)  # [BW, H, W*, D]
    # invalid blocks through an additive mask inside baddbmm: exp(min - max) is exactly 0, as the
    # reference's masked_fill + re-mask; rows without a valid block only occur outside any cloud,
    # where the query mask zeroes them
    kbias = _neg_mask(kok, q.dtype)[:, None, None, :].expand(bw, h, 1, wk).reshape(bw * h, 1, wk)
    sel = None
    if cfg is not None and cfg.selection != "per_head":
        sel = _SharedSelection(tree, cfg, q_unit, length, w, kok, wq)
    o = _CompressedAttention.apply(qt, kt, vt, kbias, sel)
    o = _unwindowed(o.transpose(1, 2), tree, q_unit, length)
    if cfg is None:
        return o, None
    if sel is None:
        return o, _select_per_head(qt.detach(), kt.detach(), kok, tree, cfg, q_unit, length, w)
    return o, _selection_slots(sel.idx, sel.top_key, tree, cfg, length, w)


def _selection_slots(idx: Tensor, top_key: Tensor, tree: BallTree, cfg: BSAConfig, length: int,
                     window: int) -> Tuple[Tensor, Tensor]:
    r"""Window-local top-``k`` blocks ``[BW, window // g, (H,) k']`` and their rank keys -> per
    tree-ordered group ``[N_pad // g, (H,) k']`` the global slot of each block's first key and the
    blocks' validity (a non-negative key)."""
    g, ls = cfg.group_size, cfg.slc_block
    # validity from the keys once, after the chunk loop: inductor's C++ codegen failed to compile
    # per-chunk `val >= 0` stores (mixed int64/float vector masks)
    ok = top_key >= 0
    tail = (1,) * (idx.dim() - 1)
    offset = torch.arange(idx.size(0), device=idx.device) % (length // window) * (window // ls)  # window's first block
    first = (idx + offset.view(-1, *tail)) * ls
    first = _unwindowed(first.view((-1, window // g) + tuple(idx.shape[2:])), tree, g, length)  # [N_pad // g, (H,) k']
    ok = _unwindowed(ok.view((-1, window // g) + tuple(idx.shape[2:])), tree, g, length)
    gb = tree.slot_batch[torch.arange(first.size(0), device=first.device) * g]
    return first + tree.ptr[gb].view(-1, *tail[1:]), ok


def _rank_key_signed(scores: Tensor, valid: Tensor, lower_first: Tensor) -> Tensor:
    r"""``_rank_key`` for scores of any sign (the per-head rule's logits): the fp32 bit pattern with
    the magnitude bits of negative values flipped orders as the values do, shifted to ``[0, 2^32)``;
    31 low bits break ties to the lower block index. Scores must not be ``-0.0`` (add ``0.0``)."""
    bits = scores.view(torch.int32)
    ordered = (bits ^ ((bits >> 31) & 0x7FFFFFFF)).to(torch.int64) + (1 << 31)
    return torch.where(valid, (ordered << 31) | lower_first, -1 - (lower_first.size(0) - 1 - lower_first))


def _rank_key(scores: Tensor, valid: Tensor, lower_first: Tensor) -> Tensor:
    r"""An int64 key whose ``topk`` is the reference's stable descending sort: scores are sums of
    probabilities (``>= +0.0``), whose fp32 bit patterns order as the values do; the low 32 bits
    break ties to the lower block index. Invalid blocks get negative keys (after every valid one,
    lower index first). ``topk`` on it costs a fraction of a full stable sort."""
    bits = scores.view(torch.int32).to(torch.int64)
    return torch.where(valid, (bits << 32) | lower_first, -1 - (lower_first.size(0) - 1 - lower_first))


@torch.no_grad()
def _select_per_head(qt: Tensor, kt: Tensor, kok: Tensor, tree: BallTree, cfg: BSAConfig, q_unit: int,
                     length: int, window: int) -> Tuple[Tensor, Tensor]:
    r"""Top-``k`` selection blocks for ``cfg.selection == "per_head"``, in chunks of query rows: per
    head, the compressed logits summed over the group's valid queries (averaged over overlapping
    compression blocks), own ball excluded; as ``reference.selection_scores`` and ``select_blocks``.
    Returns ``[N_pad // g, H, k']`` first slots and validity (``_selection_slots``)."""
    g, s, l, ls = cfg.group_size, cfg.cmp_stride, cfg.cmp_block, cfg.slc_block
    bw, h, wq, d = qt.shape
    wk, ws = kt.size(2), window // ls
    gq = g // q_unit
    scale = d ** -0.5
    qmask, qin = _windowed(_unit_valid(tree.mask, q_unit), tree, q_unit, length, window)
    qok = (qmask & qin).to(torch.float32)                     # [BW, Wq]
    smask, sin = _windowed(_unit_valid(tree.mask, ls), tree, ls, length, window)
    sok = smask & sin                                         # [BW, Ws]
    identity = l == s == ls
    if not identity:
        cb = torch.arange(wk, device=qt.device) * s
        sb = torch.arange(ws, device=qt.device) * ls
        overlap = ((cb[:, None] < sb[None] + ls) & (sb[None] < cb[:, None] + l)).float()
        overlap = overlap / overlap.sum(0).clamp_min(1.0)
    kk = min(cfg.topk, ws)
    lower_first = ws - 1 - torch.arange(ws, device=qt.device)
    kvalid = kok.to(torch.float32)[:, None, None, :]                       # [BW, 1, 1, Wk]
    # own ball: window-local group and block rows of the same ball (windows are whole balls)
    own = _own_ball(window // g, g, ws, ls, cfg.ball_size, qt.device)      # [Wg, Ws]
    rows = max(gq, CHUNK_ELEMS // max(1, bw * h * wk) // gq * gq)
    kt_t = kt.float().transpose(-1, -2).reshape(bw * h, d, wk)             # [BW * H, D, Wk]
    qs = scale * qt.float()
    idx = torch.empty(bw, wq // gq, h, kk, dtype=torch.long, device=qt.device)
    top_key = torch.empty(bw, wq // gq, h, kk, dtype=torch.long, device=qt.device)

    def chunk(r0):
        r1 = min(wq, r0 + rows)
        logits = torch.bmm(qs[:, :, r0:r1].reshape(bw * h, r1 - r0, d), kt_t).view(bw, h, r1 - r0, wk)
        logits = logits.mul_(kvalid).mul_(qok[:, None, r0:r1, None])
        lg = logits.view(bw, h, -1, gq, wk).sum(3)                          # [BW, H, c / gq, Wk]
        scores = lg if identity else lg @ overlap                          # [BW, H, c / gq, Ws]
        scores = scores.transpose(1, 2).add(0.0).contiguous()              # [BW, c / gq, H, Ws]
        ok = sok[:, None, None, :] & ~own[r0 // gq:r1 // gq, None, :]
        key = _rank_key_signed(scores, ok, lower_first)
        val, top = key.topk(kk, dim=-1)
        idx[:, r0 // gq:r1 // gq] = top
        top_key[:, r0 // gq:r1 // gq] = val
    _for_chunks(chunk, range(0, wq, rows), qt.device)
    return _selection_slots(idx, top_key, tree, cfg, length, window)


def _own_ball(ng: int, g: int, ns: int, ls: int, ball_size: int, device) -> Tensor:
    r"""``[ng, ns]`` bool: group ``i`` (slots from ``i * g``) and block ``j`` (from ``j * ls``) lie in
    the same ball (indices relative to a ball-aligned start)."""
    return (torch.arange(ng, device=device) * g // ball_size)[:, None] == \
        (torch.arange(ns, device=device) * ls // ball_size)[None, :]


def _selected(q: Tensor, k: Tensor, v: Tensor, first: Tensor, ok: Tensor, mask: Tensor, g: int,
              ls: int) -> Tensor:
    r"""Each group of ``g`` queries attends to the ``k' * l'`` keys of its blocks: one SDPA with the
    groups as batch over gathered ``[N_pad // g, H, k' * l', D]`` keys and values. ``first, ok``
    ``[N_pad // g, k']`` are shared by the heads, ``[N_pad // g, H, k']`` per head."""
    if first.dim() == 3:
        return _selected_per_head(q, k, v, first, ok, mask, g, ls)
    n, h, d = q.shape
    ng, kk = first.shape
    blk = (first // ls).clamp_max(n // ls - 1).view(-1)        # whole blocks: one index per l' keys
    kvalid = mask.view(-1, ls)[blk].view(ng, kk * ls) & ok.repeat_interleave(ls, 1)   # [NG, K]
    ks, vs = (t.reshape(n // ls, ls * h * d).index_select(0, blk).view(ng, kk * ls, h, d).transpose(1, 2)
              for t in (k, v))                                   # [NG, H, K, D]
    qg = q.reshape(ng, g, h, d).transpose(1, 2)                          # [NG, H, g, D]
    o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=_neg_mask(kvalid[:, None, None, :], q.dtype))
    return o.transpose(1, 2).reshape(n, h, d)


def _selected_per_head(q: Tensor, k: Tensor, v: Tensor, first: Tensor, ok: Tensor, mask: Tensor, g: int,
                       ls: int) -> Tensor:
    r"""``_selected`` with one selection per head, ``first, ok [N_pad // g, H, k']``. A head with no
    valid block (a cloud of one ball: its own ball is excluded) gives zero, as the reference."""
    n, h, d = q.shape
    ng, _, kk = first.shape
    blk = (first // ls).clamp_max(n // ls - 1)                              # [NG, H, kk]
    kvalid = mask.view(-1, ls)[blk].view(ng, h, kk * ls) & ok.repeat_interleave(ls, -1)   # [NG, H, K]
    hi = torch.arange(h, device=q.device)[None, :, None]
    ks, vs = (t.reshape(n // ls, ls, h, d)[blk, :, hi].reshape(ng, h, kk * ls, d) for t in (k, v))
    qg = q.reshape(ng, g, h, d).transpose(1, 2)                             # [NG, H, g, D]
    o = F.scaled_dot_product_attention(qg, ks, vs, attn_mask=_neg_mask(kvalid[:, :, None, :], q.dtype))
    o = o * kvalid.any(-1)[:, :, None, None].to(o.dtype)
    return o.transpose(1, 2).reshape(n, h, d)


# ---------------------------------------------------------------------------------------------
# The whole op
# ---------------------------------------------------------------------------------------------
def bsa_cpu(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree: BallTree, cfg: BSAConfig, *,
            sigma: Tensor, gates: Tensor, k_cmp: Optional[Tensor] = None, v_cmp: Optional[Tensor] = None,
            cmp_mask: Optional[Tensor] = None) -> Tensor:
    r"""BSA, the same function as ``reference.bsa_reference`` (same arguments, inputs checked by
    ``functional.bsa_attention``). Returns ``[N_pad, H, D]``, zero at padded slots.

    16-bit inputs are computed in fp32 (autocast is switched off inside: the selection keys need
    fp32 scores) and the result is cast back.
    """
    return compose(CPU, q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                   cmp_mask=cmp_mask)


class CPUBranches(Branches):
    r"""This module's branches as ``compose.Branches``: every branch accumulates in fp32 at least
    (``_acc``); outputs at query granularity combine with their slots' gates by broadcasting."""

    def context(self, q):
        return torch.autocast(q.device.type, enabled=False)

    def ball(self, q, k, v, pos, sigma, tree, cfg):
        return ball_attention_cpu(q, k, v, pos, sigma, tree.mask, cfg.ball_size)

    def pool(self, k, v, tree, block, stride):
        acc = _acc(k.dtype)
        return compress_mean(k.to(acc), v.to(acc), tree.mask, tree.slot_batch, block, stride)

    def group_queries(self, q, tree, q_unit):
        qa = q.to(_acc(q.dtype))
        if q_unit == 1:
            return qa
        h, d = q.shape[1:]
        wq = tree.mask.view(-1, q_unit, 1, 1).to(qa.dtype)
        return (qa.reshape(-1, q_unit, h, d) * wq).sum(1) / wq.sum(1).clamp_min(1.0)

    def global_branches(self, q, k, v, q_cmp, q_unit, k_cmp, v_cmp, cmp_mask, tree, cfg):
        acc = q_cmp.dtype
        o_c, (first, ok) = _compressed(q_cmp, k_cmp.to(acc), v_cmp.to(acc), cmp_mask, tree, cfg.cmp_stride,
                                       cfg.cmp_window, cfg)
        o_slc = _selected(q.to(acc), k.to(acc), v.to(acc), first, ok, tree.mask, cfg.group_size, cfg.slc_block)
        return o_c, o_slc, dict(first=first, ok=ok)

    def coarse(self, q_cmp, k_crs, v_crs, crs_mask, tree, stride, q_unit):
        return _compressed(q_cmp, k_crs, v_crs, crs_mask, tree, stride, None)[0]

    def combine(self, o_ball, o_c, o_slc, gates, tree, q_unit):
        gt = gates.to(o_slc.dtype)
        out = gt[..., 0:1] * o_ball.to(o_slc.dtype) + gt[..., 2:3] * o_slc
        return self.add_gated(out, gt[..., 1:2], o_c, tree, q_unit)

    def add_gated(self, out, gate, o, tree, q_unit):
        # a group-level output multiplies its slots' gates by broadcasting (no repeat_interleave copy)
        n, h, d = out.shape
        gate = gate.to(out.dtype).view(-1, q_unit, h, 1)
        return (out.view(-1, q_unit, h, d) + gate * o.view(-1, 1, h, d)).view(n, h, d)

    def finish(self, out, tree, dtype):
        return (out * tree.mask.view(-1, 1, 1)).to(dtype)


CPU = CPUBranches()
