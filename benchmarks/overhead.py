"""Step-time overhead of BGN after every layer of a deep MLP, and its peak memory.

One process builds the same training step (tanh MLP, depth 50, a plain SGD update)
without BGN and with a BGN node after every layer, for every variant in
``harness.VARIANTS`` (the library's ``bgn`` and the reference formulations), whole
batch and per example, as an unrolled Python loop and as ``lax.scan``, in float32
and bfloat16; and ``deferred``, an experiment that hand-writes each layer's backward
so that the whole-batch scalar is applied after the layer's matrix products
(:func:`handwritten_layer`), priced against the same hand-written layer without
BGN (``ratio_vs_handwritten``). Repetitions are interleaved across all configurations; each sample
is the mean of a few back-to-back steps, and the reported time is the median
sample. ``ratio`` is the step time with BGN over the step time without;
``paired_ratio`` the median over rounds of the same ratio within each round.

Peak memory comes from the compiled executable's ``memory_analysis()``: the
temporaries plus the arguments and outputs, less what is aliased (donated).
BGN keeps no residuals, so a step with it should need at most its per-group sums
more (``extra_peak_bytes``); ``extra_below_one_activation`` checks that the extra
is less than one (batch, width) activation, whatever XLA's schedule adds.

Usage::

  python benchmarks/overhead.py --quick --json overhead.json   # CPU, width 256
  python benchmarks/overhead.py --json overhead.json           # width 1024 on GPU
"""

from __future__ import annotations

import argparse
import functools
import math
from collections.abc import Callable
from typing import Any

import harness
import jax
import jax.numpy as jnp

LEARNING_RATE = 1e-4


def init_params(key: jax.Array, depth: int, width: int, dtype: Any, loop: str) -> Any:
  """LeCun-normal weights and zero biases: stacked for scan, a list for the loop."""
  w = jax.random.normal(key, (depth, width, width), jnp.float32) / math.sqrt(width)
  w = w.astype(dtype)
  b = jnp.zeros((depth, width), dtype)
  if loop == "scan":
    return {"w": w, "b": b}
  return [{"w": w[i], "b": b[i]} for i in range(depth)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def handwritten_layer(deferred_bgn: bool, h: jax.Array, w: jax.Array, b: jax.Array) -> jax.Array:
  """``tanh(h @ w + b)`` with a hand-written backward; with ``deferred_bgn``, followed by
  a whole-batch BGN node whose scalar is deferred past the layer.

  An experiment, not the library: the backward sums g's squares in the same pass
  that forms the unscaled ``g * tanh'``, and multiplies the node's scalar into
  the three products afterwards, where XLA can fuse it into their consumers. The
  unscaled ``g * tanh'`` can under/overflow where the library's node would not.
  Without ``deferred_bgn`` it is the baseline that the deferred node is priced
  against (the same hand-written backward, no node).
  """
  del deferred_bgn
  return jnp.tanh(h @ w + b)


def _handwritten_forward(
  deferred_bgn: bool, h: jax.Array, w: jax.Array, b: jax.Array
) -> tuple[jax.Array, tuple]:
  del deferred_bgn
  y = jnp.tanh(h @ w + b)
  return y, (h, w, y)


def _handwritten_backward(deferred_bgn: bool, residuals: tuple, g: jax.Array) -> tuple:
  h, w, y = residuals
  a = g.astype(jnp.float32)
  pre = (a * (1 - jnp.square(y.astype(jnp.float32)))).astype(g.dtype)
  dw = h.T @ pre
  db = jnp.sum(pre.astype(jnp.float32), axis=0)
  dh = pre @ w.T
  if deferred_bgn:
    r, k = harness.robust_norm(a, None)
    target = math.sqrt(g.shape[1])
    scale = jnp.where(r > 0, (target * k) / jnp.where(r > 0, r, 1), 0).reshape(())
    dw, db, dh = scale * dw, scale * db, scale * dh
  return dh.astype(h.dtype), dw.astype(w.dtype), db.astype(w.dtype)  # b has w's dtype here


handwritten_layer.defvjp(_handwritten_forward, _handwritten_backward)


def make_step(loop: str, node: Callable[[jax.Array], jax.Array] | str | None) -> Callable:
  """One SGD step of the MLP; ``node`` (or nothing) follows every tanh layer.

  ``node`` ``"deferred"`` or ``"handwritten"`` uses :func:`handwritten_layer` for every
  layer instead, with and without its deferred BGN node.
  """

  def layer(h: jax.Array, p: dict[str, jax.Array]) -> jax.Array:
    if node in ("deferred", "handwritten"):
      return handwritten_layer(node == "deferred", h, p["w"], p["b"])
    h = jnp.tanh(h @ p["w"] + p["b"])
    return h if node is None else node(h)

  def forward(params: Any, x: jax.Array) -> jax.Array:
    if loop == "scan":
      h, _ = jax.lax.scan(lambda h, p: (layer(h, p), None), x, params)
      return h
    h = x
    for p in params:
      h = layer(h, p)
    return h

  def loss(params: Any, x: jax.Array, y: jax.Array) -> jax.Array:
    diff = forward(params, x).astype(jnp.float32) - y
    return 0.5 * jnp.mean(diff * diff)

  def step(params: Any, x: jax.Array, y: jax.Array) -> Any:
    grads = jax.grad(loss)(params, x, y)
    return jax.tree.map(lambda p, g: p - (LEARNING_RATE * g).astype(p.dtype), params, grads)

  return jax.jit(step, donate_argnums=0)


def peak_bytes(compiled: Any) -> dict[str, int]:
  """Arguments + outputs + temporaries - aliased bytes, from XLA's memory analysis."""
  stats = compiled.memory_analysis()
  peak = (
    stats.argument_size_in_bytes
    + stats.output_size_in_bytes
    + stats.temp_size_in_bytes
    - stats.alias_size_in_bytes
  )
  return {"temp_bytes": int(stats.temp_size_in_bytes), "peak_bytes": int(peak)}


def measure(
  dtype_name: str, loop: str, args: argparse.Namespace, env: dict[str, Any]
) -> list[dict[str, Any]]:
  """Compiles and times the baseline and every (variant, mode) for one dtype and loop."""
  dtype = jnp.dtype(dtype_name)
  key_w, key_x, key_y = jax.random.split(jax.random.key(0), 3)
  x = jax.random.normal(key_x, (args.batch, args.width), jnp.float32).astype(dtype)
  y = jax.random.normal(key_y, (args.batch, args.width), jnp.float32)

  configs: dict[tuple[str, str], Any] = {("none", "none"): None}
  for variant in args.variants:
    for mode in args.modes:
      if variant == "deferred":
        if mode == "batch":  # a per-example scalar cannot pass the weight products
          configs[("handwritten", "none")] = "handwritten"
          configs[(variant, mode)] = "deferred"
      else:
        configs[(variant, mode)] = harness.make_node(variant, mode)

  runs = {}
  memory = {}
  for (variant, mode), node in configs.items():
    step = make_step(loop, node)
    state = {"params": init_params(key_w, args.depth, args.width, dtype, loop)}
    compiled = step.lower(state["params"], x, y).compile()
    memory[(variant, mode)] = peak_bytes(compiled)

    def run(step: Callable = compiled, state: dict[str, Any] = state) -> Any:
      state["params"] = step(state["params"], x, y)
      return state["params"]

    for _ in range(args.warmup):
      jax.block_until_ready(run())
    runs[(variant, mode)] = run

  stats = harness.interleaved_medians(
    {f"{v}/{m}": run for (v, m), run in runs.items()}, args.rounds, args.steps_per_round
  )
  base = stats["none/none"]["median_s"]
  base_memory = memory[("none", "none")]
  records = []
  for variant, mode in configs:
    s = stats[f"{variant}/{mode}"]
    record = harness.record(
      f"overhead/{dtype_name}/{loop}/{mode}/{variant}",
      mode,
      env,
      variant=variant,
      dtype=dtype_name,
      loop=loop,
      depth=args.depth,
      width=args.width,
      batch=args.batch,
      ms_per_step=1e3 * s["median_s"],
      q1_ms=1e3 * s["q1_s"],
      q3_ms=1e3 * s["q3_s"],
      samples=s["samples"],
      steps_per_sample=args.steps_per_round,
      **memory[(variant, mode)],
      baseline_peak_bytes=base_memory["peak_bytes"],
    )
    if variant == "deferred":
      record.update(harness.ratios(s, stats["handwritten/none"], suffix="_vs_handwritten"))
    if variant not in ("none", "handwritten"):
      record.update(harness.ratios(s, stats["none/none"]))
      record["baseline_ms_per_step"] = 1e3 * base
      extra = memory[(variant, mode)]["peak_bytes"] - base_memory["peak_bytes"]
      record["extra_peak_bytes"] = extra
      # No residuals: what BGN adds is its per-group sums, not a saved activation.
      record["extra_below_one_activation"] = extra < args.batch * args.width * dtype.itemsize
    records.append(record)
  return records


def print_table(records: list[dict[str, Any]]) -> None:
  print(
    f"{'dtype':9} {'loop':9} {'mode':12} {'variant':13} {'ms/step':>9} {'ratio':>7} "
    f"{'paired':>7} {'peak MiB':>9} {'+bytes':>7}"
  )
  for r in records:
    ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
    paired = f"{r['paired_ratio']:.3f}" if "paired_ratio" in r else "-"
    extra = str(r.get("extra_peak_bytes", "-"))
    print(
      f"{r['dtype']:9} {r['loop']:9} {r['mode']:12} {r['variant']:13} "
      f"{r['ms_per_step']:9.3f} {ratio:>7} {paired:>7} {r['peak_bytes'] / 2**20:9.2f} {extra:>7}"
    )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="width/batch 256, fewer rounds")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--depth", type=int, default=50)
  parser.add_argument("--width", type=int, default=None, help="default 1024 on GPU, else 256")
  parser.add_argument("--batch", type=int, default=None, help="default: the width")
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--loops", default="scan,unrolled")
  parser.add_argument("--modes", default="batch,per_example")
  parser.add_argument("--variants", default=",".join((*harness.VARIANTS, "deferred")))
  parser.add_argument("--rounds", type=int, default=None, help="samples per configuration")
  parser.add_argument("--steps-per-round", type=int, default=None, help="steps per sample")
  parser.add_argument("--warmup", type=int, default=2)
  args = parser.parse_args(argv)

  env = harness.print_environment("overhead")
  on_gpu = env["backend"] == "gpu"
  if args.tiny:
    args.depth, args.width, args.rounds, args.steps_per_round, args.warmup = 3, 16, 2, 1, 1
  if args.width is None:
    args.width = 1024 if on_gpu and not args.quick else 256
  args.batch = args.batch or args.width
  args.rounds = args.rounds or (10 if args.quick else 21)
  args.steps_per_round = args.steps_per_round or (10 if on_gpu else 2)
  args.dtypes = harness.parse_list(args.dtypes)
  args.loops = harness.parse_list(args.loops)
  args.modes = harness.parse_list(args.modes)
  args.variants = harness.parse_list(args.variants)

  records = []
  for dtype_name in args.dtypes:
    for loop in args.loops:
      print(f"-- {dtype_name} {loop}", flush=True)
      records += measure(dtype_name, loop, args, env)
      harness.write_json(args.json, records)
  print_table(records)


if __name__ == "__main__":
  main()
