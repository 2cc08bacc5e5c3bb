"""OFD (margin, partial L2, connector) and ReviewKD (HCL, ABF fusion) against
NumPy references written from the authors' code (clovaai/overhaul-distillation
distiller.py, mdistiller OFD.py and ReviewKD.py, dvlab-research/ReviewKD
reviewkd.py), in torch's NCHW layout and float64."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from kd_jax import connectors
from kd_jax import feature_losses as fl

# Slow (seconds per test): ReviewKD/OFD connectors on CIFAR-sized maps.
pytestmark = pytest.mark.slow

RTOL, ATOL = 2e-5, 1e-6


def rand(shape, seed=0, scale=1.0):
  return (scale * np.random.default_rng(seed).normal(size=shape)).astype(
      np.float32)


def nchw(x):
  return np.transpose(np.asarray(x, np.float64), (0, 3, 1, 2))


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


# ----------------------------------------------------------------------------
# NumPy references.
# ----------------------------------------------------------------------------


def np_ofd_margin(scale, bias):
  """get_margin_from_BN, channel by channel."""
  margin = []
  for s, m in zip(np.asarray(scale, np.float64), np.asarray(bias, np.float64)):
    s = abs(s)
    if scipy.stats.norm.cdf(-m / s) > 0.001:
      margin.append(-s * math.exp(-(m / s)**2 / 2) / math.sqrt(2 * math.pi)
                    / scipy.stats.norm.cdf(-m / s) + m)
    else:
      margin.append(-3 * s)
  return np.array(margin)


def np_ofd_loss(source, target, margin):
  """mdistiller's feat_loss on NCHW, the teacher pooled to the student."""
  s, t = nchw(source), nchw(target)
  if t.shape[2] != s.shape[2]:
    t = np_adaptive_pool(t, s.shape[2], s.shape[3])
  m = np.asarray(margin, np.float64)[None, :, None, None]
  loss = ((s - m)**2 * ((s > m) & (t <= m))
          + (s - t)**2 * ((s > t) & (t > m) & (t <= 0))
          + (s - t)**2 * (t > 0))
  return np.abs(loss).mean(axis=0).sum()


def np_hcl(fs, ft):
  """ReviewKD's hcl for one pair."""
  fs, ft = nchw(fs), nchw(ft)
  h = fs.shape[2]
  loss = ((fs - ft)**2).mean()
  cnt, tot = 1.0, 1.0
  for l in [4, 2, 1]:
    if l >= h:
      continue
    cnt /= 2.0
    loss += ((np_adaptive_pool(fs, l, l) - np_adaptive_pool(ft, l, l))**2
             ).mean() * cnt
    tot += cnt
  return loss / tot


def np_nearest(x, out_h, out_w):
  """F.interpolate(mode='nearest') on NCHW: src = floor(dst * in / out)."""
  rows = np.floor(np.arange(out_h) * (x.shape[2] / out_h)).astype(int)
  cols = np.floor(np.arange(out_w) * (x.shape[3] / out_w)).astype(int)
  return x[:, :, rows][:, :, :, cols]


def np_conv(x, kernel, bias=None, pad=0):
  """torch Conv2d (stride 1) on NCHW with a Flax HWIO kernel."""
  k = np.asarray(kernel, np.float64)
  x = np.pad(x, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
  kh, kw = k.shape[:2]
  h, w = x.shape[2] - kh + 1, x.shape[3] - kw + 1
  out = np.zeros((x.shape[0], k.shape[3], h, w))
  for i in range(kh):
    for j in range(kw):
      out += np.einsum('bchw,co->bohw', x[:, :, i:i + h, j:j + w], k[i, j])
  if bias is not None:
    out += np.asarray(bias, np.float64)[None, :, None, None]
  return out


def np_batch_norm_train(x, scale, bias, eps=1e-5):
  mean = x.mean(axis=(0, 2, 3), keepdims=True)
  var = x.var(axis=(0, 2, 3), keepdims=True)
  return ((x - mean) / np.sqrt(var + eps)
          * np.asarray(scale, np.float64)[None, :, None, None]
          + np.asarray(bias, np.float64)[None, :, None, None])


def np_abf(params, x, y=None, out_shape=None):
  """The authors' ABF.forward (train-mode BN) with the Flax params."""
  n, _, h, w = x.shape
  x = np_batch_norm_train(np_conv(x, params['Conv_0']['kernel']),
                          params['BatchNorm_0']['scale'],
                          params['BatchNorm_0']['bias'])
  if y is not None:
    y = np_nearest(y, h, w)
    z = np.concatenate([x, y], axis=1)
    z = np_conv(z, params['attention']['kernel'], params['attention']['bias'])
    z = 1 / (1 + np.exp(-z))
    x = x * z[:, 0].reshape(n, 1, h, w) + y * z[:, 1].reshape(n, 1, h, w)
  if x.shape[-1] != out_shape:
    x = np_nearest(x, out_shape, out_shape)
  y = np_batch_norm_train(np_conv(x, params['Conv_1']['kernel'], pad=1),
                          params['BatchNorm_1']['scale'],
                          params['BatchNorm_1']['bias'])
  return y, x


# ----------------------------------------------------------------------------
# OFD.
# ----------------------------------------------------------------------------


def test_ofd_margin_matches_authors_code():
  rng = np.random.default_rng(0)
  scale = rng.normal(size=64).astype(np.float32)
  bias = (2.0 * rng.normal(size=64)).astype(np.float32)
  # Away from the 0.001 switch, where float32 and float64 may disagree.
  ratio = bias / np.abs(scale)
  keep = np.abs(scipy.stats.norm.cdf(-ratio) - 0.001) > 1e-4
  got = fl.ofd_margin(scale[keep], bias[keep])
  np.testing.assert_allclose(got, np_ofd_margin(scale[keep], bias[keep]),
                             rtol=2e-5, atol=1e-6)
  assert np.all(np.asarray(got) <= 0)
  assert np.sum(ratio[keep] > 3.1) > 0  # The -3 |gamma| branch is covered.


def test_ofd_margin_is_the_mean_of_the_negative_part():
  # Monte-Carlo: E[x | x < 0] for x ~ N(beta, gamma^2).
  rng = np.random.default_rng(1)
  for gamma, beta in [(1.0, 0.0), (0.5, 0.7), (2.0, -1.0)]:
    x = rng.normal(beta, gamma, size=400_000)
    want = x[x < 0].mean()
    got = float(fl.ofd_margin(np.array([gamma]), np.array([beta]))[0])
    assert abs(got - want) < 5e-3 * gamma


def test_ofd_margin_of_a_constant_channel_is_finite():
  got = fl.ofd_margin(np.array([0.0, 0.0, -1.0]), np.array([-2.0, 3.0, 0.0]))
  np.testing.assert_allclose(got, [-2.0, 0.0, -np.sqrt(2 / np.pi)],
                             rtol=1e-6)


@pytest.mark.parametrize('student_shape, teacher_shape', [
    ((4, 8, 8, 6), (4, 8, 8, 6)),
    ((3, 4, 4, 5), (3, 8, 8, 5)),   # Teacher pooled to the student's size.
    ((2, 1, 1, 7), (2, 1, 1, 7)),
])
def test_ofd_loss_matches_mdistiller(student_shape, teacher_shape):
  student = rand(student_shape, seed=2)
  teacher = rand(teacher_shape, seed=3, scale=2.0)
  channels = student_shape[-1]
  margin = fl.ofd_margin(rand((channels,), seed=4), rand((channels,), seed=5))
  got = fl.ofd_loss(student, teacher, margin)
  np.testing.assert_allclose(got, np_ofd_loss(student, teacher, margin),
                             rtol=RTOL, atol=ATOL)


def test_ofd_loss_equals_the_original_max_form():
  # clovaai's distillation_loss: target = max(t, m); mask (s > target) |
  # (target > 0); loss.sum() / batch_size.
  student, teacher = rand((4, 5, 5, 3), seed=6), rand((4, 5, 5, 3), seed=7)
  margin = np.array([-0.5, -1.0, -0.1], np.float32)
  target = np.maximum(teacher, margin)
  counted = (student > target) | (target > 0)
  want = np.sum((student - target)**2 * counted) / 4
  np.testing.assert_allclose(fl.ofd_loss(student, teacher, margin), want,
                             rtol=RTOL)


def test_ofd_loss_ignores_a_student_below_a_dead_teacher():
  teacher = -np.ones((2, 3, 3, 2), np.float32)
  margin = np.array([-0.5, -0.5], np.float32)
  below = np.full_like(teacher, -4.0)
  assert float(fl.ofd_loss(below, teacher, margin)) == 0.0
  above = np.zeros_like(teacher)  # Above the margin: pulled down to it.
  np.testing.assert_allclose(fl.ofd_loss(above, teacher, margin),
                             0.25 * 3 * 3 * 2, rtol=1e-6)  # Per example.


# ----------------------------------------------------------------------------
# HCL.
# ----------------------------------------------------------------------------


@pytest.mark.parametrize('shape', [(2, 32, 32, 3), (3, 8, 8, 4), (2, 4, 4, 5),
                                   (2, 3, 3, 2), (4, 1, 1, 6)])
def test_hcl_matches_reviewkd(shape):
  student, teacher = rand(shape, seed=8), rand(shape, seed=9)
  np.testing.assert_allclose(fl.hcl_loss(student, teacher),
                             np_hcl(student, teacher), rtol=RTOL, atol=ATOL)


def test_hcl_of_a_constant_offset_is_its_square_at_every_level():
  student = rand((2, 8, 8, 3), seed=10)
  np.testing.assert_allclose(fl.hcl_loss(student + 0.5, student), 0.25,
                             rtol=1e-5)


# ----------------------------------------------------------------------------
# Masks and gradients.
# ----------------------------------------------------------------------------


def _feature_losses():
  margin = np.array([-0.3, -1.0, -0.2], np.float32)
  return {
      'ofd': lambda s, t, where=None: fl.ofd_loss(s, t, margin, where=where),
      'hcl': lambda s, t, where=None: fl.hcl_loss(s, t, where=where),
  }


@pytest.mark.parametrize('name', ['ofd', 'hcl'])
def test_mask_equals_slicing_in_value_and_gradient(name):
  loss = _feature_losses()[name]
  student, teacher = rand((6, 8, 8, 3), seed=11), rand((6, 8, 8, 3), seed=12)
  where = np.array([1, 0, 1, 1, 0, 1], bool)
  masked = lambda s: loss(s, teacher, where)
  sliced = lambda s: loss(s, teacher[where])
  np.testing.assert_allclose(masked(student), sliced(student[where]),
                             rtol=1e-6)
  grad = jax.grad(masked)(student)
  np.testing.assert_allclose(grad[where], jax.grad(sliced)(student[where]),
                             rtol=1e-5, atol=1e-8)
  assert np.all(grad[~where] == 0)
  assert float(loss(student, teacher, np.zeros(6, bool))) == 0.0


@pytest.mark.parametrize('name', ['ofd', 'hcl'])
def test_gradients_are_finite_at_zero_maps(name):
  loss = _feature_losses()[name]
  zeros = jnp.zeros((2, 4, 4, 3))
  grads = jax.grad(loss, argnums=(0, 1))(zeros, zeros)
  assert all(np.all(np.isfinite(g)) for g in grads)
  np.testing.assert_allclose(jax.jit(loss)(zeros + 1.0, zeros),
                             loss(zeros + 1.0, zeros), rtol=1e-6)


@pytest.mark.parametrize('call, match', [
    (lambda: fl.ofd_margin(np.ones(3), np.ones(4)), 'does not match'),
    (lambda: fl.ofd_loss(np.ones((2, 4, 4, 3)), np.ones((2, 4, 4, 5)),
                         np.zeros(5)), 'OFDConnector'),
    (lambda: fl.ofd_loss(np.ones((2, 4, 4, 3)), np.ones((2, 4, 4, 3)),
                         np.zeros(2)), r'\[C\]'),
    (lambda: fl.hcl_loss(np.ones((2, 4, 4, 3)), np.ones((2, 8, 8, 3))),
     'ReviewKDFusion'),
    (lambda: fl.hcl_loss(np.ones((2, 4, 4, 3)), np.ones((2, 4, 4, 3)),
                         levels=(0,)), 'levels'),
])
def test_bad_arguments_raise_naming_the_fix(call, match):
  with pytest.raises(ValueError, match=match):
    call()


# ----------------------------------------------------------------------------
# Connectors: ABF, ReviewKDFusion, OFDConnector.
# ----------------------------------------------------------------------------


def _init_apply(module, *args, **kwargs):
  variables = module.init(jax.random.key(0), *args, train=True, **kwargs)
  # BN's scale and bias start at 1 and 0: redraw them so the test sees them.
  params = jax.tree.map(
      lambda p: p + 0.3 * jax.random.normal(jax.random.key(p.size), p.shape),
      variables['params'])
  out, _ = module.apply({**variables, 'params': params}, *args, train=True,
                        mutable=['batch_stats'], **kwargs)
  return params, out


@pytest.mark.parametrize('fuse, in_hw, residual_hw, out_hw', [
    (False, 1, None, 1),
    (True, 4, 2, 8),    # ShuffleNet student: resized up to the teacher's.
    (True, 8, 4, 8),
])
def test_abf_matches_authors_forward(fuse, in_hw, residual_hw, out_hw):
  x = rand((3, in_hw, in_hw, 5), seed=13)
  residual = rand((3, residual_hw, residual_hw, 4), seed=14) if fuse else None
  module = connectors.ABF(mid_features=4, out_features=6, fuse=fuse)
  params, (out, fused) = _init_apply(module, x, residual,
                                     out_size=(out_hw, out_hw))
  want_out, want_fused = np_abf(
      params, nchw(x), None if residual is None else nchw(residual), out_hw)
  np.testing.assert_allclose(nchw(out), want_out, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(nchw(fused), want_fused, rtol=1e-4, atol=1e-5)


def test_reviewkd_fusion_maps_resnet8x4_to_resnet32x4_and_reviews():
  # The authors' CIFAR-100 shapes for resnet32x4 -> resnet8x4 (channels
  # divided by 8 to stay small): stages 32, 16, 8 px, the pooled embedding.
  shapes = ((32, 32, 8), (16, 16, 16), (8, 8, 32), (1, 1, 32))
  features = [rand((2, 32, 32, 8), 15), rand((2, 16, 16, 16), 16),
              rand((2, 8, 8, 32), 17), rand((2, 32), 18)]
  module = connectors.ReviewKDFusion(teacher_shapes=shapes)
  variables = module.init(jax.random.key(1), features, train=True)
  assert variables['params']['abf0']['Conv_0']['kernel'].shape[-1] == 32
  assert 'attention' not in variables['params']['abf3']

  def outputs(feats):
    out, _ = module.apply(variables, feats, train=True,
                          mutable=['batch_stats'])
    return out

  outs = outputs(features)
  assert [tuple(o.shape[1:]) for o in outs] == list(shapes)
  # The shallowest output sees the embedding; the deepest never sees the
  # shallowest feature.
  shallow_from_deep = jax.grad(
      lambda e: jnp.sum(outputs(features[:3] + [e])[0]))(features[3])
  assert np.any(np.abs(shallow_from_deep) > 0)
  deep_from_shallow = jax.grad(
      lambda f: jnp.sum(outputs([f] + features[1:])[3]))(features[0])
  assert np.all(deep_from_shallow == 0)
  with pytest.raises(ValueError, match='teacher_shapes'):
    module.init(jax.random.key(1), features[:3], train=True)


def test_reviewkd_fusion_chain_equals_abfs_applied_by_hand():
  shapes = ((8, 8, 3), (4, 4, 5), (1, 1, 5))
  features = [rand((2, 8, 8, 4), 19), rand((2, 4, 4, 6), 20),
              rand((2, 1, 1, 6), 21)]
  module = connectors.ReviewKDFusion(teacher_shapes=shapes, mid_features=3)
  variables = module.init(jax.random.key(2), features, train=True)
  outs, _ = module.apply(variables, features, train=True,
                         mutable=['batch_stats'])
  params = variables['params']
  out2, res = np_abf(params['abf2'], nchw(features[2]), None, 1)
  out1, res = np_abf(params['abf1'], nchw(features[1]), res, 4)
  out0, _ = np_abf(params['abf0'], nchw(features[0]), res, 8)
  for got, want in zip(outs, (out0, out1, out2)):
    np.testing.assert_allclose(nchw(got), want, rtol=1e-4, atol=1e-5)


def test_ofd_connector_shape_and_authors_init():
  module = connectors.OFDConnector(features=256, kernel_size=3)
  x = rand((4, 6, 6, 32), 22)
  variables = module.init(jax.random.key(3), x, train=True)
  kernel = variables['params']['Conv_0']['kernel']
  assert kernel.shape == (3, 3, 32, 256)
  # normal_(0, sqrt(2 / (k * k * out_channels))).
  np.testing.assert_allclose(np.std(kernel), np.sqrt(2 / (9 * 256)),
                             rtol=0.03)
  out, _ = module.apply(variables, x, train=True, mutable=['batch_stats'])
  assert out.shape == (4, 6, 6, 256)
  # Train-mode BN with scale 1 and bias 0: zero mean, unit variance.
  np.testing.assert_allclose(np.mean(out, axis=(0, 1, 2)), 0.0, atol=1e-4)
