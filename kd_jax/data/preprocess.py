"""Decoding, augmentation, normalisation and mixup: TF ops on batches.

Images are decoded, converted to `config.channels` and resized (bilinear,
antialiased) to `config.image_size`. `augment` draws one augmentation per
batch from stateless random ops; `SHIFT_AUGMENTATIONS` is the one table of
the shift-and-flip augmentations, which multi-view logits caches
(`kd_jax.teachers.cache`) replay per example in NumPy.
"""

from __future__ import annotations

import math

import numpy as np

from kd_jax.data import sources
from kd_jax.data import tf

AUGMENTATIONS = ('none', 'mnist_jitter', 'cifar', 'imagenet')
# The shift-and-flip augmentations: (largest shift in pixels, random
# horizontal flip). The tf stream draws them per batch; multi-view logits
# caches (`kd_jax.teachers.cache`) replay them per example in NumPy.
SHIFT_AUGMENTATIONS = {'mnist_jitter': (2, False),  # Hinton et al. 2015.
                       'cifar': (4, True)}          # Zero-pad 4, crop, flip.

_CENTER_CROP_PADDING = 32  # Eval: resize-and-crop 256 -> 224, as in ResNet.


def normalization(name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) [channels] float32 that images of dataset `name` are
  normalised with: its registered constants (`sources.DataSource`),
  channel-averaged and repeated when `channels` converts RGB <-> grayscale."""
  mean, std = (np.array(v, np.float32) for v in
               sources.DATASETS.get(name, 'config.dataset').normalization)
  if len(mean) != channels:  # RGB <-> grayscale conversion.
    mean, std = (np.full([channels], v.mean(), np.float32) for v in (mean, std))
  return mean, std


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  image = tf.image.resize(image, size, method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def decode(encoded: tf.Tensor, shape: tuple[int, int, int],
           resize: bool) -> tf.Tensor:
  """Encoded PNG/JPEG -> uint8 [H, W, C]."""
  image = tf.io.decode_image(encoded, channels=shape[2], dtype=tf.uint8,
                             expand_animations=False)
  if resize:
    image = _resize(image, shape[:2])
  return tf.ensure_shape(image, shape)


def decode_jpeg_crop(encoded: tf.Tensor, shape: tuple[int, int, int],
                     seed: tf.Tensor | None) -> tf.Tensor:
  """JPEG -> float32 [H, W, C] in [0, 255]: random crop, or center if no seed.

  The random crop is Inception's (area 8%..100%, aspect 3/4..4/3); the center
  crop keeps H / (H + 32) of the shorter side, then both resize to (H, W).
  """
  jpeg_shape = tf.io.extract_jpeg_shape(encoded)
  if seed is not None:
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        jpeg_shape,
        bounding_boxes=tf.constant([0., 0., 1., 1.], shape=[1, 1, 4]),
        seed=seed, min_object_covered=0.1, aspect_ratio_range=(3 / 4, 4 / 3),
        area_range=(0.08, 1.0), max_attempts=10,
        use_image_if_no_bounding_boxes=True)
    window = tf.stack([begin[0], begin[1], size[0], size[1]])
  else:
    height, width = jpeg_shape[0], jpeg_shape[1]
    crop = tf.cast(
        shape[0] / (shape[0] + _CENTER_CROP_PADDING) *
        tf.cast(tf.minimum(height, width), tf.float32), tf.int32)
    window = tf.stack([(height - crop + 1) // 2, (width - crop + 1) // 2,
                       crop, crop])
  image = tf.image.decode_and_crop_jpeg(encoded, window, channels=3)
  if shape[2] == 1:
    image = tf.image.rgb_to_grayscale(image)
  image = tf.image.resize(image, shape[:2], method='bilinear', antialias=True)
  return tf.ensure_shape(image, shape)


def _random_translate(images: tf.Tensor, max_shift: int,
                      seed: tf.Tensor) -> tf.Tensor:
  """Shifts each image by up to +-max_shift px, filling with zeros."""
  batch = tf.shape(images)[0]
  height, width, channels = images.shape[1:]
  m = max_shift
  padded_height, padded_width = height + 2 * m, width + 2 * m
  pixels = tf.reshape(tf.pad(images, [[0, 0], [m, m], [m, m], [0, 0]]),
                      [-1, channels])
  dy, dx = tf.unstack(tf.random.stateless_uniform(
      [2, batch, 1, 1], seed, minval=0, maxval=2 * m + 1, dtype=tf.int32))
  # One gather of all output pixels (faster than per-axis gathers).
  rows = dy + tf.range(height)[None, :, None]
  cols = dx + tf.range(width)[None, None, :]
  first = tf.range(batch)[:, None, None] * padded_height * padded_width
  images = tf.gather(pixels, first + rows * padded_width + cols)
  return tf.reshape(images, [batch, height, width, channels])


def _random_flip(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  flip = tf.random.stateless_uniform([tf.shape(images)[0]], seed) < 0.5
  return tf.where(flip[:, None, None, None], tf.reverse(images, [2]), images)


def _random_resized_crop(images: tf.Tensor, seed: tf.Tensor) -> tf.Tensor:
  """Inception crop per image (area 8%..100%, aspect 3/4..4/3), resized back."""
  batch, height, width = tf.shape(images)[0], images.shape[1], images.shape[2]
  u = tf.random.stateless_uniform([4, batch], seed)
  area = 0.08 + 0.92 * u[0]
  log_aspect = math.log(3 / 4) + math.log(16 / 9) * u[1]
  crop_h = tf.minimum(tf.sqrt(area / tf.exp(log_aspect)), 1.0)
  crop_w = tf.minimum(tf.sqrt(area * tf.exp(log_aspect)), 1.0)
  top, left = (1.0 - crop_h) * u[2], (1.0 - crop_w) * u[3]
  boxes = tf.stack([top, left, top + crop_h, left + crop_w], axis=1)
  return tf.image.crop_and_resize(tf.cast(images, tf.float32), boxes,
                                  tf.range(batch), (height, width))


def augment(images: tf.Tensor, kind: str, seed: tf.Tensor,
            cropped: bool) -> tf.Tensor:
  """Batched augmentation `kind` of uint8/float images in [0, 255]."""
  translate_seed, flip_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 2))
  if kind in SHIFT_AUGMENTATIONS:
    shift, flip = SHIFT_AUGMENTATIONS[kind]
    images = _random_translate(images, shift, translate_seed)
    return _random_flip(images, flip_seed) if flip else images
  if kind == 'imagenet':
    if not cropped:
      images = _random_resized_crop(images, translate_seed)
    return _random_flip(images, flip_seed)
  return images


def normalize(images: tf.Tensor, mean: np.ndarray, std: np.ndarray):
  return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def mixup(batch: dict[str, tf.Tensor], seed: tf.Tensor, alpha: float,
          num_classes: int) -> dict[str, tf.Tensor]:
  """Mixes each example with the next one in the batch; adds `label_probs`."""
  seeds = tf.random.experimental.stateless_split(seed, 2)
  g1 = tf.random.stateless_gamma([], seeds[0], alpha)
  g2 = tf.random.stateless_gamma([], seeds[1], alpha)
  weight = tf.where(g1 + g2 > 0, g1 / (g1 + g2), 1.0)  # ~ Beta(alpha, alpha).
  weight = tf.maximum(weight, 1.0 - weight)
  one_hot = tf.one_hot(batch['label'], num_classes)
  mix = lambda x: weight * x + (1.0 - weight) * tf.roll(x, 1, axis=0)
  return {**batch, 'image': mix(batch['image']), 'label_probs': mix(one_hot)}
