"""Residual networks: ImageNet ResNets, CIFAR ResNets and Wide ResNets.

Layouts follow the reference PyTorch code so that parameter counts match it
exactly: convs without bias, BatchNorm with scale and bias, a biased final
dense layer, and torch's symmetric padding (3 for 7x7, 1 for 3x3 convs).

* ImageNet ResNets (He et al. 2016; torchvision, stride in the 3x3 conv of
  the bottleneck): 7x7/2 stem and 3x3/2 max-pool, four stages.
* CIFAR ResNets of the CRD distillation benchmark (Tian et al. 2020,
  RepDistiller `resnet.py`): 3x3 stem, three stages of basic blocks,
  n = (depth - 2) / 6 blocks per stage, 1x1-conv + BN projection shortcuts;
  and RepDistiller's CIFAR ResNet-50 (`resnetv2.py`): ImageNet bottleneck
  stages behind the 3x3 stem.
* Wide ResNets (Zagoruyko & Komodakis 2016; RepDistiller `wrn.py`):
  pre-activation basic blocks, widths 16k/32k/64k, n = (depth - 4) / 6 blocks
  per stage, optional dropout between the two convs of a block.
"""

from collections.abc import Callable, Sequence
import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.taps import tap

ModuleDef = Callable[..., nn.Module]

# He normal init over fan-out, as torchvision and RepDistiller use for convs.
_CONV_INIT = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def check_image_batch(x: jax.Array, model_name: str) -> None:
  """Raises ValueError unless `x` is a batch of images [B, H, W, C]."""
  if x.ndim != 4:
    raise ValueError(f'{model_name} expects images of shape [batch, height, '
                     f'width, channels]; got shape {tuple(x.shape)}.')


def _conv_and_norm(dtype: Any, train: bool) -> tuple[ModuleDef, ModuleDef]:
  conv = functools.partial(nn.Conv, use_bias=False, dtype=dtype,
                           kernel_init=_CONV_INIT)
  norm = functools.partial(nn.BatchNorm, use_running_average=not train,
                           momentum=0.9, epsilon=1e-5, dtype=dtype)
  return conv, norm


class BasicBlock(nn.Module):
  """Two 3x3 convs with BN; ReLU after the residual sum (post-activation).

  Returns the block output and its pre-activation (the residual sum).
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), padding=1)(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      x = self.conv(self.features, (1, 1), self.strides, name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    preact = x + y
    return nn.relu(preact), preact


class BottleneckBlock(nn.Module):
  """1x1 reduce, 3x3 (strided), 1x1 expand by 4, with BN; ReLU after the sum.

  Returns the block output and its pre-activation (the residual sum).
  """
  features: int
  strides: int
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y = self.conv(self.features, (1, 1))(x)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(y)
    y = nn.relu(self.norm()(y))
    y = self.conv(self.features * 4, (1, 1))(y)
    y = self.norm()(y)
    if x.shape != y.shape:
      x = self.conv(self.features * 4, (1, 1), self.strides,
                    name='proj_conv')(x)
      x = self.norm(name='proj_bn')(x)
    preact = x + y
    return nn.relu(preact), preact


_BLOCKS = {'basic': BasicBlock, 'bottleneck': BottleneckBlock}


class ResNet(nn.Module):
  """Post-activation ResNet; stages after the first open with a stride-2 block.

  Feature taps (`kd_jax.models.features`), at RepDistiller's / mdistiller's
  `is_feat` positions: 'stem' (after the stem's ReLU, before any max-pool),
  'stage1'... (each stage's output), 'preact1'... (the residual sum of each
  stage's last block, before its ReLU) and 'embedding' (the pooled features
  the head reads).

  Attributes:
    num_classes: number of logits.
    stage_sizes: number of blocks per stage.
    stage_widths: block width per stage (bottleneck outputs are 4x wider).
    stem_width: output channels of the stem conv.
    block: 'basic' or 'bottleneck'.
    stem: 'imagenet' (7x7/2 conv and 3x3/2 max-pool) or 'cifar' (3x3/1 conv).
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  stage_sizes: Sequence[int]
  stage_widths: Sequence[int] = (64, 128, 256, 512)
  stem_width: int = 64
  block: str = 'basic'
  stem: str = 'imagenet'
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'ResNet')
    if self.block not in _BLOCKS:
      raise ValueError(f'ResNet block must be one of {sorted(_BLOCKS)}; '
                       f'got {self.block!r}.')
    if len(self.stage_sizes) != len(self.stage_widths):
      raise ValueError(f'ResNet stage_sizes {tuple(self.stage_sizes)} and '
                       f'stage_widths {tuple(self.stage_widths)} must have the '
                       'same length.')
    conv, norm = _conv_and_norm(self.dtype, train)
    x = jnp.asarray(x, self.dtype)
    if self.stem == 'imagenet':
      x = conv(self.stem_width, (7, 7), 2, padding=3, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      tap(self, 'stem', x)
      x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    elif self.stem == 'cifar':
      x = conv(self.stem_width, (3, 3), padding=1, name='stem_conv')(x)
      x = nn.relu(norm(name='stem_bn')(x))
      tap(self, 'stem', x)
    else:
      raise ValueError("ResNet stem must be 'imagenet' or 'cifar'; "
                       f'got {self.stem!r}.')
    block_cls = _BLOCKS[self.block]
    for stage, (size, width) in enumerate(
        zip(self.stage_sizes, self.stage_widths)):
      for index in range(size):
        strides = 2 if stage > 0 and index == 0 else 1
        x, preact = block_cls(width, strides, conv, norm,
                              name=f'stage{stage + 1}_block{index + 1}')(x)
      tap(self, f'stage{stage + 1}', x)
      tap(self, f'preact{stage + 1}', preact)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


class WideBasicBlock(nn.Module):
  """Pre-activation block: BN-ReLU-conv, BN-ReLU-dropout-conv, plus shortcut.

  As in RepDistiller `wrn.py`, a projection shortcut (1x1 conv) reads the
  pre-activated input, an identity shortcut the raw input. Returns the block
  output and its normalized input before the ReLU (RepDistiller's WRN
  pre-activation feature of the previous stage).
  """
  features: int
  strides: int
  dropout: float
  conv: ModuleDef
  norm: ModuleDef

  @nn.compact
  def __call__(self, x: jax.Array,
               train: bool) -> tuple[jax.Array, jax.Array]:
    normed = self.norm()(x)
    preact = nn.relu(normed)
    y = self.conv(self.features, (3, 3), self.strides, padding=1)(preact)
    y = nn.relu(self.norm()(y))
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = self.conv(self.features, (3, 3), padding=1)(y)
    if x.shape[-1] != self.features or self.strides != 1:
      x = self.conv(self.features, (1, 1), self.strides,
                    name='proj_conv')(preact)
    return x + y, normed


class WideResNet(nn.Module):
  """Wide ResNet WRN-depth-k (Zagoruyko & Komodakis 2016) for 32x32 images.

  Feature taps at RepDistiller's `is_feat` positions: 'stem' (the first
  conv's output), 'stage1'..'stage3' (each stage's output, before any BN),
  'preact1'..'preact3' (that output batch-normalized by the BN that reads it
  next, before the ReLU: the first BN of the next stage's first block, or
  the final BN) and 'embedding' (the pooled features the head reads).

  Attributes:
    num_classes: number of logits.
    depth: total depth, 6n + 4 (16, 22, 28, 40, ...).
    widen_factor: k; stage widths are 16k, 32k, 64k.
    dropout: dropout rate between the two convs of each block.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  depth: int = 16
  widen_factor: int = 2
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'WideResNet')
    if self.depth < 10 or (self.depth - 4) % 6:
      raise ValueError('WideResNet depth must be 6n + 4 with n >= 1 (10, 16, '
                       f'22, 28, 40, ...); got depth={self.depth}.')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(
          f'WideResNet dropout must be in [0, 1); got {self.dropout}.')
    conv, norm = _conv_and_norm(self.dtype, train)
    blocks_per_stage = (self.depth - 4) // 6
    x = jnp.asarray(x, self.dtype)
    x = conv(16, (3, 3), padding=1, name='stem_conv')(x)
    tap(self, 'stem', x)
    for stage, width in enumerate((16, 32, 64)):
      for index in range(blocks_per_stage):
        strides = 2 if stage > 0 and index == 0 else 1
        x, normed = WideBasicBlock(
            width * self.widen_factor, strides, self.dropout, conv, norm,
            name=f'stage{stage + 1}_block{index + 1}')(x, train)
        if stage > 0 and index == 0:
          tap(self, f'preact{stage}', normed)
      tap(self, f'stage{stage + 1}', x)
    normed = norm(name='final_bn')(x)
    tap(self, 'preact3', normed)
    x = jnp.mean(nn.relu(normed), axis=(1, 2))
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype, name='head')(x)
    return x.astype(jnp.float32)


def _imagenet_resnet(stage_sizes: Sequence[int], block: str, num_classes: int,
                     dtype: Any) -> ResNet:
  return ResNet(num_classes=num_classes, stage_sizes=tuple(stage_sizes),
                block=block, stem='imagenet', dtype=dtype)


def _cifar_resnet(depth: int, widths: Sequence[int], num_classes: int,
                  dtype: Any) -> ResNet:
  """RepDistiller `resnet(depth, widths)`: stem widths[0], stages widths[1:]."""
  blocks_per_stage = (depth - 2) // 6
  return ResNet(num_classes=num_classes, stage_sizes=(blocks_per_stage,) * 3,
                stage_widths=tuple(widths[1:]), stem_width=widths[0],
                block='basic', stem='cifar', dtype=dtype)


def resnet18(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """ImageNet ResNet-18: 11,689,512 params at 1000 classes (as torchvision)."""
  return _imagenet_resnet((2, 2, 2, 2), 'basic', num_classes, dtype)


def resnet34(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """ImageNet ResNet-34: 21,797,672 params at 1000 classes (as torchvision)."""
  return _imagenet_resnet((3, 4, 6, 3), 'basic', num_classes, dtype)


def resnet50(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """ImageNet ResNet-50 (v1.5): 25,557,032 params at 1000 classes."""
  return _imagenet_resnet((3, 4, 6, 3), 'bottleneck', num_classes, dtype)


def resnet8(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-8, widths 16/16/32/64: 83,892 params at 100 classes."""
  return _cifar_resnet(8, (16, 16, 32, 64), num_classes, dtype)


def resnet14(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-14, widths 16/16/32/64: 181,108 params at 100 classes."""
  return _cifar_resnet(14, (16, 16, 32, 64), num_classes, dtype)


def resnet20(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-20, widths 16/16/32/64: 278,324 params at 100 classes."""
  return _cifar_resnet(20, (16, 16, 32, 64), num_classes, dtype)


def resnet32(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-32, widths 16/16/32/64: 472,756 params at 100 classes."""
  return _cifar_resnet(32, (16, 16, 32, 64), num_classes, dtype)


def resnet44(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-44, widths 16/16/32/64: 667,188 params at 100 classes."""
  return _cifar_resnet(44, (16, 16, 32, 64), num_classes, dtype)


def resnet56(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-56, widths 16/16/32/64: 861,620 params at 100 classes."""
  return _cifar_resnet(56, (16, 16, 32, 64), num_classes, dtype)


def resnet110(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-110, widths 16/16/32/64: 1,736,564 params, 100 classes."""
  return _cifar_resnet(110, (16, 16, 32, 64), num_classes, dtype)


def resnet8x4(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-8x4, widths 32/64/128/256: 1,233,540 params at 100 classes."""
  return _cifar_resnet(8, (32, 64, 128, 256), num_classes, dtype)


def resnet32x4(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """CIFAR ResNet-32x4, widths 32/64/128/256: 7,433,860 params, 100 classes."""
  return _cifar_resnet(32, (32, 64, 128, 256), num_classes, dtype)


def resnet50_cifar(num_classes: int, dtype: Any = jnp.float32) -> ResNet:
  """RepDistiller's CIFAR ResNet-50 (`resnetv2.ResNet50`): 23,705,252 params.

  The ImageNet bottleneck layout (3, 4, 6, 3 blocks, widths 64..512 expanded
  by 4) behind a 3x3 stride-1 stem without max-pool, at 100 classes.
  """
  return ResNet(num_classes=num_classes, stage_sizes=(3, 4, 6, 3),
                block='bottleneck', stem='cifar', dtype=dtype)


def wrn_16_1(num_classes: int, dtype: Any = jnp.float32,
             dropout: float = 0.0) -> WideResNet:
  """WRN-16-1: 180,916 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=16, widen_factor=1,
                    dropout=dropout, dtype=dtype)


def wrn_40_1(num_classes: int, dtype: Any = jnp.float32,
             dropout: float = 0.0) -> WideResNet:
  """WRN-40-1: 569,780 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=40, widen_factor=1,
                    dropout=dropout, dtype=dtype)


def wrn_16_2(num_classes: int, dtype: Any = jnp.float32,
             dropout: float = 0.0) -> WideResNet:
  """WRN-16-2: 703,284 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=16, widen_factor=2,
                    dropout=dropout, dtype=dtype)


def wrn_40_2(num_classes: int, dtype: Any = jnp.float32,
             dropout: float = 0.0) -> WideResNet:
  """WRN-40-2: 2,255,156 params at 100 classes."""
  return WideResNet(num_classes=num_classes, depth=40, widen_factor=2,
                    dropout=dropout, dtype=dtype)
