"""What the BSA kernels share: launch configurations (one registry), the online-softmax and
backward steps as ``@triton.jit`` helpers, dot precision and padded sizes, row layouts."""
from __future__ import annotations

import contextlib
import os
from typing import Callable, Dict, List, Optional

import torch
import triton
import triton.language as tl
from torch import Tensor

LOG2E = 1.4426950408889634
EMPTY_LSE = 1.0e30  # log-sum-exp stored for rows with no valid key: exp2(s - EMPTY_LSE) == 0


def next_pow2(n: int) -> int:
    return 1 << (max(1, int(n)) - 1).bit_length()


def dot_dim(d: int) -> int:
    r"""Padded head dim for ``tl.dot`` tiles: a power of two and at least 16 (compiled ``tl.dot``
    needs K >= 16; the interpreter does not, so only the GPU catches a smaller one)."""
    return max(16, next_pow2(d))


def dot_precision(dtype: torch.dtype) -> str:
    # fp32 inputs stay exact ("ieee") so that fp32 runs can be compared index for index with the
    # reference; bf16/fp16 ignore this.
    return "ieee" if dtype == torch.float32 else "tf32"


def is_interpreter() -> bool:
    return os.environ.get("TRITON_INTERPRET") == "1"


def new_empty(shape, like: Tensor, dtype=None) -> Tensor:
    r"""Uninitialised output buffer (one place, so tests can poison every kernel output with NaN)."""
    return torch.empty(shape, device=like.device, dtype=like.dtype if dtype is None else dtype)


class SavedCtx:
    r"""A stand-in autograd context: what the Functions' ``forward``/``backward`` read from and write
    to one, so that other code (the custom ops, the fused forward's backward) can run their bodies."""

    def __init__(self, saved: tuple = (), **attrs):
        self.saved_tensors = saved
        self.__dict__.update(attrs)

    def save_for_backward(self, *tensors):
        self.saved_tensors = tensors

    def mark_non_differentiable(self, *args):
        pass

    def set_materialize_grads(self, value: bool):
        pass


def cdiv(a: int, b: int) -> int:
    return -(-a // b)  # host ints (triton.cdiv is a constexpr function: ~2 us a call on the host)


_SMS: Dict[int, int] = {}


def sm_count(device: torch.device) -> Optional[int]:
    r"""The multiprocessors of a CUDA ``device`` (read once per device), ``None`` off CUDA."""
    if device.type != "cuda":
        return None
    i = device.index if device.index is not None else torch.cuda.current_device()
    if i not in _SMS:
        _SMS[i] = torch.cuda.get_device_properties(i).multi_processor_count
    return _SMS[i]


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


# ---------------------------------------------------------------------------------------------
# Launch configuration: one registry for every kernel
# ---------------------------------------------------------------------------------------------
# A kernel's launch config is a dict of tile sizes (the kernel's constexpr names, or a knob its
# wrapper turns into them) plus ``num_warps`` / ``num_stages``. Each kernel module registers, per
# kernel name, the rule that picks it on a GPU from shape/dtype facts (``@launch_rule``); the CPU
# interpreter's tiles are all in ``_INTERPRETER_TILES`` below; benchmarks force a config with
# ``launch_config``. The compression kernels are autotuned: their rule gives the one config used
# when tuning is off, ``tune=`` the candidates.
#
# BSA_AUTOTUNE=0 (read once, at import): no autotuning; every autotuned kernel launches its rule's
# single config. The GPU test runs set it (tuning each new test shape compiled 15 variants), and
# so does anyone who needs the same tiles, hence the same float sums, in every process.
AUTOTUNE = os.environ.get("BSA_AUTOTUNE", "1") != "0"

_RULES: Dict[str, Callable[..., dict]] = {}
_RULE_MODULES = ("ball", "combine", "compressed", "fused", "selected", "topk")  # the modules that register rules
_TUNE: Dict[str, List[dict]] = {}
_FORCED: Dict[str, dict] = {}
_CONFIGS: Dict[tuple, dict] = {}  # config_for's answers, keyed by kernel, facts, interpreter and forced entries

# Under TRITON_INTERPRET=1 (the CPU tests) tiles are chosen for the interpreter, whose cost is its
# number of numpy steps, and so that the tests still run several tiles per ball, cloud or block
# list; they override the GPU rule's entries of the same name (warps and stages mean nothing there).
_INTERPRETER_TILES: Dict[str, Callable[..., dict]] = {
    "ball_fwd": lambda m, **_: dict(BLOCK_M=min(64, m), BLOCK_N=min(64, m), num_warps=4, num_stages=1),
    "ball_bwd": lambda m, **_: dict(BLOCK=min(64, m), BLOCK_M1=min(64, m), BLOCK_N2=min(64, m), MERGED=False,
                                    num_warps=4, num_stages=1),
    "cmp_fwd": lambda **_: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
    "cmp_dq": lambda **_: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
    "cmp_dkdv": lambda **_: dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=1),
    "cmp_split": lambda **_: dict(SPLIT=1),  # CPU tensors: no multiprocessors; tests force a split
    "slc_fwd": lambda **_: dict(rows=32, group_rows=32, keys=64),
    "slc_dq": lambda **_: dict(rows=32, group_rows=32, keys=64),
    "slc_dkdv": lambda **_: dict(rows=16, steps=1),
    "topk": lambda qpg, **_: dict(BLOCK_G=max(1, 16 // qpg), BLOCK_N=16, num_warps=4),
    "combine": lambda qu, **_: dict(BG=max(1, 64 // qu)),
    "bsa_fwd": lambda m, **_: dict(rows=None, BLOCK_N=min(64, m)),
    "pool": lambda hd, **_: dict(BLOCK_B=16, BLOCK_C=min(64, next_pow2(hd))),
}


def launch_rule(kernel: str, *, tune: Optional[List[dict]] = None):
    r"""Registers the decorated ``rule(**facts) -> dict`` as ``kernel``'s GPU launch config
    (``tune``: autotuning candidates, for kernels built with :func:`autotune`)."""
    def register(rule):
        _RULES[kernel] = rule
        if tune is not None:
            _TUNE[kernel] = [dict(c) for c in tune]
        return rule
    return register


def config_for(kernel: str, **facts) -> dict:
    r"""The launch config of ``kernel`` for these facts (e.g. ``m=256, d=64, dtype=torch.bfloat16``):
    its rule's dict, with the interpreter's tiles under ``TRITON_INTERPRET=1``, then the entries
    forced by :func:`launch_config`. A fresh dict: callers may pop from it. Rules are pure functions
    of their facts, so each answer is kept (a call is on the host path of every launch)."""
    forced = _FORCED.get(kernel)
    try:
        key = (kernel, tuple(facts.items()), is_interpreter(), tuple(forced.items()) if forced else None)
        cfg = _CONFIGS.get(key)
    except TypeError:  # an unhashable fact or forced entry: not kept
        key = cfg = None
    if cfg is None:
        cfg = dict(_RULES[kernel](**facts))
        if is_interpreter():
            cfg.update(_INTERPRETER_TILES[kernel](**facts))
        if forced:
            unknown = set(forced) - set(cfg)
            if unknown:  # a typo must not silently sweep nothing
                raise KeyError(f"launch_config({kernel!r}): no entries {sorted(unknown)}; it has {sorted(cfg)}")
            cfg.update(forced)
        if key is not None:
            if len(_CONFIGS) >= 4096:  # facts such as a batch's group count vary with ragged batches
                _CONFIGS.clear()
            _CONFIGS[key] = cfg
    return dict(cfg)


@contextlib.contextmanager
def launch_config(kernel: str, **cfg):
    r"""Forces entries of ``kernel``'s launch config inside the block (tile sweeps, tests of tile
    edge cases), e.g. ``launch_config("ball_fwd", BLOCK_M=16, BLOCK_N=32)``; nest one per kernel.
    An autotuned kernel then runs untuned with its rule's config updated by these entries. Names
    the config does not have raise ``KeyError`` at the launch."""
    if kernel not in _RULES:  # the kernel modules register their rules when imported
        import importlib
        for name in _RULE_MODULES:
            importlib.import_module(f"{__package__}.{name}")
    if kernel not in _RULES:
        raise KeyError(f"no launch rule for kernel {kernel!r}; known: {sorted(_RULES)}")
    old = _FORCED.get(kernel)
    _FORCED[kernel] = {**(old or {}), **cfg}
    try:
        yield
    finally:
        if old is None:
            _FORCED.pop(kernel, None)
        else:
            _FORCED[kernel] = old


def _triton_config(cfg: dict) -> triton.Config:
    cfg = dict(cfg)
    return triton.Config(cfg, num_warps=cfg.pop("num_warps"), num_stages=cfg.pop("num_stages"))


def autotune(kernel: str, key: List[str]):
    r"""``triton.autotune`` over ``kernel``'s registered candidates, keyed on ``key``; a single
    config when tuning is off (``BSA_AUTOTUNE=0``: the rule's) or under the interpreter (its
    tiles). The list is fixed when the module is imported."""
    if is_interpreter() or not AUTOTUNE:
        configs = [config_for(kernel)]
    else:
        configs = _TUNE[kernel]
    return triton.autotune([_triton_config(c) for c in configs], key=key)


def launch_tuned(tuner, kernel: str, grid, *args, **kwargs):
    r"""Launches the autotuned ``tuner`` (built by :func:`autotune` for ``kernel``), or, inside
    ``launch_config(kernel, ...)``, its kernel with the forced config, untuned."""
    if kernel not in _FORCED:
        return tuner[grid](*args, **kwargs)
    return tuner.fn[grid](*args, **kwargs, **config_for(kernel))


# ---------------------------------------------------------------------------------------------
# Shared kernel steps (@triton.jit helpers; Triton inlines them into each kernel)
# ---------------------------------------------------------------------------------------------
@triton.jit
def dot(a, b, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's CPU interpreter mis-multiplies bf16 operands, so it gets fp32 ones
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision=PREC)
    else:
        return tl.dot(a, b, input_precision=PREC)


@triton.jit
def softmax_step(s, v, m_i, l_i, acc, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one key tile of the online softmax (FlashAttention-2, Alg. 1), log2 units: the running max
    # m_i, the running sum l_i and the accumulator acc rescaled by exp2(m_old - m_new). ``s`` holds
    # the masked logits (-inf where a key does not count); returns (m_i, l_i, acc).
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.math.exp2(m_i - m_new)
    p = tl.math.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + dot(p.to(v.dtype), v, PREC, UPCAST)
    return m_new, l_i, acc


@triton.jit
def softmax_finish(acc, l_i, m_i, has):
    # o = acc / l_i and lse = m_i + log2(l_i) for rows with mass (``has``); o = 0 elsewhere, where
    # the caller writes its own empty-row lse
    l_safe = tl.where(has, l_i, 1.0)
    o = tl.where(has[:, None], acc / l_safe[:, None], 0.0)
    return o, m_i + tl.math.log2(l_safe)


@triton.jit
def dq_step(dq, p, do, k, v, delta, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # one key tile of dQ (FlashAttention-2, Alg. 2), rows = queries: dP = dO V^T,
    # dS = P (dP - delta), dQ += dS K (unscaled); returns (dq, dS)
    dp = dot(do, tl.trans(v), PREC, UPCAST)
    ds = p * (dp - delta[:, None])
    dq += dot(ds.to(k.dtype), k, PREC, UPCAST)
    return dq, ds


@triton.jit
def dkdv_step(dk, dv, p, q, do, v, delta, PREC: tl.constexpr):
    # one query tile of dK, dV, rows of P = queries: dV += P^T dO, dK += dS^T Q (unscaled)
    dv += tl.dot(tl.trans(p.to(do.dtype)), do, input_precision=PREC)
    dp = tl.dot(do, tl.trans(v), input_precision=PREC)
    ds = p * (dp - delta[:, None])
    dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PREC)
    return dk, dv


@triton.jit
def dkdv_step_t(dk, dv, pT, q, do, v, delta, PREC: tl.constexpr, UPCAST: tl.constexpr):
    # dkdv_step on transposed tiles (rows of pT = keys, as the ball kernel holds them):
    # dV += P^T dO, dS^T = P^T (V dO^T - delta), dK += dS^T Q (unscaled); returns (dk, dv, dS^T)
    dv += dot(pT.to(do.dtype), do, PREC, UPCAST)
    dsT = pT * (dot(v, tl.trans(do), PREC, UPCAST) - delta[None, :])
    dk += dot(dsT.to(q.dtype), q, PREC, UPCAST)
    return dk, dv, dsT
