# Shared by the four launch scripts: parse --data_path=DIR, run train.py under torchrun, keep a log.
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
  "$PY" -m torch.distributed.run --standalone --nproc_per_node="$nproc" "$ROOT/train.py" \
      --config "$ROOT/$config" --data "$data" --output-dir "$out" ${extra[@]+"${extra[@]}"} 2>&1 | tee "$log"
  grep -E "^Acc@1 " "$log" | tail -1
}
