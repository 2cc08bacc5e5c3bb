"""ResNets with GroupNorm and weight-standardised convolutions (BiT's).

The layout of big_vision's `models/bit.py`, whose checkpoints
`kd_jax.import_teacher` reads: BiT's normalisation (Kolesnikov et al. 2020:
GroupNorm with 32 groups and weight standardisation, so that nothing
depends on the batch) in a post-activation bottleneck ResNet with the
stride in the 3x3 conv (v1.5). Convs and max-pool pad 'SAME' (on even
sides a strided window pads one pixel after, none before, unlike torch's
symmetric padding in `kd_jax.models.resnet`); no batch statistics.
"""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap

_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def standardize(kernel: jax.Array, eps: float = 1e-5) -> jax.Array:
  """(kernel - mean) / (std + eps) per output channel [kh, kw, cin, cout].

  Weight standardisation (Qiao et al. 2019) as BiT / big_vision apply it: eps
  is added to the standard deviation, not the variance.
  """
  kernel = kernel - jnp.mean(kernel, axis=(0, 1, 2))
  return kernel / (jnp.std(kernel, axis=(0, 1, 2)) + eps)


class StdConv(nn.Module):
  """A bias-free 'SAME' conv whose kernel is standardised on every call."""
  features: int
  kernel_size: tuple[int, int]
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', _CONV_INIT,
                        (*self.kernel_size, x.shape[-1], self.features))
    kernel = standardize(kernel).astype(self.dtype)
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel, (self.strides, self.strides), 'SAME',
        dimension_numbers=('NHWC', 'HWIO', 'NHWC'))


class Bottleneck(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, each with GroupNorm; ReLU
  after the residual sum. Returns the output and that sum."""
  width: int
  strides: int
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    norm = lambda name, **kw: nn.GroupNorm(  # Flax's defaults, as BiT.
        num_groups=32, epsilon=1e-6, dtype=self.dtype, name=name, **kw)
    residual = x
    if x.shape[-1] != 4 * self.width or self.strides != 1:
      residual = StdConv(4 * self.width, (1, 1), self.strides, self.dtype,
                         name='conv_proj')(x)
      residual = norm('gn_proj')(residual)
    y = StdConv(self.width, (1, 1), dtype=self.dtype, name='conv1')(x)
    y = nn.relu(norm('gn1')(y))
    y = StdConv(self.width, (3, 3), self.strides, self.dtype,
                name='conv2')(y)
    y = nn.relu(norm('gn2')(y))
    y = StdConv(4 * self.width, (1, 1), dtype=self.dtype, name='conv3')(y)
    # Zero scale: each block starts as the identity (Goyal et al. 2017).
    y = norm('gn3', scale_init=nn.initializers.zeros)(y)
    preact = residual + y
    return nn.relu(preact), preact


class BiT(nn.Module):
  """big_vision's BiT ResNet: 7x7/2 root conv and 3x3/2 max-pool, then
  bottleneck stages of widths 64w, 128w, ... (outputs 4x), mean pool, head.

  Feature taps as `kd_jax.models.resnet.ResNet`'s: 'stem' (after the root's
  ReLU, before the max-pool), 'stage1'... (stage outputs), 'preact1'... (the
  residual sum of each stage's last block) and 'embedding' (the pooled
  features the head reads).

  Attributes:
    num_classes: number of logits.
    stage_sizes: blocks per stage ((3, 4, 6, 3) for ResNet-50).
    width: the width multiplier w (BiT's R50x1, x2, ...).
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  stage_sizes: Sequence[int] = (3, 4, 6, 3)
  width: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    del train  # Nothing depends on the mode: no batch statistics, no dropout.
    check_image_batch(x, 'BiT')
    if self.width < 1 or not self.stage_sizes or min(self.stage_sizes) < 1:
      raise ValueError(f'BiT width={self.width} and stage_sizes='
                       f'{tuple(self.stage_sizes)} must be positive.')
    root = 64 * self.width
    x = StdConv(root, (7, 7), 2, self.dtype, name='conv_root')(x)
    x = nn.GroupNorm(num_groups=32, epsilon=1e-6, dtype=self.dtype,
                     name='gn_root')(x)
    x = nn.relu(x)
    tap(self, 'stem', x)
    x = nn.max_pool(x, (3, 3), strides=(2, 2), padding='SAME')
    for stage, size in enumerate(self.stage_sizes):
      for index in range(size):
        strides = 2 if stage > 0 and index == 0 else 1
        x, preact = Bottleneck(root * 2 ** stage, strides, self.dtype,
                               name=f'stage{stage + 1}_block{index + 1}')(x)
      tap(self, f'stage{stage + 1}', x)
      tap(self, f'preact{stage + 1}', preact)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def bit_r50x1(num_classes: int, dtype: Any = jnp.float32) -> BiT:
  """BiT ResNet-50x1 (big_vision `bit`, depth 50, width 1).

  25,557,032 params at 1000 classes: torchvision's ResNet-50 count, with
  GroupNorm's scale and bias where BatchNorm's are.
  """
  return BiT(num_classes=num_classes, stage_sizes=(3, 4, 6, 3), width=1,
             dtype=dtype)
