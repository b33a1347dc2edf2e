"""The local-geometry input features (transforms.local_geometry / LocalGeometry)."""
import pytest
import torch
from torch_geometric.data import Batch, Data

from torch_geometric_bsa.transforms import LocalGeometry, local_geometry


def grid(n=10):
    return torch.stack(torch.meshgrid(torch.arange(float(n)), torch.arange(float(n)), indexing="ij"), -1).view(-1, 2)


def test_spacing_and_inward_offset_on_a_grid():
    pos = grid()
    f = local_geometry(pos, k=4)
    assert f.shape == (100, 3)
    inner = (pos[:, 0] > 0) & (pos[:, 0] < 9) & (pos[:, 1] > 0) & (pos[:, 1] < 9)
    # inside, the 4 nearest points are the unit neighbours: spacing 1, centroid on the point
    assert torch.allclose(f[inner, 0], torch.ones(int(inner.sum())))
    assert f[inner, 1:].abs().max() < 1e-6
    # on the edge x = 0 (corners aside) the neighbourhood lies at x >= 0: the offset points inward
    edge = (pos[:, 0] == 0) & (pos[:, 1] > 0) & (pos[:, 1] < 9)
    assert (f[edge, 1] > 0.1).all()
    # and it is a hole's signature too: remove the centre's points and the ring around it points away
    keep = ((pos - 4.5).norm(dim=1) > 2.0)
    g = local_geometry(pos[keep], k=6)
    ring = (pos[keep] - 4.5).norm(dim=1) < 3.0
    outward = ((pos[keep][ring] - 4.5) * g[ring, 1:]).sum(1)
    # (never inward; where k cuts through a ring of equidistant points the tie can leave it at 0)
    assert (outward > -1e-6).all() and (outward > 0.3).float().mean() > 0.7


def test_far_from_the_origin_and_duplicates():
    # the same cloud shifted far from the origin gives the same features (fp32 positions)
    pos = torch.rand(400, 3, generator=torch.Generator().manual_seed(2))
    shift = torch.tensor([1000.0, -2000.0, 500.0])
    # (tolerance: fp32 rounds the shifted input by 2.4e-4, against a spacing of ~0.1; the matmul
    # form of the distances loses them to cancellation here: the features blow up, and the test fails)
    assert torch.allclose(local_geometry(pos + shift, k=8), local_geometry(pos, k=8), atol=5e-3, rtol=0)
    # a duplicated point has its twin at distance 0, not itself
    f = local_geometry(torch.cat([pos, pos[:1]]), k=1)
    assert f[0, 0] == 0 and f[-1, 0] == 0


def test_chunks_and_dtype():
    pos = torch.rand(301, 3, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = local_geometry(pos, k=5)
    b = local_geometry(pos, k=5, chunk=7)
    assert a.dtype == torch.float64 and torch.allclose(a, b)
    assert local_geometry(pos[:3], k=16).shape == (3, 4)  # k capped at the other points


def test_transform_appends_to_x_and_checks_input():
    pos = torch.rand(50, 2, generator=torch.Generator().manual_seed(1))
    d = LocalGeometry(8)(Data(pos=pos.clone(), x=torch.ones(50, 2)))
    assert d.x.shape == (50, 5) and (d.x[:, :2] == 1).all()
    assert torch.allclose(d.x[:, 2:], local_geometry(pos, 8))
    assert LocalGeometry(8)(Data(pos=pos.clone())).x.shape == (50, 3)
    assert repr(LocalGeometry(8)) == "LocalGeometry(k=8)"
    with pytest.raises(ValueError, match="pos"):
        LocalGeometry(8)(Data(x=torch.ones(3, 1)))
    with pytest.raises(ValueError, match="Batch"):
        LocalGeometry(8)(Batch.from_data_list([Data(pos=pos[:20]), Data(pos=pos[20:])]))
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="k must"):
            LocalGeometry(bad)
    with pytest.raises(ValueError, match="N >= 2"):
        local_geometry(pos[:1])
