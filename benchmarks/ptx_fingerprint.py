"""Compile every BSA kernel variant for a GPU target without a GPU and fingerprint its PTX.

For kernel refactors that must not change the generated code: run it in two checkouts and compare
the JSON files (``--compare``). Triton's NVIDIA backend (shipped in the pip wheel) compiles for
``sm_90`` on a CPU-only machine; line info is switched off so that moved source lines do not count.
The variants are the configs the launch rules pick on a GPU (``_common._RULES``, not the
interpreter's tiles) at representative shapes, every compression autotuning candidate, shared and
per-head selection, partial and final dK/dV, the combine with gates or gate logits.

Usage: ``python benchmarks/ptx_fingerprint.py --out a.json`` (~2 min on 2 cores), then in the other
checkout ``python benchmarks/ptx_fingerprint.py --out b.json --compare a.json``.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be real JITFunctions
os.environ["TRITON_DISABLE_LINE_INFO"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402
import triton  # noqa: E402

F32 = {"LSE", "DELTA", "POS", "SIGMA", "DSIG", "DPOS", "SK", "SV"}
MASKS = {"MASK", "KMASK", "SVALID"}
I32 = {"IDX", "KSTART", "KEND", "QSTART", "QEND", "GSTART", "GEND", "BPTR", "PTR"}
TY = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def variants():
    r"""``(kernel, dtype, constexprs, num_warps, num_stages, mask type)`` for every variant."""
    from torch_geometric_bsa.kernels import _common as C
    from torch_geometric_bsa.kernels import ball, combine, compressed, selected, topk
    from torch_geometric_bsa.kernels._common import dot_dim, dot_precision, next_pow2
    rule = C._RULES
    out = []

    def add(fn, dtype, const, cfg, mask="i8"):
        cfg = dict(cfg)
        nw, ns = cfg.pop("num_warps"), cfg.pop("num_stages", 3)
        out.append((fn, dtype, {**const, **cfg}, nw, ns, mask))

    for dt in (torch.float32, torch.bfloat16, torch.float16):
        for d in (32, 64, 128):
            for m in (64, 256):
                base = dict(M=m, D=d, BLOCK_D=dot_dim(d), PDIM=3, DOT_PREC=dot_precision(dt), UPCAST=False)
                add(ball._ball_fwd_kernel, dt, base, rule["ball_fwd"](m=m, d=dot_dim(d), dtype=dt), "u8")
                cfg = rule["ball_bwd"](m=m, d=dot_dim(d), dtype=dt)
                merged, bm1, bn2 = cfg.pop("MERGED"), cfg.pop("BLOCK_M1"), cfg.pop("BLOCK_N2")
                grads = dict(base, SIGMA_GRAD=True, POS_GRAD=True)
                if merged:
                    add(ball._ball_bwd_merged_kernel, dt, dict(grads, BLOCK_B=bm1), cfg, "u8")
                else:
                    add(ball._ball_bwd_kernel, dt, dict(grads, BLOCK_M1=bm1, BLOCK_N2=bn2), cfg, "u8")
    base = dict(M=256, D=64, BLOCK_D=64, PDIM=2, UPCAST=False, SIGMA_GRAD=False, POS_GRAD=False)
    add(ball._ball_bwd_kernel, torch.bfloat16, dict(base, DOT_PREC="tf32", BLOCK=64, BLOCK_M1=32, BLOCK_N2=32),
        dict(num_warps=4, num_stages=2), "u8")
    add(ball._ball_bwd_merged_kernel, torch.float32, dict(base, DOT_PREC="ieee", BLOCK=64, BLOCK_B=32),
        dict(num_warps=4, num_stages=3), "u8")
    for name, tuner in (("cmp_fwd", compressed._cmp_fwd), ("cmp_dkdv", compressed._cmp_dkdv),
                        ("cmp_dq", compressed._cmp_dq)):
        for cfg in C._TUNE[name]:
            add(tuner.fn, torch.bfloat16, dict(H=8, D=64, BLOCK_D=64, PREC="tf32", RAGGED=True), cfg)
        for dt, d, ragged in ((torch.float32, 24, False), (torch.float16, 8, True)):
            add(tuner.fn, dt, dict(H=4, D=d, BLOCK_D=dot_dim(d), PREC=dot_precision(dt), RAGGED=ragged), rule[name]())
    for dt, d, g, ls, tk, per_head in ((torch.bfloat16, 64, 8, 8, 16, False), (torch.float32, 32, 8, 8, 16, False),
                                       (torch.bfloat16, 64, 8, 8, 16, True), (torch.float16, 8, 4, 4, 2, False)):
        ex = dict(PER_HEAD=True) if per_head else {}
        for fn, kind in ((selected._slc_fwd_kernel, "slc_fwd"), (selected._slc_bwd_dq_kernel, "slc_dq")):
            cfg = rule[kind](dtype=dt, d=d)
            ls_p2, cb, gm, gt = selected._tiles(cfg.pop("rows"), cfg.pop("keys"), ls, tk, g)
            add(fn, dt, dict(G=g, H=8, D=d, LS=ls, LS_P2=ls_p2, TOPK=tk, CB=cb, GM=gm, GT=gt, BLOCK_D=dot_dim(d),
                             PREC=dot_precision(dt), **ex), cfg)
        cfg = rule["slc_dkdv"](d=d)
        gb = max(1, cfg.pop("rows") // next_pow2(g))
        chunk = gb * cfg.pop("steps")
        for partial in (True, False):
            add(selected._slc_bwd_dkdv_kernel, dt,
                dict(G=g, G_P2=next_pow2(g), H=8, D=d, TOPK=tk, LS=ls, LP=max(16, next_pow2(ls)), GB=gb, CHUNK=chunk,
                     BLOCK_D=dot_dim(d), PREC=dot_precision(dt), PARTIAL=partial, **ex), cfg)
    add(selected._list_ptr_kernel, torch.float32, dict(BLOCK=1024), dict(num_warps=4))
    for qpg in (8, 1):
        add(topk._score_topk_kernel, torch.bfloat16,
            dict(H=8, D=64, QPG=qpg, TOPK=16, TOPK_P2=16, BLOCK_D=64, PREC="tf32"), rule["topk"](qpg=qpg, n_g=4096))
    for qu in (1, 8):
        for fn in (combine._combine_fwd_kernel, combine._combine_bwd_kernel):
            add(fn, torch.bfloat16, dict(H=8, D=64, QU=qu, BLOCK_D=64), rule["combine"](qu=qu, d=64), "u8")
            add(fn, torch.bfloat16, dict(H=8, D=64, QU=qu, BLOCK_D=64, LOGITS=True), rule["combine"](qu=qu, d=64),
                "u8")
    for fn in (combine._pool_fwd_kernel, combine._pool_bwd_kernel):
        add(fn, torch.bfloat16, dict(HD=512, L=8), rule["pool"](hd=512, block=8), "u8")
    return out


def compile_ptx(fn, dtype, const, num_warps, num_stages, mask, arch):
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, consts = {}, {}
    for p in fn.params:
        n = p.name
        if p.is_constexpr or n in const:
            sig[n] = "constexpr"
            consts[n] = const.get(n, p.default)
        elif n[0].isupper() and n not in ("N", "H"):  # pointers
            sig[n] = "*" + ("fp32" if n in F32 else mask if n in MASKS else "i32" if n in I32
                            else "i64" if n == "BGRP" else "i16" if n == "SORTED" else TY[dtype])
        else:
            sig[n] = "fp32" if "scale" in n else "i32"
    k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=consts), target=GPUTarget("cuda", arch, 32),
                       options=dict(num_warps=num_warps, num_stages=num_stages))
    return "\n".join(line for line in k.asm["ptx"].splitlines() if not line.strip().startswith((".file", ".loc")))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="ptx_fingerprint.json")
    ap.add_argument("--compare", help="a JSON file written by this script in another checkout")
    ap.add_argument("--arch", type=int, default=90)
    ap.add_argument("--only", help="compile only the kernels whose name contains this string")
    args = ap.parse_args()
    rows = []
    for fn, dtype, const, nw, ns, mask in variants():
        if args.only and args.only not in fn.__name__:
            continue
        key = f"{fn.__name__} {TY[dtype]} {json.dumps(const, sort_keys=True)} w{nw} s{ns}"
        ptx = compile_ptx(fn, dtype, const, nw, ns, mask, args.arch)
        rows.append(dict(variant=key, ptx_sha1=hashlib.sha1(ptx.encode()).hexdigest(),
                         instructions=len(re.findall(r"^\s+[a-z@]", ptx, re.M))))
        print(rows[-1]["ptx_sha1"][:12], key, flush=True)
    with open(args.out, "w") as f:
        json.dump(dict(triton=triton.__version__, arch=args.arch, rows=rows), f, indent=1)
    if args.compare:
        with open(args.compare) as f:
            other = {r["variant"]: r["ptx_sha1"] for r in json.load(f)["rows"]}
        same = sum(other.get(r["variant"]) == r["ptx_sha1"] for r in rows)
        missing = sum(r["variant"] not in other for r in rows)
        print(f"{same} of {len(rows)} variants have identical PTX; {missing} not in {args.compare}")
        if same != len(rows):
            raise SystemExit(1)


if __name__ == "__main__":
    main()
