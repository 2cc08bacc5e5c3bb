"""The per-step objective: weights, DKD's warm-up, refusals, CTKD's learned
temperature in the train state, a DIST step on 1 vs 8 devices, and every
method of configs/cifar100_logit_methods.py run in its runlocal form."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import losses
from kd_jax import models
from kd_jax import objective
from kd_jax import teachers
from kd_jax import train
from kd_jax.methods import ctkd
from kd_jax.config_lib import load_config

B, C = 16, 10


def distill_config(**fields) -> ml_collections.ConfigDict:
  d = config_lib.default_config().distill
  d.update(teacher_source='online', temperature=4.0, alpha=0.9)
  d.update(fields)
  return d


def random_inputs(seed=0):
  rng = np.random.default_rng(seed)
  student = jnp.asarray(3 * rng.normal(size=(B, C)), jnp.float32)
  teacher = jnp.asarray(3 * rng.normal(size=(1, B, C)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, C, B))
  mask = jnp.asarray(np.arange(B) < 13)
  return student, teacher, labels, mask


def test_alpha_configs_give_distillation_loss_exactly():
  student, teacher, labels, mask = random_inputs()
  for soft in ('kl', 'soft_ce', 'logit_mse'):
    d = distill_config(soft=soft)
    targets = objective.teacher_targets(teacher, {}, d, (1.0,))
    got = objective.loss(student, targets, labels, mask, d)
    want = losses.distillation_loss(student, teacher[0], labels,
                                    temperature=4.0, alpha=0.9, soft=soft,
                                    where=mask)
    for key in ('soft', 'hard', 'total'):
      assert float(got[1][key]) == float(want[1][key]), (soft, key)


@pytest.mark.parametrize('soft, temperature, want', [
    (dict(method='nkd', gamma=3.5), 3.0, lambda s, t, y, m: losses.nkd_loss(
        s, t, y, gamma=3.5, temperature=3.0, where=m)),
    ('wttm', 10.0, lambda s, t, y, m: losses.wttm_loss(
        s, t, temperature=10.0, where=m)),
    (dict(method='mlkd', instance_weight=0.45, batch_weight=0.45,
          class_weight=0.45), 4.0, lambda s, t, y, m: losses.mlkd_loss(
              s, t, instance_weight=0.45, batch_weight=0.45,
              class_weight=0.45, where=m)),
])
def test_registered_methods_give_their_losses_in_the_step(soft, temperature,
                                                          want):
  student, teacher, labels, mask = random_inputs(2)
  d = distill_config(soft=soft, temperature=temperature, alpha=0.0,
                     soft_weight=2.0, hard_weight=0.1)
  targets = objective.teacher_targets(teacher, {}, d, (1.0,))
  total, terms = objective.loss(student, targets, labels, mask, d)
  value = want(student, teacher[0], labels, mask)
  if value.ndim:  # Per-example: the mean over the valid rows.
    value = jnp.sum(value) / jnp.sum(mask)
  np.testing.assert_allclose(float(terms['soft']), float(value), rtol=1e-6)
  np.testing.assert_allclose(float(total),
                             2.0 * float(value) + 0.1 * float(terms['hard']),
                             rtol=1e-6)


def test_explicit_weights_and_dkd_warmup():
  student, teacher, labels, mask = random_inputs(1)
  d = distill_config(alpha=0.0, soft=dict(method='dkd', warmup_epochs=4.0),
                     soft_weight=2.0, hard_weight=0.5)
  targets = objective.teacher_targets(teacher, {}, d, (1.0,))
  soft = losses.masked_mean(losses.dkd(student, teacher[0], labels,
                                       where=mask), mask)
  hard = losses.masked_mean(losses.cross_entropy(student, labels), mask)
  # mdistiller's min(epoch / warmup, 1), epochs counted from 1.
  for done, factor in ((0.0, 0.25), (0.9, 0.25), (1.5, 0.5), (3.2, 1.0),
                       (40.0, 1.0)):
    total, terms = objective.loss(student, targets, labels, mask, d,
                                  epoch=jnp.float32(done))
    np.testing.assert_allclose(terms['soft'], soft, rtol=1e-6)
    np.testing.assert_allclose(total, 2.0 * factor * soft + 0.5 * hard,
                               rtol=1e-6)
  with pytest.raises(ValueError, match='steps_per_epoch'):
    objective.loss(student, targets, labels, mask, d)


@pytest.mark.parametrize('fields', [
    dict(soft='dkd'), dict(soft='dist'), dict(logit_standardization=True),
    dict(ctkd='global')])
def test_topk_cache_refuses_losses_it_cannot_serve_exactly(fields):
  config = load_config('mnist5k_distill', 'distill.temperature=4.0')
  config.distill.update(fields)
  manifest = dict(form='topk', top_k=3, temperature=4.0)
  with pytest.raises(ValueError, match='top-k'):
    teachers.cache.check_form({'train': manifest},
                              config_lib.upgrade(config))
  teachers.cache.check_form({'train': manifest}, load_config(
      'mnist5k_distill', 'distill.temperature=4.0'))


@pytest.mark.parametrize('arg, match', [
    ('distill.soft="dkdx"', 'config.distill.soft'),
    ('distill.soft_weight=1.0', 'config.distill.hard_weight'),
    ('distill.ctkd="yes"', 'config.distill.ctkd'),
    ('distill.ensemble_temperature="2"', 'config.distill.ensemble_temperature'),
    ('distill.soft={"method":"dkd","beta":-1.0}', 'config.distill.soft.beta'),
    ('distill.soft.beta=1.0', 'does not take'),
    ('distill.soft="dist",distill.ctkd="instance"', 'ctkd="global"'),
    ('distill.soft="dkd",mixup_alpha=0.2', 'mixup_alpha'),
    ('distill.temperature=0.0', 'temperature'),
    ('distill.soft="nkd",distill.ctkd="instance"', 'both sides'),
    ('distill.soft="wttm",distill.ctkd="instance"', 'both sides'),
    ('distill.soft="mlkd",distill.ctkd="global"', 'no temperature'),
    ('distill.soft="wttm",distill.logit_standardization=True',
     'logit_standardization=False'),
    ('distill.soft="nkd",mixup_alpha=0.2', 'mixup_alpha'),
    ('distill.soft={"method":"mlkd","temperatures":()}',
     'temperatures=\\(\\) must be a non-empty'),
    ('distill.soft={"method":"nkd","gamma":-1.0}', 'soft.gamma'),
])
def test_bad_objective_fields_are_named(arg, match):
  with pytest.raises(ValueError, match=match):
    objective.validate(load_config('mnist5k_distill', arg))


@pytest.mark.parametrize('mode', ['global', 'instance'])
def test_ctkd_temperature_gradient_is_reversed_and_scaled(mode):
  student, teacher, labels, mask = random_inputs(3)
  d = distill_config(ctkd=dict(mode=mode, hidden=8))
  targets = objective.teacher_targets(teacher, {}, d, (1.0,))
  params = ctkd.init_params(ctkd.settings(d), C, jax.random.key(0))
  epoch = jnp.float32(2.0)  # Third epoch: strength (1 - cos(0.3 pi)) / 2.

  def total(params, reverse):
    temperature, strength = objective.learned_temperature(
        d, params, student, targets, epoch)
    if not reverse:  # The same temperature without the reversal.
      raw = ctkd.temperature_module(ctkd.settings(d)).apply(
          {'params': params}, student, targets.logits)
      temperature = 1.0 + 20.0 * jax.nn.sigmoid(raw)
    return objective.loss(student, targets, labels, mask, d,
                          temperature=temperature)[0], strength

  reversed_grads, strength = jax.grad(total, has_aux=True)(params, True)
  plain_grads, _ = jax.grad(total, has_aux=True)(params, False)
  np.testing.assert_allclose(strength, (1 - np.cos(0.3 * np.pi)) / 2,
                             rtol=1e-6)
  jax.tree.map(lambda r, p: np.testing.assert_allclose(
      r, -strength * p, rtol=1e-5, atol=1e-8), reversed_grads, plain_grads)
  assert any(np.any(g != 0) for g in jax.tree.leaves(plain_grads))


def fake_cache_teacher():
  def forward(variables, batch):
    del variables
    return batch['teacher_logits'][None]
  return teachers.Teacher(variables=None, forward=forward, names=('cache',),
                          weights=(1.0,), fingerprint='test')


@pytest.mark.parametrize('ctkd', ['none', 'global'])
def test_dist_step_on_one_device_equals_eight(ctkd):
  config = load_config('mnist5k_distill', '')
  config.distill.update(soft=dict(method='dist', beta=2.0, gamma=2.0),
                        alpha=0.0, soft_weight=1.0, hard_weight=1.0,
                        ctkd=ctkd)
  model = models.get_model(dict(name='mlp', hidden=(16,), dropout=0.0), C)
  tx = optax.sgd(0.05, momentum=0.9)
  rng = np.random.default_rng(4)
  batch = dict(image=rng.normal(size=(B, 4, 4, 1)).astype(np.float32),
               label=rng.integers(0, C, B).astype(np.int32),
               mask=np.arange(B) < 13,
               teacher_logits=(3 * rng.normal(size=(B, C))).astype(np.float32))
  step = functools.partial(train.train_step, model=model, tx=tx,
                           schedule=lambda s: 0.1, teacher=fake_cache_teacher(),
                           distill=config.distill, steps_per_epoch=2)
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    state = jax.device_put(train.init_state(
        model, tx, jax.random.key(0), (4, 4, 1), distill=config.distill,
        num_classes=C), replicated)
    sharded = jax.device_put(batch, NamedSharding(mesh, P('data')))
    fn = jax.jit(step, out_shardings=(replicated, replicated))
    for _ in range(2):
      state, measurements = fn(state, sharded, None)
    results.append(jax.device_get((state, measurements)))
  (state1, m1), (state8, m8) = results
  assert ('temperature' in state1.opt_state) == (ctkd != 'none')
  # Equal up to the order of float sums (a per-shard DIST would differ by
  # far more: its column statistics would see 2 rows each).
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4,
                                                       atol=1e-5),
               (state1.params, state1.temperature_params),
               (state8.params, state8.temperature_params))
  for key in m1:
    np.testing.assert_allclose(m1[key], m8[key], rtol=1e-4, atol=1e-5,
                               err_msg=key)


def test_norms_only_on_logging_steps_and_the_state_is_the_same():
  config = load_config('mnist5k_distill', '')
  model = models.get_model(dict(name='mlp', hidden=(16,), dropout=0.0), C)
  tx = optax.sgd(0.05, momentum=0.9)
  rng = np.random.default_rng(5)
  batch = dict(image=rng.normal(size=(B, 4, 4, 1)).astype(np.float32),
               label=rng.integers(0, C, B).astype(np.int32),
               mask=np.ones(B, bool),
               teacher_logits=(3 * rng.normal(size=(B, C))).astype(np.float32))
  state = train.init_state(model, tx, jax.random.key(0), (4, 4, 1),
                           distill=config.distill, num_classes=C)
  fn = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=lambda s: 0.1,
      teacher=fake_cache_teacher(), distill=config.distill))
  logged, quiet = (jax.device_get(fn(state, batch, None, log))
                   for log in (True, False))
  without_key = lambda s: s.replace(rng=None)
  jax.tree.map(np.testing.assert_array_equal, without_key(logged[0]),
               without_key(quiet[0]))
  norms = [k for k in train.LOG_STEP_MEASUREMENTS if k in logged[1]]
  assert norms == ['grad_norm', 'param_norm', 'update_norm']
  for key in norms:
    assert quiet[1][key] == 0 and logged[1][key] > 0, key
  np.testing.assert_allclose(logged[1]['param_norm'],
                             optax.tree.norm(logged[0].params), rtol=1e-6)
  for key in set(logged[1]) - set(norms):
    np.testing.assert_array_equal(logged[1][key], quiet[1][key], key)


TINY_TEACHER = config_lib.model_config('mlp', hidden=(32,), dropout=0.0)
TINY_STUDENT = config_lib.model_config('mlp', hidden=(8,), dropout=0.0)


def tiny_config(arg, data_arg):
  config = load_config('cifar100_logit_methods',
                       f'runlocal,num_train_steps=2,{arg},{data_arg}')
  config.model = (TINY_TEACHER if config.role == 'teacher' else TINY_STUDENT)
  for t in config.teachers:
    t.model = TINY_TEACHER
  return config


def mock_cifar100(data_dir: str, num_examples: int = 24):
  """CIFAR-100's dataset_info, so that tfds.testing.mock_data serves it."""
  builder = tfds.builder('cifar100', data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0)
      for s in ('train', 'test')]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  return tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir)


@pytest.mark.extended  # Ten runs through train_and_evaluate.
def test_every_cifar100_logit_method_runs_in_runlocal_form(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  data_arg = f'data_dir={data_dir}'
  with mock_cifar100(data_dir):
    teacher_dir = tmp_path / 'teacher'
    train.train_and_evaluate(tiny_config('role=teacher', data_arg),
                             str(teacher_dir))
    for method in ('kd', 'dkd', 'dist', 'kd_ls', 'dkd_ls', 'nkd', 'wttm',
                   'mlkd', 'ctkd'):
      config = tiny_config(f'method={method},teacher_workdir={teacher_dir}',
                           data_arg)
      workdir = tmp_path / method
      summary = train.train_and_evaluate(config, str(workdir))
      test = summary['eval']['test']
      assert np.isfinite(test['loss']) and 0 <= test['agreement'] <= 1
  # CTKD's temperature is checkpointed with the training state...
  model = models.get_model(TINY_STUDENT, 100)
  abstract = jax.eval_shape(functools.partial(
      train.init_state, model, train.make_optimizer(config, 2)[0],
      image_shape=(32, 32, 3),
      distill=config.distill, num_classes=100), jax.random.key(0))
  mngr = checkpointing.manager(str(workdir), 2)
  state, _ = checkpointing.restore(mngr, abstract)
  mngr.close()
  raw = float(state.temperature_params['raw'])
  assert np.isfinite(raw) and raw != 1.0  # Trained away from its init.
  # ...and left out of the model a later run restores or counts.
  variables, _ = checkpointing.restore_model(
      str(workdir), {'params': abstract.params,
                     'batch_stats': abstract.batch_stats})
  assert summary['num_params'] == models.param_count(variables['params'])


def image_teacher(num_classes=C, seed=0):
  """A teacher that runs on the images it is given (a fixed linear map)."""
  weights = jnp.asarray(np.random.default_rng(seed).normal(
      size=(16, num_classes)), jnp.float32)

  def forward(variables, batch):
    del variables
    return (batch['image'].reshape(batch['image'].shape[0], -1) @ weights)[
        None]
  return teachers.Teacher(variables=None, forward=forward, names=('t',),
                          weights=(1.0,), fingerprint='test')


STRONG = dict(augment='rand_augment', num_ops=2,
              soft=dict(method='mlkd', instance_weight=0.9, batch_weight=0.0,
                        class_weight=0.0), soft_weight=1.0, hard_weight=0.1)


@pytest.mark.slow  # Two steps with RandAugment views.
def test_the_strong_view_adds_its_own_terms_on_its_own_images():
  config = load_config('mnist5k_distill', '')
  config.distill.update(soft=dict(method='mlkd', instance_weight=0.45,
                                  batch_weight=0.45, class_weight=0.45),
                        alpha=0.0, soft_weight=1.0, hard_weight=0.1,
                        strong_view=STRONG)
  objective.validate(config)
  model = models.get_model(dict(name='mlp', hidden=(16,), dropout=0.0), C)
  tx = optax.sgd(0.05)
  rng = np.random.default_rng(6)
  batch = dict(image=rng.normal(size=(B, 4, 4, 1)).astype(np.float32),
               image_strong=rng.normal(size=(B, 4, 4, 1)).astype(np.float32),
               label=rng.integers(0, C, B).astype(np.int32),
               mask=np.arange(B) < 13)
  teacher = image_teacher()
  state = train.init_state(model, tx, jax.random.key(0), (4, 4, 1),
                           distill=config.distill, num_classes=C)
  _, m = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=lambda s: 0.1,
      teacher=teacher, distill=config.distill, steps_per_epoch=2))(
          state, batch, None)
  variables = {'params': state.params, 'batch_stats': state.batch_stats}
  strong_student = model.apply(variables, batch['image_strong'])
  strong_teacher = teacher.forward(None, {'image': batch['image_strong']})[0]
  want = losses.mlkd_loss(strong_student, strong_teacher,
                          instance_weight=0.9, batch_weight=0.0,
                          class_weight=0.0, where=batch['mask'])
  np.testing.assert_allclose(m['loss_strong_soft'], want, rtol=1e-5)
  hard = losses.cross_entropy(strong_student, batch['label'])
  np.testing.assert_allclose(
      m['loss_strong_hard'], np.mean(np.asarray(hard)[:13]), rtol=1e-5)
  np.testing.assert_allclose(
      m['loss_total'], m['loss_soft'] + 0.1 * m['loss_hard']
      + m['loss_strong_soft'] + 0.1 * m['loss_strong_hard'], rtol=1e-5)
  # Without it, the same step trains on the weak view alone.
  config.distill.strong_view = {}
  _, plain = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=lambda s: 0.1,
      teacher=teacher, distill=config.distill, steps_per_epoch=2))(
          state, {k: v for k, v in batch.items() if k != 'image_strong'},
          None)
  assert 'loss_strong_soft' not in plain
  assert plain['loss_soft'] == m['loss_soft']


@pytest.mark.parametrize('arg, match', [
    ('distill.teacher_source="cache",distill.cache_dir="x"', 'by example'),
    ('mixup_alpha=0.2', 'mixup_alpha=0'),
    ('distill.ctkd="global"', 'ctkd="none"'),
    ('distill.strong_view.augment="cutmix"', 'augment=.cutmix'),
    ('distill.strong_view.num_ops=-1', 'num_ops=-1'),
    ('distill.strong_view.soft_weight=-1.0', 'soft_weight=-1.0'),
    ('distill.strong_view.soft="nope"', 'strong_view.soft.method'),
])
def test_bad_strong_views_are_named(arg, match):
  config = load_config('mnist5k_distill', '')
  config.distill.strong_view = dict(STRONG)
  for part in arg.split(','):
    key, value = part.split('=', 1)
    node, *path = key.split('.')
    if node == 'distill' and path[0] == 'strong_view':
      config.distill.strong_view[path[1]] = eval(value)  # pylint: disable=eval-used
    else:
      target = config
      for p in [node, *path][:-1]:
        target = target[p]
      target[[node, *path][-1]] = eval(value)  # pylint: disable=eval-used
  with pytest.raises(ValueError, match=match):
    objective.validate(config)
