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
  count = "--xla_force_host_platform_device_count=8"  # beside the suite's fast-compile flag
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
