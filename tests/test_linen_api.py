"""linen: insert options (nesting, scan_body, export, refused options), dispatch errors
and at_bgn, each against hand-placed nodes."""

from __future__ import annotations

import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bgn_jax
from bgn_jax import bgn
from tests.reference import inputs

WIDTH = 8


class MLP(nn.Module):
  hand: bool = False
  options: tuple = ()

  @nn.compact
  def __call__(self, x):
    for _ in range(3):
      x = nn.Dense(WIDTH)(x)
      x = jnp.tanh(bgn(x, **dict(self.options)) if self.hand else x)
    return x


def grads(apply, variables, x):
  return jax.grad(lambda v: jnp.sum(jnp.sin(3.0 * apply(v, x))))(variables)


def setup():
  x = inputs((4, WIDTH))
  return MLP(), MLP(hand=True), MLP().init(jax.random.key(0), x), x


def test_insert_exports_with_a_symbolic_batch():
  # _describe once called int() on the shape.
  model, reference, variables, x = setup()
  inserted = bgn_jax.linen.insert(model.apply, where=nn.Dense)
  (b,) = jax.export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, WIDTH), jnp.float32)
  exported = jax.export.export(jax.jit(lambda v, x: grads(inserted, v, x)))(variables, spec)
  chex.assert_trees_all_close(
    exported.call(variables, x), grads(reference.apply, variables, x), rtol=1e-5, atol=1e-6
  )
  records = bgn_jax.linen.placements(inserted, variables, spec)
  assert [p.shape for p in records] == [(b, WIDTH)] * 3


def test_nested_insert_of_the_same_options_places_one_node():
  model, reference, variables, x = setup()
  options = {"power": 0.5}
  once = bgn_jax.linen.insert(model.apply, where=nn.Dense, **options)
  twice = bgn_jax.linen.insert(once, where=nn.Dense, **options)
  hand = MLP(hand=True, options=tuple(options.items()))
  chex.assert_trees_all_close(
    grads(twice, variables, x), grads(hand.apply, variables, x), rtol=1e-5, atol=1e-6
  )
  assert len(bgn_jax.linen.placements(twice, variables, x).nodes) == 3
  other = bgn_jax.linen.insert(once, where=nn.Dense, power=1.0)
  with pytest.raises(ValueError, match=r"already gets a BGN node .*power=.*asks for .*power="):
    other(variables, x)


def test_equal_inserts_share_the_jitted_trace():
  model, reference, variables, x = setup()
  traces = []

  def apply(v, x):
    traces.append(None)
    return model.apply(v, x)

  jitted = jax.jit(apply)
  for _ in range(3):  # "insert inside the loss": a new insert every step
    out = grads(bgn_jax.linen.insert(jitted, where=nn.Dense), variables, x)
  assert len(traces) == 1  # was one trace per insert
  chex.assert_trees_all_close(out, grads(reference.apply, variables, x), rtol=1e-5, atol=1e-6)


class Block(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x, _):
    x = jnp.tanh(nn.Dense(WIDTH)(x))
    return (bgn(x) if self.hand else x), None


class Scanned(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    stack = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True}, length=5)
    return stack(self.hand, name="stack")(x, None)[0]


def test_scan_body_per_step_equals_a_node_at_the_end_of_the_body():
  x = inputs((3, WIDTH))
  model, reference = Scanned(), Scanned(hand=True)
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="scan_body='per_step'"):
    bgn_jax.linen.insert(model.apply, where=Block)(variables, x)
  inserted = bgn_jax.linen.insert(model.apply, where=Block, scan_body="per_step")
  chex.assert_trees_all_close(
    grads(inserted, variables, x), grads(reference.apply, variables, x), rtol=1e-5, atol=1e-6
  )
  # Five steps: one row applied five times.
  records = bgn_jax.linen.placements(inserted, variables, x)
  assert [p.count for p in records.nodes] == [5] and records.applications == 5
  with pytest.raises(ValueError, match="`scan_body` must be 'error' or 'per_step'"):
    bgn_jax.linen.insert(model.apply, where=Block, scan_body="each")


class RematScan(nn.Module):
  hand: bool = False

  @nn.compact
  def __call__(self, x):
    dense = HandDense if self.hand else nn.Dense
    return nn.remat_scan(dense, lengths=(4,))(WIDTH, name="layers")(x)


class HandDense(nn.Dense):
  def __call__(self, x):
    return bgn(super().__call__(x))


def test_remat_scan_per_step_puts_a_node_after_every_layer():
  x = inputs((3, WIDTH))
  model, reference = RematScan(), RematScan(hand=True)
  variables = model.init(jax.random.key(0), x)
  inserted = bgn_jax.linen.insert(model.apply, where=nn.Dense, scan_body="per_step")
  chex.assert_trees_all_close(
    grads(inserted, variables, x), grads(reference.apply, variables, x), rtol=1e-5, atol=1e-6
  )


def test_options_that_silently_change_a_node_are_refused():
  model, _, variables, x = setup()
  with pytest.raises(ValueError, match=r"^bgn_jax.linen.insert: `axes` \(\) makes every"):
    bgn_jax.linen.insert(model.apply, where=nn.Dense, axes=())
  with pytest.raises(ValueError, match=r"^bgn_jax.linen.BGN: `axes` \(\) makes every"):
    bgn_jax.linen.BGN(axes=())
  with pytest.raises(ValueError, match="power"):  # at construction, as nnx and equinox
    bgn_jax.linen.BGN(power=2.0)


def test_a_model_of_another_framework_is_a_type_error_naming_the_right_verb():
  model, _, variables, x = setup()
  with pytest.raises(TypeError, match=r"pass its apply function, insert\(model.apply"):
    bgn_jax.insert(model, where=nn.Dense)
  linear = nnx.Linear(2, 2, rngs=nnx.Rngs(0))
  with pytest.raises(TypeError, match=re.escape("use bgn_jax.nnx.insert")):
    bgn_jax.linen.insert(linear, where=nnx.Linear)
  with pytest.raises(TypeError, match=re.escape("use bgn_jax.nnx.placements")):
    bgn_jax.linen.placements(linear, x)
  with pytest.raises(TypeError, match=re.escape("use bgn_jax.nnx.grad_norms")):
    bgn_jax.linen.grad_norms(lambda m, x: m(x).sum(), where=nnx.Linear)(linear, x)
  # The top-level verbs pick the framework.
  assert bgn_jax.insert(linear, where=nnx.Linear) is linear
  assert bgn_jax.remove(linear) is linear
  inserted = bgn_jax.insert(model.apply, where=nn.Dense)
  assert bgn_jax.remove(inserted) == model.apply
  assert len(bgn_jax.placements(inserted, variables, x).nodes) == 3
  assert bgn_jax.Placement is bgn_jax._common.Placement
  assert not hasattr(bgn_jax, "GRAD_NORMS_COLLECTION")


def test_grad_norms_reports_at_bgn_for_a_node_before_the_module():
  model, _, variables, x = setup()
  inserted = bgn_jax.linen.insert(model.apply, where=nn.Dense, position="before")

  def loss(v, x):
    return jnp.sum(jnp.sin(3.0 * inserted(v, x)))

  report = jax.jit(bgn_jax.grad_norms(loss, where=nn.Dense))(variables, x)
  # The reference: the gradient at each Dense's input, behind its node, by hand.
  taps = [jnp.zeros((4, WIDTH)) for _ in range(3)]

  def hand(v, taps):
    h = x
    for i in range(3):
      h = bgn(h) + taps[i]
      h = jnp.tanh(h @ v["params"][f"Dense_{i}"]["kernel"] + v["params"][f"Dense_{i}"]["bias"])
    return jnp.sum(jnp.sin(3.0 * h))

  expected = jax.grad(hand, argnums=1)(variables, taps)
  for i in range(3):
    np.testing.assert_allclose(
      report[f"Dense_{i}"]["at_bgn"],
      np.linalg.norm(np.asarray(expected[i], np.float64)),
      rtol=1e-5,
      atol=1e-6,
    )


class VmappedDense(nn.Module):
  """A Dense mapped over the leading axis by nn.vmap: each call sees one (T, D) instance."""

  @nn.compact
  def __call__(self, x):
    dense = nn.vmap(
      nn.Dense, variable_axes={"params": None}, split_rngs={"params": False}, in_axes=0
    )
    return dense(WIDTH, name="dense")(x)


def test_a_node_inside_nn_vmap_is_one_group_per_instance_with_target_sqrt_d():
  # docs/insert.md's nn.vmap row: for an instance of shape (T, D), one group per
  # instance with target sqrt(D) (sqrt_units of the unbatched shape), not sqrt(T * D).
  x = inputs((3, 5, WIDTH))
  model = VmappedDense()
  variables = model.init(jax.random.key(0), x)
  inserted = bgn_jax.linen.insert(model.apply, where=nn.Dense)

  def by_hand(v, x):
    return bgn(model.apply(v, x), axes=(1, 2), target_norm=float(np.sqrt(WIDTH)))

  chex.assert_trees_all_close(
    grads(inserted, variables, x), grads(by_hand, variables, x), rtol=1e-5, atol=1e-6
  )
