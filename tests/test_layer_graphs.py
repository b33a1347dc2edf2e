"""Per-layer CUDA graphs replayed from eager code (``layer_graphs``).

On the CPU the graphs are stood in for by ``_EagerGraph`` (capture runs the function, replay runs it
again and writes into the captured tensors, as a CUDA graph writes into its buffers): that checks the
bookkeeping (copies in and out, keys, replays over, gradient routing) in CI. The CUDA tests check
real graphs against the same model without them.
"""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import random_batch, requires_cuda
from torch_geometric_bsa import build_ball_tree, layer_graphs
from torch_geometric_bsa.nn import BSAConv, BSATransformer

SMALL = dict(hidden_channels=32, num_layers=2, heads=4, ball_size=16, cmp_block=4, slc_block=4, topk=2,
             group_size=4)
CONV = dict(heads=4, ball_size=16, cmp_block=4, slc_block=4, topk=2, group_size=4)


@pytest.fixture
def emulate(monkeypatch):
    monkeypatch.setattr(layer_graphs, "_EMULATE", True)


_SHARING_TESTS = ("shared_tree", "memo_derivations", "positions_that_take_a_gradient")


@pytest.fixture(autouse=True)
def _share_trees(request, monkeypatch):
    # the shared static tree is the default (BSA_SHARE_TREES=0 turns it off): its own tests turn it
    # on whatever the environment says; every other test runs the default
    if any(name in request.node.name for name in _SHARING_TESTS):
        monkeypatch.setattr(layer_graphs, "SHARE_TREES", True)


def _inputs(sizes, seed, device="cpu", channels=32):
    pos, batch = random_batch(sizes, seed=seed, device=device)
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(pos.size(0), channels, generator=g).to(device)
    return x, pos, batch


def _pair(**kw):
    torch.manual_seed(0)
    plain = BSAConv(32, cuda_graphs=False, **kw)
    graphed = copy.deepcopy(plain)
    graphed.cuda_graphs = "auto"
    return plain, graphed


def _grads(m):
    return [p.grad.clone() for p in m.parameters()]


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="cuda_graphs"):
        BSAConv(32, cuda_graphs="yes", **CONV)
    with pytest.raises(ValueError, match="cuda_graphs"):
        BSATransformer(3, 1, cuda_graphs=1, **SMALL)


def test_replays_follow_new_inputs_and_trees(emulate):
    plain, graphed = _pair(**CONV)
    for seed in range(4):  # call 1 eager, call 2 captures, calls 3-4 replay with new clouds
        x, pos, batch = _inputs([40, 23], seed)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        out_a, out_b = plain(xa, pos, batch), graphed(xb, pos, batch)
        torch.testing.assert_close(out_b, out_a, rtol=0, atol=0)
        w = torch.randn_like(out_a)
        plain.zero_grad(), graphed.zero_grad()
        (out_a * w).sum().backward()
        (out_b * w).sum().backward()
        torch.testing.assert_close(xb.grad, xa.grad, rtol=0, atol=0)
        for ga, gb in zip(_grads(plain), _grads(graphed)):
            torch.testing.assert_close(gb, ga, rtol=0, atol=0)
    assert graphed._graphs.captures == 1


def test_forward_replayed_over_before_backward(emulate):
    # two forwards, then the backwards in either order: the first call's activations were
    # overwritten by the second replay and must be restored
    plain, graphed = _pair(**CONV)
    x0, pos0, b0 = _inputs([40, 23], 0)
    for _ in range(2):
        graphed(x0, pos0, b0).sum().backward()  # eager, then capture
    graphed.zero_grad()
    (x1, pos1, b1), (x2, pos2, b2) = _inputs([40, 23], 1), _inputs([40, 23], 2)
    for first in (0, 1):
        outs_g = [graphed(x1, pos1, b1), graphed(x2, pos2, b2)]
        outs_p = [plain(x1, pos1, b1), plain(x2, pos2, b2)]
        ws = [torch.randn_like(o) for o in outs_p]
        for i in (first, 1 - first):
            graphed.zero_grad(), plain.zero_grad()
            (outs_g[i] * ws[i]).sum().backward()
            (outs_p[i] * ws[i]).sum().backward()
            for ga, gb in zip(_grads(plain), _grads(graphed)):
                torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_outputs_and_grads_are_not_graph_buffers(emulate):
    plain, graphed = _pair(**CONV)
    x, pos, batch = _inputs([40, 23], 0)
    for _ in range(2):
        graphed(x, pos, batch)
    keep = graphed(x, pos, batch)
    ref = keep.detach().clone()
    graphed(*_inputs([40, 23], 5))  # a replay with other inputs must not change a kept output
    torch.testing.assert_close(keep.detach(), ref, rtol=0, atol=0)
    # gradient accumulation over two micro-batches (no zero_grad between): sums, not overwrites
    for m in (plain, graphed):
        m.zero_grad(set_to_none=True)
        for seed in (6, 7):
            m(*_inputs([40, 23], seed)).square().sum().backward()
    for ga, gb in zip(_grads(plain), _grads(graphed)):
        torch.testing.assert_close(gb, ga, rtol=0, atol=0)


def test_inference_and_shape_change(emulate):
    plain, graphed = _pair(**CONV)
    with torch.no_grad():
        for sizes in ([40, 23], [40, 23], [40, 23], [70], [70], [70], [40, 23]):
            x, pos, batch = _inputs(sizes, len(sizes))
            torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    assert graphed._graphs.captures == 2  # one per shape; the first shape's graph is reused after


def test_frozen_and_replaced_parameters_recapture(emulate):
    plain, graphed = _pair(**CONV)
    x, pos, batch = _inputs([40, 23], 0)
    for _ in range(2):
        graphed(x, pos, batch).sum().backward()
    for m in (plain, graphed):
        m.qkv.weight.requires_grad_(False)
        m.zero_grad(set_to_none=True)
    for _ in range(3):
        plain(x, pos, batch).sum().backward()
        graphed(x, pos, batch).sum().backward()
    assert graphed.qkv.weight.grad is None
    torch.testing.assert_close(graphed.out.weight.grad, plain.out.weight.grad, rtol=0, atol=0)
    # a module moved (new parameter tensors) is captured anew rather than reading the old ones
    with torch.no_grad():
        graphed.out.weight.data = graphed.out.weight.data.clone() * 2
        plain.out.weight.data = plain.out.weight.data.clone() * 2
    for _ in range(3):
        torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)


def test_module_with_graphs_copies_and_pickles(emulate):
    _, graphed = _pair(**CONV)
    x, pos, batch = _inputs([40, 23], 0)
    for _ in range(2):
        graphed(x, pos, batch)
    assert graphed._graphs.captures == 1
    for clone in (copy.deepcopy(graphed), pickle.loads(pickle.dumps(graphed))):
        assert clone._graphs.captures == 0
        torch.testing.assert_close(clone(x, pos, batch), graphed(x, pos, batch), rtol=0, atol=0)


def test_transformer_training_matches_plain(emulate):
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, cuda_graphs=False, **SMALL)
    graphed = copy.deepcopy(plain)
    for m in graphed.modules():
        if hasattr(m, "cuda_graphs"):
            m.cuda_graphs = "auto"
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, graphed)]
    for seed in (0, 1, 2, 3, 1):
        pos, batch = random_batch([40, 23], seed=seed)
        x, y = torch.randn(pos.size(0), 3), torch.randn(pos.size(0), 1)
        tree = build_ball_tree(pos, batch, 16)
        losses = []
        for m, opt in zip((plain, graphed), opts):
            opt.zero_grad()
            loss = F.mse_loss(m(x, pos, batch, tree=tree), y)
            loss.backward()
            opt.step()
            losses.append(loss.detach())
        torch.testing.assert_close(losses[1], losses[0], rtol=0, atol=0)
    assert all(b._graphs.captures == 1 for b in graphed.blocks)
    # inside a block's graph the attention layer runs plainly (no nested graphs)
    assert all(b.attn._graphs.captures == 0 for b in graphed.blocks)
    for p, q in zip(plain.parameters(), graphed.parameters()):
        torch.testing.assert_close(q, p, rtol=0, atol=0)


def _train_side_by_side(plain, graphed, batches, dtype, keep_alive=False):
    r"""AdamW steps of ``plain`` and ``graphed`` (a copy) on the same CUDA batches ``(seed, sizes)``:
    each step's losses agree, and so do the parameters after the steps. Loss: relative; parameters:
    the two runs' difference relative to the plain run's own update (same kernels in and out of a
    graph; bf16 allows for cuBLAS picking another algorithm inside a capture; AdamW turns a
    rounding-level gradient difference of a near-zero gradient into a full-size step, so a bound
    relative to the parameter's norm is not honest for small parameters: on the H200 the full
    peer's bf16 run moved one by 1.4e-3 of its norm). ``keep_alive``: each step's autograd graph
    stays alive into the next, as a user's ``loss`` variable does."""
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-3) for m in (plain, graphed)]
    tol, ptol = (1e-5, 1e-4) if dtype == torch.float32 else (5e-3, 5e-2)
    start = [p.detach().clone() for p in plain.parameters()]
    alive = {}
    for seed, sizes in batches:
        pos, batch = random_batch(sizes, seed=seed, device="cuda")
        x, y = torch.randn(pos.size(0), 3, device="cuda"), torch.randn(pos.size(0), 1, device="cuda")
        losses = []
        for m, opt in zip((plain, graphed), opts):
            opt.zero_grad()
            with torch.autocast("cuda", dtype=torch.bfloat16, enabled=dtype != torch.float32):
                loss = F.mse_loss(m(x, pos, batch), y)
            loss.backward()
            opt.step()
            losses.append(loss.item())
            if keep_alive:
                alive[m] = loss
        assert abs(losses[1] - losses[0]) <= tol * abs(losses[0]), (seed, losses)
    for p0, p, q in zip(start, plain.parameters(), graphed.parameters()):
        assert (q - p).norm() <= ptol * (p - p0).norm() + 1e-6


@requires_cuda
@pytest.mark.parametrize("attention,dtype", [("bsa", torch.float32), ("bsa", torch.bfloat16),
                                             ("full", torch.bfloat16)])
def test_cuda_layer_graphs_match_plain(attention, dtype):
    # real CUDA graphs: same kernels, so the same numbers as the plain model (fp32: to rounding of
    # cuBLAS, which may pick other algorithms inside a capture; bf16 autocast likewise)
    torch.manual_seed(0)
    cfg = {**SMALL, "hidden_channels": 64, "ball_size": 64, "cmp_block": 8, "slc_block": 8, "group_size": 8}
    if attention == "full":
        cfg = dict(hidden_channels=64, num_layers=2, heads=4, ball_size=64)
    plain = BSATransformer(3, 1, attention=attention, cuda_graphs=False, **cfg).cuda()
    graphed = copy.deepcopy(plain)
    for m in graphed.modules():
        if hasattr(m, "cuda_graphs"):
            m.cuda_graphs = True
    _train_side_by_side(plain, graphed, [(0, [500, 300]), (1, [500, 300]), (2, [500, 300]),
                                         (3, [400, 400, 100]), (4, [500, 300]), (5, [400, 400, 100]),
                                         (6, [400, 400, 100])], dtype, keep_alive=True)
    assert all(b._graphs.captures == 2 for b in graphed.blocks)


def test_tree_builds_replay_per_layout(emulate):
    graphs = layer_graphs.TreeGraphs()
    rot = torch.linalg.qr(torch.randn(3, 3, dtype=torch.float64))[0].float()
    for seed, sizes in enumerate([[300, 120, 7], [300, 120, 7], [300, 120, 7], [400, 27], [290, 130, 7]]):
        pos, batch = random_batch(sizes, seed=seed)
        for rotation in (None, rot):
            with layer_graphs.disabled():
                want = build_ball_tree(pos, batch, 16, rotation=rotation)
            got = graphs(pos, batch, 16, rotation)
            for k in ("perm", "mask", "inv", "ptr", "slot_batch", "counts", "pos_key"):
                assert torch.equal(getattr(got, k), getattr(want, k)), (seed, k)
            assert (got.num_balls, got.max_slots, got.cloud_sizes) == (want.num_balls, want.max_slots,
                                                                      tuple(sizes))
    # [300, 120, 7] and [290, 130, 7] share a layout: one graph each for the plain and the rotated
    # build; [400, 27] was seen once
    assert graphs.captures == 2
    # the eager checks still run on a replay
    pos, batch = random_batch([300, 120, 7], seed=9)
    pos[5, 1] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        graphs(pos, batch, 16)
    # and build_ball_tree goes through the module's graphs when they are wanted
    before = layer_graphs._TREE_BUILDS.captures
    for _ in range(3):
        build_ball_tree(*random_batch([50, 60], seed=1), 16)
    assert layer_graphs._TREE_BUILDS.captures == before + 1


def _same_as_unpadded(plain, bucketed, batches, device):
    # fp32: the padded batch changes only the length of sums over points (zero rows added), so
    # outputs agree to rounding and each gradient to rounding of its norm (elementwise checks would
    # trip on entries that are zero up to rounding, e.g. the key MLP's last bias: softmax ignores a
    # shift shared by all keys)
    for seed, sizes in enumerate(batches):
        pos, batch = random_batch(sizes, seed=seed, device=device)
        x = torch.randn(pos.size(0), 3, generator=torch.Generator().manual_seed(seed)).to(device)
        outs = []
        for m in (plain, bucketed):
            m.zero_grad()
            out = m(x, pos, batch)
            out.square().sum().backward()
            outs.append(out.detach())
        assert outs[1].shape == outs[0].shape
        torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(plain.named_parameters(), bucketed.parameters()):
            assert (q.grad - p.grad).norm() <= 1e-5 * p.grad.norm() + 1e-6, name


@pytest.mark.parametrize("attention,extra", [("bsa", {}), ("bsa", {"selection": "per_head"}), ("full", {}),
                                             ("bsa", {"backend": "torch"})])
def test_bucketed_ragged_batches_share_graphs(emulate, attention, extra):
    # ragged batches padded to one bucket of slots replay the same block graphs, and the real
    # points' outputs and the gradients are those of the unpadded model
    torch.manual_seed(0)
    kw = dict(SMALL, **extra) if attention == "bsa" else dict(hidden_channels=32, num_layers=2, heads=4,
                                                              ball_size=16)
    plain = BSATransformer(3, 2, attention=attention, cuda_graphs=False, **kw)
    bucketed = BSATransformer(3, 2, attention=attention, bucket_slots=64, **kw)
    bucketed.load_state_dict(plain.state_dict())
    _same_as_unpadded(plain, bucketed, [[40, 23], [50, 20], [40, 23], [37, 41], [50, 20]], "cpu")
    if extra.get("backend") == "torch":  # the reference runs as written (e.g. for double backward)
        assert all(b._graphs.captures == 0 for b in bucketed.blocks)
    elif attention == "bsa":  # keyed by slots: one capture for the whole bucket
        assert all(b._graphs.captures == 1 for b in bucketed.blocks)
    else:  # full attention reads the point count: one capture per point count seen twice
        assert all(b._graphs.captures == 2 for b in bucketed.blocks)


def test_bucket_slots_checked_and_pooling():
    with pytest.raises(ValueError, match="bucket_slots"):
        BSATransformer(3, 1, bucket_slots=100, **SMALL)
    from torch_geometric_bsa.nn.transformer import pad_to_bucket
    pos, batch = random_batch([40, 23], seed=0)
    x = torch.randn(63, 3)
    xp, pp, bp, nc, ms, sizes = pad_to_bucket(x, pos, batch, 16, 64)
    assert nc == 2 and ms == 64 and bp[-1] == 2 and xp.size(0) == 63 + 48 and bool((xp[63:] == 0).all())
    assert sizes == (40, 23, 48)
    tree = build_ball_tree(pp, bp, 16)
    assert tree.num_slots == 128 and tree.num_slots % 64 == 0


def test_bucketed_pooling_drops_the_dummy_cloud(emulate):
    torch.manual_seed(1)
    plain = BSATransformer(3, 2, pool="mean", cuda_graphs=False, **SMALL)
    bucketed = BSATransformer(3, 2, pool="mean", bucket_slots=64, **SMALL)
    bucketed.load_state_dict(plain.state_dict())
    pos, batch = random_batch([40, 23], seed=2)
    x = torch.randn(63, 3)
    torch.testing.assert_close(bucketed(x, pos, batch), plain(x, pos, batch), rtol=1e-4, atol=1e-5)


@requires_cuda
def test_cuda_bucketed_ragged_batches():
    torch.manual_seed(0)
    cfg = {**SMALL, "hidden_channels": 64, "ball_size": 64, "cmp_block": 8, "slc_block": 8, "group_size": 8}
    plain = BSATransformer(3, 1, cuda_graphs=False, **cfg).cuda()
    bucketed = BSATransformer(3, 1, bucket_slots=512, **cfg).cuda()
    bucketed.load_state_dict(plain.state_dict())
    _same_as_unpadded(plain, bucketed, [[500, 300], [520, 260], [500, 300], [480, 333], [530, 250]], "cuda")
    # two buckets: largest cloud <= 512 slots (seeds 0, 2, 3) and <= 1024 (seeds 1, 4; 520 and
    # 530 points take 576 slots); 1,024 slots in all for every batch
    assert all(b._graphs.captures == 2 for b in bucketed.blocks)


def test_ddp_sees_the_replayed_gradients(emulate, tmp_path):
    # DDP's hooks fire on the parameters' gradient nodes; replays hand gradients to autograd as an
    # ordinary Function does (one process with gloo here; the 2-GPU NCCL check is examples/run_ddp_check.sh)
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = BSATransformer(3, 1, cuda_graphs=False, **SMALL)
        graphed = BSATransformer(3, 1, **SMALL)
        graphed.load_state_dict(plain.state_dict())
        ddp = DDP(graphed)
        for seed in range(4):
            pos, batch = random_batch([40, 23], seed=seed)
            x = torch.randn(pos.size(0), 3)
            for m in (plain, ddp):
                m.zero_grad()
                m(x, pos, batch).square().mean().backward()
            for p, q in zip(plain.parameters(), graphed.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
        assert all(b._graphs.captures == 1 for b in graphed.blocks)
    finally:
        dist.destroy_process_group()


def test_modules_with_hooks_run_plainly(emulate):
    # a replay runs no Python: a hook on any submodule must still see every call
    _, graphed = _pair(**CONV)
    seen = []
    handle = graphed.qkv.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    x, pos, batch = _inputs([40, 23], 0)
    for _ in range(3):
        graphed(x, pos, batch)
    assert len(seen) == 3 and graphed._graphs.captures == 0
    handle.remove()
    for _ in range(3):
        graphed(x, pos, batch)
    assert graphed._graphs.captures == 1


def test_changed_python_state_recaptures(emulate):
    # the graphs' key holds the layer's Python state: a new config is captured anew, not replayed
    from torch_geometric_bsa import BSAConfig
    plain, graphed = _pair(**CONV)
    x, pos, batch = _inputs([40, 23], 0)
    for _ in range(3):
        graphed(x, pos, batch)
    new = BSAConfig(ball_size=16, cmp_block=4, slc_block=4, topk=1, group_size=4)
    plain.cfg = graphed.cfg = new
    for _ in range(3):
        torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    assert graphed._graphs.captures == 2


def test_tree_builds_with_positions_that_require_grad(emulate):
    graphs = layer_graphs.TreeGraphs()
    pos, batch = random_batch([50, 30], seed=0)
    for _ in range(3):
        p = pos.clone().requires_grad_()
        tree = graphs(p, batch, 16)
        assert not tree.pos_key.requires_grad and tree.perm.dtype == torch.long
    assert graphs.captures == 1 and not graphs._entries[next(iter(graphs._entries))]["pos"].requires_grad


# ---------------------------------------------------------------------------------------------
# One static tree per tree and step, shared by the layers' graphs (issue 13)
# ---------------------------------------------------------------------------------------------
def _graphed_copy(plain, mode="auto"):
    graphed = copy.deepcopy(plain)
    for m in graphed.modules():
        if hasattr(m, "cuda_graphs"):
            m.cuda_graphs = mode
    return graphed


def _entries(model):
    return [e for b in model.blocks for e in b._graphs._entries.values()]


@pytest.mark.parametrize("rotate", [False, True])
def test_shared_tree_derives_the_memo_once_per_step(emulate, monkeypatch, rotate):
    # 4 blocks: the memo (here: the relative positions, from the ball centres) is derived once per
    # tree and step by the shared tree, not inside each block's graph; the stand-in replays each
    # graph's Python, so a derivation inside a block's graph would be counted
    from torch_geometric_bsa.balltree import BallTree
    calls = []
    centers = BallTree.ball_centers
    monkeypatch.setattr(BallTree, "ball_centers", lambda self, p: calls.append(1) or centers(self, p))
    torch.manual_seed(0)
    model = BSATransformer(3, 1, rotate=rotate, **{**SMALL, "num_layers": 4})
    trees = 2 if rotate else 1
    per_step = []
    for seed in range(5):  # eager, capture, then replays with new batches of one layout
        pos, batch = random_batch([40, 23], seed=seed)
        calls.clear()
        model(torch.randn(pos.size(0), 3), pos, batch).sum().backward()
        per_step.append(len(calls))
    assert per_step[0] == trees and per_step[2:] == [trees] * 3, per_step
    entries = _entries(model)
    shared = {id(e.shared) for e in entries}
    assert len(entries) == 4 and len(shared) == trees
    memo = entries[0].shared.memo.shared
    assert ("relative_positions", torch.float32) in memo and ("float_mask", torch.float32) in memo
    assert all(e.own_memo == {} for e in entries)  # nothing left to derive per layer
    assert all(e.shared.refreshes == 3 for e in entries)  # steps 3-5
    # without sharing, each block's graph derives it again
    monkeypatch.setattr(layer_graphs, "SHARE_TREES", False)
    torch.manual_seed(0)
    model = BSATransformer(3, 1, rotate=rotate, **{**SMALL, "num_layers": 4})
    for seed in range(3):
        pos, batch = random_batch([40, 23], seed=seed)
        calls.clear()
        model(torch.randn(pos.size(0), 3), pos, batch).sum().backward()
    assert len(calls) == 4 and all(e.shared is None for e in _entries(model))


@pytest.mark.skipif(__import__("os").environ.get("TRITON_INTERPRET") != "1",
                    reason="the Triton path's memo, under the CPU interpreter")
def test_shared_tree_holds_the_kernels_plan(emulate):
    # on the kernels' path the cloud ranges, block masks and weights are shared too
    torch.manual_seed(0)
    model = BSATransformer(3, 1, backend="triton", **SMALL)
    plain = _graphed_copy(model, False)
    for seed in range(3):
        pos, batch = random_batch([40, 23], seed=seed)
        x = torch.randn(pos.size(0), 3)
        torch.testing.assert_close(model(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    entries = _entries(model)
    kinds = {k[0] for k in entries[0].shared.memo.shared}
    assert {"cloud_ranges", "compressed_ranges", "group_ranges", "block_weight_kv", "relative_positions"} <= kinds
    assert all(e.own_memo == {} for e in entries) and len({id(e.shared) for e in entries}) == 1


def _train_pair(plain, graphed, batches, check_pos_grad=False):
    opts = [torch.optim.AdamW(m.parameters(), lr=1e-2) for m in (plain, graphed)]
    for seed, sizes in batches:
        pos, batch = random_batch(sizes, seed=seed)
        g = torch.Generator().manual_seed(seed)
        x, y = torch.randn(pos.size(0), 3, generator=g), torch.randn(pos.size(0), 1, generator=g)
        pos_grads = []
        for m, opt in zip((plain, graphed), opts):
            opt.zero_grad()
            p = pos.clone().requires_grad_(check_pos_grad)
            loss = F.mse_loss(m(x, p, batch), y)
            loss.backward()
            opt.step()
            pos_grads.append(p.grad)
        if check_pos_grad:  # summed over the layers in another order (outside the graphs): to rounding
            torch.testing.assert_close(pos_grads[1], pos_grads[0], rtol=1e-5, atol=1e-7)
        for p, q in zip(plain.parameters(), graphed.parameters()):
            torch.testing.assert_close(q, p, rtol=0, atol=0)


BATCHES = [(0, [40, 23]), (1, [40, 23]), (2, [40, 23]), (3, [50, 30]), (4, [50, 30]), (5, [50, 30]),
           (6, [40, 23]), (7, [45, 18])]  # [45, 18] has [40, 23]'s layout: new clouds, same graphs


@pytest.mark.parametrize("attention,rotate", [("bsa", False), ("bsa", True), ("full", False), ("full", True)])
def test_shared_tree_training_matches_plain(emulate, attention, rotate):
    torch.manual_seed(0)
    kw = {**SMALL, "num_layers": 3} if attention == "bsa" else dict(hidden_channels=32, num_layers=3, heads=4,
                                                                       ball_size=16)
    plain = BSATransformer(3, 1, attention=attention, rotate=rotate, cuda_graphs=False, **kw)
    graphed = _graphed_copy(plain)
    _train_pair(plain, graphed, BATCHES)
    assert all(b._graphs.captures == 2 for b in graphed.blocks)  # two layouts
    assert all(e.shared is not None for e in _entries(graphed))


def test_positions_that_take_a_gradient_keep_a_tree_per_layer(emulate):
    # the relative positions must stay in each layer's autograd graph: no shared tree
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, cuda_graphs=False, **SMALL)
    graphed = _graphed_copy(plain)
    _train_pair(plain, graphed, BATCHES[:4], check_pos_grad=True)
    entries = _entries(graphed)
    assert entries and all(e.shared is None for e in entries)


def test_shared_tree_reloaded_for_a_backward(emulate):
    # two layers whose graphs share one static tree (captured on the same tree and positions), then
    # each runs on its own batch, forwards first: each backward must see its own tree in the shared
    # buffers and memo (its generation is unchanged: no forward replay restores it)
    pairs = [_pair(**CONV) for _ in range(2)]
    pos, batch = random_batch([40, 23], seed=0)
    tree = build_ball_tree(pos, batch, 16)
    pos_t = tree.to_tree(pos)
    for _ in range(2):
        for _, graphed in pairs:
            x_t = tree.to_tree(torch.randn(pos.size(0), 32)).requires_grad_()
            graphed.forward_tree(x_t, pos_t, tree).sum().backward()
    shared = {id(e.shared) for _, g in pairs for e in g._graphs._entries.values()}
    assert len(shared) == 1 and all(g._graphs.captures == 1 for _, g in pairs)
    for _, graphed in pairs:
        graphed.zero_grad()
    for step in range(3):
        inputs = []
        for i in range(2):
            p, b = random_batch([40, 23], seed=10 + 2 * step + i)
            t = build_ball_tree(p, b, 16)
            inputs.append((t.to_tree(torch.randn(p.size(0), 32)).requires_grad_(), t.to_tree(p), t))
        outs = [[m.forward_tree(*inp) for m, inp in zip(ms, inputs)] for ms in zip(*pairs)]
        ws = [torch.randn_like(o) for o in outs[0]]
        for i in range(2):
            for o in outs:
                (o[i] * ws[i]).sum().backward()
        for i, (plain, graphed) in enumerate(pairs):
            for p, q in zip(plain.parameters(), graphed.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)
            plain.zero_grad(), graphed.zero_grad()
        assert all(g._graphs.captures == 1 for _, g in pairs)
    assert next(iter(pairs[0][1]._graphs._entries.values())).shared.refreshes >= 6  # reloads for the backwards


def test_shared_tree_forward_replayed_over_before_backward(emulate):
    # the same model twice before the backwards (either order): the activations and the shared
    # tree's memo are those of the call being differentiated
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, rotate=True, cuda_graphs=False, **{**SMALL, "num_layers": 3})
    graphed = _graphed_copy(plain)
    for seed in range(2):
        pos, batch = random_batch([40, 23], seed=seed)
        graphed(torch.randn(pos.size(0), 3), pos, batch).sum().backward()
    calls = [random_batch([40, 23], seed=s) for s in (5, 6)]
    xs = [torch.randn(p.size(0), 3) for p, _ in calls]
    for first in (0, 1):
        outs = {m: [m(x, p, b) for x, (p, b) in zip(xs, calls)] for m in (plain, graphed)}
        ws = [torch.randn_like(o) for o in outs[plain]]
        for i in (first, 1 - first):
            for m in (plain, graphed):
                m.zero_grad()
                (outs[m][i] * ws[i]).sum().backward()
            for p, q in zip(plain.parameters(), graphed.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0)


def test_memo_derivations_that_read_activations_stay_per_layer(emulate):
    # a derivation whose function holds a tensor other than the shared tree's (here: an activation)
    # would replay with stale inputs: it is derived inside the layer's graph instead
    from torch_geometric_bsa.layer_graphs import _reads_only_static, _shared_tree, _EagerGraph
    pos, batch = random_batch([40, 23], seed=0)
    tree = build_ball_tree(pos, batch, 16)
    pos_t = tree.to_tree(pos)
    shared = _shared_tree(tree, pos_t, True, _EagerGraph)
    t, act, dt = shared.tree, torch.randn(tree.num_slots), torch.float16
    assert _reads_only_static(lambda: t.mask.view(-1, 4).to(dt), shared)
    sp = shared.pos[:, :1]  # a view of a static buffer
    assert _reads_only_static(lambda: sp * 2, shared)
    assert not _reads_only_static(lambda: shared.pos * 2, shared)  # an object it cannot vouch for
    assert not _reads_only_static(lambda: act * t.mask, shared)
    assert not _reads_only_static(lambda: tree.mask.any(), shared)  # the caller's tree, not the static one
    assert not _reads_only_static(torch.Tensor.sum, shared)


@requires_cuda
@pytest.mark.parametrize("attention,dtype,rotate", [("bsa", torch.float32, False), ("bsa", torch.bfloat16, True),
                                                    ("full", torch.bfloat16, True)])
def test_cuda_shared_tree_matches_plain(attention, dtype, rotate):
    # real CUDA graphs with one static tree per tree and step: same numbers as the plain model (to
    # cuBLAS rounding, as test_cuda_layer_graphs_match_plain), over batches of one layout and a
    # layout change, and the memo derived once per step
    torch.manual_seed(0)
    cfg = {**SMALL, "num_layers": 3, "hidden_channels": 64, "ball_size": 64, "cmp_block": 8, "slc_block": 8,
           "group_size": 8}
    if attention == "full":
        cfg = dict(hidden_channels=64, num_layers=3, heads=4, ball_size=64)
    plain = BSATransformer(3, 1, attention=attention, rotate=rotate, cuda_graphs=False, **cfg).cuda()
    graphed = _graphed_copy(plain, True)
    _train_side_by_side(plain, graphed, [(0, [500, 300]), (1, [500, 300]), (2, [500, 300]),
                                         (3, [400, 400, 100]), (4, [480, 320]), (5, [400, 400, 100]),
                                         (6, [400, 400, 100]), (7, [500, 300])], dtype)
    entries = _entries(graphed)
    assert all(b._graphs.captures == 2 for b in graphed.blocks)
    assert all(e.shared is not None and e.own_memo == {} for e in entries)
    assert len({id(e.shared) for e in entries}) == 2 * (2 if rotate else 1)  # per layout (and rotated tree)


def test_shared_tree_in_inference_mode(emulate):
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, rotate=True, cuda_graphs=False, **{**SMALL, "num_layers": 3})
    graphed = _graphed_copy(plain)
    for seed, sizes in BATCHES[:6]:
        pos, batch = random_batch(sizes, seed=seed)
        x = torch.randn(pos.size(0), 3)
        with torch.inference_mode():
            torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    assert all(b._graphs.captures == 2 and all(e.shared is not None for e in b._graphs._entries.values())
               for b in graphed.blocks)


def test_walk_matches_parameters_buffers_and_hooks():
    # the layer call's one walk over the submodules gives what parameters(), buffers() and
    # _has_hooks give: same order, shared tensors once, None entries skipped; hooks anywhere (and
    # global ones) and lazy parameters make the call run as written
    from torch_geometric_bsa.nn.conv import BSAConv
    block = nn.Sequential(BSAConv(8, 8, heads=2, ball_size=16), nn.Linear(8, 8), nn.BatchNorm1d(8))
    block.append(block[1])  # a shared module: its parameters once
    block[1].register_parameter("unused", None)
    params, buffers, eager = layer_graphs._walk(block)
    assert [id(p) for p in params] == [id(p) for p in block.parameters()]
    assert [id(b) for b in buffers] == [id(b) for b in block.buffers()] and len(buffers) >= 3
    assert not eager and not layer_graphs._has_hooks(block)
    h = block[0].gate.register_forward_hook(lambda *_: None)
    assert layer_graphs._walk(block)[2] and layer_graphs._has_hooks(block)
    h.remove()
    g = nn.modules.module.register_module_forward_pre_hook(lambda *_: None)
    try:
        assert layer_graphs._walk(block)[2]
    finally:
        g.remove()
    assert not layer_graphs._walk(block)[2]
    assert layer_graphs._walk(nn.Sequential(nn.LazyLinear(4)))[2]


def test_captures_run_with_the_garbage_collector_paused(monkeypatch):
    # a collection inside a capture can free another graph, which invalidates the capture on a GPU
    # (the likely cause of cudaErrorStreamCaptureInvalidated with ragged plates); captures pause it
    import gc
    seen = []

    class FakeGraph:
        def __init__(self, *a, **k):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(torch.cuda, "CUDAGraph", FakeGraph)
    monkeypatch.setattr(torch.cuda, "graph", FakeGraph)
    streams = []  # the current stream is read before and set back after each capture
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: "the caller's stream")
    monkeypatch.setattr(torch.cuda, "set_stream", streams.append)
    assert gc.isenabled()
    layer_graphs._CudaGraph().capture(lambda: seen.append(gc.isenabled()), pool=None)
    assert seen == [False] and gc.isenabled()
    with pytest.raises(RuntimeError):  # re-enabled after a failed capture too
        layer_graphs._CudaGraph().capture(lambda: (_ for _ in ()).throw(RuntimeError("capture failed")), pool=None)
    assert gc.isenabled()
    assert streams == ["the caller's stream"] * 2  # after the failed capture too
    gc.disable()  # and left off when it was off
    try:
        layer_graphs._CudaGraph().capture(lambda: None, pool=None)
        assert not gc.isenabled()
    finally:
        gc.enable()


@requires_cuda
def test_cuda_ragged_layouts_evict_graphs_safely():
    # ragged batches (the plates' 1,000-1,060 points a cloud) give a new layout often; graphs are
    # captured and evicted (two kept per layer) in training and in evaluation, with the garbage
    # collector set to run at nearly every allocation (a collection inside a capture that frees a
    # graph invalidates it: cudaErrorStreamCaptureInvalidated); a failed capture's warning is an error
    import gc
    torch.manual_seed(0)
    cfg = {**SMALL, "hidden_channels": 32, "ball_size": 64, "cmp_block": 8, "slc_block": 8, "group_size": 8}
    model = BSATransformer(3, 1, **cfg).cuda()
    plain = BSATransformer(3, 1, cuda_graphs=False, **cfg).cuda()
    plain.load_state_dict(model.state_dict())
    old = gc.get_threshold()
    gc.set_threshold(1, 1, 1)
    try:
        for i in range(20):  # each layout twice (a layout is captured when seen the second time)
            j, train = i // 2, (i // 2) % 2 == 0
            sizes = [130 + 70 * j, 190 - 5 * j, 150 + (j % 3) * 40]
            pos, batch = random_batch(sizes, seed=i, device="cuda")
            x = torch.randn(pos.size(0), 3, device="cuda")
            model.train(train), plain.train(train)
            with torch.set_grad_enabled(train):
                out = model(x, pos, batch)
                ref = plain(x, pos, batch)
                if train:
                    out.square().mean().backward()
            torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-4)
    finally:
        gc.set_threshold(*old)
    torch.cuda.synchronize()
    assert sum(b._graphs.captures for b in model.blocks) >= 10  # captures (and evictions) happened


def test_a_failed_capture_runs_eagerly_and_three_turn_graphs_off(emulate, monkeypatch):
    # a capture that fails (on a GPU: cudaErrorStreamCaptureInvalidated) must cost speed, not the
    # training run: the call runs plainly with the same result, a warning says so, and after
    # MAX_CAPTURE_FAILURES the process runs without graphs; other errors still propagate
    monkeypatch.setattr(layer_graphs, "_failures", 0)
    calls = {"n": 0}
    capture = layer_graphs._EagerGraph.capture

    def failing(self, fn, pool):
        calls["n"] += 1
        raise RuntimeError("CUDA error: operation failed due to a previous error during capture")
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, cuda_graphs=False, **SMALL)
    graphed = copy.deepcopy(plain)
    graphed.cuda_graphs = "auto"
    for b in graphed.blocks:
        b.cuda_graphs = "auto"
    monkeypatch.setattr(layer_graphs._EagerGraph, "capture", failing)
    x, pos, batch = _inputs([40, 30], seed=3, channels=3)
    ref = plain(x, pos, batch)
    with pytest.warns(RuntimeWarning, match="capture failed"):
        for _ in range(4):  # first call warms up; the next ones try to capture, fail and run plainly
            torch.testing.assert_close(graphed(x, pos, batch), ref)
    assert layer_graphs.graphs_failed() and calls["n"] == layer_graphs.MAX_CAPTURE_FAILURES
    n = calls["n"]
    torch.testing.assert_close(graphed(x, pos, batch), ref)  # graphs off: no more capture attempts
    assert calls["n"] == n
    # an error that is not a capture's propagates
    monkeypatch.setattr(layer_graphs, "_failures", 0)
    monkeypatch.setattr(layer_graphs._EagerGraph, "capture",
                        lambda self, fn, pool: (_ for _ in ()).throw(RuntimeError("index out of range")))
    other = copy.deepcopy(plain)
    other.cuda_graphs = "auto"
    for b in other.blocks:
        b.cuda_graphs = "auto"
    with pytest.raises(RuntimeError, match="index out of range"):
        for _ in range(2):  # (the tree build's graph for this layout is due already)
            other(x, pos, batch)
    monkeypatch.setattr(layer_graphs._EagerGraph, "capture", capture)


# five layouts (slots per cloud, ball 16) taken in turn: with two graphs kept, every call after the
# first round captures (least recently used eviction), as ragged plates did on the H200
_ROUND_ROBIN = ([40, 23], [70], [20, 20, 20], [100, 5], [33])


def test_ragged_layouts_pause_captures(emulate, monkeypatch):
    monkeypatch.setattr(layer_graphs, "_pause_warned", False)
    plain, graphed = _pair(**CONV)
    with torch.no_grad(), pytest.warns(layer_graphs.GraphsPausedWarning, match="pad_to_bucket"):
        for i in range(40):
            x, pos, batch = _inputs(_ROUND_ROBIN[i % 5], i)
            torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    g = graphed._graphs
    assert g.paused and g.captures == layer_graphs.PAUSE_CAPTURES  # not one capture more once paused
    # the kept graphs still replay; clear() resumes capturing
    replays = [k for k in g._entries]
    assert len(replays) == 2
    g.clear()
    assert not g.paused and not g._entries
    # the same sequence without the guard: captures never stop
    monkeypatch.setattr(layer_graphs, "PAUSE_CAPTURES", None)
    _, unguarded = _pair(**CONV)
    with torch.no_grad():
        for i in range(40):
            unguarded(*_inputs(_ROUND_ROBIN[i % 5], i))
    assert not unguarded._graphs.paused and unguarded._graphs.captures >= 30


def test_few_layouts_do_not_pause(emulate, monkeypatch):
    # two layouts in turn in training, then an evaluation on one of them: three captures (one a
    # key), then replays only
    monkeypatch.setattr(layer_graphs, "_pause_warned", False)
    plain, graphed = _pair(**CONV)
    for i in range(40):
        x, pos, batch = _inputs(_ROUND_ROBIN[i % 2 if i < 30 else 0], i)
        with torch.set_grad_enabled(i < 30):
            torch.testing.assert_close(graphed(x, pos, batch), plain(x, pos, batch), rtol=0, atol=0)
    assert not graphed._graphs.paused and graphed._graphs.captures == 3


def test_bucketed_round_robin_does_not_pause(emulate, monkeypatch):
    # the remedy the warning names: buckets of slots turn the five layouts into one or two keys
    monkeypatch.setattr(layer_graphs, "_pause_warned", False)
    torch.manual_seed(0)
    model = BSATransformer(3, 1, bucket_slots=128, **SMALL)
    ragged = ([40, 23], [70, 10], [20, 35], [60, 5], [33, 33])  # batches of two clouds, five layouts
    for i in range(20):
        x, pos, batch = _inputs(ragged[i % 5], i, channels=3)
        model(x, pos, batch).square().mean().backward()
    assert all(not b._graphs.paused and b._graphs.captures == 1 for b in model.blocks)


def _auto_pair(monkeypatch):
    # a BSATransformer without graphs and one with the defaults (graphs, bucket_slots="auto"), same weights
    monkeypatch.setattr(layer_graphs, "_pause_warned", False)
    torch.manual_seed(0)
    plain = BSATransformer(3, 1, cuda_graphs=False, **SMALL)
    model = BSATransformer(3, 1, **SMALL)
    model.load_state_dict(plain.state_dict())
    return plain, model


def _step_both(plain, model, sizes, seed):
    # one training call of each model on the same batch: outputs and gradients must agree
    x, pos, batch = _inputs(sizes, seed, channels=3)
    for m in (plain, model):
        m.zero_grad()
        out = m(x, pos, batch)
        out.square().mean().backward()
        if m is plain:
            ref, ref_grads = out.detach(), _grads(plain)
    torch.testing.assert_close(out.detach(), ref, rtol=1e-5, atol=1e-6)
    for ga, gb in zip(ref_grads, _grads(model)):
        torch.testing.assert_close(gb, ga, rtol=1e-4, atol=1e-6)


def test_auto_buckets_once_layouts_outnumber_the_graphs(emulate, monkeypatch):
    # BSATransformer's default (bucket_slots="auto"): the fifth distinct layout in a row of calls
    # (a block keeps four graphs) switches the model to buckets of 8 balls before any capture, so
    # nothing pauses and nothing warns; outputs and gradients stay those of the model without graphs
    import warnings
    from torch_geometric_bsa.nn import transformer as T
    plain, model = _auto_pair(monkeypatch)
    assert model.bucket_slots == "auto" and model._bucket() is None
    ragged = [[20 * j] for j in range(1, 9)]  # eight layouts (ball 16), the blocks keep four
    with warnings.catch_warnings():
        warnings.simplefilter("error", layer_graphs.GraphsPausedWarning)
        for i in range(60):
            _step_both(plain, model, ragged[i % len(ragged)], i)
            if i == 3:
                assert model._auto_bucket is None  # four layouts: the graphs could hold them
            if i == 4:
                assert model._auto_bucket == T.AUTO_BUCKET_BALLS * model.ball_size
    blocks = [b._graphs for b in model.blocks]
    # bucketed: up to three layouts, captured once each, then replays only
    assert all(not g.paused and len(g._entries) <= 3 and g.captures <= 3 for g in blocks)
    before = [g.captures for g in blocks]
    for i in range(16):
        model(*_inputs(ragged[i % len(ragged)], 100 + i, channels=3)).sum().backward()
    assert [g.captures for g in blocks] == before


def test_auto_buckets_after_ragged_batches_pause_the_blocks(emulate, monkeypatch):
    # three layouts, each trained on and then evaluated: six graph keys in turn for a block that
    # keeps four, so the blocks capture at every recurrence and pause (with one warning) although
    # the layouts alone never outnumber the graphs; the model then switches to buckets
    from torch_geometric_bsa.nn import transformer as T
    plain, model = _auto_pair(monkeypatch)
    three = [[20], [60], [100]]
    with pytest.warns(layer_graphs.GraphsPausedWarning):
        for i in range(48):
            sizes = three[(i // 2) % 3]
            if i % 2 == 0:
                _step_both(plain, model, sizes, i)
            else:
                with torch.no_grad():
                    x, pos, batch = _inputs(sizes, i, channels=3)
                    torch.testing.assert_close(model(x, pos, batch), plain(x, pos, batch), rtol=1e-5, atol=1e-6)
    assert model._auto_bucket == T.AUTO_BUCKET_BALLS * model.ball_size
    assert all(not b._graphs.paused for b in model.blocks)  # cleared at the switch
    # uniform batches never switch; bucket_slots=None never pads
    for kw in ({}, {"bucket_slots": None}):
        other = BSATransformer(3, 1, **SMALL, **kw)
        for i in range(12):
            sizes = [40, 23] if not kw else [[20 * j] for j in range(1, 9)][i % 8]
            other(*_inputs(sizes, i, channels=3))
        assert other._auto_bucket is None and other._bucket() is None
