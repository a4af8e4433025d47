"""Train a Flax model with BGN on every device of a GPU or TPU slice: the loop to copy.

Data parallel: one ``jax.sharding.Mesh`` over all devices, each batch split along it
with a ``NamedSharding``, the parameters and optimizer state replicated. ``jax.jit``
compiles the whole step from those shardings (the gradient all-reduce included), and
the BGN nodes that ``bgn_jax.insert`` adds see the global batch, so the run gives the
same losses on 1 device or 8. Checkpoints are saved with orbax; run the script again
with the same ``--checkpoint-dir`` and it continues from the latest one, exactly.

Run: python examples/train_sharded.py --checkpoint-dir /tmp/bgn-sharded
On several hosts (a TPU pod, SLURM, Open MPI), run the same command on each with
``--distributed``.
"""

from __future__ import annotations

import argparse
import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import orbax.checkpoint as ocp
from jax.sharding import Mesh, NamedSharding, PartitionSpec

import bgn_jax

FEATURES, CLASSES = 16, 4


class MLP(nn.Module):
  """A ReLU MLP; its hidden layers are named so that ``where`` can select them."""

  depth: int = 6
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.depth):
      x = nn.relu(nn.Dense(self.width, name=f"hidden_{i}")(x))
    return nn.Dense(CLASSES, name="head")(x)


def global_batch(step: int, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """The batch of ``step``: a function of the step alone, so a restored run sees the same data."""
  rng = np.random.default_rng(step)
  x = rng.standard_normal((batch_size, FEATURES)).astype(np.float32)
  teacher = np.random.default_rng(-1 % 2**32).standard_normal((FEATURES, CLASSES))
  return x, np.argmax(x @ teacher, axis=1).astype(np.int32)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=100, help="train until this step")
  parser.add_argument("--batch-size", type=int, default=64, help="global, over all devices")
  parser.add_argument("--lr", type=float, default=1e-2)
  parser.add_argument("--checkpoint-dir", help="save here, and continue from the latest save")
  parser.add_argument("--save-every", type=int, default=10, help="steps between checkpoints")
  parser.add_argument("--distributed", action="store_true", help="multi-host: call initialize()")
  args = parser.parse_args()
  if args.distributed:
    jax.distributed.initialize()  # Finds the coordinator on TPU pods, SLURM and Open MPI.

  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  if args.batch_size % mesh.size:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of {mesh.size} devices")

  model = MLP()
  # BGN after each hidden layer; the parameters and the forward pass stay the model's.
  apply_fn = bgn_jax.insert(model.apply, where=r"^hidden_\d+$")
  optimizer = optax.adam(args.lr)

  @functools.partial(jax.jit, out_shardings=replicated)
  def init_state(key: jax.Array) -> dict:
    params = model.init(key, jnp.zeros((1, FEATURES)))["params"]
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}

  # donate_argnums: the new state reuses the old one's buffers (no second copy in memory).
  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(replicated, replicated))
  def train_step(state: dict, x: jax.Array, labels: jax.Array) -> tuple[dict, jax.Array]:
    def loss_fn(params):
      logits = apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  state = init_state(jax.random.key(0))
  manager = None
  if args.checkpoint_dir:
    manager = ocp.CheckpointManager(
      os.path.abspath(args.checkpoint_dir),
      options=ocp.CheckpointManagerOptions(save_interval_steps=args.save_every, max_to_keep=2),
    )
    if manager.latest_step() is not None:
      # The abstract state tells orbax each array's shape, dtype and sharding.
      abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, state)
      state = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore(abstract))
      print(f"restored step {int(state['step'])} from {args.checkpoint_dir}")

  # Each process puts only its own slice of the global batch onto its own devices.
  per_process = args.batch_size // jax.process_count()
  local = slice(jax.process_index() * per_process, (jax.process_index() + 1) * per_process)
  for step in range(int(state["step"]) + 1, args.steps + 1):
    x, labels = (
      jax.make_array_from_process_local_data(batch_sharding, part[local])
      for part in global_batch(step, args.batch_size)
    )
    state, loss = train_step(state, x, labels)
    if jax.process_index() == 0:
      print(f"step {step} loss {float(loss):.9g}")  # 9 digits: a float32 exactly.
    if manager is not None:
      manager.save(step, args=ocp.args.StandardSave(state), force=step == args.steps)
  if manager is not None:
    manager.wait_until_finished()
    manager.close()


if __name__ == "__main__":
  main()
