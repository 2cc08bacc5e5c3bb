"""Named intermediate features of every model, for feature distillation.

Each model records features with `kd_jax.models.taps.tap` at the positions
RepDistiller's `forward(x, is_feat=True, preact=...)` (or mdistiller's, for
ImageNet models) returns them, under one naming scheme:

* 'stem': the stem's output (`f0`).
* 'stage1'...'stageN': each stage's output, post-activation (`f1`...).
* 'preact1'...'preactN': the same before its final ReLU, where RepDistiller's
  `preact=True` returns one (`f1_pre`...).
* 'embedding': the pooled penultimate features the classification head reads
  (the last element of their feature list).

Per model (N stages; shapes at 32x32 inputs via `feature_shapes`):

* resnet8...resnet110, resnet8x4, resnet32x4: stem, stage1-3, preact1-3,
  embedding. resnet50_cifar, resnet18/34/50: stem, stage1-4, preact1-4,
  embedding (ImageNet stems: before the max-pool, as mdistiller). bit*:
  the same as resnet50's (stem before the max-pool).
* wrn*: stem (the first conv, no BN), stage1-3 (block outputs, no BN),
  preact1-3 (that output through the BN that reads it next, before its
  ReLU, as RepDistiller's WRN), embedding.
* vgg8...vgg19: stem (block 1 after ReLU), stage1-4, preact1-4, embedding.
* mobilenetv2: stem, stage1-4, embedding (its block outputs are linear, so
  RepDistiller returns no separate pre-activations).
* mobilenetv1: stem, stage1-4 (strides 4-32), preact1-4, embedding.
* shufflenetv1, shufflenetv2: stem, stage1-3, preact1-3, embedding.
* mlp: preact1.../stage1... per hidden layer (before/after ReLU), embedding.
* cnn: preact1.../stage1... per conv block (conv output / after ReLU and
  pool), pooled, embedding (the hidden dense layer).
* vit_*: embedding (the class token after the final LayerNorm, or with
  `pool='gap'` the mean token; through the pre-logits layer if any); with
  `distill_token=True` also dist_embedding and dist_logits (the distillation
  head's logits, which DeiT's hard distillation trains on the teacher's
  argmax; the returned logits are the class head's in train mode and the
  mean of both heads in eval mode).
* decoder*: block1...blockN (the residual stream after each block) and
  embedding (the final LayerNorm's output), [B, L, D] per position;
  attn1...attnN, attention probabilities [B, H, L, L] (`feature_shapes`
  takes images: use `jax.eval_shape` on token ids for these).
"""

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.models import get_model
from kd_jax.models.taps import INTERMEDIATES


def _collect(intermediates: Mapping[str, Any]) -> dict[str, jax.Array]:
  # Each tap is a tuple of the values sown in one apply; a model applied
  # once holds one, and the last is the one the logits came from.
  return {name: values[-1] for name, values in intermediates.items()
          if isinstance(values, tuple)}


def apply_with_features(model: nn.Module, variables: Mapping[str, Any],
                        images: jax.Array, *, train: bool,
                        rngs: Mapping[str, jax.Array] | None = None,
                        mutable: Sequence[str] = ()):
  """Applies `model` and returns its logits with its named features.

  Args:
    model: a model of `kd_jax.models`.
    variables: its variables ('params', and 'batch_stats' where it has BN).
    images: float images [B, H, W, C].
    train: train mode (batch statistics, dropout, DeiT's class-head logits).
    rngs: rng streams, e.g. {'dropout': key} when `train` and the model drops.
    mutable: collections to update, e.g. ['batch_stats'] when `train`.

  Returns:
    `(logits, features)`, or `(logits, features, updates)` when `mutable` is
    not empty; `features` maps each name in this module's docstring to an
    array, `updates` the mutable collections to their new values.

  >>> from kd_jax.models import get_model
  >>> model = get_model({'name': 'mlp', 'hidden': (5,)}, num_classes=3)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((2, 4, 4, 1)))
  >>> logits, features = apply_with_features(
  ...     model, variables, jnp.ones((2, 4, 4, 1)), train=False)
  >>> sorted(features), features['embedding'].shape
  (['embedding', 'preact1', 'stage1'], (2, 5))
  """
  mutable = list(mutable)
  if INTERMEDIATES in mutable:
    raise ValueError(f"mutable={mutable} must not name '{INTERMEDIATES}': "
                     'apply_with_features returns the features itself.')
  logits, state = model.apply(variables, images, train, rngs=rngs,
                              mutable=[*mutable, INTERMEDIATES])
  state = dict(state)
  features = _collect(state.pop(INTERMEDIATES, {}))
  if mutable:
    return logits, features, state
  return logits, features


def feature_shapes(spec: Mapping[str, Any], num_classes: int,
                   image_shape: Sequence[int], *, train: bool = False,
                   dtype: Any = jnp.float32) -> dict[str, jax.ShapeDtypeStruct]:
  """The features model `spec` records for an image batch, without compute.

  Args:
    spec: a model spec (`config.model`), as `kd_jax.models.get_model` takes.
    num_classes: number of logits.
    image_shape: the image batch's shape [B, H, W, C].
    train: shapes in train mode (they differ only in which taps a model
      records; the ViT's are the same in both).
    dtype: computation dtype.

  Returns:
    {feature name: jax.ShapeDtypeStruct}.
  """
  model = get_model(spec, num_classes, dtype)
  images = jax.ShapeDtypeStruct(tuple(image_shape), jnp.float32)

  def features(images):
    variables = model.init(jax.random.key(0), images)
    rngs = {'dropout': jax.random.key(1)} if train else None
    mutable = ['batch_stats'] if train and 'batch_stats' in variables else ()
    return apply_with_features(model, variables, images, train=train,
                               rngs=rngs, mutable=mutable)[1]

  return jax.eval_shape(features, images)


def select_features(features: Mapping[str, jax.Array], names: Iterable[str],
                    model_name: str) -> list[jax.Array]:
  """`features[name]` for each of `names`; refuses a name the model lacks.

  Raises:
    ValueError: naming the missing feature and the model's feature names.
  """
  selected = []
  for name in names:
    if name not in features:
      raise ValueError(f'Model {model_name!r} has no feature {name!r}; its '
                       f'features are {sorted(features)}.')
    selected.append(features[name])
  return selected
