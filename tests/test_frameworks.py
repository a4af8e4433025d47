"""The same scenarios through linen, nnx and equinox, from one table.

Each framework builds the same three-layer tanh network (layers ``l0``, ``l1``, ``l2``
with the same arrays) and the same scanned stack; each scenario runs the framework's
own verbs on it, and the three results are compared with each other and with the
network written in plain JAX with :func:`bgn_jax.bgn` placed by hand.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import Any

import chex
import equinox as eqx
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import bgn_jax
import bgn_jax.equinox
import bgn_jax.linen
import bgn_jax.nnx
from bgn_jax import bgn
from tests.reference import inputs

WIDTHS = (5, 6, 6, 4)  # input, then each layer's output
BATCH = 3
STEPS = 4  # layers of the scanned stack
FRAMEWORKS = ("linen", "nnx", "equinox")


def arrays() -> list[tuple[np.ndarray, np.ndarray]]:
  rng = np.random.default_rng(0)
  return [
    (rng.normal(size=(m, n)).astype(np.float32) / np.sqrt(m), rng.normal(size=n).astype(np.float32))
    for m, n in zip(WIDTHS[:-1], WIDTHS[1:], strict=True)
  ]


X = inputs((BATCH, WIDTHS[0]))


def loss_of_outputs(y: jax.Array) -> jax.Array:
  return jnp.sum(jnp.sin(3.0 * y))


def by_hand(
  params: list[tuple[jax.Array, jax.Array]], x: jax.Array, nodes: dict[int, str], options: dict
) -> jax.Array:
  """The loss of the network with a node after (or before) layer i for each ``nodes[i]``."""
  h = x
  for i, (kernel, bias) in enumerate(params):
    if nodes.get(i) == "before":
      h = bgn(h, **options)
    h = h @ kernel + bias
    if nodes.get(i) == "after":
      h = bgn(h, **options)
    if i < len(params) - 1:
      h = jnp.tanh(h)
  return loss_of_outputs(h)


# ------------------------------------------------------------------- the three networks


class LinenNet(nn.Module):
  def setup(self):
    self.l0, self.l1, self.l2 = (nn.Dense(n) for n in WIDTHS[1:])

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(jnp.tanh(self.l0(x)))))


class NnxNet(nnx.Module):
  def __init__(self):
    rngs = nnx.Rngs(0)
    self.l0, self.l1, self.l2 = (
      nnx.Linear(m, n, rngs=rngs) for m, n in zip(WIDTHS[:-1], WIDTHS[1:], strict=True)
    )
    for layer, (kernel, bias) in zip((self.l0, self.l1, self.l2), arrays(), strict=True):
      layer.kernel[...], layer.bias[...] = jnp.asarray(kernel), jnp.asarray(bias)

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(jnp.tanh(self.l0(x)))))


class EqxDense(eqx.Module):
  """A dense layer on a batch, as linen's and nnx's are."""

  kernel: jax.Array
  bias: jax.Array

  def __call__(self, x):
    return x @ self.kernel + self.bias


class EqxNet(eqx.Module):
  l0: EqxDense
  l1: EqxDense
  l2: EqxDense

  def __init__(self):
    self.l0, self.l1, self.l2 = (EqxDense(jnp.asarray(k), jnp.asarray(b)) for k, b in arrays())

  def __call__(self, x):
    return self.l2(jnp.tanh(self.l1(jnp.tanh(self.l0(x)))))


@dataclasses.dataclass(frozen=True)
class Framework:
  """One framework's verbs on the network, in the form the scenarios use."""

  name: str
  layer: type  # the layer class, for `where`
  module: type  # the framework's module base class
  insert: Callable[..., Any]  # (where=..., **options) -> the inserted model
  grads: Callable[[Any], list]  # inserted model -> [(d kernel, d bias)] of the loss
  placements: Callable[[Any], bgn_jax.Placements]  # inserted model -> its placements
  grad_norms: Callable[..., dict]  # (where=...) -> report on the plain network
  plain: Callable[[], Any]  # the network without nodes


def _linen() -> Framework:
  variables = {
    "params": {
      f"l{i}": {"kernel": jnp.asarray(k), "bias": jnp.asarray(b)}
      for i, (k, b) in enumerate(arrays())
    }
  }
  apply = LinenNet().apply

  def grads(inserted):
    g = jax.grad(lambda v: loss_of_outputs(inserted(v, X)))(variables)["params"]
    return [(g[f"l{i}"]["kernel"], g[f"l{i}"]["bias"]) for i in range(3)]

  return Framework(
    "linen",
    nn.Dense,
    nn.Module,
    lambda **kw: bgn_jax.linen.insert(apply, **kw),
    grads,
    lambda inserted: bgn_jax.linen.placements(inserted, variables, X),
    lambda loss=None, **kw: bgn_jax.linen.grad_norms(
      lambda v, x: loss_of_outputs((loss or apply)(v, x)), **kw
    )(variables, X),
    lambda: apply,
  )


def _nnx() -> Framework:
  def grads(inserted):
    g = nnx.grad(lambda m: loss_of_outputs(m(X)))(inserted)
    return [(g[f"l{i}"]["kernel"][...], g[f"l{i}"]["bias"][...]) for i in range(3)]

  return Framework(
    "nnx",
    nnx.Linear,
    nnx.Module,
    lambda **kw: bgn_jax.nnx.insert(NnxNet(), **kw),
    grads,
    lambda inserted: bgn_jax.nnx.placements(inserted, X),
    lambda loss=None, **kw: bgn_jax.nnx.grad_norms(lambda m, x: loss_of_outputs(m(x)), **kw)(
      loss if loss is not None else NnxNet(), X
    ),
    NnxNet,
  )


def _equinox() -> Framework:
  def grads(inserted):
    g = eqx.filter_grad(lambda m: loss_of_outputs(m(X)))(inserted)
    return [(layer.kernel, layer.bias) for layer in (g.l0, g.l1, g.l2)]

  return Framework(
    "equinox",
    EqxDense,
    eqx.Module,
    lambda **kw: bgn_jax.equinox.insert(EqxNet(), **kw),
    grads,
    lambda inserted: bgn_jax.equinox.placements(inserted, X),
    lambda loss=None, **kw: bgn_jax.equinox.grad_norms(lambda m, x: loss_of_outputs(m(x)), **kw)(
      loss if loss is not None else EqxNet(), X
    ),
    EqxNet,
  )


MAKERS = {"linen": _linen, "nnx": _nnx, "equinox": _equinox}


@pytest.fixture(scope="module", params=FRAMEWORKS)
def framework(request) -> Framework:
  return MAKERS[request.param]()


@pytest.fixture(scope="module")
def frameworks() -> dict[str, Framework]:
  return {name: make() for name, make in MAKERS.items()}


def hand_grads(nodes: dict[int, str], options: dict) -> list:
  params = [(jnp.asarray(k), jnp.asarray(b)) for k, b in arrays()]
  return jax.grad(by_hand)(params, X, nodes, options)


# ------------------------------------------------------------------- insert: gradients

# (name, insert's arguments but `where`, the layers given a node and where)
INSERTS = [
  ("after", {}, {0: "after", 1: "after", 2: "after"}),
  ("before", {"position": "before"}, {0: "before", 1: "before", 2: "before"}),
  ("every=2", {"every": 2}, {0: "after", 2: "after"}),
  ("per-example axes", {"axes": -1, "target_norm": 2.0}, {0: "after", 1: "after", 2: "after"}),
  ("power and eps", {"power": 0.5, "eps": 1e-3}, {0: "after", 1: "after", 2: "after"}),
]
# The options each framework gets by default differ (equinox's target is the whole
# example's): the table names the target, so that one hand-placed network fits all three.
TARGET = {"target_norm": "sqrt_units"}


@pytest.mark.parametrize(("name", "arguments", "nodes"), INSERTS, ids=[s[0] for s in INSERTS])
def test_insert_equals_hand_placed_nodes_in_every_framework(frameworks, name, arguments, nodes):
  del name
  options = {**TARGET, **arguments}
  bgn_options = {k: v for k, v in options.items() if k not in ("position", "every")}
  reference = hand_grads(nodes, bgn_options)
  results = {fw.name: fw.grads(fw.insert(where=fw.layer, **options)) for fw in frameworks.values()}
  for got in results.values():
    chex.assert_trees_all_close(got, reference, rtol=2e-5, atol=1e-6)
  # And not the gradients without nodes: each scenario places nodes that matter.
  plain = hand_grads({}, {})
  assert not np.allclose(results["equinox"][0][0], plain[0][0], rtol=1e-3)


# ------------------------------------------------------------------- placements


def test_placements_list_the_same_rows_in_every_framework(frameworks):
  tables = {}
  for fw in frameworks.values():
    records = fw.placements(fw.insert(where=fw.layer, every=2, **TARGET))
    tables[fw.name] = [(p.path, p.position, p.shape, p.dtype, p.count) for p in records.nodes]
    assert records.applications == 2
    # linen counts `every` at the call (it sees no module tree before), so it also lists
    # the match left out; nnx and equinox leave it out at insert time.
    assert all(p.reason.startswith("every=2") for p in records.skipped), fw.name
  assert (
    tables["linen"]
    == tables["nnx"]
    == tables["equinox"]
    == [
      ("l0", "after", (BATCH, 6), "float32", 1),
      ("l2", "after", (BATCH, 4), "float32", 1),
    ]
  )


def test_placements_before_the_layers_list_their_inputs(frameworks):
  rows = {}
  for fw in frameworks.values():
    records = fw.placements(fw.insert(where=fw.layer, position="before", **TARGET))
    rows[fw.name] = [(p.path, p.position, p.shape, p.count) for p in records.nodes]
  assert (
    rows["linen"]
    == rows["nnx"]
    == rows["equinox"]
    == [
      ("l0", "before", (BATCH, 5), 1),
      ("l1", "before", (BATCH, 6), 1),
      ("l2", "before", (BATCH, 6), 1),
    ]
  )


# A stack of STEPS tanh layers of width 6 with stacked parameters, applied by a scan.


class LinenStep(nn.Module):
  @nn.compact
  def __call__(self, h, _):
    return jnp.tanh(nn.Dense(6, name="dense")(h)), None


class LinenStack(nn.Module):
  @nn.compact
  def __call__(self, h):
    scan = nn.scan(
      LinenStep, variable_axes={"params": 0}, split_rngs={"params": True}, length=STEPS
    )
    return scan(name="layers")(h, None)[0]


class NnxStep(nnx.Module):
  def __init__(self, rngs):
    self.dense = nnx.Linear(6, 6, rngs=rngs)

  def __call__(self, h):
    return jnp.tanh(self.dense(h))


class NnxStack(nnx.Module):
  def __init__(self):
    @nnx.split_rngs(splits=STEPS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return NnxStep(rngs)

    self.layers = stacked(nnx.Rngs(0))

  def __call__(self, h):
    @nnx.scan(in_axes=(nnx.Carry, 0), out_axes=nnx.Carry)
    def body(h, layer):
      return layer(h)

    return body(h, self.layers)


class EqxStep(eqx.Module):
  dense: EqxDense

  def __init__(self, key):
    self.dense = EqxDense(jax.random.normal(key, (6, 6)) / 6, jnp.zeros(6))

  def __call__(self, h):
    return jnp.tanh(self.dense(h))


class EqxStack(eqx.Module):
  layers: EqxStep

  def __init__(self):
    self.layers = eqx.filter_vmap(EqxStep)(jax.random.split(jax.random.key(0), STEPS))

  def __call__(self, h):
    dynamic, static = eqx.partition(self.layers, eqx.is_array)
    return jax.lax.scan(lambda h, d: (eqx.combine(d, static)(h), None), h, dynamic)[0]


def stacked_placements(name: str) -> bgn_jax.Placements:
  x = inputs((BATCH, 6))
  if name == "linen":
    model = LinenStack()
    variables = model.init(jax.random.key(0), x)
    return bgn_jax.linen.placements(bgn_jax.linen.insert(model.apply, where=nn.Dense), variables, x)
  if name == "nnx":
    return bgn_jax.nnx.placements(bgn_jax.nnx.insert(NnxStack(), where=nnx.Linear), x)
  return bgn_jax.equinox.placements(bgn_jax.equinox.insert(EqxStack(), where=EqxDense), x)


@pytest.mark.parametrize("name", FRAMEWORKS)
def test_placements_of_a_scanned_stack_count_every_step(name):
  records = stacked_placements(name)
  rows = [(p.position, p.shape, p.count) for p in records.nodes]
  assert rows == [("after", (BATCH, 6), STEPS)], str(records)
  assert records.applications == STEPS
  assert f"1 nodes applied {STEPS} times" in str(records)


# ------------------------------------------------------------------- grad_norms


def hand_report(nodes: dict[int, str], options: dict) -> dict[str, dict[str, float]]:
  """The norms grad_norms reports, from the hand-placed network: the gradient at each
  layer's output (the node after it is a consumer), at its parameters, and where a node
  sits, the gradient that reaches the node (at its output)."""
  params = [(jnp.asarray(k), jnp.asarray(b)) for k, b in arrays()]
  zeros = [jnp.zeros((BATCH, n)) for n in WIDTHS]  # a perturbation at each layer's output...
  at_node = [jnp.zeros((BATCH, n)) for n in WIDTHS]  # ... and after each node

  def loss(params, zeros, at_node):
    h = X
    for i, (kernel, bias) in enumerate(params):
      if nodes.get(i) == "before":
        h = bgn(h, **options) + at_node[i]
      h = h @ kernel + bias + zeros[i + 1]
      if nodes.get(i) == "after":
        h = bgn(h, **options) + at_node[i + 1]
      if i < len(params) - 1:
        h = jnp.tanh(h)
    return loss_of_outputs(h)

  g_params, g_out, g_node = jax.grad(loss, argnums=(0, 1, 2))(params, zeros, at_node)
  report = {}
  for i in range(3):
    entry = {
      "output": float(jnp.linalg.norm(g_out[i + 1])),
      "params": float(jnp.sqrt(sum(jnp.sum(g**2) for g in g_params[i]))),
    }
    if i in nodes:
      entry["at_bgn"] = float(jnp.linalg.norm(g_node[i if nodes[i] == "before" else i + 1]))
    report[f"l{i}"] = entry
  return report


def check_report(report: dict, reference: dict, name: str) -> None:
  assert list(report) == list(reference), name
  for path, entry in reference.items():
    assert set(report[path]) == set(entry), (name, path, dict(report[path]))
    for kind, value in entry.items():
      np.testing.assert_allclose(report[path][kind], value, rtol=2e-5, err_msg=f"{name} {path}")


def test_grad_norms_of_the_plain_network_equal_the_hand_computed_norms(framework):
  report = framework.grad_norms(where=framework.layer)
  check_report(report, hand_report({}, {}), framework.name)


@pytest.mark.parametrize("position", ["after", "before"])
def test_grad_norms_read_what_reaches_each_node(frameworks, position):
  nodes = dict.fromkeys(range(3), position)
  reference = hand_report(nodes, TARGET)
  for fw in frameworks.values():
    inserted = fw.insert(where=fw.layer, position=position, **TARGET)
    check_report(fw.grad_norms(loss=inserted, where=fw.layer), reference, fw.name)


# ------------------------------------------------------------------- the same mistakes

# (name, what the framework is given -> the call that raises, exception, message start)
MISTAKES = [
  (
    "position",
    lambda fw: fw.insert(where=fw.layer, position="middle"),
    ValueError,
    re.escape("insert: `position` must be 'after' or 'before'; got 'middle'"),
  ),
  (
    "every",
    lambda fw: fw.insert(where=fw.layer, every=0),
    ValueError,
    "insert: `every` must be an int >= 1; got 0",
  ),
  (
    "unknown option",
    lambda fw: fw.insert(where=fw.layer, targetnorm=1.0),
    TypeError,
    re.escape("insert: unknown BGN option 'targetnorm'"),
  ),
  (
    "empty axes",
    lambda fw: fw.insert(where=fw.layer, axes=()),
    ValueError,
    re.escape("insert: `axes` () makes every entry its own group"),
  ),
  (
    "where a module instance",
    lambda fw: fw.insert(where=fw.plain() if fw.name != "linen" else LinenNet()),
    TypeError,
    "insert: `where` is a module instance",
  ),
  (
    "where matching nothing",
    lambda fw: fw.placements(fw.insert(where=r"^nothing$")),
    ValueError,
    re.escape("insert: `where` '^nothing$' matched no module"),
  ),
  (
    "placements without nodes",
    lambda fw: fw.placements(fw.plain()),
    ValueError,
    r"placements: `(model|fn)` .*has no BGN node",
  ),
  (
    "grad_norms of a non-callable loss",
    lambda fw: getattr(bgn_jax, fw.name).grad_norms(3, where="l"),
    TypeError,
    re.escape("grad_norms: `loss_fn` must be callable; got int"),
  ),
]


@pytest.mark.parametrize(
  ("name", "mistake", "error", "start"), MISTAKES, ids=[m[0] for m in MISTAKES]
)
def test_the_same_mistake_raises_the_same_error_in_every_framework(
  framework, name, mistake, error, start
):
  del name
  with pytest.raises(error) as info:
    mistake(framework)
  assert type(info.value) is error
  prefix = f"bgn_jax.{framework.name}."
  assert re.match(re.escape(prefix) + start, str(info.value)), str(info.value)
