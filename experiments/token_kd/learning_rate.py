"""The token_kd study's learning rates, chosen on validation.

  python experiments/token_kd/learning_rate.py --workdir=workdirs/token_kd

Seed 0 of each of the study's runs named by --runs (default: the student
from scratch and distilled online with the forward KL), each at every rate
of --learning_rates, on the study's teacher, data and schedule (`run.py`,
with the same flags). A run at its role's rate (the rate flags, the
config's 1e-3 where unset) is the study's own seed-0 run, in
<workdir>/seed0; the others live in <workdir>/learning_rate/lr<rate>/seed0.
Finished runs are read, not retrained. --teacher_learning_rates also
trains the teacher at those rates (its run at --teacher_learning_rate is
the study's teacher, --teacher_workdir) and adds its row; with an empty
--learning_rates only those teachers are trained.

Each run's validation bits per character decide: tiny-shakespeare has no
split beside train and validation (nanoGPT's), so the rate is chosen on the
split the study reports. Writes <name>.md and <name>.json (the table and
{run: chosen rate}, what run.py --chosen_rates reads) to --out_dir.
"""

import argparse
import json
import os
import shlex
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(REPO, 'experiments', 'token_kd'))
sys.path.insert(0, REPO)

import run as token_kd  # pylint: disable=g-import-not-at-top,wrong-import-position


def teacher_rate_dir(args, rate: float) -> str:
  """The teacher's run at `rate`: the study's teacher at its rate."""
  if rate == token_kd.study_rate(args, 'teacher'):
    return token_kd.teacher_dir(args)
  return os.path.join(args.workdir, 'learning_rate', f'lr{rate:g}',
                      'teacher')


def add_choice_flags(parser: argparse.ArgumentParser, name: str) -> None:
  """--out_dir and --name (default `name`): where write_choice writes."""
  parser.add_argument('--out_dir', default=os.path.dirname(
      os.path.abspath(__file__)))
  parser.add_argument('--name', default=name,
                      help='the stem of the .md and .json written')


def main(argv=None):
  parser = argparse.ArgumentParser()
  token_kd.add_study_flags(parser)
  parser.add_argument('--runs', default='scratch,online kl',
                      help='comma-separated run names of run.py\'s study')
  parser.add_argument('--learning_rates', default='3e-4,1e-3,3e-3,1e-2,3e-2')
  parser.add_argument('--teacher_learning_rates', default='',
                      help='also train the teacher at these rates and add '
                      'its row')
  add_choice_flags(parser, 'learning_rate')
  args = parser.parse_args(argv)
  names = token_kd.parse_runs(args.runs)
  rates = [float(r) for r in args.learning_rates.split(',') if r]
  teacher_rates = [float(r) for r in args.teacher_learning_rates.split(',')
                   if r]
  table = {}
  for rate in teacher_rates:
    summary = token_kd.run(token_kd.config('teacher', args, seed=0,
                                           learning_rate=rate),
                           teacher_rate_dir(args, rate))
    split = next(iter(summary['eval']))
    table['teacher', rate] = summary['eval'][split]['bits_per_token']
  if rates and names:
    token_kd.run(token_kd.config('teacher', args), token_kd.teacher_dir(args))
    caches = token_kd.export_caches(args, names)
    for name in names:
      for rate in rates:
        summary = token_kd.run(
            token_kd.plan(args, name, 0, caches, rate),
            token_kd.run_dir(args, 0, name, rate))
        split = next(iter(summary['eval']))
        table[name, rate] = summary['eval'][split]['bits_per_token']
  else:
    names = []
  columns = sorted(set(rates if names else []) | set(teacher_rates))
  write_choice(args, argv, 'learning_rate.py', 'learning rate', 'lr', split,
               table, ['teacher'] * bool(teacher_rates) + names, columns)
  return table


def write_choice(args, argv, script: str, what: str, label: str, split: str,
                 table, names, columns, seeds: str = 'seed 0'
                 ) -> dict[str, float]:
  """<out_dir>/<name>.md and .json: validation bits of each run (`table`:
  {(run, value): bits}) at each of `columns` (values of `what`, headed
  '<label> <value>'; bits of `seeds`, words for the table's first line),
  and the value with the fewest bits per run, which the JSON's 'chosen'
  gives as {run: value}."""
  flags = shlex.join(a for a in (sys.argv[1:] if argv is None else argv)
                     if not a.startswith('--out_dir'))
  lines = [f'Validation ({split}) bits per character at each {what}, '
           f'{seeds} (`python experiments/token_kd/{script} {flags}`); '
           'the lowest per run is chosen.', '',
           '| run | ' + ' | '.join(f'{label} {r:g}' for r in columns)
           + ' | chosen |', '|---|' + '---|' * (len(columns) + 1)]
  chosen = {}
  for name in names:
    bits = [table.get((name, r)) for r in columns]
    tried = [(b, r) for b, r in zip(bits, columns) if b is not None]
    chosen[name] = min(tried)[1]
    lines.append(f'| {name} | ' + ' | '.join(
        '-' if b is None else f'{b:.4f}' for b in bits)
                 + f' | {chosen[name]:g} |')
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f'{args.name}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.out_dir, f'{args.name}.json'), 'w') as f:
    json.dump({'args': vars(args),
               'table': {name: {f'{r:g}': table[name, r] for r in columns
                                if (name, r) in table} for name in chosen},
               'chosen': chosen}, f, indent=2)
  print('\n'.join(lines))
  return chosen


if __name__ == '__main__':
  main()
