"""A GPS model with a local message-passing conv (GINE or PointTransformerConv) and BSA as the global attention.

    python examples/gps.py                         # GINEConv locally, 11 s on 2 CPU cores
    python examples/gps.py --local point_transformer   # 26 s

The task needs both halves: each point of a random cloud predicts (a) the mean of its neighbours'
feature (local, what the kNN conv sees) and (b) its distance to the cloud's centroid, scaled by the
cloud's mean feature (global, what a kNN conv of a few layers cannot see but attention can). The
script prints the test MSE of the GPS model and of the same model with the local conv only.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
from torch import nn

if __package__ in (None, ""):  # `python examples/gps.py` from a checkout without `pip install`
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from torch_geometric.data import Batch, Data  # noqa: E402
from torch_geometric.nn import GINEConv, PointTransformerConv  # noqa: E402
from torch_geometric.utils import scatter  # noqa: E402

from torch_geometric_bsa import BSAConfig, BSAGPSConv, build_ball_tree  # noqa: E402
from torch_geometric_bsa.nn import knn_graph  # noqa: E402


def make_cloud(n: int, g: torch.Generator) -> Data:
    pos = torch.rand(n, 3, generator=g) * torch.rand(1, 3, generator=g).add(0.5)
    f = torch.randn(n, 1, generator=g) + torch.randn(1, 1, generator=g)
    return Data(x=f, pos=pos)


def targets(batch: Batch, edge_index: torch.Tensor) -> torch.Tensor:
    src, dst = edge_index
    local = scatter(batch.x[src], dst, 0, dim_size=batch.num_nodes, reduce="mean")
    centroid = scatter(batch.pos, batch.batch, 0, reduce="mean")[batch.batch]
    mean_f = scatter(batch.x, batch.batch, 0, reduce="mean")[batch.batch]
    return torch.cat([local, (batch.pos - centroid).norm(dim=1, keepdim=True) * mean_f], 1)


class GPS(nn.Module):
    def __init__(self, channels: int, layers: int, local: str, use_attention: bool, cfg: BSAConfig):
        super().__init__()
        self.local, self.cfg = local, cfg
        self.embed = nn.Linear(1 + 3, channels)
        self.layers = nn.ModuleList()
        for _ in range(layers):
            if local == "gine":
                mlp = nn.Sequential(nn.Linear(channels, channels), nn.ReLU(), nn.Linear(channels, channels))
                conv = GINEConv(mlp, edge_dim=4)
            else:
                conv = PointTransformerConv(channels, channels)
            if use_attention:
                self.layers.append(BSAGPSConv(channels, conv, heads=4, config=cfg, norm="layer_norm"))
            else:
                self.layers.append(conv)
        self.head = nn.Linear(channels, 2)

    def forward(self, data: Batch, edge_index: torch.Tensor) -> torch.Tensor:
        x, pos, batch = data.x, data.pos, data.batch
        edge_attr = torch.cat([pos[edge_index[0]] - pos[edge_index[1]],
                               (pos[edge_index[0]] - pos[edge_index[1]]).norm(dim=1, keepdim=True)], 1)
        kw = {"edge_attr": edge_attr} if self.local == "gine" else {}
        tree = build_ball_tree(pos, batch, self.cfg.ball_size)  # once per batch, shared by the layers
        h = self.embed(torch.cat([x, pos], 1))
        for layer in self.layers:
            if isinstance(layer, BSAGPSConv):
                h = layer(h, pos, edge_index, batch, tree=tree, **kw)
            elif self.local == "gine":
                h = h + torch.relu(layer(h, edge_index, **kw))
            else:
                h = h + torch.relu(layer(h, pos, edge_index))
        return self.head(h)


def run(args, use_attention: bool, train, test) -> float:
    torch.manual_seed(args.seed)
    cfg = BSAConfig(ball_size=64, cmp_block=8, slc_block=8, topk=2, group_size=8)
    model = GPS(args.hidden, args.layers, args.local, use_attention, cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for _ in range(args.epochs):
        model.train()
        for data, ei, y in train:
            opt.zero_grad()
            torch.nn.functional.mse_loss(model(data, ei), y).backward()
            opt.step()
    model.eval()
    with torch.no_grad():
        return sum(float(torch.nn.functional.mse_loss(model(d, ei), y)) for d, ei, y in test) / len(test)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--local", default="gine", choices=("gine", "point_transformer"))
    p.add_argument("--points", type=int, default=400, help="points per cloud")
    p.add_argument("--clouds", type=int, default=48, help="training clouds (a quarter more for testing)")
    p.add_argument("--epochs", type=int, default=12)
    p.add_argument("--hidden", type=int, default=32)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--knn", type=int, default=8)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.points < 2 or args.clouds < 4:
        p.error("--points must be >= 2 and --clouds >= 4")

    g = torch.Generator().manual_seed(args.seed)
    clouds = [make_cloud(args.points, g) for _ in range(args.clouds + args.clouds // 4)]

    def batches(items, size=8):
        out = []
        for i in range(0, len(items), size):
            data = Batch.from_data_list(items[i:i + size])
            ei = knn_graph(data.pos, args.knn, data.batch)
            out.append((data, ei, targets(data, ei)))
        return out

    train, test = batches(clouds[:args.clouds]), batches(clouds[args.clouds:])
    gps = run(args, True, train, test)
    local_only = run(args, False, train, test)
    var = float(torch.cat([y for _, _, y in test]).var(0).mean())
    print(f"[gps] local={args.local}: test MSE {gps:.4f} with BSA global attention, {local_only:.4f} with the "
          f"local conv only (target variance {var:.4f})")
    return {"gps": gps, "local_only": local_only, "variance": var}


if __name__ == "__main__":
    main()
