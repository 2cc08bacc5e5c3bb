"""Nothing lost, nothing silently wrong: a run's workdir, checkpoints, teachers
and settings under the faults a careful user meets on a shared cluster.

One tiny supervised run (an 8-unit MLP, 6 steps, checkpoints at 3 and 6) is
trained once; the fault tests copy its workdir and break the copy, and call
the refusing function directly wherever that reaches the check.
"""

import dataclasses
import functools
import glob
import json
import os
import re
import shutil
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
from kd_jax import config_lib
from kd_jax import export_logits
from kd_jax import losses
from kd_jax import models
from kd_jax import rundir
from kd_jax import teachers
from kd_jax import train
from kd_jax import train_state
from kd_jax.teachers import cache as logits_cache

ARG = 'runlocal,model.hidden=(8,),keep_checkpoints=3'


def tiny(arg=''):
  return config_lib.load_config('mnist5k_student',
                                ','.join(filter(None, [ARG, arg])))


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  """(workdir, summary) of an uninterrupted tiny run: checkpoints 3 and 6."""
  workdir = str(tmp_path_factory.mktemp('finished'))
  return workdir, train.train_and_evaluate(tiny(), workdir)


def copy_run(finished, tmp_path, name='run'):
  target = str(tmp_path / name)
  shutil.copytree(finished[0], target)
  return target


def abstract_state(config, devices=None):
  """The state's shapes, as the trainer lays them out (replicated)."""
  model = models.get_model(config.model, 10)
  tx, _ = train.make_optimizer(config, 6)
  abstract = jax.eval_shape(functools.partial(
      train.init_state, model, tx, image_shape=(28, 28, 1)), jax.random.key(0))
  mesh = jax.make_mesh((len(devices or jax.devices()),), ('data',),
                       devices=devices or jax.devices(),
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(
      a.shape, a.dtype, sharding=replicated), abstract)


def restore(workdir, config=None):
  config = config or tiny()
  with checkpointing.manager(workdir, 3) as mngr:
    return checkpointing.restore(mngr, abstract_state(config), workdir)


def host(tree):
  return jax.tree.map(lambda a: np.asarray(
      jax.random.key_data(a) if jax.dtypes.issubdtype(
          a.dtype, jax.dtypes.prng_key) else a), tree)


# ---------------------------------------------------------------------------
# 1. One run per workdir.
# ---------------------------------------------------------------------------


def write_lock(workdir, **holder):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, rundir.LOCK), 'w') as f:
    json.dump(dict(dict(host=socket.gethostname(), started='earlier'),
                   **holder), f)


def test_a_finished_run_leaves_no_lock(finished):
  assert not os.path.exists(os.path.join(finished[0], rundir.LOCK))


def test_second_run_on_a_workdir_is_refused_naming_the_holder(tmp_path):
  holder = subprocess.Popen([sys.executable, '-c',
                             'import time; time.sleep(60)'])
  try:
    write_lock(str(tmp_path), pid=holder.pid)
    with pytest.raises(rundir.WorkdirLocked,
                       match=f'pid {holder.pid} on host'):
      train.train_and_evaluate(tiny(), str(tmp_path))
  finally:
    holder.kill()
    holder.wait()
  # The refused run wrote nothing: the holder's run is intact.
  assert sorted(os.listdir(tmp_path)) == [rundir.LOCK]


def test_stale_lock_of_a_dead_process_is_taken_over_and_released(tmp_path):
  dead = subprocess.Popen([sys.executable, '-c', 'pass'])
  dead.wait()
  write_lock(str(tmp_path), pid=dead.pid)
  mine = rundir.acquire_lock(str(tmp_path))
  assert mine['pid'] == os.getpid()
  with open(tmp_path / rundir.LOCK) as f:
    assert json.load(f) == mine
  rundir.release_lock(str(tmp_path), mine)
  assert not os.path.exists(tmp_path / rundir.LOCK)


def test_lock_of_another_host_says_how_to_remove_it_if_stale(tmp_path):
  write_lock(str(tmp_path), host='node-17', pid=os.getpid())
  with pytest.raises(rundir.WorkdirLocked,
                     match=r"node-17.*If that run is gone.*remove .*LOCK"):
    rundir.acquire_lock(str(tmp_path))


def test_lock_is_released_when_the_run_fails(tmp_path):
  # A cache that does not exist: the run stops after taking the lock.
  config = config_lib.load_config(
      'mnist5k_distill_cached', f'runlocal,cache_dir={tmp_path / "none"}')
  with pytest.raises(FileNotFoundError):
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert not os.path.exists(tmp_path / 'run' / rundir.LOCK)
  rundir.release_lock(str(tmp_path / 'run'), {})  # Nothing to release.


# ---------------------------------------------------------------------------
# 2. A damaged newest checkpoint.
# ---------------------------------------------------------------------------


def _largest_data_file(step_dir):
  files = glob.glob(os.path.join(step_dir, 'model', 'ocdbt.process_0', 'd',
                                 '*'))
  return max(files, key=os.path.getsize)


def truncate(step_dir):
  path = _largest_data_file(step_dir)
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


def flip_bytes(step_dir):
  path = _largest_data_file(step_dir)
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def empty_metadata_json(step_dir):
  open(os.path.join(step_dir, 'meta', 'metadata'), 'w').close()


def empty_orbax_metadata(step_dir):
  open(os.path.join(step_dir, 'model', '_METADATA'), 'w').close()


DAMAGES = [truncate, flip_bytes, empty_metadata_json, empty_orbax_metadata]


@pytest.mark.parametrize('damage', DAMAGES, ids=lambda f: f.__name__)
def test_damaged_newest_checkpoint_falls_back_and_is_moved_aside(
    finished, tmp_path, damage):
  pristine = restore(copy_run(finished, tmp_path, 'pristine'))
  workdir = copy_run(finished, tmp_path)
  ckpt = checkpointing.checkpoint_dir(workdir)
  damage(os.path.join(ckpt, '6'))
  files_before = sorted(os.path.relpath(p, os.path.join(ckpt, '6'))
                        for p in glob.glob(os.path.join(ckpt, '6', '**'),
                                           recursive=True))
  state, meta = restore(workdir)
  assert meta['step'] == int(state.step) == 3
  # Step 3 restores exactly: compared with step 3 of the untouched copy.
  abstract = abstract_state(tiny())
  expected, _ = checkpointing.restore_model(
      copy_run(finished, tmp_path, 'p3'),
      {'params': abstract.params, 'batch_stats': abstract.batch_stats},
      step=3)
  np.testing.assert_array_equal(host(state.params)['Dense_0']['kernel'],
                                host(expected['params'])['Dense_0']['kernel'])
  assert int(pristine[0].step) == 6
  # Moved aside whole, never deleted; the stream restarts at step 3.
  moved = os.path.join(workdir, checkpointing.BROKEN_DIR, '6')
  assert sorted(os.path.relpath(p, moved) for p in glob.glob(
      os.path.join(moved, '**'), recursive=True)) == files_before
  assert checkpointing.latest_step(workdir) == 3


def test_missing_orbax_metadata_still_restores_the_checked_values(
    finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  os.remove(os.path.join(checkpointing.checkpoint_dir(workdir), '6', 'model',
                         '_METADATA'))
  state, meta = restore(workdir)
  # Orbax rebuilds the tree from the target; the checksum proves the values.
  assert int(state.step) == 6
  assert checkpointing.checksum(
      train_state.to_checkpoint(state)) == meta['checksum']


def test_resume_past_a_damaged_checkpoint_ends_with_the_uninterrupted_numbers(
    finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  truncate(os.path.join(checkpointing.checkpoint_dir(workdir), '6'))
  os.remove(os.path.join(workdir, rundir.SUMMARY))
  summary = train.train_and_evaluate(tiny(), workdir)
  assert summary['eval'] == finished[1]['eval']


def test_no_restorable_checkpoint_names_the_steps_and_keeps_them(
    finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  ckpt = checkpointing.checkpoint_dir(workdir)
  truncate(os.path.join(ckpt, '6'))
  empty_metadata_json(os.path.join(ckpt, '3'))
  with pytest.raises(checkpointing.NoUsableCheckpoint,
                     match=r'step 6: .*step 3: .*move that folder aside'):
    restore(workdir)
  assert sorted(os.listdir(ckpt)) == ['3', '6']
  assert not os.path.exists(os.path.join(workdir, checkpointing.BROKEN_DIR))


# ---------------------------------------------------------------------------
# 3. Non-finite teachers propagate, and are refused at the door.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('soft', [losses.kl_divergence,
                                  losses.soft_cross_entropy])
@pytest.mark.parametrize('bad', [np.inf, np.nan])
def test_inf_or_nan_teacher_makes_the_soft_loss_and_gradient_nan(soft, bad):
  student = jnp.array([[1.0, 2.0, 3.0], [0.5, 0.0, -0.5]])
  teacher = jnp.array([[bad, 2.0, 1.0], [1.0, 0.0, 0.0]])
  loss = soft(student, teacher, 2.0)
  grad = jax.grad(lambda s: soft(s, teacher, 2.0).sum())(student)
  assert np.isnan(loss[0]) and np.isfinite(loss[1])
  assert np.isnan(grad[0]).all()


def test_a_teacher_probability_of_exactly_zero_stays_finite():
  # -inf logits in a row with finite ones: p = 0 there, a legitimate target.
  student = jnp.array([[1.0, 2.0, 3.0]])
  teacher = jnp.array([[0.0, -jnp.inf, 1.0]])
  for soft in (losses.kl_divergence, losses.soft_cross_entropy):
    grad = jax.grad(lambda s: soft(s, teacher, 2.0).sum())(student)
    assert np.isfinite(soft(student, teacher, 2.0)).all()
    assert np.isfinite(grad).all()


def test_nan_teacher_stops_the_trainer_naming_the_step(tmp_path, monkeypatch):
  def nan_teacher(config, info, dtype, mesh=None):
    del config, dtype, mesh
    return teachers.Teacher(
        variables=None, names=('nan',), weights=(1.0,), fingerprint='nan',
        forward=lambda v, b: jnp.full((1, *b['image'].shape[:1],
                                       info.num_classes), jnp.nan))
  monkeypatch.setitem(teachers.SOURCES.records, 'online', dataclasses.replace(
      teachers.SOURCES.get('online', 'test'), load=nan_teacher))
  config = tiny('distill.teacher_source="online",distill.alpha=0.5')
  # Step 1's loss comes from the initial parameters: not the learning rate.
  with pytest.raises(FloatingPointError,
                     match=r'loss is nan at step 1, before any update: not '
                           r'the learning rate, but the inputs, the model or '
                           r'the teacher'):
    train.train_and_evaluate(config, str(tmp_path))


def _write_cache_split(directory, ids, labels, logits, config, info,
                       split='test'):
  manifest = logits_cache.make_manifest(config, info, split, fingerprint='f',
                                     teacher='t', num_examples=len(ids),
                                     dtype='float32')
  logits_cache.write_split(directory, ids=np.asarray(ids, object),
                            labels=labels, class_names=info.class_names,
                            manifest=manifest, logits=logits)


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  """(config, info, {split: (ids, labels)}) of the mnist5k cached-distill
  config, and a valid random cache of it."""
  cache = str(tmp_path_factory.mktemp('cache') / 'cache')
  config = config_lib.load_config('mnist5k_distill_cached',
                                  f'runlocal,cache_dir={cache}')
  info = export_logits._dataset_info(config)
  splits = {}
  rng = np.random.default_rng(0)
  for split in export_logits._default_splits(config):
    ids, labels = logits_cache._split_ids(config, split)
    splits[split] = (ids, labels)
    _write_cache_split(os.path.join(cache, split), ids, labels,
                       rng.normal(size=(len(ids), 10)).astype(np.float32),
                       config, info, split)
  return config, info, splits, cache


def test_a_valid_cache_loads(dataset):
  config, info, _, _ = dataset
  assert teachers.load_cache(config, info).fingerprint


def test_export_refuses_nan_logits_naming_the_first_bad_id(dataset, tmp_path):
  config, info, splits, _ = dataset
  ids, labels = splits['test']
  logits = np.zeros((len(ids), 10), np.float32)
  logits[[5, 9], 3] = np.nan
  with pytest.raises(ValueError, match=f'2 of {len(ids)} rows hold NaN or '
                                       f'Inf; the first is row 5 '
                                       f"\\(id '{ids[5].decode()}'\\)"):
    _write_cache_split(str(tmp_path / 'test'), ids, labels, logits, config,
                       info)
  assert not os.path.exists(tmp_path / 'test')


def test_cache_with_inf_rows_is_refused_naming_the_first_bad_id(dataset,
                                                                tmp_path):
  _, _, splits, cache = dataset
  shutil.copytree(os.path.join(cache, 'test'), tmp_path / 'test')
  path = tmp_path / 'test' / 'logits.npy'
  logits = np.load(path)
  logits[7, 0] = np.inf
  np.save(path, logits)
  with pytest.raises(ValueError, match=f"logits.npy: 1 of .*row 7 \\(id "
                                       f"'{splits['test'][0][7].decode()}'"):
    teachers.read_cache_arrays(str(tmp_path), 'test')


def test_blackbox_table_with_nan_and_inf_is_refused(dataset, tmp_path):
  config, info, splits, _ = dataset
  ids = splits['test'][0][:4]
  table = str(tmp_path / 'table.csv')
  with open(table, 'w') as f:
    f.write(','.join(['id', *info.class_names]) + '\n')
    for n, example_id in enumerate(ids):
      row = ['inf' if n == 2 else 'nan' if n == 3 else '0.5'] * 10
      f.write(','.join([example_id.decode(), *row]) + '\n')
  with pytest.raises(ValueError, match=f"2 of 4 rows hold NaN or Inf; the "
                                       f"first is row 2 \\(id "
                                       f"'{ids[2].decode()}'"):
    export_logits.import_blackbox(table, str(tmp_path / 'out'), config,
                                  probabilities=False)


# ---------------------------------------------------------------------------
# 4. Cache integrity.
# ---------------------------------------------------------------------------


def _copy_cache(cache, tmp_path):
  target = str(tmp_path / 'cache')
  shutil.copytree(cache, target)
  return target


def test_permuted_ids_are_caught_by_the_digest_and_by_the_labels(dataset,
                                                                 tmp_path):
  config, info, _, cache = dataset
  cache = _copy_cache(cache, tmp_path)
  path = os.path.join(cache, config.train_split, 'ids.npy')
  ids = np.load(path)
  np.save(path, np.random.default_rng(1).permutation(ids))
  config = config.copy_and_resolve_references()
  config.distill.cache_dir = cache
  with pytest.raises(ValueError, match='do not match the digest'):
    teachers.load_cache(config, info)
  # A cache exported before digests: the labels still catch it.
  manifest_path = os.path.join(cache, config.train_split, teachers.MANIFEST)
  manifest = json.load(open(manifest_path))
  del manifest['digest']
  json.dump(manifest, open(manifest_path, 'w'))
  with pytest.raises(ValueError, match=re.escape(
      f"split '{config.train_split}') gives") + r' \d+ examples another label '
                                     'than the dataset'):
    teachers.load_cache(config, info)


def test_truncated_npy_error_names_the_file(dataset, tmp_path):
  _, _, _, cache = dataset
  cache = _copy_cache(cache, tmp_path)
  path = os.path.join(cache, 'test', 'logits.npy')
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])
  with pytest.raises(ValueError, match=f'{path} is unreadable'):
    teachers.read_cache_arrays(cache, 'test')


def test_export_refuses_an_existing_out_unless_overwrite(dataset, tmp_path):
  config, _, splits, cache = dataset
  before = {p: os.path.getmtime(p) for p in glob.glob(f'{cache}/*/*')}
  with pytest.raises(FileExistsError, match='--overwrite'):
    export_logits.export(config, cache)
  table = str(tmp_path / 'table.csv')
  with open(table, 'w') as f:
    f.write('id,' + ','.join(str(c) for c in range(10)) + '\n')
    f.write(splits['test'][0][0].decode() + ',' + ','.join(['0.0'] * 10))
  with pytest.raises(FileExistsError, match='--overwrite'):
    export_logits.import_blackbox(table, cache, config, probabilities=False)
  assert {p: os.path.getmtime(p) for p in glob.glob(f'{cache}/*/*')} == before
  out = str(tmp_path / 'out')
  os.makedirs(out)
  open(os.path.join(out, 'note'), 'w').close()
  manifests = export_logits.import_blackbox(table, out, config,
                                            probabilities=False,
                                            overwrite=True)
  assert manifests['test']['num_examples'] == 1


def _FakeTeacher(fingerprint):  # pylint: disable=invalid-name
  return teachers.Teacher(variables=None, forward=None, names=('cache',),
                          weights=(1.0,), fingerprint=fingerprint)


def test_resume_with_another_teacher_is_refused(tmp_path):
  config = config_lib.load_config('mnist5k_distill_cached', 'runlocal')
  meta = dict(step=3, teacher_fingerprint='aaaa')
  topology = dict(process_count=1, device_count=8)
  with pytest.raises(ValueError, match=r'another teacher \(fingerprint aaaa\)'
                                       r'.*re-exported since'):
    train._resume_checks(str(tmp_path), meta, config, _FakeTeacher('bbbb'),
                         topology)
  assert train._resume_checks(str(tmp_path), meta, config,
                              _FakeTeacher('aaaa'), topology) == []
  config.allow_config_change = True
  train._resume_checks(str(tmp_path), meta, config, _FakeTeacher('bbbb'),
                       topology)


def test_checkpoints_record_the_teacher_and_the_topology(finished, tmp_path):
  _, meta = restore(copy_run(finished, tmp_path))
  assert meta['teacher_fingerprint'] is None  # Trained without a teacher.
  assert meta['topology'] == dict(process_count=1,
                                  device_count=jax.device_count())


# ---------------------------------------------------------------------------
# 5. Settings that would lose work.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('arg, field', [
    ('keep_checkpoints=0', 'keep_checkpoints'),
    ('checkpoint_every_steps=0', 'checkpoint_every_steps'),
    ('log_every_steps=0', 'log_every_steps'),
    ('num_train_steps=0', 'num_train_steps'),
    ('num_train_steps=-1,num_epochs=0.0', 'num_train_steps'),
    ('warmup_steps=-1', 'warmup_steps'),
])
def test_settings_that_lose_work_are_refused_up_front(arg, field, tmp_path):
  with pytest.raises(ValueError, match=f'config.{field}=.*set|must be'):
    train.train_and_evaluate(tiny(arg), str(tmp_path))
  assert not os.listdir(tmp_path)


# ---------------------------------------------------------------------------
# 6. A failed first attempt does not lock out its fix.
# ---------------------------------------------------------------------------


def test_workdir_without_checkpoint_accepts_a_changed_config(tmp_path):
  first = rundir.config_json(tiny('learning_rate=100.0'))
  rundir.write_config(str(tmp_path), first)
  fixed = rundir.config_json(tiny())
  rundir.check_config(str(tmp_path), fixed, allow_change=False,
                      has_checkpoint=False)
  with pytest.raises(ValueError, match='different config.*learning_rate'):
    rundir.check_config(str(tmp_path), fixed, allow_change=False,
                        has_checkpoint=True)


def test_launch_only_fields_stay_out_of_config_json_and_old_workdirs_resume(
    tmp_path):
  config = config_lib.load_config(
      'cifar100_crd', 'runlocal,role=distill,teacher_workdir=/x/teacher')
  assert {'role', 'teacher_workdir'} <= set(rundir.launch_fields(config))
  stored = json.loads(rundir.config_json(config))
  assert not {'role', 'teacher_workdir'} & set(stored)
  assert stored['teachers'][0]['workdir'] == '/x/teacher'
  # A workdir of an earlier version stored them: it still resumes.
  rundir.write_config(str(tmp_path), json.dumps(
      dict(stored, role='distill', teacher_workdir='/x/teacher')))
  rundir.check_config(str(tmp_path), rundir.config_json(config),
                      allow_change=False, has_checkpoint=True)
  # A change of what they chose is still a change.
  other = config_lib.load_config(
      'cifar100_crd', 'runlocal,role=distill,teacher_workdir=/y/teacher')
  with pytest.raises(ValueError, match=r'different config.*teachers'):
    rundir.check_config(str(tmp_path), rundir.config_json(other),
                        allow_change=False, has_checkpoint=True)


def test_workdir_with_checkpoints_refuses_a_changed_config(finished, tmp_path):
  with pytest.raises(ValueError, match='different config.*learning_rate'):
    train.train_and_evaluate(tiny('learning_rate=0.5'),
                             copy_run(finished, tmp_path))


# ---------------------------------------------------------------------------
# 7. Another topology on resume; a finished run rerun.
# ---------------------------------------------------------------------------


def test_resume_on_another_topology_warns_and_is_recorded(finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  summary = train.train_and_evaluate(tiny(), workdir,
                                     devices=jax.devices()[:4])
  assert summary['topology_changes'] == [dict(
      step=6, before=dict(process_count=1, device_count=8),
      after=dict(process_count=1, device_count=4))]
  # Nothing was trained: the rerun keeps the run's own training time.
  assert summary['train_seconds'] == finished[1]['train_seconds']
  assert rundir.read_summary(workdir)['topology_changes']


# ---------------------------------------------------------------------------
# 8. A killed peer in a multi-process run.
# ---------------------------------------------------------------------------


def _two_processes(tmp_path, arg: str, workdirs: list[str]):
  """(processes, their logs): mnist5k_student at `arg` on two local
  processes (gloo, a 5 s peer timeout), process i in workdirs[i]; each in
  a session of its own, so that killing one kills all of it, as a host that
  dies would."""
  with socket.socket() as s:
    s.bind(('localhost', 0))
    address = f'localhost:{s.getsockname()[1]}'
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=1',
             JAX_PLATFORMS='cpu', PYTHONUNBUFFERED='1')
  logs = [open(tmp_path / f'process{i}.log', 'w+') for i in range(2)]
  procs = [subprocess.Popen(
      [sys.executable, '-m', 'kd_jax.main',
       f'--config={config_lib.CONFIG_DIR}/mnist5k_student.py:{arg}',
       f'--workdir={workdirs[i]}', f'--coordinator_address={address}',
       '--num_processes=2', f'--process_id={i}', '--cpu_collectives=gloo',
       '--peer_timeout_s=5'],
      env=env, stdout=logs[i], stderr=subprocess.STDOUT,
      start_new_session=True) for i in range(2)]
  return procs, logs


@pytest.mark.slow
@pytest.mark.parametrize('victim', [0, 1])
def test_killed_peer_ends_the_survivor_naming_it(tmp_path, victim):
  workdir = str(tmp_path / 'run')
  arg = (f'{ARG},num_train_steps=1000000,checkpoint_every_steps=20,'
         'log_every_steps=1000,eval_every_steps=1000000')
  procs, logs = _two_processes(tmp_path, arg, [workdir, workdir])
  try:
    deadline = time.monotonic() + 240
    while (checkpointing.latest_step(workdir) is None
           and time.monotonic() < deadline):
      time.sleep(0.5)
    assert checkpointing.latest_step(workdir), 'training never started'
    os.killpg(procs[victim].pid, signal.SIGKILL)
    killed = time.monotonic()
    survivor = procs[1 - victim]
    survivor.wait(timeout=60)
    waited = time.monotonic() - killed
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  logs[1 - victim].seek(0)
  last = logs[1 - victim].read().strip().splitlines()[-1]
  assert survivor.returncode == 75, last
  assert re.match(f'kd_jax: lost JAX process {victim} .*of 2: .*rerun the same '
                  'command on every host to resume', last), last
  assert waited < 30


@pytest.mark.slow
def test_a_failure_in_one_process_ends_both_naming_it(tmp_path):
  """Process 1 cannot write its workdir (a path under a file); process 0 is
  fine. Neither waits for the other: process 0 ends naming process 1 and
  its error, process 1 with its own error."""
  (tmp_path / 'file').write_text('not a folder')
  procs, logs = _two_processes(tmp_path, ARG, [
      str(tmp_path / 'run'), str(tmp_path / 'file' / 'run')])
  try:
    for p in procs:
      p.wait(timeout=150)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  out = []
  for log in logs:
    log.seek(0)
    out.append(log.read())
  last = out[0].strip().splitlines()[-1]
  assert procs[0].returncode == 75, out[0][-3000:]
  assert re.match(r'kd_jax: lost JAX process 1 of 2: it failed with '
                  r'WorkdirUnusable: .*file/run.*fix that, then rerun', last), last
  assert procs[1].returncode == 1, out[1][-3000:]
  assert 'lost JAX process' not in out[1], out[1][-3000:]
  assert 'file' in out[1]


# ---------------------------------------------------------------------------
# 9. Small things a user hits.
# ---------------------------------------------------------------------------


def test_negative_labels_get_a_hint_that_makes_sense():
  with pytest.raises(ValueError, match=r'\[-1\].*negative labels') as e:
    losses.cross_entropy(jnp.zeros((2, 10)), jnp.array([3, -1]))
  assert '> -1' not in str(e.value)


def test_misspelled_config_keys_get_did_you_mean():
  with pytest.raises(ValueError, match=r"'distill.temprature' \(did you mean "
                                       r'distill.temperature\?\)'):
    tiny('distill.temprature=4.0')
  with pytest.raises(FileNotFoundError, match=r'did you mean mnist5k_student\?'):
    config_lib.load_config('mnist5k_studnet')
  config = tiny()
  with config.distill.ignore_type():
    config.distill.unlock()
    config.distill.alpah = 0.5
  with pytest.raises(ValueError, match=r'config.distill.alpah \(did you '
                                       r'mean distill.alpha\?\)'):
    train.validate_config(config)


def test_changed_model_with_allow_config_change_gets_a_kd_jax_message(
    finished, tmp_path):
  workdir = copy_run(finished, tmp_path)
  with pytest.raises(checkpointing.ModelChanged,
                     match=r'other shapes.*config.init_from') as e:
    restore(workdir, tiny('model.hidden=(16,)'))
  assert 'strict' not in str(e.value)
  assert sorted(os.listdir(checkpointing.checkpoint_dir(workdir))) == [
      '3', '6']


# ---------------------------------------------------------------------------
# Collapse (issue 10).
# ---------------------------------------------------------------------------


def test_collapse_is_warned_once_per_fall_and_recorded(finished):
  warnings, best, collapsed = [], 0.0, False
  for step, accuracy in enumerate([0.3, 0.9, 0.95, 0.8, 0.2, 0.1, 0.9, 0.5],
                                  1):
    best, collapsed = train._collapse(step, accuracy, best, collapsed,
                                      warnings)
  assert warnings == [dict(step=5, accuracy=0.2, best=0.95),
                      dict(step=8, accuracy=0.5, best=0.95)]
  assert finished[1]['collapse_warnings'] == []
  assert rundir.read_summary(finished[0])['collapse_warnings'] == []


def test_latest_step_reads_committed_steps_without_a_checkpoint_manager(
    tmp_path, monkeypatch):
  # A CheckpointManager's constructor is a barrier of every process once
  # the folder exists: a process that called it one time more than its peer
  # (looking after process 0 made the folder) hung the run.
  root = tmp_path / 'checkpoints'
  assert checkpointing.latest_step(str(tmp_path)) is None
  mngr = checkpointing.manager(str(tmp_path), keep=3)
  state = {'step': jnp.int32(0), 'params': {'w': jnp.ones(3)},
           'batch_stats': {}}
  for step in (4, 7):
    checkpointing.save(mngr, dict(state, step=jnp.int32(step)), {})
  mngr.wait_until_finished()
  mngr.close()
  (root / '9.orbax-checkpoint-tmp-1').mkdir()  # A save cut short.

  def refused(*args, **kwargs):
    raise AssertionError('latest_step built a CheckpointManager')
  monkeypatch.setattr(checkpointing.ocp, 'CheckpointManager', refused)
  assert checkpointing.latest_step(str(tmp_path)) == 7


def test_a_damaged_init_from_run_is_refused_naming_the_field(finished,
                                                             tmp_path):
  from kd_jax import warm_start  # pylint: disable=g-import-not-at-top
  workdir = copy_run(finished, tmp_path)
  flip_bytes(os.path.join(checkpointing.checkpoint_dir(workdir), '6'))
  with pytest.raises(checkpointing.CheckpointDamaged,
                     match=r"^config\.init_from='.*' cannot be used: "):
    warm_start.restore_run(workdir)
