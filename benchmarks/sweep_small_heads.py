"""Tile sweeps of the ball and selected-attention kernels at a model's layer shape (GPU).

The kernels' launch rules were tuned at head dim 64 (``bench_bsa.py``). The paper's model has
C=64 over 8 heads, so head dim 8 (16 in the kernels' dots): the tiles and warps that suit one may not
suit the other. This times, at one layer of that model on ``--clouds`` x ``--points`` (bf16):

- the ball kernel's forward, and its forward + backward (sigma taking a gradient, as in the model),
  over (BLOCK_M, BLOCK_N, warps) and (BLOCK, BLOCK_M1, warps) of the one-loop backward;
- the selected attention's forward, and forward + backward, over warps and stages of the forward
  and dQ kernels and (rows, steps, warps) of the dK/dV kernel;
- the compression branch's forward + backward over the split of its dK/dV kernel's query stream and
  (BLOCK_M, BLOCK_N, warps, stages) of that kernel (``--kernels cmp``; ``--per-query`` for one compression query per point, the examples'
  study network, instead of one per group). Its grid is (key tiles, heads): at a layer of 8 clouds
  the default tiles give a few hundred programs for 132 multiprocessors, so splits and smaller key
  tiles are among the candidates.

Times are GPU-busy milliseconds (the kernels' summed device time, ``torch.profiler``), not wall time:
at this size the host paces a lone layer's calls. Every candidate's output and gradients are
compared with the default tiles' (same inputs; bf16
tolerance 2e-2) so that a faster tiling that computes something else cannot win. It prints a table,
writes ``sweep_small_heads.json`` (every row, and ``best``: kernel -> forced entries) to $OUT, and the
``best`` part alone to ``--best FILE``, for ``bench_model.py --launch-config FILE``.

Usage (GPU): ``python benchmarks/sweep_small_heads.py --clouds 8 --points 3586 --heads 8 --dim 8 --best best.json``
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, format_table, out_dir, write_json  # noqa: E402


def make_layer(clouds, points, heads, dim, cfg, seed=0):
    from torch_geometric_bsa import build_ball_tree
    g = torch.Generator(device="cuda").manual_seed(seed)
    pos = torch.rand(clouds * points, 3, device="cuda", generator=g)
    batch = torch.arange(clouds, device="cuda").repeat_interleave(points)
    tree = build_ball_tree(pos, batch, ball_size=cfg.ball_size)
    n = tree.mask.numel()
    rnd = lambda *s: torch.randn(*s, device="cuda", dtype=torch.bfloat16, generator=g)  # noqa: E731
    return dict(tree=tree, pos=tree.to_tree(pos).to(torch.bfloat16), q=rnd(n, heads, dim), k=rnd(n, heads, dim),
                v=rnd(n, heads, dim), do=rnd(n, heads, dim),
                sigma=torch.full((heads,), -1.0, device="cuda", dtype=torch.bfloat16, requires_grad=True))


def selection(c, cfg):
    from torch_geometric_bsa.kernels import compression_branch
    from torch_geometric_bsa.kernels import topk as T
    from torch_geometric_bsa.kernels.plan import selection_plan
    _, lse, q_cmp, _, kc, _, cm, ranges = compression_branch(c["q"], c["k"], c["v"], c["tree"], cfg)
    sel = selection_plan(c["tree"], cfg.group_size, cfg.slc_block, cfg.topk, cfg.cmp_window)
    return T.select_topk_triton(q_cmp, kc, lse, cm, sel[0], ranges[:2], sel[1], sel[2])


def _bench(fn, reps: int = 20):
    r"""GPU milliseconds a call of ``fn``: the summed device time of the kernels it launches
    (``torch.profiler``), averaged over ``reps`` calls after a warm-up. Not ``do_bench``'s wall time
    between events: at one layer of 3,586-point clouds each kernel runs for tens of microseconds and
    the host's launches pace the calls, so wall time measures the host (the first version of this
    sweep did; perf-notes, "Small-head tiles")."""
    from torch.profiler import ProfilerActivity, profile
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    busy = sum(e.device_time_total for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    return busy / 1e3 / reps


def sweep(name, fwd, candidates, contexts, rows, tol=2e-2):
    r"""Times ``fwd`` and its backward for the default and each candidate (a dict of kernel ->
    entries, applied through ``contexts``); checks each against the default's results."""
    def fb():
        out = fwd()
        return (out,) + torch.autograd.grad(out, fwd.inputs, fwd.do)

    ref = [t.float() for t in fb()]
    rows.append(dict(kernel=name, tiles="default *", fwd_ms=_bench(fwd), ms=_bench(fb), ok=True, forced={}))
    print(rows[-1], flush=True)
    for forced in candidates:
        tiles = " ".join(f"{k}:{','.join(f'{a}={b}' for a, b in v.items())}" for k, v in forced.items())
        try:
            with contexts(forced):
                got = fb()
                ok = all(torch.allclose(a.float(), b, rtol=tol, atol=tol) for a, b in zip(got, ref))
                rows.append(dict(kernel=name, tiles=tiles, fwd_ms=_bench(fwd), ms=_bench(fb), ok=ok,
                                 forced=forced))
        except Exception as e:  # noqa: BLE001  (a tiling that does not compile is a row, not the end)
            rows.append(dict(kernel=name, tiles=tiles, err=f"{type(e).__name__}: {e}"[:160], forced=forced))
        print(rows[-1], flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--clouds", type=int, default=8)
    ap.add_argument("--points", type=int, default=3586)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--dim", type=int, default=8)
    ap.add_argument("--topk", type=int, default=4)
    ap.add_argument("--time-limit", type=float, default=240.0, help="seconds for both sweeps")
    ap.add_argument("--kernels", default="ball,slc", help="which sweeps: ball, slc, cmp, topk")
    ap.add_argument("--per-query", action="store_true",
                    help="per-query compression (the study network) instead of group compression")
    ap.add_argument("--best", default=None, help="also write the winners here (bench_model.py --launch-config)")
    args = ap.parse_args()
    import contextlib
    from torch_geometric_bsa import BSAConfig
    from torch_geometric_bsa.kernels import selected as S
    from torch_geometric_bsa.kernels._common import launch_config
    from torch_geometric_bsa.kernels.ball import ball_attention_triton

    def contexts(forced):
        stack = contextlib.ExitStack()
        for kernel, entries in forced.items():
            stack.enter_context(launch_config(kernel, **entries))
        return stack

    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=args.topk, group_size=8,
                    group_compression=not args.per_query)
    info, rows, t0 = env_info(), [], time.time()
    print(info, flush=True)
    c = make_layer(args.clouds, args.points, args.heads, args.dim, cfg)
    q, k, v = (c[x].requires_grad_() for x in ("q", "k", "v"))
    mask = c["tree"].mask

    def ball():
        return ball_attention_triton(q, k, v, c["pos"], c["sigma"], mask, cfg.ball_size)
    ball.inputs, ball.do = (q, k, v, c["sigma"]), c["do"]
    fwd_c = [dict(ball_fwd=dict(BLOCK_M=bm, BLOCK_N=bn, num_warps=w))
             for bm, bn, w in itertools.product((64, 128), (32, 64, 128), (2, 4, 8))]
    # the one-loop backward: BLOCK keys and queries a program, steps of BLOCK_M1 (its BLOCK_B)
    bwd_c = [dict(ball_bwd=dict(BLOCK=b, BLOCK_M1=bb, num_warps=w, MERGED=True))
             for b, bb, w in itertools.product((32, 64, 128), (16, 32, 64), (2, 4, 8))]
    half = t0 + args.time_limit / 2
    kernels = args.kernels.split(",")
    if "ball" in kernels:
        sweep("ball_fwd", ball, fwd_c, lambda f: contexts(f) if time.time() < half else _skip(), rows)
        sweep("ball_bwd", ball, bwd_c, lambda f: contexts(f) if time.time() < half + args.time_limit / 4 else _skip(),
              rows)

    idx = selection(c, cfg)

    def slc():
        return S.selected_attention_triton(q, k, v, idx, mask, cfg.group_size, cfg.slc_block)
    slc.inputs, slc.do = (q, k, v), c["do"]
    # rows 8: one group a program (the layout before group tiles: its 8 rows padded to 16)
    fq = [dict(slc_fwd=dict(group_rows=r, keys=kk, num_warps=w, union=False),
               slc_dq=dict(group_rows=r, keys=kk, num_warps=w))
          for r, kk, w in itertools.product((8, 32, 64, 128), (128, 256), (4, 8))]
    # the union walk: a tile's groups load each distinct selected block once (the forward's tiles
    # serve its dQ pass too)
    fq += [dict(slc_fwd=dict(rows=r, keys=kk, union=True, fallback=fb), slc_dq=dict(num_warps=w))
           for r, kk, w, fb in itertools.product((32, 64, 128), (64, 128), (4, 8), (False, True))]
    dkdv = [dict(slc_dkdv=dict(rows=r, steps=s, num_warps=w))
            for r, s, w in itertools.product((32, 64, 128), (2, 4, 8), (2, 4))]
    end = t0 + args.time_limit
    if "slc" in kernels:
        sweep("slc_fwd_dq", slc, fq, lambda f: contexts(f) if time.time() < end else _skip(), rows)
        sweep("slc_dkdv", slc, dkdv, lambda f: contexts(f) if time.time() < end else _skip(), rows)

    def cmp():
        from torch_geometric_bsa.kernels import compression_branch
        return compression_branch(q, k, v, c["tree"], cfg)[0]
    cmp.inputs = (q, k, v)
    with torch.no_grad():  # [N_pad / q_unit, H, D]: one row per pooled query with group compression
        cmp.do = torch.randn_like(cmp())
    # the query stream's split (cmp_split: 1 = none), then (BLOCK_M query rows streamed, BLOCK_N keys
    # resident, warps, stages) without a split: key tiles of 16 or 32 give 2-4x the programs too
    cmp_c = [dict(cmp_split=dict(SPLIT=sp)) for sp in (1, 2, 4, 8)]
    cmp_c += [dict(cmp_split=dict(SPLIT=sp), cmp_dkdv=dict(BLOCK_M=m, BLOCK_N=n, num_warps=w, num_stages=st))
              for sp, m, n, w, st in ((4, 64, 64, 4, 3), (2, 64, 128, 8, 2), (1, 64, 64, 4, 3), (1, 128, 32, 4, 2),
                                      (1, 64, 16, 2, 3))]
    if "cmp" in kernels:
        sweep("cmp_dkdv", cmp, cmp_c, lambda f: contexts(f) if time.time() < end else _skip(), rows)

    # the streamed top-k alone (no gradient): groups a program, key tiles, warps; every candidate's
    # indices must equal the default's exactly
    if "topk" in kernels:
        from torch_geometric_bsa.kernels import compression_branch
        from torch_geometric_bsa.kernels import topk as T
        from torch_geometric_bsa.kernels.plan import selection_plan
        with torch.no_grad():
            _, lse, q_cmp, _, kc, _, cm, ranges = compression_branch(q, k, v, c["tree"], cfg)
        sel = selection_plan(c["tree"], cfg.group_size, cfg.slc_block, cfg.topk, cfg.cmp_window)

        def topk():
            return T.select_topk_triton(q_cmp, kc, lse, cm, sel[0], ranges[:2], sel[1], sel[2])
        want = topk()
        rows.append(dict(kernel="topk", tiles="default *", fwd_ms=_bench(topk), ok=True, forced={}))
        print(rows[-1], flush=True)
        # (warps, key tiles, groups a program)
        combos = [dict(num_warps=w, BLOCK_N=bn, BLOCK_G=bg)
                  for w, bn, bg in itertools.product((8, 4), (64, 128, 32), (2, 4, 8, 16, 1))]
        for entries in combos:
            forced = dict(topk=entries)
            tiles = "topk:" + ",".join(f"{a}={b}" for a, b in entries.items())
            if time.time() > end:
                break
            try:
                with contexts(forced):
                    ok = bool(torch.equal(topk(), want))
                    rows.append(dict(kernel="topk", tiles=tiles, fwd_ms=_bench(topk), ok=ok, forced=forced))
            except Exception as e:  # noqa: BLE001
                rows.append(dict(kernel="topk", tiles=tiles, err=f"{type(e).__name__}: {e}"[:160], forced=forced))
            print(rows[-1], flush=True)

    best = {}
    for name, key in (("ball_fwd", "fwd_ms"), ("ball_bwd", "ms"), ("slc_fwd_dq", "fwd_ms"), ("slc_dkdv", "ms"),
                      ("cmp_dkdv", "ms"), ("topk", "fwd_ms")):
        good = [r for r in rows if r["kernel"] == name and r.get("ok")]
        if not good:
            continue
        win = min(good, key=lambda r: r[key])
        default = next(r for r in good if r["tiles"] == "default *")
        print(f"{name}: best {win['tiles']} {win[key]:.4f} ms against the default's {default[key]:.4f} ms")
        if win[key] < 0.97 * default[key]:  # 3%: under that, within the sweep's noise
            best.update(win["forced"])
    write_json(os.path.join(out_dir(), "sweep_small_heads.json"), dict(env=info, args=vars(args), rows=rows,
                                                                        best=best))
    if args.best:
        with open(args.best, "w") as f:
            json.dump(best, f, indent=1)
    print(format_table(rows, ["kernel", "tiles", "fwd_ms", "ms", "ok"], {"fwd_ms": ".4f", "ms": ".4f"}))
    print("best:", json.dumps(best))


class _Skipped(Exception):
    pass


def _skip():
    raise _Skipped("time limit")


if __name__ == "__main__":
    main()
