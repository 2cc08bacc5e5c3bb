r"""Function matching (Beyer et al. 2022, "Knowledge distillation: a good
teacher is patient and consistent") on mnist5k.

  python experiments/function_matching/run.py --workdir=workdirs/function_matching

The student (2x800 MLP) and the online teacher (configs/mnist5k_teacher.py,
the recipe chosen in experiments/teacher_recipe) see the same augmented view
of every batch: +-2 px jitter, then mixup (`config.mixup_alpha`) mixing each
image with its neighbour; the pipeline makes the view once and both models
read it (consistent teaching). The student learns from the teacher alone
(alpha = 1, KL at T = 1), for a long schedule (--epochs, patient teaching).

Against it: the best student trained alone with the same augmentation, over
two candidates chosen on validation (`train[3600:]`): the plain 2x800 and
the 2x800 with dropout 0.5 / 0.2 and max-norm 3.5 (the regularisers that
make the teacher strong), both with jitter and mixup and the same schedule.
All runs train on `train[:3600]`; every seed's teacher has that seed.

Writes results.json, results.md and curves.png (test errors against epochs,
mean and spread over seeds) to --out_dir (default: this folder; with --tiny,
--workdir). Finished runs are read from their workdirs, not rerun.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN, VAL, TEST = 'train[:3600]', 'train[3600:]', 'test'
SPLITS = dict(train_split=TRAIN, eval_splits=(VAL, TEST))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/function_matching')
  parser.add_argument('--teacher_workdir', default='workdirs/teachers',
                      help='Teachers of each seed go to <this>/teacher_s<s> '
                      '(as in experiments/hinton_mnist); a finished one is '
                      'reused.')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--epochs', type=float, default=150)
  parser.add_argument('--mixup_alpha', type=float, default=0.5)
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  if args.tiny:
    args.seeds = args.seeds[:1]
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  return args


def teacher_run(args, seed: int) -> dict[str, Any]:
  return dict(name=f'teacher s{seed}', arm='teacher', seed=seed,
              base='mnist5k_teacher', overrides={**SPLITS, 'seed': seed},
              workdir=os.path.join(args.teacher_workdir, f'teacher_s{seed}'))


def plan(args) -> list[dict[str, Any]]:
  augment = {'augment': 'mnist_jitter', 'mixup_alpha': args.mixup_alpha,
             'num_epochs': args.epochs}
  arms = {
      'alone': ('mnist5k_student', {}),
      'alone, dropout + max-norm': (
          'mnist5k_student', {'model.dropout': 0.5, 'model.input_dropout': 0.2,
                              'max_norm': 3.5, 'learning_rate': 0.05}),
      'function matching': ('mnist5k_distill', {
          'distill.alpha': 1.0, 'distill.temperature': 1.0}),
  }
  runs = []
  for seed in args.seeds:
    for arm, (base, extra) in arms.items():
      overrides = {**SPLITS, **augment, **extra, 'seed': seed}
      if base == 'mnist5k_distill':
        overrides['teacher_workdir'] = teacher_run(args, seed)['workdir']
      slug = arm.replace(' ', '_').replace(',', '').replace('+', 'and')
      runs.append(dict(name=f'{arm} s{seed}', arm=arm, seed=seed, base=base,
                       overrides=overrides,
                       workdir=os.path.join(args.workdir, f'{slug}_s{seed}')))
  return runs


def make_config(args, run):
  overrides = dict(run['overrides'])
  teacher_workdir = overrides.pop('teacher_workdir', None)
  config = study.make_config(run['base'], 'tiny' if args.tiny else '',
                             overrides)
  if teacher_workdir is not None:
    config.teacher_workdir = teacher_workdir
    config.teachers[0].workdir = teacher_workdir
  return config


def curve(run, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(epochs, errors) of one run's per-epoch evaluations."""
  history = study.eval_history(run['workdir'], f'{split}/accuracy')
  steps = np.array([s for s, _ in history], float)
  n = run['summary']['eval'][split]['num_examples']
  errors = np.array([(1 - v) * n for _, v in history])
  steps_per_epoch = run['summary']['step'] / run['epochs']
  return steps / steps_per_epoch, errors


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  teachers = [teacher_run(args, s) for s in args.seeds]
  runs = plan(args)
  for run in runs:
    run['epochs'] = args.epochs
  t1, s1 = study.run_all(teachers, lambda r: make_config(args, r))
  t2, s2 = study.run_all(runs, lambda r: make_config(args, r))
  arms: dict[str, dict[str, Any]] = {}
  for run in teachers + runs:
    a = arms.setdefault(run['arm'], dict(val=[], test=[], seeds=[]))
    a['val'].append(study.errors(run['summary'], VAL))
    a['test'].append(study.errors(run['summary'], TEST))
    a['seeds'].append(run['seed'])
  for a in arms.values():
    a['val_stats'], a['test_stats'] = study.stats(a['val']), study.stats(
        a['test'])
  alone = [k for k in arms if k.startswith('alone')]
  best_alone = min(alone, key=lambda k: arms[k]['val_stats']['mean'])
  fm = arms['function matching']
  wins = [int(f < b) for f, b in zip(fm['test'], arms[best_alone]['test'])]
  lines = [
      f'mnist5k, trained on `{TRAIN}`, {args.epochs:g} epochs, +-2 px jitter '
      f'and mixup (alpha {args.mixup_alpha:g}) for every student; seeds '
      f'{args.seeds}. Errors: validation of 400, test of 1,000 (mean +- '
      'sample std; per seed in brackets).', '',
      '| model | val errors | test errors |', '|---|---:|---:|']
  for name, a in arms.items():
    mark = ' (best alone, on validation)' if name == best_alone else ''
    lines.append(f'| {name}{mark} | {study.fmt(a["val_stats"])} {a["val"]} | '
                 f'{study.fmt(a["test_stats"])} {a["test"]} |')
  lines += ['', f'Function matching beats the best student trained alone '
            f'({best_alone}) on test in {sum(wins)} of {len(wins)} seeds '
            f'(paired by seed: {list(zip(fm["test"], arms[best_alone]["test"]))}'
            ').', '',
            f'{t1 + t2} runs trained by this invocation in '
            f'{(s1 + s2) / 60:.1f} min.']
  table = '\n'.join(lines)
  os.makedirs(args.out_dir, exist_ok=True)
  fig, ax = plt.subplots(figsize=(7, 4.5))
  for arm, color in ((best_alone, 'tab:blue'), ('function matching',
                                                'tab:orange')):
    curves = [curve(r, TEST) for r in runs if r['arm'] == arm]
    length = min(len(c[1]) for c in curves)
    epochs = curves[0][0][:length]
    errs = np.stack([c[1][:length] for c in curves])
    ax.plot(epochs, errs.mean(0), color=color, label=f'{arm} (mean)')
    ax.fill_between(epochs, errs.min(0), errs.max(0), color=color, alpha=0.2)
  ax.axhline(arms['teacher']['test_stats']['mean'], color='gray', ls='--',
             label='teacher (mean)')
  ax.set_ylim(0, max(80, arms['teacher']['test_stats']['mean'] * 3))
  ax.set_xlabel('epoch')
  ax.set_ylabel('test errors (of 1,000)')
  ax.set_title('Function matching vs the best student trained alone '
               '(band: min-max over seeds)', fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(args.out_dir, 'curves.png'), dpi=100)
  plt.close(fig)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  record = dict(args=vars(args), arms=arms, best_alone=best_alone, wins=wins,
                seconds=s1 + s2)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  print('\n' + table)
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
