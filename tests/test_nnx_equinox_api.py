"""nnx and equinox: the per-call check, bridge modules, Rngs arguments, insert order and
transforms, options and threads, each against a reference."""

from __future__ import annotations

import threading

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from flax.nnx import bridge

import bgn_jax
import bgn_jax.equinox as beqx
from bgn_jax import bgn
from tests.reference import inputs

WIDTH = 8


class Heads(nnx.Module):
  """An int-valued module and an unused head: no node is ever placed."""

  def __init__(self, rngs):
    self.body = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.head = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    return self.body(x)


def test_nnx_an_unused_selected_module_still_gets_the_check():
  # bug 1: the check waited for every selected module to be called.
  model = bgn_jax.nnx.insert(Heads(nnx.Rngs(0)), where=r"^head$")
  with pytest.raises(ValueError, match=r"^bgn_jax.nnx.insert: .*none of the modules"):
    model(inputs((2, WIDTH)))
  with pytest.raises(ValueError, match="none of the modules"):
    bgn_jax.nnx.placements(model, inputs((2, WIDTH)))


def test_nnx_insert_on_a_bridge_module():
  # bug 4: the marker was an attribute, which bridge.ToNNX made a linen variable.
  import flax.linen as nn

  model = bridge.ToNNX(nn.Dense(WIDTH), rngs=nnx.Rngs(0))
  x = inputs((2, WIDTH))
  bridge.lazy_init(model, x)
  bgn_jax.nnx.insert(model, where=bridge.ToNNX)
  grads = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)
  plain = bgn_jax.nnx.remove(model)
  hand = nnx.grad(lambda m: jnp.sum(jnp.sin(bgn(m(x)))))(plain)
  chex.assert_trees_all_close(grads, hand)


class Dropping(nnx.Module):
  def __init__(self, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.dropout = nnx.Dropout(0.5)

  def __call__(self, x, rngs):
    return self.dropout(self.linear(x), rngs=rngs)


def test_nnx_rngs_passed_as_an_argument():
  # bug 5: "Cannot mutate RngCount from a different trace level".
  model = bgn_jax.nnx.insert(Dropping(nnx.Rngs(0)), where=nnx.Linear)
  x = inputs((2, WIDTH))
  records = bgn_jax.nnx.placements(model, x, nnx.Rngs(1))
  assert len(records.nodes) == 1
  report = bgn_jax.nnx.grad_norms(lambda m, x, r: jnp.sum(m(x, r)), where=nnx.Linear)(
    model, x, nnx.Rngs(1)
  )
  assert set(report) == {"linear"}


def test_nnx_insert_inside_grad_norms_and_inside_jit():
  # bug 3: insert inside loss_fn gave "not enough values to unpack"; inside nnx.jit, a
  # Flax graph error.
  x = inputs((2, WIDTH))

  def loss(m, x):
    return jnp.sum(jnp.sin(bgn_jax.nnx.insert(m, where=nnx.Linear)(x)))

  # A clear error that says to insert before the transform, for both.
  with pytest.raises(ValueError, match="traced by a transform"):
    bgn_jax.nnx.grad_norms(loss, where=nnx.Linear)(nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0)), x)
  with pytest.raises(ValueError, match="traced by a transform"):
    nnx.jit(lambda m: bgn_jax.nnx.insert(m, where=nnx.Linear)(x))(
      nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0))
    )


def test_nnx_split_after_insert_trains_with_the_nodes():
  # bug 11: the order that works (insert, then split / cached_partial).
  model = bgn_jax.nnx.insert(nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0)), where=nnx.Linear)
  graphdef, state = nnx.split(model)
  x = inputs((2, WIDTH))

  def loss(state):
    return jnp.sum(jnp.sin(nnx.merge(graphdef, state)(x)))

  plain = nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0))
  hand = nnx.grad(lambda m: jnp.sum(jnp.sin(bgn(m(x)))))(plain)
  chex.assert_trees_all_close(jax.grad(loss)(state), nnx.state(hand))


def test_nnx_cached_partial_after_insert_trains_with_the_nodes():
  # docs/insert.md: the order that works with nnx.cached_partial is insert, then cache.
  model = bgn_jax.nnx.insert(nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0)), where=nnx.Linear)
  x = inputs((2, WIDTH))

  @nnx.jit(graph=True, graph_updates=True)
  def step(model, x):
    return nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(model)

  with nnx.set_graph_mode(True), nnx.set_graph_updates(True):
    cached = nnx.cached_partial(step, model)
  plain = nnx.Linear(WIDTH, WIDTH, rngs=nnx.Rngs(0))
  hand = nnx.grad(lambda m: jnp.sum(jnp.sin(bgn(m(x)))))(plain)
  without = nnx.grad(lambda m: jnp.sum(jnp.sin(m(x))))(plain)
  got = cached(x)
  chex.assert_trees_all_close(got, hand)
  assert not np.allclose(got["kernel"][...], without["kernel"][...])


def test_nnx_bgn_options_are_positional_like_linen_and_equinox():
  assert bgn_jax.nnx.BGN(-1, 2.0).target_norm == 2.0


class MLP(eqx.Module):
  layers: list

  def __init__(self, key):
    keys = jax.random.split(key, 2)
    self.layers = [eqx.nn.Linear(WIDTH, WIDTH, key=k) for k in keys]

  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(layer(x))
    return x


def test_equinox_placements_records_only_its_own_thread():
  # bug 2: a module-level listener list heard nodes traced by another thread.
  model = beqx.insert(MLP(jax.random.key(0)), where=eqx.nn.Linear)
  x = inputs((WIDTH,))
  stop = threading.Event()

  def other():
    while not stop.is_set():
      jax.eval_shape(model, x)

  thread = threading.Thread(target=other)
  thread.start()
  try:
    for _ in range(20):
      assert len(beqx.placements(model, x)) == 2
  finally:
    stop.set()
    thread.join()


def test_equinox_axes_default_target_is_each_groups():
  # bug 9: with axes=-1 each token group got the whole example's sqrt(T*D).
  x = inputs((4, WIDTH))  # one example: 4 tokens of WIDTH
  linear = eqx.nn.Linear(WIDTH, WIDTH, key=jax.random.key(0))
  model = beqx.insert(jax.vmap(linear), where=lambda m: True) if False else None
  del model

  class Tokens(eqx.Module):
    linear: eqx.nn.Linear

    def __call__(self, x):
      return jax.vmap(self.linear)(x)

  inserted = beqx.insert(Tokens(linear), where=Tokens, axes=-1)
  g = jax.grad(lambda x: jnp.sum(jnp.sin(3.0 * inserted(x))))(x)
  hand = jax.grad(lambda x: jnp.sum(jnp.sin(3.0 * bgn(Tokens(linear)(x), axes=-1))))(x)
  chex.assert_trees_all_close(g, hand, rtol=1e-5)


def test_equinox_an_unused_selected_module_still_gets_the_check():
  class Heads(eqx.Module):
    body: eqx.nn.Linear
    head: eqx.nn.Linear

    def __call__(self, x):
      return self.body(x)

    def __init__(self, key):
      self.body = eqx.nn.Linear(WIDTH, WIDTH, key=key)
      self.head = eqx.nn.Linear(WIDTH, WIDTH, key=key)

  model = beqx.insert(Heads(jax.random.key(0)), where=r"^head$")
  with pytest.raises(
    ValueError, match=r"^bgn_jax.equinox.insert: .*none of the modules .* ran in the call"
  ):
    model(inputs((WIDTH,)))


class FedToALayer(eqx.Module):
  """A Linear whose output goes straight into a BGN layer."""

  linear: eqx.nn.Linear

  def __call__(self, x):
    return beqx.BGN(target_norm=2.0)(self.linear(x))


def test_equinox_a_node_before_a_module_keeps_its_at_bgn_from_a_layer_on_the_output():
  # One at_bgn per call, as in nnx and linen: a node on the inputs takes it, and a BGN
  # layer fed the output does not add its own gradient into it.
  model = FedToALayer(eqx.nn.Linear(WIDTH, WIDTH, key=jax.random.key(0)))
  x = inputs((3, WIDTH))
  inserted = beqx.insert(model, where=eqx.nn.Linear, position="before", target_norm=1.0)

  def loss(m, x):
    return jnp.sum(jnp.sin(3.0 * jax.vmap(m)(x)))

  report = beqx.grad_norms(loss, where=eqx.nn.Linear)(inserted, x)

  def by_hand(p):  # p is added where the node before the Linear hands on its output
    def one(xi, pi):
      return bgn(model.linear(bgn(xi, target_norm=1.0) + pi), target_norm=2.0)

    return jnp.sum(jnp.sin(3.0 * jax.vmap(one)(x, p)))

  expected = jnp.linalg.norm(jax.grad(by_hand)(jnp.zeros_like(x)))
  np.testing.assert_allclose(report["linear"]["at_bgn"], expected, rtol=1e-5)


class TwoOutputs(eqx.Module):
  linear: eqx.nn.Linear

  def __call__(self, x):
    y = self.linear(x)
    return y, y.astype(jnp.complex64)


class UsesBoth(eqx.Module):
  two: TwoOutputs

  def __call__(self, x):
    y, z = self.two(x)
    return jnp.sum(jnp.sin(y)) + jnp.sum(jnp.abs(z) ** 2)


def test_equinox_grad_norms_measures_the_floating_point_leaves_of_an_output():
  # As in linen and nnx. A complex leaf (l2_norm refuses complex) once made it raise.
  model = UsesBoth(TwoOutputs(eqx.nn.Linear(WIDTH, WIDTH, key=jax.random.key(0))))
  x = inputs((WIDTH,))
  report = beqx.grad_norms(lambda m, x: m(x), where=TwoOutputs)(model, x)
  expected = np.linalg.norm(np.cos(np.asarray(model.two.linear(x), np.float64)))
  np.testing.assert_allclose(report["two"]["output"], expected, rtol=1e-5)
