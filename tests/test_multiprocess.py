"""Multi-process data parallelism: 2 processes x 2 CPU devices train exactly
like 1 process x 4 devices.

The processes meet through `jax.distributed.initialize` and run their
collectives over gloo, launched as `python -m kd_jax.main` with
--coordinator_address/--num_processes/--process_id/--cpu_collectives=gloo.
Each process reads and shuffles its own share of the train split, so a
process count sees the same examples at every step only when one step's batch
is the whole train set: the runs here train on a 1,000-example slice of the
train split and a global batch of 1,000 (the loss is a mean, so the order
inside a batch only changes float rounding).
"""

import glob
import json
import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax import export_logits
from kd_jax import models
from kd_jax import teachers
from kd_jax import train
from kd_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Whole-train-set batches: see the module docstring.
FULL_BATCH = ('runlocal,train_split=train[:1000],batch_size=1000,'
              'eval_batch_size=500,num_train_steps=3,eval_every_steps=3')
TIMEOUT_S = 300

pytestmark = pytest.mark.slow  # Each test starts two JAX processes.


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _run_two_processes(config_name: str, arg: str, workdir: str,
                       module: str = 'kd_jax.main',
                       out_flag: str = '--workdir') -> None:
  """Runs `python -m module --config=configs/<config_name>.py:arg` (default:
  trains into `workdir`) on 2 processes x 2 CPU devices."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  address = f'localhost:{_free_port()}'
  # Logs go to files: a full pipe would block one process mid-collective.
  logs = [open(f'{workdir}.process{i}.log', 'w+') for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, '-m', module,
       f'--config={REPO}/configs/{config_name}.py:{arg}',
       f'{out_flag}={workdir}', f'--coordinator_address={address}',
       '--num_processes=2', f'--process_id={i}', '--cpu_collectives=gloo'],
      cwd=REPO, env=env, stdout=logs[i], stderr=subprocess.STDOUT)
           for i in range(2)]
  try:
    for p in procs:
      p.wait(timeout=TIMEOUT_S)
  finally:
    for p in procs:
      if p.poll() is None:
        p.kill()
        p.wait()
  for i, (p, log) in enumerate(zip(procs, logs)):
    log.seek(0)
    out = log.read()
    log.close()
    assert p.returncode == 0, (
        f'process {i} exited {p.returncode}:\n{out[-4000:]}')


def _final_params(workdir: str, config) -> dict:
  model = models.get_model(config.model, num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32)))
  # Checkpoints keep the saving mesh; restore onto this process's device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      {'params': abstract['params'],
       'batch_stats': abstract.get('batch_stats', {})})
  variables, step = checkpointing.restore_model(workdir, abstract)
  assert step == config.num_train_steps
  return jax.device_get(variables['params'])


def _assert_same_run(one_dir: str, two_dir: str, config,
                     ignore=()) -> None:
  one = json.load(open(os.path.join(one_dir, 'summary.json')))
  two = json.load(open(os.path.join(two_dir, 'summary.json')))
  assert two['step'] == one['step'] == config.num_train_steps
  a, b = one['eval']['test'], two['eval']['test']
  assert set(a) == set(b)
  assert b['num_examples'] == a['num_examples'] == 1000
  assert b['errors'] == pytest.approx(a['errors'], abs=1)
  for k in set(a) - {'num_examples', 'errors'}:
    assert b[k] == pytest.approx(a[k], rel=1e-4, abs=1e-4), k
  p1 = _final_params(one_dir, config)
  p2 = _final_params(two_dir, config)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-4,
                                                       atol=1e-5), p1, p2)
  # Process 1 writes checkpoint shards only: one metrics file, one config.
  assert len(glob.glob(os.path.join(two_dir, 'events.out.tfevents.*'))) == 1
  configs = []
  for d in (one_dir, two_dir):
    c = json.load(open(os.path.join(d, 'config.json')))
    # The device layout is no difference between the runs.
    del c['mesh_model'], c['distill']['shard_teacher']
    configs.append({k: v for k, v in c.items() if k not in ignore})
  assert configs[0] == configs[1]


# The distillation test below runs the same multi-process student training
# with a teacher; this one, without, runs with the extended set.
@pytest.mark.extended
def test_two_processes_train_like_one_process_on_four_devices(tmp_path):
  config = load_config('mnist5k_student', FULL_BATCH)
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  # Also prepares mnist5k in this worker's TFDS_DATA_DIR for the subprocesses.
  train.train_and_evaluate(config, one_dir, devices=jax.devices()[:4])
  _run_two_processes('mnist5k_student', FULL_BATCH, two_dir)
  _assert_same_run(one_dir, two_dir, config)


def test_two_processes_distil_like_one_process_on_four_devices(tmp_path):
  """Two processes on a (2, 2) ('data', 'model') mesh, each holding half
  the teacher, train like one process with a replicated teacher (a
  replicated teacher on two processes is the supervised test's layout plus
  this test's teacher; tests/test_sharded_teacher.py checks sharded against
  replicated in one process)."""
  layout = ',distill.shard_teacher=True,mesh_model=2'
  teacher_dir = str(tmp_path / 'teacher')
  train.train_and_evaluate(load_config('mnist5k_teacher', 'runlocal'),
                           teacher_dir)
  arg = f'{FULL_BATCH},teacher_workdir={teacher_dir}'
  config = load_config('mnist5k_distill', arg)
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  _run_two_processes('mnist5k_distill', arg + layout, two_dir)
  one = train.train_and_evaluate(config, one_dir, devices=jax.devices()[:4])
  assert 'teacher_accuracy' in one['eval']['test']
  _assert_same_run(one_dir, two_dir, config)


@pytest.mark.extended  # Four processes, one after the other pair.
def test_two_processes_export_a_sharded_cache_each_then_loads_its_own(
    tmp_path):
  """Two processes export one shard each (their data shares); a two-process
  run then loads on each only its own shard and trains like one process
  on four devices from the one-process export."""
  teacher_dir = str(tmp_path / 'teacher')
  train.train_and_evaluate(load_config('mnist5k_teacher', 'runlocal'),
                           teacher_dir)
  arg = f'{FULL_BATCH},teacher_workdir={teacher_dir}'
  whole, sharded = str(tmp_path / 'whole'), str(tmp_path / 'sharded')
  export_logits.export(load_config('mnist5k_distill_cached', arg), whole,
                       write_csv=False)
  _run_two_processes('mnist5k_distill_cached', arg, sharded,
                     module='kd_jax.export_logits', out_flag='--out')
  for split in ('train[:1000]', 'test'):
    assert teachers.cache_shards(sharded, split) == [
        'shard-00000-of-00002', 'shard-00001-of-00002']
    _, whole_ids, whole_logits = teachers.read_cache_split(whole, split)
    _, ids, logits = teachers.read_cache_split(sharded, split)
    assert sorted(ids) == sorted(whole_ids)
    np.testing.assert_allclose(logits[np.argsort(ids)],
                               whole_logits[np.argsort(whole_ids)],
                               rtol=1e-5, atol=1e-5)
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  _run_two_processes('mnist5k_distill_cached', f'{arg},cache_dir={sharded}',
                     two_dir)
  config = load_config('mnist5k_distill_cached', f'{arg},cache_dir={whole}')
  train.train_and_evaluate(config, one_dir, devices=jax.devices()[:4])
  _assert_same_run(one_dir, two_dir, config, ignore=('distill',))


@pytest.mark.extended  # Two processes, then one.
def test_two_processes_train_an_lm_like_one_process_on_four_devices(
    tmp_path):
  """A language-model run (kd_jax.lm_train): each process reads its rows of
  every (seed, step) batch, so two processes x two devices train as one x
  four, up to float rounding."""
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  arg = 'runlocal,dataset="pydoc_topics",role=student'
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  config = load_config('shakespeare_char', arg)
  one = lm_train.train_and_evaluate(config, one_dir, devices=jax.devices()[:4])
  _run_two_processes('shakespeare_char', arg, two_dir)
  two = json.load(open(os.path.join(two_dir, 'summary.json')))
  assert two['step'] == one['step'] == config.num_train_steps
  for k, v in one['eval']['validation[:5%]'].items():
    assert two['eval']['validation[:5%]'][k] == pytest.approx(
        v, rel=1e-4, abs=1e-5), k
