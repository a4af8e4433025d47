"""examples/train_sharded.py on 8 virtual CPU devices: the losses of 1 device, and exact restores.

Each run is a subprocess, since the number of CPU devices is fixed when JAX starts.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "train_sharded.py"
STEPS = 20


def _train(devices: int, cwd: Path, *flags: str, printed: list | None = None) -> dict[int, str]:
  """Runs the script; returns {step: the loss as printed} (9 digits: a float32 exactly)."""
  # The suite's fast-compile flag (tests/conftest.py) and the device count.
  count = f"--xla_force_host_platform_device_count={devices}"
  flags_env = {"XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {count}".strip()}
  done = subprocess.run(
    [sys.executable, str(SCRIPT), "--steps", str(STEPS), *flags],
    cwd=cwd,
    env=dict(os.environ, JAX_PLATFORMS="cpu", **flags_env),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
  if printed is not None:
    printed.append(done.stdout)
  return {int(s): loss for s, loss in re.findall(r"^step (\d+) loss (\S+)$", done.stdout, re.M)}


@pytest.fixture(scope="module")
def eight_devices(tmp_path_factory) -> tuple[dict[int, str], Path]:
  """An uninterrupted run on 8 devices, saving every 10 steps."""
  folder = tmp_path_factory.mktemp("eight")
  losses = _train(8, folder, "--checkpoint-dir", str(folder / "ckpt"), "--save-every", "10")
  return losses, folder / "ckpt"


@pytest.fixture(scope="module")
def one_device(tmp_path_factory) -> dict[int, str]:
  return _train(1, tmp_path_factory.mktemp("one"))


def test_eight_devices_match_one_device(eight_devices, one_device):
  losses, _ = eight_devices
  one = one_device
  assert sorted(losses) == sorted(one) == list(range(1, STEPS + 1))
  eight_losses = np.array([float(losses[s]) for s in sorted(losses)])
  one_losses = np.array([float(one[s]) for s in sorted(one)])
  # The runs differ only in the order of the cross-device sums.
  np.testing.assert_allclose(eight_losses, one_losses, rtol=0, atol=1e-4)
  assert np.all(np.isfinite(one_losses)) and one_losses[-1] < one_losses[0]


def test_restore_continues_bitwise(eight_devices, tmp_path):
  losses, checkpoints = eight_devices
  assert sorted(p.name for p in checkpoints.iterdir() if p.name.isdigit()) == ["10", "20"]
  # Drop the last save: the rerun restores step 10 and trains steps 11..20 again.
  resumed_dir = tmp_path / "ckpt"
  shutil.copytree(checkpoints, resumed_dir)
  shutil.rmtree(resumed_dir / "20")
  resumed = _train(8, tmp_path, "--checkpoint-dir", str(resumed_dir), "--save-every", "10")
  assert sorted(resumed) == list(range(11, STEPS + 1))
  assert resumed == {s: losses[s] for s in range(11, STEPS + 1)}


def test_tensor_parallel_fsdp_parameters_match_one_device(one_device, tmp_path):
  # Hidden units over model (tensor parallel) and input units over data (FSDP) at once.
  kernel_spec = "P('data', 'model')"
  printed = []
  losses = _train(8, tmp_path, "--mesh", "data=2,model=4", "--fsdp", printed=printed)
  assert f"hidden kernel {kernel_spec}" in printed[0]  # the kernels are split as asked
  got = np.array([float(losses[s]) for s in sorted(losses)])
  want = np.array([float(one_device[s]) for s in sorted(one_device)])
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-4)
