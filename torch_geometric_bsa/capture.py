"""CUDA-graph capture of a whole step (forward, loss, backward, optimizer), keyed by batch shape.

At the sizes people train on, an eager step is paced by the host: thousands of kernel launches and
their Python glue. A captured step replays all of them with one launch. The ball tree is built
inside the graph too: its sizes (the graph's key) are read once per step, before the replay.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable, Optional

import torch
from torch import Tensor, nn

from . import layer_graphs
from .layer_graphs import _TREE_TENSORS, _static_tree
from .balltree import BallTree, build_ball_tree, tree_layout

__all__ = ["GraphedStep"]

class _Graph:
    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()
        self.inputs: dict = {}
        self.tree: Optional[BallTree] = None
        self.result: Optional[Tensor] = None

    def load(self, tensors: dict, tree: BallTree) -> None:
        for k, t in tensors.items():
            if t is not None:
                self.inputs[k].copy_(t)
        if self.tree is not None:
            for k in _TREE_TENSORS:
                getattr(self.tree, k).copy_(getattr(tree, k))


class GraphedStep:
    r"""A training (or inference) step of a point-cloud model, replayed as a CUDA graph.

    The first ``warmup`` calls with a new batch shape run eagerly (on a side stream, as graph
    capture wants); the next call captures the step and every later call with that shape copies
    its inputs into the graph's buffers and replays it. Every call performs exactly one real step,
    so the warm-up calls are ordinary training steps. Without ``tree=``, the ball tree is built
    inside the graph (``build_ball_tree(..., layout=...)``): the step reads the batch's layout
    (cloud count, padded slots, largest cloud) from the device once, as its key, and nothing else.
    Shapes are keyed by the point count and that layout: batches of fixed-size clouds (e.g. PyG's
    ``FixedPoints`` transform) reuse one graph; ragged batches capture one graph per distinct
    shape (the ``max_graphs`` most recent are kept, each with its own memory pool).

    Args:
        model (nn.Module): called as ``model(x, pos, batch, tree=tree)`` (e.g. ``BSATransformer``;
            not with ``rotate=True``, whose second tree is built inside the forward); its
            ``ball_size`` attribute sizes the trees built in the step.
        optimizer (torch.optim.Optimizer, optional): built with ``capturable=True`` (e.g.
            ``AdamW(params, fused=True, capturable=True)``). A float learning rate is turned into
            a device tensor, so that schedulers keep working after capture. ``None``: inference.
        loss_fn (callable, optional): ``loss_fn(out, target) -> scalar tensor`` (training).
        autocast_dtype (torch.dtype, optional): run the forward under ``torch.autocast``.
        clip_grad_norm (float, optional): clip the gradients' total norm inside the step.
        warmup (int): eager calls per new shape before its capture (at least 1).
        max_graphs (int): graphs kept, least recently used dropped first.

    Call:
        ``step(x, pos, batch=None, *, tree=None, target=None)``; ``tree``: a prebuilt tree (e.g.
        cached by ``CacheBallTree``), else one is built inside the step. Returns the loss
        (training) or the model output (inference) as a tensor that the next call overwrites:
        ``.item()`` or ``.clone()`` it to keep it.

    Value checks (finite inputs) are skipped inside the captured graph; run the model eagerly
    once, or check the data upstream, to validate a new data source.
    """

    def __init__(self, model: nn.Module, optimizer: Optional[torch.optim.Optimizer] = None,
                 loss_fn: Optional[Callable[[Tensor, Tensor], Tensor]] = None, *,
                 autocast_dtype: Optional[torch.dtype] = None, clip_grad_norm: Optional[float] = None,
                 warmup: int = 2, max_graphs: int = 4):
        if not torch.cuda.is_available():
            raise RuntimeError("GraphedStep needs CUDA (CUDA graphs); run the model eagerly on the CPU")
        if (optimizer is None) != (loss_fn is None):
            raise ValueError("give both optimizer and loss_fn (training) or neither (inference)")
        if getattr(model, "rotate", False) and getattr(model, "num_layers", 1) > 1:
            raise ValueError("GraphedStep cannot capture a model with rotate=True: its rotated tree is built "
                             "inside the forward")
        if not isinstance(warmup, int) or warmup < 1:
            raise ValueError(f"warmup must be an int >= 1, got {warmup!r}")
        if not isinstance(max_graphs, int) or max_graphs < 1:
            raise ValueError(f"max_graphs must be an int >= 1, got {max_graphs!r}")
        if optimizer is not None:
            for group in optimizer.param_groups:
                if not group.get("capturable", False):
                    raise ValueError("the optimizer must be built with capturable=True, e.g. "
                                     "torch.optim.AdamW(params, fused=True, capturable=True)")
            device = next(model.parameters()).device
            for group in optimizer.param_groups:
                if not isinstance(group["lr"], Tensor):
                    group["lr"] = torch.tensor(float(group["lr"]), device=device)
        self.model, self.optimizer, self.loss_fn = model, optimizer, loss_fn
        self.autocast_dtype, self.clip_grad_norm = autocast_dtype, clip_grad_norm
        self.warmup, self.max_graphs = warmup, max_graphs
        self._graphs: "OrderedDict[tuple, _Graph]" = OrderedDict()
        self._seen: dict = {}
        self.captures = 0  # graphs captured so far (a test and the benchmark read it)

    @property
    def training(self) -> bool:
        return self.optimizer is not None

    def _step(self, x, pos, batch, tree, target, layout=None):
        if tree is None:
            tree = build_ball_tree(pos, batch, self.model.ball_size, layout=layout)
        if self.training:
            self.optimizer.zero_grad(set_to_none=True)
        ctx = torch.autocast("cuda", dtype=self.autocast_dtype, enabled=self.autocast_dtype is not None)
        if not self.training:
            with torch.no_grad(), ctx:
                return self.model(x, pos, batch, tree=tree)
        with ctx:
            out = self.model(x, pos, batch, tree=tree)
        loss = self.loss_fn(out, target)
        loss.backward()
        if self.clip_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip_grad_norm, foreach=True)
        self.optimizer.step()
        return loss.detach()

    def _eager(self, *args):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), layer_graphs.disabled():  # the whole step is captured, not each layer
            result = self._step(*args)
        torch.cuda.current_stream().wait_stream(side)
        return result

    def _capture(self, tensors: dict, tree: Optional[BallTree], layout) -> _Graph:
        g = _Graph()
        g.inputs = {k: (None if t is None else t.clone()) for k, t in tensors.items()}
        g.tree = None if tree is None else _static_tree(tree)
        if self.training:
            self.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
        with layer_graphs.no_gc(), layer_graphs.current_stream_kept(), torch.cuda.graph(g.graph):
            g.result = self._step(g.inputs["x"], g.inputs["pos"], g.inputs["batch"], g.tree, g.inputs["target"],
                                  layout)
        self.captures += 1
        return g

    def __call__(self, x: Tensor, pos: Tensor, batch: Optional[Tensor] = None, *, tree: Optional[BallTree] = None,
                 target: Optional[Tensor] = None) -> Tensor:
        if tree is not None and not isinstance(tree, BallTree):
            raise ValueError(f"tree must be a BallTree or None, got {type(tree).__name__}")
        if tree is None and not isinstance(getattr(self.model, "ball_size", None), int):
            raise ValueError("the model has no int ball_size attribute: pass tree= (build_ball_tree)")
        if self.training and target is None:
            raise ValueError("target is required for a training step")
        if x is None or not x.is_cuda:
            raise ValueError("GraphedStep needs CUDA inputs (x, pos, batch, target)")
        tensors = dict(x=x, pos=pos, batch=batch, target=target)
        layout = None
        if tree is None:
            layout = tree_layout(batch, self.model.ball_size, pos.size(0))  # the step's one host read
            shape = ("built",) + layout
        else:
            shape = ("given", tree.num_points, tree.num_slots, tree.num_clouds, tree.max_slots, tree.ball_size)
        key = (tuple(x.shape), x.dtype, tuple(pos.shape), pos.dtype, batch is None,
               None if target is None else (tuple(target.shape), target.dtype)) + shape
        g = self._graphs.get(key)
        if g is None:
            seen = self._seen.get(key, 0)
            if seen < self.warmup:
                self._seen[key] = seen + 1
                return self._eager(x, pos, batch, tree, target, layout)
            g = self._capture(tensors, tree, layout)
            self._graphs[key] = g
            while len(self._graphs) > self.max_graphs:
                self._graphs.popitem(last=False)
        else:
            self._graphs.move_to_end(key)
        g.load(tensors, tree)
        g.graph.replay()
        return g.result
