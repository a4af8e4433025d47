"""BGN in equinox: a model with BGN layers, insert into eqx.nn.MLP, placements, grad_norms.

Equinox models are written for one example and batched with jax.vmap; a node
normalizes each example's gradient to sqrt(its size). With axis_name="batch"
(and jax.vmap(..., axis_name="batch")) the whole batch is one group instead.

Run: python examples/equinox_layer.py
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import optax

from bgn_jax import equinox as beqx

key_model, key_mlp, key_data = jax.random.split(jax.random.key(0), 3)
x = jax.random.normal(key_data, (16, 8))
y = jnp.sin(x.sum(axis=1, keepdims=True))

# 1. BGN layers written into a model.
k1, k2 = jax.random.split(key_model)
model = eqx.nn.Sequential(
  [
    eqx.nn.Linear(8, 32, key=k1),
    beqx.BGN(),
    eqx.nn.Lambda(jnp.tanh),
    eqx.nn.Linear(32, 1, key=k2),
  ]
)
print("hand-written model output:", jax.vmap(model)(x).shape)

# 2. The same nodes inserted into an existing eqx.nn.MLP, after every Linear.
mlp = eqx.nn.MLP(8, 1, 32, 3, activation=jnp.tanh, key=key_mlp)
inserted = beqx.insert(mlp, where=eqx.nn.Linear)
print(beqx.placements(inserted, x[0]))
# The parameters are the MLP's own arrays: checkpoints of one load into the other.
assert all(
  a is b
  for a, b in zip(
    jax.tree.leaves(eqx.filter(mlp, eqx.is_array)),
    jax.tree.leaves(eqx.filter(inserted, eqx.is_array)),
    strict=True,
  )
)


def loss_fn(model, x, y):
  return jnp.mean((jax.vmap(model)(x) - y) ** 2)


# 3. Gradient norms at each Linear's output and parameters (over the whole batch).
# "output" is dL/d(the Linear's output), here the gradient its node normalized;
# "at_bgn" is the raw gradient that arrived at the node from the layers above.
for path, norms in beqx.grad_norms(loss_fn, where=eqx.nn.Linear)(inserted, x, y).items():
  print(
    f"{path}: output {float(norms['output']):.3g}, at_bgn {float(norms['at_bgn']):.3g}, "
    f"params {float(norms['params']):.3g}"
  )

# 4. A few optax steps on the inserted model (its optax state is made for it; to
# keep a state made for the plain model, train the plain model and insert inside
# the loss instead: loss_fn(beqx.insert(model, where=eqx.nn.Linear), x, y)).
optimizer = optax.adam(1e-2)
state = optimizer.init(eqx.filter(inserted, eqx.is_array))


@eqx.filter_jit
def step(model, state, x, y):
  loss, grads = eqx.filter_value_and_grad(loss_fn)(model, x, y)
  updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
  return eqx.apply_updates(model, updates), state, loss


losses = []
for _ in range(20):
  inserted, state, loss = step(inserted, state, x, y)
  losses.append(float(loss))
print(f"loss: {losses[0]:.4f} -> {losses[-1]:.4f}")
assert losses[-1] < losses[0]
assert type(inserted.layers[0]).__name__ == "LinearWithBGN"  # the nodes survive training
