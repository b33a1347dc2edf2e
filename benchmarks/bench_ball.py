"""Ball branch: our fused Triton kernel against the peers that compute the same thing (DESIGN §3-§4).

Methods (bf16, tree-ordered q, k, v [N_pad, H, D], distance bias sigma_h * ||p_i - p_j||):
  ours         kernels.ball.ball_attention_triton (bias in-kernel)
  sdpa_bias    SDPA on reshaped balls, bias as a float attn_mask (Erwin's implementation)
  flex_bias    FlexAttention, ball block mask, bias as score_mod (torch.compile'd)
  sdpa_nobias  SDPA on reshaped balls without bias (not the same function: a speed reference)
  sdpa_full    SDPA full attention over each cloud (FlashAttention backend)
  reference    reference.ball_attention (pure PyTorch)
Forward is timed under no_grad; fwd+bwd is forward plus autograd.grad w.r.t. q, k, v (and sigma).
Times are medians of triton.testing.do_bench; memory is the peak above the inputs for one fwd+bwd.

    python benchmarks/bench_ball.py                  # full sweep, table, JSON and PNG in $OUT
    python benchmarks/bench_ball.py --sweep          # launch-config sweep of ours at N = 65,536
    python benchmarks/bench_ball.py --plot R.json    # redraw the PNG from a JSON
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
import traceback

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from common import (bench_gpu, env_info, format_table, markdown_table, out_dir, peak_memory_mb,  # noqa: E402
                    write_json)

CLOUD = 3586  # ShapeNet-Car points per cloud
MATMUL_TFLOPS, COPY_TBS = 771.0, 3.0  # ceilings measured on an H100 (DESIGN §3)
PEERS = ("sdpa_bias", "flex_bias")     # the same function as ours: "best peer of the branch"
METHODS = ("ours", "sdpa_bias", "flex_bias", "sdpa_nobias", "sdpa_full", "reference")


# ---------------------------------------------------------------------------------------------
# methods
# ---------------------------------------------------------------------------------------------
def ours(c):
    from torch_geometric_bsa.kernels.ball import ball_attention_triton
    return ball_attention_triton(c["q"], c["k"], c["v"], c["pos"], c["sigma"], c["mask"], c["m"])


def _balls(t, m):
    n, h, d = t.shape
    return t.view(n // m, m, h, d).transpose(1, 2)  # [nb, H, m, D]


def _unballs(o, n):
    return o.transpose(1, 2).reshape(n, o.size(1), o.size(3))


def sdpa_bias(c):
    # Erwin's BallMSA: bias = sigma * cdist(ball positions) as attn_mask (+ -inf for padded keys)
    q, m, n = c["q"], c["m"], c["q"].size(0)
    pb = c["pos"].view(n // m, m, -1)
    bias = c["sigma"].view(1, -1, 1, 1) * torch.cdist(pb, pb)[:, None]
    bias = bias.masked_fill(~c["mask"].view(n // m, 1, 1, m), -math.inf).to(q.dtype)
    o = F.scaled_dot_product_attention(_balls(q, m), _balls(c["k"], m), _balls(c["v"], m), attn_mask=bias)
    return _unballs(o, n)


def sdpa_nobias(c):
    m, n = c["m"], c["q"].size(0)
    return _unballs(F.scaled_dot_product_attention(_balls(c["q"], m), _balls(c["k"], m), _balls(c["v"], m)), n)


def sdpa_full(c):
    qf, kf, vf = c["full"]  # [B, n_c, H, D], input order, no padding
    return F.scaled_dot_product_attention(qf.transpose(1, 2), kf.transpose(1, 2), vf.transpose(1, 2))


def reference(c):
    from torch_geometric_bsa.reference import ball_attention
    return ball_attention(c["q"], c["k"], c["v"], c["pos"], c["sigma"], c["mask"], c["m"])


_FLEX = {}


def flex_bias(c):
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention
    if "fn" not in _FLEX:
        _FLEX["fn"] = torch.compile(flex_attention, dynamic=False)
    key = (c["q"].shape, c["m"])
    if _FLEX.get("key") != key:  # the block mask is built once per tree, like the tree (not timed)
        mask, m, n = c["mask"], c["m"], c["q"].size(0)

        def ball_mask(b, h, qi, ki):
            return (qi // m == ki // m) & mask[ki]
        _FLEX["bm"] = create_block_mask(ball_mask, None, None, n, n, device=c["q"].device)
        _FLEX["key"] = key
    px, py, pz = (c["pos"][:, i].contiguous() for i in range(3))
    sigma = c["sigma"]

    def bias(score, b, h, qi, ki):
        dx, dy, dz = px[qi] - px[ki], py[qi] - py[ki], pz[qi] - pz[ki]
        return score + sigma[h] * torch.sqrt(dx * dx + dy * dy + dz * dz)
    t = lambda x: x.transpose(0, 1)[None]  # noqa: E731  [1, H, N, D]
    o = _FLEX["fn"](t(c["q"]), t(c["k"]), t(c["v"]), score_mod=bias, block_mask=_FLEX["bm"])
    return o[0].transpose(0, 1)


FNS = dict(ours=ours, sdpa_bias=sdpa_bias, flex_bias=flex_bias, sdpa_nobias=sdpa_nobias,
           sdpa_full=sdpa_full, reference=reference)


# ---------------------------------------------------------------------------------------------
# cases
# ---------------------------------------------------------------------------------------------
def make_case(layout, n, h, d, m, seed=0, device="cuda", dtype=torch.bfloat16):
    from torch_geometric_bsa import build_ball_tree
    g = torch.Generator(device=device).manual_seed(seed)
    if layout == "cloud":
        clouds, per = 1, n
    else:
        clouds, per = max(1, round(n / CLOUD)), CLOUD
    pos = torch.rand(clouds * per, 3, device=device, generator=g)
    batch = torch.arange(clouds, device=device).repeat_interleave(per)
    tree = build_ball_tree(pos, batch, ball_size=m)
    npad = tree.num_slots
    rnd = lambda *s: torch.randn(*s, device=device, dtype=dtype, generator=g).requires_grad_()  # noqa: E731
    c = dict(layout=layout, points=clouds * per, clouds=clouds, n_pad=npad, h=h, d=d, m=m,
             q=rnd(npad, h, d), k=rnd(npad, h, d), v=rnd(npad, h, d), pos=tree.to_tree(pos),
             sigma=torch.full((h,), -1.0, device=device, requires_grad=True), mask=tree.mask,
             full=(rnd(clouds, per, h, d), rnd(clouds, per, h, d), rnd(clouds, per, h, d)))
    return c


def grad_inputs(name, c):
    if name == "sdpa_full":
        return list(c["full"])
    if name == "sdpa_nobias":
        return [c["q"], c["k"], c["v"]]
    return [c["q"], c["k"], c["v"], c["sigma"]]


def skip_reason(name, c, args):
    if name == "sdpa_full" and c["layout"] == "cloud" and c["points"] > args.full_max:
        return f"N > {args.full_max}"
    if name == "flex_bias" and args.flex_sizes and c["points"] not in args.flex_sizes and c["layout"] == "cloud":
        return "not in --flex-sizes"
    if name == "flex_bias" and c["layout"] == "batch" and not args.flex_batch:
        return "batch layout: compile time"
    if name == "reference" and c["n_pad"] > args.ref_max:
        return f"N > {args.ref_max}"
    return None


def measure(name, c, rep):
    fn = FNS[name]
    inputs = grad_inputs(name, c)
    out = fn(c)
    do = torch.randn_like(out)
    try:
        torch.autograd.grad(out, inputs, do)
    except RuntimeError as e:  # e.g. a peer that cannot differentiate sigma: drop it, note it
        if name == "flex_bias" and inputs[-1] is c["sigma"]:
            inputs = inputs[:3]
            c = dict(c, sigma=c["sigma"].detach())
            torch.autograd.grad(fn(c), inputs, do)
            print(f"  note: {name} without sigma grad ({str(e).splitlines()[0][:80]})")
        else:
            raise
    del out

    def fwd():
        with torch.no_grad():
            fn(c)

    def fwd_bwd():
        torch.autograd.grad(fn(c), inputs, do)
    r = dict(fwd_ms=bench_gpu(fwd, rep=rep), fb_ms=bench_gpu(fwd_bwd, rep=rep), mem_mb=peak_memory_mb(fwd_bwd))
    return r


def floor_ms(c):
    n, h, d, m = c["n_pad"], c["h"], c["d"], c["m"]
    fl_f = 4.0 * n * m * h * d          # QK^T and PV
    fl_fb = fl_f * 3.5                    # + 5 matmuls in the backward
    by_f = 4 * n * h * d * 2              # read q, k, v; write o (bf16)
    by_fb = by_f + 8 * n * h * d * 2      # read q, k, v, o, do; write dq, dk, dv
    return (max(fl_f / MATMUL_TFLOPS / 1e9, by_f / COPY_TBS / 1e9),
            max(fl_fb / MATMUL_TFLOPS / 1e9, by_fb / COPY_TBS / 1e9), fl_fb)


def check_ours(c):
    # fresh-input sanity: ours vs the reference computed in float32 on the same inputs
    from torch_geometric_bsa.reference import ball_attention
    with torch.no_grad():
        o = ours(c).float()
        r = ball_attention(c["q"].float(), c["k"].float(), c["v"].float(), c["pos"], c["sigma"], c["mask"], c["m"])
    return ((o - r).norm() / r.norm()).item()


# ---------------------------------------------------------------------------------------------
# main sweep
# ---------------------------------------------------------------------------------------------
def run(args):
    results = []
    heads = [tuple(int(x) for x in s.split("x")) for s in args.heads.split(",")]
    for layout in args.layouts.split(","):
        for n in args.sizes:
            for h, d in heads:
                torch.cuda.empty_cache()
                try:
                    c = make_case(layout, n, h, d, args.ball_size)
                except torch.OutOfMemoryError:
                    print(f"OOM building {layout} N={n}")
                    continue
                base = dict(layout=layout, N=c["points"], clouds=c["clouds"], H=h, D=d, m=args.ball_size)
                err = check_ours(c) if c["n_pad"] <= args.ref_max else None
                for name in args.methods.split(","):
                    row = dict(base, method=name)
                    why = skip_reason(name, c, args)
                    if why:
                        row["skipped"] = why
                    else:
                        t0 = time.time()
                        try:
                            row.update(measure(name, c, args.rep))
                        except Exception as e:  # noqa: BLE001 - OOM or a peer failing at this size
                            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"
                            if args.verbose:
                                traceback.print_exc()
                            torch.cuda.empty_cache()
                        row["wall_s"] = round(time.time() - t0, 1)
                    if name == "ours":
                        ff, ffb, flops = floor_ms(c)
                        row.update(err=err, floor_fwd_ms=ff, floor_fb_ms=ffb,
                                   tflops_fb=flops / row["fb_ms"] / 1e9 if "fb_ms" in row else None)
                    results.append(row)
                    print({k: (round(v, 4) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                del c
    add_ratios(results)
    return results


def add_ratios(results):
    groups = {}
    for r in results:
        groups.setdefault((r["layout"], r["N"], r["H"], r["D"]), {})[r["method"]] = r
    for g in groups.values():
        full = g.get("sdpa_full", {}).get("fb_ms")
        peers = [g[p] for p in PEERS if p in g and "fb_ms" in g[p]]
        best_fb = min((p["fb_ms"] for p in peers), default=None)
        best_f = min((p["fwd_ms"] for p in peers), default=None)
        for r in g.values():
            if "fb_ms" not in r:
                continue
            r["x_full"] = full / r["fb_ms"] if full else None
            r["x_peer"] = best_fb / r["fb_ms"] if best_fb else None
            r["x_peer_fwd"] = best_f / r["fwd_ms"] if best_f else None
            if r["method"] == "ours":
                r["floor_frac"] = r["floor_fb_ms"] / r["fb_ms"]


COLS = ["layout", "N", "H", "D", "method", "fwd_ms", "fb_ms", "mem_mb", "x_full", "x_peer", "x_peer_fwd",
        "floor_frac", "err"]
FMT = dict(fwd_ms=".3f", fb_ms=".3f", mem_mb=".0f", x_full=".2f", x_peer=".2f", x_peer_fwd=".2f",
           floor_frac=".2f", err=".1e")


def table_rows(results):
    rows = []
    for r in results:
        r = dict(r)
        if "skipped" in r or "error" in r:
            r["fwd_ms"] = r.get("skipped") or r.get("error", "")[:40]
        rows.append(r)
    return rows


def plot(results, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib missing: no PNG")
        return
    panels = sorted({(r["layout"], r["H"], r["D"]) for r in results})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (layout, h, d) in zip(axes[0], panels):
        for name in METHODS:
            pts = sorted((r["N"], r["fb_ms"]) for r in results
                         if r["method"] == name and (r["layout"], r["H"], r["D"]) == (layout, h, d) and "fb_ms" in r)
            if pts:
                ax.loglog(*zip(*pts), marker="o", label=name, lw=2.5 if name == "ours" else 1.2)
        ax.set_title(f"{layout}, heads {h}, dim {d}, bf16")
        ax.set_xlabel("points N")
        ax.set_ylabel("fwd+bwd ms (median)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    print("wrote", path)


# ---------------------------------------------------------------------------------------------
# launch-config sweep of our kernel
# ---------------------------------------------------------------------------------------------
FWD_CFGS = [(128, 64, 4, 3), (128, 64, 8, 3), (128, 64, 4, 2), (128, 32, 4, 3), (64, 64, 4, 3), (64, 64, 4, 2),
            (64, 32, 4, 3), (128, 128, 8, 2), (256, 64, 8, 2), (64, 128, 4, 2)]
BWD_CFGS = [(128, 32, 32, 4, 3), (128, 32, 32, 8, 3), (128, 64, 64, 8, 2), (128, 16, 16, 4, 3), (64, 32, 32, 4, 3),
            (64, 64, 64, 4, 2), (128, 32, 64, 4, 3), (128, 64, 32, 8, 2),
            # merged one-loop backward: (BLOCK, BLOCK_B, -, warps, stages, True)
            (128, 64, 64, 8, 2, True), (64, 64, 64, 4, 2, True), (64, 32, 32, 4, 3, True),
            (128, 32, 32, 8, 3, True), (64, 64, 64, 8, 2, True)]


def _forced(kind, cfg):
    # a FWD_CFGS / BWD_CFGS tuple as the ball kernel's launch entries (_common.launch_config)
    if kind == "fwd":
        return dict(zip(("BLOCK_M", "BLOCK_N", "num_warps", "num_stages"), cfg))
    return dict(zip(("BLOCK", "BLOCK_M1", "BLOCK_N2", "num_warps", "num_stages"), cfg), MERGED=len(cfg) > 5 and cfg[5])


def sweep(args):
    from torch_geometric_bsa.kernels._common import launch_config
    out = []
    heads = [tuple(int(x) for x in s.split("x")) for s in args.heads.split(",")]
    for h, d in heads:
        c = make_case("cloud", args.sweep_n, h, d, args.ball_size)
        inputs = grad_inputs("ours", c)
        do = torch.randn_like(c["q"])
        for kind, cfgs in (("fwd", FWD_CFGS), ("bwd", BWD_CFGS)):
            for cfg in cfgs:
                if cfg[0] > args.ball_size:
                    continue
                try:
                    with launch_config("ball_" + kind, **_forced(kind, cfg)):
                        t0 = time.time()
                        if kind == "fwd":
                            with torch.no_grad():
                                ours(c)
                            ms = bench_gpu(lambda: ours(c), rep=args.rep)
                        else:
                            torch.autograd.grad(ours(c), inputs, do)
                            ms = bench_gpu(lambda: torch.autograd.grad(ours(c), inputs, do), rep=args.rep)
                        err = check_ours(c)
                    row = dict(H=h, D=d, kind=kind, cfg=cfg, ms=ms, err=err, compile_s=round(time.time() - t0, 1))
                except Exception as e:  # noqa: BLE001 - a config that does not compile (shared memory)
                    row = dict(H=h, D=d, kind=kind, cfg=cfg, error=f"{type(e).__name__}: {str(e)[:100]}")
                print(row, flush=True)
                out.append(row)
    return out


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")],
                   default=[1024, 4096, 16384, 65536, 262144, 1048576])
    p.add_argument("--heads", default="8x64,4x32")
    p.add_argument("--layouts", default="cloud,batch")
    p.add_argument("--methods", default=",".join(METHODS))
    p.add_argument("--ball-size", type=int, default=256)
    p.add_argument("--full-max", type=int, default=65536, help="largest single cloud for SDPA full attention")
    p.add_argument("--ref-max", type=int, default=1 << 20)
    p.add_argument("--flex-sizes", type=lambda s: [int(x) for x in s.split(",")], default=None,
                   help="single-cloud sizes for FlexAttention (each size compiles anew)")
    p.add_argument("--flex-batch", action="store_true", help="also FlexAttention on the batch layout")
    p.add_argument("--rep", type=int, default=100, help="do_bench rep (ms)")
    p.add_argument("--sweep", action="store_true")
    p.add_argument("--sweep-n", type=int, default=65536)
    p.add_argument("--plot", default=None, help="redraw the PNG from this JSON and exit")
    p.add_argument("--tag", default="bench_ball")
    p.add_argument("--verbose", action="store_true")
    args = p.parse_args()
    if args.plot:
        import json
        res = json.load(open(args.plot))
        plot(res["results"], os.path.splitext(args.plot)[0] + ".png")
        return
    od = out_dir()
    info = env_info()
    print(info)
    if args.sweep:
        res = sweep(args)
        write_json(os.path.join(od, f"{args.tag}_sweep.json"), dict(env=info, args=vars(args), results=res))
        for kind in ("fwd", "bwd"):
            for hd in {(r["H"], r["D"]) for r in res}:
                ok = sorted((r["ms"], r["cfg"]) for r in res if r["kind"] == kind and (r["H"], r["D"]) == hd and "ms" in r)
                print(f"best {kind} {hd}: " + ", ".join(f"{cfg} {ms:.3f}" for ms, cfg in ok[:4]))
        return
    res = run(args)
    write_json(os.path.join(od, f"{args.tag}.json"), dict(env=info, args=vars(args), results=res))
    plot(res, os.path.join(od, f"{args.tag}.png"))
    rows = table_rows(res)
    with open(os.path.join(od, f"{args.tag}.md"), "w") as f:
        f.write(markdown_table(rows, COLS, FMT) + "\n")
    print(info)
    print(format_table(rows, COLS, FMT))


if __name__ == "__main__":
    main()
