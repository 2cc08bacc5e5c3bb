"""The data layer: datasets -> process-local batches -> arrays on a mesh.

* `sources`: where examples come from (TFDS builders, image folders), split
  slices and the transfer-set filters.
* `preprocess`: decoding, augmentation, normalisation and mixup (TF ops on
  batches) and their constants.
* `augment`: strong augmentations, RandAugment with Cutout as MLKD uses it
  and CutMix (seeded TF ops on batches).
* `stream`: a run's train stream and eval passes (`get_datasets`,
  `iterate_split`) and the plug-ins that change a run's labels and train
  stream (`kd_jax.specialists` registers one).
* `prefetch`: host batches -> global `jax.Array`s split over the mesh.

`kd_jax.input_pipeline` is the entry point and documents the batches.
TensorFlow and TFDS take seconds to import: only a process that reads data
loads them (at the first `tf.`/`tfds.` use), not one that imports the
library.
"""

import importlib

from etils import epy


def _data_libraries_loaded(unused_module_name: str) -> None:
  """Runs when TensorFlow, TFDS or kd_jax.datasets is first used."""
  try:  # tf.data only needs the CPU; leave accelerator memory to JAX.
    importlib.import_module('tensorflow').config.set_visible_devices([], 'GPU')
  except RuntimeError:  # TF already initialised its devices.
    pass
  importlib.import_module('kd_jax.datasets')  # Registers mnist5k and digits.


with epy.lazy_imports(success_callback=_data_libraries_loaded):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  from kd_jax import datasets as kd_datasets  # pylint: disable=g-import-not-at-top
