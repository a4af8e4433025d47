"""The sweep's grid, TOML parsing and best-over-LR summary (no training)."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import pytest

from bgn_jax.experiments.cli import build_parser
from bgn_jax.experiments.sweep import SweepConfig, summarize


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
  assert "| digits | relu | adam | 10 | bgn | 0.001 | 85.0% ± 7.1 (80.0–90.0) | 2 | 4/4 | 1 |" in md
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
