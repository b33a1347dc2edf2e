"""Measure the generators' physics errors and generation times (the figures in docs/datasets.md).

    python -m torch_geometric_bsa.datasets.validate            # validation only (~1 min)
    python -m torch_geometric_bsa.datasets.validate --timing   # + default-size generation

Prints a Markdown table per check.
"""
from __future__ import annotations

import argparse
import platform
import tempfile
import time

import numpy as np
import torch

from . import car_pressure, multibody, panel
from .elastic_fem import Ellipse, mesh_perforated_square, solve_uniaxial_tension, von_mises


def _cp_errors(cp: torch.Tensor, exact: torch.Tensor):
    return float((cp - exact).norm() / exact.norm()), float((cp - exact).abs().max())


def sphere_rows():
    rows = []
    for sub in (2, 3, 4):
        v, f = panel.icosphere(sub)
        v, f = torch.from_numpy(v), torch.from_numpy(f)
        f = panel.orient_outward(v, f)
        t = time.perf_counter()
        cp, _, _ = panel.solve_source_panels(v, f)
        dt = time.perf_counter() - t
        c, _, _ = panel.triangle_geometry(v[f])
        rows.append((f"icosphere({sub}), centroids", f.shape[0], *_cp_errors(cp, panel.sphere_cp_exact(c)), dt))
    shape = car_pressure.CarShape.sphere()
    for nl, na in ((20, 16), (30, 28), (40, 36)):  # (20, 16): MultiBodyFlow's default
        t = time.perf_counter()
        sol = car_pressure.car_panel_solution(shape, nl, na)
        dt = time.perf_counter() - t
        pos, _, cp = car_pressure.sample_surface(shape, sol, 20000, torch.Generator().manual_seed(0))
        rows.append((f"car mesh ({nl}x{na}), 20k sampled points", sol["faces"].shape[0],
                     *_cp_errors(cp, panel.sphere_cp_exact(pos)), dt))
    return rows


def two_sphere_rows():
    """Two spheres in tandem (flow along the line of centres): panels vs the multipole series."""
    rows = []
    for sub in (2, 3):
        v, f = panel.icosphere(sub)
        v, f = torch.from_numpy(v), torch.from_numpy(f)
        f = panel.orient_outward(v, f)
        for rb, gap in ((1.0, 0.25), (1.0, 1.0), (0.6, 0.5)):
            d = 1.0 + rb + gap
            V = torch.cat([v, rb * v + torch.tensor([d, 0.0, 0.0], dtype=torch.float64)])
            F = torch.cat([f, f + v.shape[0]])
            t = time.perf_counter()
            cp, _, _ = panel.solve_source_panels(V, F)
            dt = time.perf_counter() - t
            c, _, _ = panel.triangle_geometry(V[F])
            n = f.shape[0]
            exact = torch.cat(multibody.two_sphere_cp_series(1.0, rb, d, c[:n], c[n:]))
            alone = panel.sphere_cp_exact(c[:n])
            effect = float((exact[:n] - alone).abs().max())
            rows.append((f"icosphere({sub}) x 2, radii 1 / {rb:g}, gap {gap:g}", F.shape[0],
                         *_cp_errors(cp, exact), effect, dt))
    return rows


def _area_rel(diff: torch.Tensor, ref: torch.Tensor, area: torch.Tensor) -> float:
    """Area-weighted L2 norm of ``diff`` over that of ``ref`` (mesh-independent in the limit)."""
    return float(((area * diff ** 2).sum() / (area * ref ** 2).sum()).sqrt())


def _pair_on_a(shapes, placements, nl, na):
    """Body A's coupled vs isolated solution: relative change (area-weighted L2), side force CY,
    Cp_min, panels and max abs change of Cp on A."""
    sol = multibody.multibody_panel_solution(shapes, placements, nl, na, isolated=True)[0]
    _, n, area = panel.triangle_geometry(sol["vertices"][sol["faces"]])
    cy = -float((sol["cp"] * area * n[:, 1]).sum())   # force along +y over q (m^2)
    diff = sol["cp"] - sol["cp_isolated"]
    return (_area_rel(diff, sol["cp_isolated"], area), cy, float(sol["cp"].min()),
            sol["faces"].shape[0], float(diff.abs().max()))


def _default_pair():
    shapes = [car_pressure.CarShape(), car_pressure.CarShape()]   # two default cars
    return shapes, 0.5 * shapes[0].width + 0.5 * shapes[1].width


def car_pair_convergence_rows(gap: float = 0.5):
    """A side-by-side pair of default cars (``gap`` m apart; 0.5 is the closest the default dataset
    places) under panel refinement: integrals on body A converge."""
    shapes, w = _default_pair()
    placements = [multibody.Placement(), multibody.Placement(0.3, w + gap)]
    rows = []
    for nl, na in ((12, 10), (20, 16), (30, 28), (40, 36)):
        t = time.perf_counter()
        rel, cy, cpmin, f, _ = _pair_on_a(shapes, placements, nl, na)
        rows.append((f"{nl} x {na}", 2 * f, rel, cy, cpmin, time.perf_counter() - t))
    return rows


def interaction_rows(nl: int = 20, na: int = 16):
    """How much body B changes body A's Cp, by relative position and clearance (default mesh)."""
    shapes, w = _default_pair()
    L = shapes[0].length
    rows = []
    for where in ("behind", "beside"):
        for gap in (0.5, 1.0, 2.0, 4.0, 8.0, 16.0):
            p = (multibody.Placement(L + gap, 0.0) if where == "behind"
                 else multibody.Placement(0.0, w + gap))
            rel, cy, _, _, mx = _pair_on_a(shapes, [multibody.Placement(), p], nl, na)
            rows.append((where, gap, rel, mx, cy))
    return rows


def kirsch_rows():
    rows = []
    a = 0.025
    for n in (48, 96):
        mesh = mesh_perforated_square([Ellipse(0.5, 0.5, a, a)], h_min=1.0, h_max=0.05,
                                      grading=0.25, arc_points=n)
        s = solve_uniaxial_tension(mesh)
        scf = float(von_mises(*s.T).max())
        p = mesh.points[mesh.on_void] - 0.5
        th = np.arctan2(p[:, 1], p[:, 0])
        c, si = np.cos(th), np.sin(th)
        sxx, syy, sxy = s[mesh.on_void].T
        hoop = sxx * si ** 2 + syy * c ** 2 - 2 * sxy * si * c
        err = float(np.abs(hoop - (1 - 2 * np.cos(2 * th))).max())
        rows.append((n, len(mesh.points), scf, abs(scf - 3) / 3, err))
    return rows


def timing_rows():
    from . import CarPressure, ElasticUnitCell, MultiBodyFlow, make_scaling_cloud
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for cls in (CarPressure, ElasticUnitCell, MultiBodyFlow):
            t = time.perf_counter()
            ds = cls(root, "train", log=False)
            dt = time.perf_counter() - t
            n = [ds[i].num_nodes for i in range(len(ds))]
            total = len(ds) + len(cls(root, "test", log=False))
            rows.append((f"{cls.__name__} defaults", total, f"{np.mean(n):.0f}", dt))
            if cls is MultiBodyFlow:
                for split in ("train", "test"):
                    part = cls(root, split, log=False)
                    cp = torch.cat([d.y for d in part]) * part.y_std + part.y_mean
                    diff = cp - torch.cat([d.cp_isolated for d in part])
                    # the test MSE (normalised y) of a model that predicts every body's pressure
                    # exactly as if it were alone: the part a purely local model cannot explain
                    print(f"MultiBodyFlow {split}: std of Cp {float(cp.std()):.3f}, of Cp - "
                          f"cp_isolated {float(diff.std()):.3f}, mean |Cp - cp_isolated| "
                          f"{float(diff.abs().mean()):.3f}; isolated-body predictor: normalised "
                          f"MSE {float((diff / part.y_std).pow(2).mean()):.3f}, rel. L2 "
                          f"{float(diff.norm() / cp.norm()):.3f}")
                    # do 16-nearest-neighbour graphs (the GNN baseline's) ever join two bodies?
                    radius, cross = [], 0
                    for d in part:
                        dist, idx = torch.cdist(d.pos, d.pos).topk(17, largest=False)
                        radius.append(dist[:, -1])
                        cross += int((d.body[idx] != d.body[:, None]).any(1).sum())
                    print(f"  16-NN radius median {float(torch.cat(radius).median()):.3f} m, max "
                          f"{float(torch.cat(radius).max()):.3f} m; points with a 16-NN on another "
                          f"body: {cross} of {sum(d.num_nodes for d in part)}")
    for n in (10 ** 4, 10 ** 5, 10 ** 6):
        make_scaling_cloud(1000)
        t = time.perf_counter()
        make_scaling_cloud(n)
        rows.append(("make_scaling_cloud", 1, f"{n:,}", time.perf_counter() - t))
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--timing", action="store_true", help="also time default-size generation")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"torch {torch.__version__}\n")
    print("| sphere Cp | panels | rel. L2 error | max abs error | solve s |\n|---|---|---|---|---|")
    for name, f, rel, mx, dt in sphere_rows():
        print(f"| {name} | {f} | {rel:.4f} | {mx:.4f} | {dt:.2f} |")
    print("\n| two spheres in tandem vs series | panels | rel. L2 error | max abs error | "
          "max Cp change by the neighbour | solve s |\n|---|---|---|---|---|---|")
    for name, f, rel, mx, eff, dt in two_sphere_rows():
        print(f"| {name} | {f} | {rel:.4f} | {mx:.4f} | {eff:.3f} | {dt:.2f} |")
    print("\n| two default cars side by side, gap 0.5 m: mesh per body | panels | rel. change of "
          "A's Cp by B | side force CY on A (m^2) | Cp_min on A | s |\n|---|---|---|---|---|---|")
    for name, f, rel, cy, cpmin, dt in car_pair_convergence_rows():
        print(f"| {name} | {f} | {rel:.4f} | {cy:.4f} | {cpmin:.4f} | {dt:.2f} |")
    print("\n| B relative to A (default cars, 20 x 16 mesh) | clearance m | rel. change of A's "
          "Cp | max abs change | CY on A (m^2) |\n|---|---|---|---|---|")
    for where, gap, rel, mx, cy in interaction_rows():
        print(f"| {where} | {gap:g} | {rel:.4f} | {mx:.4f} | {cy:.4f} |")
    print("\n| Kirsch, a = 0.025 in the unit square | nodes | SCF (exact 3) | rel. error | "
          "max rim hoop error |\n|---|---|---|---|---|")
    for n, nodes, scf, rel, err in kirsch_rows():
        print(f"| {n} nodes on the hole | {nodes} | {scf:.4f} | {rel:.4f} | {err:.4f} |")
    if args.timing:
        print("\n| generation | samples | points/sample | wall s |\n|---|---|---|---|")
        for name, k, n, dt in timing_rows():
            print(f"| {name} | {k} | {n} | {dt:.2f} |")


if __name__ == "__main__":
    main()
