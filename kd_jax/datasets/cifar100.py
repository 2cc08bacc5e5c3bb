"""`cifar100`: TFDS's CIFAR-100 (`config.label_key='coarse_label'` for its
20 superclasses), downloaded by TFDS."""

from kd_jax.data import sources

DATA_SOURCE = sources.register(sources.DataSource(
    name='cifar100',
    normalization=((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762))))
