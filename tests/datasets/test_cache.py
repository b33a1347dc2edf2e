"""Cache keys and atomic writes shared by all datasets."""
import os

import numpy as np
import pytest
import torch_geometric.transforms as T

from torch_geometric_bsa.datasets import Elasticity, _cache, elastic_fem, panel

NP = 20


def write_fake(folder, samples=8):
    rng = np.random.default_rng(2)
    np.save(os.path.join(folder, "Random_UnitCell_XY_10.npy"), rng.random((NP, 2, samples)))
    np.save(os.path.join(folder, "Random_UnitCell_sigma_10.npy"), rng.random((NP, samples)))


def test_key_changes_with_config_source_and_transform(monkeypatch):
    base = _cache.cache_key({"n": 1}, [panel], [None])
    assert base == _cache.cache_key({"n": 1}, [panel], [None])
    assert base != _cache.cache_key({"n": 2}, [panel], [None])
    assert base != _cache.cache_key({"n": 1}, [elastic_fem], [None])
    assert base != _cache.cache_key({"n": 1}, [panel], [T.Center()])
    # Lambdas differ only by address between runs: the address is not part of the key.
    assert (_cache.cache_key({}, [], [lambda d: d]) == _cache.cache_key({}, [], [lambda d: d]))
    real = _cache.inspect.getsource
    monkeypatch.setattr(_cache.inspect, "getsource", lambda m: real(m) + "# edited")
    assert base != _cache.cache_key({"n": 1}, [panel], [None])


def test_pre_transform_gets_its_own_folder(tmp_path):
    write_fake(str(tmp_path))
    kw = dict(num_train=5, num_test=2, num_points=NP, log=False)
    plain = Elasticity(str(tmp_path), "train", **kw)
    centred = Elasticity(str(tmp_path), "train", pre_transform=T.Center(), **kw)
    assert len(os.listdir(tmp_path / "processed")) == 2
    assert not plain[0].pos.mean(0).abs().max() < 1e-6
    assert centred[0].pos.mean(0).abs().max() < 1e-6


def test_atomic_write_keeps_old_file_on_failure(tmp_path):
    path = str(tmp_path / "f.txt")
    _cache.atomic_write(path, lambda tmp: open(tmp, "w").write("old"))

    def fail(tmp):
        open(tmp, "w").write("half")
        raise RuntimeError("interrupted")

    with pytest.raises(RuntimeError):
        _cache.atomic_write(path, fail)
    assert open(path).read() == "old" and os.listdir(tmp_path) == ["f.txt"]
