"""Logits caches: export, offline distillation, black-box tables, refusals."""

import csv
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
import scipy.special

from kd_jax import export_logits
from kd_jax import input_pipeline
from kd_jax import rundir
from kd_jax import teachers
from kd_jax import train
from kd_jax.config_lib import load_config
from kd_jax.teachers import cache as logits_cache


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One worker builds the module's caches.
# Slow: module fixtures train teachers and export their logits.
pytestmark = [pytest.mark.xdist_group('export_logits'), pytest.mark.slow]

# The mnist5k configs' splits: train, validation (held out of train), test.
TRAIN, VAL = 'train[:3600]', 'train[3600:]'
SPLIT_SIZES = {TRAIN: 3600, VAL: 400, 'test': 1000}


def tiny(name, arg=''):
  return load_config(name, ','.join(filter(None, ['runlocal', arg])))


@pytest.fixture(scope='session')
def teacher_dir(mnist5k_teacher_dir):
  """The session's runlocal mnist5k teacher (conftest): read it only."""
  return mnist5k_teacher_dir


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory, teacher_dir):
  out = str(tmp_path_factory.mktemp('cache'))
  export_logits.export(
      tiny('mnist5k_distill_cached', f'teacher_workdir={teacher_dir}'), out)
  return out


def cached_config(cache, arg=''):
  return tiny('mnist5k_distill_cached',
              ','.join(filter(None, [f'cache_dir={cache}', arg])))


def info_of(config):
  return input_pipeline.get_datasets(config, num_devices=1).info


@pytest.fixture(scope='session')
def offline_test_metrics(tmp_path_factory, cache_dir):
  workdir = str(tmp_path_factory.mktemp('offline'))
  return train.train_and_evaluate(cached_config(cache_dir),
                                  workdir)['eval']['test']


def test_offline_distillation_equals_online_on_an_unaugmented_stream(
    teacher_dir, finished_run, offline_test_metrics):
  online = rundir.read_summary(finished_run(
      'mnist5k_distill',
      f'runlocal,teacher_workdir={teacher_dir}'))['eval']['test']
  offline = offline_test_metrics
  assert set(offline) == set(online)
  for k in online:
    assert offline[k] == pytest.approx(online[k], rel=1e-4, abs=1e-5), k


def test_csv_and_manifest_describe_the_same_logits_as_the_npy(cache_dir):
  for split, size in SPLIT_SIZES.items():
    directory = os.path.join(cache_dir, split)
    logits = np.load(os.path.join(directory, 'logits.npy'))
    ids = np.load(os.path.join(directory, 'ids.npy'))
    labels = np.load(os.path.join(directory, 'labels.npy'))
    manifest = json.load(open(os.path.join(directory, 'manifest.json')))
    with open(os.path.join(directory, 'logits.csv'), newline='') as f:
      header, *rows = list(csv.reader(f))
    assert header == ['id', 'label', *manifest['class_names']]
    assert [r[0].encode() for r in rows] == list(ids)
    assert [int(r[1]) for r in rows] == list(labels)
    np.testing.assert_array_equal(
        np.asarray([[float(v) for v in r[2:]] for r in rows], np.float32),
        logits)
    assert logits.dtype == np.float32 and logits.shape == (size, 10)
    assert len(set(ids)) == size
    assert manifest['num_examples'] == size
    assert manifest['split'] == split and manifest['dataset'] == 'mnist5k'
    assert manifest['preprocessing'] == dict(
        image_size=[28, 28], channels=1, augment='none', num_views=1)
    assert (manifest['transfer'] is None) == (split != TRAIN)


def test_float16_export_stores_half_the_bytes_and_loads_as_float32(
    tmp_path, teacher_dir, cache_dir):
  config = tiny('mnist5k_distill_cached', f'teacher_workdir={teacher_dir}')
  manifests = export_logits.export(config, str(tmp_path), ['test'], 'float16')
  assert manifests['test']['dtype'] == 'float16'
  half = np.load(tmp_path / 'test' / 'logits.npy')
  full = np.load(os.path.join(cache_dir, 'test', 'logits.npy'))
  assert half.dtype == np.float16
  np.testing.assert_allclose(half, full, rtol=1e-3, atol=1e-3)
  _, _, loaded = teachers.read_cache_split(str(tmp_path), 'test')
  assert loaded.dtype == np.float32


@pytest.mark.parametrize('field, value', [
    ('dataset', 'digits'),
    ('split', 'test'),
    ('class_names', [f'digit{i}' for i in range(10)]),
])
def test_cache_of_other_data_is_refused_naming_the_field(tmp_path, cache_dir,
                                                         field, value):
  cache = str(tmp_path / 'cache')
  shutil.copytree(cache_dir, cache)
  path = os.path.join(cache, TRAIN, 'manifest.json')
  manifest = json.load(open(path))
  manifest[field] = value
  json.dump(manifest, open(path, 'w'))
  config = cached_config(cache)
  with pytest.raises(ValueError, match=re.escape(f'{field}: cache {value!r}')
                     + '.*Re-export'):
    teachers.load_cache(config, info_of(config))


def test_cache_missing_train_ids_is_refused_with_the_count(tmp_path,
                                                          cache_dir):
  cache = str(tmp_path / 'cache')
  shutil.copytree(cache_dir, cache)
  manifest, ids, logits = teachers.read_cache_split(cache, TRAIN)
  logits_cache.write_split(
      os.path.join(cache, TRAIN), ids=ids[7:], labels=np.zeros(len(ids) - 7),
      logits=logits[7:], class_names=manifest['class_names'],
      manifest=manifest)
  config = cached_config(cache)
  first_missing = ids[0].decode()
  with pytest.raises(ValueError, match=rf"lacks 7 of the 3600 .*'train\[:3600\]'.*"
                     rf"e\.g\. \['{first_missing}'"):
    teachers.load_cache(config, info_of(config))


def test_cache_without_the_eval_split_is_refused(tmp_path, cache_dir):
  cache = str(tmp_path / 'cache')
  shutil.copytree(os.path.join(cache_dir, TRAIN), os.path.join(cache, TRAIN))
  config = cached_config(cache)
  with pytest.raises(FileNotFoundError, match=r"'train\[3600:\]'.*"
                     r"--splits=train\[:3600\],train\[3600:\],test"):
    teachers.load_cache(config, info_of(config))


def test_augmented_stream_with_one_cached_view_needs_the_opt_in(cache_dir):
  config = cached_config(cache_dir, 'augment="mnist_jitter"')
  info = info_of(config)
  with pytest.raises(ValueError, match=r'un-augmented teacher logits on '
                     r'augmented inputs.*allow_augmented_single_view'):
    teachers.load_cache(config, info)
  config.distill.allow_augmented_single_view = True
  teacher = teachers.load_cache(config, info)
  batch = next(input_pipeline.iterate_split(config, 'test', num_devices=1))
  looked_up = teacher.host_lookup(batch)['teacher_logits']
  test_logits = np.load(os.path.join(cache_dir, 'test', 'logits.npy'))
  np.testing.assert_array_equal(looked_up, test_logits[:len(looked_up)])


def test_host_lookup_gives_zeros_for_padding(cache_dir):
  config = cached_config(cache_dir)
  teacher = teachers.load_cache(config, info_of(config))
  batch = dict(id=np.asarray([b'', b'mnist5k/00000', b''], object))
  logits = teacher.host_lookup(batch)['teacher_logits']
  assert logits.dtype == np.float32 and logits.shape == (3, 10)
  assert not logits[0].any() and not logits[2].any() and logits[1].any()
  assert teacher.forward(None, {'teacher_logits': logits}).shape == (1, 3, 10)


def _write_probability_csv(path, ids, probs, class_names):
  with open(path, 'w', newline='') as f:
    writer = csv.writer(f)
    writer.writerow(['id', *class_names])
    for example_id, row in zip(ids, probs):
      writer.writerow([example_id.decode(), *map(repr, map(float, row))])


@pytest.mark.slow
def test_blackbox_probabilities_train_the_student_that_their_logits_train(
    tmp_path, cache_dir, offline_test_metrics):
  ids, logits, names = [], [], None
  for split in SPLIT_SIZES:
    manifest, split_ids, split_logits = teachers.read_cache_split(cache_dir,
                                                                  split)
    ids.append(split_ids)
    logits.append(split_logits)
    names = manifest['class_names']
  ids, logits = np.concatenate(ids), np.concatenate(logits)
  probs = scipy.special.softmax(logits.astype(np.float64), axis=1)
  # Columns in reverse order: classes are matched by name, not position.
  table = str(tmp_path / 'probs.csv')
  _write_probability_csv(table, ids, probs[:, ::-1], names[::-1])
  out = str(tmp_path / 'blackbox')
  config = cached_config(out)
  manifests = export_logits.import_blackbox(table, out, config,
                                            probabilities=True)
  assert {s: m['num_examples'] for s, m in manifests.items()} == SPLIT_SIZES
  _, _, imported = teachers.read_cache_split(out, 'test')
  np.testing.assert_allclose(
      imported, scipy.special.log_softmax(logits[-1000:], axis=1), atol=1e-4)
  test = train.train_and_evaluate(config,
                                  str(tmp_path / 'student'))['eval']['test']
  # log p = logits - logsumexp(logits): the same softmax at every temperature.
  for k in offline_test_metrics:
    assert test[k] == pytest.approx(offline_test_metrics[k], rel=1e-3,
                                    abs=1e-4), k


def test_probabilities_that_do_not_sum_to_one_are_refused(tmp_path,
                                                          cache_dir):
  table = str(tmp_path / 'probs.csv')
  probs = np.full((3, 10), 0.1)
  probs[2, 0] = 0.5
  _write_probability_csv(table, [b'a', b'b', b'c'], probs,
                         [str(i) for i in range(10)])
  with pytest.raises(ValueError, match=r"row 2 \(id b'c'\), which sums to 1.4"):
    export_logits.import_blackbox(table, str(tmp_path / 'out'),
                                  cached_config(cache_dir),
                                  probabilities=True)


def test_blackbox_table_with_unknown_class_names_is_refused(tmp_path,
                                                            cache_dir):
  table = str(tmp_path / 'logits.csv')
  _write_probability_csv(table, [b'a'], np.zeros((1, 10)),
                         [f'class{i}' for i in range(10)])
  with pytest.raises(ValueError, match=r"columns \['class0'.*name no class"):
    export_logits.import_blackbox(table, str(tmp_path / 'out'),
                                  cached_config(cache_dir),
                                  probabilities=False)


def test_shuffled_stream_on_two_hosts_looks_up_each_examples_logits(
    cache_dir, teacher_dir):
  config = cached_config(cache_dir, f'teacher_workdir={teacher_dir}')
  cache = teachers.load_cache(config, info_of(config))
  online = teachers.load_online(config.teachers, 10, (28, 28, 1))
  forward = jax.jit(online.forward)
  ids_of = []
  for process in range(2):
    data = input_pipeline.get_datasets(config, num_devices=2,
                                       process_index=process, process_count=2)
    ids = []
    for _ in range(3):
      batch = cache.host_lookup(next(data.train), step=None)
      np.testing.assert_allclose(
          batch['teacher_logits'],
          forward(online.variables, {'image': batch['image']})[0],
          rtol=1e-4, atol=1e-4)
      ids.extend(bytes(i) for i in batch['id'])
    assert ids != sorted(ids)  # Shuffled, so not the stored order.
    ids_of.append(set(ids))
  assert len(ids_of[0]) == len(ids_of[1]) == 3 * 8
  assert not ids_of[0] & ids_of[1]  # Each host reads its own share.


# Top-k (sparse) caches.


@pytest.fixture(scope='session')
def topk_cache(tmp_path_factory, teacher_dir):
  out = str(tmp_path_factory.mktemp('topk'))
  config = tiny('mnist5k_distill_cached', f'teacher_workdir={teacher_dir}')
  return out, export_logits.export(config, out, top_k=3)


def test_topk_cache_holds_the_largest_logits_and_the_rest_mass(topk_cache,
                                                               cache_dir):
  out, manifests = topk_cache
  for split in SPLIT_SIZES:
    manifest, ids, arrays = teachers.read_cache_arrays(out, split)
    _, dense_ids, dense = teachers.read_cache_split(cache_dir, split)
    assert list(ids) == list(dense_ids)
    assert (manifest['form'], manifest['top_k'], manifest['temperature']) == (
        'topk', 3, 20.0)
    order = np.argsort(-dense, axis=1, kind='stable')[:, :3]
    np.testing.assert_array_equal(arrays['topk_indices'], order)
    np.testing.assert_array_equal(arrays['topk_logits'],
                                  np.take_along_axis(dense, order, 1))
    p = scipy.special.softmax(dense.astype(np.float64) / 20.0, axis=1)
    np.testing.assert_allclose(
        arrays['rest_mass'], 1 - np.take_along_axis(p, order, 1).sum(1),
        atol=1e-6)
    # 3 float32 logits + 3 int16 classes + 1 float32 mass vs 10 float32.
    n = len(ids)
    assert manifests[split]['nbytes'] == n * (3 * 4 + 3 * 2 + 4)
    assert manifests[split]['dense_nbytes'] == n * 10 * 4
    with open(os.path.join(out, split, 'topk.csv'), newline='') as f:
      header, *rows = list(csv.reader(f))
    assert header[:4] == ['id', 'label', 'top1_class', 'top2_class']
    assert header[-1] == 'rest_mass'
    table = np.asarray([[float(v) for v in r[2:]] for r in rows])
    np.testing.assert_array_equal(table[:, :3], order)
    np.testing.assert_array_equal(table[:, 3:6].astype(np.float32),
                                  arrays['topk_logits'])
    np.testing.assert_array_equal(table[:, 6].astype(np.float32),
                                  arrays['rest_mass'])


@pytest.mark.slow
def test_topk_cache_of_every_class_trains_like_the_dense_cache(
    tmp_path, teacher_dir, offline_test_metrics):
  config = tiny('mnist5k_distill_cached', f'teacher_workdir={teacher_dir}')
  export_logits.export(config, str(tmp_path / 'top10'), top_k=10)
  test = train.train_and_evaluate(
      cached_config(str(tmp_path / 'top10')),
      str(tmp_path / 'student'))['eval']['test']
  for k in offline_test_metrics:
    assert test[k] == pytest.approx(offline_test_metrics[k], rel=1e-4,
                                    abs=1e-5), k


@pytest.mark.parametrize('arg, match', [
    ('distill.temperature=4.0', r'rest mass at T=20.0.*--temperature=4.0'),
    ('distill.soft="soft_ce"', r'top-k cache trains with '
     r'losses.topk_kl_divergence'),
])
def test_topk_cache_refuses_another_temperature_or_soft_loss(topk_cache, arg,
                                                             match):
  config = cached_config(topk_cache[0], arg)
  with pytest.raises(ValueError, match=match):
    teachers.load_cache(config, info_of(config))


def test_topk_lookup_gives_the_sparse_targets_and_the_teachers_argmax(
    topk_cache, cache_dir):
  config = cached_config(topk_cache[0])
  batch = next(input_pipeline.iterate_split(config, 'test', num_devices=1))
  looked_up = teachers.load_cache(config, info_of(config)).host_lookup(batch)
  dense = np.load(os.path.join(cache_dir, 'test', 'logits.npy'))[:64]
  np.testing.assert_array_equal(looked_up['teacher_topk_indices'],
                                np.argsort(-dense, 1, kind='stable')[:, :3])
  np.testing.assert_array_equal(looked_up['teacher_logits'].argmax(1),
                                dense.argmax(1))


# Multi-view caches: K augmented views per train example.


@pytest.fixture(scope='session')
def views_cache(tmp_path_factory, teacher_dir):
  out = str(tmp_path_factory.mktemp('views'))
  config = tiny('mnist5k_distill_cached',
                f'teacher_workdir={teacher_dir},augment="mnist_jitter"')
  export_logits.export(config, out, views=2, view_seed=7)
  return out


def test_multi_view_batches_pair_each_view_with_its_teacher_logits(
    views_cache, teacher_dir):
  manifest, _, logits = teachers.read_cache_split(views_cache, TRAIN)
  assert logits.shape == (3600, 2, 10)
  assert manifest['preprocessing'] == dict(
      image_size=[28, 28], channels=1, augment='mnist_jitter', num_views=2,
      view_seed=7)
  assert teachers.read_cache_split(views_cache, 'test')[2].shape == (1000, 10)
  config = cached_config(views_cache, f'teacher_workdir={teacher_dir},'
                         'augment="mnist_jitter"')
  cache = teachers.load_cache(config, info_of(config))  # No refusal.
  stream = teachers.pipeline_config(config)
  assert stream.augment == 'none' and config.augment == 'mnist_jitter'
  plain = next(input_pipeline.get_datasets(stream, num_devices=1).train)
  online = teachers.load_online(config.teachers, 10, (28, 28, 1))
  views = []
  for step in (1, 2, 3, 4):
    batch = cache.host_lookup(plain, step=step)
    again = cache.host_lookup(plain, step=step)
    np.testing.assert_array_equal(batch['image'], again['image'])
    np.testing.assert_allclose(
        batch['teacher_logits'], online.forward(online.variables, batch)[0],
        rtol=1e-4, atol=1e-4)
    views.append(teachers.choose_views(plain['id'], step, 2, 7))
  assert np.any(views[0] != views[1])  # Views are redrawn per appearance.
  assert np.mean(np.any(batch['image'] != plain['image'], (1, 2, 3))) > 0.5


@pytest.mark.parametrize('arg, match', [
    ('augment="none"', r"holds 2 views made with augment='mnist_jitter'"),
    ('augment="cifar"', r"holds 2 views made with augment='mnist_jitter'"),
    ('augment="mnist_jitter",mixup_alpha=0.2', r'no cached view describes'),
])
def test_multi_view_cache_refuses_a_stream_its_views_do_not_describe(
    views_cache, arg, match):
  config = cached_config(views_cache, arg)
  with pytest.raises(ValueError, match=match):
    teachers.load_cache(config, info_of(config))


@pytest.mark.slow
def test_augmented_run_trains_from_a_multi_view_cache(tmp_path, views_cache):
  summary = train.train_and_evaluate(
      cached_config(views_cache, 'augment="mnist_jitter"'), str(tmp_path))
  assert 0 <= summary['eval']['test']['teacher_accuracy'] <= 1
  assert np.isfinite(summary['eval']['test']['loss'])


# Caches exported in shards, one per process.


@pytest.fixture(scope='session')
def sharded_cache(tmp_path_factory, teacher_dir):
  """The cache of `cache_dir` exported as two processes would: process i
  writes its data share of each split to <split>/shard-i-of-2/."""
  out = str(tmp_path_factory.mktemp('sharded'))
  config = tiny('mnist5k_distill_cached', f'teacher_workdir={teacher_dir}')
  for process in range(2):
    export_logits.export(config, out, process_index=process, process_count=2,
                         overwrite=process > 0, write_csv=False)
  return out


@pytest.fixture(scope='session')
def split_cache(tmp_path_factory, cache_dir):
  """`cache_dir`'s rows laid out as a two-process export writes them: each
  process's data share of each split in <split>/shard-i-of-2/ (the reader's
  fixture; `sharded_cache` is the exporter's, in the slow set)."""
  out = str(tmp_path_factory.mktemp('split'))
  for split in SPLIT_SIZES:
    manifest, ids, arrays = teachers.read_cache_arrays(cache_dir, split)
    labels = teachers.read_cache_labels(cache_dir, split, len(ids))
    row_of = {bytes(i): r for r, i in enumerate(ids)}
    for process in range(2):
      share = [row_of[bytes(i)] for b in input_pipeline.iterate_split(
          cached_config(cache_dir), split, num_devices=2,
          process_index=process, process_count=2) for i in b['id'][b['mask']]]
      logits_cache.write_split(
          os.path.join(out, split, logits_cache.shard_name(process, 2)),
          ids=ids[share], labels=labels[share],
          logits=np.asarray(arrays['logits'])[share],
          class_names=manifest['class_names'],
          manifest=dict(manifest, num_examples=len(share)), write_csv=False)
  return out


@pytest.mark.slow
def test_shards_hold_each_process_share_with_the_one_process_logits(
    sharded_cache, cache_dir):
  for split, size in SPLIT_SIZES.items():
    shards = teachers.cache_shards(sharded_cache, split)
    assert shards == ['shard-00000-of-00002', 'shard-00001-of-00002']
    parts = [teachers.read_cache_arrays(sharded_cache, split, shard=s)
             for s in shards]
    share = [set(bytes(i) for i in ids) for _, ids, _ in parts]
    assert not share[0] & share[1] and len(share[0] | share[1]) == size
    # Each shard is the share that process's data stream reads.
    for process, ids in enumerate(share):
      stream = input_pipeline.iterate_split(
          cached_config(cache_dir), split, num_devices=2,
          process_index=process, process_count=2)
      assert ids == {bytes(i) for b in stream for i in b['id'][b['mask']]}
    # The one-process export's logits, id by id (up to the float rounding
    # of batches half as large).
    _, whole_ids, whole = teachers.read_cache_split(cache_dir, split)
    _, ids, logits = teachers.read_cache_split(sharded_cache, split)
    order = np.argsort(ids)
    np.testing.assert_array_equal(ids[order], np.sort(whole_ids))
    np.testing.assert_allclose(logits[order], whole[np.argsort(whole_ids)],
                               rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_one_process_run_trains_from_every_shard_like_the_whole_cache(
    tmp_path, sharded_cache, offline_test_metrics):
  test = train.train_and_evaluate(cached_config(sharded_cache),
                                  str(tmp_path))['eval']['test']
  assert set(test) == set(offline_test_metrics)
  for k, v in offline_test_metrics.items():
    assert test[k] == pytest.approx(v, rel=1e-5), k


def test_each_process_of_a_run_loads_only_its_own_shard(split_cache,
                                                         monkeypatch):
  sharded_cache = split_cache
  config = cached_config(sharded_cache)
  info = info_of(config)
  for process in range(2):
    monkeypatch.setattr(logits_cache, '_process', lambda p=process: (p, 2))
    own = teachers.load_cache(config, info)
    for shard in range(2):
      _, ids, logits = teachers.read_cache_arrays(
          sharded_cache, 'test', shard=f'shard-0000{shard}-of-00002')
      batch = dict(id=ids[:4], image=np.zeros((4, 28, 28, 1), np.float32))
      if shard == process:
        np.testing.assert_array_equal(
            own.host_lookup(batch)['teacher_logits'], logits['logits'][:4])
      else:  # The other process's examples are not in this one's index.
        with pytest.raises(KeyError, match='is not in the logits cache'):
          own.host_lookup(batch)


def test_export_of_a_shard_needs_its_index_and_the_process_count(tmp_path):
  config = tiny('mnist5k_distill_cached', 'teacher_workdir=unused')
  with pytest.raises(ValueError, match='give both'):
    export_logits.export(config, str(tmp_path), process_index=1)


def test_missing_or_mixed_shards_are_refused(tmp_path, split_cache):
  sharded_cache = split_cache
  out = str(tmp_path / 'cache')
  shutil.copytree(sharded_cache, out)
  config = cached_config(out)
  shutil.rmtree(os.path.join(out, 'test', 'shard-00001-of-00002'))
  with pytest.raises(FileNotFoundError,
                     match=r"1 of the 2 shards .*shard-00001-of-00002.*on 2 "
                           r"processes"):
    teachers.load_cache(config, info_of(config))
  shutil.copytree(os.path.join(sharded_cache, 'test', 'shard-00001-of-00002'),
                  os.path.join(out, 'test', 'shard-00001-of-00003'))
  with pytest.raises(ValueError, match=r'exports by \[2, 3\] processes'):
    teachers.load_cache(config, info_of(config))


@pytest.mark.slow
def test_export_cli_prints_its_lines_and_no_library_logs(tmp_path,
                                                         teacher_dir):
  done = subprocess.run(
      [sys.executable, '-m', 'kd_jax.export_logits',
       f'--config={ROOT}/configs/mnist5k_distill_cached.py:runlocal,'
       f'teacher_workdir={teacher_dir}', f'--out={tmp_path / "cache"}',
       '--nocsv'], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert 'test: 1000 examples, 1 view' in done.stdout
  # absl / TensorFlow INFO and WARNING lines start with I or W and the date.
  noisy = [line for line in done.stderr.splitlines()
           if re.match(r'[IW]\d{4} ', line)]
  assert not noisy, noisy[:5]
