"""An independent NumPy float64 reference of the BGN backward rule, for the tests."""

from __future__ import annotations

import math

import numpy as np


def reference_target(shape: tuple[int, ...], target_norm) -> float:
  if target_norm == "sqrt_units":
    units = math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape)
    return math.sqrt(units)
  return float(target_norm)


def reference_norm(g: np.ndarray, axes) -> np.ndarray:
  """Group L2 norms in float64, scaled by the group max so no square under/overflows."""
  g = np.asarray(g, np.float64)
  axes = None if axes is None else tuple(a % g.ndim for a in np.atleast_1d(axes))
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    biggest = np.max(np.abs(g), axis=axes, keepdims=True)
    safe = np.where((biggest > 0) & np.isfinite(biggest), biggest, 1.0)
    norm = safe * np.sqrt(np.sum((g / safe) ** 2, axis=axes, keepdims=True))
  return np.where(np.isfinite(biggest), norm, np.nan)


def reference_backward(
  g, *, shape=None, axes=None, target_norm="sqrt_units", power=1.0, eps=0.0
) -> np.ndarray:
  """``g * (t / max(||g||, eps)) ** power`` per group; zero groups stay zero, non-finite go NaN."""
  g = np.asarray(g, np.float64)
  if power == 0:
    return g
  t = reference_target(g.shape if shape is None else shape, target_norm)
  norm = reference_norm(g, axes)
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    floored = np.maximum(norm, eps)
    scale = np.where(norm > 0, (t / np.where(floored > 0, floored, 1.0)) ** power, 0.0)
  scale = np.where(np.isnan(norm), np.nan, scale)
  return g * scale
