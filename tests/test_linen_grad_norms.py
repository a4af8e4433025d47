"""Tests of bgn_jax.linen.grad_norms and bgn_jax.reports against a float64 NumPy backprop."""

from __future__ import annotations

import functools
import math
import re

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import bgn_jax
from bgn_jax import (
  depth_profile,
  plot_grad_norms,
  relative_updates,
)
from bgn_jax.linen import GRAD_NORMS_COLLECTION, grad_norms

WIDTH, BATCH, DEPTH = 8, 4, 12
RTOL = 2e-4  # float32 forward and backward through 12 layers against float64

TRANSFORMS = {
  "eager": lambda fn: fn,
  "jit": jax.jit,
}


# ------------------------------------------------------------------ models


class MLP(nn.Module):
  """Dense -> [BGN] -> sigmoid, ``depth`` times."""

  depth: int = DEPTH
  bgn_layers: bool = False

  @nn.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = nn.Dense(WIDTH)(x)
      if self.bgn_layers:
        x = bgn_jax.BGN()(x)
      x = nn.sigmoid(x)
    return x


class Layer(nn.Module):
  @nn.compact
  def __call__(self, x):
    return nn.sigmoid(nn.Dense(WIDTH)(x))


class Encoder(nn.Module):
  depth: int

  @nn.compact
  def __call__(self, x):
    for i in range(self.depth):
      x = Layer(name=f"layer_{i}")(x)
    return x


class Nested(nn.Module):
  @nn.compact
  def __call__(self, x):
    x = Encoder(3, name="encoder")(x)
    return Encoder(2, name="decoder")(x)


class ScanBlock(nn.Module):
  @nn.compact
  def __call__(self, x, _):
    return nn.sigmoid(nn.Dense(WIDTH)(x)), None


class Scanned(nn.Module):
  """A Dense in front, then an nn.scan stack of ``length`` Dense + sigmoid layers."""

  length: int = 5
  collections: tuple[str, ...] = ("params", GRAD_NORMS_COLLECTION)

  @nn.compact
  def __call__(self, x):
    x = nn.sigmoid(nn.Dense(WIDTH)(x))
    stack = nn.scan(
      ScanBlock,
      variable_axes={c: 0 for c in self.collections},
      split_rngs={"params": True},
      length=self.length,
    )
    x, _ = stack(name="layers")(x, None)
    return x


class Twice(nn.Module):
  """One Dense (rematerialized or not) applied twice, then another Dense."""

  remat: bool = False

  @nn.compact
  def __call__(self, x):
    shared = (nn.remat(nn.Dense) if self.remat else nn.Dense)(WIDTH)
    x = nn.sigmoid(shared(x))
    x = nn.sigmoid(shared(x))
    return nn.sigmoid(nn.Dense(WIDTH)(x))


def inputs(seed=1):
  return jax.random.normal(jax.random.key(seed), (BATCH, WIDTH))


def loss_of(apply_fn, scale=1.0):
  def loss_fn(variables, x):
    return scale * jnp.sum(apply_fn(variables, x) ** 2)

  return loss_fn


# --------------------------------------------------------- NumPy reference


def sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def norm64(*arrays):
  return math.sqrt(sum(float(np.sum(np.asarray(a, np.float64) ** 2)) for a in arrays))


def reference(layers, x, *, bgn=False, scale=1.0):
  """Backprop of ``scale * sum(h_L ** 2)`` through ``h = sigmoid(BGN?(h W + b))``.

  ``layers`` is a list of (kernel, bias), one per call (repeated for a shared
  module). Returns per call the norm of the gradient arriving at the Dense
  output (the raw one, before BGN) and the (kernel, bias) gradients.
  """
  h = [np.asarray(x, np.float64)]
  zs = []
  for w, b in layers:
    zs.append(h[-1] @ np.asarray(w, np.float64) + np.asarray(b, np.float64))
    h.append(sigmoid(zs[-1]))
  g = 2.0 * scale * h[-1]
  out_norms, grads = [], []
  for i in reversed(range(len(layers))):
    s = sigmoid(zs[i])
    raw = g * s * (1 - s)
    out_norms.append(norm64(raw))
    gz = raw * math.sqrt(raw.shape[1]) / norm64(raw) if bgn else raw
    grads.append((h[i].T @ gz, gz.sum(0)))
    g = gz @ np.asarray(layers[i][0], np.float64).T
  return out_norms[::-1], grads[::-1]


def dense_layers(params, names):
  return [(params[n]["kernel"], params[n]["bias"]) for n in names]


def assert_close(actual, expected, rtol=RTOL):
  np.testing.assert_allclose(np.asarray(actual, np.float64), expected, rtol=rtol)


# ------------------------------------------------------------------- tests


@pytest.fixture(scope="module")
def mlp():
  model = MLP()
  x = inputs()
  variables = model.init(jax.random.key(0), x)
  names = [f"Dense_{i}" for i in range(DEPTH)]
  return model, variables, x, names


def mlp_loss(placement):
  """The 12-layer MLP's loss, without BGN or with BGN after every Dense."""
  if placement == "plain":
    return loss_of(MLP().apply)
  if placement == "insert":
    return loss_of(bgn_jax.insert(MLP().apply, where=nn.Dense))
  if placement == "insert_around_loss":
    return bgn_jax.insert(loss_of(MLP().apply), where=nn.Dense)
  return loss_of(MLP(bgn_layers=True).apply)


@pytest.fixture(scope="module")
def mlp_report(mlp):
  """grad_norms of the MLP per (placement, transform), each computed once."""
  _, variables, x, _ = mlp

  @functools.cache
  def report(placement, transform="eager"):
    run = grad_norms(mlp_loss(placement), where=nn.Dense)
    return TRANSFORMS[transform](run)(variables, x)

  return report


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_plain_mlp_matches_reference_and_vanishes(mlp, mlp_report, transform):
  _, variables, x, names = mlp
  report = mlp_report("plain", transform)
  assert list(report) == names
  out_ref, grads_ref = reference(dense_layers(variables["params"], names), x)
  for name, expected_out, (gw, gb) in zip(names, out_ref, grads_ref, strict=True):
    assert report[name]["output"].dtype == jnp.float32
    assert report[name]["output"].shape == ()
    assert_close(report[name]["output"], expected_out)
    assert_close(report[name]["params"], norm64(gw, gb))
  assert report["Dense_0"]["output"] * 1000 < report[names[-1]]["output"]


# Under jit only: eagerly, the core's BGN backward compiles a conditional at every call.
@pytest.mark.parametrize("placement", ["insert", "insert_around_loss", "layers"])
def test_bgn_nodes_report_the_output_gradient_and_the_raw_one_at_the_node(
  mlp, mlp_report, placement
):
  _, variables, x, names = mlp
  report = mlp_report(placement, "jit")
  assert list(report) == names
  out_ref, grads_ref = reference(dense_layers(variables["params"], names), x, bgn=True)
  for name, expected_raw, (gw, gb) in zip(names, out_ref, grads_ref, strict=True):
    assert sorted(report[name]) == ["at_bgn", "output", "params"]
    assert_close(report[name]["at_bgn"], expected_raw)
    # The node is the output's only consumer: dL/d(output) is the normalized gradient.
    assert_close(report[name]["output"], math.sqrt(WIDTH))
    assert_close(report[name]["params"], norm64(gw, gb))
  # The raw norms vary with depth.
  assert np.ptp(depth_profile(report, "at_bgn")) > 0.1


class Residual(nn.Module):
  """``h = Dense(x); tanh(BGN(h)) * 3 + h``; ``perturbed``: perturbations by hand."""

  perturbed: bool = False

  @nn.compact
  def __call__(self, x):
    h = nn.Dense(WIDTH, name="Dense_0")(x)
    h = self.perturb("h", h) if self.perturbed else h
    normalized = bgn_jax.BGN(name="BGN_0")(h)
    normalized = self.perturb("at_bgn", normalized) if self.perturbed else normalized
    return jnp.tanh(normalized) * 3 + h


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_output_sums_all_consumers_when_a_bgn_layer_sits_on_it(transform):
  x = inputs()
  variables = Residual().init(jax.random.key(0), x)

  def loss_fn(model):
    return lambda variables, x: jnp.sum(jnp.sin(model.apply(variables, x)))

  run = grad_norms(loss_fn(Residual()), where=nn.Dense)
  report = TRANSFORMS[transform](run)(variables, x)
  hand = Residual(perturbed=True)
  perturbations = hand.init(jax.random.key(0), x)["perturbations"]
  grads = jax.grad(loss_fn(hand))({**variables, "perturbations": perturbations}, x)
  by_hand = {name: bgn_jax.l2_norm(g) for name, g in grads["perturbations"].items()}
  entry = report["Dense_0"]
  assert_close(entry["output"], float(by_hand["h"]), rtol=1e-6)
  assert_close(entry["at_bgn"], float(by_hand["at_bgn"]), rtol=1e-6)
  # The residual path counts: the gradient past the node alone is another number.
  assert abs(float(by_hand["h"]) / float(by_hand["at_bgn"]) - 1) > 0.1


def test_jit_compiled_apply_inside_loss_fn():
  model = MLP(depth=3)
  x = inputs()
  variables = model.init(jax.random.key(0), x)
  compiled = jax.jit(model.apply)
  loss_fn = loss_of(compiled)
  loss_fn(variables, x)  # a cached trace without the perturbations
  report = grad_norms(loss_fn, where=nn.Dense)(variables, x)
  names = [f"Dense_{i}" for i in range(3)]
  out_ref, grads_ref = reference(dense_layers(variables["params"], names), x)
  assert list(report) == names
  for name, expected_out, (gw, gb) in zip(names, out_ref, grads_ref, strict=True):
    assert_close(report[name]["output"], expected_out)
    assert_close(report[name]["params"], norm64(gw, gb))
  # A plain call afterwards does not reuse a trace with the perturbations.
  chex.assert_trees_all_equal(
    jax.grad(loss_fn)(variables, x),
    jax.grad(loss_of(jax.jit(lambda v, x: model.apply(v, x))))(variables, x),
  )


@pytest.mark.parametrize("placement, transform", [("plain", "eager"), ("insert", "jit")])
def test_params_norms_equal_jax_grad(mlp, mlp_report, placement, transform):
  _, variables, x, names = mlp
  report = mlp_report(placement, transform)
  grads = jax.jit(jax.grad(mlp_loss(placement)))(variables, x)["params"]
  for name in names:
    expected = norm64(*jax.tree.leaves(grads[name]))
    assert_close(report[name]["params"], expected, rtol=1e-5)


def test_matches_hand_placed_perturbations(mlp, mlp_report):
  _, variables, x, names = mlp

  class Perturbed(nn.Module):
    @nn.compact
    def __call__(self, x):
      for i in range(DEPTH):
        x = nn.sigmoid(self.perturb(f"out{i}", nn.Dense(WIDTH, name=f"Dense_{i}")(x)))
      return x

  model = Perturbed()
  perturbations = model.init(jax.random.key(0), x)["perturbations"]
  loss_fn = loss_of(model.apply)
  grads = jax.jit(jax.grad(loss_fn))({**variables, "perturbations": perturbations}, x)
  grads = grads["perturbations"]
  report = mlp_report("plain")
  for i, name in enumerate(names):
    assert_close(report[name]["output"], norm64(grads[f"out{i}"]), rtol=1e-5)


def test_where_regex_and_predicate_select_calls(mlp, mlp_report):
  model, variables, x, _ = mlp
  loss_fn = loss_of(model.apply)
  by_regex = grad_norms(loss_fn, where=r"Dense_(0|11)$")(variables, x)
  assert list(by_regex) == ["Dense_0", "Dense_11"]
  by_predicate = grad_norms(loss_fn, where=lambda m: m.name in ("Dense_3", "Dense_4"))(variables, x)
  assert list(by_predicate) == ["Dense_3", "Dense_4"]
  everything = mlp_report("plain")
  for name, entry in [*by_regex.items(), *by_predicate.items()]:
    assert_close(entry["output"], float(everything[name]["output"]), rtol=1e-6)


def test_nested_model_keys_and_values():
  model = Nested()
  x = inputs()
  variables = model.init(jax.random.key(0), x)
  report = grad_norms(loss_of(model.apply), where=nn.Dense)(variables, x)
  names = [f"encoder/layer_{i}/Dense_0" for i in range(3)]
  names += [f"decoder/layer_{i}/Dense_0" for i in range(2)]
  assert list(report) == names
  params = variables["params"]
  layers = [
    (params[p][q]["Dense_0"]["kernel"], params[p][q]["Dense_0"]["bias"])
    for p, q in (n.split("/")[:2] for n in names)
  ]
  out_ref, grads_ref = reference(layers, x)
  for name, expected_out, (gw, gb) in zip(names, out_ref, grads_ref, strict=True):
    assert_close(report[name]["output"], expected_out)
    assert_close(report[name]["params"], norm64(gw, gb))
  # Selecting the enclosing modules measures their outputs (the same tensors).
  outer = grad_norms(loss_of(model.apply), where=Layer)(variables, x)
  assert list(outer) == [n.rsplit("/", 1)[0] for n in names]
  assert_close(outer["encoder/layer_0"]["params"], float(report[names[0]]["params"]), rtol=1e-6)


@pytest.fixture(scope="module")
def scanned():
  model = Scanned(length=5)
  x = inputs()
  return model, model.init(jax.random.key(0), x), x


@pytest.fixture(scope="module")
def scanned_report(scanned):
  model, variables, x = scanned

  @functools.cache
  def report(transform):
    run = grad_norms(loss_of(model.apply), where=nn.Dense)
    return TRANSFORMS[transform](run)(variables, x)

  return report


@pytest.mark.parametrize("transform", list(TRANSFORMS))
def test_scanned_stack_has_one_value_per_iteration(scanned, scanned_report, transform):
  model, variables, x = scanned
  report = scanned_report(transform)
  assert list(report) == ["Dense_0", "layers/Dense_0"]
  assert report["Dense_0"]["output"].shape == ()
  assert report["layers/Dense_0"]["output"].shape == (5,)
  assert report["layers/Dense_0"]["params"].shape == (5,)
  params = variables["params"]
  stacked = params["layers"]["Dense_0"]
  layers = [(params["Dense_0"]["kernel"], params["Dense_0"]["bias"])]
  layers += [(stacked["kernel"][i], stacked["bias"][i]) for i in range(5)]
  out_ref, grads_ref = reference(layers, x)
  assert_close(depth_profile(report), out_ref)
  assert_close(depth_profile(report, "params"), [norm64(gw, gb) for gw, gb in grads_ref])


def test_scan_without_the_collection_is_a_clear_error():
  model = Scanned(length=3, collections=("params",))
  x = inputs()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(
    ValueError, match=r"^bgn_jax.linen.grad_norms: .*variable_axes.*'grad_norms': 0"
  ):
    grad_norms(loss_of(model.apply), where=nn.Dense)(variables, x)
  # Modules outside the scan still work.
  report = grad_norms(loss_of(model.apply), where="^Dense_0$")(variables, x)
  assert list(report) == ["Dense_0"]


@pytest.mark.parametrize("remat", [False, True])
def test_module_called_twice_gets_one_entry_per_call(remat):
  # Each call of an nn.remat module is traced on its own: still two entries.
  model = Twice(remat=remat)
  x = inputs()
  variables = model.init(jax.random.key(0), x)
  report = grad_norms(loss_of(model.apply), where=nn.Dense)(variables, x)
  name, last = ("CheckpointDense_0", "Dense_0") if remat else ("Dense_0", "Dense_1")
  assert list(report) == [name, f"{name}#1", last]
  params = variables["params"]
  shared = (params[name]["kernel"], params[name]["bias"])
  layers = [shared, shared, (params[last]["kernel"], params[last]["bias"])]
  out_ref, grads_ref = reference(layers, x)
  assert_close([report[k]["output"] for k in report], out_ref)
  summed = norm64(grads_ref[0][0] + grads_ref[1][0], grads_ref[0][1] + grads_ref[1][1])
  assert_close(report[name]["params"], summed)
  assert_close(report[f"{name}#1"]["params"], summed)


def test_two_applies_in_one_loss_count_as_two_calls(mlp):
  model, variables, x, _ = mlp
  y = inputs(seed=2)

  def loss_fn(variables, x, y):
    return jnp.sum(model.apply(variables, x) ** 2) + jnp.sum(model.apply(variables, y) ** 2)

  report = grad_norms(loss_fn, where="Dense_(0|11)$")(variables, x, y)
  assert list(report) == ["Dense_0", "Dense_11", "Dense_0#1", "Dense_11#1"]
  names = ["Dense_0", "Dense_11"]
  layers = dense_layers(variables["params"], [f"Dense_{i}" for i in range(DEPTH)])
  for inputs_, suffix in ((x, ""), (y, "#1")):
    out_ref, _ = reference(layers, inputs_)
    for name, depth in zip(names, (0, DEPTH - 1), strict=True):
      assert_close(report[name + suffix]["output"], out_ref[depth])


def test_tiny_gradients_are_reported_exactly(mlp):
  model, variables, x, names = mlp
  scale = 1e-25
  report = grad_norms(loss_of(model.apply, scale), where=nn.Dense)(variables, x)
  out_ref, grads_ref = reference(dense_layers(variables["params"], names), x, scale=scale)
  assert out_ref[0] < 1e-30
  assert float(report["Dense_0"]["output"]) < 1e-30
  for name, expected_out, (gw, gb) in zip(names, out_ref, grads_ref, strict=True):
    assert_close(report[name]["output"], expected_out)
    assert_close(report[name]["params"], norm64(gw, gb))
  # The naive float32 norm of the same gradient underflows: the test can fail.
  grads = jax.jit(jax.grad(loss_of(model.apply, scale)))(variables, x)
  kernel_grad = grads["params"]["Dense_0"]["kernel"]
  assert float(jnp.sqrt(jnp.sum(kernel_grad**2))) == 0.0


def test_errors_name_the_argument(mlp):
  model, variables, x, _ = mlp
  loss_fn = loss_of(model.apply)
  with pytest.raises(ValueError, match="matched no module __call__.*Dense at 'Dense_0'"):
    grad_norms(loss_fn, where=nn.Conv)(variables, x)
  with pytest.raises(TypeError, match="`where`"):
    grad_norms(loss_fn, where=3)(variables, x)
  with pytest.raises(TypeError, match="`loss_fn`"):
    grad_norms("loss", where=nn.Dense)(variables, x)
  with pytest.raises(TypeError, match="`variables`"):
    grad_norms(loss_fn, where=nn.Dense)([variables], x)
  with pytest.raises(ValueError, match="reserved"):
    grad_norms(loss_fn, where=nn.Dense)({**variables, GRAD_NORMS_COLLECTION: {}}, x)

  def drops_perturbations(variables, x):
    return jnp.sum(model.apply({"params": variables["params"]}, x))

  with pytest.raises(
    ValueError, match=r"^bgn_jax.linen.grad_norms: .*loss_fn must pass the `variables`"
  ):
    grad_norms(drops_perturbations, where=nn.Dense)(variables, x)


class StepCell(nn.RNNCellBase):
  """A Dense + sigmoid per step, carry and output the same."""

  @nn.compact
  def __call__(self, carry, x):
    h = nn.sigmoid(nn.Dense(WIDTH)(jnp.concatenate([carry, x], axis=-1)))
    return h, h

  @nn.nowrap
  def initialize_carry(self, rng, input_shape):
    return jnp.zeros(input_shape[:-1] + (WIDTH,))

  @property
  def num_feature_axes(self) -> int:
    return 1


class Recurrent(nn.Module):
  variable_axes: tuple = ()

  @nn.compact
  def __call__(self, x):
    return nn.RNN(StepCell(name="cell"), variable_axes=dict(self.variable_axes), name="rnn")(x)


def test_rnn_needs_its_own_variable_axes_and_then_reports_every_step():
  x = jax.random.normal(jax.random.key(1), (BATCH, 3, WIDTH))
  model = Recurrent()
  variables = model.init(jax.random.key(0), x)
  with pytest.raises(
    ValueError,
    match=r"^bgn_jax.linen.grad_norms: .*"
    + re.escape("nn.RNN(cell, variable_axes={'grad_norms': 0})"),
  ):
    grad_norms(loss_of(model.apply), where=nn.Dense)(variables, x)
  carried = Recurrent(variable_axes=((GRAD_NORMS_COLLECTION, 0),))
  report = grad_norms(loss_of(carried.apply), where=nn.Dense)(variables, x)
  assert list(report) == ["cell/Dense_0"]
  assert report["cell/Dense_0"]["output"].shape == (3,)

  # By hand: the same RNN with a perturbation on each step's Dense output.
  class Perturbed(StepCell):
    @nn.compact
    def __call__(self, carry, x):
      z = self.perturb("z", nn.Dense(WIDTH)(jnp.concatenate([carry, x], axis=-1)))
      h = nn.sigmoid(z)
      return h, h

  class Hand(nn.Module):
    @nn.compact
    def __call__(self, x):
      cell = Perturbed(name="cell")
      return nn.RNN(cell, variable_axes={"perturbations": 0}, name="rnn")(x)

  perturbations = Hand().init(jax.random.key(0), x)["perturbations"]
  grads = jax.grad(loss_of(Hand().apply))({**variables, "perturbations": perturbations}, x)
  by_hand = grads["perturbations"]["cell"]["z"]
  expected = [norm64(by_hand[t]) for t in range(3)]
  assert_close(report["cell/Dense_0"]["output"], expected, rtol=1e-5)


def test_relative_updates_match_numpy(scanned, scanned_report):
  _, variables, _ = scanned
  old = variables["params"]
  rng = np.random.default_rng(0)
  new = jax.tree.map(lambda p: jnp.asarray(p + 0.05 * rng.standard_normal(p.shape), p.dtype), old)

  def expected(old_tree, new_tree):
    old_leaves = jax.tree.leaves(old_tree)
    deltas = [n - o for n, o in zip(jax.tree.leaves(new_tree), old_leaves, strict=True)]
    return norm64(*deltas) / norm64(*old_leaves)

  everything = relative_updates(old, new)
  assert sorted(everything) == ["Dense_0", "layers/Dense_0"]
  assert_close(everything["layers/Dense_0"], expected(old["layers"], new["layers"]), rtol=1e-5)
  per_layer = jax.jit(functools.partial(relative_updates, where=scanned_report("eager")))(old, new)
  assert list(per_layer) == ["Dense_0", "layers/Dense_0"]
  assert per_layer["Dense_0"].shape == ()
  assert per_layer["layers/Dense_0"].shape == (5,)
  for i in range(5):
    layer = functools.partial(jax.tree.map, lambda p, i=i: p[i])
    assert_close(
      per_layer["layers/Dense_0"][i],
      expected(layer(old["layers"]), layer(new["layers"])),
      rtol=1e-5,
    )
  by_regex = relative_updates(old, new, where="^layers", scan_axes=1)
  np.testing.assert_array_equal(by_regex["layers/Dense_0"], per_layer["layers/Dense_0"])
  with pytest.raises(TypeError, match="needs modules"):
    relative_updates(old, new, where=nn.Dense)
  with pytest.raises(ValueError, match="no parameters at 'encoder'"):
    relative_updates(old, new, where=["encoder"])


def test_plot_writes_a_png(mlp_report, tmp_path):
  matplotlib = pytest.importorskip("matplotlib")
  plain, with_bgn = mlp_report("plain"), mlp_report("insert", "jit")
  path = plot_grad_norms(
    {"plain": plain, "BGN": with_bgn}, tmp_path / "sub" / "flow.png", title="t"
  )
  assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100
  with pytest.raises(ValueError, match="`quantity` 'weights'"):
    plot_grad_norms({"plain": plain}, tmp_path / "x.png", quantities=("weights",))
  with pytest.raises(ValueError, match="`quantities`"):
    plot_grad_norms({"plain": plain}, tmp_path / "x.png", quantities=())
