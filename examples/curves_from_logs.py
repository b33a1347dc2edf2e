"""Test curves and final figures from the logs of `train.py` / `compare.py` runs, including runs cut by
a time limit (their curve up to the last evaluation is kept and marked unfinished).

    python examples/curves_from_logs.py runs/car_seed0.log runs/car_seed1.log ... \
        --json docs/results_car_gpu.json --plot docs/img/study_car_gpu.png --title "car, H200"

A log's seed is the last number in its file name (``compare_seed2.log``, ``gnn2.log``); the model is
taken from the log's ``[compare] <model>:`` / ``[train] <model>:`` lines. A run found in two logs
(cut by a limit and run again elsewhere) is taken from the one that got further. Prints a markdown table:
per model, the mean +- sample std over seeds of the final test MSE (normalised) and relative L2 of
the finished runs, ms/step, parameters, GFLOPs, and the last step reached by unfinished runs.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import statistics
from typing import Dict, List

_HEAD = re.compile(r"^\[(?:compare|train)\] (\w+): (?:train\.py|([\d,]+) parameters, ([\d.]+) GFLOPs)")
_STEP = re.compile(r"^\[train\] step (\d+): test MSE ([\d.eE+-]+), rel L2 ([\d.eE+-]+)")
_FINAL = re.compile(r"^\[train\] (\w+): final test MSE ([\d.eE+-]+) \(normalised\).*relative L2 ([\d.eE+-]+); "
                    r"(\d+) steps, ([\d.]+) ms/step")


def parse(path: str) -> Dict[str, Dict]:
    r"""``{model: {"curve": [[step, mse, rel_l2], ...], "final": {...} or None, "params", "gflops"}}``."""
    runs: Dict[str, Dict] = {}
    model = None
    with open(path, errors="replace") as f:
        for line in f:
            m = _HEAD.match(line)
            if m:
                model = m.group(1)
                run = runs.setdefault(model, dict(curve=[], final=None, params=None, gflops=None))
                if m.group(2):
                    run["params"], run["gflops"] = int(m.group(2).replace(",", "")), float(m.group(3))
                continue
            m = _STEP.match(line)
            if m and model is not None:
                runs[model]["curve"].append([int(m.group(1)), float(m.group(2)), float(m.group(3))])
                continue
            m = _FINAL.match(line)
            if m:
                run = runs.setdefault(m.group(1), dict(curve=[], final=None, params=None, gflops=None))
                run["final"] = dict(test_mse=float(m.group(2)), rel_l2=float(m.group(3)), steps=int(m.group(4)),
                                    ms_per_step=float(m.group(5)))
                if not run["curve"] or run["curve"][-1][0] < run["final"]["steps"]:  # the final evaluation
                    run["curve"].append([run["final"]["steps"], run["final"]["test_mse"], run["final"]["rel_l2"]])
    return runs


def collect(paths: List[str]) -> Dict[str, Dict[int, Dict]]:
    out: Dict[str, Dict[int, Dict]] = {}
    for p in paths:
        nums = re.findall(r"(\d+)", os.path.basename(p))
        if not nums:
            raise SystemExit(f"{p}: no seed number in the file name")
        seed = int(nums[-1])
        for model, run in parse(p).items():
            old = out.setdefault(model, {}).get(seed)
            if old is not None:  # the same run cut once and restarted elsewhere: keep the one that got further
                print(f"note: {model} seed {seed} in two logs; keeping the run that got further")
                if (old["final"] is not None, len(old["curve"])) >= (run["final"] is not None, len(run["curve"])):
                    continue
            out[model][seed] = run
    return out


def _ms(xs: List[float]) -> str:
    if not xs:
        return "-"
    if len(xs) == 1:
        return f"{xs[0]:.4f}"
    return f"{statistics.mean(xs):.4f} ± {statistics.stdev(xs):.4f}"


def table(data: Dict[str, Dict[int, Dict]]) -> str:
    lines = ["| model | test MSE (norm.) | rel. L2 | ms/step | params | GFLOPs/cloud | finished seeds | unfinished: last step, MSE |",
             "|---|---|---|---|---|---|---|---|"]
    for model, seeds in data.items():
        done = [r["final"] for r in seeds.values() if r["final"]]
        cut = [r["curve"][-1] for r in seeds.values() if not r["final"] and r["curve"]]
        any_run = next(iter(seeds.values()))
        ms = f"{statistics.mean(d['ms_per_step'] for d in done):.1f}" if done else "-"
        cut_s = ", ".join(f"{c[0]}: {c[1]:.4f}" for c in cut) or "-"
        lines.append(f"| {model} | {_ms([d['test_mse'] for d in done])} | {_ms([d['rel_l2'] for d in done])} | {ms} | "
                     f"{any_run['params'] or '-':,} | {any_run['gflops'] or '-'} | {len(done)} of {len(seeds)} | "
                     f"{cut_s} |")
    return "\n".join(lines)


def plot(data: Dict[str, Dict[int, Dict]], path: str, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for model, seeds in data.items():
        steps = sorted({c[0] for r in seeds.values() for c in r["curve"]})
        mean, lo, hi, xs = [], [], [], []
        for s in steps:
            v = [c[1] for r in seeds.values() for c in r["curve"] if c[0] == s]
            if len(v) == len(seeds):  # only steps every seed reached
                xs.append(s)
                mean.append(statistics.mean(v))
                lo.append(min(v))
                hi.append(max(v))
        if not xs:
            continue
        line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{model} ({len(seeds)} seeds)")
        ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("test MSE (normalised target)")
    ax.set_title(title + "\nmean over seeds, band: min-max")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    fig.savefig(path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--title", default="test curves")
    args = p.parse_args(argv)
    data = collect(args.logs)
    print(table(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(logs=[os.path.basename(x) for x in args.logs], runs=data), f, indent=1)
    if args.plot:
        plot(data, args.plot, args.title)


if __name__ == "__main__":
    main()
