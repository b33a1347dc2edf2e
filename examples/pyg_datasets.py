"""Train a BSA transformer on PyG's own datasets: ModelNet (classification) and ShapeNet (part segmentation).

    python examples/pyg_datasets.py modelnet --root data/ModelNet10            # needs raw/<class>/{train,test}/*.off
    python examples/pyg_datasets.py shapenet --root data/ShapeNet --category Airplane
    python examples/pyg_datasets.py modelnet --root data/ModelNet10 --download  # let PyG fetch it (~450 MB)

The datasets load through `torch_geometric.datasets.ModelNet` / `ShapeNet` with the transforms those
datasets usually take (NormalizeScale once, then SamplePoints / FixedPoints and a small jitter per
epoch). Without `--download` the script never goes online: it checks the raw layout PyG expects
and says what is missing. ModelNet uses `BSATransformer(..., pool="mean")`, one output per shape;
ShapeNet predicts one of the 50 part labels per point and reports the instance mean IoU over each
shape's category parts. The defaults (1,024 / 2,048 points, width 64, 4 layers) are meant for a GPU
(`--device cuda`); on a CPU use fewer points, layers and epochs.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python examples/pyg_datasets.py` from a checkout without `pip install`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch_geometric.transforms as T  # noqa: E402
from torch_geometric.datasets import ModelNet, ShapeNet  # noqa: E402
from torch_geometric.loader import DataLoader  # noqa: E402

from torch_geometric_bsa import BSAConfig, BSATransformer  # noqa: E402


def missing_raw(cls, root: str, **kwargs) -> list:
    r"""Raw files/folders the PyG dataset ``cls`` expects under ``root/raw`` that are not there (PyG
    would download them)."""
    names = cls.raw_file_names.fget(argparse.Namespace(**kwargs))
    return [n for n in names if not os.path.exists(os.path.join(root, "raw", n))]


def load(args):
    r"""``(train, test, out_channels)``."""
    if args.task == "modelnet":
        missing = missing_raw(ModelNet, args.root)
        kwargs = dict(name=args.modelnet)
        pre, tf = T.NormalizeScale(), T.SamplePoints(args.points)
        if missing and not args.download:
            raise SystemExit(f"ModelNet raw files missing under {args.root}/raw: {missing} (layout "
                             "raw/<class>/{train,test}/<class>_NNNN.off); pass --download to let PyG fetch them")
        train = ModelNet(args.root, train=True, pre_transform=pre, transform=tf, **kwargs)
        test = ModelNet(args.root, train=False, pre_transform=pre, transform=tf, **kwargs)
        return train, test, train.num_classes
    cats = [args.category] if args.category else None
    # PyG checks for every category folder (not only the chosen ones) before it would download
    missing = missing_raw(ShapeNet, args.root, category_ids=ShapeNet.category_ids)
    if missing and not args.download:
        raise SystemExit(f"ShapeNet raw files missing under {args.root}/raw: {missing} (the "
                         "shapenetcore_partanno_segmentation_benchmark_v0_normal layout); pass --download to let "
                         "PyG fetch it")
    pre = T.NormalizeScale()
    kw = dict(categories=cats, include_normals=True, pre_transform=pre)
    train = ShapeNet(args.root, split="trainval", transform=T.Compose([T.FixedPoints(args.points),
                                                                      T.RandomJitter(0.01)]), **kw)
    test = ShapeNet(args.root, split="test", transform=T.FixedPoints(args.points), **kw)
    return train, test, sum(len(v) for v in ShapeNet.seg_classes.values())  # 50 part labels


def shape_ious(pred: torch.Tensor, y: torch.Tensor, batch: torch.Tensor, category: torch.Tensor,
               parts: list) -> list:
    r"""Per-shape mean IoU over the parts of the shape's category (a part absent from both the
    prediction and the label counts as IoU 1, the usual ShapeNet convention)."""
    out = []
    for b in range(int(batch.max()) + 1):
        sel = batch == b
        p, t = pred[sel], y[sel]
        ious = []
        for part in parts[int(category[b])]:
            inter, union = int(((p == part) & (t == part)).sum()), int(((p == part) | (t == part)).sum())
            ious.append(1.0 if union == 0 else inter / union)
        out.append(sum(ious) / len(ious))
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("task", choices=("modelnet", "shapenet"))
    p.add_argument("--root", required=True, help="dataset folder (holding raw/)")
    p.add_argument("--download", action="store_true", help="let PyG download missing raw files")
    p.add_argument("--modelnet", default="10", choices=("10", "40"))
    p.add_argument("--category", default=None, choices=sorted(ShapeNet.category_ids),
                   help="ShapeNet category (default: all)")
    p.add_argument("--points", type=int, default=None, help="points per shape (1024 ModelNet, 2048 ShapeNet)")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--ball-size", type=int, default=128)
    p.add_argument("--topk", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.points is None:
        args.points = 1024 if args.task == "modelnet" else 2048
    for name in ("points", "epochs", "batch_size", "hidden", "layers", "heads", "ball_size", "topk"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be positive")
    torch.manual_seed(args.seed)
    device = torch.device(args.device)

    train, test, out_channels = load(args)
    cfg = BSAConfig(ball_size=args.ball_size, cmp_block=8, slc_block=8, topk=args.topk, group_size=8,
                    group_compression=True)
    classify = args.task == "modelnet"
    # ModelNet: positions only (in_channels 0), one output per shape; ShapeNet: normals as features
    model = BSATransformer(0 if classify else 3, out_channels, hidden_channels=args.hidden,
                           num_layers=args.layers, heads=args.heads, config=cfg,
                           pool="mean" if classify else None).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=args.epochs)
    train_loader = DataLoader(train, batch_size=args.batch_size, shuffle=True)
    test_loader = DataLoader(test, batch_size=args.batch_size)
    cat_ids = list(train.categories) if not classify else None
    print(f"[pyg_datasets] {args.task}: {len(train)} train / {len(test)} test shapes, {out_channels} classes, "
          f"{args.points} points, device {device}")
    t0 = time.time()
    for epoch in range(1, args.epochs + 1):
        model.train()
        total, n = 0.0, 0
        for data in train_loader:
            data = data.to(device)
            opt.zero_grad()
            loss = F.cross_entropy(model(data), data.y)
            loss.backward()
            opt.step()
            total, n = total + float(loss.detach()) * data.num_graphs, n + data.num_graphs
        sched.step()
        print(f"epoch {epoch:3d}  train loss {total / n:.4f}  ({time.time() - t0:.0f} s)")

    model.eval()
    correct, seen, ious = 0, 0, []
    with torch.no_grad():
        for data in test_loader:
            data = data.to(device)
            logits = model(data)
            if classify:
                correct += int((logits.argmax(1) == data.y).sum())
                seen += data.num_graphs
            else:
                # predict among the parts of each shape's category only (the usual evaluation)
                allowed = torch.zeros(len(cat_ids), out_channels, dtype=torch.bool, device=device)
                for i, name in enumerate(cat_ids):
                    allowed[i, ShapeNet.seg_classes[name]] = True
                cat = data.category.view(-1)
                pred = logits.masked_fill(~allowed[cat[data.batch]], float("-inf")).argmax(1)
                correct += int((pred == data.y).sum())
                seen += data.num_nodes
                ious += shape_ious(pred, data.y, data.batch, cat,
                                   [ShapeNet.seg_classes[name] for name in cat_ids])
    result = {"accuracy": correct / seen}
    if not classify:
        result["instance_miou"] = sum(ious) / len(ious)
    print(f"[pyg_datasets] {args.task} test: " + ", ".join(f"{k} {v:.4f}" for k, v in result.items()))
    return result


if __name__ == "__main__":
    main()
