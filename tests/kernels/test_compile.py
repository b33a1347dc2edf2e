"""``torch.compile(fullgraph=True)`` of the Triton path: the kernels enter the graph as custom ops
(kernels/ops.py) and give the eager results, forward and backward (here under the interpreter)."""
import pytest
import torch

from conftest import DEVICE, random_batch
from torch_geometric_bsa import BSAConfig, build_ball_tree
from torch_geometric_bsa.nn import BSAConv, BSATransformer

CFGS = [BSAConfig(ball_size=32, cmp_block=8, slc_block=8, topk=2, group_size=8),
        BSAConfig(ball_size=32, cmp_block=8, slc_block=8, topk=2, group_size=8, group_compression=True),
        BSAConfig(ball_size=32, cmp_block=8, slc_block=8, topk=2, group_size=8, selection="per_head")]


def _grads(m, x):
    return [x.grad] + [p.grad for p in m.parameters()]


@pytest.mark.parametrize("cfg", CFGS, ids=["paper", "group", "per_head"])
def test_conv_compiles_fullgraph_and_matches_eager(cfg):
    torch._dynamo.reset()
    pos, batch = random_batch([90, 61], seed=1, device=DEVICE)
    torch.manual_seed(0)
    conv = BSAConv(16, 16, heads=2, config=cfg, backend="triton").to(DEVICE)
    tree = build_ball_tree(pos, batch, 32)
    xs = [torch.randn(pos.size(0), 16, generator=torch.Generator().manual_seed(2)).to(DEVICE).requires_grad_()
          for _ in range(2)]
    ref = conv(xs[0], pos, batch, tree=tree)
    w = torch.randn_like(ref)
    (ref * w).sum().backward()
    want = [g.clone() for g in _grads(conv, xs[0])]
    conv.zero_grad()
    out = torch.compile(conv, backend="aot_eager", fullgraph=True)(xs[1], pos, batch, tree=tree)
    (out * w).sum().backward()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    for a, b in zip(_grads(conv, xs[1]), want):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_transformer_compiles_fullgraph():
    torch._dynamo.reset()
    pos, batch = random_batch([70, 50], seed=3, device=DEVICE)
    x = torch.randn(pos.size(0), 3, device=DEVICE)
    torch.manual_seed(1)
    model = BSATransformer(3, 1, hidden_channels=16, num_layers=2, heads=2, config=CFGS[0],
                           backend="triton", cuda_graphs=False).to(DEVICE)
    tree = build_ball_tree(pos, batch, 32)
    ref = model(x, pos, batch, tree=tree)
    seen = set()

    def backend(gm, example_inputs):  # records the graph's ops, then runs it as aot_eager would
        from torch._dynamo.backends.common import aot_autograd
        seen.update(str(n.target) for n in gm.graph.nodes if n.op == "call_function")
        return aot_autograd(fw_compiler=lambda g, _: g, bw_compiler=lambda g, _: g)(gm, example_inputs)

    out = torch.compile(model, backend=backend, fullgraph=True)(x, pos, batch, tree=tree)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    ops = {name.split(".")[1] for name in seen if name.startswith("torch_geometric_bsa.")}
    assert {"ball_fwd", "compressed_fwd", "topk", "selected_fwd", "combine_fwd"} <= ops, seen
    out.sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in model.parameters())
