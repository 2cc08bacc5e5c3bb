"""Strong augmentations: RandAugment as the MLKD authors use it, and CutMix.

TF ops on batches of images ``[B, H, W, C]`` (``C`` 1 or 3, values in
[0, 255]), like :mod:`kd_jax.data.preprocess`: every random draw is a
stateless op of an explicit ``seed`` (a ``[2]`` int tensor), made per
example, so one (seed, batch) gives the same images on every host and a
resumed run replays its augmentations exactly.

* :func:`rand_augment`: the variant in MLKD's code (after FixMatch), applied
  after the usual crop and flip: ``num_ops`` ops drawn with replacement from
  :data:`RAND_AUGMENT_OPS`, each with a magnitude drawn uniformly from its
  range, then Cutout of a square up to half the image's width, filled with
  :data:`CUTOUT_FILL`. Each op computes what the PIL call in the authors'
  ``augment_list`` computes (``ImageOps``/``ImageEnhance`` on uint8 images,
  affine warps with nearest sampling and black fill).
  :func:`rand_augment_params` draws the choices, :func:`apply_rand_augment`
  applies them: ``rand_augment`` is the two in a row.
* :func:`cutmix`: Yun et al.'s CutMix on a batch: one box per batch, pasted
  from the next example (the stream is shuffled, as :func:`preprocess.mixup`
  pairs), labels mixed by the box's exact area.

Reference code: MLKD's ``mdistiller/dataset/cifar100.py`` (``RandAugment``,
``augment_list``, ``Cutout``), https://github.com/Jin-Ying/Multi-Level-Logit-Distillation;
CutMix's ``train.py`` (``rand_bbox``), https://github.com/clovaai/CutMix-PyTorch.
"""

from __future__ import annotations

import math

from kd_jax.data import tf

# (name, low, high): the op and the range its magnitude is drawn from, in the
# order of the authors' `augment_list`.
RAND_AUGMENT_OPS: tuple[tuple[str, float, float], ...] = (
    ('auto_contrast', 0.0, 1.0),
    ('brightness', 0.05, 0.95),
    ('color', 0.05, 0.95),
    ('contrast', 0.05, 0.95),
    ('equalize', 0.0, 1.0),
    ('identity', 0.0, 1.0),
    ('posterize', 4.0, 8.0),
    ('rotate', -30.0, 30.0),
    ('sharpness', 0.05, 0.95),
    ('shear_x', -0.3, 0.3),
    ('shear_y', -0.3, 0.3),
    ('solarize', 0.0, 256.0),
    ('translate_x', -0.3, 0.3),
    ('translate_y', -0.3, 0.3),
)
OP_NAMES = tuple(name for name, _, _ in RAND_AUGMENT_OPS)
_GEOMETRIC = ('rotate', 'shear_x', 'shear_y', 'translate_x', 'translate_y')
# The authors' Cutout colour (RGB); grayscale images get its luma, 123.
CUTOUT_FILL = (125, 123, 114)


# ----------------------------------------------------------------------------
# The ops, each as PIL computes it on uint8 images.
# ----------------------------------------------------------------------------


def _luma(images: tf.Tensor) -> tf.Tensor:
  """PIL's RGB -> L, in integers: (19595 R + 38470 G + 7471 B + 2^15) >> 16."""
  if images.shape[-1] == 1:
    return images
  pixels = tf.cast(images, tf.int32)
  weighted = (pixels[..., 0:1] * 19595 + pixels[..., 1:2] * 38470
              + pixels[..., 2:3] * 7471 + 32768)
  return tf.cast(tf.bitwise.right_shift(weighted, 16), tf.float32)


def _per_example(values: tf.Tensor) -> tf.Tensor:
  return tf.reshape(tf.cast(values, tf.float32), [-1, 1, 1, 1])


def _blend(degenerate: tf.Tensor, images: tf.Tensor,
           factor: tf.Tensor) -> tf.Tensor:
  """PIL's Image.blend on uint8: float32, then clipped and truncated."""
  mixed = degenerate + _per_example(factor) * (images - degenerate)
  return tf.floor(tf.clip_by_value(mixed, 0.0, 255.0))


def _smooth(images: tf.Tensor) -> tf.Tensor:
  """ImageFilter.SMOOTH: [[1, 1, 1], [1, 5, 1], [1, 1, 1]] / 13, rounded;
  PIL leaves the one-pixel border as it was."""
  height, width = images.shape[1], images.shape[2]
  padded = tf.pad(images, [[0, 0], [1, 1], [1, 1], [0, 0]])
  total = 4.0 * images
  for dy in range(3):
    for dx in range(3):
      total += padded[:, dy:dy + height, dx:dx + width, :]
  smooth = tf.floor(total / 13.0 + 0.5)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  interior = ((rows > 0) & (rows < height - 1) & (cols > 0)
              & (cols < width - 1))[None, :, :, None]
  return tf.where(interior, smooth, images)


def _auto_contrast(images: tf.Tensor) -> tf.Tensor:
  """ImageOps.autocontrast: each channel's [min, max] stretched to [0, 255]
  with PIL's lut, int(i * scale + offset) in double precision."""
  low = tf.reduce_min(images, axis=[1, 2], keepdims=True)
  high = tf.reduce_max(images, axis=[1, 2], keepdims=True)
  low64, high64 = tf.cast(low, tf.float64), tf.cast(high, tf.float64)
  stretch = high > low
  scale = 255.0 / tf.where(stretch, high64 - low64, 1.0)
  offset = -low64 * scale
  out = tf.floor(tf.cast(images, tf.float64) * scale + offset)
  out = tf.cast(tf.clip_by_value(out, 0.0, 255.0), tf.float32)
  return tf.where(stretch, out, images)


def _equalize(images: tf.Tensor) -> tf.Tensor:
  """ImageOps.equalize, per image and channel, with PIL's lut."""
  batch = tf.shape(images)[0]
  channels = images.shape[-1]
  pixels = tf.cast(images, tf.int32)
  # One histogram per (example, channel): segment ids (b * C + c) * 256 + x.
  plane = (tf.range(batch)[:, None, None, None] * channels
           + tf.range(channels)[None, None, None, :])
  ids = plane * 256 + pixels
  histogram = tf.reshape(
      tf.math.unsorted_segment_sum(tf.ones_like(ids), ids,
                                   batch * channels * 256),
      [batch, channels, 256])
  total = images.shape[1] * images.shape[2]
  top = tf.reduce_max(pixels, axis=[1, 2])  # [B, C]: the largest value.
  top_count = tf.gather(histogram, top, batch_dims=2)
  step = (total - top_count) // 255
  below = tf.cumsum(histogram, axis=-1, exclusive=True)
  lut = (step[..., None] // 2 + below) // tf.maximum(step[..., None], 1)
  lut = tf.where(step[..., None] > 0, tf.minimum(lut, 255),
                 tf.range(256)[None, None, :])
  out = tf.gather(tf.reshape(lut, [-1]), ids)
  return tf.cast(out, tf.float32)


def _posterize(images: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
  bits = tf.maximum(tf.floor(tf.cast(values, tf.float32)), 1.0)
  quantum = _per_example(tf.pow(2.0, 8.0 - bits))
  return tf.floor(images / quantum) * quantum


def _solarize(images: tf.Tensor, values: tf.Tensor) -> tf.Tensor:
  return tf.where(images < _per_example(values), images, 255.0 - images)


def _affine_matrix(name: str, values: tf.Tensor, height: int,
                   width: int) -> tf.Tensor:
  """PIL's AFFINE data (a, b, c, d, e, f) per example, [B, 6] float64: the
  output pixel centred at (x, y) samples the input at (a x + b y + c,
  d x + e y + f)."""
  v = tf.cast(values, tf.float64)
  zero, one = tf.zeros_like(v), tf.ones_like(v)
  if name == 'rotate':
    # Image.rotate(v): counter-clockwise by v degrees about (W / 2, H / 2).
    angle = -v * (math.pi / 180.0)
    cos, sin = tf.cos(angle), tf.sin(angle)
    center_x, center_y = width / 2.0, height / 2.0
    c = cos * -center_x + sin * -center_y + center_x
    f = -sin * -center_x + cos * -center_y + center_y
    return tf.stack([cos, sin, c, -sin, cos, f], axis=1)
  if name == 'shear_x':
    return tf.stack([one, v, zero, zero, one, zero], axis=1)
  if name == 'shear_y':
    return tf.stack([one, zero, zero, v, one, zero], axis=1)
  if name == 'translate_x':
    return tf.stack([one, zero, v * width, zero, one, zero], axis=1)
  if name == 'translate_y':
    return tf.stack([one, zero, zero, zero, one, v * height], axis=1)
  return tf.stack([one, zero, zero, zero, one, zero], axis=1)


def _affine_warp(images: tf.Tensor, matrices: tf.Tensor) -> tf.Tensor:
  """Image.transform(AFFINE, NEAREST): input pixel floor(u), floor(v) at
  the output pixel's centre; outside the image is black."""
  batch = tf.shape(images)[0]
  height, width, channels = images.shape[1:]
  x = tf.range(width, dtype=tf.float64)[None, None, :] + 0.5
  y = tf.range(height, dtype=tf.float64)[None, :, None] + 0.5
  m = [matrices[:, i][:, None, None] for i in range(6)]
  u = m[0] * x + m[1] * y + m[2]
  v = m[3] * x + m[4] * y + m[5]
  col = tf.cast(tf.floor(u), tf.int32)
  row = tf.cast(tf.floor(v), tf.int32)
  inside = (u >= 0) & (v >= 0) & (col < width) & (row < height)
  index = (tf.range(batch)[:, None, None] * height * width
           + tf.clip_by_value(row, 0, height - 1) * width
           + tf.clip_by_value(col, 0, width - 1))
  pixels = tf.gather(tf.reshape(images, [-1, channels]), index)
  return tf.where(inside[..., None], pixels, tf.zeros_like(pixels))


def apply_op(images: tf.Tensor, name: str, values: tf.Tensor) -> tf.Tensor:
  """One op of :data:`RAND_AUGMENT_OPS` on every example.

  Args:
    images: ``[B, H, W, C]``, integer values in [0, 255] (uint8 or float).
    name: one of :data:`OP_NAMES`.
    values: ``[B]`` magnitudes, one per example, in the op's units (a factor,
      degrees, a fraction of the size, bits, a threshold).

  Returns:
    float32 ``[B, H, W, C]`` with integer values in [0, 255].
  """
  if name not in OP_NAMES:
    raise ValueError(f'op {name!r} is not a RandAugment op; choose one of '
                     f'{OP_NAMES}.')
  images = tf.cast(images, tf.float32)
  if name in _GEOMETRIC:
    return _affine_warp(images, _affine_matrix(name, values, images.shape[1],
                                               images.shape[2]))
  if name == 'identity':
    return images
  if name == 'auto_contrast':
    return _auto_contrast(images)
  if name == 'equalize':
    return _equalize(images)
  if name == 'posterize':
    return _posterize(images, values)
  if name == 'solarize':
    return _solarize(images, values)
  if name == 'brightness':
    return _blend(tf.zeros_like(images), images, values)
  if name == 'color':
    return _blend(tf.broadcast_to(_luma(images), tf.shape(images)), images,
                  values)
  if name == 'contrast':
    mean = tf.floor(tf.reduce_mean(tf.cast(_luma(images), tf.float64),
                                   axis=[1, 2, 3], keepdims=True) + 0.5)
    return _blend(tf.cast(mean, tf.float32) + tf.zeros_like(images), images,
                  values)
  return _blend(_smooth(images), images, values)  # Sharpness.


# ----------------------------------------------------------------------------
# RandAugment with Cutout.
# ----------------------------------------------------------------------------


def rand_augment_params(seed: tf.Tensor, batch_size, height: int, width: int,
                        num_ops: int = 2,
                        max_cutout: float = 0.5) -> dict[str, tf.Tensor]:
  """Draws RandAugment's choices for a batch, per example, from `seed`.

  Returns:
    ``ops`` int32 ``[num_ops, B]`` (indices into :data:`RAND_AUGMENT_OPS`,
    with replacement), ``values`` float32 ``[num_ops, B]`` (each op's
    magnitude, uniform in its range) and ``cutout`` int32 ``[B, 4]``: the
    filled square's first and last row and column ``(top, left, bottom,
    right)``, inclusive; ``bottom < top`` when there is none. As the
    authors' ``Cutout``: side ``s = u * max_cutout * W``; centre uniform;
    corner ``int(max(0, centre - s / 2))``; far edge ``int(min(W, corner +
    s))``.
  """
  if num_ops < 0 or not 0.0 <= max_cutout <= 1.0:
    raise ValueError(f'num_ops={num_ops!r} must be >= 0 and max_cutout='
                     f'{max_cutout!r} in [0, 1]; the authors use 2 and 0.5.')
  op_seed, value_seed, cut_seed = tf.unstack(
      tf.random.experimental.stateless_split(seed, 3))
  shape = [num_ops, batch_size]
  ops = tf.random.stateless_uniform(shape, op_seed, 0, len(OP_NAMES),
                                    dtype=tf.int32)
  low = tf.gather([low for _, low, _ in RAND_AUGMENT_OPS], ops)
  high = tf.gather([high for _, _, high in RAND_AUGMENT_OPS], ops)
  values = low + (high - low) * tf.random.stateless_uniform(shape, value_seed)
  u = tf.random.stateless_uniform([3, batch_size], cut_seed, dtype=tf.float64)
  side = u[0] * max_cutout * width
  left = tf.floor(tf.maximum(u[1] * width - side / 2, 0.0))
  top = tf.floor(tf.maximum(u[2] * height - side / 2, 0.0))
  right = tf.floor(tf.minimum(left + side, float(width)))
  bottom = tf.floor(tf.minimum(top + side, float(height)))
  # A side of exactly 0 draws nothing (the authors return early).
  bottom = tf.where(side > 0, bottom, top - 1)
  cutout = tf.cast(tf.stack([top, left, bottom, right], axis=1), tf.int32)
  return {'ops': ops, 'values': tf.cast(values, tf.float32),
          'cutout': cutout}


def _cutout_fill(channels: int, fill: tuple[int, ...]) -> list[float]:
  if len(fill) == channels:
    return [float(f) for f in fill]
  if channels == 1 and len(fill) == 3:
    return [float((19595 * fill[0] + 38470 * fill[1] + 7471 * fill[2]
                   + 32768) >> 16)]
  raise ValueError(f'fill={fill!r} has {len(fill)} values for images with '
                   f'{channels} channel(s); pass one value per channel.')


def apply_rand_augment(images: tf.Tensor, params: dict[str, tf.Tensor],
                       fill: tuple[int, ...] = CUTOUT_FILL) -> tf.Tensor:
  """Applies the choices of :func:`rand_augment_params`; returns uint8."""
  images = tf.cast(images, tf.float32)
  height, width, channels = images.shape[1:]
  fill = _cutout_fill(channels, tuple(fill))
  ops, values = params['ops'], params['values']
  for step in range(ops.shape[0]):
    op, value = ops[step], values[step]
    chosen = lambda name: tf.equal(op, OP_NAMES.index(name))[:, None, None,
                                                             None]
    # One warp per step: each example's own affine (identity if it drew a
    # photometric op).
    matrices = _affine_matrix('identity', value, height, width)
    for name in _GEOMETRIC:
      matrices = tf.where(chosen(name)[:, :, 0, 0],
                          _affine_matrix(name, value, height, width), matrices)
    out = _affine_warp(images, matrices)
    for name in OP_NAMES:
      if name not in _GEOMETRIC and name != 'identity':
        out = tf.where(chosen(name), apply_op(images, name, value), out)
    images = out
  top, left, bottom, right = tf.unstack(params['cutout'], axis=1)
  rows = tf.range(height)[None, :, None]
  cols = tf.range(width)[None, None, :]
  inside = ((rows >= top[:, None, None]) & (rows <= bottom[:, None, None])
            & (cols >= left[:, None, None]) & (cols <= right[:, None, None]))
  images = tf.where(inside[..., None], tf.constant(fill, tf.float32), images)
  return tf.cast(images, tf.uint8)


def rand_augment(images: tf.Tensor, seed: tf.Tensor, num_ops: int = 2,
                 max_cutout: float = 0.5,
                 fill: tuple[int, ...] = CUTOUT_FILL) -> tf.Tensor:
  """MLKD's RandAugment with Cutout on a batch; uint8 ``[B, H, W, C]``.

  Apply it to the already cropped and flipped images (the authors' strong
  view is ``RandomCrop(32, 4)``, flip, then this).

  Args:
    images: ``[B, H, W, C]`` uint8 or integer-valued float in [0, 255].
    seed: ``[2]`` int tensor; every draw is per example and stateless.
    num_ops: ops per image (the authors' ``n = 2``).
    max_cutout: the largest Cutout side, as a fraction of the width.
    fill: Cutout's colour, one value per channel.
  """
  params = rand_augment_params(seed, tf.shape(images)[0], images.shape[1],
                               images.shape[2], num_ops, max_cutout)
  return apply_rand_augment(images, params, fill)


# ----------------------------------------------------------------------------
# CutMix.
# ----------------------------------------------------------------------------


def cutmix_box(seed: tf.Tensor, height: int, width: int,
               alpha: float) -> tuple[tf.Tensor, tf.Tensor]:
  """CutMix's box ``(top, left, bottom, right)`` (exclusive ends, int32) and
  the kept fraction ``1 - area / (H W)``.

  As the reference ``rand_bbox``: ``lam ~ Beta(alpha, alpha)``, sides
  ``int(W sqrt(1 - lam))``, centre uniform over the pixels, edges
  ``centre -+ side // 2`` clipped to the image.
  """
  if not alpha > 0:
    raise ValueError(f'cutmix alpha={alpha!r} must be > 0 (the CutMix '
                     f'authors use 1.0).')
  seeds = tf.random.experimental.stateless_split(seed, 4)
  g1 = tf.random.stateless_gamma([], seeds[0], alpha, dtype=tf.float64)
  g2 = tf.random.stateless_gamma([], seeds[1], alpha, dtype=tf.float64)
  lam = tf.where(g1 + g2 > 0, g1 / (g1 + g2), 1.0)  # ~ Beta(alpha, alpha).
  ratio = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.floor(height * ratio), tf.int32)
  cut_w = tf.cast(tf.floor(width * ratio), tf.int32)
  cy = tf.random.stateless_uniform([], seeds[2], 0, height, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], seeds[3], 0, width, dtype=tf.int32)
  top = tf.clip_by_value(cy - cut_h // 2, 0, height)
  bottom = tf.clip_by_value(cy + cut_h // 2, 0, height)
  left = tf.clip_by_value(cx - cut_w // 2, 0, width)
  right = tf.clip_by_value(cx + cut_w // 2, 0, width)
  kept = 1.0 - tf.cast((bottom - top) * (right - left), tf.float32) / (
      height * width)
  return tf.stack([top, left, bottom, right]), kept


def cutmix(batch: dict[str, tf.Tensor], seed: tf.Tensor, alpha: float,
           num_classes: int) -> dict[str, tf.Tensor]:
  """Pastes a box of the next example into each one; adds ``label_probs``.

  One box per batch (the reference draws one per batch too). The labels mix
  by the box's exact area: ``kept * y + (1 - kept) * y_next``; existing
  ``label_probs`` (after mixup) are mixed instead of one-hot labels.
  """
  images = batch['image']
  height, width = images.shape[1], images.shape[2]
  box, kept = cutmix_box(seed, height, width, alpha)
  rows = tf.range(height)[:, None]
  cols = tf.range(width)[None, :]
  inside = ((rows >= box[0]) & (rows < box[2]) & (cols >= box[1])
            & (cols < box[3]))[None, :, :, None]
  pasted = tf.where(inside, tf.roll(images, 1, axis=0), images)
  labels = batch.get('label_probs')
  if labels is None:
    labels = tf.one_hot(batch['label'], num_classes)
  mixed = kept * labels + (1.0 - kept) * tf.roll(labels, 1, axis=0)
  return {**batch, 'image': pasted, 'label_probs': mixed}
