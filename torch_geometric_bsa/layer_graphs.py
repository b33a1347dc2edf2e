"""Per-layer CUDA graphs, replayed from eager code: what keeps an eager BSA step fast at the sizes
people train on.

A BSA layer's forward and backward launch ~60 kernels through Python wrappers; at a few thousand
points per cloud the GPU finishes them faster than the host can issue them (docs/perf-notes.md,
"Where an eager BSA layer's host time goes"). ``LayerGraphs`` captures a layer's tree-order
forward, and its backward, as two CUDA graphs per input shape, the second time it sees that shape,
and replays them on every later call: the layer's host cost drops to a few copies and two launches.
Nothing changes for the caller: it stays ordinary eager PyTorch (autograd, optimizers, DDP,
gradient accumulation), and the results are the eager kernels' own.

What a replay copies in: the layer's input features, and, once per tree and step for all layers
on that tree, the positions and the ball tree's tensors, into one static tree shared by their
graphs (``_SharedTree``). What layers derive from the tree (masks, ranges, relative positions:
``BallTree.cached``) is derived there too, once, by the shared tree's own small graphs, and the
layers' graphs read it as inputs; a derivation that reads anything else stays inside the layer's
graph. So a new tree of the same shape is followed exactly. Positions that take a gradient keep a
static tree per layer (their derivations belong to the layer's backward). Parameters and buffers
are read in place, so optimizer updates are seen; a parameter that is replaced (``.to()``,
``load_state_dict(assign=True)``) or frozen changes the key and is captured anew.

Safety: a module with hooks (forward, pre-forward or backward, on it or any submodule, or global
ones) runs plainly, since a replay runs no Python. A replay overwrites the graph's saved activations, so a backward whose forward was
replayed over (the same layer called twice before the backward: weight sharing, two forwards then
two backwards) first replays its own forward again from its saved inputs, and a backward whose
shared tree was loaded with another tree since its forward loads its own again. Outputs and
gradients are copied out of the graph's buffers, never handed out as views of them.
"""
from __future__ import annotations

import contextlib
import gc
import os
import threading
import types
import warnings
import weakref
from collections import OrderedDict, deque
from typing import Callable, List, Optional, Union

import torch
from torch import Tensor, nn

from .balltree import BallTree

__all__ = ["LayerGraphs", "disabled", "MAX_SLOTS", "GraphsPausedWarning"]

# "auto" graphs layers up to this many tree slots, where the host paces a step; above it the GPU
# does, and a block's graph pool would only keep that size's activations reserved (the measurements
# behind the limit: perf-notes, v-host5)
MAX_SLOTS = 1 << 17

_TREE_TENSORS = ("perm", "mask", "inv", "ptr", "slot_batch", "counts")
#: layers on the same tree share one static tree and its memo (``_SharedTree``); False: each
#: layer's graphs derive everything from their own copy of the tree (the environment variable
#: ``BSA_SHARE_TREES=0`` sets that)
SHARE_TREES = os.environ.get("BSA_SHARE_TREES", "1") != "0"
_state = threading.local()
# tests on the CPU: stand-in graphs that re-run the recorded function on replay (see _EagerGraph)
_EMULATE = False


#: after this many failed captures in a process, layers and tree builds run without graphs
MAX_CAPTURE_FAILURES = 3
_failures = 0


def _capture_failed(err: Exception) -> None:
    r"""A capture that failed (e.g. ``cudaErrorStreamCaptureInvalidated``) costs speed, not the run:
    the call runs eagerly, from the caller's own tree and inputs (a failed capture stores nothing),
    and after ``MAX_CAPTURE_FAILURES`` graphs are off for the process. An error that outlives the
    capture (a sticky CUDA error) surfaces at the synchronisation below, loudly."""
    global _failures
    _failures += 1
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()
    off = _failures >= MAX_CAPTURE_FAILURES
    warnings.warn(f"a CUDA graph capture failed ({str(err).splitlines()[0][:200]}); this call runs without "
                  "graphs" + ("; graphs are now off for this process" if off else ""), RuntimeWarning, stacklevel=3)


def graphs_failed() -> bool:
    r"""Whether captures failed ``MAX_CAPTURE_FAILURES`` times in this process (graphs are then off)."""
    return _failures >= MAX_CAPTURE_FAILURES


def _inside() -> bool:
    return getattr(_state, "depth", 0) > 0


@contextlib.contextmanager
def disabled():
    r"""Layers called inside this context run plainly (``GraphedStep`` captures whole steps: the
    layers' own graphs would be nested captures)."""
    _state.depth = getattr(_state, "depth", 0) + 1
    try:
        yield
    finally:
        _state.depth -= 1


def check_mode(mode) -> None:
    if not (mode == "auto" or mode is True or mode is False):  # 1 == True: identity, not equality
        raise ValueError(f"cuda_graphs must be 'auto', True or False, got {mode!r}")


def wanted(mode: Union[str, bool], x: Tensor, tree: BallTree) -> bool:
    r"""Whether a layer call with features ``x`` on ``tree`` should go through its graphs."""
    if mode is False or torch.compiler.is_compiling() or _inside() or graphs_failed():
        return False
    if not x.is_cuda:
        return _EMULATE
    if torch.cuda.is_current_stream_capturing():
        return False
    return mode is True or tree.num_slots <= MAX_SLOTS


def _static_tree(tree: BallTree, reads_points: bool = True) -> BallTree:
    # fresh buffers and an empty memo: what a layer derives from the tree is derived inside its
    # graph, from these buffers. A layer that declares it never reads the input-order side
    # (``graph_reads_points = False``) gets an empty ``inv``: a read of it fails loudly at capture
    bufs = {k: getattr(tree, k).clone() for k in _TREE_TENSORS}
    if not reads_points:
        bufs["inv"] = bufs["inv"].new_empty(0)
    return BallTree(*(bufs[k] for k in _TREE_TENSORS), tree.ball_size, tree.num_balls, tree.max_slots)


class _SharedMemo:
    r"""The memo of a tree shared by several layers' graphs (``BallTree._cache`` of ``_SharedTree.tree``).

    ``shared``: values derived once per tree and step, by the tree's own small graphs (segments),
    at addresses that never change; layers' graphs read them as inputs. ``scratch``: where the
    current activity keeps what it derives itself (a layer's warm-up run, which also records its
    misses; a layer's capture, whose values then live in the layer's graph; a segment's capture).
    A shared value is never overwritten: a value that does not apply (``valid``) is derived in
    ``scratch``."""

    def __init__(self):
        self.shared: dict = {}
        self.scratch: dict = {}
        self.record: Optional[list] = None
        self.hidden: frozenset = frozenset()  # a segment's own keys while it derives them

    def get_or_derive(self, key, fn, valid=None):
        for memo in (self.scratch, self.shared):
            hit = memo.get(key)
            if memo is self.shared and key in self.hidden:
                continue
            if hit is not None and (valid is None or valid(hit)):
                return hit
        value = self.scratch[key] = fn()
        if self.record is not None:
            self.record.append((key, fn))
        return value

    @contextlib.contextmanager
    def using(self, scratch: dict, record: Optional[list] = None, hidden: frozenset = frozenset()):
        saved = self.scratch, self.record, self.hidden
        self.scratch, self.record, self.hidden = scratch, record, hidden
        try:
            yield scratch
        finally:
            self.scratch, self.record, self.hidden = saved

    def clear(self) -> None:  # a BallTree memo's interface; the shared values stay (their graphs write them)
        self.scratch = {}


def _version(t: Tensor) -> Optional[int]:
    # positions written in place since they were loaded are loaded again (inference tensors keep no
    # version: there the tensor's identity alone says it is the same)
    return None if t.is_inference() else t._version


def _memo_tensors(value) -> Optional[list]:
    # a memo value a segment can own: a tensor or a tuple of tensors
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, tuple) and value and all(isinstance(v, Tensor) for v in value):
        return list(value)
    return None


class _SharedTree:
    r"""One static ball tree (its buffers, the tree-order positions, the memo of what layers derive
    from them) shared by the graphs of all layers that run on the same tree in a step.

    ``load(tree, pos)`` copies a new tree (and positions) into the buffers and replays the memo's
    segments: once per tree and step, not once per layer. A segment is captured when a layer's
    warm-up derived something the memo lacks and whose function reads nothing but the static
    buffers and the memo (``_reads_only_static``); anything else stays derived inside that layer's
    graph, as without sharing. Segments are only ever appended, so the addresses a captured layer
    reads stay valid."""

    def __init__(self, key: tuple, tree: BallTree, pos: Tensor, reads_points: bool, graph_cls):
        self.key, self.graph_cls = key, graph_cls
        self.tree = _static_tree(tree, reads_points)
        self.memo = self.tree._cache = _SharedMemo()
        self.names = _TREE_TENSORS if reads_points else tuple(k for k in _TREE_TENSORS if k != "inv")
        self.pos = pos.detach().clone()
        self.segments: list = []
        self.loaded_tree: Optional[weakref.ref] = weakref.ref(tree)
        self.loaded_pos = (weakref.ref(pos), _version(pos))
        self.refreshes = 0  # segment replays so far (tests count them)

    def holds(self, tree: BallTree, pos: Tensor) -> bool:
        ref, version = self.loaded_pos
        return (self.loaded_tree is not None and self.loaded_tree() is tree and ref() is pos
                and version == _version(pos))

    def load(self, tree: BallTree, pos: Tensor) -> None:
        r"""The buffers and the memo made those of ``tree`` and ``pos`` (nothing to do if they are)."""
        if self.holds(tree, pos):
            return
        # ``.data``: the buffers are graph inputs, outside autograd (as the stand-in's writes: the
        # autograd graph an _EagerGraph keeps for its backward may hold views of them)
        with torch.no_grad():
            if self.loaded_tree is None or self.loaded_tree() is not tree:
                for k in self.names:
                    getattr(self.tree, k).data.copy_(getattr(tree, k))
                self.loaded_tree = weakref.ref(tree)
            self.pos.data.copy_(pos)
            self.loaded_pos = (weakref.ref(pos), _version(pos))
        self.refresh()

    def refresh(self) -> None:
        for seg in self.segments:
            seg.replay()
        self.refreshes += bool(self.segments)

    def extend(self, derived: list) -> None:
        r"""Captures a segment deriving ``derived`` (``(key, fn)`` in the order a layer's warm-up
        derived them) where the memo lacks them and ``fn`` may be shared; runs it once."""
        todo = [(k, fn) for k, fn in derived if k not in self.memo.shared and _reads_only_static(fn, self)]
        if not todo:
            return
        keys: list = []
        owned: dict = {}

        def derive():
            with self.memo.using({}, hidden=frozenset(keys)) as scratch, torch.no_grad():
                for key, fn in todo:
                    self.memo.get_or_derive(key, fn)
            if not keys:  # the capture fixes which values the segment owns, in order
                keys.extend(k for k, v in scratch.items() if _memo_tensors(v) is not None)
                owned.update((k, scratch[k]) for k in keys)
            return [t for k in keys for t in _memo_tensors(scratch[k])]

        seg = self.graph_cls()
        with disabled():
            seg.capture(derive, self.graph_cls.pool())
        self.memo.shared.update(owned)
        self.segments.append(seg)
        seg.replay()  # a CUDA graph's capture computes nothing

    def static_storages(self) -> set:
        ptrs = {getattr(self.tree, k).untyped_storage().data_ptr() for k in _TREE_TENSORS}
        ptrs.add(self.pos.untyped_storage().data_ptr())
        for v in self.memo.shared.values():
            ptrs.update(t.untyped_storage().data_ptr() for t in _memo_tensors(v))
        ptrs.discard(0)  # empty tensors
        return ptrs


def _reads_only_static(fn, shared: _SharedTree, depth: int = 0) -> bool:
    r"""Whether ``fn`` (a memo's derivation) reads no tensor but the shared tree's buffers and memo:
    its closure and defaults hold only the shared tree, Python scalars, dtypes, devices, such
    tensors (or views of them), and functions of the same kind. Its segment then recomputes it
    from the step's tree; a function that holds anything else (an activation, a module) would
    replay with stale inputs, so it stays derived inside the layer's graph."""
    if not isinstance(fn, types.FunctionType) or depth > 4:
        return False
    try:
        values = [c.cell_contents for c in fn.__closure__ or ()]
    except ValueError:  # an empty cell
        return False
    values += list(fn.__defaults__ or ()) + list((fn.__kwdefaults__ or {}).values())
    storages = None

    def ok(v) -> bool:
        nonlocal storages
        if v is None or isinstance(v, (bool, int, float, str, torch.dtype, torch.device)):
            return True
        if isinstance(v, tuple):
            return all(ok(u) for u in v)
        if isinstance(v, BallTree):
            return v is shared.tree
        if isinstance(v, Tensor):
            if storages is None:
                storages = shared.static_storages()
            return v.device == shared.pos.device and v.untyped_storage().data_ptr() in storages
        if isinstance(v, types.FunctionType):
            return _reads_only_static(v, shared, depth + 1)
        return False
    return all(ok(v) for v in values)


# the shared trees alive (held by their layers' graph entries), found by the tree they hold
_SHARED: List[weakref.ref] = []


def _shared_tree(tree: BallTree, pos: Tensor, reads_points: bool, graph_cls) -> _SharedTree:
    r"""The shared tree that holds ``tree`` and ``pos`` now (the layers before this one in the step
    loaded it), else a new one."""
    key = (pos.device, pos.shape, pos.dtype, torch.is_inference_mode_enabled(), reads_points,
           tree.num_points if reads_points else None, tree.num_slots, tree.num_clouds, tree.max_slots,
           tree.ball_size, graph_cls)
    live = [s for s in (r() for r in _SHARED) if s is not None]
    _SHARED[:] = [weakref.ref(s) for s in live]
    for s in live:
        if s.key == key and s.holds(tree, pos):
            return s
    s = _SharedTree(key, tree, pos, reads_points, graph_cls)
    _SHARED.append(weakref.ref(s))
    return s


@contextlib.contextmanager
def no_gc():
    r"""Python's cyclic garbage collector paused (for a CUDA graph capture).

    A collection that runs inside a capture may free another CUDA graph held in cyclic garbage;
    destroying a graph while a stream captures invalidates the capture
    (``cudaErrorStreamCaptureInvalidated``): the likely cause of such a failure seen with ragged
    batches, whose new layouts capture graphs and evict old ones often."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


@contextlib.contextmanager
def current_stream_kept():
    r"""The current CUDA stream restored on exit: ``torch.cuda.graph`` leaves its capture stream
    current when its capture fails at the end (its exit raises before it restores the stream)."""
    stream = torch.cuda.current_stream()
    try:
        yield
    finally:
        torch.cuda.set_stream(stream)


class _CudaGraph:
    def __init__(self):
        self.graph = torch.cuda.CUDAGraph()

    def capture(self, fn: Callable, pool):
        # thread_local: a DataLoader's pin-memory thread may call CUDA while a layer captures
        with no_gc(), current_stream_kept(), torch.cuda.graph(self.graph, pool=pool,
                                                              capture_error_mode="thread_local"):
            return fn()

    def replay(self) -> None:
        self.graph.replay()

    @staticmethod
    def pool():
        return torch.cuda.graph_pool_handle()

    @staticmethod
    def warm(fn: Callable) -> None:
        # lazy allocations (cuBLAS workspaces, Triton autotuning) happen here, not in the capture
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)


class _EagerGraph:
    r"""A CUDA graph's contract without CUDA, for tests on the CPU: ``capture`` runs ``fn`` and
    keeps its tensors; ``replay`` runs it again and writes the results into those same tensors,
    as a graph replay writes into its captured buffers (unseen by autograd's version counters, as
    a replay is: a shared tree's memo rewritten for another layer's tree and then restored is
    what a saved tensor of an earlier forward reads again)."""

    def capture(self, fn: Callable, pool):
        self.fn = fn
        self.out = fn()
        return self.out

    def replay(self) -> None:
        with disabled(), torch.no_grad():
            new = self.fn()
            for o, n in zip(_as_list(self.out), _as_list(new)):
                o.data.copy_(n.detach())

    @staticmethod
    def pool():
        return None

    @staticmethod
    def warm(fn: Callable) -> None:
        fn()


def _as_list(t) -> list:
    return [t] if isinstance(t, Tensor) else list(t)


@contextlib.contextmanager
def _aliased(module: nn.Module, aliases: dict):
    r"""The module's parameters temporarily replaced by ``aliases`` (``{id(param): tensor}``): leaf
    tensors on the same storage, created for the capture. Autograd nodes of the real parameters may
    be kept alive by an earlier step (a ``loss`` still referenced, DDP) and are bound to the stream
    they ran on; a capture must not touch them."""
    swapped = []
    for mod in module.modules():
        for name, p in list(mod._parameters.items()):
            if p is not None and id(p) in aliases:
                swapped.append((mod, name, p))
                mod._parameters[name] = aliases[id(p)]
    try:
        yield
    finally:
        for mod, name, p in swapped:
            mod._parameters[name] = p


def _autocast_no_cache(device_type: str):
    # the autocast cache would hand the capture a weight cast made outside it (freed after the
    # step): the graph must cast the live weights itself
    if not torch.is_autocast_enabled(device_type):
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=torch.get_autocast_dtype(device_type), cache_enabled=False)


class _Entry:
    r"""The graphs of one layer for one input shape, with their static buffers."""

    def __init__(self, graph_cls):
        self.graph_cls = graph_cls
        self.generation = 0
        self.loaded: Optional[weakref.ref] = None
        self.live: Optional[Tensor] = None
        self.shared: Optional[_SharedTree] = None

    def load(self, pos: Tensor, tree: BallTree) -> None:
        r"""The tree (and positions) this entry's graphs read made ``tree``'s (and ``pos``)."""
        if self.shared is not None:  # once per tree and step for all layers on it
            self.shared.load(tree, pos)
            return
        self.pos.copy_(pos)
        if self.loaded is None or self.loaded() is not tree:
            for k in self.tree_tensors:
                getattr(self.tree, k).copy_(getattr(tree, k))
            self.loaded = weakref.ref(tree)

    def run_forward(self, x: Tensor, pos: Tensor, tree: BallTree) -> None:
        self.x.copy_(x)
        self.load(pos, tree)
        if self.graph_cls is _EagerGraph:
            # a CUDA graph re-derives the layer's own memo values in its kernels; the shared
            # memo's values are inputs (written by the shared tree's segments), kept as they are
            with self.tree._cache.using({}) if self.shared is not None else contextlib.nullcontext():
                if self.shared is None:
                    self.tree._cache.clear()
                self.fwd.replay()
        else:
            self.fwd.replay()
        self.generation += 1

    def grads(self) -> tuple:
        r"""The gradients of the last backward replay, copied out of the graph: one tuple aligned
        with ``(x, pos, *params)``, ``None`` where none is needed."""
        out: List[Optional[Tensor]] = [None] * self.num_inputs
        for flat, (idx, shapes, sizes) in zip(self.flats, self.layout):
            for i, shape, part in zip(idx, shapes, flat.clone().split(sizes)):
                out[i] = part.view(shape)
        return tuple(out)


class _Replay(torch.autograd.Function):
    @staticmethod
    def forward(ctx, entry: _Entry, tree: BallTree, x: Tensor, pos: Tensor, *params: Tensor) -> Tensor:
        entry.run_forward(x, pos, tree)
        ctx.entry, ctx.tree, ctx.pos, ctx.generation = entry, tree, pos, entry.generation
        ctx.save_for_backward(x, pos)
        return entry.out.clone()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: Tensor):
        entry = ctx.entry
        x, _ = ctx.saved_tensors
        if entry.generation != ctx.generation:  # replayed over since: restore this call's activations
            entry.run_forward(x, ctx.pos, ctx.tree)
        elif entry.shared is not None:  # another layer may have loaded another tree into the shared one
            entry.shared.load(ctx.tree, ctx.pos)
        entry.grad_out.copy_(grad_out)
        entry.bwd.replay()
        return (None, None) + entry.grads()


def _global_hooks() -> bool:
    from torch.nn.modules import module as _m
    return bool(_m._global_forward_hooks or _m._global_forward_pre_hooks or _m._global_backward_hooks)


def _own_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks or m._backward_hooks or m._backward_pre_hooks)


def _has_hooks(module: nn.Module) -> bool:
    # a replay runs no Python: module hooks (feature extraction, explainers) would silently not run
    return _global_hooks() or any(_own_hooks(m) for m in module.modules())


def _walk(module: nn.Module):
    r"""``(params, buffers, eager)`` of ``module`` in one pass over its submodules: the tuples
    ``module.parameters()`` and ``module.buffers()`` give (same order, shared tensors once), and
    whether the call must run as written (``_has_hooks(module)``, or a lazy parameter). A layer
    call reads all three: one walk instead of four (perf-notes, "Host time of a layer call")."""
    hooked = _global_hooks()
    params, buffers, seen = [], [], set()
    for m in module.modules():
        hooked = hooked or _own_hooks(m)
        for t in m._parameters.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                params.append(t)
        for t in m._buffers.values():
            if t is not None and id(t) not in seen:
                seen.add(id(t))
                buffers.append(t)
    return tuple(params), tuple(buffers), hooked or any(nn.parameter.is_lazy(p) for p in params)


class GraphsPausedWarning(UserWarning):
    r"""A layer's CUDA graphs stopped capturing new shapes: they were captured more often than
    replayed (ragged batches; ``_KeyedGraphs``)."""


#: a ``_KeyedGraphs`` stops capturing new keys once ``PAUSE_CAPTURES`` of its last ``PAUSE_WINDOW``
#: calls captured (``None``: never). Ragged batches bring a new layout every few steps, so a layer
#: that keeps a few graphs would capture at most steps, and a capture costs more than the eager call
#: it replaces (docs/perf-notes.md, "Eleventh session").
PAUSE_CAPTURES: Optional[int] = 8
PAUSE_WINDOW = 32
_pause_warned = False


class _KeyedGraphs:
    r"""Graphs per key: a key's first ``warmup`` sightings run eagerly, the next captures; the
    ``max_graphs`` most recently used are kept, each in its own memory pool. When captures come too
    often (``PAUSE_CAPTURES`` of the last ``PAUSE_WINDOW`` calls) new keys run eagerly from then on
    (``paused``); the kept graphs still replay. ``clear()`` resumes."""

    #: whether a pause warns (the user's remedy is buckets; a tree build keyed by exact cloud sizes
    #: has none, so it pauses silently)
    warn_on_pause = True

    def __init__(self, warmup: int = 1, max_graphs: int = 2):
        self.warmup, self.max_graphs = warmup, max_graphs
        self._entries: OrderedDict = OrderedDict()
        self._seen: "OrderedDict[tuple, int]" = OrderedDict()
        self._recent: "deque[bool]" = deque(maxlen=PAUSE_WINDOW)  # whether each recent call captured
        self.captures = 0
        self.paused = False

    def clear(self) -> None:
        r"""Drops every graph (and frees their memory pools), and resumes capturing."""
        self._entries.clear()
        self._seen.clear()
        self._recent.clear()
        self.paused = False

    def _pause_if_thrashing(self) -> None:
        global _pause_warned
        if PAUSE_CAPTURES is None or sum(self._recent) < PAUSE_CAPTURES:
            return
        self.paused = True
        if self.warn_on_pause and not _pause_warned:
            _pause_warned = True
            warnings.warn(
                f"CUDA graphs paused: {sum(self._recent)} of the last {len(self._recent)} calls of a layer captured "
                f"a new graph, which costs more than replays save. Ragged batches give a new layout every few "
                f"steps; new layouts now run without graphs. BSATransformer (bucket_slots='auto', the default) "
                f"now pads its batches to buckets of 8 balls and captures again; in your own models pad batches "
                f"to buckets (torch_geometric_bsa.nn.transformer.pad_to_bucket).",
                GraphsPausedWarning, stacklevel=4)

    def _lookup(self, key: tuple, capture: Callable):
        r"""The entry for ``key``, captured by ``capture()`` when its time has come; ``None``: run
        eagerly this time."""
        entry = self._entries.get(key)
        if entry is not None:
            self._entries.move_to_end(key)
            self._recent.append(False)
            return entry
        if self.paused:
            return None
        seen = self._seen.pop(key, 0) + 1
        self._seen[key] = seen
        while len(self._seen) > 64:
            self._seen.popitem(last=False)
        if seen <= self.warmup:
            self._recent.append(False)
            return None
        try:
            entry = capture()
        except RuntimeError as err:  # torch.AcceleratorError and Triton's launch errors are RuntimeErrors
            if "captur" not in str(err).lower():
                raise
            _capture_failed(err)
            return None
        self._entries[key] = entry
        self.captures += 1
        self._recent.append(True)
        while len(self._entries) > self.max_graphs:
            self._entries.popitem(last=False)
        self._pause_if_thrashing()
        return entry


class LayerGraphs(_KeyedGraphs):
    r"""CUDA graphs of one layer's tree-order forward (and backward), keyed by input shape.

    Call ``graphs(module, fn, x, pos, tree)`` in place of ``fn(x, pos, tree)``, where ``fn`` is the
    module's tree-order forward (``x [N_pad, C]``, ``pos [N_pad, d]`` -> ``[N_pad, C_out]``) and
    reads nothing but its arguments, the module's parameters and buffers, and the tree. A shape's
    first ``warmup`` calls run ``fn`` eagerly; the next one captures, and later ones replay.
    ``max_graphs`` shapes are kept (least recently used dropped first), each in its own memory pool.

    Attributes:
        captures (int): shapes captured so far.
    """

    # a module holding this is deep-copied and pickled as one that has captured nothing yet
    def __getstate__(self):
        return {"warmup": self.warmup, "max_graphs": self.max_graphs}

    def __setstate__(self, state):
        self.__init__(**state)

    def __call__(self, module: nn.Module, fn: Callable, x: Tensor, pos: Tensor, tree: BallTree) -> Tensor:
        params, buffers, eager = _walk(module)
        if eager:
            return fn(x, pos, tree)
        grad = torch.is_grad_enabled() and (x.requires_grad or pos.requires_grad or
                                            any(p.requires_grad for p in params))
        dev = x.device.type
        # a layer that reads only the tree-order side (BSAConv) is keyed by slots, not points:
        # batches padded to a bucket of slots (BSATransformer(bucket_slots=...)) share its graphs
        reads_points = getattr(module, "graph_reads_points", True)
        key = (grad, torch.is_inference_mode_enabled(), module.training,
               torch.is_autocast_enabled(dev) and torch.get_autocast_dtype(dev),
               x.shape, x.dtype, x.requires_grad, pos.shape, pos.dtype, pos.requires_grad,
               tree.num_points if reads_points else None, tree.num_slots, tree.num_clouds, tree.max_slots,
               tree.ball_size,
               tuple((p.data_ptr(), p.requires_grad) for p in params),
               tuple(b.data_ptr() for b in buffers),
               module.graph_state() if hasattr(module, "graph_state") else None)
        entry = self._lookup(key, lambda: self._capture(module, fn, x, pos, tree, params, grad, reads_points))
        if entry is None:
            return fn(x, pos, tree)
        if grad:
            return _Replay.apply(entry, tree, x, pos, *params)
        entry.run_forward(x, pos, tree)
        return entry.out.clone()

    def _capture(self, module: nn.Module, fn: Callable, x: Tensor, pos: Tensor, tree: BallTree, params: tuple,
                 grad: bool, reads_points: bool = True) -> _Entry:
        graph_cls = _CudaGraph if x.is_cuda else _EagerGraph
        e = _Entry(graph_cls)
        e.x = x.detach().clone().requires_grad_(grad and x.requires_grad)
        if SHARE_TREES and not (grad and pos.requires_grad):
            # one static tree for all layers on this tree: what they derive from it, derived once a step
            e.shared = _shared_tree(tree, pos, reads_points, graph_cls)
            e.shared.load(tree, pos)
            e.tree, e.pos = e.shared.tree, e.shared.pos
        else:  # positions that take a gradient: the layer derives from them inside its own graph
            e.pos = pos.detach().clone().requires_grad_(grad and pos.requires_grad)
            e.tree = _static_tree(tree, reads_points)
            e.tree_tensors = _TREE_TENSORS if reads_points else tuple(k for k in _TREE_TENSORS if k != "inv")
        aliases = {id(p): p.detach().requires_grad_(grad and p.requires_grad) for p in params}
        inputs = (e.x, e.pos) + tuple(aliases[id(p)] for p in params)
        want = [i for i, t in enumerate(inputs) if grad and t.requires_grad]
        e.num_inputs = len(inputs)
        grad_ctx = torch.enable_grad if grad else torch.no_grad

        def forward():
            with grad_ctx(), _aliased(module, aliases):
                e.live = fn(e.x, e.pos, e.tree)
            return e.live

        def backward():
            gs = torch.autograd.grad(e.live, [inputs[i] for i in want], e.grad_out, allow_unused=True)
            if not hasattr(e, "layout"):  # one flat buffer per dtype: one copy out per replay
                groups: "OrderedDict[torch.dtype, list]" = OrderedDict()
                for i, g in zip(want, gs):
                    if g is not None:
                        groups.setdefault(g.dtype, []).append(i)
                e.layout = [(idx, [inputs[i].shape for i in idx], [inputs[i].numel() for i in idx])
                            for idx in groups.values()]
            by_input = dict(zip(want, gs))
            return [torch.cat([by_input[i].reshape(-1) for i in idx]) for idx, _, _ in e.layout]

        with disabled(), _autocast_no_cache(x.device.type), _aliased(module, aliases):
            def warm():
                with grad_ctx():
                    out = fn(e.x, e.pos, e.tree)
                    if want:
                        torch.autograd.grad(out, [inputs[i] for i in want], torch.zeros_like(out), allow_unused=True)
            if e.shared is None:
                graph_cls.warm(warm)
                e.tree._cache.clear()  # derived again inside the capture, from the static buffers
                own = contextlib.nullcontext()
            else:
                derived: list = []
                with e.shared.memo.using({}, record=derived):
                    graph_cls.warm(warm)
                e.shared.extend(derived)  # what may be shared: derived by the shared tree from now on
                # the rest: derived inside this layer's graphs, kept with them
                e.own_memo = {}
                own = e.shared.memo.using(e.own_memo)
            with own:
                pool = graph_cls.pool()
                e.fwd = graph_cls()
                e.out = e.fwd.capture(forward, pool).detach()
                if grad:
                    e.grad_out = torch.empty_like(e.out)
                    e.bwd = graph_cls()
                    e.flats = e.bwd.capture(backward, pool)
                    if x.is_cuda:
                        e.live = None  # the autograd graph of the capture is spent; the buffers stay in the pool
        return e


# ---------------------------------------------------------------------------------------------
# The ball tree's build, replayed the same way
# ---------------------------------------------------------------------------------------------
#: route eager ``build_ball_tree`` calls on CUDA through ``TreeGraphs`` (set False to build plainly)
TREE_GRAPHS = True


class TreeGraphs(_KeyedGraphs):
    r"""CUDA graphs of ``build_ball_tree``, keyed by the batch's layout.

    An eager build on a GPU launches ~100 small kernels (a stable sort and a reduction per level)
    and reads the batch's cloud sizes from the device. Here the sizes are read once (the layout and
    ``cloud_sizes``), the inputs are checked as in an eager build, and the rest replays from a graph
    captured at the layout's second build; the tree's tensors are copied out of the graph. Up to
    ``max_graphs`` layouts are kept (least recently used dropped first).
    """

    warn_on_pause = False  # ragged batches, bucketed or not, bring new cloud sizes: nothing to advise

    def __init__(self, warmup: int = 1, max_graphs: int = 8):
        super().__init__(warmup, max_graphs)

    def __call__(self, pos: Tensor, batch: Optional[Tensor], ball_size: int,
                 rotation: Optional[Tensor] = None, sizes: Optional[tuple] = None) -> BallTree:
        r"""``build_ball_tree(pos, batch, ball_size, rotation)``; ``sizes``: the clouds' point counts
        when the caller has read them already (``pad_to_bucket``), so they are not read again."""
        from .balltree import _check_inputs, build_ball_tree, layout_of
        batch_l = _check_inputs(pos, batch, ball_size)  # the eager build's checks, values included
        if sizes is None:
            sizes = torch.bincount(batch_l).tolist() if batch is not None else (pos.size(0),)
        sizes = tuple(sizes)
        layout = layout_of(sizes, ball_size)
        key = (pos.device, pos.shape, pos.dtype, batch is None, ball_size, layout,
               None if rotation is None else (rotation.shape, rotation.dtype, rotation.data_ptr()))
        entry = self._lookup(key, lambda: self._capture(pos, batch_l if batch is not None else None, ball_size,
                                                         rotation, layout))
        if entry is None:
            tree = build_ball_tree(pos, batch_l, ball_size, rotation, layout=layout)
            tree.cloud_sizes = sizes  # a fresh tree: the sizes read above, not rebuilt from the device
            return tree
        with torch.no_grad():  # positions that require grad (forces as -dE/dpos) stay out of the buffers' graph
            entry["pos"].copy_(pos)
            if entry["batch"] is not None:
                entry["batch"].copy_(batch_l)
        entry["graph"].replay()
        t = entry["tree"]
        return BallTree(*(getattr(t, k).clone() for k in _TREE_TENSORS), t.ball_size, t.num_balls, t.max_slots,
                        cloud_sizes=sizes, pos_key=t.pos_key.clone())

    def _capture(self, pos, batch, ball_size, rotation, layout) -> dict:
        from .balltree import build_ball_tree
        graph_cls = _CudaGraph if pos.is_cuda else _EagerGraph
        e = dict(pos=pos.detach().clone(), batch=None if batch is None else batch.clone(), graph=graph_cls())

        def build():
            return build_ball_tree(e["pos"], e["batch"], ball_size, rotation, layout=layout)

        with disabled():
            graph_cls.warm(build)
            tree = e["graph"].capture(lambda: _tree_tensors(build()), graph_cls.pool())
        e["tree"] = BallTree(*tree[:6], ball_size, layout[1] // ball_size, layout[2], pos_key=tree[6])
        return e


def _tree_tensors(tree: BallTree) -> list:
    return [getattr(tree, k) for k in _TREE_TENSORS] + [tree.pos_key]


_TREE_BUILDS = TreeGraphs()


def tree_graphs_wanted(pos: Tensor) -> bool:
    r"""Whether an eager ``build_ball_tree`` call should go through ``TreeGraphs``."""
    if not TREE_GRAPHS or torch.compiler.is_compiling() or _inside() or graphs_failed():
        return False
    if not pos.is_cuda:
        return _EMULATE
    return not torch.cuda.is_current_stream_capturing()


def build_tree_graphed(pos: Tensor, batch: Optional[Tensor], ball_size: int,
                       rotation: Optional[Tensor] = None, sizes: Optional[tuple] = None) -> BallTree:
    return _TREE_BUILDS(pos, batch, ball_size, rotation, sizes)
