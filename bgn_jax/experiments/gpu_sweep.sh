#!/usr/bin/env bash
# Runs a bgn-jax sweep on a GPU (or TPU) machine, resumably, and packs the results.
#
#   bash bgn_jax/experiments/gpu_sweep.sh [CONFIG] [OUT] [SECONDS] [SWEEP FLAGS...]
#
# CONFIG  a sweep TOML (default: the paper grid sized for one GPU session)
# OUT     the sweep folder (default runs/paper-gpu); rerun with the same OUT to resume
# SECONDS stop after this long with Ctrl-C semantics (the run in progress saves a
#         checkpoint and continues on the next call); 0 or absent: no limit
# SWEEP FLAGS are passed on to `bgn-jax sweep` and override the file (--depths 50 ...)
# Environment: PYTHON (default python3), DATA_DIR (folder with the four
# Fashion-MNIST .gz files, when they are not in /usr/share/datasets/fashion-mnist
# or the cache), PACK (a .tar.gz to write the summaries and run results to).
set -u
CONFIG=${1:-bgn_jax/experiments/configs/paper_gpu.toml}
OUT=${2:-runs/paper-gpu}
LIMIT=${3:-0}
PYTHON=${PYTHON:-python3}
args=(sweep --config "$CONFIG" --out "$OUT" --no-progress "${@:4}")
if [ -n "${DATA_DIR:-}" ]; then args+=(--data-dir "$DATA_DIR"); fi
"$PYTHON" -c "import jax; print('devices:', jax.devices())"
started=$(date +%s)
if [ "$LIMIT" -gt 0 ]; then
  timeout --signal=INT --kill-after=60 "$LIMIT" "$PYTHON" -m bgn_jax "${args[@]}"
else
  "$PYTHON" -m bgn_jax "${args[@]}"
fi
status=$?
echo "sweep exit status $status after $(( $(date +%s) - started )) s"
cat "$OUT/summary.md" 2>/dev/null
if [ -n "${PACK:-}" ]; then
  tar czf "$PACK" --exclude=checkpoints --exclude=.jax_cache "$OUT"
fi
exit $status
