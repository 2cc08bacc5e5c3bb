"""Multilayer perceptrons: the MNIST nets of Hinton, Vinyals & Dean (2015)."""

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.taps import tap


class MLP(nn.Module):
  """ReLU MLP on flattened images.

  Hinton et al. (2015), Sec. 3, on MNIST: a teacher with two hidden layers of
  1200 ReLUs, dropout 0.5 on hidden units and 0.2 on the input (2,395,210
  params at 784 inputs, 10 classes); a student of 2x800 (1,276,810 params);
  and a tiny net of 2x30.

  Feature taps (`kd_jax.models.features`): 'preact1'... (each hidden dense
  layer's output), 'stage1'... (the same after its ReLU) and 'embedding'
  (the last hidden layer after dropout, which the logits layer reads).

  Attributes:
    num_classes: number of logits.
    hidden: widths of the hidden layers.
    dropout: dropout rate after every hidden ReLU.
    input_dropout: dropout rate on the flattened input pixels.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  hidden: Sequence[int] = (800, 800)
  dropout: float = 0.0
  input_dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    for field in ('dropout', 'input_dropout'):
      rate = getattr(self, field)
      if not 0.0 <= rate < 1.0:
        raise ValueError(f'mlp {field} must be in [0, 1); got {rate}.')
    x = jnp.asarray(x, self.dtype).reshape((x.shape[0], -1))
    x = nn.Dropout(self.input_dropout, deterministic=not train)(x)
    for index, width in enumerate(self.hidden):
      x = nn.Dense(width, dtype=self.dtype)(x)
      tap(self, f'preact{index + 1}', x)
      x = nn.relu(x)
      tap(self, f'stage{index + 1}', x)
      x = nn.Dropout(self.dropout, deterministic=not train)(x)
    tap(self, 'embedding', x)
    x = nn.Dense(self.num_classes, dtype=self.dtype)(x)
    return x.astype(jnp.float32)
