"""The BGN node for ``flax.nnx``: a thin wrapper around :func:`bgn_jax.bgn`."""

from __future__ import annotations

import jax
from flax import nnx

from bgn_jax.core import Axes, AxisName, TargetNorm, bgn, make_config
from bgn_jax.nnx_transform import insert

__all__ = ["BGN", "insert"]


class BGN(nnx.Module):
  """Backward Gradient Normalization layer for ``flax.nnx`` (no parameters, no state).

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    axes: None for one group over the whole array, or the axes of each group.
    target_norm: a positive float, or ``"sqrt_units"``.
    power: c in [0, 1].
    eps: floor on the norm, >= 0.
    axis_name: mapped axis name(s) over which the squared norm is summed.
  """

  def __init__(
    self,
    *,
    axes: Axes = None,
    target_norm: TargetNorm = "sqrt_units",
    power: float = 1.0,
    eps: float = 0.0,
    axis_name: AxisName = None,
  ):
    # Options that do not depend on the input shape are checked here, at
    # construction; axes and the shape-dependent target are checked at call.
    make_config((), target_norm=target_norm, power=power, eps=eps, axis_name=axis_name)
    self.axes = tuple(axes) if isinstance(axes, list) else axes
    self.target_norm = target_norm
    self.power = power
    self.eps = eps
    self.axis_name = axis_name

  def __call__(self, x: jax.Array) -> jax.Array:
    return bgn(
      x,
      axes=self.axes,
      target_norm=self.target_norm,
      power=self.power,
      eps=self.eps,
      axis_name=self.axis_name,
    )
