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
  k largest logits, largest first;
- `topk_indices.npy` [W, L, k] uint8 (int32 above 256 tokens): their ids;
- `rest_mass.npy` [W, L] (`dtype`): the teacher's probability of every
  other token at `temperature`, the tail bucket of
  `losses.sparse_token_divergence`;
- `manifest.json`: the teacher (workdir, step, checksum of its params,
  model), vocabulary, k, temperature, window length, dataset, split, the
  SHA-256 of the split's tokens, the counts, dtypes and the storage per
  token beside a dense float16 cache's.

`load` checks the manifest against the run that reads it (vocabulary,
window length, temperature, dataset and split, the tokens' checksum) and
refuses a mismatch by field; `lookup` gives a batch's sparse targets from
its windows' starts. Positions past the split's end hold zeros and are
masked in the batch.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpointing
from kd_jax.data import text

__all__ = ['Cache', 'export', 'load', 'lookup']

MANIFEST = 'manifest.json'
FORMAT = 1
FILES = ('topk_logits', 'topk_indices', 'rest_mass')


def corpus_checksum(tokens: np.ndarray) -> str:
  return hashlib.sha256(np.ascontiguousarray(tokens).tobytes()).hexdigest()


def _index_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 256 else np.int32)


def _top_k(teacher, temperature: float, k: int):
  """Jitted (params, inputs) -> (top-k logits, ids, rest mass at T)."""

  @jax.jit
  def fn(params, inputs):
    logits = teacher.apply({'params': params}, inputs)
    values, indices = jax.lax.top_k(logits, k)
    log_p = jax.nn.log_softmax(logits / temperature)
    top = jnp.take_along_axis(log_p, indices, -1)
    rest = jnp.clip(1.0 - jnp.sum(jnp.exp(top), -1), 0.0, 1.0)
    return values, indices, rest
  return fn


def export(config: ml_collections.ConfigDict, out: str, *, k: int,
           temperature: float | None = None, split: str | None = None,
           dtype: str = 'float16', batch_size: int = 64,
           overwrite: bool = False) -> dict[str, Any]:
  """Writes the cache of `config.distill.teacher_workdir`'s teacher over
  `split` (default `config.train_split`) to `out`; its manifest.

  `temperature` (default `config.distill.temperature`) is the one the tail
  mass is taken at: a run must train at it.
  """
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  if config.get('task') != 'lm':
    raise ValueError('kd_jax.lm_cache caches a language model\'s teacher: '
                     'give a task=\'lm\' config (configs/shakespeare_char.py);'
                     ' image teachers are cached by kd_jax.export_logits.')
  temperature = float(config.distill.temperature if temperature is None
                      else temperature)
  split = split or config.train_split
  if not 1 <= k <= config.vocab_size:
    raise ValueError(f'k={k} must be in [1, config.vocab_size '
                     f'{config.vocab_size}].')
  if not temperature > 0:
    raise ValueError(f'temperature={temperature} must be > 0.')
  if dtype not in ('float16', 'float32'):
    raise ValueError(f'dtype={dtype!r}; choose float16 or float32.')
  if os.path.exists(os.path.join(out, MANIFEST)) and not overwrite:
    raise FileExistsError(f'{out} already holds a cache; pass '
                          'overwrite=True (--overwrite) to replace it.')
  if not config.distill.teacher_workdir:
    raise ValueError('config.distill.teacher_workdir is empty: name the '
                     'finished LM run whose outputs to cache.')
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  teacher, params, info = lm_train._load_teacher(config, mesh)  # pylint: disable=protected-access
  tokens = text.load_split(config.dataset, split, config.data_dir)
  length = config.length
  windows = text.num_windows(len(tokens), length)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, MANIFEST)):
    os.remove(os.path.join(out, MANIFEST))  # Invalid until rewritten.
  value_dtype = np.dtype(dtype)
  shapes = dict(topk_logits=((windows, length, k), value_dtype),
                topk_indices=((windows, length, k),
                              _index_dtype(config.vocab_size)),
                rest_mass=((windows, length), value_dtype))
  arrays = {name: np.lib.format.open_memmap(
      os.path.join(out, f'{name}.npy'), mode='w+', dtype=d, shape=s)
            for name, (s, d) in shapes.items()}
  fn = _top_k(teacher, temperature, k)
  for batch in text.eval_batches(tokens, batch_size=batch_size,
                                 length=length):
    rows = batch['start'] >= 0
    values, indices, rest = jax.device_get(fn(params, batch['inputs']))
    w = batch['start'][rows] // length
    valid = batch['mask'][rows]
    arrays['topk_logits'][w] = np.where(valid[..., None], values[rows], 0)
    arrays['topk_indices'][w] = np.where(valid[..., None], indices[rows], 0)
    arrays['rest_mass'][w] = np.where(valid, rest[rows], 0)
  for array in arrays.values():
    array.flush()
  del arrays
  item_bytes = (k * value_dtype.itemsize
                + k * _index_dtype(config.vocab_size).itemsize
                + value_dtype.itemsize)
  manifest = dict(
      format=FORMAT, teacher_workdir=os.path.abspath(
          config.distill.teacher_workdir),
      teacher_step=info['step'], teacher_model=info['model'],
      teacher_checksum=checkpointing.checksum(params),
      vocab_size=int(config.vocab_size), k=int(k),
      temperature=temperature, length=int(length),
      dataset=config.dataset, split=split,
      corpus_sha256=corpus_checksum(tokens), num_tokens=int(len(tokens)),
      num_windows=int(windows), dtype=dtype,
      bytes_per_token=item_bytes,
      dense_float16_bytes_per_token=2 * int(config.vocab_size))
  tmp = os.path.join(out, f'{MANIFEST}.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(out, MANIFEST))
  return manifest


@dataclasses.dataclass(frozen=True)
class Cache:
  """A loaded cache: its manifest and memory-mapped arrays."""
  manifest: dict[str, Any]
  topk_logits: np.ndarray
  topk_indices: np.ndarray
  rest_mass: np.ndarray


def load(cache_dir: str, config: ml_collections.ConfigDict,
         tokens: np.ndarray, split: str | None = None) -> Cache:
  """The cache in `cache_dir`, checked against the run of `config` that
  trains on `tokens` (its `split`, default `config.train_split`)."""
  field = 'config.distill.cache_dir'
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{field}={cache_dir!r} holds no cache ({path} is missing; an export '
        'cut short leaves none): write it with python -m kd_jax.lm_cache '
        f'--config=... --out={cache_dir}.')
  with open(path) as f:
    manifest = json.load(f)
  split = split or config.train_split
  wanted = dict(format=FORMAT, vocab_size=config.vocab_size,
                length=config.length,
                temperature=float(config.distill.temperature),
                dataset=config.dataset, split=split,
                corpus_sha256=corpus_checksum(tokens))
  fixes = dict(vocab_size='config.vocab_size', length='config.length',
               temperature='config.distill.temperature',
               dataset='config.dataset', split='config.train_split')
  for key, value in wanted.items():
    if manifest.get(key) != value:
      fix = (f'set {fixes[key]}={manifest.get(key)!r} or export the cache '
             'again for this run' if key in fixes else
             'export the cache again from the text the run reads')
      raise ValueError(f'{field}={cache_dir!r} was written for {key}='
                       f'{manifest.get(key)!r}; this run has {value!r}: '
                       f'{fix}.')
  arrays = {name: np.load(os.path.join(cache_dir, f'{name}.npy'),
                          mmap_mode='r') for name in FILES}
  expected = (manifest['num_windows'], manifest['length'])
  for name, array in arrays.items():
    if array.shape[:2] != expected:
      raise ValueError(f'{field}={cache_dir!r}: {name}.npy has shape '
                       f'{array.shape}, not the manifest\'s {expected}; '
                       'export the cache again.')
  return Cache(manifest=manifest, **arrays)


def lookup(cache: Cache, batch: dict[str, np.ndarray]) -> dict[str, Any]:
  """`batch` (aligned windows; `start` -1 for padding rows) with its sparse
  teacher targets added: `topk_logits` float32 [B, L, k], `topk_indices`
  int32 [B, L, k], `rest_mass` float32 [B, L]."""
  length = cache.manifest['length']
  starts = batch['start']
  if np.any((starts >= 0) & (starts % length != 0)):
    raise ValueError('lookup takes aligned windows (starts at multiples of '
                     f'{length}): cut train batches with '
                     'text.train_batch(aligned=True).')
  w = np.where(starts >= 0, starts // length, 0)
  valid = starts >= 0
  out = dict(batch)
  out['topk_logits'] = np.where(valid[:, None, None], cache.topk_logits[w],
                                0).astype(np.float32)
  out['topk_indices'] = np.where(valid[:, None, None], cache.topk_indices[w],
                                 0).astype(np.int32)
  out['rest_mass'] = np.where(valid[:, None], cache.rest_mass[w],
                              0).astype(np.float32)
  return out


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'An LM config (task lm).',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'The cache folder.')
  flags.DEFINE_integer('k', 16, 'Tokens kept per position.')
  flags.DEFINE_float('temperature', None, 'Temperature of the tail mass '
                     '(default: config.distill.temperature).')
  flags.DEFINE_string('split', None, 'Split (default: config.train_split).')
  flags.DEFINE_string('dtype', 'float16', 'float16 or float32.')
  flags.DEFINE_bool('overwrite', False, 'Replace a cache in --out.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  manifest = export(f.config, f.out, k=f.k, temperature=f.temperature,
                    split=f.split, dtype=f.dtype, overwrite=f.overwrite)
  print(f'{manifest["num_windows"]:,} windows x {manifest["length"]} tokens '
        f'of {manifest["dataset"]} {manifest["split"]}, top {manifest["k"]} '
        f'at T={manifest["temperature"]}: {manifest["bytes_per_token"]} bytes '
        f'per token ({manifest["dense_float16_bytes_per_token"]} dense in '
        f'float16): {f.out}')


if __name__ == '__main__':
  from kd_jax import progress  # pylint: disable=g-import-not-at-top
  progress.run_quiet_cli(main, define_flags)
