"""Tests of bgn_jax.nnx.insert against the same nnx models with bgn_jax.bgn written by hand.

Every model takes ``hand_*`` arguments that place ``bgn`` explicitly where insert is
expected to put it; built from the same seed, the hand model has the same parameters and
must give the same forward values and gradients, bit for bit.
"""

from __future__ import annotations

import gc
import re
import types

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import bgn_jax
from bgn_jax import bgn
from bgn_jax._common import Placement
from tests.reference import INSERT_BAD_ARGUMENTS, assert_trees_differ, inputs

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
  chex.assert_trees_all_equal(y, plain_y)
  chex.assert_trees_all_equal(got, expected)
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
  # The model's class checks, at each call, that a node was placed.
  assert type(model).__name__ == "MLPWithBGNCheck" and isinstance(model, MLP)
  chex.assert_trees_all_equal(nnx.state(model), before)
  assert bgn_jax.nnx.remove(model) is model
  assert type(model) is MLP
  assert all(type(layer) is nnx.Linear for layer in model.layers)
  assert nnx.graphdef(model) == nnx.graphdef(MLP(rngs=nnx.Rngs(0)))
  _, plain = forward_and_grads(model, x)
  _, again = forward_and_grads(MLP(rngs=nnx.Rngs(0)), x)
  chex.assert_trees_all_equal(plain, again)


def test_optimizer_step_on_the_inserted_model_matches_the_hand_model():
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_after=range(4), rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(model, where=nnx.Linear)
  optimizers = [nnx.Optimizer(m, optax.adam(0.1), wrt=nnx.Param) for m in (model, reference)]
  for step in range(2):
    for m, optimizer in zip((model, reference), optimizers, strict=True):
      _, grads = forward_and_grads(m, inputs((5, 6), seed=step))
      optimizer.update(m, grads)
  chex.assert_trees_all_equal(nnx.state(model), nnx.state(reference))


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
  chex.assert_trees_all_equal(got, expected)


class HandOptions(MLP):
  def __call__(self, x):
    for layer in self.layers:
      x = jnp.tanh(bgn(layer(x), axes=(1,), power=0.5))
    return x


def test_top_level_module_is_matchable():
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_output=True, rngs=nnx.Rngs(0))
  check_against_hand(model, reference, inputs((5, 6)), where=r"^$")
  assert type(model).__name__ == "MLPWithBGNWithBGNCheck" and isinstance(model, MLP)
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
  assert nnx.graphdef(other) == nnx.graphdef(model)
  assert nnx.graphdef(other) != nnx.graphdef(
    bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear)
  )
  _, got = forward_and_grads(model, inputs((5, 6)))
  _, expected = forward_and_grads(HandPower(rngs=nnx.Rngs(0)), inputs((5, 6)))
  chex.assert_trees_all_equal(got, expected)


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
  # The node's class, and the check of each whole-model call on top of it.
  subclass = type(model).__mro__[1]
  assert subclass.__name__ == "LocalWithBGN"
  assert type(model).__name__ == "LocalWithBGNWithBGNCheck"
  model(jnp.ones((1, 2)))
  bgn_jax.nnx.remove(model)
  del model
  gc.collect()
  # flax itself keeps every nnx Module class alive (its graph-node registry and JAX's
  # pytree registry hold them), so the check is that bgn_jax holds neither class.
  for cls in (local, subclass, *subclass.__subclasses__()):
    assert not _reachable(vars(bgn_jax.nnx), cls)
    assert not _reachable(vars(bgn_jax._common), cls)
  # One subclass per (class, position, options), however many models.
  for _ in range(3):
    bgn_jax.nnx.insert(local(nnx.Rngs(0)), where=r"^$", power=0.5)
  marker = ("bgn", "after", (("power", 0.5),))
  made = [c for c in local.__subclasses__() if vars(c).get("_bgn_jax_marker")[:3] == marker]
  assert [c.__name__ for c in made] == ["LocalWithBGN"]


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


LAYERS = 3


class ScanStack(nnx.Module):
  """Blocks with stacked parameters (nnx.vmap), run by nnx.scan."""

  def __init__(self, *, hand=False, rngs):
    @nnx.split_rngs(splits=LAYERS)
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
  assert model.blocks.linear.kernel.shape == (LAYERS, WIDTH, WIDTH)
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
    chex.assert_trees_all_equal(y, plain_y)
    chex.assert_trees_all_equal(got, expected)
    assert_trees_differ(got, plain_grads)
  statistics = nnx.state(model, nnx.BatchStat)
  chex.assert_trees_all_equal(statistics, nnx.state(reference, nnx.BatchStat))
  assert_trees_differ(statistics, nnx.state(BatchNormNet(rngs=nnx.Rngs(0)), nnx.BatchStat))
  # eval() on the model switches the model that is trained: there is no copy.
  for m in (model, reference):
    m.eval()
  assert model.norm.use_running_average
  y, got = forward_and_grads(model, x)
  expected_y, expected = forward_and_grads(reference, x)
  chex.assert_trees_all_equal((y, got), (expected_y, expected))
  chex.assert_trees_all_equal(nnx.state(model, nnx.BatchStat), statistics)


def test_no_match_raises_listing_what_was_seen():
  model = MLP(rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match="matched no module") as error:
    bgn_jax.nnx.insert(model, where=nnx.Conv)
  message = str(error.value)
  assert "MLP at ''" in message
  for i in range(4):
    assert f"Linear at 'layers/{i}'" in message
  assert "List" not in message  # a container without __call__ is never tested


@pytest.mark.parametrize(("arguments", "error", "message"), INSERT_BAD_ARGUMENTS, ids=str)
def test_bad_arguments(arguments, error, message):
  arguments = {"where": nnx.Linear, **arguments}
  with pytest.raises(error, match=re.escape(message)):
    bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), **arguments)


def test_model_must_be_an_nnx_module():
  with pytest.raises(TypeError, match="`model` must be an nnx.Module; got dict"):
    bgn_jax.nnx.insert({"layer": nnx.Linear(2, 2, rngs=nnx.Rngs(0))}, where=nnx.Linear)


@pytest.mark.parametrize(
  "where, hand_after",
  [
    (nnx.OfType(nnx.Linear), (0, 1, 2, 3)),
    (nnx.All(nnx.OfType(nnx.Linear), nnx.PathContains(1)), (1,)),
    (nnx.All(nnx.OfType(nnx.Linear), nnx.Not(nnx.PathContains(0))), (1, 2, 3)),
    ((nnx.PathContains(0), nnx.PathContains(3)), (0, 3)),
  ],
  ids=["OfType", "All-PathContains", "Not", "tuple-of-filters"],
)
def test_where_nnx_filters_combine_type_and_path(where, hand_after):
  model, reference = MLP(rngs=nnx.Rngs(0)), MLP(hand_after=hand_after, rngs=nnx.Rngs(0))
  check_against_hand(model, reference, inputs((5, 6)), where=where)


def test_where_a_module_instance_is_a_type_error():
  model = MLP(rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=r"nnx.insert: `where` is a module instance \(Linear\)"):
    bgn_jax.nnx.insert(model, where=model.layers[0])
  assert all(type(layer) is nnx.Linear for layer in model.layers)


class Loss(nnx.Variable):
  pass


class Encoder(nnx.Module):
  """The encoder of flax's examples/nnx_toy_examples/05_vae.py, at toy size."""

  def __init__(self, din, dmid, dout, *, hand, rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.linear_mean = nnx.Linear(dmid, dout, rngs=rngs)
    self.linear_std = nnx.Linear(dmid, dout, rngs=rngs)
    self.rngs = rngs
    self.hand = hand

  def __call__(self, x):
    node = bgn if self.hand else (lambda v: v)
    x = x.reshape((x.shape[0], -1))
    x = jax.nn.relu(node(self.linear1(x)))
    mean = node(self.linear_mean(x))
    std = jnp.exp(node(self.linear_std(x)))
    self.kl_loss = Loss(jnp.mean(0.5 * jnp.mean(-jnp.log(std**2) - 1.0 + std**2 + mean**2, -1)))
    return mean + std * jax.random.normal(self.rngs.noise(), mean.shape)


class Decoder(nnx.Module):
  def __init__(self, din, dmid, dout, *, hand, rngs):
    self.linear1 = nnx.Linear(din, dmid, rngs=rngs)
    self.linear2 = nnx.Linear(dmid, dout, rngs=rngs)
    self.hand = hand

  def __call__(self, z):
    node = bgn if self.hand else (lambda v: v)
    return node(self.linear2(jax.nn.relu(node(self.linear1(z)))))


class VAE(nnx.Module):
  def __init__(self, *, hand=False, rngs):
    self.encoder = Encoder(12, 8, 4, hand=hand, rngs=rngs)
    self.decoder = Decoder(4, 8, 12, hand=hand, rngs=rngs)

  def __call__(self, x):
    return self.decoder(self.encoder(x))


@nnx.jit
def vae_step(model, optimizer, x):
  def loss_fn(model):
    logits = model(x)
    reconstruction = jnp.mean(optax.sigmoid_binary_cross_entropy(logits, x))
    return reconstruction + 0.1 * model.encoder.kl_loss[...]

  loss, grads = nnx.value_and_grad(loss_fn)(model)
  optimizer.update(model, grads)
  return loss


def test_vae_variable_assigned_in_call_lands_on_the_trained_model():
  model, reference = VAE(rngs=nnx.Rngs(0)), VAE(hand=True, rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(model, where=nnx.Linear)
  x = (inputs((6, 12)) > 0).astype(jnp.float32)
  optimizers = [nnx.Optimizer(m, optax.adam(0.05), wrt=nnx.Param) for m in (model, reference)]
  losses = [
    [float(vae_step(m, o, x)) for _ in range(3)] for m, o in zip((model, reference), optimizers)
  ]
  assert losses[0] == losses[1]
  assert isinstance(model.encoder.kl_loss, Loss)
  no_keys = nnx.Not(nnx.RngKey)  # key arrays do not convert to NumPy; their counts do
  chex.assert_trees_all_equal(nnx.state(model, no_keys), nnx.state(reference, no_keys))
  assert_trees_differ(nnx.state(model, nnx.Param), nnx.state(VAE(rngs=nnx.Rngs(0)), nnx.Param))


class Keeping(nnx.Module):
  """A Linear and tanh that keeps its output in a Variable (or, with ``keep=False``, not)."""

  def __init__(self, *, keep=True, hand=False, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.last = nnx.Variable(jnp.zeros(())) if keep else None
    self.hand = hand

  def __call__(self, x):
    y = jnp.tanh(self.linear(x))
    if self.last is not None:
      self.last.set_value(y)
    return bgn(y) if self.hand else y


class KeepingNet(nnx.Module):
  def __init__(self, *, keep=True, hand=False, rngs):
    self.blocks = nnx.List([Keeping(keep=keep, hand=hand, rngs=rngs) for _ in range(2)])

  def __call__(self, x):
    for block in self.blocks:
      x = block(x)
    return x


def test_an_output_the_module_also_stores_in_a_variable_gets_its_node():
  # The stored value is the output: a Variable written by the call, not one passed
  # through (those hold their values when the call begins).
  model, reference = KeepingNet(rngs=nnx.Rngs(0)), KeepingNet(hand=True, rngs=nnx.Rngs(0))
  x = inputs((5, WIDTH))
  check_against_hand(model, reference, x, where=Keeping)
  report = bgn_jax.nnx.placements(model, x)
  assert [p.path for p in report.nodes] == ["blocks/0", "blocks/1"] and not report.skipped
  chex.assert_trees_all_equal(
    model.blocks[1].last.get_value(), reference.blocks[1].last.get_value()
  )
  # grad_norms measures the stored output as it measures one that is not stored.
  plain = KeepingNet(keep=False, rngs=nnx.Rngs(0))
  bgn_jax.nnx.insert(plain, where=Keeping)

  def loss(model, x):
    y = model(x)
    return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y))

  got = bgn_jax.nnx.grad_norms(loss, where=Keeping)(model, x)
  want = bgn_jax.nnx.grad_norms(loss, where=Keeping)(plain, x)
  assert set(got["blocks/0"]) == {"output", "at_bgn", "params"}
  chex.assert_trees_all_close(got, want, rtol=1e-6)


class ScaleAndWeight(nnx.Module):
  """Returns an activation, its own parameter's value and the parameter Variable."""

  def __init__(self):
    self.weight = nnx.Param(jnp.linspace(0.5, 1.5, WIDTH))

  def __call__(self, x):
    return x * self.weight[...], self.weight[...], self.weight


class PassThrough(nnx.Module):
  def __init__(self, *, hand=False, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.scale = ScaleAndWeight()
    self.hand = hand

  def __call__(self, x):
    y, weight, variable = self.scale(self.linear(x))
    y = bgn(y) if self.hand else y
    return jnp.tanh(y) * weight + variable[...]


def test_a_parameter_passed_through_gets_no_node_and_shows_as_skipped():
  model, reference = PassThrough(rngs=nnx.Rngs(0)), PassThrough(hand=True, rngs=nnx.Rngs(0))
  x = inputs((5, WIDTH))
  check_against_hand(model, reference, x, where=ScaleAndWeight)
  records = bgn_jax.nnx.placements(model, x)
  assert [(p.leaf, p.shape, p.reason) for p in records] == [
    ("[0]", (5, WIDTH), None),
    ("[1]", (WIDTH,), "a variable of the module, passed through"),
    ("[2]", (WIDTH,), "a variable of the module, passed through"),
  ]


class Tokens(nnx.Module):
  """Token ids into an embedding, then a Linear; returns the output and the ids."""

  def __init__(self, *, hand=False, rngs):
    self.embed = nnx.Embed(10, WIDTH, rngs=rngs)
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.hand = hand

  def __call__(self, ids):
    x = self.embed(ids)
    return self.linear(bgn(x) if self.hand else x), ids


TOKENS = jnp.asarray([[1, 2, 3], [4, 5, 9]], jnp.int32)


def tokens_loss_grads(model):
  return nnx.grad(lambda m: jnp.sum(jnp.sin(m(TOKENS)[0])))(model)


def test_matches_with_nothing_to_normalize_raise_at_the_first_call():
  model = bgn_jax.nnx.insert(Tokens(rngs=nnx.Rngs(0)), where=nnx.Embed, position="before")
  with pytest.raises(ValueError, match="^bgn_jax.nnx.insert: .* none had a floating-point") as e:
    model(TOKENS)
  message = str(e.value)
  assert "matched 1 module call(s)" in message and "Embed at 'embed'" in message
  assert "positional input" in message
  with pytest.raises(ValueError, match="none had a floating-point"):
    bgn_jax.nnx.placements(model, TOKENS)
  # The top-level output holds the ids too, but also a float: no error, a node on it.
  model = bgn_jax.nnx.insert(
    Tokens(rngs=nnx.Rngs(0)), where=(nnx.Embed, nnx.Linear), position="before"
  )
  chex.assert_trees_all_equal(
    tokens_loss_grads(model), tokens_loss_grads(Tokens(hand=True, rngs=nnx.Rngs(0)))
  )
  records = bgn_jax.nnx.placements(model, TOKENS)
  assert [(p.path, p.module, p.leaf, p.shape, p.dtype, p.reason) for p in records] == [
    ("embed", "Embed", "[0]", (2, 3), "int32", "not floating-point (int32)"),
    ("linear", "Linear", "[0]", (2, 3, WIDTH), "float32", None),
  ]


def test_placements_table_in_call_order_without_changing_the_model():
  model = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=r"layers/[13]$|^$")
  before = jax.tree.map(np.asarray, nnx.state(model))
  records = bgn_jax.nnx.placements(model, inputs((5, 6)))
  assert records == [
    Placement("layers/1", "Linear", "after", "", (5, WIDTH), "float32"),
    Placement("layers/3", "Linear", "after", "", (5, WIDTH), "float32"),
    Placement("", "MLP", "after", "", (5, WIDTH), "float32"),
  ]
  assert str(records).splitlines() == [
    "path        module  position  leaf  shape   dtype    calls  node",
    "----------  ------  --------  ----  ------  -------  -----  ----",
    "'layers/1'  Linear  after     -     (5, 8)  float32  1      yes",
    "'layers/3'  Linear  after     -     (5, 8)  float32  1      yes",
    "''          MLP     after     -     (5, 8)  float32  1      yes",
    "3 nodes applied 3 times, 0 skipped",
  ]
  chex.assert_trees_all_equal(nnx.state(model), before)
  with pytest.raises(ValueError, match="has no BGN node"):
    bgn_jax.nnx.placements(MLP(rngs=nnx.Rngs(0)), inputs((5, 6)))


def test_placements_inside_a_scan_give_the_shapes_of_one_layer():
  model = bgn_jax.nnx.insert(ScanStack(rngs=nnx.Rngs(0)), where=r"^blocks/linear$")
  assert bgn_jax.nnx.placements(model, inputs((3, WIDTH))) == [
    Placement("blocks/linear", "Linear", "after", "", (3, WIDTH), "float32")
  ]
