"""``bgn-jax sweep``: a resumable grid of training runs and its best-over-(init, LR) summary.

Each run lives in ``OUT/runs/<name>/``, the name ending in a hash of every setting
that changes the run's result (:func:`run_name`); a run whose ``results.json``
exists is finished and skipped after a restart, and a run killed midway continues
from its checkpoints. A sweep started again with other settings (more epochs,
another batch size) gets other folders, so it never counts the earlier runs. After
every run the summary is rewritten (``summary.md``, ``summary.csv``,
``accuracy_vs_depth.png``, ``grad_norms.png``), so whatever has finished is usable
while the sweep goes on.

A cell is (dataset, depth, activation, optimizer, method), and with
``split_inits`` also the init. Its reported accuracy is the one of its best
setting: the (init, LR) pair with the highest mean test accuracy over seeds,
chosen per cell, so each method gets its own best init and LR. The summary names
the winning init and LR, how many of that setting's seeds ended within 5 points
of its best seed (the stability column) and how many trained (above 20%).

With ``search_seeds`` the LR grid is searched with those seeds only, and the
other seeds run at each cell's best setting once its search has finished.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import hashlib
import itertools
import json
import math
import statistics
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from bgn_jax.experiments.train import NonFiniteLossError, TrainConfig, result_fields, train

__all__ = ["SweepConfig", "run_name", "run_sweep", "stable_seeds", "summarize"]

_LIST_KEYS = (
  "depths",
  "methods",
  "activations",
  "inits",
  "optimizers",
  "lrs",
  "seeds",
  "search_seeds",
)
SCALAR_KEYS = (
  "out",
  "dataset",
  "arch",
  "width",
  "bgn_every",
  "bgn_target",
  "heads",
  "momentum",
  "weight_decay",
  "warmup_steps",
  "schedule",
  "batch_size",
  "epochs",
  "train_examples",
  "dtype",
  "data_dir",
  "log_every",
  "checkpoint_every",
  "split_inits",
)
# A seed counts as stable when it ended within this much test accuracy of the
# best seed of its setting.
STABLE_WITHIN = 0.05
# A seed counts as trained when its test accuracy is above this (chance is 10%).
TRAINED_ABOVE = 0.2


@dataclasses.dataclass(frozen=True)
class SweepConfig:
  """The grid and the settings shared by its runs.

  Attributes:
    out: the sweep folder.
    depths, methods, activations, optimizers, seeds: the grid axes.
    inits: the initializations, crossed with the LRs: each method gets its
      best (init, LR) pair. A TOML ``init = "he"`` is read as ``inits = ["he"]``.
    method_inits: ``{method: [init, ...]}``, the inits of the methods it names
      (the others take ``inits``).
    split_inits: each (method, init) is a cell of its own (its best LR), instead
      of each method taking its best init.
    lrs: the LR grid: one list for every optimizer, or ``{optimizer: [lr, ...]}``.
    search_seeds: the seeds that search the LR grid (and the inits); the other
      seeds run only at each cell's best setting, once every search run of the
      cell has finished. Empty: every seed runs at every setting.
    dataset, arch, width, bgn_every, bgn_target, heads, momentum, weight_decay,
      warmup_steps, schedule, batch_size, epochs, train_examples, dtype,
      data_dir, log_every, checkpoint_every: as in :class:`TrainConfig`.
  """

  out: str = "bgn-sweep"
  depths: tuple[int, ...] = (10,)
  methods: tuple[str, ...] = ("plain", "bgn")
  activations: tuple[str, ...] = ("relu",)
  inits: tuple[str, ...] = ("lecun",)
  method_inits: Mapping[str, tuple[str, ...]] = dataclasses.field(default_factory=dict)
  split_inits: bool = False
  optimizers: tuple[str, ...] = ("adam",)
  lrs: tuple[float, ...] | Mapping[str, tuple[float, ...]] = (1e-3,)
  seeds: tuple[int, ...] = (0,)
  search_seeds: tuple[int, ...] = ()
  dataset: str = "digits"
  arch: str = "mlp"
  width: int = 128
  bgn_every: int = 1
  bgn_target: str = "sqrt_units"
  heads: int = 4
  momentum: float = 0.9
  weight_decay: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "constant"
  batch_size: int = 128
  epochs: int = 2
  train_examples: int = 0
  dtype: str = "float32"
  data_dir: str | None = None
  log_every: int = 50
  checkpoint_every: int = 0

  @classmethod
  def from_mapping(cls, values: Mapping[str, Any], source: str) -> SweepConfig:
    """Builds a config from a mapping (a parsed TOML file); ``source`` names it in errors."""
    known = {f.name for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in values.items():
      name = key.replace("-", "_")
      if name == "init" and "inits" not in values:
        name, value = "inits", [value]
      if name not in known:
        raise ValueError(f"{source}: unknown key {key!r}; known keys: {', '.join(sorted(known))}.")
      if name == "method_inits":
        if not isinstance(value, Mapping):
          raise ValueError(f"{source}: {key!r} must be a table {{method = [init, ...]}}.")
        value = {method: tuple(inits) for method, inits in value.items()}
      elif name == "lrs" and isinstance(value, Mapping):
        value = {opt: tuple(float(v) for v in lrs) for opt, lrs in value.items()}
      elif name == "lrs":
        value = tuple(float(v) for v in value)
      elif name in _LIST_KEYS:
        if not isinstance(value, (list, tuple)):
          raise ValueError(f"{source}: {key!r} must be a list; got {value!r}.")
        value = tuple(value)
      kwargs[name] = value
    return cls(**kwargs)

  @classmethod
  def from_args(cls, args: argparse.Namespace) -> SweepConfig:
    """The TOML file of ``--config`` (if any), overridden by the flags that were given."""
    values: dict[str, Any] = {}
    if args.config:
      try:
        import tomllib  # Python >= 3.11
      except ModuleNotFoundError:
        raise ValueError("--config: reading TOML needs Python >= 3.11 (tomllib).") from None
      path = Path(args.config)
      try:
        values = tomllib.loads(path.read_text())
      except FileNotFoundError:
        raise ValueError(f"--config: {path}: no such file.") from None
      except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config: {path}: not valid TOML ({e}).") from None
    for key in _LIST_KEYS + SCALAR_KEYS:
      value = getattr(args, key, None)
      if value is not None:
        values[key] = value
    config = cls.from_mapping(values, args.config or "flags")
    config.validate()
    return config

  def lrs_for(self, optimizer: str) -> tuple[float, ...]:
    if isinstance(self.lrs, Mapping):
      if optimizer not in self.lrs:
        raise ValueError(f"lrs: no LR grid for optimizer {optimizer!r}; got {dict(self.lrs)}.")
      return tuple(self.lrs[optimizer])
    return tuple(self.lrs)

  def inits_for(self, method: str) -> tuple[str, ...]:
    return tuple(self.method_inits.get(method, self.inits))

  def cell_key(self, run: TrainConfig) -> tuple:
    """The summary cell of a run: (dataset, depth, activation, optimizer, method[, init])."""
    key = (run.dataset, run.depth, run.activation, run.optimizer, run.method)
    return key + (run.init,) if self.split_inits else key

  def search_seeds_used(self) -> tuple[int, ...]:
    """The seeds that run at every setting (all seeds without ``search_seeds``)."""
    return tuple(s for s in self.seeds if s in self.search_seeds) or tuple(self.seeds)

  def runs(self) -> list[TrainConfig]:
    """Every run of the grid known so far, in order (deeper and slower cells last).

    With ``search_seeds``, a depth's search runs come first, then the other seeds
    at the best setting of each cell whose search has finished (read from the
    results on disk, so the list grows as the search finishes).
    """
    search = self.search_seeds_used()
    follow_up = [s for s in self.seeds if s not in search]
    configs = []
    for depth in sorted(self.depths):
      grid = self._grid(depth, search)
      configs += grid
      if not follow_up:
        continue
      by_cell: dict[tuple, list[TrainConfig]] = {}
      for run in grid:
        by_cell.setdefault(self.cell_key(run), []).append(run)
      for runs in by_cell.values():
        best = _best_setting(runs)
        if best is None:
          continue
        init, lr = best
        template = next(r for r in runs if r.init == init and r.lr == lr)
        for seed in follow_up:
          run = dataclasses.replace(template, seed=seed, out="")
          configs.append(dataclasses.replace(run, out=self._folder(run)))
    return configs

  def runs_planned(self, cell: tuple) -> int:
    """How many runs a cell has once its search has finished."""
    search = self.search_seeds_used()
    follow_up = len(self.seeds) - len(search)
    method = cell[4]
    inits = 1 if self.split_inits else len(self.inits_for(method))
    return inits * len(self.lrs_for(cell[3])) * len(search) + follow_up

  def _grid(self, depth: int, seeds: Sequence[int]) -> list[TrainConfig]:
    configs = []
    for activation, optimizer, method, seed in itertools.product(
      self.activations, self.optimizers, self.methods, seeds
    ):
      for init, lr in itertools.product(self.inits_for(method), self.lrs_for(optimizer)):
        config = TrainConfig(
          out="",
          dataset=self.dataset,
          arch=self.arch,
          depth=depth,
          width=self.width,
          activation=activation,
          init=init,
          method=method,
          bgn_every=self.bgn_every,
          bgn_target=self.bgn_target,
          heads=self.heads,
          optimizer=optimizer,
          lr=lr,
          weight_decay=self.weight_decay,
          warmup_steps=self.warmup_steps,
          schedule=self.schedule,
          momentum=self.momentum,
          batch_size=self.batch_size,
          epochs=self.epochs,
          train_examples=self.train_examples,
          seed=seed,
          dtype=self.dtype,
          log_every=self.log_every,
          checkpoint_every=self.checkpoint_every,
          resume=True,
          data_dir=self.data_dir,
          progress=True,
          plots=False,
        )
        configs.append(dataclasses.replace(config, out=self._folder(config)))
    return configs

  def _folder(self, run: TrainConfig) -> str:
    """The folder of ``run``: ``OUT/runs/<run_name>``, or an earlier finished one.

    Sweeps written before the names carried the hash named a run without it; such a
    folder is the run's when its results.json holds the run's configuration.
    """
    runs = Path(self.out) / "runs"
    earlier = runs / _readable_name(run)
    result = _read_result(earlier / "results.json") or {}
    stored = result.get("config")
    if stored is not None and result_fields(TrainConfig.from_stored(stored)) == result_fields(run):
      return str(earlier)
    return str(runs / run_name(run))

  def validate(self) -> None:
    """Raises ValueError naming the key that is empty or out of range."""
    for key in _LIST_KEYS:
      if key not in ("lrs", "search_seeds") and not getattr(self, key):
        raise ValueError(f"--{key}: the grid axis is empty.")
    for method, inits in self.method_inits.items():
      if method not in self.methods:
        raise ValueError(f"method_inits: {method!r} is not one of the methods {self.methods}.")
      if not inits:
        raise ValueError(f"method_inits: the inits of {method!r} are empty.")
    for optimizer in self.optimizers:
      if not self.lrs_for(optimizer):
        raise ValueError(f"--lrs: the LR grid of {optimizer!r} is empty.")
    for run in self.runs():
      run.validate()


def run_name(config: TrainConfig) -> str:
  """The folder name of a run inside ``OUT/runs``: its main settings, then a hash.

  The hash is the first 8 hex digits of the SHA-256 of every setting that changes
  the result (:func:`bgn_jax.experiments.train.result_fields`), so two runs share a
  folder only when they compute the same thing.
  """
  fields = json.dumps(result_fields(config), sort_keys=True)
  return f"{_readable_name(config)}-{hashlib.sha256(fields.encode()).hexdigest()[:8]}"


def _readable_name(config: TrainConfig) -> str:
  # The whole name of a run before names carried the hash; settings at their
  # defaults are left out.
  defaults = TrainConfig(out="")
  arch = "" if config.arch == "mlp" else f"{config.arch}-"
  name = (
    f"{config.dataset}-{arch}d{config.depth}-w{config.width}-{config.activation}-{config.init}-"
    f"{config.method}-k{config.bgn_every}-{config.optimizer}-lr{config.lr:g}-s{config.seed}"
  )
  extras = {
    "heads": f"h{config.heads}" if config.arch == "transformer" else "",
    "bgn_target": f"t{config.bgn_target}",
    "weight_decay": f"wd{config.weight_decay:g}" if config.optimizer == "adamw" else "",
    "warmup_steps": f"wu{config.warmup_steps}",
    "schedule": config.schedule,
    "train_examples": f"n{config.train_examples}",
  }
  for field, suffix in extras.items():
    if suffix and getattr(config, field) != getattr(defaults, field):
      name += f"-{suffix}"
  return name


def _read_result(path: Path) -> dict[str, Any] | None:
  try:
    return json.loads(path.read_text())
  except (FileNotFoundError, json.JSONDecodeError):
    return None


def _best_setting(runs: Sequence[TrainConfig]) -> tuple[str, float] | None:
  """The (init, LR) of a cell's search runs with the best mean accuracy; None until all finished.

  A setting where any seed diverged ranks below every other.
  """
  scores: dict[tuple[str, float], list[float | None]] = {}
  for run in runs:
    result = _read_result(Path(run.out) / "results.json")
    if result is None:
      return None
    accuracy = None if result.get("diverged") else result["test_accuracy"]
    scores.setdefault((run.init, run.lr), []).append(accuracy)
  best, best_score = None, -math.inf
  # Sorted, as summarize ranks them, so that a tie picks the same setting there.
  for setting, accuracies in sorted(scores.items()):
    score = -math.inf if None in accuracies else statistics.fmean(a or 0.0 for a in accuracies)
    if best is None or score > best_score:
      best, best_score = setting, score
  return best


def stable_seeds(accuracies: Sequence[float | None]) -> int:
  """How many seeds ended within ``STABLE_WITHIN`` of the best seed (a diverged seed never)."""
  finished = [a for a in accuracies if a is not None]
  if not finished:
    return 0
  best = max(finished)
  return sum(1 for a in finished if a >= best - STABLE_WITHIN)


def summarize(config: SweepConfig) -> list[dict[str, Any]]:
  """The best-over-(init, LR) rows of the finished runs; writes summary.md, .csv and PNGs.

  Returns:
    One row per cell with any finished run: dataset, depth, activation,
    optimizer, method, best_init, best_lr, mean, std (sample, over seeds), min,
    max, seeds, stable (seeds of the best setting within 5 points of its best
    seed), trained (seeds of the best setting above 20%), accuracies,
    runs_done, runs_total and diverged (runs at any setting). With
    ``search_seeds`` the best setting is chosen on the search seeds alone.
  """
  out = Path(config.out)
  cells: dict[tuple, dict[tuple[str, float], list[dict[str, Any]]]] = {}
  totals: dict[tuple, int] = {}
  search = set(config.search_seeds_used())
  for run in config.runs():
    key = config.cell_key(run)
    totals[key] = config.runs_planned(key)
    result = _read_result(Path(run.out) / "results.json")
    if result is not None:
      setting = (run.init, run.lr)
      cells.setdefault(key, {}).setdefault(setting, []).append({**result, "seed": run.seed})
  rows, per_setting = [], []
  for key, by_setting in cells.items():
    best = None
    for (init, lr), results in sorted(by_setting.items()):
      accuracies = [r["test_accuracy"] for r in results if not r.get("diverged")]
      diverged = len(results) - len(accuracies)
      mean = statistics.fmean(accuracies) if accuracies else math.nan
      per_setting.append((key[:5], init, lr, mean, len(results), diverged))
      searched = [r for r in results if r["seed"] in search]
      searched_ok = [r["test_accuracy"] for r in searched if not r.get("diverged")]
      # A setting where any seed diverged is unusable; it ranks below every other.
      score = (
        statistics.fmean(searched_ok)
        if searched_ok and len(searched_ok) == len(searched)
        else -math.inf
      )
      if best is None or score > best[0]:
        best = (score, init, lr, accuracies, results)
    assert best is not None  # by_setting is never empty.
    score, init, lr, accuracies, results = best
    rows.append(
      {
        "dataset": key[0],
        "depth": key[1],
        "activation": key[2],
        "optimizer": key[3],
        "method": key[4],
        "best_init": init,
        "best_lr": lr,
        "mean": statistics.fmean(accuracies) if accuracies else math.nan,
        "std": statistics.stdev(accuracies) if len(accuracies) > 1 else 0.0,
        "min": min(accuracies) if accuracies else math.nan,
        "max": max(accuracies) if accuracies else math.nan,
        "seeds": len(accuracies),
        "stable": stable_seeds(
          [None if r.get("diverged") else r["test_accuracy"] for r in results]
        ),
        "trained": sum(1 for a in accuracies if a > TRAINED_ABOVE),
        "accuracies": " ".join(f"{a:.4f}" for a in accuracies),
        "runs_done": sum(len(r) for r in by_setting.values()),
        "runs_total": totals[key],
        "diverged": sum(1 for rs in by_setting.values() for r in rs if r.get("diverged")),
        # True when a seed diverged at every setting: mean and std are then over
        # the seeds that did not, and the cell has no stable setting in the grid.
        "no_stable_lr": score == -math.inf,
        "_label": f"{key[4]} ({init})" if config.split_inits else key[4],
        "_grad_norms": {
          "init": results[0].get("grad_norms_init"),
          "final": results[0].get("grad_norms_final"),
        },
      }
    )
  rows.sort(
    key=lambda r: (
      r["dataset"],
      r["activation"],
      r["optimizer"],
      r["depth"],
      r["method"],
      r["best_init"],
    )
  )
  _write_tables(out, rows, per_setting)
  if rows:
    _write_plots(out, rows)
  return rows


def _write_tables(out: Path, rows: Sequence[dict[str, Any]], per_setting: Sequence[tuple]) -> None:
  columns = [c for c in (rows[0] if rows else {}) if not c.startswith("_")]
  with open(out / "summary.csv", "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
  lines = [
    "| dataset | activation | optimizer | depth | method | best init | best LR "
    "| test accuracy, mean ± std (min–max) | seeds | stable seeds (within 5 points of the best) "
    "| trained seeds (above 20%) | runs done | diverged runs |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in rows:
    accuracy = (
      f"{100 * r['mean']:.1f}% ± {100 * r['std']:.1f} ({100 * r['min']:.1f}–{100 * r['max']:.1f})"
      if r["seeds"]
      else "diverged"
    )
    if r["no_stable_lr"] and r["seeds"]:
      accuracy += ", no setting without a diverged seed"
    lines.append(
      f"| {r['dataset']} | {r['activation']} | {r['optimizer']} | {r['depth']} | {r['method']} "
      f"| {r['best_init']} | {r['best_lr']:g} | {accuracy} | {r['seeds']} "
      f"| {r['stable']}/{r['seeds']} | {r['trained']}/{r['seeds']} "
      f"| {r['runs_done']}/{r['runs_total']} | {r['diverged']} |"
    )
  lines += [
    "",
    "Every setting (mean test accuracy over the finished seeds):",
    "",
    "| dataset | depth | activation | optimizer | method | init | LR | mean | runs | diverged |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for key, init, lr, mean, n, diverged in sorted(per_setting):
    shown = f"{100 * mean:.1f}%" if not math.isnan(mean) else "—"
    lines.append(
      f"| {key[0]} | {key[1]} | {key[2]} | {key[3]} | {key[4]} | {init} | {lr:g} | {shown} "
      f"| {n} | {diverged} |"
    )
  (out / "summary.md").write_text("\n".join(lines) + "\n")


def _write_plots(out: Path, rows: Sequence[dict[str, Any]]) -> None:
  from bgn_jax.experiments.plots import plot_accuracy_vs_depth, plot_grad_norms

  plotted = [r for r in rows if r["seeds"]]
  plot_accuracy_vs_depth(plotted, out / "accuracy_vs_depth.png", title=rows[0]["dataset"])
  deepest = max(r["depth"] for r in rows)
  norms = {}
  for r in rows:
    if r["depth"] != deepest:
      continue
    label = f"{r['method']} {r['activation']} {r['optimizer']}"
    for when in ("init", "final"):
      if r["_grad_norms"][when] is not None:
        norms[f"{label}, {when}"] = r["_grad_norms"][when]
  if norms:
    plot_grad_norms(norms, out / "grad_norms.png", title=f"gradient norm, depth {deepest}")


def run_sweep(config: SweepConfig, progress: bool = True) -> list[dict[str, Any]]:
  """Runs every unfinished run of the grid, rewriting the summary after each.

  Returns:
    The summary rows (see :func:`summarize`).
  """
  import jax

  config.validate()
  out = Path(config.out)
  out.mkdir(parents=True, exist_ok=True)
  # A flag JAX defines at run time, which a type checker cannot see.
  if not jax.config.jax_compilation_cache_dir:  # pyright: ignore[reportAttributeAccessIssue]
    # Runs differing only in seed or LR compile to the same programs (the LR is
    # optimizer state), so a persistent cache saves most compile time.
    jax.config.update("jax_compilation_cache_dir", str((out / ".jax_cache").absolute()))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  is_main = jax.process_index() == 0
  datasets: dict[str, Any] = {}
  skipped = sum(1 for run in config.runs() if (Path(run.out) / "results.json").exists())
  done = 0
  attempted: set[str] = set()
  while True:
    # The list grows as LR searches finish (search_seeds), so it is re-read after each run.
    runs = config.runs()
    pending = [
      (number, run)
      for number, run in enumerate(runs, 1)
      if run.out not in attempted and not (Path(run.out) / "results.json").exists()
    ]
    if not pending:
      break
    number, run = pending[0]
    attempted.add(run.out)
    results_path = Path(run.out) / "results.json"
    done += 1
    if is_main:
      print(f"bgn-jax sweep: run {number}/{len(runs)}: {run_name(run)}", file=sys.stderr)
    if run.dataset not in datasets:
      from bgn_jax.experiments.data import load_dataset

      datasets[run.dataset] = load_dataset(run.dataset, run.data_dir)
    try:
      train(dataclasses.replace(run, progress=progress), dataset=datasets[run.dataset])
    except NonFiniteLossError as e:
      # Deterministic: a rerun would diverge again, so the run counts as finished.
      if is_main:
        print(f"bgn-jax sweep: {run_name(run)}: {e}", file=sys.stderr)
        results_path.write_text(
          json.dumps(
            {
              "config": dataclasses.asdict(run),
              "method": run.method,
              "diverged": True,
              "diverged_at_step": e.step,
              "test_accuracy": None,
            },
            indent=2,
          )
          + "\n"
        )
    if is_main:
      summarize(config)
  if is_main:
    print(
      f"bgn-jax sweep: {done} runs done, {skipped} already finished; "
      f"summary in {out / 'summary.md'} and {out / 'summary.csv'}",
      file=sys.stderr,
    )
    return summarize(config)
  return []
