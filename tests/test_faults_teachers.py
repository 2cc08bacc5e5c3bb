"""Teachers and logits caches known by content, not by path: a teacher is the
same wherever it lies and another once retrained; its checkpoint is checked
against its checksum when it is restored; a cache's rows are tied to its ids;
an export or import cut short leaves nothing that trains.

Two tiny supervised runs (8 hidden units, 6 steps, seeds 0 and 1) are the
teachers; the fault tests copy them and break the copies, and call the
refusing function directly wherever that reaches the check.
"""

import glob
import json
import os
import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import export_logits
from kd_jax import teachers
from kd_jax import train
from kd_jax.teachers import cache as logits_cache

TRAIN, VAL = 'train[:3600]', 'train[3600:]'
IMAGE_SHAPE = (28, 28, 1)


@pytest.fixture(scope='module')
def teacher_runs(tmp_path_factory):
  """Workdirs of two finished tiny runs, seeds 0 and 1."""
  runs = []
  for seed in (0, 1):
    workdir = str(tmp_path_factory.mktemp(f'teacher{seed}'))
    train.train_and_evaluate(config_lib.load_config(
        'mnist5k_student', f'runlocal,model.hidden=(8,),seed={seed}'),
                             workdir)
    runs.append(workdir)
  return runs


def entries(*workdirs):
  return [config_lib.teacher_config(None, w) for w in workdirs]


def online(*workdirs):
  return teachers.load_online(entries(*workdirs), 10, IMAGE_SHAPE)


def cached_config(cache_dir, *workdirs):
  """The mnist5k cached-distillation config, with these teachers."""
  config = config_lib.load_config('mnist5k_distill_cached',
                                  f'runlocal,cache_dir={cache_dir}')
  config.teachers = entries(*workdirs)
  return config


def copy(workdir, tmp_path, name):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def model_data_file(workdir):
  files = glob.glob(os.path.join(checkpointing.checkpoint_dir(workdir), '6',
                                 'model', 'ocdbt.process_0', 'd', '*'))
  return max(files, key=os.path.getsize)


# ---------------------------------------------------------------------------
# Teacher identity (item 3) and checksums (item 4).
# ---------------------------------------------------------------------------


def test_a_teacher_is_the_same_wherever_it_lies_and_another_once_retrained(
    teacher_runs, tmp_path):
  first, other = teacher_runs
  moved = copy(first, tmp_path, 'moved')
  assert online(moved).fingerprint == online(first).fingerprint
  # Retrained in place (another seed's run at the same path and step).
  retrained = copy(other, tmp_path / 'again', 'teacher')
  assert online(retrained).fingerprint != online(first).fingerprint
  # What earlier versions called them (path@step) is not identity.
  assert online(moved).legacy_fingerprints != online(
      first).legacy_fingerprints


def test_resuming_with_another_teacher_is_refused_naming_it(teacher_runs,
                                                            tmp_path):
  first, other = teacher_runs
  config = config_lib.load_config(
      'mnist5k_distill', f'runlocal,teacher_workdir={other}')
  config.teachers = entries(other)
  meta = dict(step=3, teacher_fingerprint=online(first).fingerprint)
  topology = dict(process_count=1, device_count=8)
  with pytest.raises(ValueError, match=(
      r'another teacher \(fingerprint \w+\) than this run has \(\w+: '
      f"workdir='{re.escape(other)}', retrained since\\?\\)")):
    train._resume_checks(str(tmp_path), meta, config, online(other),  # pylint: disable=protected-access
                         topology)
  # The same teacher at another path resumes; so does a checkpoint that
  # recorded an earlier version's fingerprint of it.
  moved = online(copy(first, tmp_path, 'moved'))
  assert train._resume_checks(str(tmp_path), meta, config, moved,  # pylint: disable=protected-access
                              topology) == []
  legacy = dict(meta, teacher_fingerprint=online(
      first).legacy_fingerprints[0])
  assert train._resume_checks(str(tmp_path), legacy, config, online(first),  # pylint: disable=protected-access
                              topology) == []


def flip_bytes(path):
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


def truncate(path):
  data = open(path, 'rb').read()
  open(path, 'wb').write(data[:len(data) // 2])


@pytest.mark.parametrize('damage', [flip_bytes, truncate],
                         ids=lambda f: f.__name__)
def test_a_damaged_teacher_checkpoint_is_refused_naming_the_entry_and_step(
    teacher_runs, tmp_path, damage):
  workdir = copy(teacher_runs[0], tmp_path, 'teacher')
  damage(model_data_file(workdir))
  with pytest.raises(checkpointing.CheckpointDamaged, match=(
      re.escape(f"config.teachers[0] (workdir '{workdir}'): checkpoint step "
                '6 in ') + r'.*(does not match the checksum|does not '
      r'restore).*Restore that checkpoint folder from a copy')):
    online(workdir)


def test_a_teacher_checkpoint_of_an_earlier_version_is_checked_too(
    teacher_runs, tmp_path):
  # Checkpoints written before model checksums hold the whole state's.
  workdir = copy(teacher_runs[0], tmp_path, 'teacher')
  meta_path = os.path.join(checkpointing.checkpoint_dir(workdir), '6', 'meta',
                           'metadata')
  meta = json.load(open(meta_path))
  del meta['model_checksum']
  json.dump(meta, open(meta_path, 'w'))
  assert online(workdir).fingerprint == online(teacher_runs[0]).fingerprint
  flip_bytes(model_data_file(workdir))
  with pytest.raises(checkpointing.CheckpointDamaged,
                     match=r'config.teachers\[0\].*step 6'):
    online(workdir)


def test_a_teacher_with_nan_weights_is_refused_naming_it(teacher_runs,
                                                         tmp_path):
  # Saved with its checksum: the values are as written, and not finite.
  workdir = str(tmp_path / 'teacher')
  shutil.copytree(teacher_runs[0], workdir,
                  ignore=shutil.ignore_patterns('checkpoints'))
  variables, _ = checkpointing.restore_model(
      teacher_runs[0], jax.tree.map(lambda a: jax.ShapeDtypeStruct(
          a.shape[1:], a.dtype), online(teacher_runs[0]).variables))
  params = jax.tree.map(lambda a: a.at[..., 0].set(jnp.nan),
                        variables['params'])
  with checkpointing.manager(workdir, 1) as mngr:
    checkpointing.save(mngr, dict(step=jnp.int32(6), params=params,
                                  batch_stats={}), {})
  with pytest.raises(ValueError, match=(
      r'config.teachers\[0\] .*: checkpoint step 6 holds NaN or Inf')):
    online(workdir)
