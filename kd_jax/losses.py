r"""Knowledge-distillation losses.

Pure functions in the style of ``optax.losses``: the class axis is the last
axis, every per-example function returns one value per example (shape
``logits.shape[:-1]``) and the caller reduces; :func:`distillation_loss` does
the masked reduction for a training step. All functions are safe under
``jit``, ``vmap``, ``grad`` and inside ``shard_map``.

Numerics: inputs of lower precision (``bfloat16``, ``float16``) are cast up
and everything is computed in ``float32`` (or ``float64`` when given it), with
log-softmax throughout, so values and gradients stay finite for logits up to
:math:`\pm 10^4` and temperatures from 0.05 to 100, and a teacher probability
that underflows to 0 contributes exactly 0 instead of NaN.

Checks: bad arguments raise ``ValueError`` naming the argument, its value and
the fix. Value checks (temperature, alpha, label range, teacher weights) run
only on concrete values; under tracing (``jit``, ``vmap``, ``shard_map``) they
are skipped and shape/dtype checks still run.

Notation (Hinton et al., 2015): student logits :math:`z`, teacher logits
:math:`v`, temperature :math:`T`, :math:`N` classes, tempered probabilities
:math:`q = \mathrm{softmax}(z / T)` and :math:`p = \mathrm{softmax}(v / T)`.

Reference:
  Hinton, Vinyals and Dean, `Distilling the Knowledge in a Neural Network
  <https://arxiv.org/abs/1503.02531>`_, arXiv:1503.02531, 2015.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    'COMBINE_METHODS',
    'HARD_LOSSES',
    'MLKD_TEMPERATURES',
    'SOFT_LOSSES',
    'SPARSE_CONVENTIONS',
    'TOKEN_DIVERGENCES',
    'combine_teachers',
    'cross_entropy',
    'dist',
    'distillation_loss',
    'dkd',
    'generalized_jsd',
    'kl_divergence',
    'logit_mse',
    'logit_standardize',
    'masked_mean',
    'mlkd_loss',
    'mse_to_labels',
    'nkd_loss',
    'reverse_kl_divergence',
    'skew_kl_divergence',
    'skew_reverse_kl_divergence',
    'soft_cross_entropy',
    'sparse_token_divergence',
    'tempered_log_softmax',
    'tempered_softmax',
    'token_divergence',
    'token_mean',
    'token_sum_and_count',
    'topk_kl_divergence',
    'total_variation',
    'ttm_loss',
    'validate_distillation_args',
    'wttm_loss',
]

SOFT_LOSSES = ('kl', 'soft_ce', 'logit_mse')
HARD_LOSSES = ('ce', 'mse')
COMBINE_METHODS = ('mean_probs', 'mean_log_probs')

ArrayLike = jax.typing.ArrayLike


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------


def _concrete_value(x: Any) -> Any:
  """Returns the value of `x`, or None when it is only known at run time."""
  if isinstance(x, jax.core.Tracer):
    # Same logic as jax's internal `is_concrete`: eager `grad` tracers still
    # carry their primal value; `jit`/`vmap`/`shard_map` tracers do not.
    to_concrete = getattr(x, 'to_concrete_value', None)
    return None if to_concrete is None else to_concrete()
  return x


def _as_float_logits(logits: ArrayLike, name: str) -> jax.Array:
  """Checks that `logits` is a float array with a class axis; casts it up."""
  logits = jnp.asarray(logits)
  if not jnp.issubdtype(logits.dtype, jnp.floating):
    raise ValueError(
        f'{name} must be a floating-point array of logits, got dtype '
        f'{logits.dtype}; cast it with {name}.astype(jnp.float32).')
  if logits.ndim < 1:
    raise ValueError(
        f'{name} must have a class axis (the last axis), got a scalar of '
        f'shape {logits.shape}; pass logits of shape [..., num_classes].')
  # bfloat16/float16 logits are computed in float32: softmax tails underflow.
  return logits.astype(jnp.promote_types(logits.dtype, jnp.float32))


def _check_same_shape(student: jax.Array, teacher: jax.Array,
                      teacher_name: str = 'teacher_logits') -> None:
  if student.shape != teacher.shape:
    raise ValueError(
        f'{teacher_name} shape {teacher.shape} does not match student_logits '
        f'shape {student.shape} (class axis: {teacher.shape[-1]} vs '
        f'{student.shape[-1]} classes); build teacher and student for the '
        f'same num_classes and feed them the same batch.')


def _check_temperature(temperature: Any) -> None:
  if jnp.ndim(temperature) != 0:
    raise ValueError(
        f'temperature must be a scalar, got shape {jnp.shape(temperature)}; '
        f'pass one positive number (vmap over a sweep of temperatures).')
  value = _concrete_value(temperature)
  if value is None:
    return
  value = float(np.asarray(value))
  if not (np.isfinite(value) and value > 0):
    raise ValueError(
        f'temperature={value!r} is invalid: it must be a positive finite '
        f'number; pass temperature > 0 (1 gives the plain softmax, Hinton et '
        f'al. 2015 use 1 to 20).')


def _check_alpha(alpha: Any) -> None:
  if jnp.ndim(alpha) != 0:
    raise ValueError(
        f'alpha must be a scalar, got shape {jnp.shape(alpha)}; pass one '
        f'number in [0, 1].')
  value = _concrete_value(alpha)
  if value is None:
    return
  value = float(np.asarray(value))
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f'alpha={value!r} is invalid: it weights the soft (teacher) term and '
        f'must lie in [0, 1]; pass alpha in [0, 1] (a weight w on the hard '
        f'term, as in Hinton et al. 2015, is alpha = 1 - w).')


def _check_label_smoothing(label_smoothing: Any) -> None:
  if jnp.ndim(label_smoothing) != 0:
    raise ValueError(
        f'label_smoothing must be a scalar, got shape '
        f'{jnp.shape(label_smoothing)}; pass one number in [0, 1].')
  value = _concrete_value(label_smoothing)
  if value is None:
    return
  value = float(np.asarray(value))
  if not 0.0 <= value <= 1.0:
    raise ValueError(
        f'label_smoothing={value!r} is invalid: it must lie in [0, 1]; pass '
        f'0 for one-hot targets or a small value such as 0.1.')


def _check_name(name: Any, allowed: tuple[str, ...], arg: str) -> None:
  if not isinstance(name, str) or name not in allowed:
    raise ValueError(
        f'{arg}={name!r} is not a known option; pass one of {allowed}.')


def validate_distillation_args(temperature: Any, alpha: Any, soft: str,
                               hard: str) -> None:
  """Checks the arguments that configure :func:`distillation_loss`.

  Meant to run once at config time; :func:`distillation_loss` also calls it.
  Values that are traced (under ``jit`` or ``vmap``, e.g. a temperature sweep)
  are not checked; their shapes are.

  Args:
    temperature: softmax temperature :math:`T`, a positive finite scalar.
    alpha: weight of the soft (teacher) term, a scalar in [0, 1].
    soft: one of :data:`SOFT_LOSSES`.
    hard: one of :data:`HARD_LOSSES`.

  Raises:
    ValueError: naming the offending argument, its value and the fix.

  Example:
    >>> from kd_jax import losses
    >>> losses.validate_distillation_args(4.0, 0.9, 'kl', 'ce')
    >>> losses.validate_distillation_args(0.0, 0.9, 'kl', 'ce')
    Traceback (most recent call last):
      ...
    ValueError: temperature=0.0 is invalid: ...
  """
  _check_name(soft, SOFT_LOSSES, 'soft')
  _check_name(hard, HARD_LOSSES, 'hard')
  _check_temperature(temperature)
  _check_alpha(alpha)


def _check_label_range(labels: Any, num_classes: int, where: Any = None,
                       name: str = 'labels') -> None:
  """Raises if concrete integer labels fall outside [0, num_classes)."""
  labels = _concrete_value(labels)
  where = _concrete_value(where) if where is not None else True
  if labels is None or where is None:
    return
  labels = np.asarray(labels)
  if not np.issubdtype(labels.dtype, np.integer):
    return
  valid = np.broadcast_to(np.asarray(where, dtype=bool), labels.shape)
  bad = labels[valid & ((labels < 0) | (labels >= num_classes))]
  if bad.size:
    fix = (f'build the model with num_classes > {int(bad.max())}'
           if bad.max() >= num_classes else
           'drop or mask (where=) the examples with negative labels, which '
           'mark unlabelled data in some datasets')
    raise ValueError(
        f'{name} contains class indices outside [0, {num_classes}): '
        f'{sorted(set(bad.tolist()))[:10]}; remap the labels, or {fix}.')


def _label_info(labels: ArrayLike, logits: jax.Array,
                name: str = 'labels') -> tuple[jax.Array, bool]:
  """Returns (labels, is_index): integer class indices or per-class targets."""
  labels = jnp.asarray(labels)
  if labels.shape == logits.shape[:-1]:
    if not jnp.issubdtype(labels.dtype, jnp.integer):
      raise ValueError(
          f'{name} of shape {labels.shape} (one per example) must hold '
          f'integer class indices, got dtype {labels.dtype}; pass int labels '
          f'of shape {logits.shape[:-1]} or probabilities of shape '
          f'{logits.shape}.')
    return labels, True
  if labels.shape == logits.shape:
    return labels.astype(logits.dtype), False
  raise ValueError(
      f'{name} shape {labels.shape} does not fit logits shape {logits.shape}; '
      f'pass integer class indices of shape {logits.shape[:-1]} or one-hot / '
      f'probability targets of shape {logits.shape}.')


# ----------------------------------------------------------------------------
# Per-example losses.
# ----------------------------------------------------------------------------


def _cross_entropy_with_probs(targets: jax.Array,
                              log_probs: jax.Array) -> jax.Array:
  """-sum_c t_c log q_c, with 0 * log 0 = 0 (no NaN where a target is 0);
  NaN targets propagate."""
  positive = targets != 0
  safe_log_probs = jnp.where(positive, log_probs, 0.0)
  return -jnp.sum(jnp.where(positive, targets * safe_log_probs, 0.0), axis=-1)


def tempered_softmax(logits: ArrayLike, temperature: ArrayLike) -> jax.Array:
  r"""Softmax of logits divided by a temperature, over the last axis.

  .. math::
    q_i = \frac{\exp(z_i / T)}{\sum_j \exp(z_j / T)}

  Higher :math:`T` gives a softer distribution over classes (Hinton et al.,
  2015, Eq. 1).

  Args:
    logits: float array ``[..., num_classes]``.
    temperature: positive scalar :math:`T`.

  Returns:
    Probabilities, same shape as ``logits``, in float32 (or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> probs = losses.tempered_softmax(jnp.array([0.0, 2.0]), temperature=2.0)
    >>> [round(p, 3) for p in probs.tolist()]
    [0.269, 0.731]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  return jnp.exp(tempered_log_softmax(logits, temperature))


def tempered_log_softmax(logits: ArrayLike,
                         temperature: ArrayLike) -> jax.Array:
  r"""Log-softmax of logits divided by a temperature, over the last axis.

  .. math::
    \log q_i = z_i / T - \log \sum_j \exp(z_j / T)

  Args:
    logits: float array ``[..., num_classes]``.
    temperature: positive scalar :math:`T`.

  Returns:
    Log-probabilities, same shape as ``logits``, in float32 (or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> log_probs = losses.tempered_log_softmax(jnp.array([0.0, 2.0]), 2.0)
    >>> [round(p, 3) for p in log_probs.tolist()]
    [-1.313, -0.313]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  logits = _as_float_logits(logits, 'logits')
  _check_temperature(temperature)
  return _tempered_log_softmax(logits, temperature)


def _tempered_log_softmax(logits: jax.Array, temperature: Any) -> jax.Array:
  return jax.nn.log_softmax(logits / jnp.asarray(temperature, logits.dtype),
                            axis=-1)


def kl_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike,
                  temperature: ArrayLike = 1.0,
                  scale_by_temperature_squared: bool = True) -> jax.Array:
  r"""KL divergence from the student's to the teacher's tempered softmax.

  .. math::
    \ell = T^2 \, \mathrm{KL}(p \,\|\, q)
         = T^2 \sum_i p_i \left(\log p_i - \log q_i\right),
    \quad p = \mathrm{softmax}(v / T),\; q = \mathrm{softmax}(z / T)

  The :math:`T^2` factor keeps the gradient magnitude of the soft term roughly
  independent of :math:`T`, since the gradient of the tempered loss scales as
  :math:`1/T^2` (Hinton et al., 2015, Sec. 2); switch it off with
  ``scale_by_temperature_squared=False``. The gradient w.r.t. the student is
  that of :func:`soft_cross_entropy` (they differ by the teacher's entropy).
  Terms with :math:`p_i = 0` contribute exactly 0.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.

  Returns:
    Per-example divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0], [0.0, 0.0, 0.0]])
    >>> kl = losses.kl_divergence(student, teacher, temperature=2.0)
    >>> [round(x, 3) for x in kl.tolist()]
    [1.281, 0.0]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_temperature(temperature)
  return _kl_divergence(student, teacher, temperature,
                        scale_by_temperature_squared)


def _kl_divergence(student: jax.Array, teacher: jax.Array, temperature: Any,
                   scale_by_temperature_squared: bool) -> jax.Array:
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  log_q = _tempered_log_softmax(student.astype(dtype), temperature)
  log_p = _tempered_log_softmax(teacher.astype(dtype), temperature)
  return _scale(_kl_sum(log_p, log_q), temperature,
                scale_by_temperature_squared)


def _scale(loss: jax.Array, temperature: Any,
           scale_by_temperature_squared: bool) -> jax.Array:
  if not scale_by_temperature_squared:
    return loss
  return loss * jnp.square(jnp.asarray(temperature, loss.dtype))


def soft_cross_entropy(student_logits: ArrayLike, teacher_logits: ArrayLike,
                       temperature: ArrayLike = 1.0,
                       scale_by_temperature_squared: bool = True) -> jax.Array:
  r"""Cross-entropy of the student's tempered softmax with soft targets.

  .. math::
    \ell = -T^2 \sum_i p_i \log q_i
         = T^2 \left(\mathrm{KL}(p \,\|\, q) + H(p)\right)

  with :math:`p = \mathrm{softmax}(v / T)`, :math:`q = \mathrm{softmax}(z / T)`
  (Hinton et al., 2015, Sec. 2). Same gradient w.r.t. the student as
  :func:`kl_divergence`; the value includes the teacher's entropy, so it is
  not 0 at the optimum.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> loss = losses.soft_cross_entropy(student, teacher, temperature=2.0)
    >>> [round(x, 3) for x in loss.tolist()]
    [5.361]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_temperature(temperature)
  return _soft_cross_entropy(student, teacher, temperature,
                             scale_by_temperature_squared)


def _soft_cross_entropy(student: jax.Array, teacher: jax.Array,
                        temperature: Any,
                        scale_by_temperature_squared: bool) -> jax.Array:
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  log_q = _tempered_log_softmax(student.astype(dtype), temperature)
  p = jnp.exp(_tempered_log_softmax(teacher.astype(dtype), temperature))
  loss = _cross_entropy_with_probs(p, log_q)
  return _scale(loss, temperature, scale_by_temperature_squared)


def cross_entropy(logits: ArrayLike, labels: ArrayLike,
                  label_smoothing: ArrayLike = 0.0) -> jax.Array:
  r"""Softmax cross-entropy with hard (or probability) labels.

  .. math::
    \ell = -\sum_i y_i \log \mathrm{softmax}(z)_i, \quad
    y = (1 - \epsilon)\, \mathrm{onehot}(\text{label}) + \epsilon / N

  with label smoothing :math:`\epsilon` (Szegedy et al., 2016); probability
  labels :math:`y` are smoothed the same way.

  Args:
    logits: float array ``[..., num_classes]``.
    labels: integer class indices ``[...]``, or one-hot / probability targets
      ``[..., num_classes]``. Concrete integer labels outside
      ``[0, num_classes)`` raise; traced ones give NaN.
    label_smoothing: :math:`\epsilon` in [0, 1].

  Returns:
    Per-example loss, shape ``logits.shape[:-1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
    >>> loss = losses.cross_entropy(logits, jnp.array([0, 2]))
    >>> [round(x, 3) for x in loss.tolist()]
    [0.24, 1.099]

  References:
    Szegedy et al., `Rethinking the Inception Architecture for Computer Vision
    <https://arxiv.org/abs/1512.00567>`_, 2016 (label smoothing).
  """
  logits = _as_float_logits(logits, 'logits')
  _check_label_smoothing(label_smoothing)
  labels, is_index = _label_info(labels, logits)
  if is_index:
    _check_label_range(labels, logits.shape[-1])
  return _cross_entropy(logits, labels, is_index, label_smoothing)


def _cross_entropy(logits: jax.Array, labels: jax.Array, is_index: bool,
                   label_smoothing: Any) -> jax.Array:
  log_probs = jax.nn.log_softmax(logits, axis=-1)
  smoothing = jnp.asarray(label_smoothing, logits.dtype)
  num_classes = logits.shape[-1]
  if not is_index:
    targets = (1.0 - smoothing) * labels + smoothing / num_classes
    return _cross_entropy_with_probs(targets, log_probs)
  in_range = (labels >= 0) & (labels < num_classes)
  index = jnp.clip(labels, 0, num_classes - 1)[..., None]
  label_log_prob = jnp.take_along_axis(log_probs, index, axis=-1)[..., 0]
  # The smoothing term is skipped when eps = 0 (it would be 0 * -inf for
  # -inf logits).
  mean_log_prob = jnp.where(smoothing > 0, jnp.mean(log_probs, axis=-1), 0.0)
  loss = -((1.0 - smoothing) * label_log_prob + smoothing * mean_log_prob)
  # Out-of-range labels can only be traced here: make them loud, not 0.
  return jnp.where(in_range, loss, jnp.nan)


def logit_mse(student_logits: ArrayLike,
              teacher_logits: ArrayLike) -> jax.Array:
  r"""Logit matching: half the mean squared difference of centred logits.

  .. math::
    \ell = \frac{1}{2N} \sum_{i=1}^{N}
      \left((z_i - \bar z) - (v_i - \bar v)\right)^2,
    \qquad \frac{\partial \ell}{\partial z_i}
      = \frac{1}{N}\left((z_i - \bar z) - (v_i - \bar v)\right)

  where :math:`\bar z, \bar v` are the means over the :math:`N` classes.
  This is the high-temperature limit of distillation (Hinton et al., 2015,
  Sec. 2.1): as :math:`T \to \infty`, :math:`T^2 \mathrm{KL}(p \| q) \to \ell`
  and the gradient of :math:`T^2` times the soft cross-entropy tends to
  :math:`(z_i - v_i)/N` for zero-mean logits, which is exactly
  :math:`\partial \ell / \partial z_i`. Centring makes it invariant, like the
  softmax, to adding a constant to all logits of an example. It ignores the
  temperature.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> [round(x, 3) for x in losses.logit_mse(student, teacher).tolist()]
    [1.333]
    >>> [round(x, 3) for x in losses.logit_mse(student + 5.0, student).tolist()]
    [0.0]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015; Ba and Caruana, `Do Deep Nets
    Really Need to be Deep? <https://arxiv.org/abs/1312.6184>`_, 2014.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  return _logit_mse(student, teacher)


def _logit_mse(student: jax.Array, teacher: jax.Array) -> jax.Array:
  diff = student - teacher
  diff = diff - jnp.mean(diff, axis=-1, keepdims=True)
  return 0.5 * jnp.mean(jnp.square(diff), axis=-1)


def mse_to_labels(logits: ArrayLike, labels: ArrayLike,
                  label_smoothing: ArrayLike = 0.0) -> jax.Array:
  r"""Squared error between the softmax output and the label distribution.

  .. math::
    \ell = \sum_{i=1}^{N} \left(\mathrm{softmax}(z)_i - y_i\right)^2

  (the Brier score), with :math:`y` the one-hot label, smoothed as in
  :func:`cross_entropy`, or given probability targets.

  Args:
    logits: float array ``[..., num_classes]``.
    labels: integer class indices ``[...]``, or one-hot / probability targets
      ``[..., num_classes]``. Concrete integer labels outside
      ``[0, num_classes)`` raise; traced ones give NaN.
    label_smoothing: :math:`\epsilon` in [0, 1].

  Returns:
    Per-example loss in [0, 2], shape ``logits.shape[:-1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> logits = jnp.array([[0.0, 0.0], [10.0, -10.0]])
    >>> loss = losses.mse_to_labels(logits, jnp.array([0, 0]))
    >>> [round(x, 3) for x in loss.tolist()]
    [0.5, 0.0]

  References:
    Brier, Verification of Forecasts Expressed in Terms of Probability,
    Monthly Weather Review, 1950.
  """
  logits = _as_float_logits(logits, 'logits')
  _check_label_smoothing(label_smoothing)
  labels, is_index = _label_info(labels, logits)
  if is_index:
    _check_label_range(labels, logits.shape[-1])
  return _mse_to_labels(logits, labels, is_index, label_smoothing)


def _mse_to_labels(logits: jax.Array, labels: jax.Array, is_index: bool,
                   label_smoothing: Any) -> jax.Array:
  num_classes = logits.shape[-1]
  smoothing = jnp.asarray(label_smoothing, logits.dtype)
  if is_index:
    targets = jax.nn.one_hot(labels, num_classes, dtype=logits.dtype)
  else:
    targets = labels
  targets = (1.0 - smoothing) * targets + smoothing / num_classes
  probs = jax.nn.softmax(logits, axis=-1)
  loss = jnp.sum(jnp.square(probs - targets), axis=-1)
  if is_index:
    loss = jnp.where((labels >= 0) & (labels < num_classes), loss, jnp.nan)
  return loss


# ----------------------------------------------------------------------------
# Modern logit losses: DKD, DIST, logit standardization.
# ----------------------------------------------------------------------------


def _check_scalar_weight(value: Any, name: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(f'{name} must be a scalar weight, got shape '
                     f'{jnp.shape(value)}; pass one non-negative number.')
  value = _concrete_value(value)
  if value is None:
    return
  value = float(np.asarray(value))
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f'{name}={value!r} is invalid: it weights a loss term '
                     f'and must be a non-negative finite number.')


def _valid_mask(where: Any, batch_shape: tuple[int, ...]) -> jax.Array:
  if where is None:
    return jnp.ones(batch_shape, bool)
  valid = jnp.asarray(where)
  if valid.shape != batch_shape:
    raise ValueError(
        f'where shape {valid.shape} does not match the examples of '
        f'student_logits, shape {batch_shape}; pass one bool per example.')
  return valid.astype(bool)


def _kl_terms(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """sum_i p_i (log p_i - log q_i) over the last axis; p_i = 0 terms are 0."""
  p = jnp.exp(log_p)
  positive = p > 0
  # Double `where`: p = 0 terms are 0 in value and in gradient (no 0 * inf).
  log_ratio = jnp.where(positive, log_p, 0.0) - jnp.where(positive, log_q, 0.0)
  return jnp.sum(jnp.where(positive, p * log_ratio, 0.0), axis=-1)


def logit_standardize(logits: ArrayLike, eps: float = 1e-7) -> jax.Array:
  r"""Z-scores logits over the class axis (logit standardization).

  .. math::
    \mathcal{Z}(z)_i = \frac{z_i - \bar z}{\sigma(z) + \epsilon}, \quad
    \bar z = \frac{1}{N}\sum_j z_j, \quad
    \sigma(z) = \sqrt{\frac{1}{N - 1}\sum_j (z_j - \bar z)^2}

  with the unbiased standard deviation, as the authors' code computes it
  (``torch.std``). Applied to both sides before a soft loss, the student
  matches the teacher's logit *relations* rather than their range: KD on
  standardized logits is invariant to shifting and to (positively) scaling
  either side's logits. A row of equal logits gives zeros with a finite
  gradient.

  Args:
    logits: float array ``[..., num_classes]``, ``num_classes >= 2``.
    eps: :math:`\epsilon`, added to the standard deviation.

  Returns:
    Standardized logits, same shape, float32 (or wider).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> z = losses.logit_standardize(jnp.array([1.0, 2.0, 3.0]))
    >>> [round(x, 3) for x in z.tolist()]
    [-1.0, 0.0, 1.0]

  References:
    Sun et al., `Logit Standardization in Knowledge Distillation
    <https://arxiv.org/abs/2403.01427>`_, CVPR 2024.
  """
  logits = _as_float_logits(logits, 'logits')
  if logits.shape[-1] < 2:
    raise ValueError(
        f'logits has {logits.shape[-1]} class(es) on its last axis; '
        f'standardizing needs at least 2 classes (shape [..., num_classes]).')
  if not (np.ndim(eps) == 0 and float(eps) >= 0):
    raise ValueError(f'eps={eps!r} must be a non-negative scalar, e.g. 1e-7.')
  return _logit_standardize(logits, eps)


def _logit_standardize(logits: jax.Array, eps: float) -> jax.Array:
  centred = logits - jnp.mean(logits, axis=-1, keepdims=True)
  var = jnp.sum(jnp.square(centred), axis=-1, keepdims=True) / (
      logits.shape[-1] - 1)
  positive = var > 0
  # Safe sqrt: equal logits (var = 0) keep a finite gradient.
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return centred / (std + eps)


def dkd(student_logits: ArrayLike, teacher_logits: ArrayLike,
        labels: ArrayLike, *, alpha: ArrayLike = 1.0, beta: ArrayLike = 8.0,
        temperature: ArrayLike = 4.0,
        where: ArrayLike | None = None) -> jax.Array:
  r"""Decoupled knowledge distillation: target-class and non-target terms.

  With :math:`p = \mathrm{softmax}(v / T)` (teacher), :math:`q =
  \mathrm{softmax}(z / T)` (student) and the label :math:`t`, the binary
  target/non-target distributions :math:`b^p = [p_t, 1 - p_t]`,
  :math:`b^q = [q_t, 1 - q_t]` and the distributions among the other classes
  :math:`\hat p_i = p_i / (1 - p_t)`, :math:`\hat q_i = q_i / (1 - q_t)`,
  :math:`i \ne t`:

  .. math::
    \mathrm{TCKD} = \mathrm{KL}(b^p \,\|\, b^q), \quad
    \mathrm{NCKD} = \mathrm{KL}(\hat p \,\|\, \hat q), \quad
    \ell = T^2 \left(\alpha\, \mathrm{TCKD} + \beta\, \mathrm{NCKD}\right)

  Classical KD decomposes as :math:`\mathrm{KL}(p \| q) = \mathrm{TCKD} +
  (1 - p_t)\, \mathrm{NCKD}` (Zhao et al., 2022, Eq. 5); DKD frees the
  weight of NCKD from the teacher's confidence. The non-target
  distributions exclude the target class exactly (the reference code
  subtracts 1000 from its scaled logit instead). A temperature
  curriculum (CTKD) passes logits already divided by a per-example
  temperature with ``temperature=1`` and multiplies by :math:`T^2` itself.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    labels: integer class indices ``[...]``, :math:`t`.
    alpha: weight :math:`\alpha \ge 0` of TCKD.
    beta: weight :math:`\beta \ge 0` of NCKD (the authors use 8 for
      resnet32x4 -> resnet8x4 on CIFAR-100).
    temperature: positive scalar :math:`T`.
    where: optional bool mask ``[...]``; False examples give 0 (value and
      gradient).

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> loss = losses.dkd(student, teacher, jnp.array([0]), alpha=1.0,
    ...                   beta=8.0, temperature=2.0)
    >>> [round(x, 3) for x in loss.tolist()]
    [4.958]

  References:
    Zhao et al., `Decoupled Knowledge Distillation
    <https://arxiv.org/abs/2203.08679>`_, CVPR 2022.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_temperature(temperature)
  _check_scalar_weight(alpha, 'alpha')
  _check_scalar_weight(beta, 'beta')
  labels = jnp.asarray(labels)
  if (labels.shape != student.shape[:-1]
      or not jnp.issubdtype(labels.dtype, jnp.integer)):
    raise ValueError(
        f'labels must be integer class indices of shape '
        f'{student.shape[:-1]} (DKD splits off the target class), got shape '
        f'{labels.shape} and dtype {labels.dtype}.')
  if student.shape[-1] < 2:
    raise ValueError(
        f'student_logits has {student.shape[-1]} class(es); DKD needs at '
        f'least 2 (a target and a non-target class).')
  _check_label_range(labels, student.shape[-1], where=where)
  valid = _valid_mask(where, student.shape[:-1])
  tckd, nckd = _dkd_terms(student, teacher, labels, temperature)
  loss = (jnp.asarray(alpha, tckd.dtype) * tckd
          + jnp.asarray(beta, nckd.dtype) * nckd)
  return jnp.where(valid, _scale(loss, temperature, True), 0.0)


def _dkd_terms(student: jax.Array, teacher: jax.Array, labels: jax.Array,
               temperature: Any) -> tuple[jax.Array, jax.Array]:
  """Unscaled (TCKD, NCKD) per example."""
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  student, teacher = student.astype(dtype), teacher.astype(dtype)
  temperature = jnp.asarray(temperature, dtype)
  is_target = jax.nn.one_hot(labels, student.shape[-1], dtype=bool)

  def binary(log_probs):
    # [log p_t, log(1 - p_t)]; the rest via logsumexp, stable as p_t -> 1.
    log_target = jnp.sum(jnp.where(is_target, log_probs, 0.0), axis=-1)
    log_rest = jax.nn.logsumexp(jnp.where(is_target, -jnp.inf, log_probs),
                                axis=-1)
    return jnp.stack([log_target, log_rest], axis=-1)

  def non_target(logits):
    return jax.nn.log_softmax(
        jnp.where(is_target, -jnp.inf, logits / temperature), axis=-1)

  log_p = jax.nn.log_softmax(teacher / temperature, axis=-1)
  log_q = jax.nn.log_softmax(student / temperature, axis=-1)
  tckd = _kl_terms(binary(log_p), binary(log_q))
  log_p_hat = non_target(teacher)
  log_q_hat = non_target(student)
  # The target entry is -inf on both sides: leave it out explicitly.
  log_p_hat = jnp.where(is_target, -jnp.inf, log_p_hat)
  log_q_hat = jnp.where(is_target, 0.0, log_q_hat)
  nckd = _kl_terms(log_p_hat, log_q_hat)
  return tckd, nckd


def dist(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
         beta: ArrayLike = 1.0, gamma: ArrayLike = 1.0,
         temperature: ArrayLike = 1.0, where: ArrayLike | None = None,
         axis_name: Any = None) -> jax.Array:
  r"""DIST: inter- and intra-class relations by Pearson correlation.

  With tempered probabilities :math:`Y^s = \mathrm{softmax}(Z^s / \tau)`,
  :math:`Y^t = \mathrm{softmax}(Z^t / \tau)` of shape ``[B, C]`` and the
  Pearson correlation :math:`\rho(a, b) = \frac{(a - \bar a) \cdot
  (b - \bar b)}{\|a - \bar a\| \|b - \bar b\| + \epsilon}`,
  :math:`\epsilon = 10^{-8}`:

  .. math::
    \mathcal{L}_\text{inter} = 1 - \frac{1}{B}\sum_{i=1}^{B}
        \rho(Y^s_{i,:}, Y^t_{i,:}), \quad
    \mathcal{L}_\text{intra} = 1 - \frac{1}{C}\sum_{j=1}^{C}
        \rho(Y^s_{:,j}, Y^t_{:,j}),

  .. math::
    \mathcal{L} = \tau^2 \left(\beta\, \mathcal{L}_\text{inter}
        + \gamma\, \mathcal{L}_\text{intra}\right)

  A **batch-level** loss (one scalar): the intra-class term correlates each
  class's column over the whole batch. Rows with ``where=False`` take no
  part (neither in the row mean nor in the column statistics). Under a
  data-parallel ``jit`` over a sharded batch the value is that of the
  global batch; inside ``shard_map`` pass ``axis_name`` so that the sums
  run over all shards.

  Args:
    student_logits: float array ``[B, C]``, :math:`Z^s`.
    teacher_logits: float array ``[B, C]``, :math:`Z^t`.
    beta: weight :math:`\beta \ge 0` of the inter-class term.
    gamma: weight :math:`\gamma \ge 0` of the intra-class term.
    temperature: positive scalar :math:`\tau`.
    where: optional bool mask ``[B]``.
    axis_name: optional mapped axis name (inside ``shard_map``).

  Returns:
    The scalar loss; 0 when no row is valid.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    >>> abs(float(losses.dist(student, student))) < 1e-5  # Same relations.
    True
    >>> round(float(losses.dist(student, -student)), 3)
    3.934

  References:
    Huang et al., `Knowledge Distillation from A Stronger Teacher
    <https://arxiv.org/abs/2205.10536>`_, NeurIPS 2022.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  if student.ndim != 2:
    raise ValueError(
        f'student_logits must be a batch of shape [B, C] (DIST correlates '
        f'columns over the batch), got shape {student.shape}; reshape to '
        f'[-1, num_classes].')
  _check_temperature(temperature)
  _check_scalar_weight(beta, 'beta')
  _check_scalar_weight(gamma, 'gamma')
  valid = _valid_mask(where, student.shape[:-1])
  inter, intra = _dist_terms(student, teacher, temperature, valid, axis_name)
  loss = (jnp.asarray(beta, inter.dtype) * inter
          + jnp.asarray(gamma, intra.dtype) * intra)
  return _scale(loss, temperature, True)


def _safe_norm(sum_of_squares: jax.Array) -> jax.Array:
  positive = sum_of_squares > 0
  return jnp.where(positive,
                   jnp.sqrt(jnp.where(positive, sum_of_squares, 1.0)), 0.0)


def _dist_terms(student: jax.Array, teacher: jax.Array, temperature: Any,
                valid: jax.Array, axis_name: Any
                ) -> tuple[jax.Array, jax.Array]:
  """Unscaled (inter, intra) of the valid rows; (0, 0) when there are none."""
  eps = 1e-8
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  y_s = jnp.exp(_tempered_log_softmax(student.astype(dtype), temperature))
  y_t = jnp.exp(_tempered_log_softmax(teacher.astype(dtype), temperature))
  weight = valid.astype(dtype)[:, None]

  def psum(x):
    return x if axis_name is None else jax.lax.psum(x, axis_name)

  # Rows: each example's correlation over its classes.
  a = y_s - jnp.mean(y_s, axis=-1, keepdims=True)
  b = y_t - jnp.mean(y_t, axis=-1, keepdims=True)
  rho_rows = jnp.sum(a * b, axis=-1) / (
      _safe_norm(jnp.sum(a * a, axis=-1))
      * _safe_norm(jnp.sum(b * b, axis=-1)) + eps)
  count = psum(jnp.sum(valid, dtype=dtype))
  rho_rows = psum(jnp.sum(jnp.where(valid, rho_rows, 0.0)))
  inter = jnp.where(count > 0, 1.0 - rho_rows / jnp.maximum(count, 1.0), 0.0)

  # Columns: each class's correlation over the valid examples of the batch.
  n = jnp.maximum(count, 1.0)
  a = (y_s - psum(jnp.sum(weight * y_s, axis=0)) / n) * weight
  b = (y_t - psum(jnp.sum(weight * y_t, axis=0)) / n) * weight
  rho_cols = psum(jnp.sum(a * b, axis=0)) / (
      _safe_norm(psum(jnp.sum(a * a, axis=0)))
      * _safe_norm(psum(jnp.sum(b * b, axis=0))) + eps)
  intra = jnp.where(count > 0, 1.0 - jnp.mean(rho_cols), 0.0)
  return inter, intra


# ----------------------------------------------------------------------------
# Ensembles of teachers.
# ----------------------------------------------------------------------------


def combine_teachers(teacher_logits: ArrayLike, method: str = 'mean_probs',
                     weights: ArrayLike | None = None, *,
                     temperature: ArrayLike = 1.0) -> jax.Array:
  r"""Combines K teachers' logits, stacked on axis 0, into one set.

  With normalised weights :math:`w_k` (uniform by default) and
  :math:`p_k = \mathrm{softmax}(v_k / T)`:

  - ``'mean_probs'``, the arithmetic mean of probabilities:

    .. math::
      \log \bar p = \mathrm{logsumexp}_k\left(\log p_k + \log w_k\right)

  - ``'mean_log_probs'``, the geometric mean, renormalised:

    .. math::
      \log \bar p = \mathrm{log\_softmax}\Big(\sum_k w_k \log p_k\Big)

  The result is returned as logits :math:`T \log \bar p`, so that
  ``tempered_softmax(result, temperature)`` is :math:`\bar p`; at the default
  ``temperature=1`` it is the combined log-probabilities.

  Which temperature to combine at: ``'mean_log_probs'`` gives the same
  soft targets at every temperature (tempering commutes with the geometric
  mean). ``'mean_probs'`` does not: combining at :math:`T=1` and tempering
  afterwards softens the ensemble's own predictive distribution, while
  combining at the distillation temperature averages the teachers'
  *tempered* distributions, as Hinton et al. (2015) average their soft
  targets. The trainer combines at :math:`T=1` by default, so that an
  ensemble distilled online and its exported logits cache
  (`kd_jax.export_logits`, which stores the :math:`T=1` combination) train
  the same student; ``config.distill.ensemble_temperature='distillation'``
  selects Hinton's average (`kd_jax.objective.combine`).

  Args:
    teacher_logits: float array ``[K, ..., num_classes]``.
    method: one of :data:`COMBINE_METHODS`.
    weights: optional non-negative per-teacher weights ``[K]`` with a positive
      sum; normalised to sum to 1.
    temperature: positive scalar :math:`T` at which to combine.

  Returns:
    Combined logits ``[..., num_classes]`` (log-probabilities when
    ``temperature=1``).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> teachers = jnp.log(jnp.array([[[0.9, 0.1]], [[0.5, 0.5]]]))  # K=2, B=1
    >>> def probs(log_probs):
    ...   return [round(p, 3) for p in jnp.exp(log_probs[0]).tolist()]
    >>> probs(losses.combine_teachers(teachers))
    [0.7, 0.3]
    >>> probs(losses.combine_teachers(teachers, weights=jnp.array([3.0, 1.0])))
    [0.8, 0.2]
    >>> probs(losses.combine_teachers(teachers, method='mean_log_probs'))
    [0.75, 0.25]

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015, Sec. 5.
  """
  _check_name(method, COMBINE_METHODS, 'method')
  teachers = _as_float_logits(teacher_logits, 'teacher_logits')
  if teachers.ndim < 2:
    raise ValueError(
        f'teacher_logits must stack teachers on axis 0, shape '
        f'[K, ..., num_classes], got shape {teachers.shape}; add a leading '
        f'axis for a single teacher.')
  _check_temperature(temperature)
  num_teachers = teachers.shape[0]
  if weights is None:
    weights = jnp.full((num_teachers,), 1.0 / num_teachers, teachers.dtype)
  else:
    weights = _normalised_weights(weights, num_teachers, teachers.dtype)
  log_probs = _tempered_log_softmax(teachers, temperature)
  weights = weights.reshape((num_teachers,) + (1,) * (teachers.ndim - 1))
  if method == 'mean_probs':
    # Stable log of the weighted mean: logsumexp with scale factors b = w.
    combined = jax.nn.logsumexp(log_probs, axis=0, b=weights)
  else:
    # Zero-weight teachers drop out exactly, even with -inf log-probs.
    weighted = jnp.where(weights > 0, weights * log_probs, 0.0)
    combined = jax.nn.log_softmax(jnp.sum(weighted, axis=0), axis=-1)
  return combined * jnp.asarray(temperature, combined.dtype)


def _normalised_weights(weights: ArrayLike, num_teachers: int,
                        dtype: Any) -> jax.Array:
  weights = jnp.asarray(weights)
  if weights.shape != (num_teachers,):
    raise ValueError(
        f'weights shape {weights.shape} does not match the {num_teachers} '
        f'teachers stacked on axis 0 of teacher_logits; pass one weight per '
        f'teacher, shape ({num_teachers},).')
  value = _concrete_value(weights)
  if value is not None:
    value = np.asarray(value, dtype=np.float64)
    if not (np.all(np.isfinite(value)) and np.all(value >= 0)
            and value.sum() > 0):
      raise ValueError(
          f'weights={value.tolist()} is invalid: teacher weights must be '
          f'finite, non-negative and have a positive sum; pass e.g. '
          f'[1.0] * {num_teachers} for a uniform ensemble.')
  weights = weights.astype(dtype)
  return weights / jnp.sum(weights)


# ----------------------------------------------------------------------------
# The training objective.
# ----------------------------------------------------------------------------


def masked_mean(values: ArrayLike, valid: ArrayLike,
                axis_name: Any = None) -> jax.Array:
  r"""Mean of `values` over the entries where `valid` is True.

  .. math::
    \bar\ell = \frac{\sum_b [\text{valid}_b]\, \ell_b}
                      {\max(1, \sum_b [\text{valid}_b])}

  Masked entries count neither in the sum nor in the count (a masked NaN
  stays out); no valid entry gives 0, not NaN.

  Args:
    values: float array of per-example values.
    valid: bool array of the same shape.
    axis_name: optional mapped axis name (inside ``shard_map``): the sums run
      over all shards.

  Returns:
    The scalar mean.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> float(losses.masked_mean(jnp.array([1.0, 3.0, jnp.nan]),
    ...                          jnp.array([True, True, False])))
    2.0
  """
  values = jnp.asarray(values)
  valid = jnp.asarray(valid, bool)
  if valid.shape != values.shape:
    raise ValueError(f'valid shape {valid.shape} does not match values shape '
                     f'{values.shape}; pass one bool per value.')
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(jnp.float32)
  total = jnp.sum(jnp.where(valid, values, 0.0))
  count = jnp.sum(valid, dtype=values.dtype)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total / jnp.maximum(count, 1.0)


def _weighted_terms(alpha: Any, teacher_logits: Any,
                    labels: Any) -> tuple[bool, bool]:
  """Whether the soft and the hard term carry weight; refuses a missing one."""
  alpha_value = _concrete_value(alpha)
  if alpha_value is not None:
    alpha_value = float(np.asarray(alpha_value))
  use_soft = alpha_value is None or alpha_value > 0
  use_hard = alpha_value is None or alpha_value < 1
  if teacher_logits is None and use_soft:
    raise ValueError(
        f'teacher_logits is None but alpha={alpha_value!r} gives the soft '
        f'term weight; pass teacher_logits, or alpha=0 to train on labels '
        f'only.')
  if labels is None and use_hard:
    raise ValueError(
        f'labels is None but alpha={alpha_value!r} gives the hard term weight '
        f'{"1 - alpha" if alpha_value is None else 1 - alpha_value}; pass '
        f'labels, or alpha=1 to train on the teacher only.')
  return use_soft, use_hard


def _soft_term(student: jax.Array, teacher_logits: ArrayLike, soft: str,
               temperature: Any, logit_standardization: bool) -> jax.Array:
  """Per-example soft loss of `distillation_loss`."""
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  if logit_standardization:
    student = _logit_standardize(student, 1e-7)
    teacher = _logit_standardize(teacher, 1e-7)
  if soft == 'kl':
    return _kl_divergence(student, teacher, temperature, True)
  if soft == 'soft_ce':
    return _soft_cross_entropy(student, teacher, temperature, True)
  return _logit_mse(student, teacher)


def _hard_term(student: jax.Array, labels: ArrayLike, hard: str,
               label_smoothing: Any, where: Any) -> jax.Array:
  """Per-example hard loss of `distillation_loss`."""
  labels, is_index = _label_info(labels, student)
  if is_index:
    _check_label_range(labels, student.shape[-1], where=where)
  if hard == 'ce':
    return _cross_entropy(student, labels, is_index, label_smoothing)
  return _mse_to_labels(student, labels, is_index, label_smoothing)


def distillation_loss(
    student_logits: ArrayLike,
    teacher_logits: ArrayLike | None,
    labels: ArrayLike | None,
    *,
    temperature: ArrayLike,
    alpha: ArrayLike,
    soft: str = 'kl',
    hard: str = 'ce',
    label_smoothing: ArrayLike = 0.0,
    where: ArrayLike | None = None,
    axis_name: Any = None,
    logit_standardization: bool = False,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  r"""The knowledge-distillation objective, averaged over valid examples.

  .. math::
    L = \alpha \, \overline{\ell_\text{soft}}
      + (1 - \alpha) \, \overline{\ell_\text{hard}}

  where the bar is the mean over examples with ``where=True``, the soft term
  is one of :data:`SOFT_LOSSES` (``'kl'``: :func:`kl_divergence`,
  ``'soft_ce'``: :func:`soft_cross_entropy`, both at temperature :math:`T`
  and scaled by :math:`T^2`; ``'logit_mse'``: :func:`logit_mse`, which ignores
  :math:`T`) and the hard term one of :data:`HARD_LOSSES` (``'ce'``:
  :func:`cross_entropy`, ``'mse'``: :func:`mse_to_labels`, both at
  :math:`T = 1` with ``label_smoothing``).

  **alpha weights the soft (teacher) term** (Hinton et al. and the Keras
  example weight the hard term: theirs is ``1 - alpha``). ``alpha = 1``
  needs no labels and ``alpha = 0`` no teacher (None); a missing term is
  reported as 0, a given one always, and a term of weight exactly 0
  (concrete ``alpha``) is left out of the total and its gradient. A mask
  with no valid example gives 0.

  Args:
    student_logits: float array ``[..., num_classes]``.
    teacher_logits: float array of the same shape, or None when ``alpha=0``.
      Use :func:`combine_teachers` for an ensemble.
    labels: integer class indices ``[...]`` or one-hot / probability targets
      ``[..., num_classes]``, or None when ``alpha=1``.
    temperature: positive scalar :math:`T` (may be traced).
    alpha: weight of the soft term, in [0, 1] (may be traced).
    soft: one of :data:`SOFT_LOSSES`.
    hard: one of :data:`HARD_LOSSES`.
    label_smoothing: smoothing :math:`\epsilon` of the hard targets.
    where: optional bool mask ``[...]``, False for padding examples.
    axis_name: optional mapped axis name (inside ``shard_map``) over which the
      mean runs, so that it averages over the valid examples of all shards.
    logit_standardization: compute the soft term on
      :func:`logit_standardize`-d student and teacher logits (Sun et al.,
      2024); the hard term always sees the raw logits.

  Returns:
    ``(loss, terms)``: the scalar :math:`L` and a dict with the scalars
    ``'soft'``, ``'hard'`` and ``'total'`` (``'total'`` is ``loss``).

  Raises:
    ValueError: for an unknown ``soft`` / ``hard``, a temperature <= 0, an
      alpha outside [0, 1], mismatched shapes, non-float logits, out-of-range
      labels (concrete labels only) or a missing teacher / labels.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0], [0.0, 4.0, 0.0]])
    >>> labels = jnp.array([0, 1])
    >>> loss, terms = losses.distillation_loss(
    ...     student, teacher, labels, temperature=2.0, alpha=0.9)
    >>> print({k: round(float(v), 3) for k, v in terms.items()})
    {'soft': 1.111, 'hard': 1.48, 'total': 1.148}

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015.
  """
  validate_distillation_args(temperature, alpha, soft, hard)
  _check_label_smoothing(label_smoothing)
  student = _as_float_logits(student_logits, 'student_logits')
  use_soft, use_hard = _weighted_terms(alpha, teacher_logits, labels)
  valid = _valid_mask(where, student.shape[:-1])
  zero = jnp.zeros((), student.dtype)
  soft_mean = hard_mean = zero
  if teacher_logits is not None:
    soft_loss = _soft_term(student, teacher_logits, soft, temperature,
                           logit_standardization)
    soft_mean = masked_mean(soft_loss, valid, axis_name)
  if labels is not None:
    hard_loss = _hard_term(student, labels, hard, label_smoothing, where)
    hard_mean = masked_mean(hard_loss, valid, axis_name)

  alpha = jnp.asarray(alpha, soft_mean.dtype)
  total = zero
  if use_soft:
    total = total + alpha * soft_mean
  if use_hard:
    total = total + (1.0 - alpha) * hard_mean
  return total, {'soft': soft_mean, 'hard': hard_mean, 'total': total}


# ----------------------------------------------------------------------------
# Sparse (top-k) teacher targets.
# ----------------------------------------------------------------------------


def topk_kl_divergence(student_logits: ArrayLike, topk_logits: ArrayLike,
                       topk_indices: ArrayLike, rest_mass: ArrayLike,
                       temperature: ArrayLike = 1.0,
                       scale_by_temperature_squared: bool = True,
                       where: ArrayLike | None = None) -> jax.Array:
  r"""KL divergence to a teacher known only by its top k classes and the rest.

  The teacher is stored sparsely: the logits :math:`v_{c_1}, \dots, v_{c_k}`
  of its k most likely classes :math:`S = \{c_1, \dots, c_k\}` and the mass
  :math:`r = \sum_{j \notin S} p_j` of the other classes at temperature
  :math:`T`. Both distributions are taken over the k + 1 buckets
  :math:`c_1, \dots, c_k, \text{rest}`:

  .. math::
    P_{c_i} = (1 - r)\, \mathrm{softmax}(v_S / T)_i, \quad
    P_\text{rest} = r, \qquad
    Q_{c_i} = q_{c_i}, \quad Q_\text{rest} = \sum_{j \notin S} q_j,

  with :math:`q = \mathrm{softmax}(z / T)`, and

  .. math::
    \ell = T^2 \, \mathrm{KL}(P \,\|\, Q)
         = T^2 \Big(\sum_{i=1}^{k} P_{c_i} \log \frac{P_{c_i}}{Q_{c_i}}
           + r \log \frac{r}{Q_\text{rest}}\Big).

  :math:`P_{c_i}` is exactly the teacher's tempered probability of class
  :math:`c_i`, so with k = C (r = 0) this is :func:`kl_divergence`; for
  k < C it is the KL of the coarsened distributions, a lower bound on the
  full KL (data processing), whose gradient pushes the student's mass
  outside S towards r without shaping it. Buckets with zero teacher mass
  contribute exactly 0. ``rest_mass`` must be the teacher's at the same
  :math:`T` (`kd_jax.export_logits --top_k` stores it so).

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    topk_logits: float array ``[..., k]``, the teacher's logits of its top k
      classes, :math:`v_S`.
    topk_indices: int array ``[..., k]`` of distinct class indices, :math:`S`.
    rest_mass: float array ``[...]`` in [0, 1], :math:`r`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask ``[...]``; False examples give 0 (value and
      gradient).

  Returns:
    Per-example divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0, 0.0]])
    >>> p = jax.nn.softmax(teacher)
    >>> top2 = losses.topk_kl_divergence(
    ...     student, jnp.array([[3.0, 2.0]]), jnp.array([[0, 1]]),
    ...     rest_mass=p[:, 2] + p[:, 3])
    >>> round(float(top2[0]), 4)
    1.081
    >>> all4 = losses.topk_kl_divergence(
    ...     student, teacher, jnp.array([[0, 1, 2, 3]]), jnp.zeros(1))
    >>> bool(jnp.allclose(all4, losses.kl_divergence(student, teacher)))
    True

  References:
    Hinton et al., `Distilling the Knowledge in a Neural Network
    <https://arxiv.org/abs/1503.02531>`_, 2015; the top-k + rest bucket
    form follows the sparse teacher targets of Shen and Xing, `A Fast
    Knowledge Distillation Framework for Visual Recognition
    <https://arxiv.org/abs/2112.01528>`_, ECCV 2022.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(topk_logits, 'topk_logits')
  indices = jnp.asarray(topk_indices)
  rest = jnp.asarray(rest_mass)
  _check_sparse_teacher(student, teacher, indices, rest)
  _check_temperature(temperature)
  num_classes = student.shape[-1]

  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  rest = rest.astype(dtype)
  log_q = _tempered_log_softmax(student.astype(dtype), temperature)
  log_q_top = jnp.take_along_axis(log_q, indices, axis=-1)
  in_top = jnp.any(jax.nn.one_hot(indices, num_classes, dtype=bool), axis=-2)
  # log of the student's mass outside S; -inf when S holds every class.
  log_q_rest = jax.nn.logsumexp(jnp.where(in_top, -jnp.inf, log_q), axis=-1)
  log_p_top = (_tempered_log_softmax(teacher.astype(dtype), temperature)
               + jnp.log1p(-jnp.minimum(rest, 1.0))[..., None])
  log_p = jnp.concatenate([log_p_top, jnp.log(rest)[..., None]], axis=-1)
  log_q = jnp.concatenate([log_q_top, log_q_rest[..., None]], axis=-1)
  p = jnp.exp(log_p)
  positive = p > 0
  # Double `where`: p = 0 buckets are 0 in value and gradient (no 0 * inf).
  log_ratio = jnp.where(positive, log_p, 0.0) - jnp.where(positive, log_q, 0.0)
  kl = jnp.sum(jnp.where(positive, p * log_ratio, 0.0), axis=-1)
  kl = _scale(kl, temperature, scale_by_temperature_squared)
  if where is not None:
    kl = jnp.where(jnp.asarray(where, bool), kl, 0.0)
  return kl


# ----------------------------------------------------------------------------
# Token-level divergences (language models).
# ----------------------------------------------------------------------------

TOKEN_DIVERGENCES = ('kl', 'reverse_kl', 'generalized_jsd', 'skew_kl',
                     'skew_reverse_kl', 'total_variation')
SPARSE_CONVENTIONS = ('tail', 'renormalize_both', 'student_full')
r"""How :func:`sparse_token_divergence` reads a top-k teacher.

The teacher is stored sparsely per position: the logits (or
log-probabilities: a shift does not matter) :math:`v_S` of its k most
likely tokens :math:`S = \{c_1, \dots, c_k\}` and the mass :math:`r =
\sum_{j \notin S} p_j` of the others at temperature :math:`T`. With
:math:`\hat p = \mathrm{softmax}(v_S / T)` and the student
:math:`q = \mathrm{softmax}(z / T)` over the full vocabulary, the
codebases that distil from such caches disagree on what the two
distributions are; ``convention`` picks one:

- ``'tail'`` (default): k + 1 buckets :math:`c_1, \dots, c_k,
  \text{rest}`, :math:`P = ((1 - r)\hat p,\; r)`, :math:`Q = (q_S,\;
  \sum_{j \notin S} q_j)`. :math:`P` is exactly the teacher's distribution
  coarsened, so every divergence here is a lower bound on the dense one
  (data processing) and equals it at k = V. ``divergence='kl'`` is
  :func:`topk_kl_divergence` (but for the underflow floor below). TRL's
  ``ServerDistillationTrainer`` (``loss_add_tail=True``, its default; it
  takes both tails as one minus the summed top-k probabilities, floored
  near :math:`10^{-7}`) and DistillKit with
  ``missing_probability_handling=SYMMETRIC_UNIFORM`` use this form.
- ``'renormalize_both'``: k buckets, :math:`P = \hat p`, :math:`Q =
  \mathrm{softmax}(z_S / T)`, both renormalised over S. The student's mass
  outside S is invisible (with k = 1 every divergence is 0). MaxText's
  offline distillation (``post_train/distillation/distillation_utils.py``,
  forward KL only) and TRL's server path with ``loss_add_tail=False`` use
  this form.
- ``'student_full'``: the full-vocabulary student against :math:`\hat p`
  extended by zeros, :math:`\sum_{i \in S} \hat p_i \log(\hat p_i / q_i)`
  for the KL. Each divergence here is a sum of
  :math:`g(p_j, q_j)` with :math:`g` homogeneous of degree 1, so the
  classes outside S are summed exactly as one bucket
  :math:`P_\text{rest} = 0`, :math:`Q_\text{rest} = \sum_{j \notin S} q_j`.
  DistillKit's sparse KL and TVD (its default
  ``missing_probability_handling=ZERO``) use this form; its sparse JSD
  also leaves out the student's term outside S, so it matches here only
  for the KL and TVD. The reverse KL (and ``generalized_jsd`` at
  ``beta=1``, ``skew_reverse_kl`` at ``skew=0``) is :math:`+\infty` in
  this form for k < V and is refused when those arguments are concrete.

The reverse KL against a top-k teacher without the tail is known to be
unstable: renormalised on both sides it does not see the mass the
student moves outside S (and is 0 for k = 1); against the full student
it is infinite. The tail bucket is what keeps it finite and meaningful,
which is why TRL adds it by default. In the tail form, a rest mass that
underflowed to 0 (k < V) is taken as the smallest normal float32
(~1.2e-38) where the student has mass outside S, so the reverse KL stays
finite.

References:
  TRL, ``trl/experimental/server_distillation/`` (tail bucket); MaxText,
  ``post_train/distillation/distillation_utils.py`` (renormalised top k);
  DistillKit, ``distillkit/lossfuncs/`` (full student); Shen and Xing,
  `A Fast Knowledge Distillation Framework for Visual Recognition
  <https://arxiv.org/abs/2112.01528>`_, ECCV 2022 (top-k + rest).
"""


def _check_unit_interval(value: Any, name: str, meaning: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(f'{name} must be a scalar, got shape '
                     f'{jnp.shape(value)}; pass one number in [0, 1].')
  value = _concrete_value(value)
  if value is None:
    return
  value = float(np.asarray(value))
  if not 0.0 <= value <= 1.0:
    raise ValueError(f'{name}={value!r} is invalid: it is {meaning} and must '
                     f'lie in [0, 1]; pass {name} in [0, 1].')


def _kl_sum(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
  """sum_i p_i (log p_i - log q_i) over the last axis; p_i = 0 terms are 0
  (value and gradient); NaN propagates."""
  p = jnp.exp(log_p)
  # `!= 0`, not `> 0`: NaN teacher values must propagate, not vanish.
  nonzero = p != 0
  # Double `where`: p = 0 terms are 0 in value and in gradient (no 0 * inf).
  log_ratio = jnp.where(nonzero, log_p, 0.0) - jnp.where(nonzero, log_q, 0.0)
  return jnp.sum(jnp.where(nonzero, p * log_ratio, 0.0), axis=-1)


def _log_mixture(log_a: jax.Array, log_b: jax.Array,
                 weight_a: Any) -> jax.Array:
  """log(w a + (1 - w) b), elementwise, from log a and log b."""
  weight_a = jnp.asarray(weight_a, log_a.dtype)
  x = log_a + jnp.log(weight_a)
  y = log_b + jnp.log1p(-weight_a)
  hi, lo = jnp.maximum(x, y), jnp.minimum(x, y)
  # A zero term (-inf) is routed around log1p(exp(lo - hi)): jnp.logaddexp's
  # gradient overflows to inf there when the other term is very negative.
  both = lo > -jnp.inf
  return jnp.where(both, hi + jnp.log1p(jnp.exp(jnp.where(both, lo - hi, 0.0))),
                   hi)


def _generalized_jsd_terms(log_p: jax.Array, log_q: jax.Array,
                           beta: Any) -> jax.Array:
  """TRL's JSD(beta) of teacher p and student q; KLs at beta = 0 and 1."""

  def interior(beta, log_p, log_q):
    log_m = _log_mixture(log_p, log_q, beta)
    return beta * _kl_sum(log_p, log_m) + (1 - beta) * _kl_sum(log_q, log_m)

  value = _concrete_value(beta)
  if value is not None:
    value = float(np.asarray(value))
    if value == 0.0:
      return _kl_sum(log_p, log_q)
    if value == 1.0:
      return _kl_sum(log_q, log_p)
    return interior(jnp.asarray(value, log_p.dtype), log_p, log_q)
  beta = jnp.asarray(beta, log_p.dtype)
  at_zero, at_one = beta == 0, beta == 1
  # The branches not taken see p = q (0 with a finite gradient): a KL that is
  # infinite off its endpoint must not leak NaN into the gradient.
  forward = _kl_sum(log_p, jnp.where(at_zero, log_q, log_p))
  reverse = _kl_sum(log_q, jnp.where(at_one, log_p, log_q))
  inner = interior(jnp.where(at_zero | at_one, 0.5, beta), log_p, log_q)
  return jnp.where(at_zero, forward, jnp.where(at_one, reverse, inner))


def _divergence_terms(log_p: jax.Array, log_q: jax.Array, divergence: str,
                      beta: Any, skew: Any) -> jax.Array:
  """Unscaled divergence of student log q from teacher log p, last axis."""
  if divergence == 'kl':
    return _kl_sum(log_p, log_q)
  if divergence == 'reverse_kl':
    return _kl_sum(log_q, log_p)
  if divergence == 'generalized_jsd':
    return _generalized_jsd_terms(log_p, log_q, beta)
  if divergence == 'skew_kl':
    return _kl_sum(log_p, _log_mixture(log_p, log_q, skew))
  if divergence == 'skew_reverse_kl':
    return _kl_sum(log_q, _log_mixture(log_q, log_p, skew))
  return 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=-1)


def _check_divergence_args(divergence: str, temperature: Any, beta: Any,
                           skew: Any) -> None:
  _check_name(divergence, TOKEN_DIVERGENCES, 'divergence')
  _check_temperature(temperature)
  _check_unit_interval(beta, 'beta', "the teacher's weight in the mixture "
                       'm = beta p + (1 - beta) q (0: forward KL, 1: reverse '
                       'KL)')
  _check_unit_interval(skew, 'skew', 'the weight of the first distribution '
                       'in the skewed mixture (0: no skew)')


def token_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
                     divergence: str = 'kl', temperature: ArrayLike = 1.0,
                     beta: ArrayLike = 0.5, skew: ArrayLike = 0.1,
                     scale_by_temperature_squared: bool = True,
                     where: ArrayLike | None = None) -> jax.Array:
  r"""A divergence between teacher and student, per position, chosen by name.

  The dense form of :func:`sparse_token_divergence`, with the same keywords:
  ``divergence`` is one of :data:`TOKEN_DIVERGENCES`, computed as
  ``'kl'`` :math:`\mathrm{KL}(p \| q)` (:func:`kl_divergence`),
  ``'reverse_kl'`` (:func:`reverse_kl_divergence`), ``'generalized_jsd'``
  (:func:`generalized_jsd`, uses ``beta``), ``'skew_kl'``
  (:func:`skew_kl_divergence`, uses ``skew``), ``'skew_reverse_kl'``
  (:func:`skew_reverse_kl_divergence`, uses ``skew``) and
  ``'total_variation'`` (:func:`total_variation`), on
  :math:`p = \mathrm{softmax}(v / T)` (teacher) and
  :math:`q = \mathrm{softmax}(z / T)` (student), times :math:`T^2` when
  ``scale_by_temperature_squared``.

  Masked positions (``where=False``) are 0 in value and gradient, whatever
  their logits hold (their inputs are replaced before the math, so neither
  NaN nor infinity leaks through).

  Args:
    student_logits: float array ``[..., vocab]`` (e.g. ``[B, L, V]``).
    teacher_logits: float array of the same shape.
    divergence: one of :data:`TOKEN_DIVERGENCES`.
    temperature: positive scalar :math:`T`.
    beta: :math:`\beta \in [0, 1]` of ``'generalized_jsd'``.
    skew: :math:`\alpha \in [0, 1]` of the skewed KLs.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape (e.g. ``[B, L]``).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]])  # [1, 2, 3]
    >>> teacher = jnp.array([[[3.0, 2.0, 1.0], [5.0, 0.0, 0.0]]])
    >>> kl = losses.token_divergence(student, teacher, temperature=2.0)
    >>> bool(jnp.allclose(kl, losses.kl_divergence(student, teacher, 2.0)))
    True
    >>> padding = jnp.array([[True, False]])  # The second token is padding.
    >>> rkl = losses.token_divergence(student, teacher, divergence='reverse_kl',
    ...                               where=padding)
    >>> [round(x, 3) for x in rkl[0].tolist()]
    [1.15, 0.0]

  References:
    See the function of each divergence.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_divergence_args(divergence, temperature, beta, skew)
  valid = _valid_mask(where, student.shape[:-1])
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  # Masked positions compute on zeros: no NaN or inf reaches the gradient.
  student = jnp.where(valid[..., None], student.astype(dtype), 0.0)
  teacher = jnp.where(valid[..., None], teacher.astype(dtype), 0.0)
  log_q = _tempered_log_softmax(student, temperature)
  log_p = _tempered_log_softmax(teacher, temperature)
  loss = _divergence_terms(log_p, log_q, divergence, beta, skew)
  loss = _scale(loss, temperature, scale_by_temperature_squared)
  return jnp.where(valid, loss, 0.0)


def reverse_kl_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike,
                          temperature: ArrayLike = 1.0, *,
                          scale_by_temperature_squared: bool = True,
                          where: ArrayLike | None = None) -> jax.Array:
  r"""Reverse KL: the student's tempered softmax from the teacher's.

  .. math::
    \ell = T^2 \, \mathrm{KL}(q \,\|\, p)
         = T^2 \sum_i q_i \left(\log q_i - \log p_i\right),
    \quad p = \mathrm{softmax}(v / T),\; q = \mathrm{softmax}(z / T)

  Mode-seeking: the student is penalised for mass where the teacher has
  little, not for missing some of the teacher's modes, which suits a small
  student of a generative teacher (Gu et al., 2024). Terms with
  :math:`q_i = 0` contribute exactly 0; a teacher probability that
  underflows to 0 at a finite logit gives a large but finite value (the
  log-probabilities are used, not the probabilities); a teacher logit of
  :math:`-\infty` where the student has mass gives :math:`+\infty`.

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 1.0, 1.0], [0.0, 0.0, 0.0]])
    >>> kl = losses.reverse_kl_divergence(student, teacher)
    >>> [round(x, 3) for x in kl.tolist()]
    [1.227, 0.0]

  References:
    Gu et al., `MiniLLM: Knowledge Distillation of Large Language Models
    <https://arxiv.org/abs/2306.08543>`_, ICLR 2024.
  """
  return token_divergence(
      student_logits, teacher_logits, divergence='reverse_kl',
      temperature=temperature,
      scale_by_temperature_squared=scale_by_temperature_squared, where=where)


def generalized_jsd(student_logits: ArrayLike, teacher_logits: ArrayLike,
                    beta: ArrayLike = 0.5, temperature: ArrayLike = 1.0, *,
                    scale_by_temperature_squared: bool = True,
                    where: ArrayLike | None = None) -> jax.Array:
  r"""Generalized Jensen-Shannon divergence, in TRL's convention.

  With the teacher :math:`p = \mathrm{softmax}(v / T)`, the student
  :math:`q = \mathrm{softmax}(z / T)` and the mixture
  :math:`m = \beta p + (1 - \beta) q`:

  .. math::
    \mathrm{JSD}_\beta = \begin{cases}
      \mathrm{KL}(p \,\|\, q) & \beta = 0, \\
      \beta\, \mathrm{KL}(p \,\|\, m) + (1 - \beta)\, \mathrm{KL}(q \,\|\, m)
        & 0 < \beta < 1, \\
      \mathrm{KL}(q \,\|\, p) & \beta = 1,
    \end{cases}
    \qquad \ell = T^2\, \mathrm{JSD}_\beta

  as ``GKDTrainer.generalized_jsd_loss`` of TRL computes it (Agarwal et al.,
  2024, Eq. 1), with :math:`\log m` from a log-sum-exp of the two
  log-probabilities. ``beta = 0.5`` is the symmetric JSD, at most
  :math:`\log 2`.

  **The endpoints jump.** The interior form tends to 0 at both ends: near
  :math:`\beta = 0` it is :math:`\beta\, \mathrm{KL}(p \| q) + O(\beta^2)`,
  near :math:`\beta = 1` it is :math:`(1 - \beta)\, \mathrm{KL}(q \| p) +
  O((1 - \beta)^2)`; TRL (and this function) define the endpoints as the full
  forward and reverse KL instead, the limits of :math:`\mathrm{JSD}_\beta /
  \beta` and :math:`\mathrm{JSD}_\beta / (1 - \beta)`. A sweep over
  :math:`\beta` therefore changes scale by a factor of about
  :math:`1/\beta` at the ends. A traced ``beta`` (under ``jit``/``vmap``)
  selects the same three cases.

  DistiLLM's ``js_distance(lam)`` is this with :math:`\beta = 1 - \lambda`.
  TRL does not multiply by :math:`T^2`: pass
  ``scale_by_temperature_squared=False`` to reproduce its values at
  :math:`T \ne 1`.

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    teacher_logits: float array of the same shape, :math:`v`.
    beta: :math:`\beta \in [0, 1]`, the teacher's weight in :math:`m`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 1.0, 1.0]])
    >>> [round(float(losses.generalized_jsd(student, teacher, beta)[0]), 4)
    ...  for beta in (0.0, 0.001, 0.5, 0.999, 1.0)]
    [1.4225, 0.0014, 0.2854, 0.0012, 1.2271]

  References:
    Agarwal et al., `On-Policy Distillation of Language Models: Learning
    from Self-Generated Mistakes <https://arxiv.org/abs/2306.13649>`_,
    ICLR 2024; TRL, ``trl/experimental/gkd/gkd_trainer.py``.
  """
  return token_divergence(
      student_logits, teacher_logits, divergence='generalized_jsd', beta=beta,
      temperature=temperature,
      scale_by_temperature_squared=scale_by_temperature_squared, where=where)


def skew_kl_divergence(student_logits: ArrayLike, teacher_logits: ArrayLike,
                       skew: ArrayLike = 0.1, temperature: ArrayLike = 1.0, *,
                       scale_by_temperature_squared: bool = True,
                       where: ArrayLike | None = None) -> jax.Array:
  r"""Skew KL: the teacher from a mixture of teacher and student (DistiLLM).

  .. math::
    \ell = T^2 \, \mathrm{KL}\big(p \,\|\, \alpha p + (1 - \alpha) q\big),
    \quad p = \mathrm{softmax}(v / T),\; q = \mathrm{softmax}(z / T)

  with the skew :math:`\alpha` (Ko et al., 2024, Eq. 3). Mixing some of
  the teacher into the student's side bounds the log-ratio by
  :math:`-\log \alpha` and so the gradient, where the student gives the
  teacher's tokens almost no mass. :math:`\alpha = 0` is
  :func:`kl_divergence`; :math:`\alpha = 1` is 0. DistiLLM's
  ``skewed_forward_kl`` returns the cross-entropy
  :math:`-\sum_i p_i \log m_i`, which is this plus the teacher's entropy
  (same gradient w.r.t. the student).

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    teacher_logits: float array of the same shape, :math:`v`.
    skew: :math:`\alpha \in [0, 1]` (DistiLLM uses 0.1).
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 1.0, 1.0]])
    >>> [round(float(losses.skew_kl_divergence(student, teacher, skew)[0]), 3)
    ...  for skew in (0.0, 0.1, 1.0)]
    [1.423, 0.987, 0.0]

  References:
    Ko et al., `DistiLLM: Towards Streamlined Distillation for Large
    Language Models <https://arxiv.org/abs/2402.03898>`_, ICML 2024.
  """
  return token_divergence(
      student_logits, teacher_logits, divergence='skew_kl', skew=skew,
      temperature=temperature,
      scale_by_temperature_squared=scale_by_temperature_squared, where=where)


def skew_reverse_kl_divergence(student_logits: ArrayLike,
                               teacher_logits: ArrayLike,
                               skew: ArrayLike = 0.1,
                               temperature: ArrayLike = 1.0, *,
                               scale_by_temperature_squared: bool = True,
                               where: ArrayLike | None = None) -> jax.Array:
  r"""Skew reverse KL: the student from a mixture (DistiLLM).

  .. math::
    \ell = T^2 \, \mathrm{KL}\big(q \,\|\, (1 - \alpha) p + \alpha q\big),
    \quad p = \mathrm{softmax}(v / T),\; q = \mathrm{softmax}(z / T)

  with the skew :math:`\alpha` (Ko et al., 2024, Eq. 4; DistiLLM's
  ``skewed_reverse_kl``). :math:`\alpha = 0` is
  :func:`reverse_kl_divergence`; :math:`\alpha = 1` is 0; for
  :math:`\alpha > 0` the value is at most :math:`-\log \alpha` even where the
  teacher gives the student's tokens no mass.

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    teacher_logits: float array of the same shape, :math:`v`.
    skew: :math:`\alpha \in [0, 1]` (DistiLLM uses 0.1).
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 1.0, 1.0]])
    >>> [round(float(losses.skew_reverse_kl_divergence(
    ...     student, teacher, skew)[0]), 3) for skew in (0.0, 0.1, 1.0)]
    [1.227, 0.925, 0.0]

  References:
    Ko et al., `DistiLLM: Towards Streamlined Distillation for Large
    Language Models <https://arxiv.org/abs/2402.03898>`_, ICML 2024.
  """
  return token_divergence(
      student_logits, teacher_logits, divergence='skew_reverse_kl', skew=skew,
      temperature=temperature,
      scale_by_temperature_squared=scale_by_temperature_squared, where=where)


def total_variation(student_logits: ArrayLike, teacher_logits: ArrayLike,
                    temperature: ArrayLike = 1.0, *,
                    scale_by_temperature_squared: bool = True,
                    where: ArrayLike | None = None) -> jax.Array:
  r"""Total variation distance between teacher and student.

  .. math::
    \ell = T^2 \cdot \tfrac12 \sum_i |p_i - q_i|,
    \quad p = \mathrm{softmax}(v / T),\; q = \mathrm{softmax}(z / T)

  In [0, 1] before the :math:`T^2` factor, which is kept (on by default)
  so that the token divergences are interchangeable in one objective; its
  rationale (Hinton et al., 2015) is for the KL family, whose gradient
  scales as :math:`1/T^2`. Identical inputs have a zero, finite gradient.

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T`.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient).

  Returns:
    Per-position distance, shape ``student_logits.shape[:-1]``, in
    :math:`[0, T^2]` (:math:`[0, 1]` unscaled).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.log(jnp.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]]))
    >>> teacher = jnp.log(jnp.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]]))
    >>> [round(x, 3) for x in losses.total_variation(student, teacher).tolist()]
    [0.5, 0.0]

  References:
    Wen et al., `f-Divergence Minimization for Sequence-Level Knowledge
    Distillation <https://arxiv.org/abs/2307.15190>`_, ACL 2023.
  """
  return token_divergence(
      student_logits, teacher_logits, divergence='total_variation',
      temperature=temperature,
      scale_by_temperature_squared=scale_by_temperature_squared, where=where)


def _check_sparse_teacher(student: jax.Array, teacher: jax.Array,
                          indices: jax.Array, rest: jax.Array | None,
                          where: Any = None) -> None:
  """Shapes always; index and rest-mass values when concrete (and valid)."""
  num_classes, k = student.shape[-1], teacher.shape[-1]
  if indices.shape != teacher.shape or teacher.shape[:-1] != student.shape[:-1]:
    raise ValueError(
        f'topk_logits shape {teacher.shape} and topk_indices shape '
        f'{indices.shape} must both be student_logits.shape[:-1] + (k,) = '
        f'{student.shape[:-1]} + (k,); pass one row of k classes per example.')
  if not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(f'topk_indices must be integer class indices, got dtype '
                     f'{indices.dtype}.')
  if k > num_classes:
    raise ValueError(f'topk_logits has k={k} classes but the student only '
                     f'{num_classes}; k must be <= num_classes.')
  if rest is not None and rest.shape != student.shape[:-1]:
    raise ValueError(f'rest_mass shape {rest.shape} must be '
                     f'{student.shape[:-1]}: one mass per example.')
  valid = True if where is None else _concrete_value(where)
  if valid is None:
    return
  valid = np.broadcast_to(np.asarray(valid, bool), student.shape[:-1])
  value = _concrete_value(indices)
  if value is not None:
    value = np.sort(np.asarray(value), axis=-1)[valid]
    if value.size and (value.min() < 0 or value.max() >= num_classes
                       or np.any(value[..., 1:] == value[..., :-1])):
      raise ValueError(
          f'topk_indices must hold k distinct class indices in [0, '
          f'{num_classes}) per example; got values in [{value.min()}, '
          f'{value.max()}] or a repeated class.')
  rest_value = None if rest is None else _concrete_value(rest)
  if rest_value is not None:
    rest_value = np.asarray(rest_value)[valid]
  if rest_value is not None and np.any((rest_value < 0) | (rest_value > 1)):
    raise ValueError('rest_mass must lie in [0, 1] (a probability mass); '
                     'store 1 - sum of the top-k probabilities.')


def _sparse_log_probs(student: jax.Array, teacher: jax.Array,
                      indices: jax.Array, rest: jax.Array, convention: str,
                      temperature: Any) -> tuple[jax.Array, jax.Array]:
  """(log P, log Q): teacher and student over the buckets of `convention`."""
  num_classes, k = student.shape[-1], teacher.shape[-1]
  log_p_top = _tempered_log_softmax(teacher, temperature)
  if convention == 'renormalize_both':
    student_top = jnp.take_along_axis(student, indices, axis=-1)
    return log_p_top, _tempered_log_softmax(student_top, temperature)
  log_q = _tempered_log_softmax(student, temperature)
  log_q_top = jnp.take_along_axis(log_q, indices, axis=-1)
  if k == num_classes:  # S holds every class: there is no rest bucket.
    return log_p_top, log_q_top
  in_top = jnp.put_along_axis(jnp.zeros(student.shape, bool), indices, True,
                              axis=-1, inplace=False)
  outside = jnp.where(in_top, -jnp.inf, log_q)
  has_rest = jnp.any(outside > -jnp.inf, axis=-1)
  # Guarded logsumexp: a row with no student mass outside S is -inf, and its
  # gradient stays finite.
  log_q_rest = jnp.where(
      has_rest,
      jax.nn.logsumexp(jnp.where(has_rest[..., None], outside, 0.0), axis=-1),
      -jnp.inf)
  if convention == 'student_full':
    log_p_rest = jnp.full_like(log_q_rest, -jnp.inf)
  else:
    positive = rest > 0
    # A rest mass that underflowed to 0 where the student still has mass
    # outside S is the smallest normal float: reverse-type divergences stay
    # finite (the tail's point), forward ones change by ~1e-36.
    log_p_rest = jnp.where(
        positive, jnp.log(jnp.where(positive, rest, 1.0)),
        jnp.where(has_rest, np.log(np.finfo(np.float32).tiny), -jnp.inf)
    ).astype(log_q.dtype)
    log_p_top = log_p_top + jnp.log1p(-jnp.minimum(rest, 1.0))[..., None]
  return (jnp.concatenate([log_p_top, log_p_rest[..., None]], axis=-1),
          jnp.concatenate([log_q_top, log_q_rest[..., None]], axis=-1))


def _check_sparse_convention(convention: str, divergence: str, k: int,
                             num_classes: int, rest: Any, beta: Any,
                             skew: Any) -> None:
  """Refuses a missing tail mass and the divergences that are infinite."""
  if convention == 'tail' and k < num_classes and rest is None:
    raise ValueError(
        f"convention='tail' needs rest_mass (the teacher's mass outside its "
        f'top k={k} of {num_classes} classes, at the same temperature); pass '
        f"it, or pick convention='renormalize_both' or 'student_full'.")
  if convention == 'student_full' and k < num_classes:
    beta_value, skew_value = _concrete_value(beta), _concrete_value(skew)
    if (divergence == 'reverse_kl'
        or (divergence == 'generalized_jsd' and beta_value is not None
            and float(np.asarray(beta_value)) == 1.0)
        or (divergence == 'skew_reverse_kl' and skew_value is not None
            and float(np.asarray(skew_value)) == 0.0)):
      raise ValueError(
          f"divergence={divergence!r} is infinite with convention="
          f"'student_full': the teacher renormalised on its top k has no "
          f'mass outside it, where the student has some; use '
          f"convention='tail' (with rest_mass) or 'renormalize_both'.")


def sparse_token_divergence(student_logits: ArrayLike, topk_logits: ArrayLike,
                            topk_indices: ArrayLike,
                            rest_mass: ArrayLike | None = None, *,
                            divergence: str = 'kl', convention: str = 'tail',
                            temperature: ArrayLike = 1.0,
                            beta: ArrayLike = 0.5, skew: ArrayLike = 0.1,
                            scale_by_temperature_squared: bool = True,
                            where: ArrayLike | None = None) -> jax.Array:
  r"""A token divergence to a teacher known by its top k (a cached teacher).

  The teacher is stored sparsely per position: the logits (or
  log-probabilities: a shift does not matter) :math:`v_S` of its k most
  likely tokens :math:`S` and the mass :math:`r` of the others at
  temperature :math:`T`; the student :math:`q = \mathrm{softmax}(z / T)` is
  over the full vocabulary. ``convention`` is what the two distributions are
  (:data:`SPARSE_CONVENTIONS` says where each is used): ``'tail'`` (k + 1
  buckets, the teacher's distribution coarsened; the default),
  ``'renormalize_both'`` (both renormalised over S) or ``'student_full'``
  (the full student against the renormalised teacher, where the reverse KL
  is infinite for k < V and refused when its arguments are concrete).

  ``divergence`` (one of :data:`TOKEN_DIVERGENCES`) is applied to the two
  as :func:`token_divergence` is to dense ones; with k = V every convention
  equals it. ``rest_mass`` must be the teacher's at the same :math:`T`;
  only ``'tail'`` with k < V needs it.

  Args:
    student_logits: float array ``[..., vocab]``, :math:`z` (e.g.
      ``[B, L, V]``).
    topk_logits: float array ``[..., k]``, the teacher's logits (or
      log-probabilities) of its top k tokens, :math:`v_S`.
    topk_indices: int array ``[..., k]`` of distinct token indices, :math:`S`.
    rest_mass: float array ``[...]`` in [0, 1], :math:`r`; needed by
      ``'tail'`` when k < V.
    divergence: one of :data:`TOKEN_DIVERGENCES`.
    convention: one of :data:`SPARSE_CONVENTIONS`.
    temperature: positive scalar :math:`T`.
    beta: :math:`\beta \in [0, 1]` of ``'generalized_jsd'``.
    skew: :math:`\alpha \in [0, 1]` of the skewed KLs.
    scale_by_temperature_squared: multiply by :math:`T^2`.
    where: optional bool mask of the leading shape; False positions give 0
      (value and gradient) and are not checked (padding may hold any index).

  Returns:
    Per-position divergence, shape ``student_logits.shape[:-1]``, >= 0.

  Raises:
    ValueError: for bad shapes, repeated or out-of-range indices or a rest
      mass outside [0, 1] (concrete values only), a missing ``rest_mass``
      for ``'tail'``, or a reverse-type divergence with ``'student_full'``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0, 0.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0, 0.0]])
    >>> rest = jax.nn.softmax(teacher)[:, 2:].sum(-1)
    >>> top, idx = jnp.array([[3.0, 2.0]]), jnp.array([[0, 1]])
    >>> for convention in losses.SPARSE_CONVENTIONS:
    ...   kl = losses.sparse_token_divergence(student, top, idx, rest,
    ...                                       convention=convention)
    ...   print(convention, round(float(kl[0]), 3))
    tail 1.081
    renormalize_both 0.462
    student_full 1.589
    >>> rkl = losses.sparse_token_divergence(student, top, idx, rest,
    ...                                      divergence='reverse_kl')
    >>> round(float(rkl[0]), 3)
    0.999

  References:
    See :data:`SPARSE_CONVENTIONS`.
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(topk_logits, 'topk_logits')
  indices = jnp.asarray(topk_indices)
  rest = None if rest_mass is None else jnp.asarray(rest_mass)
  _check_name(convention, SPARSE_CONVENTIONS, 'convention')
  _check_divergence_args(divergence, temperature, beta, skew)
  valid = _valid_mask(where, student.shape[:-1])
  _check_sparse_teacher(student, teacher, indices, rest, valid)
  num_classes, k = student.shape[-1], teacher.shape[-1]
  _check_sparse_convention(convention, divergence, k, num_classes, rest, beta,
                           skew)

  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  # Masked positions compute on zeros and the classes 0..k-1: no NaN, inf or
  # out-of-range index reaches the value or the gradient.
  student = jnp.where(valid[..., None], student.astype(dtype), 0.0)
  teacher = jnp.where(valid[..., None], teacher.astype(dtype), 0.0)
  indices = jnp.where(valid[..., None], indices,
                      jnp.arange(k, dtype=indices.dtype))
  rest = (jnp.zeros(valid.shape, dtype) if rest is None else
          jnp.where(valid, rest.astype(dtype), 0.0))
  log_p, log_q = _sparse_log_probs(student, teacher, indices, rest,
                                   convention, temperature)
  loss = _divergence_terms(log_p, log_q, divergence, beta, skew)
  loss = _scale(loss, temperature, scale_by_temperature_squared)
  return jnp.where(valid, loss, 0.0)


# ----------------------------------------------------------------------------
# Token reductions.
# ----------------------------------------------------------------------------


def token_sum_and_count(values: ArrayLike, where: ArrayLike | None = None,
                        axis_name: Any = None) -> tuple[jax.Array, jax.Array]:
  r"""The sum of per-token values and the number of valid tokens.

  .. math::
    (S, N) = \Big(\sum_t [\text{valid}_t]\, \ell_t,\;
                  \sum_t [\text{valid}_t]\Big)

  Pairs add: the pairs of micro-batches (gradient accumulation), devices or
  hosts summed, then :func:`token_mean`, give the mean over all their valid
  tokens, the same however the tokens were split or padded. (Averaging
  per-batch means instead weights a short batch's tokens more.) Masked
  entries count in neither (a masked NaN stays out).

  Args:
    values: float array of per-token values, e.g. ``[B, L]``.
    where: optional bool mask of the same shape; None counts every entry.
    axis_name: optional mapped axis name (inside ``shard_map``): both sums
      run over all shards.

  Returns:
    ``(total, count)``: the scalar sum (float32 or wider) and the int32
    count.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> values = jnp.array([[1.0, 2.0, jnp.nan], [4.0, 5.0, 6.0]])
    >>> valid = jnp.array([[True, True, False], [True, True, True]])
    >>> whole = losses.token_sum_and_count(values, valid)
    >>> halves = [losses.token_sum_and_count(values[i:i + 1], valid[i:i + 1])
    ...           for i in (0, 1)]
    >>> total = sum(h[0] for h in halves)
    >>> count = sum(h[1] for h in halves)
    >>> float(total), int(count), float(whole[0]), int(whole[1])
    (18.0, 5, 18.0, 5)
    >>> round(float(losses.token_mean(total, count)), 3)
    3.6
  """
  values = jnp.asarray(values)
  if not jnp.issubdtype(values.dtype, jnp.floating):
    values = values.astype(jnp.float32)
  values = values.astype(jnp.promote_types(values.dtype, jnp.float32))
  if where is None:
    valid = jnp.ones(values.shape, bool)
  else:
    valid = jnp.asarray(where)
    if valid.shape != values.shape:
      raise ValueError(f'where shape {valid.shape} does not match values '
                       f'shape {values.shape}; pass one bool per token.')
    valid = valid.astype(bool)
  total = jnp.sum(jnp.where(valid, values, 0.0))
  count = jnp.sum(valid, dtype=jnp.int32)
  if axis_name is not None:
    total, count = jax.lax.psum((total, count), axis_name)
  return total, count


def token_mean(total: ArrayLike, count: ArrayLike) -> jax.Array:
  r"""The mean :math:`S / N` of a :func:`token_sum_and_count` pair; 0 when
  :math:`N = 0`.

  Args:
    total: the summed values :math:`S` (a scalar, or any shape).
    count: the number of valid tokens :math:`N`, same shape.

  Returns:
    :math:`S / N`, or 0 where :math:`N = 0` (value and gradient).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> float(losses.token_mean(jnp.array(7.0), jnp.array(2)))
    3.5
    >>> float(losses.token_mean(jnp.array(0.0), jnp.array(0)))
    0.0
  """
  total = jnp.asarray(total)
  if not jnp.issubdtype(total.dtype, jnp.floating):
    total = total.astype(jnp.float32)
  count = jnp.asarray(count).astype(total.dtype)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 0.0)


# ----------------------------------------------------------------------------
# NKD, TTM/WTTM and MLKD.
# ----------------------------------------------------------------------------


def _target_labels(labels: ArrayLike, logits: jax.Array, method: str,
                   where: Any) -> jax.Array:
  """Integer targets from class indices or from (mixed) label probabilities."""
  labels, is_index = _label_info(labels, logits)
  if logits.shape[-1] < 2:
    raise ValueError(
        f'student_logits has {logits.shape[-1]} class(es); {method} needs at '
        f'least 2 (a target and a non-target class).')
  if not is_index:
    # The authors' code takes the largest entry of soft (mixup/CutMix) labels.
    return jnp.argmax(labels, axis=-1)
  _check_label_range(labels, logits.shape[-1], where=where)
  return labels


def nkd_loss(student_logits: ArrayLike, teacher_logits: ArrayLike,
             labels: ArrayLike, *, gamma: ArrayLike = 1.5,
             temperature: ArrayLike = 1.0,
             where: ArrayLike | None = None) -> jax.Array:
  r"""Normalized KD: a target term and a normalized non-target term.

  With the label :math:`t`, the untempered probabilities :math:`p =
  \mathrm{softmax}(v)` (teacher) and :math:`q = \mathrm{softmax}(z)`
  (student), and the distributions over the non-target classes at
  temperature :math:`T`, :math:`\hat p_i = \mathrm{softmax}_{j \ne t}(v_j /
  T)_i` and :math:`\hat q_i = \mathrm{softmax}_{j \ne t}(z_j / T)_i`:

  .. math::
    \ell = -p_t \log q_t \;-\; \gamma\, T^2 \sum_{i \ne t} \hat p_i
        \log \hat q_i

  (Yang et al. 2023, Eq. 8). Classical KD's non-target part weighs
  :math:`\hat p` by :math:`1 - p_t` and matches it to :math:`\hat q` scaled by
  :math:`1 - q_t`, masses that differ; NKD renormalises both sides so that
  the non-target term only asks for the same shape. The non-target term is
  a cross-entropy, as in the authors' code: :math:`\gamma T^2 (\mathrm{KL}
  (\hat p \| \hat q) + H(\hat p))`, the KL plus the teacher's entropy (same
  gradient). The authors add it to the usual cross-entropy on the labels
  (weight 1); their defaults are :math:`T = 1, \gamma = 1.5` (ImageNet) and
  :math:`T = 3, \gamma = 3.5` (their CIFAR-100 config).

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    labels: integer class indices ``[...]``, or label probabilities of the
      logits' shape (mixup, CutMix), whose largest entry is the target.
    gamma: weight :math:`\gamma \ge 0` of the non-target term.
    temperature: positive scalar :math:`T` of the non-target term (the
      target term is untempered).
    where: optional bool mask ``[...]``; False examples give 0 (value and
      gradient).

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> loss = losses.nkd_loss(student, teacher, jnp.array([0]), gamma=1.5)
    >>> [round(x, 3) for x in loss.tolist()]
    [3.168]

  References:
    Yang et al., `From Knowledge Distillation to Self-Knowledge Distillation:
    A Unified Approach with Normalized Loss and Customized Soft Labels
    <https://arxiv.org/abs/2303.13005>`_, ICCV 2023; code:
    https://github.com/yzd-v/cls_KD (``mmcls/models/dis_losses/nkd.py``).
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_temperature(temperature)
  _check_scalar_weight(gamma, 'gamma')
  labels = _target_labels(labels, student, 'NKD', where)
  valid = _valid_mask(where, student.shape[:-1])
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  student, teacher = student.astype(dtype), teacher.astype(dtype)
  is_target = jax.nn.one_hot(labels, student.shape[-1], dtype=bool)

  def target_entry(values):
    return jnp.sum(jnp.where(is_target, values, 0.0), axis=-1)

  p_target = target_entry(jax.nn.softmax(teacher, axis=-1))
  target_term = -p_target * target_entry(jax.nn.log_softmax(student, axis=-1))

  def non_target_log_probs(logits):
    scaled = logits / jnp.asarray(temperature, dtype)
    return jax.nn.log_softmax(jnp.where(is_target, -jnp.inf, scaled), axis=-1)

  log_p_hat = non_target_log_probs(teacher)
  log_q_hat = jnp.where(is_target, 0.0, non_target_log_probs(student))
  p_hat = jnp.where(is_target, 0.0, jnp.exp(log_p_hat))
  non_target = _cross_entropy_with_probs(p_hat, log_q_hat)
  loss = target_term + jnp.asarray(gamma, dtype) * _scale(
      non_target, temperature, True)
  return jnp.where(valid, loss, 0.0)


def _power_transform(teacher: jax.Array,
                     temperature: Any) -> tuple[jax.Array, jax.Array]:
  """(log of p^gamma / sum p^gamma, log sum_i p_i^gamma), gamma = 1 / T."""
  gamma = 1.0 / jnp.asarray(temperature, teacher.dtype)
  scaled = gamma * jax.nn.log_softmax(teacher, axis=-1)
  log_norm = jax.nn.logsumexp(scaled, axis=-1)
  return scaled - log_norm[..., None], log_norm


def _ttm_terms(student_logits: ArrayLike, teacher_logits: ArrayLike,
               temperature: Any, where: Any
               ) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(KL(p~ || q), log sum p^gamma, valid) per example, for TTM and WTTM."""
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  _check_temperature(temperature)
  valid = _valid_mask(where, student.shape[:-1])
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  log_p_tilde, log_norm = _power_transform(teacher.astype(dtype), temperature)
  log_q = jax.nn.log_softmax(student.astype(dtype), axis=-1)
  return _kl_sum(log_p_tilde, log_q), log_norm, valid


def ttm_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
             temperature: ArrayLike = 1.0,
             where: ArrayLike | None = None) -> jax.Array:
  r"""Transformed teacher matching: the tempered teacher, the plain student.

  With the power transform :math:`\tilde p_i = p_i^\gamma / \sum_j
  p_j^\gamma` of the teacher's :math:`p = \mathrm{softmax}(v)`, :math:`\gamma
  = 1 / T`, and the *untempered* student :math:`q = \mathrm{softmax}(z)`:

  .. math::
    \ell = \mathrm{KL}(\tilde p \,\|\, q)

  Since :math:`\tilde p = \mathrm{softmax}(v / T)`, TTM is KD with the
  temperature dropped on the student's side and without the :math:`T^2`
  factor (Zheng & Yang 2024, Eq. 8); compared with KD it carries an extra
  Rényi-entropy regulariser on the student. At :math:`T = 1` it is
  :func:`kl_divergence` at temperature 1.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T = 1 / \gamma`; the authors'
      ``--ttm_l`` is :math:`\gamma`.
    where: optional bool mask ``[...]``; False examples give 0.

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> [round(x, 3) for x in losses.ttm_loss(student, teacher,
    ...                                       temperature=2.0).tolist()]
    [0.708]

  References:
    Zheng and Yang, `Knowledge Distillation Based on Transformed Teacher
    Matching <https://arxiv.org/abs/2402.11148>`_, ICLR 2024; code:
    https://github.com/zkxufo/TTM (``distiller_zoo/ttm.py``).
  """
  kl, _, valid = _ttm_terms(student_logits, teacher_logits, temperature, where)
  return jnp.where(valid, kl, 0.0)


def wttm_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
              temperature: ArrayLike = 1.0,
              where: ArrayLike | None = None) -> jax.Array:
  r"""Weighted TTM: TTM weighted by the power sum of the teacher.

  .. math::
    \ell = U_\gamma(p)\, \mathrm{KL}(\tilde p \,\|\, q), \quad
    U_\gamma(p) = \sum_i p_i^\gamma, \quad \gamma = 1 / T

  with :math:`\tilde p` and :math:`q` as in :func:`ttm_loss` (Zheng & Yang
  2024, Eq. 12). For :math:`\gamma < 1`, :math:`U_\gamma(p)` ranges from 1
  (a one-hot teacher) to :math:`N^{1 - \gamma}` (a uniform one): examples on
  which the teacher is unsure weigh more. At :math:`T = 1` the weight is 1
  and WTTM is KD at temperature 1. The authors weigh it (their ``-b``) far
  above the cross-entropy, e.g. 45 for vgg13 -> vgg8 with :math:`\gamma =
  0.1`.

  Args:
    student_logits: float array ``[..., num_classes]``, :math:`z`.
    teacher_logits: float array of the same shape, :math:`v`.
    temperature: positive scalar :math:`T = 1 / \gamma`; the authors'
      ``--ttm_l`` is :math:`\gamma`.
    where: optional bool mask ``[...]``; False examples give 0.

  Returns:
    Per-example loss, shape ``student_logits.shape[:-1]``, >= 0.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0]])
    >>> teacher = jnp.array([[3.0, 2.0, 1.0]])
    >>> [round(x, 3) for x in losses.wttm_loss(student, teacher,
    ...                                        temperature=2.0).tolist()]
    [1.139]

  References:
    Zheng and Yang, `Knowledge Distillation Based on Transformed Teacher
    Matching <https://arxiv.org/abs/2402.11148>`_, ICLR 2024; code:
    https://github.com/zkxufo/TTM (``distiller_zoo/wttm.py``).
  """
  kl, log_norm, valid = _ttm_terms(student_logits, teacher_logits,
                                   temperature, where)
  return jnp.where(valid, jnp.exp(log_norm) * kl, 0.0)


MLKD_TEMPERATURES = (2.0, 3.0, 4.0, 5.0, 6.0)


def _check_mlkd_args(student: jax.Array, temperatures: Any,
                     instance_weight: Any, batch_weight: Any,
                     class_weight: Any) -> tuple[Any, ...]:
  """Refuses what `mlkd_loss` cannot take; returns the temperatures."""
  if student.ndim != 2:
    raise ValueError(
        f'student_logits must be a batch of shape [B, C] (MLKD relates the '
        f'examples of a batch), got shape {student.shape}; reshape to '
        f'[-1, num_classes].')
  temperatures = tuple(temperatures)
  if not temperatures:
    raise ValueError('temperatures is empty; pass at least one, e.g. the '
                     f'authors\' {MLKD_TEMPERATURES}.')
  for temperature in temperatures:
    _check_temperature(temperature)
  for value, name in ((instance_weight, 'instance_weight'),
                      (batch_weight, 'batch_weight'),
                      (class_weight, 'class_weight')):
    _check_scalar_weight(value, name)
  return temperatures


def mlkd_loss(student_logits: ArrayLike, teacher_logits: ArrayLike, *,
              temperatures: tuple[float, ...] = MLKD_TEMPERATURES,
              instance_weight: ArrayLike = 1.0,
              batch_weight: ArrayLike = 1.0,
              class_weight: ArrayLike = 1.0,
              where: ArrayLike | None = None) -> jax.Array:
  r"""Multi-level logit distillation: instance, batch and class alignment.

  For each temperature :math:`T` of a set :math:`\mathcal{T}` (the
  "prediction augmentation"), with :math:`P^s = \mathrm{softmax}(Z^s / T)`
  and :math:`P^t = \mathrm{softmax}(Z^t / T)` of shape ``[B, C]``:

  .. math::
    \mathcal{L}_\text{ins} = \frac{T^2}{B} \sum_b \mathrm{KL}(P^t_b \,\|\,
        P^s_b), \quad
    \mathcal{L}_\text{batch} = \frac{1}{B} \left\| P^t P^{t\top} -
        P^s P^{s\top} \right\|_F^2, \quad
    \mathcal{L}_\text{class} = \frac{1}{C} \left\| P^{t\top} P^t -
        P^{s\top} P^s \right\|_F^2

  .. math::
    \mathcal{L} = \sum_{T \in \mathcal{T}} \left(w_\text{ins}
        \mathcal{L}_\text{ins} + w_\text{batch} \mathcal{L}_\text{batch} +
        w_\text{class} \mathcal{L}_\text{class}\right)

  (Jin et al. 2023, Eq. 3-8): the ``[B, B]`` Gram matrix relates the
  examples of the batch (input correlation), the ``[C, C]`` one the classes
  (category correlation). A **batch-level** loss (one scalar); rows with
  ``where=False`` take no part, :math:`B` counts the valid rows. Under a
  data-parallel ``jit`` the value is that of the global batch.

  The authors' code (``KD_ours.py``, ``T`` in {4, 3, 5, 2, 6}, KD weight 0.9,
  cross-entropy 0.1 on each view) applies the three terms to the weakly
  augmented view and the instance term to the strongly augmented
  (RandAugment) one, and multiplies each weak-view term by the fraction of
  examples (classes, for the class term) whose teacher confidence is at or
  below the median, 1/2 in practice: weights ``0.45, 0.45, 0.45`` on the
  weak view and ``0.9, 0, 0`` on the strong one reproduce it, except that
  the code's strong-view terms at ``T = 2`` and ``6`` use the weak view's
  logits.

  Args:
    student_logits: float array ``[B, C]``, :math:`Z^s`.
    teacher_logits: float array ``[B, C]``, :math:`Z^t`.
    temperatures: the positive temperatures :math:`\mathcal{T}`.
    instance_weight: :math:`w_\text{ins} \ge 0`.
    batch_weight: :math:`w_\text{batch} \ge 0`.
    class_weight: :math:`w_\text{class} \ge 0`.
    where: optional bool mask ``[B]``.

  Returns:
    The scalar loss; 0 when no row is valid.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import losses
    >>> student = jnp.array([[1.0, 2.0, 3.0], [0.0, 1.0, 0.0]])
    >>> float(losses.mlkd_loss(student, student))
    0.0
    >>> round(float(losses.mlkd_loss(student, -student, temperatures=(4.0,))),
    ...       3)
    0.891

  References:
    Jin, Wang and Lin, `Multi-Level Logit Distillation
    <https://openaccess.thecvf.com/content/CVPR2023/html/Jin_Multi-Level_Logit_Distillation_CVPR_2023_paper.html>`_,
    CVPR 2023; code: https://github.com/Jin-Ying/Multi-Level-Logit-Distillation
    (``mdistiller/distillers/KD_ours.py``).
  """
  student = _as_float_logits(student_logits, 'student_logits')
  teacher = _as_float_logits(teacher_logits, 'teacher_logits')
  _check_same_shape(student, teacher)
  temperatures = _check_mlkd_args(student, temperatures, instance_weight,
                                  batch_weight, class_weight)
  valid = _valid_mask(where, student.shape[:-1])
  dtype = jnp.promote_types(student.dtype, teacher.dtype)
  student, teacher = student.astype(dtype), teacher.astype(dtype)
  count = jnp.sum(valid, dtype=dtype)
  rows = valid.astype(dtype)[:, None]
  gram = lambda a: jnp.matmul(a, a.T, precision=jax.lax.Precision.HIGHEST)
  cross = lambda a: jnp.matmul(a.T, a, precision=jax.lax.Precision.HIGHEST)
  instance = batch = classes = jnp.zeros([], dtype)
  for temperature in temperatures:
    log_q = _tempered_log_softmax(student, temperature)
    log_p = _tempered_log_softmax(teacher, temperature)
    instance += _scale(jnp.sum(jnp.where(valid, _kl_sum(log_p, log_q), 0.0)),
                       temperature, True)
    # Masked rows are zero rows: they add nothing to either Gram matrix.
    q, p = jnp.exp(log_q) * rows, jnp.exp(log_p) * rows
    batch += jnp.sum(jnp.square(gram(p) - gram(q)))
    classes += jnp.sum(jnp.square(cross(p) - cross(q))) / student.shape[-1]
  per_row = (jnp.asarray(instance_weight, dtype) * instance
             + jnp.asarray(batch_weight, dtype) * batch)
  loss = (per_row / jnp.maximum(count, 1.0)
          + jnp.asarray(class_weight, dtype) * classes)
  return jnp.where(count > 0, loss, 0.0)
