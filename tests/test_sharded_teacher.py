"""Teachers too big for one device: variables split over the devices
(FSDP-style, over 'data' or over the 'model' axis of a 2-D mesh) and a
bfloat16 teacher forward, on 8 simulated devices; what summary.json says of
each teacher."""

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


def two_steps(config, teacher, mesh, variables):
  """The student's params and measurements after two steps on `mesh`, its
  batches split over every mesh axis."""
  model = models.get_model(config.model, 10)
  tx, schedule = train.make_optimizer(config, 10)
  replicated = NamedSharding(mesh, P())
  init = jax.jit(functools.partial(train.init_state, model, tx,
                                   image_shape=IMAGE_SHAPE,
                                   distill=config.distill, num_classes=10),
                 out_shardings=replicated)
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=schedule,
      teacher=teacher, distill=config.distill),
                 out_shardings=(replicated, replicated))
  batch = jax.device_put(random_batch(),
                         NamedSharding(mesh, P(tuple(mesh.axis_names))))
  state = init(jax.random.key(0))
  for _ in range(2):
    state, measurements = step(state, batch, variables, True)
  return jax.device_get((state.params, measurements))


def assert_same_step(a, b):
  # Equal up to the order of float sums in the split matmuls.
  close = functools.partial(np.testing.assert_allclose, rtol=2e-4, atol=1e-5)
  (params_a, m_a), (params_b, m_b) = a, b
  jax.tree.map(close, params_a, params_b)
  for key in m_a:
    close(m_a[key], m_b[key], err_msg=key)
  assert m_a['agreement'] > 0


def held_fraction(variables):
  """{path: fraction of each kernel one device holds}."""
  return {jax.tree_util.keystr(path): np.prod(
      leaf.addressable_shards[0].data.shape) / np.prod(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(variables)
          if path[-1].key == 'kernel'}


@pytest.fixture(scope='module')
def replicated_step(mnist5k_teacher_dir):
  config = distill_config(mnist5k_teacher_dir)
  teacher = teachers.load_online(config.teachers, 10, IMAGE_SHAPE)
  mesh = mesh_of(8)
  variables = jax.device_put(teacher.variables, NamedSharding(mesh, P()))
  return config, teacher, two_steps(config, teacher, mesh, variables)


# The steps compared here compile for seconds each: slow set. The default
# set keeps the layout rules and refusals below.
@pytest.mark.slow
def test_sharded_teacher_step_equals_the_replicated_one(replicated_step):
  config, teacher, expected = replicated_step
  mesh = mesh_of(8)
  variables = jax.device_put(teacher.variables,
                             teachers.teacher_shardings(teacher.variables,
                                                        mesh))
  # Every kernel is split: each device holds 1/8 of it.
  assert set(held_fraction(variables).values()) == {1 / 8}
  assert_same_step(expected, two_steps(config, teacher, mesh, variables))


@pytest.mark.slow
@pytest.mark.parametrize('model_devices', [2, 4])
def test_teacher_split_over_model_axis_of_2d_mesh_equals_replicated(
    replicated_step, mnist5k_teacher_dir, model_devices):
  """A (8 / m, m) ('data', 'model') mesh: the teacher restored straight into
  its split over 'model' (each device holds 1/m of it), batches split over
  all 8 devices."""
  config, _, expected = replicated_step
  mesh = train.make_mesh(jax.devices(), model_devices)
  assert dict(mesh.shape) == {'data': 8 // model_devices,
                              'model': model_devices}
  teacher = teachers.load_online(config.teachers, 10, IMAGE_SHAPE, mesh=mesh)
  assert set(held_fraction(teacher.variables).values()) == {
      1 / model_devices}
  for leaf in jax.tree.leaves(teacher.variables):  # Never over 'data'.
    assert set(leaf.sharding.spec) <= {None, 'model'}, leaf.sharding
  assert_same_step(expected, two_steps(config, teacher, mesh,
                                       teacher.variables))


def test_mesh_model_must_divide_the_devices():
  with pytest.raises(ValueError, match=r'config.mesh_model=3 .*divisor of 8'):
    train.make_mesh(jax.devices(), 3)


def test_teacher_layout_splits_the_largest_axis_that_divides():
  mesh = mesh_of(8)
  variables = dict(kernel=jnp.zeros((1, 12, 1200)),  # stacked ensemble axis
                   bias=jnp.zeros((1, 1200)), scale=jnp.zeros((5,)),
                   step=jnp.zeros(()))
  layout = teachers.teacher_shardings(variables, mesh)
  assert layout['kernel'].spec == P(None, None, 'data')
  assert layout['bias'].spec == P(None, 'data')
  assert layout['scale'].spec == P() and layout['step'].spec == P()
  assert teachers.teacher_shardings(variables, mesh_of(1))['kernel'].spec == P()
  # A 2-D mesh splits over 'model' (4 devices here: 12 divides), or over
  # both axes when 'model' has one device.
  layout = teachers.teacher_shardings(variables, train.make_mesh(
      jax.devices(), 4))
  assert layout['kernel'].spec == P(None, None, 'model')
  assert layout['scale'].spec == P()
  layout = teachers.teacher_shardings(variables, train.make_mesh(
      jax.devices(), 1))
  assert layout['kernel'].spec == P(None, None, ('data', 'model'))


@pytest.mark.slow
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


@pytest.mark.slow
def test_a_run_with_a_sharded_bfloat16_teacher_trains(mnist5k_teacher_dir,
                                                      tmp_path):
  config = distill_config(mnist5k_teacher_dir,
                          'distill.shard_teacher=True,mesh_model=2,'
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
