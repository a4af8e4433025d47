"""The ``bgn-jax`` command line: ``demo``, ``train``, ``sweep`` and ``depth-limit``.

Exit status: 0 on success; 2 for a bad flag or a missing or corrupt data file;
3 when training stopped on a non-finite loss; 130 after Ctrl-C (a checkpoint of
the last finished step is saved first).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from pathlib import Path

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_NON_FINITE = 3
EXIT_INTERRUPTED = 130


def _add_distributed_flags(parser: argparse.ArgumentParser) -> None:
  group = parser.add_argument_group("multi-host (jax.distributed)")
  group.add_argument(
    "--distributed",
    action="store_true",
    help="call jax.distributed.initialize() first (auto-detected on TPU pods, SLURM, "
    "Open MPI; or give the three flags below).",
  )
  group.add_argument("--coordinator-address", help="host:port of process 0")
  group.add_argument("--num-processes", type=int, help="processes in the job")
  group.add_argument("--process-id", type=int, help="this process's index")


def _add_model_flags(parser: argparse.ArgumentParser, *, lists: bool) -> None:
  from bgn_jax.experiments.data import DATASETS
  from bgn_jax.experiments.models import ACTIVATIONS, ARCHS, INITS, METHODS
  from bgn_jax.experiments.train import DTYPES, OPTIMIZERS, SCHEDULES

  parser.add_argument("--dataset", choices=DATASETS, default="digits")
  parser.add_argument(
    "--arch",
    choices=ARCHS,
    default="mlp",
    help="mlp; cnn (3x3 convolutions, stride-2 stages, global average pooling); transformer "
    "(post-LN encoder over the image rows as tokens)",
  )
  parser.add_argument(
    "--width", type=int, default=128, help="units per hidden layer (cnn: channels; model width)"
  )
  parser.add_argument("--heads", type=int, default=4, help="attention heads (transformer)")
  parser.add_argument("--bgn-every", type=int, default=1, help="BGN after every K-th layer")
  parser.add_argument(
    "--bgn-target", default="sqrt_units", help="the BGN target norm: sqrt_units or a number"
  )
  parser.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
  parser.add_argument("--weight-decay", type=float, default=1e-4, help="adamw's weight decay")
  parser.add_argument(
    "--warmup-steps", type=int, default=0, help="linear LR warm-up over N steps (0: none)"
  )
  parser.add_argument("--schedule", choices=SCHEDULES, default="constant", help="LR schedule")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--epochs", type=int, default=2)
  parser.add_argument(
    "--train-examples", type=int, default=0, help="train on a fixed random subset (0: all)"
  )
  parser.add_argument("--dtype", choices=tuple(DTYPES), default="float32")
  parser.add_argument("--data-dir", help="folder with the data files (see docs)")
  parser.add_argument("--log-every", type=int, default=50, help="steps between metric records")
  parser.add_argument(
    "--mesh",
    default="data=-1",
    help="device mesh data=N,model=M: batch over data, the MLP's hidden units over model",
  )
  parser.add_argument(
    "--fsdp", action="store_true", help="also split each MLP kernel's input units over data"
  )
  parser.add_argument(
    "--checkpoint-every", type=int, default=0, help="steps between checkpoints (0: at the end)"
  )
  parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
  if lists:
    parser.add_argument("--depths", type=int, nargs="+")
    parser.add_argument("--methods", nargs="+", choices=METHODS)
    parser.add_argument("--activations", nargs="+", choices=tuple(ACTIVATIONS))
    parser.add_argument(
      "--inits", nargs="+", choices=tuple(INITS), help="crossed with --lrs (each method its best)"
    )
    parser.add_argument("--optimizers", nargs="+", choices=OPTIMIZERS)
    parser.add_argument("--lrs", type=float, nargs="+", help="the LR grid (each method its best)")
    parser.add_argument("--seeds", type=int, nargs="+")
    parser.add_argument(
      "--search-seeds",
      type=int,
      nargs="+",
      help="the seeds that search the (init, LR) grid; the other seeds run only at each "
      "cell's best setting",
    )
    parser.add_argument(
      "--split-inits",
      action="store_const",
      const=True,
      help="each (method, init) is a cell with its own best LR",
    )
  else:
    parser.add_argument(
      "--depth", type=int, default=10, help="hidden layers (cnn: convolutions; transformer: blocks)"
    )
    parser.add_argument("--activation", choices=tuple(ACTIVATIONS), default="relu")
    parser.add_argument("--init", choices=tuple(INITS), default="lecun")
    parser.add_argument("--method", choices=METHODS, default="plain")
    parser.add_argument("--optimizer", choices=OPTIMIZERS, default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seed", type=int, default=0)


def build_parser() -> argparse.ArgumentParser:
  """The argument parser of ``bgn-jax``."""
  parser = argparse.ArgumentParser(
    prog="bgn-jax", description="Backward Gradient Normalization experiments."
  )
  commands = parser.add_subparsers(dest="command", required=True)

  demo = commands.add_parser(
    "demo",
    help="a depth-50 ReLU MLP: plain (LeCun and He init) and with BGN, on bundled data "
    "(about a minute)",
  )
  demo.add_argument("--out", default="bgn-demo", help="output folder (default ./bgn-demo)")
  demo.add_argument("--dataset", choices=("digits", "fashion-mnist"), default="digits")
  demo.add_argument("--seed", type=int, default=0)
  demo.add_argument("--no-progress", action="store_true", help="hide the progress bars")

  train = commands.add_parser("train", help="one training run")
  _add_model_flags(train, lists=False)
  train.add_argument("--out", required=True, help="run folder")
  train.add_argument(
    "--resume",
    action="store_true",
    help="continue from the latest checkpoint; the flags that change the result must be "
    "the run's (--epochs may change under a constant LR schedule)",
  )
  _add_distributed_flags(train)

  sweep = commands.add_parser(
    "sweep", help="a resumable grid of runs, summarized as best-over-(init, LR) tables"
  )
  sweep.add_argument("--config", help="a TOML file with the grid (flags given override it)")
  sweep.add_argument("--out", help="sweep folder (runs/, summary.md, summary.csv)")
  _add_model_flags(sweep, lists=True)
  _add_distributed_flags(sweep)
  from bgn_jax.experiments.sweep import SCALAR_KEYS

  # Scalar flags default to None, so that a TOML value is not overridden by a
  # default the user never typed.
  sweep.set_defaults(**{name: None for name in SCALAR_KEYS})

  limit = commands.add_parser(
    "depth-limit",
    help="the depth at which each method stops training, as a figure and a table, from a "
    "sweep's runs",
  )
  limit.add_argument("--config", required=True, help="the sweep's TOML file")
  limit.add_argument("--out", help="the sweep folder (default: the file's or bgn-sweep)")
  limit.add_argument("--png", help="the figure (default OUT/depth_limit.png)")
  limit.add_argument("--title", help="the figure's title (default: the grid's size)")
  # The sweep's flags, so that a sweep run with overrides is read with the same ones.
  _add_model_flags(limit, lists=True)
  limit.set_defaults(**{name: None for name in SCALAR_KEYS if name != "out"})
  return parser


def _initialize_distributed(args: argparse.Namespace) -> None:
  if not args.distributed:
    return
  import jax

  if not os.environ.get("JAX_CPU_COLLECTIVES_IMPLEMENTATION"):
    # Cross-process reductions between CPU devices need a collectives backend;
    # the setting is ignored by GPU and TPU devices.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  jax.distributed.initialize(
    coordinator_address=args.coordinator_address,
    num_processes=args.num_processes,
    process_id=args.process_id,
  )


def _run_demo(args: argparse.Namespace) -> int:
  from bgn_jax.experiments.demo import print_demo, run_demo

  summary = run_demo(args.out, dataset=args.dataset, seed=args.seed, progress=not args.no_progress)
  print_demo(summary, Path(args.out))
  return 0


def _run_train(args: argparse.Namespace) -> int:
  from bgn_jax.experiments.train import TrainConfig, train

  config = TrainConfig(
    out=args.out,
    dataset=args.dataset,
    arch=args.arch,
    depth=args.depth,
    width=args.width,
    activation=args.activation,
    init=args.init,
    method=args.method,
    bgn_every=args.bgn_every,
    bgn_target=args.bgn_target,
    heads=args.heads,
    optimizer=args.optimizer,
    lr=args.lr,
    weight_decay=args.weight_decay,
    warmup_steps=args.warmup_steps,
    schedule=args.schedule,
    momentum=args.momentum,
    batch_size=args.batch_size,
    epochs=args.epochs,
    train_examples=args.train_examples,
    seed=args.seed,
    dtype=args.dtype,
    log_every=args.log_every,
    mesh=args.mesh,
    fsdp=args.fsdp,
    checkpoint_every=args.checkpoint_every,
    resume=args.resume,
    data_dir=args.data_dir,
    progress=not args.no_progress,
  )
  config.validate()
  _initialize_distributed(args)
  results = train(config)
  import jax

  if jax.process_index() == 0:
    print(
      f"test accuracy {results['test_accuracy']:.4f}, final train loss "
      f"{results['final_train_loss']:.4f}, {results['steps']} steps; wrote {args.out}"
    )
  return 0


def _run_sweep(args: argparse.Namespace) -> int:
  from bgn_jax.experiments.sweep import SweepConfig, run_sweep

  config = SweepConfig.from_args(args)
  _initialize_distributed(args)
  run_sweep(config, progress=not args.no_progress)
  return 0


def _run_depth_limit(args: argparse.Namespace) -> int:
  from bgn_jax.experiments.depth_limit import run_depth_limit
  from bgn_jax.experiments.sweep import SweepConfig

  config = SweepConfig.from_args(args)
  print(run_depth_limit(config, png=args.png, title=args.title), end="")
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  """Runs ``bgn-jax`` with ``argv`` (default ``sys.argv[1:]``); returns the exit status."""
  args = build_parser().parse_args(argv)
  from bgn_jax.experiments.train import NonFiniteLossError

  try:
    if args.command == "demo":
      return _run_demo(args)
    if args.command == "train":
      return _run_train(args)
    if args.command == "depth-limit":
      return _run_depth_limit(args)
    return _run_sweep(args)
  except NonFiniteLossError as e:
    print(f"bgn-jax: error: {e}", file=sys.stderr)
    return EXIT_NON_FINITE
  except (ValueError, FileNotFoundError) as e:
    print(f"bgn-jax: error: {e}", file=sys.stderr)
    return EXIT_USAGE
  except KeyboardInterrupt:
    return EXIT_INTERRUPTED
