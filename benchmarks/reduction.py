"""What one node's reduction costs at a layer's size, formulation by formulation.

Each configuration is a ``lax.scan`` of ``--length`` dependent iterations over one
float32 cotangent ``g`` of shape (n, n), so the per-call dispatch is spread over
many nodes the way it is in a training step. An iteration is one elementwise pass
``g * c + d`` (the pass that follows a BGN node anyway, in the model: ``g * tanh'``),
preceded for every variant but ``pass`` by a sum of squares whose result scales
it: several formulations of the same plain sum (``sum``: ``jnp.sum(g * g)``;
``rows_then_all``: per-row sums first; ``lanes1024``: g reshaped to rows of 1024,
column sums, then their sum; ``gemv``: ``(g * g)`` as a row vector times ones), the
library's backward whole batch (``bgn``) and per example (``bgn_per_example``).

``ratio`` is the time per iteration over ``pass``'s: what the node adds on top of
the elementwise pass it shares. On 2 CPU cores the plain sum costs the same in every
formulation, so the rewrites of the sum are not where a faster CPU node comes from.

Usage::

  python benchmarks/reduction.py --quick --json reduction.json   # n = 64, 128, 256
  python benchmarks/reduction.py --json reduction.json           # n up to 1024
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import Any

import harness
import jax
import jax.numpy as jnp

from bgn_jax import core

#: Formulations of the same plain sum of squares.
PLAIN_SUMS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "sum": lambda g: jnp.sum(g * g),
  "rows_then_all": lambda g: jnp.sum(jnp.sum(g * g, axis=1)),
  "lanes1024": lambda g: jnp.sum(jnp.sum((g * g).reshape(-1, min(g.size, 1024)), axis=0)),
  "gemv": lambda g: ((g * g).reshape(1, -1) @ jnp.ones((g.size, 1), g.dtype))[0, 0],
}


def make_iteration(variant: str, n: int) -> Callable[[jax.Array], jax.Array]:
  """One scan iteration of ``variant`` on an (n, n) float32 array."""
  c, d = jnp.float32(1.0001), jnp.float32(1e-3)
  if variant == "pass":
    return lambda g: g * c + d
  if variant in ("bgn", "bgn_per_example"):
    config = core.make_config((n, n), axes=None if variant == "bgn" else 1)
    return lambda g: core.normalize_cotangent(g, config) * c + d
  sum_of_squares = PLAIN_SUMS[variant]
  target = jnp.float32(n)  # sqrt of the n * n entries
  return lambda g: g * (target / jnp.sqrt(sum_of_squares(g))) * c + d


VARIANTS = ("pass", *PLAIN_SUMS, "bgn", "bgn_per_example")


def measure(n: int, args: argparse.Namespace, env: dict[str, Any]) -> list[dict[str, Any]]:
  g = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  runs = {}
  for variant in args.variants:
    iteration = make_iteration(variant, n)
    scan = jax.jit(
      lambda g, it=iteration: jax.lax.scan(lambda g, _: (it(g), None), g, None, args.length)[0]
    )
    compiled = scan.lower(g).compile()
    jax.block_until_ready(compiled(g))
    runs[variant] = lambda compiled=compiled: compiled(g)
  stats = harness.interleaved_medians(runs, args.rounds, 1)
  base = stats["pass"]
  records = []
  for variant in args.variants:
    s = stats[variant]
    record = harness.record(
      f"reduction/{n}/{variant}",
      "batch" if variant != "bgn_per_example" else "per_example",
      env,
      variant=variant,
      n=n,
      bytes=4 * n * n,
      us_per_iteration=1e6 * s["median_s"] / args.length,
    )
    if variant != "pass":
      record.update(harness.ratios(s, base))
      record["extra_us"] = 1e6 * (s["median_s"] - base["median_s"]) / args.length
    records.append(record)
  return records


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="n = 64, 128, 256")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--sizes", default=None, help="comma-separated n (g is n x n)")
  parser.add_argument("--variants", default=",".join(VARIANTS))
  parser.add_argument("--length", type=int, default=200, help="iterations per scan")
  parser.add_argument("--rounds", type=int, default=15)
  args = parser.parse_args(argv)

  env = harness.print_environment("reduction")
  if args.tiny:
    args.sizes, args.length, args.rounds = args.sizes or "16", 4, 2
  default = "64,128,256" if args.quick else "64,128,256,512,1024"
  sizes = [int(n) for n in harness.parse_list(args.sizes or default)]
  args.variants = ["pass", *(v for v in harness.parse_list(args.variants) if v != "pass")]
  unknown = set(args.variants) - set(VARIANTS)
  if unknown:
    parser.error(f"unknown variants {sorted(unknown)}; choose from {VARIANTS}")

  records = []
  for n in sizes:
    records += measure(n, args, env)
    harness.write_json(args.json, records)
  print(f"{'n':>5} {'KiB':>6} {'variant':16} {'us/iter':>8} {'ratio':>6} {'+us':>7}")
  for r in records:
    ratio = f"{r['ratio']:.2f}" if "ratio" in r else "-"
    extra = f"{r['extra_us']:.2f}" if "extra_us" in r else "-"
    print(
      f"{r['n']:5d} {r['bytes'] / 1024:6.0f} {r['variant']:16} {r['us_per_iteration']:8.2f} "
      f"{ratio:>6} {extra:>7}"
    )


if __name__ == "__main__":
  main()
