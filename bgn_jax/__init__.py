"""bgn_jax: Backward Gradient Normalization for JAX and Flax.

References:
  Cabana & Lago-Fernandez, *Backward Gradient Normalization in Deep Neural
  Networks*, 2021. https://arxiv.org/abs/2106.09475
"""

from bgn_jax import nnx
from bgn_jax.core import bgn
from bgn_jax.linen import BGN

__version__ = "0.1.0"

__all__ = ["BGN", "__version__", "bgn", "nnx"]
