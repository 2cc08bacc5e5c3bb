r"""Hinton's protocol on mnist5k with transfer sets of 450 to 3,600 digits.

  python experiments/hinton_mnist/transfer_size.py \
      --workdir=workdirs/hinton_transfer --teachers_dir=workdirs/teachers

How much of the teacher-student gap distillation recovers as the transfer
set grows. For each --sizes n and --seeds seed: the 2x800 student trained
from scratch on the first n train digits (configs/mnist5k_student.py) and
distilled on the same n digits at T = 20, alpha = 0.9
(configs/mnist5k_distill.py) from the teacher of that seed
(`<teachers_dir>/teacher_s<seed>`, configs/mnist5k_teacher.py, trained on
all 3,600: Hinton's study's teachers). Every run takes the steps of 60
epochs of 3,600 digits (1,680 at batch 128), so the sizes differ in data,
not in compute; at n = 3,600 the runs are those of Hinton's study (same
config, data, steps and seed). Reports test errors (mean +- std over
seeds), the validation errors, and the gap recovered,
(scratch - distilled) / (scratch - teacher), per size. Writes results.json,
results.md and transfer_size.png to --out_dir (default:
experiments/hinton_mnist/transfer_size; with --tiny, --workdir).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from typing import Any

import matplotlib

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
VAL = 'train[3600:]'
# 60 epochs of train[:3600] at batch 128: the Hinton study's student runs.
STEPS = 60 * (3600 // 128)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/hinton_transfer')
  parser.add_argument('--teachers_dir', default='workdirs/teachers',
                      help='Holds teacher_s<seed> (trained if absent).')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--sizes', default='450,900,1800,3600',
                      help='Transfer-set sizes: the first n train digits.')
  parser.add_argument('--tiny', action='store_true',
                      help='A few steps per run, one seed: for tests.')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',')]
  args.sizes = [int(s) for s in args.sizes.split(',')]
  if args.tiny:
    args.seeds, args.sizes = args.seeds[:1], args.sizes[-2:]
    args.teachers_dir = os.path.join(args.workdir, 'teachers')
  if args.out_dir is None:
    args.out_dir = (args.workdir if args.tiny
                    else os.path.join(HERE, 'transfer_size'))
  return args


def plan_runs(args) -> list[dict[str, Any]]:
  common = ['tiny'] if args.tiny else []
  runs = []
  for seed in args.seeds:
    runs.append(dict(
        name=f'teacher_s{seed}', kind='teacher', seed=seed, size=3600,
        config_name='mnist5k_teacher', arg=','.join(common + [f'seed={seed}']),
        overrides={}, workdir=os.path.join(args.teachers_dir,
                                           f'teacher_s{seed}')))
  for size in args.sizes:
    for seed in args.seeds:
      teacher = os.path.join(args.teachers_dir, f'teacher_s{seed}')
      overrides = {'train_split': f'train[:{size}]',
                   'eval_splits': (VAL, 'test')}
      if not args.tiny:
        overrides.update(num_train_steps=STEPS, eval_every_steps=STEPS)
      runs.append(dict(
          name=f'scratch_n{size}_s{seed}', kind='scratch', seed=seed,
          size=size, config_name='mnist5k_student',
          arg=','.join(common + [f'seed={seed}']), overrides=overrides,
          workdir=os.path.join(args.workdir, f'scratch_n{size}_s{seed}')))
      runs.append(dict(
          name=f'distilled_n{size}_s{seed}', kind='distilled', seed=seed,
          size=size, config_name='mnist5k_distill',
          arg=','.join(common + [f'seed={seed}',
                                 f'teacher_workdir={teacher}']),
          overrides=overrides,
          workdir=os.path.join(args.workdir, f'distilled_n{size}_s{seed}')))
  return runs


def aggregate(runs, sizes) -> dict[str, Any]:
  def errors(kind, size, split):
    return [study.errors(r['summary'], split) for r in runs
            if r['kind'] == kind and r['size'] == size]
  teacher = study.stats(errors('teacher', 3600, 'test'))
  rows = []
  for size in sizes:
    scratch = study.stats(errors('scratch', size, 'test'))
    distilled = study.stats(errors('distilled', size, 'test'))
    pairs = list(zip(scratch['values'], distilled['values']))
    rows.append(dict(
        size=size, scratch=scratch, distilled=distilled,
        scratch_val=study.stats(errors('scratch', size, VAL)),
        distilled_val=study.stats(errors('distilled', size, VAL)),
        helped=sum(d < s for s, d in pairs), seeds=len(pairs),
        gap_recovered=study.gap_recovered(scratch['mean'], distilled['mean'],
                                          teacher['mean'])))
  return dict(teacher=teacher, rows=rows)


def markdown(result, args, trained, seconds) -> str:
  t = result['teacher']
  lines = [
      f'Teacher (2x1200, trained on all 3,600 digits): {study.fmt(t)} test '
      f'errors of 1,000 (seeds {args.seeds}). Students: 2x800, {STEPS} steps '
      'each whatever the size; distilled at T = 20, alpha = 0.9.', '',
      '| transfer set | scratch test | distilled test | distilled better '
      'in | gap recovered | scratch val | distilled val |',
      '|---:|---:|---:|---:|---:|---:|---:|']
  for r in result['rows']:
    lines.append(
        f'| {r["size"]:,} | {study.fmt(r["scratch"])} | '
        f'{study.fmt(r["distilled"])} | {r["helped"]} of {r["seeds"]} seeds | '
        f'{100 * r["gap_recovered"]:.0f}% | {study.fmt(r["scratch_val"])} | '
        f'{study.fmt(r["distilled_val"])} |')
  lines += ['', f'{trained} runs trained by this invocation in '
            f'{seconds / 60:.1f} min; the others read from their workdirs.']
  return '\n'.join(lines) + '\n'


def plot(path, result) -> None:
  rows = result['rows']
  sizes = [r['size'] for r in rows]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  for key, label in (('scratch', 'from scratch'), ('distilled', 'distilled')):
    ax.errorbar(sizes, [r[key]['mean'] for r in rows],
                yerr=[r[key]['std'] for r in rows], marker='o', capsize=3,
                label=label)
  ax.axhline(result['teacher']['mean'], color='C3', ls='--',
             label='teacher (3,600 digits)')
  ax.set_xscale('log', base=2)
  ax.set_xticks(sizes)
  ax.set_xticklabels([f'{s:,}' for s in sizes])
  ax.set_xlabel('transfer set (train digits)')
  ax.set_ylabel('test errors of 1,000')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  runs = plan_runs(args)
  trained, seconds = study.run_all(
      runs, lambda r: study.make_config(r['config_name'], r['arg'],
                                        r['overrides']))
  result = aggregate(runs, args.sizes)
  os.makedirs(args.out_dir, exist_ok=True)
  text = markdown(result, args, trained, seconds)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(text)
  record = dict(result, seeds=args.seeds, sizes=args.sizes, steps=STEPS,
                runs=[{k: r[k] for k in ('name', 'kind', 'seed', 'size',
                                          'workdir')} for r in runs])
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  plot(os.path.join(args.out_dir, 'transfer_size.png'), result)
  print(text)
  return record


if __name__ == '__main__':
  main()
  sys.exit(0)
