"""Model-level speed: a `BSATransformer` training step and forward inference, for bsa / full / ball.

What users feel is a model's step, not an op. Per case this prints and writes (JSON):
median wall ms, GPU-busy ms (summed kernel time from `torch.profiler`), kernel launches, host syncs
(CUDA synchronisations caught by `torch.cuda.set_sync_debug_mode`), scalar reads (`aten::item`:
these include reads of CPU tensors, e.g. an optimizer's step counter, which do not stall the GPU)
and peak memory. Modes: ``eager`` (the default model: plain eager code, whose layers replay their
own CUDA graphs, ``cuda_graphs="auto"``), ``plain`` (eager without them, ``cuda_graphs=False``), and
``graph`` (the whole step captured with CUDA graphs through `torch_geometric_bsa.capture.GraphedStep`,
the tree built inside the graph).

    python benchmarks/bench_model.py --models paper,small --sizes 8x3586,1x16384,1x65536,1x262144 \
        --attn bsa,full,ball --modes eager,plain,graph --kinds train,infer

A/B of launch configurations in one process (each case runs once per variant, in turn, ``--rounds``
times; rows carry ``variant`` and ``round``): ``--variants '{"fused": {}, "separate": {"bsa_fwd":
{"fused": false}}}' --rounds 2``. One process for all variants saves each run's start, imports and
kernel loads on the device, and alternating spreads the host's drift over both.

Runs on CUDA only (the CPU figures live in bench_cpu.py).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, out_dir  # noqa: E402

# the paper's model (DESIGN §1.2) and a wider, shallower one, both with group compression, and the
# examples' study network
MODELS = {
    "paper": dict(hidden_channels=64, num_layers=18, heads=8, ball_size=256, cmp_block=8, slc_block=8, topk=4,
                  group_size=8, group_compression=True),
    "small": dict(hidden_channels=128, num_layers=6, heads=4, ball_size=256, cmp_block=8, slc_block=8, topk=16,
                  group_size=8, group_compression=True),
    # the examples' study network (examples/study_flags.sh): "small" with per-query compression
    "study": dict(hidden_channels=128, num_layers=6, heads=4, ball_size=256, cmp_block=8, slc_block=8, topk=16,
                  group_size=8, group_compression=False),
}
SYNC_EVENTS = ("cudaStreamSynchronize", "cudaDeviceSynchronize", "cudaEventSynchronize", "cudaMemcpy")


def make_model(name: str, attn: str, in_channels: int = 3, cuda_graphs="auto"):
    from torch_geometric_bsa import BSATransformer
    kw = dict(MODELS[name])
    common = {k: kw.pop(k) for k in ("hidden_channels", "num_layers", "heads", "ball_size")}
    if attn != "bsa":
        kw = {}
    return BSATransformer(in_channels, 1, attention=attn, cuda_graphs=cuda_graphs, **common, **kw)


def make_batch(spec: str, device, seed: int = 0):
    b, n = (int(t) for t in spec.split("x"))
    g = torch.Generator(device="cpu").manual_seed(seed)
    # points on a noisy sphere-like surface: a cloud shape rather than a uniform cube
    pos = torch.randn(b * n, 3, generator=g)
    pos = pos / pos.norm(dim=1, keepdim=True) * (1 + 0.1 * torch.rand(b * n, 1, generator=g))
    x = torch.randn(b * n, 3, generator=g)
    y = torch.randn(b * n, 1, generator=g)
    batch = torch.arange(b).repeat_interleave(n)
    return x.to(device), pos.to(device), batch.to(device), y.to(device)


def _profile(fn) -> Dict[str, float]:
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    kernels, busy, items, syncs = 0, 0.0, 0, 0
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            kernels += 1
            busy += e.device_time_total if hasattr(e, "device_time_total") else e.cuda_time_total
        elif e.name in ("aten::item",):
            items += 1
        elif e.name in SYNC_EVENTS:
            syncs += 1
    return dict(kernels=kernels, busy_ms=busy / 1e3, items=items, runtime_syncs=syncs - 1)  # -1: ours above


def _sync_sites(fn, top: int = 8):
    r"""Runs ``fn`` with CUDA sync debugging on; returns the count and the most common call sites."""
    sites: Dict[str, int] = {}
    old = torch.cuda.get_sync_debug_mode()
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode(1)
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(old)
    n = 0
    for w in rec:
        if "synchroniz" not in str(w.message):
            continue
        n += 1
        sites_key = f"{os.path.basename(w.filename)}:{w.lineno}"
        sites[sites_key] = sites.get(sites_key, 0) + 1
    return n, sorted(sites.items(), key=lambda kv: -kv[1])[:top]


def run_case(model_name: str, spec: str, attn: str, mode: str, kind: str, reps: int, warmup: int) -> Dict:
    from torch_geometric_bsa import build_ball_tree
    device = torch.device("cuda")
    torch.manual_seed(0)
    model = make_model(model_name, attn, cuda_graphs=False if mode == "plain" else "auto").to(device)
    x, pos, batch, y = make_batch(spec, device)
    if kind == "infer":
        model.eval()
    opt = (torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True, capturable=mode == "graph")
           if kind == "train" else None)

    def loss_fn(out, target):
        return torch.nn.functional.mse_loss(out.float(), target)

    if mode in ("eager", "plain"):
        def step():
            if kind == "train":
                with torch.autocast("cuda", dtype=torch.bfloat16):
                    out = model(x, pos, batch)
                loss_fn(out, y).backward()
                opt.step()
                opt.zero_grad(set_to_none=True)
            else:
                with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
                    model(x, pos, batch)
    elif mode == "graph":
        from torch_geometric_bsa.capture import GraphedStep
        graphed = GraphedStep(model, opt, loss_fn if kind == "train" else None, autocast_dtype=torch.bfloat16)

        def step():  # the tree is built inside the graph
            graphed(x, pos, batch, target=y if kind == "train" else None)
    else:
        raise ValueError(mode)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    times: List[float] = []
    for _ in range(reps):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - t0) * 1e3)
    peak = torch.cuda.max_memory_allocated() / 2**30
    tree_ms = []
    for _ in range(reps):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        build_ball_tree(pos, batch, model.ball_size)
        torch.cuda.synchronize()
        tree_ms.append((time.perf_counter() - t0) * 1e3)
    prof = _profile(step)
    nsync, sites = _sync_sites(step)
    if BREAKDOWN:
        _breakdown(step, f"{model_name} {spec} {attn} {mode} {kind}")
    res = dict(model=model_name, size=spec, attn=attn, mode=mode, kind=kind, ms=statistics.median(times),
               ms_min=min(times), tree_ms=statistics.median(tree_ms), peak_gb=peak, syncs=nsync, sync_sites=sites, **prof)
    res["host_over_busy"] = res["ms"] / max(res["busy_ms"], 1e-9)
    return res


BREAKDOWN = False


def _breakdown(fn, title: str, top: int = 80):
    r"""Prints the kernels of one step by launch count and the host ops by self CPU time."""
    from torch.profiler import ProfilerActivity, profile
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    cnt: Dict[str, List[float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            c = cnt.setdefault(e.name[:90], [0, 0.0])
            c[0] += 1
            c[1] += e.device_time_total / 1e3
    print(f"== breakdown: {title}: kernels by count (count, GPU ms)")
    for name, (n, ms) in sorted(cnt.items(), key=lambda kv: -kv[1][0])[:top]:
        print(f"{n:6d} {ms:8.2f}  {name}")
    total = sum(ms for _, ms in cnt.values())
    print(f"== breakdown: {title}: kernels by GPU time (count, GPU ms, share of {total:.2f} ms)")
    for name, (n, ms) in sorted(cnt.items(), key=lambda kv: -kv[1][1])[:top]:
        print(f"{n:6d} {ms:8.2f} {ms / max(total, 1e-9):6.1%}  {name}")
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=top))


def format_rows(rows: List[Dict]) -> str:
    head = ("model", "size", "attn", "mode", "kind", "ms", "busy_ms", "ms/busy", "kernels", "syncs", "items",
            "peak_GB", "tree_ms")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        attn = r["attn"] + (f" [{r['variant']}]" if r.get("variant") else "")
        if "error" in r:
            lines.append(f"| {r['model']} | {r['size']} | {attn} | {r['mode']} | {r['kind']} | "
                         f"{r['error'][:60]} |" + " |" * 8)
            continue
        lines.append(f"| {r['model']} | {r['size']} | {attn} | {r['mode']} | {r['kind']} | {r['ms']:.1f} | "
                     f"{r['busy_ms']:.1f} | {r['host_over_busy']:.2f} | {r['kernels']} | {r['syncs']} | "
                     f"{r['items']} | {r['peak_gb']:.2f} | {r['tree_ms']:.1f} |")
    return "\n".join(lines)


def parse_variants(spec):
    r"""``--variants``: inline JSON or a file, ``{name: {kernel: {entry: value}}}`` (``{}``: the rules
    as they are); ``None`` gives the one unnamed variant."""
    if not spec:
        return {"": {}}
    if spec.lstrip()[:1] in ("{", "["):
        variants = json.loads(spec)
    else:
        with open(spec) as f:
            variants = json.load(f)
    if not isinstance(variants, dict) or not variants or not all(isinstance(v, dict) for v in variants.values()):
        raise SystemExit(f"--variants must map names to launch configs, got {spec!r}")
    return variants


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="paper,small")
    p.add_argument("--sizes", default="8x3586,1x16384,1x65536,1x262144")
    p.add_argument("--infer-sizes", default="2x3586,2x16384", help="sizes of the forward-inference cases")
    p.add_argument("--attn", default="bsa,full,ball")
    p.add_argument("--modes", default="eager,plain,graph")
    p.add_argument("--kinds", default="train,infer")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-full-points", type=int, default=70000,
                   help="skip full attention above this many points per cloud (18 layers at 262k: ~30 s a step)")
    p.add_argument("--time-limit", type=float, default=float("inf"), help="seconds; skip the remaining cases")
    p.add_argument("--json", default=None)
    p.add_argument("--breakdown", action="store_true", help="print kernels by count and host ops by time")
    p.add_argument("--launch-config", default=None, metavar="FILE|JSON",
                   help="JSON {kernel: {entry: value}} (a file, or inline) forced on the kernels' launch rules for the whole run "
                        "(sweep_small_heads.py --best writes one)")
    p.add_argument("--variants", default=None, metavar="FILE|JSON",
                   help="JSON {name: {kernel: {entry: value}}}: every case once per variant, in turn "
                        "(A/B in one process)")
    p.add_argument("--rounds", type=int, default=1, help="with --variants: how many times the variants alternate")
    args = p.parse_args(argv)
    variants = parse_variants(args.variants)
    if not torch.cuda.is_available():
        raise SystemExit("bench_model.py needs CUDA")
    global BREAKDOWN
    BREAKDOWN = args.breakdown
    rows: List[Dict] = []
    t_start = time.time()
    from common import forced_launch_configs
    forced, args.forced = forced_launch_configs(args.launch_config)  # recorded in the JSON's args
    for kind in args.kinds.split(","):
        sizes = args.sizes if kind == "train" else args.infer_sizes
        for model_name in args.models.split(","):
            for spec in sizes.split(","):
                for attn in args.attn.split(","):
                    for mode in args.modes.split(","):
                        if attn == "full" and int(spec.split("x")[1]) > args.max_full_points:
                            continue
                        if time.time() - t_start > args.time_limit:
                            print(f"time limit: skipping {model_name} {spec} {attn} {mode} {kind}", flush=True)
                            continue
                        for rnd in range(args.rounds if args.variants else 1):
                            for name, cfg in variants.items():
                                with forced_launch_configs(json.dumps(cfg) if cfg else None)[0]:
                                    try:
                                        r = run_case(model_name, spec, attn, mode, kind, args.reps, args.warmup)
                                    except Exception as e:  # one failed case must not lose the others' figures
                                        r = dict(model=model_name, size=spec, attn=attn, mode=mode, kind=kind,
                                                 error=f"{type(e).__name__}: {e}"[:300])
                                if args.variants:
                                    r.update(variant=name, round=rnd)
                                rows.append(r)
                                print(json.dumps(r), flush=True)
                                torch.cuda.empty_cache()
    forced.close()
    table = format_rows(rows)
    print(table)
    path = args.json or os.path.join(out_dir(), "bench_model.json")
    with open(path, "w") as f:
        json.dump(dict(env=env_info(), args=vars(args), rows=rows), f, indent=1)
    print("wrote", path)


if __name__ == "__main__":
    main()
