"""Each example script runs to the end (they assert what they show).

New scripts are picked up by themselves; one with a test file of its own is listed in
``TESTED_ELSEWHERE`` instead, so that it does not run twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TESTED_ELSEWHERE = {
  "train_sharded.py": "tests/test_train_sharded.py",
}
# Arguments that keep a script's smoke run short; what it shows does not depend on them.
SHORT_RUN = {
  "gradient_flow.py": ["--steps", "40"],
}
EXAMPLES = sorted(
  p.name for p in (ROOT / "examples").glob("*.py") if p.name not in TESTED_ELSEWHERE
)


def test_examples_tested_elsewhere_exist():
  for script, test in TESTED_ELSEWHERE.items():
    assert (ROOT / "examples" / script).is_file(), script
    assert (ROOT / test).is_file(), test


@pytest.mark.parametrize("script", EXAMPLES)
def test_example_runs(script, tmp_path):
  env = dict(os.environ, BGN_JAX_EXAMPLE_OUT=str(tmp_path), MPLBACKEND="Agg")
  done = subprocess.run(
    [sys.executable, str(ROOT / "examples" / script), *SHORT_RUN.get(script, [])],
    cwd=tmp_path,
    env=env,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
