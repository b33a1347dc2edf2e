"""The mean gate of each BSA branch in trained runs: how much of each layer's output the ball,
compression and selection branches carry on the run's test clouds.

    python examples/gate_stats.py runs/ablate/bsa/seed0 runs/ablate/slc-init-4/seed0

Each argument is a train.py ``--out`` folder (its ``checkpoint.pt``). The gates are
``sigmoid(gate logits)`` per slot and head, averaged over the valid slots of every test cloud, on
the CPU. A branch held at 0 by ``--drop-branch`` shows the gate it would have had (the layer
multiplies it by 0 afterwards).
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Dict, List, Optional, Sequence

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import train  # noqa: E402  (examples/train.py)

BRANCHES = ("ball", "cmp", "slc", "crs")


def gate_means(run: str) -> Dict[str, List[float]]:
    r"""``{layer name: [mean gate per branch]}`` of the run in folder ``run``."""
    from torch_geometric.loader import DataLoader
    from torch_geometric_bsa import BSAConv
    from torch_geometric_bsa.io import load_checked
    ck = load_checked(os.path.join(run, "checkpoint.pt"))
    if ck.get("model_name") != "bsa":
        raise ValueError(f"{run}: a run of --model {ck.get('model_name')!r}; gates exist only in --model bsa")
    args = train.parse_args(["--device", "cpu"])
    vars(args).update({k: v for k, v in ck["args"].items() if k in vars(args)})
    args.device = "cpu"
    tr, te, _ = train.load_splits(args)
    s = tr[0]
    dim = s.pos.size(1)
    cin = s.x.size(1) if getattr(s, "x", None) is not None else 0
    cout = s.y.view(s.pos.size(0), -1).size(1)
    model = train.build_model(args, cin, cout, dim, backend="cpu")
    model.load_state_dict(ck["model"])
    model.eval()
    norm = train.Normalizer(dim, cout)
    norm.load_state_dict(ck["norm"])
    sums: Dict[str, torch.Tensor] = {}
    counts: Dict[str, int] = {}

    def hook(name, heads):
        # a hook on the gate makes the layer call it as a module (its input: the features h in tree
        # order, exactly zero at padded slots, which are left out)
        def f(module, inputs, logits):
            g = torch.sigmoid(logits.float()).view(logits.size(0), heads, -1).mean(1)  # [slots, branches]
            g = g[inputs[0].abs().sum(1) > 0]
            sums[name] = sums.get(name, 0) + g.sum(0)
            counts[name] = counts.get(name, 0) + g.size(0)
        return f

    handles = [m.gate.register_forward_hook(hook(name, m.heads)) for name, m in model.named_modules()
               if isinstance(m, BSAConv) and m.branches == "all"]
    with torch.no_grad():
        for d in DataLoader(te, batch_size=1):
            x, pos, batch, _ = train._to_input(d, norm, "cpu")
            model(x, pos, batch)
    for h in handles:
        h.remove()
    return {n: (sums[n] / counts[n]).tolist() for n in sums}


def main(argv: Optional[Sequence[str]] = None) -> Dict[str, Dict[str, List[float]]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("runs", nargs="+", help="train.py --out folders")
    args = p.parse_args(argv)
    out = {}
    print("| run | layers | mean gate: " + " / ".join(BRANCHES[:3]) + " | selection gate per layer |")
    print("|---|---|---|---|")
    for run in args.runs:
        g = gate_means(run)
        out[run] = g
        mean = torch.tensor(list(g.values())).mean(0).tolist()
        print(f"| {run} | {len(g)} | " + " / ".join(f"{v:.3f}" for v in mean[:3])
              + " | " + ", ".join(f"{v[2]:.3f}" for v in g.values()) + " |")
    return out


if __name__ == "__main__":
    main()
