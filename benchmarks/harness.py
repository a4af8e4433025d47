"""Shared pieces of the benchmark scripts: the environment record, timing, JSON, and
the reference BGN variants that the tables compare the library against.

The reference variants are deliberately small copies of other formulations of the
backward rule, kept here (not in the library) so one run can price each of them
against :func:`bgn_jax.bgn` on the same machine:

- ``naive``: a plain float32 sum of squares, no under/overflow safety;
- ``two_pass``: the textbook robust norm, a max-abs pass, then the sum of squares
  of ``g / max``, then the multiply (three passes over ``g``);
- ``masked_bands``: the library's backward up to commit c6882a3, Blue's three magnitude
  bands selected by masks (abs, two compares, three selects per entry);
- ``three_sums``: the library's first GPU branch (commit a69a74b) on every platform:
  the plain sum and two scaled copies as three sibling sums, no masks, no conditional;
- ``variadic``: the same three sums as one variadic ``lax.reduce``, the library's GPU
  branch since XLA on an H100 was seen to read g three times for three sibling sums.
"""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

import bgn_jax

__all__ = [
  "VARIANTS",
  "environment",
  "interleaved_medians",
  "make_node",
  "paired_ratio",
  "parse_list",
  "print_environment",
  "ratios",
  "record",
  "robust_norm",
  "write_json",
]

F32 = jnp.float32


def environment() -> dict[str, Any]:
  """What ran the benchmark: versions, device and host."""
  device = jax.devices()[0]
  # The cores this process may run on (fewer than the machine's under taskset).
  cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
  return {
    "jax_version": jax.__version__,
    "backend": jax.default_backend(),
    "device": device.device_kind if device.platform != "cpu" else f"cpu ({cores} cores)",
    "python": platform.python_version(),
    "host": platform.machine(),
  }


def print_environment(script: str) -> dict[str, Any]:
  """Prints and returns :func:`environment`, so every log says what it measured."""
  env = environment()
  print(f"{script}: jax {env['jax_version']} on {env['backend']}: {env['device']}", flush=True)
  return env


def record(name: str, mode: str, env: dict[str, Any], **fields: Any) -> dict[str, Any]:
  """One JSON record: the contract's ``name``, ``mode`` and ``device``, the backend
  and jax version from ``env`` (:func:`environment`), then ``fields``."""
  return {
    "name": name,
    "mode": mode,
    "device": env["device"],
    "backend": env["backend"],
    "jax_version": env["jax_version"],
    **fields,
  }


def ratios(stats: dict[str, Any], base: dict[str, Any], suffix: str = "") -> dict[str, float]:
  """``ratio`` (of the median samples) and ``paired_ratio`` of one timing from
  :func:`interleaved_medians` against a baseline's, the keys ending in ``suffix``."""
  return {
    f"ratio{suffix}": stats["median_s"] / base["median_s"],
    f"paired_ratio{suffix}": paired_ratio(stats["values"], base["values"]),
  }


def write_json(path: str | None, records: Sequence[dict[str, Any]]) -> None:
  """Writes the records as a JSON list (nothing when ``path`` is None)."""
  if path is None:
    return
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  with open(path, "w") as f:
    json.dump(list(records), f, indent=1)
  print(f"wrote {len(records)} records to {path}", flush=True)


def interleaved_medians(
  runs: dict[str, Callable[[], Any]], rounds: int, steps_per_round: int
) -> dict[str, dict[str, float]]:
  """Times each callable in turn, ``rounds`` times, and returns per-step statistics.

  Every round runs each callable ``steps_per_round`` times back to back and waits
  for the last result, so slow phases of a shared machine hit every variant alike.

  Args:
    runs: name -> a callable that runs one step and returns something to wait on.
    rounds: the number of samples per name.
    steps_per_round: steps timed together in one sample.

  Returns:
    name -> {"median_s", "q1_s", "q3_s", "samples"} of the seconds per step, and
    "values": the samples in round order (for ratios paired by round).
  """
  samples: dict[str, list[float]] = {name: [] for name in runs}
  for _ in range(rounds):
    for name, run in runs.items():
      start = time.perf_counter()
      out = None
      for _ in range(steps_per_round):
        out = run()
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / steps_per_round)
  stats = {}
  for name, values in samples.items():
    q1, _, q3 = statistics.quantiles(values, n=4) if len(values) > 1 else (values[0],) * 3
    stats[name] = {
      "median_s": statistics.median(values),
      "q1_s": q1,
      "q3_s": q3,
      "samples": len(values),
      "values": values,
    }
  return stats


def paired_ratio(values: Sequence[float], base: Sequence[float]) -> float:
  """The median over rounds of ``values[i] / base[i]``: robust to slow phases of a
  shared machine, since both samples of a pair were taken in the same round."""
  return statistics.median(v / b for v, b in zip(values, base, strict=True))


# ---------------------------------------------------------------- reference variants
# Each returns (r, k) per group with ||g|| = r / k, from the float32 copy `a` of g.


def _sum(v: jax.Array, axes: tuple[int, ...] | None) -> jax.Array:
  return jnp.sum(v, axis=axes, keepdims=True)


def _naive(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  return jnp.sqrt(_sum(a * a, axes)), jnp.ones((), a.dtype)


def _two_pass(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  largest = jnp.max(jnp.abs(a), axis=axes, keepdims=True)
  largest = jnp.where(largest > 0, largest, 1)
  scaled = a / largest
  return jnp.sqrt(_sum(scaled * scaled, axes)), 1 / largest


def _hypot(x: jax.Array, y: jax.Array) -> jax.Array:
  larger, smaller = jnp.maximum(x, y), jnp.minimum(x, y)
  ratio = smaller / jnp.where(larger > 0, larger, 1)
  return larger * jnp.sqrt(1 + ratio * ratio)


def _masked_bands(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  # bgn_jax.core up to commit c6882a3 (float32 constants).
  up, down = F32(2.0**90), F32(2.0**-90)
  a = jnp.abs(a)
  is_small, is_big = a < 2.0**-50, a > 2.0**40
  mid = jnp.where(is_small | is_big, 0, a)
  small = jnp.where(is_small, a * up, 0)
  big = jnp.where(is_big, a * down, 0)
  small_r, mid_r, big_r = (jnp.sqrt(_sum(v * v, axes)) for v in (small, mid, big))
  use_big = big_r > 0
  use_small = ~use_big & (mid_r < 2.0**-30)
  r = jnp.where(
    use_big,
    _hypot(big_r, mid_r * down),
    jnp.where(use_small, _hypot(small_r, mid_r * up), _hypot(mid_r, small_r * down)),
  )
  return r, jnp.where(use_big, down, jnp.where(use_small, up, F32(1)))


def _select_three(
  plain: jax.Array, small: jax.Array, large: jax.Array
) -> tuple[jax.Array, jax.Array]:
  up, down = F32(2.0**64), F32(2.0**-88)
  use_large = ~jnp.isfinite(plain)
  use_small = plain < 2.0**-56
  ss = jnp.where(use_large, large, jnp.where(use_small, small, plain))
  return jnp.sqrt(ss), jnp.where(use_large, down, jnp.where(use_small, up, F32(1)))


def _three_sums(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  up, down = F32(2.0**64), F32(2.0**-88)
  plain, small, large = (_sum(v * v, axes) for v in (a, a * up, a * down))
  return _select_three(plain, small, large)


def _variadic(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  up, down = F32(2.0**64), F32(2.0**-88)
  dims = tuple(range(a.ndim)) if axes is None else axes
  small, large = a * up, a * down
  zero = F32(0)
  sums = jax.lax.reduce(
    (a * a, small * small, large * large),
    (zero, zero, zero),
    lambda x, y: tuple(xi + yi for xi, yi in zip(x, y, strict=True)),
    dims,
  )
  keep = tuple(1 if i in dims else n for i, n in enumerate(a.shape))
  return _select_three(*(s.reshape(keep) for s in sums))


def robust_norm(a: jax.Array, axes: tuple[int, ...] | None) -> tuple[jax.Array, jax.Array]:
  """(r, k) with ||a|| = r / k: the library's GPU formulation (three sums, one reduce)."""
  return _variadic(a, axes)


_NORMS = {
  "naive": _naive,
  "two_pass": _two_pass,
  "masked_bands": _masked_bands,
  "three_sums": _three_sums,
  "variadic": _variadic,
}

#: Every variant name, the library last.
VARIANTS = (*_NORMS, "bgn")


def make_node(variant: str, mode: str) -> Callable[[jax.Array], jax.Array]:
  """A BGN node ``x -> x`` of the given variant, whole batch or per example.

  Args:
    variant: one of :data:`VARIANTS`; ``"bgn"`` is :func:`bgn_jax.bgn` itself.
    mode: ``"batch"`` (one group, the whole cotangent) or ``"per_example"``
      (one group per index of axis 0).

  Returns:
    A function of a 2-D array with the identity forward and the variant's backward
    (target norm sqrt(units per example)).
  """
  if mode not in ("batch", "per_example"):
    raise ValueError(f"mode must be 'batch' or 'per_example'; got {mode!r}.")
  axes = None if mode == "batch" else (1,)
  if variant == "bgn":
    return functools.partial(bgn_jax.bgn, axes=axes)
  if variant not in _NORMS:
    raise ValueError(f"unknown variant {variant!r}; choose from {VARIANTS}.")
  norm = _NORMS[variant]

  @jax.custom_vjp
  def node(x: jax.Array) -> jax.Array:
    return x

  def forward(x: jax.Array) -> tuple[jax.Array, None]:
    return x, None

  def backward(_: None, g: jax.Array) -> tuple[jax.Array]:
    a = g.astype(F32)
    r, k = norm(a, axes)
    target = F32(math.sqrt(math.prod(g.shape[1:])))
    factor = jnp.where(r > 0, target / jnp.where(r > 0, r, 1), 0)
    return (((a * k) * factor).astype(g.dtype),)

  node.defvjp(forward, backward)
  return node


def parse_list(text: str) -> list[str]:
  """Splits a comma-separated command-line list."""
  return [item for item in text.split(",") if item]
