"""Vision Transformers (Dosovitskiy et al. 2021) with DeiT's distillation token.

The layout of timm's `VisionTransformer` / DeiT (Touvron et al. 2021), so
that parameter counts match theirs: a patch-embedding conv with bias, a class
token, learned position embeddings, pre-LayerNorm blocks (multi-head
self-attention with biased q/k/v and output projections, GELU MLP of 4x
width), a final LayerNorm and a dense head on the class token.

With `distill_token=True` (DeiT's distilled models) a second learned token
rides along with its own position embedding and its own head. In train mode
the model returns the class head's logits and records the distillation
head's logits as the feature 'dist_logits' (`kd_jax.models.features`), for
an objective that trains it on the teacher (DeiT's hard distillation: the
teacher's argmax). In eval mode it returns the mean of the two heads' logits,
as DeiT predicts.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap

_INIT = nn.initializers.truncated_normal(0.02)


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_INIT,
        dropout_rate=self.dropout, deterministic=not train)(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_INIT)(y)
    y = nn.Dropout(self.dropout, deterministic=not train)(nn.gelu(y, False))
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT)(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ViT(nn.Module):
  """ViT classifier on the class token, optionally with a distillation token.

  Feature taps: 'embedding' (the class token after the final LayerNorm, which
  the head reads) and, with `distill_token`, 'dist_embedding' (the
  distillation token there) and 'dist_logits' (its head's logits).

  Attributes:
    num_classes: number of logits.
    patch_size: side of the square patches; must divide the image sides.
    width: token dimension.
    depth: number of encoder blocks.
    num_heads: attention heads; must divide `width`.
    mlp_dim: hidden width of the MLPs.
    distill_token: add DeiT's distillation token and head.
    dropout: dropout rate in attention and after each residual branch.
    dtype: computation dtype; params stay float32, logits are float32.
  """
  num_classes: int
  patch_size: int = 16
  width: int = 192
  depth: int = 12
  num_heads: int = 3
  mlp_dim: int = 768
  distill_token: bool = False
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    check_image_batch(x, 'ViT')
    height, width = x.shape[1:3]
    if height % self.patch_size or width % self.patch_size:
      raise ValueError(f'ViT patch_size={self.patch_size} must divide the '
                       f'image size {height}x{width}; set config.model.'
                       'patch_size to a divisor of both (e.g. 4 for 28x28).')
    if self.width % self.num_heads:
      raise ValueError(f'ViT num_heads={self.num_heads} must divide '
                       f'width={self.width}.')
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=self.patch_size, padding='VALID', dtype=self.dtype,
                kernel_init=_INIT, name='patch_embed')(x)
    x = x.reshape(x.shape[0], -1, self.width)
    tokens = [self.param('cls_token', _INIT, (1, 1, self.width))]
    if self.distill_token:
      tokens.append(self.param('dist_token', _INIT, (1, 1, self.width)))
    tokens = [jnp.broadcast_to(t.astype(self.dtype),
                               (x.shape[0], 1, self.width)) for t in tokens]
    x = jnp.concatenate([*tokens, x], axis=1)
    x = x + self.param('pos_embed', _INIT, (1, *x.shape[1:])).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for index in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                       name=f'block{index + 1}')(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    tap(self, 'embedding', x[:, 0])
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_INIT,
                      name='head')(x[:, 0]).astype(jnp.float32)
    if not self.distill_token:
      return logits
    tap(self, 'dist_embedding', x[:, 1])
    dist_logits = nn.Dense(self.num_classes, dtype=self.dtype,
                           kernel_init=_INIT, name='head_dist')(x[:, 1])
    dist_logits = dist_logits.astype(jnp.float32)
    tap(self, 'dist_logits', dist_logits)
    return logits if train else (logits + dist_logits) / 2


def vit_ti16(num_classes: int, dtype: Any = jnp.float32, patch_size: int = 16,
             distill_token: bool = False, dropout: float = 0.0) -> ViT:
  """ViT-Ti/16 (DeiT-Ti): width 192, depth 12, 3 heads, MLP 768.

  5,717,416 params at 224x224 and 1000 classes (5,910,800
  with the distillation token, as DeiT-Ti distilled). The count grows with
  the number of patches (position embeddings).
  """
  return ViT(num_classes=num_classes, patch_size=patch_size, width=192,
             depth=12, num_heads=3, mlp_dim=768, distill_token=distill_token,
             dropout=dropout, dtype=dtype)


def vit_s16(num_classes: int, dtype: Any = jnp.float32, patch_size: int = 16,
            distill_token: bool = False, dropout: float = 0.0) -> ViT:
  """ViT-S/16 (DeiT-S): width 384, depth 12, 6 heads, MLP 1536.

  22,050,664 params at 224x224 and 1000 classes (22,436,432 with
  the distillation token, as DeiT-S distilled).
  """
  return ViT(num_classes=num_classes, patch_size=patch_size, width=384,
             depth=12, num_heads=6, mlp_dim=1536, distill_token=distill_token,
             dropout=dropout, dtype=dtype)


def vit_mini(num_classes: int, dtype: Any = jnp.float32, patch_size: int = 7,
             distill_token: bool = False, dropout: float = 0.0) -> ViT:
  """A four-block ViT sized for CPU studies: width 64, 4 heads, MLP 128.

  139,018 params at 28x28x1 with patch 7 (16 patches) and 10 classes
  (139,796 with the distillation token); 5.6 MFLOPs per image.
  """
  return ViT(num_classes=num_classes, patch_size=patch_size, width=64,
             depth=4, num_heads=4, mlp_dim=128, distill_token=distill_token,
             dropout=dropout, dtype=dtype)


def vit_tiny(num_classes: int, dtype: Any = jnp.float32, patch_size: int = 4,
             distill_token: bool = False, dropout: float = 0.0) -> ViT:
  """A two-block ViT for tests and CPU runs: width 32, 2 heads, MLP 64.

  19,658 params at 28x28x1 with patch 4 and 10 classes.
  """
  return ViT(num_classes=num_classes, patch_size=patch_size, width=32,
             depth=2, num_heads=2, mlp_dim=64, distill_token=distill_token,
             dropout=dropout, dtype=dtype)
