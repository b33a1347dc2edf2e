#!/usr/bin/env bash
# One device call: GPU tests, then benchmarks, each stage independent (a failing stage does not stop the
# rest) and time-boxed. Usage on the GPU machine, from the repo root:
#   OUT=/some/dir bash benchmarks/gpu_run.sh tests tree ball bsa
# Stages: tests (kernel tests compiled + every test marked gpu), tree, ball, ballsweep, bsa, bsaquick, compare.
# Everything goes to $OUT (logs, JSON, PNG); the last lines printed are short summaries.
set -u
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
OUT=${OUT:-bench_out}; mkdir -p "$OUT"
log() { echo "=== $* ($(date +%T))"; }
for stage in "$@"; do
  case $stage in
    env)   nvidia-smi --query-gpu=name,memory.total,clocks.max.sm --format=csv
           python -c "import torch, triton; print(torch.__version__, torch.version.cuda, triton.__version__)";;
    tests) log tests; timeout ${T_TESTS:-300} python -m pytest -q -p no:cacheprovider -x --timeout 240 \
             tests/kernels -m "gpu or not slow" 2>&1 | tail -n 60 > "$OUT/tests.log"; tail -n 15 "$OUT/tests.log";;
    gputests) log gputests; timeout ${T_TESTS:-300} python -m pytest -q -p no:cacheprovider tests/kernels \
             tests/test_hardening.py tests/test_conv.py tests/test_transformer.py -m "gpu or not slow" \
             2>&1 | tail -n 60 > "$OUT/gputests.log"; tail -n 15 "$OUT/gputests.log";;
    profile) log profile; timeout ${T_PROF:-120} python benchmarks/profile_bsa.py ${PROF_ARGS:-} > "$OUT/profile.log" 2>&1; grep -A3 "#####" "$OUT/profile.log";;
    bsatests) log bsatests; timeout ${T_TESTS:-120} python -m pytest -q -p no:cacheprovider tests/kernels/test_bsa_triton.py 2>&1 | tail -n 5;;
    tree)  log tree; timeout 120 python benchmarks/bench_tree.py --devices cuda ${TREE_ARGS:-} 2>&1 | tail -n 25;;
    ball)  log ball; timeout ${T_BALL:-300} python benchmarks/bench_ball.py ${BALL_ARGS:-} > "$OUT/ball.log" 2>&1; tail -n 40 "$OUT/ball.log";;
    ballsweep) log ballsweep; timeout ${T_SWEEP:-240} python benchmarks/bench_ball.py --sweep ${SWEEP_ARGS:-} > "$OUT/ballsweep.log" 2>&1; tail -n 12 "$OUT/ballsweep.log";;
    bsa)   log bsa; timeout ${T_BSA:-300} python benchmarks/bench_bsa.py ${BSA_ARGS:-} > "$OUT/bsa.log" 2>&1; tail -n 40 "$OUT/bsa.log";;
    *) echo "unknown stage $stage";;
  esac
done
