"""Baselines of the accuracy comparison: PointNet, the kNN-graph GNN, PointTransformerConv on the kNN graph,
and the kNN graph itself."""
import json

import pytest
import torch

from torch_geometric_bsa.nn.baselines import KNNGNN, PointNet, PointTransformerNet, knn_graph, knn_graph_torch


def _clouds(sizes, dim=3, channels=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = sum(sizes)
    pos = torch.rand(n, dim, generator=g)
    x = torch.randn(n, channels, generator=g)
    batch = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    return x, pos, batch


def _brute_force_knn(pos, k, batch, loop=False):
    edges = set()
    for i in range(pos.size(0)):
        same = (batch == batch[i]).nonzero().view(-1).tolist()
        cand = [j for j in same if loop or j != i]
        d = [float(((pos[i] - pos[j]) ** 2).sum()) for j in cand]
        for _, j in sorted(zip(d, cand))[:k]:
            edges.add((j, i))
    return edges


def _edge_set(edge_index):
    return set(map(tuple, edge_index.t().tolist()))


@pytest.mark.parametrize("loop", [False, True])
@pytest.mark.parametrize("max_elems", [1 << 24, 7])  # one chunk, and many tiny chunks
def test_knn_fallback_matches_brute_force(loop, max_elems):
    _, pos, batch = _clouds([13, 1, 4, 30], dim=3)
    ei = knn_graph_torch(pos, 5, batch, loop=loop, max_elems=max_elems)
    assert ei.shape[0] == 2
    assert _edge_set(ei) == _brute_force_knn(pos, 5, batch, loop=loop)
    assert bool((batch[ei[0]] == batch[ei[1]]).all())  # never crosses clouds
    assert len(_edge_set(ei)) == ei.size(1)  # no duplicate edges


@pytest.mark.parametrize("loop", [False, True])
def test_knn_dense_and_tree_agree(loop):
    # "dense" is what CUDA picks ("auto"); both are exact, so they agree where there are no ties
    _, pos, batch = _clouds([300, 41, 5, 150], dim=3, seed=4)
    tree = knn_graph_torch(pos, 9, batch, loop=loop, method="tree")
    for max_elems in (None, 1 << 12):
        dense = knn_graph_torch(pos, 9, batch, loop=loop, method="dense", max_elems=max_elems)
        assert torch.equal(dense, tree)  # same edges, same canonical order
    with pytest.raises(ValueError, match="method"):
        knn_graph_torch(pos, 9, batch, method="brute")


def test_knn_fallback_2d_no_batch():
    _, pos, _ = _clouds([40], dim=2)
    ei = knn_graph_torch(pos, 3)
    assert _edge_set(ei) == _brute_force_knn(pos, 3, torch.zeros(40, dtype=torch.long))
    # each centre has exactly k neighbours
    assert torch.equal(torch.bincount(ei[1], minlength=40), torch.full((40,), 3))


def test_knn_bad_k():
    with pytest.raises(ValueError, match="k must be"):
        knn_graph_torch(torch.rand(5, 3), 0)


def test_knn_agrees_with_torch_cluster():
    torch_cluster = pytest.importorskip("torch_cluster")
    _, pos, batch = _clouds([50, 17, 64], dim=3, seed=3)
    ours = knn_graph_torch(pos, 8, batch)
    theirs = torch_cluster.knn_graph(pos, 8, batch, loop=False)
    assert _edge_set(ours) == _edge_set(theirs)
    assert _edge_set(knn_graph(pos, 8, batch)) == _edge_set(theirs)


BASELINES = [(PointNet, {}), (KNNGNN, dict(k=4)), (PointTransformerNet, dict(k=4))]


@pytest.mark.parametrize("cls, kw", BASELINES)
def test_baseline_shapes_and_backward(cls, kw):
    x, pos, batch = _clouds([20, 9, 31])
    model = cls(2, 3, hidden_channels=16, num_layers=2, **kw)
    out = model(x, pos, batch)
    assert out.shape == (60, 3)
    out.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    assert "hidden_channels=16" in repr(model)
    assert model.flops(100) > 0


@pytest.mark.parametrize("cls, kw", BASELINES)
def test_baseline_batch_independence(cls, kw):
    # a cloud alone and inside a batch gives the same output
    x, pos, batch = _clouds([20, 9, 31], seed=1)
    model = cls(2, 1, hidden_channels=16, num_layers=2, **kw).eval()
    with torch.no_grad():
        together = model(x, pos, batch)
        alone = model(x[20:29], pos[20:29], None)
    torch.testing.assert_close(together[20:29], alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cls, kw", BASELINES)
def test_baseline_data_input_and_position_only(cls, kw):
    from torch_geometric.data import Batch, Data
    _, pos, _ = _clouds([12, 15], dim=2)
    data = Batch.from_data_list([Data(pos=pos[:12]), Data(pos=pos[12:])])
    model = cls(0, 1, hidden_channels=8, num_layers=1, dim=2, **kw)
    assert model(data).shape == (27, 1)


def test_baseline_permutation_equivariance():
    x, pos, batch = _clouds([25])
    perm = torch.randperm(25, generator=torch.Generator().manual_seed(0))
    for model in (PointNet(2, 1, 16, num_layers=2), KNNGNN(2, 1, 16, num_layers=2, k=4),
                  PointTransformerNet(2, 1, 16, num_layers=2, k=4)):
        model.eval()
        with torch.no_grad():
            torch.testing.assert_close(model(x, pos)[perm], model(x[perm], pos[perm]), rtol=1e-5, atol=1e-5)


def test_baseline_bad_args():
    with pytest.raises(ValueError, match="num_layers"):
        PointNet(2, 1, num_layers=0)
    with pytest.raises(ValueError, match="k must be"):
        KNNGNN(2, 1, k=0)
    with pytest.raises(ValueError, match="num_layers"):
        PointTransformerNet(2, 1, num_layers=0)
    with pytest.raises(ValueError, match="k must be"):
        PointTransformerNet(2, 1, k=0)


def test_ptconv_attends_only_to_its_neighbours():
    # moving a point outside a query's kNN set (and not making it a neighbour) leaves that query's
    # output unchanged after one layer: attention is local to the graph, unlike BSA/full attention
    x, pos, _ = _clouds([40], seed=2)
    model = PointTransformerNet(2, 1, 8, num_layers=1, k=4).eval()
    ei = knn_graph(pos, 4)
    far = int(torch.cdist(pos[:1], pos).argmax())  # farthest point from point 0: not its neighbour
    assert far not in ei[0][ei[1] == 0].tolist()
    x2 = x.clone()
    x2[far] += 5.0
    with torch.no_grad():
        a, b = model(x, pos, edge_index=ei), model(x2, pos, edge_index=ei)
    torch.testing.assert_close(a[0], b[0])
    assert not torch.allclose(a[far], b[far])


def test_ptconv_flops_hand_count():
    # one layer, width c, k neighbours, d = 3, n points: edges e = n (k + 1) (self-loops added)
    n, c, k, d, fin, fout = 100, 8, 4, 3, 2, 1
    model = PointTransformerNet(fin, fout, c, num_layers=1, k=k, dim=d)
    e = n * (k + 1)
    lin = lambda rows, a, b: 2.0 * rows * a * b  # noqa: E731
    expect = (lin(e, d, c) + lin(e, c, c)          # position MLP
              + 2 * lin(e, c, c)                   # attention MLP
              + 3 * lin(n, c, c) + lin(n, c, c)    # W1, W2, W3 and the output linear
              + lin(n, fin + d, c) + lin(n, c, c)  # embedding
              + lin(n, c, c) + lin(n, c, fout)     # head
              + 3.0 * d * n * n)                   # kNN search
    assert model.flops(n) == pytest.approx(expect)


def _brute_force_knn_dense(pos, k, batch, loop=False):
    # every pair in float64 (vectorised twin of _brute_force_knn, for clouds of hundreds of points)
    p = pos.double()
    d = torch.cdist(p, p, compute_mode="donot_use_mm_for_euclid_dist")
    d = d.masked_fill(batch[:, None] != batch[None], float("inf"))
    if not loop:
        d.fill_diagonal_(float("inf"))
    val, idx = d.topk(min(k, d.size(1)), dim=1, largest=False)
    dst = torch.arange(pos.size(0))[:, None].expand_as(idx)
    keep = torch.isfinite(val)
    return set(zip(idx[keep].tolist(), dst[keep].tolist()))


@pytest.mark.parametrize("dim, sizes, k, stretch", [
    (3, [700, 3, 450], 16, (1.0, 1.0, 1.0)),
    (3, [600, 250], 5, (10.0, 1.0, 0.1)),   # elongated clouds: balls far from round
    (2, [800], 20, (1.0, 1.0)),
    (4, [120, 30], 6, (1.0, 1.0, 1.0, 1.0)),  # no ball tree in 4-D: the dense scan
])
def test_knn_pruned_search_is_exact_on_larger_clouds(dim, sizes, k, stretch):
    # large enough that the ball-tree pruning skips most balls; must still be the exact kNN
    _, pos, batch = _clouds(sizes, dim=dim, seed=dim + k)
    pos = pos * torch.tensor(stretch)
    for loop in (False, True):
        ei = knn_graph_torch(pos, k, batch, loop=loop, max_elems=1 << 16)
        assert _edge_set(ei) == _brute_force_knn_dense(pos, k, batch, loop=loop)
        assert len(_edge_set(ei)) == ei.size(1)
        assert bool((ei[1][1:] >= ei[1][:-1]).all())  # sorted by centre


@pytest.mark.parametrize("dtype, offset", [(torch.float64, 0.0), (torch.float32, 1000.0)])
def test_knn_pruned_search_dtype_and_offset(dtype, offset):
    # float64 ranks by two integer sorts (its bits do not fit beside the query index); clouds far
    # from the origin need the absolute rounding slack of the pruning tests
    _, pos, batch = _clouds([500, 20, 7], dim=3, seed=11)
    pos = pos.to(dtype) + offset
    for loop in (False, True):
        ei = knn_graph_torch(pos, 12, batch, loop=loop)
        assert _edge_set(ei) == _brute_force_knn_dense(pos, 12, batch, loop=loop)
        # every centre has min(k, available) neighbours
        avail = torch.tensor([500, 20, 7]) - (0 if loop else 1)
        assert torch.equal(torch.bincount(ei[1], minlength=527), avail.clamp(max=12)[batch])


def test_ptconv_through_the_training_script(tmp_path):
    # examples/train.py builds it from its flags (--knn is k), counts its FLOPs and trains it
    import importlib.util
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("_example_train_ptconv", os.path.join(root, "examples", "train.py"))
    train = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train)
    flags = ["--model", "ptconv", "--dataset", "toy", "--num-train", "4", "--num-test", "2", "--hidden", "8",
             "--layers", "2", "--knn", "5", "--batch-size", "2", "--no-progress", "--no-plots", "--threads", "1"]
    model = train.build_model(train.parse_args(flags), 3, 1, 3)
    assert isinstance(model, PointTransformerNet) and model.k == 5 and model.num_layers == 2
    m = train.main(flags + ["--steps", "3", "--log-every", "1", "--out", str(tmp_path)])
    assert m["model"] == "ptconv" and m["steps"] == 3
    assert m["gflops_per_cloud"] == pytest.approx(model.flops(round(m["mean_points"])) / 1e9)
    losses = [r["loss"] for r in json.load(open(os.path.join(str(tmp_path), "metrics.json")))["train_log"]]
    assert len(losses) == 3 and all(v == v and v > 0 for v in losses)
