"""Test curves and final figures from the logs of `train.py` / `compare.py` runs, including runs cut by
a time limit (their curve up to the last evaluation is kept and marked unfinished).

    python examples/curves_from_logs.py runs/car_seed0.log runs/car_seed1.log ... \
        --json docs/results_car_gpu.json --plot docs/img/study_car_gpu.png --title "car, H200"

A log's seed is the last number in its file name (``compare_seed2.log``, ``gnn2.log``); the model is
taken from the log's ``[compare] <model>:`` / ``[train] <model>:`` lines. A run's ``metrics.json``
(train.py's, with its evaluation log) is read too: seed and model from the file (``--label dir``:
the model is the folder above ``seed<k>/``, as examples/ablate.py lays its variants out). A run found
twice (cut by a limit and run again elsewhere) is taken from the one that got further.
``--time-plot`` draws test MSE against training time: from each evaluation's recorded time
(metrics.json), or estimated as step x the run's steady ms/step for runs read from logs. Prints a markdown table:
per model, the mean +- sample std over seeds of the final test MSE (normalised) and relative L2 of
the finished runs, ms/step, peak memory (from metrics.json: CUDA max allocated, or the process's
RSS on a CPU), parameters, GFLOPs, and the last step reached by unfinished runs.
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


def parse_metrics(path: str, label: str = "model") -> Dict[str, Dict]:
    r"""One finished run from train.py's ``metrics.json``: ``{model: run}`` as :func:`parse` gives,
    the curve's rows with a fourth entry, the training time (s) of each evaluation."""
    with open(path) as f:
        met = json.load(f)
    model = os.path.basename(os.path.dirname(os.path.dirname(os.path.abspath(path)))) if label == "dir" \
        else met["model"]
    curve = [[int(e["step"]), float(e["test_mse"]), float(e["test_rel_l2"]), float(e["train_time_s"])]
             for e in met.get("eval_log") or []]
    final = None
    if met.get("steps") == met.get("planned_steps") and met.get("test_mse") is not None:
        final = dict(test_mse=float(met["test_mse"]), rel_l2=float(met["test_rel_l2"]), steps=int(met["steps"]),
                     ms_per_step=float(met["ms_per_step"]), peak_mb=met.get("peak_memory_mb"))
        if not curve or curve[-1][0] < final["steps"]:
            curve.append([final["steps"], final["test_mse"], final["rel_l2"], float(met["train_time_s"])])
    return {model: dict(curve=curve, final=final, params=met.get("parameters"),
                        gflops=met.get("gflops_per_cloud"), seed=met.get("seed"))}


def collect(paths: List[str], label: str = "model") -> Dict[str, Dict[int, Dict]]:
    out: Dict[str, Dict[int, Dict]] = {}
    for p in paths:
        if p.endswith(".json"):
            runs = parse_metrics(p, label)
            seed = int(next(iter(runs.values()))["seed"])
        else:
            nums = re.findall(r"(\d+)", os.path.basename(p))
            if not nums:
                raise SystemExit(f"{p}: no seed number in the file name")
            seed = int(nums[-1])
            runs = parse(p)
        for model, run in runs.items():
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
    lines = ["| model | test MSE (norm.) | rel. L2 | ms/step | peak mem (MB) | params | GFLOPs/cloud | finished seeds | "
             "unfinished: last step, MSE |", "|---|---|---|---|---|---|---|---|---|"]
    for model, seeds in data.items():
        done = [r["final"] for r in seeds.values() if r["final"]]
        cut = [r["curve"][-1] for r in seeds.values() if not r["final"] and r["curve"]]
        any_run = next(iter(seeds.values()))
        ms = f"{statistics.mean(d['ms_per_step'] for d in done):.1f}" if done else "-"
        cut_s = ", ".join(f"{c[0]}: {c[1]:.4f}" for c in cut) or "-"
        peaks = [d["peak_mb"] for d in done if d.get("peak_mb") is not None]  # metrics.json only
        peak = f"{statistics.mean(peaks):,.0f}" if peaks else "-"
        lines.append(f"| {model} | {_ms([d['test_mse'] for d in done])} | {_ms([d['rel_l2'] for d in done])} | {ms} | {peak} | "
                     f"{'-' if any_run['params'] is None else format(any_run['params'], ',')} | {'-' if any_run['gflops'] is None else format(any_run['gflops'], '.1f')} | {len(done)} of {len(seeds)} | "
                     f"{cut_s} |")
    return "\n".join(lines)


def _time(run: Dict, c: List) -> float:
    # an evaluation's training time: recorded (metrics.json) or step x the run's steady ms/step
    if len(c) > 3:
        return c[3]
    ms = (run["final"] or {}).get("ms_per_step")
    return c[0] * ms / 1000.0 if ms else float("nan")


def plot(data: Dict[str, Dict[int, Dict]], path: str, title: str, time_path: str = None) -> None:
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
        line, = ax.plot(xs, mean, marker="o", ms=3, label=f"{model} ({len(seeds)} seed{'' if len(seeds) == 1 else 's'})")
        ax.fill_between(xs, lo, hi, alpha=0.2, color=line.get_color())
    ax.set_yscale("log")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("test MSE (normalised target)")
    ax.set_title(title + "\nmean over seeds, band: min-max")
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    if path:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        fig.savefig(path, dpi=120)
    if time_path:  # one line per run: seeds differ in time, so no mean over seeds
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for i, (model, seeds) in enumerate(data.items()):
            color = f"C{i % 10}"
            for j, run in enumerate(seeds.values()):
                pts = [(_time(run, c), c[1]) for c in run["curve"]]
                ax.plot([t for t, _ in pts], [v for _, v in pts], color=color, marker="o", ms=2, lw=1,
                        label=f"{model} ({len(seeds)} seed{'' if len(seeds) == 1 else 's'})" if j == 0 else None)
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("training time (s)")
        ax.set_ylabel("test MSE (normalised target)")
        ax.set_title(title + "\none line per run")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
        fig.tight_layout()
        os.makedirs(os.path.dirname(time_path) or ".", exist_ok=True)
        fig.savefig(time_path, dpi=120)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("logs", nargs="+")
    p.add_argument("--json", default=None)
    p.add_argument("--plot", default=None)
    p.add_argument("--time-plot", default=None, help="test MSE against training time, one line per run")
    p.add_argument("--label", choices=["model", "dir"], default="model",
                   help="metrics.json: the model name from the file, or the folder above seed<k>/")
    p.add_argument("--title", default="test curves")
    args = p.parse_args(argv)
    data = collect(args.logs, args.label)
    print(table(data))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(logs=[os.path.basename(x) for x in args.logs], runs=data), f, indent=1)
    if args.plot or args.time_plot:
        plot(data, args.plot, args.title, args.time_plot)


if __name__ == "__main__":
    main()
