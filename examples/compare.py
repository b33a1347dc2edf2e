"""Train every model at the same budget, with one or several seeds, and tabulate accuracy and cost.

    python examples/compare.py                                   # quick car data, 150 steps each (CPU)
    python examples/compare.py --budget-s 75 -- --dataset car --hidden 128 --layers 6 --batch-size 8
    python examples/compare.py --seeds 0 1 2 --steps 3000 --isolate -- --dataset car ...

Every model runs through examples/train.py (same data, optimiser, schedule, evaluation). Budgets:
``--steps N`` gives every model N steps (equal steps); ``--budget-s S`` first times every model in a
short probe and picks the largest common step count at which the slowest model trains about S seconds
(still equal steps); ``--budget-s S --equal-time`` instead gives each model its own step count, so
that each trains S seconds with a full learning-rate schedule (equal wall-clock: train.py
``--time-budget S`` runs the schedule on seconds and ends the run at S; the probe's step count, doubled,
only caps it and sets the evaluation interval). The output
names the budget. ``--seeds`` runs every model once per seed (train.py ``--seed``: initialisation and
data order); the table then gives the mean ± standard deviation over the seeds and a per-seed table
follows. Arguments after ``--`` go to train.py unchanged.

Writes a markdown table (``--results``, default ``OUT/results.md``), the per-seed rows and the
per-model summary as JSON (``--json``), ``compare.png`` (train loss and test MSE per step: mean over
seeds, min-max band) and ``compare_time.png`` (test MSE against training seconds), and each run's own
outputs under ``--out`` (``OUT/MODEL``, or ``OUT/MODEL/seedS`` with ``--seeds``); the table, JSON and
plots are rewritten after every run, so an interrupted comparison keeps what it finished (runs go
seed by seed: all models with the first seed, then the next). ``--isolate`` runs every model in its
own process (a CUDA fault in one kernel cannot take the others down) and ``--deadline-s`` bounds the
whole comparison's wall time. examples/run_compare_gpu.sh is the one-command GPU run.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shlex
import subprocess
import sys
import statistics
import time
import traceback
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
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
    p.add_argument("--equal-time", action="store_true",
                   help="with --budget-s: each model gets its own step count (from its timing probe) so that "
                        "each trains about --budget-s seconds (equal wall-clock); without it, one common step count")
    p.add_argument("--calibration", default=None, metavar="JSON",
                   help="with --budget-s: read the steps per model from this file when it holds a calibration of "
                        "the same budget and models, else probe and write it there (several compare.py, e.g. one "
                        "per seed at once, then share one calibration)")
    p.add_argument("--calibrate-only", action="store_true",
                   help="with --budget-s and --calibration: probe (or read) the calibration, write it, train nothing")
    p.add_argument("--seeds", nargs="+", type=_seed, default=None, metavar="SEED",
                   help="run every model with each seed (train.py --seed) and report mean ± std over them "
                        "(default: one run per model with train.py's --seed)")
    p.add_argument("--curve-points", type=train._positive_int, default=10,
                   help="evaluations per run, i.e. points on each test-MSE curve (unless train.py's --eval-every "
                        "is given)")
    p.add_argument("--probe-steps", type=train._positive_int, default=40,
                   help="steps of the timing probe (its step time is the median over the second half: the first "
                        "steps compile, autotune and capture CUDA graphs)")
    p.add_argument("--reuse", action="store_true",
                   help="keep a run whose OUT folder already holds its finished metrics.json (same train.py "
                        "flags, all steps done), and continue one that left a checkpoint (train.py --resume): "
                        "an interrupted comparison, rerun with the same command, trains only what is missing")
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
    p.add_argument("--title", default=None,
                   help="table heading (default: 'Accuracy and cost at equal training steps' or '... time')")
    p.add_argument("--model-args", action="append", default=[], metavar="MODEL=FLAGS",
                   help="extra train.py flags for one model, e.g. gnn='--knn 24'")
    args, rest = p.parse_known_args(argv)
    if rest and rest[0] == "--":
        rest = rest[1:]
    if args.equal_time and not args.budget_s:
        p.error("--equal-time needs --budget-s (the seconds every model trains)")
    if (args.calibration or args.calibrate_only) and not args.budget_s:
        p.error("--calibration/--calibrate-only need --budget-s (they hold its steps per model)")
    if args.calibrate_only and not args.calibration:
        p.error("--calibrate-only needs --calibration (the file it writes)")
    if args.seeds is not None and len(set(args.seeds)) != len(args.seeds):
        p.error(f"--seeds: each seed once, got {args.seeds}")
    per_model: Dict[str, List[str]] = {}
    for item in args.model_args:
        name, _, flags = item.partition("=")
        if name not in train.MODELS or not flags:
            p.error(f"--model-args expects MODEL=FLAGS with MODEL in {train.MODELS}, got {item!r}")
        per_model.setdefault(name, []).extend(shlex.split(flags))
    if args.seeds is not None and any(f == "--seed" or f.startswith("--seed=")
                                      for f in rest + sum(per_model.values(), [])):
        p.error("--seeds sets train.py's --seed of every run: leave --seed out of the train.py flags")
    for m in args.models:  # fail fast on bad train.py flags, before any training
        flags = rest + per_model.get(m, []) + ["--model", m]
        try:
            train.parse_args(flags)
        except SystemExit:
            p.error(f"train.py rejected the flags for --model {m}: {' '.join(flags)}")
    args.train_args, args.per_model = rest, per_model
    args.title = args.title or f"Accuracy and cost at equal training {'time' if args.equal_time else 'steps'}"
    args.results = args.results or os.path.join(args.out, "results.md")
    args.json = args.json or os.path.splitext(args.results)[0] + ".json"
    return args


def _seed(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer seed, got {s!r}")
    if not 0 <= v <= train.MAX_SEED:
        raise argparse.ArgumentTypeError(f"expected a seed in [0, {train.MAX_SEED}], got {v}")
    return v


def _flags(args, model: str, seed: Optional[int] = None) -> List[str]:
    return args.train_args + args.per_model.get(model, []) + ["--model", model] + \
        ([] if seed is None else ["--seed", str(seed)])


def runs_of(args) -> List[Tuple[str, Optional[int]]]:
    r"""``(model, seed)`` of every run, seed by seed (``seed`` ``None``: train.py's own ``--seed``)."""
    return [(m, s) for s in (args.seeds or [None]) for m in args.models]


def _out(args, model: str, seed: Optional[int]) -> str:
    return os.path.join(args.out, model) if seed is None else os.path.join(args.out, model, f"seed{seed}")


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


def _probe_ms(rows: List[Dict]) -> Optional[float]:
    r"""A probe's ms per step from its train log (one row a step): the median step time over the second
    half of the rows. The first steps are slower (compilation, autotuning, the layer graphs' warm-up and
    captures: BSA's first ~10 steps take 2-9x a later step on the H200), and a capture can land later
    still, so neither the mean after a fixed few rows nor the first half is the rate a long run trains
    at. With one row, that row's mean; ``None`` with none."""
    if not rows:
        return None
    rows = [{"step": 0, "train_time_s": 0.0}] + list(rows) if len(rows) == 1 else rows
    dt = [1000.0 * (b["train_time_s"] - a["train_time_s"]) / max(b["step"] - a["step"], 1)
          for a, b in zip(rows, rows[1:])]
    return float(statistics.median(dt[len(dt) // 2:]))


def calibrate(args, log) -> Dict[str, int]:
    r"""Steps per model for ``--budget-s``: one common count that keeps the slowest model within
    ``--budget-s`` seconds, or with ``--equal-time`` each model's own count for that many seconds.

    On CUDA, a BSA/ball model that had to fall back to the PyTorch reference is left out of the
    common count's maximum (it would shrink everyone's budget); its run is then capped by time
    instead. Timings do not depend on the seed: each model is probed once, with the first seed."""
    ms, fell_back = {}, []
    seed = args.seeds[0] if args.seeds else None
    for m in sorted(args.models, key=PROBE_ORDER.index):
        out = os.path.join(args.out, "probe", m)
        try:
            met = train.main(_flags(args, m, seed) + ["--steps", str(args.probe_steps), "--log-every", "1",
                                                      "--ckpt-every", "0", "--eval-every", "0", "--no-plots",
                                                      "--no-progress", "--out", out])
        except Exception:  # the real run reports (and, for BSA/ball, retries) the failure
            traceback.print_exc()
            log(f"[compare] probe {m} failed; its time is left out of the calibration")
            continue
        rows = json.load(open(os.path.join(out, "metrics.json")))["train_log"]
        ms[m] = _probe_ms(rows)
        if m in ("bsa", "ball") and met["device"].startswith("cuda") and met["backend"] == "torch" \
                and "--backend" not in _flags(args, m):
            fell_back.append(m)
        log(f"[compare] probe {m}: {ms[m]:.1f} ms/step ({met.get('backend') or 'no attention backend'})")
    _free_cuda()
    timed = {m: v for m, v in ms.items() if m not in fell_back} or ms
    if not timed:
        raise RuntimeError("every timing probe failed")
    slowest = max(timed, key=timed.get)
    fallback = timed[slowest]  # a model whose probe failed is assumed as slow as the slowest
    if args.equal_time:
        steps = {m: max(1, int(args.budget_s * 1000.0 / ms.get(m, fallback))) for m in args.models}
        args.budget_note = (f"equal wall-clock: every model trains {args.budget_s:g} s (--budget-s --equal-time: "
                            f"train.py --time-budget, a schedule on seconds); at most {TIME_CAP_STEPS}x the "
                            f"steps of a {args.probe_steps}-step timing probe")
        log(f"[compare] equal wall-clock budget of {args.budget_s:g}s: "
            + ", ".join(f"{m} {n} steps" for m, n in steps.items()))
    else:
        common = max(1, int(args.budget_s * 1000.0 / timed[slowest]))
        steps = {m: common for m in args.models}
        args.budget_note = (f"equal steps: {common} per model, so that the slowest model ({slowest}, "
                            f"{timed[slowest]:.1f} ms/step in the probe) trains about {args.budget_s:g} s (--budget-s)")
        log(f"[compare] common budget: {common} steps (slowest model: {slowest}, {timed[slowest]:.1f} ms/step, "
            f"budget {args.budget_s:g}s" + (f"; left out: {', '.join(fell_back)} on the PyTorch fallback"
                                            if fell_back else "") + ")")
    args.ms_est = ms
    if args.deadline_s:  # all runs one after another must fit in what is left of the deadline
        runs = runs_of(args)
        avail = 0.9 * (args.deadline_s - (time.perf_counter() - args.t0) - OVERHEAD_S * len(runs))
        need = sum(steps[m] * ms.get(m, fallback) / 1000.0 for m, _ in runs)
        if need > avail:
            scale = max(avail, 0.0) / need
            steps = {m: max(1, int(n * scale)) for m, n in steps.items()}
            log(f"[compare] --deadline-s {args.deadline_s:g}: steps scaled by {scale:.2f} so that every run "
                f"fits: " + ", ".join(f"{m} {n}" for m, n in steps.items()))
            args.budget_note += f"; then scaled by {scale:.2f} to fit --deadline-s {args.deadline_s:g}"
    return steps


def _free_cuda():
    try:
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            torch.cuda.empty_cache()
    except Exception:  # a faulted context: nothing to free, the isolated runs do not need it
        pass


def _time_cap(args, runs_left: List[Tuple[str, Optional[int]]], steps: Dict[str, int]) -> Optional[float]:
    r"""``--max-time`` for the next run (``runs_left[0]``): the user's cap, shrunk so that the remaining
    runs still fit in ``--deadline-s``: what is left minus the later runs' expected time (probe
    ms/step x steps, when calibrated) and start-up overheads, or an equal share of what is left
    without estimates."""
    cap = args.max_time
    if args.deadline_s:
        left = args.deadline_s - (time.perf_counter() - args.t0)
        ms = getattr(args, "ms_est", None)
        if ms:
            fallback = max(ms.values())
            share = left - OVERHEAD_S * len(runs_left) - sum(steps[m] * ms.get(m, fallback) / 1000.0
                                                             for m, _ in runs_left[1:])
        else:
            share = left / len(runs_left) - OVERHEAD_S
        cap = share if cap is None else min(cap, share)
    return cap


def run_all(args, steps: Dict[str, int], log, on_row=lambda rows: None) -> List[Dict]:
    r"""Every ``(model, seed)`` run in turn; one row (train.py's metrics, or an ``error``) per run."""
    rows = []
    runs = runs_of(args)
    for i, (m, seed) in enumerate(runs):
        out = _out(args, m, seed)
        if args.equal_time:  # the seconds end each run and drive its schedule; the probe's count only caps it
            budget = ["--steps", str(TIME_CAP_STEPS * steps[m]), "--time-budget", f"{args.budget_s:g}"]
        else:
            budget = ["--steps", str(steps[m])]
        flags = _flags(args, m, seed) + budget + ["--out", out, "--no-progress"]
        if "--eval-every" not in flags:  # points on each test-MSE curve
            flags += ["--eval-every", str(max(1, steps[m] // args.curve_points))]
        done = _finished(flags, out) if args.reuse else None
        if done is not None:
            log(f"[compare] {m} (seed {done.get('seed')}): finished run kept from {out} (--reuse)")
            rows.append(done)
            on_row(rows)
            continue
        resume = args.reuse and os.path.isfile(os.path.join(out, "checkpoint.pt"))
        met = _run_capped(args, flags + (["--resume"] if resume else []), out, runs[i:], steps, log)
        if resume and "error" in met and "skipped" not in met["error"]:
            log(f"[compare] {m}: resuming {out} failed ({met['error'][:200]}); starting it afresh")
            met = _run_capped(args, flags, out, runs[i:], steps, log)
        if "error" in met and m in ("bsa", "ball") and "--backend" not in flags and "skipped" not in met["error"]:
            # a Triton kernel that passed the probe but failed on real batches: keep the model in the
            # table through the PyTorch reference, and say so
            log(f"[compare] {m} failed ({met['error'][:200]}); retrying with --backend torch")
            met = _run_capped(args, flags + ["--backend", "torch"], out, runs[i:], steps, log)
            met["note"] = "Triton backend failed; reran with the PyTorch reference"
        if "error" in met:
            met["seed"] = train.parse_args(flags).seed
        rows.append(met)
        on_row(rows)
    return rows


def _saved_calibration(args, log, path: Optional[str] = None) -> Optional[Dict[str, int]]:
    r"""``--reuse`` with ``--budget-s``: the steps per model of the earlier calibration recorded in
    ``--json`` (same budget and models), so that a rerun does not probe again and its step counts,
    hence its finished runs, stay the same. ``path``: read that file instead (``--calibration``)."""
    path = path or args.json
    try:
        saved = json.load(open(path))["budget"]
    except (OSError, ValueError, KeyError, TypeError):
        return None
    kind = "equal-time" if args.equal_time else "equal-steps"
    steps = saved.get("steps_per_model") or {}
    if saved.get("kind") != kind or saved.get("budget_s") != args.budget_s or set(steps) != set(args.models):
        return None
    args.budget_note = saved.get("note", "").split("; whole comparison limited")[0] + \
        f" (calibration read from {path}" + (", --reuse)" if path == args.json else ")")
    log(f"[compare] steps per model from the calibration in {path}: "
        + ", ".join(f"{m} {n}" for m, n in steps.items()))
    return {m: int(n) for m, n in steps.items()}


def _write_calibration(args, steps: Dict[str, int]) -> None:
    # the "budget" entry of --json's layout, so that _saved_calibration reads either file
    os.makedirs(os.path.dirname(os.path.abspath(args.calibration)), exist_ok=True)
    tmp = args.calibration + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"budget": {"kind": "equal-time" if args.equal_time else "equal-steps", "budget_s": args.budget_s,
                              "steps_per_model": steps, "note": _budget_line(args, steps)[len("- Budget: "):],
                              "ms_per_step_probe": getattr(args, "ms_est", {})}}, f, indent=1)
    os.replace(tmp, args.calibration)


def _finished(flags: List[str], out: str) -> Optional[Dict]:
    r"""The row of a finished run in ``out`` made with the same train.py flags (those that define a
    run: ``train.run_config``) and all its steps done; ``None`` otherwise."""
    path = os.path.join(out, "metrics.json")
    if not os.path.isfile(path):
        return None
    try:
        met = json.load(open(path))
        saved = json.loads(json.dumps({k: v for k, v in sorted({**train.ADDED_FLAGS, **met["args"]}.items())
                                       if k not in train.RESUME_MAY_CHANGE}))
        if saved != train.run_config(train.parse_args(flags)) or met["steps"] != met["planned_steps"]:
            return None
    except (ValueError, KeyError, TypeError, AttributeError):  # unreadable or from another version: rerun
        return None
    met["ms_per_step_steady"] = _steady_ms(met.get("train_log") or [])
    met["reused"] = True
    return met


def _run_capped(args, flags: List[str], out: str, runs_left: List[Tuple[str, Optional[int]]],
                steps: Dict[str, int], log) -> Dict:
    model = flags[flags.index("--model") + 1]
    cap = _time_cap(args, runs_left, steps)
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


def _ms(r: Dict) -> float:
    return r.get("ms_per_step_steady") or r["ms_per_step"]


SUMMARY_KEYS = ("test_mse", "test_mse_phys", "test_rel_l2", "final_train_loss", "ms_per_step", "peak_memory_mb",
                "train_time_s")


def summarize(rows: List[Dict], models: Sequence[str]) -> List[Dict]:
    r"""One dict per model over its seeds: ``KEY_mean``, ``KEY_std`` (sample standard deviation,
    ``None`` with fewer than two seeds) and ``KEY_min``/``KEY_max`` for each of ``SUMMARY_KEYS``
    (ms/step: the steady value), the seeds that ran, the failed ones, parameters, GFLOPs and steps."""
    out = []
    for m in models:
        rs = [r for r in rows if r["model"] == m]
        ok = [r for r in rs if "error" not in r]
        s = {"model": m, "seeds": [r.get("seed") for r in ok], "n_seeds": len(ok),
             "failed": [{"seed": r.get("seed"), "error": r["error"]} for r in rs if "error" in r]}
        for key in SUMMARY_KEYS:
            vals = [_ms(r) if key == "ms_per_step" else r.get(key) for r in ok]
            vals = [float(v) for v in vals if v is not None]
            s[key + "_mean"] = statistics.fmean(vals) if vals else None
            s[key + "_std"] = statistics.stdev(vals) if len(vals) > 1 else None
            s[key + "_min"] = min(vals) if vals else None
            s[key + "_max"] = max(vals) if vals else None
        first = ok[0] if ok else {}
        s.update(parameters=first.get("parameters"), gflops_per_cloud=first.get("gflops_per_cloud"),
                 steps=sorted({r["steps"] for r in ok}), stopped_early=any(r.get("stopped_early") for r in ok),
                 backends=sorted({r["backend"] for r in ok if r.get("backend")}),
                 notes=sorted({r["note"] for r in ok if r.get("note")}))
        if rs:
            out.append(s)
    return out


def _pm(mean, std, spec: str) -> str:
    if mean is None:
        return "n/a"
    return format(mean, spec) + ("" if std is None else " ± " + format(std, spec))


def _budget_line(args, steps: Dict[str, int]) -> str:
    note = getattr(args, "budget_note", None)
    if note is None:
        n = sorted(set(steps.values()))
        note = (f"equal steps: {n[0] if len(n) == 1 else n} per model "
                + ("(--steps)" if args.steps else "(the default; --steps N to change)"))
    return f"- Budget: {note}" + (f"; whole comparison limited to --deadline-s {args.deadline_s:g}"
                                  if args.deadline_s else "")


TIME_CAP_STEPS = 2  # with --equal-time, a run's step cap: this many times the probe's estimate
TIME_SLACK = 0.2  # an equal-time run whose training seconds miss the budget by more is flagged


def _seconds_lines(ok: List[Dict], args) -> List[str]:
    r"""With ``--equal-time``: the seconds each model trained (min-max over its seeds), and a warning
    naming the models more than ``TIME_SLACK`` off the budget (runs on ``--time-budget`` end at it
    unless their step cap, twice the probe's estimate, or ``--max-time``/``--deadline-s`` ends them first;
    calibrations of older versions set the step count alone)."""
    if not (args.equal_time and args.budget_s):
        return []
    spans, off = [], []
    for m in args.models:
        secs = [r["train_time_s"] for r in ok if r["model"] == m and r.get("train_time_s") is not None]
        if not secs:
            continue
        spans.append(f"{m} {min(secs):.1f}" + (f"-{max(secs):.1f}" if max(secs) > min(secs) else ""))
        if any(abs(t / args.budget_s - 1) > TIME_SLACK for t in secs):
            off.append(m)
    lines = [f"- Seconds trained (budget {args.budget_s:g} s): " + ", ".join(spans)] if spans else []
    if off:
        lines.append(f"- **Not equal time:** {', '.join(off)} trained more than {TIME_SLACK:.0%} off the budget "
                     "(a step or time cap ended them first): compare by the seconds above, not as equal time")
    return lines


def markdown(rows: List[Dict], args, steps: Dict[str, int], argv: Sequence[str]) -> str:
    ok = [r for r in rows if "error" not in r]
    first = ok[0] if ok else {}
    device = first.get("device_name", "?")
    seeds = args.seeds or sorted({r.get("seed") for r in rows if r.get("seed") is not None}) or ["?"]
    common = sorted(set(steps.values()))
    lines = [
        f"### {args.title}",
        "",
        f"- Command: `python {getattr(args, 'script', 'examples/compare.py')} "
        f"{' '.join(shlex.quote(a) for a in argv)}`",
        f"- Device: {device}; torch {torch.__version__}, Python {platform.python_version()}; "
        f"{datetime.datetime.now(datetime.timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}",
        f"- Data: `{first.get('dataset', '?')}`, {first.get('train_clouds', '?')} training / "
        f"{first.get('test_clouds', '?')} test clouds, {_fmt(first.get('mean_points'), '.0f')} points per cloud; "
        f"seed{'s' if len(seeds) > 1 else ''} {', '.join(map(str, seeds))} (model init, data order); "
        + (f"{common[0]} steps per model" if len(common) == 1 else "steps per model in the table")
        + f", batch {first.get('args', {}).get('batch_size', '?')}, precision {first.get('precision', '?')}",
        _budget_line(args, steps),
    ] + _seconds_lines(ok, args) + [
        "",
    ]
    mem = first.get("peak_memory_kind")
    mem_note = ("CUDA max allocated per run." if mem == "cuda_allocated" else
                "process peak RSS (CPU)" + (", per run." if args.isolate else ", cumulative over the runs of one process."))
    legend = ("MSE (norm.) is on the standardised target; (phys.) in the dataset's units; rel. L2 is the "
              "mean per-cloud ||pred - true|| / ||true|| in physical units. GFLOPs: forward, one cloud of the "
              "mean size (flops.py for the attention models, an analytic estimate for the baselines). "
              "ms/step: training time per optimiser step (forward, backward, update) after the first logging "
              "interval (compilation and autotuning left out). \"(time cap)\": stopped by --max-time/--deadline-s "
              "before the common step count. Peak memory: " + mem_note)
    if args.seeds and len(args.seeds) > 1:
        return "\n".join(lines + _seed_tables(rows, args) + ["", legend + " Mean ± sample standard deviation "
                                                             "over the seeds that finished; ms/step and peak memory: "
                                                             "mean over the seeds.", ""])
    ref_name = getattr(args, "ref_model", "full")
    ref = next((r for r in ok if r["model"] == ref_name), None)
    lines += [
        f"| model | test MSE (norm.) | test MSE (phys.) | rel. L2 | vs {ref_name} | params | GFLOPs/cloud | ms/step | "
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
        lines.append(
            f"| {name} | {r['test_mse']:.4f} | {r['test_mse_phys']:.4g} | {r['test_rel_l2']:.4f} | {rel} | "
            f"{r['parameters']:,} | {r['gflops_per_cloud']:.3g} | {_ms(r):.1f} | "
            f"{r['peak_memory_mb']:.0f} | {steps_note} |")
        if r.get("note"):
            lines.append(f"| ↳ {r['model']}: {r['note']} | | | | | | | | | |")
    lines += ["", legend, ""]
    return "\n".join(lines)


def _seed_tables(rows: List[Dict], args) -> List[str]:
    summ = summarize(rows, args.models)
    ref_name = getattr(args, "ref_model", "full")
    ref = next((s for s in summ if s["model"] == ref_name and s["n_seeds"]), None)
    lines = [
        f"| model | test MSE (norm.) | rel. L2 | test MSE (phys.) | vs {ref_name} | params | GFLOPs/cloud | ms/step | "
        "peak mem (MB) | steps | seeds |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for s in summ:
        if not s["n_seeds"]:
            lines.append(f"| {s['model']} | failed: {s['failed'][0]['error'][:80]} | | | | | | | | | 0 |")
            continue
        rel = f"{100 * (s['test_mse_mean'] / ref['test_mse_mean'] - 1):+.1f}%" if ref else "n/a"
        name = s["model"] + (f" ({'/'.join(s['backends'])})" if s["backends"] else "")
        steps_note = "/".join(map(str, s["steps"])) + (" (time cap)" if s["stopped_early"] else "")
        seeds_note = f"{s['n_seeds']}" + (f" ({len(s['failed'])} failed)" if s["failed"] else "")
        lines.append(
            f"| {name} | {_pm(s['test_mse_mean'], s['test_mse_std'], '.4f')} | "
            f"{_pm(s['test_rel_l2_mean'], s['test_rel_l2_std'], '.4f')} | {_fmt(s['test_mse_phys_mean'], '.4g')} | "
            f"{rel} | {s['parameters']:,} | {s['gflops_per_cloud']:.3g} | {s['ms_per_step_mean']:.1f} | "
            f"{s['peak_memory_mb_mean']:.0f} | {steps_note} | {seeds_note} |")
        for note in s["notes"]:
            lines.append(f"| ↳ {s['model']}: {note} | | | | | | | | | | |")
    seeds = list(args.seeds)
    lines += ["", "Test MSE (norm.) per seed:", "",
              "| model | " + " | ".join(f"seed {x}" for x in seeds) + " |", "|---|" + "---|" * len(seeds)]
    for m in args.models:
        by_seed = {r.get("seed"): r for r in rows if r["model"] == m}
        if by_seed:
            lines.append(f"| {m} | " + " | ".join(
                "" if x not in by_seed else ("failed" if "error" in by_seed[x] else f"{by_seed[x]['test_mse']:.4f}")
                for x in seeds) + " |")
    return lines


def _eval_points(r: Dict) -> List[Tuple[int, float, float]]:
    r"""``(step, training seconds, test MSE)`` of a run's evaluations; the seconds come from the eval
    log (train.py records them) or, for older logs, are interpolated on the train log."""
    ev, tr = r.get("eval_log") or [], r.get("train_log") or []
    pts = []
    for e in ev:
        t = e.get("train_time_s")
        if t is None and tr:
            t = float(np.interp(e["step"], [0] + [x["step"] for x in tr], [0.0] + [x["train_time_s"] for x in tr]))
        pts.append((e["step"], t, e["test_mse"]))
    return pts


def _band(runs: List[List[Tuple[float, float]]]):
    r"""Curves of several seeds as ``(x, mean, min, max)`` per step: ``runs`` holds per seed a list of
    ``(step, x, y)``; x is averaged over the seeds that reached that step."""
    by_step: Dict[int, List[Tuple[float, float]]] = {}
    for pts in runs:
        for step, x, y in pts:
            if x is not None and y is not None:
                by_step.setdefault(step, []).append((x, y))
    steps = sorted(by_step)
    xs = [statistics.fmean(p[0] for p in by_step[k]) for k in steps]
    ys = [[p[1] for p in by_step[k]] for k in steps]
    return xs, [statistics.fmean(y) for y in ys], [min(y) for y in ys], [max(y) for y in ys]


def _band_time(runs: List[List[Tuple[int, float, float]]]):
    r"""Curves of several seeds against training seconds as ``(x, mean, min, max)``: each seed's
    ``(step, seconds, y)`` points are interpolated (log y) at every seed's evaluation times inside the
    span all seeds share (every seed's, when they share none). Grouping by step instead (``_band``)
    folds the line back when seeds reach a step at different times, e.g. runs that end at one
    ``--time-budget`` after different step counts."""
    curves = [sorted((x, y) for _, x, y in pts if x is not None and y is not None and y > 0) for pts in runs]
    curves = [c for c in curves if c]
    xs, mean, lo, hi = [], [], [], []
    if not curves:
        return xs, mean, lo, hi
    start, end = max(c[0][0] for c in curves), min(c[-1][0] for c in curves)
    for g in sorted({x for c in curves for x, _ in c}):
        if start <= end and not start <= g <= end:
            continue
        ys = [math.exp(float(np.interp(g, [x for x, _ in c], [math.log(y) for _, y in c])))
              for c in curves if c[0][0] <= g <= c[-1][0]]
        xs.append(g)
        mean.append(statistics.fmean(ys))
        lo.append(min(ys))
        hi.append(max(ys))
    return xs, mean, lo, hi


def plot(rows: List[Dict], path: str, time_path: Optional[str] = None):
    r"""``path``: train loss and test MSE against steps; ``time_path``: test MSE against training
    seconds. One line per model (the mean over its seeds) with a min-max band when it has several."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    models = list(dict.fromkeys(r["model"] for r in rows if "error" not in r))
    fig, (ax_tr, ax_te) = plt.subplots(1, 2, figsize=(11, 4))
    fig_t, ax_t = plt.subplots(figsize=(6, 4))
    for i, m in enumerate(models):
        rs = [r for r in rows if r["model"] == m and "error" not in r]
        color = f"C{i % 10}"
        label = m + (f" ({len(rs)} seeds)" if len(rs) > 1 else "")
        curves = [
            (ax_tr, [[(e["step"], e["step"], e["loss"]) for e in r.get("train_log") or []] for r in rs], "-", _band),
            (ax_te, [[(s, s, y) for s, _, y in _eval_points(r)] for r in rs], "o-", _band),
            (ax_t, [_eval_points(r) for r in rs], "o-", _band_time),
        ]
        for ax, runs, style, band in curves:
            xs, mean, lo, hi = band(runs)
            if not xs:
                continue
            ax.plot(xs, mean, style, color=color, label=label, markersize=3)
            if len(rs) > 1:
                ax.fill_between(xs, lo, hi, color=color, alpha=0.2, linewidth=0)
    for ax, x, y in ((ax_tr, "step", "train MSE (normalised)"), (ax_te, "step", "test MSE (normalised)"),
                     (ax_t, "training time (s)", "test MSE (normalised)")):
        ax.set_yscale("log")
        ax.set_xlabel(x)
        ax.set_ylabel(y)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    ax_t.set_title("test MSE against training time (mean, min-max over seeds)", fontsize=9)
    for f, p in ((fig, path), (fig_t, time_path)):
        if p is not None:
            f.tight_layout()
            f.savefig(p, dpi=110)
        plt.close(f)


def main(argv: Optional[Sequence[str]] = None) -> List[Dict]:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parse_args(argv)
    args.t0 = time.perf_counter()
    log = lambda s: print(s, flush=True)  # noqa: E731
    os.makedirs(args.out, exist_ok=True)
    for path in (args.results, args.json):
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    if args.budget_s:
        steps = _saved_calibration(args, log, args.calibration) if args.calibration else None
        steps = steps or (_saved_calibration(args, log) if args.reuse else None)
        if steps is None:
            steps = calibrate(args, log)
            if args.calibration:
                _write_calibration(args, steps)
        if args.calibrate_only:
            log(f"[compare] --calibrate-only: steps per model in {args.calibration}")
            return []
    else:
        steps = {m: args.steps or 150 for m in args.models}
    common = sorted(set(steps.values()))

    def write(rows: List[Dict]):  # after every run: an interrupted comparison keeps what it finished
        with open(args.results, "w") as f:
            f.write(markdown(rows, args, steps, argv))
        with open(args.json, "w") as f:
            json.dump({"steps": common[0] if len(common) == 1 else steps,
                       "budget": {"kind": "equal-time" if args.equal_time else "equal-steps",
                                  "budget_s": args.budget_s, "steps_per_model": steps,
                                  "note": _budget_line(args, steps)[len("- Budget: "):]},
                       "seeds": args.seeds, "argv": argv, "rows": rows, "summary": summarize(rows, args.models)},
                      f, indent=1, default=str)
        plot(rows, os.path.join(args.out, "compare.png"), os.path.join(args.out, "compare_time.png"))

    rows = run_all(args, steps, log, on_row=write)
    print(markdown(rows, args, steps, argv))
    log(f"[compare] done in {time.perf_counter() - args.t0:.0f}s; table in {args.results}, JSON in {args.json}")
    return rows


if __name__ == "__main__":
    main()
