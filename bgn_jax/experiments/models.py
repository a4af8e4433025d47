"""The networks of the experiments: a deep plain MLP, a deep plain CNN, a post-LN Transformer.

Compile time does not grow with depth: the repeated layers share one traced body
(``nn.scan``), and for the MLP and the CNN a per-layer flag (a scan input) says
after which layers the BGN node sits. The Transformer gets its BGN nodes from
:func:`bgn_jax.linen.insert` (see :func:`transformer_apply`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import spmd as nn_spmd

from bgn_jax.core import TargetNorm, bgn
from bgn_jax.linen import GRAD_NORMS_COLLECTION, insert

__all__ = [
  "ACTIVATIONS",
  "ARCHS",
  "BGN_METHODS",
  "INITS",
  "METHODS",
  "METHODS_BY_ARCH",
  "ConvLayer",
  "DeepCNN",
  "DeepMLP",
  "PostLNSublayer",
  "Transformer",
  "TransformerBlock",
  "bgn_flags",
  "to_images",
  "transformer_apply",
]

ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
  "relu": nn.relu,
  "tanh": jnp.tanh,
  "sigmoid": nn.sigmoid,
  "gelu": nn.gelu,
}
INITS: dict[str, Callable[..., Any]] = {
  "lecun": nn.initializers.lecun_normal(),
  "he": nn.initializers.he_normal(),
  "glorot": nn.initializers.glorot_normal(),
}
ARCHS = ("mlp", "cnn", "transformer")
METHODS_BY_ARCH: dict[str, tuple[str, ...]] = {
  "mlp": ("plain", "bgn", "bgn-per-example", "batchnorm", "layernorm", "residual", "bgn-residual"),
  "cnn": ("plain", "bgn", "bgn-per-example", "batchnorm", "residual"),
  "transformer": ("plain", "bgn", "pre-ln"),
}
METHODS = tuple(dict.fromkeys(m for methods in METHODS_BY_ARCH.values() for m in methods))
# The methods that place BGN nodes (after every bgn_every-th layer).
BGN_METHODS = ("bgn", "bgn-per-example", "bgn-residual")


def bgn_flags(depth: int, method: str, bgn_every: int) -> list[bool]:
  """Whether hidden layer i (0-based) is followed by a BGN node."""
  uses_bgn = method in BGN_METHODS
  return [uses_bgn and (i + 1) % bgn_every == 0 for i in range(depth)]


def _maybe_bgn(
  h: jax.Array, apply_bgn: jax.Array | bool, axes: tuple[int, ...] | None, target_norm: TargetNorm
) -> jax.Array:
  """``bgn(h)`` where the flag is set, else ``h``.

  A Python bool decides while tracing. A traced flag (layers of one scanned stack
  that differ) takes a ``lax.cond``, not a select: the backward pass of a select would
  run the node on a zero cotangent where the flag is off, and its 0/0 would poison the
  layer's gradient with NaN. A cond costs a trip to the host per layer on a GPU, so
  stacks whose layers all agree pass a bool (:func:`_stack_flag`).
  """
  if isinstance(apply_bgn, bool):
    return bgn(h, axes=axes, target_norm=target_norm) if apply_bgn else h
  return jax.lax.cond(
    apply_bgn, lambda v: bgn(v, axes=axes, target_norm=target_norm), lambda v: v, h
  )


def _stack_flag(flags: Sequence[bool]) -> bool | None:
  """The flag of every layer of a scanned stack if they agree (static), else None."""
  return flags[0] if len(set(flags)) == 1 else None


class HiddenLayer(nn.Module):
  """Dense, then the method's normalization, then the activation, then maybe BGN.

  With ``residual`` the layer returns ``h + gain * f(h)`` with a scalar ``gain``
  initialized to zero (SkipInit; De & Smith, 2020), and the method
  ``bgn-residual`` places its node on that sum (the residual stream).

  Attributes:
    width: output units.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of METHODS.
    dtype: the computation dtype (parameters stay float32).
    target_norm: the BGN node's ``target_norm``.
    residual: add the identity skip (the hidden layers after the first, whose
      input and output widths agree).
    partitioned: box the kernel and bias with logical axis names ("in", "hidden"),
      which the training's mesh rules map to mesh axes.
  """

  width: int
  activation: str
  init_scheme: str
  method: str
  dtype: Any = jnp.float32
  target_norm: TargetNorm = "sqrt_units"
  residual: bool = False
  partitioned: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array | bool, train: bool) -> jax.Array:
    kernel_init, bias_init = INITS[self.init_scheme], nn.initializers.zeros
    if self.partitioned:
      # Logical axis names: a --mesh with a model axis splits the hidden units over it
      # (tensor parallel), --fsdp a kernel's input units over data (see train._Sharding).
      kernel_init = nn.with_logical_partitioning(kernel_init, ("in", "hidden"))
      bias_init = nn.with_logical_partitioning(bias_init, ("hidden",))
    y = nn.Dense(
      self.width, kernel_init=kernel_init, bias_init=bias_init, dtype=self.dtype, name="dense"
    )(h)
    if self.method == "batchnorm":
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(y)
    elif self.method == "layernorm":
      y = nn.LayerNorm(dtype=self.dtype)(y)
    y = ACTIVATIONS[self.activation](y)
    if self.residual:
      gain = self.param("gain", nn.initializers.zeros, ())
      y = h + gain.astype(y.dtype) * y
    if self.method in BGN_METHODS:
      axes = (1,) if self.method == "bgn-per-example" else None
      y = _maybe_bgn(y, apply_bgn, axes, self.target_norm)
    return nn_spmd.with_logical_constraint(y, ("batch", "hidden"))


class _ScanBody(nn.Module):
  width: int
  activation: str
  init_scheme: str
  method: str
  dtype: Any
  train: bool
  target_norm: TargetNorm
  every_layer: bool | None  # _stack_flag of the stack's layers; None: use the scanned flag
  partitioned: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array) -> tuple[jax.Array, None]:
    layer = HiddenLayer(
      self.width,
      self.activation,
      self.init_scheme,
      self.method,
      self.dtype,
      self.target_norm,
      residual=self.method in ("residual", "bgn-residual"),
      partitioned=self.partitioned,
      name="layer",
    )
    flag = apply_bgn if self.every_layer is None else self.every_layer
    return layer(h, flag, self.train), None


class DeepMLP(nn.Module):
  """A plain MLP: ``depth`` hidden layers of ``width`` units and a linear classifier.

  Hidden layer 0 maps the input to ``width`` units; layers 1..depth-1 run in one
  ``nn.scan`` whose parameters have a leading axis of length ``depth - 1``
  (module path ``stack/layer``). ``residual`` and ``bgn-residual`` put an
  identity skip (SkipInit) around each of layers 1..depth-1; ``bgn-residual``
  adds a BGN node on the residual stream after every ``bgn_every``-th layer.

  Attributes:
    depth: hidden layers, >= 1.
    width: units per hidden layer.
    num_classes: outputs.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of METHODS.
    bgn_every: a BGN node after every ``bgn_every``-th hidden layer.
    dtype: the computation dtype.
    target_norm: the BGN nodes' ``target_norm``.
    partitioned: box the hidden layers' parameters with logical axis names.
  """

  depth: int
  width: int
  num_classes: int
  activation: str = "relu"
  init_scheme: str = "lecun"
  method: str = "plain"
  bgn_every: int = 1
  dtype: Any = jnp.float32
  target_norm: TargetNorm = "sqrt_units"
  partitioned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    flags = bgn_flags(self.depth, self.method, self.bgn_every)
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    h = HiddenLayer(
      self.width,
      self.activation,
      self.init_scheme,
      self.method,
      self.dtype,
      self.target_norm,
      partitioned=self.partitioned,
      name="input_layer",
    )(h, flags[0], train)
    if self.depth > 1:
      stack = nn.scan(
        _ScanBody,
        # The diagnostics collection is stacked too, so bgn_jax.grad_norms sees
        # one entry per scanned layer.
        variable_axes={"params": 0, "batch_stats": 0, GRAD_NORMS_COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=0,
        length=self.depth - 1,
        metadata_params={nn.PARTITION_NAME: "layers"},  # the stacked axis, replicated
      )
      h, _ = stack(
        self.width,
        self.activation,
        self.init_scheme,
        self.method,
        self.dtype,
        train,
        self.target_norm,
        every_layer=_stack_flag(flags[1:]),
        partitioned=self.partitioned,
        name="stack",
      )(h, jnp.asarray(flags[1:]))
    logits = nn.Dense(
      self.num_classes, kernel_init=INITS[self.init_scheme], dtype=self.dtype, name="classifier"
    )(h)
    return logits.astype(jnp.float32)


def to_images(x: jax.Array) -> jax.Array:
  """Flattened square images ``(N, D)`` as ``(N, H, W, C)``.

  ``D = H * W`` gives one channel (digits, MNIST, Fashion-MNIST); ``D = 3 * H * W``
  is read channel-first, as CIFAR-10 stores its pixels.

  Raises:
    ValueError: ``D`` is neither a square nor three times a square.
  """
  n, features = x.shape
  side = math.isqrt(features)
  if side * side == features:
    return x.reshape(n, side, side, 1)
  side = math.isqrt(features // 3)
  if 3 * side * side == features:
    return x.reshape(n, 3, side, side).transpose(0, 2, 3, 1)
  raise ValueError(
    f"the cnn and transformer archs need square images; got {features} features per example, "
    "neither a square nor three times a square."
  )


def _stages(depth: int, stages: int = 3) -> list[int]:
  """Layers per stage: ``depth`` split into (at most) ``stages`` parts, the first the largest."""
  stages = min(stages, depth)
  sizes = [depth // stages] * stages
  sizes[0] += depth - sum(sizes)
  return sizes


class ConvLayer(nn.Module):
  """A 3x3 convolution, then the method's normalization and the activation, then maybe BGN.

  With ``residual`` the layer returns ``h + gain * f(h)`` with a scalar ``gain``
  initialized to zero (SkipInit; De & Smith, 2020): a bare ``h + f(h)`` without
  normalization multiplies the activations' scale at every layer.

  Attributes:
    width: output channels.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of ``METHODS_BY_ARCH["cnn"]``.
    strides: the convolution's stride (1, or 2 for the first layer of a stage).
    residual: add the identity skip (only where input and output shapes agree).
    dtype: the computation dtype.
    target_norm: the BGN node's ``target_norm``.
  """

  width: int
  activation: str
  init_scheme: str
  method: str
  strides: int = 1
  residual: bool = False
  dtype: Any = jnp.float32
  target_norm: TargetNorm = "sqrt_units"

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array | bool, train: bool) -> jax.Array:
    y = nn.Conv(
      self.width,
      (3, 3),
      strides=self.strides,
      padding="SAME",
      kernel_init=INITS[self.init_scheme],
      dtype=self.dtype,
      name="conv",
    )(h)
    if self.method == "batchnorm":
      y = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(y)
    y = ACTIVATIONS[self.activation](y)
    if self.residual:
      gain = self.param("gain", nn.initializers.zeros, ())
      y = h + gain.astype(y.dtype) * y
    if self.method in BGN_METHODS:
      axes = (1, 2, 3) if self.method == "bgn-per-example" else None
      y = _maybe_bgn(y, apply_bgn, axes, self.target_norm)
    return y


class _ConvScanBody(nn.Module):
  width: int
  activation: str
  init_scheme: str
  method: str
  dtype: Any
  train: bool
  target_norm: TargetNorm
  every_layer: bool | None  # _stack_flag of the stack's layers; None: use the scanned flag
  partitioned: bool = False

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array) -> tuple[jax.Array, None]:
    layer = ConvLayer(
      self.width,
      self.activation,
      self.init_scheme,
      self.method,
      strides=1,
      residual=self.method == "residual",
      dtype=self.dtype,
      target_norm=self.target_norm,
      name="layer",
    )
    flag = apply_bgn if self.every_layer is None else self.every_layer
    return layer(h, flag, self.train), None


class DeepCNN(nn.Module):
  """A plain CNN: ``depth`` 3x3 convolutions in stride-2 stages, global average pooling, a head.

  The ``depth`` layers are split into three stages (fewer below depth 3), the
  first the largest; the first layer of every stage has stride 2 (28x28 images
  are seen at 14x14, 7x7 and 4x4), the others stride 1 and run in one ``nn.scan``
  per stage (module paths ``input_layer``, ``stage1_down``, ``stage2_down`` and
  ``stage{k}/layer``). All layers have ``width`` channels. No normalization and
  no skips unless ``method`` asks: ``batchnorm`` after every convolution,
  ``residual`` an identity skip around every stride-1 layer.

  Attributes:
    depth: convolution layers, >= 1.
    width: channels of every layer.
    num_classes: outputs.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of ``METHODS_BY_ARCH["cnn"]``.
    bgn_every: a BGN node after every ``bgn_every``-th layer.
    dtype: the computation dtype.
    target_norm: the BGN nodes' ``target_norm``.
    partitioned: box the hidden layers' parameters with logical axis names.
  """

  depth: int
  width: int
  num_classes: int
  activation: str = "relu"
  init_scheme: str = "lecun"
  method: str = "plain"
  bgn_every: int = 1
  dtype: Any = jnp.float32
  target_norm: TargetNorm = "sqrt_units"
  partitioned: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    flags = bgn_flags(self.depth, self.method, self.bgn_every)
    h = to_images(x).astype(self.dtype)
    layer = 0
    for stage, size in enumerate(_stages(self.depth)):
      h = ConvLayer(
        self.width,
        self.activation,
        self.init_scheme,
        self.method,
        strides=2,
        dtype=self.dtype,
        target_norm=self.target_norm,
        name="input_layer" if stage == 0 else f"stage{stage}_down",
      )(h, flags[layer], train)
      if size > 1:
        stack = nn.scan(
          _ConvScanBody,
          variable_axes={"params": 0, "batch_stats": 0, GRAD_NORMS_COLLECTION: 0},
          split_rngs={"params": True},
          in_axes=0,
          length=size - 1,
        )
        h, _ = stack(
          self.width,
          self.activation,
          self.init_scheme,
          self.method,
          self.dtype,
          train,
          self.target_norm,
          every_layer=_stack_flag(flags[layer + 1 : layer + size]),
          name=f"stage{stage}",
        )(h, jnp.asarray(flags[layer + 1 : layer + size]))
      layer += size
    h = jnp.mean(h, axis=(1, 2))
    logits = nn.Dense(
      self.num_classes, kernel_init=INITS[self.init_scheme], dtype=self.dtype, name="classifier"
    )(h)
    return logits.astype(jnp.float32)


class _SelfAttention(nn.Module):
  heads: int
  init_scheme: str
  dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return nn.MultiHeadDotProductAttention(
      num_heads=self.heads, kernel_init=INITS[self.init_scheme], dtype=self.dtype, name="attention"
    )(h, h)


class _FeedForward(nn.Module):
  width: int
  activation: str
  init_scheme: str
  dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    init = INITS[self.init_scheme]
    h = nn.Dense(2 * self.width, kernel_init=init, dtype=self.dtype, name="hidden")(h)
    h = ACTIVATIONS[self.activation](h)
    return nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="out")(h)


class PostLNSublayer(nn.Module):
  """``LayerNorm(h + sublayer(h))``: one sublayer of the original (post-LN) Transformer.

  The method ``bgn`` places its nodes at the outputs of these modules (with
  :func:`bgn_jax.linen.insert`), i.e. on the residual stream after every
  sublayer, where the post-LN network's gradient shrinks or grows with depth.

  Attributes:
    kind: ``"attention"`` or ``"feed_forward"``.
    width: model width.
    heads: attention heads.
    activation: the feed-forward activation, a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    dtype: the computation dtype.
  """

  kind: str
  width: int
  heads: int
  activation: str
  init_scheme: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return nn.LayerNorm(dtype=self.dtype, name="norm")(h + _sublayer(self)(h))


def _sublayer(layer: Any) -> nn.Module:
  if layer.kind == "attention":
    return _SelfAttention(layer.heads, layer.init_scheme, layer.dtype, name="attention")
  return _FeedForward(layer.width, layer.activation, layer.init_scheme, layer.dtype, name="mlp")


class _PreLNSublayer(nn.Module):
  kind: str
  width: int
  heads: int
  activation: str
  init_scheme: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    return h + _sublayer(self)(nn.LayerNorm(dtype=self.dtype, name="norm")(h))


class TransformerBlock(nn.Module):
  """Self-attention then a feed-forward network (2 x width hidden units), post- or pre-LN.

  Attributes:
    width: model width.
    heads: attention heads.
    activation: the feed-forward activation.
    init_scheme: a key of INITS.
    pre_ln: the pre-LN arrangement ``h + f(LN(h))`` instead of ``LN(h + f(h))``.
    dtype: the computation dtype.
  """

  width: int
  heads: int
  activation: str
  init_scheme: str
  pre_ln: bool = False
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array) -> jax.Array:
    sublayer = _PreLNSublayer if self.pre_ln else PostLNSublayer
    for kind in ("attention", "feed_forward"):
      h = sublayer(
        kind, self.width, self.heads, self.activation, self.init_scheme, self.dtype, name=kind
      )(h)
    return h


class _BlockScanBody(nn.Module):
  width: int
  heads: int
  activation: str
  init_scheme: str
  pre_ln: bool
  dtype: Any

  @nn.compact
  def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
    block = TransformerBlock(
      self.width,
      self.heads,
      self.activation,
      self.init_scheme,
      self.pre_ln,
      self.dtype,
      name="block",
    )
    return block(h), None


class Transformer(nn.Module):
  """An encoder classifier over the rows of an image: H tokens of W * C pixels each.

  A linear embedding of each row plus a learned position embedding, ``depth``
  blocks in one ``nn.scan`` (module path ``stack/block``), post-LN (the original
  Transformer) unless ``method == "pre-ln"`` (then a final LayerNorm too), the
  mean over the tokens and a linear head. ``method == "bgn"`` builds the plain
  post-LN network: its nodes come from :func:`transformer_apply`.

  Attributes:
    depth: blocks, >= 1.
    width: model width, a multiple of ``heads``.
    num_classes: outputs.
    heads: attention heads.
    activation: the feed-forward activation.
    init_scheme: a key of INITS.
    method: one of ``METHODS_BY_ARCH["transformer"]``.
    dtype: the computation dtype.
  """

  depth: int
  width: int
  num_classes: int
  heads: int = 4
  activation: str = "relu"
  init_scheme: str = "lecun"
  method: str = "plain"
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    images = to_images(x)
    n, rows, columns, channels = images.shape
    tokens = images.reshape(n, rows, columns * channels).astype(self.dtype)
    init = INITS[self.init_scheme]
    h = nn.Dense(self.width, kernel_init=init, dtype=self.dtype, name="input_layer")(tokens)
    position = self.param("position", nn.initializers.normal(0.02), (rows, self.width), jnp.float32)
    h = h + position.astype(self.dtype)
    pre_ln = self.method == "pre-ln"
    stack = nn.scan(
      _BlockScanBody,
      variable_axes={"params": 0, GRAD_NORMS_COLLECTION: 0},
      split_rngs={"params": True},
      length=self.depth,
    )
    h, _ = stack(
      self.width, self.heads, self.activation, self.init_scheme, pre_ln, self.dtype, name="stack"
    )(h, None)
    if pre_ln:
      h = nn.LayerNorm(dtype=self.dtype, name="final_norm")(h)
    logits = nn.Dense(self.num_classes, kernel_init=init, dtype=self.dtype, name="classifier")(
      jnp.mean(h, axis=1)
    )
    return logits.astype(jnp.float32)


def transformer_apply(
  model: Transformer, target_norm: TargetNorm = "sqrt_units"
) -> Callable[..., Any]:
  """``model.apply``, with BGN after every post-LN sublayer when ``model.method == "bgn"``.

  The nodes go on the outputs of the :class:`PostLNSublayer` calls, placed by
  :func:`bgn_jax.linen.insert` (two per block); forward values are unchanged.
  """
  if model.method != "bgn":
    return model.apply
  return insert(model.apply, where=PostLNSublayer, target_norm=target_norm)
