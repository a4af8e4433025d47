"""The BGN node as a ``flax.linen`` module: a thin wrapper around :func:`bgn_jax.bgn`."""

from __future__ import annotations

import flax.linen as nn
import jax

from bgn_jax.core import Axes, AxisName, TargetNorm, bgn

__all__ = ["BGN"]


class BGN(nn.Module):
  """Backward Gradient Normalization layer (identity forward, normalized backward).

  It has no parameters and no state; see :func:`bgn_jax.bgn` for the rule.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Attributes:
    axes: None for one group over the whole array, or the axes of each group.
    target_norm: a positive float, or ``"sqrt_units"``.
    power: c in [0, 1].
    eps: floor on the norm, >= 0.
    axis_name: mapped axis name(s) over which the squared norm is summed.
  """

  axes: Axes = None
  target_norm: TargetNorm = "sqrt_units"
  power: float = 1.0
  eps: float = 0.0
  axis_name: AxisName = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return bgn(
      x,
      axes=self.axes,
      target_norm=self.target_norm,
      power=self.power,
      eps=self.eps,
      axis_name=self.axis_name,
    )
