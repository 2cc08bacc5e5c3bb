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


@pytest.mark.slow  # A teacher trained twice.
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


# ---------------------------------------------------------------------------
# Cache rows tied to their ids (item 5), caches known by content (item 3).
# ---------------------------------------------------------------------------


def write_cache(root, config, info, splits, fingerprint, seed=0):
  rng = np.random.default_rng(seed)
  for split, (ids, labels) in splits.items():
    manifest = logits_cache.make_manifest(
        config, info, split, fingerprint=fingerprint, teacher='t',
        num_examples=len(ids), dtype='float32')
    logits_cache.write_split(
        os.path.join(root, split), ids=np.asarray(ids, object),
        labels=labels, class_names=info.class_names, manifest=manifest,
        logits=rng.normal(size=(len(ids), 10)).astype(np.float32),
        write_csv=False)
  return root


@pytest.fixture(scope='module')
def caches(tmp_path_factory):
  """(config, info, {split: (ids, labels)}) of the cached-distillation
  config, and two random caches of it: teachers 'f' and 'g'."""
  root = tmp_path_factory.mktemp('caches')
  config = cached_config(str(root / 'f'))
  info = export_logits._dataset_info(config)  # pylint: disable=protected-access
  splits = {s: logits_cache._split_ids(config, s)  # pylint: disable=protected-access
            for s in export_logits._default_splits(config)}  # pylint: disable=protected-access
  write_cache(str(root / 'f'), config, info, splits, 'f')
  write_cache(str(root / 'g'), config, info, splits, 'g', seed=1)
  return config, info, splits, str(root)


def load(cache_dir, caches):
  config, info, _, _ = caches
  config = config.copy_and_resolve_references()
  config.distill.cache_dir = cache_dir
  return teachers.load_cache(config, info)


def test_permuted_logits_rows_are_refused(caches, tmp_path):
  cache = copy(os.path.join(caches[3], 'f'), tmp_path, 'cache')
  path = os.path.join(cache, TRAIN, 'logits.npy')
  np.save(path, np.random.default_rng(2).permutation(np.load(path)))
  with pytest.raises(ValueError, match=re.escape(os.path.join(cache, TRAIN))
                     + ': its ids and teacher arrays do not match the digest'):
    load(cache, caches)


def test_splits_of_two_teachers_exports_are_refused(caches, tmp_path):
  cache = copy(os.path.join(caches[3], 'f'), tmp_path, 'cache')
  shutil.rmtree(os.path.join(cache, 'test'))
  shutil.copytree(os.path.join(caches[3], 'g', 'test'),
                  os.path.join(cache, 'test'))
  with pytest.raises(ValueError, match=r"mixes the exports of different "
                     r"teachers .*'test': 'g'.*export every split from one "
                     'teacher in one command'):
    load(cache, caches)


def fingerprint(cache_dir, caches):
  """What load_cache calls the cache (`cache._fingerprint`, which it uses)."""
  return logits_cache._fingerprint(cache_dir, list(caches[2]))  # pylint: disable=protected-access


def test_a_cache_is_the_same_wherever_it_lies_and_another_if_rewritten(
    caches, tmp_path):
  original = os.path.join(caches[3], 'f')
  moved = copy(original, tmp_path, 'moved')
  assert fingerprint(moved, caches) == fingerprint(original, caches)
  # Same teacher fingerprint, other values (e.g. re-exported as float16).
  rewritten = write_cache(str(tmp_path / 'rewritten'), caches[0], caches[1],
                          {'test': caches[2]['test']}, 'f', seed=5)
  for split in caches[2]:
    if split != 'test':
      shutil.copytree(os.path.join(original, split),
                      os.path.join(rewritten, split))
  assert fingerprint(rewritten, caches) != fingerprint(original, caches)


def test_a_cache_without_digests_loads_with_a_warning(caches, tmp_path,
                                                      caplog):
  cache = copy(os.path.join(caches[3], 'f'), tmp_path, 'cache')
  for path in glob.glob(os.path.join(cache, '*', teachers.MANIFEST)):
    manifest = json.load(open(path))
    del manifest['digest']
    json.dump(manifest, open(path, 'w'))
  for split in caches[2]:
    teachers.read_cache_arrays(cache, split)  # Unchecked, but read.
  assert fingerprint(cache, caches) != fingerprint(
      os.path.join(caches[3], 'f'), caches)
  assert 'before caches recorded digests' in caplog.text


def test_a_manifest_missing_a_key_is_refused_naming_it(caches, tmp_path):
  cache = copy(os.path.join(caches[3], 'f'), tmp_path, 'cache')
  path = os.path.join(cache, 'test', teachers.MANIFEST)
  manifest = json.load(open(path))
  del manifest['preprocessing']
  json.dump(manifest, open(path, 'w'))
  with pytest.raises(ValueError, match=re.escape(path) + r" lacks "
                     r"\['preprocessing'\].*export it again"):
    load(cache, caches)


# ---------------------------------------------------------------------------
# An export or an import cut short (items 2 and 6).
# ---------------------------------------------------------------------------


def cut_export_after_first_split(monkeypatch, cleanup: bool):
  """Makes the next export fail as it starts its second split; without
  `cleanup`, as a killed process would (its except clauses never run)."""
  export_split = export_logits._export_split  # pylint: disable=protected-access
  remove = logits_cache.remove_manifests
  calls = []

  def cut(config, split, *args, **kwargs):
    if calls:
      raise KeyboardInterrupt
    calls.append(split)
    return export_split(config, split, *args, **kwargs)
  monkeypatch.setattr(export_logits, '_export_split', cut)
  if not cleanup:
    monkeypatch.setattr(logits_cache, 'remove_manifests',
                        lambda dirs: None if calls else remove(dirs))


@pytest.fixture(scope='module')
def exported(teacher_runs, tmp_path_factory):
  """A cache exported from the first teacher (copy it to change it)."""
  out = str(tmp_path_factory.mktemp('exported') / 'cache')
  export_logits.export(cached_config(out, teacher_runs[0]), out,
                       write_csv=False)
  return out


@pytest.mark.parametrize('cleanup', [
    pytest.param(True, marks=pytest.mark.slow), False],
                         ids=['interrupted', 'killed'])
def test_an_overwrite_cut_short_leaves_no_cache_that_trains(
    teacher_runs, exported, tmp_path, monkeypatch, cleanup):
  other = teacher_runs[1]
  out = copy(exported, tmp_path, 'cache')
  cut_export_after_first_split(monkeypatch, cleanup)
  with pytest.raises(KeyboardInterrupt):
    export_logits.export(cached_config(out, other), out, overwrite=True,
                         write_csv=False)
  monkeypatch.undo()
  config = cached_config(out, other)
  written = sorted(os.path.dirname(os.path.relpath(p, out)) for p in
                   glob.glob(os.path.join(out, '*', teachers.MANIFEST)))
  # The old manifests are gone; the new train split's stays only if the
  # export could not clean up after itself.
  assert written == ([] if cleanup else [TRAIN])
  with pytest.raises(FileNotFoundError, match=(
      'has no logits for split' if cleanup else
      f"has no logits for split '{re.escape(VAL)}'")):
    teachers.load_cache(config, export_logits._dataset_info(config))  # pylint: disable=protected-access


def write_table(path, rows, header=None):
  with open(path, 'w') as f:
    f.write(','.join(header or ['id', *map(str, range(10))]) + '\n')
    for row in rows:
      f.write(','.join(map(str, row)) + '\n')
  return path


def test_a_failed_import_leaves_nothing_usable(caches, tmp_path):
  config, _, splits, _ = caches
  ids = [i.decode() for i in splits['test'][0][:3]]
  table = write_table(str(tmp_path / 't.csv'),
                      [[i, *range(10)] for i in ids] + [['nowhere/1',
                                                         *range(10)]])
  out = str(tmp_path / 'out')
  with pytest.raises(ValueError, match=r'1 of 4 ids are in none of the '
                     r"splits .*\['nowhere/1'\]"):
    export_logits.import_blackbox(table, out, config, probabilities=False)
  assert not glob.glob(os.path.join(out, '**', teachers.MANIFEST),
                       recursive=True)


@pytest.mark.slow  # An export and an import of every split: ~45 s.
def test_probabilities_given_as_logits_are_refused(caches, tmp_path):
  config, _, splits, _ = caches
  ids = [i.decode() for i in splits['test'][0][:3]]
  table = write_table(str(tmp_path / 'p.csv'),
                      [[i, *[0.1] * 10] for i in ids])
  with pytest.raises(ValueError, match=r'look like probabilities.*Pass '
                     r'--probabilities'):
    export_logits.import_blackbox(table, str(tmp_path / 'out'), config,
                                  probabilities=False)
  manifests = export_logits.import_blackbox(
      table, str(tmp_path / 'out'), config, probabilities=True)
  assert manifests['test']['num_examples'] == 3


@pytest.mark.parametrize('lines, match', [
    ([], r'is empty'),
    (['id,0,1,2,3,4,5,6,7,8,9', 'x,1,2'], r'line 2: 3 values, but the header '
     r'has 11 columns'),
    (['id,0,1,2,3,4,5,6,7,8,9', 'x,1,2,3,4,5,6,7,8,9,10', 'y,1,2,3,four,5,6,'
      '7,8,9,10'], r"line 3 \(id 'y'\), column '3': 'four' is not a number"),
])
def test_malformed_tables_name_the_file_and_line(caches, tmp_path, lines,
                                                 match):
  table = str(tmp_path / 'bad.csv')
  with open(table, 'w') as f:
    f.write('\n'.join(lines))
  with pytest.raises(ValueError, match=re.escape(table) + '.*' + match):
    export_logits.import_blackbox(table, str(tmp_path / 'out'), caches[0],
                                  probabilities=False)


def test_a_teacher_sees_the_pixels_normalised_as_its_weights_expect(
    teacher_runs, tmp_path):
  """An imported teacher records the normalisation its weights expect
  (imported.json); the student's stream normalises another way: the
  teacher's forward pass renormalises the batch to its own."""
  workdir = str(tmp_path / 'imported')
  shutil.copytree(teacher_runs[0], workdir)
  mean, std = 0.5, 0.25  # Not mnist5k's.
  with open(os.path.join(workdir, 'imported.json'), 'w') as f:
    json.dump({'input_normalization': {'of': 'pixel / 255', 'mean': [mean],
                                       'std': [std]}}, f)
  stream = teachers.online.stream_normalization(
      train.input_pipeline.get_datasets(config_lib.load_config(
          'mnist5k_student', 'runlocal'), process_index=0, process_count=1
                                        ).info)
  pixels = jax.random.uniform(jax.random.key(0), (4, *IMAGE_SHAPE))
  as_stream = (pixels - stream[0]) / stream[1]
  as_teacher = (pixels - mean) / std
  plain = teachers.load_online(entries(workdir), 10, IMAGE_SHAPE)
  renormalising = teachers.load_online(entries(workdir), 10, IMAGE_SHAPE,
                                       normalization=stream)
  want = plain.forward(plain.variables, {'image': as_teacher})
  got = renormalising.forward(renormalising.variables, {'image': as_stream})
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  assert not np.allclose(plain.forward(plain.variables, {'image': as_stream}),
                         want, atol=1e-3)
  # A teacher trained on the stream's own dataset takes the batch as it is.
  assert teachers.online.renormalization(
      [stream, stream], stream) is None
  # In an ensemble (one stacked forward), each teacher gets its own.
  ensemble = teachers.load_online(entries(workdir, teacher_runs[1]), 10,
                                  IMAGE_SHAPE, normalization=stream)
  both = ensemble.forward(ensemble.variables, {'image': as_stream})
  other = online(teacher_runs[1])
  np.testing.assert_allclose(both[0], want[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(
      both[1], other.forward(other.variables, {'image': as_stream})[0],
      rtol=1e-5, atol=1e-5)
