#!/usr/bin/env bash
# The multi-seed accuracy study (issue 12) on one machine with one or more GPUs, in pieces that each
# end within a time limit: run the same command again (on the same, still warm machine) and it keeps
# every finished run and resumes the one it had to stop (compare.py --reuse, checkpoints every 100
# steps). Each dataset runs in its own compare.py on its own GPU (round robin when there are fewer
# GPUs than datasets). From the repo root, no install needed:
#   OUT=/some/dir bash examples/run_study_gpu.sh           # again and again until it says COMPLETE
#   TINY=1 OUT=/tmp/study bash examples/run_study_gpu.sh   # the same pipeline at toy sizes on a CPU
# Every call leaves in $OUT/<dataset>/: results.md (mean ± std over seeds), results.json (every run),
# compare.png, compare_time.png; and $OUT/study.log.
# Knobs (environment): STEPS (per model, default 1000), SEEDS (default "0 1 2"), MODELS (default all
# six), DATASETS (default "car elasticity-gen"; "multibody" is the long-range task, generated at
# NUM_TRAIN / NUM_TEST clouds of 3,586 points), BUDGET_S (instead of STEPS: compare.py --budget-s, with
# EQUAL_TIME=1 --equal-time), LIMIT_S (seconds of training in this call, default 510, shared by the rounds
# when there are more datasets than GPUs),
# NUM_TRAIN / NUM_TEST (default 512 / 128 for both datasets), ELAS_SNAPSHOT (elasticity-gen splits
# built elsewhere, default data/elasticity_gen_512.pt: scikit-fem, which generates them, may be
# missing on the GPU machine), EXTRA (more train.py flags), WORK (default runs/study), PARALLEL_SEEDS=1 (the
# seeds of a dataset run at once on its GPU, one compare.py each, then one aggregating compare.py), PACK=1 (leave
# $OUT as study.log + two archives: a device call brings back only a few files), GPU_IDS (the GPUs to use,
# default all: two calls with other DATASETS/MODELS can share one machine, e.g. GPU_IDS=1).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
PY=${PYTHON:-python3}
OUT=${OUT:-runs/study_out}
WORK=${WORK:-runs/study}
ROOT_DATA=${ROOT_DATA:-data}
SEEDS=${SEEDS:-0 1 2}
MODELS=${MODELS:-bsa full ball pointnet gnn ptconv}
DATASETS=${DATASETS:-car elasticity-gen}
LIMIT_S=${LIMIT_S:-510}
NUM_TRAIN=${NUM_TRAIN:-512}; NUM_TEST=${NUM_TEST:-128}
ELAS_SNAPSHOT=${ELAS_SNAPSHOT:-data/elasticity_gen_512.pt}
mkdir -p "$OUT" "$WORK"

if [ "${TINY:-0}" = 1 ]; then
  STEPS=${STEPS:-20}
  NET="--hidden 16 --layers 1 --heads 2 --batch-size 2 --ball-size 64 --cmp-block 8 --slc-block 8 --topk 2
       --group-size 8 --knn 8 --threads 1 --device cpu"
  car_data() { echo "--dataset car --num-train 8 --num-test 4 --num-points 512 --data-kw n_length=10 --data-kw n_around=10 --root $ROOT_DATA"; }
  multibody_data() { echo "--dataset multibody --num-train 8 --num-test 4 --num-points 512 --root $ROOT_DATA"; }
  elas_data() { echo "--dataset elasticity-gen --num-train 8 --num-test 4 --root $ROOT_DATA"; }
  NGPU=1
else
  STEPS=${STEPS:-1000}
  # shellcheck source=examples/study_flags.sh
  . examples/study_flags.sh
  NET=$STUDY_NET
  car_data() { study_car_data; }
  multibody_data() { study_multibody_data; }
  elas_data() {
    local snap=""; [ -f "$ELAS_SNAPSHOT" ] && snap="--snapshot $ELAS_SNAPSHOT"
    echo "--dataset elasticity-gen --data-size full --num-train $NUM_TRAIN --num-test $NUM_TEST --root $ROOT_DATA $snap"
  }
  NGPU=$(nvidia-smi -L 2>/dev/null | grep -c GPU); [ "$NGPU" -ge 1 ] || NGPU=1
fi
read -r -a GPUS <<< "${GPU_IDS:-$(seq -s ' ' 0 $((NGPU - 1)))}"
NGPU=${#GPUS[@]}
if [ -n "${BUDGET_S:-}" ]; then
  BUDGET="--budget-s $BUDGET_S --probe-steps 40${EQUAL_TIME:+ --equal-time}"
else
  BUDGET="--steps $STEPS"
fi
data_flags() { case $1 in car) car_data ;; elasticity-gen) elas_data ;; multibody) multibody_data ;;
                *) echo "--dataset $1 --root $ROOT_DATA" ;; esac; }

main() {
  echo "=== study ($(date -u +%FT%TZ)): datasets $DATASETS; models $MODELS; seeds $SEEDS; $BUDGET; $NGPU GPU(s)"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  git log -1 --format="commit %H" 2>/dev/null || true
  for ds in $DATASETS; do  # generate once (cached under $ROOT_DATA), before the parallel runs read it
    # shellcheck disable=SC2046
    "$PY" examples/train.py $(data_flags "$ds") --device cpu --prepare-data \
      $(case $ds in car|multibody) echo "--data-workers $(nproc)" ;; esac) || { echo "data for $ds failed"; return 1; }
  done
  local nds rounds i=0 pids=()
  nds=$(echo $DATASETS | wc -w); rounds=$(( (nds + NGPU - 1) / NGPU ))
  local round_s=$(( (LIMIT_S - SECONDS) / rounds ))  # data preparation came out of LIMIT_S too
  for ds in $DATASETS; do
    local gpu=${GPUS[$((i % NGPU))]}; i=$((i + 1))
    mkdir -p "$OUT/$ds"
    echo "=== $ds on GPU $gpu (at most ${round_s}s in this call)"
    # with a time budget every compare.py of this dataset reads one calibration (steps per model),
    # probed once: per-seed probes at once would disagree, and a later call would probe anew
    local cal=""; [ -n "${BUDGET_S:-}" ] && cal="--calibration $WORK/$ds/calibration.json"
    if [ "${PARALLEL_SEEDS:-0}" = 1 ]; then
      # one compare.py per seed at once on this GPU (small models leave an H200 mostly idle), then
      # one more that finds every run finished (--reuse) and writes the mean +- std tables and plots
      (
        if [ -n "$cal" ]; then
          # shellcheck disable=SC2046,SC2086
          CUDA_VISIBLE_DEVICES=$gpu timeout $((round_s / 3)) "$PY" examples/compare.py --models $MODELS \
            --seeds ${SEEDS%% *} $BUDGET $cal --calibrate-only --out "$WORK/$ds" \
            --results "$OUT/$ds/calibration.md" --json "$OUT/$ds/calibration_rows.json" \
            -- $(data_flags "$ds") $NET ${EXTRA:-} > "$OUT/$ds/calibration.log" 2>&1
        fi
        for s in $SEEDS; do
          # shellcheck disable=SC2046,SC2086
          CUDA_VISIBLE_DEVICES=$gpu timeout $((round_s - 45)) "$PY" examples/compare.py --models $MODELS --seeds $s \
            $BUDGET $cal --isolate --reuse --out "$WORK/$ds" --results "$OUT/$ds/seed$s.md" --json "$OUT/$ds/seed$s.json" \
            -- $(data_flags "$ds") $NET --log-every 10 --ckpt-every 100 ${EXTRA:-} > "$OUT/$ds/compare_seed$s.log" 2>&1 &
        done
        wait
        # shellcheck disable=SC2046,SC2086
        CUDA_VISIBLE_DEVICES=$gpu timeout 40 "$PY" examples/compare.py --models $MODELS --seeds $SEEDS $BUDGET $cal \
          --isolate --reuse --out "$WORK/$ds" --results "$OUT/$ds/results.md" --json "$OUT/$ds/results.json" \
          --title "Six models on $ds, seeds $SEEDS" \
          -- $(data_flags "$ds") $NET --log-every 10 --ckpt-every 100 ${EXTRA:-} > "$OUT/$ds/compare.log" 2>&1
      ) &
    else
      # shellcheck disable=SC2046,SC2086
      CUDA_VISIBLE_DEVICES=$gpu timeout "$round_s" "$PY" examples/compare.py --models $MODELS --seeds $SEEDS $BUDGET $cal \
        --isolate --reuse --out "$WORK/$ds" --results "$OUT/$ds/results.md" --json "$OUT/$ds/results.json" \
        --title "Six models on $ds, seeds $SEEDS" \
        -- $(data_flags "$ds") $NET --log-every 10 --ckpt-every 100 ${EXTRA:-} > "$OUT/$ds/compare.log" 2>&1 &
    fi
    pids+=($!)
    if [ $((i % NGPU)) -eq 0 ]; then wait "${pids[@]}"; pids=(); fi  # every GPU busy: wait for this round
  done
  wait "${pids[@]}" 2>/dev/null
  local complete=1
  for ds in $DATASETS; do
    cp "$WORK/$ds/compare.png" "$WORK/$ds/compare_time.png" "$OUT/$ds/" 2>/dev/null
    local n
    n=$("$PY" -c "import json,sys; r=json.load(open(sys.argv[1]))['rows']; print(sum('error' not in x for x in r))" \
        "$OUT/$ds/results.json" 2>/dev/null || echo 0)
    local want=$(( $(echo $MODELS | wc -w) * $(echo $SEEDS | wc -w) ))
    echo "=== $ds: $n of $want runs finished"
    [ "$n" -ge "$want" ] || complete=0
    tail -n 5 "$OUT/$ds/compare.log"
  done
  # a BSA or ball run on a GPU that fell back to the PyTorch reference (a Triton kernel failed to
  # build: train.py's probe warns once in its log) is slow and says nothing of the kernels: say so here
  "$PY" - "$WORK" <<'PYEOF'
import glob, json, sys
for path in sorted(glob.glob(sys.argv[1] + "/**/metrics.json", recursive=True)):
    m = json.load(open(path))
    if m.get("model") in ("bsa", "ball") and str(m.get("device", "")).startswith("cuda") and m.get("backend") == "torch":
        print(f"=== WARNING: {path} ran on the torch backend on a GPU (the Triton probe failed: see its log)")
PYEOF
  if [ $complete = 1 ]; then echo "=== STUDY COMPLETE after ${SECONDS}s"; for ds in $DATASETS; do cat "$OUT/$ds/results.md"; done
  else echo "=== not complete after ${SECONDS}s: run the same command again (finished runs are kept)"; fi
}

main 2>&1 | tee -a "$OUT/study.log"
if [ "${PACK:-0}" = 1 ]; then
  # a device call brings back only a few files: the per-dataset folders (tables, JSON, plots, every
  # run's log) and each run's metrics.json and train log travel as one archive
  (cd "$WORK" && find . -name metrics.json -o -name train_log.csv -o -name "*.png" | tar czf "$OUT/runs_metrics.tar.gz" -T -) \
    2>/dev/null
  tar czf "$OUT/study_out.tar.gz" -C "$OUT" $DATASETS 2>/dev/null
  for ds in $DATASETS; do rm -rf "${OUT:?}/$ds"; done
  ls -la "$OUT"
fi
