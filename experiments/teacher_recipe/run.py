r"""Choosing the mnist5k teacher recipe on validation data.

  python experiments/teacher_recipe/run.py --workdir=workdirs/teacher_recipe

Every run trains on the first 3,600 mnist5k train digits (`train[:3600]`)
and is judged on the last 400 (`train[3600:]`, the validation split); the
1,000 test digits are reported beside, never used to choose. Stage 1 sweeps
the 2x1200 teacher's learning rate with and without the max-norm constraint
of Hinton's and Srivastava's dropout nets (dropout 0.5 / 0.2, +-2 px jitter,
SGD momentum 0.9, cosine schedule, 150 epochs), and the strongest models
trained alone that a study compares against: the 2x800 student with the
same jitter, with and without dropout. Stage 2 trains the setting with the
fewest validation errors at 60 and 300 epochs (stable at any length) and over
--seeds. A run is unstable when its validation accuracy, after its first
epoch, ever drops below 50%.

Writes results.json and results.md to --out_dir (default: this folder; with
--tiny, --workdir). Finished runs are read from their workdirs, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, VAL, TEST = 'train[:3600]', 'train[3600:]', 'test'
SPLITS = dict(train_split=TRAIN, eval_splits=(VAL, TEST))

TEACHER = dict(config='mnist5k_teacher', overrides={})
STUDENT_JITTER = dict(config='mnist5k_student',
                      overrides={'augment': 'mnist_jitter'})
STUDENT_DROPOUT_JITTER = dict(
    config='mnist5k_student',
    overrides={'augment': 'mnist_jitter', 'model.dropout': 0.5,
               'model.input_dropout': 0.2})

# Stage 1: (name, base, overrides).
GRID = [
    ('teacher lr=0.1', TEACHER, {'learning_rate': 0.1, 'max_norm': 0.0}),
    ('teacher lr=0.1 maxnorm=3.5', TEACHER,
     {'learning_rate': 0.1, 'max_norm': 3.5}),
    ('teacher lr=0.05 maxnorm=3.5', TEACHER,
     {'learning_rate': 0.05, 'max_norm': 3.5}),
    ('teacher lr=0.02', TEACHER, {'learning_rate': 0.02, 'max_norm': 0.0}),
    ('teacher lr=0.02 maxnorm=3.5', TEACHER,
     {'learning_rate': 0.02, 'max_norm': 3.5}),
    ('2x800 jitter lr=0.03', STUDENT_JITTER, {'learning_rate': 0.03}),
    ('2x800 dropout+jitter lr=0.05 maxnorm=3.5', STUDENT_DROPOUT_JITTER,
     {'learning_rate': 0.05, 'max_norm': 3.5}),
]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/teacher_recipe')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--epochs', type=float, default=150)
  parser.add_argument('--stability_epochs', default='60,300',
                      help='Epoch counts at which the chosen setting reruns.')
  parser.add_argument('--seeds', default='0',
                      help='Seeds of the chosen setting at --epochs (the '
                      'Hinton study trains it over five).')
  parser.add_argument('--stage', type=int, default=2, choices=(1, 2))
  parser.add_argument('--only', default='',
                      help='Run only the stage-1 settings whose index in '
                      'GRID is in this comma-separated list (to share the '
                      'grid between processes), then stop.')
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  args.stability_epochs = [float(e) for e in args.stability_epochs.split(',')
                           if e]
  if args.tiny:
    args.seeds, args.stability_epochs = args.seeds[:2], args.stability_epochs[:1]
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  return args


def _slug(name: str) -> str:
  return ''.join(c if c.isalnum() or c in '.=' else '_' for c in name)


def make_run(args, name, base, overrides, epochs, seed) -> dict[str, Any]:
  epochs = overrides.get('num_epochs', epochs)
  return dict(
      name=f'{name} ep={epochs:g} s{seed}', setting=name, epochs=epochs,
      seed=seed, base=base['config'],
      overrides={**SPLITS, **base['overrides'], **overrides,
                 'num_epochs': epochs, 'seed': seed},
      workdir=os.path.join(args.workdir,
                           f'{_slug(name)}_ep{epochs:g}_s{seed}'))


def make_config(args, run):
  return study.make_config(run['base'], 'tiny' if args.tiny else '',
                           run['overrides'])


def stability(run) -> dict[str, Any]:
  """Lowest validation accuracy after the first epoch, from the events."""
  history = study.eval_history(run['workdir'], f'{VAL}/accuracy')
  later = [v for _, v in history[1:]] or [v for _, v in history]
  low = min(later) if later else float('nan')
  return dict(min_val_accuracy=low, stable=bool(low >= 0.5))


def row(run) -> dict[str, Any]:
  s = run['summary']
  return dict(name=run['name'], setting=run['setting'], epochs=run['epochs'],
              seed=run['seed'], val_errors=study.errors(s, VAL),
              test_errors=study.errors(s, TEST),
              train_seconds=s['train_seconds'], **stability(run))


def markdown(rows, chosen, seeds_rows, args, seconds, trained) -> str:
  lines = [
      'Validation errors (of 400 held-out train digits, `train[3600:]`) '
      'and test errors (of 1,000) of every setting tried, trained on '
      '`train[:3600]`. The setting with the fewest validation errors among '
      'the stable teachers is chosen; test errors are shown, never used.', '',
      '| setting | epochs | seed | val errors | test errors | min val acc '
      'after epoch 1 | stable |', '|---|---:|---:|---:|---:|---:|---|']
  for r in rows:
    lines.append(f'| {r["setting"]} | {r["epochs"]:g} | {r["seed"]} | '
                 f'{r["val_errors"]} | {r["test_errors"]} | '
                 f'{100 * r["min_val_accuracy"]:.1f}% | '
                 f'{"yes" if r["stable"] else "NO"} |')
  if chosen:
    lines += ['', f'Chosen: **{chosen}**.']
  if seeds_rows:
    val = study.stats(r['val_errors'] for r in seeds_rows)
    test = study.stats(r['test_errors'] for r in seeds_rows)
    lines += ['', f'Chosen setting over seeds {args.seeds} at '
              f'{args.epochs:g} epochs: validation errors {study.fmt(val)} '
              f'(per seed {val["values"]}), test errors {study.fmt(test)} '
              f'(per seed {test["values"]}).']
  lines += ['', f'{trained} runs trained by this invocation in '
            f'{seconds / 60:.1f} min; training loops of all runs, summed: '
            f'{sum(r["train_seconds"] for r in rows) / 60:.1f} min.']
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  grid = GRID[:2] + GRID[-1:] if args.tiny else GRID
  first_seed = args.seeds[0]
  runs = [make_run(args, name, base, o, args.epochs, first_seed)
          for name, base, o in grid]
  if args.only:
    only = [int(i) for i in args.only.split(',')]
    study.run_all([runs[i] for i in only], lambda r: make_config(args, r))
    return {}
  trained, seconds = study.run_all(runs, lambda r: make_config(args, r))
  rows = [row(r) for r in runs]
  teachers = [r for r in rows if r['setting'].startswith('teacher')
              and r['stable']]
  chosen = (min(teachers, key=lambda r: (r['val_errors'], r['name']))
            ['setting'] if teachers else None)
  seeds_rows = []
  if args.stage == 2 and chosen is not None:
    name, base, overrides = next(g for g in grid if g[0] == chosen)
    chosen_epochs = overrides.get('num_epochs', args.epochs)
    overrides = {k: v for k, v in overrides.items() if k != 'num_epochs'}
    more = [make_run(args, name, base, overrides, e, first_seed)
            for e in args.stability_epochs if e != chosen_epochs]
    more += [make_run(args, name, base, overrides, chosen_epochs, s)
             for s in args.seeds[1:]]
    t2, s2 = study.run_all(more, lambda r: make_config(args, r))
    trained, seconds = trained + t2, seconds + s2
    more_rows = [row(r) for r in more]
    rows += more_rows
    seeds_rows = [r for r in rows if r['setting'] == chosen
                  and r['epochs'] == chosen_epochs]
  table = markdown(rows, chosen, seeds_rows, args, seconds, trained)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  record = dict(args=vars(args), chosen=chosen, rows=rows, seconds=seconds)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  print('\n' + table)
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
