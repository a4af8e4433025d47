"""Helpers for the command-line tests: run ``python -m bgn_jax`` in a subprocess."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
  """The environment of CLI subprocesses: one CPU device, a shared compilation cache.

  ``XLA_FLAGS`` keeps the suite's fast-compile flags (see tests/conftest.py), less any
  device count a multi-device invocation set.
  """
  env = dict(os.environ)
  flags = [f for f in env.get("XLA_FLAGS", "").split() if "device_count" not in f]
  env.update(
    XLA_FLAGS=" ".join(flags),
    JAX_PLATFORMS="cpu",
    JAX_COMPILATION_CACHE_DIR=str(tmp_path_factory.mktemp("jax_cache")),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    BGN_JAX_CACHE=str(tmp_path_factory.mktemp("bgn_cache")),
    PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""),
  )
  return env


def cli(*args: str) -> list[str]:
  return [sys.executable, "-m", "bgn_jax", *args]


def read_metrics(run_dir: Path) -> list[dict]:
  return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def checkpoint_steps(run_dir: Path) -> list[int]:
  folder = run_dir / "checkpoints"
  if not folder.is_dir():
    return []
  return sorted(int(p.name) for p in folder.iterdir() if p.is_dir() and p.name.isdigit())
