#!/usr/bin/env bash
# The next GPU session's first call, on a machine of 2 GPUs (on one GPU, GPU 0's part alone) (docs/perf-notes.md, "Next GPU session"):
#   GPU 0: issue 13's checks: the CUDA tests of the changed kernels and layer graphs, the shared static
#          tree's tests (BSA_SHARE_TREES=1), bench_model.py plain and with the shared tree, and the
#          selection backward's op benchmark;
#   GPU 1: issue 12's long-range study (multibody), resumable (run the same call again, machine warm).
# Usage: OUT=... bash benchmarks/gpu_session.sh   (LIMIT_S, default 560: the whole call's seconds; STAGES below)
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-gpu_session_out}"; mkdir -p "$OUT/perf"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
LIMIT_S=${LIMIT_S:-560}
PYTEST="python -m pytest -q -p no:cacheprovider -rfE --tb=short"
BENCH=${BENCH:-"--models paper --sizes 8x3586,1x16384 --infer-sizes 2x3586 --attn bsa,full --modes eager,graph --reps 5 --warmup 3"}
left() { echo $(( LIMIT_S - SECONDS - 10 )); }
# STAGES (default all but tiles): tests (the CUDA test files, T_TESTS seconds, default 200), shared
# (the shared tree's tests with BSA_SHARE_TREES=1), tiles (sweep_small_heads.py, then the model with its
# winners), infer (eager inference of bsa and full, alternating, 20 reps), bench (bench_model.py without
# and with the shared tree; BENCH_SHARE, default "0 1", picks), bsa (bench_bsa.py at BSA_SIZES, default
# 65536,262144), slc (the selection kernels' tile sweeps: the model's layer shape, then 65k points),
# bias (benchmarks/ball_bias_cost.py: the ball kernels with and without the distance bias), breakdown
# (the examples' study network, bsa and full, 8 x 3,586, eager, kernels by GPU time), ragged (the layer
# graphs on ragged layouts: the CUDA test, then the same test with the garbage collector left on)
STAGES=${STAGES:-tests shared bench bsa}
T_TESTS=${T_TESTS:-200}
TEST_FILES=${TEST_FILES:-tests/kernels/test_bsa_triton.py tests/test_host_free.py tests/test_layer_graphs.py \
  tests/test_launch_count.py tests/kernels/test_compile.py tests/kernels/test_combine.py tests/kernels/test_selected.py \
  tests/test_conv.py}

has() { case " $STAGES " in *" $1 "*) return 0 ;; esac; return 1; }

perf() {
  export CUDA_VISIBLE_DEVICES=0
  if has tests; then
    echo "=== cuda tests (at most ${T_TESTS}s, $(date +%T))"
    BSA_AUTOTUNE=0 timeout "$T_TESTS" $PYTEST $TEST_FILES > "$OUT/perf/tests.log" 2>&1
    tail -n 8 "$OUT/perf/tests.log"
  fi
  if has shared; then
    echo "=== shared static tree tests ($(date +%T))"
    BSA_SHARE_TREES=1 BSA_AUTOTUNE=0 timeout 60 $PYTEST -x tests/test_layer_graphs.py > "$OUT/perf/tests_shared.log" 2>&1
    tail -n 4 "$OUT/perf/tests_shared.log"
  fi
  local t
  if has tiles; then  # small-head tiles: the sweep (GPU-busy times), then the model with its winners
    echo "=== sweep_small_heads ($(date +%T))"
    OUT="$OUT/perf" timeout 200 python benchmarks/sweep_small_heads.py --time-limit 170 --best "$OUT/perf/best.json" \
      > "$OUT/perf/sweep.log" 2>&1
    grep -E "^best|against" "$OUT/perf/sweep.log"
    for lc in "" "--launch-config $OUT/perf/best.json"; do
      [ -n "$lc" ] && [ ! -s "$OUT/perf/best.json" ] && break
      echo "=== bench_model ${lc:-(rules)} ($(date +%T))"
      timeout 100 python benchmarks/bench_model.py --models paper --sizes 8x3586 --infer-sizes 2x3586 \
        --attn bsa --modes eager --reps 7 --warmup 3 $lc --json "$OUT/perf/tiles${lc:+_best}.json" 2>&1 | grep "^| paper"
    done
  fi
  if has slc; then  # selection tiles: the paper model's layer (H 8, D 8, top-k 4), then 65k points (H 8, D 64)
    echo "=== sweep_small_heads --kernels slc ($(date +%T))"
    OUT="$OUT/perf" timeout 150 python benchmarks/sweep_small_heads.py --kernels slc --time-limit 120 \
      > "$OUT/perf/sweep_slc_model.log" 2>&1
    grep -E "^best|against|^\| slc" "$OUT/perf/sweep_slc_model.log" | head -n 40
    echo "=== sweep_bsa --kernels slc --configs fast ($(date +%T))"
    OUT="$OUT/perf" timeout 150 python benchmarks/sweep_bsa.py --kernels slc --configs fast \
      > "$OUT/perf/sweep_slc_65k.log" 2>&1
    grep -E "^\| fast" "$OUT/perf/sweep_slc_65k.log" | head -n 30
  fi
  if has ragged; then  # the capture fixes on ragged layouts: the CUDA test, then the same without no_gc
    echo "=== ragged layouts, layer graphs ($(date +%T))"
    BSA_AUTOTUNE=0 timeout 150 $PYTEST tests/test_layer_graphs.py -k "ragged_layouts or cuda" \
      > "$OUT/perf/tests_ragged.log" 2>&1
    tail -n 4 "$OUT/perf/tests_ragged.log"
    echo "=== the same test without the collector paused (does the test catch the bug?)"
    (cd tests && BSA_AUTOTUNE=0 timeout 90 python -W "error:a CUDA graph capture failed:RuntimeWarning" -c "
import contextlib, torch_geometric_bsa.layer_graphs as L
L.no_gc = contextlib.nullcontext
import test_layer_graphs as T
try:
    T.test_cuda_ragged_layouts_evict_graphs_safely(); print('without no_gc: passed')
except Exception as e:
    print('without no_gc: failed:', type(e).__name__, str(e)[:200])
") 2>&1 | grep "without no_gc"
  fi
  if has bias; then  # what the ball kernels' distance bias costs (sizes the square-root work: perf-notes)
    echo "=== ball_bias_cost ($(date +%T))"
    OUT="$OUT/perf" timeout 120 python benchmarks/ball_bias_cost.py > "$OUT/perf/ball_bias_cost.log" 2>&1
    tail -n 4 "$OUT/perf/ball_bias_cost.log"
  fi
  if has breakdown; then  # the examples' study network: where BSA's step goes against full's
    echo "=== bench_model --models study --breakdown ($(date +%T))"
    timeout 150 python benchmarks/bench_model.py --models study --sizes 8x3586 --kinds train --attn bsa,full \
      --modes eager --reps 5 --warmup 3 --breakdown --json "$OUT/perf/study.json" > "$OUT/perf/study_breakdown.log" 2>&1
    grep "^| study" "$OUT/perf/study_breakdown.log"
  fi
  if has infer; then  # eager inference, host-paced: each model twice, alternating, 20 reps each
    echo "=== eager inference, alternating ($(date +%T))"
    timeout 150 python benchmarks/bench_model.py --models paper --kinds infer --infer-sizes 2x3586 \
      --attn bsa,full,bsa,full --modes eager,graph --reps 20 --warmup 5 --json "$OUT/perf/infer.json" 2>&1 | grep "^| paper"
  fi
  for share in ${BENCH_SHARE:-0 1}; do
    has bench || break
    t=$(( $(left) - ${BENCH_RESERVE:-60} )); [ "${BENCH_SHARE:-0 1}" = "0 1" ] && [ "$share" = 0 ] && t=$(( t / 2 )); [ "$t" -gt 30 ] || { echo "no time left for bench_model"; break; }
    echo "=== bench_model BSA_SHARE_TREES=$share (at most ${t}s, $(date +%T))"
    BSA_SHARE_TREES=$share timeout "$t" python benchmarks/bench_model.py $BENCH \
      --json "$OUT/perf/bench_model_share$share.json" > "$OUT/perf/bench_model_share$share.log" 2>&1
    grep -v '^{' "$OUT/perf/bench_model_share$share.log" | grep -v Warning | grep -v '^  ' | tail -n 14
  done
  t=$(left); if has bsa && [ "$t" -gt 30 ]; then
    echo "=== bench_bsa selection backward (at most ${t}s)"
    OUT="$OUT/perf" timeout "$t" python benchmarks/bench_bsa.py --sizes "${BSA_SIZES:-65536,262144}" --no-flex --rep 20 \
      > "$OUT/perf/bench_bsa.log" 2>&1  # writes bench_bsa.json and .png to $OUT
    tail -n 20 "$OUT/perf/bench_bsa.log"
  fi
}

study() {
  OUT="$OUT/multibody" GPU_IDS=1 DATASETS=multibody PARALLEL_SEEDS=1 PACK=1 STEPS=${STEPS:-800} \
    LIMIT_S=$(( LIMIT_S - 20 )) bash examples/run_study_gpu.sh > "$OUT/study_multibody.log" 2>&1
}

NGPU=$(nvidia-smi -L 2>/dev/null | grep -c GPU)
if [ "${NGPU:-0}" -ge 2 ]; then
  study &
  spid=$!
  perf 2>&1 | tee "$OUT/perf.log"
  wait "$spid"
  grep "===" "$OUT/study_multibody.log" | tail -n 5
else  # one GPU: the study would share it with the timings; it runs in a call of its own
  echo "one GPU: issue 13's checks only (run examples/run_study_gpu.sh in another call)"
  perf 2>&1 | tee "$OUT/perf.log"
fi
(cd "$OUT" && tar czf perf.tar.gz perf && rm -rf perf)
ls -la "$OUT" "$OUT/multibody" 2>/dev/null
