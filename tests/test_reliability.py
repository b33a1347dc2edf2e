"""Reliability (issue 11, docs/reliability.md): no loaded file runs code, corrupt files are named or
recovered from, runs do not overwrite or silently ignore each other, and the API refuses inputs that
would otherwise give silently wrong results. CPU only; every test takes seconds."""
import dataclasses
import hashlib
import importlib.util
import json
import os
import pickle
import subprocess
import sys
import warnings

import pytest
import torch
from torch_geometric.data import Data

from torch_geometric_bsa import BSAConfig, BSAConv, BSATransformer, build_ball_tree, bsa_attention
from torch_geometric_bsa import io as tio
from torch_geometric_bsa.datasets._cache import CachedSplitDataset, attach_stats
from torch_geometric_bsa.io import (CorruptFileError, DirLock, LockError, UnsafeFileError, load_checked,
                                    previous_path, remove_stale_temps, save_checked)
from torch_geometric_bsa.reference import compress_mean
from torch_geometric_bsa.transforms import CacheBallTree

from conftest import random_batch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
M = 16
KW = dict(heads=2, ball_size=M, cmp_block=4, slc_block=4, topk=2, group_size=4)
C = 8


def _load_train():
    spec = importlib.util.spec_from_file_location("_example_train_rel", os.path.join(ROOT, "examples", "train.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


train = _load_train()
TINY = ["--dataset", "toy", "--num-train", "4", "--num-test", "2", "--batch-size", "2", "--hidden", "16",
        "--layers", "1", "--heads", "2", "--ball-size", "32", "--cmp-block", "4", "--slc-block", "4",
        "--topk", "2", "--group-size", "4", "--no-progress", "--no-plots", "--threads", "1", "--model", "bsa",
        "--log-every", "1", "--eval-every", "0"]


# ------------------------------------------------------------------------------------------------
# Crafted files
# ------------------------------------------------------------------------------------------------
class _Evil:
    r"""Unpickling this creates ``marker`` (a stand-in for running any code)."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _wrap(payload: bytes) -> bytes:
    r"""``payload`` behind a valid header and checksum (an attacker can compute those too)."""
    header = json.dumps({"version": 1, "size": len(payload),
                         "sha256": hashlib.sha256(payload).hexdigest()}).encode() + b"\n"
    return tio.MAGIC + header + payload


def _crafted(kind: str, marker: str) -> bytes:
    import io
    evil = {"model": _Evil(marker), "step": 1}
    if kind == "raw_pickle":
        return pickle.dumps(evil)
    buf = io.BytesIO()
    torch.save(evil, buf)
    if kind == "raw_torch":
        return buf.getvalue()
    if kind == "checked_torch":
        return _wrap(buf.getvalue())
    return _wrap(pickle.dumps(evil))  # checked_pickle


CRAFTED = ["raw_pickle", "raw_torch", "checked_torch", "checked_pickle"]


def test_crafted_pickle_really_runs_code_when_unpickled(tmp_path):
    # the control: the payload is live, so the marker's absence below means the loaders refused it
    marker = str(tmp_path / "marker")
    pickle.loads(pickle.dumps(_Evil(marker))).close()
    assert os.path.exists(marker)


@pytest.mark.parametrize("kind", CRAFTED)
def test_load_checked_never_runs_code(tmp_path, kind):
    marker, path = str(tmp_path / "marker"), str(tmp_path / "file.pt")
    open(path, "wb").write(_crafted(kind, marker))
    err = UnsafeFileError if kind.startswith("checked") else CorruptFileError
    with pytest.raises(err, match=path):
        load_checked(path)
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", ["raw_torch", "checked_torch"])
def test_train_resume_never_runs_code(tmp_path, kind):
    out, marker = str(tmp_path / "run"), str(tmp_path / "marker")
    os.makedirs(out)
    open(os.path.join(out, "checkpoint.pt"), "wb").write(_crafted(kind, marker))
    with pytest.raises((train.RunError, CorruptFileError), match="checkpoint.pt"):
        train.main(TINY + ["--steps", "2", "--out", out, "--resume"])
    assert not os.path.exists(marker)


@pytest.mark.parametrize("kind", ["raw_torch", "checked_torch", "checked_pickle"])
def test_train_snapshot_never_runs_code(tmp_path, kind):
    snap, marker = str(tmp_path / "snap.pt"), str(tmp_path / "marker")
    open(snap, "wb").write(_crafted(kind, marker))
    with pytest.raises(tio.FileCheckError, match="snap.pt"):
        train.main(TINY + ["--prepare-data", "--snapshot", snap])
    assert not os.path.exists(marker)


def test_snapshot_round_trip(tmp_path):
    snap = str(tmp_path / "snap.pt")
    a = train.load_splits(train.parse_args(TINY + ["--snapshot", snap]))
    b = train.load_splits(train.parse_args(TINY + ["--snapshot", snap]))  # read back
    assert len(a[0]) == len(b[0]) == 4
    for d1, d2 in zip(a[0] + a[1], b[0] + b[1]):
        assert torch.equal(d1.pos, d2.pos) and torch.equal(d1.y, d2.y)


@pytest.mark.parametrize("ext", ["th", "npy"])
def test_shapenet_raw_files_never_run_code(tmp_path, ext):
    import numpy as np
    sys.path.insert(0, os.path.join(ROOT, "tests", "datasets"))
    from test_shapenet_car import load, write_fake_shapenet
    cars = write_fake_shapenet(str(tmp_path), npy_every=1 if ext == "npy" else 10 ** 6)
    folder, marker = cars[0][0], str(tmp_path / "marker")
    path = os.path.join(folder, f"mesh_points.{ext}")
    if ext == "th":
        open(path, "wb").write(_crafted("raw_torch", marker))
    else:
        np.save(path, np.array([_Evil(marker)], dtype=object), allow_pickle=True)
    with pytest.raises(UnsafeFileError, match=f"mesh_points.{ext}"):
        load(tmp_path, "train")
    assert not os.path.exists(marker)


class _Tiny(CachedSplitDataset):
    r"""A dataset that builds in milliseconds, counting its builds."""
    cache_name = "tiny"
    builds = 0

    def __init__(self, root, split="train", **kw):
        super().__init__(root, split, log=False, **kw)

    def cache_config(self):
        return {"n": 3}

    def build(self):
        type(self).builds += 1
        g = torch.Generator().manual_seed(0)
        make = lambda k: [Data(pos=torch.rand(20, 3, generator=g), y=torch.rand(20, 1, generator=g))  # noqa: E731
                          for _ in range(k)]
        return {"train": make(3), "test": make(2)}


@pytest.mark.parametrize("name", ["train.pt", "pre_transform.pt", "pre_filter.pt"])
def test_dataset_cache_never_runs_code(tmp_path, name):
    root, marker = str(tmp_path), str(tmp_path / "marker")
    ds = _Tiny(root)
    path = os.path.join(ds.processed_dir, name)
    open(path, "wb").write(_crafted("checked_torch" if name == "train.pt" else "raw_torch", marker))
    if name == "train.pt":
        with pytest.raises(UnsafeFileError, match="train.pt"):
            _Tiny(root)
    else:  # PyG would unpickle these to compare reprs; ours never reads them
        assert len(_Tiny(root)) == 3
        assert len(_Tiny(root, force_reload=True)) == 3
    assert not os.path.exists(marker)


def test_dataset_cache_with_cached_trees_loads(tmp_path):
    # the one class on the allowlist: a BallTree stored by CacheBallTree as pre_transform
    ds = _Tiny(str(tmp_path), pre_transform=CacheBallTree(M))
    again = _Tiny(str(tmp_path), pre_transform=CacheBallTree(M))
    assert again[0].ball_tree.num_points == 20 and torch.equal(again[0].ball_tree.perm, ds[0].ball_tree.perm)


def test_save_checked_refuses_what_it_could_not_load(tmp_path):
    with pytest.raises(ValueError, match="load_checked would refuse"):
        save_checked(str(tmp_path / "x.pt"), {"obj": _Evil(str(tmp_path / "m"))})
    assert not os.path.exists(str(tmp_path / "m")) and not os.path.exists(str(tmp_path / "x.pt"))


# ------------------------------------------------------------------------------------------------
# Corruption
# ------------------------------------------------------------------------------------------------
def _corrupt(path: str, how: str) -> None:
    data = bytearray(open(path, "rb").read())
    if how == "truncated":
        data = data[:len(data) // 2]
    elif how == "zero_bytes":
        data = bytearray()
    elif how == "random_bytes":
        data = bytearray(torch.randint(0, 256, (len(data),), generator=torch.Generator().manual_seed(0),
                                       dtype=torch.uint8).numpy().tobytes())
    elif how == "flipped_bit":  # one bit inside the last tensor's data (the end of the zip's data records)
        data[len(data) - 2000] ^= 0x10
    open(path, "wb").write(bytes(data))


CORRUPTIONS = ["truncated", "zero_bytes", "random_bytes", "flipped_bit"]


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_file_is_named(tmp_path, how):
    path = str(tmp_path / "ck.pt")
    save_checked(path, {"w": torch.arange(4000, dtype=torch.float32), "step": 3})
    _corrupt(path, how)
    with pytest.raises(CorruptFileError, match=path):
        load_checked(path)


def test_flipped_bit_lands_in_tensor_data(tmp_path):
    # the flipped-bit case above really hits a tensor: without the checksum it loads silently changed
    import io
    path = str(tmp_path / "ck.pt")
    w = torch.arange(4000, dtype=torch.float32)
    save_checked(path, {"w": w})
    _corrupt(path, "flipped_bit")
    raw = open(path, "rb").read()
    payload = raw[raw.index(b"\n", len(tio.MAGIC)) + 1:]
    silently = torch.load(io.BytesIO(payload), weights_only=True)["w"]
    assert not torch.equal(silently, w)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_checkpoint_falls_back_to_the_previous_one(tmp_path, how, capsys):
    straight, split = str(tmp_path / "straight"), str(tmp_path / "split")
    base = TINY + ["--steps", "6", "--ckpt-every", "2"]
    train.main(base + ["--out", straight])
    train.main(base + ["--out", split, "--stop-after", "4"])  # checkpoints at steps 2 and 4
    ck = os.path.join(split, "checkpoint.pt")
    assert load_checked(previous_path(ck))["step"] == 2 and load_checked(ck)["step"] == 4
    _corrupt(ck, how)
    capsys.readouterr()
    train.main(base + ["--out", split, "--resume"])
    log = capsys.readouterr()
    text = log.out + log.err
    assert "falling back to the previous checkpoint" in text and "checkpoint.prev.pt" in text
    assert "resumed from" in text and "at step 2" in text
    a, b = load_checked(os.path.join(straight, "checkpoint.pt")), load_checked(ck)
    assert a["step"] == b["step"] == 6
    for k in a["model"]:  # resumed from step 2: still exactly the straight run
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert os.path.exists(ck + ".corrupt")  # kept aside, not rotated over the good previous one


def test_no_usable_checkpoint_names_both_files(tmp_path):
    out = str(tmp_path / "run")
    train.main(TINY + ["--steps", "4", "--ckpt-every", "2", "--out", out])
    ck = os.path.join(out, "checkpoint.pt")
    _corrupt(ck, "truncated")
    _corrupt(previous_path(ck), "zero_bytes")
    with pytest.raises(train.RunError, match="no usable checkpoint") as e:
        train.main(TINY + ["--steps", "4", "--ckpt-every", "2", "--out", out, "--resume"])
    assert "checkpoint.pt" in str(e.value) and "checkpoint.prev.pt" in str(e.value)


@pytest.mark.parametrize("how", CORRUPTIONS)
def test_corrupt_dataset_cache_is_rebuilt(tmp_path, how):
    root = str(tmp_path)
    first = _Tiny(root)
    ref = [first[i].pos.clone() for i in range(len(first))]
    path = os.path.join(first.processed_dir, "train.pt")
    _corrupt(path, how)
    builds = _Tiny.builds
    with pytest.warns(UserWarning, match="rebuilding") as rec:
        again = _Tiny(root)
    assert any(path in str(w.message) for w in rec)
    assert _Tiny.builds == builds + 1
    assert all(torch.equal(again[i].pos, ref[i]) for i in range(len(ref)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # rebuilt: loads cleanly now
        _Tiny(root)


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_leftover_temp_files_are_cleaned(tmp_path):
    dead, live = _dead_pid(), os.getpid()
    folder = str(tmp_path)
    names = [f"checkpoint.pt.tmp-{dead}-0123abcd", f"checkpoint.pt.tmp{dead}", f"train.pt.tmp-{live}-0123abcd",
             "notes.tmp-x"]
    for n in names:
        open(os.path.join(folder, n), "w").write("partial")
    removed = remove_stale_temps(folder)
    assert sorted(os.path.basename(p) for p in removed) == sorted(names[:2])
    assert sorted(os.listdir(folder)) == sorted(names[2:])  # a live writer's file and others are kept


def test_snapshot_leftover_temp_is_cleaned_and_others_kept(tmp_path):
    dead = _dead_pid()
    snap = str(tmp_path / "snap.pt")
    mine, other = f"{snap}.tmp-{dead}-0123abcd", str(tmp_path / f"unrelated.tmp{dead}")
    for p in (mine, other):
        open(p, "w").write("partial")
    train.main(TINY + ["--prepare-data", "--snapshot", snap])
    assert not os.path.exists(mine) and os.path.exists(other) and os.path.exists(snap)


def test_train_cleans_leftover_temp_files(tmp_path, capsys):
    out, dead = str(tmp_path / "run"), _dead_pid()
    os.makedirs(out)
    leftover = os.path.join(out, f"checkpoint.pt.tmp-{dead}-0123abcd")
    open(leftover, "wb").write(b"half a checkpoint")
    train.main(TINY + ["--steps", "2", "--out", out])
    assert not os.path.exists(leftover)
    assert "removed the partial file" in capsys.readouterr().out


def test_dataset_build_cleans_leftover_temp_files(tmp_path):
    ds = _Tiny(str(tmp_path))
    leftover = os.path.join(ds.processed_dir, f"train.pt.tmp-{_dead_pid()}-0123abcd")
    open(leftover, "wb").write(b"half")
    _Tiny(str(tmp_path), force_reload=True)
    assert not os.path.exists(leftover)


# ------------------------------------------------------------------------------------------------
# Runs: lock and resume rules
# ------------------------------------------------------------------------------------------------
def _hold_lock(out, pid):
    os.makedirs(out, exist_ok=True)
    import socket
    json.dump({"pid": pid, "host": socket.gethostname(), "started": 0}, open(os.path.join(out, ".lock"), "w"))


def test_second_run_on_the_same_out_fails(tmp_path):
    out = str(tmp_path / "run")
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _hold_lock(out, holder.pid)
        with pytest.raises(train.RunError, match=f"in use by another run \\(pid {holder.pid}"):
            train.main(TINY + ["--steps", "2", "--out", out])
        assert not os.path.exists(os.path.join(out, "checkpoint.pt"))
    finally:
        holder.kill()
        holder.wait()


def test_second_run_subprocess_exits_with_a_clear_error(tmp_path):
    # a real concurrent run: the first holds OUT/.lock while it trains
    out = str(tmp_path / "run")
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    lock = DirLock(out).acquire()  # held by this (live) process, as a running training would
    try:
        r = subprocess.run([sys.executable, os.path.join(ROOT, "examples", "train.py"), *TINY, "--steps", "2",
                            "--out", out], env=env, capture_output=True, text=True, timeout=120)
    finally:
        lock.release()
    assert r.returncode == 1 and "in use by another run" in r.stderr and "Traceback" not in r.stderr
    assert not os.path.exists(os.path.join(out, ".lock"))


def test_stale_lock_is_taken_over_and_released(tmp_path, capsys):
    out = str(tmp_path / "run")
    _hold_lock(out, _dead_pid())
    train.main(TINY + ["--steps", "2", "--out", out])
    assert "taking over a stale lock" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, ".lock"))  # released at the end
    with pytest.raises(LockError):  # and a live holder is refused by the lock itself
        with DirLock(out):
            DirLock(out).acquire()


def test_resume_refuses_changed_flags_and_lists_them(tmp_path):
    out = str(tmp_path / "run")
    base = TINY + ["--steps", "4", "--out", out]
    train.main(base + ["--stop-after", "2"])
    assert load_checked(os.path.join(out, "checkpoint.pt"))["config"]["lr"] == 1e-3
    with pytest.raises(train.RunError) as e:
        train.main(base + ["--resume", "--lr", "0.1", "--seed", "1", "--batch-size", "1", "--num-train", "3"])
    msg = str(e.value)
    for flag in ("--lr: 0.001 in the checkpoint, 0.1 now", "--seed: 0 in the checkpoint, 1 now", "--batch-size",
                 "--num-train"):
        assert flag in msg, flag
    assert "--steps" not in msg
    with pytest.raises(train.RunError, match="--steps: 4 in the checkpoint, 8 now"):
        train.main(TINY + ["--steps", "8", "--out", out, "--resume"])
    # run-control flags may change: where and how the run is shown or stopped
    m = train.main(base + ["--resume", "--log-every", "2", "--threads", "2"])
    assert m["steps"] == 4


# ------------------------------------------------------------------------------------------------
# API: silent wrong results
# ------------------------------------------------------------------------------------------------
def _conv():
    torch.manual_seed(0)
    return BSAConv(C, **KW)


def _model():
    torch.manual_seed(0)
    return BSATransformer(C, 1, hidden_channels=C, num_layers=3, **KW)


def _wrong_trees(pos, batch):
    r"""Trees that do not fit ``(pos, batch)`` although their point count does."""
    g = torch.Generator().manual_seed(5)
    moved = pos + 0.05 * torch.randn(pos.shape, generator=g)  # e.g. built before a transform moved the points
    perm = torch.randperm(pos.size(0), generator=g)
    return {"no_batch": build_ball_tree(pos, None, M),
            "other_positions": build_ball_tree(torch.rand(pos.shape, generator=g), batch, M),
            "before_transform": build_ball_tree(moved, batch, M),
            "permuted_points": build_ball_tree(pos[perm], batch, M),
            "other_batch": build_ball_tree(pos, torch.repeat_interleave(torch.arange(2), torch.tensor([12, 20])), M)}


@pytest.mark.parametrize("case", ["no_batch", "other_positions", "before_transform", "permuted_points",
                                  "other_batch"])
def test_mismatched_tree_is_refused_everywhere(case):
    pos, batch = random_batch([20, 12], seed=1)
    x = torch.randn(32, C)
    bad = _wrong_trees(pos, batch)[case]
    good = build_ball_tree(pos, batch, M)
    conv, model = _conv(), _model()
    # the right tree gives the same output as no tree
    assert torch.equal(conv(x, pos, batch, tree=good), conv(x, pos, batch))
    assert torch.equal(model(x, pos, batch, tree=good), model(x, pos, batch))
    with pytest.raises(ValueError, match="tree"):
        conv(x, pos, batch, tree=bad)
    with pytest.raises(ValueError, match="tree"):
        model(x, pos, batch, tree=bad)
    if case in ("other_positions", "before_transform", "permuted_points"):  # bsa_attention sees no batch
        cfg = BSAConfig(**{k: v for k, v in KW.items() if k != "heads"})
        q, k, v = (torch.randn(bad.num_slots, 2, 4) for _ in range(3))
        kw = dict(cfg=cfg, sigma=-torch.ones(2), gates=torch.rand(bad.num_slots, 2, 3), backend="torch")
        bsa_attention(q, k, v, good.to_tree(pos), good, **kw)
        with pytest.raises(ValueError, match="tree"):
            bsa_attention(q, k, v, bad.to_tree(pos), bad, **kw)


def test_per_cloud_cached_trees_and_float64_build_are_accepted():
    pos, batch = random_batch([20, 12], seed=2)
    x = torch.randn(32, C)
    conv = _conv()
    trees = [build_ball_tree(pos[:20], None, M), build_ball_tree(pos[20:], None, M)]
    assert torch.equal(conv(x, pos, batch, tree=trees), conv(x, pos, batch, tree=build_ball_tree(pos, batch, M)))
    conv(x, pos, batch, tree=build_ball_tree(pos.double(), batch, M))  # same points, other dtype: fine
    assert build_ball_tree(pos, batch, M).cloud_sizes == (20, 12)


def test_tree_is_checked_once_per_model_forward(monkeypatch):
    import torch_geometric_bsa.functional as fn
    import torch_geometric_bsa.nn.conv as conv_mod
    calls = {"boundary": 0, "layer": 0}

    def count(key, real):
        def f(*a, **k):
            calls[key] += 1
            return real(*a, **k)
        return f
    monkeypatch.setattr(conv_mod, "check_tree_matches", count("boundary", conv_mod.check_tree_matches))
    monkeypatch.setattr(fn, "check_tree_matches", count("layer", fn.check_tree_matches))
    pos, batch = random_batch([20, 12], seed=3)
    _model()(torch.randn(32, C), pos, batch, tree=build_ball_tree(pos, batch, M))
    assert calls == {"boundary": 1, "layer": 0}  # 3 layers, one check


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_tree_check_does_not_synchronise_on_cuda():
    from torch_geometric_bsa._validate import check_tree_matches
    pos, batch = random_batch([2000, 1200], seed=4, device="cuda")
    tree = build_ball_tree(pos, batch, M)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_tree_matches(tree, pos, batch)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize("scale, ok", [(1e18, True), (1e20, False), (1e30, False)])
def test_huge_coordinates_give_a_finite_result_or_a_clear_error(scale, ok):
    # before the check, 1e20 gave NaN from the layers (squared distances and q.k overflow fp32)
    _, batch = random_batch([40, 24], seed=5)
    pos = torch.randn(64, 3, generator=torch.Generator().manual_seed(5)) * scale
    x = torch.randn(64, C)
    tree = build_ball_tree(pos, batch, M)  # the tree itself is scale invariant (float64 normalisation)
    assert tree.mask.sum() == 64
    for f in (lambda: _conv()(x, pos, batch), lambda: _model()(x, pos, batch)):
        if ok:
            assert bool(torch.isfinite(f()).all())
        else:
            with pytest.raises(ValueError, match="pos .*overflow"):
                f()
    cfg = BSAConfig(**{k: v for k, v in KW.items() if k != "heads"})
    q, k, v = (torch.randn(tree.num_slots, 2, 4) for _ in range(3))
    call = lambda: bsa_attention(q, k, v, tree.to_tree(pos), tree, cfg, sigma=-torch.ones(2),  # noqa: E731
                                 gates=torch.rand(tree.num_slots, 2, 3), backend="torch")
    if ok:
        assert bool(torch.isfinite(call()).all())
    else:
        with pytest.raises(ValueError, match="pos .*overflow"):
            call()


def _attention_inputs():
    pos, batch = random_batch([20, 12], seed=6)
    tree = build_ball_tree(pos, batch, M)
    cfg = BSAConfig(**{k: v for k, v in KW.items() if k != "heads"})
    q, k, v = (torch.randn(tree.num_slots, 2, 4) for _ in range(3))
    kc, vc, cm = compress_mean(k, v, tree.mask, tree.slot_batch, 4, 4)
    ok = dict(q=q, k=k, v=v, pos=tree.to_tree(pos), tree=tree, cfg=cfg, sigma=-torch.ones(2),
              gates=torch.rand(tree.num_slots, 2, 3), backend="torch")
    return ok, kc, vc, cm


def test_compressed_kv_are_validated():
    ok, kc, vc, cm = _attention_inputs()
    assert bool(torch.isfinite(bsa_attention(**ok, k_cmp=kc, v_cmp=vc, cmp_mask=cm)).all())
    for bad, arg in [(dict(k_cmp=kc[:-1], v_cmp=vc), "k_cmp"), (dict(k_cmp=kc, v_cmp=vc[:-2]), "v_cmp"),
                     (dict(k_cmp=torch.cat([kc, kc]), v_cmp=torch.cat([vc, vc])), "k_cmp"),
                     (dict(k_cmp=kc), "v_cmp"), (dict(v_cmp=vc), "k_cmp"), (dict(cmp_mask=cm), "cmp_mask"),
                     (dict(k_cmp=kc, v_cmp=vc, cmp_mask=cm[:-1]), "cmp_mask"),
                     (dict(k_cmp=kc.double(), v_cmp=vc), "k_cmp")]:
        for backend in ("torch", "triton"):
            with pytest.raises(ValueError, match=arg):
                bsa_attention(**{**ok, "backend": backend}, **bad)


def test_bf16_under_the_triton_interpreter_is_refused(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    ok, *_ = _attention_inputs()
    bf = {**ok, **{n: ok[n].bfloat16() for n in ("q", "k", "v", "pos", "sigma", "gates")}, "backend": "triton"}
    with pytest.raises(ValueError, match="bfloat16"):
        bsa_attention(**bf)
    pos, batch = random_batch([20], seed=7)
    conv = BSAConv(C, backend="triton", **KW).bfloat16()
    with pytest.raises(ValueError, match="bfloat16"):
        conv(torch.randn(20, C).bfloat16(), pos, batch)
    with pytest.raises(ValueError, match="bfloat16"):
        BSAConv(C, backend="triton", branches="ball", **KW).bfloat16()(torch.randn(20, C).bfloat16(), pos, batch)
    assert bsa_attention(**{**bf, "backend": "torch"}).dtype == torch.bfloat16  # the reference path is fine


def test_triton_backend_without_gpu_or_interpreter_names_backend(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    pos, batch = random_batch([20], seed=8)
    with pytest.raises(ValueError, match="backend='triton'"):
        BSAConv(C, backend="triton", **KW)(torch.randn(20, C), pos, batch)
    ok, *_ = _attention_inputs()
    with pytest.raises(ValueError, match="backend='triton'"):
        bsa_attention(**{**ok, "backend": "triton"})


@pytest.mark.parametrize("heads", [0, -2, 2.0])
def test_bad_heads_name_the_argument(heads):
    with pytest.raises(ValueError, match="heads"):
        BSAConv(C, **{**KW, "heads": heads})
    with pytest.raises(ValueError, match="heads"):
        BSATransformer(2, 1, hidden_channels=C, **{**KW, "heads": heads})


def test_bad_backend_name_is_refused_at_construction():
    with pytest.raises(ValueError, match="backend"):
        BSAConv(C, backend="cuda", **KW)


def test_constant_target_is_centred_not_nan():
    data = [Data(y=torch.full((5, 1), 3.0)), Data(y=torch.full((4, 1), 3.0))]
    with pytest.warns(UserWarning, match="constant"):
        attach_stats(data, 3.0, 0.0)
    assert all(bool(torch.isfinite(d.y).all()) and float(d.y.abs().max()) == 0 for d in data)
    assert float(data[0].y_std) == 1.0
    assert torch.equal(data[0].y * data[0].y_std + data[0].y_mean, torch.full((5, 1), 3.0))


def test_constant_elasticity_stress_is_finite(tmp_path):
    import numpy as np
    from torch_geometric_bsa.datasets import Elasticity
    rng = np.random.default_rng(0)
    np.save(tmp_path / "Random_UnitCell_XY_10.npy", rng.random((30, 2, 6)))
    np.save(tmp_path / "Random_UnitCell_sigma_10.npy", np.full((30, 6), 250.0))
    with pytest.warns(UserWarning, match="constant"):
        ds = Elasticity(str(tmp_path), "train", num_train=4, num_test=2, num_points=30, log=False)
    assert bool(torch.isfinite(ds[0].y).all()) and ds.y_std == 1.0 and ds.y_mean == 250.0


@pytest.mark.parametrize("ys", [[[2.0], [2.0], [2.0]], [[7.0]]])
def test_train_normalizer_constant_or_single_target(ys):
    train_set = [Data(pos=torch.rand(len(ys), 3), y=torch.tensor(ys))]
    norm = train.Normalizer(3, 1).fit(train_set, {})
    yn = norm.target(torch.tensor(ys))
    assert bool(torch.isfinite(yn).all()) and float(yn.abs().max()) == 0 and float(norm.y_std) == 1.0


def test_tree_without_fingerprint_is_trusted_for_positions():
    # the documented escape hatch (e.g. deliberately reusing one tree for other coordinates)
    pos, batch = random_batch([20, 12], seed=9)
    tree = dataclasses.replace(build_ball_tree(pos, batch, M), pos_key=None)
    _conv()(torch.randn(32, C), torch.rand(32, 3), batch, tree=tree)
    with pytest.raises(ValueError, match="tree"):  # the clouds are still checked
        _conv()(torch.randn(32, C), pos, None, tree=tree)
