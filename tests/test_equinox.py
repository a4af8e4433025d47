"""Tests of bgn_jax.equinox against equinox's own layers with bgn_jax.bgn placed by hand.

Each model is run twice from the same parameters: once through the adapter, once by a
hand-written forward pass that calls ``bgn`` where the adapter should put a node. The
gradients must agree bit for bit. The gradient norms are compared with norms of
gradients at zero perturbations placed by hand.
"""

from __future__ import annotations

import functools
import math
import subprocess
import sys
import textwrap

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bgn_jax import bgn, l2_norm
from bgn_jax import equinox as beqx
from tests.trees import inputs

KEY = jax.random.key(0)
BATCH = 3


def sqrt_size(x):
  return math.sqrt(x.size)


def sqrt(n):
  return math.sqrt(n)


def leaves(tree):
  return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def loss_of_outputs(y):
  # Not a plain sum: every entry gets its own cotangent, so a wrong group shows.
  return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y))


def grads(forward, model, x, jit=True):
  """Gradients of the loss with respect to the model's arrays and the input."""

  def loss(model, x):
    return loss_of_outputs(forward(model, x))

  def both(model, x):
    return leaves(eqx.filter_grad(loss)(model, x)), jax.grad(loss, argnums=1)(model, x)

  return (eqx.filter_jit(both) if jit else both)(model, x)


def assert_same_grads(forward, inserted, hand_forward, model, x, jit=True):
  # Both sides eager or both compiled: XLA's fusions may round differently.
  chex.assert_trees_all_equal(grads(forward, inserted, x, jit), grads(hand_forward, model, x, jit))


def batched(model, x):
  return jax.vmap(model)(x)


# --- importing ---------------------------------------------------------------------------


def test_bgn_jax_never_imports_equinox_and_the_adapter_says_what_to_install():
  script = textwrap.dedent(
    """
    import sys
    import bgn_jax
    assert "equinox" not in sys.modules, "import bgn_jax imported equinox"
    sys.modules["equinox"] = None  # equinox hidden: importing it raises ImportError
    try:
      import bgn_jax.equinox
    except ImportError as err:
      assert 'pip install "bgn_jax[equinox]"' in str(err), str(err)
    else:
      raise SystemExit("bgn_jax.equinox imported without equinox")
    """
  )
  done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
  assert done.returncode == 0, done.stderr[-2000:]


# --- the layer -----------------------------------------------------------------------------


def test_layer_per_example_and_whole_batch_match_bgn_on_the_batched_array():
  x = inputs((BATCH, 2, 5))
  w = inputs((BATCH, 2, 5), seed=1)

  def vjp(fn):
    return jax.grad(lambda x: jnp.sum(fn(x) * w))(x)

  per_example = vjp(jax.vmap(beqx.BGN()))
  reference = vjp(lambda x: bgn(x, axes=(1, 2), target_norm="sqrt_units"))
  chex.assert_trees_all_equal(per_example, reference)
  whole = vjp(jax.vmap(beqx.BGN(axis_name="batch"), axis_name="batch"))
  whole_filter = vjp(eqx.filter_vmap(beqx.BGN(axis_name="batch"), axis_name="batch"))
  reference = vjp(lambda x: bgn(x, target_norm="sqrt_units"))
  chex.assert_trees_all_close(whole, reference, rtol=1e-6)
  chex.assert_trees_all_equal(whole, whole_filter)
  # The whole batch is one group of norm sqrt(units per example); each example alone
  # has norm sqrt(its size): the two readings differ.
  np.testing.assert_allclose(l2_norm(whole), math.sqrt(10), rtol=1e-6)
  np.testing.assert_allclose(l2_norm(per_example, axes=(1, 2)), [math.sqrt(10)] * BATCH, rtol=1e-6)


def test_layer_options_are_static_and_checked_at_construction():
  layer = beqx.BGN(axes=[0], power=0.5)
  assert layer.axes == (0,)
  assert jax.tree.leaves(layer) == []
  with pytest.raises(ValueError, match="power"):
    beqx.BGN(power=2.0)
  with pytest.raises(ValueError, match="target_norm"):
    beqx.BGN(target_norm="sqrt_everything")


# --- insert on equinox's layers ------------------------------------------------------------


def mlp():
  return eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=KEY)


def hand_mlp(model, x, *, target=sqrt_size, before=False):
  for i, layer in enumerate(model.layers):
    if before:
      x = bgn(x, target_norm=target(x))
    x = layer(x)
    if not before:
      x = bgn(x, target_norm=target(x))
    x = model.activation(x) if i < len(model.layers) - 1 else model.final_activation(x)
  return x


@pytest.mark.parametrize("jit", [False, True], ids=["eager", "filter_jit"])
def test_mlp_matches_hand_placed_nodes(jit):
  model = mlp()
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  hand = jax.vmap(hand_mlp, in_axes=(None, 0))
  assert_same_grads(batched, inserted, hand, model, inputs((BATCH, 4)), jit)


def test_mlp_before_and_the_paper_reading_over_the_batch():
  model, x = mlp(), inputs((BATCH, 4))
  inserted = beqx.insert(model, where=eqx.nn.Linear, position="before")
  hand = jax.vmap(functools.partial(hand_mlp, before=True), in_axes=(None, 0))
  assert_same_grads(batched, inserted, hand, model, x)

  whole = beqx.insert(model, where=eqx.nn.Linear, axis_name="batch", target_norm="sqrt_units")

  def whole_batch(model, x):
    return jax.vmap(model, axis_name="batch")(x)

  def hand_whole(model, x):  # on the batched arrays: one group, target sqrt(units)
    for i, layer in enumerate(model.layers):
      x = bgn(jax.vmap(layer)(x), target_norm="sqrt_units")
      x = model.activation(x) if i < len(model.layers) - 1 else model.final_activation(x)
    return x

  chex.assert_trees_all_equal(grads(whole_batch, whole, x), grads(hand_whole, model, x))


class CNN(eqx.Module):
  convs: tuple[eqx.nn.Conv2d, ...]

  def __init__(self, key):
    k1, k2 = jax.random.split(key)
    self.convs = (eqx.nn.Conv2d(2, 3, 3, key=k1), eqx.nn.Conv2d(3, 2, 3, padding=1, key=k2))

  def __call__(self, x):  # x: (C, H, W), one example
    for conv in self.convs:
      x = jax.nn.relu(conv(x))
    return x


def test_cnn_per_example_node_is_normalized_to_sqrt_chw():
  model, x = CNN(KEY), inputs((BATCH, 2, 6, 6))
  inserted = beqx.insert(model, where=eqx.nn.Conv2d)

  def hand(model, x):  # one example: target sqrt(C*H*W), not the sqrt(H*W) of "sqrt_units"
    for conv in model.convs:
      y = conv(x)
      x = jax.nn.relu(bgn(y, target_norm=math.sqrt(y.shape[0] * y.shape[1] * y.shape[2])))
    return x

  assert_same_grads(batched, inserted, jax.vmap(hand, in_axes=(None, 0)), model, x)

  records = beqx.placements(inserted, x[0])
  assert [(r.path, r.shape) for r in records] == [("convs/0", (3, 4, 4)), ("convs/1", (2, 4, 4))]


def test_sequential_regex_every_and_keys():
  k = jax.random.split(KEY, 3)
  model = eqx.nn.Sequential(
    [
      eqx.nn.Linear(4, 5, key=k[0]),
      eqx.nn.Lambda(jnp.tanh),
      eqx.nn.Linear(5, 5, key=k[1]),
      eqx.nn.Lambda(jnp.tanh),
      eqx.nn.Linear(5, 2, key=k[2]),
    ]
  )
  inserted = beqx.insert(model, where=r"^layers/\d+$", every=2)  # layers 0, 2, 4
  assert [type(layer).__name__ for layer in inserted.layers] == [
    "LinearWithBGN",
    "Lambda",
    "LinearWithBGN",
    "Lambda",
    "LinearWithBGN",
  ]

  def hand(model, x):
    for i, layer in enumerate(model.layers):
      x = layer(x)
      x = bgn(x, target_norm=sqrt_size(x)) if i % 2 == 0 else x
    return x

  assert_same_grads(batched, inserted, jax.vmap(hand, in_axes=(None, 0)), model, inputs((BATCH, 4)))
  with_layer = eqx.nn.Sequential([model.layers[0], beqx.BGN(), model.layers[1]])
  x = inputs((4,))
  chex.assert_trees_all_equal(
    jax.jit(jax.grad(lambda x: loss_of_outputs(with_layer(x, key=KEY))))(x),
    jax.jit(
      jax.grad(lambda x: loss_of_outputs(jnp.tanh(bgn(model.layers[0](x), target_norm=sqrt(5)))))
    )(x),
  )


class Block(eqx.Module):
  norm1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  mlp: eqx.nn.MLP

  def __init__(self, key, width=8):
    k1, k2 = jax.random.split(key)
    self.norm1 = eqx.nn.LayerNorm(width)
    self.attention = eqx.nn.MultiheadAttention(2, width, key=k1)
    self.norm2 = eqx.nn.LayerNorm(width)
    self.mlp = eqx.nn.MLP(width, width, 2 * width, 1, activation=jax.nn.gelu, key=k2)

  def __call__(self, x, hand=None):  # x: (tokens, width), one sequence
    hand = hand or (lambda name, y: y)
    h = jax.vmap(lambda t: hand("norm", self.norm1(t)))(x)
    x = x + hand("attention", self.attention(h, h, h))
    h = jax.vmap(lambda t: hand("norm", self.norm2(t)))(x)
    return x + jax.vmap(lambda t: hand("mlp", self.mlp(t)))(h)


def test_transformer_block():
  model, x = Block(KEY), inputs((BATCH, 4, 8))
  inserted = beqx.insert(model, where=(eqx.nn.MultiheadAttention, eqx.nn.LayerNorm))
  placed = {"attention", "norm"}

  def hand_node(name, y):
    return bgn(y, target_norm=sqrt_size(y)) if name in placed else y

  def hand(model, x):
    return jax.vmap(lambda x: model(x, hand=hand_node))(x)

  assert_same_grads(batched, inserted, hand, model, x)


class Layer(eqx.Module):
  linear: eqx.nn.Linear

  def __init__(self, key):
    self.linear = eqx.nn.Linear(4, 4, key=key)

  def __call__(self, x):
    return jnp.tanh(self.linear(x))


class Stack(eqx.Module):
  """The scan-over-layers pattern: the layers' arrays stacked, applied with lax.scan."""

  layers: Layer

  def __init__(self, key, depth=3):
    self.layers = eqx.filter_vmap(Layer)(jax.random.split(key, depth))

  def __call__(self, x, hand=None):
    dynamic, static = eqx.partition(self.layers, eqx.is_array)

    def step(x, layer_arrays):
      layer = eqx.combine(layer_arrays, static)
      y = layer(x) if hand is None else hand(layer, x)
      return y, None

    return jax.lax.scan(step, x, dynamic)[0]


def test_scan_over_layers():
  model, x = Stack(KEY), inputs((BATCH, 4))
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  assert type(inserted.layers.linear).__name__ == "LinearWithBGN"

  def hand(model, x):
    def layer(layer, x):
      y = layer.linear(x)
      return jnp.tanh(bgn(y, target_norm=sqrt_size(y)))

    return jax.vmap(lambda x: model(x, hand=layer))(x)

  assert_same_grads(batched, inserted, hand, model, x)
  records = beqx.placements(inserted, x[0])
  assert [(r.path, r.module, r.shape) for r in records] == [("layers/linear", "Linear", (4,))]


def test_filter_vmap_and_filter_grad_of_the_inserted_model():
  model, x = mlp(), inputs((BATCH, 4))
  inserted = beqx.insert(model, where=eqx.nn.Linear)

  def loss(model, x):
    return loss_of_outputs(eqx.filter_vmap(model)(x))

  got = leaves(eqx.filter_jit(eqx.filter_grad(loss))(inserted, x))
  hand = eqx.filter_grad(lambda m, x: loss_of_outputs(jax.vmap(hand_mlp, (None, 0))(m, x)))
  want = leaves(eqx.filter_jit(hand)(model, x))
  chex.assert_trees_all_equal(got, want)


# --- the parameters stay the model's -----------------------------------------------------


def test_same_leaves_paths_and_repeated_inserts_give_equal_structures():
  model = Block(KEY)
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  before = jax.tree_util.tree_flatten_with_path(eqx.filter(model, eqx.is_array))[0]
  after = jax.tree_util.tree_flatten_with_path(eqx.filter(inserted, eqx.is_array))[0]
  assert [jax.tree_util.keystr(k) for k, _ in before] == [jax.tree_util.keystr(k) for k, _ in after]
  assert all(a is b for (_, a), (_, b) in zip(before, after, strict=True))
  again = beqx.insert(model, where=eqx.nn.Linear)
  assert jax.tree.structure(again) == jax.tree.structure(inserted)
  assert isinstance(inserted.mlp.layers[0], eqx.nn.Linear)
  assert type(model.mlp.layers[0]) is eqx.nn.Linear  # the original is untouched


def test_serialised_leaves_load_both_ways(tmp_path):
  model = mlp()
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  trained = jax.tree.map(lambda a: a + 1.0 if eqx.is_inexact_array(a) else a, model)
  eqx.tree_serialise_leaves(tmp_path / "plain.eqx", trained)
  loaded = eqx.tree_deserialise_leaves(tmp_path / "plain.eqx", inserted)
  assert type(loaded.layers[0]).__name__ == "LinearWithBGN"
  chex.assert_trees_all_equal(leaves(loaded), leaves(trained))
  eqx.tree_serialise_leaves(tmp_path / "inserted.eqx", loaded)
  back = eqx.tree_deserialise_leaves(tmp_path / "inserted.eqx", model)
  assert type(back.layers[0]) is eqx.nn.Linear
  chex.assert_trees_all_equal(leaves(back), leaves(trained))


def test_optax_state_moves_between_the_models_by_its_leaves():
  model, x = mlp(), inputs((BATCH, 4))
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  optimizer = optax.adam(1e-2)

  def step(model, state):
    g = eqx.filter_grad(lambda m: loss_of_outputs(batched(m, x)))(model)
    updates, state = optimizer.update(g, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  plain_state = optimizer.init(eqx.filter(model, eqx.is_array))
  model_1, plain_state = step(model, plain_state)
  # The state made for the plain model, moved to the inserted one by its leaves.
  target = jax.tree.structure(optimizer.init(eqx.filter(inserted, eqx.is_array)))
  moved = jax.tree.unflatten(target, jax.tree.leaves(plain_state))
  inserted_1 = beqx.insert(model_1, where=eqx.nn.Linear)
  inserted_2, moved = step(inserted_1, moved)
  # The same step by hand on the plain model.
  hand_1, hand_state = model_1, plain_state

  def hand_step(model, state):
    g = eqx.filter_grad(lambda m: loss_of_outputs(jax.vmap(hand_mlp, (None, 0))(m, x)))(model)
    updates, state = optimizer.update(g, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  hand_2, hand_state = hand_step(hand_1, hand_state)
  chex.assert_trees_all_equal(leaves(inserted_2), leaves(hand_2))
  chex.assert_trees_all_equal(jax.tree.leaves(moved), jax.tree.leaves(hand_state))


def test_insert_inside_the_loss_keeps_the_plain_model_and_its_optax_state():
  model, x = mlp(), inputs((BATCH, 4))

  @eqx.filter_jit
  @eqx.filter_grad
  def grad_with_nodes(model):
    return loss_of_outputs(batched(beqx.insert(model, where=eqx.nn.Linear), x))

  g = grad_with_nodes(model)
  assert jax.tree.structure(g) == jax.tree.structure(eqx.filter(model, eqx.is_array))
  hand = eqx.filter_grad(lambda m: loss_of_outputs(jax.vmap(hand_mlp, (None, 0))(m, x)))
  want = eqx.filter_jit(hand)(model)
  chex.assert_trees_all_equal(leaves(g), leaves(want))


class PassThrough(eqx.Module):
  linear: eqx.nn.Linear

  def __call__(self, x):
    return self.linear(x), self.linear.weight, jnp.arange(3)


def test_parameters_passed_through_get_no_node():
  model = PassThrough(eqx.nn.Linear(4, 3, key=KEY))
  inserted = beqx.insert(model, where=PassThrough)
  records = beqx.placements(inserted, inputs((4,)))
  assert [(r.leaf, r.reason) for r in records] == [
    ("[0]", None),
    ("[1]", "a parameter of the module, passed through"),
    ("[2]", "not floating-point (int32)"),
  ]
  assert "1 nodes, 2 skipped" in str(records)

  def loss(model):
    y, w, _ = model(inputs((4,)))
    return loss_of_outputs(y) + jnp.sum(w**2)

  def hand(model):
    y = model.linear(inputs((4,)))
    return loss_of_outputs(bgn(y, target_norm=sqrt(3))) + jnp.sum(model.linear.weight**2)

  chex.assert_trees_all_equal(
    leaves(eqx.filter_grad(loss)(inserted)), leaves(eqx.filter_grad(hand)(model))
  )


# --- grad_norms ----------------------------------------------------------------------------


@eqx.filter_jit
def hand_norms(model, x, *, inserted=False):
  """Norms at zero perturbations (batched shape) after each Linear of the MLP, by hand."""
  widths = [layer.out_features for layer in model.layers]
  zeros = [jnp.zeros((BATCH, w)) for w in widths]

  arrays, static = eqx.partition(model, eqx.is_inexact_array)

  def loss(arrays, perturbations):
    model = eqx.combine(arrays, static)
    h = x
    for i, layer in enumerate(model.layers):
      h = jax.vmap(layer)(h)
      if inserted:
        h = bgn(h, axes=1, target_norm="sqrt_units")
      h = h + perturbations[i]
      h = model.activation(h) if i < len(model.layers) - 1 else model.final_activation(h)
    return loss_of_outputs(h)

  g_model, g_perturbations = jax.grad(loss, argnums=(0, 1))(arrays, zeros)
  return {
    f"layers/{i}": {
      "output": l2_norm(g_perturbations[i]),
      "params": l2_norm(jnp.concatenate([a.ravel() for a in leaves(g_model.layers[i])])),
    }
    for i in range(len(widths))
  }


def loss_fn(model, x):
  return loss_of_outputs(jax.vmap(model)(x))


@pytest.mark.parametrize("inserted", [False, True], ids=["plain", "inserted"])
def test_grad_norms_of_an_mlp_over_the_whole_batch(inserted):
  model, x = mlp(), inputs((BATCH, 4))
  measured = beqx.insert(model, where=eqx.nn.Linear) if inserted else model
  report = beqx.grad_norms(loss_fn, measured, x, where=eqx.nn.Linear)
  assert list(report) == ["layers/0", "layers/1", "layers/2"]
  chex.assert_trees_all_close(dict(report), hand_norms(model, x, inserted=inserted), rtol=1e-6)


def test_grad_norms_under_filter_jit():
  model, x = mlp(), inputs((BATCH, 4))
  jitted = eqx.filter_jit(functools.partial(beqx.grad_norms, loss_fn, where=r"layers/\d"))
  report = jitted(model, x)
  assert list(report) == ["layers/0", "layers/1", "layers/2"]
  chex.assert_trees_all_close(dict(report), hand_norms(model, x), rtol=1e-6)


def test_grad_norms_per_scanned_layer():
  model, x = Stack(KEY), inputs((BATCH, 4))
  report = beqx.grad_norms(loss_fn, model, x, where=Layer)
  assert list(report) == ["layers"]

  def loss(model, perturbations):
    def perturbed(layer, x, p):
      return layer(x) + p

    dynamic, static = eqx.partition(model.layers, eqx.is_array)

    def step(h, inputs):
      arrays, p = inputs
      return jax.vmap(perturbed, (None, 0, 0))(eqx.combine(arrays, static), h, p), None

    return loss_of_outputs(jax.lax.scan(step, x, (dynamic, perturbations))[0])

  g_model, g_p = jax.grad(loss, argnums=(0, 1))(model, jnp.zeros((3, BATCH, 4)))
  g_layers = leaves(g_model.layers)
  want_params = l2_norm(jnp.concatenate([g.reshape(3, -1) for g in g_layers], axis=1), axes=1)
  chex.assert_trees_all_close(
    dict(report["layers"]), {"output": l2_norm(g_p, axes=(1, 2)), "params": want_params}, rtol=1e-6
  )


class Twice(eqx.Module):
  linear: eqx.nn.Linear

  def __call__(self, x):
    return self.linear(jnp.tanh(self.linear(x)))


def test_grad_norms_of_a_module_called_twice():
  model, x = Twice(eqx.nn.Linear(3, 3, key=KEY)), inputs((BATCH, 3))
  report = beqx.grad_norms(loss_fn, model, x, where=eqx.nn.Linear)
  assert list(report) == ["linear", "linear#1"]

  def loss(model, p0, p1):
    h = jax.vmap(model.linear)(x) + p0
    return loss_of_outputs(jax.vmap(model.linear)(jnp.tanh(h)) + p1)

  zeros = jnp.zeros((BATCH, 3))
  g_model, g0, g1 = jax.grad(loss, argnums=(0, 1, 2))(model, zeros, zeros)
  params = l2_norm(jnp.concatenate([a.ravel() for a in leaves(g_model)]))
  chex.assert_trees_all_close(
    dict(report),
    {
      "linear": {"output": l2_norm(g0), "params": params},
      "linear#1": {"output": l2_norm(g1), "params": params},
    },
    rtol=1e-6,
  )


def scaled_loss(model, x, scale):
  return scale * loss_fn(model, x)


def test_grad_norms_of_tiny_and_huge_gradients():
  model, x = mlp(), inputs((BATCH, 4))
  want = hand_norms(model, x)
  for scale in (1e-30, 1e30):
    report = beqx.grad_norms(scaled_loss, model, x, jnp.float32(scale), where=eqx.nn.Linear)
    np.testing.assert_allclose(
      report["layers/0"]["output"], scale * want["layers/0"]["output"], rtol=1e-5
    )


# --- bad inputs ----------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
  model = mlp()
  with pytest.raises(TypeError, match="`model` must be an eqx.Module"):
    beqx.insert({"w": jnp.ones(2)}, where=eqx.nn.Linear)
  with pytest.raises(TypeError, match="module instance"):
    beqx.insert(model, where=model.layers[0])
  with pytest.raises(ValueError, match=r"matched no module.*Linear at 'layers/0'"):
    beqx.insert(model, where=eqx.nn.Conv2d)
  with pytest.raises(ValueError, match="position"):
    beqx.insert(model, where=eqx.nn.Linear, position="inside")
  with pytest.raises(TypeError, match="unknown BGN option 'target'"):
    beqx.insert(model, where=eqx.nn.Linear, target=1.0)
  with pytest.raises(TypeError, match="every"):
    beqx.insert(model, where=eqx.nn.Linear, every=1.5)
  with pytest.raises(ValueError, match="no BGN node"):
    beqx.placements(model, jnp.ones(4))
  with pytest.raises(TypeError, match="loss_fn"):
    beqx.grad_norms(None, model, where=eqx.nn.Linear)
  with pytest.raises(ValueError, match="matched no module"):
    beqx.grad_norms(loss_fn, model, jnp.ones((2, 4)), where="nothing")
  with pytest.raises(ValueError, match="called none"):
    beqx.grad_norms(lambda m: jnp.zeros(()), model, where=eqx.nn.Linear)
