"""What BGN costs in the models people train: a Transformer LM and ResNet-18/50 steps.

The models are written here to the shapes of Flax's examples (google/flax, commit
18f8f31), not copied from them:

- ``lm1b``: the decoder-only Transformer LM of ``examples/lm1b`` with its default
  configuration (``configs/default.py``): vocabulary 30000, 6 blocks, embedding and
  qkv width 512, MLP width 2048, 8 heads, sequences of 128 tokens, batch 32 (its
  per-device batch), a sinusoidal position embedding, pre-LayerNorm blocks, causal
  and padding masks, an untied logits Dense, AdamW (b1 0.9, b2 0.98, eps 1e-9,
  weight decay 0.1).
- ``lm1b_small``: the same model at the widths of Flax's ``examples/lm1b/train_test.py``
  (embedding and qkv width 128, MLP width 512, 2 heads), keeping the default's 6
  blocks, vocabulary and sequence length.
- ``resnet18`` and ``resnet50``: ResNet V1.5 of ``examples/imagenet`` (stages
  [2, 2, 2, 2] of basic blocks, [3, 4, 6, 3] of bottleneck blocks; 64 filters, a 7x7
  stem and max pool, BatchNorm with momentum 0.9, 1000 classes), 224 x 224 images,
  batch 128 (``configs/default.py``), SGD with Nesterov momentum 0.9 and the
  example's L2 penalty of 1e-4 on the kernels.

Dropout is off (the examples train with rate 0.1): the random bits would add the
same time to the steps with and without BGN, so leaving them out makes the ratio
larger, not smaller. ``bfloat16`` is the examples' half precision: the layers
compute in bfloat16, the parameters and the optimizer stay float32.

Nodes are placed with :func:`bgn_jax.linen.insert`: ``block`` after every
Transformer block or residual block, ``layer`` after every Dense (the attention's
query, key, value and output projections, both MLP layers and the logits) or after
every convolution; ``batch`` gives each node one group, the whole array, and
``per_example`` one group per example (all axes but the first). One process times
the step without BGN and with every (placement, grouping) side by side, repetitions
interleaved (``harness.interleaved_medians``): ``ratio`` is the median step time
with BGN over the median without, ``paired_ratio`` the median of the per-round
ratios. Peak memory comes from XLA's ``memory_analysis()`` of the compiled step
(state donated), compile time is the wall time of ``lower`` and ``compile``.

Every record also holds XLA's FLOP and byte count of the step (``gflop``), the
optimized HLO's count of fusions, reductions, conditionals and copies (``hlo_counts``)
and, with nodes, what they add (``hlo_added``), the node count, the compiler's CPU
seconds and the load average around the timed rounds.

Usage::

  python benchmarks/models.py --quick --json models.json   # CPU sizes (smaller batches)
  python benchmarks/models.py --json models.json           # the examples' sizes (GPU)
  python benchmarks/models.py --cost-only --json cost.json # FLOPs only, no compile
  python benchmarks/models.py --tiny --dump-hlo hlo/       # toy models, optimized HLO
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import dataclasses
import functools
import math
import os
import re
import subprocess
import time
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import harness
import jax
import jax.numpy as jnp
import numpy as np
import optax
from overhead import peak_bytes

import bgn_jax

PLACEMENTS = ("block", "layer")
GROUPINGS = ("batch", "per_example")


# ---------------------------------------------------------------- Transformer LM


@dataclasses.dataclass(frozen=True)
class LMConfig:
  """The hyperparameters of the Transformer LM that set its shape."""

  vocab_size: int = 30_000
  num_layers: int = 6
  emb_dim: int = 512
  qkv_dim: int = 512
  mlp_dim: int = 2048
  num_heads: int = 8
  max_len: int = 128
  dtype: Any = jnp.float32


def sinusoidal_table(length: int, features: int) -> np.ndarray:
  """The fixed position embedding: sines in the first half of the features, cosines after."""
  position = np.arange(length)[:, None]
  half = features // 2
  frequencies = np.exp(-np.log(10_000.0) * np.arange(half) / (half - 1))
  table = np.zeros((length, features), np.float32)
  table[:, :half] = np.sin(position * frequencies)
  table[:, half : 2 * half] = np.cos(position * frequencies)
  return table


class FeedForward(nn.Module):
  """Dense(mlp_dim), ReLU, Dense back to the input width."""

  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    init = nn.initializers.xavier_uniform()
    bias = nn.initializers.normal(stddev=1e-6)
    h = nn.Dense(self.config.mlp_dim, dtype=self.config.dtype, kernel_init=init, bias_init=bias)(x)
    h = nn.relu(h)
    return nn.Dense(x.shape[-1], dtype=self.config.dtype, kernel_init=init, bias_init=bias)(h)


class DecoderBlock(nn.Module):
  """Pre-LayerNorm block: x + attention(LN(x)), then x + feed-forward(LN(x))."""

  config: LMConfig

  @nn.compact
  def __call__(self, x: jax.Array, mask: jax.Array) -> jax.Array:
    config = self.config
    h = nn.LayerNorm(dtype=config.dtype)(x)
    h = nn.MultiHeadDotProductAttention(
      num_heads=config.num_heads,
      qkv_features=config.qkv_dim,
      dtype=config.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      use_bias=False,
      deterministic=True,
    )(h, mask=mask)
    x = x + h
    h = nn.LayerNorm(dtype=config.dtype)(x)
    return x + FeedForward(config)(h)


class TransformerLM(nn.Module):
  """Decoder-only LM: embed the right-shifted tokens, blocks, LayerNorm, logits."""

  config: LMConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    config = self.config
    mask = nn.combine_masks(
      nn.make_attention_mask(tokens > 0, tokens > 0, dtype=config.dtype),
      nn.make_causal_mask(tokens, dtype=config.dtype),
    )
    shifted = jnp.pad(tokens, ((0, 0), (1, 0)))[:, :-1]
    embed = nn.Embed(config.vocab_size, config.emb_dim, embedding_init=nn.initializers.normal(1.0))
    y = embed(shifted)
    y = y + sinusoidal_table(tokens.shape[1], config.emb_dim)[None]
    y = y.astype(config.dtype)
    for _ in range(config.num_layers):
      y = DecoderBlock(config)(y, mask)
    y = nn.LayerNorm(dtype=config.dtype)(y)
    logits = nn.Dense(
      config.vocab_size,
      dtype=config.dtype,
      kernel_init=nn.initializers.xavier_uniform(),
      bias_init=nn.initializers.normal(stddev=1e-6),
    )(y)
    return logits.astype(config.dtype)


# ---------------------------------------------------------------- ResNet V1.5


class BasicBlock(nn.Module):
  """Two 3x3 convolutions; a 1x1 projection of the input where the shape changes."""

  filters: int
  strides: tuple[int, int]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(x)))
    y = norm(scale_init=nn.initializers.zeros_init())(conv(self.filters, (3, 3))(y))
    residual = x
    if residual.shape != y.shape:
      residual = norm(name="norm_proj")(
        conv(self.filters, (1, 1), self.strides, name="conv_proj")(x)
      )
    return nn.relu(residual + y)


class BottleneckBlock(nn.Module):
  """1x1, 3x3 (strided), 1x1 to 4x the filters; a 1x1 projection where the shape changes."""

  filters: int
  strides: tuple[int, int]
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(nn.Conv, use_bias=False, dtype=self.dtype)
    norm = functools.partial(
      nn.BatchNorm, use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=self.dtype
    )
    y = nn.relu(norm()(conv(self.filters, (1, 1))(x)))
    y = nn.relu(norm()(conv(self.filters, (3, 3), self.strides)(y)))
    y = norm(scale_init=nn.initializers.zeros_init())(conv(4 * self.filters, (1, 1))(y))
    residual = x
    if residual.shape != y.shape:
      residual = norm(name="norm_proj")(
        conv(4 * self.filters, (1, 1), self.strides, name="conv_proj")(x)
      )
    return nn.relu(residual + y)


class ResNet(nn.Module):
  """ResNet V1.5: 7x7/2 stem, 3x3/2 max pool, stages of blocks, mean pool, Dense."""

  stage_sizes: Sequence[int]
  block: type[nn.Module]
  num_classes: int = 1000
  num_filters: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = nn.Conv(
      self.num_filters, (7, 7), (2, 2), padding=[(3, 3), (3, 3)], use_bias=False, dtype=self.dtype
    )(x)
    x = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5, dtype=self.dtype)(x)
    x = nn.max_pool(nn.relu(x), (3, 3), strides=(2, 2), padding="SAME")
    for i, size in enumerate(self.stage_sizes):
      for j in range(size):
        strides = (2, 2) if i > 0 and j == 0 else (1, 1)
        x = self.block(self.num_filters * 2**i, strides, self.dtype)(x)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, dtype=self.dtype)(x).astype(self.dtype)


# ---------------------------------------------------------------- the benchmark


@dataclasses.dataclass(frozen=True)
class Model:
  """One benchmarked model: how to build it, its inputs, where its nodes go."""

  name: str
  matches: str  # the Flax configuration it has the shape of
  build: Callable[[Any], nn.Module]  # dtype -> module
  kind: str  # "lm" or "resnet"
  block_type: type[nn.Module]
  layer_types: tuple[type[nn.Module], ...]


def _lm(config: LMConfig) -> Callable[[Any], nn.Module]:
  return lambda dtype: TransformerLM(dataclasses.replace(config, dtype=dtype))


MODELS = {
  "lm1b_small": Model(
    "lm1b_small",
    "examples/lm1b default (6 blocks, vocab 30000) at train_test.py's widths: "
    "emb = qkv 128, mlp 512, 2 heads",
    _lm(LMConfig(emb_dim=128, qkv_dim=128, mlp_dim=512, num_heads=2)),
    "lm",
    DecoderBlock,
    (nn.Dense, nn.DenseGeneral),
  ),
  "lm1b": Model(
    "lm1b",
    "examples/lm1b configs/default.py: 6 blocks, emb = qkv 512, mlp 2048, 8 heads, vocab 30000",
    _lm(LMConfig()),
    "lm",
    DecoderBlock,
    (nn.Dense, nn.DenseGeneral),
  ),
  "resnet18": Model(
    "resnet18",
    "examples/imagenet ResNet18: stages [2, 2, 2, 2] of basic blocks, 64 filters, 1000 classes",
    lambda dtype: ResNet((2, 2, 2, 2), BasicBlock, dtype=dtype),
    "resnet",
    BasicBlock,
    (nn.Conv,),
  ),
  "resnet50": Model(
    "resnet50",
    "examples/imagenet ResNet50: stages [3, 4, 6, 3] of bottleneck blocks, 64 filters, "
    "1000 classes",
    lambda dtype: ResNet((3, 4, 6, 3), BottleneckBlock, dtype=dtype),
    "resnet",
    BottleneckBlock,
    (nn.Conv,),
  ),
}

# The examples' sizes: lm1b's per-device batch and max_target_length, imagenet's
# default batch and image size.
FULL_SIZES = {"lm": {"batch": 32, "length": 128}, "resnet": {"batch": 128, "image": 224}}
# What 2 CPU cores run in about a second a step: fewer examples (and for lm1b shorter
# sequences, 128 tokens a step), ResNet images of 64 x 64 instead of 224 x 224.
QUICK_SIZES = {
  "lm1b_small": {"batch": 4, "length": 128},
  "lm1b": {"batch": 2, "length": 64},
  "resnet18": {"batch": 8, "image": 64},
  "resnet50": {"batch": 8, "image": 64},
}
TINY_SIZES = {"lm": {"batch": 2, "length": 16}, "resnet": {"batch": 2, "image": 32}}


def model_inputs(model: Model, size: dict[str, int], key: jax.Array) -> tuple[jax.Array, ...]:
  """Random inputs of the model's kind: tokens (a few padding zeros), or images and labels."""
  if model.kind == "lm":
    vocab = model.build(jnp.float32).config.vocab_size
    tokens = jax.random.randint(key, (size["batch"], size["length"]), 1, vocab)
    # The last eighth of every sequence is padding, masked out of loss and attention.
    keep = jnp.arange(size["length"]) < size["length"] - size["length"] // 8
    return (jnp.where(keep, tokens, 0),)
  key_x, key_y = jax.random.split(key)
  images = jax.random.normal(key_x, (size["batch"], size["image"], size["image"], 3))
  labels = jax.random.randint(key_y, (size["batch"],), 0, 1000)
  return images, labels


def lm_loss(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Cross entropy of the next token, averaged over the non-padding positions."""
  weights = (tokens > 0).astype(jnp.float32)
  losses = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens)
  return jnp.sum(losses * weights) / jnp.sum(weights)


def resnet_loss(logits: jax.Array, labels: jax.Array, params: Any) -> jax.Array:
  """Cross entropy plus the imagenet example's penalty 0.5e-4 * sum of squared kernels."""
  loss = jnp.mean(
    optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), labels)
  )
  l2 = sum(jnp.sum(p**2) for p in jax.tree.leaves(params) if p.ndim > 1)
  return loss + 0.5e-4 * l2


class NodeCounter:
  """A ``where`` predicate for :func:`bgn_jax.linen.insert` that records what it selects."""

  def __init__(self, select: Callable[[nn.Module], bool]):
    self._select = select
    self.paths: set[str] = set()

  def __call__(self, module: nn.Module) -> bool:
    selected = self._select(module)
    if selected:
      self.paths.add("/".join(str(p) for p in module.scope.path))
    return selected


def with_nodes(
  apply: Callable[..., Any], model: Model, placement: str | None, grouping: str | None
) -> tuple[Callable[..., Any], list[NodeCounter]]:
  """``apply`` with BGN nodes at the placement, and the predicates that count them."""
  if placement is None:
    return apply, []
  if placement not in PLACEMENTS or grouping not in GROUPINGS:
    raise ValueError(
      f"placement must be in {PLACEMENTS} and grouping in {GROUPINGS}; "
      f"got {placement!r}, {grouping!r}."
    )
  if placement == "block":
    selects = {4 if model.kind == "resnet" else 3: lambda m: isinstance(m, model.block_type)}
  elif model.kind == "resnet":
    selects = {4: lambda m: isinstance(m, nn.Conv)}
  else:
    # The attention's query, key and value projections are (batch, length, heads,
    # head width); every other Dense output is (batch, length, features).
    def is_qkv(m: nn.Module) -> bool:
      return isinstance(m, nn.DenseGeneral) and m.name in ("query", "key", "value")

    selects = {
      4: is_qkv,
      3: lambda m: isinstance(m, model.layer_types) and not is_qkv(m),
    }
  counters = []
  for rank, select in selects.items():
    counter = NodeCounter(select)
    axes = None if grouping == "batch" else tuple(range(1, rank))
    apply = bgn_jax.linen.insert(apply, where=counter, axes=axes)
    counters.append(counter)
  return apply, counters


def make_step(model: Model, dtype: Any, placement: str | None, grouping: str | None) -> tuple:
  """The jitted training step (state donated), its initial state and the node counters."""
  module = model.build(dtype)
  apply, counters = with_nodes(module.apply, model, placement, grouping)
  if model.kind == "lm":
    optimizer = optax.adamw(0.0016, b1=0.9, b2=0.98, eps=1e-9, weight_decay=0.1)

    def loss(params: Any, batch_stats: Any, tokens: jax.Array) -> tuple[jax.Array, Any]:
      logits = apply({"params": params}, tokens)
      return lm_loss(logits, tokens), batch_stats

  else:
    optimizer = optax.sgd(0.1, momentum=0.9, nesterov=True)

    def loss(params: Any, batch_stats: Any, images: jax.Array, labels: jax.Array) -> tuple:
      logits, state = apply(
        {"params": params, "batch_stats": batch_stats},
        images.astype(dtype),
        mutable=["batch_stats"],
      )
      return resnet_loss(logits, labels, params), state["batch_stats"]

  def step(state: dict[str, Any], *batch: jax.Array) -> dict[str, Any]:
    grads, batch_stats = jax.grad(loss, has_aux=True)(state["params"], state["batch_stats"], *batch)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}

  def init(key: jax.Array, *batch: jax.Array) -> dict[str, Any]:
    variables = module.init(
      key, batch[0][:1].astype(dtype) if model.kind == "resnet" else batch[0][:1]
    )
    params = variables["params"]
    return {
      "params": params,
      "batch_stats": variables.get("batch_stats", {}),
      "opt_state": optimizer.init(params),
    }

  return jax.jit(step, donate_argnums=0), jax.jit(init), counters


_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%?\S+\s+=\s+.*?\s([a-z][a-z0-9-]*)\(")
COUNTED_OPS = ("fusion", "reduce", "conditional", "convolution", "dot", "copy", "custom-call")


def hlo_counts(text: str) -> dict[str, int]:
  """How many instructions of each counted opcode the optimized HLO holds (fused
  computations included: a reduce inside a fusion is one reduction pass)."""
  counts: collections.Counter[str] = collections.Counter()
  for line in text.splitlines():
    match = _INSTRUCTION.match(line)
    if match and match.group(1) in COUNTED_OPS:
      counts[match.group(1)] += 1
  return {op: counts[op] for op in COUNTED_OPS}


def git_commit() -> str:
  """HEAD's short hash, with "+dirty" when bgn_jax/ or benchmarks/ differ from it."""
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  try:
    head = subprocess.run(
      ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True, check=True
    ).stdout.strip()
    dirty = subprocess.run(
      ["git", "status", "--porcelain", "bgn_jax", "benchmarks"],
      cwd=root,
      capture_output=True,
      text=True,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.CalledProcessError):
    return "unknown"
  return head + ("+dirty" if dirty else "")


def compile_steps(
  lowered: dict[str, Any], threads: int
) -> dict[str, tuple[Any, float, float | None]]:
  """Compiles each lowered step: ``{name: (compiled, wall s, compiler CPU s or None)}``.

  The first (the baseline) is compiled alone; with ``threads > 1`` the others are then
  compiled side by side (XLA compiles without the GIL). The baseline first: on a GPU it
  autotunes the convolutions and matrix products, which the steps with nodes share
  (XLA keeps the autotuning results of a process), so they are not autotuned again while
  compiles run side by side. With threads, a compile's wall time includes its
  neighbours' and its CPU seconds are not its own (None).
  """

  def one(item: Any) -> tuple[Any, float, float | None]:
    start, cpu_start = time.perf_counter(), time.process_time()
    compiled = item.compile()
    return compiled, time.perf_counter() - start, time.process_time() - cpu_start

  names = list(lowered)
  done = {names[0]: one(lowered[names[0]])}
  if threads <= 1:
    done.update((name, one(lowered[name])) for name in names[1:])
  else:
    with concurrent.futures.ThreadPoolExecutor(threads) as pool:
      futures = {name: pool.submit(one, lowered[name]) for name in names[1:]}
      done.update((name, (*f.result()[:2], None)) for name, f in futures.items())
  return done


def measure(
  model: Model, dtype_name: str, size: dict[str, int], args: argparse.Namespace, env: dict
) -> list[dict[str, Any]]:
  """Compiles and times the step without BGN and with every (placement, grouping)."""
  dtype = jnp.dtype(dtype_name)
  key_init, key_data = jax.random.split(jax.random.key(0))
  batch = model_inputs(model, size, key_data)
  configs: list[tuple[str | None, str | None]] = [(None, None)]
  configs += [(p, g) for p in args.placements for g in args.groupings]
  load_start = os.getloadavg()
  runs, info, records = {}, {}, []
  # Nodes add no parameters: one initial state serves every configuration. Lowering
  # needs only its shapes, timing the arrays.
  init = make_step(model, dtype, None, None)[1]
  first_state = jax.eval_shape(init, key_init, *batch) if args.cost_only else init(key_init, *batch)
  if args.warm_compile and not args.cost_only:
    # The first compile of a model pays for more than its step (the compiler's own
    # start-up, autotuning on a GPU): a discarded compile of the baseline takes it.
    make_step(model, dtype, None, None)[0].lower(first_state, *batch).compile()
  lowered_steps: dict[str, tuple[Any, dict[str, Any], float, int]] = {}
  for placement, grouping in configs:
    name = f"{placement}/{grouping}" if placement else "none"
    step, _, counters = make_step(model, dtype, placement, grouping)
    # Each step donates its state, so each gets a copy of its own.
    state = {"state": first_state if args.cost_only else jax.tree.map(jnp.copy, first_state)}
    start = time.perf_counter()
    lowered = step.lower(state["state"], *batch)
    lower_s = time.perf_counter() - start
    # XLA's count on the unoptimized step; the GPU plugin gives none (None), so NaN there.
    cost = lowered.cost_analysis() or {}
    flops = {
      "gflop": cost.get("flops", math.nan) / 1e9,
      "gbytes_accessed": cost.get("bytes accessed", math.nan) / 1e9,
    }
    nodes = sum(len(c.paths) for c in counters)  # counted while tracing
    if args.cost_only:
      print(f"  {name}: {flops['gflop']:.1f} GFLOP, {flops['gbytes_accessed']:.1f} GB", flush=True)
      fields = {"model": model.name, "dtype": dtype_name, "placement": placement or "none"}
      key = f"models/{model.name}/{dtype_name}/{name}"
      records.append(
        harness.record(key, grouping or "none", env, **fields, nodes=nodes, **size, **flops)
      )
      continue
    lowered_steps[name] = (lowered, state, lower_s, nodes)
    info[name] = {"lower_s": lower_s, "nodes": nodes, **flops}
  if not args.cost_only:
    for name, (compiled, compile_s, compile_cpu_s) in compile_steps(
      {name: lowered for name, (lowered, *_) in lowered_steps.items()}, args.compile_threads
    ).items():
      _, state, lower_s, nodes = lowered_steps[name]
      text = compiled.as_text()
      if args.dump_hlo:
        os.makedirs(args.dump_hlo, exist_ok=True)
        path = os.path.join(
          args.dump_hlo, f"{model.name}_{dtype_name}_{name.replace('/', '_')}.txt"
        )
        with open(path, "w") as f:
          f.write(text)
      info[name].update(
        compile_s=compile_s,
        compile_cpu_s=compile_cpu_s,
        compile_threads=args.compile_threads,
        hlo_counts=hlo_counts(text),
        **peak_bytes(compiled),
      )

      def run(compiled: Callable = compiled, state: dict[str, Any] = state) -> Any:
        state["state"] = compiled(state["state"], *batch)
        return state["state"]

      for _ in range(args.warmup):
        jax.block_until_ready(run())
      runs[name] = run
      print(f"  {name}: {nodes} nodes, compiled in {lower_s + compile_s:.1f} s", flush=True)
  if args.cost_only:
    return records
  stats = harness.interleaved_medians(runs, args.rounds, args.steps_per_round)
  load_end = os.getloadavg()
  base, base_info = stats["none"], info["none"]
  for placement, grouping in configs:
    name = f"{placement}/{grouping}" if placement else "none"
    s = stats[name]
    record = harness.record(
      f"models/{model.name}/{dtype_name}/{name}",
      grouping or "none",
      env,
      model=model.name,
      matches=model.matches,
      dtype=dtype_name,
      placement=placement or "none",
      **size,
      ms_per_step=1e3 * s["median_s"],
      q1_ms=1e3 * s["q1_s"],
      q3_ms=1e3 * s["q3_s"],
      samples=s["samples"],
      steps_per_sample=args.steps_per_round,
      **info[name],
      compile_total_s=info[name]["lower_s"] + info[name]["compile_s"],
      load_average_start=list(load_start),
      load_average_end=list(load_end),
      commit=args.commit,
      warm_compile=args.warm_compile,
    )
    if placement is not None:
      record.update(harness.ratios(s, base))
      record["baseline_ms_per_step"] = 1e3 * base["median_s"]
      record["extra_peak_bytes"] = info[name]["peak_bytes"] - base_info["peak_bytes"]
      record["hlo_added"] = {
        op: n - base_info["hlo_counts"][op] for op, n in info[name]["hlo_counts"].items()
      }
      record["compile_ratio"] = record["compile_total_s"] / (
        base_info["lower_s"] + base_info["compile_s"]
      )
    records.append(record)
  return records


def print_table(records: list[dict[str, Any]]) -> None:
  print(
    f"{'model':11} {'dtype':9} {'placement':9} {'mode':12} {'nodes':>5} {'ms/step':>9} "
    f"{'ratio':>6} {'paired':>6} {'peak MiB':>9} {'compile s':>9}"
  )
  for r in records:
    ratio = f"{r['ratio']:.3f}" if "ratio" in r else "-"
    paired = f"{r['paired_ratio']:.3f}" if "paired_ratio" in r else "-"
    print(
      f"{r['model']:11} {r['dtype']:9} {r['placement']:9} {r['mode']:12} {r['nodes']:5d} "
      f"{r['ms_per_step']:9.2f} {ratio:>6} {paired:>6} {r['peak_bytes'] / 2**20:9.1f} "
      f"{r['compile_total_s']:9.2f}"
    )


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--quick", action="store_true", help="CPU sizes (smaller batches)")
  parser.add_argument("--tiny", action="store_true", help="a seconds-long smoke run")
  parser.add_argument("--json", default=None, help="write the records here")
  parser.add_argument("--models", default=",".join(MODELS))
  parser.add_argument("--dtypes", default="float32,bfloat16")
  parser.add_argument("--placements", default=",".join(PLACEMENTS))
  parser.add_argument("--groupings", default=",".join(GROUPINGS))
  parser.add_argument("--lm-batch", type=int, default=None)
  parser.add_argument("--lm-length", type=int, default=None)
  parser.add_argument("--resnet-batch", type=int, default=None)
  parser.add_argument("--resnet-image", type=int, default=None)
  parser.add_argument("--rounds", type=int, default=None, help="samples per configuration")
  parser.add_argument("--steps-per-round", type=int, default=None, help="steps per sample")
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument(
    "--warm-compile",
    action=argparse.BooleanOptionalAction,
    default=True,
    help="compile the baseline once before the compiles that are timed",
  )
  parser.add_argument(
    "--compile-threads",
    type=int,
    default=1,
    help="compile the steps with nodes side by side, after the baseline (default 1)",
  )
  parser.add_argument("--dump-hlo", default=None, help="write each optimized step's HLO here")
  parser.add_argument(
    "--cost-only", action="store_true", help="only lower each step and record its FLOPs"
  )
  args = parser.parse_args(argv)

  env = harness.print_environment("models")
  args.commit = git_commit()
  args.models = harness.parse_list(args.models)
  args.dtypes = harness.parse_list(args.dtypes)
  args.placements = harness.parse_list(args.placements)
  args.groupings = harness.parse_list(args.groupings)
  for name in args.models:
    if name not in MODELS:
      parser.error(f"unknown model {name!r}; choose from {', '.join(MODELS)}")
  models = {name: MODELS[name] for name in args.models}
  sizes = {name: dict(FULL_SIZES[m.kind]) for name, m in models.items()}
  if args.tiny:
    models = {name: tiny_model(m) for name, m in models.items()}
    sizes = {name: dict(TINY_SIZES[m.kind]) for name, m in models.items()}
    args.rounds, args.steps_per_round, args.warmup = 2, 1, 1
  elif args.quick:
    sizes = {name: dict(QUICK_SIZES[name]) for name in models}
  overrides = {
    ("lm", "batch"): args.lm_batch,
    ("lm", "length"): args.lm_length,
    ("resnet", "batch"): args.resnet_batch,
    ("resnet", "image"): args.resnet_image,
  }
  for name, model in models.items():
    for (kind, key), value in overrides.items():
      if value is not None and kind == model.kind:
        sizes[name][key] = value
  args.rounds = args.rounds or (10 if args.quick else 21)
  args.steps_per_round = args.steps_per_round or (1 if env["backend"] == "cpu" else 5)

  records = []
  for dtype_name in args.dtypes:  # every model's float32 first: a run cut short has those
    for name, model in models.items():
      size = sizes[name]
      print(f"-- {model.name} {dtype_name} {size}", flush=True)
      records += measure(model, dtype_name, size, args, env)
      harness.write_json(args.json, records)
  if not args.cost_only:
    print_table(records)


def tiny_model(model: Model) -> Model:
  """The model's kind and node placement at toy widths, for the smoke test."""
  if model.kind == "lm":
    config = LMConfig(vocab_size=64, num_layers=2, emb_dim=16, qkv_dim=16, mlp_dim=32, num_heads=2)
    build = _lm(config)
  else:
    block = model.block_type

    def build(dtype: Any) -> nn.Module:
      return ResNet((1, 1), block, num_filters=4, dtype=dtype)

  return dataclasses.replace(model, matches=f"toy ({model.matches})", build=build)


if __name__ == "__main__":
  main()
