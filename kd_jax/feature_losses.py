r"""Feature-distillation losses: the RepDistiller family, as pure functions.

The student matches what the teacher computes inside, not only its logits:
intermediate feature maps (NHWC, ``[B, H, W, C]``) or embeddings (``[B, D]``,
usually the penultimate, pooled features). Each function reproduces the value
that RepDistiller (Tian et al., ICLR 2020, the CRD benchmark code) computes
for its method, and returns one float32 scalar: these losses relate the
examples of a batch to each other (similarity matrices, pairwise distances,
angles, negatives), so the batch is the unit and the function reduces it.
Learned pieces that sit in front of some losses (FitNets' regressor, VID's
mean network and variances, CRD's embedding heads) are Flax modules in
:mod:`kd_jax.connectors`; CRD's memory bank is plain arrays, updated by the
pure helpers here.

Conventions:

* ``where``: optional bool mask ``[B]``, False for padded rows. A masked call
  equals the same call on the valid rows alone (``x[where]``), in value and
  gradient; padded rows get zero gradient.
* Inputs of lower precision are cast up; everything runs in float32.
* Gradients are finite everywhere, including zero feature maps and identical
  or zero embeddings: every norm and square root at zero goes through a
  ``where`` or a clamp, so JAX never differentiates :math:`\sqrt{0}`.
* Gradients reach both arguments, except in :func:`rkd`, whose teacher side is
  constant as in RepDistiller. Stop the teacher's gradient in the step.
* Bad arguments raise ``ValueError`` naming the argument and the fix. Value
  checks run only on concrete values; under ``jit`` the shape checks remain.

Reference code: RepDistiller, https://github.com/HobbitLong/RepDistiller
(``distiller_zoo/*.py``, ``crd/*.py``); the weights its benchmark gives each
term are in the README's "Feature losses" section.
"""

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax.losses import _concrete_value

__all__ = [
    'HCL_LEVELS',
    'adaptive_avg_pool',
    'attention_transfer',
    'correlation_congruence',
    'crd',
    'crd_memory_init',
    'crd_memory_update',
    'crd_normalizers',
    'crd_sample_negatives',
    'fitnet_hint',
    'hcl_loss',
    'ofd_loss',
    'ofd_margin',
    'pkt',
    'rkd',
    'similarity_preserving',
    'vid',
]

ArrayLike = jax.typing.ArrayLike

# torch.nn.functional.normalize's default: x / max(||x||, 1e-12).
_NORMALIZE_EPS = 1e-12
# RepDistiller's RKD pdist clamps squared distances at this value.
_PDIST_EPS = 1e-12
# Full float32 matmuls: TPUs and GPUs default to fewer mantissa bits, which
# the distance identity |a|^2 + |b|^2 - 2<a, b> cannot afford.
_PRECISION = jax.lax.Precision.HIGHEST


# ----------------------------------------------------------------------------
# Argument checks and numerics shared by the losses.
# ----------------------------------------------------------------------------


def _as_float(x: ArrayLike, name: str, ndim: int | None = None,
              min_ndim: int = 2, layout: str = '') -> jax.Array:
  """Checks that `x` is a float array of the right rank; casts it up."""
  x = jnp.asarray(x)
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(
        f'{name} must be a floating-point array, got dtype {x.dtype}; cast it '
        f'with {name}.astype(jnp.float32).')
  if (ndim is not None and x.ndim != ndim) or x.ndim < min_ndim:
    want = f'rank {ndim}' if ndim is not None else f'rank >= {min_ndim}'
    raise ValueError(
        f'{name} must have {want} {layout}, got shape {tuple(x.shape)}; pass '
        f'the batch on the first axis.')
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _check_batch(student: jax.Array, teacher: jax.Array, student_name: str,
                 teacher_name: str) -> None:
  if student.shape[0] != teacher.shape[0]:
    raise ValueError(
        f'{teacher_name} has batch size {teacher.shape[0]} but {student_name} '
        f'has {student.shape[0]}; feed teacher and student the same batch.')


def _row_mask(where: ArrayLike | None, batch_size: int) -> jax.Array | None:
  """Returns the mask as float32 [B], or None for all rows."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.shape != (batch_size,):
    raise ValueError(
        f'where must be a bool mask of shape ({batch_size},), one entry per '
        f'example, got shape {tuple(where.shape)}; pass batch["mask"].')
  if where.dtype != jnp.bool_:
    raise ValueError(
        f'where must have dtype bool, got {where.dtype}; pass where=mask > 0.')
  return where.astype(jnp.float32)


def _num_valid(mask: jax.Array | None, batch_size: int) -> jax.Array:
  if mask is None:
    return jnp.float32(batch_size)
  return jnp.sum(mask)


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  """numerator / denominator, 0 where the denominator is 0 (all rows masked)."""
  positive = denominator > 0
  return jnp.where(positive, numerator / jnp.where(positive, denominator, 1.0),
                   0.0)


def _safe_sqrt(x: jax.Array) -> jax.Array:
  """sqrt(x) for x >= 0 whose gradient at 0 is 0 instead of inf * 0 = NaN."""
  positive = x > 0
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def _l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12), as torch's F.normalize; finite gradient at 0."""
  squared = jnp.sum(x * x, axis=axis, keepdims=True)
  # The clamp is a constant below eps^2, so a zero vector gets zero gradient.
  return x * jax.lax.rsqrt(jnp.maximum(squared, _NORMALIZE_EPS**2))


def _check_positive(value: Any, name: str, hint: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(
        f'{name} must be a scalar, got shape {jnp.shape(value)}; {hint}')
  value = _concrete_value(value)
  if value is None:
    return
  value = float(np.asarray(value))
  if not (np.isfinite(value) and value > 0):
    raise ValueError(f'{name}={value!r} is invalid: it must be a positive '
                     f'finite number; {hint}')


def _check_nonnegative(value: Any, name: str, hint: str) -> None:
  if jnp.ndim(value) != 0:
    raise ValueError(
        f'{name} must be a scalar, got shape {jnp.shape(value)}; {hint}')
  value = _concrete_value(value)
  if value is None:
    return
  value = float(np.asarray(value))
  if not (np.isfinite(value) and value >= 0):
    raise ValueError(f'{name}={value!r} is invalid: it must be a finite '
                     f'number >= 0; {hint}')


def _pool_matrix(size_in: int, size_out: int) -> np.ndarray:
  """[size_out, size_in] averaging weights of adaptive average pooling."""
  weights = np.zeros((size_out, size_in), np.float32)
  for i in range(size_out):
    # Bin i covers [floor(i * n / m), ceil((i + 1) * n / m)), as torch's.
    start = (i * size_in) // size_out
    end = -((-(i + 1) * size_in) // size_out)
    weights[i, start:end] = 1.0 / (end - start)
  return weights


def adaptive_avg_pool(features: ArrayLike,
                      output_size: tuple[int, int]) -> jax.Array:
  """Adaptive average pooling of NHWC features to a spatial size.

  Torch's ``F.adaptive_avg_pool2d``: output cell ``(i, j)`` averages input
  rows ``floor(i H / h) .. ceil((i + 1) H / h) - 1`` (and the same for
  columns), so any size maps to any other; equal to plain average pooling
  when the size divides evenly.

  Args:
    features: ``[B, H, W, C]``.
    output_size: ``(h, w)``.

  Returns:
    ``[B, h, w, C]`` in the dtype of ``features``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> x = jnp.arange(16.0).reshape(1, 4, 4, 1)
    >>> feature_losses.adaptive_avg_pool(x, (2, 2))[0, :, :, 0].tolist()
    [[2.5, 4.5], [10.5, 12.5]]
  """
  features = jnp.asarray(features)
  if features.ndim != 4:
    raise ValueError(
        f'features must be NHWC [batch, height, width, channels], got shape '
        f'{tuple(features.shape)}.')
  height, width = (int(s) for s in output_size)
  if height < 1 or width < 1:
    raise ValueError(f'output_size={output_size!r} must be two positive '
                     f'integers (height, width).')
  if features.shape[1:3] == (height, width):
    return features
  rows = jnp.asarray(_pool_matrix(features.shape[1], height), features.dtype)
  cols = jnp.asarray(_pool_matrix(features.shape[2], width), features.dtype)
  return jnp.einsum('ph,qw,bhwc->bpqc', rows, cols, features,
                    precision=_PRECISION)


def _match_spatial(student: jax.Array,
                   teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Pools the map with more rows to the other's size, as RepDistiller's AT."""
  if student.shape[1] > teacher.shape[1]:
    student = adaptive_avg_pool(student, teacher.shape[1:3])
  elif student.shape[1] < teacher.shape[1]:
    teacher = adaptive_avg_pool(teacher, student.shape[1:3])
  return student, teacher


def _masked_mean_rows(values: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Mean of `values` [B, ...] over valid rows and all other axes."""
  per_row = jnp.mean(values.reshape(values.shape[0], -1), axis=1)
  if mask is None:
    return jnp.mean(per_row)
  return _safe_divide(jnp.sum(jnp.where(mask > 0, per_row, 0.0)),
                      jnp.sum(mask))


def _outer_mask(mask: jax.Array | None, batch_size: int) -> jax.Array:
  if mask is None:
    return jnp.ones((batch_size, batch_size), jnp.float32)
  return mask[:, None] * mask[None, :]


# ----------------------------------------------------------------------------
# Feature-map losses.
# ----------------------------------------------------------------------------


def fitnet_hint(student_features: ArrayLike, teacher_features: ArrayLike,
                where: ArrayLike | None = None) -> jax.Array:
  r"""FitNets hint loss: mean squared error to the teacher's hint layer.

  .. math::
    \ell = \frac{1}{|S|} \sum_{b, i} \left(r(s)_{b,i} - t_{b,i}\right)^2

  over every element :math:`i` of the valid examples :math:`b`, where
  :math:`r` is the learned regressor
  (:class:`kd_jax.connectors.FitNetRegressor`, 1x1 conv + BN + ReLU) that maps
  the student's guided layer to the teacher's shape. Apply it before this
  loss: ``student_features`` is its output. RepDistiller uses the hint layer
  ``feat[2]`` (the second stage's output) and weight 100.

  Args:
    student_features: the regressor's output, ``[B, ...]``.
    teacher_features: the teacher's hint, the same shape.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> float(feature_losses.fitnet_hint(jnp.zeros((2, 1, 1, 2)),
    ...                                  jnp.ones((2, 1, 1, 2))))
    1.0

  References:
    Romero et al., `FitNets: Hints for Thin Deep Nets
    <https://arxiv.org/abs/1412.6550>`_, ICLR 2015.
  """
  student = _as_float(student_features, 'student_features')
  teacher = _as_float(teacher_features, 'teacher_features')
  if student.shape != teacher.shape:
    raise ValueError(
        f'teacher_features shape {tuple(teacher.shape)} does not match '
        f'student_features shape {tuple(student.shape)}; map the student '
        f'features to the teacher\'s shape with connectors.FitNetRegressor('
        f'teacher_shape={tuple(teacher.shape[1:])}) first.')
  mask = _row_mask(where, student.shape[0])
  return _masked_mean_rows(jnp.square(student - teacher), mask)


def _check_power(p: Any) -> int:
  if isinstance(p, bool) or not isinstance(p, (int, np.integer)) or p < 1:
    raise ValueError(
        f'p={p!r} is invalid: it must be a positive integer power of the '
        f'activations; pass p=2 (Zagoruyko & Komodakis, and RepDistiller).')
  return int(p)


def attention_transfer(student_features: ArrayLike,
                       teacher_features: ArrayLike, p: int = 2,
                       where: ArrayLike | None = None) -> jax.Array:
  r"""Attention transfer: match normalised spatial attention maps.

  .. math::
    a(f) = \frac{\mathrm{vec}(\frac{1}{C}\sum_c f_c^p)}
                {\max(\lVert \mathrm{vec}(\frac{1}{C}\sum_c f_c^p) \rVert_2,
                      10^{-12})},
    \qquad
    \ell = \frac{1}{B\,HW} \sum_b \lVert a(s_b) - a(t_b) \rVert_2^2

  The map with more rows is first average-pooled (adaptively) to the other's
  spatial size, so channels and sizes may differ. RepDistiller applies it to
  every stage output between the stem and the embedding (``feat[1:-1]``),
  sums the terms and weights the sum by 1000.

  Args:
    student_features: ``[B, H, W, C]``.
    teacher_features: ``[B, H', W', C']``.
    p: positive integer power of the activations.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> student = jnp.ones((2, 4, 4, 3))
    >>> teacher = 5.0 * jnp.ones((2, 8, 8, 16))
    >>> float(feature_losses.attention_transfer(student, teacher))
    0.0

  References:
    Zagoruyko and Komodakis, `Paying More Attention to Attention
    <https://arxiv.org/abs/1612.03928>`_, ICLR 2017.
  """
  layout = '(NHWC [batch, height, width, channels])'
  student = _as_float(student_features, 'student_features', 4, layout=layout)
  teacher = _as_float(teacher_features, 'teacher_features', 4, layout=layout)
  _check_batch(student, teacher, 'student_features', 'teacher_features')
  p = _check_power(p)
  mask = _row_mask(where, student.shape[0])
  student, teacher = _match_spatial(student, teacher)

  def attention(f):
    pooled = jnp.mean(jax.lax.integer_pow(f, p), axis=-1)
    return _l2_normalize(pooled.reshape(f.shape[0], -1))

  return _masked_mean_rows(jnp.square(attention(student) - attention(teacher)),
                           mask)


def similarity_preserving(student_features: ArrayLike,
                          teacher_features: ArrayLike,
                          where: ArrayLike | None = None) -> jax.Array:
  r"""Similarity-preserving KD: match the batch's similarity matrices.

  .. math::
    G = \mathrm{rownorm}(F F^\top), \qquad
    \ell = \frac{1}{B^2} \lVert G^t - G^s \rVert_F^2

  with :math:`F` the features flattened to ``[B, -1]`` and each row of the
  :math:`B \times B` Gram matrix divided by its L2 norm (``F.normalize``).
  Feature shapes may differ except in the batch. RepDistiller uses the last
  stage's output (``feat[-2]``) and weight 3000.

  Args:
    student_features: ``[B, ...]``.
    teacher_features: ``[B, ...]``.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> x = jnp.array([[1.0, 0.0], [0.0, 2.0]])
    >>> float(feature_losses.similarity_preserving(x, 3.0 * x))
    0.0

  References:
    Tung and Mori, `Similarity-Preserving Knowledge Distillation
    <https://arxiv.org/abs/1907.09682>`_, ICCV 2019.
  """
  student = _as_float(student_features, 'student_features')
  teacher = _as_float(teacher_features, 'teacher_features')
  _check_batch(student, teacher, 'student_features', 'teacher_features')
  batch_size = student.shape[0]
  mask = _row_mask(where, batch_size)
  pair_mask = _outer_mask(mask, batch_size)

  def gram(f):
    f = f.reshape(batch_size, -1)
    return _l2_normalize(jnp.dot(f, f.T, precision=_PRECISION) * pair_mask,
                         axis=1)

  diff = gram(teacher) - gram(student)
  return _safe_divide(jnp.sum(jnp.square(diff) * pair_mask),
                      jnp.square(_num_valid(mask, batch_size)))


# ----------------------------------------------------------------------------
# Embedding losses.
# ----------------------------------------------------------------------------


def pkt(student_embeddings: ArrayLike, teacher_embeddings: ArrayLike,
        eps: float = 1e-7, where: ArrayLike | None = None) -> jax.Array:
  r"""Probabilistic knowledge transfer: match cosine-kernel densities.

  Each embedding is scaled to :math:`x / (\lVert x \rVert + \epsilon)`; the
  cosine similarities become conditional probabilities over the batch,

  .. math::
    K_{ij} = \frac{1 + \cos(x_i, x_j)}{2}, \qquad
    P_{ij} = \frac{K_{ij}}{\sum_k K_{ik}}, \qquad
    \ell = \frac{1}{B^2} \sum_{i,j} P^t_{ij}
           \log\frac{P^t_{ij} + \epsilon}{P^s_{ij} + \epsilon}.

  Dimensions may differ. RepDistiller uses the penultimate embedding
  (``feat[-1]``) and weight 30000.

  Args:
    student_embeddings: ``[B, D]``.
    teacher_embeddings: ``[B, D']``.
    eps: the :math:`\epsilon` of the normalisation and the log ratio.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> x = jnp.array([[1.0, 2.0], [3.0, -1.0], [0.5, 0.5]])
    >>> abs(float(feature_losses.pkt(x, 2.0 * x))) < 1e-7  # same directions
    True

  References:
    Passalis and Tefas, `Learning Deep Representations with Probabilistic
    Knowledge Transfer <https://arxiv.org/abs/1803.10837>`_, ECCV 2018.
  """
  layout = '([batch, dim] embeddings)'
  student = _as_float(student_embeddings, 'student_embeddings', 2,
                      layout=layout)
  teacher = _as_float(teacher_embeddings, 'teacher_embeddings', 2,
                      layout=layout)
  _check_batch(student, teacher, 'student_embeddings', 'teacher_embeddings')
  _check_positive(eps, 'eps', 'pass a small number such as 1e-7.')
  batch_size = student.shape[0]
  mask = _row_mask(where, batch_size)
  pair_mask = _outer_mask(mask, batch_size)

  def probabilities(x):
    norm = _safe_sqrt(jnp.sum(x * x, axis=1, keepdims=True))
    x = x / (norm + eps)
    kernel = (jnp.dot(x, x.T, precision=_PRECISION) + 1.0) / 2.0 * pair_mask
    return _safe_divide(kernel, jnp.sum(kernel, axis=1, keepdims=True))

  p_student = probabilities(student)
  p_teacher = probabilities(teacher)
  divergence = p_teacher * (jnp.log(p_teacher + eps) - jnp.log(p_student + eps))
  return _safe_divide(jnp.sum(divergence * pair_mask),
                      jnp.square(_num_valid(mask, batch_size)))


def _smooth_l1(x: jax.Array) -> jax.Array:
  """Huber with beta = 1, as torch's F.smooth_l1_loss per element."""
  abs_x = jnp.abs(x)
  return jnp.where(abs_x < 1.0, 0.5 * x * x, abs_x - 0.5)


def _pairwise_distances(x: jax.Array) -> jax.Array:
  """Euclidean distances, squared ones clamped at 1e-12, zero diagonal."""
  squared_norms = jnp.sum(x * x, axis=1)
  squared = (squared_norms[:, None] + squared_norms[None, :]
             - 2.0 * jnp.dot(x, x.T, precision=_PRECISION))
  # The clamp keeps sqrt away from 0 (and its infinite slope) off the diagonal.
  distances = jnp.sqrt(jnp.maximum(squared, _PDIST_EPS))
  return jnp.where(jnp.eye(x.shape[0], dtype=bool), 0.0, distances)


def rkd(student_embeddings: ArrayLike, teacher_embeddings: ArrayLike,
        distance_weight: float = 25.0, angle_weight: float = 50.0,
        where: ArrayLike | None = None) -> jax.Array:
  r"""Relational KD: match pairwise distances and triplet angles.

  .. math::
    \psi_D(i, j) = \frac{\lVert x_i - x_j \rVert}{\mu}, \qquad
    \psi_A(i, j, k) = \left\langle
      \frac{x_j - x_i}{\lVert x_j - x_i \rVert},
      \frac{x_k - x_i}{\lVert x_k - x_i \rVert} \right\rangle,

  .. math::
    \ell = w_D \frac{1}{B^2} \sum_{i,j} h(\psi^s_D - \psi^t_D)
         + w_A \frac{1}{B^3} \sum_{i,j,k} h(\psi^s_A - \psi^t_A)

  with :math:`\mu` the mean of the positive distances of the batch,
  :math:`h` the Huber (smooth L1, :math:`\beta = 1`) loss, squared distances
  clamped at :math:`10^{-12}` and zero-length differences giving angle 0, as
  RepDistiller computes them. The teacher side is constant (no gradient).
  Dimensions may differ. RepDistiller uses the penultimate embedding
  (``feat[-1]``) and weight 1 on this sum.

  Args:
    student_embeddings: ``[B, ...]``, flattened to ``[B, D]``.
    teacher_embeddings: ``[B, ...]``, flattened to ``[B, D']``.
    distance_weight: :math:`w_D`.
    angle_weight: :math:`w_A`.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> x = jnp.array([[0.0, 0.0], [1.0, 0.0], [0.0, 2.0]])
    >>> round(float(feature_losses.rkd(x, 3.0 * x)), 6)
    0.0

  References:
    Park, Kim, Lu and Cho, `Relational Knowledge Distillation
    <https://arxiv.org/abs/1904.05068>`_, CVPR 2019.
  """
  student = _as_float(student_embeddings, 'student_embeddings')
  teacher = _as_float(teacher_embeddings, 'teacher_embeddings')
  _check_batch(student, teacher, 'student_embeddings', 'teacher_embeddings')
  for name, value in (('distance_weight', distance_weight),
                      ('angle_weight', angle_weight)):
    if jnp.ndim(value) != 0:
      raise ValueError(f'{name} must be a scalar, got shape '
                       f'{jnp.shape(value)}; pass one number (>= 0).')
  batch_size = student.shape[0]
  student = student.reshape(batch_size, -1)
  teacher = jax.lax.stop_gradient(teacher.reshape(batch_size, -1))
  mask = _row_mask(where, batch_size)
  pair_mask = _outer_mask(mask, batch_size)
  num_valid = _num_valid(mask, batch_size)

  def distances(x):
    d = _pairwise_distances(x)
    positive = (d > 0) & (pair_mask > 0)
    mean = _safe_divide(jnp.sum(jnp.where(positive, d, 0.0)),
                        jnp.sum(positive.astype(jnp.float32)))
    return _safe_divide(d, mean)

  distance_loss = _safe_divide(
      jnp.sum(_smooth_l1(distances(student) - distances(teacher)) * pair_mask),
      jnp.square(num_valid))

  def angles(x):
    # differences[i, j] = x_j - x_i, each normalised to unit length.
    differences = _l2_normalize(x[None, :, :] - x[:, None, :], axis=-1)
    return jnp.einsum('ijd,ikd->ijk', differences, differences,
                      precision=_PRECISION)

  triple_mask = pair_mask[:, :, None] * pair_mask[:, None, :]
  angle_loss = _safe_divide(
      jnp.sum(_smooth_l1(angles(student) - angles(teacher)) * triple_mask),
      num_valid**3)
  return distance_weight * distance_loss + angle_weight * angle_loss


def correlation_congruence(student_embeddings: ArrayLike,
                           teacher_embeddings: ArrayLike,
                           where: ArrayLike | None = None) -> jax.Array:
  r"""Correlation congruence, in the form RepDistiller ships (from the authors).

  .. math::
    \delta_b = \lvert e^s_b - e^t_b \rvert, \qquad
    \ell = \frac{1}{B - 1} \sum_{b=1}^{B-1} \langle \delta_b, \delta_{b+1}
    \rangle

  over consecutive valid examples of the batch. The embeddings come from
  linear heads on the penultimate features, one per network, to a common
  dimension (``connectors.CRDEmbed(128, normalize=False)``); RepDistiller's
  weight is 0.02.

  Args:
    student_embeddings: ``[B, D]``.
    teacher_embeddings: ``[B, D]``.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar (0 with fewer than two valid examples).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> student = jnp.array([[1.0, 0.0], [2.0, 0.0], [0.0, 0.0]])
    >>> float(feature_losses.correlation_congruence(student, jnp.zeros((3, 2))))
    1.0

  References:
    Peng et al., `Correlation Congruence for Knowledge Distillation
    <https://arxiv.org/abs/1904.01802>`_, ICCV 2019.
  """
  layout = '([batch, dim] embeddings)'
  student = _as_float(student_embeddings, 'student_embeddings', 2,
                      layout=layout)
  teacher = _as_float(teacher_embeddings, 'teacher_embeddings', 2,
                      layout=layout)
  if student.shape != teacher.shape:
    raise ValueError(
        f'teacher_embeddings shape {tuple(teacher.shape)} does not match '
        f'student_embeddings shape {tuple(student.shape)}; embed both to the '
        f'same dimension with connectors.CRDEmbed(dim, normalize=False).')
  batch_size = student.shape[0]
  mask = _row_mask(where, batch_size)
  delta = jnp.abs(student - teacher)
  if mask is None:
    pair_valid = jnp.ones((batch_size - 1,), jnp.float32)
  else:
    # Valid rows first (stably), so that neighbours are those of x[where].
    order = jnp.argsort(-mask, stable=True)
    delta = delta[order]
    pair_valid = mask[order][1:]
  products = jnp.sum(delta[:-1] * delta[1:], axis=1)
  return _safe_divide(jnp.sum(products * pair_valid), jnp.sum(pair_valid))


# ----------------------------------------------------------------------------
# VID.
# ----------------------------------------------------------------------------


def vid(predicted_mean: ArrayLike, teacher_features: ArrayLike,
        log_scale: ArrayLike, eps: float = 1e-5,
        where: ArrayLike | None = None) -> jax.Array:
  r"""Variational information distillation: Gaussian NLL of the teacher.

  .. math::
    \sigma^2_c = \log(1 + e^{\alpha_c}) + \epsilon, \qquad
    \ell = \frac{1}{|S|} \sum_{b,h,w,c} \frac12 \left(
      \frac{(\mu_{bhwc} - t_{bhwc})^2}{\sigma^2_c} + \log \sigma^2_c \right)

  where :math:`\mu` is the student's prediction of the teacher's features (the
  mean network of :class:`kd_jax.connectors.VIDRegressor`, three 1x1 convs)
  and :math:`\alpha` its per-channel ``log_scale`` (softplus gives the
  variance, as in RepDistiller). Minimising it maximises a variational lower
  bound on the mutual information of student and teacher features. A teacher
  map with more rows than the prediction is average-pooled to its size (the
  regressor pools a larger student map). RepDistiller applies it to every
  stage output (``feat[1:-1]``), one regressor each, sums, and uses weight 1.

  Args:
    predicted_mean: ``[B, H, W, C]``, the regressor's mean.
    teacher_features: ``[B, H', W', C]``.
    log_scale: ``[C]``, the regressor's variance parameters.
    eps: floor :math:`\epsilon` of the variance.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> mean = jnp.zeros((2, 2, 2, 3))
    >>> # softplus(log(e - 1)) = 1: unit variance, so the loss is (x^2) / 2.
    >>> log_scale = jnp.full((3,), jnp.log(jnp.e - 1.0))
    >>> loss = feature_losses.vid(mean, mean + 2.0, log_scale, eps=0.0)
    >>> round(float(loss), 4)
    2.0

  References:
    Ahn et al., `Variational Information Distillation for Knowledge Transfer
    <https://arxiv.org/abs/1904.05835>`_, CVPR 2019.
  """
  layout = '(NHWC [batch, height, width, channels])'
  mean = _as_float(predicted_mean, 'predicted_mean', 4, layout=layout)
  teacher = _as_float(teacher_features, 'teacher_features', 4, layout=layout)
  _check_batch(mean, teacher, 'predicted_mean', 'teacher_features')
  log_scale = jnp.asarray(log_scale)
  if log_scale.shape != (teacher.shape[-1],):
    raise ValueError(
        f'log_scale must hold one value per teacher channel, shape '
        f'({teacher.shape[-1]},), got {tuple(log_scale.shape)}; build '
        f'connectors.VIDRegressor with the teacher feature\'s shape.')
  if mean.shape[-1] != teacher.shape[-1]:
    raise ValueError(
        f'predicted_mean has {mean.shape[-1]} channels but teacher_features '
        f'has {teacher.shape[-1]}; build connectors.VIDRegressor with '
        f'teacher_shape={tuple(teacher.shape[1:])}.')
  _check_nonnegative(eps, 'eps', 'pass a small number such as 1e-5.')
  mask = _row_mask(where, mean.shape[0])
  mean, teacher = _match_spatial(mean, teacher)
  variance = jax.nn.softplus(log_scale.astype(jnp.float32)) + eps
  negative_log_prob = 0.5 * (jnp.square(mean - teacher) / variance
                             + jnp.log(variance))
  return _masked_mean_rows(negative_log_prob, mask)


# ----------------------------------------------------------------------------
# CRD: contrastive loss over a memory bank, and the bank's pure helpers.
# ----------------------------------------------------------------------------


def crd_memory_init(num_examples: int, dim: int, key: jax.Array,
                    dtype: Any = jnp.float32) -> jax.Array:
  r"""A fresh CRD memory bank: one row per training example.

  Uniform in :math:`[-1/\sqrt{d/3}, 1/\sqrt{d/3}]` (rows of expected squared
  norm 1), as RepDistiller's ``ContrastMemory``. CRD keeps two banks, one of
  student and one of teacher embeddings: call this twice with different keys.

  Args:
    num_examples: rows, the size of the training split (example indices
      ``0 .. num_examples - 1``).
    dim: the embedding dimension (RepDistiller's ``feat_dim``, 128).
    key: a PRNG key.
    dtype: the bank's dtype.

  Returns:
    ``[num_examples, dim]``.

  Example:
    >>> import jax
    >>> from kd_jax import feature_losses
    >>> bank = feature_losses.crd_memory_init(10, 3, jax.random.key(0))
    >>> bank.shape, bool(abs(bank).max() <= 1.0)
    ((10, 3), True)
  """
  for name, value in (('num_examples', num_examples), ('dim', dim)):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) \
        or value < 1:
      raise ValueError(f'{name}={value!r} must be a positive integer.')
  bound = 1.0 / np.sqrt(dim / 3.0)
  return jax.random.uniform(key, (num_examples, dim), dtype, -bound, bound)


def crd_sample_negatives(key: jax.Array, indices: ArrayLike, num_examples: int,
                         num_negatives: int, *,
                         example_labels: ArrayLike | None = None) -> jax.Array:
  """Draws CRD's negative example indices for each anchor of the batch.

  RepDistiller's CIFAR-100 sampler (``mode='exact'``) draws the negatives of
  an example uniformly from the training examples *of the other classes*,
  without replacement, and with replacement only when there are fewer such
  examples than ``num_negatives``. Given ``example_labels`` this does the
  same; without labels the candidates are all examples but the anchor itself.
  Either way the positive is never drawn.

  Cost: O(B * num_examples) per call (a masked top-k of random keys), cheap
  next to a forward pass at CIFAR sizes (50k examples, 16384 negatives).

  Args:
    key: a PRNG key (fold in the step).
    indices: int ``[B]``, the batch's example indices (the positives).
    num_examples: size of the training split.
    num_negatives: negatives per anchor, ``K`` (RepDistiller: 16384).
    example_labels: optional int ``[num_examples]``, every example's class.

  Returns:
    int32 ``[B, num_negatives]``.

  Example:
    >>> import jax
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> negatives = feature_losses.crd_sample_negatives(
    ...     jax.random.key(0), jnp.array([0, 3]), 5, 4)
    >>> sorted(negatives[0].tolist()), sorted(negatives[1].tolist())
    ([1, 2, 3, 4], [0, 1, 2, 4])
  """
  indices = jnp.asarray(indices)
  if indices.ndim != 1 or not jnp.issubdtype(indices.dtype, jnp.integer):
    raise ValueError(
        f'indices must be int example indices of shape [batch], got dtype '
        f'{indices.dtype} and shape {tuple(indices.shape)}; pass the batch\'s '
        f'integer example indices.')
  if isinstance(num_examples, bool) or not isinstance(
      num_examples, (int, np.integer)) or num_examples < 2:
    raise ValueError(f'num_examples={num_examples!r} must be an integer >= 2, '
                     f'the size of the training split.')
  if isinstance(num_negatives, bool) or not isinstance(
      num_negatives, (int, np.integer)) or num_negatives < 1:
    raise ValueError(f'num_negatives={num_negatives!r} must be a positive '
                     f'integer (RepDistiller uses 16384).')
  candidates = jnp.arange(num_examples)
  if example_labels is None:
    allowed = candidates[None, :] != indices[:, None]
  else:
    example_labels = jnp.asarray(example_labels)
    if example_labels.shape != (num_examples,):
      raise ValueError(
          f'example_labels must hold one class per example, shape '
          f'({num_examples},), got {tuple(example_labels.shape)}.')
    allowed = example_labels[None, :] != example_labels[indices][:, None]
  pool_size = jnp.sum(allowed, axis=1)
  key_without, key_with = jax.random.split(key)

  # Without replacement: the top-k of uniform keys over the allowed examples.
  k = min(num_negatives, num_examples)
  scores = jnp.where(allowed, jax.random.uniform(key_without, allowed.shape),
                     -1.0)
  _, without = jax.lax.top_k(scores, k)
  if k < num_negatives:
    without = jnp.pad(without, ((0, 0), (0, num_negatives - k)))

  # With replacement: invert the CDF of the uniform law on the allowed ones.
  cumulative = jnp.cumsum(allowed, axis=1)
  draws = jax.random.randint(key_with, (indices.shape[0], num_negatives), 0,
                             jnp.maximum(pool_size, 1)[:, None])
  with_replacement = jax.vmap(
      lambda c, d: jnp.searchsorted(c, d, side='right'))(cumulative, draws)
  negatives = jnp.where((pool_size >= num_negatives)[:, None], without,
                        with_replacement)
  return negatives.astype(jnp.int32)


def crd_memory_update(memory: ArrayLike, indices: ArrayLike,
                      embeddings: ArrayLike, momentum: float = 0.5,
                      where: ArrayLike | None = None) -> jax.Array:
  r"""The memory bank after one step: momentum average, then unit norm.

  .. math::
    m_i \leftarrow \frac{\beta m_i + (1 - \beta) e_i}
                        {\lVert \beta m_i + (1 - \beta) e_i \rVert}

  for each example :math:`i` of the batch, as RepDistiller's
  ``ContrastMemory`` (``nce_m`` = 0.5). No gradient flows through it. Padded
  rows (``where=False``) leave the bank unchanged.

  Args:
    memory: ``[num_examples, D]``.
    indices: int ``[B]``, the batch's example indices.
    embeddings: ``[B, D]``, this step's embeddings (of the same network).
    momentum: :math:`\beta` in [0, 1).
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The new bank, same shape and dtype as ``memory``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> bank = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    >>> new = feature_losses.crd_memory_update(
    ...     bank, jnp.array([0]), jnp.array([[0.0, 1.0]]), momentum=0.5)
    >>> [round(v, 4) for v in new[0].tolist()], new[1].tolist()
    ([0.7071, 0.7071], [0.0, 1.0])
  """
  memory = jnp.asarray(memory)
  indices = jnp.asarray(indices)
  embeddings = jax.lax.stop_gradient(_as_float(embeddings, 'embeddings', 2))
  if memory.ndim != 2 or memory.shape[1] != embeddings.shape[1]:
    raise ValueError(
        f'memory of shape {tuple(memory.shape)} does not fit embeddings of '
        f'shape {tuple(embeddings.shape)}; build it with crd_memory_init('
        f'num_examples, {embeddings.shape[1]}, key).')
  if indices.shape != embeddings.shape[:1] or not jnp.issubdtype(
      indices.dtype, jnp.integer):
    raise ValueError(
        f'indices must be int of shape ({embeddings.shape[0]},), one per '
        f'embedding, got dtype {indices.dtype} and shape '
        f'{tuple(indices.shape)}.')
  value = _concrete_value(momentum)
  if jnp.ndim(momentum) != 0 or (value is not None
                                 and not 0.0 <= float(np.asarray(value)) < 1.0):
    raise ValueError(f'momentum={momentum!r} is invalid: pass a scalar in '
                     f'[0, 1) (RepDistiller: 0.5).')
  mask = _row_mask(where, indices.shape[0])
  rows = momentum * memory[indices].astype(jnp.float32) + (
      1.0 - momentum) * embeddings
  rows = _l2_normalize(rows)
  if mask is not None:
    # Padded rows write nowhere: their index is pushed out of range and dropped.
    indices = jnp.where(mask > 0, indices, memory.shape[0])
  return memory.at[indices].set(rows.astype(memory.dtype), mode='drop')


def _crd_logits(student: jax.Array, teacher: jax.Array,
                student_memory: jax.Array, teacher_memory: jax.Array,
                indices: jax.Array, negative_indices: jax.Array,
                temperature: Any) -> tuple[jax.Array, jax.Array]:
  """Scores / T of each anchor against the other side's bank, positive first."""
  rows = jnp.concatenate([indices[:, None], negative_indices], axis=1)
  # The banks are constants of the step: gradients reach the embeddings only.
  teacher_rows = jax.lax.stop_gradient(teacher_memory[rows].astype(jnp.float32))
  student_rows = jax.lax.stop_gradient(student_memory[rows].astype(jnp.float32))
  student_anchor = jnp.einsum('bkd,bd->bk', teacher_rows, student,
                              precision=_PRECISION) / temperature
  teacher_anchor = jnp.einsum('bkd,bd->bk', student_rows, teacher,
                              precision=_PRECISION) / temperature
  return student_anchor, teacher_anchor


def _check_crd_args(student_embeddings, teacher_embeddings, student_memory,
                    teacher_memory, indices, negative_indices, temperature):
  layout = '([batch, dim] embeddings)'
  student = _as_float(student_embeddings, 'student_embeddings', 2,
                      layout=layout)
  teacher = _as_float(teacher_embeddings, 'teacher_embeddings', 2,
                      layout=layout)
  if student.shape != teacher.shape:
    raise ValueError(
        f'teacher_embeddings shape {tuple(teacher.shape)} does not match '
        f'student_embeddings shape {tuple(student.shape)}; embed both with '
        f'connectors.CRDEmbed(feat_dim) heads of the same feat_dim.')
  for name, bank in (('student_memory', student_memory),
                     ('teacher_memory', teacher_memory)):
    if jnp.ndim(bank) != 2 or jnp.shape(bank)[1] != student.shape[1]:
      raise ValueError(
          f'{name} must be [num_examples, {student.shape[1]}], got shape '
          f'{tuple(jnp.shape(bank))}; build it with crd_memory_init.')
  if jnp.shape(student_memory) != jnp.shape(teacher_memory):
    raise ValueError(
        f'teacher_memory shape {tuple(jnp.shape(teacher_memory))} does not '
        f'match student_memory shape {tuple(jnp.shape(student_memory))}.')
  indices = jnp.asarray(indices)
  negative_indices = jnp.asarray(negative_indices)
  batch_size = student.shape[0]
  if indices.shape != (batch_size,) or not jnp.issubdtype(indices.dtype,
                                                          jnp.integer):
    raise ValueError(
        f'indices must be int example indices of shape ({batch_size},), got '
        f'dtype {indices.dtype} and shape {tuple(indices.shape)}.')
  if (negative_indices.ndim != 2 or negative_indices.shape[0] != batch_size
      or not jnp.issubdtype(negative_indices.dtype, jnp.integer)):
    raise ValueError(
        f'negative_indices must be int of shape ({batch_size}, K), got dtype '
        f'{negative_indices.dtype} and shape '
        f'{tuple(negative_indices.shape)}; draw them with '
        f'crd_sample_negatives.')
  _check_positive(temperature, 'temperature',
                  'pass the NCE temperature (RepDistiller: 0.07).')
  return student, teacher, indices, negative_indices


def crd_normalizers(student_embeddings: ArrayLike,
                    teacher_embeddings: ArrayLike, student_memory: ArrayLike,
                    teacher_memory: ArrayLike, indices: ArrayLike,
                    negative_indices: ArrayLike, temperature: float = 0.07,
                    where: ArrayLike | None = None) -> jax.Array:
  r"""CRD's normalising constants :math:`Z`, estimated from one batch.

  .. math::
    Z = N \cdot \mathrm{mean}_{b,k} \exp(\langle m_{b,k}, e_b \rangle / \tau)

  over the positive and the negatives of every valid anchor, for the student
  anchors (against the teacher bank) and the teacher anchors (against the
  student bank). RepDistiller estimates them once, on the first batch, and
  keeps them fixed: store the result in the train state at the first step
  and pass it to :func:`crd` ever after. No gradient flows through it.

  Args:
    student_embeddings, teacher_embeddings, student_memory, teacher_memory,
      indices, negative_indices, temperature, where: as for :func:`crd`.

  Returns:
    float32 ``[2]``: (:math:`Z` of the student anchors, of the teacher's).

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> e = jnp.array([[1.0, 0.0]])
    >>> bank = jnp.zeros((4, 2))  # scores 0: exp(0) = 1, so Z = N = 4
    >>> feature_losses.crd_normalizers(e, e, bank, bank, jnp.array([0]),
    ...                                jnp.array([[1, 2]]), 0.5).tolist()
    [4.0, 4.0]
  """
  student, teacher, indices, negative_indices = _check_crd_args(
      student_embeddings, teacher_embeddings, student_memory, teacher_memory,
      indices, negative_indices, temperature)
  mask = _row_mask(where, student.shape[0])
  logits = _crd_logits(student, teacher, jnp.asarray(student_memory),
                       jnp.asarray(teacher_memory), indices, negative_indices,
                       temperature)
  num_examples = jnp.shape(student_memory)[0]
  return jax.lax.stop_gradient(jnp.stack(
      [_masked_mean_rows(jnp.exp(x), mask) * num_examples for x in logits]))


def crd(student_embeddings: ArrayLike, teacher_embeddings: ArrayLike,
        student_memory: ArrayLike, teacher_memory: ArrayLike,
        indices: ArrayLike, negative_indices: ArrayLike,
        normalizers: ArrayLike, temperature: float = 0.07, eps: float = 1e-7,
        where: ArrayLike | None = None) -> jax.Array:
  r"""Contrastive representation distillation: NCE over a memory bank.

  Student anchor :math:`s_b` (the student's :class:`~kd_jax.connectors.CRDEmbed`
  output) against the teacher bank :math:`m^t` at its own example (the
  positive, :math:`k = 0`) and at :math:`K` negatives, with :math:`N` training
  examples:

  .. math::
    h_{b,k} = \frac{\exp(\langle m^t_{i_{b,k}}, s_b \rangle / \tau)}{Z_s},
    \quad
    \ell_s = -\frac{1}{B}\sum_b \left[
      \log \frac{h_{b,0}}{h_{b,0} + K/N + \epsilon}
      + \sum_{k=1}^{K} \log \frac{K/N}{h_{b,k} + K/N + \epsilon} \right]

  (Tian et al., Eq. 18; :math:`h` estimates the probability that the pair
  comes from the joint rather than from the product of marginals, with
  :math:`1/N` the noise density). The teacher side :math:`\ell_t` is the same
  with teacher anchors against the student bank; the loss is
  :math:`\ell_s + \ell_t`. Computed in log space; values equal
  RepDistiller's ``CRDLoss``. The banks are constants here; update them after
  the step with :func:`crd_memory_update` (RepDistiller: momentum 0.5, after
  the scores are computed). RepDistiller uses 16384 negatives,
  :math:`\tau = 0.07`, embeddings of dimension 128 and weight 0.8.

  Args:
    student_embeddings: ``[B, D]``, unit-norm student embeddings.
    teacher_embeddings: ``[B, D]``, unit-norm teacher embeddings.
    student_memory: ``[N, D]``, bank of student embeddings.
    teacher_memory: ``[N, D]``, bank of teacher embeddings.
    indices: int ``[B]``, the batch's example indices (positives).
    negative_indices: int ``[B, K]``, from :func:`crd_sample_negatives`.
    normalizers: ``[2]``, :math:`(Z_s, Z_t)` from :func:`crd_normalizers`.
    temperature: :math:`\tau`.
    eps: the :math:`\epsilon` of the denominators.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> e = jnp.array([[1.0, 0.0]])
    >>> bank = jnp.zeros((4, 2))  # every score exp(0) / Z = 1 / 4 = K / N
    >>> loss = feature_losses.crd(e, e, bank, bank, jnp.array([0]),
    ...                           jnp.array([[1]]), jnp.array([4.0, 4.0]),
    ...                           temperature=1.0, eps=0.0)
    >>> round(float(loss), 4)  # 2 sides * 2 terms * -log(1/2)
    2.7726

  References:
    Tian, Krishnan and Isola, `Contrastive Representation Distillation
    <https://arxiv.org/abs/1910.10699>`_, ICLR 2020.
  """
  student, teacher, indices, negative_indices = _check_crd_args(
      student_embeddings, teacher_embeddings, student_memory, teacher_memory,
      indices, negative_indices, temperature)
  normalizers = jnp.asarray(normalizers, jnp.float32)
  if normalizers.shape != (2,):
    raise ValueError(
        f'normalizers must be [2] (Z of the student anchors, of the teacher '
        f'anchors), got shape {tuple(normalizers.shape)}; compute them with '
        f'crd_normalizers at the first step.')
  value = _concrete_value(normalizers)
  if value is not None and not np.all(np.asarray(value) > 0):
    raise ValueError(
        f'normalizers={np.asarray(value).tolist()} must be positive; compute '
        f'them with crd_normalizers at the first step and keep them.')
  _check_nonnegative(eps, 'eps', 'pass a small number such as 1e-7.')
  mask = _row_mask(where, student.shape[0])
  num_examples = jnp.shape(student_memory)[0]
  num_negatives = negative_indices.shape[1]
  noise = num_negatives / num_examples
  log_floor = jnp.log(noise + eps)
  logits = _crd_logits(student, teacher, jnp.asarray(student_memory),
                       jnp.asarray(teacher_memory), indices, negative_indices,
                       temperature)

  def side_loss(x, z):
    log_h = x - jnp.log(z)
    # log(h / (h + c)) and log(K/N / (h + c)) with c = K/N + eps.
    log_denominator = jnp.logaddexp(log_h, log_floor)
    positive = log_h[:, 0] - log_denominator[:, 0]
    negative = jnp.sum(np.log(noise) - log_denominator[:, 1:], axis=1)
    return -(positive + negative)

  per_example = (side_loss(logits[0], normalizers[0])
                 + side_loss(logits[1], normalizers[1]))
  return _masked_mean_rows(per_example, mask)


# ----------------------------------------------------------------------------
# OFD (Heo et al. 2019) and ReviewKD's HCL (Chen et al. 2021).
# ----------------------------------------------------------------------------


def ofd_margin(bn_scale: ArrayLike, bn_bias: ArrayLike, *,
               min_probability: float = 0.001) -> jax.Array:
  r"""OFD's per-channel margin from the teacher's BN before a ReLU.

  The teacher's pre-ReLU response of a channel is taken to be
  :math:`x \sim \mathcal{N}(\beta, \gamma^2)`, the BN's shift and (absolute)
  scale. The margin is the expected negative response,

  .. math::
    m = \mathbb{E}[x \mid x < 0] = \beta - |\gamma|
        \frac{\phi(\beta / |\gamma|)}{\Phi(-\beta / |\gamma|)}

  (Heo et al. 2019, Eq. 3), with :math:`\phi, \Phi` the standard normal's
  density and CDF; when :math:`\Phi(-\beta/|\gamma|) \le` ``min_probability``
  (a channel that is almost never negative) it is :math:`-3|\gamma|`, as in
  the authors' ``get_margin_from_BN``. A channel with :math:`\gamma = 0` is
  constant: its margin is :math:`\min(\beta, 0)`. Computed once from the
  teacher's params; the margin is always :math:`\le 0`.

  Args:
    bn_scale: the BN's scale :math:`\gamma`, ``[C]``.
    bn_bias: the BN's bias :math:`\beta`, ``[C]``.
    min_probability: the authors' 0.001.

  Returns:
    The margins, float32 ``[C]``.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> margin = feature_losses.ofd_margin(jnp.array([1.0, 1.0]),
    ...                                    jnp.array([0.0, 4.0]))
    >>> [round(x, 4) for x in margin.tolist()]
    [-0.7979, -3.0]

  References:
    Heo et al., `A Comprehensive Overhaul of Feature Distillation
    <https://arxiv.org/abs/1904.01866>`_, ICCV 2019; code:
    https://github.com/clovaai/overhaul-distillation (``distiller.py``).
  """
  scale = jnp.abs(_as_float(bn_scale, 'bn_scale', 1, min_ndim=1))
  bias = _as_float(bn_bias, 'bn_bias', 1, min_ndim=1)
  if scale.shape != bias.shape:
    raise ValueError(
        f'bn_bias shape {tuple(bias.shape)} does not match bn_scale shape '
        f'{tuple(scale.shape)}; pass the same BN layer\'s scale and bias.')
  positive = scale > 0
  safe_scale = jnp.where(positive, scale, 1.0)
  ratio = bias / safe_scale
  probability = jax.scipy.special.ndtr(-ratio)
  density = jnp.exp(-0.5 * jnp.square(ratio)) / np.sqrt(2.0 * np.pi)
  conditional = bias - safe_scale * density / jnp.where(
      probability > 0, probability, 1.0)
  margin = jnp.where(probability > min_probability, conditional, -3.0 * scale)
  return jnp.where(positive, margin, jnp.minimum(bias, 0.0))


def ofd_loss(student_features: ArrayLike, teacher_features: ArrayLike,
             margin: ArrayLike, where: ArrayLike | None = None) -> jax.Array:
  r"""OFD's partial L2 distance to the margin-ReLU'd teacher features.

  The teacher's pre-ReLU features :math:`t` pass through the margin ReLU
  :math:`\sigma_m(t) = \max(t, m)` (:func:`ofd_margin`, per channel), and the
  student's connector output :math:`s` is compared with the partial L2
  distance, which skips the elements where both sit in the ReLU's dead zone:

  .. math::
    \ell = \frac{1}{B} \sum_{b} \sum_{i}
        \begin{cases} 0 & s_{b,i} \le \sigma_m(t_{b,i}) \le 0 \\
        (s_{b,i} - \sigma_m(t_{b,i}))^2 & \text{otherwise} \end{cases}

  (Heo et al. 2019, Eq. 2 and 5): summed over every element of an example,
  averaged over the valid examples, as the authors' ``loss.sum() /
  batch_size`` and mdistiller's ``mean(dim=0).sum()``. A teacher map larger
  than the student's is first average-pooled to its size (mdistiller). The
  authors weight it 1e-3 beside cross-entropy 1 and sum it over the stages
  ``i = 1..n`` (pre-ReLU outputs) with weights :math:`2^{-(n - i)}`, so the
  last stage weighs 1. The student side is
  :class:`kd_jax.connectors.OFDConnector` (conv + BN) applied to the
  student's pre-ReLU features.

  Args:
    student_features: the connector's output, ``[B, H, W, C]``.
    teacher_features: the teacher's pre-ReLU features, ``[B, H', W', C]``
      with ``H' >= H``.
    margin: ``[C]``, from :func:`ofd_margin`.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> margin = jnp.array([-1.0])
    >>> teacher = jnp.array([-5.0, -0.5, 2.0]).reshape(1, 1, 3, 1)
    >>> student = jnp.array([-3.0, 0.5, 1.0]).reshape(1, 1, 3, 1)
    >>> float(feature_losses.ofd_loss(student, teacher, margin))
    2.0
    >>> student = jnp.array([0.0, -1.0, 2.0]).reshape(1, 1, 3, 1)
    >>> float(feature_losses.ofd_loss(student, teacher, margin))
    1.0

  References:
    Heo et al., `A Comprehensive Overhaul of Feature Distillation
    <https://arxiv.org/abs/1904.01866>`_, ICCV 2019; code:
    https://github.com/clovaai/overhaul-distillation and mdistiller's
    ``distillers/OFD.py``.
  """
  layout = '(NHWC [batch, height, width, channels])'
  student = _as_float(student_features, 'student_features', 4, layout=layout)
  teacher = _as_float(teacher_features, 'teacher_features', 4, layout=layout)
  _check_batch(student, teacher, 'student_features', 'teacher_features')
  margin = _as_float(margin, 'margin', 1, min_ndim=1)
  if teacher.shape[1] > student.shape[1]:
    teacher = adaptive_avg_pool(teacher, student.shape[1:3])
  if student.shape != teacher.shape or margin.shape != student.shape[-1:]:
    raise ValueError(
        f'ofd_loss needs student_features, teacher_features (pooled) and '
        f'margin of shapes [B, H, W, C], [B, H, W, C] and [C]; got '
        f'{tuple(student.shape)}, {tuple(teacher.shape)} and '
        f'{tuple(margin.shape)}; map the student to the teacher\'s channels '
        f'with connectors.OFDConnector(features={teacher.shape[-1]}) and '
        f'take the margin of the BN that feeds this teacher feature.')
  mask = _row_mask(where, student.shape[0])
  target = jnp.maximum(teacher, margin)
  counted = (student > target) | (target > 0)
  per_example = jnp.sum(
      jnp.where(counted, jnp.square(student - target), 0.0).reshape(
          student.shape[0], -1), axis=1)
  if mask is None:
    return jnp.mean(per_example)
  return _safe_divide(jnp.sum(jnp.where(mask > 0, per_example, 0.0)),
                      jnp.sum(mask))


HCL_LEVELS = (4, 2, 1)


def hcl_loss(student_features: ArrayLike, teacher_features: ArrayLike,
             levels: tuple[int, ...] = HCL_LEVELS,
             where: ArrayLike | None = None) -> jax.Array:
  r"""ReviewKD's hierarchical context loss: MSE over a pyramid of poolings.

  With :math:`\mathrm{MSE}` the mean squared error over all elements and
  :math:`\pi_l` adaptive average pooling to :math:`l \times l`:

  .. math::
    \ell = \frac{\mathrm{MSE}(s, t) + \sum_{k} 2^{-k}\,
        \mathrm{MSE}(\pi_{l_k}(s), \pi_{l_k}(t))}{1 + \sum_k 2^{-k}}

  over the levels :math:`l_1 = 4, l_2 = 2, l_3 = 1` smaller than the map's
  height (Chen et al. 2021, Sec. 3.3; the :math:`k`-th *used* level weighs
  :math:`2^{-k}`, as in the authors' ``hcl``). A 1x1 map (the pooled
  embedding) gives the plain MSE. ReviewKD sums it over its levels: each
  student output of :class:`kd_jax.connectors.ReviewKDFusion` against the
  teacher's pre-ReLU stage outputs and pooled embedding, weight 1 (5 to 8
  for some pairs) with a linear warm-up over 20 epochs.

  Args:
    student_features: ``[B, H, W, C]``, an ABF output.
    teacher_features: ``[B, H, W, C]``, the same shape.
    levels: pooled sizes, in order; those ``>= H`` are skipped.
    where: optional bool mask ``[B]``, False for padding.

  Returns:
    The loss, a float32 scalar.

  Example:
    >>> import jax.numpy as jnp
    >>> from kd_jax import feature_losses
    >>> student = jnp.zeros((1, 2, 2, 1))
    >>> teacher = jnp.array([1.0, -1.0, 1.0, -1.0]).reshape(1, 2, 2, 1)
    >>> float(feature_losses.hcl_loss(student, teacher))  # (1 + 0 / 2) / 1.5
    0.6666666865348816

  References:
    Chen et al., `Distilling Knowledge via Knowledge Review
    <https://arxiv.org/abs/2104.09044>`_, CVPR 2021; code:
    https://github.com/dvlab-research/ReviewKD (``model/reviewkd.py``).
  """
  layout = '(NHWC [batch, height, width, channels])'
  student = _as_float(student_features, 'student_features', 4, layout=layout)
  teacher = _as_float(teacher_features, 'teacher_features', 4, layout=layout)
  if student.shape != teacher.shape:
    raise ValueError(
        f'teacher_features shape {tuple(teacher.shape)} does not match '
        f'student_features shape {tuple(student.shape)}; build '
        f'connectors.ReviewKDFusion with the teacher\'s feature shapes.')
  levels = tuple(int(level) for level in levels)
  if any(level < 1 for level in levels):
    raise ValueError(f'levels={levels!r} must be positive pooled sizes; pass '
                     f'the authors\' {HCL_LEVELS}.')
  mask = _row_mask(where, student.shape[0])
  loss = _masked_mean_rows(jnp.square(student - teacher), mask)
  weight, total = 1.0, 1.0
  for level in levels:
    if level >= student.shape[1]:
      continue
    weight /= 2.0
    pooled = (adaptive_avg_pool(student, (level, level))
              - adaptive_avg_pool(teacher, (level, level)))
    loss += weight * _masked_mean_rows(jnp.square(pooled), mask)
    total += weight
  return loss / total
