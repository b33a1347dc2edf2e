"""The host-free step: per-tree memo, fused RMSNorm, no syncs inside a layer, CUDA-graph capture,
and the varlen FlashAttention path of the full-attention peer (issue: host-free fused BSA)."""
import copy

import pytest
import torch
import torch.nn.functional as F

from conftest import random_batch, rel_err, requires_cuda
from torch_geometric_bsa import build_ball_tree
from torch_geometric_bsa.nn import BSATransformer
from torch_geometric_bsa.nn.conv import FullAttentionConv, relative_positions
from torch_geometric_bsa.nn.transformer import RMSNorm

SMALL = dict(hidden_channels=32, num_layers=2, heads=4, ball_size=16, cmp_block=4, slc_block=4, topk=2,
             group_size=4)


def test_tree_memo_is_shared_and_fresh_per_tree():
    pos, batch = random_batch([40, 23])
    tree = build_ball_tree(pos, batch, 16)
    calls = []
    a = tree.cached("k", lambda: calls.append(1) or torch.ones(2))
    b = tree.cached("k", lambda: calls.append(1) or torch.zeros(2))
    assert a is b and calls == [1]
    assert torch.equal(tree.float_mask(torch.float32)[:, 0], tree.mask.float())
    assert tree.mask_as(torch.int8).dtype == torch.int8
    # a moved or rebuilt tree starts with an empty memo (its tensors are new), and so does a copy
    # with a field replaced (its mask-derived memo would be stale)
    assert "k" not in tree.to("cpu")._cache and "k" not in build_ball_tree(pos, batch, 16)._cache
    import dataclasses
    other = dataclasses.replace(tree, mask=torch.zeros_like(tree.mask))
    assert "k" not in other._cache and not bool(other.float_mask(torch.float32).any())


def test_relative_positions_memo_follows_pos():
    pos, batch = random_batch([40, 23])
    tree = build_ball_tree(pos, batch, 16)
    p1 = tree.to_tree(pos)
    r1 = relative_positions(p1, tree)
    assert relative_positions(p1, tree) is r1
    p2 = tree.to_tree(pos * 2)
    r2 = relative_positions(p2, tree)  # another positions tensor: recomputed, not the stale memo
    assert torch.allclose(r2, 2 * r1, atol=1e-6)
    assert bool((r1[~tree.mask] == 0).all())
    c = tree.ball_centers(p1).repeat_interleave(16, 0)
    assert torch.allclose(r1[tree.mask], (p1 - c)[tree.mask])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rmsnorm_matches_torch(dtype):
    torch.manual_seed(0)
    ours, ref = RMSNorm(24), torch.nn.RMSNorm(24)
    with torch.no_grad():
        ours.weight.normal_()
        ref.weight.copy_(ours.weight)
    x = torch.randn(50, 24).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 1e-2  # bf16: the weight is rounded to bf16 first
    assert rel_err(ours(x), ref(x.float())) < tol
    assert ours(x).dtype == dtype
    assert ours(torch.zeros(3, 24)).abs().max() == 0  # padded rows stay zero


def test_graphed_step_needs_cuda_or_refuses_clearly():
    model = BSATransformer(3, 1, **SMALL)
    from torch_geometric_bsa.capture import GraphedStep
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="needs CUDA"):
            GraphedStep(model)
        return
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(ValueError, match="capturable=True"):
        GraphedStep(model.cuda(), opt, F.mse_loss)
    with pytest.raises(ValueError, match="optimizer and loss_fn"):
        GraphedStep(model, opt)


def _data(sizes, seed, device):
    pos, batch = random_batch(sizes, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(pos.size(0), 3, generator=g).to(device)
    y = torch.randn(pos.size(0), 1, generator=g).to(device)
    return x, pos, batch, y


@requires_cuda
@pytest.mark.parametrize("attention", ["bsa", "bsa_per_head", "full", "ball"])
def test_no_host_sync_inside_layers(attention):
    torch.manual_seed(0)
    extra = {"selection": "per_head"} if attention == "bsa_per_head" else {}
    model = BSATransformer(3, 1, attention=attention.split("_")[0], **{**SMALL, "hidden_channels": 64,
                                                                       "ball_size": 64, "cmp_block": 8,
                                                                       "slc_block": 8, "group_size": 8},
                           **extra).cuda()
    x, pos, batch, _ = _data([700, 333], 0, "cuda")
    tree = build_ball_tree(pos, batch, 64)
    pos_t = tree.to_tree(pos)

    def step():
        h = tree.to_tree(model.embed(torch.cat([x, pos], -1)))
        with torch.autocast("cuda", dtype=torch.bfloat16):
            for block in model.blocks:
                h = block(h, pos_t, tree)
        h.float().square().sum().backward()

    step()  # first use: kernels compile and autotune (those synchronise), the tree's memo fills
    torch.cuda.synchronize()
    model.zero_grad(set_to_none=True)
    torch.cuda.set_sync_debug_mode("error")
    try:
        step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert all(p.grad is not None for p in model.blocks[1].parameters())


@requires_cuda
def test_full_attention_varlen_matches_dense():
    torch.manual_seed(0)
    conv = FullAttentionConv(64, heads=8, ball_size=64).cuda()
    x, pos, batch, _ = _data([300, 1000, 64], 1, "cuda")
    x = torch.randn(pos.size(0), 64, device="cuda")
    tree = build_ball_tree(pos, batch, 64)
    x_t, pos_t = tree.to_tree(x).requires_grad_(), tree.to_tree(pos)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = conv.forward_tree(x_t, pos_t, tree)  # varlen FlashAttention
    out.float().square().sum().backward()
    g = x_t.grad.clone()
    x_t.grad = None
    ref = conv.forward_tree(x_t, pos_t, tree)  # fp32: the dense masked SDPA path
    ref.square().sum().backward()
    assert rel_err(out, ref) < 2e-2 and rel_err(g, x_t.grad) < 3e-2  # bf16 operands
    assert bool((out[~tree.mask] == 0).all())


@requires_cuda
def test_tree_build_with_layout_is_sync_free():
    from torch_geometric_bsa.balltree import tree_layout
    pos, batch = random_batch([700, 333, 64], seed=5, device="cuda")
    layout = tree_layout(batch, 64)
    plain = build_ball_tree(pos, batch, 64)
    # a capture fails on any host sync: building inside one shows the build with a layout has none
    g = torch.cuda.CUDAGraph()
    static_pos = pos.clone()
    with torch.cuda.graph(g):
        given = build_ball_tree(static_pos, batch, 64, layout=layout)
    static_pos.copy_(pos)
    g.replay()
    for k in ("perm", "mask", "inv", "ptr", "slot_batch", "counts"):
        assert torch.equal(getattr(plain, k), getattr(given, k)), k
    # another cloud with the same layout, replayed through the same graph
    pos2, _ = random_batch([700, 333, 64], seed=6, device="cuda")
    static_pos.copy_(pos2)
    g.replay()
    assert torch.equal(build_ball_tree(pos2, batch, 64).perm, given.perm)


@requires_cuda
@pytest.mark.parametrize("tree_given,selection", [(True, "shared"), (False, "shared"), (False, "per_head")])
def test_graphed_training_step_matches_eager(tree_given, selection):
    from torch_geometric_bsa.capture import GraphedStep
    torch.manual_seed(0)
    cfg = {**SMALL, "hidden_channels": 64, "ball_size": 64, "cmp_block": 8, "slc_block": 8, "group_size": 8,
           "selection": selection}
    eager = BSATransformer(3, 1, **cfg).cuda()
    graphed_model = copy.deepcopy(eager)

    def adamw(m):
        return torch.optim.AdamW(m.parameters(), lr=1e-3, fused=True, capturable=True)

    opt_e, opt_g = adamw(eager), adamw(graphed_model)
    step = GraphedStep(graphed_model, opt_g, F.mse_loss, warmup=1, clip_grad_norm=1.0)
    batches = [_data([500, 300], s, "cuda") for s in range(3)] + [_data([400, 400, 100], 7, "cuda")]
    order = [0, 1, 2, 0, 1, 3, 3, 2]  # a second shape mid-run gets its own graph
    for i in order:
        x, pos, batch, y = batches[i]
        opt_e.zero_grad(set_to_none=True)
        loss_e = F.mse_loss(eager(x, pos, batch), y)
        loss_e.backward()
        torch.nn.utils.clip_grad_norm_(eager.parameters(), 1.0)
        opt_e.step()
        tree = build_ball_tree(pos, batch, 64) if tree_given else None
        loss_g = step(x, pos, batch, tree=tree, target=y)
        assert abs(loss_g.item() - loss_e.item()) <= 1e-4 * abs(loss_e.item()) + 1e-6
    assert step.captures == 2
    for (name, p), q in zip(eager.named_parameters(), graphed_model.parameters()):
        assert rel_err(q, p) < 1e-4, name
