"""Counts the launches of one transformer block without a GPU: aten ops that launch a kernel, and
Triton launches, for a BSA block (Triton path, under the CPU interpreter) and a full-attention block.

A ``TorchDispatchMode`` records every aten op below autograd (forward and backward); views and
allocations, which launch nothing, are left out. Triton launches are counted at the interpreter's
``run`` (the interpreter's own tensor copies are not counted). The full-attention block takes the
varlen (FlashAttention) path it takes on a GPU, with the attention itself stubbed as one forward
and three backward launches (FlashAttention 2's ``fwd``; ``dot_do_o``, ``dq_dk_dv``, ``convert_dq``).

The block is run twice on one tree and the second call counted: what a layer costs once the tree's
memo (masks, ranges, relative positions) holds what the first layer derived. An aten op is a proxy
for a kernel launch: a few ops launch several kernels on a GPU (sort, split-K matmuls, reductions)
and dtypes follow CPU autocast (float16 here; bfloat16 on the GPU).

    TRITON_INTERPRET=1 python benchmarks/count_ops.py [--ball 64 --points 300 --clouds 2 --by-op --graphs 3]

``--graphs L`` also counts ``L`` blocks as the default eager step on a GPU runs them: replayed from
their layer graphs (stood in for on the CPU), copies in and out included, once with a static tree
per layer and once with the tree shared by all layers (``layer_graphs.SHARE_TREES``).
"""
from __future__ import annotations

import argparse
import collections
import contextlib
import os
import sys
from typing import Dict

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# aten ops that launch nothing: views, metadata, allocations
NO_LAUNCH = {
    "view", "_unsafe_view", "reshape", "expand", "t", "transpose", "permute", "as_strided", "detach", "alias",
    "slice", "select", "unsqueeze", "squeeze", "unbind", "split", "split_with_sizes", "chunk", "narrow",
    "view_as", "expand_as", "diagonal", "unfold", "_reshape_alias", "lift_fresh", "empty", "empty_like",
    "empty_strided", "new_empty", "new_empty_strided", "_to_copy_noop", "resize_", "set_", "is_same_size",
    "sym_size", "sym_stride", "sym_numel", "sym_storage_offset", "size", "stride", "numel", "dim",
    "is_contiguous", "_has_compatible_shallow_copy_type", "_version", "real", "conj", "_conj", "_neg_view",
    "view_as_real", "view_as_complex", "movedim", "flatten", "unflatten", "promote_types", "result_type",
}

_state = {"triton": 0}


class CountOps(TorchDispatchMode):
    r"""Counts aten ops by name, views and allocations left out, and Triton launches by kernel."""

    def __init__(self, where: bool = False):
        super().__init__()
        self.counts: Dict[str, int] = collections.Counter()
        self.where = collections.Counter() if where else None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if not _state["triton"] and name not in NO_LAUNCH:
            self.counts[name] += 1
            if self.where is not None:
                self.where[(name, _caller())] += 1
        return func(*args, **(kwargs or {}))


def _caller() -> str:
    # the innermost frames of this package (or torch.nn) that issued the op
    import traceback
    frames = [f for f in traceback.extract_stack()[:-3] if "torch_geometric_bsa" in f.filename
              or "/torch/nn/" in f.filename]
    node = torch._C._current_autograd_node()
    where = " < ".join(f"{os.path.basename(f.filename)}:{f.lineno}" for f in frames[::-1][:3])
    return (f"{type(node).__name__} " if node is not None else "") + where


_MODE: list = []


@contextlib.contextmanager
def _triton_counted():
    # Triton launches counted at the interpreter's run; its own tensor copies are not counted
    from triton.runtime.interpreter import InterpretedFunction
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        if not _state["triton"]:
            for mode in _MODE:  # nested counts (graph_counts) see the launch in each
                mode.counts["triton:" + self.fn.__name__] += 1
                if mode.where is not None:
                    mode.where[("triton:" + self.fn.__name__, "")] += 1
        _state["triton"] += 1
        try:
            return run(self, *args, **kwargs)
        finally:
            _state["triton"] -= 1
    InterpretedFunction.run = counted
    try:
        yield
    finally:
        InterpretedFunction.run = run


@contextlib.contextmanager
def counting(where: bool = False):
    mode = CountOps(where)
    _MODE.append(mode)
    try:
        with mode:
            yield mode
    finally:
        _MODE.pop()


class _FlashStub(torch.autograd.Function):
    r"""Stands in for ``varlen_attn`` off CUDA: SDPA per cloud, counted as FlashAttention's launches."""

    @staticmethod
    def forward(ctx, q, k, v, cu, max_len):
        ctx.save_for_backward(q, k, v, cu)
        _state["triton"] += 1
        try:
            o = _sdpa_per_cloud(q, k, v, cu)
        finally:
            _state["triton"] -= 1
        if _MODE:
            _MODE[-1].counts["flash:fwd"] += 1
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v, cu = ctx.saved_tensors
        _state["triton"] += 1
        try:
            with torch.enable_grad():
                q_, k_, v_ = (t.detach().requires_grad_() for t in (q, k, v))
                o = _sdpa_per_cloud(q_, k_, v_, cu)
                dq, dk, dv = torch.autograd.grad(o, (q_, k_, v_), do)
        finally:
            _state["triton"] -= 1
        if _MODE:
            _MODE[-1].counts["flash:bwd"] += 3
        return dq, dk, dv, None, None


def _sdpa_per_cloud(q, k, v, cu):
    import torch.nn.functional as F
    outs = []
    bounds = cu.tolist()
    for a, b in zip(bounds[:-1], bounds[1:]):
        o = F.scaled_dot_product_attention(*(t[a:b].transpose(0, 1) for t in (q, k, v)))
        outs.append(o.transpose(0, 1))
    return torch.cat(outs)


@contextlib.contextmanager
def _varlen_stubbed():
    # the full-attention layer's GPU path (varlen FlashAttention), with the attention stubbed
    from torch_geometric_bsa.nn import conv
    saved = conv._varlen_ok, conv._varlen_attn
    conv._varlen_ok = lambda x, head_dim: True
    conv._varlen_attn = lambda q, k, v, cu_q, cu_k, max_q, max_k: _FlashStub.apply(q, k, v, cu_q, max_q)
    try:
        yield
    finally:
        conv._varlen_ok, conv._varlen_attn = saved


# the examples' study network (examples/study_flags.sh): 4 heads of 32, top-k 16, per-query compression
STUDY = dict(channels=128, heads=4, topk=16, group_compression=False)


def block_counts(attention: str, ball: int = 64, points: int = 300, clouds: int = 2, channels: int = 64,
                 heads: int = 8, dtype=torch.float16, seed: int = 0, where: bool = False, topk: int = 4,
                 group_compression: bool = True):
    r"""``(forward, backward, first_layer_extra)`` op counters of one steady-state block (the paper
    model's block by default; ``**STUDY`` for the examples' study network's)."""
    from torch_geometric_bsa import BSATransformer
    from torch_geometric_bsa.balltree import build_ball_tree
    torch.manual_seed(seed)
    kw = dict(cmp_block=8, slc_block=8, topk=topk, group_size=8, group_compression=group_compression,
              backend="triton")
    model = BSATransformer(3, 1, hidden_channels=channels, num_layers=2, heads=heads, attention=attention,
                           ball_size=ball, cuda_graphs=False, **(kw if attention == "bsa" else {}))
    g = torch.Generator().manual_seed(seed)
    n = points * clouds
    pos = torch.randn(n, 3, generator=g)
    batch = torch.arange(clouds).repeat_interleave(points)
    tree = build_ball_tree(pos, batch, ball)
    pos_t = tree.to_tree(pos)
    h0 = tree.to_tree(torch.randn(n, channels, generator=g))
    counts = []
    for block in model.blocks:
        h = h0.clone().requires_grad_()
        with _triton_counted(), _varlen_stubbed():
            with torch.autocast("cpu", dtype=dtype):
                with counting(where) as fwd:
                    out = block(h, pos_t, tree)
            grad = torch.randn_like(out)
            with counting(where) as bwd:
                out.backward(grad)
        counts.append((fwd, bwd))
    if where:
        for label, mode in (("forward", counts[1][0]), ("backward", counts[1][1])):
            print(f"== {attention} {label}: op, where, count")
            for (name, at), c in sorted(mode.where.items()):
                print(f"{name:22s} {c:3d}  {at}")
        first = collections.Counter(counts[0][0].where)
        first.update(counts[0][1].where)
        first.subtract(counts[1][0].where)
        first.subtract(counts[1][1].where)
        print(f"== {attention} first layer only (the tree's memo): op, where, count")
        for (name, at), c in sorted(first.items()):
            if c:
                print(f"{name:22s} {c:3d}  {at}")
    counts = [(f.counts, b.counts) for f, b in counts]
    (f0, b0), (f1, b1) = counts
    first = collections.Counter(f0)
    first.subtract(f1)
    first.update(b0)
    first.subtract(b1)
    return f1, b1, +first


@contextlib.contextmanager
def _emulated_graphs(per_tree: list):
    # layer graphs stood in for on the CPU (layer_graphs._EagerGraph): a replay's ops are counted as
    # the graph's kernels, its copies into the captured tensors are not (a CUDA graph writes there);
    # what the shared trees do once per tree and step goes to a counter of its own as well
    from torch_geometric_bsa import layer_graphs
    saved = layer_graphs._EMULATE, layer_graphs._EagerGraph.replay, layer_graphs._SharedTree.load

    def replay(self):
        with layer_graphs.disabled(), torch.no_grad():
            new = self.fn()
            _state["triton"] += 1
            try:
                for o, n in zip(layer_graphs._as_list(self.out), layer_graphs._as_list(new)):
                    o.detach().copy_(n.detach())
            finally:
                _state["triton"] -= 1

    def load(self, tree, pos):
        with counting() as mode:
            saved[2](self, tree, pos)
        per_tree.append(mode.counts)

    layer_graphs._EMULATE = True
    layer_graphs._EagerGraph.replay, layer_graphs._SharedTree.load = replay, load
    try:
        yield
    finally:
        layer_graphs._EMULATE = saved[0]
        layer_graphs._EagerGraph.replay, layer_graphs._SharedTree.load = saved[1], saved[2]


def graph_counts(attention: str, layers: int = 3, share: bool = True, ball: int = 64, points: int = 300,
                 clouds: int = 2, channels: int = 64, heads: int = 8, dtype=torch.float16, seed: int = 0):
    r"""``(per_step, per_tree)`` op counters of ``layers`` blocks replayed from layer graphs (emulated),
    forward and backward, at the third step on a new tree of one layout (step 1 eager, 2 captures):
    the graphs' kernels and the copies in and out, as on a GPU; ``per_tree``: the part that runs
    once per tree and step (the shared tree's copies and memo; empty with ``share=False``, where
    each layer's graph derives the memo itself)."""
    from torch_geometric_bsa import BSATransformer, layer_graphs
    from torch_geometric_bsa.balltree import build_ball_tree
    torch.manual_seed(seed)
    kw = dict(cmp_block=8, slc_block=8, topk=4, group_size=8, group_compression=True, backend="triton")
    model = BSATransformer(3, 1, hidden_channels=channels, num_layers=layers, heads=heads, attention=attention,
                           ball_size=ball, **(kw if attention == "bsa" else {}))
    n = points * clouds
    batch = torch.arange(clouds).repeat_interleave(points)
    saved_share = layer_graphs.SHARE_TREES
    layer_graphs.SHARE_TREES = share
    try:
        for step in range(3):
            g = torch.Generator().manual_seed(seed + step)
            pos = torch.randn(n, 3, generator=g)
            with layer_graphs.disabled():
                tree = build_ball_tree(pos, batch, ball)
            pos_t = tree.to_tree(pos)
            h = tree.to_tree(torch.randn(n, channels, generator=g)).requires_grad_()
            per_tree: list = []
            with _triton_counted(), _varlen_stubbed(), _emulated_graphs(per_tree):
                with counting() as mode:
                    with torch.autocast("cpu", dtype=dtype):
                        out = h
                        for block in model.blocks:
                            out = block(out, pos_t, tree)
                    out.backward(torch.randn_like(out))
    finally:
        layer_graphs.SHARE_TREES = saved_share
    assert all(b._graphs.captures == 1 for b in model.blocks), "the blocks did not replay from graphs"
    tree_counts: collections.Counter = collections.Counter()
    for c in per_tree:
        tree_counts.update(c)
    return mode.counts, tree_counts


def block_total(counts) -> int:
    return sum(counts.values())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--ball", type=int, default=64)
    p.add_argument("--points", type=int, default=300)
    p.add_argument("--clouds", type=int, default=2)
    p.add_argument("--by-op", action="store_true", help="print the op -> count table")
    p.add_argument("--where", action="store_true", help="print each op with the lines that issued it")
    p.add_argument("--attn", default="bsa,full")
    p.add_argument("--study", action="store_true",
                   help="the examples' study network's block (C 128, 4 heads, top-k 16, per-query compression)")
    p.add_argument("--graphs", type=int, default=0, metavar="L",
                   help="also count L blocks replayed from layer graphs (emulated), per tree or shared")
    args = p.parse_args()
    res = {a: block_counts(a, args.ball, args.points, args.clouds, where=args.where, **(STUDY if args.study else {}))
           for a in args.attn.split(",")}
    if args.by_op:
        names = sorted(set().union(*(set(c) for r in res.values() for c in r[:2])))
        print(f"{'op':34s}" + "".join(f" {a + ' fwd':>9s} {a + ' bwd':>9s}" for a in res))
        for name in names:
            print(f"{name:34s}" + "".join(f" {r[0][name]:9d} {r[1][name]:9d}" for r in res.values()))
    for a, (f, b, first) in res.items():
        tri = sum(v for k, v in f.items() if ":" in k) + sum(v for k, v in b.items() if ":" in k)
        print(f"{a}: forward {block_total(f)}, backward {block_total(b)}, total {block_total(f) + block_total(b)} "
              f"(of which Triton/flash launches {tri}); first layer adds {block_total(first)} (per-tree memo)")
    if args.graphs:
        for a in res:
            for share in (False, True):
                step, tree = graph_counts(a, args.graphs, share=share, ball=args.ball, points=args.points,
                                          clouds=args.clouds)
                total, once = block_total(step), block_total(tree)
                print(f"{a} with layer graphs ({'one shared tree' if share else 'a tree per layer'}): "
                      f"{args.graphs} blocks {total} a step = {(total - once) / args.graphs:.1f} a block "
                      f"+ {once} once per tree")
    if "bsa" in res and "full" in res:
        tb = sum(block_total(c) for c in res["bsa"][:2])
        tf = sum(block_total(c) for c in res["full"][:2])
        print(f"per block: bsa {tb} vs full {tf} ({tb / tf:.2f}x), {tb - tf} more")


if __name__ == "__main__":
    main()
