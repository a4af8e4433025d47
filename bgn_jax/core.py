"""Backward Gradient Normalization: the identity forward, a gradient rescale backward.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Hashable, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

Axes = int | Sequence[int] | None
TargetNorm = float | Literal["sqrt_units"]
AxisName = Hashable | tuple[Hashable, ...] | None

__all__ = ["bgn", "BGNConfig", "l2_norm", "make_config", "normalize_cotangent"]


@dataclasses.dataclass(frozen=True)
class BGNConfig:
  """A validated, hashable BGN configuration for one input shape.

  Attributes:
    axes: the normalized axes, non-negative and sorted, or None for the whole array.
    target_norm: the norm t every group gets after the node.
    power: the exponent c of the rescale ``(t / ||g||) ** c``.
    eps: the floor on the norm.
    axis_name: mapped axis names over which the squared norm is summed.
  """

  axes: tuple[int, ...] | None
  target_norm: float
  power: float
  eps: float
  axis_name: AxisName


def _is_real_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
    value, (bool, np.bool_)
  )


def _check_axes(axes: Axes, ndim: int) -> tuple[int, ...] | None:
  if axes is None:
    return None
  if isinstance(axes, (int, np.integer)) and not isinstance(axes, (bool, np.bool_)):
    axes = (int(axes),)
  if not isinstance(axes, (tuple, list)) or not all(
    isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in axes
  ):
    raise TypeError(f"bgn: `axes` must be None, an int or a tuple of ints; got {axes!r}.")
  normalized = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
        f"bgn: `axes` entry {axis} is out of range for an input of rank {ndim}; "
        f"allowed are {-ndim}..{ndim - 1}."
      )
    normalized.append(int(axis) % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"bgn: `axes` {tuple(axes)!r} names the same axis twice.")
  return tuple(sorted(normalized))


def _check_target_norm(target_norm: TargetNorm, shape: tuple[int, ...]) -> float:
  if isinstance(target_norm, str):
    if target_norm != "sqrt_units":
      raise ValueError(
        f"bgn: unknown `target_norm` {target_norm!r}; use a positive float or 'sqrt_units'."
      )
    units = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return math.sqrt(units)
  if not _is_real_number(target_norm):
    raise TypeError(
      f"bgn: `target_norm` must be a positive float or 'sqrt_units'; got {target_norm!r}."
    )
  t = float(target_norm)
  if not (math.isfinite(t) and t > 0):
    raise ValueError(f"bgn: `target_norm` must be positive and finite; got {target_norm!r}.")
  return t


def _check_power(power: float) -> float:
  if not _is_real_number(power):
    raise TypeError(f"bgn: `power` must be a float in [0, 1]; got {power!r}.")
  if not 0.0 <= float(power) <= 1.0:
    raise ValueError(f"bgn: `power` must lie in [0, 1]; got {power!r}.")
  return float(power)


def _check_eps(eps: float) -> float:
  if not _is_real_number(eps):
    raise TypeError(f"bgn: `eps` must be a float >= 0; got {eps!r}.")
  if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
    raise ValueError(f"bgn: `eps` must be finite and >= 0; got {eps!r}.")
  return float(eps)


def _check_axis_name(axis_name: AxisName) -> AxisName:
  if isinstance(axis_name, list):
    axis_name = tuple(axis_name)
  try:
    hash(axis_name)
  except TypeError:
    raise TypeError(
      f"bgn: `axis_name` must be None, a mapped axis name or a tuple of names; got {axis_name!r}."
    ) from None
  return axis_name


def make_config(
  shape: tuple[int, ...],
  *,
  axes: Axes = None,
  target_norm: TargetNorm = "sqrt_units",
  power: float = 1.0,
  eps: float = 0.0,
  axis_name: AxisName = None,
) -> BGNConfig:
  """Validates BGN options for an input of the given shape.

  Args:
    shape: the shape of the array BGN is applied to.
    axes, target_norm, power, eps, axis_name: as in :func:`bgn`.

  Returns:
    A hashable :class:`BGNConfig`.

  Raises:
    TypeError, ValueError: naming the argument, the value given and what is allowed.
  """
  return BGNConfig(
    axes=_check_axes(axes, len(shape)),
    target_norm=_check_target_norm(target_norm, tuple(shape)),
    power=_check_power(power),
    eps=_check_eps(eps),
    axis_name=_check_axis_name(axis_name),
  )


# Blue's scaled sum of squares (ACM TOMS 4(1), 1978) without masks or a max-abs
# pass: the plain sum of squares and two sums of squares of g scaled by powers
# of two, read in one pass over g. For every group one of the three is finite
# and free of any significant underflow (float32 numbers below; groups of up to
# 2**40 entries):
# - the plain sum, unless it overflows (norm >= 2**64) or falls below `floor`
#   (2**-56): squares lost to underflow are < 2**-126 each, < 2**-86 in all;
# - below the floor every |g| < 2**-28, so the squares of g * 2**64 stay below
#   2**72 and their sum below 2**112; only subnormal g underflow (XLA on the
#   CPU flushes those to zero anyway);
# - g * 2**-88 squares to < 2**80 for any finite g, its sum stays finite, and it
#   is used only when the plain sum overflowed, so against a sum >= 2**-48 the
#   lost squares (< 2**-86 in all) do not count.
# A group holding NaN or Inf makes all three sums non-finite.
@dataclasses.dataclass(frozen=True)
class _Scales:
  log2_up: int  # the copy for tiny groups is g * 2**log2_up
  log2_down: int  # the copy for huge groups is g * 2**-log2_down
  floor: float  # a plain sum of squares below this is replaced by the scaled-up one
  log2_pre_down: int  # a huge group is rescaled as (g * 2**-log2_pre_down) * scalar


_SCALES = {
  np.dtype(np.float32): _Scales(log2_up=64, log2_down=88, floor=2.0**-56, log2_pre_down=40),
  np.dtype(np.float64): _Scales(log2_up=600, log2_down=600, floor=2.0**-900, log2_pre_down=300),
}


def _accumulator_dtype(dtype: Any) -> np.dtype:
  # Norms of bf16/fp16 cotangents are accumulated in float32, float64 in float64.
  return np.dtype(jnp.promote_types(dtype, jnp.float32))


# False makes every platform take the GPU formulation (the tests check it on the CPU).
_CPU_FORMULATION = True


def _sums_of_squares(
  arrays: tuple[jax.Array, ...], axes: tuple[int, ...] | None, axis_name: AxisName
) -> tuple[jax.Array, ...]:
  """Sums of squares of same-shaped arrays over ``axes``, dims kept.

  Off the CPU as one variadic reduce: one kernel that reads its inputs once,
  where XLA on an H100 gave three sibling sums of a matmul's output three
  kernels. On the CPU as separate sums, which XLA there vectorizes and a
  variadic reduce it runs 2-3x slower.
  """

  def separate(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.sum(v * v, axis=axes, keepdims=True) for v in arrays)

  def variadic(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    dims = tuple(range(arrays[0].ndim)) if axes is None else axes
    zero = arrays[0].dtype.type(0)
    sums = jax.lax.reduce(
      tuple(v * v for v in arrays),
      (zero,) * len(arrays),
      lambda x, y: tuple(xi + yi for xi, yi in zip(x, y, strict=True)),
      dims,
    )
    kept = tuple(1 if i in dims else n for i, n in enumerate(arrays[0].shape))
    return tuple(s.reshape(kept) for s in sums)

  if len(arrays) == 1:
    sums = separate(arrays)
  elif _CPU_FORMULATION:
    sums = jax.lax.platform_dependent(arrays, cpu=separate, default=variadic)
  else:
    sums = variadic(arrays)
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def _scaled_norm(
  g: jax.Array, axes: tuple[int, ...] | None, axis_name: AxisName
) -> tuple[jax.Array, jax.Array]:
  """Returns (r, k) with ||g|| = r / k per group, r free of over/underflow.

  k is an exact power of two (1 when the plain sum of squares is safe).
  """
  acc = _accumulator_dtype(g.dtype)
  scales = _SCALES[acc]
  up = acc.type(2.0**scales.log2_up)
  down = acc.type(2.0**-scales.log2_down)

  def three_sums(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Three sums of one input, no masks, in one reduction that reads g once;
    # memory-bound on the GPU, the extra arithmetic costs nothing there.
    a = g.astype(acc)
    # Behind a barrier, the scales are no constants to XLA's simplifier, which
    # would otherwise rewrite (a * up)**2 as a**2 * up**2 = a**2 * inf where the
    # reduction vanishes (a group of one entry).
    up_copy, down_copy = jax.lax.optimization_barrier((jnp.asarray(up), jnp.asarray(down)))
    plain, small, large = _sums_of_squares((a, a * up_copy, a * down_copy), axes, axis_name)
    use_large = ~jnp.isfinite(plain)
    use_small = plain < scales.floor
    ss = jnp.where(use_large, large, jnp.where(use_small, small, plain))
    k = jnp.where(use_large, down, jnp.where(use_small, up, acc.type(1)))
    return ss, k

  def plain_first(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    # On the CPU a reduction costs time in proportion to its arithmetic, and
    # XLA there runs each sum as its own pass, while a conditional is cheap: sum
    # the plain squares, and go over g again only when a group needs a scale.
    (plain,) = _sums_of_squares((g.astype(acc),), axes, axis_name)
    safe = jnp.all(jnp.isfinite(plain) & (plain >= scales.floor))
    return jax.lax.cond(safe, lambda g: (plain, jnp.ones_like(plain)), three_sums, g)

  @jax.custom_jvp
  def scaled_norm(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    if axis_name is None:
      # A conditional on the GPU would copy its predicate to the host and wait.
      # The conditional's operand is the accumulator copy: for bf16 XLA on the
      # CPU then hands over the float32 product it holds anyway, where g itself
      # would be written out once more, at each node.
      branches = {"cpu": plain_first} if _CPU_FORMULATION else {}
      ss, k = jax.lax.platform_dependent(g.astype(acc), **branches, default=three_sums)
    else:
      # A collective inside a conditional branch is avoided.
      ss, k = three_sums(g)
    return jnp.sqrt(ss), k

  @scaled_norm.defjvp
  def scaled_norm_jvp(
    primals: tuple[jax.Array], tangents: tuple[jax.Array]
  ) -> tuple[tuple[jax.Array, jax.Array], tuple[jax.Array, jax.Array]]:
    # d||g|| = <g / ||g||, dg>, with g / ||g|| formed as (g * k) / r. Autodiff
    # through the sums would square the scales (XLA then merges them into
    # products that overflow, and grad of grad becomes inf) and be NaN at 0.
    (g,), (dg,) = primals, tangents
    r, k = scaled_norm(g)
    usable = (r > 0) & jnp.isfinite(r)
    unit = g.astype(acc) * k / jnp.where(usable, r, 1)
    dr = jnp.sum(unit * dg.astype(acc), axis=axes, keepdims=True)
    if axis_name is not None:
      dr = jax.lax.psum(dr, axis_name)
    return (r, k), (jnp.where(usable, dr * k, 0), jnp.zeros_like(k))

  return scaled_norm(g)


def l2_norm(x: jax.Array, axes: Axes = None) -> jax.Array:
  """The L2 norm of ``x`` over ``axes``, free of overflow and underflow.

  Computed with the same scaled sums of squares as the BGN backward rule,
  so entries around 1e-30 (whose float32 squares underflow) or 1e30 (whose
  squares overflow) still give the right norm.

  Args:
    x: a floating-point array.
    axes: the reduced axes (an int or a tuple of ints, negative allowed), or
      None for all of them.

  Returns:
    The norms, with the reduced axes removed, in float32 for 16- and 32-bit
    inputs and float64 for float64 inputs.

  Raises:
    TypeError, ValueError: ``axes`` is not an int, a tuple of ints or None, or
      names an axis out of range or twice.
  """
  x = jnp.asarray(x)
  checked = _check_axes(axes, x.ndim)
  scaled_norm, inverse_scale = _scaled_norm(x, checked, None)
  norm = scaled_norm / inverse_scale
  return jnp.squeeze(norm, axis=tuple(range(x.ndim)) if checked is None else checked)


def normalize_cotangent(g: jax.Array, config: BGNConfig) -> jax.Array:
  """The BGN backward rule: ``g * (t / max(||g||, eps)) ** power`` per group.

  An all-zero group stays zero; a group holding NaN or +-Inf becomes all NaN
  (for ``power > 0``; ``power == 0`` returns ``g`` untouched).

  Args:
    g: the cotangent arriving at the node.
    config: the validated options, see :func:`make_config`.

  Returns:
    The rescaled cotangent, with the dtype of ``g``.
  """
  if config.power == 0.0:
    return g
  acc = _accumulator_dtype(g.dtype)
  c = config.power
  r, inverse_scale = _scaled_norm(g, config.axes, config.axis_name)
  finite = jnp.isfinite(r)
  positive = r > 0
  # Substituting 1 where the group is zero or non-finite keeps the division and
  # its derivative (grad of grad) free of inf and NaN.
  r = jnp.where(positive & finite, r, 1)
  if config.eps > 0:
    # eps in the group's scale; a floor above the norm replaces it.
    r = jnp.maximum(r, acc.type(config.eps) * inverse_scale)
  ratio = acc.type(config.target_norm) / r
  factor = ratio if c == 1.0 else ratio**c
  factor = jnp.where(positive, factor, 0)
  factor = jnp.where(finite, factor, jnp.nan)
  # g * factor * k**c as (g * pre) * (factor * post), pre * post = k**c, where
  # pre and post are powers of two chosen by the band alone: `factor` is used
  # once, so XLA on the GPU computes it inside the pass that multiplies (two uses
  # of it cost a kernel of its own per node, measured on an H200). A small band
  # scales up first, as before. A huge one (norm >= 2**64 in float32) scales
  # down by 2**-40 first: that flushes only entries < 2**-86, whose results
  # (< t * 2**-150) are below float32's normal range for t < 2**24, and leaves
  # the scalar t * 2**40 / ||g|| (power 1) a normal number for every finite
  # group of up to 2**40 entries when t >= 2**-18.
  scales = _SCALES[acc]
  small_band, big_band = inverse_scale > 1, inverse_scale < 1
  pre = jnp.where(
    small_band, inverse_scale, jnp.where(big_band, acc.type(2.0**-scales.log2_pre_down), 1)
  )
  post = jnp.where(
    small_band,
    acc.type(2.0 ** ((c - 1) * scales.log2_up)),
    jnp.where(big_band, acc.type(2.0 ** (scales.log2_pre_down - c * scales.log2_down)), 1),
  )
  return ((g.astype(acc) * pre) * (factor * post)).astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _bgn(config: BGNConfig, x: jax.Array) -> jax.Array:
  del config
  return x


def _bgn_fwd(config: BGNConfig, x: jax.Array) -> tuple[jax.Array, None]:
  del config
  return x, None


# Traced and lowered once per (shape, dtype, config) however many nodes share them:
# a deep unrolled model otherwise traces the rule again at every node.
_normalize_cotangent_jit = jax.jit(normalize_cotangent, static_argnums=1)


def _bgn_bwd(config: BGNConfig, residuals: None, g: jax.Array) -> tuple[jax.Array]:
  del residuals
  # A nested jit would not see the mapped axes that `axis_name` names.
  rule = normalize_cotangent if config.axis_name is not None else _normalize_cotangent_jit
  return (rule(g, config),)


_bgn.defvjp(_bgn_fwd, _bgn_bwd)


def bgn(
  x: jax.Array,
  *,
  axes: Axes = None,
  target_norm: TargetNorm = "sqrt_units",
  power: float = 1.0,
  eps: float = 0.0,
  axis_name: AxisName = None,
) -> jax.Array:
  """Backward Gradient Normalization node: identity forward, normalized gradient backward.

  In the forward pass ``x`` is returned unchanged and nothing is saved for the
  backward pass. In the backward pass each group of the cotangent ``g`` becomes
  ``g * (t / max(||g||_2, eps)) ** power``.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    x: a floating-point array.
    axes: None normalizes the whole array as one group (one scalar rescales the
      mini-batch); an int or tuple of ints gives one group per index of the
      other axes (``axes=(1,)`` on ``(B, n)`` is per example). Negative allowed.
    target_norm: the norm t of each group after the node: a positive float, or
      ``"sqrt_units"`` for ``sqrt(prod(x.shape[1:]))`` (``sqrt(x.size)`` for 0-D
      and 1-D ``x``).
    power: c in [0, 1]; 0 leaves the gradient unchanged, 1 normalizes fully.
    eps: floor on the norm (>= 0); caps how much a tiny gradient is scaled up.
    axis_name: a mapped axis name or tuple of names (``pmap``, ``shard_map``,
      ``vmap(axis_name=...)``) over which the squared norm is summed, so a
      batch split across devices is normalized as the whole batch.

  Returns:
    ``x``, unchanged.

  Raises:
    TypeError: ``x`` is not floating point, or an option has the wrong type.
    ValueError: an option is out of range.
  """
  if not isinstance(x, jax.Array):
    if isinstance(x, (bool, int, np.bool_, np.integer)):
      raise TypeError(f"bgn: `x` must be a floating-point array; got the integer {x!r}.")
    x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise TypeError(
      f"bgn: `x` must be a floating-point array; got dtype {x.dtype}. "
      "Cast it, for example x.astype(jnp.float32)."
    )
  config = make_config(
    x.shape,
    axes=axes,
    target_norm=target_norm,
    power=power,
    eps=eps,
    axis_name=axis_name,
  )
  return _bgn(config, x)
