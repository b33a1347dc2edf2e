"""Accuracy baselines for the BSA comparison (DESIGN §4): PointNet, a kNN-graph GNN (EdgeConv) and
PyG's ``PointTransformerConv`` stacked on the same kNN graph (attention over neighbours).

All three take the same ``(x, pos, batch)`` (or a ``Data``/``Batch``) as ``BSATransformer`` and
predict per-point targets, so one training script drives all models. ``knn_graph`` uses
``torch_cluster`` when it is installed (PyG's policy) and an exact pure-torch search otherwise.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import List, Optional, Tuple

import torch
from torch import Tensor, nn
from torch_geometric.nn import EdgeConv, PointTransformerConv
from torch_geometric.nn.dense.linear import Linear as PyGLinear
from torch_geometric.utils import scatter, to_dense_batch

__all__ = ["WITH_TORCH_CLUSTER", "knn_graph", "knn_graph_torch", "PointNet", "KNNGNN", "PointTransformerNet"]

try:  # probed once; the fallback below is exact, only slower
    import torch_cluster  # noqa: F401
    WITH_TORCH_CLUSTER = True
except (ImportError, OSError):  # OSError: a wheel built against another torch
    WITH_TORCH_CLUSTER = False


def _unpack(x, pos: Optional[Tensor], batch: Optional[Tensor]) -> Tuple[Optional[Tensor], Tensor, Optional[Tensor]]:
    if pos is None and hasattr(x, "pos"):  # a Data / Batch object
        return getattr(x, "x", None), x.pos, getattr(x, "batch", None)
    return x, pos, batch


def knn_graph_torch(pos: Tensor, k: int, batch: Optional[Tensor] = None, loop: bool = False,
                    max_elems: Optional[int] = None, method: str = "auto") -> Tensor:
    r"""Exact k-nearest-neighbour graph in pure PyTorch (same convention as ``torch_cluster``).

    For 2-D and 3-D positions the search is pruned by a ball tree (``build_ball_tree`` with balls
    of ``_KNN_BALL`` points): the points of a few nearby balls give every query ``q`` an upper bound
    ``r_q`` on its k-th distance; only balls whose centre lies within ``r_q + R_C`` of ``q`` (``R``:
    ball radii) are scanned, which provably holds every true neighbour, and of their points only
    those within the bound are ranked, by one integer sort (``_knn_tree``). Other dimensions use a
    dense scan (``_knn_dense``). Work is cut into chunks of at most about ``max_elems`` distances;
    distances are computed elementwise (no ``|a|^2 + |b|^2 - 2ab`` cancellation), so the neighbour
    sets match a brute-force search. Clouds with fewer than ``k`` other points keep what they have.

    ``method``: ``"tree"`` (the pruned search: the CPU's choice), ``"dense"`` (every pair of each
    cloud in large chunks: few, big kernels, the GPU's choice; a tree search there is hundreds of
    small launches and host reads per call), or ``"auto"`` (dense on CUDA, tree elsewhere).
    ``max_elems`` (distances per chunk) defaults to 2^20 for the tree search and 2^26 for the
    dense scan.

    Returns:
        ``edge_index [2, E]`` with ``edge_index[0]`` the neighbour (source) and ``edge_index[1]``
        the centre (target), i.e. ``flow="source_to_target"``, sorted by centre then neighbour.
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if method not in ("auto", "tree", "dense"):
        raise ValueError(f"method must be 'auto', 'tree' or 'dense', got {method!r}")
    if batch is None:
        batch = pos.new_zeros(pos.size(0), dtype=torch.long)
    if method == "auto":
        method = "dense" if pos.is_cuda else "tree"
    if method == "tree" and pos.size(1) in (2, 3) and pos.is_floating_point():
        src, dst = _knn_tree(pos, k, batch, loop, max_elems or 1 << 20)
    else:
        src, dst = _knn_dense(pos, k, batch, loop, max_elems or (1 << 26 if method == "dense" else 1 << 20))
    with _serial(pos.size(0) <= _KNN_SERIAL_MAX):  # sorted by centre, then neighbour: a canonical order
        order = torch.argsort(dst * pos.size(0) + src)
    return torch.stack([src.index_select(0, order), dst.index_select(0, order)])


#: up to this many points, the ball-tree build and the final edge sort run on one intra-op thread:
#: a few ms each there, while torch's parallel radix sort waits at every barrier for a descheduled
#: thread once other processes share the cores (docs/benchmarks.md). The chunks still run in parallel.
_KNN_SERIAL_MAX = 1 << 17


@contextmanager
def _serial(on: bool):
    threads = torch.get_num_threads()
    if on and threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if on and threads > 1:
            torch.set_num_threads(threads)


#: points per ball of the kNN search tree; how many balls (at least) give each query its first bound;
#: and the aligned run of consecutive balls (tree order) these are picked from, nearest centres first.
#: Small balls prune best (docs/benchmarks.md, CPU section).
_KNN_BALL, _KNN_PROBE, _KNN_WINDOW = 8, 8, 32


def _sq_dist(a: Tensor, b: Tensor) -> Tensor:
    r"""Squared distances ``[..., q]`` of points ``a [..., d]`` to point sets ``b [..., d, q]``
    (coordinates first: each coordinate's slice is contiguous), summed coordinate by coordinate. No
    ``|a|^2 + |b|^2 - 2ab`` cancellation, and one pair of points gets bit-identical values in every
    pass of ``_knn_tree`` (elementwise IEEE operations in one order)."""
    out = None
    for j in range(a.size(-1)):
        t = (b[..., j, :] - a[..., j, None]).square_()
        out = t if out is None else out.add_(t)
    return out


def _rank_order(row: Tensor, d2: Tensor) -> Tensor:
    r"""Permutation sorting entries by ``row``, then by ``d2 >= 0`` (whose IEEE bits sort like its
    values). Integer keys: torch sorts them by radix, several times faster than floats."""
    bits = d2.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[d2.element_size()])
    if d2.element_size() <= 4:
        return torch.argsort((row << 32) | bits.long())
    order = torch.argsort(bits, stable=True)  # 64-bit distances: two stable sorts
    return order.index_select(0, torch.argsort(row.index_select(0, order), stable=True))


def _knn_tree(pos: Tensor, k: int, batch: Tensor, loop: bool, max_elems: int) -> Tuple[Tensor, Tensor]:
    # Per chunk of query balls (squared distances d2 throughout, all from _sq_dist):
    # 1. bound: r2_q = q's (k+1)-th smallest d2 (k-th with loop) among the points of the n_probe balls
    #    nearest to its ball within its window, itself included: >= its true k-th (others only);
    # 2. candidate balls C of query ball B: centres within R_B + max_q r_q + R_C (R: ball radii);
    # 3. per query q, the balls C among those with |q - c_C| <= r_q + R_C, and in them every point with
    #    d2 <= r2_q: a superset of q's k nearest, with at least k points (those of step 1);
    # 4. one integer sort of these few entries by (query, d2); the first k per query are the answer.
    # There is no top-k over each query's candidate points (it was ~40% of the time).
    from ..balltree import build_ball_tree
    from ..cpu import _for_chunks
    m, d = _KNN_BALL, pos.size(1)
    sh = m.bit_length() - 1  # m is a power of two: shifts and masks instead of // and %
    with _serial(pos.size(0) <= _KNN_SERIAL_MAX):
        tree = build_ball_tree(pos, batch, m)
    nb, dev, perm = tree.num_balls, pos.device, tree.perm
    pt = tree.to_tree(pos)
    cen, rad = tree.ball_centers(pt), tree.ball_radii(pt)
    cen_t = cen.t().contiguous()                                                # [d, nb]
    cloud = tree.slot_batch.view(nb, m)[:, 0]
    slot_ok = tree.mask
    inf, nan = float("inf"), float("nan")
    pt = pt.masked_fill(~slot_ok[:, None], nan)  # padding: never <= a bound, last for topk
    pts_t = pt.view(nb, m, d).transpose(1, 2).contiguous()                      # [nb, d, m]
    n_probe = min(nb, max(_KNN_PROBE, -(-2 * (k + 1) // m)))  # about 2k points for the bound
    window = min(nb, max(_KNN_WINDOW, n_probe))
    kk = k + (not loop)
    # rounding slack of the pruning tests: relative, plus absolute for coordinates far from the origin
    tol = 64 * torch.finfo(pos.dtype).eps * cen.abs().amax()
    step = max(1, min(max_elems // (m * m * n_probe), max_elems // nb))
    threads = torch.get_num_threads()
    if threads > 1:  # a few chunks per worker thread of _for_chunks
        step = min(step, max(16, -(-nb // (4 * threads))))
    piece = max(1, max_elems // (m * m))  # (query ball, candidate ball) pairs per piece
    ar = torch.arange(m, device=dev)
    edges = []  # (neighbours, centres) per chunk

    def chunk(b0):
        qb = torch.arange(b0, min(nb, b0 + step), device=dev)
        c = qb.numel()
        own = cloud[b0:b0 + c, None]
        # 1. probe balls and the bound r2
        win = (qb // window * window).clamp_(max=nb - window)[:, None] + torch.arange(window, device=dev)
        wc = cen_t.index_select(1, win.view(-1)).view(d, c, window).transpose(0, 1)     # [c, d, W]
        wd = _sq_dist(cen[b0:b0 + c], wc).masked_fill_(cloud[win] != own, inf)          # [c, W]
        probe = win.gather(1, wd.topk(n_probe, dim=1, largest=False).indices)           # [c, P]
        pb = pts_t.index_select(0, probe.view(-1)).view(c, n_probe, d, m).transpose(1, 2)
        d1 = _sq_dist(pt.view(nb, m, d)[b0:b0 + c], pb.reshape(c, 1, d, n_probe * m))    # [c, m, P m]
        d1 = d1.view(c, m, n_probe, m).masked_fill_((cloud[probe] != own)[:, None, :, None], nan)
        d1 = d1.view(c * m, n_probe * m)
        if kk <= n_probe * m:
            r2 = d1.topk(kk, dim=1, largest=False, sorted=False).values.amax(1)
            r2 = r2.nan_to_num_(nan=inf)  # fewer than kk points of its cloud in the probe: no bound
        else:
            r2 = d1.new_full((c * m,), inf)
        r = r2.sqrt().masked_fill_(~slot_ok[b0 * m:(b0 + c) * m], 0.0)                 # [c m]
        # 2. candidate ball pairs (local query ball, global candidate ball), same cloud
        reach = ((rad[b0:b0 + c] + r.view(c, m).amax(1))[:, None] + rad[None]) * (1 + 1e-5) + tol
        bq, bc = (_sq_dist(cen[b0:b0 + c], cen_t) <= reach.square_()).nonzero().unbind(1)
        same = (cloud.index_select(0, bq + b0) == cloud.index_select(0, bc)).nonzero().view(-1)
        bq, bc = bq.index_select(0, same), bc.index_select(0, same)
        sel_q, sel_c, sel_d = [], [], []
        for p0 in range(0, bq.numel(), piece):  # host-side split: one piece at the usual sizes
            lq, cb = bq[p0:p0 + piece], bc[p0:p0 + piece]
            # 3. (query, candidate ball) pairs, then the candidate points within the bound
            e = _sq_dist(cen.index_select(0, cb), pts_t.index_select(0, lq + b0)).sqrt_()  # [p, m]
            row = (lq[:, None] * m + ar).view(-1)                                        # local query rows
            lim = (r.index_select(0, row).view_as(e) + rad.index_select(0, cb)[:, None]) * (1 + 1e-5) + tol
            t = (e <= lim).view(-1).nonzero().view(-1)                                   # padding: NaN e
            tq, tc = row.index_select(0, t), cb.index_select(0, t >> sh)
            d2 = _sq_dist(pt.index_select(0, tq + b0 * m), pts_t.index_select(0, tc))   # [t, m]
            hit = d2 <= r2.index_select(0, tq)[:, None]
            if not loop:
                hit &= (tc[:, None] * m + ar) != (tq + b0 * m)[:, None]
            f = hit.view(-1).nonzero().view(-1)
            sel_q.append(tq.index_select(0, f >> sh))
            sel_c.append(tc.index_select(0, f >> sh) * m + (f & (m - 1)))
            sel_d.append(d2.view(-1).index_select(0, f))
        # 4. rank per query by d2, keep the first k
        qs, cs, ds = torch.cat(sel_q), torch.cat(sel_c), torch.cat(sel_d)
        order = _rank_order(qs, ds)
        qs, cs = qs.index_select(0, order), cs.index_select(0, order)
        counts = torch.bincount(qs, minlength=c * m)
        rank = torch.arange(qs.numel(), device=dev) - (counts.cumsum(0) - counts).index_select(0, qs)
        keep = (rank < k).nonzero().view(-1)
        # one append of the pair: list.append is atomic, two appends from worker threads could
        # interleave and pair one chunk's neighbours with another's centres; order: final sort
        edges.append((perm.index_select(0, cs.index_select(0, keep)),
                      perm.index_select(0, qs.index_select(0, keep) + b0 * m)))

    _for_chunks(chunk, range(0, nb, step), dev)
    return torch.cat([e[0] for e in edges]), torch.cat([e[1] for e in edges])


def _knn_dense(pos: Tensor, k: int, batch: Tensor, loop: bool, max_elems: int) -> Tuple[Tensor, Tensor]:
    # every pair of each cloud, clouds laid out densely ([B, P, d]), query rows in chunks
    n = pos.size(0)
    dense, valid = to_dense_batch(pos, batch)                     # [B, P, d], [B, P]
    b, p, _ = dense.shape
    gidx = torch.full((b, p), -1, dtype=torch.long, device=pos.device)
    gidx[valid] = torch.arange(n, device=pos.device)
    kk = min(k, p)  # self is masked out below when loop=False
    chunk = max(1, max_elems // max(b * p, 1))
    rows, cols = [], []
    for start in range(0, p, chunk):  # loop over query chunks, not over clouds
        q = dense[:, start:start + chunk]                           # [B, c, d]
        d2 = None  # [B, c, P], accumulated per coordinate to avoid a [B, c, P, d] temporary
        for j in range(dense.size(-1)):
            t = (q[:, :, None, j] - dense[:, None, :, j]).square()
            d2 = t if d2 is None else d2.add_(t)
        d2 = d2.masked_fill(~valid[:, None, :], float("inf"))
        if not loop:
            c = q.size(1)
            self_idx = torch.arange(start, start + c, device=pos.device)
            d2[:, torch.arange(c, device=pos.device), self_idx] = float("inf")
        val, idx = d2.topk(kk, dim=-1, largest=False)               # [B, c, kk]
        ok = torch.isfinite(val) & valid[:, start:start + chunk, None]
        src = gidx.gather(1, idx.view(b, -1)).view_as(idx)
        dst = gidx[:, start:start + chunk, None].expand_as(idx)
        rows.append(src[ok])
        cols.append(dst[ok])
    return torch.cat(rows), torch.cat(cols)


def knn_graph(pos: Tensor, k: int, batch: Optional[Tensor] = None, loop: bool = False) -> Tensor:
    r"""kNN graph (``flow="source_to_target"``): ``torch_cluster.knn_graph`` when installed, else
    ``knn_graph_torch`` (exact)."""
    if WITH_TORCH_CLUSTER:
        return torch_cluster.knn_graph(pos, k, batch, loop=loop)
    return knn_graph_torch(pos, k, batch, loop=loop)


def _mlp(channels: List[int], last_act: bool = True) -> nn.Sequential:
    layers: List[nn.Module] = []
    for i in range(len(channels) - 1):
        layers.append(nn.Linear(channels[i], channels[i + 1]))
        if i < len(channels) - 2 or last_act:
            layers += [nn.LayerNorm(channels[i + 1]), nn.GELU()]
    return nn.Sequential(*layers)


def _linear_flops(module: nn.Module, rows: float) -> float:
    r"""FLOPs of every linear layer of ``module`` (``torch.nn`` and PyG's) applied to ``rows`` rows."""
    total = 0.0
    for m in module.modules():
        if isinstance(m, nn.Linear):
            total += 2.0 * rows * m.in_features * m.out_features
        elif isinstance(m, PyGLinear):
            total += 2.0 * rows * m.in_channels * m.out_channels
    return total


class PointNet(nn.Module):
    r"""PointNet for per-point regression (Qi et al., 2017, segmentation head).

    $$
    \mathbf{h}_i = \mathrm{MLP}_1([\mathbf{x}_i, \mathbf{p}_i]), \quad
    \mathbf{g}_c = \max_{j \in c} \mathrm{MLP}_2(\mathbf{h}_j), \quad
    \mathbf{y}_i = \mathrm{MLP}_3([\mathbf{h}_i, \mathbf{g}_{c(i)}])
    $$

    The global feature is max-pooled per cloud (``batch``), so clouds never mix.

    Args:
        in_channels (int): input features (0 for position-only). out_channels (int): targets.
        hidden_channels (int): width of the point MLPs. global_channels (int): width of the global
            feature (default ``4 * hidden_channels``). num_layers (int): layers of the point MLP.
        dim (int): coordinate dimension.

    Shapes:
        - **input:** ``x`` $(|\mathcal{V}|, F_{in})$, ``pos`` $(|\mathcal{V}|, d)$,
          ``batch`` $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, F_{out})$
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64,
                 global_channels: Optional[int] = None, num_layers: int = 3, dim: int = 3):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.in_channels, self.out_channels, self.dim = in_channels, out_channels, dim
        self.hidden_channels, self.num_layers = hidden_channels, num_layers
        self.global_channels = global_channels or 4 * hidden_channels
        self.local = _mlp([in_channels + dim] + [hidden_channels] * num_layers)
        self.glob = _mlp([hidden_channels, 2 * hidden_channels, self.global_channels])
        self.head = _mlp([hidden_channels + self.global_channels, 2 * hidden_channels, hidden_channels,
                          out_channels], last_act=False)

    def reset_parameters(self):
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x, pos: Optional[Tensor] = None, batch: Optional[Tensor] = None) -> Tensor:
        x, pos, batch = _unpack(x, pos, batch)
        if batch is None:
            batch = pos.new_zeros(pos.size(0), dtype=torch.long)
        h = self.local(pos if x is None or x.size(-1) == 0 else torch.cat([x, pos.to(x.dtype)], -1))
        g = scatter(self.glob(h), batch, dim=0, reduce="max")
        return self.head(torch.cat([h, g[batch]], dim=-1))

    def flops(self, n: int) -> float:
        r"""Forward FLOPs on one cloud of ``n`` points (linear layers; pooling is lower order)."""
        return _linear_flops(self, n)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={self.num_layers})")


def _check_graph_net(num_layers: int, k: int) -> None:
    if num_layers < 1:
        raise ValueError(f"num_layers must be >= 1, got {num_layers}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")


class KNNGNN(nn.Module):
    r"""A kNN-graph GNN: a stack of ``EdgeConv`` layers (DGCNN-style) on a
    fixed kNN graph of the positions, with residual connections.

    $$
    \mathbf{h}_i^{(l+1)} = \mathbf{h}_i^{(l)} + \max_{j \in \mathcal{N}_k(i)}
    \mathrm{MLP}([\mathbf{h}_i^{(l)}, \mathbf{h}_j^{(l)} - \mathbf{h}_i^{(l)},
    \mathbf{p}_j - \mathbf{p}_i])
    $$

    Relative positions enter every message, so the layer sees geometry, not only features. The
    graph is built once per forward with ``knn_graph`` (``torch_cluster`` or the exact
    pure-torch fallback) and never crosses clouds.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        hidden_channels (int): width of every EdgeConv layer.
        num_layers (int): EdgeConv layers.
        k (int): neighbours per point.
        dim (int): coordinate dimension.

    Shapes:
        - **input:** ``x`` $(|\mathcal{V}|, F_{in})$, ``pos`` $(|\mathcal{V}|, d)$,
          ``batch`` $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, F_{out})$
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, num_layers: int = 4,
                 k: int = 16, dim: int = 3):
        super().__init__()
        _check_graph_net(num_layers, k)
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.num_layers, self.k, self.dim = num_layers, k, dim
        self.embed = _mlp([in_channels + dim, hidden_channels, hidden_channels])
        self.convs = nn.ModuleList(
            EdgeConv(_PosMessage(hidden_channels, dim), aggr="max") for _ in range(num_layers))
        self.head = _mlp([hidden_channels, hidden_channels, out_channels], last_act=False)

    def reset_parameters(self):
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x, pos: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                edge_index: Optional[Tensor] = None) -> Tensor:
        x, pos, batch = _unpack(x, pos, batch)
        if edge_index is None:
            edge_index = knn_graph(pos.detach(), self.k, batch)
        h = self.embed(pos if x is None or x.size(-1) == 0 else torch.cat([x, pos.to(x.dtype)], -1))
        p = pos.to(h.dtype)
        for conv in self.convs:
            # EdgeConv feeds [x_i, x_j - x_i] to the MLP: carrying pos in the last `dim` columns
            # turns the second half into [h_j - h_i, p_j - p_i]
            h = h + conv(torch.cat([h, p], -1), edge_index)
        return self.head(h)

    def flops(self, n: int) -> float:
        r"""Forward FLOPs on one cloud of ``n`` points: edge MLPs on ``n * k`` edges, the node
        MLPs, and the kNN search (``3 * d`` per point pair)."""
        edge = sum(_linear_flops(c.nn, n * self.k) for c in self.convs)
        return edge + _linear_flops(self.embed, n) + _linear_flops(self.head, n) + 3.0 * self.dim * n * n

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, k={self.k})")


class _PosMessage(nn.Module):
    r"""EdgeConv's message MLP on ``[h_i | p_i, h_j - h_i | p_j - p_i]`` (drops the absolute ``p_i``)."""

    def __init__(self, channels: int, dim: int):
        super().__init__()
        self.channels, self.dim = channels, dim
        self.nn = _mlp([2 * channels + dim, channels, channels], last_act=False)

    def reset_parameters(self):
        for m in self.nn.modules():
            if hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, z: Tensor) -> Tensor:
        c, d = self.channels, self.dim
        return self.nn(torch.cat([z[:, :c], z[:, c + d:]], -1))


class PointTransformerNet(nn.Module):
    r"""PyG's ``PointTransformerConv`` (Zhao et al., 2021) stacked on a kNN graph of the positions:
    attention over each point's ``k`` neighbours, the local-attention peer PyG users know.

    $$
    \mathbf{h}_i^{(l+1)} = \mathbf{h}_i^{(l)} + \mathbf{W}_o \sum_{j \in \mathcal{N}_k(i) \cup \{i\}}
    \mathrm{softmax}_j\big(\gamma(\mathbf{W}_1 \bar{\mathbf{h}}_i - \mathbf{W}_2 \bar{\mathbf{h}}_j
    + \delta_{ij})\big) \odot (\mathbf{W}_3 \bar{\mathbf{h}}_j + \delta_{ij}),
    \quad \delta_{ij} = \theta(\mathbf{p}_i - \mathbf{p}_j)
    $$

    with $\bar{\mathbf{h}} = \mathrm{LayerNorm}(\mathbf{h})$ (pre-norm residual block), the softmax
    per channel over the neighbours (vector attention), and $\gamma$, $\theta$ two-layer MLPs as in
    the paper. Encoder, decoder and kNN graph are those of :class:`KNNGNN`; the graph is built once
    per forward with ``knn_graph`` and never crosses clouds.

    Args:
        in_channels (int): input features.
        out_channels (int): output features.
        hidden_channels (int): width of every layer.
        num_layers (int): attention layers.
        k (int): neighbours per point (the layer adds the point itself).
        dim (int): coordinate dimension.

    Shapes:
        - **input:** ``x`` $(|\mathcal{V}|, F_{in})$, ``pos`` $(|\mathcal{V}|, d)$,
          ``batch`` $(|\mathcal{V}|)$
        - **output:** $(|\mathcal{V}|, F_{out})$
    """

    def __init__(self, in_channels: int, out_channels: int, hidden_channels: int = 64, num_layers: int = 4,
                 k: int = 16, dim: int = 3):
        super().__init__()
        _check_graph_net(num_layers, k)
        self.in_channels, self.out_channels, self.hidden_channels = in_channels, out_channels, hidden_channels
        self.num_layers, self.k, self.dim = num_layers, k, dim
        c = hidden_channels
        self.embed = _mlp([in_channels + dim, c, c])
        # PyG's default position net is Linear(3, C): ours follows the paper (two layers) and takes `dim`
        self.convs = nn.ModuleList(
            PointTransformerConv(c, c, pos_nn=_mlp([dim, c, c], last_act=False),
                                 attn_nn=_mlp([c, c, c], last_act=False)) for _ in range(num_layers))
        self.norms = nn.ModuleList(nn.LayerNorm(c) for _ in range(num_layers))
        self.outs = nn.ModuleList(nn.Linear(c, c) for _ in range(num_layers))
        self.head = _mlp([c, c, out_channels], last_act=False)

    def reset_parameters(self):
        for m in self.modules():
            if m is not self and hasattr(m, "reset_parameters"):
                m.reset_parameters()

    def forward(self, x, pos: Optional[Tensor] = None, batch: Optional[Tensor] = None,
                edge_index: Optional[Tensor] = None) -> Tensor:
        x, pos, batch = _unpack(x, pos, batch)
        if edge_index is None:
            edge_index = knn_graph(pos.detach(), self.k, batch)
        h = self.embed(pos if x is None or x.size(-1) == 0 else torch.cat([x, pos.to(x.dtype)], -1))
        p = pos.to(h.dtype)
        for conv, norm, out in zip(self.convs, self.norms, self.outs):
            h = h + out(conv(norm(h), p, edge_index))
        return self.head(h)

    def flops(self, n: int) -> float:
        r"""Forward FLOPs on one cloud of ``n`` points: the position and attention MLPs on the
        ``n * (k + 1)`` edges (self-loops included), the three projections and the output linear
        per point, the node MLPs, and the kNN search (``3 * d`` per point pair), as :class:`KNNGNN`."""
        e = n * (self.k + 1)
        layers = sum(_linear_flops(c.pos_nn, e) + _linear_flops(c.attn_nn, e)
                     + _linear_flops(c.lin, n) + _linear_flops(c.lin_src, n) + _linear_flops(c.lin_dst, n)
                     for c in self.convs)
        return (layers + _linear_flops(self.outs, n) + _linear_flops(self.embed, n) + _linear_flops(self.head, n)
                + 3.0 * self.dim * n * n)

    def __repr__(self) -> str:
        return (f"{self.__class__.__name__}({self.in_channels}, {self.out_channels}, "
                f"hidden_channels={self.hidden_channels}, num_layers={self.num_layers}, k={self.k})")
