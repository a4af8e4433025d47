"""Tests of bgn_jax.nnx.grad_norms against perturbations placed by hand.

Each model calls ``tap(name, value)`` where grad_norms is expected to perturb a module
output. The reference adds zero arrays there itself, takes ``jax.grad`` with respect to
them and to the parameters, and takes the norms in NumPy float64; the model given to
grad_norms is the same model (``tap`` is the identity outside the reference).
"""

from __future__ import annotations

import contextlib
import contextvars

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import linen, nnx

import bgn_jax
from bgn_jax import bgn
from tests.reference import inputs

WIDTH = 8  # every input is (3, WIDTH) where it can be: the eager ops compile once
_TAPS: contextvars.ContextVar = contextvars.ContextVar("taps", default=None)


def tap(name, value):
  """``value`` plus the hand-placed perturbation ``name`` (recorded when shapes are asked)."""
  taps = _TAPS.get()
  if taps is None:
    return value
  if isinstance(taps, list):  # the shape pass
    taps.append((name, jax.ShapeDtypeStruct(value.shape, value.dtype)))
    return value
  return value + taps[name]


@contextlib.contextmanager
def tapping(taps):
  token = _TAPS.set(taps)
  try:
    yield
  finally:
    _TAPS.reset(token)


def norm64(tree):
  leaves = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(tree)]
  return np.sqrt(sum(np.sum(x * x) for x in leaves)) if leaves else 0.0


def hand_gradients(loss_fn, model, *args):
  """Gradients at the taps (in call order, by name) and at the params, by hand."""
  recorded = []
  with tapping(recorded):
    nnx.eval_shape(lambda m: loss_fn(m, *args), nnx.clone(model))
  names = [name for name, _ in recorded]
  assert len(set(names)) == len(names), names
  zeros = {name: jnp.zeros(s.shape, s.dtype) for name, s in recorded}

  def loss_of(model, taps):
    with tapping(taps):
      return loss_fn(model, *args)

  grad_params, grad_taps = nnx.grad(loss_of, argnums=(0, 1))(nnx.clone(model), zeros)
  return names, grad_taps, grad_params


def module_params(grad_params, path):
  tree = grad_params
  for part in path.split("/") if path else ():
    key = int(part) if part.isdigit() else part
    if key not in tree:
      return {}  # a module without parameters
    tree = tree[key]
  return tree


def check_report(report, names, grad_taps, grad_params, per_layer=False):
  """The report against the hand gradients: keys in call order, norms in float64.

  The tap ``"<key>@at_bgn"``, where there is one, sits after a BGN node on the
  output: the report must then have an "at_bgn" entry, and only then.
  """
  keys = [name for name in names if not name.endswith("@at_bgn")]
  assert list(report) == keys
  for key in keys:
    path = key.split("#")[0]
    expected = {"output": grad_taps[key], "params": module_params(grad_params, path)}
    if f"{key}@at_bgn" in grad_taps:
      expected["at_bgn"] = grad_taps[f"{key}@at_bgn"]
    assert set(report[key]) == set(expected), key
    layers = len(grad_taps[key]) if per_layer else None
    for kind, tree in expected.items():
      if per_layer:  # one norm per leading index
        want = [norm64(jax.tree.map(lambda p, i=i: p[i], tree)) for i in range(layers)]
      else:
        want = norm64(tree)
      got = np.asarray(report[key][kind])
      np.testing.assert_allclose(got, want, rtol=2e-6, err_msg=f"{key} {kind}")


def sin_loss(model, x):
  return jnp.sum(jnp.sin(3.0 * model(x)))


class MLP(nnx.Module):
  """Linear and tanh; ``hand_nodes``/``hand_before``: a bgn node on each Linear's
  output/input, written by hand."""

  def __init__(self, depth=3, *, hand_nodes=False, hand_before=False, rngs):
    self.layers = nnx.List([nnx.Linear(WIDTH, WIDTH, rngs=rngs) for i in range(depth)])
    self.hand_nodes = hand_nodes
    self.hand_before = hand_before

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      if self.hand_before:  # the gradient the node receives: at the Linear's input
        x = tap(f"layers/{i}@at_bgn", bgn(x))
      h = tap(f"layers/{i}", layer(x))
      x = jnp.tanh(tap(f"layers/{i}@at_bgn", bgn(h)) if self.hand_nodes else h)
    return x


def test_mlp_against_hand_perturbations():
  model, x = MLP(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  check_report(report, *hand_gradients(sin_loss, model, x))
  assert all(report[k]["output"].dtype == jnp.float32 for k in report)


def test_inserted_nodes_report_output_before_the_node_and_at_bgn_after_it():
  # As in linen: "output" is the Linear's own output, which the node is the only
  # consumer of (so the normalized gradient); "at_bgn" the raw one arriving at the node.
  model, x = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  names, grad_taps, grad_params = hand_gradients(
    sin_loss, MLP(hand_nodes=True, rngs=nnx.Rngs(0)), x
  )
  check_report(report, names, grad_taps, grad_params)
  # The node's target norm for a (3, 8) output is sqrt(8) (sqrt_units: the features).
  for key in report:
    np.testing.assert_allclose(report[key]["output"], np.sqrt(WIDTH), rtol=1e-6)
  # The params are those of the BGN model, not of the plain one.
  plain = hand_gradients(sin_loss, MLP(rngs=nnx.Rngs(0)), x)[2]
  assert not np.isclose(norm64(plain["layers"][0]), norm64(grad_params["layers"][0]))
  # A node before the module normalizes its input: "at_bgn" is the gradient that node
  # receives.
  model = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear, position="before")
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  check_report(report, *hand_gradients(sin_loss, MLP(hand_before=True, rngs=nnx.Rngs(0)), x))


class Residual(nnx.Module):
  """h = Linear(x); out = tanh(BGN(h)) * 3 + h: h has two consumers.

  ``feed``: "attribute" (the BGN layer is an attribute), "inline" (made inside
  ``__call__``: it has no state) or "copy" (the layer is fed ``h + 0``, not the
  Linear's output itself, so it is not a node on that output).
  """

  def __init__(self, *, feed="attribute", rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.node = bgn_jax.nnx.BGN()
    self.feed = feed

  def __call__(self, x):
    h = tap("linear", self.linear(x))
    if self.feed == "copy":
      return jnp.tanh(self.node(h + 0.0)) * 3.0 + h
    node = bgn_jax.nnx.BGN() if self.feed == "inline" else self.node
    return jnp.tanh(tap("linear@at_bgn", node(h))) * 3.0 + h


@pytest.mark.parametrize("feed", ["attribute", "inline", "copy"])
def test_residual_output_is_over_all_consumers_and_at_bgn_at_the_layer(feed):
  model, x = Residual(feed=feed, rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  check_report(report, *hand_gradients(sin_loss, model, x))


class LinenMLP(linen.Module):
  depth: int = 3

  @linen.compact
  def __call__(self, x):
    for _ in range(self.depth):
      x = jnp.tanh(linen.Dense(WIDTH)(x))
    return x


class LinenResidual(linen.Module):
  @linen.compact
  def __call__(self, x):
    h = linen.Dense(WIDTH)(x)
    return jnp.tanh(bgn_jax.linen.BGN()(h)) * 3.0 + h


def linen_params(linears):
  return {
    "params": {
      f"Dense_{i}": {"kernel": linear.kernel[...], "bias": linear.bias[...]}
      for i, linear in enumerate(linears)
    }
  }


def test_the_report_is_linens_on_the_same_weights():
  x = inputs((3, WIDTH))
  mlp = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear)
  residual = Residual(rngs=nnx.Rngs(0))
  inserted_apply = bgn_jax.linen.insert(LinenMLP().apply, where=linen.Dense)
  cases = [
    (mlp, list(mlp.layers), inserted_apply, [f"layers/{i}" for i in range(3)]),
    (residual, [residual.linear], LinenResidual().apply, ["linear"]),
  ]
  for model, linears, apply, keys in cases:
    got = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
    expected = bgn_jax.linen.grad_norms(
      lambda v, x, apply=apply: jnp.sum(jnp.sin(3.0 * apply(v, x))), where=linen.Dense
    )(linen_params(linears), x)
    assert list(got) == keys
    renamed = {key: expected[f"Dense_{i}"] for i, key in enumerate(keys)}
    assert {k: list(v) for k, v in got.items()} == {k: list(v) for k, v in renamed.items()}
    chex.assert_trees_all_close(dict(got), renamed, rtol=1e-5)


class Block(nnx.Module):
  """A gemma-like decoder block at toy size: pre-norms, attention, gated MLP, residuals."""

  def __init__(self, *, hand_nodes=False, rngs):
    self.hand_nodes = hand_nodes  # a bgn node on each MLP Linear's output, by hand
    self.pre_attention_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
      num_heads=2, in_features=WIDTH, decode=False, deterministic=True, rngs=rngs
    )
    self.pre_ffw_norm = nnx.RMSNorm(WIDTH, rngs=rngs)
    self.gate = nnx.Linear(WIDTH, 2 * WIDTH, use_bias=False, rngs=rngs)
    self.up = nnx.Linear(WIDTH, 2 * WIDTH, use_bias=False, rngs=rngs)
    self.down = nnx.Linear(2 * WIDTH, WIDTH, use_bias=False, rngs=rngs)

  def __call__(self, x, mask):
    h = tap("block/pre_attention_norm", self.pre_attention_norm(x))
    x = x + tap("block/attention", self.attention(h, mask=mask))
    h = tap("block/pre_ffw_norm", self.pre_ffw_norm(x))
    gate = self.node("block/gate", self.gate(h))
    up = self.node("block/up", self.up(h))
    return x + self.node("block/down", self.down(jax.nn.gelu(gate) * up))

  def node(self, name, h):
    h = tap(name, h)
    return tap(f"{name}@at_bgn", bgn(h)) if self.hand_nodes else h


class Transformer(nnx.Module):
  def __init__(self, *, hand_nodes=False, rngs):
    self.embedder = nnx.Embed(16, WIDTH, rngs=rngs)
    self.block = Block(hand_nodes=hand_nodes, rngs=rngs)
    self.final_norm = nnx.RMSNorm(WIDTH, rngs=rngs)

  def __call__(self, tokens):
    x = tap("embedder", self.embedder(tokens)) * jnp.sqrt(WIDTH)
    mask = nnx.make_causal_mask(tokens)
    x = self.block(x, mask)
    x = tap("final_norm", self.final_norm(x))
    return self.embedder.attend(x)  # tied embedding: the embedder's params are used twice


def lm_loss(model, tokens):
  logits = model(tokens)
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]))


def test_gemma_like_transformer_block():
  # Nodes inserted on the block's MLP (nnx filters combine type and path), and a
  # report on every kind of module: at_bgn on the MLP Linears only.
  model = bgn_jax.nnx.insert(
    Transformer(rngs=nnx.Rngs(0)),
    where=nnx.All(nnx.OfType(nnx.Linear), nnx.PathContains("block")),
  )
  tokens = jnp.asarray([[1, 5, 2, 9, 3], [4, 4, 0, 15, 7]], jnp.int32)
  where = nnx.Any(
    nnx.OfType(nnx.Embed),
    nnx.OfType(nnx.RMSNorm),
    nnx.OfType(nnx.MultiHeadAttention),
    nnx.All(nnx.OfType(nnx.Linear), nnx.Not(nnx.PathContains("attention"))),
  )
  report = bgn_jax.nnx.grad_norms(lm_loss, where=where)(model, tokens)
  hand = Transformer(hand_nodes=True, rngs=nnx.Rngs(0))
  check_report(report, *hand_gradients(lm_loss, hand, tokens))
  assert [key for key in report if "at_bgn" in report[key]] == [
    "block/gate",
    "block/up",
    "block/down",
  ]


class Loss(nnx.Variable):
  pass


class VAE(nnx.Module):
  """flax's examples/nnx_toy_examples/05_vae.py at toy size: kl_loss is assigned in __call__."""

  def __init__(self, *, rngs):
    self.encoder = nnx.Linear(12, 8, rngs=rngs)
    self.mean = nnx.Linear(8, 4, rngs=rngs)
    self.log_std = nnx.Linear(8, 4, rngs=rngs)
    self.decoder = nnx.Linear(4, 12, rngs=rngs)
    self.rngs = rngs

  def __call__(self, x):
    h = jax.nn.relu(tap("encoder", self.encoder(x)))
    mean, log_std = tap("mean", self.mean(h)), tap("log_std", self.log_std(h))
    std = jnp.exp(log_std)
    self.kl_loss = Loss(jnp.mean(0.5 * (mean**2 + std**2 - 1.0) - log_std))
    z = mean + std * jax.random.normal(self.rngs.noise(), mean.shape)
    return tap("decoder", self.decoder(z))


def vae_loss(model, x):
  logits = model(x)
  return jnp.mean(optax.sigmoid_binary_cross_entropy(logits, x)) + 0.1 * model.kl_loss[...]


def test_vae_with_a_loss_variable_and_rngs_leaves_the_model_as_it_was():
  model = VAE(rngs=nnx.Rngs(0))
  x = (inputs((6, 12)) > 0).astype(jnp.float32)
  graphdef, counts = nnx.graphdef(model), nnx.state(model, nnx.RngCount)
  report = bgn_jax.nnx.grad_norms(vae_loss, where=nnx.Linear)(model, x)
  check_report(report, *hand_gradients(vae_loss, model, x))
  assert not hasattr(model, "kl_loss")
  assert nnx.graphdef(model) == graphdef
  chex.assert_trees_all_equal(nnx.state(model, nnx.RngCount), counts)


class BatchNormDropoutMLP(nnx.Module):
  """The MLP of flax's nnx toy examples: Linear, BatchNorm, Dropout, in train mode."""

  def __init__(self, *, rngs):
    self.linear1 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.norm = nnx.BatchNorm(WIDTH, rngs=rngs)
    self.dropout = nnx.Dropout(0.5, rngs=rngs)
    self.linear2 = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = tap("norm", self.norm(tap("linear1", self.linear1(x))))
    x = tap("dropout", self.dropout(nnx.relu(x)))
    return tap("linear2", self.linear2(x))


def test_batchnorm_and_dropout_in_train_mode():
  model, x = BatchNormDropoutMLP(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  before = nnx.state(model, (nnx.BatchStat, nnx.RngCount))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Module)(model, x)
  names, grad_taps, grad_params = hand_gradients(sin_loss, model, x)
  # The top-level module is matched too: its output is the loss's input.
  grad_taps[""] = jax.grad(lambda y: jnp.sum(jnp.sin(3.0 * y)))(nnx.clone(model)(x))
  check_report(report, [*names, ""], grad_taps, grad_params)
  assert float(report["dropout"]["params"]) == 0.0
  chex.assert_trees_all_equal(nnx.state(model, (nnx.BatchStat, nnx.RngCount)), before)


LAYERS = 3


class ScanStack(nnx.Module):
  """Layers with stacked parameters (nnx.vmap), run by nnx.scan; taps are scanned too.

  ``hand_nodes``: a bgn node on each layer's output, by hand, with its own tap.
  """

  def __init__(self, *, hand_nodes=False, rngs):
    @nnx.split_rngs(splits=LAYERS)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    self.layers = stacked(rngs)
    self.head = nnx.Linear(WIDTH, WIDTH, rngs=rngs)
    self.hand_nodes = hand_nodes

  def __call__(self, x):
    names = ["layers", "layers@at_bgn"] if self.hand_nodes else ["layers"]
    shape, taps = (LAYERS, *x.shape), _TAPS.get()
    if isinstance(taps, list):
      taps += [(name, jax.ShapeDtypeStruct(shape, x.dtype)) for name in names]
    per_layer = [taps[n] if isinstance(taps, dict) else jnp.zeros(shape, x.dtype) for n in names]

    @nnx.scan(in_axes=(nnx.Carry, 0, 0), out_axes=nnx.Carry)
    def body(x, layer, perturbations):
      h = layer(x) + perturbations[0]
      return jnp.tanh(bgn(h) + perturbations[1] if self.hand_nodes else h)

    return tap("head", self.head(body(x, self.layers, per_layer)))


@pytest.mark.parametrize("inserted", [False, True], ids=["plain", "inserted"])
def test_scan_stack_gives_one_value_per_layer(inserted):
  model, x = ScanStack(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  if inserted:
    bgn_jax.nnx.insert(model, where=r"^layers$")
  report = bgn_jax.nnx.grad_norms(sin_loss, where=r"^layers$")(model, x)
  reference = ScanStack(hand_nodes=inserted, rngs=nnx.Rngs(0))
  names, grad_taps, grad_params = hand_gradients(sin_loss, reference, x)
  assert {v.shape for v in report["layers"].values()} == {(LAYERS,)}
  scanned = [name for name in names if name.startswith("layers")]
  check_report(report, scanned, grad_taps, grad_params, per_layer=True)
  assert bgn_jax.depth_profile(report).shape == (LAYERS,)


class Twice(nnx.Module):
  def __init__(self, *, rngs):
    self.linear = nnx.Linear(WIDTH, WIDTH, rngs=rngs)

  def __call__(self, x):
    x = jnp.tanh(tap("linear", self.linear(x)))
    return jnp.tanh(tap("linear#1", self.linear(x)))


def test_a_module_called_twice_gets_one_entry_per_call():
  model, x = Twice(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  check_report(report, *hand_gradients(sin_loss, model, x))
  chex.assert_trees_all_equal(report["linear"]["params"], report["linear#1"]["params"])


def test_inside_nnx_jit_and_jax_jit():
  model, x = bgn_jax.nnx.insert(MLP(rngs=nnx.Rngs(0)), where=nnx.Linear), inputs((3, WIDTH))
  eager = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)

  @nnx.jit
  def in_nnx_jit(model, x):
    return bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)

  graphdef, state = nnx.split(model)

  @jax.jit
  def in_jax_jit(state, x):
    return bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(nnx.merge(graphdef, state), x)

  for jitted in (in_nnx_jit(model, x), in_jax_jit(state, x)):
    assert list(jitted) == list(eager)
    chex.assert_trees_all_close(jitted, eager, rtol=1e-6)
  assert nnx.graphdef(model) == graphdef


def test_bad_where_and_no_match():
  model, x = MLP(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  with pytest.raises(TypeError, match=r"nnx.grad_norms: `where` is a module instance"):
    bgn_jax.nnx.grad_norms(sin_loss, where=model.layers[0])(model, x)
  with pytest.raises(ValueError, match="matched no module") as error:
    bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Conv)(model, x)
  assert "Linear at 'layers/0'" in str(error.value)
  with pytest.raises(ValueError, match="loss_fn called none of them"):
    bgn_jax.nnx.grad_norms(lambda m, x: jnp.sum(x), where=nnx.Linear)(model, x)
  with pytest.raises(TypeError, match="`loss_fn` must be callable"):
    bgn_jax.nnx.grad_norms(None, where=nnx.Linear)(model, x)
  with pytest.raises(TypeError, match="`model` must be an nnx.Module"):
    bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)({"a": 1}, x)


class Ensemble(nnx.Module):
  """Three Linears with stacked parameters run side by side by nnx.vmap."""

  def __init__(self, *, rngs):
    @nnx.split_rngs(splits=3)
    @nnx.vmap(in_axes=(0,), out_axes=0)
    def stacked(rngs):
      return nnx.Linear(WIDTH, WIDTH, rngs=rngs)

    self.members = stacked(rngs)

  def __call__(self, x):
    @nnx.vmap(in_axes=(0, None), out_axes=0)
    def run(member, x):
      return jnp.tanh(member(x))

    return run(self.members, x)


def test_vmap_stack_gives_one_value_per_member_against_hand_backprop():
  model, x = Ensemble(rngs=nnx.Rngs(0)), inputs((3, WIDTH))
  report = bgn_jax.nnx.grad_norms(sin_loss, where=nnx.Linear)(model, x)
  kernel = np.asarray(model.members.kernel[...], np.float64)
  bias = np.asarray(model.members.bias[...], np.float64)
  h = np.einsum("bi,mio->mbo", np.asarray(x, np.float64), kernel) + bias[:, None]
  # d/dh of sum(sin(3 tanh(h))), and the Linear's backprop to its kernel and bias.
  grad_h = 3.0 * np.cos(3.0 * np.tanh(h)) * (1.0 - np.tanh(h) ** 2)
  grad_kernel = np.einsum("bi,mbo->mio", np.asarray(x, np.float64), grad_h)
  grad_bias = grad_h.sum(axis=1)
  np.testing.assert_allclose(
    report["members"]["output"], np.sqrt((grad_h**2).sum(axis=(1, 2))), rtol=1e-5
  )
  expected_params = np.sqrt((grad_kernel**2).sum(axis=(1, 2)) + (grad_bias**2).sum(axis=1))
  np.testing.assert_allclose(report["members"]["params"], expected_params, rtol=1e-5)
