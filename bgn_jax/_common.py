"""What the framework adapters share: option checks, ``where`` matching, messages,
the placement records and the batched norms behind the diagnostics.

Private to the package: the adapters (:mod:`bgn_jax.linen`, :mod:`bgn_jax.nnx`,
:mod:`bgn_jax.equinox`) import it; it imports only JAX and the core.
"""

from __future__ import annotations

import dataclasses
import re
import types
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np

from bgn_jax.core import bgn, l2_norm, make_config

Position = Literal["after", "before"]
Where = type | tuple[type, ...] | Callable[[Any], bool] | str | re.Pattern
Path = tuple[str, ...]

BGN_OPTIONS = ("axes", "target_norm", "power", "eps", "axis_name")
SEEN_LISTED = 40  # how many seen module calls a no-match error lists
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
    if name not in BGN_OPTIONS:
      raise TypeError(
        f"{fn_name}: unknown BGN option {name!r}; the options of bgn_jax.bgn are "
        f"{', '.join(BGN_OPTIONS)}."
      )
  options: dict[str, Any] = {
    k: tuple(v) if isinstance(v, list) else v for k, v in bgn_options.items()
  }
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


def is_float_array(leaf: Any, kind: Any = jnp.floating) -> bool:
  """A ``jax.Array`` whose dtype is of ``kind`` (floating; ``jnp.inexact`` adds complex)."""
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, kind)


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
  return jax.tree.map(lambda leaf: bgn(leaf, **options) if is_float_array(leaf) else leaf, tree)


def no_match_message(
  fn_name: str,
  where: Where,
  seen: dict[tuple[str, str], None],
  what: str,
  report: str = "",
) -> str:
  """The message of the error for a ``where`` that selects nothing.

  Args:
    fn_name: the public name, for the message.
    where: the ``where`` given.
    seen: the (type name, path) pairs that were tested, in order.
    what: what was tested, e.g. "module call".
    report: the call that lists the placements (e.g. "bgn_jax.linen.placements(fn,
      *args)"), named in the message; "" names none.

  Returns:
    The message, listing what was seen (the first ``SEEN_LISTED``, and how many more).
  """
  tested = [f"{name} at {path!r}" for name, path in seen]
  listed = ", ".join(tested[:SEEN_LISTED])
  if len(tested) > SEEN_LISTED:
    listed += f", ... and {len(tested) - SEEN_LISTED} more not listed"
  pointer = f" Once `where` matches, {report} lists every match and its nodes." if report else ""
  return (
    f"{fn_name}: `where` {where!r} matched no {what}, so no BGN node was inserted. "
    f"Seen ({len(tested)}; module type at path; '' is the top-level module): "
    f"{listed or 'nothing'}. A class matches by isinstance, a string is searched "
    f"(re.search) in the '/'-joined path, a predicate gets the module.{pointer}"
  )


def matcher(
  where: Where, *, fn_name: str, module_type: type | tuple[type, ...] = ()
) -> Callable[[Any, str], bool]:
  """Turns a ``where`` into a test ``(module, path) -> bool``.

  Args:
    where: a module class or a tuple of them; a predicate ``module -> bool``; or
      a regular expression (str or compiled), searched in the "/"-joined path.
    fn_name: the public name, for the messages.
    module_type: the framework's module base class(es): an instance of one is a
      module object, not a predicate, and is refused.

  Returns:
    The test.

  Raises:
    TypeError: ``where`` is none of the forms above, or a module instance.
    ValueError: ``where`` is a string that is not a valid regular expression.
  """
  if isinstance(where, type) or (
    isinstance(where, tuple) and where and all(isinstance(w, type) for w in where)
  ):
    classes = where
    return lambda module, path: isinstance(module, classes)
  if isinstance(where, str):
    try:
      where = re.compile(where)
    except re.error as err:
      raise ValueError(
        f"{fn_name}: `where` {where!r} is not a valid regular expression: {err}."
      ) from None
  if isinstance(where, re.Pattern):
    pattern = where
    return lambda module, path: pattern.search(path) is not None
  if module_type and isinstance(where, module_type):
    # Module objects are callable, so they would otherwise be taken for predicates.
    raise TypeError(
      f"{fn_name}: `where` is a module instance ({type(where).__name__}), not a way to "
      f"select modules; pass its class ({type(where).__name__}), a predicate "
      f"module -> bool, or a regular expression on the module path."
    )
  if callable(where):
    predicate = where
    return lambda module, path: bool(predicate(module))
  raise TypeError(
    f"{fn_name}: `where` must be a Module class, a tuple of Module classes, a predicate "
    f"module -> bool, or a regular expression on the module path; got {where!r}."
  )


def get_path(tree: Any, path: Path) -> Any:
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def flatten_leaves(leaves: Sequence[jax.Array], leading: Sequence[int]) -> jax.Array | None:
  """The leaves as one array of shape ``lead_shape + (n,)``, keeping ``leading[i]`` axes."""
  if not leaves:
    return None
  flat = [
    jnp.reshape(leaf, leaf.shape[:n] + (-1,)) for leaf, n in zip(leaves, leading, strict=True)
  ]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)


def group_norms(flats: Sequence[jax.Array | None], lead_shapes: Sequence[tuple[int, ...]]) -> list:
  """The L2 norm of each array over its last axis (zeros for None).

  Arrays of one shape and dtype are stacked and normed together: one reduction
  per group instead of one per layer, which keeps compilation short for deep
  unrolled models.
  """
  present = {i: flat for i, flat in enumerate(flats) if flat is not None}
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, flat in present.items():
    groups.setdefault((flat.shape, flat.dtype), []).append(i)
  norms: list[Any] = [jnp.zeros(shape, jnp.float32) for shape in lead_shapes]
  for members in groups.values():
    if len(members) == 1:
      norms[members[0]] = l2_norm(present[members[0]], axes=-1)
      continue
    stacked = l2_norm(jnp.stack([present[i] for i in members]), axes=-1)
    for row, i in enumerate(members):
      norms[i] = stacked[row]
  return norms


@dataclasses.dataclass(frozen=True)
class Placement:
  """One selected module call and one leaf of its output (or inputs).

  Attributes:
    path: the "/"-joined module path ('' for the top-level module).
    module: the module's class name.
    position: "after" (a leaf of the output) or "before" (of the positional inputs).
    leaf: the leaf's key path in the output or in the positional arguments, as
      ``jax.tree_util.keystr`` writes it ('' when the output is the leaf).
    shape: the leaf's shape (inside any lifted transform, as one call sees it).
    dtype: the leaf's dtype name.
    reason: None for a leaf that got a node; otherwise why it was skipped.
  """

  path: str
  module: str
  position: str
  leaf: str
  shape: tuple[int, ...]
  dtype: str
  reason: str | None = None


class Placements(list):
  """The records of :class:`Placement`, in call order; prints as a table."""

  @property
  def nodes(self) -> list[Placement]:
    """The leaves that got a node."""
    return [p for p in self if p.reason is None]

  @property
  def skipped(self) -> list[Placement]:
    """The matched leaves that did not get a node, with the reason."""
    return [p for p in self if p.reason is not None]

  def __str__(self) -> str:
    header = ("path", "module", "position", "leaf", "shape", "dtype", "node")
    rows = [
      (
        repr(p.path),
        p.module,
        p.position,
        p.leaf or "-",
        str(p.shape),
        p.dtype,
        "yes" if p.reason is None else f"skipped: {p.reason}",
      )
      for p in self
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = [
      "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip()
      for r in [header, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append(f"{len(self.nodes)} nodes, {len(self.skipped)} skipped")
    return "\n".join(lines)


def has_call(cls: type) -> bool:
  """Whether ``cls`` (or a base other than ``object``) defines ``__call__``."""
  # getattr(cls, "__call__") would find type.__call__ on every class.
  return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)


_MARKER = "_bgn_jax_marker"


def marker_of(cls: type) -> tuple[Any, ...] | None:
  """The marker of a subclass made by :func:`marked_subclass`, None for other classes."""
  return vars(cls).get(_MARKER)


def options_text(marker: tuple[Any, ...]) -> str:
  """``"(position='after', target_norm=...)"`` for a node's marker ``(tag, position, options)``."""
  _, position, options = marker
  named = ", ".join(f"{k}={v!r}" for k, v in options) or "the default BGN options"
  return f"(position={position!r}, {named})"


def marked_subclass(
  cls: type,
  marker_value: tuple[Any, ...],
  name: str,
  namespace: dict[str, Any],
  keywords: dict[str, Any] | None = None,
) -> type:
  """The subclass ``name`` of ``cls`` with ``namespace``, made once per ``marker_value``.

  Found again through ``cls.__subclasses__()``: repeated inserts give the same class
  (equal graph definitions and tree structures, so jit reuses its compilation), and
  the classes made stay bounded by the classes and option sets a program uses. (JAX's
  pytree registry and Flax's graph registry hold each one for the process's life.)
  """
  for existing in cls.__subclasses__():
    if marker_of(existing) == marker_value:
      return existing

  def fill(body: dict[str, Any]) -> None:
    body.update(namespace)
    body[_MARKER] = marker_value

  return types.new_class(name, (cls,), keywords or {}, fill)
