"""Tile sweeps of the top-k selection kernel and the selected-attention kernels at one size (GPU).

For each configuration (``paper``: per-query compression, ``fast``: group compression) it times
``select_topk_triton`` over ``(BLOCK_G, BLOCK_N, num_warps)`` and the selected attention's forward
and backward over keys per step, warps/stages and dK/dV rows per step, all through the kernels'
launch configs (``_common.launch_config``); the current defaults are the rows marked ``*``. bf16, heads 8, dim 64.

Usage (GPU): ``python benchmarks/sweep_bsa.py --n 65536``; writes sweep_bsa.json to $OUT (or bench_out).
"""
from __future__ import annotations

import argparse
import itertools
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bsa import make_case  # noqa: E402
from common import bench_gpu, env_info, format_table, out_dir, write_json  # noqa: E402


def prepare(c, cfg):
    from torch_geometric_bsa.kernels import compression_branch
    q, k, v = (c[x].detach() for x in ("q", "k", "v"))
    _, lse, q_cmp, _, kc, _, cm, ranges = compression_branch(q, k, v, c["tree"], cfg)
    return q_cmp, kc, lse, cm, ranges

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=65536)
    ap.add_argument("--configs", default="paper,fast")
    ap.add_argument("--kernels", default="topk,slc", help="which sweeps: topk, slc")
    args = ap.parse_args()
    from torch_geometric_bsa import BSAConfig
    from torch_geometric_bsa.kernels import selected as S
    from torch_geometric_bsa.kernels import topk as T
    from torch_geometric_bsa.kernels._common import launch_config
    from torch_geometric_bsa.kernels.plan import selection_plan
    cfgs = {"paper": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8),
            "fast": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                              group_compression=True)}
    info, rows = env_info(), []
    print(info, flush=True)
    for name in args.configs.split(","):
        cfg = cfgs[name]
        c = make_case(args.n, 8, 64, cfg)
        tree = c["tree"]
        q_cmp, kc, lse, cm, ranges = prepare(c, cfg)
        sel = selection_plan(tree, cfg.group_size, cfg.slc_block, cfg.topk, cfg.cmp_window)
        topk = lambda: T.select_topk_triton(q_cmp, kc, lse, cm, sel[0], ranges[:2], sel[1], sel[2])  # noqa: E731
        base_idx = topk()
        kernels = args.kernels.split(",")
        if "topk" in kernels:
            rows.append(dict(config=name, kernel="topk", tiles="default *", ms=bench_gpu(topk)))
        qpg = cfg.group_size if not cfg.group_compression else 1
        # groups a program, key tiles, warps
        for bg, bn, nw in (itertools.product((4, 8, 16, 32), (64, 128), (4, 8)) if "topk" in kernels else ()):
            if bg * qpg < 16 or bg * qpg > 256:
                continue
            tiles = f"BG={bg} BN={bn} w={nw}"
            try:
                with launch_config("topk", BLOCK_G=bg, BLOCK_N=bn, num_warps=nw):
                    same = bool(torch.equal(topk(), base_idx))
                    rows.append(dict(config=name, kernel="topk", tiles=tiles, ms=bench_gpu(topk), same_idx=same))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(config=name, kernel="topk", tiles=tiles, err=repr(e)[:120]))
            print(rows[-1], flush=True)
        q, k, v = (c[x].detach().requires_grad_() for x in ("q", "k", "v"))
        do = c["do"]

        def slc_fwd():
            return S.selected_attention_triton(q, k, v, base_idx, tree.mask, cfg.group_size, cfg.slc_block)

        def slc_fb():
            torch.autograd.grad(slc_fwd(), (q, k, v), do)
        rows.append(dict(config=name, kernel="slc", tiles="default *", fwd_ms=bench_gpu(slc_fwd),
                         ms=bench_gpu(slc_fb)))
        print(rows[-1], flush=True)
        # rows 8: one group a program (the layout before group tiles)
        grid = [(r, keys, ws, 64) for r, keys, ws in itertools.product((8, 32, 64, 128), (128, 256), ((4, 2), (8, 2)))]
        grid += [(64, 256, (8, 2), 32), (64, 256, (8, 2), 128)]
        for r, keys, (w, st), dk_rows in grid if "slc" in kernels else ():
            tiles = f"rows={r} keys={keys} w={w} st={st} dkdv_rows={dk_rows}"
            try:
                with launch_config("slc_fwd", group_rows=r, keys=keys, num_warps=w, num_stages=st, union=False), \
                        launch_config("slc_dq", group_rows=r, keys=keys, num_warps=w, num_stages=st), \
                        launch_config("slc_dkdv", rows=dk_rows, num_warps=w, num_stages=st):
                    rows.append(dict(config=name, kernel="slc", tiles=tiles, fwd_ms=bench_gpu(slc_fwd),
                                     ms=bench_gpu(slc_fb)))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(config=name, kernel="slc", tiles=tiles, err=repr(e)[:120]))
                traceback.print_exc()
            print(rows[-1], flush=True)
        del c
        torch.cuda.empty_cache()
    write_json(os.path.join(out_dir(), "sweep_bsa.json"), dict(env=info, args=vars(args), rows=rows))
    print(format_table(rows, ["config", "kernel", "tiles", "fwd_ms", "ms", "same_idx"],
                       {"fwd_ms": ".3f", "ms": ".3f"}))


if __name__ == "__main__":
    main()
