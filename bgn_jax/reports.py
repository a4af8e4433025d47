"""Framework-free helpers on gradient-norm reports and parameter trees.

:func:`depth_profile` flattens a ``grad_norms`` report into one array ordered by
depth, :func:`plot_grad_norms` draws reports against depth, and
:func:`relative_updates` gives ``||W_new - W_old|| / ||W_old||`` per module, which
shows whether the deepest layers keep being updated.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import collections
import functools
import pathlib
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from bgn_jax._common import Path, flatten_leaves, get_path, group_norms, matcher

__all__ = ["depth_profile", "plot_grad_norms", "relative_updates"]


def _to_dicts(tree: Any) -> Any:
  """Nested mappings (FrozenDict, nnx.State, dict) as plain dicts, leaves kept.

  Keys become strings, as they appear in "/"-joined paths: an ``nnx.State`` has the
  int indices of ``nnx.List`` items as keys.
  """
  if isinstance(tree, Mapping):
    return {str(key): _to_dicts(value) for key, value in tree.items()}
  if _is_variable(tree):
    return tree.get_value()
  return tree


def _is_variable(leaf: Any) -> bool:
  """A mutable box holding an array, as ``nnx.Variable`` (duck-typed: no flax import)."""
  return not isinstance(leaf, jax.Array) and callable(getattr(leaf, "get_value", None))


def _shared_variables(old: Any, new: Any) -> list[str]:
  """Paths where ``old`` and ``new`` hold the same Variable object."""
  if isinstance(old, Mapping) and isinstance(new, Mapping):
    return [
      f"{key}/{path}" if path else str(key)
      for key in old
      if key in new
      for path in _shared_variables(old[key], new[key])
    ]
  return [""] if _is_variable(old) and old is new else []


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


def _module_paths(tree: Mapping[str, Any], prefix: Path = ()) -> list[Path]:
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
    old_params: the ``"params"`` collection before the step (linen), or
      ``nnx.state(model, nnx.Param)`` (nnx; paths are the "/"-joined attribute
      paths, ``"layers/0"``).
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
      structure, they hold the same (mutable) Variable objects, or ``scan_axes`` is
      negative.
  """
  if not isinstance(scan_axes, (int, np.integer)) or isinstance(scan_axes, (bool, np.bool_)):
    raise TypeError(f"relative_updates: `scan_axes` must be an int >= 0; got {scan_axes!r}.")
  if scan_axes < 0:
    raise ValueError(f"relative_updates: `scan_axes` must be an int >= 0; got {scan_axes!r}.")
  shared = _shared_variables(old_params, new_params)
  if shared:
    raise ValueError(
      f"relative_updates: `old_params` and `new_params` hold the same Variable objects "
      f"(at {shared[:3]}), so the tree before the step changed with the model: "
      f"nnx.state returns the model's Variables, not a copy. Take the tree before the "
      f"step as arrays, old = nnx.to_pure_dict(nnx.state(model, nnx.Param)), or from "
      f"the state of a copy (nnx.clone)."
    )
  old_params, new_params = _to_dicts(old_params), _to_dicts(new_params)
  if jax.tree.structure(old_params) != jax.tree.structure(new_params):
    raise ValueError(
      "relative_updates: `old_params` and `new_params` differ in structure; pass the "
      "same collection before and after a step."
    )
  leading: dict[str, int] = {}
  if where is None or isinstance(where, (str, re.Pattern)):
    is_match = None if where is None else matcher(where, fn_name="relative_updates")
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
    old = get_path(old_params, path)
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
  old_params: Any, new_params: Any, plan: tuple[tuple[Path, int, tuple[int, ...]], ...]
) -> list[jax.Array]:
  flats, lead_shapes = [], []
  for path, lead, lead_shape in plan:
    old_leaves = jax.tree.leaves(get_path(old_params, path))
    new_leaves = jax.tree.leaves(get_path(new_params, path))
    deltas = [n - o for n, o in zip(new_leaves, old_leaves, strict=True)]
    axes = [lead] * len(old_leaves)
    flats += [flatten_leaves(deltas, axes), flatten_leaves(old_leaves, axes)]
    lead_shapes += [lead_shape, lead_shape]
  norms = group_norms(flats, lead_shapes)
  return [delta / old for delta, old in zip(norms[::2], norms[1::2], strict=True)]
