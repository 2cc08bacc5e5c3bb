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
* :class:`ReviewKDFusion` (one :class:`ABF` per level): student features ->
  the teacher's feature shapes, each level fused with the deeper ones
  (ReviewKD).
* :class:`OFDConnector`: student pre-ReLU features -> teacher channels (OFD).

Layouts follow RepDistiller's ``models/util.py`` (``ConvReg``, ``Embed``,
``LinearEmbed``) and ``distiller_zoo/VID.py``.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import feature_losses

__all__ = ['ABF', 'CRDEmbed', 'FitNetRegressor', 'OFDConnector',
           'ReviewKDFusion', 'VIDRegressor', 'nearest_resize']

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


# ----------------------------------------------------------------------------
# ReviewKD's attention-based fusion and OFD's connector.
# ----------------------------------------------------------------------------

# torch's kaiming_uniform_(a=1), which ReviewKD gives its ABF convs:
# uniform with bound sqrt(3 / fan_in).
_KAIMING_UNIFORM_A1 = nn.initializers.variance_scaling(1.0, 'fan_in',
                                                       'uniform')


def _torch_bias_init(fan_in: int):
  """Torch's default conv bias: uniform with bound 1 / sqrt(fan_in)."""
  bound = 1.0 / np.sqrt(fan_in)

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def nearest_resize(x: jax.Array, size: tuple[int, int]) -> jax.Array:
  """Resizes NHWC maps as torch's ``F.interpolate(mode='nearest')``: output
  row ``i`` is input row ``floor(i * H / h)`` (and the same for columns)."""
  height, width = size
  rows = (np.arange(height) * x.shape[1]) // height
  cols = (np.arange(width) * x.shape[2]) // width
  return x[:, rows][:, :, cols]


def _as_map(x: jax.Array, module: str) -> jax.Array:
  """NHWC maps pass; a pooled embedding [B, D] becomes [B, 1, 1, D]."""
  x = jnp.asarray(x)
  if x.ndim == 2:
    return x[:, None, None, :]
  _check_nhwc(x, module)
  return x


class ABF(nn.Module):
  """ReviewKD's attention-based fusion of one level with the deeper ones.

  The student's map goes through a 1x1 conv (to ``mid_features``) and BN.
  With ``fuse``, the fused map of the deeper level (``residual``) is resized
  (nearest) to this level's size, and a 1x1 conv with a sigmoid computes two
  attention maps from both: ``x * a_0 + residual * a_1``. The result is
  resized (nearest) to ``out_size`` if needed and a 3x3 conv (to
  ``out_features``) with BN gives the output that the teacher's feature is
  compared with. Returns ``(output, fused)``; ``fused`` is the next
  (shallower) level's ``residual``. Layout and init follow the authors'
  ``ABF``: convs without bias, kaiming-uniform (``a=1``); the attention conv
  with torch's default init and a bias.

  Attributes:
    mid_features: channels of the fused maps (the authors: ``min(512,
      channels of the student's deepest feature)``, shared by all levels).
    out_features: the teacher feature's channels.
    fuse: whether this level takes a deeper level's residual (every level
      but the deepest).
    dtype: computation dtype.
  """
  mid_features: int
  out_features: int
  fuse: bool
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, residual: jax.Array | None = None, *,
               out_size: tuple[int, int] | None = None,
               train: bool) -> tuple[jax.Array, jax.Array]:
    """Maps ``[B, H, W, C]`` (and ``residual [B, h, w, mid]``) to
    ``([B, H', W', out_features], [B, H', W', mid_features])``."""
    x = _as_map(x, 'ABF')
    if self.fuse != (residual is not None):
      given = 'no residual' if residual is None else 'a residual'
      raise ValueError(
          f'ABF(fuse={self.fuse}) got {given}; every level but the deepest '
          f'takes the deeper level\'s fused map, the deepest takes none.')
    bn = dict(momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    x = nn.Conv(self.mid_features, (1, 1), use_bias=False,
                kernel_init=_KAIMING_UNIFORM_A1, dtype=self.dtype)(x)
    x = nn.BatchNorm(use_running_average=not train, **bn)(x)
    if self.fuse:
      residual = nearest_resize(residual, x.shape[1:3])
      attention = nn.sigmoid(nn.Conv(
          2, (1, 1), kernel_init=_TORCH_DEFAULT_INIT,
          bias_init=_torch_bias_init(2 * self.mid_features),
          dtype=self.dtype, name='attention')(
              jnp.concatenate([x, residual], axis=-1)))
      x = x * attention[..., :1] + residual * attention[..., 1:]
    if out_size is not None and tuple(x.shape[1:3]) != tuple(out_size):
      x = nearest_resize(x, tuple(out_size))
    y = nn.Conv(self.out_features, (3, 3), padding=((1, 1), (1, 1)),
                use_bias=False, kernel_init=_KAIMING_UNIFORM_A1,
                dtype=self.dtype)(x)
    return nn.BatchNorm(use_running_average=not train, **bn)(y), x


class ReviewKDFusion(nn.Module):
  """ReviewKD's student side: one :class:`ABF` per level, run deep to shallow.

  Takes the student's features shallow to deep (stage outputs, then the
  pooled embedding, ``[B, D]`` or ``[B, 1, 1, D]``) and returns one map per
  level with the shape of the teacher's feature at that level, to compare
  with :func:`kd_jax.feature_losses.hcl_loss`. Each level's output sees its
  own and every deeper student feature (the "review"): the deepest ABF maps
  the embedding alone; each shallower one fuses its feature with the deeper
  fused map.

  Attributes:
    teacher_shapes: the teacher's ``(height, width, channels)`` per level,
      shallow to deep, as many as student features.
    mid_features: the fused maps' channels; None means the authors'
      ``min(512, channels of the deepest student feature)``.
    dtype: computation dtype.
  """
  teacher_shapes: tuple[tuple[int, int, int], ...]
  mid_features: int | None = None
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student_features, train: bool) -> list[jax.Array]:
    """Returns ``[B, h_i, w_i, c_i]`` per level, shallow to deep."""
    shapes = [_check_teacher_shape(s) for s in self.teacher_shapes]
    features = [_as_map(f, 'ReviewKDFusion') for f in student_features]
    if len(features) != len(shapes) or not shapes:
      raise ValueError(
          f'ReviewKDFusion got {len(features)} student feature(s) for '
          f'{len(shapes)} teacher_shapes; pass one student feature per '
          f'teacher level, shallow to deep.')
    mid = self.mid_features or min(512, features[-1].shape[-1])
    last = len(shapes) - 1
    outputs = [None] * len(shapes)
    residual = None
    for level in range(last, -1, -1):
      height, width, channels = shapes[level]
      outputs[level], residual = ABF(
          mid, channels, fuse=level < last, dtype=self.dtype,
          name=f'abf{level}')(features[level], residual,
                              out_size=(height, width), train=train)
    return outputs


class OFDConnector(nn.Module):
  """OFD's connector: student pre-ReLU features -> teacher channels.

  A bias-free conv (``kernel_size``, same padding) and BN, as the authors'
  ``build_feature_connector``: the conv drawn from a normal with std
  ``sqrt(2 / (k * k * features))``, BN scale 1 and bias 0. Its output is
  compared with the teacher's pre-ReLU features by
  :func:`kd_jax.feature_losses.ofd_loss`.

  Attributes:
    features: the teacher feature's channels.
    kernel_size: the conv's size (1 on CIFAR-100 and ImageNet).
    dtype: computation dtype.
  """
  features: int
  kernel_size: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, student_features: jax.Array, train: bool) -> jax.Array:
    """Maps ``[B, H, W, C]`` to ``[B, H, W, features]``."""
    _check_nhwc(student_features, 'OFDConnector')
    pad = (self.kernel_size - 1) // 2
    y = nn.Conv(self.features, (self.kernel_size, self.kernel_size),
                padding=((pad, pad), (pad, pad)), use_bias=False,
                kernel_init=nn.initializers.variance_scaling(
                    2.0, 'fan_out', 'normal'),
                dtype=self.dtype)(student_features)
    return nn.BatchNorm(use_running_average=not train, momentum=0.9,
                        epsilon=1e-5, dtype=self.dtype)(y)
