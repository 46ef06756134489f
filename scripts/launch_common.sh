# Shared by the four launch scripts: parse --data_path=DIR, run train.py under torchrun, keep a log.
# SIGTERM or SIGUSR1 to the script reaches every rank; the script's exit status is the run's: 0
# done, 75 stopped at a checkpoint (run the same command again to continue), anything else failed.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PY="${PYTHON:-$ROOT/.venv/bin/python}"
[ -x "$PY" ] || PY=python3

launch() {  # launch NPROC CONFIG NAME [--data_path=DIR] [extra train.py flags...]
  local nproc="${NPROC:-$1}" config="$2" name="$3"; shift 3  # NPROC=N overrides the device count
  local data="" extra=()
  for a in "$@"; do
    case "$a" in
      --data_path=*) data="${a#--data_path=}" ;;
      *) extra+=("$a") ;;
    esac
  done
  if [ -z "$data" ]; then
    echo "$(basename "$0"): --data_path=DIR is required (an ImageNet-layout folder with train/ and val/)" >&2
    exit 2
  fi
  if [ ! -d "$data" ]; then
    echo "$(basename "$0"): --data_path=$data: no such folder" >&2
    exit 2
  fi
  local out="${OUTPUT_DIR:-$ROOT/runs/$name}"
  mkdir -p "$out"
  local log="$out/train.log"
  echo "$(basename "$0"): $nproc process(es), recipe $config, log $log"
  # The log's tee ignores the stop signals (Slurm signals every process of the job): it ends when
  # the run's output does, and no rank writing its last lines meets a closed pipe.
  local out_fd
  exec {out_fd}> >(trap '' TERM USR1 INT; exec tee "$log")
  local tee_pid=$!
  # engine.launch is torchrun (the same arguments) whose exit status is the ranks': 75 when they
  # stopped at a checkpoint. In the background, so that this shell passes SIGTERM and SIGUSR1 on
  # at once: a shell acts on a signal only after the command in the foreground has ended, and
  # without a trap the signal ends the shell alone, leaving the run going.
  _launch_pid="" _launch_pending=""
  trap '_launch_stop TERM' TERM
  trap '_launch_stop USR1' USR1
  PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PY" -m engine.launch --standalone --nproc_per_node="$nproc" \
      "$ROOT/train.py" --config "$ROOT/$config" --data "$data" --output-dir "$out" ${extra[@]+"${extra[@]}"} \
      >&"$out_fd" 2>&1 &
  _launch_pid=$!
  [ -z "$_launch_pending" ] || kill -s "$_launch_pending" "$_launch_pid" 2>/dev/null || true
  local status
  while :; do
    _launch_signalled=""
    wait "$_launch_pid" && status=0 || status=$?
    [ -z "$_launch_signalled" ] && break  # else a trapped signal cut the wait short: wait on
  done
  trap - TERM USR1
  exec {out_fd}>&-
  for _ in $(seq 50); do kill -0 "$tee_pid" 2>/dev/null || break; sleep 0.1; done  # the log's last lines
  if [ "$status" -eq 0 ]; then
    grep -E "^Acc@1 " "$log" | tail -1 || true
  elif [ "$status" -eq 75 ]; then
    echo "$(basename "$0"): stopped at a checkpoint in $out: run the same command again to continue" \
         "(exit status 75: interrupted, resumable)" >&2
  fi
  exit "$status"
}

_launch_stop() {  # a trapped SIGTERM or SIGUSR1 ($1): pass it on to the run, or on its start
  _launch_signalled=1
  if [ -n "$_launch_pid" ]; then
    kill -s "$1" "$_launch_pid" 2>/dev/null || true
  else
    _launch_pending="$1"
  fi
}
