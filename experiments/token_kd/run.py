"""Token-level distillation of a character-level language model on
tiny-shakespeare: a student from scratch against the same student distilled
from an online teacher with each token divergence and from top-k caches of
that teacher.

  python experiments/token_kd/run.py --workdir=workdirs/token_kd

Pairs (--pair): 'small', teacher `decoder` 4 x 128 (4 heads; 834,304
params) and student 2 x 48 (2 heads; 72,000 params, 11.6x fewer); 'large',
teacher 6 x 192 (6 heads; 2,731,008 params) and student 4 x 72 (3 heads;
275,760 params, 9.9x fewer). Windows of 64 bytes, batch 32, AdamW at
nanoGPT's character-level settings (weight decay 0.1, clip 1.0, cosine, 100
warm-up steps), `configs/shakespeare_char.py` with these models. Learning
rates: the config's 1e-3 unless --teacher_learning_rate,
--student_learning_rate or --distill_learning_rate say otherwise, and per
run from --chosen_rates (a `learning_rate.py` JSON, rates chosen on
validation). Alpha 0.5 unless --chosen_alphas (an `alpha.py` JSON, alphas
chosen on validation) names the run; T = 1 and the divergences' settings
(JSD beta 0.5, skew 0.1) are the config's.

Runs (each a `kd_jax.lm_train` run; finished ones are read, not rerun):
the teacher (seed 0), then per seed the scratch student (alpha 0) and
students at alpha 0.5 distilled online with kl, reverse_kl,
generalized_jsd, skew_kl, skew_reverse_kl and total_variation, online with
kl on the windows a cache holds ('online kl aligned': the cached runs'
windows, so that it differs from 'top-k kl tail' in the teacher's form
alone; the other online runs draw windows at any offset), and from
caches of the teacher's top k (k = 1, 4, 16, 64, float16, written beside
the teacher) with the tail bucket (kl; reverse_kl at k = 16 with and
without the tail), and from caches keyed by position ('top-16 kl tail
positions', top-64, top-256: every token; windows at any offset, each
target predicted by the teacher from 33-64 tokens of context), and from a
top-16 cache of windows every 16 tokens ('top-16 kl tail stride16': four
overlapping tilings, 4x the bytes per character of text; windows at any
multiple of 16, each target from the student's own context), and from
tiling caches whose logits are uint8 steps below each position's largest
('top-16 kl tail uint8', 'top-24 kl tail uint8': 2k + 2 bytes per token,
top-24 in the bytes of a float16 top-16; `lm_cache` dtype uint8); --runs
picks some. A run at its role's rate and alpha 0.5 lives in
<workdir>/seed<s>/<name>, at any other rate in
<workdir>/learning_rate/lr<rate>/seed<s>/<name>, at any other alpha one
folder alpha<alpha> deeper (<workdir>/alpha<alpha>/seed<s>/<name>). The
measure is validation bits per character (the last 10% of the text,
nanoGPT's split) and KL(teacher || student) there; the results table
(--out) lists every run, its rate, its alpha and the share of the
teacher-scratch gap it recovers.
"""

import argparse
import json
import os
import statistics
import sys

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(
    __file__))))
sys.path.insert(0, REPO)

from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd_jax import study  # pylint: disable=g-import-not-at-top,wrong-import-position

TEACHER = dict(name='decoder', width=128, depth=4, num_heads=4, block_size=64,
               dropout=0.1)
STUDENT = dict(name='decoder', width=48, depth=2, num_heads=2, block_size=64,
               dropout=0.0)
# --pair: (teacher, student). 'large': a teacher of a few million params
# and a student about 10x smaller.
PAIRS = {'small': (TEACHER, STUDENT),
         'large': (dict(TEACHER, width=192, depth=6, num_heads=6),
                   dict(STUDENT, width=72, depth=4, num_heads=3))}
DIVERGENCES = ('kl', 'reverse_kl', 'generalized_jsd', 'skew_kl',
               'skew_reverse_kl', 'total_variation')
CACHES = ((1, 'kl', 'tail'), (4, 'kl', 'tail'), (16, 'kl', 'tail'),
          (64, 'kl', 'tail'), (16, 'reverse_kl', 'tail'),
          (16, 'reverse_kl', 'renormalize_both'))
# Caches keyed by position (`lm_cache` layout 'positions'): runs that draw
# windows at any offset.
POSITION_CACHES = ((16, 'kl', 'tail'), (64, 'kl', 'tail'), (256, 'kl', 'tail'))
# Caches of windows that overlap (every `stride` tokens): runs that draw
# windows at any multiple of it.
STRIDE_CACHES = ((16, 'kl', 'tail', 16),)
# Tiling caches of uint8 logits (`lm_cache` dtype uint8).
UINT8_CACHES = ((16, 'kl', 'tail'), (24, 'kl', 'tail'))

# The flag that sets each role's learning rate (None: the config's 1e-3).
CONFIG_RATE = 1e-3
# The distilled runs' alpha unless --chosen_alphas says otherwise.
CONFIG_ALPHA = 0.5
RATE_FLAGS = {'teacher': 'teacher_learning_rate',
              'student': 'student_learning_rate',
              'distill': 'distill_learning_rate'}


def config(role: str, args, **fields):
  """configs/shakespeare_char.py for `role` with this study's models and
  schedule, then `fields` (dotted names) on top."""
  teacher, student = PAIRS[getattr(args, 'pair', 'small')]
  model = teacher if role == 'teacher' else student
  overrides = {f'model.{k}': v for k, v in model.items()}
  rate = getattr(args, RATE_FLAGS[role], None)
  if rate is not None:
    overrides['learning_rate'] = rate
  overrides.update({
      'length': 64, 'eval_samples.prompt_length': 32,
      'eval_samples.completion_length': 32,
      'num_train_steps': (args.teacher_steps if role == 'teacher'
                          else args.steps),
      'log_every_steps': 100, 'eval_every_steps': 0,
      'checkpoint_every_steps': 500})
  if args.tiny:
    overrides.update({
        'dataset': 'pydoc_topics', 'eval_split': 'validation[:5%]',
        'num_train_steps': 4, 'batch_size': 8, 'eval_batch_size': 8,
        'warmup_steps': 1, 'log_every_steps': 2,
        'checkpoint_every_steps': 2})
  return study.make_config('shakespeare_char', f'role={role}',
                           {**overrides, **fields})


def run(c, workdir: str):
  summary, trained = study.run_or_read(c, workdir)
  if trained:
    print(f'{workdir}: {summary["train_seconds"]:.0f} s', flush=True)
  return summary


def add_rate_flags(parser: argparse.ArgumentParser) -> None:
  for role, flag in RATE_FLAGS.items():
    parser.add_argument(f'--{flag}', type=float, default=None,
                        help=f'the {role} runs\' learning rate (default: the '
                        'config\'s 1e-3)')


def add_study_flags(parser: argparse.ArgumentParser) -> None:
  """The flags run.py and learning_rate.py share."""
  parser.add_argument('--workdir', required=True)
  parser.add_argument('--teacher_workdir', default='',
                      help='the teacher\'s run (trained there if unfinished; '
                      'default <workdir>/teacher); its caches are written '
                      'beside it unless --cache_root says where')
  parser.add_argument('--cache_root', default='',
                      help='the folder the teacher\'s caches are exported '
                      'to and read from (default: the teacher\'s parent)')
  parser.add_argument('--pair', default='small', choices=sorted(PAIRS),
                      help='small: teacher 4 x 128 (834k params), student '
                      '2 x 48 (72k); large: teacher 6 x 192 (2.7M), student '
                      '4 x 72 (0.27M)')
  parser.add_argument('--steps', type=int, default=2000)
  parser.add_argument('--teacher_steps', type=int, default=3000)
  parser.add_argument('--tiny', action='store_true',
                      help='seconds-long runs on pydoc_topics (tests)')
  add_rate_flags(parser)


def teacher_dir(args) -> str:
  return args.teacher_workdir or os.path.join(args.workdir, 'teacher')


def role(name: str) -> str:
  """The role whose rate flag a run takes: 'teacher', 'student' (the
  scratch student) or 'distill'."""
  return name if name in ('teacher',) else (
      'student' if name == 'scratch' else 'distill')


def study_rate(args, name: str) -> float:
  """The rate a run trains at by the rate flags (the config's 1e-3 where a
  flag is unset)."""
  rate = getattr(args, RATE_FLAGS[role(name)])
  return CONFIG_RATE if rate is None else rate


def run_dir(args, seed: int, name: str, rate: float,
            alpha: float = CONFIG_ALPHA) -> str:
  """Where a run lives: <workdir>/seed<seed>/<name> at its role's rate (the
  rate flags) and alpha 0.5; <workdir>/learning_rate/lr<rate>/... at any
  other rate, .../alpha<alpha>/seed<seed>/<name> at any other alpha."""
  parts = [args.workdir]
  if rate != study_rate(args, name):
    parts += ['learning_rate', f'lr{rate:g}']
  if alpha != CONFIG_ALPHA:
    parts.append(f'alpha{alpha:g}')
  return os.path.join(*parts, f'seed{seed}', name.replace(' ', '_'))


def run_names() -> list[str]:
  """Every student run of the study, in the order of its table."""
  return (['scratch'] + [f'online {d}' for d in DIVERGENCES]
          + ['online kl aligned']
          + [f'top-{k} {d} {c}' for k, d, c in CACHES]
          + [f'top-{k} {d} {c} positions' for k, d, c in POSITION_CACHES]
          + [f'top-{k} {d} {c} stride{n}' for k, d, c, n in STRIDE_CACHES]
          + [f'top-{k} {d} {c} uint8' for k, d, c in UINT8_CACHES])


def parse_runs(runs: str) -> list[str]:
  """--runs as a list, each a run of the study, or a ValueError naming the
  others."""
  names = [n for n in runs.split(',') if n]
  unknown = sorted(set(names) - set(run_names()))
  if unknown:
    raise ValueError(f'--runs names {unknown}: not runs of the study; it '
                     f'has {run_names()}')
  return names


def cache_k(name: str) -> tuple[int, str] | None:
  """(k, form) of a cached run's name: 'top-16 kl tail' -> (16, ''),
  'top-16 kl tail positions' -> (16, 'positions'), 'top-16 kl tail
  stride16' -> (16, 'stride16'), 'top-24 kl tail uint8' -> (24, 'uint8');
  None for the others."""
  if not name.startswith('top-'):
    return None
  words = name.split()
  return int(words[0][4:]), ' '.join(words[3:])


def export_caches(args, names) -> dict[tuple[int, str], str]:
  """{(k, form): cache dir} for the cached runs among `names`, each
  exported beside the teacher (or in --cache_root) unless it is there."""
  caches = {}
  for k, form in sorted({cache_k(n) for n in names} - {None}):
    out = os.path.join(args.cache_root or os.path.dirname(teacher_dir(args)),
                       f'cache_top{k}' + (f'_{form}' if form else ''))
    options = {}
    if form == 'positions':
      options = {'layout': 'positions'}
    elif form == 'uint8':
      options = {'dtype': 'uint8'}
    elif form:
      options = {'stride': int(form[len('stride'):])}
    if not os.path.exists(os.path.join(out, lm_cache.MANIFEST)):
      lm_cache.export(config('distill', args, **{
          'distill.teacher_workdir': teacher_dir(args)}), out, k=k, **options)
    caches[k, form] = out
  return caches


def plan(args, name: str, seed: int, caches: dict[int, str], rate=None,
         alpha=None):
  """The config of one student run of the study (`rate`: its learning rate
  instead of its role's; `alpha`: a distilled run's instead of 0.5)."""
  fields = {'seed': seed}
  if rate is not None:
    fields['learning_rate'] = rate
  if name == 'scratch':
    if alpha is not None:
      raise ValueError(f'alpha={alpha} for the scratch run: it is alpha 0')
    return config('student', args, **fields)
  fields['distill.teacher_workdir'] = teacher_dir(args)
  if alpha is not None:
    fields['distill.alpha'] = alpha
  words = name.split()
  if words[0] == 'online':
    fields['distill.divergence'] = words[1]
    fields['aligned_windows'] = words[2:] == ['aligned']
  else:
    fields.update({'distill.cache_dir': caches[cache_k(name)],
                   'distill.divergence': words[1],
                   'distill.convention': words[2]})
  return config('distill', args, **fields)


def chosen_values(path: str, names, flag: str = 'chosen_rates'
                  ) -> dict[str, float]:
  """{run: value} from a learning_rate.py (rates) or alpha.py (alphas) JSON
  given as --<flag>, for the runs among `names` it chose a value for."""
  if not path:
    return {}
  with open(path) as f:
    chosen = json.load(f)['chosen']
  unknown = sorted(set(chosen) - set(run_names()) - {'teacher'})
  if unknown:
    raise ValueError(f'--{flag}={path} names runs the study does not '
                     f'have: {unknown}; it has {run_names()}')
  if flag == 'chosen_alphas' and 'scratch' in chosen:
    raise ValueError(f'--{flag}={path} chooses an alpha for scratch, which '
                     'is alpha 0; choose for distilled runs only')
  return {n: float(r) for n, r in chosen.items() if n in names}


def chosen_rates(path: str, names) -> dict[str, float]:
  """{run: rate} from a learning_rate.py JSON for the runs it chose a rate
  for; every other run takes its role's rate."""
  return chosen_values(path, names, 'chosen_rates')


def chosen_alphas(path: str, names) -> dict[str, float]:
  """{run: alpha} from an alpha.py JSON; every other distilled run takes
  alpha 0.5."""
  return chosen_values(path, names, 'chosen_alphas')


def run_alpha(alphas: dict[str, float], name: str) -> float:
  """A run's alpha: 0 for scratch, else its chosen one or 0.5."""
  return 0.0 if name == 'scratch' else alphas.get(name, CONFIG_ALPHA)


def main(argv=None):
  parser = argparse.ArgumentParser()
  add_study_flags(parser)
  parser.add_argument('--seeds', default='0,1,2')
  parser.add_argument('--runs', default=','.join(run_names()),
                      help='comma-separated run names (default: all; '
                      'empty: the teacher only)')
  parser.add_argument('--chosen_rates', default='',
                      help='a learning_rate.py JSON: each run it names '
                      'trains at its chosen rate')
  parser.add_argument('--chosen_alphas', default='',
                      help='an alpha.py JSON: each distilled run it names '
                      'trains at its chosen alpha (others at 0.5)')
  parser.add_argument('--out', default='',
                      help='the results table (default <workdir>/results.md)')
  args = parser.parse_args(argv)
  names = parse_runs(args.runs)
  rates = chosen_rates(args.chosen_rates, names)
  alphas = chosen_alphas(args.chosen_alphas, names)
  rows = {'teacher': [run(config('teacher', args), teacher_dir(args))]}
  caches = export_caches(args, names)
  seeds = [int(s) for s in args.seeds.split(',') if s]
  for seed in seeds if names else []:
    for name in names:
      rate = rates.get(name, study_rate(args, name))
      rows.setdefault(name, []).append(run(
          plan(args, name, seed, caches, rate, alphas.get(name)),
          run_dir(args, seed, name, rate, alphas.get(name, CONFIG_ALPHA))))
  if seeds and 'scratch' in rows:  # The table measures against scratch.
    write_results(args.out or os.path.join(args.workdir, 'results.md'), rows,
                  caches, {n: rates.get(n, study_rate(args, n))
                           for n in rows},
                  alphas)
  return rows


def cell(values, digits=4):
  """One value, or 'mean +- std' of several."""
  if len(values) == 1:
    return f'{values[0]:.{digits}f}'
  return f'{statistics.mean(values):.{digits}f} +- {statistics.stdev(values):.{digits}f}'


def better(bits, scratch) -> str:
  """'k of n': the seeds whose run has fewer bits than scratch of that seed
  (both lists in seed order)."""
  return f'{sum(b < a for b, a in zip(bits, scratch))} of {len(bits)}'


def online_share_lines(rows, split: str) -> list[str]:
  """The table of each distilled run's gain over scratch as a share of the
  online KL's, (scratch - run) / (scratch - online kl), per seed and of
  the means; none without an online KL run."""
  if 'online kl' not in rows:
    return []
  bits = {name: [s['eval'][split]['bits_per_token'] for s in summaries]
          for name, summaries in rows.items()}
  scratch, online = bits['scratch'], bits['online kl']
  lines = ['', 'Each run\'s gain over scratch as a share of the online KL\'s '
           '(scratch - run) / (scratch - online kl), per seed and of the '
           'means:', '', '| run | per seed | of the means |', '|---|---|---|']
  for name, values in bits.items():
    if name in ('teacher', 'scratch', 'online kl'):
      continue
    shares = [(a - b) / (a - o) for a, b, o in zip(scratch, values, online)]
    of_means = ((statistics.mean(scratch) - statistics.mean(values))
                / (statistics.mean(scratch) - statistics.mean(online)))
    lines.append(f'| {name} | {", ".join(f"{x:.2f}" for x in shares)} | '
                 f'{of_means:.2f} |')
  return lines


def write_results(path: str, rows, caches, rates, alphas=None) -> None:
  """The study's table at `path`: every run (rows: {name: summaries by
  seed}, trained at rates: {name: rate} and alphas: {name: alpha}, 0.5 for
  distilled runs it does not name) against scratch and the teacher."""
  alphas = alphas or {}
  split = next(iter(rows['teacher'][0]['eval']))
  teacher = rows['teacher'][0]['eval'][split]['bits_per_token']
  scratch = [s['eval'][split]['bits_per_token'] for s in rows['scratch']]
  gap = statistics.mean(scratch) - teacher
  lines = [f'Validation ({split}) bits per character; mean +- std over '
           f'{len(scratch)} seed(s). Gap recovered: (scratch - run) / '
           f'(scratch - teacher), scratch and teacher {statistics.mean(scratch):.4f} '
           f'and {teacher:.4f}.', '',
           '| run | lr | alpha | bits/char | KL(teacher \\|\\| student) nats '
           '| gap recovered | seeds better than scratch | train s |',
           '|---|---|---|---|---|---|---|---|']
  for name, summaries in rows.items():
    bits = [s['eval'][split]['bits_per_token'] for s in summaries]
    kl = [s['eval'][split].get('kl_to_teacher') for s in summaries]
    recovered = [(statistics.mean(scratch) - b) / gap for b in bits]
    seconds = [s.get('train_seconds', 0.0) for s in summaries]
    lines.append(
        f'| {name} | {rates[name]:g} | '
        f'{"-" if name == "teacher" else f"{run_alpha(alphas, name):g}"} | '
        f'{cell(bits)} | '
        f'{cell(kl) if None not in kl else "-"} | '
        f'{cell(recovered, 2) if name != "teacher" else "-"} | '
        f'{better(bits, scratch) if name not in ("teacher", "scratch") else "-"} | '
        f'{statistics.mean(seconds):.0f} |')
  lines += online_share_lines(rows, split)
  lines += ['', 'Bytes per cached token, and per character of the train '
            'text (a cache of overlapping windows holds each character '
            'length / stride times), against dense float16 logits of every '
            'character:', '',
            '| cache | bytes per token | bytes per character | dense '
            'float16 per character | less than dense | teacher mass outside '
            'the top k (mean) |', '|---|---|---|---|---|---|']
  for (k, form), out in caches.items():
    with open(os.path.join(out, lm_cache.MANIFEST)) as f:
      m = json.load(f)
    label = f'top-{k} {form}'.strip()
    per_char = m['bytes_per_token'] * (
        1 if m.get('layout') == 'positions'
        else m['length'] / m.get('stride', m['length']))
    dense = m['dense_float16_bytes_per_token']
    tail = np.load(os.path.join(out, 'rest_mass.npy'), mmap_mode='r')
    lines.append(f'| {label} | {m["bytes_per_token"]} | {per_char:g} | '
                 f'{dense} | {dense / per_char:.1f}x | '
                 f'{np.mean(tail, dtype=np.float64):.4f} |')
  with open(path, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  main()
