"""NKD, TTM/WTTM and MLKD against NumPy references of their authors' code
(cls_KD's nkd.py, TTM's ttm.py/wttm.py, MLKD's KD_ours.py), written here
independently, op by op, in float64."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from kd_jax import losses

# Slow (seconds per test): NKD/WTTM/MLKD checked case by case against NumPy.
pytestmark = pytest.mark.slow

SHAPES = [(6, 7), (3, 2), (16, 100)]
TEMPERATURES = [0.5, 1.0, 3.0, 8.0]


def random_batch(shape, seed=0, scale=3.0):
  rng = np.random.default_rng(seed)
  student = (scale * rng.normal(size=shape)).astype(np.float32)
  teacher = (scale * rng.normal(size=shape)).astype(np.float32)
  labels = rng.integers(0, shape[-1], shape[:-1])
  return student, teacher, labels


def log_softmax(x, axis=-1):
  return scipy.special.log_softmax(np.asarray(x, np.float64), axis=axis)


# ----------------------------------------------------------------------------
# NumPy references.
# ----------------------------------------------------------------------------


def np_nkd_terms(student, teacher, labels, temperature):
  """cls_KD's NKDLoss.forward, per example: (target term, non-target CE)."""
  target, non_target = [], []
  for z, v, t in zip(student, teacher, labels):
    s_i = log_softmax(z)
    t_i = np.exp(log_softmax(v))
    target.append(-t_i[t] * s_i[t])
    others = np.arange(len(z)) != t
    s_hat = log_softmax(np.asarray(z, np.float64)[others] / temperature)
    t_hat = np.exp(log_softmax(np.asarray(v, np.float64)[others]
                               / temperature))
    non_target.append(-temperature**2 * np.sum(t_hat * s_hat))
  return np.array(target), np.array(non_target)


def np_nkd(student, teacher, labels, gamma, temperature):
  target, non_target = np_nkd_terms(student, teacher, labels, temperature)
  return target + gamma * non_target


def np_wttm(student, teacher, gamma, weighted=True):
  """TTM's WTTM.forward (and TTM's without the norm), per example."""
  p_s = log_softmax(student)
  p_t = np.exp(log_softmax(teacher)) ** gamma
  norm = p_t.sum(-1)
  p_t = p_t / norm[:, None]
  kl = np.sum(np.where(p_t > 0, p_t * (np.log(np.where(p_t > 0, p_t, 1.0))
                                       - p_s), 0.0), -1)
  return norm * kl if weighted else kl


def np_mlkd(student, teacher, temperatures, weights=(1.0, 1.0, 1.0)):
  """KD_ours's kd_loss, bc_loss and cc_loss (reduce=True), summed over T."""
  batch, classes = student.shape
  w_ins, w_batch, w_class = weights
  total = 0.0
  for temperature in temperatures:
    log_q = log_softmax(np.asarray(student, np.float64) / temperature)
    p = np.exp(log_softmax(np.asarray(teacher, np.float64) / temperature))
    q = np.exp(log_q)
    kd = np.sum(p * (np.log(p) - log_q), 1).mean() * temperature**2
    bc = ((p @ p.T - q @ q.T) ** 2).sum() / batch
    cc = ((p.T @ p - q.T @ q) ** 2).sum() / classes
    total += w_ins * kd + w_batch * bc + w_class * cc
  return total


# ----------------------------------------------------------------------------
# NKD.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_nkd_matches_numpy_reference(shape, temperature):
  student, teacher, labels = random_batch(shape, seed=len(shape) + shape[-1])
  got = losses.nkd_loss(student, teacher, labels, gamma=3.5,
                        temperature=temperature)
  want = np_nkd(student, teacher, labels, 3.5, temperature)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize('temperature', [1.0, 3.0])
def test_nkd_terms_separately(temperature):
  student, teacher, labels = random_batch((8, 10), seed=3)
  target, non_target = np_nkd_terms(student, teacher, labels, temperature)
  only_target = losses.nkd_loss(student, teacher, labels, gamma=0.0,
                                temperature=temperature)
  np.testing.assert_allclose(only_target, target, rtol=2e-5, atol=1e-6)
  with_gamma_one = losses.nkd_loss(student, teacher, labels, gamma=1.0,
                                   temperature=temperature)
  np.testing.assert_allclose(with_gamma_one - only_target, non_target,
                             rtol=2e-5, atol=2e-5)


def test_nkd_non_target_term_ignores_the_teachers_target_mass():
  # Normalisation: the non-target term sees only the shape of the teacher's
  # non-target distribution, not how much mass the target class takes.
  student, teacher, labels = random_batch((5, 6), seed=4)
  confident = teacher.copy()
  confident[np.arange(5), labels] += 6.0

  def non_target(t):
    return (losses.nkd_loss(student, t, labels, gamma=1.0, temperature=2.0)
            - losses.nkd_loss(student, t, labels, gamma=0.0, temperature=2.0))

  np.testing.assert_allclose(non_target(teacher), non_target(confident),
                             rtol=1e-5, atol=1e-5)
  # While the target term does change.
  assert not np.allclose(
      losses.nkd_loss(student, teacher, labels, gamma=0.0),
      losses.nkd_loss(student, confident, labels, gamma=0.0))


def test_nkd_takes_the_largest_entry_of_soft_labels():
  student, teacher, labels = random_batch((6, 5), seed=5)
  one_hot = np.eye(5)[labels]
  mixed = 0.7 * one_hot + 0.3 * np.roll(one_hot, 1, axis=0)
  np.testing.assert_allclose(
      losses.nkd_loss(student, teacher, mixed.astype(np.float32)),
      losses.nkd_loss(student, teacher, labels), rtol=1e-6)


# ----------------------------------------------------------------------------
# TTM and WTTM.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('gamma', [0.1, 0.25, 0.5, 1.0, 2.0])
def test_ttm_and_wttm_match_numpy_reference(shape, gamma):
  student, teacher, _ = random_batch(shape, seed=shape[-1])
  np.testing.assert_allclose(
      losses.ttm_loss(student, teacher, temperature=1.0 / gamma),
      np_wttm(student, teacher, gamma, weighted=False), rtol=2e-5, atol=1e-6)
  np.testing.assert_allclose(
      losses.wttm_loss(student, teacher, temperature=1.0 / gamma),
      np_wttm(student, teacher, gamma), rtol=2e-5, atol=1e-6)


def test_wttm_at_gamma_one_is_kd_at_temperature_one():
  student, teacher, _ = random_batch((7, 9), seed=6)
  kd = losses.kl_divergence(student, teacher, temperature=1.0)
  np.testing.assert_allclose(losses.wttm_loss(student, teacher), kd,
                             rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(losses.ttm_loss(student, teacher), kd,
                             rtol=1e-5, atol=1e-6)


def test_ttm_is_kd_with_the_temperature_on_the_teacher_only():
  student, teacher, _ = random_batch((7, 9), seed=7)
  temperature = 4.0
  p = np.exp(log_softmax(teacher / temperature))
  want = np.sum(p * (np.log(p) - log_softmax(student)), -1)
  np.testing.assert_allclose(
      losses.ttm_loss(student, teacher, temperature=temperature), want,
      rtol=2e-5, atol=1e-6)


def test_wttm_weight_runs_from_one_to_classes_power_one_minus_gamma():
  classes, gamma = 10, 0.25
  student = np.random.default_rng(8).normal(size=(2, classes)).astype(
      np.float32)
  teacher = np.zeros((2, classes), np.float32)
  teacher[1, 3] = 60.0  # A practically one-hot teacher.
  ratio = (losses.wttm_loss(student, teacher, temperature=1 / gamma)
           / losses.ttm_loss(student, teacher, temperature=1 / gamma))
  np.testing.assert_allclose(ratio, [classes**(1 - gamma), 1.0], rtol=1e-5)


# ----------------------------------------------------------------------------
# MLKD.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(6, 7), (16, 100), (1, 3)])
@pytest.mark.parametrize('temperatures', [(2.0, 3.0, 4.0, 5.0, 6.0), (1.0,),
                                          (0.5, 8.0)])
def test_mlkd_matches_numpy_reference(shape, temperatures):
  student, teacher, _ = random_batch(shape, seed=shape[0])
  got = losses.mlkd_loss(student, teacher, temperatures=temperatures)
  np.testing.assert_allclose(got, np_mlkd(student, teacher, temperatures),
                             rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize('weights', [(1.0, 0.0, 0.0), (0.0, 1.0, 0.0),
                                     (0.0, 0.0, 1.0), (0.45, 0.45, 0.45)])
def test_mlkd_weights_select_each_level(weights):
  student, teacher, _ = random_batch((12, 10), seed=9)
  got = losses.mlkd_loss(student, teacher, instance_weight=weights[0],
                         batch_weight=weights[1], class_weight=weights[2])
  want = np_mlkd(student, teacher, losses.MLKD_TEMPERATURES, weights)
  np.testing.assert_allclose(got, want, rtol=2e-5, atol=1e-7)
  assert got > 0


def test_mlkd_is_zero_when_student_equals_teacher():
  student, _, _ = random_batch((9, 8), seed=10)
  assert abs(float(losses.mlkd_loss(student, student))) < 1e-6


# ----------------------------------------------------------------------------
# Shared properties: masks, gradients, jit, refusals.
# ----------------------------------------------------------------------------


def _per_example(name, student, teacher, labels, where=None):
  if name == 'nkd':
    return losses.nkd_loss(student, teacher, labels, gamma=3.5,
                           temperature=3.0, where=where)
  if name == 'ttm':
    return losses.ttm_loss(student, teacher, temperature=5.0, where=where)
  return losses.wttm_loss(student, teacher, temperature=5.0, where=where)


@pytest.mark.parametrize('name', ['nkd', 'ttm', 'wttm'])
def test_mask_equals_slicing_in_value_and_gradient(name):
  student, teacher, labels = random_batch((8, 6), seed=11)
  where = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)

  def masked(s):
    return jnp.sum(_per_example(name, s, teacher, labels, where))

  def sliced(s):
    return jnp.sum(_per_example(name, s, teacher[where], labels[where]))

  np.testing.assert_allclose(masked(student), sliced(student[where]),
                             rtol=1e-6)
  grad = jax.grad(masked)(student)
  np.testing.assert_allclose(grad[where], jax.grad(sliced)(student[where]),
                             rtol=1e-5, atol=1e-7)
  assert np.all(grad[~where] == 0)


def test_mlkd_mask_equals_slicing_in_value_and_gradient():
  student, teacher, _ = random_batch((8, 6), seed=12)
  where = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)
  masked = lambda s: losses.mlkd_loss(s, teacher, where=where)
  sliced = lambda s: losses.mlkd_loss(s, teacher[where])
  np.testing.assert_allclose(masked(student), sliced(student[where]),
                             rtol=1e-6)
  grad = jax.grad(masked)(student)
  np.testing.assert_allclose(grad[where], jax.grad(sliced)(student[where]),
                             rtol=1e-5, atol=1e-7)
  assert np.all(grad[~where] == 0)
  assert float(losses.mlkd_loss(student, teacher,
                                where=np.zeros(8, bool))) == 0.0


def _scalar_losses():
  return {
      'nkd': lambda s, t, y: jnp.mean(losses.nkd_loss(s, t, y, gamma=1.5,
                                                      temperature=3.0)),
      'ttm': lambda s, t, y: jnp.mean(losses.ttm_loss(s, t, temperature=10.0)),
      'wttm': lambda s, t, y: jnp.mean(losses.wttm_loss(s, t,
                                                        temperature=10.0)),
      'mlkd': lambda s, t, y: losses.mlkd_loss(s, t),
  }


@pytest.mark.parametrize('name', ['nkd', 'ttm', 'wttm', 'mlkd'])
@pytest.mark.parametrize('scale', [1e-3, 30.0, 1e4])
def test_values_and_gradients_are_finite(name, scale):
  student, teacher, labels = random_batch((5, 7), seed=13, scale=scale)
  loss = _scalar_losses()[name]
  value, grads = jax.value_and_grad(loss, argnums=(0, 1))(
      jnp.asarray(student), jnp.asarray(teacher), labels)
  assert np.isfinite(value)
  assert all(np.all(np.isfinite(g)) for g in grads)


@pytest.mark.parametrize('name', ['nkd', 'ttm', 'wttm', 'mlkd'])
def test_jit_equals_eager_and_bfloat16_is_computed_in_float32(name):
  student, teacher, labels = random_batch((4, 5), seed=14)
  loss = _scalar_losses()[name]
  eager = loss(student, teacher, labels)
  np.testing.assert_allclose(jax.jit(loss)(student, teacher, labels), eager,
                             rtol=1e-5)
  low = loss(jnp.asarray(student, jnp.bfloat16),
             jnp.asarray(teacher, jnp.bfloat16), labels)
  assert low.dtype == jnp.float32


@pytest.mark.parametrize('call, match', [
    (lambda s, t, y: losses.nkd_loss(s, t, y, temperature=0.0),
     'temperature=0.0'),
    (lambda s, t, y: losses.nkd_loss(s, t, y, gamma=-1.0), 'gamma=-1.0'),
    (lambda s, t, y: losses.nkd_loss(s, t, y + 10), 'outside'),
    (lambda s, t, y: losses.nkd_loss(s[:, :1], t[:, :1], y * 0),
     'at least 2'),
    (lambda s, t, y: losses.wttm_loss(s, t, temperature=-2.0),
     'temperature=-2.0'),
    (lambda s, t, y: losses.ttm_loss(s, t[:, :3]), 'does not match'),
    (lambda s, t, y: losses.mlkd_loss(s, t, temperatures=()), 'empty'),
    (lambda s, t, y: losses.mlkd_loss(s, t, temperatures=(4.0, 0.0)),
     'temperature=0.0'),
    (lambda s, t, y: losses.mlkd_loss(s[0], t[0]), r'\[B, C\]'),
    (lambda s, t, y: losses.mlkd_loss(s, t, class_weight=-1.0),
     'class_weight'),
])
def test_bad_arguments_raise_naming_the_argument(call, match):
  student, teacher, labels = random_batch((4, 5), seed=15)
  with pytest.raises(ValueError, match=match):
    call(student, teacher, labels)
