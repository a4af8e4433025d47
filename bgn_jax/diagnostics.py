"""Gradient-flow diagnostics: gradient norms per layer, their plot, relative updates.

:func:`grad_norms` measures, in one forward and one backward pass, the norm of
the gradient that reaches the output of each selected module call and the norm
of the gradient of that module's parameters. :func:`plot_grad_norms` draws them
against depth; :func:`relative_updates` gives ``||W_new - W_old|| / ||W_old||``
per module, which shows whether the deepest layers keep being updated.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import collections
import dataclasses
import functools
import pathlib
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from bgn_jax.core import l2_norm
from bgn_jax.linen import BGN
from bgn_jax.select import Where, matcher

__all__ = [
  "GRAD_NORMS_COLLECTION",
  "depth_profile",
  "grad_norms",
  "plot_grad_norms",
  "relative_updates",
]

GRAD_NORMS_COLLECTION = "grad_norms"
"""The collection of grad_norms's zero perturbations; list it in nn.scan's variable_axes."""

Report = dict[str, dict[str, jax.Array]]
_Path = tuple[str, ...]
_SEEN_LISTED = 40  # how many seen module calls the no-match error lists


def _is_float_array(leaf: Any) -> bool:
  return isinstance(leaf, jax.Array) and jnp.issubdtype(leaf.dtype, jnp.inexact)


@dataclasses.dataclass
class _Call:
  """One selected module call, as found by the shape pass."""

  path: _Path  # the module path in the variable trees
  location: _Path  # where its reported perturbation lies in the collection (path + name)
  output_ndims: tuple[int, ...]  # rank of each perturbed leaf in one call
  params_ndims: Any  # rank of each params leaf in one call (inside any nn.scan)


class _Probe:
  """The interceptor of one :func:`grad_norms` pass.

  In the shape pass ("discover") each top-level module call is run again as
  ``apply(..., mutable=True)``, so that ``Module.perturb`` creates the zero
  perturbations and lifted transforms (``nn.scan``) stack them per iteration
  as they stack parameters. In the gradient pass ("measure") the perturbations
  come in with the variables and ``Module.perturb`` adds them.

  Perturbations are numbered in call order, which both passes share. A body
  that a lifted transform traces more than once (``nn.scan`` traces it twice)
  takes a number per trace; the traces whose variables the transform discards
  leave no perturbation, and the shape pass drops their calls.
  """

  def __init__(self, is_match: Callable[[Any, str], bool], discover: bool):
    self._is_match = is_match
    self._discover = discover
    self._depth = 0  # nesting of intercepted calls; 0 is a top-level call
    self._reapplying = False  # the next call is the shape pass's re-applied top call
    self._prefix: _Path = ()  # path of the module the shape pass re-applies
    self._count = 0
    # Outputs of selected calls, by id, so that a BGN layer fed one is recognised.
    self._tagged: dict[int, tuple[Any, _Call]] = {}
    self.calls: list[_Call] = []  # in call order
    self.grafts: list[tuple[_Path, Any]] = []  # (prefix, perturbation shapes) per apply
    self.seen: dict[tuple[str, str], None] = {}  # (type name, path) of __call__s

  def __call__(
    self,
    next_fun: Callable[..., Any],
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    context: nn.module.InterceptorContext,
  ) -> Any:
    module = context.module
    if context.method_name == "setup":
      return next_fun(*args, **kwargs)
    if self._reapplying:
      self._reapplying = False
    elif self._discover and self._depth == 0:
      return self._reapply(context, args, kwargs)
    self._depth += 1
    try:
      outputs = next_fun(*args, **kwargs)
    finally:
      self._depth -= 1
    if context.method_name != "__call__":
      return outputs
    path = self._prefix + tuple(str(p) for p in module.path)
    joined = "/".join(path)
    self.seen[(type(module).__name__, joined)] = None
    if isinstance(module, BGN) and args:
      tagged = self._tagged.get(id(args[0]))
      if tagged is not None and tagged[0] is args[0]:
        # A BGN layer fed the selected output: report the gradient arriving at
        # the BGN node, before it normalizes it, i.e. the one at its output.
        call = tagged[1]
        name = self._next_name("after_bgn")
        outputs = self._perturb(module, joined, outputs, name)
        call.location = path + (name,)
        self._tagged[id(outputs)] = (outputs, call)
    if self._is_match(module, joined):
      name = self._next_name("output")
      call = self._record(module, path + (name,), outputs)
      outputs = self._perturb(module, joined, outputs, name)
      self._tagged[id(outputs)] = (outputs, call)
    return outputs

  def _next_name(self, kind: str) -> str:
    self._count += 1
    return f"{kind}_{self._count - 1}"

  def _reapply(
    self, context: nn.module.InterceptorContext, args: tuple[Any, ...], kwargs: dict[str, Any]
  ) -> Any:
    module = context.module
    unbound, variables = module.unbind()
    # Shapes only (this runs under jax.eval_shape): any key will do.
    rngs = {name: jax.random.key(0) for name in getattr(module.scope, "rngs", {})}
    self._reapplying = True
    self._prefix = tuple(str(p) for p in module.path)
    self._depth += 1
    try:
      outputs, state = unbound.apply(
        variables, *args, method=context.method_name, mutable=True, rngs=rngs, **kwargs
      )
    finally:
      self._depth -= 1
      self._reapplying = False
      self._prefix = ()
    tree = unfreeze(state).get(GRAD_NORMS_COLLECTION)
    if tree:
      shapes = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)
      self.grafts.append((tuple(str(p) for p in module.path), shapes))
    return outputs

  def _record(self, module: nn.Module, location: _Path, outputs: Any) -> _Call:
    params = module.variables.get("params", {})
    call = _Call(
      path=location[:-1],
      location=location,
      output_ndims=tuple(x.ndim for x in jax.tree.leaves(outputs) if _is_float_array(x)),
      params_ndims=jax.tree.map(jnp.ndim, unfreeze(params)),
    )
    self.calls.append(call)
    return call

  def _perturb(self, module: nn.Module, joined: str, outputs: Any, name: str) -> Any:
    leaves, treedef = jax.tree.flatten(outputs)
    chosen = [i for i, leaf in enumerate(leaves) if _is_float_array(leaf)]
    if not chosen:
      return outputs
    if self._discover and not module.is_mutable_collection(GRAD_NORMS_COLLECTION):
      raise ValueError(
        f"grad_norms: the module call at {joined!r} runs inside a lifted transform "
        f"(nn.scan, nn.vmap, ...) that does not carry the {GRAD_NORMS_COLLECTION!r} "
        f"collection. Add it with axis 0, e.g. nn.scan(..., variable_axes={{'params': 0, "
        f"{GRAD_NORMS_COLLECTION!r}: 0}}), or select modules outside the transform."
      )
    if not self._discover and not module.has_variable(GRAD_NORMS_COLLECTION, name):
      if GRAD_NORMS_COLLECTION in module.variables:
        return outputs  # a trace whose variables the lifted transform discards
      raise ValueError(
        f"grad_norms: no {GRAD_NORMS_COLLECTION!r} perturbation reached the module call "
        f"at {joined!r}. loss_fn must pass the `variables` it receives to apply as they "
        f"are: grad_norms adds the {GRAD_NORMS_COLLECTION!r} collection to them."
      )
    perturbed = module.perturb(name, [leaves[i] for i in chosen], collection=GRAD_NORMS_COLLECTION)
    for i, leaf in zip(chosen, perturbed, strict=True):
      leaves[i] = leaf
    return jax.tree.unflatten(treedef, leaves)


def _get(tree: Any, path: _Path) -> Any:
  for name in path:
    if not isinstance(tree, Mapping) or name not in tree:
      return None
    tree = tree[name]
  return tree


def _graft(tree: dict[str, Any], prefix: _Path, subtree: Mapping[str, Any]) -> None:
  for name in prefix:
    tree = tree.setdefault(name, {})
  for name, value in subtree.items():
    if isinstance(value, Mapping):
      _graft(tree, (name,), value)
    else:
      tree[name] = value


def _flatten(leaves: Sequence[jax.Array], leading: Sequence[int]) -> jax.Array | None:
  """The leaves as one array of shape ``lead_shape + (n,)``, keeping ``leading[i]`` axes."""
  if not leaves:
    return None
  flat = [
    jnp.reshape(leaf, leaf.shape[:n] + (-1,)) for leaf, n in zip(leaves, leading, strict=True)
  ]
  return flat[0] if len(flat) == 1 else jnp.concatenate(flat, axis=-1)


def _norms(flats: Sequence[jax.Array | None], lead_shapes: Sequence[tuple[int, ...]]) -> list:
  """The L2 norm of each array over its last axis (zeros for None).

  Arrays of one shape and dtype are stacked and normed together: one reduction
  per group instead of one per layer, which keeps compilation short for deep
  unrolled models.
  """
  groups: dict[tuple[Any, ...], list[int]] = {}
  for i, flat in enumerate(flats):
    if flat is not None:
      groups.setdefault((flat.shape, flat.dtype), []).append(i)
  norms: list[Any] = [jnp.zeros(shape, jnp.float32) for shape in lead_shapes]
  for members in groups.values():
    if len(members) == 1:
      norms[members[0]] = l2_norm(flats[members[0]], axes=-1)
      continue
    stacked = l2_norm(jnp.stack([flats[i] for i in members]), axes=-1)
    for row, i in enumerate(members):
      norms[i] = stacked[row]
  return norms


def _leading_axes(
  stacked: Sequence[int], per_call: Sequence[int], what: str, path: _Path
) -> tuple[int, ...]:
  """How many leading (lifted-transform) axes each leaf has beyond its rank in one call."""
  lead = tuple(s - c for s, c in zip(stacked, per_call, strict=True))
  if any(n < 0 for n in lead):
    raise ValueError(
      f"grad_norms: the {what} of {'/'.join(path)!r} have lower rank in the variables "
      f"than in one call; list {GRAD_NORMS_COLLECTION!r} and 'params' with axis 0 in the "
      f"lifted transform's variable_axes."
    )
  return lead


# (perturbation location, its leading axes per leaf, module path, params leading
# axes per leaf, the leading shape) of one report entry.
_PlanEntry = tuple[_Path, tuple[int, ...], _Path, tuple[int, ...], tuple[int, ...]]


def _plan_entry(call: _Call, shapes: Mapping[str, Any], params: Mapping[str, Any]) -> _PlanEntry:
  output_shapes = [s.shape for s in jax.tree.leaves(_get(shapes, call.location))]
  output_lead = _leading_axes(
    [len(s) for s in output_shapes], call.output_ndims, "outputs", call.path
  )
  lead_shape = tuple(output_shapes[0][: output_lead[0]]) if output_shapes else ()
  param_leaves = jax.tree.leaves(_get(params, call.path) or {})
  params_lead = _leading_axes(
    [jnp.ndim(p) for p in param_leaves], jax.tree.leaves(call.params_ndims), "params", call.path
  )
  if len(set(params_lead)) > 1:  # mixed scanned and shared parameters: one norm
    params_lead = (0,) * len(params_lead)
  return call.location, output_lead, call.path, params_lead, lead_shape


@functools.partial(jax.jit, static_argnums=(2,))
def _report_norms(
  grad_params: Any, grad_perturbations: Any, plan: tuple[_PlanEntry, ...]
) -> list[tuple[jax.Array, jax.Array]]:
  # One compiled computation for all norms, cached per plan: eagerly, the
  # op-by-op version costs seconds of dispatch and compilation.
  flats, lead_shapes = [], []
  for location, output_lead, path, params_lead, lead_shape in plan:
    output_leaves = jax.tree.leaves(_get(grad_perturbations, location))
    param_leaves = jax.tree.leaves(_get(grad_params, path) or {})
    flats += [_flatten(output_leaves, output_lead), _flatten(param_leaves, params_lead)]
    lead_shapes += [lead_shape, lead_shape]
  norms = _norms(flats, lead_shapes)
  return list(zip(norms[::2], norms[1::2], strict=True))


def _keys(calls: Iterable[_Call]) -> list[str]:
  counts: dict[_Path, int] = {}
  keys = []
  for call in calls:
    index = counts.get(call.path, 0)
    counts[call.path] = index + 1
    joined = "/".join(call.path)
    keys.append(joined if index == 0 else f"{joined}#{index}")
  return keys


def _no_match_message(where: Any, seen: Iterable[tuple[str, str]]) -> str:
  calls = [f"{name} at {path!r}" for name, path in seen]
  listed = ", ".join(calls[:_SEEN_LISTED])
  if len(calls) > _SEEN_LISTED:
    listed += f", ... and {len(calls) - _SEEN_LISTED} more"
  return (
    f"grad_norms: `where` {where!r} matched no module call. The __call__s seen (module "
    f"type at path; '' is the top-level module) were: {listed or 'none'}. A class matches "
    f"by isinstance, a string is searched (re.search) in the '/'-joined path, a predicate "
    f"gets the module. If loss_fn calls a jax.jit-compiled apply, its cached trace skips "
    f"the module calls: call apply directly in loss_fn and jit the grad_norms call."
  )


def grad_norms(
  loss_fn: Callable[..., jax.Array],
  variables: Mapping[str, Any],
  *args: Any,
  where: Where,
  **kwargs: Any,
) -> Report:
  """Norms of the gradient at the output and at the parameters of selected module calls.

  A zero perturbation is added to the output of every ``__call__`` of a bound
  ``flax.linen`` module that ``where`` selects (like ``Module.perturb``, in the
  collection ``GRAD_NORMS_COLLECTION``); one ``jax.grad`` with respect to the
  parameters and the perturbations gives both kinds of gradient. The shapes of
  the perturbations come from an abstract pass (``jax.eval_shape``), so the
  arithmetic is one forward and one backward pass. Works under ``jax.jit`` with
  ``loss_fn`` and ``where`` static (``functools.partial`` or ``static_argnames``).

  "output" is the gradient as it arrives from the layers above, before any BGN
  node at that output normalizes it: BGN placed by :func:`bgn_jax.insert` inside
  ``loss_fn`` runs inside this function's interceptor, so the perturbation lands
  after the BGN node; a :class:`bgn_jax.BGN` layer fed the output directly is
  recognised and the perturbation moved after it. (A bare :func:`bgn_jax.bgn`
  call, or an ``insert`` that wraps the call of ``grad_norms`` itself, is not
  seen: its normalized gradient is reported.)

  Keys are module paths joined with "/" (``"Dense_3"``,
  ``"encoder/layer_1/Dense_0"``), in the order the calls return (input side
  first for a feed-forward stack; a selected module after the selected modules
  inside it); the result is an ``OrderedDict``, whose order survives ``jit``. A
  module called several times gets one entry per call: ``"Dense_0"``,
  ``"Dense_0#1"``, ``"Dense_0#2"``; its "params" entry is the same in each, the
  gradient summed over its calls.

  A module inside ``nn.scan`` (or ``nn.vmap``) gets one entry whose arrays have a
  leading axis per lifted transform, one value per iteration:
  ``report["layers/Dense_0"]["output"].shape == (length,)``, as do its "params"
  when the parameters are scanned (``variable_axes={"params": 0, ...}``; shared
  parameters give one norm). The transform must carry the perturbations: add
  ``GRAD_NORMS_COLLECTION`` (``"grad_norms"``) with axis 0 to its
  ``variable_axes``, otherwise ValueError. Listing it does nothing outside
  ``grad_norms``. For gradient norm against depth, :func:`depth_profile`
  flattens a report into one array ordered by depth (a scanned entry gives one
  value per iteration) and :func:`plot_grad_norms` draws it.

  ``loss_fn`` must call the modules directly: a ``jax.jit``-compiled apply
  inside it may reuse a trace made without this function's interceptor.

  Norms use :func:`bgn_jax.core.l2_norm`: float32 (float64 for float64
  gradients), exact for gradients far below the float32 range of their squares.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    loss_fn: ``loss_fn(variables, *args, **kwargs) -> scalar``; it must pass
      ``variables`` (or a dict that keeps their ``"grad_norms"`` entry) to
      ``model.apply``.
    variables: the model variables, with a ``"params"`` collection.
    *args: positional arguments for ``loss_fn``.
    where: a Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; or a regular expression (``str`` or compiled)
      searched in the "/"-joined module path.
    **kwargs: keyword arguments for ``loss_fn``.

  Returns:
    ``{path: {"output": norm, "params": norm}}``; each norm a 0-d array, or one
    with a leading axis per enclosing ``nn.scan``. Modules without parameters
    have ``"params"`` zero. Only floating-point leaves of a module's output are
    perturbed; "output" is their global norm.

  Raises:
    TypeError: ``loss_fn`` is not callable, ``variables`` not a mapping, or
      ``where`` of none of the accepted forms.
    ValueError: ``where`` matches no module call, ``variables`` already holds a
      ``"grad_norms"`` collection, ``loss_fn`` drops the perturbations, or an
      ``nn.scan`` that holds a selected module does not carry them.
  """
  if not callable(loss_fn):
    raise TypeError(f"grad_norms: `loss_fn` must be callable; got {type(loss_fn).__name__}.")
  if not isinstance(variables, Mapping):
    raise TypeError(
      f"grad_norms: `variables` must be a mapping of collections, e.g. model.init(...); "
      f"got {type(variables).__name__}."
    )
  if GRAD_NORMS_COLLECTION in variables:
    raise ValueError(
      f"grad_norms: `variables` already holds a {GRAD_NORMS_COLLECTION!r} collection; "
      f"that name is reserved for the perturbations grad_norms adds."
    )
  is_match = matcher(where)

  discovery = _Probe(is_match, discover=True)

  def shape_pass() -> jax.Array:
    with nn.intercept_methods(discovery):
      return loss_fn(variables, *args, **kwargs)

  jax.eval_shape(shape_pass)
  if not discovery.calls:
    raise ValueError(_no_match_message(where, discovery.seen))
  shapes: dict[str, Any] = {}
  for prefix, tree in discovery.grafts:
    _graft(shapes, prefix, tree)
  perturbations = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  # A call without a perturbation in the collection came from a trace whose
  # variables a lifted transform discarded (or had no floating-point output).
  calls = [c for c in discovery.calls if not c.output_ndims or _get(shapes, c.location)]

  def loss_of(params: Any, perturbations: Any) -> jax.Array:
    measured = dict(variables)
    measured["params"] = params
    measured[GRAD_NORMS_COLLECTION] = perturbations
    with nn.intercept_methods(_Probe(is_match, discover=False)):
      return loss_fn(measured, *args, **kwargs)

  params = variables.get("params", {})
  grad_params, grad_perturbations = jax.grad(loss_of, argnums=(0, 1))(params, perturbations)

  plan = tuple(_plan_entry(call, shapes, unfreeze(params)) for call in calls)
  norms = _report_norms(unfreeze(grad_params), grad_perturbations, plan)
  # An OrderedDict keeps the call order through jit (pytree dicts sort their keys).
  return collections.OrderedDict(
    (key, {"output": output, "params": params})
    for key, (output, params) in zip(_keys(calls), norms, strict=True)
  )


def depth_profile(report: Mapping[str, Mapping[str, Any]], quantity: str = "output") -> np.ndarray:
  """One ``quantity`` of a :func:`grad_norms` report as a 1-D array ordered by depth.

  Entries come in the report's order; an entry with leading ``nn.scan`` axes
  contributes one value per iteration, in iteration order.

  Args:
    report: what :func:`grad_norms` returned (concrete arrays, not tracers).
    quantity: ``"output"`` or ``"params"``.

  Returns:
    A float64 NumPy array, index 0 the first call (the input side).

  Raises:
    ValueError: ``quantity`` is not a key of the report's entries.
  """
  values = []
  for key, entry in report.items():
    if quantity not in entry:
      raise ValueError(
        f"depth_profile: `quantity` {quantity!r} is not in the entry {key!r}; "
        f"allowed are {sorted(entry)}."
      )
    values.append(np.asarray(entry[quantity], np.float64).reshape(-1))
  return np.concatenate(values) if values else np.zeros((0,))


_QUANTITY_LABELS = {
  "output": "norm of the gradient at the output",
  "params": "norm of the gradient of the params",
  "update": "relative update ||ΔW|| / ||W||",
}


def plot_grad_norms(
  runs: Mapping[str, Mapping[str, Mapping[str, Any]]],
  path: str | pathlib.Path,
  *,
  title: str | None = None,
  quantities: Sequence[str] = ("output", "params"),
  dpi: int = 120,
) -> pathlib.Path:
  """Plots gradient norms against depth on a log axis, several runs on the same axes.

  One panel per quantity; x is the depth from the input (1 = the first entry
  of the report, see :func:`depth_profile`), y the value on a log scale. Zero
  values cannot be drawn on a log axis and leave a gap. Besides ``"output"``
  and ``"params"`` any per-entry key can be drawn, e.g. ``"update"`` after
  ``report[k]["update"] = relative_updates(...)[k]``.

  Args:
    runs: ``{label: report}``, e.g. ``{"plain": report1, "BGN": report2}``, each a
      :func:`grad_norms` report (concrete arrays).
    path: where the PNG goes; missing parent folders are created.
    title: the figure title.
    quantities: the entry keys to draw, one panel each.
    dpi: resolution of the PNG.

  Returns:
    The path written.

  Raises:
    ImportError: matplotlib is not installed.
    ValueError: ``runs`` or ``quantities`` is empty, or an entry lacks a quantity.
  """
  try:
    from matplotlib.figure import Figure
  except ImportError as err:
    raise ImportError(
      "plot_grad_norms needs matplotlib, an optional dependency: "
      "pip install matplotlib (or pip install 'bgn_jax[cli]')."
    ) from err
  if not runs:
    raise ValueError("plot_grad_norms: `runs` is empty; give {label: grad_norms report}.")
  quantities = (quantities,) if isinstance(quantities, str) else tuple(quantities)
  if not quantities or not all(isinstance(q, str) for q in quantities):
    raise ValueError(
      f"plot_grad_norms: `quantities` must be a non-empty sequence of entry keys such as "
      f"'output' and 'params'; got {quantities!r}."
    )
  profiles = {q: {label: depth_profile(r, q) for label, r in runs.items()} for q in quantities}
  # The Figure API, not pyplot: no global backend or figure state is touched.
  figure = Figure(figsize=(5.0 * len(quantities), 4.0), layout="constrained")
  axes = figure.subplots(1, len(quantities), squeeze=False)[0]
  for ax, quantity in zip(axes, quantities, strict=True):
    for label, profile in profiles[quantity].items():
      shown = np.where(profile > 0, profile, np.nan)
      ax.plot(np.arange(1, profile.size + 1), shown, marker="o", markersize=3, label=label)
    ax.set_yscale("log")
    ax.set_xlabel("depth (1 = input side)")
    ax.set_ylabel(_QUANTITY_LABELS.get(quantity, quantity))
    ax.grid(True, which="major", alpha=0.3)
    ax.legend()
  if title:
    figure.suptitle(title)
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  figure.savefig(path, dpi=dpi, format="png")
  return path


def _module_paths(tree: Mapping[str, Any], prefix: _Path = ()) -> list[_Path]:
  """Paths of the nodes holding array leaves directly: the modules with parameters."""
  paths = [prefix] if any(not isinstance(v, Mapping) for v in tree.values()) else []
  for name, value in tree.items():
    if isinstance(value, Mapping):
      paths.extend(_module_paths(value, prefix + (str(name),)))
  return paths


def relative_updates(
  old_params: Mapping[str, Any],
  new_params: Mapping[str, Any],
  *,
  where: str | re.Pattern | Iterable[str] | None = None,
  scan_axes: int = 0,
) -> dict[str, jax.Array]:
  """The relative update ``||W_new - W_old|| / ||W_old||`` of each module's parameters.

  A pure function of two parameter trees, usable inside ``jax.jit`` (with
  ``where`` static); call it on the parameters before and after an optimizer
  step. Each module's norm is the global norm of its params subtree (its
  submodules included), computed with :func:`bgn_jax.core.l2_norm`. A zero
  ``||W_old||`` gives inf (nan when the update is zero too).

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    old_params: the ``"params"`` collection before the step.
    new_params: the same tree after the step.
    where: None for every module that holds parameters; a regular expression
      (``str`` or compiled) searched in the "/"-joined path; an iterable of
      paths; or a :func:`grad_norms` report, whose keys are used ("#k" call
      suffixes dropped) with the leading axes of its "params" entries.
    scan_axes: leading axes kept, one value per ``nn.scan`` iteration (1 for a
      scanned stack); ignored when ``where`` is a report.

  Returns:
    ``{path: ratio}``, float32 (float64 for float64 parameters), 0-d or with
    ``scan_axes`` leading axes.

  Raises:
    TypeError: ``where`` is a Module class or predicate (a parameter tree has no
      modules), or ``scan_axes`` is not an int.
    ValueError: a path in ``where`` is not in ``old_params``, the trees differ in
      structure, or ``scan_axes`` is negative.
  """
  if not isinstance(scan_axes, (int, np.integer)) or isinstance(scan_axes, (bool, np.bool_)):
    raise TypeError(f"relative_updates: `scan_axes` must be an int >= 0; got {scan_axes!r}.")
  if scan_axes < 0:
    raise ValueError(f"relative_updates: `scan_axes` must be an int >= 0; got {scan_axes!r}.")
  old_params, new_params = unfreeze(old_params), unfreeze(new_params)
  if jax.tree.structure(old_params) != jax.tree.structure(new_params):
    raise ValueError(
      "relative_updates: `old_params` and `new_params` differ in structure; pass the "
      "same collection before and after a step."
    )
  leading: dict[str, int] = {}
  if where is None or isinstance(where, (str, re.Pattern)):
    is_match = None if where is None else matcher(where)
    for path in _module_paths(old_params):
      joined = "/".join(path)
      if is_match is None or is_match(None, joined):
        leading[joined] = int(scan_axes)
  elif (
    isinstance(where, type)
    or callable(where)
    or (isinstance(where, tuple) and any(isinstance(w, type) for w in where))
  ):
    raise TypeError(
      f"relative_updates: `where` {where!r} needs modules, but a parameter tree has "
      f"none; give a regular expression on the path, an iterable of paths, a "
      f"grad_norms report, or None."
    )
  elif isinstance(where, Iterable):
    for key in where:
      if not isinstance(key, str):
        raise TypeError(f"relative_updates: `where` must hold path strings; got {key!r}.")
      path = key.split("#")[0]
      entry = where[key] if isinstance(where, Mapping) else None
      params = entry.get("params") if isinstance(entry, Mapping) else None
      leading[path] = int(np.ndim(params)) if params is not None else int(scan_axes)
  else:
    raise TypeError(
      f"relative_updates: `where` must be None, a regular expression, an iterable of "
      f"paths or a grad_norms report; got {where!r}."
    )
  plan = []
  for joined, lead in leading.items():
    path = tuple(joined.split("/")) if joined else ()
    old = _get(old_params, path)
    if old is None:
      raise ValueError(
        f"relative_updates: no parameters at {joined!r} in `old_params`; the module "
        f"paths holding parameters are {['/'.join(p) for p in _module_paths(old_params)]}."
      )
    shapes = [jnp.shape(leaf) for leaf in jax.tree.leaves(old)]
    if any(len(shape) < lead for shape in shapes):
      raise ValueError(
        f"relative_updates: the parameters at {joined!r} have fewer than {lead} axes, "
        f"the leading (scan) axes asked for."
      )
    plan.append((path, lead, tuple(shapes[0][:lead]) if shapes else ()))
  ratios = _relative_norms(old_params, new_params, tuple(plan))
  return collections.OrderedDict(zip(leading, ratios, strict=True))


@functools.partial(jax.jit, static_argnums=(2,))
def _relative_norms(
  old_params: Any, new_params: Any, plan: tuple[tuple[_Path, int, tuple[int, ...]], ...]
) -> list[jax.Array]:
  flats, lead_shapes = [], []
  for path, lead, lead_shape in plan:
    old_leaves = jax.tree.leaves(_get(old_params, path))
    new_leaves = jax.tree.leaves(_get(new_params, path))
    deltas = [n - o for n, o in zip(new_leaves, old_leaves, strict=True)]
    axes = [lead] * len(old_leaves)
    flats += [_flatten(deltas, axes), _flatten(old_leaves, axes)]
    lead_shapes += [lead_shape, lead_shape]
  norms = _norms(flats, lead_shapes)
  return [delta / old for delta, old in zip(norms[::2], norms[1::2], strict=True)]
