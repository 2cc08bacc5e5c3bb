r"""Accuracy of a specialist ensemble: generalist alone vs the combination.

  python -m kd_jax.specialists.evaluate \
      --config=configs/specialists_mnist5k.py:role=distill \
      --out=workdirs/specialists_mnist5k/combination [--split=test]

loads the generalist and the specialists of a `teacher_source='specialists'`
config (`teachers.load_specialist_ensemble`), runs them over an eval split
(default the first of `config.eval_splits`) and writes `OUT/combination.json`
and `OUT/combination.md`: the top-1 accuracy of the generalist and of the
combination, how many specialists were active per example, and Hinton,
Vinyals & Dean's (2015) table of accuracy changes by the number of active
specialists whose group holds the true class
(`specialists.coverage_breakdown`).
"""

from __future__ import annotations

import json
import math
import os
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from kd_jax import input_pipeline
from kd_jax import progress
from kd_jax import specialists
from kd_jax import teachers

SINGLE_PROCESS = dict(num_devices=1, process_index=0, process_count=1)


def evaluate(config: ml_collections.ConfigDict,
             split: str | None = None) -> dict[str, Any]:
  """Generalist vs combination on `split`; see the module docstring."""
  split = split or config.eval_splits[0]
  info = input_pipeline.get_datasets(config, **SINGLE_PROCESS).info
  ensemble = teachers.load_specialist_ensemble(config, info)
  combine = jax.jit(lambda v, images: ensemble.combine(v, {'image': images}))
  parts = {k: [] for k in ('log_q', 'generalist_logits', 'active', 'label')}
  for batch in input_pipeline.iterate_split(config, split, **SINGLE_PROCESS):
    out = jax.device_get(combine(ensemble.variables, batch['image']))
    mask = batch['mask']
    for k in ('log_q', 'generalist_logits', 'active'):
      parts[k].append(np.asarray(out[k])[mask])
    parts['label'].append(batch['label'][mask])
  log_q, generalist_logits, active, labels = (
      np.concatenate(parts[k]) for k in ('log_q', 'generalist_logits',
                                         'active', 'label'))
  rows = specialists.coverage_breakdown(log_q, generalist_logits, labels,
                                        ensemble.membership, active)
  generalist_correct = np.argmax(generalist_logits, -1) == labels
  combined_correct = np.argmax(log_q, -1) == labels
  num_active = np.bincount(active.sum(-1), minlength=len(ensemble.groups) + 1)
  return dict(
      split=split, num_examples=int(len(labels)),
      generalist_accuracy=float(generalist_correct.mean()),
      combined_accuracy=float(combined_correct.mean()),
      generalist_errors=int((~generalist_correct).sum()),
      combined_errors=int((~combined_correct).sum()),
      top_n=ensemble.top_n,
      groups=[[str(info.class_names[c]) for c in g] for g in ensemble.groups],
      examples_by_num_active=[int(n) for n in num_active],
      coverage_breakdown=rows)


def markdown(result: dict[str, Any]) -> str:
  """The result as a markdown report (Hinton et al.'s table 4 layout)."""
  groups = '; '.join('{' + ', '.join(g) + '}' for g in result['groups'])
  lines = [
      f'Split `{result["split"]}`, {result["num_examples"]} examples; '
      f'{len(result["groups"])} specialists: {groups}; active: groups that '
      f'meet the generalist\'s top {result["top_n"]} classes.',
      '',
      '| model | top-1 accuracy | errors |',
      '|---|---|---|',
      f'| generalist | {result["generalist_accuracy"]:.2%} | '
      f'{result["generalist_errors"]} |',
      f'| generalist + specialists | {result["combined_accuracy"]:.2%} | '
      f'{result["combined_errors"]} |',
      '',
      '| active specialists covering the true class | examples | '
      'generalist | combination | change in # correct | relative change |',
      '|---|---|---|---|---|---|',
  ]
  for row in result['coverage_breakdown']:
    relative = row['relative_improvement']
    relative = ('n/a' if math.isnan(relative) else f'{relative:+.2%}')
    lines.append(
        f'| {row["num_covering_specialists"]} | {row["num_examples"]} | '
        f'{row["generalist_accuracy"]:.2%} | {row["combined_accuracy"]:.2%} '
        f'| {row["correct_delta"]:+d} | {relative} |')
  return '\n'.join(lines) + '\n'


def write_report(result: dict[str, Any], out_dir: str) -> None:
  os.makedirs(out_dir, exist_ok=True)
  with open(os.path.join(out_dir, 'combination.json'), 'w') as f:
    json.dump(result, f, indent=2)
  with open(os.path.join(out_dir, 'combination.md'), 'w') as f:
    f.write(markdown(result))


def define_flags() -> None:
  """The CLI's flags, defined only when run as a program."""
  config_flags.DEFINE_config_file(
      'config', None, 'A teacher_source="specialists" config, with :args.',
      lock_config=True)
  flags.DEFINE_string('out', None, 'Folder for combination.{json,md}.')
  flags.DEFINE_string('split', None, 'Default: the first eval split.')
  flags.mark_flags_as_required(['config', 'out'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  result = evaluate(f.config, f.split)
  write_report(result, f.out)
  print(markdown(result))


if __name__ == '__main__':
  progress.run_quiet_cli(main, define_flags)
