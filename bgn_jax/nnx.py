"""BGN for ``flax.nnx``: the layer and :func:`insert`.

:func:`insert` returns a copy of the model's module graph that shares every
``Variable`` with the original; in the copy, each selected module's class is
replaced by a subclass whose ``__call__`` passes the output (or the inputs)
through :func:`bgn_jax.bgn`.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import types
from typing import Any, TypeVar

import jax
from flax import nnx

from bgn_jax._common import Position, Where, apply_bgn, check_options, matcher, no_match_message
from bgn_jax.core import Axes, AxisName, TargetNorm, bgn, make_config

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


M = TypeVar("M", bound=nnx.Module)

# One subclass per (class, position, options), so that repeated inserts give equal
# graph definitions and nnx.jit reuses its compilation.
_SUBCLASSES: dict[tuple[type, Position, tuple[tuple[str, Any], ...]], type] = {}


def _has_call(cls: type) -> bool:
  # getattr(cls, "__call__") would find type.__call__ on every class.
  return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)


def _with_bgn(cls: type, position: Position, options: tuple[tuple[str, Any], ...]) -> type:
  """The subclass of ``cls`` whose ``__call__`` adds the BGN node."""
  key = (cls, position, options)
  if key in _SUBCLASSES:
    return _SUBCLASSES[key]
  bgn_options = dict(options)

  def __call__(self, *args: Any, **kwargs: Any) -> Any:
    if position == "before":
      args = apply_bgn(args, bgn_options)
    outputs = cls.__call__(self, *args, **kwargs)
    if position == "after":
      outputs = apply_bgn(outputs, bgn_options)
    return outputs

  def fill(namespace: dict[str, Any]) -> None:
    namespace.update(
      __call__=__call__,
      __module__=__name__,
      __qualname__=f"{cls.__qualname__}WithBGN",
      __doc__=f"{cls.__name__} with a BGN node {position} its __call__ ({bgn_options}).",
    )

  keywords = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
  subclass = types.new_class(f"{cls.__name__}WithBGN", (cls,), keywords, fill)
  _SUBCLASSES[key] = subclass
  return subclass


def insert(
  model: M,
  *,
  where: Where,
  position: Position = "after",
  every: int = 1,
  **bgn_options: Any,
) -> M:
  """Returns a copy of an nnx model with BGN nodes after (or before) the selected modules.

  The copy is a new module graph (as ``nnx.clone(model, variables=False)``) that
  shares every ``Variable`` with ``model``: parameters, BatchNorm statistics and
  RNG counts are the same objects, so an optimizer step or a statistics update
  through the copy is seen by ``model`` and the other way round, and the state
  of both has the same paths. ``model`` itself is not modified. Plain attributes
  are copied, not shared: ``model.eval()`` later does not switch the copy.

  In the copy, each selected module's class is replaced by a subclass (named
  ``<Class>WithBGN``) whose ``__call__`` applies :func:`bgn_jax.bgn` to the
  floating-point ``jax.Array`` leaves of the output (``position="after"``) or of
  the positional arguments (``"before"``). Other methods are unchanged, and
  ``isinstance`` checks still hold. A module referenced at two paths is one
  module and gets one node, applied at each call.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    model: an ``nnx.Module``.
    where: an nnx Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; or a regular expression (``str`` or compiled), searched
      in the attribute path joined with "/" (``r"layers/\\d+$"``; the model
      itself has the path ``""``). Only modules that define ``__call__`` are
      tested (``nnx.List`` and ``nnx.Dict`` containers are not).
    position: ``"after"`` the module's output, or ``"before"`` its positional
      inputs.
    every: keep every ``every``-th match, starting with the first
      (``matches[::every]``), in the order of ``nnx.iter_graph``: attributes
      sorted by name, list items by index, submodules before their parent.
    **bgn_options: ``axes``, ``target_norm``, ``power``, ``eps``, ``axis_name``,
      passed to :func:`bgn_jax.bgn` for every node.

  Returns:
    The copy of ``model`` with the BGN nodes.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, ``where``, ``position``,
      ``every`` or a BGN option has the wrong type, or an option name is unknown.
    ValueError: an argument is out of range, ``where`` is not a valid regular
      expression, or ``where`` matches no module.
  """
  if not isinstance(model, nnx.Module):
    raise TypeError(f"nnx.insert: `model` must be an nnx.Module; got {type(model).__name__}.")
  is_match = matcher(where, fn_name="nnx.insert", module_type=nnx.Module)
  options = tuple(sorted(check_options("nnx.insert", position, every, bgn_options).items()))
  seen: dict[tuple[str, str], None] = {}
  matches = 0

  def add_bgn(path: tuple[Any, ...], node: Any) -> Any:
    nonlocal matches
    if not (isinstance(node, nnx.Module) and _has_call(type(node))):
      return node
    joined = "/".join(str(part) for part in path)
    seen[(type(node).__name__, joined)] = None
    if not is_match(node, joined):
      return node
    matches += 1
    if (matches - 1) % every == 0:
      # node is already the copy that recursive_map made, not a module of `model`.
      node.__class__ = _with_bgn(type(node), position, options)
    return node

  copy = nnx.recursive_map(add_bgn, model)
  if not matches:
    raise ValueError(no_match_message("nnx.insert", where, seen, "module"))
  return copy
