#!/usr/bin/env bash
# Every GPU check and benchmark of the project in one run, for a GPU machine (README, Development).
#
#   [STEPS="speed ablation-train ablation-score pytest"] bash benchmarks/gpu_checks.sh
#
# (a step's parts can be chosen alone, e.g. STEPS="speed:detector pytest")
# speed           encoder + point query vs bare forward (UNI2-h architecture and EfficientNet-Lite0,
#                 random weights, bf16 autocast; target >= 0.9), detector and whole-pipeline
#                 throughput of the shipped models on BRCA-M2C $SPEED_SPLIT images (with a host-side
#                 profile of the pipeline), detector training crops/s with 0/4/8 loader workers
#                 (first $TRAIN_SPEED_IMAGES BRCA-M2C train images), and the slide targets
#                 (benchmarks/gpu_slide_speed.py: UNI2-h architecture and the default models end to
#                 end on a BRCA-M2C test slide in s/mm², against the bare encoder's windows/s, the
#                 detector stage, GPU busy fraction, GPU memory per batch and the largest batch;
#                 bf16 + torch.compile; DEVICE=cpu runs its --smoke setting)
# ablation-train  the detector backbone/matcher ablation (benchmarks/detector_ablation.py), all
#                 variants at once on the one GPU, $ABLATION_EPOCHS epochs, stopped after
#                 $ABLATION_DEADLINE_S s
# ablation-score  val and test F1 of each ablation run (test only where its images are present)
# pytest          the test suite with CUDA visible (training and featurizer default to cuda)
#
# Needs CUDA, the BRCA-M2C folder under $DENUC_DATA (or ../shared/data) and a python with the
# package's dependencies ($PY; default .venv/bin/python, else python3; src/ is put on PYTHONPATH
# so an uninstalled checkout works). Logs and JSON go to $OUT (default benchmarks/results/gpu).
# A failing step is reported in $OUT/steps.txt and the next step still runs.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results/gpu}"
mkdir -p "$OUT"
if [[ -z "${PY:-}" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
STEPS="${STEPS:-speed ablation-train ablation-score pytest}"
SPEED_SPLIT="${SPEED_SPLIT:-test}"
TRAIN_SPEED_IMAGES="${TRAIN_SPEED_IMAGES:-16}"
ABLATION_VARIANTS="${ABLATION_VARIANTS:-shufflenetv2_0.5x shufflenetv2_1.0x shufflenetv2_1.5x shufflenetv2_2.0x resnet50 efficientnet-lite0 efficientnet-lite0:hungarian}"
ABLATION_EPOCHS="${ABLATION_EPOCHS:-15}"
ABLATION_DEADLINE_S="${ABLATION_DEADLINE_S:-0}"
ABLATION_ROOT="${ABLATION_ROOT:-runs/ablation_gpu}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

step() {  # step GROUP[:PART] COMMAND...: run when GROUP or GROUP:PART is in $STEPS; log to $OUT/log.txt and $OUT/steps.txt
    local name=$1 t0 rc
    shift
    [[ " $STEPS " == *" ${name%%:*} "* || " $STEPS " == *" $name "* ]] || return 0
    echo "== $name: $*" | tee -a "$OUT/log.txt"
    t0=$(date +%s)
    "$@" 2>&1 | tee -a "$OUT/log.txt"
    rc=${PIPESTATUS[0]}
    echo "== $name rc $rc in $(($(date +%s) - t0)) s" | tee -a "$OUT/log.txt" "$OUT/steps.txt"
}

DEVICE="${DEVICE:-cuda}"  # DEVICE=cpu runs the same steps without a GPU (to try the script itself)
if [[ $DEVICE == cuda* ]]; then
    "$PY" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name(0))" \
        2>&1 | tee -a "$OUT/log.txt" || exit 1
fi

step speed:encode "$PY" benchmarks/encode_query_speed.py --encoders uni2-h efficientnet-lite0 --device "$DEVICE" --grid 16 \
    --batch 64 --reps 3
step speed:detector "$PY" benchmarks/detector_speed.py --device "$DEVICE" --split "$SPEED_SPLIT" --threads 4 --tta 1 4 --reps 3 \
    --batch 0 16 --window 256 1024
# shellcheck disable=SC2086
step speed:pipeline "$PY" benchmarks/pipeline_speed.py --device "$DEVICE" --split "$SPEED_SPLIT" --threads 4 --tta 1 4 \
    --reps 3 --profile 30 ${PIPELINE_SPEED_ARGS:-}
# shellcheck disable=SC2046,SC2086
step speed:slide "$PY" benchmarks/gpu_slide_speed.py --device "$DEVICE" --encoders default uni2-h --batch 64 --compile \
    $([[ $DEVICE == cpu ]] && echo --smoke) ${GPU_SLIDE_ARGS:-}
step speed:train "$PY" benchmarks/detector_train_speed.py --device "$DEVICE" --images "$TRAIN_SPEED_IMAGES" --workers 0 4 8 \
    --steps 40
# shellcheck disable=SC2086
step ablation-train "$PY" benchmarks/detector_ablation.py train --variants $ABLATION_VARIANTS --mpp 0.25 \
    --epochs "$ABLATION_EPOCHS" --concurrent --threads 2 --deadline-s "$ABLATION_DEADLINE_S" --out-root "$ABLATION_ROOT" \
    --device "$DEVICE" ${ABLATION_ARGS:-}
step ablation-score "$PY" benchmarks/detector_ablation.py score --device "$DEVICE" --out-root "$ABLATION_ROOT"
# shellcheck disable=SC2086
step pytest "$PY" -m pytest -q -x -p no:cacheprovider ${PYTEST_ARGS:-}
for f in encode_query_speed "detector_speed_${DEVICE%%:*}" "pipeline_speed_${DEVICE%%:*}" \
    "detector_train_speed_${DEVICE%%:*}" "gpu_slide_speed_${DEVICE%%:*}" detector_ablation; do
    [[ -f benchmarks/results/$f.json ]] && cp "benchmarks/results/$f.json" "$OUT/"
done
true
