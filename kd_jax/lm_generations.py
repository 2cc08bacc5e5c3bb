"""Sequence-level KD's text, generated once: the teacher's completions of
every window of a split, stored for the runs that train on them.

  python -m kd_jax.lm_generations \
      --config=configs/shakespeare_char.py:role=distill,distill.teacher_workdir=workdirs/shakespeare_teacher \
      --out=workdirs/shakespeare_seqkd

Sequence-level KD (Kim and Rush 2016) trains the student on the teacher's
outputs for the training inputs, generated once. The split is cut into the
windows `kd_jax.data.text.eval_batches` tiles it with (window w: inputs
from token w * L, L = config.length), as `kd_jax.lm_cache` does; the
teacher completes each window's first `distill.generation.prompt_length`
tokens to L + 1 tokens at `distill.generation.temperature` and `top_k`,
`batch_size` windows at a time in order, batch b drawn with
`fold_in(key(seed), b)`. The folder holds

- `inputs.npy`, `targets.npy` [W, L] (uint8; int32 above 256 tokens): each
  window's prompt and completion, laid out as a train batch;
- `mask.npy` [W, L] bool: the targets the student is graded on (the
  completion's, from the prompt's last position on);
- `manifest.json`: the teacher (workdir, step, checksum of its params),
  the sampling settings, vocabulary, window length, dataset, split and the
  SHA-256 of its tokens, written last.

A run with `distill.generation.schedule='once'`, `source='teacher'` and
`cache_dir` this folder trains, with probability `fraction` per step, on
its windows' stored completions instead of their text (it draws the
aligned windows, `text.train_batch(aligned=True)`); `load` checks the
manifest against the run and its teacher, field by field.

Reference:
  Kim and Rush, `Sequence-Level Knowledge Distillation
  <https://arxiv.org/abs/1606.07947>`_, EMNLP 2016.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np

from kd_jax import checkpointing
from kd_jax.data import text

__all__ = ['Generations', 'export', 'load', 'lookup']

MANIFEST = 'manifest.json'
FORMAT = 1
FILES = ('inputs', 'targets', 'mask')
PREFIX = 'generated_'  # on_policy._STORED: the step's batch keys.


def _token_dtype(vocab_size: int) -> np.dtype:
  return np.dtype(np.uint8 if vocab_size <= 256 else np.int32)


def _sampling(config) -> dict[str, Any]:
  g = config.distill.generation
  return dict(prompt_length=int(g.prompt_length),
              temperature=float(g.temperature), top_k=int(g.top_k))


def export(config: ml_collections.ConfigDict, out: str, *, seed: int = 0,
           split: str | None = None, batch_size: int = 64,
           overwrite: bool = False) -> dict[str, Any]:
  """Writes the teacher's completions of every window of `split` (default
  `config.train_split`) to `out`; its manifest."""
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  from kd_jax import on_policy  # pylint: disable=g-import-not-at-top
  if config.get('task') != 'lm':
    raise ValueError('kd_jax.lm_generations generates a language model\'s '
                     'text: give a task=\'lm\' config '
                     '(configs/shakespeare_char.py).')
  if not config.distill.teacher_workdir:
    raise ValueError('config.distill.teacher_workdir is empty: name the '
                     'finished LM run that generates.')
  if os.path.exists(os.path.join(out, MANIFEST)) and not overwrite:
    raise FileExistsError(f'{out} already holds generations; pass '
                          'overwrite=True (--overwrite) to replace them.')
  g = config.distill.generation
  if not 1 <= g.prompt_length < config.length:
    raise ValueError(f'config.distill.generation.prompt_length='
                     f'{g.prompt_length} must be in [1, config.length='
                     f'{config.length}).')
  split = split or config.train_split
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  teacher, params, info = lm_train._load_teacher(config, mesh)  # pylint: disable=protected-access
  tokens = text.load_split(config.dataset, split, config.data_dir)
  length, windows = config.length, text.num_windows(len(tokens), config.length)
  os.makedirs(out, exist_ok=True)
  if os.path.exists(os.path.join(out, MANIFEST)):
    os.remove(os.path.join(out, MANIFEST))  # Invalid until rewritten.
  dtype = _token_dtype(config.vocab_size)
  arrays = {name: np.lib.format.open_memmap(
      os.path.join(out, f'{name}.npy'), mode='w+',
      dtype=bool if name == 'mask' else dtype, shape=(windows, length))
            for name in FILES}
  generate = jax.jit(lambda batch, key: on_policy.generated_text(
      batch, key, g, teacher, {'params': params}))
  for index, batch in enumerate(text.eval_batches(
      tokens, batch_size=batch_size, length=length)):
    rows = batch['start'] >= 0
    out_batch = jax.device_get(generate(
        {k: batch[k] for k in FILES},
        jax.random.fold_in(jax.random.key(seed), index)))
    w = batch['start'][rows] // length
    for name in FILES:
      arrays[name][w] = out_batch[name][rows]
  for array in arrays.values():
    array.flush()
  del arrays
  manifest = dict(
      format=FORMAT, teacher_workdir=os.path.abspath(
          config.distill.teacher_workdir),
      teacher_step=info['step'], teacher_model=info['model'],
      teacher_checksum=checkpointing.checksum(params),
      vocab_size=int(config.vocab_size), length=int(length),
      dataset=config.dataset, split=split,
      corpus_sha256=_corpus_checksum(tokens), num_tokens=int(len(tokens)),
      num_windows=int(windows), seed=int(seed), batch_size=int(batch_size),
      **_sampling(config))
  tmp = os.path.join(out, f'{MANIFEST}.tmp')
  with open(tmp, 'w') as f:
    json.dump(manifest, f, indent=2)
  os.replace(tmp, os.path.join(out, MANIFEST))
  return manifest


def _corpus_checksum(tokens: np.ndarray) -> str:
  from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top
  return lm_cache.corpus_checksum(tokens)


@dataclasses.dataclass(frozen=True)
class Generations:
  """Loaded generations: the manifest and memory-mapped arrays."""
  manifest: dict[str, Any]
  inputs: np.ndarray
  targets: np.ndarray
  mask: np.ndarray


def load(cache_dir: str, config: ml_collections.ConfigDict,
         tokens: np.ndarray, teacher_params) -> Generations:
  """The generations in `cache_dir`, checked against the run of `config`
  that trains on `tokens` with the teacher of `teacher_params`."""
  field = 'config.distill.generation.cache_dir'
  path = os.path.join(cache_dir, MANIFEST)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{field}={cache_dir!r} holds no generations ({path} is missing; an '
        'export cut short leaves none): write them with python -m '
        f'kd_jax.lm_generations --config=... --out={cache_dir}.')
  with open(path) as f:
    manifest = json.load(f)
  fields = dict(vocab_size='config.vocab_size', length='config.length',
                dataset='config.dataset', split='config.train_split',
                prompt_length='config.distill.generation.prompt_length',
                temperature='config.distill.generation.temperature',
                top_k='config.distill.generation.top_k')
  wanted = dict(vocab_size=config.vocab_size, length=config.length,
                dataset=config.dataset, split=config.train_split,
                **_sampling(config))
  for key, value in wanted.items():
    if manifest.get(key) != value:
      raise ValueError(f'{field}={cache_dir!r} was generated for {key}='
                       f'{manifest.get(key)!r}; this run has {fields[key]}='
                       f'{value!r}: set it so, or generate again for this '
                       'run.')
  if manifest.get('corpus_sha256') != _corpus_checksum(tokens):
    raise ValueError(f'{field}={cache_dir!r} was generated from other text '
                     f'than {config.dataset} {config.train_split}: generate '
                     'again from the text the run reads.')
  if manifest.get('teacher_checksum') != checkpointing.checksum(
      teacher_params):
    raise ValueError(f'{field}={cache_dir!r} was generated by another '
                     f'teacher ({manifest.get("teacher_workdir")} at step '
                     f'{manifest.get("teacher_step")}) than '
                     'config.distill.teacher_workdir: generate again with '
                     'the run\'s teacher.')
  arrays = {name: np.load(os.path.join(cache_dir, f'{name}.npy'),
                          mmap_mode='r') for name in FILES}
  expected = (manifest['num_windows'], manifest['length'])
  for name, array in arrays.items():
    if array.shape != expected:
      raise ValueError(f'{field}={cache_dir!r}: {name}.npy has shape '
                       f'{array.shape}, not the manifest\'s {expected}; '
                       'generate again.')
  return Generations(manifest=manifest, **arrays)


def lookup(generations: Generations, batch: dict[str, np.ndarray]
           ) -> dict[str, np.ndarray]:
  """`batch` (aligned windows; `start` -1 for padding rows) with its
  windows' stored completions added as `generated_inputs`,
  `generated_targets` (int32) and `generated_mask` [B, L]."""
  length = generations.manifest['length']
  w, valid = text.aligned_windows(batch['start'], length)
  out = dict(batch)
  for name in FILES:
    value = getattr(generations, name)[w]
    out[PREFIX + name] = np.where(
        valid[:, None], value, False if name == 'mask' else 0).astype(
            bool if name == 'mask' else np.int32)
  return out


def define_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  config_flags.DEFINE_config_file('config', None, 'An LM config (task lm).',
                                  lock_config=True)
  flags.DEFINE_string('out', None, 'The generations\' folder.')
  flags.DEFINE_integer('seed', 0, 'Sampling seed.')
  flags.DEFINE_string('split', None, 'Split (default: config.train_split).')
  flags.DEFINE_integer('batch_size', 64, 'Windows generated at a time.')
  flags.DEFINE_bool('overwrite', False, 'Replace generations in --out.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv) -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top
  f = flags.FLAGS
  if len(argv) > 1:
    raise ValueError(f'Unexpected arguments: {argv[1:]}')
  m = export(f.config, f.out, seed=f.seed, split=f.split,
             batch_size=f.batch_size, overwrite=f.overwrite)
  print(f'{m["num_windows"]:,} windows x {m["length"]} tokens of '
        f'{m["dataset"]} {m["split"]}, completed after {m["prompt_length"]} '
        f'at T={m["temperature"]}: {f.out}')


if __name__ == '__main__':
  from kd_jax import progress  # pylint: disable=g-import-not-at-top
  progress.run_quiet_cli(main, define_flags)
