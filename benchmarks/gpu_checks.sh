#!/usr/bin/env bash
# Every GPU check of the project in one run, for a lent GPU machine (see README, Development).
# Writes JSON under $OUT (default benchmarks/results/gpu) and prints the tables.
#   bash benchmarks/gpu_checks.sh
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
PY="${PY:-.venv/bin/python}"
"$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))"
# UNI2-h architecture (random weights): encoder + point query vs bare forward, bf16 autocast; target >= 0.9
"$PY" benchmarks/encode_query_speed.py --encoders uni2-h efficientnet-lite0 --device cuda --grid 16 --batch 64 --reps 3
cp benchmarks/results/encode_query_speed.json "$OUT/"
# the test suite on the GPU machine (CUDA code paths: AMP training, autocast features)
"$PY" -m pytest -q -x
