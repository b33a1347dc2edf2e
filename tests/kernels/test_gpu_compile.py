"""Every Triton launch of the op compiles for a Hopper GPU, checked on a CPU
(``benchmarks/compile_sm90.py``: the op's launches recorded with the GPU launch rules, then compiled
for sm_90). The interpreter runs kernels as Python, so code that only a GPU compile rejects passes
it: a helper returning ``None`` (fb46cb5 to d85c799), a ``tl.dot`` with K < 16. The tool runs in
fresh processes without ``TRITON_INTERPRET``: the interpreter patches ``triton.language`` for the
whole process.
"""
import os
import subprocess
import sys

import pytest
import torch

if torch.cuda.is_available():
    pytest.skip("the GPU runs the kernels themselves", allow_module_level=True)
pytest.importorskip("triton")

TOOL = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "benchmarks",
                    "compile_sm90.py")


def test_every_launch_compiles_for_sm90():
    # bf16 and fp32 (their launch rules differ) in two processes at once: a CPU-bound minute each
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {dtype: subprocess.Popen([sys.executable, TOOL, "--dtype", dtype], env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, text=True) for dtype in ("bfloat16", "float32")}
    for dtype, proc in procs.items():
        out, err = proc.communicate(timeout=900)
        assert proc.returncode == 0, (dtype, out[-6000:] + err[-3000:])
        assert " 0 failed" in out and "compiled for sm_90" in out, (dtype, out[-3000:])
