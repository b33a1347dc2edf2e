#!/usr/bin/env bash
# The BSA ablations (examples/ablate.py) at the GPU study's scale: the study's model and car data
# (examples/study_flags.sh), the variants split over the GPUs, every seed of a GPU's variants at once.
# From the repo root, no install needed:
#   OUT=/some/dir VARIANTS_0="no-ball no-cmp" VARIANTS_1="topk4 per-head" bash examples/run_ablate_gpu.sh
# Knobs (environment): VARIANTS_<gpu> (ablate.py --variants for that GPU; a GPU without them idles),
# SEEDS (default "0 1 2"), STEPS (default 800, as the study), LIMIT_S (seconds for the runs, default
# 500), EXTRA (more train.py flags, after the study's), WORK (default runs/ablate_gpu; finished runs are kept and killed ones resumed on a rerun).
# Leaves $OUT/ablate.log and $OUT/ablate.tar.gz (each process's table and JSON, every run's
# metrics.json and logs): a device call brings back only a few files.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/ablate_gpu_out}; WORK=${WORK:-runs/ablate_gpu}
SEEDS=${SEEDS:-0 1 2}; STEPS=${STEPS:-800}; LIMIT_S=${LIMIT_S:-500}
# shellcheck source=examples/study_flags.sh
. examples/study_flags.sh
mkdir -p "$OUT/tables" "$WORK"; OUT=$(cd "$OUT" && pwd)
{
  echo "=== ablations ($(date -u +%FT%TZ)): seeds $SEEDS; $STEPS steps"
  git log -1 --format="commit %H" 2>/dev/null || true
  # shellcheck disable=SC2046
  "$PY" examples/train.py $(study_car_data) --device cpu --prepare-data --data-workers "$(nproc)" >/dev/null \
    || { echo "data preparation failed"; exit 1; }
  left=$((LIMIT_S - SECONDS))
  # timeout 0 would mean no limit, a negative one fails every run at once
  [ "$left" -gt 0 ] || { echo "no time left for the runs after the data preparation (LIMIT_S=$LIMIT_S)"; exit 1; }
  for g in $(seq 0 15); do
    var="VARIANTS_$g"; [ -n "${!var:-}" ] || continue
    echo "=== GPU $g: ${!var}"
    for s in $SEEDS; do
      # shellcheck disable=SC2046,SC2086
      CUDA_VISIBLE_DEVICES=$g timeout "$left" "$PY" examples/ablate.py --variants ${!var} --seeds "$s" \
        --steps "$STEPS" --isolate --reuse --out "$WORK" --results "$OUT/tables/gpu${g}_seed$s.md" \
        -- $(study_car_data) $STUDY_NET --log-every 10 --ckpt-every 100 ${EXTRA:-} > "$OUT/tables/gpu${g}_seed$s.log" 2>&1 &
    done
  done
  wait
  echo "=== done after ${SECONDS}s"
  for f in "$OUT"/tables/*.log; do echo "--- $f"; tail -n 2 "$f"; done
} 2>&1 | tee -a "$OUT/ablate.log"
(cd "$WORK" && find . -name metrics.json -o -name train_log.csv -o -name eval_log.csv | tar czf "$OUT/ablate.tar.gz" \
  -T - -C "$OUT" tables) 2>/dev/null
rm -rf "${OUT:?}/tables"
ls -la "$OUT"
