"""ReviewKD (Chen et al. 2021): the student's features, fused deep to
shallow by attention-based fusion (`connectors.ReviewKDFusion`, one ABF per
level), are compared with the teacher's level by level by the hierarchical
context loss (`feature_losses.hcl_loss`).

A term names the student's features and the teacher's, shallow to deep,
with the pooled embedding as the deepest level of both (mdistiller: the
student's stage outputs, the teacher's pre-ReLU stage outputs after the
first, each side's pooled feature); all of them go through one fusion
connector (`joint_connector`). mdistiller's CIFAR-100 setting: weight 1 (5
for resnet32x4 -> resnet8x4, configs/cifar100/reviewkd.yaml) beside
cross-entropy 1, with ``warmup_epochs=20`` of 240.
"""

import jax.numpy as jnp

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def _as_map(x):
  return x[:, None, None, :] if x.ndim == 2 else x


def connector(options, name, students, teachers, train):
  teachers = tuple(_as_map(t) for t in teachers)
  outputs = connectors.ReviewKDFusion(
      tuple(tuple(t.shape[1:]) for t in teachers),
      mid_features=options['mid_features'], name=name)(
          [_as_map(s) for s in students], train)
  return tuple((s, t, None) for s, t in zip(outputs, teachers))


def loss(student, teacher, *, where, levels, **unused):
  del unused
  return feature_losses.hcl_loss(student, teacher, levels=tuple(levels),
                                 where=jnp.asarray(where, bool))


def check(options, field):
  levels = options['levels']
  if (isinstance(levels, (str, bytes)) or not hasattr(levels, '__iter__')
      or not all(isinstance(l, int) and not isinstance(l, bool) and l > 0
                 for l in levels)):
    raise ValueError(f'{field}.levels={levels!r} must be a tuple of positive '
                     f'pooled sizes, e.g. the authors\' '
                     f'{feature_losses.HCL_LEVELS}.')
  mid = options['mid_features']
  if mid is not None and (isinstance(mid, bool) or not isinstance(mid, int)
                          or mid < 1):
    raise ValueError(f'{field}.mid_features={mid!r} must be a positive '
                     f'number of channels, or None for the authors\' '
                     f'min(512, channels of the deepest student feature).')


METHOD = feature.register(feature.FeatureMethod(
    name='reviewkd', loss=loss,
    options={'levels': feature_losses.HCL_LEVELS, 'mid_features': None},
    connector=connector, joint_connector=True, check=check))
