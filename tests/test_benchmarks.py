"""The benchmark scripts' CPU-side parts: tables and plots from saved results (the timing runs need a GPU)."""
import json
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SAVED = os.path.join(ROOT, "docs", "bench", "bsa_h100_v2.json")


@pytest.mark.skipif(not os.path.isfile(SAVED), reason="no saved bench_bsa.json in docs/bench")
def test_bench_bsa_redraws_its_plot_from_saved_json(tmp_path):
    pytest.importorskip("matplotlib")
    env = {**os.environ, "OUT": str(tmp_path), "MPLBACKEND": "Agg"}
    subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "bench_bsa.py"), "--plot-only", SAVED],
                   env=env, check=True, capture_output=True, timeout=120)
    png = tmp_path / "bench_bsa.png"
    assert png.is_file() and png.stat().st_size > 10_000
    with open(png, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_format_table_prints_missing_values_as_dashes():
    sys.path.insert(0, os.path.join(ROOT, "benchmarks"))
    try:
        from common import format_table
    finally:
        sys.path.pop(0)
    rows = [dict(N=4096, config="paper", ms=0.6683), dict(N=65536, config="fast")]
    text = format_table(rows, ["N", "config", "ms"], {"ms": ".3f"})
    lines = text.splitlines()
    assert len(lines) == 3 and "0.668" in lines[1] and lines[2].split()[-1] == "-"


def test_saved_bench_results_carry_device_and_command_arguments():
    # every committed benchmark JSON says where and how it was made (docs/benchmarks.md cites them)
    folder = os.path.join(ROOT, "docs", "bench")
    names = [n for n in os.listdir(folder) if n.endswith(".json")]
    assert names
    for name in names:
        with open(os.path.join(folder, name)) as f:
            saved = json.load(f)
        assert "env" in saved and ("args" in saved or "command" in saved), name
        assert saved["env"].get("gpu") or saved["env"].get("cpu"), name


def _bench_cpu(monkeypatch, tmp_path):
    # the CPU benchmark module, run in-process with OUT=tmp_path (argv set per call by the test)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    monkeypatch.setenv("OUT", str(tmp_path))
    import bench_cpu
    return bench_cpu


def test_bench_cpu_runs_and_writes_its_table(tmp_path, monkeypatch):
    # a tiny run of the CPU benchmark in-process: every layer timed, ratios and JSON written
    bench_cpu = _bench_cpu(monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--sizes", "512", "--mem-sizes", "", "--repeats", "1",
                                      "--max-wait", "0"])
    bench_cpu.main()
    saved = json.load(open(tmp_path / "bench_cpu.json"))
    row = saved["results"][0]
    assert row["N"] == 512 and all(row[f"{x}_s"] > 0 for x in ("bsa", "sdpa_full", "pt_conv", "knn_graph"))
    assert abs(row["sdpa_over_bsa"] - row["sdpa_full_s"] / row["bsa_s"]) < 1e-12
    assert "env" in saved and "command" in saved
    # the memory probe: one forward + backward in a fresh process, peak above the resident set before it
    assert bench_cpu.measure_memory("bsa", 2048, 1) > 1.0


def test_bench_cpu_layers_picks_cases(tmp_path, monkeypatch):
    # --layers times only the named cases; only the ratios of timed pairs are reported
    bench_cpu = _bench_cpu(monkeypatch, tmp_path)
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--layers", "knn_graph,knn_dense", "--sizes", "300",
                                      "--mem-sizes", "", "--repeats", "1", "--max-wait", "0", "--tag", "knn"])
    bench_cpu.main()
    monkeypatch.setattr(sys, "argv", ["bench_cpu.py", "--layers", "knn_graph,nope", "--sizes", "300",
                                      "--mem-sizes", ""])
    with pytest.raises(SystemExit, match="unknown --layers"):
        bench_cpu.main()
    row = json.load(open(tmp_path / "knn.json"))["results"][0]
    assert set(k for k in row if k.endswith("_s")) == {"knn_graph_s", "knn_dense_s"}
    assert row["knn_speedup"] == pytest.approx(row["knn_dense_s"] / row["knn_graph_s"])
    assert "sdpa_over_bsa" not in row and "bsa_over_pt" not in row


def test_host_glue_counts_launches_without_running_kernels():
    # the op's glue with Triton stubbed (benchmarks/host_glue.py): it runs, counts the launches of
    # the forward and backward (ball, pooling, compression, top-k, selection, combine) and the aten
    # ops, in a subprocess (the stub replaces the interpreter's launch for the whole process); the
    # separate kernels (--launch-config) launch three more than the fused forward and its backward
    counts = []
    for fused in ("true", "false"):
        r = subprocess.run([sys.executable, os.path.join(ROOT, "benchmarks", "host_glue.py"), "--n", "1024",
                            "--heads", "1", "--dim", "16", "--reps", "2",
                            "--launch-config", '{"bsa_fwd": {"fused": %s}}' % fused],
                           capture_output=True, text=True, timeout=300, env={**os.environ, "TRITON_INTERPRET": "1"})
        assert r.returncode == 0, r.stderr[-2000:]
        m = re.search(r"(\d+) Triton launches, (\d+) aten ops", r.stdout)
        assert m and int(m.group(1)) >= 12 and int(m.group(2)) >= 1, r.stdout
        counts.append(int(m.group(1)))
    assert counts[1] == counts[0] + 3, counts


def test_bench_model_variants_and_their_table(monkeypatch):
    # --variants: names -> launch configs (inline JSON or a file), refused when malformed; the table
    # names each row's variant (the timing itself needs CUDA)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import bench_model
    assert bench_model.parse_variants(None) == {"": {}}
    v = bench_model.parse_variants('{"fused": {}, "separate": {"bsa_fwd": {"fused": false}}}')
    assert list(v) == ["fused", "separate"] and v["separate"] == {"bsa_fwd": {"fused": False}}
    for bad in ('{}', '{"a": 1}', '[1, 2]'):
        with pytest.raises(SystemExit):
            bench_model.parse_variants(bad)
    row = dict(model="paper", size="8x3586", attn="bsa", mode="eager", kind="train", ms=34.0, busy_ms=30.0,
               host_over_busy=1.13, kernels=2954, syncs=8, items=8, peak_gb=1.0, tree_ms=0.5)
    table = bench_model.format_rows([dict(row, variant="separate"), row])
    assert "| bsa [separate] |" in table and "| bsa |" in table


@pytest.mark.parametrize("local_geometry", [0, 4], ids=["plain", "local_geometry"])
def test_selection_overlap_on_a_tiny_checkpoint(tmp_path, monkeypatch, local_geometry):
    # the agreement of a ball's groups on their selected blocks, from an examples/train.py checkpoint
    # (one trained with --local-geometry takes the extra input features: the plates study's flags)
    monkeypatch.syspath_prepend(os.path.join(ROOT, "examples"))
    monkeypatch.syspath_prepend(os.path.join(ROOT, "benchmarks"))
    import train
    import selection_overlap
    train.main(["--dataset", "toy", "--num-train", "4", "--num-test", "3", "--batch-size", "2", "--hidden", "16",
                "--layers", "2", "--heads", "2", "--ball-size", "32", "--cmp-block", "4", "--slc-block", "4",
                "--topk", "2", "--group-size", "4", "--steps", "2", "--no-progress", "--threads", "1",
                "--local-geometry", str(local_geometry), "--out", str(tmp_path / "run")])
    monkeypatch.setenv("OUT", str(tmp_path))
    monkeypatch.setattr(sys, "argv", ["selection_overlap.py", "--checkpoint", str(tmp_path / "run" / "checkpoint.pt"),
                                      "--clouds", "3"])
    selection_overlap.main()
    saved = json.load(open(tmp_path / "selection_overlap.json"))
    assert [r["layer"] for r in saved["rows"]] == [0, 1]
    for r in saved["rows"]:
        # at least one distinct block a ball and at most one per entry; 8 groups of 4 in a ball of 32
        assert 1 / 16 <= r["distinct_over_entries"] <= 1.0 and 0.0 <= r["own_ball_share"] <= 1.0
        # the union walk's tiles of 8 groups (here the whole ball) and the dK/dV mirror, 8 blocks a tile
        assert r["distinct_8_groups"] == r["distinct_over_entries"]
        assert 0.0 < r["distinct_groups_8_blocks"] <= 1.0
    assert saved["model"]["ball_size"] == 32 and saved["trained_steps"] == 2
