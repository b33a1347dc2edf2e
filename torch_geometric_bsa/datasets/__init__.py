"""Datasets: loaders for the real ShapeNet-Car / Elasticity layouts and generated physics data.

``get_dataset(name, root, split, **kw)`` is the one entry point the training script uses:

* ``"shapenet-car"``: ``ShapeNetCar``, the BSA paper's benchmark (UPT preprocessed layout);
* ``"elasticity"``: ``Elasticity``, Geo-FNO's ``.npy`` files;
* ``"car"``: ``CarPressure``, generated car-like bodies with potential-flow surface pressure;
* ``"elasticity-gen"``: ``ElasticUnitCell``, generated perforated cells, von Mises stress;
* ``"multibody"``: ``MultiBodyFlow``, 2-3 car-like bodies whose pressures depend on each other.

``make_scaling_cloud`` gives a single large cloud (10^4..10^6 points) for speed runs.
"""
from __future__ import annotations

import inspect
from typing import Dict, Type

from ._cache import CachedSplitDataset
from .car_pressure import CarPressure, CarShape, make_scaling_cloud
from .elastic_unit_cell import ElasticUnitCell
from .elasticity import Elasticity
from .multibody import MultiBodyFlow
from .shapenet_car import ShapeNetCar

DATASETS: Dict[str, Type[CachedSplitDataset]] = {
    "car": CarPressure,
    "elasticity-gen": ElasticUnitCell,
    "shapenet-car": ShapeNetCar,
    "elasticity": Elasticity,
    "multibody": MultiBodyFlow,
}


def get_dataset(name: str, root: str, split: str = "train", **kwargs) -> CachedSplitDataset:
    """Build dataset ``name`` (a key of :data:`DATASETS`) for ``split`` under ``root``.

    ``kwargs`` go to the dataset class (sizes, seed, transform, ...). Every dataset returns
    ``Data`` with ``pos``, ``x``, a normalised ``y [N, 1]`` and
    ``y_mean``/``y_std``, so ``y * y_std + y_mean`` recovers physical units.
    """
    try:
        cls = DATASETS[name]
    except (KeyError, TypeError):  # TypeError: an unhashable name
        raise ValueError(f"unknown dataset name {name!r}; choose one of {sorted(DATASETS)}") from None
    # A ValueError naming the keyword and the valid ones, not Python's TypeError: the keywords
    # often come from the command line (examples/train.py --data-kw).
    params = inspect.signature(cls.__init__).parameters
    known = [p for p in params if p not in ("self", "root", "split")]
    unknown = sorted(set(kwargs) - set(known))
    if unknown and not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        raise ValueError(f"unknown argument {unknown[0]!r} for dataset {name!r}; {cls.__name__} "
                         f"takes {', '.join(known)}")
    return cls(root, split=split, **kwargs)


__all__ = ["CarPressure", "CarShape", "ElasticUnitCell", "Elasticity", "MultiBodyFlow",
           "ShapeNetCar", "make_scaling_cloud", "get_dataset", "DATASETS"]
