"""Backward Gradient Normalization: the identity forward, a gradient rescale backward.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import contextvars
import dataclasses
import functools
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Literal

import jax
import jax.core
import jax.numpy as jnp
import numpy as np
from jax.experimental.custom_partitioning import (
  ArrayMapping,
  SdyShardingRule,
  custom_partitioning,
)
from jax.sharding import PartitionSpec
from jax.typing import ArrayLike, DTypeLike

Axes = int | Sequence[int] | None
TargetRule = Literal["sqrt_units", "sqrt_size"]
TargetNorm = float | TargetRule
AxisName = Hashable | tuple[Hashable, ...] | None
# "platform": on the CPU the plain sum first and scaled sums only when a group needs
# them, elsewhere the three sums in one variadic reduce. "variadic": the latter on
# every platform (the tests check it on the CPU).
_Formulation = Literal["platform", "variadic"]

__all__ = ["bgn", "BGNConfig", "l2_norm", "make_config", "normalize_cotangent"]

_TARGET_RULES = ("sqrt_units", "sqrt_size")


@dataclasses.dataclass(frozen=True)
class BGNConfig:
  """A validated, hashable BGN configuration for one input shape.

  Attributes:
    axes: the normalized axes, non-negative and sorted, or None for the whole array.
    target_norm: the norm t every group gets after the node: a float, or the name
      of the rule that takes t from the cotangent's shape in the backward rule
      (so that it holds for symbolic shapes too).
    power: the exponent c of the rescale ``(t / ||g||) ** c``.
    eps: the floor on the norm.
    axis_name: mapped axis names over which the squared norm is summed.
    units_scale: the factor by which the units of a target rule exceed those of the
      block the node sees: the product of the sizes of the ``shard_map`` mesh axes
      that split the counted dimensions (1 outside ``shard_map``).
  """

  axes: tuple[int, ...] | None
  target_norm: float | TargetRule
  power: float
  eps: float
  axis_name: AxisName
  units_scale: int = 1


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
#
# A huge group is rescaled as (g * 2**-p) * (t * 2**p / ||g||)**c-ish scalars: the
# scalar stays normal for norms up to 2**(emax + 20) when p >= emin + emax + 20 -
# log2(t), and the entries the pre-scale flushes (< 2**(emin + p)) have results
# below the normal range, as they would anyway, when p <= emax / 2 - log2(t) (for
# power 1; with power < 1 such entries, 2**-147 of their group's norm and less,
# come back zero). So p is chosen from t, the middle of that interval (clipped to
# [0, -emin]: the pre-scale must not overflow, nor itself underflow). The options
# the accumulator holds, from the scales (float32: emin = -126, emax = 128):
# - t / ||g|| normal in every band: t in [min_target, max_target], with margin;
# - with eps, a floored group's ratio is (t / eps) / k, normal in the small band
#   (k = 2**log2_up) when t / eps >= 2**(emin + log2_up) = min_eps_ratio; t / eps
#   <= max_eps_ratio = 2**-emin keeps it finite, and eps must be a normal number.
@dataclasses.dataclass(frozen=True)
class _Scales:
  log2_up: int  # the copy for tiny groups is g * 2**log2_up
  log2_down: int  # the copy for huge groups is g * 2**-log2_down
  floor: float  # a plain sum of squares below this is replaced by the scaled-up one
  log2_pre_down: int  # p for t = 1: a huge group is rescaled as (g * 2**-p) * scalar
  max_pre_down: int  # the largest p, -emin
  min_target: float
  max_target: float
  min_eps_ratio: float  # the smallest target_norm / eps
  max_eps_ratio: float  # the largest target_norm / eps
  tiny: float  # the smallest normal number


_SCALES = {
  np.dtype(np.float32): _Scales(
    log2_up=64,
    log2_down=88,
    floor=2.0**-56,
    log2_pre_down=43,
    max_pre_down=126,
    min_target=2.0**-60,
    max_target=2.0**50,
    min_eps_ratio=2.0**-62,
    max_eps_ratio=2.0**126,
    tiny=2.0**-126,
  ),
  np.dtype(np.float64): _Scales(
    log2_up=600,
    log2_down=600,
    floor=2.0**-900,
    log2_pre_down=267,
    max_pre_down=1022,
    min_target=2.0**-500,
    max_target=2.0**480,
    min_eps_ratio=2.0**-422,
    max_eps_ratio=2.0**1022,
    tiny=2.0**-1022,
  ),
}


def _log2_pre_down(t: float | None, scales: _Scales) -> int:
  if not t:  # a target from a symbolic shape, within [1, 2**21]: p for t = 1 suits it
    return scales.log2_pre_down
  return min(max(scales.log2_pre_down - math.floor(math.log2(t)), 0), scales.max_pre_down)


def _accumulator_dtype(dtype: Any) -> np.dtype:
  # float64 norms are accumulated in float64; every narrower float (float16,
  # bfloat16, the float8 and float4 formats) in float32.
  return np.dtype(np.float64) if np.dtype(dtype) == np.float64 else np.dtype(np.float32)


def _is_real_number(value: Any) -> bool:
  return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(
    value, (bool, np.bool_)
  )


def _option_type_error(name: str, value: Any, allowed: str) -> TypeError:
  """The TypeError for an option that is not a Python number, saying what it got."""
  if isinstance(value, jax.core.Tracer):
    got = (
      f"a traced value ({value.aval.str_short()}). Options configure the node when JAX "
      "traces it: pass a Python number, or make the argument static (jax.jit(..., "
      "static_argnames=...))"
    )
  elif isinstance(value, (np.ndarray, jax.Array)):
    got = f"an array, {value!r}; pass a Python number (float(value))"
  else:
    got = repr(value)
  return TypeError(f"bgn: `{name}` must be {allowed}; got {got}.")


def _check_x(x: ArrayLike, fn_name: str) -> jax.Array:
  if isinstance(x, (bool, int, np.bool_, np.integer)):
    raise TypeError(f"{fn_name}: `x` must be a floating-point array; got the integer {x!r}.")
  if isinstance(x, complex):
    raise TypeError(f"{fn_name}: `x` must be a floating-point array; got the complex {x!r}.")
  if not isinstance(x, jax.Array):
    try:
      x = jnp.asarray(x)
    except (TypeError, ValueError):
      raise TypeError(
        f"{fn_name}: `x` must be a floating-point array; got {type(x).__name__} {x!r:.80}."
      ) from None
  if not jnp.issubdtype(x.dtype, jnp.floating):
    hint = " Complex values are not supported: normalize x.real and x.imag, or abs(x)." * (
      jnp.issubdtype(x.dtype, jnp.complexfloating)
    )
    raise TypeError(
      f"{fn_name}: `x` must be a floating-point array; got dtype {x.dtype}. "
      f"Cast it, for example x.astype(jnp.float32).{hint}"
    )
  return x


def _check_axes(axes: Axes, ndim: int, fn_name: str = "bgn") -> tuple[int, ...] | None:
  if axes is None:
    return None
  if isinstance(axes, (int, np.integer)) and not isinstance(axes, (bool, np.bool_)):
    axes = (int(axes),)
  if not isinstance(axes, (tuple, list)) or not all(
    isinstance(a, (int, np.integer)) and not isinstance(a, (bool, np.bool_)) for a in axes
  ):
    raise TypeError(f"{fn_name}: `axes` must be None, an int or a tuple of ints; got {axes!r}.")
  normalized = []
  for axis in axes:
    if not -ndim <= axis < ndim:
      raise ValueError(
        f"{fn_name}: `axes` entry {axis} is out of range for an input of rank {ndim}; "
        f"allowed are {-ndim}..{ndim - 1}."
      )
    normalized.append(int(axis) % ndim)
  if len(set(normalized)) != len(normalized):
    raise ValueError(f"{fn_name}: `axes` {tuple(axes)!r} names the same axis twice.")
  return tuple(sorted(normalized))


def _counted_dims(
  target_norm: TargetRule, axes: tuple[int, ...] | None, ndim: int
) -> tuple[int, ...]:
  """The dimensions whose sizes multiply into a target rule's units."""
  if target_norm == "sqrt_size" or (axes is None and ndim <= 1):
    return tuple(range(ndim))
  return tuple(range(1, ndim)) if axes is None else axes


def _target_units(target_norm: TargetRule, axes: tuple[int, ...] | None, shape: Sequence[Any]):
  """The number whose square root is the target: an int, or symbolic under jax.export."""
  return math.prod(shape[d] for d in _counted_dims(target_norm, axes, len(shape)))


def _check_target_norm(
  target_norm: TargetNorm, axes: tuple[int, ...] | None, shape: Sequence[Any], scales: _Scales
) -> tuple[float | TargetRule, float | None]:
  """Returns the config's target and its value (None where the shape is symbolic)."""
  if isinstance(target_norm, str):
    if target_norm not in _TARGET_RULES:
      raise ValueError(
        f"bgn: unknown `target_norm` {target_norm!r}; use a positive float, 'sqrt_units' "
        "or 'sqrt_size'."
      )
    units = _target_units(target_norm, axes, shape)  # type: ignore[arg-type]
    if not isinstance(units, int) or units == 0:
      return target_norm, None  # symbolic, or an empty array: nothing to check
    t = math.sqrt(units)
    if t > scales.max_target:
      raise ValueError(
        f"bgn: `target_norm` {target_norm!r} gives {t:.6g} for shape {tuple(shape)}, above "
        f"the {scales.max_target:.6g} that the accumulator holds; pass a float target."
      )
    return target_norm, t
  if not _is_real_number(target_norm):
    raise _option_type_error(
      "target_norm", target_norm, "a positive float, 'sqrt_units' or 'sqrt_size'"
    )
  t = float(target_norm)
  if not (math.isfinite(t) and t > 0):
    raise ValueError(f"bgn: `target_norm` must be positive and finite; got {target_norm!r}.")
  if not scales.min_target <= t <= scales.max_target:
    raise ValueError(
      f"bgn: `target_norm` {target_norm!r} is outside [{scales.min_target:.6g}, "
      f"{scales.max_target:.6g}], the targets that every group's rescale holds in the "
      "accumulator; rescale the loss instead, or use float64."
    )
  return t, t


def _check_target_fits(target_norm: TargetNorm, t: float | None, dtype: DTypeLike) -> None:
  """Refuses a target outside the input dtype's normal range (float16, float8, float4).

  The result is cast back to that dtype: entries of a group of norm t reach t, so a
  larger t overflows (inf, or NaN where the format has no inf), and below its smallest
  normal number every entry is subnormal or zero.
  """
  if t is None:
    return
  info = jnp.finfo(dtype)
  low, high = float(info.tiny), float(info.max)
  if low <= t <= high:
    return
  given = f"{target_norm!r} (= {t:.6g} here)" if isinstance(target_norm, str) else repr(target_norm)
  raise ValueError(
    f"bgn: `target_norm` {given} is outside [{low:.6g}, {high:.6g}], the normal range of the "
    f"input's dtype {np.dtype(dtype).name}: a group rescaled to that norm would overflow "
    "(inf or NaN) or flush to zero in it. Pass a float target_norm in that range, or "
    "apply the node in a wider dtype (x.astype(jnp.float32))."
  )


def _check_power(power: float) -> float:
  if not _is_real_number(power):
    raise _option_type_error("power", power, "a float in [0, 1]")
  if not 0.0 <= float(power) <= 1.0:
    raise ValueError(f"bgn: `power` must lie in [0, 1]; got {power!r}.")
  return float(power)


def _check_eps(eps: float, t: float | None, scales: _Scales) -> float:
  if not _is_real_number(eps):
    raise _option_type_error("eps", eps, "a float >= 0")
  if not (math.isfinite(float(eps)) and float(eps) >= 0.0):
    raise ValueError(f"bgn: `eps` must be finite and >= 0; got {eps!r}.")
  eps = float(eps)
  if eps > 0 and t is not None:
    low, high = max(t / scales.max_eps_ratio, scales.tiny), t / scales.min_eps_ratio
    if not low <= eps <= high:
      raise ValueError(
        f"bgn: `eps` {eps!r} with a target norm of {t:.6g} is outside [{low:.6g}, "
        f"{high:.6g}], where the floored rescale t / eps holds in the accumulator; use 0 "
        "for no floor, or an eps in that range."
      )
  return eps


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


def _check_axis_name_is_bound(axis_name: AxisName) -> None:
  # Unchecked, an unbound name would fail only in the backward pass, at its psum.
  for name in axis_name if isinstance(axis_name, tuple) else (axis_name,):
    try:
      jax.lax.axis_size(name)
    except NameError:
      raise ValueError(
        f"bgn: `axis_name` {name!r} is not bound here. Call bgn inside the transform that "
        "names it (jax.vmap(..., axis_name=...), jax.pmap, jax.shard_map), or pass "
        "axis_name=None."
      ) from None


def _names(axis_name: AxisName) -> tuple[Hashable, ...]:
  if axis_name is None:
    return ()
  return axis_name if isinstance(axis_name, tuple) else (axis_name,)


def _manual_mesh() -> tuple[dict[Hashable, int], bool]:
  """The sizes of the ``shard_map`` (and ``pmap``) mesh axes manual here, and whether
  JAX tracks which of them each value varies over (``check_vma``)."""
  mesh = jax.sharding.get_abstract_mesh()
  manual = {name: mesh.shape[name] for name in mesh.manual_axes}
  # JAX keeps no public reader of the flag; without it, nothing varies visibly.
  check_vma = getattr(getattr(jax._src.config, "_check_vma", None), "value", False)  # type: ignore[attr-defined]
  return manual, bool(check_vma) and bool(manual)


def _spec_names(
  spec: Any, ndim: int, manual: dict[Hashable, int]
) -> tuple[tuple[Hashable, ...], ...]:
  """The mesh axes that split each dimension of x, from its PartitionSpec."""
  if not isinstance(spec, PartitionSpec):
    raise TypeError(
      f"bgn: `spec` must be a jax.sharding.PartitionSpec (x's entry of shard_map's "
      f"in_specs); got {spec!r}."
    )
  if not manual:
    raise ValueError(
      f"bgn: `spec` {spec} describes how shard_map splits x, but no mesh axis is manual "
      "here. Outside shard_map (under jit with NamedSharding, every reduction is already "
      "global) pass spec=None."
    )
  if len(spec) > ndim:
    raise ValueError(f"bgn: `spec` {spec} has {len(spec)} entries, more than x's rank {ndim}.")
  per_dim = tuple(_names(entry) for entry in (*spec, *(None,) * (ndim - len(spec))))
  flat = [name for names in per_dim for name in names]
  for name in flat:
    if name not in manual:
      raise ValueError(
        f"bgn: `spec` {spec} names {name!r}, which is not a manual mesh axis here; the "
        f"manual axes are {tuple(manual)}."
      )
  if len(set(flat)) != len(flat):
    raise ValueError(f"bgn: `spec` {spec} names a mesh axis twice.")
  return per_dim


def _check_varying(x: jax.Array, axis_name: AxisName, spec: PartitionSpec | None) -> None:
  """Under shard_map with check_vma, the mesh axes x varies over must be the ones ``spec``
  names: an axis left out (a forgotten spec) leaves a group on one device, one named
  over which x is the same counts x several times."""
  manual, check_vma = _manual_mesh()
  if not check_vma:
    return
  misplaced = [name for name in _names(axis_name) if name in manual]
  if misplaced:
    raise ValueError(
      f"bgn: `axis_name` names the shard_map mesh axes {tuple(misplaced)}. Inside shard_map "
      "say how x is split with `spec` instead (x's entry of in_specs, e.g. "
      "spec=PartitionSpec('data', None, 'model')): the node then sums over the axes that "
      "split its group and counts the split dimensions in its target."
    )
  varying = set(jax.typeof(x).manual_axis_type.varying)
  named = set() if spec is None else {name for entry in spec for name in _names(entry)}
  if varying - named:
    raise ValueError(
      f"bgn: x varies over the shard_map mesh axes {tuple(sorted(map(str, varying - named)))}, "
      f"which `spec` ({spec}) does not name, so the node cannot tell which of x's "
      "dimensions they split. Pass spec=PartitionSpec(...), x's layout over the mesh (its "
      "in_specs entry, e.g. PartitionSpec('data') for a batch split)."
    )
  if named - varying:
    raise ValueError(
      f"bgn: `spec` {spec} names the mesh axes {tuple(sorted(map(str, named - varying)))}, "
      "but x is the same on every device along them (replicated): summing over them "
      "would count x once per device. Leave them out of spec."
    )


def make_config(
  shape: Sequence[Any],
  *,
  dtype: DTypeLike = jnp.float32,
  axes: Axes = None,
  target_norm: TargetNorm = "sqrt_units",
  power: float = 1.0,
  eps: float = 0.0,
  axis_name: AxisName = None,
  spec: PartitionSpec | None = None,
) -> BGNConfig:
  """Validates BGN options for an input of the given shape and dtype.

  Args:
    shape: the shape of the array BGN is applied to (symbolic dimensions allowed);
      under ``shard_map`` with ``spec``, the shape of this device's block.
    dtype: its dtype; the ranges of ``target_norm`` and ``eps`` are those of its
      accumulator (float64 for float64, float32 for every other dtype).
    axes, target_norm, power, eps, axis_name, spec: as in :func:`bgn`.

  Returns:
    A hashable :class:`BGNConfig`.

  Raises:
    TypeError, ValueError: naming the argument, the value given and what is allowed.
  """
  scales = _SCALES[_accumulator_dtype(dtype)]
  checked_axes = _check_axes(axes, len(shape))
  checked_axis_name = _check_axis_name(axis_name)
  units_scale = 1
  if spec is not None:
    # The node's group and target are those of the global array that shard_map split.
    manual, _ = _manual_mesh()
    per_dim = _spec_names(spec, len(shape), manual)
    shape = tuple(n * math.prod(manual[a] for a in names) for n, names in zip(shape, per_dim))
    grouped = range(len(shape)) if checked_axes is None else checked_axes
    summed = tuple(name for d in grouped for name in per_dim[d])
    checked_axis_name = _joined(checked_axis_name, summed)
    if isinstance(target_norm, str) and target_norm in _TARGET_RULES:
      counted = _counted_dims(target_norm, checked_axes, len(shape))  # type: ignore[arg-type]
      units_scale = math.prod(manual[a] for d in counted for a in per_dim[d])
  target, t = _check_target_norm(target_norm, checked_axes, shape, scales)
  checked_power = _check_power(power)
  if checked_power > 0:  # with power 0 the target does not enter
    _check_target_fits(target_norm, t, dtype)
  return BGNConfig(
    axes=checked_axes,
    target_norm=target,
    power=checked_power,
    eps=_check_eps(eps, t, scales),
    axis_name=checked_axis_name,
    units_scale=units_scale,
  )


def _joined(axis_name: AxisName, more: tuple[Hashable, ...]) -> AxisName:
  names = (*_names(axis_name), *(name for name in more if name not in _names(axis_name)))
  if not names:
    return None
  return names[0] if len(names) == 1 and not isinstance(axis_name, tuple) else names


def _variadic_sums(arrays: tuple[jax.Array, ...], dims: tuple[int, ...]) -> tuple[jax.Array, ...]:
  zero = arrays[0].dtype.type(0)
  return jax.lax.reduce(
    tuple(v * v for v in arrays),
    (zero,) * len(arrays),
    lambda x, y: tuple(xi + yi for xi, yi in zip(x, y, strict=True)),
    dims,
  )


def _local_sums(
  g: jax.Array, dims: tuple[int, ...], formulation: _Formulation
) -> tuple[jax.Array, ...]:
  """Over ``dims`` (removed), in the accumulator dtype, the three sums of a**2, (a * up)**2
  and (a * down)**2 for a = g: of the whole group, or of one shard's part of it.

  Off the CPU as one variadic reduce: one kernel that reads its inputs once, where XLA
  on an H100 gave three sibling sums of a matmul's output three kernels; no
  conditional, which on the GPU would copy its predicate to the host and wait. On the
  CPU, where XLA vectorizes separate sums and runs a variadic reduce 2-3x slower, and
  a conditional is cheap, the plain sum first, and the scaled sums from a second pass
  over g only when some group here needs one.
  """
  acc = _accumulator_dtype(g.dtype)
  scales = _SCALES[acc]
  # XLA's simplifier rewrites (a * c)**2 as a**2 * c**2 when a or c is a constant,
  # and up**2 overflows (down**2 flushes to 0): NaN. Behind a barrier the scales
  # are no constants (else a group of one entry, where the reduction vanishes,
  # gets NaN), and neither is a + zero, where g itself is one: a cotangent fixed
  # at compile time (an unused output, a loss term times 0.0).
  up, down, zero = jax.lax.optimization_barrier(
    (jnp.asarray(2.0**scales.log2_up, acc), jnp.asarray(2.0**-scales.log2_down, acc), acc.type(0))
  )

  def three_sums(g: jax.Array, sums: Callable) -> tuple[jax.Array, ...]:
    a = g.astype(acc) + zero
    return sums((a, a * up, a * down))

  def variadic(g: jax.Array) -> tuple[jax.Array, ...]:
    return three_sums(g, lambda arrays: _variadic_sums(arrays, dims))

  def separate(arrays: tuple[jax.Array, ...]) -> tuple[jax.Array, ...]:
    return tuple(jnp.sum(v * v, axis=dims) for v in arrays)

  def plain_first(a: jax.Array) -> tuple[jax.Array, ...]:
    plain = jnp.sum(a * a, axis=dims)
    safe = jnp.all(jnp.isfinite(plain) & (plain >= scales.floor))
    # Where every plain sum here is safe, a group's whole sum, at least this part of
    # it, is not below the floor: its scaled-up sum is never read. Its scaled-down
    # one is where the parts of a group on several shards overflow together;
    # multiplying by powers of two gives it exactly.
    return jax.lax.cond(
      safe, lambda a: (plain, plain * up * up, plain * down * down), separate_three, a
    )

  def separate_three(a: jax.Array) -> tuple[jax.Array, ...]:
    return three_sums(a, separate)

  if formulation == "variadic":
    return variadic(g)
  # The conditional's operand is the accumulator copy: for bf16 XLA on the CPU then
  # hands over the float32 product it holds anyway, where g itself would be written
  # out once more, at each node.
  return jax.lax.platform_dependent(g.astype(acc), cpu=plain_first, default=variadic)


def _split_specs(
  dims: tuple[int, ...], spec: PartitionSpec, ndim: int
) -> tuple[tuple[Hashable, ...], PartitionSpec]:
  """The mesh axes that split the reduced dims, and the spec of the kept ones."""
  entries = (*spec, *(None,) * (ndim - len(spec)))
  reduced = tuple(name for d in dims for name in _names(entries[d]))
  return reduced, PartitionSpec(*(entries[d] for d in range(ndim) if d not in dims))


def _partition_sums(dims, formulation, mesh, arg_shapes, result_shape):
  del result_shape
  reduced, kept = _split_specs(dims, arg_shapes[0].sharding.spec, len(arg_shapes[0].shape))

  def per_shard(g: jax.Array) -> tuple[jax.Array, ...]:
    sums = _local_sums(g, dims, formulation)
    return jax.lax.psum(sums, reduced) if reduced else sums

  out = jax.sharding.NamedSharding(mesh, kept)
  return mesh, per_shard, (out,) * 3, (arg_shapes[0].sharding,)


def _infer_sums_sharding(dims, formulation, mesh, arg_shapes, result_shape):
  del formulation, result_shape
  _, kept = _split_specs(dims, arg_shapes[0].sharding.spec, len(arg_shapes[0].shape))
  return (jax.sharding.NamedSharding(mesh, kept),) * 3


def _sums_sharding_rule(dims, formulation, mesh, value_types, result_types):
  del formulation, mesh, result_types
  factors = [f"d{i}" for i in range(len(value_types[0].shape))]
  kept = ArrayMapping(*(f for i, f in enumerate(factors) if i not in dims))
  reduction = tuple(factors[i] for i in dims)
  return SdyShardingRule((ArrayMapping(*factors),), (kept,) * 3, reduction_factors=reduction)


# Left to XLA, a reduction over a sharded dimension costs a collective per sum (the
# variadic one an all-gather of each partial result per mesh axis), and the CPU's
# conditional one more for its predicate and as many again in its branch. This one
# reduces each shard on its own, conditional included, and all-reduces the three
# partial sums together: one all-reduce (of three numbers per group) for the mesh
# axes that split the reduced dimensions, none where none does.
_partitioned_sums = custom_partitioning(_local_sums, static_argnums=(1, 2))
_partitioned_sums.def_partition(
  partition=_partition_sums,
  infer_sharding_from_operands=_infer_sums_sharding,
  sharding_rule=_sums_sharding_rule,
)


def _partitioned_sums_over(dims: tuple[int, ...], formulation: _Formulation) -> Callable:
  """``_partitioned_sums`` over ``dims``, vmappable: custom_partitioning has no batching
  rule, so under vmap it is called on the batched array, the batch axis in front."""

  @jax.custom_batching.custom_vmap
  def sums(g: jax.Array) -> tuple[jax.Array, ...]:
    return _partitioned_sums(g, dims, formulation)

  @sums.def_vmap
  def sums_vmap(axis_size, in_batched, g):
    del axis_size, in_batched
    return _partitioned_sums_over(tuple(d + 1 for d in dims), formulation)(g), (True,) * 3

  return sums


def _sums_of_squares(
  g: jax.Array, axes: tuple[int, ...] | None, axis_name: AxisName, formulation: _Formulation
) -> tuple[jax.Array, ...]:
  """``_local_sums`` of the whole group over ``axes`` and ``axis_name``, dims kept."""
  dims = tuple(range(g.ndim)) if axes is None else axes
  # Inside shard_map the mesh axes are manual and the psum below is explicit.
  if jax.sharding.get_abstract_mesh().manual_axes:
    sums = _local_sums(g, dims, formulation)
  else:
    sums = _partitioned_sums_over(dims, formulation)(g)
  kept = tuple(1 if i in dims else n for i, n in enumerate(g.shape))
  sums = tuple(s.reshape(kept) for s in sums)
  return sums if axis_name is None else jax.lax.psum(sums, axis_name)


def _scaled_norm(
  g: jax.Array, axes: tuple[int, ...] | None, axis_name: AxisName, formulation: _Formulation
) -> tuple[jax.Array, jax.Array]:
  """Returns (r, k) with ||g|| = r / k per group, r free of over/underflow.

  k is an exact power of two (1 when the plain sum of squares is safe).
  """
  acc = _accumulator_dtype(g.dtype)
  scales = _SCALES[acc]

  @jax.custom_jvp
  def scaled_norm(g: jax.Array) -> tuple[jax.Array, jax.Array]:
    plain, small, large = _sums_of_squares(g, axes, axis_name, formulation)
    use_large = ~jnp.isfinite(plain)
    use_small = plain < scales.floor
    ss = jnp.where(use_large, large, jnp.where(use_small, small, plain))
    up, down = acc.type(2.0**scales.log2_up), acc.type(2.0**-scales.log2_down)
    k = jnp.where(use_large, down, jnp.where(use_small, up, acc.type(1)))
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


def _l2_norm(x: jax.Array, axes: tuple[int, ...] | None, formulation: _Formulation) -> jax.Array:
  scaled_norm, inverse_scale = _scaled_norm(x, axes, None, formulation)
  norm = scaled_norm / inverse_scale
  return jnp.squeeze(norm, axis=tuple(range(x.ndim)) if axes is None else axes)


def l2_norm(x: ArrayLike, axes: Axes = None) -> jax.Array:
  """The L2 norm of ``x`` over ``axes``, free of overflow and underflow.

  Computed with the same scaled sums of squares as the BGN backward rule,
  so entries around 1e-30 (whose float32 squares underflow) or 1e30 (whose
  squares overflow) still give the right norm.

  Args:
    x: a real floating-point array of any float dtype (float8 to float64).
    axes: the reduced axes (an int or a tuple of ints, negative allowed), or
      None for all of them.

  Returns:
    The norms, with the reduced axes removed, in float64 for float64 inputs and
    float32 for every other dtype.

  Raises:
    TypeError: ``x`` is not a real floating-point array (integer, boolean and
      complex arrays are refused), or ``axes`` is not an int, a tuple of ints or None.
    ValueError: ``axes`` names an axis out of range or twice.
  """
  x = _check_x(x, "l2_norm")
  return _l2_norm(x, _check_axes(axes, x.ndim, "l2_norm"), "platform")


def _normalize(
  g: jax.Array,
  config: BGNConfig,
  formulation: _Formulation,
  share: jax.Array | None = None,
) -> jax.Array:
  """The backward rule; ``share`` (in (0, 1]) is the fraction of its group's norm that
  ``g`` holds where the rest of the group lies elsewhere (another microbatch): the
  group's norm is then ``||g|| / share``."""
  if config.power == 0.0:
    return g
  acc = _accumulator_dtype(g.dtype)
  c = config.power
  scales = _SCALES[acc]
  if isinstance(config.target_norm, str):
    # From the cotangent's shape: a Python number, or under jax.export with
    # symbolic dimensions a jnp one.
    units = _target_units(config.target_norm, config.axes, g.shape) * config.units_scale
    t_value = math.sqrt(units) if isinstance(units, int) else None
    t = jnp.sqrt(jnp.asarray(units, acc)) if t_value is None else acc.type(t_value)
  else:
    t_value = config.target_norm
    t = acc.type(t_value)
  log2_pre_down = _log2_pre_down(t_value, scales)
  r, inverse_scale = _scaled_norm(g, config.axes, config.axis_name, formulation)
  finite = jnp.isfinite(r)
  positive = r > 0
  # Substituting 1 where the group is zero or non-finite keeps the division and
  # its derivative (grad of grad) free of inf and NaN.
  r = jnp.where(positive & finite, r, 1)
  # (t / (||g|| / share)) as (t * share) / ||g||; the floor compares ||g|| with eps * share.
  shared_t = t if share is None else t * share.astype(acc)
  ratio = shared_t / r
  if config.eps > 0:
    eps = acc.type(config.eps) if share is None else acc.type(config.eps) * share.astype(acc)
    # ||g|| < eps, compared in the group's scale: where eps * k overflows it is
    # inf, above r, as it should be.
    floored = r < eps * inverse_scale
    # t / (eps * k) as (t / eps) / k, k a power of two: no overflow of eps * k.
    ratio = jnp.where(floored, (t / acc.type(config.eps)) / inverse_scale, ratio)
  factor = ratio if c == 1.0 else ratio**c
  factor = jnp.where(positive, factor, 0)
  factor = jnp.where(finite, factor, jnp.nan)
  # g * factor * k**c as (g * pre) * (factor * post), pre * post = k**c, where
  # pre and post are powers of two chosen by the band alone: `factor` is used
  # once, so XLA on the GPU computes it inside the pass that multiplies (two uses
  # of it cost a kernel of its own per node, measured on an H200). A small band
  # scales up first, as before; a huge one (norm >= 2**64 in float32) scales
  # down first, by 2**-p (see _Scales), so that neither multiply overflows nor
  # flushes what the result can hold.
  small_band, big_band = inverse_scale > 1, inverse_scale < 1
  pre = jnp.where(small_band, inverse_scale, jnp.where(big_band, acc.type(2.0**-log2_pre_down), 1))
  post = jnp.where(
    small_band,
    acc.type(2.0 ** ((c - 1) * scales.log2_up)),
    jnp.where(big_band, acc.type(2.0 ** (log2_pre_down - c * scales.log2_down)), 1),
  )
  return ((g.astype(acc) * pre) * (factor * post)).astype(g.dtype)


def normalize_cotangent(g: jax.Array, config: BGNConfig) -> jax.Array:
  """The BGN backward rule: ``g * (t / max(||g||, eps)) ** power`` per group.

  An all-zero group stays zero; a group holding NaN or +-Inf becomes all NaN
  (for ``power > 0``; ``power == 0`` returns ``g`` untouched). The norm is
  accumulated in float32 (float64 for float64 ``g``), the result cast back to
  the dtype of ``g``.

  Args:
    g: the cotangent arriving at the node.
    config: the validated options, see :func:`make_config`.

  Returns:
    The rescaled cotangent, with the dtype of ``g``.
  """
  return _normalize(g, config, _BACKWARD_FORMULATION)


# The multi-device tests set "variadic" in their own process, to compile the GPU/TPU
# reduction on the CPU and count its collectives.
_BACKWARD_FORMULATION: _Formulation = "platform"


# While a microbatched gradient traces the loss, every node is routed through this
# hook (see bgn_jax.microbatch), which may measure or rescale with the full batch's norm.
_NODE_HOOK: contextvars.ContextVar[Callable[[BGNConfig, jax.Array], jax.Array] | None] = (
  contextvars.ContextVar("bgn_jax_node_hook", default=None)
)


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
  x: ArrayLike,
  *,
  axes: Axes = None,
  target_norm: TargetNorm = "sqrt_units",
  power: float = 1.0,
  eps: float = 0.0,
  axis_name: AxisName = None,
  spec: PartitionSpec | None = None,
) -> jax.Array:
  """Backward Gradient Normalization node: identity forward, normalized gradient backward.

  In the forward pass ``x`` is returned unchanged and nothing is saved for the
  backward pass. In the backward pass each group of the cotangent ``g`` becomes
  ``g * (t / max(||g||_2, eps)) ** power``.

  The target t (``target_norm``), from the shape the node sees:

  ====================  ===========  ============================  ========================
  target_norm           axes         t                             reading
  ====================  ===========  ============================  ========================
  ``"sqrt_units"``      None         ``sqrt(prod(shape[1:]))``     paper, whole batch
                                     (``sqrt(size)`` for 0-D/1-D)
  ``"sqrt_units"``      given        ``sqrt(prod(shape[a] for a    paper, per example:
                                     in axes))``, the entries of   ``(1,)`` on ``(B, n)``,
                                     one group                     ``(1, 2, 3)`` on NHWC;
                                                                   ``-1`` on ``(B, T, D)``
                                                                   gives ``sqrt(D)``
  ``"sqrt_size"``       any          ``sqrt(size)`` of the array   per-example code (vmapped
                                     the node sees                 or equinox models)
  a float               any          that float
  ====================  ===========  ============================  ========================

  Under ``vmap`` (and in equinox models) the node sees one example: there
  ``"sqrt_units"`` with ``axes=None`` takes the example's first axis for a batch
  axis, and ``"sqrt_size"`` gives the whole example's ``sqrt(C * H * W)``; with
  ``axis_name`` over the vmapped batch, ``"sqrt_size"`` is the paper's whole-batch
  reading. Mapped axes never count in t.

  Under ``shard_map`` each device holds a block of a global array: pass ``spec``,
  the ``PartitionSpec`` of that split (x's ``in_specs`` entry), and the node
  behaves as on the global array: it sums over the mesh axes that split its group
  and counts the split dimensions in t. With ``check_vma=True`` (the default) a
  node on a value that varies over a mesh axis that ``spec`` does not name, or
  that names an axis the value is replicated over, is a ``ValueError``.

  A call on a concrete array outside any transform validates the options and
  returns ``x``: nothing can differentiate through it there. Reverse mode
  (``grad``, ``vjp``, ``jacrev``) and forward mode over it (``jax.hessian``,
  ``jax.jvp`` of a ``grad``) work; forward mode through the node itself
  (``jax.jvp``, ``jacfwd`` or ``linearize`` of a function whose primal output
  depends on ``x`` through the node) is JAX's ``TypeError``, as for every
  ``custom_vjp``.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    x: a real floating-point array, any float dtype (float8, float16, bfloat16,
      float32, float64); the norm is accumulated in float32 (float64 for float64)
      and the rescaled cotangent has the dtype of ``x``.
    axes: None normalizes the whole array as one group (one scalar rescales the
      mini-batch); an int or tuple of ints gives one group per index of the
      other axes (``axes=(1,)`` on ``(B, n)`` is per example). Negative allowed.
    target_norm: the norm t of each group after the node: a positive float in
      [2**-60, 2**50] (float64: [2**-500, 2**480]), ``"sqrt_units"`` or
      ``"sqrt_size"`` (see the table above).
    power: c in [0, 1]; 0 leaves the gradient unchanged, 1 normalizes fully.
    eps: floor on the norm: 0, or a normal number with ``t / eps`` in
      [2**-62, 2**126] (float64: [2**-422, 2**1022]); caps how much a tiny
      gradient is scaled up.
    axis_name: a mapped axis name or tuple of names (``pmap``, ``shard_map``,
      ``vmap(axis_name=...)``) over which the squared norm is summed, so a
      batch split across devices is normalized as the whole batch. It must be
      bound where ``bgn`` is called. A mapped axis lies outside the array the
      node sees; inside ``shard_map`` (``check_vma=True``) use ``spec``.
    spec: under ``shard_map``, the ``jax.sharding.PartitionSpec`` that split the
      global array into x (``PartitionSpec('data')`` for a batch split,
      ``PartitionSpec('data', None, 'model')`` for batch and features); None
      elsewhere, and for a value replicated over every mesh axis.

  Returns:
    ``x``, unchanged.

  Raises:
    TypeError: ``x`` is not a real floating-point array (integer, boolean and
      complex arrays are refused), or an option has the wrong type.
    ValueError: an option is out of range, ``axis_name`` is not bound, or under
      ``shard_map`` ``spec`` is missing or does not match how x varies.
  """
  x = _check_x(x, "bgn")
  config = make_config(
    x.shape,
    dtype=x.dtype,
    axes=axes,
    target_norm=target_norm,
    power=power,
    eps=eps,
    axis_name=axis_name,
    spec=spec,
  )
  hook = _NODE_HOOK.get()
  if hook is None and not isinstance(x, jax.core.Tracer):
    # A concrete array outside any trace: nothing differentiates through it, and
    # JAX's eager custom_vjp call would cost 40x an identity.
    return x
  _check_varying(x, axis_name, spec)
  if config.axis_name is not None:
    _check_axis_name_is_bound(config.axis_name)
  return _bgn(config, x) if hook is None else hook(config, x)
