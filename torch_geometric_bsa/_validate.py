"""Boundary checks of the public entry points that would otherwise give silently wrong results.

Each check runs once per public call (``BSAConv.forward``, ``BSATransformer.forward``,
``bsa_attention``), never per layer. Checks of shapes and host-side metadata are free. Checks of
tensor values (does the tree match these positions and clouds? do squared distances overflow?)
reduce to one flag: on the CPU it is read and a ValueError names the problem; on CUDA it goes to
``torch._assert_async``, which adds no host synchronisation (a failure surfaces at a later launch).
"""
from __future__ import annotations

import math
import os
from typing import Optional

import torch
from torch import Tensor

__all__ = ["value_checks_enabled", "positions_fingerprint", "check_tree_matches", "check_coordinate_range", "coordinate_limit",
           "check_compressed_kv", "check_backend_dtype"]

_PHI = 0.618033988749


def check_positive_int(name: str, value) -> None:
    r"""Raises ``ValueError`` unless ``value`` is an int >= 1 (sizes, counts, neighbours)."""
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


def value_checks_enabled() -> bool:
    r"""Whether checks that read tensor values back to the host (finite inputs, sorted batch) run:
    not while a CUDA graph is being captured (a sync is an error there), nor while torch.compile
    traces (a graph break)."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())



def positions_fingerprint(pos: Tensor, cloud: Tensor, num_clouds: int, absolute: bool = False) -> Tensor:
    r"""Per-cloud fingerprint of positions, ``[num_clouds, d]`` float64: the sum over each cloud's
    points of ``(1 + 0.618 * i) * pos_i`` (``i``: index inside the cloud), so it changes when a
    coordinate moves or points swap. ``cloud [N]`` is each point's cloud index (sorted);
    ``num_clouds`` a Python int, so no host synchronisation. ``absolute``: of ``|pos|`` (the
    scale for a rounding tolerance). Not a cryptographic hash: it catches mistakes, not attacks."""
    p = pos.double().abs() if absolute else pos.double()
    n = pos.size(0)
    counts = torch.zeros(num_clouds, dtype=torch.long, device=pos.device).index_add_(
        0, cloud, torch.ones(n, dtype=torch.long, device=pos.device))
    start = torch.cumsum(counts, 0) - counts
    local = torch.arange(n, device=pos.device) - start.index_select(0, cloud)
    w = (1.0 + _PHI * local.double()).unsqueeze(1)
    return torch.zeros(num_clouds, pos.size(1), dtype=torch.float64, device=pos.device).index_add_(0, cloud, p * w)


def _fail_if(bad: Tensor, message: str) -> None:
    r"""Raise ``ValueError(message)`` if the 0-dim bool ``bad`` is true: read on the CPU, asserted
    asynchronously on CUDA (no sync)."""
    if bad.device.type == "cpu" and value_checks_enabled():
        if bool(bad):
            raise ValueError(message)
    else:  # CUDA, or traced by torch.compile (where reading the flag would break the graph)
        torch._assert_async(~bad)


def check_tree_matches(tree, pos: Tensor, batch: Optional[Tensor], check_batch: bool = True) -> None:
    r"""A tree given by the caller must have been built on these positions and clouds.

    Host-side (free): point count, device, and a single-cloud tree when ``batch`` is None.
    Value checks (one flag): every point's cloud as the tree has it equals ``batch``, and the
    per-cloud fingerprint of ``pos`` equals the one recorded at build time (within the rounding of
    ``pos``'s dtype: a tree built on float64 positions accepts the same positions in float32).
    ``check_batch=False``: only the positions (for callers that have no batch vector)."""
    if tree.num_points != pos.size(0):
        raise ValueError(f"tree was built on {tree.num_points} points but pos has {pos.size(0)}")
    if tree.device != pos.device:
        raise ValueError(f"tree is on {tree.device} but pos is on {pos.device}")
    if check_batch and batch is None and tree.num_clouds != 1:
        raise ValueError(f"tree was built on {tree.num_clouds} clouds (a batch vector) but batch is None: "
                         "pass the batch vector the tree was built with")
    cloud = tree.slot_batch.index_select(0, tree.inv)  # each point's cloud, as the tree has it
    bad = torch.zeros((), dtype=torch.bool, device=pos.device)
    if check_batch and batch is not None:
        bad = bad | (cloud != batch).any()
    key = getattr(tree, "pos_key", None)
    if key is not None:
        fp = positions_fingerprint(pos, cloud, tree.num_clouds)
        scale = positions_fingerprint(pos, cloud, tree.num_clouds, absolute=True)
        eps = max(torch.finfo(pos.dtype).eps, torch.finfo(torch.float32).eps)
        bad = bad | ((fp - key).abs() > 8 * eps * scale + 1e-300).any()
    sizes = getattr(tree, "cloud_sizes", None)
    _fail_if(bad, "tree does not match the inputs: it was built on other positions or another batch vector "
                  f"(tree: {tree.num_clouds} cloud(s) of sizes {_short(sizes)}, {tree.num_points} points); "
                  "build it from the same pos and batch, after any transform that moves the points")


def _short(sizes) -> str:
    if sizes is None:
        return "unknown"
    sizes = list(sizes)
    return str(sizes) if len(sizes) <= 8 else f"[{', '.join(map(str, sizes[:8]))}, ...]"


def coordinate_limit(dtype: torch.dtype, dim: int) -> float:
    r"""Largest coordinate magnitude whose squared distances ``sum_d (p_i - p_j)^2`` stay finite in
    ``dtype`` (``sqrt(max / (4 d))``): about 5e18 in float32/bfloat16, 74 in float16."""
    return math.sqrt(torch.finfo(dtype).max / (4 * dim))


def check_coordinate_range(pos: Tensor, dtype: Optional[torch.dtype] = None, name: str = "pos") -> None:
    r"""Rejects NaN/Inf in ``pos`` and coordinates whose squared distances overflow ``dtype``
    (default ``pos.dtype``), which would turn the distance bias into NaN."""
    dtype = dtype or pos.dtype
    limit = coordinate_limit(dtype, pos.size(-1))
    bad = ~(pos.abs() <= limit).all()  # NaN compares false: caught too
    _fail_if(bad, f"{name} contains NaN/Inf or coordinates beyond +-{limit:.3g}, whose squared distances "
                  f"overflow {dtype} (the distance bias would be NaN); normalise the positions "
                  "(e.g. torch_geometric.transforms.NormalizeScale)")


def check_compressed_kv(q: Tensor, k_cmp: Optional[Tensor], v_cmp: Optional[Tensor],
                        cmp_mask: Optional[Tensor], cmp_stride: int) -> None:
    r"""``k_cmp``/``v_cmp`` come together, as ``[N_pad // cmp_stride, H, D]`` in ``q``'s dtype and
    device; ``cmp_mask`` (optional, only with them) is ``[N_pad // cmp_stride]``."""
    if (k_cmp is None) != (v_cmp is None):
        raise ValueError("k_cmp and v_cmp must be given together (or both left out for mean pooling); "
                         f"got k_cmp={'None' if k_cmp is None else 'a tensor'}, "
                         f"v_cmp={'None' if v_cmp is None else 'a tensor'}")
    if k_cmp is None:
        if cmp_mask is not None:
            raise ValueError("cmp_mask was given without k_cmp/v_cmp")
        return
    nb = q.size(0) // cmp_stride
    want = (nb, q.size(1), q.size(2))
    for name, t in (("k_cmp", k_cmp), ("v_cmp", v_cmp)):
        if tuple(t.shape) != want:
            raise ValueError(f"{name} must have shape [N_pad // cmp_stride = {nb}, H = {q.size(1)}, "
                             f"D = {q.size(2)}], got {list(t.shape)}")
        if t.dtype != q.dtype or t.device != q.device:
            raise ValueError(f"{name} must match q's dtype and device ({q.dtype}, {q.device}), "
                             f"got {t.dtype}, {t.device}")
    if cmp_mask is not None and (tuple(cmp_mask.shape) != (nb,) or cmp_mask.device != q.device):
        raise ValueError(f"cmp_mask must have shape [N_pad // cmp_stride = {nb}] on {q.device}, "
                         f"got {list(cmp_mask.shape)} on {cmp_mask.device}")


def check_backend_dtype(backend: str, x: Tensor) -> None:
    r"""The Triton CPU interpreter (``TRITON_INTERPRET=1``) mis-reads bfloat16 buffers (finite
    output off by orders of magnitude, no error): refuse that combination."""
    if (backend == "triton" and x.device.type == "cpu" and x.dtype == torch.bfloat16
            and os.environ.get("TRITON_INTERPRET") == "1"):
        raise ValueError("backend='triton' with bfloat16 tensors on the CPU: Triton's interpreter "
                         "(TRITON_INTERPRET=1) mis-reads bfloat16 buffers and would return wrong values; "
                         "use backend='torch' (or 'auto'), or float32/float16 on the CPU")
