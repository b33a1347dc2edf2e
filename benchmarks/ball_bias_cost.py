"""What the distance bias costs the ball kernels (GPU): forward and one-loop backward, with and without it.

Each score of the ball branch pays an exponential and, for its bias ``sigma_h * ||p_i - p_j||``, a
square root: both on the special-function units, which bound attention at small head dims. This
times the kernels' GPU-busy time (``torch.profiler``) at a layer shape with the bias (BSA's function)
and without it (``BIAS=False``: the same kernels minus the distance, positions and square root), so
that a change that pays the square root once per pair instead of once per pair and head
(perf-notes, "Next GPU session") can be sized before it is written: if the bias-free kernels are
much faster, the square roots bound them. Both backward launches run without the sigma and
position gradients, so they compare like with like.

    python benchmarks/ball_bias_cost.py                      # the paper model's layer and 65k points
    python benchmarks/ball_bias_cost.py --shapes 8x3586x8x8  # clouds x points x heads x dim

Writes ball_bias_cost.json to $OUT (or bench_out).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def launch(q, k, v, pos, sigma, mask_u8, m, bias: bool, do=None):
    r"""The ball forward (``do`` None: returns ``o``) or forward and one-loop backward (returns ``dq,
    dk, dv``), through ``kernels/ball.py``'s own launches, with the distance bias on or off."""
    from torch_geometric_bsa.kernels import ball as B
    from torch_geometric_bsa.kernels._common import launch_config
    scale = q.size(-1) ** -0.5
    o, lse = B._forward(q, k, v, pos, sigma, mask_u8, m, scale, bias=bias)
    if do is None:
        return o
    with launch_config("ball_bwd", MERGED=True):
        return B._backward(do, q, k, v, o, lse, pos, sigma, mask_u8, m, scale, False, False, bias=bias)[:3]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default="8x3586x8x8,1x65536x8x64", help="clouds x points x heads x dim, comma-separated")
    ap.add_argument("--ball", type=int, default=256)
    ap.add_argument("--reps", type=int, default=20)
    args = ap.parse_args()
    from common import env_info, format_table, out_dir, write_json
    from sweep_small_heads import _bench
    from torch_geometric_bsa import build_ball_tree
    info, rows = env_info(), []
    print(info, flush=True)
    for shape in args.shapes.split(","):
        clouds, points, heads, dim = (int(x) for x in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        pos = torch.rand(clouds * points, 3, device="cuda", generator=g)
        batch = torch.arange(clouds, device="cuda").repeat_interleave(points)
        tree = build_ball_tree(pos, batch, ball_size=args.ball)
        n = tree.mask.numel()
        q, k, v, do = (torch.randn(n, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(4))
        p = tree.to_tree(pos).to(torch.bfloat16).contiguous()
        sigma = torch.full((heads,), -1.0, device="cuda", dtype=torch.bfloat16)
        mask = tree.mask.to(torch.uint8)
        row = dict(shape=shape, slots=n)
        for bias in (True, False):
            tag = "bias" if bias else "nobias"
            row[f"fwd_{tag}"] = _bench(lambda: launch(q, k, v, p, sigma, mask, args.ball, bias), args.reps)
            row[f"fwdbwd_{tag}"] = _bench(lambda: launch(q, k, v, p, sigma, mask, args.ball, bias, do), args.reps)
        row["fwd_ratio"] = row["fwd_nobias"] / row["fwd_bias"]
        row["fwdbwd_ratio"] = row["fwdbwd_nobias"] / row["fwdbwd_bias"]
        rows.append(row)
        print(row, flush=True)
    write_json(os.path.join(out_dir(), "ball_bias_cost.json"), dict(env=info, args=vars(args), rows=rows))
    print(format_table(rows, ["shape", "fwd_bias", "fwd_nobias", "fwd_ratio", "fwdbwd_bias", "fwdbwd_nobias",
                              "fwdbwd_ratio"], {k: ".4f" for k in ("fwd_bias", "fwd_nobias", "fwdbwd_bias",
                                                                    "fwdbwd_nobias")} | {"fwd_ratio": ".2f",
                                                                                          "fwdbwd_ratio": ".2f"}))


if __name__ == "__main__":
    main()
