"""Per-token LM caches written per process (kd_jax.lm_cache): each process's
share of the windows in its own shard, each process of a run on as many
reading only its own; a random decoder_tiny teacher on a short made-up text,
so that nothing trains (tests/test_multiprocess.py exports and trains on two
real processes)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from kd_jax import lm_cache
from kd_jax import lm_train
from kd_jax import models
from kd_jax.config_lib import load_config
from kd_jax.data import text

LENGTH = 32  # The runlocal window.
TOKENS = np.frombuffer(b'Now is the winter of our discontent. ' * 10,
                       np.uint8)  # 370 tokens: 12 windows.
SHARDS = ['shard-00000-of-00002', 'shard-00001-of-00002']


def config():
  return load_config('shakespeare_char', 'runlocal,distill.temperature=2.0,'
                     'distill.teacher_workdir="unused"')


def random_teacher(config, mesh, workdir=None):
  """lm_train._load_teacher's (model, params, info), of an untrained
  decoder_tiny."""
  del mesh, workdir
  spec = ml_collections.ConfigDict(dict(name='decoder_tiny', block_size=32))
  model = models.get_model(spec, config.vocab_size)
  params = model.init(jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  return model, params['params'], dict(step=0, model=spec.to_dict())


@pytest.fixture(scope='module')
def caches(tmp_path_factory):
  """(a one-process export, the same split exported as 2 shards)."""
  root = tmp_path_factory.mktemp('lm_cache')
  whole, sharded = str(root / 'whole'), str(root / 'sharded')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_train, '_load_teacher', random_teacher)
    patch.setattr(text, 'load_split', lambda *args: TOKENS)
    lm_cache.export(config(), whole, k=4)
    for index in range(2):
      manifest = lm_cache.export(config(), sharded, k=4, process_index=index,
                                 process_count=2)
      assert manifest['shard'] == dict(
          index=index, count=2, first_window=6 * index, num_windows=6)
  return whole, sharded


def test_each_process_of_as_many_reads_only_its_own_shard(caches):
  whole_dir, sharded_dir = caches
  assert sorted(os.listdir(sharded_dir)) == SHARDS
  whole = lm_cache.load(whole_dir, config(), TOKENS)
  for name in lm_cache.FILES:  # The shards are the whole export, cut.
    np.testing.assert_array_equal(
        np.concatenate([getattr(s, name) for s in lm_cache.load(
            sharded_dir, config(), TOKENS).shards]),
        getattr(whole.shards[0], name))
  for process in range(2):
    own = lm_cache.load(sharded_dir, config(), TOKENS, process_index=process,
                        process_count=2)
    assert [s.name for s in own.shards] == [SHARDS[process]]
    assert own.num_shares == 2 and 'shard' not in own.manifest
    for step in range(20):  # This process's rows come from its shard alone.
      batch = text.train_batch(TOKENS, seed=0, step=step, batch_size=8,
                               length=LENGTH, process_index=process,
                               process_count=2, aligned=True, shares=2)
      got, want = lm_cache.lookup(own, batch), lm_cache.lookup(whole, batch)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key], err_msg=key)
  # Process 1's rows are not in process 0's shard.
  first = lm_cache.load(sharded_dir, config(), TOKENS, process_index=0,
                        process_count=2)
  with pytest.raises(ValueError, match=r'in none of the shards.*shares=2'):
    lm_cache.lookup(first, text.train_batch(
        TOKENS, seed=0, step=0, batch_size=8, length=LENGTH, process_index=1,
        process_count=2, aligned=True, shares=2))
  for count in (1, 3):  # Other process counts read every shard.
    assert [s.name for s in lm_cache.load(
        sharded_dir, config(), TOKENS, process_index=0,
        process_count=count).shards] == SHARDS


def edited_copy(sharded_dir, tmp_path, edit):
  out = str(tmp_path / 'edited')
  shutil.copytree(sharded_dir, out)
  edit(out)
  return out


def retire_manifest(out):
  os.remove(os.path.join(out, SHARDS[1], lm_cache.MANIFEST))


def another_teacher(out):
  path = os.path.join(out, SHARDS[1], lm_cache.MANIFEST)
  with open(path) as f:
    manifest = json.load(f)
  with open(path, 'w') as f:
    json.dump(dict(manifest, teacher_checksum='0' * 32), f)


def a_third_process(out):
  os.makedirs(os.path.join(out, 'shard-00002-of-00003'))


def a_whole_export(out):
  shutil.copy(os.path.join(out, SHARDS[0], lm_cache.MANIFEST), out)


@pytest.mark.parametrize('edit, error, match', [
    (retire_manifest, FileNotFoundError,
     r'1 of the 2 shards .* missing or unfinished \(e.g. shard-00001-of-00002'),
    (another_teacher, ValueError,
     r'shard-00001-of-00002 and shard-00000-of-00002 come from two exports '
     r"\(they differ in \['teacher_checksum'\]\)"),
    (a_third_process, ValueError, r'mixes the shards of exports by \[2, 3\]'),
    (a_whole_export, ValueError, 'holds a one-process export and shards'),
], ids=['missing', 'another_teacher', 'another_count', 'whole_and_shards'])
def test_missing_or_mixed_shards_are_refused_by_name(caches, tmp_path, edit,
                                                     error, match):
  with pytest.raises(error, match=match):
    lm_cache.load(edited_copy(caches[1], tmp_path, edit), config(), TOKENS,
                  process_index=0, process_count=2)


def test_an_export_refuses_an_out_that_holds_shards(caches):
  with pytest.raises(FileExistsError, match='already holds a cache'):
    lm_cache.export(config(), caches[1], k=4, process_index=0,
                    process_count=3)
