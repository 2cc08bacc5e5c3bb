"""Language-model runs: a decoder trained on text, alone or distilled token
by token from a frozen teacher decoder.

A run is a config with `task='lm'` (`configs/shakespeare_char.py`), trained
by `train_and_evaluate(config, workdir)` (what `kd_jax.main` calls for it):

- Data: windows of `length` byte tokens of a text dataset
  (`kd_jax.data.text`): train batches are a pure function of (seed, step),
  so a resumed run reads the batches an uninterrupted one reads; eval covers
  `eval_split` once, every target token exactly once.
- Objective per token t with a valid target (`mask`):
  `(1 - alpha) * CE(z_t, y_t) + alpha * D(p_t || q_t)`, where D is
  `losses.token_divergence` with `distill.divergence` at
  `distill.temperature` (times T^2) against the teacher's logits from the
  same forward batch; both terms are token means over the global batch (a
  (sum, count) pair: padding, device and process counts never change them).
  Without a teacher (`distill.teacher_workdir=''`) the loss is the CE alone.
- The teacher is a finished LM run (its run_info names its decoder; its
  vocabulary must be the student's), restored once, checked against its
  checksum and run frozen inside the one jitted step, on the batch's rows;
  or its per-token top-k cache (`distill.cache_dir`, `kd_jax.lm_cache`),
  checked against the run and read for the windows it tiles the split
  with, in `losses.sparse_token_divergence`'s `distill.convention` (of a
  cache exported by as many processes as the run's, each process reads
  only its own shard).
- Evaluation: the token cross-entropy in nats and in bits per token (bits
  per character for byte-level ASCII text), the next-token accuracy, and,
  with a teacher, the teacher's own and the student's KL to it at T = 1;
  then (`eval_samples`) the student completes fixed prompts with fixed
  keys, and the teacher's NLL and KL(student || teacher) per token of
  those completions measure what on-policy training is for.
- Checkpoints every `checkpoint_every_steps` (orbax, as image runs), a lock
  on the workdir, the config checked against the one the workdir holds.
- Divergence is judged as for image runs (`kd_jax.divergence`), from the
  step's losses and the parameters' norm (taken from the state on log and
  checkpoint steps, outside the step): an exploding loss or norm keeps the
  last healthy checkpoint out of the rotation; a non-finite one stops the
  run before it is saved, moves the checkpoints saved since the healthy one
  to checkpoints_diverged/ and raises `divergence.Diverged`, naming it and
  the settings a rerun changes.

Data parallel over all devices, on the image trainer's ('data', 'model')
mesh (`train.make_mesh`; 'model' has `config.mesh_model` devices, default
1): the student's parameters replicated, the batch's rows split over both
axes; the online teacher's parameters replicated too, or, with
`distill.shard_teacher`, split over 'model' (over every device when it has
one) and restored straight into that layout (`teachers.teacher_shardings`).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import ml_collections
import numpy as np
import optax

from kd_jax import checkpointing
from kd_jax import divergence
from kd_jax import losses
from kd_jax import models
from kd_jax import on_policy
from kd_jax import rundir
from kd_jax import teachers
from kd_jax.data import prefetch
from kd_jax.data import text

__all__ = ['evaluate', 'lm_step', 'train_and_evaluate', 'validate_config']

LN2 = math.log(2.0)
# The online teacher's computation dtype (`distill.teacher_dtype`); its
# params stay float32 and its logits come back float32.
TEACHER_DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict,
                    num_devices: int | None = None) -> None:
  """Refuses an LM config that cannot train, naming the field and the fix."""
  decoders = sorted(name for name, fn in models.MODELS.items()
                    if fn.__module__ == models.decoder.__name__)
  if config.model.name not in decoders:
    raise ValueError(f'config.model.name={config.model.name!r} is not a '
                     'language model: task=\'lm\' trains a decoder, one of '
                     f'{decoders}.')
  spec = models.get_model(config.model, config.vocab_size)
  if not 1 <= config.length <= spec.block_size:
    raise ValueError(f'config.length={config.length} must be in [1, the '
                     f'model\'s block_size {spec.block_size}].')
  n = num_devices or jax.device_count()
  for field in ('batch_size', 'eval_batch_size'):
    if config[field] < 1 or config[field] % n:
      raise ValueError(f'config.{field}={config[field]} must be a positive '
                       f'multiple of the {n} devices.')
  if config.num_train_steps < 1:
    raise ValueError(f'config.num_train_steps={config.num_train_steps} must '
                     'be >= 1.')
  if not isinstance(config.aligned_windows, bool):
    raise ValueError(f'config.aligned_windows={config.aligned_windows!r} '
                     'must be True or False.')
  d = config.distill
  if not 0.0 <= d.alpha <= 1.0:
    raise ValueError(f'config.distill.alpha={d.alpha} must be in [0, 1] (the '
                     'weight of the divergence to the teacher).')
  if d.alpha > 0 and not (d.teacher_workdir or d.get('cache_dir')):
    raise ValueError(f'config.distill.alpha={d.alpha} needs a teacher: set '
                     'config.distill.teacher_workdir to a finished LM run (or '
                     'config.distill.cache_dir to its per-token cache), or '
                     'alpha=0 to train from the labels alone.')
  if d.get('convention', 'tail') not in losses.SPARSE_CONVENTIONS:
    raise ValueError(f'config.distill.convention={d.convention!r}; choose '
                     f'one of {losses.SPARSE_CONVENTIONS}.')
  if d.divergence not in losses.TOKEN_DIVERGENCES:
    raise ValueError(f'config.distill.divergence={d.divergence!r}; choose '
                     f'one of {losses.TOKEN_DIVERGENCES}.')
  if not d.temperature > 0:
    raise ValueError(f'config.distill.temperature={d.temperature} must be '
                     '> 0.')
  if d.get('shard_teacher', False) and not (d.teacher_workdir
                                             or d.get('cache_dir')):
    raise ValueError('config.distill.shard_teacher splits the teacher\'s '
                     'params over devices; this run has no teacher: set '
                     'shard_teacher=False.')
  if d.get('teacher_dtype', 'float32') not in TEACHER_DTYPES:
    raise ValueError(f'config.distill.teacher_dtype={d.teacher_dtype!r}; '
                     f'choose one of {tuple(TEACHER_DTYPES)}.')
  g = d.get('generation')
  if g is not None and g.source != 'none':
    on_policy.validate(g, config)
  e = config.get('eval_samples')
  if e is not None and e.num_batches > 0 and (
      e.prompt_length < 1 or e.prompt_length > config.length
      or e.completion_length < 1
      or e.prompt_length + e.completion_length > spec.block_size):
    raise ValueError(
        f'config.eval_samples: prompt_length={e.prompt_length} must be in '
        f'[1, config.length={config.length}] and prompt_length + '
        f'completion_length={e.completion_length} at most the block_size '
        f'{spec.block_size}.')


# ---------------------------------------------------------------------------
# The step and evaluation: pure, jitted by the loop.
# ---------------------------------------------------------------------------


def _token_mean(values, mask):
  total, count = losses.token_sum_and_count(values, mask)
  return losses.token_mean(total, count)


def _next_token_ce(logits, targets):
  return optax.softmax_cross_entropy_with_integer_labels(
      logits.astype(jnp.float32), targets)


def _predicted_token(logits):
  """`jnp.argmax(logits, -1)` (the first maximal index) for finite logits."""
  # XLA:CPU runs argmax as a scalar (value, index) reduce: 2.3 ms at
  # [32, 64, 256], 17% on top of a 2x48 student's step; max, then the least
  # index equal to it, vectorises (0.26 ms).
  top = jnp.max(logits, axis=-1, keepdims=True)
  vocab = logits.shape[-1]
  return jnp.min(jnp.where(logits == top, jnp.arange(vocab), vocab), axis=-1)


def lm_step(state: dict[str, Any], batch: dict[str, jax.Array],
            teacher_params, *, model, teacher_model, tx, distill,
            num_train_steps: int = 1
            ) -> tuple[dict[str, Any], dict[str, jax.Array]]:
  """One update of the student on one global batch of windows.

  `state`: {'step', 'params', 'batch_stats' ({}), 'opt_state', 'rng'}.
  The teacher is `teacher_model` run on the batch, or, when the batch
  holds a cache's sparse targets (`topk_logits`, `topk_indices`,
  `rest_mass`: `kd_jax.lm_cache.lookup`), those, in
  `losses.sparse_token_divergence`'s `distill.convention`; with neither the
  student trains on the targets alone (`distill.alpha` 0).

  With `distill.generation.source` 'student' (on-policy, GKD) or 'teacher'
  (sequence-level KD), the step trains on that model's completions of the
  first `prompt_length` tokens of each window instead of the window's own
  text, with probability `distill.generation.fraction` or as DistiLLM's
  adaptive schedule decides (`kd_jax.on_policy`; `num_train_steps` is its
  T), drawn from keys folded from the step's: a resumed run generates what
  the uninterrupted one did.
  """
  rng = jax.random.fold_in(state['rng'], state['step'])
  measurements = {}
  generation_config = distill.get('generation')
  if generation_config is not None and generation_config.source != 'none':
    batch, generated, measurements = on_policy.train_text(
        batch, rng, state, generation_config, model, teacher_model,
        teacher_params, num_train_steps)
    state = dict(state, **generated)
  mask = batch['mask']
  teacher_logits = None
  # At alpha 0 the teacher only evaluates: the step trains as from scratch.
  if teacher_model is not None and distill.alpha > 0:
    teacher_logits = jax.lax.stop_gradient(teacher_model.apply(
        {'params': teacher_params}, batch['inputs']))

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['inputs'], train=True,
                         rngs={'dropout': rng})
    hard = _token_mean(_next_token_ce(logits, batch['targets']), mask)
    terms = {'hard': hard}
    loss = hard
    options = dict(divergence=distill.divergence,
                   temperature=distill.temperature, beta=distill.beta,
                   skew=distill.skew, where=mask)
    soft = None
    if teacher_logits is not None:
      soft = losses.token_divergence(logits, teacher_logits, **options)
    elif 'topk_logits' in batch and distill.alpha > 0:
      soft = losses.sparse_token_divergence(
          logits, batch['topk_logits'], batch['topk_indices'],
          batch['rest_mass'], convention=distill.convention, **options)
    if soft is not None:
      soft = _token_mean(soft, mask)
      loss = (1.0 - distill.alpha) * hard + distill.alpha * soft
      terms['soft'] = soft
    terms['total'] = loss
    return loss, (terms, logits)

  grads, (terms, logits) = jax.grad(loss_fn, has_aux=True)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  params = optax.apply_updates(state['params'], updates)
  measurements.update({f'loss_{k}': v for k, v in terms.items()})
  measurements['accuracy'] = losses.masked_mean(
      _predicted_token(logits) == batch['targets'], mask)
  measurements['grad_norm'] = optax.tree.norm(grads)
  return dict(state, step=state['step'] + 1, params=params,
              opt_state=opt_state), measurements


def eval_sums(params, batch, teacher_params, *, model, teacher_model
              ) -> dict[str, jax.Array]:
  """Sums over the valid target tokens of one eval batch."""
  logits = model.apply({'params': params}, batch['inputs'])
  mask = batch['mask']
  weight = mask.astype(jnp.float32)
  sums = dict(count=jnp.sum(weight),
              ce=jnp.sum(_next_token_ce(logits, batch['targets']) * weight),
              correct=jnp.sum((_predicted_token(logits) == batch['targets'])
                              * weight))
  if teacher_model is not None:
    teacher_logits = teacher_model.apply({'params': teacher_params},
                                         batch['inputs'])
    sums['teacher_ce'] = jnp.sum(
        _next_token_ce(teacher_logits, batch['targets']) * weight)
    sums['kl_to_teacher'] = jnp.sum(losses.token_divergence(
        logits, teacher_logits, where=mask))
  return sums


def evaluate(eval_fn, params, teacher_params, batches, mesh
             ) -> dict[str, float]:
  """The token means of `eval_sums` over `batches` (host batches)."""
  totals: dict[str, float] = {}
  batches = ({k: v for k, v in b.items() if k != 'start'} for b in batches)
  for batch in prefetch.prefetch_to_mesh(batches, mesh):
    for k, v in jax.device_get(eval_fn(params, batch, teacher_params)).items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop('count', 0.0), 1.0)
  out = dict(num_tokens=count, loss=totals['ce'] / count,
             bits_per_token=totals['ce'] / count / LN2,
             accuracy=totals['correct'] / count)
  if 'teacher_ce' in totals:
    out['teacher_loss'] = totals['teacher_ce'] / count
    out['teacher_bits_per_token'] = out['teacher_loss'] / LN2
    out['kl_to_teacher'] = totals['kl_to_teacher'] / count
  return out


def sample_sums(params, batch, teacher_params, key, *, model, teacher_model,
                prompt_length: int, completion_length: int,
                temperature: float) -> tuple[dict[str, jax.Array], jax.Array]:
  """What on-policy training is for, measured on the student's own text:
  the student completes each window's prompt (from `key`), and the sums
  over the completions' tokens of the teacher's negative log-likelihood
  and of KL(student || teacher) at T = 1; and the sampled tokens."""
  from kd_jax import generation  # pylint: disable=g-import-not-at-top
  out = generation.generate(
      model, {'params': params}, batch['inputs'], batch['mask'], key,
      prompt_length=prompt_length, completion_length=completion_length,
      temperature=temperature)
  text = generation.completion_batch(out)
  mask = text['mask']
  weight = mask.astype(jnp.float32)
  student_logits = model.apply({'params': params}, text['inputs'])
  teacher_logits = teacher_model.apply({'params': teacher_params},
                                       text['inputs'])
  sums = dict(
      count=jnp.sum(weight),
      teacher_nll=jnp.sum(_next_token_ce(teacher_logits, text['targets'])
                          * weight),
      reverse_kl=jnp.sum(losses.reverse_kl_divergence(
          student_logits, teacher_logits, where=mask)))
  return sums, out['tokens']


def evaluate_samples(sample_fn, params, teacher_params, batches, mesh,
                     seed: int, num_batches: int
                     ) -> tuple[dict[str, float], list[str]]:
  """Token means of `sample_sums` over the first `num_batches` eval
  batches, each sampled with `fold_in(key(seed), batch index)` (the same
  prompts and keys for every run of a study), and the first texts."""
  totals: dict[str, float] = {}
  texts = []
  batches = ({k: v for k, v in b.items() if k != 'start'} for b in batches)
  for index, batch in enumerate(prefetch.prefetch_to_mesh(batches, mesh)):
    if index == num_batches:
      break
    key = jax.random.fold_in(jax.random.key(seed), index)
    sums, tokens = sample_fn(params, batch, teacher_params, key)
    for k, v in jax.device_get(sums).items():
      totals[k] = totals.get(k, 0.0) + float(v)
    if not texts:
      texts = [text.decode(row) for row in
               np.asarray(jax.device_get(tokens))[:3]]
  count = max(totals.pop('count', 0.0), 1.0)
  return dict(sample_tokens=count,
              sample_teacher_nll=totals['teacher_nll'] / count,
              sample_reverse_kl=totals['reverse_kl'] / count), texts


# ---------------------------------------------------------------------------
# The loop.
# ---------------------------------------------------------------------------


def _lm_run_info(config, workdir: str, field: str, fix: str
                 ) -> dict[str, Any]:
  """The run_info of the LM run in `workdir` that `field` names, refused
  unless it is a language model of this run's vocabulary (`fix`: what to
  do instead)."""
  info = rundir.read_run_info(workdir, field)
  if info.get('task') != 'lm':
    raise ValueError(f'{field}={workdir!r} is not a language-model run (its '
                     f'run_info.json has no task \'lm\'): {fix}')
  if info['num_classes'] != config.vocab_size:
    raise ValueError(f'{field}={workdir!r} has a vocabulary of '
                     f'{info["num_classes"]} tokens; this run\'s '
                     f'config.vocab_size is {config.vocab_size}.')
  return info


def _load_teacher(config, mesh, workdir: str | None = None):
  """(teacher model, its params on the mesh, run info) of the LM run in
  `workdir` (default config.distill.teacher_workdir), checked against the
  run of `config`; (None, None, None) without a teacher. The params are
  restored replicated, or with `distill.shard_teacher` straight into the
  split layout of `teachers.teacher_shardings`."""
  field = 'config.distill.teacher_workdir'
  if workdir is None:
    workdir = config.distill.teacher_workdir
  else:
    field = f'the teacher of config.distill.cache_dir ({field})'
  if not workdir:
    return None, None, None
  info = _lm_run_info(config, workdir, field,
                      'train the teacher with a task=\'lm\' config, e.g. '
                      'configs/shakespeare_char.py:role=teacher.')
  spec = ml_collections.ConfigDict(info['model'])
  dtype = TEACHER_DTYPES[config.distill.get('teacher_dtype', 'float32')]
  teacher = models.get_model(spec, config.vocab_size, dtype=dtype)
  if config.length > teacher.block_size:
    raise ValueError(f'config.length={config.length} exceeds the teacher\'s '
                     f'block_size {teacher.block_size} ({field}={workdir!r}).')
  abstract = jax.eval_shape(teacher.init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))
  abstract = {'params': abstract['params'], 'batch_stats': {}}
  layout = (teachers.teacher_shardings(abstract, mesh)
            if config.distill.get('shard_teacher', False) else
            jax.tree.map(lambda _: NamedSharding(mesh, P()), abstract))
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      abstract, layout)
  variables, step = checkpointing.restore_model(workdir, abstract)
  checkpointing.refuse_nonfinite(
      variables, f'{field}={workdir!r}', step, 'teacher',
      'train it again with a lower learning rate.')
  return teacher, variables['params'], dict(info, step=step)


def _cache_teacher(cache, config, mesh):
  """The cache's teacher for evaluation only (its KL to the student), when
  its run is still where the cache was written from and has the params the
  cache recorded; else (None, None, None): a cached run trains without it."""
  from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top
  workdir = cache.manifest['teacher_workdir']
  if not rundir.has_run_info(workdir):
    return None, None, None
  teacher, params, info = _load_teacher(config, mesh, workdir)
  if checkpointing.checksum(params) != cache.manifest['teacher_checksum']:
    logging.warning('%s: the teacher in %s is no longer the one the cache was '
                    'written from; evaluating without it.', lm_cache.MANIFEST,
                    workdir)
    return None, None, None
  return teacher, params, info


def _abstract_state(model, tx, config):
  def init(rng):
    params = model.init(rng, jnp.zeros((1, config.length), jnp.int32)
                        )['params']
    return dict(step=jnp.zeros((), jnp.int32), params=params, batch_stats={},
                opt_state=tx.init(params), rng=jax.random.fold_in(rng, 1),
                **on_policy.init_state(config))
  return init, jax.eval_shape(init, jax.random.key(config.seed))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None) -> dict[str, Any]:
  """Trains (or resumes) the LM run of `config` in `workdir` on `devices`
  (default: all); its summary."""
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  devices = list(devices or jax.devices())
  validate_config(config, len(devices))
  mesh = train.make_mesh(devices, config.get('mesh_model', 1))
  rundir.prepare(workdir)
  with train._workdir_lock(workdir):  # pylint: disable=protected-access
    return _train_and_evaluate(config, workdir, train.make_optimizer, mesh)


def _train_and_evaluate(config, workdir: str, make_optimizer, mesh):
  replicated = NamedSharding(mesh, P())
  is_chief = jax.process_index() == 0
  config_json = rundir.config_json(config)
  latest = checkpointing.latest_step(workdir)
  rundir.check_config(workdir, config_json,
                      allow_change=config.allow_config_change,
                      has_checkpoint=latest is not None,
                      overwrite_finished=False)
  train_tokens = text.load_split(config.dataset, config.train_split,
                                 config.data_dir)
  eval_tokens = text.load_split(config.dataset, config.eval_split,
                                config.data_dir)
  model = models.get_model(config.model, config.vocab_size)
  cache, teacher, teacher_params, teacher_info = _teacher_of(
      config, train_tokens, mesh)
  tx, _ = make_optimizer(config, config.num_train_steps)
  pinned: set[int] = set()  # Steps kept out of rotation (divergence).
  mngr = checkpointing.manager(workdir, config.keep_checkpoints, pinned)
  try:
    state, resumed = _restore_or_init(config, model, tx, mngr, workdir,
                                      replicated, is_chief)
    if is_chief:
      rundir.write_config(workdir, config_json)
    step_fn = jax.jit(functools.partial(
        lm_step, model=model,
        teacher_model=None if cache is not None else teacher, tx=tx,
        distill=config.distill, num_train_steps=config.num_train_steps),
                      out_shardings=(replicated, replicated),
                      donate_argnums=0)
    eval_fn = jax.jit(functools.partial(eval_sums, model=model,
                                        teacher_model=teacher),
                      out_shardings=replicated)
    eval_batches = functools.partial(_eval_batches, config, eval_tokens)
    start = int(jax.device_get(state['step']))
    meta = dict(config_fingerprint=checkpointing.config_fingerprint(
        config_json))
    generations = _generations_of(config, train_tokens, teacher_params)
    state, history, train_seconds, warnings = _loop(
        config, state,
        lambda state, batch: step_fn(state, batch, teacher_params),
        _train_stream(config, train_tokens, start, cache, mesh, generations),
        mngr, pinned, resumed,
        workdir, meta, lambda params: evaluate(
            eval_fn, params, teacher_params, eval_batches(), mesh), start)
    final = evaluate(eval_fn, state['params'], teacher_params,
                     eval_batches(), mesh)
    samples = _evaluate_on_samples(config, model, teacher, state['params'],
                                   teacher_params, eval_batches, mesh, final)
  finally:
    mngr.close()
  summary = dict(
      task='lm', step=config.num_train_steps, model=config.model.name,
      samples=samples,
      num_params=models.param_count(state['params']),
      eval={config.eval_split: final}, train_history=history,
      train_seconds=train_seconds, start_step=start)
  if warnings:
    summary['divergence_warnings'] = warnings
  if config.get('init_from'):
    summary['init_from'] = os.path.abspath(config.init_from)
  _finish(config, workdir, summary, cache, teacher_info, is_chief)
  return summary


def _restore_or_init(config, model, tx, mngr, workdir: str, replicated,
                     is_chief: bool):
  """(state, meta) of the latest restorable checkpoint, else a fresh state
  and {}."""
  init, abstract = _abstract_state(model, tx, config)
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
      abstract)
  restored = checkpointing.restore(mngr, abstract, workdir,
                                   move_broken=is_chief)
  if restored is not None:
    return restored
  state = jax.jit(init, out_shardings=replicated)(jax.random.key(config.seed))
  if config.get('init_from'):
    params = warm_start_params(config, abstract['params'])
    state = dict(state, params=params, opt_state=jax.jit(
        tx.init, out_shardings=replicated)(params))
  return state, {}


def warm_start_params(config, abstract_params):
  """The params of the finished LM run in `config.init_from`, laid out as
  `abstract_params` (this run's decoder): refused, naming the field, unless
  it is a language-model run with this vocabulary and these parameter
  shapes that trained to its last step, its params finite."""
  field, workdir = 'config.init_from', config.init_from
  info = _lm_run_info(config, workdir, field,
                      'warm-start from a finished task=\'lm\' run, or set '
                      'init_from=\'\'.')
  try:
    variables, step = checkpointing.restore_model(
        workdir, {'params': abstract_params, 'batch_stats': {}})
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{field}={workdir!r}: {e}; train that run '
                            'first.') from None
  except checkpointing.CheckpointDamaged as e:
    raise checkpointing.CheckpointDamaged(
        f'{field}={workdir!r} cannot be used: {e}') from None
  except checkpointing.ModelChanged:
    raise ValueError(
        f'{field}={workdir!r} trained the decoder {info["model"]}, whose '
        'parameter shapes are not config.model\'s '
        f'{rundir.spec_dict(config.model)}: warm-start from a run of the '
        'same decoder, or set init_from=\'\'.') from None
  if step != info['final_step']:
    raise ValueError(f'{field}={workdir!r} has not finished training: latest '
                     f'checkpoint step {step}, final step '
                     f'{info["final_step"]}. Let it finish.')
  checkpointing.refuse_nonfinite(variables, f'{field}={workdir!r}', step,
                                 'run to start from',
                                 'choose another run to start from.')
  return variables['params']


def _eval_batches(config, eval_tokens):
  return text.eval_batches(
      eval_tokens, batch_size=config.eval_batch_size, length=config.length,
      process_index=jax.process_index(), process_count=jax.process_count())


def _loop(config, state, step_fn, batches, mngr, pinned: set[int],
          resumed: dict[str, Any], workdir: str, meta, evaluate_params,
          start: int):
  """Steps `start`..num_train_steps: logs, saves, evaluates every
  eval_every_steps, and judges the run's health (`kd_jax.divergence`;
  `resumed`: the restored checkpoint's meta) on every log and checkpoint
  step: keeps the last healthy checkpoint in `pinned` (out of `mngr`'s
  rotation) while the run diverges, and raises `divergence.Diverged` before
  a non-finite state is saved. (state, history, train seconds (those of
  the segments before a resume included, as the checkpoints record them),
  divergence warnings)."""
  history, started = [], time.time()
  seconds_before = float(resumed.get('train_seconds', 0.0))
  generation_config = config.distill.get('generation')
  if on_policy.needs_first_loss(state):
    state = on_policy.after_evaluation(
        state, evaluate_params(state['params'])['loss'], generation_config)
  health = _health(state, resumed, pinned)
  param_norm = jax.jit(optax.tree.norm)
  pending = []  # Each step's measurements since the last fetch.
  for step in range(start, config.num_train_steps):
    state, measurements = step_fn(state, next(batches))
    done = step + 1
    last = done == config.num_train_steps
    save = done % config.checkpoint_every_steps == 0 or last
    pending.append(measurements)
    if done % config.log_every_steps == 0 or save:
      # Measured from the state, outside the step: its math is untouched.
      pending[-1] = dict(measurements, param_norm=param_norm(state['params']))
      window = _fetch(pending, done, health, mngr, workdir, config, start)
      pending = []
      if done % config.log_every_steps == 0 or last:
        history.append(dict(step=done, **window[-1]))
        logging.info('step %d: %s', done, window[-1])
      divergence.check(health, done,
                       float(np.mean([m['loss_total'] for m in window])),
                       window[-1]['param_norm'])
    if config.eval_every_steps > 0 and done % config.eval_every_steps == 0 \
        and not last:
      measured = evaluate_params(state['params'])
      logging.info('step %d eval: %s', done, measured)
      if on_policy.is_adaptive(generation_config):
        state = on_policy.after_evaluation(state, measured['loss'],
                                           generation_config)
    if save:
      divergence.pin(health, pinned, mngr, done)
      checkpointing.save(mngr, state, dict(
          meta, train_seconds=seconds_before + time.time() - started,
          **health.meta()))
  mngr.wait_until_finished()
  divergence.release(health, pinned, mngr, config.keep_checkpoints, workdir)
  return (state, history, seconds_before + time.time() - started,
          health.warnings)


def _health(state, resumed: dict[str, Any], pinned: set[int]
            ) -> divergence.Health:
  """The run's health as the restored checkpoint's meta (`resumed`)
  recorded it, else measured from `state` before its first step; its last
  healthy checkpoint is added to `pinned`."""
  norm = resumed.get('reference_param_norm')
  if norm is None:
    norm = float(jax.jit(optax.tree.norm)(state['params']))
  health = (divergence.Health.from_meta(resumed, norm) if resumed
            else divergence.Health(param_norm=norm))
  if health.last_healthy_step is not None:
    pinned.add(health.last_healthy_step)
  return health


def _fetch(pending, step: int, health: divergence.Health, mngr,
           workdir: str, config, start: int) -> list[dict[str, float]]:
  """The measurements of the steps up to `step` (`pending`) on the host,
  fed to `health`; stops the run (`divergence.stop`) once a loss or the
  parameter norm is not finite."""
  window = [{k: float(v) for k, v in m.items()}
            for m in jax.device_get(pending)]
  bad = divergence.observe(health, step - len(window) + 1, window,
                           run_start=start == 0)
  if bad is not None:
    raise divergence.stop(*bad, mngr, workdir, config, health, start,
                          jax.process_index() == 0)
  return window


def _evaluate_on_samples(config, model, teacher, params, teacher_params,
                         eval_batches, mesh, final: dict) -> list[str]:
  """Adds config.eval_samples' measures to `final`; the sampled texts."""
  sampled = config.get('eval_samples')
  if sampled is None or sampled.num_batches <= 0 or teacher is None:
    return []
  sample_fn = jax.jit(functools.partial(
      sample_sums, model=model, teacher_model=teacher,
      prompt_length=sampled.prompt_length,
      completion_length=sampled.completion_length,
      temperature=sampled.temperature), out_shardings=NamedSharding(mesh, P()))
  measured, samples = evaluate_samples(
      sample_fn, params, teacher_params, eval_batches(), mesh, sampled.seed,
      sampled.num_batches)
  final.update(measured)
  return samples


def _teacher_of(config, train_tokens, mesh):
  """(cache or None, teacher model, its params, its run info): the
  per-token cache of `distill.cache_dir` (and its teacher for evaluation,
  when still there), or the online teacher, or no teacher."""
  if not config.distill.get('cache_dir'):
    return (None, *_load_teacher(config, mesh))
  from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top
  cache = lm_cache.load(config.distill.cache_dir, config, train_tokens)
  return (cache, *_cache_teacher(cache, config, mesh))


def _generations_of(config, train_tokens, teacher_params):
  """The teacher's stored completions (`kd_jax.lm_generations`) of
  `distill.generation.cache_dir`, or None."""
  g = config.distill.get('generation')
  if g is None or g.source == 'none' or not g.get('cache_dir'):
    return None
  from kd_jax import lm_generations  # pylint: disable=g-import-not-at-top
  return lm_generations.load(g.cache_dir, config, train_tokens,
                             teacher_params)


def _train_stream(config, train_tokens, start: int, cache, mesh,
                  generations=None):
  """The train batches from step `start` on, as arrays on the mesh (with
  the cache's sparse targets, the stored completions, when there are)."""
  host_batches = text.train_batches(
      train_tokens, seed=config.seed, batch_size=config.batch_size,
      length=config.length, start_step=start,
      process_index=jax.process_index(), process_count=jax.process_count(),
      aligned=(config.aligned_windows or generations is not None
               or cache is not None and cache.layout == 'windows'),
      shares=1 if cache is None else cache.num_shares,
      stride=(cache.stride if cache is not None
              and cache.layout == 'windows' else None))
  if cache is not None:
    from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top
    host_batches = (lm_cache.lookup(cache, b) for b in host_batches)
  if generations is not None:
    from kd_jax import lm_generations  # pylint: disable=g-import-not-at-top
    host_batches = (lm_generations.lookup(generations, b)
                    for b in host_batches)
  return prefetch.prefetch_to_mesh(
      ({k: v for k, v in b.items() if k != 'start'} for b in host_batches),
      mesh)


def _finish(config, workdir: str, summary, cache, teacher_info,
            is_chief: bool) -> None:
  """Adds the teacher to `summary`; process 0 writes run_info.json (what
  a later run reads of this one as a teacher) and summary.json."""
  if teacher_info is not None:
    summary['teacher'] = dict(workdir=os.path.abspath(
        config.distill.teacher_workdir), step=teacher_info['step'],
                              model=teacher_info['model'])
  if cache is not None:
    summary['teacher'] = dict(
        cache_dir=os.path.abspath(config.distill.cache_dir),
        **{k: cache.manifest[k] for k in (
            'teacher_workdir', 'teacher_step', 'teacher_model', 'k',
            'temperature', 'bytes_per_token')}, layout=cache.layout)
    if cache.num_shares > 1:  # Exported by processes: what process 0 read.
      summary['teacher']['shards_read'] = [s.name for s in cache.shards]
  if is_chief:
    rundir.write_run_info(workdir, model_spec=config.model,
                          num_classes=config.vocab_size, class_names=[],
                          image_shape=[config.length],
                          dataset=config.dataset,
                          final_step=config.num_train_steps, task='lm')
    rundir.write_summary(workdir, summary)


def result_lines(summary: dict[str, Any]) -> str:
  """The summary's evaluation, one line per measure, for the CLI."""
  lines = []
  for split, r in summary['eval'].items():
    line = (f'{split}: {r["bits_per_token"]:.4f} bits/token '
            f'({r["loss"]:.4f} nats), next-token accuracy {r["accuracy"]:.4f}'
            f' over {int(r["num_tokens"]):,} tokens')
    if 'kl_to_teacher' in r:
      line += (f'; teacher {r["teacher_bits_per_token"]:.4f} bits/token, '
               f'KL(teacher || student) {r["kl_to_teacher"]:.4f} nats')
    if 'sample_teacher_nll' in r:
      line += (f'; on the student\'s own completions: teacher NLL '
               f'{r["sample_teacher_nll"]:.4f}, KL(student || teacher) '
               f'{r["sample_reverse_kl"]:.4f} nats per token')
    lines.append(line)
  return '\n'.join(lines)
