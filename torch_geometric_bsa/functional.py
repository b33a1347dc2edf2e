"""The one entry point of the attention op: `bsa_attention` checks its inputs once and picks a backend,
whose branches `compose.compose` puts together (the same composition for every backend)."""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from ._validate import check_backend_dtype, check_compressed_kv, check_coordinate_range, check_tree_matches
from .balltree import BallTree
from .reference import BSAConfig, bsa_reference

__all__ = ["bsa_attention", "ball_attention", "resolve_backend", "triton_available", "triton_installed"]

_BACKENDS = ("auto", "torch", "cpu", "triton")


_TRITON_INSTALLED: Optional[bool] = None


def triton_installed() -> bool:
    r"""True when the optional ``triton`` package imports (probed once; it is not a hard dependency)."""
    global _TRITON_INSTALLED
    if _TRITON_INSTALLED is None:
        try:
            import triton  # noqa: F401
            _TRITON_INSTALLED = True
        except ImportError:
            _TRITON_INSTALLED = False
    return _TRITON_INSTALLED


def triton_available(device: torch.device) -> bool:
    r"""True when the Triton kernels can run for tensors on ``device`` (CUDA, or the interpreter)."""
    import os
    if not triton_installed():
        return False
    return device.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1"


def check_backend_name(backend: str) -> None:
    r"""What a layer can check at construction: a known name, and Triton installed for "triton"
    (whether it can run depends on the device of the call's tensors: ``resolve_backend``)."""
    if backend not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {backend!r}")
    if backend == "triton" and not triton_installed():
        raise ImportError("backend='triton' needs the optional triton package, which is not installed "
                          "(pip install 'torch_geometric_bsa[triton]', Linux only); use backend='torch' "
                          "or 'auto' for the pure-PyTorch path")


def resolve_backend(backend: str, device: torch.device) -> str:
    r"""``"auto"`` -> ``"triton"`` on CUDA when Triton is installed (else ``"torch"``), ``"cpu"`` (the
    chunked CPU path) off CUDA; ``"triton"`` without the package raises an ImportError that says how
    to get it, and on a device it cannot run on (CPU without the interpreter) a ValueError."""
    check_backend_name(backend)
    if backend == "auto":
        if device.type == "cuda":
            return "triton" if triton_available(device) else "torch"
        return "cpu"
    if backend == "triton" and not triton_available(device):
        raise ValueError(f"backend='triton' needs CUDA tensors or the Triton CPU interpreter "
                         f"(TRITON_INTERPRET=1); the tensors are on {device}: use backend='auto' or 'torch'")
    return backend


def _check(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree: BallTree, cfg: BSAConfig, sigma: Tensor,
           gates: Tensor, gate_name: str = "gates") -> None:
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape:
        raise ValueError(f"q, k, v must share a shape [N_pad, H, D]; got {list(q.shape)}, "
                         f"{list(k.shape)}, {list(v.shape)}")
    if not q.is_floating_point() or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ValueError(f"q, k, v must share one floating-point dtype; got {q.dtype}, {k.dtype}, {v.dtype}")
    if q.size(0) != tree.num_slots:
        raise ValueError(f"q has {q.size(0)} rows but the tree has {tree.num_slots} slots (tree order expected)")
    if pos.dim() != 2 or pos.size(0) != tree.num_slots:
        raise ValueError(f"pos must be tree-ordered [N_pad={tree.num_slots}, d], got {list(pos.shape)}")
    if cfg.ball_size != tree.ball_size:
        raise ValueError(f"cfg.ball_size={cfg.ball_size} differs from the tree's ball_size={tree.ball_size}")
    if sigma.shape != (q.size(1),):
        raise ValueError(f"sigma must have shape [H={q.size(1)}], got {list(sigma.shape)}")
    nb = cfg.num_branches
    if gates.shape != (q.size(0), q.size(1), nb):
        raise ValueError(f"{gate_name} must have shape [N_pad, H, {nb}] (cfg.num_branches), got {list(gates.shape)}")
    if not gates.is_floating_point():
        raise ValueError(f"{gate_name} must be floating point, got {gates.dtype}")
    devs = {t.device for t in (q, k, v, pos, sigma, gates, tree.perm)}
    if len(devs) > 1:
        raise ValueError(f"all inputs (q, k, v, pos, sigma, gates, tree) must be on one device, got {devs}")


def bsa_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, tree: BallTree, cfg: BSAConfig, *,
                  sigma: Tensor, gates: Optional[Tensor] = None, k_cmp: Optional[Tensor] = None,
                  v_cmp: Optional[Tensor] = None, cmp_mask: Optional[Tensor] = None,
                  backend: str = "auto", validate: bool = True, gate_logits: Optional[Tensor] = None) -> Tensor:
    r"""Ball Sparse Attention on tree-ordered, padded tensors.

    Args:
        q, k, v (Tensor): ``[N_pad, H, D]`` in tree order (``BallTree.to_tree``).
        pos (Tensor): ``[N_pad, d]`` tree-ordered positions.
        tree (BallTree): the ball tree the tensors are ordered by.
        cfg (BSAConfig): block sizes, top-k and group size.
        sigma (Tensor): ``[H]`` per-head distance-bias scale of the ball branch.
        gates (Tensor): ``[N_pad, H, B]`` branch weights (ball, compression, selection, and the
            coarse branch when ``cfg.cmp_window`` is set: ``B = cfg.num_branches``).
        gate_logits (Tensor, optional): instead of ``gates``, their logits ``[N_pad, H, B]``
            (``gates = sigmoid(gate_logits)``); the Triton path applies the sigmoid inside its
            combine kernel (forward and backward), the others before the composition. Give
            exactly one of ``gates`` and ``gate_logits``.
        k_cmp, v_cmp (Tensor, optional): ``[N_pad // cmp_stride, H, D]`` compressed keys and
            values; mean pooling when omitted.
        backend (str): ``"auto"`` (Triton on CUDA, the chunked CPU path elsewhere), ``"torch"``
            (the readable reference, ``reference.bsa_reference``), ``"cpu"`` (``cpu.bsa_cpu``: plain
            torch ops, written for the CPU) or ``"triton"``.
        validate (bool): also check tensor values: that ``tree`` was built on these positions
            (its fingerprint) and that squared distances do not overflow ``pos``'s dtype. One flag,
            asserted without a host sync on CUDA. Layers that checked their inputs pass ``False``.

    Returns:
        ``[N_pad, H, D]``, zero at padded slots.
    """
    if (gates is None) == (gate_logits is None):
        raise ValueError("give exactly one of gates and gate_logits")
    _check(q, k, v, pos, tree, cfg, sigma, gates if gate_logits is None else gate_logits,
           "gates" if gate_logits is None else "gate_logits")
    check_compressed_kv(q, k_cmp, v_cmp, cmp_mask, cfg.cmp_stride)
    backend = resolve_backend(backend, q.device)
    check_backend_dtype(backend, q)
    if validate:
        # distances are computed in fp32 at least (16-bit inputs accumulate in fp32)
        check_coordinate_range(pos, torch.float64 if pos.dtype == torch.float64 else torch.float32)
        check_tree_matches(tree, pos.index_select(0, tree.inv), None, check_batch=False)
    if backend == "triton":  # the ball kernel reads sigma in float32 whatever its dtype: no cast
        from .kernels import bsa_triton
        return bsa_triton(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                          cmp_mask=cmp_mask, gate_logits=gate_logits)
    sigma = sigma.to(q.dtype)
    if gate_logits is not None:  # the readable paths squash first, as the layer used to
        gates = torch.sigmoid(gate_logits)
    if backend == "cpu":
        from .cpu import bsa_cpu
        return bsa_cpu(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                       cmp_mask=cmp_mask)
    return bsa_reference(q, k, v, pos, tree, cfg, sigma=sigma, gates=gates, k_cmp=k_cmp, v_cmp=v_cmp,
                         cmp_mask=cmp_mask)


def ball_attention(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor, ball_size: int,
                   backend: str = "auto") -> Tensor:
    r"""The ball branch alone (Erwin-style ball attention with distance bias), ``[N_pad, H, D]``.

    Same arguments as ``torch_geometric_bsa.reference.ball_attention``; ``backend`` as in
    ``bsa_attention``.
    """
    if q.dim() != 3 or k.shape != q.shape or v.shape != q.shape or q.size(0) % ball_size:
        raise ValueError(f"q, k, v must share a shape [N_pad, H, D] with N_pad a multiple of "
                         f"ball_size={ball_size}; got {list(q.shape)}, {list(k.shape)}, {list(v.shape)}")
    backend = resolve_backend(backend, q.device)
    check_backend_dtype(backend, q)
    if backend == "triton":
        from .kernels.ball import ball_attention_triton
        return ball_attention_triton(q, k, v, pos, sigma, mask, ball_size)
    sigma = sigma.to(q.dtype)
    if backend == "cpu":
        from .cpu import ball_attention_cpu
        return ball_attention_cpu(q, k, v, pos, sigma, mask, ball_size)
    from .reference import ball_attention as ref
    return ref(q, k, v, pos, sigma, mask, ball_size)
