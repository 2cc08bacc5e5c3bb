"""On-policy and sequence-level distillation of the token_kd study's
student: fixed text against the student's own completions (GKD) and the
teacher's (sequence-level KD), measured on validation text and on the
student's own completions of fixed prompts.

  python experiments/on_policy_kd/run.py --workdir=workdirs/on_policy_kd \
      --teacher_workdir=workdirs/token_kd/teacher

The teacher is the token_kd study's (`experiments/token_kd/run.py` trains
it); the student, data and optimizer are that study's, every distilled run
at alpha = 1 (the divergence alone, as GKD). With `--init_from`, every
run of seed s starts from the params of a finished student of seed s (a
template with {seed}, e.g. the token_kd study's text-KL student), as GKD
and DistiLLM start from a student already trained on the text, and trains
--steps more with a fresh optimizer. Runs per seed:

- `scratch`: the student alone (alpha 0; the teacher loaded for the
  measures only);
- `text kl`: forward KL on the fixed text;
- `seqkd kl`: forward KL on the teacher's completions (fraction 1);
- `gkd lambda=L beta=B`: generalized JSD(beta) (beta 0 is the forward KL,
  1 the reverse KL) on the student's completions with probability lambda,
  L in {0.5, 1}, B in {0, 0.5, 1}.

Completions continue the first 32 bytes of each 64-byte window by 32 at
T = 1. The measures (`kd_jax.lm_train`): validation bits per character and
KL(teacher || student) on the text; on the student's completions of the
prompts of 2 x 64 validation windows (fixed keys), the teacher's NLL and
KL(student || teacher) per token; and the share of training time spent in
steps that generated (from the step time of `text kl` and of each run).
"""

import argparse
import importlib.util
import json
import os
import statistics
import sys

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, REPO)

from kd_jax import lm_generations  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd_jax import study  # pylint: disable=g-import-not-at-top,wrong-import-position


_SPEC = importlib.util.spec_from_file_location(
    'token_kd_run', os.path.join(REPO, 'experiments', 'token_kd', 'run.py'))
token_kd = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(token_kd)

SAMPLES = {'eval_samples.num_batches': 2, 'eval_samples.prompt_length': 32,
           'eval_samples.completion_length': 32}
GENERATION = {'distill.generation.prompt_length': 32,
              'distill.generation.temperature': 1.0}


def plans(args, teacher_dir: str, seed: int, generations_dir: str):
  distill = {'distill.teacher_workdir': teacher_dir, 'distill.alpha': 1.0,
             **SAMPLES}
  if args.init_from:
    distill['init_from'] = args.init_from.format(seed=seed)
  # The student alone: alpha 0 (the teacher only evaluates).
  out = {'scratch': token_kd.config('distill', args, seed=seed, **{
      **distill, 'distill.alpha': 0.0})}
  out['text kl'] = token_kd.config('distill', args, seed=seed, **distill)
  out['seqkd kl'] = token_kd.config(
      'distill', args, seed=seed, **distill, **GENERATION, **{
          'distill.generation.source': 'teacher',
          'distill.generation.fraction': 1.0})
  out['seqkd once kl'] = token_kd.config(
      'distill', args, seed=seed, **distill, **GENERATION, **{
          'distill.generation.source': 'teacher',
          'distill.generation.schedule': 'once',
          'distill.generation.cache_dir': generations_dir,
          'distill.generation.fraction': 1.0})
  for initial in (0.0, 0.5):
    out[f'distillm skew_kl phi0={initial}'] = token_kd.config(
        'distill', args, seed=seed, **distill, **GENERATION, **{
            'distill.divergence': 'skew_kl',
            'distill.generation.source': 'student',
            'distill.generation.schedule': 'adaptive',
            'distill.generation.adaptive.initial': initial,
            'eval_every_steps': args.epoch_steps})
  for fraction in (0.5, 1.0):
    for beta in (0.0, 0.5, 1.0):
      out[f'gkd lambda={fraction} beta={beta}'] = token_kd.config(
          'distill', args, seed=seed, **distill, **GENERATION, **{
              'distill.divergence': 'generalized_jsd',
              'distill.beta': beta,
              'distill.generation.source': 'student',
              'distill.generation.fraction': fraction})
  if args.tiny:
    for c in out.values():
      c.eval_samples.update(num_batches=1, prompt_length=8,
                            completion_length=8)
      c.distill.generation.prompt_length = 8
      c.eval_every_steps = min(c.eval_every_steps, 2)
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--teacher_workdir', required=True)
  parser.add_argument('--seeds', default='0')
  parser.add_argument('--steps', type=int, default=1000)
  parser.add_argument('--epoch_steps', type=int, default=490,
                      help='steps between the adaptive schedule\'s '
                      'validation losses (DistiLLM: one epoch; 490 steps '
                      'of 32 x 64 bytes)')
  parser.add_argument('--learning_rate', type=float, default=None,
                      help='every run\'s learning rate (default: the '
                      'config\'s 1e-3)')
  parser.add_argument('--init_from', default='',
                      help='a finished student run every run of seed s '
                      'starts from, {seed} standing for s (e.g. '
                      'workdirs/token_kd_tuned/seed{seed}/online_kl): GKD '
                      'and DistiLLM start from a student already trained on '
                      'the text; default: from random')
  parser.add_argument('--chosen_rates', default='',
                      help='rates.json of rates.py run over --workdir: each '
                      'run at the rate chosen for it, in the workdir '
                      '<workdir>/lr<rate> where rates.py trained it (its '
                      'runs there are read, not retrained)')
  parser.add_argument('--out_dir', default=None,
                      help='where results.md goes (default: --workdir)')
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  args.teacher_steps = 0
  args.distill_learning_rate = args.learning_rate
  chosen, criterion = {}, ''
  if args.chosen_rates:
    with open(args.chosen_rates) as f:
      record = json.load(f)
    chosen = record['chosen']
    criterion = record.get('args', {}).get('criterion', 'bits')

  def root(name: str) -> str:
    return (os.path.join(args.workdir, f'lr{chosen[name]:g}') if chosen
            else args.workdir)

  def configs(seed: int):
    generations_dir = os.path.join(root('seqkd once kl'), 'seqkd_generations')
    out = plans(args, args.teacher_workdir, seed, generations_dir)
    if chosen:
      missing = sorted(set(out) - set(chosen))
      if missing:
        raise ValueError(f'--chosen_rates={args.chosen_rates!r} has no rate '
                         f'for {missing}: run rates.py again over every run '
                         'of the study.')
      for name, c in out.items():
        c.learning_rate = chosen[name]
    return out, generations_dir

  rows = {}
  first, generations_dir = configs(0)
  if not os.path.exists(os.path.join(generations_dir,
                                     lm_generations.MANIFEST)):
    lm_generations.export(first['seqkd once kl'], generations_dir)
  for seed in [int(s) for s in args.seeds.split(',')]:
    for name, c in configs(seed)[0].items():
      workdir = os.path.join(root(name), f'seed{seed}',
                             name.replace(' ', '_').replace('=', ''))
      rows.setdefault(name, []).append(token_kd.run(c, workdir))
  if args.init_from:  # The students every run started from, as measured.
    rows = {'start': [study.read_summary(args.init_from.format(seed=int(s)))
                      for s in args.seeds.split(',')], **rows}
  os.makedirs(args.out_dir or args.workdir, exist_ok=True)
  write_results(args.out_dir or args.workdir, rows, chosen, criterion)
  return rows


def write_results(root: str, rows, chosen=None, criterion='bits') -> None:
  split = next(iter(rows['scratch'][0]['eval']))
  base = statistics.mean(s['train_seconds'] for s in rows['text kl'])
  lines = ([f'Each run at its learning rate chosen by rates.py '
            f'(--criterion={criterion}): '
            f'{", ".join(f"{n} {r:g}" for n, r in chosen.items())}.',
            ''] if chosen else [])
  lines += [f'{split} bits per character and KL(teacher || student) on the '
           'text; on the student\'s completions of fixed prompts, the '
           'teacher\'s NLL and KL(student || teacher) per token (nats); '
           f'mean +- std over {len(rows["scratch"])} seed(s). Time: train '
           'seconds, and the share beyond fixed-text KL\'s (generation).', '',
           '| run | bits/char | KL(t \\|\\| s) text | teacher NLL on '
           'samples | KL(s \\|\\| t) on samples | train s | over text kl |',
           '|---|---|---|---|---|---|---|']
  for name, summaries in rows.items():
    r = [s['eval'][split] for s in summaries]
    seconds = statistics.mean(s['train_seconds'] for s in summaries)
    def col(key):
      values = [x.get(key) for x in r]
      return '-' if None in values else token_kd.cell(values)
    lines.append(
        f'| {name} | {col("bits_per_token")} | {col("kl_to_teacher")} | '
        f'{col("sample_teacher_nll")} | {col("sample_reverse_kl")} | '
        f'{seconds:.0f} | {(seconds - base) / seconds:+.0%} |')
  lines += paired(rows, split)
  samples = rows['gkd lambda=1.0 beta=0.5'][0].get('samples') or []
  if samples:
    lines += ['', 'Three completions by the `gkd lambda=1.0 beta=0.5` '
              'student (seed 0), prompt included:', '']
    lines += ['    ' + t.replace('\n', '\n    ') + '\n' for t in samples]
  with open(os.path.join(root, 'results.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


def paired(rows, split) -> list[str]:
  """Each run against fixed-text KL, seed by seed (the issue's target),
  the settings of each family chosen on validation bits, and the adaptive
  schedule's last probability."""
  text = [s['eval'][split] for s in rows['text kl']]
  lines = ['', 'Against `text kl`, paired by seed: the seeds where the '
           'teacher\'s NLL and KL(s || t) on the run\'s own samples are '
           'lower than text kl\'s, and where its bits/char are within 5% of '
           'text kl\'s.', '',
           '| run | NLL on samples lower | KL(s \\|\\| t) lower | '
           'bits/char within 5% |', '|---|---|---|---|']
  for name, summaries in rows.items():
    if name in ('start', 'scratch', 'text kl'):
      continue
    r = [s['eval'][split] for s in summaries]
    n = len(r)
    count = lambda ok: f'{sum(ok)}/{n}'  # pylint: disable=unnecessary-lambda-assignment
    lines.append(
        f'| {name} | '
        f'{count(x["sample_teacher_nll"] < t["sample_teacher_nll"] for x, t in zip(r, text))} | '
        f'{count(x["sample_reverse_kl"] < t["sample_reverse_kl"] for x, t in zip(r, text))} | '
        f'{count(x["bits_per_token"] <= 1.05 * t["bits_per_token"] for x, t in zip(r, text))} |')
  lines += ['', 'Chosen on validation bits/char (mean over seeds):']
  for family in ('gkd', 'distillm'):
    names = [n for n in rows if n.startswith(family)]
    best = min(names, key=lambda n: statistics.mean(
        s['eval'][split]['bits_per_token'] for s in rows[n]))
    lines.append(f'- {family}: `{best}`')
  for name in (n for n in rows if n.startswith('distillm')):
    phi = [s['train_history'][-1].get('threshold') for s in rows[name]]
    lines.append(f'- `{name}`: the probability at the last step, per seed: '
                 f'{", ".join(f"{p:.1f}" for p in phi)}')
  return lines


if __name__ == '__main__':
  main()
