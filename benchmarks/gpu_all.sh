#!/usr/bin/env bash
# Every GPU measurement of the benchmarks issue in one device call, under 10 minutes
# even if every step runs into its limit: each step has its own timeout, so one
# hang loses only its own numbers, and each writes its JSON straight under $OUT
# (9 files with the log, $OUT/log.txt, and the optimized HLO, $OUT/hlo.txt).
#
#   OUT=/tmp/gpuout bash benchmarks/gpu_all.sh           # on the GPU machine
#   QUICK=1 OUT=/tmp/gpuout bash benchmarks/gpu_all.sh   # tiny sizes, to test it on a CPU
set -u
: "${OUT:?set OUT to the folder for the results}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python3}
EXTRA=()
if [ "${QUICK:-0}" = 1 ]; then EXTRA=(--tiny); fi
LOG="$OUT/log.txt"

step() {
  local limit=$1
  shift
  echo "=== $(date -u +%T) (limit ${limit} s) $*" >>"$LOG"
  timeout "$limit" "$PY" "$@" "${EXTRA[@]}" >>"$LOG" 2>&1
  echo "=== $(date -u +%T) exit $?" >>"$LOG"
}

{
  date -u
  nvidia-smi -L
  "$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch; print('torch', torch.__version__)"
} >>"$LOG" 2>&1

step 90 benchmarks/overhead.py --dtypes float32 --loops scan --json "$OUT/overhead_f32_scan.json"
step 45 benchmarks/op.py --dump-hlo "$OUT/hlo.txt" --json "$OUT/op.json"
step 100 benchmarks/overhead.py --dtypes float32 --loops unrolled \
  --variants naive,two_pass,masked_bands,three_sums,variadic,bgn,deferred --json "$OUT/overhead_f32_unrolled.json"
step 110 benchmarks/overhead.py --dtypes bfloat16 --variants naive,two_pass,three_sums,variadic,bgn,deferred \
  --json "$OUT/overhead_bf16.json"
step 60 benchmarks/compile.py --modes batch --max-seconds 30 --json "$OUT/compile.json"
step 100 benchmarks/peers.py --dtypes float32,bfloat16 --compile-dtypes float32 \
  --json "$OUT/peers.json"
step 40 benchmarks/reduction.py --sizes 256,1024,2048 --json "$OUT/reduction.json"
cat "$LOG"
