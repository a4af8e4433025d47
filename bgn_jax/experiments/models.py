"""The deep plain MLP of the experiments, its hidden stack scanned with ``nn.scan``.

Compile time does not grow with depth: the hidden layers after the first share one
traced body, and a per-layer flag (a scan input) says after which layers the BGN
node sits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from bgn_jax.core import bgn
from bgn_jax.linen import GRAD_NORMS_COLLECTION

__all__ = ["ACTIVATIONS", "INITS", "METHODS", "DeepMLP", "bgn_flags"]

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
METHODS = ("plain", "bgn", "bgn-per-example", "batchnorm", "layernorm")


def bgn_flags(depth: int, method: str, bgn_every: int) -> list[bool]:
  """Whether hidden layer i (0-based) is followed by a BGN node."""
  uses_bgn = method in ("bgn", "bgn-per-example")
  return [uses_bgn and (i + 1) % bgn_every == 0 for i in range(depth)]


class HiddenLayer(nn.Module):
  """Dense, then the method's normalization, then the activation, then maybe BGN.

  Attributes:
    width: output units.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of METHODS.
    dtype: the computation dtype (parameters stay float32).
  """

  width: int
  activation: str
  init_scheme: str
  method: str
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array, train: bool) -> jax.Array:
    h = nn.Dense(self.width, kernel_init=INITS[self.init_scheme], dtype=self.dtype, name="dense")(h)
    if self.method == "batchnorm":
      h = nn.BatchNorm(use_running_average=not train, momentum=0.9, dtype=self.dtype)(h)
    elif self.method == "layernorm":
      h = nn.LayerNorm(dtype=self.dtype)(h)
    h = ACTIVATIONS[self.activation](h)
    if self.method in ("bgn", "bgn-per-example"):
      axes = (1,) if self.method == "bgn-per-example" else None
      # The flag selects the node for this layer; where the node is off, the
      # select sends the whole cotangent around it.
      h = jnp.where(apply_bgn, bgn(h, axes=axes), h)
    return h


class _ScanBody(nn.Module):
  width: int
  activation: str
  init_scheme: str
  method: str
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, h: jax.Array, apply_bgn: jax.Array) -> tuple[jax.Array, None]:
    layer = HiddenLayer(
      self.width, self.activation, self.init_scheme, self.method, self.dtype, name="layer"
    )
    return layer(h, apply_bgn, self.train), None


class DeepMLP(nn.Module):
  """A plain MLP: ``depth`` hidden layers of ``width`` units and a linear classifier.

  Hidden layer 0 maps the input to ``width`` units; layers 1..depth-1 run in one
  ``nn.scan`` whose parameters have a leading axis of length ``depth - 1``
  (module path ``stack/layer``).

  Attributes:
    depth: hidden layers, >= 1.
    width: units per hidden layer.
    num_classes: outputs.
    activation: a key of ACTIVATIONS.
    init_scheme: a key of INITS.
    method: one of METHODS.
    bgn_every: a BGN node after every ``bgn_every``-th hidden layer.
    dtype: the computation dtype.
  """

  depth: int
  width: int
  num_classes: int
  activation: str = "relu"
  init_scheme: str = "lecun"
  method: str = "plain"
  bgn_every: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = True) -> jax.Array:
    flags = bgn_flags(self.depth, self.method, self.bgn_every)
    h = x.reshape(x.shape[0], -1).astype(self.dtype)
    h = HiddenLayer(
      self.width, self.activation, self.init_scheme, self.method, self.dtype, name="input_layer"
    )(h, jnp.asarray(flags[0]), train)
    if self.depth > 1:
      stack = nn.scan(
        _ScanBody,
        # The diagnostics collection is stacked too, so bgn_jax.grad_norms sees
        # one entry per scanned layer.
        variable_axes={"params": 0, "batch_stats": 0, GRAD_NORMS_COLLECTION: 0},
        split_rngs={"params": True},
        in_axes=0,
        length=self.depth - 1,
      )
      h, _ = stack(
        self.width, self.activation, self.init_scheme, self.method, self.dtype, train, name="stack"
      )(h, jnp.asarray(flags[1:]))
    logits = nn.Dense(
      self.num_classes, kernel_init=INITS[self.init_scheme], dtype=self.dtype, name="classifier"
    )(h)
    return logits.astype(jnp.float32)
