"""The windowed compression option for very large clouds (BSAConfig.cmp_window): reference against
independent dense computations, the Triton path against the reference, and the layer."""
import math

import pytest
import torch

from torch_geometric_bsa import BSAConfig, BSAConv, build_ball_tree
from torch_geometric_bsa.reference import bsa_reference, compress_mean, compressed_attention

from conftest import random_batch, rel_err

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _case(sizes, cfg, h=2, d=8, seed=0, device="cpu", dtype=torch.float32):
    pos, batch = random_batch(sizes, seed=seed)
    tree = build_ball_tree(pos.to(device), batch.to(device), cfg.ball_size)
    g = torch.Generator().manual_seed(seed + 1)
    n = tree.num_slots
    q, k, v = (torch.randn(n, h, d, generator=g).to(device, dtype) for _ in range(3))
    gates = torch.rand(n, h, cfg.num_branches, generator=g).to(device, dtype)
    sigma = -torch.rand(h, generator=g).to(device, dtype)
    return tree, tree.to_tree(pos.to(device)).to(dtype), q, k, v, sigma, gates


def test_config_validation():
    assert BSAConfig(ball_size=16).num_branches == 3
    assert BSAConfig(ball_size=16, cmp_window=32).num_branches == 4
    for bad in (8, 24, 0, 32.0):
        with pytest.raises(ValueError, match="cmp_window"):
            BSAConfig(ball_size=16, cmp_window=bad)


def test_window_covering_the_cloud_changes_nothing_but_adds_the_coarse_branch():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    tree, pos, q, k, v, sigma, gates = _case([50, 90, 20], cfg)
    wide = cfg.with_(cmp_window=16 * 64)  # larger than every cloud
    _, b0 = bsa_reference(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, return_branches=True)
    g4 = torch.cat([gates, torch.rand_like(gates[..., :1])], -1)
    out, b1 = bsa_reference(q, k, v, pos, tree, wide, sigma=sigma, gates=g4, return_branches=True)
    for name in ("ball", "cmp", "slc"):
        assert torch.allclose(b0[name], b1[name], atol=1e-6), name
    assert torch.equal(b0["idx"][b0["idx_valid"]], b1["idx"][b1["idx_valid"]])
    expect = sum(g4[..., i:i + 1] * b1[n] for i, n in enumerate(("ball", "cmp", "slc", "crs")))
    assert torch.allclose(out, expect, atol=1e-6)


def _dense_windowed(q, kc, vc, cmask, tree, s, window):
    # independent: per cloud, per query, softmax over the valid blocks whose cloud-relative start
    # lies in the query's window (plain loops over a tiny case)
    out = torch.zeros_like(q)
    d = q.size(-1)
    for c in range(tree.num_clouds):
        a, b = int(tree.ptr[c]), int(tree.ptr[c + 1])
        for i in range(a, b):
            if not bool(tree.mask[i]):
                continue
            blocks = [j for j in range(a // s, b // s)
                      if bool(cmask[j]) and (j * s - a) // window == (i - a) // window]
            if not blocks:
                continue
            idx = torch.tensor(blocks)
            logits = torch.einsum("hd,nhd->hn", q[i], kc[idx]) / math.sqrt(d)
            out[i] = torch.einsum("hn,nhd->hd", logits.softmax(-1), vc[idx])
    return out


def test_windowed_compression_matches_dense_loops():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, cmp_window=32)
    tree, pos, q, k, v, *_ = _case([50, 90, 20], cfg, h=2, d=8, seed=3)
    kc, vc, cm = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    o = compressed_attention(q, kc, vc, cm, tree, 4, window=32)
    assert rel_err(o, _dense_windowed(q, kc, vc, cm, tree, 4, 32)) < 1e-6


def test_selection_stays_in_the_window_and_coarse_sees_the_whole_cloud():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, cmp_window=32)
    tree, pos, q, k, v, sigma, gates = _case([50, 90, 20], cfg, seed=5)
    _, br = bsa_reference(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, return_branches=True)
    idx, valid = br["idx"], br["idx_valid"]                       # [B, NG, k'], cloud-local blocks
    ng = idx.size(1)
    group_window = torch.arange(ng) * 4 // 32
    block_window = idx * 4 // 32
    assert bool((block_window == group_window[None, :, None])[valid].all())
    # coarse branch = attention over one mean key per ball of the cloud (independent loop)
    kb, vb, bm = compress_mean(k, v, tree.mask, tree.slot_batch, 16, 16)
    expect = _dense_windowed(q, kb, vb, bm, tree, 16, 10 ** 9)
    assert rel_err(br["crs"], expect) < 1e-6


def _both_paths(cfg, sizes, h, d, seed, device, dtype):
    # the Triton path on 16/32-bit inputs and the fp32 reference on the same (rounded) values
    from torch_geometric_bsa.kernels import bsa_triton
    tree, pos, q, k, v, sigma, gates = _case(sizes, cfg, h=h, d=d, seed=seed, device=device, dtype=dtype)
    leaves = [t.requires_grad_() for t in (q, k, v, gates)]
    out, br = bsa_triton(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, return_branches=True)
    ref, rb = bsa_reference(*(t.float() for t in (q, k, v, pos)), tree, cfg, sigma=sigma.float(),
                            gates=gates.float(), return_branches=True)
    return leaves, out, br, ref, rb


@pytest.mark.parametrize("group_compression", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_triton_path_matches_reference(group_compression, dtype):
    pytest.importorskip("triton")
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4,
                    group_compression=group_compression, cmp_window=32)
    leaves, out, br, ref, rb = _both_paths(cfg, [50, 90, 20], 2, 16, 7, DEVICE, dtype)
    tol = {torch.float32: 1e-5, torch.float16: 5e-3}[dtype]
    for name in ("ball", "cmp", "crs"):
        assert rel_err(br[name], rb[name]) < tol, name
    if dtype == torch.float32:  # 16-bit scores may order near-tied blocks differently
        assert rel_err(out, ref) < tol
        do = torch.randn_like(out)
        grads = torch.autograd.grad(out, leaves, do)
        rgrads = torch.autograd.grad(ref, leaves, do)
        for name, a, b in zip("qkvg", grads, rgrads):
            assert rel_err(a, b) < 1e-4, name


def test_conv_with_window_trains_and_is_order_independent():
    pos, batch = random_batch([70, 45], seed=9)
    x = torch.randn(115, 16, generator=torch.Generator().manual_seed(10))
    conv = BSAConv(16, heads=2, ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4,
                   cmp_window=32, backend="torch")
    assert conv.gate.out_features == 4 * 2
    assert repr(conv) == "BSAConv(16, 16, heads=2, ball_size=16, cmp_window=32)"
    y = conv(x, pos, batch)
    y.square().mean().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in conv.parameters())
    g = torch.Generator().manual_seed(11)
    perm = torch.cat([torch.randperm(70, generator=g), 70 + torch.randperm(45, generator=g)])
    assert torch.allclose(conv(x[perm], pos[perm], batch), y.detach()[perm], atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_triton_path_real_size_gpu(dtype):
    # realistic shapes: ball 256, blocks 8, group 8, windows of 4,096 slots, ragged batch
    cfg = BSAConfig(ball_size=256, cmp_block=8, slc_block=8, topk=16, group_size=8, group_compression=True,
                    cmp_window=4096)
    _, out, br, _, rb = _both_paths(cfg, [9000, 300, 5000], 8, 64, 11, "cuda", dtype)
    tol = {torch.float32: 1e-4, torch.bfloat16: 1.5e-2}[dtype]
    for name in ("ball", "cmp", "crs"):
        assert rel_err(br[name], rb[name]) < tol, name
    assert bool(torch.isfinite(out).all())
