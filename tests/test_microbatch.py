"""microbatch_grad against one full-batch backward pass (the reference: jax.grad over the
whole batch, whose nodes are tested against NumPy in test_core), for nodes placed by
hand and by each framework's insert; and the placements it must refuse."""

from __future__ import annotations

import functools

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bgn_jax
from bgn_jax import microbatch_grad, microbatch_value_and_grad

BATCH, WIDTH, DEPTH = 8, 16, 5


def draws(*shape, seed=0, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape) * scale, jnp.float32)


PARAMS = [draws(WIDTH, WIDTH, seed=i, scale=WIDTH**-0.5) for i in range(DEPTH)]
BATCH_XY = (draws(BATCH, WIDTH, seed=10), draws(BATCH, WIDTH, seed=11))


def stack_loss(options, *, residual=False, on_branch=False, scale=1.0):
  """A tanh stack with a node after every layer (or, with on_branch, on each residual
  branch: no sequential cut)."""

  def loss(params, batch):
    x, y = batch
    h = x
    for w in params:
      u = jnp.tanh(h @ (w * scale))
      if on_branch:
        u = bgn_jax.bgn(u, **options)
      h = h + u if residual else u
      if not on_branch:
        h = bgn_jax.bgn(h, **options)
    return jnp.mean((h - y) ** 2)

  return loss


def assert_close(got, want, rtol=1e-5):
  # Relative to the largest entry of each leaf, and of all leaves together: entries near
  # zero (a gradient that cancels to rounding noise) carry rounding only.
  largest = max(float(jnp.max(jnp.abs(w))) for w in jax.tree.leaves(want))
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
    atol = rtol * (float(jnp.max(jnp.abs(w))) + largest)
    chex.assert_trees_all_close(g, w, atol=atol, rtol=0)


OPTIONS = {
  "whole": {},
  "whole_size": {"target_norm": "sqrt_size"},
  "whole_float_power": {"target_norm": 3.0, "power": 0.5},
  "whole_floor": {"eps": 10.0},  # a floor above every norm here: the floored branch
  "per_example": {"axes": (1,)},
  "per_example_size": {"axes": (1,), "target_norm": "sqrt_size"},
}


@pytest.mark.parametrize(
  ("options", "residual"),
  [(options, True) for options in OPTIONS.values()] + [({}, False), ({"axes": (1,)}, False)],
  ids=[f"{name}-residual" for name in OPTIONS] + ["whole-chain", "per_example-chain"],
)
def test_equals_the_full_batch_gradient(options, residual):
  loss = stack_loss(options, residual=residual)
  want = jax.grad(loss)(PARAMS, BATCH_XY)
  assert_close(jax.jit(microbatch_grad(loss, microbatches=4))(PARAMS, BATCH_XY), want)


@pytest.mark.parametrize(
  ("options", "microbatches"),
  [({}, 1), ({}, 2), ({"axes": (1,)}, 8)],
  ids=["1", "2", "8_per_example"],
)
def test_equals_the_full_batch_gradient_eagerly(options, microbatches):
  loss = stack_loss(options, residual=True)
  want = jax.grad(loss)(PARAMS, BATCH_XY)
  assert_close(microbatch_grad(loss, microbatches=microbatches)(PARAMS, BATCH_XY), want)


@pytest.mark.parametrize("options", [{}, {"axes": (1,)}], ids=["whole", "per_example"])
def test_summing_microbatch_gradients_differs_from_the_full_batch(options):
  # What optax.MultiSteps or a hand-written accumulation computes: the gap the passes close.
  loss = stack_loss(options)
  want = jax.grad(loss)(PARAMS, BATCH_XY)
  halves = [jax.tree.map(lambda a, i=i: a[i * 4 : (i + 1) * 4], BATCH_XY) for i in range(2)]
  summed = jax.tree.map(lambda *g: sum(g) / 2, *[jax.grad(loss)(PARAMS, h) for h in halves])
  last = jnp.linalg.norm(summed[0]) / jnp.linalg.norm(want[0])
  # Below the deepest node: 1/sqrt(2) whole batch (norms add in squares), 1/2 per example.
  np.testing.assert_allclose(last, 0.5**0.5 if not options else 0.5, rtol=0.05)


def test_optax_multisteps_is_not_the_full_batch_gradient():
  loss = stack_loss({})
  opt = optax.MultiSteps(optax.sgd(1.0), every_k_schedule=2)
  state = opt.init(PARAMS)
  for i in range(2):
    half = jax.tree.map(lambda a, i=i: a[i * 4 : (i + 1) * 4], BATCH_XY)
    updates, state = opt.update(jax.grad(loss)(PARAMS, half), state, PARAMS)
  want = jax.grad(loss)(PARAMS, BATCH_XY)
  with pytest.raises(AssertionError):
    assert_close(jax.tree.map(jnp.negative, updates), want, rtol=1e-2)
  assert_close(microbatch_grad(loss, microbatches=2)(PARAMS, BATCH_XY), want)


def test_a_vanishing_cotangent_is_measured_in_range():
  # 16 layers tanh(h @ (0.005 w) + 1): the forward signal stays near tanh(1), the plain
  # cotangent falls below float32's smallest number on the way down; the measuring pass
  # keeps it in range with one power of two per node.
  def loss(params, batch, power=1.0):
    x, y = batch
    h = x
    for w in params:
      h = bgn_jax.bgn(jnp.tanh(h @ (0.005 * w) + 1.0), power=power)
    return jnp.mean((h - y) ** 2)

  params = (PARAMS * 4)[:16]
  plain = jax.jit(jax.grad(functools.partial(loss, power=0.0)))(params, BATCH_XY)
  assert float(jnp.max(jnp.abs(plain[0]))) == 0.0  # underflowed without nodes
  want = jax.jit(jax.grad(loss))(params, BATCH_XY)
  assert float(jnp.min(jnp.array([jnp.max(jnp.abs(g)) for g in want]))) > 1e-3
  assert_close(jax.jit(microbatch_grad(loss, microbatches=2))(params, BATCH_XY), want)


def test_value_aux_and_argnums():
  def loss(scale, batch, params):
    value = stack_loss({})(jax.tree.map(lambda w: w * scale, params), batch)
    return value, {"value": value}

  value_and_grad = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)
  (want_value, _), want = value_and_grad(1.5, BATCH_XY, PARAMS)
  mb = microbatch_value_and_grad(loss, microbatches=2, argnums=(0, 2), has_aux=True)
  (value, aux), got = jax.jit(mb)(1.5, BATCH_XY, PARAMS)
  np.testing.assert_allclose(value, want_value, rtol=1e-6)
  assert aux["value"].shape == (2,)  # stacked over microbatches
  np.testing.assert_allclose(jnp.mean(aux["value"]), want_value, rtol=1e-6)
  assert_close(got, want)
  grads, aux = microbatch_grad(loss, microbatches=2, argnums=(0, 2), has_aux=True)(
    1.5, BATCH_XY, PARAMS
  )
  assert_close(grads, want)


def low_precision(tree, dtype):
  return jax.tree.map(lambda a: a.astype(dtype), tree)


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "jit"])
def test_a_low_precision_cut_is_accepted(jit, dtype=jnp.bfloat16):
  # Its two passes round a cotangent differently, by more than float32 would: the
  # check allows for the dtype's rounding.
  loss = stack_loss({})
  params, batch = low_precision(PARAMS, dtype), (low_precision(BATCH_XY[0], dtype), BATCH_XY[1])
  want = jax.grad(loss)(params, batch)
  grad = microbatch_grad(loss, microbatches=4)
  got = (jax.jit(grad) if jit else grad)(params, batch)
  assert_close(low_precision(got, jnp.float32), low_precision(want, jnp.float32), rtol=5e-2)


@pytest.mark.parametrize(
  ("jit", "dtype"), [(False, jnp.float32), (True, jnp.float32), (False, jnp.bfloat16)]
)
def test_nodes_that_form_no_sequential_cut_are_refused(jit, dtype):
  # A node on each residual branch: the stream carries a path around every node.
  grad = microbatch_grad(stack_loss({}, residual=True, on_branch=True), microbatches=2)
  error = ValueError if not jit else Exception
  params, batch = low_precision(PARAMS, dtype), (low_precision(BATCH_XY[0], dtype), BATCH_XY[1])
  with pytest.raises(error, match="do not form a sequential cut"):
    jax.block_until_ready((jax.jit(grad) if jit else grad)(params, batch))


def test_a_whole_batch_node_inside_a_scan_is_refused():
  def loss(params, batch):
    x, y = batch

    def layer(h, w):
      return bgn_jax.bgn(jnp.tanh(h @ w)), None

    h, _ = jax.lax.scan(layer, x, jnp.stack(params))
    return jnp.mean((h - y) ** 2)

  with pytest.raises(ValueError, match="inside a lax.scan or while loop"):
    microbatch_grad(loss, microbatches=2)(PARAMS, BATCH_XY)


def test_per_example_nodes_inside_a_scan_are_exact():
  def loss(params, batch):
    x, y = batch

    def layer(h, w):
      return bgn_jax.bgn(jnp.tanh(h @ w), axes=1), None

    h, _ = jax.lax.scan(layer, x, jnp.stack(params))
    return jnp.mean((h - y) ** 2)

  assert_close(
    microbatch_grad(loss, microbatches=2)(PARAMS, BATCH_XY), jax.grad(loss)(PARAMS, BATCH_XY)
  )


@pytest.mark.parametrize(
  ("kwargs", "args", "error", "message"),
  [
    ({"microbatches": 3}, None, ValueError, "does not split into microbatches=3"),
    ({"microbatches": 0}, None, ValueError, "`microbatches` must be an int >= 1; got 0"),
    ({"microbatches": 2.0}, None, TypeError, "`microbatches` must be an int >= 1; got 2.0"),
    ({"microbatches": 2, "argnums": 1}, None, ValueError, "`argnums` includes 1, the batch"),
    ({"microbatches": 2, "argnums": "0"}, None, TypeError, "`argnums` must be an int"),
    ({"microbatches": 2}, "mismatched", ValueError, "same leading batch axis"),
    ({"microbatches": 2}, "no_batch_axis", ValueError, "whose leading axis is not"),
  ],
)
def test_bad_calls_are_refused(kwargs, args, error, message):
  def transposed_loss(params, batch):
    x, y = batch
    return jnp.mean(bgn_jax.bgn(x.T @ x) * params[0])  # (WIDTH, WIDTH): no batch axis

  loss, batch = stack_loss({}), BATCH_XY
  if args == "mismatched":
    batch = (BATCH_XY[0], BATCH_XY[1][:4])
  if args == "no_batch_axis":
    loss = transposed_loss
  with pytest.raises(error, match=message):
    microbatch_grad(loss, **kwargs)(PARAMS, batch)


# ---------------------------------------------------------------- the three frameworks
# A residual stack with attention, written three times: each block returns the stream
# (x + attention, then + MLP), so a node after every block sits on the stream.
SEQ, DIM, BLOCKS = 4, 8, 2
TOKENS = (draws(BATCH, SEQ, DIM, seed=20), draws(BATCH, SEQ, DIM, seed=21))


def attend(q, k, v):
  weights = jax.nn.softmax(q @ jnp.swapaxes(k, -1, -2) / DIM**0.5, axis=-1)
  return weights @ v


class LinenBlock(nn.Module):
  @nn.compact
  def __call__(self, x):
    h = nn.LayerNorm()(x)
    x = x + nn.Dense(DIM)(attend(nn.Dense(DIM)(h), nn.Dense(DIM)(h), nn.Dense(DIM)(h)))
    return x + nn.Dense(DIM)(nn.gelu(nn.Dense(2 * DIM)(nn.LayerNorm()(x))))


class LinenStack(nn.Module):
  @nn.compact
  def __call__(self, x):
    for _ in range(BLOCKS):
      x = LinenBlock()(x)
    return x


class NnxBlock(nnx.Module):
  def __init__(self, rngs):
    self.ln1, self.ln2 = nnx.LayerNorm(DIM, rngs=rngs), nnx.LayerNorm(DIM, rngs=rngs)
    self.q, self.k, self.v, self.o = (nnx.Linear(DIM, DIM, rngs=rngs) for _ in range(4))
    self.up, self.down = nnx.Linear(DIM, 2 * DIM, rngs=rngs), nnx.Linear(2 * DIM, DIM, rngs=rngs)

  def __call__(self, x):
    h = self.ln1(x)
    x = x + self.o(attend(self.q(h), self.k(h), self.v(h)))
    return x + self.down(nnx.gelu(self.up(self.ln2(x))))


class NnxStack(nnx.Module):
  def __init__(self, rngs):
    self.blocks = nnx.List([NnxBlock(rngs) for _ in range(BLOCKS)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


class EqxBlock(eqx.Module):
  ln1: eqx.nn.LayerNorm
  ln2: eqx.nn.LayerNorm
  qkvo: tuple[eqx.nn.Linear, ...]
  up: eqx.nn.Linear
  down: eqx.nn.Linear

  def __init__(self, key):
    keys = jax.random.split(key, 6)
    self.ln1, self.ln2 = eqx.nn.LayerNorm(DIM), eqx.nn.LayerNorm(DIM)
    self.qkvo = tuple(eqx.nn.Linear(DIM, DIM, key=k) for k in keys[:4])
    self.up, self.down = (
      eqx.nn.Linear(DIM, 2 * DIM, key=keys[4]),
      eqx.nn.Linear(2 * DIM, DIM, key=keys[5]),
    )

  def __call__(self, x):  # one example, (SEQ, DIM)
    q, k, v, o = (jax.vmap(layer) for layer in self.qkvo)
    h = jax.vmap(self.ln1)(x)
    x = x + o(attend(q(h), k(h), v(h)))
    return x + jax.vmap(self.down)(jax.nn.gelu(jax.vmap(self.up)(jax.vmap(self.ln2)(x))))


class EqxStack(eqx.Module):
  blocks: tuple[EqxBlock, ...]

  def __init__(self, key):
    self.blocks = tuple(EqxBlock(k) for k in jax.random.split(key, BLOCKS))

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def mse(out, y):
  return jnp.mean((out - y) ** 2)


def linen_case(options):
  model = LinenStack()
  variables = model.init(jax.random.key(0), TOKENS[0])
  apply = bgn_jax.linen.insert(model.apply, where=LinenBlock, **options)
  return variables, lambda v, batch: mse(apply(v, batch[0]), batch[1])


def nnx_case(options):
  model = bgn_jax.nnx.insert(NnxStack(nnx.Rngs(0)), where=NnxBlock, **options)
  graphdef, state = nnx.split(model)
  return state, lambda s, batch: mse(nnx.merge(graphdef, s)(batch[0]), batch[1])


def eqx_case(options):
  if "axes" not in options:  # whole batch: the vmapped batch axis named
    options = {"axis_name": "batch", **options}
  model = bgn_jax.equinox.insert(EqxStack(jax.random.key(0)), where=EqxBlock, **options)
  params, static = eqx.partition(model, eqx.is_inexact_array)

  def loss(p, batch):
    out = jax.vmap(eqx.combine(p, static), axis_name="batch")(batch[0])
    return mse(out, batch[1])

  return params, loss


FRAMEWORK_OPTIONS = {"whole": {}, "per_example": {"axes": (-2, -1)}}
MLP_INPUTS = (draws(BATCH, WIDTH, seed=30), draws(BATCH, WIDTH, seed=31))


def linen_mlp_case(options):
  model = nn.Sequential([nn.Dense(WIDTH), nn.tanh, nn.Dense(WIDTH), nn.tanh, nn.Dense(WIDTH)])
  variables = model.init(jax.random.key(0), MLP_INPUTS[0])
  apply = bgn_jax.linen.insert(model.apply, where=nn.Dense, **options)
  return variables, lambda v, batch: mse(apply(v, batch[0]), batch[1])


def nnx_mlp_case(options):
  rngs = nnx.Rngs(0)
  layers = [nnx.Linear(WIDTH, WIDTH, rngs=rngs) for _ in range(3)]
  model = bgn_jax.nnx.insert(nnx.Sequential(*layers), where=nnx.Linear, **options)
  graphdef, state = nnx.split(model)
  return state, lambda s, batch: mse(nnx.merge(graphdef, s)(batch[0]), batch[1])


def eqx_mlp_case(options):
  if "axes" not in options:
    options = {"axis_name": "batch", **options}
  model = eqx.nn.MLP(WIDTH, WIDTH, WIDTH, depth=3, activation=jnp.tanh, key=jax.random.key(0))
  model = bgn_jax.equinox.insert(model, where=eqx.nn.Linear, **options)
  params, static = eqx.partition(model, eqx.is_inexact_array)
  return params, lambda p, batch: mse(
    jax.vmap(eqx.combine(p, static), axis_name="batch")(batch[0]), batch[1]
  )


@pytest.mark.parametrize(
  "case", [linen_mlp_case, nnx_mlp_case, eqx_mlp_case], ids=["linen", "nnx", "equinox"]
)
@pytest.mark.parametrize("options", [{}, {"axes": -1}], ids=["whole", "per_example"])
def test_an_mlp_through_insert_equals_the_full_batch(case, options):
  params, loss = case(options)
  want = jax.jit(jax.grad(loss))(params, MLP_INPUTS)
  assert_close(jax.jit(microbatch_grad(loss, microbatches=4))(params, MLP_INPUTS), want)


@pytest.mark.parametrize("case", [linen_case, nnx_case, eqx_case], ids=["linen", "nnx", "equinox"])
@pytest.mark.parametrize("options", FRAMEWORK_OPTIONS.values(), ids=FRAMEWORK_OPTIONS.keys())
def test_a_residual_stack_through_insert_equals_the_full_batch(case, options):
  if case is not eqx_case and "axes" in options:
    options = {"axes": (1, 2)}  # per example on (batch, tokens, features)
  params, loss = case(options)
  grad = jax.jit(jax.grad(loss))
  want = grad(params, TOKENS)
  got = jax.jit(microbatch_grad(loss, microbatches=2))(params, TOKENS)
  assert_close(got, want)
  if case is not linen_case:
    return
  # and the gap it closes, shown once (test_frameworks.py compares every framework's
  # nodes with hand-placed ones)
  halves = [jax.tree.map(lambda a, i=i: a[i * 4 : (i + 1) * 4], TOKENS) for i in range(2)]
  naive = jax.tree.map(lambda a, b: (a + b) / 2, *[grad(params, half) for half in halves])
  with pytest.raises(AssertionError):
    assert_close(naive, want, rtol=1e-2)
