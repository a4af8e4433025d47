"""PNG plots of the experiments (matplotlib, Agg backend)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

__all__ = [
  "plot_accuracy_curves",
  "plot_accuracy_vs_depth",
  "plot_grad_norms",
  "plot_run",
  "plot_runs_grad_norms",
]


def _pyplot():
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  return plt


def _save(plt: Any, fig: Any, ax: Any, path: str | Path, title: str) -> Path:
  ax.set_title(title)
  return write_figure(plt, fig, path)


def write_figure(plt: Any, fig: Any, path: str | Path) -> Path:
  """Lays ``fig`` out, writes it as a PNG at ``path`` and closes it."""
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return Path(path)


def plot_accuracy_curves(
  curves: Mapping[str, tuple[Sequence[float], Sequence[float]]], path: str | Path, title: str = ""
) -> Path:
  """Test accuracy against epoch, one line per label: ``{label: (epochs, accuracies)}``."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (epochs, accuracies) in curves.items():
    ax.plot(epochs, accuracies, marker="o", markersize=3, label=label)
  ax.set_xlabel("epoch")
  ax.set_ylabel("test accuracy")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend()
  return _save(plt, fig, ax, path, title)


def plot_grad_norms(
  norms: Mapping[str, Sequence[float]], path: str | Path, title: str = ""
) -> Path:
  """Per-layer gradient norm against depth (log scale), one line per label."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  for label, values in norms.items():
    layers = range(1, len(values) + 1)
    ax.semilogy(layers, [max(v, 1e-45) for v in values], label=label)
  ax.set_xlabel("hidden layer (1 = next to the input)")
  ax.set_ylabel("norm of the layer's parameter gradient")
  ax.grid(alpha=0.3, which="both")
  ax.legend()
  return _save(plt, fig, ax, path, title)


def plot_runs_grad_norms(runs: Mapping[str, str | Path], path: str | Path, title: str = "") -> Path:
  """Gradient norm against depth at init and after training of finished runs, one figure.

  Args:
    runs: ``{label: run folder}``; each folder's ``results.json`` holds the
      profiles ``grad_norms_init`` and ``grad_norms_final``.
    path: the PNG.
    title: the figure title.
  """
  import json

  norms = {}
  for label, folder in runs.items():
    results = json.loads((Path(folder) / "results.json").read_text())
    accuracy = results["test_accuracy"]
    for when, name in (("init", "at init"), ("final", f"after training ({100 * accuracy:.1f}%)")):
      norms[f"{label}, {name}"] = results[f"grad_norms_{when}"]
  return plot_grad_norms(norms, path, title)


def plot_accuracy_vs_depth(
  rows: Sequence[Mapping[str, Any]], path: str | Path, title: str = ""
) -> Path:
  """Best test accuracy against depth, one line per (method, activation, optimizer).

  Args:
    rows: sweep summary rows with keys depth, method, activation, optimizer,
      mean and std.
    path: the PNG.
    title: the figure title.
  """
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(6, 4))
  groups: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    label = row.get("_label", row["method"])
    groups.setdefault(f"{label} {row['activation']} {row['optimizer']}", []).append(row)
  for label, group in sorted(groups.items()):
    group = sorted(group, key=lambda r: r["depth"])
    ax.errorbar(
      [r["depth"] for r in group],
      [r["mean"] for r in group],
      yerr=[r["std"] for r in group],
      marker="o",
      capsize=3,
      label=label,
    )
  ax.set_xlabel("depth (hidden layers)")
  ax.set_ylabel("test accuracy (best LR, mean over seeds)")
  ax.set_ylim(0, 1)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8)
  return _save(plt, fig, ax, path, title)


def plot_run(records: Sequence[Mapping[str, Any]], results: Mapping[str, Any], out: Path) -> None:
  """The plots of one ``train`` run: training curves and gradient norm against depth."""
  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
  left.plot([r["step"] for r in records], [r["train_loss"] for r in records])
  left.set_xlabel("step")
  left.set_ylabel("training loss")
  left.grid(alpha=0.3)
  tested = [r for r in records if "test_accuracy" in r]
  right.plot([r["epoch"] for r in tested], [r["test_accuracy"] for r in tested], marker="o")
  right.set_xlabel("epoch")
  right.set_ylabel("test accuracy")
  right.set_ylim(0, 1)
  right.grid(alpha=0.3)
  fig.suptitle(f"{results['method']}: test accuracy {results['test_accuracy']:.3f}")
  fig.tight_layout()
  fig.savefig(out / "training.png", dpi=100)
  plt.close(fig)
  plot_grad_norms(
    {
      "at initialization": results["grad_norms_init"],
      "after training": results["grad_norms_final"],
    },
    out / "grad_norms.png",
    title=f"{results['method']}: gradient norm against depth",
  )
