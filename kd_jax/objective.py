r"""The per-step objective: what a training step minimises, in one place.

`train.train_step` is forward -> objective -> update. This module turns what
the teachers produced (dense logits ``[K, B, C]`` of K teachers, or a top-k
cache's arrays) into soft targets once per step (:func:`teacher_targets`),
and the student's logits, those targets and the labels into the loss and its
terms (:func:`loss`):

.. math::
  L = w_\text{soft}\, s(e)\, \overline{\ell_\text{soft}}
    + w_\text{hard}\, \overline{\ell_\text{hard}}

with the bar the mean over the batch's valid examples (a batch-level soft
loss is its own batch value), the soft term the method that
``config.distill.soft`` names (`kd_jax.methods.logit`: KD's ``kl``,
``soft_ce``, ``logit_mse``, DKD, DIST, DeiT's hard distillation),
optionally on standardized logits (Sun et al. 2024), at a fixed or learned
temperature (CTKD, `kd_jax.methods.ctkd`), and :math:`s(e)` the soft term's
linear warm-up over its ``warmup_epochs`` (1 without). The weights are
``config.distill.soft_weight`` / ``hard_weight`` when set, else ``alpha`` and
``1 - alpha``: every config written before these fields trains exactly as it
did. The objective knows a soft loss by its capabilities (what it reads,
whether it is batch-level, has a temperature, a top-k form), checked once,
in :func:`validate`.

Teachers: one teacher's logits are the targets; several are combined once
(`losses.combine_teachers`, by ``ensemble_method`` with their weights) at
``T = 1`` by default (``ensemble_temperature='one'``: the ensemble's own
predictive distribution, which an exported logits cache also stores, so
online and cached ensembles train the same student) or at the distillation
temperature (``'distillation'``: Hinton's average of the tempered
distributions); ``'sum_losses'`` sums the per-teacher soft terms with the
teachers' weights instead.

Feature terms (``config.distill.features``, :func:`feature_terms`): each
names a method (`kd_jax.methods.feature`), student and teacher features and
a weight; :func:`feature_loss` adds their weighted sum to the loss. Their
connectors (:class:`FeatureConnectors`) and any per-example state (CRD's
memory banks) live in the train state like the learned temperature
(`kd_jax.train_state`, :func:`init_feature_state`);
:func:`check_feature_shapes` refuses, before training, features a model
lacks or shapes no connector maps.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax import losses
from kd_jax import rundir
from kd_jax.methods import ctkd
from kd_jax.methods import feature
from kd_jax.methods import logit
from kd_jax.methods import schedules
from kd_jax.models import features as model_features
from kd_jax.teachers import sources as teacher_sources

ENSEMBLE_METHODS = losses.COMBINE_METHODS + ('sum_losses',)
ENSEMBLE_TEMPERATURES = ('one', 'distillation')
# The hard term: config.distill.hard -> (logits, labels, label_smoothing).
HARD_LOSSES = {'ce': losses.cross_entropy, 'mse': losses.mse_to_labels}


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


def _validate_weights(d) -> None:
  soft_weight, hard_weight = d.get('soft_weight'), d.get('hard_weight')
  if (soft_weight is None) != (hard_weight is None):
    raise ValueError(
        f'config.distill.soft_weight={soft_weight} and '
        f'config.distill.hard_weight={hard_weight}: set both (the loss is '
        f'soft_weight * soft + hard_weight * hard), or neither to use alpha.')
  if soft_weight is None:
    return
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


def _validate_ctkd(d, term: logit.SoftTerm) -> None:
  """CTKD's settings against the soft term's capabilities."""
  s = ctkd.settings(d)
  if not s.learned:
    return
  method = term.method
  if d.teacher_source == 'none' or _weights(d)[0] == 0:
    raise ValueError(
        f'config.distill.ctkd={s.mode!r} learns the distillation '
        f'temperature, but no soft term is trained (teacher_source='
        f'{d.teacher_source!r}, soft weight {_weights(d)[0]}): set '
        f'ctkd="none" or distil from a teacher.')
  if not method.uses_temperature:
    raise ValueError(
        f'config.distill.ctkd needs a tempered soft loss; {method.name} has '
        f'no temperature: use soft="kl".')
  if s.mode == 'instance' and (method.batch_level
                                or not method.divides_logits):
    why = ('it is one batch-level value' if method.batch_level else
           'its temperature does not act on both sides\' logits alike')
    raise ValueError(
        f'config.distill.ctkd="instance" with soft="{method.name}": {why}, '
        f'so it takes no per-example temperature; use ctkd="global".')
  if s.mode == 'instance' and d.ensemble_method == 'sum_losses':
    raise ValueError(
        'config.distill.ctkd="instance" reads the combined teacher logits, '
        'which ensemble_method="sum_losses" does not form; use mean_probs '
        'or mean_log_probs, or ctkd="global".')
  if d.ensemble_temperature == 'distillation':
    raise ValueError(
        'config.distill.ctkd learns the temperature inside the step, after '
        'the teachers are combined: set ensemble_temperature="one".')
  ctkd.check(s)


# The second view's fields and their defaults (`soft`: None, distill.soft).
STRONG_VIEW_DEFAULTS = {'augment': 'rand_augment', 'num_ops': 2,
                        'soft': None, 'soft_weight': 1.0, 'hard_weight': 0.0}
STRONG_AUGMENTATIONS = ('rand_augment',)
STRONG_FIELD = 'config.distill.strong_view'


def strong_view(distill) -> dict[str, Any] | None:
  """``config.distill.strong_view`` with its defaults filled in, or None.

  A second view of each train image (MLKD's strong view: the augmented image
  through RandAugment with Cutout, `kd_jax.data.augment`, as the batch's
  ``image_strong``) goes through the student and the teachers too, and adds
  ``soft_weight * soft + hard_weight * hard`` on it, with its own soft term
  (``soft``, a `config.distill.soft` spec; default the main one) at
  ``distill.temperature``.

  Raises:
    ValueError: naming the field, for an unknown key or augmentation.
  """
  spec = distill.get('strong_view') or {}
  if not spec:
    return None
  if not hasattr(spec, 'keys'):
    raise ValueError(
        f'{STRONG_FIELD}={spec!r} must be a dict, e.g. dict(augment='
        f"'rand_augment', num_ops=2, soft=dict(method='mlkd', ...), "
        f'soft_weight=1.0, hard_weight=0.1), or {{}} for none.')
  spec = dict(spec)
  unknown = sorted(set(spec) - set(STRONG_VIEW_DEFAULTS))
  if unknown:
    raise ValueError(f'{STRONG_FIELD} sets {unknown}; its fields are '
                     f'{sorted(STRONG_VIEW_DEFAULTS)}.')
  spec = {**STRONG_VIEW_DEFAULTS, **spec}
  if spec['soft'] is None:
    spec['soft'] = distill.soft
  if spec['augment'] not in STRONG_AUGMENTATIONS:
    raise ValueError(f"{STRONG_FIELD}.augment={spec['augment']!r}; choose "
                     f'one of {STRONG_AUGMENTATIONS}.')
  num_ops = spec['num_ops']
  if isinstance(num_ops, bool) or not isinstance(num_ops, int) or num_ops < 0:
    raise ValueError(f'{STRONG_FIELD}.num_ops={num_ops!r} must be an integer '
                     f'>= 0 (RandAugment\'s ops per image; MLKD uses 2).')
  logit.non_negative(spec, ('soft_weight', 'hard_weight'), STRONG_FIELD)
  return spec


def strong_view_distill(distill):
  """``distill`` as the strong view's terms read it: its soft term and
  weights in place of the main ones (no warm-up, CTKD or second view)."""
  spec = strong_view(distill)
  d = ml_collections.ConfigDict(
      {k: v for k, v in distill.items()
       if k not in ('soft_weight', 'hard_weight')},
      type_safe=False, convert_dict=False)
  d.soft = spec['soft']
  d.soft_weight = float(spec['soft_weight'])
  d.hard_weight = float(spec['hard_weight'])
  d.alpha = 0.0
  d.ctkd = {'mode': 'none'}
  d.strong_view = {}
  return d


def _validate_strong_view(config) -> None:
  d = config.distill
  spec = strong_view(d)
  if spec is None:
    return
  if not teacher_sources.get(config).sees_images:
    raise ValueError(
        f'{STRONG_FIELD} needs teachers that score the strong images inside '
        f'the step; teacher_source={d.teacher_source!r} looks its logits up '
        f'by example: use teacher_source="online" or "ensemble", or set '
        f'{STRONG_FIELD}={{}}.')
  if config.get('mixup_alpha', 0) > 0:
    raise ValueError(f'{STRONG_FIELD} with config.mixup_alpha='
                     f'{config.mixup_alpha}: the strong view is made of '
                     f'unmixed images; set mixup_alpha=0.')
  if ctkd.settings(d).learned:
    raise ValueError(f'{STRONG_FIELD} with a learned temperature '
                     f'(config.distill.ctkd): the strong view uses '
                     f'distill.temperature; set ctkd="none".')
  field = f'{STRONG_FIELD}.soft'
  term = logit.soft_term({'soft': spec['soft']}, field)
  if term.method.student_head or term.method.teacher_prediction:
    raise ValueError(f'{field}={term.method.name!r} trains another head or '
                     f'on the teachers\' argmax; use a soft loss such as '
                     f'"kl" or "mlkd".')
  if d.logit_standardization and not term.method.standardizable:
    raise ValueError(f'{field}={term.method.name!r} with config.distill.'
                     f'logit_standardization=True: it has no logit scale '
                     f'to standardize.')
  if term.method.check is not None:
    term.method.check(config, term.kwargs(), field)


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad objective field and the fix.

  Checks `config.distill`'s weights, the soft term (its options, and its
  capabilities against the data, CTKD and logit standardization) and the
  feature terms, against each other and against the teacher source.
  """
  d = config.distill
  _validate_weights(d)
  term = logit.check(config)
  method = term.method
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
  if (method.needs_target_class and uses_teacher
      and config.get('mixup_alpha', 0) > 0):
    raise ValueError(
        f'config.distill.soft="{method.name}" with config.mixup_alpha='
        f'{config.mixup_alpha}: it reads the target class, which a mixed '
        f'example does not have; set mixup_alpha=0 or use soft="kl".')
  if d.logit_standardization and not method.standardizable:
    raise ValueError(
        f'config.distill.logit_standardization=True with soft='
        f'"{method.name}", which has no logit scale to standardize: set '
        f'logit_standardization=False.')
  _validate_ctkd(d, term)
  _validate_strong_view(config)
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
# The learned temperature (the method: kd_jax.methods.ctkd).
# ----------------------------------------------------------------------------


def learned_temperature(distill, temperature_params, student_logits,
                        targets: Targets, epoch) -> tuple[jax.Array,
                                                          jax.Array]:
  """CTKD's temperature for this step and the reversal strength
  (`ctkd.learned_temperature` on the combined teacher logits)."""
  return ctkd.learned_temperature(ctkd.settings(distill), temperature_params,
                                  student_logits, targets.logits, epoch)


# ----------------------------------------------------------------------------
# The loss.
# ----------------------------------------------------------------------------


def _soft_mean(term: logit.SoftTerm, student, teacher, labels, valid,
               standardize: bool, temperature, axis_name) -> jax.Array:
  """The soft term, averaged over valid examples (batch-level: its value)."""
  if standardize:
    student = losses.logit_standardize(student)
    teacher = losses.logit_standardize(teacher)
  scale = None
  if jnp.ndim(temperature) > 0:
    # A temperature per example: KL_T(z, v) = KL_1(z / T, v / T), times T^2.
    per_example = temperature[..., None]
    student, teacher = student / per_example, teacher / per_example
    scale, temperature = jnp.square(temperature), 1.0
  values = term.method.loss(student, teacher, labels=labels,
                            temperature=temperature, where=valid,
                            axis_name=axis_name, **term.kwargs())
  if term.method.batch_level:
    return values
  if scale is not None:
    values = values * scale
  return losses.masked_mean(values, valid, axis_name)


def _topk_soft_mean(term: logit.SoftTerm, student, topk, valid, distill,
                    axis_name) -> jax.Array:
  topk_logits, topk_indices, rest_mass = topk
  values = term.method.topk(student, topk_logits, topk_indices, rest_mass,
                            temperature=distill.temperature, where=valid)
  return losses.masked_mean(values, valid, axis_name)


def _soft(term: logit.SoftTerm, student_logits, targets: Targets, labels,
          valid, distill, temperature, distillation_logits, axis_name):
  """The soft term's batch value, from whatever form the targets take."""
  method = term.method
  if method.teacher_prediction:
    if distillation_logits is None:
      raise ValueError(
          f"config.distill.soft='{method.name}' needs the student's "
          f"'{method.student_head}' logits: pass distillation_logits (a "
          'vit_* student with distill_token=True gives them).')
    return losses.masked_mean(
        method.loss(distillation_logits, targets.prediction, labels=labels,
                    temperature=None, where=valid, axis_name=axis_name,
                    **term.kwargs()), valid, axis_name)
  student = (student_logits if method.student_head is None
             else distillation_logits)
  t = distill.temperature if temperature is None else temperature
  if targets.topk is not None:
    return _topk_soft_mean(term, student, targets.topk, valid, distill,
                           axis_name)
  standardize = distill.logit_standardization
  if targets.weights is not None:
    per_teacher = jax.vmap(lambda teacher: _soft_mean(
        term, student, teacher, labels, valid, standardize, t, axis_name))(
            targets.logits)
    return jnp.sum(targets.weights * per_teacher)
  return _soft_mean(term, student, targets.logits, labels, valid, standardize,
                    t, axis_name)


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
    epoch: fractional epochs done (step / steps_per_epoch), for the soft
      term's warm-up; may be None without one.
    temperature: a learned temperature (scalar or ``[B]``) replacing
      ``distill.temperature`` in the soft term.
    distillation_logits: ``[B, C]``, the logits of the student head that the
      soft method names (``student_head``: DeiT's distillation token,
      feature 'dist_logits').
    axis_name: mapped axis name inside ``shard_map``.

  Returns:
    ``(loss, terms)``; ``terms`` holds the scalars ``'soft'``, ``'hard'``
    and ``'total'`` (a term without its inputs reports 0).
  """
  valid = jnp.asarray(mask, bool)
  soft_weight, hard_weight = _weights(distill)
  term = logit.soft_term(distill)
  zero = jnp.zeros((), jnp.float32)
  soft = zero
  if (targets.logits is not None or targets.topk is not None
      or targets.prediction is not None):
    soft = _soft(term, student_logits, targets, labels, valid, distill,
                 temperature, distillation_logits, axis_name)
  elif soft_weight > 0:
    raise ValueError(
        f'the soft term has weight {soft_weight} but the step has no teacher '
        f'targets; name a teacher source or set its weight to 0.')
  hard_labels = labels if label_probs is None else label_probs
  hard = losses.masked_mean(
      HARD_LOSSES[distill.hard](student_logits, hard_labels,
                                distill.label_smoothing), valid, axis_name)

  total = zero
  if soft_weight > 0:
    weight = soft_weight
    if term.warmup_epochs > 0:
      weight = soft_weight * schedules.warmup_factor(epoch,
                                                     term.warmup_epochs)
    total = total + weight * soft
  if hard_weight > 0:
    total = total + hard_weight * hard
  return total, {'soft': soft, 'hard': hard, 'total': total}


# ----------------------------------------------------------------------------
# Feature terms: the student matches what the teacher computes inside (the
# methods: kd_jax.methods.feature).
# ----------------------------------------------------------------------------

def feature_terms(distill) -> tuple[feature.FeatureTerm, ...]:
  """``config.distill.features`` checked and normalised (`feature.terms`)."""
  return feature.terms(distill)


def validate_features(config: ml_collections.ConfigDict) -> None:
  """Checks the feature terms against the run's setup.

  Shapes are checked later, by :func:`check_feature_shapes`.
  """
  d = config.distill
  if feature_terms(d) and not (
      teacher_sources.get(config).computes_features
      and len(config.teachers) == 1):
    raise ValueError(
        'config.distill.features needs the teacher\'s features, which only '
        'one online teacher computes (teacher_source='
        f'{d.teacher_source!r}, {len(config.teachers)} teachers): set '
        'distill.teacher_source="online" with one entry in config.teachers, '
        'or drop distill.features.')


class FeatureConnectors(nn.Module):
  """Every learned connector of the feature terms, in one params tree.

  Input and output: per term, per pair, ``(student, teacher)`` features;
  out come ``(student, teacher, extra)`` as the term's loss reads them
  (``extra``: e.g. VID's per-channel ``log_scale``). Shapes come from the
  features themselves, so a connector is built for the pair it sees; the
  connector of pair j of term i is named ``term<i>_<method><j>``.
  """
  terms: tuple[feature.FeatureTerm, ...]

  @nn.compact
  def __call__(self, pairs, train: bool):
    out = []
    for i, term in enumerate(self.terms):
      method, options = term.record, dict(term.options)
      if method.joint_connector:
        students, teachers = zip(*pairs[i])
        out.append(tuple(method.connector(
            options, f'term{i}_{term.method}', students, teachers, train)))
        continue
      mapped = []
      for j, (student, teacher) in enumerate(pairs[i]):
        if method.connector is None:
          mapped.append((student, teacher, None))
        else:
          mapped.append(method.connector(
              options, f'term{i}_{term.method}{j}', student, teacher, train))
      out.append(tuple(mapped))
    return tuple(out)


def _pairs(terms, student_features, teacher_features):
  return tuple(tuple((student_features[s], teacher_features[t])
                     for s, t in zip(term.student, term.teacher))
               for term in terms)


def _init_example_state(terms, num_train_examples: int | None,
                        rng: jax.Array) -> dict[str, Any]:
  """The per-example state of the terms whose method keeps one, by term."""
  state = {}
  for i, term in enumerate(terms):
    if term.record.init_state is None:
      continue
    if not num_train_examples or num_train_examples < 2:
      raise ValueError(
          f'config.distill.features[{i}] ({term.method}) keeps per-example '
          f'state and needs the train split\'s size (>= 2 examples), got '
          f'{num_train_examples}.')
    state[f'term{i}'] = term.record.init_state(
        dict(term.options), num_train_examples, jax.random.fold_in(rng, i))
  return state


def row_sharded(distill) -> dict[str, tuple[str, ...]]:
  """{term key: its state's entries split over devices by rows}."""
  return {f'term{i}': term.record.row_sharded
          for i, term in enumerate(feature_terms(distill))
          if term.record.init_state is not None}


def init_feature_state(distill, student_shapes, teacher_shapes,
                       num_train_examples: int | None,
                       rng: jax.Array) -> dict[str, Any]:
  """The train state's feature entries (empty dicts without feature terms).

  ``connector_params`` / ``connector_batch_stats`` (FitNets' BN), and
  ``example_state``: per term whose method keeps one, its per-example state
  (CRD: both memory banks, the labels seen and the normalizers). All of it
  resumes training; none of it is the student.

  Args:
    distill: ``config.distill``.
    student_shapes: {name: shape} of the student's train-mode features.
    teacher_shapes: {name: shape} of the teacher's eval-mode features.
    num_train_examples: the train split's size N (rows of per-example state).
    rng: a PRNG key.
  """
  terms = feature_terms(distill)
  if not terms:
    return dict(connector_params={}, connector_batch_stats={},
                example_state={})
  dummy = lambda shapes: {k: jnp.zeros(v.shape, jnp.float32)
                          for k, v in shapes.items()}
  connector_rng, state_rng = jax.random.split(rng)
  variables = FeatureConnectors(terms).init(
      connector_rng, _pairs(terms, dummy(student_shapes),
                            dummy(teacher_shapes)), False)
  return dict(connector_params=variables.get('params', {}),
              connector_batch_stats=variables.get('batch_stats', {}),
              example_state=_init_example_state(terms, num_train_examples,
                                                state_rng))


def _term_value(i: int, term: feature.FeatureTerm, mapped, valid, batch,
                example_state, rng):
  """(the term's unweighted value summed over its pairs, its new state)."""
  method, options = term.record, dict(term.options)
  missing = [k for k in method.batch_keys if k not in batch]
  if missing:
    raise ValueError(
        f'{term.method} reads the batch\'s {missing}, which '
        f'kd_jax.input_pipeline gives train batches (`index`: each '
        f'example\'s position in the train split).')
  value = jnp.zeros((), jnp.float32)
  state = None
  for student, teacher, extra in mapped:
    if method.init_state is None:
      pair_value = method.loss(student, teacher, extra=extra, where=valid,
                               **options)
    else:
      pair_value, state = method.loss(
          student, teacher, extra=extra, where=valid,
          state=example_state[f'term{i}'], batch=batch,
          rng=jax.random.fold_in(rng, i), **options)
    value = value + pair_value
  return value, state


def feature_loss(terms: tuple[feature.FeatureTerm, ...], connector_params,
                 connector_batch_stats, student_features, teacher_features,
                 batch: dict[str, Any], *, example_state=None,
                 rng: jax.Array | None = None, train: bool = True,
                 epoch: jax.Array | None = None):
  r"""The feature terms of one step: :math:`\sum_i w_i \sum_j \ell_i(s_j,
  t_j)`.

  Args:
    terms: from :func:`feature_terms`.
    connector_params, connector_batch_stats: the connectors' variables.
    student_features: {name: array}, the student's (train-mode) features.
    teacher_features: {name: array}, the teacher's, without gradient.
    batch: the step's batch (``mask``, and what the methods read of it:
      ``index`` and ``label`` for CRD).
    example_state: the per-example state of the train state, by term.
    rng: key of this step's draws (CRD's negatives), folded in per term.
    train: FitNets' BN on batch statistics (and updating them).
    epoch: fractional epochs done, for the terms' ``warmup_epochs``.

  Returns:
    ``(total, terms, connector_batch_stats, example_state)``: the weighted
    sum, each term's unweighted value as ``'feature_<method>'`` (``<i>``
    appended to a repeated method), and the updated state.
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
  values, new_state = {}, dict(example_state or {})
  methods = [term.method for term in terms]
  for i, term in enumerate(terms):
    value, state = _term_value(i, term, mapped[i], valid, batch,
                               example_state, rng)
    if state is not None:
      new_state[f'term{i}'] = state
    key = f'feature_{term.method}'
    if methods.count(term.method) > 1:
      key = f'{key}{i}'
    values[key] = value
    weight = term.weight
    if term.warmup_epochs > 0:
      weight = weight * schedules.warmup_factor(epoch, term.warmup_epochs)
    total = total + weight * value
  new_batch_stats = dict(updates).get('batch_stats', connector_batch_stats)
  return total, values, new_batch_stats, new_state


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
      example_state = _init_example_state(
          single, max(num_train_examples or 2, 2), rng)
      batch = dict(mask=jnp.ones((2,), bool),
                   index=jnp.arange(2, dtype=jnp.int32),
                   label=jnp.zeros((2,), jnp.int32))
      return feature_loss(single, variables.get('params', {}),
                          variables.get('batch_stats', {}), student, teacher,
                          batch, example_state=example_state, rng=rng,
                          epoch=jnp.zeros((), jnp.float32))[0]

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
