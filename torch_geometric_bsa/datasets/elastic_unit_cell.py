"""ElasticUnitCell: perforated unit cells under uniaxial tension, von Mises stress at the nodes.

A generated stand-in for Geo-FNO's Elasticity benchmark (``.Elasticity``): the unit square
with random circular/elliptic voids, plane-stress linear elasticity solved with scikit-fem on our
own graded mesh (``.elastic_fem``), target the von Mises stress over the applied traction.
"""
from __future__ import annotations

import math
import numbers
from typing import Dict, List

import numpy as np
import torch
from torch_geometric.data import Data
from tqdm.auto import tqdm

from . import elastic_fem
from ._cache import SPLITS, CachedSplitDataset, attach_stats
from .elastic_fem import Ellipse, mesh_perforated_square, solve_uniaxial_tension, von_mises
from .elasticity import check_int

__all__ = ["ElasticUnitCell", "sample_voids"]


def sample_voids(rng: np.random.Generator, max_voids: int = 3, radius=(0.08, 0.2),
                 gap: float = 0.05, max_tries: int = 500) -> List[Ellipse]:
    """1..``max_voids`` non-overlapping voids in the unit square.

    Each void is a circle (probability 1/2) or an ellipse with axis ratio in [0.4, 0.9] and random
    orientation; its semi-major axis is uniform in ``radius``. Bounding circles keep ``gap``
    from each other and from the sides, so the mesher always has room for a few elements between.
    """
    n = int(rng.integers(1, max_voids + 1))
    voids: List[Ellipse] = []
    for _ in range(max_tries):
        if len(voids) == n:
            break
        a = float(rng.uniform(*radius))
        if rng.random() < 0.5:
            b, angle = a, 0.0
        else:
            b, angle = a * float(rng.uniform(0.4, 0.9)), float(rng.uniform(0.0, np.pi))
        cx, cy = rng.uniform(a + gap, 1.0 - a - gap, size=2)
        if all(np.hypot(cx - v.cx, cy - v.cy) > a + v.a + gap for v in voids):
            voids.append(Ellipse(float(cx), float(cy), a, b, angle))
    return voids


class ElasticUnitCell(CachedSplitDataset):
    r"""Generated 2D elastic unit cells with random voids and their von Mises stress.

    Physics: the unit square with 1..``max_voids`` circular/elliptic holes, isotropic linear
    elasticity in plane stress (``nu = 0.3``), uniaxial tension: unit traction on the right side,
    ``u_x = 0`` on the left side (a symmetry plane), traction-free voids. Solved with quadratic
    triangles (scikit-fem) on a mesh graded from ``h_min`` (finer at sharp ellipse tips) on the
    voids to ``h_max`` away from them; the target is the von Mises stress divided by the applied
    traction (dimensionless, independent of Young's modulus) at the mesh vertices. Validated
    against Kirsch's stress concentration factor of 3 (see ``docs/datasets.md``).

    Samples are deterministic in ``(seed, split, index)``; both splits are generated on first use
    and cached under ``root/processed/elastic_unit_cell-<hash>/``.

    Each sample is a ``Data`` with

    * ``pos [N, 2]`` mesh vertices in the unit square (N varies, ~1,000-1,500 by default);
    * ``x [N, 2]`` the same coordinates (Geo-FNO's Elasticity input is the point coordinates too);
    * ``y [N, 1]`` normalised von Mises stress ``(s_vm - y_mean) / y_std`` (train statistics);
    * ``face [3, T]`` the triangles (for plotting / mesh models), ``on_void [N]`` bool,
      ``voids [1, max_voids, 5]`` (cx, cy, a, b, angle; zero rows for absent voids),
      ``y_mean``, ``y_std`` ``[1]``.
    """

    cache_name = "elastic_unit_cell"
    target_label = "von Mises stress / applied traction (dimensionless)"
    cache_sources = (elastic_fem,)  # with this module: any edit to the generator re-generates

    def __init__(self, root: str, split: str = "train", num_train: int = 128, num_test: int = 32,
                 max_voids: int = 3, h_min: float = 0.012, h_max: float = 0.04,
                 arc_points: int = 48, seed: int = 0, transform=None, pre_transform=None,
                 pre_filter=None, log: bool = True, force_reload: bool = False) -> None:
        for name, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1),
                                 ("max_voids", max_voids, 1), ("arc_points", arc_points, 1),
                                 ("seed", seed, 0)):  # NumPy seeds are >= 0
            check_int(name, value, low)
        for name, value in (("h_min", h_min), ("h_max", h_max)):
            # the mesher would fail on inf/NaN deep inside NumPy, naming no argument
            if (isinstance(value, bool) or not isinstance(value, numbers.Real)
                    or not math.isfinite(value) or value <= 0):
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        if h_min > h_max:
            raise ValueError(f"h_min must be <= h_max, got h_min={h_min}, h_max={h_max}")
        self.num_train, self.num_test, self.max_voids = num_train, num_test, max_voids
        self.h_min, self.h_max, self.arc_points, self.seed = h_min, h_max, arc_points, seed
        super().__init__(root, split, transform, pre_transform, pre_filter, log, force_reload)

    def cache_config(self) -> Dict:
        return dict(num_train=self.num_train, num_test=self.num_test, max_voids=self.max_voids,
                    h_min=self.h_min, h_max=self.h_max, arc_points=self.arc_points,
                    seed=self.seed)

    def generate(self, split: str, index: int) -> Data:
        """One cell: deterministic in ``(seed, split, index)``; ``y`` holds the raw stress."""
        rng = np.random.default_rng([self.seed, SPLITS.index(split), index])
        voids = sample_voids(rng, self.max_voids)
        mesh = mesh_perforated_square(voids, h_min=self.h_min, h_max=self.h_max,
                                      arc_points=self.arc_points)
        stress = solve_uniaxial_tension(mesh)
        vm = von_mises(stress[:, 0], stress[:, 1], stress[:, 2])
        params = torch.zeros(1, self.max_voids, 5)
        for i, v in enumerate(voids):
            params[0, i] = torch.tensor([v.cx, v.cy, v.a, v.b, v.angle])
        pos = torch.from_numpy(mesh.points).float()
        return Data(x=pos.clone(), pos=pos, y=torch.from_numpy(vm).float()[:, None],
                    face=torch.from_numpy(mesh.triangles.T.copy()).long(),
                    on_void=torch.from_numpy(mesh.on_void), voids=params)

    def build(self) -> Dict[str, List[Data]]:
        out = {}
        for split, n in zip(SPLITS, (self.num_train, self.num_test)):
            out[split] = [self.generate(split, i) for i in
                          tqdm(range(n), desc=f"ElasticUnitCell {split}", disable=not self.log)]
        y = torch.cat([d.y for d in out["train"]])
        attach_stats(out["train"] + out["test"], float(y.mean()), float(y.std()))
        return out
