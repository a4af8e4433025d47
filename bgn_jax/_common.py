"""What the framework adapters share: the logic of each verb, written once.

``insert``, ``placements`` and ``grad_norms`` all run something around the ``__call__``
of selected modules, a module being known by its path. Here are the option checks and
``where`` matching, the insertion record (:class:`Insertion`: ``every``, the nodes, the
check of each call of the whole model), the placement records, the hook that diagnostics
listen through, grad_norms's fixed-size tap and the pass that places it
(:class:`TapPass`), the report, and the messages, all of the shape
``bgn_jax.<framework>.<verb>: ...``. An adapter supplies only what differs: how to walk
a model's modules with their paths, how to install the hook around a selected call (an
interceptor in linen, a marked subclass in nnx and equinox), how a tap rides through a
scanned stack, and which arrays a module owns.

Private to the package: the adapters (:mod:`bgn_jax.linen`, :mod:`bgn_jax.nnx`,
:mod:`bgn_jax.equinox`) import it; it imports only JAX and the core.
"""

from __future__ import annotations

import abc
import collections
import contextlib
import contextvars
import dataclasses
import functools
import re
import sys
import types
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, Literal, TypeVar

import jax
import jax.numpy as jnp
import numpy as np

from bgn_jax.core import bgn, l2_norm, make_config

Position = Literal["after", "before"]
Where = type | tuple[type, ...] | Callable[[Any], bool] | str | re.Pattern
Path = tuple[str, ...]
Owned = Callable[[Any], str | None]  # leaf -> why it is the module's own array, or None
Report = dict[str, dict[str, jax.Array]]

BGN_OPTIONS = ("axes", "target_norm", "power", "eps", "axis_name")
SEEN_LISTED = 40  # how many seen module calls a no-match error lists
_MAX_RANK = 64  # axes entries checked at insert time; the rank itself is known at the call


# --------------------------------------------------------------------------------------
# Options, the layer, and `where`.


def check_options(
  fn_name: str, position: Any, every: Any, bgn_options: dict[str, Any]
) -> dict[str, Any]:
  """Validates the arguments that every framework's ``insert`` takes.

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


def check_layer(fn_name: str, layer: Any) -> None:
  """Checks a BGN layer's options at construction, as far as they do not depend on the
  input (``axes`` entries and a shape-dependent target are checked at the call)."""
  check_axes_not_empty(fn_name, layer.axes)
  make_config((), **{name: getattr(layer, name) for name in BGN_OPTIONS if name != "axes"})


def layer_bgn(layer: Any, x: jax.Array) -> jax.Array:
  """The call of a BGN layer: :func:`bgn_jax.bgn` with the layer's options, told to the
  hook in place (grad_norms reads the gradient that reaches the node there)."""
  y = bgn(x, **{name: getattr(layer, name) for name in BGN_OPTIONS})
  hook = _HOOK.get()
  return y if hook is None else hook.node_applied(x, y)


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


def select(
  fn_name: str,
  where: Where,
  modules: Iterable[tuple[str, Any]],
  is_match: Callable[[Any, str], bool],
) -> list[tuple[str, Any]]:
  """The ``(path, module)`` pairs of ``modules`` that ``where`` selects, in their order.

  Only modules that define ``__call__`` are tested (containers are not).

  Raises:
    ValueError: none is selected; the message lists what was tested.
  """
  seen: dict[tuple[str, str], None] = {}
  chosen = []
  for path, module in modules:
    if not has_call(type(module)):
      continue
    seen[(unmarked_class(type(module)).__name__, path)] = None
    if is_match(module, path):
      chosen.append((path, module))
  if not chosen:
    raise ValueError(no_match_message(fn_name, where, seen, "module"))
  return chosen


# --------------------------------------------------------------------------------------
# What a node tests, and the placement records.


def describe(leaf: Any) -> tuple[tuple[Any, ...], str]:
  """The shape (symbolic dimensions kept, as under ``jax.export``) and dtype name of a leaf
  (the type name for a non-array)."""
  dtype = getattr(leaf, "dtype", None)
  return tuple(getattr(leaf, "shape", ())), type(leaf).__name__ if dtype is None else str(dtype)


def is_float_array(leaf: Any) -> bool:
  """A ``jax.Array`` of a floating-point dtype."""
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.floating)


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


def is_recording() -> bool:
  return _RECORDER.get() is not None


# --------------------------------------------------------------------------------------
# The insertion: every, the nodes, the check of each call of the whole model.


class CallCheck:
  """What the matched calls of one call of the whole model gave; raises when none placed.

  Attributes:
    kept: a matched call was not left out by ``every``.
    placed: a node was placed.
    matched: ``(class name, path) -> what its leaves were``, in call order.
    seen: the ``(class name, path)`` of the module calls tested, where the adapter
      finds the matches as they are called (linen), for the no-match message.
    hook: the hook in place as the call began: a diagnostic hears of the nodes of a
      call that runs inside it, not of one that wraps it.
  """

  def __init__(self, fn_name: str, where: Any, position: str, every: int, report: str):
    self.fn_name, self.where, self.position = fn_name, where, position
    self.every, self.report = every, report
    self.kept = False
    self.placed = False
    self.matched: dict[tuple[str, str], str] = {}
    self.seen: dict[tuple[str, str], None] = {}
    self.hook = _HOOK.get()

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
  """What one ``insert`` asked for, and whether some call of the whole model placed a node.

  Made from ``insert``'s arguments, which it checks. It numbers the matches for
  ``every`` (:meth:`skipped`), places the nodes (:meth:`place`) and checks each call of
  the whole model (:meth:`whole_call`). Compares by its description (framework, where,
  position, every, options and the adapter's ``extra``), so that equal inserts share
  their subclasses and jit traces.
  """

  argument = "model"  # what the framework's verbs call the thing insert returns
  # Whether the adapter finds the matches only as they are called (linen: it has no
  # module tree before), so that a call without one is the no-match error.
  matches_at_call = False

  def __init__(
    self,
    framework: str,
    where: Any,
    position: Any,
    every: Any,
    bgn_options: dict[str, Any],
    extra: tuple[Any, ...] = (),
  ):
    self.framework, self.fn_name = framework, f"bgn_jax.{framework}.insert"
    self.options = check_options(self.fn_name, position, every, bgn_options)
    self.where, self.position, self.every = where, position, int(every)
    # The marker of a module's node: equal nodes are one node, other options an error.
    self.node_marker = ("bgn", position, tuple(sorted(self.options.items())))
    self.key = cache_key(framework, where, position, self.every, self.node_marker[2], *extra)
    self.placed = False  # some call of the whole model placed a node
    self._numbers: dict[str, int] = {}  # path -> match number, for `every`

  def __eq__(self, other: object) -> bool:
    return isinstance(other, Insertion) and self.key == other.key

  def __hash__(self) -> int:
    return hash(self.key)

  def skipped(self, path: str) -> str | None:
    """Why the match at ``path`` gets no node (left out by ``every``); None: it gets one.

    Matches are numbered by path in the order they are first seen, once for the life
    of the insertion: all calls of a module share its decision.
    """
    index = self._numbers.setdefault(path, len(self._numbers))
    return None if index % self.every == 0 else f"every={self.every} (match {index})"

  def new_nodes(
    self,
    modules: Iterable[tuple[str, Any]],
    is_match: Callable[[Any, str], bool],
    marker_of: Callable[[Any], tuple[Any, ...] | None],
  ) -> list[tuple[str, Any]]:
    """The ``(path, module)`` pairs of ``modules`` that get a node: those ``where``
    selects (:func:`select`), less those ``every`` leaves out and those that have this
    node already (``marker_of(module)``: their node's marker, or None)."""
    chosen = select(self.fn_name, self.where, modules, is_match)
    kept = [(path, module) for path, module in chosen if self.skipped(path) is None]
    return [(p, m) for p, m in kept if not self.has_node(p, m, marker_of(m))]

  def has_node(self, path: str, module: Any, existing: tuple[Any, ...] | None) -> bool:
    """Whether ``module`` at ``path`` already has this node (``existing``, its node's
    marker, or None); a ValueError where it has a node with other options."""
    if existing is None:
      return False
    if existing[:3] != self.node_marker:
      raise ValueError(
        f"{self.fn_name}: the module at {path!r} ({unmarked_class(type(module)).__name__}) "
        f"already has a BGN node with {options_text(existing)}; asked now: "
        f"{options_text(self.node_marker)}. Call bgn_jax.{self.framework}.remove(model) "
        f"first to replace the nodes."
      )
    return True

  def new_check(self) -> CallCheck:
    report = f"bgn_jax.{self.framework}.placements({self.argument}, *args)"
    return CallCheck(self.fn_name, self.where, self.position, self.every, report)

  def current_check(self) -> CallCheck:
    """The check of the whole-model call in progress (a fresh one for a module called
    outside a call of the model ``insert`` returned)."""
    return (_CHECKS.get() or {}).get(self) or self.new_check()

  @contextlib.contextmanager
  def whole_call(self, verify: bool = True) -> Iterator[CallCheck]:
    """Runs one call of the whole model; raises after it where it placed no node (and
    none ever did). A call inside a call of the same model is part of the outer one.
    With ``verify`` False, matches with nothing to normalize are not an error."""
    checks = _CHECKS.get()
    reset = None
    if checks is None:
      checks = {}
      reset = _CHECKS.set(checks)
    outer = checks.get(self)
    check = checks[self] = self.new_check() if outer is None else outer
    try:
      yield check
    finally:
      if outer is None:
        del checks[self]
      if reset is not None:
        _CHECKS.reset(reset)
    if outer is None:
      self._finish(check, verify)

  def _finish(self, check: CallCheck, verify: bool) -> None:
    if verify:
      check.check()
    if check.placed:
      self.placed = True
    elif not check.matched and not self.placed:
      raise ValueError(self.no_call_message(check))

  def no_call_message(self, check: CallCheck) -> str:
    """The error for a call of the whole model in which no selected module ran; where
    the matches are found as they are called, the no-match error listing the calls."""
    if self.matches_at_call:
      report = f"bgn_jax.{self.framework}.placements({self.argument}, *args)"
      message = no_match_message(self.fn_name, self.where, check.seen, "module __call__", report)
      if check.seen:
        return message
      return (
        f"{message} No module __call__ ran: the function given to insert must call "
        f"{self.framework} modules (model.apply, or a function that calls it)."
      )
    return (
      f"{self.fn_name}: the model was called, but none of the modules `where` "
      f"{self.where!r} selected ran in the call (an unused head, a branch not taken), so "
      f"no BGN node was placed. Select modules that the call runs; "
      f"bgn_jax.{self.framework}.placements(model, *args) lists the nodes a call places."
    )

  def place(
    self,
    path: str,
    name: str,
    tree: Any,
    owned: Owned,
    *,
    module: Any,
    skip: str | None = None,
    is_leaf: Any = None,
    record: bool = True,
  ) -> Any:
    """``tree`` (a call's output, or its positional inputs) with a node on each leaf
    that :func:`classify` keeps.

    Each leaf is reported to the :func:`recording` in progress (unless ``record`` is
    False: a trace that only finds shapes) and noted in the whole call's check. The
    hook in place as the whole call began hears of an output about to get nodes, and
    of the nodes (grad_norms taps there).
    """
    keys, leaves, reasons, treedef = classify(tree, owned, skip, is_leaf)
    recorder = _RECORDER.get() if record else None
    if recorder is not None:
      for key, leaf, reason in zip(keys, leaves, reasons, strict=True):
        shape, dtype = describe(leaf)
        leaf_name = jax.tree_util.keystr(key)
        recorder.add(Placement(path, name, self.position, leaf_name, shape, dtype, reason))
    check = self.current_check()
    check.note(name, path, leaves, reasons)
    chosen = [i for i, reason in enumerate(reasons) if reason is None]
    if not chosen:
      return tree
    hook = check.hook
    if hook is not None and self.position == "after":
      tree = hook.before_node(module, tree)
      leaves = jax.tree_util.tree_leaves(tree, is_leaf=is_leaf)
    noded = list(leaves)
    for i in chosen:
      noded[i] = bgn(leaves[i], **self.options)
    result = jax.tree_util.tree_unflatten(treedef, noded)
    return result if hook is None else hook.node_applied(tree, result, module, self.position)


# The checks of the whole-model calls in progress, by insertion.
_CHECKS: contextvars.ContextVar[dict[Insertion, CallCheck] | None] = contextvars.ContextVar(
  "bgn_jax_checks", default=None
)


# --------------------------------------------------------------------------------------
# The hook that diagnostics listen through.


class Hook:
  """What a diagnostic hears of the nodes while it traces (see :func:`listening`)."""

  def before_node(self, module: Any, outputs: Any) -> Any:
    """The output of ``module``, about to get the nodes :meth:`Insertion.place` puts
    after it. Returns the outputs to use."""
    del module
    return outputs

  def node_applied(
    self, inputs: Any, outputs: Any, module: Any = None, position: str = "after"
  ) -> Any:
    """A node took ``inputs`` to ``outputs``: a layer's (``module`` None), or one that
    :meth:`Insertion.place` put ``position`` the call of ``module``. Returns the outputs
    to use."""
    del inputs, module, position
    return outputs


_HOOK: contextvars.ContextVar[Hook | None] = contextvars.ContextVar("bgn_jax_hook", default=None)


H = TypeVar("H", bound=Hook)


@contextlib.contextmanager
def listening(hook: H) -> Iterator[H]:
  """Installs ``hook`` for this context (thread, task) only."""
  token = _HOOK.set(hook)
  try:
    yield hook
  finally:
    _HOOK.reset(token)


def current_hook() -> Hook | None:
  return _HOOK.get()


# --------------------------------------------------------------------------------------
# The marked subclasses of nnx and equinox.


def has_call(cls: type) -> bool:
  """Whether ``cls`` (or a base other than ``object``) defines ``__call__``."""
  # getattr(cls, "__call__") would find type.__call__ on every class.
  return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)


_MARKER = "_bgn_jax_marker"


def marker_of(cls: type) -> tuple[Any, ...] | None:
  """The marker of a subclass made by :func:`marked_subclass`, None for other classes."""
  return vars(cls).get(_MARKER)


def first_marker(cls: type, kind: str) -> tuple[Any, ...] | None:
  """The first marker of ``kind`` among the marked subclasses ``cls`` was made from."""
  return next((marker for marker in markers_of(cls) if marker[0] == kind), None)


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
  """``"(position='after', target_norm=...)"`` for a node's marker ``(tag, position,
  options, ...)``."""
  _, position, options = marker[:3]
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


def node_call(
  cls: type,
  site_of: Callable[[Any], tuple[Insertion, str]],
  owned_of: Callable[[Any], Owned],
  is_leaf: Any = None,
) -> Callable[..., Any]:
  """The ``__call__`` of a subclass of ``cls`` with a node: ``cls.__call__``, with the
  nodes of the insertion and path ``site_of(module)`` on its positional inputs or its
  output. ``owned_of(module)`` says which leaves are the module's own arrays (taken as
  the call begins: a value the call stores is an output it computed)."""

  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    insertion, path = site_of(self)
    owned = owned_of(self)
    name = unmarked_class(type(self)).__name__
    if insertion.position == "before":
      args = insertion.place(path, name, args, owned, module=self, is_leaf=is_leaf)
    outputs = cls.__call__(self, *args, **kwargs)
    if insertion.position == "after":
      outputs = insertion.place(path, name, outputs, owned, module=self, is_leaf=is_leaf)
    return outputs

  return __call__


def checked_call(cls: type, insertion: Insertion) -> Callable[..., Any]:
  """The ``__call__`` of the model's subclass: ``cls.__call__`` as one call of the whole
  model, which raises where it placed no node (:meth:`Insertion.whole_call`)."""

  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    with insertion.whole_call():
      return cls.__call__(self, *args, **kwargs)

  return __call__


# --------------------------------------------------------------------------------------
# The frameworks, their arguments and messages.


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


def check_model(fn_name: str, value: Any, framework: str, base: type, what: str) -> None:
  """Raises TypeError where ``value``, the ``model`` argument, is not a ``base``
  (``what`` names it), naming the right verb for another framework's model."""
  check_framework(fn_name, "model", value, framework)
  if not isinstance(value, base):
    raise TypeError(f"{fn_name}: `model` must be {what}; got {type(value).__name__}.")


def no_nodes_message(fn_name: str, argument: str, value: Any) -> str:
  """The error of ``placements`` given something ``insert`` did not return."""
  framework = fn_name.split(".")[1]
  given = getattr(value, "__qualname__", type(value).__name__)
  inserted = "model.apply" if framework == "linen" else "model"
  return (
    f"{fn_name}: `{argument}` ({given}) has no BGN node; pass what "
    f"bgn_jax.{framework}.insert({inserted}, where=...) returns."
  )


def cache_key(*parts: Any) -> tuple[Any, ...]:
  """``parts`` as a key of jit caches and of the subclasses made, where it is hashable;
  otherwise a key of its own (an unhashable ``where`` or option: traces of its own)."""
  try:
    hash(parts)
  except TypeError:
    return (object(),)
  return parts


def split_arguments(
  args: Any, kwargs: Any, is_dynamic: Callable[[Any], bool], is_leaf: Any = None
) -> tuple[list[Any], Callable[..., Any]]:
  """The leaves of ``(args, kwargs)`` that a transform must be given as arguments
  (``is_dynamic``), and ``rebuild(*given) -> (args, kwargs)``, which puts them back
  among the other leaves (Python flags stay static)."""
  leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=is_leaf)
  dynamic = [is_dynamic(leaf) for leaf in leaves]

  def rebuild(*given: Any) -> Any:
    it = iter(given)
    return jax.tree.unflatten(
      treedef, [next(it) if d else leaf for leaf, d in zip(leaves, dynamic, strict=True)]
    )

  return [leaf for leaf, d in zip(leaves, dynamic, strict=True) if d], rebuild


# --------------------------------------------------------------------------------------
# grad_norms: the tap, the pass that places it, and the report.


def measuring(
  fn_name: str,
  loss_fn: Any,
  check: Callable[[Any], None],
  measure: Callable[[Any, tuple[Any, ...], dict[str, Any]], Report],
) -> Callable[..., Report]:
  """What ``grad_norms(loss_fn, where=...)`` returns: a function of ``loss_fn``'s
  arguments that gives ``measure(model, args, kwargs)`` after ``check(model)``.

  Raises:
    TypeError: ``loss_fn`` is not callable.
  """
  if not callable(loss_fn):
    raise TypeError(f"{fn_name}: `loss_fn` must be callable; got {type(loss_fn).__name__}.")

  @functools.wraps(loss_fn)
  def run(model: Any, *args: Any, **kwargs: Any) -> Report:
    check(model)
    return measure(model, args, kwargs)

  return run


def none_called_message(fn_name: str, where: Any, paths: Sequence[str]) -> str:
  """The error of ``grad_norms`` whose ``loss_fn`` called none of the selected modules."""
  listed = ", ".join(repr(path) for path in paths[:SEEN_LISTED])
  return (
    f"{fn_name}: `where` {where!r} selected {listed}, but loss_fn called none of them; it "
    f"must call the model it receives."
  )


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


@dataclasses.dataclass
class TapCall:
  """One call of a selected module, as the shape pass of ``grad_norms`` saw it."""

  path: str
  index: int  # its number among the calls at `path` in the pass: names its tap
  params_ndims: tuple[int, ...]  # the rank of each parameter leaf in the call
  dtype: Any = None  # of its tap; None without one (nothing floating-point to measure)
  at_bgn: bool = False  # a BGN node receives its output's gradient, or sits on its inputs


@dataclasses.dataclass
class _Tapped:
  """A selected call's output, as one pass tapped it."""

  call: TapCall
  tap: jax.Array | None  # the call's tap in this pass (TAP_SHAPE), None without one
  owned: Owned  # the module's own arrays, which the taps leave out


def _chosen(tree: Any, owned: Owned, is_leaf: Any) -> tuple[list[Any], Any, list[int]]:
  """The leaves of ``tree``, its treedef, and which leaves a tap measures."""
  _, leaves, reasons, treedef = classify(tree, owned, is_leaf=is_leaf)
  return leaves, treedef, [i for i, reason in enumerate(reasons) if reason is None]


def _tap_dtype(leaves: Sequence[Any], chosen: Sequence[int]) -> Any:
  return jnp.result_type(*[leaves[i] for i in chosen], jnp.float32)


class TapPass(Hook, abc.ABC):
  """One pass of ``grad_norms`` over ``loss_fn``: the shape pass (``discover``) or the
  measured one.

  Each call of a selected module has a tap (``TAP_SHAPE``, found by the adapter's
  :meth:`tap_of`) with two rows. ``TAP_OUTPUT`` rides on the output where the module
  returns it, before any node, so its gradient is the one over all the output's
  consumers. ``TAP_AT_BGN`` rides where a BGN node receives its gradient: on the
  output of a node fed that output (the module's inserted node, the node of an
  ``insert`` inside ``loss_fn``, a BGN layer), or of a node on the module's inputs
  (``position="before"``). Both passes make the same decisions in the same order, so
  the calls the shape pass records are the taps the measured pass reads.

  The adapter says which modules are selected (:meth:`path_of`), their parameters
  (:meth:`params_of`), their own arrays (:meth:`owned_of`, never measured) and where a
  call's tap is (:meth:`tap_of`); its probe runs each call through :meth:`probed`.
  """

  is_leaf: Any = None  # the adapter's leaves kept whole, as for jax.tree_util

  def __init__(self, discover: bool):
    self.discover = discover
    self.calls: list[TapCall] = []  # the shape pass's, in the order their outputs are tapped
    self._counts: collections.Counter[str] = collections.Counter()
    self._active: dict[int, tuple[str, Owned]] = {}  # by module id: calls in probed()
    self._pending: dict[int, _Tapped] = {}  # by module id: tapped before a node inside
    # Tapped outputs by id (the object kept, so no id is reused): a node fed one is known.
    self._tagged: dict[int, tuple[Any, _Tapped]] = {}
    self._before: dict[tuple[str, int], Any] = {}  # (path, index) -> dtype: inputs' node

  @abc.abstractmethod
  def path_of(self, module: Any) -> str | None:
    """The path of a selected module; None for others."""

  @abc.abstractmethod
  def params_of(self, module: Any) -> list[Any]:
    """The module's parameter leaves, as its call sees them."""

  @abc.abstractmethod
  def owned_of(self, module: Any) -> Owned:
    """Which leaves are the module's own arrays, as its call begins."""

  @abc.abstractmethod
  def tap_of(self, module: Any, path: str, index: int, dtype: Any) -> jax.Array | None:
    """The tap of the ``index``-th call at ``path``, as the call sees it (made in the
    shape pass where the adapter makes it there); None where there is none."""

  def probed(self, module: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """``method(module, *args, **kwargs)``, with the taps where ``module`` is selected."""
    path = self.path_of(module)
    if path is None:
      return method(module, *args, **kwargs)
    owned = self.owned_of(module)
    self._active[id(module)] = (path, owned)
    try:
      outputs = method(module, *args, **kwargs)
    finally:
      self._active.pop(id(module), None)
    pending = self._pending.pop(id(module), None)
    if pending is not None:  # a node inside the call got the tapped output
      return self._at_bgn(outputs, pending)
    outputs, tapped = self._output(module, path, outputs, owned)
    self._tagged[id(outputs)] = (outputs, tapped)
    return outputs

  def before_node(self, module: Any, outputs: Any) -> Any:
    # Only where probed() runs the call around its node (linen's interceptor, the
    # probe around equinox's inserted class): the output is tapped here, before the
    # node. Where the node wraps the probe (nnx's classes), the probe has tapped it.
    active = self._active.get(id(module))
    if active is None:
      return outputs
    path, owned = active
    outputs, self._pending[id(module)] = self._output(module, path, outputs, owned)
    return outputs

  def node_applied(
    self, inputs: Any, outputs: Any, module: Any = None, position: str = "after"
  ) -> Any:
    if position == "before":
      path = None if module is None else self.path_of(module)
      return outputs if path is None else self._before_call(module, path, outputs)
    tagged = self._tagged.get(id(inputs))
    if tagged is None or tagged[0] is not inputs or tagged[1].call.at_bgn:
      return outputs
    return self._at_bgn(outputs, tagged[1])

  def _before_call(self, module: Any, path: str, inputs: Any) -> Any:
    # A node on the inputs of a selected call: what reaches it is the call's at_bgn, in
    # the tap of the call about to run.
    index = self._counts[path]
    active = self._active.get(id(module))
    owned = self.owned_of(module) if active is None else active[1]
    leaves, treedef, chosen = _chosen(inputs, owned, self.is_leaf)
    if not chosen:
      return inputs
    self._before[(path, index)] = dtype = _tap_dtype(leaves, chosen)
    tap = self.tap_of(module, path, index, dtype)
    return inputs if tap is None else with_tap(leaves, treedef, chosen, tap[TAP_AT_BGN])

  def _output(self, module: Any, path: str, outputs: Any, owned: Owned) -> tuple[Any, _Tapped]:
    index = self._counts[path]
    self._counts[path] += 1
    leaves, treedef, chosen = _chosen(outputs, owned, self.is_leaf)
    inputs_dtype = self._before.pop((path, index), None)
    before = inputs_dtype is not None  # a node on the inputs took the at_bgn row
    dtype = _tap_dtype(leaves, chosen) if chosen else inputs_dtype
    params = tuple(jnp.ndim(p) for p in self.params_of(module)) if self.discover else ()
    call = TapCall(path, index, params, dtype, at_bgn=before)
    if self.discover:
      self.calls.append(call)
    tap = None if dtype is None else self.tap_of(module, path, index, dtype)
    if tap is not None and chosen:
      outputs = with_tap(leaves, treedef, chosen, tap[TAP_OUTPUT])
    return outputs, _Tapped(call, tap, owned)

  def _at_bgn(self, outputs: Any, tapped: _Tapped) -> Any:
    tapped.call.at_bgn = True  # the at_bgn row is taken
    if tapped.tap is None:
      return outputs
    leaves, treedef, chosen = _chosen(outputs, tapped.owned, self.is_leaf)
    return with_tap(leaves, treedef, chosen, tapped.tap[TAP_AT_BGN]) if chosen else outputs


def stacked_axes(
  fn_name: str, path: str, stored: Sequence[int], per_call: Sequence[int], lead: int
) -> tuple[int, ...]:
  """How many leading axes of each parameter leaf the norm keeps: ``lead`` (the tap's,
  one value per layer of a stacked module) where every leaf has that many axes beyond
  its rank in one call, else none (shared and stacked parameters mixed: one norm).

  Args:
    fn_name: the public name, for the message.
    path: the module's path, for the message.
    stored: the rank of each parameter leaf in the model.
    per_call: the rank of each in one call.
    lead: the number of leading axes of the call's tap.
  """
  extra = tuple(s - c for s, c in zip(stored, per_call, strict=True))
  if any(n < 0 for n in extra):
    raise ValueError(
      f"{fn_name}: the parameters of {path!r} have lower rank in the model than in one "
      f"call; a transform around the call changes their shapes in a way grad_norms "
      f"cannot read. Select modules outside that transform."
    )
  return extra if set(extra) <= {lead} else (0,) * len(extra)


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


@functools.partial(jax.jit, static_argnums=(1, 3))
def call_norms(
  params: list[list[jax.Array]],
  params_lead: tuple[tuple[int, ...], ...],
  taps: list[jax.Array | None],
  lead_shapes: tuple[tuple[int, ...], ...],
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  """The ``(output, params, at_bgn)`` norms of each call, from its tap's gradient (None:
  zeros) and its parameters' gradients (each leaf keeping ``params_lead`` leading axes).

  One compiled computation for all of them, cached per layout: eagerly, the op-by-op
  version costs seconds of dispatch and compilation.
  """
  flats = [flatten_leaves(leaves, lead) for leaves, lead in zip(params, params_lead, strict=True)]
  norms = []
  for tap, param, lead_shape in zip(
    taps, group_norms(flats, lead_shapes), lead_shapes, strict=True
  ):
    if tap is None:
      zeros = jnp.zeros(lead_shape, jnp.float32)
      norms.append((zeros, param, zeros))
    else:
      norms.append((tap_norm(tap[..., TAP_OUTPUT, :]), param, tap_norm(tap[..., TAP_AT_BGN, :])))
  return norms


def read_report(
  fn_name: str,
  calls: Sequence[TapCall],
  at: Callable[[Any, TapCall, bool], Any],
  shapes: Any,
  params: Any,
  grad_params: Any,
  grad_taps: Any,
) -> Report:
  """The report of ``calls`` from the gradients, where the taps are variables in trees.

  Args:
    fn_name: the public name, for the messages.
    calls: the calls the measured pass tapped, in order.
    at: ``at(tree, call, tap)``: in one of the trees below, the call's tap (``tap``
      True), or the subtree of its module (False); None where there is none.
    shapes: the taps' shapes, as the shape pass made them (stacked by transforms).
    params: the parameters.
    grad_params: their gradients.
    grad_taps: the taps' gradients.
  """
  tap_shapes = [None if call.dtype is None else at(shapes, call, True).shape for call in calls]
  lead_shapes = tuple(() if s is None else tuple(s[: -len(TAP_SHAPE)]) for s in tap_shapes)
  leads = []
  for call, lead_shape in zip(calls, lead_shapes, strict=True):
    stored = [jnp.ndim(p) for p in jax.tree.leaves(at(params, call, False) or {})]
    leads.append(stacked_axes(fn_name, call.path, stored, call.params_ndims, len(lead_shape)))
  param_grads = [jax.tree.leaves(at(grad_params, call, False) or {}) for call in calls]
  taps = [None if s is None else at(grad_taps, c, True) for c, s in zip(calls, tap_shapes)]
  norms = call_norms(param_grads, tuple(leads), taps, lead_shapes)
  return make_report(calls, norms, [tap is not None for tap in taps])


def call_keys(paths: Sequence[str]) -> list[str]:
  """Report keys for calls at ``paths``, in order: ``"a"``, then ``"a#1"``, ``"a#2"``."""
  counts: dict[str, int] = {}
  keys = []
  for path in paths:
    index = counts.get(path, 0)
    counts[path] = index + 1
    keys.append(path if index == 0 else f"{path}#{index}")
  return keys


def make_report(
  calls: Sequence[TapCall],
  norms: Sequence[tuple[jax.Array, jax.Array, jax.Array]],
  tapped: Sequence[bool],
) -> Report:
  """``{key: {"output": norm, "params": norm}}`` in call order, keys from
  :func:`call_keys`, plus ``"at_bgn"`` where a node receives a call's gradient and the
  call has a tap (``tapped``). An OrderedDict keeps the call order through jit (pytree
  dicts sort their keys)."""
  report: Report = collections.OrderedDict()
  keys = call_keys([call.path for call in calls])
  for key, call, (output, params, at_bgn), has_tap in zip(keys, calls, norms, tapped, strict=True):
    report[key] = {"output": output, "params": params}
    if call.at_bgn and has_tap:
      report[key]["at_bgn"] = at_bgn
  return report
