"""Shared pytest setup: the hypothesis profiles, and XLA's backend optimizations off.

``HYPOTHESIS_PROFILE=ci`` (set by ``.ci/run``) selects the "ci" profile: derandomized,
so every CI run draws the same examples, and no example database.

The test models are tiny, so compiling them costs more than running them: the suite
compiles with XLA's LLVM backend optimizations off (``--xla_backend_optimization_level=0``,
which leaves the HLO passes, and so the fusions and numerics the tests check, as they
are). It is set before JAX starts its backend and inherited by the subprocesses; a
subprocess that sets its own ``XLA_FLAGS`` does without it. Speed is measured in
``benchmarks/``, never here.
"""

from __future__ import annotations

import os
import tempfile

from hypothesis import settings

_FAST_COMPILE = "--xla_backend_optimization_level=0"
if _FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FAST_COMPILE}".strip()

# Data caches (scikit-learn's digits, kept as a file) go to a temporary folder, shared with
# the subprocesses, never to the user's ~/.cache.
os.environ.setdefault("BGN_JAX_CACHE", tempfile.mkdtemp(prefix="bgn_jax_test_cache_"))

settings.register_profile("ci", derandomize=True, database=None, print_blob=True)
settings.register_profile("dev")

settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))
