#!/usr/bin/env bash
# The deep plain CNN and post-LN Transformer grids on one GPU within one device call: sweeps
# side by side (each a process of its own, sharing the GPU, compiling on its own CPU
# cores), each stopped after LIMIT seconds with Ctrl-C semantics, then one archive.
#
#   DATA_DIR=<folder with the 4 Fashion-MNIST .gz> bash bgn_jax/experiments/gpu_cnn_transformer.sh OUT [LIMIT]
#
# CNN: depth 10/20/50 x 5 methods (a sweep each, so that a time limit cuts every method
# alike) x LeCun/He x seeds 0, 1 x Adam {1e-3, 3e-4}; width 16, the whole training set,
# 1 epoch. Transformer: 6/12/24 blocks x warm-up 0/200 steps (a sweep each) x plain,
# bgn, pre-ln x seeds 0, 1 x Adam {1e-3, 3e-4}; width 32, 4 heads, the whole training
# set, 1 epoch (469 steps).
# Writes OUT/runs/<part>/ (summaries), OUT/logs/<part>.txt and OUT/cnn-transformer.tar.gz.
# ARCHS="cnn" (or "transformer") runs one grid only. A sweep folder already in OUT/runs
# keeps its finished runs: only the rest run. RESUME_FROM=<folder of earlier sweep
# folders> (e.g. docs/results/cnn/h200-1-epoch) first copies the finished CNN runs found
# there into the parts they belong to.
set -u
OUT=${1:?usage: gpu_cnn_transformer.sh OUT [LIMIT]}
LIMIT=${2:-0}
cd "$(dirname "$0")/../.."
mkdir -p "$OUT/logs" "$OUT/runs"
# Twelve processes share the card: none may take most of its memory up front.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
export PYTHONUNBUFFERED=1
C=bgn_jax/experiments/configs
common=(--epochs 1 --train-examples 0 --lrs 1e-3 3e-4 --seeds 0 1 --log-every 100)
ARCHS=${ARCHS:-cnn transformer}
pids=()
for depth in 10 20 50; do
  [[ " $ARCHS " == *" cnn "* ]] || break
  for method in plain bgn bgn-per-example batchnorm residual; do
    part=cnn-d$depth-$method
    if [ -n "${RESUME_FROM:-}" ]; then
      mkdir -p "$OUT/runs/$part/runs"
      for run in "$RESUME_FROM"/cnn-*/runs/*-cnn-d$depth-*-$method-k1-*; do
        [ -f "$run/results.json" ] && cp -r "$run" "$OUT/runs/$part/runs/"
      done
    fi
    bash bgn_jax/experiments/gpu_sweep.sh $C/cnn_gpu.toml "$OUT/runs/$part" "$LIMIT" \
      --depths "$depth" --methods "$method" --width 16 "${common[@]}" \
      >"$OUT/logs/$part.txt" 2>&1 &
    pids+=($!)
  done
done
for depth in 6 12 24; do
  [[ " $ARCHS " == *" transformer "* ]] || break
  for warmup in 0 200; do
    part=tr-d$depth-wu$warmup
    bash bgn_jax/experiments/gpu_sweep.sh $C/transformer_gpu.toml "$OUT/runs/$part" "$LIMIT" \
      --depths "$depth" --warmup-steps "$warmup" --width 32 "${common[@]}" \
      >"$OUT/logs/$part.txt" 2>&1 &
    pids+=($!)
  done
done
wait "${pids[@]}"
tar czf "$OUT/cnn-transformer.tar.gz" --exclude=checkpoints --exclude=.jax_cache -C "$OUT" runs logs
