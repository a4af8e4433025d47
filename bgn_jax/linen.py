"""BGN for ``flax.linen``: the layer, :func:`insert`, :func:`placements` and :func:`grad_norms`.

:class:`BGN` is a thin module around :func:`bgn_jax.bgn`. :func:`insert` wraps a
``model.apply``-like function so that, while it runs, the outputs (or inputs) of
the selected submodule calls pass through :func:`bgn_jax.bgn`; it uses
:func:`flax.linen.intercept_methods`, and parameters, forward values and
returned state are untouched. :func:`grad_norms` measures, in one forward and
one backward pass, the norm of the gradient at the output and at the parameters
of each selected module call.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import inspect
import sys
from collections.abc import Callable, Iterator, Mapping
from typing import Any, Literal, ParamSpec, TypeVar, cast

import flax.core.axes_scan
import flax.core.lift
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax.core import unfreeze

from bgn_jax import _common
from bgn_jax._common import TAP_SHAPE, Path, Placements, Position, Report, Where
from bgn_jax.core import Axes, AxisName, TargetNorm

__all__ = ["BGN", "GRAD_NORMS_COLLECTION", "grad_norms", "insert", "placements", "remove"]

P = ParamSpec("P")
ScanBody = Literal["error", "per_step"]
R = TypeVar("R")


class BGN(nn.Module):
  """Backward Gradient Normalization layer (identity forward, normalized backward).

  It has no parameters and no state; see :func:`bgn_jax.bgn` for the rule.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Attributes:
    axes: None for one group over the whole array, or the axes of each group.
    target_norm: a positive float, ``"sqrt_units"`` (the default) or
      ``"sqrt_size"`` (see :func:`bgn_jax.bgn`).
    power: c in [0, 1].
    eps: floor on the norm, >= 0.
    axis_name: mapped axis name(s) over which the squared norm is summed.
  """

  axes: Axes = None
  target_norm: TargetNorm = "sqrt_units"
  power: float = 1.0
  eps: float = 0.0
  axis_name: AxisName = None

  def __post_init__(self) -> None:
    # Options that do not depend on the input shape are checked at construction, as in
    # the nnx and equinox layers; axes and the shape-dependent target at the call.
    _common.check_layer("bgn_jax.linen.BGN", self)
    super().__post_init__()

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return _common.layer_bgn(self, x)


def module_path(module: Any) -> str:
  """The path of a bound linen module, its scope names joined with "/"."""
  path = getattr(module, "path", None)
  if path is None and getattr(module, "scope", None) is not None:
    path = module.scope.path
  return "/".join(str(p) for p in (path or ()))


_TRACE_KEY = jax.make_user_context(None)


@contextlib.contextmanager
def _own_traces(token: object) -> Iterator[None]:
  """Gives every ``jax.jit`` called inside (``nn.jit`` too) trace cache entries of its own.

  An interceptor changes what a trace holds, but jit keys its cache on the function
  and its arguments: without the token, a trace made under an interceptor would be
  reused by a plain call of the same jitted function, and the other way round.
  Nesting keeps the outer tokens, so each combination of interceptors is apart.
  """
  with _TRACE_KEY((_TRACE_KEY.value, token)):
    yield


_LIFT_FILE = inspect.getsourcefile(flax.core.lift)
_TRANSFORMS_FILE = inspect.getsourcefile(nn.transforms)
_PER_STEP = ("scan", "while_loop")  # lifted transforms whose body runs once per step


def _per_step_body(module: nn.Module, method: Callable[..., Any]) -> str | None:
  """The lifted loop (``"scan"``, ``"while_loop"``) whose body is this very call, or None.

  Flax intercepts a module whose ``__call__`` a lifted transform wraps (``nn.scan(Cls)``
  or ``@nn.scan`` on the method) only inside the transform's body, on a clone bound to
  the body's own root scope. A module that such a body merely calls (the cell that
  ``nn.RNN`` scans) is not the body: its method is not the transformed function.
  The frames read here are flax's (``core_fn`` and ``wrapped_fn`` in
  ``flax/linen/transforms.py``, the transforms in ``flax/core/lift.py``); the tests
  of the scanned forms fail if a flax release renames them.
  """
  if module.scope is None or module.scope.parent is not None:
    return None
  frame = sys._getframe(1)
  body_found = False
  while frame is not None:
    code = frame.f_code
    if code.co_filename == _TRANSFORMS_FILE:
      if code.co_name == "core_fn" and not body_found:
        local = frame.f_locals
        body = local.get("class_fn", local.get("fn"))
        if local.get("cloned") is not module or body is None:
          return None
        if inspect.unwrap(body) is not inspect.unwrap(method):
          return None
        body_found = True
      elif code.co_name == "wrapped_fn" and body_found:
        return None
    elif body_found and code.co_filename == _LIFT_FILE:
      transform = code.co_qualname.split(".")[0]
      if transform in _PER_STEP:
        return transform
    frame = frame.f_back
  return None


_AXES_SCAN_FILE = inspect.getsourcefile(flax.core.axes_scan)


def _in_shape_trace() -> bool:
  """Whether this runs in the trace that ``nn.scan`` makes of its body, before the loop,
  to find which outputs are broadcast (``body_fn(..., init_mode=True)`` in flax's
  ``axes_scan``): not a step, so :func:`placements` does not count it."""
  frame = sys._getframe(1)
  while frame is not None:
    code = frame.f_code
    if code.co_filename == _AXES_SCAN_FILE and code.co_name == "body_fn":
      return bool(frame.f_locals.get("init_mode"))
    frame = frame.f_back
  return False


def _variable_names(module: nn.Module) -> dict[int, str]:
  """The variables of the module's root scope, by ``id``, as "collection/module path/name".

  Inside a lifted transform the root is the body's: its variables are the ones the
  body sees (sliced or broadcast), under the path of the body's module.
  """
  if module.scope is None:
    return {}
  root = module.scope.root
  flat, _ = jax.tree_util.tree_flatten_with_path(unfreeze(cast(dict, root.variables())))
  names = {}
  for path, leaf in flat:
    collection, *rest = (str(getattr(k, "key", k)) for k in path)
    names[id(leaf)] = "/".join((collection, *map(str, root.path), *rest))
  return names


def _owned(module: nn.Module, before: dict[int, str]) -> _common.Owned:
  """The reason a leaf is one of the model's variables: one of ``before`` (the variables
  as the call began) or a parameter (one that ``init`` creates in the call and returns)."""
  variables: dict[int, str] | None = None

  def owned(leaf: Any) -> str | None:
    nonlocal variables
    if variables is None:
      now = _variable_names(module).items()
      variables = before | {i: name for i, name in now if name.startswith("params/")}
    name = variables.get(id(leaf))
    return None if name is None else f"the model variable {name!r} passed through"

  return owned


# The module objects whose current call an insert has claimed: (its node's marker, where).
_CLAIMS: contextvars.ContextVar[dict[int, tuple[Any, Any]] | None] = contextvars.ContextVar(
  "bgn_jax_linen_claims", default=None
)


class _Insertion(_common.Insertion):
  """What one :func:`insert` keeps across the calls of the function it returns; called
  by flax as the interceptor of those calls, it puts the nodes.

  Equal inserts (the same ``apply_fn``, ``where``, position, every, options and
  ``scan_body``) share one, held for the process's life as jit holds its traces: they
  share jit traces, so they must choose the same modules, and a call that sees no
  module call at all reused a trace in which an equal insert placed nodes. Matches are
  numbered once, in the order of their first call, and the numbers are kept: a call
  that reuses a cached trace (``jax.jit``, ``nn.jit``) does not run the module calls
  inside it, so numbering afresh would shift the later ones.
  """

  argument = "fn"
  matches_at_call = True

  def __init__(
    self,
    apply_fn: Callable[..., Any],
    where: Where,
    position: Position,
    every: int,
    bgn_options: dict[str, Any],
    scan_body: str,
  ):
    super().__init__("linen", where, position, every, bgn_options, extra=(apply_fn, scan_body))
    self.is_match = _common.matcher(where, fn_name=self.fn_name, module_type=nn.Module)
    self.scan_body = scan_body

  def run(
    self, apply_fn: Callable[..., Any], args: Any, kwargs: Any, token: object, verify: bool = True
  ) -> Any:
    claims = _CLAIMS.get()
    reset = _CLAIMS.set({}) if claims is None else None
    try:
      with self.whole_call(verify), _own_traces(token), nn.intercept_methods(self):
        return apply_fn(*args, **kwargs)
    finally:
      if reset is not None:
        _CLAIMS.reset(reset)

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
    name = type(module).__name__
    check = self.current_check()
    check.seen[(name, path)] = None
    if not self.is_match(module, path):
      return next_fun(*args, **kwargs)
    # Matches are counted by path, not by call: a lifted transform may trace its
    # body more than once (nn.scan does, by default), and a retrace cannot be told
    # apart from a second call. So a module called twice is one match, and all of
    # its calls share the decision.
    skip = self.skipped(path)
    claims = cast(dict, _CLAIMS.get())
    if skip is None and not self._claim(module, path, context, claims):
      # The same node: the enclosing insert places it.
      check.matched.setdefault((name, path), "its node placed by an enclosing insert")
      return next_fun(*args, **kwargs)
    try:
      # The variables as the call begins: a value the call stores in one (`sow`, an
      # assigned variable) is an output it computed, not a variable passed through.
      owned = _owned(module, _variable_names(module) if skip is None else {})
      record = not (_common.is_recording() and _in_shape_trace())

      def noded(tree: Any) -> Any:
        return self.place(path, name, tree, owned, module=module, skip=skip, record=record)

      if self.position == "before":
        args = noded(args)
        return next_fun(*args, **kwargs)
      return noded(next_fun(*args, **kwargs))
    finally:
      if skip is None:
        claims.pop(id(module), None)

  def _claim(
    self, module: nn.Module, path: str, context: Any, claims: dict[int, tuple[Any, Any]]
  ) -> bool:
    """Claims the call of ``module`` for this insert's node; False where an enclosing
    insert has claimed it for the same node. Raises where the call is a scan's body
    (unless ``scan_body="per_step"``) or an enclosing insert claimed it for another
    node."""
    name = type(module).__name__
    transform = _per_step_body(module, context.orig_method.func)
    if transform is not None and self.scan_body != "per_step":
      raise ValueError(
        f"bgn_jax.linen.insert: `where` {self.where!r} matched {name} at {path!r}, whose "
        f"__call__ is the body of an nn.{transform}: flax calls it once per step, inside "
        f"the loop. For a node on each step's output (a node after every layer of a "
        f"scanned stack), pass scan_body='per_step'. For nodes on the values the loop "
        f"returns, apply bgn_jax.bgn (or bgn_jax.linen.BGN) to them in the calling "
        f"module; for nodes inside each step, select the modules the body calls (e.g. its "
        f"cell); to leave it out, narrow `where` (a path regex or a predicate)."
      )
    claimed = claims.get(id(module))
    if claimed is not None:
      if claimed[0] != self.node_marker:
        raise ValueError(
          f"bgn_jax.linen.insert: the module call at {path!r} ({name}) already gets a BGN "
          f"node from the insert with `where` {claimed[1]!r} and "
          f"{_common.options_text(claimed[0])}; this insert (`where` {self.where!r}) asks "
          f"for {_common.options_text(self.node_marker)}. Insert once, with the options "
          f"you mean."
        )
      return False
    claims[id(module)] = (self.node_marker, self.where)
    return True


_INSERTIONS: dict[Any, _Insertion] = {}  # equal inserts, by key (see _Insertion)


def insert(
  apply_fn: Callable[P, R],
  *,
  where: Where,
  position: Position = "after",
  every: int = 1,
  scan_body: ScanBody = "error",
  **bgn_options: Any,
) -> Callable[P, R]:
  """Returns ``apply_fn`` with BGN nodes after (or before) the selected module calls.

  Every ``__call__`` of a bound ``flax.linen`` module made while the returned
  function runs is tested against ``where``; the selected ones get
  :func:`bgn_jax.bgn` on the floating-point ``jax.Array`` leaves of their output
  (``position="after"``) or of their positional arguments (``"before"``; keyword
  arguments are left alone). Other methods (``encode``, ``setup``, methods of
  lifted transforms) are never matched, but the modules they call are. A leaf
  that is one of the model's variables (a parameter a module returns unchanged,
  as the ``DenseParams`` inside ``nn.OptimizedLSTMCell`` do) never gets a node;
  :func:`placements` lists it, and every other skipped leaf, with the reason.

  The forward pass, the parameters and every returned value, ``mutable``
  collections included, are bit for bit those of ``apply_fn``; only gradients
  change. Matching happens at trace time, so it works under ``jit`` and
  ``grad``, and inside ``nn.remat``, ``nn.jit`` and ``nn.vmap`` bodies and the
  bodies of ``nn.scan`` (``nn.RNN``): a module the scan body calls gets a node at
  every step. ``apply_fn`` may itself be ``jax.jit``-compiled, and the model may
  use ``nn.jit``: the returned function traces them apart from their plain calls,
  so it gets its nodes at every call and the plain function never does.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    apply_fn: ``model.apply`` of a linen module, or any function that calls
      linen modules, e.g. ``functools.partial(model.apply, method=model.encode)``
      or ``jax.jit(model.apply)``.
    where: a Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; or a regular expression (``str`` or compiled),
      searched in the module path joined with "/" (``r"Dense_\\d+$"``,
      ``r"^encoder/"``; the top-level module has the path ``""``).
    position: ``"after"`` the module's output, or ``"before"`` its positional
      inputs.
    every: keep every ``every``-th matched module, starting with the first
      (``matches[::every]``). Matched modules are told apart by path and
      numbered in the order of their first call, once for all calls of the
      returned function, so the same layers are chosen at every step. All calls
      of a module share its decision: a module called twice, a scanned stack,
      and a body that a lifted transform traces twice each count once.
    scan_body: what a match whose ``__call__`` is the body of an ``nn.scan``
      (``nn.scan(Block, ...)``, ``nn.remat_scan``) gets: ``"error"`` (the
      default) raises, since a node there normalizes every step's carry, not
      the values the loop returns; ``"per_step"`` puts a node on each step's
      output, as a node placed by hand at the end of the body would (a node
      after every layer of a scanned stack).
    **bgn_options: ``axes``, ``target_norm``, ``power``, ``eps``, ``axis_name``,
      passed to :func:`bgn_jax.bgn` for every node.

  Returns:
    A function with the signature and return values of ``apply_fn``; give it to
    :func:`placements` to see where its nodes are.

  Raises:
    TypeError: ``apply_fn`` is not callable, ``where``, ``position``, ``every``
      or a BGN option has the wrong type (a module instance as ``where`` too),
      or an option name is unknown.
    ValueError: an argument is out of range, or ``where`` is not a valid regular
      expression. The returned function raises ValueError when ``where``
      matches no module call (checked at the first call); when a call's matches
      have no floating-point leaf to normalize (integer or boolean outputs,
      parameters passed through; checked at every traced call); and
      when it matches a module whose ``__call__`` is the body of an ``nn.scan``
      (or ``nn.while_loop``), where a node would land on every step's carry
      instead of on the values the loop returns.
  """
  _common.check_framework("bgn_jax.linen.insert", "apply_fn", apply_fn, "linen")
  if isinstance(apply_fn, nn.Module):
    raise TypeError(
      f"bgn_jax.linen.insert: `apply_fn` is the module {type(apply_fn).__name__}; pass "
      f"its apply function, insert(model.apply, where=...)."
    )
  if not callable(apply_fn):
    raise TypeError(
      f"bgn_jax.linen.insert: `apply_fn` must be callable, e.g. model.apply; got "
      f"{type(apply_fn).__name__}."
    )
  if scan_body not in ("error", "per_step"):
    raise ValueError(
      f"bgn_jax.linen.insert: `scan_body` must be 'error' or 'per_step'; got {scan_body!r}."
    )
  made = _Insertion(apply_fn, where, position, every, bgn_options, scan_body)
  insertion = _INSERTIONS.setdefault(made.key, made)

  @functools.wraps(apply_fn)
  def apply_with_bgn(*args: P.args, **kwargs: P.kwargs) -> R:
    return insertion.run(apply_fn, args, kwargs, insertion.key)

  apply_with_bgn._bgn_insert = (insertion, apply_fn)  # type: ignore[attr-defined]
  return apply_with_bgn


def _check_fn(fn: Any, fn_name: str) -> None:
  _common.check_framework(fn_name, "fn", fn, "linen")
  if not callable(fn):
    raise TypeError(f"{fn_name}: `fn` must be a function; got {type(fn).__name__}.")


def _inserted(fn: Any, fn_name: str) -> tuple[_Insertion, Callable[..., Any]]:
  _check_fn(fn, fn_name)
  inserted = getattr(fn, "_bgn_insert", None)
  if not isinstance(inserted, tuple) or not isinstance(inserted[0], _Insertion):
    raise ValueError(_common.no_nodes_message(fn_name, "fn", fn))
  return inserted


def remove(fn: Callable[P, R]) -> Callable[P, R]:
  """The function that :func:`insert` was given: ``fn`` without its BGN nodes.

  Args:
    fn: a function returned by :func:`insert` (nested inserts are all taken off).

  Returns:
    The original ``apply_fn``; ``fn`` itself where it has no node.

  Raises:
    TypeError: ``fn`` is not callable, or is an nnx or equinox model.
  """
  _check_fn(fn, "bgn_jax.linen.remove")
  while isinstance(inserted := getattr(fn, "_bgn_insert", None), tuple):
    fn = inserted[1]
  return fn


def placements(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Placements:
  """Where the function :func:`insert` returned puts its nodes, for these arguments.

  Runs ``fn(*args, **kwargs)`` abstractly (``jax.eval_shape``: shapes only, no
  arithmetic) and lists, in call order, one record per leaf of each matched
  module call: a node, or a skipped leaf with the reason (not floating-point, a
  model variable passed through, left out by ``every``). The calls of a module
  called several times share their records, and ``count`` says how many times
  the row's node is applied (a scan's body runs once per step here); inside a
  lifted transform a shape is the one one step (or one mapped instance) sees.

  Args:
    fn: a function returned by :func:`insert`.
    *args: its positional arguments, as for a real call; arrays may be given as
      ``jax.ShapeDtypeStruct`` (``jax.eval_shape(model.init, ...)`` gives variables).
    **kwargs: its keyword arguments.

  Returns:
    A :class:`bgn_jax.Placements`, a list of ``Placement(path, module, position,
    leaf, shape, dtype, reason, count)``, ``reason`` None for a node, that prints
    as a table.

  Raises:
    TypeError: ``fn`` is not callable, or is an nnx or equinox model.
    ValueError: ``fn`` has no BGN node (it was not returned by :func:`insert`),
      or ``where`` matches no module call in this call.
  """
  insertion, apply_fn = _inserted(fn, "bgn_jax.linen.placements")
  # Arrays (and jax.ShapeDtypeStructs) go in abstractly; flags such as `mutable` or
  # `train` stay the Python values the function expects.
  arrays, rebuild = _common.split_arguments(
    args, kwargs, lambda leaf: isinstance(leaf, (jax.Array, np.ndarray, jax.ShapeDtypeStruct))
  )

  def trace(*given: Any) -> Any:
    call_args, call_kwargs = rebuild(*given)
    # A token of its own: cached traces would skip the module calls it records.
    return insertion.run(apply_fn, call_args, call_kwargs, object(), verify=False)

  with _common.recording() as recorder:
    jax.eval_shape(trace, *arrays)
  return recorder.placements()


GRAD_NORMS_COLLECTION = "grad_norms"
"""The collection of grad_norms's taps; list it in nn.scan's variable_axes."""


def _tap_name(index: int) -> str:
  """The name of the tap of a module's ``index``-th call, where the probe makes it and
  where the report reads it."""
  return f"call_{index}"


class _Probe(_common.TapPass):
  """A pass of :func:`grad_norms`; called by flax as the interceptor of ``loss_fn``'s
  module calls, it runs the selected ones through :meth:`probed`.

  A call's tap is a variable of its module in the collection
  ``GRAD_NORMS_COLLECTION``, so that lifted transforms (``nn.scan``) stack it per
  iteration as they stack parameters. In the shape pass ("discover") each top-level
  module call is run again as ``apply(..., mutable=True)``, so that the zero taps are
  created as variables; in the measured pass they come in with the variables. A body
  that a lifted transform traces more than once (``nn.scan`` traces it twice) takes a
  tap per trace; the traces whose variables the transform discards leave no tap, and
  the shape pass drops their calls. Every floating-point leaf of an output is
  measured, the model's variables passed through included.
  """

  def __init__(self, is_match: Callable[[Any, str], bool], discover: bool):
    super().__init__(discover)
    self._is_match = is_match
    self._depth = 0  # nesting of intercepted calls; 0 is a top-level call
    self._reapplying = False  # the next call is the shape pass's re-applied top call
    self._prefix: Path = ()  # path of the module the shape pass re-applies
    self.parts: dict[str, Path] = {}  # the scope names of each selected path
    self.grafts: list[tuple[Path, Any]] = []  # (prefix, tap shapes) per apply
    self.seen: dict[tuple[str, str], None] = {}  # (type name, path) of __call__s

  def _parts(self, module: nn.Module) -> Path:
    return self._prefix + tuple(str(p) for p in module.path)

  def path_of(self, module: Any) -> str | None:
    parts = self._parts(module)
    path = "/".join(parts)
    if not self._is_match(module, path):
      return None
    self.parts[path] = parts
    return path

  def params_of(self, module: Any) -> list[Any]:
    return jax.tree.leaves(unfreeze(cast(dict, module.variables.get("params", {}))))

  def owned_of(self, module: Any) -> _common.Owned:
    return lambda leaf: None

  def tap_of(self, module: Any, path: str, index: int, dtype: Any) -> jax.Array | None:
    name = _tap_name(index)
    if module.has_variable(GRAD_NORMS_COLLECTION, name):
      return module.get_variable(GRAD_NORMS_COLLECTION, name)
    if self.discover:
      if not module.is_mutable_collection(GRAD_NORMS_COLLECTION):
        raise ValueError(_uncarried_message(path))
      return module.variable(GRAD_NORMS_COLLECTION, name, jnp.zeros, TAP_SHAPE, dtype).value
    if GRAD_NORMS_COLLECTION in module.variables:
      return None  # a trace whose variables the lifted transform discards
    raise ValueError(
      f"bgn_jax.linen.grad_norms: no {GRAD_NORMS_COLLECTION!r} tap reached the module "
      f"call at {path!r}. loss_fn must pass the `variables` it receives to apply as they "
      f"are: grad_norms adds the {GRAD_NORMS_COLLECTION!r} collection to them."
    )

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
    elif self.discover and self._depth == 0:
      return self._reapply(context, args, kwargs)
    self._depth += 1
    try:
      if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
      outputs = self.probed(module, lambda _, *a, **k: next_fun(*a, **k), *args, **kwargs)
    finally:
      self._depth -= 1
    self.seen[(type(module).__name__, "/".join(self._parts(module)))] = None
    return outputs

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


def _uncarried_message(joined: str) -> str:
  """The error for a selected call inside a lifted transform that drops the taps."""
  transform, rnn = _enclosing_transform(sys._getframe(1))
  if rnn is not None:
    return (
      f"bgn_jax.linen.grad_norms: the module call at {joined!r} runs inside the nn.RNN at "
      f"{module_path(rnn)!r}, whose scan does not carry the {GRAD_NORMS_COLLECTION!r} "
      f"collection. Give it one value per step: nn.RNN(cell, variable_axes="
      f"{{{GRAD_NORMS_COLLECTION!r}: 0}}) (the params stay broadcast), or select modules "
      f"outside the RNN."
    )
  name = f"nn.{transform}" if transform else "a lifted transform (nn.scan, nn.vmap, ...)"
  return (
    f"bgn_jax.linen.grad_norms: the module call at {joined!r} runs inside {name}, which "
    f"does not carry the {GRAD_NORMS_COLLECTION!r} collection. Add it with axis 0, e.g. "
    f"{name if transform else 'nn.scan'}(..., variable_axes={{'params': 0, "
    f"{GRAD_NORMS_COLLECTION!r}: 0}}) ({GRAD_NORMS_COLLECTION!r}: 0 alone where the "
    f"params are broadcast), or select modules outside the transform."
  )


def _enclosing_transform(frame: Any) -> tuple[str | None, nn.Module | None]:
  """The innermost lifted transform running ``frame`` (e.g. "scan"), and the nn.RNN
  that applied it, if one did."""
  transform = None
  while frame is not None:
    code = frame.f_code
    if transform is None:
      if code.co_filename == _LIFT_FILE and not code.co_qualname.startswith("pack."):
        transform = code.co_qualname.split(".")[0]
    elif code.co_filename == _TRANSFORMS_FILE and code.co_name == "wrapped_fn":
      caller = frame.f_back
      for _ in range(3):  # the module method that applied the transform
        if caller is None:
          break
        if caller.f_code.co_qualname == "RNN.__call__":
          return transform, caller.f_locals.get("self")
        caller = caller.f_back
      return transform, None
    frame = frame.f_back
  return transform, None


def _graft(tree: dict[str, Any], prefix: Path, subtree: Mapping[str, Any]) -> None:
  for name in prefix:
    tree = tree.setdefault(name, {})
  for name, value in subtree.items():
    if isinstance(value, Mapping):
      _graft(tree, (name,), value)
    else:
      tree[name] = value


@contextlib.contextmanager
def _probing(probe: _Probe, token: object) -> Iterator[None]:
  with _common.listening(probe), _own_traces(token), nn.intercept_methods(probe):
    yield


def grad_norms(loss_fn: Callable[..., jax.Array], *, where: Where) -> Callable[..., Report]:
  """Norms of the gradient at the output and at the parameters of selected module calls.

  A tap rides on the output of every ``__call__`` of a bound ``flax.linen``
  module that ``where`` selects: a variable of a few zeros in the collection
  ``GRAD_NORMS_COLLECTION``, whose gradient (a ``custom_vjp``) is the squared
  norm of the gradient at that output, whatever its size. One ``jax.grad`` with
  respect to the parameters and the taps gives both kinds of gradient. The taps
  are made by an abstract pass (``jax.eval_shape``), so the arithmetic is one
  forward and one backward pass. ``grad_norms(loss_fn,
  where=...)`` returns a function of the loss's arguments, as ``jax.grad`` does:
  ``jax.jit(grad_norms(loss_fn, where=nn.Dense))(variables, x, y)``.

  Two gradients are reported at an output. ``"output"`` is always the gradient of
  the loss with respect to the module's output, summed over all its consumers
  (a residual path included): the tap sits where the module returns.
  Where a BGN node sits directly on that output (a node of :func:`insert` inside
  ``loss_fn``, or a :class:`BGN` layer fed the output), ``"at_bgn"`` is the raw
  gradient arriving at the node, before it normalizes it (the gradient at the
  node's output). A node that :func:`insert` puts ``position="before"`` a
  selected module sits on its inputs: its ``"at_bgn"`` is the gradient arriving
  at that node (at the inputs the module sees). With the node as the only
  consumer, ``"output"`` is then the normalized gradient and ``"at_bgn"`` the
  one the layers above sent. A bare :func:`bgn_jax.bgn` call, or an ``insert``
  that wraps the call of ``grad_norms`` itself, is not seen as a node: no ``"at_bgn"`` there.

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
  parameters give one norm). The transform must carry the taps: add
  ``GRAD_NORMS_COLLECTION`` (``"grad_norms"``) with axis 0 to its
  ``variable_axes`` (for ``nn.RNN``, whose params are broadcast:
  ``nn.RNN(cell, variable_axes={"grad_norms": 0})``), otherwise ValueError.
  Listing it does nothing outside ``grad_norms``. For gradient norm against
  depth, :func:`depth_profile` flattens a report into one array ordered by depth
  (a scanned entry gives one value per iteration) and :func:`plot_grad_norms`
  draws it.

  ``loss_fn`` may call a ``jax.jit``-compiled apply (or a model with ``nn.jit``):
  their traces under ``grad_norms`` are made apart from their plain calls.

  Norms use :func:`bgn_jax.core.l2_norm`: float32 (float64 for float64
  gradients), exact for gradients far below the float32 range of their squares.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    loss_fn: ``loss_fn(variables, *args, **kwargs) -> scalar``, ``variables``
      the model variables with a ``"params"`` collection; it must pass
      ``variables`` (or a dict that keeps their ``"grad_norms"`` entry) to
      ``model.apply``.
    where: a Module class or tuple of classes (``isinstance``); a predicate
      ``module -> bool``; or a regular expression (``str`` or compiled)
      searched in the "/"-joined module path.

  Returns:
    A function of ``loss_fn``'s arguments, as ``jax.grad`` returns one, that
    returns the report ``{path: {"output": norm, "params": norm}}``, plus ``"at_bgn": norm`` where
    a BGN node sits on the output; each norm a 0-d array, or one with a leading
    axis per enclosing ``nn.scan``. Modules without parameters have ``"params"``
    zero. Only floating-point leaves of a module's output are tapped;
    "output" is their global norm.

  Raises:
    TypeError: ``loss_fn`` is not callable, or ``where`` of none of the accepted
      forms; from the returned function: ``variables`` is not a mapping.
    ValueError: from the returned function: ``where`` matches no module call,
      ``variables`` already holds a
      ``"grad_norms"`` collection, ``loss_fn`` drops the taps, or an
      ``nn.scan`` that holds a selected module does not carry them.
  """
  fn_name = "bgn_jax.linen.grad_norms"
  is_match = _common.matcher(where, fn_name=fn_name, module_type=nn.Module)

  def check(variables: Any) -> None:
    _common.check_framework(fn_name, "variables", variables, "linen")
    if not isinstance(variables, Mapping):
      raise TypeError(
        f"{fn_name}: `variables` (the first argument) must be a mapping of collections, "
        f"e.g. model.init(...); got {type(variables).__name__}."
      )
    if GRAD_NORMS_COLLECTION in variables:
      raise ValueError(
        f"{fn_name}: `variables` already holds a {GRAD_NORMS_COLLECTION!r} collection; "
        f"that name is reserved for the taps grad_norms adds."
      )

  key = _common.cache_key("grad_norms", where)
  measure = functools.partial(_measure, loss_fn, where, is_match, key)
  return _common.measuring(fn_name, loss_fn, check, measure)


def _measure(
  loss_fn: Callable[..., jax.Array],
  where: Where,
  is_match: Callable[[Any, str], bool],
  key: Any,
  variables: Mapping[str, Any],
  args: tuple[Any, ...],
  kwargs: dict[str, Any],
) -> Report:
  fn_name = "bgn_jax.linen.grad_norms"
  discovery = _Probe(is_match, discover=True)

  # Traces of their own (cached traces would skip the module calls the probes must
  # see), shared by the calls with the same `where`.
  def shape_pass() -> jax.Array:
    with _probing(discovery, (key, "discover")):
      return loss_fn(variables, *args, **kwargs)

  jax.eval_shape(shape_pass)
  if not discovery.calls:
    raise ValueError(_common.no_match_message(fn_name, where, discovery.seen, "module __call__"))
  shapes: dict[str, Any] = {}
  for prefix, tree in discovery.grafts:
    _graft(shapes, prefix, tree)

  def at(tree: Any, call: _common.TapCall, tap: bool) -> Any:
    parts = discovery.parts[call.path]
    return _common.get_path(tree, parts + ((_tap_name(call.index),) if tap else ()))

  # A call without a tap in the collection came from a trace whose variables a
  # lifted transform discarded.
  calls = [c for c in discovery.calls if c.dtype is None or at(shapes, c, True) is not None]

  def loss_of(params: Any, taps: Any) -> jax.Array:
    measured = dict(variables)
    measured["params"] = params
    measured[GRAD_NORMS_COLLECTION] = taps
    with _probing(_Probe(is_match, discover=False), (key, "measure")):
      return loss_fn(measured, *args, **kwargs)

  params = variables.get("params", {})
  taps = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)
  grad_params, grad_taps = jax.grad(loss_of, argnums=(0, 1))(params, taps)
  return _common.read_report(
    fn_name, calls, at, shapes, unfreeze(params), unfreeze(grad_params), grad_taps
  )
