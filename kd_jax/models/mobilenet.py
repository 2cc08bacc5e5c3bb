"""MobileNets: RepDistiller's CIFAR MobileNetV2 and the ImageNet MobileNetV1.

* MobileNetV2 (Sandler et al. 2018) as RepDistiller's `mobilenetv2.py` builds
  it for CIFAR (the network of Route Constrained Optimization): every
  inverted residual block has its 1x1 expansion conv, even at expansion 1;
  widths scale by `width_mult`, the last 1x1 conv keeps 1280 channels for
  width_mult <= 1, and there is no dropout before the head. The CRD
  benchmark's `MobileNetV2` is `mobile_half`: expansion 6, width 0.5.
  `layout='torchvision'` builds torchvision's `mobilenet_v2` instead (the
  ImageNet network: stride 2 in the 24-wide group, no expansion conv at
  expansion 1, ReLU6, width 1.0, dropout 0.2 before the head), whose
  pretrained weights `kd_jax.import_teacher` reads.
* MobileNetV1 (Howard et al. 2017) as the ImageNet ResNet-50 -> MobileNetV1
  row of the CRD / mdistiller tables uses it: a 3x3/2 conv and 13 depthwise
  separable blocks (3x3 depthwise + BN + ReLU, 1x1 pointwise + BN + ReLU),
  global average pooling and one dense layer.
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

# (expansion, width, stride) of each group, as RepDistiller's
# `interverted_residual_setting` with expansion T in place of 't'.
_V2_GROUPS = ((1, 16, 1), ('T', 24, 1), ('T', 32, 2), ('T', 64, 2),
              ('T', 96, 1), ('T', 160, 2), ('T', 320, 1))
_V2_GROUP_SIZES = (1, 2, 3, 4, 3, 3, 1)
# The groups' strides in torchvision's ImageNet MobileNetV2 (RepDistiller's
# CIFAR one keeps the 24-wide group at stride 1).
_V2_IMAGENET_STRIDES = (1, 2, 2, 2, 1, 2, 1)
_V2_LAYOUTS = ('repdistiller', 'torchvision')
# Groups after which RepDistiller's MobileNetV2 returns a feature.
_V2_STAGE_ENDS = {1: 'stage1', 2: 'stage2', 4: 'stage3', 6: 'stage4'}

# (output width, stride) of MobileNetV1's depthwise separable blocks.
_V1_BLOCKS = ((64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2),
              (512, 1), (512, 1), (512, 1), (512, 1), (512, 1), (1024, 2),
              (1024, 1))
# Blocks (0-based) after which mdistiller's MobileNetV1 returns a feature.
_V1_STAGE_ENDS = {2: 1, 4: 2, 10: 3, 12: 4}


def _conv_and_norm(dtype: Any, train: bool):
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           kernel_init=_CONV_INIT)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


class InvertedResidual(nn.Module):
  """1x1 expand + BN + ReLU, 3x3 depthwise + BN + ReLU, 1x1 project + BN.

  Without `expand_at_one`, a block of expansion 1 has no expansion conv
  (torchvision); `relu6` clips the activations at 6 (torchvision).
  """
  features: int
  strides: int
  expansion: int
  dtype: Any
  train: bool
  expand_at_one: bool = True
  relu6: bool = False

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv, norm = _conv_and_norm(self.dtype, self.train)
    act = nn.relu6 if self.relu6 else nn.relu
    hidden = x.shape[-1] * self.expansion
    y = x
    if self.expansion != 1 or self.expand_at_one:
      y = act(norm()(conv(hidden, (1, 1))(x)))
    y = conv(hidden, (3, 3), self.strides, padding=1,
             feature_group_count=hidden)(y)
    y = act(norm()(y))
    y = norm()(conv(self.features, (1, 1))(y))
    if self.strides == 1 and x.shape[-1] == self.features:
      return x + y
    return y


class MobileNetV2(nn.Module):
  """RepDistiller's CIFAR MobileNetV2.

  Feature taps at RepDistiller's `is_feat` positions (its `preact` flag
  changes nothing here: block outputs are linear): 'stem' (the 3x3/2 conv
  after its ReLU), 'stage1'..'stage4' (after the 24-, 32-, 96- and
  320-wide groups, scaled by width_mult) and 'embedding' (the pooled 1280
  features the head reads).

  Attributes:
    num_classes: number of logits.
    expansion: expansion ratio T of the inverted residual blocks.
    width_mult: width multiplier of the stem and the blocks.
    group_sizes: blocks in each of the seven groups.
    group_strides: stride of each group's first block; None: RepDistiller's
      CIFAR strides (1, 1, 2, 2, 1, 2, 1).
    expand_at_one: give blocks of expansion 1 their 1x1 expansion conv too
      (RepDistiller); torchvision has none.
    relu6: ReLU6 activations (torchvision) instead of ReLU.
    dropout: dropout rate before the head (torchvision: 0.2).
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  expansion: int = 6
  width_mult: float = 0.5
  group_sizes: Sequence[int] = _V2_GROUP_SIZES
  group_strides: Sequence[int] | None = None
  expand_at_one: bool = True
  relu6: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'MobileNetV2')
    conv, norm = _conv_and_norm(self.dtype, train)
    act = nn.relu6 if self.relu6 else nn.relu
    x = jnp.asarray(x, self.dtype)
    x = conv(int(32 * self.width_mult), (3, 3), 2, padding=1,
             name='stem_conv')(x)
    x = act(norm(name='stem_bn')(x))
    tap(self, 'stem', x)
    if len(self.group_sizes) != len(_V2_GROUPS) or min(self.group_sizes) < 1:
      raise ValueError('MobileNetV2 group_sizes must be 7 positive block '
                       f'counts; got {tuple(self.group_sizes)}.')
    group_strides = self.group_strides or [s for _, _, s in _V2_GROUPS]
    if len(group_strides) != len(_V2_GROUPS):
      raise ValueError('MobileNetV2 group_strides must be 7 strides; got '
                       f'{tuple(group_strides)}.')
    for group, ((expansion, width, _), blocks, strides) in enumerate(
        zip(_V2_GROUPS, self.group_sizes, group_strides)):
      expansion = self.expansion if expansion == 'T' else expansion
      for index in range(blocks):
        x = InvertedResidual(
            int(width * self.width_mult), strides if index == 0 else 1,
            expansion, self.dtype, train, expand_at_one=self.expand_at_one,
            relu6=self.relu6, name=f'group{group + 1}_block{index + 1}')(x)
      if group in _V2_STAGE_ENDS:
        tap(self, _V2_STAGE_ENDS[group], x)
    last_width = int(1280 * self.width_mult) if self.width_mult > 1 else 1280
    x = conv(last_width, (1, 1), name='last_conv')(x)
    x = act(norm(name='last_bn')(x))
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=nn.initializers.normal(0.01), name='head')(x)
    return x.astype(jnp.float32)


class MobileNetV1(nn.Module):
  """ImageNet MobileNetV1 (width 1.0) of the ResNet-50 -> MobileNetV1 row.

  Feature taps at mdistiller's positions, plus the stem: 'stem' (the 3x3/2
  conv after its ReLU), 'stage1'..'stage4' (after blocks 3, 5, 11 and 13:
  128, 256, 512 and 1024 channels at strides 4, 8, 16 and 32),
  'preact1'..'preact4' (the same before their last ReLU) and 'embedding'
  (the pooled 1024 features the head reads).

  Attributes:
    num_classes: number of logits.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'MobileNetV1')
    conv, norm = _conv_and_norm(self.dtype, train)
    x = jnp.asarray(x, self.dtype)
    x = conv(32, (3, 3), 2, padding=1, name='stem_conv')(x)
    x = nn.relu(norm(name='stem_bn')(x))
    tap(self, 'stem', x)
    for index, (width, strides) in enumerate(_V1_BLOCKS):
      name = f'block{index + 1}'
      x = conv(x.shape[-1], (3, 3), strides, padding=1,
               feature_group_count=x.shape[-1], name=f'{name}_dw_conv')(x)
      x = nn.relu(norm(name=f'{name}_dw_bn')(x))
      x = norm(name=f'{name}_pw_bn')(conv(width, (1, 1),
                                          name=f'{name}_pw_conv')(x))
      if index in _V1_STAGE_ENDS:
        tap(self, f'preact{_V1_STAGE_ENDS[index]}', x)
      x = nn.relu(x)
      if index in _V1_STAGE_ENDS:
        tap(self, f'stage{_V1_STAGE_ENDS[index]}', x)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def mobilenetv2(num_classes: int, dtype: Any = jnp.float32,
                group_sizes: Sequence[int] = _V2_GROUP_SIZES,
                layout: str = 'repdistiller') -> MobileNetV2:
  """RepDistiller's `mobile_half` (T=6, width 0.5): 812,836 params.

  At 100 classes; the CRD benchmark's MobileNetV2 student. Fewer blocks per
  group (`group_sizes`, e.g. all 1 for smoke runs) depart from the reference.
  `layout='torchvision'`: torchvision's `mobilenet_v2` (width 1.0, ImageNet
  strides, ReLU6, dropout 0.2): 3,504,872 params at 1000 classes.
  """
  if layout not in _V2_LAYOUTS:
    raise ValueError(f'mobilenetv2 layout={layout!r}; choose one of '
                     f'{_V2_LAYOUTS}.')
  if layout == 'torchvision':
    return MobileNetV2(num_classes=num_classes, expansion=6, width_mult=1.0,
                       group_sizes=tuple(group_sizes),
                       group_strides=_V2_IMAGENET_STRIDES,
                       expand_at_one=False, relu6=True, dropout=0.2,
                       dtype=dtype)
  return MobileNetV2(num_classes=num_classes, expansion=6, width_mult=0.5,
                     group_sizes=tuple(group_sizes), dtype=dtype)


def mobilenetv1(num_classes: int, dtype: Any = jnp.float32) -> MobileNetV1:
  """ImageNet MobileNetV1: 4,231,976 params at 1000 classes."""
  return MobileNetV1(num_classes=num_classes, dtype=dtype)
