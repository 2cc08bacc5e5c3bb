r"""The per-step objective: what a training step minimises, in one place.

`train.train_step` is forward -> objective -> update. This module turns what
the teachers produced (dense logits ``[K, B, C]`` of K teachers, or a top-k
cache's arrays) into soft targets once per step (:func:`teacher_targets`),
and the student's logits, those targets and the labels into the loss and its
terms (:func:`loss`):

.. math::
  L = w_\text{soft}\, s(e)\, \overline{\ell_\text{soft}}
    + w_\text{hard}\, \overline{\ell_\text{hard}}

with the bar the mean over the batch's valid examples, the soft term one of
:data:`SOFT_LOSSES` (``'kl'``, ``'soft_ce'``, ``'logit_mse'``: Hinton et al.
2015; ``'dkd'``: Zhao et al. 2022; ``'dist'``: Huang et al. 2022, a
batch-level loss), optionally on standardized logits (Sun et al. 2024), at a
fixed or learned temperature (CTKD, Li et al. 2023), and :math:`s(e)` DKD's
linear warm-up over the first epochs (1 otherwise). The weights are
``config.distill.soft_weight`` / ``hard_weight`` when set, else ``alpha`` and
``1 - alpha``: every config written before these fields trains exactly as it
did.

Teachers: one teacher's logits are the targets; several are combined once
(`losses.combine_teachers`, by ``ensemble_method`` with their weights) at
``T = 1`` by default (``ensemble_temperature='one'``: the ensemble's own
predictive distribution, which an exported logits cache also stores, so
online and cached ensembles train the same student) or at the distillation
temperature (``'distillation'``: Hinton's average of the tempered
distributions); ``'sum_losses'`` sums the per-teacher soft terms with the
teachers' weights instead.

Learned temperature (CTKD): a global temperature (one parameter) or an
instance-wise one (a small MLP of both sides' logits) lives in the train
state beside the student (``state['temperature_params']`` and its optimizer
state ``state['temperature_opt_state']``, absent when
``config.distill.ctkd='none'``, so older checkpoints keep their layout). It
is trained by the same optimizer through :func:`gradient_reversal`: it
*ascends* the distillation loss, with a strength that follows the authors'
cosine curriculum (:func:`curriculum_strength`), so the student meets
ever harder temperatures. It is checkpointed with the training state, never
with the model, so a run used as a teacher or exported restores the student
alone.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kd_jax import losses

SOFT_LOSSES = losses.SOFT_LOSSES + ('dkd', 'dist')
CTKD_MODES = ('none', 'global', 'instance')
ENSEMBLE_METHODS = losses.COMBINE_METHODS + ('sum_losses',)
ENSEMBLE_TEMPERATURES = ('one', 'distillation')
TEMPERATURE_KEYS = ('temperature_params', 'temperature_opt_state')


# ----------------------------------------------------------------------------
# Config checks.
# ----------------------------------------------------------------------------


def _weights(distill) -> tuple[float, float]:
  """(soft weight, hard weight): explicit, or alpha and 1 - alpha."""
  soft, hard = distill.get('soft_weight'), distill.get('hard_weight')
  if soft is None and hard is None:
    # 1 - alpha in float32, as `losses.distillation_loss` has always formed it.
    alpha = np.float32(distill.alpha)
    return float(alpha), float(np.float32(1.0) - alpha)
  return float(soft), float(hard)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad objective field and the fix.

  Checks `config.distill`'s loss, weights, DKD / DIST coefficients, logit
  standardization and CTKD settings against each other and against the
  teacher source and the data (mixup labels).
  """
  d = config.distill
  soft_weight, hard_weight = d.get('soft_weight'), d.get('hard_weight')
  if (soft_weight is None) != (hard_weight is None):
    raise ValueError(
        f'config.distill.soft_weight={soft_weight} and '
        f'config.distill.hard_weight={hard_weight}: set both (the loss is '
        f'soft_weight * soft + hard_weight * hard), or neither to use alpha.')
  if soft_weight is not None:
    for name, value in (('soft_weight', soft_weight),
                        ('hard_weight', hard_weight)):
      if not (math.isfinite(value) and value >= 0):
        raise ValueError(f'config.distill.{name}={value} must be a '
                         f'non-negative finite number.')
    if d.alpha != 0:
      raise ValueError(
          f'config.distill.alpha={d.alpha} and soft_weight/hard_weight are '
          f'both set: the explicit weights replace alpha; set '
          f'config.distill.alpha=0.')
    if d.teacher_source == 'none' and soft_weight != 0:
      raise ValueError(
          f'config.distill.soft_weight={soft_weight} weights a teacher term, '
          f'but config.distill.teacher_source is "none": set soft_weight=0 '
          f'(and hard_weight=1), or name a teacher source.')
  if d.soft not in SOFT_LOSSES:
    raise ValueError(f'config.distill.soft={d.soft!r}; choose one of '
                     f'{SOFT_LOSSES}.')
  # The soft loss is checked above, against this module's wider list.
  losses.validate_distillation_args(d.temperature, d.alpha, 'kl', d.hard)
  if d.ensemble_method not in ENSEMBLE_METHODS:
    raise ValueError(f'config.distill.ensemble_method={d.ensemble_method!r}; '
                     f'choose one of {ENSEMBLE_METHODS}.')
  if d.ensemble_temperature not in ENSEMBLE_TEMPERATURES:
    raise ValueError(
        f'config.distill.ensemble_temperature={d.ensemble_temperature!r}; '
        f'choose "one" (combine the teachers at T=1, as an exported cache '
        f'does) or "distillation" (average their tempered distributions).')
  uses_teacher = _weights(d)[0] > 0 and d.teacher_source != 'none'
  for name in ('dkd_alpha', 'dkd_beta', 'dist_beta', 'dist_gamma',
               'dkd_warmup_epochs'):
    value = d[name]
    if not (math.isfinite(value) and value >= 0):
      raise ValueError(f'config.distill.{name}={value} must be a '
                       f'non-negative finite number.')
  if d.soft == 'dkd' and uses_teacher and config.get('mixup_alpha', 0) > 0:
    raise ValueError(
        f'config.distill.soft="dkd" with config.mixup_alpha='
        f'{config.mixup_alpha}: DKD splits off the target class, which a '
        f'mixed example does not have; set mixup_alpha=0 or use soft="kl".')
  if d.ctkd not in CTKD_MODES:
    raise ValueError(f'config.distill.ctkd={d.ctkd!r}; choose one of '
                     f'{CTKD_MODES}.')
  if d.ctkd != 'none':
    if d.teacher_source == 'none' or _weights(d)[0] == 0:
      raise ValueError(
          f'config.distill.ctkd={d.ctkd!r} learns the distillation '
          f'temperature, but no soft term is trained (teacher_source='
          f'{d.teacher_source!r}, soft weight {_weights(d)[0]}): set '
          f'ctkd="none" or distil from a teacher.')
    if d.soft == 'logit_mse':
      raise ValueError('config.distill.ctkd needs a tempered soft loss; '
                       'logit_mse has no temperature: use soft="kl".')
    if d.ctkd == 'instance' and d.soft == 'dist':
      raise ValueError(
          'config.distill.ctkd="instance" with soft="dist": DIST is one '
          'batch-level value, with no per-example temperature; use '
          'ctkd="global".')
    if d.ctkd == 'instance' and d.ensemble_method == 'sum_losses':
      raise ValueError(
          'config.distill.ctkd="instance" reads the combined teacher logits, '
          'which ensemble_method="sum_losses" does not form; use mean_probs '
          'or mean_log_probs, or ctkd="global".')
    if d.ensemble_temperature == 'distillation':
      raise ValueError(
          'config.distill.ctkd learns the temperature inside the step, after '
          'the teachers are combined: set ensemble_temperature="one".')
    if not (0 < d.ctkd_min_temperature and 0 < d.ctkd_temperature_range):
      raise ValueError(
          f'config.distill.ctkd_min_temperature={d.ctkd_min_temperature} and '
          f'ctkd_temperature_range={d.ctkd_temperature_range} must be > 0 '
          f'(the authors use 1 and 20: T in (1, 21)).')
    if not d.ctkd_strength_epochs > 0:
      raise ValueError(
          f'config.distill.ctkd_strength_epochs={d.ctkd_strength_epochs} '
          f'must be > 0 (the authors ramp the strength over 10 epochs).')


# ----------------------------------------------------------------------------
# Teachers -> targets, once per step.
# ----------------------------------------------------------------------------


class Targets(NamedTuple):
  """What the soft term compares the student with.

  Attributes:
    logits: ``[B, C]`` (one teacher, or the combined ensemble), ``[K, B, C]``
      for ``ensemble_method='sum_losses'``, or None (no teacher).
    weights: ``[K]`` per-teacher weights of ``'sum_losses'``, else None.
    topk: ``(topk_logits [B, k], topk_indices [B, k], rest_mass [B])`` from a
      top-k cache, else None.
    prediction: ``[B]`` class the teachers predict (argmax of ``logits``;
      of their mean probabilities for ``'sum_losses'``), or None.
  """
  logits: jax.Array | None = None
  weights: jax.Array | None = None
  topk: tuple[jax.Array, jax.Array, jax.Array] | None = None
  prediction: jax.Array | None = None


def combine(teacher_logits: jax.Array, distill, weights) -> jax.Array:
  """[K, B, C] teachers -> [B, C] logits of the combination the config names.

  `ensemble_method` (mean_probs / mean_log_probs) at T = 1, or at
  `distill.temperature` when `ensemble_temperature='distillation'`; the
  result tempered at that T gives the combined distribution.
  """
  temperature = (1.0 if distill.ensemble_temperature == 'one'
                 else distill.temperature)
  return losses.combine_teachers(teacher_logits, distill.ensemble_method,
                                 weights=jnp.asarray(weights),
                                 temperature=temperature)


def teacher_targets(teacher_logits: jax.Array | None,
                    batch: dict[str, Any], distill, weights) -> Targets:
  """The soft targets of one step, the teachers combined once.

  Args:
    teacher_logits: ``[K, B, C]`` from `teachers.Teacher.forward`, or None.
    batch: the step's batch; a top-k cache's ``teacher_topk_logits``,
      ``teacher_topk_indices`` and ``teacher_rest_mass`` are read from it.
    distill: ``config.distill``.
    weights: the K teachers' weights.
  """
  if teacher_logits is None:
    return Targets()
  topk = None
  if 'teacher_topk_indices' in batch:
    topk = (batch['teacher_topk_logits'], batch['teacher_topk_indices'],
            batch['teacher_rest_mass'])
  if teacher_logits.shape[0] == 1:
    logits = teacher_logits[0]
    return Targets(logits=logits, topk=topk,
                   prediction=jnp.argmax(logits, -1))
  if distill.ensemble_method == 'sum_losses':
    mean = losses.combine_teachers(teacher_logits, 'mean_probs',
                                   weights=jnp.asarray(weights))
    return Targets(logits=teacher_logits, weights=jnp.asarray(weights),
                   topk=topk, prediction=jnp.argmax(mean, -1))
  logits = combine(teacher_logits, distill, weights)
  return Targets(logits=logits, topk=topk, prediction=jnp.argmax(logits, -1))


# ----------------------------------------------------------------------------
# Schedules over training: DKD's warm-up, CTKD's curriculum.
# ----------------------------------------------------------------------------


def _epoch_index(epoch: jax.Array) -> jax.Array:
  """1 during the first epoch, 2 in the second...: the authors' epoch count."""
  return jnp.floor(epoch) + 1.0


def warmup_factor(epoch: jax.Array | None, warmup_epochs: float) -> jax.Array:
  r"""DKD's warm-up of the soft term: :math:`\min(e / E_w, 1)`, e counted
  from 1 as mdistiller does (the first epoch trains with weight 1/E_w).

  Example:
    >>> from kd_jax import objective
    >>> [round(float(objective.warmup_factor(e, 20)), 3)
    ...  for e in (0.0, 0.5, 19.0, 30.0)]
    [0.05, 0.05, 1.0, 1.0]
  """
  if warmup_epochs <= 0:
    return jnp.ones(())
  if epoch is None:
    raise ValueError(
        'config.distill.dkd_warmup_epochs > 0 needs the epoch: pass '
        'steps_per_epoch to train.train_step.')
  return jnp.minimum(_epoch_index(jnp.asarray(epoch, jnp.float32))
                     / warmup_epochs, 1.0)


def curriculum_strength(epoch: jax.Array, *, start: float = 0.0,
                        end: float = 1.0, epochs: float = 10.0) -> jax.Array:
  r"""CTKD's cosine curriculum of the gradient-reversal strength.

  .. math::
    \lambda(e) = \lambda_0 + (\lambda_1 - \lambda_0)
      \frac{1 - \cos(\pi \min(e, E) / E)}{2}

  with e the epoch counted from 1 as in the authors' loop; it rises from
  :math:`\lambda_0` to :math:`\lambda_1` over E epochs, then stays.

  Example:
    >>> from kd_jax import objective
    >>> [round(float(objective.curriculum_strength(e, epochs=10)), 3)
    ...  for e in (0.0, 4.0, 9.0, 50.0)]
    [0.024, 0.5, 1.0, 1.0]

  References:
    Li et al., `Curriculum Temperature for Knowledge Distillation
    <https://arxiv.org/abs/2211.16231>`_, AAAI 2023, Eq. 9.
  """
  e = jnp.minimum(_epoch_index(jnp.asarray(epoch, jnp.float32)), epochs)
  return start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * e / epochs))


@jax.custom_vjp
def gradient_reversal(x: jax.Array, strength: jax.Array) -> jax.Array:
  r"""Identity forward; multiplies the gradient by :math:`-\lambda` backward.

  Whatever sits below it ascends the loss that a descent step lowers
  (Ganin and Lempitsky, 2015): CTKD's temperature maximises the
  distillation loss that the student minimises.

  Example:
    >>> import jax
    >>> from kd_jax import objective
    >>> float(jax.grad(lambda x: 3.0 * objective.gradient_reversal(x, 0.5))(
    ...     1.0))
    -1.5
  """
  del strength
  return x


def _reversal_fwd(x, strength):
  return x, strength


def _reversal_bwd(strength, g):
  strength = jnp.asarray(strength)
  return (-strength.astype(g.dtype) * g, jnp.zeros_like(strength))


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


class GlobalTemperature(nn.Module):
  """One raw temperature parameter, initialised at 1 as the authors do."""

  @nn.compact
  def __call__(self, student_logits, teacher_logits):
    del student_logits, teacher_logits
    return self.param('raw', nn.initializers.ones, ())


class InstanceTemperature(nn.Module):
  """A raw temperature per example: an MLP of both sides' logits."""
  hidden: int = 256

  @nn.compact
  def __call__(self, student_logits, teacher_logits):
    x = jnp.concatenate([student_logits, teacher_logits], axis=-1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[..., 0]


def _temperature_module(distill) -> nn.Module:
  if distill.ctkd == 'global':
    return GlobalTemperature()
  return InstanceTemperature(hidden=int(distill.ctkd_hidden))


def init_temperature_state(distill, num_classes: int,
                           tx: optax.GradientTransformation,
                           rng: jax.Array) -> dict[str, Any]:
  """The train-state entries of a learned temperature ({} when ctkd='none')."""
  if distill.ctkd == 'none':
    return {}
  dummy = jnp.zeros((1, num_classes), jnp.float32)
  params = _temperature_module(distill).init(rng, dummy, dummy)['params']
  return dict(temperature_params=params,
              temperature_opt_state=tx.init(params))


def learned_temperature(distill, temperature_params, student_logits,
                        targets: Targets, epoch) -> tuple[jax.Array,
                                                          jax.Array]:
  r"""CTKD's temperature for this step and the reversal strength.

  :math:`T = T_\min + T_\text{range}\, \sigma(\theta)`, with the raw
  :math:`\theta` (a scalar, or one per example) behind
  :func:`gradient_reversal` of strength :func:`curriculum_strength`. The
  instance-wise module reads both sides' logits without passing gradients
  into them.

  Returns:
    (temperature: a scalar or ``[B]``, strength: a scalar).
  """
  if epoch is None:
    raise ValueError('config.distill.ctkd needs the epoch: pass '
                     'steps_per_epoch to train.train_step.')
  strength = curriculum_strength(
      epoch, start=distill.ctkd_strength_start, end=distill.ctkd_strength_end,
      epochs=distill.ctkd_strength_epochs)
  raw = _temperature_module(distill).apply(
      {'params': temperature_params},
      jax.lax.stop_gradient(student_logits.astype(jnp.float32)),
      jax.lax.stop_gradient(targets.logits))
  raw = gradient_reversal(raw, strength)
  temperature = (distill.ctkd_min_temperature
                 + distill.ctkd_temperature_range * jax.nn.sigmoid(raw))
  return temperature, strength


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


def _soft_mean(student, teacher, labels, valid, distill, temperature,
               axis_name) -> jax.Array:
  """The soft term, averaged over valid examples (DIST: its batch value)."""
  if distill.logit_standardization:
    student = losses.logit_standardize(student)
    teacher = losses.logit_standardize(teacher)
  scale = None
  if jnp.ndim(temperature) > 0:
    # A temperature per example: KL_T(z, v) = KL_1(z / T, v / T), times T^2.
    per_example = temperature[..., None]
    student, teacher = student / per_example, teacher / per_example
    scale, temperature = jnp.square(temperature), 1.0
  soft = distill.soft
  if soft == 'dist':
    return losses.dist(student, teacher, beta=distill.dist_beta,
                       gamma=distill.dist_gamma, temperature=temperature,
                       where=valid, axis_name=axis_name)
  if soft == 'kl':
    values = losses.kl_divergence(student, teacher, temperature)
  elif soft == 'soft_ce':
    values = losses.soft_cross_entropy(student, teacher, temperature)
  elif soft == 'logit_mse':
    values = losses.logit_mse(student, teacher)
  else:
    values = losses.dkd(student, teacher, labels, alpha=distill.dkd_alpha,
                        beta=distill.dkd_beta, temperature=temperature,
                        where=valid)
  if scale is not None:
    values = values * scale
  return losses.masked_mean(values, valid, axis_name)


def _topk_soft_mean(student, topk, valid, distill, temperature,
                    axis_name) -> jax.Array:
  if distill.soft != 'kl':
    raise ValueError(
        f'config.distill.soft={distill.soft!r} with a top-k logits cache: a '
        f'top-k cache keeps k classes and one rest bucket, and '
        f'{distill.soft} needs every class\'s probability (DKD\'s '
        f'non-target distribution, DIST\'s correlations); the top-k + rest '
        f'KL is the only exact loss. Export a dense cache, or set '
        f'soft="kl".')
  if distill.logit_standardization or temperature is not None:
    raise ValueError(
        'config.distill.logit_standardization / ctkd with a top-k logits '
        'cache: standardizing needs all C logits and the rest mass is '
        'stored at one fixed temperature; export a dense cache.')
  topk_logits, topk_indices, rest_mass = topk
  values = losses.topk_kl_divergence(student, topk_logits, topk_indices,
                                     rest_mass, distill.temperature,
                                     where=valid)
  return losses.masked_mean(values, valid, axis_name)


def loss(student_logits: jax.Array, targets: Targets, labels: jax.Array,
         mask: jax.Array, distill, *, label_probs: jax.Array | None = None,
         epoch: jax.Array | None = None,
         temperature: jax.Array | None = None,
         axis_name: Any = None) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The step's loss and its terms.

  Args:
    student_logits: ``[B, C]``.
    targets: from :func:`teacher_targets`.
    labels: ``[B]`` integer labels (DKD's target class).
    mask: ``[B]`` bool, False for padding.
    distill: ``config.distill``.
    label_probs: ``[B, C]`` label distributions (mixup) for the hard term,
      else the hard term uses ``labels``.
    epoch: fractional epochs done (step / steps_per_epoch), for DKD's
      warm-up; may be None without one.
    temperature: a learned temperature (scalar or ``[B]``) replacing
      ``distill.temperature`` in the soft term.
    axis_name: mapped axis name inside ``shard_map``.

  Returns:
    ``(loss, terms)``; ``terms`` holds the scalars ``'soft'``, ``'hard'``
    and ``'total'`` (a term without its inputs reports 0).
  """
  valid = jnp.asarray(mask, bool)
  soft_weight, hard_weight = _weights(distill)
  zero = jnp.zeros((), jnp.float32)
  soft = hard = zero
  if targets.logits is not None or targets.topk is not None:
    t = distill.temperature if temperature is None else temperature
    if targets.topk is not None:
      soft = _topk_soft_mean(student_logits, targets.topk, valid, distill,
                             temperature, axis_name)
    elif targets.weights is not None:
      per_teacher = jax.vmap(lambda teacher: _soft_mean(
          student_logits, teacher, labels, valid, distill, t, axis_name))(
              targets.logits)
      soft = jnp.sum(targets.weights * per_teacher)
    else:
      soft = _soft_mean(student_logits, targets.logits, labels, valid,
                        distill, t, axis_name)
  elif soft_weight > 0:
    raise ValueError(
        f'the soft term has weight {soft_weight} but the step has no teacher '
        f'targets; name a teacher source or set its weight to 0.')
  hard_labels = labels if label_probs is None else label_probs
  if distill.hard == 'ce':
    values = losses.cross_entropy(student_logits, hard_labels,
                                  distill.label_smoothing)
  else:
    values = losses.mse_to_labels(student_logits, hard_labels,
                                  distill.label_smoothing)
  hard = losses.masked_mean(values, valid, axis_name)

  total = zero
  if soft_weight > 0:
    weight = soft_weight
    if distill.soft == 'dkd':
      weight = soft_weight * warmup_factor(epoch, distill.dkd_warmup_epochs)
    total = total + weight * soft
  if hard_weight > 0:
    total = total + hard_weight * hard
  return total, {'soft': soft, 'hard': hard, 'total': total}
