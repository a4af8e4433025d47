"""Runs BGN under pmap, shard_map and sharded jit on 8 devices; prints JSON results.

Started by tests/test_multidevice.py in a fresh process with
XLA_FLAGS=--xla_force_host_platform_device_count=8 (it must be set before JAX starts).
"""

from __future__ import annotations

import collections
import contextlib
import functools
import json
import math
import re
import sys

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bgn_jax

sys.path.insert(0, ".")
from tests.reference import reference_backward  # noqa: E402

DEVICES = 8
OPTIONS = [
  {},
  {"target_norm": 1.0},
  {"power": 0.5, "eps": 1e-3},
  {"axes": (1,)},
]


def cotangent():
  rng = np.random.default_rng(0)
  g = rng.standard_normal((16, 6)) * np.logspace(-30, 0, 16)[:, None]
  return jnp.asarray(g, jnp.float32)


def loss(x, w, **options):
  return jnp.sum(bgn_jax.bgn(x, **options) * w)


def joined(options):
  # Per-example groups lie within one device: only whole-batch groups span the batch axis.
  return options if "axes" in options else {"axis_name": "batch", **options}


def with_batch_spec(options):
  return {"spec": PartitionSpec("batch"), **options}


def with_pmap(w, options):
  x = jnp.zeros_like(w).reshape(DEVICES, -1, w.shape[1])
  grad = jax.pmap(jax.grad(functools.partial(loss, **joined(options))), axis_name="batch")
  return grad(x, w.reshape(x.shape)).reshape(w.shape)


def with_shard_map(w, options):
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  spec = PartitionSpec("batch")
  grad = jax.shard_map(
    jax.grad(functools.partial(loss, **with_batch_spec(options))),
    mesh=mesh,
    in_specs=(spec, spec),
    out_specs=spec,
  )
  return jax.jit(grad)(jnp.zeros_like(w), w)


def with_sharded_jit(w, options):
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  sharding = NamedSharding(mesh, PartitionSpec("batch"))
  x = jax.device_put(jnp.zeros_like(w), sharding)
  w_sharded = jax.device_put(w, sharding)
  out = jax.jit(jax.grad(functools.partial(loss, **options)))(x, w_sharded)
  assert len(out.sharding.device_set) == DEVICES
  return out


def grad_of_grad_error():
  """d/dw <rescaled w, v> under shard_map: the norm's derivative summed over devices too."""
  rng = np.random.default_rng(1)
  w, v = (jnp.asarray(rng.standard_normal((16, 6)), jnp.float32) for _ in range(2))
  mesh = Mesh(np.array(jax.devices()), ("batch",))
  spec = PartitionSpec("batch")
  cotangent = jax.shard_map(
    jax.grad(functools.partial(loss, spec=spec)),
    mesh=mesh,
    in_specs=(spec, spec),
    out_specs=spec,
  )
  got = jax.jit(jax.grad(lambda w: jnp.sum(cotangent(jnp.zeros_like(w), w) * v)))(w)
  w64, v64 = np.asarray(w, np.float64), np.asarray(v, np.float64)
  norm, t = np.linalg.norm(w64), np.sqrt(w.shape[1])
  want = t * (v64 / norm - w64 * np.sum(w64 * v64) / norm**3)
  return float(np.max(np.abs(np.asarray(got, np.float64) - want) / np.abs(want).max()))


# The global (B, T, F) array's splits over a ("data": 2, "model": 4) mesh, by name.
SPLITS = {
  "batch": PartitionSpec("data"),
  "features": PartitionSpec(None, None, "model"),
  "batch_features": PartitionSpec("data", None, "model"),
  "batch_sequence": PartitionSpec("data", "model"),
  "batch_over_both": PartitionSpec(("data", "model")),
  "replicated": PartitionSpec(),
}
SHARDED_OPTIONS = {
  "whole_units": {},
  "whole_size": {"target_norm": "sqrt_size"},
  "whole_float": {"target_norm": 2.0},
  "whole_power": {"power": 0.5, "eps": 1e-3},
  "example_units": {"axes": (1, 2)},
  "example_size": {"axes": (1, 2), "target_norm": "sqrt_size"},
  "token_units": {"axes": -1},
}


def mesh_2x4():
  return Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))


def with_spec(g, split, options, *, check_vma=True, node_spec="same"):
  """The gradient below a node on x, a block of the global array split by ``split``."""
  spec = SPLITS[split]
  given = spec if node_spec == "same" else node_spec

  def local_grad(x, w):
    return jax.grad(lambda x: jnp.sum(bgn_jax.bgn(x, spec=given, **options) * w))(x)

  grad = jax.shard_map(
    local_grad, mesh=mesh_2x4(), in_specs=(spec, spec), out_specs=spec, check_vma=check_vma
  )
  return np.asarray(jax.jit(grad)(jnp.zeros_like(g), g), np.float64)


def error_of(got, want):
  return float(np.max(np.abs(got - want)) / np.max(np.abs(want)))


def sharded_errors():
  """Relative errors against one device for every split and option set, and the
  message (or "no error") of each call the node must refuse."""
  g = jnp.asarray(np.random.default_rng(2).standard_normal((8, 4, 8)), jnp.float32)
  results = {}
  for split in SPLITS:
    for name, options in SHARDED_OPTIONS.items():
      want = reference_backward(np.asarray(g), **options)
      results[f"spec-{split}-{name}"] = error_of(with_spec(g, split, options), want)
  # Without check_vma JAX tracks nothing, and spec is trusted as given.
  for split in ("replicated", "batch_features"):
    want = reference_backward(np.asarray(g))
    got = with_spec(g, split, {}, check_vma=False)
    results[f"spec-{split}-unchecked"] = error_of(got, want)

  def refusal(split, options, node_spec):
    try:
      with_spec(g, split, options, node_spec=node_spec)
    except ValueError as error:
      return str(error)
    return "no error"

  results["refused"] = {
    "forgotten_spec_batch": refusal("batch", {}, None),
    "forgotten_spec_per_example_features": refusal("features", {"axes": (1, 2)}, None),
    "axis_name_for_mesh_axis": refusal("features", {"axis_name": "model"}, None),
    "axis_name_batch_per_example": refusal("batch", {"axes": (1, 2), "axis_name": "data"}, None),
    "spec_names_replicated_axis": refusal("batch", {}, PartitionSpec("data", None, "model")),
    "spec_not_a_mesh_axis": refusal("batch", {}, PartitionSpec("pipe")),
  }
  return results


@contextlib.contextmanager
def backward_formulation(formulation):
  """The backward rule's sums in ``formulation`` ("platform" or "variadic", the GPU/TPU
  one), its jitted rule recompiled on the way in and out."""
  from bgn_jax import core

  core._BACKWARD_FORMULATION = formulation
  core._normalize_cotangent_jit.clear_cache()
  try:
    yield
  finally:
    core._BACKWARD_FORMULATION = "platform"
    core._normalize_cotangent_jit.clear_cache()


def split_group_extremes():
  """Per-element relative errors against float64 of sharded-jit nodes whose groups span
  shards (batch on "data", features on "model") with parts that overflow together
  though each is finite, underflow on every shard, or fall in different bands on
  different shards; per formulation, whole batch and per example."""
  rng = np.random.default_rng(3)
  normal = rng.standard_normal((8, 32))
  rows = normal.copy()
  rows[0] = 5e18  # each shard's part of the row 2e38, finite; the row's sum overflows
  rows[1] *= 1e-30  # squares underflow on every shard
  rows[2, :8] *= 1e-10  # one shard's part below the floor, the row's sum above it
  rows[2, 8:] *= 1e-8
  rows[3, :8], rows[3, 8:] = 1e-30, 0.0  # tiny on one shard, zero on the others
  cases = {
    "mixed_rows": rows,
    "tiny": normal * 1e-30,
    "tiny_half": np.concatenate([normal[:4], normal[4:] * 1e-30]),
    # Every shard's part finite and above the floor, the group's sum inf: the whole
    # batch (16 entries of 4e36 a shard, 8 shards); each example (8 of 2.5e37, 4 shards).
    "overflow_together": np.full((8, 32), 2e18),
    "rows_overflow_together": np.full((8, 32), 5e18),
  }
  sharding = NamedSharding(mesh_2x4(), PartitionSpec("data", "model"))
  results = {}
  for formulation in ("platform", "variadic"):
    with backward_formulation(formulation):
      for name, options in (("whole", {}), ("per_example", {"axes": (1,)})):
        grad = jax.jit(jax.grad(functools.partial(loss, **options)))
        for case, g in cases.items():
          w = jax.device_put(jnp.asarray(g, jnp.float32), sharding)
          got = np.asarray(grad(jnp.zeros_like(w), w), np.float64)
          want = reference_backward(np.asarray(w, np.float64), **options)
          error = np.abs(got - want) / np.maximum(np.abs(want), 1e-30)
          results[f"{formulation}-{name}-{case}"] = float(np.max(error))
  return results


COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")


def collectives(hlo):
  """(op, elements moved) of every collective in compiled HLO text."""
  found = []
  for line in hlo.splitlines():
    for op in COLLECTIVES:
      match = re.search(rf"= (.*?) {op}(-start)?\(", line)
      if match:
        dims = re.findall(r"\[([\d,]*)\]", match.group(1))
        found.append((op, sum(math.prod(int(d) for d in ds.split(",") if d) for ds in dims)))
  return found


_PLAIN_STEP_COLLECTIVES = {}  # (layout, vmapped) -> the collectives of the step without nodes


def _stack(ws, h, options):
  """A tanh MLP with a node (``options``; none for None) after every layer."""
  for w in ws:
    h = jnp.tanh(h @ w)
    h = h if options is None else bgn_jax.bgn(h, **options)
  return jnp.sum(h**2)


def _stack_loss(ws, x, options, vmapped):
  if vmapped:  # one example at a time, the vmapped axis named "batch"
    return jnp.sum(jax.vmap(functools.partial(_stack, ws, options=options), axis_name="batch")(x))
  return _stack(ws, x, options)


def node_collectives(formulation):
  """What three nodes add to the collectives of a sharded MLP train step, per layout:
  {layout-options: [count added per node, largest number of elements one moves]}."""
  mesh = mesh_2x4()
  batch, width = 16, 32
  layouts = {
    "batch": (PartitionSpec("data"), PartitionSpec()),
    "hidden": (PartitionSpec(), PartitionSpec(None, "model")),
    "batch_hidden": (PartitionSpec("data"), PartitionSpec(None, "model")),
  }
  results = {}
  plain = _PLAIN_STEP_COLLECTIVES
  readings = {
    # (reading, how the node is reached): its options, and whether the loss vmaps one
    # example at a time (as equinox models are called), naming the vmapped axis.
    "whole": ({}, False),
    "per_example": ({"axes": (1,)}, False),
    "whole-vmapped": ({"axis_name": "batch"}, True),
    "per_example-vmapped": ({}, True),
  }
  with backward_formulation(formulation):
    for layout, (x_spec, w_spec) in layouts.items():
      x = jax.device_put(jnp.ones((batch, width)), NamedSharding(mesh, x_spec))
      ws = [jax.device_put(jnp.eye(width), NamedSharding(mesh, w_spec)) for _ in range(3)]
      for name, (options, vmapped) in readings.items():
        found = {}
        for key, opts in (("with", options), ("without", None)):
          # Without nodes the formulation and reading do not enter.
          if key == "without" and (layout, vmapped) in plain:
            found[key] = plain[layout, vmapped]
            continue
          loss = functools.partial(_stack_loss, options=opts, vmapped=vmapped)
          found[key] = collectives(jax.jit(jax.grad(loss)).lower(ws, x).compile().as_text())
        plain[layout, vmapped] = found["without"]
        added = list(
          (collections.Counter(found["with"]) - collections.Counter(found["without"])).elements()
        )
        results[f"{layout}-{name}"] = {
          "per_node": len(added) / 3,
          "largest": max((n for _, n in added), default=0),
          "ops": sorted({op for op, _ in added}),
        }
  return results


def main():
  assert jax.device_count() == DEVICES, jax.devices()
  w = cotangent()
  results = {}
  for options in OPTIONS:
    want = reference_backward(np.asarray(w), **options)
    for name, run in [
      ("pmap", with_pmap),
      ("shard_map", with_shard_map),
      ("sharded_jit", with_sharded_jit),
    ]:
      got = np.asarray(run(w, options), np.float64)
      error = float(np.max(np.abs(got - want) / np.maximum(np.abs(want), 1e-37)))
      results[f"{name}-{options}"] = error
  results["shard_map-grad_of_grad"] = grad_of_grad_error()
  results["sharded"] = sharded_errors()
  results["split_group_extremes"] = split_group_extremes()
  results["collectives"] = {f: node_collectives(f) for f in ("platform", "variadic")}
  print(json.dumps(results))


if __name__ == "__main__":
  main()
