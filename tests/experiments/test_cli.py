"""End-to-end tests of ``bgn-jax`` on digits, small models, few steps: in real
subprocesses where the process matters (the console script, device counts, signals, two
processes), through ``main`` in this process otherwise."""

from __future__ import annotations

import json
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from bgn_jax.experiments.cli import main

from .conftest import checkpoint_steps, cli, read_metrics

# A small run: digits has 1438 training images, 22 steps of 64 per epoch.
SMALL = [
  "--dataset", "digits", "--depth", "4", "--width", "32", "--method", "bgn",
  "--optimizer", "adam", "--lr", "1e-3", "--batch-size", "64", "--seed", "3",
  "--log-every", "1", "--no-progress",
]  # fmt: skip
REFERENCE_EPOCHS = "5"  # 110 steps: long enough to kill a run midway


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, cli_env):
  """An uninterrupted 1-device run, checkpoints every 20 steps, through the console script."""
  out = tmp_path_factory.mktemp("reference") / "run"
  # The console script beside this interpreter, not another one found on PATH.
  script = Path(sys.executable).with_name("bgn-jax")
  command = [str(script)] if script.exists() else cli()
  args = [*SMALL, "--epochs", REFERENCE_EPOCHS, "--checkpoint-every", "20", "--out", str(out)]
  result = subprocess.run(
    [*command, "train", *args], env=cli_env, capture_output=True, text=True, timeout=150
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return out


def test_train_writes_metrics_results_plots_and_checkpoints(reference_run):
  records = read_metrics(reference_run)
  steps = 22 * int(REFERENCE_EPOCHS)
  assert [r["step"] for r in records] == list(range(1, steps + 1))
  assert all("train_loss" in r for r in records)
  assert sum("test_accuracy" in r for r in records) == int(REFERENCE_EPOCHS)
  results = json.loads((reference_run / "results.json").read_text())
  assert results["steps"] == steps
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert results["final_train_loss"] == records[-1]["train_loss"]
  assert len(results["params_sha256"]) == 64
  assert list(reference_run.glob("*.png"))
  assert checkpoint_steps(reference_run)[-1] == steps


# Both 8-device runs in one process, as two calls of the command line's `main`: the
# device count is fixed when JAX starts, and a second process would spend longer
# starting JAX than training.
EIGHT_DEVICE_RUNS = """
import sys
from bgn_jax.experiments.cli import main

small, data_parallel, sharded = sys.argv[1].split(), sys.argv[2], sys.argv[3]
run = ["train", *small, "--epochs", "1", "--out"]
sys.exit(main([*run, data_parallel]) or main([*run, sharded, "--mesh", "data=2,model=4", "--fsdp"]))
"""


@pytest.fixture(scope="module")
def eight_device_runs(tmp_path_factory, cli_env) -> tuple[Path, Path]:
  """Two 1-epoch runs on 8 devices: data parallel, and tensor parallel with FSDP."""
  folder = tmp_path_factory.mktemp("eight_devices")
  outs = folder / "data_parallel", folder / "sharded"
  flags = f"{cli_env['XLA_FLAGS']} --xla_force_host_platform_device_count=8"
  done = subprocess.run(
    [sys.executable, "-c", EIGHT_DEVICE_RUNS, " ".join(SMALL), *map(str, outs)],
    env={**cli_env, "XLA_FLAGS": flags},
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return outs


def test_eight_devices_give_the_one_device_loss_curve(reference_run, eight_device_runs):
  out, _ = eight_device_runs
  assert json.loads((out / "results.json").read_text())["devices"] == 8
  one = [r["train_loss"] for r in read_metrics(reference_run)][:20]
  eight = [r["train_loss"] for r in read_metrics(out)][:20]
  assert len(eight) == 20
  for a, b in zip(one, eight, strict=True):
    assert abs(a - b) <= 1e-4 * abs(a)


def test_resume_after_sigkill_gives_identical_parameters(reference_run, tmp_path, cli_env, capsys):
  out = tmp_path / "killed"
  args = [*SMALL, "--epochs", REFERENCE_EPOCHS, "--checkpoint-every", "20", "--out", str(out)]
  process = subprocess.Popen(
    cli("train", *args), env=cli_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
  )
  try:
    deadline = time.monotonic() + 120
    while not checkpoint_steps(out) and process.poll() is None and time.monotonic() < deadline:
      time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
  finally:
    process.wait()
    process.stderr.close()
  assert process.returncode == -signal.SIGKILL
  assert not (out / "results.json").exists(), "the run finished before it was killed"
  killed_at = checkpoint_steps(out)[-1]
  # The resume in this process: a subprocess would spend longer starting JAX than training.
  status = main(["train", *args, "--resume"])
  stderr = capsys.readouterr().err
  assert status == 0, stderr[-3000:]
  assert f"checkpoint of step {killed_at}" in stderr
  reference = json.loads((reference_run / "results.json").read_text())
  result = json.loads((out / "results.json").read_text())
  assert result["params_sha256"] == reference["params_sha256"]
  assert [r["step"] for r in read_metrics(out)] == [r["step"] for r in read_metrics(reference_run)]


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def test_two_processes_give_the_one_device_loss_curve(reference_run, tmp_path, cli_env):
  out = tmp_path / "two_processes"
  port = _free_port()
  common = [
    "train", *SMALL, "--epochs", "1", "--out", str(out), "--distributed",
    "--coordinator-address", f"127.0.0.1:{port}", "--num-processes", "2",
  ]  # fmt: skip
  processes = [
    subprocess.Popen(
      cli(*common, "--process-id", str(i)),
      env=cli_env,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outputs = [p.communicate(timeout=150) for p in processes]
  for p, (_, err) in zip(processes, outputs, strict=True):
    assert p.returncode == 0, err[-3000:]
  results = json.loads((out / "results.json").read_text())
  assert results["processes"] == 2 and results["devices"] == 2
  one = [r["train_loss"] for r in read_metrics(reference_run)][:20]
  two = [r["train_loss"] for r in read_metrics(out)][:20]
  assert len(two) == 20
  for a, b in zip(one, two, strict=True):
    assert abs(a - b) <= 1e-4 * abs(a)


def test_non_finite_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path, capsys):
  out = tmp_path / "diverged"
  args = [
    "train", "--dataset", "digits", "--depth", "3", "--width", "32", "--method", "plain",
    "--optimizer", "sgd", "--lr", "1e12", "--batch-size", "64", "--epochs", "1",
    "--checkpoint-every", "1", "--log-every", "1", "--no-progress", "--out", str(out),
  ]  # fmt: skip
  status = main(args)  # in this process: a subprocess would spend longer starting JAX
  stderr = capsys.readouterr().err
  assert status == 3, stderr[-3000:]
  assert "non-finite" in stderr
  failed_step = int(stderr.split(" at step ")[1].split(";")[0])
  assert failed_step < 22
  assert not (out / "results.json").exists()
  steps = checkpoint_steps(out)
  assert steps and steps[-1] == failed_step - 1
  assert f"step {steps[-1]}" in stderr


def test_ctrl_c_saves_a_checkpoint(tmp_path, cli_env):
  out = tmp_path / "interrupted"
  # Far more steps than run before the signal: a step of this model takes about a
  # millisecond, so a short run could finish before a loaded machine delivers it.
  epochs = 1000
  args = [*SMALL, "--epochs", str(epochs), "--out", str(out)]
  # As from a terminal: Ctrl-C raising KeyboardInterrupt. A suite started in the
  # background of a non-interactive shell (`pytest &`, some CI runners) passes SIGINT
  # down ignored, and Python then installs no handler for it.
  terminal = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'bgn-jax'; runpy.run_module('bgn_jax', run_name='__main__')"
  )
  process = subprocess.Popen(
    [sys.executable, "-c", terminal, "train", *args],
    env=cli_env,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.PIPE,
    text=True,
  )
  deadline = time.monotonic() + 120
  metrics = out / "metrics.jsonl"
  while (
    not (metrics.exists() and metrics.stat().st_size)
    and process.poll() is None
    and time.monotonic() < deadline
  ):
    time.sleep(0.02)
  process.send_signal(signal.SIGINT)
  _, err = process.communicate(timeout=60)
  assert process.returncode == 130, err[-3000:]
  assert "interrupted" in err
  steps = checkpoint_steps(out)
  assert steps and 0 < steps[-1] < 22 * epochs


def test_sweep_writes_tables_and_skips_finished_cells(tmp_path, capsys):
  # In this process: a subprocess would spend longer starting JAX than training.
  out = tmp_path / "sweep"
  config = tmp_path / "grid.toml"
  config.write_text(
    'dataset = "digits"\ndepths = [2]\nmethods = ["plain", "bgn"]\nactivations = ["relu"]\n'
    'optimizers = ["adam"]\nwidth = 16\nepochs = 1\nbatch_size = 64\nseeds = [0]\n'
    "[lrs]\nadam = [1e-2]\n"
  )
  args = ["sweep", "--config", str(config), "--out", str(out), "--no-progress"]
  assert main(args) == 0
  assert "2 runs done, 0 already finished" in capsys.readouterr().err
  table = (out / "summary.md").read_text()
  assert "| digits | relu | adam | 2 | bgn |" in table
  csv_lines = (out / "summary.csv").read_text().splitlines()
  assert len(csv_lines) == 3  # header, plain, bgn
  # A lost run is redone; the finished ones are skipped.
  lost = next((out / "runs").glob("*bgn*lr0.01*"))
  (lost / "results.json").unlink()
  assert main(args) == 0
  assert "1 runs done, 1 already finished" in capsys.readouterr().err


def test_bad_flag_names_the_flag(tmp_path, capsys):
  status = main(["train", "--batch-size", "0", "--out", str(tmp_path / "x"), "--no-progress"])
  assert status == 2
  assert "--batch-size" in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_a_tensor_parallel_fsdp_mlp_gives_the_one_device_loss_curve(
  reference_run, eight_device_runs
):
  # Hidden units over model (tensor parallel) and input units over data (FSDP) at once.
  expected = "['stack']['layer']['dense']['kernel']: P(None, 'data', 'model')"
  _, out = eight_device_runs
  results = json.loads((out / "results.json").read_text())
  assert results["devices"] == 8
  assert expected in results["split_params"], results["split_params"]  # the kernels are split
  one = [r["train_loss"] for r in read_metrics(reference_run)][:20]
  sharded = [r["train_loss"] for r in read_metrics(out)][:20]
  assert len(sharded) == 20
  for a, b in zip(one, sharded, strict=True):
    assert abs(a - b) <= 1e-4 * abs(a)


@pytest.mark.parametrize(
  ("flags", "message"),
  [
    ({"arch": "cnn", "fsdp": True}, "--arch cnn runs data parallel"),
    ({"mesh": "data=2,model=3"}, "model=3 does not divide --width 32"),
    ({"mesh": "model=two"}, "expected data=N,model=M"),
  ],
)
def test_mesh_flags_are_checked(tmp_path, flags, message):
  from bgn_jax.experiments.train import TrainConfig

  with pytest.raises(ValueError, match=re.escape(message)):
    TrainConfig(out=str(tmp_path), width=32, **flags).validate()


def test_resume_with_other_flags_is_a_usage_error_listing_them(reference_run, tmp_path, capsys):
  out = tmp_path / "run"
  shutil.copytree(reference_run, out)
  flags = [*SMALL, "--epochs", REFERENCE_EPOCHS, "--out", str(out), "--resume"]
  other = [*flags, "--method", "plain", "--lr", "0.05"]  # the last of a repeated flag wins
  assert main(["train", *other]) == 2
  err = capsys.readouterr().err
  assert "--method: stored 'bgn', requested 'plain'" in err
  assert "--lr: stored 0.001, requested 0.05" in err
  assert json.loads((out / "results.json").read_text())["config"]["method"] == "bgn"
