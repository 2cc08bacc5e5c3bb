"""The benchmark model zoo: reference parameter counts, feature taps, pair configs.

Reference counts are computed here from the PyTorch definitions (RepDistiller
`models/*.py`, mdistiller's MobileNetV1, torchvision's ResNets, timm's
ViT/DeiT), layer by layer as their constructors build them, independently of
the Flax modules; shapes come from `jax.eval_shape`, so no model computes.
"""

import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kd_jax import models
from kd_jax import train
from kd_jax.config_lib import load_config
from kd_jax.models import features as kd_features


# PyTorch layers: trainable parameters (BN: weight and bias).
def conv(cin, cout, k, groups=1, bias=False):
  return cout * (cin // groups) * k * k + (cout if bias else 0)


def bn(c):
  return 2 * c


def linear(cin, cout):
  return cin * cout + cout


def ref_cifar_resnet(depth, filters, num_classes):
  """RepDistiller resnet.py ResNet(depth, num_filters, 'basicblock')."""
  n = (depth - 2) // 6
  total = conv(3, filters[0], 3) + bn(filters[0])
  inplanes = filters[0]
  for stage, planes in enumerate(filters[1:]):
    for i in range(n):
      stride = 2 if stage and i == 0 else 1
      total += conv(inplanes, planes, 3) + bn(planes)
      total += conv(planes, planes, 3) + bn(planes)
      if i == 0 and (stride != 1 or inplanes != planes):
        total += conv(inplanes, planes, 1) + bn(planes)
      inplanes = planes
  return total + linear(filters[3], num_classes)


def ref_bottleneck_resnet(blocks, num_classes, imagenet):
  """RepDistiller resnetv2.py ResNet(Bottleneck) / torchvision resnet."""
  total = (conv(3, 64, 7 if imagenet else 3)) + bn(64)
  inplanes = 64
  for stage, (num, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for i in range(num):
      stride = 2 if stage and i == 0 else 1
      total += conv(inplanes, planes, 1) + bn(planes)
      total += conv(planes, planes, 3) + bn(planes)
      total += conv(planes, 4 * planes, 1) + bn(4 * planes)
      if stride != 1 or inplanes != 4 * planes:
        total += conv(inplanes, 4 * planes, 1) + bn(4 * planes)
      inplanes = 4 * planes
  return total + linear(2048, num_classes)


def ref_basic_imagenet_resnet(blocks, num_classes):
  """torchvision resnet18/34."""
  total = conv(3, 64, 7) + bn(64)
  inplanes = 64
  for stage, (num, planes) in enumerate(zip(blocks, (64, 128, 256, 512))):
    for i in range(num):
      total += conv(inplanes, planes, 3) + bn(planes)
      total += conv(planes, planes, 3) + bn(planes)
      if stage and i == 0:
        total += conv(inplanes, planes, 1) + bn(planes)
      inplanes = planes
  return total + linear(512, num_classes)


def ref_wrn(depth, k, num_classes):
  """RepDistiller wrn.py WideResNet(depth, widen_factor=k)."""
  n = (depth - 4) // 6
  channels = [16, 16 * k, 32 * k, 64 * k]
  total = conv(3, 16, 3)
  for stage in range(3):
    for i in range(n):
      cin = channels[stage] if i == 0 else channels[stage + 1]
      cout = channels[stage + 1]
      total += bn(cin) + conv(cin, cout, 3) + bn(cout) + conv(cout, cout, 3)
      if cin != cout:
        total += conv(cin, cout, 1)
  return total + bn(channels[3]) + linear(channels[3], num_classes)


VGG_CFG = {
    8: [[64], [128], [256], [512], [512]],
    11: [[64], [128], [256, 256], [512, 512], [512, 512]],
    13: [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]],
    16: [[64, 64], [128, 128], [256] * 3, [512] * 3, [512] * 3],
    19: [[64, 64], [128, 128], [256] * 4, [512] * 4, [512] * 4],
}


def ref_vgg(depth, num_classes):
  """RepDistiller vgg.py VGG(cfg, batch_norm=True)."""
  total, cin = 0, 3
  for block in VGG_CFG[depth]:
    for v in block:
      total += conv(cin, v, 3, bias=True) + bn(v)
      cin = v
  return total + linear(512, num_classes)


def ref_mobile_half(num_classes, t=6, w=0.5):
  """RepDistiller mobilenetv2.py mobilenetv2_T_w(6, 0.5)."""
  setting = [[1, 16, 1, 1], [t, 24, 2, 1], [t, 32, 3, 2], [t, 64, 4, 2],
             [t, 96, 3, 1], [t, 160, 3, 2], [t, 320, 1, 1]]
  cin = int(32 * w)
  total = conv(3, cin, 3) + bn(cin)
  for expand, c, n, _ in setting:
    cout = int(c * w)
    for _ in range(n):
      hidden = cin * expand
      total += conv(cin, hidden, 1) + bn(hidden)
      total += conv(hidden, hidden, 3, groups=hidden) + bn(hidden)
      total += conv(hidden, cout, 1) + bn(cout)
      cin = cout
  return total + conv(cin, 1280, 1) + bn(1280) + linear(1280, num_classes)


def ref_shufflev1(num_classes):
  """RepDistiller ShuffleNetv1.py ShuffleV1."""
  total, in_planes, groups = conv(3, 24, 1) + bn(24), 24, 3
  for out_planes, num in zip((240, 480, 960), (4, 8, 4)):
    for i in range(num):
      out = out_planes - (in_planes if i == 0 else 0)
      mid = int(out / 4)
      g = 1 if in_planes == 24 else groups
      total += conv(in_planes, mid, 1, groups=g) + bn(mid)
      total += conv(mid, mid, 3, groups=mid) + bn(mid)
      total += conv(mid, out, 1, groups=groups) + bn(out)
      in_planes = out_planes
  return total + linear(960, num_classes)


def ref_shufflev2(num_classes):
  """RepDistiller ShuffleNetv2.py ShuffleV2 (net_size 1)."""
  total, cin = conv(3, 24, 1) + bn(24), 24
  for cout, num in zip((116, 232, 464), (3, 7, 3)):
    mid = cout // 2
    total += conv(cin, cin, 3, groups=cin) + bn(cin)
    total += conv(cin, mid, 1) + bn(mid)
    total += conv(cin, mid, 1) + bn(mid)
    total += conv(mid, mid, 3, groups=mid) + bn(mid)
    total += conv(mid, mid, 1) + bn(mid)
    half = cout // 2
    total += num * (2 * (conv(half, half, 1) + bn(half))
                    + conv(half, half, 3, groups=half) + bn(half))
    cin = cout
  return total + conv(464, 1024, 1) + bn(1024) + linear(1024, num_classes)


def ref_mobilenetv1(num_classes):
  """mdistiller models/imagenet/mobilenetv1.py."""
  blocks = [(32, 64), (64, 128), (128, 128), (128, 256), (256, 256),
            (256, 512)] + [(512, 512)] * 5 + [(512, 1024), (1024, 1024)]
  total = conv(3, 32, 3) + bn(32)
  for cin, cout in blocks:
    total += conv(cin, cin, 3, groups=cin) + bn(cin) + conv(cin, cout, 1)
    total += bn(cout)
  return total + linear(1024, num_classes)


def ref_vit(width, depth, mlp, patch, image, channels, num_classes,
            distilled=False):
  """timm VisionTransformer / DeiT DistilledVisionTransformer."""
  tokens = 2 if distilled else 1
  patches = (image // patch) ** 2
  total = conv(channels, width, patch, bias=True) + tokens * width
  total += (patches + tokens) * width
  block = (2 * bn(width) + linear(width, 3 * width) + linear(width, width)
           + linear(width, mlp) + linear(mlp, width))
  total += depth * block + bn(width)  # LayerNorm: weight and bias, as BN.
  return total + tokens * linear(width, num_classes)


# name: (reference count, num_classes, image shape).
CIFAR = (1, 32, 32, 3)
IMAGENET = (1, 224, 224, 3)
REFERENCE = {
    'resnet8': (ref_cifar_resnet(8, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet14': (ref_cifar_resnet(14, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet20': (ref_cifar_resnet(20, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet32': (ref_cifar_resnet(32, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet44': (ref_cifar_resnet(44, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet56': (ref_cifar_resnet(56, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet110': (ref_cifar_resnet(110, (16, 16, 32, 64), 100), 100, CIFAR),
    'resnet8x4': (ref_cifar_resnet(8, (32, 64, 128, 256), 100), 100, CIFAR),
    'resnet32x4': (ref_cifar_resnet(32, (32, 64, 128, 256), 100), 100,
                   CIFAR),
    'resnet50_cifar': (ref_bottleneck_resnet((3, 4, 6, 3), 100, False), 100,
                       CIFAR),
    'wrn_16_1': (ref_wrn(16, 1, 100), 100, CIFAR),
    'wrn_16_2': (ref_wrn(16, 2, 100), 100, CIFAR),
    'wrn_40_1': (ref_wrn(40, 1, 100), 100, CIFAR),
    'wrn_40_2': (ref_wrn(40, 2, 100), 100, CIFAR),
    'vgg8': (ref_vgg(8, 100), 100, CIFAR),
    'vgg11': (ref_vgg(11, 100), 100, CIFAR),
    'vgg13': (ref_vgg(13, 100), 100, CIFAR),
    'vgg16': (ref_vgg(16, 100), 100, CIFAR),
    'vgg19': (ref_vgg(19, 100), 100, CIFAR),
    'mobilenetv2': (ref_mobile_half(100), 100, CIFAR),
    'shufflenetv1': (ref_shufflev1(100), 100, CIFAR),
    'shufflenetv2': (ref_shufflev2(100), 100, CIFAR),
    'mobilenetv1': (ref_mobilenetv1(1000), 1000, IMAGENET),
    'resnet18': (ref_basic_imagenet_resnet((2, 2, 2, 2), 1000), 1000,
                 IMAGENET),
    'resnet34': (ref_basic_imagenet_resnet((3, 4, 6, 3), 1000), 1000,
                 IMAGENET),
    'resnet50': (ref_bottleneck_resnet((3, 4, 6, 3), 1000, True), 1000,
                 IMAGENET),
    'vit_ti16': (ref_vit(192, 12, 768, 16, 224, 3, 1000), 1000, IMAGENET),
    'vit_s16': (ref_vit(384, 12, 1536, 16, 224, 3, 1000), 1000, IMAGENET),
    'vit_mini': (ref_vit(64, 4, 128, 7, 28, 1, 10), 10, (1, 28, 28, 1)),
    'vit_tiny': (ref_vit(32, 2, 64, 4, 28, 1, 10), 10, (1, 28, 28, 1)),
    # GroupNorm's scale and bias count as BatchNorm's.
    'bit_r50x1': (ref_bottleneck_resnet((3, 4, 6, 3), 1000, True), 1000,
                  IMAGENET),
}
# Models whose size is set by their kwargs, with no one reference count.
CONFIGURABLE = ('mlp', 'cnn', 'wrn', 'vit', 'bit')
# Language models take tokens, not images: tests/test_decoder.py counts them.
LANGUAGE_MODELS = ('decoder', 'decoder_tiny', 'decoder_small', 'decoder_base')


def count(name, num_classes, image_shape, **kwargs):
  model = models.get_model(dict(name=name, **kwargs), num_classes)
  variables = jax.eval_shape(model.init, jax.random.key(0),
                             jax.ShapeDtypeStruct(image_shape, jnp.float32))
  return models.param_count(variables['params'])


def test_every_registered_model_has_a_reference_count():
  assert (set(REFERENCE) | set(CONFIGURABLE) | set(LANGUAGE_MODELS)
          == set(models.MODELS))


@pytest.mark.parametrize('name', sorted(REFERENCE))
def test_parameter_count_equals_the_reference_definition(name):
  expected, num_classes, image_shape = REFERENCE[name]
  assert count(name, num_classes, image_shape) == expected
  # The factory's docstring states the same count.
  assert f'{expected:,}' in inspect.getdoc(models.MODELS[name])


@pytest.mark.parametrize('name,width,depth,mlp', [
    ('vit_ti16', 192, 12, 768), ('vit_s16', 384, 12, 1536)])
def test_distillation_token_adds_deit_token_and_head(name, width, depth, mlp):
  expected = ref_vit(width, depth, mlp, 16, 224, 3, 1000, distilled=True)
  assert count(name, 1000, IMAGENET, distill_token=True) == expected
  assert f'{expected:,}' in inspect.getdoc(models.MODELS[name])


@pytest.mark.parametrize('options,change', [
    # pool 'gap': no class token, its position embedding neither.
    ({'pool': 'gap'}, -2 * 192),
    # Position embeddings on the 196 patches only, not the class token.
    ({'posemb': 'learned_patches'}, -192),
    # Fixed sine-cosine ones: no parameters.
    ({'posemb': 'sincos2d'}, -197 * 192),
    ({'gelu': 'tanh'}, 0),
    # A 192 -> 192 dense pre-logits layer.
    ({'representation_size': 192}, 192 * 192 + 192),
])
def test_big_vision_vit_options_change_only_the_parameters_they_name(
    options, change):
  expected = ref_vit(192, 12, 768, 16, 224, 3, 1000) + change
  assert count('vit', 1000, IMAGENET, **options) == expected


@pytest.mark.parametrize('options,message', [
    ({'pool': 'map'}, r"pool='map'.*config\.model\.pool.*'gap'"),
    ({'posemb': 'sincos'}, r"posemb='sincos'.*'sincos2d'"),
    ({'gelu': 'erf'}, r"gelu='erf'.*'tanh'"),
    ({'distill_token': True, 'pool': 'gap'}, "needs pool='token'"),
    ({'distill_token': True, 'representation_size': 8}, 'no representation'),
])
def test_vit_options_are_refused_by_name(options, message):
  model = models.get_model({'name': 'vit', 'patch_size': 4, 'width': 32,
                            'depth': 1, 'num_heads': 2, 'mlp_dim': 64,
                            **options}, 10)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0),
                   jax.ShapeDtypeStruct((1, 28, 28, 1), jnp.float32))


def test_unknown_model_name_is_refused_with_the_list():
  with pytest.raises(ValueError, match="'resnet9'.*'vgg8'"):
    models.get_model({'name': 'resnet9'}, 10)


def _stages(stem, stages, embedding, preact=True):
  """The feature shapes (batch 2) RepDistiller's is_feat returns."""
  shapes = {'stem': (2, *stem), 'embedding': (2, embedding)}
  for i, shape in enumerate(stages):
    shapes[f'stage{i + 1}'] = (2, *shape)
    if preact:
      shapes[f'preact{i + 1}'] = (2, *shape)
  return shapes


# At 32x32 inputs (224x224 for ImageNet models), from the reference forwards.
CIFAR3 = ((32, 32), (16, 16), (8, 8))
FEATURES = {
    'resnet8': _stages((32, 32, 16), [(*s, c) for s, c in
                                      zip(CIFAR3, (16, 32, 64))], 64),
    'resnet110': _stages((32, 32, 16), [(*s, c) for s, c in
                                        zip(CIFAR3, (16, 32, 64))], 64),
    'resnet8x4': _stages((32, 32, 32), [(*s, c) for s, c in
                                        zip(CIFAR3, (64, 128, 256))], 256),
    'resnet50_cifar': _stages((32, 32, 64), [
        (32, 32, 256), (16, 16, 512), (8, 8, 1024), (4, 4, 2048)], 2048),
    'wrn_40_2': _stages((32, 32, 16), [(*s, c) for s, c in
                                       zip(CIFAR3, (32, 64, 128))], 128),
    'wrn_16_1': _stages((32, 32, 16), [(*s, c) for s, c in
                                       zip(CIFAR3, (16, 32, 64))], 64),
    'vgg8': _stages((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512),
                                   (4, 4, 512)], 512),
    'vgg13': _stages((32, 32, 64), [(16, 16, 128), (8, 8, 256), (4, 4, 512),
                                    (4, 4, 512)], 512),
    'mobilenetv2': _stages((16, 16, 16), [(16, 16, 12), (8, 8, 16),
                                          (4, 4, 48), (2, 2, 160)], 1280,
                           preact=False),
    'shufflenetv1': _stages((32, 32, 24), [(16, 16, 240), (8, 8, 480),
                                           (4, 4, 960)], 960),
    'shufflenetv2': _stages((32, 32, 24), [(16, 16, 116), (8, 8, 232),
                                           (4, 4, 464)], 1024),
    'mobilenetv1': _stages((112, 112, 32), [(56, 56, 128), (28, 28, 256),
                                            (14, 14, 512), (7, 7, 1024)],
                           1024),
    'resnet18': _stages((112, 112, 64), [(56, 56, 64), (28, 28, 128),
                                         (14, 14, 256), (7, 7, 512)], 512),
    'bit_r50x1': _stages((112, 112, 64), [(56, 56, 256), (28, 28, 512),
                                          (14, 14, 1024), (7, 7, 2048)],
                         2048),
}


@pytest.mark.parametrize('name', sorted(FEATURES))
def test_feature_shapes_are_the_reference_positions(name):
  image = (2, 224, 224, 3) if name in ('mobilenetv1', 'resnet18',
                                       'bit_r50x1') else (
      2, 32, 32, 3)
  shapes = kd_features.feature_shapes({'name': name}, 100, image)
  assert {k: v.shape for k, v in shapes.items()} == FEATURES[name]


def test_mlp_cnn_and_vit_features():
  mlp = kd_features.feature_shapes({'name': 'mlp', 'hidden': (30, 20)}, 10,
                                   (2, 28, 28, 1))
  assert {k: v.shape for k, v in mlp.items()} == {
      'preact1': (2, 30), 'stage1': (2, 30), 'preact2': (2, 20),
      'stage2': (2, 20), 'embedding': (2, 20)}
  cnn = kd_features.feature_shapes({'name': 'cnn'}, 10, (2, 28, 28, 1))
  assert cnn['stage3'].shape == (2, 4, 4, 128)
  assert cnn['embedding'].shape == (2, 128)
  vit = kd_features.feature_shapes(
      {'name': 'vit_tiny', 'distill_token': True}, 10, (2, 28, 28, 1),
      train=True)
  assert {k: v.shape for k, v in vit.items()} == {
      'embedding': (2, 32), 'dist_embedding': (2, 32),
      'dist_logits': (2, 10)}


@pytest.mark.slow  # A forward pass of every model.
def test_feature_capture_leaves_params_and_logits_unchanged():
  model = models.get_model({'name': 'resnet8'}, 10)
  images = jax.random.normal(jax.random.key(1), (4, 8, 8, 3))
  variables = model.init(jax.random.key(0), images)
  # init records no features: checkpoints hold params and batch_stats only.
  assert set(variables) == {'params', 'batch_stats'}
  plain, plain_state = model.apply(variables, images, True,
                                   mutable=['batch_stats'])
  logits, features, state = kd_features.apply_with_features(
      model, variables, images, train=True, mutable=['batch_stats'])
  np.testing.assert_array_equal(plain, logits)
  jax.tree.map(np.testing.assert_array_equal, plain_state, state)
  assert set(state) == {'batch_stats'}
  # The head reads the embedding: the logits follow from it.
  head = variables['params']['head']
  np.testing.assert_allclose(
      features['embedding'] @ head['kernel'] + head['bias'], logits,
      rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(features['stage3'],
                             jax.nn.relu(features['preact3']))


def test_feature_capture_works_under_jit():
  model = models.get_model({'name': 'mlp', 'hidden': (6, 5)}, 3)
  images = jnp.linspace(0, 1, 2 * 16).reshape(2, 4, 4, 1)
  variables = model.init(jax.random.key(0), images)
  logits, features = jax.jit(lambda v, x: kd_features.apply_with_features(
      model, v, x, train=False))(variables, images)
  np.testing.assert_allclose(logits, model.apply(variables, images),
                             rtol=1e-6)
  np.testing.assert_allclose(features['stage2'],
                             jax.nn.relu(features['preact2']))


@pytest.mark.slow  # DeiT compiles for seconds.
def test_deit_eval_logits_average_the_two_heads():
  model = models.get_model(
      {'name': 'vit_tiny', 'distill_token': True, 'patch_size': 2}, 10)
  images = jax.random.normal(jax.random.key(1), (3, 4, 4, 1))
  variables = model.init(jax.random.key(0), images)
  train_logits, train_features = kd_features.apply_with_features(
      model, variables, images, train=True)
  eval_logits = model.apply(variables, images, False)
  np.testing.assert_allclose(
      eval_logits, (train_logits + train_features['dist_logits']) / 2,
      rtol=1e-5, atol=1e-6)
  assert not np.allclose(train_logits, train_features['dist_logits'])


def test_select_features_refuses_a_missing_name_with_the_list():
  features = {'stem': 0, 'embedding': 1}
  assert kd_features.select_features(features, ['embedding'], 'm') == [1]
  with pytest.raises(ValueError, match=r"no feature 'stage9'.*\['embedding', "
                     r"'stem'\]"):
    kd_features.select_features(features, ['stage9'], 'm')


PAIRS = {
    'wrn_40_2_wrn_16_2': 0.05, 'wrn_40_2_wrn_40_1': 0.05,
    'resnet56_resnet20': 0.05, 'resnet110_resnet20': 0.05,
    'resnet110_resnet32': 0.05, 'resnet32x4_resnet8x4': 0.05,
    'vgg13_vgg8': 0.05, 'vgg13_mobilenetv2': 0.01,
    'resnet50_cifar_mobilenetv2': 0.01, 'resnet50_cifar_vgg8': 0.05,
    'resnet32x4_shufflenetv1': 0.01, 'resnet32x4_shufflenetv2': 0.01,
    'wrn_40_2_shufflenetv1': 0.01,
}


@pytest.mark.parametrize('pair', sorted(PAIRS))
def test_each_crd_pair_resolves_with_the_recipe(pair):
  config = load_config('cifar100_pairs', f'pair={pair}')
  teacher = config.teachers[0].model.name
  assert f'{teacher}_{config.model.name}' == pair
  assert config.learning_rate == PAIRS[pair]
  assert config.distill.temperature == 4.0 and config.distill.alpha == 0.9
  assert (config.num_epochs, config.batch_size) == (240, 64)
  assert config.teacher_workdir == f'workdirs/cifar100_{teacher}'
  student_alone = load_config('cifar100_pairs', f'pair={pair},role=student')
  assert student_alone.learning_rate == PAIRS[pair]
  assert student_alone.distill.teacher_source == 'none'


def test_unknown_pair_is_refused_with_the_list():
  with pytest.raises(ValueError, match=r"pair='r8_r8'.*'vgg13_vgg8'"):
    load_config('cifar100_pairs', 'pair=r8_r8')


@pytest.mark.extended  # Two zoo models trained end to end.
def test_cross_architecture_pair_distills_in_runlocal_form(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  builder = tfds.builder('cifar100', data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[8], num_bytes=0)
      for s in ('train', 'test')]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  arg = (f'pair=resnet50_cifar_vgg8,runlocal,data_dir={data_dir},'
         'num_train_steps=2,batch_size=8,eval_batch_size=8')
  with tfds.testing.mock_data(num_examples=8, data_dir=data_dir):
    teacher = train.train_and_evaluate(
        load_config('cifar100_pairs', f'{arg},role=teacher'),
        str(tmp_path / 'teacher'))
    summary = train.train_and_evaluate(
        load_config('cifar100_pairs',
                    f'{arg},teacher_workdir={tmp_path / "teacher"}'),
        str(tmp_path / 'student'))
  assert (teacher['model'], summary['model']) == ('resnet8', 'vgg8')
  assert summary['step'] == 2
  assert math.isfinite(summary['eval']['test']['loss'])
  assert 0.0 <= summary['eval']['test']['agreement'] <= 1.0
