"""Small helpers shared by the BSA kernels: launch sizes, dot precision, per-row cloud ranges."""
from __future__ import annotations

import math

import torch
import triton
from torch import Tensor

LOG2E = 1.4426950408889634
EMPTY_LSE = 1.0e30  # log-sum-exp stored for rows with no valid key: exp2(s - EMPTY_LSE) == 0


def next_pow2(n: int) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1, n))))


def dot_dim(d: int) -> int:
    r"""Padded head dim for ``tl.dot`` tiles: a power of two and at least 16 (compiled ``tl.dot``
    needs K >= 16; the interpreter does not, so only the GPU catches a smaller one)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay exact ("ieee") so that fp32 runs can be compared index for index with the
    # reference; bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreter() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_empty(shape, like: Tensor, dtype=None) -> Tensor:
    r"""Uninitialised output buffer (one place, so tests can poison every kernel output with NaN)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


def cdiv(a: int, b: int) -> int:
    return triton.cdiv(a, b)


def rows_ok(t: Tensor) -> bool:
    r"""Whether ``t [N, H, D]`` can be read as rows: each row's ``H x D`` block contiguous, rows any
    stride apart (q, k, v as views of one fused ``[N, 3, H, D]`` projection are)."""
    return t.stride(-1) == 1 and t.stride(-2) == t.size(-1)


def rows(t: Tensor) -> Tensor:
    r"""``t`` itself when its rows are contiguous blocks (``rows_ok``), else a contiguous copy."""
    return t if rows_ok(t) else t.contiguous()


def shared_rows(*ts: Tensor) -> tuple:
    r"""``ts`` as tensors with contiguous rows and one shared row stride (the kernels take one
    stride for q, k and v); no copy when they already are, e.g. views of one qkv projection."""
    ts = tuple(rows(t) for t in ts)
    if len({t.stride(0) for t in ts}) > 1:
        ts = tuple(t.contiguous() for t in ts)
    return ts
