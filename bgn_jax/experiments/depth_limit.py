"""``bgn-jax depth-limit``: how deep each method still trains, as one figure and one table.

Reads the runs of a sweep (its config and folder, as for ``bgn-jax sweep``; the
sweep may be partly finished) and writes

- a figure with two panels: test accuracy against depth (log axis), one line per
  method (with ``split_inits``, per method and init) at its best LR, the mean over
  seeds with the seeds' range as a band; and the norm of the first layer's
  gradient at initialization against depth;
- a Markdown table: for each method, the deepest depth at which every seed
  trained (test accuracy above 20%), and the accuracy there.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bgn_jax.experiments.sweep import TRAINED_ABOVE, SweepConfig, summarize

__all__ = ["depth_limit_rows", "depth_limit_table", "plot_depth_limit", "run_depth_limit"]


def _label(row: Mapping[str, Any]) -> str:
  return row.get("_label", row["method"])


def depth_limit_rows(rows: Sequence[Mapping[str, Any]], seeds: int) -> list[dict[str, Any]]:
  """One row per method: the deepest depth at which all ``seeds`` seeds trained.

  Args:
    rows: the sweep's summary rows (:func:`bgn_jax.experiments.sweep.summarize`).
    seeds: how many seeds a depth needs (a depth whose seeds have not all
      finished does not count).

  Returns:
    Rows with label, depth (None when no depth qualifies), mean, min, max, lr
    and init there, deepest_run (the deepest depth with a finished run),
    first_failure (the shallowest depth with a seed at or below 20%, or None) and
    complete (the depths where all ``seeds`` seeds finished).
  """
  by_label: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    by_label.setdefault(_label(row), []).append(row)
  table = []
  for label, group in by_label.items():
    group = sorted(group, key=lambda r: r["depth"])
    complete = [r for r in group if r["seeds"] >= seeds]
    trained = [r for r in complete if r["trained"] == r["seeds"]]
    failed = [r for r in group if r["seeds"] and r["trained"] < r["seeds"]]
    best = trained[-1] if trained else None
    table.append(
      {
        "label": label,
        "depth": best["depth"] if best else None,
        "mean": best["mean"] if best else math.nan,
        "min": best["min"] if best else math.nan,
        "max": best["max"] if best else math.nan,
        "lr": best["best_lr"] if best else None,
        "init": best["best_init"] if best else None,
        "deepest_run": group[-1]["depth"],
        "first_failure": failed[0]["depth"] if failed else None,
        "complete": [r["depth"] for r in complete],
      }
    )
  return table


def depth_limit_table(table: Sequence[Mapping[str, Any]]) -> str:
  """The Markdown table of :func:`depth_limit_rows`."""
  lines = [
    "| method | deepest depth where all seeds train | test accuracy there, mean (min–max) "
    "| LR there | shallowest depth where a seed fails | depths with all seeds run |",
    "|---|---|---|---|---|---|",
  ]
  for r in table:
    if r["depth"] is None:
      depth, accuracy, lr = "none", "—", "—"
    else:
      depth = str(r["depth"])
      accuracy = f"{100 * r['mean']:.1f}% ({100 * r['min']:.1f}–{100 * r['max']:.1f})"
      lr = f"{r['lr']:g}"
    failure = str(r["first_failure"]) if r["first_failure"] is not None else "none run"
    complete = ", ".join(str(d) for d in r["complete"]) or "none"
    lines.append(f"| {r['label']} | {depth} | {accuracy} | {lr} | {failure} | {complete} |")
  return "\n".join(lines) + "\n"


def plot_depth_limit(
  rows: Sequence[Mapping[str, Any]],
  path: str | Path,
  title: str = "",
  grad_labels: Sequence[str] | None = None,
  seeds: int = 0,
) -> Path:
  """The two-panel figure: accuracy against depth, and the first layer's gradient at init.

  Args:
    rows: the sweep's summary rows.
    path: the PNG.
    title: the figure's title.
    grad_labels: the methods drawn in the gradient panel (default: every label
      that starts with ``plain`` or is ``bgn``/``bgn (...)``).
    seeds: the seeds a depth should have; a point with fewer is drawn hollow.
  """
  from bgn_jax.experiments.plots import _pyplot, write_figure

  plt = _pyplot()
  fig, (left, right) = plt.subplots(1, 2, figsize=(13, 5))
  by_label: dict[str, list[Mapping[str, Any]]] = {}
  for row in rows:
    if row["seeds"]:
      by_label.setdefault(_label(row), []).append(row)
  # One color per method; LeCun init dashed.
  methods = sorted({label.split(" ")[0] for label in by_label})
  colors = {label: f"C{methods.index(label.split(' ')[0])}" for label in by_label}
  styles = {label: "--" if "lecun" in label else "-" for label in by_label}
  partial = False
  for label, group in sorted(by_label.items()):
    group = sorted(group, key=lambda r: r["depth"])
    depths = [r["depth"] for r in group]
    left.plot(
      depths, [r["mean"] for r in group], linestyle=styles[label], color=colors[label], label=label
    )
    for r in group:
      full = r["seeds"] >= seeds
      partial |= not full
      left.plot(
        r["depth"],
        r["mean"],
        marker="o",
        color=colors[label],
        markerfacecolor=colors[label] if full else "white",
      )
    left.fill_between(
      depths, [r["min"] for r in group], [r["max"] for r in group], color=colors[label], alpha=0.12
    )
  if partial:
    left.text(
      0.99,
      0.99,
      "hollow: not all seeds finished",
      transform=left.transAxes,
      ha="right",
      va="top",
      fontsize=8,
    )
  left.axhline(TRAINED_ABOVE, color="grey", linestyle=":", linewidth=1)
  left.set_xscale("log")
  left.set_xlabel("depth (hidden layers)")
  left.set_ylabel("test accuracy at the best LR: mean, band = min–max over seeds")
  left.set_ylim(0, 1)
  left.grid(alpha=0.3, which="both")
  left.legend(fontsize=8, loc="lower left")
  left.set_title("test accuracy against depth")

  if grad_labels is None:
    grad_labels = [
      label for label in by_label if label.startswith("plain") or label.split(" ")[0] == "bgn"
    ]
  for label in grad_labels:
    group = sorted(by_label.get(label, []), key=lambda r: r["depth"])
    points = [
      (r["depth"], r["_grad_norms"]["init"][0])
      for r in group
      if r.get("_grad_norms", {}).get("init")
    ]
    if points:
      right.loglog(
        [d for d, _ in points],
        [max(v, 1e-45) for _, v in points],
        marker="o",
        linestyle=styles[label],
        color=colors[label],
        label=label,
      )
  right.set_xlabel("depth (hidden layers)")
  right.set_ylabel("norm of the first layer's parameter gradient at init")
  right.grid(alpha=0.3, which="both")
  right.legend(fontsize=8)
  right.set_title("first hidden layer's gradient at initialization (one batch)")
  if title:
    fig.suptitle(title)
  return write_figure(plt, fig, path)


def run_depth_limit(
  config: SweepConfig, png: str | Path | None = None, title: str | None = None
) -> str:
  """Summarizes the sweep, writes ``depth_limit.md`` (and the figure) in its folder.

  Args:
    config: the sweep (its folder holds the runs).
    png: where the figure goes (default ``OUT/depth_limit.png``).
    title: the figure's title (default: dataset, width, examples and epochs).

  Returns:
    The Markdown table.

  Raises:
    ValueError: the sweep has no finished run.
  """
  out = Path(config.out)
  if not out.is_dir():
    raise ValueError(f"--out: {out}: no such sweep folder.")
  rows = summarize(config)
  if not rows:
    raise ValueError(f"--out: {out}: no finished run of this sweep.")
  table = depth_limit_table(depth_limit_rows(rows, len(config.seeds)))
  (out / "depth_limit.md").write_text(table)
  if title is None:
    examples = f"{config.train_examples} examples" if config.train_examples else "all examples"
    activations = "/".join(config.activations)
    title = (
      f"{config.dataset}, {activations} {config.arch.upper()} of width {config.width}, "
      f"{examples}, {config.epochs} epochs, batch {config.batch_size}"
    )
  plot_depth_limit(
    rows, png if png is not None else out / "depth_limit.png", title=title, seeds=len(config.seeds)
  )
  return table
