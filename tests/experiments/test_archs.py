"""The cnn and transformer archs of ``bgn-jax train``: shapes, placement, training, resume."""

from __future__ import annotations

import dataclasses
import functools
import json
import math

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgn_jax.core import bgn
from bgn_jax.experiments.cli import build_parser, main
from bgn_jax.experiments.data import load_digits
from bgn_jax.experiments.models import (
  METHODS_BY_ARCH,
  DeepCNN,
  PostLNSublayer,
  Transformer,
  to_images,
  transformer_apply,
)
from bgn_jax.experiments.train import TrainConfig, lr_factor, train, training_subset

X = jax.random.normal(jax.random.key(0), (4, 784))


@pytest.mark.parametrize("method", METHODS_BY_ARCH["cnn"])
def test_cnn_shapes_stages_and_strides(method):
  # Depth 7 is split into stages of 3, 2 and 2 layers; the first of each has stride 2.
  model = DeepCNN(depth=7, width=8, num_classes=10, method=method)
  # Shapes only: traced abstractly, nothing is computed.
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), X)
  params = variables["params"]
  assert params["input_layer"]["conv"]["kernel"].shape == (3, 3, 1, 8)
  assert params["stage0"]["layer"]["conv"]["kernel"].shape == (2, 3, 3, 8, 8)
  assert params["stage1"]["layer"]["conv"]["kernel"].shape == (1, 3, 3, 8, 8)
  assert params["classifier"]["kernel"].shape == (8, 10)
  assert ("gain" in params["stage0"]["layer"]) == (method == "residual")
  assert ("batch_stats" in variables) == (method == "batchnorm")
  downs = ("input_layer", "stage1_down", "stage2_down")
  logits, state = jax.eval_shape(
    functools.partial(
      model.apply,
      train=False,
      capture_intermediates=lambda module, _: module.name in downs,
      mutable=["intermediates"],
    ),
    variables,
    X,
  )
  assert logits.shape == (4, 10)
  spatial = {name: state["intermediates"][name]["__call__"][0].shape[1:] for name in downs}
  assert spatial == {"input_layer": (14, 14, 8), "stage1_down": (7, 7, 8), "stage2_down": (4, 4, 8)}


def test_residual_starts_as_the_identity_around_every_stride_one_layer():
  model = DeepCNN(depth=4, width=8, num_classes=10, method="residual")
  variables = model.init(jax.random.key(1), X, train=False)
  # Depth 4 = stages of 2, 1 and 1 layers: with its gain at zero the scanned
  # layer passes its input through, so the net is the three stride-2 layers
  # alone, written out here with the same weights.
  p = variables["params"]
  h = to_images(X)
  for name in ("input_layer", "stage1_down", "stage2_down"):
    conv = jax.lax.conv_general_dilated(
      h, p[name]["conv"]["kernel"], (2, 2), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    h = jax.nn.relu(conv + p[name]["conv"]["bias"])
  expected = jnp.mean(h, axis=(1, 2)) @ p["classifier"]["kernel"] + p["classifier"]["bias"]
  got = jax.jit(functools.partial(model.apply, train=False))(variables, X)
  chex.assert_trees_all_close(got, expected, atol=1e-5)


@pytest.mark.parametrize("method", METHODS_BY_ARCH["transformer"])
def test_transformer_shapes(method):
  model = Transformer(depth=3, width=16, num_classes=10, heads=2, method=method)
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(1), X)
  logits = jax.eval_shape(functools.partial(transformer_apply(model), train=False), variables, X)
  assert logits.shape == (4, 10)
  params = variables["params"]
  assert params["input_layer"]["kernel"].shape == (28, 16)  # one token per image row
  assert params["position"].shape == (28, 16)
  block = params["stack"]["block"]
  assert block["attention"]["norm"]["scale"].shape == (3, 16)
  assert block["feed_forward"]["mlp"]["hidden"]["kernel"].shape == (3, 16, 32)
  assert ("final_norm" in params) == (method == "pre-ln")


def test_transformer_bgn_puts_a_node_after_every_post_ln_sublayer():
  """The bgn method against the post-LN net with hand-placed nodes, written out per layer."""
  depth, width, heads = 2, 8, 2
  model = Transformer(depth=depth, width=width, num_classes=10, heads=heads, method="bgn")
  # Everything jitted: op by op, each primitive of these models is a compile of its own.
  variables = jax.jit(functools.partial(model.init, train=False))(jax.random.key(1), X)
  y = jnp.arange(4) % 10

  class HandPlaced(PostLNSublayer):
    def __call__(self, h):
      return bgn(super().__call__(h))

  def loss(apply, params):
    logits = apply({"params": params}, X, train=False)
    return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(4), y])

  with pytest.MonkeyPatch.context() as patch:
    import bgn_jax.experiments.models as models

    patch.setattr(models, "PostLNSublayer", HandPlaced)
    reference = Transformer(depth=depth, width=width, num_classes=10, heads=heads)
    expected = jax.jit(jax.grad(functools.partial(loss, reference.apply)))(variables["params"])
  got = jax.jit(jax.grad(functools.partial(loss, transformer_apply(model))))(variables["params"])
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-7)
  plain = jax.jit(jax.grad(functools.partial(loss, model.apply)))(variables["params"])
  assert not np.allclose(plain["input_layer"]["kernel"], got["input_layer"]["kernel"])
  # Forward values are those of the plain post-LN net, bit for bit.
  chex.assert_trees_all_equal(
    jax.jit(functools.partial(transformer_apply(model), train=False))(variables, X),
    jax.jit(functools.partial(model.apply, train=False))(variables, X),
  )


def test_lr_factor_warmup_and_cosine_against_the_formulas():
  steps = np.arange(0, 21)
  warm = lr_factor(TrainConfig(out="", warmup_steps=4), 20)
  np.testing.assert_allclose([warm(s) for s in steps], np.minimum(steps / 4, 1.0), atol=1e-7)
  cosine = lr_factor(TrainConfig(out="", schedule="cosine"), 20)
  np.testing.assert_allclose(
    [cosine(s) for s in steps], 0.5 * (1 + np.cos(np.pi * steps / 20)), atol=1e-6
  )
  both = lr_factor(TrainConfig(out="", warmup_steps=4, schedule="cosine"), 20)
  expected = np.where(steps < 4, steps / 4, 0.5 * (1 + np.cos(np.pi * (steps - 4) / 16)))
  np.testing.assert_allclose([both(s) for s in steps], expected, atol=1e-6)
  assert lr_factor(TrainConfig(out=""), 20) is None


def test_training_subset_is_fixed_and_drawn_from_the_training_set():
  data = load_digits()
  a, b = training_subset(data, 100), training_subset(data, 100)
  assert len(a.y_train) == 100
  chex.assert_trees_all_equal(a.x_train, b.x_train)
  rows = {row.tobytes() for row in data.x_train}
  assert all(row.tobytes() in rows for row in a.x_train)
  chex.assert_trees_all_equal(a.x_test, data.x_test)
  with pytest.raises(ValueError, match="--train-examples: 5000"):
    training_subset(data, 5000)


@pytest.mark.parametrize(
  "flags, message",
  [
    (["--arch", "mlp", "--method", "pre-ln"], "--method: got 'pre-ln' for --arch mlp"),
    (["--arch", "cnn", "--method", "pre-ln"], "--method: got 'pre-ln' for --arch cnn"),
    (["--arch", "transformer", "--width", "10", "--heads", "4"], "--width: 10"),
    (["--bgn-target", "huge"], "--bgn-target: got 'huge'"),
    (["--warmup-steps", "-1"], "--warmup-steps"),
  ],
)
def test_bad_arch_flags_name_the_flag(flags, message, tmp_path, capsys):
  assert main(["train", *flags, "--out", str(tmp_path / "x"), "--no-progress"]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "x").exists()


def test_train_flags_reach_the_config():
  args = build_parser().parse_args(
    ["train", "--arch", "transformer", "--heads", "2", "--warmup-steps", "7", "--out", "x"]
  )
  assert (args.arch, args.heads, args.warmup_steps) == ("transformer", 2, 7)


# One small run per arch on digits (8x8 images: 8 tokens of 8 pixels), 2 epochs of
# 22 steps; the transformer with a warm-up, so the schedule's count is checkpointed.
RUNS = {
  "cnn": dict(arch="cnn", method="bgn", depth=4, width=8, init="he", lr=3e-3),
  "transformer": dict(
    arch="transformer", method="bgn", depth=2, width=16, heads=2, lr=3e-3, warmup_steps=5
  ),
}


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory):
  """A persistent compilation cache, so the three runs of an arch compile once."""
  before = (
    jax.config.jax_compilation_cache_dir,
    jax.config.jax_persistent_cache_min_compile_time_secs,
  )
  jax.config.update("jax_compilation_cache_dir", str(tmp_path_factory.mktemp("jax_cache")))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield
  jax.config.update("jax_compilation_cache_dir", before[0])
  jax.config.update("jax_persistent_cache_min_compile_time_secs", before[1])


@pytest.mark.parametrize("arch", RUNS)
def test_arch_trains_and_resumes_bitwise(arch, tmp_path, compile_cache):
  data = load_digits()
  config = TrainConfig(
    out=str(tmp_path / "full"),
    dataset="digits",
    batch_size=64,
    epochs=2,
    log_every=1,
    progress=False,
    plots=False,
    **RUNS[arch],
  )
  full = train(config, dataset=data)
  losses = [r["train_loss"] for r in map(json.loads, open(tmp_path / "full" / "metrics.jsonl"))]
  assert len(losses) == 44
  assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.1, losses
  assert len(full["grad_norms_init"]) == config.depth
  assert all(math.isfinite(v) and v > 0 for v in full["grad_norms_init"])

  def stop_after_the_first_epoch(record):
    if record["epoch"] == 1:
      raise KeyboardInterrupt

  interrupted = dataclasses.replace(config, out=str(tmp_path / "interrupted"))
  with pytest.raises(KeyboardInterrupt):
    train(interrupted, dataset=data, on_epoch=stop_after_the_first_epoch)
  resumed = train(dataclasses.replace(interrupted, resume=True), dataset=data)
  assert resumed["params_sha256"] == full["params_sha256"]
  assert resumed["test_accuracy"] == full["test_accuracy"]


def _hand_written_mlp(params, x, node_after):
  h = jax.nn.relu(
    x @ params["input_layer"]["dense"]["kernel"] + params["input_layer"]["dense"]["bias"]
  )
  if 1 in node_after:
    h = bgn(h)
  stack = params["stack"]["layer"]["dense"]
  for i in range(stack["kernel"].shape[0]):
    h = jax.nn.relu(h @ stack["kernel"][i] + stack["bias"][i])
    if i + 2 in node_after:  # hidden layer i + 2, 1-based
      h = bgn(h)
  return h @ params["classifier"]["kernel"] + params["classifier"]["bias"]


@pytest.mark.parametrize("every, node_after", [(1, (1, 2, 3, 4)), (2, (2, 4))])
def test_bgn_every_k_matches_hand_placed_nodes(every, node_after):
  """Every layer (a static flag), or layers 2 and 4 only (a traced one): the layers
  without a node get no 0/0 from an unused node."""
  from bgn_jax.experiments.models import DeepMLP

  x = X[:, :64]
  model = DeepMLP(depth=4, width=8, num_classes=10, method="bgn", bgn_every=every, init_scheme="he")
  params = model.init(jax.random.key(1), x, train=False)["params"]
  got = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, x, train=False) ** 2)))(
    params
  )
  expected = jax.jit(jax.grad(lambda p: jnp.sum(_hand_written_mlp(p, x, node_after) ** 2)))(params)
  chex.assert_trees_all_close(got, expected, rtol=1e-5, atol=1e-6)


def test_cnn_bgn_every_k_gradients_are_finite():
  model = DeepCNN(depth=4, width=8, num_classes=10, method="bgn", bgn_every=2, init_scheme="he")
  params = model.init(jax.random.key(1), X, train=False)["params"]
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({"params": p}, X, train=False) ** 2)))(
    params
  )
  assert all(bool(jnp.all(jnp.isfinite(leaf))) for leaf in jax.tree.leaves(grads))


@pytest.mark.parametrize("arch", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["bgn", "bgn-per-example"])
def test_a_node_after_every_layer_traces_no_cond(arch, method):
  """On a GPU a conditional in a scanned layer sends its predicate to the host at every
  layer of every step (docs/RESULTS.md, section 3b). With a node after every layer the
  flag is the same for the whole stack, so it is static."""
  from bgn_jax.experiments.models import DeepMLP

  cls, x = (DeepMLP, X[:, :64]) if arch == "mlp" else (DeepCNN, X)
  model = cls(depth=4, width=8, num_classes=10, method=method, init_scheme="he")
  params = model.init(jax.random.key(1), x, train=False)["params"]

  # The forward pass holds the model's own control flow (the node's backward is
  # traced only when differentiated, and its platform choice is not the model's).
  jaxpr = str(jax.make_jaxpr(lambda p: model.apply({"params": p}, x, train=False))(params))
  assert " cond[" not in jaxpr
  assert " scan[" in jaxpr  # the layers are still scanned
