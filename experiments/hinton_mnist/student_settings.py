r"""The 2x800 students' learning rate and length, chosen on validation.

  python experiments/hinton_mnist/student_settings.py --dataset=mnist_full \
      --cache --teacher_epochs=240 --teachers_dir=workdirs/hinton_full240/teachers \
      --workdir=workdirs/hinton_full240_students --learning_rates=0.01,0.03,0.1 \
      --epochs=30,60,120

For every (--learning_rates lr, --epochs E) pair, runs `run.py`'s 2x800
student from scratch and distilled at each --temperatures T (default 20;
alpha --alpha) from the teacher of each --seeds seed (default: seed 0
only), in `<workdir>/lr<lr>_e<E>` (one scratch run for all T), and reports
each student's validation errors and cross-entropy on the held-out train
digits. Each student kind gets the setting with the fewest mean validation
errors (ties broken by the lower validation loss); test errors are printed
beside, never used to choose.
Pairs can be split across processes (`--learning_rates=0.01` in one,
`0.03,0.1` in another, each its own cells); a last invocation with the
whole grid reads every finished cell and writes the table. Writes
<name>.{md,json} (--name, default student_settings) to --out_dir (default:
experiments/hinton_mnist/full; with --tiny, --workdir).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

from kd_jax import divergence
from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
KINDS = ('2x800 scratch', '2x800 distilled')


def _run_module():
  spec = importlib.util.spec_from_file_location(
      'hinton_run', os.path.join(HERE, 'run.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/hinton_full240_students')
  parser.add_argument('--teachers_dir', required=True,
                      help='Holds teacher_s<seed> (and, with --cache, its '
                      'logits): the study\'s teachers.')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--name', default='student_settings',
                      help='The stem of the .md and .json written.')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--learning_rates', default='0.01,0.03,0.1')
  parser.add_argument('--epochs', default='30,60,120')
  parser.add_argument('--temperatures', default='20')
  parser.add_argument('--alpha', type=float, default=0.9)
  parser.add_argument('--dataset', default='mnist_full')
  parser.add_argument('--teacher_epochs', type=float, default=None)
  parser.add_argument('--teacher_lr', type=float, default=None)
  parser.add_argument('--cache', action='store_true')
  parser.add_argument('--data_dir', default=None)
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  try:
    args.learning_rates = [float(x) for x in args.learning_rates.split(',')]
    args.epochs = [float(x) for x in args.epochs.split(',')]
    args.temperatures = [float(x) for x in args.temperatures.split(',')]
  except ValueError:
    raise ValueError(f'--learning_rates={args.learning_rates!r} and --epochs='
                     f'{args.epochs!r} are comma-separated numbers, e.g. '
                     '--learning_rates=0.01,0.03 --epochs=30,60.') from None
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else os.path.join(HERE, 'full')
  return args


def cell_argv(args, lr: float, epochs: float, temperature: float
              ) -> list[str]:
  """run.py's arguments for one (lr, epochs, temperature) cell."""
  cell = os.path.join(args.workdir, f'lr{lr:g}_e{epochs:g}')
  argv = [f'--workdir={cell}', f'--temperature={temperature:g}',
          f'--teachers_dir={args.teachers_dir}', f'--seeds={args.seeds}',
          '--small_widths=', f'--dataset={args.dataset}',
          f'--num_epochs={epochs:g}', f'--student_lr={lr:g}',
          f'--alpha={args.alpha:g}']
  for name in ('teacher_epochs', 'teacher_lr', 'data_dir'):
    value = getattr(args, name)
    if value is not None:
      argv.append(f'--{name}={value:g}' if isinstance(value, float)
                  else f'--{name}={value}')
  if args.cache:
    argv.append('--cache')
  if args.tiny:
    argv.append('--tiny')
  return argv


def run_cell(run, argv: list[str]) -> tuple[list[dict[str, Any]], str]:
  """Trains (or reads) the runs of one cell (`run.py` with `argv`); a run
  that diverges gets the summary None instead of ending the grid."""
  args = run.parse_args(argv)
  runs = run.plan_runs(args)
  for r in runs:
    config = study.make_config(r['config_name'], r['arg'], r['overrides'])
    if args.cache and r['config_name'] == 'mnist5k_distill_cached':
      run.export_cache(config)
    try:
      r['summary'], _ = study.run_or_read(config, r['workdir'])
    except divergence.Diverged as e:
      print(f'{r["workdir"]}: {e}', flush=True)
      r['summary'] = None
  return runs, args.val_split


def kind_result(runs: list[dict[str, Any]], val_split: str
                ) -> dict[str, Any]:
  """Mean validation errors and loss and test errors of one kind's runs
  (one per seed); a kind with a diverged run is inf, never chosen."""
  seeds = [r['seed'] for r in runs]
  if any(r['summary'] is None for r in runs):
    return dict(val_errors=math.inf, val_loss=math.inf,
                test_errors=math.nan, seeds=seeds, diverged=True)
  evals = [r['summary']['eval'] for r in runs]
  return dict(val_errors=_mean([e[val_split]['errors'] for e in evals]),
              val_loss=_mean([e[val_split]['loss'] for e in evals]),
              test_errors=_mean([e['test']['errors'] for e in evals]),
              seeds=seeds)


def choose(cells: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
  """Per student kind: the cell with the fewest mean validation errors,
  then the lowest mean validation loss."""
  best = {}
  for kind in KINDS:
    best[kind] = min(cells, key=lambda c: (c[kind]['val_errors'],
                                           c[kind]['val_loss']))
  return best


def _mean(values):
  return sum(values) / len(values)


def markdown(cells, best, args) -> str:
  lines = [f'2x800 students on {args.dataset}, seeds {args.seeds}, distilled '
           f'at alpha = {args.alpha:g}: mean validation errors '
           f'(and cross-entropy) on the held-out train digits per learning '
           'rate and length; the test errors are shown, not used. Chosen '
           '(**bold**): fewest validation errors, then lowest validation '
           'loss.', '',
           '| lr | epochs | T | ' + ' | '.join(
               f'{k} val errors | val loss | test errors' for k in KINDS)
           + ' |', '|---:|---:|---:|' + '---:|---:|---:|' * len(KINDS)]
  for c in cells:
    parts = []
    for kind in KINDS:
      r = c[kind]
      mark = '**' if best[kind] is c else ''
      if r.get('diverged'):
        parts.append('diverged | - | -')
        continue
      parts.append(f'{mark}{r["val_errors"]:.1f}{mark} | {r["val_loss"]:.4f}'
                   f' | {r["test_errors"]:.1f}')
    lines.append(f'| {c["lr"]:g} | {c["epochs"]:g} | {c["temperature"]:g} '
                 '| ' + ' | '.join(parts) + ' |')
  lines += ['']
  for kind in KINDS:
    b = best[kind]
    at = '' if kind == KINDS[0] else f', T = {b["temperature"]:g}'
    lines.append(f'- {kind}: lr {b["lr"]:g}, {b["epochs"]:g} epochs{at} '
                 f'({b[kind]["val_errors"]:.1f} validation errors).')
  seconds = sum(c['train_seconds'] for c in cells)
  lines += ['', 'Training loops of the student runs, '
            f'summed: {seconds / 60:.1f} min.']
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  run = _run_module()
  cells = []
  for lr in args.learning_rates:
    for epochs in args.epochs:
      for t in args.temperatures:
        runs, val_split = run_cell(run, cell_argv(args, lr, epochs, t))
        # The scratch run is one per (lr, epochs): counted with the first T.
        cell = dict(lr=lr, epochs=epochs, temperature=t, train_seconds=sum(
            r['summary']['train_seconds'] for r in runs
            if r['summary'] and r['config_name'] != 'mnist5k_teacher' and (
                t == args.temperatures[0] or r['temperature'] is not None)))
        for kind in KINDS:
          cell[kind] = kind_result(
              [r for r in runs if r['group'].startswith(kind)], val_split)
        cells.append(cell)
  best = choose(cells)
  table = markdown(cells, best, args)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f'{args.name}.md'), 'w') as f:
    f.write(table + '\n')
  out = dict(args=vars(args), cells=cells,
             chosen={k: dict(lr=b['lr'], epochs=b['epochs'],
                             temperature=b['temperature'])
                     for k, b in best.items()})
  with open(os.path.join(args.out_dir, f'{args.name}.json'), 'w') as f:
    json.dump(out, f, indent=2)
  print('\n' + table)
  return out


if __name__ == '__main__':
  main(sys.argv[1:])
