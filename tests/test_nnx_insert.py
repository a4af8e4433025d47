"""Tests of bgn_jax.nnx.insert against the same nnx models with bgn_jax.bgn written by hand.

Every model takes ``hand_*`` arguments that place ``bgn`` explicitly where insert is
expected to put it; built from the same seed, the hand model has the same parameters and
must give the same forward values and gradients, bit for bit.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bgn_jax
from bgn_jax import bgn
from tests.trees import assert_trees_differ, assert_trees_equal, inputs

WIDTH = 8


@nnx.jit
def forward_and_grads(model, x):
  """The output, and the parameter gradients of a loss on it (state updates land in model)."""

  def loss(model):
    y = model(x)
    return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y)), y

  grads, y = nnx.grad(loss, has_aux=True)(model)
  return y, grads


class MLP(nnx.Module):
  def __init__(self, depth=4, *, hand_after=(), hand_before=(), hand_output=False, rngs):
    self.layers = nnx.List(
      [
        nnx.Linear(6 if i == 0 else WIDTH, WIDTH, use_bias=i % 2 == 0, rngs=rngs)
        for i in range(depth)
      ]
    )
    self.hand_after = tuple(hand_after)
    self.hand_before = tuple(hand_before)
    self.hand_output = hand_output

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = bgn(x) if i in self.hand_before else x
      x = layer(x)
      x = jnp.tanh(bgn(x) if i in self.hand_after else x)
    return bgn(x) if self.hand_output else x


def check_against_hand(model, reference, x, **insert_args):
  """insert(model) against the hand model; returns the copy."""
  plain_y, plain = forward_and_grads(model, x)
  copy = bgn_jax.nnx.insert(model, **insert_args)
  y, got = forward_and_grads(copy, x)
  _, expected = forward_and_grads(reference, x)
  assert_trees_equal(y, plain_y)
  assert_trees_equal(got, expected)
  assert_trees_differ(got, plain)
  return copy


def test_mlp_copy_shares_variables_and_leaves_the_model_untouched():
  model = MLP(rngs=nnx.Rngs(0))
  before = jax.tree.map(np.asarray, nnx.state(model))
  x = inputs((5, 6))
  copy = check_against_hand(model, MLP(hand_after=range(4), rngs=nnx.Rngs(0)), x, where=nnx.Linear)
  for layer, copied in zip(model.layers, copy.layers, strict=True):
    assert type(layer) is nnx.Linear
    assert type(copied).__name__ == "LinearWithBGN" and isinstance(copied, nnx.Linear)
    assert copied is not layer and copied.kernel is layer.kernel
  assert type(copy) is MLP
  assert_trees_equal(nnx.state(copy), nnx.state(model))
  assert_trees_equal(nnx.state(model), before)
  # The original still computes plain gradients.
  _, plain = forward_and_grads(model, x)
  _, again = forward_and_grads(MLP(rngs=nnx.Rngs(0)), x)
  assert_trees_equal(plain, again)


def test_optimizer_step_through_the_copy_updates_the_model():
  model = MLP(rngs=nnx.Rngs(0))
  copy = bgn_jax.nnx.insert(model, where=nnx.Linear)
  kernel = np.asarray(model.layers[0].kernel[...])
  optimizer = nnx.Optimizer(copy, optax.sgd(0.1), wrt=nnx.Param)
  _, grads = forward_and_grads(copy, inputs((5, 6)))
  optimizer.update(copy, grads)
  np.testing.assert_array_equal(
    model.layers[0].kernel[...], kernel - 0.1 * np.asarray(grads["layers"][0]["kernel"][...])
  )


@pytest.mark.parametrize(
  "where, hand_after",
  [
    (nnx.Linear, (0, 1, 2, 3)),
    ((nnx.Linear, nnx.Conv), (0, 1, 2, 3)),
    (lambda m: isinstance(m, nnx.Linear) and m.bias is None, (1, 3)),
    (r"layers/[02]$", (0, 2)),
    (re.compile(r"^layers/3"), (3,)),
  ],
  ids=["class", "tuple", "predicate", "regex", "compiled-regex"],
)
def test_where_forms(where, hand_after):
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_after=hand_after, rngs=nnx.Rngs(0))
  check_against_hand(model, reference, inputs((5, 6)), where=where)


@pytest.mark.parametrize("every, hand_after", [(2, (0, 2)), (3, (0, 3)), (5, (0,))])
def test_every_keeps_matches_from_the_first(every, hand_after):
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_after=hand_after, rngs=nnx.Rngs(0))
  check_against_hand(model, reference, inputs((5, 6)), where=nnx.Linear, every=every)


def test_position_before_and_options():
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_before=(1, 3), rngs=nnx.Rngs(0))
  check_against_hand(model, reference, inputs((5, 6)), where=r"/[13]$", position="before")
  copy = bgn_jax.nnx.insert(model, where=nnx.Linear, axes=[1], power=0.5)
  assert type(copy.layers[0]).__name__ == "LinearWithBGN"
  _, got = forward_and_grads(copy, inputs((5, 6)))
  hand = HandOptions(rngs=nnx.Rngs(0))
  _, expected = forward_and_grads(hand, inputs((5, 6)))
  assert_trees_equal(got, expected)


class HandOptions(MLP):
  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(bgn(layer(x), axes=(1,), power=0.5))
    return x


def test_top_level_module_is_matchable():
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_output=True, rngs=nnx.Rngs(0))
  copy = check_against_hand(model, reference, inputs((5, 6)), where=r"^$")
  assert type(copy).__name__ == "MLPWithBGN" and isinstance(copy, MLP)


def test_repeated_inserts_reuse_the_subclass():
  model = MLP(rngs=nnx.Rngs(0))
  first = bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.5)
  second = bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.5)
  other = bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.25)
  assert type(first.layers[0]) is type(second.layers[0])
  assert type(first.layers[0]) is not type(other.layers[0])
  assert nnx.graphdef(first) == nnx.graphdef(second)


class Tied(nnx.Module):
  """One Linear stored at two attributes, called twice."""

  def __init__(self, *, hand=False, rngs):
    self.first = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.second = self.first
    self.hand = hand

  def __call__(self, x):
    for layer in (self.first, self.second):
      x = layer(x)
      x = jnp.tanh(bgn(x) if self.hand else x)
    return x


def test_module_at_two_paths_is_one_module():
  model, reference = Tied(rngs=nnx.Rngs(0)), Tied(hand=True, rngs=nnx.Rngs(0))
  copy = check_against_hand(model, reference, inputs((5, WIDTH)), where=nnx.Linear)
  assert copy.first is copy.second
  # It is tested at its first path in graph order only.
  with pytest.raises(ValueError, match="matched no module"):
    bgn_jax.nnx.insert(model, where=r"^second$")


class Block(nnx.Module):
  def __init__(self, *, hand, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.hand = hand

  def __call__(self, x):
    x = self.linear(x)
    return jnp.tanh(bgn(x) if self.hand else x)


class ScanStack(nnx.Module):
  """50 Blocks with stacked parameters (nnx.vmap), run by nnx.scan."""

  def __init__(self, *, hand=False, rngs):
    @nnx.split_rngs(splits=50)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked_blocks(rngs):
      return Block(hand=hand, rngs=rngs)

    self.blocks = stacked_blocks(rngs)

  def __call__(self, x):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(x, block):
      return block(x)

    return body(x, self.blocks)


def test_scan_over_stacked_layers_gets_a_node_in_every_layer():
  model, reference = ScanStack(rngs=nnx.Rngs(0)), ScanStack(hand=True, rngs=nnx.Rngs(0))
  assert model.blocks.linear.kernel.shape == (50, WIDTH, WIDTH)
  check_against_hand(model, reference, inputs((3, WIDTH)), where=r"^blocks/linear$")


class BatchNormNet(nnx.Module):
  def __init__(self, *, hand=False, rngs):
    self.linear_in = nnx.Linear(6, WIDTH, rngs=rngs)
    self.norm = nnx.BatchNorm(WIDTH, rngs=rngs)
    self.linear_out = nnx.Linear(WIDTH, 3, rngs=rngs)
    self.hand = hand

  def __call__(self, x):
    x = self.linear_in(x)
    x = nnx.relu(self.norm(bgn(x) if self.hand else x))
    x = self.linear_out(x)
    return bgn(x) if self.hand else x


def test_batchnorm_in_train_mode_updates_the_model_statistics():
  model, reference = BatchNormNet(rngs=nnx.Rngs(0)), BatchNormNet(hand=True, rngs=nnx.Rngs(0))
  plain = BatchNormNet(rngs=nnx.Rngs(0))
  copy = bgn_jax.nnx.insert(model, where=nnx.Linear)
  assert copy.norm.mean is model.norm.mean
  # Plain attributes are copied: switching the model to eval mode leaves the copy in train.
  model.eval()
  assert model.norm.use_running_average and not copy.norm.use_running_average
  x = inputs((5, 6))
  for step in range(2):
    y, got = forward_and_grads(copy, x + step)
    expected_y, expected = forward_and_grads(reference, x + step)
    plain_y, plain_grads = forward_and_grads(plain, x + step)
    assert_trees_equal(y, plain_y)
    assert_trees_equal(got, expected)
    assert_trees_differ(got, plain_grads)
  statistics = nnx.state(model, nnx.BatchStat)
  assert_trees_equal(statistics, nnx.state(plain, nnx.BatchStat))
  assert_trees_differ(statistics, nnx.state(BatchNormNet(rngs=nnx.Rngs(0)), nnx.BatchStat))


def test_no_match_raises_listing_what_was_seen():
  model = MLP(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="matched no module") as error:
    bgn_jax.nnx.insert(model, where=nnx.Conv)
  message = str(error.value)
  assert "MLP at ''" in message
  for i in range(4):
    assert f"Linear at 'layers/{i}'" in message
  assert "List" not in message  # a container without __call__ is never tested


@pytest.mark.parametrize(
  "arguments, error, message",
  [
    (dict(position="middle"), ValueError, "`position` must be 'after' or 'before'; got 'middle'"),
    (dict(every=0), ValueError, "`every` must be an int >= 1; got 0"),
    (dict(every="2"), TypeError, "`every` must be an int >= 1; got '2'"),
    (dict(powr=0.5), TypeError, "unknown BGN option 'powr'"),
    (dict(power=-0.5), ValueError, "bgn: `power` must lie in [0, 1]; got -0.5"),
    (dict(axes=1.5), TypeError, "bgn: `axes` must be None, an int or a tuple of ints"),
    (dict(where="(unclosed"), ValueError, "is not a valid regular expression"),
    (dict(where=None), TypeError, "`where` must be a Module class"),
  ],
)
def test_bad_arguments(arguments, error, message):
  arguments = {"where": nnx.Linear, **arguments}
  with pytest.raises(error, match=re.escape(message)):
    bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), **arguments)


def test_model_must_be_an_nnx_module():
  with pytest.raises(TypeError, match="`model` must be an nnx.Module; got dict"):
    bgn_jax.nnx.insert({"layer": nnx.Linear(2, 2, rngs=nnx.Rngs(0))}, where=nnx.Linear)
