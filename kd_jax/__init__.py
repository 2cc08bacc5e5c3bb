"""kd_jax: knowledge distillation in JAX/Flax."""

__version__ = '0.1.0'

# The data layer's plug-ins register themselves when imported.
from kd_jax.specialists import data as _specialist_data  # pylint: disable=g-import-not-at-top,unused-import
