"""Host time of one BSA op call (forward + backward) with every Triton launch stubbed: the Python and
PyTorch glue around the kernels, measured on a CPU.

The whole op at 4,096 points is host-bound in eager mode on the GPU (benchmarks.md: ~0.5 ms of
device work under ~3 ms of wall time). This script times what the host does besides launching and
running kernels: it runs ``bsa_triton`` (the op ``bench_bsa.py`` times) under the Triton
interpreter with every kernel's ``run`` replaced by a counter, so no kernel executes, and reports
per call: wall microseconds (the glue plus the PyTorch ops, which run on CPU tensors: keep heads and
dim small, the defaults, so that their arithmetic stays out), the
Triton launches, and the aten ops that launch a kernel on a GPU (each costs a few microseconds of
host time there). Outputs of stubbed kernels are uninitialised; nothing reads them on the host.

    python benchmarks/host_glue.py [--n 4096 --heads 1 --dim 16 --config paper --reps 50]
        [--launch-config '{"bsa_fwd": {"fused": false}}']
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def stub_triton():
    r"""Replaces the interpreter's kernel launch by a counter; returns the counter (a dict)."""
    from triton.runtime import interpreter
    count = {"triton": 0}

    def run(self, *args, **kwargs):
        count["triton"] += 1
    interpreter.InterpretedFunction.run = run
    return count


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4096)
    # tiny heads by default: the CPU's own work on the PyTorch ops' tensors stays out of the glue
    ap.add_argument("--heads", type=int, default=1)
    ap.add_argument("--dim", type=int, default=16)
    ap.add_argument("--config", default="paper", choices=("paper", "fast"))
    ap.add_argument("--reps", type=int, default=50)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--launch-config", default=None, metavar="FILE|JSON",
                    help='launch entries forced on the kernels, e.g. \'{"bsa_fwd": {"fused": false}}\'')
    args = ap.parse_args()
    from common import forced_launch_configs
    forced, _ = forced_launch_configs(args.launch_config)
    with forced:
        run(args)


def run(args):
    torch.set_num_threads(args.threads)
    from count_ops import CountOps
    from torch_geometric_bsa import BSAConfig
    from torch_geometric_bsa.kernels import bsa_triton
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                    group_compression=args.config == "fast")
    from bench_bsa import make_case
    c = make_case(args.n, args.heads, args.dim, cfg, dtype=torch.float32, device="cpu")
    count = stub_triton()
    leaves = (c["q"], c["k"], c["v"], c["sigma"], c["gates"])

    def step():
        o = bsa_triton(c["q"], c["k"], c["v"], c["pos"], c["tree"], cfg, sigma=c["sigma"], gates=c["gates"])
        torch.autograd.grad(o, leaves, c["do"])

    for _ in range(3):  # the tree's memo (masks, ranges, plans) fills on the first calls
        step()
    count["triton"] = 0
    with CountOps() as ops:
        step()
    launches, aten = count["triton"], sum(ops.counts.values())
    times = []
    for _ in range(args.reps):
        t0 = time.perf_counter()
        step()
        times.append((time.perf_counter() - t0) * 1e6)
    print(f"bsa_triton fwd+bwd, {args.config} config, N={args.n}, H={args.heads}, D={args.dim}, fp32 on the CPU, "
          f"Triton kernels stubbed: median {statistics.median(times):.0f} us a call (min {min(times):.0f}); "
          f"{launches} Triton launches, {aten} aten ops that launch a kernel")


if __name__ == "__main__":
    main()
