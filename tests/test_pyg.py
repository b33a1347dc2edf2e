"""PyG conventions: lazy in_channels, Data in, config as one object, a compressor module,
torch_geometric.nn.Sequential, torch.compile(fullgraph=True), per-graph pooling and the GPS layer."""
import pytest
import torch
from torch import nn
from torch_geometric.data import Batch, Data

from torch_geometric_bsa import BSAConfig, BSAConv, BSAGPSConv, BSATransformer, build_ball_tree
from torch_geometric_bsa.nn import KVCompressor, knn_graph
from torch_geometric_bsa.transforms import CacheBallTree

from conftest import random_batch

CFG = BSAConfig(ball_size=32, cmp_block=4, slc_block=4, topk=2, group_size=4)
KW = dict(ball_size=32, cmp_block=4, slc_block=4, topk=2, group_size=4)


def _cloud(sizes=(70, 45), channels=6, seed=0):
    pos, batch = random_batch(list(sizes), seed=seed)
    x = torch.randn(pos.size(0), channels, generator=torch.Generator().manual_seed(seed))
    return x, pos, batch


def test_lazy_in_channels():
    x, pos, batch = _cloud(channels=5)
    conv = BSAConv(-1, 16, heads=2, **KW)
    assert "-1" in repr(conv)
    assert conv(x, pos, batch).shape == (115, 16)
    assert conv.lin_in.weight.shape == (16, 5)  # materialised on the first call
    with pytest.raises(ValueError, match="channels"):
        conv(torch.randn(115, 7), pos, batch)  # the inferred width sticks
    fresh = BSAConv(-1, 16, heads=2, **KW)  # a lazy layer loads a trained state dict
    fresh.load_state_dict(conv.state_dict())
    assert torch.equal(fresh(x, pos, batch), conv(x, pos, batch))
    with pytest.raises(ValueError, match="out_channels"):
        BSAConv(-1, heads=2)
    with pytest.raises(ValueError, match="heads=3 must divide out_channels=16"):
        BSAConv(-1, 16, heads=3)
    model = BSATransformer(-1, 2, hidden_channels=16, num_layers=1, heads=2, **KW)
    out = model(x, pos, batch)
    assert out.shape == (115, 2) and model.embed[0].weight.shape == (16, 5 + 3)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_data_in_tensor_out_and_cached_tree(monkeypatch):
    torch.manual_seed(0)
    conv = BSAConv(6, 8, heads=2, **KW)
    clouds = [Data(x=torch.randn(n, 6), pos=torch.rand(n, 3)) for n in (70, 45)]
    batch = Batch.from_data_list(clouds)
    ref = conv(batch.x, batch.pos, batch.batch)
    assert torch.allclose(conv(batch), ref)
    with pytest.raises(ValueError, match="do not pass them"):
        conv(batch, batch.pos)
    with pytest.raises(ValueError, match="Tensor"):
        conv([1, 2, 3])
    # a CacheBallTree transform's tree is used: no tree is built in the forward
    cached = Batch.from_data_list([CacheBallTree(32)(d.clone()) for d in clouds])

    def no_build(*args, **kwargs):
        raise AssertionError("tree rebuilt although the Batch carries a valid cached tree")

    monkeypatch.setattr("torch_geometric_bsa.nn.conv.build_ball_tree", no_build)
    monkeypatch.setattr("torch_geometric_bsa.transforms.build_ball_tree", no_build)
    assert torch.allclose(conv(cached), ref, atol=1e-6)


def test_config_object_and_unknown_keys():
    x, pos, batch = _cloud()
    torch.manual_seed(1)
    a = BSAConv(6, heads=2, **KW)
    torch.manual_seed(1)
    b = BSAConv(6, heads=2, config=CFG)
    assert a.cfg == b.cfg and torch.equal(a(x, pos, batch), b(x, pos, batch))
    with pytest.raises(ValueError, match="topk=3 conflicts with config.topk=2"):
        BSAConv(6, heads=2, topk=3, config=CFG)
    with pytest.raises(TypeError, match="'slc_blok'.*valid BSA keywords.*'slc_block'"):
        BSATransformer(6, 1, slc_blok=4)
    model = BSATransformer(6, 1, hidden_channels=16, num_layers=2, heads=2, config=CFG)
    assert all(blk.attn.cfg == CFG for blk in model.blocks)
    assert model(x, pos, batch).shape == (115, 1)


def test_compressor_module():
    x, pos, batch = _cloud()
    torch.manual_seed(2)
    a = BSAConv(6, heads=2, compression="mean", config=CFG)
    torch.manual_seed(2)
    b = BSAConv(6, heads=2, compression=KVCompressor(3, 4, 4, mode="mean"), config=CFG)
    assert torch.allclose(a(x, pos, batch), b(x, pos, batch))

    class MaxPool(nn.Module):  # a user's own pooling, with a learned scale
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, k, v, tree):
            kb, vb = k.view(-1, 4, *k.shape[1:]), v.view(-1, 4, *v.shape[1:])
            return self.scale * kb.amax(1), vb.amax(1), tree.mask.view(-1, 4).any(1)

    c = BSAConv(6, heads=2, compression=MaxPool(), config=CFG)
    c(x, pos, batch).square().sum().backward()
    assert c.compress.scale.grad is not None and c.compress.scale.grad.abs() > 0
    with pytest.raises(ValueError, match="cmp_block"):
        BSAConv(6, heads=2, compression=KVCompressor(3, 8, 8), config=CFG)


def test_pyg_sequential_with_other_convs():
    from torch_geometric.nn import GCNConv, PointTransformerConv, Sequential
    x, pos, batch = _cloud()
    edge_index = knn_graph(pos, 6, batch)
    model = Sequential("x, pos, edge_index, batch", [
        (PointTransformerConv(-1, 16), "x, pos, edge_index -> x"),
        nn.ReLU(),
        (BSAConv(-1, 16, heads=2, **KW), "x, pos, batch -> x"),
        (GCNConv(16, 4), "x, edge_index -> x"),
    ])
    out = model(x, pos, edge_index, batch)
    assert out.shape == (115, 4)
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_compile_fullgraph_with_prebuilt_tree(backend):
    torch._dynamo.reset()
    x, pos, batch = _cloud()
    torch.manual_seed(3)
    conv = BSAConv(6, 8, heads=2, config=CFG, backend="torch")
    tree = build_ball_tree(pos, batch, 32)
    ref = conv(x, pos, batch, tree=tree)
    out = torch.compile(conv, backend=backend, fullgraph=True)(x, pos, batch, tree=tree)
    assert torch.allclose(out, ref, atol=1e-5)


def test_compile_fullgraph_transformer_with_tree():
    torch._dynamo.reset()
    x, pos, batch = _cloud()
    torch.manual_seed(4)
    model = BSATransformer(6, 2, hidden_channels=16, num_layers=1, heads=2, config=CFG, pool="mean")
    tree = build_ball_tree(pos, batch, 32)
    ref = model(x, pos, batch, tree=tree)
    out = torch.compile(model, backend="aot_eager", fullgraph=True)(x, pos, batch, tree=tree)
    assert out.shape == (2, 2) and torch.allclose(out, ref, atol=1e-5)


def test_pool_gives_one_row_per_cloud():
    torch.manual_seed(5)
    clouds = [Data(x=torch.randn(n, 6), pos=torch.rand(n, 3)) for n in (70, 45, 33)]
    model = BSATransformer(6, 3, hidden_channels=16, num_layers=1, heads=2, pool="mean", config=CFG).eval()
    out = model(Batch.from_data_list(clouds))
    assert out.shape == (3, 3)
    # a cloud's output does not depend on the other clouds of the batch (up to fp32 rounding)
    alone = model(Batch.from_data_list(clouds[1:2]))
    assert torch.allclose(out[1:2], alone, atol=1e-5)
    with pytest.raises(ValueError, match="pool"):
        BSATransformer(6, 3, pool="median")


@pytest.mark.parametrize("local", ["gine", "point_transformer", None])
def test_gps_layer_gives_every_parameter_a_gradient(local):
    from torch_geometric.nn import GINEConv, PointTransformerConv
    x, pos, batch = _cloud(channels=16)
    edge_index = knn_graph(pos, 6, batch)
    edge_attr = (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True)
    conv = {"gine": lambda: GINEConv(nn.Sequential(nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 16)), edge_dim=1),
            "point_transformer": lambda: PointTransformerConv(16, 16), None: lambda: None}[local]()
    layer = BSAGPSConv(16, conv, heads=2, dropout=0.1, config=CFG)
    tree = build_ball_tree(pos, batch, 32)
    kwargs = {"edge_attr": edge_attr} if local == "gine" else {}
    out = layer(x, pos, edge_index, batch, tree=tree, **kwargs)
    assert out.shape == (115, 16)
    out.square().mean().backward()
    missing = [n for n, p in layer.named_parameters() if p.grad is None]
    assert not missing, missing
    # every BSA parameter learns; the last bias of the key-compression MLP shifts all compressed
    # logits of a query alike, so softmax gives it an exactly-zero gradient (in theory)
    bsa = {n: p.grad for n, p in layer.attn.named_parameters()}
    assert len(bsa) >= 17
    dead = [n for n, g in bsa.items() if not g.abs().sum() > 0 and not n.endswith("compress.phi_k.2.bias")]
    assert not dead, dead
    with pytest.raises(ValueError, match="not both"):
        BSAGPSConv(16, None, attn=BSAConv(16, heads=2, config=CFG), config=CFG)


@pytest.mark.parametrize("local", ["gine", "point_transformer"])
def test_gps_example_runs(local):
    import importlib.util
    import os
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples", "gps.py")
    spec = importlib.util.spec_from_file_location("gps_example", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    res = mod.main(["--local", local, "--points", "80", "--clouds", "8", "--epochs", "2", "--hidden", "16"])
    assert 0 < res["gps"] < float("inf") and 0 < res["local_only"] < float("inf") and res["variance"] > 0


def test_compile_of_a_model_containing_bsaconv():
    # torch.compile / torch_geometric.compile of a PyG Sequential that holds BSAConv and builds the
    # tree inside (graph breaks allowed there), gradients included
    import warnings

    import torch_geometric
    from torch_geometric.nn import Sequential
    torch._dynamo.reset()
    x, pos, batch = _cloud()
    torch.manual_seed(6)
    model = Sequential("x, pos, batch", [(BSAConv(6, 16, heads=2, config=CFG), "x, pos, batch -> x"),
                                         nn.ReLU(), nn.Linear(16, 1)])
    ref = model(x, pos, batch)
    ref.square().mean().backward()
    gref = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch_geometric.compile is deprecated in favour of torch.compile
        compiled = torch_geometric.compile(model, backend="aot_eager")
    out = compiled(x, pos, batch)
    out.square().mean().backward()
    assert torch.allclose(out, ref, atol=1e-5)
    assert all(torch.allclose(p.grad, g, atol=1e-5) for p, g in zip(model.parameters(), gref))
