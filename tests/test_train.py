"""End-to-end checks of examples/train.py on the tiny synthetic 'toy' dataset (CPU, seconds each)."""
import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest
import torch

from torch_geometric_bsa.io import load_checked, save_checked

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load(name):
    spec = importlib.util.spec_from_file_location(f"_example_{name}", os.path.join(ROOT, "examples", f"{name}.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _load("train")

TINY = ["--dataset", "toy", "--num-train", "6", "--num-test", "3", "--batch-size", "2", "--hidden", "16",
        "--layers", "1", "--heads", "2", "--ball-size", "32", "--cmp-block", "4", "--slc-block", "4",
        "--topk", "2", "--group-size", "4", "--knn", "4", "--no-progress", "--threads", "1"]


def _final_params(out):
    ck = load_checked(os.path.join(out, "checkpoint.pt"))
    return ck["model"], ck


@pytest.mark.parametrize("model", train.MODELS)
def test_tiny_training_every_model(tmp_path, model):
    out = str(tmp_path / model)
    m = train.main(TINY + ["--model", model, "--steps", "4", "--log-every", "2", "--eval-every", "2",
                           "--out", out])
    assert m["steps"] == 4 and m["parameters"] > 0 and m["gflops_per_cloud"] > 0
    for key in ("test_mse", "test_mse_phys", "test_rel_l2", "ms_per_step", "peak_memory_mb"):
        assert m[key] == m[key] and m[key] >= 0, key  # finite, not NaN
    files = set(os.listdir(out))
    assert {"metrics.json", "train_log.csv", "eval_log.csv", "checkpoint.pt", "loss.png", "field.png"} <= files
    saved = json.load(open(os.path.join(out, "metrics.json")))
    assert [r["step"] for r in saved["eval_log"]] == [2, 4]
    assert [r["step"] for r in saved["train_log"]] == [2, 4]


def test_resume_is_exact(tmp_path):
    base = TINY + ["--model", "bsa", "--steps", "6", "--log-every", "1", "--no-plots"]
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    m1 = train.main(base + ["--out", straight])
    # 3 training clouds per epoch at batch 2: the stop at step 3 falls mid-epoch (the skip path)
    m_half = train.main(base + ["--out", split, "--stop-after", "3"])
    assert m_half["steps"] == 3 and m_half["stopped_early"]
    m2 = train.main(base + ["--out", split, "--resume"])
    p1, ck1 = _final_params(straight)
    p2, ck2 = _final_params(split)
    for k in p1:
        assert torch.equal(p1[k], p2[k]), k
    for a, b in zip(ck1["optimizer"]["state"].values(), ck2["optimizer"]["state"].values()):
        assert torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert ck1["scheduler"] == ck2["scheduler"]
    assert [r["loss"] for r in ck1["train_log"]] == [r["loss"] for r in ck2["train_log"]]
    assert m1["test_mse"] == m2["test_mse"] and m1["test_rel_l2"] == m2["test_rel_l2"]
    assert ck2["step"] == 6 and not m2["stopped_early"]
    # the RNG streams continue exactly too (dropout or random augmentations would draw from them)
    assert torch.equal(ck1["rng"][0]["torch"], ck2["rng"][0]["torch"])


def test_resume_across_epochs_with_periodic_checkpoints(tmp_path):
    # log every 2 steps but stop at an odd step: the partial loss average is carried over too
    base = TINY + ["--model", "pointnet", "--steps", "7", "--log-every", "2", "--ckpt-every", "2", "--no-plots"]
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    train.main(base + ["--out", a])
    train.main(base + ["--out", b, "--stop-after", "5"])
    train.main(base + ["--out", b, "--resume", os.path.join(b, "checkpoint.pt")])
    (pa, cka), (pb, ckb) = _final_params(a), _final_params(b)
    for k in pa:
        assert torch.equal(pa[k], pb[k]), k
    assert [r["loss"] for r in cka["train_log"]] == [r["loss"] for r in ckb["train_log"]]


def test_max_time_stops_early(tmp_path):
    m = train.main(TINY + ["--model", "full", "--steps", "50", "--max-time", "1e-6", "--no-plots",
                           "--out", str(tmp_path)])
    assert m["stopped_early"] and m["steps"] == 1 and m["planned_steps"] == 50


def test_cosine_by_fraction_follows_the_budget():
    spent = [0.0]
    f = train.cosine_by_fraction(lambda: spent[0], warmup_frac=0.1, min_ratio=0.01)
    vals = {}
    for p in (0.0, 0.05, 0.1, 0.55, 1.0, 1.7, -1.0):
        spent[0] = p
        vals[p] = f(123)  # the step number is ignored
    assert vals[0.0] == vals[-1.0] == pytest.approx(0.01) and vals[0.05] == pytest.approx(0.5)
    assert vals[0.1] == pytest.approx(1.0) and vals[0.55] == pytest.approx(0.505)
    assert vals[1.0] == vals[1.7] == pytest.approx(0.01)


def test_time_budget_ends_the_run_and_its_schedule(tmp_path):
    # equal wall-clock by construction: the schedule runs on training seconds and the run ends at the
    # budget, whatever a timing probe guessed; --steps is only a cap
    budget = 1.0
    m = train.main(TINY + ["--model", "full", "--time-budget", str(budget), "--log-every", "1", "--no-plots",
                           "--out", str(tmp_path)])
    log = json.load(open(str(tmp_path / "metrics.json")))["train_log"]
    dt = max(b["train_time_s"] - a["train_time_s"] for a, b in zip(log, log[1:]))
    assert budget <= m["train_time_s"] <= budget + 2 * dt + 0.05
    assert m["steps"] == m["planned_steps"] == log[-1]["step"] >= 5 and not m["stopped_early"]
    lrs = [r["lr"] for r in log]
    peak = lrs.index(max(lrs))
    assert max(lrs) > 0.9e-3 and lrs[0] < 0.5e-3 and lrs[-1] < 0.05e-3  # warm-up, top, end of the cosine
    assert all(a <= b for a, b in zip(lrs[:peak], lrs[1:peak + 1]))  # rises over the warm-up ...
    assert all(a >= b for a, b in zip(lrs[peak:], lrs[peak + 1:]))  # ... then only falls
    # a cap below what the seconds allow ends the run first (and the schedule stays unfinished)
    c = train.main(TINY + ["--model", "full", "--time-budget", "30", "--steps", "3", "--no-plots",
                           "--out", str(tmp_path / "cap")])
    assert c["steps"] == c["planned_steps"] == 3 and c["train_time_s"] < 30


def test_time_budget_resumes_on_its_clock(tmp_path):
    out = str(tmp_path / "r")
    a = train.main(TINY + ["--model", "pointnet", "--time-budget", "0.6", "--stop-after", "3", "--no-plots",
                           "--out", out])
    assert a["stopped_early"] and a["steps"] == 3 and a["train_time_s"] < 0.6
    b = train.main(TINY + ["--model", "pointnet", "--time-budget", "0.6", "--resume", "--no-plots", "--out", out])
    assert not b["stopped_early"] and b["steps"] > 3 and b["train_time_s"] >= 0.6
    assert json.load(open(os.path.join(out, "metrics.json")))["train_log"][-1]["lr"] < 0.05e-3  # schedule ended
    with pytest.raises(train.RunError, match="other flags"):  # another budget is another run
        train.main(TINY + ["--model", "pointnet", "--time-budget", "0.9", "--resume", "--no-plots", "--out", out])


def test_time_budget_refuses_several_processes(monkeypatch, capsys):
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(SystemExit):
        train.parse_args(TINY + ["--time-budget", "5"])
    assert "--time-budget: runs one process" in capsys.readouterr().err


def test_sampler_shards_and_skips():
    full = list(train.ShardSampler(10, 0, 1, seed=3))
    assert sorted(full) == list(range(10))
    r0, r1 = list(train.ShardSampler(10, 0, 2, seed=3)), list(train.ShardSampler(10, 1, 2, seed=3))
    assert sorted(r0 + r1) == list(range(10))
    s = train.ShardSampler(10, 0, 1, seed=3)
    s.set_epoch(0, 4)
    assert list(s) == full[4:] and len(s) == 6
    s.set_epoch(1)
    assert sorted(s) == list(range(10)) and list(s) != full


def test_data_kw_values():
    assert train._key_value("n_length=30") == ("n_length", 30)
    assert train._key_value("offset=2.5") == ("offset", 2.5)
    assert train._key_value("isolated=false") == ("isolated", False)
    assert train._key_value("gap=0.2,1.0") == ("gap", (0.2, 1.0))
    assert train._key_value("num_bodies=3,4") == ("num_bodies", (3, 4))
    with pytest.raises(Exception, match="KEY=VALUE"):
        train._key_value("gap")


def test_schedule_warmup_and_cosine():
    f = train.cosine_with_warmup(100, 0.1, 0.01)
    assert f(0) == pytest.approx(0.1) and f(9) == pytest.approx(1.0)
    assert f(10) == pytest.approx(1.0) and f(100) == pytest.approx(0.01)
    assert all(f(i) >= f(i + 1) for i in range(10, 100))


@pytest.mark.parametrize("bad, msg", [
    (["--model", "transformer"], "invalid choice"),
    (["--steps", "0"], "positive integer"),
    (["--steps", "5", "--epochs", "2"], "not allowed with"),
    (["--hidden", "30", "--heads", "4"], "must divide"),
    (["--ball-size", "30", "--cmp-block", "8"], "BSA sizes"),
    (["--warmup", "1.5"], r"\[0, 1\)"),
    (["--resume", "/nonexistent/ck.pt"], "no checkpoint"),
    (["--data-kw", "oops"], "KEY=VALUE"),
])
def test_bad_flags_give_argparse_errors(bad, msg, capsys):
    with pytest.raises(SystemExit) as e:
        train.parse_args(bad)
    assert e.value.code == 2
    assert __import__("re").search(msg, capsys.readouterr().err)


@pytest.mark.parametrize("bad, flag", [
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--weight-decay", "nan"], "--weight-decay"),
    (["--grad-clip", "-1"], "--grad-clip"),
    (["--grad-clip", "inf"], "--grad-clip"),  # 0 turns clipping off; inf is not a way to say so
    (["--seed", "-1"], "--seed"),
    (["--seed", str(2 ** 32)], "--seed"),
    (["--lr", "0"], "--lr"),
    (["--lr", "-0.001"], "--lr"),
    (["--lr", "inf"], "--lr"),
    (["--steps", "-2"], "--steps"),
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--device", "gpu"], "--device"),
    (["--device", "cuda:x"], "--device"),
    (["--ckpt-every", "-1"], "--ckpt-every"),
    (["--log-every", "0"], "--log-every"),
    (["--eval-every", "-1"], "--eval-every"),
    (["--threads", "0"], "--threads"),
    (["--max-time", "0"], "--max-time"),
    (["--stop-after", "0"], "--stop-after"),
    (["--min-lr-ratio", "-0.5"], "--min-lr-ratio"),
    (["--mlp-ratio", "0.001"], "--mlp-ratio"),
    (["--model", "bsa", "--backend", "triton", "--device", "cpu"], "--backend"),
    (["--data-kw", "n_length=6"], "--data-kw"),  # the toy dataset takes no keywords
    (["--dataset", "car", "--data-kw", "no_such_key=1"], "--data-kw"),
])
def test_invalid_flag_values_exit_naming_the_flag(bad, flag, tmp_path, capsys, monkeypatch):
    def never(*a, **k):
        raise AssertionError("the flags must be rejected before any data generation or model building")
    monkeypatch.setattr(train, "load_splits", never)
    monkeypatch.setattr(train, "build_model", never)
    with pytest.raises(SystemExit) as e:
        train.main(TINY + ["--steps", "2", "--out", str(tmp_path)] + bad)
    assert e.value.code == 2
    assert f"error: argument {flag}:" in capsys.readouterr().err


@pytest.mark.parametrize("cuda, count, device, msg", [
    (False, 0, "cuda", "CUDA is not available"),
    (False, 0, "cuda:0", "CUDA is not available"),
    (True, 1, "cuda:1", "only 1 CUDA device"),
])
def test_invalid_device_flag_without_that_gpu(cuda, count, device, msg, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: count)
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--device", device])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "error: argument --device:" in err and msg in err


def test_invalid_out_flag_and_cli_exit_status(tmp_path, capsys):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py")] + TINY +
                       ["--grad-clip", "-1", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and "error: argument --grad-clip:" in r.stderr, r.stderr[-2000:]
    afile = tmp_path / "a_file"
    afile.write_text("")
    with pytest.raises(SystemExit) as e:
        train.parse_args(TINY + ["--out", str(afile)])
    assert e.value.code == 2 and "error: argument --out:" in capsys.readouterr().err


def test_flag_edge_values_work(tmp_path):
    # the lower ends are valid: no clipping, no weight decay, seed 0, checkpoint/evaluate at the end only;
    # --num-points now sizes the toy clouds too (it used to be accepted and ignored)
    m = train.main(TINY + ["--model", "pointnet", "--steps", "2", "--grad-clip", "0", "--weight-decay", "0",
                           "--seed", "0", "--ckpt-every", "0", "--eval-every", "0", "--num-points", "50",
                           "--no-plots", "--out", str(tmp_path)])
    assert m["steps"] == 2 and m["mean_points"] == 50 and m["test_mse"] == m["test_mse"]


# lr 1e30 without clipping: AdamW's first update moves every weight by ~1e30, so the forward of step 2
# overflows and its loss is NaN (the loss of step 1, on the initial weights, is finite)
DIVERGE = TINY + ["--model", "pointnet", "--steps", "6", "--lr", "1e30", "--grad-clip", "0", "--no-plots"]


@pytest.mark.parametrize("flags, detected_at", [
    (["--log-every", "1", "--eval-every", "0", "--ckpt-every", "0"], 2),   # caught by the logged loss
    (["--log-every", "4", "--eval-every", "0", "--ckpt-every", "0"], 4),   # ... which still names step 2
    (["--log-every", "10", "--eval-every", "0", "--ckpt-every", "1"], 2),  # caught before the checkpoint
])
def test_nan_loss_stops_with_a_clear_error(tmp_path, flags, detected_at):
    out = str(tmp_path)
    with pytest.raises(train.NonFiniteLossError) as e:
        train.main(DIVERGE + flags + ["--out", out])
    msg = str(e.value)
    assert "non-finite" in msg and "at step 2 of 6" in msg and "--lr" in msg and "--grad-clip" in msg
    info = json.load(open(os.path.join(out, "nonfinite.json")))
    assert info["step"] == 2 and info["detected_at_step"] == detected_at and info["error"] == msg
    assert len(info["train_indices_per_rank"]["0"]) == 2
    assert not os.path.exists(os.path.join(out, "metrics.json"))
    if "--ckpt-every" in flags and flags[flags.index("--ckpt-every") + 1] == "1":
        # the step-1 checkpoint is kept, not overwritten by the diverged state
        params, ck = _final_params(out)
        assert ck["step"] == 1 and info["last_checkpoint_step"] == 1
        assert all(torch.isfinite(v).all() for v in params.values())
        assert "step 1) is left as it was" in msg
    else:
        assert not os.path.exists(os.path.join(out, "checkpoint.pt")) and "no checkpoint was written" in msg


def test_nan_test_metrics_stop_before_the_checkpoint(tmp_path):
    with pytest.raises(train.NonFiniteLossError, match="test metrics became non-finite at step 1"):
        train.main(DIVERGE + ["--eval-every", "1", "--ckpt-every", "1", "--out", str(tmp_path)])
    assert not os.path.exists(os.path.join(str(tmp_path), "checkpoint.pt"))


def test_nan_loss_cli_exits_nonzero(tmp_path):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py")] + DIVERGE +
                       ["--eval-every", "0", "--out", str(tmp_path)], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    assert "error: the training loss became non-finite (NaN/Inf) at step 2 of 6: lower --lr" in r.stderr
    assert "--grad-clip" in r.stderr and "Traceback" not in r.stderr


def test_bf16_autocast_cpu(tmp_path):
    m = train.main(TINY + ["--model", "bsa", "--steps", "2", "--precision", "bf16", "--no-plots",
                           "--out", str(tmp_path)])
    assert m["precision"] == "bf16" and m["test_mse"] == m["test_mse"]


@pytest.mark.parametrize("model", ["gnn", "bsa"])
def test_ddp_two_processes_gloo(tmp_path, model):
    out = str(tmp_path / "ddp")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--standalone",
           os.path.join(ROOT, "examples", "train.py")] + TINY + [
        "--model", model, "--steps", "3", "--device", "cpu", "--no-plots", "--out", out]
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    m = json.load(open(os.path.join(out, "metrics.json")))
    assert m["world_size"] == 2 and m["steps"] == 3 and m["test_mse"] == m["test_mse"]


def test_compare_writes_table(tmp_path):
    compare = _load("compare")
    res = str(tmp_path / "results.md")
    rows = compare.main(["--models", "bsa", "pointnet", "--steps", "2", "--out", str(tmp_path / "cmp"),
                         "--results", res, "--"] + TINY)
    assert [r["model"] for r in rows] == ["bsa", "pointnet"] and all("error" not in r for r in rows)
    md = open(res).read()
    assert "| bsa (cpu) |" in md and "| pointnet |" in md and "Command:" in md  # --backend auto on a CPU
    assert json.load(open(str(tmp_path / "results.json")))["steps"] == 2
    assert os.path.isfile(str(tmp_path / "cmp" / "compare.png"))


def test_compare_seeds_mean_std_and_curves(tmp_path):
    compare = _load("compare")
    res, out = str(tmp_path / "results.md"), tmp_path / "cmp"
    rows = compare.main(["--models", "pointnet", "gnn", "--seeds", "0", "1", "--steps", "4", "--curve-points", "2",
                         "--out", str(out), "--results", res, "--"] + TINY + ["--log-every", "2"])
    # seed by seed, every (model, seed) once, each in its own folder
    assert [(r["model"], r["seed"]) for r in rows] == [("pointnet", 0), ("gnn", 0), ("pointnet", 1), ("gnn", 1)]
    assert all("error" not in r for r in rows)
    assert os.path.isfile(str(out / "gnn" / "seed1" / "metrics.json"))
    saved = json.load(open(str(tmp_path / "results.json")))
    assert saved["seeds"] == [0, 1] and len(saved["rows"]) == 4 and saved["budget"]["kind"] == "equal-steps"
    summ = {s["model"]: s for s in saved["summary"]}
    pn = [r["test_mse"] for r in rows if r["model"] == "pointnet"]
    assert pn[0] != pn[1]  # the seed reached train.py
    assert summ["pointnet"]["test_mse_mean"] == pytest.approx(sum(pn) / 2)
    assert summ["pointnet"]["test_mse_std"] == pytest.approx(abs(pn[0] - pn[1]) / 2 ** 0.5)  # sample std
    assert summ["gnn"]["n_seeds"] == 2 and summ["gnn"]["test_rel_l2_std"] is not None
    assert summ["gnn"]["ms_per_step_mean"] > 0 and summ["gnn"]["steps"] == [4]
    md = open(res).read()
    assert "Budget: equal steps: 4 per model (--steps)" in md and "seeds 0, 1" in md
    assert f"| pointnet | {summ['pointnet']['test_mse_mean']:.4f} ± {summ['pointnet']['test_mse_std']:.4f} |" in md
    assert "| seed 0 | seed 1 |" in md
    # the eval log carries the training seconds: the wall-clock curve
    assert [e["step"] for e in rows[0]["eval_log"]] == [2, 4] and rows[0]["eval_log"][-1]["train_time_s"] > 0
    for name in ("compare.png", "compare_time.png"):
        assert os.path.getsize(str(out / name)) > 1000


def test_probe_rate_ignores_warm_up_and_capture_steps():
    # one row a step, as the probe logs: BSA's 15-step probe on the plates on an H200 (fourteenth session;
    # first step 9.6 s: compilation), then graph warm-up and one capture (183 ms). Its real run trained at
    # 20.3-25.8 ms a step; the old estimate (mean after three rows) read 42.3 and gave BSA half its budget
    compare = _load("compare")
    deltas = [70.2, 62.5, 53.1, 48.2, 47.2, 182.9, 17.0, 23.5, 22.9, 21.1, 21.1, 23.0, 23.0, 24.1]
    t, rows = 9.575, [{"step": 1, "train_time_s": 9.575}]
    for i, d in enumerate(deltas):
        t += d / 1000.0
        rows.append({"step": i + 2, "train_time_s": t})
    ms = compare._probe_ms(rows)
    assert 20.0 <= ms <= 26.0, ms
    assert compare._steady_ms(rows, 3) > 40.0  # what the probe used to read
    # a steady log reads its own rate; one row its mean; none nothing
    steady = [{"step": s, "train_time_s": 0.5 + 0.03 * s} for s in range(1, 9)]
    assert compare._probe_ms(steady) == pytest.approx(30.0)
    assert compare._probe_ms(steady[:1]) == pytest.approx(530.0)
    assert compare._probe_ms([]) is None


def test_compare_equal_time_budget_with_seeds(tmp_path):
    compare = _load("compare")
    res = str(tmp_path / "r.md")
    rows = compare.main(["--models", "pointnet", "full", "--seeds", "3", "4", "--budget-s", "0.3", "--equal-time",
                         "--probe-steps", "4", "--out", str(tmp_path / "cmp"), "--results", res, "--"] + TINY)
    assert all("error" not in r for r in rows) and len(rows) == 4
    saved = json.load(open(str(tmp_path / "r.json")))
    per_model = saved["budget"]["steps_per_model"]
    assert saved["budget"]["kind"] == "equal-time" and set(per_model) == {"pointnet", "full"}
    for r in rows:  # the seconds end every run; the probe's count, doubled, only caps it
        cap = compare.TIME_CAP_STEPS * per_model[r["model"]]
        assert r["args"]["time_budget"] == 0.3 and r["args"]["steps"] == cap >= r["steps"] >= 1
        assert r["steps"] == cap or r["train_time_s"] >= 0.3
    assert "Budget: equal wall-clock: every model trains 0.3 s (--budget-s --equal-time" in open(res).read()
    assert "Seconds trained (budget 0.3 s): pointnet " in open(res).read()
    # rerun with --reuse: the recorded calibration is read back (no new probe), so every run is kept
    again = compare.main(["--models", "pointnet", "full", "--seeds", "3", "4", "--budget-s", "0.3", "--equal-time",
                          "--probe-steps", "4", "--out", str(tmp_path / "cmp"), "--results", res, "--reuse",
                          "--"] + TINY)
    assert all(r.get("reused") for r in again) and [r["steps"] for r in again] == [r["steps"] for r in rows]
    assert "calibration read from" in open(res).read()


def test_time_curves_of_seeds_with_different_step_counts():
    # two seeds on one --time-budget: seed a ends at step 230 after 25 s, seed b evaluates at step 300
    # after 23 s and ends at 330; grouped by step the mean line ran back from 25 s to 23 s
    compare = _load("compare")
    a = [(100, 10.0, 1.0), (200, 20.0, 0.5), (230, 25.0, 0.4)]
    b = [(100, 8.0, 0.9), (200, 16.0, 0.6), (300, 23.0, 0.45), (330, 25.0, 0.42)]
    folded = compare._band([a, b])[0]
    assert any(x1 < x0 for x0, x1 in zip(folded, folded[1:]))
    xs, mean, lo, hi = compare._band_time([a, b])
    assert xs == [10.0, 16.0, 20.0, 23.0, 25.0]  # the span both seeds cover (b alone at 8 s: left out)
    assert mean[-1] == pytest.approx(0.41) and lo[-1] == pytest.approx(0.4) and hi[-1] == pytest.approx(0.42)
    assert mean[1] == pytest.approx((0.5 ** 0.6 + 0.6) / 2)  # a interpolated in log y at 16 s
    assert compare._band_time([a, [(1, 30.0, 0.3)]])[0] == [10.0, 20.0, 25.0, 30.0]  # no shared span
    assert all(lo_ <= m <= hi_ for lo_, m, hi_ in zip(lo, mean, hi))


def test_equal_time_table_flags_runs_off_the_budget():
    # the fourteenth session's plates (budget 40 s): BSA and full attention trained 19-24 s and 45-50 s
    compare = _load("compare")
    args = compare.parse_args(["--models", "bsa", "full", "gnn", "--budget-s", "40", "--equal-time"])
    ok = [dict(model="bsa", train_time_s=19.2), dict(model="bsa", train_time_s=24.4),
          dict(model="full", train_time_s=50.0), dict(model="full", train_time_s=44.9),
          dict(model="gnn", train_time_s=38.0), dict(model="gnn", train_time_s=41.5)]
    lines = compare._seconds_lines(ok, args)
    assert lines[0] == "- Seconds trained (budget 40 s): bsa 19.2-24.4, full 44.9-50.0, gnn 38.0-41.5"
    assert lines[1].startswith("- **Not equal time:** bsa, full trained more than 20% off")
    assert len(compare._seconds_lines(ok[4:], args)) == 1  # on budget: no warning
    assert compare._seconds_lines(ok, compare.parse_args(["--models", "bsa", "--steps", "5"])) == []


def test_compare_shared_calibration_file(tmp_path, capsys):
    # --calibration: one probe, written once, read by every later compare.py (one per seed at once in
    # run_study_gpu.sh), whatever its --json; --calibrate-only trains nothing
    compare = _load("compare")
    cal = str(tmp_path / "cal.json")
    base = ["--models", "pointnet", "full", "--budget-s", "0.3", "--equal-time", "--probe-steps", "4",
            "--calibration", cal]
    assert compare.main(base + ["--seeds", "3", "--calibrate-only", "--out", str(tmp_path / "c0"), "--"] + TINY) == []
    saved = json.load(open(cal))["budget"]
    assert saved["kind"] == "equal-time" and set(saved["steps_per_model"]) == {"pointnet", "full"}
    assert not os.path.exists(str(tmp_path / "c0" / "pointnet"))  # nothing trained
    # distinctive step counts: a run that probed again would not reproduce them
    saved["steps_per_model"] = {"pointnet": 3, "full": 5}
    json.dump({"budget": saved}, open(cal, "w"))
    for seed in ("3", "4"):
        rows = compare.main(base + ["--seeds", seed, "--out", str(tmp_path / "c1"),
                                    "--json", str(tmp_path / f"s{seed}.json"), "--"] + TINY)
        assert {r["model"]: r["args"]["steps"] for r in rows} == {"pointnet": 6, "full": 10}  # the caps
    assert not os.path.exists(str(tmp_path / "c1" / "probe"))
    # another budget than the file's: probed anew and the file rewritten
    other = [a if a != "0.3" else "0.2" for a in base]
    compare.main(other + ["--seeds", "3", "--calibrate-only", "--out", str(tmp_path / "c2"), "--"] + TINY)
    assert json.load(open(cal))["budget"]["budget_s"] == 0.2
    for argv, match in ((["--calibration", cal], "need --budget-s"),
                        (["--budget-s", "1", "--calibrate-only"], "needs --calibration")):
        with pytest.raises(SystemExit):
            compare.parse_args(argv)
        assert match in capsys.readouterr().err


def test_compare_reuse_keeps_finished_runs_and_resumes_killed_ones(tmp_path, capsys):
    compare = _load("compare")
    out = tmp_path / "cmp"
    base = ["--models", "pointnet", "gnn", "--seeds", "0", "--steps", "4", "--out", str(out), "--results",
            str(tmp_path / "r.md"), "--reuse", "--"] + TINY + ["--no-plots"]
    first = compare.main(base)
    # a run killed after 2 of its 4 steps (it left a checkpoint, no metrics.json)
    gnn_out = str(out / "gnn" / "seed0")
    os.remove(os.path.join(gnn_out, "metrics.json"))
    train.main(TINY + ["--no-plots", "--model", "gnn", "--seed", "0", "--steps", "4", "--eval-every", "1",
                       "--out", gnn_out, "--stop-after", "2"])
    capsys.readouterr()
    again = compare.main(base)
    log = capsys.readouterr().out
    assert again[0].get("reused") and again[0]["test_mse"] == first[0]["test_mse"]
    assert "finished run kept" in log and "resumed from" in log
    assert not again[1].get("reused") and again[1]["steps"] == 4
    assert again[1]["test_mse"] == pytest.approx(first[1]["test_mse"], rel=1e-6)  # resume is exact
    # other train.py flags: nothing is kept
    other = compare.main(base[:-1] + ["--no-plots", "--lr", "2e-3"])
    assert not any(r.get("reused") for r in other)


def test_compare_seed_flag_conflicts(capsys):
    compare = _load("compare")
    for argv in (["--seeds", "0", "1", "--", "--seed", "3"], ["--seeds", "1", "1"], ["--equal-time"]):
        with pytest.raises(SystemExit):
            compare.parse_args(argv + ([] if "--" in argv else ["--"]) + TINY)
    err = capsys.readouterr().err
    assert "leave --seed out" in err and "each seed once" in err and "--equal-time needs --budget-s" in err


def test_compare_rejects_bad_train_flags(capsys):
    compare = _load("compare")
    with pytest.raises(SystemExit):
        compare.parse_args(["--steps", "2", "--", "--hidden", "-3"])
    assert "rejected" in capsys.readouterr().err


def test_generated_car_end_to_end(tmp_path):
    # the real data path: generate a tiny CarPressure in 2 processes, then train on the cache
    data = ["--dataset", "car", "--root", str(tmp_path / "data"), "--num-train", "4", "--num-test", "2",
            "--num-points", "96", "--data-kw", "n_length=6", "--data-kw", "n_around=6"]
    prep = train.main(data + ["--data-workers", "2", "--prepare-data", "--out", str(tmp_path / "unused")])
    assert prep["train_clouds"] == 4 and prep["test_clouds"] == 2 and not os.path.exists(tmp_path / "unused")
    m = train.main(TINY[6:] + data + ["--model", "bsa", "--steps", "3", "--no-plots", "--out", str(tmp_path / "r")])
    assert m["dataset"] == "car" and m["mean_points"] == 96 and m["test_mse"] == m["test_mse"]
    assert m["test_mse_phys"] > 0 and m["test_mse_phys"] != m["test_mse"]  # Cp units, not normalised


def test_triton_probe_falls_back_to_torch():
    # a backend that cannot run (here: no CUDA) must give the reference backend, not an exception
    args = train.parse_args(TINY + ["--model", "bsa"])
    msgs = []
    assert train.resolve_attention_backend(args, 3, 1, 3, torch.device("cuda"), msgs.append) == "torch"
    assert "using backend='torch'" in msgs[0]


def test_compare_retries_a_failing_kernel_with_the_reference(tmp_path, monkeypatch):
    compare = _load("compare")
    orig = compare.train.main

    def flaky(flags):  # stands in for a Triton kernel that passes the probe, then faults on real batches
        if "bsa" in flags and "--backend" not in flags:
            raise RuntimeError("simulated kernel fault")
        return orig(flags)
    monkeypatch.setattr(compare.train, "main", flaky)
    rows = compare.main(["--models", "bsa", "pointnet", "--steps", "2", "--out", str(tmp_path / "cmp"),
                         "--results", str(tmp_path / "r.md"), "--"] + TINY)
    assert all("error" not in r for r in rows)
    assert rows[0]["backend"] == "torch" and "reran with the PyTorch reference" in rows[0]["note"]
    assert "Triton backend failed" in open(str(tmp_path / "r.md")).read()


def test_compare_calibrated_isolated_with_deadline(tmp_path):
    compare = _load("compare")
    res = str(tmp_path / "r.md")
    rows = compare.main(["--models", "pointnet", "full", "--budget-s", "0.2", "--probe-steps", "4", "--isolate",
                         "--deadline-s", "600", "--out", str(tmp_path / "cmp"), "--results", res, "--"] + TINY)
    assert [r["model"] for r in rows] == ["pointnet", "full"] and all("error" not in r for r in rows), rows
    assert rows[0]["steps"] == rows[1]["steps"] >= 1 and rows[0]["ms_per_step"] > 0
    assert all(r["args"]["max_time"] is not None for r in rows)  # the deadline became a time cap
    assert json.load(open(str(tmp_path / "r.json")))["steps"] == rows[0]["steps"]


def test_compare_deadline_skips_what_cannot_fit(tmp_path):
    compare = _load("compare")
    rows = compare.main(["--models", "pointnet", "--steps", "2", "--deadline-s", "1", "--out", str(tmp_path / "c"),
                         "--results", str(tmp_path / "r.md"), "--"] + TINY)
    assert rows[0]["error"].startswith("skipped")
    assert "failed: skipped" in open(str(tmp_path / "r.md")).read()


def test_cmp_window_flag(tmp_path, capsys):
    # the large-cloud option trains end to end and is counted in the FLOPs; a window that is not a
    # multiple of the ball size is rejected naming the flag
    base = TINY + ["--model", "bsa", "--steps", "2", "--log-every", "1", "--no-plots"]
    m = train.main(base + ["--cmp-window", "64", "--out", str(tmp_path / "w")])
    plain = train.main(base + ["--out", str(tmp_path / "p")])
    assert m["steps"] == 2 and m["test_mse"] == m["test_mse"]
    assert m["parameters"] > plain["parameters"]  # the fourth gate
    with pytest.raises(SystemExit) as e:
        train.main(base + ["--cmp-window", "40", "--out", str(tmp_path / "bad")])
    assert e.value.code == 2 and "--cmp-window" in capsys.readouterr().err


def _fake_run(work, name, world, batch, losses, pts_s, log="", test_mse=0.1, steps=None):
    os.makedirs(os.path.join(work, name), exist_ok=True)
    steps = steps or 10 * len(losses)
    met = {"world_size": world, "device_name": "fake", "backend": "triton", "precision": "bf16", "steps": steps,
           "planned_steps": 10 * len(losses), "test_mse": test_mse, "test_rel_l2": 0.3, "ms_per_step": 10.0,
           "peak_memory_mb": 1.0, "seed": 0, "args": {"batch_size": batch},
           "train_log": [{"step": 10 * (i + 1), "loss": v, "points_per_s": p, "train_time_s": 0.1 * (i + 1)}
                         for i, (v, p) in enumerate(zip(losses, pts_s))]}
    json.dump(met, open(os.path.join(work, name, "metrics.json"), "w"))
    open(os.path.join(work, name + ".log"), "w").write(log)


def test_ddp_summary_reads_the_check(tmp_path):
    summary = _load("ddp_summary")
    work, out = str(tmp_path / "w"), str(tmp_path / "o")
    _fake_run(work, "1gpu", 1, 8, [1.0, 0.5, 0.25, 0.2], [0, 100, 100, 100])  # first rows left out (warm-up)
    _fake_run(work, "1gpu_seed1", 1, 8, [1.2, 0.6, 0.25, 0.21], [0, 100, 100, 100])   # noise: largest 0.2
    _fake_run(work, "2gpu_half", 2, 4, [1.01, 0.55, 0.25, 0.2], [0, 150, 150, 150])   # largest 0.1
    _fake_run(work, "2gpu_full", 2, 8, [1.0, 0.5, 0.25, 0.2], [0, 190, 185, 195])
    _fake_run(work, "2gpu_resume", 2, 4, [1.01, 0.55, 0.25, 0.2], [0, 150, 150, 150],
              log="[train] resumed from w/2gpu_resume/checkpoint.pt at step 20\n")
    open(os.path.join(work, "2gpu_resume_killed.log"), "w").write("[train] step 10: test MSE 0.5\n")
    s = summary.main(["--work", work, "--out", out])
    assert s["speedup_same_per_gpu_batch"] == pytest.approx(1.9) and s["speedup_ok"]
    assert s["speedup_same_global_batch"] == pytest.approx(1.5)
    assert s["runs"]["2gpu_full"]["global_batch"] == 16
    assert s["curve_2gpu_vs_1gpu"]["max_rel"] == pytest.approx(0.1) and s["curve_2gpu_vs_1gpu"]["step_of_max"] == 20
    assert s["curve_seed_noise"]["max_rel"] == pytest.approx(0.2) and s["curves_agree"]
    assert s["resume"] == {"killed_before_end": True, "resumed_at_step": 20, "finished": True, "ok": True}
    md = open(os.path.join(out, "ddp_check.md")).read()
    assert "1.90x (target >= 1.8x: yes)" in md and "OK: yes" in md
    assert os.path.getsize(os.path.join(out, "ddp_loss.png")) > 1000
    # a resumed run that did not finish, a kill that came too late, curves apart: all reported
    _fake_run(work, "2gpu_half", 2, 4, [1.5, 0.55, 0.25, 0.2], [0, 150, 150, 150])
    _fake_run(work, "2gpu_resume", 2, 4, [1.0], [0], log="[train] resumed from x at step 10\n", steps=5)
    open(os.path.join(work, "2gpu_resume_killed.log"), "w").write("[train] bsa: final test MSE 0.1\n")
    s = summary.main(["--work", work, "--out", out])
    assert s["curves_agree"] is False and not s["resume"]["ok"] and s["resume"]["killed_before_end"] is False
    assert "Agree: **no**" in open(os.path.join(out, "ddp_check.md")).read()


def test_ablate_presets_run_and_merge_identical_variants(tmp_path, capsys):
    ablate = _load("ablate")
    # the base has --topk 2: "topk4" differs from it, and the per-query variant is the base itself
    ablate.main(["--preset", "branches", "compression", "topk", "--variants", "bsa", "no-cmp", "ball-only",
                 "per-query", "group", "topk4", "--list", "--"] + TINY)
    listed = capsys.readouterr().out.splitlines()
    assert listed[0] == "bsa (= per-query): (the base flags)" and "no-cmp: --drop-branch cmp" in listed
    res = str(tmp_path / "r.md")
    rows = ablate.main(["--preset", "branches", "compression", "--variants", "bsa", "no-cmp", "ball-only",
                        "per-query", "group", "--steps", "2", "--out", str(tmp_path / "a"), "--results", res,
                        "--"] + TINY + ["--no-plots"])
    assert [r["model"] for r in rows] == ["bsa (= per-query)", "no-cmp", "ball-only", "group"]
    assert all("error" not in r for r in rows), rows
    assert rows[1]["args"]["drop_branch"] == ["cmp"] and rows[2]["train_model"] == "ball"
    assert rows[3]["args"]["group_compression"] and not rows[0]["args"]["group_compression"]
    md = open(res).read()
    assert "vs bsa (= per-query)" in md and "`no-cmp`: `--drop-branch cmp`" in md and "examples/ablate.py" in md
    assert json.load(open(str(tmp_path / "r.json")))["variants"]["group"] == ["--group-compression"]
    assert os.path.isfile(str(tmp_path / "a" / "ablate.png"))


def test_drop_branch_flag_checks(capsys):
    for flags, match in ((["--model", "full", "--drop-branch", "cmp"], "applies to --model bsa"),
                         (["--drop-branch", "ball", "--drop-branch", "cmp", "--drop-branch", "slc"], "no branch")):
        with pytest.raises(SystemExit):
            train.parse_args(TINY + flags)
        assert match in capsys.readouterr().err


def test_selection_flag_round_trip(tmp_path, capsys):
    # --selection reaches every BSAConv, is recorded in the checkpoint, and a resume with the other rule
    # is refused naming the flag; a checkpoint from before the flag existed resumes as "shared"
    base = TINY + ["--model", "bsa", "--steps", "4", "--log-every", "1", "--no-plots"]
    args = train.parse_args(base + ["--selection", "per_head"])
    model = train.build_model(args, 1, 1, 3)
    convs = [m for m in model.modules() if hasattr(m, "cfg")]
    assert convs and all(m.cfg.selection == "per_head" for m in convs)
    out = str(tmp_path / "ph")
    m = train.main(base + ["--selection", "per_head", "--stop-after", "2", "--out", out])
    assert m["steps"] == 2 and m["args"]["selection"] == "per_head"
    ck = load_checked(os.path.join(out, "checkpoint.pt"))
    assert ck["config"]["selection"] == "per_head"
    with pytest.raises(train.RunError, match="--selection: 'per_head' in the checkpoint, 'shared' now"):
        train.main(base + ["--out", out, "--resume"])
    m2 = train.main(base + ["--selection", "per_head", "--out", out, "--resume"])
    assert m2["steps"] == 4 and m2["test_mse"] == m2["test_mse"]
    # an older checkpoint (no "selection" recorded) is a shared-rule run
    old = str(tmp_path / "old")
    train.main(base + ["--stop-after", "2", "--out", old])
    path = os.path.join(old, "checkpoint.pt")
    ck = load_checked(path)
    del ck["config"]["selection"]
    save_checked(path, ck)
    with pytest.raises(train.RunError, match="--selection: 'shared' in the checkpoint, 'per_head' now"):
        train.main(base + ["--selection", "per_head", "--out", old, "--resume"])
    assert train.main(base + ["--out", old, "--resume"])["steps"] == 4
    for flags, match in ((["--selection", "per-head"], "invalid choice: 'per-head'"),
                         (["--model", "full", "--selection", "per_head"], "--selection: applies to --model bsa")):
        with pytest.raises(SystemExit):
            train.parse_args(TINY + flags)
        assert match in capsys.readouterr().err


def test_curves_from_logs_reads_metrics_and_logs(tmp_path, capsys):
    # a finished run from metrics.json (recorded times) and a cut run from a log, one model each;
    # a run found twice keeps the finished one; --label dir names runs by their folder
    curves = _load("curves_from_logs")

    def metrics(path, model, seed, mses, finished=True):
        ev = [dict(step=10 * (i + 1), test_mse=m, test_rel_l2=m / 2, train_time_s=1.5 * (i + 1))
              for i, m in enumerate(mses)]
        met = dict(model=model, seed=seed, steps=10 * len(mses) if finished else 10, planned_steps=10 * len(mses),
                   test_mse=mses[-1], test_rel_l2=mses[-1] / 2, ms_per_step=150.0, train_time_s=1.5 * len(mses),
                   parameters=1234, gflops_per_cloud=2.5, eval_log=ev)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            json.dump(met, f)
        return str(path)

    paths = [metrics(tmp_path / "var-a" / f"seed{s}" / "metrics.json", "bsa", s, [0.5, 0.2 + 0.1 * s])
             for s in (0, 1)]
    log = tmp_path / "compare_seed0.log"
    log.write_text("[compare] gnn: train.py --model gnn\n[train] step 10: test MSE 0.4, rel L2 0.3\n"
                   "[train] step 20: test MSE 0.3, rel L2 0.25\n[train] bsa: 1,234 parameters, 2.5 GFLOPs\n"
                   "[train] step 10: test MSE 0.9, rel L2 0.6\n")
    data = curves.collect([str(log)] + paths)
    assert data["bsa"][0]["final"]["test_mse"] == pytest.approx(0.2)  # the finished run, not the cut log's
    assert data["bsa"][1]["curve"][-1] == [20, pytest.approx(0.3), pytest.approx(0.15), pytest.approx(3.0)]
    assert data["gnn"][0]["final"] is None and data["gnn"][0]["curve"][-1][:2] == [20, 0.3]
    table = curves.table(data)
    assert "| bsa | 0.2500 ± 0.0707 |" in table and "2 of 2" in table and "20: 0.3000" in table
    by_dir = curves.collect(paths, label="dir")
    assert set(by_dir) == {"var-a"}
    curves.main(paths + ["--label", "dir", "--json", str(tmp_path / "c.json"), "--plot", str(tmp_path / "c.png"),
                         "--time-plot", str(tmp_path / "t.png")])
    assert os.path.isfile(tmp_path / "t.png") and json.load(open(tmp_path / "c.json"))["runs"]["var-a"]
    # --time-plot alone (no --plot), into a folder that does not exist yet
    curves.main(paths + ["--time-plot", str(tmp_path / "new" / "t2.png")])
    assert os.path.isfile(tmp_path / "new" / "t2.png")


def test_gate_bias_flag(capsys):
    # --gate-bias sets every BSA layer's gate-logit bias per branch (all heads), and only for --model bsa
    args = train.parse_args(TINY + ["--model", "bsa", "--gate-bias", "0.5", "-1", "-4"])
    model = train.build_model(args, 1, 1, 3)
    convs = [m for m in model.modules() if hasattr(m, "gate")]
    assert convs
    for m in convs:
        b = m.gate.bias.detach().view(m.heads, -1)[:, :3]
        assert torch.equal(b, torch.tensor([0.5, -1.0, -4.0]).expand_as(b))
    # the default: the selection gate's logit starts at -4 (BSAConv's default), the others as
    # nn.Linear's; --linear-gates: all three as nn.Linear's
    slc_at = lambda model, v: [torch.equal(m.gate.bias.view(m.heads, -1)[:, 2], torch.full((m.heads,), v))  # noqa: E731
                               for m in model.modules() if hasattr(m, "gate")]
    plain = train.build_model(train.parse_args(TINY + ["--model", "bsa"]), 1, 1, 3)
    assert all(slc_at(plain, -4.0)) and not any(slc_at(plain, 0.0))
    linear = train.build_model(train.parse_args(TINY + ["--model", "bsa", "--linear-gates"]), 1, 1, 3)
    assert not any(slc_at(linear, -4.0))
    assert all(m.gate.bias.abs().max() <= m.gate.in_features ** -0.5 for m in linear.modules() if hasattr(m, "gate"))
    for flags, match in ((["--model", "full", "--gate-bias", "0", "0", "-4"], "applies to --model bsa"),
                         (["--model", "bsa", "--gate-bias", "0", "nan", "0"], "three finite numbers"),
                         (["--model", "full", "--linear-gates"], "applies to --model bsa"),
                         (["--model", "bsa", "--linear-gates", "--gate-bias", "0", "0", "-4"], "give one of the two")):
        with pytest.raises(SystemExit):
            train.parse_args(TINY + flags)
        assert match in capsys.readouterr().err


def test_gate_stats_reads_trained_gates(tmp_path, capsys):
    # the mean gate per branch of a trained run: a selection gate started at logit -4 is still near
    # sigmoid(-4) after two steps, the others near sigmoid(0); a run of another model is refused
    stats = _load("gate_stats")
    out = str(tmp_path / "g")
    train.main(TINY + ["--model", "bsa", "--steps", "2", "--no-plots", "--gate-bias", "0", "0", "-4", "--out", out])
    g = stats.main([out])[out]
    assert len(g) == 1 and all(len(v) == 3 for v in g.values())  # one layer; ball, cmp, slc
    ball, cmp, slc = next(iter(g.values()))
    assert abs(slc - torch.sigmoid(torch.tensor(-4.0)).item()) < 0.01
    assert 0.2 < ball < 0.8 and 0.2 < cmp < 0.8
    assert "| " + out + " | 1 |" in capsys.readouterr().out
    other = str(tmp_path / "f")
    train.main(TINY + ["--model", "full", "--steps", "1", "--no-plots", "--out", other])
    with pytest.raises(ValueError, match="gates exist only in --model bsa"):
        stats.gate_means(other)


def test_local_geometry_flag(tmp_path):
    # --local-geometry K appends d + 1 features to every point's input (the first layer grows by that
    # many input columns); a resume with another K is refused, naming the flag
    base = TINY + ["--model", "bsa", "--steps", "2", "--log-every", "1", "--no-plots", "--ckpt-every", "1"]
    plain = train.main(base + ["--out", str(tmp_path / "p")])
    out = str(tmp_path / "g")
    geo = train.main(base + ["--local-geometry", "4", "--out", out])
    assert geo["steps"] == 2 and math.isfinite(geo["test_mse"])
    dim = train.load_splits(train.parse_args(TINY))[0][0].pos.size(1)
    assert geo["parameters"] - plain["parameters"] == (dim + 1) * 16  # the input projection's new columns
    with pytest.raises(train.RunError, match="local_geometry"):
        train.main(base + ["--local-geometry", "8", "--out", out, "--steps", "3", "--resume"])
