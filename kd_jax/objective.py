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

DeiT's hard-label distillation (``soft='deit_hard'``, Touvron et al. 2021):
the soft term is the cross-entropy of the student's distillation-token head
(``distillation_logits``) with the teachers' argmax, the hard term the class
head's with the labels.

Feature terms (``config.distill.features``, :func:`feature_terms`): each
names a method of :data:`FEATURE_METHODS`, student and teacher features and
a weight; :func:`feature_loss` adds their weighted sum to the loss. Their
connectors (:class:`FeatureConnectors`) and CRD's memory banks live in the
train state like the learned temperature (:data:`FEATURE_KEYS`,
:func:`init_feature_state`); :func:`check_feature_shapes` refuses, before
training, features a model lacks or shapes no connector maps.
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

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax import losses
from kd_jax import rundir
from kd_jax.models import features as model_features

SOFT_LOSSES = losses.SOFT_LOSSES + ('dkd', 'dist', 'deit_hard')
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
  validate_features(config)


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
         distillation_logits: jax.Array | None = None,
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
    distillation_logits: ``[B, C]``, the distillation-token head's logits
      (the student's feature 'dist_logits'), for ``soft='deit_hard'``:
      its soft term is the cross-entropy of that head with the teachers'
      argmax (Touvron et al. 2021), the hard term the class head's.
    axis_name: mapped axis name inside ``shard_map``.

  Returns:
    ``(loss, terms)``; ``terms`` holds the scalars ``'soft'``, ``'hard'``
    and ``'total'`` (a term without its inputs reports 0).
  """
  valid = jnp.asarray(mask, bool)
  soft_weight, hard_weight = _weights(distill)
  zero = jnp.zeros((), jnp.float32)
  soft = hard = zero
  if distill.soft == 'deit_hard' and targets.prediction is not None:
    if distillation_logits is None:
      raise ValueError(
          "config.distill.soft='deit_hard' needs the student's "
          "distillation-token logits (feature 'dist_logits'): pass "
          'distillation_logits, from a vit_* student with distill_token=True.')
    soft = losses.masked_mean(
        losses.cross_entropy(distillation_logits, targets.prediction), valid,
        axis_name)
  elif targets.logits is not None or targets.topk is not None:
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


# ----------------------------------------------------------------------------
# Feature terms: the student matches what the teacher computes inside.
# ----------------------------------------------------------------------------

# Each method's options and their defaults (RepDistiller's settings).
FEATURE_METHODS: dict[str, dict[str, Any]] = {
    'fitnet': {},
    'at': {'p': 2},
    'sp': {},
    'cc': {'dim': 128},
    'vid': {'mid_channels': None, 'init_pred_var': 5.0, 'eps': 1e-5},
    'rkd': {'distance_weight': 25.0, 'angle_weight': 50.0},
    'pkt': {'eps': 1e-7},
    'crd': {'dim': 128, 'num_negatives': 16384, 'temperature': 0.07,
            'momentum': 0.5, 'exact_negatives': True},
}
FEATURE_TERM_KEYS = ('method', 'student', 'teacher', 'weight')
# Train-state entries of feature distillation, absent without feature terms.
FEATURE_KEYS = ('connector_params', 'connector_batch_stats',
                'connector_opt_state', 'crd_state')


class FeatureTerm(NamedTuple):
  """One normalised entry of ``config.distill.features`` (hashable).

  Attributes:
    method: one of :data:`FEATURE_METHODS`.
    student: the student's feature names, one per pair.
    teacher: the teacher's feature names, paired with ``student``.
    weight: the term's weight in the loss.
    options: ``(name, value)`` pairs, the method's defaults filled in.
  """
  method: str
  student: tuple[str, ...]
  teacher: tuple[str, ...]
  weight: float
  options: tuple[tuple[str, Any], ...]

  def option(self, name: str) -> Any:
    return dict(self.options)[name]


def _names(value, field: str) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value or ())
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(
        f'{field}={value!r} must name one feature or a tuple of them, e.g. '
        f"'embedding' or ('stage1', 'stage2', 'stage3'); "
        f'kd_jax/models/features.py lists each model\'s features.')
  return names


def feature_terms(distill) -> tuple[FeatureTerm, ...]:
  """``config.distill.features`` checked and normalised (no shapes needed).

  Raises:
    ValueError: naming the entry, the bad key or value, and the fix.
  """
  terms = []
  for i, entry in enumerate(distill.get('features', ()) or ()):
    field = f'config.distill.features[{i}]'
    if not hasattr(entry, 'keys'):
      raise ValueError(
          f'{field}={entry!r} must be a dict with keys {FEATURE_TERM_KEYS} '
          f"and method options, e.g. dict(method='at', student='stage1', "
          f"teacher='stage1', weight=1000.0).")
    entry = dict(entry)
    missing = [k for k in FEATURE_TERM_KEYS if k not in entry]
    if missing:
      raise ValueError(f'{field} lacks {missing}; each term needs '
                       f'{FEATURE_TERM_KEYS}.')
    method = entry['method']
    if method not in FEATURE_METHODS:
      raise ValueError(f'{field}.method={method!r}; choose one of '
                       f'{tuple(FEATURE_METHODS)}.')
    defaults = FEATURE_METHODS[method]
    unknown = sorted(set(entry) - set(FEATURE_TERM_KEYS) - set(defaults))
    if unknown:
      raise ValueError(
          f'{field} sets {unknown}, which method {method!r} does not take; '
          f'its options are {sorted(defaults) or "none"}.')
    student = _names(entry['student'], f'{field}.student')
    teacher = _names(entry['teacher'], f'{field}.teacher')
    if len(student) != len(teacher):
      raise ValueError(
          f'{field} pairs {len(student)} student features {student} with '
          f'{len(teacher)} teacher features {teacher}: name as many of each '
          f'(pair i is student[i] with teacher[i]).')
    if method == 'crd' and len(student) != 1:
      raise ValueError(
          f'{field}: crd keeps one memory bank per side; name one student '
          f"and one teacher feature (RepDistiller: 'embedding').")
    weight = entry['weight']
    if isinstance(weight, bool) or not isinstance(weight, (int, float)) or (
        not (math.isfinite(weight) and weight >= 0)):
      raise ValueError(f'{field}.weight={weight!r} must be a non-negative '
                       f'finite number.')
    options = {**defaults, **{k: entry[k] for k in defaults if k in entry}}
    if method == 'crd':
      if not (isinstance(options['num_negatives'], int)
              and options['num_negatives'] >= 1):
        raise ValueError(
            f'{field}.num_negatives={options["num_negatives"]!r} must be a '
            f'positive integer (RepDistiller: 16384; clipped to N - 1).')
      if not 0.0 <= options['momentum'] < 1.0:
        raise ValueError(f'{field}.momentum={options["momentum"]!r} must be '
                         f'in [0, 1) (RepDistiller: 0.5).')
    terms.append(FeatureTerm(method, student, teacher, float(weight),
                             tuple(sorted(options.items()))))
  return tuple(terms)


def validate_features(config: ml_collections.ConfigDict) -> None:
  """Checks the feature terms and DeiT's objective against the run's setup.

  Shapes are checked later, by :func:`check_feature_shapes`.
  """
  d = config.distill
  terms = feature_terms(d)
  if terms:
    if d.teacher_source not in ('online', 'ensemble'):
      raise ValueError(
          f'config.distill.features needs the teacher\'s features, which '
          f'only an online teacher computes (teacher_source='
          f'{d.teacher_source!r}): set teacher_source="online" with one '
          f'entry in config.teachers.')
    if len(config.teachers) != 1:
      raise ValueError(
          f'config.distill.features matches one teacher\'s features, but '
          f'config.teachers holds {len(config.teachers)}: keep one teacher, '
          f'or drop the feature terms.')
  if d.soft == 'deit_hard':
    if not config.model.get('distill_token', False):
      raise ValueError(
          f"config.distill.soft='deit_hard' trains the student's "
          f"distillation-token head on the teacher's argmax, but the student "
          f"{config.model.name!r} has no distillation token: use a vit_* "
          f"student with config.model.distill_token=True, or soft='kl'.")
    if d.teacher_source == 'none':
      raise ValueError("config.distill.soft='deit_hard' needs a teacher: set "
                       'config.distill.teacher_source.')
    if d.ctkd != 'none' or d.logit_standardization:
      raise ValueError(
          "config.distill.soft='deit_hard' learns the teacher's argmax, with "
          'no temperature or logit scale: set ctkd="none" and '
          'logit_standardization=False.')


class FeatureConnectors(nn.Module):
  """Every learned connector of the feature terms, in one params tree.

  Input and output: per term, per pair, ``(student, teacher)`` features;
  out come ``(student, teacher, extra)`` as the term's loss reads them
  (``extra``: VID's per-channel ``log_scale``). Shapes come from the
  features themselves, so a connector is built for the pair it sees.
  """
  terms: tuple[FeatureTerm, ...]

  @nn.compact
  def __call__(self, pairs, train: bool):
    out = []
    for i, term in enumerate(self.terms):
      mapped = []
      for j, (student, teacher) in enumerate(pairs[i]):
        name = f'term{i}_{term.method}{j}'
        extra = None
        if term.method == 'fitnet':
          student = connectors.FitNetRegressor(
              tuple(teacher.shape[1:]), name=name)(student, train)
        elif term.method == 'vid':
          student, extra = connectors.VIDRegressor(
              tuple(teacher.shape[1:]),
              mid_channels=term.option('mid_channels'),
              init_pred_var=term.option('init_pred_var'),
              eps=term.option('eps'), name=name)(student)
        elif term.method in ('cc', 'crd'):
          normalize = term.method == 'crd'
          student = connectors.CRDEmbed(term.option('dim'), normalize,
                                        name=f'{name}_student')(student)
          teacher = connectors.CRDEmbed(term.option('dim'), normalize,
                                        name=f'{name}_teacher')(teacher)
        mapped.append((student, teacher, extra))
      out.append(tuple(mapped))
    return tuple(out)


def _pairs(terms, student_features, teacher_features):
  return tuple(tuple((student_features[s], teacher_features[t])
                     for s, t in zip(term.student, term.teacher))
               for term in terms)


def _crd_entry(term: FeatureTerm, num_examples: int, rng: jax.Array
               ) -> dict[str, jax.Array]:
  dim = term.option('dim')
  student_key, teacher_key = jax.random.split(rng)
  return dict(
      student_memory=feature_losses.crd_memory_init(num_examples, dim,
                                                    student_key),
      teacher_memory=feature_losses.crd_memory_init(num_examples, dim,
                                                    teacher_key),
      # Each example's label, once seen (-1 before): the exact negatives.
      labels=jnp.full((num_examples,), -1, jnp.int32),
      # Z of both sides, set from the first step's scores (0: not yet).
      normalizers=jnp.zeros((2,), jnp.float32))


def init_feature_state(distill, student_shapes, teacher_shapes,
                       num_train_examples: int | None,
                       tx: optax.GradientTransformation,
                       rng: jax.Array) -> dict[str, Any]:
  """The train-state entries of the feature terms ({} without any).

  ``connector_params`` / ``connector_batch_stats`` (FitNets' BN) and their
  optimizer state ``connector_opt_state`` (the student's optimizer), and
  ``crd_state``: per CRD term, both memory banks, the labels seen and the
  normalizers. All of it resumes training; none of it is the student.

  Args:
    distill: ``config.distill``.
    student_shapes: {name: shape} of the student's train-mode features.
    teacher_shapes: {name: shape} of the teacher's eval-mode features.
    num_train_examples: the train split's size N (rows of CRD's banks).
    tx: the student's optimizer.
    rng: a PRNG key.
  """
  terms = feature_terms(distill)
  if not terms:
    return {}
  dummy = lambda shapes: {k: jnp.zeros(v.shape, jnp.float32)
                          for k, v in shapes.items()}
  connector_rng, crd_rng = jax.random.split(rng)
  variables = FeatureConnectors(terms).init(
      connector_rng, _pairs(terms, dummy(student_shapes),
                            dummy(teacher_shapes)), False)
  params = variables.get('params', {})
  crd_state = {}
  for i, term in enumerate(terms):
    if term.method == 'crd':
      if not num_train_examples or num_train_examples < 2:
        raise ValueError(
            f'config.distill.features[{i}] (crd) needs the train split\'s '
            f'size (>= 2 examples) for its memory banks, got '
            f'{num_train_examples}.')
      crd_state[f'term{i}'] = _crd_entry(term, num_train_examples,
                                         jax.random.fold_in(crd_rng, i))
  return dict(connector_params=params,
              connector_batch_stats=variables.get('batch_stats', {}),
              connector_opt_state=tx.init(params), crd_state=crd_state)


def _crd_value(term: FeatureTerm, entry, student, teacher, valid, batch,
               rng) -> tuple[jax.Array, dict[str, jax.Array]]:
  if 'index' not in batch:
    raise ValueError('crd reads the batch\'s example indices (`index`), '
                     'which kd_jax.input_pipeline gives train batches.')
  indices = batch['index'].astype(jnp.int32)
  num_examples = entry['student_memory'].shape[0]
  num_negatives = min(term.option('num_negatives'), num_examples - 1)
  labels = None
  new_labels = entry['labels']
  if term.option('exact_negatives'):
    # Padded rows write nowhere (their index is pushed out of range).
    rows = jnp.where(valid, indices, num_examples)
    new_labels = entry['labels'].at[rows].set(
        batch['label'].astype(jnp.int32), mode='drop')
    labels = new_labels
  negatives = feature_losses.crd_sample_negatives(
      rng, indices, num_examples, num_negatives, example_labels=labels)
  temperature = term.option('temperature')
  args = (student, teacher, entry['student_memory'], entry['teacher_memory'],
          indices, negatives)
  first = feature_losses.crd_normalizers(*args, temperature=temperature,
                                         where=valid)
  normalizers = jnp.where(entry['normalizers'] > 0, entry['normalizers'],
                          first)
  value = feature_losses.crd(*args, normalizers, temperature=temperature,
                             where=valid)
  momentum = term.option('momentum')
  new_entry = dict(
      student_memory=feature_losses.crd_memory_update(
          entry['student_memory'], indices, student, momentum, where=valid),
      teacher_memory=feature_losses.crd_memory_update(
          entry['teacher_memory'], indices, teacher, momentum, where=valid),
      labels=new_labels, normalizers=normalizers)
  return value, new_entry


def _pair_value(term: FeatureTerm, student, teacher, extra, valid):
  method = term.method
  if method == 'fitnet':
    return feature_losses.fitnet_hint(student, teacher, where=valid)
  if method == 'at':
    return feature_losses.attention_transfer(student, teacher,
                                             p=term.option('p'), where=valid)
  if method == 'sp':
    return feature_losses.similarity_preserving(student, teacher, where=valid)
  if method == 'cc':
    return feature_losses.correlation_congruence(student, teacher,
                                                 where=valid)
  if method == 'vid':
    return feature_losses.vid(student, teacher, extra,
                              eps=term.option('eps'), where=valid)
  if method == 'rkd':
    return feature_losses.rkd(
        student, teacher, distance_weight=term.option('distance_weight'),
        angle_weight=term.option('angle_weight'), where=valid)
  return feature_losses.pkt(student, teacher, eps=term.option('eps'),
                            where=valid)


def feature_loss(terms: tuple[FeatureTerm, ...], connector_params,
                 connector_batch_stats, student_features, teacher_features,
                 batch: dict[str, Any], *, crd_state=None,
                 rng: jax.Array | None = None, train: bool = True):
  r"""The feature terms of one step: :math:`\sum_i w_i \sum_j \ell_i(s_j,
  t_j)`.

  Args:
    terms: from :func:`feature_terms`.
    connector_params, connector_batch_stats: the connectors' variables.
    student_features: {name: array}, the student's (train-mode) features.
    teacher_features: {name: array}, the teacher's, without gradient.
    batch: the step's batch (``mask``; ``index`` and ``label`` for CRD).
    crd_state: the CRD entries of the train state.
    rng: key of this step's CRD negatives.
    train: FitNets' BN on batch statistics (and updating them).

  Returns:
    ``(total, terms, connector_batch_stats, crd_state)``: the weighted sum,
    each term's unweighted value as ``'feature_<method>'`` (``<i>`` appended
    to a repeated method), and the updated state.
  """
  valid = jnp.asarray(batch['mask'], bool)
  teacher_features = jax.tree.map(
      lambda x: jax.lax.stop_gradient(x.astype(jnp.float32)),
      dict(teacher_features))
  variables = {'params': connector_params}
  if connector_batch_stats:
    variables['batch_stats'] = connector_batch_stats
  mapped, updates = FeatureConnectors(terms).apply(
      variables, _pairs(terms, student_features, teacher_features), train,
      mutable=['batch_stats'] if train else [])
  total = jnp.zeros((), jnp.float32)
  values, new_crd = {}, dict(crd_state or {})
  methods = [term.method for term in terms]
  for i, term in enumerate(terms):
    value = jnp.zeros((), jnp.float32)
    for student, teacher, extra in mapped[i]:
      if term.method == 'crd':
        pair_value, new_crd[f'term{i}'] = _crd_value(
            term, crd_state[f'term{i}'], student, teacher, valid, batch,
            jax.random.fold_in(rng, i))
      else:
        pair_value = _pair_value(term, student, teacher, extra, valid)
      value = value + pair_value
    key = f'feature_{term.method}'
    if methods.count(term.method) > 1:
      key = f'{key}{i}'
    values[key] = value
    total = total + term.weight * value
  new_batch_stats = dict(updates).get('batch_stats', connector_batch_stats)
  return total, values, new_batch_stats, new_crd


def check_feature_shapes(config: ml_collections.ConfigDict, num_classes: int,
                         image_shape, num_train_examples: int | None = None
                         ) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """Refuses, before training, features the models lack or cannot pair.

  Each term is traced once on abstract features (`jax.eval_shape`, no
  compute): its connectors built and its loss formed.

  Args:
    config: the run config (``config.model``, ``config.teachers[0].model``).
    num_classes: the dataset's classes.
    image_shape: one image's ``(H, W, C)``.
    num_train_examples: the train split's size (CRD's banks).

  Returns:
    ``(student_shapes, teacher_shapes)``: {name: ShapeDtypeStruct} of the
    student's train-mode and the teacher's eval-mode features at batch 2;
    None without feature terms.

  Raises:
    ValueError: naming the term, the feature and the valid names, or the
      shapes that no connector maps.
  """
  terms = feature_terms(config.distill)
  if not terms:
    return None
  if config.distill.teacher_source != 'online' or len(config.teachers) != 1:
    raise ValueError(
        'config.distill.features needs the teacher\'s features, which only '
        'one online teacher computes (teacher_source='
        f'{config.distill.teacher_source!r}, {len(config.teachers)} '
        'teachers): set distill.teacher_source="online" with one entry in '
        'config.teachers, or drop distill.features.')
  batch_shape = (2, *image_shape)
  teacher_spec = rundir.teacher_model(config.teachers[0])
  shapes = dict(
      student=model_features.feature_shapes(config.model, num_classes,
                                            batch_shape, train=True),
      teacher=model_features.feature_shapes(teacher_spec, num_classes,
                                            batch_shape, train=False))
  specs = dict(student=config.model, teacher=teacher_spec)
  for i, term in enumerate(terms):
    field = f'config.distill.features[{i}]'
    for side in ('student', 'teacher'):
      try:
        model_features.select_features(shapes[side], getattr(term, side),
                                       specs[side].name)
      except ValueError as e:
        raise ValueError(f'{field}.{side}: {e}') from None
    single = (term,)

    def probe(single=single):
      rng = jax.random.key(0)
      student = {k: jnp.zeros(v.shape, jnp.float32)
                 for k, v in shapes['student'].items()}
      teacher = {k: jnp.zeros(v.shape, jnp.float32)
                 for k, v in shapes['teacher'].items()}
      variables = FeatureConnectors(single).init(
          rng, _pairs(single, student, teacher), False)
      crd_state = {}
      if single[0].method == 'crd':
        crd_state['term0'] = _crd_entry(single[0],
                                        max(num_train_examples or 2, 2), rng)
      batch = dict(mask=jnp.ones((2,), bool),
                   index=jnp.arange(2, dtype=jnp.int32),
                   label=jnp.zeros((2,), jnp.int32))
      return feature_loss(single, variables.get('params', {}),
                          variables.get('batch_stats', {}), student, teacher,
                          batch, crd_state=crd_state, rng=rng)[0]

    try:
      jax.eval_shape(probe)
    except (ValueError, TypeError) as e:
      described = '; '.join(
          f'student {s} {tuple(shapes["student"][s].shape[1:])} -> teacher '
          f'{t} {tuple(shapes["teacher"][t].shape[1:])}'
          for s, t in zip(term.student, term.teacher))
      raise ValueError(
          f'{field} ({term.method}) cannot pair these features ({described}'
          f', without the batch axis): {e} Pick features whose shapes this '
          f'method takes (its docstring in kd_jax/feature_losses.py says '
          f'which).') from None
  return shapes['student'], shapes['teacher']
