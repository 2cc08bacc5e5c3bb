"""kd_jax.data.augment: each RandAugment op against the PIL call the MLKD
authors make, the whole op chain with Cutout against PIL applied with the
drawn choices, determinism from the seed, and CutMix against the reference
rand_bbox rule."""

import numpy as np
import pytest

from kd_jax.data import augment
from kd_jax.data import tf

Image = pytest.importorskip('PIL.Image')
ImageDraw = pytest.importorskip('PIL.ImageDraw')
ImageEnhance = pytest.importorskip('PIL.ImageEnhance')
ImageOps = pytest.importorskip('PIL.ImageOps')


def _pil_ops():
  """The authors' augment_list ops (mdistiller/dataset/cifar100.py)."""
  affine = lambda im, data: im.transform(im.size, Image.AFFINE, data)
  return {
      'auto_contrast': lambda im, v: ImageOps.autocontrast(im),
      'brightness': lambda im, v: ImageEnhance.Brightness(im).enhance(v),
      'color': lambda im, v: ImageEnhance.Color(im).enhance(v),
      'contrast': lambda im, v: ImageEnhance.Contrast(im).enhance(v),
      'equalize': lambda im, v: ImageOps.equalize(im),
      'identity': lambda im, v: im,
      'posterize': lambda im, v: ImageOps.posterize(im, max(1, int(v))),
      'rotate': lambda im, v: im.rotate(v),
      'sharpness': lambda im, v: ImageEnhance.Sharpness(im).enhance(v),
      'shear_x': lambda im, v: affine(im, (1, v, 0, 0, 1, 0)),
      'shear_y': lambda im, v: affine(im, (1, 0, 0, v, 1, 0)),
      'solarize': lambda im, v: ImageOps.solarize(im, v),
      'translate_x': lambda im, v: affine(im, (1, 0, v * im.size[0], 0, 1, 0)),
      'translate_y': lambda im, v: affine(im, (1, 0, 0, 0, 1, v * im.size[1])),
  }


def images_like_photos(batch, size=32, channels=3, seed=0):
  """Smooth images with varied ranges, so that histograms are uneven and the
  contrast ops have work to do."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, (batch, size // 4, size // 4, channels))
  smooth = np.repeat(np.repeat(coarse, 4, axis=1), 4, axis=2)
  noise = rng.normal(0, 0.05, smooth.shape)
  low = rng.uniform(0, 120, (batch, 1, 1, 1))
  high = rng.uniform(140, 255, (batch, 1, 1, 1))
  return np.clip(low + (high - low) * (smooth + noise), 0, 255).astype(
      np.uint8)


def to_pil(image):
  return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def from_pil(image, channels):
  array = np.asarray(image)
  return array[..., None] if channels == 1 else array


# Rotation: PIL samples through 16.16 fixed point, exact elsewhere.
MISMATCH_ALLOWED = {'rotate': 2e-3}


@pytest.mark.parametrize('channels', [3, 1])
@pytest.mark.parametrize('name', augment.OP_NAMES)
def test_each_op_matches_the_authors_pil_call(name, channels):
  images = images_like_photos(6, channels=channels, seed=len(name))
  low, high = [(lo, hi) for n, lo, hi in augment.RAND_AUGMENT_OPS
               if n == name][0]
  values = (low + (high - low) * np.random.default_rng(1).random(6)).astype(
      np.float32)
  got = augment.apply_op(tf.constant(images), name, tf.constant(values))
  want = np.stack([from_pil(_pil_ops()[name](to_pil(im), float(v)), channels)
                   for im, v in zip(images, values)])
  mismatched = np.mean(got.numpy() != want)
  assert mismatched <= MISMATCH_ALLOWED.get(name, 0.0), mismatched


def test_rand_augment_equals_pil_applied_with_the_drawn_choices():
  images = images_like_photos(16, seed=3)
  params = augment.rand_augment_params(tf.constant([3, 4]), 16, 32, 32)
  got = augment.apply_rand_augment(tf.constant(images), params).numpy()
  assert got.dtype == np.uint8
  ops, values = params['ops'].numpy(), params['values'].numpy()
  pil_ops = _pil_ops()
  for b, image in enumerate(images):
    pil = to_pil(image)
    for step in range(ops.shape[0]):
      pil = pil_ops[augment.OP_NAMES[ops[step, b]]](pil, float(values[step,
                                                                      b]))
    top, left, bottom, right = params['cutout'][b].numpy()
    if bottom >= top:
      pil = pil.copy()
      ImageDraw.Draw(pil).rectangle((left, top, right, bottom),
                                    augment.CUTOUT_FILL)
    assert np.mean(got[b] != np.asarray(pil)) <= 2e-3


def test_same_seed_same_images_other_seed_other_images():
  images = tf.constant(images_like_photos(8, seed=4))
  first = augment.rand_augment(images, tf.constant([0, 1]))
  again = augment.rand_augment(images, tf.constant([0, 1]))
  other = augment.rand_augment(images, tf.constant([0, 2]))
  np.testing.assert_array_equal(first, again)
  assert np.any(first.numpy() != other.numpy())


def test_each_example_draws_its_own_choices():
  same = np.repeat(images_like_photos(1, seed=5), 8, axis=0)
  out = augment.rand_augment(tf.constant(same), tf.constant([5, 6])).numpy()
  assert len({o.tobytes() for o in out}) == 8
  params = augment.rand_augment_params(tf.constant([7, 8]), 2800, 32, 32)
  counts = np.bincount(params['ops'].numpy().ravel(),
                       minlength=len(augment.OP_NAMES))
  # 5600 draws over 14 ops: 400 expected each, sd about 19.
  assert counts.min() > 320 and counts.max() < 480
  values = params['values'].numpy()
  for index, (_, low, high) in enumerate(augment.RAND_AUGMENT_OPS):
    drawn = values[params['ops'].numpy() == index]
    assert drawn.min() >= low and drawn.max() < high
    assert drawn.max() - drawn.min() > 0.9 * (high - low)


def test_cutout_follows_the_authors_rule():
  params = augment.rand_augment_params(tf.constant([9, 9]), 4000, 32, 32)
  top, left, bottom, right = params['cutout'].numpy().T
  drawn = bottom >= top
  assert drawn.all()  # A side of exactly 0 has probability 0.
  side = np.maximum(bottom - top, right - left)
  assert side.max() <= 16 and side.min() >= 0
  assert (top >= 0).all() and (left >= 0).all()
  assert (bottom <= 32).all() and (right <= 32).all()
  none = augment.rand_augment_params(tf.constant([9, 9]), 5, 32, 32,
                                     max_cutout=0.0)['cutout'].numpy()
  assert (none[:, 2] < none[:, 0]).all()


def test_zero_ops_without_cutout_is_the_identity():
  images = images_like_photos(3, seed=6)
  out = augment.rand_augment(tf.constant(images), tf.constant([1, 1]),
                             num_ops=0, max_cutout=0.0)
  np.testing.assert_array_equal(out, images)


@pytest.mark.slow  # Traces every augmentation in a tf.function.
def test_runs_in_a_graph_with_an_unknown_batch_size():
  spec = tf.TensorSpec([None, 16, 16, 3], tf.uint8)
  run = tf.function(lambda x: augment.rand_augment(x, tf.constant([2, 3])),
                    input_signature=[spec])
  images = tf.constant(images_like_photos(3, size=16, seed=7))
  np.testing.assert_array_equal(
      run(images), augment.rand_augment(images, tf.constant([2, 3])))


def test_grayscale_cutout_uses_the_fill_luma():
  images = np.zeros((2, 8, 8, 1), np.uint8)
  params = {'ops': tf.zeros([0, 2], tf.int32),
            'values': tf.zeros([0, 2]),
            'cutout': tf.constant([[1, 2, 3, 4], [0, 0, -1, 0]])}
  out = augment.apply_rand_augment(tf.constant(images), params).numpy()
  assert (out[0, 1:4, 2:5] == 123).all() and out[0].sum() == 123 * 9
  assert out[1].sum() == 0


# ----------------------------------------------------------------------------
# CutMix.
# ----------------------------------------------------------------------------


def test_cutmix_pastes_the_next_example_and_mixes_labels_by_area():
  images = tf.constant(images_like_photos(6, seed=8))
  labels = tf.constant([0, 1, 2, 3, 4, 5])
  batch = {'image': images, 'label': labels}
  for seed in range(8):
    out = augment.cutmix(batch, tf.constant([seed, 1]), alpha=1.0,
                         num_classes=6)
    box, kept = augment.cutmix_box(tf.constant([seed, 1]), 32, 32, 1.0)
    top, left, bottom, right = box.numpy()
    inside = np.zeros((32, 32), bool)
    inside[top:bottom, left:right] = True
    rolled = np.roll(images.numpy(), 1, axis=0)
    np.testing.assert_array_equal(out['image'].numpy()[:, inside],
                                  rolled[:, inside])
    np.testing.assert_array_equal(out['image'].numpy()[:, ~inside],
                                  images.numpy()[:, ~inside])
    np.testing.assert_allclose(kept, 1 - inside.mean(), rtol=1e-6)
    probs = out['label_probs'].numpy()
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.diag(probs), kept, rtol=1e-6)


def test_cutmix_box_follows_rand_bbox():
  # rand_bbox: sides int(W sqrt(1 - lam)), edges centre -+ side // 2,
  # clipped; so an unclipped box's side is even and at most the image's.
  sides = []
  for seed in range(60):
    box, _ = augment.cutmix_box(tf.constant([seed, 2]), 32, 32, 1.0)
    top, left, bottom, right = box.numpy()
    assert 0 <= top <= bottom <= 32 and 0 <= left <= right <= 32
    if 0 < top and bottom < 32:
      sides.append(bottom - top)
  assert sides and all(s % 2 == 0 for s in sides)
  with pytest.raises(ValueError, match='alpha'):
    augment.cutmix_box(tf.constant([0, 0]), 32, 32, 0.0)
