"""Mesher + P2 elasticity against Kirsch, and the generated ElasticUnitCell dataset."""
import numpy as np
import pytest
import torch

from torch_geometric_bsa.datasets import ElasticUnitCell
from torch_geometric_bsa.datasets.elastic_fem import (Ellipse, mesh_perforated_square,
                                                      solve_uniaxial_tension, von_mises)
from torch_geometric_bsa.datasets.elastic_unit_cell import sample_voids

# Kirsch: a hole of radius a in a plate under uniaxial tension s has hoop stress
# s (1 - 2 cos 2 theta) on its rim, peak 3 s. Here d/W = 0.05, for which the finite-width
# (Heywood) correction is below +0.3%.
SCF_TOL = 0.02 * 3       # 2% of the SCF
HOOP_TOL = 0.05          # max abs error of the rim hoop stress, in units of the applied stress


@pytest.fixture(scope="module")
def kirsch():
    a = 0.025
    mesh = mesh_perforated_square([Ellipse(0.5, 0.5, a, a)], h_min=1.0, h_max=0.05,
                                  grading=0.25, arc_points=96)
    return a, mesh, solve_uniaxial_tension(mesh)


def test_kirsch_scf(kirsch):
    a, mesh, s = kirsch
    vm = von_mises(*s.T)
    i = int(np.argmax(vm))
    assert abs(vm[i] - 3.0) < SCF_TOL, vm[i]
    # The peak sits at the top or bottom of the hole (perpendicular to the load).
    assert np.allclose(np.abs(mesh.points[i] - 0.5), [0.0, a], atol=0.15 * a)


def test_kirsch_hoop_stress(kirsch):
    _, mesh, s = kirsch
    p = mesh.points[mesh.on_void] - 0.5
    th = np.arctan2(p[:, 1], p[:, 0])
    c, si = np.cos(th), np.sin(th)
    sxx, syy, sxy = s[mesh.on_void].T
    hoop = sxx * si ** 2 + syy * c ** 2 - 2 * sxy * si * c
    assert np.abs(hoop - (1 - 2 * np.cos(2 * th))).max() < HOOP_TOL


def test_plain_square_is_uniform():
    mesh = mesh_perforated_square([], h_max=0.2)
    s = solve_uniaxial_tension(mesh, traction=2.0)
    assert np.allclose(s, [2.0, 0.0, 0.0], atol=1e-8)


def test_random_meshes_are_valid():
    # mesh_perforated_square checks it covers the square minus the voids (raises otherwise).
    for seed in range(25):
        voids = sample_voids(np.random.default_rng([seed, 0, 0]), max_voids=3)
        mesh = mesh_perforated_square(voids)
        assert mesh.on_void.sum() > 0 and 500 < len(mesh.points) < 3000


SMALL = dict(num_train=2, num_test=1, h_min=0.03, h_max=0.08, arc_points=24, log=False)


def test_dataset(tmp_path):
    train = ElasticUnitCell(str(tmp_path / "a"), "train", **SMALL)
    test = ElasticUnitCell(str(tmp_path / "a"), "test", **SMALL)
    assert (len(train), len(test)) == (2, 1)
    d = train[0]
    n = d.pos.shape[0]
    assert d.x.shape == (n, 2) and d.y.shape == (n, 1) and d.face.max() < n
    assert d.voids.shape == (1, 3, 5)
    assert torch.allclose(d.x, d.pos)
    y = torch.cat([train[i].y for i in range(2)])
    assert abs(float(y.mean())) < 1e-5 and float(y.std()) == pytest.approx(1.0, abs=1e-5)
    assert float((d.y * train.y_std + train.y_mean).min()) >= -1e-5   # von Mises >= 0
    again = ElasticUnitCell(str(tmp_path / "b"), "train", **SMALL)
    assert torch.equal(again[1].y, train[1].y) and torch.equal(again[1].pos, train[1].pos)
    other = ElasticUnitCell(str(tmp_path / "a"), "train", **{**SMALL, "h_max": 0.09})
    assert len(list((tmp_path / "a" / "processed").iterdir())) == 2
    assert other[0].pos.shape != d.pos.shape or not torch.equal(other[0].pos, d.pos)


@pytest.mark.parametrize("kw, name", [
    (dict(num_train=0), "num_train"), (dict(num_test=1.0), "num_test"),
    (dict(max_voids=0), "max_voids"), (dict(arc_points=0), "arc_points"), (dict(seed=-1), "seed"),
    (dict(h_min=0.0), "h_min"), (dict(h_min=float("nan")), "h_min"),
    (dict(h_max=float("inf")), "h_max"), (dict(h_max="0.08"), "h_max"),
    (dict(h_min=0.09), "h_min must be <= h_max"),
])
def test_invalid_arguments(tmp_path, kw, name):
    with pytest.raises(ValueError, match=rf"^{name}"):
        ElasticUnitCell(str(tmp_path), "train", **{**SMALL, **kw})
    assert not (tmp_path / "processed").exists()  # rejected before generating anything
