"""Insert BGN into an existing flax.nnx model, see where the nodes went, measure, train.

``bgn_jax.nnx.insert`` edits the model in place (the nnx surgery convention): the
selected modules' classes are swapped for ``<Class>WithBGN`` subclasses, and the model,
its Variables and its state stay the same objects. ``bgn_jax.nnx.remove`` undoes it.

Run: python examples/nnx_insert.py
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import bgn_jax


class DeepMLP(nnx.Module):
  """A deep ReLU MLP with LeCun-normal init: its first layers get vanishing gradients."""

  def __init__(self, depth=12, width=32, features=16, classes=4, *, rngs: nnx.Rngs):
    init = nnx.initializers.lecun_normal()
    self.layers = nnx.List(
      [
        nnx.Linear(features if i == 0 else width, width, kernel_init=init, rngs=rngs)
        for i in range(depth)
      ]
    )
    self.head = nnx.Linear(width, classes, rngs=rngs)

  def __call__(self, x):
    for layer in self.layers:
      x = nnx.relu(layer(x))
    return self.head(x)


def synthetic_data(n=256, features=16, classes=4, seed=0):
  """Labels from a fixed random linear teacher."""
  rng = np.random.default_rng(seed)
  x = rng.standard_normal((n, features)).astype(np.float32)
  labels = np.argmax(x @ rng.standard_normal((features, classes)), axis=1)
  return jnp.asarray(x), jnp.asarray(labels)


def loss_fn(model, x, labels):
  return optax.softmax_cross_entropy_with_integer_labels(model(x), labels).mean()


def main():
  x, labels = synthetic_data()
  model = DeepMLP(rngs=nnx.Rngs(0))
  plain = bgn_jax.nnx.grad_norms(loss_fn, where=r"^layers/")(model, x, labels)

  state_before = nnx.state(model)
  assert bgn_jax.nnx.insert(model, where=r"^layers/") is model  # in place
  assert type(model.layers[0]).__name__ == "LinearWithBGN"
  assert jax.tree.structure(nnx.state(model)) == jax.tree.structure(state_before)

  print(bgn_jax.nnx.placements(model, x[:8]))  # abstract: no FLOPs, state unchanged

  # "output": the gradient at each layer's own output, which its node normalized;
  # "at_bgn": the raw gradient arriving at the node from the layers above.
  with_bgn = bgn_jax.nnx.grad_norms(loss_fn, where=r"^layers/")(model, x, labels)
  print("layer      |dL/dW| plain  |dL/dW| with BGN  at_bgn     output")
  for key in ("layers/0", "layers/5", "layers/11"):
    plain_w, entry = float(plain[key]["params"]), with_bgn[key]
    print(
      f"{key:9s}  {plain_w:.3e}      {float(entry['params']):.3e}         "
      f"{float(entry['at_bgn']):.3e}  {float(entry['output']):.3e}"
    )
  assert float(with_bgn["layers/0"]["params"]) > float(plain["layers/0"]["params"])

  optimizer = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def train_step(model, optimizer, x, labels):
    loss, grads = nnx.value_and_grad(loss_fn)(model, x, labels)
    optimizer.update(model, grads)
    return loss

  old = nnx.to_pure_dict(nnx.state(model, nnx.Param))  # arrays: a snapshot, not a view
  losses = [float(train_step(model, optimizer, x, labels)) for _ in range(20)]
  print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f} in {len(losses)} steps")
  assert losses[-1] < losses[0]
  updates = bgn_jax.relative_updates(old, nnx.state(model, nnx.Param), where=with_bgn)
  print(f"relative update of layers/0 over the steps: {float(updates['layers/0']):.3e}")

  bgn_jax.nnx.remove(model)  # the trained parameters stay; the nodes go
  assert type(model.layers[0]) is nnx.Linear


if __name__ == "__main__":
  main()
