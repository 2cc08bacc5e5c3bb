r"""Test accuracy of the distilled mnist5k student over alpha x temperature.

  python experiments/alpha_temperature_sweep/run.py \
      --workdir=workdirs/alpha_temperature_sweep

Distils the 2x800 student from the 2x1200 teacher (configs/mnist5k_distill.py)
at every alpha of --alphas (the weight of the soft term; 1 - alpha weights the
hard labels) and every temperature T of --temperatures. alpha = 0 ignores T,
so it runs once. References: the same student from scratch
(configs/mnist5k_student.py) and the teacher (configs/mnist5k_teacher.py,
trained in <workdir>/teacher unless --teacher_workdir names a finished run).
Runs go --parallel at a time, each in its own subprocess (default 1: in this
process, one after another); a run whose workdir holds a summary.json is
read, not rerun, and an unfinished one resumes. Writes results.json,
results.md (markdown table of test accuracy) and heatmap.png to --out_dir
(default: this folder; with --tiny, --workdir). `--tiny` shrinks every run to
a few steps (for tests).
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

HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/alpha_temperature_sweep',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and heatmap.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--teacher_workdir', default=None,
                      help='A finished mnist5k_teacher run (default: '
                      '<workdir>/teacher, trained there if unfinished).')
  parser.add_argument('--alphas', default='0,0.25,0.5,0.75,1')
  parser.add_argument('--temperatures', default='1,2,4,8,16')
  parser.add_argument('--seed', type=int, default=0)
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
  if args.parallel < 1:
    raise ValueError(f'--parallel={args.parallel} must be >= 1.')
  if args.out_dir is None:
    args.out_dir = args.workdir if args.tiny else HERE
  if args.teacher_workdir is None:
    args.teacher_workdir = os.path.join(args.workdir, 'teacher')
  return args


def plan_runs(args: argparse.Namespace) -> tuple[dict, dict, list[dict]]:
  """(teacher run, scratch run, distilled runs): config name, arg, workdir."""
  common = (['tiny'] if args.tiny else []) + [f'seed={args.seed}']
  epochs = [f'num_epochs={args.num_epochs:g}'] if args.num_epochs else []
  teacher = dict(name='teacher', config_name='mnist5k_teacher',
                 arg=','.join(common), workdir=args.teacher_workdir)
  scratch = dict(name='scratch', config_name='mnist5k_student',
                 arg=','.join(common + epochs),
                 workdir=os.path.join(args.workdir, 'scratch'))
  distilled = []
  for alpha in args.alphas:
    for t in ([1.0] if alpha == 0 else args.temperatures):
      name = 'alpha0' if alpha == 0 else f'alpha{alpha:g}_T{t:g}'
      distilled.append(dict(
          name=name, alpha=alpha, temperature=None if alpha == 0 else t,
          config_name='mnist5k_distill',
          arg=','.join(common + epochs + [
              f'teacher_workdir={args.teacher_workdir}',
              f'distill.alpha={alpha}', f'distill.temperature={t}']),
          workdir=os.path.join(args.workdir, name)))
  return teacher, scratch, distilled


def summary_path(run: dict[str, Any]) -> str:
  """Where a finished run's summary lies; its presence marks it done."""
  return os.path.join(run['workdir'], 'summary.json')


def train_run(run: dict[str, Any]) -> None:
  """Trains one run in this process (imports JAX here, not in the parent)."""
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(run['config_name'], run['arg'])
  train.train_and_evaluate(config, run['workdir'])


def run_all(runs: list[dict[str, Any]], parallel: int) -> None:
  """Trains every unfinished run, `parallel` subprocesses at a time."""
  pending = [r for r in runs if not os.path.exists(summary_path(r))]
  done = len(runs) - len(pending)
  if done:
    print(f'{done} of {len(runs)} runs finished before; reading them.',
          flush=True)
  start = time.perf_counter()

  def finished(run, seconds):
    nonlocal done
    done += 1
    with open(summary_path(run)) as f:
      accuracy = json.load(f)['eval']['test']['accuracy']
    print(f'[{done}/{len(runs)}] {run["name"]}: {seconds:.0f} s, test '
          f'accuracy {100 * accuracy:.1f}% ({time.perf_counter() - start:.0f}'
          ' s elapsed)', flush=True)

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


def test_accuracy(run: dict[str, Any]) -> float:
  """Final test accuracy of a finished run."""
  with open(summary_path(run)) as f:
    return float(json.load(f)['eval']['test']['accuracy'])


def accuracy_grid(args, distilled) -> np.ndarray:
  """[alpha, T] test accuracy; the alpha = 0 run fills its whole row."""
  by_name = {r['name']: test_accuracy(r) for r in distilled}
  grid = np.zeros((len(args.alphas), len(args.temperatures)))
  for i, alpha in enumerate(args.alphas):
    for j, t in enumerate(args.temperatures):
      grid[i, j] = by_name['alpha0' if alpha == 0 else f'alpha{alpha:g}_T{t:g}']
  return grid


def markdown(args, grid, scratch, teacher, seconds) -> str:
  """The accuracy grid as a markdown table, with the references."""
  lines = ['Test accuracy (%) of the 2x800 student on the 1,000 mnist5k test '
           'digits; rows: alpha (weight of the soft term), columns: '
           f'temperature T; seed {args.seed}, '
           f'{args.num_epochs or 60:g} epochs per student.', '',
           '| alpha \\ T | ' + ' | '.join(f'{t:g}' for t in args.temperatures)
           + ' |', '|---' * (len(args.temperatures) + 1) + '|']
  for i, alpha in enumerate(args.alphas):
    note = ' (T unused)' if alpha == 0 else ''
    lines.append(f'| {alpha:g}{note} | ' + ' | '.join(
        f'{100 * a:.1f}' for a in grid[i]) + ' |')
  best = np.unravel_index(np.argmax(grid), grid.shape)
  lines += ['', f'References: student from scratch {100 * scratch:.1f}%, '
            f'teacher {100 * teacher:.1f}%. Best cell: alpha = '
            f'{args.alphas[best[0]]:g}, T = {args.temperatures[best[1]]:g} '
            f'({100 * grid[best]:.1f}%).', '',
            f'Wall time of this invocation {seconds / 60:.1f} min '
            f'(--parallel={args.parallel}).']
  return '\n'.join(lines)


def plot(path: str, args, grid, scratch, teacher) -> None:
  """Heatmap of the grid, and accuracy against T with reference lines."""
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.6))
  image = left.imshow(100 * grid, cmap='viridis', aspect='auto',
                      origin='lower')
  left.set_xticks(range(len(args.temperatures)),
                  [f'{t:g}' for t in args.temperatures])
  left.set_yticks(range(len(args.alphas)),
                  [f'{a:g}' + (' (T unused)' if a == 0 else '')
                   for a in args.alphas])
  for i in range(grid.shape[0]):
    for j in range(grid.shape[1]):
      left.text(j, i, f'{100 * grid[i, j]:.1f}', ha='center', va='center',
                color='w' if grid[i, j] < grid.mean() else 'k', fontsize=9)
  left.set_xlabel('temperature T (dimensionless)')
  left.set_ylabel('alpha (weight of the soft term)')
  left.set_title(f'test accuracy (%); scratch {100 * scratch:.1f}, teacher '
                 f'{100 * teacher:.1f}', fontsize=10)
  fig.colorbar(image, ax=left, label='test accuracy (%)')
  for i, alpha in enumerate(args.alphas):
    right.plot(args.temperatures, 100 * grid[i], marker='o',
               ls=':' if alpha == 0 else '-', label=f'alpha = {alpha:g}')
  right.axhline(100 * scratch, color='tab:gray', ls='--',
                label='student from scratch')
  right.axhline(100 * teacher, color='k', ls='-.', label='teacher')
  right.set_xscale('log', base=2)
  right.set_xticks(args.temperatures, [f'{t:g}' for t in args.temperatures])
  right.set_xlabel('temperature T (dimensionless, log scale)')
  right.set_ylabel('test accuracy (%)')
  right.set_title('per alpha, with the reference runs', fontsize=10)
  right.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: Sequence[str] | None = None) -> dict[str, Any] | None:
  args = parse_args(argv)
  if args.run_one is not None:
    train_run(json.loads(args.run_one))
    return None
  start = time.perf_counter()
  teacher, scratch, distilled = plan_runs(args)
  run_all([teacher], 1)  # Every distilled run reads it.
  run_all([scratch] + distilled, args.parallel)
  seconds = time.perf_counter() - start
  grid = accuracy_grid(args, distilled)
  scratch_accuracy, teacher_accuracy = (test_accuracy(scratch),
                                        test_accuracy(teacher))
  os.makedirs(args.out_dir, exist_ok=True)
  table = markdown(args, grid, scratch_accuracy, teacher_accuracy, seconds)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  plot(os.path.join(args.out_dir, 'heatmap.png'), args, grid,
       scratch_accuracy, teacher_accuracy)
  record = dict(args=vars(args), seconds=seconds, accuracy=grid.tolist(),
                scratch=scratch_accuracy, teacher=teacher_accuracy,
                runs=[teacher, scratch] + distilled)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  print('\n' + table)
  print(f'\nWrote results.md, results.json, heatmap.png to {args.out_dir}')
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
