"""Insert BGN nodes into an existing ``flax.linen`` model without editing its code.

:func:`insert` wraps a ``model.apply``-like function so that, while it runs, the
outputs (or inputs) of the selected submodule calls pass through
:func:`bgn_jax.bgn`. It uses :func:`flax.linen.intercept_methods`; parameters,
forward values and returned state are untouched.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, Literal

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from bgn_jax.core import bgn, make_config
from bgn_jax.select import Where, matcher, module_path

__all__ = ["insert"]

Position = Literal["after", "before"]

_BGN_OPTIONS = ("axes", "target_norm", "power", "eps", "axis_name")
_SEEN_LISTED = 40  # how many seen module calls the no-match error lists
_MAX_RANK = 64  # axes entries checked at insert time; the rank itself is known at the call


def check_options(
  fn_name: str, position: Any, every: Any, bgn_options: dict[str, Any]
) -> dict[str, Any]:
  """Validates the arguments shared by the linen and nnx ``insert``.

  Args:
    fn_name: the public name, for the messages.
    position: must be ``"after"`` or ``"before"``.
    every: must be an int >= 1.
    bgn_options: keyword options for :func:`bgn_jax.bgn`.

  Returns:
    The options, with lists turned into tuples so that they are hashable.

  Raises:
    TypeError: an argument has the wrong type or an option name is unknown.
    ValueError: an argument is out of range.
  """
  if not isinstance(position, str):
    raise TypeError(f"{fn_name}: `position` must be 'after' or 'before'; got {position!r}.")
  if position not in ("after", "before"):
    raise ValueError(f"{fn_name}: `position` must be 'after' or 'before'; got {position!r}.")
  if not isinstance(every, (int, np.integer)) or isinstance(every, (bool, np.bool_)):
    raise TypeError(f"{fn_name}: `every` must be an int >= 1; got {every!r}.")
  if every < 1:
    raise ValueError(f"{fn_name}: `every` must be an int >= 1; got {every!r}.")
  for name in bgn_options:
    if name not in _BGN_OPTIONS:
      raise TypeError(
        f"{fn_name}: unknown BGN option {name!r}; the options of bgn_jax.bgn are "
        f"{', '.join(_BGN_OPTIONS)}."
      )
  options = {k: tuple(v) if isinstance(v, list) else v for k, v in bgn_options.items()}
  # The rank is known only at the call, so out-of-range axes are reported there by
  # bgn. Here: the types, and repeats, with a rank large enough that a negative and
  # a non-negative entry never name the same axis.
  axes = options.get("axes")
  entries = axes if isinstance(axes, tuple) else (axes,)
  largest = max((abs(int(a)) for a in entries if isinstance(a, (int, np.integer))), default=0)
  if largest > _MAX_RANK:
    raise ValueError(
      f"{fn_name}: `axes` {axes!r} names an axis beyond rank {_MAX_RANK}; no layer output "
      "has that many axes."
    )
  make_config((1,) * (2 * largest + 2), **options)
  return options


def _is_float_array(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating)


def apply_bgn(tree: Any, options: dict[str, Any]) -> Any:
  """Applies :func:`bgn_jax.bgn` to every floating-point ``jax.Array`` leaf of ``tree``.

  Other leaves (integer and boolean arrays, NumPy arrays, Python scalars,
  non-array objects) are returned as they are.

  Args:
    tree: any pytree.
    options: keyword options for :func:`bgn_jax.bgn`.

  Returns:
    ``tree`` with the same structure and values.
  """
  return jax.tree.map(lambda leaf: bgn(leaf, **options) if _is_float_array(leaf) else leaf, tree)


class _Insertion:
  """The interceptor state of one call of the wrapped apply function."""

  def __init__(
    self,
    is_match: Callable[[Any, str], bool],
    position: Position,
    every: int,
    options: dict[str, Any],
  ):
    self._is_match = is_match
    self._position = position
    self._every = every
    self._options = options
    self._match_index: dict[str, int] = {}
    self.seen: dict[tuple[str, str], None] = {}  # (type name, path) of __call__s, in order

  @property
  def matched(self) -> int:
    return len(self._match_index)

  def __call__(
    self,
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
  ) -> Any:
    if context.method_name != "__call__":
      return next_fun(*args, **kwargs)
    module = context.module
    path = module_path(module)
    self.seen[(type(module).__name__, path)] = None
    if not self._is_match(module, path):
      return next_fun(*args, **kwargs)
    # Matches are counted by path, not by call: a lifted transform may trace its
    # body more than once (nn.scan does, by default), and a retrace cannot be told
    # apart from a second call. So a module called twice is one match, and all of
    # its calls share the decision.
    index = self._match_index.setdefault(path, len(self._match_index))
    if index % self._every:
      return next_fun(*args, **kwargs)
    if self._position == "before":
      return next_fun(*apply_bgn(args, self._options), **kwargs)
    return apply_bgn(next_fun(*args, **kwargs), self._options)


def no_match_message(
  fn_name: str, where: Where, seen: dict[tuple[str, str], None], what: str
) -> str:
  """The message of the error for a ``where`` that selects nothing.

  Args:
    fn_name: the public name, for the message.
    where: the ``where`` given.
    seen: the (type name, path) pairs that were tested, in order.
    what: what was tested, e.g. "module call".

  Returns:
    The message, listing what was seen.
  """
  tested = [f"{name} at {path!r}" for name, path in seen]
  listed = ", ".join(tested[:_SEEN_LISTED])
  if len(tested) > _SEEN_LISTED:
    listed += f", ... and {len(tested) - _SEEN_LISTED} more"
  return (
    f"{fn_name}: `where` {where!r} matched no {what}, so no BGN node was inserted. "
    f"Seen (module type at path; '' is the top-level module): {listed or 'nothing'}. "
    "A class matches by isinstance, a string is searched (re.search) in the "
    "'/'-joined path, a predicate gets the module."
  )


def insert(
  apply_fn: Callable[..., Any],
  *,
  where: Where,
  position: Position = "after",
  every: int = 1,
  **bgn_options: Any,
) -> Callable[..., Any]:
  """Returns ``apply_fn`` with BGN nodes after (or before) the selected module calls.

  Every ``__call__`` of a bound ``flax.linen`` module made while the returned
  function runs is tested against ``where``; the selected ones get
  :func:`bgn_jax.bgn` on the floating-point ``jax.Array`` leaves of their output
  (``position="after"``) or of their positional arguments (``"before"``; keyword
  arguments are left alone). Other methods (``encode``, ``setup``, methods of
  lifted transforms) are never matched, but the modules they call are.

  The forward pass, the parameters and every returned value, ``mutable``
  collections included, are bit for bit those of ``apply_fn``; only gradients
  change. Matching happens at trace time, so it works under ``jit`` and
  ``grad``, and inside ``nn.scan``, ``nn.remat`` and ``nn.vmap`` bodies.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    apply_fn: ``model.apply`` of a linen module, or any function that calls
      linen modules, e.g. ``functools.partial(model.apply, method=model.encode)``.
    where: a Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; or a regular expression (``str`` or compiled),
      searched in the module path joined with "/" (``r"Dense_\\d+$"``,
      ``r"^encoder/"``; the top-level module has the path ``""``).
    position: ``"after"`` the module's output, or ``"before"`` its positional
      inputs.
    every: keep every ``every``-th matched module, starting with the first
      (``matches[::every]``). Matched modules are told apart by path and
      numbered in the order of their first call, afresh in each call of the
      returned function, so the same layers are chosen at every step. All calls
      of a module share its decision: a module called twice, a scanned stack,
      and a body that a lifted transform traces twice each count once.
    **bgn_options: ``axes``, ``target_norm``, ``power``, ``eps``, ``axis_name``,
      passed to :func:`bgn_jax.bgn` for every node.

  Returns:
    A function with the signature and return values of ``apply_fn``.

  Raises:
    TypeError: ``apply_fn`` is not callable, ``where``, ``position``, ``every``
      or a BGN option has the wrong type, or an option name is unknown.
    ValueError: an argument is out of range, or ``where`` is not a valid regular
      expression. The returned function raises ValueError when ``where`` matches
      no module call.
  """
  if not callable(apply_fn):
    raise TypeError(
      f"insert: `apply_fn` must be callable, e.g. model.apply; got {type(apply_fn).__name__}."
    )
  is_match = matcher(where)
  options = check_options("insert", position, every, bgn_options)

  @functools.wraps(apply_fn)
  def apply_with_bgn(*args: Any, **kwargs: Any) -> Any:
    insertion = _Insertion(is_match, position, int(every), options)
    with nn.intercept_methods(insertion):
      outputs = apply_fn(*args, **kwargs)
    if not insertion.matched:
      raise ValueError(no_match_message("insert", where, insertion.seen, "module __call__"))
    return outputs

  return apply_with_bgn
