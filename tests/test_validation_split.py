"""Held-out validation data: split slices like TFDS's, for TFDS and folders;
and the max-norm constraint that the teacher recipe chose on them."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kd_jax import config_lib
from kd_jax import input_pipeline
from kd_jax import optim
from kd_jax import train

DIGITS_TRAIN = 1437


def digits_config(**fields):
  config = config_lib.default_config()
  config.dataset = 'digits'
  config.batch_size = 64
  config.eval_batch_size = 64
  for key, value in fields.items():
    setattr(config, key, value)
  return config


def ids_of(batches):
  return [i for b in batches for i, m in zip(b['id'], b['mask']) if m]


@pytest.mark.parametrize('spec, expected', [
    ('train', ('train', 0, 1000)),
    ('train[:900]', ('train', 0, 900)),
    ('train[900:]', ('train', 900, 1000)),
    ('train[-100:]', ('train', 900, 1000)),
    ('train[10%:20%]', ('train', 100, 200)),
    ('train[:90%]', ('train', 0, 900)),
])
def test_split_range_reads_counts_percentages_and_negative_bounds(
    spec, expected):
  assert input_pipeline.split_range(spec, 1000) == expected


@pytest.mark.parametrize('spec', ['train[a:b]', 'train[1]', '[:5]', 'tr ain!'])
def test_malformed_split_is_refused_with_an_example(spec):
  with pytest.raises(ValueError, match=r"train\[:3600\]"):
    input_pipeline.parse_split(spec)


def test_empty_slice_is_refused_naming_the_field():
  config = digits_config(train_split='train[2000:]')
  with pytest.raises(ValueError, match='config.train_split.*selects no'):
    input_pipeline.get_datasets(config, num_devices=8)


def test_train_and_validation_slices_partition_the_train_split():
  config = digits_config(train_split='train[:1200]',
                         eval_splits=('train[1200:]', 'test'))
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.num_train_examples == 1200
  assert data.info.num_eval_examples == {'train[1200:]': DIGITS_TRAIN - 1200,
                                         'test': 360}
  train_ids = ids_of(input_pipeline.iterate_split(config, 'train[:1200]',
                                                  num_devices=8))
  val_ids = ids_of(data.eval['train[1200:]']())
  whole = ids_of(input_pipeline.iterate_split(config, 'train', num_devices=8))
  assert len(set(train_ids)) == 1200 and len(set(val_ids)) == 237
  assert not set(train_ids) & set(val_ids)
  assert set(train_ids) | set(val_ids) == set(whole)
  # The slice keeps the stored order: the first 1200 of the whole split.
  assert train_ids == whole[:1200]


def test_transfer_fraction_applies_within_the_slice():
  config = digits_config(train_split='train[:1000]')
  config.transfer.fraction = 0.5
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.num_train_examples == 500
  whole = ids_of(input_pipeline.iterate_split(
      digits_config(), 'train', num_devices=8))
  kept = ids_of(input_pipeline.iterate_split(config, 'train[:1000]',
                                             num_devices=8))
  assert kept == whole[:500]


def test_slices_split_over_two_processes_cover_the_slice_once():
  config = digits_config(eval_splits=('train[1000:]',))
  ids = []
  for process in range(2):
    data = input_pipeline.get_datasets(config, num_devices=8,
                                       process_index=process, process_count=2)
    ids += ids_of(data.eval['train[1000:]']())
  assert sorted(ids) == sorted(set(ids)) and len(ids) == DIGITS_TRAIN - 1000


def test_image_folder_slices(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  for split, count in (('train', 6), ('test', 2)):
    for cls in ('a', 'b'):
      for i in range(count):
        path = tmp_path / split / cls / f'{i}.png'
        path.parent.mkdir(parents=True, exist_ok=True)
        tf.io.write_file(str(path), tf.io.encode_png(
            tf.fill([4, 4, 1], tf.constant(i * 20, tf.uint8))))
  config = digits_config(dataset='image_folder', image_folder=str(tmp_path),
                         batch_size=8, eval_batch_size=8,
                         train_split='train[:8]', eval_splits=('train[8:]',))
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.num_train_examples == 8
  assert data.info.num_eval_examples == {'train[8:]': 4}
  val = ids_of(data.eval['train[8:]']())
  train_ids = ids_of(input_pipeline.iterate_split(config, 'train[:8]',
                                                  num_devices=8))
  assert len(val) == 4 and not set(val) & set(train_ids)


def test_max_norm_projects_each_units_incoming_weights():
  rng = np.random.default_rng(0)
  params = {'dense': {'kernel': jnp.asarray(rng.normal(size=(50, 7)) * 3),
                      'bias': jnp.full((7,), 100.0)},
            'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 4, 5)))}}
  tx = optim.max_norm(2.0)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params),
                         tx.init(params), params)
  new = optax.apply_updates(params, updates)
  dense_norms = np.linalg.norm(np.asarray(new['dense']['kernel']), axis=0)
  conv_norms = np.sqrt((np.asarray(new['conv']['kernel']) ** 2).sum((0, 1, 2)))
  old_conv = np.sqrt((np.asarray(params['conv']['kernel']) ** 2).sum((0, 1, 2)))
  np.testing.assert_allclose(dense_norms, 2.0, rtol=1e-5)  # All were > 2.
  np.testing.assert_allclose(conv_norms, np.minimum(old_conv, 2.0), rtol=1e-5)
  np.testing.assert_array_equal(new['dense']['bias'], params['dense']['bias'])
  # Directions are kept: the projection only rescales.
  cos = np.sum(np.asarray(new['dense']['kernel']) *
               np.asarray(params['dense']['kernel']), 0) / (
                   dense_norms * np.linalg.norm(
                       np.asarray(params['dense']['kernel']), axis=0))
  np.testing.assert_allclose(cos, 1.0, rtol=1e-5)


def test_config_max_norm_bounds_the_weights_after_sgd_steps():
  config = config_lib.default_config()
  config.learning_rate = 5.0
  config.max_norm = 0.5
  tx, _ = train.make_optimizer(config, total_steps=10)
  params = {'kernel': jnp.ones((4, 3)) * 0.1}
  state = tx.init(params)
  for _ in range(3):
    grads = {'kernel': -jnp.ones((4, 3))}
    updates, state = tx.update(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert np.linalg.norm(np.asarray(params['kernel']), axis=0).max() <= 0.5 + 1e-6
  config.max_norm = -1.0
  with pytest.raises(ValueError, match='config.max_norm'):
    train.make_optimizer(config, total_steps=10)
