"""Elasticity on tiny fake Geo-FNO .npy files."""
import os
import re

import numpy as np
import pytest
import torch

from torch_geometric_bsa.datasets import Elasticity

S, NP = 9, 30


def write_fake(folder, samples=S, points=NP):
    os.makedirs(folder, exist_ok=True)
    rng = np.random.default_rng(1)
    xy = rng.random((points, 2, samples))
    sigma = rng.random((points, samples)) * 300
    np.save(os.path.join(folder, "Random_UnitCell_XY_10.npy"), xy)
    np.save(os.path.join(folder, "Random_UnitCell_sigma_10.npy"), sigma)
    return xy, sigma


@pytest.mark.parametrize("sub", ["", "Meshes"])
def test_first_train_last_test(tmp_path, sub):
    xy, sigma = write_fake(os.path.join(tmp_path, sub))
    kw = dict(num_train=5, num_test=2, num_points=NP, log=False)
    train, test = Elasticity(str(tmp_path), "train", **kw), Elasticity(str(tmp_path), "test", **kw)
    assert (len(train), len(test)) == (5, 2)
    mean, std = sigma[:, :5].mean(), sigma[:, :5].std(ddof=1)
    assert train.y_mean == pytest.approx(mean, rel=1e-5) and train.y_std == pytest.approx(std, rel=1e-5)
    for ds, cols in ((train, range(5)), (test, range(S - 2, S))):
        for k, c in enumerate(cols):
            d = ds[k]
            assert d.pos.shape == (NP, 2) and d.x.shape == (NP, 2) and d.y.shape == (NP, 1)
            assert torch.allclose(d.pos, torch.from_numpy(xy[:, :, c]).float())
            assert torch.allclose(d.y[:, 0] * std + mean, torch.from_numpy(sigma[:, c]).float(),
                                  rtol=1e-4, atol=1e-3)


def test_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"Random_UnitCell_XY_10\.npy \[972, 2, S\]"):
        Elasticity(str(tmp_path), "train", log=False)


def test_wrong_shapes(tmp_path):
    write_fake(str(tmp_path))
    with pytest.raises(ValueError, match=r"XY_10\.npy should have shape \[31, 2, S\].*found shape \[30, 2, 9\]"):
        Elasticity(str(tmp_path), "train", num_train=5, num_test=2, num_points=31, log=False)
    with pytest.raises(ValueError, match=r"S >= num_train \+ num_test = 10"):
        Elasticity(str(tmp_path), "train", num_train=8, num_test=2, num_points=NP, log=False)
    np.save(os.path.join(tmp_path, "Random_UnitCell_sigma_10.npy"), np.zeros((NP, S - 1)))
    with pytest.raises(ValueError, match=r"sigma_10\.npy should have shape \[30, 9\].*found shape \[30, 8\]"):
        Elasticity(str(tmp_path), "train", num_train=5, num_test=2, num_points=NP, log=False,
                   force_reload=True)


KW = dict(num_train=5, num_test=2, num_points=NP, log=False)  # reads samples 0..4 and 7, 8


@pytest.mark.parametrize("name, index, sample", [
    ("Random_UnitCell_sigma_10.npy", (np.s_[:3], 1), 1),
    ("Random_UnitCell_XY_10.npy", (4, 0, 8), 8),
    ("Random_UnitCell_XY_10.npy", (4, 1, 7), 7),
])
def test_nan_or_inf_names_file(tmp_path, name, index, sample):
    xy, sigma = write_fake(str(tmp_path))
    arr = sigma if "sigma" in name else xy
    arr[index] = np.nan if "sigma" in name else -np.inf
    np.save(os.path.join(tmp_path, name), arr)
    count = 3 if "sigma" in name else 1
    msg = f"{os.path.join(tmp_path, name)} contains {count} NaN/Inf values"
    with pytest.raises(ValueError, match=re.escape(msg) + rf".*first in sample {sample}\)"):
        Elasticity(str(tmp_path), "test", **KW)


def test_nan_in_unused_sample_is_ignored(tmp_path):
    xy, sigma = write_fake(str(tmp_path))
    sigma[:, 5] = np.nan  # between the train and the test samples: never read
    np.save(os.path.join(tmp_path, "Random_UnitCell_sigma_10.npy"), sigma)
    test = Elasticity(str(tmp_path), "test", **KW)
    assert torch.isfinite(test.y).all() and np.isfinite(test.y_mean)


@pytest.mark.parametrize("kw, name", [
    (dict(num_train=0), "num_train"), (dict(num_train=True), "num_train"),
    (dict(num_test=-1), "num_test"), (dict(num_points=30.0), "num_points"),
])
def test_invalid_arguments(tmp_path, kw, name):
    write_fake(str(tmp_path))
    with pytest.raises(ValueError, match=rf"^{name} must be an int >= 1"):
        Elasticity(str(tmp_path), "train", **{**KW, **kw})
