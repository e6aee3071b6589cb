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
TARGET=shm
if [ ${#TINY[@]} -gt 0 ]; then  # the CPU smoke form: every number printed, none meaningful
  THREADS=(1 2); CEILING_SIZE=(); LOADER_SIZE=()
else
  # sized for < 8 minutes on one node: the ceiling at 150k tokens (16 rounds), the loader
  # at 128 MiB per dataset (it measures the host: no GPU)
  THREADS=(1 2 4 8); CEILING_SIZE=(--tokens 150000 --dims 1024 4096); LOADER_SIZE=(--mib 128 --repeats 2)
  # the ceiling holds several GB in /dev/shm at d = 4,096 float32 (the capture, the plain
  # writer's file, the raw write); a container's /dev/shm is often 64 MB: with under 8 GiB
  # free it writes to the disk instead (and the table says so)
  SHM_FREE_KB=$(df -Pk /dev/shm 2>/dev/null | awk 'NR == 2 {print $4}') || SHM_FREE_KB=0
  if [ "${SHM_FREE_KB:-0}" -lt $((8 * 1024 * 1024)) ]; then TARGET=disk; fi
fi

run() {  # name, then the command; its output to $LOGS/name.log
  local name="$1"; shift
  local start=$SECONDS
  "$@" --tmp "$WORK/data" > "$LOGS/$name.log" 2>&1 || { echo "$name failed:"; tail -20 "$LOGS/$name.log"; exit 1; }
  echo "$name: $((SECONDS - start)) s" >> "$LOGS/times.log"
}

launch() {  # the CPU smoke form checks figures, not speed: side by side; on a GPU node
  if [ ${#TINY[@]} -gt 0 ]; then run "$@" & else run "$@"; fi  # one at a time
}
# ${A[@]+"${A[@]}"}: an empty array under `set -u` (bash < 4.4 calls it unbound)
launch throughput "$PYTHON" "$HERE/throughput.py" --device "$DEVICE" ${TINY[@]+"${TINY[@]}"}
launch ceiling "$PYTHON" "$HERE/ceiling.py" --device "$DEVICE" --threads "${THREADS[@]}" \
    --targets "$TARGET" ${CEILING_SIZE[@]+"${CEILING_SIZE[@]}"} ${TINY[@]+"${TINY[@]}"}
launch loader "$PYTHON" "$HERE/loader.py" ${LOADER_SIZE[@]+"${LOADER_SIZE[@]}"} ${TINY[@]+"${TINY[@]}"}
for job in $(jobs -p); do wait "$job" || exit 1; done

echo "== crowstream on $DEVICE ($(nproc) cores); full logs in $LOGS"
echo "-- throughput.py"
grep -E "^ *\(|ratio|targets" "$LOGS/throughput.log" || true
echo "-- ceiling.py (to $TARGET)"
grep -E "encoder_threads=|\(a\)|\(b\)|ratio|speed-up|tokenizing" "$LOGS/ceiling.log" || true
echo "-- loader.py"
grep -E "^ *\(|rows/s|ratio" "$LOGS/loader.log" || true
echo "-- wall time"
cat "$LOGS/times.log"
