"""The peer a user would write: BSA on one cloud with FlexAttention (torch.nn.attention.flex_attention).

- ball branch: flex_attention with a ball block mask and the distance bias as ``score_mod``;
- compression branch: flex_attention of the queries (or pooled group queries) over the mean-pooled
  keys, ``return_lse=True`` for the selection;
- selection: importance per group computed in PyTorch in query chunks (never the whole
  ``[N, N/l]`` matrix at once), ``torch.topk``;
- selected branch: flex_attention with a BlockMask built directly from the top-k indices at 16 x 16
  blocks (flex's smallest tile) and an exact ``mask_mod`` (the key's block is one of the group's);
- gated sum in PyTorch. Block masks count as part of the op (they depend on the data).
Single cloud, padding-free sizes (N a multiple of the ball size), as in the benchmark.
"""
from __future__ import annotations

import torch

_FN = {}
# flex's smallest tiles for the selection mask (forward and both backward loops)
_SLC_OPTS = {"BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_M1": 16, "BLOCK_N1": 16, "BLOCK_M2": 16, "BLOCK_N2": 16}


def _flex():
    from torch.nn.attention.flex_attention import flex_attention
    if "fn" not in _FN:
        _FN["fn"] = torch.compile(flex_attention, dynamic=False) if torch.cuda.is_available() else flex_attention
    return _FN["fn"]


def _ball_mask(n, m, device):
    from torch.nn.attention.flex_attention import BlockMask
    # blocks of 128 tile the balls of 256 exactly: each q block sees the 2 kv blocks of its ball
    bs = 128 if m % 128 == 0 else m
    per = m // bs
    nqb = n // bs
    qb = torch.arange(nqb, device=device)
    first = (qb // per) * per
    idx = first[:, None] + torch.arange(per, device=device)
    full = torch.zeros(1, 1, nqb, nqb, device=device, dtype=torch.int32)  # flex wants [.., Q, KV] indices
    full[0, 0, :, :per] = idx.int()
    cnt = torch.full((1, 1, nqb), per, device=device, dtype=torch.int32)

    def ball(b, h, qi, ki):
        return qi // m == ki // m
    return BlockMask.from_kv_blocks(cnt, full, BLOCK_SIZE=(bs, bs), mask_mod=ball, seq_lengths=(n, n))


def _selection_mask(idx, n, g, ls, device, bs=16):
    r"""BlockMask of ``bs x bs`` tiles: a q tile (bs // g groups) sees the union of its groups' blocks."""
    from torch.nn.attention.flex_attention import BlockMask
    ng, k = idx.shape
    per = bs // g
    kvb = (idx.long() * ls) // bs                                   # [NG, k] kv tile of each block
    kvb = kvb.view(ng // per, per * k)
    kvb, _ = kvb.sort(-1)
    dup = torch.zeros_like(kvb, dtype=torch.bool)
    dup[:, 1:] = kvb[:, 1:] == kvb[:, :-1]
    kvb = torch.where(dup, torch.iinfo(torch.int32).max, kvb).sort(-1).values
    cnt = (~dup).sum(-1).int()
    sel = idx.long()

    def mask_mod(b, h, qi, ki):
        kb = ki // ls
        row = sel[qi // g]
        hit = row[0] == kb
        for j in range(1, k):
            hit = hit | (row[j] == kb)
        return hit
    ind = torch.zeros(n // bs, n // bs, device=device, dtype=torch.int32)
    ind[:, :kvb.size(1)] = kvb.clamp_max(n // bs - 1).int()
    return BlockMask.from_kv_blocks(cnt[None, None], ind[None, None],
                                    BLOCK_SIZE=(bs, bs), mask_mod=mask_mod, seq_lengths=(n, n))


def flex_bsa(q, k, v, pos, sigma, gates, cfg, chunk=8192, slc_tile=16):
    r"""BSA of one cloud (``q, k, v [N, H, D]`` tree order, no padding) with FlexAttention."""
    n, h, d = q.shape
    g, l, ls, m = cfg.group_size, cfg.cmp_block, cfg.slc_block, cfg.ball_size
    fa = _flex()
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [1, H, N, D]
    px, py, pz = (pos[:, i].contiguous() for i in range(3))

    def bias(score, b, hh, qi, ki):
        dx, dy, dz = px[qi] - px[ki], py[qi] - py[ki], pz[qi] - pz[ki]
        return score + sigma[hh] * torch.sqrt(dx * dx + dy * dy + dz * dz)
    o_ball = fa(t(q), t(k), t(v), score_mod=bias, block_mask=_ball_mask(n, m, q.device))[0].transpose(0, 1)

    kc = k.view(n // l, l, h, d).mean(1)
    vc = v.view(n // l, l, h, d).mean(1)
    qc = q.view(n // g, g, h, d).mean(1) if cfg.group_compression else q
    o_c, lse = fa(t(qc), t(kc), t(vc), return_lse=True)
    o_c = o_c[0].transpose(0, 1)
    o_cmp = o_c.repeat_interleave(g, 0) if cfg.group_compression else o_c

    with torch.no_grad():  # importance per group, chunked over queries, then top-k
        scale = d ** -0.5
        qpg = qc.size(0) // (n // g)
        idx = []
        for s0 in range(0, qc.size(0), chunk):
            qq = qc[s0:s0 + chunk].transpose(0, 1).float()             # [H, c, D]
            p = torch.exp(scale * qq @ kc.transpose(0, 1).float().transpose(1, 2) - lse[0, :, s0:s0 + chunk, None])
            sc = p.sum(0).view(-1, qpg, n // l).sum(1)                 # [c / qpg, NB]
            idx.append(sc.topk(min(cfg.topk, n // ls), dim=-1).indices)
        idx = torch.cat(idx).int()
    opts = _SLC_OPTS if torch.cuda.is_available() and slc_tile == 16 else None
    o_slc = fa(t(q), t(k), t(v), block_mask=_selection_mask(idx, n, g, ls, q.device, slc_tile), kernel_options=opts)
    o_slc = o_slc[0].transpose(0, 1)
    return gates[..., 0:1] * o_ball + gates[..., 1:2] * o_cmp + gates[..., 2:3] * o_slc
