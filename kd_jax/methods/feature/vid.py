"""Variational information distillation (Ahn et al. 2019): a regressor
predicts the teacher's features' mean and a per-channel variance; the loss
is their Gaussian negative log-likelihood. RepDistiller: each of
``feat[1:-1]``, one regressor each, weight 1."""

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def connector(options, name, student, teacher, train):
  del train
  mean, log_scale = connectors.VIDRegressor(
      tuple(teacher.shape[1:]), mid_channels=options['mid_channels'],
      init_pred_var=options['init_pred_var'], eps=options['eps'],
      name=name)(student)
  return mean, teacher, log_scale


def loss(student, teacher, *, extra, where, eps, **unused):
  del unused
  return feature_losses.vid(student, teacher, extra, eps=eps, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='vid', loss=loss,
    options={'mid_channels': None, 'init_pred_var': 5.0, 'eps': 1e-5},
    connector=connector))
