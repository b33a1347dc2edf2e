"""The fused forward (kernels/fused.py: ball branch, selected blocks and gated sum in one launch).

Against the float64 reference (fp32: output 1e-5, gradients 1e-4, as test_bsa_triton) and against
the separate kernels it replaces (``launch_config("bsa_fwd", fused=False)``): fp32 output and
gradients within 1e-6 (the same sums; only the order in which the branches' dQ, dK, dV add up
differs), bf16 (fp16 under the interpreter) within its tolerance (1.5e-2 / 3e-2; 2e-3 / 5e-3).
Every case checks that the fused launch ran.
"""
import contextlib

import pytest
import torch
from conftest import DEVICE, rel
from conftest import OP_TOL as TOL

import torch_geometric_bsa.kernels as K
import torch_geometric_bsa.kernels._common as common
from torch_geometric_bsa import BSAConfig, build_ball_tree
from torch_geometric_bsa import reference as R
from torch_geometric_bsa.kernels import fused as F

CUDA = torch.cuda.is_available()  # without it, conftest.py has set TRITON_INTERPRET=1 before any import
# the CPU interpreter mis-multiplies bf16 operands in the separate selection kernel: fp16 there
LOW = torch.bfloat16 if CUDA else torch.float16
PAPER = BSAConfig(ball_size=64, cmp_block=8, slc_block=8, topk=3, group_size=8)
pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    apply = F.FusedLocalCombine.apply
    monkeypatch.setattr(F.FusedLocalCombine, "apply", lambda *a: calls.append(1) or apply(*a))
    return calls


def leaves(sizes, cfg, h, d, dtype, seed=0, logits=False):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    tree = build_ball_tree(pos.to(DEVICE), batch.to(DEVICE), ball_size=cfg.ball_size)
    n = tree.num_slots
    x = dict(q=torch.randn(n, h, d, generator=g), k=torch.randn(n, h, d, generator=g),
             v=torch.randn(n, h, d, generator=g), sigma=-torch.rand(h, generator=g),
             pos=tree.to_tree(pos),
             gates=4 * torch.rand(n, h, cfg.num_branches, generator=g) - 2 if logits
             else torch.rand(n, h, cfg.num_branches, generator=g))
    return tree, {k_: t.to(DEVICE, dtype).requires_grad_() for k_, t in x.items()}


def run(fn, tree, cfg, x, logits=False, seed=5):
    gate = dict(gate_logits=x["gates"]) if logits else dict(gates=x["gates"])
    out = fn(x["q"], x["k"], x["v"], x["pos"], tree, cfg, sigma=x["sigma"], **gate)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return out, dict(zip(x, torch.autograd.grad(out, list(x.values()), do))), do


def reference(tree, cfg, x, do, logits=False):
    x64 = {k_: t.detach().double().requires_grad_() for k_, t in x.items()}
    gates = torch.sigmoid(x64["gates"]) if logits else x64["gates"]
    out = R.bsa_reference(x64["q"], x64["k"], x64["v"], x64["pos"], tree, cfg, sigma=x64["sigma"], gates=gates)
    return out, dict(zip(x64, torch.autograd.grad(out, list(x64.values()), do.double())))


def check_against_reference(tree, cfg, x, tol, logits=False):
    # the op (fused where it applies) against the float64 reference: output and every gradient
    out, grads, do = run(K.bsa_triton, tree, cfg, x, logits)
    ref, rgrads = reference(tree, cfg, x, do, logits)
    assert rel(out, ref) < tol[0]
    for name in x:
        assert rel(grads[name], rgrads[name]) < tol[1], name
    return out, grads


@pytest.mark.parametrize("cfg,logits", [
    (PAPER, False),
    (PAPER, True),
    (BSAConfig(ball_size=64, cmp_block=8, slc_block=8, topk=2, group_size=8, group_compression=True), False),
    (BSAConfig(ball_size=64, cmp_block=8, slc_block=8, topk=2, group_size=8, group_compression=True,
               cmp_window=64), True),
    (BSAConfig(ball_size=32, cmp_block=4, slc_block=4, topk=4, group_size=16), False),
], ids=["paper", "logits", "group_compression", "window_logits", "groups16"])
def test_fused_equals_reference_and_separate_kernels_fp32(cfg, logits, fused_calls):
    # three clouds: padded slots in every cloud's last ball, groups that select nothing in the
    # small cloud (fewer blocks than top-k), rows whose ball keys are all padding never occur
    tree, x = leaves([150, 70, 200], cfg, h=2, d=16, dtype=torch.float32, logits=logits)
    out, grads = check_against_reference(tree, cfg, x, TOL[torch.float32], logits)
    assert len(fused_calls) == 1
    with common.launch_config("bsa_fwd", fused=False):
        sep, sgrads, _ = run(K.bsa_triton, tree, cfg, x, logits)
    assert len(fused_calls) == 1  # the separate kernels this time
    assert rel(out, sep) < 1e-6
    for name in x:
        assert rel(grads[name], sgrads[name]) < 1e-6, name


@pytest.mark.parametrize("forced", [{"slc_fwd": 128, "slc_dq": 128}, {"bsa_fwd": 128}],
                         ids=["both_passes", "forward_only"])
def test_fused_128_row_tiles(forced, fused_calls, monkeypatch):
    # walk tiles of 16 groups (top-k 4 allows them): the fused program covers 128 rows, the ball kernel's
    # own tile. The fused rule's entry sizes the forward's tiles, the selection's dQ entry the
    # backward's: with smaller ones the dQ pass lists its own tiles
    from torch_geometric_bsa.kernels import selected as S
    rows, walk = [], S._walk
    monkeypatch.setattr(S, "_walk", lambda r, *a: rows.append(r) or walk(r, *a))
    cfg = BSAConfig(ball_size=128, cmp_block=8, slc_block=8, topk=4, group_size=8)
    tree, x = leaves([300, 200], cfg, h=2, d=16, dtype=torch.float32, seed=4)
    with contextlib.ExitStack() as stack:
        for kernel, r in forced.items():
            stack.enter_context(common.launch_config(kernel, rows=r))
        check_against_reference(tree, cfg, x, TOL[torch.float32])
        dq_rows = common.config_for("slc_dq", dtype=torch.float32, d=16)["rows"]
    assert len(fused_calls) == 1
    assert rows == ([128] if dq_rows == 128 else [128, dq_rows])
    assert ("slc_dq" in forced) == (dq_rows == 128)


def check_against_separate(tree, cfg, x, fused_calls):
    # the fused launch against the separate kernels on the same inputs, at the dtype's tolerances
    before = len(fused_calls)
    out, grads, _ = run(K.bsa_triton, tree, cfg, x)
    assert len(fused_calls) == before + 1 and out.dtype == x["q"].dtype
    with common.launch_config("bsa_fwd", fused=False):
        sep, sgrads, _ = run(K.bsa_triton, tree, cfg, x)
    assert len(fused_calls) == before + 1
    fwd, bwd = TOL[x["q"].dtype]
    assert rel(out, sep) < fwd
    for name in x:
        assert rel(grads[name], sgrads[name]) < bwd, name


def test_fused_low_precision_equals_separate_kernels(fused_calls):
    tree, x = leaves([150, 200], PAPER, h=2, d=16, dtype=LOW, seed=3)
    check_against_separate(tree, PAPER, x, fused_calls)


def test_fusable_says_where_the_fused_launch_applies():
    bf = torch.bfloat16
    # the models' layers: paper (D 8, top-k 4) and the study network (D 32, top-k 16), balls of 256
    with common.launch_config("slc_fwd", rows=64):
        assert F.fusable(256, 8, bf, 8, 8, 4) and F.fusable(256, 32, bf, 8, 8, 16)
    # head dim 64: the selection reads each group's blocks (no union walk), so nothing to fuse
    assert not F.fusable(256, 64, bf, 8, 8, 16)
    # a walk tile of 32 rows (8 groups of 4) does not fit in a ball of 16
    with common.launch_config("slc_fwd", rows=32):
        assert not F.fusable(16, 16, torch.float32, 4, 4, 3)
    # balls the ball kernel does not take, and the rule switched off
    assert not F.fusable(8, 16, torch.float32, 8, 8, 2)
    with common.launch_config("slc_fwd", rows=32):
        assert F.fusable(64, 16, torch.float32, 8, 8, 3)
        with common.launch_config("bsa_fwd", fused=False):
            assert not F.fusable(64, 16, torch.float32, 8, 8, 3)
        # the forward's own 128-row tiles: they fit balls of 128, not of 64
        with common.launch_config("bsa_fwd", rows=128):
            assert F.fusable(128, 16, torch.float32, 8, 8, 3) and not F.fusable(64, 16, torch.float32, 8, 8, 3)


@pytest.mark.parametrize("selection,return_branches", [("per_head", False), ("shared", True)])
def test_not_fused_for_per_head_selection_or_returned_branches(selection, return_branches, fused_calls):
    cfg = BSAConfig(ball_size=64, cmp_block=8, slc_block=8, topk=3, group_size=8, selection=selection)
    tree, x = leaves([150, 70], cfg, h=2, d=16, dtype=torch.float32)
    res = K.bsa_triton(x["q"], x["k"], x["v"], x["pos"], tree, cfg, sigma=x["sigma"], gates=x["gates"],
                       return_branches=return_branches)
    assert fused_calls == []
    if return_branches:
        assert set(res[1]) >= {"ball", "cmp", "slc", "idx"}


def test_fused_takes_the_separate_kernels_when_the_walk_does_not_fit(fused_calls):
    # fused_local_combine called for balls that its walk's tiles do not divide: same result as the
    # separate kernels, without the fused launch
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    tree, x = leaves([50, 40], cfg, h=2, d=16, dtype=torch.float32, seed=2)
    found = K.bsa_triton(x["q"], x["k"], x["v"], x["pos"], tree, cfg, sigma=x["sigma"], gates=x["gates"],
                         return_branches=True)[1]
    mask = tree.mask_as(torch.uint8)
    o_c = K.compression_branch(x["q"], x["k"], x["v"], tree, cfg)[0]
    with common.launch_config("slc_fwd", rows=32):
        out = F.fused_local_combine(x["q"], x["k"], x["v"], x["pos"], x["sigma"], mask, o_c, found["idx"],
                                    x["gates"], 16, 4, 4)
    assert fused_calls == []
    gates = x["gates"]
    expect = gates[..., :1] * found["ball"] + gates[..., 1:2] * found["cmp"] + gates[..., 2:3] * found["slc"]
    assert rel(out, expect) < 1e-6


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("h,d,topk,gc", [(8, 8, 4, True), (4, 32, 16, False)], ids=["paper_layer", "study_layer"])
def test_fused_gpu_model_layers(h, d, topk, gc, fused_calls):
    # the two model layers (balls of 256, groups and blocks of 8) on the GPU, bf16 against the
    # separate kernels, and fp32 against the float64 reference (fp32 GPU tolerances as test_bsa_triton's)
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=topk, group_size=8, group_compression=gc)
    tree, x = leaves([3586] * 4, cfg, h=h, d=d, dtype=torch.bfloat16, seed=1)
    check_against_separate(tree, cfg, x, fused_calls)
    tree, x = leaves([3000, 2100], cfg, h=h, d=d, dtype=torch.float32, seed=2)
    check_against_reference(tree, cfg, x, (1e-4, 1e-3))
    assert len(fused_calls) == 2
    # the forward's own 128-row tiles (perf-notes, v11), the dQ pass at the selection's
    with common.launch_config("bsa_fwd", rows=128):
        tree, x = leaves([3586] * 4, cfg, h=h, d=d, dtype=torch.bfloat16, seed=3)
        check_against_separate(tree, cfg, x, fused_calls)
        tree, x = leaves([3000, 2100], cfg, h=h, d=d, dtype=torch.float32, seed=4)
        check_against_reference(tree, cfg, x, (1e-4, 1e-3))
    assert len(fused_calls) == 4


def test_bsa_conv_through_the_fused_forward(fused_calls):
    # the layer as users call it: the gate logits are a strided view of the qkv projection, the
    # compression MLP's keys come in; output and every parameter's gradient as with the separate kernels
    from torch_geometric_bsa.nn import BSAConv
    cfg = BSAConfig(ball_size=32, cmp_block=8, slc_block=8, topk=2, group_size=8)
    g = torch.Generator().manual_seed(6)
    pos = torch.rand(151, 3, generator=g).to(DEVICE)
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([90, 61])).to(DEVICE)
    torch.manual_seed(0)
    conv = BSAConv(16, 16, heads=2, config=cfg, backend="triton").to(DEVICE)
    x = torch.randn(151, 16, generator=g).to(DEVICE)
    w = torch.randn(151, 16, generator=g).to(DEVICE)
    results = []
    for fused in (True, False):
        conv.zero_grad()
        with common.launch_config("bsa_fwd", fused=fused):
            out = conv(x, pos, batch)
            (out * w).sum().backward()
        results.append([out.detach()] + [p.grad.clone() for p in conv.parameters()])
    assert len(fused_calls) == 1
    for a, b in zip(*results):
        assert rel(a, b) < 1e-6
