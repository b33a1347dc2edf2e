"""How much of MultiBodyFlow's interaction term a model can read from a point's absolute position.

The long-range part of the target, ``Cp - cp_isolated`` (what the other bodies add to a body's
pressure), cannot be seen from any neighbourhood on the body itself: no 16-nearest neighbour lies on
another body (docs/datasets.md). A model that also embeds *absolute* positions (our ``gnn`` and
``ptconv`` baselines, and the attention models) may still guess it: the group's centre is placed
within +-``offset`` metres, so where a body stands says where the others probably are.

This script measures that cue without any graph: a per-point MLP regresses the interaction term
(in the study's normalised units, ``/ y_std``) from three input sets, each with the point's unit
normal:

* ``local``: the position relative to the point's own body centre (everything an isolated body
  shows; no layout);
* ``absolute``: the absolute position, scaled as ``train.py`` scales it (training-set statistics);
* ``both``: the two together;
* ``layout`` (an oracle): ``local`` plus where the other bodies' centres are, seen from the point's
  own body: what a model with global reach could learn to use.

The interaction's variance (about 0.11) is the error of a predictor that knows every body's isolated
pressure exactly. What ``local`` explains of it a local model can learn (the layout-averaged
interaction at each place on a body); if ``absolute`` or ``both`` go below ``local``, absolute
position carries the layout; what ``layout`` explains beyond ``local`` needs global reach. ``--offset`` regenerates the data with another group offset (a
translation leaves potential flow unchanged, so only the cue changes).

    python examples/multibody_position_cue.py --num-train 128 --num-test 32 --epochs 20 \
        --json docs/bench/multibody_position_cue.json
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "benchmarks"))
from common import env_info  # noqa: E402
from torch_geometric_bsa.datasets import MultiBodyFlow  # noqa: E402


def features(data, pos_center, pos_scale, max_others: int = 2):
    r"""``{name: [N, F]}`` per input set and the target ``[N]`` (interaction / y_std) of one cloud;
    ``max_others``: the other bodies the layout oracle describes (a group's bodies less one)."""
    body = data.body.long()
    nb = int(body.max()) + 1
    cen = torch.zeros(nb, 3).index_add_(0, body, data.pos) / torch.bincount(body, minlength=nb).clamp_min(1)[:, None]
    local = (data.pos - cen[body]) / pos_scale
    absolute = (data.pos - pos_center) / pos_scale
    cp = data.y.view(-1) * data.y_std + data.y_mean
    target = (cp - data.cp_isolated.view(-1)) / data.y_std
    n = data.x
    # the layout oracle: where the other bodies' centres are, seen from this body's centre (nearest
    # first, zero rows and a 0 flag where a group has fewer bodies), as a model with global reach could
    rel = (cen[None, :, :] - cen[:, None, :]) / pos_scale  # [own body, other body, 3]
    dist = rel.norm(dim=-1) + torch.eye(nb) * 1e9  # own body last
    order = dist.argsort(1)[:, :-1]
    others = torch.gather(rel, 1, order[..., None].expand(-1, -1, 3))  # [nb, nb - 1, 3]
    slots = torch.zeros(nb, max_others, 4)
    k = min(nb - 1, max_others)
    slots[:, :k, :3], slots[:, :k, 3] = others[:, :k], 1.0
    layout = slots.view(nb, -1)[body]
    return dict(local=torch.cat([n, local], 1), absolute=torch.cat([n, absolute], 1),
                both=torch.cat([n, local, absolute], 1), layout=torch.cat([n, local, layout], 1)), target


def fit(x_tr, y_tr, x_te, y_te, epochs: int, seed: int, hidden: int = 128) -> float:
    r"""Test MSE of a per-point MLP (3 hidden layers, AdamW, cosine schedule) trained on the rows."""
    g = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    mu, sd = x_tr.mean(0), x_tr.std(0).clamp_min(1e-6)
    x_tr, x_te = (x_tr - mu) / sd, (x_te - mu) / sd
    net = torch.nn.Sequential(torch.nn.Linear(x_tr.size(1), hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.GELU(),
                              torch.nn.Linear(hidden, hidden), torch.nn.GELU(), torch.nn.Linear(hidden, 1))
    bs = 4096
    steps = epochs * ((x_tr.size(0) + bs - 1) // bs)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=steps, pct_start=0.05)
    for _ in range(epochs):
        perm = torch.randperm(x_tr.size(0), generator=g)
        for i in range(0, x_tr.size(0), bs):
            b = perm[i:i + bs]
            loss = (net(x_tr[b]).view(-1) - y_tr[b]).square().mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        return float((net(x_te).view(-1) - y_te).square().mean())


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default="data")
    ap.add_argument("--num-train", type=int, default=128)
    ap.add_argument("--num-test", type=int, default=32)
    ap.add_argument("--num-points", type=int, default=3586)
    ap.add_argument("--offset", type=float, default=5.0, help="half-width of the square of group centres (m)")
    ap.add_argument("--gap", type=float, nargs=2, default=(0.5, 4.0), help="clearance range between bodies (m)")
    ap.add_argument("--num-bodies", type=int, nargs=2, default=(2, 3), help="bodies per group (min, max)")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    ap.add_argument("--hidden", type=int, default=128, help="width of the MLP's three hidden layers")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kw = dict(num_train=args.num_train, num_test=args.num_test, num_points=args.num_points, offset=args.offset,
              gap=tuple(args.gap), num_bodies=tuple(args.num_bodies))
    t0 = time.time()
    train = MultiBodyFlow(args.root, "train", **kw)
    test = MultiBodyFlow(args.root, "test", **kw)
    print(f"data: {len(train)} train / {len(test)} test clouds of {args.num_points} points, offset "
          f"{args.offset} m, gap {args.gap} m, {args.num_bodies} bodies ({time.time() - t0:.0f} s)", flush=True)
    pos = torch.cat([d.pos for d in train])
    pos_center = pos.mean(0)
    pos_scale = (pos - pos_center).square().sum(-1).mean().sqrt()
    sets = {}
    for split, ds in (("train", train), ("test", test)):
        rows = [features(d, pos_center, pos_scale, args.num_bodies[1] - 1) for d in ds]
        sets[split] = ({k: torch.cat([r[0][k] for r in rows]) for k in rows[0][0]}, torch.cat([r[1] for r in rows]))
    y_tr, y_te = sets["train"][1], sets["test"][1]
    result = dict(env=env_info(), args=vars(args), interaction_var_test=float(y_te.var()), mse={})
    print(f"interaction term / y_std: test variance {result['interaction_var_test']:.4f} "
          "(the error of an exact isolated-body predictor)", flush=True)
    for name in ("local", "absolute", "both", "layout"):
        scores = [fit(sets["train"][0][name], y_tr, sets["test"][0][name], y_te, args.epochs, s, args.hidden) for s in args.seeds]
        result["mse"][name] = scores
        mean = sum(scores) / len(scores)
        print(f"{name:>9}: test MSE {mean:.4f} ({', '.join(f'{s:.4f}' for s in scores)}), "
              f"{mean / result['interaction_var_test']:.0%} of the variance", flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
