"""Compile every Triton launch of the BSA op for a Hopper GPU (sm_90) on a machine without one.

The op runs on CPU tensors with the GPU launch rules, and each launch is recorded instead of run:
the kernels take every launch argument from shapes, not values (no host reads), so the recorded
launches are the ones a GPU run makes, autotuning candidates included. Each distinct launch is
then compiled by Triton for sm_90 (front end, LLVM and ptxas all run on the CPU). The interpreter
accepts code that only a GPU compile rejects (a helper returning ``None``, a ``tl.dot`` with
K < 16), so CI runs this (``tests/kernels/test_gpu_compile.py``). Run it without
``TRITON_INTERPRET``: the interpreter patches ``triton.language`` for the whole process.

    python benchmarks/compile_sm90.py --dtype bfloat16 [--launch-config JSON] [--resources]

``--resources`` also prints each compiled kernel's registers, local memory (spills) and shared
memory, read from its cubin with the ``cuobjdump`` that ships with Triton (this machine's Triton
version: a GPU machine's may allocate differently).
"""
from __future__ import annotations

import argparse
import inspect
import os
import re
import subprocess
import sys
import tempfile

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from torch_geometric_bsa import BSAConfig  # noqa: E402

DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.int8: "i8", torch.uint8: "u8",
          torch.int16: "i16", torch.int32: "i32", torch.int64: "i64"}
OPTIONS = ("num_warps", "num_stages")


def _record():
    r"""Replaces every Triton launch in this process by a recorder; returns the list it fills with
    ``(python function, args, kwargs)`` (the autotuned ones once per candidate config)."""
    # every launch is recorded, not run (the autotuned ones once per candidate config)
    from triton.runtime.autotuner import Autotuner
    from triton.runtime.jit import JITFunction
    launches = []

    def run(self, *args, grid, warmup, **kwargs):
        launches.append((self.fn, args, kwargs))

    def tuned(self, *args, **kwargs):
        for config in self.configs:
            self.fn.run(*args, **kwargs, **config.all_kwargs())

    JITFunction.run = run
    Autotuner.run = tuned
    return launches


def _source(fn, args, kwargs):
    # (ASTSource, options, key) of one recorded launch: tensors are pointers, ints i32/i64, floats
    # fp32, None and constexpr parameters compile-time constants (defaults included)
    from triton.compiler import ASTSource
    from triton.runtime.jit import JITFunction
    params = inspect.signature(fn).parameters
    bound = dict(zip(params, args), **{k: v for k, v in kwargs.items() if k not in OPTIONS})
    sig, const = {}, {}
    for name, p in params.items():
        value = bound.get(name, p.default)
        if "constexpr" in str(p.annotation) or value is None:
            assert value is not inspect.Parameter.empty, (fn.__name__, name)
            sig[name], const[name] = "constexpr", value
        elif isinstance(value, torch.Tensor):
            sig[name] = "*" + DTYPES[value.dtype]
        elif isinstance(value, bool):
            sig[name] = "i1"
        elif isinstance(value, int):
            sig[name] = "i32" if -2 ** 31 <= value < 2 ** 31 else "i64"
        else:
            sig[name] = "fp32"
    options = {k: kwargs[k] for k in OPTIONS if k in kwargs}
    key = (fn.__name__, tuple(sorted(sig.items())), tuple(sorted((k, repr(v)) for k, v in const.items())),
           tuple(sorted(options.items())))
    return ASTSource(JITFunction(fn), sig, constexprs=const), options, key


def _op(K, cfg, sizes, h, d, dtype, logits=False):
    from torch_geometric_bsa import build_ball_tree
    g = torch.Generator().manual_seed(0)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    tree = build_ball_tree(pos, batch, ball_size=cfg.ball_size)
    n = tree.num_slots
    qkv = torch.randn(n, 3, h, d, generator=g).to(dtype).requires_grad_()
    gates = torch.rand(n, h, cfg.num_branches, generator=g).to(dtype).requires_grad_()
    sigma = -torch.rand(h, generator=g).requires_grad_()
    ptree = tree.to_tree(pos).to(dtype).requires_grad_()
    q, k, v = qkv.unbind(1)
    kw = dict(gate_logits=gates) if logits else dict(gates=gates)
    out = K.bsa_triton(q, k, v, ptree, tree, cfg, sigma=sigma, **kw)
    out.backward(torch.ones_like(out))
    # the ball-only model's layer: the ball kernels alone, at the same heads (the op above fuses them
    # away at head dims up to 32)
    from torch_geometric_bsa.kernels.ball import ball_attention_triton
    out = ball_attention_triton(q, k, v, ptree, sigma, tree.mask, cfg.ball_size)
    out.backward(torch.ones_like(out))


# the model layers and the op benchmark's shapes, bf16 and fp32, and the other selection paths
CASES = [
    (BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=4, group_size=8, group_compression=True), 8, 8, True),
    (BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8), 4, 32, True),
    (BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8), 8, 64, False),
    (BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8, selection="per_head"), 4, 32, False),
    (BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=8, group_size=8, group_compression=True,
               cmp_window=1024), 8, 16, True),
]


def _resources(kernel) -> str:
    # registers, local memory (spills) and shared memory of a compiled kernel, from its cubin
    import triton
    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(kernel.asm["cubin"])
    try:
        text = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    regs, local = re.search(r"REG:(\d+)", text), re.search(r"LOCAL:(\d+)", text)
    return (f"registers {regs.group(1) if regs else '?'}, local {local.group(1) if local else '?'} B, "
            f"shared {kernel.metadata.shared} B")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    ap.add_argument("--launch-config", default=None, metavar="FILE|JSON",
                    help="launch entries forced on the kernels, e.g. \'{\"bsa_fwd\": {\"fused\": false}}\'")
    ap.add_argument("--resources", action="store_true", help="print each kernel's registers, spills, shared memory")
    args = ap.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    import triton
    from triton.backends.compiler import GPUTarget
    import torch_geometric_bsa.kernels as K
    from common import forced_launch_configs
    launches = _record()
    tags = []

    def op(tag, *a, **kw):
        n0 = len(launches)
        _op(K, *a, **kw)
        tags.extend([tag] * (len(launches) - n0))

    forced, _ = forced_launch_configs(args.launch_config)
    with forced:
        for i, (cfg, h, d, logits) in enumerate(CASES):
            op(f"case{i} H{h} D{d}", cfg, [1500, 3000], h, d, dtype, logits)
        with K._common.launch_config("slc_fwd", fallback=True):  # the union walk's optional second launch
            op("case1 fallback", CASES[1][0], [1500, 3000], 4, 32, dtype)
        # walk tiles of 16 groups in both passes (`bsa_fwd` `rows` alone: the forward's only)
        with K._common.launch_config("slc_fwd", rows=128), K._common.launch_config("slc_dq", rows=128), \
                K._common.launch_config("bsa_fwd", rows=128):
            op("case0 rows128", CASES[0][0], [1500, 3000], 8, 8, dtype, True)
    sources = {}
    for tag, (fn, a, kw) in zip(tags, launches):
        src, options, key = _source(fn, a, kw)
        sources.setdefault(key, (src, options, tag))
    names = {key[0] for key in sources}
    if not args.launch_config:
        # what the cases must reach: the fused forward, the union walk, the top-k, the separate combine
        # (per-head selection) and the coarse branch's kernels
        want = {"_bsa_fwd_kernel", "_union_kernel", "_slc_fwd_kernel", "_slc_bwd_dq_kernel", "_slc_bwd_dkdv_kernel",
                "_ball_fwd_kernel", "_score_topk_kernel", "_combine_fwd_kernel", "_cmp_fwd_kernel",
                # the ball backward: one loop in bf16, two in fp32
                "_ball_bwd_merged_kernel" if dtype == torch.bfloat16 else "_ball_bwd_kernel"}
        if not want <= names:
            print("launches missing:", sorted(want - names))
            return 2
    failed = []
    for key, (src, options, tag) in sources.items():
        try:
            kernel = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=options)
        except Exception as e:  # noqa: BLE001 - report every failing launch at once
            cause = e.__cause__ if e.__cause__ is not None else e
            failed.append(f"{key[0]} {dict(key[2])}: {type(e).__name__}: {str(cause)[-400:]}")
            continue
        if args.resources:
            shown = {k: v for k, v in dict(key[2]).items() if k in ("BLOCK_M", "BLOCK", "GT", "COMBINE", "ACC", "UNION")}
            print(f"{tag:16s} {key[0]:26s} warps {options.get('num_warps')}: {_resources(kernel)} {shown}")
    print(f"{len(sources)} distinct launches of {len(names)} kernels compiled for sm_90 ({args.dtype}); "
          f"{len(failed)} failed")
    print("\n".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
