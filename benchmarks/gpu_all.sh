#!/usr/bin/env bash
# The GPU measurements in one device call each. Every step has its own timeout, so one
# hang loses only its own numbers, and each writes its JSON straight under $OUT, with
# the log in $OUT/log.txt. PART picks the call:
#
# - models (the default): models.py at the examples' sizes for lm1b's
#   Transformer LM (two sizes) and imagenet's ResNet-18/50, with no node, a node after
#   every block and a node after every Dense / convolution, whole batch and per
#   example: bfloat16, then float32, each step at most 225 s, so 8 minutes with the
#   start even if both run into their limits. Each (model, dtype) compiles its baseline
#   alone and its four steps with nodes side by side (--compile-threads 4).
#   3 files: models_bf16.json, models_f32.json, log.txt.
# - micro: the deep-MLP scripts, under 10 minutes; 9 files with the log and
#   the optimized HLO, $OUT/hlo.txt.
#
#   OUT=/tmp/gpuout bash benchmarks/gpu_all.sh                     # on the GPU machine
#   MODELS=resnet50 OUT=/tmp/gpuout bash benchmarks/gpu_all.sh     # only what a limit cut off
#   QUICK=1 OUT=/tmp/gpuout bash benchmarks/gpu_all.sh             # tiny sizes, on a CPU
set -u
: "${OUT:?set OUT to the folder for the results}"
PART=${PART:-models}
case "$PART" in
  models | micro) ;;
  *) echo "PART must be models or micro; got '$PART'" >&2; exit 2 ;;
esac
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
  local rc=$? # before the date below resets $?; 124 = cut off by the limit
  echo "=== $(date -u +%T) exit $rc" >>"$LOG"
}

{
  date -u
  nvidia-smi -L
  "$PY" -c "import jax, sys; print('python', sys.version.split()[0], 'jax', jax.__version__, jax.devices())"
  "$PY" -c "import torch; print('torch', torch.__version__)"
} >>"$LOG" 2>&1

if [ "$PART" = models ]; then
  # Each (model, dtype) is timed for 11 rounds of 3 steps per configuration; the records
  # of every finished (model, dtype) are written before the next starts, so a step cut
  # off by its limit keeps them, and the models run cheapest first. Compiling takes
  # most of the time (docs/results/speed-models/README.md), so the baseline is not
  # compiled twice here: its compile time includes the model's autotuning, and the
  # steps with nodes, compiled after it, reuse that autotuning. The JSON holds the
  # optimized HLO's counts of fusions and reductions (hlo_counts, hlo_added).
  MODEL_ARGS=(--placements block,layer --rounds 11 --steps-per-round 3 --no-warm-compile
    --compile-threads 4)
  # MODELS=resnet50 runs one model: a call for what a step's limit cut off.
  if [ -n "${MODELS:-}" ]; then MODEL_ARGS+=(--models "$MODELS"); fi
  # On a CPU the toy models of two of the four are enough to test the steps.
  if [ "${QUICK:-0}" = 1 ]; then
    MODEL_ARGS=(--placements block,layer --models lm1b_small,resnet18 --no-warm-compile
      --compile-threads 4)
  fi
  step 225 benchmarks/models.py --dtypes bfloat16 "${MODEL_ARGS[@]}" --json "$OUT/models_bf16.json"
  step 225 benchmarks/models.py --dtypes float32 "${MODEL_ARGS[@]}" --json "$OUT/models_f32.json"
  cat "$LOG"
  exit 0
fi

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
