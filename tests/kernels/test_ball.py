"""The fused ball-branch kernel (kernels/ball.py) against reference.ball_attention, forward and backward.

Without CUDA the kernels run under Triton's CPU interpreter: TRITON_INTERPRET must be set before
Triton and the kernels are imported, so it is set here and in conftest.py (a reload of the kernel
modules afterwards cannot help: Triton's own @jit library functions, such as tl.zeros, stay compiled).
With CUDA the same small cases run compiled, and the `gpu` cases add realistic sizes.

Tolerances, ||x - ref|| / ||ref|| against float64 on the same (rounded) inputs:
fp32 1e-5 (outputs) / 1e-4 (gradients); fp16 2e-3 / 5e-3; bf16 1.5e-2 / 3e-2, and 6e-2 for the
sigma and position gradients in bf16 (sums of many signed terms: P, o and dO are rounded to bf16).
"""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels.ball as ball  # noqa: E402
from torch_geometric_bsa.kernels._common import launch_config  # noqa: E402
from torch_geometric_bsa.reference import ball_attention as ball_reference  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
# (output, q/k/v grads, sigma/pos grads)
TOL = {torch.float32: (1e-5, 1e-4, 1e-4), torch.float16: (2e-3, 5e-3, 5e-3),
       torch.bfloat16: (1.5e-2, 3e-2, 6e-2)}


from conftest import rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def make_inputs(n, h, d, pd, dtype, seed, mask=None, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(n, h, d, generator=g).to(device, dtype) for _ in range(3))
    pos = (torch.rand(n, pd, generator=g) * 2).to(device)
    sigma = (torch.randn(h, generator=g) - 1.0).to(device)  # mostly negative, as trained
    if mask is None:
        mask = torch.rand(n, generator=g) > 0.3
        mask[:16] = False  # a fully padded row block
    return q, k, v, pos, sigma, mask.to(device)


def check(n, h, d, m, pd, dtype, seed, pos_grad=True, mask=None):
    q, k, v, pos, sigma, mask = make_inputs(n, h, d, pd, dtype, seed, mask)
    leaves = [t.clone().requires_grad_(i < 3 or i == 4 or pos_grad) for i, t in enumerate((q, k, v, pos, sigma))]
    out = ball.ball_attention_triton(*leaves, mask, m)
    assert out.dtype == dtype and out.shape == q.shape
    # seeded like the inputs: dsigma is one sum per head whose relative error in bf16 depends on how
    # much its terms cancel, so an unseeded dO made the bf16 sigma check flaky (seen once in ~10 runs)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed + 1)).to(out.device, out.dtype)
    out.backward(do)
    ref_leaves = [t.detach().double().requires_grad_() for t in (q, k, v, pos, sigma)]
    ref = ball_reference(*ref_leaves, mask, m)
    ref.backward(do.double())

    tol_o, tol_g, tol_s = TOL[dtype]
    assert rel(out, ref) < tol_o
    assert (out[~mask] == 0).all(), "padded queries must be exactly zero"
    for name, a, b in zip("qkv", leaves[:3], ref_leaves[:3]):
        assert rel(a.grad, b.grad) < tol_g, name
        assert (a.grad[~mask] == 0).all(), f"d{name} at padded slots must be zero"
    assert rel(leaves[4].grad, ref_leaves[4].grad) < tol_s, "sigma"
    if pos_grad:
        assert rel(leaves[3].grad, ref_leaves[3].grad) < tol_s, "pos"
    else:
        assert leaves[3].grad is None


@pytest.mark.parametrize("dtype,n,h,d,m,pd", [
    (torch.float32, 256, 2, 24, 128, 2),   # head dim padded to 32 in-kernel, 2-D positions
    (torch.float16, 256, 2, 32, 64, 3),
    (torch.bfloat16, 256, 2, 16, 128, 3),
])
def test_matches_reference(dtype, n, h, d, m, pd):
    check(n, h, d, m, pd, dtype, seed=n + d + m)


def test_small_tiles_many_per_ball():
    # several query and key tiles per ball: offsets inside a ball, the online-softmax rescaling
    with launch_config("ball_fwd", BLOCK_M=16, BLOCK_N=32, num_warps=4, num_stages=1), \
            launch_config("ball_bwd", BLOCK=32, BLOCK_M1=16, BLOCK_N2=32, MERGED=False, num_warps=4, num_stages=1):
        check(128, 1, 16, 64, 3, torch.float32, seed=1)


def test_merged_backward():
    # the one-loop backward variant (distance tile shared by the dK/dV and dQ roles)
    with launch_config("ball_bwd", BLOCK=32, BLOCK_M1=32, BLOCK_N2=32, MERGED=True, num_warps=4, num_stages=1):
        check(128, 2, 16, 64, 3, torch.float32, seed=6)
        check(128, 1, 24, 64, 2, torch.bfloat16, seed=7)


def test_no_pos_grad_and_inference():
    check(128, 2, 16, 64, 3, torch.float32, seed=2, pos_grad=False)
    q, k, v, pos, sigma, mask = make_inputs(128, 2, 16, 3, torch.float32, seed=3)
    with torch.no_grad():
        out = ball.ball_attention_triton(q, k, v, pos, sigma, mask, 64)
    assert rel(out, ball_reference(q, k, v, pos, sigma, mask, 64)) < 1e-5


def test_tree_mask_and_dispatcher():
    # a real tree's layout (padding at the end of each cloud's last ball) through the public entry
    from torch_geometric_bsa import build_ball_tree
    from torch_geometric_bsa.functional import ball_attention
    g = torch.Generator().manual_seed(4)
    batch = torch.repeat_interleave(torch.arange(2), torch.tensor([100, 50]))
    tree = build_ball_tree(torch.rand(150, 3, generator=g), batch, ball_size=64)
    n = tree.num_slots
    q, k, v, pos, sigma, _ = make_inputs(n, 2, 16, 3, torch.float32, seed=5, device="cpu")
    args = [t.to(DEVICE) for t in (q, k, v, pos, sigma, tree.mask)]
    out = ball_attention(*args, 64, backend="triton")
    ref = ball_attention(*args, 64, backend="torch")
    assert rel(out, ref) < 1e-5 and (out[~args[-1]] == 0).all()


@pytest.mark.parametrize("kw,match", [
    (dict(ball_size=48), "ball_size"), (dict(ball_size=1024), "ball_size"),
    (dict(dtype=torch.float64), "dtype"), (dict(n=96), "multiple"),
])
def test_bad_input(kw, match):
    n, dtype, m = kw.get("n", 128), kw.get("dtype", torch.float32), kw.get("ball_size", 64)
    q, k, v, pos, sigma, mask = make_inputs(n, 2, 16, 3, torch.float32, seed=0)
    with pytest.raises(ValueError, match=match):
        ball.ball_attention_triton(q.to(dtype), k.to(dtype), v.to(dtype), pos, sigma, mask, m)


# ---------------------------------------------------------------------------------------------
# GPU: realistic sizes, compiled kernels (skipped without CUDA)
# ---------------------------------------------------------------------------------------------
gpu = pytest.mark.skipif(not CUDA, reason="needs CUDA")


@pytest.mark.gpu
@gpu
@pytest.mark.parametrize("dtype,n,h,d,m", [
    (torch.bfloat16, 65536, 8, 64, 256),
    (torch.bfloat16, 262144, 8, 64, 256),
    (torch.bfloat16, 65536, 4, 32, 256),
    (torch.float16, 65536, 8, 64, 512),
    (torch.bfloat16, 16384, 4, 128, 128),
    (torch.bfloat16, 16384, 2, 96, 64),
    (torch.float32, 16384, 4, 64, 256),
    (torch.float16, 4096, 2, 16, 64),
])
def test_gpu_realistic(dtype, n, h, d, m):
    mask = torch.rand(n) > 0.05
    check(n, h, d, m, 3, dtype, seed=n + h + d + m, mask=mask)


@pytest.mark.gpu
@gpu
def test_gpu_tree_batch():
    from torch_geometric_bsa import build_ball_tree
    batch = torch.arange(16, device=DEVICE).repeat_interleave(3586)
    tree = build_ball_tree(torch.rand(batch.numel(), 3, device=DEVICE), batch, ball_size=256)
    check(tree.num_slots, 8, 64, 256, 3, torch.bfloat16, seed=7, mask=tree.mask)


def test_bias_flag_of_the_bias_cost_benchmark():
    # benchmarks/ball_bias_cost.py times the kernels with BIAS=False: they must then compute the
    # bias-free attention, i.e. the kernels' own results at sigma = 0 (forward and one-loop backward)
    import sys
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                    "benchmarks"))
    try:
        from ball_bias_cost import launch
    finally:
        sys.path.pop(0)
    g = torch.Generator().manual_seed(3)
    n, h, d, m = 64, 2, 16, 32
    q, k, v, do = (torch.randn(n, h, d, generator=g).to(DEVICE) for _ in range(4))
    pos = torch.rand(n, 3, generator=g).to(DEVICE)
    mask = (torch.rand(n, generator=g) > 0.2).to(torch.uint8).to(DEVICE)
    sigma = torch.full((h,), -2.0, device=DEVICE)
    free = launch(q, k, v, pos, sigma, mask, m, False, do)
    zero = launch(q, k, v, pos, torch.zeros_like(sigma), mask, m, True, do)
    biased = launch(q, k, v, pos, sigma, mask, m, True, do)
    for a, b in zip(free, zero):
        assert torch.allclose(a, b, atol=1e-5)
    assert not torch.allclose(free[0], biased[0], atol=1e-3)  # the bias does change the gradients
    o_free = launch(q, k, v, pos, sigma, mask, m, False)
    o_ref = ball_reference(q.double(), k.double(), v.double(), pos.double(), torch.zeros(h, dtype=torch.float64,
                           device=DEVICE), mask.bool(), m)
    assert torch.allclose(o_free.double(), o_ref, atol=1e-5)
