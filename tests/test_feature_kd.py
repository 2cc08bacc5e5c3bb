"""Feature distillation and DeiT's hard-label distillation in training.

One tiny convolutional teacher run on digits is shared by the module; steps
are jitted `train.train_step` calls where a whole run is not the point.
"""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow_datasets as tfds
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import models
from kd_jax import objective
from kd_jax import teachers
from kd_jax import train
from kd_jax.config_lib import load_config

# Slow: module fixtures train teachers and export their logits.
pytestmark = [pytest.mark.xdist_group('feature_kd'), pytest.mark.slow]

TEACHER = config_lib.model_config('cnn', features=(8, 8, 8), kernel_size=3,
                                  dense=16)
STUDENT = config_lib.model_config('cnn', features=(4, 4, 4), kernel_size=3,
                                  dense=8)
STAGES = ('stage1', 'stage2', 'stage3')
# Every method once, at weights that keep the sum of comparable size.
ALL_TERMS = (
    dict(method='fitnet', student='stage2', teacher='stage2', weight=1.0),
    dict(method='at', student=STAGES, teacher=STAGES, weight=10.0),
    dict(method='sp', student='stage3', teacher='stage3', weight=10.0),
    dict(method='cc', student='embedding', teacher='embedding', weight=0.1,
         dim=8),
    dict(method='vid', student=('stage1', 'stage3'),
         teacher=('stage1', 'stage3'), weight=0.1),
    dict(method='rkd', student='embedding', teacher='embedding', weight=0.1),
    dict(method='pkt', student='embedding', teacher='embedding', weight=10.0),
    dict(method='crd', student='embedding', teacher='embedding', weight=0.1,
         dim=8, num_negatives=64),
    dict(method='ofd', student=('preact2', 'preact3'),
         teacher=('preact2', 'preact3'), weight=0.01),
    dict(method='reviewkd', student=(*STAGES, 'embedding'),
         teacher=('preact1', 'preact2', 'preact3', 'embedding'), weight=1.0),
)
# Batch-level losses, connectors with BN (one of them over every pair at
# once), batch statistics (OFD's margin) and CRD's banks: what sharding the
# batch over devices could get wrong.
TERMS = (ALL_TERMS[0], ALL_TERMS[2], ALL_TERMS[7], ALL_TERMS[8],
         ALL_TERMS[9])
IMAGE_SHAPE = (8, 8, 1)


def base_config(**fields):
  c = config_lib.default_config()
  c.dataset = 'digits'
  c.train_split = 'train[:96]'
  c.eval_splits = ('test[:32]',)
  c.batch_size = 16
  c.eval_batch_size = 32
  c.learning_rate = 0.05
  c.schedule = 'constant'
  c.num_train_steps = 4
  c.log_every_steps = 2
  c.eval_every_steps = 4
  c.checkpoint_every_steps = 2
  c.keep_checkpoints = 5
  c.shuffle_buffer = 96
  c.model = STUDENT
  for key, value in fields.items():
    node, *path = key.split('__')
    target = c
    for part in [node, *path][:-1]:
      target = target[part]
    target[[node, *path][-1]] = value
  return c


def distill_config(teacher_dir, terms, **fields):
  c = base_config(**fields)
  c.distill.teacher_source = 'online'
  c.distill.soft_weight = 0.0
  c.distill.hard_weight = 1.0
  c.distill.features = tuple(terms)
  c.teachers = [config_lib.teacher_config(TEACHER, teacher_dir)]
  return c


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('teacher'))
  train.train_and_evaluate(base_config(model=TEACHER), workdir)
  return workdir


@pytest.fixture(scope='session')
def all_methods_run(teacher_dir, tmp_path_factory):
  """(config, workdir, summary) of a run with every method at once."""
  workdir = str(tmp_path_factory.mktemp('all_methods'))
  config = distill_config(teacher_dir, ALL_TERMS)
  return config, workdir, train.train_and_evaluate(config, workdir)


def abstract_state(config, num_train_examples=96):
  model = models.get_model(config.model, 10)
  shapes = objective.check_feature_shapes(config, 10, IMAGE_SHAPE,
                                          num_train_examples)
  return jax.eval_shape(functools.partial(
      train.init_state, model, train.make_optimizer(config, 4)[0],
      image_shape=IMAGE_SHAPE, distill=config.distill, num_classes=10,
      teacher_feature_shapes=shapes and shapes[1],
      num_train_examples=num_train_examples), jax.random.key(config.seed))


def restore_state(config, workdir):
  with checkpointing.manager(workdir, 5) as mngr:
    state, _ = checkpointing.restore(mngr, abstract_state(config), workdir)
  return jax.device_get(state)


# --- Refusals, before anything trains ---------------------------------------


def test_feature_name_the_model_lacks_is_refused_with_the_valid_names():
  config = distill_config('unused', [dict(method='at', student='stage9',
                                          teacher='stage1', weight=1.0)])
  with pytest.raises(ValueError, match=r"features\[0\]\.student.*'stage9'.*"
                     r"'embedding', 'pooled', 'preact1'"):
    objective.check_feature_shapes(config, 10, IMAGE_SHAPE)
  config.distill.features = (dict(method='pkt', student='embedding',
                                  teacher='logits', weight=1.0),)
  with pytest.raises(ValueError, match=r'features\[0\]\.teacher.*stage3'):
    objective.check_feature_shapes(config, 10, IMAGE_SHAPE)


@pytest.mark.parametrize('source, num_teachers', [('online', 2),
                                                   ('cache', 1)])
def test_features_without_one_online_teacher_are_refused(source,
                                                         num_teachers):
  config = distill_config('unused', [dict(
      method='pkt', student='embedding', teacher='embedding', weight=1.0)])
  config.distill.teacher_source = source
  config.teachers = config.teachers * num_teachers
  with pytest.raises(ValueError, match=f'teacher_source={source!r}, '
                     f'{num_teachers} teachers.*one entry in config.teachers'):
    objective.validate_features(config)


def test_shapes_no_connector_maps_are_refused():
  # A [B, 16] embedding cannot be regressed onto a [B, 4, 4, 8] map.
  config = distill_config('unused', [dict(
      method='fitnet', student='embedding', teacher='stage1', weight=1.0)])
  with pytest.raises(ValueError, match=r'fitnet.*embedding \(8,\) -> '
                     r'teacher stage1 \(4, 4, 8\)'):
    objective.check_feature_shapes(config, 10, IMAGE_SHAPE)


@pytest.mark.parametrize('term, match', [
    (dict(method='nst', student='stage1', teacher='stage1', weight=1.0),
     'choose one of'),
    (dict(method='at', student=('stage1', 'stage2'), teacher='stage1',
          weight=1.0), 'pairs 2 student features'),
    (dict(method='rkd', student='embedding', teacher='embedding', weight=1.0,
          dim=3), "does not take; its options are \\['angle_weight'"),
    (dict(method='pkt', student='embedding', teacher='embedding'),
     "lacks \\['weight'\\]"),
    (dict(method='ofd', student='preact1', teacher='preact1', weight=1.0,
          kernel_size=2), 'kernel_size=2 must be a positive odd'),
    (dict(method='reviewkd', student='stage1', teacher='stage1', weight=1.0,
          levels=(4, 0)), r'levels=\(4, 0\) must be a tuple of positive'),
    (dict(method='at', student='stage1', teacher='stage1', weight=1.0,
          warmup_epochs=-1), 'warmup_epochs=-1 must be a non-negative'),
])
def test_malformed_terms_are_named(term, match):
  config = distill_config('unused', [term])
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


def test_a_terms_warmup_scales_its_weight_by_the_epoch():
  term = dict(method='reviewkd', student=(*STAGES, 'embedding'),
              teacher=('preact1', 'preact2', 'preact3', 'embedding'),
              weight=2.0)
  config = distill_config('unused', [term])
  student_shapes, teacher_shapes = objective.check_feature_shapes(
      config, 10, IMAGE_SHAPE)
  rng = np.random.default_rng(0)
  draw = lambda shapes: {k: jnp.asarray(rng.normal(size=v.shape), jnp.float32)
                         for k, v in shapes.items()}
  student, teacher = draw(student_shapes), draw(teacher_shapes)
  batch = dict(mask=jnp.ones((2,), bool))

  def total(warmup, epoch):
    terms = objective.feature_terms(
        distill_config('unused', [dict(term, warmup_epochs=warmup)]).distill)
    state = objective.init_feature_state(
        config.distill, student_shapes, teacher_shapes, None,
        jax.random.key(0))
    out = objective.feature_loss(
        terms, state['connector_params'], state['connector_batch_stats'],
        student, teacher, batch, epoch=epoch)
    return float(out[0]), float(out[1]['feature_reviewkd'])

  full, value = total(0.0, None)
  assert full == 2.0 * value > 0
  # mdistiller's min(epoch / warmup, 1), its epochs counted from 1.
  np.testing.assert_allclose(total(20.0, jnp.asarray(3.5))[0],
                             full * 4 / 20, rtol=1e-6)
  assert total(20.0, jnp.asarray(25.0))[0] == full


def test_deit_hard_without_a_distillation_token_is_refused_with_the_fix():
  config = load_config('deit_mnist5k', 'runlocal,distill.soft=deit_hard')
  with pytest.raises(ValueError, match='distill_token=True'):
    train.validate_config(config)


# --- The step ---------------------------------------------------------------


def random_batch(seed, size=16, num_examples=96):
  rng = np.random.default_rng(seed)
  return dict(
      image=rng.normal(size=(size, *IMAGE_SHAPE)).astype(np.float32),
      label=rng.integers(0, 10, size).astype(np.int32),
      index=rng.permutation(num_examples)[:size].astype(np.int32),
      mask=np.ones(size, bool))


@pytest.mark.slow
def test_feature_step_on_one_device_equals_eight(teacher_dir):
  config = distill_config(teacher_dir, TERMS)
  model = models.get_model(config.model, 10)
  tx, schedule = train.make_optimizer(config, 4)
  teacher = teachers.load_online(config.teachers, 10, IMAGE_SHAPE)
  shapes = objective.check_feature_shapes(config, 10, IMAGE_SHAPE, 96)
  batches = [random_batch(s) for s in range(2)]
  results = []
  for devices in (jax.devices()[:1], jax.devices()[:8]):
    mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,))
    replicated = NamedSharding(mesh, P())
    init = functools.partial(
        train.init_state, model, tx, image_shape=IMAGE_SHAPE,
        distill=config.distill, num_classes=10,
        teacher_feature_shapes=shapes[1], num_train_examples=96)
    # The layout train_and_evaluate uses: CRD's banks split by rows.
    layout = train.state_shardings(jax.eval_shape(init, jax.random.key(0)),
                                   mesh, config.distill)
    state = jax.jit(init, out_shardings=layout)(jax.random.key(0))
    step = jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, schedule=schedule,
        teacher=teacher, distill=config.distill, steps_per_epoch=6),
                   out_shardings=(layout, replicated))
    variables = jax.device_put(teacher.variables, replicated)
    for batch in batches:
      sharded = jax.device_put(batch, NamedSharding(mesh, P('data')))
      state, measurements = step(state, sharded, variables)
    bank = state.example_state['term2']['student_memory']
    if len(devices) == 8:  # 96 rows of dim 8 over 8 devices: 12 each.
      assert bank.sharding.spec == P('data')
      assert {s.data.shape for s in bank.addressable_shards} == {(12, 8)}
    results.append(jax.device_get((state, measurements)))
  (state1, m1), (state8, m8) = results
  assert all(np.isfinite(v) for v in m1.values())
  # Each term reaches the loss once, with its weight.
  np.testing.assert_allclose(
      m1['loss_total'], m1['loss_hard'] + sum(
          t['weight'] * m1[f'loss_feature_{t["method"]}'] for t in TERMS),
      rtol=1e-5)
  # The first step fixed CRD's normalizers; the banks moved.
  assert np.all(state1.example_state['term2']['normalizers'] > 0)
  # Equal up to the order of float sums.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=2e-4, atol=1e-5)
  for key in ('params', 'batch_stats', 'connector_params',
              'connector_batch_stats', 'example_state'):
    jax.tree.map(close, getattr(state1, key), getattr(state8, key))
  for key in m1:
    np.testing.assert_allclose(m1[key], m8[key], rtol=2e-4, atol=1e-5,
                               err_msg=key)


# --- Whole runs -------------------------------------------------------------


def test_every_method_trains_end_to_end_from_a_config(all_methods_run):
  _, _, summary = all_methods_run
  test = summary['eval']['test[:32]']
  assert np.isfinite(test['loss']) and 0 <= test['accuracy'] <= 1


@pytest.mark.slow  # Uses the ten runs of every method.
def test_connectors_are_kept_out_of_the_exported_student(all_methods_run):
  config, workdir, summary = all_methods_run
  abstract = abstract_state(config)
  student = models.get_model(config.model, 10)
  student_params = jax.eval_shape(
      lambda: student.init(jax.random.key(0),
                           jnp.zeros((1, *IMAGE_SHAPE))))['params']
  assert summary['num_params'] == models.param_count(student_params)
  assert summary['num_connector_params'] == models.param_count(
      abstract.connector_params) > 0
  # What a later run (as a teacher, or an export) restores is the student.
  variables, _ = checkpointing.restore_model(
      workdir, {'params': abstract.params,
                'batch_stats': abstract.batch_stats})
  assert models.param_count(variables['params']) == summary['num_params']
  # The connectors and CRD's banks are in the checkpoint, for resuming.
  state = restore_state(config, workdir)
  assert models.param_count(state.connector_params) == (
      summary['num_connector_params'])
  bank = state.example_state['term7']['student_memory']
  np.testing.assert_allclose(np.linalg.norm(bank[:96], axis=1)[
      state.example_state['term7']['labels'] >= 0], 1.0, rtol=1e-5)


@pytest.mark.slow
def test_resumed_crd_run_equals_the_uninterrupted_one(teacher_dir, tmp_path):
  config = distill_config(teacher_dir, [ALL_TERMS[7]])
  whole = str(tmp_path / 'whole')
  summary = train.train_and_evaluate(config, whole)
  # Interrupted after the checkpoint at step 2: a copy without what followed.
  resumed = str(tmp_path / 'resumed')
  shutil.copytree(whole, resumed)
  shutil.rmtree(os.path.join(checkpointing.checkpoint_dir(resumed), '4'))
  os.remove(os.path.join(resumed, 'summary.json'))
  assert checkpointing.latest_step(resumed) == 2
  summary_resumed = train.train_and_evaluate(config, resumed)
  assert summary_resumed['eval'] == summary['eval']
  a, b = restore_state(config, whole), restore_state(config, resumed)
  assert int(a.step) == int(b.step) == 4
  for key in ('params', 'connector_params', 'example_state', 'opt_state'):
    jax.tree.map(np.testing.assert_array_equal, getattr(a, key),
                 getattr(b, key))


def test_only_crd_banks_are_split_over_data_and_only_where_rows_divide():
  config = distill_config('unused', TERMS)
  shapes = objective.check_feature_shapes(config, 10, IMAGE_SHAPE, 96)
  model = models.get_model(config.model, 10)
  tx, _ = train.make_optimizer(config, 4)
  mesh = jax.make_mesh((8,), ('data',), devices=jax.devices()[:8],
                       axis_types=(jax.sharding.AxisType.Auto,))
  for rows, split in ((96, True), (90, False)):
    abstract = jax.eval_shape(functools.partial(
        train.init_state, model, tx, image_shape=IMAGE_SHAPE,
        distill=config.distill, num_classes=10,
        teacher_feature_shapes=shapes[1], num_train_examples=rows),
                              jax.random.key(0))
    layout = train.state_shardings(abstract, mesh, config.distill)
    crd = layout.example_state['term2']
    for name in ('student_memory', 'teacher_memory', 'labels'):
      assert crd[name].spec == (P('data') if split else P()), (rows, name)
    assert crd['normalizers'].spec == P()
    others = layout.replace(example_state={})
    assert all(s.spec == P() for s in jax.tree.leaves(others))


@pytest.mark.extended  # A ViT run end to end.
def test_deit_hard_trains_end_to_end(teacher_dir, tmp_path):
  config = load_config(
      'deit_mnist5k', 'runlocal,distill_token=True,distill.soft=deit_hard,'
      'num_train_steps=3,checkpoint_every_steps=3,eval_every_steps=3')
  assert (config.distill.soft_weight, config.distill.alpha) == (None, 0.5)
  base = base_config()
  for field in ('dataset', 'train_split', 'eval_splits', 'batch_size',
                'eval_batch_size'):
    config[field] = base[field]
  config.model.patch_size = 4
  config.teachers = [config_lib.teacher_config(TEACHER, teacher_dir)]
  summary = train.train_and_evaluate(config, str(tmp_path))
  test = summary['eval']['test[:32]']
  assert np.isfinite(test['loss']) and 0 <= test['agreement'] <= 1


def test_deit_hard_loss_is_half_labels_half_teacher_argmax():
  rng = np.random.default_rng(0)
  logits, dist_logits = (jnp.asarray(rng.normal(size=(6, 5)), jnp.float32)
                         for _ in range(2))
  teacher = jnp.asarray(rng.normal(size=(1, 6, 5)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 5, 6))
  mask = jnp.asarray([True] * 5 + [False])
  d = config_lib.default_config().distill
  d.update(teacher_source='online', soft='deit_hard', alpha=0.5)
  targets = objective.teacher_targets(teacher, {}, d, (1.0,))
  total, terms = objective.loss(logits, targets, labels, mask, d,
                                distillation_logits=dist_logits)

  def cross_entropy(z, y):
    z = np.asarray(z, np.float64)
    log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
    return -log_p[np.arange(len(y)), np.asarray(y)]

  argmax = np.asarray(teacher[0]).argmax(-1)
  want = (0.5 * cross_entropy(logits, labels)[:5].mean()
          + 0.5 * cross_entropy(dist_logits, argmax)[:5].mean())
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  np.testing.assert_allclose(float(terms['soft']),
                             cross_entropy(dist_logits, argmax)[:5].mean(),
                             rtol=1e-5)


# --- Every configs/cifar100_feature_methods.py method -------------------------


def mock_cifar100(data_dir: str, num_examples: int = 24):
  """CIFAR-100's dataset_info, so that tfds.testing.mock_data serves it."""
  builder = tfds.builder('cifar100', data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[num_examples], num_bytes=0)
      for s in ('train', 'test')]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)
  return tfds.testing.mock_data(num_examples=num_examples, data_dir=data_dir)


@pytest.mark.extended  # Twelve tiny runs through train_and_evaluate.
def test_every_cifar100_feature_method_runs_in_runlocal_form(tmp_path):
  data_dir = str(tmp_path / 'tfds')
  data_arg = f'data_dir={data_dir}'
  teacher = config_lib.model_config('cnn', features=(8, 8, 8),
                                    kernel_size=3, dense=16)

  def tiny(arg):
    config = load_config('cifar100_feature_methods',
                         f'runlocal,num_train_steps=2,{arg},{data_arg}')
    config.model = teacher if config.role == 'teacher' else STUDENT
    for t in config.teachers:
      t.model = teacher
    return config

  with mock_cifar100(data_dir):
    teacher_workdir = str(tmp_path / 'teacher')
    train.train_and_evaluate(tiny('role=teacher'), teacher_workdir)
    for method in ('fitnet', 'at', 'sp', 'cc', 'vid', 'rkd', 'pkt', 'crd',
                   'crd_kd', 'ofd', 'reviewkd'):
      config = tiny(f'method={method},teacher_workdir={teacher_workdir}')
      summary = train.train_and_evaluate(config, str(tmp_path / method))
      assert np.isfinite(summary['eval']['test']['loss']), method
