"""Learned student-side connectors of the feature-distillation methods.

Small Flax modules that sit between a network's features and a loss of
:mod:`kd_jax.feature_losses`. Their params are trained with the student's but
are not part of the student: keep them in their own collection of the train
state and leave them out of the exported model.

* :class:`FitNetRegressor`: student hint layer -> teacher hint shape (FitNets).
* :class:`VIDRegressor`: student features -> mean and per-channel variance
  parameters of the teacher's features (VID).
* :class:`CRDEmbed`: penultimate features -> unit-norm embedding (CRD; one
  head on the student, one on the teacher) or, with ``normalize=False``, the
  linear embedding of correlation congruence.

Layouts follow RepDistiller's ``models/util.py`` (``ConvReg``, ``Embed``,
``LinearEmbed``) and ``distiller_zoo/VID.py``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import feature_losses

__all__ = ['CRDEmbed', 'FitNetRegressor', 'VIDRegressor']

# Torch's default conv/linear init, which RepDistiller keeps for connectors:
# uniform with bound 1 / sqrt(fan_in).
_TORCH_DEFAULT_INIT = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in',
                                                       'uniform')


def _check_teacher_shape(teacher_shape: Any) -> tuple[int, int, int]:
  shape = tuple(int(s) for s in teacher_shape)
  if len(shape) != 3 or min(shape) < 1:
    raise ValueError(
        f'teacher_shape={teacher_shape!r} must be the teacher feature\'s '
        f'(height, width, channels), without the batch axis.')
  return shape


def _check_nhwc(x: jax.Array, module: str) -> None:
  if x.ndim != 4:
    raise ValueError(
        f'{module} expects NHWC student features [batch, height, width, '
        f'channels], got shape {tuple(x.shape)}.')


class FitNetRegressor(nn.Module):
  """FitNets' convolutional regressor: student hint -> teacher hint shape.

  A conv to the teacher's channels, BatchNorm and (by default) ReLU, as
  RepDistiller's ``ConvReg``. The conv also maps the spatial size, chosen
  from the student's height ``H`` and the teacher's ``H'``:

  * ``H == 2 H'``: 3x3 conv, stride 2, padding 1;
  * ``2 H == H'``: 4x4 transposed conv, stride 2 (torch padding 1);
  * ``H >= H'``: conv with kernel ``(1 + H - H', 1 + W - W')``, no padding
    (1x1 when the sizes are equal);
  * otherwise no regressor maps the shapes: ``ValueError``.

  Attributes:
    teacher_shape: the teacher hint's ``(height, width, channels)``.
    use_relu: ReLU after BN (RepDistiller's FitNet uses it).
    dtype: computation dtype.
  """
  teacher_shape: tuple[int, int, int]
  use_relu: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student_features: jax.Array, train: bool) -> jax.Array:
    """Maps ``[B, H, W, C]`` to ``[B, H', W', C']``; BN uses batch stats when
    ``train`` (mutable ``batch_stats``)."""
    _check_nhwc(student_features, 'FitNetRegressor')
    t_height, t_width, t_channels = _check_teacher_shape(self.teacher_shape)
    s_height, s_width = student_features.shape[1:3]
    conv = dict(features=t_channels, kernel_init=_TORCH_DEFAULT_INIT,
                dtype=self.dtype)
    if s_height == 2 * t_height:
      y = nn.Conv(kernel_size=(3, 3), strides=(2, 2),
                  padding=((1, 1), (1, 1)), **conv)(student_features)
    elif 2 * s_height == t_height:
      # Torch's ConvTranspose2d(k=4, s=2, p=1) pads the dilated input by k-1-p.
      y = nn.ConvTranspose(kernel_size=(4, 4), strides=(2, 2),
                           padding=((2, 2), (2, 2)), **conv)(student_features)
    elif s_height >= t_height and s_width >= t_width:
      y = nn.Conv(kernel_size=(1 + s_height - t_height, 1 + s_width - t_width),
                  padding='VALID', **conv)(student_features)
    else:
      raise ValueError(
          f'FitNetRegressor cannot map student features of spatial size '
          f'{(s_height, s_width)} to teacher_shape={self.teacher_shape}: it '
          f'needs the student map to be twice, half, or at least the size of '
          f'the teacher\'s; pick hint layers of compatible resolution.')
    if y.shape[1:3] != (t_height, t_width):
      raise ValueError(
          f'FitNetRegressor maps student features of spatial size '
          f'{(s_height, s_width)} to {tuple(y.shape[1:3])}, not to the '
          f'teacher_shape={self.teacher_shape}; pick hint layers whose '
          f'height and width scale alike.')
    y = nn.BatchNorm(use_running_average=not train, momentum=0.9,
                     epsilon=1e-5, dtype=self.dtype)(y)
    return nn.relu(y) if self.use_relu else y


class VIDRegressor(nn.Module):
  """VID's student side: the mean network and the per-channel variances.

  The student map, first average-pooled to the teacher's spatial size if it
  is larger (as RepDistiller's ``VIDLoss``), goes through three bias-free
  1x1 convs with ReLUs between them to the teacher's channels; ``log_scale``
  starts where ``softplus(log_scale) + eps = init_pred_var``. Feed both to
  :func:`kd_jax.feature_losses.vid`.

  Attributes:
    teacher_shape: the teacher feature's ``(height, width, channels)``.
    mid_channels: width of the hidden 1x1 convs; None means the teacher's
      channels (RepDistiller's choice).
    init_pred_var: initial variance of the prediction.
    eps: the variance floor, the same ``eps`` as the loss's.
    dtype: computation dtype.
  """
  teacher_shape: tuple[int, int, int]
  mid_channels: int | None = None
  init_pred_var: float = 5.0
  eps: float = 1e-5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student_features: jax.Array) -> tuple[jax.Array,
                                                           jax.Array]:
    """Returns ``(predicted_mean [B, h, w, C'], log_scale [C'])``."""
    _check_nhwc(student_features, 'VIDRegressor')
    t_height, t_width, t_channels = _check_teacher_shape(self.teacher_shape)
    if self.init_pred_var <= self.eps:
      raise ValueError(
          f'init_pred_var={self.init_pred_var!r} must exceed eps={self.eps!r}'
          f' (the variance is softplus(log_scale) + eps); pass 5.0.')
    x = student_features
    if x.shape[1] > t_height:
      x = feature_losses.adaptive_avg_pool(x, (t_height, t_width))
    mid = self.mid_channels or t_channels
    conv = dict(kernel_size=(1, 1), use_bias=False,
                kernel_init=_TORCH_DEFAULT_INIT, dtype=self.dtype)
    x = nn.relu(nn.Conv(mid, **conv)(x))
    x = nn.relu(nn.Conv(mid, **conv)(x))
    mean = nn.Conv(t_channels, **conv)(x)
    # Inverse softplus of (init_pred_var - eps).
    init = float(np.log(np.expm1(self.init_pred_var - self.eps)))
    log_scale = self.param('log_scale', nn.initializers.constant(init),
                           (t_channels,), jnp.float32)
    return mean, log_scale


class CRDEmbed(nn.Module):
  """Embedding head: flatten, linear, then (by default) L2-normalise.

  CRD puts one on the student's and one on the teacher's penultimate
  features (both trained with the student), to ``features = 128``.
  ``normalize=False`` gives RepDistiller's ``LinearEmbed`` of correlation
  congruence.

  Attributes:
    features: the embedding dimension (RepDistiller's ``feat_dim``).
    normalize: divide by the L2 norm.
    dtype: computation dtype.
  """
  features: int = 128
  normalize: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    """Maps ``[B, ...]`` to ``[B, features]`` (float32)."""
    x = x.reshape(x.shape[0], -1)
    x = nn.Dense(self.features, kernel_init=_TORCH_DEFAULT_INIT,
                 dtype=self.dtype)(x).astype(jnp.float32)
    if not self.normalize:
      return x
    squared = jnp.sum(x * x, axis=-1, keepdims=True)
    # A zero output stays zero with a finite gradient (torch would give NaN).
    return x * jax.lax.rsqrt(jnp.maximum(squared, 1e-24))
