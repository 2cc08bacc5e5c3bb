"""The text an LM step trains on when the run generates it.

`config.distill.generation` (`kd_jax.lm_train`) replaces a step's windows by
completions of their first `prompt_length` tokens, sampled with the
key-value cache (`kd_jax.generation`) from keys folded from the step's, so
that a resumed run trains on what the uninterrupted one did:

- `schedule='fixed'`: with probability `fraction`, completions by the
  student (`source='student'`: on-policy, GKD; Agarwal et al. 2024) or the
  teacher (`source='teacher'`: sequence-level KD, generated per batch; Kim
  and Rush 2016).
- `schedule='once'` (`source='teacher'`): sequence-level KD on the
  teacher's completions generated once before training
  (`kd_jax.lm_generations`, `cache_dir`), with probability `fraction`.
- `schedule='adaptive'` (DistiLLM's adaptive off-policy approach, Ko et al.
  2024; `source='student'`): a probability phi, `adaptive.initial` at first,
  raised by `adaptive.increment` (at most to 1) whenever the validation loss
  measured every `config.eval_every_steps` is at least `adaptive.tolerance`
  above the one that last raised it (the first measured before step 1). A
  step draws u ~ U(0, 1): it generates when u < phi * rho (rho: the
  `adaptive.replay` ratio, 1 - t / T 'decreasing', 0.5 'constant' or t / T
  'increasing', at step t of T), or when u < phi and the replay buffer is
  not yet full, and stores its generations in the buffer (a ring of
  `adaptive.capacity` windows); otherwise, when u < phi, it trains on
  `batch_size` windows drawn from the buffer without replacement; otherwise
  on the text. The buffer, phi and the loss that last raised it are in the
  train state and its checkpoints.

The teacher scores every position of whatever the batch holds.

References:
  Agarwal et al., `On-Policy Distillation of Language Models: Learning from
  Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_, ICLR 2024;
  Ko et al., `DistiLLM: Towards Streamlined Distillation for Large Language
  Models <https://arxiv.org/abs/2402.03898>`_, ICML 2024 (code:
  github.com/jongwooko/distillm, `finetune.py`, `distillm/buffer.py`);
  Kim and Rush, `Sequence-Level Knowledge Distillation
  <https://arxiv.org/abs/1606.07947>`_, EMNLP 2016.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp

SOURCES = ('none', 'student', 'teacher')
SCHEDULES = ('fixed', 'adaptive', 'once')
REPLAY_RATIOS = ('decreasing', 'constant', 'increasing')
_TEXT_KEYS = ('inputs', 'targets', 'mask')
# The batch keys of completions stored by `kd_jax.lm_generations`.
_STORED = 'generated_'


def is_adaptive(generation_config) -> bool:
  return (generation_config is not None
          and generation_config.source != 'none'
          and generation_config.get('schedule', 'fixed') == 'adaptive')


def validate(g, config) -> None:
  """Refuses a generation config that cannot train, naming the field."""
  field = 'config.distill.generation'
  if g.source not in SOURCES[1:]:
    raise ValueError(f'{field}.source={g.source!r}; choose none, student '
                     '(on-policy, GKD) or teacher (sequence-level KD).')
  schedule = g.get('schedule', 'fixed')
  if schedule not in SCHEDULES:
    raise ValueError(f'{field}.schedule={schedule!r}; choose one of '
                     f'{SCHEDULES}.')
  if schedule != 'adaptive' and not 0.0 < g.fraction <= 1.0:
    raise ValueError(f'{field}.fraction={g.fraction} must be in (0, 1]: the '
                     'probability that a step trains on generated text.')
  if not 1 <= g.prompt_length < config.length:
    raise ValueError(f'{field}.prompt_length={g.prompt_length} must be in '
                     f'[1, config.length={config.length}): the rest of each '
                     'window is generated.')
  if not g.temperature >= 0:
    raise ValueError(f'{field}.temperature={g.temperature} must be >= 0 '
                     '(0: greedy).')
  if config.distill.get('cache_dir'):
    raise ValueError(f'{field}.source={g.source!r} needs the online teacher '
                     'to score generated text; a cache holds the fixed '
                     'text\'s only: unset config.distill.cache_dir.')
  if not config.distill.teacher_workdir:
    raise ValueError(f'{field}.source={g.source!r} needs a teacher: set '
                     'config.distill.teacher_workdir.')
  if schedule == 'adaptive':
    _validate_adaptive(g, config)
  if (schedule == 'once') != bool(g.get('cache_dir')):
    raise ValueError(f"{field}.schedule='once' trains on the teacher's "
                     f'completions generated once into {field}.cache_dir '
                     '(python -m kd_jax.lm_generations); set both, or '
                     'neither.')
  if schedule == 'once' and g.source != 'teacher':
    raise ValueError(f"{field}.schedule='once' is sequence-level KD on the "
                     f"teacher's text: set {field}.source='teacher'.")


def _validate_adaptive(g, config) -> None:
  field = 'config.distill.generation'
  a = g.adaptive
  if g.source != 'student':
    raise ValueError(f"{field}.schedule='adaptive' mixes in the student's "
                     f'own generations (DistiLLM); set {field}.source='
                     f"'student', or schedule='fixed' for the teacher's.")
  if config.eval_every_steps < 1:
    raise ValueError(f"{field}.schedule='adaptive' raises its probability "
                     'on the validation loss measured every '
                     f'config.eval_every_steps={config.eval_every_steps}; '
                     'set it >= 1.')
  if a.replay not in REPLAY_RATIOS:
    raise ValueError(f'{field}.adaptive.replay={a.replay!r}; choose one of '
                     f'{REPLAY_RATIOS}.')
  if not 0.0 <= a.initial <= 1.0 or not a.increment > 0:
    raise ValueError(f'{field}.adaptive: initial={a.initial} must be in '
                     f'[0, 1] and increment={a.increment} > 0.')
  if a.capacity < config.batch_size:
    raise ValueError(f'{field}.adaptive.capacity={a.capacity} must hold at '
                     f'least one batch (config.batch_size='
                     f'{config.batch_size}).')


def init_state(config) -> dict[str, Any]:
  """The train-state entries of the adaptive schedule ({} otherwise): the
  replay buffer and the schedule (phi; the loss that last raised it,
  +inf until first measured)."""
  g = config.distill.get('generation')
  if not is_adaptive(g):
    return {}
  shape = (g.adaptive.capacity, config.length)
  replay = dict(inputs=jnp.zeros(shape, jnp.int32),
                targets=jnp.zeros(shape, jnp.int32),
                mask=jnp.zeros(shape, bool),
                count=jnp.zeros((), jnp.int32),
                next=jnp.zeros((), jnp.int32))
  schedule = dict(threshold=jnp.asarray(g.adaptive.initial, jnp.float32),
                  previous_loss=jnp.asarray(jnp.inf, jnp.float32))
  return dict(replay=replay, schedule=schedule)


def generated_text(text, key, g, sampler, variables) -> dict[str, jax.Array]:
  """The sampler's completions of each window's first `g.prompt_length`
  tokens, laid out like the window (`generation.completion_batch`, the
  last position masked)."""
  from kd_jax import generation  # pylint: disable=g-import-not-at-top
  length = text['inputs'].shape[1]
  out = generation.completion_batch(generation.generate(
      sampler, variables, text['inputs'], text['mask'], key,
      prompt_length=g.prompt_length, completion_length=length - g.prompt_length,
      temperature=g.temperature, top_k=g.top_k or None))
  pad = lambda x, v: jnp.pad(x, ((0, 0), (0, 1)), constant_values=v)  # pylint: disable=unnecessary-lambda-assignment
  return dict(text, inputs=pad(out['inputs'], 0),
              targets=pad(out['targets'], 0), mask=pad(out['mask'], False))


def _sampler(g, model, params, teacher_model, teacher_params):
  if g.source == 'student':
    return model, {'params': jax.lax.stop_gradient(params)}
  return teacher_model, {'params': teacher_params}


def train_text(batch, rng, state, g, model, teacher_model, teacher_params,
               num_train_steps: int):
  """(the batch to train on, the state's updated schedule entries, the
  step's measurements) under `g.schedule`."""
  sampler, variables = _sampler(g, model, state['params'], teacher_model,
                                teacher_params)
  text = {k: batch[k] for k in _TEXT_KEYS}
  generate = lambda t: generated_text(t, jax.random.fold_in(rng, 2), g,  # pylint: disable=unnecessary-lambda-assignment
                                      sampler, variables)
  if g.get('schedule', 'fixed') == 'once':  # Stored: `lm_generations`.
    stored = {k: batch[_STORED + k] for k in _TEXT_KEYS}
    generate = lambda _: stored  # pylint: disable=unnecessary-lambda-assignment
    batch = {k: v for k, v in batch.items() if not k.startswith(_STORED)}
  if not is_adaptive(g):
    use = jax.random.bernoulli(jax.random.fold_in(rng, 1), g.fraction)
    chosen = jax.lax.cond(use, generate, lambda t: t, text)
    return dict(batch, **chosen), {}, {'generated': use.astype(jnp.float32)}
  replay, schedule = state['replay'], state['schedule']
  capacity = replay['inputs'].shape[0]
  phi = schedule['threshold']
  u = jax.random.uniform(jax.random.fold_in(rng, 1))
  t = state['step'].astype(jnp.float32) / num_train_steps
  rho = {'decreasing': 1.0 - t, 'constant': 0.5,
         'increasing': t}[g.adaptive.replay]
  full = replay['count'] >= capacity
  new = (u < phi * rho) | ((u < phi) & ~full)
  old = ~new & (u < phi)

  def replayed(_):
    rows = jax.random.choice(jax.random.fold_in(rng, 3), capacity,
                             (text['inputs'].shape[0],), replace=False)
    return {k: replay[k][rows] for k in _TEXT_KEYS}

  chosen = jax.lax.switch(new.astype(jnp.int32) + 2 * old.astype(jnp.int32),
                          [lambda t: t, generate, replayed], text)
  replay = jax.lax.cond(new, _store, lambda r, _: r, replay, chosen)
  measurements = {'generated': new.astype(jnp.float32),
                  'replayed': old.astype(jnp.float32), 'threshold': phi}
  return dict(batch, **chosen), {'replay': replay}, measurements


def _store(replay, text):
  """The ring buffer with `text`'s rows written at its next positions."""
  capacity, rows = replay['inputs'].shape[0], text['inputs'].shape[0]
  at = (replay['next'] + jnp.arange(rows)) % capacity
  stored = {k: replay[k].at[at].set(text[k]) for k in _TEXT_KEYS}
  return dict(stored, count=jnp.minimum(replay['count'] + rows, capacity),
              next=(replay['next'] + rows) % capacity)


def after_evaluation(state, loss: float, g) -> dict[str, Any]:
  """The state with the adaptive schedule updated by one validation loss
  (nats per token): phi raised when `loss` is `tolerance` above the loss
  that last raised it; the first loss is only recorded."""
  schedule = jax.device_get(state['schedule'])
  phi, previous = float(schedule['threshold']), float(schedule['previous_loss'])
  if not math.isfinite(previous):
    previous = loss
  elif loss >= previous + g.adaptive.tolerance:
    phi, previous = min(phi + g.adaptive.increment, 1.0), loss
  else:
    return state
  schedule = _schedule_setter(state['step'].sharding)(phi, previous)
  return dict(state, schedule=schedule)


@functools.lru_cache(maxsize=None)
def _schedule_setter(sharding):
  """A jitted (phi, loss) -> schedule dict placed on `sharding` (replicated
  like the step counter), compiled once per sharding."""
  return jax.jit(
      lambda p, l: dict(threshold=jnp.float32(p), previous_loss=jnp.float32(l)),
      out_shardings=sharding)


def needs_first_loss(state) -> bool:
  return 'schedule' in state and not math.isfinite(
      float(jax.device_get(state['schedule']['previous_loss'])))
