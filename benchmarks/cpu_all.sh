#!/usr/bin/env bash
# Every CPU measurement behind benchmarks/RESULTS.md (about 8 minutes on 2 cores):
# the same steps as gpu_all.sh at the CPU sizes (width and batch 256), each writing
# its JSON to $OUT (default benchmarks/results) as cpu_*.json, its log to cpu_log.txt.
#
#   bash benchmarks/cpu_all.sh
#   python benchmarks/report.py benchmarks/results/cpu_*.json   # the tables
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-benchmarks/results}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cpu
PY=${PYTHON:-python}
LOG="$OUT/cpu_log.txt"

step() {
  echo "=== $(date -u +%T) load: $(cut -d' ' -f1-3 /proc/loadavg) | $*" | tee -a "$LOG"
  "$PY" "$@" >>"$LOG" 2>&1
  echo "=== $(date -u +%T) exit $?" | tee -a "$LOG"
}

{ date -u; uptime; nproc; "$PY" -c "import jax, flax; print('jax', jax.__version__, 'flax', flax.__version__)"; } >"$LOG" 2>&1

step benchmarks/overhead.py --quick --rounds 31 --json "$OUT/cpu_overhead.json"
step benchmarks/op.py --size 67108864 --rounds 11 --json "$OUT/cpu_op.json"
step benchmarks/compile.py --json "$OUT/cpu_compile.json"
step benchmarks/peers.py --quick --rounds 21 --threads 1 --dtypes float32,bfloat16 \
  --compile-dtypes float32 --json "$OUT/cpu_peers.json"
echo "=== $(date -u +%T) done; load: $(cut -d' ' -f1-3 /proc/loadavg)" | tee -a "$LOG"
