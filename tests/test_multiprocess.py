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
import re
import shlex
import signal
import socket
import subprocess
import sys
import time

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


def _launch(commands: list[list[str]], log_prefix: str
            ) -> list[tuple[int, str]]:
  """Runs each of `commands` (one per process, arguments after `python`) on
  2 CPU devices at once; (exit code, output) of each. A process still running
  after TIMEOUT_S fails the test."""
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  # Logs go to files: a full pipe would block one process mid-collective.
  logs = [open(f'{log_prefix}.process{i}.log', 'w+')
          for i in range(len(commands))]
  # A session per process: a hung one is killed with the child that its
  # supervisor (kd_jax.main) runs.
  procs = [subprocess.Popen([sys.executable, *command], cwd=REPO, env=env,
                            stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
           for command, log in zip(commands, logs)]
  deadline = time.monotonic() + TIMEOUT_S
  try:
    for p in procs:
      p.wait(timeout=max(deadline - time.monotonic(), 1))
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  results = []
  for p, log in zip(procs, logs):
    log.seek(0)
    results.append((p.returncode, log.read()))
    log.close()
  return results


def _two_processes(config_name: str, arg: str, workdir: str,
                   module: str = 'kd_jax.main', out_flag: str = '--workdir'
                   ) -> list[tuple[int, str]]:
  """(exit code, output) of each of 2 processes x 2 CPU devices running
  `python -m module --config=configs/<config_name>.py:arg` (default: trains
  into `workdir`)."""
  address = f'localhost:{_free_port()}'
  return _launch([
      ['-m', module, f'--config={REPO}/configs/{config_name}.py:{arg}',
       f'{out_flag}={workdir}', f'--coordinator_address={address}',
       '--num_processes=2', f'--process_id={i}', '--cpu_collectives=gloo']
      for i in range(2)], workdir)


def _run_two_processes(config_name: str, arg: str, workdir: str,
                       module: str = 'kd_jax.main',
                       out_flag: str = '--workdir') -> None:
  """Runs `python -m module --config=configs/<config_name>.py:arg` (default:
  trains into `workdir`) on 2 processes x 2 CPU devices; both succeed."""
  results = _two_processes(config_name, arg, workdir, module, out_flag)
  for i, (code, out) in enumerate(results):
    assert code == 0, f'process {i} exited {code}:\n{out[-4000:]}'


def _final_params(workdir: str, config, step: int | None = None) -> dict:
  """The params of checkpoint `step` (default: the last step's)."""
  model = models.get_model(config.model, num_classes=10)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, 28, 28, 1), jnp.float32)))
  # Checkpoints keep the saving mesh; restore onto this process's device.
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device),
      {'params': abstract['params'],
       'batch_stats': abstract.get('batch_stats', {})})
  wanted = config.num_train_steps if step is None else step
  variables, step = checkpointing.restore_model(workdir, abstract, step)
  assert step == wanted
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


def _committed_steps(workdir: str, folder: str) -> list[int]:
  """Step folders under workdir/folder; fails on anything unfinished (an
  orbax *.orbax-checkpoint-tmp folder)."""
  path = os.path.join(workdir, folder)
  names = sorted(os.listdir(path)) if os.path.isdir(path) else []
  assert all(n.isdigit() for n in names), names
  return sorted(int(n) for n in names)


# Two processes, then two more from the command that the first two print.
@pytest.mark.extended
def test_two_processes_stop_a_diverged_run_alike_and_resume_it(tmp_path):
  """The audit's probe (learning rate 0.3, a checkpoint every step, so that
  the failure meets a save in flight) on two processes: both stop at the
  same step without hanging, with the same message as their last line,
  naming the same committed, finite checkpoint; the command that each
  prints resumes both from it and finishes."""
  workdir = str(tmp_path / 'run')
  arg = ('runlocal,num_train_steps=60,checkpoint_every_steps=1,'
         'log_every_steps=5,eval_every_steps=1000')
  config = load_config('mnist5k_student', arg)
  diverged = _two_processes('mnist5k_student', f'{arg},learning_rate=0.3',
                            workdir)
  messages, commands = [], []
  for i, (code, out) in enumerate(diverged):
    last = out.strip().splitlines()[-1]
    assert code == 1, f'process {i} exited {code}:\n{out[-4000:]}'
    assert 'Traceback' not in out, out[-4000:]
    assert last.startswith('kd_jax.main: training diverged: '), last
    message, command = last.split(' Command: ')
    command, _, note = command.partition(' (on every process')
    assert 'PROCESS_ID its index' in note, last
    messages.append(message)
    commands.append(shlex.split(command))
  # One command for both, each process filling in its own index.
  assert commands[0] == commands[1]
  commands = [[f'--process_id={i}' if c == '--process_id=$PROCESS_ID' else c
               for c in command] for i, command in enumerate(commands)]
  assert messages[0] == messages[1]
  healthy = int(re.search(r'The last healthy checkpoint, step (\d+), is kept',
                          messages[0]).group(1))
  assert _committed_steps(workdir, checkpointing.CHECKPOINT_DIR) == [healthy]
  moved = _committed_steps(workdir, checkpointing.DIVERGED_DIR)
  assert moved and min(moved) > healthy
  with checkpointing.manager(workdir, 2) as mngr:
    meta = mngr.restore(healthy, args=checkpointing.ocp.args.Composite(
        meta=checkpointing.ocp.args.JsonRestore()))['meta']
  assert meta['unhealthy'] is None
  params = _final_params(workdir, config, healthy)
  assert all(np.isfinite(p).all() for p in jax.tree.leaves(params))
  # Each process's command, at a fresh coordinator port.
  address = f'--coordinator_address=localhost:{_free_port()}'
  for i, command in enumerate(commands):
    assert command[:3] == ['python', '-m', 'kd_jax.main'], command
    assert f'--process_id={i}' in command
    assert ('learning_rate=0.03,allow_config_change=True'
            in next(c for c in command if c.startswith('--config=')))
    commands[i] = [address if c.startswith('--coordinator_address=') else c
                   for c in command[1:]]
  resumed = _launch(commands, f'{workdir}.resumed')
  for i, (code, out) in enumerate(resumed):
    assert code == 0, f'process {i} exited {code}:\n{out[-4000:]}'
    assert 'resuming with a changed config' in out  # From `healthy`.
  summary = json.load(open(os.path.join(workdir, 'summary.json')))
  assert summary['step'] == 60
  assert np.isfinite(summary['eval']['test']['loss'])


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


@pytest.mark.extended  # Four processes, one after the other pair.
def test_two_processes_export_an_lm_cache_in_shards_then_read_their_own(
    tmp_path):
  """Two processes export one share of the windows each (kd_jax.lm_cache);
  a two-process run on a (2, 2) ('data', 'model') mesh, the cache's
  evaluation teacher split over 'model', then reads on each only its own
  shard and trains like one process on four devices reading both."""
  from kd_jax import lm_cache  # pylint: disable=g-import-not-at-top
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  from kd_jax.data import text  # pylint: disable=g-import-not-at-top
  data = 'runlocal,dataset="pydoc_topics"'
  teacher_dir = str(tmp_path / 'teacher')
  lm_train.train_and_evaluate(
      load_config('shakespeare_char', f'{data},role=teacher,seed=1'),
      teacher_dir)
  arg = (f'{data},distill.teacher_workdir="{teacher_dir}",'
         'train_split="train[:10%]",distill.temperature=2.0')
  whole, sharded = str(tmp_path / 'whole'), str(tmp_path / 'sharded')
  lm_cache.export(load_config('shakespeare_char', arg), whole, k=16)
  _run_two_processes('shakespeare_char', arg, sharded,
                     module='kd_jax.lm_cache', out_flag='--out')
  assert sorted(os.listdir(sharded)) == ['shard-00000-of-00002',
                                         'shard-00001-of-00002']
  config = load_config('shakespeare_char',
                       f'{arg},distill.cache_dir="{sharded}"')
  tokens = text.load_split('pydoc_topics', 'train[:10%]')
  cut = lm_cache.load(sharded, config, tokens).shards
  for name in lm_cache.FILES:
    got = np.concatenate([getattr(shard, name) for shard in cut])
    want = getattr(lm_cache.load(whole, config, tokens).shards[0], name)
    # The subprocesses compile with XLA's optimisations: float16 values
    # differ in their last bit, and near-ties may swap two ranks.
    if name == 'topk_indices':
      assert got.shape == want.shape and np.mean(got != want) < 1e-4
    else:
      np.testing.assert_allclose(got, want, rtol=2e-3, atol=1e-4,
                                 err_msg=name)
  one_dir, two_dir = str(tmp_path / 'one'), str(tmp_path / 'two')
  _run_two_processes('shakespeare_char', f'{arg},distill.cache_dir='
                     f'"{sharded}",mesh_model=2,distill.shard_teacher=True',
                     two_dir)
  one = lm_train.train_and_evaluate(config, one_dir, devices=jax.devices()[:4])
  two = json.load(open(os.path.join(two_dir, 'summary.json')))
  assert one['teacher']['shards_read'] == ['shard-00000-of-00002',
                                           'shard-00001-of-00002']
  assert two['teacher']['shards_read'] == ['shard-00000-of-00002']
  assert 'kl_to_teacher' in one['eval']['validation[:5%]']
  for k, v in one['eval']['validation[:5%]'].items():
    assert two['eval']['validation[:5%]'][k] == pytest.approx(
        v, rel=1e-4, abs=1e-5), k
  for a, b in zip(one['train_history'], two['train_history']):
    assert b['loss_soft'] == pytest.approx(a['loss_soft'], rel=1e-4)
