r"""KD, DKD, DIST, KD+LS, DKD+LS, CTKD, NKD, WTTM and MLKD on mnist5k and digits.

  python experiments/logit_methods/run.py --workdir=workdirs/logit_methods

For each dataset in --datasets (mnist5k: train on `train[:3600]`, choose on
`train[3600:]`; digits: train on `train[:1150]`, choose on `train[1150:]`;
both report the test split beside) and each seed in --seeds, trains with
`kd_jax.train.train_and_evaluate`:

* the 2x1200 teacher of configs/mnist5k_teacher.py: on mnist5k its recipe
  as experiments/teacher_recipe chose it on validation; on digits the recipe
  of TEACHER_RECIPES (with or without the +-2 px jitter, lr 0.02 or 0.1)
  with the fewest validation errors on the first seed (--teacher_overrides,
  JSON of dotted config fields, applies on top of either);
* for each student width in --widths (2x800 and 2x30): the student from
  scratch (configs/mnist5k_student.py), and distilled from the teacher of
  the same seed by each method of configs/cifar100_logit_methods.py, with
  that config's published hyperparameters (KD T=4, 0.9 soft; DKD 1 TCKD +
  8 NCKD at T=4 beside CE; DIST tau=4, beta=gamma=2; KD+LS T=2 with weights
  9 / 0.1; DKD+LS; CTKD's learned global T; NKD T=3, gamma 3.5 beside CE;
  WTTM gamma 0.1 at weight 45 beside CE; MLKD's three levels at 0.45 each
  over T in 2..6 beside 0.1 CE, on one view), their epoch schedules (DKD's
  20-epoch warm-up, CTKD's 10-epoch curriculum, of 240) scaled to this
  study's epochs.

Writes results.json, results.md (validation and test errors, mean +- std
over seeds, and the method with the fewest validation errors per dataset and
width, with whether its lead exceeds one standard deviation) and
methods.png (a bar chart with error bars) to --out_dir (default: this
folder; with --tiny, --workdir). Finished runs are read from their
workdirs, not rerun; teachers can be shared with other studies through
--teachers_dir. `--tiny` shrinks every run to a few steps, one seed and the
2x30 student, to check the script in seconds per run. `--merge` keeps the
rows of the previous results.json that this invocation does not train
(e.g. `--methods=nkd,wttm,mlkd --datasets=mnist5k --merge` adds three
methods to the committed table), refusing if their teachers differ.
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
METHOD_NAMES = ('kd', 'dkd', 'dist', 'kd_ls', 'dkd_ls', 'ctkd', 'nkd',
                'wttm', 'mlkd')
LABELS = dict(scratch='scratch', kd='KD', dkd='DKD', dist='DIST',
              kd_ls='KD+LS', dkd_ls='DKD+LS', ctkd='CTKD', nkd='NKD',
              wttm='WTTM', mlkd='MLKD')
# (train split, validation split) per dataset; the test split is reported.
SPLITS = {'mnist5k': ('train[:3600]', 'train[3600:]'),
          'digits': ('train[:1150]', 'train[1150:]')}
# Teacher recipes per dataset, as overrides of configs/mnist5k_teacher.py
# (the mnist5k recipe that experiments/teacher_recipe chose on validation).
# Where a dataset has several, each trains on seed 0 and the one with the
# fewest validation errors teaches every seed: on 8x8 digits the mnist5k
# recipe's +-2 px jitter moves a digit by a quarter of the image.
TEACHER_RECIPES = {
    'mnist5k': {'recipe': {}},
    'digits': {'jitter': {},
               'no_jitter': {'augment': 'none'},
               'no_jitter_lr0.1': {'augment': 'none', 'learning_rate': 0.1}},
}
# The CIFAR-100 recipes count their schedules in epochs of a 240-epoch run.
AUTHORS_EPOCHS = 240.0


def _methods_module():
  path = os.path.join(config_lib.CONFIG_DIR, 'cifar100_logit_methods.py')
  spec = importlib.util.spec_from_file_location('cifar100_logit_methods',
                                                path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# The objective's fields; a method's values replace the base config's.
OBJECTIVE_FIELDS = ('soft', 'temperature', 'alpha', 'soft_weight',
                    'hard_weight', 'logit_standardization', 'ctkd')
# Options counted in epochs: (field, option), scaled with the run's length.
EPOCH_OPTIONS = (('soft', 'warmup_epochs'), ('ctkd', 'strength_epochs'))


def method_overrides(method: str, num_epochs: float) -> dict[str, Any]:
  """The objective fields of a method of configs/cifar100_logit_methods.py,
  with its epoch schedules scaled from 240 epochs to `num_epochs`."""
  config = config_lib.default_config()
  _methods_module().METHODS[method](config.distill)
  distill = config_lib.upgrade(config).distill.to_dict()
  out = {f'distill.{k}': distill[k] for k in OBJECTIVE_FIELDS}
  for field, option in EPOCH_OPTIONS:
    spec = dict(out[f'distill.{field}'])
    if option in spec:
      spec[option] = spec[option] * num_epochs / AUTHORS_EPOCHS
    out[f'distill.{field}'] = spec
  return out


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/logit_methods',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and methods.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--teachers_dir', default=None,
                      help='Where the teachers go, <dataset>_teacher_s<seed> '
                      '(default: --workdir).')
  parser.add_argument('--teacher_overrides', default='{}',
                      help='JSON of dotted config fields set on every '
                      'teacher, e.g. {"num_epochs": 300}.')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--widths', default='800,30',
                      help='Widths w of the 2xw students.')
  parser.add_argument('--datasets', default='mnist5k,digits')
  parser.add_argument('--methods', default=','.join(METHOD_NAMES))
  parser.add_argument('--num_epochs', type=float, default=None,
                      help='Overrides the student configs\' epochs.')
  parser.add_argument('--tiny', action='store_true',
                      help='Seconds-long runlocal runs, one seed, 2x30 only.')
  parser.add_argument('--merge', action='store_true',
                      help='Keep the rows of --out_dir/results.json that '
                      'this invocation does not train (other methods or '
                      'datasets); their teachers must equal this one\'s.')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  args.widths = [int(w) for w in args.widths.split(',') if w]
  args.datasets = [d for d in args.datasets.split(',') if d]
  args.methods = [m for m in args.methods.split(',') if m]
  args.teacher_overrides = json.loads(args.teacher_overrides)
  if args.tiny:
    args.seeds, args.widths = args.seeds[:1], args.widths[-1:]
  bad = ([d for d in args.datasets if d not in SPLITS]
         + [m for m in args.methods if m not in METHOD_NAMES])
  if bad or not (args.seeds and args.widths and args.datasets):
    raise ValueError(f'unknown or empty --datasets/--methods/--seeds/--widths '
                     f'({bad or "empty"}); datasets: {tuple(SPLITS)}, methods: '
                     f'{METHOD_NAMES}.')
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  if args.teachers_dir is None:
    args.teachers_dir = args.workdir
  return args


def _data(dataset: str) -> dict[str, Any]:
  train_split, val_split = SPLITS[dataset]
  return {'dataset': dataset, 'train_split': train_split,
          'eval_splits': (val_split, 'test')}


def teacher_run(args, dataset: str, recipe: str, seed: int) -> dict[str, Any]:
  """The teacher of `dataset` trained with TEACHER_RECIPES[dataset][recipe]."""
  name = (f'{dataset}_teacher_s{seed}' if len(TEACHER_RECIPES[dataset]) == 1
          else f'{dataset}_teacher_{recipe}_s{seed}')
  return dict(
      name=name, dataset=dataset, width=None, method='teacher', seed=seed,
      recipe=recipe, config_name='mnist5k_teacher',
      arg=','.join((['tiny'] if args.tiny else []) + [f'seed={seed}']),
      overrides={**_data(dataset), **TEACHER_RECIPES[dataset][recipe],
                 **args.teacher_overrides},
      workdir=os.path.join(args.teachers_dir, name))


def recipe_candidates(args) -> list[dict[str, Any]]:
  """The seed-0 teacher of every recipe of datasets that have several."""
  return [teacher_run(args, dataset, recipe, args.seeds[0])
          for dataset in args.datasets
          if len(TEACHER_RECIPES[dataset]) > 1
          for recipe in TEACHER_RECIPES[dataset]]


def choose_recipes(args, candidates: list[dict[str, Any]]) -> dict[str, str]:
  """Per dataset, the recipe whose finished candidate has the fewest
  validation errors (the first listed on a tie)."""
  chosen = {}
  for dataset in args.datasets:
    recipes = list(TEACHER_RECIPES[dataset])
    mine = [r for r in candidates if r['dataset'] == dataset]
    if not mine:
      chosen[dataset] = recipes[0]
      continue
    val_split = SPLITS[dataset][1]
    best = min(mine, key=lambda r: (study.errors(r['summary'], val_split),
                                    recipes.index(r['recipe'])))
    chosen[dataset] = best['recipe']
  return chosen


def plan_runs(args: argparse.Namespace,
              recipes: dict[str, str] | None = None) -> list[dict[str, Any]]:
  """Every run, teachers first: name, dataset, width, method, seed, config.

  `recipes` names each dataset's teacher recipe (default: its first).
  """
  common = ['tiny'] if args.tiny else []
  num_epochs = (args.num_epochs if args.num_epochs is not None else
                config_lib.load_config('mnist5k_student').num_epochs)
  runs = []
  for dataset in args.datasets:
    data = _data(dataset)
    recipe = (recipes or {}).get(dataset, next(iter(TEACHER_RECIPES[dataset])))
    teacher_dirs = {}
    for seed in args.seeds:
      run = teacher_run(args, dataset, recipe, seed)
      teacher_dirs[seed] = run['workdir']
      runs.append(run)
    for width in args.widths:
      for seed in args.seeds:
        for method in ('scratch', *args.methods):
          student = {**data, 'model.hidden': (width, width)}
          if args.num_epochs is not None:
            student['num_epochs'] = args.num_epochs
          name = f'{dataset}_2x{width}_{method}_s{seed}'
          run = dict(name=name, dataset=dataset, width=width, method=method,
                     seed=seed, arg=','.join(common + [f'seed={seed}']),
                     workdir=os.path.join(args.workdir, name))
          if method == 'scratch':
            run.update(config_name='mnist5k_student', overrides=student)
          else:
            run.update(config_name='mnist5k_distill',
                       overrides={**student,
                                  **method_overrides(method, num_epochs)},
                       teacher=teacher_dirs[seed])
          runs.append(run)
  return runs


def make(run: dict[str, Any], teacher_configs: dict[str, Any]):
  config = study.make_config(run['config_name'], run['arg'],
                             run['overrides'])
  if 'teacher' in run:
    # The teacher's architecture is the one its recipe trained.
    teacher_model = teacher_configs[run['teacher']].model
    config.teachers = [config_lib.teacher_config(teacher_model,
                                                 run['teacher'])]
  return config


def summarise(runs: list[dict[str, Any]], args) -> dict[str, Any]:
  rows = []
  for dataset in args.datasets:
    val_split = SPLITS[dataset][1]
    teachers = [r for r in runs if r['dataset'] == dataset
                and r['method'] == 'teacher']
    teacher = dict(val=study.stats(study.errors(r['summary'], val_split)
                                   for r in teachers),
                   test=study.stats(study.errors(r['summary'], 'test')
                                    for r in teachers))
    for width in args.widths:
      group = []
      for method in ('scratch', *args.methods):
        mine = [r for r in runs if r['dataset'] == dataset
                and r['width'] == width and r['method'] == method]
        done = [r for r in mine if r['summary'] is not None]
        nan = study.stats([float('nan')])
        any_run = next(r for r in runs if r['summary'] is not None
                       and r['dataset'] == dataset
                       and r['method'] != 'teacher')
        group.append(dict(
            dataset=dataset, width=width, method=method,
            val=study.stats(study.errors(r['summary'], val_split)
                            for r in done) if done else nan,
            test=study.stats(study.errors(r['summary'], 'test')
                             for r in done) if done else nan,
            diverged=[r['seed'] for r in mine if r['summary'] is None],
            num_examples=dict(
                val=any_run['summary']['eval'][val_split]['num_examples'],
                test=any_run['summary']['eval']['test']['num_examples']),
            teacher=teacher))
      rows.extend(group)
  return dict(rows=mark_best(rows, len(args.seeds)))


def mark_best(rows: list[dict[str, Any]], num_seeds: int
              ) -> list[dict[str, Any]]:
  """Per dataset and width, marks the row with the fewest mean validation
  errors (`best`) and whether its lead over the runner-up exceeds both
  their standard deviations (`clear_lead`)."""
  for row in rows:
    row.pop('best', None)
    row.pop('clear_lead', None)
  for key in dict.fromkeys((r['dataset'], r['width']) for r in rows):
    # A method with a diverged seed is never chosen.
    group = [r for r in rows if (r['dataset'], r['width']) == key
             and not r.get('diverged')]
    if not group:
      continue
    best = min(group, key=lambda g: g['val']['mean'])
    others = [g for g in group if g is not best]
    best['best'] = True
    if others:
      runner_up = min(others, key=lambda g: g['val']['mean'])
      best['clear_lead'] = bool(
          num_seeds > 1
          and runner_up['val']['mean'] - best['val']['mean']
          > max(best['val']['std'], runner_up['val']['std']))
  return rows


def merge(results: dict[str, Any], previous: dict[str, Any],
          num_seeds: int) -> dict[str, Any]:
  """`results` with the rows of `previous` it lacks, in the study's order.

  Raises:
    ValueError: if a kept row's teacher differs from this invocation's
      teacher of the same dataset (the rows would not be comparable).
  """
  key = lambda r: (r['dataset'], r['width'], r['method'])
  new = {key(r): r for r in results['rows']}
  teachers = {r['dataset']: r['teacher'] for r in results['rows']}
  kept = [r for r in previous['rows'] if key(r) not in new]
  for row in kept:
    if row['dataset'] in teachers and row['teacher'] != teachers[
        row['dataset']]:
      raise ValueError(
          f'--merge: the kept {row["dataset"]} rows were taught by a teacher '
          f'with other errors ({row["teacher"]}) than this invocation\'s '
          f'({teachers[row["dataset"]]}): rerun every method of that dataset '
          f'instead.')
  order = ('scratch', *METHOD_NAMES)
  datasets = list(dict.fromkeys([r['dataset'] for r in previous['rows']]
                                + [r['dataset'] for r in results['rows']]))
  rows = sorted(kept + results['rows'], key=lambda r: (
      datasets.index(r['dataset']), -r['width'], order.index(r['method'])))
  merged = dict(results, rows=mark_best(rows, num_seeds))
  merged['kept_from'] = dict(
      command=previous.get('command'),
      num_runs=previous.get('num_runs'),
      train_seconds=previous.get('train_seconds'),
      rows=len(kept))
  return merged


def write_outputs(results: dict[str, Any], args, wall_seconds: float,
                  command: str) -> None:
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(dict(results, wall_seconds=wall_seconds, command=command,
                   seeds=args.seeds), f, indent=2)
  lines = [
      '# Logit distillation methods on mnist5k and digits', '',
      f'Command: `{command}`', '',
      f'Wall time of this invocation: {wall_seconds / 60:.1f} min '
      f'({results["trained_now"]} of {results["num_runs"]} runs trained by '
      f'it, the others read); training time of all runs, summed: '
      f'{results["train_seconds"] / 60:.1f} min. Seeds {args.seeds}; errors '
      f'are mean +- std over seeds (validation chooses, test reported).',
      '']
  if results.get('kept_from'):
    kept = results['kept_from']
    lines += [
        f'{kept["rows"]} rows (the methods and datasets this invocation did '
        f'not train) are kept from the previous results.json, written by '
        f'`{kept["command"]}` ({kept["num_runs"]} runs, '
        f'{kept["train_seconds"] / 60:.1f} min of training), with the same '
        f'teachers (their errors checked equal).', '']
  lines += [
      '| dataset | student | method | val errors | test errors | teacher '
      'test errors |', '|---|---|---|---|---|---|']
  for r in results['rows']:
    mark = ' (fewest val errors' + (')' if r.get('clear_lead') else
                                    ', within 1 std)') if r.get('best') else ''
    if r.get('diverged'):
      rest = ('' if len(r['diverged']) == len(args.seeds)
              else '; the others averaged')
      mark += (f' (diverged, loss NaN: {len(r["diverged"])} of '
               f'{len(args.seeds)} seeds{rest})')
    lines.append(
        f'| {r["dataset"]} | 2x{r["width"]} | {LABELS[r["method"]]}{mark} | '
        f'{study.fmt(r["val"])} / {r["num_examples"]["val"]:g} | '
        f'{study.fmt(r["test"])} / {r["num_examples"]["test"]:g} | '
        f'{study.fmt(r["teacher"]["test"])} |')
  if results.get('teacher_recipes'):
    lines += ['', f'Teacher recipes tried on seed {args.seeds[0]} (overrides '
              'of configs/mnist5k_teacher.py); the one with the fewest '
              'validation errors teaches every seed:', '',
              '| dataset | recipe | overrides | val errors | test errors |',
              '|---|---|---|---|---|']
    for r in results['teacher_recipes']:
      lines.append(f'| {r["dataset"]} | {r["recipe"]}'
                   f'{" (chosen)" if r["chosen"] else ""} | '
                   f'`{json.dumps(r["overrides"])}` | {r["val"]} | '
                   f'{r["test"]} |')
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')

  groups = sorted({(r['dataset'], r['width']) for r in results['rows']},
                  key=lambda g: (g[0], -g[1]))
  fig, axes = plt.subplots(1, len(groups), figsize=(4 * len(groups), 3.5),
                           squeeze=False)
  for ax, (dataset, width) in zip(axes[0], groups):
    rows = [r for r in results['rows']
            if r['dataset'] == dataset and r['width'] == width]
    study.error_bars(ax, rows, LABELS, rows[0]['teacher']['test']['mean'],
                     colors={'scratch': '0.6'})
    ax.set_title(f'{dataset}, 2x{width}')
    ax.set_ylabel('test errors')
  fig.tight_layout()
  fig.savefig(os.path.join(args.out_dir, 'methods.png'), dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  command = ' '.join(['python experiments/logit_methods/run.py',
                      *(sys.argv[1:] if argv is None else argv)])
  start = time.perf_counter()
  candidates = recipe_candidates(args)
  study.run_all(candidates, lambda run: make(run, {}))
  recipes = choose_recipes(args, candidates)
  runs = plan_runs(args, recipes)
  teacher_configs: dict[str, Any] = {}
  for run in runs:
    if run['method'] == 'teacher':
      teacher_configs[run['workdir']] = study.make_config(
          run['config_name'], run['arg'], run['overrides'])
  trained, _ = study.run_all(runs, lambda run: make(run, teacher_configs),
                             record_divergence=True)
  results = summarise(runs, args)
  previous_path = os.path.join(args.out_dir, 'results.json')
  previous = None
  if args.merge and os.path.exists(previous_path):
    with open(previous_path) as f:
      previous = json.load(f)
  every = {r['workdir']: r for r in candidates + runs}.values()
  results.update(
      trained_now=trained, num_runs=len(every),
      train_seconds=sum(r['summary'].get('train_seconds', 0.0)
                        for r in every if r['summary'] is not None))
  results['teacher_recipes'] = [
      dict(dataset=r['dataset'], recipe=r['recipe'],
           overrides=TEACHER_RECIPES[r['dataset']][r['recipe']],
           val=study.errors(r['summary'], SPLITS[r['dataset']][1]),
           test=study.errors(r['summary'], 'test'),
           chosen=recipes[r['dataset']] == r['recipe'])
      for r in candidates]
  if previous is not None:
    results = merge(results, previous, len(args.seeds))
    kept_recipes = [r for r in previous.get('teacher_recipes', [])
                    if r['dataset'] not in args.datasets]
    results['teacher_recipes'] = kept_recipes + results['teacher_recipes']
  write_outputs(results, args, time.perf_counter() - start, command)
  print(open(os.path.join(args.out_dir, 'results.md')).read())
  return results


if __name__ == '__main__':
  main()
