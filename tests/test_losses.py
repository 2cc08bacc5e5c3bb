"""kd_jax.losses against NumPy/SciPy references and Hinton et al. (2015)."""

import functools

import hypothesis
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
import jax
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
from jax.test_util import check_grads
import numpy as np
import pytest
import scipy.special
import scipy.stats

from kd_jax import losses

SHAPES = [(7,), (4, 5), (2, 3, 10)]
TEMPERATURES = [0.5, 1.0, 4.0]
LABEL_KINDS = ['int', 'one_hot', 'probs']
RTOL = ATOL = 1e-5


def random_logits(shape, seed=0, scale=3.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def random_labels(kind, shape, seed=0):
  """Labels for logits of `shape`: int indices, one-hot or probabilities."""
  rng = np.random.default_rng(seed)
  num_classes = shape[-1]
  indices = rng.integers(0, num_classes, size=shape[:-1]).astype(np.int32)
  if kind == 'int':
    return indices
  if kind == 'one_hot':
    return np.eye(num_classes, dtype=np.float32)[indices]
  return scipy.special.softmax(rng.normal(size=shape), axis=-1).astype(
      np.float32)


def np_targets(labels, num_classes, label_smoothing=0.0):
  labels = np.asarray(labels)
  if np.issubdtype(labels.dtype, np.integer):
    labels = np.eye(num_classes)[labels]
  return (1 - label_smoothing) * labels + label_smoothing / num_classes


# ----------------------------------------------------------------------------
# Each function against an independent NumPy/SciPy reference.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_tempered_softmax_matches_scipy(shape, temperature):
  logits = random_logits(shape)
  np.testing.assert_allclose(
      losses.tempered_softmax(logits, temperature),
      scipy.special.softmax(logits / temperature, axis=-1), rtol=RTOL,
      atol=ATOL)
  np.testing.assert_allclose(
      losses.tempered_log_softmax(logits, temperature),
      scipy.special.log_softmax(logits / temperature, axis=-1), rtol=RTOL,
      atol=ATOL)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
@pytest.mark.parametrize('scale', [True, False])
def test_kl_divergence_matches_scipy_entropy(shape, temperature, scale):
  student, teacher = random_logits(shape, 0), random_logits(shape, 1)
  p = scipy.special.softmax(teacher.astype(np.float64) / temperature, -1)
  q = scipy.special.softmax(student.astype(np.float64) / temperature, -1)
  expected = scipy.stats.entropy(p, q, axis=-1) * (
      temperature**2 if scale else 1.0)
  got = losses.kl_divergence(student, teacher, temperature, scale)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', TEMPERATURES)
@pytest.mark.parametrize('scale', [True, False])
def test_soft_cross_entropy_matches_numpy(shape, temperature, scale):
  student, teacher = random_logits(shape, 0), random_logits(shape, 1)
  p = scipy.special.softmax(teacher.astype(np.float64) / temperature, -1)
  log_q = scipy.special.log_softmax(student.astype(np.float64) / temperature,
                                    -1)
  expected = -np.sum(p * log_q, -1) * (temperature**2 if scale else 1.0)
  got = losses.soft_cross_entropy(student, teacher, temperature, scale)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('shape', [(6, 5), (2, 3, 4)])
@pytest.mark.parametrize('kind', LABEL_KINDS)
@pytest.mark.parametrize('label_smoothing', [0.0, 0.1])
def test_cross_entropy_matches_numpy(shape, kind, label_smoothing):
  logits, labels = random_logits(shape), random_labels(kind, shape)
  targets = np_targets(labels, shape[-1], label_smoothing)
  expected = -np.sum(
      targets * scipy.special.log_softmax(logits.astype(np.float64), -1), -1)
  got = losses.cross_entropy(logits, labels, label_smoothing)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('shape', [(6, 5), (2, 3, 4)])
@pytest.mark.parametrize('kind', LABEL_KINDS)
@pytest.mark.parametrize('label_smoothing', [0.0, 0.2])
def test_mse_to_labels_matches_numpy(shape, kind, label_smoothing):
  logits, labels = random_logits(shape), random_labels(kind, shape)
  targets = np_targets(labels, shape[-1], label_smoothing)
  probs = scipy.special.softmax(logits.astype(np.float64), -1)
  expected = np.sum((probs - targets)**2, -1)
  got = losses.mse_to_labels(logits, labels, label_smoothing)
  assert got.shape == shape[:-1]
  np.testing.assert_allclose(got, expected, rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('shape', SHAPES)
def test_logit_mse_is_half_mean_squared_centred_difference(shape):
  student, teacher = random_logits(shape, 0), random_logits(shape, 1)
  diff = student.astype(np.float64) - teacher
  diff -= diff.mean(-1, keepdims=True)
  expected = 0.5 * np.mean(diff**2, -1)
  np.testing.assert_allclose(losses.logit_mse(student, teacher), expected,
                             rtol=RTOL, atol=ATOL)
  shift = random_logits(shape[:-1] + (1,), 2, scale=50.0)
  np.testing.assert_allclose(losses.logit_mse(student + shift, teacher),
                             expected, rtol=1e-4, atol=1e-4)


def np_combine(teachers, method, weights, temperature=1.0):
  teachers = np.asarray(teachers, np.float64) / temperature
  k = teachers.shape[0]
  w = np.ones(k) / k if weights is None else np.asarray(weights) / np.sum(
      weights)
  w = w.reshape((k,) + (1,) * (teachers.ndim - 1))
  if method == 'mean_probs':
    probs = np.sum(w * scipy.special.softmax(teachers, -1), 0)
  else:
    probs = scipy.special.softmax(
        np.sum(w * scipy.special.log_softmax(teachers, -1), 0), -1)
  return np.log(probs)


@pytest.mark.parametrize('method', losses.COMBINE_METHODS)
@pytest.mark.parametrize('weights', [None, [0.5, 2.0, 1.0]])
def test_combine_teachers_matches_numpy(method, weights):
  teachers = random_logits((3, 4, 6))
  got = losses.combine_teachers(
      teachers, method, None if weights is None else jnp.array(weights))
  assert got.shape == (4, 6)
  np.testing.assert_allclose(got, np_combine(teachers, method, weights),
                             rtol=RTOL, atol=ATOL)
  np.testing.assert_allclose(jnp.sum(jnp.exp(got), -1), 1.0, rtol=1e-6)


@pytest.mark.parametrize('method', losses.COMBINE_METHODS)
def test_combine_teachers_of_one_teacher_is_its_log_softmax(method):
  teacher = random_logits((1, 4, 6))
  np.testing.assert_allclose(
      losses.combine_teachers(teacher, method),
      scipy.special.log_softmax(teacher[0], -1), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('method', losses.COMBINE_METHODS)
def test_combine_teachers_at_temperature_gives_mean_tempered_targets(method):
  teachers, temperature = random_logits((3, 4, 6)), 4.0
  combined = losses.combine_teachers(teachers, method, temperature=temperature)
  np.testing.assert_allclose(
      losses.tempered_log_softmax(combined, temperature),
      np_combine(teachers, method, None, temperature), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('method', losses.COMBINE_METHODS)
def test_combine_teachers_zero_weight_drops_that_teacher(method):
  teachers = random_logits((3, 4, 6))
  teachers[1, 0, 0] = -np.inf
  got = losses.combine_teachers(teachers, method, jnp.array([1.0, 0.0, 3.0]))
  np.testing.assert_allclose(
      got, np_combine(teachers[[0, 2]], method, [1.0, 3.0]), rtol=RTOL,
      atol=ATOL)


# ----------------------------------------------------------------------------
# Hinton et al. (2015), Sec. 2.
# ----------------------------------------------------------------------------


def zero_mean_logits(seed, shape=(4, 10)):
  logits = random_logits(shape, seed, scale=1.0)
  return logits - logits.mean(-1, keepdims=True)


def soft_grad(student, teacher, temperature, scale=True):
  return jax.grad(lambda s: jnp.sum(
      losses.soft_cross_entropy(s, teacher, temperature, scale)))(student)


def test_high_temperature_limit_is_logit_matching():
  student, teacher = zero_mean_logits(0), zero_mean_logits(1)
  num_classes = student.shape[-1]
  matching = (student - teacher) / num_classes
  errors = []
  for temperature in [1.0, 2.0, 5.0, 20.0, 100.0]:
    grad = soft_grad(student, teacher, temperature)
    errors.append(np.linalg.norm(grad - matching) / np.linalg.norm(matching))
  assert all(np.diff(errors) < 0), errors
  assert errors[0] > 0.1 and errors[-1] < 0.01, errors
  # logit_mse has exactly the limiting gradient.
  np.testing.assert_allclose(
      jax.grad(lambda s: jnp.sum(losses.logit_mse(s, teacher)))(student),
      matching, rtol=1e-5, atol=1e-7)


def test_logit_mse_is_high_temperature_limit_of_scaled_kl():
  # Logits need not be zero-mean: the limit of T^2 KL is the centred MSE.
  student, teacher = random_logits((4, 10), 0, 1.0), random_logits(
      (4, 10), 1, 1.0) + 3.0
  target = losses.logit_mse(student, teacher)
  np.testing.assert_allclose(losses.kl_divergence(student, teacher, 100.0),
                             target, rtol=0.01)
  target_grad = jax.grad(lambda s: jnp.sum(losses.logit_mse(s, teacher)))(
      student)
  np.testing.assert_allclose(soft_grad(student, teacher, 100.0), target_grad,
                             rtol=0.05, atol=1e-3 * np.abs(target_grad).max())


def test_temperature_squared_scaling_keeps_gradient_magnitude():
  student, teacher = zero_mean_logits(0), zero_mean_logits(1)
  temperatures = [1.0, 2.0, 5.0, 10.0, 20.0]
  scaled = [np.linalg.norm(soft_grad(student, teacher, t))
            for t in temperatures]
  unscaled = [np.linalg.norm(soft_grad(student, teacher, t, scale=False))
              for t in temperatures]
  assert max(scaled) / min(scaled) < 2.0, scaled
  np.testing.assert_allclose(unscaled, np.array(scaled) / np.square(
      temperatures), rtol=1e-5)
  assert unscaled[-1] < unscaled[0] / 200, unscaled


# ----------------------------------------------------------------------------
# distillation_loss.
# ----------------------------------------------------------------------------


def batch(seed=0, shape=(8, 5)):
  return (random_logits(shape, seed), random_logits(shape, seed + 1),
          random_labels('int', shape, seed + 2))


SOFT_FNS = {
    'kl': lambda s, t, temp: losses.kl_divergence(s, t, temp),
    'soft_ce': lambda s, t, temp: losses.soft_cross_entropy(s, t, temp),
    'logit_mse': lambda s, t, temp: losses.logit_mse(s, t),
}
HARD_FNS = {
    'ce': lambda s, y, eps: losses.cross_entropy(s, y, eps),
    'mse': lambda s, y, eps: losses.mse_to_labels(s, y, eps),
}


@pytest.mark.parametrize('soft', losses.SOFT_LOSSES)
@pytest.mark.parametrize('hard', losses.HARD_LOSSES)
def test_distillation_loss_is_alpha_mixture_of_mean_terms(soft, hard):
  student, teacher, labels = batch()
  temperature, alpha, eps = 3.0, 0.7, 0.1
  loss, terms = losses.distillation_loss(
      student, teacher, labels, temperature=temperature, alpha=alpha,
      soft=soft, hard=hard, label_smoothing=eps)
  soft_mean = np.mean(SOFT_FNS[soft](student, teacher, temperature))
  hard_mean = np.mean(HARD_FNS[hard](student, labels, eps))
  np.testing.assert_allclose(terms['soft'], soft_mean, rtol=1e-6)
  np.testing.assert_allclose(terms['hard'], hard_mean, rtol=1e-6)
  np.testing.assert_allclose(loss, alpha * soft_mean + (1 - alpha) * hard_mean,
                             rtol=1e-6)
  assert terms['total'] is loss and loss.shape == () and loss.dtype == 'float32'


def test_alpha_zero_is_mean_cross_entropy_without_teacher():
  student, _, labels = batch()
  loss, terms = losses.distillation_loss(student, None, labels,
                                         temperature=4.0, alpha=0.0)
  expected = np.mean(-scipy.special.log_softmax(student, -1)[
      np.arange(len(labels)), labels])
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  assert float(terms['soft']) == 0.0


@pytest.mark.parametrize('soft', losses.SOFT_LOSSES)
def test_alpha_one_is_mean_soft_term_without_labels(soft):
  student, teacher, _ = batch()
  loss, terms = losses.distillation_loss(student, teacher, None,
                                         temperature=4.0, alpha=1.0, soft=soft)
  np.testing.assert_allclose(
      loss, np.mean(SOFT_FNS[soft](student, teacher, 4.0)), rtol=1e-6)
  assert float(terms['hard']) == 0.0


def test_alpha_one_reports_hard_term_but_trains_on_teacher_only():
  student, teacher, labels = batch()
  def loss_fn(s, y):
    return losses.distillation_loss(s, teacher, y, temperature=2.0,
                                    alpha=1.0)
  (_, terms), grad = jax.value_and_grad(loss_fn, has_aux=True)(student,
                                                                labels)
  np.testing.assert_allclose(
      terms['hard'], np.mean(losses.cross_entropy(student, labels)), rtol=1e-6)
  grad_no_labels = jax.grad(lambda s: loss_fn(s, None)[0])(student)
  np.testing.assert_allclose(grad, grad_no_labels, rtol=1e-6)


def test_total_is_linear_in_alpha():
  student, teacher, labels = batch()
  def total(alpha):
    return losses.distillation_loss(student, teacher, labels,
                                    temperature=2.0, alpha=alpha)[0]
  for alpha in [0.25, 0.5, 0.9]:
    np.testing.assert_allclose(
        total(alpha), alpha * total(1.0) + (1 - alpha) * total(0.0),
        rtol=1e-6)


def test_label_smoothing_matches_reference():
  student, _, labels = batch()
  eps, num_classes = 0.2, student.shape[-1]
  targets = (1 - eps) * np.eye(num_classes)[labels] + eps / num_classes
  expected = np.mean(-np.sum(
      targets * scipy.special.log_softmax(student.astype(np.float64), -1), -1))
  loss, _ = losses.distillation_loss(student, None, labels, temperature=1.0,
                                     alpha=0.0, label_smoothing=eps)
  np.testing.assert_allclose(loss, expected, rtol=1e-6)


@pytest.mark.parametrize('soft', losses.SOFT_LOSSES)
@pytest.mark.parametrize('hard', losses.HARD_LOSSES)
def test_where_mask_equals_slicing(soft, hard):
  student, teacher, labels = batch(shape=(9, 5))
  where = np.array([1, 0, 1, 1, 0, 0, 1, 1, 0], bool)
  labels[~where] = 99  # Padding labels are never checked or used.
  kwargs = dict(temperature=2.0, alpha=0.6, soft=soft, hard=hard)
  masked = losses.distillation_loss(student, teacher, labels, where=where,
                                    **kwargs)
  sliced = losses.distillation_loss(student[where], teacher[where],
                                    labels[where], **kwargs)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-6),
               masked, sliced)
  grad_masked = jax.grad(lambda s: losses.distillation_loss(
      s, teacher, labels, where=where, **kwargs)[0])(student)
  grad_sliced = jax.grad(lambda s: losses.distillation_loss(
      s, teacher[where], labels[where], **kwargs)[0])(student[where])
  np.testing.assert_allclose(grad_masked[where], grad_sliced, rtol=1e-5,
                             atol=1e-7)
  assert not np.any(grad_masked[~where])


def test_empty_mask_gives_zero_loss_and_zero_gradient():
  student, teacher, labels = batch()
  def loss_fn(s):
    return losses.distillation_loss(s, teacher, labels, temperature=2.0,
                                    alpha=0.5, where=np.zeros(8, bool))[0]
  loss, grad = jax.value_and_grad(loss_fn)(student)
  assert float(loss) == 0.0 and not np.any(grad)


def test_traced_alpha_and_temperature_under_jit_and_vmap():
  student, teacher, labels = batch()
  @jax.jit
  def sweep(temperatures, alpha):
    return jax.vmap(lambda t: losses.distillation_loss(
        student, teacher, labels, temperature=t, alpha=alpha)[0])(temperatures)
  temperatures = jnp.array([1.0, 2.0, 8.0])
  expected = [losses.distillation_loss(student, teacher, labels,
                                       temperature=float(t), alpha=0.3)[0]
              for t in temperatures]
  np.testing.assert_allclose(sweep(temperatures, 0.3), expected, rtol=1e-5)


def test_axis_name_gives_global_masked_mean_in_shard_map():
  num_devices = jax.device_count()
  mesh = jax.make_mesh((num_devices,), ('data',))
  student, teacher, labels = batch(shape=(2 * num_devices, 5))
  where = np.arange(2 * num_devices) % 3 != 1
  kwargs = dict(temperature=2.0, alpha=0.4)

  def step(s, t, y, w):
    return losses.distillation_loss(s, t, y, where=w, axis_name='data',
                                    **kwargs)
  sharded = jax.jit(jax.shard_map(
      step, mesh=mesh, in_specs=P('data'), out_specs=P()))
  sharding = jax.sharding.NamedSharding(mesh, P('data'))
  got = sharded(*jax.device_put((student, teacher, labels, where), sharding))
  expected = losses.distillation_loss(student, teacher, labels, where=where,
                                      **kwargs)
  jax.tree.map(functools.partial(np.testing.assert_allclose, rtol=1e-5), got,
               expected)


# ----------------------------------------------------------------------------
# Transformations and numerics.
# ----------------------------------------------------------------------------


def _distill(s, t, y):
  return losses.distillation_loss(s, t, y, temperature=2.0, alpha=0.5,
                                  label_smoothing=0.1)[0]


PER_EXAMPLE = {
    'kl': lambda s, t, y: losses.kl_divergence(s, t, 2.0),
    'soft_ce': lambda s, t, y: losses.soft_cross_entropy(s, t, 0.5),
    'logit_mse': lambda s, t, y: losses.logit_mse(s, t),
    'cross_entropy': lambda s, t, y: losses.cross_entropy(s, y, 0.1),
    'mse_to_labels': lambda s, t, y: losses.mse_to_labels(s, y),
    'combine_teachers': lambda s, t, y: losses.combine_teachers(
        jnp.stack([s, t]), 'mean_probs', jnp.array([1.0, 2.0])),
    'combine_geometric': lambda s, t, y: losses.combine_teachers(
        jnp.stack([s, t]), 'mean_log_probs', temperature=3.0),
    'distillation_loss': _distill,
}


@pytest.mark.parametrize('name', PER_EXAMPLE)
def test_gradients_match_finite_differences(name):
  fn = PER_EXAMPLE[name]
  student, teacher, labels = batch(shape=(3, 4))
  # Second order (costly to compile) for the soft term and the objective.
  order = 2 if name in ('kl', 'distillation_loss') else 1
  with jax.enable_x64(True):  # float64 finite differences, tight tolerances.
    args = (jnp.asarray(student, jnp.float64), jnp.asarray(teacher,
                                                           jnp.float64))
    # jit: one compilation per derivative instead of one per eager op.
    check_grads(jax.jit(lambda s, t: fn(s, t, labels)), args, order=order,
                modes=('fwd', 'rev'))


@pytest.mark.parametrize('name', PER_EXAMPLE)
def test_jit_and_vmap_match_eager(name):
  fn = PER_EXAMPLE[name]
  student, teacher, labels = batch()
  eager = fn(student, teacher, labels)
  np.testing.assert_allclose(jax.jit(fn)(student, teacher, labels), eager,
                             rtol=1e-6, atol=1e-7)
  if name != 'distillation_loss':  # The only batch-level reduction.
    per_row = jax.vmap(lambda s, t, y: fn(s[None], t[None], y[None])[0])
    np.testing.assert_allclose(per_row(student, teacher, labels), eager,
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize('name', PER_EXAMPLE)
def test_bfloat16_inputs_give_float32_close_to_float32(name):
  fn = PER_EXAMPLE[name]
  student, teacher, labels = batch()
  student16 = jnp.asarray(student, jnp.bfloat16)
  teacher16 = jnp.asarray(teacher, jnp.bfloat16)
  got = fn(student16, teacher16, labels)
  assert got.dtype == jnp.float32
  # Same values as float32 inputs rounded to bfloat16 ...
  np.testing.assert_allclose(
      got, fn(student16.astype(jnp.float32), teacher16.astype(jnp.float32),
              labels), rtol=1e-6, atol=1e-6)
  # ... and close to the unrounded float32 result.
  np.testing.assert_allclose(got, fn(student, teacher, labels), rtol=0.05,
                             atol=0.05)


@pytest.mark.parametrize('temperature', [0.05, 1.0, 100.0])
@pytest.mark.parametrize('soft', losses.SOFT_LOSSES)
@pytest.mark.parametrize('hard', losses.HARD_LOSSES)
def test_extreme_logits_and_temperatures_stay_finite(temperature, soft, hard):
  student = np.array([[1e4, -1e4, 0.0], [-1e4, 1e4, 3.0], [0, 0, -1e4]],
                     np.float32)
  teacher = np.array([[-1e4, 1e4, 0.0], [1e4, -1e4, 1e4], [1e4, 0, 0]],
                     np.float32)
  labels = np.array([1, 0, 2])
  def loss_fn(s, t):
    return losses.distillation_loss(s, t, labels, temperature=temperature,
                                    alpha=0.5, soft=soft, hard=hard)[0]
  loss, grads = jax.value_and_grad(loss_fn, argnums=(0, 1))(student, teacher)
  assert np.isfinite(loss) and loss > 0
  for grad in grads:
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('soft_fn', [losses.kl_divergence,
                                     losses.soft_cross_entropy])
@pytest.mark.parametrize('underflow', [-1e4, -np.inf])
def test_teacher_underflow_gives_no_nan(soft_fn, underflow):
  student = np.array([[0.5, -1.0, 2.0, 0.0]], np.float32)
  teacher = np.array([[1.0, underflow, 0.0, underflow]], np.float32)
  temperature = 0.05
  assert losses.tempered_softmax(teacher, temperature)[0, 1] == 0.0
  loss, grads = jax.value_and_grad(
      lambda s, t: jnp.sum(soft_fn(s, t, temperature)), argnums=(0, 1))(
          student, teacher)
  # Reference: the zero-probability classes contribute nothing.
  p = scipy.special.softmax(teacher[0, [0, 2]].astype(np.float64)
                            / temperature)
  log_q = scipy.special.log_softmax(student[0].astype(np.float64)
                                    / temperature)[[0, 2]]
  expected = -np.sum(p * log_q) * temperature**2
  if soft_fn is losses.kl_divergence:
    expected -= scipy.stats.entropy(p) * temperature**2
  np.testing.assert_allclose(loss, expected, rtol=1e-5, atol=1e-6)
  assert np.all(np.isfinite(grads[0])) and np.all(np.isfinite(grads[1]))


# ----------------------------------------------------------------------------
# Properties (hypothesis).
# ----------------------------------------------------------------------------

HYPOTHESIS = hypothesis.settings(max_examples=50, deadline=None,
                                 database=None)
logit_arrays = hnp.arrays(np.float32, (3, 5), elements=st.floats(
    -20, 20, width=32))
temperatures = st.floats(0.1, 10.0)


@HYPOTHESIS
@hypothesis.given(logit_arrays, logit_arrays, temperatures)
def test_kl_divergence_is_non_negative(student, teacher, temperature):
  kl = losses.kl_divergence(student, teacher, temperature,
                            scale_by_temperature_squared=False)
  assert np.all(np.asarray(kl) >= -1e-5)


@HYPOTHESIS
@hypothesis.given(logit_arrays,
                  hnp.arrays(np.float32, (3, 1),
                             elements=st.floats(-50, 50, width=32)),
                  temperatures)
def test_kl_divergence_is_zero_for_shifted_teacher(teacher, shift,
                                                   temperature):
  kl = losses.kl_divergence(teacher + shift, teacher, temperature,
                            scale_by_temperature_squared=False)
  np.testing.assert_allclose(kl, 0.0, atol=1e-4)


@HYPOTHESIS
@hypothesis.given(logit_arrays, logit_arrays, temperatures)
def test_soft_cross_entropy_minus_kl_is_teacher_entropy(student, teacher,
                                                        temperature):
  entropy = scipy.stats.entropy(scipy.special.softmax(
      teacher.astype(np.float64) / temperature, -1), axis=-1)
  diff = (losses.soft_cross_entropy(student, teacher, temperature)
          - losses.kl_divergence(student, teacher, temperature))
  np.testing.assert_allclose(diff, entropy * temperature**2, rtol=1e-4,
                             atol=1e-4 * max(1.0, temperature**2))


# ----------------------------------------------------------------------------
# Bad inputs.
# ----------------------------------------------------------------------------

S, T, Y = batch()


def _distill_kwargs(**overrides):
  return {'temperature': 2.0, 'alpha': 0.5, **overrides}


BAD_INPUTS = {
    'temperature_zero': (
        lambda: losses.kl_divergence(S, T, 0.0), r'temperature=0\.0'),
    'temperature_negative': (
        lambda: losses.tempered_softmax(S, -1.0), r'temperature=-1\.0'),
    'temperature_nan': (
        lambda: losses.soft_cross_entropy(S, T, float('nan')),
        r'temperature=nan'),
    'temperature_not_scalar': (
        lambda: losses.kl_divergence(S, T, np.ones(8)), 'temperature'),
    'distill_temperature': (
        lambda: losses.distillation_loss(
            S, T, Y, **_distill_kwargs(temperature=-2.0)),
        r'temperature=-2\.0'),
    'alpha_negative': (
        lambda: losses.distillation_loss(S, T, Y,
                                         **_distill_kwargs(alpha=-0.1)),
        r'alpha=-0\.1'),
    'alpha_above_one': (
        lambda: losses.validate_distillation_args(1.0, 1.5, 'kl', 'ce'),
        r'alpha=1\.5'),
    'unknown_soft': (
        lambda: losses.validate_distillation_args(1.0, 0.5, 'kld', 'ce'),
        "soft='kld'"),
    'unknown_hard': (
        lambda: losses.distillation_loss(S, T, Y,
                                         **_distill_kwargs(hard='hinge')),
        "hard='hinge'"),
    'unknown_method': (
        lambda: losses.combine_teachers(np.stack([S, T]), 'median'),
        "method='median'"),
    'class_dims_differ': (
        lambda: losses.kl_divergence(S, T[:, :4], 1.0),
        r'teacher_logits shape \(8, 4\).*\(8, 5\)'),
    'distill_class_dims_differ': (
        lambda: losses.distillation_loss(S, T[:, :3], Y, **_distill_kwargs()),
        'teacher_logits shape'),
    'logit_mse_shapes_differ': (
        lambda: losses.logit_mse(S, T[:4]), 'teacher_logits shape'),
    'labels_too_large': (
        lambda: losses.cross_entropy(S, np.full(8, 5)), r'labels.*\[5\]'),
    'labels_negative': (
        lambda: losses.mse_to_labels(S, np.full(8, -1)), r'labels.*\[-1\]'),
    'distill_labels_out_of_range': (
        lambda: losses.distillation_loss(S, T, np.arange(8),
                                         **_distill_kwargs()),
        r'labels.*\[5, 6, 7\]'),
    'labels_wrong_shape': (
        lambda: losses.cross_entropy(S, np.zeros((8, 4))), 'labels shape'),
    'float_labels_per_example': (
        lambda: losses.cross_entropy(S, np.zeros(8, np.float32)),
        'labels.*integer'),
    'integer_student_logits': (
        lambda: losses.kl_divergence(S.astype(np.int32), T, 1.0),
        'student_logits.*int32'),
    'integer_teacher_logits': (
        lambda: losses.distillation_loss(S, T.astype(np.int32), Y,
                                         **_distill_kwargs()),
        'teacher_logits.*int32'),
    'integer_logits': (
        lambda: losses.cross_entropy(np.zeros((2, 3), np.int32), [0, 1]),
        'logits.*int32'),
    'teacher_weights_negative': (
        lambda: losses.combine_teachers(np.stack([S, T]),
                                        weights=np.array([1.0, -1.0])),
        'weights='),
    'teacher_weights_sum_zero': (
        lambda: losses.combine_teachers(np.stack([S, T]),
                                        weights=np.zeros(2)),
        'weights='),
    'teacher_weights_wrong_shape': (
        lambda: losses.combine_teachers(np.stack([S, T]),
                                        weights=np.ones(3)),
        'weights shape'),
    'label_smoothing_above_one': (
        lambda: losses.cross_entropy(S, Y, 1.5), r'label_smoothing=1\.5'),
    'labels_missing': (
        lambda: losses.distillation_loss(S, T, None, **_distill_kwargs()),
        'labels is None'),
    'teacher_missing': (
        lambda: losses.distillation_loss(S, None, Y, **_distill_kwargs()),
        'teacher_logits is None'),
    'where_wrong_shape': (
        lambda: losses.distillation_loss(S, T, Y, where=np.ones(7, bool),
                                         **_distill_kwargs()),
        'where shape'),
}


@pytest.mark.parametrize('case', BAD_INPUTS)
def test_bad_input_raises_value_error_naming_the_argument(case):
  fn, match = BAD_INPUTS[case]
  with pytest.raises(ValueError, match=match):
    fn()


def test_traced_temperature_and_labels_skip_value_checks():
  # Under jit values are unknown: no error; out-of-range labels give NaN.
  loss = jax.jit(lambda y: losses.cross_entropy(S, y))(np.array([0, 9] * 4))
  assert np.isfinite(loss[0]) and np.isnan(loss[1])
  kl = jax.jit(losses.kl_divergence)(S, T, 2.0)
  np.testing.assert_allclose(kl, losses.kl_divergence(S, T, 2.0), rtol=1e-6)


# ----------------------------------------------------------------------------
# topk_kl_divergence: the sparse (top-k + rest bucket) soft term.
# ----------------------------------------------------------------------------


def sparse_teacher(teacher_logits, k, temperature):
  """NumPy: top-k logits, their classes and the rest mass at T."""
  indices = np.argsort(-teacher_logits, axis=-1, kind='stable')[..., :k]
  top = np.take_along_axis(teacher_logits, indices, axis=-1)
  p = scipy.special.softmax(teacher_logits.astype(np.float64) / temperature,
                            axis=-1)
  rest = 1.0 - np.take_along_axis(p, indices, axis=-1).sum(-1)
  return top, indices, rest.astype(np.float32)


def topk_kl_reference(student, teacher, k, temperature):
  """KL of the (k classes + rest) bucket distributions, times T^2, in NumPy."""
  p = scipy.special.softmax(teacher.astype(np.float64) / temperature, -1)
  q = scipy.special.softmax(student.astype(np.float64) / temperature, -1)
  indices = np.argsort(-teacher, axis=-1, kind='stable')[..., :k]
  in_top = np.zeros(p.shape, bool)
  np.put_along_axis(in_top, indices, True, axis=-1)
  buckets_p = np.concatenate([np.take_along_axis(p, indices, -1),
                              (p * ~in_top).sum(-1, keepdims=True)], -1)
  buckets_q = np.concatenate([np.take_along_axis(q, indices, -1),
                              (q * ~in_top).sum(-1, keepdims=True)], -1)
  return temperature**2 * scipy.stats.entropy(buckets_p, buckets_q, axis=-1)


@pytest.mark.parametrize('k', [1, 2, 3, 9])
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_topk_kl_divergence_matches_numpy_bucket_kl(k, temperature):
  student, teacher = random_logits((6, 10), 1), random_logits((6, 10), 2)
  top, indices, rest = sparse_teacher(teacher, k, temperature)
  got = losses.topk_kl_divergence(student, top, indices, rest, temperature)
  np.testing.assert_allclose(
      got, topk_kl_reference(student, teacher, k, temperature),
      rtol=1e-4, atol=1e-5)


def test_topk_kl_with_every_class_is_the_full_kl():
  student, teacher = random_logits((2, 3, 7), 3), random_logits((2, 3, 7), 4)
  top, indices, rest = sparse_teacher(teacher, 7, 2.0)
  np.testing.assert_allclose(
      losses.topk_kl_divergence(student, top, indices, np.zeros_like(rest),
                                2.0),
      losses.kl_divergence(student, teacher, 2.0), rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # Compiles a KL per k.
def test_topk_kl_is_a_lower_bound_on_the_full_kl():
  student, teacher = random_logits((32, 10), 5), random_logits((32, 10), 6)
  full = losses.kl_divergence(student, teacher, 3.0)
  for k in (1, 2, 5):
    top, indices, rest = sparse_teacher(teacher, k, 3.0)
    sparse = losses.topk_kl_divergence(student, top, indices, rest, 3.0)
    assert np.all(np.asarray(sparse) <= np.asarray(full) + 1e-5), k


def test_topk_kl_where_zeroes_masked_examples_and_their_gradient():
  student, teacher = random_logits((5, 10), 7), random_logits((5, 10), 8)
  top, indices, rest = sparse_teacher(teacher, 3, 2.0)
  where = np.array([True, False, True, True, False])
  masked = losses.topk_kl_divergence(student, top, indices, rest, 2.0,
                                     where=where)
  sliced = losses.topk_kl_divergence(student[where], top[where],
                                     indices[where], rest[where], 2.0)
  np.testing.assert_allclose(masked[where], sliced, rtol=1e-6)
  assert not np.asarray(masked)[~where].any()
  grad = jax.grad(lambda s: losses.topk_kl_divergence(
      s, top, indices, rest, 2.0, where=where).sum())(student)
  assert not np.asarray(grad)[~where].any() and np.asarray(grad)[where].any()


def test_topk_kl_gradients_match_finite_differences():
  student, teacher = random_logits((3, 6), 9), random_logits((3, 6), 10)
  top, indices, rest = sparse_teacher(teacher, 2, 2.0)
  check_grads(lambda s: losses.topk_kl_divergence(s, top, indices, rest, 2.0),
              (student.astype(np.float64),), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)


def test_topk_kl_is_zero_for_a_student_that_matches_the_buckets():
  teacher = random_logits((4, 10), 11)
  top, indices, rest = sparse_teacher(teacher, 3, 1.0)
  np.testing.assert_allclose(
      losses.topk_kl_divergence(teacher, top, indices, rest, 1.0), 0.0,
      atol=1e-5)


@pytest.mark.parametrize('indices, rest, match', [
    ([[0, 0]], [0.1], 'distinct class indices'),
    ([[0, 10]], [0.1], 'distinct class indices'),
    ([[0, 1]], [1.5], r'rest_mass must lie in \[0, 1\]'),
    ([[0, 1, 2]], [0.1], 'topk_logits shape'),
])
def test_topk_kl_refuses_bad_sparse_targets(indices, rest, match):
  with pytest.raises(ValueError, match=match):
    losses.topk_kl_divergence(np.zeros((1, 10), np.float32),
                              np.zeros((1, 2), np.float32),
                              np.asarray(indices), np.asarray(rest))
