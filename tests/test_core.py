"""Tests of bgn_jax.bgn and l2_norm against the NumPy float64 reference in tests/reference.py."""

from __future__ import annotations

import functools
import math
import re

import chex
import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from hypothesis import example, given, settings
from hypothesis import strategies as st

import bgn_jax
from bgn_jax import core
from tests.reference import (
  BAD_OPTIONS,
  mlp_backprop,
  reference_backward,
  reference_norm,
  reference_target,
)

TOL = {jnp.float32: 2e-5, jnp.bfloat16: 1e-2, jnp.float16: 2e-3}
# Every floating dtype this JAX has, narrowest first (float64 is tested under enable_x64).
FLOAT_DTYPES = [
  getattr(jnp, name)
  for name in (
    "float4_e2m1fn",
    "float8_e8m0fnu",
    "float8_e3m4",
    "float8_e4m3",
    "float8_e4m3fn",
    "float8_e4m3fnuz",
    "float8_e4m3b11fnuz",
    "float8_e5m2",
    "float8_e5m2fnuz",
    "float16",
    "bfloat16",
    "float32",
  )
  if hasattr(jnp, name)
]
F32_TINY = float(np.finfo(np.float32).tiny)


def rule(formulation="platform", **options):
  """``g -> the cotangent BGN sends down when g arrives``, differentiable, not compiled.

  "platform" goes through ``bgn``'s VJP (the formulation this platform takes);
  "variadic" calls the backward rule with the off-CPU formulation directly.
  """

  def through_bgn(g):
    return jax.vjp(functools.partial(bgn_jax.bgn, **options), jnp.zeros_like(g))[1](g)[0]

  def variadic(g):
    return core._normalize(g, core.make_config(g.shape, dtype=g.dtype, **options), "variadic")

  return through_bgn if formulation == "platform" else variadic


@functools.cache
def compiled_rule(formulation, options):
  # One jitted function per (formulation, options): calls on arrays of one shape
  # and dtype reuse its compiled code.
  return jax.jit(rule(formulation, **dict(options)))


def backward(x, g, formulation="platform", **options):
  """The cotangent at ``bgn(x, **options)`` for ``g``, jit-compiled.

  Compiled, because XLA's fusion and constant folding are where numerics break.
  """
  assert x.shape == g.shape
  return compiled_rule(formulation, tuple(sorted(options.items())))(g)


def eager_backward(x, g, formulation="platform", **options):
  with jax.disable_jit():
    return rule(formulation, **options)(g)


@pytest.fixture(params=["platform", "variadic"])
def formulation(request):
  """The norm this platform takes, then the off-CPU one, on this platform."""
  return request.param


def random_cotangent(shape, dtype=jnp.float32, seed=0, scale=1.0):
  rng = np.random.default_rng(seed)
  return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def uniform_cotangent(shape, magnitude, seed=6):
  # Entries in [0.5, 1.5) * magnitude: at 1e38 the group norm exceeds float32's range.
  g = jnp.asarray(np.random.default_rng(seed).uniform(0.5, 1.5, shape), jnp.float32)
  g = g * jnp.float32(magnitude)
  assert np.isfinite(np.asarray(g)).all()
  return g


# ---------------------------------------------------------------- forward


class ForwardTest(chex.TestCase):
  @chex.variants(with_jit=True, without_jit=True)
  @parameterized.parameters(*[(d, s) for d in FLOAT_DTYPES for s in [(), (2, 3, 4)]])
  def test_forward_is_bitwise_identity(self, dtype, shape):
    x = jnp.asarray(np.random.default_rng(1).uniform(0.25, 4.0, shape), jnp.float32).astype(dtype)
    y = self.variant(functools.partial(bgn_jax.bgn, axes=-1 if shape else None))(x)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert np.asarray(y).tobytes() == np.asarray(x).tobytes()


def test_an_eager_call_returns_x_itself():
  # Outside any trace nothing differentiates through the node: x comes back as it is,
  # and only the options are checked.
  x = jnp.ones((4, 6))
  assert bgn_jax.bgn(x, axes=1, power=0.5) is x
  # Not even through JAX's custom_vjp, whose eager call costs 40x an identity.
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(core, "_bgn", None)
    assert bgn_jax.bgn(x) is x
    with pytest.raises(TypeError, match="not callable"):
      jax.jit(bgn_jax.bgn)(x)
  with pytest.raises(ValueError, match="`power`"):
    bgn_jax.bgn(x, power=2.0)
  y = bgn_jax.bgn(np.ones((2, 3), np.float32))
  assert isinstance(y, jax.Array) and y.dtype == jnp.float32


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
  {"target_norm": "sqrt_size"},
  {"target_norm": "sqrt_size", "axes": -1},
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
  got = backward(x, g, formulation, **options)
  assert got.dtype == dtype
  want = reference_backward(np.asarray(g.astype(jnp.float32)), **options)
  np.testing.assert_allclose(np.asarray(got.astype(jnp.float32)), want, rtol=TOL[dtype], atol=0)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=lambda d: jnp.dtype(d).name)
@pytest.mark.parametrize("axes", [None, 1])
def test_every_float_dtype_backward(dtype, axes):
  # Accumulated in float32, the result rounded once to the cotangent's dtype.
  g = jnp.asarray(np.random.default_rng(3).uniform(0.25, 4.0, (4, 8)), jnp.float32).astype(dtype)
  got = backward(g, g, axes=axes)
  assert got.dtype == g.dtype
  want = reference_backward(np.asarray(g.astype(jnp.float32)), axes=axes)
  info = jnp.finfo(dtype)
  np.testing.assert_allclose(
    np.asarray(got.astype(jnp.float32)),
    want,
    rtol=0.75 * float(info.eps),
    atol=float(info.tiny) * float(info.eps),
  )


@pytest.mark.parametrize(
  ("shape", "options", "group_axes", "target"),
  [
    # The two paper readings: whole batch and per example.
    ((), {}, None, 1.0),
    ((7,), {}, None, math.sqrt(7)),
    ((4, 9), {}, None, 3.0),
    ((2, 3, 4), {}, None, math.sqrt(12)),
    ((4, 9), {"axes": (1,)}, (1,), 3.0),
    ((2, 3, 4, 5), {"axes": (1, 2, 3)}, (1, 2, 3), math.sqrt(60)),
    # Groups that do not span every non-batch axis: the entries of one group.
    ((2, 3, 4), {"axes": -1}, (2,), 2.0),
    ((4, 9), {"axes": 0}, (0,), 2.0),
    ((2, 3, 4), {"axes": ()}, (), 1.0),
    # sqrt_size: the whole array the node sees, whatever the groups.
    ((2, 3, 4), {"target_norm": "sqrt_size"}, None, math.sqrt(24)),
    ((2, 3, 4), {"target_norm": "sqrt_size", "axes": -1}, (2,), math.sqrt(24)),
    ((5,), {"target_norm": "sqrt_size"}, None, math.sqrt(5)),
  ],
  ids=str,
)
def test_target_table(shape, options, group_axes, target):
  g = random_cotangent(shape, seed=3)
  got = np.asarray(backward(g, g, **options), np.float64)
  np.testing.assert_allclose(reference_norm(got, group_axes), target, rtol=1e-6)
  assert reference_target(shape, options.get("target_norm", "sqrt_units"), group_axes) == (
    pytest.approx(target)
  )


@pytest.mark.parametrize(("target_norm", "per_example"), [("sqrt_size", 60), ("sqrt_units", 20)])
def test_target_in_per_example_code(target_norm, per_example):
  # Under vmap a node sees one (C, H, W) example: sqrt_size is sqrt(C*H*W) and
  # sqrt_units takes C for a batch axis, as documented.
  g = random_cotangent((2, 3, 4, 5), seed=4)
  node = functools.partial(bgn_jax.bgn, target_norm=target_norm)
  got = jax.vmap(lambda g: jax.vjp(node, jnp.zeros_like(g))[1](g)[0])(g)
  np.testing.assert_allclose(reference_norm(got, (1, 2, 3)), math.sqrt(per_example), rtol=1e-6)


@pytest.mark.parametrize("axes", [None, (1,)])
def test_per_group_norm_is_target(axes):
  g = random_cotangent((8, 16), seed=4) * jnp.logspace(-3, 3, 8)[:, None]
  got = np.asarray(backward(g, g, axes=axes, target_norm=2.0), np.float64)
  np.testing.assert_allclose(reference_norm(got, axes), 2.0, rtol=1e-6)


def test_whole_batch_keeps_relative_weight_of_examples():
  g = random_cotangent((4, 8), seed=5) * jnp.array([1.0, 10.0, 100.0, 0.0])[:, None]
  got = np.asarray(backward(g, g))
  np.testing.assert_allclose(
    got / np.asarray(g + (g == 0)), got[0, 0] / g[0, 0] * (g != 0), rtol=1e-6
  )


@st.composite
def shapes_and_axes(draw):
  shape = draw(hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=5))
  ndim = len(shape)
  axes = draw(
    st.one_of(
      st.none(),
      st.lists(st.integers(-ndim, ndim - 1), unique_by=lambda a: a % ndim, max_size=ndim).map(
        tuple
      ),
    )
  )
  return shape, axes


@settings(deadline=None, max_examples=30)
@given(
  shape_and_axes=shapes_and_axes(),
  dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
  power=st.floats(0.0, 1.0),
  target=st.one_of(st.sampled_from(["sqrt_units", "sqrt_size"]), st.floats(1e-3, 1e3)),
  eps=st.sampled_from([0.0, 1e-6, 0.5, 1e-28]),
  log_scale=st.integers(-30, 30),
  seed=st.integers(0, 99),
)
# The edges: eps in the small band's scale, and tiny and huge groups.
@example(((3, 4), None), jnp.float32, 1.0, 1.0, 1e-28, -30, 0)
@example(((3, 4), (1,)), jnp.float32, 0.5, 1.0, 1e-28, -30, 0)
@example(((1,), None), jnp.float32, 1.0, "sqrt_units", 0.0, -30, 0)
@example(((2, 3), (0,)), jnp.float32, 0.5, 1e3, 0.0, 30, 0)
def test_property_matches_reference(shape_and_axes, dtype, power, target, eps, log_scale, seed):
  shape, axes = shape_and_axes
  scale = 10.0**log_scale if dtype == jnp.float32 else 1.0
  g = random_cotangent(shape, dtype, seed=seed, scale=scale)
  options = {"axes": axes, "target_norm": target, "power": power, "eps": eps}
  got = backward(g, g, **options)
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
  g = uniform_cotangent((4, 64), magnitude)
  got = np.asarray(run(g, g, formulation, axes=axes, target_norm=3.0), np.float64)
  np.testing.assert_allclose(reference_norm(got, axes), 3.0, rtol=1e-5)
  np.testing.assert_allclose(got, reference_backward(g, axes=axes, target_norm=3.0), rtol=1e-5)


@pytest.mark.parametrize("power", [1.0, 0.5, 0.1])
@pytest.mark.parametrize("target", [2.0**-60, 1e-3, 1e3, 1e10, 2.0**50])
@pytest.mark.parametrize("magnitude", [1e-37, 1e-25, 1.0, 1e25, 1e38])
def test_extreme_groups_with_any_target_and_power(magnitude, target, power, formulation):
  # Both scaled bands, with targets and powers far from 1 up to the accepted edges:
  # their two multiplies must neither overflow nor flush what the result can hold.
  g = uniform_cotangent((4, 64), magnitude, seed=10)
  got = np.asarray(backward(g, g, formulation, target_norm=target, power=power), np.float64)
  want = reference_backward(g, target_norm=target, power=power)
  assert np.isfinite(want).all() and (np.abs(want) > F32_TINY).all()
  np.testing.assert_allclose(got, want, rtol=2e-5)


@pytest.mark.parametrize("accepted", [True, False])
@pytest.mark.parametrize("edge", ["min_target", "max_target"])
def test_target_range_edges(edge, accepted):
  scales = core._SCALES[np.dtype(np.float32)]
  target = getattr(scales, edge) * (1.0 if accepted else (0.99 if edge == "min_target" else 1.01))
  g = uniform_cotangent((4, 64), 1.0)
  if not accepted:
    with pytest.raises(ValueError, match=re.escape(f"`target_norm` {target!r} is outside")):
      bgn_jax.bgn(g, target_norm=target)
    return
  np.testing.assert_allclose(
    backward(g, g, target_norm=target), reference_backward(g, target_norm=target), rtol=2e-5
  )


@pytest.mark.parametrize("accepted", [True, False])
@pytest.mark.parametrize("ratio", ["min_eps_ratio", "max_eps_ratio"])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
def test_eps_range_edges(ratio, accepted, magnitude, formulation):
  # eps = t / ratio: the largest eps floors every group, the smallest none.
  scales, t = core._SCALES[np.dtype(np.float32)], 2.0
  eps = t / getattr(scales, ratio) * (1.0 if accepted else (1.01 if ratio[:3] == "min" else 0.99))
  g = uniform_cotangent((4, 64), magnitude)
  if not accepted:
    with pytest.raises(ValueError, match=re.escape(f"`eps` {eps!r} with a target norm of 2 is")):
      bgn_jax.bgn(g, target_norm=t, eps=eps)
    return
  got = np.asarray(backward(g, g, formulation, axes=1, target_norm=t, eps=eps), np.float64)
  want = reference_backward(g, axes=1, target_norm=t, eps=eps)
  kept = np.abs(want) > F32_TINY
  np.testing.assert_allclose(got[kept], want[kept], rtol=2e-5)
  assert np.all(np.abs(got[~kept]) <= F32_TINY)


def test_eps_above_the_small_band_scale():
  # eps * 2**64 overflows float32; the floored rescale t / eps must not.
  g = jnp.full((4, 16), 1e-20)
  got = np.asarray(backward(g, g, target_norm=1e10, eps=1e20), np.float64)
  np.testing.assert_allclose(got, 1e-30, rtol=1e-6)


@pytest.mark.parametrize("axes", [None, 1])
@pytest.mark.parametrize("floored", [True, False])
def test_eps_at_tiny_groups(axes, floored, formulation):
  # Groups of 1e-30 entries (the small band), eps just above or below their norm.
  g = uniform_cotangent((4, 64), 1e-30, seed=11)
  norm = float(np.max(reference_norm(g, axes)))
  eps = norm * (4.0 if floored else 0.25) if axes is None else (1e-27 if floored else 1e-32)
  got = np.asarray(backward(g, g, formulation, axes=axes, target_norm=2.0, eps=eps), np.float64)
  want = reference_backward(g, axes=axes, target_norm=2.0, eps=eps)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  if floored:
    np.testing.assert_allclose(got, np.asarray(g, np.float64) * 2.0 / eps, rtol=1e-5)


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
  g = jnp.array(values, jnp.float32)
  got = backward(g, g, formulation, target_norm=1.0)
  want = reference_backward(g, target_norm=1.0)
  np.testing.assert_allclose(np.asarray(got), want, rtol=1e-6, atol=F32_TINY)


@pytest.mark.parametrize("axes", [None, (1,)])
def test_variadic_formulation_reads_g_in_one_reduction(axes):
  # Off the CPU: no conditional (its predicate would go to the host) and one variadic
  # reduce for the three sums, so XLA cannot split them into three reads of g.
  config = core.make_config((8, 16), axes=axes)
  hlo = jax.jit(lambda g: core._normalize(g, config, "variadic")).lower(jnp.ones((8, 16)))
  hlo = hlo.compile().as_text()
  reduces = [line for line in hlo.splitlines() if " reduce(" in line]
  assert "conditional" not in hlo
  assert len(reduces) == 1 and "(f32[" in reduces[0] and reduces[0].count("f32[") >= 3


@pytest.mark.parametrize("wrap", [lambda f: f, jax.jit], ids=["vmap", "vmap_of_jit"])
def test_variadic_formulation_under_vmap(wrap):
  # The partitioned reduce has no batching rule of its own: a vmap reduces it unpartitioned.
  g = random_cotangent((3, 4, 16), seed=21)
  config = core.make_config((4, 16), axes=(1,))
  got = jax.vmap(wrap(lambda row: core._normalize(row, config, "variadic")))(g)
  want = np.stack([reference_backward(np.asarray(row), axes=(1,)) for row in g])
  np.testing.assert_allclose(np.asarray(got), want, rtol=2e-6, atol=F32_TINY)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_low_precision_accumulates_in_float32(dtype, formulation):
  # 4096 equal bf16/fp16 entries: a sum of squares in the input dtype stalls far below 4096.
  g = jnp.full((4096,), 1.0, dtype)
  got = backward(g, g, formulation, target_norm=1.0)
  assert got.dtype == dtype
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64)), 1.0, rtol=1e-2)


def test_low_precision_tiny_gradients(formulation):
  g = jnp.full((64,), 1e-30, jnp.bfloat16)
  got = np.asarray(backward(g, g, formulation, target_norm=1.0), np.float64)
  np.testing.assert_allclose(np.linalg.norm(got), 1.0, rtol=1e-2)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
@pytest.mark.parametrize("axes", [None, (1,)])
def test_zero_group_comes_back_zero(axes, eps, formulation):
  g = jnp.zeros((3, 5)).at[1].set(1.0) if axes else jnp.zeros((3, 5))
  got = np.asarray(backward(g, g, formulation, axes=axes, eps=eps))
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got[0], 0.0)


# A cotangent XLA knows while compiling: it folds and rewrites what a runtime array
# protects (an unused output's zeros; a loss term times a Python constant).
@pytest.mark.parametrize("axes", [None, (1,)])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32, jnp.float64])
@pytest.mark.parametrize("magnitude", [0.0, 1e-37, 1e-25, 1.0, 1e25, 1e38])
def test_cotangent_known_at_compile_time(magnitude, dtype, axes, formulation):
  if dtype == jnp.bfloat16 and magnitude == 1e-37:
    pytest.skip("bfloat16 rounds 1e-37 to a subnormal, which XLA on the CPU flushes")
  with jax.enable_x64(dtype == jnp.float64):
    g = jnp.full((3, 4), magnitude, dtype)
    got = jax.jit(lambda: rule(formulation, axes=axes, target_norm=2.0)(g))()
    want = reference_backward(np.asarray(g, np.float64), axes=axes, target_norm=2.0)
    assert got.dtype == dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=TOL.get(dtype, 1e-12))
    norm = jax.jit(lambda: bgn_jax.l2_norm(g, axes))()
    want_norm = np.squeeze(reference_norm(np.asarray(g, np.float64), axes))
    if norm.dtype == jnp.float32:  # a norm above float32's range is inf
      want_norm = np.where(want_norm > np.finfo(np.float32).max, np.inf, want_norm)
    np.testing.assert_allclose(norm, want_norm, rtol=1e-6)


@pytest.mark.parametrize("per_example", [False, True])
def test_a_node_the_loss_ignores_or_weights_by_zero_changes_nothing(per_example):
  axes = 1 if per_example else None
  x = jnp.linspace(-1.0, 1.0, 12).reshape(3, 4)
  losses = {
    "weighted by 0.0": lambda x: jnp.sum(x**2) + 0.0 * jnp.sum(bgn_jax.bgn(2.0 * x, axes=axes)),
    "unused": lambda x: jnp.sum((x**2, bgn_jax.bgn(2.0 * x, axes=axes))[0]),
    "weighted by 1e-25": lambda x: jnp.sum(x**2) + 1e-25 * jnp.sum(bgn_jax.bgn(x, axes=axes)),
  }
  for name, loss in losses.items():
    extra = (
      0.0 if name != "weighted by 1e-25" else reference_backward(np.full((3, 4), 1e-25), axes=axes)
    )
    want = 2.0 * np.asarray(x, np.float64) + extra
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(x), want, rtol=1e-6, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(jax.grad(loss)(x), want, rtol=1e-6, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
@pytest.mark.parametrize("power", [1.0, 0.5])
def test_non_finite_group_comes_back_all_nan(bad, power, formulation):
  g = random_cotangent((3, 5), seed=7).at[1, 2].set(bad)
  per_example = np.asarray(backward(g, g, formulation, axes=1, power=power))
  assert np.isnan(per_example[1]).all()
  assert np.isfinite(per_example[[0, 2]]).all()
  whole = np.asarray(backward(g, g, formulation, power=power))
  assert np.isnan(whole).all()


def test_power_zero_returns_gradient_unchanged():
  g = random_cotangent((3, 5), seed=8).at[0, 0].set(jnp.inf)
  chex.assert_trees_all_equal(backward(g, g, power=0.0), g)


def test_eps_caps_the_scale_up():
  g = jnp.full((10,), 1e-8)
  got = np.asarray(backward(g, g, target_norm=1.0, eps=1e-2), np.float64)
  np.testing.assert_allclose(got, 1e-8 * 1.0 / 1e-2, rtol=1e-6)


def test_float64(formulation):
  with jax.enable_x64(True):
    x = jnp.zeros((4, 6), jnp.float64)
    assert bgn_jax.bgn(x) is x and jax.jit(bgn_jax.bgn)(x).dtype == jnp.float64
    for magnitude in (1e-300, 1.0, 1e300):
      g = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape) * magnitude)
      got = backward(x, g, formulation, axes=1, target_norm=2.0)
      assert got.dtype == jnp.float64
      np.testing.assert_allclose(reference_norm(np.asarray(got), 1), 2.0, rtol=1e-12)
    # float64 accepts what its accumulator holds, beyond float32's range.
    g = jnp.asarray(np.random.default_rng(9).standard_normal(x.shape))
    got = backward(x, g, formulation, target_norm=1e100)
    np.testing.assert_allclose(got, reference_backward(g, target_norm=1e100), rtol=1e-12)


# ---------------------------------------------------------------- l2_norm


@pytest.mark.parametrize("dtype", [jnp.float8_e4m3fn, jnp.bfloat16, jnp.float32])
@pytest.mark.parametrize("magnitude", [1e-30, 1.0, 1e30])
@pytest.mark.parametrize("axes", [None, -1])
def test_l2_norm(axes, magnitude, dtype, formulation):
  scale = magnitude if dtype == jnp.float32 else 1.0
  x = random_cotangent((3, 16), seed=12, scale=scale).astype(dtype)
  checked = core._check_axes(axes, x.ndim)
  got = jax.jit(lambda x: core._l2_norm(x, checked, formulation))(x)
  if formulation == "platform":
    chex.assert_trees_all_equal(bgn_jax.l2_norm(x, axes), got)
  assert got.dtype == jnp.float32
  want = reference_norm(np.asarray(x.astype(jnp.float32)), axes)
  np.testing.assert_allclose(got, np.squeeze(want, axis=axes), rtol=1e-6)


# ------------------------------------------------ a 4-layer MLP against hand backprop


def mlp_loss(params, x, y, options):
  h = x
  for i, (w, b) in enumerate(params):
    h = h @ w + b
    if i < len(params) - 1:
      h = bgn_jax.bgn(jnp.tanh(h), **options)
  return 0.5 * jnp.mean(jnp.sum((h - y) ** 2, axis=-1))


@pytest.mark.parametrize(
  "options",
  [{}, {"axes": (1,)}, {"target_norm": 1.0}, {"power": 0.5, "eps": 1e-2}],
  ids=str,
)
def test_mlp_gradient_matches_hand_backprop(options):
  rng = np.random.default_rng(10)
  sizes = [5, 16, 16, 16, 3]
  params = [
    (rng.standard_normal((m, n)) / np.sqrt(m), rng.standard_normal(n) * 0.1)
    for m, n in zip(sizes[:-1], sizes[1:], strict=False)
  ]
  x, y = rng.standard_normal((8, 5)), rng.standard_normal((8, 3))
  got = jax.grad(mlp_loss)(
    jax.tree.map(jnp.float32, params), jnp.float32(x), jnp.float32(y), options
  )
  want, _ = mlp_backprop(
    params,
    x,
    lambda h: (h - y) / x.shape[0],
    activation="tanh",
    bgn_after_activation=range(len(params) - 1),
    bgn_options=options,
  )
  chex.assert_trees_all_close(got, want, rtol=1e-4, atol=1e-6)


# ---------------------------------------------------------------- transforms


def loss(x, w, **options):
  return jnp.sum(bgn_jax.bgn(x, **options) * w)


X = jnp.linspace(-1.0, 1.0, 24).reshape(4, 6)
W = random_cotangent((4, 6), seed=12)
V = random_cotangent((4, 6), seed=13)


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


def run_jacrev(**o):
  # Row i of the Jacobian of bgn(x) . w with respect to x is the gradient; sum it.
  return jax.jacrev(lambda x: bgn_jax.bgn(x, **o) * W)(X).sum(axis=(0, 1))


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


def normalized_grad_by_hand(w, v, t):
  """d/dw <t w / ||w||, v> = t (v / ||w|| - w <w, v> / ||w||**3), in float64."""
  w64, v64 = np.asarray(w, np.float64), np.asarray(v, np.float64)
  norm = np.linalg.norm(w64)
  return t * (v64 / norm - w64 * np.sum(w64 * v64) / norm**3)


@pytest.mark.parametrize("scale", [1.0, 1e-30, 1e30])
def test_grad_of_grad_matches_the_formula(scale, formulation):
  # d/dw of <rule(w), v> differentiates the backward rule itself.
  w = W * jnp.float32(scale)
  cotangent = rule(formulation, target_norm=2.0)
  got = jax.jit(jax.grad(lambda w: jnp.sum(cotangent(w) * V)))(w)
  np.testing.assert_allclose(got, normalized_grad_by_hand(w, V, 2.0), rtol=1e-5)


def test_grad_of_grad_with_axis_name():
  # One group over the vmapped rows: the norm's derivative must be summed over them too.
  def per_row(x, w):
    return jnp.sum(bgn_jax.bgn(x, axis_name="rows") * w)

  def through_bgn(w):
    return jnp.sum(jax.vmap(jax.grad(per_row), axis_name="rows")(X, w) * V)

  got = jax.grad(through_bgn)(W)
  np.testing.assert_allclose(got, normalized_grad_by_hand(W, V, math.sqrt(6)), rtol=1e-5)


@pytest.mark.parametrize("eps", [0.0, 1e-3])
def test_grad_of_grad_of_a_zero_group_is_zero(eps, formulation):
  cotangent = rule(formulation, axes=1, eps=eps)
  w = W.at[1].set(0.0)
  got = np.asarray(jax.grad(lambda w: jnp.sum(cotangent(w) * V))(w))
  assert np.isfinite(got).all()
  np.testing.assert_array_equal(got[1], 0.0)


def test_forward_mode_over_the_backward_works():
  # jax.hessian is jacfwd(jacrev): forward mode over the backward rule, which is defined.
  x, w, v = X[:2, :3], W[:2, :3], V[:2, :3]

  def f(x):
    return jnp.sum(jnp.sin(bgn_jax.bgn(x, target_norm=2.0)) * w)

  hessian = jax.hessian(f)(x)
  by_reverse = jax.jacrev(jax.jacrev(f))(x)
  np.testing.assert_allclose(hessian, by_reverse, rtol=1e-5, atol=1e-7)
  tangent = jax.jvp(jax.grad(f), (x,), (v,))[1]
  np.testing.assert_allclose(tangent, jnp.einsum("ijkl,kl->ij", by_reverse, v), rtol=1e-5)


def test_forward_mode_through_the_node_is_jax_error():
  with pytest.raises(TypeError, match="can't apply forward-mode autodiff"):
    jax.jvp(bgn_jax.bgn, (X,), (V,))


def test_unbound_axis_name_is_reported_at_call_time():
  with pytest.raises(ValueError, match="`axis_name` 'rows' is not bound here"):
    jax.grad(loss)(X, W, axis_name="rows")
  with pytest.raises(ValueError, match="`axis_name` 'cols' is not bound here"):
    jax.vmap(functools.partial(loss, axis_name=("rows", "cols")), axis_name="rows")(X, W)


# ---------------------------------------------------------------- jax.export


@pytest.mark.parametrize(
  "options",
  [{}, {"target_norm": "sqrt_size", "eps": 1e-3}, {"axes": -1, "power": 0.5}],
  ids=str,
)
def test_export_with_symbolic_shapes(options):
  from flax import linen as nn

  model = nn.Sequential([nn.Dense(8), bgn_jax.BGN(**options), nn.Dense(2)])
  x = random_cotangent((3, 5, 16), seed=14)
  params = model.init(jax.random.key(0), x)

  def loss_of_input(params, x):
    return jnp.sum(jnp.tanh(model.apply(params, x)))

  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, t, 16"), jnp.float32)
  exported = jax.export.export(jax.jit(jax.value_and_grad(loss_of_input, argnums=(0, 1))))(
    params, spec
  )
  pytest.importorskip("flatbuffers", reason="jax.export's serialization needs flatbuffers")
  restored = jax.export.deserialize(exported.serialize())
  unexported = jax.jit(jax.value_and_grad(loss_of_input, argnums=(0, 1)))
  for shape in [(3, 5, 16), (2, 7, 16)]:
    x = random_cotangent(shape, seed=15)
    chex.assert_trees_all_close(
      restored.call(params, x), unexported(params, x), rtol=1e-5, atol=1e-6
    )
  forward = jax.export.export(jax.jit(model.apply))(params, spec)
  chex.assert_trees_all_close(forward.call(params, x), model.apply(params, x), rtol=1e-6)


def test_export_for_other_platforms():
  spec = jax.ShapeDtypeStruct(jax.export.symbolic_shape("b, 16"), jnp.float32)
  grad = jax.jit(jax.grad(functools.partial(loss, w=1.0)))
  exported = jax.export.export(grad, platforms=("cpu", "cuda", "tpu"))(spec)
  assert exported.platforms == ("cpu", "cuda", "tpu")
  x = random_cotangent((4, 16), seed=16)
  chex.assert_trees_all_close(exported.call(x), grad(x), rtol=1e-6)


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
  assert set(bgn_jax.__all__) >= {"bgn", "BGN", "l2_norm", "nnx", "__version__"}
  assert isinstance(bgn_jax.__version__, str)


# ---------------------------------------------------------------- bad configuration


@pytest.mark.parametrize(("options", "error", "message"), BAD_OPTIONS, ids=str)
@pytest.mark.parametrize("traced", [False, True])
def test_bad_configuration_is_rejected_at_call_time(options, error, message, traced):
  call = functools.partial(bgn_jax.bgn, **options)
  with pytest.raises(error, match=re.escape(message)):
    (jax.jit(call) if traced else call)(jnp.ones((2, 3)))


@pytest.mark.parametrize(
  ("spec", "error", "message"),
  [
    (("data",), TypeError, "bgn: `spec` must be a jax.sharding.PartitionSpec"),
    (jax.sharding.PartitionSpec("data"), ValueError, "no mesh axis is manual here"),
  ],
  ids=str,
)
@pytest.mark.parametrize("traced", [False, True])
def test_spec_outside_shard_map_is_refused(spec, error, message, traced):
  call = functools.partial(bgn_jax.bgn, spec=spec)
  with pytest.raises(error, match=re.escape(message)):
    (jax.jit(call) if traced else call)(jnp.ones((2, 3)))


@pytest.mark.parametrize(
  "x",
  [
    jnp.ones((2,), jnp.int32),
    np.arange(3),
    3,
    True,
    jnp.ones(2, bool),
    jnp.ones(2, jnp.complex64),
    1j,
    None,
    "text",
  ],
  ids=str,
)
@pytest.mark.parametrize("fn", [bgn_jax.bgn, bgn_jax.l2_norm], ids=lambda f: f.__name__)
def test_non_floating_input_is_rejected(fn, x):
  with pytest.raises(TypeError, match=f"{fn.__name__}: `x` must be a floating-point array"):
    fn(x)


@pytest.mark.parametrize("name", ["target_norm", "power", "eps"])
def test_an_option_given_as_a_traced_value_or_an_array_says_so(name):
  x = jnp.ones((2, 3))
  with pytest.raises(TypeError, match=rf"`{name}` must be .* got a traced value \(float32\[\]\)"):
    jax.jit(lambda x, v: bgn_jax.bgn(x, **{name: v}))(x, 0.5)
  with pytest.raises(TypeError, match=rf"`{name}` must be .* got an array, .*float\(value\)"):
    bgn_jax.bgn(x, **{name: np.array(0.5)})


# A float16, float8 or float4 result holds a group of norm t only where t is inside
# the dtype's normal range (its accumulator holds far more).
@pytest.mark.parametrize("dtype", [jnp.float16, jnp.float8_e4m3fn, jnp.float4_e2m1fn])
def test_a_target_outside_the_dtype_range_is_refused(dtype):
  info = jnp.finfo(dtype)
  low, high = float(info.tiny), float(info.max)
  g = jnp.full((4,), 0.5, jnp.float32).astype(dtype)
  for t in (low, high):  # accepted, and every entry t / 2 comes back exactly
    got = backward(g, g, target_norm=t)
    np.testing.assert_array_equal(np.asarray(got, np.float64), np.full(4, t / 2))
  for t in (low / 2, high * 2):
    with pytest.raises(ValueError, match=re.escape(f"`target_norm` {t!r} is outside")):
      bgn_jax.bgn(g, target_norm=t)  # checked eagerly too
    with pytest.raises(ValueError, match=f"normal range of the input's dtype {info.dtype}"):
      jax.grad(lambda x, t=t: jnp.sum(bgn_jax.bgn(x, target_norm=t).astype(jnp.float32)))(g)
  big = jax.ShapeDtypeStruct((2, int(high) ** 2 + 1), dtype)  # sqrt_units: sqrt(width) > high
  with pytest.raises(ValueError, match=r"`target_norm` 'sqrt_units' \(= .* here\) is outside"):
    jax.eval_shape(bgn_jax.bgn, big)
  jax.jit(functools.partial(bgn_jax.bgn, power=0.0, target_norm=high * 2))(g)  # t unused


def test_bad_configuration_is_rejected_by_modules():
  with pytest.raises(ValueError, match="`power`"):
    bgn_jax.nnx.BGN(power=2.0)
  with pytest.raises(ValueError, match="`eps`"):
    bgn_jax.BGN(eps=-1.0).apply({}, X)
