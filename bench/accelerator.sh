#!/usr/bin/env bash
# The GPU measurements in one call, for a session lent an accelerator:
#
#     bash bench/carry_ffcv.sh             # here, once: FFCV and its libraries into .h200/ (ignored)
#     bash bench/accelerator.sh            # there (device tool, carry [".h200"]); results in $OUT
#
# Stages, each under its own time limit so one failure costs only its own minutes:
#   1. a synthetic ImageNet-layout dataset (convert/make_sample.py, CLASSES x PER_CLASS train
#      images, all cores), its shards, and its .beton when FFCV imports; then 3 batches read onto
#      the device with each loader, which drops a loader that imports but cannot run there
#   2. bench/train_fps.py: mobilenetv3_large_100, 224 px, bf16 autocast, channels_last, batch 256:
#      model only, model + augment (the augmentation's share of a step), end to end per loader
#   3. bench/augment_cost.py at batch 256, 224 px: the augmentation's GPU cost per image
#   4. bench/train_fps.py again with --compile
#   5. bench/loader_fps.py over all the machine's cores: the loaders alone, against the stock
#      pipeline and the decode limit
#
# The lent machine has torch, torchvision, numba and cv2 but no package index, and the project is
# not installed there: PYTHONPATH gets the checkout. DALI's wheel is too large to carry; FFCV is
# carried by bench/carry_ffcv.sh (package, pure-Python needs, the Debian libraries it links) and
# put on PYTHONPATH and LD_LIBRARY_PATH here. Knobs (environment): OUT (default out/bench/accelerator,
# not tracked), DATA, CLASSES, PER_CLASS, STEPS, ROUNDS, COMPILE, CARRY, WORKERS, PYTHON, DEVICE
# (cuda; cpu runs the same plumbing small, as a check on a machine without one:
# DEVICE=cpu CLASSES=2 PER_CLASS=16 STEPS=2 ROUNDS=1 COMPILE=0 bash bench/accelerator.sh).
# Run it with the device tool's timeout_s=560 and PYTHONUNBUFFERED=1.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
DEVICE=${DEVICE:-cuda}
OUT=${OUT:-out/bench/accelerator}
DATA=${DATA:-/tmp/mnv3_accelerator_data}
CLASSES=${CLASSES:-20}
PER_CLASS=${PER_CLASS:-640}  # 12,800 train images: 50 steps of 256 per epoch
STEPS=${STEPS:-100}
ROUNDS=${ROUNDS:-3}
COMPILE=${COMPILE:-1}  # 0 skips the --compile run
WORKERS=${WORKERS:-$(nproc)}
CARRY=${CARRY:-.h200}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # import core, loaders, engine, ... without an install
if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$PWD/$CARRY/site${PYTHONPATH:+:$PYTHONPATH}"
  # Only the carried libraries this machine lacks: a carried libz or libX11 must not shadow newer
  # system ones that other libraries (torch's, the driver's) were built against.
  libs=$(mktemp -d)
  for lib in "$CARRY"/lib/*; do
    ldconfig -p 2>/dev/null | grep -q "^[[:space:]]*$(basename "$lib") " || ln -s "$PWD/$lib" "$libs/"
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
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
  [ "$rc" -eq 0 ]
}

$PYTHON - <<'EOF' 2>&1 | tee -a "$LOG"
import os, platform, torch, torchvision
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cores", len(os.sched_getaffinity(0)))
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")
EOF

loaders=torchvision
if $PYTHON -c "import nvidia.dali" 2>/dev/null; then loaders="$loaders,dali"
else echo "skipping the DALI loader: nvidia.dali does not import here" | tee -a "$LOG"; fi
if $PYTHON -c "import ffcv.libffcv" 2>>"$LOG"; then loaders="$loaders,ffcv"
else echo "skipping the FFCV loader: ffcv does not import here (bench/carry_ffcv.sh, then carry $CARRY)" | tee -a "$LOG"; fi

if [ ! -d "$DATA/train" ]; then
  stage make_sample 180 $PYTHON convert/make_sample.py "$DATA" --classes "$CLASSES" \
    --train-per-class "$PER_CLASS" --val-per-class 2 --workers "$WORKERS" || status=1
fi
stage to_shards 180 $PYTHON convert/to_shards.py "$DATA" --workers "$WORKERS" || status=1
case $loaders in *ffcv*) stage to_ffcv 180 $PYTHON convert/to_ffcv.py "$DATA" --workers "$WORKERS" || status=1 ;; esac

runs=""  # each loader reads 3 batches onto the device first: one that cannot run there is dropped
for name in ${loaders//,/ }; do
  if stage "read_$name" 120 $PYTHON - "$name" "$DATA" "$DEVICE" "$WORKERS" <<'EOF'
import sys, time
import torch
from loaders import build_loader
name, data, device, workers = sys.argv[1], sys.argv[2], torch.device(sys.argv[3]), int(sys.argv[4])
start = time.perf_counter()
loader = build_loader(name, split="train", data=data, batch_size=64, workers=workers, image_size=224, device=device)
loader.set_epoch(0)
for i, (images, labels) in enumerate(loader):
    print(name, i, tuple(images.shape), images.dtype, images.device, f"{time.perf_counter() - start:.1f} s")
    if i == 2:
        break
EOF
  then runs="${runs:+$runs,}$name"
  else status=1; echo "dropping the $name loader: it could not read 3 batches here" | tee -a "$LOG"; fi
done

if [ "$DEVICE" = cpu ]; then
  size=(--arch mobilenetv3_small_100 --image-size 64 --batch-size 16)
  cost=(--batch 16 --image-size 64 --repeats 2)
  loader=(--batch-size 16 --image-size 64)
else
  size=(--arch mobilenetv3_large_100 --image-size 224 --batch-size 256)
  cost=(--batch 256 --image-size 224)
  loader=(--batch-size 64 --image-size 224)
fi
common=(--device "$DEVICE" --data "$DATA" --loaders "$runs" "${size[@]}" --amp --amp-dtype bfloat16
        --workers "$WORKERS" --steps "$STEPS" --rounds "$ROUNDS")
stage train_fps 200 $PYTHON bench/train_fps.py "${common[@]}" --json "$OUT/train_fps.json" || status=1
stage augment_cost 90 $PYTHON bench/augment_cost.py "${cost[@]}" --json "$OUT/augment_cost.json" || status=1
if [ "$COMPILE" = 1 ]; then
  stage train_fps_compile 240 $PYTHON bench/train_fps.py "${common[@]}" --compile \
    --json "$OUT/train_fps_compile.json" --png "$DATA/train_fps_compile.png" || status=1  # 8 files come back
fi
stage loader_fps 150 $PYTHON bench/loader_fps.py --data "$DATA" --loaders "$runs" --workers "$WORKERS" \
  "${loader[@]}" --epochs 2 --json "$OUT/loader_fps.json" || status=1
exit $status
