"""Where the time of one BSA fwd+bwd goes: host (Python/launch) time per call vs device time, and the
torch.profiler table of kernels. Run on a GPU: ``python benchmarks/profile_bsa.py --sizes 4096,65536``.

Host time is measured by issuing 20 calls without synchronising (the GPU queue never drains when the
device is the bottleneck, so host time < device time means the op is device bound).
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_bsa import make_case, ours  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,65536")
    ap.add_argument("--configs", default="paper,fast")
    ap.add_argument("--rows", type=int, default=14)
    args = ap.parse_args()
    from torch_geometric_bsa import BSAConfig
    cfgs = {"paper": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8),
            "fast": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                              group_compression=True)}
    for n in [int(x) for x in args.sizes.split(",")]:
        for name in args.configs.split(","):
            cfg = cfgs[name]
            c = make_case(n, 8, 64, cfg)
            leaves = [c[x] for x in ("q", "k", "v", "gates", "sigma")]

            def step():
                torch.autograd.grad(ours(c, cfg), leaves, c["do"])
            for _ in range(3):
                step()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(20):
                step()
            t_host = (time.perf_counter() - t0) / 20 * 1e3
            torch.cuda.synchronize()
            t_all = (time.perf_counter() - t0) / 20 * 1e3
            from torch.profiler import ProfilerActivity, profile
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(3):
                    step()
                torch.cuda.synchronize()
            print(f"\n##### N={n} {name}: host {t_host:.3f} ms/call, host+device {t_all:.3f} ms/call", flush=True)
            ka = prof.key_averages()
            print(ka.table(sort_by="self_device_time_total" if hasattr(ka[0], "self_device_time_total")
                           else "self_cuda_time_total", row_limit=args.rows, max_name_column_width=60))
            if n <= 16384:
                print(ka.table(sort_by="self_cpu_time_total", row_limit=args.rows, max_name_column_width=60))


if __name__ == "__main__":
    main()
