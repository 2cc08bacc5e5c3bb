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

Options for big_vision's ViT (`big_vision/models/vit.py`), whose
checkpoints `kd_jax.import_teacher` reads; the defaults are timm's layout:
`gelu='tanh'` (Flax's `nn.gelu` default, which big_vision calls), `posemb=
'learned_patches'` (position embeddings on the patches only, added before
the class token is prepended) or 'sincos2d' (fixed 2-D sine-cosine ones),
`pool='gap'` (the mean of the final LayerNorm's tokens, with no class
token) and `representation_size` (a tanh pre-logits layer, big_vision's
`rep_size`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models.resnet import check_image_batch
from kd_jax.models.taps import tap

_INIT = nn.initializers.truncated_normal(0.02)
POOLS = ('token', 'gap')
POSEMBS = ('learned', 'learned_patches', 'sincos2d')
GELUS = ('exact', 'tanh')


def posemb_sincos_2d(rows: int, cols: int, width: int,
                     temperature: float = 10_000.) -> jax.Array:
  """Fixed position embeddings [1, rows * cols, width] of a patch grid.

  MoCo v3's (Chen et al. 2021), as big_vision's `posemb='sincos2d'`: a
  quarter of the channels each holds sin(col * w_k), cos(col * w_k),
  sin(row * w_k), cos(row * w_k), with w_k = temperature^(-k / (K - 1)),
  k < K = width / 4; patches in row-major order.
  """
  row, col = jnp.mgrid[:rows, :cols]
  quarter = width // 4
  omega = 1. / temperature ** (jnp.arange(quarter) / (quarter - 1))
  col = col.reshape(-1)[:, None] * omega[None]
  row = row.reshape(-1)[:, None] * omega[None]
  return jnp.concatenate([jnp.sin(col), jnp.cos(col), jnp.sin(row),
                          jnp.cos(row)], axis=1)[None]


class EncoderBlock(nn.Module):
  """x + MHSA(LN(x)), then x + MLP(LN(x))."""
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any
  approximate_gelu: bool = False

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.MultiHeadDotProductAttention(
        num_heads=self.num_heads, dtype=self.dtype, kernel_init=_INIT,
        dropout_rate=self.dropout, deterministic=not train)(y, y)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype)(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_INIT)(y)
    y = nn.gelu(y, self.approximate_gelu)
    y = nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT)(y)
    return x + nn.Dropout(self.dropout, deterministic=not train)(y)


class ViT(nn.Module):
  """ViT classifier on the class token, optionally with a distillation token.

  Feature taps: 'embedding' (what the head reads: the class token after the
  final LayerNorm, or with `pool='gap'` the mean token there, through the
  pre-logits layer if any) and, with `distill_token`, 'dist_embedding' (the
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
    pool: what the head reads: 'token' (the class token) or 'gap' (the mean
      of all tokens; no class token).
    posemb: 'learned' (one for every token, class and distillation tokens
      included: timm's), 'learned_patches' (the patches' only, added before
      the tokens are prepended: big_vision's 'learn') or 'sincos2d' (fixed,
      on the patches: `posemb_sincos_2d`).
    gelu: the MLP's GELU, 'exact' (erf: PyTorch's) or 'tanh' (the tanh
      approximation: Flax's default, big_vision's).
    representation_size: width of a dense + tanh pre-logits layer before
      the head; 0 for none.
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
  pool: str = 'token'
  posemb: str = 'learned'
  gelu: str = 'exact'
  representation_size: int = 0

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
    self._check_options()
    x = jnp.asarray(x, self.dtype)
    x = nn.Conv(self.width, (self.patch_size, self.patch_size),
                strides=self.patch_size, padding='VALID', dtype=self.dtype,
                kernel_init=_INIT, name='patch_embed')(x)
    rows, cols = x.shape[1:3]
    x = x.reshape(x.shape[0], -1, self.width)
    if self.posemb == 'learned_patches':
      x = x + self.param('pos_embed', _INIT, (1, *x.shape[1:])).astype(
          self.dtype)
    elif self.posemb == 'sincos2d':
      x = x + posemb_sincos_2d(rows, cols, self.width).astype(self.dtype)
    tokens = []
    if self.pool == 'token':
      tokens.append(self.param('cls_token', _INIT, (1, 1, self.width)))
    if self.distill_token:
      tokens.append(self.param('dist_token', _INIT, (1, 1, self.width)))
    tokens = [jnp.broadcast_to(t.astype(self.dtype),
                               (x.shape[0], 1, self.width)) for t in tokens]
    x = jnp.concatenate([*tokens, x], axis=1)
    if self.posemb == 'learned':
      x = x + self.param('pos_embed', _INIT, (1, *x.shape[1:])).astype(
          self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for index in range(self.depth):
      x = EncoderBlock(self.num_heads, self.mlp_dim, self.dropout, self.dtype,
                       self.gelu == 'tanh', name=f'block{index + 1}')(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=self.dtype, name='norm')(x)
    pooled = x[:, 0] if self.pool == 'token' else jnp.mean(x, axis=1)
    if self.representation_size:
      pooled = nn.tanh(nn.Dense(self.representation_size, dtype=self.dtype,
                                kernel_init=_INIT, name='pre_logits')(pooled))
    tap(self, 'embedding', pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=_INIT,
                      name='head')(pooled).astype(jnp.float32)
    if not self.distill_token:
      return logits
    tap(self, 'dist_embedding', x[:, 1])
    dist_logits = nn.Dense(self.num_classes, dtype=self.dtype,
                           kernel_init=_INIT, name='head_dist')(x[:, 1])
    dist_logits = dist_logits.astype(jnp.float32)
    tap(self, 'dist_logits', dist_logits)
    return logits if train else (logits + dist_logits) / 2

  def _check_options(self) -> None:
    for field, value, choices in (('pool', self.pool, POOLS),
                                  ('posemb', self.posemb, POSEMBS),
                                  ('gelu', self.gelu, GELUS)):
      if value not in choices:
        raise ValueError(f'ViT {field}={value!r}; set config.model.{field} '
                         f'to one of {choices}.')
    if self.distill_token and (self.pool != 'token'
                               or self.representation_size):
      raise ValueError(
          "ViT distill_token=True needs pool='token' and no "
          f'representation_size (got pool={self.pool!r}, representation_'
          f'size={self.representation_size}): DeiT\'s heads read the tokens.')
    if self.posemb == 'sincos2d' and (self.width % 4 or self.width < 8):
      raise ValueError(f"ViT posemb='sincos2d' needs a width divisible by 4 "
                       f'and at least 8; got width={self.width}.')


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
