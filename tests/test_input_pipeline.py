"""The input pipeline: batches, sharding, padding, transfer sets, augmenting."""

import itertools
import os
import socket

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax import config_lib
from kd_jax import input_pipeline

DIGITS_TRAIN, DIGITS_TEST = 1437, 360
DIGITS_TRAIN_PER_CLASS = (142, 146, 141, 147, 145, 146, 145, 143, 138, 144)


def make_config(data_dir, dataset='digits', **fields):
  config = config_lib.default_config()
  config.data_dir = data_dir
  config.dataset = dataset
  config.batch_size = 64
  config.eval_batch_size = 64
  for key, value in fields.items():
    setattr(config, key, value)
  return config


def take(iterator, n):
  return list(itertools.islice(iterator, n))


def valid_ids(batches):
  return [i for b in batches for i, m in zip(b['id'], b['mask']) if m]


def raw_pixels(image, dataset):
  """Undoes the normalisation: pixel values in [0, 255]."""
  mean, std = (np.array(v) for v in
               input_pipeline.DATASETS.get(dataset, 'test').normalization)
  return (image * std + mean) * 255


# --- Batch contents and determinism -----------------------------------------


def test_train_batches_hold_normalised_images_labels_ids_and_mask(data_dir):
  data = input_pipeline.get_datasets(make_config(data_dir), num_devices=8)
  batch = next(data.train)
  assert sorted(batch) == ['id', 'image', 'index', 'label', 'mask']
  assert batch['index'].dtype == np.int32
  assert batch['image'].shape == (64, 8, 8, 1)
  assert batch['image'].dtype == np.float32
  assert batch['label'].dtype == np.int32
  assert batch['mask'].dtype == bool and batch['mask'].all()
  assert all(isinstance(i, bytes) and i.startswith(b'digits/')
             for i in batch['id'])
  pixels = raw_pixels(batch['image'], 'digits')
  np.testing.assert_allclose(pixels, np.round(pixels), atol=1e-3)
  assert pixels.min() > -1e-3 and pixels.max() < 255 + 1e-3
  assert data.info == input_pipeline.DatasetInfo(
      name='digits', num_classes=10, class_names=tuple('0123456789'),
      image_shape=(8, 8, 1), num_train_examples=DIGITS_TRAIN,
      num_eval_examples={'test': DIGITS_TEST})


def test_mnist5k_normalisation_gives_zero_mean_unit_variance(data_dir):
  config = make_config(data_dir, 'mnist5k', eval_batch_size=1000)
  batch, = input_pipeline.iterate_split(config, 'test', num_devices=8)
  images = batch['image'][batch['mask']]
  assert len(images) == 1000
  assert abs(images.mean()) < 0.03 and abs(images.std() - 1) < 0.03


def test_one_epoch_visits_every_train_example_once(data_dir):
  config = make_config(data_dir, batch_size=479)  # 3 * 479 = 1437.
  data = input_pipeline.get_datasets(config, num_devices=1)
  epoch1, epoch2 = take(data.train, 3), take(data.train, 3)
  for epoch in epoch1, epoch2:
    ids = valid_ids(epoch)
    assert len(ids) == len(set(ids)) == DIGITS_TRAIN
  assert valid_ids(epoch1) != valid_ids(epoch2)  # Reshuffled per epoch.


def test_same_seed_same_batches_other_seed_other_batches(data_dir):
  config = make_config(data_dir, augment='mnist_jitter')
  first = take(input_pipeline.get_datasets(config, num_devices=8).train, 3)
  again = take(input_pipeline.get_datasets(config, num_devices=8).train, 3)
  config.seed = 1
  other = take(input_pipeline.get_datasets(config, num_devices=8).train, 3)
  for a, b, c in zip(first, again, other):
    np.testing.assert_array_equal(a['image'], b['image'])
    np.testing.assert_array_equal(a['id'], b['id'])
    assert (a['id'] != c['id']).any()


@pytest.mark.slow  # Three streams built, RandAugment traced in each.
def test_a_strong_view_is_randaugment_of_the_same_step_and_train_only(
    data_dir):
  config = make_config(data_dir, augment='mnist_jitter')
  plain = take(input_pipeline.get_datasets(config, num_devices=8).train, 2)
  config.distill.strong_view = dict(augment='rand_augment', num_ops=2)
  data = input_pipeline.get_datasets(config, num_devices=8)
  first = take(data.train, 2)
  again = take(input_pipeline.get_datasets(config, num_devices=8, start_step=1
                                           ).train, 1)
  for a, b in zip(plain, first):  # The weak view is unchanged.
    np.testing.assert_array_equal(a['image'], b['image'])
  strong = raw_pixels(first[1]['image_strong'], 'digits')
  np.testing.assert_allclose(strong, np.round(strong), atol=1e-3)
  assert strong.min() > -1e-3 and strong.max() < 255 + 1e-3
  assert not np.allclose(first[1]['image_strong'], first[1]['image'])
  # A resumed stream draws the same strong view of the same step.
  np.testing.assert_array_equal(again[0]['image_strong'],
                                first[1]['image_strong'])
  batch = next(data.eval['test']())
  assert 'image_strong' not in batch


@pytest.mark.parametrize('augment, mixup_alpha', [('none', 0.0),
                                                  ('mnist_jitter', 0.5)])
def test_resumed_stream_continues_where_it_stopped(data_dir, augment,
                                                   mixup_alpha):
  config = make_config(data_dir, augment=augment, mixup_alpha=mixup_alpha)
  start = 30  # 22.5 steps per epoch: resumes inside the second epoch.
  full = take(input_pipeline.get_datasets(config, num_devices=8).train,
              start + 3)
  resumed = take(input_pipeline.get_datasets(
      config, start_step=start, num_devices=8).train, 3)
  for expected, got in zip(full[start:], resumed):
    assert sorted(got) == sorted(expected)
    for key in expected:
      np.testing.assert_array_equal(got[key], expected[key])


# --- Eval padding and host sharding -------------------------------------------


def _eval_passes(config, split, num_devices, process_count):
  passes = []
  for index in range(process_count):
    data = input_pipeline.get_datasets(
        config, num_devices=num_devices, process_index=index,
        process_count=process_count)
    passes.append(list(data.eval[split]()))
  return passes


@pytest.mark.parametrize('num_devices, process_count, eval_batch_size',
                         [(1, 1, 64), (8, 1, 64), (8, 2, 64), (8, 2, 512)])
def test_eval_counts_every_example_once(data_dir, num_devices, process_count,
                                        eval_batch_size):
  config = make_config(data_dir, eval_batch_size=eval_batch_size)
  passes = _eval_passes(config, 'test', num_devices, process_count)
  assert len({len(p) for p in passes}) == 1  # Same batch count everywhere.
  local = eval_batch_size // process_count
  assert all(b['image'].shape[0] == local for p in passes for b in p)
  ids = [i for p in passes for i in valid_ids(p)]
  assert len(ids) == len(set(ids)) == DIGITS_TEST
  # A second pass from the same factory gives the same examples.
  data = input_pipeline.get_datasets(config, num_devices=num_devices,
                                     process_count=process_count,
                                     process_index=0)
  assert valid_ids(data.eval['test']()) == valid_ids(passes[0])


def test_padding_rows_are_masked_blank_examples(data_dir):
  batches = input_pipeline.iterate_split(make_config(data_dir), 'test',
                                         num_devices=8)
  last = list(batches)[-1]
  assert last['mask'].sum() == DIGITS_TEST % 64
  assert (last['id'][~last['mask']] == b'').all()
  assert (last['label'][~last['mask']] == 0).all()


def test_two_processes_read_disjoint_halves_of_the_train_split(data_dir):
  config = make_config(data_dir)
  shares = []
  for index in range(2):
    batches = list(input_pipeline.iterate_split(
        config, 'train', num_devices=8, process_index=index, process_count=2))
    shares.append(set(valid_ids(batches)))
    data = input_pipeline.get_datasets(config, num_devices=8,
                                       process_index=index, process_count=2)
    assert data.info.num_train_examples == DIGITS_TRAIN
    drawn = valid_ids(take(data.train, 12))  # 12 * 32 < 718: one share.
    assert set(drawn) <= shares[index]
  assert not shares[0] & shares[1]
  assert len(shares[0] | shares[1]) == DIGITS_TRAIN
  assert abs(len(shares[0]) - len(shares[1])) <= 1


def test_prefetch_to_mesh_shards_numeric_fields_and_keeps_ids_on_host(
    data_dir):
  mesh = jax.make_mesh((8,), ('data',))
  batches = take(input_pipeline.get_datasets(
      make_config(data_dir, mixup_alpha=0.2), num_devices=8).train, 3)
  moved = list(input_pipeline.prefetch_to_mesh(iter(batches), mesh, size=2))
  assert len(moved) == 3
  for host, device in zip(batches, moved):
    for key in ('image', 'label', 'mask', 'label_probs'):
      assert isinstance(device[key], jax.Array)
      assert device[key].sharding.spec == jax.sharding.PartitionSpec('data')
      assert len(device[key].addressable_shards) == 8
      np.testing.assert_array_equal(np.asarray(device[key]), host[key])
    assert isinstance(device['id'], np.ndarray)
    np.testing.assert_array_equal(device['id'], host['id'])


# --- Transfer sets ------------------------------------------------------------


def test_omitting_a_class_removes_it_from_train_only(data_dir):
  # 1437 - 147 threes = 1290 train examples; one batch of 8 * 161 = 1288.
  config = make_config(data_dir, batch_size=1288)
  config.transfer.omit_classes = (3,)
  data = input_pipeline.get_datasets(config, num_devices=8)
  threes = DIGITS_TRAIN_PER_CLASS[3]
  assert data.info.num_train_examples == DIGITS_TRAIN - threes
  batch = next(data.train)
  assert 3 not in batch['label']
  eval_labels = np.concatenate([b['label'][b['mask']]
                                for b in data.eval['test']()])
  assert len(eval_labels) == DIGITS_TEST and (eval_labels == 3).sum() == 36


def test_keep_classes_by_name_keeps_only_those(data_dir):
  config = make_config(data_dir)
  config.transfer.keep_classes = ('0', '1')
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.num_train_examples == sum(DIGITS_TRAIN_PER_CLASS[:2])
  labels = np.concatenate([b['label'] for b in take(data.train, 10)])
  assert set(labels) == {0, 1}
  exported = list(input_pipeline.iterate_split(config, 'train', num_devices=8))
  assert len(valid_ids(exported)) == sum(DIGITS_TRAIN_PER_CLASS[:2])


def test_fraction_keeps_a_fixed_subset_of_the_train_split(data_dir):
  config = make_config(data_dir, 'mnist5k')
  config.transfer.fraction = 0.03
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.num_train_examples == 120
  assert data.info.num_eval_examples == {'test': 1000}
  subset = valid_ids(input_pipeline.iterate_split(config, 'train',
                                                  num_devices=8))
  assert len(set(subset)) == 120
  again = valid_ids(input_pipeline.iterate_split(config, 'train',
                                                 num_devices=8))
  assert again == subset
  drawn = valid_ids(take(data.train, 6))
  assert set(drawn) <= set(subset)
  assert len(set(drawn)) == 120  # 6 * 64 > 120: the whole subset cycles.
  config.transfer.omit_classes = (3,)
  labels = np.concatenate([b['label'][b['mask']] for b in
                           input_pipeline.iterate_split(config, 'train',
                                                        num_devices=8)])
  assert 3 not in labels and 0 < len(labels) < 120


# --- Augmentation and mixup ---------------------------------------------------


def _shifts(image, max_shift, flips=(False,)):
  """All images reachable by shifting `image` (zero fill) and maybe flipping."""
  height, width = image.shape[:2]
  padded = np.pad(image, [(max_shift, max_shift), (max_shift, max_shift),
                          (0, 0)])
  for dy, dx in itertools.product(range(2 * max_shift + 1), repeat=2):
    shifted = padded[dy:dy + height, dx:dx + width]
    for flip in flips:
      move = (dy - max_shift, dx - max_shift, flip)
      yield move, shifted[:, ::-1] if flip else shifted


@pytest.mark.parametrize('augment, max_shift, flips, fields', [
    ('mnist_jitter', 2, (False,), {}),
    ('cifar', 4, (False, True), dict(image_size=(32, 32), channels=3)),
])
def test_augmentation_shifts_and_flips_within_its_range(
    data_dir, augment, max_shift, flips, fields):
  config = make_config(data_dir, 'mnist5k', augment=augment, **fields)
  plain, = take(input_pipeline.iterate_split(config, 'test', num_devices=8), 1)
  augmented, = take(input_pipeline.iterate_split(config, 'test', augment=True,
                                                 num_devices=8), 1)
  np.testing.assert_array_equal(plain['id'], augmented['id'])
  before = np.round(raw_pixels(plain['image'], 'mnist5k'))
  after = np.round(raw_pixels(augmented['image'], 'mnist5k'))
  moves = []
  for x, y in zip(before, after):
    found = [move for move, candidate in _shifts(x, max_shift, flips)
             if np.abs(candidate - y).max() < 1e-3]
    assert found, 'an augmented image is no shift of its original'
    moves.append(found[0])
  assert len(set(moves)) > 5  # Images are shifted differently.


def test_imagenet_augmentation_crops_and_keeps_the_shape(data_dir):
  config = make_config(data_dir, 'mnist5k', augment='imagenet')
  plain, = take(input_pipeline.iterate_split(config, 'test', num_devices=8), 1)
  first, = take(input_pipeline.iterate_split(config, 'test', augment=True,
                                             num_devices=8), 1)
  again, = take(input_pipeline.iterate_split(config, 'test', augment=True,
                                             num_devices=8), 1)
  assert first['image'].shape == plain['image'].shape
  assert np.isfinite(first['image']).all()
  np.testing.assert_array_equal(first['image'], again['image'])
  changed = np.abs(first['image'] - plain['image']).max(axis=(1, 2, 3)) > 0.1
  assert changed.mean() > 0.9


def test_mixup_mixes_neighbours_with_one_weight_and_soft_labels(data_dir):
  config = make_config(data_dir, augment='mnist_jitter')
  plain = next(input_pipeline.get_datasets(config, num_devices=8).train)
  config.mixup_alpha = 0.4
  mixed = next(input_pipeline.get_datasets(config, num_devices=8).train)
  np.testing.assert_array_equal(mixed['id'], plain['id'])
  np.testing.assert_array_equal(mixed['label'], plain['label'])
  probs = mixed['label_probs']
  assert probs.shape == (64, 10) and probs.dtype == np.float32
  np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-6)
  differs = plain['label'] != np.roll(plain['label'], 1)
  weight = probs[differs, plain['label'][differs]]
  np.testing.assert_allclose(weight, weight[0], rtol=1e-6)
  assert 0.5 <= weight[0] <= 1.0
  np.testing.assert_allclose(
      mixed['image'],
      weight[0] * plain['image'] + (1 - weight[0]) * np.roll(
          plain['image'], 1, axis=0), atol=1e-5)


# --- Image folders ------------------------------------------------------------

FOLDER_FILES = {  # split -> class -> [(file name, height, width, channels)].
    'train': {'NORMAL': [(f'n{i}.png', 20, 24, 1) for i in range(5)] +
                        [('n5.jpg', 16, 16, 3)],
              'PNEUMONIA': [(f'p{i}.png', 30, 18, 1) for i in range(4)]},
    'val': {'NORMAL': [('n0.png', 20, 24, 1)],
            'PNEUMONIA': [('p0.png', 20, 24, 1), ('p1.jpeg', 20, 24, 3)]},
    'test': {'NORMAL': [(f'n{i}.png', 20, 24, 1) for i in range(3)],
             'PNEUMONIA': [(f'p{i}.png', 20, 24, 1) for i in range(3)]},
}
CLASS_PIXEL = {'NORMAL': 40, 'PNEUMONIA': 200}


def write_image_folder(root):
  for split, classes in FOLDER_FILES.items():
    for cls, files in classes.items():
      os.makedirs(os.path.join(root, split, cls))
      for name, height, width, channels in files:
        image = tf.fill([height, width, channels],
                        tf.constant(CLASS_PIXEL[cls], tf.uint8))
        encode = tf.io.encode_png if name.endswith('png') else tf.io.encode_jpeg
        tf.io.write_file(os.path.join(root, split, cls, name), encode(image))
  return root


@pytest.fixture(scope='module')
def xray_folder(tmp_path_factory):
  return write_image_folder(str(tmp_path_factory.mktemp('xrays')))


def folder_config(root, **fields):
  config = make_config(None, 'image_folder', image_folder=root, batch_size=8,
                       eval_batch_size=8, eval_splits=('val', 'test'))
  for key, value in fields.items():
    setattr(config, key, value)
  return config


def test_image_folder_keeps_class_names_paths_and_pixels(xray_folder):
  config = folder_config(xray_folder, image_size=(16, 16), channels=1)
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info == input_pipeline.DatasetInfo(
      name='image_folder', num_classes=2, class_names=('NORMAL', 'PNEUMONIA'),
      image_shape=(16, 16, 1), num_train_examples=10,
      num_eval_examples={'val': 3, 'test': 6})
  batches = list(input_pipeline.iterate_split(config, 'train', num_devices=8))
  ids = valid_ids(batches)
  assert sorted(i.decode() for i in ids) == sorted(
      f'train/{cls}/{name}' for cls, files in FOLDER_FILES['train'].items()
      for name, *_ in files)
  for batch in batches:
    for image, label, id_, valid in zip(batch['image'], batch['label'],
                                        batch['id'], batch['mask']):
      if valid:
        cls = id_.decode().split('/')[1]
        assert label == ('NORMAL', 'PNEUMONIA').index(cls)
        pixels = raw_pixels(image, 'image_folder')
        np.testing.assert_allclose(pixels, CLASS_PIXEL[cls], atol=2)


def test_image_folder_channels_and_default_size(xray_folder):
  rgb = input_pipeline.get_datasets(
      folder_config(xray_folder, image_size=(12, 10), channels=3),
      num_devices=8)
  assert next(rgb.train)['image'].shape == (8, 12, 10, 3)
  as_stored = input_pipeline.get_datasets(folder_config(xray_folder),
                                          num_devices=8)
  # Without config.image_size/channels: the first train file's (sorted paths).
  assert as_stored.info.image_shape == (20, 24, 1)
  assert next(as_stored.train)['image'].shape == (8, 20, 24, 1)


def test_image_folder_eval_counts_every_file_once_over_two_processes(
    xray_folder):
  config = folder_config(xray_folder, image_size=(8, 8))
  for split, size in (('val', 3), ('test', 6)):
    passes = _eval_passes(config, split, num_devices=8, process_count=2)
    assert len(passes[0]) == len(passes[1])
    ids = [i for p in passes for i in valid_ids(p)]
    assert len(ids) == len(set(ids)) == size


# --- Standard TFDS datasets (mocked) ----------------------------------------


def write_fake_metadata(data_dir, name, split_sizes):
  """What a prepared dataset's folder holds besides its records."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0)
      for s, n in split_sizes.items()]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


@pytest.mark.parametrize('name, fields, num_classes, image_shape', [
    ('mnist', {}, 10, (28, 28, 1)),
    ('cifar100', dict(label_key='coarse_label'), 20, (32, 32, 3)),
    # The other datasets and augmentations, with the slow set.
    pytest.param('fashion_mnist', dict(augment='mnist_jitter'), 10,
                 (28, 28, 1), marks=pytest.mark.slow),
    pytest.param('cifar10', dict(augment='cifar'), 10, (32, 32, 3),
                 marks=pytest.mark.slow),
    pytest.param('cifar100', dict(augment='cifar'), 100, (32, 32, 3),
                 marks=pytest.mark.slow),
    pytest.param('imagenet2012', dict(augment='imagenet',
                                      eval_splits=('validation',)),
                 1000, (224, 224, 3), marks=pytest.mark.slow),
])
def test_standard_tfds_datasets_load_through_the_same_path(
    tmp_path, name, fields, num_classes, image_shape):
  eval_split = fields.get('eval_splits', ('test',))[0]
  write_fake_metadata(str(tmp_path), name, {'train': 24, eval_split: 24})
  config = make_config(str(tmp_path), name, batch_size=16, eval_batch_size=16,
                       **fields)
  with tfds.testing.mock_data(num_examples=24, data_dir=str(tmp_path)):
    data = input_pipeline.get_datasets(config, num_devices=8)
    batch = next(data.train)
    eval_batches = list(data.eval[eval_split]())
  assert data.info.num_classes == num_classes
  assert data.info.image_shape == image_shape
  assert batch['image'].shape == (16, *image_shape)
  assert np.isfinite(batch['image']).all()
  assert ((0 <= batch['label']) & (batch['label'] < num_classes)).all()
  assert len(eval_batches) == 2
  assert sum(b['mask'].sum() for b in eval_batches) == 24


# --- Errors -------------------------------------------------------------------


def test_unknown_dataset_lists_the_known_ones(data_dir):
  with pytest.raises(ValueError,
                     match=r"config.dataset='cifar1000' names no dataset "
                     r"\(did you mean 'cifar100'\?\).*'mnist5k'"):
    input_pipeline.get_datasets(make_config(data_dir, 'cifar1000'),
                                num_devices=8)


def test_missing_tfds_dataset_offline_says_how_to_get_it(tmp_path, monkeypatch):
  def no_network(*args, **kwargs):
    raise OSError('network disabled by the test')
  monkeypatch.setattr(socket, 'create_connection', no_network)
  with pytest.raises(ValueError, match=r"(?s)'cifar10' is not prepared in .*"
                     r"tfds build cifar10.*mnist5k"):
    input_pipeline.get_datasets(make_config(str(tmp_path), 'cifar10'),
                                num_devices=8)


def test_missing_imagenet_explains_the_manual_download(tmp_path):
  with pytest.raises(ValueError, match=r'(?s)imagenet2012 is not prepared.*'
                     r'downloads/manual'):
    input_pipeline.get_datasets(make_config(str(tmp_path), 'imagenet2012'),
                                num_devices=8)


@pytest.mark.parametrize('field, value, message', [
    ('batch_size', 100, r'config.batch_size=100 does not divide over 8 devices.'
                        r'*e.g. 96 or 104'),
    ('eval_batch_size', 500, r'config.eval_batch_size=500 .*e.g. 496 or 504'),
    ('label_key', 'coarse_label',
     r"config.label_key='coarse_label'.*\['label'\]"),
    ('eval_splits', ('validation',),
     r"split 'validation'.*\['train', 'test'\]"),
    ('augment', 'autoaugment', r"config.augment='autoaugment'"),
])
def test_bad_config_fields_are_named_in_the_error(data_dir, field, value,
                                                  message):
  config = make_config(data_dir, **{field: value})
  with pytest.raises(ValueError, match=message):
    input_pipeline.get_datasets(config, num_devices=8)


@pytest.mark.parametrize('transfer, message', [
    (dict(keep_classes=(3,), omit_classes=(3,)), 'leaves no examples'),
    (dict(fraction=1e-4), 'keeps no example'),
    (dict(omit_classes=('three',)), r"has 'three'.*class name"),
])
def test_transfer_filters_that_leave_nothing_are_refused(data_dir, transfer,
                                                         message):
  config = make_config(data_dir)
  for key, value in transfer.items():
    setattr(config.transfer, key, value)
  with pytest.raises(ValueError, match=message):
    input_pipeline.get_datasets(config, num_devices=8)


def test_image_folder_errors_name_the_path(tmp_path):
  missing = str(tmp_path / 'nowhere')
  with pytest.raises(ValueError, match='config.image_folder=.*nowhere.* is '
                     'not a folder'):
    input_pipeline.get_datasets(folder_config(missing), num_devices=8)

  root = write_image_folder(str(tmp_path / 'no_val'))
  tf.io.gfile.rmtree(os.path.join(root, 'val'))
  with pytest.raises(ValueError, match=r"split 'val' .*no_val/val is not a "
                     r"folder.*\['test', 'train'\]"):
    input_pipeline.get_datasets(folder_config(root), num_devices=8)

  root = write_image_folder(str(tmp_path / 'empty_class'))
  os.makedirs(os.path.join(root, 'test', 'COVID'))
  with pytest.raises(ValueError, match='Empty class folder .*empty_class/test/'
                     'COVID'):
    input_pipeline.get_datasets(folder_config(root), num_devices=8)

  root = write_image_folder(str(tmp_path / 'not_an_image'))
  bad = os.path.join(root, 'train', 'NORMAL', 'notes.png')
  with open(bad, 'w') as f:
    f.write('not a picture')
  with pytest.raises(ValueError, match=f'Cannot read image file {bad}'):
    input_pipeline.get_datasets(folder_config(root), num_devices=8)


def test_truncated_image_is_named_when_it_is_decoded(tmp_path):
  root = write_image_folder(str(tmp_path / 'truncated'))
  bad = os.path.join(root, 'test', 'PNEUMONIA', 'p1.png')
  with open(bad, 'rb') as f:
    head = f.read(40)  # Keeps the PNG signature, loses the pixels.
  with open(bad, 'wb') as f:
    f.write(head)
  data = input_pipeline.get_datasets(folder_config(root, image_size=(8, 8)),
                                     num_devices=8)
  with pytest.raises(ValueError, match=f'Cannot read image file {bad}'):
    list(data.eval['test']())
