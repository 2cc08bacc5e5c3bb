"""Attention transfer (Zagoruyko & Komodakis 2017): the normalised spatial
maps ``mean_c f^p`` of both sides match. RepDistiller: each of
``feat[1:-1]``, summed, weight 1000, ``p=2``."""

from kd_jax import feature_losses
from kd_jax.methods import feature


def loss(student, teacher, *, where, p, **unused):
  del unused
  return feature_losses.attention_transfer(student, teacher, p=p, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='at', loss=loss, options={'p': 2}))
