"""Full BSA op (ball + compression + selection, gated) vs SDPA full attention, a FlexAttention BSA and the
reference, forward and forward+backward; per-branch split, peak memory and each kernel's floor.

Usage (H100): ``PYTHONPATH=$PWD python benchmarks/bench_bsa.py`` (``--quick`` for fewer sizes).
One cloud, bf16, heads 8, dim 64, ball 256, cmp/slc block 8, top-k 16, group 8; "paper" = per-query
compression, "fast" = group compression. Writes bench_bsa.json and bench_bsa.png to $OUT (or bench_out).
"""
from __future__ import annotations

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import bench_gpu, env_info, format_table, out_dir, peak_memory_mb, write_json  # noqa: E402

MATMUL_TFLOPS = 771.0   # measured bf16 ceiling on the H100 (DESIGN §3)
COPY_TBS = 3.0


def make_case(n, h, d, cfg, seed=0, dtype=torch.bfloat16, device="cuda"):
    from torch_geometric_bsa import build_ball_tree
    g = torch.Generator(device=device).manual_seed(seed)
    pos = torch.rand(n, 3, device=device, generator=g)
    tree = build_ball_tree(pos, None, ball_size=cfg.ball_size)
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
    c = dict(n=n, tree=tree, pos=tree.to_tree(pos).to(dtype), q=rnd(n, h, d), k=rnd(n, h, d), v=rnd(n, h, d),
             sigma=torch.full((h,), -1.0, device=device, dtype=dtype, requires_grad=True),
             gates=torch.rand(n, h, cfg.num_branches, device=device, dtype=dtype).requires_grad_())
    c["do"] = torch.randn(n, h, d, device=device, dtype=dtype)
    return c


def ours(c, cfg):
    from torch_geometric_bsa.kernels import bsa_triton
    return bsa_triton(c["q"], c["k"], c["v"], c["pos"], c["tree"], cfg, sigma=c["sigma"], gates=c["gates"])


def reference(c, cfg):
    from torch_geometric_bsa.reference import bsa_reference
    return bsa_reference(c["q"], c["k"], c["v"], c["pos"], c["tree"], cfg, sigma=c["sigma"], gates=c["gates"])


FLEX_TILE = {"tile": 128}


def flex(c, cfg):
    from flex_bsa import flex_bsa
    return flex_bsa(c["q"], c["k"], c["v"], c["pos"], c["sigma"], c["gates"], cfg, slc_tile=FLEX_TILE["tile"])


def graphed(fn, c, cfg):
    r"""fwd+bwd of ``fn`` captured once in a CUDA graph (removes launch and Python overhead)."""
    leaves = [c[x] for x in ("q", "k", "v", "gates", "sigma")]
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(3):  # warm-up (and autotuning) outside the capture
            torch.autograd.grad(fn(c, cfg), leaves, c["do"])
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        torch.autograd.grad(fn(c, cfg), leaves, c["do"])
    return bench_gpu(graph.replay)


def sdpa_full(c, cfg):
    import torch.nn.functional as F
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731
    return F.scaled_dot_product_attention(t(c["q"]), t(c["k"]), t(c["v"]))[0].transpose(0, 1)


def timed(fn, c, cfg, rep):
    leaves = [c[x] for x in ("q", "k", "v", "gates")]

    def fwd():
        with torch.no_grad():
            return fn(c, cfg)

    def fwd_bwd():
        o = fn(c, cfg)
        torch.autograd.backward(o, c["do"])
        for t in leaves:
            t.grad = None
    return bench_gpu(fwd, warmup=rep // 4 + 1, rep=rep), bench_gpu(fwd_bwd, warmup=rep // 4 + 1, rep=rep), fwd_bwd


def branch_split(c, cfg, rep):
    r"""Per-kernel times (ms) of one fwd+bwd of our op, each kernel timed alone on the real inputs."""
    from torch_geometric_bsa.kernels import compress_mean_fast
    from torch_geometric_bsa.kernels.ball import ball_attention_triton
    from torch_geometric_bsa.kernels.compressed import compressed_attention_triton
    from torch_geometric_bsa.kernels.plan import compressed_ranges, selection_plan
    from torch_geometric_bsa.kernels.selected import selected_attention_triton
    from torch_geometric_bsa.kernels.topk import select_topk_triton
    tree, q, k, v, do = c["tree"], c["q"], c["k"], c["v"], c["do"]
    g, h, d = cfg.group_size, q.size(1), q.size(2)
    out = {}

    def fb(f):
        def run():
            o = f()
            torch.autograd.backward(o, do if o.shape == do.shape else do[: o.size(0)])
            for t in (q, k, v):
                t.grad = None
        return run
    with torch.no_grad():
        out["ball_fwd"] = bench_gpu(lambda: ball_attention_triton(q, k, v, c["pos"], c["sigma"], tree.mask, cfg.ball_size), rep=rep)
    out["ball_fwdbwd"] = bench_gpu(fb(lambda: ball_attention_triton(q, k, v, c["pos"], c["sigma"], tree.mask, cfg.ball_size)), rep=rep)
    kc, vc, cm = compress_mean_fast(k.detach(), v.detach(), tree.mask, cfg.cmp_block)  # configs: stride == block
    kc.requires_grad_(), vc.requires_grad_()
    if cfg.group_compression:
        qc = q.detach().view(-1, g, h, d).mean(1).requires_grad_()
    else:
        qc = q
    q_unit = tree.num_slots // qc.size(0)
    ranges = compressed_ranges(tree, q_unit, cfg.cmp_stride, window=cfg.cmp_window)
    rg = cfg.cmp_window is not None or tree.num_clouds > 1
    sel = selection_plan(tree, g, cfg.slc_block, cfg.topk, cfg.cmp_window)
    with torch.no_grad():
        out["cmp_fwd"] = bench_gpu(lambda: compressed_attention_triton(qc, kc, vc, cm, ranges, ragged=rg), rep=rep)
        o_c, lse = compressed_attention_triton(qc, kc, vc, cm, ranges, ragged=rg)
    doc = torch.randn_like(o_c)

    def cmp_fb():
        o, _ = compressed_attention_triton(qc, kc, vc, cm, ranges, ragged=rg)
        torch.autograd.backward(o, doc)
    out["cmp_fwdbwd"] = bench_gpu(cmp_fb, rep=rep)
    with torch.no_grad():
        out["topk"] = bench_gpu(lambda: select_topk_triton(qc, kc, lse, cm, sel[0], ranges[:2], sel[1], sel[2]), rep=rep)
        idx = select_topk_triton(qc, kc, lse, cm, sel[0], ranges[:2], sel[1], sel[2])
        out["slc_fwd"] = bench_gpu(lambda: selected_attention_triton(q, k, v, idx, tree.mask, g, cfg.slc_block), rep=rep)
    out["slc_fwdbwd"] = bench_gpu(fb(lambda: selected_attention_triton(q, k, v, idx, tree.mask, g, cfg.slc_block)), rep=rep)
    # floors (ms): FLOPs over the matmul ceiling, or bytes over the copy ceiling
    nq, nb = qc.size(0), kc.size(0)
    if cfg.cmp_window is not None:  # keys per query: the window's blocks
        nb = min(nb, cfg.cmp_window // cfg.cmp_stride)
    unit = 2.0 * nq * nb * d * h  # one [Q x NB] matmul over all heads
    f = lambda flops: flops / (MATMUL_TFLOPS * 1e12) * 1e3  # noqa: E731
    nbytes = q.numel() * q.element_size()
    out["cmp_fwd_floor"] = f(2 * unit)
    out["cmp_fwdbwd_floor"] = f(7 * unit)   # fwd 2 + bwd 5 matmuls (FlashAttention-2 count)
    out["topk_floor"] = f(unit)
    kl = min(cfg.topk, tree.max_slots // cfg.slc_block) * cfg.slc_block
    out["slc_fwd_floor"] = max(f(4.0 * c["n"] * kl * d * h), 4 * nbytes / (COPY_TBS * 1e12) * 1e3)
    out["slc_fwdbwd_floor"] = max(f(14.0 * c["n"] * kl * d * h), 10 * nbytes / (COPY_TBS * 1e12) * 1e3)
    out["ball_fwdbwd_floor"] = max(f(14.0 * c["n"] * cfg.ball_size * d * h), 10 * nbytes / (COPY_TBS * 1e12) * 1e3)
    return out



def plot(rows, info, heads, dim, path):
    r"""fwd+bwd time against N per configuration (eager solid, CUDA graph dotted), SDPA dashed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for name, mark in (("paper", "o"), ("fast", "s"), ("fastwin", "^")):
            r = sorted((x for x in rows if x["config"] == name and x.get("ours_fwdbwd")), key=lambda x: x["N"])
            if r:
                line, = ax.loglog([x["N"] for x in r], [x["ours_fwdbwd"] for x in r], "-" + mark,
                                  label=f"BSA triton ({name})")
            rg = [x for x in r if x.get("ours_graph_fwdbwd")]
            if rg:
                ax.loglog([x["N"] for x in rg], [x["ours_graph_fwdbwd"] for x in rg], ":" + mark,
                          color=line.get_color(), alpha=0.7, label=f"BSA triton ({name}), CUDA graph")
            rf = [x for x in r if x.get("flex_fwdbwd")]
            if rf:
                ax.loglog([x["N"] for x in rf], [x["flex_fwdbwd"] for x in rf], "x", color=line.get_color(),
                          label=f"Flex BSA ({name})")
        first = {}
        for x in rows:  # one SDPA point per N: the first configuration's (they time the same call)
            if x.get("sdpa_fwdbwd"):
                first.setdefault(x["N"], x)
        r = sorted(first.values(), key=lambda x: x["N"])
        if r:
            ax.loglog([x["N"] for x in r], [x["sdpa_fwdbwd"] for x in r], "--k", label="SDPA full")
        ax.set_xlabel("points N (one cloud)")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.set_title(f"BSA, bf16, H={heads}, D={dim} ({info.get('gpu', '?')})")
        ax.legend(fontsize=7)
        ax.grid(True, which="both", alpha=0.3)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
    except Exception:  # noqa: BLE001
        traceback.print_exc()

def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--sizes", default="4096,16384,65536,262144,1048576")
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=64)
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--no-flex", action="store_true")
    ap.add_argument("--flex-sizes", default="4096,65536", help="sizes at which the FlexAttention BSA is timed "
                    "(it compiles anew per shape)")
    ap.add_argument("--configs", default="paper,fast")
    ap.add_argument("--plot-only", metavar="JSON", help="redraw bench_bsa.png from a saved bench_bsa.json")
    ap.add_argument("--launch-config", default=None, metavar="FILE|JSON",
                    help="{kernel: {entry: value}} forced on the launch rules, e.g. '{\"topk\": {\"BLOCK_N\": 64}}'")
    args = ap.parse_args()
    if args.plot_only:
        import json
        with open(args.plot_only) as f:
            saved = json.load(f)
        plot(saved["rows"], saved["env"], saved["args"]["heads"], saved["args"]["dim"],
             os.path.join(out_dir(), "bench_bsa.png"))
        return
    from torch_geometric_bsa import BSAConfig
    cfgs = {"paper": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8),
            "fast": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                              group_compression=True),
            # the large-cloud option: compression and selection within windows of 16,384 slots
            # plus one coarse key per ball (BSAConfig.cmp_window)
            "fastwin": BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                                 group_compression=True, cmp_window=16384)}
    torch._dynamo.config.cache_size_limit = 64  # flex recompiles per shape; never fall back to eager
    if hasattr(torch._dynamo.config, "recompile_limit"):
        torch._dynamo.config.recompile_limit = 64
    from common import forced_launch_configs
    _stack, args.forced = forced_launch_configs(args.launch_config)  # open for the whole run; args record it
    flex_sizes = {int(x) for x in args.flex_sizes.split(",") if x}
    cfgs = {k_: cfgs[k_] for k_ in args.configs.split(",")}
    rows, info = [], env_info()
    print(info, flush=True)
    for n in [int(x) for x in args.sizes.split(",")]:
        for name, cfg in cfgs.items():
            row = dict(N=n, config=name)
            rep = args.rep if n <= 65536 else max(5, args.rep // 10)
            try:
                c = make_case(n, args.heads, args.dim, cfg)
                if name == "paper" and n > 262144:
                    continue  # ~16x the 262k time; the 1M target is the fast configuration
                row["ours_fwd"], row["ours_fwdbwd"], fb = timed(ours, c, cfg, rep)
                if n in (65536, 262144, 1048576):
                    row["peak_GB"] = peak_memory_mb(fb) / 1024
                if n <= 262144:
                    row.update(branch_split(c, cfg, rep))
                if n <= 262144:
                    try:
                        row["ours_graph_fwdbwd"] = graphed(ours, c, cfg)
                    except Exception as e:  # noqa: BLE001
                        row["graph_err"] = repr(e)[:200]
                        traceback.print_exc()
                if n <= 65536:
                    row["sdpa_fwd"], row["sdpa_fwdbwd"], _ = timed(sdpa_full, c, cfg, rep)
                if n <= 16384:
                    row["ref_fwd"], row["ref_fwdbwd"], _ = timed(reference, c, cfg, max(5, rep // 5))
                if n in flex_sizes and not args.no_flex and cfg.cmp_window is None:  # flex recompiles per shape
                    for tile in (128,):  # flex's default tiles (16x16 selection tiles failed to lower on torch 2.11)
                        FLEX_TILE["tile"] = tile
                        try:
                            row["flex_fwd"], row["flex_fwdbwd"], _ = timed(flex, c, cfg, max(5, rep // 2))
                            row["flex_tile"] = tile
                            break
                        except Exception as e:  # noqa: BLE001
                            row["flex_err"] = repr(e)[:200]
                            traceback.print_exc()
                            torch._dynamo.reset()
            except Exception as e:  # noqa: BLE001
                row["err"] = repr(e)[:300]
                traceback.print_exc()
            if row.get("ours_graph_fwdbwd") and row.get("sdpa_fwdbwd"):
                row["x_sdpa_graph"] = row["sdpa_fwdbwd"] / row["ours_graph_fwdbwd"]
            for peer in ("sdpa", "flex", "ref"):
                if row.get(f"{peer}_fwdbwd") and row.get("ours_fwdbwd"):
                    row[f"x_{peer}"] = row[f"{peer}_fwdbwd"] / row["ours_fwdbwd"]
            if row.get("ours_fwdbwd"):
                row["ns_per_pt"] = row["ours_fwdbwd"] * 1e6 / n
            for kname in ("cmp_fwdbwd", "topk", "slc_fwdbwd", "ball_fwdbwd"):
                if row.get(kname) and row.get(kname + "_floor"):
                    row[kname + "_frac"] = row[kname + "_floor"] / row[kname]
            rows.append(row)
            print({k_: (round(v, 4) if isinstance(v, float) else v) for k_, v in row.items()}, flush=True)
            torch.cuda.empty_cache()
    out = out_dir()
    write_json(os.path.join(out, "bench_bsa.json"), dict(env=info, args=vars(args), rows=rows))
    cols = ["N", "config", "ours_fwd", "ours_fwdbwd", "ours_graph_fwdbwd", "sdpa_fwdbwd", "x_sdpa", "x_sdpa_graph",
            "flex_fwdbwd", "flex_tile", "x_flex",
            "ref_fwdbwd", "ns_per_pt", "peak_GB"]
    fmt = {k_: ".3f" for k_ in cols[2:]}
    print(format_table(rows, cols, fmt))
    cols2 = ["N", "config", "ball_fwdbwd", "cmp_fwd", "cmp_fwdbwd", "topk", "slc_fwd", "slc_fwdbwd",
             "cmp_fwdbwd_frac", "topk_frac", "slc_fwdbwd_frac", "ball_fwdbwd_frac"]
    print(format_table(rows, cols2, {k_: ".3f" for k_ in cols2[2:]}))
    plot(rows, info, args.heads, args.dim, os.path.join(out, "bench_bsa.png"))


if __name__ == "__main__":
    main()
