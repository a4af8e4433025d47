"""The top-level ``insert``, ``remove``, ``placements`` and ``grad_norms``: each picks the
framework from what it is given and calls that adapter's verb."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any

from bgn_jax._common import Placements, Where, framework_of, matcher, measuring

__all__ = ["grad_norms", "insert", "placements", "remove"]


def _adapter(value: Any) -> Any:
  """The adapter module for ``value``: nnx or equinox for their models, else linen."""
  found = framework_of(value) or "linen"
  return importlib.import_module(f"bgn_jax.{found}")


def insert(model: Any, *, where: Where, **options: Any) -> Any:
  """Adds BGN nodes to a linen ``apply`` function, an ``nnx.Module`` or an ``eqx.Module``.

  Calls :func:`bgn_jax.linen.insert` (a function, e.g. ``model.apply``),
  :func:`bgn_jax.nnx.insert` (in place) or :func:`bgn_jax.equinox.insert`; see them
  for ``where``, ``position``, ``every`` and the BGN options.

  Args:
    model: ``model.apply`` of a linen module (or a function that calls it), an
      ``nnx.Module`` or an ``eqx.Module``.
    where: which modules get a node.
    **options: the adapter's other options.

  Returns:
    What the adapter returns: the function or model with the nodes.
  """
  return _adapter(model).insert(model, where=where, **options)


def remove(model: Any) -> Any:
  """Takes the nodes of :func:`insert` out: the adapter's ``remove`` for ``model``."""
  return _adapter(model).remove(model)


def placements(model: Any, *args: Any, **kwargs: Any) -> Placements:
  """Where the nodes of ``model`` (a function or model :func:`insert` returned) go in
  ``model(*args, **kwargs)``: the adapter's ``placements``."""
  return _adapter(model).placements(model, *args, **kwargs)


def grad_norms(loss_fn: Callable[..., Any], *, where: Where) -> Callable[..., Any]:
  """Gradient norms at the selected modules, as a function of the loss's arguments.

  The framework is picked at the call from the loss's first argument: linen
  variables (a mapping), an ``nnx.Module`` or an ``eqx.Module``; see
  :func:`bgn_jax.linen.grad_norms`.

  Args:
    loss_fn: ``loss_fn(variables_or_model, *args, **kwargs) -> scalar``.
    where: which modules to measure.

  Returns:
    ``measure(variables_or_model, *args, **kwargs) -> report``.

  Raises:
    TypeError: ``loss_fn`` is not callable or ``where`` has none of the accepted forms.
  """
  matcher(where, fn_name="bgn_jax.grad_norms")

  def measure(model: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    return _adapter(model).grad_norms(loss_fn, where=where)(model, *args, **kwargs)

  return measuring("bgn_jax.grad_norms", loss_fn, lambda model: None, measure)
