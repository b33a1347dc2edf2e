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

__all__ = ["cloud_ranges", "compressed_ranges", "group_ranges", "block_valid_i8", "as_int8", "selection_plan"]


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


def selected_count(tree, slc_block: int, topk: int) -> int:
    r"""``k'``, the blocks the streamed top-k selects a group: ``min(topk, blocks of the largest
    cloud)`` (a Python int: no host read)."""
    return min(topk, tree.max_slots // slc_block)


def selection_plan(tree, group_size: int, slc_block: int, topk: int, window: Optional[int] = None):
    r"""What the top-k kernel takes besides the scores' inputs: ``(svalid, (gstart, gend), k')``
    (``selected_count``)."""
    return (block_valid_i8(tree, slc_block), group_ranges(tree, group_size, slc_block, window),
            selected_count(tree, slc_block, topk))
