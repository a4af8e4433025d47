"""One training run: optax, one jit-compiled step, data parallel, orbax checkpoints.

The batch axis is sharded over every device of a one-axis ``Mesh`` (``"data"``);
parameters and optimizer state are replicated. Under sharded ``jit`` the loss
and every reduction over the batch (the whole-batch BGN norm included) are
global, so the run computes the same function on 1 or N devices. With
``jax.distributed`` initialized the mesh spans every process; each process
holds the whole (small) data set and builds its shards of a global batch from it.

The order of the training examples is a pure function of (seed, epoch), and the
step counter locates a batch inside it, so a run resumed from a checkpoint sees
the same batches as an uninterrupted one and ends with the same parameters. A run
folder stores its configuration beside its checkpoints, and a resume with flags
that change the result is refused (see :func:`result_fields`).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.linen import spmd as nn_spmd
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from bgn_jax.core import TargetNorm, make_config
from bgn_jax.experiments.data import DATASETS, Dataset, epoch_permutation, load_dataset
from bgn_jax.experiments.models import (
  ACTIVATIONS,
  ARCHS,
  INITS,
  METHODS_BY_ARCH,
  ConvLayer,
  DeepCNN,
  DeepMLP,
  HiddenLayer,
  Transformer,
  TransformerBlock,
  transformer_apply,
)
from bgn_jax.linen import grad_norms
from bgn_jax.reports import depth_profile

__all__ = [
  "NonFiniteLossError",
  "OPTIMIZERS",
  "TrainConfig",
  "layer_grad_norms_fn",
  "params_sha256",
  "result_fields",
  "train",
]

OPTIMIZERS = ("sgd", "adam", "adamw")
SCHEDULES = ("constant", "cosine")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
# The layer whose parameter gradients make the gradient-norm-against-depth profile.
LAYER_TYPES = {"mlp": HiddenLayer, "cnn": ConvLayer, "transformer": TransformerBlock}
# Where the first layer's kernel is, for the relative update ||dW1|| / ||W1||.
FIRST_KERNEL = {
  "mlp": ("input_layer", "dense", "kernel"),
  "cnn": ("input_layer", "conv", "kernel"),
  "transformer": ("input_layer", "kernel"),
}
# The fields of TrainConfig that leave what a run computes unchanged: where it reads and
# writes, how often it logs and saves, what it shows, and the device layout (every mesh
# computes the same function, bitwise equal only on the same one).
NOT_RESULT_FIELDS = (
  "out",
  "data_dir",
  "log_every",
  "checkpoint_every",
  "resume",
  "progress",
  "plots",
  "mesh",
  "fsdp",
)


class NonFiniteLossError(RuntimeError):
  """The loss or the parameters became NaN or infinite; the run was stopped."""

  def __init__(self, step: int, loss: float, last_checkpoint: int | None):
    self.step = step
    self.loss = loss
    self.last_checkpoint = last_checkpoint
    kept = (
      f"the last good checkpoint (step {last_checkpoint}) is kept"
      if last_checkpoint is not None
      else "no checkpoint had been written"
    )
    super().__init__(
      f"non-finite training loss ({loss}) or parameters at step {step}; "
      f"the run was stopped and {kept}. Try a smaller --lr."
    )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Everything that defines a run; the command-line flags of ``bgn-jax train``.

  Attributes:
    out: the run folder (metrics.jsonl, results.json, plots, checkpoints/).
    dataset: one of DATASETS.
    arch: mlp, cnn or transformer (see :mod:`bgn_jax.experiments.models`).
    depth: hidden layers (mlp), convolutions (cnn) or blocks (transformer).
    width: units per hidden layer, channels (cnn), or the model width (transformer).
    activation: relu, tanh, sigmoid or gelu.
    init: lecun, he or glorot (normal) kernel initialization.
    method: one of ``METHODS_BY_ARCH[arch]``: mlp plain, bgn, bgn-per-example,
      batchnorm, layernorm; cnn plain, bgn, bgn-per-example, batchnorm, residual;
      transformer plain (post-LN), bgn (post-LN with a node after every sublayer),
      pre-ln.
    bgn_every: a BGN node after every ``bgn_every``-th hidden layer (mlp, cnn).
    bgn_target: the nodes' ``target_norm``: a name :func:`bgn_jax.bgn` knows
      (``"sqrt_units"``) or a positive number, as text.
    heads: attention heads (transformer).
    optimizer: sgd (with momentum), adam or adamw.
    lr: learning rate (the peak, with a warm-up or a schedule).
    weight_decay: adamw's decoupled weight decay.
    warmup_steps: linear learning-rate warm-up from 0 over this many steps (0: none).
    schedule: constant, or cosine decay to 0 at the last step (after the warm-up).
    train_examples: train on this many examples (a fixed random subset; 0: all).
    momentum: SGD momentum (0 for none).
    batch_size: global batch size, a multiple of the device count.
    epochs: passes over the training set.
    seed: initialization and data-order seed.
    dtype: float32 or bfloat16 computation (parameters stay float32).
    log_every: steps between metrics.jsonl records (and the end of every epoch).
    mesh: the device mesh, ``data=N,model=M`` (-1: the devices left); the batch is
      split over data, the MLP's hidden units over model (tensor parallel).
    fsdp: also split each MLP kernel's input units over data (fully sharded).
    checkpoint_every: steps between checkpoints; 0 for the final one only.
    resume: continue from the latest checkpoint in ``out/checkpoints``.
    data_dir: where the data files are, see :mod:`bgn_jax.experiments.data`.
    progress: show the progress bar.
    plots: write PNG plots at the end.
  """

  out: str
  dataset: str = "digits"
  arch: str = "mlp"
  depth: int = 10
  width: int = 64
  activation: str = "relu"
  init: str = "lecun"
  method: str = "plain"
  bgn_every: int = 1
  bgn_target: str = "sqrt_units"
  heads: int = 4
  optimizer: str = "adam"
  lr: float = 1e-3
  weight_decay: float = 1e-4
  warmup_steps: int = 0
  schedule: str = "constant"
  train_examples: int = 0
  momentum: float = 0.9
  batch_size: int = 64
  epochs: int = 1
  seed: int = 0
  dtype: str = "float32"
  log_every: int = 50
  mesh: str = "data=-1"
  fsdp: bool = False
  checkpoint_every: int = 0
  resume: bool = False
  data_dir: str | None = None
  progress: bool = True
  plots: bool = True

  @classmethod
  def from_stored(cls, values: Mapping[str, Any]) -> TrainConfig:
    """The config a run stored (``dataclasses.asdict``); unknown keys are ignored.

    A field the stored config lacks, from a run written before the field existed,
    takes its default, which is how that run ran.
    """
    known = {f.name for f in dataclasses.fields(cls)}
    return cls(**{"out": "", **{k: v for k, v in values.items() if k in known}})

  def validate(self) -> None:
    """Raises ValueError naming the flag whose value is not allowed."""
    choices = {
      "dataset": DATASETS,
      "arch": ARCHS,
      "activation": tuple(ACTIVATIONS),
      "init": tuple(INITS),
      "optimizer": OPTIMIZERS,
      "schedule": SCHEDULES,
      "dtype": tuple(DTYPES),
    }
    for name, allowed in choices.items():
      if getattr(self, name) not in allowed:
        raise ValueError(
          f"--{name}: got {getattr(self, name)!r}; choose one of {', '.join(allowed)}."
        )
    if self.method not in METHODS_BY_ARCH[self.arch]:
      raise ValueError(
        f"--method: got {self.method!r} for --arch {self.arch}; choose one of "
        f"{', '.join(METHODS_BY_ARCH[self.arch])}."
      )
    for name in ("depth", "width", "bgn_every", "heads", "batch_size", "epochs", "log_every"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name.replace('_', '-')}: must be >= 1; got {getattr(self, name)}.")
    for name in ("checkpoint_every", "warmup_steps", "train_examples"):
      if getattr(self, name) < 0:
        raise ValueError(f"--{name.replace('_', '-')}: must be >= 0; got {getattr(self, name)}.")
    if self.arch == "transformer" and self.width % self.heads:
      raise ValueError(
        f"--width: {self.width} is not a multiple of --heads {self.heads}; the attention "
        "splits the width evenly over the heads."
      )
    model_axis = parse_mesh(self.mesh)["model"]
    if (model_axis > 1 or self.fsdp) and self.arch != "mlp":
      raise ValueError(
        f"--mesh {self.mesh!r}, --fsdp {self.fsdp}: tensor parallelism and FSDP lay out the "
        f"MLP's parameters; --arch {self.arch} runs data parallel (model=1, no --fsdp)."
      )
    if self.width % model_axis:
      raise ValueError(
        f"--mesh: model={model_axis} does not divide --width {self.width}, the hidden units "
        "it splits."
      )
    if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
      raise ValueError(f"--weight-decay: must be >= 0 and finite; got {self.weight_decay}.")
    try:
      make_config((1, 1), target_norm=target_norm_value(self.bgn_target))
    except (TypeError, ValueError) as e:
      raise ValueError(f"--bgn-target: got {self.bgn_target!r}: {e}") from None
    if not (math.isfinite(self.lr) and self.lr > 0):
      raise ValueError(f"--lr: must be positive and finite; got {self.lr}.")
    if not 0 <= self.momentum < 1:
      raise ValueError(f"--momentum: must lie in [0, 1); got {self.momentum}.")


def result_fields(config: TrainConfig) -> dict[str, Any]:
  """The settings of ``config`` that change what the run computes, by field name.

  Every field but those of ``NOT_RESULT_FIELDS`` and those the run ignores:
  ``momentum`` without sgd, ``weight_decay`` without adamw, ``heads`` outside the
  transformer. Float fields are floats, so a TOML file's ``0`` is the flag's ``0.0``.
  """
  ignored = {
    "momentum": config.optimizer != "sgd",
    "weight_decay": config.optimizer != "adamw",
    "heads": config.arch != "transformer",
  }
  values = {}
  for field in dataclasses.fields(config):
    if field.name in NOT_RESULT_FIELDS or ignored.get(field.name, False):
      continue
    value = getattr(config, field.name)
    values[field.name] = float(value) if field.type in ("float", float) else value
  return values


def target_norm_value(text: str) -> TargetNorm:
  """``--bgn-target`` as :func:`bgn_jax.bgn` takes it: a name stays text, a number a float."""
  try:
    return float(text)
  except ValueError:
    return cast(TargetNorm, text)  # A rule's name; make_config rejects other text.


def lr_factor(config: TrainConfig, total_steps: int) -> optax.Schedule | None:
  """The factor on the LR at each step (warm-up, then constant or cosine), or None for 1."""
  warmup = min(config.warmup_steps, total_steps)
  if config.schedule == "cosine":
    if warmup:
      return optax.warmup_cosine_decay_schedule(0.0, 1.0, warmup, max(total_steps, warmup + 1))
    return optax.cosine_decay_schedule(1.0, total_steps)
  if warmup:
    return optax.linear_schedule(0.0, 1.0, warmup)
  return None


def make_optimizer(config: TrainConfig, total_steps: int) -> optax.GradientTransformation:
  """The optimizer; the LR is injected as state so one compiled step serves every LR.

  A warm-up or schedule multiplies the updates by :func:`lr_factor` (a function
  of the step count only); without one the optimizer state is that of the bare
  optimizer.
  """
  momentum = config.momentum or None

  def build(learning_rate):
    if config.optimizer == "sgd":
      return optax.sgd(learning_rate, momentum=momentum)
    if config.optimizer == "adam":
      return optax.adam(learning_rate)
    return optax.adamw(learning_rate, weight_decay=config.weight_decay)

  tx = optax.inject_hyperparams(build)(learning_rate=config.lr)
  factor = lr_factor(config, total_steps)
  return tx if factor is None else optax.chain(tx, optax.scale_by_schedule(factor))


def make_model(config: TrainConfig, num_classes: int) -> DeepMLP | DeepCNN | Transformer:
  """The network of ``config.arch``."""
  common: dict[str, Any] = dict(
    depth=config.depth,
    width=config.width,
    num_classes=num_classes,
    activation=config.activation,
    init_scheme=config.init,
    method=config.method,
    dtype=DTYPES[config.dtype],
  )
  if config.arch == "transformer":
    return Transformer(heads=config.heads, **common)
  options = dict(bgn_every=config.bgn_every, target_norm=target_norm_value(config.bgn_target))
  if config.arch == "cnn":
    return DeepCNN(**options, **common)
  return DeepMLP(**options, partitioned=True, **common)


def model_apply(config: TrainConfig, model: nn.Module) -> Callable[..., Any]:
  """``model.apply``, or for the transformer with BGN, with the nodes placed by ``insert``."""
  if config.arch == "transformer":
    return transformer_apply(cast(Transformer, model), target_norm_value(config.bgn_target))
  return model.apply


def _first_kernel(config: TrainConfig, params: Any) -> np.ndarray:
  for key in FIRST_KERNEL[config.arch]:
    params = params[key]
  return _host_copy(params)


def _host_copy(leaf: jax.Array) -> np.ndarray:
  # A replicated array: any local shard is the whole array, also on multi-host.
  if isinstance(leaf, jax.Array):
    return np.asarray(leaf.addressable_data(0))
  return np.asarray(leaf)


def params_sha256(params: Any) -> str:
  """SHA-256 over the parameters: each leaf's path, dtype, shape and bytes, paths sorted."""
  digest = hashlib.sha256()
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  for key, leaf in sorted(
    ((jax.tree_util.keystr(path), leaf) for path, leaf in leaves), key=lambda kv: kv[0]
  ):
    array = np.ascontiguousarray(_host_copy(leaf))
    digest.update(f"{key}|{array.dtype}|{array.shape}|".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


def _cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, labels)


def layer_grad_norms_fn(
  config: TrainConfig, model: nn.Module
) -> Callable[[dict[str, Any], jax.Array, jax.Array], Any]:
  """A ``(variables, x, y) -> norms``: the norm of each layer's parameter gradient.

  Measured by :func:`bgn_jax.grad_norms` (one jitted forward and backward pass,
  exact for gradients whose float32 squares underflow) at every layer of
  ``LAYER_TYPES[config.arch]``, ordered from the input layer up (``model.depth``
  of them), in inference mode (batch norm uses its running statistics), through
  the BGN nodes the run trains with.
  """
  apply = model_apply(config, model)

  def loss_fn(variables, x, y):
    return _cross_entropy(apply(variables, x, train=False), y).mean()

  measure = jax.jit(grad_norms(loss_fn, where=LAYER_TYPES[config.arch]))

  def norms(variables, x, y):
    report = jax.tree.map(_host_copy, measure(variables, x, y))
    return depth_profile(report, "params")

  return norms


def training_subset(data: Dataset, n: int) -> Dataset:
  """``data`` with ``n`` training examples, a random subset fixed by ``n`` alone (in order).

  Raises:
    ValueError: ``n`` exceeds the training set.
  """
  n_train = len(data.y_train)
  if n > n_train:
    raise ValueError(f"--train-examples: {n} exceeds the {n_train} training examples.")
  keep = np.sort(np.random.default_rng(n).permutation(n_train)[:n])
  return dataclasses.replace(data, x_train=data.x_train[keep], y_train=data.y_train[keep])


def parse_mesh(text: str, devices: int | None = None) -> dict[str, int]:
  """``data=4,model=2`` as {"data": 4, "model": 2}; ``-1`` takes the devices left."""
  sizes = {"data": -1, "model": 1}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition("=")
    if name not in sizes or not size.lstrip("-").isdigit() or int(size) in (0,) or int(size) < -1:
      raise ValueError(f"--mesh: expected data=N,model=M (N, M >= 1 or -1); got {text!r}.")
    sizes[name] = int(size)
  if sizes["model"] == -1:
    raise ValueError(f"--mesh: give model a size; got {text!r}.")
  if devices is not None:
    if sizes["data"] == -1:
      sizes["data"] = max(devices // sizes["model"], 1)
    if sizes["data"] * sizes["model"] != devices:
      raise ValueError(
        f"--mesh {text!r}: {sizes['data']} x {sizes['model']} devices, but there are {devices}."
      )
  return sizes


class _Sharding:
  """The layout: the batch over ``data``; the MLP's parameters by their logical axis names
  (hidden units over ``model``, with FSDP a kernel's input units over ``data``);
  everything else replicated."""

  def __init__(self, mesh: str = "data=-1", fsdp: bool = False) -> None:
    sizes = parse_mesh(mesh, jax.device_count())
    devices = np.asarray(jax.devices()).reshape(sizes["data"], sizes["model"])
    self.mesh = Mesh(devices, ("data", "model"))
    self.batch = NamedSharding(self.mesh, PartitionSpec("data"))
    self.replicated = NamedSharding(self.mesh, PartitionSpec())
    self.rules = (("batch", "data"), ("hidden", "model"), ("in", "data" if fsdp else None))

  @property
  def size(self) -> int:
    return self.mesh.shape["data"]

  def state(self, boxed_init: Callable[[], Any]) -> Any:
    """The sharding of every array of the state that ``boxed_init`` makes (boxed with
    logical names); a dimension the mesh axis does not divide stays whole."""
    abstract = jax.eval_shape(boxed_init)
    shardings = nn_spmd.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), self.mesh, self.rules
    )

    def divisible(leaf: Any, sharding: NamedSharding) -> NamedSharding:
      spec = tuple(sharding.spec) + (None,) * (len(leaf.shape) - len(sharding.spec))
      kept = [
        entry if entry is None or n % self.mesh.shape[entry] == 0 else None
        for n, entry in zip(leaf.shape, spec, strict=True)
      ]
      return NamedSharding(self.mesh, PartitionSpec(*kept))

    return jax.tree.map(divisible, nn.unbox(abstract), shardings)

  def global_batch(self, array: np.ndarray) -> jax.Array:
    # Every process holds the same global batch; each fills its own devices.
    return jax.make_array_from_callback(array.shape, self.batch, lambda index: array[index])


def _checkpoint_manager(folder: Path):
  import orbax.checkpoint as ocp

  return ocp.CheckpointManager(
    folder.absolute(),
    options=ocp.CheckpointManagerOptions(
      max_to_keep=2, enable_async_checkpointing=False, cleanup_tmp_directories=True
    ),
  )


def _latest_step(folder: Path) -> int | None:
  """The step of the latest finished checkpoint in ``folder``; None without one."""
  import orbax.checkpoint as ocp

  # Without a CheckpointManager, whose clean-up of a killed save runs in a background
  # thread that an error raised next would leave running at exit.
  return max(ocp.utils.checkpoint_steps(folder.absolute()), default=None)


def _save(manager, step: int, state: dict[str, Any]) -> None:
  import orbax.checkpoint as ocp

  if manager.latest_step() == step:
    return
  manager.save(step, args=ocp.args.StandardSave(state), force=True)
  manager.wait_until_finished()


def _restore(manager, step: int, state: dict[str, Any]) -> dict[str, Any]:
  import orbax.checkpoint as ocp

  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
  )
  return manager.restore(step, args=ocp.args.StandardRestore(abstract))


def _store_config(folder: Path, config: TrainConfig) -> None:
  folder.mkdir(parents=True, exist_ok=True)
  path = folder / "config.json"
  # Written whole, then renamed: a run killed meanwhile leaves the previous file.
  partial = path.with_suffix(".json.partial")
  partial.write_text(json.dumps(dataclasses.asdict(config), indent=2) + "\n")
  os.replace(partial, path)


def _check_resume(
  config: TrainConfig, folder: Path, step: int, steps_per_epoch: int
) -> TrainConfig:
  """The stored config of the run whose checkpoint of ``step`` is in ``folder``.

  Raises:
    ValueError: ``config`` does not continue that run: a result field
      (:func:`result_fields`) differs from the stored one, but ``epochs``, which may
      change where the LR of a step does not depend on it.
  """
  path = folder / "config.json"
  try:
    stored = TrainConfig.from_stored(json.loads(path.read_text()))
  except FileNotFoundError:
    raise ValueError(
      f"--resume: {folder} holds checkpoints but no config.json (they were written before "
      "runs stored their configuration), so these flags cannot be checked against the run; "
      f"start a new run with another --out, or delete {folder} to start this one over."
    ) from None
  except json.JSONDecodeError as e:
    raise ValueError(f"--resume: {path} is not valid JSON ({e}).") from None
  before, now = result_fields(stored), result_fields(config)
  # A field only one side has is ignored by the other, whose optimizer or arch differs.
  differences = [name for name in now if name in before and before[name] != now[name]]
  problems = [
    f"--{name.replace('_', '-')}: stored {before[name]!r}, requested {now[name]!r}"
    for name in differences
    if name != "epochs"
  ]
  if "epochs" in differences:
    reason = _epochs_fixed_by(config, stored.epochs, step, steps_per_epoch)
    if reason:
      problems.append(f"--epochs: stored {stored.epochs}, requested {config.epochs} ({reason})")
  if problems:
    raise ValueError(
      f"--resume: {folder.parent} holds a run with other settings: {'; '.join(problems)}. "
      "Resume it with the stored values, or start a new run with another --out."
    )
  return stored


def _epochs_fixed_by(
  config: TrainConfig, stored_epochs: int, step: int, steps_per_epoch: int
) -> str | None:
  """Why a resumed run may not change its epochs to ``config.epochs``; None where it may.

  The batches of a step do not depend on the run's length; the LR does under a cosine
  schedule, or a warm-up longer than the shorter of the two runs.
  """
  total = steps_per_epoch * config.epochs
  if config.schedule != "constant":
    return f"--schedule {config.schedule} sets the LR of each step from the run's length"
  if config.warmup_steps > steps_per_epoch * min(config.epochs, stored_epochs):
    return f"the {config.warmup_steps}-step warm-up is longer than the shorter run"
  if step > total:
    return f"the latest checkpoint, of step {step}, is past the requested last step {total}"
  return None


class _Metrics:
  """metrics.jsonl, written by process 0 only, truncated to the resumed step."""

  def __init__(self, path: Path, resume_step: int, enabled: bool) -> None:
    self.enabled = enabled
    self.records: list[dict[str, Any]] = []
    if not enabled:
      return
    if resume_step > 0 and path.exists():
      for line in path.read_text().splitlines():
        if line.strip():
          record = json.loads(line)
          if record["step"] <= resume_step:
            self.records.append(record)
    self.file = open(path, "w")
    for record in self.records:
      self.file.write(json.dumps(record) + "\n")
    self.file.flush()

  def write(self, record: dict[str, Any]) -> None:
    self.records.append(record)
    if self.enabled:
      self.file.write(json.dumps(record) + "\n")
      self.file.flush()

  def close(self) -> None:
    if self.enabled:
      self.file.close()


def _progress_bar(total: int, initial: int, enabled: bool, description: str):
  from tqdm.auto import tqdm

  return tqdm(
    total=total,
    initial=initial,
    file=sys.stderr,
    disable=not enabled,
    desc=description,
    dynamic_ncols=True,
    leave=True,
  )


def train(
  config: TrainConfig,
  dataset: Dataset | None = None,
  on_epoch: Callable[[dict[str, Any]], None] | None = None,
) -> dict[str, Any]:
  """Runs one training run and writes its files into ``config.out``.

  Args:
    config: the run.
    dataset: the data, if already loaded (else loaded from ``config``).
    on_epoch: called with each end-of-epoch metrics record.

  Returns:
    The contents of ``results.json``.

  Raises:
    ValueError: a flag has a value that is not allowed.
    NonFiniteLossError: the loss became NaN or infinite (the last good
      checkpoint is kept).
    KeyboardInterrupt: after a checkpoint of the last finished step was saved.
  """
  config.validate()
  started = time.perf_counter()
  out = Path(config.out)
  is_main = jax.process_index() == 0
  if is_main:
    out.mkdir(parents=True, exist_ok=True)
  data = dataset if dataset is not None else load_dataset(config.dataset, config.data_dir)
  if config.train_examples:
    data = training_subset(data, config.train_examples)
  layout = _Sharding(config.mesh, config.fsdp)
  if config.batch_size % layout.size:
    raise ValueError(
      f"--batch-size: {config.batch_size} is not a multiple of the {layout.size} devices "
      "of the mesh's data axis."
    )
  n_train = len(data.y_train)
  steps_per_epoch = n_train // config.batch_size
  if steps_per_epoch == 0:
    raise ValueError(f"--batch-size: {config.batch_size} exceeds the {n_train} training examples.")
  total_steps = steps_per_epoch * config.epochs

  checkpoints = out / "checkpoints"
  latest_step = _latest_step(checkpoints)
  if latest_step is not None and not config.resume:
    raise ValueError(
      f"--out: {out} already holds checkpoints; pass --resume to continue that run "
      "or choose an empty folder."
    )
  start_step = latest_step or 0
  stored = None
  if latest_step is not None:
    stored = _check_resume(config, checkpoints, latest_step, steps_per_epoch)
  if is_main:
    if stored is not None and stored.epochs != config.epochs:
      print(
        f"bgn-jax: --epochs {stored.epochs} -> {config.epochs}: the training is otherwise "
        f"identical, so {out} continues as a {config.epochs}-epoch run.",
        file=sys.stderr,
      )
    # Stored before the first checkpoint, so that every checkpoint has its configuration.
    _store_config(checkpoints, config)

  model = make_model(config, data.num_classes)
  apply = model_apply(config, model)
  tx = make_optimizer(config, total_steps)
  n_features = data.x_train.shape[1]

  def boxed_state() -> dict[str, Any]:
    variables = model.init(
      jax.random.key(config.seed), jnp.zeros((1, n_features), jnp.float32), train=False
    )
    state = {"params": variables["params"], "opt_state": tx.init(variables["params"])}
    if "batch_stats" in variables:
      state["batch_stats"] = variables["batch_stats"]
    return state

  state_sharding = layout.state(boxed_state)
  state = jax.jit(lambda: nn.unbox(boxed_state()), out_shardings=state_sharding)()
  # Nothing is donated, so the initial arrays stay valid for the final report.
  initial_state = state
  initial_first_kernel = _first_kernel(config, state["params"])

  def variables_of(state: dict[str, Any], params: Any) -> dict[str, Any]:
    variables = {"params": params}
    if "batch_stats" in state:
      variables["batch_stats"] = state["batch_stats"]
    return variables

  def train_step(state, x, y):
    def loss_fn(params):
      variables = variables_of(state, params)
      with nn.logical_axis_rules(layout.rules):
        if "batch_stats" in state:
          logits, updates = apply(variables, x, train=True, mutable=["batch_stats"])
        else:
          logits, updates = apply(variables, x, train=True), {}
      return _cross_entropy(logits, y).mean(), (logits, updates)

    (loss, (logits, updates)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    deltas, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], deltas)
    new_state = {**state, "params": params, "opt_state": opt_state}
    if "batch_stats" in updates:
      new_state["batch_stats"] = updates["batch_stats"]
    finite = jnp.all(jnp.stack([jnp.all(jnp.isfinite(p)) for p in jax.tree.leaves(params)]))
    metrics = {
      "loss": loss,
      "accuracy": jnp.mean(jnp.argmax(logits, -1) == y),
      "finite": finite & jnp.isfinite(loss),
    }
    return new_state, metrics

  step_fn = jax.jit(
    train_step,
    in_shardings=(state_sharding, layout.batch, layout.batch),
    out_shardings=(state_sharding, layout.replicated),
  )

  def eval_batch(state, x, y, weight):
    logits = apply(variables_of(state, state["params"]), x, train=False)
    correct = jnp.sum((jnp.argmax(logits, -1) == y) * weight)
    loss = jnp.sum(_cross_entropy(logits, y) * weight)
    return correct, loss

  eval_fn = jax.jit(
    eval_batch,
    in_shardings=(state_sharding, layout.batch, layout.batch, layout.batch),
    out_shardings=layout.replicated,
  )
  eval_size = layout.size * max(1, 1024 // layout.size)

  def evaluate(state) -> tuple[float, float]:
    correct = loss = 0.0
    n_test = len(data.y_test)
    for begin in range(0, n_test, eval_size):
      x = data.x_test[begin : begin + eval_size]
      y = data.y_test[begin : begin + eval_size]
      weight = np.ones(len(y), np.float32)
      pad = eval_size - len(y)
      if pad:
        x = np.concatenate([x, np.zeros((pad, x.shape[1]), x.dtype)])
        y = np.concatenate([y, np.zeros(pad, y.dtype)])
        weight = np.concatenate([weight, np.zeros(pad, np.float32)])
      c, lo = eval_fn(
        state, layout.global_batch(x), layout.global_batch(y), layout.global_batch(weight)
      )
      correct += float(_host_copy(c))
      loss += float(_host_copy(lo))
    return correct / n_test, loss / n_test

  manager = _checkpoint_manager(checkpoints)
  if latest_step is not None:
    try:
      state = _restore(manager, start_step, state)
    except ValueError:
      manager.close()
      # Orbax describes a mismatch as a dump of both trees; one sentence says what to do.
      raise ValueError(
        f"--resume: the checkpoint {checkpoints / str(start_step)} does not fit the model "
        "and optimizer of these flags (other arrays or shapes); start a new run with another "
        f"--out, or delete {checkpoints} to start this one over."
      ) from None
    if is_main:
      print(f"bgn-jax: resumed {out} from the checkpoint of step {start_step}.", file=sys.stderr)

  metrics = _Metrics(out / "metrics.jsonl", start_step, is_main)
  bar = _progress_bar(
    total_steps,
    start_step,
    config.progress and is_main,
    f"{config.method} {config.init} d{config.depth}",
  )
  last_loss = math.nan
  test_accuracy = test_loss = math.nan
  for record in metrics.records:
    if "test_accuracy" in record:
      test_accuracy, test_loss = record["test_accuracy"], record["test_loss"]
  done = start_step
  permutation, permutation_epoch = np.empty(0, np.intp), -1
  try:
    for step in range(start_step, total_steps):
      epoch, index = divmod(step, steps_per_epoch)
      if epoch != permutation_epoch:
        permutation, permutation_epoch = epoch_permutation(config.seed, epoch, n_train), epoch
      batch = permutation[index * config.batch_size : (index + 1) * config.batch_size]
      state_next, step_metrics = step_fn(
        state,
        layout.global_batch(data.x_train[batch]),
        layout.global_batch(data.y_train[batch]),
      )
      loss = float(_host_copy(step_metrics["loss"]))
      if not bool(_host_copy(step_metrics["finite"])):
        raise NonFiniteLossError(step + 1, loss, manager.latest_step())
      state, done, last_loss = state_next, step + 1, loss
      accuracy = float(_host_copy(step_metrics["accuracy"]))
      bar.update(1)
      if done % 10 == 0 or done == total_steps:
        bar.set_postfix(loss=f"{loss:.4f}", acc=f"{accuracy:.3f}", refresh=False)
      end_of_epoch = done % steps_per_epoch == 0
      if done % config.log_every == 0 or end_of_epoch:
        record = {"step": done, "epoch": epoch, "train_loss": loss, "train_accuracy": accuracy}
        if end_of_epoch:
          test_accuracy, test_loss = evaluate(state)
          record.update(epoch=epoch + 1, test_accuracy=test_accuracy, test_loss=test_loss)
          bar.set_postfix(loss=f"{loss:.4f}", test_acc=f"{test_accuracy:.3f}", refresh=False)
        metrics.write(record)
        if end_of_epoch and on_epoch is not None:
          on_epoch(record)
      if config.checkpoint_every and done % config.checkpoint_every == 0:
        _save(manager, done, state)
  except KeyboardInterrupt:
    bar.close()
    if done > start_step:
      _save(manager, done, state)
    if is_main:
      print(
        f"bgn-jax: interrupted; saved a checkpoint of step {done} in {out / 'checkpoints'} "
        "(continue with --resume).",
        file=sys.stderr,
      )
    metrics.close()
    manager.close()
    raise
  except NonFiniteLossError:
    bar.close()
    metrics.close()
    manager.close()
    raise
  bar.close()
  metrics.close()
  _save(manager, total_steps, state)
  manager.close()

  if math.isnan(last_loss) and metrics.records:
    last_loss = metrics.records[-1]["train_loss"]
  if math.isnan(test_accuracy):
    test_accuracy, test_loss = evaluate(state)
  final_first_kernel = _first_kernel(config, state["params"])
  probe = epoch_permutation(config.seed, 0, n_train)[: config.batch_size]
  probe_x = layout.global_batch(data.x_train[probe])
  probe_y = layout.global_batch(data.y_train[probe])
  grad_norms = layer_grad_norms_fn(config, model)
  results = {
    "config": dataclasses.asdict(config),
    "method": config.method,
    "test_accuracy": test_accuracy,
    "test_loss": test_loss,
    "final_train_loss": last_loss,
    "steps": total_steps,
    "params_sha256": params_sha256(state["params"]),
    "first_layer_relative_update": float(
      np.linalg.norm(final_first_kernel - initial_first_kernel)
      / np.linalg.norm(initial_first_kernel)
    ),
    "grad_norms_init": _host_copy(
      grad_norms(variables_of(initial_state, initial_state["params"]), probe_x, probe_y)
    ).tolist(),
    "grad_norms_final": _host_copy(
      grad_norms(variables_of(state, state["params"]), probe_x, probe_y)
    ).tolist(),
    "devices": layout.mesh.size,
    "mesh": dict(layout.mesh.shape),
    # The parameters the mesh splits, as "path: spec".
    "split_params": sorted(
      f"{jax.tree_util.keystr(path)}: {leaf.sharding.spec}"
      for path, leaf in jax.tree_util.tree_leaves_with_path(state["params"])
      if any(entry is not None for entry in leaf.sharding.spec)
    ),
    "processes": jax.process_count(),
    "platform": jax.devices()[0].platform,
    "wall_time_s": time.perf_counter() - started,
  }
  if is_main:
    (out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    if config.plots:
      from bgn_jax.experiments.plots import plot_run

      plot_run(metrics.records, results, out)
  return results
