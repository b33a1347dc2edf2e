"""BSA on the CPU against full attention and PointTransformerConv: layer forward + backward, fp32.

One cloud of N points, 64 channels, 8 heads, the layers' default hyper-parameters. Timed side by side
in one run: after one warm-up call each, the layers take turns (one call each per round) and each
reports its median over the rounds; before each round the script waits (``--max-wait``) until other
processes leave the cores idle, and records how busy they were (``busy_before_rounds``):

- ``BSAConv`` with ``backend="auto"`` (the chunked CPU path, ``torch_geometric_bsa.cpu``), ball
  tree build included (it runs inside every forward), default configuration (``bsa``) and with
  ``group_compression=True`` (``bsa_gc``); ``--reference`` adds the readable ``backend="torch"``;
- ``sdpa_full``: a plain multi-head attention layer (qkv projection, ``scaled_dot_product_attention``
  over all N points, output projection);
- ``PointTransformerConv`` (PyG, k = 16) on a prebuilt kNN graph; the graph build (``knn_graph``:
  torch-cluster when installed, else our pure-torch search) is timed on its own, and beside it the
  dense scan the fallback used before (``knn_dense``).

Peak memory: each (layer, N) runs once in a fresh subprocess; the figure is its peak resident set
(``VmHWM``, reset through ``/proc/self/clear_refs`` after the setup) minus the resident set just
before the call, so it counts what one forward +
backward allocates. Divided by N it should stay flat when memory is linear in N.

    python benchmarks/bench_cpu.py                              # N = 4096, 16384; memory at 2k..16k
    python benchmarks/bench_cpu.py --sizes 4096 --mem-sizes ''  # a quick look
    python benchmarks/bench_cpu.py --layers knn_graph,knn_dense --mem-sizes '' --tag bench_cpu_knn
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from typing import Callable, Dict, List

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from common import env_info, format_table, markdown_table, out_dir, write_json  # noqa: E402

CHANNELS, HEADS, K = 64, 8, 16
#: ratios reported per N: name -> (numerator case, denominator case), when both were timed
RATIOS = dict(sdpa_over_bsa=("sdpa_full", "bsa"), bsa_over_pt=("bsa", "pt_conv"), knn_speedup=("knn_dense", "knn_graph"))


class SDPAFullAttention(nn.Module):
    r"""Multi-head self-attention over all points of one cloud (what ``nn.MultiheadAttention`` does),
    with torch's fused ``scaled_dot_product_attention``: ``[N, C] -> [N, C]``."""

    def __init__(self, channels: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(channels, 3 * channels)
        self.out = nn.Linear(channels, channels)

    def forward(self, x):
        n, c = x.shape
        q, k, v = self.qkv(x).view(n, 3, self.heads, c // self.heads).permute(1, 2, 0, 3)  # [H, N, D] each
        o = F.scaled_dot_product_attention(q[None], k[None], v[None])[0]
        return self.out(o.transpose(0, 1).reshape(n, c))


def make_case(name: str, n: int, seed: int = 0):
    r"""A zero-argument closure running one forward + backward of layer ``name`` on ``n`` points."""
    from torch_geometric_bsa import BSAConv
    g = torch.Generator().manual_seed(seed)
    pos = torch.rand(n, 3, generator=g)
    x = torch.randn(n, CHANNELS, generator=g, requires_grad=True)
    if name in ("bsa", "bsa_gc", "bsa_torch"):
        conv = BSAConv(CHANNELS, heads=HEADS, backend="torch" if name == "bsa_torch" else "auto",
                       group_compression=name == "bsa_gc")
        return lambda: conv(x, pos).square().mean().backward()
    if name == "sdpa_full":
        layer = SDPAFullAttention(CHANNELS, HEADS)
        return lambda: layer(x).square().mean().backward()
    from torch_geometric.nn import PointTransformerConv
    from torch_geometric_bsa.nn.baselines import knn_graph
    if name == "knn_graph":
        return lambda: knn_graph(pos, K)
    if name == "knn_dense":  # the dense scan our fallback used before the tree pruning
        from torch_geometric_bsa.nn.baselines import _knn_dense
        batch = torch.zeros(n, dtype=torch.long)
        return lambda: _knn_dense(pos, K, batch, False, 1 << 24)
    if name == "pt_conv":
        edge_index = knn_graph(pos, K)
        conv = PointTransformerConv(CHANNELS, CHANNELS)
        return lambda: conv(x, pos, edge_index).square().mean().backward()
    raise ValueError(f"unknown layer {name!r}")


def _cpu_busy(interval: float = 0.5) -> float:
    r"""Fraction of all cores busy (any process) over ``interval`` seconds, from ``/proc/stat``."""
    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        return v[3] + v[4], sum(v)  # idle + iowait, total
    i0, t0 = read()
    time.sleep(interval)
    i1, t1 = read()
    return 1.0 - (i1 - i0) / max(1, t1 - t0)


def wait_quiet(limit: float, max_wait: float) -> float:
    r"""Waits (at most ``max_wait`` s) until other processes leave the cores idle (busy fraction
    below ``limit``); returns the last busy fraction seen. Other jobs sharing the machine make every
    intra-op barrier wait for a descheduled thread, which distorts timings by up to 10x."""
    start = time.time()
    busy = _cpu_busy()
    while busy > limit and time.time() - start < max_wait:
        busy = _cpu_busy()
    return busy


def time_round_robin(cases: Dict[str, Callable], repeats: int, quiet: float, max_wait: float):
    r"""Median seconds per case; the cases take turns (one call each per round, a warm-up first), so
    that a change of machine load hits all of them alike. Also returns the busy fraction before
    each round."""
    for fn in cases.values():
        fn()
    times: Dict[str, List[float]] = {name: [] for name in cases}
    busy = []
    for _ in range(repeats):
        busy.append(round(wait_quiet(quiet, max_wait), 3))
        for name, fn in cases.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: sorted(t)[len(t) // 2] for name, t in times.items()}, busy


def _status_mb(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024  # kB
    raise RuntimeError(f"{key} not in /proc/self/status")


def memory_child(name: str, n: int) -> None:
    r"""Runs in a fresh process: prints the peak RSS increase (MiB) of one forward + backward."""
    fn = make_case(name, n)
    with open("/proc/self/clear_refs", "w") as f:  # resets the peak (VmHWM) to the current RSS
        f.write("5")
    base = _status_mb("VmRSS")
    fn()
    print(json.dumps(dict(layer=name, N=n, peak_mb=_status_mb("VmHWM") - base)))


def measure_memory(name: str, n: int, threads: int) -> float:
    out = subprocess.run([sys.executable, os.path.abspath(__file__), "--memory-child", name, str(n),
                          "--threads", str(threads)], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])["peak_mb"]


def load() -> str:
    try:
        return " ".join(open("/proc/loadavg").read().split()[:3])
    except OSError:  # pragma: no cover - not Linux
        return "?"


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",") if x], default=[4096, 16384])
    p.add_argument("--mem-sizes", type=lambda s: [int(x) for x in s.split(",") if x],
                   default=[2048, 4096, 8192, 16384])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--quiet", type=float, default=0.15,
                   help="before each round, wait until the cores are at most this busy (fraction)")
    p.add_argument("--max-wait", type=float, default=60.0, help="longest wait for a quiet machine (s)")
    p.add_argument("--reference", action="store_true", help="also time the torch (reference) backend")
    p.add_argument("--layers", type=lambda s: [x for x in s.split(",") if x], default=None,
                   help="time only these cases (comma-separated, e.g. knn_graph,knn_dense); default: all")
    p.add_argument("--tag", default="bench_cpu")
    p.add_argument("--memory-child", nargs=2, metavar=("LAYER", "N"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_child:
        memory_child(args.memory_child[0], int(args.memory_child[1]))
        return
    info = env_info()
    info["load_before"] = load()
    print(info, flush=True)
    layers = ["bsa", "bsa_gc"] + (["bsa_torch"] if args.reference else []) + ["sdpa_full", "pt_conv",
                                                                               "knn_graph", "knn_dense"]
    if args.layers:
        unknown = sorted(set(args.layers) - set(layers) - {"bsa_torch"})
        if unknown:
            raise SystemExit(f"unknown --layers {unknown}; choose from {layers + ['bsa_torch']}")
        layers = [x for x in layers + ["bsa_torch"] if x in args.layers]
    rows = []
    for n in args.sizes:
        med, busy = time_round_robin({name: make_case(name, n) for name in layers}, args.repeats,
                                     args.quiet, args.max_wait)
        row = dict(N=n, busy_before_rounds=busy)
        for name in layers:
            row[f"{name}_s"] = med[name]
            print(n, name, f"{med[name]:.3f} s", flush=True)
        for ratio, (a, b) in RATIOS.items():
            if a in med and b in med:
                row[ratio] = med[a] / med[b]
        rows.append(row)
    mem = []
    for n in args.mem_sizes:
        row = dict(N=n)
        for name in ("bsa", "sdpa_full", "pt_conv"):
            row[f"{name}_mb"] = measure_memory(name, n, args.threads)
            row[f"{name}_kb_per_pt"] = row[f"{name}_mb"] * 1024 / n
        print(row, flush=True)
        mem.append(row)
    info["load_after"] = load()
    od = out_dir()
    write_json(os.path.join(od, f"{args.tag}.json"), dict(env=info, args=vars(args), command=" ".join(sys.argv),
                                                         results=rows, memory=mem))
    cols = ["N"] + [f"{x}_s" for x in layers] + [r for r in RATIOS if rows and r in rows[0]]
    fmt = {c: ".3f" for c in cols if c.endswith("_s")}
    fmt.update(sdpa_over_bsa=".2f", bsa_over_pt=".2f", knn_speedup=".1f")
    mcols = ["N", "bsa_mb", "sdpa_full_mb", "pt_conv_mb", "bsa_kb_per_pt", "sdpa_full_kb_per_pt",
             "pt_conv_kb_per_pt"]
    mfmt = {c: ".1f" for c in mcols[1:]}
    with open(os.path.join(od, f"{args.tag}.md"), "w") as f:
        f.write(markdown_table(rows, cols, fmt) + "\n\n" + (markdown_table(mem, mcols, mfmt) if mem else "") + "\n")
    print(info)
    print(format_table(rows, cols, fmt))
    if mem:
        print(format_table(mem, mcols, mfmt))


if __name__ == "__main__":
    main()
