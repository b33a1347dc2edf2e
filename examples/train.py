"""Train BSA, full attention, ball attention, PointNet, a kNN GNN or PyG's PointTransformerConv on a point-cloud
regression task.

One entry point for every model (so comparisons share data, optimiser, schedule and evaluation):

    python examples/train.py                                  # generated car pressure, BSA, ~40 s on 2 cores
    python examples/train.py --model full --steps 2000 --out runs/full
    torchrun --nproc-per-node 2 examples/train.py --model gnn # data parallel (gloo on CPU, nccl on CUDA)

Writes ``metrics.json``, ``train_log.csv``, ``eval_log.csv``, ``loss.png``, ``field.png`` and
``checkpoint.pt`` (checksummed; the one before it is kept as ``checkpoint.prev.pt``) to ``--out``;
``--resume`` continues a run exactly and refuses changed flags; a lock keeps two runs out of one
``--out`` (docs/training.md, docs/reliability.md).
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import random
import re
import sys
import time
from typing import Dict, Iterator, List, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

if __package__ in (None, ""):  # `python examples/train.py` from a checkout without `pip install`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_geometric.data import Data  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402
from torch_geometric.utils import scatter  # noqa: E402

from torch_geometric_bsa.io import (CorruptFileError, DirLock, LockError, UnsafeFileError,  # noqa: E402
                                    load_checked, previous_path, remove_stale_temps, save_checked)
from torch_geometric_bsa.datasets import DATASETS as DATASET_REGISTRY  # noqa: E402

MODELS = ("bsa", "full", "ball", "pointnet", "gnn", "ptconv")
# one registry: a class added to torch_geometric_bsa.datasets.DATASETS is a --dataset choice here
# too; "toy" is this script's own tiny synthetic set (tests, smoke runs)
DATASETS = tuple(DATASET_REGISTRY) + ("toy",)
ATTENTION_MODELS = ("bsa", "full", "ball")


# --------------------------------------------------------------------------------------------
# Arguments
# --------------------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {v}")
    return v


def _nonneg_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {s!r}")
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected a non-negative integer, got {v}")
    return v


def _positive_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s!r}")
    if not v > 0 or not math.isfinite(v):
        raise argparse.ArgumentTypeError(f"expected a positive number, got {s}")
    return v


def _fraction(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {s!r}")
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number in [0, 1), got {v}")
    return v


def _scalar(v: str):
    for cast in (int, float):
        try:
            return cast(v)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(v.lower(), v)


def _key_value(s: str):
    r"""``KEY=VALUE`` -> ``(key, value)``: an int, a float, a bool, a string, or with commas a tuple
    of them (``gap=0.2,1.0`` -> ``("gap", (0.2, 1.0))``)."""
    if "=" not in s:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {s!r}")
    k, v = s.split("=", 1)
    if "," in v:
        return k, tuple(_scalar(x) for x in v.split(","))
    return k, _scalar(v)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a point-cloud regression model (BSA, full/ball attention, PointNet, kNN GNN, "
                    "PointTransformerConv).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="car", choices=DATASETS,
                   help="generated car surface pressure (default), generated elasticity, the real "
                        "ShapeNet-Car / Elasticity files (--root), or 'toy' (tiny synthetic, for tests)")
    g.add_argument("--root", default="data", help="dataset folder (generated data is cached here)")
    g.add_argument("--data-size", default="quick", choices=("quick", "full"),
                   help="generated datasets: 'quick' (small, minutes on a CPU) or 'full' (the dataset's defaults)")
    g.add_argument("--num-train", type=_positive_int, default=None, help="training samples to generate/use")
    g.add_argument("--num-test", type=_positive_int, default=None, help="test samples to generate/use")
    g.add_argument("--num-points", type=_positive_int, default=None, help="points per generated cloud (car, toy)")
    g.add_argument("--snapshot", default=None, metavar="PATH",
                   help="read the splits from PATH if it exists, else build them and save them there")
    g.add_argument("--data-kw", type=_key_value, action="append", default=[], metavar="KEY=VALUE",
                   help="extra keyword for get_dataset (repeatable), e.g. --data-kw n_length=30, "
                        "--data-kw gap=0.2,1.0 (commas: a tuple)")
    g.add_argument("--local-geometry", type=_nonneg_int, default=0, metavar="K",
                   help="append local-geometry features of the K nearest points to every point's input "
                        "(spacing and the offset to their centroid: where points are missing; "
                        "torch_geometric_bsa.transforms.LocalGeometry); 0: off")
    g.add_argument("--data-workers", type=_nonneg_int, default=0,
                   help="processes that generate the 'car'/'multibody' dataset in parallel (0: in this process); "
                        "the data do not depend on it")
    g.add_argument("--prepare-data", action="store_true",
                   help="only build (or read) the dataset cache and the --snapshot, then exit")
    g.add_argument("--batch-size", type=_positive_int, default=2, help="clouds per step and process")

    g = p.add_argument_group("model")
    g.add_argument("--model", default="bsa", choices=MODELS)
    g.add_argument("--hidden", type=_positive_int, default=64, help="width")
    g.add_argument("--layers", type=_positive_int, default=4, help="blocks / message-passing layers")
    g.add_argument("--heads", type=_positive_int, default=4, help="attention heads")
    g.add_argument("--mlp-ratio", type=_positive_float, default=4.0, help="SwiGLU hidden / width")
    g.add_argument("--ball-size", type=_positive_int, default=128, help="points per ball")
    g.add_argument("--cmp-block", type=_positive_int, default=8, help="BSA compression block")
    g.add_argument("--slc-block", type=_positive_int, default=8, help="BSA selection block")
    g.add_argument("--topk", type=_positive_int, default=8, help="BSA selected blocks per group")
    g.add_argument("--group-size", type=_positive_int, default=8, help="BSA query group size")
    g.add_argument("--group-compression", action="store_true", help="BSA: pool queries per group")
    g.add_argument("--cmp-window", type=_positive_int, default=None,
                   help="BSA for very large clouds: compression/selection within windows of this many "
                        "tree-ordered slots (a multiple of --ball-size) plus a coarse per-ball branch")
    g.add_argument("--selection", default="shared", choices=("shared", "per_head"),
                   help="BSA block-selection rule: 'shared' (ours: one selection per query group for all "
                        "heads, by compressed-attention probability mass, own ball allowed) or 'per_head' "
                        "(the BSA authors': per-head top-k of compressed logits, own ball excluded)")
    g.add_argument("--compression", default="mlp", choices=("mlp", "mean"), help="BSA block pooling")
    g.add_argument("--drop-branch", action="append", default=[], choices=("ball", "cmp", "slc"),
                   help="BSA ablation (repeatable): hold this branch's gate at 0 (still computed: same time, "
                        "same FLOPs count)")
    g.add_argument("--gate-bias", type=float, nargs=3, default=None, metavar=("BALL", "CMP", "SLC"),
                   help="BSA: initial bias of each branch's gate logit (BSAConv(gate_bias=...)); default: BSAConv's, "
                        "the selection gate's logits at -4 (near 0.02) and nn.Linear's own init for the others "
                        "(gates near sigmoid(0) = 0.5)")
    g.add_argument("--linear-gates", action="store_true",
                   help="BSA: every gate's bias from nn.Linear's init (BSAConv(gate_bias={})): all three gates "
                        "start near 0.5, the default before the selection gate's low start")
    g.add_argument("--rotate", action="store_true", help="alternate layers use a rotated ball tree")
    g.add_argument("--backend", default="auto", choices=("auto", "torch", "cpu", "triton"),
                   help="BSA/ball attention backend; 'auto' probes the Triton kernels on CUDA and "
                        "falls back to the PyTorch reference; off CUDA it is the fast CPU path")
    g.add_argument("--knn", type=_positive_int, default=16, help="kNN-graph neighbours (gnn, ptconv)")

    g = p.add_argument_group("optimisation")
    budget = g.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive_int, default=None, help="optimiser steps (default 200)")
    budget.add_argument("--epochs", type=_positive_int, default=None, help="epochs (instead of --steps)")
    g.add_argument("--time-budget", type=_positive_float, default=None, metavar="S",
                   help="train for S seconds (training time: evaluations and checkpoints not counted): the "
                        "warm-up and cosine run on the fraction of S spent, not of the steps, and the run ends "
                        "when S is spent, so models given the same S train equally long, each with a complete "
                        "schedule; --steps/--epochs is then an upper bound (default: none); one process only")
    g.add_argument("--max-time", type=_positive_float, default=None,
                   help="stop training after this many seconds (the schedule still spans --steps)")
    g.add_argument("--stop-after", type=_positive_int, default=None, metavar="N",
                   help="leave after N steps of this invocation (checkpointed; the schedule still spans "
                        "--steps; continue with --resume)")
    g.add_argument("--lr", type=_positive_float, default=1e-3)
    g.add_argument("--min-lr-ratio", type=_fraction, default=0.01, help="final lr / lr of the cosine")
    g.add_argument("--warmup", type=_fraction, default=0.05,
                   help="warmup fraction of the steps (of the seconds with --time-budget)")
    g.add_argument("--weight-decay", type=float, default=0.01)
    g.add_argument("--grad-clip", type=float, default=1.0, help="max grad norm (0: off)")
    g.add_argument("--precision", default="auto", choices=("auto", "bf16", "fp32"),
                   help="autocast dtype; auto = bf16 on CUDA, fp32 on CPU")
    g.add_argument("--compile", action="store_true",
                   help="CUDA only: capture the training step, ball tree included, as a CUDA graph "
                        "(torch_geometric_bsa.capture.GraphedStep), one graph per batch shape")
    g.add_argument("--bucket-slots", type=int, default=None,
                   help="attention models on CUDA: pad each batch with a dummy cloud to a multiple of this many "
                        "tree slots so that ragged batches replay the same per-block CUDA graphs "
                        "(BSATransformer(bucket_slots=...)); a multiple of --ball-size, e.g. 2048. Default: "
                        "'auto' (buckets of 8 balls once ragged batches show: a fifth layout, or paused graphs); "
                        "0: never")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")

    g = p.add_argument_group("logging and checkpoints")
    g.add_argument("--out", default="runs/train", help="output folder")
    g.add_argument("--log-every", type=_positive_int, default=10, help="steps between train-log rows")
    g.add_argument("--eval-every", type=_nonneg_int, default=None,
                   help="steps between evaluations (default: 4 over the run; 0: at the end only)")
    g.add_argument("--ckpt-every", type=_nonneg_int, default=100, help="steps between checkpoints (0: at the end only)")
    g.add_argument("--resume", nargs="?", const="auto", default=None, metavar="CKPT",
                   help="continue from CKPT (default: OUT/checkpoint.pt)")
    g.add_argument("--no-plots", action="store_true", help="skip the matplotlib figures")
    g.add_argument("--no-progress", action="store_true", help="no tqdm progress bar")
    return p


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    validate_args(parser, args)
    return args


_DEVICE_RE = re.compile(r"auto|cpu|cuda(?::(\d+))?")
MAX_SEED = 2 ** 32 - 1  # NumPy's seed range (np.random.seed); torch accepts it too


def validate_args(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    r"""Every check of the flags beyond their argparse ``type``/``choices`` (which already reject,
    e.g., ``--steps 0``, ``--lr -1``, ``--batch-size 0``, ``--log-every 0``, ``--ckpt-every -1``).

    Runs right after parsing, before any data generation or model building; a bad value stops with
    ``parser.error`` (exit status 2, ``error: argument --FLAG: ...`` on stderr)."""
    def bad(flag: str, msg: str):
        parser.error(f"argument {flag}: {msg}")

    # optimisation
    if not (math.isfinite(args.weight_decay) and args.weight_decay >= 0):
        bad("--weight-decay", f"expected a finite number >= 0, got {args.weight_decay}")
    if not (math.isfinite(args.grad_clip) and args.grad_clip >= 0):
        bad("--grad-clip", f"expected a finite max grad norm >= 0 (0 turns clipping off), got {args.grad_clip}")
    if not 0 <= args.seed <= MAX_SEED:
        bad("--seed", f"expected an integer in [0, {MAX_SEED}], got {args.seed}")

    # device (and what needs a particular one)
    m = _DEVICE_RE.fullmatch(args.device)
    if m is None:
        bad("--device", f"expected auto, cpu, cuda or cuda:N, got {args.device!r}")
    if args.device.startswith("cuda"):
        if not torch.cuda.is_available():
            bad("--device", f"{args.device!r} requested but CUDA is not available "
                            f"(torch {torch.__version__}); use --device cpu")
        if m.group(1) is not None and int(m.group(1)) >= torch.cuda.device_count():
            bad("--device", f"{args.device!r} requested but only {torch.cuda.device_count()} CUDA "
                            f"device(s) are visible")
    on_cuda = args.device.startswith("cuda") or (args.device == "auto" and torch.cuda.is_available())
    if args.backend == "triton" and args.model in ("bsa", "ball") and not on_cuda:
        bad("--backend", f"'triton' needs a CUDA device (--device {args.device}); use --backend torch or auto")

    # model
    if args.model in ATTENTION_MODELS:
        if args.hidden % args.heads:
            parser.error(f"--heads {args.heads} must divide --hidden {args.hidden}")
        if int(args.mlp_ratio * args.hidden) < 1:
            bad("--mlp-ratio", f"{args.mlp_ratio:g} x --hidden {args.hidden} leaves an MLP of width 0")
        if args.model == "bsa":
            from torch_geometric_bsa.reference import BSAConfig
            try:
                BSAConfig(ball_size=args.ball_size, cmp_block=args.cmp_block, slc_block=args.slc_block,
                          topk=args.topk, group_size=args.group_size, cmp_window=args.cmp_window,
                          selection=args.selection)
            except ValueError as e:
                parser.error(f"BSA sizes: {e} (flags --ball-size/--cmp-block/--slc-block/--group-size/"
                             "--cmp-window)")

    if args.selection != "shared" and args.model != "bsa":
        bad("--selection", f"applies to --model bsa, not {args.model!r}")
    if args.drop_branch and args.model != "bsa":
        bad("--drop-branch", f"applies to --model bsa, not {args.model!r}")
    if args.gate_bias is not None:
        if args.model != "bsa":
            bad("--gate-bias", f"applies to --model bsa, not {args.model!r}")
        if not all(math.isfinite(b) for b in args.gate_bias):
            bad("--gate-bias", f"expected three finite numbers, got {args.gate_bias}")
    if getattr(args, "linear_gates", False):
        if args.model != "bsa":
            bad("--linear-gates", f"applies to --model bsa, not {args.model!r}")
        if args.gate_bias is not None:
            bad("--linear-gates", "is the start --gate-bias would replace: give one of the two")
    if len(set(args.drop_branch)) == 3:
        bad("--drop-branch", "dropping ball, cmp and slc leaves no branch")
    if args.time_budget is not None and int(os.environ.get("WORLD_SIZE", "1")) > 1:
        bad("--time-budget", "runs one process: each rank's clock would set its own learning rate and "
                             "end its own run; use --steps with torchrun")

    # data
    if args.num_points is not None and args.dataset not in ("car", "multibody", "toy"):
        parser.error(f"--num-points applies to the generated 'car'/'multibody' datasets, not "
                     f"{args.dataset!r}")
    if args.data_workers and args.dataset not in ("car", "multibody"):
        parser.error(f"--data-workers applies to the generated 'car'/'multibody' datasets, not "
                     f"{args.dataset!r}")
    if args.data_kw:
        if args.dataset == "toy":
            bad("--data-kw", "the 'toy' dataset takes no keywords (use --num-train/--num-test/--num-points)")
        import inspect
        params = inspect.signature(DATASET_REGISTRY[args.dataset]).parameters
        if not any(q.kind is inspect.Parameter.VAR_KEYWORD for q in params.values()):
            known = [k for k in params if k not in ("root", "split")]
            for k, _ in args.data_kw:
                if k not in known:
                    bad("--data-kw", f"unknown keyword {k!r} for --dataset {args.dataset} (known: {', '.join(known)})")

    # files
    if args.resume and args.resume != "auto" and not os.path.isfile(args.resume):
        parser.error(f"--resume: no checkpoint at {args.resume}")
    if not args.prepare_data and os.path.exists(args.out) and not os.path.isdir(args.out):
        bad("--out", f"{args.out} exists and is not a folder")


# --------------------------------------------------------------------------------------------
# Distributed helpers (torchrun sets RANK / WORLD_SIZE / LOCAL_RANK)
# --------------------------------------------------------------------------------------------
class Dist:
    def __init__(self, device_arg: str):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if device_arg == "auto":
            device_arg = "cuda" if torch.cuda.is_available() else "cpu"
        device = torch.device(device_arg)
        if device.type == "cuda" and device.index is None:
            device = torch.device("cuda", self.local_rank if self.world > 1 else torch.cuda.current_device())
        if device.type == "cuda":
            torch.cuda.set_device(device)
        self.device = device
        if self.world > 1 and not dist.is_initialized():
            dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self) -> bool:
        return self.rank == 0

    def all_sum(self, t: Tensor) -> Tensor:
        if self.world > 1:
            dist.all_reduce(t)
        return t

    def barrier(self):
        if self.world > 1:
            dist.barrier()

    def close(self):
        if self.world > 1 and dist.is_initialized():
            dist.destroy_process_group()


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------
def toy_dataset(split: str, num: int, seed: int = 0, points=(96, 160), dim: int = 3) -> List[Data]:
    r"""Tiny synthetic stand-in: random ellipsoid surfaces, target a smooth field plus a term that
    depends on the whole cloud (its extent), so that global context helps. For tests and smoke runs."""
    g = torch.Generator().manual_seed(seed * 1000 + (0 if split == "train" else 1))
    out = []
    for _ in range(num):
        n = int(torch.randint(points[0], points[1] + 1, (1,), generator=g))
        axes = 0.5 + torch.rand(dim, generator=g)
        u = F.normalize(torch.randn(n, dim, generator=g), dim=-1)
        pos = u * axes
        y = torch.sin(3 * pos[:, :1]) + u[:, 1:2] ** 2 * axes[0] + 0.1 * pos[:, -1:]
        out.append(Data(pos=pos, x=u, y=y))
    return out


# `--data-size quick` (the default): small generated datasets, so `python examples/train.py` runs
# in minutes on a laptop CPU; `full` uses the dataset's own defaults. Explicit flags override.
QUICK = {
    "car": dict(num_train=24, num_test=8, num_points=1024, n_length=24, n_around=24),
    "elasticity-gen": dict(num_train=48, num_test=12),
    "multibody": dict(num_train=24, num_test=8, num_points=2048),
}
GENERATED = ("car", "elasticity-gen", "multibody")


def dataset_kwargs(args) -> Dict:
    r"""Keyword arguments for ``get_dataset`` (generated datasets build both splits from one config)."""
    kw = dict(QUICK.get(args.dataset, {})) if args.data_size == "quick" else {}
    if args.dataset in GENERATED:
        for flag, key in (("num_train", "num_train"), ("num_test", "num_test"), ("num_points", "num_points")):
            if getattr(args, flag) is not None:
                kw[key] = getattr(args, flag)
    if args.dataset in ("car", "multibody") and args.data_workers:
        kw["num_workers"] = args.data_workers
    kw.update(dict(args.data_kw))
    return kw


def load_splits(args) -> tuple:
    r"""``(train, test, stats)`` for ``args.dataset``; ``stats`` holds the dataset's own target
    normalisation when it stores normalised targets (``y_mean``, ``y_std``: physical = y * std + mean).

    With ``--snapshot PATH`` the splits are read from PATH when it exists (written by an earlier run
    with the same flag), so a dataset generated on one machine can be carried to another."""
    if args.snapshot:  # a write of the snapshot that was killed leaves a temp file beside it
        remove_stale_temps(os.path.dirname(os.path.abspath(args.snapshot)), os.path.basename(args.snapshot) + ".tmp")
    if args.snapshot and os.path.isfile(args.snapshot):
        snap = load_checked(args.snapshot)  # checksummed; tensors and plain containers only
        try:
            return ([Data.from_dict(d) for d in snap["train"]], [Data.from_dict(d) for d in snap["test"]],
                    snap["stats"])
        except (KeyError, TypeError, AttributeError) as e:
            raise CorruptFileError(f"{args.snapshot}: not a --snapshot file ({type(e).__name__}: {e})") from None
    if args.dataset == "toy":
        pts = (args.num_points, args.num_points) if args.num_points else (96, 160)
        train, test, stats = (toy_dataset("train", args.num_train or 8, args.seed, pts),
                              toy_dataset("test", args.num_test or 4, args.seed, pts), {})
    else:
        from torch_geometric_bsa.datasets import get_dataset
        kw = dataset_kwargs(args)
        train = get_dataset(args.dataset, args.root, "train", **kw)
        test = get_dataset(args.dataset, args.root, "test", **kw)
        stats = _dataset_stats(train)
        if args.dataset not in GENERATED:  # real files: --num-train/--num-test take a prefix
            train = train[:args.num_train] if args.num_train else train
            test = test[:args.num_test] if args.num_test else test
    if args.snapshot:  # samples as dicts of tensors: the file needs no class allowlist to load
        save_checked(args.snapshot, {"train": [train[i].to_dict() for i in range(len(train))],
                                     "test": [test[i].to_dict() for i in range(len(test))],
                                     "stats": stats, "meta": {"dataset": args.dataset, **dataset_kwargs(args)}})
    return train, test, stats


def with_local_geometry(ds, k: int) -> list:
    r"""``ds``'s samples with :class:`~torch_geometric_bsa.transforms.LocalGeometry` features appended to
    ``x`` (computed once here, not per step)."""
    from tqdm.auto import tqdm
    from torch_geometric_bsa.transforms import LocalGeometry
    t = LocalGeometry(k)
    return [t(ds[i].clone()) for i in tqdm(range(len(ds)), desc=f"local geometry (k={k})", leave=False,
                                          disable=len(ds) < 64)]


def _dataset_stats(ds) -> Dict:
    r"""A dataset that stores normalised targets says how to undo it (``y_mean``/``y_std``)."""
    for a, b in (("y_mean", "y_std"), ("mean", "std")):
        if getattr(ds, a, None) is not None and getattr(ds, b, None) is not None:
            return {"y_mean": torch.as_tensor(getattr(ds, a), dtype=torch.float32).view(-1),
                    "y_std": torch.as_tensor(getattr(ds, b), dtype=torch.float32).view(-1)}
    return {}


class Normalizer(nn.Module):
    r"""Positions: centred and scaled by the training set (the distance bias and the position
    projections see O(1) coordinates). Targets: standardised by the training set unless the dataset
    already stores them standardised (``y_mean``/``y_std`` given), in which case those are used to
    report physical units. Fitted on (up to 256) training clouds; saved with the checkpoint."""

    def __init__(self, dim: int, out_channels: int):
        super().__init__()
        for name, size in (("pos_center", dim), ("y_mean", out_channels), ("y_std", out_channels),
                           ("phys_mean", out_channels), ("phys_std", out_channels)):
            self.register_buffer(name, torch.zeros(size))
        self.register_buffer("pos_scale", torch.ones(()))

    @torch.no_grad()
    def fit(self, train, stats: Dict):
        sample = [train[i] for i in range(min(len(train), 256))]
        pos = torch.cat([d.pos for d in sample]).float()
        y = torch.cat([d.y.view(d.pos.size(0), -1) for d in sample]).float()
        self.pos_center.copy_(pos.mean(0))
        self.pos_scale.copy_((pos - pos.mean(0)).square().sum(-1).mean().sqrt().clamp_min(1e-8))
        if stats:  # targets already standardised by the dataset
            self.y_mean.zero_()
            self.y_std.fill_(1.0)
            self.phys_mean.copy_(stats["y_mean"].expand_as(self.phys_mean))
            self.phys_std.copy_(stats["y_std"].expand_as(self.phys_std))
        else:
            mean = y.mean(0)
            std = y.std(0) if y.size(0) > 1 else torch.ones_like(mean)
            # a constant target (std 0, or one point: NaN) is centred, not scaled: 0, not NaN or noise x 1e8
            const = ~(std > 1e-12 * mean.abs().clamp_min(1.0))
            if bool(const.any()):
                print(f"[train] warning: target channel(s) {const.nonzero().flatten().tolist()} are constant in "
                      "the training set: centred but not scaled", flush=True)
            self.y_mean.copy_(mean)
            self.y_std.copy_(torch.where(const, torch.ones_like(std), std))
            self.phys_mean.zero_()
            self.phys_std.fill_(1.0)
        return self

    def pos(self, pos: Tensor) -> Tensor:
        return (pos - self.pos_center) / self.pos_scale

    def target(self, y: Tensor) -> Tensor:
        return (y - self.y_mean) / self.y_std

    def physical(self, y_norm: Tensor) -> Tensor:
        r"""Model output (normalised) -> physical units."""
        return (y_norm * self.y_std + self.y_mean) * self.phys_std + self.phys_mean


class ShardSampler(torch.utils.data.Sampler):
    r"""Seeded, resumable sharded sampler (the DistributedSampler recipe with a start offset).

    Epoch ``e`` uses the permutation of ``torch.Generator().manual_seed(seed + e)`` (padded to a
    multiple of ``world``), rank ``r`` takes every ``world``-th index, and ``set_epoch(e, skip)``
    drops the first ``skip`` indices so a resumed run sees exactly the batches it would have seen.
    """

    def __init__(self, length: int, rank: int = 0, world: int = 1, shuffle: bool = True, seed: int = 0):
        self.length, self.rank, self.world, self.shuffle, self.seed = length, rank, world, shuffle, seed
        self.per_rank = math.ceil(length / world)
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0):
        self.epoch, self.skip = epoch, skip

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            idx = torch.randperm(self.length, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        else:
            idx = torch.arange(self.length)
        idx = idx.repeat(math.ceil(self.per_rank * self.world / self.length))[:self.per_rank * self.world]
        return iter(idx[self.rank::self.world][self.skip:].tolist())

    def __len__(self) -> int:
        return self.per_rank - self.skip


# --------------------------------------------------------------------------------------------
# Models
# --------------------------------------------------------------------------------------------
def _bucket_slots(args):
    # --bucket-slots: unset -> "auto" (the model's default), 0 -> never pad, N -> buckets of N slots
    n = getattr(args, "bucket_slots", None)
    return "auto" if n is None else (n or None)


def build_model(args, in_channels: int, out_channels: int, dim: int, backend: Optional[str] = None) -> nn.Module:
    if args.model in ATTENTION_MODELS:
        from torch_geometric_bsa.nn import BSATransformer
        kw = {}
        if args.model in ("bsa", "ball"):
            kw["backend"] = backend or args.backend
        if args.model == "bsa":
            kw.update(cmp_block=args.cmp_block, slc_block=args.slc_block, topk=args.topk,
                      group_size=args.group_size, group_compression=args.group_compression,
                      compression=args.compression, cmp_window=args.cmp_window,
                      selection=args.selection, drop_branches=tuple(args.drop_branch))
            if getattr(args, "gate_bias", None) is not None:
                kw["gate_bias"] = dict(zip(("ball", "cmp", "slc"), args.gate_bias))
            elif getattr(args, "linear_gates", False):
                kw["gate_bias"] = {}
        return BSATransformer(in_channels, out_channels, args.hidden, args.layers, args.heads,
                              attention=args.model, mlp_ratio=args.mlp_ratio, rotate=args.rotate, dim=dim,
                              ball_size=args.ball_size, bucket_slots=_bucket_slots(args), **kw)
    from torch_geometric_bsa.nn.baselines import KNNGNN, PointNet, PointTransformerNet
    if args.model == "pointnet":
        return PointNet(in_channels, out_channels, args.hidden, num_layers=args.layers, dim=dim)
    if args.model == "ptconv":
        return PointTransformerNet(in_channels, out_channels, args.hidden, num_layers=args.layers, k=args.knn,
                                   dim=dim)
    return KNNGNN(in_channels, out_channels, args.hidden, num_layers=args.layers, k=args.knn, dim=dim)


def resolve_attention_backend(args, in_channels: int, out_channels: int, dim: int, device: torch.device,
                              log=print) -> Optional[str]:
    r"""``--backend auto`` on CUDA: try the Triton path on a tiny cloud (forward + backward) and fall
    back to the PyTorch reference if a kernel is missing, so the script runs while kernels land."""
    if args.model not in ("bsa", "ball"):
        return None
    if args.backend != "auto" or device.type != "cuda":
        return ("cpu" if device.type != "cuda" else "torch") if args.backend == "auto" else args.backend
    try:
        probe = build_model(args, in_channels, out_channels, dim, backend="triton").to(device)
        n = 2 * args.ball_size
        pos = torch.randn(n, dim, device=device)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            probe(torch.randn(n, in_channels, device=device), pos, None).float().sum().backward()
        return "triton"
    except Exception as e:  # a missing kernel (NotImplementedError, ImportError) or one that fails to build
        log(f"[train] Triton backend unavailable for --model {args.model} ({type(e).__name__}: "
            f"{str(e).splitlines()[0][:120]}); using backend='torch'")
        return "torch"


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def model_gflops(args, n: int, in_channels: int, out_channels: int, dim: int, model: nn.Module) -> float:
    r"""Forward GFLOPs on one cloud of ``n`` points: flops.py for the attention models, the
    baselines' own analytic estimate (their ``flops``) otherwise."""
    if args.model in ATTENTION_MODELS:
        from torch_geometric_bsa.flops import model_flops
        from torch_geometric_bsa.reference import BSAConfig
        cfg = BSAConfig(ball_size=args.ball_size, cmp_block=args.cmp_block, slc_block=args.slc_block,
                        topk=args.topk, group_size=args.group_size, group_compression=args.group_compression,
                        cmp_window=args.cmp_window, selection=args.selection) \
            if args.model == "bsa" else BSAConfig(ball_size=args.ball_size, cmp_block=1, slc_block=1,
                                                  group_size=1)
        return model_flops(n, args.hidden, args.layers, args.heads, args.model, cfg, mlp_ratio=args.mlp_ratio,
                           in_channels=in_channels, out_channels=out_channels, dim=dim,
                           compression=args.compression)["total"] / 1e9
    return model.flops(n) / 1e9


# --------------------------------------------------------------------------------------------
# Schedule, checkpoints, RNG
# --------------------------------------------------------------------------------------------
def cosine_with_warmup(total: int, warmup_frac: float, min_ratio: float):
    warmup = int(round(warmup_frac * total))

    def f(step: int) -> float:  # `step` = optimiser steps taken so far
        if step < warmup:
            return (step + 1) / warmup
        t = min(1.0, (step - warmup) / max(1, total - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def cosine_by_fraction(spent, warmup_frac: float, min_ratio: float, first: float = 0.01):
    r"""The warm-up and cosine of :func:`cosine_with_warmup` on a fraction of the budget instead of
    the step count: ``spent()`` returns the fraction in [0, 1] (for ``--time-budget``, training
    seconds / budget), read whenever the scheduler steps. The warm-up starts at ``first`` of the
    learning rate (the step schedule starts at one warm-up step's share)."""
    def f(_step: int) -> float:
        p = min(1.0, max(0.0, spent()))
        if p < warmup_frac:
            return max(first, p / warmup_frac)
        t = (p - warmup_frac) / max(1e-12, 1.0 - warmup_frac)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t))
    return f


def rng_state() -> Dict:
    name, keys, pos, has_gauss, gauss = np.random.get_state()  # numpy's array as a tensor: loads weights_only
    st = {"torch": torch.get_rng_state(), "numpy": (name, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                    gauss), "python": random.getstate()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: Dict):
    torch.set_rng_state(st["torch"])
    name, keys, pos, has_gauss, gauss = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, gauss))
    random.setstate(st["python"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def save_checkpoint(path: str, obj: Dict, keep_previous: bool = True):
    r"""Atomic and checksummed (``torch_geometric_bsa.io``); the checkpoint it replaces is kept as
    ``checkpoint.prev.pt``, the fallback of ``--resume`` when the newest one is corrupt."""
    save_checked(path, obj, keep_previous=keep_previous)


class RunError(RuntimeError):
    r"""A run that must not start: ``--out`` locked by a live run, or ``--resume`` refused."""


# Flags that may differ on --resume: where and how the run is shown, placed or stopped. Every other
# flag is recorded in the checkpoint ("config") and a difference is refused (read_resume_checkpoint).
RESUME_MAY_CHANGE = ("resume", "stop_after", "max_time", "no_plots", "no_progress", "threads", "device",
                     "data_workers", "prepare_data", "log_every", "eval_every", "ckpt_every", "out", "root",
                     "snapshot", "bucket_slots")  # bucket_slots: same outputs, other graph shapes


# Flags added after checkpoints recorded their run configuration, with the value every earlier run
# had: a checkpoint that lacks one is compared as if it recorded that value (so older runs resume,
# and a run with another value is refused).
ADDED_FLAGS = {"selection": "shared", "gate_bias": None, "linear_gates": False, "local_geometry": 0,
               "time_budget": None}


def run_config(args) -> Dict:
    r"""The flags that define a run (all but ``RESUME_MAY_CHANGE``), JSON-normalised for comparison."""
    return json.loads(json.dumps({k: v for k, v in sorted(vars(args).items()) if k not in RESUME_MAY_CHANGE}))


def read_resume_checkpoint(args, log=print, rename_bad: bool = True):
    r"""``(checkpoint, path)`` for ``--resume``: the newest checkpoint, or the previous one
    (``checkpoint.prev.pt``) when the newest is missing, truncated or fails its checksum (logged).

    Raises ``RunError`` when no usable checkpoint exists, when a file is unsafe (a crafted pickle
    is never loaded and never skipped silently), or when the checkpoint's recorded flags differ
    from this invocation's (each differing flag is listed)."""
    path = os.path.join(args.out, "checkpoint.pt") if args.resume == "auto" else args.resume
    problems = []
    for cand in (path, previous_path(path)):
        if not os.path.isfile(cand):
            problems.append(f"{cand}: no such file")
            continue
        try:
            ck = load_checked(cand)
        except FileNotFoundError:  # renamed aside by rank 0 meanwhile
            problems.append(f"{cand}: no such file")
            continue
        except UnsafeFileError as e:
            raise RunError(f"--resume: {e}") from None
        except CorruptFileError as e:
            problems.append(str(e))
            continue
        if cand != path:
            log(f"[train] --resume: {problems[0]}; falling back to the previous checkpoint {cand} "
                f"(step {ck.get('step')})")
            if (rename_bad and os.path.isfile(path)
                    and os.path.abspath(path) == os.path.abspath(os.path.join(args.out, "checkpoint.pt"))):  # else the next save would rotate it over the good one
                os.replace(path, path + ".corrupt")
                log(f"[train] --resume: kept the unusable file as {path}.corrupt")
        break
    else:
        raise RunError("--resume: no usable checkpoint:\n  " + "\n  ".join(problems))
    saved, now = ck.get("config"), run_config(args)
    if saved is None:
        raise RunError(f"--resume: {cand} records no run configuration (written by an older version); "
                       "start a new run")
    saved = {**ADDED_FLAGS, **saved}
    diff = [f"  --{k.replace('_', '-')}: {saved.get(k)!r} in the checkpoint, {now.get(k)!r} now"
            for k in sorted(set(saved) | set(now)) if saved.get(k) != now.get(k)]
    if diff:
        raise RunError(f"--resume: {cand} was written with other flags; a resumed run must keep them "
                       f"(changing them would not continue the same run):\n" + "\n".join(diff) +
                       "\nresume with the checkpoint's values, or start a new run in another --out")
    return ck, cand


# --------------------------------------------------------------------------------------------
# Evaluation and plots
# --------------------------------------------------------------------------------------------
def _to_input(data, norm: Normalizer, device):
    data = data.to(device, non_blocking=True)
    pos = norm.pos(data.pos.float())
    x = data.x.float() if getattr(data, "x", None) is not None else pos.new_zeros(pos.size(0), 0)
    batch = getattr(data, "batch", None)
    if batch is None:
        batch = torch.zeros(pos.size(0), dtype=torch.long, device=device)
    y = data.y.float().view(pos.size(0), -1)
    return x, pos, batch, y


@torch.no_grad()
def evaluate(model, test, norm: Normalizer, args, dd: Dist, autocast) -> Dict[str, float]:
    r"""Test MSE (normalised and physical units) and the mean per-sample relative L2 error,
    sharded over ranks without padding and summed with all-reduce."""
    with torch.random.fork_rng(devices=[dd.device.index] if dd.device.type == "cuda" else []):
        return _evaluate(model, test, norm, args, dd, autocast)  # evaluating never moves the RNG streams


def _evaluate(model, test, norm: Normalizer, args, dd: Dist, autocast) -> Dict[str, float]:
    model.eval()
    idx = list(range(dd.rank, len(test), dd.world))
    loader = DataLoader(torch.utils.data.Subset(test, idx), batch_size=args.batch_size, shuffle=False)
    acc = torch.zeros(5, dtype=torch.float64, device=dd.device)  # sse_norm, sse_phys, points*ch, rel, clouds
    for data in loader:
        x, pos, batch, y = _to_input(data, norm, dd.device)
        with autocast():
            pred = model(x, pos, batch)
        pred = pred.float()
        yn = norm.target(y)
        pp, yp = norm.physical(pred), y * norm.phys_std + norm.phys_mean
        num = scatter((pp - yp).square().sum(-1), batch, 0, reduce="sum")
        den = scatter(yp.square().sum(-1), batch, 0, reduce="sum").clamp_min(1e-30)
        acc += torch.stack([(pred - yn).square().sum().double(), (pp - yp).square().sum().double(),
                            torch.tensor(float(y.numel()), device=dd.device, dtype=torch.float64),
                            (num / den).sqrt().sum().double(),
                            torch.tensor(float(num.numel()), device=dd.device, dtype=torch.float64)])
    dd.all_sum(acc)
    model.train()
    a = acc.tolist()
    return {"test_mse": a[0] / max(a[2], 1), "test_mse_phys": a[1] / max(a[2], 1),
            "test_rel_l2": a[3] / max(a[4], 1)}


def write_plots(out: str, train_log: List[Dict], eval_log: List[Dict], model, test, norm: Normalizer,
                device, autocast, title: str, label: str = "target (dataset units)"):
    r"""``loss.png`` and ``field.png`` (true / predicted / |error| on test sample 0, colour bars
    labelled with ``label``, the target's name and units)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if train_log:
        ax.plot([r["step"] for r in train_log], [r["loss"] for r in train_log], label="train MSE (normalised)")
    if eval_log:
        ax.plot([r["step"] for r in eval_log], [r["test_mse"] for r in eval_log], "o-", label="test MSE (normalised)")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("MSE")
    ax.set_title(title)
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(os.path.join(out, "loss.png"), dpi=110)
    plt.close(fig)

    data = test[0]
    model.eval()
    with torch.no_grad():
        x, pos, batch, y = _to_input(data, norm, device)
        with autocast():
            pred = model(x, pos, batch).float()
    model.train()
    p = data.pos.float().cpu().numpy()
    true = (y * norm.phys_std + norm.phys_mean)[:, 0].cpu().numpy()
    est = norm.physical(pred)[:, 0].cpu().numpy()
    three_d = p.shape[1] == 3
    fig = plt.figure(figsize=(15, 4.6))
    lo, hi = float(np.percentile(true, 1)), float(np.percentile(true, 99))
    err = np.abs(est - true)
    panels = [("true", true, "viridis", (lo, hi)), ("predicted", est, "viridis", (lo, hi)),
              ("|error|", err, "magma", (0.0, float(np.percentile(err, 99)) or 1.0))]
    for i, (name, val, cmap, (vmin, vmax)) in enumerate(panels):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d" if three_d else None)
        coords = (p[:, 0], p[:, 1], p[:, 2]) if three_d else (p[:, 0], p[:, 1])
        sc = ax.scatter(*coords, c=val, cmap=cmap, vmin=vmin, vmax=vmax, s=3, linewidths=0)
        if three_d:
            ax.view_init(elev=20, azim=-60)
            ax.set_box_aspect(np.ptp(p, axis=0) + 1e-9)
            ax.set_axis_off()
        else:
            ax.set_aspect("equal")
        ax.set_title(name)
        fig.colorbar(sc, ax=ax, shrink=0.7).set_label(("|error|, " if name == "|error|" else "") + label)
    fig.suptitle(f"{title}: test sample 0, relative L2 "
                 f"{np.linalg.norm(est - true) / max(np.linalg.norm(true), 1e-30):.3f}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, "field.png"), dpi=110)
    plt.close(fig)


def _write_csv(path: str, rows: List[Dict]):
    if not rows:
        return
    keys = list(rows[0].keys())
    for r in rows[1:]:
        keys += [k for k in r if k not in keys]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=keys)
        w.writeheader()
        w.writerows(rows)


# --------------------------------------------------------------------------------------------
# Main loop
# --------------------------------------------------------------------------------------------
class NonFiniteLossError(FloatingPointError):
    r"""The training loss (or the parameters) became NaN/Inf; ``main`` raises it on every rank after
    writing ``OUT/nonfinite.json`` and the logs, leaving the last good checkpoint untouched."""


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    args = parse_args(argv)
    dd = Dist(args.device)
    lock = None
    try:
        if not args.prepare_data:  # one run per --out: rank 0 holds OUT/.lock, every rank learns the outcome
            err = None
            if dd.main:
                try:
                    lock = DirLock(args.out).acquire(on_stale=lambda m: print(f"[train] {m}", flush=True))
                    for p in remove_stale_temps(args.out):  # what a killed writer left behind
                        print(f"[train] removed the partial file {p} of an interrupted write", flush=True)
                except LockError as e:
                    err = f"--out: {e}"
            if dd.world > 1:
                ok = dd.all_sum(torch.tensor([0.0 if err else 1.0], device=dd.device))
                if float(ok) < dd.world and err is None:
                    err = f"--out: rank 0 could not lock {args.out}"
            if err:
                raise RunError(err)
        return _run(args, dd)
    finally:
        if lock is not None:
            lock.release()
        dd.close()


def _run(args, dd: Dist) -> Dict:
    from tqdm.auto import tqdm
    if args.threads:
        torch.set_num_threads(args.threads)
    log = (lambda s: tqdm.write(s)) if dd.main else (lambda s: None)
    if not args.prepare_data:
        os.makedirs(args.out, exist_ok=True)
    random.seed(args.seed)
    np.random.seed(args.seed)
    torch.manual_seed(args.seed)
    config = run_config(args)  # before anything below fills in defaults
    ck = None
    if args.resume and not args.prepare_data:  # before the data: a refused resume fails fast
        ck, resume_path = read_resume_checkpoint(args, log, rename_bad=dd.main)

    t0 = time.perf_counter()
    if dd.main:  # generated datasets are built (and cached) once, by rank 0
        train, test, stats = load_splits(args)
    dd.barrier()
    if not dd.main:
        train, test, stats = load_splits(args)
    if args.local_geometry and not args.prepare_data:
        train, test = with_local_geometry(train, args.local_geometry), with_local_geometry(test, args.local_geometry)
    data_s = time.perf_counter() - t0
    if len(train) == 0 or len(test) == 0:
        raise ValueError(f"dataset {args.dataset!r} has {len(train)} training and {len(test)} test samples")
    if args.prepare_data:
        pts = [train[i].pos.size(0) for i in range(len(train))]
        log(f"[train] --prepare-data: {args.dataset}, {len(train)} train / {len(test)} test clouds, "
            f"{np.mean(pts):.0f} points per cloud, ready in {data_s:.1f}s")
        return {"dataset": args.dataset, "train_clouds": len(train), "test_clouds": len(test), "data_s": data_s}
    d0 = train[0]
    dim = d0.pos.size(1)
    in_channels = d0.x.size(1) if getattr(d0, "x", None) is not None else 0
    out_channels = d0.y.view(d0.pos.size(0), -1).size(1)
    mean_points = float(np.mean([train[i].pos.size(0) for i in range(min(len(train), 64))]))
    norm = Normalizer(dim, out_channels).fit(train, stats).to(dd.device)

    device = dd.device
    backend = resolve_attention_backend(args, in_channels, out_channels, dim, device, log)
    torch.manual_seed(args.seed)  # the probe above must not change the initialisation
    model = build_model(args, in_channels, out_channels, dim, backend).to(device)
    n_params = count_parameters(model)
    gflops = model_gflops(args, int(round(mean_points)), in_channels, out_channels, dim, model)
    ddp = model
    if dd.world > 1:
        ddp = nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)

    sampler = ShardSampler(len(train), dd.rank, dd.world, shuffle=True, seed=args.seed)
    steps_per_epoch = math.ceil(sampler.per_rank / args.batch_size)
    capped = bool(args.steps or args.epochs) or not args.time_budget  # else the time budget alone ends it
    total = args.steps if args.steps else (args.epochs * steps_per_epoch if args.epochs else
                                           (200 if not args.time_budget else 2 ** 62))
    if args.eval_every is None:  # a few points on the test curve of loss.png
        args.eval_every = max(1, total // 4) if capped else 0
    # its own generator: a DataLoader iterator draws a base seed, and from the global RNG that draw
    # would differ between a straight and a resumed run (which starts an iterator mid-epoch)
    loader = DataLoader(train, batch_size=args.batch_size, sampler=sampler, generator=torch.Generator())

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    if args.compile and (device.type != "cuda" or dd.world > 1 or args.rotate or args.model not in ATTENTION_MODELS):
        raise ValueError("--compile captures the step as a CUDA graph: it needs --device cuda, one process, "
                         "an attention model (bsa/full/ball) and no --rotate")
    # on CUDA the fused AdamW: a few kernels for all parameters instead of several per parameter
    fused = dict(fused=True, capturable=args.compile) if device.type == "cuda" else {}
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, **fused)
    clock = [0.0]  # --time-budget: training seconds so far, set before each scheduler step
    lr_fn = (cosine_by_fraction(lambda: clock[0] / args.time_budget, args.warmup, args.min_lr_ratio)
             if args.time_budget else cosine_with_warmup(total, args.warmup, args.min_lr_ratio))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_fn)
    precision = args.precision if args.precision != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    amp_dtype = torch.bfloat16 if precision == "bf16" else None

    def autocast():
        return torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None)

    step, train_log, eval_log, train_time, resumed_acc = 0, [], [], 0.0, None
    ckpt_path = os.path.join(args.out, "checkpoint.pt")
    if ck is not None:
        path = resume_path
        if ck["model_name"] != args.model:
            raise ValueError(f"--resume: checkpoint is for --model {ck['model_name']}, not {args.model}")
        model.load_state_dict(ck["model"])
        norm.load_state_dict(ck["norm"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        step, train_log, eval_log, train_time = ck["step"], ck["train_log"], ck["eval_log"], ck["train_time"]
        resumed_acc = ck["loss_acc"]
        set_rng_state(ck["rng"][dd.rank % len(ck["rng"])])
        log(f"[train] resumed from {path} at step {step}")
    ckpt_step = step if ck is not None and os.path.abspath(path) == os.path.abspath(ckpt_path) else None
    ck = None  # the loaded tensors are in the model now

    def guard(mean_loss: Optional[float] = None, test: Optional[Dict[str, float]] = None):
        r"""Non-finite loss guard: raise :class:`NonFiniteLossError` if a training loss so far was
        NaN/Inf (``bad_step`` below) or, away from logging steps, if the parameters or the test
        metrics ``test`` are.

        It never synchronises on its own: at a logging step it looks only at ``mean_loss``, the
        interval's mean that the loop has just read (non-finite iff one of the interval's losses
        was); otherwise it runs next to an evaluation or before a checkpoint, which synchronise
        anyway, and reads one all-reduced pair of flags. So a bad step is caught at most
        ``--log-every`` steps late, and always before it can reach a checkpoint."""
        test_ok = test is None or all(math.isfinite(v) for v in test.values())
        if mean_loss is not None:
            if math.isfinite(mean_loss):
                return
            params_ok = None
        else:
            params_ok_t = torch.stack([torch.isfinite(p).all() for p in model.parameters()]).all()
            flags = dd.all_sum(torch.stack([(bad_step > 0).double(), (~params_ok_t).double()])).tolist()
            if flags == [0.0, 0.0] and test_ok:
                return
            params_ok = flags[1] == 0
        # failing: from here on, synchronising costs nothing
        never = 2 ** 62
        first_t = torch.where(bad_step > 0, bad_step, torch.full_like(bad_step, never))
        if dd.world > 1:
            dist.all_reduce(first_t, op=dist.ReduceOp.MIN)
        first = int(first_t) if int(first_t) != never else None
        if first is not None:
            what = f"the training loss became non-finite (NaN/Inf) at step {first} of {total}"
            lr_at = sched.base_lrs[0] * lr_fn(first - 1)
        else:
            what = (f"the parameters became non-finite by step {step} of {total}" if not params_ok else
                    f"the test metrics became non-finite at step {step} of {total} (the model's outputs overflow)")
            what += " while every training loss up to it was finite"
            lr_at = sched.base_lrs[0] * lr_fn(step - 1)
        hint = ("enable --grad-clip (it is 0: off; e.g. --grad-clip 1)" if args.grad_clip == 0
                else f"lower --grad-clip (now {args.grad_clip:g})")
        if precision == "bf16":
            hint += " or try --precision fp32"
        debug_path = os.path.join(args.out, "nonfinite.json")
        kept = (f"the last finite checkpoint ({ckpt_path}, step {ckpt_step}) is left as it was"
                if ckpt_step is not None else "no checkpoint was written")
        msg = (f"{what}: lower --lr (now {args.lr:g}; {lr_at:.3g} at that step) or {hint}; {kept}; "
               f"details in {debug_path}")
        bar.close()
        if dd.main:
            batches = None
            if first is not None:  # the clouds each rank trained on at that step (the order is seeded)
                epoch, b = divmod(first - 1, steps_per_epoch)
                batches = {}
                for r in range(dd.world):
                    s = ShardSampler(len(train), r, dd.world, shuffle=True, seed=args.seed)
                    s.set_epoch(epoch)
                    batches[r] = list(s)[b * args.batch_size:(b + 1) * args.batch_size]
            with open(debug_path, "w") as f:
                json.dump({"error": msg, "step": first, "detected_at_step": step, "planned_steps": total,
                           "lr_at_step": lr_at, "interval_mean_loss": None if mean_loss is None else str(mean_loss),
                           "parameters_finite": params_ok,
                           "test_metrics": test and {k: str(v) for k, v in test.items()},
                           "last_checkpoint_step": ckpt_step, "train_indices_per_rank": batches,
                           "train_log": train_log, "eval_log": eval_log, "args": vars(args)}, f, indent=1)
            _write_csv(os.path.join(args.out, "train_log.csv"), train_log)
            _write_csv(os.path.join(args.out, "eval_log.csv"), eval_log)
        raise NonFiniteLossError(msg)

    def checkpoint():
        nonlocal ckpt_step
        guard()  # a non-finite state never overwrites the last good checkpoint
        states = [None] * dd.world
        if dd.world > 1:
            dist.all_gather_object(states, rng_state())
        else:
            states = [rng_state()]
        if dd.main:
            save_checkpoint(ckpt_path, {
                "model": model.state_dict(), "norm": norm.state_dict(), "optimizer": opt.state_dict(),
                "scheduler": sched.state_dict(), "step": step, "rng": states, "train_log": train_log,
                "eval_log": eval_log, "train_time": train_time, "model_name": args.model, "args": vars(args),
                "config": config,
                "loss_acc": loss_acc.cpu()},
                keep_previous=ckpt_step != step)  # a second save at one step keeps the older fallback
        ckpt_step = step

    start_step = step
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    plan = f"{total} steps" if not args.time_budget else \
        f"{args.time_budget:g} s" + (f" (at most {total} steps)" if capped else "")
    log(f"[train] {args.model}: {n_params:,} parameters, {gflops:.3f} GFLOPs/cloud at {mean_points:.0f} points; "
        f"{len(train)} train / {len(test)} test clouds; {plan} on {device} x{dd.world} "
        f"({precision}{', backend=' + backend if backend else ''}); data ready in {data_s:.1f}s")
    if args.time_budget:  # the bar counts training seconds
        bar = tqdm(total=args.time_budget, initial=min(train_time, args.time_budget), unit="s", desc=args.model,
                   disable=not dd.main or args.no_progress, dynamic_ncols=True,
                   bar_format="{l_bar}{bar}| {n:.0f}/{total:.0f} s [{elapsed}<{remaining}{postfix}]")
    else:
        bar = tqdm(total=total, initial=step, disable=not dd.main or args.no_progress, dynamic_ncols=True,
                   desc=args.model)
    model.train()
    loss_acc = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, count since last log
    if resumed_acc is not None:
        loss_acc.copy_(resumed_acc)
    # first step whose loss was NaN/Inf (0: none yet), updated on the device: no host sync per step
    bad_step = torch.zeros((), dtype=torch.long, device=device)
    graphed = None
    if args.compile:
        from torch_geometric_bsa.capture import GraphedStep
        graphed = GraphedStep(model, opt, lambda pred, target: F.mse_loss(pred.float(), target),
                              autocast_dtype=amp_dtype, clip_grad_norm=args.grad_clip or None)
    pts_acc, t_log, stopped_early = 0, time.perf_counter(), False
    ema = None
    while step < total and not stopped_early:
        sampler.set_epoch(step // steps_per_epoch, (step % steps_per_epoch) * args.batch_size)
        for data in loader:
            t_step = time.perf_counter()
            x, pos, batch, y = _to_input(data, norm, device)
            if graphed is not None:  # the ball tree is built inside the graph
                loss = graphed(x, pos, batch, target=norm.target(y))
            else:
                with autocast():
                    pred = ddp(x, pos, batch)
                loss = F.mse_loss(pred.float(), norm.target(y))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                if args.grad_clip > 0:
                    nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
                opt.step()
            if args.time_budget:  # the schedule's clock; a spent budget makes this step the run's last
                clock[0] = train_time + time.perf_counter() - t_step
                if clock[0] >= args.time_budget:
                    total = step + 1  # logged, evaluated and checkpointed as the last step
            sched.step()
            step += 1
            loss_acc += torch.stack([loss.detach().double(), torch.ones((), dtype=torch.float64, device=device)])
            bad_step = torch.where((bad_step == 0) & ~torch.isfinite(loss.detach()), step, bad_step)
            pts_acc += pos.size(0)
            if step % args.log_every == 0 or step == total:
                dd.all_sum(loss_acc)
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                now = time.perf_counter()
                train_time += now - t_step  # the rest of the interval is added below
                mean_loss = float(loss_acc[0] / loss_acc[1])
                guard(mean_loss)  # reuses this read: no extra synchronisation
                pts_s = pts_acc * dd.world / max(now - t_log, 1e-9)
                ema = mean_loss if ema is None else 0.7 * ema + 0.3 * mean_loss
                train_log.append({"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": mean_loss,
                                  "lr": float(sched.get_last_lr()[0]), "points_per_s": pts_s,
                                  "train_time_s": train_time})
                bar.set_postfix(loss=f"{ema:.4f}", pts_s=f"{pts_s:,.0f}", refresh=False)
                loss_acc.zero_()
                pts_acc, t_log = 0, time.perf_counter()
            else:
                train_time += time.perf_counter() - t_step
            bar.update(max(0.0, min(train_time, args.time_budget) - bar.n) if args.time_budget else 1)
            if args.eval_every and step % args.eval_every == 0 and step < total:
                m = evaluate(ddp, test, norm, args, dd, autocast)
                guard(test=m)  # evaluation has synchronised anyway
                eval_log.append({"step": step, "train_time_s": train_time, **m})
                log(f"[train] step {step}: test MSE {m['test_mse']:.5f}, rel L2 {m['test_rel_l2']:.4f}")
                t_log = time.perf_counter()
            if args.ckpt_every and step % args.ckpt_every == 0 and step < total:
                checkpoint()
                t_log = time.perf_counter()
            if args.stop_after and step - start_step >= args.stop_after and step < total:
                stopped_early = True
                log(f"[train] --stop-after {args.stop_after}: leaving at step {step}/{total}")
            if args.max_time and not stopped_early:
                if dd.world == 1:  # one clock: no tensor, no synchronisation per step
                    stopped_early = train_time >= args.max_time
                else:
                    flag = torch.tensor([float(train_time >= args.max_time)], device=device)
                    stopped_early = float(dd.all_sum(flag)) > 0
                if stopped_early:
                    log(f"[train] --max-time {args.max_time:g}s reached at step {step}/{total}")
            if step >= total or stopped_early:
                break
    bar.close()

    final = evaluate(ddp, test, norm, args, dd, autocast)
    guard(test=final)
    if not eval_log or eval_log[-1]["step"] != step:
        eval_log.append({"step": step, "train_time_s": train_time, **final})
    checkpoint()
    steps_run = train_log
    ms_step = 1000.0 * train_time / max(step, 1)
    if device.type == "cuda":
        peak_mb = torch.cuda.max_memory_allocated(device) / 2 ** 20
    else:
        import resource
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # KiB on Linux: process RSS
    metrics = {
        "model": args.model, "dataset": args.dataset, "steps": step, "planned_steps": total,
        "stopped_early": stopped_early, "world_size": dd.world, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "precision": precision, "backend": backend, "parameters": n_params, "gflops_per_cloud": gflops,
        "mean_points": mean_points, "train_clouds": len(train), "test_clouds": len(test),
        "train_time_s": train_time, "ms_per_step": ms_step,
        "points_per_s": (steps_run[-1]["points_per_s"] if steps_run else None),
        "peak_memory_mb": peak_mb, "peak_memory_kind": "cuda_allocated" if device.type == "cuda" else "cpu_rss",
        "final_train_loss": train_log[-1]["loss"] if train_log else None, **final,
        "seed": args.seed, "args": vars(args),
    }
    if dd.main:
        with open(os.path.join(args.out, "metrics.json"), "w") as f:
            json.dump({**metrics, "train_log": train_log, "eval_log": eval_log}, f, indent=1)
        _write_csv(os.path.join(args.out, "train_log.csv"), train_log)
        _write_csv(os.path.join(args.out, "eval_log.csv"), eval_log)
        if not args.no_plots:
            write_plots(args.out, train_log, eval_log, model, test, norm, device, autocast,
                        f"{args.model} on {args.dataset}",
                        getattr(DATASET_REGISTRY.get(args.dataset), "target_label", "target (arbitrary units)"))
        unit = "" if not stats else " (physical units)"
        print(f"[train] {args.model}: final test MSE {final['test_mse']:.5f} (normalised), "
              f"{final['test_mse_phys']:.5g}{unit or ' (data units)'}, relative L2 {final['test_rel_l2']:.4f}; "
              f"{step} steps, {ms_step:.1f} ms/step; outputs in {args.out}", flush=True)
    return metrics


if __name__ == "__main__":
    try:
        main()
    except (NonFiniteLossError, RunError, CorruptFileError, UnsafeFileError) as e:
        if int(os.environ.get("RANK", "0")) == 0:
            print(f"{os.path.basename(sys.argv[0])}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(1)
