"""Smoke checks of an installed bgn_jax wheel, run by `.ci/run` outside the source tree.

Usage: ``python -I tests/smoke_installed.py WHEEL`` from a temporary folder, with the
python of a fresh virtual environment that has ``WHEEL[cli,equinox]`` installed. ``-I``
keeps this file's folder (and the working folder) off ``sys.path``, so ``bgn_jax`` is the
installed package, never the checkout; the first check makes sure of it.

Checks, each against a hand computation where there is one:

- the wheel holds only the package and its metadata: no tests, results, benchmarks,
  figures or data;
- ``bgn_jax`` imports from site-packages, at the version the wheel's metadata names;
- ``bgn_jax.bgn``'s gradient (default and explicit target norms, per example);
- one top-level ``bgn_jax.insert`` per framework (linen, nnx, equinox): the same forward
  pass, and the input gradient of a linear loss rescaled by ``target / |cotangent|``;
- ``bgn-jax demo --help`` (the console script) exits 0 with a usage text;
- the packaged experiment configs are in the installed package and parse as TOML.

Not a pytest file (the name does not start with ``test_``): the suite runs from the
checkout, this runs against the wheel.
"""

from __future__ import annotations

import importlib.metadata
import importlib.resources
import math
import os
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

# The configs the command line's docs name; the wheel must carry at least these.
EXPECTED_CONFIGS = {"paper_cpu.toml", "relu_inits_cpu.toml", "cnn_cpu.toml", "depth_limit.toml"}
# What may not be in the wheel, as path parts or suffixes.
FORBIDDEN_PARTS = {"tests", "results", "benchmarks", "docs", "examples", "runs", ".benchmarks"}
FORBIDDEN_SUFFIXES = {".json", ".png", ".svg", ".pdf", ".csv", ".npz", ".npy", ".pkl", ".eqx"}


def check_wheel(wheel: Path) -> None:
  names = zipfile.ZipFile(wheel).namelist()
  assert names, f"{wheel} is empty"
  dist_info = f"bgn_jax-{importlib.metadata.version('bgn_jax')}.dist-info/"
  for name in names:
    parts = Path(name).parts
    assert name.startswith(("bgn_jax/", dist_info)), f"wheel holds {name} outside the package"
    assert not FORBIDDEN_PARTS & set(parts), f"wheel holds {name}"
    assert Path(name).suffix not in FORBIDDEN_SUFFIXES, f"wheel holds data file {name}"
  assert "bgn_jax/py.typed" in names, "wheel lacks bgn_jax/py.typed"
  print(f"wheel: {len(names)} files, package and metadata only")


def check_import() -> None:
  import bgn_jax

  where = Path(bgn_jax.__file__).resolve()
  site = Path(sysconfig.get_paths()["purelib"]).resolve()
  assert site in where.parents, f"bgn_jax imported from {where}, not from {site}"
  installed = importlib.metadata.version("bgn_jax")
  assert bgn_jax.__version__ == installed, (bgn_jax.__version__, installed)
  print(f"import: bgn_jax {installed} from {where.parent}")


def check_op() -> None:
  import jax
  import jax.numpy as jnp
  import numpy as np

  import bgn_jax

  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32)), jnp.float32)
  c = jnp.asarray(np.random.default_rng(1).normal(size=(4, 32)), jnp.float32)
  cn = np.asarray(c, np.float64)

  def grad(**options):
    return np.asarray(jax.grad(lambda x: jnp.sum(c * bgn_jax.bgn(x, **options)))(x))

  # Whole batch, default target sqrt(units) = sqrt(32): the cotangent c, rescaled.
  np.testing.assert_allclose(grad(), cn * math.sqrt(32) / np.linalg.norm(cn), rtol=1e-5)
  np.testing.assert_allclose(grad(target_norm=3.0), cn * 3.0 / np.linalg.norm(cn), rtol=1e-5)
  # Per example: each row to sqrt(32).
  rows = np.linalg.norm(cn, axis=1, keepdims=True)
  np.testing.assert_allclose(grad(axes=(1,)), cn * math.sqrt(32) / rows, rtol=1e-5)
  # The forward pass is the identity, also under jit.
  np.testing.assert_array_equal(np.asarray(jax.jit(bgn_jax.bgn)(x)), np.asarray(x))
  print("op: bgn's gradient equals the hand computation")


TARGET = 2.0


def _check_rescaled(name, plain_out, bgn_out, plain_grad, bgn_grad, cotangent) -> None:
  import numpy as np

  np.testing.assert_allclose(np.asarray(bgn_out), np.asarray(plain_out), rtol=1e-6)
  scale = TARGET / np.linalg.norm(np.asarray(cotangent, np.float64))
  np.testing.assert_allclose(np.asarray(bgn_grad), np.asarray(plain_grad) * scale, rtol=1e-4)
  print(f"insert ({name}): same forward, gradient rescaled by {scale:.3f}")


def check_insert_linen() -> None:
  import flax.linen as nn
  import jax
  import jax.numpy as jnp

  import bgn_jax

  x = jax.random.normal(jax.random.key(0), (3, 4))
  c = jax.random.normal(jax.random.key(1), (3, 8))
  model = nn.Dense(8)
  variables = model.init(jax.random.key(2), x)
  apply_fn = bgn_jax.insert(model.apply, where=nn.Dense, target_norm=TARGET)

  def input_grad(apply):
    return jax.grad(lambda x: jnp.sum(c * apply(variables, x)))(x)

  _check_rescaled(
    "linen",
    model.apply(variables, x),
    apply_fn(variables, x),
    input_grad(model.apply),
    input_grad(apply_fn),
    c,
  )
  assert len(bgn_jax.placements(apply_fn, variables, x)) == 1


def check_insert_nnx() -> None:
  import jax
  import jax.numpy as jnp
  from flax import nnx

  import bgn_jax

  class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
      self.layer = nnx.Linear(4, 8, rngs=rngs)

    def __call__(self, x):
      return self.layer(x)

  x = jax.random.normal(jax.random.key(0), (3, 4))
  c = jax.random.normal(jax.random.key(1), (3, 8))
  model = Net(nnx.Rngs(2))

  def input_grad(model):
    return jax.grad(lambda x: jnp.sum(c * model(x)))(x)

  plain_out, plain_grad = model(x), input_grad(model)
  assert bgn_jax.insert(model, where=nnx.Linear, target_norm=TARGET) is model  # in place
  _check_rescaled("nnx", plain_out, model(x), plain_grad, input_grad(model), c)
  assert len(bgn_jax.placements(model, x)) == 1


def check_insert_equinox() -> None:
  import equinox as eqx
  import jax
  import jax.numpy as jnp

  import bgn_jax

  class Net(eqx.Module):
    layer: eqx.nn.Linear

    def __call__(self, x):
      return self.layer(x)

  x = jax.random.normal(jax.random.key(0), (4,))
  c = jax.random.normal(jax.random.key(1), (8,))
  model = Net(eqx.nn.Linear(4, 8, key=jax.random.key(2)))
  inserted = bgn_jax.insert(model, where=eqx.nn.Linear, target_norm=TARGET)

  def input_grad(model):
    return jax.grad(lambda x: jnp.sum(c * model(x)))(x)

  _check_rescaled("equinox", model(x), inserted(x), input_grad(model), input_grad(inserted), c)
  assert len(bgn_jax.placements(inserted, x)) == 1


def check_command_line() -> None:
  script = Path(sys.executable).parent / ("bgn-jax.exe" if os.name == "nt" else "bgn-jax")
  assert script.exists(), f"no console script at {script}"
  done = subprocess.run(
    [str(script), "demo", "--help"], capture_output=True, text=True, timeout=120
  )
  assert done.returncode == 0, done.stdout + done.stderr
  assert "usage:" in done.stdout and "demo" in done.stdout, done.stdout
  print("command line: bgn-jax demo --help")


def check_configs() -> None:
  configs = importlib.resources.files("bgn_jax.experiments") / "configs"
  found = {entry.name for entry in configs.iterdir() if entry.name.endswith(".toml")}
  assert EXPECTED_CONFIGS <= found, f"missing configs: {sorted(EXPECTED_CONFIGS - found)}"
  for name in sorted(found):
    tomllib.loads((configs / name).read_text())
  print(f"configs: {len(found)} packaged, all parse")


def main() -> None:
  (wheel,) = sys.argv[1:]
  check_import()
  check_wheel(Path(wheel))
  check_op()
  check_insert_linen()
  check_insert_nnx()
  check_insert_equinox()
  check_command_line()
  check_configs()
  print("smoke: all checks passed")


if __name__ == "__main__":
  main()
