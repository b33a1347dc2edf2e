"""Plane-stress linear elasticity of perforated unit cells: a graded triangle mesher and a P2 solver.

scikit-fem has no mesher for domains with holes, so ``mesh_perforated_square`` builds one:
graded points (fine on the void boundaries, coarse far away) are triangulated with
``scipy.spatial.Delaunay`` and the triangles inside voids are dropped; the result is checked to
cover exactly the square minus the (polygonal) voids. ``solve_uniaxial_tension`` then solves
uniaxial tension with quadratic triangles and returns nodal stresses. Validated against Kirsch's
stress concentration factor 3 (see ``tests/datasets/test_elastic_unit_cell.py``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Sequence, Tuple

import numpy as np
from scipy.spatial import Delaunay, cKDTree

__all__ = ["Ellipse", "TriMesh", "mesh_perforated_square", "solve_uniaxial_tension", "von_mises"]


@dataclass(frozen=True)
class Ellipse:
    """An elliptic void: centre ``(cx, cy)``, semi-axes ``a >= b`` and rotation ``angle`` (rad)."""

    cx: float
    cy: float
    a: float
    b: float
    angle: float = 0.0

    def local(self, p: np.ndarray) -> Tuple[np.ndarray, np.ndarray]:
        """Coordinates of ``p [n, 2]`` in the ellipse's principal frame."""
        c, s = np.cos(self.angle), np.sin(self.angle)
        dx, dy = p[:, 0] - self.cx, p[:, 1] - self.cy
        return c * dx + s * dy, -s * dx + c * dy

    def signed_distance(self, p: np.ndarray) -> np.ndarray:
        """Approximate signed distance (negative inside) ``[n]``: ``(G - 1) / |grad G|`` with
        ``G = sqrt(x^2/a^2 + y^2/b^2)``; exact for circles, first-order accurate near the curve."""
        x, y = self.local(p)
        G = np.sqrt((x / self.a) ** 2 + (y / self.b) ** 2)
        gx, gy = x / self.a ** 2, y / self.b ** 2
        grad = np.sqrt(gx * gx + gy * gy) / np.maximum(G, 1e-12)
        return (G - 1.0) / np.maximum(grad, 1e-12)

    def boundary(self, spacing: float, offset: float = 0.0, phase: float = 0.0) -> np.ndarray:
        """Points ``[n, 2]`` on the ellipse with semi-axes ``(a + offset, b + offset)``, equally
        spaced in arc length (about ``spacing`` apart); ``phase`` in [0, 1) shifts them along."""
        A, B = self.a + offset, self.b + offset
        t = np.linspace(0.0, 2 * np.pi, 2049)
        xy = np.stack([A * np.cos(t), B * np.sin(t)], 1)
        arc = np.concatenate([[0.0], np.cumsum(np.linalg.norm(np.diff(xy, axis=0), axis=1))])
        n = max(8, int(np.ceil(arc[-1] / spacing)))
        tt = np.interp((np.arange(n) + phase) / n * arc[-1], arc, t)
        x, y = A * np.cos(tt), B * np.sin(tt)
        c, s = np.cos(self.angle), np.sin(self.angle)
        return np.stack([self.cx + c * x - s * y, self.cy + s * x + c * y], 1)

    def polygon_area(self, spacing: float) -> float:
        """Area of the polygon through ``boundary`` points (what the mesh actually cuts out)."""
        p = self.boundary(spacing)
        x, y = p[:, 0], p[:, 1]
        return 0.5 * abs(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1)))


@dataclass
class TriMesh:
    """Triangle mesh: ``points [P, 2]`` float64, ``triangles [T, 3]`` int64 (counter-clockwise),
    ``on_void [P]`` bool (node lies on a void boundary)."""

    points: np.ndarray
    triangles: np.ndarray
    on_void: np.ndarray


def _void_distance(p: np.ndarray, voids: Sequence[Ellipse]) -> np.ndarray:
    if not voids:
        return np.full(len(p), np.inf)
    return np.min(np.stack([v.signed_distance(p) for v in voids]), axis=0)


def mesh_perforated_square(
    voids: Sequence[Ellipse],
    h_min: float = 0.012,
    h_max: float = 0.04,
    grading: float = 0.3,
    arc_points: int = 48,
    size: float = 1.0,
) -> TriMesh:
    """Triangulate ``[0, size]^2`` minus the elliptic ``voids``.

    Target edge length ``h(p) = min(h_max, h_void + grading * dist(p, voids))`` where ``h_void``
    is ``h_min`` refined further on strongly curved voids (at most a quarter of the tip radius of
    curvature ``b^2/a``), so stress concentrations are resolved.

    Candidate points come in priority order (void boundaries, square boundary, offset layers
    around the voids, then a hexagonal background lattice); a greedy pass keeps a candidate only
    if no kept point lies within ``0.75 h`` of it. Delaunay then triangulates the kept points and
    triangles whose centroid is inside a void are removed.

    Raises:
        RuntimeError: if the triangulation does not cover the square minus the voids (a void
            boundary edge missing from the Delaunay triangulation).
    """
    voids = list(voids)
    # Tip radius of curvature of an ellipse is b^2/a: resolve it with arc_points per full turn.
    h_void = [min(h_min, 2 * np.pi * v.b ** 2 / v.a / arc_points) for v in voids]
    h_floor = min([h_max] + h_void)

    def h_of(p: np.ndarray) -> np.ndarray:
        if not voids:
            return np.full(len(p), h_max)
        d = np.maximum(np.stack([v.signed_distance(p) for v in voids]), 0.0)
        hv = np.asarray(h_void)[:, None]
        return np.minimum(h_max, np.min(hv + grading * d, axis=0))

    groups: List[np.ndarray] = []
    fixed: List[np.ndarray] = []
    for v, hv in zip(voids, h_void):
        fixed.append(v.boundary(hv))
    # Square boundary, marched with the local target size so edges near a void stay fine.
    corners = np.array([[0.0, 0.0], [size, 0.0], [size, size], [0.0, size]])
    for k in range(4):
        a, b = corners[k], corners[(k + 1) % 4]
        ts, t = [], 0.0
        while t < size * (1 - 1e-9):
            ts.append(t)
            t += float(h_of((a + (b - a) * t / size)[None])[0])
        # Stretch the marched positions so the last step ends exactly on the next corner.
        t_arr = np.asarray(ts) * (size / t)
        fixed.append(a + (b - a) * (t_arr / size)[:, None])
    fixed_pts = np.concatenate(fixed)
    n_void_pts = sum(len(f) for f in fixed[: len(voids)])

    # Offset layers: near-structured rows of almost equilateral triangles along each void.
    for v, hv in zip(voids, h_void):
        t, layer = 0.0, 0
        while True:
            h_here = min(h_max, hv + grading * t)
            t += 0.866 * h_here
            layer += 1
            if hv + grading * t >= h_max or t > 0.5 * size:
                break
            groups.append(v.boundary(min(h_max, hv + grading * t), offset=t, phase=0.5 * (layer % 2)))
    # Hexagonal background lattice at the coarsest spacing.
    for i, y in enumerate(np.arange(0.433 * h_max, size, 0.866 * h_max)):
        xs = np.arange((0.5 + 0.5 * (i % 2)) * h_max, size, h_max)
        groups.append(np.stack([xs, np.full_like(xs, y)], 1))
    cand = np.concatenate(groups) if groups else np.zeros((0, 2))

    # Drop candidates inside voids, too close to a void or to the square's sides.
    h_c = h_of(cand)
    margin = 0.5 * h_c
    inside = ((cand > margin[:, None]) & (cand < size - margin[:, None])).all(1)
    keep = inside & (_void_distance(cand, voids) > margin)
    cand, h_c = cand[keep], h_c[keep]

    # Greedy thinning in priority order against fixed points and earlier candidates.
    tree_fixed = cKDTree(fixed_pts)
    ok = np.array([not tree_fixed.query_ball_point(p, 0.75 * h) for p, h in zip(cand, h_c)],
                  dtype=bool) if len(cand) else np.zeros(0, bool)
    cand, h_c = cand[ok], h_c[ok]
    tree = cKDTree(cand) if len(cand) else None
    accepted = np.zeros(len(cand), dtype=bool)
    if tree is not None:
        neigh = tree.query_ball_point(cand, 0.75 * h_c)
        for i, nb in enumerate(neigh):
            accepted[i] = not any(accepted[j] for j in nb if j < i)
    points = np.concatenate([fixed_pts, cand[accepted]])

    tri = Delaunay(points).simplices.astype(np.int64)
    cen = points[tri].mean(1)
    tri = tri[_void_distance(cen, voids) > 0]
    # Counter-clockwise orientation (positive signed area) as scikit-fem expects.
    a, b, c = points[tri[:, 0]], points[tri[:, 1]], points[tri[:, 2]]
    signed = 0.5 * ((b[:, 0] - a[:, 0]) * (c[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (c[:, 0] - a[:, 0]))
    tri[signed < 0] = tri[signed < 0][:, [0, 2, 1]]
    area = np.abs(signed).sum()
    if np.abs(signed).min() < 1e-6 * h_floor ** 2:
        raise RuntimeError("mesh_perforated_square: degenerate (zero-area) triangle")
    expected = size * size - sum(v.polygon_area(hv) for v, hv in zip(voids, h_void))
    if abs(area - expected) > 1e-9 * size * size or len(np.unique(tri)) != len(points):
        raise RuntimeError(
            f"mesh_perforated_square: triangulation covers area {area:.12f}, expected "
            f"{expected:.12f} with {len(np.unique(tri))}/{len(points)} nodes used; a void boundary "
            f"edge is missing (voids too close together or to the sides?)")
    on_void = np.zeros(len(points), dtype=bool)
    on_void[:n_void_pts] = True
    return TriMesh(points, tri, on_void)


def von_mises(sxx: np.ndarray, syy: np.ndarray, sxy: np.ndarray) -> np.ndarray:
    """Plane-stress von Mises stress ``sqrt(sxx^2 - sxx syy + syy^2 + 3 sxy^2)``."""
    return np.sqrt(np.maximum(sxx * sxx - sxx * syy + syy * syy + 3.0 * sxy * sxy, 0.0))


def solve_uniaxial_tension(
    mesh: TriMesh,
    traction: float = 1.0,
    E: float = 1.0,
    nu: float = 0.3,
    size: float = 1.0,
) -> np.ndarray:
    """Uniaxial tension of the perforated square, plane stress, quadratic (P2) triangles.

    Boundary conditions: ``u_x = 0`` on ``x = 0`` (a symmetry plane, so the cell behaves like
    the right half of a plate pulled at both ends), ``u_y = 0`` at the corner ``(0, 0)`` (removes
    the rigid translation), traction ``(traction, 0)`` on ``x = size``; the other sides and the
    voids are traction free.

    Returns:
        nodal stresses ``[P, 3]`` = ``(sxx, syy, sxy)`` at the mesh vertices: each element's
        (linear) stress evaluated at its own vertices, averaged over the elements sharing a vertex.
    """
    from skfem import Basis, ElementTriP2, ElementVector, FacetBasis, LinearForm, MeshTri, asm
    from skfem import condense, solve
    from skfem.models.elasticity import lame_parameters, linear_elasticity

    m = MeshTri(mesh.points.T.copy(), mesh.triangles.T.copy())
    elem = ElementVector(ElementTriP2())
    basis = Basis(m, elem, intorder=4)
    lam, mu = lame_parameters(E, nu)
    lam = 2.0 * lam * mu / (lam + 2.0 * mu)  # plane stress
    K = asm(linear_elasticity(lam, mu), basis)

    tol = 1e-9 * size
    right = m.facets_satisfying(lambda x: np.abs(x[0] - size) < tol)
    left = m.facets_satisfying(lambda x: np.abs(x[0]) < tol)

    @LinearForm
    def pull(v, w):
        return traction * v[0]

    f = asm(pull, FacetBasis(m, elem, facets=right, intorder=4))
    left_nodes = np.unique(m.facets[:, left])
    corner = int(np.argmin(np.linalg.norm(mesh.points, axis=1)))
    D = np.concatenate([basis.nodal_dofs[0, left_nodes], basis.facet_dofs[0, left],
                        [basis.nodal_dofs[1, corner]]])
    u = solve(*condense(K, f, D=D))

    # Stress at each element's own vertices: a basis whose quadrature points are the reference
    # vertices (0,0), (1,0), (0,1), i.e. the element's t[0], t[1], t[2].
    X = np.array([[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    vb = Basis(m, elem, quadrature=(X, np.full(3, 1.0 / 6.0)))
    G = vb.interpolate(u).grad                       # [2 comps, 2 derivs, T, 3 vertices]
    exx, eyy = G[0, 0], G[1, 1]
    exy = 0.5 * (G[0, 1] + G[1, 0])
    tr = exx + eyy
    sig = np.stack([lam * tr + 2 * mu * exx, lam * tr + 2 * mu * eyy, 2 * mu * exy], -1)  # [T, 3, 3]
    P = len(mesh.points)
    t = m.t.T                                         # [T, 3]
    out = np.zeros((P, 3))
    np.add.at(out, t.reshape(-1), sig.reshape(-1, 3))
    cnt = np.bincount(t.reshape(-1), minlength=P).astype(np.float64)
    return out / cnt[:, None]
