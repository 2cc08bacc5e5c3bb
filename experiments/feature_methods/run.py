r"""Feature distillation on mnist5k: the RepDistiller family vs KD vs scratch.

  python experiments/feature_methods/run.py --workdir=workdirs/feature_methods

A convolutional pair that fits a 2-core CPU: a ResNet-8 teacher (78k
params; RepDistiller's CIFAR ResNet at depth 8) and the 3-layer `cnn`
student (convs of 8, 16 and 32 channels, 3x3, a 32-unit hidden layer).
Every run trains on mnist5k's `train[:3600]` and is evaluated on the
validation split `train[3600:]` and on `test`:

* the teacher's learning rate is chosen on validation: one seed-0 teacher
  per value of --teacher_lrs, the one with the fewest validation errors
  wins, and the teachers of the other seeds train with it;
* the student from scratch, KD (T=4, 0.9 soft, 0.1 CE, RepDistiller's KD)
  and each method of configs/cifar100_feature_methods.py at RepDistiller's
  weight and options (CE weight 1, KD weight 0; crd_kd adds KD at weight 1),
  its features mapped onto this pair by resolution (table below);
* each of these (scratch included) gets its own learning rate, chosen on
  validation as the teacher's: one seed-0 run per value of --student_lrs,
  the fewest validation errors wins (ties: the smaller rate), and the
  other seeds train at that rate. At RepDistiller's lr 0.05 the 7k-param
  student (no batch norm) never learns under KD's T^2-scaled gradients or
  AT's weight of 1000: its ReLUs die in the first steps.


  | method | student -> teacher features |
  |---|---|
  | fitnet | stage1 (14x14x8) -> stage2 (14x14x32), FitNets regressor |
  | at, vid | stage1, stage2 -> stage2, stage3 (14x14, 7x7) |
  | sp | stage3 -> stage3 (the last stages) |
  | cc, rkd, pkt, crd, crd_kd | embedding (32) -> embedding (64) |

  CRD's 16384 negatives are clipped to N - 1 = 3599 (RepDistiller's are a
  third of CIFAR's train split; here the whole split).

Writes results.json, results.md (validation and test errors, mean +- std
over seeds, the command and the wall time) and methods.png (test errors
with error bars, teacher and scratch lines) to --out_dir (default: this
folder; with --tiny, --workdir). Finished runs are read from their
workdirs, not rerun. `--tiny` shrinks every run to a few steps and one
seed, to check the script (about a minute per run on a loaded 2-core CPU).

Cost of the full study (3 teacher candidates + 2 teachers, 11 methods x
(3 learning rates + 2 seeds) students, 30 epochs each): about 1.5 CPU hours
of runs on a 2-core CPU (two runs at a time); results.md gives the sum of
the runs' training times.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import config_lib
from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_SPLIT, VAL_SPLIT = 'train[:3600]', 'train[3600:]'
TEACHER = config_lib.model_config('resnet8')
STUDENT = config_lib.model_config('cnn', features=(8, 16, 32), kernel_size=3,
                                  dense=32)
FEATURE_METHODS = ('fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'crd',
                   'crd_kd', 'ofd', 'reviewkd')
METHOD_NAMES = ('kd', *FEATURE_METHODS)
LABELS = dict(scratch='scratch', kd='KD', fitnet='FitNet', at='AT', sp='SP',
              cc='CC', vid='VID', rkd='RKD', pkt='PKT', crd='CRD',
              crd_kd='CRD+KD', ofd='OFD', reviewkd='ReviewKD')
# (student features, teacher features) of each method on this pair.
PAIR_FEATURES = {
    'fitnet': ('stage1', 'stage2'),
    'at': (('stage1', 'stage2'), ('stage2', 'stage3')),
    'vid': (('stage1', 'stage2'), ('stage2', 'stage3')),
    'sp': ('stage3', 'stage3'),
    **{m: ('embedding', 'embedding')
       for m in ('cc', 'rkd', 'pkt', 'crd', 'crd_kd')},
    # Pre-ReLU maps: conv outputs of the student, the teacher's stages'
    # residual sums (OFD pools a larger teacher map to the student's size).
    'ofd': (('preact1', 'preact2', 'preact3'),
            ('preact1', 'preact2', 'preact3')),
    'reviewkd': (('stage1', 'stage2', 'stage3', 'embedding'),
                 ('preact1', 'preact2', 'preact3', 'embedding')),
}
# Options counted in epochs, scaled from the authors' 240 to this study's.
EPOCH_OPTIONS = ('warmup_epochs',)
AUTHORS_EPOCHS = 240.0
# The students' recipe (RepDistiller's optimiser, scaled to this data).
STUDENT_RECIPE = {
    'dataset': 'mnist5k', 'train_split': TRAIN_SPLIT,
    'eval_splits': (VAL_SPLIT, 'test'), 'model': STUDENT, 'batch_size': 64,
    'optimizer': 'sgd', 'learning_rate': 0.05, 'momentum': 0.9,
    'weight_decay': 5e-4, 'schedule': 'cosine', 'num_epochs': 30.0,
    'checkpoint_every_steps': 1000}


def _methods_module():
  path = os.path.join(config_lib.CONFIG_DIR, 'cifar100_feature_methods.py')
  spec = importlib.util.spec_from_file_location('cifar100_feature_methods',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def method_overrides(method: str) -> dict[str, Any]:
  """The distill fields of one method on this pair."""
  if method == 'scratch':
    return {}
  if method == 'kd':
    return {'distill.temperature': 4.0, 'distill.alpha': 0.9}
  student, teacher = PAIR_FEATURES[method]
  term = dict(_methods_module().METHODS[method], student=student,
              teacher=teacher)
  for option in EPOCH_OPTIONS:
    if option in term:
      term[option] = (term[option] * STUDENT_RECIPE['num_epochs']
                      / AUTHORS_EPOCHS)
  return {'distill.features': (term,), 'distill.temperature': 4.0,
          'distill.soft_weight': 1.0 if method == 'crd_kd' else 0.0,
          'distill.hard_weight': 1.0}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/feature_methods',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and methods.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--methods', default=','.join(METHOD_NAMES))
  parser.add_argument('--teacher_lrs', default='0.02,0.05,0.1',
                      help='Teacher learning rates compared on validation.')
  parser.add_argument('--teacher_epochs', type=float, default=30.0)
  parser.add_argument('--student_lrs', default='0.01,0.02,0.05',
                      help='Student learning rates compared on validation, '
                      'per method.')
  parser.add_argument('--num_epochs', type=float, default=None,
                      help='Overrides the students\' 30 epochs.')
  parser.add_argument('--tiny', action='store_true',
                      help='Runlocal runs of a few steps, one seed, one '
                      'teacher candidate.')
  parser.add_argument('--merge', action='store_true',
                      help='Keep the rows of --out_dir/results.json for the '
                      'methods this invocation does not train; its teacher '
                      'must equal this one\'s (e.g. --teacher_lrs=<the '
                      'rate chosen before>).')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  args.methods = [m for m in args.methods.split(',') if m]
  args.teacher_lrs = [float(x) for x in args.teacher_lrs.split(',') if x]
  args.student_lrs = [float(x) for x in args.student_lrs.split(',') if x]
  if args.tiny:
    args.seeds, args.teacher_lrs = args.seeds[:1], args.teacher_lrs[:1]
    args.student_lrs = args.student_lrs[-1:]
  bad = [m for m in args.methods if m not in METHOD_NAMES]
  if bad or not (args.seeds and args.teacher_lrs and args.student_lrs):
    raise ValueError(f'unknown or empty --methods/--seeds/--teacher_lrs/'
                     f'--student_lrs '
                     f'({bad or "empty"}); methods: {METHOD_NAMES}.')
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  return args


def _arg(args, seed: int) -> str:
  return ','.join((['tiny'] if args.tiny else []) + [f'seed={seed}'])


def teacher_run(args, lr: float, seed: int) -> dict[str, Any]:
  name = f'teacher_lr{lr:g}_s{seed}'
  return dict(name=name, method='teacher', seed=seed, lr=lr,
              arg=_arg(args, seed),
              overrides={**STUDENT_RECIPE, 'model': TEACHER,
                         'learning_rate': lr,
                         'num_epochs': args.teacher_epochs},
              workdir=os.path.join(args.workdir, name))


def student_run(args, method: str, lr: float, seed: int,
                teachers: dict[int, str]) -> dict[str, Any]:
  name = f'student_{method}_lr{lr:g}_s{seed}'
  overrides = {**STUDENT_RECIPE, **method_overrides(method),
               'learning_rate': lr}
  if args.num_epochs is not None:
    overrides['num_epochs'] = args.num_epochs
  run = dict(name=name, method=method, seed=seed, lr=lr, arg=_arg(args, seed),
             overrides=overrides, workdir=os.path.join(args.workdir, name))
  if method != 'scratch':
    run['teacher'] = teachers[seed]
  return run


def candidate_runs(args, teachers: dict[int, str]) -> list[dict[str, Any]]:
  """Seed 0 of every method at every --student_lrs value."""
  return [student_run(args, method, lr, args.seeds[0], teachers)
          for method in ('scratch', *args.methods) for lr in args.student_lrs]


def chosen_lrs(candidates: list[dict[str, Any]]) -> dict[str, float]:
  """Per method, the rate with the fewest validation errors (ties: lower);
  diverged runs (summary None) are never chosen, and a method whose every
  rate diverged gets none."""
  chosen = {}
  for run in candidates:
    if run['summary'] is None:
      continue
    key = (study.errors(run['summary'], VAL_SPLIT), run['lr'])
    best = chosen.get(run['method'])
    if best is None or key < best:
      chosen[run['method']] = key
  return {method: key[1] for method, key in chosen.items()}


def seed_runs(args, lrs: dict[str, float], teachers: dict[int, str]
              ) -> list[dict[str, Any]]:
  """The other seeds of every method at its chosen rate."""
  return [student_run(args, method, lrs[method], seed, teachers)
          for seed in args.seeds[1:] for method in ('scratch', *args.methods)
          if method in lrs]


def make(run: dict[str, Any]):
  config = study.make_config('mnist5k_student', run['arg'], run['overrides'])
  if 'teacher' in run:
    config.distill.teacher_source = 'online'
    config.teachers = [config_lib.teacher_config(TEACHER, run['teacher'])]
  return config


def summarise(candidates, teachers, student_candidates, students, lrs,
              args) -> dict[str, Any]:
  def row(method, runs):
    done = [r for r in runs if r['summary'] is not None]
    nan = study.stats([float('nan')])
    return dict(method=method, seeds=[r['seed'] for r in done],
                diverged=[r['seed'] for r in runs if r['summary'] is None],
                val=study.stats(study.errors(r['summary'], VAL_SPLIT)
                                for r in done) if done else nan,
                test=study.stats(study.errors(r['summary'], 'test')
                                 for r in done) if done else nan)
  every = [r for r in (*candidates, *teachers[1:], *student_candidates,
                        *students) if r['summary'] is not None]
  num_examples = {s: every[0]['summary']['eval'][s]['num_examples']
                  for s in (VAL_SPLIT, 'test')}
  return dict(
      teacher_candidates=[dict(lr=r['lr'], val_errors=study.errors(
          r['summary'], VAL_SPLIT)) for r in candidates],
      teacher_lr=teachers[0]['lr'],
      teacher=row('teacher', teachers),
      student_candidates={
          m: {f'{r["lr"]:g}': (None if r['summary'] is None else
                               study.errors(r['summary'], VAL_SPLIT))
              for r in student_candidates if r['method'] == m}
          for m in ('scratch', *args.methods)},
      rows=[dict(row(m, [r for r in students if r['method'] == m]),
                 lr=lrs.get(m))
            for m in ('scratch', *args.methods)],
      num_examples=num_examples,
      student_params=next(r['summary']['num_params'] for r in students
                          if r['summary'] is not None),
      teacher_params=teachers[0]['summary']['num_params'],
      train_seconds=sum(r['summary'].get('train_seconds', 0.0)
                        for r in every),
      num_runs=len(every))


def merge(results: dict[str, Any], previous: dict[str, Any]
          ) -> dict[str, Any]:
  """`results` with the methods of `previous` it lacks, in the study's
  order; the teacher's learning-rate candidates are the previous ones where
  this invocation tried fewer rates.

  Raises:
    ValueError: if the teachers' errors differ (the rows would not be
      comparable).
  """
  if (previous['teacher'] != results['teacher']
      or previous['teacher_lr'] != results['teacher_lr']):
    raise ValueError(
        f'--merge: the previous rows were taught by teachers at lr '
        f'{previous["teacher_lr"]:g} with errors {previous["teacher"]}, '
        f'this invocation\'s at lr {results["teacher_lr"]:g} have '
        f'{results["teacher"]}: rerun every method instead.')
  order = ('scratch', *METHOD_NAMES)
  new = {r['method'] for r in results['rows']}
  kept = [r for r in previous['rows'] if r['method'] not in new]
  merged = dict(results)
  merged['rows'] = sorted(kept + results['rows'],
                          key=lambda r: order.index(r['method']))
  candidates = {**previous['student_candidates'],
                **results['student_candidates']}
  merged['student_candidates'] = {m: candidates[m] for m in order
                                  if m in candidates}
  if len(previous['teacher_candidates']) > len(results['teacher_candidates']):
    merged['teacher_candidates'] = previous['teacher_candidates']
  merged['kept_from'] = dict(command=previous.get('command'),
                             num_runs=previous.get('num_runs'),
                             train_seconds=previous.get('train_seconds'),
                             methods=[r['method'] for r in kept])
  return merged


def write_outputs(results: dict[str, Any], args, wall_seconds: float,
                  command: str) -> None:
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(dict(results, wall_seconds=wall_seconds, command=command,
                   seeds=args.seeds, tiny=args.tiny), f, indent=2)
  teacher = results['teacher']
  lines = [
      '# Feature distillation on mnist5k: resnet8 -> 3-layer cnn', '',
      f'Command: `{command}`', '',
      f'Wall time of this invocation: {wall_seconds / 60:.1f} min; the '
      f'{results["num_runs"]} runs trained for '
      f'{results["train_seconds"] / 60:.1f} min in all. Seeds {args.seeds}'
      + (' (--tiny: a few steps, not a result)' if args.tiny else '') + '.',
      f'Teacher ({results["teacher_params"]:,} params): learning rate '
      f'{results["teacher_lr"]:g}, chosen on {VAL_SPLIT} among '
      + ', '.join(f'{c["lr"]:g} ({c["val_errors"]} errors)'
                  for c in results['teacher_candidates'])
      + f'; test errors {study.fmt(teacher["test"])}. Student: '
      f'{results["student_params"]:,} params. Errors are mean +- std over '
      'seeds.', '']
  if results.get('kept_from'):
    kept = results['kept_from']
    lines += [
        f'The rows of {", ".join(LABELS[m] for m in kept["methods"])} are '
        f'kept from the previous results.json, written by '
        f'`{kept["command"]}` ({kept["num_runs"]} runs, '
        f'{kept["train_seconds"] / 60:.1f} min of training), whose teachers '
        f'(learning rate and errors) this invocation reproduced.', '']
  lines += [
      '| method | lr (on validation) | val errors | test errors |',
      '|---|---|---|---|']
  n = results['num_examples']
  for r in results['rows']:
    lr = 'every rate diverged' if r['lr'] is None else f'{r["lr"]:g}'
    total = len(r['diverged']) + len(r['seeds'])
    diverged = (f' ({len(r["diverged"])} of {total} seeds diverged)'
                if r['diverged'] else '')
    lines.append(f'| {LABELS[r["method"]]} | {lr} | '
                 f'{study.fmt(r["val"])} / {n[VAL_SPLIT]:g} | '
                 f'{study.fmt(r["test"])} / {n["test"]:g}{diverged} |')
  lrs = [f'{lr:g}' for lr in args.student_lrs]
  lines += ['', f'Validation errors of seed 0 per learning rate (of '
            f'{n[VAL_SPLIT]:g}; "diverged": the loss became NaN):', '',
            '| method | ' + ' | '.join(lrs) + ' |',
            '|---|' + '---|' * len(lrs)]
  for method, errors in results['student_candidates'].items():
    lines.append(f'| {LABELS[method]} | ' + ' | '.join(
        'diverged' if errors[lr] is None else str(errors[lr]) for lr in lrs)
                 + ' |')
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')

  rows = results['rows']
  fig, ax = plt.subplots(figsize=(1 + 0.6 * len(rows), 3.5))
  study.error_bars(ax, rows, LABELS, teacher['test']['mean'],
                   colors={'scratch': '0.6', 'kd': 'C1'})
  ax.set_ylabel(f'test errors (of {results["num_examples"]["test"]:g})')
  ax.set_title('mnist5k, resnet8 -> cnn, mean +- std over seeds')
  fig.tight_layout()
  fig.savefig(os.path.join(args.out_dir, 'methods.png'), dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  command = ' '.join(['python experiments/feature_methods/run.py',
                      *(sys.argv[1:] if argv is None else argv)])
  start = time.perf_counter()
  candidates = [teacher_run(args, lr, args.seeds[0])
                for lr in args.teacher_lrs]
  study.run_all(candidates, make)
  chosen = min(candidates,
               key=lambda r: study.errors(r['summary'], VAL_SPLIT))['lr']
  teachers = [teacher_run(args, chosen, seed) for seed in args.seeds]
  study.run_all(teachers, make)
  teacher_dirs = {r['seed']: r['workdir'] for r in teachers}
  student_candidates = candidate_runs(args, teacher_dirs)
  study.run_all(student_candidates, make, record_divergence=True)
  lrs = chosen_lrs(student_candidates)
  students = seed_runs(args, lrs, teacher_dirs)
  study.run_all(students, make, record_divergence=True)
  students = [r for r in student_candidates
              if r['lr'] == lrs[r['method']]] + students
  results = summarise(candidates, teachers, student_candidates, students,
                      lrs, args)
  previous_path = os.path.join(args.out_dir, 'results.json')
  if args.merge and os.path.exists(previous_path):
    with open(previous_path) as f:
      results = merge(results, json.load(f))
  write_outputs(results, args, time.perf_counter() - start, command)
  print(open(os.path.join(args.out_dir, 'results.md')).read())
  return results


if __name__ == '__main__':
  main()
