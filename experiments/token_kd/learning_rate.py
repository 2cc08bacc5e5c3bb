"""The token_kd study's learning rate, chosen on validation.

  python experiments/token_kd/learning_rate.py --workdir=workdirs/token_kd

Seed 0 of the study's student from scratch and distilled online with the
forward KL (alpha 0.5), each at the learning rates --learning_rates, on the
study's teacher, data and schedule (`run.py`; its seed-0 runs at the
study's rates, the config's 1e-3 unless --teacher_learning_rate,
--student_learning_rate or --distill_learning_rate say otherwise as for
run.py, are read from --workdir, not retrained). Each run's validation
bits per character: tiny-shakespeare has no split beside train and
validation (nanoGPT's), so the rate is chosen on the split the study
reports. Writes `learning_rate.md` beside this file (--out_dir).
"""

import argparse
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(REPO, 'experiments', 'token_kd'))
sys.path.insert(0, REPO)

import run as token_kd  # pylint: disable=g-import-not-at-top,wrong-import-position

CONFIG_RATE = 1e-3


def plans(args, teacher_dir: str) -> dict[str, dict]:
  """{run name: its config fields}: scratch and online KL."""
  return {'scratch': {},
          'online kl': {'distill.teacher_workdir': teacher_dir,
                        'distill.divergence': 'kl'}}


def study_rate(args, role: str) -> float:
  """The rate run.py trains `role` at with these flags: a run at it is the
  study's own seed-0 run (the teacher: its one teacher)."""
  rate = getattr(args, token_kd.RATE_FLAGS[role])
  return CONFIG_RATE if rate is None else rate


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True,
                      help="the study's workdir (run.py --workdir)")
  parser.add_argument('--learning_rates', default='3e-4,1e-3,3e-3,1e-2,3e-2')
  parser.add_argument('--teacher_learning_rates', default='',
                      help='also train the teacher at these rates (its '
                      'study run is the 1e-3 one) and add its row')
  parser.add_argument('--out_dir', default=os.path.dirname(
      os.path.abspath(__file__)))
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--teacher_steps', type=int, default=3000)
  parser.add_argument('--tiny', action='store_true')
  token_kd.add_rate_flags(parser)
  args = parser.parse_args(argv)
  teacher_dir = os.path.join(args.workdir, 'teacher')
  token_kd.run(token_kd.config('teacher', args), teacher_dir)
  rates = [float(r) for r in args.learning_rates.split(',')]
  table = {}
  for name, fields in plans(args, teacher_dir).items():
    role = 'student' if name == 'scratch' else 'distill'
    for rate in rates:
      workdir = (os.path.join(args.workdir, 'seed0', name.replace(' ', '_'))
                 if rate == study_rate(args, role) else
                 os.path.join(args.workdir, 'learning_rate', f'lr{rate:g}',
                              name.replace(' ', '_')))
      c = token_kd.config(role, args, seed=0, learning_rate=rate, **fields)
      summary = token_kd.run(c, workdir)
      split = next(iter(summary['eval']))
      table[name, rate] = summary['eval'][split]['bits_per_token']
  teacher_rates = [float(r) for r in args.teacher_learning_rates.split(',')
                   if r]
  for rate in teacher_rates:
    workdir = (teacher_dir if rate == study_rate(args, 'teacher') else os.path.join(
        args.workdir, 'learning_rate', f'lr{rate:g}', 'teacher'))
    summary = token_kd.run(token_kd.config('teacher', args, seed=0,
                                           learning_rate=rate), workdir)
    table['teacher', rate] = summary['eval'][split]['bits_per_token']
  columns = sorted(set(rates) | set(teacher_rates))
  flags = ' '.join(a for a in (sys.argv[1:] if argv is None else argv)
                   if not a.startswith('--out_dir'))
  lines = [f'Validation ({split}) bits per character at each learning rate, '
           f'seed 0 (`python experiments/token_kd/learning_rate.py {flags}`); '
           'the lowest per run is chosen.', '',
           '| run | ' + ' | '.join(f'lr {r:g}' for r in columns)
           + ' | chosen |', '|---|' + '---|' * (len(columns) + 1)]
  for name in ['teacher'] * bool(teacher_rates) + list(plans(args,
                                                           teacher_dir)):
    bits = [table.get((name, r)) for r in columns]
    tried = [(b, r) for b, r in zip(bits, columns) if b is not None]
    lines.append(f'| {name} | ' + ' | '.join(
        '-' if b is None else f'{b:.4f}' for b in bits)
                 + f' | {min(tried)[1]:g} |')
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'learning_rate.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  return table


if __name__ == '__main__':
  main()
