"""ShapeNet-Car (Umetani & Bickel 2018) in the preprocessed layout of the UPT / Erwin code.

BSA's paper trains on this dataset: 889 cars, 3,586 surface points each, surface pressure from
RANS simulations. We read the folders the UPT preprocessing script writes and reproduce its fixed
700/189 train/test split.
"""
from __future__ import annotations

import os
import os.path as osp
import pickle
from typing import Dict, List

import numpy as np
import torch
from torch_geometric.data import Data
from tqdm.auto import tqdm

from ..io import UnsafeFileError
from ._cache import CachedSplitDataset, attach_stats
from .elasticity import check_int

__all__ = ["ShapeNetCar"]


def _load_array(folder: str, names, what: str, shape, car: str) -> np.ndarray:
    """Load the first existing file of ``names`` in ``folder`` and check its shape (a trailing
    singleton dimension is tolerated)."""
    for name in names:
        path = osp.join(folder, name)
        if osp.exists(path):
            try:  # neither loader runs code from the file: weights_only, and no pickles in .npy
                if name.endswith(".th"):
                    arr = torch.load(path, map_location="cpu", weights_only=True)
                    arr = arr.numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
                else:
                    arr = np.load(path, allow_pickle=False)
            except pickle.UnpicklingError as e:
                raise UnsafeFileError(f"ShapeNetCar: {path}: refused: it asks to build objects other than "
                                      f"tensors, which could run code ({str(e).splitlines()[0][:200]})") from None
            except ValueError as e:
                if "allow_pickle" not in str(e):
                    raise
                raise UnsafeFileError(f"ShapeNetCar: {path}: refused: an object array (a pickle) where "
                                      "numbers were expected") from None
            got = tuple(arr.shape)
            if got != tuple(shape) and got != tuple(shape) + (1,):
                raise ValueError(
                    f"ShapeNetCar: {path} should hold {what} of shape {list(shape)}, "
                    f"found shape {list(got)} (car {car}).")
            if arr.dtype.kind not in "iuf":
                raise ValueError(f"ShapeNetCar: {path} should hold real numbers, found dtype "
                                 f"{arr.dtype} (car {car}).")
            # NaN/Inf would otherwise reach training silently. Checked as float32, what training
            # sees: float64 values beyond its range become Inf (no overflow warning, the error
            # below says it).
            with np.errstate(over="ignore"):
                arr = arr.reshape(shape).astype(np.float32)
            bad = int(np.count_nonzero(~np.isfinite(arr)))
            if bad:
                raise ValueError(f"ShapeNetCar: {path} contains {bad} NaN/Inf values in its "
                                 f"{what} (car {car}).")
            return arr
    raise FileNotFoundError(
        f"ShapeNetCar: expected {what} in {osp.join(folder, names[0])} (or {names[1]}), "
        f"found neither (car {car}).")


class ShapeNetCar(CachedSplitDataset):
    r"""The ShapeNet-Car pressure dataset, as preprocessed by UPT and used by Erwin and BSA.

    Expected layout (what ``src/analysis/data/shapenetcar/preprocess.py`` of ml-jku/UPT writes
    from Umetani's ``mlcfd_data``)::

        root/param0/<car id>/mesh_points.th   float [3586, 3]  surface points
        root/param0/<car id>/pressure.th      float [3586]     surface pressure
        ...
        root/param8/<car id>/...

    ``.th`` files are ``torch.save``'d tensors; ``mesh_points.npy`` / ``pressure.npy`` NumPy files
    are accepted instead. Other files in a car folder (e.g. ``sdf_res*.th``) are ignored.

    Cars are ordered as the UPT/Erwin loaders do (``param0..param8``, car folders sorted by name)
    and split by ``torch.randperm(889, generator=torch.Generator().manual_seed(0))[:189]``: those
    189 indices are the test split (taken in ascending order here; UPT iterates a Python set),
    the remaining 700 the train split. Pressure is normalised with UPT's train statistics
    ``(p + 36.3099) / 48.5743``.

    Args:
        root: the folder holding ``param0`` .. ``param8``; processed files go to
            ``root/processed/``.
        split: ``"train"`` or ``"test"``.
        num_points, num_cars, num_test, split_seed: the layout's constants (3586, 889, 189, 0);
            change them only for reduced copies of the data (e.g. tests).

    Each sample is a ``Data`` with ``pos [3586, 3]`` (raw coordinates,
    the car's length along z), ``x [3586, 3]`` (a copy of ``pos``: the dataset has no other
    per-point input; models embed it as they like), ``y [3586, 1]`` normalised pressure,
    ``y_mean``/``y_std`` ``[1]`` and ``car_id`` ``[1]`` (position in the 889-car order).
    """

    cache_name = "shapenet_car"
    target_label = "surface pressure (units of pressure.th)"
    NUM_CARS, NUM_TEST, NUM_POINTS = 889, 189, 3586
    PRESSURE_MEAN, PRESSURE_STD = -36.3099, 48.5743
    POINT_FILES = ("mesh_points.th", "mesh_points.npy")
    PRESSURE_FILES = ("pressure.th", "pressure.npy")

    def __init__(self, root: str, split: str = "train", num_points: int = NUM_POINTS,
                 num_cars: int = NUM_CARS, num_test: int = NUM_TEST, split_seed: int = 0,
                 transform=None, pre_transform=None, pre_filter=None, log: bool = True,
                 force_reload: bool = False) -> None:
        check_int("num_points", num_points)
        check_int("num_cars", num_cars, 2)
        check_int("num_test", num_test)
        if num_test >= num_cars:  # the train split would be empty
            raise ValueError(f"num_test must be < num_cars, got num_test={num_test}, "
                             f"num_cars={num_cars}")
        check_int("split_seed", split_seed, None)
        self.num_points, self.num_cars = num_points, num_cars
        self.num_test, self.split_seed = num_test, split_seed
        super().__init__(root, split, transform, pre_transform, pre_filter, log, force_reload)

    @property
    def raw_dir(self) -> str:
        return self.root

    @property
    def raw_file_names(self) -> List[str]:
        return [f"param{i}" for i in range(9)]

    def download(self) -> None:
        missing = [p for p in self.raw_paths if not osp.isdir(p)]
        raise FileNotFoundError(
            f"ShapeNetCar: expected the preprocessed ShapeNet-Car layout in {self.root}: folders "
            f"param0 .. param8, each with one folder per car holding mesh_points.th "
            f"[{self.num_points}, 3] and pressure.th [{self.num_points}] (or .npy). Missing: "
            f"{', '.join(missing)}. See docs/datasets.md for how to produce them.")

    def cache_config(self) -> Dict:
        return dict(num_points=self.num_points, num_cars=self.num_cars, num_test=self.num_test,
                    split_seed=self.split_seed, mean=self.PRESSURE_MEAN, std=self.PRESSURE_STD)

    def car_folders(self) -> List[str]:
        """Car folders in the UPT/Erwin order: param0..param8, names sorted within each."""
        out = []
        for p in self.raw_paths:
            out += [osp.join(p, n) for n in sorted(os.listdir(p)) if osp.isdir(osp.join(p, n))]
        return out

    @staticmethod
    def test_indices(num_cars: int = NUM_CARS, num_test: int = NUM_TEST, seed: int = 0) -> torch.Tensor:
        """Sorted test-split indices into ``car_folders``: UPT's seeded permutation
        ``torch.randperm(num_cars, generator=torch.Generator().manual_seed(seed))[:num_test]``."""
        g = torch.Generator().manual_seed(seed)
        return torch.randperm(num_cars, generator=g)[:num_test].sort().values

    def build(self) -> Dict[str, List[Data]]:
        folders = self.car_folders()
        if len(folders) != self.num_cars:
            raise ValueError(
                f"ShapeNetCar: found {len(folders)} car folders under {self.root}/param0..param8, "
                f"expected {self.num_cars}.")
        is_test = torch.zeros(self.num_cars, dtype=torch.bool)
        is_test[self.test_indices(self.num_cars, self.num_test, self.split_seed)] = True
        out: Dict[str, List[Data]] = {"train": [], "test": []}
        for i, folder in enumerate(tqdm(folders, desc="ShapeNetCar", disable=not self.log)):
            car = osp.relpath(folder, self.root)
            pos = _load_array(folder, self.POINT_FILES, "surface points", (self.num_points, 3), car)
            p = _load_array(folder, self.PRESSURE_FILES, "surface pressure", (self.num_points,), car)
            pos_t = torch.from_numpy(pos)
            data = Data(x=pos_t.clone(), pos=pos_t, y=torch.from_numpy(p)[:, None],
                        car_id=torch.tensor([i]))
            out["test" if is_test[i] else "train"].append(data)
        attach_stats(out["train"] + out["test"], self.PRESSURE_MEAN, self.PRESSURE_STD)
        return out
