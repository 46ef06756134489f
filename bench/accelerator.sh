#!/usr/bin/env bash
# The accelerator measurements of issues 7 and 8 in one call, for a session lent a GPU:
#
#     bash bench/accelerator.sh            # on the lent machine; results in $OUT (or bench/results/accelerator)
#
# What runs, each stage under its own time limit so one failure costs only its own minutes:
#   1. a synthetic ImageNet-layout dataset (convert/make_sample.py, CLASSES x PER_CLASS train
#      images, all cores) and its shards; the .beton too when FFCV imports
#   2. bench/train_fps.py: mobilenetv3_large_100, 224 px, bf16 autocast, channels_last, batch 256:
#      model only, model + augment (the recipe's AutoAugment + erasing: issue 7's "share of step
#      time"), and end to end with every loader that imports there; then again with --compile
#   3. bench/augment_cost.py at batch 256, 224 px: the augmentation's GPU cost per image
#
# The lent H200 (device tool, KINDS.md) has Python 3.12 with torch, torchvision, numba, cv2 and
# no package index: DALI's wheel (~790 MB installed) cannot travel (64 MiB per call) and FFCV
# needs Debian's libturbojpeg and libopencv, so there the torchvision loader is the only one that
# runs; the script says which loaders it skips and why. Knobs (environment): OUT, DATA, CLASSES,
# PER_CLASS, STEPS, ROUNDS, COMPILE, DEVICE (cuda; cpu runs the same plumbing small, for a check here),
# PYTHON. Budget on the H200: ~1 min dataset, ~3 min train_fps, ~4 min with --compile, <1 min
# augment_cost; run it with the device tool's timeout_s=560 and PYTHONUNBUFFERED=1.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-bench/results/accelerator}
DATA=${DATA:-/tmp/mnv3_accelerator_data}
CLASSES=${CLASSES:-20}
PER_CLASS=${PER_CLASS:-640}  # 12,800 train images: 50 steps of 256 per epoch
STEPS=${STEPS:-100}
ROUNDS=${ROUNDS:-3}
COMPILE=${COMPILE:-1}  # 0 skips the --compile run
WORKERS=${WORKERS:-$(nproc)}
mkdir -p "$OUT"
status=0

# One log: the device tool brings back at most 8 files (the JSONs, their PNGs, this log).
LOG=$OUT/accelerator.log
: >"$LOG"

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit, log it, go on after a failure
  local name=$1 limit=$2
  shift 2
  echo "== $name (limit ${limit}s): $*" | tee -a "$LOG"
  local start=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc after $((SECONDS - start)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ] || status=1
}

$PYTHON - <<'EOF' 2>&1 | tee -a "$LOG"
import platform, torch, torchvision
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

loaders=torchvision
if $PYTHON -c "import nvidia.dali" 2>/dev/null; then loaders="$loaders,dali"
else echo "skipping the DALI loader: nvidia.dali does not import here" | tee -a "$LOG"; fi
if $PYTHON -c "import ffcv" 2>/dev/null; then loaders="$loaders,ffcv"
else echo "skipping the FFCV loader: ffcv does not import here" | tee -a "$LOG"; fi

if [ ! -d "$DATA/train" ]; then
  stage make_sample 180 $PYTHON convert/make_sample.py "$DATA" --classes "$CLASSES" \
    --train-per-class "$PER_CLASS" --val-per-class 2 --workers "$WORKERS"
fi
stage to_shards 180 $PYTHON convert/to_shards.py "$DATA" --workers "$WORKERS"
case $loaders in *ffcv*) stage to_ffcv 180 $PYTHON convert/to_ffcv.py "$DATA" --workers "$WORKERS" ;; esac

if [ "$DEVICE" = cpu ]; then
  size=(--arch mobilenetv3_small_100 --image-size 64 --batch-size 16)
else
  size=(--arch mobilenetv3_large_100 --image-size 224 --batch-size 256)
fi
common=(--device "$DEVICE" --data "$DATA" --loaders "$loaders" "${size[@]}" --amp --amp-dtype bfloat16
        --workers "$WORKERS" --steps "$STEPS" --rounds "$ROUNDS")
stage train_fps 240 $PYTHON bench/train_fps.py "${common[@]}" --json "$OUT/train_fps.json"
[ "$COMPILE" = 1 ] && stage train_fps_compile 270 $PYTHON bench/train_fps.py "${common[@]}" --compile --json "$OUT/train_fps_compile.json"
if [ "$DEVICE" = cpu ]; then
  stage augment_cost 120 $PYTHON bench/augment_cost.py --batch 16 --image-size 64 --repeats 2 --json "$OUT/augment_cost.json"
else
  stage augment_cost 120 $PYTHON bench/augment_cost.py --batch 256 --image-size 224 --json "$OUT/augment_cost.json"
fi
exit $status
