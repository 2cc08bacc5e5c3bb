"""`digits`: scikit-learn's bundled 8x8 handwritten digits, usable offline.

scikit-learn ships the UCI optical-recognition digits test set
(`sklearn.datasets.load_digits()`, 1,797 images of 8x8 pixels with values
0..16, 174 to 183 per class). This builder stores them as uint8 images
(`round(value * 255 / 16)`) with a fixed split:

* `test`: the last 36 images of each class in scikit-learn's order (360,
  class-balanced).
* `train`: the other 1,437 images (138 to 147 per class).

Features: `image` uint8 [8, 8, 1], `label` (10 classes), and `id`, the source
row, e.g. `'digits/0042'`. Preparing it reads only the installed
scikit-learn package, never the network.
"""

from __future__ import annotations

from collections.abc import Iterator

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kd_jax.data import sources

from kd_jax.datasets.mnist5k import hold_out_last_per_class

NUM_TEST_PER_CLASS = 36

_CITATION = """\
@misc{alpaydin1998optical,
  title={Optical Recognition of Handwritten Digits},
  author={Alpaydin, E. and Kaynak, C.},
  howpublished={UCI Machine Learning Repository},
  year={1998}, doi={10.24432/C50P49}
}"""


class Digits(tfds.core.GeneratorBasedBuilder):
  """1,797 8x8 digits bundled with scikit-learn: 1,437 train / 360 test."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: last 36 per class are test.'}

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
            'image': tfds.features.Image(shape=(8, 8, 1)),
            'label': tfds.features.ClassLabel(num_classes=10),
            'id': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
        homepage=('https://scikit-learn.org/stable/datasets/'
                  'toy_dataset.html#digits-dataset'),
        citation=_CITATION,
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The data ship with scikit-learn: nothing to download.
    # Imported here: only preparing the dataset needs scikit-learn.
    from sklearn.datasets import load_digits
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    train, test = hold_out_last_per_class(labels, NUM_TEST_PER_CLASS)
    return {
        'train': self._generate_examples(images, labels, train),
        'test': self._generate_examples(images, labels, test),
    }

  def _generate_examples(self, images: np.ndarray, labels: np.ndarray,
                         rows: np.ndarray) -> Iterator[tuple[int, dict]]:
    for row in rows:
      yield int(row), {'image': images[row], 'label': labels[row],
                       'id': f'digits/{row:04d}'}


DATA_SOURCE = sources.register(sources.DataSource(
    name='digits', normalization=((0.3053,), (0.3759,))))
