"""Draws docs/img/bsa_branches.png: a car-surface cloud coloured by ball, and the keys one query group
attends to in each of BSA's three branches. Every index in the picture comes from the package's own
code (``build_ball_tree``, ``compress_mean``, ``compressed_attention``, ``selection_scores``,
``select_blocks``), on the PyTorch reference path.

    python docs/make_figures.py            # CPU, a few seconds; writes docs/img/bsa_branches.png

The queries and keys are random Fourier features of the positions, so ``q_i . k_j`` approximates a
Gaussian kernel of ``||p_i - p_j||``: attention then prefers nearby points, roughly as a trained
model does for a smooth field. With a trained model the selection is learned and need not be local.
"""
from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

from torch_geometric_bsa import BSAConfig, build_ball_tree  # noqa: E402
from torch_geometric_bsa.datasets import make_scaling_cloud  # noqa: E402
from torch_geometric_bsa.reference import (compress_mean, compressed_attention, select_blocks,  # noqa: E402
                                           selection_scores)

HERE = os.path.dirname(os.path.abspath(__file__))


def fourier_features(pos: torch.Tensor, dim: int, bandwidth: float, seed: int) -> torch.Tensor:
    r"""``[N, 1, dim]`` features with ``phi(p_i) . phi(p_j) ~ exp(-||p_i - p_j||^2 / (2 bandwidth^2))``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(pos.size(1), dim // 2, generator=g) / bandwidth
    z = pos @ w
    return (torch.cat([z.cos(), z.sin()], -1) / (dim // 2) ** 0.5)[:, None, :]


def branch_keys(num_points=4096, seed=3, cfg=BSAConfig(ball_size=256, cmp_block=16, slc_block=16, topk=8,
                                                      group_size=16), query_ball=5, sharpness=40.0):
    r"""Positions in tree order and, for one query group, the slots each branch attends to."""
    data = make_scaling_cloud(num_points, seed=seed)
    pos = data.pos - data.pos.mean(0)
    tree = build_ball_tree(pos, None, cfg.ball_size)
    pos_t = tree.to_tree(pos)
    feat = fourier_features(pos_t, 64, bandwidth=0.25 * float(pos.std()), seed=seed)
    q, k = feat * sharpness ** 0.5, feat * sharpness ** 0.5
    v = torch.zeros_like(k)
    # the query group: the middle group of one ball
    m, g = cfg.ball_size, cfg.group_size
    query_ball = min(query_ball, tree.num_balls - 1)
    group = query_ball * (m // g) + (m // g) // 2
    q_slots = torch.arange(group * g, (group + 1) * g)
    # ball branch: every valid slot of the query's ball
    ball_slots = torch.arange(query_ball * m, (query_ball + 1) * m)
    # compression branch: one pooled key per block; probability mass of the group on each block
    k_cmp, v_cmp, cmp_mask = compress_mean(k, v, tree.mask, tree.slot_batch, cfg.cmp_block, cfg.cmp_stride)
    _, p = compressed_attention(q, k_cmp, v_cmp, cmp_mask, tree, cfg.cmp_stride, return_probs=True)
    block_mass = p[0, :, q_slots].sum((0, 1))                          # [NB]
    block_pos = compress_mean(pos_t[:, None], pos_t[:, None], tree.mask, tree.slot_batch, cfg.cmp_block,
                              cfg.cmp_stride)[0][:, 0]                 # block centroids
    # selection branch: the group's top-k blocks by that mass
    idx, valid = select_blocks(selection_scores(p, tree, cfg, 1), cfg.topk)
    blocks = idx[0, group][valid[0, group]]
    slc_slots = (blocks[:, None] * cfg.slc_block + torch.arange(cfg.slc_block)).flatten()
    return dict(pos_t=pos_t, mask=tree.mask, ball_id=torch.arange(tree.num_slots) // m, q_slots=q_slots,
                ball_slots=ball_slots, block_pos=block_pos, block_mass=block_mass, cmp_mask=cmp_mask,
                slc_slots=slc_slots, cfg=cfg, num_points=num_points)


def draw(out: str, **kw) -> None:
    r = branch_keys(**kw)
    pos, mask, cfg = r["pos_t"], r["mask"], r["cfg"]
    valid = mask.nonzero().squeeze(1)
    xyz = lambda s: (pos[s, 0], pos[s, 1], pos[s, 2])  # noqa: E731  (car length along x, height along z)
    fig = plt.figure(figsize=(11, 7.5))
    titles = [f"ball tree: {int(mask.sum())} points, {int(r['ball_id'][-1]) + 1} balls of {cfg.ball_size}",
              f"ball branch: the query's ball ({cfg.ball_size} keys, exact)",
              f"compression branch: one key per block of {cfg.cmp_block} (whole cloud)",
              f"selection branch: top-{cfg.topk} blocks of {cfg.slc_block} for the group"]
    for i, title in enumerate(titles):
        ax = fig.add_subplot(2, 2, i + 1, projection="3d")
        ax.set_title(title, fontsize=9)
        if i == 0:
            ax.scatter(*xyz(valid), c=r["ball_id"][valid] % 20, cmap="tab20", s=1.5, linewidths=0)
        else:
            ax.scatter(*xyz(valid), c="0.85", s=1.0, linewidths=0)
        if i == 1:
            ax.scatter(*xyz(r["ball_slots"][mask[r["ball_slots"]]]), c="tab:blue", s=3, linewidths=0)
        if i == 2:
            bp, w = r["block_pos"][r["cmp_mask"]], r["block_mass"][r["cmp_mask"]]
            ax.scatter(bp[:, 0], bp[:, 1], bp[:, 2], c=w, cmap="viridis", s=4 + 60 * w / w.max(), linewidths=0)
        if i == 3:
            s = r["slc_slots"][mask[r["slc_slots"]]]
            ax.scatter(*xyz(s), c="tab:green", s=3, linewidths=0)
        if i > 0:
            ax.scatter(*xyz(r["q_slots"]), c="tab:red", s=14, linewidths=0, label=f"query group ({cfg.group_size})")
            ax.legend(loc="lower left", fontsize=8, frameon=False, bbox_to_anchor=(0.0, 0.08))
        ext = pos[valid].max(0).values - pos[valid].min(0).values
        ax.set_box_aspect(tuple(float(e) for e in ext), zoom=1.5)
        ax.view_init(elev=22, azim=-60)
        ax.set_axis_off()
    fig.suptitle(f"BSA on a generated car surface ({r['num_points']} points). Red: one query group; compression "
                 "keys coloured and sized by the group's attention mass", fontsize=10)
    fig.tight_layout()
    os.makedirs(os.path.dirname(out), exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(HERE, "img", "bsa_branches.png"))
    ap.add_argument("--num-points", type=int, default=4096)
    args = ap.parse_args()
    torch.manual_seed(0)
    draw(args.out, num_points=args.num_points)


if __name__ == "__main__":
    main()
