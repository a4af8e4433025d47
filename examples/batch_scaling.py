"""How the gradient below BGN nodes grows with the global batch size.

Prints the first layer's gradient norm of a 4-layer tanh MLP (width 64, mean squared
error, a node after every layer) for batches of 16 to 4096 examples: without nodes,
with whole-batch nodes and with per-example nodes. Runs in a few seconds on a CPU.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

import bgn_jax

WIDTH = 64


def loss(weights, x, target, options):
  h = x
  for w in weights:
    h = jnp.tanh(h @ w)
    h = h if options is None else bgn_jax.bgn(h, **options)
  return jnp.mean((h - target) ** 2)


def main() -> None:
  rng = np.random.default_rng(0)
  weights = [
    jnp.asarray(rng.standard_normal((WIDTH, WIDTH)) / WIDTH**0.5, jnp.float32) for _ in range(4)
  ]
  x = jnp.asarray(rng.standard_normal((4096, WIDTH)), jnp.float32)
  target = jnp.tanh(x @ jnp.asarray(rng.standard_normal((WIDTH, WIDTH)), jnp.float32))
  print("| global batch | plain | whole batch | per example |")
  print("|---|---|---|---|")
  norms = {}
  for batch in (16, 64, 256, 1024, 4096):
    for options in (None, {}, {"axes": (1,)}):
      grads = jax.grad(loss)(weights, x[:batch], target[:batch], options)
      norms[batch, str(options)] = float(jnp.linalg.norm(grads[0]))
    row = [f"{norms[batch, str(o)]:.4g}" for o in (None, {}, {"axes": (1,)})]
    print(f"| {batch} | " + " | ".join(row) + " |")
  # A 4x larger batch: about sqrt(4) whole batch, about 4 per example.
  assert 1.7 < norms[4096, "{}"] / norms[1024, "{}"] < 2.2
  assert 3.5 < norms[4096, "{'axes': (1,)}"] / norms[1024, "{'axes': (1,)}"] < 4.3


if __name__ == "__main__":
  main()
