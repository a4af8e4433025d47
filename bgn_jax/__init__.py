"""bgn_jax: Backward Gradient Normalization for JAX, Flax and equinox.

``bgn`` and ``l2_norm`` are framework-free. One namespace per framework holds the
same verbs (``BGN``, ``insert``, ``placements``, ``grad_norms``):
:mod:`bgn_jax.linen`, :mod:`bgn_jax.nnx` and :mod:`bgn_jax.equinox` (the last one
imported on demand, with the ``equinox`` extra). The top-level ``BGN``,
``insert``, ``placements`` and ``grad_norms`` are the linen ones.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from bgn_jax import linen, nnx
from bgn_jax.core import bgn, l2_norm
from bgn_jax.linen import BGN, GRAD_NORMS_COLLECTION, grad_norms, insert, placements
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
  "GRAD_NORMS_COLLECTION",
  "__version__",
  "bgn",
  "depth_profile",
  "grad_norms",
  "insert",
  "l2_norm",
  "linen",
  "nnx",
  "placements",
  "plot_grad_norms",
  "relative_updates",
]
