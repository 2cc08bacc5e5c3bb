"""`mnist`: TFDS's MNIST (60,000 / 10,000 digits), downloaded by TFDS."""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name='mnist', normalization=((0.1307,), (0.3081,))))
