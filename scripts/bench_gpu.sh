#!/usr/bin/env bash
# Every GPU measurement of issue 5 in one run (about 6-8 minutes on one H200):
#   training: SD 1.5 architecture (random weights), 512 px, bf16, plain loop vs cvgen vs
#             cvgen + cached latents, with FLOPs and MFU against the device's bf16 peak;
#   serving:  img2img, 30 steps x strength 0.6, bf16, compiled UNet, channels_last,
#             batch 1 latency and throughput for max_batch_size 1/2/4/8 at 8 concurrent.
# Figures go to stdout and benchmarks/*-gpu.json.
# CPU smoke test of this same script (tiny model, a few steps):  SMOKE=1 scripts/bench_gpu.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-benchmarks}
mkdir -p "$OUT"
if [[ "${SMOKE:-0}" == 1 ]]; then
  TRAIN=(--arch tiny --device cpu --precision 32-true --batch-size 2 --steps 2 --warmup 1 --images 8 --workers 0)
  SERVE=(--arch tiny --device cpu --dtype float32 --steps 10 --latency-requests 3 --batch-sizes 1,4 --concurrency 4 --rounds 1)
  SUFFIX=smoke
else
  PEAK=${PEAK_TFLOPS:-790}   # H200 dense bf16; set PEAK_TFLOPS for other GPUs (A100: 312, H100: 989)
  TRAIN=(--arch sd15 --device cuda --precision bf16-mixed --resolution 512 --batch-size 8 --steps 10 --warmup 3 --images 64 --workers 4 --threads 0 --channels-last --flops --peak-tflops "$PEAK")
  SERVE=(--arch sd15 --device cuda --dtype bfloat16 --steps 30 --strength 0.6 --latency-requests 10 --batch-sizes 1,2,4,8 --concurrency 1,8 --rounds 3 --compile --channels-last)
  SUFFIX=gpu
fi
WORK=${WORK:-/tmp/cvgen-bench-$SUFFIX}
echo "== bench_train ($SUFFIX)"
timeout 300 "$PY" scripts/bench_train.py "${TRAIN[@]}" --fresh-cache --workdir "$WORK" --json "$OUT/train-$SUFFIX.json"
echo "== bench_serve ($SUFFIX)"
timeout 300 "$PY" scripts/bench_serve.py "${SERVE[@]}" --workdir "$WORK" --json "$OUT/serve-$SUFFIX.json"
