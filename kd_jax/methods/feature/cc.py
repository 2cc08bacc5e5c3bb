"""Correlation congruence (Peng et al. 2019) on linear embeddings of both
sides (``CRDEmbed(dim, normalize=False)``). RepDistiller: ``feat[-1]``,
weight 0.02, ``dim=128``."""

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def connector(options, name, student, teacher, train):
  del train
  dim = options['dim']
  return (connectors.CRDEmbed(dim, False, name=f'{name}_student')(student),
          connectors.CRDEmbed(dim, False, name=f'{name}_teacher')(teacher),
          None)


def loss(student, teacher, *, where, **unused):
  del unused
  return feature_losses.correlation_congruence(student, teacher, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='cc', loss=loss, options={'dim': 128}, connector=connector))
