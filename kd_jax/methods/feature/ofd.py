"""OFD (Heo et al. 2019): the student's pre-ReLU features, through a conv +
BN connector (`connectors.OFDConnector`), match the teacher's pre-ReLU
features passed through a margin ReLU, by the partial L2 distance
(`feature_losses.ofd_loss`).

A term pairs the student's and the teacher's ``preact`` features, shallow
to deep; pair i of n weighs ``2^-(n - 1 - i)`` (the deepest 1), as in the
authors' and mdistiller's sum over stages. The margin of each channel is
`feature_losses.ofd_margin` of the Gaussian that the teacher's pre-ReLU
response follows: the authors read its mean and standard deviation from the
shift and scale of the teacher's BN before the ReLU; a kd_jax teacher hands
over its features, not its BN params, so the mean and standard deviation
of those features over the batch's valid examples and positions (without
gradient) take their place. Authors' CIFAR-100 setting: weight 1e-3 beside
cross-entropy 1, 1x1 connectors.
"""

import jax
import jax.numpy as jnp

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def connector(options, name, students, teachers, train):
  count = len(students)
  mapped = []
  for i, (student, teacher) in enumerate(zip(students, teachers)):
    if student.ndim != 4 or teacher.ndim != 4:
      raise ValueError(
          f'OFD compares [B, H, W, C] maps, got student {student.shape} and '
          f'teacher {teacher.shape}; name pre-ReLU stage outputs '
          f"('preact1', ...) of convolutional models.")
    out = connectors.OFDConnector(
        teacher.shape[-1], kernel_size=options['kernel_size'],
        name=f'{name}_{i}')(student, train)
    mapped.append((out, teacher, 2.0 ** -(count - 1 - i)))
  return tuple(mapped)


def batch_margin(teacher, where):
  """Per-channel margin from the mean and std of `teacher` over the valid
  rows and every position."""
  weights = jnp.broadcast_to(
      jnp.asarray(where, jnp.float32)[:, None, None, None], teacher.shape)
  count = jnp.maximum(jnp.sum(weights, axis=(0, 1, 2)), 1.0)
  mean = jnp.sum(weights * teacher, axis=(0, 1, 2)) / count
  variance = jnp.sum(weights * jnp.square(teacher - mean), axis=(0, 1, 2))
  std = jnp.sqrt(variance / count)
  return jax.lax.stop_gradient(feature_losses.ofd_margin(std, mean))


def loss(student, teacher, *, extra, where, **unused):
  del unused
  margin = batch_margin(teacher, where)
  return extra * feature_losses.ofd_loss(student, teacher, margin,
                                         where=where)


def check(options, field):
  size = options['kernel_size']
  if isinstance(size, bool) or not isinstance(size, int) or size < 1 or (
      size % 2 == 0):
    raise ValueError(f'{field}.kernel_size={size!r} must be a positive odd '
                     f'integer (the authors use 1).')


METHOD = feature.register(feature.FeatureMethod(
    name='ofd', loss=loss, options={'kernel_size': 1}, connector=connector,
    joint_connector=True, check=check))
