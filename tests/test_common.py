"""Tests of bgn_jax._common, the logic the framework adapters share, against NumPy by hand."""

from __future__ import annotations

import re

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bgn_jax import bgn
from bgn_jax._common import (
  SEEN_LISTED,
  Insertion,
  Placement,
  Placements,
  check_options,
  flatten_leaves,
  get_path,
  group_norms,
  matcher,
  no_match_message,
)


class Module:
  """Stands for a framework's module base class."""

  def __call__(self, x):
    return x


class Dense(Module):
  pass


class Conv(Module):
  pass


def test_check_options_refuses_empty_axes():
  # axes=() once made every entry its own group (the gradient's sign).
  with pytest.raises(ValueError, match=r"f: `axes` \(\) makes every entry its own group"):
    check_options("f", "after", 1, {"axes": ()})


def test_check_options_makes_lists_hashable_and_names_the_function():
  assert check_options("f", "after", 2, {"axes": [0, 1], "power": 0.5}) == {
    "axes": (0, 1),
    "power": 0.5,
  }
  with pytest.raises(ValueError, match=re.escape("f: `position` must be 'after' or 'before'")):
    check_options("f", "inside", 1, {})
  with pytest.raises(TypeError, match=re.escape("f: `every` must be an int >= 1; got 2.0")):
    check_options("f", "after", 2.0, {})
  with pytest.raises(TypeError, match="f: unknown BGN option 'power_'"):
    check_options("f", "after", 1, {"power_": 1.0})


@pytest.mark.parametrize(
  "where, expected",
  [
    (Dense, [True, False]),
    ((Dense, Conv), [True, True]),
    (lambda module: isinstance(module, Conv), [False, True]),
    (r"^dec", [False, True]),
    (re.compile(r"enc"), [True, False]),
  ],
  ids=["class", "tuple", "predicate", "regex", "compiled"],
)
def test_matcher_forms(where, expected):
  is_match = matcher(where, fn_name="f", module_type=Module)
  assert [is_match(Dense(), "encoder/0"), is_match(Conv(), "decoder/0")] == expected


def test_matcher_refuses_what_it_cannot_use():
  with pytest.raises(TypeError, match=r"f: `where` is a module instance \(Dense\).*pass its class"):
    matcher(Dense(), fn_name="f", module_type=Module)
  # Without the module type, an instance is a callable: a predicate.
  assert matcher(Dense(), fn_name="f")(Dense(), "") is True
  with pytest.raises(TypeError, match="f: `where` must be a Module class"):
    matcher(3, fn_name="f")
  with pytest.raises(ValueError, match=r"f: `where` '\(' is not a valid regular expression"):
    matcher("(", fn_name="f")


def test_no_match_message_counts_what_it_does_not_list():
  seen = {("Dense", f"layer_{i}"): None for i in range(SEEN_LISTED + 7)}
  message = no_match_message("f", "Conv", seen, "module call", "f_placements(fn)")
  assert message.startswith("f: `where` 'Conv' matched no module call")
  assert f"Seen ({SEEN_LISTED + 7};" in message
  assert f"Dense at 'layer_{SEEN_LISTED - 1}', ... and 7 more not listed." in message
  assert f"'layer_{SEEN_LISTED}'" not in message
  assert message.endswith("Once `where` matches, f_placements(fn) lists every match and its nodes.")
  empty = no_match_message("f", "Conv", {}, "module call")
  assert "Seen (0; module type at path; '' is the top-level module): nothing." in empty
  assert "placements" not in empty


def test_place_normalizes_float_arrays_only():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 4)), jnp.float32)
  tree = {"x": x, "ids": jnp.arange(3), "mask": x > 0, "numpy": np.ones(2), "n": 3}
  insertion = Insertion("nnx", Dense, "after", 1, {"target_norm": 2.0})

  def place(tree):
    return insertion.place("layer", "Dense", tree, lambda leaf: None, module=None)

  def loss(apply):
    return lambda x: jnp.sum(jnp.sin(apply({**tree, "x": x})["x"]) * 10.0)

  out = place(tree)
  chex.assert_trees_all_equal(out, tree)
  assert out["numpy"] is tree["numpy"] and out["ids"] is tree["ids"]
  got = jax.grad(loss(place))(x)
  expected = jax.grad(loss(lambda t: {**t, "x": bgn(t["x"], target_norm=2.0)}))(x)
  chex.assert_trees_all_equal(got, expected)
  np.testing.assert_allclose(np.linalg.norm(np.asarray(got, np.float64)), 2.0, rtol=1e-6)


def test_get_path():
  tree = {"a": {"b": {"c": 1}}}
  assert get_path(tree, ("a", "b", "c")) == 1
  assert get_path(tree, ("a", "x")) is None
  assert get_path(tree, ("a", "b", "c", "d")) is None
  assert get_path(tree, ()) is tree


def test_flatten_leaves_and_group_norms_against_numpy():
  rng = np.random.default_rng(1)
  # One scanned leaf (a leading axis of 5) with two leaves of that call; another call.
  a = rng.standard_normal((5, 3, 2)).astype(np.float32)
  b = rng.standard_normal((5, 4)).astype(np.float32)
  c = rng.standard_normal((5, 6)).astype(np.float32)  # same flat shape as [a, b]: stacked
  d = rng.standard_normal((2, 3)).astype(np.float32)
  flats = [
    flatten_leaves([jnp.asarray(a), jnp.asarray(b)], [1, 1]),
    flatten_leaves([jnp.asarray(c)], [1]),
    flatten_leaves([jnp.asarray(d)], [0]),
    flatten_leaves([], []),
  ]
  assert flats[0].shape == (5, 10) and flats[2].shape == (6,) and flats[3] is None
  norms = group_norms(flats, [(5,), (5,), (), (5,)])

  def norm64(*arrays):
    return np.sqrt(
      sum(np.sum(np.asarray(x, np.float64) ** 2, axis=tuple(range(1, x.ndim))) for x in arrays)
    )

  np.testing.assert_allclose(norms[0], norm64(a, b), rtol=1e-6)
  np.testing.assert_allclose(norms[1], norm64(c), rtol=1e-6)
  np.testing.assert_allclose(norms[2], np.sqrt(np.sum(d.astype(np.float64) ** 2)), rtol=1e-6)
  chex.assert_trees_all_equal(norms[3], jnp.zeros((5,), jnp.float32))


def test_placements_table():
  report = Placements(
    [
      Placement("", "Model", "before", "[0]", (2, 3), "uint8", "not a floating-point jax.Array"),
      Placement("encoder/Dense_0", "Dense", "after", "", (2, 8), "float32", count=6),
    ]
  )
  assert report.nodes == [report[1]] and report.skipped == [report[0]]
  assert report.applications == 6
  assert str(report) == "\n".join(
    [
      "path               module  position  leaf  shape   dtype    calls  node",
      "-----------------  ------  --------  ----  ------  -------  -----  "
      "---------------------------------------",
      "''                 Model   before    [0]   (2, 3)  uint8    1      "
      "skipped: not a floating-point jax.Array",
      "'encoder/Dense_0'  Dense   after     -     (2, 8)  float32  6      yes",
      "1 nodes applied 6 times, 1 skipped",
    ]
  )
