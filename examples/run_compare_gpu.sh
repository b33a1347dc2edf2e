#!/usr/bin/env bash
# The five-model comparison in one command: generate the car-pressure data (in parallel processes),
# train BSA, full attention, ball attention, PointNet and the kNN GNN at one common step budget (same
# seed, data, schedule; bf16 autocast on CUDA), and leave six files in $OUT:
#   results.md  results.json  compare.png  compare.log  field_bsa.png  field_full.png
# The table is printed last. From the repo root (no install needed; PYTHONPATH is set here):
#   OUT=/some/dir bash examples/run_compare_gpu.sh             # one GPU: about 7-8 minutes in all
#   TINY=1 OUT=/tmp/cmp bash examples/run_compare_gpu.sh       # the same pipeline, tiny, on a CPU
# Knobs (environment): TOTAL_S (wall-clock limit of everything, default 520), BUDGET_S (training
# seconds of the slowest model, which sets the common step count; default 70), STEPS (a fixed step
# count instead of the timing probe), NUM_TRAIN / NUM_TEST (cars, default 512 / 128), WORKERS
# (generation processes, default: all cores), SEED, SEEDS (e.g. "0 1 2": every model once per seed, the
# table gives mean ± std), MODELS, EXTRA (more train.py flags for every model).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
OUT=${OUT:-runs/compare_gpu_out}
WORK=${WORK:-runs/compare_gpu}          # every model's checkpoint and logs (not copied to $OUT)
ROOT_DATA=${ROOT_DATA:-data}            # dataset cache (gitignored); a second run reuses it
mkdir -p "$OUT" "$WORK"

main() {
  TOTAL_S=${TOTAL_S:-520}
  SEED=${SEED:-0}
  MODELS=${MODELS:-bsa full ball pointnet gnn}
  WORKERS=${WORKERS:-$(nproc)}
  if [ "${TINY:-0}" = 1 ]; then
    DATA="--dataset car --num-train ${NUM_TRAIN:-8} --num-test ${NUM_TEST:-4} --num-points 512
          --data-kw n_length=10 --data-kw n_around=10"
    MODEL="--hidden 16 --layers 1 --heads 2 --batch-size 2 --ball-size 64 --cmp-block 4 --slc-block 4
           --topk 2 --group-size 4 --knn 8 --threads 2"
    # a fixed step count, so that the CPU table is reproducible (BUDGET_S=2 exercises the timing probe)
    BUDGET="${BUDGET_S:+--budget-s $BUDGET_S --probe-steps 4}"; BUDGET=${BUDGET:-"--steps ${STEPS:-100}"}
  else
    # 3,586 points per car as in ShapeNet-Car, 30 x 28 panel grid (the dataset's defaults)
    DATA="--dataset car --data-size full --num-train ${NUM_TRAIN:-512} --num-test ${NUM_TEST:-128}"
    # BSA sizes: the paper's ball 256, blocks 8, top-16, groups of 8; heads of dimension 32
    MODEL="--hidden 128 --layers 6 --heads 4 --mlp-ratio 4 --batch-size 8 --ball-size 256 --cmp-block 8
           --slc-block 8 --topk 16 --group-size 8 --knn 16 --lr 1e-3"
    BUDGET="${STEPS:+--steps $STEPS}"; BUDGET=${BUDGET:-"--budget-s ${BUDGET_S:-70} --probe-steps 40"}
  fi
  # shellcheck disable=SC2086
  if [ -n "${SEEDS:-}" ]; then SEEDING=""; SEED_ARGS="--seeds $SEEDS"; else SEEDING="--seed $SEED"; SEED_ARGS=""; fi
  COMMON="$DATA --root $ROOT_DATA $MODEL $SEEDING --log-every 10 --ckpt-every 0 ${EXTRA:-}"

  echo "=== environment ($(date -u +%FT%TZ))"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  python -c "import torch, torch_geometric as g; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
  'pyg', g.__version__, 'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'cpu')"
  python -c "import triton; print('triton', triton.__version__)" 2>/dev/null || echo "no triton"

  echo "=== data ($WORKERS generation processes)"
  # shellcheck disable=SC2086
  timeout 300 python examples/train.py $COMMON --device cpu --data-workers "$WORKERS" --prepare-data \
    || { echo "parallel generation failed; generating in one process"
         python examples/train.py $COMMON --device cpu --prepare-data; }

  LEFT=$((TOTAL_S - SECONDS - 15))
  echo "=== compare ($LEFT s left of TOTAL_S=$TOTAL_S)"
  # --isolate: each model in its own process, so a CUDA fault in one kernel cannot take the others down;
  # --deadline-s shrinks the remaining models' time caps if the run falls behind; `timeout` is the last guard
  # shellcheck disable=SC2086
  timeout $((LEFT + 10)) python examples/compare.py --models $MODELS $BUDGET $SEED_ARGS --deadline-s "$LEFT" --isolate \
    --out "$WORK" --results "$OUT/results.md" --json "$OUT/results.json" \
    --title "BSA vs full attention, ball attention, PointNet and a kNN GNN on generated car pressure" \
    -- $COMMON
  rc=$?
  cp "$WORK/compare.png" "$WORK/compare_time.png" "$OUT/" 2>/dev/null
  for m in bsa full; do
    f="$WORK/$m/field.png"; [ -f "$f" ] || f="$(ls "$WORK/$m"/seed*/field.png 2>/dev/null | head -1)"
    cp "$f" "$OUT/field_$m.png" 2>/dev/null
  done
  echo "=== done in ${SECONDS}s (compare exit code $rc); files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
  echo
  cat "$OUT/results.md" 2>/dev/null || echo "no results.md"
}

main 2>&1 | tee "$OUT/compare.log"
