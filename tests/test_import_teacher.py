"""Imported torchvision / timm / big_vision weights: layouts, refusals, runs.

The fixtures are state dicts with the libraries' names and shapes, generated
here from the architectures as torchvision's, timm's and big_vision's
constructors build them (independently of `kd_jax.interop.layouts`), with
random values; the imported models' logits are compared with NumPy forwards
written as PyTorch computes (NCHW, OIHW weights, the libraries' module
order) or as big_vision's Flax modules do (NHWC, 'SAME' padding, the tanh
GELU), so neither PyTorch nor big_vision is needed.
experiments/interop/verify_torch.py and verify_big_vision.py check the real
libraries.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import import_teacher
from kd_jax import models
from kd_jax import rundir
from kd_jax import teachers
from kd_jax import warm_start
from kd_jax.interop import layouts
from kd_jax.models import features as kd_features

# Slow: full-size ResNet, MobileNet and ViT forwards checked in NumPy.
pytestmark = pytest.mark.slow

safetensors_numpy = pytest.importorskip('safetensors.numpy')
scipy_special = pytest.importorskip('scipy.special')


# ---------------------------------------------------------------------------
# State dicts as torchvision and timm name them
# ---------------------------------------------------------------------------


class StateDict(dict):
  """name -> float32 array, filled in a torch constructor's order."""

  def __init__(self, seed):
    super().__init__()
    self.rng = np.random.default_rng(seed)

  def conv(self, name, cout, cin, k, groups=1, bias=False):
    fan_in = cin // groups * k * k
    self[f'{name}.weight'] = self.rng.normal(
        0, np.sqrt(2 / fan_in), (cout, cin // groups, k, k)).astype(np.float32)
    if bias:
      self[f'{name}.bias'] = self.rng.normal(0, 0.1, cout).astype(np.float32)

  def bn(self, name, c):
    self[f'{name}.weight'] = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
    self[f'{name}.bias'] = self.rng.normal(0, 0.1, c).astype(np.float32)
    self[f'{name}.running_mean'] = self.rng.normal(0, 0.1, c).astype(
        np.float32)
    self[f'{name}.running_var'] = self.rng.uniform(0.5, 2, c).astype(
        np.float32)
    self[f'{name}.num_batches_tracked'] = np.array(7, np.int64)

  def linear(self, name, fan_out, fan_in):
    self[f'{name}.weight'] = self.rng.normal(
        0, np.sqrt(1 / fan_in), (fan_out, fan_in)).astype(np.float32)
    self[f'{name}.bias'] = self.rng.normal(0, 0.1, fan_out).astype(np.float32)

  def layernorm(self, name, c):
    self[f'{name}.weight'] = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
    self[f'{name}.bias'] = self.rng.normal(0, 0.1, c).astype(np.float32)

  def tensor(self, name, shape, scale=0.1):
    self[name] = self.rng.normal(0, scale, shape).astype(np.float32)


RESNET_BLOCKS = {'resnet18': ((2, 2, 2, 2), False),
                 'resnet34': ((3, 4, 6, 3), False),
                 'resnet50': ((3, 4, 6, 3), True)}


def torchvision_resnet(name, num_classes=1000, seed=0):
  """torchvision.models.resnet's ResNet(BasicBlock / Bottleneck, layers)."""
  blocks, bottleneck = RESNET_BLOCKS[name]
  sd = StateDict(seed)
  sd.conv('conv1', 64, 3, 7)
  sd.bn('bn1', 64)
  inplanes = 64
  for stage, (num, planes) in enumerate(zip(blocks, (64, 128, 256, 512)), 1):
    for b in range(num):
      stride = 2 if stage > 1 and b == 0 else 1
      p = f'layer{stage}.{b}'
      if bottleneck:
        sd.conv(f'{p}.conv1', planes, inplanes, 1)
        sd.bn(f'{p}.bn1', planes)
        sd.conv(f'{p}.conv2', planes, planes, 3)
        sd.bn(f'{p}.bn2', planes)
        sd.conv(f'{p}.conv3', planes * 4, planes, 1)
        sd.bn(f'{p}.bn3', planes * 4)
        out = planes * 4
      else:
        sd.conv(f'{p}.conv1', planes, inplanes, 3)
        sd.bn(f'{p}.bn1', planes)
        sd.conv(f'{p}.conv2', planes, planes, 3)
        sd.bn(f'{p}.bn2', planes)
        out = planes
      if stride != 1 or inplanes != out:
        sd.conv(f'{p}.downsample.0', out, inplanes, 1)
        sd.bn(f'{p}.downsample.1', out)
      inplanes = out
  sd.linear('fc', num_classes, inplanes)
  return dict(sd)


# torchvision mobilenetv2.py: (t, c, n, s).
MOBILENET_V2_SETTING = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2),
                        (6, 64, 4, 2), (6, 96, 3, 1), (6, 160, 3, 2),
                        (6, 320, 1, 1))


def torchvision_mobilenet_v2(num_classes=1000, seed=0):
  """torchvision.models.mobilenetv2's MobileNetV2() (width 1.0)."""
  sd = StateDict(seed)
  sd.conv('features.0.0', 32, 3, 3)
  sd.bn('features.0.1', 32)
  cin, i = 32, 1
  for t, c, n, _ in MOBILENET_V2_SETTING:
    for _ in range(n):
      hidden, p, layer = cin * t, f'features.{i}.conv', 0
      if t != 1:
        sd.conv(f'{p}.0.0', hidden, cin, 1)
        sd.bn(f'{p}.0.1', hidden)
        layer = 1
      sd.conv(f'{p}.{layer}.0', hidden, hidden, 3, groups=hidden)
      sd.bn(f'{p}.{layer}.1', hidden)
      sd.conv(f'{p}.{layer + 1}', c, hidden, 1)
      sd.bn(f'{p}.{layer + 2}', c)
      cin, i = c, i + 1
  sd.conv(f'features.{i}.0', 1280, cin, 1)
  sd.bn(f'features.{i}.1', 1280)
  sd.linear('classifier.1', num_classes, 1280)
  return dict(sd)


VIT = {'vit_tiny_patch16_224': (192, 3), 'vit_small_patch16_224': (384, 6),
       'deit_tiny_distilled_patch16_224': (192, 3)}


def timm_vit(name, image=32, num_classes=1000, seed=0):
  """timm VisionTransformer (depth 12, patch 16, MLP 4x), or
  VisionTransformerDistilled for a distilled DeiT."""
  width, _ = VIT[name]
  tokens = 2 if 'distilled' in name else 1
  sd = StateDict(seed)
  sd.conv('patch_embed.proj', width, 3, 16, bias=True)
  sd.tensor('cls_token', (1, 1, width))
  if tokens == 2:
    sd.tensor('dist_token', (1, 1, width))
  sd.tensor('pos_embed', (1, (image // 16) ** 2 + tokens, width))
  for i in range(12):
    p = f'blocks.{i}'
    sd.layernorm(f'{p}.norm1', width)
    sd.linear(f'{p}.attn.qkv', 3 * width, width)
    sd.linear(f'{p}.attn.proj', width, width)
    sd.layernorm(f'{p}.norm2', width)
    sd.linear(f'{p}.mlp.fc1', 4 * width, width)
    sd.linear(f'{p}.mlp.fc2', width, 4 * width)
  sd.layernorm('norm', width)
  sd.linear('head', num_classes, width)
  if tokens == 2:
    sd.linear('head_dist', num_classes, width)
  return dict(sd)


# ---------------------------------------------------------------------------
# NumPy forwards as PyTorch computes them (NCHW)
# ---------------------------------------------------------------------------


def np_conv(x, w, b=None, stride=1, padding=0, groups=1):
  n, c, _, _ = x.shape
  o, _, kh, kw = w.shape
  x = np.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(2, 3))
  win = win[:, :, ::stride, ::stride]  # [n, c, ho, wo, kh, kw]
  win = win.reshape(n, groups, c // groups, *win.shape[2:])
  w = w.reshape(groups, o // groups, c // groups, kh, kw)
  y = np.einsum('ngchwij,goc ij->ngohw'.replace(' ', ''), win, w)
  y = y.reshape(n, o, *y.shape[3:])
  return y if b is None else y + b[:, None, None]


def np_bn(x, sd, name):
  scale = sd[f'{name}.weight'] / np.sqrt(sd[f'{name}.running_var'] + 1e-5)
  shift = sd[f'{name}.bias'] - sd[f'{name}.running_mean'] * scale
  return x * scale[:, None, None] + shift[:, None, None]


def np_max_pool(x):  # MaxPool2d(3, 2, padding=1)
  x = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), constant_values=-np.inf)
  win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(2, 3))
  return win[:, :, ::2, ::2].max(axis=(-2, -1))


def relu(x):
  return np.maximum(x, 0)


def np_resnet(sd, name, x):
  blocks, bottleneck = RESNET_BLOCKS[name]
  x = relu(np_bn(np_conv(x, sd['conv1.weight'], stride=2, padding=3), sd,
                 'bn1'))
  x = np_max_pool(x)
  for stage, num in enumerate(blocks, 1):
    for b in range(num):
      stride, p = (2 if stage > 1 and b == 0 else 1), f'layer{stage}.{b}'
      if bottleneck:
        y = relu(np_bn(np_conv(x, sd[f'{p}.conv1.weight']), sd, f'{p}.bn1'))
        y = relu(np_bn(np_conv(y, sd[f'{p}.conv2.weight'], stride=stride,
                               padding=1), sd, f'{p}.bn2'))
        y = np_bn(np_conv(y, sd[f'{p}.conv3.weight']), sd, f'{p}.bn3')
      else:
        y = relu(np_bn(np_conv(x, sd[f'{p}.conv1.weight'], stride=stride,
                               padding=1), sd, f'{p}.bn1'))
        y = np_bn(np_conv(y, sd[f'{p}.conv2.weight'], padding=1), sd,
                  f'{p}.bn2')
      if f'{p}.downsample.0.weight' in sd:
        x = np_bn(np_conv(x, sd[f'{p}.downsample.0.weight'], stride=stride),
                  sd, f'{p}.downsample.1')
      x = relu(x + y)
  return x.mean(axis=(2, 3)) @ sd['fc.weight'].T + sd['fc.bias']


def np_mobilenet_v2(sd, x):
  relu6 = lambda v: np.clip(v, 0, 6)
  x = relu6(np_bn(np_conv(x, sd['features.0.0.weight'], stride=2,
                          padding=1), sd, 'features.0.1'))
  i = 1
  for t, _, n, s in MOBILENET_V2_SETTING:
    for k in range(n):
      p, layer, y = f'features.{i}.conv', 0, x
      if t != 1:
        y = relu6(np_bn(np_conv(y, sd[f'{p}.0.0.weight']), sd, f'{p}.0.1'))
        layer = 1
      w = sd[f'{p}.{layer}.0.weight']
      y = relu6(np_bn(np_conv(y, w, stride=s if k == 0 else 1, padding=1,
                              groups=w.shape[0]), sd, f'{p}.{layer}.1'))
      y = np_bn(np_conv(y, sd[f'{p}.{layer + 1}.weight']), sd,
                f'{p}.{layer + 2}')
      x = x + y if y.shape == x.shape else y
      i += 1
  x = relu6(np_bn(np_conv(x, sd[f'features.{i}.0.weight']), sd,
                  f'features.{i}.1'))
  return (x.mean(axis=(2, 3)) @ sd['classifier.1.weight'].T
          + sd['classifier.1.bias'])


def np_layernorm(x, sd, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return (x - mean) / np.sqrt(var + 1e-6) * sd[f'{name}.weight'] + sd[
      f'{name}.bias']


def np_vit(sd, name, x):
  _, heads = VIT[name]
  x = np_conv(x, sd['patch_embed.proj.weight'], sd['patch_embed.proj.bias'],
              stride=16)
  n, width = x.shape[:2]
  x = x.reshape(n, width, -1).transpose(0, 2, 1)  # [n, patches, width]
  tokens = [sd['cls_token']] + ([sd['dist_token']] if 'dist_token' in sd
                                else [])
  x = np.concatenate([np.broadcast_to(t, (n, 1, width)) for t in tokens]
                     + [x], axis=1) + sd['pos_embed']
  linear = lambda v, p: v @ sd[f'{p}.weight'].T + sd[f'{p}.bias']
  for i in range(12):
    p = f'blocks.{i}'
    y = np_layernorm(x, sd, f'{p}.norm1')
    qkv = linear(y, f'{p}.attn.qkv').reshape(n, -1, 3, heads, width // heads)
    q, k, v = qkv.transpose(2, 0, 3, 1, 4)  # [n, heads, tokens, head_dim]
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    y = (att @ v).transpose(0, 2, 1, 3).reshape(n, -1, width)
    x = x + linear(y, f'{p}.attn.proj')
    y = linear(np_layernorm(x, sd, f'{p}.norm2'), f'{p}.mlp.fc1')
    y = 0.5 * y * (1 + scipy_special.erf(y / np.sqrt(2)))  # nn.GELU()
    x = x + linear(y, f'{p}.mlp.fc2')
  x = np_layernorm(x, sd, 'norm')
  logits = linear(x[:, 0], 'head')
  if 'head_dist.weight' in sd:  # Eval mode: the mean of the two heads.
    logits = (logits + linear(x[:, 1], 'head_dist')) / 2
  return logits


# ---------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------


def images(size, n=2, seed=1):
  """Normalised float images, NHWC for kd_jax and NCHW for the references."""
  x = np.random.default_rng(seed).normal(0, 1, (n, size, size, 3)).astype(
      np.float32)
  return x, x.transpose(0, 3, 1, 2).astype(np.float64)


def zoo_logits(fmt, name, sd, size, num_classes=None):
  arch = layouts.architecture(fmt, name)
  variables, _ = import_teacher.convert(arch, sd, num_classes,
                                        (size, size, 3))
  model = models.get_model(arch.spec, num_classes or len(sd[arch.head[0]]))
  nhwc, nchw = images(size)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(apply(variables, nhwc)), nchw


def assert_close(got, want, rtol=1e-4):
  scale = max(1.0, np.abs(want).max())
  np.testing.assert_allclose(got, want, rtol=0, atol=rtol * scale)


def save(tmp_path, sd, name='weights.safetensors'):
  path = str(tmp_path / name)
  safetensors_numpy.save_file(sd, path)
  return path


# ---------------------------------------------------------------------------
# Layouts: the imported model computes what the library's computes
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('name', ['resnet18', 'resnet50'])
def test_torchvision_resnet_logits_equal_the_numpy_forward(name):
  sd = torchvision_resnet(name, num_classes=10)
  got, nchw = zoo_logits('torchvision', name, sd, 32)
  assert_close(got, np_resnet(sd, name, nchw))


def test_torchvision_resnet34_names_and_shapes_are_its_state_dicts():
  arch = layouts.architecture('torchvision', 'resnet34')
  variables, classes = import_teacher.convert(
      arch, torchvision_resnet('resnet34', num_classes=10), None, (32, 32, 3))
  assert classes == 10
  assert models.param_count(variables['params']) == 21_289_802  # At 10.


def test_torchvision_mobilenet_v2_logits_equal_the_numpy_forward():
  sd = torchvision_mobilenet_v2(num_classes=10)
  got, nchw = zoo_logits('torchvision', 'mobilenet_v2', sd, 32)
  assert_close(got, np_mobilenet_v2(sd, nchw))


def test_torchvision_mobilenet_v2_has_torchvisions_parameter_count():
  model = models.get_model({'name': 'mobilenetv2', 'layout': 'torchvision'},
                           1000)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct((1, 224, 224, 3),
                                                  jnp.float32))
  assert models.param_count(variables['params']) == 3_504_872


@pytest.mark.parametrize('name', ['vit_tiny_patch16_224',
                                  'deit_tiny_distilled_patch16_224'])
def test_timm_vit_logits_equal_the_numpy_forward(name):
  sd = timm_vit(name, image=32, num_classes=10)
  got, nchw = zoo_logits('timm', name, sd, 32)
  assert_close(got, np_vit(sd, name, nchw))


def test_timm_pretrained_tag_picks_weights_not_layout():
  assert (layouts.architecture('timm', 'vit_small_patch16_224.augreg_in1k')
          is layouts.architecture('timm', 'vit_small_patch16_224'))


# ---------------------------------------------------------------------------
# big_vision: flat .npz files of '/'-joined Flax param paths
# ---------------------------------------------------------------------------


class FlaxParams(dict):
  """'/'-joined name -> float32 array, as big_vision's .npz files hold."""

  def __init__(self, seed):
    super().__init__()
    self.rng = np.random.default_rng(seed)

  def tensor(self, name, shape, scale=0.1):
    self[name] = self.rng.normal(0, scale, shape).astype(np.float32)

  def dense(self, name, fan_in, *fan_out):
    self.tensor(f'{name}/kernel', (fan_in, *fan_out), np.sqrt(1 / fan_in))
    self.tensor(f'{name}/bias', fan_out)

  def norm(self, name, c):
    self[f'{name}/scale'] = self.rng.uniform(0.5, 1.5, c).astype(np.float32)
    self.tensor(f'{name}/bias', c)


def big_vision_vit(width=192, heads=3, depth=12, image=32, num_classes=10,
                   pool='tok', posemb='learn', rep_size=0, seed=0):
  """big_vision models/vit.py `Model(num_classes, variant='Ti/16', ...)`'s
  params (MLP 4x, patch 16)."""
  sd = FlaxParams(seed)
  sd.tensor('embedding/kernel', (16, 16, 3, width), np.sqrt(1 / 768))
  sd.tensor('embedding/bias', width)
  if posemb == 'learn':
    sd.tensor('pos_embedding', (1, (image // 16) ** 2, width))
  if pool == 'tok':
    sd.tensor('cls', (1, 1, width))
  for i in range(depth):
    p = f'Transformer/encoderblock_{i}'
    sd.norm(f'{p}/LayerNorm_0', width)
    for part in ('query', 'key', 'value'):
      sd.dense(f'{p}/MultiHeadDotProductAttention_0/{part}', width, heads,
               width // heads)
    sd.tensor(f'{p}/MultiHeadDotProductAttention_0/out/kernel',
              (heads, width // heads, width), np.sqrt(1 / width))
    sd.tensor(f'{p}/MultiHeadDotProductAttention_0/out/bias', width)
    sd.norm(f'{p}/LayerNorm_1', width)
    sd.dense(f'{p}/MlpBlock_0/Dense_0', width, 4 * width)
    sd.dense(f'{p}/MlpBlock_0/Dense_1', 4 * width, width)
  sd.norm('Transformer/encoder_norm', width)
  if rep_size:
    sd.dense('pre_logits', width, rep_size)
  sd.dense('head', rep_size or width, num_classes)
  return dict(sd)


def big_vision_bit(blocks=(2, 2, 2, 2), num_classes=10, seed=0):
  """big_vision models/bit.py `Model(num_classes, depth=26, width=1)`."""
  sd = FlaxParams(seed)
  sd.tensor('conv_root/kernel', (7, 7, 3, 64))
  sd.norm('gn_root', 64)
  cin = 64
  for stage, num in enumerate(blocks, 1):
    mid = 64 * 2 ** (stage - 1)
    for b in range(1, num + 1):
      p = f'block{stage}/unit{b}'
      if b == 1:
        sd.tensor(f'{p}/conv_proj/kernel', (1, 1, cin, 4 * mid))
        sd.norm(f'{p}/gn_proj', 4 * mid)
      sd.tensor(f'{p}/conv1/kernel', (1, 1, cin, mid))
      sd.norm(f'{p}/gn1', mid)
      sd.tensor(f'{p}/conv2/kernel', (3, 3, mid, mid))
      sd.norm(f'{p}/gn2', mid)
      sd.tensor(f'{p}/conv3/kernel', (1, 1, mid, 4 * mid))
      sd.norm(f'{p}/gn3', 4 * mid)
      cin = 4 * mid
  sd.dense('head', cin, num_classes)
  return dict(sd)


def np_layernorm_flax(x, sd, name):
  mean = x.mean(-1, keepdims=True)
  var = ((x - mean) ** 2).mean(-1, keepdims=True)
  return ((x - mean) / np.sqrt(var + 1e-6) * sd[f'{name}/scale']
          + sd[f'{name}/bias'])


def np_sincos_2d(rows, cols, width):
  """MoCo v3's 2-D sine-cosine embeddings, row-major patches."""
  omega = 10000.0 ** -(np.arange(width // 4) / (width // 4 - 1))
  row, col = np.divmod(np.arange(rows * cols), cols)
  return np.concatenate([np.sin(np.outer(col, omega)),
                         np.cos(np.outer(col, omega)),
                         np.sin(np.outer(row, omega)),
                         np.cos(np.outer(row, omega))], axis=1)[None]


def np_big_vision_vit(sd, x, heads=3):
  """big_vision's ViT on NHWC images: patches + position embeddings, then
  the class token prepended; tanh-GELU MLPs; 'tok' or 'gap' pooling; the
  head's input (`pre_logits` there) and the logits."""
  n, size = x.shape[:2]
  grid = size // 16
  kernel = sd['embedding/kernel']
  width = kernel.shape[-1]
  patches = x.reshape(n, grid, 16, grid, 16, 3).transpose(0, 1, 3, 2, 4, 5)
  x = np.einsum('nabijc,ijcw->nabw', patches, kernel).reshape(n, -1, width)
  x = x + sd['embedding/bias']
  x = x + (sd['pos_embedding'] if 'pos_embedding' in sd
           else np_sincos_2d(grid, grid, width))
  if 'cls' in sd:
    x = np.concatenate([np.broadcast_to(sd['cls'], (n, 1, width)), x], 1)
  dense = lambda v, p: v @ sd[f'{p}/kernel'] + sd[f'{p}/bias']
  for i in range(12):
    p = f'Transformer/encoderblock_{i}'
    a = f'{p}/MultiHeadDotProductAttention_0'
    y = np_layernorm_flax(x, sd, f'{p}/LayerNorm_0')
    q, k, v = (np.einsum('ntw,whd->nhtd', y, sd[f'{a}/{part}/kernel'])
               + sd[f'{a}/{part}/bias'][None, :, None]
               for part in ('query', 'key', 'value'))
    att = q @ k.transpose(0, 1, 3, 2) / np.sqrt(width // heads)
    att = np.exp(att - att.max(-1, keepdims=True))
    att /= att.sum(-1, keepdims=True)
    x = x + np.einsum('nhtd,hdw->ntw', att @ v, sd[f'{a}/out/kernel']) + sd[
        f'{a}/out/bias']
    y = dense(np_layernorm_flax(x, sd, f'{p}/LayerNorm_1'),
              f'{p}/MlpBlock_0/Dense_0')
    y = 0.5 * y * (1 + np.tanh(np.sqrt(2 / np.pi) * (y + 0.044715 * y ** 3)))
    x = x + dense(y, f'{p}/MlpBlock_0/Dense_1')
  x = np_layernorm_flax(x, sd, 'Transformer/encoder_norm')
  x = x[:, 0] if 'cls' in sd else x.mean(1)
  if 'pre_logits/kernel' in sd:
    x = np.tanh(dense(x, 'pre_logits'))
  return x, dense(x, 'head')


def np_conv_same(x, w, stride=1):
  """Flax nn.Conv(padding='SAME') on NHWC: the odd pixel of padding after."""
  kh, kw = w.shape[:2]
  pads = []
  for size, k in zip(x.shape[1:3], (kh, kw)):
    total = max((-(-size // stride) - 1) * stride + k - size, 0)
    pads.append((total // 2, total - total // 2))
  x = np.pad(x, ((0, 0), *pads, (0, 0)))
  win = np.lib.stride_tricks.sliding_window_view(x, (kh, kw), axis=(1, 2))
  win = win[:, ::stride, ::stride]  # [n, ho, wo, c, kh, kw]
  return np.einsum('nhwcij,ijco->nhwo', win, w)


def np_std_conv(x, sd, name, stride=1):
  w = sd[f'{name}/kernel'].astype(np.float64)
  w = w - w.mean(axis=(0, 1, 2))
  return np_conv_same(x, w / (w.std(axis=(0, 1, 2)) + 1e-5), stride)


def np_groupnorm(x, sd, name, groups=32):
  n, h, w, c = x.shape
  g = x.reshape(n, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  g = ((g - mean) / np.sqrt(var + 1e-6)).reshape(n, h, w, c)
  return g * sd[f'{name}/scale'] + sd[f'{name}/bias']


def np_big_vision_bit(sd, x, blocks=(2, 2, 2, 2)):
  x = relu(np_groupnorm(np_std_conv(x, sd, 'conv_root', 2), sd, 'gn_root'))
  x = np.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)), constant_values=-np.inf)
  win = np.lib.stride_tricks.sliding_window_view(x, (3, 3), axis=(1, 2))
  x = win[:, ::2, ::2].max(axis=(-2, -1))  # 3x3/2 'SAME' on an even side.
  for stage, num in enumerate(blocks, 1):
    for b in range(1, num + 1):
      p, stride = f'block{stage}/unit{b}', (2 if stage > 1 and b == 1 else 1)
      residual = x
      if f'{p}/conv_proj/kernel' in sd:
        residual = np_groupnorm(np_std_conv(x, sd, f'{p}/conv_proj', stride),
                                sd, f'{p}/gn_proj')
      y = relu(np_groupnorm(np_std_conv(x, sd, f'{p}/conv1'), sd, f'{p}/gn1'))
      y = relu(np_groupnorm(np_std_conv(y, sd, f'{p}/conv2', stride), sd,
                            f'{p}/gn2'))
      y = np_groupnorm(np_std_conv(y, sd, f'{p}/conv3'), sd, f'{p}/gn3')
      x = relu(residual + y)
  return x.mean(axis=(1, 2)) @ sd['head/kernel'] + sd['head/bias']


def big_vision_logits(name, state, size=32, num_classes=None):
  """(The imported model's logits, its spec, NHWC images)."""
  arch, state = layouts.architecture('big_vision', name).for_file(state)
  variables, classes = import_teacher.convert(arch, state, num_classes,
                                              (size, size, 3))
  model = models.get_model(arch.spec, num_classes or classes)
  nhwc, _ = images(size)
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  return np.asarray(apply(variables, nhwc)), arch.spec, nhwc.astype(
      np.float64)


def save_npz(tmp_path, sd, name='weights.npz'):
  path = str(tmp_path / name)
  np.savez(path, **sd)
  return path


@pytest.mark.parametrize('options,spec', [
    (dict(pool='tok'), dict(pool='token', posemb='learned_patches')),
    (dict(pool='gap'), dict(pool='gap', posemb='learned_patches')),
    # configs/vit_s16_i1k.py's: big_vision's released i1k ViT-S/16s.
    (dict(pool='gap', posemb='sincos2d', rep_size=96),
     dict(pool='gap', posemb='sincos2d', representation_size=96)),
])
def test_big_vision_vit_logits_equal_the_numpy_forward(options, spec):
  sd = big_vision_vit(**options)
  got, got_spec, x = big_vision_logits('vit-Ti/16', sd)
  assert {k: got_spec[k] for k in spec} == spec
  assert got_spec['gelu'] == 'tanh'
  # Tight: Flax's tanh GELU and PyTorch's erf one differ by ~2e-4 here.
  assert_close(got, np_big_vision_vit(sd, x)[1], rtol=1e-5)


def test_big_vision_bit_logits_equal_the_numpy_forward():
  sd = big_vision_bit()
  got, spec, x = big_vision_logits('bit-R26x1', sd)
  assert spec == {'name': 'bit', 'stage_sizes': (2, 2, 2, 2), 'width': 1}
  assert_close(got, np_big_vision_bit(sd, x), rtol=1e-5)


def test_big_vision_training_checkpoints_scans_and_bfloat16_are_read():
  """A trainer's checkpoint holds the params under 'params/' beside the
  optimizer state; a scanned ViT stacks its blocks; bfloat16 arrays are
  saved by NumPy as 2-byte void. Each is read as big_vision reads it."""
  sd = big_vision_vit(pool='gap')
  want, _, _ = big_vision_logits('vit-Ti/16', sd)
  checkpoint = {f'params/{k}': v for k, v in sd.items()}
  checkpoint['opt/1/0/mu/head/bias'] = np.zeros(10, np.float32)
  for key in [k for k in checkpoint
              if k.startswith('params/Transformer/encoderblock_0/')]:
    leaf = key[len('params/Transformer/encoderblock_0/'):]
    checkpoint[f'params/Transformer/encoderblock/{leaf}'] = np.stack(
        [checkpoint.pop(f'params/Transformer/encoderblock_{i}/{leaf}')
         for i in range(12)])
  got, _, _ = big_vision_logits('vit-Ti/16', checkpoint)
  np.testing.assert_array_equal(got, want)
  bf16 = dict(sd)
  bf16['head/kernel'] = sd['head/kernel'].astype(jnp.bfloat16).view('V2')
  _, state = layouts.architecture('big_vision', 'vit-Ti/16').for_file(bf16)
  np.testing.assert_array_equal(
      state['head/kernel'],
      sd['head/kernel'].astype(jnp.bfloat16).astype(np.float32))


def test_old_vit_checkpoints_load_as_big_vision_fixes_them():
  """vision_transformer's (AugReg's) files: pre-Linen module numbers, the
  position embedding in 'Transformer/posembed_input' and covering the
  class token too. The same model as the new layout, up to rounding of
  cls + its position embedding."""
  sd = big_vision_vit(pool='tok')
  want, _, _ = big_vision_logits('vit-Ti/16', sd)
  rng = np.random.default_rng(3)
  cls_posemb = rng.normal(0, 0.1, (1, 1, 192)).astype(np.float32)
  old = {}
  renames = {'LayerNorm_1/': 'LayerNorm_2/',
             'MultiHeadDotProductAttention_0/':
                 'MultiHeadDotProductAttention_1/',
             'MlpBlock_0/': 'MlpBlock_3/'}
  for key, value in sd.items():
    for new, was in renames.items():
      key = key.replace(new, was)
    old[key] = value
  old['Transformer/posembed_input/pos_embedding'] = np.concatenate(
      [cls_posemb, old.pop('pos_embedding')], axis=1)
  old['cls'] = sd['cls'] - cls_posemb
  got, _, _ = big_vision_logits('vit-Ti/16', old)
  assert_close(got, want, rtol=1e-5)


def test_big_vision_tensors_are_refused_by_name_with_shapes():
  sd = big_vision_vit(pool='tok')
  del sd['Transformer/encoderblock_3/LayerNorm_1/scale']
  sd['Transformer/encoderblock_12/LayerNorm_0/bias'] = np.zeros(
      192, np.float32)
  sd['Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel'] = np.zeros(
      (192, 512), np.float32)
  arch, state = layouts.architecture('big_vision', 'vit-Ti/16').for_file(sd)
  with pytest.raises(import_teacher.WeightsMismatch) as e:
    import_teacher.convert(arch, state, None, (32, 32, 3))
  message = str(e.value)
  assert ('1 missing (name [expected shape]): Transformer/encoderblock_3/'
          'LayerNorm_1/scale [192]') in message
  assert ('1 unexpected (name [file shape]): Transformer/encoderblock_12/'
          'LayerNorm_0/bias [192]') in message
  assert ('Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel: file '
          '[192, 512], expected [192, 768]') in message
  with pytest.raises(import_teacher.WeightsMismatch,
                     match=r'pos_embedding: file \[1, 4, 192\], expected '
                     r'\[1, 16, 192\].*--image_size'):
    import_teacher.convert(*layouts.architecture(
        'big_vision', 'vit-Ti/16').for_file(big_vision_vit()), None,
                           (64, 64, 3))
  with pytest.raises(import_teacher.WeightsMismatch,
                     match=r'unexpected .*block1/unit3/conv1/kernel'):
    import_teacher.convert(*layouts.architecture(
        'big_vision', 'bit-R26x1').for_file(big_vision_bit((3, 4, 6, 3))),
                           None, (32, 32, 3))


def test_a_map_head_vit_and_unknown_big_vision_models_are_refused():
  sd = big_vision_vit(pool='gap')
  sd['MAPHead_0/probe'] = np.zeros((1, 1, 192), np.float32)
  with pytest.raises(ValueError, match=r"MAP head.*pool_type='map'"):
    layouts.architecture('big_vision', 'vit-Ti/16').for_file(sd)
  with pytest.raises(ValueError, match=r"'bit_m_r50x1' is not an importable "
                     r"big_vision.*'vit-Ti/16'.*bit_paper\.py"):
    layouts.architecture('big_vision', 'bit_m_r50x1')


def test_a_big_vision_import_replaces_the_head_for_other_classes(tmp_path):
  sd = big_vision_vit(pool='gap', posemb='sincos2d', rep_size=96)
  workdir = str(tmp_path / 'run')
  record = import_teacher.import_weights(
      'big_vision', 'vit-Ti/16', save_npz(tmp_path, sd), workdir,
      num_classes=3, image_size=32)
  assert record['head'].startswith("replaced: the checkpoint's 10 classes "
                                   '-> 3, initialised')
  assert record['spec']['posemb'] == 'sincos2d'
  assert record['input_normalization']['mean'] == [0.5, 0.5, 0.5]
  info = rundir.read_run_info(workdir)
  assert info['num_classes'] == 3 and info['model'] == record['spec']
  variables, _ = warm_start.restore_run(workdir)
  params = variables['params']
  assert params['head']['kernel'].shape == (96, 3)
  np.testing.assert_array_equal(params['pre_logits']['kernel'],
                                sd['pre_logits/kernel'])
  # The kept tensors compute what the file's do, up to the head.
  model = models.get_model(info['model'], 3)
  _, features = jax.jit(lambda v, x: kd_features.apply_with_features(
      model, v, x, train=False))(variables, images(32)[0])
  pre_logits, _ = np_big_vision_vit(sd, images(32)[0].astype(np.float64))
  assert_close(np.asarray(features['embedding']), pre_logits)


# ---------------------------------------------------------------------------
# Refusals
# ---------------------------------------------------------------------------


def test_missing_unexpected_and_misshaped_tensors_are_named_with_shapes():
  sd = torchvision_resnet('resnet18', num_classes=10)
  del sd['layer1.0.bn1.running_var']
  sd['layer5.0.conv1.weight'] = np.zeros((8, 8, 3, 3), np.float32)
  sd['layer2.0.conv1.weight'] = np.zeros((128, 64, 1, 1), np.float32)
  arch = layouts.architecture('torchvision', 'resnet18')
  with pytest.raises(import_teacher.WeightsMismatch) as e:
    import_teacher.convert(arch, sd, None, (32, 32, 3))
  message = str(e.value)
  assert '1 missing' in message and 'layer1.0.bn1.running_var [64]' in message
  assert '1 unexpected' in message
  assert 'layer5.0.conv1.weight [8, 8, 3, 3]' in message
  assert ('layer2.0.conv1.weight: file [128, 64, 1, 1], expected '
          '[128, 64, 3, 3]') in message


def test_a_resnet34_file_is_refused_as_a_resnet18():
  arch = layouts.architecture('torchvision', 'resnet18')
  with pytest.raises(import_teacher.WeightsMismatch,
                     match=r'unexpected .*layer1\.2\.conv1\.weight'):
    import_teacher.convert(arch, torchvision_resnet('resnet34', 10), None,
                           (32, 32, 3))


def test_a_vit_at_another_image_size_names_the_position_embedding():
  arch = layouts.architecture('timm', 'vit_tiny_patch16_224')
  with pytest.raises(import_teacher.WeightsMismatch,
                     match=r'pos_embed: file \[1, 5, 192\], expected '
                     r'\[1, 17, 192\].*--image_size'):
    import_teacher.convert(arch, timm_vit('vit_tiny_patch16_224', 32, 10),
                           None, (64, 64, 3))


def test_unknown_models_are_refused_by_name(tmp_path):
  with pytest.raises(ValueError, match=r"'resnet101'.*'mobilenet_v2'"):
    layouts.architecture('torchvision', 'resnet101')
  with pytest.raises(ValueError, match="'bit_m_r50x1' is not an importable"):
    import_teacher.import_weights('big_vision', 'bit_m_r50x1', 'w.npz',
                                  str(tmp_path / 'run'))


def test_a_pytorch_pickle_without_pytorch_says_how_to_convert(tmp_path):
  try:
    import torch  # pylint: disable=g-import-not-at-top,unused-import
    pytest.skip('PyTorch is installed: it reads .pth files.')
  except ImportError:
    pass
  path = tmp_path / 'resnet18.pth'
  path.write_bytes(b'not read')
  with pytest.raises(ImportError, match='only PyTorch reads.*safetensors'):
    import_teacher.read_state_dict(str(path))


# ---------------------------------------------------------------------------
# The run directory
# ---------------------------------------------------------------------------


@pytest.fixture(scope='module')
def imported_resnet18(tmp_path_factory):
  """A torchvision resnet18 state dict (10 classes) imported at 32x32."""
  root = tmp_path_factory.mktemp('imported')
  sd = torchvision_resnet('resnet18', num_classes=10)
  workdir = str(root / 'resnet18')
  record = import_teacher.import_weights(
      'torchvision', 'resnet18', save(root, sd), workdir, image_size=32)
  return workdir, sd, record


def test_imported_run_has_a_finished_runs_files(imported_resnet18):
  workdir, _, record = imported_resnet18
  assert rundir.is_finished(workdir)
  info = rundir.read_run_info(workdir)
  assert info['model'] == {'name': 'resnet18'}
  assert info['num_classes'] == 10 and info['image_shape'] == [32, 32, 3]
  assert info['class_names'] == [str(i) for i in range(10)]
  assert checkpointing.latest_step(workdir) == info['final_step'] == 0
  with open(os.path.join(workdir, rundir.CONFIG)) as f:
    assert json.load(f)['model'] == {'name': 'resnet18'}
  assert record['head'] == 'kept'
  mean, std = import_teacher.input_normalization(workdir, info)
  np.testing.assert_allclose(mean, [0.485, 0.456, 0.406], rtol=1e-6)
  np.testing.assert_allclose(std, [0.229, 0.224, 0.225], rtol=1e-6)


def test_imported_run_is_a_teacher_with_the_files_logits(imported_resnet18):
  workdir, sd, _ = imported_resnet18
  teacher = teachers.load_online(
      [config_lib.teacher_config(None, workdir)], 10, (32, 32, 3))
  nhwc, nchw = images(32)
  logits = jax.jit(teacher.forward)(teacher.variables, {'image': nhwc})
  assert_close(np.asarray(logits[0]), np_resnet(sd, 'resnet18', nchw))


def test_another_class_count_replaces_the_head_and_says_so(tmp_path):
  sd = torchvision_resnet('resnet18', num_classes=10)
  names = tmp_path / 'classes.txt'
  names.write_text('NORMAL\nPNEUMONIA\n')
  workdir = str(tmp_path / 'run')
  record = import_teacher.import_weights(
      'torchvision', 'resnet18', save(tmp_path, sd), workdir,
      class_names=import_teacher.read_class_names(str(names)), image_size=32)
  assert record['head'].startswith("replaced: the checkpoint's 10 classes "
                                   '-> 2, initialised')
  info = rundir.read_run_info(workdir)
  assert info['num_classes'] == 2
  assert info['class_names'] == ['NORMAL', 'PNEUMONIA']
  variables, _ = warm_start.restore_run(workdir)
  params = variables['params']
  assert params['head']['kernel'].shape == (512, 2)
  np.testing.assert_array_equal(params['stem_conv']['kernel'],
                                sd['conv1.weight'].transpose(2, 3, 1, 0))


def test_a_workdir_holding_a_run_is_refused(imported_resnet18, tmp_path):
  workdir, sd, _ = imported_resnet18
  with pytest.raises(FileExistsError, match='already holds a run'):
    import_teacher.import_weights('torchvision', 'resnet18',
                                  save(tmp_path, sd), workdir, image_size=32)


def test_export_normalises_as_the_imported_weights_expect(imported_resnet18):
  """kd_jax.export_model's serving function takes uint8 pixels and applies
  the normalisation recorded for the weights (torchvision's ImageNet mean
  and std), not a dataset's."""
  from kd_jax import export_model  # pylint: disable=g-import-not-at-top
  workdir, sd, _ = imported_resnet18
  run = export_model.load_run(workdir)
  pixels = np.random.default_rng(2).integers(0, 256, (2, 32, 32, 3),
                                             np.uint8)
  got = jax.jit(export_model.serving_function(run))(pixels)
  mean = np.array(layouts.IMAGENET_MEAN)
  std = np.array(layouts.IMAGENET_STD)
  normalised = ((pixels / 255.0 - mean) / std).transpose(0, 3, 1, 2)
  assert_close(np.asarray(got), np_resnet(sd, 'resnet18', normalised))


@pytest.mark.extended
@pytest.mark.parametrize('fmt,name,state', [
    ('torchvision', 'resnet18', lambda: torchvision_resnet('resnet18', 10)),
    ('torchvision', 'mobilenet_v2', lambda: torchvision_mobilenet_v2(10)),
    ('timm', 'deit_tiny_distilled_patch16_224',
     lambda: timm_vit('deit_tiny_distilled_patch16_224', 32, 10))])
def test_imported_architectures_export_to_onnx_and_tflite(fmt, name, state,
                                                           tmp_path):
  from kd_jax import export_model  # pylint: disable=g-import-not-at-top
  pytest.importorskip('jax2onnx')
  pytest.importorskip('onnxruntime')
  workdir = str(tmp_path / 'run')
  import_teacher.import_weights(fmt, name, save(tmp_path, state()), workdir,
                                image_size=32)
  for out_format in export_model.FORMATS:
    report = export_model.export(workdir, out_format,
                                 str(tmp_path / f'model.{out_format}'))
    assert report['check'] == '64 random uint8 images (seed 0)'
    assert report['max_abs_difference'] <= report['tolerance']


@pytest.mark.extended  # A ResNet-18 teacher in a run and an export.
def test_a_student_distils_from_an_imported_teacher(tmp_path):
  """mnist5k as RGB (channels=3) taught by an imported resnet18: the distill
  config takes the run as teacher_workdir (its spec from run_info), and
  export_logits caches its logits (64 test images: the unoptimised CPU
  compiles of the tests make a ResNet slow)."""
  from kd_jax import export_logits  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  teacher = str(tmp_path / 'teacher')
  import_teacher.import_weights(
      'torchvision', 'resnet18',
      save(tmp_path, torchvision_resnet('resnet18', 10)), teacher,
      image_size=28)
  config = config_lib.load_config(
      'mnist5k_distill', f'runlocal,teacher_workdir={teacher},'
      "teacher_model=None,channels=3,eval_splits=('test[:64]',)")
  summary = train.train_and_evaluate(config, str(tmp_path / 'student'))
  assert summary['step'] == 6
  assert 'teacher_accuracy' in summary['eval']['test[:64]']
  manifests = export_logits.export(config, str(tmp_path / 'cache'),
                                   splits=['test[:64]'], write_csv=False)
  assert manifests['test[:64]']['num_examples'] == 64


@pytest.mark.extended  # Four runs of a ResNet-18.
def test_the_image_folder_walkthrough_fine_tunes_an_imported_resnet18(
    tmp_path):
  """configs/image_folder.py's steps on a generated two-class folder:
  import a 1000-class resnet18, fine-tune it as the teacher (init_from:
  every tensor but the head), distil the CNN at the user's alpha and T
  (the export step is tests/test_export_model.py's)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top
  from kd_jax import warm_start  # pylint: disable=g-import-not-at-top
  root = tmp_path / 'xray'
  for split, count in (('train', 8), ('val', 3), ('test', 3)):
    for label, (cls, pixel) in enumerate((('NORMAL', 60), ('PNEUMONIA', 190))):
      os.makedirs(root / split / cls)
      for i in range(count):
        image = tf.fill([20 + i, 24, 3], tf.constant(pixel + 5 * i, tf.uint8))
        tf.io.write_file(str(root / split / cls / f'{i}.png'),
                         tf.io.encode_png(image))
  imported = str(tmp_path / 'resnet18_imagenet')
  sd = torchvision_resnet('resnet18')
  import_teacher.import_weights('torchvision', 'resnet18', save(tmp_path, sd),
                                imported, image_size=32)
  common = f'runlocal,image_folder={root},num_train_steps=2'
  teacher = str(tmp_path / 'teacher')
  config = config_lib.load_config(
      'image_folder', f'{common},role=teacher,init_from={imported}')
  summary = train.train_and_evaluate(config, teacher)
  assert summary['model'] == 'resnet18' and summary['step'] == 2
  variables, _ = warm_start.restore_run(teacher)
  stem = np.asarray(variables['params']['stem_conv']['kernel'])
  # Started from the imported kernel: 2 Adam steps of lr 1e-3 move each
  # entry by at most about 2e-3 (a fresh init differs by up to 0.46).
  want = sd['conv1.weight'].transpose(2, 3, 1, 0)
  assert np.abs(stem - want).max() < 0.02
  student = str(tmp_path / 'student')
  config = config_lib.load_config(
      'image_folder', f'{common},role=distill,teacher_workdir={teacher},'
      'distill.alpha=0.5,distill.temperature=6.0')
  summary = train.train_and_evaluate(config, student)
  assert summary['model'] == 'cnn'
  assert 0 <= summary['eval']['test']['agreement'] <= 1
