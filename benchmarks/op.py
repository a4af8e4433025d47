"""The BGN backward alone against a plain multiply-by-constant of the same array.

The cotangent is a float32 array of 64M entries shaped (65536, 1024) (4M with
``--quick``); ``batch`` normalizes it as one group, ``per_example`` each row of
1024. Each variant's backward (``harness.VARIANTS``) and ``g * 1.7`` are jit-compiled
and timed in interleaved rounds; the time is the median sample.

``ratio`` is the time over the multiply's. The ``eager`` records time a call of
``bgn_jax.bgn`` on a concrete (64, 32) array outside any transform, in
microseconds, with a jitted identity's for comparison. ``gb_per_s`` counts the fewest bytes each
must move: the backward reads g twice (the sums, then the rescale) and writes it
once, the multiply reads it once and writes it once. So a backward as fast as
memory allows has ratio 1.5 and the same GB/s as the multiply.

Usage::

  python benchmarks/op.py --quick --json op.json
  python benchmarks/op.py --json op.json            # 64M entries
"""

from __future__ import annotations

import argparse
import math
from typing import Any

import harness
import jax
import jax.numpy as jnp
import numpy as np
from overhead import make_step

import bgn_jax

ROW = 1024


def bgn_backward(g: jax.Array, mode: str) -> jax.Array:
  """The cotangent bgn_jax.bgn sends down when ``g`` arrives, jit-compiled."""
  node = harness.make_node("bgn", mode)
  return jax.jit(lambda g: jax.vjp(node, g)[1](g)[0])(g)


def check_bgn(g: jax.Array) -> list[str]:
  """Checks the library's backward on this device against a float64 NumPy reference.

  On ``g`` itself and on small groups of 1e-30, 1e30, zeros, NaN and Inf entries,
  whole batch and per example, float32 and bfloat16. Returns the failures.
  """
  failures = []
  rng = np.random.default_rng(1)
  edge = rng.standard_normal((8, 64))
  edge[1] *= 1e-30
  edge[2] *= 1e30
  edge[3] = 0
  edge[4, 7] = np.nan
  edge[5, 9] = np.inf
  edge[6, :32] *= 1e-30
  edge[7, 0] = 1e30
  cases = [("benchmark array", g)]
  cases += [(f"edge rows {dtype}", jnp.asarray(edge, dtype)) for dtype in ("float32", "bfloat16")]
  cases += [("all 1e-30 float32", jnp.asarray(edge[1:2], jnp.float32))]
  # Groups of one entry, where XLA drops the reduction and simplifies across it.
  cases += [("one entry", jnp.asarray([[1.2e-9]], jnp.float32))]
  cases += [("rows of one", jnp.asarray([[1e-30], [1e30], [-2e-9], [0.0]], jnp.float32))]
  for label, x in cases:
    xs = np.asarray(x.astype(jnp.float32), np.float64)
    tol = 1e-5 if x.dtype == jnp.float32 else 1e-2
    for mode in ("batch", "per_example"):
      out = np.asarray(bgn_backward(x, mode).astype(jnp.float32), np.float64)
      groups = [xs] if mode == "batch" else list(xs)
      outs = [out] if mode == "batch" else list(out)
      target = math.sqrt(xs.shape[1])
      for i, (gi, oi) in enumerate(zip(groups, outs, strict=True)):
        where = f"{label} {mode} group {i}"
        if not np.all(np.isfinite(gi)):
          if not np.all(np.isnan(oi)):
            failures.append(f"{where}: a non-finite group did not become all NaN")
        elif not np.any(gi):
          if np.any(oi):
            failures.append(f"{where}: a zero group did not stay zero")
        else:
          largest = np.abs(gi).max()
          norm = np.sqrt(np.sum((gi / largest) ** 2)) * largest
          got = np.sqrt(np.sum(oi * oi))
          close = np.allclose(oi, gi * (target / norm), rtol=tol, atol=tol * target / 8)
          if abs(got / target - 1) > tol or not close:
            failures.append(f"{where}: norm {got:.7g}, want {target:.7g}")
  return failures


def eager_records(env: dict[str, Any], rounds: int, calls: int) -> list[dict[str, Any]]:
  """Microseconds per eager call of ``bgn_jax.bgn`` on a concrete array, outside any
  transform, against a jitted identity's (JAX's cheapest dispatch) on the same array."""
  x = jnp.ones((64, 32))
  identity = jax.jit(lambda x: x)
  runs = {"bgn": lambda: bgn_jax.bgn(x, axes=1), "jit_identity": lambda: identity(x)}
  for run in runs.values():
    jax.block_until_ready(run())
  stats = harness.interleaved_medians(runs, rounds, calls)
  return [
    harness.record(
      f"op/eager/{name}",
      "eager",
      env,
      variant=name,
      us_per_call=1e6 * s["median_s"],
      q1_us=1e6 * s["q1_s"],
      q3_us=1e6 * s["q3_s"],
      samples=s["samples"],
      **harness.ratios(s, stats["jit_identity"]),
    )
    for name, s in stats.items()
  ]


def dump_hlo(path: str, g: jax.Array) -> None:
  """Writes XLA's optimized HLO of the backward alone and of a 2-layer training step."""
  texts = []
  for mode in ("batch", "per_example"):
    node = harness.make_node("bgn", mode)
    backward = jax.jit(lambda g, node=node: jax.vjp(node, g)[1](g)[0])
    texts.append(f"==== bgn backward alone, {mode}\n" + backward.lower(g).compile().as_text())
  width = 1024
  for loop in ("scan", "unrolled"):
    step = make_step(loop, harness.make_node("bgn", "batch"))
    params = (
      {"w": jnp.ones((2, width, width)), "b": jnp.zeros((2, width))}
      if loop == "scan"
      else [{"w": jnp.ones((width, width)), "b": jnp.zeros(width)}] * 2
    )
    x = jnp.ones((width, width))
    text = step.lower(params, x, x).compile().as_text()
    texts.append(f"==== training step, 2 layers, {loop}, bgn batch\n" + text)
  with open(path, "w") as f:
    f.write("\n\n".join(texts))
  print(f"wrote the optimized HLO to {path}", flush=True)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="4M entries, fewer rounds")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--size", type=int, default=None, help="entries (default 64M)")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--modes", default="batch,per_example")
  parser.add_argument("--variants", default=",".join(harness.VARIANTS))
  parser.add_argument("--rounds", type=int, default=None)
  parser.add_argument("--steps-per-round", type=int, default=None)
  parser.add_argument("--dump-hlo", default=None, help="write the optimized HLO here")
  args = parser.parse_args(argv)

  env = harness.print_environment("op")
  size = args.size or (2**16 if args.tiny else 2**22 if args.quick else 2**26)
  rounds = args.rounds or (2 if args.tiny else 7 if args.quick else 21)
  steps = args.steps_per_round or (1 if args.tiny else 2 if env["backend"] == "cpu" else 10)
  dtype = jnp.dtype(args.dtype)
  shape = (size // ROW, ROW)
  g = jax.random.normal(jax.random.key(0), shape, jnp.float32).astype(dtype)
  element_bytes = g.size * dtype.itemsize
  if args.dump_hlo:
    dump_hlo(args.dump_hlo, g)
  failures = check_bgn(g if args.tiny or args.quick else g[: 2**22 // ROW])
  print(f"numerics check of bgn_jax.bgn on this device: {failures or 'ok'}", flush=True)

  runs: dict[str, Any] = {"scale": jax.jit(lambda g: g * jnp.asarray(1.7, g.dtype))}
  moved = {"scale": 2 * element_bytes}
  for variant in harness.parse_list(args.variants):
    for mode in harness.parse_list(args.modes):
      node = harness.make_node(variant, mode)

      def backward(g: jax.Array, node: Any = node) -> jax.Array:
        return jax.vjp(node, g)[1](g)[0]

      runs[f"{variant}/{mode}"] = jax.jit(backward)
      moved[f"{variant}/{mode}"] = 3 * element_bytes
  for run in runs.values():
    jax.block_until_ready(run(g))

  stats = harness.interleaved_medians(
    {name: (lambda run=run: run(g)) for name, run in runs.items()}, rounds, steps
  )
  records = []
  for name, s in stats.items():
    variant, _, mode = name.partition("/")
    record = harness.record(
      f"op/{args.dtype}/{name}",
      mode or "scale",
      env,
      variant=variant,
      dtype=args.dtype,
      entries=g.size,
      ms=1e3 * s["median_s"],
      q1_ms=1e3 * s["q1_s"],
      q3_ms=1e3 * s["q3_s"],
      samples=s["samples"],
      bytes_moved=moved[name],
      gb_per_s=moved[name] / s["median_s"] / 1e9,
    )
    if name != "scale":
      record.update(harness.ratios(s, stats["scale"]))
    records.append(record)
  eager = eager_records(env, rounds, 100 if args.tiny else 2000)
  records.extend(eager)
  records.append(
    harness.record(
      "op/check",
      "check",
      env,
      bgn_version=bgn_jax.__version__,
      check="ok" if not failures else "; ".join(failures),
    )
  )
  harness.write_json(args.json, records)

  print(f"{'variant':13} {'mode':12} {'ms':>9} {'ratio':>7} {'GB/s':>8}")
  for r in records[: -1 - len(eager)]:
    ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
    print(f"{r['variant']:13} {r['mode']:12} {r['ms']:9.3f} {ratio:>7} {r['gb_per_s']:8.1f}")
  for r in eager:
    print(f"eager call, {r['variant']:13} {r['us_per_call']:8.2f} us  ratio {r['ratio']:.3f}")


if __name__ == "__main__":
  main()
