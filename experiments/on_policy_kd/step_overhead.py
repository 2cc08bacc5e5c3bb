"""The on-policy step's time against the fixed-text step's, side by side.

  python experiments/on_policy_kd/step_overhead.py            # 5 rounds
  python experiments/on_policy_kd/step_overhead.py --tiny     # seconds

On this study's pair (experiments/token_kd's teacher and student shapes,
random weights; batch 32 x 64 bytes; completions of 32 bytes after each
window's first 32 at T = 1): `lm_train.lm_step`, jitted as training jits
it, for fixed text (forward KL), for the student's completions at every
step (GKD, lambda 1, JSD 0.5) and for the teacher's (sequence-level KD per
step). Each round runs every program --calls times in turn (the first
program alternating by round) and keeps the median call; prints ms per
step, median [min-max] over rounds, and each program's time over fixed
text's, per round.
"""

import argparse
import importlib.util
import os
import statistics
import sys
import time
import types

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(os.path.dirname(HERE)))

import functools  # pylint: disable=g-import-not-at-top,wrong-import-position,wrong-import-order

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from kd_jax import lm_train  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position
from kd_jax import train  # pylint: disable=g-import-not-at-top,wrong-import-position

# The study's script: its token_kd configs and its generation settings.
_SPEC = importlib.util.spec_from_file_location(
    'on_policy_kd_run', os.path.join(HERE, 'run.py'))
study_run = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(study_run)
token_kd = study_run.token_kd

GENERATION = {**study_run.GENERATION, 'distill.alpha': 1.0,
              'distill.generation.fraction': 1.0}
PROGRAMS = {
    'fixed text (kl)': {'distill.alpha': 1.0},
    'student completions (gkd)': {
        **GENERATION, 'distill.divergence': 'generalized_jsd',
        'distill.generation.source': 'student'},
    'teacher completions (seqkd)': {
        **GENERATION, 'distill.generation.source': 'teacher'},
}


def programs(tiny: bool):
  """{name: a no-argument call that runs one step and blocks}."""
  args = types.SimpleNamespace(steps=1000, teacher_steps=0, tiny=tiny)
  out = {}
  for name, fields in PROGRAMS.items():
    if tiny:
      fields = {**fields, 'distill.generation.prompt_length': 8}
    config = token_kd.config('distill', args, **fields)
    teacher_spec = token_kd.config('teacher', args).model
    model = models.get_model(config.model, config.vocab_size)
    teacher = models.get_model(teacher_spec, config.vocab_size)
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, config.vocab_size,
                          (config.batch_size, config.length + 1), np.int32)
    batch = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
                 mask=np.ones((config.batch_size, config.length), bool))
    teacher_params = jax.jit(teacher.init)(
        jax.random.key(1), tokens[:1, :-1])['params']
    tx, _ = train.make_optimizer(config, config.num_train_steps)
    init, _ = lm_train._abstract_state(model, tx, config)  # pylint: disable=protected-access
    step = jax.jit(functools.partial(
        lm_train.lm_step, model=model, teacher_model=teacher, tx=tx,
        distill=config.distill, num_train_steps=config.num_train_steps),
                   donate_argnums=0)
    holder = [jax.jit(init)(jax.random.key(0))]

    def run(step=step, holder=holder, batch=batch, teacher=teacher_params):
      holder[0], measurements = step(holder[0], batch, teacher)
      return jax.block_until_ready(measurements)
    run()  # Compiles.
    out[name] = run
  return out


def main(argv=None):
  parser = argparse.ArgumentParser()
  parser.add_argument('--rounds', type=int, default=5)
  parser.add_argument('--calls', type=int, default=20)
  parser.add_argument('--tiny', action='store_true')
  args = parser.parse_args(argv)
  if args.tiny:
    args.rounds, args.calls = 2, 2
  runs = programs(args.tiny)
  names = list(runs)
  times = {n: [] for n in names}
  for r in range(args.rounds):
    order = names if r % 2 == 0 else names[::-1]
    for name in order:
      calls = []
      for _ in range(args.calls):
        t0 = time.perf_counter()
        runs[name]()
        calls.append(time.perf_counter() - t0)
      times[name].append(statistics.median(calls))
  base = times[names[0]]
  lines = [f'load average {os.getloadavg()[0]:.1f}; {args.rounds} rounds of '
           f'{args.calls} calls, the median call per round.', '',
           '| step | ms per step | over fixed text |', '|---|---|---|']
  for name in names:
    t = times[name]
    ratios = [a / b for a, b in zip(t, base)]
    lines.append(
        f'| {name} | {1e3 * statistics.median(t):.1f} [{1e3 * min(t):.1f}-'
        f'{1e3 * max(t):.1f}] | {statistics.median(ratios):.2f} '
        f'[{min(ratios):.2f}-{max(ratios):.2f}] |')
  print('\n'.join(lines))
  return times


if __name__ == '__main__':
  main()
