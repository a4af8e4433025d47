"""``bgn-jax demo``: the three runs, the table, results.json and both plots.

In a file of its own, so that the suite's two workers (``--dist loadfile``) run the
demo beside the other command-line tests.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

# Run in a subprocess with XLA's optimizations on: the demo's 2 700 training steps take
# twice as long compiled with the suite's fast-compile flags (tests/conftest.py).
DRIVER = """
import json, sys
from bgn_jax.experiments import plots
from bgn_jax.experiments.cli import main

labels = {}

def recording(name):
  plot = getattr(plots, name)

  def record(data, path, **kwargs):
    labels[name] = list(data)
    return plot(data, path, **kwargs)

  return record

for name in ("plot_accuracy_curves", "plot_grad_norms"):
  setattr(plots, name, recording(name))
status = main(["demo", "--out", sys.argv[1], "--no-progress"])
with open(sys.argv[2], "w") as f:
  json.dump({"status": status, "labels": labels}, f)
"""


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory, cli_env):
  """``bgn-jax demo``, the labels given to both plots recorded."""
  out = tmp_path_factory.mktemp("demo")
  recorded = out / "recorded.json"
  env = {**cli_env, "XLA_FLAGS": ""}
  done = subprocess.run(
    [sys.executable, "-c", DRIVER, str(out), str(recorded)],
    env=env,
    capture_output=True,
    text=True,
    timeout=400,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  got = json.loads(recorded.read_text())
  return out, got["status"], done.stdout, got["labels"]


def test_demo_trains_plain_lecun_plain_he_and_bgn(demo_run):
  out, status, stdout, labels = demo_run
  assert status == 0
  summary = json.loads((out / "results.json").read_text())
  runs = {run["method"]: run for run in summary["runs"]}
  assert list(runs) == ["plain", "plain-he", "bgn"]
  assert {name: run["init"] for name, run in runs.items()} == {
    "plain": "lecun",
    "plain-he": "he",
    "bgn": "lecun",
  }
  for name, run in runs.items():
    assert 0.0 <= run["test_accuracy"] <= 1.0
    assert json.loads((out / name / "results.json").read_text())["config"]["init"] == run["init"]
  # The vanishing regime: same init, only BGN trains.
  assert runs["bgn"]["test_accuracy"] - runs["plain"]["test_accuracy"] >= 0.30, runs
  for name in ("plain", "plain-he", "bgn"):
    assert name in stdout.split()  # the table
    assert any(label.startswith(f"{name} (") for label in labels["plot_accuracy_curves"])
    assert any(label.startswith(f"{name} (") for label in labels["plot_grad_norms"])
  assert len(labels["plot_grad_norms"]) == 6  # three runs, at init and after training
  assert (out / "accuracy.png").exists() and (out / "grad_norms.png").exists()
