"""BGN as a layer: a flax.linen model and a flax.nnx model, each trained a few optax steps.

Run: python examples/flax_layer.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax import nnx

import bgn_jax


class LinenMLP(nn.Module):
  """A deep tanh MLP with BGN after every hidden layer."""

  depth: int = 8
  width: int = 32
  classes: int = 3

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for _ in range(self.depth):
      x = bgn_jax.BGN()(jnp.tanh(nn.Dense(self.width)(x)))
    return nn.Dense(self.classes)(x)


class NnxMLP(nnx.Module):
  """The same model in flax.nnx, with per-example BGN nodes."""

  def __init__(self, depth: int, width: int, classes: int, *, rngs: nnx.Rngs):
    sizes = [4] + [width] * depth
    self.hidden = nnx.List([nnx.Linear(m, n, rngs=rngs) for m, n in zip(sizes[:-1], sizes[1:])])
    self.bgn = bgn_jax.nnx.BGN(axes=(1,))
    self.out = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x: jax.Array) -> jax.Array:
    for layer in self.hidden:
      x = self.bgn(jnp.tanh(layer(x)))
    return self.out(x)


def toy_data(key: jax.Array) -> tuple[jax.Array, jax.Array]:
  x = jax.random.normal(key, (128, 4))
  y = (x[:, 0] > 0).astype(jnp.int32) + (x[:, 1] > 0.5).astype(jnp.int32)
  return x, y


def cross_entropy(logits: jax.Array, y: jax.Array) -> jax.Array:
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def train_linen(x: jax.Array, y: jax.Array, steps: int = 50) -> tuple[float, float]:
  model = LinenMLP()
  params = model.init(jax.random.key(1), x)["params"]
  optimizer = optax.adam(1e-3)
  state = optimizer.init(params)

  @jax.jit
  def step(params, state):
    loss, grads = jax.value_and_grad(lambda p: cross_entropy(model.apply({"params": p}, x), y))(
      params
    )
    updates, state = optimizer.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  first = None
  for _ in range(steps):
    params, state, loss = step(params, state)
    first = float(loss) if first is None else first
  return first, float(loss)


def train_nnx(x: jax.Array, y: jax.Array, steps: int = 50) -> tuple[float, float]:
  model = NnxMLP(depth=8, width=32, classes=3, rngs=nnx.Rngs(2))
  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, optimizer):
    loss, grads = nnx.value_and_grad(lambda m: cross_entropy(m(x), y))(model)
    optimizer.update(model, grads)
    return loss

  first = None
  for _ in range(steps):
    loss = step(model, optimizer)
    first = float(loss) if first is None else first
  return first, float(loss)


def main() -> None:
  x, y = toy_data(jax.random.key(0))
  for name, train in [("linen", train_linen), ("nnx", train_nnx)]:
    first, last = train(x, y)
    print(f"{name:>5}: loss {first:.3f} -> {last:.3f}")
    assert last < first, f"{name} did not train"


if __name__ == "__main__":
  main()
