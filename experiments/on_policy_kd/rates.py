"""The on-policy study's learning rate per way of training, chosen on
validation.

  python experiments/on_policy_kd/rates.py --workdir=workdirs/on_policy_warm \
      --teacher_workdir=workdirs/token_kd_tuned/teacher \
      --init_from='workdirs/token_kd_tuned/seed{seed}/online_kl' \
      --learning_rates=0.001,0.003,0.01 --seeds=0

Runs `run.py` (every run of the study: scratch, text KL, sequence-level KD,
DistiLLM, GKD) at each of --learning_rates into `<workdir>/lr<rate>`
(finished runs are read), then tabulates each run's validation bits per
character, and the teacher's NLL and KL(student || teacher) on the run's
own completions, per rate, and chooses for each run the rate with the
lowest mean validation bits (tiny-shakespeare has no split beside train
and validation, nanoGPT's: the study reports the split it chooses on, as
the token_kd study does). Writes `rates.md` and `rates.json` to --out_dir
(default: this folder).
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
_SPEC = importlib.util.spec_from_file_location('on_policy_run',
                                               os.path.join(HERE, 'run.py'))
study_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study_run)

MEASURES = (('bits_per_token', 'bits/char'),
            ('sample_teacher_nll', 'teacher NLL on samples'),
            ('sample_reverse_kl', 'KL(s || t) on samples'))


def choose(table, criterion: str = 'bits') -> dict[str, float]:
  """{run: its rate}: the lowest validation bits; with 'samples', for the
  runs on generated text, the lowest teacher NLL on samples among the rates
  whose bits are within 5% of text KL's lowest (the lowest bits if none)."""
  def lowest(by_rate, key, rates=None):
    return min(rates or by_rate, key=lambda r: by_rate[r][key])
  chosen = {n: lowest(t, 'bits_per_token') for n, t in table.items()}
  if criterion == 'samples':
    text = table['text kl'][chosen['text kl']]['bits_per_token']
    for name, by_rate in table.items():
      if name in ('scratch', 'text kl'):
        continue
      near = [r for r, m in by_rate.items()
              if m['bits_per_token'] <= 1.05 * text]
      if near:
        chosen[name] = lowest(by_rate, 'sample_teacher_nll', near)
  return chosen


def rate_dir(workdir: str, rate: float) -> str:
  return os.path.join(workdir, f'lr{rate:g}')


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--teacher_workdir', required=True)
  parser.add_argument('--init_from', default='')
  parser.add_argument('--learning_rates', default='0.001,0.003,0.01')
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--out_dir', default=HERE)
  parser.add_argument('--criterion', default='bits',
                      choices=('bits', 'samples'),
                      help='bits: each run\'s lowest validation bits; '
                      'samples: for the runs on generated text, the lowest '
                      'teacher NLL on the run\'s own samples among the '
                      'rates whose bits are within 5%% of text KL\'s (at '
                      'its lowest bits), what on-policy training is for')
  parser.add_argument('--name', default='rates',
                      help='the stem of the .md and .json written')
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  rates = [float(r) for r in args.learning_rates.split(',')]
  table = {}
  for rate in rates:
    argv = [f'--workdir={rate_dir(args.workdir, rate)}',
            f'--teacher_workdir={args.teacher_workdir}',
            f'--seeds={args.seeds}', f'--steps={args.steps}',
            f'--learning_rate={rate:g}']
    if args.init_from:
      argv.append(f'--init_from={args.init_from}')
    if args.tiny:
      argv.append('--tiny')
    rows = study_run.main(argv)
    for name, summaries in rows.items():
      if name == 'start':  # The students every run starts from: no rate.
        continue
      evals = [next(iter(s['eval'].values())) for s in summaries]
      table.setdefault(name, {})[rate] = {
          key: statistics.mean(e[key] for e in evals) for key, _ in MEASURES}
  chosen = choose(table, args.criterion)
  lines = [f'Seeds {args.seeds}, {args.steps} steps'
           + (f', each run started from `{args.init_from}`'
              if args.init_from else ', each run from random')
           + ': validation bits per character (teacher NLL and KL(s || t) '
           'in nats per token on the run\'s own completions) per learning '
           'rate; **bold**: the rate chosen, '
           + ('on validation bits.' if args.criterion == 'bits' else
              'for the runs on generated text, the lowest teacher NLL on '
              'samples among the rates with bits within 5% of text KL\'s '
              'best (else the lowest bits); for scratch and text KL, the '
              'lowest bits.'), '',
           '| run | ' + ' | '.join(f'lr {r:g}' for r in rates) + ' |',
           '|---|' + '---|' * len(rates)]
  for name, by_rate in table.items():
    cells = []
    for r in rates:
      m = by_rate[r]
      bits = f'{m["bits_per_token"]:.4f}'
      if chosen[name] == r:
        bits = f'**{bits}**'
      cells.append(f'{bits} ({m["sample_teacher_nll"]:.3f}, '
                   f'{m["sample_reverse_kl"]:.3f})')
    lines.append(f'| {name} | ' + ' | '.join(cells) + ' |')
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, f'{args.name}.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  with open(os.path.join(args.out_dir, f'{args.name}.json'), 'w') as f:
    json.dump(dict(args=vars(args), table={
        n: {f'{r:g}': m for r, m in t.items()} for n, t in table.items()},
                   chosen={n: r for n, r in chosen.items()}), f, indent=2)
  print('\n'.join(lines))
  return table, chosen


if __name__ == '__main__':
  main()
