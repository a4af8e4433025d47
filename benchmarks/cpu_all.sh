#!/usr/bin/env bash
# Every CPU measurement behind benchmarks/RESULTS.md (about 10 minutes on 2 cores):
# the same steps as gpu_all.sh at the CPU sizes (width and batch 256), each writing
# its JSON to $OUT (default benchmarks/results) as cpu_*.json, its log to cpu_log.txt;
# then the step overhead and the reduction pinned to one core (taskset) as cpu1_*.json.
#
#   bash benchmarks/cpu_all.sh
#   python benchmarks/report.py benchmarks/results/cpu_*.json    # the tables, 2 cores
#   python benchmarks/report.py benchmarks/results/cpu1_*.json   # the tables, 1 core
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu
PY=${PYTHON:-python}
LOG="$OUT/cpu_log.txt"
PIN=() # a command prefix for the steps, set below for the 1-core ones

step() {
  echo "=== $(date -u +%T) load: $(cut -d' ' -f1-3 /proc/loadavg) | ${PIN[*]} $*" | tee -a "$LOG"
  "${PIN[@]}" "$PY" "$@" >>"$LOG" 2>&1
  local rc=$? # before the date below resets $?
  echo "=== $(date -u +%T) exit $rc" | tee -a "$LOG"
}

{ date -u; uptime; nproc; "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"; } >"$LOG" 2>&1

step benchmarks/overhead.py --quick --rounds 31 --json "$OUT/cpu_overhead.json"
step benchmarks/op.py --size 67108864 --rounds 11 --json "$OUT/cpu_op.json"
step benchmarks/compile.py --json "$OUT/cpu_compile.json"
step benchmarks/peers.py --quick --rounds 21 --threads 1 --dtypes float32,bfloat16 \
  --compile-dtypes float32 --json "$OUT/cpu_peers.json"
step benchmarks/reduction.py --quick --json "$OUT/cpu_reduction.json"

# One core: what XLA:CPU's two threads add to a layer-sized reduction shows by contrast.
if taskset -c 0 true 2>/dev/null; then
  PIN=(taskset -c 0)
  step benchmarks/overhead.py --quick --rounds 15 --variants naive,bgn \
    --json "$OUT/cpu1_overhead.json"
  step benchmarks/reduction.py --quick --json "$OUT/cpu1_reduction.json"
else
  echo "taskset is not available: the 1-core runs are skipped" | tee -a "$LOG"
fi
echo "=== $(date -u +%T) done; load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
