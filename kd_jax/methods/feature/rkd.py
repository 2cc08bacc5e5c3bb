"""Relational KD (Park et al. 2019): distances and angles between the
batch's embeddings match. RepDistiller: ``feat[-1]``, weight 1, distance
weight 25, angle weight 50."""

from kd_jax import feature_losses
from kd_jax.methods import feature


def loss(student, teacher, *, where, distance_weight, angle_weight,
         **unused):
  del unused
  return feature_losses.rkd(student, teacher,
                            distance_weight=distance_weight,
                            angle_weight=angle_weight, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='rkd', loss=loss,
    options={'distance_weight': 25.0, 'angle_weight': 50.0}))
