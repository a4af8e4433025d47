"""examples/train_sharded.py on 8 virtual CPU devices: the losses of 1 device, and exact restores.

The runs are subprocesses, since the number of CPU devices is fixed when JAX starts: one
for the single device, and one for the three 8-device runs, each run the script as
``__main__`` (a process each would spend longer starting JAX than training).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_sharded.py"
STEPS = 20

# The 8-device runs: uninterrupted, saving every 10 steps; again from a copy of those
# saves without the last one, so that it restores step 10 and trains steps 11..20 again;
# and with tensor parallelism and FSDP. Prints what each run printed, and the saved steps.
EIGHT_DEVICE_RUNS = """
import contextlib, io, json, runpy, shutil, sys
from pathlib import Path

script, steps, folder = sys.argv[1], sys.argv[2], Path(sys.argv[3])


def run(*flags):
  sys.argv = [script, "--steps", steps, *flags]
  printed = io.StringIO()
  with contextlib.redirect_stdout(printed):
    runpy.run_path(script, run_name="__main__")
  return printed.getvalue()


uninterrupted = run("--checkpoint-dir", str(folder / "ckpt"), "--save-every", "10")
saved = sorted(p.name for p in (folder / "ckpt").iterdir() if p.name.isdigit())
shutil.copytree(folder / "ckpt", folder / "resumed")
shutil.rmtree(folder / "resumed" / "20")
resumed = run("--checkpoint-dir", str(folder / "resumed"), "--save-every", "10")
sharded = run("--mesh", "data=2,model=4", "--fsdp")
runs = {"uninterrupted": uninterrupted, "resumed": resumed, "sharded": sharded}
print(json.dumps({"saved": saved, "printed": runs}))
"""


def _subprocess(devices: int, cwd: Path, *args: str) -> str:
  """Runs python with ``args`` on ``devices`` CPU devices; returns what it printed."""
  # The suite's fast-compile flags (tests/conftest.py) and the device count.
  count = f"--xla_force_host_platform_device_count={devices}"
  flags_env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {count}".strip()}
  done = subprocess.run(
    [sys.executable, *args],
    cwd=cwd,
    env=dict(os.environ, JAX_PLATFORMS="cpu", **flags_env),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  return done.stdout


def _losses(printed: str) -> dict[int, str]:
  """{step: the loss as printed} (9 digits: a float32 exactly)."""
  return {int(s): loss for s, loss in re.findall(r"^step (\d+) loss (\S+)$", printed, re.M)}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> dict:
  """{"saved": the steps saved by the uninterrupted run, "printed": {run: its output}}."""
  folder = tmp_path_factory.mktemp("eight")
  printed = _subprocess(8, folder, "-c", EIGHT_DEVICE_RUNS, str(SCRIPT), str(STEPS), str(folder))
  return json.loads(printed.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> dict[int, str]:
  return _losses(_subprocess(1, tmp_path_factory.mktemp("one"), str(SCRIPT), "--steps", str(STEPS)))


def test_eight_devices_match_one_device(eight_devices, one_device):
  losses = _losses(eight_devices["printed"]["uninterrupted"])
  one = one_device
  assert sorted(losses) == sorted(one) == list(range(1, STEPS + 1))
  eight_losses = np.array([float(losses[s]) for s in sorted(losses)])
  one_losses = np.array([float(one[s]) for s in sorted(one)])
  # The runs differ only in the order of the cross-device sums.
  np.testing.assert_allclose(eight_losses, one_losses, rtol=0, atol=1e-4)
  assert np.all(np.isfinite(one_losses)) and one_losses[-1] < one_losses[0]


def test_restore_continues_bitwise(eight_devices):
  assert eight_devices["saved"] == ["10", "20"]
  losses = _losses(eight_devices["printed"]["uninterrupted"])
  resumed_printed = eight_devices["printed"]["resumed"]
  assert "restored step 10" in resumed_printed
  resumed = _losses(resumed_printed)
  assert sorted(resumed) == list(range(11, STEPS + 1))
  assert resumed == {s: losses[s] for s in range(11, STEPS + 1)}


def test_tensor_parallel_fsdp_parameters_match_one_device(eight_devices, one_device):
  # Hidden units over model (tensor parallel) and input units over data (FSDP) at once.
  kernel_spec = "P('data', 'model')"
  printed = eight_devices["printed"]["sharded"]
  assert f"hidden kernel {kernel_spec}" in printed  # the kernels are split as asked
  losses = _losses(printed)
  got = np.array([float(losses[s]) for s in sorted(losses)])
  want = np.array([float(one_device[s]) for s in sorted(one_device)])
  assert got.shape == want.shape == (STEPS,)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
