r"""Specialist ensembles on mnist5k, end to end (Hinton et al. 2015, sec. 5).

  python experiments/specialists/run.py --out=workdirs/specialists_mnist5k
  python experiments/specialists/run.py --tiny --out=/tmp/specialists_tiny
  python experiments/specialists/run.py --arg=specialist.cluster_temperature=2.0

runs every role of configs/specialists_mnist5k.py under --out: the
generalist, the groups (`kd_jax.specialists.cluster`), one specialist per group,
the combination's evaluation (`kd_jax.specialists.evaluate`) on the
validation split (`train[3600:]`, the 400 train digits no run trains on) and
on the test split, a 2x800 student distilled from the combination, the same
student distilled from the generalist alone, and the same student without a
teacher. It writes --out/results.json and --out/results.md (validation and
test errors of every model, the coverage breakdown per split and the run
time with the machine's load) and --out/combination_{validation,test}/.
Runs that already finished are reused (each workdir resumes), so a rerun
only reports. `--tiny` is the seconds-long form that
tests/test_specialist_pipeline.py runs: every run in its runlocal size, two
specialists, and no teacher-free or generalist-only students.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

from kd_jax.specialists import cluster as cluster_classes
from kd_jax.specialists import evaluate as evaluate_specialists
from kd_jax import train
from kd_jax.config_lib import load_config

CONFIG = 'specialists_mnist5k'
# The config's eval splits, in order.
SPLIT_NAMES = ('validation', 'test')


def _load_average() -> str:
  try:
    return ' '.join(f'{x:.2f}' for x in os.getloadavg())
  except OSError:
    return 'unknown'


def run(out: str, tiny: bool = False, arg: str = '') -> dict[str, Any]:
  """Runs the pipeline under `out`; returns (and writes) the results.

  `arg` is added to every config's arg, e.g. 'specialist.top_n=1'.
  """
  start, load_before = time.time(), _load_average()
  base = ','.join(filter(None, [
      f'root={out}', 'runlocal,specialist.num_groups=2' if tiny else '', arg]))

  def config(arg: str):
    return load_config(CONFIG, f'{base},{arg}')

  seconds: dict[str, float] = {}

  def timed(name, fn, *args):
    t = time.time()
    result = fn(*args)
    seconds[name] = round(time.time() - t, 1)
    return result

  def train_role(name: str, arg: str) -> dict[str, Any]:
    return timed(name, train.train_and_evaluate, config(arg),
                 os.path.join(out, name))

  splits = dict(zip(SPLIT_NAMES, config('role=distill').eval_splits))
  generalist = train_role('generalist', 'role=generalist')
  groups = timed('cluster', cluster_classes.cluster,
                 config('role=generalist'), os.path.join(out, 'generalist'))
  for k in range(groups['num_groups']):
    train_role(f'specialist_{k}', f'role=specialist,specialist.index={k}')
  combination = {}
  for name, split in splits.items():
    combination[name] = timed(f'evaluate ({name})',
                              evaluate_specialists.evaluate,
                              config('role=distill'), split)
    evaluate_specialists.write_report(combination[name],
                                      os.path.join(out, f'combination_{name}'))
  students = {'distill': train_role('distill', 'role=distill')}
  if not tiny:
    students['distill_generalist'] = train_role('distill_generalist',
                                                'role=distill_generalist')
    students['student'] = train_role('student', 'role=student')

  def scores(summary):
    return {name: dict(accuracy=summary['eval'][split]['accuracy'],
                       errors=summary['eval'][split]['errors'],
                       teacher_accuracy=summary['eval'][split].get(
                           'teacher_accuracy'))
            for name, split in splits.items()}

  results = dict(
      tiny=tiny, splits=splits, groups=groups['group_names'],
      generalist=scores(generalist), combination=combination,
      students={name: scores(s) for name, s in students.items()},
      seconds=seconds, total_seconds=round(time.time() - start, 1),
      load_average_before=load_before, load_average_after=_load_average())
  with open(os.path.join(out, 'results.json'), 'w') as f:
    json.dump(results, f, indent=2)
  with open(os.path.join(out, 'results.md'), 'w') as f:
    f.write(markdown(results))
  return results


def markdown(results: dict[str, Any]) -> str:
  names = dict(distill='2x800 student distilled from generalist + specialists',
               distill_generalist='2x800 student distilled from the '
               'generalist',
               student='2x800 student without a teacher')
  combination = results['combination']
  sizes = {name: combination[name]['num_examples'] for name in SPLIT_NAMES}
  header = ' | '.join(f'{name} errors (of {sizes[name]}) | {name} accuracy'
                      for name in SPLIT_NAMES)
  lines = [f'Validation split `{results["splits"]["validation"]}`, test split '
           f'`{results["splits"]["test"]}`; every run trains on the rest of '
           'the train digits.', '',
           f'| model | {header} |', '|---|' + '---:|---:|' * len(SPLIT_NAMES)]

  def row(label, errors, accuracy):
    cells = ' | '.join(f'{errors[n]:.0f} | {accuracy[n]:.2%}'
                       for n in SPLIT_NAMES)
    lines.append(f'| {label} | {cells} |')

  row('generalist', {n: combination[n]['generalist_errors']
                     for n in SPLIT_NAMES},
      {n: combination[n]['generalist_accuracy'] for n in SPLIT_NAMES})
  row('generalist + specialists', {n: combination[n]['combined_errors']
                                   for n in SPLIT_NAMES},
      {n: combination[n]['combined_accuracy'] for n in SPLIT_NAMES})
  for name, s in results['students'].items():
    row(names[name], {n: s[n]['errors'] for n in SPLIT_NAMES},
        {n: s[n]['accuracy'] for n in SPLIT_NAMES})
  for name in SPLIT_NAMES:
    lines += ['', f'{name.capitalize()}:', '',
              evaluate_specialists.markdown(combination[name]).rstrip('\n')]
  parts = ', '.join(f'{k} {v:.0f} s' for k, v in results['seconds'].items())
  lines += ['', f'Run time: {results["total_seconds"]:.0f} s ({parts}); load '
            f'average (1, 5, 15 min) before {results["load_average_before"]}, '
            f'after {results["load_average_after"]}.']
  return '\n'.join(lines) + '\n'


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', default='workdirs/specialists_mnist5k')
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--arg', default='',
                      help='added to every config arg, e.g. '
                      'specialist.cluster_temperature=2.0')
  args = parser.parse_args()
  results = run(args.out, tiny=args.tiny, arg=args.arg)
  print(markdown(results))


if __name__ == '__main__':
  main()
