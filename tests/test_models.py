"""Model zoo: shapes, parameter counts, BatchNorm, dropout and dtypes."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd_jax import models

NUM_CLASSES = 7
BATCHNORM_MODELS = ('resnet20', 'wrn_16_2', 'resnet18')

# Small inputs per model.
_IMAGE_SHAPES = {
    'mlp': (2, 28, 28, 1),
    'cnn': (2, 28, 28, 1),
    'resnet20': (2, 32, 32, 3),
    'resnet56': (2, 32, 32, 3),
    'resnet8x4': (2, 32, 32, 3),
    'resnet32x4': (2, 32, 32, 3),
    'wrn_16_2': (2, 32, 32, 3),
    'wrn_40_2': (2, 32, 32, 3),
    'wrn': (2, 32, 32, 3),
    'resnet18': (1, 64, 64, 3),
    'resnet34': (1, 64, 64, 3),
    'resnet50': (1, 64, 64, 3),
}
# Deeper or wider variants of nets run below: slow to compile on CPU, so
# checked through shapes and parameter counts only.
_SHAPE_ONLY = ('wrn', 'resnet32x4', 'resnet34')


def _images(name: str, seed: int = 0) -> jax.Array:
  return jax.random.normal(jax.random.key(seed), _IMAGE_SHAPES[name])


@functools.cache
def _variables(name: str, **spec):
  model = models.get_model(dict(name=name, **spec), NUM_CLASSES)
  # A jitted init with an 'rbg' key compiles several times faster on CPU than
  # an eager threefry init, which compiles each initialiser separately.
  return jax.jit(model.init)(jax.random.key(0, impl='rbg'), _images(name))


def test_model_table_names_registered_models():
  # tests/test_zoo.py checks every registered model's reference count.
  assert set(_IMAGE_SHAPES) <= set(models.MODELS)


@pytest.mark.parametrize('name', list(_IMAGE_SHAPES))
def test_every_model_maps_images_to_float32_logits_per_class(name):
  model = models.get_model({'name': name}, NUM_CLASSES)
  images = _images(name)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (images.shape[0], NUM_CLASSES)
  assert logits.dtype == jnp.float32


# The default set runs the small nets (mlp, cnn); the convolutional zoo's
# nets take seconds each to initialise on CPU and run in the slow set, and
# its deeper variants and the ImageNet ResNets in the extended one.
_DEFAULT_FORWARD = ('mlp', 'cnn')
_EXTENDED_FORWARD = ('resnet50', 'resnet18', 'resnet56', 'wrn_40_2')


def _by_cost(names):
  return [n if n in _DEFAULT_FORWARD else pytest.param(
      n, marks=pytest.mark.extended if n in _EXTENDED_FORWARD
      else pytest.mark.slow) for n in names]


@pytest.mark.parametrize(
    'name', _by_cost(n for n in _IMAGE_SHAPES if n not in _SHAPE_ONLY))
def test_forward_pass_gives_finite_float32_logits(name):
  model = models.get_model({'name': name}, NUM_CLASSES)
  images = _images(name)
  logits = model.apply(_variables(name), images)
  assert logits.shape == (images.shape[0], NUM_CLASSES)
  assert logits.dtype == jnp.float32
  assert np.all(np.isfinite(logits))


# (name, num_classes, image shape, exact count, published count, tolerance).
# Published: torchvision (ImageNet), Tian et al. 2020 / RepDistiller (CIFAR),
# He et al. 2016 (resnet20 at 10 classes, 0.27M), Hinton et al. 2015 (mlp).
_PARAM_COUNTS = [
    ('resnet18', 1000, (224, 224, 3), 11_689_512, 11_689_512, 0.0),
    ('resnet34', 1000, (224, 224, 3), 21_797_672, 21_797_672, 0.0),
    ('resnet50', 1000, (224, 224, 3), 25_557_032, 25_557_032, 0.0),
    ('resnet20', 10, (32, 32, 3), 272_474, 0.27e6, 0.03),
    ('resnet20', 100, (32, 32, 3), 278_324, 0.28e6, 0.03),
    ('resnet56', 100, (32, 32, 3), 861_620, 0.86e6, 0.03),
    ('resnet8x4', 100, (32, 32, 3), 1_233_540, 1.23e6, 0.03),
    ('resnet32x4', 100, (32, 32, 3), 7_433_860, 7.43e6, 0.03),
    ('wrn_16_2', 100, (32, 32, 3), 703_284, 0.70e6, 0.03),
    ('wrn_40_2', 100, (32, 32, 3), 2_255_156, 2.25e6, 0.03),
    ('cnn', 2, (224, 224, 3), 275_394, 277e3, 0.10),
    ('cnn', 2, (224, 224, 1), 273_794, 277e3, 0.10),
    # 784*800 + 800 + 800*800 + 800 + 800*10 + 10.
    ('mlp', 10, (28, 28, 1), 1_276_810, 1_276_810, 0.0),
]


def _param_count(spec, num_classes, image_shape) -> int:
  model = models.get_model(spec, num_classes)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jnp.zeros((1, *image_shape)))
  return models.param_count(shapes['params'])


@pytest.mark.parametrize(
    'name, num_classes, image_shape, exact, published, tolerance',
    _PARAM_COUNTS)
def test_param_count_matches_reference_implementation(
    name, num_classes, image_shape, exact, published, tolerance):
  count = _param_count({'name': name}, num_classes, image_shape)
  assert count == exact
  assert abs(count - published) <= tolerance * published


def test_hinton_mnist_teacher_has_two_layers_of_1200():
  spec = {'name': 'mlp', 'hidden': (1200, 1200), 'dropout': 0.5,
          'input_dropout': 0.2}
  expected = 784 * 1200 + 1200 + 1200 * 1200 + 1200 + 1200 * 10 + 10
  assert _param_count(spec, 10, (28, 28, 1)) == expected == 2_395_210


def test_cnn_param_count_does_not_grow_with_image_size():
  spec = {'name': 'cnn'}
  assert _param_count(spec, 2, (28, 28, 3)) == _param_count(
      spec, 2, (224, 224, 3))


def test_cnn_features_and_dense_width_are_configurable():
  spec = {'name': 'cnn', 'features': (8, 16), 'kernel_size': 3, 'dense': 4}
  expected = (3 * 3 * 1 * 8 + 8) + (3 * 3 * 8 * 16 + 16) + (16 * 4 + 4) + (
      4 * 2 + 2)
  assert _param_count(spec, 2, (28, 28, 1)) == expected


@pytest.mark.parametrize('name', _by_cost(BATCHNORM_MODELS))
def test_train_mode_updates_every_batch_stat_and_eval_mode_none(name):
  model = models.get_model({'name': name}, NUM_CLASSES)
  variables = _variables(name)
  images = _images(name, seed=1)
  old = variables['batch_stats']
  _, updates = model.apply(variables, images, train=True,
                           mutable=['batch_stats'])
  assert jax.tree.structure(updates['batch_stats']) == jax.tree.structure(old)
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         updates['batch_stats'], old)
  assert all(jax.tree.leaves(changed))
  _, updates = model.apply(variables, images, train=False,
                           mutable=['batch_stats'])
  jax.tree.map(np.testing.assert_array_equal, updates['batch_stats'], old)


@pytest.mark.slow  # A resnet20 initialised and applied.
def test_batchnorm_running_mean_moves_a_tenth_of_the_way_to_batch_mean():
  model = models.get_model({'name': 'resnet20'}, NUM_CLASSES)
  variables = _variables('resnet20')
  images = _images('resnet20', seed=1)
  _, state = model.apply(variables, images, train=True,
                         mutable=['batch_stats', 'intermediates'],
                         capture_intermediates=True)
  stem_out, = state['intermediates']['stem_conv']['__call__']
  new_mean = state['batch_stats']['stem_bn']['mean']
  # momentum 0.9: new = 0.9 * old (zeros at init) + 0.1 * batch mean.
  np.testing.assert_allclose(new_mean, 0.1 * stem_out.mean(axis=(0, 1, 2)),
                             rtol=1e-5, atol=1e-7)


def test_mlp_has_no_batch_stats_to_update():
  model = models.get_model({'name': 'mlp'}, NUM_CLASSES)
  variables = _variables('mlp')
  assert set(variables) == {'params'}
  _, updates = model.apply(variables, _images('mlp'), train=True,
                           mutable=['batch_stats'])
  assert not updates


_DROPOUT_SPECS = [
    {'name': 'mlp', 'dropout': 0.5, 'input_dropout': 0.2},
    {'name': 'cnn', 'dropout': 0.5},
    {'name': 'wrn_16_2', 'dropout': 0.3},
]
_DROPOUT_PARAMS = [
    pytest.param(spec, id=spec['name'],
                 marks=() if spec['name'] in _DEFAULT_FORWARD
                 else pytest.mark.slow) for spec in _DROPOUT_SPECS]


def _apply(spec, train, dropout_seed):
  model = models.get_model(spec, NUM_CLASSES)
  variables = _variables(**spec)
  logits, _ = model.apply(variables, _images(spec['name']), train=train,
                          rngs={'dropout': jax.random.key(dropout_seed)},
                          mutable=['batch_stats'])
  return logits


@pytest.mark.parametrize('spec', _DROPOUT_PARAMS)
def test_eval_mode_ignores_dropout_rng(spec):
  np.testing.assert_array_equal(_apply(spec, False, 1), _apply(spec, False, 2))


@pytest.mark.parametrize('spec', _DROPOUT_PARAMS)
def test_train_mode_dropout_draws_from_dropout_rng(spec):
  first = _apply(spec, True, 1)
  np.testing.assert_array_equal(first, _apply(spec, True, 1))
  assert not np.allclose(first, _apply(spec, True, 2))
  assert not np.allclose(first, _apply(spec, False, 1))


def test_train_mode_without_dropout_needs_no_dropout_rng():
  model = models.get_model({'name': 'mlp'}, NUM_CLASSES)
  train_logits = model.apply(_variables('mlp'), _images('mlp'), train=True)
  eval_logits = model.apply(_variables('mlp'), _images('mlp'), train=False)
  np.testing.assert_array_equal(train_logits, eval_logits)


@pytest.mark.parametrize('name', _by_cost(['mlp', 'cnn', 'resnet20',
                                           'wrn_16_2']))
def test_bfloat16_keeps_float32_params_and_logits_close_to_float32(name):
  model32 = models.get_model({'name': name}, NUM_CLASSES)
  model16 = models.get_model({'name': name}, NUM_CLASSES, dtype=jnp.bfloat16)
  images = _images(name)
  variables = _variables(name)
  shapes16 = jax.eval_shape(model16.init, jax.random.key(0), images)
  assert jax.tree.map(lambda s: s.dtype, shapes16) == jax.tree.map(
      lambda a: a.dtype, variables)
  assert all(s.dtype == jnp.float32 for s in jax.tree.leaves(shapes16))
  # Train mode normalises by batch statistics, keeping activations O(1).
  logits32, _ = model32.apply(variables, images, train=True,
                              mutable=['batch_stats'])
  logits16, _ = model16.apply(variables, images, train=True,
                              mutable=['batch_stats'])
  assert logits16.dtype == jnp.float32
  scale = float(jnp.abs(logits32).max())
  np.testing.assert_allclose(logits16, logits32, atol=0.03 * scale)
  assert not np.array_equal(logits16, logits32)  # bfloat16 was really used.


def test_config_dict_spec_with_list_builds_same_model_as_dict():
  spec = ml_collections.ConfigDict({'name': 'mlp', 'hidden': [30, 30]})
  model = models.get_model(spec, NUM_CLASSES)
  assert model == models.get_model({'name': 'mlp', 'hidden': (30, 30)},
                                   NUM_CLASSES)
  assert model.hidden == (30, 30)


def test_unknown_model_name_lists_known_names_and_config_field():
  with pytest.raises(ValueError, match=r'config\.model\.name.*resnet20'):
    models.get_model({'name': 'resnet19'}, NUM_CLASSES)
  with pytest.raises(ValueError, match='None'):
    models.get_model({'hidden': (30,)}, NUM_CLASSES)


def test_unknown_kwarg_is_named_with_the_accepted_kwargs():
  with pytest.raises(ValueError, match=r"hiden.*'hidden'.*'input_dropout'"):
    models.get_model({'name': 'mlp', 'hiden': (30,)}, NUM_CLASSES)
  with pytest.raises(ValueError, match=r"widen_factor.*\['dropout'\]"):
    models.get_model({'name': 'wrn_16_2', 'widen_factor': 4}, NUM_CLASSES)


@pytest.mark.parametrize('spec, message', [
    ({'name': 'wrn', 'depth': 18}, 'depth must be 6n'),
    ({'name': 'mlp', 'dropout': 1.0}, 'dropout must be in'),
])
def test_invalid_hyperparameter_raises_naming_it(spec, message):
  model = models.get_model(spec, NUM_CLASSES)
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(model.init, jax.random.key(0), _images(spec['name']))


def test_conv_net_rejects_unbatched_image():
  model = models.get_model({'name': 'resnet20'}, NUM_CLASSES)
  with pytest.raises(ValueError, match=r'\[batch, height, width, channels\]'):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((32, 32, 3)))


def test_param_count_and_bytes_sum_over_leaves_and_dtypes():
  tree = {'w': jnp.zeros((3, 4), jnp.float32),
          'b': {'x': jnp.zeros((5,), jnp.bfloat16)}}
  assert models.param_count(tree) == 17
  assert models.param_bytes(tree) == 12 * 4 + 5 * 2
  shapes = jax.eval_shape(lambda: tree)
  assert models.param_count(shapes) == 17
  assert models.param_bytes(shapes) == 58
