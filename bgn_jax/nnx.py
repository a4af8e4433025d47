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

import functools
from collections.abc import Callable
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
from flax import nnx
from flax.nnx import filterlib
from jax.core import Tracer

from bgn_jax import _common
from bgn_jax._common import Insertion, Placements, Position, Report, Where
from bgn_jax.core import Axes, AxisName, TargetNorm

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
    self.axes = tuple(axes) if isinstance(axes, list) else axes
    self.target_norm: TargetNorm = target_norm
    self.power = power
    self.eps = eps
    self.axis_name = axis_name
    _common.check_layer("bgn_jax.nnx.BGN", self)

  def __call__(self, x: jax.Array) -> jax.Array:
    return _common.layer_bgn(self, x)


M = TypeVar("M", bound=nnx.Module)

# A subclass made here is marked with a class attribute: ("bgn", position, options,
# (path, insertion)) for a module with a node, ("root", insertion) for the model insert
# was given, ("probe", path) for a module grad_norms measures. Everything a node needs is
# in its class, so nothing is added to the instance, whose attributes some modules read
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
  return _common.marked_subclass(cls, marker, f"{cls.__name__}{suffix}", namespace, keywords)


def _is_variable(x: Any) -> bool:
  return isinstance(x, nnx.Variable)


def _owned(module: nnx.Module) -> _common.Owned:
  """Which leaves are the module's Variables or their values (a returned parameter).

  Taken as the call begins: a value the call stores in a Variable is an output it
  computed, not a variable passed through.
  """
  values = {
    id(node.get_value()) for _, node in nnx.iter_graph(module) if isinstance(node, nnx.Variable)
  }
  reason = "a variable of the module, passed through"
  return lambda leaf: reason if _is_variable(leaf) or id(leaf) in values else None


def _node_marker(module: nnx.Module) -> tuple[Any, ...] | None:
  return _common.first_marker(type(module), "bgn")


def _site(module: nnx.Module) -> tuple[Insertion, str]:
  path, insertion = cast(tuple, _common.first_marker(type(module), "bgn"))[3]
  return insertion, path


def _with_bgn(cls: type, marker: tuple[Any, ...]) -> type:
  """The subclass of ``cls`` whose ``__call__`` adds the BGN node."""
  call = _common.node_call(cls, _site, _owned, _is_variable)
  doc = f"{cls.__name__} with a BGN node {marker[1]} its __call__ ({dict(marker[2])})."
  return _subclass(cls, marker, call, doc)


def _with_check(cls: type, insertion: Insertion) -> type:
  """The subclass of the model's class whose ``__call__`` checks that a node was placed."""
  doc = f"{cls.__name__}, checking that its call placed a BGN node."
  return _subclass(cls, ("root", insertion), _common.checked_call(cls, insertion), doc)


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
  is_match = _common.matcher(where, fn_name=fn_name, module_type=nnx.Module)
  return lambda module, parts: is_match(module, _joined(parts))


def _joined(parts: tuple[Any, ...]) -> str:
  return "/".join(str(part) for part in parts)


def _modules(model: nnx.Module) -> dict[str, tuple[tuple[Any, ...], nnx.Module]]:
  """The model's modules by "/"-joined path, with the path's parts, in ``nnx.iter_graph``
  order (attributes sorted by name, list items by index, submodules before their parent)."""
  found: dict[str, tuple[tuple[Any, ...], nnx.Module]] = {}
  for parts, node in nnx.iter_graph(model):
    if isinstance(node, nnx.Module):
      found.setdefault(_joined(parts), (parts, node))
  return found


def _walk(
  modules: dict[str, tuple[tuple[Any, ...], nnx.Module]], where: Where, fn_name: str
) -> tuple[list[tuple[str, nnx.Module]], Callable[[Any, str], bool]]:
  """The (path, module) pairs of ``modules``, and ``where`` as a test of them."""
  is_match = _module_matcher(where, fn_name)
  pairs = [(path, module) for path, (_, module) in modules.items()]
  return pairs, lambda module, path: is_match(module, modules[path][0])


def _set_class(module: nnx.Module, cls: type) -> None:
  # Module.__setattr__ would record "__class__" as an attribute of the graph.
  object.__setattr__(module, "__class__", cls)


def _check_model(model: Any, fn_name: str) -> None:
  _common.check_model(fn_name, model, "nnx", nnx.Module, "an nnx.Module")


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
  fn_name = "bgn_jax.nnx.insert"
  _check_model(model, fn_name)
  _check_outside_transforms(model, fn_name)
  insertion = Insertion("nnx", where, position, every, bgn_options)
  added = insertion.new_nodes(*_walk(_modules(model), where, fn_name), _node_marker)
  for path, module in added:
    _set_class(module, _with_bgn(type(module), (*insertion.node_marker, (path, insertion))))
  if ("root", insertion) not in _common.markers_of(type(model)):
    _set_class(model, _with_check(type(model), insertion))
  return model


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
    if isinstance(node, nnx.Module) and _common.marker_of(type(node)) is not None:
      _set_class(node, _common.unmarked_class(type(node)))
  return model


def _is_graph_node(x: Any) -> bool:
  return isinstance(x, (nnx.Pytree, nnx.Variable))


def _split_arguments(args: Any, kwargs: Any) -> tuple[list[Any], Callable[..., Any]]:
  """The arrays and nnx objects (an ``nnx.Rngs``) of ``(args, kwargs)``, which an nnx
  transform must be given as arguments, and ``rebuild(*given) -> (args, kwargs)``."""
  return _common.split_arguments(
    args, kwargs, lambda leaf: _is_graph_node(leaf) or isinstance(leaf, jax.Array), _is_graph_node
  )


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
  fn_name = "bgn_jax.nnx.placements"
  _check_model(model, fn_name)
  if not any(_node_marker(module) for _, module in _modules(model).values()):
    raise ValueError(_common.no_nodes_message(fn_name, "model", model))
  dynamic, rebuild = _split_arguments(args, kwargs)

  def call(m: nnx.Module, *given: Any) -> Any:
    call_args, call_kwargs = rebuild(*given)
    return m(*call_args, **call_kwargs)

  with _common.recording() as recorder:
    nnx.eval_shape(call, model, *dynamic)
  return recorder.placements()


# grad_norms ----------------------------------------------------------------------------


class GradProbe(nnx.Variable):
  """The tap (``_common.TAP_SHAPE`` zeros) that :func:`grad_norms` puts on a call."""


def _tap_name(index: int) -> str:
  """The name of the tap of a module's ``index``-th call, where the probe makes it and
  where the report reads it."""
  return f"grad_norms_{index}"


class _Pass(_common.TapPass):
  """A pass of :func:`grad_norms`: a call's tap is a :class:`GradProbe` attribute of its
  module, made in the shape pass; a stack of modules made by ``nnx.vmap`` stacks them."""

  is_leaf = staticmethod(_is_variable)

  def path_of(self, module: Any) -> str | None:
    marker = _common.first_marker(type(module), "probe")
    return None if marker is None else marker[1]

  def params_of(self, module: Any) -> list[Any]:
    return jax.tree.leaves(nnx.state(module, nnx.Param))

  def owned_of(self, module: Any) -> _common.Owned:
    return _owned(module)

  def tap_of(self, module: Any, path: str, index: int, dtype: Any) -> jax.Array | None:
    name = _tap_name(index)
    if self.discover and getattr(module, name, None) is None:
      setattr(module, name, GradProbe(jnp.zeros(_common.TAP_SHAPE, dtype)))
    probe = getattr(module, name, None)
    return None if probe is None else probe[...]  # None: a trace the transform discarded


def _with_probe(cls: type, path: str) -> type:
  """``cls`` with grad_norms's tap on the output, under any node of insert.

  The probe sits below the classes insert made (rebuilt on top of it), so that
  "output" is taken before the node and "at_bgn" after it, through the hook.
  """
  markers = _common.markers_of(cls)
  original = _common.unmarked_class(cls)

  def __call__(self: nnx.Module, *args: Any, **kwargs: Any) -> Any:
    current = _common.current_hook()
    if not isinstance(current, _Pass):
      return original.__call__(self, *args, **kwargs)
    return current.probed(self, original.__call__, *args, **kwargs)

  rebuilt = _subclass(original, ("probe", path), __call__, f"{original.__name__}, probed.")
  for marker in reversed(markers):
    if marker[0] == "bgn":
      rebuilt = _with_bgn(rebuilt, marker)
    elif marker[0] == "root":
      rebuilt = _with_check(rebuilt, marker[1])
  return rebuilt


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
  fn_name = "bgn_jax.nnx.grad_norms"
  _module_matcher(where, fn_name)  # checks the form of `where` now
  measure = functools.partial(_measure, loss_fn, where)
  return _common.measuring(fn_name, loss_fn, lambda model: _check_model(model, fn_name), measure)


def _measure(
  loss_fn: Callable[..., jax.Array],
  where: Where,
  model: nnx.Module,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Report:
  fn_name = "bgn_jax.nnx.grad_norms"
  # A new graph with new Variables holding the same arrays (nnx.merge alone would
  # reuse the Variable objects): the pass's state updates stay in the copy.
  work = nnx.clone(model)
  modules = _modules(work)
  chosen = _common.select(fn_name, where, *_walk(modules, where, fn_name))
  for path, module in chosen:
    _set_class(module, _with_probe(type(module), path))
  # nnx objects among the arguments (an nnx.Rngs) go through the transforms as
  # arguments: closed over, their state would be changed from inside a trace.
  dynamic, rebuild = _split_arguments(args, kwargs)

  def call_loss(work: nnx.Module, given: tuple[Any, ...]) -> jax.Array:
    call_args, call_kwargs = rebuild(*given)
    return loss_fn(work, *call_args, **call_kwargs)

  def discover(work: nnx.Module, *given: Any) -> nnx.Module:
    call_loss(work, given)
    return work

  with _common.listening(_Pass(discover=True)) as shape_pass:
    abstract = nnx.eval_shape(discover, work, *dynamic)
  tap_shapes = nnx.state(abstract, GradProbe)

  def at(tree: Any, call: _common.TapCall, tap: bool) -> Any:
    parts = modules[call.path][0]
    return _common.get_path(tree, parts + ((_tap_name(call.index),) if tap else ()))

  # A call whose tap is not in the state came from a trace the transform discarded.
  calls = [c for c in shape_pass.calls if c.dtype is None or at(tap_shapes, c, True) is not None]
  if not calls:
    raise ValueError(_common.none_called_message(fn_name, where, [p for p, _ in chosen]))
  nnx.update(work, jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tap_shapes))

  def loss_of(work: nnx.Module, *given: Any) -> jax.Array:
    with _common.listening(_Pass(discover=False)):
      return call_loss(work, given)

  grads = nnx.grad(loss_of, argnums=nnx.DiffState(0, (nnx.Param, GradProbe)))(work, *dynamic)
  return _common.read_report(
    fn_name,
    calls,
    at,
    tap_shapes,
    nnx.state(work, nnx.Param),
    nnx.to_pure_dict(nnx.state(grads, nnx.Param)),
    nnx.to_pure_dict(nnx.state(grads, GradProbe)),
  )
