"""The state's initial values, the one jitted train step, evaluation, and
the training loop.

The same step trains a teacher or a student from scratch (no teacher), and a
student distilled from teacher logits, whatever their source (an online
teacher, a stacked ensemble, a logits cache): a `teachers.Teacher` gives the
logits, `objective.loss` turns them and the labels into the loss, and one
update trains every group of the state (`kd_jax.train_state.TrainState`).
`train_and_evaluate` is setup (`_setup`), restore (`_restore`), the loop
(`_Loop`: steps, logs, evals, checkpoints) and the summary.
Data parallelism: a `jax.make_mesh` over every device with axes ('data',
'model') (`make_mesh`; 'model' has config.mesh_model devices, default 1);
batches are split over both axes, the state is replicated (but per-example
state such as CRD's memory banks, split by rows), the teachers too unless
config.distill.shard_teacher splits them (over 'model' when it has more than
one device), and XLA inserts the gradient all-reduce and the teacher's
gathers.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import math
import os
import time
from typing import Any, Callable, NamedTuple

from absl import logging
from etils import epy
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import divergence
from kd_jax import input_pipeline
from kd_jax import losses
from kd_jax import models
from kd_jax import objective
from kd_jax import optim
from kd_jax import progress
from kd_jax import rundir
from kd_jax.specialists import groups as specialist_groups
from kd_jax import teachers
from kd_jax import warm_start
from kd_jax.methods import ctkd
from kd_jax.methods import logit
from kd_jax.train_state import TrainState
from kd_jax.models import features as model_features

# clu's writers import TensorFlow: only a process that trains loads it.
with epy.lazy_imports():
  from clu import metric_writers  # pylint: disable=g-import-not-at-top
  from clu import periodic_actions  # pylint: disable=g-import-not-at-top

OPTIMIZERS = ('sgd', 'adam', 'adamw')
SCHEDULES = ('constant', 'cosine', 'step')
DTYPES = {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad field and how to fix it.

  Reads `config` in the current form (`config_lib.upgrade`, which warns
  about deprecated fields).
  """
  config = config_lib.upgrade(config)
  d = config.distill
  source = teachers.sources.get(config)
  if d.teacher_source == 'none' and d.alpha != 0:
    raise ValueError(
        f'config.distill.alpha={d.alpha} weights a teacher term, but '
        f'config.distill.teacher_source is "none": set alpha=0 for '
        f'supervised training, or name a teacher source.')
  if not 0 <= d.label_smoothing <= 1:
    raise ValueError(
        f'config.distill.label_smoothing={d.label_smoothing} must lie in '
        '[0, 1]: 0 for one-hot targets, or a small value such as 0.1.')
  _validate_model(config.model, 'config.model')
  for i, t in enumerate(config.get('teachers') or ()):
    if t.get('model') is not None:
      _validate_model(t.model, f'config.teachers[{i}].model')
  objective.validate(config)
  if source.check is not None:
    source.check(config)
  if config.optimizer not in OPTIMIZERS:
    raise ValueError(f'config.optimizer={config.optimizer!r}; choose one of '
                     f'{OPTIMIZERS}.')
  if config.schedule not in SCHEDULES:
    raise ValueError(f'config.schedule={config.schedule!r}; choose one of '
                     f'{SCHEDULES}.')
  if d.teacher_dtype and d.teacher_dtype not in DTYPES:
    raise ValueError(f'config.distill.teacher_dtype={d.teacher_dtype!r}; '
                     f'choose one of {tuple(DTYPES)} or "" (config.dtype).')
  if d.shard_teacher and not source.shardable:
    raise ValueError(
        'config.distill.shard_teacher splits online teachers\' variables '
        f'over devices; teacher_source={d.teacher_source!r} has none: set '
        'shard_teacher=False.')
  if config.dtype not in DTYPES:
    raise ValueError(f'config.dtype={config.dtype!r}; choose one of '
                     f'{tuple(DTYPES)}.')
  if not config.learning_rate > 0:
    raise ValueError(f'config.learning_rate={config.learning_rate} must be '
                     f'> 0.')
  if config.batch_size <= 0 or config.eval_batch_size <= 0:
    raise ValueError(f'config.batch_size={config.batch_size} and '
                     f'config.eval_batch_size={config.eval_batch_size} must be '
                     f'positive.')
  _validate_loop(config)
  unknown = [m for name in ('distill', 'specialist', 'transfer')
             for m in rundir.unknown_fields(
                 config[name], config_lib.default_config()[name], f'{name}.',
                 config_lib.OPTION_DICTS)]
  if unknown:
    raise ValueError(f'unknown config fields: {"; ".join(unknown)}. Every '
                     'field and its default is in '
                     'kd_jax/config_lib.py:default_config().')


def _validate_model(spec, field: str) -> None:
  """Refuses layer sizes below 1 (e.g. model.hidden=(0,)), which would fail
  deep in the initializers."""
  for key, value in spec.items():
    if (isinstance(value, (tuple, list)) and value
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
        and min(value) < 1):
      raise ValueError(
          f'{field}.{key}={tuple(value)}: every layer needs at least one '
          f'unit; give sizes >= 1, e.g. {key}=(800, 800).')


def _validate_loop(config: ml_collections.ConfigDict) -> None:
  """Settings that would lose work or fail mid-run, checked up front."""
  if config.keep_checkpoints < 1:
    raise ValueError(
        f'config.keep_checkpoints={config.keep_checkpoints} would keep no '
        'checkpoint, and the trained model would be lost: set it to 1 or '
        'more (default 2).')
  for field in ('checkpoint_every_steps', 'log_every_steps'):
    if config[field] < 1:
      raise ValueError(
          f'config.{field}={config[field]} must be >= 1 (steps between two '
          f'of them); set e.g. {field}=500, or num_train_steps to do it only '
          'at the end.')
  if config.num_train_steps == 0 or (config.num_train_steps < 0
                                     and not config.num_epochs > 0):
    raise ValueError(
        f'config.num_train_steps={config.num_train_steps} with '
        f'config.num_epochs={config.num_epochs} trains nothing: set '
        'num_train_steps > 0, or num_train_steps=-1 and num_epochs > 0.')
  if config.warmup_steps < 0:
    raise ValueError(f'config.warmup_steps={config.warmup_steps} must be '
                     '>= 0.')


def make_optimizer(config: ml_collections.ConfigDict, total_steps: int
                   ) -> tuple[optax.GradientTransformation, optax.Schedule]:
  warmup = config.warmup_steps
  if config.schedule == 'constant':
    decay = optax.constant_schedule(config.learning_rate)
  elif config.schedule == 'cosine':
    decay = optax.cosine_decay_schedule(config.learning_rate,
                                        max(total_steps - warmup, 1))
  else:
    boundaries = {int(f * total_steps) - warmup: config.step_decay
                  for f in config.step_boundaries}
    decay = optax.piecewise_constant_schedule(config.learning_rate, boundaries)
  schedule = decay
  if warmup > 0:
    schedule = optax.join_schedules(
        [optax.linear_schedule(0.0, config.learning_rate, warmup), decay],
        [warmup])

  parts = []
  if config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(config.grad_clip_norm))
  if config.optimizer == 'sgd':
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.sgd(schedule, momentum=config.momentum or None,
                           nesterov=config.nesterov))
  elif config.optimizer == 'adam':
    if config.weight_decay > 0:
      parts.append(optax.add_decayed_weights(config.weight_decay))
    parts.append(optax.adam(schedule))
  else:
    parts.append(optax.adamw(schedule, weight_decay=config.weight_decay))
  if config.max_norm < 0:
    raise ValueError(f'config.max_norm={config.max_norm}; use 0 (off) or the '
                     'radius of each unit\'s incoming weights, e.g. 3.5.')
  if config.max_norm > 0:
    parts.append(optim.max_norm(config.max_norm))  # Last: it projects params.
  return optax.chain(*parts), schedule


def init_state(model, tx, rng: jax.Array, image_shape, distill=None,
               num_classes: int | None = None, teacher_feature_shapes=None,
               num_train_examples: int | None = None) -> TrainState:
  """The train state; with `distill`, also a learned temperature (CTKD,
  `ctkd.init_params`) and the feature terms' connectors and per-example
  state (`objective.init_feature_state`, from the teacher's feature shapes
  `teacher_feature_shapes` and the train split's size), each a trained
  group with its own state of `tx` when the run has it."""
  init_rng, state_rng = jax.random.split(rng)
  variables = model.init(init_rng, jnp.zeros((1, *image_shape), jnp.float32))
  trainable = {'student': variables['params']}
  features = dict(connector_params={}, connector_batch_stats={},
                  example_state={})
  settings = ctkd.settings(distill if distill is not None else {'ctkd': 'none'})
  if settings.learned:
    trainable['temperature'] = ctkd.init_params(
        settings, num_classes, jax.random.fold_in(rng, 1))
  if distill is not None and objective.feature_terms(distill):
    images = jax.ShapeDtypeStruct((2, *image_shape), jnp.float32)
    student_shapes = jax.eval_shape(
        lambda v, x: model_features.apply_with_features(
            model, v, x, train=True, rngs={'dropout': jax.random.key(0)},
            mutable=['batch_stats'])[1], variables, images)
    features = objective.init_feature_state(
        distill, student_shapes, teacher_feature_shapes, num_train_examples,
        jax.random.fold_in(rng, 2))
    trainable['connectors'] = features['connector_params']
  return TrainState(
      step=jnp.zeros((), jnp.int32), params=variables['params'],
      batch_stats=variables.get('batch_stats', {}),
      opt_state=optim.per_group(tx).init(trainable), rng=state_rng,
      temperature_params=trainable.get('temperature', {}), **features)


def ensemble_prediction(teacher_logits, weights, method: str):
  """The class the (combined) teachers predict: argmax of `method`'s mean
  (mean_probs for sum_losses, which has no combined distribution)."""
  if method not in losses.COMBINE_METHODS:
    method = 'mean_probs'
  return jnp.argmax(losses.combine_teachers(
      teacher_logits, method, weights=jnp.asarray(weights)), -1)


def make_mesh(devices, model: int = 1) -> jax.sharding.Mesh:
  """The run's 2-D device mesh ('data', 'model') of shape
  (len(devices) // model, model). Batches are split over both axes (each
  device its own rows); a sharded teacher over 'model' when model > 1
  (`teachers.teacher_shardings`)."""
  devices = list(devices)
  if model < 1 or len(devices) % model:
    raise ValueError(
        f'config.mesh_model={model} must be >= 1 and divide the '
        f'{len(devices)} devices of this run: set it to a divisor of '
        f'{len(devices)} (1, the default: no model axis).')
  return jax.make_mesh((len(devices) // model, model), ('data', 'model'),
                       devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,) * 2)


def state_shardings(abstract_state: TrainState, mesh: jax.sharding.Mesh,
                    distill=None) -> Any:
  """The train state's layout on `mesh`: replicated, but for the entries of
  per-example state that the feature methods of `distill` split by rows
  (`objective.row_sharded`: CRD's banks, one row per train example), split
  over every mesh axis where their count divides evenly (replicated
  otherwise), so that they scale with the devices. XLA partitions the
  step's gathers and scatters on them; the values are the same either way."""
  replicated = NamedSharding(mesh, P())
  rows = NamedSharding(mesh, input_pipeline.batch_spec(mesh))
  split = {} if distill is None else objective.row_sharded(distill)
  num_shards = mesh.size

  def layout(path, leaf):
    keys = [getattr(k, 'key', getattr(k, 'name', None)) for k in path]
    if (len(keys) == 3 and keys[0] == 'example_state'
        and keys[2] in split.get(keys[1], ())
        and leaf.shape and leaf.shape[0] % num_shards == 0):
      return rows
    return replicated
  return jax.tree_util.tree_map_with_path(layout, abstract_state)


# Measurements that cost a pass over every parameter: computed on logging
# steps only (`train_step(..., log=True)`), zeros on the others.
LOG_STEP_MEASUREMENTS = ('grad_norm', 'param_norm', 'update_norm',
                         'connector_grad_norm')


def _teacher_outputs(teacher, teacher_variables, batch, with_features: bool):
  """(logits [K, B, C] or None, the teacher's features {name: [B, ...]} when
  `with_features`)."""
  if teacher is None:
    return None, None
  if not with_features:
    return teacher.forward(teacher_variables, batch), None
  logits, features = teacher.forward_features(teacher_variables, batch)
  return logits, {k: v[0] for k, v in features.items()}


class _Aux(NamedTuple):
  """What the step's loss function returns beside the loss."""
  logits: jax.Array
  batch_stats: Any
  terms: dict[str, jax.Array]
  temperature: jax.Array | None
  strength: jax.Array | None
  feature_state: dict[str, Any]


def _strong_view_loss(trainable, batch_stats, batch, *, model, distill,
                      strong_targets, dropout_rng):
  """(the strong view's weighted terms, their values, the batch statistics
  after its forward pass), `objective.strong_view`."""
  logits, new_model_state = model.apply(
      {'params': trainable['student'], 'batch_stats': batch_stats},
      batch['image_strong'], train=True,
      rngs={'dropout': jax.random.fold_in(dropout_rng, 1)},
      mutable=['batch_stats'])
  loss, values = objective.loss(
      logits, strong_targets, batch['label'], batch['mask'],
      objective.strong_view_distill(distill))
  return loss, {f'strong_{k}': v for k, v in values.items()}, (
      new_model_state.get('batch_stats', batch_stats))


def _step_loss(trainable, state: TrainState, batch, *, model, distill,
               targets, teacher_features, epoch, dropout_rng, example_rng,
               strong_targets=None):
  """The objective of one step as a function of the trained groups."""
  variables = {'params': trainable['student'],
               'batch_stats': state.batch_stats}
  terms = objective.feature_terms(distill)
  head = logit.soft_term(distill).method.student_head
  student_features = {}
  if terms or head:
    logits, student_features, new_model_state = (
        model_features.apply_with_features(
            model, variables, batch['image'], train=True,
            rngs={'dropout': dropout_rng}, mutable=['batch_stats']))
  else:
    logits, new_model_state = model.apply(
        variables, batch['image'], train=True,
        rngs={'dropout': dropout_rng}, mutable=['batch_stats'])
  temperature = strength = None
  if 'temperature' in trainable:
    temperature, strength = objective.learned_temperature(
        distill, trainable['temperature'], logits, targets, epoch)
  loss, values = objective.loss(
      logits, targets, batch['label'], batch['mask'], distill,
      label_probs=batch.get('label_probs'), epoch=epoch,
      temperature=temperature,
      distillation_logits=student_features.get(head))
  feature_state = {}
  if terms:
    feature_total, feature_values, connector_batch_stats, example_state = (
        objective.feature_loss(
            terms, trainable['connectors'], state.connector_batch_stats,
            student_features, teacher_features, batch,
            example_state=state.example_state, rng=example_rng,
            epoch=epoch))
    loss = loss + feature_total
    values = {**values, **feature_values, 'total': loss}
    feature_state = dict(connector_batch_stats=connector_batch_stats,
                         example_state=example_state)
  batch_stats = new_model_state.get('batch_stats', {})
  if strong_targets is not None:
    strong_loss, strong_values, batch_stats = _strong_view_loss(
        trainable, batch_stats, batch, model=model, distill=distill,
        strong_targets=strong_targets, dropout_rng=dropout_rng)
    loss = loss + strong_loss
    values = {**values, **strong_values, 'total': loss}
  return loss, _Aux(logits, batch_stats, values, temperature, strength,
                    feature_state)


def _measurements(aux: _Aux, batch, targets, grads, updates, params, log,
                  learning_rate) -> dict[str, jax.Array]:
  """The step's flat measurements: losses per term, accuracies, the learned
  temperature, and on logging steps the norms of `LOG_STEP_MEASUREMENTS`."""
  mask = batch['mask']
  prediction = jnp.argmax(aux.logits, -1)
  measurements = {f'loss_{k}': v for k, v in aux.terms.items()}
  measurements['accuracy'] = losses.masked_mean(prediction == batch['label'],
                                                mask)
  if targets.prediction is not None:
    measurements['teacher_accuracy'] = losses.masked_mean(
        targets.prediction == batch['label'], mask)
    measurements['agreement'] = losses.masked_mean(
        prediction == targets.prediction, mask)
  if aux.temperature is not None:
    measurements['temperature'] = jnp.mean(aux.temperature)
    measurements['temperature_strength'] = aux.strength
  norm_of = dict(grad_norm=grads['student'], param_norm=params,
                 update_norm=updates['student'])
  if 'connectors' in grads:
    norm_of['connector_grad_norm'] = grads['connectors']
  measurements.update(jax.lax.cond(
      log, lambda trees: {k: optax.tree.norm(t) for k, t in trees.items()},
      lambda trees: {k: jnp.zeros((), jnp.float32) for k in trees},
      norm_of))
  measurements['learning_rate'] = learning_rate
  return measurements


def train_step(state: TrainState, batch: dict[str, jax.Array],
               teacher_variables, log: bool | jax.Array = True,
               *, model, tx, schedule, teacher: teachers.Teacher | None,
               distill, steps_per_epoch: int | None = None
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One SGD step of the student on one global batch; pure and jittable.

  Teacher forward -> student forward -> `objective.loss` (+
  `objective.feature_loss`) -> one update of every trained group
  (`optim.per_group(tx)`: the student, CTKD's temperature, the feature
  connectors); per-example state (CRD's banks) is updated by its method.
  The teacher's features come from the forward pass that gives its logits.
  `steps_per_epoch` gives the epoch that warm-ups and CTKD's curriculum
  follow. `log` (a traced bool: one program serves every step) says whether
  to compute `LOG_STEP_MEASUREMENTS`; they are zeros when it is false, and
  the state is the same either way.
  """
  rng = jax.random.fold_in(state.rng, state.step)
  terms = objective.feature_terms(distill)
  teacher_logits, teacher_features = _teacher_outputs(
      teacher, teacher_variables, batch, bool(terms))
  targets = objective.teacher_targets(
      teacher_logits, batch, distill,
      None if teacher is None else teacher.weights)
  epoch = (None if steps_per_epoch is None
           else state.step.astype(jnp.float32) / steps_per_epoch)
  strong_targets = None
  if objective.strong_view(distill) is not None and teacher is not None:
    if 'image_strong' not in batch:
      raise ValueError(
          'config.distill.strong_view is set but the batch has no '
          "'image_strong': make batches with kd_jax.input_pipeline, which "
          'adds the strong view to train batches.')
    strong_targets = objective.teacher_targets(
        teacher.forward(teacher_variables,
                        {**batch, 'image': batch['image_strong']}),
        batch, distill, teacher.weights)
  dropout_rng, example_rng = jax.random.split(rng)
  if not terms:
    dropout_rng = rng  # Runs without feature terms draw as they always have.
  loss_fn = functools.partial(
      _step_loss, state=state, batch=batch, model=model, distill=distill,
      targets=targets, teacher_features=teacher_features, epoch=epoch,
      dropout_rng=dropout_rng, example_rng=example_rng,
      strong_targets=strong_targets)
  trainable = state.trainable()
  grads, aux = jax.grad(loss_fn, has_aux=True)(trainable)
  updates, opt_state = optim.per_group(tx).update(grads, state.opt_state,
                                                   trainable)
  new_state = state.with_trainable(
      optax.apply_updates(trainable, updates)).replace(
          step=state.step + 1, opt_state=opt_state,
          batch_stats=aux.batch_stats, **aux.feature_state)
  return new_state, _measurements(aux, batch, targets, grads, updates,
                                  new_state.params, log,
                                  schedule(state.step))


def eval_step(state: TrainState, batch, teacher_variables, *, model,
              teacher: teachers.Teacher | None,
              ensemble_method: str = 'mean_probs') -> dict[str, jax.Array]:
  """Sums over the valid examples of one eval batch (padding masked out).

  With a teacher: `teacher_correct` and `agreement` of the teachers combined
  by `ensemble_method` (with their weights), and `teacher{k}_correct` of each
  of several teachers (k indexes `teacher.names`).
  """
  logits = model.apply({'params': state.params,
                        'batch_stats': state.batch_stats},
                       batch['image'], train=False)
  mask = batch['mask'].astype(jnp.float32)
  prediction = jnp.argmax(logits, -1)
  sums = dict(
      count=jnp.sum(mask),
      correct=jnp.sum((prediction == batch['label']) * mask),
      loss=jnp.sum(losses.cross_entropy(logits, batch['label']) * mask))
  if teacher is not None:
    teacher_logits = teacher.forward(teacher_variables, batch)
    teacher_prediction = ensemble_prediction(teacher_logits, teacher.weights,
                                             ensemble_method)
    sums['teacher_correct'] = jnp.sum(
        (teacher_prediction == batch['label']) * mask)
    sums['agreement'] = jnp.sum((prediction == teacher_prediction) * mask)
    if teacher_logits.shape[0] > 1:
      for k in range(teacher_logits.shape[0]):
        sums[f'teacher{k}_correct'] = jnp.sum(
            (jnp.argmax(teacher_logits[k], -1) == batch['label']) * mask)
  return sums


def evaluate(eval_fn, state, eval_iter, teacher_variables, prefetch
             ) -> dict[str, float]:
  totals: dict[str, float] = {}
  for batch in prefetch(eval_iter):
    sums = jax.device_get(eval_fn(state, batch, teacher_variables))
    for k, v in sums.items():
      totals[k] = totals.get(k, 0.0) + float(v)
  count = max(totals.pop('count', 0.0), 1.0)
  out = {'num_examples': count}
  for k, v in totals.items():
    if k == 'correct':
      out['accuracy'] = v / count
      out['errors'] = count - v
    elif k.endswith('_correct'):
      out[k.replace('_correct', '_accuracy')] = v / count
    else:
      out[k] = v / count
  return out


# A logged train accuracy this far below the best one reached is a collapse.
COLLAPSE_DROP = 0.3


def _workdir_lock(workdir: str):
  """The workdir's lock, taken by process 0 for every process of the run."""
  if jax.process_count() == 1:
    return rundir.lock(workdir)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  error = ''
  if jax.process_index() == 0:
    try:
      mine = rundir.acquire_lock(workdir)
    except rundir.WorkdirLocked as e:
      error = str(e)
  failed = multihost_utils.broadcast_one_to_all(np.int32(bool(error)))
  if int(failed):
    raise rundir.WorkdirLocked(
        error or f'process 0 could not lock workdir {workdir!r}; see its log.')
  if jax.process_index() != 0:
    return rundir.lock(workdir, take=False)

  @contextlib.contextmanager
  def held():
    try:
      yield
    finally:
      rundir.release_lock(workdir, mine)
  return held()


def _resume_checks(workdir: str, meta: dict[str, Any], config, teacher,
                   topology: dict[str, int]) -> list[dict[str, Any]]:
  """Checks a restored checkpoint against this run; the topology changes.

  Raises:
    ValueError: the teacher (e.g. a re-exported logits cache) differs from
      the one the checkpoint was trained with, and allow_config_change is
      False.
  """
  step = meta.get('step')
  recorded = meta.get('teacher_fingerprint')
  current = None if teacher is None else teacher.fingerprint
  if recorded is not None and recorded != current and (
      teacher is None or recorded not in teacher.legacy_fingerprints):
    origins = '; '.join(', '.join(f'{k}={v!r}' for k, v in row.items()
                                  if k not in ('name', 'weight'))
                        for row in teachers.describe(config, teacher))
    changed = teachers.sources.get(config).changed
    message = (
        f'workdir {workdir!r} was trained up to step {step} with another '
        f'teacher (fingerprint {recorded}) than this run has ({current}'
        + (f': {origins}' if origins else '')
        + (f', {changed} since?' if changed else '') + ')')
    if not config.allow_config_change:
      raise ValueError(
          f'{message}. Use a fresh --workdir, restore the original teacher, '
          'or set config.allow_config_change=True to continue with this one.')
    logging.warning('%s; continuing (allow_config_change=True).', message)
  changes = list(meta.get('topology_changes', []))
  before = meta.get('topology')
  if before is not None and before != topology:
    logging.warning(
        '*** workdir %r resumes at step %s on %s, but trained on %s: the data '
        'stream is split by process count, so the numbers will differ from an '
        'uninterrupted run (recorded in summary.json as topology_changes). '
        'Resume on the original topology to reproduce them. ***', workdir,
        step, topology, before)
    changes.append(dict(step=step, before=before, after=topology))
  return changes


def _collapse(step: int, accuracy: float, best: float, collapsed: bool,
              warnings: list[dict[str, Any]]) -> tuple[float, bool]:
  """Updates (best accuracy, collapsed) with one logged train accuracy,
  warning (and appending to `warnings`) when it falls far below the best."""
  if accuracy < best - COLLAPSE_DROP:
    if not collapsed:
      logging.warning(
          'train accuracy fell to %.3f at step %d after reaching %.3f: '
          'training collapsed (often too high a config.learning_rate); the '
          'run goes on, and summary.json lists it in collapse_warnings.',
          accuracy, step, best)
      warnings.append(dict(step=int(step), accuracy=float(accuracy),
                           best=float(best)))
    return best, True
  return max(best, accuracy), False


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       devices=None, *, overwrite_finished: bool = False
                       ) -> dict[str, Any]:
  """Trains (and distils) as `config` says; returns the final summary.

  Resumes from the latest checkpoint in `workdir`, which the run holds
  locked (`rundir.lock`): a second run on it is refused. `devices` (default:
  all) sets the data-parallel mesh. A finished run whose checkpoints are
  gone is trained again from step 0 (its summary.json kept aside) only with
  `overwrite_finished` (`rundir.check_config`).

  Raises:
    divergence.Diverged: the loss or the parameters stopped being finite;
      the message names the checkpoint a rerun resumes from.
  """
  config = config_lib.upgrade(config)
  validate_config(config)
  rundir.prepare(workdir)
  with _workdir_lock(workdir):
    return _train_and_evaluate(config, workdir, devices, overwrite_finished)


@dataclasses.dataclass
class _Run:
  """What a run builds before its first step (`_setup`)."""
  config: ml_collections.ConfigDict
  workdir: str
  devices: list[Any]
  mesh: jax.sharding.Mesh
  is_chief: bool
  config_json: str
  info: Any
  steps_per_epoch: int
  total_steps: int
  eval_every: int
  model: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  teacher: teachers.Teacher | None
  teacher_variables: Any
  init: Callable[[jax.Array], TrainState]
  abstract: TrainState
  state_sharding: Any

  def datasets(self, start_step: int):
    # A multi-view logits cache augments on the host: its stream is plain.
    return input_pipeline.get_datasets(
        teachers.pipeline_config(self.config), start_step=start_step,
        num_devices=len(self.devices))


def _setup(config, workdir: str, devices, overwrite_finished: bool
           ) -> tuple[_Run, Any, int]:
  """The run's config checked against its workdir, its data, model,
  optimizer, teacher and state layout; its data stream from the newest
  checkpoint's step; and that step (0 without one)."""
  devices = list(devices or jax.devices())
  mesh = make_mesh(devices, config.mesh_model)
  is_chief = jax.process_index() == 0
  config_json = rundir.config_json(config)
  latest = checkpointing.latest_step(workdir)
  has_checkpoint = latest is not None
  rundir.check_config(workdir, config_json,
                      allow_change=config.allow_config_change,
                      has_checkpoint=has_checkpoint,
                      overwrite_finished=overwrite_finished)
  if is_chief and not has_checkpoint and rundir.is_finished(workdir):
    logging.warning('workdir %r: training the finished run there again from '
                    'step 0 (overwrite_finished=True); its summary is kept as '
                    '%s.', workdir, rundir.retire_summary(workdir))
  # Checkpoints are written at the step the data stream has reached.
  data = input_pipeline.get_datasets(
      teachers.pipeline_config(config),
      start_step=latest or 0, num_devices=len(devices))
  info = data.info
  if info.specialist is not None:
    specialist_groups.check_same_group(workdir, info.specialist)
  steps_per_epoch = max(info.num_train_examples // config.batch_size, 1)
  total_steps = (config.num_train_steps if config.num_train_steps > 0 else
                 int(math.ceil(config.num_epochs * steps_per_epoch)))
  model = models.get_model(config.model, info.num_classes,
                           dtype=DTYPES[config.dtype])
  tx, schedule = make_optimizer(config, total_steps)
  teacher = teachers.build(
      config, info, DTYPES[config.distill.teacher_dtype or config.dtype],
      mesh=mesh)
  teacher_variables = (None if teacher is None else jax.device_put(
      teacher.variables,
      teachers.teacher_shardings(teacher.variables, mesh)
      if config.distill.shard_teacher else NamedSharding(mesh, P())))
  # Feature names and shapes are refused here, before anything trains.
  feature_shapes = objective.check_feature_shapes(
      config, info.num_classes, info.image_shape, info.num_train_examples)
  init = functools.partial(
      init_state, model, tx, image_shape=info.image_shape,
      distill=config.distill, num_classes=info.num_classes,
      teacher_feature_shapes=feature_shapes and feature_shapes[1],
      num_train_examples=info.num_train_examples)
  abstract = jax.eval_shape(init, jax.random.key(config.seed))
  run = _Run(
      config=config, workdir=workdir, devices=devices, mesh=mesh,
      is_chief=is_chief, config_json=config_json, info=info,
      steps_per_epoch=steps_per_epoch, total_steps=total_steps,
      eval_every=(config.eval_every_steps if config.eval_every_steps > 0
                  else steps_per_epoch),
      model=model, tx=tx, schedule=schedule, teacher=teacher,
      teacher_variables=teacher_variables, init=init, abstract=abstract,
      state_sharding=state_shardings(abstract, mesh, config.distill))
  return run, data, latest or 0


def _restore(run: _Run, mngr, topology: dict[str, int]
             ) -> tuple[TrainState, dict[str, Any], list[dict[str, Any]]]:
  """(state, the restored checkpoint's meta or {}, the topology changes):
  the newest checkpoint that restores, else a fresh state (warm-started
  from `config.init_from`)."""
  config = run.config
  abstract = jax.tree.map(
      lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
      run.abstract, run.state_sharding)
  restored = checkpointing.restore(mngr, abstract, run.workdir,
                                   move_broken=run.is_chief)
  if restored is not None:
    state, resumed = restored
  else:
    resumed = {}
    state = jax.jit(run.init, out_shardings=run.state_sharding)(
        jax.random.key(config.seed))
    if config.init_from:
      params, batch_stats = warm_start.warm_start(
          config.init_from, state.params, state.batch_stats,
          run.info.class_names)
      state = jax.device_put(state.replace(
          params=params, batch_stats=batch_stats,
          opt_state={**state.opt_state, 'student': run.tx.init(params)}),
                             run.state_sharding)
  changes = _resume_checks(run.workdir, resumed, config, run.teacher,
                           topology)
  return state, resumed, changes


def _compile(run: _Run):
  """(step_fn, eval_fn, prefetch): the jitted step (state donated) and eval
  step, and what turns host batches into arrays on the mesh."""
  replicated = NamedSharding(run.mesh, P())
  step_fn = jax.jit(
      functools.partial(train_step, model=run.model, tx=run.tx,
                        schedule=run.schedule, teacher=run.teacher,
                        distill=run.config.distill,
                        steps_per_epoch=run.steps_per_epoch),
      out_shardings=(run.state_sharding, replicated), donate_argnums=0)
  eval_fn = jax.jit(functools.partial(
      eval_step, model=run.model, teacher=run.teacher,
      ensemble_method=run.config.distill.ensemble_method),
                    out_shardings=replicated)
  add_teacher_logits = (None if run.teacher is None
                        else run.teacher.host_lookup)

  def prefetch(it, first_step=None):
    if add_teacher_logits is not None and first_step is None:
      it = map(add_teacher_logits, it)
    elif add_teacher_logits is not None:  # Train: views are keyed by step.
      it = (add_teacher_logits(b, step=s) for s, b in enumerate(it, first_step))
    # Ids are host-side strings: they key logits caches, never reach devices.
    it = ({k: v for k, v in b.items() if k != 'id'} for b in it)
    return input_pipeline.prefetch_to_mesh(it, run.mesh)
  return step_fn, eval_fn, prefetch


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                        devices=None, overwrite_finished: bool = False
                        ) -> dict[str, Any]:
  run, data, start_step = _setup(config, workdir, devices, overwrite_finished)
  pinned: set[int] = set()  # Steps kept out of rotation (divergence).
  mngr = checkpointing.manager(workdir, config.keep_checkpoints, pinned)
  topology = dict(process_count=jax.process_count(),
                  device_count=len(run.devices))
  state, resumed, topology_changes = _restore(run, mngr, topology)
  if int(jax.device_get(state.step)) != start_step:
    # A damaged newest checkpoint was skipped: the stream restarts where
    # the restored one stopped.
    start_step = int(jax.device_get(state.step))
    data = run.datasets(start_step)
  if run.is_chief:
    info = run.info
    rundir.write_config(workdir, run.config_json)
    rundir.write_run_info(
        workdir, model_spec=config.model, num_classes=info.num_classes,
        class_names=info.class_names, image_shape=info.image_shape,
        dataset=config.dataset, final_step=run.total_steps,
        specialist=info.specialist)
  loop = _Loop(run, data, state, mngr, pinned, resumed, topology,
               topology_changes, start_step)
  try:
    loop.train()
    return loop.finish()
  except BaseException:
    loop.bar.close()  # Ends the progress line before the error is shown.
    raise
  finally:
    mngr.close()  # Waits for any save in flight: it ends committed.


class _Loop:
  """The training loop of one run: steps, logs, evals, checkpoints, and the
  health of the run (`kd_jax.divergence`) that they feed."""

  def __init__(self, run: _Run, data, state: TrainState, mngr,
               pinned: set[int], resumed: dict[str, Any],
               topology: dict[str, int], topology_changes, start_step: int):
    self.run, self.data, self.state, self.mngr = run, data, state, mngr
    self.pinned, self.resumed, self.start_step = pinned, resumed, start_step
    self.topology, self.topology_changes = topology, topology_changes
    config, workdir = run.config, run.workdir
    self.step_fn, self.eval_fn, self.prefetch = _compile(run)
    self.writer = metric_writers.create_default_writer(
        workdir, just_logging=not run.is_chief)
    if start_step == 0:
      self.writer.write_hparams({k: v for k, v in config.to_dict().items()
                                 if isinstance(v, (int, float, str, bool))})
    self.report = periodic_actions.ReportProgress(
        num_train_steps=run.total_steps, writer=self.writer)
    self.fingerprint = checkpointing.config_fingerprint(run.config_json)
    logging.info('Training %s for %d steps (from step %d) on %d devices.',
                 config.model.name, run.total_steps, start_step,
                 len(run.devices))
    # The parameters' norm before the run's first step: divergence's
    # reference.
    initial_norm = resumed.get('reference_param_norm')
    if initial_norm is None:
      initial_norm = float(jax.jit(optax.tree.norm)(state.params))
    self.health = (divergence.Health.from_meta(resumed, initial_norm)
                   if resumed else divergence.Health(param_norm=initial_norm))
    if self.health.last_healthy_step is not None:
      pinned.add(self.health.last_healthy_step)
    self.pending: list[dict[str, jax.Array]] = []
    self.window: list[dict[str, Any]] = []  # Fetched since the last log.
    self.eval_results: dict[str, Any] = {}
    self.train_start = time.time()
    self.seconds_before = float(resumed.get('train_seconds', 0.0))
    self.collapse_warnings = list(resumed.get('collapse_warnings', []))
    self.best_accuracy = float(resumed.get('best_train_accuracy', 0.0))
    self.collapsed = False
    self.bar = progress.Progress(
        run.total_steps, start_step, enabled=run.is_chief,
        label=os.path.basename(os.path.normpath(workdir)))

  def train(self) -> None:
    """Every step from the start step to the last."""
    config, total = self.run.config, self.run.total_steps
    train_iter = self.prefetch(self.data.train,
                               first_step=self.start_step + 1)
    for step in range(self.start_step + 1, total + 1):
      batch = next(train_iter)
      log_step = step % config.log_every_steps == 0 or step == total
      save_step = step % config.checkpoint_every_steps == 0 or step == total
      # A checkpoint step measures the norms too, to check them first.
      self.state, measurements = self.step_fn(
          self.state, batch, self.run.teacher_variables,
          log_step or save_step)
      self.pending.append(measurements)
      self.report(step)
      self.bar.update(step)
      if log_step or save_step:
        host = self._fetch(step)
      if log_step:
        self._log(step)
      if log_step or save_step:
        divergence.check(self.health, step,
                         float(np.mean([m['loss_total'] for m in host])),
                         float(host[-1]['param_norm']), self.collapsed)
      if step % self.run.eval_every == 0 or step == total:
        self.eval_results = self._evaluate(step)
      if save_step:
        self._save(step)

  def _fetch(self, step: int) -> list[dict[str, Any]]:
    """The measurements since the last fetch, on the host; stops a run whose
    loss or parameter norm is no longer finite."""
    host = jax.device_get(self.pending)
    self.pending = []
    bad = divergence.observe(self.health, step - len(host) + 1, host,
                             run_start=self.start_step == 0)
    if bad is not None:
      raise divergence.stop(*bad, self.mngr, self.run.workdir,
                            self.run.config, self.health, self.start_step,
                            self.run.is_chief)
    self.window += host
    return host

  def _log(self, step: int) -> None:
    """Writes the window's measurements (averaged; the norms are this
    step's) and checks the train accuracy for a collapse."""
    window = self.window
    if 'accuracy' in window[0]:
      self.best_accuracy, self.collapsed = _collapse(
          step, float(np.mean([m['accuracy'] for m in window])),
          self.best_accuracy, self.collapsed, self.collapse_warnings)
    self.writer.write_scalars(step, {f'train/{k}': float(
        window[-1][k] if k in LOG_STEP_MEASUREMENTS else
        np.mean([m[k] for m in window])) for k in window[0]})
    self.bar.show(loss=float(np.mean([m['loss_total'] for m in window])))
    self.window = []

  def _evaluate(self, step: int) -> dict[str, Any]:
    results = {}
    for split, make_iter in self.data.eval.items():
      r = evaluate(self.eval_fn, self.state, make_iter(),
                   self.run.teacher_variables, self.prefetch)
      results[split] = r
      self.writer.write_scalars(step,
                                {f'{split}/{k}': v for k, v in r.items()})
      self.bar.show(**{f'{split}_acc': f'{100 * r["accuracy"]:.2f}%'})
    return results

  def _save(self, step: int) -> None:
    """Checkpoints the state, keeping the last healthy checkpoint out of the
    rotation until a later one is healthy."""
    health = self.health
    divergence.pin(health, self.pinned, self.mngr, step)
    teacher = self.run.teacher
    checkpointing.save(self.mngr, self.state, dict(
        config_fingerprint=self.fingerprint,
        examples_seen=step * self.run.config.batch_size,
        topology=self.topology, topology_changes=self.topology_changes,
        teacher_fingerprint=None if teacher is None else teacher.fingerprint,
        train_seconds=self.seconds_before + time.time() - self.train_start,
        best_train_accuracy=self.best_accuracy,
        collapse_warnings=self.collapse_warnings, **health.meta()))

  def finish(self) -> dict[str, Any]:
    """Ends the run: waits for the saves, drops checkpoints no longer
    needed, evaluates if no step did, and writes summary.json."""
    run, health, workdir = self.run, self.health, self.run.workdir
    self.mngr.wait_until_finished()
    if not self.eval_results:
      self.eval_results = self._evaluate(run.total_steps)
    self.writer.flush()
    self.bar.close()
    divergence.release(health, self.pinned, self.mngr,
                       run.config.keep_checkpoints, workdir)
    summary = self._summary()
    if run.is_chief:
      rundir.write_summary(workdir, summary)
    return summary

  def _summary(self) -> dict[str, Any]:
    run, config, state = self.run, self.run.config, self.state
    params = jax.device_get(state.params)
    summary = dict(
        step=run.total_steps, model=config.model.name,
        teacher_source=config.distill.teacher_source,
        teachers=teachers.describe(config, run.teacher),
        num_params=models.param_count(params),
        param_bytes=models.param_bytes(params),
        train_seconds=self.seconds_before + time.time() - self.train_start,
        eval=self.eval_results, collapse_warnings=self.collapse_warnings)
    finished = (rundir.read_summary(run.workdir)
                if self.start_step == run.total_steps else None)
    if finished and 'train_seconds' in finished:
      # A rerun of a finished run trains nothing: keep the run's own time.
      summary['train_seconds'] = finished['train_seconds']
    if self.topology_changes:
      summary['topology_changes'] = self.topology_changes
    if self.health.warnings:
      summary['divergence_warnings'] = self.health.warnings
    if 'connectors' in state.opt_state:
      # Feature connectors train with the student but are not part of it.
      summary['num_connector_params'] = models.param_count(
          state.connector_params)
    return summary
