#!/usr/bin/env bash
# Every speed figure of issue #16 in one command on one GPU node (< 8 minutes), one table:
#
#   bash benchmarks/gpu.sh                      # CUDA: throughput, ceiling at 1/2/4/8 encoders, loader
#   bash benchmarks/gpu.sh --device cpu --tiny  # its CPU form, run by the test suite
#
# Each benchmark's full output goes to $LOGS (default: a temp directory, printed); the table
# at the end holds the lines the issue judges. PYTHON picks the interpreter (default python).
set -euo pipefail
DEVICE=cuda
TINY=()
while [ $# -gt 0 ]; do
  case "$1" in
    --device) DEVICE="$2"; shift 2 ;;
    --tiny) TINY=(--tiny); shift ;;
    --tmp) TMP_ROOT="$2"; shift 2 ;;
    *) echo "gpu.sh: unknown argument $1 (use --device DEV, --tiny, --tmp DIR)" >&2; exit 2 ;;
  esac
done
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
PYTHON="${PYTHON:-python}"
WORK="$(mktemp -d "${TMP_ROOT:-${TMPDIR:-/tmp}}/gpu-bench.XXXXXX")"
LOGS="${LOGS:-$WORK/logs}"
mkdir -p "$LOGS" "$WORK/data"
trap 'rm -rf "$WORK/data"; [ "$LOGS" = "$WORK/logs" ] || rm -rf "$WORK"' EXIT
THREADS=(1 2 4 8)
if [ ${#TINY[@]} -gt 0 ]; then THREADS=(1 2); fi
CEILING_SIZE=(--tokens 300000 --dims 1024 4096)
if [ ${#TINY[@]} -gt 0 ]; then CEILING_SIZE=(); fi

run() {  # name, then the command; its output to $LOGS/name.log
  local name="$1"; shift
  local start=$SECONDS
  "$@" --tmp "$WORK/data" > "$LOGS/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$LOGS/$name.log"; exit 1; }
  echo "$name: $((SECONDS - start)) s" >> "$LOGS/times.log"
}

launch() {  # the CPU smoke form checks figures, not speed: side by side; on a GPU node
  if [ ${#TINY[@]} -gt 0 ]; then run "$@" & else run "$@"; fi  # one at a time
}
launch throughput "$PYTHON" "$HERE/throughput.py" --device "$DEVICE" "${TINY[@]}"
launch ceiling "$PYTHON" "$HERE/ceiling.py" --device "$DEVICE" --threads "${THREADS[@]}" \
    --targets shm "${CEILING_SIZE[@]}" "${TINY[@]}"
launch loader "$PYTHON" "$HERE/loader.py" "${TINY[@]}"
for job in $(jobs -p); do wait "$job" || exit 1; done

echo "== crowstream on $DEVICE ($(nproc) cores); full logs in $LOGS"
echo "-- throughput.py"
grep -E "^ *\(|ratio|targets" "$LOGS/throughput.log" || true
echo "-- ceiling.py (to /dev/shm)"
grep -E "encoder_threads=|\(a\)|\(b\)|ratio|speed-up|tokenizing" "$LOGS/ceiling.log" || true
echo "-- loader.py"
grep -E "^ *\(|rows/s|ratio" "$LOGS/loader.log" || true
echo "-- wall time"
cat "$LOGS/times.log"
