r"""Exports teacher logits to a cache that `teacher_source='cache'` reads.

  python -m kd_jax.export_logits \
      --config=configs/mnist5k_distill_cached.py:teacher_workdir=workdirs/mnist5k_teacher \
      --out=workdirs/mnist5k_teacher_logits [--splits=train,test] \
      [--dtype=float16] [--top_k=3 [--temperature=20]] [--views=8]

runs the config's teachers (`config.teachers`; an ensemble is combined with
`config.distill.ensemble_method` and the teachers' weights) once over each
split and writes `OUT/<split>/`:

* `logits.npy`: [N, C] float32 (or float16 with --dtype=float16), or
  [N, V, C] with --views=V;
* with --top_k=k instead: `topk_logits.npy` [N, (V,) k] (the k largest
  logits, largest first), `topk_indices.npy` (their classes, int16) and
  `rest_mass.npy` [N, (V,)] (the softmax mass of the other classes at
  --temperature, default config.distill.temperature), which training reads
  with `losses.topk_kl_divergence`; the command prints the size against
  dense storage;
* `ids.npy`: [N] bytes, the pipeline's example ids (the lookup key);
* `labels.npy`: [N] int32;
* `logits.csv` (`id,[view,]label,<class names>`) or `topk.csv`
  (`id,[view,]label,top1_class..,top1_logit..,rest_mass`): the same numbers
  as text (--nocsv leaves it out: an ImageNet split's CSV is about 10 GB);
* `manifest.json`: teacher fingerprint, dataset, split, transfer filters,
  class names, form (dense / topk, top_k, temperature), preprocessing (image
  size, channels, augment, num_views, view_seed) and dtype, which
  `teachers.load_cache` checks against the run (`kd_jax.teachers.cache`
  owns the format).

Batches go to disk as they are computed (`cache.SplitWriter`): host memory
holds the split's ids and labels, never its logits.

On n > 1 processes (--coordinator_address, --num_processes, --process_id as
for `kd_jax.main`), each process exports its share of each split, the one
its data stream reads in training, to `OUT/<split>/shard-i-of-n/` (same
files), running the teachers split over its own devices; a run on n
processes then loads on each only its own shard (`teachers.cache_shards`):

  python -m kd_jax.export_logits --config=... --out=DIR --nocsv \
      --coordinator_address=host0:1234 --num_processes=2 --process_id=0

--views=V (train split only) runs the teachers on V augmented views of each
example: view v of example `id` is config.augment (mnist_jitter or cifar)
with its shift and flip drawn from the key (view_seed, v, id)
(`teachers.augment_views`). A run with the same config.augment trains each
example, at each appearance, on view `teachers.choose_views(id, step)` and
replays that augmentation on the un-augmented image, so the student sees the
pixels the teacher saw; the refusal of augmented streams with a single-view
cache does not apply.

The splits default to config.train_split (after config.transfer's filters)
and every eval split: a run reading the cache needs them all.

Black-box teachers (an API's outputs, logits computed elsewhere) come in as a
table and leave in the same layout:

  python -m kd_jax.export_logits --config=configs/mnist5k_distill_cached.py \
      --import_table=probs.csv --probabilities --out=DIR

The table is a CSV with a header `id,<class name>,...` (an optional `label`
column is ignored), or an `.npy` [N, C] in class-index order with
`--import_ids=ids.npy`. Probabilities become log-probabilities (a table
whose rows all look like probabilities is refused without --probabilities);
rows go to the split of the config (train split, unfiltered, and eval
splits) that holds their id. A failed import leaves no usable cache.
"""

from __future__ import annotations

import csv
import hashlib
import os
from collections.abc import Sequence
from typing import Any

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np
from jax.experimental import multihost_utils

from kd_jax import input_pipeline
from kd_jax import losses
from kd_jax import multihost
from kd_jax import progress
from kd_jax import teachers
from kd_jax.teachers import cache

DTYPES = ('float32', 'float16')
PROBABILITY_TOLERANCE = 1e-3


def _check_dtype(dtype: str) -> None:
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; choose one of {DTYPES}.')


def _check_out(out_dir: str, overwrite: bool) -> None:
  """Refuses to write over an existing cache unless asked to."""
  if not overwrite and os.path.isdir(out_dir) and os.listdir(out_dir):
    raise FileExistsError(
        f'--out={out_dir!r} already holds files (a cache that students may '
        'have trained from): pass --overwrite to replace it, or choose '
        'another --out.')


def _local_mesh() -> jax.sharding.Mesh | None:
  """This process's own devices, for a multi-process export (teachers run
  split over them); None in a single process (teachers replicated)."""
  if jax.process_count() == 1:
    return None
  return jax.make_mesh((jax.local_device_count(),), ('data',),
                       devices=jax.local_devices(),
                       axis_types=(jax.sharding.AxisType.Auto,))


def _single_process() -> dict[str, int]:
  if jax.process_count() > 1:
    raise ValueError('--import_table reads whole splits in one process; run '
                     'it with a single process.')
  return dict(num_devices=1, process_index=0, process_count=1)


def _dataset_info(config) -> input_pipeline.DatasetInfo:
  return input_pipeline.get_datasets(
      config, num_devices=1, process_index=0, process_count=1).info


def _default_splits(config) -> list[str]:
  return [config.train_split] + [s for s in config.eval_splits
                                 if s != config.train_split]


def _split_dirs(config, out_dir: str, splits, overwrite: bool,
                process_index: int | None, process_count: int | None
                ) -> tuple[dict[str, str], int, int]:
  """({split: the folder this process writes it to}, process_index,
  process_count), `out_dir` checked (by one process, before any writes)."""
  if (process_index is None) != (process_count is None):
    raise ValueError(
        f'process_index={process_index}, process_count={process_count}: '
        'give both (one shard of an export by process_count processes) or '
        'neither (this JAX process of all).')
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, '
                     f'process_count={process_count}).')
  if process_index == 0 or jax.process_count() == 1:
    _check_out(out_dir, overwrite)
  split_dirs = {}
  for split in splits or _default_splits(config):
    split_dirs[split] = os.path.join(out_dir, split)
    if process_count > 1:
      split_dirs[split] = os.path.join(
          split_dirs[split], cache.shard_name(process_index, process_count))
  if jax.process_count() > 1:  # No process writes before the check.
    multihost_utils.sync_global_devices('kd_jax.export_logits: out checked')
  return split_dirs, process_index, process_count


def export(config: ml_collections.ConfigDict, out_dir: str,
           splits: Sequence[str] | None = None,
           dtype: str = 'float32', *, views: int = 1, view_seed: int = 0,
           top_k: int | None = None, temperature: float | None = None,
           overwrite: bool = False, write_csv: bool = True,
           process_index: int | None = None, process_count: int | None = None
           ) -> dict[str, dict[str, Any]]:
  """Runs the config's teachers over `splits` and writes a logits cache.

  Args:
    config: a run config whose `teachers` are trained runs; several are
      combined by `config.distill.ensemble_method` (mean_probs or
      mean_log_probs) with their weights.
    out_dir: the cache root; each split goes to `out_dir/<split>/`.
    splits: default config.train_split and config.eval_splits.
    dtype: 'float32' or 'float16' storage of the logits.
    views: augmented views per train example (config.augment, replayed per
      example by `teachers.augment_views` from the key (view_seed, view,
      id)); eval splits keep one un-augmented view.
    view_seed: the seed of those keys.
    top_k: store only each example's k largest logits, their classes and the
      mass of the others (at `temperature`) instead of all C logits.
    temperature: where the top-k rest mass is computed; default
      config.distill.temperature (training must use the same).
    overwrite: replace an existing cache in `out_dir` (else refused); the
      old manifest of each split written goes first and the new one is
      written last, so an export cut short leaves those splits unfinished
      (refused by training), never old manifests over new arrays; a failed
      export removes the manifests it wrote.
    write_csv: also write each split as a CSV (logits.csv / topk.csv); off
      for large caches (an ImageNet split's CSV is about 10 GB).
    process_index, process_count: write the shard of process `process_index`
      of `process_count` (default: this JAX process of all): its share of
      each split, to `<split>/shard-i-of-n/`; one process writes the split
      itself.

  Returns:
    The manifest written for each split (this process's shard), plus
    'nbytes' (the teacher arrays on disk) and 'dense_nbytes' (what dense
    storage in `dtype` would take).
  """
  _check_dtype(dtype)
  split_dirs, process_index, process_count = _split_dirs(
      config, out_dir, splits, overwrite, process_index, process_count)
  if config.distill.ensemble_method == 'sum_losses' and len(
      config.teachers) > 1:
    raise ValueError(
        'config.distill.ensemble_method="sum_losses" needs each teacher\'s '
        'logits in the step, but a cache holds one set per example: export '
        'with mean_probs or mean_log_probs, or distil online.')
  if views < 1:
    raise ValueError(f'views={views}; use 1 (un-augmented) or more.')
  if views > 1 and config.augment not in cache.VIEW_AUGMENTATIONS:
    raise ValueError(
        f'views={views} needs an augmentation to draw them from, but '
        f'config.augment={config.augment!r}; set config.augment to one of '
        f'{sorted(cache.VIEW_AUGMENTATIONS)} (e.g. :augment=mnist_jitter).')
  info = _dataset_info(config)
  if top_k is not None and not 1 <= top_k <= info.num_classes:
    raise ValueError(f'top_k={top_k}; use 1 <= top_k <= {info.num_classes} '
                     f'(the classes of {info.name!r}).')
  if temperature is None:
    temperature = float(config.distill.temperature)
  teacher = teachers.load_online(
      config.teachers, info.num_classes, info.image_shape, mesh=_local_mesh(),
      normalization=teachers.online.stream_normalization(info))
  method = config.distill.ensemble_method
  weights = jnp.asarray(teacher.weights)
  fill = cache.view_fill(info.name, info.image_shape[2])

  @jax.jit
  def forward(variables, images):
    logits = teacher.forward(variables, {'image': images})
    if logits.shape[0] == 1:
      return logits[0]
    return losses.combine_teachers(logits, method, weights=weights)

  # An export cut short must leave no split whose manifest describes other
  # arrays than it holds: the old manifests go first, each new one last.
  cache.remove_manifests(list(split_dirs.values()) + (
      [os.path.join(out_dir, split) for split in split_dirs]
      if process_index == 0 else []))
  manifests = {}
  try:
    for split, directory in split_dirs.items():
      manifests[split] = _export_split(
          config, split, directory, info=info, teacher=teacher,
          forward=forward, dtype=dtype,
          views=views if split == config.train_split else 1,
          view_seed=view_seed, top_k=top_k, temperature=temperature,
          write_csv=write_csv, fill=fill, process_index=process_index,
          process_count=process_count)
  except BaseException:
    # Nothing of a failed export is usable: its finished splits too.
    cache.remove_manifests([split_dirs[split] for split in manifests])
    raise
  return manifests


def _export_split(config, split: str, directory: str, *, info, teacher,
                  forward, dtype: str, views: int, view_seed: int,
                  top_k: int | None, temperature: float, write_csv: bool,
                  fill, process_index: int, process_count: int
                  ) -> dict[str, Any]:
  """Writes one split (this process's share of it, with `views` views) to
  `directory`; its manifest, with 'nbytes' and 'dense_nbytes' (see
  `export`)."""
  writer = cache.SplitWriter(
      directory, dtype=dtype, topk=top_k is not None,
      class_names=info.class_names, write_csv=write_csv)
  try:
    for batch in input_pipeline.iterate_split(
        config, split, num_devices=process_count,
        process_index=process_index, process_count=process_count):
      mask = batch['mask']
      if views == 1:
        out = np.asarray(forward(teacher.variables, batch['image']))
      else:
        out = np.stack([np.asarray(forward(
            teacher.variables, cache.augment_views(
                batch['image'], batch['id'], np.full(len(mask), v),
                kind=config.augment, view_seed=view_seed, fill=fill)))
                        for v in range(views)], axis=1)
      out = out[mask]
      writer.add(batch['id'][mask], batch['label'][mask],
                 {'logits': out} if top_k is None else dict(zip(
                     cache.FORM_ARRAYS['topk'],
                     cache.sparsify(out, top_k, temperature))))
  except ValueError:
    writer.abort()
    raise
  manifest = cache.make_manifest(
      config, info, split, fingerprint=teacher.fingerprint,
      teacher=','.join(os.path.abspath(t.workdir) for t in config.teachers),
      num_examples=writer.num_examples, dtype=dtype, views=views,
      view_seed=view_seed, top_k=top_k, temperature=temperature)
  nbytes = writer.close(manifest)
  return dict(manifest, nbytes=nbytes,
              dense_nbytes=(writer.num_examples * views * info.num_classes
                            * np.dtype(dtype).itemsize))


def _read_csv_table(path: str, class_names: Sequence[str]
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(ids, values [N, C] in class-index order) of a CSV table; a malformed
  one is refused naming the file and the line."""
  with open(path, newline='') as f:
    lines = list(csv.reader(f))
  if not lines:
    raise ValueError(f'{path} is empty: it needs a header "id,<class name>,'
                     '..." and one row per example.')
  header, rows = lines[0], lines[1:]
  if not header or header[0] != 'id':
    raise ValueError(f'{path}: the header must start with "id", then one '
                     f'column per class; it is {header[:5]}.')
  columns = [(j, name) for j, name in enumerate(header) if j and
             name != 'label']
  names = [name for _, name in columns]
  unknown = [n for n in names if n not in class_names]
  if unknown:
    raise ValueError(f'{path}: columns {unknown} name no class of the '
                     f'dataset; its classes are {list(class_names)}.')
  if sorted(names) != sorted(class_names):
    raise ValueError(
        f'{path}: {len(names)} class columns {names} but the dataset has '
        f'{len(class_names)} classes {list(class_names)}: give one column '
        f'per class.')
  order = [columns[names.index(c)][0] for c in class_names]
  values = np.zeros((len(rows), len(class_names)), np.float64)
  for n, row in enumerate(rows):
    line = n + 2  # The header is line 1.
    if len(row) != len(header):
      raise ValueError(f'{path}, line {line}: {len(row)} values, but the '
                       f'header has {len(header)} columns.')
    for k, j in enumerate(order):
      try:
        values[n, k] = float(row[j])
      except ValueError:
        raise ValueError(f'{path}, line {line} (id {row[0]!r}), column '
                         f'{header[j]!r}: {row[j]!r} is not a number.'
                         ) from None
  ids = np.asarray([r[0].encode() for r in rows], object)
  return ids, values


def _read_npy_table(path: str, ids_path: str | None, num_classes: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  if not ids_path:
    raise ValueError(f'{path} is an .npy table: give its ids as an .npy of '
                     f'the same length (--import_ids / ids_path).')
  values = np.load(path).astype(np.float64)
  ids = np.asarray([bytes(i) if not isinstance(i, str) else i.encode()
                    for i in np.load(ids_path, allow_pickle=True)], object)
  if values.ndim != 2 or values.shape[1] != num_classes:
    raise ValueError(f'{path} has shape {values.shape}; expected [N, '
                     f'{num_classes}] (one column per class, in class-index '
                     f'order).')
  if len(ids) != len(values):
    raise ValueError(f'{ids_path} holds {len(ids)} ids but {path} '
                     f'{len(values)} rows.')
  return ids, values


def _looks_like_probabilities(values: np.ndarray) -> bool:
  """Every row in [0, 1] and summing to 1: probabilities, not logits."""
  return bool(len(values)) and bool(
      np.all((values >= 0) & (values <= 1))
      and np.all(np.abs(values.sum(axis=1) - 1.0) <= PROBABILITY_TOLERANCE))


def probabilities_to_log_probs(probs: np.ndarray, ids: np.ndarray
                               ) -> np.ndarray:
  """log p, after checking every row is a distribution (sums to 1, p >= 0)."""
  sums = probs.sum(axis=1)
  bad = np.flatnonzero((np.abs(sums - 1.0) > PROBABILITY_TOLERANCE)
                       | np.any(probs < 0, axis=1))
  if len(bad):
    i = int(bad[0])
    raise ValueError(
        f'{len(bad)} rows are not probabilities (non-negative, summing to 1 '
        f'within {PROBABILITY_TOLERANCE}); the first is row {i} (id '
        f'{ids[i]!r}), which sums to {sums[i]:.6g}. Pass logits without '
        f'--probabilities, or fix the table.')
  # A zero probability would give -inf, and NaN in the KL term.
  return np.log(np.maximum(probs, np.finfo(np.float32).tiny))


def import_blackbox(table: str, out_dir: str, config: ml_collections.ConfigDict,
                    *, probabilities: bool, ids_path: str | None = None,
                    dtype: str = 'float32', overwrite: bool = False,
                    write_csv: bool = True) -> dict[str, dict[str, Any]]:
  """Converts a black-box teacher's table into the logits-cache layout.

  Nothing is written until every row has found its split; the manifests of
  the splits in `out_dir` go first (with `overwrite`) and each new one
  last, and a failure removes the ones it wrote: a failed or interrupted
  import leaves no usable cache of its own.

  Args:
    table: a CSV (`id,<class name>,...`) or an `.npy` [N, C] of logits or
      probabilities.
    out_dir: the cache root; rows go to `out_dir/<split>/` by id.
    config: a run config; its dataset gives class names, labels and the
      splits (train split unfiltered, eval splits) that ids are matched to.
    probabilities: the table holds probabilities (stored as log-probs).
    ids_path: the ids `.npy` of an `.npy` table.
    dtype: 'float32' or 'float16' storage.
    overwrite: replace an existing cache in `out_dir` (else refused).
    write_csv: also write each split as a CSV (logits.csv / topk.csv); off
      for large caches (an ImageNet split's CSV is about 10 GB).

  Returns:
    The manifest written for each split that holds rows of the table.

  Raises:
    ValueError: a malformed table (naming the file and line), one holding
      NaN or Inf (naming the first bad id), ids in no split, or a table of
      probabilities given as logits (every row in [0, 1] summing to 1
      without `probabilities`).
  """
  _check_dtype(dtype)
  _single_process()
  _check_out(out_dir, overwrite)
  info = _dataset_info(config)
  if table.endswith('.npy'):
    ids, values = _read_npy_table(table, ids_path, info.num_classes)
  else:
    ids, values = _read_csv_table(table, info.class_names)
  cache.check_finite(values, ids, table)
  keys = [bytes(i) for i in ids]
  if len(set(keys)) != len(keys):
    raise ValueError(f'{table}: ids must be unique; '
                     f'{len(keys) - len(set(keys))} repeat.')
  if not probabilities and _looks_like_probabilities(values):
    raise ValueError(
        f'{table}: every row lies in [0, 1] and sums to 1: these look like '
        'probabilities, which would be taken as logits. Pass --probabilities '
        '(probabilities=True); if they really are logits, add a constant to '
        'every value (the softmax does not change).')
  logits = probabilities_to_log_probs(values, ids) if probabilities else values
  row_of = {k: i for i, k in enumerate(keys)}
  with open(table, 'rb') as f:
    fingerprint = hashlib.sha256(f.read()).hexdigest()[:16]

  placed, rows_of = set(), {}
  for split in _default_splits(config):
    rows, labels = [], []
    for batch in input_pipeline.iterate_split(config, split, transfer=False,
                                              **_single_process()):
      for example_id, label in zip(batch['id'][batch['mask']],
                                   batch['label'][batch['mask']]):
        row = row_of.get(bytes(example_id))
        if row is not None:
          rows.append(row)
          labels.append(label)
    if rows:
      placed.update(keys[r] for r in rows)
      rows_of[split] = (rows, labels)
  if len(placed) != len(keys):
    stray = [k.decode(errors='replace') for k in keys if k not in placed]
    raise ValueError(
        f'{table}: {len(stray)} of {len(keys)} ids are in none of the splits '
        f'{_default_splits(config)} of {info.name!r} (e.g. {stray[:5]}); ids '
        f'must be the pipeline\'s example ids, e.g. the `id` column of an '
        f'exported logits.csv.')

  cache.remove_manifests([os.path.join(out_dir, split)
                          for split in _default_splits(config)])
  manifests = {}
  try:
    for split, (rows, labels) in rows_of.items():
      manifest = cache.make_manifest(
          config, info, split, fingerprint=fingerprint,
          teacher=f'blackbox:{os.path.abspath(table)}', num_examples=len(rows),
          dtype=dtype)
      manifest['transfer'] = None  # The table, not a filter, picks the rows.
      cache.write_split(os.path.join(out_dir, split), ids=ids[rows],
                        labels=labels, logits=logits[rows],
                        class_names=info.class_names, manifest=manifest,
                        write_csv=write_csv)
      manifests[split] = manifest
  except BaseException:
    cache.remove_manifests([os.path.join(out_dir, split)
                            for split in manifests])
    raise
  return manifests


def define_flags() -> None:
  """The CLI's flags; defined only when run as a program (see kd_jax.main)."""
  config_flags.DEFINE_config_file(
      'config', None, 'A run config file, with :args after it.',
      lock_config=True)
  flags.DEFINE_string('out', None, 'The cache root to write.')
  flags.DEFINE_list('splits', None, 'Splits to export; default the train '
                    'split and every eval split.')
  flags.DEFINE_enum('dtype', 'float32', DTYPES, 'Storage of logits.')
  flags.DEFINE_string('import_table', None, 'A black-box teacher table (CSV '
                      "or .npy) to convert instead of running the config's "
                      'teachers.')
  flags.DEFINE_string('import_ids', None, 'Ids .npy of an .npy --import_table.')
  flags.DEFINE_bool('probabilities', False,
                    '--import_table holds probabilities, not logits.')
  flags.DEFINE_integer('views', 1, 'Augmented views per train example '
                       "(config.augment, replayed from per-example keys).")
  flags.DEFINE_integer('view_seed', 0, 'Seed of the views\' keys.')
  flags.DEFINE_integer('top_k', None, 'Store the top-k logits, their classes '
                       'and the rest mass instead of all logits.')
  flags.DEFINE_float('temperature', None, 'Temperature of the top-k rest '
                     'mass; default config.distill.temperature.')
  flags.DEFINE_bool('overwrite', False, 'Replace an existing cache at --out.')
  flags.DEFINE_bool('csv', True, 'Also write each split as a CSV (--nocsv '
                    'for large caches).')
  multihost.define_flags()
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  multihost.initialize(f)
  if f.import_table:
    manifests = import_blackbox(f.import_table, f.out, f.config,
                                probabilities=f.probabilities,
                                ids_path=f.import_ids, dtype=f.dtype,
                                overwrite=f.overwrite, write_csv=f.csv)
  else:
    manifests = export(f.config, f.out, f.splits, f.dtype, views=f.views,
                       view_seed=f.view_seed, top_k=f.top_k,
                       temperature=f.temperature, overwrite=f.overwrite,
                       write_csv=f.csv)
  shard = ('' if jax.process_count() == 1 else cache.shard_name(
      jax.process_index(), jax.process_count()))
  for split, m in manifests.items():
    views = m['preprocessing']['num_views']
    print(f'{split}: {m["num_examples"]} examples, {views} '
          f'view{"s" if views > 1 else ""} -> '
          f'{os.path.join(f.out, split, shard)}')
    if m['form'] == 'topk':
      print(f'  top-{m["top_k"]} of {m["num_classes"]} classes: '
            f'{m["nbytes"] / 1e6:.3f} MB vs {m["dense_nbytes"] / 1e6:.3f} MB '
            f'dense {m["dtype"]} ({m["dense_nbytes"] / m["nbytes"]:.2f}x '
            f'smaller)')


if __name__ == '__main__':
  progress.run_quiet_cli(main, define_flags)
