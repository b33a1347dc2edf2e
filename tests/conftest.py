"""Shared test helpers. Without CUDA, Triton kernels run under the interpreter (TRITON_INTERPRET=1),
which must be set before any kernel module is imported: this file is loaded first."""
import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import importlib.util  # noqa: E402
import random  # noqa: E402

import pytest  # noqa: E402

# the kernel tests need the optional triton package (the `test` extra installs it on Linux); where it
# has no wheel (macOS, Windows) they are not collected and the rest of the suite still runs
collect_ignore_glob = [] if importlib.util.find_spec("triton") is not None else ["kernels/*"]

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
# where the kernel tests run: the GPU when there is one, else the interpreter on the CPU
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
# the whole op against the float64 reference, ||x - ref|| / ||ref||: (outputs, gradients) per dtype
OP_TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 5e-3), torch.bfloat16: (1.5e-2, 3e-2)}



@pytest.fixture(autouse=True)
def _fresh_python_random():
    r"""examples/train.py seeds Python's global ``random`` (``random.seed(args.seed)``), and PyG's
    ``Sequential`` names the module of its generated ``forward`` by ``random.randrange``, reusing an
    already loaded module of that name: two ``Sequential`` models built right after the same seed
    would share the first one's ``forward`` (a TypeError in the second). Every test starts from an
    OS-seeded state instead."""
    random.seed()


@pytest.fixture
def poisoned_outputs(monkeypatch):
    r"""Every buffer a kernel must write (``kernels._common.new_empty``) starts as NaN (floats) or -7
    (ints), so an unwritten element fails the checks. The kernel test files take it for every test
    (``pytestmark = pytest.mark.usefixtures("poisoned_outputs")``)."""
    import math
    from torch_geometric_bsa.kernels import _common

    def empty(shape, like, dtype=None):
        dtype = like.dtype if dtype is None else dtype
        return torch.full(shape, math.nan if dtype.is_floating_point else -7, device=like.device, dtype=dtype)
    monkeypatch.setattr(_common, "new_empty", empty)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    r"""``||a - b|| / ||b||`` in float64, asserting first that ``a`` is finite (an unwritten, poisoned
    element or a NaN fails here, with that message)."""
    assert torch.isfinite(a).all(), "non-finite values (unwritten or NaN)"
    return rel_err(a, b)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    r"""``||out - ref|| / ||ref||`` in float64 (NaN anywhere gives inf)."""
    out, ref = out.double(), ref.double()
    if not bool(torch.isfinite(out).all()):
        return float("inf")
    return float((out - ref).norm() / ref.norm().clamp_min(1e-30))


def random_batch(sizes, dim=3, seed=0, device="cpu", dtype=torch.float32):
    r"""Positions ``[N, dim]`` and a sorted batch vector for clouds of the given sizes."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(sum(sizes), dim, generator=g, dtype=torch.float64).to(dtype)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return pos.to(device), batch.to(device)


def random_qkv(n, heads, head_dim, seed=0, dtype=torch.float32, device="cpu", requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(n, heads, head_dim, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
                 .requires_grad_(requires_grad) for _ in range(3))
