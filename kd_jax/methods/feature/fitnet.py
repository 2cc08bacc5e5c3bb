"""FitNets (Romero et al. 2015): a regressor (conv + BN + ReLU) maps the
student's hint layer to the teacher's; the loss is their mean squared error.
RepDistiller: ``feat[2]``, weight 100."""

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def connector(options, name, student, teacher, train):
  del options
  regressor = connectors.FitNetRegressor(tuple(teacher.shape[1:]), name=name)
  return regressor(student, train), teacher, None


def loss(student, teacher, *, where, **unused):
  del unused
  return feature_losses.fitnet_hint(student, teacher, where=where)


METHOD = feature.register(feature.FeatureMethod(
    name='fitnet', loss=loss, connector=connector))
