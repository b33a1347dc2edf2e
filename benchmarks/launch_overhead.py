"""Host time per call of each kernel wrapper, beside a plain PyTorch op: where an eager step's time goes.

An eager BSA step is paced by the host. This times, on a small input (so the GPU never falls
behind), the host microseconds of one call of: a PyTorch elementwise op and a linear map (baseline
launches); a raw Triton launch (`kernel[grid](...)`); each kernel wrapper (autograd Function, checks
and launch) in its forward; and the whole op, forward and forward + backward. ``--profile`` adds a
cProfile of 100 forward calls of the whole op. Writes launch_overhead.json
to $OUT (or bench_out).

    python benchmarks/launch_overhead.py [--calls 300]
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import env_info, out_dir, write_json  # noqa: E402


def host_us(fn, calls: int):
    try:
        return _host_us(fn, calls)
    except Exception as e:  # noqa: BLE001 - one failing case must not hide the others
        return f"error: {e!r}"[:200]


def _host_us(fn, calls: int) -> float:
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(calls):
        fn()
    host = time.perf_counter() - t
    torch.cuda.synchronize()
    return host / calls * 1e6


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--calls", type=int, default=300)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--profile", action="store_true", help="cProfile 100 forward calls of the whole op")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("launch_overhead.py needs CUDA")
    from torch_geometric_bsa import BSAConfig
    from torch_geometric_bsa.kernels import bsa_triton, combine, compressed, selected
    from torch_geometric_bsa.kernels.ball import ball_attention_triton
    from bench_bsa import make_case

    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=4, group_size=8, group_compression=True)
    c = make_case(args.n, 8, 8, cfg)  # the paper model's heads 8, dim 8: tiny kernels
    tree, q, k, v = c["tree"], c["q"], c["k"], c["v"]
    mask_u8 = tree.mask_as(torch.uint8)
    rows = {}
    x = torch.randn(args.n, 64, device="cuda", dtype=torch.bfloat16)
    rows["aten_mul"] = host_us(lambda: x.mul(2.0), args.calls)
    rows["aten_linear"] = host_us(lambda: torch.nn.functional.linear(x, x[:64]), args.calls)
    qd = q.detach()
    out = torch.empty((args.n // 8, 8, 8), device="cuda", dtype=torch.bfloat16)
    pool_cfg, grid = combine._pool_grid(args.n // 8, 64, 8)

    def raw():
        return combine._pool_fwd_kernel[grid](qd, mask_u8, out, args.n // 8, qd.stride(0), HD=64, L=8, **pool_cfg)
    rows["triton_raw_launch"] = host_us(raw, args.calls)
    with torch.no_grad():
        rows["masked_block_mean_fwd"] = host_us(lambda: combine.masked_block_mean(qd, mask_u8, 8), args.calls)
        rows["ball_fwd"] = host_us(lambda: ball_attention_triton(qd, qd, qd, c["pos"], c["sigma"].detach(), mask_u8,
                                                                 256), args.calls)
        qc = combine.masked_block_mean(qd, mask_u8, 8)
        from torch_geometric_bsa.kernels.plan import compressed_ranges
        rg = compressed_ranges(tree, 8, 8)
        mi8 = tree.mask.view(-1, 8).any(1).to(torch.int8)
        rows["compressed_fwd_autotuned"] = host_us(lambda: compressed.compressed_attention_triton(qc, qc, qc, mi8, rg,
                                                                                                 ragged=False),
                                                   args.calls)
        idx = torch.arange(args.n // 8, device="cuda", dtype=torch.int32)[:, None].repeat(1, 4) // 64 * 64
        rows["selected_fwd"] = host_us(lambda: selected.selected_attention_triton(qd, qd, qd, idx, tree.mask, 8, 8),
                                       args.calls)
        rows["bsa_triton_fwd"] = host_us(lambda: bsa_triton(qd, qd, qd, c["pos"], tree, cfg, sigma=c["sigma"].detach(),
                                                            gates=c["gates"].detach()), args.calls)

    if args.profile:
        import cProfile
        import pstats
        with torch.no_grad():
            fwd = lambda: bsa_triton(qd, qd, qd, c["pos"], tree, cfg, sigma=c["sigma"].detach(),  # noqa: E731
                                     gates=c["gates"].detach())
            prof = cProfile.Profile()
            prof.enable()
            for _ in range(100):
                fwd()
            prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)

    def fwd_bwd():
        o = bsa_triton(q, k, v, c["pos"], tree, cfg, sigma=c["sigma"], gates=c["gates"])
        o.backward(c["do"])
    rows["bsa_triton_fwd_bwd"] = host_us(fwd_bwd, max(20, args.calls // 10))
    info = env_info()
    print(info)
    for name, us in rows.items():
        print(f"{name:28s} {us if isinstance(us, str) else f'{us:9.1f} us'}")
    write_json(os.path.join(out_dir(), "launch_overhead.json"), dict(env=info, args=vars(args), host_us=rows))


if __name__ == "__main__":
    main()
