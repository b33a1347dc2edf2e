"""How much the query groups of one ball agree on the blocks they select (CPU or GPU).

The selection kernels gather each group's ``top-k x slc_block`` keys on their own. If the groups of a
ball pick mostly the same blocks, a kernel that loads a ball's distinct blocks once (each row masked
to its own group's picks) reads far fewer bytes. This measures that agreement on a trained
``examples/train.py`` checkpoint: for every layer and ball, the distinct selected blocks over the
ball's selected entries (1.0: no two groups share a block; 1 / groups: all groups agree), and the
share of entries inside the ball's own blocks. Also, per layer, the same share over tiles of
``--tile-groups`` groups (what the selection kernels' union walk loads), and its mirror for the dK/dV
pass: over tiles of that many consecutive blocks, the distinct groups among the (group, block)
pairs that land in them. Runs the model with the reference backend
(``backend="torch"``), whose selection is the kernels' (tests pin them to each other).

    python benchmarks/selection_overlap.py --checkpoint runs/bsa/checkpoint.pt --clouds 8 [--untrained]

Writes selection_overlap.json to $OUT (or bench_out).
"""
from __future__ import annotations

import argparse
import collections
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", required=True, help="an examples/train.py checkpoint of a BSA model")
    ap.add_argument("--clouds", type=int, default=8, help="test clouds to run")
    ap.add_argument("--untrained", action="store_true", help="the same model at its initialisation instead")
    ap.add_argument("--tile-groups", type=int, default=8,
                    help="also the distinct share over tiles of this many groups (the union walk's GT)")
    args = ap.parse_args()
    import train as T
    import torch_geometric_bsa.compose as C
    import torch_geometric_bsa.reference as REF
    from common import env_info, format_table, out_dir, write_json
    from torch_geometric.loader import DataLoader
    from torch_geometric_bsa.io import load_checked

    ck = load_checked(args.checkpoint)
    targs = T.parse_args([])
    vars(targs).update(ck["args"])
    if targs.model != "bsa":
        raise SystemExit(f"{args.checkpoint}: a {targs.model!r} model, not bsa")
    train, test, stats = T.load_splits(targs)
    if getattr(targs, "local_geometry", 0):  # the inputs the checkpoint was trained on
        test = T.with_local_geometry(list(test)[:args.clouds], targs.local_geometry)
    sample = test[0]
    in_channels = sample.x.size(-1) if getattr(sample, "x", None) is not None else 0
    model = T.build_model(targs, in_channels, sample.y.view(sample.pos.size(0), -1).size(-1), sample.pos.size(-1),
                          backend="torch")
    if not args.untrained:
        model.load_state_dict(ck["model"])
    model.eval()
    norm = T.Normalizer(sample.pos.size(-1), sample.y.view(sample.pos.size(0), -1).size(-1))
    norm.load_state_dict(ck["norm"])

    seen = []
    compose = C.compose

    def spy(*a, **kw):  # the reference's selection: idx [B, G_max, k] local block ids, idx_valid
        out, found = compose(*a, **dict(kw, return_branches=True))
        seen.append((found["idx"], found["idx_valid"]))
        return out
    REF.compose = spy
    m, g, ls = targs.ball_size, targs.group_size, targs.slc_block
    gpb, bpb = m // g, m // ls  # groups and selection blocks a ball
    agree, own, tile, kv = (collections.defaultdict(list) for _ in range(4))
    tg = min(args.tile_groups, gpb)
    with torch.no_grad():
        for data in DataLoader(list(test)[:args.clouds], batch_size=4):
            x, pos, batch, _ = T._to_input(data, norm, torch.device("cpu"))
            seen.clear()
            model(x, pos, batch)
            for layer, (idx, valid) in enumerate(seen):
                for b in range(idx.size(0)):
                    for j in range(idx.size(1) // gpb):
                        sel = idx[b, j * gpb:(j + 1) * gpb][valid[b, j * gpb:(j + 1) * gpb]]
                        if sel.numel():
                            agree[layer].append(sel.unique().numel() / sel.numel())
                            own[layer].append(((sel >= j * bpb) & (sel < (j + 1) * bpb)).float().mean().item())
                    for j in range(idx.size(1) // tg):  # the selection kernel's union walk: tiles of tg groups
                        sel = idx[b, j * tg:(j + 1) * tg][valid[b, j * tg:(j + 1) * tg]]
                        if sel.numel():
                            tile[layer].append(sel.unique().numel() / sel.numel())
                    # the dK/dV side: tiles of tg consecutive blocks, the distinct groups among the
                    # (group, block) pairs that land in them (what a block-tile program would load)
                    grp = torch.arange(idx.size(1)).unsqueeze(1).expand_as(idx[b])[valid[b]]
                    blk = idx[b][valid[b]]
                    for t in blk.div(tg, rounding_mode="floor").unique():
                        pairs = grp[blk.div(tg, rounding_mode="floor") == t]
                        kv[layer].append(pairs.unique().numel() / pairs.numel())
    REF.compose = compose
    rows = []
    for layer in sorted(agree):
        a = torch.tensor(agree[layer])
        rows.append(dict(layer=layer, balls=len(a), distinct_over_entries=round(a.mean().item(), 3),
                         median=round(a.median().item(), 3), min=round(a.min().item(), 3),
                         max=round(a.max().item(), 3), own_ball_share=round(sum(own[layer]) / len(own[layer]), 3),
                         **{f"distinct_{tg}_groups": round(sum(tile[layer]) / len(tile[layer]), 3),
                            f"distinct_groups_{tg}_blocks": round(sum(kv[layer]) / len(kv[layer]), 3)}))
    print(format_table(rows, list(rows[0])))
    print(f"groups a ball {gpb}, top-k {targs.topk}, blocks of {ls}: all groups agreeing would read {1 / gpb:.3f}")
    write_json(os.path.join(out_dir(), "selection_overlap.json"),
               dict(env=env_info(), args=vars(args), model=dict(ball_size=m, group_size=g, slc_block=ls, topk=targs.topk,
                                                                 layers=targs.layers, hidden=targs.hidden),
                    trained_steps=None if args.untrained else ck.get("step"), rows=rows))


if __name__ == "__main__":
    main()
