"""Tests of bgn_jax.insert (linen) against the same models with bgn_jax.bgn written by hand.

Every ``Hand*`` model below is the reference: it places ``bgn`` explicitly where
insert is expected to put it, has the same parameter tree, and so must give the
same forward values and the same gradients, bit for bit.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bgn_jax
from bgn_jax import bgn
from tests.reference import INSERT_BAD_ARGUMENTS, assert_trees_differ, inputs

WIDTH = 8
TRANSFORMS = {"eager": lambda f: f, "jit": jax.jit}


def loss_grads(apply_fn, variables, *args, **kwargs):
  """Gradients w.r.t. the params of a loss on ``apply_fn``'s output (a value, not a tuple)."""

  def loss(params):
    y = apply_fn({**variables, "params": params}, *args, **kwargs)
    return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y))

  return jax.grad(loss)(variables["params"])


# ---------------------------------------------------------------- models


class MLP(nn.Module):
  """Dense layers; ``hand_after``/``hand_before``: layer indices with a bgn written by hand."""

  depth: int = 4
  hand_after: Sequence[int] = ()
  hand_before: Sequence[int] = ()
  hand_output: bool = False
  options: tuple = ()

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      if i in self.hand_before:
        x = bgn(x, **dict(self.options))
      x = nn.Dense(WIDTH, use_bias=i % 2 == 0)(x)
      if i in self.hand_after:
        x = bgn(x, **dict(self.options))
      x = jnp.tanh(x)
    if self.hand_output:
      x = bgn(x, **dict(self.options))
    return x


def mlp_setup(**hand):
  x = inputs((5, 6))
  model, reference = MLP(), MLP(**hand)
  variables = model.init(jax.random.key(0), x)
  return model, reference, variables, x


def check_against_hand(model, reference, variables, *args, transform=jax.jit, **insert_args):
  """Forward values and gradients of insert(model) against the hand model, in one program."""
  with_bgn = bgn_jax.insert(model.apply, **insert_args)

  def run(variables, *args):
    return (
      with_bgn(variables, *args),
      model.apply(variables, *args),
      loss_grads(with_bgn, variables, *args),
      loss_grads(reference.apply, variables, *args),
      loss_grads(model.apply, variables, *args),
    )

  y, plain_y, got, expected, plain = transform(run)(variables, *args)
  chex.assert_trees_all_equal(y, plain_y)
  chex.assert_trees_all_equal(got, expected)
  assert_trees_differ(got, plain)


@pytest.mark.parametrize("transform", TRANSFORMS.values(), ids=TRANSFORMS.keys())
def test_mlp_parameters_forward_and_gradients(transform):
  model, reference, variables, x = mlp_setup(hand_after=(0, 1, 2, 3))
  check_against_hand(model, reference, variables, x, transform=transform, where=nn.Dense)
  init_with_bgn = bgn_jax.insert(model.init, where=nn.Dense)
  chex.assert_trees_all_equal(transform(init_with_bgn)(jax.random.key(0), x), variables)


@pytest.mark.parametrize(
  "where, hand_after",
  [
    (nn.Dense, (0, 1, 2, 3)),
    ((nn.Dense, nn.Conv), (0, 1, 2, 3)),
    (lambda m: isinstance(m, nn.Dense) and not m.use_bias, (1, 3)),
    (r"Dense_[02]$", (0, 2)),
    (re.compile(r"^Dense_3"), (3,)),
  ],
  ids=["class", "tuple", "predicate", "regex", "compiled-regex"],
)
def test_where_forms(where, hand_after):
  model, reference, variables, x = mlp_setup(hand_after=hand_after)
  check_against_hand(model, reference, variables, x, where=where)


@pytest.mark.parametrize("every, hand_after", [(2, (0, 2)), (3, (0, 3)), (4, (0,)), (9, (0,))])
def test_every_keeps_matches_from_the_first(every, hand_after):
  model, reference, variables, x = mlp_setup(hand_after=hand_after)
  check_against_hand(model, reference, variables, x, where=nn.Dense, every=every)


def test_position_before_normalizes_the_inputs():
  model, reference, variables, x = mlp_setup(hand_before=(1, 3))
  check_against_hand(model, reference, variables, x, where=r"Dense_[13]", position="before")


def test_bgn_options_reach_every_node():
  options = (("axes", 1), ("target_norm", 2.0), ("power", 0.5), ("eps", 1e-3))
  model, reference, variables, x = mlp_setup(hand_after=(0, 1, 2, 3), options=options)
  check_against_hand(model, reference, variables, x, where=nn.Dense, **dict(options))


@pytest.mark.parametrize("where", [MLP, r"^$"], ids=["class", "empty-path"])
def test_top_level_module_is_matchable(where):
  model, reference, variables, x = mlp_setup(hand_output=True)
  check_against_hand(model, reference, variables, x, where=where)


# ---------------------------------------------------------------- setup and other methods


class AutoEncoder(nn.Module):
  hand: bool = False

  def setup(self):
    self.encoder = nn.Dense(4)
    self.decoder = nn.Dense(6)

  def encode(self, x):
    z = self.encoder(x)
    return bgn(z) if self.hand else z

  def __call__(self, x):
    z = jnp.tanh(self.encode(x))
    y = self.decoder(z)
    return bgn(y) if self.hand else y


def test_setup_submodules_and_a_method_given_to_apply():
  model, reference = AutoEncoder(), AutoEncoder(hand=True)
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  check_against_hand(model, reference, variables, x, where=r"^(encoder|decoder)$")
  encode = bgn_jax.insert(functools.partial(model.apply, method=model.encode), where=nn.Dense)
  hand_encode = functools.partial(reference.apply, method=reference.encode)

  @jax.jit
  def run(variables, x):
    return (
      encode(variables, x),
      model.apply(variables, x, method=model.encode),
      loss_grads(encode, variables, x),
      loss_grads(hand_encode, variables, x),
    )

  z, plain_z, got, expected = run(variables, x)
  chex.assert_trees_all_equal(z, plain_z)
  chex.assert_trees_all_equal(got, expected)
  assert np.any(got["encoder"]["kernel"] != 0)


def test_only_call_is_intercepted():
  # The top-level module runs only `encode` here, so a `where` for it matches nothing.
  model = AutoEncoder()
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  encode = bgn_jax.insert(functools.partial(model.apply, method="encode"), where=AutoEncoder)
  with pytest.raises(ValueError, match=r"Dense at 'encoder'"):
    encode(variables, x)


# ---------------------------------------------------------------- called twice


class Twice(nn.Module):
  """Dense_0, then Dense_1 called twice (shared weights), then Dense_2."""

  hand: Sequence[str] = ()  # the layers with a bgn written by hand, at each of their calls

  @nn.compact
  def __call__(self, x):
    layers = [nn.Dense(WIDTH, name=f"Dense_{i}") for i in range(3)]
    for layer in (layers[0], layers[1], layers[1], layers[2]):
      h = layer(x)
      x = jnp.tanh(bgn(h) if layer.name in self.hand else h)
    return x


@pytest.mark.parametrize(
  "every, hand",
  [
    (1, ("Dense_0", "Dense_1", "Dense_2")),
    # Counting calls instead would keep Dense_0 and the second call of Dense_1.
    (2, ("Dense_0", "Dense_2")),
    (3, ("Dense_0",)),
  ],
)
def test_module_called_twice_is_one_match(every, hand):
  model, reference = Twice(), Twice(hand=hand)
  x = inputs((5, WIDTH))
  variables = model.init(jax.random.key(0), x)
  check_against_hand(model, reference, variables, x, where=nn.Dense, every=every)


# ---------------------------------------------------------------- lifted transforms


class ScanBody(nn.Module):
  dense_per_body: int = 1
  hand: Sequence[int] = ()

  @nn.compact
  def __call__(self, x, _):
    for i in range(self.dense_per_body):
      x = nn.Dense(WIDTH)(x)
      x = jnp.tanh(bgn(x) if i in self.hand else x)
    return x, None


class ScanStack(nn.Module):
  """Dense, an nn.scan stack of ``length`` bodies, Dense; ``hand_*``: bgn by hand."""

  length: int = 50
  dense_per_body: int = 1
  hand_body: Sequence[int] = ()
  hand_outer: Sequence[int] = ()

  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH)(x)
    x = bgn(x) if 0 in self.hand_outer else x
    stack = nn.scan(
      ScanBody,
      variable_axes={"params": 0},
      split_rngs={"params": True},
      length=self.length,
    )
    x, _ = stack(self.dense_per_body, self.hand_body, name="stack")(x, None)
    x = nn.Dense(WIDTH)(x)
    return bgn(x) if 1 in self.hand_outer else x


def scan_setup(dense_per_body=1, **hand):
  x = inputs((3, WIDTH))
  model = ScanStack(dense_per_body=dense_per_body)
  reference = ScanStack(dense_per_body=dense_per_body, **hand)
  return model, reference, model.init(jax.random.key(0), x), x


def test_scan_stack_of_50_layers_gets_a_node_in_every_layer():
  model, reference, variables, x = scan_setup(hand_body=(0,))
  assert variables["params"]["stack"]["Dense_0"]["kernel"].shape == (50, WIDTH, WIDTH)
  check_against_hand(model, reference, variables, x, where=r"^stack/")


@pytest.mark.parametrize(
  "dense_per_body, hand",
  [
    # Matches: Dense_0, stack/Dense_0, Dense_1. If the second trace of the body that
    # nn.scan makes counted again, every=2 would keep stack/Dense_0 and drop Dense_1.
    (1, dict(hand_outer=(0, 1))),
    # Matches: Dense_0, stack/Dense_0, stack/Dense_1, Dense_1: every=2 keeps Dense_0
    # and stack/Dense_1, in every layer of the stack.
    (2, dict(hand_outer=(0,), hand_body=(1,))),
  ],
)
def test_scan_body_counts_once_for_every(dense_per_body, hand):
  model, reference, variables, x = scan_setup(dense_per_body, **hand)
  check_against_hand(model, reference, variables, x, where=nn.Dense, every=2)


class TanhDense(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x, hand_call: bool = False):
    x = nn.Dense(WIDTH)(x)
    return jnp.tanh(bgn(x) if self.hand or hand_call else x)


class RematModel(nn.Module):
  hand: Sequence[int] = ()

  @nn.compact
  def __call__(self, x):
    block = nn.remat(TanhDense)
    x = block(hand=0 in self.hand, name="first")(x)
    return block(hand=1 in self.hand, name="second")(x)


@pytest.mark.parametrize("every, hand", [(1, (0, 1)), (2, (0,))])
def test_remat_blocks(every, hand):
  model, reference = RematModel(), RematModel(hand=hand)
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  check_against_hand(model, reference, variables, x, where=nn.Dense, every=every)


class RematTwice(nn.Module):
  """Dense_0, then one remat block called twice: two separate traces of one body."""

  hand: Sequence[int] = ()  # 0: Dense_0; 1, 2: the two calls of the block

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH)(x)
    x = jnp.tanh(bgn(h) if 0 in self.hand else h)
    shared = nn.remat(TanhDense, static_argnums=(2,))(name="shared")
    return shared(shared(x, 1 in self.hand), 2 in self.hand)


@pytest.mark.parametrize("every, hand", [(1, (0, 1, 2)), (2, (0,))])
def test_remat_block_called_twice_is_one_match(every, hand):
  model, reference = RematTwice(), RematTwice(hand=hand)
  x = inputs((5, WIDTH))
  variables = model.init(jax.random.key(0), x)
  check_against_hand(model, reference, variables, x, where=nn.Dense, every=every)


class VmapModel(nn.Module):
  """nn.vmap over the leading axis, one Dense per instance (per-instance parameters)."""

  hand: bool = False

  @nn.compact
  def __call__(self, x):
    vmapped = nn.vmap(
      TanhDense,
      in_axes=0,
      out_axes=0,
      variable_axes={"params": 0},
      split_rngs={"params": True},
    )
    return vmapped(hand=self.hand, name="instances")(x)


def test_vmap_normalizes_each_mapped_instance():
  model, reference = VmapModel(), VmapModel(hand=True)
  x = inputs((3, 5, 6))
  variables = model.init(jax.random.key(0), x)
  assert variables["params"]["instances"]["Dense_0"]["kernel"].shape == (3, 6, WIDTH)
  check_against_hand(model, reference, variables, x, where=nn.Dense)


class SharedVmap(nn.Module):
  """nn.vmap over examples with broadcast parameters and a named axis."""

  axis_name: str | None = "batch"

  @nn.compact
  def __call__(self, x):
    vmapped = nn.vmap(
      nn.Dense,
      in_axes=0,
      out_axes=0,
      variable_axes={"params": None},
      split_rngs={"params": False},
      axis_name=self.axis_name,
    )
    return jnp.tanh(vmapped(WIDTH, name="dense")(x))


class HandBatched(nn.Module):
  """SharedVmap's Dense on the whole batch, with a bgn by hand over ``axes``."""

  axes: int | None = None

  @nn.compact
  def __call__(self, x):
    return jnp.tanh(bgn(nn.Dense(WIDTH, name="dense")(x), axes=self.axes))


def test_vmap_with_axis_name_normalizes_the_whole_batch():
  model = SharedVmap()
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  check_against_hand(model, HandBatched(), variables, x, where=nn.Dense, axis_name="batch")


def test_vmap_without_axis_name_normalizes_each_example():
  model = SharedVmap(axis_name=None)
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  with_bgn = bgn_jax.insert(model.apply, where=nn.Dense)
  grads = jax.jit(loss_grads, static_argnums=0)
  got = grads(with_bgn, variables, x)
  per_example = grads(HandBatched(axes=1).apply, variables, x)
  whole_batch = grads(HandBatched().apply, variables, x)
  for name in ("kernel", "bias"):
    np.testing.assert_allclose(got["dense"][name], per_example["dense"][name], rtol=1e-6)
    assert not np.allclose(got["dense"][name], whole_batch["dense"][name], rtol=1e-3)


# ---------------------------------------------------------------- ResNet with BatchNorm


class ResidualBlock(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Conv(4, (3, 3))(x)
    h = nn.relu(nn.BatchNorm(use_running_average=False, axis_name="batch")(h))
    h = nn.Conv(4, (3, 3))(h)
    h = nn.BatchNorm(use_running_average=False, axis_name="batch")(h)
    y = nn.relu(x + h)
    return bgn(y, axis_name="batch") if self.hand else y


class ResNet(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    for _ in range(2):
      x = ResidualBlock(self.hand)(x)
    return nn.Dense(3)(jnp.mean(x, axis=(0, 1)))


def resnet_loss(apply_fn, params, batch_stats, images):
  """Loss and new batch_stats of a per-example apply, vmapped over the named batch axis."""

  def per_example(image):
    return apply_fn({"params": params, "batch_stats": batch_stats}, image, mutable=["batch_stats"])

  logits, updates = jax.vmap(per_example, axis_name="batch")(images)
  return jnp.sum(jnp.sin(logits)), (logits, updates)


def test_resnet_with_batchnorm_in_train_mode():
  model, reference = ResNet(), ResNet(hand=True)
  images = inputs((4, 6, 6, 4))
  variables = jax.vmap(model.init, in_axes=(None, 0), axis_name="batch")(jax.random.key(0), images)
  variables = jax.tree.map(lambda v: v[0], variables)
  with_bgn = bgn_jax.insert(model.apply, where=ResidualBlock, axis_name="batch")

  @jax.jit
  def run(params, batch_stats, images):
    return [
      jax.grad(functools.partial(resnet_loss, apply_fn), has_aux=True)(params, batch_stats, images)
      for apply_fn in (with_bgn, reference.apply, model.apply)
    ]

  got, expected, plain = run(variables["params"], variables["batch_stats"], images)
  (logits, updates), (plain_logits, plain_updates) = got[1], plain[1]
  chex.assert_trees_all_equal(logits, plain_logits)
  chex.assert_trees_all_equal(updates, plain_updates)
  chex.assert_trees_all_equal(updates, expected[1][1])
  assert_trees_differ(updates["batch_stats"], variables["batch_stats"])
  chex.assert_trees_all_equal(got[0], expected[0])
  assert_trees_differ(got[0], plain[0])


# ---------------------------------------------------------------- Transformer block


class TransformerBlock(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x, mask=None):
    mark = bgn if self.hand else (lambda y: y)
    h = nn.LayerNorm()(x)
    h = mark(nn.MultiHeadDotProductAttention(num_heads=2, name="attention")(h, mask=mask))
    x = x + h
    h = nn.LayerNorm()(x)
    h = nn.gelu(mark(nn.Dense(2 * WIDTH)(h)))
    return x + mark(nn.Dense(WIDTH)(h))


def test_transformer_block():
  model, reference = TransformerBlock(), TransformerBlock(hand=True)
  x = inputs((2, 5, WIDTH))
  mask = nn.make_causal_mask(jnp.ones((2, 5)))
  variables = model.init(jax.random.key(0), x, mask)
  where = (nn.MultiHeadDotProductAttention, nn.Dense)
  check_against_hand(model, reference, variables, x, mask, where=where)


# ---------------------------------------------------------------- rngs and mutable


class DropoutNet(nn.Module):
  @nn.compact
  def __call__(self, x, train: bool):
    x = nn.Dense(WIDTH)(x)
    x = nn.Dropout(0.5, deterministic=not train)(x)
    x = nn.BatchNorm(use_running_average=not train)(x)
    return nn.Dense(3)(x)


def test_rngs_and_mutable_pass_through():
  model = DropoutNet()
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x, train=False)
  with_bgn = bgn_jax.insert(model.apply, where=nn.Dense)
  arguments = dict(rngs={"dropout": jax.random.key(1)}, mutable=("batch_stats",), train=True)
  static = ("train", "mutable")
  got = jax.jit(with_bgn, static_argnames=static)(variables, x, **arguments)
  expected = jax.jit(model.apply, static_argnames=static)(variables, x, **arguments)
  chex.assert_trees_all_equal(got, expected)
  assert_trees_differ(got[1], {"batch_stats": variables["batch_stats"]})
  other_key = model.apply(variables, x, True, rngs={"dropout": jax.random.key(2)}, mutable=True)
  assert_trees_differ(got[0], other_key[0])


# ---------------------------------------------------------------- keyword arguments


class Gated(nn.Module):
  """``Dense(x) * scale``, the scale a keyword argument that carries gradient."""

  @nn.compact
  def __call__(self, x, *, scale):
    return nn.Dense(WIDTH)(x) * scale


class GatedNet(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    h = jnp.tanh(nn.Dense(WIDTH)(x))
    scale = jnp.tanh(nn.Dense(WIDTH)(x))
    return Gated(name="gated")(bgn(h) if self.hand else h, scale=scale)


VMAP = lambda run: jax.vmap(run, in_axes=(None, 0))  # noqa: E731


@pytest.mark.parametrize("transform", [jax.jit, VMAP], ids=["jit", "vmap"])
def test_position_before_leaves_keyword_arguments_alone(transform):
  model, reference = GatedNet(), GatedNet(hand=True)
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  if transform is VMAP:
    x = inputs((3, 5, 6))
  check_against_hand(
    model, reference, variables, x, transform=transform, where=Gated, position="before"
  )


# ---------------------------------------------------------------- jit caches


# Made once, as models do: each nn.jit(...) call makes a new class with a cache of its own.
JitTanhDense = nn.jit(TanhDense)
OtherJitTanhDense = nn.jit(TanhDense)  # the same program, another cache


class JitMethodTanhDense(nn.Module):
  """TanhDense with nn.jit on its __call__ (the decorator form)."""

  hand: bool = False

  @nn.jit
  @nn.compact
  def __call__(self, x):
    x = nn.Dense(WIDTH)(x)
    return jnp.tanh(bgn(x) if self.hand else x)


class OtherJitMethodTanhDense(JitMethodTanhDense):
  pass  # another class in nn.jit's cache key


class JitBlock(nn.Module):
  """Dense_0, then a TanhDense compiled with nn.jit."""

  hand: bool = False
  other: bool = False  # a class of the same program that no insert ever sees
  decorated: bool = False  # nn.jit on the method instead of on the class

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH)(x)
    x = jnp.tanh(bgn(h) if self.hand else h)
    if self.decorated:
      block = OtherJitMethodTanhDense if self.other else JitMethodTanhDense
    else:
      block = OtherJitTanhDense if self.other else JitTanhDense
    return block(hand=self.hand, name="block")(x)


@pytest.mark.parametrize("order", ["insert_first", "plain_first"])
def test_jit_compiled_apply_gets_nodes_and_its_plain_calls_never_do(order):
  model, reference, variables, x = mlp_setup(hand_after=(0, 1, 2, 3))
  compiled = jax.jit(model.apply)
  with_bgn = bgn_jax.insert(compiled, where=nn.Dense)
  expected = loss_grads(jax.jit(reference.apply), variables, x)
  plain = loss_grads(jax.jit(lambda v, x: model.apply(v, x)), variables, x)
  if order == "plain_first":
    chex.assert_trees_all_equal(loss_grads(compiled, variables, x), plain)
  chex.assert_trees_all_equal(loss_grads(with_bgn, variables, x), expected)
  chex.assert_trees_all_equal(loss_grads(with_bgn, variables, x), expected)  # a cached trace
  chex.assert_trees_all_equal(loss_grads(compiled, variables, x), plain)
  chex.assert_trees_all_equal(loss_grads(jax.jit(model.apply), variables, x), plain)
  assert_trees_differ(expected, plain)


@pytest.mark.parametrize(
  "order, decorated", [("insert_first", False), ("plain_first", False), ("insert_first", True)]
)
def test_nn_jit_inside_the_model_gets_nodes_and_its_plain_calls_never_do(order, decorated):
  model = JitBlock(decorated=decorated)
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  with_bgn = bgn_jax.insert(model.apply, where=nn.Dense)
  expected = loss_grads(JitBlock(hand=True, decorated=decorated).apply, variables, x)
  plain = loss_grads(JitBlock(other=True, decorated=decorated).apply, variables, x)
  if order == "plain_first":
    chex.assert_trees_all_equal(loss_grads(model.apply, variables, x), plain)
  chex.assert_trees_all_equal(loss_grads(with_bgn, variables, x), expected)
  chex.assert_trees_all_equal(loss_grads(with_bgn, variables, x), expected)
  chex.assert_trees_all_equal(loss_grads(model.apply, variables, x), plain)
  assert_trees_differ(expected, plain)


def test_every_counts_matches_inside_a_cached_nn_jit():
  # Dense_0, block/Dense_0 (inside nn.jit), then Dense_1 outside: every=2 keeps Dense_0
  # and Dense_1. A second call skips the cached block; numbering afresh would then
  # make Dense_1 the second match and drop its node.
  class Wrapped(nn.Module):
    hand: bool = False

    @nn.compact
    def __call__(self, x):
      x = JitBlock(hand=False, name="inner")(x)
      h = nn.Dense(WIDTH)(x)
      return bgn(h) if self.hand else h

  class HandInner(nn.Module):
    @nn.compact
    def __call__(self, x):
      h = nn.Dense(WIDTH)(x)
      x = jnp.tanh(bgn(h))
      return JitTanhDense(name="block")(x)

  class Hand(nn.Module):
    @nn.compact
    def __call__(self, x):
      return bgn(nn.Dense(WIDTH)(HandInner(name="inner")(x)))

  model = Wrapped()
  x = inputs((5, 6))
  variables = model.init(jax.random.key(0), x)
  with_bgn = bgn_jax.insert(model.apply, where=nn.Dense, every=2)
  expected = loss_grads(Hand().apply, variables, x)
  for _ in range(2):
    chex.assert_trees_all_equal(loss_grads(with_bgn, variables, x), expected)


# ---------------------------------------------------------------- nothing to normalize


VOCAB = 11


class WordDropout(nn.Module):
  """sst2's: replaces token ids at random by an unknown-word id (an int array out)."""

  rate: float = 0.3
  unk: int = 1

  @nn.compact
  def __call__(self, tokens):
    drop = jax.random.bernoulli(self.make_rng("dropout"), self.rate, tokens.shape)
    return jnp.where(drop, self.unk, tokens)


class TokenClassifier(nn.Module):
  """WordDropout, nn.Embed, mean over words, Dense (sst2's front end)."""

  @nn.compact
  def __call__(self, tokens):
    tokens = WordDropout()(tokens)
    x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
    return nn.Dense(3)(jnp.mean(x, axis=1))


class FrameNet(nn.Module):
  """ppo's: uint8 frames in, scaled to floats inside the model."""

  @nn.compact
  def __call__(self, frames):
    x = frames.astype(jnp.float32) / 255.0
    x = nn.relu(nn.Conv(4, (3, 3), strides=(2, 2))(x))
    return nn.Dense(3)(x.reshape((x.shape[0], -1)))


@pytest.mark.parametrize(
  "case, where, position, listed",
  [
    ("tokens", WordDropout, "after", "WordDropout at 'WordDropout_0' (int32[4, 5]"),
    ("tokens", nn.Embed, "before", "Embed at 'embed' (int32[4, 5]"),
    ("frames", FrameNet, "before", "FrameNet at '' (uint8[2, 8, 8, 3]"),
  ],
)
def test_matches_with_nothing_floating_to_normalize_are_an_error(case, where, position, listed):
  if case == "tokens":
    model = TokenClassifier()
    args = (jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (4, 5)), jnp.int32),)
    rngs = {"params": jax.random.key(0), "dropout": jax.random.key(1)}
  else:
    model = FrameNet()
    args = (jnp.asarray(np.random.default_rng(0).integers(0, 256, (2, 8, 8, 3)), jnp.uint8),)
    rngs = {"params": jax.random.key(0)}
  variables = model.init(rngs, *args)
  with_bgn = bgn_jax.insert(model.apply, where=where, position=position)
  what = "output" if position == "after" else "positional input"
  with pytest.raises(ValueError, match=re.escape("matched 1 module call(s), but none had a")):
    with_bgn(variables, *args, rngs={"dropout": jax.random.key(2)})
  with pytest.raises(ValueError, match=re.escape(f"floating-point {what}")) as error:
    jax.jit(with_bgn)(variables, *args, rngs={"dropout": jax.random.key(2)})
  assert listed in str(error.value)
  # A `where` that also matches a floating-point output places its node, and says nothing.
  mixed = bgn_jax.insert(model.apply, where=(where, nn.Dense), position=position)
  mixed(variables, *args, rngs={"dropout": jax.random.key(2)})


# ---------------------------------------------------------------- parameters passed through


class Cell(nn.RNNCellBase):
  """An nn.OptimizedLSTMCell named "lstm"; ``hand``: bgn on its outputs."""

  hand: bool = False

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return nn.OptimizedLSTMCell(WIDTH, parent=None).initialize_carry(rng, input_shape)

  @property
  def num_feature_axes(self) -> int:
    return 1

  @nn.compact
  def __call__(self, carry, x):
    (c, h), y = nn.OptimizedLSTMCell(WIDTH, name="lstm")(carry, x)
    if self.hand:
      (c, h), y = (bgn(c), bgn(h)), bgn(y)
    return (c, h), y


class Recurrent(nn.Module):
  """sst2's encoder shape: nn.Embed, then an nn.RNN over an OptimizedLSTMCell."""

  hand: bool = False

  @nn.compact
  def __call__(self, tokens):
    x = nn.Embed(VOCAB, WIDTH, name="embed")(tokens)
    return nn.RNN(Cell(self.hand, name="cell"), name="rnn")(x)


def recurrent_setup():
  tokens = jnp.asarray(np.random.default_rng(0).integers(0, VOCAB, (3, 4)), jnp.int32)
  model = Recurrent()
  return model, model.init(jax.random.key(0), tokens), tokens


def test_parameters_a_module_returns_never_get_a_node():
  # The regex covers the cell and its DenseParams, which return their kernel and bias.
  model, variables, tokens = recurrent_setup()
  check_against_hand(model, Recurrent(hand=True), variables, tokens, where=r"^cell/lstm")
  report = bgn_jax.linen.placements(
    bgn_jax.insert(model.apply, where=r"^cell/lstm"), variables, tokens
  )
  assert [(p.path, p.leaf) for p in report.nodes] == [
    ("cell/lstm", "[0][0]"),
    ("cell/lstm", "[0][1]"),
    ("cell/lstm", "[1]"),
  ]
  skipped = {(p.path, p.leaf): p.reason for p in report.skipped}
  assert len(skipped) == 12  # 8 DenseParams: 4 input kernels, 4 hidden kernels and biases
  assert skipped[("cell/lstm/hi", "[0]")] == (
    "the model variable 'params/cell/lstm/hi/kernel' passed through"
  )
  assert skipped[("cell/lstm/hi", "[1]")] == (
    "the model variable 'params/cell/lstm/hi/bias' passed through"
  )


def test_only_parameters_matched_is_an_error():
  model, variables, tokens = recurrent_setup()
  with_bgn = bgn_jax.insert(model.apply, where=r"^cell/lstm/")
  with pytest.raises(ValueError, match=r"matched 8 module call\(s\), but none had") as error:
    with_bgn(variables, tokens)
  assert "the model variable 'params/cell/lstm/ii/kernel' passed through" in str(error.value)


class Storing(nn.Module):
  """A block that keeps its output in a variable: sown, or assigned to one."""

  how: str
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    y = jnp.tanh(nn.Dense(6)(x))
    if self.how == "sow":
      self.sow("intermediates", "features", y)
    else:
      self.variable("cache", "last", jnp.zeros, y.shape).value = y
    return bgn(y) if self.hand else y


class StoringNet(nn.Module):
  how: str
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    for _ in range(2):
      x = Storing(self.how, self.hand)(x)
    return nn.Dense(3)(x)


@pytest.mark.parametrize("how", ["sow", "assign"])
def test_an_output_the_module_also_stores_gets_its_node(how):
  # The stored value is the output itself: a variable written by the call, not one
  # passed through (those exist when the call begins).
  x = inputs((4, 5))
  model, reference = StoringNet(how), StoringNet(how, hand=True)
  variables = model.init(jax.random.key(0), x)
  mutable = ["intermediates"] if how == "sow" else ["cache"]
  with_bgn = bgn_jax.insert(model.apply, where=Storing)

  def grads(apply_fn):
    def loss(params):
      y, _ = apply_fn({**variables, "params": params}, x, mutable=mutable)
      return jnp.sum(jnp.sin(3.0 * y) * jnp.cos(y))

    return jax.jit(jax.grad(loss))(variables["params"])

  chex.assert_trees_all_equal(grads(with_bgn), grads(reference.apply))
  assert_trees_differ(grads(with_bgn), grads(model.apply))
  report = bgn_jax.linen.placements(with_bgn, variables, x, mutable=mutable)
  assert [p.path for p in report.nodes] == ["Storing_0", "Storing_1"] and not report.skipped
  stored = with_bgn(variables, x, mutable=mutable)[1]
  chex.assert_trees_all_equal(stored, model.apply(variables, x, mutable=mutable)[1])


class Either(nn.Module):
  """Returns an activation, or with ``weights=True`` its own kernel."""

  @nn.compact
  def __call__(self, x, weights=False):
    dense = nn.Dense(3)
    y = dense(x)
    return dense.variables["params"]["kernel"] if weights else y


def test_every_call_that_matches_and_places_no_node_is_an_error():
  # The first call places a node; a later one whose matches give only a parameter
  # would otherwise run without BGN.
  x = inputs((4, 5))
  model = Either()
  variables = model.init(jax.random.key(0), x)
  with_bgn = bgn_jax.insert(model.apply, where=Either)
  with_bgn(variables, x)
  with pytest.raises(ValueError, match=r"matched 1 module call\(s\), but none had") as error:
    with_bgn(variables, x, weights=True)
  assert "the model variable 'params/Dense_0/kernel' passed through" in str(error.value)
  with_bgn(variables, x)  # a call with a node is still fine


# ---------------------------------------------------------------- nn.scan'd modules


class SimpleLSTM(nn.Module):
  """sst2's: an OptimizedLSTMCell with nn.scan on its __call__ (the decorator form)."""

  hand: bool = False

  @functools.partial(
    nn.transforms.scan,
    variable_broadcast="params",
    in_axes=1,
    out_axes=1,
    split_rngs={"params": False},
  )
  @nn.compact
  def __call__(self, carry, x):
    return Cell(self.hand, name="cell")(carry, x)


class ScannedCell(nn.Module):
  """nn.scan on a module class (the class form), then a Dense on the last output."""

  hand: bool = False
  decorated: bool = True

  @nn.compact
  def __call__(self, x):
    carry = (jnp.zeros((x.shape[0], WIDTH)), jnp.zeros((x.shape[0], WIDTH)))
    if self.decorated:
      lstm = SimpleLSTM(self.hand, name="lstm")
    else:
      scan = nn.scan(
        Cell, variable_broadcast="params", in_axes=1, out_axes=1, split_rngs={"params": False}
      )
      lstm = scan(self.hand, name="lstm")
    _, ys = lstm(carry, x)
    return nn.Dense(3)(ys[:, -1])


@pytest.mark.parametrize("decorated", [True, False], ids=["decorator", "class"])
def test_scanned_module_is_an_error_and_its_cell_gets_a_node_per_step(decorated):
  model = ScannedCell(decorated=decorated)
  x = inputs((2, 4, 6))
  variables = model.init(jax.random.key(0), x)
  where = SimpleLSTM if decorated else Cell
  with_bgn = bgn_jax.insert(model.apply, where=where)
  with pytest.raises(ValueError, match=r"at 'lstm', whose __call__ is the body of an nn.scan"):
    with_bgn(variables, x)
  with pytest.raises(ValueError, match=r"select the modules the body calls"):
    jax.jit(with_bgn)(variables, x)
  if decorated:
    reference = ScannedCell(hand=True, decorated=decorated)
    check_against_hand(model, reference, variables, x, where=r"^lstm/cell$")


# ---------------------------------------------------------------- placements


class ConvBlock(nn.Module):
  """A residual block: Conv, BatchNorm, relu, Conv, added to the input."""

  @nn.compact
  def __call__(self, x):
    h = nn.relu(nn.BatchNorm(use_running_average=False)(nn.Conv(4, (3, 3))(x)))
    return nn.relu(x + nn.Conv(4, (3, 3))(h))


class ConvNet(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = nn.Conv(4, (3, 3))(x)
    x = ConvBlock()(x)
    x = ConvBlock()(x)
    return nn.Dense(3)(jnp.mean(x, axis=(1, 2)))


def test_placements_on_residual_blocks_in_call_order_without_arithmetic():
  model = ConvNet()
  images = inputs((2, 6, 6, 3))
  variables = jax.eval_shape(model.init, jax.random.key(0), images)  # shapes only
  with_bgn = bgn_jax.insert(model.apply, where=(ConvBlock, nn.Conv, nn.BatchNorm), every=2)
  report = bgn_jax.linen.placements(with_bgn, variables, images, mutable=["batch_stats"])
  # Numbered as the calls begin (a block before its layers), listed as they return.
  assert [(p.path, p.module, p.reason) for p in report] == [
    ("Conv_0", "Conv", None),
    ("ConvBlock_0/Conv_0", "Conv", None),
    ("ConvBlock_0/BatchNorm_0", "BatchNorm", "every=2 (match 3)"),
    ("ConvBlock_0/Conv_1", "Conv", None),
    ("ConvBlock_0", "ConvBlock", "every=2 (match 1)"),
    ("ConvBlock_1/Conv_0", "Conv", None),
    ("ConvBlock_1/BatchNorm_0", "BatchNorm", "every=2 (match 7)"),
    ("ConvBlock_1/Conv_1", "Conv", None),
    ("ConvBlock_1", "ConvBlock", "every=2 (match 5)"),
  ]
  assert {(p.position, p.leaf, p.shape, p.dtype) for p in report} == {
    ("after", "", (2, 6, 6, 4), "float32")
  }
  lines = str(report).splitlines()
  assert lines[0].split() == [
    "path",
    "module",
    "position",
    "leaf",
    "shape",
    "dtype",
    "calls",
    "node",
  ]
  assert lines[2].split() == [
    "'Conv_0'",
    "Conv",
    "after",
    "-",
    "(2,",
    "6,",
    "6,",
    "4)",
    "float32",
    "1",
    "yes",
  ]
  assert lines[-1] == "5 nodes applied 5 times, 4 skipped"
  # position="before": the first positional argument of each Conv.
  before = bgn_jax.linen.placements(
    bgn_jax.insert(model.apply, where=nn.Conv, position="before"),
    variables,
    images,
    mutable=["batch_stats"],
  )
  assert [p.path for p in before.nodes] == [
    "Conv_0",
    "ConvBlock_0/Conv_0",
    "ConvBlock_0/Conv_1",
    "ConvBlock_1/Conv_0",
    "ConvBlock_1/Conv_1",
  ]
  assert [p.leaf for p in before] == ["[0]"] * 5
  assert before[0].shape == (2, 6, 6, 3)


def test_placements_needs_an_inserted_function():
  model, _, variables, x = mlp_setup()
  # A model without nodes is the same ValueError in every framework.
  with pytest.raises(ValueError, match=r"^bgn_jax.linen.placements: `fn` .* has no BGN node"):
    bgn_jax.linen.placements(model.apply, variables, x)
  with pytest.raises(TypeError, match=r"^bgn_jax.linen.placements: `fn` must be a function"):
    bgn_jax.linen.placements(3, variables, x)
  with pytest.raises(ValueError, match="matched no module __call__"):
    bgn_jax.linen.placements(bgn_jax.insert(model.apply, where=nn.Conv), variables, x)


class Seq2Seq(nn.Module):
  """wmt's shape: an encoder and a decoder of attention blocks, > 40 module calls."""

  @nn.compact
  def __call__(self, x):
    for side in ("encoder", "decoder"):
      for i in range(3):
        x = TransformerBlock(name=f"{side}_{i}")(x)
    return nn.Dense(WIDTH)(x)


def test_no_match_on_a_large_model_says_how_many_are_not_listed():
  model = Seq2Seq()
  x = inputs((1, 3, WIDTH))
  variables = jax.eval_shape(model.init, jax.random.key(0), x)
  with_bgn = bgn_jax.insert(model.apply, where=nn.Conv)
  with pytest.raises(ValueError, match="matched no module __call__") as error:
    jax.eval_shape(with_bgn, variables, x)
  message = str(error.value)
  seen = 1 + 6 * (1 + 2 + 1 + 4 + 2) + 1  # model, Dense; each block, its 2 LayerNorms,
  # its attention and the 4 DenseGenerals in it, its 2 Dense
  assert f"and {seen - 40} more not listed" in message
  assert "bgn_jax.linen.placements" in message


@pytest.mark.parametrize("api", ["insert", "grad_norms"])
def test_module_instance_as_where_is_a_type_error(api):
  model, _, variables, x = mlp_setup()
  with pytest.raises(TypeError, match=r"`where` is a module instance \(Dense\).*pass its class"):
    if api == "insert":
      bgn_jax.insert(model.apply, where=nn.Dense(4))
    else:
      bgn_jax.grad_norms(lambda v, x: jnp.sum(model.apply(v, x)), where=nn.Dense(4))(variables, x)


# ---------------------------------------------------------------- errors


def test_no_match_raises_at_the_first_call_listing_what_was_seen():
  model, _, variables, x = mlp_setup()
  with_bgn = bgn_jax.insert(model.apply, where=r"Conv")
  for transform in TRANSFORMS.values():
    with pytest.raises(ValueError, match="matched no module __call__") as error:
      transform(with_bgn)(variables, x)
    message = str(error.value)
    assert "MLP at ''" in message
    for i in range(4):
      assert f"Dense at 'Dense_{i}'" in message
    assert "'Conv'" in message


@pytest.mark.parametrize(("arguments", "error", "message"), INSERT_BAD_ARGUMENTS, ids=str)
def test_bad_arguments_are_rejected_at_insert(arguments, error, message):
  arguments = {"where": nn.Dense, **arguments}
  with pytest.raises(error, match=re.escape(message)):
    bgn_jax.insert(MLP().apply, **arguments)


def test_bad_apply_fn_and_axes_out_of_range():
  with pytest.raises(TypeError, match="`apply_fn` must be callable"):
    bgn_jax.insert(None, where=nn.Dense)
  model, _, variables, x = mlp_setup()
  # A negative and a positive axis that differ in rank 2 are accepted at insert time.
  bgn_jax.insert(model.apply, where=nn.Dense, axes=(1, -1))
  with_bgn = bgn_jax.insert(model.apply, where=nn.Dense, axes=2)
  with pytest.raises(ValueError, match="`axes` entry 2 is out of range for an input of rank 2"):
    with_bgn(variables, x)
