"""Token-level divergences for language models (kd_jax.losses), each against
a NumPy float64 reference of its formula, on [B, L, V] logits."""

import functools

import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
import scipy.special

from kd_jax import losses

# Slow (seconds per test): every divergence over [B, L, V] and its gradient.
pytestmark = pytest.mark.slow

SHAPE = (2, 3, 7)  # [B, L, V]
BETA = 0.3  # Asymmetric, so that a swapped teacher and student shows.
SKEW = 0.2
DIVERGENCES = losses.TOKEN_DIVERGENCES
CONVENTIONS = losses.SPARSE_CONVENTIONS
REVERSE_TYPE = ('reverse_kl',)  # Infinite against a teacher with zeros.


def random_logits(shape=SHAPE, seed=0, scale=3.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def extreme_logits(seed):
  """Logits of +-1e4, 0 and 3, shape SHAPE."""
  return np.random.default_rng(seed).choice(
      np.array([1e4, -1e4, 0.0, 3.0], np.float32), size=SHAPE)


def disjoint_logits():
  """Student on classes 0-2, teacher on 3-6: no shared mass at all."""
  in_first = np.arange(SHAPE[-1]) < 3
  student = np.broadcast_to(np.where(in_first, 1e4, 0.0), SHAPE)
  teacher = np.broadcast_to(np.where(in_first, 0.0, 1e4), SHAPE)
  return student.astype(np.float32), teacher.astype(np.float32)


def dense(name, student, teacher, temperature=1.0, **kwargs):
  """The public function of each divergence, with BETA and SKEW."""
  if name == 'kl':
    return losses.token_divergence(student, teacher, divergence='kl',
                                   temperature=temperature, **kwargs)
  if name == 'reverse_kl':
    return losses.reverse_kl_divergence(student, teacher, temperature,
                                        **kwargs)
  if name == 'generalized_jsd':
    return losses.generalized_jsd(student, teacher, BETA, temperature,
                                  **kwargs)
  if name == 'skew_kl':
    return losses.skew_kl_divergence(student, teacher, SKEW, temperature,
                                     **kwargs)
  if name == 'skew_reverse_kl':
    return losses.skew_reverse_kl_divergence(student, teacher, SKEW,
                                             temperature, **kwargs)
  return losses.total_variation(student, teacher, temperature, **kwargs)


def sparse(name, student, top, indices, rest, convention='tail', **kwargs):
  return losses.sparse_token_divergence(
      student, top, indices, rest, divergence=name, convention=convention,
      beta=BETA, skew=SKEW, **kwargs)


# ----------------------------------------------------------------------------
# NumPy float64 references, in log space, written from the formulas.
# ----------------------------------------------------------------------------


def np_log_softmax(logits, temperature=1.0):
  return scipy.special.log_softmax(np.asarray(logits, np.float64)
                                   / temperature, axis=-1)


def np_kl(log_a, log_b):
  """sum_i a_i (log a_i - log b_i), a_i = 0 terms 0."""
  a = np.exp(log_a)
  log_ratio = np.where(a > 0, log_a, 0.0) - np.where(a > 0, log_b, 0.0)
  return np.where(a > 0, a * log_ratio, 0.0).sum(-1)


def np_log_mix(log_a, log_b, weight_a):
  """log(w a + (1 - w) b)."""
  with np.errstate(divide='ignore'):
    return np.logaddexp(log_a + np.log(weight_a),
                        log_b + np.log1p(-weight_a))


def np_divergence(name, log_p, log_q, beta=BETA, skew=SKEW):
  """Divergence of student q from teacher p over the last axis (unscaled)."""
  if name == 'kl':
    return np_kl(log_p, log_q)
  if name == 'reverse_kl':
    return np_kl(log_q, log_p)
  if name == 'generalized_jsd':
    if beta == 0:
      return np_kl(log_p, log_q)
    if beta == 1:
      return np_kl(log_q, log_p)
    log_m = np_log_mix(log_p, log_q, beta)
    return beta * np_kl(log_p, log_m) + (1 - beta) * np_kl(log_q, log_m)
  if name == 'skew_kl':
    return np_kl(log_p, np_log_mix(log_p, log_q, skew))
  if name == 'skew_reverse_kl':
    return np_kl(log_q, np_log_mix(log_q, log_p, skew))
  assert name == 'total_variation'
  return 0.5 * np.abs(np.exp(log_p) - np.exp(log_q)).sum(-1)


def np_sparse_teacher(teacher, k, temperature):
  """Top-k logits, their classes (by decreasing logit), rest mass at T."""
  indices = np.argsort(-teacher, axis=-1, kind='stable')[..., :k]
  top = np.take_along_axis(teacher, indices, axis=-1)
  p = np.exp(np_log_softmax(teacher, temperature))
  np.put_along_axis(p, indices, 0.0, axis=-1)
  # Summed outside S, as kd_jax's caches store it (1 - sum(top) rounds).
  return top, indices.astype(np.int32), p.sum(-1).astype(np.float32)


def np_sparse_distributions(student, top, indices, rest, convention,
                            temperature):
  """log P, log Q of each convention: buckets, or all V classes."""
  log_p_hat = np_log_softmax(top, temperature)
  if convention == 'renormalize_both':
    return log_p_hat, np_log_softmax(
        np.take_along_axis(student, indices, -1), temperature)
  log_q = np_log_softmax(student, temperature)
  if convention == 'student_full':  # The teacher extended by exact zeros.
    log_p = np.full(log_q.shape, -np.inf)
    np.put_along_axis(log_p, indices, log_p_hat, axis=-1)
    return log_p, log_q
  q = np.exp(log_q)
  q_top = np.take_along_axis(q, indices, -1)
  rest = np.asarray(rest, np.float64)[..., None]
  with np.errstate(divide='ignore'):
    return (np.log(np.concatenate([(1 - rest) * np.exp(log_p_hat), rest], -1)),
            np.log(np.concatenate([q_top, q.sum(-1, keepdims=True)
                                   - q_top.sum(-1, keepdims=True)], -1)))


# ----------------------------------------------------------------------------
# Dense divergences against the references.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', DIVERGENCES)
@pytest.mark.parametrize('temperature', [0.5, 2.0])
def test_dense_divergence_matches_numpy_float64(name, temperature):
  student, teacher = random_logits(seed=1), random_logits(seed=2)
  got = dense(name, student, teacher, temperature)
  expected = temperature**2 * np_divergence(
      name, np_log_softmax(teacher, temperature),
      np_log_softmax(student, temperature))
  assert got.shape == SHAPE[:-1] and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_token_divergence_dispatches_to_the_named_function(name):
  student, teacher = random_logits(seed=3), random_logits(seed=4)
  np.testing.assert_allclose(
      losses.token_divergence(student, teacher, divergence=name,
                              temperature=2.0, beta=BETA, skew=SKEW),
      dense(name, student, teacher, 2.0), rtol=1e-6)


def test_jsd_endpoints_are_trl_forward_and_reverse_kl():
  student, teacher = random_logits(seed=5), random_logits(seed=6)
  forward = losses.kl_divergence(student, teacher, 2.0)
  reverse = losses.reverse_kl_divergence(student, teacher, 2.0)
  np.testing.assert_allclose(
      losses.generalized_jsd(student, teacher, 0.0, 2.0), forward, rtol=1e-6)
  np.testing.assert_allclose(
      losses.generalized_jsd(student, teacher, 1.0, 2.0), reverse, rtol=1e-6)
  # A traced beta picks the same cases.
  sweep = jax.jit(jax.vmap(
      lambda beta: losses.generalized_jsd(student, teacher, beta, 2.0)))
  got = sweep(jnp.array([0.0, BETA, 1.0]))
  np.testing.assert_allclose(got[0], forward, rtol=1e-5)
  np.testing.assert_allclose(
      got[1], losses.generalized_jsd(student, teacher, BETA, 2.0), rtol=1e-5)
  np.testing.assert_allclose(got[2], reverse, rtol=1e-5)


def test_jsd_interior_vanishes_at_the_endpoints_like_beta_times_kl():
  # The documented jump: JSD(beta) ~ beta KL(p||q) near 0, ~ (1 - beta)
  # KL(q||p) near 1; TRL's endpoints are the full KLs.
  student = random_logits(seed=7, scale=1.0)
  teacher = random_logits(seed=8, scale=1.0)
  eps = 1e-4
  np.testing.assert_allclose(
      losses.generalized_jsd(student, teacher, eps) / eps,
      losses.kl_divergence(student, teacher), rtol=5e-3)
  np.testing.assert_allclose(
      losses.generalized_jsd(student, teacher, 1 - eps) / eps,
      losses.reverse_kl_divergence(student, teacher), rtol=5e-3)


def test_symmetric_jsd_is_at_most_log_two_and_symmetric():
  student, teacher = random_logits(seed=9, scale=30.0), random_logits(seed=10)
  jsd = losses.generalized_jsd(student, teacher, 0.5)
  assert np.all(np.asarray(jsd) <= np.log(2) + 1e-6)
  np.testing.assert_allclose(losses.generalized_jsd(teacher, student, 0.5),
                             jsd, rtol=1e-5, atol=1e-7)


def test_zero_skew_is_the_plain_kl_and_full_skew_is_zero():
  student, teacher = random_logits(seed=11), random_logits(seed=12)
  np.testing.assert_allclose(
      losses.skew_kl_divergence(student, teacher, 0.0, 2.0),
      losses.kl_divergence(student, teacher, 2.0), rtol=1e-6)
  np.testing.assert_allclose(
      losses.skew_reverse_kl_divergence(student, teacher, 0.0, 2.0),
      losses.reverse_kl_divergence(student, teacher, 2.0), rtol=1e-6)
  for fn in (losses.skew_kl_divergence, losses.skew_reverse_kl_divergence):
    np.testing.assert_allclose(fn(student, teacher, 1.0), 0.0, atol=1e-6)


def test_skew_bounds_the_divergence_by_minus_log_skew():
  # The teacher gives the student's tokens no mass: the reverse KL is huge,
  # the skewed one at most -log(skew).
  student, teacher = disjoint_logits()
  assert np.all(np.asarray(losses.reverse_kl_divergence(student, teacher))
                > 1e3)
  for fn in (losses.skew_kl_divergence, losses.skew_reverse_kl_divergence):
    value = np.asarray(fn(student, teacher, 0.1))
    assert np.all((value > 0) & (value <= -np.log(0.1) + 1e-5))


def test_total_variation_lies_in_zero_one_and_reaches_both():
  for seed in range(4):
    student = random_logits(seed=13 + seed, scale=20.0)
    teacher = random_logits(seed=23 + seed, scale=20.0)
    tvd = np.asarray(losses.total_variation(
        student, teacher, 4.0, scale_by_temperature_squared=False))
    assert np.all((tvd >= 0) & (tvd <= 1 + 1e-6))
  np.testing.assert_allclose(losses.total_variation(*disjoint_logits()), 1.0,
                             atol=1e-6)
  np.testing.assert_allclose(losses.total_variation(student, student), 0.0,
                             atol=1e-6)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_temperature_scaling_is_t_squared_on_tempered_logits(name):
  student, teacher = random_logits(seed=15), random_logits(seed=16)
  scaled = dense(name, student, teacher, 4.0)
  unscaled = dense(name, student, teacher, 4.0,
                   scale_by_temperature_squared=False)
  np.testing.assert_allclose(scaled, 16.0 * unscaled, rtol=1e-6)
  np.testing.assert_allclose(
      unscaled, dense(name, student / 4.0, teacher / 4.0, 1.0), rtol=1e-5,
      atol=1e-7)


# ----------------------------------------------------------------------------
# Masks, numerics, transformations.
# ----------------------------------------------------------------------------

WHERE = np.array([[True, False, True], [False, True, True]])


def garbage_at_masked(logits, where, seed):
  """Masked positions hold NaN, +-inf and +-1e30: none may leak through."""
  logits = logits.copy()
  rng = np.random.default_rng(seed)
  junk = rng.choice(np.array([np.nan, np.inf, -np.inf, 1e30, -1e30],
                             np.float32), size=logits.shape)
  logits[~where] = junk[~where]
  return logits


def dense_values_and_grads(name, student, teacher, temperature, where=None):
  """Per-position values and the gradients of their sum."""
  def total(s, t):
    values = dense(name, s, t, temperature, where=where)
    return jnp.sum(values), values
  (_, values), grads = jax.value_and_grad(total, argnums=(0, 1),
                                          has_aux=True)(student, teacher)
  return values, grads


def sparse_values_and_grads(name, student, top, indices, rest, temperature,
                            where=None):
  """Tail form: values and the gradients w.r.t. student and top-k logits."""
  def total(s, t):
    values = sparse(name, s, t, indices, rest, temperature=temperature,
                    where=where)
    return jnp.sum(values), values
  (_, values), grads = jax.value_and_grad(total, argnums=(0, 1),
                                          has_aux=True)(student, top)
  return values, grads


def assert_masked_equals_sliced(masked, sliced, where):
  """(values, grads) with where= against those of the sliced inputs."""
  (values, grads), (want_values, want_grads) = masked, sliced
  values = np.asarray(values)
  assert np.all(values[~where] == 0.0)
  np.testing.assert_allclose(values[where], want_values, rtol=1e-6)
  for grad, want in zip(grads, want_grads):
    grad = np.asarray(grad)
    assert np.all(grad[~where] == 0.0)
    np.testing.assert_allclose(grad[where], want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_where_equals_slicing_in_value_and_gradient(name):
  student, teacher = random_logits(seed=17), random_logits(seed=18)
  assert_masked_equals_sliced(
      dense_values_and_grads(name, garbage_at_masked(student, WHERE, 0),
                             garbage_at_masked(teacher, WHERE, 1), 2.0,
                             WHERE),
      dense_values_and_grads(name, student[WHERE], teacher[WHERE], 2.0),
      WHERE)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_extreme_logits_stay_finite(name):
  student, teacher = extreme_logits(0), extreme_logits(1)
  for temperature in (0.05, 1.0, 100.0):
    values, grads = dense_values_and_grads(name, student, teacher,
                                           temperature)
    assert np.all(np.isfinite(values)) and np.sum(values) > 0, temperature
    assert all(np.all(np.isfinite(g)) for g in grads), temperature
    # The sparse tail form too.
    top, indices, rest = np_sparse_teacher(teacher, 3, temperature)
    values, grads = sparse_values_and_grads(name, student, top, indices, rest,
                                            temperature)
    assert np.all(np.isfinite(values)), temperature
    assert all(np.all(np.isfinite(g)) for g in grads), temperature


@pytest.mark.parametrize('name', DIVERGENCES)
def test_teacher_underflow_gives_finite_values_and_gradients(name):
  student, teacher = random_logits(seed=40), random_logits(seed=41)
  # -1e4 at T = 0.05 underflows to probability 0 at a finite logit; -inf is
  # an exact 0, where the reverse KL is rightly infinite.
  for underflow in (-1e4, -np.inf):
    if underflow == -np.inf and name in REVERSE_TYPE:
      continue
    teacher[..., 1::3] = underflow
    assert not np.any(losses.tempered_softmax(teacher, 0.05)[..., 1::3])
    values, grads = dense_values_and_grads(name, student, teacher, 0.05)
    expected = 0.05**2 * np_divergence(name, np_log_softmax(teacher, 0.05),
                                       np_log_softmax(student, 0.05))
    np.testing.assert_allclose(values, expected, rtol=1e-5, atol=1e-6)
    assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_identical_inputs_give_zero_with_a_finite_gradient(name):
  logits = random_logits(seed=19)
  logits[0, 0] = [1e4, -1e4, 0, 0, 0, 0, 0]
  values, grads = dense_values_and_grads(name, logits, logits, 2.0)
  np.testing.assert_allclose(values, 0.0, atol=1e-5)
  for grad in grads:
    np.testing.assert_allclose(grad, 0.0, atol=1e-5)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_jit_vmap_and_bfloat16(name):
  student, teacher = random_logits(seed=20), random_logits(seed=21)
  fn = functools.partial(dense, name, temperature=2.0)
  eager = fn(student, teacher)
  np.testing.assert_allclose(jax.jit(fn)(student, teacher), eager, rtol=1e-6,
                             atol=1e-7)
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(student, teacher), eager,
                             rtol=1e-6, atol=1e-7)
  student16, teacher16 = (jnp.asarray(x, jnp.bfloat16)
                          for x in (student, teacher))
  got = fn(student16, teacher16)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(
      got, fn(student16.astype(jnp.float32), teacher16.astype(jnp.float32)),
      rtol=1e-6, atol=1e-6)


def test_gradients_match_finite_differences():
  student, teacher = random_logits(seed=22), random_logits(seed=23)
  top, indices, rest = np_sparse_teacher(teacher, 3, 2.0)
  weights = np.linspace(1.0, 2.0, len(DIVERGENCES))

  def both(s, t):  # Every divergence, dense in s and t and sparse in s.
    return sum(weight * (dense(name, s, t, 2.0)
                         + sparse(name, s, top, indices, rest,
                                  temperature=2.0))
               for weight, name in zip(weights, DIVERGENCES))

  with jax.enable_x64(True):  # float64 finite differences.
    check_grads(jax.jit(both), (student.astype(np.float64),
                                teacher.astype(np.float64)),
                order=1, modes=('rev',))


# ----------------------------------------------------------------------------
# Sparse (cached top-k) teachers.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('name', DIVERGENCES)
@pytest.mark.parametrize('convention', CONVENTIONS)
def test_sparse_matches_numpy_float64(name, convention):
  if convention == 'student_full' and name in REVERSE_TYPE:
    return  # Infinite: refused (test_bad_sparse_arguments_are_refused...).
  student, teacher = random_logits(seed=24), random_logits(seed=25)
  top, indices, rest = np_sparse_teacher(teacher, 3, 2.0)
  got = sparse(name, student, top, indices, rest, convention,
               temperature=2.0)
  log_p, log_q = np_sparse_distributions(student, top, indices, rest,
                                         convention, 2.0)
  np.testing.assert_allclose(got, 4.0 * np_divergence(name, log_p, log_q),
                             rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_every_convention_with_k_equal_v_is_the_dense_divergence(name):
  student, teacher = random_logits(seed=26), random_logits(seed=27)
  top, indices, _ = np_sparse_teacher(teacher, SHAPE[-1], 2.0)
  expected = dense(name, student, teacher, 2.0)
  for convention in CONVENTIONS:
    np.testing.assert_allclose(
        sparse(name, student, top, indices, None, convention,
               temperature=2.0), expected, rtol=1e-5, atol=1e-6,
        err_msg=convention)


def test_tail_forward_kl_is_topk_kl_divergence():
  student, teacher = random_logits(seed=28), random_logits(seed=29)
  top, indices, rest = np_sparse_teacher(teacher, 3, 2.0)
  np.testing.assert_allclose(
      sparse('kl', student, top, indices, rest, temperature=2.0),
      losses.topk_kl_divergence(student, top, indices, rest, 2.0), rtol=1e-6)


def test_tail_is_a_lower_bound_on_every_dense_divergence():
  # Data processing: merging classes into one bucket never increases an
  # f-divergence, and every divergence here is one.
  for seed in range(3):
    student = random_logits(seed=30 + seed)
    teacher = random_logits(seed=40 + seed)
    top, indices, rest = np_sparse_teacher(teacher, 3, 1.0)
    for name in DIVERGENCES:
      tail = sparse(name, student, top, indices, rest)
      full = dense(name, student, teacher)
      assert np.all(np.asarray(tail) <= np.asarray(full) + 1e-5), name


def test_reverse_kl_without_the_tail_ignores_the_students_outside_mass():
  # Why the tail is the default: renormalised on both sides, a student that
  # moves its mass outside the teacher's top k but keeps the ratios inside
  # is not penalised at all; with the tail it is, and a rest mass that
  # underflowed to 0 keeps the value and gradient finite.
  teacher = random_logits(seed=42)
  teacher[..., 3:] = -1e4
  top, indices, rest = np_sparse_teacher(teacher, 3, 1.0)
  assert not rest.any()  # Underflowed.
  student = np.where(np.arange(SHAPE[-1]) < 3, teacher, 6.0).astype(
      np.float32)  # Most of its mass outside the top 3.
  np.testing.assert_allclose(
      sparse('reverse_kl', student, top, indices, rest, 'renormalize_both'),
      0.0, atol=1e-5)
  values, grads = sparse_values_and_grads('reverse_kl', student, top, indices,
                                          rest, 1.0)
  assert np.all(np.isfinite(values)) and np.all(np.asarray(values) > 10)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize('name', DIVERGENCES)
def test_sparse_where_masks_garbage_padding(name):
  student, teacher = random_logits(seed=32), random_logits(seed=33)
  top, indices, rest = np_sparse_teacher(teacher, 3, 2.0)
  student_junk = garbage_at_masked(student, WHERE, 2)
  top_junk = garbage_at_masked(top, WHERE, 3)
  indices_junk, rest_junk = indices.copy(), rest.copy()
  indices_junk[~WHERE] = [-1, 99, -1]  # Out of range and repeated.
  rest_junk[~WHERE] = np.nan

  # The padding's indices are not checked (the mask is concrete).
  assert_masked_equals_sliced(
      sparse_values_and_grads(name, student_junk, top_junk, indices_junk,
                              rest_junk, 2.0, WHERE),
      sparse_values_and_grads(name, student[WHERE], top[WHERE],
                              indices[WHERE], rest[WHERE], 2.0),
      WHERE)


def test_sparse_under_jit_and_vmap():
  student, teacher = random_logits(seed=34), random_logits(seed=35)
  top, indices, rest = np_sparse_teacher(teacher, 3, 2.0)
  fn = functools.partial(sparse, 'generalized_jsd', temperature=2.0)
  eager = fn(student, top, indices, rest)
  np.testing.assert_allclose(jax.jit(fn)(student, top, indices, rest), eager,
                             rtol=1e-6)
  np.testing.assert_allclose(jax.jit(jax.vmap(fn))(student, top, indices,
                                                   rest), eager, rtol=1e-6)


def test_traced_beta_keeps_the_gradient_finite_off_an_infinite_endpoint():
  # With 'student_full' the beta = 1 case (reverse KL) is infinite; a traced
  # beta computes every case, and the ones not taken must not leak NaN.
  student, teacher = random_logits(seed=36), random_logits(seed=37)
  top, indices, _ = np_sparse_teacher(teacher, 3, 1.0)

  def loss(s, beta):
    return jnp.sum(losses.sparse_token_divergence(
        s, top, indices, divergence='generalized_jsd',
        convention='student_full', beta=beta))

  betas = jnp.array([0.0, BETA, 1.0])
  values, grads = jax.jit(jax.vmap(jax.value_and_grad(loss),
                                   in_axes=(None, 0)))(student, betas)
  assert np.all(np.isfinite(values[:2])) and values[2] == np.inf
  assert np.all(np.isfinite(grads[:2]))
  np.testing.assert_allclose(values[1], loss(student, BETA), rtol=1e-5)


@pytest.mark.parametrize('kwargs, match', [
    (dict(divergence='reverse_kl', convention='student_full'),
     "divergence='reverse_kl' is infinite"),
    (dict(divergence='generalized_jsd', convention='student_full', beta=1.0),
     'is infinite'),
    (dict(divergence='skew_reverse_kl', convention='student_full', skew=0.0),
     'is infinite'),
    (dict(rest_mass=None), 'needs rest_mass'),
    (dict(convention='renormalise'), "convention='renormalise'"),
    (dict(divergence='jsd'), "divergence='jsd'"),
    (dict(beta=1.5), r'beta=1\.5'),
    (dict(skew=-0.1), r'skew=-0\.1'),
    (dict(temperature=0.0), r'temperature=0\.0'),
    (dict(topk_indices=np.array([[0, 0]])), 'distinct class indices'),
    (dict(rest_mass=np.array([1.5])), r'rest_mass must lie in \[0, 1\]'),
])
def test_bad_sparse_arguments_are_refused_by_name(kwargs, match):
  args = dict(student_logits=np.zeros((1, 5), np.float32),
              topk_logits=np.zeros((1, 2), np.float32),
              topk_indices=np.array([[0, 1]]), rest_mass=np.array([0.2]))
  args.update(kwargs)
  with pytest.raises(ValueError, match=match):
    losses.sparse_token_divergence(**args)


def test_bad_dense_arguments_are_refused_by_name():
  student = np.zeros((2, 5), np.float32)
  with pytest.raises(ValueError, match=r'beta=-1\.0'):
    losses.generalized_jsd(student, student, -1.0)
  with pytest.raises(ValueError, match='where shape'):
    losses.total_variation(student, student, where=np.ones(3, bool))
  with pytest.raises(ValueError, match='teacher_logits shape'):
    losses.reverse_kl_divergence(student, student[:, :4])


# ----------------------------------------------------------------------------
# (sum, count) reductions.
# ----------------------------------------------------------------------------


def test_sum_and_count_pairs_add_across_splits_and_padding():
  values = random_logits((4, 6), seed=36)
  where = np.random.default_rng(37).random((4, 6)) < 0.6
  where[1] = False  # A micro-batch of padding only.
  whole = losses.token_mean(*losses.token_sum_and_count(values, where))
  np.testing.assert_allclose(whole, values[where].mean(), rtol=1e-6)
  # Micro-batches of unequal valid counts (gradient accumulation) ...
  pairs = [losses.token_sum_and_count(values[i:j], where[i:j])
           for i, j in ((0, 1), (1, 4))]
  total = sum(p[0] for p in pairs)
  count = sum(p[1] for p in pairs)
  np.testing.assert_allclose(losses.token_mean(total, count), whole,
                             rtol=1e-6)
  # ... and more padding (NaN included) change nothing.
  padded = np.concatenate([values, np.full((4, 3), np.nan, np.float32)], 1)
  padded_where = np.concatenate([where, np.zeros((4, 3), bool)], 1)
  np.testing.assert_allclose(
      losses.token_mean(*losses.token_sum_and_count(padded, padded_where)),
      whole, rtol=1e-6)


def test_token_mean_of_no_tokens_is_zero_with_zero_gradient():
  values = jnp.ones((2, 3))
  def loss(v):
    return losses.token_mean(*losses.token_sum_and_count(
        v, np.zeros((2, 3), bool)))
  value, grad = jax.value_and_grad(loss)(values)
  assert float(value) == 0.0 and not np.any(grad)


def test_sum_and_count_over_shards_is_the_global_mean():
  num_devices = jax.device_count()
  mesh = jax.make_mesh((num_devices,), ('data',))
  values = random_logits((num_devices, 4), seed=38)
  where = np.arange(num_devices * 4).reshape(num_devices, 4) % 3 != 0
  where[0] = False  # A shard of padding only.
  step = jax.jit(jax.shard_map(
      lambda v, w: losses.token_sum_and_count(v, w, axis_name='data'),
      mesh=mesh, in_specs=P('data'), out_specs=P()))
  sharding = jax.sharding.NamedSharding(mesh, P('data'))
  total, count = step(*jax.device_put((values, where), sharding))
  assert int(count) == where.sum()
  np.testing.assert_allclose(losses.token_mean(total, count),
                             values[where].mean(), rtol=1e-5)
