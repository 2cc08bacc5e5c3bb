"""Probabilistic knowledge transfer (Passalis & Tefas 2018): the batch's
cosine-similarity distributions match. RepDistiller: ``feat[-1]``, weight
30000."""

from kd_jax import feature_losses
from kd_jax.methods import feature


def loss(student, teacher, *, where, eps, **unused):
  del unused
  return feature_losses.pkt(student, teacher, eps=eps, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='pkt', loss=loss, options={'eps': 1e-7}))
