"""kd_jax.feature_losses and kd_jax.connectors against NumPy references of
RepDistiller's formulas (written in its NCHW layout, op by op, in float64)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import connectors
from kd_jax import feature_losses as fl

RTOL, ATOL = 2e-5, 1e-6


def rand(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def nchw(x):
  return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


# ----------------------------------------------------------------------------
# NumPy references, after RepDistiller's distiller_zoo/*.py and crd/*.py.
# ----------------------------------------------------------------------------


def np_adaptive_pool(x, out_h, out_w):
  """torch.nn.functional.adaptive_avg_pool2d on NCHW."""
  b, c, h, w = x.shape
  out = np.zeros((b, c, out_h, out_w))
  for i in range(out_h):
    h0, h1 = int(np.floor(i * h / out_h)), int(np.ceil((i + 1) * h / out_h))
    for j in range(out_w):
      w0, w1 = int(np.floor(j * w / out_w)), int(np.ceil((j + 1) * w / out_w))
      out[:, :, i, j] = x[:, :, h0:h1, w0:w1].mean(axis=(2, 3))
  return out


def np_normalize(x, axis=1):
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def np_at(f_s, f_t, p=2):
  f_s, f_t = nchw(f_s), nchw(f_t)
  s_h, t_h = f_s.shape[2], f_t.shape[2]
  if s_h > t_h:
    f_s = np_adaptive_pool(f_s, t_h, t_h)
  elif s_h < t_h:
    f_t = np_adaptive_pool(f_t, s_h, s_h)
  at = lambda f: np_normalize((f**p).mean(1).reshape(f.shape[0], -1))
  return ((at(f_s) - at(f_t))**2).mean()


def np_sp(f_s, f_t):
  bsz = f_s.shape[0]
  f_s = np.asarray(f_s, np.float64).reshape(bsz, -1)
  f_t = np.asarray(f_t, np.float64).reshape(bsz, -1)
  g_s = np_normalize(f_s @ f_s.T)
  g_t = np_normalize(f_t @ f_t.T)
  return ((g_t - g_s)**2).sum() / (bsz * bsz)


def np_pkt(out, target, eps=1e-7):
  out, target = np.asarray(out, np.float64), np.asarray(target, np.float64)
  out = out / (np.sqrt((out**2).sum(1, keepdims=True)) + eps)
  target = target / (np.sqrt((target**2).sum(1, keepdims=True)) + eps)
  ms = (out @ out.T + 1.0) / 2.0
  ts = (target @ target.T + 1.0) / 2.0
  ms = ms / ms.sum(1, keepdims=True)
  ts = ts / ts.sum(1, keepdims=True)
  return np.mean(ts * np.log((ts + eps) / (ms + eps)))


def np_smooth_l1(a, b):
  d = np.abs(a - b)
  return np.mean(np.where(d < 1, 0.5 * d**2, d - 0.5))


def np_pdist(e, eps=1e-12):
  sq = (e**2).sum(1)
  res = np.clip(sq[:, None] + sq[None, :] - 2 * e @ e.T, eps, None)
  res = np.sqrt(res)
  res[range(len(e)), range(len(e))] = 0
  return res


def np_rkd(f_s, f_t, w_d=25.0, w_a=50.0):
  s = np.asarray(f_s, np.float64).reshape(f_s.shape[0], -1)
  t = np.asarray(f_t, np.float64).reshape(f_t.shape[0], -1)
  t_d = np_pdist(t)
  t_d = t_d / t_d[t_d > 0].mean()
  d = np_pdist(s)
  d = d / d[d > 0].mean()
  loss_d = np_smooth_l1(d, t_d)

  def angle(e):
    diff = e[None, :, :] - e[:, None, :]
    nd = diff / np.maximum(np.linalg.norm(diff, axis=2, keepdims=True), 1e-12)
    return np.matmul(nd, nd.transpose(0, 2, 1)).reshape(-1)

  loss_a = np_smooth_l1(angle(s), angle(t))
  return w_d * loss_d + w_a * loss_a


def np_cc(f_s, f_t):
  delta = np.abs(np.asarray(f_s, np.float64) - f_t)
  return np.mean((delta[:-1] * delta[1:]).sum(1))


def np_vid(pred_mean, target, log_scale, eps=1e-5):
  pred_mean, target = nchw(pred_mean), nchw(target)
  s_h, t_h = pred_mean.shape[2], target.shape[2]
  if s_h < t_h:
    target = np_adaptive_pool(target, s_h, s_h)
  var = np.log(1.0 + np.exp(np.asarray(log_scale, np.float64))) + eps
  var = var.reshape(1, -1, 1, 1)
  return np.mean(0.5 * ((pred_mean - target)**2 / var + np.log(var)))


def np_crd_scores(v1, v2, memory_v1, memory_v2, idx, temperature):
  """ContrastMemory.forward before the division by Z: exp(<w, v> / T)."""
  w1 = memory_v1[idx]  # [B, K+1, D], the student bank
  w2 = memory_v2[idx]  # the teacher bank
  out_v2 = np.exp(np.einsum('bkd,bd->bk', w1, v2) / temperature)
  out_v1 = np.exp(np.einsum('bkd,bd->bk', w2, v1) / temperature)
  return out_v1, out_v2


def np_contrast_loss(x, n_data, eps=1e-7):
  bsz, m = x.shape[0], x.shape[1] - 1
  pn = 1.0 / n_data
  p_pos = x[:, 0]
  log_d1 = np.log(p_pos / (p_pos + m * pn + eps))
  p_neg = x[:, 1:]
  log_d0 = np.log((m * pn) / (p_neg + m * pn + eps))
  return -(log_d1.sum() + log_d0.sum()) / bsz


def np_crd(v1, v2, memory_v1, memory_v2, idx, z, temperature, eps=1e-7):
  f64 = lambda a: np.asarray(a, np.float64)
  out_v1, out_v2 = np_crd_scores(f64(v1), f64(v2), f64(memory_v1),
                                 f64(memory_v2), idx, temperature)
  n_data = memory_v1.shape[0]
  return (np_contrast_loss(out_v1 / z[0], n_data, eps)
          + np_contrast_loss(out_v2 / z[1], n_data, eps))


def unit_rows(x):
  return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


# ----------------------------------------------------------------------------
# Values against the references.
# ----------------------------------------------------------------------------

FEATURE_PAIRS = [((3, 4, 4, 2), (3, 4, 4, 5)), ((2, 8, 8, 3), (2, 4, 4, 6)),
                 ((4, 3, 3, 2), (4, 6, 6, 2)), ((3, 7, 7, 2), (3, 3, 3, 4))]
EMBEDDING_PAIRS = [((5, 4), (5, 4)), ((6, 3), (6, 8)), ((2, 5), (2, 2))]


def test_adaptive_avg_pool_matches_torch_semantics():
  x = rand((2, 7, 5, 3))
  for out in [(3, 2), (7, 5), (2, 4), (1, 1)]:
    np.testing.assert_allclose(
        nchw(fl.adaptive_avg_pool(x, out)), np_adaptive_pool(nchw(x), *out),
        rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('shape', [(3, 4, 4, 2), (2, 6)])
def test_fitnet_hint_is_mse(shape):
  s, t = rand(shape, 0), rand(shape, 1)
  np.testing.assert_allclose(fl.fitnet_hint(s, t),
                             np.mean((s.astype(np.float64) - t)**2), rtol=RTOL)


@pytest.mark.parametrize('shapes, p', [(shapes, 2) for shapes in FEATURE_PAIRS]
                         + [(FEATURE_PAIRS[1], 1), (FEATURE_PAIRS[1], 4)])
def test_attention_transfer_matches_reference(shapes, p):
  s, t = rand(shapes[0], 0), rand(shapes[1], 1)
  np.testing.assert_allclose(
      jax.jit(fl.attention_transfer, static_argnums=2)(s, t, p),
      np_at(s, t, p), rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize('shapes', FEATURE_PAIRS[:2] + EMBEDDING_PAIRS[:2])
def test_similarity_preserving_matches_reference(shapes):
  s, t = rand(shapes[0], 0), rand(shapes[1], 1)
  np.testing.assert_allclose(jax.jit(fl.similarity_preserving)(s, t),
                             np_sp(s, t),
                             rtol=1e-4, atol=ATOL)


@pytest.mark.parametrize('shapes', EMBEDDING_PAIRS)
def test_pkt_matches_reference(shapes):
  s, t = rand(shapes[0], 0), rand(shapes[1], 1)
  np.testing.assert_allclose(jax.jit(fl.pkt)(s, t), np_pkt(s, t), rtol=1e-4,
                             atol=ATOL)


@pytest.mark.parametrize('shapes', EMBEDDING_PAIRS + [((3, 2, 2, 2),
                                                       (3, 5))])
def test_rkd_matches_reference(shapes):
  s, t = rand(shapes[0], 0), rand(shapes[1], 1)
  rkd = jax.jit(fl.rkd)
  for weights in [(25.0, 50.0), (1.0, 0.0), (0.0, 2.0)]:
    np.testing.assert_allclose(rkd(s, t, *weights), np_rkd(s, t, *weights),
                               rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize('shape', [(5, 4), (2, 3)])
def test_correlation_congruence_matches_reference(shape):
  s, t = rand(shape, 0), rand(shape, 1)
  np.testing.assert_allclose(fl.correlation_congruence(s, t), np_cc(s, t),
                             rtol=RTOL)


@pytest.mark.parametrize('shapes', [((2, 4, 4, 3), (2, 4, 4, 3)),
                                    ((3, 2, 2, 5), (3, 4, 4, 5))])
def test_vid_matches_reference(shapes):
  mean, t = rand(shapes[0], 0), rand(shapes[1], 1)
  log_scale = rand((shapes[1][-1],), 2)
  np.testing.assert_allclose(fl.vid(mean, t, log_scale),
                             np_vid(mean, t, log_scale), rtol=RTOL)


def crd_inputs(batch=3, num_examples=11, dim=4, num_negatives=5, seed=0):
  rng = np.random.default_rng(seed)
  student = unit_rows(rng.normal(size=(batch, dim)))
  teacher = unit_rows(rng.normal(size=(batch, dim)))
  student_memory = unit_rows(rng.normal(size=(num_examples, dim)))
  teacher_memory = unit_rows(rng.normal(size=(num_examples, dim)))
  indices = rng.choice(num_examples, batch, replace=False).astype(np.int32)
  negatives = rng.integers(0, num_examples, (batch, num_negatives)).astype(
      np.int32)
  return student, teacher, student_memory, teacher_memory, indices, negatives


@pytest.mark.parametrize('sizes', [(3, 11, 4, 5), (2, 30, 3, 16)])
@pytest.mark.parametrize('temperature', [0.07, 0.5])
def test_crd_matches_reference(sizes, temperature):
  s, t, ms, mt, idx, neg = crd_inputs(*sizes)
  rows = np.concatenate([idx[:, None], neg], axis=1)
  # Z as ContrastMemory sets it on the first batch: mean score * n_data.
  out_v1, out_v2 = np_crd_scores(s.astype(np.float64), t, ms, mt, rows,
                                 temperature)
  z_ref = np.array([out_v1.mean(), out_v2.mean()]) * ms.shape[0]
  z = jax.jit(fl.crd_normalizers)(s, t, ms, mt, idx, neg, temperature)
  np.testing.assert_allclose(z, z_ref, rtol=1e-4)
  for normalizers in [z_ref, 0.5 * z_ref]:
    np.testing.assert_allclose(
        jax.jit(fl.crd)(s, t, ms, mt, idx, neg,
                        normalizers.astype(np.float32), temperature),
        np_crd(s, t, ms, mt, rows, normalizers, temperature), rtol=1e-4)


# ----------------------------------------------------------------------------
# Every loss: jit equals eager, where equals slicing, finite gradients.
# ----------------------------------------------------------------------------


def _crd_loss(student, teacher, where=None):
  _, _, ms, mt, idx, neg = crd_inputs(batch=student.shape[0], dim=4)
  return fl.crd(student, teacher, ms, mt, idx, neg, jnp.array([11.0, 9.0]),
                where=where)


def _vid_loss(student, teacher, where=None):
  return fl.vid(student, teacher, jnp.linspace(-1.0, 2.0, teacher.shape[-1]),
                where=where)


# name: (loss(student, teacher, where), student shape, teacher shape)
LOSSES = {
    'fitnet_hint': (fl.fitnet_hint, (5, 2, 2, 3), (5, 2, 2, 3)),
    'attention_transfer': (fl.attention_transfer, (5, 4, 4, 2), (5, 2, 2, 3)),
    'similarity_preserving': (fl.similarity_preserving, (5, 2, 2, 3),
                              (5, 2, 2, 4)),
    'pkt': (fl.pkt, (5, 3), (5, 4)),
    'rkd': (fl.rkd, (5, 3), (5, 4)),
    'correlation_congruence': (fl.correlation_congruence, (5, 3), (5, 3)),
    'vid': (_vid_loss, (5, 2, 2, 3), (5, 4, 4, 3)),
    'crd': (_crd_loss, (5, 4), (5, 4)),
}
MASK = np.array([True, False, True, True, False])
# One compiled value-and-gradient per loss, shared by the tests below.
VALUE_AND_GRAD = {
    name: jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    for name, (loss, _, _) in LOSSES.items()}


def loss_inputs(name):
  loss, s_shape, t_shape = LOSSES[name]
  s, t = rand(s_shape, 0), rand(t_shape, 1)
  if name == 'crd':
    s, t = unit_rows(s), unit_rows(t)
  return loss, s, t


@pytest.mark.parametrize('name', LOSSES)
def test_jit_equals_eager(name):
  loss, s, t = loss_inputs(name)
  value, _ = VALUE_AND_GRAD[name](s, t, where=MASK)
  np.testing.assert_allclose(value, loss(s, t, where=MASK), rtol=1e-5,
                             atol=1e-7)


@pytest.mark.parametrize('name', LOSSES)
def test_where_equals_slicing_in_value_and_gradient(name):
  _, s, t = loss_inputs(name)
  value, grads = VALUE_AND_GRAD[name](s, t, where=MASK)
  if name == 'crd':
    # The sliced batch keeps each row's own example index and negatives.
    _, _, ms, mt, idx, neg = crd_inputs(batch=5, dim=4)
    sliced = jax.jit(jax.value_and_grad(
        lambda s, t: fl.crd(s, t, ms, mt, idx[MASK], neg[MASK],
                            jnp.array([11.0, 9.0])), argnums=(0, 1)))
  else:
    sliced = VALUE_AND_GRAD[name]
  sliced_value, sliced_grads = sliced(s[MASK], t[MASK])
  np.testing.assert_allclose(value, sliced_value, rtol=1e-5, atol=1e-7)
  for grad, sliced_grad in zip(grads, sliced_grads):
    np.testing.assert_allclose(grad[MASK], sliced_grad, rtol=1e-4, atol=1e-6)
    np.testing.assert_array_equal(grad[~MASK], 0.0)


@pytest.mark.parametrize('name', LOSSES)
@pytest.mark.parametrize('case', ['zeros', 'identical', 'rows_equal',
                                  'student_zero'])
def test_gradients_are_finite_at_degenerate_inputs(name, case):
  loss, s, t = loss_inputs(name)
  if case == 'zeros':
    s, t = np.zeros_like(s), np.zeros_like(t)
  elif case == 'identical' and s.shape == t.shape:
    t = s.copy()
  elif case == 'rows_equal':
    s, t = np.broadcast_to(s[:1], s.shape), np.broadcast_to(t[:1], t.shape)
  elif case == 'student_zero':
    s = np.zeros_like(s)
  value, grads = VALUE_AND_GRAD[name](s, t)
  assert np.isfinite(value)
  for grad in grads:
    assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('name', LOSSES)
def test_gradient_matches_finite_differences(name):
  _, s, t = loss_inputs(name)
  value_and_grad = VALUE_AND_GRAD[name]
  _, (grad, _) = value_and_grad(s, t)
  direction = rand(s.shape, 7)
  step = 1e-2
  plus, _ = value_and_grad(s + step * direction, t)
  minus, _ = value_and_grad(s - step * direction, t)
  np.testing.assert_allclose((plus - minus) / (2 * step),
                             np.sum(grad * direction), rtol=0.02, atol=1e-4)


def test_identical_inputs_give_zero_loss_and_gradient():
  for name in ['fitnet_hint', 'attention_transfer', 'similarity_preserving',
               'pkt', 'rkd', 'correlation_congruence']:
    _, s, _ = loss_inputs(name)
    value, (grad, _) = VALUE_AND_GRAD[name](s, s)
    np.testing.assert_allclose(value, 0.0, atol=1e-6, err_msg=name)
    np.testing.assert_allclose(grad, 0.0, atol=1e-5, err_msg=name)


def test_rkd_teacher_side_is_constant():
  s, t = rand((4, 3), 0), rand((4, 5), 1)
  np.testing.assert_array_equal(jax.jit(jax.grad(fl.rkd, argnums=1))(s, t),
                                0.0)


def test_crd_gradient_reaches_embeddings_not_memory():
  s, t, ms, mt, idx, neg = crd_inputs()
  z = jnp.array([11.0, 11.0])
  grads = jax.jit(jax.grad(fl.crd, argnums=(0, 1, 2, 3)))(s, t, ms, mt, idx,
                                                          neg, z)
  assert np.abs(grads[0]).max() > 0 and np.abs(grads[1]).max() > 0
  np.testing.assert_array_equal(grads[2], 0.0)
  np.testing.assert_array_equal(grads[3], 0.0)


# ----------------------------------------------------------------------------
# Argument checks.
# ----------------------------------------------------------------------------

F4, F2 = np.zeros((2, 4, 4, 3), np.float32), np.zeros((2, 3), np.float32)


@pytest.mark.parametrize('call, argument', [
    (lambda: fl.fitnet_hint(F4, F4[:, :2]), 'teacher_features'),
    (lambda: fl.fitnet_hint(F4.astype(np.int32), F4), 'student_features'),
    (lambda: fl.attention_transfer(F2, F4), 'student_features'),
    (lambda: fl.attention_transfer(F4, F4[:1]), 'teacher_features'),
    (lambda: fl.attention_transfer(F4, F4, p=0), 'p='),
    (lambda: fl.attention_transfer(F4, F4, p=1.5), 'p='),
    (lambda: fl.similarity_preserving(F4, F4, where=np.ones(3, bool)),
     'where'),
    (lambda: fl.similarity_preserving(F4, F4, where=np.ones(2)), 'where'),
    (lambda: fl.pkt(F4, F2), 'student_embeddings'),
    (lambda: fl.pkt(F2, F2, eps=0.0), 'eps'),
    (lambda: fl.rkd(F2, F2[:1]), 'teacher_embeddings'),
    (lambda: fl.rkd(F2, F2, distance_weight=np.ones(2)), 'distance_weight'),
    (lambda: fl.correlation_congruence(F2, np.zeros((2, 4))),
     'teacher_embeddings'),
    (lambda: fl.vid(F4, F4, np.zeros(4)), 'log_scale'),
    (lambda: fl.vid(F4, F4, np.zeros(3), eps=-1.0), 'eps'),
    (lambda: fl.crd_memory_init(0, 3, jax.random.key(0)), 'num_examples'),
    (lambda: fl.crd_sample_negatives(jax.random.key(0), np.zeros(2), 5, 2),
     'indices'),
    (lambda: fl.crd_sample_negatives(jax.random.key(0), np.zeros(2, int), 5,
                                     0), 'num_negatives'),
    (lambda: fl.crd_memory_update(np.zeros((5, 3)), np.zeros(2, int), F2,
                                  1.0), 'momentum'),
    (lambda: fl.crd_memory_update(np.zeros((5, 4)), np.zeros(2, int), F2),
     'memory'),
])
def test_bad_arguments_raise_naming_the_argument(call, argument):
  with pytest.raises(ValueError, match=argument):
    call()


@pytest.mark.parametrize('change, argument', [
    (dict(normalizers=np.array([1.0, -1.0])), 'normalizers'),
    (dict(normalizers=np.ones(3)), 'normalizers'),
    (dict(temperature=0.0), 'temperature'),
    (dict(negative_indices=np.zeros((3,), np.int32)), 'negative_indices'),
    (dict(indices=np.zeros((2,), np.int32)), 'indices'),
    (dict(teacher_memory=np.zeros((11, 5), np.float32)), 'teacher_memory'),
    (dict(teacher_embeddings=np.zeros((3, 5), np.float32)),
     'teacher_embeddings'),
])
def test_crd_bad_arguments_raise_naming_the_argument(change, argument):
  s, t, ms, mt, idx, neg = crd_inputs()
  args = dict(student_embeddings=s, teacher_embeddings=t, student_memory=ms,
              teacher_memory=mt, indices=idx, negative_indices=neg,
              normalizers=np.ones(2, np.float32))
  args.update(change)
  with pytest.raises(ValueError, match=argument):
    fl.crd(**args)


# ----------------------------------------------------------------------------
# CRD memory bank.
# ----------------------------------------------------------------------------


def test_crd_memory_init_is_uniform_with_reference_bound():
  bank = fl.crd_memory_init(2000, 12, jax.random.key(0))
  bound = 1.0 / np.sqrt(12 / 3)
  assert bank.shape == (2000, 12) and bank.dtype == jnp.float32
  assert np.abs(bank).max() <= bound
  # Uniform on [-a, a] has variance a^2 / 3: rows of expected norm^2 1.
  np.testing.assert_allclose(np.mean(np.sum(np.square(bank), 1)), 1.0,
                             rtol=0.03)


def test_crd_memory_update_is_momentum_then_unit_norm():
  rng = np.random.default_rng(0)
  bank = rng.normal(size=(9, 4)).astype(np.float32)
  indices = np.array([7, 2, 5], np.int32)
  embeddings = unit_rows(rng.normal(size=(3, 4)))
  where = np.array([True, True, False])
  new = jax.jit(fl.crd_memory_update)(bank, indices, embeddings, 0.5,
                                      where=where)
  mixed = 0.5 * bank[indices] + 0.5 * embeddings
  expected = bank.copy()
  expected[indices[:2]] = (mixed / np.linalg.norm(mixed, axis=1,
                                                  keepdims=True))[:2]
  np.testing.assert_allclose(new, expected, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(new[indices[:2]], axis=1), 1.0,
                             rtol=1e-6)


@pytest.mark.parametrize('labels', [False, True])
def test_crd_sampling_never_returns_the_positive(labels):
  num_examples, num_negatives = 40, 12
  example_labels = np.arange(num_examples) % 4 if labels else None
  indices = np.array([0, 5, 39, 17], np.int32)
  sample = jax.jit(functools.partial(
      fl.crd_sample_negatives, num_examples=num_examples,
      num_negatives=num_negatives))
  for seed in range(3):
    negatives = np.asarray(sample(jax.random.key(seed), indices,
                                  example_labels=example_labels))
    assert negatives.shape == (4, num_negatives)
    assert negatives.min() >= 0 and negatives.max() < num_examples
    assert not np.any(negatives == indices[:, None])
    if labels:
      # RepDistiller's 'exact' sampler: negatives come from the other classes.
      assert not np.any(example_labels[negatives]
                        == example_labels[indices][:, None])
    # Enough candidates: drawn without replacement, as np.random.choice.
    assert all(len(set(row)) == num_negatives for row in negatives.tolist())


def test_crd_sampling_replaces_only_when_candidates_run_out():
  example_labels = np.array([0] * 8 + [1] * 3)
  indices = np.array([0, 9], np.int32)  # class 0 has 3 negatives, class 1: 8
  sample = jax.jit(fl.crd_sample_negatives, static_argnums=(2, 3))
  negatives = np.asarray(sample(jax.random.key(0), indices, 11, 6,
                                example_labels=example_labels))
  assert set(negatives[0].tolist()) <= {8, 9, 10}
  assert set(negatives[1].tolist()) <= set(range(8))
  assert len(set(negatives[1].tolist())) == 6


def test_crd_sampling_is_uniform_over_candidates():
  indices = np.array([3], np.int32)
  keys = jax.random.split(jax.random.key(0), 200)
  draws = jax.jit(jax.vmap(
      lambda key: fl.crd_sample_negatives(key, indices, 6, 2)))(keys)
  counts = np.bincount(np.asarray(draws).ravel(), minlength=6)
  assert counts[3] == 0
  # 400 draws over 5 candidates: 80 each, sd ~ 8.
  assert np.all(np.abs(np.delete(counts, 3) - 80) < 35)


# ----------------------------------------------------------------------------
# Connectors.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('student_shape, teacher_shape', [
    ((2, 8, 8, 3), (4, 4, 16)),   # half the size: strided 3x3 conv
    ((2, 4, 4, 16), (8, 8, 5)),   # twice the size: transposed conv
    ((2, 4, 4, 3), (4, 4, 32)),   # same size, channels differ: 1x1 conv
    ((2, 7, 7, 3), (4, 4, 6)),    # larger: 4x4 valid conv
])
def test_fitnet_regressor_maps_to_teacher_shape(student_shape, teacher_shape):
  module = connectors.FitNetRegressor(teacher_shape)
  x = jnp.zeros(student_shape)
  variables = jax.eval_shape(
      lambda: module.init(jax.random.key(0), x, train=False))
  out, _ = jax.eval_shape(
      lambda v: module.apply(v, x, train=True, mutable=['batch_stats']),
      variables)
  assert out.shape == (student_shape[0],) + teacher_shape
  assert variables['batch_stats']['BatchNorm_0']['mean'].shape == (
      teacher_shape[-1],)


def test_fitnet_regressor_refuses_unmappable_sizes():
  module = connectors.FitNetRegressor((16, 16, 4))
  with pytest.raises(ValueError, match='teacher_shape'):
    module.init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)), train=False)


def test_fitnet_regressor_output_feeds_the_hint_loss():
  module = connectors.FitNetRegressor((4, 4, 5))
  x, t = rand((3, 8, 8, 2), 0), rand((3, 4, 4, 5), 1)
  variables = jax.jit(functools.partial(module.init, train=False))(
      jax.random.key(0), x)
  out, _ = jax.jit(functools.partial(module.apply, train=True,
                                     mutable=['batch_stats']))(variables, x)
  # Batch statistics and ReLU: each channel has mean >= 0 over the batch.
  assert np.all(np.asarray(out) >= 0)
  assert np.isfinite(fl.fitnet_hint(out, t))


@pytest.mark.parametrize('student_shape, teacher_shape', [
    ((2, 8, 8, 3), (4, 4, 6)), ((2, 2, 2, 3), (4, 4, 6))])
def test_vid_regressor_shapes_and_initial_variance(student_shape,
                                                   teacher_shape):
  module = connectors.VIDRegressor(teacher_shape, init_pred_var=5.0)
  x = jnp.asarray(rand(student_shape))
  variables = jax.jit(module.init)(jax.random.key(0), x)
  mean, log_scale = jax.jit(module.apply)(variables, x)
  height = min(student_shape[1], teacher_shape[0])
  assert mean.shape == (student_shape[0], height, height, teacher_shape[-1])
  np.testing.assert_allclose(jax.nn.softplus(log_scale) + 1e-5, 5.0,
                             rtol=1e-6)
  teacher = jnp.asarray(rand((student_shape[0],) + teacher_shape, 1))
  assert np.isfinite(fl.vid(mean, teacher, log_scale))


def test_crd_embed_is_unit_norm_and_linear_without_normalize():
  x = jnp.asarray(rand((3, 2, 2, 5)))
  for normalize in [True, False]:
    module = connectors.CRDEmbed(7, normalize=normalize)
    variables = jax.jit(module.init)(jax.random.key(0), x)
    out = jax.jit(module.apply)(variables, x)
    assert out.shape == (3, 7)
    norms = np.linalg.norm(out, axis=1)
    if normalize:
      np.testing.assert_allclose(norms, 1.0, rtol=1e-6)
    else:
      params = variables['params']['Dense_0']
      np.testing.assert_allclose(
          out, x.reshape(3, -1) @ params['kernel'] + params['bias'],
          rtol=1e-5, atol=1e-6)
  # A zero input gives a zero output (zero bias): still a finite gradient.
  embed = connectors.CRDEmbed(7)
  grad = jax.jit(jax.grad(lambda v: embed.apply(v, jnp.zeros_like(x)).sum()))(
      embed.init(jax.random.key(0), x))
  assert all(np.all(np.isfinite(g)) for g in jax.tree.leaves(grad))
