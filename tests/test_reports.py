"""Tests of bgn_jax.reports on flax.nnx states (the linen ones are in test_linen_grad_norms.py)."""

from __future__ import annotations

import jax
import numpy as np
import optax
import pytest
from flax import nnx

import bgn_jax
from tests.reference import inputs
from tests.test_nnx_grad_norms import LAYERS, MLP, WIDTH, ScanStack, sin_loss


def step(model, x):
  """One Adam step on the model, in place."""
  optimizer = nnx.Optimizer(model, optax.adam(0.05), wrt=nnx.Param)
  optimizer.update(model, nnx.grad(sin_loss)(model, x))


def numpy_ratio(old, new):
  old = [np.asarray(v, np.float64) for v in jax.tree.leaves(old)]
  new = [np.asarray(v, np.float64) for v in jax.tree.leaves(new)]
  delta = np.sqrt(sum(np.sum((n - o) ** 2) for o, n in zip(old, new, strict=True)))
  return delta / np.sqrt(sum(np.sum(o**2) for o in old))


def test_relative_updates_of_an_nnx_model_match_numpy():
  model, x = MLP(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  old_state = nnx.state(nnx.clone(model), nnx.Param)  # a State snapshot works as well
  step(model, x)
  new = nnx.state(model, nnx.Param)
  ratios = bgn_jax.relative_updates(old, new)
  assert list(ratios) == ["layers/0", "layers/1", "layers/2"]
  for i, key in enumerate(ratios):
    expected = numpy_ratio(old["layers"][i], new["layers"][i])
    assert expected > 0
    np.testing.assert_allclose(ratios[key], expected, rtol=1e-6)
  from_state = bgn_jax.relative_updates(old_state, new)
  jax.tree.map(np.testing.assert_array_equal, dict(from_state), dict(ratios))
  only = bgn_jax.relative_updates(old, new, where=r"^layers/1$")
  assert list(only) == ["layers/1"]
  np.testing.assert_array_equal(only["layers/1"], ratios["layers/1"])


def test_the_live_state_before_the_step_is_refused():
  model = MLP(rngs=nnx.Rngs(0))
  live = nnx.state(model, nnx.Param)  # the model's own Variables: it follows the step
  step(model, inputs((3, WIDTH)))
  with pytest.raises(ValueError, match=r"same Variable objects .* nnx.to_pure_dict"):
    bgn_jax.relative_updates(live, nnx.state(model, nnx.Param))


def test_relative_updates_per_layer_of_a_scan_stack_from_a_grad_norms_report():
  model, x = ScanStack(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=r"^layers$")(model, x)
  old = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  step(model, x)
  new = nnx.to_pure_dict(nnx.state(model, nnx.Param))
  ratios = bgn_jax.relative_updates(old, new, where=report)
  assert ratios["layers"].shape == (LAYERS,)
  expected = [
    numpy_ratio(
      jax.tree.map(lambda p, i=i: p[i], old["layers"]),
      jax.tree.map(lambda p, i=i: p[i], new["layers"]),
    )
    for i in range(LAYERS)
  ]
  np.testing.assert_allclose(ratios["layers"], expected, rtol=1e-6)
