"""CarPressure: car-like bodies with the surface pressure of steady potential flow.

Each sample is a random closed car-like body (superellipse plan and sections, a cabin bump, a
narrower greenhouse), a source-panel solution of the flow along +x (``.panel``) on a coarse
triangulation, and a few thousand points sampled on the exact surface carrying the interpolated
pressure coefficient. ``make_scaling_cloud`` gives the same kind of cloud with 10^4..10^6 points
and a cheap analytic field, for speed runs.
"""
from __future__ import annotations

import math
import multiprocessing as mp
from dataclasses import astuple, dataclass
from typing import Dict, List, Tuple

import numpy as np
import torch
from torch import Tensor
from torch_geometric.data import Data
from tqdm.auto import tqdm

from . import panel
from ._cache import SPLITS, CachedSplitDataset, attach_stats, single_threaded
from .elasticity import check_int

__all__ = ["CarShape", "CarPressure", "make_scaling_cloud", "car_panel_solution"]


def _spow(x: Tensor, e: float) -> Tensor:
    """Signed power ``sign(x) |x|^e`` (superellipse coordinates)."""
    return torch.sign(x) * x.abs().pow(e)


@dataclass(frozen=True)
class CarShape:
    """Parameters of a car-like closed body; lengths in metres, flow along +x (nose at -x).

    The surface is parametrised by ``xi in [-1, 1]`` along the length and ``phi in [0, 2 pi)``
    around it. Plan/side envelope ``e(xi) = (1 - |xi|^p)^(1/p)`` (``p_front`` for xi < 0,
    ``p_rear`` behind); cross-sections are superellipses of exponent ``n_section``, reaching
    ``h_top + cabin_height * cab(xi)`` above and ``h_bottom`` below the belt line, where ``cab``
    is a smooth box between ``cabin_start`` and ``cabin_end`` (edge width ``cabin_sharpness``);
    the upper half narrows by ``cabin_narrowing * cab`` (the greenhouse).
    """

    length: float = 4.4
    width: float = 1.8
    h_bottom: float = 0.45
    h_top: float = 0.25
    p_front: float = 3.0
    p_rear: float = 4.0
    n_section: float = 4.0
    cabin_height: float = 0.45
    cabin_start: float = -0.3
    cabin_end: float = 0.5
    cabin_sharpness: float = 0.08
    cabin_narrowing: float = 0.15

    @staticmethod
    def sample(rng: np.random.Generator) -> "CarShape":
        """Random proportions within the range of passenger cars (deterministic given ``rng``)."""
        u = rng.uniform
        start = u(-0.55, -0.1)
        return CarShape(
            length=u(3.6, 5.0), width=u(1.6, 2.0), h_bottom=u(0.35, 0.55), h_top=u(0.15, 0.35),
            p_front=u(2.2, 4.0), p_rear=u(2.5, 6.0), n_section=u(2.5, 6.0),
            cabin_height=u(0.3, 0.6), cabin_start=start, cabin_end=u(start + 0.35, 0.85),
            cabin_sharpness=u(0.04, 0.12), cabin_narrowing=u(0.0, 0.3),
        )

    @staticmethod
    def sphere(radius: float = 1.0) -> "CarShape":
        """The parametrisation's sphere (used to validate the solver on the mesh cars use)."""
        return CarShape(2 * radius, 2 * radius, radius, radius, 2.0, 2.0, 2.0, 0.0, -0.5, 0.5,
                        0.1, 0.0)

    def as_tensor(self) -> Tensor:
        """The parameters as a ``[1, 12]`` float tensor (field order of the dataclass)."""
        return torch.tensor([astuple(self)], dtype=torch.float32)

    def cabin(self, xi: Tensor) -> Tensor:
        k = self.cabin_sharpness
        return torch.sigmoid((xi - self.cabin_start) / k) * torch.sigmoid((self.cabin_end - xi) / k)

    def surface(self, xi: Tensor, phi: Tensor) -> Tensor:
        """Points ``[..., 3]`` of the body at parameters ``xi``, ``phi`` (same shape)."""
        p = torch.where(xi < 0, torch.full_like(xi, self.p_front), torch.full_like(xi, self.p_rear))
        env = (1.0 - xi.abs().clamp(max=1.0).pow(p)).clamp_min(0.0).pow(1.0 / p)
        c = _spow(torch.cos(phi), 2.0 / self.n_section)
        s = _spow(torch.sin(phi), 2.0 / self.n_section)
        cab = self.cabin(xi)
        up = s.clamp_min(0.0)
        y = 0.5 * self.width * env * c * (1.0 - self.cabin_narrowing * cab * up)
        z = torch.where(s >= 0, (self.h_top + self.cabin_height * cab) * env * s,
                        self.h_bottom * env * s)
        x = 0.5 * self.length * xi
        return torch.stack([x, y, z], -1)

    def panel_mesh(self, n_length: int = 30, n_around: int = 28) -> Tuple[Tensor, Tensor, Tensor]:
        """Triangulation of the body on a structured ``(xi, phi)`` grid.

        ``xi_k = -cos(pi k / n_length)`` clusters rings at the nose and tail where curvature is
        high; the two poles are single vertices joined by triangle fans.

        Returns:
            vertices ``[V, 3]`` float64, faces ``[F, 3]`` long with outward normals,
            ``F = 2 n_around (n_length - 1)``, and the ``(xi, phi)`` parameters of each face's
            three corners ``[F, 3, 2]`` (phi unwrapped across 2 pi; poles get the mean phi of the
            face) so points can be sampled on the exact surface.
        """
        dt = torch.float64
        k = torch.arange(1, n_length, dtype=dt)
        xi_ring = -torch.cos(math.pi * k / n_length)
        phi = 2 * math.pi * torch.arange(n_around, dtype=dt) / n_around
        XI, PHI = torch.meshgrid(xi_ring, phi, indexing="ij")
        ring = self.surface(XI, PHI).reshape(-1, 3)
        poles = self.surface(torch.tensor([-1.0, 1.0], dtype=dt), torch.zeros(2, dtype=dt))
        verts = torch.cat([poles[:1], ring, poles[1:]])
        nose, tail = 0, verts.shape[0] - 1

        def vid(kk: Tensor, jj: Tensor) -> Tensor:  # kk in 0..n_length, jj wraps around
            inner = 1 + (kk - 1) * n_around + jj % n_around
            return torch.where(kk == 0, nose, torch.where(kk == n_length, tail, inner))

        K, J = torch.meshgrid(torch.arange(n_length), torch.arange(n_around), indexing="ij")
        K, J = K.reshape(-1), J.reshape(-1)
        a, b, c, d = vid(K, J), vid(K + 1, J), vid(K + 1, J + 1), vid(K, J + 1)
        faces = torch.cat([torch.stack([a, b, c], 1), torch.stack([a, c, d], 1)])
        kk = torch.cat([torch.stack([K, K + 1, K + 1], 1), torch.stack([K, K + 1, K], 1)])
        jj = torch.cat([torch.stack([J, J, J + 1], 1), torch.stack([J, J + 1, J + 1], 1)])
        # Drop the degenerate halves of the quads that touch a pole.
        good = (faces[:, 0] != faces[:, 1]) & (faces[:, 1] != faces[:, 2]) & (faces[:, 0] != faces[:, 2])
        faces, kk, jj = faces[good], kk[good], jj[good]
        xi_c = -torch.cos(math.pi * kk.to(dt) / n_length)
        phi_c = 2 * math.pi * jj.to(dt) / n_around
        pole = (kk == 0) | (kk == n_length)
        mean_phi = (phi_c * (~pole)).sum(1, keepdim=True) / (~pole).sum(1, keepdim=True)
        phi_c = torch.where(pole, mean_phi, phi_c)
        faces_o = panel.orient_outward(verts, faces)
        if faces_o is not faces:  # flipped: keep the corner parameters in the same order
            xi_c, phi_c = xi_c[:, [0, 2, 1]], phi_c[:, [0, 2, 1]]
        return verts, faces_o, torch.stack([xi_c, phi_c], -1)


def _vertex_average(values: Tensor, faces: Tensor, weights: Tensor, num_vertices: int) -> Tensor:
    """Weighted average of per-face ``values [F, C]`` onto vertices ``[V, C]``."""
    out = torch.zeros(num_vertices, values.shape[1], dtype=values.dtype)
    w = torch.zeros(num_vertices, dtype=values.dtype)
    for k in range(3):
        out.index_add_(0, faces[:, k], values * weights[:, None])
        w.index_add_(0, faces[:, k], weights)
    return out / w[:, None]


def car_panel_solution(shape: CarShape, n_length: int = 30, n_around: int = 28) -> Dict[str, Tensor]:
    """Mesh ``shape`` and solve the flow; returns the mesh, per-face ``cp [F]`` and per-vertex
    ``cp_vertex [V]`` and ``normal_vertex [V, 3]`` (area-weighted face averages)."""
    verts, faces, uv = shape.panel_mesh(n_length, n_around)
    cp, _, _ = panel.solve_source_panels(verts, faces)
    _, n, area = panel.triangle_geometry(verts[faces])
    V = verts.shape[0]
    cp_v = _vertex_average(cp[:, None], faces, area, V)[:, 0]
    n_v = _vertex_average(n, faces, area, V)
    n_v = n_v / n_v.norm(dim=-1, keepdim=True)
    return dict(vertices=verts, faces=faces, uv=uv, area=area, cp=cp, cp_vertex=cp_v,
                normal_vertex=n_v)


def sample_surface(shape: CarShape, sol: Dict[str, Tensor], num_points: int,
                   generator: torch.Generator) -> Tuple[Tensor, Tensor, Tensor]:
    """``num_points`` points, area-uniform over the panels, lifted onto the exact surface.

    Returns positions ``[N, 3]``, unit normals ``[N, 3]`` and ``cp [N]``, the latter two
    interpolated barycentrically from the panel mesh's vertex values.
    """
    faces, area = sol["faces"], sol["area"]
    f = torch.multinomial(area, num_points, replacement=True, generator=generator)
    r = torch.rand(num_points, 2, dtype=torch.float64, generator=generator)
    s = r[:, 0].sqrt()
    bary = torch.stack([1 - s, s * (1 - r[:, 1]), s * r[:, 1]], 1)          # [N, 3]
    uv = (bary[:, :, None] * sol["uv"][f]).sum(1)                           # [N, 2]
    pos = shape.surface(uv[:, 0], uv[:, 1])
    fv = faces[f]                                                           # [N, 3]
    normal = (bary[:, :, None] * sol["normal_vertex"][fv]).sum(1)
    normal = normal / normal.norm(dim=-1, keepdim=True)
    cp = (bary * sol["cp_vertex"][fv]).sum(1)
    return pos, normal, cp


class CarPressure(CachedSplitDataset):
    r"""Generated car-like bodies with the surface pressure of steady potential flow.

    Physics: incompressible, inviscid, irrotational flow with free stream ``U = (1, 0, 0)``
    around the closed body (no ground, no wake); the body is a random ``CarShape``, the flow a
    constant-strength source-panel solution on ``2 * n_around * (n_length - 1)`` triangles
    (exact panel integrals, centroid collocation, see ``.panel``), and the target the pressure
    coefficient ``Cp = 1 - |V|^2 / |U|^2`` interpolated at ``num_points`` points sampled
    area-uniformly on the exact surface.

    Every sample is deterministic given ``(seed, split, index)``: the test samples do not change
    when ``num_train`` does. Both splits are generated on first use and cached under
    ``root/processed/car_pressure-<hash>/``; the hash covers every argument and the generator's
    source code.

    Args:
        root: cache folder.
        split: ``"train"`` or ``"test"``.
        num_train / num_test: number of cars per split.
        num_points: points per car (ShapeNet-Car has 3,586).
        n_length / n_around: panel grid (rings along the body, points around each ring).
        seed: base seed.
        num_workers: processes that generate cars in parallel when the cache is built (0: in this
            process). Each car is generated single-threaded from its own seed either way, so the
            data (and the cache key) do not depend on it.

    Each sample is a ``Data`` with

    * ``pos [N, 3]``: surface points (metres, nose towards -x);
    * ``x [N, 3]``: outward unit normals;
    * ``y [N, 1]``: normalised ``Cp``: ``(Cp - y_mean) / y_std`` with the train split's statistics
      (also ``dataset.y_mean``, ``dataset.y_std``);
    * ``y_mean``, ``y_std`` ``[1]`` and ``shape_params [1, 12]`` (``CarShape`` fields).
    """

    cache_name = "car_pressure"
    target_label = "pressure coefficient Cp (dimensionless)"  # colour-bar label of the plots
    cache_sources = (panel,)  # with this module: any edit to the generator re-generates

    def __init__(self, root: str, split: str = "train", num_train: int = 64, num_test: int = 16,
                 num_points: int = 3586, n_length: int = 30, n_around: int = 28, seed: int = 0,
                 num_workers: int = 0, transform=None, pre_transform=None, pre_filter=None, log: bool = True,
                 force_reload: bool = False) -> None:
        for name, value, low in (("num_train", num_train, 1), ("num_test", num_test, 1),
                                 ("num_points", num_points, 1), ("n_length", n_length, 3),
                                 ("n_around", n_around, 3), ("seed", seed, 0),  # NumPy seeds are >= 0
                                 ("num_workers", num_workers, 0)):
            check_int(name, value, low)
        self.num_train, self.num_test, self.num_points = num_train, num_test, num_points
        self.n_length, self.n_around, self.seed = n_length, n_around, seed
        self.num_workers = int(num_workers)
        super().__init__(root, split, transform, pre_transform, pre_filter, log, force_reload)

    def cache_config(self) -> Dict:
        return dict(num_train=self.num_train, num_test=self.num_test, num_points=self.num_points,
                    n_length=self.n_length, n_around=self.n_around, seed=self.seed)

    def generate(self, split: str, index: int) -> Data:
        """One car: deterministic in ``(seed, split, index)``; ``y`` holds the raw ``Cp``."""
        return _generate_car((self.seed, self.n_length, self.n_around, self.num_points, split, index))

    def build(self) -> Dict[str, List[Data]]:
        jobs = [(self.seed, self.n_length, self.n_around, self.num_points, split, i)
                for split, n in zip(SPLITS, (self.num_train, self.num_test)) for i in range(n)]
        bar = dict(total=len(jobs), desc="CarPressure", disable=not self.log)
        workers = min(self.num_workers, len(jobs))
        if workers > 1:
            # fork: the workers need nothing but this module; each runs torch on one thread
            ctx = mp.get_context("fork" if "fork" in mp.get_all_start_methods() else "spawn")
            with ctx.Pool(workers, initializer=torch.set_num_threads, initargs=(1,)) as pool:
                cars = list(tqdm(pool.imap(_generate_car, jobs, chunksize=1), **bar))
        else:
            cars = [_generate_car(j) for j in tqdm(jobs, **bar)]
        out = {"train": cars[:self.num_train], "test": cars[self.num_train:]}
        y = torch.cat([d.y for d in out["train"]])
        mean, std = float(y.mean()), (float(y.std()) if y.numel() > 1 else 1.0)
        for split in SPLITS:
            attach_stats(out[split], mean, std)
        return out


def _generate_car(job: Tuple[int, int, int, int, str, int]) -> Data:
    # module level (picklable) so that CarPressure.build can map it over worker processes
    seed, n_length, n_around, num_points, split, index = job
    rng = np.random.default_rng([seed, SPLITS.index(split), index])
    shape = CarShape.sample(rng)
    sol = car_panel_solution(shape, n_length, n_around)
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    pos, normal, cp = sample_surface(shape, sol, num_points, gen)
    return Data(x=normal.float(), pos=pos.float(), y=cp.float()[:, None], shape_params=shape.as_tensor())


def _ellipsoid_surface_speedup(a: float, b: float, c: float) -> float:
    """Surface speed factor ``C`` for potential flow along the ``a`` axis of an ellipsoid: the
    surface velocity is ``C`` times the tangential part of ``U`` (``C = 3/2`` for a sphere)."""
    from scipy.integrate import quad

    def integrand(lam: float) -> float:
        return 1.0 / ((a * a + lam) * math.sqrt((a * a + lam) * (b * b + lam) * (c * c + lam)))

    alpha0 = a * b * c * quad(integrand, 0.0, math.inf, limit=200)[0]
    return 2.0 / (2.0 - alpha0)


def make_scaling_cloud(num_points: int, seed: int = 0, mesh_resolution: int = 256) -> Data:
    """A large car-surface cloud for speed runs (10^4..10^6 points, about a second at 10^6).

    Runs single-threaded (see ``._cache.single_threaded``): the same ``seed`` gives the same
    cloud on every machine.

    Points are sampled area-uniformly on a fine triangulation of a random ``CarShape``
    (drawn from ``seed``) and lifted onto the exact surface. The field is cheap and analytic: the
    potential-flow ``Cp`` of the car's bounding ellipsoid transplanted onto the car's normals,
    ``Cp = 1 - C^2 (1 - n_x^2)`` (exact for an ellipsoid, a plausible field elsewhere); it is
    *not* the panel solution, so use ``CarPressure`` for accuracy studies.

    Returns:
        ``Data(x=[N, 3] normals, pos=[N, 3], y=[N, 1] Cp)`` in float32.
    """
    check_int("num_points", num_points)
    check_int("seed", seed, 0)  # NumPy seeds are >= 0
    check_int("mesh_resolution", mesh_resolution, 3)
    with single_threaded():
        return _scaling_cloud(num_points, seed, mesh_resolution)


def _scaling_cloud(num_points: int, seed: int, mesh_resolution: int) -> Data:
    rng = np.random.default_rng([seed, 7])
    shape = CarShape.sample(rng)
    verts, faces, uv = shape.panel_mesh(mesh_resolution, mesh_resolution)
    _, n, area = panel.triangle_geometry(verts[faces])
    n_v = _vertex_average(n, faces, area, verts.shape[0])
    n_v = n_v / n_v.norm(dim=-1, keepdim=True)
    sol = dict(faces=faces, area=area, uv=uv, normal_vertex=n_v,
               cp_vertex=torch.zeros(verts.shape[0], dtype=torch.float64))
    gen = torch.Generator().manual_seed(int(rng.integers(2 ** 62)))
    pos, normal, _ = sample_surface(shape, sol, num_points, gen)
    C = _ellipsoid_surface_speedup(0.5 * shape.length, 0.5 * shape.width,
                                   0.5 * (shape.h_bottom + shape.h_top + shape.cabin_height))
    cp = 1.0 - C * C * (1.0 - normal[:, 0] ** 2)
    return Data(x=normal.float(), pos=pos.float(), y=cp.float()[:, None])
