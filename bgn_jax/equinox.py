"""BGN for ``equinox``: the layer, :func:`insert`, :func:`placements` and :func:`grad_norms`.

Equinox models are written per example and batched with ``jax.vmap``, so here
the default target is ``"sqrt_size"``, the square root of the whole size of the
array the node sees (one example), and each example is normalized on its own.
The whole-batch reading of the paper is ``axis_name="batch"`` with
``jax.vmap(..., axis_name="batch")`` (or ``eqx.filter_vmap``).

:func:`insert` swaps the class of each selected submodule for a subclass (named
``<Class>WithBGN``) whose ``__call__`` adds the node; the array leaves, their
order and their attribute paths stay those of the original model.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Collection, Sequence
from typing import Any, TypeVar, cast

import jax
import jax.numpy as jnp
import numpy as np
from jax.tree_util import keystr

try:
  import equinox as eqx
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
  raise ImportError(
    'bgn_jax.equinox needs equinox, an optional extra: pip install "bgn_jax[equinox]".'
  ) from err

from bgn_jax import _common
from bgn_jax._common import TAP_SHAPE, Insertion, Placements, Position, Report, Where
from bgn_jax.core import Axes, AxisName, TargetNorm

__all__ = ["BGN", "grad_norms", "insert", "placements", "remove"]

M = TypeVar("M", bound=eqx.Module)

DEFAULT_TARGET = "sqrt_size"


def _axes_tuple(axes: Axes) -> Axes:
  return tuple(axes) if isinstance(axes, list) else axes


class BGN(eqx.Module):
  """Backward Gradient Normalization layer for equinox (no parameters, no state).

  The identity forward; backward, :func:`bgn_jax.bgn`'s rescale of the gradient.
  Written for one example, as equinox models are: under ``jax.vmap`` each example
  is normalized on its own, unless ``axis_name`` names the vmapped axis, which
  makes one group of the whole batch.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Attributes:
    axes: None for one group over the whole (per-example) array, or the axes of
      each group.
    target_norm: a positive float, ``"sqrt_size"`` (the default: the square root
      of the size of the array the node sees) or ``"sqrt_units"``.
    power: c in [0, 1].
    eps: floor on the norm, >= 0.
    axis_name: mapped axis name(s) over which the squared norm is summed, e.g.
      ``"batch"`` with ``jax.vmap(model, axis_name="batch")``.
  """

  axes: Axes = eqx.field(static=True, default=None, converter=_axes_tuple)
  target_norm: TargetNorm = eqx.field(static=True, default=DEFAULT_TARGET)
  power: float = eqx.field(static=True, default=1.0)
  eps: float = eqx.field(static=True, default=0.0)
  axis_name: AxisName = eqx.field(static=True, default=None)

  def __check_init__(self) -> None:
    _common.check_layer("bgn_jax.equinox.BGN", self)

  def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
    """Applies the node; ``key`` is accepted (and unused) for ``eqx.nn.Sequential``."""
    return _common.layer_bgn(self, x)


# ---------------------------------------------------------------------------
# Walking a model's modules.


def _map_modules(
  fn: Callable[[str, eqx.Module], Any], tree: Any, path: tuple[str, ...] = ()
) -> Any:
  """Rebuilds ``tree`` with ``fn(path, module)`` for every module, submodules first.

  Modules are found through the pytree structure (dynamic fields, and the lists,
  tuples and dicts in them), in flattening order; the paths are the attribute
  names and indices joined with "/". Array leaves are kept as the same objects.
  """
  root = tree

  def is_submodule(node: Any) -> bool:
    return node is not root and isinstance(node, eqx.Module)

  flat, treedef = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_submodule)
  leaves = [
    _map_modules(fn, leaf, (*path, keystr(keys, simple=True, separator="/")))
    if is_submodule(leaf)
    else leaf
    for keys, leaf in flat
  ]
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  return fn("/".join(path), rebuilt) if isinstance(rebuilt, eqx.Module) else rebuilt


def _modules(tree: Any) -> dict[str, eqx.Module]:
  """The modules of ``tree`` by path, in the order of :func:`_map_modules`."""
  found: dict[str, eqx.Module] = {}

  def note(path: str, module: eqx.Module) -> eqx.Module:
    found[path] = module
    return module

  _map_modules(note, tree)
  return found


def _with_class(module: eqx.Module, cls: type, **fields: Any) -> eqx.Module:
  """``module`` as an instance of ``cls`` (a subclass of its class), fields shared."""
  swapped = object.__new__(cls)
  swapped.__dict__.update(module.__dict__)
  for name, value in fields.items():
    object.__setattr__(swapped, name, value)
  return swapped


def _subclass(cls: type, marker: tuple[Any, ...], name: str, namespace: dict[str, Any]) -> type:
  """The subclass of ``cls`` made for ``marker``, made once (see ``marked_subclass``)."""
  return _common.marked_subclass(
    cls, marker, name, {**namespace, "__module__": __name__, "__qualname__": name}
  )


def _owned(module: eqx.Module) -> _common.Owned:
  """Which leaves are the module's own arrays (a parameter passed through)."""
  own = {id(leaf) for leaf in jax.tree.leaves(module) if isinstance(leaf, jax.Array)}
  return lambda leaf: "a parameter of the module, passed through" if id(leaf) in own else None


def _check_model(model: Any, fn_name: str) -> None:
  _common.check_model(fn_name, model, "equinox", eqx.Module, "an eqx.Module")


# ---------------------------------------------------------------------------
# The nodes that insert adds.


@dataclasses.dataclass(frozen=True)
class _Site:
  """One module with a node: its path, and the insertion that made it."""

  path: str
  insertion: Insertion

  def __repr__(self) -> str:
    return f"<BGN node of {self.path!r}>"


def _site(module: Any) -> tuple[Insertion, str]:
  return module.bgn_site.insertion, module.bgn_site.path


def _with_bgn(cls: type, marker: tuple[Any, ...]) -> type:
  """The subclass of ``cls`` whose ``__call__`` adds the BGN node (``bgn_site`` says
  where and for which insertion)."""
  namespace = {
    "__annotations__": {"bgn_site": "Any"},
    "bgn_site": eqx.field(static=True, default=None),
    "__call__": _common.node_call(cls, _site, _owned),
    "__doc__": f"{cls.__name__} with a BGN node {marker[1]} its __call__ ({dict(marker[2])}).",
  }
  return _subclass(cls, marker, f"{cls.__name__}WithBGN", namespace)


def _with_check(cls: type, insertion: Insertion) -> type:
  """The subclass of the model's class whose ``__call__`` checks that a node was placed."""
  namespace = {
    "__call__": _common.checked_call(cls, insertion),
    "__doc__": f"{cls.__name__}, checking its nodes.",
  }
  return _subclass(cls, ("root", insertion), f"{cls.__name__}WithBGNCheck", namespace)


def _node_marker(module: eqx.Module) -> tuple[Any, ...] | None:
  """The marker of the node :func:`insert` gave ``module``, or None."""
  if getattr(module, "bgn_site", None) is None:
    return None
  # a diagnostics probe may sit around the inserted class
  return _common.first_marker(type(module), "bgn")


def _has_nodes(model: eqx.Module) -> bool:
  return any(getattr(m, "bgn_site", None) is not None for m in _modules(model).values())


def _probe_class(cls: type) -> type:
  """The subclass of ``cls`` that knows its path and runs its calls through the pass of
  :func:`grad_norms` in progress.

  Made only inside the diagnostics, on a temporary copy of the model. ``bgn_taps``
  is a dynamic field, so a stack of layers carries one tap per layer through
  ``jax.lax.scan`` like its parameters.
  """

  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    current = _common.current_hook()
    if not isinstance(current, _Pass):
      return cls.__call__(self, *args, **kwargs)
    return current.probed(self, cls.__call__, *args, **kwargs)

  namespace = {
    "__annotations__": {"bgn_path": "str", "bgn_taps": "tuple"},
    "bgn_path": eqx.field(static=True, default=""),
    "bgn_taps": eqx.field(default=()),
    "__call__": __call__,
    "__doc__": f"{cls.__name__}, probed by bgn_jax.equinox's diagnostics.",
  }
  return _subclass(cls, ("probe",), f"{cls.__name__}Probe", namespace)


def _probe(module: eqx.Module, path: str, taps: tuple[jax.Array | None, ...] = ()) -> eqx.Module:
  return _with_class(module, _probe_class(type(module)), bgn_path=path, bgn_taps=taps)


# ---------------------------------------------------------------------------
# The four verbs.


def insert(
  model: M,
  *,
  where: Where,
  position: Position = "after",
  every: int = 1,
  **bgn_options: Any,
) -> M:
  """Returns ``model`` with BGN nodes after (or before) the selected submodules.

  Each selected submodule's class is swapped for a subclass (``<Class>WithBGN``,
  made once per class and options) whose ``__call__`` applies :func:`bgn_jax.bgn`
  to the floating-point ``jax.Array`` leaves of the output (``position="after"``)
  or of the positional arguments (``"before"``; keyword arguments such as
  ``key`` are left alone). A leaf that is one of the module's own arrays,
  passed through unchanged, gets no node. Other methods and ``isinstance``
  checks are unchanged, and ``model`` itself is not modified. If, once every
  selected module has been called, none had a floating-point leaf to normalize,
  that call raises ValueError listing them (the shapes are known only then).
  Inserting again with the same ``position`` and options leaves the modules
  that already have a node as they are (one node each, never two); other
  options on a module that has a node are a ValueError. :func:`remove` takes
  the nodes out.

  The array leaves of the result are the same arrays, in the same order and at
  the same attribute paths, as those of ``model``: ``eqx.tree_serialise_leaves``
  of one loads into the other. The tree structure differs in the swapped
  classes (and a static field on each of them) only. It cannot be equal:
  ``eqx.filter_jit`` keys its compilations on the structure, static fields
  included, so an equal structure would reuse the compilation of the model
  without nodes (or give the plain model the nodes). So an optax state made for
  one model does not fit the other: ``optimizer.update`` raises "pytree
  structure error: different types" naming ``<Class>WithBGN``. Either move the
  state by its leaves, ``jax.tree.unflatten(jax.tree.structure(new_state),
  jax.tree.leaves(old_state))`` (``new_state`` from ``optimizer.init`` on the
  other model), or :func:`remove` the nodes, or keep training the plain model
  and insert inside the loss, ``loss(insert(model, where=...), x)``: the
  gradients then have the plain model's structure (the nodes cost nothing at
  run time under ``jit``).

  Works under ``eqx.filter_jit``, ``eqx.filter_grad``, ``jax.vmap`` and
  ``eqx.filter_vmap``, and for a stack of layers built with ``eqx.filter_vmap``
  and applied with ``jax.lax.scan`` over its ``eqx.partition``-ed arrays.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    model: an ``eqx.Module``.
    where: an ``eqx.Module`` class or tuple of classes (``isinstance``); a
      predicate ``module -> bool``; or a regular expression (``str`` or
      compiled), searched in the attribute path joined with "/" (``"layers/3"``;
      the model itself has the path ``""``). Only modules that define
      ``__call__`` are tested.
    position: ``"after"`` the module's output, or ``"before"`` its positional
      inputs.
    every: keep every ``every``-th match, starting with the first
      (``matches[::every]``), in the order of the tree: fields in order, list
      items by index, submodules before their parent.
    **bgn_options: ``axes``, ``target_norm`` (default ``"sqrt_size"``, the
      whole example's; with ``axes`` given, ``"sqrt_units"``: the square root of
      each group's size), ``power``, ``eps``, ``axis_name``, passed to
      :func:`bgn_jax.bgn` for every node.

  Returns:
    The model with the BGN nodes.

  Raises:
    TypeError: ``model`` is not an ``eqx.Module``, ``where``, ``position``,
      ``every`` or a BGN option has the wrong type, or an option name is unknown.
    ValueError: an argument is out of range, ``where`` is not a valid regular
      expression, ``where`` matches no module, or a selected module already has
      a node with other options. Later, from a call of the result: none of the
      selected modules had a floating-point leaf to normalize.
  """
  fn_name = "bgn_jax.equinox.insert"
  _check_model(model, fn_name)
  is_match = _common.matcher(where, fn_name=fn_name, module_type=eqx.Module)
  # The default target is the whole example's; with `axes`, each group's own
  # (sqrt of its size), which is what a per-token `axes=-1` means.
  default = "sqrt_units" if bgn_options.get("axes") is not None else DEFAULT_TARGET
  insertion = Insertion("equinox", where, position, every, {"target_norm": default, **bgn_options})
  added = [p for p, _ in insertion.new_nodes(_modules(model).items(), is_match, _node_marker)]

  def add_bgn(path: str, module: eqx.Module) -> eqx.Module:
    if path not in added:
      return module
    cls = _with_bgn(type(module), insertion.node_marker)
    return _with_class(module, cls, bgn_site=_Site(path, insertion))

  inserted = _map_modules(add_bgn, model)
  # Known now, the modules with a node describe the insertion better than `where`:
  # a predicate and a class that select the same modules give equal structures.
  insertion.key = ("equinox", insertion.node_marker, tuple(added))
  if added and ("root", insertion) not in _common.markers_of(type(inserted)):
    inserted = _with_class(inserted, _with_check(type(inserted), insertion))
  return cast(M, inserted)


def remove(model: M) -> M:
  """Returns ``model`` without the BGN nodes that :func:`insert` added.

  Each module with a node gets its original class back, so the result has the
  tree structure of the model before :func:`insert` (an optax state made for
  that model fits it) and the same array leaves. A model without nodes is
  returned as it is; ``model`` itself is not modified.

  Args:
    model: an ``eqx.Module``.

  Returns:
    The model without the nodes.

  Raises:
    TypeError: ``model`` is not an ``eqx.Module``.
  """
  _check_model(model, "bgn_jax.equinox.remove")
  if not _has_nodes(model):
    return model

  def original(path: str, module: eqx.Module) -> eqx.Module:
    del path
    if _common.marker_of(type(module)) is None:
      return module
    plain = _with_class(module, _common.unmarked_class(type(module)))
    if "bgn_site" in vars(plain):
      object.__delattr__(plain, "bgn_site")
    return plain

  return _map_modules(original, model)


def placements(model: eqx.Module, *args: Any, **kwargs: Any) -> Placements:
  """Where the BGN nodes of an inserted model go, found by an abstract call.

  ``model(*args, **kwargs)`` is traced with ``eqx.filter_eval_shape`` (no
  arithmetic); every leaf that an inserted node tests is recorded, with the
  reason when it gets no node.

  Args:
    model: a model returned by :func:`insert`.
    *args: positional arguments of ``model``, e.g. one example.
    **kwargs: keyword arguments of ``model``.

  Returns:
    The :class:`bgn_jax._common.Placements`, in call order; ``str()`` prints a
    table. Shapes are as one call sees them (per example; per layer in a scan).

  Raises:
    TypeError: ``model`` is not an ``eqx.Module``.
    ValueError: ``model`` has no inserted node, or none of the selected modules
      has a floating-point leaf to normalize.
  """
  fn_name = "bgn_jax.equinox.placements"
  _check_model(model, fn_name)
  if not _has_nodes(model):
    raise ValueError(_common.no_nodes_message(fn_name, "model", model))
  with _common.recording() as recorder:
    eqx.filter_eval_shape(lambda m, a, k: m(*a, **k), model, args, kwargs)
  return recorder.placements()


# ---------------------------------------------------------------------------
# grad_norms: taps on the outputs, read by one jax.grad.


def _param_leaves(module: eqx.Module) -> list[jax.Array]:
  """The module's inexact arrays, without the diagnostics' taps."""
  flat, _ = jax.tree_util.tree_flatten_with_path(module)
  return [
    leaf
    for keys, leaf in flat
    if eqx.is_inexact_array(leaf) and not any(getattr(k, "name", None) == "bgn_taps" for k in keys)
  ]


class _Pass(_common.TapPass):
  """A pass of :func:`grad_norms`: a call's tap is carried by its module (the field
  ``bgn_taps``, so a stack of layers slices it with its arrays) or, where the layers
  are not known, closed over (``loose``). The shape passes place no tap; they record the
  parameters' ranks of every probed module and how the carried taps arrive."""

  def __init__(
    self,
    selected: Collection[str],
    discover: bool,
    loose: dict[str, list[jax.Array | None]] | None = None,
  ):
    super().__init__(discover)
    self._selected = selected
    self._loose = loose or {}
    self.first_ndims: dict[str, list[int]] = {}  # per probed path: its first call's params
    self.tap_shapes: dict[tuple[str, int], tuple[int, ...]] = {}  # carried, as a call sees it

  def path_of(self, module: Any) -> str | None:
    path = getattr(module, "bgn_path", None)
    return path if isinstance(path, str) and path in self._selected else None

  def params_of(self, module: Any) -> list[Any]:
    return _param_leaves(module)

  def owned_of(self, module: Any) -> _common.Owned:
    return _owned(module)

  def tap_of(self, module: Any, path: str, index: int, dtype: Any) -> jax.Array | None:
    taps = module.bgn_taps
    tap = taps[index] if index < len(taps) else None
    if self.discover:
      if tap is not None:
        self.tap_shapes[(path, index)] = tuple(jnp.shape(tap))
      return None
    if tap is None:
      loose = self._loose.get(path, [])
      tap = loose[index] if index < len(loose) else None
    if tap is not None and tap.shape != TAP_SHAPE:  # a layer count taken wrongly
      raise ValueError(
        f"bgn_jax.equinox.grad_norms: the module at {path!r} has no parameters, and its "
        f"tap arrived with shape {tap.shape} instead of {TAP_SHAPE}: the layer count taken "
        f"from the modules around it does not fit how the model slices it (jax.lax.scan "
        f"or vmap over stacked arrays). Select the layer module that holds it instead."
      )
    return tap

  def probed(self, module: Any, method: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    if self.discover:
      self.first_ndims.setdefault(module.bgn_path, [jnp.ndim(p) for p in _param_leaves(module)])
    return super().probed(module, method, *args, **kwargs)


def _stack_lead(
  module: eqx.Module, per_call: tuple[int, ...] | list[int]
) -> tuple[int, tuple[int, ...]] | None:
  """The leading (stacked) axes of ``module``'s parameters beyond their rank in one
  call, and their shape; None without parameters or when the leaves disagree."""
  stored = _param_leaves(module)
  if not stored or len(stored) != len(per_call):
    return None
  leads = {jnp.ndim(p) - n for p, n in zip(stored, per_call, strict=True)}
  if len(leads) != 1 or min(leads) < 0:
    return None
  lead = leads.pop()
  return lead, tuple(stored[0].shape[:lead])


# (path, call index, leading axes of the parameters, leading shape, tap dtype or
# None, whether its tap is closed over rather than carried by the module)
_PlanEntry = tuple[str, int, int, tuple[int, ...], str | None, bool]


def _layers_around(path: str, modules: dict[str, eqx.Module], first_ndims: dict[str, list[int]]):
  """The stacked (per layer) shape for a module without parameters at ``path``.

  Taken from the called modules with parameters nearest around it (its layer, or
  the modules beside it in that layer): its taps are stacked with their arrays.
  None when there is none, or when they disagree.
  """
  parts = path.split("/") if path else []
  for n in range(len(parts) - 1, -1, -1):
    outer = "/".join(parts[:n])
    shapes = set()
    for inner, ndims in first_ndims.items():
      if n == 0 or inner == outer or inner.startswith(outer + "/"):
        found = _stack_lead(modules[inner], ndims) if inner in modules else None
        if found is not None:
          shapes.add(found[1])
    if shapes:
      return shapes.pop() if len(shapes) == 1 else None
  return None


def _plan_entry(
  call: _common.TapCall, modules: dict[str, eqx.Module], first_ndims: dict[str, list[int]]
) -> _PlanEntry:
  """What the measured pass needs of one call: its taps, and how to read its norms."""
  module = modules[call.path]
  lead = 0
  if _param_leaves(module):
    found = _stack_lead(module, call.params_ndims)
    lead, lead_shape = found if found is not None else (0, None)  # mixed: one norm
  else:
    lead_shape = _layers_around(call.path, modules, first_ndims)
  dtype = None if call.dtype is None else jnp.dtype(call.dtype).name
  loose = lead_shape is None
  return call.path, call.index, lead, lead_shape or (), dtype, loose


def _probed(model: eqx.Module, taps: dict[str, list[Any]]) -> eqx.Module:
  """``model`` with a probe, carrying ``taps[path]``, on each module at a path of ``taps``."""
  return _map_modules(
    lambda path, module: _probe(module, path, tuple(taps[path])) if path in taps else module,
    model,
  )


def _taps(plan: Sequence[_PlanEntry], zeros: Callable[..., Any]) -> tuple[dict, dict]:
  """The zero taps of the plan's calls, as lists by path: those the modules carry (so a
  stack of layers slices them with its arrays), and those closed over, where the layers
  are not known (the gradients of all the layers add up in them)."""
  carried: dict[str, list[Any]] = {}
  loose: dict[str, list[Any]] = {}
  for path, _, _, lead_shape, dtype, is_loose in plan:
    tap = None if dtype is None else zeros(lead_shape + TAP_SHAPE, dtype)
    carried.setdefault(path, []).append(None if is_loose else tap)
    loose.setdefault(path, []).append(tap if is_loose else None)
  return carried, loose


@eqx.filter_jit
def _measured_norms(
  loss_fn: Callable[..., jax.Array],
  arrays: Any,
  static: Any,
  plan: tuple[_PlanEntry, ...],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> list[tuple[jax.Array, jax.Array, jax.Array]]:
  # One compiled computation, cached per loss_fn, model structure and plan:
  # eagerly, the op-by-op backward pass costs seconds of dispatch.
  taps, loose = _taps(plan, jnp.zeros)

  def loss_of(arrays: Any, taps: Any, loose: Any) -> jax.Array:
    with _common.listening(_Pass(taps, discover=False, loose=loose)):
      return loss_fn(_probed(eqx.combine(arrays, static), taps), *args, **kwargs)

  grad_arrays, grad_taps, grad_loose = jax.grad(loss_of, argnums=(0, 1, 2))(arrays, taps, loose)
  grad_modules = _modules(grad_arrays)
  params, leads, tapped = [], [], []
  for path, index, lead, _, _, is_loose in plan:
    leaves = _param_leaves(grad_modules[path]) if path in grad_modules else []
    params.append(leaves)
    leads.append((lead,) * len(leaves))
    tapped.append((grad_loose if is_loose else grad_taps)[path][index])
  return _common.call_norms(params, tuple(leads), tapped, tuple(entry[3] for entry in plan))


def grad_norms(loss_fn: Callable[..., jax.Array], *, where: Where) -> Callable[..., Report]:
  """Norms of the gradient at the output and at the parameters of selected submodules.

  The selected submodules of a temporary copy of ``model`` pass their output
  through an identity whose backward rule hands out the norm of the gradient
  arriving there; one ``jax.grad`` with respect to the model's arrays and these
  taps gives both kinds of norm. Their shapes come from an abstract pass
  (``eqx.filter_eval_shape``), so the arithmetic is one forward and one backward
  pass. ``grad_norms(loss_fn, where=...)`` returns a function of the loss's
  arguments, as ``jax.grad`` does; it works under ``eqx.filter_jit``.

  Two gradients are reported at an output, as in :func:`bgn_jax.linen.grad_norms`.
  ``"output"`` is always the gradient of the loss with respect to the module's
  output, summed over all its consumers (a residual path included): the tap sits
  where the module returns, before any node. Where a BGN node sits directly on
  that output (the node :func:`insert` put on that module, a node of an
  ``insert`` inside ``loss_fn``, or a :class:`BGN` layer fed the output),
  ``"at_bgn"`` is the raw gradient arriving at the node, before it normalizes it
  (the gradient at the node's output). With the node as the only consumer,
  ``"output"`` is then the normalized gradient and ``"at_bgn"`` the one the
  layers above sent. A node that :func:`insert` put ``position="before"`` a
  selected module sits on its inputs: its ``"at_bgn"`` is the gradient arriving
  at that node (at the inputs the module sees). A bare :func:`bgn_jax.bgn` call is
  not seen as a node: no ``"at_bgn"`` there. Leaves of the output that are the module's own arrays,
  passed through, are not measured.

  Under ``jax.vmap`` (a loss of per-example code) the norms are over the whole
  batch. A stack of layers applied with ``jax.lax.scan`` (its arrays with a
  leading layer axis, as ``eqx.filter_vmap`` of the constructor makes them)
  gives one value per layer: arrays of shape ``(layers,)``. A module without
  parameters takes the layer count from the called modules with parameters
  nearest around it (its layer, or the modules beside it). Where there are none
  (a module without parameters called at every step of a ``jax.lax.scan`` over
  no stacked arrays), or they disagree, or a module mixes stacked and shared
  parameters, its entry is one value: the norm over all its steps together (the
  gradients of all steps cannot be told apart without a stacked array to carry
  the tap).

  Keys are attribute paths joined with "/" (``"layers/0"``), in the order the
  calls return (a selected module after the selected modules inside it); the
  result is an ``OrderedDict``. A module called several times gets one entry
  per call: ``"layers/0"``, ``"layers/0#1"``; its "params" entry is the same in
  each, the gradient summed over its calls.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``, ``model`` an
      ``eqx.Module`` (inserted or not); it must call the model it receives.
    where: an ``eqx.Module`` class or tuple of classes; a predicate
      ``module -> bool``; or a regular expression searched in the "/"-joined
      attribute path.

  Returns:
    A function of ``loss_fn``'s arguments, as ``jax.grad`` returns one, that
    returns ``{path: {"output": norm, "params": norm}}``, plus ``"at_bgn": norm`` where
    a BGN node sits on the output or before the module; each norm a float32 array (float64 for
    float64 gradients), 0-d or one value per scanned layer. Modules without
    parameters have "params" zero; "output" is zero for a module whose output
    has no floating-point leaf.

  Raises:
    TypeError: ``loss_fn`` is not callable, or ``where`` of none of the accepted
      forms; from the returned function: ``model`` is not an ``eqx.Module``.
    ValueError: from the returned function: ``where`` matches no module, or
      ``loss_fn`` calls none of the selected modules.
  """
  fn_name = "bgn_jax.equinox.grad_norms"
  is_match = _common.matcher(where, fn_name=fn_name, module_type=eqx.Module)
  measure = functools.partial(_measure, loss_fn, where, is_match)
  return _common.measuring(fn_name, loss_fn, lambda model: _check_model(model, fn_name), measure)


def _measure(
  loss_fn: Callable[..., jax.Array],
  where: Where,
  is_match: Callable[[Any, str], bool],
  model: eqx.Module,
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Report:
  fn_name = "bgn_jax.equinox.grad_norms"
  modules = _modules(model)
  selected = dict(_common.select(fn_name, where, modules.items(), is_match))
  # The shape pass probes every module: the parameters of those that are called
  # give a stacked module without parameters its layer count.
  probed = _probed(model, {path: [] for path, m in modules.items() if _common.has_call(type(m))})

  def shapes_of(model: eqx.Module, taps: Any) -> _Pass:
    with _common.listening(_Pass(taps, discover=True)) as shape_pass:
      eqx.filter_eval_shape(lambda m, a, k: loss_fn(m, *a, **k), model, args, kwargs)
    return shape_pass

  discovery = shapes_of(probed, selected)
  if not discovery.calls:
    raise ValueError(_common.none_called_message(fn_name, where, list(selected)))

  plan = [_plan_entry(call, modules, discovery.first_ndims) for call in discovery.calls]
  borrowed = [i for i, e in enumerate(plan) if e[3] and not _param_leaves(modules[e[0]])]
  if borrowed:
    # A layer count taken from the modules around: check, by a second shape pass,
    # that the model slices the taps that way (it may call the module outside its
    # stack); if not, close over.
    taps, _ = _taps(plan, np.zeros)
    seen = shapes_of(_probed(model, taps), taps).tap_shapes
    for i in borrowed:
      path, index, lead, _, dtype, _ = plan[i]
      if seen.get((path, index)) != TAP_SHAPE:
        plan[i] = (path, index, lead, (), dtype, True)
  arrays, static = eqx.partition(model, eqx.is_inexact_array)
  norms = _measured_norms(loss_fn, arrays, static, tuple(plan), args, kwargs)
  return _common.make_report(discovery.calls, norms, [entry[4] is not None for entry in plan])
