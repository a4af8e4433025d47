"""Checks that the test suite kills deliberate bugs ("mutants") of the library.

Each mutant replaces one exact piece of source text in a temporary copy of the
package and its tests, then runs the few tests meant to catch it with ``-x``, in a
child forked from this process once it has imported JAX and the frameworks. A
mutant is killed when pytest reports a failing test (exit status 1). A mutant
whose text is no longer in the source is an error: update its entry with the
code it stands for. The unmutated code passing those tests is the ordinary CI
test run.

Usage::

  python tests/mutants.py            # every mutant, two at a time
  python tests/mutants.py psum eps   # the mutants whose names contain these words

Exits with status 1 if any mutant survives or cannot be applied.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import shutil
import signal
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WORKERS = 2
TIMEOUT_S = 600  # per mutant


@dataclasses.dataclass(frozen=True)
class Mutant:
  name: str
  path: str  # relative to the repository root
  old: str  # exact source text, present once
  new: str
  tests: tuple[str, ...]  # pytest arguments: node ids, and -k expressions


MUTANTS = [
  Mutant(
    "a microbatch's whole-batch node rescales with its own norm",
    "bgn_jax/core.py",
    "shared_t = t if share is None else t * share.astype(acc)",
    "shared_t = t",
    ("tests/test_microbatch.py::test_equals_the_full_batch_gradient",),
  ),
  Mutant(
    "psum in the norm's custom JVP removed",
    "bgn_jax/core.py",
    "      dr = jax.lax.psum(dr, axis_name)",
    "      dr = dr",
    ("tests/test_core.py::test_grad_of_grad_with_axis_name",),
  ),
  Mutant(
    "eps compared against the unscaled norm in the small band",
    "bgn_jax/core.py",
    "floored = r < eps * inverse_scale",
    "floored = r < eps",
    ("tests/test_core.py::test_eps_at_tiny_groups",),
  ),
  Mutant(
    "the 2**64 scale-up replaced by 2**32",
    "bgn_jax/core.py",
    "log2_up=64,",
    "log2_up=32,",
    ("tests/test_core.py::test_tiny_and_huge_groups_get_the_target_norm",),
  ),
  Mutant(
    "the huge band's pre-scale dropped",
    "bgn_jax/core.py",
    "log2_pre_down = _log2_pre_down(t_value, scales)",
    "log2_pre_down = 0",
    ("tests/test_core.py::test_extreme_groups_with_any_target_and_power", "-k", "1e+38"),
  ),
  Mutant(
    "power applied as 1/c",
    "bgn_jax/core.py",
    "factor = ratio if c == 1.0 else ratio**c",
    "factor = ratio if c == 1.0 else ratio ** (1 / c)",
    ("tests/test_core.py::test_transforms",),
  ),
  Mutant(
    "the zero-group guard on the factor removed",
    "bgn_jax/core.py",
    "  factor = jnp.where(positive, factor, 0)\n",
    "",
    ("tests/test_core.py::test_grad_of_grad_of_a_zero_group_is_zero",),
  ),
  Mutant(
    "axes sorted away (a per-example node normalizes the whole batch)",
    "bgn_jax/core.py",
    "  return tuple(sorted(normalized))",
    "  return None",
    ("tests/test_core.py::test_per_group_norm_is_target",),
  ),
  Mutant(
    "a cotangent known at compile time reaches the scaled sums as a constant",
    "bgn_jax/core.py",
    "    a = g.astype(acc) + zero\n",
    "    a = g.astype(acc)\n",
    ("tests/test_core.py::test_a_node_the_loss_ignores_or_weights_by_zero_changes_nothing",),
  ),
  Mutant(
    "an output the module stores counts as a variable passed through (linen insert)",
    "bgn_jax/linen.py",
    'variables = before | {i: name for i, name in now if name.startswith("params/")}',
    "variables = dict(now)",
    ("tests/test_linen_insert.py", "-k", "stores_gets_its_node"),
  ),
  Mutant(
    "position='before' normalizes keyword arguments too (linen insert)",
    "bgn_jax/linen.py",
    "        args = noded(args)\n",
    "        args = noded(args)\n        kwargs = noded(kwargs)\n",
    ("tests/test_linen_insert.py", "-k", "keyword_arguments"),
  ),
  Mutant(
    "placements counts a node applied several times once (shared recorder)",
    "bgn_jax/_common.py",
    "self._counts[placement] = self._counts.get(placement, 0) + 1",
    "self._counts[placement] = 1",
    ("tests/test_frameworks.py", "-k", "scanned_stack"),
  ),
  Mutant(
    "the whole-model check ignores a call where no selected module ran",
    "bgn_jax/_common.py",
    "elif not check.matched and not self.placed:",
    "elif False:",
    ("tests/test_nnx_equinox_api.py", "-k", "unused_selected"),
  ),
  Mutant(
    "the grad_norms tap returns the norm instead of its square",
    "bgn_jax/_common.py",
    "return grads, jnp.square(norm * scales)",
    "return grads, norm * scales",
    ("tests/test_frameworks.py", "-k", "grad_norms"),
  ),
  Mutant(
    "grad_norms: no at_bgn for a node before a module (shared pass)",
    "bgn_jax/_common.py",
    "return outputs if path is None else self._before_call(module, path, outputs)",
    "return outputs",
    ("tests/test_frameworks.py", "-k", "read_what_reaches and before"),
  ),
]


def copy_tree(destination: Path) -> None:
  for name in ("bgn_jax", "tests"):
    shutil.copytree(
      ROOT / name, destination / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
    )
  shutil.copy(ROOT / "pyproject.toml", destination / "pyproject.toml")


# What every mutant's tests import, loaded once in this process before it forks one child
# per mutant: each child then starts in well under a second instead of the seconds a new
# interpreter takes to import JAX and the frameworks. None of them may start a thread or
# a JAX backend here (checked in `main`): a fork copies only the thread that forks.
PRELOADED = ("jax", "jax.numpy", "numpy", "flax.linen", "flax.nnx", "optax", "equinox", "chex")
PRELOADED += ("hypothesis", "hypothesis.strategies", "pytest")


def _child(copy: Path, tests: tuple[str, ...], log: Path) -> int:
  """In the forked child: pytest on the mutated copy, its output to `log`. Exit status 9:
  the tests would import bgn_jax from outside the copy."""
  import pytest

  with open(log, "w") as out:
    os.dup2(out.fileno(), 1)
    os.dup2(out.fileno(), 2)
  os.chdir(copy)
  sys.path.insert(0, str(copy))
  import bgn_jax

  if not bgn_jax.__file__ or not bgn_jax.__file__.startswith(str(copy)):
    return 9
  # The preloaded plugins (hypothesis, jaxtyping) cannot have their asserts rewritten.
  quiet = ("-W", "ignore::pytest.PytestAssertRewriteWarning")
  return int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", *quiet, *tests]))


def start_mutant(mutant: Mutant, directory: Path) -> int | str:
  """Applies `mutant` to a copy in `directory` and forks the child that tests it; returns
  the child's pid, or why the mutant cannot be applied."""
  copy_tree(directory)
  source = (directory / mutant.path).read_text()
  if source.count(mutant.old) != 1:
    found = source.count(mutant.old)
    return f"its text occurs {found} times in {mutant.path}, not once"
  (directory / mutant.path).write_text(source.replace(mutant.old, mutant.new))
  sys.stdout.flush()
  sys.stderr.flush()
  pid = os.fork()
  if pid == 0:  # the child never returns into the parent's code
    status = 1
    try:
      signal.alarm(TIMEOUT_S)  # a hung child ends as an error, not a hung CI
      status = _child(directory, mutant.tests, directory / "pytest.log")
    finally:
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(status)
  return pid


def main(argv: list[str]) -> int:
  chosen = [m for m in MUTANTS if not argv or any(word in m.name for word in argv)]
  os.environ.update(HYPOTHESIS_PROFILE="ci", JAX_PLATFORMS="cpu")
  for name in PRELOADED:
    importlib.import_module(name)
  if threading.active_count() != 1 or jax_backends():
    raise RuntimeError("tests/mutants.py: a preloaded module started a thread or a backend")
  start = time.perf_counter()
  results: dict[str, tuple[str, float, str]] = {}
  running: dict[int, tuple[Mutant, Path, float]] = {}
  waiting = list(chosen)
  with tempfile.TemporaryDirectory(prefix="bgn-mutants-") as root:
    while waiting or running:
      while waiting and len(running) < WORKERS:
        mutant = waiting.pop(0)
        directory = Path(root) / str(len(results) + len(running))
        started = start_mutant(mutant, directory)
        if isinstance(started, str):
          results[mutant.name] = ("error", 0.0, started)
        else:
          running[started] = (mutant, directory, time.perf_counter())
      if running:
        pid, status = os.wait()
        mutant, directory, began = running.pop(pid)
        code = os.waitstatus_to_exitcode(status)
        log = directory / "pytest.log"
        tail = "\n".join(log.read_text().strip().splitlines()[-3:]) if log.exists() else ""
        if code == 9:
          tail = "the tests would import bgn_jax from outside the copy"
        verdict = {0: "survived", 1: "killed"}.get(code, "error")
        results[mutant.name] = (verdict, time.perf_counter() - began, tail)
  for mutant in chosen:
    verdict, seconds, tail = results[mutant.name]
    print(f"{verdict:8} {seconds:5.1f}s  {mutant.name}")
    if verdict != "killed":
      print("         " + tail.replace("\n", "\n         "))
  killed = sum(verdict == "killed" for verdict, _, _ in results.values())
  print(f"mutants killed: {killed}/{len(chosen)} in {time.perf_counter() - start:.0f}s")
  return 0 if killed == len(chosen) else 1


def jax_backends() -> bool:
  """Whether JAX has started a backend in this process (it must not before a fork)."""
  from jax._src import xla_bridge

  return bool(xla_bridge._backends)


if __name__ == "__main__":
  sys.exit(main(sys.argv[1:]))
