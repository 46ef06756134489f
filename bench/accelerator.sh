#!/usr/bin/env bash
# The GPU measurements in one call of about 330 s, and its rehearsal on this machine's CPU:
#
#     bash bench/carry_ffcv.sh               # here, once: what the H200 lacks into .h200/ (ignored)
#     bash bench/accelerator.sh              # there: device run, carry [".h200"], timeout_s 420,
#                                            #   PYTHONUNBUFFERED=1; what comes back is in $OUT
#     bash bench/accelerator.sh --rehearse   # here: the whole call on the CPU in the H200's software
#
# Stages in order of value (bench/README.md, "Prepared for the next accelerator"), each under its
# limit cut to what is left of BUDGET_S, skipped (saying so) when under MIN_S is left: a fatal
# preflight (bench/accelerator_checks.py), the dataset in the background, the CUDA tests, train.py,
# loss agreement, train_fps, decode agreement, the graphs sweep, FFCV, fp16, compile (COMPILE=1).
# After every stage what was measured is packed into the three files that come back:
# accelerator.log, checks.json, results.tar.gz. The H200 has torch 2.11 but no package index and
# no install of this project: PYTHONPATH gets the checkout and CARRY/site (bench/carry_ffcv.sh),
# LD_LIBRARY_PATH the carried libraries it lacks. --rehearse: once, a virtualenv of the H200's
# torch and the listed packages the call uses (out/), then the call with the CPU as the device,
# tiny, and a check of what would come back; WITHOUT=google_crc32c drops that carried package.
# Knobs: OUT DATA CLASSES PER_CLASS STEPS ROUNDS BUDGET_S MIN_S STAGES (a subset, for a second
# call) COMPILE WORKERS DECODE_WORKERS DEVICE.
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = --rehearse ]; then
  venv=${REHEARSE_VENV:-out/accelerator-venv} carry=out/accelerator-carry
  OUT=${OUT:-out/accelerator-rehearsal}
  make -s setup || exit 1  # .venv: the FFCV that is carried, as in a real call, comes from it
  if [ ! -e "$venv/.complete" ]; then  # the H200's versions; what it holds beyond them is not needed
    python3 -m venv --clear "$venv" && "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 \
      numpy pyyaml tqdm matplotlib psutil pytest pytest-timeout numba opencv-python-headless && touch "$venv/.complete" \
      || { echo "rehearse: could not build $venv"; exit 1; }
  fi
  CARRY_PYTHON=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    bash bench/carry_ffcv.sh "$carry" || exit 1
  [ -n "${WITHOUT:-}" ] && rm -rf "$carry/site/$WITHOUT" "$carry/site/$WITHOUT"-*
  rm -rf "$OUT" && mkdir -p "$OUT"
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" PYTHONUNBUFFERED=1 PYTHON="$venv/bin/python" \
    CARRY="$carry" OUT="$OUT" DEVICE=cpu DATA="${DATA:-/tmp/mnv3_rehearsal_data}" STAGES="${STAGES:-}" \
    bash bench/accelerator.sh
  rc=$?
  PYTHONPATH=$PWD "$venv/bin/python" bench/accelerator_checks.py --returned "$OUT" --call-rc "$rc" || exit 1
  exit 0
fi

PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} CARRY=${CARRY:-.h200}
OUT=${OUT:-out/bench/accelerator} WORK=${WORK:-/tmp/mnv3_accelerator_work}  # WORK: never comes back as it is
DATA=${DATA:-/tmp/mnv3_accelerator_data} CLASSES=${CLASSES:-20} PER_CLASS=${PER_CLASS:-320}  # 25 steps of 256
STEPS=${STEPS:-50} ROUNDS=${ROUNDS:-2} BUDGET_S=${BUDGET_S:-330} MIN_S=${MIN_S:-15} COMPILE=${COMPILE:-0} SCALE=1
WORKERS=${WORKERS:-$(nproc)} DECODE_WORKERS=${DECODE_WORKERS:-3}  # <= 4 host cores when the GPU decodes
if [ "$DEVICE" = cpu ]; then  # the stand-in: the same plumbing, tiny, fp32 (autocast is slow here), 3x the time
  CLASSES=2 PER_CLASS=16 STEPS=2 ROUNDS=1 WORKERS=2 DECODE_WORKERS=1 SCALE=3 bf16=auto fp16=auto
  arch=mobilenetv3_small_100 px=32 batch=8 sizes=16 agree=(--arch mobilenetv3_small_100 --image-size 32
    --batch-size 4 --steps 4 --classes 10)
else
  arch=mobilenetv3_large_100 px=224 batch=256 sizes=512,1024 agree=(--steps 200) bf16=bfloat16 fp16=float16
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # import core, loaders, engine, ... without an install
if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$PWD/$CARRY/site:$PYTHONPATH"
  libs=$(mktemp -d)  # only the carried libraries this machine lacks: they must not shadow newer ones
  for lib in "$CARRY"/lib/*; do
    ldconfig -p 2>/dev/null | grep -q "^[[:space:]]*$(basename "$lib") " || ln -s "$PWD/$lib" "$libs/"
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
# TorchCodec only where it decodes a batch on the device with this torch: else torchvision.io's decoders
if [ -d "$CARRY/torchcodec" ] && PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH" $PYTHON -c "import torch, torchvision.io
from torchcodec.decoders import decode_jpeg
decode_jpeg([torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))], device='$DEVICE')" 2>/dev/null; then
  export PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH"
fi
rm -rf "$WORK" && mkdir -p "$WORK" "$OUT"
LOG=$OUT/accelerator.log
: >"$LOG"
status=0 start_s=$SECONDS

pack() {  # what has been measured so far into OUT's three files, each replaced whole
  $PYTHON bench/accelerator_checks.py "$WORK" >"$WORK/checks.txt" 2>&1
  cp "$WORK/checks.json" "$OUT/.checks.json" 2>/dev/null && mv "$OUT/.checks.json" "$OUT/checks.json"
  tar -czf "$OUT/.results.tar.gz" -C "$WORK" --exclude='*.pth' --exclude=tensorboard . \
    && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
}

stage() {  # stage NAME LIMIT_S COMMAND...: under min(LIMIT_S, what is left), logged, recorded, packed
  local name=$1 limit=$(($2 * SCALE)) left=$((BUDGET_S * SCALE - (SECONDS - start_s))) t=$SECONDS rc
  shift 2
  if [ -n "${STAGES:-}" ] && [[ ",$STAGES," != *",$name,"* ]]; then return 0; fi
  if [ "$left" -lt "$MIN_S" ]; then
    echo "== $name: skipped, ${left} s of the budget left" | tee -a "$LOG"
    echo "{\"stage\": \"$name\", \"skipped\": true, \"limit_s\": $limit}" >>"$WORK/stages.jsonl"
    return 1
  fi
  [ "$left" -lt "$limit" ] && limit=$left
  echo "== $name (limit ${limit}s, at $((SECONDS - start_s)) s): $*" | tee -a "$LOG"
  timeout --signal=INT --kill-after=10 "$limit" "$@" 2>&1 | tee -a "$LOG"
  rc=${PIPESTATUS[0]}
  echo "== $name: rc $rc after $((SECONDS - t)) s" | tee -a "$LOG"
  echo "{\"stage\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t)), \"limit_s\": $limit}" >>"$WORK/stages.jsonl"
  pack
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

make_data() {  # the dataset (train images at 512 px and their shards), and the .beton at --preset fast
  [ -d "$DATA/train" ] || $PYTHON convert/make_sample.py "$DATA" --classes "$CLASSES" \
    --train-per-class "$PER_CLASS" --val-per-class 2 --workers "$WORKERS" || return 1
  $PYTHON convert/to_shards.py "$DATA" --workers "$WORKERS" \
    && $PYTHON convert/to_ffcv.py "$DATA" --preset fast --workers "$WORKERS"
}

if ! stage preflight 45 $PYTHON bench/accelerator_checks.py --preflight --device "$DEVICE"; then
  echo "== preflight failed: nothing else runs (see above); status 1" | tee -a "$LOG"
  exit 1
fi
make_data >"$WORK/data.log" 2>&1 &
data_pid=$!
stage pytest_cuda 90 $PYTHON -m pytest -q -rs -m cuda -p no:cacheprovider --timeout 60 \
  tests/test_device_decode.py tests/test_step.py
data_s=$SECONDS
wait "$data_pid"
data_rc=$?
echo "== data: rc $data_rc, waited $((SECONDS - data_s)) s more for it; $(tr '\r' '\n' <"$WORK/data.log" | tail -n 1)" \
  | tee -a "$LOG"
[ "$data_rc" -eq 0 ] || { cat "$WORK/data.log" >>"$LOG"; status=1; }

common=(--device "$DEVICE" --data "$DATA" --arch $arch --image-size $px --batch-size $batch --amp
        --amp-dtype $bf16 --steps "$STEPS" --rounds "$ROUNDS" --no-augment)
train() {  # train NAME DTYPE [FLAGS]: train.py itself under torchrun, 40 steps
  local name=$1 dtype=$2
  shift 2
  stage "train_$name" 75 $PYTHON -m torch.distributed.run --standalone --nproc_per_node=1 train.py \
    --device "$DEVICE" --data "$DATA" --loader torchvision --decode device --workers "$DECODE_WORKERS" \
    --arch $arch --image-size $px --batch_size $batch --apex --amp-dtype "$dtype" "$@" --epochs 1 \
    --max_steps 40 --print-freq 10 --checkpoint-every 0 --output-dir "$WORK/train_$name" --overwrite
}
train bf16_graphs $bf16 --cuda-graphs
stage step_agreement 45 $PYTHON bench/step_agreement.py --device "$DEVICE" --amp-dtype $bf16 "${agree[@]}" \
  --json "$WORK/step_agreement.json"
stage train_fps_device 75 $PYTHON bench/train_fps.py "${common[@]}" --loaders torchvision --decode device \
  --workers "$DECODE_WORKERS" --cuda-graphs --json "$WORK/train_fps_device.json"
stage decode_agreement 30 $PYTHON bench/decode_agreement.py --device "$DEVICE" --data "$DATA" --epochs 1 \
  --image-size $px --batch-size $batch --workers "$WORKERS" --json "$WORK/decode_agreement.json"
stage train_fps_graphs 45 $PYTHON bench/train_fps.py "${common[@]}" --loaders "" --cuda-graphs --rounds 1 \
  --batch-sizes "$sizes" --json "$WORK/train_fps_graphs.json"
stage train_fps_ffcv 60 $PYTHON bench/train_fps.py "${common[@]}" --loaders ffcv --workers "$WORKERS" \
  --cuda-graphs --json "$WORK/train_fps_ffcv.json"
train fp16_graphs $fp16 --cuda-graphs
if [ "$COMPILE" = 1 ]; then
  stage train_fps_compile 200 $PYTHON bench/train_fps.py "${common[@]}" --loaders "" \
    --compile-modes default,reduce-overhead --json "$WORK/train_fps_compile.json"
fi
pack
tee -a "$LOG" <"$WORK/checks.txt"
echo "== done in $((SECONDS - start_s)) s, status $status; $OUT: $(ls "$OUT" | tr '\n' ' ')" | tee -a "$LOG"
exit $status
