"""Steady potential flow around a closed body: a 3D constant-strength source panel method.

Hess–Smith style: the body surface is a closed triangle mesh, every triangle carries a constant
source density, collocation points sit at the triangle centroids, and the induced velocities are the
*exact* integrals over each flat triangle (edge log terms + solid angle), so no near-field
quadrature tuning is needed. Used by ``CarPressure`` and
validated against the analytic sphere solution ``Cp = 1 - 9/4 sin^2(theta)``.
"""
from __future__ import annotations

import math
from typing import Tuple

import numpy as np
import torch
from torch import Tensor

from ._cache import single_threaded

__all__ = [
    "icosphere",
    "orient_outward",
    "triangle_geometry",
    "source_panel_velocity",
    "solve_source_panels",
    "sphere_cp_exact",
]


def icosphere(subdivisions: int = 3) -> Tuple[np.ndarray, np.ndarray]:
    """Unit sphere as a subdivided icosahedron.

    Returns:
        vertices ``[V, 3]`` (float64, on the unit sphere) and faces ``[F, 3]`` (int64, counter-
        clockwise seen from outside), ``F = 20 * 4**subdivisions``.
    """
    t = (1.0 + 5.0 ** 0.5) / 2.0
    verts = np.array([
        [-1, t, 0], [1, t, 0], [-1, -t, 0], [1, -t, 0],
        [0, -1, t], [0, 1, t], [0, -1, -t], [0, 1, -t],
        [t, 0, -1], [t, 0, 1], [-t, 0, -1], [-t, 0, 1],
    ], dtype=np.float64)
    faces = np.array([
        [0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
        [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
        [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
        [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1],
    ], dtype=np.int64)
    verts /= np.linalg.norm(verts, axis=1, keepdims=True)
    for _ in range(subdivisions):
        # Midpoints of all edges, deduplicated by their (sorted) vertex pair.
        e = np.concatenate([faces[:, [0, 1]], faces[:, [1, 2]], faces[:, [2, 0]]])
        key = np.sort(e, axis=1)
        uniq, inv = np.unique(key, axis=0, return_inverse=True)
        mid = verts[uniq[:, 0]] + verts[uniq[:, 1]]
        mid /= np.linalg.norm(mid, axis=1, keepdims=True)
        m = inv.reshape(3, -1) + len(verts)  # m[0]: edge 01, m[1]: edge 12, m[2]: edge 20
        a, b, c = faces.T
        faces = np.concatenate([
            np.stack([a, m[0], m[2]], 1), np.stack([b, m[1], m[0]], 1),
            np.stack([c, m[2], m[1]], 1), np.stack([m[0], m[1], m[2]], 1),
        ])
        verts = np.concatenate([verts, mid])
    return verts, faces


def triangle_geometry(tri: Tensor) -> Tuple[Tensor, Tensor, Tensor]:
    """Centroids ``[F, 3]``, unit normals ``[F, 3]`` (right-hand rule) and areas ``[F]`` of
    triangles ``tri [F, 3, 3]``."""
    cross = torch.linalg.cross(tri[:, 1] - tri[:, 0], tri[:, 2] - tri[:, 0], dim=-1)
    norm = cross.norm(dim=-1)
    return tri.mean(1), cross / norm.clamp_min(1e-300)[:, None], 0.5 * norm


def source_panel_velocity(x: Tensor, tri: Tensor, self_index: Tensor | None = None) -> Tensor:
    """Velocity induced at points ``x [M, 3]`` by unit source density on flat triangles.

    ``v(x) = 1/(4 pi) * int_T (x - y) / |x - y|^3 dS_y``, evaluated exactly: the component along
    the panel normal is ``Omega / (4 pi)`` (signed solid angle, Van Oosterom & Strackee 1983) and
    the in-plane part follows from the 2D gradient theorem as a sum over the edges of
    ``nu_e * ln((r_a + r_b + L) / (r_a + r_b - L))`` (``nu_e`` the outward in-plane edge normal).

    Args:
        x: ``[M, 3]`` evaluation points.
        tri: ``[N, 3, 3]`` triangles, counter-clockwise seen from the side the normal points to.
        self_index: optional ``[M]`` long tensor; where ``self_index[i] = j >= 0`` the point lies
            on triangle ``j`` and the limit from the normal's side is taken (``Omega = 2 pi``, i.e.
            normal velocity ``+1/2``), which the formula alone cannot decide at ``h = 0``.

    Returns:
        ``[M, N, 3]`` velocities per unit source density.
    """
    _, n, _ = triangle_geometry(tri)
    # Everything below works on [M, N] planes, one per vertex and coordinate: torch is several
    # times faster on those than on tensors whose innermost dimension is a 3-vector.
    R = [[tri[None, :, k, d] - x[:, None, d] for d in range(3)] for k in range(3)]  # vertex - x
    r = [torch.sqrt(Rk[0] * Rk[0] + Rk[1] * Rk[1] + Rk[2] * Rk[2]) for Rk in R]

    def dot(a, b):
        return a[0] * b[0] + a[1] * b[1] + a[2] * b[2]

    (x0, y0, z0), (x1, y1, z1), (x2, y2, z2) = R
    num = x0 * (y1 * z2 - z1 * y2) + y0 * (z1 * x2 - x1 * z2) + z0 * (x1 * y2 - y1 * x2)
    den = (r[0] * r[1] * r[2] + dot(R[0], R[1]) * r[2] + dot(R[1], R[2]) * r[0]
           + dot(R[2], R[0]) * r[1])
    # Vertices are counter-clockwise about n and R points from x to the vertices, so num < 0
    # when x is on the +n side: the minus sign makes Omega > 0 there.
    omega = -2.0 * torch.atan2(num, den)                      # [M, N]
    if self_index is not None:
        rows = torch.nonzero(self_index >= 0).flatten()
        omega[rows, self_index[rows]] = 2.0 * math.pi

    edge = tri.roll(-1, dims=1) - tri                        # [N, 3, 3], edge k: v_k -> v_{k+1}
    L = edge.norm(dim=-1)                                    # [N, 3]
    nu = torch.linalg.cross(edge, n[:, None, :].expand_as(edge), dim=-1) / L[..., None]
    tiny = 1e-12 * float(L.max())
    v = [omega * n[None, :, d] for d in range(3)]
    for k in range(3):
        s = r[k] + r[(k + 1) % 3]
        # s - L >= 0 by the triangle inequality and is 0 only on the edge itself; the clamp keeps
        # a point sitting exactly on an edge finite (its true value is a log singularity).
        log = torch.log((s + L[None, :, k]) / (s - L[None, :, k]).clamp_min(tiny))
        for d in range(3):
            v[d] = v[d] + log * nu[None, :, k, d]
    return torch.stack(v, -1) / (4.0 * math.pi)


def solve_source_panels(
    vertices: Tensor,
    faces: Tensor,
    u_inf: Tuple[float, float, float] = (1.0, 0.0, 0.0),
    chunk: int = 512,
) -> Tuple[Tensor, Tensor, Tensor]:
    """Potential flow around a closed triangulated body.

    Solves the Neumann condition ``n_i . (U + sum_j sigma_j v_ij) = 0`` at every panel centroid
    (dense ``[F, F]`` system) and returns the surface velocity and pressure coefficient
    ``Cp = 1 - |V|^2 / |U|^2`` at the centroids.

    Args:
        vertices: ``[V, 3]`` float64 vertex positions.
        faces: ``[F, 3]`` long, consistently oriented with normals pointing *out* of the body
            (use ``orient_outward`` first if unsure).
        u_inf: free-stream velocity.
        chunk: rows of the influence matrix built at once (temporaries ~ chunk * F * 100 bytes).

    Returns:
        ``cp [F]``, surface velocity ``[F, 3]`` and source densities ``sigma [F]``.
    """
    dtype = vertices.dtype
    tri = vertices[faces]
    c, n, _ = triangle_geometry(tri)
    F = faces.shape[0]
    U = torch.tensor(u_inf, dtype=dtype)
    # The influence matrix is built in float32 (half the memory traffic; its entries agree with
    # float64 to ~1e-5, far below the discretisation error) and the system solved in float64.
    tri32, c32 = tri.float(), c.float()
    infl = torch.empty(F, F, 3, dtype=torch.float32)
    with single_threaded():
        for s in range(0, F, chunk):
            idx = torch.arange(s, min(s + chunk, F))
            infl[idx] = source_panel_velocity(c32[idx], tri32, self_index=idx)
    A = torch.einsum("ijk,ik->ij", infl, n.float()).to(dtype)
    sigma = torch.linalg.solve(A, -(n @ U))
    vel = U + torch.einsum("ijk,j->ik", infl, sigma.float()).to(dtype)
    cp = 1.0 - (vel * vel).sum(-1) / (U * U).sum()
    return cp, vel, sigma


def orient_outward(vertices: Tensor, faces: Tensor) -> Tensor:
    """Flip all faces if the mesh's signed volume is negative (normals pointing inward)."""
    tri = vertices[faces]
    vol = (tri[:, 0] * torch.linalg.cross(tri[:, 1], tri[:, 2], dim=-1)).sum() / 6.0
    return faces if vol > 0 else faces[:, [0, 2, 1]]


def sphere_cp_exact(points: Tensor, u_dir: Tuple[float, float, float] = (1.0, 0.0, 0.0)) -> Tensor:
    """Analytic surface Cp on a sphere centred at the origin: ``1 - 9/4 sin^2(theta)``, theta the
    angle between the point's radius and the free stream. ``points [M, 3]`` -> ``[M]``."""
    d = points / points.norm(dim=-1, keepdim=True)
    cos = d @ torch.tensor(u_dir, dtype=points.dtype)
    return 1.0 - 2.25 * (1.0 - cos ** 2)
