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


from conftest import rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def make_tree(sizes, ball_size, seed=0, device=DEVICE):
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), 3, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return build_ball_tree(pos.to(device), batch.to(device), ball_size=ball_size)


def run_case(sizes, ball_size, h, d, block, q_unit, dtype, seed=0, drop=0.0):
    # drop: the caller's key mask also hides this fraction of valid keys (anywhere in a cloud)
    tree = make_tree(sizes, ball_size, seed)
    n = tree.num_slots
    g = torch.Generator().manual_seed(seed + 1)
    q, k, v = (torch.randn(n, h, d, generator=g).to(DEVICE, dtype).requires_grad_() for _ in range(3))
    qq = q.view(-1, q_unit, h, d).mean(1) if q_unit > 1 else q

    kc, vc, cm = R.compress_mean(k, v, tree.mask, tree.slot_batch, block, block)
    if drop:
        cm = cm & (torch.rand(cm.shape, generator=g) >= drop).to(DEVICE)
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
    if drop:  # every row's LSE, against the reference's logits
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


@pytest.mark.parametrize("q_unit", [1, 4])
def test_compressed_keys_masked_inside_clouds(q_unit):
    # a caller's key mask (an MLP compressor's, say) may hide keys anywhere in a cloud, not only its
    # padded tail; some clouds of 9 points may lose every key (empty rows: zero output, EMPTY_LSE)
    run_case([50, 90, 20, 9], ball_size=16, h=2, d=16, block=4, q_unit=q_unit, dtype=torch.float32, drop=0.3,
             seed=11)


class _LaunchSpy:
    r"""Wraps a Triton kernel: records the grids it is launched with."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


@pytest.mark.parametrize("split", [2, 3])
@pytest.mark.parametrize("q_unit", [1, 4])
def test_compressed_split_query_stream(monkeypatch, split, q_unit):
    # the dK/dV kernel's query stream cut into `split` slices, float32 partial sums added in order by
    # a second kernel: what a layer of a few thousand points a cloud gets on a GPU (_split_rule).
    # Several query tiles per slice, uneven slices (3), keys masked inside clouds, an empty cloud.
    spy = _LaunchSpy(cmp._sum_split_kernel)
    monkeypatch.setattr(cmp, "_sum_split_kernel", spy)
    with common.launch_config("cmp_split", SPLIT=split):
        run_case([50, 90, 20, 9], ball_size=16, h=2, d=16, block=4, q_unit=q_unit, dtype=torch.float32, drop=0.3,
                 seed=13)
    assert len(spy.grids) == 1  # the partial path ran (one summing launch for dK and dV)


@pytest.mark.gpu
@pytest.mark.skipif(not CUDA, reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_compressed_gpu_split(dtype):
    # compiled, at a layer's size with few heads (the rule's case), and forced at 8 slices
    run_case([3586] * 4, ball_size=256, h=4, d=32, block=8, q_unit=1, dtype=dtype, seed=2)
    with common.launch_config("cmp_split", SPLIT=8):
        run_case([5000, 11000, 300], ball_size=256, h=8, d=64, block=8, q_unit=1, dtype=dtype, drop=0.2)


def test_compressed_split_rule():
    # below two programs a multiprocessor, split into about four; none from two on, or off CUDA
    assert cmp._split_rule(key_tiles=60, heads=4, sms=132) == dict(SPLIT=4)  # 8 x 3,586 points, H 4
    assert cmp._split_rule(key_tiles=60, heads=8, sms=132) == dict(SPLIT=1)  # the same, H 8
    assert cmp._split_rule(key_tiles=128, heads=8, sms=132) == dict(SPLIT=1)  # 65k points, H 8
    assert cmp._split_rule(key_tiles=1, heads=1, sms=132) == dict(SPLIT=8)
    assert cmp._split_rule(key_tiles=60, heads=4, sms=None) == dict(SPLIT=1)
