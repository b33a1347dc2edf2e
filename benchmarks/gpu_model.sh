#!/usr/bin/env bash
# One device call for the model-level work: the CUDA tests of the host-free step, then
# bench_model.py. Usage: OUT=... bash benchmarks/gpu_model.sh   (MODEL_ARGS, T_TESTS, T_BENCH to override)
set -u
OUT="${OUT:-bench_out}"; mkdir -p "$OUT"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
PYTEST="python -m pytest -q -p no:cacheprovider -rfE --tb=short"
echo "=== cuda tests ($(date +%T))"
BSA_AUTOTUNE=0 timeout ${T_TESTS:-240} $PYTEST ${TESTS:-tests/test_host_free.py tests/kernels/test_bsa_triton.py} \
  > "$OUT/tests.log" 2>&1; tail -n 15 "$OUT/tests.log"
echo "=== bench_model ($(date +%T))"
timeout ${T_BENCH:-400} python benchmarks/bench_model.py ${MODEL_ARGS:-} --json "$OUT/bench_model.json" \
  > "$OUT/bench_model.log" 2>&1
grep -v '^{' "$OUT/bench_model.log" | grep -v Warning | grep -v '^  ' | tail -n 60
