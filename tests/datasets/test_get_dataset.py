import pytest

from torch_geometric_bsa.datasets import (DATASETS, CarPressure, ElasticUnitCell, Elasticity,
                                          MultiBodyFlow, ShapeNetCar, get_dataset)


def test_names():
    assert DATASETS == {"car": CarPressure, "elasticity-gen": ElasticUnitCell,
                        "shapenet-car": ShapeNetCar, "elasticity": Elasticity,
                        "multibody": MultiBodyFlow}


def test_builds_and_forwards_kwargs(tmp_path):
    ds = get_dataset("car", str(tmp_path), "test", num_train=1, num_test=2, num_points=16,
                     n_length=6, n_around=6, log=False)
    assert isinstance(ds, CarPressure) and len(ds) == 2 and ds[0].pos.shape == (16, 3)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown dataset name 'cars'.*'car'"):
        get_dataset("cars", str(tmp_path))
    with pytest.raises(ValueError, match="split must be one of"):
        get_dataset("car", str(tmp_path), "val")
    with pytest.raises(FileNotFoundError, match="ShapeNetCar"):
        get_dataset("shapenet-car", str(tmp_path / "x"), log=False)
    with pytest.raises(ValueError, match=r"unknown dataset name \['car'\]"):
        get_dataset(["car"], str(tmp_path))


def test_unknown_keyword_names_it(tmp_path):
    # a typo (num_point) or another dataset's keyword: named, with the valid ones
    with pytest.raises(ValueError, match="unknown argument 'num_point' for dataset 'car'; "
                                         "CarPressure takes num_train, num_test, num_points"):
        get_dataset("car", str(tmp_path), num_point=16)
    with pytest.raises(ValueError, match="unknown argument 'max_voids' for dataset 'elasticity'"):
        get_dataset("elasticity", str(tmp_path), max_voids=2)
    assert not (tmp_path / "processed").exists()
