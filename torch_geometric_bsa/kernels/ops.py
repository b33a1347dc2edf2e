"""The kernels as ``torch.library`` custom ops, for ``torch.compile(fullgraph=True)``.

Dynamo cannot trace into a Triton launch inside an ``autograd.Function``; a custom op is opaque to
it: the graph holds the op, its fake implementation gives output shapes while tracing, and its
registered autograd formula calls the backward op. Eager code keeps calling the autograd
Functions directly (a custom op's dispatch costs host time); each public kernel wrapper switches
to these ops only while ``torch.compiler.is_compiling()``. The ops run the same Functions'
``forward`` / ``backward`` bodies, through a stand-in context, so both paths launch the same
kernels with the same arguments.
"""

from typing import Tuple

import torch
from torch import Tensor
from torch.library import custom_op

from . import _common
from ._common import SavedCtx

__all__ = ["ball", "compressed", "selected", "combine", "block_mean", "topk"]


def _needs(ctx, i: int) -> bool:
    return bool(ctx.needs_input_grad[i])


# ------------------------------------------------------------------------------------------------
# ball branch
# ------------------------------------------------------------------------------------------------
@custom_op("torch_geometric_bsa::ball_fwd", mutates_args=())
def ball_fwd(q: Tensor, k: Tensor, v: Tensor, pos: Tensor, sigma: Tensor, mask: Tensor, ball_size: int,
             scale: float) -> Tuple[Tensor, Tensor]:
    from .ball import BallAttentionFunction
    q, k, v = _common.shared_rows(q, k, v)
    ctx = SavedCtx()
    o = BallAttentionFunction.forward(ctx, q, k, v, pos.contiguous(), sigma.contiguous(), mask, ball_size, scale)
    return o, ctx.saved_tensors[4]  # the log-sum-exp the backward reads


@ball_fwd.register_fake
def _(q, k, v, pos, sigma, mask, ball_size, scale):
    n, h, d = q.shape
    return q.new_empty((n, h, d)), q.new_empty((h, n), dtype=torch.float32)


@custom_op("torch_geometric_bsa::ball_bwd", mutates_args=())
def ball_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, pos: Tensor, sigma: Tensor,
             mask: Tensor, ball_size: int, scale: float, pos_grad: bool,
             sigma_grad: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
    from .ball import BallAttentionFunction
    q, k, v = _common.shared_rows(q, k, v)
    ctx = SavedCtx((q, k, v, o, lse, pos.contiguous(), sigma.contiguous(), mask), ball_size=ball_size, scale=scale,
                   needs_input_grad=(True, True, True, pos_grad, sigma_grad))
    dq, dk, dv, dpos, dsigma = BallAttentionFunction.backward(ctx, do)[:5]
    # a custom op returns tensors: zeros where no gradient was asked for (its autograd drops them)
    return (dq, dk, dv, pos.new_zeros(pos.shape) if dpos is None else dpos,
            sigma.new_zeros(sigma.shape) if dsigma is None else dsigma)


@ball_bwd.register_fake
def _(do, q, k, v, o, lse, pos, sigma, mask, ball_size, scale, pos_grad, sigma_grad):
    return (q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape), pos.new_empty(pos.shape),
            sigma.new_empty(sigma.shape))


def _ball_setup(ctx, inputs, output):
    q, k, v, pos, sigma, mask, ball_size, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], pos, sigma, mask)
    ctx.ball_size, ctx.scale = ball_size, scale


def _ball_backward(ctx, do, _dlse):
    q, k, v, o, lse, pos, sigma, mask = ctx.saved_tensors
    dq, dk, dv, dpos, dsigma = ball_bwd(do, q, k, v, o, lse, pos, sigma, mask, ctx.ball_size, ctx.scale,
                                        _needs(ctx, 3), _needs(ctx, 4))
    return (dq, dk, dv, dpos if _needs(ctx, 3) else None, dsigma if _needs(ctx, 4) else None, None, None, None)


ball_fwd.register_autograd(_ball_backward, setup_context=_ball_setup)


def ball(q, k, v, pos, sigma, mask, ball_size: int, scale: float) -> Tensor:
    return ball_fwd(q, k, v, pos, sigma, mask, ball_size, scale)[0]


# ------------------------------------------------------------------------------------------------
# compression branch
# ------------------------------------------------------------------------------------------------
@custom_op("torch_geometric_bsa::compressed_fwd", mutates_args=())
def compressed_fwd(q: Tensor, k_cmp: Tensor, v_cmp: Tensor, kmask: Tensor, kstart: Tensor, kend: Tensor,
                   qstart: Tensor, qend: Tensor, scale: float, ragged: bool) -> Tuple[Tensor, Tensor]:
    from .compressed import CompressedAttention
    return CompressedAttention.forward(SavedCtx(), q, k_cmp, v_cmp, kmask, kstart, kend, qstart, qend, scale, ragged)


@compressed_fwd.register_fake
def _(q, k_cmp, v_cmp, kmask, kstart, kend, qstart, qend, scale, ragged):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@custom_op("torch_geometric_bsa::compressed_bwd", mutates_args=())
def compressed_bwd(do: Tensor, q: Tensor, k_cmp: Tensor, v_cmp: Tensor, o: Tensor, lse: Tensor, kmask: Tensor,
                   kstart: Tensor, kend: Tensor, qstart: Tensor, qend: Tensor, scale: float,
                   ragged: bool) -> Tuple[Tensor, Tensor, Tensor]:
    from .compressed import CompressedAttention
    saved = (_common.rows(q), k_cmp.contiguous(), v_cmp.contiguous(), o, lse, kmask, kstart, kend, qstart, qend)
    return CompressedAttention.backward(SavedCtx(saved, scale=scale, ragged=ragged), do, None)[:3]


@compressed_bwd.register_fake
def _(do, q, k_cmp, v_cmp, o, lse, kmask, kstart, kend, qstart, qend, scale, ragged):
    return q.new_empty(q.shape), k_cmp.new_empty(k_cmp.shape), v_cmp.new_empty(v_cmp.shape)


def _compressed_setup(ctx, inputs, output):
    q, k_cmp, v_cmp, kmask, kstart, kend, qstart, qend, scale, ragged = inputs
    ctx.save_for_backward(q, k_cmp, v_cmp, output[0], output[1], kmask, kstart, kend, qstart, qend)
    ctx.scale, ctx.ragged = scale, ragged


def _compressed_backward(ctx, do, _dlse):
    dq, dk, dv = compressed_bwd(do, *ctx.saved_tensors, ctx.scale, ctx.ragged)
    return (dq, dk, dv) + (None,) * 7


compressed_fwd.register_autograd(_compressed_backward, setup_context=_compressed_setup)


compressed = compressed_fwd  # the op itself: its outputs are the wrapper's


# ------------------------------------------------------------------------------------------------
# selection branch
# ------------------------------------------------------------------------------------------------
@custom_op("torch_geometric_bsa::selected_fwd", mutates_args=())
def selected_fwd(q: Tensor, k: Tensor, v: Tensor, mask: Tensor, idx: Tensor, group_size: int, slc_block: int,
                 scale: float) -> Tuple[Tensor, Tensor]:
    from .selected import SelectedAttention
    ctx = SavedCtx()
    o = SelectedAttention.forward(ctx, q, k, v, mask, idx, group_size, slc_block, scale)
    return o, ctx.saved_tensors[4]  # the log-sum-exp the backward reads


@selected_fwd.register_fake
def _(q, k, v, mask, idx, group_size, slc_block, scale):
    return q.new_empty(q.shape), q.new_empty(q.shape[:2], dtype=torch.float32)


@custom_op("torch_geometric_bsa::selected_bwd", mutates_args=())
def selected_bwd(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor, mask: Tensor, idx: Tensor,
                 group_size: int, slc_block: int, scale: float) -> Tuple[Tensor, Tensor, Tensor]:
    from .selected import SelectedAttention
    q, k, v = _common.shared_rows(q, k, v)
    ctx = SavedCtx((q, k, v, o, lse, mask, idx), g=group_size, ls=slc_block, scale=scale)
    return SelectedAttention.backward(ctx, do)[:3]


@selected_bwd.register_fake
def _(do, q, k, v, o, lse, mask, idx, group_size, slc_block, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _selected_setup(ctx, inputs, output):
    q, k, v, mask, idx, group_size, slc_block, scale = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], mask, idx)
    ctx.g, ctx.ls, ctx.scale = group_size, slc_block, scale


def _selected_backward(ctx, do, _dlse):
    dq, dk, dv = selected_bwd(do, *ctx.saved_tensors, ctx.g, ctx.ls, ctx.scale)
    return (dq, dk, dv) + (None,) * 5


selected_fwd.register_autograd(_selected_backward, setup_context=_selected_setup)


def selected(q, k, v, mask, idx, group_size: int, slc_block: int, scale: float) -> Tensor:
    return selected_fwd(q, k, v, mask, idx, group_size, slc_block, scale)[0]


# ------------------------------------------------------------------------------------------------
# gated combine and masked block mean
# ------------------------------------------------------------------------------------------------
@custom_op("torch_geometric_bsa::combine_fwd", mutates_args=())
def combine_fwd(o_ball: Tensor, o_c: Tensor, o_slc: Tensor, gates: Tensor, mask: Tensor, q_unit: int,
                logits: bool = False) -> Tensor:
    from .combine import GatedCombine
    return GatedCombine.forward(SavedCtx(), o_ball, o_c, o_slc, gates, mask, q_unit, logits)


@combine_fwd.register_fake
def _(o_ball, o_c, o_slc, gates, mask, q_unit, logits=False):
    return o_ball.new_empty(o_ball.shape, dtype=torch.promote_types(o_ball.dtype, gates.dtype))


@custom_op("torch_geometric_bsa::combine_bwd", mutates_args=())
def combine_bwd(do: Tensor, o_ball: Tensor, o_c: Tensor, o_slc: Tensor, gates: Tensor, mask: Tensor,
                q_unit: int, logits: bool = False) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    from .combine import GatedCombine
    saved = tuple(t.contiguous() for t in (o_ball, o_c, o_slc, gates)) + (mask,)
    return GatedCombine.backward(SavedCtx(saved, qu=q_unit, logits=logits), do)[:4]


@combine_bwd.register_fake
def _(do, o_ball, o_c, o_slc, gates, mask, q_unit, logits=False):
    return tuple(t.new_empty(t.shape) for t in (o_ball, o_c, o_slc, gates))


def _combine_setup(ctx, inputs, output):
    o_ball, o_c, o_slc, gates, mask, q_unit, logits = inputs
    ctx.save_for_backward(o_ball, o_c, o_slc, gates, mask)
    ctx.q_unit, ctx.logits = q_unit, logits


def _combine_backward(ctx, do):
    return combine_bwd(do, *ctx.saved_tensors, ctx.q_unit, ctx.logits) + (None, None, None)


combine_fwd.register_autograd(_combine_backward, setup_context=_combine_setup)


combine = combine_fwd  # the op itself: its outputs are the wrapper's


@custom_op("torch_geometric_bsa::block_mean_fwd", mutates_args=())
def block_mean_fwd(x: Tensor, mask: Tensor, block: int) -> Tensor:
    from .combine import MaskedBlockMean
    return MaskedBlockMean.forward(SavedCtx(), x, mask, block)


@block_mean_fwd.register_fake
def _(x, mask, block):
    n, h, d = x.shape
    return x.new_empty((n // block, h, d))


@custom_op("torch_geometric_bsa::block_mean_bwd", mutates_args=())
def block_mean_bwd(dout: Tensor, mask: Tensor, n: int, block: int) -> Tensor:
    from .combine import MaskedBlockMean
    return MaskedBlockMean.backward(SavedCtx((mask,), shape=(n,) + tuple(dout.shape[1:]), block=block), dout)[0]


@block_mean_bwd.register_fake
def _(dout, mask, n, block):
    return dout.new_empty((n,) + tuple(dout.shape[1:]))


def _block_mean_setup(ctx, inputs, output):
    x, mask, block = inputs
    ctx.save_for_backward(mask)
    ctx.n, ctx.block = x.size(0), block


def _block_mean_backward(ctx, dout):
    (mask,) = ctx.saved_tensors
    return block_mean_bwd(dout, mask, ctx.n, ctx.block), None, None


block_mean_fwd.register_autograd(_block_mean_backward, setup_context=_block_mean_setup)


block_mean = block_mean_fwd  # the op itself: its outputs are the wrapper's


# ------------------------------------------------------------------------------------------------
# streamed top-k (no gradient)
# ------------------------------------------------------------------------------------------------
@custom_op("torch_geometric_bsa::topk", mutates_args=())
def topk(q_cmp: Tensor, k_cmp: Tensor, lse: Tensor, kmask: Tensor, svalid: Tensor, kstart: Tensor, kend: Tensor,
         gstart: Tensor, gend: Tensor, k: int, scale: float) -> Tensor:
    from .topk import select_topk_triton
    return select_topk_triton(q_cmp, k_cmp, lse, kmask, svalid, (kstart, kend), (gstart, gend), k, scale)


@topk.register_fake
def _(q_cmp, k_cmp, lse, kmask, svalid, kstart, kend, gstart, gend, k, scale):
    return q_cmp.new_empty((gstart.numel(), k), dtype=torch.int32)
