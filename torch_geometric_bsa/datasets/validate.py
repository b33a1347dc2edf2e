"""Measure the generators' physics errors and generation times (the figures in docs/datasets.md).

    python -m torch_geometric_bsa.datasets.validate            # validation only (~10 s)
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

from . import car_pressure, panel
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
    for nl, na in ((30, 28), (40, 36)):
        t = time.perf_counter()
        sol = car_pressure.car_panel_solution(shape, nl, na)
        dt = time.perf_counter() - t
        pos, _, cp = car_pressure.sample_surface(shape, sol, 20000, torch.Generator().manual_seed(0))
        rows.append((f"car mesh ({nl}x{na}), 20k sampled points", sol["faces"].shape[0],
                     *_cp_errors(cp, panel.sphere_cp_exact(pos)), dt))
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
    from . import CarPressure, ElasticUnitCell, make_scaling_cloud
    rows = []
    with tempfile.TemporaryDirectory() as root:
        for cls in (CarPressure, ElasticUnitCell):
            t = time.perf_counter()
            ds = cls(root, "train", log=False)
            dt = time.perf_counter() - t
            n = [ds[i].num_nodes for i in range(len(ds))]
            total = len(ds) + len(cls(root, "test", log=False))
            rows.append((f"{cls.__name__} defaults", total, f"{np.mean(n):.0f}", dt))
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
