"""Hardware counters of one BSA layer's kernels (GPU, Nsight Compute): what bounds each kernel.

GPU-busy times (``sweep_small_heads.py``, ``bench_model.py --breakdown``) say how long a kernel runs,
not why. Under ``ncu`` this runs one layer's forward + backward (``bsa_triton``, bf16, random inputs)
at a model's shape, with the profiler range around one call after the warm-up, so that only that
call's kernels are measured. ``--summarize`` turns ncu's CSV into one row a kernel: duration, compute
and memory throughput (% of peak), achieved occupancy, registers, grid size. Low throughput on both
sides with few warps resident reads as latency-bound (too few programs, or too little work in flight
per program); high memory throughput as bandwidth-bound.

    ncu --clock-control none --profile-from-start off --csv --page details \\
        --section SpeedOfLight --section Occupancy --section LaunchStats \\
        python benchmarks/ncu_layer.py --shape 8x3586x4x32 --topk 16 --per-query > ncu_study.csv
    python benchmarks/ncu_layer.py --summarize ncu_study.csv --json ncu_study.json

Shapes: clouds x points x heads x dim. The study network's layer is ``8x3586x4x32 --topk 16
--per-query``; the paper model's ``8x3586x8x8 --topk 4`` (group compression).
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

# ncu's metric names (SpeedOfLight, Occupancy, LaunchStats sections) -> short column names
METRICS = {
    "Duration": "us",
    "Compute (SM) Throughput": "sm_%",
    "Memory Throughput": "mem_%",
    "DRAM Throughput": "dram_%",
    "Achieved Occupancy": "occ_%",
    "Theoretical Occupancy": "theo_occ_%",
    "Registers Per Thread": "regs",
    "Grid Size": "grid",
    "Block Size": "block",
    "Waves Per SM": "waves",
}


def summarize(path: str) -> list:
    r"""One dict a kernel launch from ``ncu --csv --page details`` output (lines before the CSV
    header, e.g. the script's own prints, are skipped). Durations are converted to microseconds."""
    with open(path) as f:
        lines = f.readlines()
    start = next((i for i, line in enumerate(lines) if line.startswith('"ID"')), None)
    if start is None:
        raise SystemExit(f"{path}: no ncu CSV header (\"ID\", ...) found")
    rows = {}
    for r in csv.DictReader(lines[start:]):
        key = (r["ID"], r["Kernel Name"])
        row = rows.setdefault(key, {"id": int(r["ID"]), "kernel": r["Kernel Name"].split("(")[0][:48]})
        name = r["Metric Name"]
        if name in METRICS:
            val = r["Metric Value"].replace(",", "")
            try:
                num = float(val)
            except ValueError:
                continue
            if name == "Duration":
                unit = r.get("Metric Unit", "")
                num *= {"ns": 1e-3, "usecond": 1.0, "us": 1.0, "msecond": 1e3, "ms": 1e3, "nsecond": 1e-3}.get(unit, 1.0)
            row[METRICS[name]] = round(num, 2)
    return sorted(rows.values(), key=lambda r: r["id"])


def run(args):
    import torch
    from sweep_small_heads import make_layer
    from torch_geometric_bsa import BSAConfig
    from torch_geometric_bsa.kernels import bsa_triton
    clouds, points, heads, dim = (int(x) for x in args.shape.split("x"))
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=args.topk, group_size=8,
                    group_compression=not args.per_query)
    c = make_layer(clouds, points, heads, dim, cfg)
    q, k, v = (c[x].requires_grad_() for x in ("q", "k", "v"))
    n = q.size(0)
    gates = torch.rand(n, heads, cfg.num_branches, device="cuda", dtype=torch.bfloat16).requires_grad_()

    def step():
        o = bsa_triton(q, k, v, c["pos"], c["tree"], cfg, sigma=c["sigma"], gates=gates)
        torch.autograd.grad(o, (q, k, v, c["sigma"], gates), c["do"])

    for _ in range(args.warmup):  # compiles (and autotunes, unless BSA_AUTOTUNE=0) outside the range
        step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    print(f"profiled one forward + backward: {args.shape}, top-k {args.topk}, "
          f"{'per-query' if args.per_query else 'group'} compression", file=sys.stderr)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="8x3586x4x32", help="clouds x points x heads x dim")
    ap.add_argument("--topk", type=int, default=16)
    ap.add_argument("--per-query", action="store_true", help="per-query compression (else group compression)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--summarize", metavar="CSV", help="summarize an ncu CSV instead of running")
    ap.add_argument("--json", help="with --summarize: also write the rows here")
    args = ap.parse_args()
    if not args.summarize:
        return run(args)
    from common import format_table
    rows = summarize(args.summarize)
    cols = ["id", "kernel"] + [c for c in METRICS.values() if any(c in r for r in rows)]
    print(format_table(rows, cols, {}))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(source=os.path.basename(args.summarize), rows=rows), f, indent=1)


if __name__ == "__main__":
    main()
