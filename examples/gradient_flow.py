"""Gradient flow through a 30-layer sigmoid MLP, without and with BGN.

The hidden stack is an ``nn.scan`` over 30 Dense + sigmoid layers (LeCun-normal
init) on scikit-learn's 8x8 digits. For each run it measures, at
initialization, the norm of the gradient arriving at every hidden layer's
output and of every layer's parameter gradient (:func:`bgn_jax.grad_norms`),
then trains a few hundred Adam steps on minibatches and measures how far each layer's weights
moved (:func:`bgn_jax.relative_updates`). One PNG shows all three against depth.

Run (well under a minute on a CPU)::

  python examples/gradient_flow.py --out docs/gradient_flow.png
"""

from __future__ import annotations

import argparse
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from sklearn.datasets import load_digits

import bgn_jax

DEPTH = 30
WIDTH = 64  # the digits have 64 pixels, so the first hidden layer keeps the width
CLASSES = 10


class Hidden(nn.Module):
  """One hidden layer, the body of the scan."""

  @nn.compact
  def __call__(self, h: jax.Array, _: None) -> tuple[jax.Array, None]:
    return nn.sigmoid(nn.Dense(WIDTH)(h)), None


class DeepMLP(nn.Module):
  """``depth`` scanned hidden layers (path ``hidden/Dense_0``) and a classifier."""

  depth: int

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    stack = nn.scan(
      Hidden,
      # grad_norms's perturbations are split per layer like the parameters.
      variable_axes={"params": 0, bgn_jax.linen.GRAD_NORMS_COLLECTION: 0},
      split_rngs={"params": True},
      length=self.depth,
    )
    h, _ = stack(name="hidden")(x, None)
    return nn.Dense(CLASSES, name="classifier")(h)


def cross_entropy(apply_fn, variables, x, y):
  logits = apply_fn(variables, x)
  return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


def accuracy(apply_fn, variables, x, y):
  return float(jnp.mean(jnp.argmax(apply_fn(variables, x), -1) == y))


@functools.partial(jax.jit, static_argnums=(0, 1))
def train(loss_fn, optimizer, params, batches):
  """Runs one optimizer step per minibatch in ``batches``, in one compiled loop."""

  def step(carry, batch):
    params, state = carry
    grads = jax.grad(lambda p: loss_fn({"params": p}, *batch))(params)
    updates, state = optimizer.update(grads, state, params)
    return (optax.apply_updates(params, updates), state), None

  (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), batches)
  return params


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--out", default="docs/gradient_flow.png", help="the PNG to write")
  parser.add_argument("--steps", type=int, default=300, help="Adam steps per run")
  parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate")
  parser.add_argument("--batch", type=int, default=128, help="minibatch size")
  args = parser.parse_args()

  digits = load_digits()
  x = jnp.asarray(digits.data / 16.0, jnp.float32)
  y = jnp.asarray(digits.target)
  x_train, y_train, x_test, y_test = x[:1500], y[:1500], x[1500:], y[1500:]

  picks = np.random.default_rng(0).integers(0, len(x_train), size=(args.steps, args.batch))
  batches = (x_train[picks], y_train[picks])
  model = DeepMLP(DEPTH)
  variables = model.init(jax.random.key(0), x_train[:1])
  runs = {
    "plain": model.apply,
    # BGN after every hidden Dense (not after the classifier).
    "BGN": bgn_jax.insert(model.apply, where=r"^hidden/Dense"),
  }
  optimizer = optax.adam(args.lr)
  reports = {}
  for label, apply_fn in runs.items():
    loss_fn = functools.partial(cross_entropy, apply_fn)
    measure = jax.jit(bgn_jax.grad_norms(loss_fn, where=nn.Dense))
    report = measure(variables, x_train, y_train)

    params = train(loss_fn, optimizer, variables["params"], batches)
    moved = bgn_jax.relative_updates(variables["params"], params, where=report)
    for key in report:
      report[key]["update"] = moved[key.split("#")[0]]
    reports[label] = report

    output = bgn_jax.depth_profile(report, "output")
    update = bgn_jax.depth_profile(report, "update")
    print(
      f"{label:>5}: gradient at layer 1 / layer {DEPTH}: {output[0]:.2e} / "
      f"{output[DEPTH - 1]:.2e}; relative update of layer 1 / layer {DEPTH} after "
      f"{args.steps} steps: {update[0]:.2e} / {update[DEPTH - 1]:.2e}; test accuracy "
      f"{accuracy(apply_fn, {'params': params}, x_test, y_test):.1%}"
    )

  path = bgn_jax.plot_grad_norms(
    reports,
    args.out,
    title=f"{DEPTH}-layer sigmoid MLP on digits: gradients at init, updates after "
    f"{args.steps} Adam steps (lr {args.lr:g})",
    quantities=("output", "params", "update"),
  )
  print(f"wrote {path}")


if __name__ == "__main__":
  main()
