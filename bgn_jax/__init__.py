"""bgn_jax: Backward Gradient Normalization for JAX and Flax.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from bgn_jax import nnx
from bgn_jax.core import bgn
from bgn_jax.diagnostics import (
  GRAD_NORMS_COLLECTION,
  depth_profile,
  grad_norms,
  plot_grad_norms,
  relative_updates,
)
from bgn_jax.linen import BGN
from bgn_jax.transform import insert

__version__ = "0.1.0"

__all__ = [
  "BGN",
  "GRAD_NORMS_COLLECTION",
  "__version__",
  "bgn",
  "depth_profile",
  "grad_norms",
  "insert",
  "nnx",
  "plot_grad_norms",
  "relative_updates",
]
