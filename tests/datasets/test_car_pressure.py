"""Panel solver against the analytic sphere, and the generated CarPressure dataset."""
import math
import os
import time

import numpy as np
import pytest
import torch

from torch_geometric_bsa.datasets import CarPressure, CarShape, make_scaling_cloud
from torch_geometric_bsa.datasets import car_pressure, panel

# Bounds on the sphere's Cp error (Cp spans [-1.25, 1]); measured values in docs/datasets.md.
SPHERE_REL_L2, SPHERE_MAX_ABS = 0.01, 0.03


def test_panel_velocity_matches_quadrature():
    tri = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.3, 0.8, 0.0]]], dtype=torch.float64)
    n = 600  # midpoint rule on a fine grid of the triangle's parameter square
    u, v = torch.meshgrid(*(2 * [(torch.arange(n, dtype=torch.float64) + 0.5) / n]), indexing="ij")
    keep = (u + v) < 1
    a, b, c = tri[0]
    y = a + u[keep, None] * (b - a) + v[keep, None] * (c - a)
    w = 0.5 * torch.linalg.cross(b - a, c - a).norm() / keep.sum()
    for x in ([0.4, 0.3, 0.5], [2.0, 1.0, -0.7], [-0.5, 0.2, 0.1]):
        x = torch.tensor(x, dtype=torch.float64)
        d = x - y
        ref = (d / d.norm(dim=-1, keepdim=True) ** 3).sum(0) * w / (4 * math.pi)
        got = panel.source_panel_velocity(x[None], tri)[0, 0]
        assert torch.allclose(got, ref, rtol=5e-3, atol=2e-4), (x, got, ref)


def test_self_panel_takes_outer_limit():
    tri = torch.tensor([[[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]], dtype=torch.float64)
    c = tri.mean(1)
    v = panel.source_panel_velocity(c, tri, self_index=torch.tensor([0]))[0, 0]
    assert v[2].item() == pytest.approx(0.5)   # half the source leaves through the +n side


def _errors(cp, exact):
    return float((cp - exact).norm() / exact.norm()), float((cp - exact).abs().max())


def test_sphere_icosphere():
    v, f = panel.icosphere(3)                       # 1,280 panels
    v, f = torch.from_numpy(v), torch.from_numpy(f)
    f = panel.orient_outward(v, f)
    cp, vel, sigma = panel.solve_source_panels(v, f)
    c, n, area = panel.triangle_geometry(v[f])
    rel, mx = _errors(cp, panel.sphere_cp_exact(c))
    assert rel < SPHERE_REL_L2 and mx < SPHERE_MAX_ABS, (rel, mx)
    assert abs(float((sigma * area).sum())) < 1e-6     # closed body: no net source
    assert float((vel * n).sum(-1).abs().max()) < 1e-4  # no flow through the panels


def test_sphere_through_car_pipeline():
    # The sphere as a CarShape: same mesh type, solver, interpolation and sampling as the cars.
    shape = CarShape.sphere()
    sol = car_pressure.car_panel_solution(shape, 30, 28)
    pos, normal, cp = car_pressure.sample_surface(shape, sol, 4000, torch.Generator().manual_seed(0))
    assert torch.allclose(pos.norm(dim=-1), torch.ones(4000, dtype=pos.dtype), atol=1e-9)
    assert float((normal * pos).sum(-1).min()) > 0.999
    rel, mx = _errors(cp, panel.sphere_cp_exact(pos))
    assert rel < SPHERE_REL_L2 and mx < SPHERE_MAX_ABS, (rel, mx)


def test_car_mesh_is_closed_and_outward():
    shape = CarShape.sample(np.random.default_rng(3))
    v, f, uv = shape.panel_mesh(12, 10)
    assert f.shape[0] == 2 * 10 * 11
    e = torch.cat([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    # Closed and consistently oriented: every directed edge appears once, its reverse once.
    assert torch.unique(e, dim=0).shape[0] == e.shape[0]
    assert torch.equal(torch.unique(e, dim=0), torch.unique(e.flip(1), dim=0))
    tri = v[f]
    vol = (tri[:, 0] * torch.linalg.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6
    assert vol > 0
    # Corner parameters map back onto the corners.
    assert torch.allclose(shape.surface(uv[..., 0], uv[..., 1]), tri, atol=1e-6)


SMALL = dict(num_train=2, num_test=1, num_points=64, n_length=8, n_around=8, log=False)


def test_dataset_shapes_and_normalisation(tmp_path):
    train = CarPressure(str(tmp_path), "train", **SMALL)
    test = CarPressure(str(tmp_path), "test", **SMALL)
    assert (len(train), len(test)) == (2, 1)
    d = train[0]
    assert d.pos.shape == (64, 3) and d.x.shape == (64, 3) and d.y.shape == (64, 1)
    assert torch.allclose(d.x.norm(dim=-1), torch.ones(64), atol=1e-5)
    y = torch.cat([train[i].y for i in range(2)])
    assert abs(float(y.mean())) < 1e-5 and float(y.std()) == pytest.approx(1.0, abs=1e-5)
    assert test.y_mean == train.y_mean and test.y_std == train.y_std
    cp = d.y * train.y_std + train.y_mean
    assert float(cp.max()) <= 1.0 + 1e-4                 # Cp <= 1 (stagnation) in potential flow


def test_cache_hit_miss_and_determinism(tmp_path, monkeypatch):
    a = CarPressure(str(tmp_path / "a"), "train", **SMALL)
    folders = os.listdir(tmp_path / "a" / "processed")
    assert len(folders) == 1 and folders[0].startswith("car_pressure-")

    calls = []
    orig = CarPressure.build
    monkeypatch.setattr(CarPressure, "build", lambda self: calls.append(1) or orig(self))
    b = CarPressure(str(tmp_path / "a"), "train", **SMALL)              # hit
    assert calls == [] and torch.equal(a[1].y, b[1].y)
    CarPressure(str(tmp_path / "a"), "train", **{**SMALL, "num_points": 65})  # miss
    assert calls == [1] and len(os.listdir(tmp_path / "a" / "processed")) == 2

    c = CarPressure(str(tmp_path / "c"), "test", **SMALL)               # same seed elsewhere
    assert torch.equal(c[0].pos, CarPressure(str(tmp_path / "a"), "test", **SMALL)[0].pos)
    d = CarPressure(str(tmp_path / "d"), "test", **{**SMALL, "seed": 1})
    assert not torch.allclose(c[0].pos, d[0].pos)
    # A test car does not depend on how many train cars there are.
    e = CarPressure(str(tmp_path / "e"), "test", **{**SMALL, "num_train": 3})
    assert torch.equal(c[0].pos, e[0].pos) and torch.equal(c[0].shape_params, e[0].shape_params)


def test_no_tmp_files_left(tmp_path):
    CarPressure(str(tmp_path), "train", **SMALL)
    for _, _, files in os.walk(tmp_path):
        assert not [f for f in files if ".tmp-" in f]


def test_scaling_cloud():
    t = time.time()
    d = make_scaling_cloud(200_000, seed=3)
    elapsed = time.time() - t
    assert d.pos.shape == (200_000, 3) and d.x.shape == (200_000, 3) and d.y.shape == (200_000, 1)
    assert torch.isfinite(d.y).all() and float(d.y.max()) <= 1.0 + 1e-5
    assert torch.equal(make_scaling_cloud(1000, seed=3).pos, make_scaling_cloud(1000, seed=3).pos)
    assert elapsed < 10.0   # generous: ~1 s at 1e6 points on an idle 2-core CPU (docs)


def test_parallel_generation_is_identical(tmp_path):
    serial = CarPressure(str(tmp_path / "s"), "test", **SMALL)
    par = CarPressure(str(tmp_path / "p"), "test", **SMALL, num_workers=2)
    assert serial.key == par.key                      # the worker count is not part of the data
    for a, b in zip(serial, par):
        assert torch.equal(a.pos, b.pos) and torch.equal(a.y, b.y) and torch.equal(a.x, b.x)
    assert serial.y_mean == par.y_mean and serial.y_std == par.y_std


@pytest.mark.parametrize("kw, name", [
    (dict(num_train=0), "num_train"), (dict(num_test=1.5), "num_test"),
    (dict(num_points=0), "num_points"), (dict(n_length=2), "n_length"),
    (dict(n_around=8.0), "n_around"), (dict(seed=-1), "seed"), (dict(num_workers=-1), "num_workers"),
])
def test_invalid_arguments(tmp_path, kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be an int"):
        CarPressure(str(tmp_path), "train", **{**SMALL, **kw})
    assert not os.path.exists(tmp_path / "processed")  # rejected before generating anything


@pytest.mark.parametrize("kw, name", [
    (dict(num_points=0), "num_points"), (dict(num_points=100.0), "num_points"),
    (dict(seed=-1), "seed"), (dict(mesh_resolution=2), "mesh_resolution"),
])
def test_scaling_cloud_invalid_arguments(kw, name):
    with pytest.raises(ValueError, match=rf"^{name} must be an int"):
        make_scaling_cloud(**{"num_points": 100, **kw})
