#!/usr/bin/env bash
# The GPU measurements in one call, for a session lent an accelerator:
#
#     bash bench/carry_ffcv.sh             # here, once: FFCV (and TorchCodec) into .h200/ (ignored)
#     bash bench/accelerator.sh            # there (device tool, carry [".h200"], timeout_s=560,
#                                          #   PYTHONUNBUFFERED=1); results in $OUT
#
# Stages in order of what matters most, each under its own time limit, and skipped (saying so)
# when less than its limit is left of BUDGET_S, so the call ends inside the device tool's limit:
#   1. a synthetic ImageNet-layout dataset (convert/make_sample.py, CLASSES x PER_CLASS train
#      images at 512 px, all cores), its shards (and its .beton when LOADERS has ffcv)
#   2. pytest of the CUDA-only tests (graph capture, fp16 scaler under graphs, train.py under
#      torchrun with --cuda-graphs, nvJPEG batches against the CPU's)
#   3. train_fps --decode device --cuda-graphs: model only (eager, graphed) and end to end with
#      the torchvision loader decoding on the GPU (its stall against the graphed step)
#   4. train_fps --cuda-graphs --batch-sizes: eager and graphed model only at 256, 512, 1024
#   5. decode_agreement: device-decoded batches against the CPU-decoded ones (pixels, labels)
#   6. step_agreement: 200 steps graphed against eager from the same seed (loss curves)
#   7. train.py itself under torchrun (nccl, 1 process): bf16 with and without --cuda-graphs,
#      fp16 (loss scaler) with them, --decode device, --max_steps
#   8. loader_fps --device cuda --device-decode: the device-decode loader alone, its host cores
#   9. train_fps --compile-modes (COMPILE=1): torch.compile's modes against eager
#  10. bench/accelerator_checks.py: the issues' "done when" checks from those JSONs (checks.json)
# What comes back (the device tool returns at most 8 files): accelerator.log, checks.json and
# results.tar.gz (every JSON, PNG and train.py summary, under OUT's names).
#
# The lent machine has torch, torchvision, numba, cv2 and pytest but no package index, and the
# project is not installed there: PYTHONPATH gets the checkout. DALI's wheel is too large to carry;
# FFCV comes from bench/carry_ffcv.sh (package, pure-Python needs, the Debian libraries it links)
# on PYTHONPATH and LD_LIBRARY_PATH, TorchCodec too where it imports with that machine's torch.
# Knobs (environment): OUT (default out/bench/accelerator, not tracked), DATA, CLASSES, PER_CLASS,
# STEPS, ROUNDS, BUDGET_S, COMPILE, COMPILE_MODES, LOADERS, CARRY, WORKERS, DECODE_WORKERS, PYTHON,
# DEVICE (cuda; cpu runs the same plumbing small, as a check on a machine without one:
# DEVICE=cpu CLASSES=2 PER_CLASS=16 STEPS=2 ROUNDS=1 COMPILE=0 bash bench/accelerator.sh).
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
BUDGET_S=${BUDGET_S:-530}  # the device tool's timeout_s (560) less the packing at the end
COMPILE=${COMPILE:-1}  # 0 skips stage 9
COMPILE_MODES=${COMPILE_MODES:-default,reduce-overhead}  # max-autotune-no-cudagraphs autotunes for minutes
LOADERS=${LOADERS:-torchvision}  # the CPU-decode loaders' baseline is in bench/results/h200_train_fps.json
WORKERS=${WORKERS:-$(nproc)}
DECODE_WORKERS=${DECODE_WORKERS:-3}  # host workers that read bytes when the GPU decodes (<= 4 cores in all)
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
WORK=$OUT/work  # everything measured; packed into results.tar.gz at the end
mkdir -p "$WORK"
LOG=$OUT/accelerator.log
: >"$LOG"
status=0
start_s=$SECONDS

stage() {  # stage NAME SECONDS COMMAND...: run under a time limit if the budget allows, log it
  local name=$1 limit=$2
  shift 2
  if [ $((BUDGET_S - (SECONDS - start_s))) -lt "$limit" ]; then
    echo "== $name: skipped, $((BUDGET_S - (SECONDS - start_s))) s of the budget left, it may take ${limit}s" | tee -a "$LOG"
    return 1
  fi
  echo "== $name (limit ${limit}s, at $((SECONDS - start_s)) s): $*" | tee -a "$LOG"
  local t=$SECONDS
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  local rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc after $((SECONDS - t)) s" | tee -a "$LOG"
  [ "$rc" -eq 0 ]
}

if [ -d "$CARRY/torchcodec" ]; then
  if PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH" $PYTHON -c "from torchcodec.decoders import decode_jpeg" 2>>"$LOG"; then
    export PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH"
  else
    echo "the carried torchcodec does not import with this torch: decoding with torchvision.io" | tee -a "$LOG"
  fi
fi
$PYTHON - <<'EOF' 2>&1 | tee -a "$LOG"
import os, platform, torch, torchvision
from loaders.device_decode import DECODER
print("python", platform.python_version(), "torch", torch.__version__, "torchvision", torchvision.__version__,
      "cores", len(os.sched_getaffinity(0)), "decoder", DECODER)
print("cuda", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "",
      "nccl", torch.cuda.nccl.version() if torch.cuda.is_available() else "")
EOF

if [ ! -d "$DATA/train" ]; then
  stage make_sample 150 $PYTHON convert/make_sample.py "$DATA" --classes "$CLASSES" \
    --train-per-class "$PER_CLASS" --val-per-class 2 --workers "$WORKERS" || status=1
fi
stage to_shards 120 $PYTHON convert/to_shards.py "$DATA" --workers "$WORKERS" || status=1
case $LOADERS in *ffcv*)
  stage to_ffcv 120 $PYTHON convert/to_ffcv.py "$DATA" --workers "$WORKERS" || status=1 ;;
esac

if [ "$DEVICE" = cpu ]; then
  arch=mobilenetv3_small_100 px=64 batch=16 sizes=32
  agree=(--arch mobilenetv3_small_100 --image-size 32 --batch-size 4 --steps 4 --classes 10)
else
  arch=mobilenetv3_large_100 px=224 batch=256 sizes=512,1024
  agree=(--steps 200)
fi
common=(--device "$DEVICE" --data "$DATA" --arch $arch --image-size $px --batch-size $batch --amp --amp-dtype bfloat16
        --steps "$STEPS" --rounds "$ROUNDS" --no-augment)

if [ "$DEVICE" != cpu ]; then
  stage pytest_cuda 150 $PYTHON -m pytest -q -rs -p no:cacheprovider tests/test_step.py tests/test_device_decode.py \
    -k "cuda or graphed or nvjpeg" || status=1
fi
stage train_fps_device 150 $PYTHON bench/train_fps.py "${common[@]}" --loaders torchvision --decode device \
  --workers "$DECODE_WORKERS" --cuda-graphs --json "$WORK/train_fps_device.json" || status=1
stage train_fps_graphs 150 $PYTHON bench/train_fps.py "${common[@]}" --loaders "" --cuda-graphs \
  --batch-sizes "$sizes" --json "$WORK/train_fps_graphs.json" || status=1
stage decode_agreement 60 $PYTHON bench/decode_agreement.py --device "$DEVICE" --data "$DATA" --epochs 2 \
  --image-size $px --batch-size $batch --workers "$WORKERS" --json "$WORK/decode_agreement.json" || status=1
stage step_agreement 90 $PYTHON bench/step_agreement.py --device "$DEVICE" --amp-dtype bfloat16 "${agree[@]}" \
  --json "$WORK/step_agreement.json" || status=1
for run in bf16_graphs:bfloat16:--cuda-graphs bf16_eager:bfloat16: fp16_graphs:float16:--cuda-graphs; do
  IFS=: read -r name dtype graphs <<<"$run"
  stage "train_$name" 90 $PYTHON -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    --device "$DEVICE" --data "$DATA" --loader torchvision --decode device --workers "$DECODE_WORKERS" \
    --arch $arch --image-size $px --batch_size $batch --apex --amp-dtype "$dtype" $graphs --epochs 1 \
    --max_steps 40 --print-freq 10 \
    --checkpoint-every 0 --output-dir "$WORK/train_$name" --overwrite || status=1
done
stage loader_fps 120 $PYTHON bench/loader_fps.py --device "$DEVICE" --data "$DATA" --loaders torchvision \
  --device-decode --device-decode-workers "$DECODE_WORKERS" --workers "$WORKERS" --batch-size $batch \
  --image-size $px --epochs 2 --json "$WORK/loader_fps.json" || status=1
if [ "$COMPILE" = 1 ]; then
  stage train_fps_compile 200 $PYTHON bench/train_fps.py "${common[@]}" --loaders "" \
    --compile-modes "$COMPILE_MODES" --json "$WORK/train_fps_compile.json" || status=1
fi
$PYTHON bench/accelerator_checks.py "$WORK" 2>&1 | tee -a "$LOG"
cp "$WORK/checks.json" "$OUT/" 2>/dev/null
# the trainers' checkpoints stay behind: only what a reader needs comes back
tar -czf "$OUT/results.tar.gz" -C "$WORK" --exclude='*.pth' --exclude='tensorboard' . || status=1
echo "== done in $((SECONDS - start_s)) s, status $status; $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
rm -rf "$WORK"
exit $status
