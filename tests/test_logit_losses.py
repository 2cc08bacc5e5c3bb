"""DKD, DIST, logit standardization, CTKD's gradient reversal and curriculum,
and the ensemble's combination temperature, each against an independent
NumPy reference of its authors' formula."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import config_lib
from kd_jax import losses
from kd_jax import objective
from kd_jax.methods import ctkd

SHAPES = [(6, 7), (3, 2)]
TEMPERATURES = [0.5, 1.0, 4.0, 20.0]


def random_logits(shape, seed, scale=3.0):
  rng = np.random.default_rng(seed)
  return (scale * rng.normal(size=shape)).astype(np.float32)


def random_batch(shape, seed=0):
  student = random_logits(shape, seed)
  teacher = random_logits(shape, seed + 1)
  labels = np.random.default_rng(seed + 2).integers(0, shape[-1], shape[:-1])
  return student, teacher, labels


# ----------------------------------------------------------------------------
# NumPy references, written from the papers' definitions.
# ----------------------------------------------------------------------------


def np_kl(p, q):
  return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0))
                                     - np.log(q)), 0.0), -1)


def np_dkd(student, teacher, labels, alpha, beta, temperature):
  """Zhao et al. 2022, Eq. 2-7, one example at a time."""
  out = []
  for z, v, t in zip(student.astype(np.float64), teacher.astype(np.float64),
                     labels):
    p = scipy.special.softmax(v / temperature)
    q = scipy.special.softmax(z / temperature)
    tckd = np_kl(np.array([p[t], 1 - p[t]]), np.array([q[t], 1 - q[t]]))
    others = np.arange(len(z)) != t
    p_hat = scipy.special.softmax(v[others] / temperature)
    q_hat = scipy.special.softmax(z[others] / temperature)
    nckd = np_kl(p_hat, q_hat)
    out.append(temperature**2 * (alpha * tckd + beta * nckd))
  return np.array(out)


def np_pearson(a, b, eps=1e-8):
  a = a - a.mean()
  b = b - b.mean()
  return np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b) + eps)


def np_dist(student, teacher, beta, gamma, tau):
  """Huang et al. 2022, Eq. 6-9."""
  y_s = scipy.special.softmax(student.astype(np.float64) / tau, -1)
  y_t = scipy.special.softmax(teacher.astype(np.float64) / tau, -1)
  inter = 1 - np.mean([np_pearson(a, b) for a, b in zip(y_s, y_t)])
  intra = 1 - np.mean([np_pearson(a, b) for a, b in zip(y_s.T, y_t.T)])
  return tau**2 * (beta * inter + gamma * intra)


def np_standardize(z):
  z = z.astype(np.float64)
  return (z - z.mean(-1, keepdims=True)) / (z.std(-1, ddof=1, keepdims=True)
                                            + 1e-7)


# ----------------------------------------------------------------------------
# DKD.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_dkd_matches_numpy_reference(shape, temperature):
  student, teacher, labels = random_batch(shape)
  got = losses.dkd(student, teacher, labels, alpha=1.5, beta=8.0,
                   temperature=temperature)
  np.testing.assert_allclose(
      got, np_dkd(student, teacher, labels, 1.5, 8.0, temperature),
      rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('temperature', TEMPERATURES)
def test_kd_is_tckd_plus_non_target_weighted_nckd(temperature):
  # KD = TCKD + (1 - p_t) NCKD (Zhao et al. 2022, Eq. 5).
  student, teacher, labels = random_batch((16, 10), seed=3)
  tckd = losses.dkd(student, teacher, labels, alpha=1.0, beta=0.0,
                    temperature=temperature)
  nckd = losses.dkd(student, teacher, labels, alpha=0.0, beta=1.0,
                    temperature=temperature)
  p = scipy.special.softmax(teacher.astype(np.float64) / temperature, -1)
  p_target = p[np.arange(16), labels]
  np.testing.assert_allclose(
      np.asarray(tckd) + (1 - p_target) * np.asarray(nckd),
      losses.kl_divergence(student, teacher, temperature), rtol=1e-4,
      atol=1e-5)


def test_dkd_mask_equals_slicing_in_value_and_gradient():
  student, teacher, labels = random_batch((8, 6), seed=4)
  where = np.array([1, 0, 1, 1, 0, 1, 1, 0], bool)

  def mean_masked(s):
    return losses.masked_mean(losses.dkd(s, teacher, labels, where=where),
                              where)

  def mean_sliced(s):
    return jnp.mean(losses.dkd(s[where], teacher[where], labels[where]))

  masked = jax.jit(jax.value_and_grad(mean_masked))(student)
  sliced = jax.jit(jax.value_and_grad(mean_sliced))(student)
  np.testing.assert_allclose(masked[0], sliced[0], rtol=1e-6)
  np.testing.assert_allclose(masked[1], sliced[1], rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------
# DIST.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
@pytest.mark.parametrize('temperature', [1.0, 4.0])
def test_dist_matches_numpy_reference(shape, temperature):
  student, teacher, _ = random_batch(shape, seed=5)
  got = losses.dist(student, teacher, beta=2.0, gamma=0.5,
                    temperature=temperature)
  np.testing.assert_allclose(
      got, np_dist(student, teacher, 2.0, 0.5, temperature), rtol=1e-4,
      atol=1e-6)


def test_dist_masked_rows_do_not_count():
  student, teacher, _ = random_batch((12, 7), seed=6)
  where = np.arange(12) % 3 != 1
  masked = jax.jit(functools.partial(losses.dist, where=where,
                                     temperature=2.0))
  np.testing.assert_allclose(masked(student, teacher),
                             losses.dist(student[where], teacher[where],
                                         temperature=2.0), rtol=1e-5)
  # Padding rows with any content change nothing, nor get a gradient.
  garbage = student.copy()
  garbage[~where] = 1e3
  np.testing.assert_allclose(masked(garbage, teacher),
                             masked(student, teacher), rtol=1e-5)
  grad = jax.grad(lambda s: masked(s, teacher))(student)
  assert np.all(np.asarray(grad)[~where] == 0)
  assert float(losses.dist(student, teacher, where=np.zeros(12, bool))) == 0


def test_dist_sharded_over_eight_devices_equals_one_device():
  student, teacher, _ = random_batch((16, 10), seed=7)
  where = np.arange(16) < 13  # Padding on the last shards.

  def loss_and_grad(s, t, w):
    return jax.value_and_grad(lambda s: losses.dist(
        s, t, beta=1.0, gamma=2.0, temperature=4.0, where=w))(s)

  one = jax.jit(loss_and_grad)(student, teacher, where)
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  shard = NamedSharding(mesh, P('data'))
  args = [jax.device_put(x, shard) for x in (student, teacher, where)]
  eight = jax.jit(loss_and_grad)(*args)
  assert len(args[0].sharding.device_set) == 8
  np.testing.assert_allclose(eight[0], one[0], rtol=1e-5)
  np.testing.assert_allclose(eight[1], one[1], rtol=1e-4, atol=1e-7)
  # Inside shard_map, axis_name makes the column statistics global.
  mapped = jax.shard_map(
      lambda s, t, w: losses.dist(s, t, beta=1.0, gamma=2.0, temperature=4.0,
                                  where=w, axis_name='data'),
      mesh=mesh, in_specs=(P('data'), P('data'), P('data')), out_specs=P())
  np.testing.assert_allclose(jax.jit(mapped)(*args), one[0], rtol=1e-5)


# ----------------------------------------------------------------------------
# Logit standardization.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', SHAPES)
def test_logit_standardize_matches_numpy(shape):
  z = random_logits(shape, seed=8)
  np.testing.assert_allclose(losses.logit_standardize(z), np_standardize(z),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('temperature', [1.0, 2.0, 4.0])
def test_standardized_kd_ignores_shift_and_scale_of_either_side(temperature):
  student, teacher, labels = random_batch((8, 10), seed=9)

  def soft(s, t):
    return losses.distillation_loss(
        s, t, labels, temperature=temperature, alpha=1.0,
        logit_standardization=True)[1]['soft']

  base = soft(student, teacher)
  assert float(base) > 0.01
  np.testing.assert_allclose(soft(3.0 * student - 7.0, teacher), base,
                             rtol=1e-4)
  np.testing.assert_allclose(soft(student, 0.2 * teacher + 50.0), base,
                             rtol=1e-4)
  # Without standardization, scale matters.
  plain = losses.distillation_loss(student, teacher, labels,
                                   temperature=temperature, alpha=1.0)
  scaled = losses.distillation_loss(3.0 * student, teacher, labels,
                                    temperature=temperature, alpha=1.0)
  assert not np.isclose(plain[0], scaled[0], rtol=1e-2)


# ----------------------------------------------------------------------------
# Shared contract: jit, extremes, bad arguments.
# ----------------------------------------------------------------------------


def _losses(temperature):
  return {
      'dkd': lambda s, t, y: jnp.mean(losses.dkd(
          s, t, y, alpha=1.0, beta=8.0, temperature=temperature)),
      'dist': lambda s, t, y: losses.dist(s, t, beta=1.0, gamma=1.0,
                                          temperature=temperature),
      'kd_ls': lambda s, t, y: losses.distillation_loss(
          s, t, y, temperature=temperature, alpha=0.9,
          logit_standardization=True)[0],
  }


@pytest.mark.parametrize('name', ['dkd', 'dist', 'kd_ls'])
def test_jit_equals_eager(name):
  student, teacher, labels = random_batch((8, 10), seed=10)
  fn = _losses(3.0)[name]
  np.testing.assert_allclose(jax.jit(fn)(student, teacher, labels),
                             fn(student, teacher, labels), rtol=1e-6)


@pytest.mark.parametrize('temperature', [0.5, 20.0])
@pytest.mark.parametrize('name', ['dkd', 'dist', 'kd_ls'])
def test_extreme_logits_give_finite_values_and_gradients(name, temperature):
  rng = np.random.default_rng(11)
  student = (1e4 * rng.choice([-1.0, 0.0, 1.0], size=(6, 5))).astype(
      np.float32)
  teacher = (1e4 * rng.choice([-1.0, 1.0], size=(6, 5))).astype(np.float32)
  teacher[0] = 0.0  # A row of equal logits (zero standard deviation).
  student[1] = 0.0
  labels = np.array([0, 1, 2, 3, 4, 0])
  fn = _losses(temperature)[name]
  value, grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(
      jnp.asarray(student), jnp.asarray(teacher), labels)
  assert np.isfinite(value)
  for g in grads:
    assert np.all(np.isfinite(g))


@pytest.mark.parametrize('call, match', [
    (lambda s, t, y: losses.dkd(s, t, y, temperature=0.0), 'temperature'),
    (lambda s, t, y: losses.dkd(s, t, y, alpha=-1.0), 'alpha'),
    (lambda s, t, y: losses.dkd(s, t, y, beta=np.ones(2)), 'beta'),
    (lambda s, t, y: losses.dkd(s, t, y.astype(np.float32)), 'labels'),
    (lambda s, t, y: losses.dkd(s, t, y + 10), 'labels'),
    (lambda s, t, y: losses.dkd(s, t[:, :3], y), 'teacher_logits'),
    (lambda s, t, y: losses.dist(s[None], t[None]), 'student_logits'),
    (lambda s, t, y: losses.dist(s, t, gamma=-2.0), 'gamma'),
    (lambda s, t, y: losses.dist(s, t, temperature=-1.0), 'temperature'),
    (lambda s, t, y: losses.dist(s, t, where=np.ones(3, bool)), 'where'),
    (lambda s, t, y: losses.logit_standardize(s[:, :1]), 'logits'),
    (lambda s, t, y: losses.logit_standardize(s.astype(np.int32)), 'logits'),
])
def test_bad_arguments_raise_naming_the_argument(call, match):
  student, teacher, labels = random_batch((4, 5), seed=12)
  with pytest.raises(ValueError, match=match):
    call(student, teacher, labels)


# ----------------------------------------------------------------------------
# CTKD: gradient reversal and its curriculum.
# ----------------------------------------------------------------------------


def test_gradient_reversal_is_identity_forward_and_negated_backward():
  x = jnp.array([0.5, -2.0])
  np.testing.assert_array_equal(ctkd.gradient_reversal(x, 0.3), x)
  grad = jax.grad(lambda x: jnp.sum(jnp.square(
      ctkd.gradient_reversal(x, 0.3))))(x)
  np.testing.assert_allclose(grad, -0.3 * 2 * x, rtol=1e-6)
  # Under jit with a traced strength, too.
  grad = jax.jit(jax.grad(lambda x, s: jnp.sum(
      ctkd.gradient_reversal(x, s))))(x, 0.7)
  np.testing.assert_allclose(grad, [-0.7, -0.7], rtol=1e-6)


def test_curriculum_follows_the_authors_cosine_decay():
  # CTKD's CosineDecay(max=0, min=-1, loops=10).get_value(epoch); the
  # reversal multiplies by that value, i.e. strength = -value.
  def authors(i, loops=10, high=0.0, low=-1.0):
    i = min(max(i, 0), loops)
    return (np.cos(i * np.pi / loops) + 1.0) * 0.5 * (high - low) + low

  for epoch in range(1, 15):
    # Training epoch `epoch` (from 1) spans fractional epochs [epoch-1, epoch).
    for done in (epoch - 1.0, epoch - 0.5):
      np.testing.assert_allclose(
          ctkd.curriculum_strength(done, epochs=10), -authors(epoch),
          atol=1e-6)


# ----------------------------------------------------------------------------
# The ensemble's combination temperature.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('ensemble_temperature', ['one', 'distillation'])
def test_ensemble_is_combined_at_the_configured_temperature(
    ensemble_temperature):
  teachers = random_logits((3, 6, 10), seed=13)
  weights = np.array([2.0, 1.0, 1.0])
  temperature = 4.0
  distill = config_lib.default_config().distill
  distill.update(ensemble_method='mean_probs', temperature=temperature,
                 ensemble_temperature=ensemble_temperature)
  combined = objective.combine(jnp.asarray(teachers), distill, weights)
  w = weights / weights.sum()
  combine_at = 1.0 if ensemble_temperature == 'one' else temperature
  mean = np.einsum('k,kbc->bc', w, scipy.special.softmax(
      teachers.astype(np.float64) / combine_at, -1))
  # The soft targets the student sees: the combination tempered at T.
  if ensemble_temperature == 'one':
    expected = scipy.special.softmax(np.log(mean) / temperature, -1)
  else:
    expected = mean  # Hinton et al. 2015: the mean tempered distribution.
  np.testing.assert_allclose(
      scipy.special.softmax(np.asarray(combined, np.float64) / temperature,
                            -1), expected, rtol=1e-4, atol=1e-6)
