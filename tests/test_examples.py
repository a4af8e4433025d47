"""Each example script runs to the end (they assert what they show).

New scripts are picked up by themselves; one with a test file of its own is listed in
``TESTED_ELSEWHERE`` instead, so that it does not run twice.
"""

from __future__ import annotations

import runpy
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
def test_example_runs(script, tmp_path, monkeypatch, capsys):
  # In this process, as ``__main__``: a subprocess would spend longer importing JAX and
  # Flax than most examples spend running.
  monkeypatch.setenv("BGN_JAX_EXAMPLE_OUT", str(tmp_path))
  monkeypatch.setenv("MPLBACKEND", "Agg")
  monkeypatch.chdir(tmp_path)
  path = ROOT / "examples" / script
  monkeypatch.setattr(sys, "argv", [str(path), *SHORT_RUN.get(script, [])])
  try:
    runpy.run_path(str(path), run_name="__main__")
  except SystemExit as exit:  # argparse, or an explicit sys.exit
    assert exit.code in (None, 0), capsys.readouterr().err[-3000:]
