"""bgn_jax: Backward Gradient Normalization for JAX, Flax and equinox.

``bgn`` and ``l2_norm`` are framework-free. One namespace per framework holds the
same verbs (``BGN``, ``insert``, ``remove``, ``placements``, ``grad_norms``):
:mod:`bgn_jax.linen`, :mod:`bgn_jax.nnx` and :mod:`bgn_jax.equinox` (the last one
imported on demand, with the ``equinox`` extra). The top-level ``insert``,
``remove``, ``placements`` and ``grad_norms`` pick the framework from what they
are given; the top-level ``BGN`` is the linen layer.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from bgn_jax import linen, nnx
from bgn_jax._common import Placement, Placements
from bgn_jax._dispatch import grad_norms, insert, placements, remove
from bgn_jax.core import bgn, l2_norm
from bgn_jax.linen import BGN
from bgn_jax.microbatch import microbatch_grad, microbatch_value_and_grad
from bgn_jax.reports import depth_profile, plot_grad_norms, relative_updates

__version__ = "0.1.0"


def __getattr__(name: str) -> object:
  # bgn_jax.equinox is imported on first use, so that `import bgn_jax` never
  # imports equinox (an optional extra).
  if name == "equinox":
    import importlib

    return importlib.import_module("bgn_jax.equinox")
  raise AttributeError(f"module 'bgn_jax' has no attribute {name!r}")


__all__ = [
  "BGN",
  "Placement",
  "Placements",
  "__version__",
  "bgn",
  "depth_profile",
  "grad_norms",
  "insert",
  "l2_norm",
  "linen",
  "microbatch_grad",
  "microbatch_value_and_grad",
  "nnx",
  "placements",
  "plot_grad_norms",
  "relative_updates",
  "remove",
]
