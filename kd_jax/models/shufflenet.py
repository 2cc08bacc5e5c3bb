"""ShuffleNets for 32x32 images: RepDistiller's `ShuffleNetv1.py` / `v2.py`.

* ShuffleNetV1 (Zhang et al. 2018), groups 3, stage widths 240/480/960 with
  4/8/4 units, behind a 1x1 conv + BN stem of 24 channels. A unit is a grouped
  1x1 conv to a quarter of its output width (ungrouped when it reads the 24
  stem channels), a channel shuffle, a 3x3 depthwise conv, a grouped 1x1
  conv; each stage's first unit is strided and concatenates a 3x3/2 average
  pool of its input (zeros padded in the average, as torch counts them).
* ShuffleNetV2 (Ma et al. 2018), net size 1: widths 116/232/464 with a
  down-sampling unit and 3/7/3 basic units per stage, then a 1x1 conv to
  1024 channels. A basic unit splits the channels in half and transforms one
  half (1x1, 3x3 depthwise, 1x1); a down-sampling unit transforms both
  branches at stride 2; both end with a two-group channel shuffle.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap

_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def channel_shuffle(x: jax.Array, groups: int) -> jax.Array:
  """[..., g * c] -> [..., c * g]: channel j of group i moves to j * g + i."""
  *batch, channels = x.shape
  x = x.reshape(*batch, groups, channels // groups)
  return jnp.swapaxes(x, -1, -2).reshape(*batch, channels)


def _conv_and_norm(dtype: Any, train: bool):
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           kernel_init=_CONV_INIT)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


class ShuffleV1Unit(nn.Module):
  """Returns the unit output and its pre-activation."""
  features: int
  strides: int
  groups: int
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv, norm = _conv_and_norm(self.dtype, self.train)
    mid = self.features // 4
    first_groups = 1 if x.shape[-1] == 24 else self.groups
    y = conv(mid, (1, 1), feature_group_count=first_groups)(x)
    y = channel_shuffle(nn.relu(norm()(y)), first_groups)
    y = conv(mid, (3, 3), self.strides, padding=1, feature_group_count=mid)(y)
    y = nn.relu(norm()(y))
    y = norm()(conv(self.features, (1, 1), feature_group_count=self.groups)(y))
    if self.strides == 2:
      shortcut = nn.avg_pool(x, (3, 3), strides=(2, 2),
                             padding=((1, 1), (1, 1)), count_include_pad=True)
      preact = jnp.concatenate([y, shortcut], axis=-1)
    else:
      preact = y + x
    return nn.relu(preact), preact


class ShuffleNetV1(nn.Module):
  """RepDistiller's CIFAR ShuffleNetV1.

  Feature taps at RepDistiller's `is_feat` positions: 'stem' (after the stem's
  ReLU), 'stage1'..'stage3' (each stage's output), 'preact1'..'preact3' (the
  last unit's output before its ReLU) and 'embedding' (the pooled features
  the head reads).

  Attributes:
    num_classes: number of logits.
    stage_widths: output channels of the three stages.
    stage_sizes: units per stage.
    groups: groups of the grouped 1x1 convs.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  stage_widths: Sequence[int] = (240, 480, 960)
  stage_sizes: Sequence[int] = (4, 8, 4)
  groups: int = 3
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'ShuffleNetV1')
    conv, norm = _conv_and_norm(self.dtype, train)
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(norm(name='stem_bn')(conv(24, (1, 1), name='stem_conv')(x)))
    tap(self, 'stem', x)
    for stage, (width, size) in enumerate(zip(self.stage_widths,
                                              self.stage_sizes)):
      for index in range(size):
        # The strided unit's branch adds only what the pooled input lacks.
        features = width - x.shape[-1] if index == 0 else width
        x, preact = ShuffleV1Unit(
            features, 2 if index == 0 else 1, self.groups, self.dtype, train,
            name=f'stage{stage + 1}_unit{index + 1}')(x)
      tap(self, f'stage{stage + 1}', x)
      tap(self, f'preact{stage + 1}', preact)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


class ShuffleV2Unit(nn.Module):
  """Basic unit; returns the output and RepDistiller's pre-activation.

  The pre-activation is the untouched half concatenated with the transformed
  half before its last ReLU, unshuffled, as theirs.
  """
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    conv, norm = _conv_and_norm(self.dtype, self.train)
    half = x.shape[-1] // 2
    kept, y = x[..., :half], x[..., half:]
    y = nn.relu(norm()(conv(half, (1, 1))(y)))
    y = norm()(conv(half, (3, 3), padding=1, feature_group_count=half)(y))
    y = norm()(conv(half, (1, 1))(y))
    preact = jnp.concatenate([kept, y], axis=-1)
    out = jnp.concatenate([kept, nn.relu(y)], axis=-1)
    return channel_shuffle(out, 2), preact


class ShuffleV2DownUnit(nn.Module):
  """Down-sampling unit: both branches at stride 2, concatenated, shuffled."""
  features: int
  dtype: Any
  train: bool

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, self.train)
    channels, mid = x.shape[-1], self.features // 2
    left = conv(channels, (3, 3), 2, padding=1,
                feature_group_count=channels)(x)
    left = nn.relu(norm()(conv(mid, (1, 1))(norm()(left))))
    right = nn.relu(norm()(conv(mid, (1, 1))(x)))
    right = norm()(conv(mid, (3, 3), 2, padding=1,
                        feature_group_count=mid)(right))
    right = nn.relu(norm()(conv(mid, (1, 1))(right)))
    return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


class ShuffleNetV2(nn.Module):
  """RepDistiller's CIFAR ShuffleNetV2.

  Feature taps at RepDistiller's `is_feat` positions: 'stem' (after the stem's
  ReLU), 'stage1'..'stage3' (each stage's output), 'preact1'..'preact3'
  (see `ShuffleV2Unit`) and 'embedding' (the pooled output of the last 1x1
  conv, which the head reads).

  Attributes:
    num_classes: number of logits.
    stage_widths: output channels of the three stages.
    stage_sizes: basic units per stage (after its down-sampling unit).
    last_width: output channels of the 1x1 conv before pooling.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  stage_widths: Sequence[int] = (116, 232, 464)
  stage_sizes: Sequence[int] = (3, 7, 3)
  last_width: int = 1024
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'ShuffleNetV2')
    conv, norm = _conv_and_norm(self.dtype, train)
    x = jnp.asarray(x, self.dtype)
    x = nn.relu(norm(name='stem_bn')(conv(24, (1, 1), name='stem_conv')(x)))
    tap(self, 'stem', x)
    for stage, (width, size) in enumerate(zip(self.stage_widths,
                                              self.stage_sizes)):
      x = ShuffleV2DownUnit(width, self.dtype, train,
                            name=f'stage{stage + 1}_down')(x)
      for index in range(size):
        x, preact = ShuffleV2Unit(self.dtype, train,
                                  name=f'stage{stage + 1}_unit{index + 1}')(x)
      tap(self, f'stage{stage + 1}', x)
      tap(self, f'preact{stage + 1}', preact)
    x = conv(self.last_width, (1, 1), name='last_conv')(x)
    x = nn.relu(norm(name='last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def shufflenetv1(num_classes: int, dtype: Any = jnp.float32,
                 stage_sizes: Sequence[int] = (4, 8, 4)) -> ShuffleNetV1:
  """RepDistiller's `ShuffleV1`: 949,258 params at 100 classes.

  Other `stage_sizes` (e.g. (1, 1, 1) for smoke runs) depart from it.
  """
  return ShuffleNetV1(num_classes=num_classes, stage_sizes=tuple(stage_sizes),
                      dtype=dtype)


def shufflenetv2(num_classes: int, dtype: Any = jnp.float32,
                 stage_sizes: Sequence[int] = (3, 7, 3)) -> ShuffleNetV2:
  """RepDistiller's `ShuffleV2` (net size 1): 1,355,528 params, 100 classes.

  Other `stage_sizes` (e.g. (1, 1, 1) for smoke runs) depart from it.
  """
  return ShuffleNetV2(num_classes=num_classes, stage_sizes=tuple(stage_sizes),
                      dtype=dtype)
