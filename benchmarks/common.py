"""Shared helpers of the benchmark scripts: timing, peak memory, environment, JSON and tables."""
from __future__ import annotations

import json
import os
import platform
import time
from typing import Callable, Dict, List, Optional, Sequence

import torch


def out_dir(default: str = "bench_out") -> str:
    r"""Where results go: ``$OUT`` on the device machine, else ``default``."""
    path = os.environ.get("OUT") or default
    os.makedirs(path, exist_ok=True)
    return path


def env_info() -> Dict[str, str]:
    info = {"torch": torch.__version__, "python": platform.python_version(), "cpu": platform.processor() or
            platform.machine(), "cpu_threads": str(torch.get_num_threads())}
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:  # pragma: no cover
        info["triton"] = "none"
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
        info["cuda"] = str(torch.version.cuda)
    return info


def sync(device=None) -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize(device)


def bench_gpu(fn: Callable[[], object], warmup: int = 25, rep: int = 100) -> float:
    r"""Median milliseconds of ``fn`` on the GPU (``triton.testing.do_bench``: CUDA events, L2 flush)."""
    import triton.testing
    return float(triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median"))


def bench_cpu(fn: Callable[[], object], min_runs: int = 3, min_time: float = 1.0) -> float:
    r"""Median milliseconds of ``fn`` by the host clock (one warm-up call, then at least ``min_runs``)."""
    fn()
    times: List[float] = []
    start = time.perf_counter()
    while len(times) < min_runs or (time.perf_counter() - start < min_time and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        sync()
        times.append((time.perf_counter() - t0) * 1e3)
    times.sort()
    return times[len(times) // 2]


def peak_memory_mb(fn: Callable[[], object]) -> float:
    r"""Peak GPU memory allocated by one call of ``fn`` above what was allocated before, in MiB."""
    sync()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def write_json(path: str, obj) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=1, default=str)


def format_table(rows: Sequence[Dict], cols: Sequence[str], fmt: Optional[Dict[str, str]] = None) -> str:
    r"""A fixed-width text table of ``rows`` (dicts) over ``cols``; missing values print as ``-``."""
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        return format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v)

    cells = [[cell(r, c) for c in cols] for r in rows]
    width = [max([len(c)] + [len(x[i]) for x in cells]) for i, c in enumerate(cols)]
    lines = ["  ".join(c.rjust(w) for c, w in zip(cols, width))]
    lines += ["  ".join(x.rjust(w) for x, w in zip(line, width)) for line in cells]
    return "\n".join(lines)


def markdown_table(rows: Sequence[Dict], cols: Sequence[str], fmt: Optional[Dict[str, str]] = None) -> str:
    fmt = fmt or {}

    def cell(r, c):
        v = r.get(c)
        if v is None:
            return "-"
        return format(v, fmt[c]) if c in fmt and isinstance(v, (int, float)) else str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(cell(r, c) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def forced_launch_configs(spec: Optional[str]):
    r"""``--launch-config``: a JSON file or inline JSON ``{kernel: {entry: value}}`` forced on the
    kernels' launch rules (``_common.launch_config``) while the returned ``ExitStack`` is open.
    Returns ``(stack, forced dict or None)``; the dict belongs in the run's saved args."""
    import contextlib
    import json
    stack = contextlib.ExitStack()
    if not spec:
        return stack, None
    if spec.lstrip().startswith("{"):
        forced = json.loads(spec)
    else:
        with open(spec) as f:
            forced = json.load(f)
    from torch_geometric_bsa.kernels._common import launch_config
    for kernel, entries in forced.items():
        stack.enter_context(launch_config(kernel, **entries))
    print("launch configs forced:", json.dumps(forced), flush=True)
    return stack, forced
