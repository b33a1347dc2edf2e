"""The compression branch's attention (GPU): our Triton kernels against PyTorch's FlashAttention.

Per-query compression is plain attention of every point over its cloud's compressed keys, so
FlashAttention can compute it once the masked keys are moved out of each cloud's run
(``plan.compressed_varlen``; ``kernels/compressed.py``, ``CompressedFlash``). This times both on the
same inputs, forward and forward + backward (``triton.testing.do_bench``, median, L2 flushed), and
checks that they agree; the ``cmp_flash`` launch rule (``FLASH_MIN_WORK``) is set from its table.

    python benchmarks/bench_cmp_flash.py                              # default shapes
    python benchmarks/bench_cmp_flash.py --shapes 1x65536x8x64x1      # clouds x points x heads x dim x q_unit

Writes cmp_flash.json to $OUT (or bench_out).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

SHAPES = ("1x65536x8x64x1,1x262144x8x64x1,1x16384x8x64x1,1x4096x8x64x1,8x3586x4x32x1,8x3586x8x8x1,"
          "8x3586x8x8x8,1x65536x8x64x8,1x16384x8x8x8")


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shapes", default=SHAPES, help="clouds x points x heads x dim x q_unit, comma-separated")
    ap.add_argument("--ball", type=int, default=256)
    ap.add_argument("--block", type=int, default=8, help="compression block (= stride)")
    ap.add_argument("--rep", type=int, default=50, help="do_bench milliseconds per measurement")
    args = ap.parse_args()
    from common import bench_gpu, env_info, format_table, out_dir, write_json
    from torch_geometric_bsa import build_ball_tree
    from torch_geometric_bsa.kernels import compressed as C
    from torch_geometric_bsa.kernels import plan as P
    info, rows = env_info(), []
    print(info, flush=True)
    for shape in args.shapes.split(","):
        clouds, points, heads, dim, q_unit = (int(x) for x in shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        pos = torch.rand(clouds * points, 3, device="cuda", generator=g)
        batch = torch.arange(clouds, device="cuda").repeat_interleave(points)
        tree = build_ball_tree(pos, batch, ball_size=args.ball)
        nq, nk = tree.num_slots // q_unit, tree.num_slots // args.block
        q, do = (torch.randn(nq, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        k, v = (torch.randn(nk, heads, dim, device="cuda", dtype=torch.bfloat16, generator=g) for _ in range(2))
        q.requires_grad_(), k.requires_grad_(), v.requires_grad_()
        kmask = tree.mask.view(-1, args.block).any(1)
        ranges = P.compressed_ranges(tree, q_unit, args.block)
        vplan = P.compressed_varlen(tree, q_unit, args.block, kmask)
        impls = {
            "triton": lambda: C.compressed_attention_triton(q, k, v, kmask, ranges, ragged=clouds > 1),
            "flash": lambda: C.compressed_attention_flash(q, k, v, vplan),
        }
        outs = {}
        row = dict(shape=shape, clouds=clouds, points=points, heads=heads, dim=dim, q_unit=q_unit,
                   work=nq * heads * (tree.max_slots // args.block))
        for name, fn in impls.items():
            o, lse = fn()
            grads = torch.autograd.grad(o, (q, k, v), do)
            outs[name] = (o.float(), lse, [x.float() for x in grads])

            def step(fn=fn):
                o = fn()[0]
                torch.autograd.grad(o, (q, k, v), do)
            with torch.no_grad():
                row[f"{name}_fwd_ms"] = bench_gpu(fn, rep=args.rep)
            row[f"{name}_fwdbwd_ms"] = bench_gpu(step, rep=args.rep)
        (ot, lt, gt), (of, lf, gf) = outs["triton"], outs["flash"]
        rel = lambda a, b: float((a - b).norm() / b.norm().clamp_min(1e-30))  # noqa: E731
        valid = lt < 1e29
        row["o_rel"] = rel(of, ot)
        row["lse_maxabs"] = float((lf[valid] - lt[valid]).abs().max())
        row["empty_rows_agree"] = bool(torch.equal(lf >= 1e29, lt >= 1e29))
        row["grad_rel_max"] = max(rel(a, b) for a, b in zip(gf, gt))
        row["speedup_fwdbwd"] = row["triton_fwdbwd_ms"] / row["flash_fwdbwd_ms"]
        rows.append(row)
        print(format_table([row], list(row)), flush=True)
    cols = ["shape", "work", "triton_fwd_ms", "flash_fwd_ms", "triton_fwdbwd_ms", "flash_fwdbwd_ms",
            "speedup_fwdbwd", "o_rel", "lse_maxabs", "grad_rel_max", "empty_rows_agree"]
    print(format_table(rows, cols))
    write_json(os.path.join(out_dir(), "cmp_flash.json"),
               dict(env=info, args=vars(args), command="python benchmarks/bench_cmp_flash.py " + " ".join(sys.argv[1:]),
                    rows=rows))


if __name__ == "__main__":
    main()
