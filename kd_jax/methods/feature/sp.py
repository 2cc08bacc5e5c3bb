"""Similarity-preserving KD (Tung & Mori 2019): the batch's row-normalised
Gram matrices of both sides match. RepDistiller: ``feat[-2]``, weight
3000."""

from kd_jax import feature_losses
from kd_jax.methods import feature


def loss(student, teacher, *, where, **unused):
  del unused
  return feature_losses.similarity_preserving(student, teacher, where=where)


METHOD = feature.register(feature.FeatureMethod(name='sp', loss=loss))
