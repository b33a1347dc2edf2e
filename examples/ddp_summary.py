"""Summarise the 2-GPU data-parallel check of examples/run_ddp_check.sh: speed-up, loss-curve
agreement with the 1-GPU run, kill-and-resume.

    python examples/ddp_summary.py --work runs/ddp_check --out runs/ddp_check_out

Reads ``metrics.json`` (and the run's log, ``WORK/NAME.log``) of the runs in ``--work``:

- ``1gpu``: one process, global batch B; ``1gpu_seed1``: the same with another seed (optional:
  the seed-noise scale of the loss curve);
- ``2gpu_half``: two processes with B/2 each (the same global batch, and the same clouds in every
  step, as ``1gpu``): its loss curve should match ``1gpu`` within seed noise;
- ``2gpu_full``: two processes with B each (the same per-GPU batch as ``1gpu``): throughput scaling;
- ``2gpu_resume``: ``2gpu_half`` killed mid-way and continued with ``--resume``.

Writes ``ddp_check.json``, ``ddp_check.md`` and ``ddp_loss.png`` to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import re
import statistics
from typing import Dict, Optional, Sequence

RUNS = ("1gpu", "1gpu_seed1", "2gpu_half", "2gpu_full", "2gpu_resume")
SPEEDUP_TARGET = 1.8  # issue 12: at the same per-GPU batch


def load_run(work: str, name: str) -> Optional[Dict]:
    r"""``metrics.json`` of ``WORK/NAME`` with its logs, and ``log``: the text of ``WORK/NAME.log``
    (``None`` entries where a file is missing)."""
    path = os.path.join(work, name, "metrics.json")
    log_path = os.path.join(work, name + ".log")
    log = open(log_path, errors="replace").read() if os.path.isfile(log_path) else None
    if not os.path.isfile(path):
        return {"missing": True, "log": log} if log is not None else None
    with open(path) as f:
        met = json.load(f)
    met["log"] = log
    return met


def steady_throughput(met: Dict, skip: int = 2) -> Optional[float]:
    r"""Median points per second (all ranks together) of the train-log intervals after the first
    ``skip`` (allocation, compilation and autotuning happen there)."""
    rows = met.get("train_log") or []
    vals = [r["points_per_s"] for r in rows[skip:] if r.get("points_per_s")]
    if not vals:
        vals = [r["points_per_s"] for r in rows if r.get("points_per_s")]
    return statistics.median(vals) if vals else None


def steady_ms(met: Dict, skip: int = 2) -> Optional[float]:
    r"""ms per optimiser step from the train log's cumulative training time, after ``skip`` rows."""
    rows = met.get("train_log") or []
    if len(rows) <= skip:
        return met.get("ms_per_step")
    a, b = rows[skip - 1] if skip else {"step": 0, "train_time_s": 0.0}, rows[-1]
    return 1000.0 * (b["train_time_s"] - a["train_time_s"]) / max(b["step"] - a["step"], 1)


def curve_diff(a: Dict, b: Dict) -> Dict:
    r"""Relative difference ``|a - b| / |b|`` of two train-loss curves at their common logged steps:
    maximum, median, the step of the maximum, and the relative difference of the final test MSE."""
    la = {r["step"]: r["loss"] for r in a.get("train_log") or []}
    lb = {r["step"]: r["loss"] for r in b.get("train_log") or []}
    steps = sorted(set(la) & set(lb))
    rel = [abs(la[s] - lb[s]) / max(abs(lb[s]), 1e-30) for s in steps]
    out = {"common_steps": len(steps), "max_rel": max(rel) if rel else None,
           "median_rel": statistics.median(rel) if rel else None,
           "step_of_max": steps[rel.index(max(rel))] if rel else None,
           "test_mse_rel": None}
    if a.get("test_mse") is not None and b.get("test_mse"):
        out["test_mse_rel"] = abs(a["test_mse"] - b["test_mse"]) / abs(b["test_mse"])
    return out


_RESUMED = re.compile(r"resumed from \S+ at step (\d+)")


def resume_check(met: Optional[Dict], killed_log: Optional[str]) -> Dict:
    r"""Did the killed run stop before its end and the resumed one finish all steps from a
    checkpoint in between? ``killed_log``: the log of the killed invocation."""
    out = {"killed_before_end": None, "resumed_at_step": None, "finished": False, "ok": False}
    if killed_log is not None:
        out["killed_before_end"] = "final test MSE" not in killed_log
    if met is None or met.get("missing"):
        return out
    m = _RESUMED.search(met.get("log") or "")
    out["resumed_at_step"] = int(m.group(1)) if m else None
    out["finished"] = met["steps"] == met["planned_steps"] and not met.get("stopped_early")
    out["ok"] = bool(out["finished"] and out["killed_before_end"] and out["resumed_at_step"] is not None
                     and 0 < out["resumed_at_step"] < met["planned_steps"])
    return out


def summarize(work: str, curve_tol: float = 0.05) -> Dict:
    runs = {name: load_run(work, name) for name in RUNS}
    done = {k: v for k, v in runs.items() if v is not None and not v.get("missing")}
    s: Dict = {"work": work, "runs": {}}
    for name, met in done.items():
        s["runs"][name] = {k: met.get(k) for k in ("world_size", "device_name", "backend", "precision", "steps",
                                                   "planned_steps", "test_mse", "test_rel_l2", "ms_per_step",
                                                   "peak_memory_mb", "seed")}
        s["runs"][name]["batch_per_rank"] = met.get("args", {}).get("batch_size")
        s["runs"][name]["global_batch"] = (met.get("args", {}).get("batch_size") or 0) * (met.get("world_size") or 1)
        s["runs"][name]["points_per_s"] = steady_throughput(met)
        s["runs"][name]["ms_per_step_steady"] = steady_ms(met)
    s["missing"] = [n for n in RUNS if n not in done and n != "1gpu_seed1"]
    one = s["runs"].get("1gpu")

    def speedup(name):
        r = s["runs"].get(name)
        if one and r and one["points_per_s"] and r["points_per_s"]:
            return r["points_per_s"] / one["points_per_s"]
        return None
    s["speedup_same_per_gpu_batch"] = speedup("2gpu_full")
    s["speedup_same_global_batch"] = speedup("2gpu_half")
    s["speedup_target"] = SPEEDUP_TARGET
    s["speedup_ok"] = None if s["speedup_same_per_gpu_batch"] is None else \
        s["speedup_same_per_gpu_batch"] >= SPEEDUP_TARGET
    s["curve_2gpu_vs_1gpu"] = curve_diff(done["2gpu_half"], done["1gpu"]) \
        if "2gpu_half" in done and "1gpu" in done else None
    s["curve_seed_noise"] = curve_diff(done["1gpu_seed1"], done["1gpu"]) \
        if "1gpu_seed1" in done and "1gpu" in done else None
    s["curve_resumed_vs_straight"] = curve_diff(done["2gpu_resume"], done["2gpu_half"]) \
        if "2gpu_resume" in done and "2gpu_half" in done else None
    c, noise = s["curve_2gpu_vs_1gpu"], s["curve_seed_noise"]
    if c is None or c["max_rel"] is None:
        s["curves_agree"], s["curves_agree_rule"] = None, "no common steps"
    elif noise is not None and noise["max_rel"] is not None:
        s["curves_agree"] = c["max_rel"] <= noise["max_rel"]
        s["curves_agree_rule"] = (f"largest relative difference 2-GPU vs 1-GPU <= that between seeds 0 and 1 on "
                                  f"1 GPU ({noise['max_rel']:.3g})")
    else:
        s["curves_agree"] = c["max_rel"] <= curve_tol
        s["curves_agree_rule"] = f"largest relative difference <= {curve_tol:g} (no seed-noise run)"
    killed_log_path = os.path.join(work, "2gpu_resume_killed.log")
    killed_log = open(killed_log_path, errors="replace").read() if os.path.isfile(killed_log_path) else None
    s["resume"] = resume_check(runs.get("2gpu_resume"), killed_log)
    return s


def _f(v, spec):
    return "n/a" if v is None else format(v, spec)


def markdown(s: Dict) -> str:
    r = s["runs"]
    first = next(iter(r.values()), {})
    lines = ["### Data-parallel check (examples/run_ddp_check.sh)", "",
             f"- Device: {first.get('device_name', '?')}; backend {first.get('backend')}, "
             f"precision {first.get('precision')}", ""]
    if s["missing"]:
        lines += [f"- **Missing runs:** {', '.join(s['missing'])} (see their logs in {s['work']})", ""]
    lines += ["| run | processes | batch per rank | global batch | steps | points/s (steady) | ms/step | "
              "test MSE | peak mem (MB) |", "|---|---|---|---|---|---|---|---|---|"]
    for name in RUNS:
        if name in r:
            x = r[name]
            lines.append(f"| {name} | {x['world_size']} | {x['batch_per_rank']} | {x['global_batch']} | "
                         f"{x['steps']} | {_f(x['points_per_s'], ',.0f')} | {_f(x['ms_per_step_steady'], '.1f')} | "
                         f"{_f(x['test_mse'], '.4f')} | {_f(x['peak_memory_mb'], '.0f')} |")
    c, n, rs = s["curve_2gpu_vs_1gpu"] or {}, s["curve_seed_noise"] or {}, s["curve_resumed_vs_straight"] or {}
    res = s["resume"]
    verdict = lambda ok: "n/a" if ok is None else ("yes" if ok else "**no**")  # noqa: E731
    lines += [
        "",
        f"- **Speed-up at the same per-GPU batch** (2gpu_full vs 1gpu, points/s): "
        f"{_f(s['speedup_same_per_gpu_batch'], '.2f')}x (target >= {s['speedup_target']:g}x: "
        f"{verdict(s['speedup_ok'])}); at the same global batch (2gpu_half): "
        f"{_f(s['speedup_same_global_batch'], '.2f')}x.",
        f"- **Loss curves, 2 GPUs vs 1 GPU at the same global batch:** largest relative difference of the "
        f"logged train loss {_f(c.get('max_rel'), '.3g')} (step {c.get('step_of_max')}), median "
        f"{_f(c.get('median_rel'), '.3g')}, final test MSE {_f(c.get('test_mse_rel'), '.3g')} apart; seed noise "
        f"(1 GPU, seed 1 vs 0): largest {_f(n.get('max_rel'), '.3g')}, median {_f(n.get('median_rel'), '.3g')}, "
        f"final test MSE {_f(n.get('test_mse_rel'), '.3g')}. Agree: {verdict(s['curves_agree'])} "
        f"({s['curves_agree_rule']}).",
        f"- **Kill and resume:** killed before the end: {verdict(res['killed_before_end'])}; resumed at step "
        f"{res['resumed_at_step']}; finished all steps: {verdict(res['finished'])}; OK: {verdict(res['ok'])}. "
        f"Resumed vs uninterrupted 2-GPU run: largest relative loss difference {_f(rs.get('max_rel'), '.3g')}, "
        f"final test MSE {_f(rs.get('test_mse_rel'), '.3g')} apart.",
        "",
        "points/s counts the points of every rank; the steady value is the median over the logging "
        "intervals after the first two. On CUDA bf16 and atomics make even two identical runs differ "
        "slightly, so agreement is judged against the seed-to-seed spread.", ""]
    return "\n".join(lines)


def plot(work: str, path: str):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, style in zip(RUNS, ("-", ":", "--", "-.", (0, (1, 3)))):
        met = load_run(work, name)
        if met and met.get("train_log"):
            ax.plot([r["step"] for r in met["train_log"]], [r["loss"] for r in met["train_log"]],
                    linestyle=style, label=f"{name} (x{met.get('world_size')}, batch {met['args']['batch_size']})")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("train MSE (normalised)")
    ax.grid(alpha=0.3)
    if ax.lines:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _env() -> Dict[str, str]:
    import platform
    import torch
    env = dict(torch=torch.__version__, python=platform.python_version(), cpu=platform.machine())
    if torch.cuda.is_available():
        env["gpu"] = f"{torch.cuda.device_count()}x {torch.cuda.get_device_name(0)}"
        env["cuda"] = str(torch.version.cuda)
    return env


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", required=True, help="folder with the runs (run_ddp_check.sh's WORK)")
    p.add_argument("--out", required=True, help="folder for ddp_check.json / .md / ddp_loss.png")
    p.add_argument("--curve-tol", type=float, default=0.05,
                   help="largest relative loss difference accepted when there is no seed-noise run")
    args = p.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    s = summarize(args.work, args.curve_tol)
    # where and how the figures were made, as every saved benchmark JSON says (docs/bench)
    s = dict(env=_env(), command="bash examples/run_ddp_check.sh (" + " ".join(sys.argv[1:]) + ")", **s)
    with open(os.path.join(args.out, "ddp_check.json"), "w") as f:
        json.dump(s, f, indent=1)
    md = markdown(s)
    with open(os.path.join(args.out, "ddp_check.md"), "w") as f:
        f.write(md)
    try:
        plot(args.work, os.path.join(args.out, "ddp_loss.png"))
    except ImportError:  # no matplotlib: the table is what matters
        pass
    print(md, flush=True)
    return s


if __name__ == "__main__":
    main()
