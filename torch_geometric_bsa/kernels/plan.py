"""What the kernels need from a ball tree, derived once per tree and cached on it.

The kernels take tensors (offsets, masks, block sizes), never a ``BallTree`` or a ``BSAConfig``;
these functions turn a tree (and the config's block sizes) into those tensors. Each result is
memoised on the tree (``BallTree.cached``), so every layer of a model reuses it, and it is
computed on the device without a host read (so it can be built inside a captured graph).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["cloud_ranges", "compressed_ranges", "compressed_varlen", "group_ranges", "block_valid_i8", "as_int8",
           "selection_plan"]


def cloud_ranges(tree, unit_rows: int, unit_cols: int) -> Tuple[Tensor, Tensor]:
    r"""For rows at granularity ``unit_rows`` (slots per row), the column range ``[start, end)``
    (at granularity ``unit_cols``) of the row's own cloud, as int32 ``[N_pad // unit_rows]``.

    Clouds are contiguous slot ranges ``ptr[c]..ptr[c+1]`` whose sizes are multiples of both units
    (cfg validation), so these ranges are exact and no row or column straddles two clouds.
    """
    def compute():
        n = tree.num_slots // unit_rows
        cloud = tree.slot_batch[::unit_rows][:n]
        # the cloud offsets in column units, once per unit; each range is two gathers from them
        bounds = tree.cached(("cloud_bounds", unit_cols),
                             lambda: torch.div(tree.ptr, unit_cols, rounding_mode="floor").to(torch.int32))
        return bounds[cloud], bounds[1:][cloud]
    return tree.cached(("cloud_ranges", unit_rows, unit_cols), compute)


def _cut_to_window(tree, unit_rows: int, unit_cols: int, window: int, start: Tensor, end: Tensor):
    # the row's window in slots, relative to its cloud's first slot, then back to column units
    n = tree.num_slots // unit_rows
    rows = torch.arange(n, device=start.device, dtype=torch.int64) * unit_rows
    cloud0 = tree.ptr[tree.slot_batch[::unit_rows][:n]]
    w0 = cloud0 + (rows - cloud0) // window * window
    ws = (w0 // unit_cols).to(torch.int32)
    we = ((w0 + window) // unit_cols).to(torch.int32)
    return torch.maximum(start, ws).contiguous(), torch.minimum(end, we).contiguous()


def compressed_ranges(tree, q_unit: int, cmp_stride: int, window: Optional[int] = None):
    r"""``(kstart, kend, qstart, qend)`` int32: per query row (``q_unit`` slots each) its compressed
    keys' range, and per compressed key its query rows' range, each within the row's cloud.

    With ``window`` (slots, a multiple of the ball size), each range is cut to the aligned run of
    ``window`` slots of the cloud that holds the row (``BSAConfig.cmp_window``). A query row with no
    valid slot (padding; a group: all of it) gets an empty range: zero output and no say in the
    selection, as in the reference.
    """
    def compute():
        kstart, kend = cloud_ranges(tree, q_unit, cmp_stride)
        qstart, qend = cloud_ranges(tree, cmp_stride, q_unit)
        if window is not None:
            kstart, kend = _cut_to_window(tree, q_unit, cmp_stride, window, kstart, kend)
            qstart, qend = _cut_to_window(tree, cmp_stride, q_unit, window, qstart, qend)
        qvalid = tree.mask.view(-1, q_unit).any(1)
        kend = torch.where(qvalid, kend, kstart).contiguous()
        return kstart, kend, qstart, qend
    return tree.cached(("compressed_ranges", q_unit, cmp_stride, window), compute)


def compressed_varlen(tree, q_unit: int, cmp_stride: int, kmask: Tensor):
    r"""What a packed-sequence ("varlen") attention kernel needs for the compression branch:
    ``(src, dest, kinvalid, cu_q, cu_k, max_q, max_k, empty)``.

    Query rows (``q_unit`` slots each) are already packed cloud after cloud: cloud ``c`` holds rows
    ``cu_q[c]:cu_q[c+1]``. The compressed keys are packed too, but a cloud's invalid keys (``kmask``
    zero: blocks of padding, or masked by the caller) must not count, so the keys are reordered:
    ``k_cmp[src]`` holds each cloud's valid keys at ``cu_k[c]:cu_k[c+1]`` and every invalid key after
    ``cu_k[-1]``, where no sequence reads it. ``dest`` is the inverse permutation (a gradient in
    packed order goes back with ``index_select(0, dest)``), ``kinvalid [K]`` bool marks the keys
    whose gradient is zero. ``max_q``, ``max_k`` are Python ints (bounds from the tree's layout: no
    host read). ``empty [Q]`` bool marks rows with no valid slot or no valid key: zero output,
    ``EMPTY_LSE``.

    Derived on the device without a host read, and memoised on the tree while ``kmask`` is the same
    tensor (a caller's own mask, new each call, is derived again each call).
    """
    def compute():
        nk = tree.num_slots // cmp_stride
        dev = kmask.device
        valid = kmask[:nk] != 0
        cloud = tree.slot_batch[::cmp_stride][:nk]
        per_cloud = torch.zeros(tree.num_clouds, dtype=torch.int32, device=dev).index_add_(
            0, cloud, valid.to(torch.int32))
        cu_k = torch.zeros(tree.num_clouds + 1, dtype=torch.int32, device=dev)
        cu_k[1:] = torch.cumsum(per_cloud, 0)
        # valid keys keep their order (so each cloud's stay contiguous), invalid ones follow them all
        rank_valid = torch.cumsum(valid, 0) - 1
        rank_invalid = torch.cumsum(~valid, 0) - 1
        dest = torch.where(valid, rank_valid, cu_k[-1].long() + rank_invalid)
        src = torch.empty_like(dest).scatter_(0, dest, torch.arange(nk, device=dev))
        cu_q = torch.div(tree.ptr, q_unit, rounding_mode="floor").to(torch.int32)
        kstart, kend = compressed_ranges(tree, q_unit, cmp_stride)[:2]
        row_cloud = tree.slot_batch[::q_unit][:tree.num_slots // q_unit]
        empty = (kend <= kstart) | (per_cloud[row_cloud] == 0)
        return (kmask, src, dest, ~valid, cu_q, cu_k, tree.max_slots // q_unit, tree.max_slots // cmp_stride, empty)
    return tree.cached(("compressed_varlen", q_unit, cmp_stride), compute, valid=lambda hit: hit[0] is kmask)[1:]


def group_ranges(tree, group_size: int, slc_block: int, window: Optional[int] = None):
    r"""``(gstart, gend)`` int32 ``[N_pad // group_size]``: the selection blocks a query group may
    pick (its cloud's, or its window's with ``window``)."""
    def compute():
        gstart, gend = cloud_ranges(tree, group_size, slc_block)
        if window is not None:
            gstart, gend = _cut_to_window(tree, group_size, slc_block, window, gstart, gend)
        return gstart, gend
    return tree.cached(("group_ranges", group_size, slc_block, window), compute)


def block_valid_i8(tree, block: int) -> Tensor:
    r"""``[N_pad // block]`` int8: whether each block of ``block`` slots holds a valid slot (the bytes
    of the bool block mask the compressor caches under the same key: a view)."""
    return as_int8(tree.cached(("block_any", block, block), lambda: tree.mask.view(-1, block).any(1)))


def as_int8(mask: Tensor) -> Tensor:
    r"""A block mask as the kernels read it (int8, ``!= 0``); a bool mask's own bytes when contiguous."""
    if mask.dtype == torch.int8:
        return mask
    if mask.dtype == torch.bool and mask.is_contiguous():
        return mask.view(torch.int8)
    return mask.to(torch.int8).contiguous()


def selection_plan(tree, group_size: int, slc_block: int, topk: int, window: Optional[int] = None):
    r"""What the top-k kernel takes besides the scores' inputs: ``(svalid, (gstart, gend), k')`` with
    ``k' = min(topk, blocks of the largest cloud)`` (a Python int: no host read)."""
    return (block_valid_i8(tree, slc_block), group_ranges(tree, group_size, slc_block, window),
            min(topk, tree.max_slots // slc_block))
