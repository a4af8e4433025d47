"""What the tests share: independent float64 references (the BGN backward rule in NumPy,
a hand-written MLP backprop), the tables of rejected options with their messages, random
inputs, and a pytree check that chex lacks."""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Sequence

import numpy as np


def reference_target(shape: tuple[int, ...], target_norm, axes=None) -> float:
  """The target t of each group, by the table in ``bgn_jax.bgn``'s docstring."""
  if target_norm == "sqrt_size":
    return math.sqrt(math.prod(shape))
  if target_norm == "sqrt_units":
    if axes is None:
      return math.sqrt(math.prod(shape[1:]) if len(shape) > 1 else math.prod(shape))
    axes = np.atleast_1d(axes) if not isinstance(axes, tuple) else axes
    return math.sqrt(math.prod(shape[a % len(shape)] for a in axes))
  return float(target_norm)


def reference_norm(g: np.ndarray, axes) -> np.ndarray:
  """Group L2 norms in float64, scaled by the group max so no square under/overflows."""
  g = np.asarray(g, np.float64)
  axes = None if axes is None else tuple(a % g.ndim for a in np.atleast_1d(axes))
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    biggest = np.max(np.abs(g), axis=axes, keepdims=True, initial=0.0)
    safe = np.where((biggest > 0) & np.isfinite(biggest), biggest, 1.0)
    norm = safe * np.sqrt(np.sum((g / safe) ** 2, axis=axes, keepdims=True))
  return np.where(np.isfinite(biggest), norm, np.nan)


def reference_backward(
  g, *, shape=None, axes=None, target_norm="sqrt_units", power=1.0, eps=0.0
) -> np.ndarray:
  """``g * (t / max(||g||, eps)) ** power`` per group; zero groups stay zero, non-finite go NaN.

  ``shape`` is the shape the node sees, where it differs from ``g``'s (under vmap).
  """
  g = np.asarray(g, np.float64)
  if power == 0:
    return g
  t = reference_target(g.shape if shape is None else shape, target_norm, axes)
  norm = reference_norm(g, axes)
  with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
    floored = np.maximum(norm, eps)
    scale = np.where(norm > 0, (t / np.where(floored > 0, floored, 1.0)) ** power, 0.0)
  scale = np.where(np.isnan(norm), np.nan, scale)
  return g * scale


ACTIVATIONS: dict[str, tuple[Callable, Callable]] = {
  "tanh": (np.tanh, lambda z: 1.0 - np.tanh(z) ** 2),
  "sigmoid": (
    lambda z: 1.0 / (1.0 + np.exp(-z)),
    lambda z: np.exp(-z) / (1.0 + np.exp(-z)) ** 2,
  ),
}


def mlp_backprop(
  layers: Sequence[tuple[np.ndarray, np.ndarray]],
  x: np.ndarray,
  loss_grad: Callable[[np.ndarray], np.ndarray],
  *,
  activation: str = "tanh",
  activate_last: bool = False,
  bgn_before_activation: Collection[int] = (),
  bgn_after_activation: Collection[int] = (),
  bgn_options: dict | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], list[np.ndarray]]:
  """Float64 backprop through ``z_i = h_i W_i + b_i``, ``h_{i+1} = act(z_i)``, written by hand.

  The last layer is linear unless ``activate_last``. BGN (``reference_backward`` with
  ``bgn_options``) is applied at ``z_i`` for i in ``bgn_before_activation`` and at
  ``act(z_i)`` for i in ``bgn_after_activation``. ``loss_grad(h_L)`` is dLoss/dh_L.

  Returns:
    Per layer the (kernel, bias) gradients, and the raw cotangent arriving at
    ``z_i`` from above, before any BGN node there.
  """
  act, act_grad = ACTIVATIONS[activation]
  options = bgn_options or {}
  h, zs = [np.asarray(x, np.float64)], []
  for i, (w, b) in enumerate(layers):
    zs.append(h[-1] @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    h.append(act(zs[-1]) if activate_last or i < len(layers) - 1 else zs[-1])
  g = loss_grad(h[-1])
  grads, raw = [None] * len(layers), [None] * len(layers)
  for i in reversed(range(len(layers))):
    if activate_last or i < len(layers) - 1:
      if i in bgn_after_activation:
        g = reference_backward(g, **options)
      g = g * act_grad(zs[i])
    raw[i] = g
    if i in bgn_before_activation:
      g = reference_backward(g, **options)
    grads[i] = (h[i].T @ g, g.sum(0))
    g = g @ np.asarray(layers[i][0], np.float64).T
  return grads, raw


# Options bgn_jax.bgn refuses at call time, on a float32 input of shape (2, 3), with
# the error and a part of its message. The insert helpers check the same options.
BAD_OPTIONS = [
  ({"power": 1.5}, ValueError, "bgn: `power` must lie in [0, 1]; got 1.5"),
  ({"power": -0.1}, ValueError, "bgn: `power`"),
  ({"power": "1"}, TypeError, "bgn: `power`"),
  ({"power": True}, TypeError, "bgn: `power`"),
  ({"eps": -1e-3}, ValueError, "bgn: `eps` must be finite and >= 0; got -0.001"),
  ({"eps": float("nan")}, ValueError, "bgn: `eps`"),
  ({"eps": 1e-46}, ValueError, "bgn: `eps` 1e-46 with a target norm of 1.73205 is outside"),
  ({"target_norm": 0.0}, ValueError, "bgn: `target_norm` must be positive and finite; got 0.0"),
  ({"target_norm": -2.0}, ValueError, "bgn: `target_norm`"),
  ({"target_norm": float("inf")}, ValueError, "bgn: `target_norm`"),
  ({"target_norm": 1e39}, ValueError, "bgn: `target_norm` 1e+39 is outside"),
  ({"target_norm": 1e-46}, ValueError, "bgn: `target_norm` 1e-46 is outside"),
  ({"target_norm": "unit"}, ValueError, "bgn: unknown `target_norm` 'unit'"),
  ({"target_norm": None}, TypeError, "bgn: `target_norm`"),
  ({"axes": 2}, ValueError, "bgn: `axes` entry 2 is out of range for an input of rank 2"),
  ({"axes": (0, -2)}, ValueError, "bgn: `axes` (0, -2) names the same axis twice"),
  ({"axes": (1.0,)}, TypeError, "bgn: `axes`"),
  ({"axes": "1"}, TypeError, "bgn: `axes`"),
  ({"axis_name": ["a", {}]}, TypeError, "bgn: `axis_name`"),
]


# Arguments every framework's insert refuses at insert time (on top of a valid `where`),
# with the error and a part of its message: one table for linen and nnx.
INSERT_BAD_ARGUMENTS = [
  ({"position": "middle"}, ValueError, "`position` must be 'after' or 'before'; got 'middle'"),
  ({"position": 1}, TypeError, "`position` must be 'after' or 'before'; got 1"),
  ({"every": 0}, ValueError, "`every` must be an int >= 1; got 0"),
  ({"every": 1.5}, TypeError, "`every` must be an int >= 1; got 1.5"),
  ({"every": True}, TypeError, "`every` must be an int >= 1; got True"),
  ({"every": "2"}, TypeError, "`every` must be an int >= 1; got '2'"),
  ({"powr": 0.5}, TypeError, "unknown BGN option 'powr'"),
  ({"power": 2.0}, ValueError, "bgn: `power` must lie in [0, 1]; got 2.0"),
  ({"power": -0.5}, ValueError, "bgn: `power` must lie in [0, 1]; got -0.5"),
  ({"eps": -1.0}, ValueError, "bgn: `eps` must be finite and >= 0"),
  ({"target_norm": "unit"}, ValueError, "bgn: unknown `target_norm` 'unit'"),
  ({"axes": "batch"}, TypeError, "bgn: `axes` must be None, an int or a tuple of ints"),
  ({"axes": 1.5}, TypeError, "bgn: `axes` must be None, an int or a tuple of ints"),
  ({"axes": (1, 1)}, ValueError, "names the same axis twice"),
  ({"axes": 10**9}, ValueError, "`axes` 1000000000 names an axis beyond rank 64"),
  ({"axis_name": ["batch", {}]}, TypeError, "bgn: `axis_name` must be None"),
  ({"where": "(unclosed"}, ValueError, "is not a valid regular expression"),
  ({"where": 3}, TypeError, "`where` must be a Module class"),
  ({"where": None}, TypeError, "`where` must be a Module class"),
]


def inputs(shape: tuple[int, ...], seed: int = 0):
  """A float32 array of standard normal entries, the same for the same seed."""
  import jax.numpy as jnp

  return jnp.asarray(np.random.default_rng(seed).standard_normal(shape), jnp.float32)


def assert_trees_differ(a, b) -> None:
  """Some leaf of ``a`` differs from ``b`` (chex raises on the first difference)."""
  import chex
  import pytest

  with pytest.raises(AssertionError):
    chex.assert_trees_all_equal(a, b)
