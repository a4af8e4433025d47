"""Tests of bgn_jax.bgn against the NumPy float64 reference in tests/reference.py."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import bgn_jax
from bgn_jax import core
from tests.reference import reference_backward, reference_norm, reference_target

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}


def backward(x, g, **options):
  """The cotangent BGN sends down when ``g`` arrives at ``bgn(x, **options)``, jit-compiled.

  Compiled, because XLA's fusion and constant folding are where numerics break.
  """

  def cotangent(x, g):
    _, vjp = jax.vjp(functools.partial(bgn_jax.bgn, **options), x)
    return vjp(g)[0]

  return jax.jit(cotangent)(x, g)


def eager_backward(x, g, **options):
  with jax.disable_jit():
    return backward(x, g, **options)


@pytest.fixture(params=["platform", "gpu_formulation"])
def formulation(request, monkeypatch):
  """Runs a test with the norm this platform takes, then with the GPU's on this platform."""
  if request.param == "gpu_formulation":
    monkeypatch.setattr(core, "_CPU_FORMULATION", False)
  jax.clear_caches()  # the backward rule's jit would reuse the other formulation
  yield request.param
  jax.clear_caches()


def random_cotangent(shape, dtype=jnp.float32, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


# ---------------------------------------------------------------- forward


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("shape", [(), (5,), (4, 6), (2, 3, 4, 5)])
def test_forward_is_bitwise_identity(shape, dtype):
  x = random_cotangent(shape, dtype, seed=1, scale=3.0)
  y = jax.jit(bgn_jax.bgn)(x)
  assert y.dtype == x.dtype and y.shape == x.shape
  np.testing.assert_array_equal(
    np.asarray(y.view(jnp.uint16 if dtype != jnp.float32 else jnp.uint32)),
    np.asarray(x.view(jnp.uint16 if dtype != jnp.float32 else jnp.uint32)),
  )


def test_saves_no_residuals():
  _, vjp = jax.vjp(lambda x: bgn_jax.bgn(x, axes=1, power=0.5, eps=1e-3), jnp.ones((64, 32)))
  assert jax.tree.leaves(vjp) == []


# ---------------------------------------------------------------- the rule, every option

OPTIONS = [
  {},
  {"axes": (1,)},
  {"axes": -1},
  {"axes": 0},
  {"axes": (1, 2, 3)},
  {"axes": (-3, -1)},
  {"axes": ()},
  {"target_norm": 1.0},
  {"target_norm": 2.5, "axes": (1,)},
  {"power": 0.0},
  {"power": 0.5},
  {"power": 0.25, "axes": (1, 2)},
  {"eps": 1e-3},
  {"eps": 1e3},
  {"eps": 1e3, "power": 0.5, "axes": (1,)},
]


@pytest.mark.parametrize("options", OPTIONS, ids=str)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_backward_matches_reference(options, dtype, formulation):
  x = jnp.zeros((3, 4, 5, 6), dtype)
  g = random_cotangent(x.shape, dtype, seed=2)
  got = backward(x, g, **options)
  assert got.dtype == dtype
  want = reference_backward(np.asarray(g.astype(jnp.float32)), **options)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize(
  ("shape", "target"),
  [((), 1.0), ((7,), np.sqrt(7)), ((4, 9), 3.0), ((2, 3, 4), np.sqrt(12))],
)
def test_sqrt_units_target(shape, target):
  x = jnp.zeros(shape)
  got = backward(x, random_cotangent(shape, seed=3))
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64)), target, rtol=1e-6)


@pytest.mark.parametrize("axes", [None, (1,)])
def test_per_group_norm_is_target(axes):
  x = jnp.zeros((8, 16))
  g = random_cotangent(x.shape, seed=4) * jnp.logspace(-3, 3, 8)[:, None]
  got = np.asarray(backward(x, g, axes=axes, target_norm=2.0), np.float64)
  np.testing.assert_allclose(reference_norm(got, axes), 2.0, rtol=1e-6)


def test_whole_batch_keeps_relative_weight_of_examples():
  x = jnp.zeros((4, 8))
  g = random_cotangent(x.shape, seed=5) * jnp.array([1.0, 10.0, 100.0, 0.0])[:, None]
  got = np.asarray(backward(x, g))
  np.testing.assert_allclose(
    got / np.asarray(g + (g == 0)), got[0, 0] / g[0, 0] * (g != 0), rtol=1e-6
  )


@settings(deadline=None, max_examples=60)
@given(
  data=st.data(),
  shape=hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  power=st.floats(0.0, 1.0),
  target=st.one_of(st.just("sqrt_units"), st.floats(1e-3, 1e3)),
  eps=st.sampled_from([0.0, 1e-6, 0.5]),
  log_scale=st.integers(-30, 30),
)
def test_property_matches_reference(data, shape, dtype, power, target, eps, log_scale):
  ndim = len(shape)
  axes = data.draw(
    st.one_of(
      st.none(),
      st.lists(st.integers(-ndim, ndim - 1), unique_by=lambda a: a % ndim, max_size=ndim).map(
        tuple
      ),
    )
  )
  scale = 10.0**log_scale if dtype == jnp.float32 else 1.0
  x = jnp.zeros(shape, dtype)
  g = random_cotangent(shape, dtype, seed=data.draw(st.integers(0, 99)), scale=scale)
  options = {"axes": axes, "target_norm": target, "power": power, "eps": eps}
  got = backward(x, g, **options)
  assert got.dtype == dtype and got.shape == shape
  want = reference_backward(np.asarray(g.astype(jnp.float32)), **options)
  np.testing.assert_allclose(
    np.asarray(got.astype(jnp.float32)), want, rtol=TOL[dtype], atol=float(jnp.finfo(dtype).tiny)
  )


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("run", [backward, eager_backward])
@pytest.mark.parametrize("axes", [None, (1,)])
@pytest.mark.parametrize("magnitude", [1e-37, 1e-30, 1e-20, 1.0, 1e20, 1e30, 1e38])
def test_tiny_and_huge_groups_get_the_target_norm(axes, magnitude, run, formulation):
  x = jnp.zeros((4, 64))
  # Entries in [0.5, 1.5) * magnitude: at 1e38 the group norm itself exceeds float32's range.
  g = jnp.asarray(np.random.default_rng(6).uniform(0.5, 1.5, x.shape), jnp.float32)
  g = g * jnp.float32(magnitude)
  assert np.isfinite(np.asarray(g)).all()
  got = np.asarray(run(x, g, axes=axes, target_norm=3.0), np.float64)
  np.testing.assert_allclose(reference_norm(got, axes), 3.0, rtol=1e-5)
  np.testing.assert_allclose(got, reference_backward(g, axes=axes, target_norm=3.0), rtol=1e-5)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("target", [1e-3, 1e3])
@pytest.mark.parametrize("magnitude", [1e-37, 1e-25, 1e25, 1e38])
def test_extreme_groups_with_any_target_and_power(magnitude, target, power, formulation):
  # Both scaled bands, with targets and powers far from 1: their two multiplies
  # must neither overflow nor flush what the result can hold.
  x = jnp.zeros((4, 64))
  g = jnp.asarray(np.random.default_rng(10).uniform(0.5, 1.5, x.shape), jnp.float32)
  g = g * jnp.float32(magnitude)
  got = np.asarray(backward(x, g, target_norm=target, power=power), np.float64)
  want = reference_backward(g, target_norm=target, power=power)
  assert np.isfinite(want).all() and (np.abs(want) > np.finfo(np.float32).tiny).all()
  np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize(
  "values",
  [
    [1e30, -1e-30, 3e20, 1.0, 0.0, -2e30],
    [1e-30, 1e-20, 3e-25, 0.0, -1e-36, 1e-12],
    [1e-10, 1e-20, 3e-14, 0.0, -1e-36, 1e-12],
    [1e-20, 1e13, 3e-14, 0.0, -1e-36, 1e-12],
  ],
)
def test_mixed_magnitudes_in_one_group(values, formulation):
  x = jnp.zeros((6,))
  g = jnp.array(values, jnp.float32)
  got = backward(x, g, target_norm=1.0)
  want = reference_backward(g, target_norm=1.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=np.finfo(np.float32).tiny)


@pytest.mark.parametrize("axes", [None, (1,)])
def test_gpu_formulation_reads_g_in_one_reduction(axes, monkeypatch):
  # Off the CPU: no conditional (its predicate would go to the host) and one variadic
  # reduce for the three sums, so XLA cannot split them into three reads of g.
  monkeypatch.setattr(core, "_CPU_FORMULATION", False)
  config = core.make_config((8, 16), axes=axes)
  hlo = jax.jit(lambda g: core.normalize_cotangent(g, config)).lower(jnp.ones((8, 16)))
  hlo = hlo.compile().as_text()
  reduces = [line for line in hlo.splitlines() if " reduce(" in line]
  assert "conditional" not in hlo
  assert len(reduces) == 1 and "(f32[" in reduces[0] and reduces[0].count("f32[") >= 3


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype, formulation):
  # 4096 equal bf16/fp16 entries: a sum of squares in the input dtype stalls far below 4096.
  x = jnp.zeros((4096,), dtype)
  g = jnp.full(x.shape, 1.0, dtype)
  got = backward(x, g, target_norm=1.0)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64)), 1.0, rtol=1e-2)


def test_low_precision_tiny_gradients(formulation):
  x = jnp.zeros((64,), jnp.bfloat16)
  g = jnp.full(x.shape, 1e-30, jnp.bfloat16)
  got = np.asarray(backward(x, g, target_norm=1.0), np.float64)
  np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-2)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("axes", [None, (1,)])
def test_zero_group_comes_back_zero(axes, eps, formulation):
  x = jnp.zeros((3, 5))
  g = jnp.zeros(x.shape).at[1].set(1.0) if axes else jnp.zeros(x.shape)
  got = np.asarray(backward(x, g, axes=axes, eps=eps))
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got[0], 0.0)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_non_finite_group_comes_back_all_nan(bad, power, formulation):
  x = jnp.zeros((3, 5))
  g = random_cotangent(x.shape, seed=7).at[1, 2].set(bad)
  per_example = np.asarray(backward(x, g, axes=1, power=power))
  assert np.isnan(per_example[1]).all()
  assert np.isfinite(per_example[[0, 2]]).all()
  whole = np.asarray(backward(x, g, power=power))
  assert np.isnan(whole).all()


def test_power_zero_returns_gradient_unchanged():
  x = jnp.zeros((3, 5))
  g = random_cotangent(x.shape, seed=8).at[0, 0].set(jnp.inf)
  np.testing.assert_array_equal(np.asarray(backward(x, g, power=0.0)), np.asarray(g))


def test_eps_caps_the_scale_up():
  x = jnp.zeros((10,))
  g = jnp.full(x.shape, 1e-8)
  got = np.asarray(backward(x, g, target_norm=1.0, eps=1e-2), np.float64)
  np.testing.assert_allclose(got, 1e-8 * 1.0 / 1e-2, rtol=1e-6)


def test_float64(formulation):
  with jax.enable_x64(True):
    x = jnp.zeros((4, 6), jnp.float64)
    for magnitude in (1e-300, 1.0, 1e300):
      g = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape) * magnitude)
      got = backward(x, g, axes=1, target_norm=2.0)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(reference_norm(np.asarray(got), 1), 2.0, rtol=1e-12)


# ------------------------------------------------ a 4-layer MLP against hand backprop


def mlp_params(sizes, seed=10):
  rng = np.random.default_rng(seed)
  return [
    (rng.standard_normal((m, n)) / np.sqrt(m), rng.standard_normal(n) * 0.1)
    for m, n in zip(sizes[:-1], sizes[1:])
  ]


def mlp_loss(params, x, y, options):
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = bgn_jax.bgn(jnp.tanh(h), **options)
  return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


def mlp_grads_by_hand(params, x, y, options):
  """Float64 backprop written out by hand, BGN applied to each hidden cotangent."""
  hs, pre = [x], []
  for i, (w, b) in enumerate(params):
    z = hs[-1] @ w + b
    pre.append(z)
    hs.append(np.tanh(z) if i < len(params) - 1 else z)
  delta = (hs[-1] - y) / x.shape[0]
  grads = [None] * len(params)
  for i in reversed(range(len(params))):
    w, _ = params[i]
    grads[i] = (hs[i].T @ delta, delta.sum(0))
    if i > 0:
      cotangent = reference_backward(delta @ w.T, **options)
      delta = cotangent * (1 - np.tanh(pre[i - 1]) ** 2)
  return grads


@pytest.mark.parametrize(
  "options",
  [{}, {"axes": (1,)}, {"target_norm": 1.0}, {"power": 0.5, "eps": 1e-2}],
  ids=str,
)
def test_mlp_gradient_matches_hand_backprop(options):
  params = mlp_params([5, 16, 16, 16, 3])
  rng = np.random.default_rng(11)
  x, y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
  got = jax.grad(mlp_loss)(
    jax.tree.map(jnp.float32, params), jnp.float32(x), jnp.float32(y), options
  )
  want = mlp_grads_by_hand(params, x, y, options)
  for (gw, gb), (ww, wb) in zip(got, want):
    np.testing.assert_allclose(np.asarray(gw), ww, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(np.asarray(gb), wb, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- transforms


def weights(shape, seed=12):
  return random_cotangent(shape, seed=seed)


def loss(x, w, **options):
  return jnp.sum(bgn_jax.bgn(x, **options) * w)


X = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
W = weights((4, 6))


def run_plain(**o):
  return jax.grad(loss)(X, W, **o)


def run_jit(**o):
  return jax.jit(jax.grad(functools.partial(loss, **o)))(X, W)


def run_value_and_grad(**o):
  value, grad = jax.value_and_grad(functools.partial(loss, **o))(X, W)
  np.testing.assert_allclose(value, jnp.sum(X * W), rtol=1e-6)
  return grad


def run_checkpoint(**o):
  return jax.grad(jax.checkpoint(functools.partial(loss, **o)))(X, W)


def run_scan_rows(**o):
  # Each scan step applies BGN to one row: each row is its own group with t from its shape.
  def total(x):
    def step(acc, xw):
      return acc + jnp.sum(bgn_jax.bgn(xw[0], **o) * xw[1]), None

    return jax.lax.scan(step, 0.0, (x, W))[0]

  return jax.grad(total)(X)


def run_vmap_rows(**o):
  return jax.vmap(jax.grad(functools.partial(loss, **o)))(X, W)


def run_vmap_axis_name(**o):
  def per_row(x, w):
    return jnp.sum(bgn_jax.bgn(x, axis_name="rows", **o) * w)

  return jax.vmap(jax.grad(per_row), axis_name="rows")(X, W)


TRANSFORMS = {
  "plain": (run_plain, "whole"),
  "jit": (run_jit, "whole"),
  "value_and_grad": (run_value_and_grad, "whole"),
  "checkpoint": (run_checkpoint, "whole"),
  "scan": (run_scan_rows, "rows"),
  "vmap": (run_vmap_rows, "rows"),
  "vmap_axis_name": (run_vmap_axis_name, "joined"),
}


@pytest.mark.parametrize("name", list(TRANSFORMS))
@pytest.mark.parametrize(
  "options", [{}, {"target_norm": 2.0, "power": 0.5}, {"eps": 10.0}], ids=str
)
def test_transforms(name, options):
  run, grouping = TRANSFORMS[name]
  got = np.asarray(run(**options))
  w = np.asarray(W, np.float64)
  if grouping == "whole":
    want = reference_backward(w, **options)
  elif grouping == "rows":
    want = np.stack([reference_backward(row, **options) for row in w])
  else:  # one group over the vmapped rows, target from each row's own shape
    want = reference_backward(w, shape=w.shape[1:], **options)
  np.testing.assert_allclose(got, want, rtol=2e-5)


def test_grad_of_grad_matches_the_plain_formula(formulation):
  # d/dw of <grad_x loss, v> differentiates the backward rule itself.
  v = weights((4, 6), seed=13)

  def through_bgn(w):
    return jnp.sum(jax.grad(loss)(X, w, target_norm=2.0) * v)

  def formula(w):
    return jnp.sum(w * 2.0 / jnp.linalg.norm(w) * v)

  np.testing.assert_allclose(jax.grad(through_bgn)(W), jax.grad(formula)(W), rtol=1e-5)


@pytest.mark.parametrize("scale", [1e-30, 1e30])
def test_grad_of_grad_at_tiny_and_huge_scales(scale, formulation):
  # d/dw <t w / ||w||, v> = t (v / ||w|| - w <w, v> / ||w||**3), in float64 by hand.
  v = weights((4, 6), seed=13)
  w = W * jnp.float32(scale)

  def through_bgn(w):
    return jnp.sum(jax.grad(loss)(X, w, target_norm=2.0) * v)

  got = np.asarray(jax.jit(jax.grad(through_bgn))(w), np.float64)
  w64, v64 = np.asarray(w, np.float64), np.asarray(v, np.float64)
  norm = np.linalg.norm(w64)
  want = 2.0 * (v64 / norm - w64 * np.sum(w64 * v64) / norm**3)
  np.testing.assert_allclose(got, want, rtol=1e-5)


def test_grad_of_grad_zero_cotangent_is_finite(formulation):
  v = weights((4, 6), seed=14)
  got = jax.grad(lambda w: jnp.sum(jax.grad(loss)(X, w) * v))(jnp.zeros((4, 6)))
  assert np.isfinite(np.asarray(got)).all()


# ---------------------------------------------------------------- modules


def test_linen_module_has_no_variables_and_applies_bgn():
  module = bgn_jax.BGN(axes=(1,), target_norm=2.0, power=0.5)
  assert module.init(jax.random.key(0), X) == {}
  got = jax.grad(lambda x: jnp.sum(module.apply({}, x) * W))(X)
  np.testing.assert_allclose(got, jax.grad(loss)(X, W, axes=(1,), target_norm=2.0, power=0.5))


def test_nnx_module_applies_bgn():
  from flax import nnx

  module = bgn_jax.nnx.BGN(axes=(1,), target_norm=2.0)
  assert nnx.state(module, nnx.Param) == nnx.State({})
  got = jax.grad(lambda x: jnp.sum(module(x) * W))(X)
  np.testing.assert_allclose(got, jax.grad(loss)(X, W, axes=(1,), target_norm=2.0))


def test_public_api():
  assert set(bgn_jax.__all__) >= {"bgn", "BGN", "nnx", "__version__"}
  assert isinstance(bgn_jax.__version__, str)


# ---------------------------------------------------------------- bad configuration

BAD = [
  ({"power": 1.5}, ValueError, "`power` must lie in [0, 1]; got 1.5"),
  ({"power": -0.1}, ValueError, "`power`"),
  ({"power": "1"}, TypeError, "`power`"),
  ({"power": True}, TypeError, "`power`"),
  ({"eps": -1e-3}, ValueError, "`eps` must be finite and >= 0; got -0.001"),
  ({"eps": float("nan")}, ValueError, "`eps`"),
  ({"target_norm": 0.0}, ValueError, "`target_norm` must be positive and finite; got 0.0"),
  ({"target_norm": -2.0}, ValueError, "`target_norm`"),
  ({"target_norm": float("inf")}, ValueError, "`target_norm`"),
  ({"target_norm": "unit"}, ValueError, "unknown `target_norm` 'unit'"),
  ({"target_norm": None}, TypeError, "`target_norm`"),
  ({"axes": 2}, ValueError, "`axes` entry 2 is out of range for an input of rank 2"),
  ({"axes": (0, -2)}, ValueError, "names the same axis twice"),
  ({"axes": (1.0,)}, TypeError, "`axes`"),
  ({"axes": "1"}, TypeError, "`axes`"),
  ({"axis_name": ["a", {}]}, TypeError, "`axis_name`"),
]


@pytest.mark.parametrize(("options", "error", "message"), BAD, ids=str)
def test_bad_configuration_is_rejected_at_call_time(options, error, message):
  with pytest.raises(error, match=__import__("re").escape(message)):
    bgn_jax.bgn(jnp.ones((2, 3)), **options)


@pytest.mark.parametrize("x", [jnp.ones((2,), jnp.int32), np.arange(3), 3, True, jnp.ones(2, bool)])
def test_non_floating_input_is_rejected(x):
  with pytest.raises(TypeError, match="`x` must be a floating-point array"):
    bgn_jax.bgn(x)


def test_bad_configuration_is_rejected_by_modules():
  with pytest.raises(ValueError, match="`power`"):
    bgn_jax.nnx.BGN(power=2.0)
  with pytest.raises(ValueError, match="`eps`"):
    bgn_jax.BGN(eps=-1.0).apply({}, X)


def test_reference_target():
  assert reference_target((3, 4, 5), "sqrt_units") == np.sqrt(20)
