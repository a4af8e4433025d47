"""BGN under pmap, shard_map and sharded jit, on 8 virtual CPU devices in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def errors():
  count = "--xla_force_host_platform_device_count=8"  # beside the suite's fast-compile flags
  env = dict(
    os.environ, XLA_FLAGS=f"{os.environ.get('XLA_FLAGS', '')} {count}", JAX_PLATFORMS="cpu"
  )
  done = subprocess.run(
    [sys.executable, "tests/multidevice_checks.py"],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("transform", ["pmap", "shard_map", "sharded_jit"])
@pytest.mark.parametrize(
  "options", ["{}", "{'target_norm': 1.0}", "{'power': 0.5, 'eps': 0.001}", "{'axes': (1,)}"]
)
def test_split_batch_is_normalized_as_the_whole_batch(errors, transform, options):
  assert errors[f"{transform}-{options}"] <= 1e-5


def test_grad_of_grad_sums_the_norms_derivative_over_devices(errors):
  assert errors["shard_map-grad_of_grad"] <= 1e-5


SPLITS = ["batch", "features", "batch_features", "batch_sequence", "batch_over_both", "replicated"]
SHARDED_OPTIONS = [
  "whole_units",
  "whole_size",
  "whole_float",
  "whole_power",
  "example_units",
  "example_size",
  "token_units",
]


@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.parametrize("options", SHARDED_OPTIONS)
def test_a_node_with_spec_under_shard_map_equals_one_device(errors, split, options):
  # Every target rule counts the dimensions that the mesh split: the global array's.
  assert errors["sharded"][f"spec-{split}-{options}"] <= 1e-6


@pytest.mark.parametrize("split", ["replicated", "batch_features"])
def test_spec_is_trusted_without_check_vma(errors, split):
  assert errors["sharded"][f"spec-{split}-unchecked"] <= 1e-6


@pytest.mark.parametrize(
  ("case", "names"),
  [
    ("forgotten_spec_batch", ["varies over", "'data'", "spec=PartitionSpec"]),
    ("forgotten_spec_per_example_features", ["varies over", "'model'", "spec="]),
    ("axis_name_for_mesh_axis", ["`axis_name`", "'model'", "`spec`"]),
    ("axis_name_batch_per_example", ["`axis_name`", "'data'", "`spec`"]),
    ("spec_names_replicated_axis", ["`spec`", "model", "replicated"]),
    ("spec_not_a_mesh_axis", ["`spec`", "'pipe'", "manual"]),
  ],
)
def test_a_node_that_cannot_know_the_global_group_refuses(errors, case, names):
  message = errors["sharded"]["refused"][case]
  for name in names:
    assert name in message, message


@pytest.mark.parametrize("formulation", ["platform", "variadic"])
@pytest.mark.parametrize("options", ["whole", "per_example"])
@pytest.mark.parametrize(
  "case", ["mixed_rows", "tiny", "tiny_half", "overflow_together", "rows_overflow_together"]
)
def test_a_group_split_over_shards_of_different_bands_equals_float64(
  errors, formulation, options, case
):
  # Each shard sums its part alone: a group's parts may need the scaled sums on one
  # shard and not on another, or overflow only once added together.
  assert errors["split_group_extremes"][f"{formulation}-{options}-{case}"] <= 1e-5


LAYOUTS = ["batch", "hidden", "batch_hidden"]


# How the node is reached: in the batched step, or inside a vmap over examples (as
# equinox models are called; a whole-batch node then names the vmapped axis).
READINGS = ["whole", "per_example", "whole-vmapped", "per_example-vmapped"]


@pytest.mark.parametrize("formulation", ["platform", "variadic"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reading", READINGS)
def test_a_node_gathers_no_activation(errors, formulation, layout, reading):
  # A 16 x 32 activation per layer: a node's collectives carry a few scalars per example
  # and device at most, never the activation or its cotangent.
  added = errors["collectives"][formulation][f"{layout}-{reading}"]
  assert added["largest"] <= 4 * 16 < 16 * 32, added


@pytest.mark.parametrize("formulation", ["platform", "variadic"])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("reading", READINGS)
def test_a_node_adds_one_all_reduce_where_its_group_is_split(errors, formulation, layout, reading):
  # Each shard reduces its part of the group (the CPU's conditional included), and one
  # all-reduce carries the partial sums over every mesh axis that splits the group, none
  # where none does, none for a branch predicate. A vmapped whole-batch node sums each
  # example's sums over the vmapped axis afterwards: one all-reduce per splitting axis.
  added = errors["collectives"][formulation][f"{layout}-{reading}"]
  assert set(added["ops"]) <= {"all-reduce"}, added
  whole = reading.startswith("whole")
  splitting = {"batch": int(whole), "hidden": 1, "batch_hidden": 1 + int(whole)}[layout]
  assert added["per_node"] == (splitting if reading == "whole-vmapped" else min(splitting, 1))
