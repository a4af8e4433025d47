"""The figure of finished runs' gradient norms against depth (no training)."""

from __future__ import annotations

import json

from bgn_jax.experiments import plots


def test_plot_runs_grad_norms_draws_init_and_final_of_every_run(tmp_path, monkeypatch):
  runs = {}
  for label, accuracy in (("plain he", 0.5), ("bgn he", 0.75)):
    folder = tmp_path / label.replace(" ", "-")
    folder.mkdir()
    results = {"test_accuracy": accuracy, "grad_norms_init": [1.0, 2.0], "grad_norms_final": [3.0]}
    (folder / "results.json").write_text(json.dumps(results))
    runs[label] = folder
  drawn = {}
  real = plots.plot_grad_norms

  def record(norms, path, title=""):
    drawn.update(norms)
    return real(norms, path, title)

  monkeypatch.setattr(plots, "plot_grad_norms", record)
  path = plots.plot_runs_grad_norms(runs, tmp_path / "figure.png", title="depth 2")
  assert path.exists() and path.stat().st_size > 0
  assert drawn == {
    "plain he, at init": [1.0, 2.0],
    "plain he, after training (50.0%)": [3.0],
    "bgn he, at init": [1.0, 2.0],
    "bgn he, after training (75.0%)": [3.0],
  }
