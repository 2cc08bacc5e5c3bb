"""The token_kd study's alphas (the divergence's weight; 1 - alpha is the
labels'), chosen on validation.

  python experiments/token_kd/alpha.py --workdir=workdirs/token_kd \
      --runs='online kl,top-16 kl tail' --alphas=0.3,0.5,0.7,0.9

Seed 0 (or each of --seeds) of each distilled run named by --runs at
every alpha of --alphas, each at its learning rate (--chosen_rates, a
`learning_rate.py` JSON, else its role's rate flag), on the study's
teacher, data and schedule (`run.py`, with the same flags). The run at
alpha 0.5 is the study's own seed-s run; the others live in
<workdir>/alpha<alpha>/seed<s> (under learning_rate/lr<rate> where the
rate is not the role's). Finished runs are read, not retrained.

Each run's validation bits per character, averaged over the seeds,
decide, as for the rates (tiny-shakespeare has no third split): alphas
whose bits differ by less than the seeds' spread need several seeds.
Writes <name>.md and <name>.json (the table and {run: chosen alpha}, what
run.py --chosen_alphas reads) to --out_dir.
"""

import argparse
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, os.path.join(REPO, 'experiments', 'token_kd'))
sys.path.insert(0, REPO)

import learning_rate  # pylint: disable=g-import-not-at-top,wrong-import-position
import run as token_kd  # pylint: disable=g-import-not-at-top,wrong-import-position


def main(argv=None):
  parser = argparse.ArgumentParser()
  token_kd.add_study_flags(parser)
  parser.add_argument('--runs', default='online kl',
                      help='comma-separated distilled run names of run.py\'s '
                      'study')
  parser.add_argument('--alphas', default='0.3,0.5,0.7,0.9')
  parser.add_argument('--seeds', default='0',
                      help='choose on the mean validation bits of these seeds')
  parser.add_argument('--chosen_rates', default='',
                      help='a learning_rate.py JSON: each run it names '
                      'trains at its chosen rate')
  learning_rate.add_choice_flags(parser, 'alpha')
  args = parser.parse_args(argv)
  names = token_kd.parse_runs(args.runs)
  if 'scratch' in names:
    raise ValueError('--runs names scratch, which is alpha 0; name '
                     'distilled runs only')
  alphas = [float(a) for a in args.alphas.split(',') if a]
  bad = [a for a in alphas if not 0.0 < a <= 1.0]
  if not names or not alphas or bad:
    raise ValueError(f'--runs={args.runs!r} --alphas={args.alphas!r}: name '
                     'at least one run and one alpha, each in (0, 1]')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  if not seeds:
    raise ValueError('--seeds is empty: name at least one seed (e.g. 0)')
  rates = token_kd.chosen_rates(args.chosen_rates, names)
  token_kd.run(token_kd.config('teacher', args), token_kd.teacher_dir(args))
  caches = token_kd.export_caches(args, names)
  table = {}
  for name in names:
    rate = rates.get(name, token_kd.study_rate(args, name))
    for alpha in alphas:
      bits = []
      for seed in seeds:
        summary = token_kd.run(
            token_kd.plan(args, name, seed, caches, rate, alpha),
            token_kd.run_dir(args, seed, name, rate, alpha))
        split = next(iter(summary['eval']))
        bits.append(summary['eval'][split]['bits_per_token'])
      table[name, alpha] = statistics.mean(bits)
  learning_rate.write_choice(
      args, argv, 'alpha.py', 'alpha', 'alpha', split, table, names,
      sorted(alphas), seeds='seed 0' if seeds == [0] else
      f'the mean of seeds {",".join(map(str, seeds))}')
  return table


if __name__ == '__main__':
  main()
