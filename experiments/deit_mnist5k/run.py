r"""DeiT's distillation of a ViT student on mnist5k: from scratch, soft, hard.

  python experiments/deit_mnist5k/run.py --workdir=workdirs/deit_mnist5k

For each seed in --seeds, with configs/deit_mnist5k.py (AdamW, +-2 px jitter,
`train[:3600]` to train, `train[3600:]` to validate, the test split reported
beside) and its `student` (default `vit_mini`: 4 blocks, width 64, 7x7
patches, 139k params, sized for a CPU; ViT-Ti is about 16x slower here):

* the teacher: configs/mnist5k_teacher.py of the same seed (the 2x1200 MLP
  of the Hinton study, its recipe chosen on validation by
  experiments/teacher_recipe), shared through --teachers_dir;
* `scratch`: the ViT trained on the labels alone (role=student);
* `soft`: DeiT's soft distillation on the class token, (1 - lambda) CE +
  lambda T^2 KL, lambda = 0.1, T = 3 (role=distill);
* `hard`: DeiT's hard distillation with its distillation token
  (distill_token=True, distill.soft=deit_hard): the class head learns the
  labels, the distillation head the teacher's argmax, half each; at test
  time the two heads are averaged.

The online teacher sees the same jittered view as the student. Writes
results.json and results.md (validation and test errors, test agreement with
the teacher, mean +- std over seeds, wall time) to --out_dir (default: this
folder; with --tiny, --workdir). Finished runs are read, not rerun. `--tiny`
shrinks every run to a few steps and one seed, to check the script.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
VAL, TEST = 'train[3600:]', 'test'
# (label, configs/deit_mnist5k.py args) of each student.
METHODS = {
    'scratch': 'role=student',
    'soft': 'role=distill',
    'hard': 'role=distill,distill_token=True,distill.soft=deit_hard',
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/deit_mnist5k')
  parser.add_argument('--out_dir', default=None)
  parser.add_argument('--teachers_dir', default=None,
                      help='Where the teachers go, mnist5k_teacher_s<seed> '
                      '(default: --workdir).')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--student', default='vit_mini',
                      help='A ViT of the zoo: vit_mini, vit_tiny, vit_ti16.')
  parser.add_argument('--epochs', type=float, default=60)
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  args.seeds = [int(s) for s in args.seeds.split(',') if s]
  if not args.seeds:
    raise ValueError('--seeds is empty; e.g. --seeds=0,1,2.')
  if args.tiny:
    args.seeds = args.seeds[:1]
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  if args.teachers_dir is None:
    args.teachers_dir = args.workdir
  return args


def plan_runs(args: argparse.Namespace) -> list[dict[str, Any]]:
  """Teachers first, then each seed's three students."""
  tiny = ['tiny'] if args.tiny else []
  runs = []
  for seed in args.seeds:
    name = f'mnist5k_teacher_s{seed}'
    runs.append(dict(name=name, method='teacher', seed=seed,
                     config='mnist5k_teacher',
                     arg=','.join(tiny + [f'seed={seed}']),
                     workdir=os.path.join(args.teachers_dir, name)))
  for seed in args.seeds:
    teacher = runs[args.seeds.index(seed)]['workdir']
    for method, method_arg in METHODS.items():
      name = f'{args.student}_{method}_s{seed}'
      arg = [method_arg, 'teacher=mnist5k_mlp', f'teacher_workdir={teacher}',
             f'student={args.student}', f'seed={seed}']
      if args.tiny:
        arg.insert(0, 'runlocal')
      else:
        arg.append(f'num_epochs={args.epochs}')
      runs.append(dict(name=name, method=method, seed=seed,
                       config='deit_mnist5k', arg=','.join(arg),
                       workdir=os.path.join(args.workdir, name)))
  return runs


def make(run: dict[str, Any]):
  return study.make_config(run['config'], run['arg'])


def summarise(runs: list[dict[str, Any]]) -> dict[str, Any]:
  val_split, test_split = (list(runs[0]['summary']['eval'])[:2])
  rows = []
  for method in ('teacher', *METHODS):
    mine = [r for r in runs if r['method'] == method]
    test = [r['summary']['eval'][test_split] for r in mine]
    rows.append(dict(
        method=method,
        val=study.stats(study.errors(r['summary'], val_split) for r in mine),
        test=study.stats(study.errors(r['summary'], test_split)
                         for r in mine),
        agreement=(None if method in ('teacher', 'scratch') else
                   study.stats(100 * t['agreement'] for t in test)),
        num_params=mine[0]['summary']['num_params'],
        num_examples={s: mine[0]['summary']['eval'][s]['num_examples']
                      for s in (val_split, test_split)}))
  return dict(rows=rows, splits=[val_split, test_split])


def write_outputs(results, args, wall_seconds: float, command: str) -> None:
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(dict(results, wall_seconds=wall_seconds, command=command,
                   seeds=args.seeds, student=args.student), f, indent=2)
  val_split, test_split = results['splits']
  labels = dict(teacher='teacher (2x1200 MLP)', scratch=f'{args.student} '
                'from scratch', soft=f'{args.student}, DeiT soft (T=3, '
                'lambda=0.1)', hard=f'{args.student} + distillation token, '
                'DeiT hard')
  lines = ['# DeiT distillation on mnist5k', '',
           f'Command: `{command}`', '',
           f'Wall time: {wall_seconds / 60:.1f} min; seeds {args.seeds}; '
           'errors are mean +- std over seeds.', '',
           f'| model | params | val errors / '
           f'{results["rows"][0]["num_examples"][val_split]:g} | test errors '
           f'/ {results["rows"][0]["num_examples"][test_split]:g} | test '
           'agreement with the teacher (%) |', '|---|---:|---|---|---|']
  for r in results['rows']:
    agreement = '-' if r['agreement'] is None else study.fmt(r['agreement'],
                                                             2)
    lines.append(f'| {labels[r["method"]]} | {r["num_params"]:,} | '
                 f'{study.fmt(r["val"])} | {study.fmt(r["test"])} | '
                 f'{agreement} |')
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  command = ' '.join(['python experiments/deit_mnist5k/run.py',
                      *(sys.argv[1:] if argv is None else argv)])
  runs = plan_runs(args)
  start = time.perf_counter()
  study.run_all(runs, make)
  results = summarise(runs)
  write_outputs(results, args, time.perf_counter() - start, command)
  print(open(os.path.join(args.out_dir, 'results.md')).read())
  return results


if __name__ == '__main__':
  main()
