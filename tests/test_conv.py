import pytest
import torch
from torch_geometric.data import Batch, Data
from torch_geometric.nn import Sequential

from torch_geometric_bsa import BSAConv, build_ball_tree
from torch_geometric_bsa.nn import FullAttentionConv

from conftest import random_batch

KW = dict(heads=4, ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)


def _conv(**kw):
    torch.manual_seed(0)
    return BSAConv(16, 8, **{**KW, **kw}).double()


@pytest.mark.parametrize("kw", [{}, dict(group_compression=True), dict(compression="mean"),
                                dict(branches="ball"), dict(cmp_stride=2)])
def test_permutation_equivariance(kw):
    conv = _conv(**kw)
    pos, batch = random_batch([45, 30], seed=1, dtype=torch.float64)
    x = torch.randn(75, 16, dtype=torch.float64)
    y = conv(x, pos, batch)
    assert y.shape == (75, 8) and bool(torch.isfinite(y).all())
    perm = torch.cat([torch.randperm(45), 45 + torch.randperm(30)])
    y2 = conv(x[perm], pos[perm], batch)
    assert torch.allclose(y2, y[perm], atol=1e-12)


def test_batch_composition_independence():
    conv = _conv()
    pos, batch = random_batch([45, 30, 17], seed=2, dtype=torch.float64)
    x = torch.randn(92, 16, dtype=torch.float64)
    y = conv(x, pos, batch)
    alone = conv(x[45:75], pos[45:75])
    assert torch.allclose(alone, y[45:75], atol=1e-12)
    # and via PyG's Batch of Data objects
    data = [Data(x=x[:45], pos=pos[:45]), Data(x=x[45:75], pos=pos[45:75]), Data(x=x[75:], pos=pos[75:])]
    b = Batch.from_data_list(data)
    assert torch.allclose(conv(b.x, b.pos, b.batch), y, atol=1e-12)


def test_gradients_reach_every_parameter():
    conv = _conv()
    pos, batch = random_batch([60, 20], seed=3, dtype=torch.float64)
    x = torch.randn(80, 16, dtype=torch.float64, requires_grad=True)
    conv(x, pos, batch).square().sum().backward()
    for name, p in conv.named_parameters():
        assert p.grad is not None and bool(p.grad.abs().sum() > 0), name
    assert bool(x.grad.abs().sum() > 0)


def test_gradcheck_float64():
    conv = _conv(heads=2)
    pos, batch = random_batch([20, 11], seed=4, dtype=torch.float64)
    x = torch.randn(31, 16, dtype=torch.float64, requires_grad=True)
    tree = build_ball_tree(pos, batch, 16)
    assert torch.autograd.gradcheck(lambda x: conv(x, pos, batch, tree=tree), (x,), eps=1e-6, atol=1e-5)


def test_sequential_repr_reset_and_full_attention():
    conv = _conv()
    assert repr(conv) == "BSAConv(16, 8, heads=4, ball_size=16)"
    model = Sequential("x, pos, batch", [(conv, "x, pos, batch -> x"), torch.nn.ReLU(),
                                         (BSAConv(8, 4, **KW).double(), "x, pos, batch -> x")])
    pos, batch = random_batch([30, 30], seed=5, dtype=torch.float64)
    assert model(torch.randn(60, 16, dtype=torch.float64), pos, batch).shape == (60, 4)
    before = conv.qkv.weight.clone()
    conv.reset_parameters()
    assert not torch.equal(before, conv.qkv.weight)
    assert float(conv.sigma.detach()[0]) == -1.0
    full = FullAttentionConv(16, 8, heads=4, ball_size=16).double()
    assert full(torch.randn(60, 16, dtype=torch.float64), pos, batch).shape == (60, 8)


def test_large_ball_and_topk_make_bsa_full_attention():
    # with one ball per cloud and every block selected, ball and selection branches are full attention
    conv = BSAConv(8, heads=2, ball_size=64, cmp_block=4, slc_block=4, topk=16, group_size=4).double()
    ref = FullAttentionConv(8, heads=2, ball_size=64).double()
    ref.load_state_dict({k: v for k, v in conv.state_dict().items() if k in ref.state_dict()})
    torch.nn.init.zeros_(conv.sigma)
    with torch.no_grad():  # gates: only the selection branch
        conv.gate.weight.zero_()
        conv.gate.bias.copy_(torch.tensor([-50.0, -50.0, 50.0]).repeat(2))
    pos, batch = random_batch([50, 40], seed=6, dtype=torch.float64)
    x = torch.randn(90, 8, dtype=torch.float64)
    assert torch.allclose(conv(x, pos, batch), ref(x, pos, batch), atol=1e-9)


@pytest.mark.parametrize("make, match", [
    (lambda x, p, b: (x[:-1], p, b), "x has 29 points but pos has 30"),
    (lambda x, p, b: (x, p.masked_fill(torch.rand_like(p) > 0.9, float("nan")), b), "NaN"),
    (lambda x, p, b: (x, p[:, :2], b), "dim=3"),
    (lambda x, p, b: (x[:, :5], p, b), "in_channels=16"),
    (lambda x, p, b: (x, p, b.flip(0)), "sorted"),
    (lambda x, p, b: (x[:0], p[:0], b[:0]), "empty"),
    (lambda x, p, b: (x, p, b[:-2]), "batch must have shape"),
    (lambda x, p, b: (x.masked_fill(torch.rand_like(x) > 0.99, float("inf")), p, b), "x contains NaN"),
    (lambda x, p, b: (x.long(), p, b), "floating-point"),
])
def test_bad_input(make, match):
    conv = BSAConv(16, **KW)
    pos, batch = random_batch([10, 20], seed=7)
    x, p, b = make(torch.randn(30, 16), pos, batch)
    with pytest.raises(ValueError, match=match):
        conv(x, p, b)


def test_bad_construction():
    with pytest.raises(ValueError, match="heads=3 must divide in_channels=16"):
        BSAConv(16, heads=3)
    with pytest.raises(ValueError, match="slc_block=5 must divide ball_size=16"):
        BSAConv(16, heads=4, ball_size=16, slc_block=5)
    with pytest.raises(ValueError, match="backend"):
        BSAConv(16, **KW, backend="cuda")(torch.randn(4, 16), torch.rand(4, 3))


@pytest.mark.parametrize("drop", [("ball",), ("cmp",), ("slc",), ("cmp", "slc")])
def test_drop_branches_is_a_zero_gate(drop):
    # the ablation "branch removed" equals the full layer with that branch's gate forced to sigmoid(-inf) = 0
    full, ablated = _conv(), _conv(drop_branches=drop)
    ablated.load_state_dict(full.state_dict())  # the mask is not in the state dict
    cols = [i for i, b in enumerate(("ball", "cmp", "slc")) if b in drop]
    rows = torch.tensor([h * 3 + c for h in range(4) for c in cols])  # gate output viewed as [heads, branches]
    with torch.no_grad():
        full.gate.weight[rows] = 0.0
        full.gate.bias[rows] = -1e4
    pos, batch = random_batch([45, 30], seed=5, dtype=torch.float64)
    x = torch.randn(75, 16, dtype=torch.float64)
    y = ablated(x, pos, batch)
    torch.testing.assert_close(y, full(x, pos, batch), rtol=0, atol=1e-12)
    assert not torch.allclose(y, _conv()(x, pos, batch))  # and it does change the output
    assert f"drop_branches={ablated.drop_branches}" in repr(ablated)


def test_drop_branches_bad_values():
    for kw, match in ((dict(drop_branches=("crs",)), "branch names"), (dict(drop_branches=("ball", "cmp", "slc")),
                      "leaves no branch"), (dict(branches="ball", drop_branches=("cmp",)), "branches='all'")):
        with pytest.raises(ValueError, match=match):
            _conv(**kw)


def test_compressor_hooks_and_subclass_forward_are_honoured():
    # the layer's fused path (KVCompressor.compress_kv) skips the compressor's call: a hook on the
    # compressor, or a subclass's own forward, must still take effect
    from torch_geometric_bsa.nn.conv import KVCompressor

    class Zeroed(KVCompressor):
        def forward(self, k, v, tree):
            k_cmp, v_cmp, mask = super().forward(k, v, tree)
            return k_cmp * 0, v_cmp * 0, mask

    pos, batch = random_batch([45, 30], seed=5, dtype=torch.float64)
    x = torch.randn(75, 16, dtype=torch.float64)
    conv = _conv()
    seen = []
    handle = conv.compress.register_forward_hook(lambda m, i, o: seen.append(o[0].shape))
    y = conv(x, pos, batch)
    assert len(seen) == 1
    handle.remove()
    torch.testing.assert_close(conv(x, pos, batch), y, rtol=0, atol=0)  # the fused path: same result
    torch.manual_seed(0)
    sub = BSAConv(16, 8, **KW, compression=Zeroed(4, 4, 4)).double()
    sub.load_state_dict(conv.state_dict())
    zero = _conv()
    zero.load_state_dict(conv.state_dict())
    zero.compress.register_forward_hook(lambda m, i, o: (o[0] * 0, o[1] * 0, o[2]))
    torch.testing.assert_close(sub(x, pos, batch), zero(x, pos, batch), rtol=0, atol=0)
    assert not torch.allclose(sub(x, pos, batch), y)


def test_float64_layer_under_cpu_autocast():
    # autocast leaves float64 alone: the relative positions must stay float64 too (not autocast's dtype)
    conv = _conv(backend="cpu")
    pos, batch = random_batch([45, 30], seed=5, dtype=torch.float64)
    x = torch.randn(75, 16, dtype=torch.float64)
    ref = conv(x, pos, batch)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = conv(x, pos, batch)
    assert out.dtype == torch.float64
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("autocast", [False, True])
@pytest.mark.parametrize("sizes,kw", [([45, 30], {}), ([300, 260], {}), ([45, 30], dict(cmp_stride=2))],
                         ids=["small", "split_weight_grad", "strided_blocks"])
def test_concatenated_weights_match_the_modules_as_written(bias, autocast, sizes, kw):
    # the layer concatenates the qkv and gate weights and the compressor's nine tensors and casts
    # them once; a no-op hook on a projection or an MLP makes it run the modules as written instead.
    # Same output and the same gradient for every parameter, in float64 exactly up to rounding, and
    # under CPU autocast (bfloat16) within bfloat16's rounding. At 576 slots the compression MLP's
    # weight gradient is split along its 576 block rows (_weight_grad: 2 chunks)
    pos, batch = random_batch(sizes, seed=7, dtype=torch.float64 if not autocast else torch.float32)
    x = torch.randn(sum(sizes), 16, dtype=pos.dtype)
    # strided blocks (cmp_stride < cmp_block): the compressor runs as written, only qkv and gate fused
    fast = _conv(bias=bias, backend="torch", **kw).to(pos.dtype)
    plain = _conv(bias=bias, backend="torch", **kw).to(pos.dtype)
    plain.load_state_dict(fast.state_dict())
    for m in (plain.qkv, plain.compress.phi_k):
        m.register_forward_hook(lambda *_: None)
    grads = []
    for conv in (fast, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = conv(x, pos, batch)
        (y.float() * torch.linspace(-1, 1, y.numel()).view_as(y)).sum().backward()
        grads.append((y.detach(), {n: p.grad for n, p in conv.named_parameters()}))
    (y0, g0), (y1, g1) = grads
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(y0, y1, **tol)
    assert g0.keys() == g1.keys()
    for name in g0:
        assert g0[name] is not None, name
        torch.testing.assert_close(g0[name], g1[name], **tol, msg=name)


@pytest.mark.parametrize("m, splits", [(480, 1), (512, 2), (576, 2), (1000, 2), (999, 1), (30720, 64), (4096, 16)])
def test_weight_grad_split_matches_one_gemm(monkeypatch, m, splits):
    # the compression MLP's weight gradient dy.mT @ x, cut along its long reduction: S chunks of at
    # least 256 rows (S a power of two dividing M, at most 64), partial products summed in order.
    # Same result as one batched GEMM on fresh random inputs: float64 up to rounding, bfloat16 no
    # further from the float64 result than the single GEMM's bfloat16 rounding allows
    from torch_geometric_bsa.nn import conv as conv_mod
    g = torch.Generator().manual_seed(m)
    dy = torch.randn(2, m, 8, generator=g, dtype=torch.float64)
    x = torch.randn(2, m, 64, generator=g, dtype=torch.float64)
    calls = []
    bmm = torch.bmm
    monkeypatch.setattr(torch, "bmm", lambda a, b: calls.append(a.size(0)) or bmm(a, b))
    out = conv_mod._weight_grad(dy, x)
    assert calls == [2 * splits]
    torch.testing.assert_close(out, bmm(dy.mT, x), rtol=1e-12, atol=1e-10)
    exact = bmm(dy.mT, x)
    got = conv_mod._weight_grad(dy.bfloat16(), x.bfloat16()).double()
    one = bmm(dy.bfloat16().mT, x.bfloat16()).double()
    scale = exact.abs().max()
    assert (got - exact).abs().max() <= 2 * (one - exact).abs().max() + 1e-2 * scale


def test_gate_bias_option():
    # gate_bias sets the named branches' gate-logit bias for every head, again on reset_parameters;
    # the other branches keep nn.Linear's initialisation; bad names, values or modes are refused
    conv = _conv(gate_bias={"slc": -4.0, "ball": 1.0})
    plain = _conv()
    b = conv.gate.bias.detach().view(conv.heads, -1)
    assert torch.equal(b[:, 2], torch.full((conv.heads,), -4.0, dtype=b.dtype))
    assert torch.equal(b[:, 0], torch.full((conv.heads,), 1.0, dtype=b.dtype))
    torch.testing.assert_close(b[:, 1], plain.gate.bias.detach().view(conv.heads, -1)[:, 1])  # same seed
    with torch.no_grad():
        conv.gate.bias.zero_()
    conv.reset_parameters()
    assert torch.equal(conv.gate.bias.detach().view(conv.heads, -1)[:, 2], torch.full((conv.heads,), -4.0,
                                                                                       dtype=b.dtype))
    pos, batch = random_batch([45, 30], seed=5, dtype=torch.float64)
    assert torch.isfinite(conv(torch.randn(75, 16, dtype=torch.float64), pos, batch)).all()
    for kw in (dict(gate_bias={"crs": 0.0}), dict(gate_bias={"slc": float("nan")}), dict(gate_bias=[0, 0, -4]),
               dict(gate_bias={"slc": -4.0}, branches="ball")):
        with pytest.raises(ValueError, match="gate_bias"):
            BSAConv(16, 8, **{**KW, **kw})
