#!/usr/bin/env bash
# The GPU check of the training path: a random model of the full SD 1.5 architecture, trained
# with configs/lora.yaml (bf16-mixed, 512 px) for a few dozen steps; prints the step time and
# peak GPU memory (the StepStats summary) and writes them to $OUT_DIR/gpu_train_check.txt.
#
#   scripts/gpu_train_check.sh                 # on a CUDA machine, from the repo root
#   ARCH=tiny RES=64 STEPS=6 ACCEL=cpu PRECISION=32-true scripts/gpu_train_check.sh   # CPU dry run
# On a machine without the venv (its own torch, cvgen's wheels from scripts/wheelhouse.py):
#   PYTHONPATH=$PWD:/tmp/site CVGEN="python3 -m cvgen.cli" LOGGER=false scripts/gpu_train_check.sh
set -euo pipefail
cd "$(dirname "$0")/.."
BIN=${BIN:-.venv/bin}
read -ra CVGEN <<<"${CVGEN:-$BIN/cvgen}"
# LOGGER=false trains without the W&B logger (for a machine without wandb)
LOGGER_ARGS=()
[[ -n "${LOGGER:-}" ]] && LOGGER_ARGS=(--trainer.logger "$LOGGER")
ARCH=${ARCH:-sd15}
RES=${RES:-512}
STEPS=${STEPS:-40}
BATCH=${BATCH:-4}
ACCEL=${ACCEL:-gpu}
PRECISION=${PRECISION:-bf16-mixed}
OUT_DIR=${OUT_DIR:-runs/gpu-check}
WORK=${WORK:-$(mktemp -d)}
mkdir -p "$OUT_DIR"
export WANDB_MODE=offline DVC_NO_ANALYTICS=1

test -f "$WORK/model/model_index.json" || "${CVGEN[@]}" model random --arch "$ARCH" --out "$WORK/model"
test -f "$WORK/data/metadata.jsonl" || "${CVGEN[@]}" data sample --out "$WORK/data" --size "$RES"

"${CVGEN[@]}" fit --config configs/lora.yaml "${LOGGER_ARGS[@]}" \
  --model.base "$WORK/model" --data.root "$WORK/data" \
  --data.resolution "$RES" --data.batch_size "$BATCH" --data.num_workers 2 \
  --data.val_fraction 0.25 --data.bucketing false \
  --trainer.accelerator "$ACCEL" --trainer.precision "$PRECISION" \
  --trainer.max_steps "$STEPS" --trainer.val_check_interval "$STEPS" \
  --trainer.default_root_dir "$OUT_DIR" --trainer.enable_progress_bar false \
  --samples.num_images 1 --samples.at_start false \
  --stats.warmup_steps 5 2>&1 | tee "$OUT_DIR/fit.log"

{
  echo "date: $(date -u +%Y-%m-%dT%H:%MZ)"
  echo "command: ARCH=$ARCH RES=$RES STEPS=$STEPS BATCH=$BATCH ACCEL=$ACCEL PRECISION=$PRECISION $0"
  (nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "no GPU")
  grep -E "speed:|trained" "$OUT_DIR/fit.log"
} | tee "$OUT_DIR/gpu_train_check.txt"
