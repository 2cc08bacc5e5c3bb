"""The logits cache: its format, its writer and its reader.

`kd_jax.export_logits` writes a cache and `load_cache` turns it into a
`Teacher`; this module alone knows the files. <cache_dir>/<split>/ holds
ids.npy [N] bytes, labels.npy [N] int32, manifest.json (`make_manifest`),
optionally a CSV of the same numbers and, by manifest['form']:

* dense: logits.npy [N, C], or [N, V, C] for V augmented views;
* topk: topk_logits.npy and topk_indices.npy [N, (V,) k] and rest_mass.npy
  [N, (V,)], the teacher's mass outside its top k at manifest['temperature']
  (`sparsify`; see losses.topk_kl_divergence).

A split exported by n > 1 processes is n shards, <split>/shard-i-of-n/ (i
and n as five digits), each holding the files above for the examples of
process i's data share (`cache_shards`). A run on n processes loads, on
each, only the shard of its own share (the same split of the data); other
process counts load every shard.

`SplitWriter` writes a split batch by batch (memory holds its ids and
labels, never its logits); the reader memory-maps the arrays. The manifest
is written last (a split without one is unfinished) and records a digest of
the ids and the teacher's arrays in row order (`digest`), which the reader
checks: rows permuted or replaced after the export are refused, and a
cache's fingerprint is a digest of its manifests' teacher fingerprints and
digests, so the same cache is recognised wherever it lies. A cache written
before digests existed loads with a warning (its rows cannot be checked
against its ids); exporting it again adds them.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any

from absl import logging
import jax
import numpy as np

from kd_jax.data import preprocess
from kd_jax.data import stream as data_stream
from kd_jax.methods import ctkd
from kd_jax.methods import logit
from kd_jax.teachers.base import Teacher

MANIFEST = 'manifest.json'
FORM_ARRAYS = {'dense': ('logits',),
               'topk': ('topk_logits', 'topk_indices', 'rest_mass')}
# Augmentations a multi-view cache reproduces per example from explicit keys:
# (largest shift in pixels, random horizontal flip), as config.augment.
VIEW_AUGMENTATIONS = preprocess.SHIFT_AUGMENTATIONS
# Rows per block when a whole array is scanned (finite checks, digests).
CHECK_ROWS = 1 << 16
# What every manifest holds (`make_manifest` has written them all along).
MANIFEST_KEYS = ('teacher_fingerprint', 'dataset', 'split', 'num_examples',
                 'num_classes', 'class_names', 'preprocessing', 'dtype')
_SHARD = re.compile(r'shard-(\d{5})-of-(\d{5})$')


def shard_name(index: int, count: int) -> str:
  """The folder of process `index`'s shard of a split exported by `count`."""
  return f'shard-{index:05d}-of-{count:05d}'


def cache_shards(cache_dir: str, split: str) -> list[str]:
  """The tables of one exported split, as folders under <cache_dir>/<split>:
  [''] (the split folder itself) for a one-process export, else every
  shard-i-of-n in order.

  Raises:
    FileNotFoundError: no export of `split`, or shards missing (an export
      that has not finished on every process).
    ValueError: shards of different exports mixed in one folder.
  """
  directory = os.path.join(cache_dir, split)
  names = sorted(n for n in (os.listdir(directory)
                             if os.path.isdir(directory) else [])
                 if _SHARD.match(n))
  if os.path.exists(os.path.join(directory, MANIFEST)):
    if names:
      raise ValueError(
          f'{directory} holds a one-process export and shards {names[:3]}: '
          'export again into an empty --out.')
    return ['']
  if not names:
    raise FileNotFoundError(
        f'config.distill.cache_dir={cache_dir!r} has no logits for split '
        f'{split!r} ({os.path.join(directory, MANIFEST)} is missing).')
  counts = {int(_SHARD.match(n).group(2)) for n in names}
  if len(counts) > 1:
    raise ValueError(
        f'{directory} mixes the shards of exports by {sorted(counts)} '
        'processes: export again into an empty --out.')
  count = counts.pop()
  missing = [shard_name(i, count) for i in range(count)
             if not os.path.exists(os.path.join(directory, shard_name(i, count),
                                                MANIFEST))]
  if missing:
    raise FileNotFoundError(
        f'{directory}: {len(missing)} of the {count} shards of the export are '
        f'missing or unfinished (e.g. {missing[0]}): run the export again on '
        f'{count} processes, each writing its shard.')
  return [shard_name(i, count) for i in range(count)]


def local_shards(shards: Sequence[str], process_index: int,
                 process_count: int) -> list[str]:
  """The shards a process loads: its own where the export used as many
  processes as this run (each holds the examples of one process's data
  share), else all of them."""
  if len(shards) > 1 and len(shards) == process_count:
    return [shards[process_index]]
  return list(shards)


def _process() -> tuple[int, int]:
  """(index, count) of this process among the run's processes."""
  return jax.process_index(), jax.process_count()


class IdIndex:
  """Where each example id lies in a cache's tables (one per split).

  Sorted NumPy arrays searched by bisection: a few bytes per id and no
  Python object per example, so an index of millions of ids stays small.
  """

  def __init__(self, ids_per_table: Sequence[np.ndarray]):
    ids = [np.asarray(i, np.bytes_) for i in ids_per_table]
    all_ids = (np.concatenate(ids) if ids else np.zeros((0,), np.bytes_))
    table = np.concatenate([np.full(len(i), t, np.int64)
                            for t, i in enumerate(ids)] or [np.zeros(0, int)])
    row = np.concatenate([np.arange(len(i)) for i in ids]
                         or [np.zeros(0, int)])
    order = np.argsort(all_ids, kind='stable')
    self._ids, self._table, self._row = (all_ids[order], table[order],
                                         row[order])

  def __len__(self) -> int:
    return len(self._ids)

  def duplicate(self) -> tuple[bytes, int] | None:
    """(id, table of its second copy) of the repeat met first in table
    order, or None if every id is stored once."""
    repeat = np.flatnonzero(self._ids[1:] == self._ids[:-1]) + 1
    if not len(repeat):
      return None
    first = repeat[np.lexsort((self._row[repeat], self._table[repeat]))[0]]
    return bytes(self._ids[first]), int(self._table[first])

  def find(self, ids) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(table, row, found) of each id; table and row are -1 where not
    found."""
    query = np.asarray([bytes(i) for i in ids], np.bytes_)
    width = self._ids.dtype.itemsize
    fits = np.char.str_len(query) <= width if len(query) else np.zeros(0, bool)
    query = query.astype(self._ids.dtype)
    pos = np.minimum(np.searchsorted(self._ids, query), max(len(self) - 1, 0))
    found = fits & (self._ids[pos] == query) if len(self) else np.zeros(
        len(query), bool)
    return (np.where(found, self._table[pos], -1),
            np.where(found, self._row[pos], -1), found)


def _export_command(config, split: str) -> str:
  return (f'python -m kd_jax.export_logits --config=configs/<teacher or '
          f'distill config>.py --out={config.distill.cache_dir} '
          f'--splits={split}')


def _example_key(view_seed: int, tag: str, example_id) -> int:
  """A 64-bit key of (view_seed, tag, id): the same on every host and run."""
  digest = hashlib.blake2b(f'{view_seed}/{tag}/'.encode() + bytes(example_id),
                           digest_size=8).digest()
  return int.from_bytes(digest, 'little')


def view_fill(dataset: str, channels: int) -> np.ndarray:
  """The normalised value of a black pixel, which shifted views pad with."""
  mean, std = preprocess.normalization(dataset, channels)
  return -mean / std


def augment_views(images: np.ndarray, ids, views, *, kind: str,
                  view_seed: int, fill: np.ndarray) -> np.ndarray:
  """View `views[i]` of each normalised image [B, H, W, C].

  View v of example `id` is a shift by (dy, dx) in [-m, m]^2 pixels (padding
  with `fill`) and, for 'cifar', a horizontal flip, all drawn from the key
  (view_seed, v, id) alone. Export makes the teacher's views with it and
  training the student's images, so both see the same pixels.
  """
  if kind not in VIEW_AUGMENTATIONS:
    raise ValueError(
        f'config.augment={kind!r} cannot be replayed per example from a key; '
        f'multi-view caches support {sorted(VIEW_AUGMENTATIONS)}.')
  m, flips = VIEW_AUGMENTATIONS[kind]
  b, h, w, c = images.shape
  padded = np.empty((b, h + 2 * m, w + 2 * m, c), images.dtype)
  padded[...] = fill
  padded[:, m:m + h, m:m + w] = images
  out = np.empty_like(images)
  for i, (example_id, view) in enumerate(zip(ids, views)):
    key = _example_key(view_seed, f'view{int(view)}', example_id)
    dy, dx = key % (2 * m + 1), (key // (2 * m + 1)) % (2 * m + 1)
    out[i] = padded[i, dy:dy + h, dx:dx + w]
    if flips and (key >> 32) & 1:
      out[i] = out[i, :, ::-1]
  return out


def choose_views(ids, step: int, num_views: int, view_seed: int
                 ) -> np.ndarray:
  """The view each example of the batch of `step` trains on: a key of
  (view_seed, step, id), so each appearance (one per epoch) draws afresh,
  and resuming at any step gives the same choice."""
  return np.asarray([_example_key(view_seed, f'step{step}', i) % num_views
                     for i in ids], np.int64)


def make_manifest(config, info, split: str, *, fingerprint: str,
                  teacher: str, num_examples: int, dtype: str, views: int = 1,
                  view_seed: int = 0, top_k: int | None = None,
                  temperature: float | None = None) -> dict[str, Any]:
  """The manifest.json of one split, which `load_cache` checks against a run.

  Args:
    config: the exporting run's config (its transfer filters, for the train
      split, and augment, for views).
    info: its `input_pipeline.DatasetInfo`.
    split: the split written.
    fingerprint: identifies the teacher (`Teacher.fingerprint`, or a hash of
      a black-box table).
    teacher: where the logits came from (workdirs, or the table's path).
    num_examples: rows in the split.
    dtype: storage of the logits ('float32' or 'float16').
    views: augmented views per example (1: un-augmented).
    view_seed: the seed of the views' keys (`augment_views`).
    top_k: k of a top-k cache; None for a dense one.
    temperature: where a top-k cache's rest mass is computed.

  Returns:
    The manifest as a JSON-ready dict.
  """
  transfer = (config.transfer.to_dict() if split == config.train_split
              else None)
  if transfer is not None:
    transfer = {k: list(v) if isinstance(v, tuple) else v
                for k, v in transfer.items()}
  preprocessing = dict(image_size=list(info.image_shape[:2]),
                       channels=int(info.image_shape[2]),
                       augment=config.augment if views > 1 else 'none',
                       num_views=int(views))
  if views > 1:
    preprocessing['view_seed'] = int(view_seed)
  manifest = dict(
      teacher=teacher, teacher_fingerprint=fingerprint, dataset=info.name,
      split=split, transfer=transfer, num_examples=int(num_examples),
      num_classes=int(info.num_classes), class_names=list(info.class_names),
      preprocessing=preprocessing, dtype=dtype,
      form='dense' if top_k is None else 'topk')
  if top_k is not None:
    manifest.update(top_k=int(top_k), temperature=float(temperature))
  return manifest


def sparsify(logits: np.ndarray, top_k: int, temperature: float
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """(top-k logits, their class indices, mass of the other classes at T).

  Classes come in decreasing order of logit; ties keep the lower index.
  """
  logits = np.asarray(logits, np.float64)
  indices = np.argsort(-logits, axis=-1, kind='stable')[..., :top_k]
  top = np.take_along_axis(logits, indices, axis=-1)
  scaled = logits / temperature
  scaled = scaled - scaled.max(-1, keepdims=True)
  in_top = np.zeros(logits.shape, bool)
  np.put_along_axis(in_top, indices, True, axis=-1)
  # The mass outside the top k summed directly: 1 - sum(top) loses it to
  # rounding when it is tiny.
  unnormalised = np.exp(scaled)
  rest = (np.where(in_top, 0.0, unnormalised).sum(-1)
          / unnormalised.sum(-1))
  index_dtype = np.int16 if logits.shape[-1] <= np.iinfo(np.int16).max else (
      np.int32)
  return top, indices.astype(index_dtype), rest.astype(np.float32)


def _write_csv(path: str, header: Sequence[str], rows) -> None:
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(header)
    writer.writerows(rows)


def _text(v) -> str:
  # repr of the widened value parses back to exactly the stored number.
  return repr(float(v))


def digest(ids: np.ndarray, arrays: dict[str, np.ndarray],
           hashes: dict[str, Any] | None = None) -> str:
  """The digest of a split's ids and teacher arrays, in row order: any
  permutation of one of them, or values of another export, changes it.

  `hashes` (name -> hashlib sha256 of the array's row bytes, as `SplitWriter`
  and `read_cache_arrays` compute them while they pass over the rows)
  spares a pass over `arrays`, of which only dtype and shape are then read.
  """
  ids = np.asarray(ids)
  parts = [f'ids:{ids.dtype.str}:{ids.shape}:'
           f'{hashlib.sha256(ids.tobytes()).hexdigest()}']
  for name in sorted(arrays):
    a = arrays[name]
    h = (hashes or {}).get(name)
    if h is None:
      h = hashlib.sha256()
      _scan_rows(a, h)
    parts.append(f'{name}:{np.dtype(a.dtype).str}:{tuple(a.shape)}:'
                 f'{h.hexdigest()}')
  return hashlib.sha256('\n'.join(parts).encode()).hexdigest()[:32]


def _scan_rows(values: np.ndarray, h) -> None:
  """Feeds `values`' row bytes to the hash `h`, a block of rows at a time
  (a memory map is read, never held)."""
  for start in range(0, len(values), CHECK_ROWS):
    h.update(np.ascontiguousarray(values[start:start + CHECK_ROWS]).tobytes())


class SplitWriter:
  """Writes one split of a cache batch by batch; memory holds ids and labels.

  `add` checks each batch for NaN/Inf and appends its rows to raw files;
  `close` turns them into `.npy` files (header, then the rows copied in
  blocks), writes ids and labels, the CSV (optional; read back from the
  memory-mapped arrays) and, last, the manifest, whose presence marks a
  complete split. An ImageNet-sized split (1.28M x 1000 logits) never sits
  in memory.
  """

  def __init__(self, directory: str, *, dtype: str, topk: bool,
               class_names: Sequence[str], write_csv: bool = True):
    self.directory, self.dtype = directory, dtype
    self.class_names, self.write_csv = list(class_names), write_csv
    os.makedirs(directory, exist_ok=True)
    self._names = FORM_ARRAYS['topk' if topk else 'dense']
    self._dtypes: dict[str, np.dtype] = {}
    self._shapes: dict[str, tuple[int, ...]] = {}
    self._raw = {name: open(self._path(name) + '.partial', 'wb')
                 for name in self._names}
    self._hashes = {name: hashlib.sha256() for name in self._names}
    self._ids: list[np.ndarray] = []
    self._labels: list[np.ndarray] = []
    self.num_examples = 0

  def _path(self, name: str) -> str:
    return os.path.join(self.directory, f'{name}.npy')

  def add(self, ids, labels, arrays: dict[str, np.ndarray]) -> None:
    """Appends rows: `arrays` holds dense 'logits' [b, (V,) C], or the
    'topk_logits', 'topk_indices', 'rest_mass' of `sparsify`."""
    ids = np.asarray([bytes(i) for i in ids], dtype=np.bytes_)
    for name in ('logits', 'topk_logits', 'rest_mass'):
      if name in arrays:
        check_finite(arrays[name], ids, f'{name} for {self.directory}')
    for name in self._names:
      value = np.asarray(arrays[name])
      if name in ('logits', 'topk_logits'):
        value = value.astype(self.dtype)
      elif name == 'rest_mass':
        value = value.astype(np.float32)
      if self._shapes.setdefault(name, value.shape[1:]) != value.shape[1:]:
        raise ValueError(f'{name} rows of shape {value.shape[1:]} after '
                         f'{self._shapes[name]} in {self.directory}.')
      self._dtypes.setdefault(name, value.dtype)
      data = np.ascontiguousarray(value).tobytes()
      self._raw[name].write(data)
      self._hashes[name].update(data)
    self._ids.append(ids)
    self._labels.append(np.asarray(labels, np.int32))
    self.num_examples += len(ids)

  def _finish_npy(self, name: str) -> int:
    raw = self._raw[name]
    raw.close()
    dtype = self._dtypes.get(name, np.dtype(np.float32))
    shape = (self.num_examples, *self._shapes.get(name, ()))
    with open(self._path(name), 'wb') as out, open(raw.name, 'rb') as rows:
      np.lib.format.write_array_header_1_0(out, dict(
          descr=np.lib.format.dtype_to_descr(dtype), fortran_order=False,
          shape=shape))
      while block := rows.read(64 << 20):
        out.write(block)
    os.remove(raw.name)
    return int(np.prod(shape)) * dtype.itemsize

  def abort(self) -> None:
    """Removes what a failed export wrote (the split stays absent)."""
    for raw in self._raw.values():
      raw.close()
      if os.path.exists(raw.name):
        os.remove(raw.name)
    if os.path.isdir(self.directory) and not os.listdir(self.directory):
      os.rmdir(self.directory)

  def close(self, manifest: dict[str, Any]) -> int:
    """Finishes the split, adding its `digest` to `manifest` (written last);
    returns the bytes of the teacher's arrays."""
    nbytes = sum(self._finish_npy(name) for name in self._names)
    ids = (np.concatenate(self._ids) if self._ids
           else np.zeros((0,), np.bytes_))
    manifest['digest'] = digest(
        ids, {name: np.load(self._path(name), mmap_mode='r')
              for name in self._names}, self._hashes)
    labels = (np.concatenate(self._labels) if self._labels
              else np.zeros((0,), np.int32))
    np.save(self._path('ids'), ids)
    np.save(self._path('labels'), labels)
    if self.write_csv:
      arrays = {name: np.load(self._path(name), mmap_mode='r')
                for name in self._names}
      _write_split_csv(self.directory, ids, labels, self.class_names,
                       manifest['preprocessing']['num_views'], arrays)
    tmp = os.path.join(self.directory, f'{MANIFEST}.tmp')
    with open(tmp, 'w') as f:
      json.dump(manifest, f, indent=2)
    os.replace(tmp, os.path.join(self.directory, MANIFEST))
    return nbytes


def remove_manifests(directories: Sequence[str]) -> None:
  """Marks the splits (or shards) in `directories` unfinished before they are
  written again, so that an export cut short leaves no split whose manifest
  describes other arrays than it holds."""
  for directory in directories:
    path = os.path.join(directory, MANIFEST)
    if os.path.exists(path):
      os.remove(path)


def _write_split_csv(directory: str, ids: np.ndarray, labels: np.ndarray,
                     class_names: Sequence[str], views: int,
                     arrays: dict[str, np.ndarray]) -> None:
  """logits.csv or topk.csv: one row per example (and view)."""
  view_columns = ['view'] if views > 1 else []

  def per_view(array):
    return array if views > 1 else array[:, None]

  def view_rows(make_row):
    for n, (example_id, label) in enumerate(zip(ids, labels)):
      for v in range(views):
        yield [example_id.decode(), *([v] if views > 1 else []), int(label),
               *make_row(n, v)]

  if 'logits' in arrays:
    values = per_view(arrays['logits'])
    _write_csv(os.path.join(directory, 'logits.csv'),
               ['id', *view_columns, 'label', *class_names],
               view_rows(lambda n, v: map(_text, values[n, v])))
  else:
    top, indices, rest = (per_view(arrays[k]) for k in FORM_ARRAYS['topk'])
    k = top.shape[-1]
    _write_csv(
        os.path.join(directory, 'topk.csv'),
        ['id', *view_columns, 'label',
         *(f'top{i + 1}_class' for i in range(k)),
         *(f'top{i + 1}_logit' for i in range(k)), 'rest_mass'],
        view_rows(lambda n, v: [*map(int, indices[n, v]),
                                *map(_text, top[n, v]), _text(rest[n, v])]))


def write_split(directory: str, *, ids: np.ndarray, labels: np.ndarray,
                class_names: Sequence[str], manifest: dict[str, Any],
                logits: np.ndarray | None = None,
                topk: tuple[np.ndarray, np.ndarray, np.ndarray] | None = None,
                write_csv: bool = True) -> int:
  """Writes one split of a cache at once (`SplitWriter` with one batch).

  Args:
    directory: `<cache root>/<split>`.
    ids, labels: [N] example ids (bytes) and labels.
    class_names: the dataset's, for the CSV header.
    manifest: what `make_manifest` makes; its dtype stores the logits.
    logits: dense [N, C], or [N, V, C] for V views; or
    topk: (top-k logits, class indices, rest mass) from `sparsify`.
    write_csv: also write logits.csv / topk.csv.

  Returns:
    The bytes of the teacher's arrays on disk (npy payloads).
  """
  writer = SplitWriter(directory, dtype=manifest['dtype'],
                       topk=topk is not None, class_names=class_names,
                       write_csv=write_csv)
  try:
    writer.add(ids, labels, {'logits': logits} if topk is None
               else dict(zip(FORM_ARRAYS['topk'], topk)))
  except ValueError:
    writer.abort()
    raise
  return writer.close(manifest)


def _load_npy(path: str, mmap: bool = False) -> np.ndarray:
  """np.load (memory-mapped, read-only, with `mmap`), with an error that
  names the damaged file."""
  try:
    return np.load(path, mmap_mode='r' if mmap else None)
  except FileNotFoundError:
    raise FileNotFoundError(f'{path} is missing: the logits cache is '
                            'incomplete; export it again.') from None
  except (OSError, ValueError, EOFError) as e:
    raise ValueError(f'{path} is unreadable ({e}): the logits cache is '
                     'damaged; export it again.') from None


def check_finite(values: np.ndarray, ids, source: str, digest_of=None
                 ) -> None:
  """Refuses NaN or Inf teacher values, naming the first bad example's id.

  A non-finite teacher row would make the distillation loss NaN (or, in
  older code, silently drop the teacher), so it is refused at the door.
  `digest_of` (a hashlib hash) is fed the row bytes on the way.
  """
  bad_rows, first = 0, None
  for start in range(0, len(values), CHECK_ROWS):
    block = np.asarray(values[start:start + CHECK_ROWS])
    if digest_of is not None:
      digest_of.update(np.ascontiguousarray(block).tobytes())
    bad = ~np.isfinite(block.reshape(len(block), -1)).all(axis=1)
    if bad.any():
      bad_rows += int(bad.sum())
      if first is None:
        first = start + int(np.flatnonzero(bad)[0])
  if first is not None:
    example_id = ids[first]
    if isinstance(example_id, (bytes, np.bytes_)):
      example_id = bytes(example_id).decode(errors='replace')
    raise ValueError(
        f'{source}: {bad_rows} of {len(values)} rows hold NaN or Inf; '
        f'the first is row {first} (id {example_id!r}): '
        f'{np.asarray(values[first]).ravel()[:10].tolist()}. A teacher must give finite '
        'values for every example: fix the teacher (or the table) and export '
        'again.')


def read_cache_arrays(cache_dir: str, split: str, mmap: bool = False,
                      shard: str = ''
                      ) -> tuple[dict[str, Any], np.ndarray,
                                 dict[str, np.ndarray]]:
  """(manifest, ids [N] bytes, the form's arrays) of one exported split, or
  of one of its shards (`shard`, a name `cache_shards` gives).

  With `mmap` the arrays are read-only memory maps: a lookup reads the rows
  it asks for, and host memory does not grow with the cache.

  Raises:
    FileNotFoundError / ValueError: naming the missing, unreadable or
      inconsistent file, or the first example whose values are not finite.
  """
  directory = os.path.join(cache_dir, split, shard)
  path = os.path.join(directory, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'config.distill.cache_dir={cache_dir!r} has no logits for split '
        f'{split!r} ({path} is missing).')
  try:
    with open(path) as f:
      manifest = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is unreadable ({e}): the logits cache is '
                     'damaged; export it again.') from None
  missing = [k for k in MANIFEST_KEYS if not isinstance(manifest, dict)
             or k not in manifest]
  if missing:
    raise ValueError(f'{path} lacks {missing}, which every kd_jax cache '
                     'manifest holds: the logits cache is damaged; export it '
                     'again.')
  form = manifest.get('form', 'dense')
  if form not in FORM_ARRAYS:
    raise ValueError(f'{path}: form {form!r} is none of {list(FORM_ARRAYS)}; '
                     f'export the cache again.')
  ids = _load_npy(os.path.join(directory, 'ids.npy'))
  arrays = {name: _load_npy(os.path.join(directory, f'{name}.npy'), mmap)
            for name in FORM_ARRAYS[form]}
  views = manifest['preprocessing'].get('num_views', 1)
  lead = (len(ids),) if views == 1 else (len(ids), views)
  width = (manifest['num_classes'] if form == 'dense'
           else manifest.get('top_k'))
  expected = ({'logits': lead + (width,)} if form == 'dense' else
              {'topk_logits': lead + (width,), 'topk_indices': lead + (width,),
               'rest_mass': lead})
  for name, shape in expected.items():
    if arrays[name].shape != shape:
      raise ValueError(
          f'{directory}: {name}.npy has shape {arrays[name].shape}, but '
          f'ids.npy ({len(ids)} ids) and the manifest ({views} views, '
          f'{width} values per row) make it {shape}: the cache is corrupt; '
          f'export it again.')
  hashes = {name: hashlib.sha256() for name in expected}
  for name in expected:
    if name == 'topk_indices':
      _scan_rows(arrays[name], hashes[name])
    else:
      check_finite(arrays[name], ids, os.path.join(directory, f'{name}.npy'),
                   digest_of=hashes[name])
  if 'digest' in manifest and digest(ids, arrays, hashes) != manifest['digest']:
    raise ValueError(
        f'{os.path.normpath(directory)}: its ids and teacher arrays do not '
        f'match the digest its {MANIFEST} recorded at export (rows permuted, or files of '
        'another export copied in): the logits cache is damaged; export it '
        'again.')
  return manifest, ids, arrays


def read_cache_labels(cache_dir: str, split: str, num_ids: int,
                      shard: str = '') -> np.ndarray:
  """labels.npy [N] of one exported split (or shard)."""
  path = os.path.join(cache_dir, split, shard, 'labels.npy')
  labels = _load_npy(path)
  if labels.shape != (num_ids,):
    raise ValueError(f'{path} has shape {labels.shape} but ids.npy holds '
                     f'{num_ids} ids: the cache is corrupt; export it again.')
  return labels


def read_cache_split(cache_dir: str, split: str
                     ) -> tuple[dict[str, Any], np.ndarray, np.ndarray]:
  """(manifest, ids [N] bytes, logits [N, (V,) C] float32) of a dense split,
  its shards (if any) concatenated in memory in shard order (the manifest is
  the first shard's, with the split's num_examples)."""
  parts = [read_cache_arrays(cache_dir, split, shard=shard)
           for shard in cache_shards(cache_dir, split)]
  if any('logits' not in arrays for _, _, arrays in parts):
    raise ValueError(f'{os.path.join(cache_dir, split)} is a top-k cache; '
                     f'read it with read_cache_arrays.')
  ids = np.concatenate([ids for _, ids, _ in parts])
  manifest = dict(parts[0][0], num_examples=len(ids))
  return manifest, ids, np.concatenate(
      [arrays['logits'].astype(np.float32) for _, _, arrays in parts])


def _check_manifest(manifest: dict[str, Any], config, info, split: str
                    ) -> None:
  expected = dict(dataset=info.name, split=split,
                  num_classes=int(info.num_classes),
                  class_names=list(info.class_names))
  differ = {k: (manifest.get(k), v) for k, v in expected.items()
            if manifest.get(k) != v}
  if differ:
    details = '; '.join(f'{k}: cache {a!r}, run {b!r}'
                        for k, (a, b) in differ.items())
    raise ValueError(
        f'The logits cache {config.distill.cache_dir!r} (split {split!r}) was '
        f'exported for other data than this run ({details}). Re-export it '
        f'with this run\'s data config: {_export_command(config, split)}')


# What every shard of one split shares (its own examples aside).
SHARED_BY_SHARDS = ('teacher_fingerprint', 'form', 'top_k', 'temperature',
                    'preprocessing', 'dtype', 'transfer')


def _check_same_export(first: dict[str, Any], manifest: dict[str, Any],
                       directory: str) -> None:
  differ = [k for k in SHARED_BY_SHARDS if first.get(k) != manifest.get(k)]
  if differ:
    raise ValueError(
        f'{directory} was written by another export than the split\'s first '
        f'shard (they differ in {differ}): export again into an empty --out.')


def check_form(manifests: dict[str, dict[str, Any]], config) -> None:
  """One form (and k, temperature) for all splits, and a loss that reads it."""
  def form_of(m):
    return (m.get('form', 'dense'), m.get('top_k'), m.get('temperature'))
  forms = {split: form_of(m) for split, m in manifests.items()}
  if len(set(forms.values())) > 1:
    raise ValueError(
        f'The logits cache {config.distill.cache_dir!r} mixes forms across '
        f'splits ((form, top_k, temperature) per split: {forms}); export all '
        f'splits in one command.')
  form, top_k, temperature = next(iter(forms.values()))
  if form != 'topk':
    return
  method = logit.soft_term(config.distill).method
  if method.topk is None:
    raise ValueError(
        f'config.distill.soft={method.name!r} with a top-k cache (k={top_k}): '
        f'a top-k cache keeps k classes and one rest bucket, and '
        f'{method.name} needs every class\'s probability; a top-k cache '
        f'trains with losses.topk_kl_divergence: set config.distill.soft='
        f'"kl", or export a dense cache.')
  if (config.distill.logit_standardization
      or ctkd.settings(config.distill).learned):
    raise ValueError(
        f'config.distill.logit_standardization / ctkd with a top-k cache '
        f'(k={top_k}): standardizing needs all C logits and the rest mass is '
        f'stored at one fixed temperature; export a dense cache.')
  if float(config.distill.temperature) != float(temperature):
    raise ValueError(
        f'config.distill.temperature={config.distill.temperature} but the '
        f'top-k cache {config.distill.cache_dir!r} stores the rest mass at '
        f'T={temperature}: re-export it with --temperature='
        f'{config.distill.temperature}, or train at T={temperature}.')


def _check_augmentation(manifest: dict[str, Any], config) -> int:
  """Refuses a train stream the cached views do not describe; the view count."""
  views = manifest['preprocessing'].get('num_views', 1)
  if views == 1:
    if ((config.augment != 'none' or config.mixup_alpha > 0)
        and not config.distill.allow_augmented_single_view):
      raise ValueError(
          f'config.augment={config.augment!r}, config.mixup_alpha='
          f'{config.mixup_alpha} with a logits cache of one un-augmented view '
          f'per example: the student would be matched to un-augmented teacher '
          f'logits on augmented inputs, which is not what the teacher says '
          f'about them. Export views (python -m kd_jax.export_logits '
          f'--views=8), distil from an online teacher, set augment="none" and '
          f'mixup_alpha=0, or set config.distill.allow_augmented_single_view='
          f'True to accept the mismatch.')
    return views
  cached = manifest['preprocessing']['augment']
  if config.augment != cached:
    raise ValueError(
        f'config.augment={config.augment!r} but the logits cache '
        f'{config.distill.cache_dir!r} holds {views} views made with '
        f'augment={cached!r}: set config.augment={cached!r}, or export views '
        f'with this run\'s augmentation.')
  if config.mixup_alpha > 0:
    raise ValueError(
        f'config.mixup_alpha={config.mixup_alpha} with a multi-view cache: no '
        f'cached view describes a mix of two images; set mixup_alpha=0 or '
        f'distil online.')
  return views


def pipeline_config(config):
  """The config the train stream is built from.

  A multi-view cache replays its views' augmentation on the host
  (`augment_views`), so the pipeline must deliver un-augmented images.
  """
  if config.augment == 'none' or not config.distill.cache_dir:
    return config
  try:
    shard = cache_shards(config.distill.cache_dir, config.train_split)[0]
  except (FileNotFoundError, ValueError):
    return config  # load_cache says what is wrong.
  path = os.path.join(config.distill.cache_dir, config.train_split, shard,
                      MANIFEST)
  with open(path) as f:
    if json.load(f)['preprocessing'].get('num_views', 1) == 1:
      return config
  stream = config.copy_and_resolve_references()
  stream.augment = 'none'
  return stream


def _split_ids(config, split: str) -> tuple[np.ndarray, np.ndarray]:
  """The ids and labels of this process's share of `split` (after transfer
  filters for train): the examples its streams read."""
  ids, labels = [], []
  index, count = _process()
  for b in data_stream.iterate_split(config, split, num_devices=count,
                                     process_index=index, process_count=count):
    ids.append(b['id'][b['mask']])
    labels.append(b['label'][b['mask']])
  if not ids:
    return np.zeros((0,), object), np.zeros((0,), np.int64)
  return np.concatenate(ids), np.concatenate(labels)


def _check_labels(ids: np.ndarray, labels: np.ndarray,
                  cached_ids: np.ndarray, cached_labels: np.ndarray, config,
                  split: str) -> None:
  """Refuses a cache whose labels.npy disagrees with the dataset's labels of
  the same ids: its rows are no longer aligned with its ids."""
  _, rows, found = IdIndex([ids]).find(cached_ids)
  labels, cached_labels = np.asarray(labels), np.asarray(cached_labels)
  wrong = np.flatnonzero(found & (labels[np.maximum(rows, 0)]
                                  != cached_labels))
  if len(wrong):
    first = wrong[0]
    example_id, cached = bytes(cached_ids[first]), int(cached_labels[first])
    actual = int(labels[rows[first]])
    raise ValueError(
        f'The logits cache {config.distill.cache_dir!r} (split {split!r}) '
        f'gives {len(wrong)} examples another label than the dataset (first: '
        f'id {example_id.decode(errors="replace")!r}, labels.npy {cached}, '
        f'dataset {actual}): its ids.npy no longer matches its rows (or it '
        f'was exported from other data). Export it again: '
        f'{_export_command(config, split)}')


def _check_ids_cached(ids: np.ndarray, index: IdIndex, config,
                      split: str) -> None:
  missing = np.asarray(ids)[~index.find(ids)[2]] if len(ids) else []
  if len(missing):
    examples = [bytes(i).decode(errors='replace') for i in missing[:5]]
    raise ValueError(
        f'The logits cache {config.distill.cache_dir!r} lacks {len(missing)} '
        f'of the {len(ids)} examples of split {split!r} this run reads (e.g. '
        f'{examples}). Export logits for the whole split '
        f'({_export_command(config, split)}), or make config.transfer select '
        f'only cached examples.')


def dense_from_topk(topk_logits: np.ndarray, topk_indices: np.ndarray,
                    rest_mass: np.ndarray, num_classes: int,
                    temperature: float) -> np.ndarray:
  """Logits whose softmax at T is the teacher's on its top k, the rest mass
  spread evenly over the other classes; their argmax is the teacher's."""
  t = float(temperature)
  top = topk_logits.astype(np.float64) / t
  top = top - top.max(-1, keepdims=True)
  log_top = top - np.log(np.exp(top).sum(-1, keepdims=True))
  rest = rest_mass.astype(np.float64)[..., None]
  log_top = log_top + np.log1p(-np.minimum(rest, 1 - 1e-12))
  others = max(num_classes - topk_logits.shape[-1], 1)
  log_other = np.log(np.maximum(rest, np.finfo(np.float32).tiny) / others)
  dense = np.broadcast_to(log_other, (*topk_logits.shape[:-1], num_classes))
  dense = dense.copy()
  np.put_along_axis(dense, topk_indices.astype(np.int64), log_top, axis=-1)
  return (t * dense).astype(np.float32)


def lookup_rows(index: IdIndex, tables: Sequence[dict[str, np.ndarray]],
                batch_ids, views: np.ndarray, *, form: str, top_k, temperature,
                num_classes: int, cache_dir: str) -> dict[str, np.ndarray]:
  """The cached teacher values of a batch: view `views[i]` of example
  `batch_ids[i]`, read from its table (memory maps read only these rows).
  Empty ids (padding rows) get zeros; an unknown id raises KeyError."""
  table_of, row_of, found = index.find(batch_ids)
  padding = np.asarray([not bytes(i) for i in batch_ids], bool)
  if not np.all(found | padding):
    missing = bytes(batch_ids[int(np.flatnonzero(~(found | padding))[0])])
    raise KeyError(f'id {missing!r} is not in the logits cache '
                   f'{cache_dir!r}; re-export it for this run\'s data.')
  out = {}
  for name in FORM_ARRAYS[form]:
    trailing = tables[0][name].shape[2:]
    dtype = np.int32 if name == 'topk_indices' else np.float32
    out[name] = np.zeros((len(batch_ids), *trailing), dtype)
    if name == 'topk_indices':  # Padding rows: k distinct classes.
      out[name][:] = np.arange(top_k)
  for t in np.unique(table_of[found]):
    sel = table_of == t
    stored_views = tables[t][FORM_ARRAYS[form][0]].shape[1]
    view = np.minimum(np.asarray(views)[sel], stored_views - 1)
    for name in out:
      out[name][sel] = tables[t][name][row_of[sel], view]
  if form == 'dense':
    return {'teacher_logits': out['logits']}
  return {'teacher_logits': dense_from_topk(
              out['topk_logits'], out['topk_indices'], out['rest_mass'],
              num_classes, temperature),
          **{f'teacher_{k}': v for k, v in out.items()}}


def _read_tables(config, info, splits: Sequence[str]):
  """(manifests by split, one table per loaded shard, their ids, their
  (split, shard), the train split's view count), each shard checked
  against the run's data and its split's first shard."""
  cache_dir = config.distill.cache_dir
  process_index, process_count = _process()
  manifests, tables, table_ids, table_split = {}, [], [], []
  for split in splits:
    try:
      shards = local_shards(cache_shards(cache_dir, split), process_index,
                            process_count)
      for shard in shards:
        manifest, ids, arrays = read_cache_arrays(cache_dir, split,
                                                  mmap=True, shard=shard)
        _check_manifest(manifest, config, info, split)
        _check_same_export(manifests.setdefault(split, manifest), manifest,
                           os.path.join(cache_dir, split, shard))
        if manifest['preprocessing'].get('num_views', 1) == 1:
          arrays = {k: v[:, None] for k, v in arrays.items()}  # A view axis.
        tables.append(arrays)
        table_ids.append(ids)
        table_split.append((split, shard))
      if split == config.train_split:
        num_views = _check_augmentation(manifest, config)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'{e} The cache needs config.train_split and every eval split: '
          f'{_export_command(config, ",".join(splits))}') from None
  return manifests, tables, table_ids, table_split, num_views


def _check_all_ids(config, splits: Sequence[str], index: IdIndex, table_ids,
                   table_split) -> None:
  """Every id once in the cache, every example of every split cached, with
  its label."""
  repeat = index.duplicate()
  if repeat is not None:
    split, shard = table_split[repeat[1]]
    raise ValueError(
        f'id {repeat[0]!r} appears twice in the logits cache '
        f'{config.distill.cache_dir!r} (last in split {split!r}'
        f'{" " + shard if shard else ""}): ids must be unique across splits '
        'and shards.')
  for split in splits:
    dataset_ids, _ = split_data = _split_ids(config, split)
    _check_ids_cached(dataset_ids, index, config, split)
    for t, (table_of, shard) in enumerate(table_split):
      if table_of == split:
        _check_labels(*split_data, table_ids[t], read_cache_labels(
            config.distill.cache_dir, split, len(table_ids[t]), shard),
                      config, split)


def load_cache(config, info) -> Teacher:
  """A teacher whose outputs are read from `config.distill.cache_dir`.

  The cache must hold config.train_split and every eval split (export them
  all, the default of `kd_jax.export_logits`), so that eval reports the
  teacher's accuracy and agreement as with an online teacher. Every id of the
  train stream and of each eval split is checked up front. The logits enter
  the batch on the host (`host_lookup(batch, step=None)`, by `id`); `forward`
  only reads them.

  A multi-view train split (`--views=V`) trains on view
  `choose_views(id, step)` of each example: `host_lookup(batch, step)`
  replaces the (un-augmented, see `pipeline_config`) image by that view and
  adds its logits. A top-k cache adds `teacher_topk_logits`,
  `teacher_topk_indices` and `teacher_rest_mass`, which the train step reads
  with `losses.topk_kl_divergence`, and `teacher_logits` from
  `dense_from_topk` for accuracy and agreement.

  Args:
    config: the run config; reads `distill.cache_dir`, `distill.soft`,
      `distill.temperature`, `distill.allow_augmented_single_view`,
      `augment`, `mixup_alpha`, the splits and the transfer filters.
    info: the run's `input_pipeline.DatasetInfo`.

  Returns:
    A `Teacher` with `variables=None` and K = 1.

  Raises:
    ValueError / FileNotFoundError: a missing or mismatched cache, missing
      ids, an augmented stream the cached views do not describe, or a top-k
      cache at another temperature.
  """
  cache_dir = config.distill.cache_dir
  if not cache_dir:
    raise ValueError(
        'config.distill.teacher_source="cache" but config.distill.cache_dir '
        'is empty: set it to the --out of `python -m kd_jax.export_logits`.')
  splits = [config.train_split] + [s for s in config.eval_splits
                                   if s != config.train_split]
  manifests, tables, table_ids, table_split, num_views = _read_tables(
      config, info, splits)
  _check_same_teacher(manifests, config)
  index = IdIndex(table_ids)
  _check_all_ids(config, splits, index, table_ids, table_split)
  train_tables = np.asarray([t for t, (split, _) in enumerate(table_split)
                             if split == config.train_split])
  check_form(manifests, config)
  train_manifest = manifests[config.train_split]
  form = train_manifest.get('form', 'dense')
  view_seed = train_manifest['preprocessing'].get('view_seed', 0)
  fill = view_fill(info.name, info.image_shape[2])
  top_k = train_manifest.get('top_k')
  temperature = train_manifest.get('temperature')

  def lookup(batch_ids, views) -> dict[str, np.ndarray]:
    return lookup_rows(index, tables, batch_ids, views, form=form,
                       top_k=top_k, temperature=temperature,
                       num_classes=info.num_classes, cache_dir=cache_dir)

  def host_lookup(batch: dict[str, Any], step: int | None = None
                  ) -> dict[str, Any]:
    batch_ids = batch['id']
    if num_views == 1 or step is None:
      if num_views > 1 and np.any(np.isin(index.find(batch_ids)[0],
                                          train_tables)):
        raise ValueError(
            f'The logits cache {cache_dir!r} holds {num_views} views of each '
            f'{config.train_split!r} example: pass the train step '
            f'(host_lookup(batch, step)) to pick them.')
      return {**batch, **lookup(batch_ids, np.zeros(len(batch_ids), np.int64))}
    views = choose_views(batch_ids, step, num_views, view_seed)
    image = augment_views(batch['image'], batch_ids, views,
                          kind=config.augment, view_seed=view_seed, fill=fill)
    return {**batch, 'image': image, **lookup(batch_ids, views)}

  def forward(variables, batch):
    del variables
    return batch['teacher_logits'][None]

  # What earlier versions called this cache: its splits' teachers only.
  legacy = hashlib.sha256('|'.join(sorted(
      m['teacher_fingerprint'] for m in manifests.values())).encode()
                          ).hexdigest()[:16]
  return Teacher(variables=None, forward=forward, names=('cache',),
                 weights=(1.0,), fingerprint=_fingerprint(cache_dir, splits),
                 host_lookup=host_lookup, legacy_fingerprints=(legacy,))


def _fingerprint(cache_dir: str, splits: Sequence[str]) -> str:
  """The cache's identity by content: a digest of every split's (and
  shard's, on every process alike) teacher fingerprint and row digest. A
  cache without digests (an earlier export) is named by its teachers only,
  and its splits are logged as unchecked."""
  prints, unchecked = [], []
  for split in splits:
    for shard in cache_shards(cache_dir, split):
      with open(os.path.join(cache_dir, split, shard, MANIFEST)) as f:
        manifest = json.load(f)
      prints.append(f'{split}/{shard}:{manifest["teacher_fingerprint"]}:'
                    f'{manifest.get("digest")}')
      if 'digest' not in manifest:
        unchecked.append(os.path.join(split, shard))
  if unchecked:
    logging.warning(
        'The logits cache %r was exported before caches recorded digests of '
        'their rows (%s): its values cannot be checked against its ids. '
        'Export it again to have them checked.', cache_dir,
        ', '.join(unchecked))
  return hashlib.sha256('|'.join(prints).encode()).hexdigest()[:16]


def _check_same_teacher(manifests: dict[str, dict[str, Any]], config) -> None:
  """Refuses splits that different teachers' exports wrote."""
  teachers = {split: m['teacher_fingerprint'] for split, m in manifests.items()}
  if len(set(teachers.values())) > 1:
    raise ValueError(
        f'The logits cache {config.distill.cache_dir!r} mixes the exports of '
        f'different teachers (teacher fingerprint per split: {teachers}): '
        'export every split from one teacher in one command: '
        f'{_export_command(config, ",".join(manifests))}')
