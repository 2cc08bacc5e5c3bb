"""Per-token teacher caches for language models: the top k of a teacher's
next-token distribution at every position of a text split, memory-mapped.

  python -m kd_jax.lm_cache \
      --config=configs/shakespeare_char.py:role=distill,distill.teacher_workdir=workdirs/shakespeare_teacher \
      --out=workdirs/shakespeare_top16 --k=16

The split is cut into the windows that `kd_jax.data.text.eval_batches`
tiles it with (window w: inputs start at token w * L, L = config.length);
a run trained from the cache draws only those windows
(`text.train_batch(aligned=True)`), so every cached target was predicted
from the context the student sees. For window w, position j (target token
w * L + j + 1) the cache holds

- `topk_logits.npy` [W, L, k] (`dtype`, float16 by default): the teacher's
  k largest logits, largest first; with dtype uint8 each as its distance
  below the largest in steps of `step` logits (1/16 by default), rounded
  and capped at 255 steps: k bytes where float16 takes 2k, and `lookup`
  gives them back as logits up to a shift (the largest 0), which is all
  a sparse divergence reads;
- `topk_indices.npy` [W, L, k] uint8 (int32 above 256 tokens): their ids;
- `rest_mass.npy` [W, L] (`dtype`; float16 when that is uint8): the
  teacher's probability of every other token at `temperature`, the tail
  bucket of `losses.sparse_token_divergence`;
- `manifest.json`: the teacher (workdir, step, checksum of its params,
  model), vocabulary, k, temperature, window length, dataset, split, the
  SHA-256 of the split's tokens, the counts, dtypes and the storage per
  token beside a dense float16 cache's.

With `stride` S < L (`--stride`) the windows overlap: window w starts at
token w * S, a run draws windows at any multiple of S, and the cache takes
L / S times the bytes per token of text (each a target of L / S windows,
each from its own window's context).

With `layout='positions'` (`--layout=positions`) the cache is keyed by
position instead: one row per target of the split (`topk_logits`
[N - 1, k], `topk_indices` [N - 1, k], `rest_mass` [N - 1]), so a run
draws its train windows at any offset, as an online run does, for the
same bytes per token. The teacher reads windows at starts j * S (`stride`
S, default L // 2); window 0 gives targets 0 .. L - 1 and window j > 0 its
last S, so every target past the first L was predicted from L - S + 1 to
L tokens of context (at least as many as any position of a student's
window), where the windows layout gives the context the student sees.
Exporting takes L / S times the teacher passes of the windows layout.

`load` checks the manifest against the run that reads it (vocabulary,
window length, temperature, dataset and split, the tokens' checksum) and
refuses a mismatch by field; `lookup` gives a batch's sparse targets from
its windows' starts. Positions past the split's end hold zeros and are
masked in the batch.

On n > 1 processes (--coordinator_address, --num_processes, --process_id,
--cpu_collectives as for `kd_jax.main`) process i writes the windows of its
share (`text.window_share`: a contiguous run, 1/n of them) to
`out/shard-i-of-n/` (the same files, its manifest recording the share), in
the shard layout of the image caches (`kd_jax.teachers.cache`, which
names and finds the shards). A run from it draws each batch row from one
share (`text.train_batch(shares=n)`), so a run on n processes loads on
each only its own shard, and a run on any other count loads every shard
and reads the same batches (a positions cache: each process loads every
shard, memory-mapped, and draws anywhere). Missing, unfinished or mixed
shards are refused by name.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
from typing import Any

import jax
from jax.experimental import multihost_utils
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpointing
from kd_jax.data import text
from kd_jax.teachers import cache as logits_cache

__all__ = ['Cache', 'Shard', 'dequantize', 'export', 'load', 'lookup',
           'quantize']

MANIFEST = 'manifest.json'
FORMAT = 1
FILES = ('topk_logits', 'topk_indices', 'rest_mass')
LAYOUTS = ('windows', 'positions')
DTYPES = ('float16', 'float32', 'uint8')
# uint8 caches: the top-k logits' distances below the largest, in steps of
# STEP logits (16 steps per logit: at most 1/32 off, up to 15.9 below).
STEP = 1 / 16


def corpus_checksum(tokens: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


def _index_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 256 else np.int32)


def _rest_dtype(dtype: str) -> np.dtype:
  """The tail mass's dtype in a cache of `dtype` values."""
  return np.dtype('float16' if dtype == 'uint8' else dtype)


def quantize(values: jax.Array, step: float) -> jax.Array:
  """Top-k logits (largest first, [..., k]) as uint8 steps of `step`
  below the largest, rounded and capped at 255."""
  gaps = jnp.round((values[..., :1] - values) / step)
  return jnp.clip(gaps, 0, 255).astype(jnp.uint8)


def dequantize(steps: np.ndarray, step: float) -> np.ndarray:
  """`quantize`'s steps as float32 logits up to a shift (the largest
  0)."""
  return steps.astype(np.float32) * np.float32(-step)


def _top_k(teacher, temperature: float, k: int, step: float | None = None):
  """Jitted (params, inputs) -> (top-k logits, ids, rest mass at T); the
  logits `quantize`d when `step` is given."""

  @jax.jit
  def fn(params, inputs):
    logits = teacher.apply({'params': params}, inputs)
    values, indices = jax.lax.top_k(logits, k)
    log_p = jax.nn.log_softmax(logits / temperature)
    top = jnp.take_along_axis(log_p, indices, -1)
    rest = jnp.clip(1.0 - jnp.sum(jnp.exp(top), -1), 0.0, 1.0)
    if step is not None:
      values = quantize(values, step)
    return values, indices, rest
  return fn


def _cache_parts(out: str, but: tuple[str, ...] = ()) -> list[str]:
  """What of a cache `out` holds (its manifest, shard folders finished or
  not), but the shard folders `but`."""
  names = sorted(os.listdir(out)) if os.path.isdir(out) else []
  return [name for name in names if name not in but and (
      name == MANIFEST or name.startswith('shard-')
      and os.path.isdir(os.path.join(out, name)))]


def _process_share(process_index: int | None, process_count: int | None
                   ) -> tuple[int, int]:
  """(index, count) of the share to export: as given, or this JAX process
  of all."""
  if (process_index is None) != (process_count is None):
    raise ValueError(
        f'process_index={process_index}, process_count={process_count}: '
        'give both (one shard of an export by process_count processes) or '
        'neither (this JAX process of all).')
  if process_index is None:
    return jax.process_index(), jax.process_count()
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, '
                     f'process_count={process_count}).')
  return process_index, process_count


def _check_export(config: ml_collections.ConfigDict, k: int,
                  temperature: float, dtype: str, layout: str,
                  stride: int | None, step: float) -> int:
  """Refuses bad export settings by name; the positions layout's stride."""
  if not 1 <= k <= config.vocab_size:
    raise ValueError(f'k={k} must be in [1, config.vocab_size '
                     f'{config.vocab_size}].')
  if not temperature > 0:
    raise ValueError(f'temperature={temperature} must be > 0.')
  if dtype not in DTYPES:
    raise ValueError(f'dtype={dtype!r}; choose one of {DTYPES}.')
  if not (np.isfinite(step) and step > 0):
    raise ValueError(f'step={step} must be a finite number > 0 (the uint8 '
                     'logit step).')
  if layout not in LAYOUTS:
    raise ValueError(f'layout={layout!r}; choose one of {LAYOUTS}.')
  if stride is None:
    stride = config.length if layout == 'windows' else max(
        1, config.length // 2)
  if not 1 <= stride <= config.length:
    raise ValueError(f'stride={stride} must be in [1, config.length='
                     f'{config.length}].')
  return stride


def export(config: ml_collections.ConfigDict, out: str, *, k: int,
           temperature: float | None = None, split: str | None = None,
           dtype: str = 'float16', batch_size: int = 64,
           overwrite: bool = False, process_index: int | None = None,
           process_count: int | None = None, layout: str = 'windows',
           stride: int | None = None, step: float = STEP
           ) -> dict[str, Any]:
  """Writes the cache of `config.distill.teacher_workdir`'s teacher over
  `split` (default `config.train_split`) to `out`; its manifest.

  `layout` 'windows' keys the targets by window (windows every `stride`
  tokens, default `config.length`: a tiling), 'positions' by position (the
  teacher reading windows every `stride` tokens, default
  `config.length // 2`; module docstring).

  `temperature` (default `config.distill.temperature`) is the one the tail
  mass is taken at: a run must train at it. `dtype` 'uint8' stores the
  logits as `step`s below each position's largest (module docstring).
  `process_index` of `process_count` (default: this JAX process of all)
  writes that share of the windows to `out/shard-i-of-n/` (`out` itself
  when n is 1).
  """
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  if config.get('task') != 'lm':
    raise ValueError('kd_jax.lm_cache caches a language model\'s teacher: '
                     'give a task=\'lm\' config (configs/shakespeare_char.py);'
                     ' image teachers are cached by kd_jax.export_logits.')
  temperature = float(config.distill.temperature if temperature is None
                      else temperature)
  split = split or config.train_split
  stride = _check_export(config, k, temperature, dtype, layout, stride,
                         step)
  index, count = _process_share(process_index, process_count)
  # Each process checks before any writes (on a shared disk all see the
  # same, and none waits at the barrier for one that refused); the other
  # shards of this export may be there already.
  others = tuple(logits_cache.shard_name(i, count) for i in range(count)
                 if i != index and count > 1)
  if _cache_parts(out, but=others) and not overwrite:
    raise FileExistsError(f'{out} already holds a cache ('
                          f'{_cache_parts(out, but=others)[:3]}); pass '
                          'overwrite=True (--overwrite) to replace it.')
  if not config.distill.teacher_workdir:
    raise ValueError('config.distill.teacher_workdir is empty: name the '
                     'finished LM run whose outputs to cache.')
  tokens = text.load_split(config.dataset, split, config.data_dir)
  length = config.length
  windows = (text.num_windows(len(tokens), stride) if layout == 'windows'
             else _num_position_windows(len(tokens), length, stride))
  if count > windows:
    raise ValueError(f'{count} processes cannot share the {windows} windows '
                     f'of {config.dataset} {split}: export on at most '
                     f'{windows}.')
  if jax.process_count() > 1:
    multihost_utils.sync_global_devices('kd_jax.lm_cache: out checked')
  # This process's own device: a multi-process export runs each share apart.
  mesh = jax.make_mesh((1,), ('data',), devices=jax.local_devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  teacher, params, info = lm_train._load_teacher(config, mesh)  # pylint: disable=protected-access
  directory = out if count == 1 else os.path.join(
      out, logits_cache.shard_name(index, count))
  os.makedirs(directory, exist_ok=True)
  # Invalid until rewritten; process 0 also retires a one-process export.
  logits_cache.remove_manifests([directory] + ([out] if index == 0 else []))
  first, end = text.window_share(windows, index, count)
  value_dtype = np.dtype(dtype)
  write = functools.partial(_write_windows if layout == 'windows'
                            else _write_positions, stride=stride)
  quantized = step if dtype == 'uint8' else None
  write(directory, fn=_top_k(teacher, temperature, k, quantized),
        params=params, tokens=tokens, length=length, k=k,
        windows=(first, end), batch_size=batch_size,
        value_dtype=value_dtype, index_dtype=_index_dtype(config.vocab_size))
  manifest = dict(
      format=FORMAT, teacher_workdir=os.path.abspath(
          config.distill.teacher_workdir),
      teacher_step=info['step'], teacher_model=info['model'],
      teacher_checksum=checkpointing.checksum(params),
      vocab_size=int(config.vocab_size), k=int(k),
      temperature=temperature, length=int(length),
      dataset=config.dataset, split=split,
      corpus_sha256=corpus_checksum(tokens), num_tokens=int(len(tokens)),
      num_windows=int(windows),
      **_storage(int(config.vocab_size), k, dtype, step))
  if layout == 'positions':
    manifest.update(layout=layout, stride=stride,
                    num_positions=max(0, len(tokens) - 1))
  elif stride != length:  # Overlapping windows: a run draws their starts.
    manifest.update(stride=stride)
  if count > 1:
    manifest['shard'] = dict(index=index, count=count, first_window=first,
                             num_windows=end - first)
  tmp = os.path.join(directory, f'{MANIFEST}.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(directory, MANIFEST))
  return manifest


def _storage(vocab_size: int, k: int, dtype: str, step: float
             ) -> dict[str, Any]:
  """The manifest's dtype fields and bytes per token (against dense
  float16 logits)."""
  per_token = (k * np.dtype(dtype).itemsize
               + k * _index_dtype(vocab_size).itemsize
               + _rest_dtype(dtype).itemsize)
  fields = dict(dtype=dtype, bytes_per_token=per_token,
                dense_float16_bytes_per_token=2 * vocab_size)
  if dtype == 'uint8':
    fields.update(step=float(step), rest_dtype=str(_rest_dtype(dtype)))
  return fields


def _open_arrays(directory: str, rows: tuple[int, ...], k: int,
                 value_dtype: np.dtype, index_dtype: np.dtype
                 ) -> dict[str, np.ndarray]:
  """The cache's `.npy` files in `directory`, memory-mapped for writing:
  `rows` (the leading shape) by k, and the tail mass by `rows`."""
  shapes = dict(topk_logits=((*rows, k), value_dtype),
                topk_indices=((*rows, k), index_dtype),
                rest_mass=(rows, _rest_dtype(value_dtype.name)))
  return {name: np.lib.format.open_memmap(
      os.path.join(directory, f'{name}.npy'), mode='w+', dtype=d, shape=s)
          for name, (s, d) in shapes.items()}


def _write_windows(directory: str, *, fn, params, tokens: np.ndarray,
                   length: int, k: int, windows: tuple[int, int],
                   batch_size: int, value_dtype: np.dtype,
                   index_dtype: np.dtype, stride: int) -> None:
  """The arrays of windows first .. end - 1 (`windows`, window w starting
  at token w * stride), row w - first for window w, from `fn`'s teacher
  outputs."""
  first, end = windows
  arrays = _open_arrays(directory, (end - first, length), k, value_dtype,
                        index_dtype)
  for chunk in range(first, end, batch_size):
    w = np.arange(chunk, min(chunk + batch_size, end))
    batch = text.windows_at(tokens, w * stride, length)
    values, indices, rest = jax.device_get(fn(params, batch['inputs']))
    w, valid = w - first, batch['mask']
    arrays['topk_logits'][w] = np.where(valid[..., None], values, 0)
    arrays['topk_indices'][w] = np.where(valid[..., None], indices, 0)
    arrays['rest_mass'][w] = np.where(valid, rest, 0)
  for array in arrays.values():
    array.flush()


def _num_position_windows(num_tokens: int, length: int, stride: int) -> int:
  """The teacher's windows of a positions cache: window 0 gives targets
  0 .. length - 1, window j > 0 (start j * stride) the targets
  j * stride + length - stride .. j * stride + length - 1.

  >>> _num_position_windows(11, 4, 2)  # Targets 0..9: 4, then 2, 2, 2.
  4
  """
  return 1 + max(0, -(-(num_tokens - 1 - length) // stride))


def _position_rows(window: int, length: int, stride: int) -> tuple[int, int]:
  """(first, end) targets that the teacher's `window` gives a positions
  cache."""
  if window == 0:
    return 0, length
  return window * stride + length - stride, window * stride + length


def _share_rows(windows: tuple[int, int], num_positions: int, length: int,
                stride: int) -> tuple[int, int]:
  """(first, end) rows of a positions cache that windows first .. end - 1
  give."""
  first, end = windows
  return (min(_position_rows(first, length, stride)[0], num_positions),
          min(_position_rows(end - 1, length, stride)[1], num_positions))


def _write_positions(directory: str, *, fn, params, tokens: np.ndarray,
                     length: int, k: int, windows: tuple[int, int],
                     batch_size: int, value_dtype: np.dtype,
                     index_dtype: np.dtype, stride: int) -> None:
  """The rows (targets) that windows first .. end - 1 of a positions
  cache give, from `fn`'s teacher outputs over those windows."""
  num_positions = len(tokens) - 1
  lo, hi = _share_rows(windows, num_positions, length, stride)
  arrays = _open_arrays(directory, (hi - lo,), k, value_dtype, index_dtype)
  for chunk in range(windows[0], windows[1], batch_size):
    js = np.arange(chunk, min(chunk + batch_size, windows[1]))
    batch = text.windows_at(tokens, js * stride, length)
    values, indices, rest = jax.device_get(fn(params, batch['inputs']))
    for row, j in enumerate(js):
      first, end = _position_rows(int(j), length, stride)
      end = min(end, num_positions)
      p = np.arange(first, end) - j * stride  # Positions in the window.
      arrays['topk_logits'][first - lo:end - lo] = values[row, p]
      arrays['topk_indices'][first - lo:end - lo] = indices[row, p]
      arrays['rest_mass'][first - lo:end - lo] = rest[row, p]
  for array in arrays.values():
    array.flush()


@dataclasses.dataclass(frozen=True)
class Shard:
  """One table of a cache, memory-mapped: rows first_row ..
  first_row + len(rest_mass) - 1 of the split (windows, or targets of a
  positions cache)."""
  name: str  # '' for a one-process export, else shard-i-of-n.
  first_row: int
  topk_logits: np.ndarray
  topk_indices: np.ndarray
  rest_mass: np.ndarray


@dataclasses.dataclass(frozen=True)
class Cache:
  """A loaded cache: its manifest (the export's; a shard's without its
  `shard` entry) and the shards this process reads."""
  manifest: dict[str, Any]
  shards: tuple[Shard, ...]
  num_shares: int  # The train rows' shares: the export's process count
  # (1 for a positions cache, whose rows are drawn anywhere).

  @property
  def layout(self) -> str:
    return self.manifest.get('layout', 'windows')

  @property
  def stride(self) -> int:
    """Tokens between the teacher's windows' starts (the window length
    for a tiling)."""
    return self.manifest.get('stride', self.manifest['length'])


# Where a manifest's value comes from in the run's config, if it does.
_FIXES = dict(vocab_size='config.vocab_size', length='config.length',
              temperature='config.distill.temperature',
              dataset='config.dataset', split='config.train_split')


def _shard_names(cache_dir: str) -> list[str]:
  """[''] for a one-process export, else its shard-i-of-n folders in order
  (`teachers.cache.cache_shards`: missing or mixed ones refused by name)."""
  field = 'config.distill.cache_dir'
  if not _cache_parts(cache_dir):
    raise FileNotFoundError(
        f'{field}={cache_dir!r} holds no cache '
        f'({os.path.join(cache_dir, MANIFEST)} is missing; an export cut '
        'short leaves none): write it with python -m kd_jax.lm_cache '
        f'--config=... --out={cache_dir}.')
  return logits_cache.cache_shards(cache_dir, '')


def _check_shard(cache_dir: str, name: str, manifest: dict[str, Any],
                 first: dict[str, Any], count: int) -> tuple[int, int]:
  """(first window, windows) of shard `name`, refused by name when it is
  not the share `name` says of the export `first` (shard 0's manifest)."""
  where = f'config.distill.cache_dir={cache_dir!r}: {name}'
  differ = sorted(key for key in set(first) | set(manifest)
                  if key != 'shard' and first.get(key) != manifest.get(key))
  if differ:
    raise ValueError(f'{where} and {logits_cache.shard_name(0, count)} '
                     f'come from two exports (they differ in {differ}): '
                     'export again into an empty --out.')
  if count == 1:
    return 0, manifest['num_windows']
  index = int(name.split('-')[1])
  share = text.window_share(manifest['num_windows'], index, count)
  got = manifest.get('shard', {})
  if (got.get('index'), got.get('count'), got.get('first_window'),
      got.get('first_window', 0) + got.get('num_windows', 0)) != (
          index, count, *share):
    raise ValueError(f'{where} records the share {got}, not windows '
                     f'{share[0]}..{share[1] - 1} of {count}: export again '
                     'into an empty --out.')
  return share[0], share[1] - share[0]


def load(cache_dir: str, config: ml_collections.ConfigDict,
         tokens: np.ndarray, split: str | None = None, *,
         process_index: int | None = None,
         process_count: int | None = None) -> Cache:
  """The cache in `cache_dir`, checked against the run of `config` that
  trains on `tokens` (its `split`, default `config.train_split`); of a
  cache exported by n processes, on n processes (`process_index` of
  `process_count`, default this JAX process of all) only this process's
  shard, else every shard."""
  field = 'config.distill.cache_dir'
  names = _shard_names(cache_dir)
  manifests = []
  for name in names:
    with open(os.path.join(cache_dir, name, MANIFEST)) as f:
      manifests.append(json.load(f))
  manifest = {k: v for k, v in manifests[0].items() if k != 'shard'}
  split = split or config.train_split
  wanted = dict(format=FORMAT, vocab_size=config.vocab_size,
                length=config.length,
                temperature=float(config.distill.temperature),
                dataset=config.dataset, split=split,
                corpus_sha256=corpus_checksum(tokens))
  for key, value in wanted.items():
    if manifest.get(key) != value:
      fix = (f'set {_FIXES[key]}={manifest.get(key)!r} or export the cache '
             'again for this run' if key in _FIXES else
             'export the cache again from the text the run reads')
      raise ValueError(f'{field}={cache_dir!r} was written for {key}='
                       f'{manifest.get(key)!r}; this run has {value!r}: '
                       f'{fix}.')
  if manifest.get('layout', 'windows') not in LAYOUTS:
    raise ValueError(f'{field}={cache_dir!r} has layout '
                     f'{manifest["layout"]!r}, which this kd_jax does not '
                     f'read ({LAYOUTS}): export the cache again.')
  if manifest.get('dtype') not in DTYPES or (
      manifest['dtype'] == 'uint8' and not manifest.get('step', 0) > 0):
    raise ValueError(f'{field}={cache_dir!r} has dtype '
                     f'{manifest.get("dtype")!r} (step '
                     f'{manifest.get("step")!r}), which this kd_jax does not '
                     f'read ({DTYPES}, uint8 with a step > 0): export the '
                     'cache again.')
  shares = [_check_shard(cache_dir, name, m, manifests[0], len(names))
            for name, m in zip(names, manifests)]
  if process_index is None:
    process_index, process_count = jax.process_index(), jax.process_count()
  if manifest.get('layout', 'windows') == 'positions':
    rows = [_share_rows((first, first + n), manifest['num_positions'],
                        manifest['length'], manifest['stride'])
            for first, n in shares]
    return Cache(manifest=manifest, num_shares=1, shards=tuple(
        _open_shard(cache_dir, name, first, (end - first,),
                    manifest['dtype'])
        for name, (first, end) in zip(names, rows)))
  local = logits_cache.local_shards(names, process_index, process_count)
  return Cache(manifest=manifest, num_shares=len(names), shards=tuple(
      _open_shard(cache_dir, name, shares[names.index(name)][0],
                  (shares[names.index(name)][1], manifest['length']),
                  manifest['dtype'])
      for name in local))


def _open_shard(cache_dir: str, name: str, first: int,
                shape: tuple[int, ...], dtype: str) -> Shard:
  """Shard `name` of `cache_dir`, its arrays' leading `shape` and the
  value and tail dtypes (the manifest's `dtype`) checked."""
  directory = os.path.join(cache_dir, name)
  arrays = {array: np.load(os.path.join(directory, f'{array}.npy'),
                           mmap_mode='r') for array in FILES}
  dtypes = dict(topk_logits=np.dtype(dtype), rest_mass=_rest_dtype(dtype))
  for array, values in arrays.items():
    if values.shape[:len(shape)] != shape:
      raise ValueError(f'config.distill.cache_dir={cache_dir!r}: '
                       f'{os.path.join(name, array)}.npy has shape '
                       f'{values.shape}, not the manifest\'s {shape}; '
                       'export the cache again.')
    if array in dtypes and values.dtype != dtypes[array]:
      raise ValueError(f'config.distill.cache_dir={cache_dir!r}: '
                       f'{os.path.join(name, array)}.npy holds '
                       f'{values.dtype}, not the {dtypes[array]} of the '
                       f'manifest\'s dtype {dtype!r}; export the cache '
                       'again.')
  return Shard(name=name, first_row=first, **arrays)


def _gather(cache: Cache, array: str, windows: np.ndarray,
            valid: np.ndarray) -> np.ndarray:
  """Rows `windows` of `array` from the loaded shards; zeros where not
  `valid`."""
  like = getattr(cache.shards[0], array)
  out = np.zeros((len(windows), *like.shape[1:]), like.dtype)
  found = ~valid
  for shard in cache.shards:
    values = getattr(shard, array)
    rows = valid & (windows >= shard.first_row) & (
        windows < shard.first_row + len(values))
    out[rows] = values[windows[rows] - shard.first_row]
    found |= rows
  if not found.all():
    raise ValueError(
        f'windows {windows[~found][:3].tolist()} are in none of the shards '
        f'this process loaded ({[s.name for s in cache.shards]}): draw '
        f'train batches with text.train_batch(shares={cache.num_shares}).')
  return out


def lookup(cache: Cache, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """`batch` (aligned windows for the windows layout, any for positions;
  `start` -1 for padding rows) with its sparse teacher targets added:
  `topk_logits` float32 [B, L, k] (of a uint8 cache: `dequantize`d, the
  largest 0), `topk_indices` int32 [B, L, k], `rest_mass` float32 [B, L];
  zeros where `mask` is False."""
  length = cache.manifest['length']
  if cache.layout == 'positions':
    # Target t of row b is token start[b] + 1 + t: row start[b] + t.
    rows = (batch['start'][:, None] + np.arange(batch['mask'].shape[1]))
    valid = batch['mask'] & (batch['start'][:, None] >= 0)
    shape = rows.shape
    rows, valid = np.where(valid, rows, 0).ravel(), valid.ravel()
  else:
    rows, valid = text.aligned_windows(batch['start'], cache.stride)
    shape = rows.shape
  out = dict(batch)
  for array, dtype in (('topk_logits', np.float32),
                       ('topk_indices', np.int32),
                       ('rest_mass', np.float32)):
    values = _gather(cache, array, rows, valid)
    if array == 'topk_logits' and cache.manifest['dtype'] == 'uint8':
      values = dequantize(values, cache.manifest['step'])
    out[array] = values.reshape(*shape, *values.shape[1:]).astype(dtype)
  return out


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from kd_jax import multihost  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'An LM config (task lm).',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'The cache folder.')
  flags.DEFINE_integer('k', 16, 'Tokens kept per position.')
  flags.DEFINE_float('temperature', None, 'Temperature of the tail mass '
                     '(default: config.distill.temperature).')
  flags.DEFINE_string('split', None, 'Split (default: config.train_split).')
  flags.DEFINE_enum('dtype', 'float16', DTYPES, 'The top-k logits\' dtype; '
                    'uint8: steps of --step below each position\'s '
                    'largest (the tail mass in float16).')
  flags.DEFINE_float('step', STEP, 'The logit step of a uint8 cache.')
  flags.DEFINE_bool('overwrite', False, 'Replace a cache in --out.')
  flags.DEFINE_enum('layout', 'windows', LAYOUTS, 'windows: keyed by tiling '
                    'window (a run draws those); positions: by position (a '
                    'run draws windows anywhere).')
  flags.DEFINE_integer('stride', None, 'The teacher\'s windows start '
                       'every stride tokens (default: length for windows, '
                       'a tiling; length // 2 for positions).')
  multihost.define_flags()
  flags.mark_flags_as_required(['config', 'out'])


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from kd_jax import multihost  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  multihost.initialize(f)
  manifest = export(f.config, f.out, k=f.k, temperature=f.temperature,
                    split=f.split, dtype=f.dtype, overwrite=f.overwrite,
                    layout=f.layout, stride=f.stride, step=f.step)
  where = f.out
  if 'shard' in manifest:
    share = manifest['shard']
    name = logits_cache.shard_name(share['index'], share['count'])
    where = (f'{os.path.join(f.out, name)} ({share["num_windows"]:,} of '
             'them)')
  layout = (f' (positions, teacher windows every {manifest["stride"]})'
            if manifest.get('layout') == 'positions' else '')
  print(f'{manifest["num_windows"]:,} windows x {manifest["length"]} tokens '
        f'of {manifest["dataset"]} {manifest["split"]}, top {manifest["k"]} '
        f'at T={manifest["temperature"]}: {manifest["bytes_per_token"]} bytes '
        f'per token ({manifest["dense_float16_bytes_per_token"]} dense in '
        f'float16){layout}: {where}')


if __name__ == '__main__':
  from kd_jax import progress  # pylint: disable=g-import-not-at-top
  progress.run_quiet_cli(main, define_flags)
