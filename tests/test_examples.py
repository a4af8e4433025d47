"""Each example script runs to the end (they assert what they show)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.py"))


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, tmp_path):
  env = dict(os.environ, BGN_JAX_EXAMPLE_OUT=str(tmp_path), MPLBACKEND="Agg")
  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / script)],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
