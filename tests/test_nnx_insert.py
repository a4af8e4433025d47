"""Tests of bgn_jax.nnx.insert against the same nnx models with bgn_jax.bgn written by hand.

Every model takes ``hand_*`` arguments that place ``bgn`` explicitly where insert is
expected to put it; built from the same seed, the hand model has the same parameters and
must give the same forward values and gradients, bit for bit.
"""

from __future__ import annotations

import gc
import re
import types

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
  """insert(model) in place against the hand model; returns the model."""
  plain_y, plain = forward_and_grads(model, x)
  inserted = bgn_jax.nnx.insert(model, **insert_args)
  assert inserted is model
  y, got = forward_and_grads(model, x)
  _, expected = forward_and_grads(reference, x)
  assert_trees_equal(y, plain_y)
  assert_trees_equal(got, expected)
  assert_trees_differ(got, plain)
  return model


def test_insert_edits_the_model_in_place_and_remove_undoes_it():
  model = MLP(rngs=nnx.Rngs(0))
  layers = list(model.layers)
  kernels = [layer.kernel for layer in layers]
  before = jax.tree.map(np.asarray, nnx.state(model))
  x = inputs((5, 6))
  check_against_hand(model, MLP(hand_after=range(4), rngs=nnx.Rngs(0)), x, where=nnx.Linear)
  for layer, original, kernel in zip(model.layers, layers, kernels, strict=True):
    assert layer is original and layer.kernel is kernel
    assert type(layer).__name__ == "LinearWithBGN" and isinstance(layer, nnx.Linear)
  assert type(model) is MLP
  assert_trees_equal(nnx.state(model), before)
  assert bgn_jax.nnx.remove(model) is model
  assert all(type(layer) is nnx.Linear for layer in model.layers)
  assert nnx.graphdef(model) == nnx.graphdef(MLP(rngs=nnx.Rngs(0)))
  _, plain = forward_and_grads(model, x)
  _, again = forward_and_grads(MLP(rngs=nnx.Rngs(0)), x)
  assert_trees_equal(plain, again)


def test_optimizer_step_on_the_inserted_model_matches_the_hand_model():
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_after=range(4), rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(model, where=nnx.Linear)
  optimizers = [nnx.Optimizer(m, optax.adam(0.1), wrt=nnx.Param) for m in (model, reference)]
  for step in range(2):
    for m, optimizer in zip((model, reference), optimizers, strict=True):
      _, grads = forward_and_grads(m, inputs((5, 6), seed=step))
      optimizer.update(m, grads)
  assert_trees_equal(nnx.state(model), nnx.state(reference))


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
  model = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear, axes=[1], power=0.5)
  assert type(model.layers[0]).__name__ == "LinearWithBGN"
  _, got = forward_and_grads(model, inputs((5, 6)))
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
  check_against_hand(model, reference, inputs((5, 6)), where=r"^$")
  assert type(model).__name__ == "MLPWithBGN" and isinstance(model, MLP)
  assert type(bgn_jax.nnx.remove(model)) is MLP


def test_inserting_again_with_the_same_options_is_a_no_op():
  model = MLP(rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.5)
  graphdef = nnx.graphdef(model)
  assert bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.5) is model
  assert nnx.graphdef(model) == graphdef
  assert [type(layer).__name__ for layer in model.layers] == ["LinearWithBGN"] * 4
  # A second model gets the same subclass: equal graph definitions, one nnx.jit trace.
  other = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear, power=0.5)
  assert type(other.layers[0]) is type(model.layers[0])
  _, got = forward_and_grads(model, inputs((5, 6)))
  _, expected = forward_and_grads(HandPower(rngs=nnx.Rngs(0)), inputs((5, 6)))
  assert_trees_equal(got, expected)


class HandPower(MLP):
  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(bgn(layer(x), power=0.5))
    return x


def test_inserting_again_with_other_options_names_both():
  model = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=r"layers/[01]$", power=0.5)
  graphdef = nnx.graphdef(model)
  with pytest.raises(ValueError, match="already has a BGN node") as error:
    bgn_jax.nnx.insert(model, where=nnx.Linear, power=0.25)
  message = str(error.value)
  assert "(position='after', power=0.5)" in message
  assert "(position='after', power=0.25)" in message
  assert "bgn_jax.nnx.remove" in message
  assert nnx.graphdef(model) == graphdef  # nothing was changed
  with pytest.raises(ValueError, match="position='before'"):
    bgn_jax.nnx.insert(model, where=r"layers/1$", position="before", power=0.5)
  # Modules without a node can get one with other options.
  bgn_jax.nnx.insert(model, where=r"layers/[23]$", power=0.25)
  bgn_jax.nnx.remove(model)
  assert all(type(layer) is nnx.Linear for layer in model.layers)


def _reachable(root, target, depth=6):
  """Whether ``target`` is reachable from ``root`` through containers and class dicts."""
  stack, seen = [(root, 0)], set()
  while stack:
    obj, level = stack.pop()
    if obj is target:
      return True
    if id(obj) in seen or level > depth:
      continue
    seen.add(id(obj))
    if isinstance(obj, dict):
      children = [*obj.keys(), *obj.values()]
    elif isinstance(obj, (list, tuple, set, frozenset)):
      children = list(obj)
    elif isinstance(obj, types.FunctionType):
      children = [c.cell_contents for c in obj.__closure__ or ()]
    else:
      continue
    stack.extend((child, level + 1) for child in children)
  return False


def test_bgn_jax_keeps_no_class_alive():
  def make_local_class():
    class Local(nnx.Module):
      def __init__(self, rngs):
        self.linear = nnx.Linear(2, 2, rngs=rngs)

      def __call__(self, x):
        return self.linear(x)

    return Local

  local = make_local_class()
  model = bgn_jax.nnx.insert(local(nnx.Rngs(0)), where=r"^$")
  subclass = type(model)
  assert subclass.__name__ == "LocalWithBGN"
  model(jnp.ones((1, 2)))
  bgn_jax.nnx.remove(model)
  del model
  gc.collect()
  # flax itself keeps every nnx Module class alive (its graph-node registry and JAX's
  # pytree registry hold them), so the check is that bgn_jax holds neither class.
  for cls in (local, subclass):
    assert not _reachable(vars(bgn_jax.nnx), cls)
    assert not _reachable(vars(bgn_jax._common), cls)
  # One subclass per (class, position, options), however many models.
  for _ in range(3):
    bgn_jax.nnx.insert(local(nnx.Rngs(0)), where=r"^$", power=0.5)
  names = [c.__name__ for c in local.__subclasses__()]
  assert names == ["LocalWithBGN", "LocalWithBGN"]


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
  check_against_hand(model, reference, inputs((5, WIDTH)), where=nnx.Linear)
  assert model.first is model.second
  # It is tested at its first path in graph order only.
  with pytest.raises(ValueError, match="matched no module"):
    bgn_jax.nnx.insert(Tied(rngs=nnx.Rngs(0)), where=r"^second$")


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


def test_batchnorm_statistics_and_eval_mode_are_the_models():
  model, reference = BatchNormNet(rngs=nnx.Rngs(0)), BatchNormNet(hand=True, rngs=nnx.Rngs(0))
  plain = BatchNormNet(rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(model, where=nnx.Linear)
  x = inputs((5, 6))
  for step in range(2):
    y, got = forward_and_grads(model, x + step)
    expected_y, expected = forward_and_grads(reference, x + step)
    plain_y, plain_grads = forward_and_grads(plain, x + step)
    assert_trees_equal(y, plain_y)
    assert_trees_equal(got, expected)
    assert_trees_differ(got, plain_grads)
  statistics = nnx.state(model, nnx.BatchStat)
  assert_trees_equal(statistics, nnx.state(reference, nnx.BatchStat))
  assert_trees_differ(statistics, nnx.state(BatchNormNet(rngs=nnx.Rngs(0)), nnx.BatchStat))
  # eval() on the model switches the model that is trained: there is no copy.
  for m in (model, reference):
    m.eval()
  assert model.norm.use_running_average
  y, got = forward_and_grads(model, x)
  expected_y, expected = forward_and_grads(reference, x)
  assert_trees_equal((y, got), (expected_y, expected))
  assert_trees_equal(nnx.state(model, nnx.BatchStat), statistics)


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
