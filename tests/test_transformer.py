import io

import pytest
import torch
from torch_geometric.data import Batch, Data

from torch_geometric_bsa import BSATransformer
from torch_geometric_bsa.transforms import CacheBallTree, get_ball_tree

from conftest import random_batch

KW = dict(hidden_channels=16, num_layers=2, heads=4, ball_size=16, cmp_block=4, slc_block=4, topk=3, group_size=4)


def _model(attention="bsa", **kw):
    torch.manual_seed(0)
    return BSATransformer(3, 2, attention=attention, **{**KW, **kw}).double()


@pytest.mark.parametrize("attention", ["bsa", "ball", "full"])
@pytest.mark.parametrize("rotate", [False, True])
def test_shapes_equivariance_and_grads(attention, rotate):
    model = _model(attention, rotate=rotate)
    pos, batch = random_batch([40, 25], seed=1, dtype=torch.float64)
    x = torch.randn(65, 3, dtype=torch.float64)
    y = model(x, pos, batch)
    assert y.shape == (65, 2) and bool(torch.isfinite(y).all())
    perm = torch.cat([torch.randperm(40), 40 + torch.randperm(25)])
    assert torch.allclose(model(x[perm], pos[perm], batch), y[perm], atol=1e-10)
    y.square().mean().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_full_and_ball_reject_bsa_only_kwargs_cleanly():
    with pytest.raises(ValueError, match="attention must be"):
        BSATransformer(3, 1, attention="sparse")


def test_data_input_cached_tree_and_invalidation():
    model = _model()
    pos, _ = random_batch([50], seed=2, dtype=torch.float64)
    data = CacheBallTree(16)(Data(x=torch.randn(50, 3, dtype=torch.float64), pos=pos))
    y = model(data)
    assert torch.allclose(y, model(data.x, data.pos))
    assert get_ball_tree(data, 16) is data.ball_tree
    data.pos = data.pos + 0.5 * torch.rand_like(data.pos)  # positions moved: the cache must be ignored
    assert get_ball_tree(data, 16) is not data.ball_tree
    assert torch.allclose(model(data), model(data.x, data.pos))
    # a Batch of cached Data objects
    d2 = CacheBallTree(16)(Data(x=torch.randn(30, 3, dtype=torch.float64), pos=pos[:30] * 2))
    d1 = CacheBallTree(16)(Data(x=data.x, pos=data.pos))
    b = Batch.from_data_list([d1, d2])
    assert torch.allclose(model(b), model(b.x, b.pos, b.batch))


def test_state_dict_roundtrip():
    model = _model(rotate=True)
    buf = io.BytesIO()
    torch.save(model.state_dict(), buf)
    other = BSATransformer(3, 2, attention="bsa", rotate=True, **KW).double()
    other.load_state_dict(torch.load(io.BytesIO(buf.getvalue())))
    pos, batch = random_batch([40], seed=3, dtype=torch.float64)
    x = torch.randn(40, 3, dtype=torch.float64)
    assert torch.equal(model(x, pos, batch), other(x, pos, batch))
    assert "BSATransformer(3, 2, hidden_channels=16, num_layers=2" in repr(model)
