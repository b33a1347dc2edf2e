"""Compression-branch kernel (kernels/compressed.py) against reference.compressed_attention.

Forward and backward (dq, dk_cmp, dv_cmp; grads reach k/v through the PyTorch mean pooling), per
point and per pooled group query, ragged clouds with padding. Tolerances ||x - ref|| / ||ref|| vs
float64 on the same inputs: fp32 1e-5 / 1e-4 (grads); fp16 2e-3 / 5e-3; bf16 1.5e-2 / 3e-2 (GPU only:
Triton 3.9's CPU interpreter mis-reads bf16 buffers, so CPU runs fp32 and fp16).
"""
import math
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels._common as common  # noqa: E402
import torch_geometric_bsa.kernels.compressed as cmp  # noqa: E402
from torch_geometric_bsa.kernels import plan  # noqa: E402
from torch_geometric_bsa import build_ball_tree  # noqa: E402
from torch_geometric_bsa import reference as R  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}
CPU_DTYPES = [torch.float32, torch.float16]


@pytest.fixture(autouse=True)
def poisoned_outputs(monkeypatch):
    """Kernel outputs start as NaN (floats) or -7 (ints), so an unwritten element fails the checks."""
    def empty(shape, like, dtype=None):
        dtype = like.dtype if dtype is None else dtype
        fill = math.nan if dtype.is_floating_point else -7
        return torch.full(shape, fill, device=like.device, dtype=dtype)
    monkeypatch.setattr(common, "new_empty", empty)


def rel(a, b):
    assert torch.isfinite(a).all(), "non-finite values (unwritten or NaN)"
    return ((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30)).item()


def make_tree(sizes, ball_size, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return build_ball_tree(pos.to(device), batch.to(device), ball_size=ball_size)


def run_case(sizes, ball_size, h, d, block, q_unit, dtype, seed=0, impl="triton", drop=0.0):
    # drop: the caller's key mask also hides this fraction of valid keys (anywhere in a cloud)
    tree = make_tree(sizes, ball_size, seed)
    n = tree.num_slots
    g = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(n, h, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    qq = q.view(-1, q_unit, h, d).mean(1) if q_unit > 1 else q

    kc, vc, cm = R.compress_mean(k, v, tree.mask, tree.slot_batch, block, block)
    if drop:
        cm = cm & (torch.rand(cm.shape, generator=g) >= drop).to(DEVICE)
    if impl == "flash":
        o, lse = cmp.compressed_attention_flash(qq, kc, vc, plan.compressed_varlen(tree, q_unit, block, cm))
    else:
        o, lse = cmp.compressed_attention_triton(qq, kc, vc, cm, plan.compressed_ranges(tree, q_unit, block),
                                                 ragged=tree.num_clouds > 1)
    do = torch.randn(o.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(o, (q, k, v), do)

    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    qq64 = q64.view(-1, q_unit, h, d).mean(1) if q_unit > 1 else q64
    kc64, vc64, _ = R.compress_mean(k64, v64, tree.mask, tree.slot_batch, block, block)
    ro = R.compressed_attention(qq64, kc64, vc64, cm, tree, block)
    rgrads = torch.autograd.grad(ro, (q64, k64, v64), do.double())
    # the saved LSE is the log2-sum-exp of the valid logits (1e30 where a row sees nothing)
    qmask = tree.mask.view(-1, q_unit).any(1)
    assert bool((lse[~qmask] == common.EMPTY_LSE).all())
    if impl == "flash":  # every row's LSE, against the reference's logits
        _, logits = R.compressed_attention(qq64, kc64, vc64, cm, tree, block, return_probs=True,
                                           return_logits=True)
        bm, bv = R._to_dense(cm, tree.ptr, tree.max_slots, block)
        masked = logits.masked_fill(~(bm & bv)[:, None, None, :], -math.inf)
        want = (torch.logsumexp(masked, -1) * common.LOG2E).transpose(1, 2)  # [B, Qm, H]
        want = R._from_dense(want, tree.ptr, tree.max_slots, lse.size(0), q_unit)[qmask]
        want = torch.where(torch.isfinite(want), want, torch.full_like(want, common.EMPTY_LSE))
        assert torch.allclose(lse[qmask].double(), want, atol=TOL[dtype][0] * 50, rtol=0)
    tol_o, tol_g = TOL[dtype]
    assert rel(o, ro) < tol_o
    for a, b in zip(grads, rgrads):
        assert rel(a, b) < tol_g


@pytest.mark.parametrize("dtype", CPU_DTYPES)
@pytest.mark.parametrize("q_unit", [1, 4])
def test_compressed_matches_reference(dtype, q_unit):
    # three ragged clouds: padded blocks, partly padded blocks, and a fully padded query group
    run_case([50, 90, 20], ball_size=16, h=2, d=16, block=4, q_unit=q_unit, dtype=dtype)


@pytest.mark.parametrize("q_unit", [1, 4])
def test_compressed_single_cloud(q_unit):
    # one cloud takes the non-ragged path (key mask only; padded rows zeroed at the end)
    run_case([77], ball_size=16, h=2, d=16, block=4, q_unit=q_unit, dtype=torch.float32, seed=7)


def test_compressed_head_dim_not_power_of_two():
    run_case([40, 27], ball_size=16, h=1, d=24, block=8, q_unit=1, dtype=torch.float32, seed=3)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("q_unit", [1, 8])
def test_compressed_gpu_real_size(dtype, q_unit):
    run_case([5000, 11000, 300], ball_size=256, h=8, d=64, block=8, q_unit=q_unit, dtype=dtype)
    run_case([20000], ball_size=256, h=8, d=64, block=8, q_unit=q_unit, dtype=dtype, seed=1)


def test_compressed_forced_tiles(monkeypatch):
    # launch_config bypasses the autotuner: the three kernels run with other tiles (several query
    # and key tiles per cloud) and still equal the reference
    seen = []
    config_for = common.config_for
    monkeypatch.setattr(common, "config_for", lambda kernel, **f: seen.append(kernel) or config_for(kernel, **f))
    with common.launch_config("cmp_fwd", BLOCK_M=32, BLOCK_N=16), \
            common.launch_config("cmp_dq", BLOCK_M=16, BLOCK_N=32), \
            common.launch_config("cmp_dkdv", BLOCK_M=32, BLOCK_N=16):
        run_case([50, 90, 20], ball_size=16, h=2, d=16, block=4, q_unit=1, dtype=torch.float32, seed=5)
    assert sorted(seen) == ["cmp_dkdv", "cmp_dq", "cmp_fwd"]


# ------------------------------------------------------------------------------------------------
# The FlashAttention path (CompressedFlash): same function, keys reordered per cloud
# ------------------------------------------------------------------------------------------------
def _packed_forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, debug, scale=None):
    # a float64 stand-in for aten._flash_attention_forward on the CPU: attention per packed sequence,
    # lse [H, Tq] in natural log (+inf for a sequence without keys), as FlashAttention returns it
    assert cu_q.dtype == cu_k.dtype == torch.int32 and not is_causal and dropout_p == 0.0
    cq, ck = cu_q.tolist(), cu_k.tolist()
    assert max(b - a for a, b in zip(cq, cq[1:])) <= max_q and max(b - a for a, b in zip(ck, ck[1:])) <= max_k
    out = torch.zeros(q.shape, dtype=q.dtype)
    lse = torch.full((q.size(1), q.size(0)), math.inf, dtype=torch.float32)
    for (qs, qe), (ks, ke) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        if ke > ks:
            s = torch.einsum("qhd,khd->hqk", q[qs:qe].double(), k[ks:ke].double()) * scale
            lse[:, qs:qe] = torch.logsumexp(s, -1).float()
            out[qs:qe] = torch.einsum("hqk,khd->qhd", s.softmax(-1), v[ks:ke].double()).to(q.dtype)
    return out, lse, torch.zeros(2, dtype=torch.int64), torch.empty(0), torch.empty(0)


def _packed_backward(do, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, rng, unused,
                     scale=None):
    # its backward: rows of keys outside every sequence stay unwritten (NaN here), as in FlashAttention
    dq, dk, dv = torch.zeros_like(q), torch.full_like(k, math.nan), torch.full_like(v, math.nan)
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for (qs, qe), (ks, ke) in zip(zip(cq, cq[1:]), zip(ck, ck[1:])):
        with torch.enable_grad():  # (a backward runs without grad mode)
            qb, kb, vb = (t.detach().double().requires_grad_() for t in (q[qs:qe], k[ks:ke], v[ks:ke]))
            s = torch.einsum("qhd,khd->hqk", qb, kb) * scale
            ob = torch.einsum("hqk,khd->qhd", s.softmax(-1), vb)
            g = torch.autograd.grad(ob, (qb, kb, vb), do[qs:qe].double())
        dq[qs:qe], dk[ks:ke], dv[ks:ke] = (x.to(q.dtype) for x in g)
    return dq, dk, dv


@pytest.fixture
def cpu_flash(monkeypatch):
    if not CUDA:
        monkeypatch.setattr(cmp, "_flash_forward", _packed_forward)
        monkeypatch.setattr(cmp, "_flash_backward", _packed_backward)


@pytest.mark.parametrize("q_unit", [1, 4])
@pytest.mark.parametrize("drop", [0.0, 0.3])
def test_compressed_flash_path_matches_reference(cpu_flash, q_unit, drop):
    # ragged clouds, a fully padded query group, keys masked inside a cloud (drop): the reordering,
    # the empty rows, the LSE's units and layout and the gradients' way back (on a GPU: FlashAttention)
    dtype = torch.bfloat16 if CUDA else torch.float32
    run_case([50, 90, 20, 9], ball_size=16, h=2, d=16, block=4, q_unit=q_unit, dtype=dtype, impl="flash",
             drop=drop, seed=11)


def test_compressed_varlen_plan():
    tree = make_tree([50, 90, 20], ball_size=16)
    cm = torch.ones(tree.num_slots // 4, dtype=torch.bool, device=DEVICE)
    cm[[3, 20, 21]] = False  # inside the first and second clouds
    cm = cm & tree.mask.view(-1, 4).any(1)
    src, dest, kinvalid, cu_q, cu_k, max_q, max_k, empty = plan.compressed_varlen(tree, 1, 4, cm)
    nvalid = int(cm.sum())
    assert torch.equal(src[dest], torch.arange(src.numel(), device=DEVICE))  # inverse permutations
    assert bool(cm[src[:nvalid]].all()) and not bool(cm[src[nvalid:]].any())
    assert torch.equal(kinvalid, ~cm)
    ptr = tree.ptr.tolist()
    for c in range(3):  # each cloud's valid keys, in order, at cu_k[c]:cu_k[c+1]
        own = torch.nonzero(cm[ptr[c] // 4:ptr[c + 1] // 4]).flatten() + ptr[c] // 4
        assert torch.equal(src[int(cu_k[c]):int(cu_k[c + 1])], own)
    assert cu_q.tolist() == ptr and max_q == tree.max_slots and max_k == tree.max_slots // 4
    assert torch.equal(empty, ~tree.mask)
    # memoised for the same mask tensor, derived again for another
    assert plan.compressed_varlen(tree, 1, 4, cm)[0] is src
    assert plan.compressed_varlen(tree, 1, 4, cm.clone())[0] is not src


def test_flash_rule_and_support():
    q = torch.zeros(8, 2, 16)
    assert not cmp.use_flash(q, q, 10 ** 6)  # CPU / fp32: never
    assert not common.config_for("cmp_flash", work=cmp.FLASH_MIN_WORK - 1).get("FLASH", False)
    with common.launch_config("cmp_flash", FLASH=True):
        assert common.config_for("cmp_flash", work=1)["FLASH"]


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("q_unit", [1, 8])
def test_compressed_flash_gpu_real_size(dtype, q_unit):
    run_case([5000, 11000, 300], ball_size=256, h=8, d=64, block=8, q_unit=q_unit, dtype=dtype, impl="flash")
    run_case([20000], ball_size=256, h=8, d=32, block=8, q_unit=q_unit, dtype=dtype, seed=1, impl="flash", drop=0.2)
