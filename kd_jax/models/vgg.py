"""VGG with BatchNorm for 32x32 images: RepDistiller's `vgg.py` (CRD benchmark).

Five conv blocks without the ImageNet fully connected layers: each block is
3x3 convs (with bias) + BN, ReLU between them and after the block; 2x2
max-pools after blocks 1-3 (and after block 4 for 64x64 inputs, as theirs);
global average pooling and one dense layer from 512 features.
"""

from collections.abc import Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap

# RepDistiller's `cfg`: output widths of the convs of each of the five blocks.
VGG_BLOCKS = {
    8: ((64,), (128,), (256,), (512,), (512,)),
    11: ((64,), (128,), (256, 256), (512, 512), (512, 512)),
    13: ((64, 64), (128, 128), (256, 256), (512, 512), (512, 512)),
    16: ((64, 64), (128, 128), (256, 256, 256), (512, 512, 512),
         (512, 512, 512)),
    19: ((64, 64), (128, 128), (256, 256, 256, 256), (512, 512, 512, 512),
         (512, 512, 512, 512)),
}

_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


class VGG(nn.Module):
  """VGG-BN for CIFAR; `blocks` gives the conv widths of each block.

  Feature taps at RepDistiller's `is_feat` positions: 'stem' (block 1 after
  its ReLU), 'stage1'..'stage4' (blocks 2-5 after their ReLU, before any
  pool), 'preact1'..'preact4' (the same before the ReLU, i.e. after the last
  BN) and 'embedding' (the pooled 512 features the head reads).

  Attributes:
    num_classes: number of logits.
    blocks: conv widths per block, five blocks.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  blocks: Sequence[Sequence[int]] = VGG_BLOCKS[13]
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'VGG')
    if len(self.blocks) != 5:
      raise ValueError(f'VGG needs five blocks of conv widths; got '
                       f'{len(self.blocks)}: {self.blocks}.')
    conv = functools.partial(nn.Conv, kernel_size=(3, 3), padding=1,
                             dtype=self.dtype, kernel_init=_CONV_INIT)
    norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                             momentum=0.9, epsilon=1e-5, dtype=self.dtype)
    pool_after_block4 = x.shape[1] == 64
    x = jnp.asarray(x, self.dtype)
    for block, widths in enumerate(self.blocks):
      for index, width in enumerate(widths):
        if index:
          x = nn.relu(x)
        x = conv(width, name=f'block{block + 1}_conv{index + 1}')(x)
        x = norm(name=f'block{block + 1}_bn{index + 1}')(x)
      if block:
        tap(self, f'preact{block}', x)
      x = nn.relu(x)
      tap(self, f'stage{block}' if block else 'stem', x)
      if block < 3 or (block == 3 and pool_after_block4):
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype,
                 kernel_init=nn.initializers.normal(0.01), name='head')(x)
    return x.astype(jnp.float32)


def vgg8(num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """VGG-8-BN (RepDistiller `vgg8_bn`): 3,965,028 params at 100 classes."""
  return VGG(num_classes=num_classes, blocks=VGG_BLOCKS[8], dtype=dtype)


def vgg11(num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """VGG-11-BN (RepDistiller `vgg11_bn`): 9,277,284 params at 100 classes."""
  return VGG(num_classes=num_classes, blocks=VGG_BLOCKS[11], dtype=dtype)


def vgg13(num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """VGG-13-BN (RepDistiller `vgg13_bn`): 9,462,180 params at 100 classes."""
  return VGG(num_classes=num_classes, blocks=VGG_BLOCKS[13], dtype=dtype)


def vgg16(num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """VGG-16-BN (RepDistiller `vgg16_bn`): 14,774,436 params at 100 classes."""
  return VGG(num_classes=num_classes, blocks=VGG_BLOCKS[16], dtype=dtype)


def vgg19(num_classes: int, dtype: Any = jnp.float32) -> VGG:
  """VGG-19-BN (RepDistiller `vgg19_bn`): 20,086,692 params at 100 classes."""
  return VGG(num_classes=num_classes, blocks=VGG_BLOCKS[19], dtype=dtype)
