"""A run's data: the train stream, eval passes and the plug-ins that relabel.

`get_datasets(config)` returns the infinite, shuffled, augmented train
iterator, one-pass eval iterator factories and a `DatasetInfo`;
`iterate_split` reads one split once (e.g. to export teacher logits). The
batches are described in `kd_jax.input_pipeline`.

Plug-ins change a run's labels and its train stream without this module
knowing them: `register_plugin(factory)` adds a `factory(config, class_names)`
that returns a `Plugin` for the runs it applies to (None for others).
`kd_jax.specialists.data` registers the specialists' plug-in (one group's
labels and dustbin, a stream oversampling the group).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
import dataclasses
from typing import Any, Protocol

import jax
import numpy as np

from kd_jax.data import augment as augment_lib
from kd_jax.data import preprocess
from kd_jax.data import sources
from kd_jax.data import tf


@dataclasses.dataclass
class DatasetInfo:
  """What a model and a trainer need to know about the data.

  Attributes:
    name: config.dataset.
    num_classes: number of labels (of `config.label_key`).
    class_names: the label names, index = label.
    image_shape: (H, W, C) of batch images.
    num_train_examples: train examples after transfer filters, all processes.
    num_eval_examples: examples per eval split, all processes.
    specialist: what a plug-in records of the run (`Plugin.info`; for a
      specialist's run its index, group, group_names, dataset_class_names,
      in_group_fraction, natural_fraction and oversampling_factor), else
      None.
  """
  name: str
  num_classes: int
  class_names: tuple[str, ...]
  image_shape: tuple[int, int, int]
  num_train_examples: int
  num_eval_examples: dict[str, int]
  specialist: dict[str, Any] | None = None


@dataclasses.dataclass
class Datasets:
  """The train stream, eval iterator factories and the dataset info."""
  train: Iterator[dict[str, np.ndarray]]
  eval: dict[str, Callable[[], Iterator[dict[str, np.ndarray]]]]
  info: DatasetInfo


@dataclasses.dataclass(frozen=True)
class Topology:
  num_devices: int
  process_index: int
  process_count: int


class Plugin(Protocol):
  """Changes a run's labels and train stream (see the module docstring)."""

  class_names: tuple[str, ...]  # The run's classes.
  label_map: np.ndarray  # int [dataset classes]: dataset label -> run label.

  def train_stream(self, plan: Plan, examples: tf.data.Dataset,
                   epochs: Callable[..., Callable]) -> tf.data.Dataset:
    """The endless example stream (before batching) from `examples`, with
    `epochs(ds, stream=k)` giving seeded epochs of a sub-stream k >= 1."""

  def info(self, plan: Plan, first: int | None,
           keep: np.ndarray | None) -> dict[str, Any]:
    """What the run records of the plug-in (`DatasetInfo.specialist`)."""


_PLUGINS: list[Callable[[Any, tuple[str, ...]], Plugin | None]] = []


def register_plugin(factory: Callable[[Any, tuple[str, ...]], Plugin | None]
                    ) -> None:
  """Adds `factory(config, dataset class names) -> Plugin | None`."""
  if factory not in _PLUGINS:
    _PLUGINS.append(factory)


def _plugin(config, class_names: tuple[str, ...]) -> Plugin | None:
  found = [p for p in (f(config, class_names) for f in _PLUGINS)
           if p is not None]
  if len(found) > 1:
    raise ValueError(f'{len(found)} data plug-ins apply to this config '
                     f'({[type(p).__name__ for p in found]}); a run takes one.')
  return found[0] if found else None


def _topology(num_devices, process_index, process_count) -> Topology:
  topology = Topology(
      num_devices=jax.device_count() if num_devices is None else num_devices,
      process_index=(jax.process_index() if process_index is None
                     else process_index),
      process_count=(jax.process_count() if process_count is None
                     else process_count))
  if not 0 <= topology.process_index < topology.process_count:
    raise ValueError(f'process_index={topology.process_index} is not in '
                     f'[0, process_count={topology.process_count}).')
  if topology.num_devices % topology.process_count:
    raise ValueError(f'{topology.num_devices} devices do not split evenly '
                     f'over {topology.process_count} processes.')
  return topology


def _local_batch_size(global_batch: int, name: str,
                      topology: Topology) -> int:
  """Checks that a global batch divides over the devices; per-process size."""
  devices = topology.num_devices
  if global_batch <= 0 or global_batch % devices:
    below = max(devices, global_batch // devices * devices)
    above = (global_batch // devices + 1) * devices
    raise ValueError(
        f'{name}={global_batch} does not divide over {devices} '
        f'devices; use a multiple of {devices}, e.g. {below} or {above}.')
  return global_batch // topology.process_count


def _check_config(config) -> None:
  if config.augment not in preprocess.AUGMENTATIONS:
    raise ValueError(f'config.augment={config.augment!r}; choose one of '
                     f'{list(preprocess.AUGMENTATIONS)}.')
  if config.mixup_alpha < 0:
    raise ValueError(f'config.mixup_alpha={config.mixup_alpha}; use 0 (off) '
                     'or a positive Beta parameter, e.g. 0.2 or 1.0.')
  if isinstance(config.eval_splits, str):
    raise ValueError(f'config.eval_splits={config.eval_splits!r} must be a '
                     f'tuple of split names, e.g. ({config.eval_splits!r},).')



@dataclasses.dataclass(frozen=True)
class Plan:
  """Everything a split's pipeline needs, resolved from config and source."""
  config: Any
  source: Any
  topology: Topology
  image_shape: tuple[int, int, int]
  mean: np.ndarray
  std: np.ndarray
  plugin: Plugin | None = None

  @property
  def class_names(self) -> tuple[str, ...]:
    """The run's classes: the dataset's, or a plug-in's."""
    return (self.source.class_names if self.plugin is None
            else self.plugin.class_names)

  @property
  def resize(self) -> bool:
    return tuple(self.source.stored_shape[:2]) != self.image_shape[:2]

  def seed(self, *data: int | tf.Tensor) -> tf.Tensor:
    seed = tf.constant([self.config.seed, self.topology.process_index],
                       tf.int64)
    for d in data:
      seed = tf.random.experimental.stateless_fold_in(
          seed, tf.cast(d, tf.int64))
    return seed

  def examples(self, split: str, first: int | None,
               keep: np.ndarray | None) -> tf.data.Dataset:
    """This process's examples; images decoded unless the dataset is large."""
    t = self.topology
    ds = self.source.read(split, first, t.process_index, t.process_count)
    if keep is not None:
      keep_tf = tf.constant(keep)
      ds = ds.filter(lambda ex: tf.gather(keep_tf, ex['label']))
    if not self.source.large:
      ds = ds.map(lambda ex: {**ex, 'image': preprocess.decode(
          ex['image'], self.image_shape, self.resize)},
                  num_parallel_calls=tf.data.AUTOTUNE)
      if self.config.cache:
        ds = ds.cache()
    return ds

  def decode_large(self, ds: tf.data.Dataset, start: int,
                   random_crop: bool) -> tf.data.Dataset:
    """Decodes JPEGs of a large dataset: random crops seeded by position."""
    def decode(position, ex):
      seed = self.seed(-1, position) if random_crop else None
      return {**ex, 'image': preprocess.decode_jpeg_crop(
          ex['image'], self.image_shape, seed)}
    return ds.enumerate(start).map(decode, num_parallel_calls=tf.data.AUTOTUNE)

  def finish(self, step, batch, augment: str, mixup_alpha: float,
             strong_ops: int | None = None):
    """Augments, normalises and (optionally) mixes one batch; with
    `strong_ops`, adds 'image_strong': the augmented images through
    RandAugment (`strong_ops` ops and Cutout, `kd_jax.data.augment`), drawn
    from the step's seed like every augmentation."""
    seed = self.seed(step)
    augment_seed, mixup_seed = tf.unstack(
        tf.random.experimental.stateless_split(seed, 2))
    image = preprocess.augment(batch['image'], augment, augment_seed,
                               cropped=self.source.large)
    mask = batch.get('mask', tf.ones_like(batch['label'], tf.bool))
    label = tf.cast(batch['label'], tf.int32)
    if self.plugin is not None:
      label = tf.gather(tf.constant(self.plugin.label_map), label)
    out = {'image': preprocess.normalize(image, self.mean, self.std),
           'label': label, 'id': batch['id'], 'mask': mask}
    if strong_ops is not None:
      strong_seed = tf.random.experimental.stateless_fold_in(seed, 2)
      strong = augment_lib.rand_augment(tf.round(image), strong_seed,
                                        num_ops=strong_ops)
      out['image_strong'] = preprocess.normalize(strong, self.mean, self.std)
    if 'index' in batch:
      out['index'] = batch['index']
    if mixup_alpha > 0:
      out = preprocess.mixup(out, mixup_seed, mixup_alpha,
                             len(self.class_names))
    return out


def _with_options(ds: tf.data.Dataset) -> tf.data.Dataset:
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options)


def _train_dataset(plan: Plan, first, keep, local_batch: int,
                   local_size: int, start_step: int,
                   index_offset: int = 0) -> tf.data.Dataset:
  config = plan.config
  examples = plan.examples(config.train_split, first, keep).enumerate(
      index_offset).map(lambda i, ex: {**ex, 'index': tf.cast(i, tf.int32)})
  start = start_step * local_batch
  first_epoch, offset = divmod(start, local_size)

  def epochs(examples, stream=0):
    def epoch(e):  # A fresh, seeded order per epoch: resumable at any epoch.
      seed = (tf.cast(config.seed, tf.int64) * 1_000_003 +
              plan.topology.process_index) * 1_000_003 + e
      if stream:  # A plug-in's sub-stream.
        seed = seed * 7 + stream
      return examples.shuffle(max(1, config.shuffle_buffer), seed=seed,
                              reshuffle_each_iteration=False)
    return epoch

  if plan.plugin is None:
    ds = tf.data.Dataset.range(first_epoch, 2**62).flat_map(
        epochs(examples)).skip(offset)
  else:
    ds = plan.plugin.train_stream(plan, examples, epochs).skip(start)
  if plan.source.large:
    ds = plan.decode_large(ds, start, random_crop=config.augment == 'imagenet')
  ds = ds.batch(local_batch, drop_remainder=True).enumerate(start_step)
  strong = config.distill.get('strong_view') or {}
  strong_ops = int(strong.get('num_ops', 2)) if strong else None
  ds = ds.map(lambda step, batch: plan.finish(
      step, batch, config.augment, config.mixup_alpha, strong_ops),
              num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _pad_batch(batch: dict[str, tf.Tensor], size: int) -> dict[str, tf.Tensor]:
  """Pads a (last, short) batch to `size` rows; `mask` marks the real ones."""
  count = tf.shape(batch['label'])[0]
  pad = lambda x: tf.pad(x, [[0, size - count]] + [[0, 0]] * (x.shape.rank - 1))
  return {**tf.nest.map_structure(pad, batch),
          'mask': tf.range(size) < count}


def _padded_dataset(plan: Plan, split: str, first, keep, local_batch: int,
                    sizes: list[int], augment: str) -> tf.data.Dataset:
  """One pass over this process's share, padded to the batch count of all."""
  examples = plan.examples(split, first, keep)
  if plan.source.large:
    examples = plan.decode_large(examples, 0, random_crop=augment == 'imagenet')
  ds = examples.batch(local_batch).map(
      lambda batch: _pad_batch(batch, local_batch))
  num_batches = max(1, -(-max(sizes) // local_batch))
  missing = max(0, num_batches -
                -(-sizes[plan.topology.process_index] // local_batch))
  blank = tf.nest.map_structure(
      lambda spec: tf.zeros([local_batch, *spec.shape[1:]], spec.dtype),
      ds.element_spec)
  ds = ds.concatenate(tf.data.Dataset.from_tensors(blank).repeat(missing))
  ds = ds.enumerate().map(lambda step, batch: plan.finish(step, batch, augment,
                                                          0.0),
                          num_parallel_calls=tf.data.AUTOTUNE)
  return _with_options(ds.prefetch(tf.data.AUTOTUNE))


def _numpy_batches(ds: tf.data.Dataset, source, split: str,
                   expected: int | None = None
                   ) -> Iterator[dict[str, np.ndarray]]:
  """Iterates ds as numpy; decode failures become errors naming the file."""
  iterator = ds.as_numpy_iterator()
  seen = 0
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      break
    except tf.errors.InvalidArgumentError as e:
      raise source.decode_error(split, e) from e
    seen += int(batch['mask'].sum())
    yield batch
  if expected is not None and seen != expected:
    raise RuntimeError(f'Split {split!r} gave {seen} examples on this process; '
                       f'its size says {expected}.')


def _plan(config, topology: Topology, extra_split: str | None = None) -> Plan:
  _check_config(config)
  source = sources.make_source(config, extra_split)
  shape = sources.image_shape(config, source)
  mean, std = preprocess.normalization(source.name, shape[2])
  return Plan(config=config, source=source, topology=topology,
              image_shape=shape, mean=mean, std=std,
              plugin=_plugin(config, source.class_names))


def _eval_iterator_factory(plan: Plan, split: str, first, keep,
                           local_batch: int, augment: str
                           ) -> tuple[Callable[[], Iterator], int]:
  t = plan.topology
  sizes = sources.share_sizes(plan.source, split, first, keep, t.process_count)
  ds = _padded_dataset(plan, split, first, keep, local_batch, sizes, augment)
  expected = sizes[t.process_index]
  return (lambda: _numpy_batches(ds, plan.source, split, expected),
          sum(sizes))


def get_datasets(config, *, start_step: int = 0,
                 num_devices: int | None = None,
                 process_index: int | None = None,
                 process_count: int | None = None) -> Datasets:
  """The train stream, eval iterator factories and info for a run config.

  Args:
    config: a run config (`kd_jax.config_lib.default_config()` fields).
    start_step: the train stream starts with the batch that step
      `start_step` would see in an uninterrupted run.
    num_devices: devices over which global batches are split (default: all).
    process_index: this process (default: `jax.process_index()`).
    process_count: processes reading the data (default:
      `jax.process_count()`).

  Returns:
    `Datasets`: `train` yields process-local batches of
    config.batch_size // process_count examples forever; `eval[split]()`
    starts a pass over the whole split in batches of
    config.eval_batch_size // process_count, padded (`mask` False) so that
    every process yields the same number of batches.

  Raises:
    ValueError: for a config the data cannot satisfy; the message names the
      field and what to do.
  """
  topology = _topology(num_devices, process_index, process_count)
  train_batch = _local_batch_size(config.batch_size, 'config.batch_size',
                                  topology)
  eval_batch = _local_batch_size(config.eval_batch_size,
                                 'config.eval_batch_size', topology)
  if start_step < 0:
    raise ValueError(f'start_step={start_step} must be >= 0.')
  plan = _plan(config, topology)
  first, keep = sources.transfer_subset(config, plan.source, config.train_split)
  sizes = sources.share_sizes(plan.source, config.train_split, first, keep,
                              topology.process_count)
  if not sum(sizes):
    raise ValueError(
        f'The transfer-set filter leaves no examples in split '
        f'{config.train_split!r} of {config.dataset!r}: transfer.keep_classes='
        f'{config.transfer.keep_classes}, omit_classes='
        f'{config.transfer.omit_classes}, fraction={config.transfer.fraction}.')
  local_size = sizes[topology.process_index]
  if not local_size:
    raise ValueError(
        f'Process {topology.process_index} of {topology.process_count} gets no '
        f'train example of the {sum(sizes)} left by config.transfer; raise '
        'transfer.fraction or keep more classes.')
  train = _numpy_batches(
      _train_dataset(plan, first, keep, train_batch, local_size, start_step,
                     sum(sizes[:topology.process_index])),
      plan.source, config.train_split)
  evals, eval_sizes = {}, {}
  for split in config.eval_splits:
    evals[split], eval_sizes[split] = _eval_iterator_factory(
        plan, split, None, None, eval_batch, 'none')
  info = DatasetInfo(
      name=config.dataset, num_classes=len(plan.class_names),
      class_names=plan.class_names, image_shape=plan.image_shape,
      num_train_examples=sum(sizes), num_eval_examples=eval_sizes,
      specialist=(None if plan.plugin is None
                  else plan.plugin.info(plan, first, keep)))
  return Datasets(train=train, eval=evals, info=info)


def iterate_split(config, split: str, *, augment: bool = False,
                  transfer: bool | None = None, batch_size: int | None = None,
                  num_devices: int | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` in its stored order, padded like eval batches.

  For exporting teacher logits: every example of the split (of the transfer
  set when `transfer`) appears exactly once over all processes, keyed by `id`.

  Args:
    config: a run config.
    split: the split to read, e.g. config.train_split.
    augment: apply config.augment (seeded by config.seed and batch index).
    transfer: apply config.transfer's filters; default: when `split` is
      config.train_split.
    batch_size: global batch size; default config.eval_batch_size.
    num_devices, process_index, process_count: as in `get_datasets`.

  Returns:
    An iterator of process-local batches (`image`, `label`, `id`, `mask`).
  """
  topology = _topology(num_devices, process_index, process_count)
  if batch_size is None:
    local_batch = _local_batch_size(config.eval_batch_size,
                                    'config.eval_batch_size', topology)
  else:
    local_batch = _local_batch_size(batch_size, 'batch_size', topology)
  plan = _plan(config, topology, extra_split=split)
  if transfer is None:
    transfer = split == config.train_split
  first, keep = None, None
  if transfer:
    first, keep = sources.transfer_subset(config, plan.source, split)
  make_iterator, _ = _eval_iterator_factory(
      plan, split, first, keep, local_batch,
      config.augment if augment else 'none')
  return make_iterator()
