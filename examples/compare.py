"""Train all five models at the same budget and tabulate accuracy and cost.

    python examples/compare.py                                   # quick car data, 150 steps each (CPU)
    python examples/compare.py --budget-s 75 -- --dataset car --hidden 128 --layers 6 --batch-size 8

Every model runs through examples/train.py (same data, optimiser, schedule, evaluation) for the same
number of steps. With ``--budget-s``, a short timing probe of every model first picks the largest
common step count at which the slowest model trains for about that many seconds. Arguments after
``--`` go to train.py unchanged. Writes a markdown table (``--results``, default ``OUT/results.md``),
the same rows as JSON (``--json``), ``compare.png`` (train loss and test MSE per step of every
model) and each model's own outputs under ``--out``; the table and JSON are rewritten after every
model, so an interrupted run keeps what it finished. ``--isolate`` runs every model in its own
process (a CUDA fault in one kernel cannot take the others down) and ``--deadline-s`` bounds the
whole comparison's wall time. examples/run_compare_gpu.sh is the one-command GPU run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  (examples/train.py)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv: Optional[Sequence[str]] = None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--models", nargs="+", default=list(train.MODELS), choices=train.MODELS)
    budget = p.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=train._positive_int, default=None, help="steps per model (default 150)")
    budget.add_argument("--budget-s", type=train._positive_float, default=None,
                        help="calibrate a common step count so the slowest model trains about this long")
    p.add_argument("--probe-steps", type=train._positive_int, default=12, help="steps of the timing probe")
    p.add_argument("--max-time", type=train._positive_float, default=None,
                   help="hard cap on each model's training seconds (passed to train.py)")
    p.add_argument("--deadline-s", type=train._positive_float, default=None,
                   help="wall-clock limit of the whole comparison: each model's --max-time shrinks so that "
                        "the remaining models still fit")
    p.add_argument("--isolate", action="store_true",
                   help="run every model in its own Python process (recommended on GPU)")
    p.add_argument("--out", default="runs/compare", help="folder for every model's outputs")
    p.add_argument("--results", default=None,
                   help="markdown table (default: OUT/results.md; docs/results.md holds the published tables)")
    p.add_argument("--json", default=None, help="JSON rows (default: --results with .json)")
    p.add_argument("--title", default="Accuracy and cost at equal training steps")
    p.add_argument("--model-args", action="append", default=[], metavar="MODEL=FLAGS",
                   help="extra train.py flags for one model, e.g. gnn='--knn 24'")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    per_model: Dict[str, List[str]] = {}
    for item in args.model_args:
        name, _, flags = item.partition("=")
        if name not in train.MODELS or not flags:
            p.error(f"--model-args expects MODEL=FLAGS with MODEL in {train.MODELS}, got {item!r}")
        per_model.setdefault(name, []).extend(shlex.split(flags))
    for m in args.models:  # fail fast on bad train.py flags, before any training
        flags = rest + per_model.get(m, []) + ["--model", m]
        try:
            train.parse_args(flags)
        except SystemExit:
            p.error(f"train.py rejected the flags for --model {m}: {' '.join(flags)}")
    args.train_args, args.per_model = rest, per_model
    args.results = args.results or os.path.join(args.out, "results.md")
    args.json = args.json or os.path.splitext(args.results)[0] + ".json"
    return args


def _flags(args, model: str) -> List[str]:
    return args.train_args + args.per_model.get(model, []) + ["--model", model]


# A CUDA fault (illegal address) is sticky for the rest of a process: probe the models least likely to
# fault first, so that a failing kernel only loses its own timing.
PROBE_ORDER = ("pointnet", "gnn", "ptconv", "full", "ball", "bsa")
OVERHEAD_S = 20.0  # per model besides training: start-up, data loading, evaluations, plots


def _steady_ms(rows: List[Dict], skip: int = 1) -> Optional[float]:
    r"""ms per step from the train log, leaving out the first ``skip`` rows (allocation, compilation,
    autotuning happen in the first steps); ``None`` with too few rows."""
    if len(rows) <= skip:
        return None
    a, b = rows[skip - 1] if skip else {"step": 0, "train_time_s": 0.0}, rows[-1]
    return 1000.0 * (b["train_time_s"] - a["train_time_s"]) / max(b["step"] - a["step"], 1)


def calibrate(args, log) -> int:
    r"""Largest common step count that keeps the slowest model within ``--budget-s`` seconds.

    On CUDA, a BSA/ball model that had to fall back to the PyTorch reference is left out of the
    maximum (it would shrink everyone's budget); its run is then capped by time instead."""
    ms, fell_back = {}, []
    for m in sorted(args.models, key=PROBE_ORDER.index):
        out = os.path.join(args.out, "probe", m)
        try:
            met = train.main(_flags(args, m) + ["--steps", str(args.probe_steps), "--log-every", "1",
                                                "--ckpt-every", "0", "--eval-every", "0", "--no-plots",
                                                "--no-progress", "--out", out])
        except Exception:  # the real run reports (and, for BSA/ball, retries) the failure
            traceback.print_exc()
            log(f"[compare] probe {m} failed; its time is left out of the calibration")
            continue
        rows = json.load(open(os.path.join(out, "metrics.json")))["train_log"]
        ms[m] = _steady_ms(rows, min(3, len(rows) - 1))
        if m in ("bsa", "ball") and met["device"].startswith("cuda") and met["backend"] == "torch" \
                and "--backend" not in _flags(args, m):
            fell_back.append(m)
        log(f"[compare] probe {m}: {ms[m]:.1f} ms/step ({met.get('backend') or 'no attention backend'})")
    _free_cuda()
    timed = {m: v for m, v in ms.items() if m not in fell_back} or ms
    if not timed:
        raise RuntimeError("every timing probe failed")
    slowest = max(timed, key=timed.get)
    steps = max(1, int(args.budget_s * 1000.0 / timed[slowest]))
    log(f"[compare] common budget: {steps} steps (slowest model: {slowest}, {timed[slowest]:.1f} ms/step, "
        f"budget {args.budget_s:g}s" + (f"; left out: {', '.join(fell_back)} on the PyTorch fallback" if fell_back
                                        else "") + ")")
    args.ms_est = ms
    if args.deadline_s:  # all runs one after another must fit in what is left of the deadline
        avail = 0.9 * (args.deadline_s - (time.perf_counter() - args.t0) - OVERHEAD_S * len(args.models))
        need_ms = sum(ms.get(m, max(ms.values())) for m in args.models)
        fit = int(max(avail, 0.0) * 1000.0 / need_ms)
        if fit < steps:
            log(f"[compare] --deadline-s {args.deadline_s:g}: {fit} steps instead of {steps}, so that every "
                f"model fits")
            steps = max(1, fit)
    return steps


def _free_cuda():
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # a faulted context: nothing to free, the isolated runs do not need it
        pass


def _time_cap(args, models_left: int, steps: int) -> Optional[float]:
    r"""``--max-time`` for the next run: the user's cap, shrunk so that the remaining models still fit in
    ``--deadline-s``: what is left minus the later models' expected time (probe ms/step x steps, when
    calibrated) and start-up overheads, or an equal share of what is left without estimates."""
    cap = args.max_time
    if args.deadline_s:
        left = args.deadline_s - (time.perf_counter() - args.t0)
        later = args.models[len(args.models) - models_left + 1:]
        ms = getattr(args, "ms_est", None)
        if ms:
            fallback = max(ms.values())
            share = left - OVERHEAD_S * models_left - sum(steps * ms.get(m, fallback) / 1000.0 for m in later)
        else:
            share = left / models_left - OVERHEAD_S
        cap = share if cap is None else min(cap, share)
    return cap


def run_all(args, steps: int, log, on_row=lambda rows: None) -> List[Dict]:
    rows = []
    for i, m in enumerate(args.models):
        out = os.path.join(args.out, m)
        flags = _flags(args, m) + ["--steps", str(steps), "--out", out, "--no-progress"]
        if "--eval-every" not in flags:  # five points on each test-MSE curve
            flags += ["--eval-every", str(max(1, steps // 5))]
        met = _run_capped(args, flags, out, len(args.models) - i, steps, log)
        if "error" in met and m in ("bsa", "ball") and "--backend" not in flags and "skipped" not in met["error"]:
            # a Triton kernel that passed the probe but failed on real batches: keep the model in the
            # table through the PyTorch reference, and say so
            log(f"[compare] {m} failed ({met['error'][:200]}); retrying with --backend torch")
            met = _run_capped(args, flags + ["--backend", "torch"], out, len(args.models) - i, steps, log)
            met["note"] = "Triton backend failed; reran with the PyTorch reference"
        rows.append(met)
        on_row(rows)
    return rows


def _run_capped(args, flags: List[str], out: str, models_left: int, steps: int, log) -> Dict:
    model = flags[flags.index("--model") + 1]
    cap = _time_cap(args, models_left, steps)
    if cap is not None:
        if cap < 1.0:
            log(f"[compare] {model}: skipped, --deadline-s {args.deadline_s:g} reached")
            return {"model": model, "error": "skipped: --deadline-s reached"}
        flags = flags + ["--max-time", f"{cap:.1f}"]
    log(f"[compare] {model}: train.py {' '.join(flags)}")
    timeout = None if cap is None else cap + 3 * OVERHEAD_S  # a hung run must not eat the others' time
    return _train(flags, out, isolate=args.isolate, timeout=timeout)


def _train(flags: List[str], out: str, isolate: bool = False, timeout: Optional[float] = None) -> Dict:
    t = time.perf_counter()
    model = flags[flags.index("--model") + 1]
    path = os.path.join(out, "metrics.json")
    try:
        if isolate:
            if os.path.isfile(path):
                os.remove(path)  # never read a stale result
            env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
            r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py")] + flags, env=env,
                               timeout=timeout)
            if r.returncode != 0 or not os.path.isfile(path):
                raise RuntimeError(f"train.py exited with code {r.returncode} (its output is above)")
            met = json.load(open(path))
        else:
            met = {**train.main(flags), **{k: v for k, v in json.load(open(path)).items() if k.endswith("_log")}}
        met["wall_s"] = time.perf_counter() - t
        met["ms_per_step_steady"] = _steady_ms(met["train_log"])
    except subprocess.TimeoutExpired:
        met = {"model": model, "error": f"timed out after {timeout:.0f}s"}
    except Exception as e:  # one broken model must not lose the others' results
        traceback.print_exc()
        met = {"model": model, "error": f"{type(e).__name__}: {e}"}
    if not isolate:
        _free_cuda()
    return met


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(rows: List[Dict], args, steps: int, argv: Sequence[str]) -> str:
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    device = first.get("device_name", "?")
    ref = next((r for r in ok if r["model"] == "full"), None)
    lines = [
        f"### {args.title}",
        "",
        f"- Command: `python examples/compare.py {' '.join(shlex.quote(a) for a in argv)}`",
        f"- Device: {device}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Data: `{first.get('dataset', '?')}`, {first.get('train_clouds', '?')} training / "
        f"{first.get('test_clouds', '?')} test clouds, {_fmt(first.get('mean_points'), '.0f')} points per cloud; "
        f"seed {first.get('seed', '?')} (model init, data order); {steps} steps per model, "
        f"batch {first.get('args', {}).get('batch_size', '?')}, precision {first.get('precision', '?')}",
        "",
        "| model | test MSE (norm.) | test MSE (phys.) | rel. L2 | vs full | params | GFLOPs/cloud | ms/step | "
        "peak mem (MB) | steps |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | failed: {r['error'][:80]} | | | | | | | | |")
            continue
        rel = f"{100 * (r['test_mse'] / ref['test_mse'] - 1):+.1f}%" if ref else "n/a"
        name = r["model"] + (f" ({r['backend']})" if r.get("backend") else "")
        steps_note = f"{r['steps']}" + (" (time cap)" if r.get("stopped_early") else "")
        ms = r.get("ms_per_step_steady") or r["ms_per_step"]
        lines.append(
            f"| {name} | {r['test_mse']:.4f} | {r['test_mse_phys']:.4g} | {r['test_rel_l2']:.4f} | {rel} | "
            f"{r['parameters']:,} | {r['gflops_per_cloud']:.3g} | {ms:.1f} | "
            f"{r['peak_memory_mb']:.0f} | {steps_note} |")
        if r.get("note"):
            lines.append(f"| ↳ {r['model']}: {r['note']} | | | | | | | | | |")
    mem = first.get("peak_memory_kind")
    lines += ["", "MSE (norm.) is on the standardised target; (phys.) in the dataset's units; rel. L2 is the "
              "mean per-cloud ||pred - true|| / ||true|| in physical units. GFLOPs: forward, one cloud of the "
              "mean size (flops.py for the attention models, an analytic estimate for the baselines). "
              "ms/step: training time per optimiser step (forward, backward, update) after the first logging "
              "interval (compilation and autotuning left out). \"(time cap)\": stopped by --max-time/--deadline-s "
              "before the common step count. Peak memory: "
              + ("CUDA max allocated per run." if mem == "cuda_allocated" else
                 "process peak RSS (CPU)" + (", per run." if args.isolate else
                                            ", cumulative over the runs of one process.")), ""]
    return "\n".join(lines)


def plot(rows: List[Dict], path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (ax_tr, ax_te) = plt.subplots(1, 2, figsize=(11, 4))
    for r in rows:
        if "error" in r:
            continue
        if r.get("train_log"):
            ax_tr.plot([e["step"] for e in r["train_log"]], [e["loss"] for e in r["train_log"]], label=r["model"])
        if r.get("eval_log"):
            ax_te.plot([e["step"] for e in r["eval_log"]], [e["test_mse"] for e in r["eval_log"]], "o-",
                       label=r["model"])
    for ax, name in ((ax_tr, "train MSE (normalised)"), (ax_te, "test MSE (normalised)")):
        ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    for path in (args.results, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    steps = args.steps or (calibrate(args, log) if args.budget_s else 150)

    def write(rows: List[Dict]):  # after every model: an interrupted comparison keeps what it finished
        with open(args.results, "w") as f:
            f.write(markdown(rows, args, steps, argv))
        with open(args.json, "w") as f:
            json.dump({"steps": steps, "argv": argv, "rows": rows}, f, indent=1, default=str)
        plot(rows, os.path.join(args.out, "compare.png"))

    rows = run_all(args, steps, log, on_row=write)
    print(markdown(rows, args, steps, argv))
    log(f"[compare] done in {time.perf_counter() - args.t0:.0f}s; table in {args.results}, JSON in {args.json}")
    return rows


if __name__ == "__main__":
    main()
