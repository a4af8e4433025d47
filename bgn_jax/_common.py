"""What the framework adapters share: option checks, ``where`` matching, messages,
the placement records and the batched norms behind the diagnostics.

Private to the package: the adapters (:mod:`bgn_jax.linen`, :mod:`bgn_jax.nnx`,
:mod:`bgn_jax.equinox`) import it; it imports only JAX and the core.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import re
import sys
import types
from collections.abc import Callable, Iterator, Mapping, Sequence
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
  check_axes_not_empty(fn_name, axes)
  entries = axes if isinstance(axes, tuple) else (axes,)
  largest = max((abs(int(a)) for a in entries if isinstance(a, (int, np.integer))), default=0)
  if largest > _MAX_RANK:
    raise ValueError(
      f"{fn_name}: `axes` {axes!r} names an axis beyond rank {_MAX_RANK}; no layer output "
      "has that many axes."
    )
  make_config((1,) * (2 * largest + 2), **options)
  return options


def check_axes_not_empty(fn_name: str, axes: Any) -> None:
  """Refuses ``axes=()``: every entry its own group, so the node would return the sign."""
  if isinstance(axes, (tuple, list)) and not axes:
    raise ValueError(
      f"{fn_name}: `axes` {axes!r} makes every entry its own group, so the node would "
      "return only the gradient's sign; pass None for one group over the whole array, or "
      "the axes of each group (e.g. -1)."
    )


def describe(leaf: Any) -> tuple[tuple[Any, ...], str]:
  """The shape (symbolic dimensions kept, as under ``jax.export``) and dtype name of a leaf
  (the type name for a non-array)."""
  dtype = getattr(leaf, "dtype", None)
  return tuple(getattr(leaf, "shape", ())), type(leaf).__name__ if dtype is None else str(dtype)


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
    f"{fn_name}: `where` {where!r} matched no {what}. "
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
    count: how many times the call ran in the traced call of the whole model: once
      per call of a module called several times, once per step of a scan.
  """

  path: str
  module: str
  position: str
  leaf: str
  shape: tuple[Any, ...]
  dtype: str
  reason: str | None = None
  count: int = dataclasses.field(default=1, compare=False)


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

  @property
  def applications(self) -> int:
    """How many times a node is applied in one call of the whole model."""
    return sum(p.count for p in self.nodes)

  def __str__(self) -> str:
    header = ("path", "module", "position", "leaf", "shape", "dtype", "calls", "node")
    rows = [
      (
        repr(p.path),
        p.module,
        p.position,
        p.leaf or "-",
        str(p.shape),
        p.dtype,
        str(p.count),
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
    lines.append(
      f"{len(self.nodes)} nodes applied {self.applications} times, {len(self.skipped)} skipped"
    )
    return "\n".join(lines)


class Recorder:
  """Counts the :class:`Placement` rows that the nodes report while a call is traced."""

  def __init__(self) -> None:
    self._counts: dict[Placement, int] = {}

  def add(self, placement: Placement) -> None:
    self._counts[placement] = self._counts.get(placement, 0) + 1

  def placements(self) -> Placements:
    return Placements(dataclasses.replace(p, count=n) for p, n in self._counts.items())


_RECORDER: contextvars.ContextVar[Recorder | None] = contextvars.ContextVar(
  "bgn_jax_recorder", default=None
)


@contextlib.contextmanager
def recording() -> Iterator[Recorder]:
  """Records, in this context (thread, task), the leaves the nodes test.

  A scan runs its body once per step here (``jax.disable_jit``), so that each row
  counts the applications of its node; the traces stay abstract.
  """
  recorder = Recorder()
  token = _RECORDER.set(recorder)
  try:
    with jax.disable_jit():
      yield recorder
  finally:
    _RECORDER.reset(token)


def classify(
  tree: Any, owned: Callable[[Any], str | None], skip: str | None = None, is_leaf: Any = None
) -> tuple[list[Any], list[Any], list[str | None], Any]:
  """The leaves of ``tree`` and why each gets no node (None: it gets one).

  Args:
    tree: a module's output, or its positional arguments.
    owned: ``leaf -> reason or None``: the reason for a leaf that is one of the
      module's own arrays (a parameter passed through), None for an activation.
    skip: a reason that holds for every leaf (left out by ``every``), or None.
    is_leaf: as for ``jax.tree_util``.

  Returns:
    ``(keys, leaves, reasons, treedef)``.
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)
  reasons: list[str | None] = []
  for _, leaf in flat:
    if skip is not None:
      reasons.append(skip)
    elif not isinstance(leaf, jax.Array):  # a framework's variable object, kept whole
      reasons.append(owned(leaf) or f"not a jax.Array ({type(leaf).__name__})")
    elif not is_float_array(leaf):
      reasons.append(f"not floating-point ({leaf.dtype})")
    else:
      reasons.append(owned(leaf))
  return [k for k, _ in flat], [leaf for _, leaf in flat], reasons, treedef


class CallCheck:
  """What the matched calls of one call of the whole model gave; raises when none placed.

  Attributes:
    kept: a matched call was not left out by ``every``.
    placed: a node was placed.
    matched: ``(class name, path) -> what its leaves were``, in call order.
  """

  def __init__(self, fn_name: str, where: Any, position: str, every: int, report: str):
    self.fn_name, self.where, self.position = fn_name, where, position
    self.every, self.report = every, report
    self.kept = False
    self.placed = False
    self.matched: dict[tuple[str, str], str] = {}

  def note(self, name: str, path: str, leaves: Sequence[Any], reasons: Sequence[str | None]):
    """Records one matched call's leaves and reasons."""
    gave = []
    for leaf, reason in zip(leaves, reasons, strict=True):
      shape, dtype = describe(leaf)
      gave.append(f"{dtype}{list(shape)}" + ("" if reason is None else f": {reason}"))
    self.kept = self.kept or not any(r and r.startswith("every=") for r in reasons)
    self.placed = self.placed or any(r is None for r in reasons)
    self.matched.setdefault((name, path), ", ".join(gave) or "no leaves")

  def check(self) -> None:
    """Raises where this call's kept matches placed no node."""
    if self.placed or not self.kept:
      return
    what = "output" if self.position == "after" else "positional input"
    listed = [f"{call} at {path!r} ({gave})" for (call, path), gave in self.matched.items()]
    more = len(listed) - SEEN_LISTED
    kept = f" kept by every={self.every}" if self.every > 1 else ""
    raise ValueError(
      f"{self.fn_name}: `where` {self.where!r} matched {len(listed)} module call(s), but "
      f"none{kept} had a floating-point {what} to normalize (the module's own variables "
      f"passed through are never normalized), so no BGN node was placed: "
      f"{', '.join(listed[:SEEN_LISTED])}{f', ... and {more} more' if more > 0 else ''}. "
      f"Select modules whose {what}s are floating-point activations; {self.report} lists "
      f"every match and why it was skipped."
    )


class Insertion:
  """What one ``insert`` selected, and whether some call of the whole model placed a node.

  Compares by its description (framework, where, position, every, options), so that
  equal inserts share their subclasses and jit traces. Each call of the whole model
  runs inside :meth:`whole_call`, which gives the nodes one :class:`CallCheck` and
  raises at the end where that call placed no node.
  """

  def __init__(self, framework: str, where: Any, position: str, every: int, options: Any):
    self.framework, self.where, self.position, self.every = framework, where, position, every
    key: tuple[Any, ...] = (framework, where, position, every, options)
    try:
      hash(key)
    except TypeError:
      key = (id(self),)
    self.key = key
    self.placed = False  # some call of the whole model placed a node

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Insertion) and self.key == other.key

  def __hash__(self) -> int:
    return hash(self.key)

  def new_check(self) -> CallCheck:
    report = f"bgn_jax.{self.framework}.placements(model, *args)"
    fn_name = f"bgn_jax.{self.framework}.insert"
    return CallCheck(fn_name, self.where, self.position, self.every, report)

  def current_check(self) -> CallCheck:
    """The check of the whole-model call in progress (a fresh one for a module called
    outside a call of the model ``insert`` returned)."""
    return (_CHECKS.get() or {}).get(self) or self.new_check()

  @contextlib.contextmanager
  def whole_call(self) -> Iterator[None]:
    """Runs one call of the whole model; raises after it where it placed no node (and
    none ever did). A call inside a call of the same model is part of the outer one."""
    checks = _CHECKS.get()
    reset = None
    if checks is None:
      checks = {}
      reset = _CHECKS.set(checks)
    outer = checks.get(self)
    check = checks[self] = self.new_check() if outer is None else outer
    try:
      yield
    finally:
      if outer is None:
        del checks[self]
      if reset is not None:
        _CHECKS.reset(reset)
    if outer is None:
      self._finish(check)

  def _finish(self, check: CallCheck) -> None:
    check.check()
    if check.placed:
      self.placed = True
    elif not check.matched and not self.placed:
      raise ValueError(
        f"bgn_jax.{self.framework}.insert: the model was called, but none of the modules "
        f"`where` {self.where!r} selected ran in the call (an unused head, a branch not "
        f"taken), so no BGN node was placed. Select modules that the call runs; "
        f"bgn_jax.{self.framework}.placements(model, *args) lists the nodes a call places."
      )


# The checks of the whole-model calls in progress, by insertion.
_CHECKS: contextvars.ContextVar[dict[Insertion, CallCheck] | None] = contextvars.ContextVar(
  "bgn_jax_checks", default=None
)


def place(
  check: CallCheck,
  path: str,
  name: str,
  position: str,
  tree: Any,
  options: dict[str, Any],
  owned: Callable[[Any], str | None],
  skip: str | None = None,
  is_leaf: Any = None,
  module: Any = None,
  record: bool = True,
) -> Any:
  """``tree`` with a node on each leaf that :func:`classify` keeps; recorded and checked.

  Each leaf is reported to the :func:`recording` in progress (unless ``record`` is
  False: a trace that only finds shapes), and the node to the :func:`listening`
  hook (grad_norms reads the gradient a node receives there).
  """
  hook = _HOOK.get()
  if hook is not None and position == "after":
    tree = hook.before_node(module, tree)
  keys, leaves, reasons, treedef = classify(tree, owned, skip, is_leaf)
  recorder = _RECORDER.get() if record else None
  if recorder is not None:
    for key, leaf, reason in zip(keys, leaves, reasons, strict=True):
      shape, dtype = describe(leaf)
      leaf_name = jax.tree_util.keystr(key)
      recorder.add(Placement(path, name, position, leaf_name, shape, dtype, reason))
  check.note(name, path, leaves, reasons)
  chosen = [i for i, reason in enumerate(reasons) if reason is None]
  if not chosen:
    return tree
  noded = list(leaves)
  for i in chosen:
    noded[i] = bgn(leaves[i], **options)
  result = jax.tree_util.tree_unflatten(treedef, noded)
  return result if hook is None else hook.node_applied(tree, result, module, position)


class Hook:
  """What a diagnostic hears of the nodes while it traces (see :func:`listening`)."""

  def before_node(self, module: Any, outputs: Any) -> Any:
    """The output of ``module``, about to get the nodes :func:`place` puts after it.
    Returns the outputs to use."""
    del module
    return outputs

  def node_applied(
    self, inputs: Any, outputs: Any, module: Any = None, position: str = "after"
  ) -> Any:
    """A node took ``inputs`` to ``outputs``: a layer's (``module`` None), or one that
    :func:`place` put ``position`` the call of ``module``. Returns the outputs to use."""
    del inputs, module, position
    return outputs


_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar("bgn_jax_hook", default=None)


@contextlib.contextmanager
def listening(hook: Hook) -> Iterator[Hook]:
  """Installs ``hook`` for this context (thread, task) only."""
  token = _HOOK.set(hook)
  try:
    yield hook
  finally:
    _HOOK.reset(token)


def is_recording() -> bool:
  return _RECORDER.get() is not None


def current_hook() -> Hook | None:
  return _HOOK.get()


def has_call(cls: type) -> bool:
  """Whether ``cls`` (or a base other than ``object``) defines ``__call__``."""
  # getattr(cls, "__call__") would find type.__call__ on every class.
  return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)


_MARKER = "_bgn_jax_marker"


def marker_of(cls: type) -> tuple[Any, ...] | None:
  """The marker of a subclass made by :func:`marked_subclass`, None for other classes."""
  return vars(cls).get(_MARKER)


def markers_of(cls: type) -> list[tuple[Any, ...]]:
  """The markers of ``cls`` and of the marked subclasses it was made from, outermost first."""
  found = []
  while (marker := marker_of(cls)) is not None:
    found.append(marker)
    cls = cls.__mro__[1]
  return found


def unmarked_class(cls: type) -> type:
  """The user's class under the marked subclasses made from it."""
  while marker_of(cls) is not None:
    cls = cls.__mro__[1]
  return cls


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


_MODULE_BASES = (("nnx", "flax.nnx", "Module"), ("equinox", "equinox", "Module"))


def framework_of(obj: Any) -> str | None:
  """``"linen"``, ``"nnx"`` or ``"equinox"`` for a model (or a bound linen method) of that
  framework, None for anything else; imports no framework."""
  for name, module_name, base in _MODULE_BASES:
    module = sys.modules.get(module_name)
    if module is not None and isinstance(obj, getattr(module, base)):
      return name
  linen = sys.modules.get("flax.linen")
  if linen is not None and (
    isinstance(obj, linen.Module) or isinstance(getattr(obj, "__self__", None), linen.Module)
  ):
    return "linen"
  return None


def check_framework(fn_name: str, argument: str, value: Any, expected: str) -> None:
  """Raises TypeError where ``value`` is a model of a framework other than ``expected``."""
  found = framework_of(value)
  if found is None or found == expected:
    return
  verb = fn_name.rsplit(".", 1)[-1]
  raise TypeError(
    f"{fn_name}: `{argument}` is a {found} model ({type(value).__name__}), not a "
    f"{expected} one; use bgn_jax.{found}.{verb} (or bgn_jax.{verb}, which picks the "
    f"framework)."
  )


def call_keys(paths: Sequence[str]) -> list[str]:
  """Report keys for calls at ``paths``, in order: ``"a"``, then ``"a#1"``, ``"a#2"``."""
  counts: dict[str, int] = {}
  keys = []
  for path in paths:
    index = counts.get(path, 0)
    counts[path] = index + 1
    keys.append(path if index == 0 else f"{path}#{index}")
  return keys


# grad_norms's tap: a fixed-size array per probed call, whose gradient is the squared
# norm of the gradient at the leaves it rides on (a few scalars, whatever their size).

# Scales of the three sums of squares a tap returns: the largest scale whose sum
# is finite gives the norm, so norms over the whole float32 range survive.
TAP_SCALES = (2.0**62, 1.0, 2.0**-62)
# Each call has two rows: at its output, and where a BGN node receives its gradient.
TAP_OUTPUT, TAP_AT_BGN = 0, 1
TAP_SHAPE = (2, len(TAP_SCALES))


@jax.custom_vjp
def _tap(outputs: list[jax.Array], tap: jax.Array) -> list[jax.Array]:
  del tap
  return outputs


def _tap_fwd(outputs: list[jax.Array], tap: jax.Array) -> tuple[list[jax.Array], jax.Array]:
  return outputs, tap


def _tap_bwd(tap: jax.Array, grads: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
  # The tap's cotangent is the squared norm of the leaves' gradient, at three
  # scales. Under vmap the tap is shared by the batch, so these sums add up over
  # the examples: the norm over the whole batch.
  flat = flatten_leaves(grads, [0] * len(grads))
  if flat is None:
    return grads, jnp.zeros_like(tap)
  norm = l2_norm(flat).astype(tap.dtype)
  scales = jnp.asarray(TAP_SCALES, tap.dtype)
  return grads, jnp.square(norm * scales)


_tap.defvjp(_tap_fwd, _tap_bwd)


def tap_norm(sums: jax.Array) -> jax.Array:
  """The norm from a tap row's gradient ``(..., 3)``: the largest finite scale's sum."""
  scales = jnp.asarray(TAP_SCALES, sums.dtype)
  norms = jnp.sqrt(sums) / scales
  finite = jnp.isfinite(sums)
  return jnp.where(
    finite[..., 0], norms[..., 0], jnp.where(finite[..., 1], norms[..., 1], norms[..., 2])
  )


def with_tap(leaves: Sequence[Any], treedef: Any, chosen: Sequence[int], tap: jax.Array) -> Any:
  """The tree of ``leaves`` with ``tap`` (one row of a call's tap) on the ``chosen`` ones."""
  leaves = list(leaves)
  for i, leaf in zip(chosen, _tap([leaves[i] for i in chosen], tap), strict=True):
    leaves[i] = leaf
  return jax.tree.unflatten(treedef, leaves)
