"""Insert BGN after every Dense of an existing linen model, and train it a few steps.

The model's code is not touched: ``bgn_jax.insert`` wraps ``model.apply``. The parameter
tree and the forward pass stay exactly those of the model; only the gradients change.
``bgn_jax.linen.placements`` shows where the nodes went, from shapes alone.

Run: python examples/insert_into_model.py
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import bgn_jax


class DeepMLP(nn.Module):
  """A deep ReLU MLP with LeCun-normal init: its first layers get vanishing gradients."""

  depth: int = 20
  width: int = 32
  classes: int = 4

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.relu(nn.Dense(self.width, kernel_init=nn.initializers.lecun_normal())(x))
    return nn.Dense(self.classes)(x)


def synthetic_data(n=512, features=16, classes=4, seed=0):
  """Labels from a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, features)).astype(np.float32)
  labels = np.argmax(x @ rng.standard_normal((features, classes)), axis=1)
  return jnp.asarray(x), jnp.asarray(labels)


def main():
  x, labels = synthetic_data()
  model = DeepMLP()
  params = model.init(jax.random.key(0), x)["params"]

  apply_with_bgn = bgn_jax.insert(model.apply, where=nn.Dense)
  # Where the nodes go, traced from shapes alone (no arithmetic): one per Dense.
  report = bgn_jax.linen.placements(apply_with_bgn, {"params": params}, x)
  print(report)
  assert [p.path for p in report.nodes] == [f"Dense_{i}" for i in range(model.depth + 1)]
  assert not report.skipped

  def loss_fn(params, apply_fn):
    logits = apply_fn({"params": params}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  def first_kernel_grad_norm(apply_fn):
    grads = jax.jit(jax.grad(loss_fn), static_argnums=1)(params, apply_fn)
    return float(jnp.linalg.norm(grads["Dense_0"]["kernel"]))

  plain_norm, bgn_norm = first_kernel_grad_norm(model.apply), first_kernel_grad_norm(apply_with_bgn)
  print(
    f"gradient norm of the first kernel at init: plain {plain_norm:.3e}, with BGN {bgn_norm:.3e}"
  )
  assert bgn_norm > plain_norm

  optimizer = optax.adam(1e-3)

  @jax.jit
  def train_step(params, opt_state):
    loss, grads = jax.value_and_grad(loss_fn)(params, apply_with_bgn)
    updates, opt_state = optimizer.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  trained, opt_state = params, optimizer.init(params)
  for step in range(30):
    trained, opt_state, loss = train_step(trained, opt_state)
    if step % 10 == 0 or step == 29:
      print(f"step {step:2d}  loss {float(loss):.4f}")

  shapes = jax.tree.map(jnp.shape, trained)
  same_tree = shapes == jax.tree.map(jnp.shape, params)
  print(f"parameter tree unchanged in structure and shapes: {same_tree}")
  assert same_tree
  forward = jax.jit(model.apply)({"params": trained}, x)
  forward_with_bgn = jax.jit(apply_with_bgn)({"params": trained}, x)
  same_forward = bool(jnp.array_equal(forward, forward_with_bgn))
  print(f"forward output with BGN equals the original model's, bit for bit: {same_forward}")
  assert same_forward
  accuracy = float(jnp.mean(jnp.argmax(forward, axis=1) == labels))
  print(f"training accuracy of the plain model with the trained parameters: {accuracy:.3f}")


if __name__ == "__main__":
  main()
