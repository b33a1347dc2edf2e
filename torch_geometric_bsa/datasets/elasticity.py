"""Geo-FNO's Elasticity benchmark (Li et al. 2022), read from its ``.npy`` files.

Point clouds of 972 nodes on unit cells with one irregular void, target the stress field; the
standard protocol trains on the first 1000 samples and tests on the last 200.
"""
from __future__ import annotations

import numbers
import os.path as osp
from typing import Dict, List, Optional

import numpy as np
import torch
from torch_geometric.data import Data

from ._cache import CachedSplitDataset, attach_stats

__all__ = ["Elasticity"]


def check_int(name: str, value, minimum: Optional[int] = 1) -> None:
    """Raise a ValueError naming ``name`` unless ``value`` is an int >= ``minimum`` (any int if
    ``None``). NumPy ints pass; bools do not: ``num_test=True`` is a slip, not 1."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or (minimum is not None and value < minimum)):
        bound = "" if minimum is None else f" >= {minimum}"
        raise ValueError(f"{name} must be an int{bound}, got {value!r}")


def _check_finite(path: str, arr: np.ndarray, what: str, samples: np.ndarray) -> None:
    """Raise a ValueError naming ``path`` if ``arr`` (samples on the last axis, ``samples`` their
    indices in the file) holds NaN/Inf, which would otherwise reach training silently."""
    bad = ~np.isfinite(arr)
    n = int(np.count_nonzero(bad))
    if n:
        first = int(samples[bad.reshape(-1, bad.shape[-1]).any(0).argmax()])
        raise ValueError(f"Elasticity: {path} contains {n} NaN/Inf values in the {what} of the "
                         f"samples read (first in sample {first}).")


class Elasticity(CachedSplitDataset):
    r"""Geo-FNO's Elasticity point-cloud dataset.

    Expected files (the Geo-FNO release, usually in ``elasticity/Meshes/``)::

        root/Random_UnitCell_XY_10.npy      [972, 2, S]  node coordinates per sample
        root/Random_UnitCell_sigma_10.npy   [972, S]     stress per node and sample

    or the same two files in ``root/Meshes/``; S = 2000 in the release. As in Geo-FNO and
    Transolver, the first ``num_train`` samples (1000) are the train split and the last
    ``num_test`` (200) the test split. Other files of the release (``Random_UnitCell_rr_10.npy``,
    ...) are not needed.

    Args:
        root: folder with the files (or with ``Meshes/``); processed files go to
            ``root/processed/``.
        split: ``"train"`` or ``"test"``.
        num_train, num_test, num_points: 1000, 200, 972 for the release; smaller values read
            reduced copies (tests).

    Each sample is a ``Data`` with ``pos [972, 2]``, ``x [972, 2]``
    (a copy of ``pos``, the benchmark's input), ``y [972, 1]`` stress normalised with the train
    split's scalar mean/std, and ``y_mean``/``y_std`` ``[1]``.
    """

    cache_name = "elasticity"
    target_label = "stress (units of the .npy file)"
    XY_FILE = "Random_UnitCell_XY_10.npy"
    SIGMA_FILE = "Random_UnitCell_sigma_10.npy"

    def __init__(self, root: str, split: str = "train", num_train: int = 1000,
                 num_test: int = 200, num_points: int = 972, transform=None, pre_transform=None,
                 pre_filter=None, log: bool = True, force_reload: bool = False) -> None:
        for name, value in (("num_train", num_train), ("num_test", num_test),
                            ("num_points", num_points)):
            check_int(name, value)
        self.num_train, self.num_test, self.num_points = num_train, num_test, num_points
        super().__init__(root, split, transform, pre_transform, pre_filter, log, force_reload)

    @property
    def raw_dir(self) -> str:
        meshes = osp.join(self.root, "Meshes")
        if all(osp.exists(osp.join(meshes, f)) for f in (self.XY_FILE, self.SIGMA_FILE)):
            return meshes
        return self.root

    @property
    def raw_file_names(self) -> List[str]:
        return [self.XY_FILE, self.SIGMA_FILE]

    def download(self) -> None:
        missing = [f for f in self.raw_file_names if not osp.exists(osp.join(self.raw_dir, f))]
        raise FileNotFoundError(
            f"Elasticity: expected Geo-FNO's {self.XY_FILE} [{self.num_points}, 2, S] and "
            f"{self.SIGMA_FILE} [{self.num_points}, S] in {self.root} or "
            f"{osp.join(self.root, 'Meshes')}; missing: {', '.join(missing)}.")

    def cache_config(self) -> Dict:
        return dict(num_train=self.num_train, num_test=self.num_test, num_points=self.num_points)

    def build(self) -> Dict[str, List[Data]]:
        xy_path, s_path = self.raw_paths
        xy = np.load(xy_path, mmap_mode="r", allow_pickle=False)
        sigma = np.load(s_path, mmap_mode="r", allow_pickle=False)
        need = self.num_train + self.num_test
        if xy.ndim != 3 or xy.shape[:2] != (self.num_points, 2) or xy.shape[2] < need:
            raise ValueError(
                f"Elasticity: {xy_path} should have shape [{self.num_points}, 2, S] with "
                f"S >= num_train + num_test = {need}, found shape {list(xy.shape)}.")
        if sigma.shape != (self.num_points, xy.shape[2]):
            raise ValueError(
                f"Elasticity: {s_path} should have shape [{self.num_points}, {xy.shape[2]}] "
                f"(matching {self.XY_FILE}), found shape {list(sigma.shape)}.")
        for path, arr in ((xy_path, xy), (s_path, sigma)):
            if arr.dtype.kind not in "iuf":
                raise ValueError(f"Elasticity: {path} should hold real numbers, found dtype "
                                 f"{arr.dtype}.")
        S = xy.shape[2]
        # Only the samples the splits read are checked: the release's middle samples are unused.
        used = np.r_[0:self.num_train, S - self.num_test:S]
        # Checked as float32, what training sees: float64 values beyond its range become Inf (no
        # overflow warning, the error says it).
        with np.errstate(over="ignore"):
            xy_u = np.asarray(xy[:, :, used], dtype=np.float32)
            s_u = np.asarray(sigma[:, used], dtype=np.float32)
        _check_finite(xy_path, xy_u, "node coordinates", used)
        _check_finite(s_path, s_u, "stress", used)
        xy_t = torch.from_numpy(np.ascontiguousarray(np.transpose(xy_u, (2, 0, 1))))
        s_t = torch.from_numpy(np.ascontiguousarray(np.transpose(s_u)))
        ranges = {"train": range(self.num_train),  # rows of xy_t / s_t, i.e. positions in used
                  "test": range(self.num_train, self.num_train + self.num_test)}
        out = {split: [Data(x=xy_t[i].clone(), pos=xy_t[i], y=s_t[i][:, None]) for i in r]
               for split, r in ranges.items()}
        y = torch.cat([d.y for d in out["train"]])
        attach_stats(out["train"] + out["test"], float(y.mean()),
                     float(y.std()) if y.numel() > 1 else 1.0)
        return out
