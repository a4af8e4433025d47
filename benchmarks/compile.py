"""Compile time of the MLP training step against depth, with and without BGN.

The step is the one of ``overhead.py`` (tanh MLP, SGD), lowered from shapes alone
(no parameters are allocated) at depths 10, 100 and 1000, as ``lax.scan`` and as
an unrolled Python loop, without BGN and with ``bgn_jax.bgn`` after every layer
(whole batch and per example). ``lower_s`` is tracing and lowering to StableHLO,
``compile_s`` is XLA's compile; ``ratio`` is the total over the same configuration's
total at the smallest depth, ``bgn_ratio`` the total over the total without BGN at
the same depth.

An unrolled depth whose compile time, extrapolated linearly from the depth before
it, would pass ``--max-seconds`` is skipped, and its record says so (on 2 CPU
cores the unrolled depth-1000 step takes minutes).

Usage::

  python benchmarks/compile.py --quick --json compile.json   # depths 10, 30, 100
  python benchmarks/compile.py --json compile.json           # depths 10, 100, 1000
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import harness
import jax
import jax.numpy as jnp
from overhead import init_params, make_step


def compile_seconds(loop: str, node: Any, depth: int, width: int, dtype: Any) -> dict[str, float]:
  """Seconds to trace and lower, and to compile, one fresh training step."""
  params = jax.eval_shape(
    lambda: init_params(jax.random.key(0), depth, width, dtype, loop)  # shapes only
  )
  x = jax.ShapeDtypeStruct((width, width), dtype)
  y = jax.ShapeDtypeStruct((width, width), jnp.float32)
  step = make_step(loop, node)
  start = time.perf_counter()
  lowered = step.lower(params, x, y)
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {"lower_s": lowered_at - start, "compile_s": done - lowered_at, "total_s": done - start}


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="depths 10, 30, 100")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--depths", default=None, help="comma-separated, increasing")
  parser.add_argument("--width", type=int, default=None, help="default 1024 on GPU, else 256")
  parser.add_argument("--dtype", default="float32")
  parser.add_argument("--loops", default="scan,unrolled")
  parser.add_argument("--modes", default="batch,per_example")
  parser.add_argument("--max-seconds", type=float, default=120.0, help="skip predicted longer")
  args = parser.parse_args(argv)

  env = harness.print_environment("compile")
  if args.tiny:
    depths, width = [2, 4], 16
  else:
    default = "10,30,100" if args.quick else "10,100,1000"
    depths = [int(d) for d in harness.parse_list(args.depths or default)]
    width = args.width or (1024 if env["backend"] == "gpu" and not args.quick else 256)
  dtype = jnp.dtype(args.dtype)
  configs = {("none", "none"): None}
  for mode in harness.parse_list(args.modes):
    configs[("bgn", mode)] = harness.make_node("bgn", mode)

  # The first compile in a process also pays one-time costs (GPU autotuning).
  compile_seconds("scan", None, 2, width, dtype)

  records = []
  for loop in harness.parse_list(args.loops):
    for (variant, mode), node in configs.items():
      previous = None
      for depth in depths:
        record = harness.record(
          f"compile/{loop}/{mode}/{variant}/depth{depth}",
          mode,
          env,
          variant=variant,
          loop=loop,
          depth=depth,
          width=width,
          dtype=args.dtype,
        )
        predicted = None if previous is None else previous[1] * depth / previous[0]
        if loop == "unrolled" and predicted is not None and predicted > args.max_seconds:
          record["skipped"] = (
            f"predicted {predicted:.0f} s (linear from depth {previous[0]}), "
            f"over --max-seconds {args.max_seconds:.0f}"
          )
          print(f"{loop:9} {mode:12} depth {depth:5}: skipped, {record['skipped']}", flush=True)
          records.append(record)
          continue
        record.update(compile_seconds(loop, node, depth, width, dtype))
        previous = (depth, record["total_s"])
        print(
          f"{loop:9} {mode:12} depth {depth:5}: lower {record['lower_s']:7.2f} s, "
          f"compile {record['compile_s']:7.2f} s",
          flush=True,
        )
        records.append(record)
        harness.write_json(args.json, records)

  totals = {(r["loop"], r["mode"], r["depth"]): r["total_s"] for r in records if "total_s" in r}
  for r in records:
    if "total_s" in r:
      r["ratio"] = r["total_s"] / totals[(r["loop"], r["mode"], depths[0])]
      if r["variant"] != "none" and (r["loop"], "none", r["depth"]) in totals:
        r["bgn_ratio"] = r["total_s"] / totals[(r["loop"], "none", r["depth"])]
  harness.write_json(args.json, records)

  print(f"{'loop':9} {'mode':12} {'depth':>5} {'total s':>8} {'vs d0':>6} {'vs none':>7}")
  for r in records:
    if "total_s" not in r:
      print(f"{r['loop']:9} {r['mode']:12} {r['depth']:5} skipped")
      continue
    bgn_ratio = f"{r['bgn_ratio']:.2f}" if "bgn_ratio" in r else "-"
    print(
      f"{r['loop']:9} {r['mode']:12} {r['depth']:5} {r['total_s']:8.2f} "
      f"{r['ratio']:6.2f} {bgn_ratio:>7}"
    )


if __name__ == "__main__":
  main()
