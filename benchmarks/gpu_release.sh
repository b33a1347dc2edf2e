#!/usr/bin/env bash
# The release run in one device call: the CUDA tests of the kernels, the benchmark stages, then the CUDA
# hardening tests (torch.compile with inductor last: it compiles for a minute or more). Each step is
# time-boxed; logs and JSON land in $OUT/r, packed into $OUT/results.tgz (the device tool returns at
# most 8 files). Usage: OUT=... bash benchmarks/gpu_release.sh
#   STAGES (default "env tree ball bsa": see gpu_run.sh), BALL_ARGS, BSA_ARGS, T_* limits in seconds.
set -u
R="${OUT:-bench_out}/r"; mkdir -p "$R"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export T_BALL=${T_BALL:-100} T_BSA=${T_BSA:-300}
export BALL_ARGS=${BALL_ARGS:-"--sizes 4096,65536,262144 --layouts cloud --methods ours,sdpa_bias,flex_bias,sdpa_nobias,sdpa_full,reference --flex-sizes 65536 --rep 30"}
export BSA_ARGS=${BSA_ARGS:-"--sizes 4096,65536,1048576 --configs paper,fast,fastwin --flex-sizes 65536 --rep 30"}
TO=$(python -c "import pytest_timeout" 2>/dev/null && echo "--timeout ${T_ONE:-150}")
PYTEST="python -m pytest -q -p no:cacheprovider -rfE --tb=short $TO"
echo "=== cuda kernel tests ($(date +%T))"
# one compression-kernel config (BSA_AUTOTUNE=0): tuning per new test shape compiles 15 variants
BSA_AUTOTUNE=0 timeout ${T_TESTS:-150} $PYTEST tests/kernels/test_bsa_triton.py tests/test_cmp_window.py tests/test_balltree.py \
  -m "gpu or not slow" > "$R/tests.log" 2>&1; tail -n 4 "$R/tests.log"
OUT="$R" timeout ${T_ALL:-450} bash benchmarks/gpu_run.sh ${STAGES:-env tree ball bsa}
echo "=== cuda hardening tests, inductor last ($(date +%T))"
timeout ${T_HARD:-200} $PYTEST --runxfail tests/test_hardening.py \
  -k "gpu or triton_path or device_mismatch or 16bit or degenerate" > "$R/hardening.log" 2>&1; tail -n 6 "$R/hardening.log"
(cd "$R" && tar czf ../results.tgz . ) && rm -rf "$R"
ls -la "${OUT:-bench_out}"
