"""Teachers too big for one device: variables split over 'data' (FSDP-style)
and a bfloat16 teacher forward, on 8 simulated devices; what summary.json
says of each teacher."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import config_lib
from kd_jax import models
from kd_jax import teachers
from kd_jax import train
from kd_jax.config_lib import load_config

IMAGE_SHAPE = (28, 28, 1)


def distill_config(teacher_dir, arg=''):
  return load_config('mnist5k_distill', ','.join(filter(None, [
      'runlocal', f'teacher_workdir={teacher_dir}', arg])))


def mesh_of(n):
  return jax.make_mesh((n,), ('data',), devices=jax.devices()[:n],
                       axis_types=(jax.sharding.AxisType.Auto,))


def random_batch(size=16):
  rng = np.random.default_rng(0)
  return dict(image=rng.normal(size=(size, *IMAGE_SHAPE)).astype(np.float32),
              label=rng.integers(0, 10, size).astype(np.int32),
              mask=np.ones(size, bool))


def test_sharded_teacher_step_equals_the_replicated_one(mnist5k_teacher_dir):
  config = distill_config(mnist5k_teacher_dir)
  teacher = teachers.load_online(config.teachers, 10, IMAGE_SHAPE)
  model = models.get_model(config.model, 10)
  tx, schedule = train.make_optimizer(config, 10)
  mesh = mesh_of(8)
  replicated = NamedSharding(mesh, P())
  init = jax.jit(functools.partial(train.init_state, model, tx,
                                   image_shape=IMAGE_SHAPE,
                                   distill=config.distill, num_classes=10),
                 out_shardings=replicated)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=schedule,
      teacher=teacher, distill=config.distill),
                 out_shardings=(replicated, replicated))
  batch = jax.device_put(random_batch(), NamedSharding(mesh, P('data')))
  layouts = dict(replicated=jax.tree.map(lambda _: replicated,
                                         teacher.variables),
                 sharded=train.teacher_shardings(teacher.variables, mesh))
  results = {}
  for name, layout in layouts.items():
    variables = jax.device_put(teacher.variables, layout)
    state = init(jax.random.key(0))
    for _ in range(2):
      state, measurements = step(state, batch, variables, True)
    results[name] = jax.device_get((state['params'], measurements))
    if name == 'sharded':
      # Every kernel is split: each device holds 1/8 of its rows.
      for path, leaf in jax.tree_util.tree_leaves_with_path(variables):
        if path[-1].key == 'kernel':
          shard = leaf.addressable_shards[0].data.shape
          assert np.prod(shard) * 8 == np.prod(leaf.shape), path
  (params_r, m_r), (params_s, m_s) = results['replicated'], results['sharded']
  # Equal up to the order of float sums in the split matmuls.
  close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-5)
  jax.tree.map(close, params_r, params_s)
  for key in m_r:
    close(m_r[key], m_s[key], err_msg=key)
  assert m_r['agreement'] > 0


def test_teacher_layout_splits_the_largest_axis_that_divides():
  mesh = mesh_of(8)
  variables = dict(kernel=jnp.zeros((1, 12, 1200)),  # stacked ensemble axis
                   bias=jnp.zeros((1, 1200)), scale=jnp.zeros((5,)),
                   step=jnp.zeros(()))
  layout = train.teacher_shardings(variables, mesh)
  assert layout['kernel'].spec == P(None, None, 'data')
  assert layout['bias'].spec == P(None, 'data')
  assert layout['scale'].spec == P() and layout['step'].spec == P()
  assert train.teacher_shardings(variables, mesh_of(1))['kernel'].spec == P()


def test_bfloat16_teacher_gives_float32_logits_close_to_float32(
    mnist5k_teacher_dir):
  config = distill_config(mnist5k_teacher_dir)
  batch = random_batch()
  logits = {}
  for dtype in (jnp.float32, jnp.bfloat16):
    teacher = teachers.load_online(config.teachers, 10, IMAGE_SHAPE,
                                   dtype=dtype)
    logits[dtype] = jax.jit(teacher.forward)(teacher.variables, batch)
  assert logits[jnp.bfloat16].dtype == jnp.float32
  assert not np.array_equal(logits[jnp.float32], logits[jnp.bfloat16])
  scale = float(jnp.abs(logits[jnp.float32]).max())
  np.testing.assert_allclose(logits[jnp.bfloat16], logits[jnp.float32],
                             atol=0.05 * scale)


def test_a_run_with_a_sharded_bfloat16_teacher_trains(mnist5k_teacher_dir,
                                                      tmp_path):
  config = distill_config(mnist5k_teacher_dir,
                          'distill.shard_teacher=True,'
                          'distill.teacher_dtype=bfloat16')
  summary = train.train_and_evaluate(config, str(tmp_path))
  for result in summary['eval'].values():
    assert np.isfinite(result['loss']) and 0 <= result['agreement'] <= 1


@pytest.mark.parametrize('arg, match', [
    ('distill.teacher_dtype=float16', 'teacher_dtype.*bfloat16'),
    ('distill.shard_teacher=True,distill.teacher_source=cache,'
     'distill.cache_dir=x', 'shard_teacher=False'),
])
def test_bad_teacher_layout_settings_are_named(arg, match):
  config = distill_config('unused', arg)
  with pytest.raises(ValueError, match=match):
    train.validate_config(config)


def test_summary_rows_name_each_teachers_origin():
  config = distill_config('/runs/t0')
  config.teachers = [config.teachers[0],
                     config_lib.teacher_config(None, '/runs/t1')]
  two = teachers.Teacher(variables=None, forward=None,
                         names=('teacher0', 'teacher1'), weights=(2.0, 1.0),
                         fingerprint='f')
  assert teachers.describe(config, two) == [
      dict(name='teacher0', weight=2.0, workdir='/runs/t0'),
      dict(name='teacher1', weight=1.0, workdir='/runs/t1')]
  config.distill.update(teacher_source='cache', cache_dir='/caches/c')
  one = teachers.Teacher(variables=None, forward=None, names=('cache',),
                         weights=(1.0,), fingerprint='f')
  assert teachers.describe(config, one) == [
      dict(name='cache', weight=1.0, cache_dir='/caches/c')]
  config.distill.teacher_source = 'specialists'
  assert teachers.describe(config, one) == [dict(name='cache', weight=1.0)]
  assert teachers.describe(config, None) == []
