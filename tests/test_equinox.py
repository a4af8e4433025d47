"""Tests of bgn_jax.equinox against equinox's own layers with bgn_jax.bgn placed by hand.

Each model is run twice from the same parameters: once through the adapter, once by a
hand-written forward pass that calls ``bgn`` where the adapter should put a node. The
gradients must agree bit for bit. The gradient norms are compared with norms of
gradients at zero perturbations placed by hand.

For CI time, models are built abstractly and filled with NumPy draws (no compilation
per layer shape), each comparison is one compiled function, and what several tests
compare against is computed once per module.
"""

from __future__ import annotations

import functools
import math

import chex
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from bgn_jax import bgn, l2_norm
from bgn_jax import equinox as beqx

BATCH = 3


def on_device(a):
  # device_put, not jnp.asarray, which compiles a conversion for each new shape.
  return jax.device_put(np.asarray(a, np.float32))


def inputs(shape, seed=0):
  return on_device(np.random.default_rng(seed).standard_normal(shape))


def zeros(*shape):
  return on_device(np.zeros(shape))


def build(make, seed=0):
  """``make(key)`` traced abstractly, its arrays filled with NumPy draws."""
  shapes = eqx.filter_eval_shape(lambda: make(jax.random.key(0)))
  rng = np.random.default_rng(seed)

  def fill(leaf):
    if isinstance(leaf, jax.ShapeDtypeStruct):
      return jax.device_put(np.asarray(0.5 * rng.standard_normal(leaf.shape), leaf.dtype))
    return leaf

  return jax.tree.map(fill, shapes)


def sqrt_size(x):
  return math.sqrt(x.size)


def leaves(tree):
  return jax.tree.leaves(eqx.filter(tree, eqx.is_array))


def loss_of_outputs(y):
  # Not a plain sum: every entry gets its own cotangent, so a wrong group shows.
  return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y))


def grads(forward, model, x):
  """Gradients of the loss with respect to the model's arrays and the input (one backward)."""
  return leaves(eqx.filter_grad(lambda mx: loss_of_outputs(forward(*mx)))((model, x)))


def assert_same_grads(forward, inserted, hand_forward, model, x, jit=True, rtol=0.0):
  """The gradients of the inserted model and of the hand-placed one: bitwise equal, or
  within ``rtol`` where XLA may fuse and so round the two graphs differently."""

  def both(inserted, model, x):
    return grads(forward, inserted, x), grads(hand_forward, model, x)

  got, want = (eqx.filter_jit(both) if jit else both)(inserted, model, x)
  if rtol:
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=rtol)
  else:
    chex.assert_trees_all_equal(got, want)


def batched(model, x):
  return jax.vmap(model)(x)


def per_example(hand):
  return jax.vmap(hand, in_axes=(None, 0))


def loss_fn(model, x):
  return loss_of_outputs(jax.vmap(model)(x))


def scaled_loss(model, x, scale):
  return scale * loss_fn(model, x)


def norm_of(grads_tree):
  return l2_norm(jnp.concatenate([g.ravel() for g in leaves(grads_tree)]))


# --- the layer -----------------------------------------------------------------------------


def test_layer_per_example_and_whole_batch_match_bgn_on_the_batched_array():
  x = inputs((BATCH, 2, 5))
  w = inputs((BATCH, 2, 5), seed=1)

  def vjp(fn):
    return jax.grad(lambda x: jnp.sum(fn(x) * w))(x)

  @jax.jit
  def all_vjps():
    per_example = vjp(jax.vmap(beqx.BGN()))
    whole = vjp(jax.vmap(beqx.BGN(axis_name="batch"), axis_name="batch"))
    return (
      per_example,
      vjp(lambda x: bgn(x, axes=(1, 2), target_norm="sqrt_units")),
      whole,
      vjp(eqx.filter_vmap(beqx.BGN(axis_name="batch"), axis_name="batch")),
      vjp(lambda x: bgn(x, target_norm="sqrt_units")),
      l2_norm(whole),
      l2_norm(per_example, axes=(1, 2)),
    )

  per_example, reference, whole, whole_filter, whole_reference, norm, norms = all_vjps()
  chex.assert_trees_all_equal(per_example, reference)
  chex.assert_trees_all_close(whole, whole_reference, rtol=1e-6)
  chex.assert_trees_all_equal(whole, whole_filter)
  # The whole batch is one group of norm sqrt(units per example); each example alone
  # has norm sqrt(its size): the two readings differ.
  np.testing.assert_allclose(norm, math.sqrt(10), rtol=1e-6)
  np.testing.assert_allclose(norms, [math.sqrt(10)] * BATCH, rtol=1e-6)


def test_layer_options_are_static_and_checked_at_construction():
  layer = beqx.BGN(axes=[0], power=0.5)
  assert layer.axes == (0,)
  assert jax.tree.leaves(layer) == []
  with pytest.raises(ValueError, match="power"):
    beqx.BGN(power=2.0)
  with pytest.raises(ValueError, match="target_norm"):
    beqx.BGN(target_norm="sqrt_everything")


# --- insert on equinox's layers ------------------------------------------------------------


def make_mlp(key):
  return eqx.nn.MLP(4, 3, 6, 2, activation=jnp.tanh, key=key)


MLP = build(make_mlp)
X = inputs((BATCH, 4))


def hand_mlp(model, x, *, before=False):
  for i, layer in enumerate(model.layers):
    if before:
      x = bgn(x, target_norm=sqrt_size(x))
    x = layer(x)
    if not before:
      x = bgn(x, target_norm=sqrt_size(x))
    x = model.activation(x) if i < len(model.layers) - 1 else model.final_activation(x)
  return x


def hand_mlp_loss(model, x):
  """loss_fn of MLP with its nodes placed by hand (one per example)."""
  return loss_of_outputs(per_example(hand_mlp)(model, x))


def test_mlp_matches_hand_placed_nodes_eagerly():
  # One small model eagerly (op by op); the compiled comparisons follow.
  model = build(lambda key: eqx.nn.MLP(2, 2, 2, 1, activation=jnp.tanh, key=key))
  inserted = beqx.insert(model, where=eqx.nn.Linear)
  assert_same_grads(batched, inserted, per_example(hand_mlp), model, inputs((2, 2)), jit=False)


def test_mlp_after_before_and_the_paper_reading_over_the_batch():
  after = beqx.insert(MLP, where=eqx.nn.Linear)
  before = beqx.insert(MLP, where=eqx.nn.Linear, position="before")
  whole = beqx.insert(MLP, where=eqx.nn.Linear, axis_name="batch", target_norm="sqrt_units")

  def whole_batch(model, x):
    return jax.vmap(model, axis_name="batch")(x)

  def hand_whole(model, x):  # on the batched arrays: one group, target sqrt(units)
    for i, layer in enumerate(model.layers):
      x = bgn(jax.vmap(layer)(x), target_norm="sqrt_units")
      x = model.activation(x) if i < len(model.layers) - 1 else model.final_activation(x)
    return x

  @eqx.filter_jit
  def all_grads(after, before, whole, model, x):
    return (
      (grads(batched, after, x), grads(per_example(hand_mlp), model, x)),
      (
        grads(batched, before, x),
        grads(per_example(functools.partial(hand_mlp, before=True)), model, x),
      ),
      (grads(whole_batch, whole, x), grads(hand_whole, model, x)),
    )

  (after_got, after_want), (before_got, before_want), (whole_got, whole_want) = all_grads(
    after, before, whole, MLP, X
  )
  chex.assert_trees_all_equal(after_got, after_want)
  chex.assert_trees_all_equal(before_got, before_want)
  # Summed per example, then over the vmapped axis, against one sum over the batch: the
  # same terms in another order.
  chex.assert_trees_all_close(whole_got, whole_want, rtol=1e-6, atol=1e-7)


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
  model, x = build(CNN), inputs((BATCH, 2, 5, 5))
  inserted = beqx.insert(model, where=eqx.nn.Conv2d)

  def hand(model, x):  # one example: target sqrt(C*H*W), not the sqrt(H*W) of "sqrt_units"
    for conv in model.convs:
      y = conv(x)
      x = jax.nn.relu(bgn(y, target_norm=math.sqrt(y.shape[0] * y.shape[1] * y.shape[2])))
    return x

  assert_same_grads(batched, inserted, per_example(hand), model, x)

  records = beqx.placements(inserted, x[0])
  assert [(r.path, r.shape) for r in records] == [("convs/0", (3, 3, 3)), ("convs/1", (2, 3, 3))]


def test_sequential_regex_every_and_a_bgn_layer_in_it():
  def make(key):
    k = jax.random.split(key, 3)
    return eqx.nn.Sequential(
      [
        eqx.nn.Linear(4, 5, key=k[0]),
        eqx.nn.Lambda(jnp.tanh),
        eqx.nn.Linear(5, 5, key=k[1]),
        eqx.nn.Lambda(jnp.tanh),
        eqx.nn.Linear(5, 2, key=k[2]),
      ]
    )

  model = build(make)
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

  # A BGN layer written into a Sequential, which passes it a key.
  with_layer = eqx.nn.Sequential([model.layers[0], beqx.BGN(), model.layers[1]])

  def hand_layer(model, x):
    return jnp.tanh(bgn(model.layers[0](x), target_norm=math.sqrt(5)))

  @eqx.filter_jit
  def all_grads(inserted, with_layer, model, x):
    def keyed(model, x):
      return jax.vmap(lambda x: model(x, key=jax.random.key(0)))(x)

    return (
      (grads(batched, inserted, x), grads(per_example(hand), model, x)),
      (grads(keyed, with_layer, x), grads(per_example(hand_layer), model, x)),
    )

  (got, want), (got_layer, want_layer) = all_grads(inserted, with_layer, model, X)
  chex.assert_trees_all_equal(got, want)
  # The layer's model holds only layers 0 and 1 (one Linear): compare its arrays and x.
  chex.assert_trees_all_equal(got_layer, want_layer[:2] + want_layer[-1:])


class Block(eqx.Module):
  norm1: eqx.nn.LayerNorm
  attention: eqx.nn.MultiheadAttention
  norm2: eqx.nn.LayerNorm
  mlp: eqx.nn.MLP

  def __init__(self, key, width=4):
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


BLOCK = build(Block)


def test_transformer_block():
  x = inputs((2, 3, 4))
  inserted = beqx.insert(BLOCK, where=(eqx.nn.MultiheadAttention, eqx.nn.LayerNorm))
  placed = {"attention", "norm"}

  def hand_node(name, y):
    return bgn(y, target_norm=sqrt_size(y)) if name in placed else y

  def hand(model, x):
    return jax.vmap(lambda x: model(x, hand=hand_node))(x)

  # Not bitwise: compiled for the CPU by the elemental emitter (as tests/conftest.py
  # sets), the attention block's two graphs round 66 of the 180 gradient entries apart,
  # by at most 4.8e-7 (entries up to 8); a node left out is off by up to 39 times.
  assert_same_grads(batched, inserted, hand, BLOCK, x, rtol=2e-6)


class Layer(eqx.Module):
  linear: eqx.nn.Linear
  act: eqx.nn.Lambda

  def __init__(self, key):
    self.linear = eqx.nn.Linear(4, 4, key=key)
    self.act = eqx.nn.Lambda(jnp.tanh)  # no parameters

  def __call__(self, x):
    return 2.0 * self.act(self.linear(x))


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


STACK = build(Stack)


def test_scan_over_layers():
  inserted = beqx.insert(STACK, where=eqx.nn.Linear)
  assert type(inserted.layers.linear).__name__ == "LinearWithBGN"

  def hand(model, x):
    def layer(layer, x):
      y = layer.linear(x)
      return 2.0 * jnp.tanh(bgn(y, target_norm=sqrt_size(y)))

    return jax.vmap(lambda x: model(x, hand=layer))(x)

  assert_same_grads(batched, inserted, hand, STACK, X)
  records = beqx.placements(inserted, X[0])
  assert [(r.path, r.module, r.shape) for r in records] == [("layers/linear", "Linear", (4,))]


def test_filter_vmap_and_filter_grad_of_the_inserted_model():
  inserted = beqx.insert(MLP, where=eqx.nn.Linear)

  def loss(model, x):
    return loss_of_outputs(eqx.filter_vmap(model)(x))

  @eqx.filter_jit
  def both(inserted, model, x):
    return leaves(eqx.filter_grad(loss)(inserted, x)), leaves(
      eqx.filter_grad(hand_mlp_loss)(model, x)
    )

  got, want = both(inserted, MLP, X)
  chex.assert_trees_all_equal(got, want)


def test_filter_jit_compiles_the_inserted_model_apart_from_the_plain_one():
  # Why insert cannot keep the plain model's structure (and so an optax state made for
  # one cannot fit the other): eqx.filter_jit keys its compilations on the structure, so
  # an equal one would reuse the plain model's compiled step and silently drop the nodes.
  @eqx.filter_jit
  def grad(model, x):
    return leaves(eqx.filter_grad(loss_fn)(model, x))

  plain = grad(MLP, X)  # compiled first, with the plain structure
  inserted = grad(beqx.insert(MLP, where=eqx.nn.Linear), X)
  chex.assert_trees_all_close(inserted, leaves(eqx.filter_grad(hand_mlp_loss)(MLP, X)), rtol=1e-5)
  assert not all(np.allclose(a, b) for a, b in zip(plain, inserted, strict=True))


# --- nothing to normalize ------------------------------------------------------------------


class Tokens(eqx.Module):
  """Embeddings of integer tokens; the second embedding's output is cast to integers."""

  embed: eqx.nn.Embedding
  rounded: eqx.nn.Embedding
  head: eqx.nn.Linear

  def __init__(self, key):
    k = jax.random.split(key, 3)
    self.embed = eqx.nn.Embedding(5, 4, key=k[0])
    self.rounded = eqx.nn.Embedding(5, 4, key=k[1])
    self.head = eqx.nn.Linear(4, 2, key=k[2])

  def __call__(self, tokens):  # tokens: (length,) int32
    h = jax.vmap(self.embed)(tokens) + jax.vmap(self.rounded)(tokens).astype(jnp.int32)
    return jax.vmap(self.head)(h)


def test_nothing_to_normalize_raises_at_the_first_call_listing_the_matches():
  model, tokens = build(Tokens), jax.device_put(np.arange(3, dtype=np.int32))
  before = beqx.insert(model, where=eqx.nn.Embedding, position="before")
  message = (
    r"^bgn_jax.equinox.insert: .* matched 2 module call\(s\), but none had a floating-point "
    r"positional input to normalize.*no BGN node was placed: Embedding at 'embed' \(int32\[\]: not "
    r"floating-point \(int32\)\), "
    r"Embedding at 'rounded'"
  )
  with pytest.raises(ValueError, match=message):
    eqx.filter_eval_shape(before, tokens)
  with pytest.raises(ValueError, match=message):
    beqx.placements(before, tokens)

  class IntEmbedding(eqx.nn.Embedding):  # its own code casts its output to integers
    def __call__(self, token, *, key=None):
      return super().__call__(token).astype(jnp.int32)

  ints = eqx.tree_at(lambda m: m.rounded, model, IntEmbedding(weight=model.rounded.weight))
  only_ints = beqx.insert(ints, where=IntEmbedding)
  with pytest.raises(
    ValueError,
    match=r"matched 1 module call\(s\), but none had a floating-point output to normalize",
  ):
    eqx.filter_jit(only_ints)(tokens)
  # One selected module with a floating-point leaf is enough: no error, its node placed.
  some = beqx.insert(ints, where=eqx.nn.Embedding)
  records = beqx.placements(some, tokens)
  assert [(r.path, r.reason) for r in records] == [
    ("embed", None),
    ("rounded", "not floating-point (int32)"),
  ]


# --- the parameters stay the model's -----------------------------------------------------


def test_same_leaves_paths_and_repeated_inserts_give_equal_structures():
  inserted = beqx.insert(BLOCK, where=eqx.nn.Linear)
  before = jax.tree_util.tree_flatten_with_path(eqx.filter(BLOCK, eqx.is_array))[0]
  after = jax.tree_util.tree_flatten_with_path(eqx.filter(inserted, eqx.is_array))[0]
  assert [jax.tree_util.keystr(k) for k, _ in before] == [jax.tree_util.keystr(k) for k, _ in after]
  assert all(a is b for (_, a), (_, b) in zip(before, after, strict=True))
  again = beqx.insert(BLOCK, where=lambda m: isinstance(m, eqx.nn.Linear))
  assert jax.tree.structure(again) == jax.tree.structure(inserted)
  other = beqx.insert(BLOCK, where=eqx.nn.Linear, every=2)
  assert jax.tree.structure(other) != jax.tree.structure(inserted)
  assert isinstance(inserted.mlp.layers[0], eqx.nn.Linear)
  assert type(BLOCK.mlp.layers[0]) is eqx.nn.Linear  # the original is untouched


def test_serialised_leaves_load_both_ways(tmp_path):
  inserted = beqx.insert(MLP, where=eqx.nn.Linear)
  trained = jax.tree.map(lambda a: a + 1.0 if eqx.is_inexact_array(a) else a, MLP)
  eqx.tree_serialise_leaves(tmp_path / "plain.eqx", trained)
  loaded = eqx.tree_deserialise_leaves(tmp_path / "plain.eqx", inserted)
  assert type(loaded.layers[0]).__name__ == "LinearWithBGN"
  chex.assert_trees_all_equal(leaves(loaded), leaves(trained))
  eqx.tree_serialise_leaves(tmp_path / "inserted.eqx", loaded)
  back = eqx.tree_deserialise_leaves(tmp_path / "inserted.eqx", MLP)
  assert type(back.layers[0]) is eqx.nn.Linear
  chex.assert_trees_all_equal(leaves(back), leaves(trained))


def test_inserting_again_adds_no_second_node_and_other_options_are_an_error():
  once = beqx.insert(MLP, where=eqx.nn.Linear)
  twice = beqx.insert(once, where=eqx.nn.Linear)
  assert jax.tree.structure(twice) == jax.tree.structure(once)
  assert type(twice.layers[0]).__mro__[1] is eqx.nn.Linear  # one subclass, not two
  # A second insert may add nodes where there were none; the old ones stay single.
  first_only = beqx.insert(MLP, where="layers/0")
  both = beqx.insert(first_only, where=eqx.nn.Linear)
  assert_same_grads(batched, both, per_example(hand_mlp), MLP, X)
  with pytest.raises(ValueError, match=r"'layers/0' \(Linear\) already has a BGN node.*remove"):
    beqx.insert(once, where=eqx.nn.Linear, power=0.5)
  with pytest.raises(ValueError, match="position='before'"):
    beqx.insert(once, where="layers/1", position="before")


def test_remove_gives_back_the_plain_structure_and_the_same_leaves():
  inserted = beqx.insert(BLOCK, where=eqx.nn.Linear)
  removed = beqx.remove(inserted)
  assert jax.tree.structure(removed) == jax.tree.structure(BLOCK)
  assert all(a is b for a, b in zip(leaves(removed), leaves(BLOCK), strict=True))
  assert type(inserted.mlp.layers[0]).__name__ == "LinearWithBGN"  # not modified
  assert beqx.remove(BLOCK) is BLOCK
  # An optax state made for the plain model fits the removed one.
  optimizer = optax.adam(1e-2)
  state = optimizer.init(eqx.filter(MLP, eqx.is_array))
  removed = beqx.remove(beqx.insert(MLP, where=eqx.nn.Linear))
  g = eqx.filter_grad(loss_fn)(removed, X)
  updates, _ = optimizer.update(g, state, eqx.filter(removed, eqx.is_array))
  assert jax.tree.structure(updates) == jax.tree.structure(eqx.filter(MLP, eqx.is_array))
  with pytest.raises(TypeError, match="equinox.remove: `model` must be an eqx.Module"):
    beqx.remove([MLP])


def test_optax_state_moves_by_its_leaves_or_stays_with_an_insert_inside_the_loss():
  optimizer = optax.adam(1e-2)

  def step(model, state, loss):
    g = eqx.filter_grad(loss)(model)
    updates, state = optimizer.update(g, state, eqx.filter(model, eqx.is_array))
    return eqx.apply_updates(model, updates), state

  def with_nodes(model):
    return loss_of_outputs(batched(model, X))

  def inserted_inside(model):  # the plain model trained; the nodes only inside the loss
    return loss_of_outputs(batched(beqx.insert(model, where=eqx.nn.Linear), X))

  def by_hand(model):
    return loss_of_outputs(per_example(hand_mlp)(model, X))

  @eqx.filter_jit
  def steps(model, state):
    inserted = beqx.insert(model, where=eqx.nn.Linear)
    # The state made for the plain model does not fit the inserted one ...
    with pytest.raises(ValueError, match="WithBGN"):
      step(inserted, state, with_nodes)
    # ... moved by its leaves, it does.
    target = jax.tree.structure(optimizer.init(eqx.filter(inserted, eqx.is_array)))
    moved = jax.tree.unflatten(target, jax.tree.leaves(state))
    return (
      step(inserted, moved, with_nodes),
      step(model, state, inserted_inside),
      step(model, state, by_hand),
    )

  state = optimizer.init(eqx.filter(MLP, eqx.is_array))
  (inserted_1, moved_1), (inside_1, inside_state), (hand_1, hand_state) = steps(MLP, state)
  assert type(inserted_1.layers[0]).__name__ == "LinearWithBGN"
  assert jax.tree.structure(inside_1) == jax.tree.structure(MLP)
  chex.assert_trees_all_equal(leaves(inserted_1), leaves(inside_1), leaves(hand_1))
  chex.assert_trees_all_equal(
    jax.tree.leaves(moved_1), jax.tree.leaves(inside_state), jax.tree.leaves(hand_state)
  )


class PassThrough(eqx.Module):
  linear: eqx.nn.Linear

  def __call__(self, x):
    return self.linear(x), self.linear.weight, jnp.arange(3)


def test_parameters_passed_through_get_no_node():
  model = PassThrough(build(lambda key: eqx.nn.Linear(4, 3, key=key)))
  inserted = beqx.insert(model, where=PassThrough)
  records = beqx.placements(inserted, X[0])
  assert [(r.leaf, r.reason) for r in records] == [
    ("[0]", None),
    ("[1]", "a parameter of the module, passed through"),
    ("[2]", "not floating-point (int32)"),
  ]
  assert "1 nodes applied 1 times, 2 skipped" in str(records)

  def loss(model, x):
    y, w, _ = model(x)
    return loss_of_outputs(y) + jnp.sum(w**2)

  def hand(model, x):
    y = bgn(model.linear(x), target_norm=math.sqrt(3))
    return loss_of_outputs(y) + jnp.sum(model.linear.weight**2)

  @eqx.filter_jit
  def both(inserted, model, x):
    return leaves(eqx.filter_grad(loss)(inserted, x)), leaves(eqx.filter_grad(hand)(model, x))

  got, want = both(inserted, model, X[0])
  chex.assert_trees_all_equal(got, want)


# --- grad_norms ----------------------------------------------------------------------------


@functools.cache
def hand_mlp_norms(inserted):
  """Norms by hand after each Linear of MLP: at a zero perturbation where the Linear
  returns (before the node, if any: "output") and after the node ("at_bgn")."""
  model, x = MLP, X
  widths = [layer.out_features for layer in model.layers]

  @jax.jit
  def norms(arrays):
    perturbations = [jnp.zeros((BATCH, w)) for w in widths]
    static = eqx.filter(model, eqx.is_inexact_array, inverse=True)

    def loss(arrays, before, after):
      model = eqx.combine(arrays, static)
      h = x
      for i, layer in enumerate(model.layers):
        h = jax.vmap(layer)(h) + before[i]
        if inserted:
          h = bgn(h, axes=1, target_norm="sqrt_units") + after[i]
        h = model.activation(h) if i < len(model.layers) - 1 else model.final_activation(h)
      return loss_of_outputs(h)

    g_model, g_before, g_after = jax.grad(loss, argnums=(0, 1, 2))(
      arrays, perturbations, perturbations
    )
    report = {}
    for i in range(len(widths)):
      report[f"layers/{i}"] = {"output": l2_norm(g_before[i]), "params": norm_of(g_model.layers[i])}
      if inserted:
        report[f"layers/{i}"]["at_bgn"] = l2_norm(g_after[i])
    return report

  return norms(eqx.filter(model, eqx.is_inexact_array))


@pytest.mark.parametrize("inserted", [False, True], ids=["plain", "inserted"])
def test_grad_norms_of_an_mlp_over_the_whole_batch(inserted):
  measured = beqx.insert(MLP, where=eqx.nn.Linear) if inserted else MLP
  # scaled_loss: the plain pass compiled here serves the tiny and huge gradients below.
  report = beqx.grad_norms(scaled_loss, where=eqx.nn.Linear)(measured, X, on_device(1.0))
  assert list(report) == ["layers/0", "layers/1", "layers/2"]
  chex.assert_trees_all_close(dict(report), hand_mlp_norms(inserted), rtol=1e-6)


def test_grad_norms_sees_an_insert_inside_the_loss():
  def inserting_loss(model, x):
    return loss_fn(beqx.insert(model, where=eqx.nn.Linear), x)

  report = beqx.grad_norms(inserting_loss, where=eqx.nn.Linear)(MLP, X)
  chex.assert_trees_all_close(dict(report), hand_mlp_norms(True), rtol=1e-6)


def test_grad_norms_under_filter_jit():
  jitted = eqx.filter_jit(beqx.grad_norms(loss_fn, where=r"layers/\d"))
  report = jitted(MLP, X)
  assert list(report) == ["layers/0", "layers/1", "layers/2"]
  chex.assert_trees_all_close(dict(report), hand_mlp_norms(False), rtol=1e-6)


class Residual(eqx.Module):
  lin: eqx.nn.Linear

  def __call__(self, x, p=None, q=None):  # p, q: perturbations placed by hand
    h = self.lin(x)
    h = h if p is None else h + p
    y = beqx.BGN()(h)
    return jnp.tanh(y if q is None else y + q) * 3 + h


def test_grad_norms_in_a_residual_block_with_a_bgn_layer():
  # "output" is dL/dh over both of h's consumers; "at_bgn" the gradient the BGN
  # layer gets from above, before it normalizes it.
  model = Residual(build(lambda key: eqx.nn.Linear(4, 4, key=key)))
  report = beqx.grad_norms(loss_fn, where=eqx.nn.Linear)(model, X)

  @jax.jit
  def hand(p, q):
    g_model, g_p, g_q = jax.grad(
      lambda m, p, q: loss_of_outputs(jax.vmap(m)(X, p, q)), argnums=(0, 1, 2)
    )(model, p, q)
    return {"output": l2_norm(g_p), "params": norm_of(g_model), "at_bgn": l2_norm(g_q)}

  want = hand(zeros(BATCH, 4), zeros(BATCH, 4))
  chex.assert_trees_all_close(dict(report), {"lin": want}, rtol=1e-6)
  # Without the residual path the two would be the normalized and the raw gradient:
  # here they differ from both.
  assert not np.isclose(want["output"], want["at_bgn"], rtol=1e-2)


class TwoOutputs(eqx.Module):
  """Returns (main, aux); the loss below uses main only."""

  main: eqx.nn.Linear
  aux: eqx.nn.Linear

  def __call__(self, x, p=None):  # p: a perturbation of main, placed by hand
    main = self.main(x) if p is None else self.main(x) + p
    return main, self.aux(x)


def test_grad_norms_of_a_module_with_an_output_the_loss_ignores():
  # The ignored output's cotangent is zero and fixed at compile time: its node must
  # give zeros, not NaN, and the used output is measured as without it.
  keys = jax.random.split(jax.random.key(0))
  model = build(
    lambda key: TwoOutputs(eqx.nn.Linear(4, 4, key=keys[0]), eqx.nn.Linear(4, 4, key=keys[1]))
  )

  def loss(model, x):
    return loss_of_outputs(jax.vmap(model)(x)[0])

  plain = beqx.grad_norms(loss, where=TwoOutputs)(model, X)
  inserted = beqx.grad_norms(loss, where=TwoOutputs)(beqx.insert(model, where=TwoOutputs), X)

  @jax.jit
  def hand(p):
    g_model, g_p = jax.grad(lambda m, p: loss_of_outputs(jax.vmap(m)(X, p)[0]), argnums=(0, 1))(
      model, p
    )
    return {"output": l2_norm(g_p), "params": norm_of(g_model)}

  want = hand(zeros(BATCH, 4))
  chex.assert_trees_all_close(dict(plain), {"": want}, rtol=1e-6)
  got = inserted[""]
  np.testing.assert_allclose(got["at_bgn"], want["output"], rtol=1e-6)
  np.testing.assert_allclose(got["output"], math.sqrt(BATCH * 4), rtol=1e-6)
  assert np.isfinite(got["params"])


class StackThenAct(Stack):
  """The stack, then its layers' Lambda once more, outside the scan."""

  def __call__(self, x, hand=None):
    return self.layers.act(super().__call__(x, hand))


def test_grad_norms_per_scanned_layer_with_and_without_parameters():
  model = build(StackThenAct)
  report = beqx.grad_norms(loss_fn, where=(Layer, eqx.nn.Lambda))(model, X)
  # The Lambda inside the scan gets one value per layer (the layer count taken from
  # the Linear beside it); called outside the scan, one value.
  assert list(report) == ["layers/act", "layers", "layers/act#1"]

  @eqx.filter_jit
  def hand(model, p_linear, p_act, p_final):
    def loss(model, p_linear, p_act, p_final):
      dynamic, static = eqx.partition(model.layers, eqx.is_array)

      def step(h, inputs):
        arrays, p, q = inputs
        layer = eqx.combine(arrays, static)

        def one(h, p, q):  # Layer.__call__, perturbed at the Lambda's and the Layer's output
          return 2.0 * (layer.act(layer.linear(h)) + q) + p

        return jax.vmap(one)(h, p, q), None

      h = jax.lax.scan(step, X, (dynamic, p_linear, p_act))[0]
      return loss_of_outputs(model.layers.act(h) + p_final)

    grads = eqx.filter_grad(lambda a: loss(*a))((model, p_linear, p_act, p_final))
    g_model, g_layer, g_act, g_final = grads
    params = [g.reshape(3, -1) for g in leaves(g_model.layers)]
    return {
      "layers/act": {"output": l2_norm(g_act, axes=(1, 2)), "params": jnp.zeros(3)},
      "layers": {
        "output": l2_norm(g_layer, axes=(1, 2)),
        "params": l2_norm(jnp.concatenate(params, axis=1), axes=1),
      },
      "layers/act#1": {"output": l2_norm(g_final), "params": jnp.zeros(())},
    }

  want = hand(model, zeros(3, BATCH, 4), zeros(3, BATCH, 4), zeros(BATCH, 4))
  chex.assert_trees_all_close(dict(report), want, rtol=1e-6)


class Repeat(eqx.Module):
  """A module without parameters at every step of a scan over no stacked array."""

  act: eqx.nn.Lambda
  linear: eqx.nn.Linear | None

  def __call__(self, x, p=None):
    def step(h, p_step):
      h = self.act(h)
      return (h if p is None else h + p_step), None

    h = jax.lax.scan(step, x, p, length=3)[0]
    return h if self.linear is None else self.linear(h)


@pytest.mark.parametrize("with_linear", [False, True], ids=["no_parameters", "a_linear"])
def test_grad_norms_of_a_module_without_parameters_in_a_scan_is_one_value_over_all_steps(
  with_linear,
):
  linear = build(lambda key: eqx.nn.Linear(4, 4, key=key)) if with_linear else None
  model = Repeat(eqx.nn.Lambda(jnp.tanh), linear)
  report = beqx.grad_norms(loss_fn, where=eqx.nn.Lambda)(model, X)

  @jax.jit
  def hand(p):  # one perturbation per step: the documented value is their norm together
    g_p = jax.grad(lambda p: loss_of_outputs(jax.vmap(model, in_axes=(0, 1))(X, p)))(p)
    return l2_norm(g_p)

  chex.assert_trees_all_close(
    dict(report),
    {"act": {"output": hand(zeros(3, BATCH, 4)), "params": np.zeros(())}},
    rtol=1e-6,
  )


class Twice(eqx.Module):
  linear: eqx.nn.Linear

  def __call__(self, x):
    return self.linear(jnp.tanh(self.linear(x)))


def test_grad_norms_of_a_module_called_twice():
  model = Twice(build(lambda key: eqx.nn.Linear(4, 4, key=key)))
  report = beqx.grad_norms(loss_fn, where=eqx.nn.Linear)(model, X)
  assert list(report) == ["linear", "linear#1"]

  @jax.jit
  def hand(model, p0, p1):
    def loss(model, p0, p1):
      h = jax.vmap(model.linear)(X) + p0
      return loss_of_outputs(jax.vmap(model.linear)(jnp.tanh(h)) + p1)

    g_model, g0, g1 = jax.grad(loss, argnums=(0, 1, 2))(model, p0, p1)
    params = norm_of(g_model)
    return {
      "linear": {"output": l2_norm(g0), "params": params},
      "linear#1": {"output": l2_norm(g1), "params": params},
    }

  chex.assert_trees_all_close(
    dict(report), hand(model, zeros(BATCH, 4), zeros(BATCH, 4)), rtol=1e-6
  )


def test_grad_norms_of_tiny_and_huge_gradients():
  want = hand_mlp_norms(False)["layers/0"]["output"]
  for scale in (1e-30, 1e30):  # one compilation: the scale is an argument
    report = beqx.grad_norms(scaled_loss, where=eqx.nn.Linear)(MLP, X, on_device(scale))
    np.testing.assert_allclose(report["layers/0"]["output"], scale * want, rtol=1e-5)


# --- bad inputs ----------------------------------------------------------------------------


def test_bad_inputs_name_the_argument():
  model = MLP
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
    beqx.grad_norms(None, where=eqx.nn.Linear)(model)
  with pytest.raises(ValueError, match="matched no module"):
    beqx.grad_norms(loss_fn, where="nothing")(model, jnp.ones((2, 4)))
  with pytest.raises(ValueError, match="called none"):
    beqx.grad_norms(lambda m: jnp.zeros(()), where=eqx.nn.Linear)(model)
