"""The sweep's grid, TOML parsing and best-over-(init, LR) summary (no training)."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import re
from pathlib import Path
from typing import Any

import pytest

from bgn_jax.experiments import sweep
from bgn_jax.experiments.cli import build_parser
from bgn_jax.experiments.sweep import SweepConfig, run_name, run_sweep, stable_seeds, summarize
from bgn_jax.experiments.train import TrainConfig


def fake_results(config: SweepConfig, accuracy) -> None:
  for run in config.runs():
    folder = Path(run.out)
    folder.mkdir(parents=True)
    value = accuracy(run)
    result = {"method": run.method, "test_accuracy": value, "grad_norms_init": [1.0, 2.0]}
    if value is None:
      result["diverged"] = True
    (folder / "results.json").write_text(json.dumps(result))


def test_each_method_gets_its_best_lr_mean_and_spread_over_seeds(tmp_path):
  config = SweepConfig(
    out=str(tmp_path),
    depths=(10,),
    methods=("plain", "bgn"),
    lrs={"adam": (1e-3, 1e-4)},
    seeds=(0, 1),
  )
  table = {
    ("plain", 1e-3): (0.5, 0.7),
    ("plain", 1e-4): (0.55, 0.55),
    ("bgn", 1e-3): (0.8, 0.9),
    ("bgn", 1e-4): (None, 0.95),  # a diverged seed makes the LR unusable
  }
  fake_results(config, lambda run: table[run.method, run.lr][run.seed])
  rows = {r["method"]: r for r in summarize(config)}
  assert rows["plain"]["best_lr"] == 1e-3
  assert rows["plain"]["mean"] == pytest.approx(0.6)
  assert rows["plain"]["std"] == pytest.approx(math.sqrt(0.02))
  assert rows["bgn"]["best_lr"] == 1e-3 and rows["bgn"]["mean"] == pytest.approx(0.85)
  assert rows["bgn"]["diverged"] == 1
  assert rows["bgn"]["runs_done"] == rows["bgn"]["runs_total"] == 4
  md = (tmp_path / "summary.md").read_text()
  # 80% is more than 5 points below the best seed's 90%: 1 of 2 seeds is stable.
  assert (
    "| digits | relu | adam | 10 | bgn | lecun | 0.001 | 85.0% ± 7.1 (80.0–90.0) | 2 | 1/2 | 2/2 "
    "| 4/4 | 1 |" in md
  )
  assert (tmp_path / "summary.csv").read_text().count("\n") == 3
  assert (tmp_path / "accuracy_vs_depth.png").exists()


def test_toml_and_flags(tmp_path):
  path = tmp_path / "grid.toml"
  path.write_text('depths = [10, 50]\nmethods = ["plain"]\nepochs = 3\n[lrs]\nsgd = [0.1]\n')
  args = build_parser().parse_args(
    ["sweep", "--config", str(path), "--optimizers", "sgd", "--epochs", "1", "--out", "x"]
  )
  config = SweepConfig.from_args(args)
  assert config.depths == (10, 50) and config.epochs == 1 and config.optimizers == ("sgd",)
  assert [r.lr for r in config.runs()] == [0.1, 0.1]
  assert all(r.resume for r in config.runs())


def test_toml_errors_name_the_file_and_key(tmp_path):
  path = tmp_path / "bad.toml"
  path.write_text("depth = [1]\n")
  args = argparse.Namespace(config=str(path))
  with pytest.raises(ValueError, match=r"bad\.toml.*'depth'"):
    SweepConfig.from_args(args)
  path.write_text("depths = [\n")
  with pytest.raises(ValueError, match=r"bad\.toml.*TOML"):
    SweepConfig.from_args(args)


def test_missing_lr_grid_for_an_optimizer_is_named():
  config = SweepConfig(optimizers=("adam", "sgd"), lrs={"adam": (1e-3,)})
  with pytest.raises(ValueError, match="sgd"):
    config.validate()


def test_the_best_cell_is_chosen_over_init_and_lr_and_names_the_init(tmp_path):
  config = SweepConfig(
    out=str(tmp_path),
    depths=(50,),
    methods=("plain", "bgn"),
    inits=("lecun", "he"),
    lrs=(1e-3, 1e-4),
    seeds=(0, 1, 2),
  )
  runs = config.runs()
  assert len(runs) == 2 * 2 * 2 * 3
  assert {(r.method, r.init, r.lr) for r in runs} == {
    (m, i, lr) for m in ("plain", "bgn") for i in ("lecun", "he") for lr in (1e-3, 1e-4)
  }
  assert len({r.out for r in runs}) == len(runs)
  table = {
    ("plain", "lecun", 1e-3): (0.1, 0.1, 0.1),
    ("plain", "lecun", 1e-4): (0.1, 0.1, 0.1),
    ("plain", "he", 1e-3): (0.70, 0.72, 0.50),
    ("plain", "he", 1e-4): (0.78, 0.77, 0.76),  # the best plain setting
    ("bgn", "lecun", 1e-3): (0.80, 0.70, 0.76),  # the best BGN setting
    ("bgn", "lecun", 1e-4): (0.60, 0.60, 0.60),
    ("bgn", "he", 1e-3): (0.90, None, 0.90),  # higher, but a seed diverged
    ("bgn", "he", 1e-4): (0.65, 0.66, 0.64),
  }
  fake_results(config, lambda run: table[run.method, run.init, run.lr][run.seed])
  rows = {r["method"]: r for r in summarize(config)}
  assert (rows["plain"]["best_init"], rows["plain"]["best_lr"]) == ("he", 1e-4)
  assert rows["plain"]["mean"] == pytest.approx(0.77)
  assert rows["plain"]["stable"] == 3
  assert (rows["bgn"]["best_init"], rows["bgn"]["best_lr"]) == ("lecun", 1e-3)
  assert rows["bgn"]["mean"] == pytest.approx((0.80 + 0.70 + 0.76) / 3)
  assert rows["bgn"]["stable"] == 2  # 0.70 is more than 5 points below 0.80
  assert rows["bgn"]["runs_done"] == rows["bgn"]["runs_total"] == 12
  md = (tmp_path / "summary.md").read_text()
  assert (
    "| digits | relu | adam | 50 | plain | he | 0.0001 | 77.0% ± 1.0 (76.0–78.0) | 3 | 3/3 " in md
  )
  assert "| digits | 50 | relu | adam | bgn | he | 0.001 | 90.0% | 3 | 1 |" in md
  assert "best_init" in (tmp_path / "summary.csv").read_text().splitlines()[0]


@pytest.mark.parametrize(
  "accuracies, stable",
  [([0.8, 0.76, 0.74], 2), ([0.5], 1), ([0.8, None, 0.8], 2), ([None, None], 0), ([], 0)],
)
def test_stable_seeds_counts_seeds_within_five_points_of_the_best(accuracies, stable):
  assert stable_seeds(accuracies) == stable


def test_inits_from_flags_and_toml(tmp_path):
  args = build_parser().parse_args(["sweep", "--inits", "lecun", "he", "--out", "x"])
  assert SweepConfig.from_args(args).inits == ("lecun", "he")
  path = tmp_path / "grid.toml"
  path.write_text('inits = ["he", "glorot"]\n')
  args = build_parser().parse_args(["sweep", "--config", str(path)])
  assert SweepConfig.from_args(args).inits == ("he", "glorot")
  # The files of earlier sweeps name one init.
  path.write_text('init = "he"\n')
  config = SweepConfig.from_args(args)
  assert config.inits == ("he",) and {r.init for r in config.runs()} == {"he"}
  with pytest.raises(SystemExit):
    build_parser().parse_args(["sweep", "--inits", "zeros"])


def test_run_names_tell_apart_every_setting_that_changes_the_result():
  default = TrainConfig(out="")
  assert re.fullmatch(
    r"digits-d10-w64-relu-lecun-plain-k1-adam-lr0\.001-s0-[0-9a-f]{8}", run_name(default)
  )
  changes: tuple[dict[str, Any], ...] = (
    {},
    {"arch": "cnn"},
    {"arch": "transformer"},
    {"arch": "transformer", "heads": 2},
    {"warmup_steps": 100},
    {"schedule": "cosine"},
    {"train_examples": 1000},
    {"bgn_target": "1.0"},
    {"optimizer": "adamw"},
    {"optimizer": "adamw", "weight_decay": 0.1},
    {"optimizer": "sgd"},
    {"optimizer": "sgd", "momentum": 0.5},
    {"epochs": 5},
    {"batch_size": 32},
    {"dtype": "bfloat16"},
  )
  names = {run_name(TrainConfig(out="", **change)) for change in changes}
  assert len(names) == len(changes)
  # What the run ignores or only affects where files go and how often: the same run.
  for same in (
    {"momentum": 0.5},  # Adam has no momentum setting
    {"heads": 2},  # the MLP has no heads
    {"log_every": 7, "checkpoint_every": 3, "data_dir": "elsewhere", "progress": False},
    {"out": "elsewhere", "resume": True, "plots": False, "mesh": "data=1", "fsdp": True},
  ):
    assert run_name(TrainConfig(**{"out": "", **same})) == run_name(default)
  # A TOML file's `momentum = 0` is the flag's 0.0.
  assert run_name(TrainConfig(out="", optimizer="sgd", momentum=0)) == run_name(
    TrainConfig(out="", optimizer="sgd", momentum=0.0)
  )


def one_run_grid(tmp_path: Path, **changes) -> SweepConfig:
  config = SweepConfig(
    out=str(tmp_path), depths=(2,), methods=("plain",), lrs=(1e-2,), epochs=1, batch_size=128
  )
  return dataclasses.replace(config, **changes)


def finish(run: TrainConfig, accuracy: float) -> None:
  Path(run.out).mkdir(parents=True, exist_ok=True)
  result = {"config": dataclasses.asdict(run), "method": run.method, "test_accuracy": accuracy}
  (Path(run.out) / "results.json").write_text(json.dumps(result))


def test_a_sweep_rerun_with_other_epochs_and_batch_size_does_not_reuse_the_earlier_runs(
  tmp_path, monkeypatch
):
  earlier = one_run_grid(tmp_path)
  for run in earlier.runs():
    finish(run, 0.5)
  again = one_run_grid(tmp_path, epochs=5, batch_size=32)
  assert summarize(again) == []
  trained = []

  def fake_train(run: TrainConfig, dataset=None) -> dict:
    trained.append(run)
    finish(run, 0.9)
    return {}

  monkeypatch.setattr(sweep, "train", fake_train)
  monkeypatch.setattr("bgn_jax.experiments.data.load_dataset", lambda *args: None)
  rows = run_sweep(again, progress=False)
  assert [(r.epochs, r.batch_size) for r in trained] == [(5, 32)]
  assert [(r["method"], r["mean"]) for r in rows] == [("plain", 0.9)]
  # The earlier run is kept, and is again the result of the earlier grid.
  assert [r["mean"] for r in summarize(earlier)] == [0.5]


def test_a_finished_run_under_its_earlier_name_is_reused_only_with_the_same_configuration(
  tmp_path,
):
  # Sweep folders written before the names carried a hash of the configuration.
  grid = one_run_grid(tmp_path)
  (run,) = grid.runs()
  earlier = dataclasses.replace(
    run, out=str(tmp_path / "runs" / "digits-d2-w128-relu-lecun-plain-k1-adam-lr0.01-s0")
  )
  finish(earlier, 0.5)
  assert [r["mean"] for r in summarize(grid)] == [0.5]
  assert [r.out for r in grid.runs()] == [earlier.out]
  assert summarize(one_run_grid(tmp_path, epochs=5)) == []
  legacy_without_config = Path(earlier.out) / "results.json"
  legacy_without_config.write_text(json.dumps({"method": "plain", "test_accuracy": 0.5}))
  assert summarize(grid) == []


@pytest.mark.parametrize(
  "path", sorted((Path(__file__).parents[2] / "bgn_jax/experiments/configs").glob("*.toml"))
)
def test_every_shipped_grid_file_is_valid(path):
  args = build_parser().parse_args(["sweep", "--config", str(path), "--out", "x"])
  config = SweepConfig.from_args(args)
  assert config.runs()
