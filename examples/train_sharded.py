"""Train a Flax model with BGN on every device of a GPU or TPU slice: the loop to copy.

One ``jax.sharding.Mesh`` over all devices with a ``data`` and a ``model`` axis
(``--mesh data=4,model=2``; by default every device on ``data``). Each batch is split
along ``data``. The parameters are laid out by Flax's logical partitioning: each hidden
kernel's output features on ``model`` (tensor parallelism; the activations' features
follow), and with ``--fsdp`` its input features on ``data`` as well (fully sharded data
parallel: each device keeps a slice of every kernel and of its optimizer state).
``jax.jit`` compiles the whole step from those shardings, collectives included, and the
BGN nodes that ``bgn_jax.insert`` adds see the global arrays, so every layout gives the
losses of 1 device. Checkpoints are saved with orbax; run the script again with the
same ``--checkpoint-dir`` and it continues from the latest one, exactly.

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
  """A ReLU MLP; its hidden layers are named so that ``where`` can select them, and their
  kernels' axes are given logical names that the mesh rules map to mesh axes."""

  depth: int = 6
  width: int = 32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel_init = nn.with_logical_partitioning(nn.linear.default_kernel_init, ("in", "hidden"))
    for i in range(self.depth):
      x = nn.Dense(self.width, kernel_init=kernel_init, name=f"hidden_{i}")(x)
      x = nn.with_logical_constraint(nn.relu(x), ("batch", "hidden"))
    return nn.Dense(CLASSES, name="head")(x)


def parse_mesh(text: str) -> dict[str, int]:
  """``data=4,model=2`` -> {"data": 4, "model": 2}; -1 takes the remaining devices."""
  sizes = {"data": -1, "model": 1}
  for part in filter(None, text.split(",")):
    name, _, size = part.partition("=")
    if name not in sizes or not size.lstrip("-").isdigit():
      raise ValueError(f"--mesh: expected data=N,model=M; got {text!r}")
    sizes[name] = int(size)
  if sizes["data"] == -1:
    sizes["data"] = jax.device_count() // sizes["model"]
  if sizes["data"] * sizes["model"] != jax.device_count():
    raise ValueError(
      f"--mesh {text!r} holds {sizes['data'] * sizes['model']} devices; there are "
      f"{jax.device_count()}."
    )
  return sizes


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
  parser.add_argument("--mesh", default="data=-1", help="data=N,model=M (-1: all the rest)")
  parser.add_argument("--fsdp", action="store_true", help="shard kernels over data as well")
  args = parser.parse_args()
  if args.distributed:
    jax.distributed.initialize()  # Finds the coordinator on TPU pods, SLURM and Open MPI.

  sizes = parse_mesh(args.mesh)
  devices = np.asarray(jax.devices()).reshape(sizes["data"], sizes["model"])
  mesh = Mesh(devices, ("data", "model"))
  # Logical axis name -> mesh axis: the batch on data, hidden features on model (tensor
  # parallel), a kernel's input features on data under --fsdp.
  rules = (("batch", "data"), ("hidden", "model"), ("in", "data" if args.fsdp else None))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  replicated = NamedSharding(mesh, PartitionSpec())
  if args.batch_size % sizes["data"]:
    parser.error(f"--batch-size {args.batch_size} must be a multiple of data={sizes['data']}")

  model = MLP()
  # BGN after each hidden layer; the parameters and the forward pass stay the model's.
  apply_fn = bgn_jax.insert(model.apply, where=r"^hidden_\d+$")
  optimizer = optax.adam(args.lr)

  def boxed_state(key: jax.Array) -> dict:
    params = model.init(key, jnp.zeros((1, FEATURES)))["params"]
    return {"params": params, "opt_state": optimizer.init(params), "step": jnp.int32(0)}

  # Every array's sharding, from the logical names its box carries (the optimizer's
  # moments inherit their parameter's); arrays without names are replicated.
  with nn.logical_axis_rules(rules):
    specs = nn.get_partition_spec(jax.eval_shape(boxed_state, jax.random.key(0)))
  state_sharding = nn.logical_to_mesh_sharding(specs, mesh, rules)

  @functools.partial(jax.jit, out_shardings=state_sharding)
  def init_state(key: jax.Array) -> dict:
    return nn.unbox(boxed_state(key))

  # donate_argnums: the new state reuses the old one's buffers (no second copy in memory).
  @functools.partial(jax.jit, donate_argnums=0, out_shardings=(state_sharding, replicated))
  def train_step(state: dict, x: jax.Array, labels: jax.Array) -> tuple[dict, jax.Array]:
    def loss_fn(params):
      with nn.logical_axis_rules(rules):
        logits = apply_fn({"params": params}, x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

    loss, grads = jax.value_and_grad(loss_fn)(state["params"])
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    return {"params": params, "opt_state": opt_state, "step": state["step"] + 1}, loss

  state = init_state(jax.random.key(0))
  if jax.process_index() == 0:
    kernel = state["params"]["hidden_0"]["kernel"]
    print(f"mesh {dict(mesh.shape)}, hidden kernel {kernel.sharding.spec}")
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
