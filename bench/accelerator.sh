#!/usr/bin/env bash
# The GPU measurements in one call, and its rehearsal on this machine's CPU (bench/README.md,
# "Prepared for the next accelerator", has the plan for a lent machine's 15 minutes):
#
#     bash bench/carry_ffcv.sh                  # here, once: what the lent machine lacks into .h200/
#     bash bench/accelerator.sh                 # there: device run, carry [".h200"], timeout_s 480,
#                                               #   PYTHONUNBUFFERED=1; what comes back is in $OUT
#     bash bench/accelerator.sh --rehearse      # here: the whole call on the CPU in the lent torch 2.11
#     bash bench/accelerator.sh --dry-run       # what would run here, and nothing else
#     bash bench/accelerator.sh --help          # this text
#
# Stages in order of value, each in its own session (setsid) under a hard limit that ends the whole
# stage: its session, its descendants, and every process whose environment carries the stage's
# token (torchrun starts its worker in a session of its own): SIGINT first (scripts write what
# they measured, marked partial), SIGKILL GRACE_S later. Output goes to files, never a pipe a stuck
# child could hold. After every stage, what was measured is packed into the three files that come
# back (accelerator.log, checks.json, results.tar.gz), so one hang or OOM costs one stage.
#   preflight (fatal only without torch, the device or a captured step; it names the machine, and
#   each optional part it finds missing skips the stages that need it, saying why) -> the dataset
#   in the background -> CUDA tests -> step agreement -> [dataset, waited for under its limit] ->
#   train_fps with device decode -> train.py -> decode agreement -> the batch sweep (one process per
#   size, sizes from the card's set in bench/targets.yaml) -> FFCV -> fp16 -> compile (COMPILE=1).
# Knobs: OUT DATA CLASSES PER_CLASS STEPS ROUNDS BUDGET_S MIN_S GRACE_S STAGES (a subset besides the
# preflight, e.g. for a second call) LIMITS (NAME=S,... instead of a stage's cap) COMPILE WORKERS DECODE_WORKERS DEVICE.
# Rehearsal only: WITHOUT=PART drops a carried package (google_crc32c); FAULT=STAGE:hang|fail,...
# makes a stage's Python hang (SIGINT and SIGTERM ignored) or exit 3, part:NAME marks a part missing;
# the verdict then asks that exactly those stages are lost and every other one comes back.
set -uo pipefail
cd "$(dirname "$0")/.."

case "${1:-}" in
  -h|--help) sed -n '2,/^set -uo/p' "$0" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
  --rehearse|--dry-run|"") ;;
  *) echo "accelerator.sh: unknown argument $1: see bash bench/accelerator.sh --help" >&2; exit 2 ;;
esac

if [ "${1:-}" = --rehearse ]; then
  venv=${REHEARSE_VENV:-out/accelerator-venv} carry=out/accelerator-carry
  OUT=${OUT:-out/accelerator-rehearsal}
  make -s setup || exit 1  # .venv: the FFCV that is carried, as in a real call, comes from it
  if [ ! -e "$venv/.complete" ]; then  # the lent machines' versions; what they hold beyond these is not needed
    python3 -m venv --clear "$venv" && "$venv/bin/pip" install -q torch==2.11.0 torchvision==0.26.0 \
      numpy pyyaml tqdm matplotlib psutil pytest pytest-timeout numba opencv-python-headless && touch "$venv/.complete" \
      || { echo "rehearse: could not build $venv"; exit 1; }
  fi
  CARRY_PYTHON=$("$venv/bin/python" -c 'import sys; print("%d.%d" % sys.version_info[:2])') \
    bash bench/carry_ffcv.sh "$carry" || exit 1
  [ -n "${WITHOUT:-}" ] && rm -rf "$carry/site/$WITHOUT" "$carry/site/$WITHOUT"-*
  rm -rf "$OUT" && mkdir -p "$OUT"
  start_s=$SECONDS
  env -i PATH=/usr/local/bin:/usr/bin:/bin HOME="$HOME" PYTHONUNBUFFERED=1 PYTHON="$venv/bin/python" \
    CARRY="$carry" OUT="$OUT" DEVICE=cpu DATA="${DATA:-/tmp/mnv3_rehearsal_data}" STAGES="${STAGES:-}" \
    FAULT="${FAULT:-}" LIMITS="${LIMITS:-}" WORK="${WORK:-/tmp/mnv3_rehearsal_work}" bash bench/accelerator.sh
  rc=$?
  echo "rehearse: the call took $((SECONDS - start_s)) s and exited $rc"
  PYTHONPATH=$PWD "$venv/bin/python" bench/accelerator_checks.py --returned "$OUT" --call-rc "$rc" \
    --faults "${FAULT:-}" ${WITHOUT:+--without "$WITHOUT"} || exit 1
  exit 0
fi

PYTHON=${PYTHON:-python3} DEVICE=${DEVICE:-cuda} CARRY=${CARRY:-.h200}
OUT=${OUT:-out/bench/accelerator} WORK=${WORK:-/tmp/mnv3_accelerator_work}  # WORK: never comes back as it is
DATA=${DATA:-/tmp/mnv3_accelerator_data} CLASSES=${CLASSES:-20} PER_CLASS=${PER_CLASS:-320}  # 25 steps of 256
STEPS=${STEPS:-50} ROUNDS=${ROUNDS:-2} BUDGET_S=${BUDGET_S:-420} MIN_S=${MIN_S:-15} GRACE_S=${GRACE_S:-8}
COMPILE=${COMPILE:-0} STAGES=${STAGES:-} LIMITS=${LIMITS:-} FAULT=${FAULT:-} SCALE=1
WORKERS=${WORKERS:-$(nproc)} DECODE_WORKERS=${DECODE_WORKERS:-3}  # <= 4 host cores when the GPU decodes
if [ "$DEVICE" = cpu ]; then  # the stand-in: the same plumbing, tiny, fp32 (autocast is slow here), 3x the time
  CLASSES=2 PER_CLASS=16 STEPS=2 ROUNDS=1 WORKERS=2 DECODE_WORKERS=1 SCALE=3 bf16=auto fp16=auto
  arch=mobilenetv3_small_100 px=32 batch=8 agree=(--arch mobilenetv3_small_100 --image-size 32
    --batch-size 4 --steps 4 --classes 10)
else
  arch=mobilenetv3_large_100 px=224 batch=256 agree=(--steps 200) bf16=bfloat16 fp16=float16
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # import core, loaders, engine, ... without an install
carried_first=""
if [ -d "$CARRY/site" ]; then
  export PYTHONPATH="$PWD/$CARRY/site:$PYTHONPATH"
  libs=$(mktemp -d)  # only the carried libraries this machine lacks: they must not shadow newer ones
  ld_cache=$'\n'$(ldconfig -p 2>/dev/null)  # read whole: `ldconfig -p | grep -q` dies of SIGPIPE under pipefail
  for lib in "$CARRY"/lib/*; do
    [ -e "$lib" ] || continue
    case $ld_cache in
      *$'\n'[[:space:]]"$(basename "$lib") "*) ;;
      *) ln -s "$PWD/$lib" "$libs/" && carried_first+=" $(basename "$lib")" ;;
    esac
  done
  export LD_LIBRARY_PATH="$libs${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi
decoder=torchvision.io  # TorchCodec only where it decodes a batch on the device with this torch
if [ -d "$CARRY/torchcodec" ] && PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH" timeout 60 $PYTHON -c "import torch, torchvision.io
from torchcodec.decoders import decode_jpeg
decode_jpeg([torchvision.io.encode_jpeg(torch.zeros(3, 8, 8, dtype=torch.uint8))], device='$DEVICE')" >/dev/null 2>&1; then
  export PYTHONPATH="$PWD/$CARRY/torchcodec:$PYTHONPATH" decoder=torchcodec
fi

# name cap needs command: in order of value. needs: parts the preflight probes, "data" and "beton"
# (the dataset and its .beton), "-" for none. The batch sweep's sizes come from the preflight.
common=(--device "$DEVICE" --data "$DATA" --arch $arch --image-size $px --batch-size $batch --amp
        --amp-dtype $bf16 --steps "$STEPS" --rounds "$ROUNDS" --no-augment)
train_cmd() {  # NAME DTYPE [FLAGS]: sets cmd to train.py itself under torchrun, one epoch (25 steps of 256)
  local name=$1 dtype=$2
  shift 2
  cmd=($PYTHON -m torch.distributed.run --standalone --nproc_per_node=1 train.py --device "$DEVICE" --data "$DATA"
       --loader torchvision --decode device --workers "$DECODE_WORKERS" --arch $arch --image-size $px
       --batch_size $batch --apex --amp-dtype "$dtype" "$@" --epochs 1 --print-freq 10 --checkpoint-every 0
       --output-dir "$WORK/train_$name" --overwrite)
}

if [ "${1:-}" = --dry-run ]; then
  echo "dry run: device $DEVICE, budget $((BUDGET_S * SCALE)) s, python $PYTHON, decoder $decoder"
  echo "dry run: carried libraries put first:${carried_first:- none}"
  echo "dry run: stages: preflight, data (background), pytest_cuda, step_agreement, train_fps_device," \
       "train_bf16_graphs, decode_agreement, train_fps_b<N> per size, train_fps_ffcv, train_fp16_graphs" \
       "$([ "$COMPILE" = 1 ] && echo ", train_fps_compile")${STAGES:+; only $STAGES}"
  exit 0
fi

rm -rf "$WORK" && mkdir -p "$WORK/logs" "$OUT"
LOG=$OUT/accelerator.log
: >"$LOG"
: >"$WORK/stages.jsonl"
status=0 start_s=$SECONDS runs=0
say() { echo "$*" | tee -a "$LOG"; }
say "== accelerator call: device $DEVICE, budget $((BUDGET_S * SCALE)) s, decoder $decoder," \
    "carried libraries first:${carried_first:- none}${STAGES:+, stages $STAGES}${FAULT:+, FAULT $FAULT}"

if [ -n "$FAULT" ]; then  # the rehearsal's hook: a stage's Python made to hang or fail (never in a real call)
  mkdir -p "$WORK/fault"
  cat >"$WORK/fault/sitecustomize.py" <<'EOF'
import os, signal, sys, time
# torchrun's agent is left alone: its worker is what hangs, in its own session, as a train.py stuck in capture would
if os.environ.get("MNV3_FAULT") and "torch.distributed.run" not in getattr(sys, "orig_argv", sys.argv):
    if os.environ["MNV3_FAULT"] == "hang":
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        print(f"FAULT: pid {os.getpid()} (session {os.getsid(0)}) hangs, ignoring SIGINT and SIGTERM", flush=True)
        while True:
            time.sleep(60)
    print(f"FAULT: pid {os.getpid()} fails", flush=True)
    os._exit(3)
EOF
fi

pack() {  # what has been measured so far into OUT's three files, each replaced whole (no torch import)
  $PYTHON bench/accelerator_checks.py "$WORK" >"$WORK/checks.txt" 2>&1
  cp "$WORK/checks.json" "$OUT/.checks.json" 2>/dev/null && mv "$OUT/.checks.json" "$OUT/checks.json"
  tar -czf "$OUT/.results.tar.gz" -C "$WORK" --exclude='*.pth' --exclude=tensorboard --exclude=fault . \
    && mv "$OUT/.results.tar.gz" "$OUT/results.tar.gz"
}

stage_pids() {  # TOKEN SID: every live process of a stage
  local token=$1 sid=$2
  {
    # its session (setsid made the stage's first process the leader) and that process's descendants
    ps -eo pid=,ppid=,sid= 2>/dev/null | awk -v sid="$sid" '
      { ppid[$1] = $2; if ($3 == sid) print $1 }
      END { n = 1; while (n) { n = 0; for (p in ppid) if (!(p in seen) && (ppid[p] == sid || ppid[p] in seen)) {
              seen[p] = 1; print p; n = 1 } } }'
    # and whoever carries its token: torchrun's worker (a session of its own), orphans of either
    grep -lzx "MNV3_STAGE_TOKEN=$token" /proc/[0-9]*/environ 2>/dev/null | cut -d/ -f3
  } | sort -un | grep -vx "$$"
}

end_stage() {  # TOKEN SID: SIGINT to the whole stage, SIGKILL to what is left GRACE_S later
  local token=$1 sid=$2 pids tries=0
  pids=$(stage_pids "$token" "$sid")
  [ -n "$pids" ] && kill -INT $pids 2>/dev/null
  while [ -n "$pids" ] && [ $tries -lt $((GRACE_S * 5)) ]; do
    sleep 0.2
    tries=$((tries + 1))
    pids=$(stage_pids "$token" "$sid")
  done
  while [ -n "$pids" ]; do  # a process stuck in the kernel or ignoring SIGINT; new ones may have started
    kill -KILL $pids 2>/dev/null
    sleep 0.2
    pids=$(stage_pids "$token" "$sid")
    tries=$((tries + 1))
    [ $tries -gt $((GRACE_S * 5 + 50)) ] && { say "== could not end pids $pids"; break; }
  done
}

start_limited() {  # LOGFILE COMMAND...: in its own session, with a token; sets run_pid and run_token
  local logfile=$1
  shift
  runs=$((runs + 1))
  run_token="mnv3-$$-$runs"
  setsid env MNV3_STAGE_TOKEN="$run_token" "$@" >>"$logfile" 2>&1 </dev/null &
  run_pid=$!
}

wait_limited() {  # PID TOKEN DEADLINE_S: its exit status, or the stage ended whole at the deadline (rc 124)
  local pid=$1 token=$2 deadline=$3
  while kill -0 "$pid" 2>/dev/null && [ $SECONDS -lt "$deadline" ]; do
    sleep 0.2
  done
  if kill -0 "$pid" 2>/dev/null; then
    end_stage "$token" "$pid"
    wait "$pid" 2>/dev/null
    return 124
  fi
  wait "$pid"
  local rc=$?
  end_stage "$token" "$pid"  # what it left behind (a DataLoader worker, torchrun's orphaned worker)
  return $rc
}

part_state() {  # PART: "ok", or why not
  local line
  line=$(grep -h "^$1 " "$WORK/parts.txt" "$WORK/data_parts.txt" 2>/dev/null | tail -n 1)
  if [ -n "$line" ]; then echo "${line#* }"
  elif [ "$1" = data ] || [ "$1" = beton ]; then echo "missing: $(cat "$WORK/data_state" 2>/dev/null || echo 'not built')"
  else echo "missing: not probed (the preflight ended first)"; fi
}

record() {  # JSON fields of a stage's line in stages.jsonl
  echo "{$1}" >>"$WORK/stages.jsonl"
}

json_str() {  # a string as JSON
  $PYTHON -c 'import json, sys; print(json.dumps(sys.argv[1]))' "$1"
}

limit_of() {  # NAME CAP: LIMITS' NAME=S, else CAP x SCALE
  local over
  over=$(tr ',' '\n' <<<"$LIMITS" | sed -n "s/^$1=//p" | tail -n 1)
  echo "${over:-$(($2 * SCALE))}"
}

stage() {  # NAME CAP_S NEEDS COMMAND...: skipped with the reason when a need is missing or the budget is
  local name=$1 cap=$2 needs=$3 t=$SECONDS rc need state limit left note="" fault=()
  shift 3
  if [ -n "$STAGES" ] && [ "$name" != preflight ] && [[ ",$STAGES," != *",$name,"* ]]; then return 0; fi
  for need in ${needs//,/ }; do
    [ "$need" = - ] && continue
    state=$(part_state "$need")
    if [ "$state" != ok ]; then
      say "== $name: skipped: it needs $need, $state"
      record "\"stage\": \"$name\", \"skipped\": true, \"reason\": $(json_str "needs $need, $state")"
      status=1
      return 1
    fi
  done
  left=$((BUDGET_S * SCALE - (SECONDS - start_s) - GRACE_S))
  if [ "$left" -lt "$MIN_S" ]; then
    say "== $name: skipped: ${left} s of the budget left"
    record "\"stage\": \"$name\", \"skipped\": true, \"reason\": \"the budget: ${left} s left\""
    status=1
    return 1
  fi
  limit=$(limit_of "$name" "$cap")
  [ "$left" -lt "$limit" ] && limit=$left
  case ",$FAULT," in
    *",$name:hang,"*) fault=(MNV3_FAULT=hang "PYTHONPATH=$WORK/fault:$PYTHONPATH") ;;
    *",$name:fail,"*) fault=(MNV3_FAULT=fail "PYTHONPATH=$WORK/fault:$PYTHONPATH") ;;
  esac
  say "== $name (limit ${limit} s, at $((SECONDS - start_s)) s): $*"
  start_limited "$WORK/logs/$name.log" env "${fault[@]}" "$@"
  wait_limited "$run_pid" "$run_token" $((SECONDS + limit)) 2>>"$WORK/logs/$name.log"  # bash's "Killed" too
  rc=$?
  [ "$rc" -eq 124 ] && note="ended at its limit: the whole stage, torchrun's workers included"
  tail -n 15 "$WORK/logs/$name.log"
  cat "$WORK/logs/$name.log" >>"$LOG"
  say "== $name: rc $rc after $((SECONDS - t)) s${note:+ ($note)}"
  record "\"stage\": \"$name\", \"rc\": $rc, \"wall_s\": $((SECONDS - t)), \"limit_s\": $limit, \"note\": \"$note\""
  pack
  [ "$rc" -eq 0 ] || status=1
  return "$rc"
}

make_data() {  # the dataset (train images at 512 px and their shards), then the .beton at --preset fast
  { [ -d "$DATA/train" ] || $PYTHON convert/make_sample.py "$DATA" --classes "$CLASSES" \
      --train-per-class "$PER_CLASS" --val-per-class 2 --workers "$WORKERS"; } \
    && { compgen -G "$DATA/shards/train-*.idx" >/dev/null || $PYTHON convert/to_shards.py "$DATA" --workers "$WORKERS"; } \
    && echo "data ok" >>"$WORK/data_parts.txt" || return 1
  if [ "$NEEDS_BETON" != ok ]; then
    echo "beton missing: ffcv $NEEDS_BETON" >>"$WORK/data_parts.txt"
  elif [ -e "$DATA/ffcv/train.beton" ] || $PYTHON convert/to_ffcv.py "$DATA" --preset fast --workers "$WORKERS"; then
    echo "beton ok" >>"$WORK/data_parts.txt"
  fi
}

# -- the call ----------------------------------------------------------------------------------------
part_fault=$(tr ',' '\n' <<<"$FAULT" | grep '^part:' | head -n 1)
stage preflight 60 - $PYTHON bench/accelerator_checks.py --preflight "$WORK" --device "$DEVICE" --fault "$part_fault"
if ! grep -q '"fatal": {' "$WORK/preflight.json" 2>/dev/null; then
  say "== preflight: no captured step on $DEVICE (see above): nothing else can run; status 1"
  pack
  exit 1
fi
sizes=$($PYTHON -c 'import json, sys; print(" ".join(map(str, json.load(open(sys.argv[1]))["batch_sweep"])))' \
  "$WORK/preflight.json" 2>/dev/null)
[ "$DEVICE" = cpu ] && sizes=16

data_pid="" data_deadline=$((SECONDS + 150 * SCALE))
if [ "$(part_state google_crc32c)" = ok ]; then  # what a second call on a warm machine finds built is kept
  export PYTHON DATA CLASSES PER_CLASS WORKERS WORK NEEDS_BETON="$(part_state ffcv)"
  export -f make_data
  say "== data (background, limit $((150 * SCALE)) s): $CLASSES classes x $PER_CLASS images, shards, .beton"
  start_limited "$WORK/data.log" nice -n 10 bash -c make_data
  data_pid=$run_pid data_token=$run_token
else
  echo "google_crc32c $(part_state google_crc32c)" >"$WORK/data_state"
fi

stage pytest_cuda 60 - $PYTHON -m pytest -q -rs -m cuda -p no:cacheprovider --timeout 50 \
  -k "not train_py_under_torchrun" tests/test_device_decode.py tests/test_step.py
stage step_agreement 45 - $PYTHON bench/step_agreement.py --device "$DEVICE" --amp-dtype $bf16 "${agree[@]}" \
  --json "$WORK/step_agreement.json"
if [ -n "$data_pid" ]; then
  waited_s=$SECONDS
  wait_limited "$data_pid" "$data_token" "$data_deadline" 2>>"$WORK/data.log"
  data_rc=$?
  [ "$data_rc" -eq 0 ] || echo "the data builder: rc $data_rc$([ $data_rc = 124 ] && echo ', ended at its limit')" \
    >"$WORK/data_state"
  say "== data: rc $data_rc, waited $((SECONDS - waited_s)) s more for it; $(tr '\r' '\n' <"$WORK/data.log" | tail -n 1)"
  [ "$data_rc" -eq 0 ] || { cat "$WORK/data.log" >>"$LOG"; status=1; }
fi

stage train_fps_device 75 data,nvjpeg $PYTHON bench/train_fps.py "${common[@]}" --loaders torchvision \
  --decode device --workers "$DECODE_WORKERS" --cuda-graphs --json "$WORK/train_fps_device.json"
train_cmd bf16_graphs $bf16 --cuda-graphs
stage train_bf16_graphs 60 data,nvjpeg "${cmd[@]}"
stage decode_agreement 30 data,nvjpeg $PYTHON bench/decode_agreement.py --device "$DEVICE" --data "$DATA" \
  --epochs 1 --image-size $px --batch-size $batch --workers "$WORKERS" --json "$WORK/decode_agreement.json"
for size in $sizes; do  # one process per size: its memory is its own; a size that fails ends the sweep
  stage "train_fps_b$size" 40 - $PYTHON bench/train_fps.py "${common[@]}" --batch-size "$size" --loaders "" \
    --cuda-graphs --rounds 1 --json "$WORK/train_fps_b$size.json" || break
done
stage train_fps_ffcv 60 data,beton $PYTHON bench/train_fps.py "${common[@]}" --loaders ffcv --workers "$WORKERS" \
  --cuda-graphs --json "$WORK/train_fps_ffcv.json"
train_cmd fp16_graphs $fp16 --cuda-graphs
stage train_fp16_graphs 50 data,nvjpeg "${cmd[@]}"
if [ "$COMPILE" = 1 ]; then
  stage train_fps_compile 200 - $PYTHON bench/train_fps.py "${common[@]}" --loaders "" \
    --compile-modes default,reduce-overhead --json "$WORK/train_fps_compile.json"
fi
pack
tee -a "$LOG" <"$WORK/checks.txt"
say "== done in $((SECONDS - start_s)) s of $((BUDGET_S * SCALE)), status $status; $OUT: $(ls "$OUT" | tr '\n' ' ')"
exit $status
