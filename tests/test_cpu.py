"""The fast CPU path (``torch_geometric_bsa.cpu``, ``backend="cpu"``) against the reference oracle.

Tolerances (fp32): relative error (``conftest.rel_err``) at most 2e-5 on the output and on every
gradient. Observed: about 1e-7 on outputs and at most 2e-6 on gradients (the sigma gradient, a sum
over all scores); a different top-k selection would show as errors near 1.
"""
import pytest
import torch

from conftest import random_batch, random_qkv, rel_err
from torch_geometric_bsa import BSAConfig, BSAConv, build_ball_tree
from torch_geometric_bsa import cpu as fast
from torch_geometric_bsa.functional import bsa_attention, resolve_backend
from torch_geometric_bsa.reference import bsa_reference, compress_mean, compressed_attention, select_blocks, \
    selection_scores

TOL = 2e-5

CASES = [
    # (cloud sizes, config, explicit compressed keys)
    ([100], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4), False),
    ([100, 37, 64], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4), False),
    ([100, 37, 64], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, group_compression=True), True),
    ([100, 37, 64], dict(ball_size=16, cmp_block=4, cmp_stride=2, slc_block=8, topk=3, group_size=4), True),
    ([90, 21], dict(ball_size=16, cmp_block=2, slc_block=2, topk=5, group_size=8), False),
    ([130, 37, 64], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, cmp_window=32), False),
    ([130, 37], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, cmp_window=48,
                     group_compression=True), True),
    ([300], dict(ball_size=32, cmp_block=8, slc_block=8, topk=40, group_size=8), False),  # topk > blocks
    # the authors' selection rule (per-head top-k of logits, own ball excluded); the 9-point cloud
    # is one ball, with nothing to select
    ([100, 37, 9], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head"), False),
    ([100, 37, 64], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, group_compression=True,
                         selection="per_head"), True),
    ([100, 37, 64], dict(ball_size=16, cmp_block=4, cmp_stride=2, slc_block=8, topk=3, group_size=4,
                         selection="per_head"), True),
    ([130, 37, 64], dict(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, cmp_window=32,
                         selection="per_head"), False),
    ([300], dict(ball_size=32, cmp_block=8, slc_block=8, topk=40, group_size=8, selection="per_head"), False),
]


def _inputs(sizes, cfg, explicit_cmp, seed, heads=2, head_dim=4, pos_grad=False):
    pos, batch = random_batch(sizes, seed=seed)
    tree = build_ball_tree(pos, batch, cfg.ball_size)
    n = tree.num_slots
    q, k, v = random_qkv(n, heads, head_dim, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed + 1)
    pt = tree.to_tree(pos).requires_grad_(pos_grad)
    kw = dict(sigma=(-2 * torch.rand(heads, generator=g)).requires_grad_(),
              gates=torch.rand(n, heads, cfg.num_branches, generator=g).requires_grad_())
    if explicit_cmp:
        nb = n // cfg.cmp_stride
        kw.update(k_cmp=torch.randn(nb, heads, head_dim, generator=g).requires_grad_(),
                  v_cmp=torch.randn(nb, heads, head_dim, generator=g).requires_grad_())
    return q, k, v, pt, tree, kw


def _out_and_grads(fn, q, k, v, pt, tree, cfg, kw):
    out = fn(q, k, v, pt, tree, cfg, **kw)
    w = torch.linspace(-1, 1, out.numel()).view_as(out)  # a loss that weighs every output differently
    ins = [q, k, v, *kw.values()] + ([pt] if pt.requires_grad else [])
    return out, torch.autograd.grad((out * w).sum(), ins)


@pytest.mark.parametrize("sizes, cfg, explicit_cmp", CASES)
def test_cpu_path_matches_reference_forward_and_backward(sizes, cfg, explicit_cmp):
    cfg = BSAConfig(**cfg)
    q, k, v, pt, tree, kw = _inputs(sizes, cfg, explicit_cmp, seed=len(sizes) + cfg.topk)
    ref, gref = _out_and_grads(bsa_reference, q, k, v, pt, tree, cfg, kw)
    out, gout = _out_and_grads(fast.bsa_cpu, q, k, v, pt, tree, cfg, kw)
    assert rel_err(out, ref) < TOL
    for a, b in zip(gout, gref):
        assert rel_err(a, b) < TOL
    assert bool((out[~tree.mask] == 0).all())


def test_cpu_path_position_gradient():
    # positions enter through the ball branch's distance bias: its gradient reaches pos too
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    q, k, v, pt, tree, kw = _inputs([60, 33], cfg, False, seed=5, pos_grad=True)
    ref, gref = _out_and_grads(bsa_reference, q, k, v, pt, tree, cfg, kw)
    out, gout = _out_and_grads(fast.bsa_cpu, q, k, v, pt, tree, cfg, kw)
    assert rel_err(gout[-1], gref[-1]) < TOL and float(gref[-1].abs().sum()) > 0


def test_cpu_selection_is_the_reference_selection():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    q, k, v, pt, tree, _ = _inputs([100, 37, 64], cfg, False, seed=7)
    kc, vc, cm = compress_mean(k, v, tree.mask, tree.slot_batch, cfg.cmp_block, cfg.cmp_stride)
    _, p = compressed_attention(q, kc, vc, cm, tree, cfg.cmp_stride, return_probs=True)
    idx, ok = select_blocks(selection_scores(p, tree, cfg, 1), cfg.topk)          # [B, NG, k]
    _, (first, ok_fast) = fast._compressed(q, kc, vc, cm, tree, cfg.cmp_stride, None, cfg)  # [N_pad // g, k]
    g, ls = cfg.group_size, cfg.slc_block
    group_cloud = tree.slot_batch[::g]
    local_group = torch.arange(first.size(0)) - tree.ptr[group_cloud] // g
    ref_first = idx[group_cloud, local_group] * ls + tree.ptr[group_cloud][:, None]
    assert torch.equal(ok_fast, ok[group_cloud, local_group])
    assert torch.equal(first[ok_fast], ref_first[ok_fast])   # same blocks, same (descending) order


def test_cpu_per_head_selection_is_the_reference_selection():
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head")
    q, k, v, pt, tree, _ = _inputs([100, 37, 64], cfg, False, seed=7)
    kc, vc, cm = compress_mean(k, v, tree.mask, tree.slot_batch, cfg.cmp_block, cfg.cmp_stride)
    _, lg = compressed_attention(q, kc, vc, cm, tree, cfg.cmp_stride, return_probs=True, return_logits=True)
    idx, ok = select_blocks(selection_scores(lg, tree, cfg, 1), cfg.topk)         # [B, NG, H, k]
    _, (first, ok_fast) = fast._compressed(q, kc, vc, cm, tree, cfg.cmp_stride, None, cfg)  # [N_pad // g, H, k]
    g, ls = cfg.group_size, cfg.slc_block
    group_cloud = tree.slot_batch[::g]
    local_group = torch.arange(first.size(0)) - tree.ptr[group_cloud] // g
    ref_first = idx[group_cloud, local_group] * ls + tree.ptr[group_cloud][:, None, None]
    assert first.shape == (tree.num_slots // g, 2, 3)
    assert torch.equal(ok_fast, ok[group_cloud, local_group])
    assert torch.equal(first[ok_fast], ref_first[ok_fast])


def test_rank_key_signed_topk_is_the_stable_descending_sort():
    scores = torch.tensor([[0.0, -0.5, 0.0, 0.25, -0.5, -3.0, -1e-30, 7.0, -7.0, 0.25]])
    valid = torch.tensor([[True, True, True, True, True, True, True, True, True, False]])
    ref = torch.sort(scores.masked_fill(~valid, -float("inf")), dim=-1, descending=True, stable=True).indices
    lower_first = 9 - torch.arange(10)
    val, idx = fast._rank_key_signed(scores, valid, lower_first).topk(10, dim=-1)
    assert torch.equal(idx, ref) and torch.equal(val >= 0, valid.gather(1, ref))


def test_rank_key_topk_is_the_stable_descending_sort():
    # exact ties (zeros, equal masses) go to the lower index, invalid blocks last, as torch.sort(stable)
    scores = torch.tensor([[0.0, 0.5, 0.0, 0.25, 0.5, 0.0, 0.125, 0.0]])
    valid = torch.tensor([[True, True, True, True, True, False, True, True]])
    ref = torch.sort(scores.masked_fill(~valid, -float("inf")), dim=-1, descending=True, stable=True).indices
    lower_first = 7 - torch.arange(8)
    val, idx = fast._rank_key(scores, valid, lower_first).topk(8, dim=-1)
    assert torch.equal(idx, ref) and torch.equal(val >= 0, valid.gather(1, ref))


def test_auto_backend_is_the_cpu_path_off_cuda():
    assert resolve_backend("auto", torch.device("cpu")) == "cpu"
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    q, k, v, pt, tree, kw = _inputs([50, 20], cfg, False, seed=9)
    with torch.no_grad():
        auto = bsa_attention(q, k, v, pt, tree, cfg, backend="auto", **kw)
        named = bsa_attention(q, k, v, pt, tree, cfg, backend="cpu", **kw)
        ref = bsa_attention(q, k, v, pt, tree, cfg, backend="torch", **kw)
    assert torch.equal(auto, named) and rel_err(auto, ref) < TOL


@pytest.mark.parametrize("branches", ["all", "ball"])
def test_bsaconv_cpu_backend_matches_torch_backend(branches):
    pos, batch = random_batch([70, 41], seed=11)
    x = torch.randn(111, 16, generator=torch.Generator().manual_seed(11))
    kw = dict(heads=2, ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, branches=branches)
    torch.manual_seed(0)
    ref_conv = BSAConv(16, backend="torch", **kw)
    conv = BSAConv(16, backend="cpu", **kw)
    conv.load_state_dict(ref_conv.state_dict())
    out, ref = conv(x, pos, batch), ref_conv(x, pos, batch)
    assert rel_err(out, ref) < TOL
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(conv.named_parameters(), ref_conv.parameters()):
        if name == "compress.phi_k.2.bias":  # shifts every logit of a query equally: zero in theory
            assert float(a.grad.abs().max()) < 1e-6 and float(b.grad.abs().max()) < 1e-6
        else:
            assert rel_err(a.grad, b.grad) < TOL, name


def test_bsaconv_per_head_selection_cpu_matches_torch():
    # the selection keyword reaches the layer's config; the two backends agree under the new rule
    pos, batch = random_batch([70, 41], seed=12)
    x = torch.randn(111, 16, generator=torch.Generator().manual_seed(12))
    kw = dict(heads=2, ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection="per_head")
    torch.manual_seed(0)
    ref_conv = BSAConv(16, backend="torch", **kw)
    conv = BSAConv(16, backend="cpu", **kw)
    conv.load_state_dict(ref_conv.state_dict())
    assert conv.cfg.selection == "per_head" and "selection='per_head'" in repr(conv)
    out, ref = conv(x, pos, batch), ref_conv(x, pos, batch)
    assert rel_err(out, ref) < TOL
    out.square().sum().backward()
    ref.square().sum().backward()
    for (name, a), b in zip(conv.named_parameters(), ref_conv.parameters()):
        if name != "compress.phi_k.2.bias":  # zero in theory (see above)
            assert rel_err(a.grad, b.grad) < TOL, name
    shared = BSAConv(16, backend="cpu", **{**kw, "selection": "shared"})
    shared.load_state_dict(ref_conv.state_dict())
    assert rel_err(shared(x, pos, batch), out) > 1e-3  # the rule changes the output
    with pytest.raises(ValueError, match="selection='per_head' conflicts with config.selection='shared'"):
        BSAConv(16, config=BSAConfig(ball_size=16, cmp_block=4, slc_block=4, group_size=4), selection="per_head")


@pytest.mark.parametrize("selection", ["shared", "per_head"])
def test_cpu_path_compiles_as_one_graph(selection):
    # the chunk loops run over Python ints, nothing data-dependent: one graph, same numbers
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4, selection=selection)
    q, k, v, pt, tree, kw = _inputs([40, 23], cfg, False, seed=13)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, k, v: fast.bsa_cpu(q, k, v, pt, tree, cfg, **kw), backend="aot_eager",
                       fullgraph=True)
    out = fn(q, k, v)
    ref = fast.bsa_cpu(q, k, v, pt, tree, cfg, **kw)
    assert rel_err(out, ref) < 1e-6


@pytest.mark.parametrize("threads", [1, 2])
def test_cpu_path_in_many_chunks_matches_reference(monkeypatch, threads):
    # tiny chunks: the ball and compression loops run many chunks, spread over worker threads
    monkeypatch.setattr(fast, "CHUNK_ELEMS", 64)
    monkeypatch.setattr(fast, "CMP_CHUNK_ELEMS", 64)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
        q, k, v, pt, tree, kw = _inputs([100, 37, 64], cfg, False, seed=17, pos_grad=True)
        ref, gref = _out_and_grads(bsa_reference, q, k, v, pt, tree, cfg, kw)
        out, gout = _out_and_grads(fast.bsa_cpu, q, k, v, pt, tree, cfg, kw)
        assert torch.get_num_threads() == threads  # restored after the worker pool
    finally:
        torch.set_num_threads(before)
    assert rel_err(out, ref) < TOL
    for a, b in zip(gout, gref):
        assert rel_err(a, b) < TOL


def test_cpu_path_under_bf16_autocast():
    # BSAConv under CPU autocast: bf16 q/k/v reach the CPU path, which computes in fp32 inside
    pos, batch = random_batch([70, 41], seed=19)
    x = torch.randn(111, 16, generator=torch.Generator().manual_seed(19))
    kw = dict(heads=2, ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    conv = BSAConv(16, backend="cpu", **kw)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, pos, batch)
    ref = conv(x, pos, batch)
    assert out.dtype == torch.bfloat16 and rel_err(out.float(), ref) < 3e-2
    out.float().square().sum().backward()
    assert all(p.grad is not None and bool(torch.isfinite(p.grad).all()) for p in conv.parameters())


def test_selection_pass_compiles_with_inductor(monkeypatch):
    # the default torch.compile backend (C++ codegen) over the chunked selection pass; a per-chunk
    # store of `keys >= 0` once generated C++ that did not compile (mixed int64/float vector masks)
    monkeypatch.setattr(fast, "CMP_CHUNK_ELEMS", 256)
    cfg = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)
    q, k, v, pt, tree, _ = _inputs([60, 33], cfg, False, seed=21)
    kc, vc, cm = compress_mean(k.detach(), v.detach(), tree.mask, tree.slot_batch, 4, 4)
    torch._dynamo.reset()
    fn = torch.compile(lambda q, kc, vc: fast._compressed(q, kc, vc, cm, tree, 4, None, cfg)[1])
    with torch.no_grad():
        first, ok = fn(q.detach(), kc, vc)
        ref_first, ref_ok = fast._compressed(q.detach(), kc, vc, cm, tree, 4, None, cfg)[1]
    assert torch.equal(ok, ref_ok) and torch.equal(first[ok], ref_first[ok])
