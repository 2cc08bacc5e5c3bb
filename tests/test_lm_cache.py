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
from kd_jax import losses
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


STRIDE = 8


@pytest.fixture(scope='module')
def position_caches(tmp_path_factory):
  """(a one-process positions export with the teacher windows every 8
  tokens, the same as 2 shards)."""
  root = tmp_path_factory.mktemp('lm_cache_positions')
  whole, sharded = str(root / 'whole'), str(root / 'sharded')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_train, '_load_teacher', random_teacher)
    patch.setattr(text, 'load_split', lambda *args: TOKENS)
    lm_cache.export(config(), whole, k=4, layout='positions', stride=STRIDE,
                    batch_size=5)
    for index in range(2):
      lm_cache.export(config(), sharded, k=4, process_index=index,
                      process_count=2, layout='positions', stride=STRIDE)
  return whole, sharded


def test_a_positions_cache_holds_each_target_from_a_long_context(
    position_caches):
  cache = lm_cache.load(position_caches[0], config(), TOKENS)
  assert cache.layout == 'positions' and cache.num_shares == 1
  assert cache.manifest['num_positions'] == len(TOKENS) - 1
  (shard,) = cache.shards
  assert shard.topk_logits.shape == (len(TOKENS) - 1, 4)
  model, params, _ = random_teacher(config(), None)
  seen = set()
  for t in range(len(TOKENS) - 1):  # Target t: token t + 1.
    j = 0 if t < LENGTH else (t - LENGTH) // STRIDE + 1
    start = j * STRIDE
    context = t - start + 1
    assert context >= (1 if j == 0 else LENGTH - STRIDE + 1)
    assert context <= LENGTH
    window = text.windows_at(TOKENS, np.array([start]), LENGTH)
    logits = np.asarray(model.apply({'params': params}, window['inputs']))
    np.testing.assert_allclose(shard.topk_logits[t],
                               np.sort(logits[0, t - start])[::-1][:4],
                               rtol=1e-3, atol=1e-3)
    seen.add(t)
  assert seen == set(range(len(TOKENS) - 1))
  assert not np.any(np.all(shard.topk_logits == 0, axis=-1))


def test_a_run_from_a_positions_cache_reads_windows_at_any_offset(
    position_caches):
  whole = lm_cache.load(position_caches[0], config(), TOKENS)
  starts = set()
  for step in range(10):
    batch = text.train_batch(TOKENS, seed=0, step=step, batch_size=8,
                             length=LENGTH)
    starts |= set((batch['start'] % LENGTH).tolist())
    got = lm_cache.lookup(whole, batch)
    for b, start in enumerate(batch['start']):
      rows = start + np.arange(LENGTH)
      valid = batch['mask'][b]
      np.testing.assert_array_equal(
          got['topk_logits'][b][valid],
          whole.shards[0].topk_logits[rows[valid]].astype(np.float32))
      assert not got['rest_mass'][b][~valid].any()
  assert len(starts) > 1  # Not only the tiling windows.
  # The shards, each loaded by every process, give the same targets.
  for process in range(2):
    sharded = lm_cache.load(position_caches[1], config(), TOKENS,
                            process_index=process, process_count=2)
    assert [s.name for s in sharded.shards] == SHARDS
    assert sharded.num_shares == 1
    batch = text.train_batch(TOKENS, seed=1, step=3, batch_size=8,
                             length=LENGTH, process_index=process,
                             process_count=2)
    got, want = lm_cache.lookup(sharded, batch), lm_cache.lookup(whole, batch)
    for key in want:
      np.testing.assert_array_equal(got[key], want[key], err_msg=key)


def test_the_train_stream_draws_a_positions_caches_windows_anywhere(
    position_caches):
  c = config()
  cache = lm_cache.load(position_caches[0], c, TOKENS)
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  batch = next(lm_train._train_stream(c, TOKENS, 2, cache, mesh))  # pylint: disable=protected-access
  want = lm_cache.lookup(cache, text.train_batch(
      TOKENS, seed=c.seed, step=2, batch_size=c.batch_size, length=LENGTH))
  for key in ('inputs', 'topk_logits', 'rest_mass'):
    np.testing.assert_array_equal(np.asarray(batch[key]), want[key])


@pytest.mark.parametrize('kwargs, match', [
    (dict(layout='rows'), "layout='rows'; choose one of"),
    (dict(stride=LENGTH + 1), r'stride=33 must be in \[1, '),
    (dict(layout='positions', stride=0), r'stride=0 must be in \[1, '),
    (dict(layout='positions', stride=LENGTH + 1), 'config.length=32'),
])
def test_bad_layouts_and_strides_are_refused_by_name(tmp_path, kwargs, match):
  with pytest.raises(ValueError, match=match):
    lm_cache.export(config(), str(tmp_path / 'c'), k=4, **kwargs)


def test_a_windows_cache_with_a_stride_holds_overlapping_windows(tmp_path):
  out = str(tmp_path / 'stride8')
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_train, '_load_teacher', random_teacher)
    patch.setattr(text, 'load_split', lambda *args: TOKENS)
    manifest = lm_cache.export(config(), out, k=4, stride=STRIDE,
                               batch_size=5)
  assert manifest['stride'] == STRIDE
  assert manifest['num_windows'] == -(-(len(TOKENS) - 1) // STRIDE)  # 47.
  cache = lm_cache.load(out, config(), TOKENS)
  assert cache.stride == STRIDE and cache.layout == 'windows'
  model, params, _ = random_teacher(config(), None)
  starts = set()
  for step in range(6):
    batch = text.train_batch(TOKENS, seed=0, step=step, batch_size=8,
                             length=LENGTH, aligned=True, stride=STRIDE)
    assert not np.any(batch['start'] % STRIDE)
    starts |= set((batch['start'] % LENGTH).tolist())
    got = lm_cache.lookup(cache, batch)
    logits = np.asarray(model.apply({'params': params}, batch['inputs']))
    top = np.sort(logits, -1)[..., ::-1][..., :4]
    valid = batch['mask']
    np.testing.assert_allclose(got['topk_logits'][valid], top[valid],
                               rtol=1e-3, atol=1e-3)
  assert len(starts) > 1  # Not only the tiling's starts.
  with pytest.raises(ValueError, match='multiples of 8'):
    lm_cache.lookup(cache, text.train_batch(
        TOKENS, seed=0, step=1, batch_size=8, length=LENGTH))
  # A run from it draws those windows.
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  c = config()
  batch = next(lm_train._train_stream(c, TOKENS, 4, cache, mesh))  # pylint: disable=protected-access
  np.testing.assert_array_equal(np.asarray(batch['inputs']), text.train_batch(
      TOKENS, seed=c.seed, step=4, batch_size=c.batch_size, length=LENGTH,
      aligned=True, stride=STRIDE)['inputs'])


def test_quantized_logits_are_steps_below_the_largest_capped_at_255():
  values = jnp.array([[5.0, 4.97, 4.0, 3.0 - 3 / 64, -20.0]])
  steps = lm_cache.quantize(values, 1 / 16)
  assert steps.dtype == jnp.uint8
  np.testing.assert_array_equal(steps, [[0, 0, 16, 33, 255]])
  got = lm_cache.dequantize(np.asarray(steps), 1 / 16)
  assert got.dtype == np.float32
  # Within half a step of the largest-relative logits, but the capped one.
  np.testing.assert_allclose(got[0, :4], values[0, :4] - 5.0, atol=1 / 32)
  assert got[0, 4] == -255 / 16


def test_a_uint8_cache_is_the_float16_caches_logits_to_half_a_step(tmp_path):
  out = {}
  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(lm_train, '_load_teacher', random_teacher)
    patch.setattr(text, 'load_split', lambda *args: TOKENS)
    for dtype in ('float16', 'uint8'):
      out[dtype] = str(tmp_path / dtype)
      manifest = lm_cache.export(config(), out[dtype], k=6, dtype=dtype,
                                 step=1 / 64, layout='positions',
                                 stride=STRIDE)
  # k bytes of steps, k of ids and a float16 tail: 2k + 2.
  assert manifest['bytes_per_token'] == 14
  assert (manifest['dtype'], manifest['step'], manifest['rest_dtype']) == (
      'uint8', 1 / 64, 'float16')
  caches = {d: lm_cache.load(o, config(), TOKENS) for d, o in out.items()}
  assert caches['uint8'].shards[0].topk_logits.dtype == np.uint8
  batch = text.train_batch(TOKENS, seed=0, step=3, batch_size=8,
                           length=LENGTH)
  got = {d: lm_cache.lookup(c, batch) for d, c in caches.items()}
  for key in ('topk_indices', 'rest_mass'):
    np.testing.assert_array_equal(got['uint8'][key], got['float16'][key])
  valid = batch['mask']
  exact = got['float16']['topk_logits']
  exact = exact - exact[..., :1]
  quantized = got['uint8']['topk_logits']
  assert np.all(quantized[..., 0] == 0)
  # Half a step, and the float16 logits' own rounding (|logit| < 8).
  np.testing.assert_allclose(quantized[valid], exact[valid],
                             atol=1 / 128 + 2 * 2**-8)
  assert np.abs(quantized[valid] - exact[valid]).max() > 0  # Not the same.
  # The sparse KL from either is nearly the same.
  student = jax.random.normal(jax.random.key(1), (*valid.shape, 256))
  kl = {d: np.asarray(losses.sparse_token_divergence(
      student, g['topk_logits'], g['topk_indices'], g['rest_mass'],
      where=valid)) for d, g in got.items()}
  # (A first-order change: each position within 2% of the mean KL,
  # the mean within 1%.)
  scale = kl['float16'][valid].mean()
  np.testing.assert_allclose(kl['uint8'], kl['float16'], atol=scale / 50)
  assert abs(kl['uint8'][valid].mean() / scale - 1) < 0.01


@pytest.mark.parametrize('kwargs, match', [
    (dict(dtype='int8'), r"dtype='int8'; choose one of \('float16'"),
    (dict(dtype='uint8', step=0.0), 'step=0.0 must be a finite number > 0'),
])
def test_bad_cache_dtypes_and_steps_are_refused_by_name(tmp_path, kwargs,
                                                        match):
  with pytest.raises(ValueError, match=match):
    lm_cache.export(config(), str(tmp_path / 'c'), k=4, **kwargs)


def test_a_cache_whose_arrays_are_not_its_manifests_dtype_is_refused(caches,
                                                                     tmp_path):
  def as_uint8(out):
    for name in SHARDS:
      path = os.path.join(out, name, lm_cache.MANIFEST)
      with open(path) as f:
        manifest = json.load(f)
      with open(path, 'w') as f:
        json.dump(dict(manifest, dtype='uint8', step=1 / 16), f)

  with pytest.raises(ValueError, match=r'topk_logits.npy holds float16, not '
                     r"the uint8 of the manifest's dtype 'uint8'"):
    lm_cache.load(edited_copy(caches[1], tmp_path, as_uint8), config(),
                  TOKENS)

  def unknown(out):
    as_uint8(out)
    for name in SHARDS:
      path = os.path.join(out, name, lm_cache.MANIFEST)
      with open(path) as f:
        manifest = json.load(f)
      with open(path, 'w') as f:
        json.dump(dict(manifest, dtype='bfloat16'), f)

  with pytest.raises(ValueError, match=r"has dtype 'bfloat16' .*export the "
                     'cache again'):
    lm_cache.load(edited_copy(caches[1], tmp_path / 'b', unknown), config(),
                  TOKENS)
