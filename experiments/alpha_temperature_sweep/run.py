r"""Validation and test errors of the distilled mnist5k student over alpha x T.

  python experiments/alpha_temperature_sweep/run.py \
      --workdir=workdirs/alpha_temperature_sweep --parallel=2

For each seed of --seeds, distils the 2x800 student from the 2x1200 teacher
of that seed (configs/mnist5k_distill.py: train on `train[:3600]`, validate
on `train[3600:]`, test reported beside) at every alpha of --alphas (the
weight of the soft term; 1 - alpha weights the hard labels) and every
temperature T of --temperatures. alpha = 0 ignores T, so it runs once per
seed. References: the same student from scratch (configs/mnist5k_student.py)
and the teacher (configs/mnist5k_teacher.py, the recipe chosen on validation,
in <teachers_dir>/teacher_s<seed>: trained there unless finished, so the
Hinton study's teachers can be shared). The best cell is the one with the
fewest mean validation errors; its test errors are reported, never used to
choose. Runs go --parallel at a time, each in its own subprocess (default 1:
in this process, one after another); a run whose workdir holds a
summary.json is read, not rerun, and an unfinished one resumes. Writes
results.json, results.md (markdown tables of validation and test errors,
mean +- std over seeds) and heatmap.png to --out_dir (default: this folder;
with --tiny, --workdir). `--tiny` shrinks every run to a few steps (for
tests).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Any

import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import rundir  # pylint: disable=g-import-not-at-top
# Configs, run-or-read and statistics; the trainer is imported only where a
# run trains (in its subprocess when --parallel > 1).
from kd_jax import study  # pylint: disable=g-import-not-at-top

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/alpha_temperature_sweep',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and heatmap.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--teachers_dir', default=None,
                      help='Where the teachers are, teacher_s<seed> '
                      '(default: --workdir; trained there if unfinished).')
  parser.add_argument('--alphas', default='0,0.25,0.5,0.75,1')
  parser.add_argument('--temperatures', default='1,2,4,8,16')
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--num_epochs', type=float, default=None,
                      help='Overrides the 60 epochs of the student runs '
                      '(the teacher keeps its config).')
  parser.add_argument('--parallel', type=int, default=1,
                      help='Runs at a time, each in a subprocess (1: none).')
  parser.add_argument('--tiny', action='store_true',
                      help='Seconds-long runlocal runs (for tests).')
  parser.add_argument('--run_one', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.run_one is not None:
    return args
  args.alphas = sorted({float(a) for a in args.alphas.split(',') if a})
  args.temperatures = sorted({float(t) for t in args.temperatures.split(',')
                              if t})
  if not args.alphas or not args.temperatures:
    raise ValueError(f'--alphas={args.alphas} and --temperatures='
                     f'{args.temperatures} must name at least one value each.')
  if any(not 0 <= a <= 1 for a in args.alphas):
    raise ValueError(f'--alphas={args.alphas}: alpha weights the soft term '
                     'and must lie in [0, 1].')
  args.seeds = [int(x) for x in args.seeds.split(',') if x]
  if not args.seeds:
    raise ValueError('--seeds is empty; e.g. --seeds=0,1,2.')
  if args.parallel < 1:
    raise ValueError(f'--parallel={args.parallel} must be >= 1.')
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  if args.teachers_dir is None:
    args.teachers_dir = args.workdir
  return args


def plan_runs(args: argparse.Namespace
              ) -> tuple[list[dict], list[dict], list[dict]]:
  """(teachers, scratch runs, distilled runs), one of each per seed:
  name, seed, config name, arg, workdir."""
  teachers, scratch, distilled = [], [], []
  epochs = [f'num_epochs={args.num_epochs:g}'] if args.num_epochs else []
  for seed in args.seeds:
    common = (['tiny'] if args.tiny else []) + [f'seed={seed}']
    teacher_workdir = os.path.join(args.teachers_dir, f'teacher_s{seed}')
    teachers.append(dict(name=f'teacher_s{seed}', seed=seed,
                         config_name='mnist5k_teacher', arg=','.join(common),
                         workdir=teacher_workdir))
    scratch.append(dict(name=f'scratch_s{seed}', seed=seed,
                        config_name='mnist5k_student',
                        arg=','.join(common + epochs),
                        workdir=os.path.join(args.workdir,
                                             f'scratch_s{seed}')))
    for alpha in args.alphas:
      for t in ([1.0] if alpha == 0 else args.temperatures):
        cell = 'alpha0' if alpha == 0 else f'alpha{alpha:g}_T{t:g}'
        distilled.append(dict(
            name=f'{cell}_s{seed}', cell=cell, seed=seed, alpha=alpha,
            temperature=None if alpha == 0 else t,
            config_name='mnist5k_distill',
            arg=','.join(common + epochs + [
                f'teacher_workdir={teacher_workdir}',
                f'distill.alpha={alpha}', f'distill.temperature={t}']),
            workdir=os.path.join(args.workdir, f'{cell}_s{seed}')))
  return teachers, scratch, distilled


def train_run(run: dict[str, Any]) -> None:
  """Trains one unfinished run in this process (a finished one is read)."""
  study.run_or_read(study.make_config(run['config_name'], run['arg']),
                    run['workdir'])


def run_all(runs: list[dict[str, Any]], parallel: int) -> None:
  """Trains every unfinished run, `parallel` subprocesses at a time."""
  pending = [r for r in runs if not rundir.is_finished(r['workdir'])]
  for r in runs:
    if r not in pending:  # Only a run of the config asked for is read.
      study.check_finished_config(
          study.make_config(r['config_name'], r['arg']), r['workdir'])
  done = len(runs) - len(pending)
  if done:
    print(f'{done} of {len(runs)} runs finished before; reading them.',
          flush=True)
  start = time.perf_counter()

  def finished(run, seconds):
    nonlocal done
    done += 1
    print(f'[{done}/{len(runs)}] {run["name"]}: {seconds:.0f} s, '
          + ', '.join(f'{split} errors {errors:g}' for split, errors in zip(
              ('validation', 'test'), split_errors(run)))
          + f' ({time.perf_counter() - start:.0f} s elapsed)', flush=True)

  if parallel == 1:
    for run in pending:
      print(f'{run["name"]}: training in {run["workdir"]} ...', flush=True)
      t0 = time.perf_counter()
      train_run(run)
      finished(run, time.perf_counter() - t0)
    return
  active: list[tuple[dict, subprocess.Popen, float, Any]] = []
  queue = list(pending)
  while queue or active:
    while queue and len(active) < parallel:
      run = queue.pop(0)
      os.makedirs(run['workdir'], exist_ok=True)
      log = open(os.path.join(run['workdir'], 'stdout.log'), 'w')
      print(f'{run["name"]}: training in {run["workdir"]} (log: '
            f'{log.name}) ...', flush=True)
      proc = subprocess.Popen(
          [sys.executable, os.path.abspath(__file__),
           f'--run_one={json.dumps(run)}'],
          stdout=log, stderr=subprocess.STDOUT)
      active.append((run, proc, time.perf_counter(), log))
    time.sleep(1.0)
    for item in list(active):
      run, proc, t0, log = item
      if proc.poll() is None:
        continue
      active.remove(item)
      log.close()
      if proc.returncode != 0:
        for _, other, _, other_log in active:
          other.kill()
          other.wait()
          other_log.close()
        raise RuntimeError(f'run {run["name"]} failed (exit code '
                           f'{proc.returncode}); see {log.name}.')
      finished(run, time.perf_counter() - t0)


def split_errors(run: dict[str, Any]) -> tuple[float, float]:
  """(validation, test) errors of a finished run: its first and last eval
  splits."""
  results = study.read_summary(run['workdir'])['eval']
  splits = list(results)
  return (float(results[splits[0]]['errors']),
          float(results[splits[-1]]['errors']))


def error_grids(args, distilled) -> dict[str, list[list[dict[str, Any]]]]:
  """{'validation', 'test'}: [alpha][T] stats over seeds of each cell's
  errors; the alpha = 0 cell fills its whole row."""
  by_cell: dict[str, list[tuple[float, float]]] = {}
  for run in distilled:
    by_cell.setdefault(run['cell'], []).append(split_errors(run))
  grids = {}
  for k, split in enumerate(('validation', 'test')):
    grids[split] = [[study.stats(e[k] for e in by_cell[
        'alpha0' if alpha == 0 else f'alpha{alpha:g}_T{t:g}'])
                     for t in args.temperatures] for alpha in args.alphas]
  return grids


def best_cell(args, grids) -> tuple[int, int]:
  """(alpha index, T index) of the fewest mean validation errors."""
  means = np.asarray([[c['mean'] for c in row] for row in grids['validation']])
  return tuple(int(i) for i in np.unravel_index(np.argmin(means),
                                                means.shape))


def markdown(args, grids, references, seconds) -> str:
  """Validation and test errors over the grid, with the references."""
  (i, j) = best_cell(args, grids)
  lines = [f'Errors of the 2x800 student (mean +- std over seeds {args.seeds}'
           f', {args.num_epochs or 60:g} epochs per student); rows: alpha '
           '(weight of the soft term), columns: temperature T.']
  for split, size in (('validation', '400 held-out train digits'),
                      ('test', '1,000 test digits')):
    lines += ['', f'{split.capitalize()} errors ({size}):', '',
              '| alpha \\ T | ' + ' | '.join(f'{t:g}'
                                             for t in args.temperatures)
              + ' |', '|---' * (len(args.temperatures) + 1) + '|']
    for a, alpha in enumerate(args.alphas):
      note = ' (T unused)' if alpha == 0 else ''
      lines.append(f'| {alpha:g}{note} | ' + ' | '.join(
          study.fmt(c) for c in grids[split][a]) + ' |')
  lines += ['', 'References, validation / test errors: student from scratch '
            f'{study.fmt(references["scratch"]["validation"])} / '
            f'{study.fmt(references["scratch"]["test"])}; teacher '
            f'{study.fmt(references["teacher"]["validation"])} / '
            f'{study.fmt(references["teacher"]["test"])}.', '',
            f'Chosen on validation: alpha = {args.alphas[i]:g}, T = '
            f'{args.temperatures[j]:g} '
            f'({study.fmt(grids["validation"][i][j])} validation errors; '
            f'{study.fmt(grids["test"][i][j])} test errors).',
            '', f'Wall time of this invocation {seconds / 60:.1f} min '
            f'(--parallel={args.parallel}).']
  return '\n'.join(lines)


def plot(path: str, args, grids, references) -> None:
  """Heatmaps of mean validation and test errors over alpha x T."""
  fig, axes = plt.subplots(1, 2, figsize=(12, 4.6))
  best = best_cell(args, grids)
  for ax, split in zip(axes, ('validation', 'test')):
    means = np.asarray([[c['mean'] for c in row] for row in grids[split]])
    image = ax.imshow(means, cmap='viridis_r', aspect='auto', origin='lower')
    ax.set_xticks(range(len(args.temperatures)),
                  [f'{t:g}' for t in args.temperatures])
    ax.set_yticks(range(len(args.alphas)),
                  [f'{a:g}' + (' (T unused)' if a == 0 else '')
                   for a in args.alphas])
    for a in range(means.shape[0]):
      for t in range(means.shape[1]):
        mark = '*' if (a, t) == best else ''
        ax.text(t, a, f'{means[a, t]:.1f}{mark}', ha='center', va='center',
                color='w' if means[a, t] > means.mean() else 'k', fontsize=9)
    ax.set_xlabel('temperature T')
    ax.set_ylabel('alpha (weight of the soft term)')
    ref = references['scratch'][split]['mean']
    teacher = references['teacher'][split]['mean']
    ax.set_title(f'{split} errors, mean of {len(args.seeds)} seeds (* chosen '
                 f'on validation)\nscratch {ref:.1f}, teacher {teacher:.1f}',
                 fontsize=10)
    fig.colorbar(image, ax=ax, label=f'{split} errors')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.run_one is not None:
    train_run(json.loads(args.run_one))
    return None
  start = time.perf_counter()
  teachers, scratch, distilled = plan_runs(args)
  run_all(teachers, 1)  # Every distilled run reads its seed's teacher.
  run_all(scratch + distilled, args.parallel)
  seconds = time.perf_counter() - start
  grids = error_grids(args, distilled)
  references = {
      name: dict(zip(('validation', 'test'), (
          study.stats(e[k] for e in map(split_errors, runs)) for k in (0, 1))))
      for name, runs in (('scratch', scratch), ('teacher', teachers))}
  os.makedirs(args.out_dir, exist_ok=True)
  table = markdown(args, grids, references, seconds)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot(os.path.join(args.out_dir, 'heatmap.png'), args, grids, references)
  i, j = best_cell(args, grids)
  record = dict(args=vars(args), seconds=seconds, errors=grids,
                references=references,
                chosen=dict(alpha=args.alphas[i],
                            temperature=args.temperatures[j]),
                runs=teachers + scratch + distilled)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  print('\n' + table)
  print(f'\nWrote results.md, results.json, heatmap.png to {args.out_dir}')
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
