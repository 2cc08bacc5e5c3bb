"""`fashion_mnist`: TFDS's Fashion-MNIST, downloaded by TFDS."""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name='fashion_mnist', normalization=((0.2860,), (0.3530,))))
