"""Shared pytest setup: the hypothesis profiles, and XLA's backend optimizations off.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) selects the "ci" profile: derandomized,
so every CI run draws the same examples, and no example database.

The test models are tiny, so compiling them costs more than running them: the suite
compiles with XLA's LLVM backend optimizations off (``--xla_backend_optimization_level=0``)
and the CPU's fused computations emitted by its older, elemental emitter
(``--xla_cpu_use_fusion_emitters=false``; the MLIR fusion emitters take about twice as
long to compile a small program). Both leave the HLO passes, and so the fusions the
tests inspect, as they are; the emitter may round a fused computation differently in its
last bits (test_equinox.py's attention block). They are set before JAX starts its
backend and inherited by the subprocesses; a subprocess that sets its own ``XLA_FLAGS``
does without them. Speed is measured in ``benchmarks/``, never here.
"""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile

from hypothesis import settings

_FAST_COMPILE = ("--xla_backend_optimization_level=0", "--xla_cpu_use_fusion_emitters=false")
_FLAGS = os.environ.get("XLA_FLAGS", "").split()
os.environ["XLA_FLAGS"] = " ".join([*_FLAGS, *(f for f in _FAST_COMPILE if f not in _FLAGS)])


def _session_folder(variable: str, prefix: str) -> None:
  """``$variable`` as a fresh temporary folder, made by the first process (pytest's
  controller) and inherited by its workers and subprocesses; removed at its exit."""
  if variable not in os.environ:
    os.environ[variable] = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, os.environ[variable], ignore_errors=True)


# Data caches (scikit-learn's digits, kept as a file) go to a temporary folder, never to
# the user's ~/.cache.
_session_folder("BGN_JAX_CACHE", "bgn_jax_test_data_")
# One persistent compilation cache for the session: the tests build many fresh jitted
# functions that compile to programs compiled before (the cache is keyed on the program,
# not on the Python function). Unless set already, empty at the start of every session,
# so no test depends on an earlier run.
_session_folder("JAX_COMPILATION_CACHE_DIR", "bgn_jax_test_xla_")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))


# The files that take longest, first: the suite runs as `pytest -n 2 --dist loadfile`,
# which hands out whole files in collection order, so the long ones starting last would
# leave one worker running alone at the end. Other files keep their order after them.
_LONGEST_FIRST = (  # longest first, as measured (pytest --durations=0, summed per file)
  "tests/test_core.py",
  "tests/test_microbatch.py",
  "tests/experiments/test_cli.py",
  "tests/test_linen_insert.py",
  "tests/test_docs.py",
  "tests/experiments/test_demo.py",
  "tests/test_benchmarks.py",
  "tests/experiments/test_archs.py",
  "tests/test_examples.py",
  "tests/test_multidevice.py",
  "tests/test_nnx_grad_norms.py",
  "tests/test_equinox.py",
  "tests/test_linen_grad_norms.py",
  "tests/test_train_sharded.py",
  "tests/test_nnx_insert.py",
  "tests/experiments/test_depth_limit.py",
)


def pytest_collection_modifyitems(items):
  def rank(item):
    path = item.nodeid.split("::")[0]
    return _LONGEST_FIRST.index(path) if path in _LONGEST_FIRST else len(_LONGEST_FIRST)

  items.sort(key=rank)  # stable: the order within a file, and of the rest, is kept
