"""Gradient accumulation over microbatches that gives the full batch's BGN gradient.

A whole-batch node rescales by the norm of the whole batch's cotangent, which no single
microbatch holds, so summing per-microbatch gradients (``optax.MultiSteps``, a
hand-written ``lax.scan``) gives another gradient. :func:`microbatch_grad` runs two
passes over the microbatches instead:

1. a measuring pass, where every whole-batch node passes the cotangent on unchanged
   but for a fixed power of two (taken on the first microbatch, so that a vanishing or
   exploding cotangent stays in range), and records its squared norm per microbatch;
2. the gradient pass, where each whole-batch node rescales with the full batch's norm.

Where the whole-batch nodes form a sequential cut (every path from the loss to a node
passes through the node above it: nodes after every layer of a stack, or on a residual
stream after every block), the cotangent reaching a node in the gradient pass is one
positive scalar times the one of the measuring pass, the same scalar in every
microbatch, so the full batch's norm is the microbatch's norm times
``sqrt(sum of the measured squares / the microbatch's measured square)``. That scalar
is checked in every microbatch: where it differs (the nodes are no such cut), the call
raises instead of returning an approximation. Per-example nodes need nothing: each
example's cotangent is the full batch's, because each microbatch's loss is weighted by
its share of the batch.

References:
  Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Sequence
from typing import Any, Literal

import jax
import jax.core
import jax.numpy as jnp
import numpy as np

from bgn_jax import core

__all__ = ["microbatch_grad", "microbatch_value_and_grad"]

_Mode = Literal["count", "first", "measure", "apply"]


def _ratio_log_tolerance(dtype: Any) -> float:
  """The largest spread of a node's per-microbatch scalar, as a log2, that rounding in
  ``dtype`` explains (the two passes form a cotangent in different orders): 8 units in
  the last place, and no less than float32's 1e-3 (a bfloat16 stack exceeds that;
  tests/test_microbatch.py)."""
  return max(1e-3, 8 * float(jnp.finfo(dtype).eps))


@dataclasses.dataclass
class _Pass:
  """One trace of the loss on one microbatch: what the nodes do in it."""

  mode: _Mode
  slice_size: int
  microbatches: int
  vmapped: tuple[bool, ...] = ()  # per node call: under a vmap (from the counting trace)
  probe: jax.Array | None = None  # one row per node call; its gradient is read
  exponents: jax.Array | None = None  # "measure": the power of two of each node
  squares: jax.Array | None = None  # "apply": this microbatch's measured squares
  totals: jax.Array | None = None  # "apply": the measured squares of the whole batch
  looped: frozenset[int] = frozenset()  # the node calls inside a scan or while loop
  # Per node call: its shape, whether its axes span axis 0, and whether it has axis_name.
  seen: list[tuple[tuple[int, ...], bool, bool]] = dataclasses.field(default_factory=list)

  def node(self, config: core.BGNConfig, x: jax.Array) -> jax.Array:
    index = len(self.seen)
    axes_span = config.axes is None or 0 in config.axes
    self.seen.append((tuple(x.shape), axes_span, config.axis_name is not None))
    if self.mode == "count":
      return _marked(x, index)
    vmapped = self.vmapped[index]
    if not vmapped and config.axis_name is None:
      config = _full_batch_target(config, x.ndim, self.microbatches)
    if not _spans_batch(config, x, self.slice_size, vmapped):
      return core._bgn(config, x)
    if index in self.looped:
      raise ValueError(
        "bgn_jax.microbatch_grad: a whole-batch node sits inside a lax.scan or while "
        "loop (a scanned stack of layers): one traced node applied at every step, whose "
        "steps the passes cannot tell apart. Unroll the stack, or use per-example nodes "
        "(axes without the batch axis), which need no full-batch norm."
      )
    assert self.probe is not None
    # Every row holds norms summed over axis_name: one value for all vmapped instances.
    slot = self.probe[index]
    if self.mode == "first":
      return _measure_first(config, slot, x)
    if self.mode == "measure":
      assert self.exponents is not None
      return _measure(config, slot, self.exponents[index], x)
    assert self.squares is not None and self.totals is not None
    return _apply(config, slot, self.squares[index], self.totals[index], x)


def _full_batch_target(config: core.BGNConfig, ndim: int, microbatches: int) -> core.BGNConfig:
  """A target rule that counts the batch axis counts the full batch's examples."""
  rule = config.target_norm
  if isinstance(rule, str) and 0 in core._counted_dims(rule, config.axes, ndim):  # type: ignore[arg-type]
    return dataclasses.replace(config, units_scale=config.units_scale * microbatches)
  return config


def _spans_batch(config: core.BGNConfig, x: jax.Array, slice_size: int, vmapped: bool) -> bool:
  """Whether the node's group reaches across examples; refuses what the passes can't do.

  Under a vmap the node sees one instance: the vmap is taken to map the batch, so a
  node without ``axis_name`` there is per example.
  """
  mapped = core._names(config.axis_name)
  manual = set(jax.sharding.get_abstract_mesh().manual_axes) & set(mapped)
  if manual:
    raise ValueError(
      f"bgn_jax.microbatch_grad: a node sums over the shard_map or pmap axes "
      f"{tuple(manual)}; microbatching supports nodes under jax.jit with sharded inputs "
      "(every reduction is global there) and under jax.vmap, not inside shard_map."
    )
  if mapped:
    size = math.prod(jax.lax.axis_size(name) for name in mapped)
    if size != slice_size:
      raise ValueError(
        f"bgn_jax.microbatch_grad: a node sums over the vmapped axes {mapped} of size "
        f"{size}, but a microbatch holds {slice_size} examples; the vmap must map the "
        "batch axis for the node to span the microbatch."
      )
  elif vmapped or not (config.axes is None or 0 in config.axes):
    return False
  elif x.ndim == 0 or x.shape[0] != slice_size:
    raise ValueError(
      f"bgn_jax.microbatch_grad: a whole-batch node on an array of shape {x.shape}, "
      f"whose leading axis is not the microbatch's {slice_size} examples; the node's "
      "group must span the batch axis (axis 0), which microbatching splits."
    )
  if config.axes is not None and set(config.axes) != set(range(x.ndim)):
    raise ValueError(
      f"bgn_jax.microbatch_grad: a node with axes={config.axes} on an array of shape "
      f"{x.shape} has one group per index of the other axes, each across the batch; "
      "microbatching supports whole-batch nodes with one group (axes=None) and "
      "per-example nodes (axes without the batch axis)."
    )
  return True


_MARK = "_bgn_jax_node_"


def _marked(x: jax.Array, index: int) -> jax.Array:
  # A named call that stays in the counting trace's jaxpr, so that each node call can
  # be found there: its shape (batched under vmap) and whether a loop holds it.
  def identity(x: jax.Array) -> jax.Array:
    return x

  identity.__name__ = f"{_MARK}{index}"
  return jax.jit(identity, inline=False)(x)


def _group_norm(g: jax.Array, config: core.BGNConfig) -> tuple[jax.Array, jax.Array]:
  """log2 of the group's norm (summed over ``axis_name``) and whether it is positive and
  finite, as scalars."""
  r, k = core._scaled_norm(g, config.axes, config.axis_name, "variadic")
  r, k = jnp.squeeze(r), jnp.squeeze(k)
  usable = (r > 0) & jnp.isfinite(r)
  return jnp.where(usable, jnp.log2(jnp.where(usable, r, 1)) - jnp.log2(k), 0.0), usable


def _scale_by_power_of_two(g: jax.Array, exponent: jax.Array) -> jax.Array:
  # 2**e for |e| up to about 280 in two factors, each in float32's range.
  acc = core._accumulator_dtype(g.dtype)
  half = jnp.trunc(exponent / 2)
  scaled = g.astype(acc) * jnp.exp2(half).astype(acc) * jnp.exp2(exponent - half).astype(acc)
  return scaled.astype(g.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _measure_first(config: core.BGNConfig, slot: jax.Array, x: jax.Array) -> jax.Array:
  del config, slot
  return x


def _measure_first_fwd(config, slot, x):
  del config, slot
  return x, None


def _measure_first_bwd(config, residuals, g):
  del residuals
  log2_norm, usable = _group_norm(g, config)
  exponent = jnp.where(usable, jnp.floor(log2_norm), 0.0)
  square = jnp.where(usable, jnp.exp2(2 * (log2_norm - exponent)), 0.0)
  row = jnp.stack([exponent, square]).astype(jnp.float32)
  return row, _scale_by_power_of_two(g, -exponent)


_measure_first.defvjp(_measure_first_fwd, _measure_first_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _measure(
  config: core.BGNConfig, slot: jax.Array, exponent: jax.Array, x: jax.Array
) -> jax.Array:
  del config, slot, exponent
  return x


def _measure_fwd(config, slot, exponent, x):
  del config, slot
  return x, exponent


def _measure_bwd(config, exponent, g):
  scaled = _scale_by_power_of_two(g, -exponent)
  log2_norm, usable = _group_norm(scaled, config)
  square = jnp.where(usable, jnp.exp2(2 * log2_norm), 0.0)
  row = jnp.stack([jnp.zeros_like(square), square]).astype(jnp.float32)
  return row, jnp.zeros_like(exponent), scaled


_measure.defvjp(_measure_fwd, _measure_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _apply(
  config: core.BGNConfig, slot: jax.Array, square: jax.Array, total: jax.Array, x: jax.Array
) -> jax.Array:
  del config, slot, square, total
  return x


def _apply_fwd(config, slot, square, total, x):
  del config, slot
  return x, (square, total)


def _apply_bwd(config, residuals, g):
  square, total = residuals
  log2_norm, usable = _group_norm(g, config)
  measured = square > 0
  share = jnp.sqrt(jnp.where(measured, square / jnp.where(total > 0, total, 1), 0.0))
  rescaled = core._normalize(g, config, "platform", share=share)
  # The scalar between this cotangent and the measured one, as a log2; it must be one
  # number across microbatches. A cotangent where the measuring pass saw none is no
  # scalar multiple of it at all.
  log2_ratio = log2_norm - 0.5 * jnp.log2(jnp.where(measured, square, 1))
  seen = usable & measured
  row = jnp.stack(
    [
      jnp.where(seen, log2_ratio / _ratio_log_tolerance(g.dtype), 0.0),  # in tolerances
      seen.astype(jnp.float32),
      (usable & ~measured).astype(jnp.float32),
    ]
  ).astype(jnp.float32)
  return row, jnp.zeros_like(square), jnp.zeros_like(total), rescaled


_apply.defvjp(_apply_fwd, _apply_bwd)


def _marks(jaxpr: Any, loop: str | None = None) -> dict[int, tuple[tuple[int, ...], str | None]]:
  """Each marked node call's shape in the jaxpr, and the loop (scan, while) holding it."""
  found = {}
  for eqn in jaxpr.eqns:
    name = str(eqn.params.get("name", ""))
    if eqn.primitive.name in ("pjit", "jit") and name.startswith(_MARK):
      found[int(name[len(_MARK) :])] = (tuple(eqn.invars[0].aval.shape), loop)
      continue
    inner_loop = eqn.primitive.name if eqn.primitive.name in ("scan", "while") else loop
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          found.update(_marks(inner, inner_loop))
  return found


def _check_argnums(argnums: int | Sequence[int]) -> tuple[int, ...]:
  numbers = (argnums,) if isinstance(argnums, int) else tuple(argnums)
  if not numbers or not all(isinstance(n, int) and not isinstance(n, bool) for n in numbers):
    raise TypeError(
      f"bgn_jax.microbatch_grad: `argnums` must be an int or a tuple of ints; got {argnums!r}."
    )
  if 1 in numbers:
    raise ValueError(
      "bgn_jax.microbatch_grad: `argnums` includes 1, the batch, which is split into "
      "microbatches; differentiate with respect to the parameters (argnums=0)."
    )
  return numbers


def _split(batch: Any, microbatches: int) -> tuple[Any, int]:
  leaves = jax.tree.leaves(batch)
  if not leaves:
    raise ValueError("bgn_jax.microbatch_grad: `batch` (the second argument) holds no arrays.")
  sizes = {int(np.shape(leaf)[0]) if np.ndim(leaf) else -1 for leaf in leaves}
  if len(sizes) != 1 or -1 in sizes:
    raise ValueError(
      "bgn_jax.microbatch_grad: every array of `batch` (the second argument) needs the "
      f"same leading batch axis; got leading sizes {sorted(sizes)} (-1: a scalar)."
    )
  (size,) = sizes
  if size % microbatches:
    raise ValueError(
      f"bgn_jax.microbatch_grad: the batch of {size} examples does not split into "
      f"microbatches={microbatches} equal parts; use a divisor of {size}."
    )
  step = size // microbatches
  return jax.tree.map(lambda a: jnp.reshape(a, (microbatches, step, *np.shape(a)[1:])), batch), step


def microbatch_value_and_grad(
  fun: Callable[..., Any],
  *,
  microbatches: int,
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
) -> Callable[..., tuple[Any, Any]]:
  """Like ``jax.value_and_grad(fun)``, over microbatches, with the full batch's BGN.

  ``fun(params, batch, *rest)`` returns the mean loss over ``batch``, a pytree of
  arrays with a common leading batch axis. The returned function splits ``batch`` into
  ``microbatches`` equal slices and runs them one after another (``lax.scan``: one
  slice's activations in memory at a time), and returns the loss and gradient that one
  full-batch backward pass would give, BGN nodes included: per-example nodes and
  whole-batch nodes that form a sequential cut (see the module docstring). It works
  eagerly and under ``jax.jit``; each whole-batch node costs a second backward pass
  and a measuring pass over the microbatches.

  References:
    Cabana & Lago-Fernandez, 2021. https://arxiv.org/abs/2106.09475

  Args:
    fun: the loss, ``fun(params, batch, *rest, **kwargs)``, a scalar mean over ``batch``
      (with ``has_aux``, a pair ``(loss, aux)``). Whole-batch nodes span axis 0 of
      their input, or a ``vmap`` over the batch with ``axis_name``.
    microbatches: the number of equal slices, an int >= 1 dividing the batch size.
    argnums: which positional arguments to differentiate, as in ``jax.grad``; not 1.
    has_aux: whether ``fun`` returns ``(loss, aux)``; ``aux`` comes back stacked over
      microbatches (a leading axis of size ``microbatches``).

  Returns:
    A function of ``fun``'s arguments returning ``(loss, grads)`` (with ``has_aux``,
    ``((loss, aux), grads)``).

  Raises:
    ValueError: at call time, for a batch that does not split, a whole-batch node
      inside ``lax.scan`` or ``while_loop`` (one traced node applied several times), or
      inside ``shard_map``; and where the whole-batch nodes form no sequential cut
      (checked at run time: eagerly a ``ValueError``, under ``jit`` an error raised
      from the host).
    TypeError: for a non-integer ``microbatches`` or ``argnums``.
  """
  if not isinstance(microbatches, int) or isinstance(microbatches, bool):
    raise TypeError(
      f"bgn_jax.microbatch_grad: `microbatches` must be an int >= 1; got {microbatches!r}."
    )
  if microbatches < 1:
    raise ValueError(
      f"bgn_jax.microbatch_grad: `microbatches` must be an int >= 1; got {microbatches}."
    )
  numbers = _check_argnums(argnums)

  def value_and_grad(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    if len(args) < 2:
      raise TypeError(
        "bgn_jax.microbatch_grad: the function takes (params, batch, ...) positionally; "
        f"got {len(args)} positional argument(s)."
      )
    if max(numbers) >= len(args):
      raise ValueError(
        f"bgn_jax.microbatch_grad: `argnums` {argnums!r} names an argument beyond the "
        f"{len(args)} given."
      )
    slices, step = _split(args[1], microbatches)
    differentiated = tuple(args[n] for n in numbers)

    def loss_of(mode: _Mode, diff: tuple[Any, ...], piece: Any, **state: Any) -> Any:
      full = list(args)
      for n, value in zip(numbers, diff, strict=True):
        full[n] = value
      full[1] = piece
      current = _Pass(mode, step, microbatches, vmapped=vmapped, looped=looped, **state)
      token = core._NODE_HOOK.set(current.node)
      try:
        out = fun(*full, **kwargs)
      finally:
        core._NODE_HOOK.reset(token)
      seen.append(current.seen)
      loss, aux = out if has_aux else (out, None)
      # Each slice's mean weighted by its share of the batch: every cotangent slice
      # is then the full batch's.
      return loss / microbatches, (loss, aux)

    seen: list[list[tuple[tuple[int, ...], bool, bool]]] = []
    vmapped: tuple[bool, ...] = ()
    looped: frozenset[int] = frozenset()
    first = jax.tree.map(lambda a: a[0], slices)
    counting = jax.make_jaxpr(lambda d, p: loss_of("count", d, p)[0])(differentiated, first)
    marks = _marks(counting.jaxpr)
    nodes = len(seen[-1])
    if sorted(marks) != list(range(nodes)):
      raise ValueError(
        f"bgn_jax.microbatch_grad: the loss called {nodes} nodes, of which "
        f"{len(marks)} reach its result; microbatching needs every node's call to be seen."
      )
    # A node call whose traced shape gained axes was made under a vmap.
    vmapped = tuple(len(marks[i][0]) > len(seen[-1][i][0]) for i in range(nodes))
    looped = frozenset(i for i in range(nodes) if marks[i][1] is not None)
    spanning = any(
      named or (axes_span and not vmapped[i]) for i, (_, axes_span, named) in enumerate(seen[-1])
    )

    def gradient_pass(**state: Any) -> tuple[Any, tuple[Any, Any, Any]]:
      def step_fn(total: Any, inputs: Any) -> tuple[Any, Any]:
        piece, rows = inputs
        probe = jnp.zeros((nodes, 3), jnp.float32)
        grad_fn = jax.grad(
          lambda d, p: loss_of("apply", d, piece, probe=p, **rows),
          argnums=(0, 1),
          has_aux=True,
        )
        (grads, probe_grad), (loss, aux) = grad_fn(differentiated, probe)
        total = jax.tree.map(jnp.add, total, grads)
        return total, (loss, aux, probe_grad)

      zeros = jax.tree.map(jnp.zeros_like, differentiated)
      return jax.lax.scan(step_fn, zeros, (slices, state))

    if not spanning:
      grads, (losses, aux, _) = gradient_pass()
    else:
      squares, totals = _measuring_pass(loss_of, differentiated, slices, nodes)
      grads, (losses, aux, rows) = gradient_pass(
        squares=squares, totals=jnp.broadcast_to(totals, squares.shape)
      )
      _check_one_scalar_per_node(rows)
    loss = jnp.mean(losses)
    grads = grads[0] if isinstance(argnums, int) else grads
    return ((loss, aux) if has_aux else loss), grads

  return value_and_grad


def _measuring_pass(
  loss_of: Callable[..., Any], differentiated: Any, slices: Any, nodes: int
) -> tuple[jax.Array, jax.Array]:
  """Each node's measured squares per microbatch, [microbatches, nodes], and their sum."""

  def rows_of(mode: _Mode, piece: Any, **state: Any) -> jax.Array:
    probe = jnp.zeros((nodes, 2), jnp.float32)
    # Only the probe's gradient: the parameters' gradients are not needed here.
    return jax.grad(lambda p: loss_of(mode, differentiated, piece, probe=p, **state)[0])(probe)

  first = rows_of("first", jax.tree.map(lambda a: a[0], slices))
  exponents = jnp.round(first[:, 0])

  def step_fn(carry: None, piece: Any) -> tuple[None, jax.Array]:
    return carry, rows_of("measure", piece, exponents=exponents)[:, 1]

  rest = jax.tree.map(lambda a: a[1:], slices)
  _, later = jax.lax.scan(step_fn, None, rest)
  squares = jnp.concatenate([first[None, :, 1], later], axis=0)
  return squares, jnp.sum(squares, axis=0)


def _check_one_scalar_per_node(rows: jax.Array) -> None:
  """Raises where a node's cotangent was not one scalar times the measured one."""
  # The log2 ratios are in units of their dtype's tolerance.
  log2_ratio, seen, unmeasured = rows[..., 0], rows[..., 1] > 0.5, rows[..., 2] > 0.5
  high = jnp.max(jnp.where(seen, log2_ratio, -jnp.inf), axis=0)
  low = jnp.min(jnp.where(seen, log2_ratio, jnp.inf), axis=0)
  spread = jnp.where(jnp.any(seen, axis=0), high - low, 0.0)
  bad = (spread > 1.0) | jnp.any(unmeasured, axis=0)
  if isinstance(bad, jax.core.Tracer):
    jax.debug.callback(_raise_if_any, bad)
  else:
    _raise_if_any(bad)


def _raise_if_any(bad: Any) -> None:
  bad = np.asarray(bad)
  if bad.any():
    raise ValueError(
      "bgn_jax.microbatch_grad: the whole-batch nodes "
      f"{np.flatnonzero(bad).tolist()} (in the order the loss calls them) received a "
      "cotangent that is not one scalar times the measured one in every microbatch: "
      "the nodes do not form a sequential cut (another node, or a path around the node "
      "above, reaches them). Place whole-batch nodes so that every path from the loss to "
      "a node passes through the node above it (after every layer, or on the residual "
      "stream after every block), use per-example nodes, or train without microbatches."
    )


def microbatch_grad(
  fun: Callable[..., Any],
  *,
  microbatches: int,
  argnums: int | Sequence[int] = 0,
  has_aux: bool = False,
) -> Callable[..., Any]:
  """Like ``jax.grad(fun)``, over microbatches, with the full batch's BGN.

  See :func:`microbatch_value_and_grad`, which this returns the gradient of (with
  ``has_aux``, the pair ``(grads, aux)``, as ``jax.grad`` does).
  """
  value_and_grad = microbatch_value_and_grad(
    fun, microbatches=microbatches, argnums=argnums, has_aux=has_aux
  )

  @functools.wraps(fun)
  def grad(*args: Any, **kwargs: Any) -> Any:
    value, grads = value_and_grad(*args, **kwargs)
    return (grads, value[1]) if has_aux else grads

  return grad
