"""Gated combine and row-dot kernels (kernels/combine.py) against their PyTorch expressions, forward
and backward, fp32/fp16/bf16, per-point and per-group (group compression) compressed outputs.
Tolerances (relative L2 error vs float64): fp32 1e-6; fp16 2e-3; bf16 1.5e-2 (one rounding of the
output, as the PyTorch expression in the same dtype); the same with gate logits (sigmoid in the
kernel: fp32 there, the input dtype in the expression)."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

from torch_geometric_bsa.kernels.combine import gated_combine  # noqa: E402

DEVICE = torch.device("cuda" if CUDA else "cpu")
TOL = {torch.float32: 1e-6, torch.float16: 2e-3, torch.bfloat16: 1.5e-2}


from conftest import rel  # noqa: E402

pytestmark = pytest.mark.usefixtures("poisoned_outputs")  # conftest.py


def expected(o_ball, o_c, o_slc, gates, mask, qu):
    o_cmp = o_c.repeat_interleave(qu, 0) * mask.view(-1, 1, 1) if qu > 1 else o_c
    return gates[..., 0:1] * o_ball + gates[..., 1:2] * o_cmp + gates[..., 2:3] * o_slc


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qu,h,d", [(1, 2, 16), (4, 3, 24), (8, 1, 64)])
def test_gated_combine(dtype, qu, h, d):
    g = torch.Generator().manual_seed(qu * 100 + h + d)
    n = 96
    mask = torch.rand(n, generator=g) > 0.2
    leaves = [torch.randn(n, h, d, generator=g), torch.randn(n // qu, h, d, generator=g),
              torch.randn(n, h, d, generator=g), torch.rand(n, h, 3, generator=g)]
    x = [t.to(DEVICE, dtype).requires_grad_() for t in leaves]
    m = mask.to(DEVICE)
    out = gated_combine(*x, m, qu)
    do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, x, do)
    x64 = [t.detach().double().requires_grad_() for t in x]
    ref = expected(*x64, m, qu)
    rgrads = torch.autograd.grad(ref, x64, do.double())
    assert out.dtype == dtype and rel(out, ref) < TOL[dtype]
    for name, a, b in zip(("o_ball", "o_c", "o_slc", "gates"), grads, rgrads):
        assert rel(a, b) < TOL[dtype], name


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("qu,h,d", [(1, 2, 16), (4, 3, 24), (8, 1, 64)])
@pytest.mark.parametrize("logits", [True, False], ids=["logits", "gates"])
def test_gated_combine_strided_gates_and_logits(dtype, qu, h, d, logits):
    # gates (or logits: the kernel applies the sigmoid, its backward returns the logits' gradient)
    # read as a strided view of a wider projection output, as BSAConv passes them; against the
    # reference formulation sigmoid(logits) then the gated sum, in float64. Same tolerances as above
    # (the sigmoid runs in float32 in the kernel, in the input dtype in PyTorch).
    g = torch.Generator().manual_seed(7 * qu + h + d)
    n = 96
    mask = torch.rand(n, generator=g) > 0.2
    proj = (3 * torch.randn(n, 5 + h * 3, generator=g)).to(DEVICE, dtype).requires_grad_()
    gl = proj[:, 5:].view(n, h, 3)  # row stride 5 + 3 h: no copy into the kernel
    leaves = [torch.randn(n, h, d, generator=g), torch.randn(n // qu, h, d, generator=g),
              torch.randn(n, h, d, generator=g)]
    x = [t.to(DEVICE, dtype).requires_grad_() for t in leaves]
    m = mask.to(DEVICE)
    gin = gl if logits else torch.sigmoid(gl)
    out = gated_combine(*x, gin, m, qu, logits=logits)
    do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    grads = torch.autograd.grad(out, x + [proj], do)
    x64 = [t.detach().double().requires_grad_() for t in x + [proj]]
    ref = expected(*x64[:3], torch.sigmoid(x64[3][:, 5:].view(n, h, 3)), m, qu)
    rgrads = torch.autograd.grad(ref, x64, do.double())
    assert out.dtype == dtype and rel(out, ref) < TOL[dtype]
    for name, a, b in zip(("o_ball", "o_c", "o_slc", "logits"), grads, rgrads):
        assert rel(a, b) < TOL[dtype], name
    assert (grads[3][:, :5] == 0).all()  # the projection's other columns get nothing
    if qu > 1:  # the compression gate of a padded slot learns nothing
        assert (grads[3][:, 5:].view(n, h, 3)[~m, :, 1] == 0).all()


def test_gated_combine_promotes_to_gate_dtype():
    n, h, d = 32, 2, 16
    o = [torch.randn(n, h, d, device=DEVICE, dtype=torch.bfloat16) for _ in range(3)]
    gates = torch.rand(n, h, 3, device=DEVICE)
    out = gated_combine(o[0], o[1], o[2], gates, torch.ones(n, dtype=torch.bool, device=DEVICE))
    assert out.dtype == torch.float32
    assert rel(out, expected(*[t.double() for t in o], gates.double(), None, 1)) < 1e-6


def test_gated_combine_rejects_bad_shapes():
    o = torch.randn(16, 2, 8, device=DEVICE)
    with pytest.raises(ValueError, match="shape mismatch"):
        gated_combine(o, o[:3], o, torch.rand(16, 2, 3, device=DEVICE), torch.ones(16, dtype=torch.bool), 4)
    with pytest.raises(ValueError, match="power of two"):
        gated_combine(o, o[:16 // 3 * 1], o, torch.rand(16, 2, 3, device=DEVICE), torch.ones(16, dtype=torch.bool), 3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("block,h,d", [(4, 2, 16), (8, 3, 24)])
def test_masked_block_mean(dtype, block, h, d):
    from torch_geometric_bsa.kernels.combine import masked_block_mean
    g = torch.Generator().manual_seed(block + h)
    n = 12 * block
    mask = torch.rand(n, generator=g) > 0.3
    mask[:block] = False  # one fully padded block: zero mean, zero gradient
    x = torch.randn(n, h, d, generator=g).to(DEVICE, dtype).requires_grad_()
    out = masked_block_mean(x, mask.to(DEVICE), block)
    w = mask.to(DEVICE).view(-1, block, 1, 1).double()
    x64 = x.detach().double().requires_grad_()
    ref = (x64.view(-1, block, h, d) * w).sum(1) / w.sum(1).clamp_min(1.0)
    do = torch.randn(out.shape, generator=g).to(DEVICE, dtype)
    (gx,) = torch.autograd.grad(out, x, do)
    (rx,) = torch.autograd.grad(ref, x64, do.double())
    assert rel(out, ref) < TOL[dtype] and rel(gx, rx) < TOL[dtype]
    assert (out[0] == 0).all() and (gx[:block] == 0).all()
