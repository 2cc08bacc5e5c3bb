"""`cifar10`: TFDS's CIFAR-10, downloaded by TFDS."""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name='cifar10',
    normalization=((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))))
