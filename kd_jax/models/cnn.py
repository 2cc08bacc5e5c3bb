"""A small three-layer CNN student for image screening tasks."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap


class CNN(nn.Module):
  """Conv -> ReLU -> 2x2 max-pool, three times; global average pool; dense head.

  Sized as the compact student of chest X-ray pneumonia distillation
  (about 277k params): with the defaults it has 275,394 params for 3-channel
  inputs and 2 classes (273,794 for 1 channel). Global average pooling makes
  the count independent of the image size (224x224 or 28x28 alike).

  Feature taps (`kd_jax.models.features`): 'preact1'... (each conv's output),
  'stage1'... (each block's output: after ReLU and max-pool), 'pooled' (the
  global average) and 'embedding' (the hidden dense layer after ReLU and
  dropout, which the logits layer reads).

  Attributes:
    num_classes: number of logits.
    features: output channels of the conv layers.
    kernel_size: side of the square conv kernels.
    dense: width of the hidden dense layer of the head.
    dropout: dropout rate before the logits layer.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  features: Sequence[int] = (32, 64, 128)
  kernel_size: int = 5
  dense: int = 128
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'cnn')
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f'cnn dropout must be in [0, 1); got {self.dropout}.')
    x = jnp.asarray(x, self.dtype)
    for index, width in enumerate(self.features):
      x = nn.Conv(width, (self.kernel_size, self.kernel_size),
                  dtype=self.dtype)(x)
      tap(self, f'preact{index + 1}', x)
      x = nn.max_pool(nn.relu(x), (2, 2), strides=(2, 2), padding='SAME')
      tap(self, f'stage{index + 1}', x)
    x = jnp.mean(x, axis=(1, 2))
    tap(self, 'pooled', x)
    x = nn.relu(nn.Dense(self.dense, dtype=self.dtype)(x))
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
