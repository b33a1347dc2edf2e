"""Ball tree build time: our vectorized `build_ball_tree` (CPU and GPU) against `balltree-erwin`.

balltree-erwin (PyPI, the Erwin authors' OpenMP C++ tree, CPU only) builds the complete binary tree
down to single points, which is what Erwin runs before every forward; ours stops at the balls. Its
numbers include its own float64/numpy conversions, as a user calling it would see. torch-cluster's
fps and grid are timed too when torch-cluster is installed (skipped otherwise).

    python benchmarks/bench_tree.py                       # sizes 1e4..1e6, CPU and (if present) GPU
    python benchmarks/bench_tree.py --profile 1000000     # + a torch.profiler table of the GPU build
"""
from __future__ import annotations

import argparse
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402

from common import bench_cpu, bench_gpu, env_info, format_table, markdown_table, out_dir, write_json  # noqa: E402
from torch_geometric_bsa import build_ball_tree  # noqa: E402


def probe(name):
    try:
        return __import__(name)
    except Exception:  # noqa: BLE001 - missing or broken optional package
        return None


def cases(n, clouds, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g).to(device)
    batch = torch.arange(clouds).repeat_interleave(n // clouds + 1)[:n].to(device) if clouds > 1 else None
    return pos, batch


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(float(x)) for x in s.split(",")], default=[10**4, 10**5, 10**6])
    p.add_argument("--ball-size", type=int, default=256)
    p.add_argument("--clouds", type=int, default=1, help="split the points into this many clouds (batch)")
    p.add_argument("--devices", default="cpu,cuda")
    p.add_argument("--profile", type=int, default=0, help="profile the GPU build at this size")
    p.add_argument("--tag", default="bench_tree")
    args = p.parse_args()
    info = env_info()
    print(info, flush=True)
    bt, tc = probe("balltree"), probe("torch_cluster")
    rows = []
    m = args.ball_size
    for n in args.sizes:
        for dev in args.devices.split(","):
            if dev == "cuda" and not torch.cuda.is_available():
                continue
            pos, batch = cases(n, args.clouds, dev)
            timer = bench_gpu if dev == "cuda" else bench_cpu
            rows.append(dict(N=n, clouds=args.clouds, device=dev, method="ours",
                             ms=timer(lambda: build_ball_tree(pos, batch, ball_size=m))))
            print(rows[-1], flush=True)
            if dev == "cpu" and bt is not None:
                b = batch if batch is not None else torch.zeros(n, dtype=torch.long)
                rows.append(dict(N=n, clouds=args.clouds, device="cpu", method="balltree-erwin",
                                 ms=bench_cpu(lambda: bt.build_balltree(pos, b))))
                print(rows[-1], flush=True)
            if tc is not None:
                b = batch if batch is not None else torch.zeros(n, dtype=torch.long, device=dev)
                rows.append(dict(N=n, clouds=args.clouds, device=dev, method="torch_cluster.grid",
                                 ms=timer(lambda: tc.grid_cluster(pos, torch.full((3,), 0.05, device=dev)))))
                rows.append(dict(N=n, clouds=args.clouds, device=dev, method="torch_cluster.fps(1/256)",
                                 ms=timer(lambda: tc.fps(pos, b, ratio=1 / m))))
    if bt is None:
        print("balltree-erwin not installed: skipped (pip install balltree-erwin)")
    if tc is None:
        print("torch-cluster not installed: fps/grid skipped")
    for r in rows:  # speed-up of ours against the others at the same size
        ref = [o["ms"] for o in rows if o["N"] == r["N"] and o["method"] == "ours" and o["device"] == r["device"]]
        r["x_ours"] = r["ms"] / ref[0] if ref and r["method"] != "ours" else None
    od = out_dir()
    write_json(os.path.join(od, f"{args.tag}.json"), dict(env=info, args=vars(args), results=rows))
    cols, fmt = ["N", "clouds", "device", "method", "ms", "x_ours"], dict(ms=".2f", x_ours=".2f")
    with open(os.path.join(od, f"{args.tag}.md"), "w") as f:
        f.write(markdown_table(rows, cols, fmt) + "\n")
    if args.profile and torch.cuda.is_available():
        from torch.profiler import ProfilerActivity, profile
        pos, batch = cases(args.profile, args.clouds, "cuda")
        for _ in range(3):
            build_ball_tree(pos, batch, ball_size=m)
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            build_ball_tree(pos, batch, ball_size=m)
            torch.cuda.synchronize()
        table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=40)
        cpu_table = prof.key_averages().table(sort_by="cpu_time_total", row_limit=12, max_name_column_width=40)
        with open(os.path.join(od, f"{args.tag}_profile.txt"), "w") as f:
            f.write(table + "\n\n" + cpu_table)
        print(table)
        print(cpu_table)
    print(info)
    print(format_table(rows, cols, fmt))


if __name__ == "__main__":
    main()
