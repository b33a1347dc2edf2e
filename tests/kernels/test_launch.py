"""The launch-configuration registry (kernels/_common.py): overrides, the interpreter's tiles, and the
GPU configs the kernels were tuned with (pinned here, so a refactor cannot move them silently)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
pytest.importorskip("triton")

import torch_geometric_bsa.kernels._common as common  # noqa: E402
from torch_geometric_bsa.kernels import ball, combine, compressed, fused, selected, topk  # noqa: E402

MODULES = (ball, combine, compressed, fused, selected, topk)  # importing them registers their launch rules

FACTS = {"ball_fwd": dict(m=256, d=64, dtype=torch.bfloat16), "ball_bwd": dict(m=256, d=64, dtype=torch.bfloat16),
         "cmp_fwd": {}, "cmp_dq": {}, "cmp_dkdv": {}, "slc_fwd": dict(dtype=torch.bfloat16, d=64),
         "slc_dq": dict(dtype=torch.bfloat16, d=8), "slc_dkdv": dict(d=64), "topk": dict(qpg=8, n_g=4096),
         "combine": dict(qu=1, d=64), "pool": dict(hd=512, block=8),
         "cmp_split": dict(key_tiles=60, heads=4, sms=132), "bsa_fwd": dict(m=256, d=16, dtype=torch.bfloat16)}
# launch decisions that are not a kernel's tiles (no warps): the compression dK/dV's query split
NOT_KERNELS = {"cmp_split"}


def test_every_kernel_has_a_rule_and_interpreter_tiles():
    assert set(common._RULES) == set(FACTS) == set(common._INTERPRETER_TILES)
    for kernel, facts in FACTS.items():
        gpu = common._RULES[kernel](**facts)
        interp = common._INTERPRETER_TILES[kernel](**facts)
        assert set(interp) <= set(gpu), kernel  # the interpreter only changes entries the rule has
        assert kernel in NOT_KERNELS or "num_warps" in gpu, kernel  # (combine, pool: Triton's default stages)


@pytest.mark.parametrize("kernel,facts,expected", [
    # (docs/perf-notes.md: "Ball kernel", the top-k and selection sweeps)
    ("ball_fwd", dict(m=256, d=64, dtype=torch.bfloat16), dict(BLOCK_M=128, BLOCK_N=64, num_warps=4, num_stages=3)),
    ("ball_fwd", dict(m=256, d=128, dtype=torch.float16), dict(BLOCK_M=64, BLOCK_N=64, num_warps=8, num_stages=3)),
    ("ball_fwd", dict(m=16, d=32, dtype=torch.float32), dict(BLOCK_M=16, BLOCK_N=16, num_warps=4, num_stages=2)),
    ("ball_bwd", dict(m=256, d=64, dtype=torch.bfloat16),
     dict(BLOCK=64, BLOCK_M1=32, BLOCK_N2=32, MERGED=True, num_warps=4, num_stages=3)),
    ("ball_bwd", dict(m=256, d=128, dtype=torch.bfloat16),
     dict(BLOCK=64, BLOCK_M1=32, BLOCK_N2=32, MERGED=False, num_warps=4, num_stages=2)),
    ("cmp_fwd", {}, dict(BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=3)),
    ("slc_fwd", dict(dtype=torch.bfloat16, d=64),
     dict(rows=64, group_rows=1, keys=128, num_warps=4, num_stages=2, union=False, fallback=False)),
    ("slc_fwd", dict(dtype=torch.bfloat16, d=32),
     dict(rows=64, group_rows=1, keys=128, num_warps=4, num_stages=2, union=True, fallback=False)),
    ("slc_fwd", dict(dtype=torch.bfloat16, d=8),
     dict(rows=64, group_rows=64, keys=128, num_warps=4, num_stages=2, union=True, fallback=False)),
    ("slc_dq", dict(dtype=torch.float32, d=64),
     dict(rows=64, group_rows=1, keys=64, num_warps=4, num_stages=2, union=False, fallback=False)),
    ("slc_dkdv", dict(d=64), dict(rows=64, steps=4, num_warps=4, num_stages=2)),
    ("slc_dkdv", dict(d=8), dict(rows=32, steps=4, num_warps=2, num_stages=2)),
    ("topk", dict(qpg=8, n_g=4096), dict(BLOCK_G=8, BLOCK_N=128, num_warps=4, num_stages=2)),
    ("topk", dict(qpg=1, n_g=100), dict(BLOCK_G=16, BLOCK_N=128, num_warps=4, num_stages=2)),
    ("combine", dict(qu=8, d=64), dict(BG=8, num_warps=4)),
    ("pool", dict(hd=512, block=64), dict(BLOCK_B=32, BLOCK_C=256, UNROLL=8, num_warps=4)),
    ("bsa_fwd", dict(m=256, d=32, dtype=torch.bfloat16),
     dict(fused=True, rows=None, BLOCK_N=64, num_warps=4, num_stages=2)),
    ("bsa_fwd", dict(m=256, d=16, dtype=torch.float32),
     dict(fused=True, rows=None, BLOCK_N=32, num_warps=4, num_stages=2)),
    ("bsa_fwd", dict(m=256, d=64, dtype=torch.bfloat16),
     dict(fused=False, rows=None, BLOCK_N=64, num_warps=4, num_stages=2)),
])
def test_gpu_configs_are_the_tuned_ones(kernel, facts, expected):
    assert common._RULES[kernel](**facts) == expected


def test_compression_candidates():
    # autotuned over five candidates a kernel, or one config with BSA_AUTOTUNE=0 / the interpreter
    for kernel in ("cmp_fwd", "cmp_dq", "cmp_dkdv"):
        assert len(common._TUNE[kernel]) == 5
        assert common._RULES[kernel]() in common._TUNE[kernel]
    tuner = compressed._cmp_fwd
    if common.is_interpreter() or not common.AUTOTUNE:
        assert len(tuner.configs) == 1
        assert tuner.configs[0].kwargs == {k: v for k, v in common.config_for("cmp_fwd").items()
                                           if k not in ("num_warps", "num_stages")}
    else:
        assert len(tuner.configs) == 5


@pytest.mark.skipif(not common.is_interpreter(), reason="interpreter tiles")
def test_interpreter_tiles_replace_the_rules():
    assert common.config_for("ball_fwd", m=256, d=64, dtype=torch.bfloat16) == dict(
        BLOCK_M=64, BLOCK_N=64, num_warps=4, num_stages=1)
    assert common.config_for("ball_bwd", m=256, d=64, dtype=torch.bfloat16)["MERGED"] is False
    assert common.config_for("slc_fwd", dtype=torch.bfloat16, d=64)["keys"] == 64
    assert common.config_for("topk", qpg=8, n_g=4096)["BLOCK_G"] == 2


def test_launch_config_forces_nests_and_restores():
    facts = FACTS["ball_fwd"]
    base = common.config_for("ball_fwd", **facts)
    with common.launch_config("ball_fwd", BLOCK_M=16):
        assert common.config_for("ball_fwd", **facts) == {**base, "BLOCK_M": 16}
        with common.launch_config("ball_fwd", BLOCK_N=16, num_warps=2):
            assert common.config_for("ball_fwd", **facts) == {**base, "BLOCK_M": 16, "BLOCK_N": 16, "num_warps": 2}
        assert common.config_for("ball_fwd", **facts) == {**base, "BLOCK_M": 16}
        assert common.config_for("ball_bwd", **facts) == common.config_for("ball_bwd", **facts)  # others untouched
    assert common.config_for("ball_fwd", **facts) == base
    assert not common._FORCED


def test_launch_config_rejects_unknown_names():
    with pytest.raises(KeyError, match="no launch rule"):
        with common.launch_config("ball_forward", BLOCK_M=16):
            pass
    with common.launch_config("ball_fwd", BLOCK_Q=16):  # a typo: raised where the config is read
        with pytest.raises(KeyError, match="BLOCK_Q"):
            common.config_for("ball_fwd", **FACTS["ball_fwd"])
    assert not common._FORCED


def test_config_for_returns_a_fresh_dict():
    cfg = common.config_for("slc_fwd", dtype=torch.float32, d=64)
    cfg.pop("keys")
    assert "keys" in common.config_for("slc_fwd", dtype=torch.float32, d=64)


def test_kept_configs_follow_the_interpreter_flag_and_stay_bounded(monkeypatch):
    # config_for keeps its answers: the interpreter's tiles and the GPU rule's are kept apart
    facts = dict(dtype=torch.bfloat16, d=16)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.config_for("slc_fwd", **facts)["rows"] == 32
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert common.config_for("slc_fwd", **facts) == common._RULES["slc_fwd"](**facts)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert common.config_for("slc_fwd", **facts)["rows"] == 32
    for n_g in range(5000):  # a fact that varies batch to batch: the store is emptied, not grown
        common.config_for("topk", qpg=8, n_g=n_g)
    assert len(common._CONFIGS) <= 4096


def test_launch_config_finds_rules_of_modules_not_yet_imported():
    # launch_config on a kernel whose module nobody imported yet (bench_model.py --launch-config is
    # the first user in its process): the kernel modules are imported, not "no launch rule"
    import subprocess
    import sys
    code = ("from torch_geometric_bsa.kernels._common import launch_config, config_for\n"
            "with launch_config('topk', BLOCK_N=64), launch_config('ball_bwd', BLOCK_M1=16):\n"
            "    assert config_for('topk', qpg=8, n_g=4096)['BLOCK_N'] == 64\n"
            "print('ok')\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip().endswith("ok"), out.stderr[-2000:]
