"""The whole op through the kernels (kernels.bsa_triton) against reference.bsa_reference.

fp32: output and every gradient (q, k, v, gates, sigma, and k_cmp/v_cmp when given) against float64,
paper and group-compression configurations, a strided-compression config (dense-selection fallback).
fp16/bf16: near-tied selection scores may flip between the fp32 kernel scores and a float64
reference, so low precision is checked branch by branch with the kernel's own selected blocks fed to
the reference's selected_attention. Tolerances as in test_compressed (fp32 1e-5 / 1e-4; fp16
2e-3 / 5e-3; bf16 1.5e-2 / 3e-2).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels as K  # noqa: E402
from torch_geometric_bsa import BSAConfig, bsa_attention, build_ball_tree  # noqa: E402
from torch_geometric_bsa import reference as R  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
from conftest import OP_TOL as TOL  # noqa: E402


from conftest import rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def inputs(sizes, cfg, h, d, dtype, seed=0, mlp=False):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    tree = build_ball_tree(pos.to(DEVICE), batch.to(DEVICE), ball_size=cfg.ball_size)
    n = tree.num_slots
    leaves = dict(q=torch.randn(n, h, d, generator=g), k=torch.randn(n, h, d, generator=g),
                  v=torch.randn(n, h, d, generator=g), sigma=-torch.rand(h, generator=g),
                  gates=torch.rand(n, h, cfg.num_branches, generator=g))
    if mlp:  # compressed keys/values from "an MLP": free leaves that must receive gradients
        nb = n // cfg.cmp_stride
        leaves.update(k_cmp=torch.randn(nb, h, d, generator=g), v_cmp=torch.randn(nb, h, d, generator=g))
    leaves = {k_: t.to(DEVICE, dtype).requires_grad_() for k_, t in leaves.items()}
    return tree, tree.to_tree(pos.to(DEVICE)).to(dtype), leaves


def call(fn, tree, pos, cfg, x):
    extra = {k_: x[k_] for k_ in ("k_cmp", "v_cmp") if k_ in x}
    return fn(x["q"], x["k"], x["v"], pos, tree, cfg, sigma=x["sigma"], gates=x["gates"], **extra)


@pytest.mark.parametrize("cfg", [
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4),
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, group_compression=True),
    BSAConfig(ball_size=16, cmp_block=4, cmp_stride=2, slc_block=8, topk=2, group_size=8),
], ids=["paper", "group_compression", "strided_fallback"])
def test_bsa_triton_fp32(cfg):
    check_fp32([50, 90, 20], cfg, d=16, mlp=cfg.cmp_stride != cfg.cmp_block)


def check_fp32(sizes, cfg, d, mlp=False, seed=9):
    # fp32 kernels against the float64 reference: output within 1e-5, every gradient within 1e-4
    tree, pos, x = inputs(sizes, cfg, h=2, d=d, dtype=torch.float32, mlp=mlp)
    out = call(K.bsa_triton, tree, pos, cfg, x)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(DEVICE)
    grads = torch.autograd.grad(out, list(x.values()), do)
    x64 = {k_: t.detach().double().requires_grad_() for k_, t in x.items()}
    ref = call(R.bsa_reference, tree, pos.double(), cfg, x64)
    rgrads = torch.autograd.grad(ref, list(x64.values()), do.double())
    assert rel(out, ref) < 1e-5
    for name, a, b in zip(x, grads, rgrads):
        assert rel(a, b) < 1e-4, name


@pytest.mark.parametrize("cfg,d", [
    (BSAConfig(ball_size=8, cmp_block=4, slc_block=4, topk=1, group_size=4), 4),
    (BSAConfig(ball_size=16, cmp_block=8, slc_block=8, topk=1, group_size=8), 8),
    (BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4, group_compression=True), 12),
    (BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4, group_compression=True,
               cmp_window=32), 8),
], ids=["ball8_d4_top1", "l8_top1_d8", "top2_d12", "window_d8"])
def test_bsa_triton_small_tiles(cfg, d):
    # tiles below 16 (head dim, top-k * block, ball size): compiled tl.dot needs K >= 16, which the
    # CPU interpreter does not enforce; the kernels pad these tiles (or, for balls < 16, take the
    # reference's ball branch), so they compile on a GPU and still equal the reference
    check_fp32([37, 70, 9], cfg, d=d, seed=10)


@pytest.mark.parametrize("cfg", [
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head"),
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, group_compression=True,
              selection="per_head"),
    BSAConfig(ball_size=16, cmp_block=4, cmp_stride=2, slc_block=8, topk=2, group_size=4, selection="per_head"),
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4, cmp_window=32, selection="per_head"),
], ids=["per_query", "group_compression", "overlapping", "window"])
def test_bsa_triton_per_head_selection_fp32(cfg):
    # the authors' rule (per-head top-k of logits, own ball excluded) through the PER_HEAD kernels;
    # the 9-point cloud is one ball: no block to pick, its selection branch is zero
    check_fp32([50, 90, 9], cfg, d=16, mlp=cfg.cmp_stride != cfg.cmp_block, seed=11)
    tree, pos, x = inputs([50, 90, 9], cfg, h=2, d=16, dtype=torch.float32, mlp=cfg.cmp_stride != cfg.cmp_block)
    _, br = call(lambda *a, **kw: K.bsa_triton(*a, **kw, return_branches=True), tree, pos, cfg, x)
    assert br["idx"].shape == (tree.num_slots // cfg.group_size, 2, cfg.topk)
    last = tree.ptr[2]
    assert bool((br["slc"][last:] == 0).all())


def check_low_precision(sizes, cfg, h, d, dtype):
    tree, pos, x = inputs(sizes, cfg, h=h, d=d, dtype=dtype)
    out, br = K.bsa_triton(x["q"], x["k"], x["v"], pos, tree, cfg, sigma=x["sigma"], gates=x["gates"],
                           return_branches=True)
    x64 = {k_: t.detach().double() for k_, t in x.items()}
    _, rb = R.bsa_reference(x64["q"], x64["k"], x64["v"], pos.double(), tree, cfg, sigma=x64["sigma"],
                            gates=x64["gates"], return_branches=True)
    tol = TOL[dtype][0]
    assert rel(br["ball"], rb["ball"]) < tol
    assert rel(br["cmp"], rb["cmp"]) < tol
    # the selection branch on the kernel's own blocks
    g, ls = cfg.group_size, cfg.slc_block
    cloud = tree.slot_batch[::g]
    loc = torch.where(br["idx"] >= 0, br["idx"].long() - (tree.ptr[cloud] // ls)[:, None], -1)
    dl, _ = R._to_dense(loc, tree.ptr, tree.max_slots, g)
    o_slc = R.selected_attention(x64["q"], x64["k"], x64["v"], dl.clamp_min(0), dl >= 0, tree, cfg)
    assert rel(br["slc"], o_slc) < tol
    # the kernel picks (almost) the reference's blocks. Low-precision inputs (and, with group
    # compression, the pooled group queries rounded to bf16/fp16 before the kernel) reorder near-tied
    # blocks around the k-th place, so exact rows are not required: >= 90% of the picked blocks are
    # among the reference's top-k, and at least half of the groups agree on every block
    ref_idx = torch.where(rb["idx_valid"], rb["idx"], -1)
    _, gvalid = R._to_dense(cloud, tree.ptr, tree.max_slots, g)
    picked = (dl >= 0) & gvalid[..., None]
    overlap = (dl[..., :, None] == ref_idx[..., None, :]).any(-1)
    assert overlap[picked].float().mean() > 0.9
    assert (dl == ref_idx).all(-1)[gvalid].float().mean() > 0.5
    gates = x64["gates"]
    expect = gates[..., 0:1] * rb["ball"] + gates[..., 1:2] * rb["cmp"] + gates[..., 2:3] * o_slc
    assert rel(out, expect) < tol
    out.backward(torch.randn_like(out))
    for t in x.values():
        assert torch.isfinite(t.grad).all()


def test_bsa_triton_fp16():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    check_low_precision([50, 90, 20], cfg, h=2, d=16, dtype=torch.float16)


def test_bsa_attention_dispatches_to_triton():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, group_compression=True)
    tree, pos, x = inputs([40], cfg, h=1, d=16, dtype=torch.float32, seed=4)
    out = bsa_attention(x["q"], x["k"], x["v"], pos, tree, cfg, sigma=x["sigma"], gates=x["gates"],
                        backend="triton")
    ref = call(R.bsa_reference, tree, pos, cfg, x)
    assert rel(out, ref) < 1e-5


@pytest.mark.parametrize("cfg", [
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4),
    BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4, group_compression=True,
              cmp_window=32),
], ids=["paper", "group_compression_window"])
def test_bsa_attention_gate_logits(cfg):
    # gate_logits: the combine kernel applies the sigmoid (and its derivative), the coarse gate a
    # sigmoid of its own; against the reference on sigmoid(logits) in float64 (fp32 tolerances)
    tree, pos, x = inputs([50, 90, 20], cfg, h=2, d=16, dtype=torch.float32, seed=12)
    logits = (4 * x.pop("gates").detach() - 2).requires_grad_()
    kw = dict(sigma=x["sigma"], gate_logits=logits, backend="triton")
    out = bsa_attention(x["q"], x["k"], x["v"], pos, tree, cfg, **kw)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    leaves = list(x.values()) + [logits]
    grads = torch.autograd.grad(out, leaves, do)
    x64 = [t.detach().double().requires_grad_() for t in leaves]
    q, k, v, sigma, lg = x64
    ref = R.bsa_reference(q, k, v, pos.double(), tree, cfg, sigma=sigma, gates=torch.sigmoid(lg))
    rgrads = torch.autograd.grad(ref, x64, do.double())
    assert rel(out, ref) < 1e-5
    for name, a, b in zip(list(x) + ["gate_logits"], grads, rgrads):
        assert rel(a, b) < 1e-4, name
    # the readable backend takes the same argument (it squashes first)
    ref32 = bsa_attention(x["q"], x["k"], x["v"], pos, tree, cfg, **{**kw, "backend": "torch"})
    assert rel(ref32, ref) < 1e-5
    with pytest.raises(ValueError, match="exactly one of gates and gate_logits"):
        bsa_attention(x["q"], x["k"], x["v"], pos, tree, cfg, **kw, gates=torch.sigmoid(logits))
    with pytest.raises(ValueError, match="gate_logits must have shape"):
        bsa_attention(x["q"], x["k"], x["v"], pos, tree, cfg, **{**kw, "gate_logits": logits[..., :2]})


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("group_compression", [False, True])
def test_bsa_triton_gpu_real_size(dtype, group_compression):
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                    group_compression=group_compression)
    check_low_precision([4000, 9000, 300], cfg, h=8, d=64, dtype=dtype)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("selection", ["shared", "per_head"])
@pytest.mark.parametrize("group_compression", [False, True])
def test_bsa_triton_gpu_fp32_grads(group_compression, selection):
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8,
                    group_compression=group_compression, selection=selection)
    tree, pos, x = inputs([3000, 2100], cfg, h=4, d=32, dtype=torch.float32)
    out = call(K.bsa_triton, tree, pos, cfg, x)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, list(x.values()), do)
    x64 = {k_: t.detach().double().requires_grad_() for k_, t in x.items()}
    ref = call(R.bsa_reference, tree, pos.double(), cfg, x64)
    rgrads = torch.autograd.grad(ref, list(x64.values()), do.double())
    assert rel(out, ref) < 1e-4
    for name, a, b in zip(x, grads, rgrads):
        assert rel(a, b) < 1e-3, name


@pytest.mark.parametrize("group_compression", [False, True], ids=["per_query", "group_compression"])
def test_bsa_triton_reads_qkv_views_in_place(group_compression):
    # q, k, v as views of one fused projection [N, 3, H, D] (how BSAConv makes them): same output and
    # gradients as contiguous copies, and the kernels read the views in place: no copy of q, k or v
    from torch.utils._python_dispatch import TorchDispatchMode
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4,
                    group_compression=group_compression)
    tree, pos, x = inputs([40, 70], cfg, h=2, d=16, dtype=torch.float32)
    n, h, d = x["q"].shape
    g = torch.Generator().manual_seed(3)
    qkv = torch.randn(n, 3, h, d, generator=g).to(DEVICE).requires_grad_()
    q, k, v = qkv.unbind(1)
    assert not q.is_contiguous()
    kw = dict(sigma=x["sigma"], gates=x["gates"])

    class Copies(TorchDispatchMode):
        copies = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            out = func(*args, **(kwargs or {}))
            if func.overloadpacket.__name__ in ("clone", "copy_", "contiguous", "_to_copy") and \
                    isinstance(out, torch.Tensor) and out.dim() == 3 and out.shape[0] == n:
                Copies.copies += 1
            return out

    # the tree's memo (masks in kernel dtypes, ranges) is built by a first call
    K.bsa_triton(q, k, v, pos, tree, cfg, **kw)
    with Copies():
        out = K.bsa_triton(q, k, v, pos, tree, cfg, **kw)
    assert Copies.copies == 0
    do = torch.randn(out.shape, generator=g).to(DEVICE)
    (gqkv,) = torch.autograd.grad(out, [qkv], do)
    c = [t.detach().contiguous().requires_grad_() for t in (q, k, v)]
    ref = K.bsa_triton(*c, pos, tree, cfg, **kw)
    rg = torch.autograd.grad(ref, c, do)
    assert torch.equal(out, ref)
    for i in range(3):
        assert torch.allclose(gqkv[:, i], rg[i], rtol=0, atol=1e-6), i
