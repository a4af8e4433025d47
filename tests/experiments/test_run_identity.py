"""A run folder holds one configuration: ``--resume`` refuses flags that change the result."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from bgn_jax.experiments.data import load_digits
from bgn_jax.experiments.train import TrainConfig, train

# Two steps of 64 examples per epoch: the smallest run that trains, evaluates and saves.
TINY: dict[str, Any] = dict(
  dataset="digits",
  depth=2,
  width=8,
  method="plain",
  optimizer="adam",
  lr=1e-3,
  train_examples=128,
  batch_size=64,
  epochs=1,
  log_every=1,
  progress=False,
  plots=False,
)


@pytest.fixture(scope="module")
def data():
  return load_digits()


@pytest.fixture(scope="module")
def finished(tmp_path_factory, data) -> TrainConfig:
  """A finished one-epoch run; tests that write into a run folder use a copy."""
  config = TrainConfig(out=str(tmp_path_factory.mktemp("finished") / "run"), **TINY)
  train(config, dataset=data)
  return config


def copy_of(run: TrainConfig, tmp_path: Path) -> TrainConfig:
  out = tmp_path / "copy"
  shutil.copytree(run.out, out)
  return dataclasses.replace(run, out=str(out), resume=True)


def stored_config(run: TrainConfig) -> dict:
  return json.loads((Path(run.out) / "checkpoints" / "config.json").read_text())


def store_config(run: TrainConfig, **changes) -> None:
  (Path(run.out) / "checkpoints" / "config.json").write_text(
    json.dumps({**stored_config(run), **changes})
  )


def test_the_first_checkpoint_comes_with_the_full_configuration(finished):
  assert stored_config(finished) == dataclasses.asdict(finished)


def test_resume_with_another_method_and_lr_is_an_error_naming_each_field(finished, data):
  before = (Path(finished.out) / "results.json").read_text()
  resumed = dataclasses.replace(finished, method="bgn", lr=0.05, resume=True)
  with pytest.raises(ValueError, match="--resume") as error:
    train(resumed, dataset=data)
  message = str(error.value)
  assert finished.out in message
  assert "--method: stored 'plain', requested 'bgn'" in message
  assert "--lr: stored 0.001, requested 0.05" in message
  assert "--optimizer" not in message  # only the fields that differ
  assert (Path(finished.out) / "results.json").read_text() == before


@pytest.mark.parametrize(
  "change",
  [
    {"optimizer": "sgd"},
    {"batch_size": 32},
    {"dtype": "bfloat16"},
    {"init": "he"},
    {"width": 16},
    {"seed": 1},
    {"train_examples": 192},
    {"bgn_target": "1.0"},
  ],
)
def test_each_result_field_is_compared_on_resume(finished, data, change):
  ((name, value),) = change.items()
  flag = f"--{name.replace('_', '-')}"
  stored = getattr(finished, name)
  with pytest.raises(
    ValueError, match=re.escape(f"{flag}: stored {stored!r}, requested {value!r}")
  ):
    train(dataclasses.replace(finished, resume=True, **change), dataset=data)


def test_epochs_may_grow_on_resume_and_results_json_states_the_longer_run(finished, data, tmp_path):
  run = copy_of(finished, tmp_path)
  # Logging and saving more often do not change the result; neither refuses a resume.
  extended = dataclasses.replace(run, epochs=2, log_every=2, checkpoint_every=1)
  results = train(extended, dataset=data)
  assert results["config"]["epochs"] == 2 and results["steps"] == 4
  assert json.loads((Path(run.out) / "results.json").read_text())["config"]["epochs"] == 2
  assert stored_config(run)["epochs"] == 2
  uninterrupted = train(
    dataclasses.replace(finished, out=str(tmp_path / "two_epochs"), epochs=2), dataset=data
  )
  assert results["params_sha256"] == uninterrupted["params_sha256"]
  # The checkpoint is now at step 4, past the end of a one-epoch run.
  with pytest.raises(ValueError, match=r"--epochs: stored 2, requested 1.*step 4"):
    train(dataclasses.replace(run, epochs=1), dataset=data)


def test_epochs_may_not_change_under_a_cosine_schedule(finished, data, tmp_path):
  run = dataclasses.replace(copy_of(finished, tmp_path), schedule="cosine")
  store_config(run, schedule="cosine")
  with pytest.raises(ValueError, match=r"--epochs: stored 1, requested 2.*cosine"):
    train(dataclasses.replace(run, epochs=2), dataset=data)


def test_a_run_folder_without_a_stored_configuration_is_refused_on_resume(finished, data, tmp_path):
  run = copy_of(finished, tmp_path)
  (Path(run.out) / "checkpoints" / "config.json").unlink()
  with pytest.raises(ValueError, match=re.escape(str(Path(run.out) / "checkpoints"))) as error:
    train(run, dataset=data)
  assert "--out" in str(error.value)


def test_a_checkpoint_that_does_not_fit_is_reported_in_one_sentence(finished, data, tmp_path):
  # The stored configuration says SGD, the checkpoint holds Adam's state: the check of
  # the flags passes and orbax finds the trees differ.
  run = dataclasses.replace(copy_of(finished, tmp_path), optimizer="sgd")
  store_config(run, optimizer="sgd")
  with pytest.raises(ValueError, match=re.escape(str(Path(run.out) / "checkpoints"))) as error:
    train(run, dataset=data)
  message = str(error.value)
  assert "\n" not in message and len(message) < 400, message
  assert "--out" in message
