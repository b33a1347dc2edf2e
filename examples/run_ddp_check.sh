#!/usr/bin/env bash
# The 2-GPU data-parallel check (issue 12) in one command, on one machine with 2 GPUs (NCCL):
#   1gpu        examples/train.py on 1 GPU, global batch B
#   1gpu_seed1  the same with seed 1: the seed-to-seed spread of the loss curve (NOISE=0 skips it)
#   2gpu_half   torchrun, 2 processes of batch B/2: the same global batch, and the same clouds in every
#               step, as 1gpu, so the loss curves should agree within seed noise
#   2gpu_full   torchrun, 2 processes of batch B: the same per-GPU batch as 1gpu, for the speed-up
#   2gpu_resume 2gpu_half killed (SIGTERM to the whole torchrun group) a little after its first
#               checkpoint, then continued with --resume; it must finish all steps
# then examples/ddp_summary.py writes ddp_check.json, ddp_check.md and ddp_loss.png to $OUT (with the
# run logs). From the repo root, no install needed (PYTHONPATH is set here):
#   OUT=/some/dir bash examples/run_ddp_check.sh                 # 2 GPUs: about 4-5 minutes
#   DEVICE=cpu OUT=/tmp/ddp bash examples/run_ddp_check.sh       # the same logic on a CPU (gloo, toy data)
# Knobs (environment): STEPS (default 300 on CUDA, 60 on CPU), B (global batch, even; default 8 / 4),
# MODEL (default bsa), CKPT (checkpoint interval of the run that is killed; default 50 / 10),
# KILL_DELAY (seconds between its first checkpoint and the kill; default 2 / 0), NOISE (1: run
# 1gpu_seed1), EXTRA (more train.py flags for every run), WORK (the runs; default runs/ddp_check),
# PYTHON (default python3).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 TRITON_CACHE_AUTOTUNING=1
# a 2-GPU all-reduce of a few MB needs no NVLink multicast (NVLS); some shared hosts require it off
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PY=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-runs/ddp_check_out}
WORK=${WORK:-runs/ddp_check}
ROOT_DATA=${ROOT_DATA:-data}
MODEL=${MODEL:-bsa}
NOISE=${NOISE:-1}
if [ "$DEVICE" = cpu ]; then
  STEPS=${STEPS:-60}; B=${B:-4}; CKPT=${CKPT:-10}; KILL_DELAY=${KILL_DELAY:-0}
  export OMP_NUM_THREADS=1
  DATA="--dataset toy --num-train 8 --num-test 4 --num-points 256"
  NET="--hidden 32 --layers 2 --heads 2 --ball-size 64 --cmp-block 8 --slc-block 8 --topk 2 --group-size 8
       --knn 8 --threads 1"
  DEV="--device cpu"
else
  STEPS=${STEPS:-300}; B=${B:-8}; CKPT=${CKPT:-50}; KILL_DELAY=${KILL_DELAY:-2}
  # the small default dataset: 64 / 16 generated cars of 3,586 points (--data-size full); the small
  # model of the benchmarks (6 layers, C=128, H=4, top-k 16, groups of 8)
  DATA="--dataset car --data-size full --root $ROOT_DATA"
  NET="--hidden 128 --layers 6 --heads 4 --mlp-ratio 4 --ball-size 256 --cmp-block 8 --slc-block 8 --topk 16
       --group-size 8 --knn 16"
  DEV=""  # train.py: cuda, one GPU per local rank under torchrun
fi
if [ $((B % 2)) -ne 0 ]; then echo "B must be even (2 processes of B/2), got $B"; exit 2; fi
HALF=$((B / 2))
# eval at a quarter of the way (and at the end); a final checkpoint only, except in the killed run
COMMON="$DATA $NET --model $MODEL --steps $STEPS --log-every 10 --eval-every $((STEPS / 4)) --ckpt-every 0
        --no-progress --no-plots $DEV ${EXTRA:-}"
TORCHRUN="$PY -m torch.distributed.run --standalone --nproc-per-node 2"
mkdir -p "$OUT" "$WORK"

train1() {  # NAME FLAGS...: one process
  local name=$1; shift
  rm -rf "${WORK:?}/$name"
  echo "=== $name: train.py $* ($(date -u +%T))"
  # shellcheck disable=SC2086
  "$PY" examples/train.py $COMMON "$@" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  echo "    exit $? after ${SECONDS}s; $(grep -h 'final test MSE' "$WORK/$name.log" | tail -1)"
}

train2() {  # NAME FLAGS...: two processes
  local name=$1; shift
  rm -rf "${WORK:?}/$name"
  echo "=== $name: torchrun x2 train.py $* ($(date -u +%T))"
  # shellcheck disable=SC2086
  $TORCHRUN examples/train.py $COMMON "$@" --out "$WORK/$name" > "$WORK/$name.log" 2>&1
  echo "    exit $? after ${SECONDS}s; $(grep -h 'final test MSE' "$WORK/$name.log" | tail -1)"
}

kill_and_resume() {  # 2gpu_half, killed a little after its first checkpoint, then --resume
  local name=2gpu_resume dir="$WORK/2gpu_resume"
  rm -rf "$dir"
  echo "=== $name: torchrun x2, batch $HALF, killed after its first checkpoint (every $CKPT steps) ($(date -u +%T))"
  # its own session: the kill reaches torchrun and both workers at once, as a preemption would
  # shellcheck disable=SC2086
  setsid $TORCHRUN examples/train.py $COMMON --batch-size "$HALF" --ckpt-every "$CKPT" --out "$dir" \
    > "$WORK/${name}_killed.log" 2>&1 &
  local pid=$! waited=0
  until [ -f "$dir/checkpoint.pt" ] || ! kill -0 "$pid" 2>/dev/null || [ $waited -ge 3000 ]; do
    sleep 0.1; waited=$((waited + 1))
  done
  sleep "$KILL_DELAY"
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM -- "-$pid" 2>/dev/null
    for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -KILL -- "-$pid" 2>/dev/null  # anything that ignored SIGTERM
    echo "    killed (SIGTERM to the process group) after ${SECONDS}s"
  else
    echo "    the run ended before it could be killed: raise STEPS or lower CKPT"
  fi
  wait "$pid" 2>/dev/null
  echo "=== $name: --resume ($(date -u +%T))"
  # shellcheck disable=SC2086
  $TORCHRUN examples/train.py $COMMON --batch-size "$HALF" --ckpt-every "$CKPT" --out "$dir" --resume \
    > "$WORK/$name.log" 2>&1
  echo "    exit $? after ${SECONDS}s; $(grep -h 'resumed from' "$WORK/$name.log" | tail -1)"
}

main() {
  echo "=== environment ($(date -u +%FT%TZ)), DEVICE=$DEVICE, MODEL=$MODEL, STEPS=$STEPS, B=$B"
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no nvidia-smi"
  "$PY" -c "import torch, torch_geometric as g; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'pyg', g.__version__, 'gpus', torch.cuda.device_count())"
  if [ "$DEVICE" != cpu ]; then
    echo "=== data"
    # shellcheck disable=SC2086
    "$PY" examples/train.py $DATA --device cpu --data-workers "$(nproc)" --prepare-data || exit 1
  fi
  train1 1gpu --batch-size "$B"
  [ "$NOISE" = 1 ] && train1 1gpu_seed1 --batch-size "$B" --seed 1
  train2 2gpu_half --batch-size "$HALF"
  train2 2gpu_full --batch-size "$B"
  kill_and_resume
  echo "=== summary"
  "$PY" examples/ddp_summary.py --work "$WORK" --out "$OUT"
  cp "$WORK"/*.log "$OUT/" 2>/dev/null
  echo "=== done in ${SECONDS}s; files in $OUT: $(ls "$OUT" | tr '\n' ' ')"
}

main 2>&1 | tee "$OUT/ddp_check.log"
