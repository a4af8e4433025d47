"""BGN for ``flax.nnx``: the layer, :func:`insert`, :func:`remove`, :func:`placements`
and :func:`grad_norms`.

:func:`insert` follows the nnx surgery convention: it edits the model in place,
swapping the class of each selected module for a subclass whose ``__call__``
passes the output (or the inputs) through :func:`bgn_jax.bgn`, and
:func:`remove` swaps the original classes back. The model keeps its identity,
its state and its Variables, so it behaves exactly like the same model with the
nodes written by hand. :func:`grad_norms` measures, in one forward and one
backward pass, the norm of the gradient at the output and at the parameters of
each selected module call.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import collections
import contextlib
import contextvars
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib
from jax.core import Tracer

from bgn_jax._common import (
  SEEN_LISTED,
  TAP_AT_BGN,
  TAP_OUTPUT,
  TAP_SHAPE,
  Hook,
  Insertion,
  Placements,
  Position,
  Where,
  check_axes_not_empty,
  check_framework,
  check_options,
  classify,
  current_hook,
  flatten_leaves,
  group_norms,
  has_call,
  listening,
  marked_subclass,
  marker_of,
  markers_of,
  matcher,
  no_match_message,
  options_text,
  place,
  recording,
  tap_norm,
  unmarked_class,
  with_tap,
)
from bgn_jax.core import Axes, AxisName, TargetNorm, bgn, make_config

__all__ = ["BGN", "grad_norms", "insert", "placements", "remove"]


class BGN(nnx.Module):
  """Backward Gradient Normalization layer for ``flax.nnx`` (no parameters, no state).

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    axes: None for one group over the whole array, or the axes of each group.
    target_norm: a positive float, ``"sqrt_units"`` (the default) or
      ``"sqrt_size"`` (see :func:`bgn_jax.bgn`).
    power: c in [0, 1].
    eps: floor on the norm, >= 0.
    axis_name: mapped axis name(s) over which the squared norm is summed.
  """

  def __init__(
    self,
    axes: Axes = None,
    target_norm: TargetNorm = "sqrt_units",
    power: float = 1.0,
    eps: float = 0.0,
    axis_name: AxisName = None,
  ):
    # Options that do not depend on the input shape are checked here, at
    # construction; axes and the shape-dependent target are checked at call.
    check_axes_not_empty("bgn_jax.nnx.BGN", axes)
    make_config((), target_norm=target_norm, power=power, eps=eps, axis_name=axis_name)
    self.axes = tuple(axes) if isinstance(axes, list) else axes
    self.target_norm: TargetNorm = target_norm
    self.power = power
    self.eps = eps
    self.axis_name = axis_name

  def __call__(self, x: jax.Array) -> jax.Array:
    y = bgn(
      x,
      axes=self.axes,
      target_norm=self.target_norm,
      power=self.power,
      eps=self.eps,
      axis_name=self.axis_name,
    )
    hook = current_hook()
    return y if hook is None else hook.node_applied(x, y)


M = TypeVar("M", bound=nnx.Module)
Options = tuple[tuple[str, Any], ...]

# A subclass made here is marked with a class attribute: ("bgn", position, options,
# site) for a module with a node, ("root", insertion) for the model insert was given,
# ("probe", path) for a module grad_norms measures. Everything a node needs is in its
# class, so nothing is added to the instance, whose attributes some modules read
# (bridge.ToNNX makes each one a linen variable). Subclasses are found again through
# cls.__subclasses__(), which holds them weakly, and made once per (class, marker):
# equal inserts give equal graph definitions, so nnx.jit reuses its compilation.


def _subclass(cls: type, marker: tuple[Any, ...], call: Callable[..., Any], doc: str) -> type:
  """The subclass of ``cls`` with ``marker`` and ``__call__``, made once."""
  suffix = {"bgn": "WithBGN", "root": "WithBGNCheck", "probe": "WithGradProbe"}[marker[0]]
  namespace = {
    "__call__": call,
    "__module__": __name__,
    "__qualname__": f"{cls.__qualname__}{suffix}",
    "__doc__": doc,
  }
  keywords = {"pytree": cls._pytree__is_pytree} if hasattr(cls, "_pytree__is_pytree") else {}
  return marked_subclass(cls, marker, f"{cls.__name__}{suffix}", namespace, keywords)


def _marker(cls: type, kind: str) -> tuple[Any, ...] | None:
  """The first marker of ``kind`` among the subclasses made here that ``cls`` is."""
  return next((marker for marker in markers_of(cls) if marker[0] == kind), None)


def _variable_values(module: nnx.Module) -> set[int]:
  """ids of the values of the module's Variables (a returned parameter is one of them).

  Taken as the call begins: a value the call stores in a Variable is an output it
  computed, not a variable passed through.
  """
  return {
    id(node.get_value()) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)
  }


def _owned(values: set[int]) -> Callable[[Any], str | None]:
  return lambda leaf: "a variable of the module, passed through" if id(leaf) in values else None


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _with_nodes(module: nnx.Module, tree: Any, owned: set[int]) -> Any:
  """``tree`` with :func:`bgn_jax.bgn` on its floating-point leaves, recorded and checked."""
  _, position, options, (path, insertion) = cast(tuple, _marker(type(module), "bgn"))
  check = insertion.current_check()
  name = unmarked_class(type(module)).__name__
  owned_fn = _owned(owned)

  def reason(leaf: Any) -> str | None:  # Variables are kept whole
    return "a variable of the module, passed through" if _is_variable(leaf) else owned_fn(leaf)

  return place(
    check, path, name, position, tree, dict(options), reason, is_leaf=_is_variable, module=module
  )


def _with_bgn(cls: type, marker: tuple[Any, ...]) -> type:
  """The subclass of ``cls`` whose ``__call__`` adds the BGN node."""
  position = marker[1]

  def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    owned = _variable_values(self)
    if position == "before":
      args = _with_nodes(self, args, owned)
    outputs = cls.__call__(self, *args, **kwargs)
    if position == "after":
      outputs = _with_nodes(self, outputs, owned)
    return outputs

  doc = f"{cls.__name__} with a BGN node {position} its __call__ ({dict(marker[2])})."
  return _subclass(cls, marker, __call__, doc)


def _with_check(cls: type, insertion: Insertion) -> type:
  """The subclass of the model's class whose ``__call__`` checks that a node was placed."""

  def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    with insertion.whole_call():
      return cls.__call__(self, *args, **kwargs)

  doc = f"{cls.__name__}, checking that its call placed a BGN node."
  return _subclass(cls, ("root", insertion), __call__, doc)


def _is_nnx_filter(where: Any) -> bool:
  filters = (
    filterlib.WithTag,
    filterlib.PathContains,
    filterlib.PathIn,
    filterlib.OfType,
    filterlib.Any,
    filterlib.All,
    filterlib.Not,
    filterlib.Everything,
    filterlib.Nothing,
  )
  if isinstance(where, filters) or where is Ellipsis:
    return True
  return isinstance(where, (tuple, list)) and any(_is_nnx_filter(w) for w in where)


def _module_matcher(where: Where, fn_name: str) -> Callable[[Any, tuple[Any, ...]], bool]:
  """``where`` as a test ``(module, path parts) -> bool``; nnx filters get the path parts."""
  if _is_nnx_filter(where):
    predicate = filterlib.to_predicate(cast(Any, where))
    return lambda module, parts: bool(predicate(parts, module))
  is_match = matcher(where, fn_name=fn_name, module_type=nnx.Module)
  return lambda module, parts: is_match(module, _joined(parts))


def _joined(parts: tuple[Any, ...]) -> str:
  return "/".join(str(part) for part in parts)


def _selected(
  model: nnx.Module, where: Where, fn_name: str
) -> tuple[list[tuple[str, nnx.Module]], dict[tuple[str, str], None]]:
  """The modules ``where`` selects, as (path, module) in ``nnx.iter_graph`` order."""
  is_match = _module_matcher(where, fn_name)
  seen: dict[tuple[str, str], None] = {}
  chosen = []
  for parts, node in nnx.iter_graph(model):
    if not (isinstance(node, nnx.Module) and has_call(type(node))):
      continue
    seen[(type(node).__name__, _joined(parts))] = None
    if is_match(node, parts):
      chosen.append((_joined(parts), node))
  return chosen, seen


def _set_class(module: nnx.Module, cls: type) -> None:
  # Module.__setattr__ would record "__class__" as an attribute of the graph.
  object.__setattr__(module, "__class__", cls)


def insert(
  model: M,
  *,
  where: Where,
  position: Position = "after",
  every: int = 1,
  **bgn_options: Any,
) -> M:
  """Adds BGN nodes after (or before) the selected modules of an nnx model, in place.

  Follows the nnx surgery convention: the model is edited in place and returned
  (the same object). Each selected module's class is swapped for a subclass
  (named ``<Class>WithBGN``) whose ``__call__`` applies :func:`bgn_jax.bgn` to
  the floating-point ``jax.Array`` leaves of the output (``position="after"``)
  or of the positional arguments (``"before"``). Nothing else changes: the
  model's Variables, state paths and plain attributes are the same objects, so
  ``model.eval()``/``model.train()``, an ``nnx.Optimizer``, checkpoints and
  Variables that ``__call__`` assigns behave exactly as in the same model with
  the nodes written by hand. Other methods are unchanged, and ``isinstance``
  checks still hold. :func:`remove` undoes it.

  A leaf that is one of the module's own Variables, or a value of one (a
  parameter passed through unchanged), never gets a node. A call of the model
  whose selected modules had no floating-point leaf to normalize raises
  ValueError listing them, as does one in which none of them ran while no
  earlier call placed a node. :func:`placements` shows where the nodes went.

  Inserting again with the same ``position`` and options leaves the modules
  that already have a node as they are (a second call is a no-op); other
  options on a module that has a node are a ValueError. A module referenced at
  two paths is one module and gets one node, applied at each call; and since
  the edit is in place, every model that shares a selected submodule gets its
  node. The model's class is swapped too (``<Class>WithBGNCheck``): each call
  of the whole model checks that it placed a node.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    model: an ``nnx.Module``.
    where: an nnx Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; a regular expression (``str`` or compiled), searched in
      the attribute path joined with "/" (``r"layers/\\d+$"``; the model itself
      has the path ``""``); or an nnx filter (``nnx.OfType``,
      ``nnx.PathContains``, ``nnx.All``, ``nnx.Not``, ...), which gets the
      path as a tuple of keys, so type and path combine:
      ``nnx.All(nnx.OfType(nnx.Linear), nnx.PathContains("decoder"))``. Only
      modules that define ``__call__`` are tested (``nnx.List`` and ``nnx.Dict``
      containers are not).
    position: ``"after"`` the module's output, or ``"before"`` its positional
      inputs.
    every: keep every ``every``-th match, starting with the first
      (``matches[::every]``), in the order of ``nnx.iter_graph``: attributes
      sorted by name, list items by index, submodules before their parent.
    **bgn_options: ``axes``, ``target_norm``, ``power``, ``eps``, ``axis_name``,
      passed to :func:`bgn_jax.bgn` for every node.

  Returns:
    ``model`` itself, with the nodes.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``, ``where``, ``position``,
      ``every`` or a BGN option has the wrong type, or an option name is unknown.
    ValueError: an argument is out of range, ``where`` is not a valid regular
      expression, ``where`` matches no module, a selected module already has a
      node with other options, or ``model`` is traced by an nnx transform (insert
      before ``nnx.jit``). Later, from a call of the model: the call placed no
      node (its matches had nothing to normalize, or none of them ran and no
      earlier call placed one).
  """
  _check_model(model, "bgn_jax.nnx.insert")
  _check_outside_transforms(model, "bgn_jax.nnx.insert")
  options = tuple(sorted(check_options("bgn_jax.nnx.insert", position, every, bgn_options).items()))
  chosen, seen = _selected(model, where, "bgn_jax.nnx.insert")
  if not chosen:
    raise ValueError(no_match_message("bgn_jax.nnx.insert", where, seen, "module"))
  chosen = chosen[::every]
  insertion = Insertion("nnx", where, position, int(every), options)
  asked = ("bgn", position, options)
  for path, module in chosen:
    existing = _marker(type(module), "bgn")
    if existing is not None and existing[:3] != asked:
      raise ValueError(
        f"bgn_jax.nnx.insert: the module at {path!r} ({unmarked_class(type(module)).__name__}) "
        f"already has a BGN node with {options_text(existing[:3])}; asked now: "
        f"{options_text(asked)}. Call bgn_jax.nnx.remove(model) first to replace the nodes."
      )
  for path, module in chosen:
    if _marker(type(module), "bgn") is None:
      _set_class(module, _with_bgn(type(module), (*asked, (path, insertion))))
  if ("root", insertion) not in markers_of(type(model)):
    _set_class(model, _with_check(type(model), insertion))
  return model


def _check_model(model: Any, fn_name: str) -> None:
  check_framework(fn_name, "model", model, "nnx")
  if not isinstance(model, nnx.Module):
    raise TypeError(f"{fn_name}: `model` must be an nnx.Module; got {type(model).__name__}.")


def _check_outside_transforms(model: nnx.Module, fn_name: str) -> None:
  """Refuses a model traced by an nnx transform: its class swaps would not reach the
  model outside (the transform rebuilds it from its graph definition)."""
  traced = any(
    isinstance(node, nnx.Variable) and isinstance(node.get_value(), Tracer)
    for _, node in nnx.iter_graph(model)
  )
  if traced:
    raise ValueError(
      f"{fn_name}: `model` is traced by a transform (nnx.jit, nnx.grad, ...): a node "
      f"added to the copy the transform made would not reach the model outside it. Call "
      f"{fn_name.rsplit('.', 1)[-1]} on the model before the transform (once, outside "
      f"the train step)."
    )


def remove(model: M) -> M:
  """Removes the BGN nodes that :func:`insert` added to an nnx model, in place.

  The selected modules, and the model, get their original classes back; the
  model, its state and its Variables are left as they are. A model without
  nodes is returned unchanged.

  Args:
    model: an ``nnx.Module``.

  Returns:
    ``model`` itself, without the nodes.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: ``model`` is traced by an nnx transform.
  """
  _check_model(model, "bgn_jax.nnx.remove")
  _check_outside_transforms(model, "bgn_jax.nnx.remove")
  for _, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module) and marker_of(type(node)) is not None:
      _set_class(node, unmarked_class(type(node)))
  return model


def _inserted(model: nnx.Module) -> bool:
  return any(
    isinstance(node, nnx.Module) and _marker(type(node), "bgn") is not None
    for _, node in nnx.iter_graph(model)
  )


def _is_graph_node(x: Any) -> bool:
  return isinstance(x, (nnx.Pytree, nnx.Variable))


def _split_arguments(args: Any, kwargs: Any) -> tuple[list[Any], Callable[[list[Any]], Any]]:
  """The arrays and nnx objects (an ``nnx.Rngs``) of ``(args, kwargs)``, which an nnx
  transform must be given as arguments, and how to put them back among the other
  leaves (Python flags stay static)."""
  leaves, treedef = jax.tree.flatten((args, kwargs), is_leaf=_is_graph_node)
  dynamic = [_is_graph_node(leaf) or isinstance(leaf, jax.Array) for leaf in leaves]

  def rebuild(given: list[Any]) -> Any:
    it = iter(given)
    return jax.tree.unflatten(
      treedef, [next(it) if d else leaf for leaf, d in zip(leaves, dynamic, strict=True)]
    )

  return [leaf for leaf, d in zip(leaves, dynamic, strict=True) if d], rebuild


def placements(model: nnx.Module, *args: Any, **kwargs: Any) -> Placements:
  """Where the BGN nodes of an inserted nnx model go in ``model(*args, **kwargs)``.

  Traces the call abstractly (``nnx.eval_shape``: no FLOPs, the model's state
  is not changed) and lists one record per leaf of each call of a module with a
  node, in call order: the leaves that get a node, and those skipped with the
  reason (not floating-point, not an array, a variable of the module passed
  through). ``count`` says how many times a row's node is applied in the call
  (a scan's body runs once per step here); inside ``nnx.scan``/``nnx.vmap`` the
  shapes are those one call sees. ``str()`` of the result is a table.

  Args:
    model: a model returned by :func:`insert`.
    *args: positional arguments of the model's ``__call__``: arrays and nnx
      objects (an ``nnx.Rngs``) are traced, other values (flags) stay static.
    **kwargs: keyword arguments of the model's ``__call__``.

  Returns:
    A :class:`bgn_jax.Placements` list of ``Placement`` records.

  Raises:
    TypeError: ``model`` is not an ``nnx.Module``.
    ValueError: ``model`` has no BGN node, or the call placed none (none of its
      selected modules ran, or had a floating-point leaf to normalize).
  """
  _check_model(model, "bgn_jax.nnx.placements")
  if not _inserted(model):
    raise ValueError(
      "bgn_jax.nnx.placements: `model` has no BGN node; add them with "
      "bgn_jax.nnx.insert(model, where=...) first."
    )
  dynamic, rebuild = _split_arguments(args, kwargs)

  def call(m: nnx.Module, *given: Any) -> Any:
    call_args, call_kwargs = rebuild(list(given))
    return m(*call_args, **call_kwargs)

  with recording() as recorder:
    nnx.eval_shape(call, model, *dynamic)
  return recorder.placements()


# grad_norms ----------------------------------------------------------------------------

Report = dict[str, dict[str, jax.Array]]


class GradProbe(nnx.Variable):
  """The tap (``_common.TAP_SHAPE`` zeros) that :func:`grad_norms` puts on a call."""


@dataclasses.dataclass
class _ProbedCall:
  """One call of a probed module, as the shape pass saw it."""

  path: str
  name: str  # the attribute of its GradProbe tap
  params_ndims: tuple[int, ...]  # rank of each Param leaf of the module in one call
  at_bgn: bool = False  # a BGN node got the output, or sits on the inputs
  tapped: bool = False  # the call has a tap (a floating-point output, or at_bgn)


_CallKey = tuple[str, str]  # (path, probe name) of one call


@dataclasses.dataclass
class _Pass(Hook):
  discover: bool
  calls: list[_ProbedCall] = dataclasses.field(default_factory=list)
  counts: dict[str, int] = dataclasses.field(default_factory=dict)
  # Probed outputs by id, with their call's module and (path, probe name), so that a
  # BGN layer fed one is recognised; and the calls whose at_bgn probes are placed.
  tagged: dict[int, tuple[Any, nnx.Module, _CallKey]] = dataclasses.field(default_factory=dict)
  at_bgn: set[_CallKey] = dataclasses.field(default_factory=set)
  found: dict[_CallKey, _ProbedCall] = dataclasses.field(default_factory=dict)
  # The calls not yet returned whose inputs got a node (and its at_bgn tap).
  inputs_at_bgn: set[_CallKey] = dataclasses.field(default_factory=set)

  def node_applied(
    self, inputs: Any, outputs: Any, module: Any = None, position: str = "after"
  ) -> Any:
    if position == "before" and module is not None and _marker(type(module), "probe"):
      # A node on the inputs of a probed call: the gradient it receives is the
      # call's "at_bgn"; the call's key is the one its output will take.
      path = _probe_path(module)
      key = (path, f"grad_norms_{self.counts.get(path, 0)}")
      self.at_bgn.add(key)
      outputs, tapped = _tapped(self, module, outputs, key[1], TAP_AT_BGN, _variable_values(module))
      if tapped:
        self.inputs_at_bgn.add(key)
      return outputs
    return _probe_bgn_layer(self, inputs, outputs)


_PASS: contextvars.ContextVar[_Pass | None] = contextvars.ContextVar(
  "bgn_jax_nnx_grad_norms", default=None
)


def _param_leaves(module: nnx.Module) -> list[jax.Array]:
  return jax.tree.leaves(nnx.state(module, nnx.Param))


def _tapped(
  current: _Pass, owner: nnx.Module, tree: Any, name: str, row: int, owned: set[int]
) -> tuple[Any, bool]:
  """``tree`` with row ``row`` of ``owner``'s tap ``name`` (a GradProbe, made in the
  shape pass) on its floating-point leaves, and whether it has any."""
  _, leaves, reasons, treedef = classify(tree, _owned(owned), is_leaf=_is_variable)
  chosen = [i for i, reason in enumerate(reasons) if reason is None]
  if not chosen:
    return tree, False
  if current.discover and getattr(owner, name, None) is None:
    dtype = jnp.result_type(*[leaves[i] for i in chosen], jnp.float32)
    setattr(owner, name, GradProbe(jnp.zeros(TAP_SHAPE, dtype)))
  probe = getattr(owner, name, None)
  if probe is None:  # a trace whose variables the transform discarded
    return tree, True
  return with_tap(leaves, treedef, chosen, probe[...][row]), True


def _probe_output(
  current: _Pass, module: nnx.Module, outputs: Any, owned: set[int]
) -> tuple[Any, _CallKey]:
  """The module's output with its "output" probes; the key of this call."""
  path = _probe_path(module)
  index = current.counts.get(path, 0)
  current.counts[path] = index + 1
  name = f"grad_norms_{index}"
  params_ndims = tuple(jnp.ndim(p) for p in _param_leaves(module))
  outputs, tapped = _tapped(current, module, outputs, name, TAP_OUTPUT, owned)
  key = (path, name)
  if current.discover:
    at_bgn = key in current.inputs_at_bgn
    current.inputs_at_bgn.discard(key)
    current.calls.append(_ProbedCall(path, name, params_ndims, at_bgn, tapped or at_bgn))
    current.found[key] = current.calls[-1]
  if tapped:
    current.tagged[id(outputs)] = (outputs, module, key)
  return outputs, key


def _probe_at_bgn(
  current: _Pass, owner: nnx.Module, key: _CallKey, normalized: Any, owned: set[int]
) -> Any:
  """A BGN node's output with the "at_bgn" probes of the call ``key`` (on ``owner``)."""
  current.at_bgn.add(key)
  normalized, tapped = _tapped(current, owner, normalized, key[1], TAP_AT_BGN, owned)
  if current.discover and tapped:
    current.found[key].at_bgn = current.found[key].tapped = True
  return normalized


def _probe_bgn_layer(current: _Pass, x: Any, y: Any) -> Any:
  """``y = BGN()(x)``, with the at_bgn probes where ``x`` is a probed output."""
  tagged = current.tagged.get(id(x))
  if tagged is None or tagged[0] is not x or tagged[2] in current.at_bgn:
    return y
  _, owner, key = tagged
  return _probe_at_bgn(current, owner, key, y, _variable_values(owner))


def _probe_path(module: nnx.Module) -> str:
  marker = _marker(type(module), "probe")
  return "" if marker is None else marker[1]


def _with_probe(cls: type, path: str) -> type:
  """``cls`` with grad_norms's tap on the output, under any node of insert.

  The probe sits below the classes insert made (rebuilt on top of it), so that
  "output" is taken before the node and "at_bgn" after it, through the hook.
  """
  markers = markers_of(cls)
  original = unmarked_class(cls)

  def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    owned = _variable_values(self)
    outputs = original.__call__(self, *args, **kwargs)
    current = _PASS.get()
    return outputs if current is None else _probe_output(current, self, outputs, owned)[0]

  rebuilt = _subclass(original, ("probe", path), __call__, f"{original.__name__}, probed.")
  for marker in reversed(markers):
    if marker[0] == "bgn":
      rebuilt = _with_bgn(rebuilt, marker)
    elif marker[0] == "root":
      rebuilt = _with_check(rebuilt, marker[1])
  return rebuilt


@contextlib.contextmanager
def _in_pass(current: _Pass) -> Iterator[_Pass]:
  token = _PASS.set(current)
  try:
    with listening(current):
      yield current
  finally:
    _PASS.reset(token)


def _state_at(state: Any, parts: tuple[Any, ...]) -> Any:
  for part in parts:
    if part not in state:
      return None
    state = state[part]
  return state


def _leading(stacked: list[int], per_call: tuple[int, ...], what: str, path: str) -> tuple:
  lead = tuple(s - c for s, c in zip(stacked, per_call, strict=True))
  if any(n < 0 for n in lead):
    raise ValueError(
      f"bgn_jax.nnx.grad_norms: the {what} of {path!r} have lower rank outside the module "
      f"call than in it; a transform around it changes their shapes in a way grad_norms "
      f"cannot read."
    )
  return lead


@functools.partial(jax.jit, static_argnums=(2,))
def _report_norms(grad_params: Any, grad_probes: Any, plan: tuple[Any, ...]) -> list:
  flats, lead_shapes, taps = [], [], []
  for probe_key, module_parts, params_lead, lead_shape in plan:
    params = jax.tree.leaves(_state_at(grad_params, module_parts) or {})
    flats.append(flatten_leaves(params, params_lead))
    lead_shapes.append(lead_shape)
    taps.append(None if probe_key is None else _state_at(grad_probes, probe_key))
  norms = []
  for tap, param, lead_shape in zip(
    taps, group_norms(flats, lead_shapes), lead_shapes, strict=True
  ):
    zeros = jnp.zeros(lead_shape, jnp.float32)
    output = zeros if tap is None else tap_norm(tap[..., TAP_OUTPUT, :])
    at_bgn = zeros if tap is None else tap_norm(tap[..., TAP_AT_BGN, :])
    norms.append((output, param, at_bgn))
  return norms


def grad_norms(loss_fn: Callable[..., jax.Array], *, where: Where) -> Callable[..., Report]:
  """Norms of the gradient at the output and at the parameters of selected module calls.

  The nnx version of :func:`bgn_jax.linen.grad_norms`. On a copy of the model
  (``nnx.clone``: new Variable objects holding the same arrays), a tap (a
  :class:`GradProbe` Variable of a few zeros, whose gradient is the squared norm
  of the gradient at the leaves it rides on) is put on the floating-point leaves
  of the output of every call of a selected module, and one ``nnx.grad`` with
  respect to the ``nnx.Param`` Variables and the taps gives both kinds of
  gradient. The taps come from an abstract pass (``nnx.eval_shape``), so the arithmetic is one
  forward and one backward pass. ``model`` is not modified: the state updates of
  the pass (BatchNorm statistics, RNG counts, Variables assigned in
  ``__call__``) are discarded, as in the linen version. Works under ``nnx.jit``
  and ``jax.jit`` (``nnx.merge`` inside), with ``loss_fn`` and ``where`` static.

  "output" is always the norm of the gradient of the loss with respect to the
  module's output, the tensor its ``__call__`` computed, over all its consumers
  (a residual path included). Where a BGN node sits directly on that output (a
  node of :func:`insert` after the module, or a :class:`BGN` layer fed the output
  itself, as an attribute or made inside ``__call__``), "at_bgn" is the raw
  gradient arriving at the node, before it normalizes it. With the node as the
  only consumer, "output" is then the normalized gradient and "at_bgn" the one
  the layers above sent, as in the linen version. A bare :func:`bgn_jax.bgn`
  call, a node placed ``position="before"`` the next module, or a BGN layer fed
  a value computed from the output is not seen as a node: no "at_bgn" there. A
  node that :func:`insert` puts ``position="before"`` a selected module reports,
  as that module's "at_bgn", the gradient it receives (at the module's inputs).
  "params" is the norm of the gradient of the module's ``nnx.Param`` Variables
  (its submodules' included), summed over its calls.

  Keys are the "/"-joined attribute paths (``"layers/3"``,
  ``"blocks/linear"``), in call order; the result is an ``OrderedDict``. A
  module called several times gets one entry per call: ``"linear"``,
  ``"linear#1"``. A module in an ``nnx.vmap``-made stack run by ``nnx.scan``
  (or ``nnx.vmap``) gets arrays with a leading axis per transform, one value
  per layer, as do its "params" when they are stacked. Norms use
  :func:`bgn_jax.core.l2_norm`.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``, ``model`` an
      ``nnx.Module`` with or without BGN nodes; nnx objects among the arguments
      (an ``nnx.Rngs``) are passed through the passes' transforms.
    where: as in :func:`insert`: a Module class or tuple of classes, a
      predicate ``module -> bool``, a regular expression on the "/"-joined
      path, or an nnx filter.

  Returns:
    A function of ``loss_fn``'s arguments, as ``jax.grad`` returns one, that
    returns ``{path: {"output": norm, "params": norm}}``, plus ``"at_bgn": norm`` where
    a BGN node sits on the output; float32 (float64 for float64 gradients). A
    module without parameters has "params" zero, a call without floating-point
    output has "output" zero.

  Raises:
    TypeError: ``loss_fn`` is not callable, or ``where`` is of none of the
      accepted forms; from the returned function: ``model`` is not an
      ``nnx.Module``.
    ValueError: from the returned function: ``where`` matches no module, or no
      selected module is called.
  """
  if not callable(loss_fn):
    raise TypeError(
      f"bgn_jax.nnx.grad_norms: `loss_fn` must be callable; got {type(loss_fn).__name__}."
    )
  _module_matcher(where, "bgn_jax.nnx.grad_norms")  # checks the form of `where` now

  @functools.wraps(loss_fn)
  def measure(model: nnx.Module, *args: Any, **kwargs: Any) -> Report:
    _check_model(model, "bgn_jax.nnx.grad_norms")
    return _measure(loss_fn, where, model, args, kwargs)

  return measure


def _measure(
  loss_fn: Callable[..., jax.Array],
  where: Where,
  model: nnx.Module,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Report:
  # A new graph with new Variables holding the same arrays (nnx.merge alone would
  # reuse the Variable objects): the pass's state updates stay in the copy.
  work = nnx.clone(model)
  chosen, seen = _selected(work, where, "bgn_jax.nnx.grad_norms")
  if not chosen:
    raise ValueError(no_match_message("bgn_jax.nnx.grad_norms", where, seen, "module"))
  module_parts = {}
  for parts, node in nnx.iter_graph(work):
    if isinstance(node, nnx.Module):
      module_parts.setdefault(_joined(parts), parts)
  for path, module in chosen:
    _set_class(module, _with_probe(type(module), path))
  # nnx objects among the arguments (an nnx.Rngs) go through the transforms as
  # arguments: closed over, their state would be changed from inside a trace.
  dynamic, rebuild = _split_arguments(args, kwargs)

  def call_loss(work: nnx.Module, given: list[Any]) -> jax.Array:
    call_args, call_kwargs = rebuild(given)
    return loss_fn(work, *call_args, **call_kwargs)

  def discover(work: nnx.Module, *given: Any) -> nnx.Module:
    call_loss(work, list(given))
    return work

  with _in_pass(_Pass(discover=True)) as shapes_pass:
    abstract = nnx.eval_shape(discover, work, *dynamic)
  probe_shapes = nnx.state(abstract, GradProbe)
  calls = []
  for call in shapes_pass.calls:
    parts = module_parts[call.path]
    shape = _state_at(probe_shapes, parts + (call.name,))
    if shape is None and call.tapped:
      continue  # a trace whose variables the transform discarded
    calls.append((call, parts, None if shape is None else shape.shape))
  if not calls:
    raise ValueError(
      f"bgn_jax.nnx.grad_norms: `where` {where!r} selected "
      f"{', '.join(repr(p) for p, _ in chosen[:SEEN_LISTED])}, but loss_fn called none "
      f"of them."
    )
  nnx.update(work, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), probe_shapes))

  def loss_of(work: nnx.Module, *given: Any) -> jax.Array:
    with _in_pass(_Pass(discover=False)):
      return call_loss(work, list(given))

  grads = nnx.grad(loss_of, argnums=nnx.DiffState(0, (nnx.Param, GradProbe)))(work, *dynamic)
  grad_params = nnx.state(grads, nnx.Param)
  grad_probes = nnx.state(grads, GradProbe)
  params = nnx.state(work, nnx.Param)
  plan = []
  for call, parts, shape in calls:
    lead_shape = () if shape is None else tuple(shape[: len(shape) - len(TAP_SHAPE)])
    stacked = [jnp.ndim(p) for p in jax.tree.leaves(_state_at(params, parts) or {})]
    params_lead = _leading(stacked, call.params_ndims, "parameters", call.path)
    if len(set(params_lead)) > 1 or (params_lead and params_lead[0] != len(lead_shape)):
      params_lead = (0,) * len(params_lead)  # shared and stacked mixed: one norm
    probe_key = None if shape is None else parts + (call.name,)
    plan.append((probe_key, parts, params_lead, lead_shape))
  norms = _report_norms(nnx.to_pure_dict(grad_params), nnx.to_pure_dict(grad_probes), tuple(plan))
  counts: dict[str, int] = {}
  report = collections.OrderedDict()
  for (call, _, shape), (output, param, raw) in zip(calls, norms, strict=True):
    index = counts.get(call.path, 0)
    counts[call.path] = index + 1
    key = call.path if index == 0 else f"{call.path}#{index}"
    report[key] = {"output": output, "params": param}
    if call.at_bgn and shape is not None:
      report[key]["at_bgn"] = raw
  return report
