"""The depth-limit experiment: MLP residual skips (with and without BGN), the sweep's
LR search with a few seeds, (method, init) cells, and ``bgn-jax depth-limit``."""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path
from typing import Any

import chex
import jax
import jax.numpy as jnp
import pytest

from bgn_jax.experiments.cli import main
from bgn_jax.experiments.depth_limit import depth_limit_rows
from bgn_jax.experiments.models import METHODS_BY_ARCH, DeepMLP
from bgn_jax.experiments.sweep import SweepConfig, summarize
from bgn_jax.experiments.train import TrainConfig, train

X = jax.random.normal(jax.random.key(0), (4, 64))


@pytest.mark.parametrize("method", ["residual", "bgn-residual"])
def test_mlp_residual_starts_as_the_first_layer_alone(method):
  assert method in METHODS_BY_ARCH["mlp"]
  model = DeepMLP(depth=4, width=8, num_classes=10, method=method, init_scheme="he")
  variables = model.init(jax.random.key(1), X, train=False)
  p = variables["params"]
  assert p["stack"]["layer"]["gain"].shape == (3,)
  # SkipInit: every gain is zero, so the three skipped layers pass their input on.
  first = p["input_layer"]["dense"]
  h = jax.nn.relu(X @ first["kernel"] + first["bias"])
  expected = h @ p["classifier"]["kernel"] + p["classifier"]["bias"]
  got = jax.jit(functools.partial(model.apply, train=False))(variables, X)
  chex.assert_trees_all_close(got, expected, atol=1e-5)


def test_bgn_residual_normalizes_the_stream_cotangent_and_residual_does_not():
  def stream_grad(method):
    model = DeepMLP(depth=3, width=8, num_classes=10, method=method, init_scheme="he")
    variables = model.init(jax.random.key(1), X, train=False)

    def loss(params):
      return 1e-6 * jnp.sum(model.apply({"params": params}, X, train=False))

    return jax.grad(loss)(variables["params"])["input_layer"]["dense"]["kernel"]

  plain_skip, with_bgn = stream_grad("residual"), stream_grad("bgn-residual")
  # The input layer's gradient: tiny (the loss is scaled by 1e-6) through the bare
  # skips, brought back to the nodes' target scale with BGN on the stream.
  assert float(jnp.linalg.norm(plain_skip)) < 1e-3
  assert float(jnp.linalg.norm(with_bgn)) > 1e-2


def test_bgn_residual_trains(tmp_path):
  config = TrainConfig(
    out=str(tmp_path / "run"),
    depth=3,
    width=16,
    method="bgn-residual",
    init="he",
    epochs=1,
    batch_size=64,
    progress=False,
    plots=False,
  )
  results = train(config)
  assert 0.0 <= results["test_accuracy"] <= 1.0
  assert len(results["grad_norms_init"]) == 3


def grid(tmp_path: Path, **kwargs: Any) -> SweepConfig:
  config = SweepConfig(
    out=str(tmp_path),
    depths=(10, 50),
    methods=("plain", "bgn"),
    inits=("he",),
    method_inits={"plain": ("lecun", "he")},
    split_inits=True,
    lrs=(1e-3, 1e-4),
    seeds=(0, 1, 2),
    search_seeds=(0,),
  )
  return dataclasses.replace(config, **kwargs)


def write(run: TrainConfig, accuracy: float | None) -> None:
  folder = Path(run.out)
  folder.mkdir(parents=True, exist_ok=True)
  result = {"method": run.method, "test_accuracy": accuracy, "grad_norms_init": [run.depth, 1.0]}
  if accuracy is None:
    result["diverged"] = True
  (folder / "results.json").write_text(json.dumps(result))


def test_search_seeds_run_the_other_seeds_at_the_best_lr_only(tmp_path):
  config = grid(tmp_path)
  search = config.runs()
  # (plain lecun, plain he, bgn he) x 2 LRs x seed 0, per depth; no follow-up yet.
  assert len(search) == 2 * 3 * 2 and {r.seed for r in search} == {0}
  # Seed 0 at LR 1e-4 is best everywhere, except that plain LeCun diverges there.
  for run in search:
    best = run.lr == 1e-4
    write(run, None if best and run.method == "plain" and run.init == "lecun" else 0.5 + 0.1 * best)
  runs = config.runs()
  follow_up = [r for r in runs if r.seed != 0]
  assert len(follow_up) == 2 * 3 * 2
  assert {(r.method, r.init, r.lr) for r in follow_up} == {
    ("plain", "lecun", 1e-3),
    ("plain", "he", 1e-4),
    ("bgn", "he", 1e-4),
  }
  # A follow-up seed that does better does not move the choice of LR.
  for run in follow_up:
    write(run, 0.9 if run.lr == 1e-3 else 0.15)
  rows = {(r["depth"], r["_label"]): r for r in summarize(config)}
  assert set(rows) == {
    (d, m) for d in (10, 50) for m in ("plain (lecun)", "plain (he)", "bgn (he)")
  }
  row = rows[10, "bgn (he)"]
  assert row["best_lr"] == 1e-4 and row["seeds"] == 3 and row["trained"] == 1
  assert row["runs_done"] == row["runs_total"] == 4
  assert rows[10, "plain (lecun)"]["best_lr"] == 1e-3 and rows[10, "plain (lecun)"]["trained"] == 3
  assert "trained seeds (above 20%)" in (tmp_path / "summary.md").read_text()


def test_depth_limit_table_and_command(tmp_path, capsys):
  config = grid(tmp_path, depths=(10, 50, 100))
  accuracy = {("plain", 10): 0.8, ("plain", 50): 0.1, ("bgn", 10): 0.8, ("bgn", 50): 0.7}
  for run in config.runs():  # seed 0 at every LR
    write(run, accuracy.get((run.method, run.depth), 0.6))
  for run in config.runs():  # now with seeds 1 and 2 at the best LR (the first of a tie)
    # Depth 100's follow-up seeds never ran: the depth does not count yet.
    if run.depth < 100 or run.seed == 0:
      write(run, accuracy.get((run.method, run.depth), 0.6))
  table = {r["label"]: r for r in depth_limit_rows(summarize(config), seeds=3)}
  assert table["bgn (he)"]["depth"] == 50 and table["bgn (he)"]["mean"] == pytest.approx(0.7)
  assert table["plain (he)"]["depth"] == 10 and table["plain (he)"]["first_failure"] == 50
  assert table["plain (he)"]["deepest_run"] == 100 and table["plain (he)"]["complete"] == [10, 50]

  toml = tmp_path / "grid.toml"
  toml.write_text(
    'depths = [10, 50, 100]\nmethods = ["plain", "bgn"]\ninits = ["he"]\nsplit_inits = true\n'
    "seeds = [0, 1, 2]\nsearch_seeds = [0]\nlrs = [1e-3, 1e-4]\n"
    '[method_inits]\nplain = ["lecun", "he"]\n'
  )
  png = tmp_path / "figure.png"
  status = main(["depth-limit", "--config", str(toml), "--out", str(tmp_path), "--png", str(png)])
  assert status == 0 and png.stat().st_size > 0
  printed = capsys.readouterr().out
  assert "| bgn (he) | 50 | 70.0% (70.0–70.0) | 0.0001 | none run | 10, 50 |" in printed
  assert (tmp_path / "depth_limit.md").read_text() == printed


def test_depth_limit_reads_the_sweep_with_its_overrides(tmp_path, capsys):
  toml = tmp_path / "grid.toml"
  toml.write_text('depths = [10]\nmethods = ["plain"]\nseeds = [0]\nlrs = [1e-3]\n')
  config = SweepConfig(
    out=str(tmp_path), depths=(10,), methods=("plain",), lrs=(1e-3,), train_examples=100
  )
  for run in config.runs():
    write(run, 0.5)
  args = ["depth-limit", "--config", str(toml), "--out", str(tmp_path)]
  # Without the sweep's --train-examples the runs are other runs: none has finished.
  assert main(args) == 2
  assert main([*args, "--train-examples", "100"]) == 0
  assert "| plain | 10 | 50.0% (50.0–50.0) | 0.001 | none run | 10 |" in capsys.readouterr().out


def test_depth_limit_of_an_empty_folder_is_a_usage_error(tmp_path, capsys):
  toml = tmp_path / "grid.toml"
  toml.write_text('methods = ["plain"]\n')
  assert main(["depth-limit", "--config", str(toml), "--out", str(tmp_path / "none")]) == 2
  assert "no such sweep folder" in capsys.readouterr().err
