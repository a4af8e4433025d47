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

import collections
import types
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import jax
import jax.numpy as jnp

try:
  import equinox as eqx
except ImportError as err:  # pragma: no cover - exercised in a subprocess by the tests
  raise ImportError(
    'bgn_jax.equinox needs equinox, an optional extra: pip install "bgn_jax[equinox]".'
  ) from err

from bgn_jax._common import (
  Placement,
  Placements,
  Position,
  Where,
  apply_bgn,
  check_options,
  flatten_leaves,
  group_norms,
  is_float_array,
  matcher,
  no_match_message,
)
from bgn_jax.core import Axes, AxisName, TargetNorm, bgn, l2_norm, make_config

__all__ = ["BGN", "grad_norms", "insert", "placements"]

M = TypeVar("M", bound=eqx.Module)
Report = dict[str, dict[str, jax.Array]]

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
    # Options that do not depend on the input shape are checked at construction;
    # axes and the shape-dependent targets are checked at the call.
    make_config(
      (), target_norm=self.target_norm, power=self.power, eps=self.eps, axis_name=self.axis_name
    )

  def __call__(self, x: jax.Array, *, key: Any = None) -> jax.Array:
    """Applies the node; ``key`` is accepted (and unused) for ``eqx.nn.Sequential``."""
    options = {
      "axes": self.axes,
      "target_norm": self.target_norm,
      "power": self.power,
      "eps": self.eps,
      "axis_name": self.axis_name,
    }
    return bgn(x, **options)


# ---------------------------------------------------------------------------
# Walking a model's modules.


def _key_name(key: Any) -> str:
  for attribute in ("name", "idx", "key"):
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


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
    _map_modules(fn, leaf, path + tuple(_key_name(k) for k in keys))
    if isinstance(leaf, eqx.Module) and leaf is not root
    else leaf
    for keys, leaf in flat
  ]
  rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
  return fn("/".join(path), rebuilt) if isinstance(rebuilt, eqx.Module) else rebuilt


def _has_call(cls: type) -> bool:
  # getattr(cls, "__call__") would find type.__call__ on every class.
  return any("__call__" in vars(base) for base in cls.__mro__ if base is not object)


def _with_class(module: eqx.Module, cls: type, **fields: Any) -> eqx.Module:
  """``module`` as an instance of ``cls`` (a subclass of its class), fields shared."""
  swapped = object.__new__(cls)
  swapped.__dict__.update(module.__dict__)
  for name, value in fields.items():
    object.__setattr__(swapped, name, value)
  return swapped


def _subclass(cls: type, marker: tuple[Any, ...], name: str, namespace: dict[str, Any]) -> type:
  """The subclass of ``cls`` made for ``marker``, made once.

  Found again through ``cls.__subclasses__()``, so repeated inserts give equal
  tree structures (``eqx.filter_jit`` reuses its compilation) and no class is
  made twice.
  """
  for subclass in cls.__subclasses__():
    if vars(subclass).get("_bgn_marker") == marker:
      return subclass

  def fill(body: dict[str, Any]) -> None:
    body.update(namespace, _bgn_marker=marker, __module__=__name__)
    body["__qualname__"] = name

  return types.new_class(name, (cls,), {}, fill)


# ---------------------------------------------------------------------------
# What the diagnostics listen to while they trace.


class _Listener:
  """Told of every node and every probed call while a diagnostic traces the model."""

  def node(self, module: eqx.Module, record: Placement) -> None:
    del module, record

  def after_call(self, module: Any, outputs: Any) -> Any:
    del module
    return outputs


_LISTENERS: list[_Listener] = []


class _Listening:
  def __init__(self, listener: _Listener):
    self._listener = listener

  def __enter__(self) -> None:
    _LISTENERS.append(self._listener)

  def __exit__(self, *exc: Any) -> None:
    _LISTENERS.remove(self._listener)


def _listener() -> _Listener | None:
  return _LISTENERS[-1] if _LISTENERS else None


def _base_name(cls: type) -> str:
  """The user's class name, without the subclasses this module adds."""
  while "_bgn_marker" in vars(cls):
    cls = cls.__mro__[1]
  return cls.__name__


def _own_arrays(module: eqx.Module) -> set[int]:
  return {id(leaf) for leaf in jax.tree.leaves(module) if isinstance(leaf, jax.Array)}


def _apply_nodes(module: eqx.Module, tree: Any, position: Position, options: dict[str, Any]) -> Any:
  """BGN on the floating-point array leaves of ``tree`` that are not ``module``'s own arrays."""
  own = _own_arrays(module)
  flat, treedef = jax.tree_util.tree_flatten_with_path(tree)
  listener = _listener()
  leaves = []
  for keys, leaf in flat:
    if not isinstance(leaf, jax.Array):
      reason = f"not a jax.Array ({type(leaf).__name__})"
    elif not is_float_array(leaf):
      reason = f"not floating-point ({leaf.dtype})"
    elif id(leaf) in own:
      reason = "a parameter of the module, passed through"
    else:
      reason = None
    leaves.append(leaf if reason else apply_bgn(leaf, options))
    if listener is not None:
      listener.node(
        module,
        Placement(
          path=getattr(module, "bgn_path", "?"),
          module=_base_name(type(module)),
          position=position,
          leaf=jax.tree_util.keystr(keys),
          shape=tuple(getattr(leaf, "shape", ())),
          dtype=str(getattr(leaf, "dtype", type(leaf).__name__)),
          reason=reason,
        ),
      )
  return jax.tree_util.tree_unflatten(treedef, leaves)


def _with_bgn(cls: type, position: Position, options: dict[str, Any]) -> type:
  """The subclass of ``cls`` whose ``__call__`` adds the BGN node."""

  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    if position == "before":
      args = _apply_nodes(self, args, position, options)
    outputs = cls.__call__(self, *args, **kwargs)
    if position == "after":
      outputs = _apply_nodes(self, outputs, position, options)
    return outputs

  namespace = {
    "__call__": __call__,
    "__doc__": f"{cls.__name__} with a BGN node {position} its __call__ ({options}).",
  }
  marker = ("insert", position, tuple(sorted(options.items())))
  return _subclass(cls, marker, f"{cls.__name__}WithBGN", namespace)


def _probe_class(cls: type) -> type:
  """The subclass of ``cls`` that knows its path and tells the listener of its calls.

  Made only inside the diagnostics, on a temporary copy of the model. ``bgn_taps``
  is a dynamic field, so a stack of layers carries one tap per layer through
  ``jax.lax.scan`` like its parameters.
  """

  def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
    outputs = cls.__call__(self, *args, **kwargs)
    listener = _listener()
    return outputs if listener is None else listener.after_call(self, outputs)

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


def _is_inserted(module: eqx.Module) -> bool:
  return any(vars(base).get("_bgn_marker", ("",))[0] == "insert" for base in type(module).__mro__)


def _check_model(model: Any, fn_name: str) -> None:
  if not isinstance(model, eqx.Module):
    raise TypeError(f"{fn_name}: `model` must be an eqx.Module; got {type(model).__name__}.")


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
  checks are unchanged, and ``model`` itself is not modified.

  The array leaves of the result are the same arrays, in the same order and at
  the same attribute paths, as those of ``model``: ``eqx.tree_serialise_leaves``
  of one loads into the other. The tree structure differs in the swapped
  classes only (it cannot be equal: ``eqx.filter_jit`` would then reuse the
  compilation without nodes), so an optax state made for one is moved to the
  other by its leaves, ``jax.tree.unflatten(jax.tree.structure(new_state),
  jax.tree.leaves(old_state))``.

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
    **bgn_options: ``axes``, ``target_norm`` (default ``"sqrt_size"``),
      ``power``, ``eps``, ``axis_name``, passed to :func:`bgn_jax.bgn` for every
      node.

  Returns:
    The model with the BGN nodes.

  Raises:
    TypeError: ``model`` is not an ``eqx.Module``, ``where``, ``position``,
      ``every`` or a BGN option has the wrong type, or an option name is unknown.
    ValueError: an argument is out of range, ``where`` is not a valid regular
      expression, or ``where`` matches no module.
  """
  _check_model(model, "equinox.insert")
  is_match = matcher(where, fn_name="equinox.insert", module_type=eqx.Module)
  options = check_options(
    "equinox.insert", position, every, {"target_norm": DEFAULT_TARGET, **bgn_options}
  )
  seen: dict[tuple[str, str], None] = {}
  matches = 0

  def add_bgn(path: str, module: eqx.Module) -> eqx.Module:
    nonlocal matches
    if not _has_call(type(module)):
      return module
    seen[(type(module).__name__, path)] = None
    if not is_match(module, path):
      return module
    matches += 1
    if (matches - 1) % every:
      return module
    return _with_class(module, _with_bgn(type(module), position, options))

  inserted = _map_modules(add_bgn, model)
  if not matches:
    raise ValueError(no_match_message("equinox.insert", where, seen, "module"))
  return inserted


def _probed(model: eqx.Module, select: Callable[[str, eqx.Module], bool]) -> eqx.Module:
  def probe(path: str, module: eqx.Module) -> eqx.Module:
    return _probe(module, path) if select(path, module) else module

  return _map_modules(probe, model)


class _Recorder(_Listener):
  def __init__(self) -> None:
    self.records = Placements()

  def node(self, module: eqx.Module, record: Placement) -> None:
    del module
    self.records.append(record)


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
    ValueError: ``model`` has no inserted node.
  """
  _check_model(model, "equinox.placements")
  found: list[str] = []

  def select(path: str, module: eqx.Module) -> bool:
    if _is_inserted(module):
      found.append(path)
      return True
    return False

  probed = _probed(model, select)
  if not found:
    raise ValueError(
      "equinox.placements: `model` has no BGN node inserted; pass the model that "
      "bgn_jax.equinox.insert returns."
    )
  recorder = _Recorder()
  with _Listening(recorder):
    eqx.filter_eval_shape(lambda m, a, k: m(*a, **k), probed, args, kwargs)
  return recorder.records


# Scales of the three sums of squares a tap returns: the largest scale whose sum
# is finite gives the norm, so norms over the whole float32 range survive.
_TAP_SCALES = (2.0**62, 1.0, 2.0**-62)


def _inexact_leaves(tree: Any) -> list[jax.Array]:
  return [x for x in jax.tree.leaves(tree) if eqx.is_inexact_array(x)]


@jax.custom_vjp
def _tap(outputs: list[jax.Array], tap: jax.Array) -> list[jax.Array]:
  del tap
  return outputs


def _tap_fwd(outputs: list[jax.Array], tap: jax.Array) -> tuple[list[jax.Array], jax.Array]:
  return outputs, tap


def _tap_bwd(tap: jax.Array, grads: list[jax.Array]) -> tuple[list[jax.Array], jax.Array]:
  # The tap's cotangent is the squared norm of the output's gradient, at three
  # scales. Under vmap the tap is shared by the batch, so these sums add up over
  # the examples: the norm over the whole batch.
  flat = flatten_leaves(grads, [0] * len(grads))
  if flat is None:
    return grads, jnp.zeros_like(tap)
  norm = l2_norm(flat).astype(tap.dtype)
  scales = jnp.asarray(_TAP_SCALES, tap.dtype)
  return grads, jnp.square(norm * scales)


_tap.defvjp(_tap_fwd, _tap_bwd)


def _tap_norm(sums: jax.Array) -> jax.Array:
  """The norm from a tap's gradient ``(..., 3)``: the largest finite scale's sum."""
  scales = jnp.asarray(_TAP_SCALES, sums.dtype)
  norms = jnp.sqrt(sums) / scales
  finite = jnp.isfinite(sums)
  return jnp.where(
    finite[..., 0], norms[..., 0], jnp.where(finite[..., 1], norms[..., 1], norms[..., 2])
  )


def _param_leaves(module: eqx.Module) -> list[jax.Array]:
  """The module's inexact arrays, without the diagnostics' taps."""
  flat, _ = jax.tree_util.tree_flatten_with_path(module)
  return [
    leaf
    for keys, leaf in flat
    if eqx.is_inexact_array(leaf) and not any(getattr(k, "name", None) == "bgn_taps" for k in keys)
  ]


class _Call:
  """One call of a selected module, as the shape pass saw it."""

  def __init__(self, path: str, index: int, params_ndims: list[int], dtype: Any):
    self.path = path
    self.index = index
    self.params_ndims = params_ndims
    self.dtype = dtype

  @property
  def key(self) -> str:
    return self.path if self.index == 0 else f"{self.path}#{self.index}"


class _Discovery(_Listener):
  def __init__(self) -> None:
    self.calls: list[_Call] = []
    self._counts: collections.Counter[str] = collections.Counter()

  def after_call(self, module: Any, outputs: Any) -> Any:
    path = module.bgn_path
    index = self._counts[path]
    self._counts[path] += 1
    leaves = _inexact_leaves(outputs)
    dtype = jnp.result_type(*leaves, jnp.float32) if leaves else jnp.float32
    params = [jnp.ndim(p) for p in _param_leaves(module)]
    self.calls.append(_Call(path, index, params, dtype if leaves else None))
    return outputs


class _Measure(_Listener):
  def __init__(self) -> None:
    self._counts: collections.Counter[str] = collections.Counter()

  def after_call(self, module: Any, outputs: Any) -> Any:
    index = self._counts[module.bgn_path]
    self._counts[module.bgn_path] += 1
    if index >= len(module.bgn_taps) or module.bgn_taps[index] is None:
      return outputs
    leaves, treedef = jax.tree.flatten(outputs)
    chosen = [i for i, leaf in enumerate(leaves) if eqx.is_inexact_array(leaf)]
    tapped = _tap([leaves[i] for i in chosen], module.bgn_taps[index])
    for i, leaf in zip(chosen, tapped, strict=True):
      leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)


def _modules_by_path(tree: Any) -> dict[str, eqx.Module]:
  found: dict[str, eqx.Module] = {}

  def note(path: str, module: eqx.Module) -> eqx.Module:
    found[path] = module
    return module

  _map_modules(note, tree)
  return found


def _iter_leads(stored: list[int], per_call: list[int]) -> Iterator[int]:
  for s, c in zip(stored, per_call, strict=True):
    yield max(s - c, 0)


# (path, call index, leading axes of the parameters, leading shape, tap dtype or None)
_PlanEntry = tuple[str, int, int, tuple[int, ...], str | None]


def _plan_entry(call: _Call, module: eqx.Module) -> _PlanEntry:
  """What the measured pass needs of one call: its tap, and how to read its norms."""
  stored = [jnp.ndim(p) for p in _param_leaves(module)]
  lead = 0
  if len(call.params_ndims) == len(stored):
    leads = set(_iter_leads(stored, call.params_ndims))
    lead = leads.pop() if len(leads) == 1 else 0  # mixed stacked and shared: one norm
  leaves = _param_leaves(module)
  lead_shape = tuple(leaves[0].shape[:lead]) if leaves else ()
  dtype = None if call.dtype is None else jnp.dtype(call.dtype).name
  return call.path, call.index, lead, lead_shape, dtype


@eqx.filter_jit
def _measured_norms(
  loss_fn: Callable[..., jax.Array],
  arrays: Any,
  static: Any,
  plan: tuple[_PlanEntry, ...],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> list[tuple[jax.Array, jax.Array]]:
  # One compiled computation, cached per loss_fn, model structure and plan:
  # eagerly, the op-by-op backward pass costs seconds of dispatch.
  taps: dict[str, list[jax.Array | None]] = {}
  for path, _, _, lead_shape, dtype in plan:
    tap = None if dtype is None else jnp.zeros(lead_shape + (len(_TAP_SCALES),), dtype)
    taps.setdefault(path, []).append(tap)

  def loss_of(arrays: Any, taps: dict[str, list[jax.Array | None]]) -> jax.Array:
    def probe(path: str, module: eqx.Module) -> eqx.Module:
      return _probe(module, path, tuple(taps[path])) if path in taps else module

    with _Listening(_Measure()):
      return loss_fn(_map_modules(probe, eqx.combine(arrays, static)), *args, **kwargs)

  grad_arrays, grad_taps = jax.grad(loss_of, argnums=(0, 1))(arrays, taps)
  grad_modules = _modules_by_path(grad_arrays)
  flats, shapes, outputs = [], [], []
  for path, index, lead, lead_shape, _ in plan:
    leaves = _param_leaves(grad_modules[path]) if path in grad_modules else []
    flats.append(flatten_leaves(leaves, [lead] * len(leaves)))
    shapes.append(lead_shape)
    tap = grad_taps[path][index]
    outputs.append(jnp.zeros(lead_shape, jnp.float32) if tap is None else _tap_norm(tap))
  return list(zip(outputs, group_norms(flats, shapes), strict=True))


def grad_norms(
  loss_fn: Callable[..., jax.Array],
  model: eqx.Module,
  *args: Any,
  where: Where,
  **kwargs: Any,
) -> Report:
  """Norms of the gradient at the output and at the parameters of selected submodules.

  The selected submodules of a temporary copy of ``model`` pass their output
  through an identity whose backward rule hands out the norm of the gradient
  arriving there, over all its consumers; one ``jax.grad`` with respect to the
  model's arrays and these taps gives both kinds of norm. Their shapes come
  from an abstract pass (``eqx.filter_eval_shape``), so the arithmetic is one
  forward and one backward pass. Works under ``eqx.filter_jit`` with
  ``loss_fn`` and ``where`` static (closed over, or ``functools.partial``).

  "output" is the gradient as it arrives from above, before a node that
  :func:`insert` placed at that output normalizes it. Under ``jax.vmap`` (a
  loss of per-example code) it is the norm over the whole batch, as are
  "params". A stack of layers applied with ``jax.lax.scan`` (its arrays with a
  leading layer axis, as ``eqx.filter_vmap`` of the constructor makes them)
  gives one value per layer: arrays of shape ``(layers,)``.

  Keys are attribute paths joined with "/" (``"layers/0"``), in the order the
  calls return (a selected module after the selected modules inside it); the
  result is an ``OrderedDict``. A module called several times gets one entry
  per call: ``"layers/0"``, ``"layers/0#1"``; its "params" entry is the same in
  each, the gradient summed over its calls.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    loss_fn: ``loss_fn(model, *args, **kwargs) -> scalar``; it must call the
      model it receives.
    model: an ``eqx.Module`` (inserted or not).
    *args: positional arguments for ``loss_fn``.
    where: an ``eqx.Module`` class or tuple of classes; a predicate
      ``module -> bool``; or a regular expression searched in the "/"-joined
      attribute path.
    **kwargs: keyword arguments for ``loss_fn``.

  Returns:
    ``{path: {"output": norm, "params": norm}}``, each norm a float32 array
    (float64 for float64 gradients), 0-d or one value per scanned layer.
    Modules without parameters have "params" zero; "output" is zero for a
    module whose output has no floating-point leaf.

  Raises:
    TypeError: ``loss_fn`` is not callable, ``model`` not an ``eqx.Module``, or
      ``where`` of none of the accepted forms.
    ValueError: ``where`` matches no module, or ``loss_fn`` calls none of the
      selected modules.
  """
  if not callable(loss_fn):
    raise TypeError(
      f"equinox.grad_norms: `loss_fn` must be callable; got {type(loss_fn).__name__}."
    )
  _check_model(model, "equinox.grad_norms")
  is_match = matcher(where, fn_name="equinox.grad_norms", module_type=eqx.Module)
  seen: dict[tuple[str, str], None] = {}
  selected: dict[str, eqx.Module] = {}

  def select(path: str, module: eqx.Module) -> bool:
    if not _has_call(type(module)):
      return False
    seen[(_base_name(type(module)), path)] = None
    if is_match(module, path):
      selected[path] = module
      return True
    return False

  probed = _probed(model, select)
  if not selected:
    raise ValueError(no_match_message("equinox.grad_norms", where, seen, "module"))
  discovery = _Discovery()
  with _Listening(discovery):
    eqx.filter_eval_shape(lambda m, a, k: loss_fn(m, *a, **k), probed, args, kwargs)
  if not discovery.calls:
    raise ValueError(
      f"equinox.grad_norms: loss_fn called none of the modules `where` {where!r} selected "
      f"({', '.join(repr(p) for p in selected)}); it must call the model it receives."
    )

  plan = tuple(_plan_entry(call, selected[call.path]) for call in discovery.calls)
  arrays, static = eqx.partition(model, eqx.is_inexact_array)
  norms = _measured_norms(loss_fn, arrays, static, plan, args, kwargs)
  return collections.OrderedDict(
    (call.key, {"output": output, "params": params})
    for call, (output, params) in zip(discovery.calls, norms, strict=True)
  )
