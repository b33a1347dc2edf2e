"""ShapeNetCar on a tiny fake copy of the UPT-preprocessed layout."""
import os
import re

import numpy as np
import pytest
import torch

from torch_geometric_bsa.datasets import ShapeNetCar

NUM_CARS, NUM_TEST, NUM_POINTS = 12, 3, 40


def write_fake_shapenet(root, num_cars=NUM_CARS, num_points=NUM_POINTS, npy_every=4):
    """Cars spread over param0..param8; every ``npy_every``-th car uses .npy instead of .th."""
    rng = np.random.default_rng(0)
    cars = []
    for i in range(num_cars):
        folder = os.path.join(root, f"param{i % 9}", f"car{i:03d}")
        os.makedirs(folder)
        pos = rng.normal(size=(num_points, 3)).astype(np.float32)
        p = rng.normal(-36.0, 48.0, size=num_points).astype(np.float32)
        if i % npy_every == 0:
            np.save(os.path.join(folder, "mesh_points.npy"), pos)
            np.save(os.path.join(folder, "pressure.npy"), p)
        else:
            torch.save(torch.from_numpy(pos), os.path.join(folder, "mesh_points.th"))
            torch.save(torch.from_numpy(p), os.path.join(folder, "pressure.th"))
        cars.append((folder, pos, p))
    # Loader order: param0..param8, sorted names inside each.
    cars.sort(key=lambda c: (int(c[0].split("param")[1].split(os.sep)[0]), c[0]))
    return cars


def load(root, split, **kw):
    return ShapeNetCar(str(root), split, num_points=NUM_POINTS, num_cars=NUM_CARS,
                       num_test=NUM_TEST, log=False, **kw)


def test_split_reproduces_upt():
    # The first indices of UPT's TEST_INDICES (ml-jku/UPT src/datasets/shapenet_car.py).
    test = ShapeNetCar.test_indices()
    assert test.numel() == 189 and len(set(test.tolist())) == 189
    assert {550, 592, 229, 547, 62, 464, 798, 836, 5} <= set(test.tolist())


def test_load_fake_layout(tmp_path):
    cars = write_fake_shapenet(tmp_path)
    train, test = load(tmp_path, "train"), load(tmp_path, "test")
    assert (len(train), len(test)) == (NUM_CARS - NUM_TEST, NUM_TEST)
    test_idx = ShapeNetCar.test_indices(NUM_CARS, NUM_TEST).tolist()
    assert test.car_id.tolist() == test_idx
    train_idx = [i for i in range(NUM_CARS) if i not in test_idx]
    assert train.car_id.tolist() == train_idx
    for ds, idx in ((train, train_idx), (test, test_idx)):
        for k, i in enumerate(idx):
            d = ds[k]
            _, pos, p = cars[i]
            assert d.pos.shape == (NUM_POINTS, 3) and d.y.shape == (NUM_POINTS, 1)
            assert torch.equal(d.pos, torch.from_numpy(pos)) and torch.equal(d.x, d.pos)
            expect = (torch.from_numpy(p) + 36.3099) / 48.5743
            assert torch.allclose(d.y[:, 0], expect, atol=1e-5)
    assert train.y_mean == pytest.approx(-36.3099) and train.y_std == pytest.approx(48.5743)


def test_missing_root_says_what_is_expected(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"param0 \.\. param8.*mesh_points\.th"):
        load(tmp_path / "nowhere", "train")


def test_wrong_shape_names_file_and_shape(tmp_path):
    cars = write_fake_shapenet(tmp_path)
    bad = os.path.join(cars[5][0], "mesh_points.th")
    torch.save(torch.zeros(NUM_POINTS - 1, 3), bad)
    with pytest.raises(ValueError, match=r"mesh_points\.th should hold surface points of shape "
                                         r"\[40, 3\], found shape \[39, 3\]"):
        load(tmp_path, "train")


def test_missing_pressure_file(tmp_path):
    cars = write_fake_shapenet(tmp_path)
    os.remove(os.path.join(cars[1][0], "pressure.th"))
    with pytest.raises(FileNotFoundError, match=r"pressure\.th \(or pressure\.npy\)"):
        load(tmp_path, "test")


def test_wrong_car_count(tmp_path):
    write_fake_shapenet(tmp_path, num_cars=NUM_CARS - 1)
    with pytest.raises(ValueError, match="found 11 car folders.*expected 12"):
        load(tmp_path, "train")


@pytest.mark.parametrize("car, name, value, count", [
    (0, "pressure.npy", np.nan, 1),           # car 0 is written as .npy, car 5 as .th
    (5, "mesh_points.th", np.inf, 1),
    (5, "pressure.th", np.nan, 3),
    (0, "mesh_points.npy", 1e39, 1),           # float64 beyond float32's range: Inf in training
])
def test_nan_or_inf_names_file(tmp_path, car, name, value, count):
    cars = write_fake_shapenet(tmp_path)
    path = os.path.join(cars[car][0], name)
    arr = (cars[car][1] if name.startswith("mesh") else cars[car][2]).astype(np.float64)
    arr.reshape(-1)[:count] = value
    if name.endswith(".npy"):
        np.save(path, arr)
    else:
        torch.save(torch.from_numpy(arr), path)
    with pytest.raises(ValueError, match=re.escape(f"{path} contains {count} NaN/Inf values")):
        load(tmp_path, "train")


def test_non_numeric_file_names_it(tmp_path):
    cars = write_fake_shapenet(tmp_path)
    path = os.path.join(cars[0][0], "pressure.npy")
    np.save(path, np.full(NUM_POINTS, "x"))
    with pytest.raises(ValueError, match=re.escape(path) + " should hold real numbers"):
        load(tmp_path, "train")


@pytest.mark.parametrize("kw, name", [
    (dict(num_points=0), "num_points"), (dict(num_points=40.0), "num_points"),
    (dict(num_cars=1, num_test=1), "num_cars"), (dict(num_test=0), "num_test"),
    (dict(num_test=True), "num_test"), (dict(num_test=NUM_CARS), "num_test"),
    (dict(split_seed=0.5), "split_seed"),
])
def test_invalid_arguments(tmp_path, kw, name):
    # Checked before any file is looked at (tmp_path is empty).
    with pytest.raises(ValueError, match=rf"^{name} must"):
        ShapeNetCar(str(tmp_path), "train", log=False, **{**dict(num_points=NUM_POINTS,
                    num_cars=NUM_CARS, num_test=NUM_TEST), **kw})
