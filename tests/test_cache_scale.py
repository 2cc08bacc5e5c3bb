"""Logits caches at ImageNet scale: a synthetic 2M-example x 100-class
float16 cache, written batch by batch and read memory-mapped, indexed
without a Python object per example, both at constant host memory."""

import json
import os

import numpy as np
import pytest
from numpy.lib import format as npy_format

from kd_jax.teachers import cache

NUM_IDS, NUM_CLASSES, BATCH = 2_000_000, 100, 256


def anonymous_rss_bytes() -> int:
  """This process's resident anonymous memory (heap, not mapped files)."""
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith('RssAnon:'):
        return int(line.split()[1]) * 1024
  pytest.skip('/proc/self/status has no RssAnon on this system')


def example_ids(rows: np.ndarray) -> np.ndarray:
  return np.char.add(b'ex/', np.char.zfill(rows.astype(np.bytes_), 7))


def row_values(rows: np.ndarray) -> np.ndarray:
  """Each row's logits, recomputable from its index: row r, class c holds
  (r % 1000) / 100 + c / 10 in float16."""
  return ((rows[:, None] % 1000) / 100 + np.arange(NUM_CLASSES) / 10
          ).astype(np.float16)


@pytest.fixture(scope='module')
def big_cache(tmp_path_factory):
  """A dense cache split 'train' of NUM_IDS rows, written batch by batch by
  `cache.SplitWriter`; returns (root, growth of anonymous memory while
  writing)."""
  root = tmp_path_factory.mktemp('big_cache')
  writer = cache.SplitWriter(str(root / 'train'), dtype='float16',
                             topk=False, class_names=[], write_csv=False)
  before = peak = anonymous_rss_bytes()
  for start in range(0, NUM_IDS, 1 << 16):
    rows = np.arange(start, min(start + (1 << 16), NUM_IDS))
    writer.add(example_ids(rows), np.zeros(len(rows), np.int32),
               {'logits': row_values(rows)})
    peak = max(peak, anonymous_rss_bytes())
  writer.close(dict(form='dense', num_classes=NUM_CLASSES,
                    num_examples=NUM_IDS, preprocessing=dict(num_views=1),
                    teacher_fingerprint='synthetic', dataset='synthetic',
                    split='train', class_names=[], dtype='float16'))
  return str(root), peak - before


@pytest.mark.slow
def test_a_cache_is_written_at_constant_host_memory(big_cache):
  root, growth = big_cache
  logits = np.load(os.path.join(root, 'train', 'logits.npy'), mmap_mode='r')
  assert logits.shape == (NUM_IDS, NUM_CLASSES) and logits.dtype == np.float16
  # 400 MB of logits went to disk; memory grew by the ids and labels kept
  # for the index (28 MB) and one batch's temporaries, not by the logits.
  assert growth < 150e6, growth
  rows = np.array([0, 1, 999_999, NUM_IDS - 1])
  np.testing.assert_array_equal(logits[rows], row_values(rows))
  ids = np.load(os.path.join(root, 'train', 'ids.npy'))
  np.testing.assert_array_equal(ids[rows], example_ids(rows))


@pytest.mark.slow
def test_two_million_ids_are_read_at_constant_host_memory(big_cache):
  root, _ = big_cache
  before = anonymous_rss_bytes()
  _, ids, arrays = cache.read_cache_arrays(root, 'train', mmap=True)
  assert isinstance(arrays['logits'], np.memmap)
  index = cache.IdIndex([ids])
  tables = [{k: v[:, None] for k, v in arrays.items()}]
  built = anonymous_rss_bytes() - before
  # The ids (20 MB) and the index's sorted copies: about 60 bytes per id.
  # Dense logits would be 400 MB, a dict of bytes ids over 200 MB.
  assert built < 150e6, built
  rng = np.random.default_rng(0)

  def step():
    rows = rng.integers(0, NUM_IDS, BATCH)
    batch_ids = example_ids(rows).astype(object)
    got = cache.lookup_rows(index, tables, batch_ids, np.zeros(BATCH, int),
                            form='dense', top_k=None, temperature=None,
                            num_classes=NUM_CLASSES, cache_dir=root)
    np.testing.assert_array_equal(got['teacher_logits'],
                                  row_values(rows).astype(np.float32))

  for _ in range(20):
    step()
  warm = anonymous_rss_bytes()
  for _ in range(200):
    step()
  # 200 more batches of 256 random rows: no growth beyond allocator noise.
  assert anonymous_rss_bytes() - warm < 8e6


@pytest.mark.slow
def test_a_damaged_row_is_found_without_loading_the_cache(big_cache,
                                                          tmp_path):
  _, ids, arrays = cache.read_cache_arrays(big_cache[0], 'train', mmap=True)
  values = np.lib.format.open_memmap(tmp_path / 'v.npy', mode='w+',
                                     dtype=np.float16,
                                     shape=(NUM_IDS, NUM_CLASSES))
  values[1_999_998, 7] = np.inf
  values.flush()
  with pytest.raises(ValueError, match=r"1 of 2000000 rows hold NaN or Inf; "
                     r"the first is row 1999998 \(id 'ex/1999998'\)"):
    cache.check_finite(np.load(tmp_path / 'v.npy', mmap_mode='r'), ids,
                       'v.npy')
  cache.check_finite(arrays['logits'], ids, 'logits.npy')


def test_index_finds_rows_across_tables_and_names_repeats():
  index = cache.IdIndex([np.asarray([b'b', b'a']), np.asarray([b'c', b'dd'])])
  table, row, found = index.find([b'a', b'dd', b'zz', b'c', b'toolongid'])
  assert found.tolist() == [True, True, False, True, False]
  assert table.tolist() == [0, 1, -1, 1, -1]
  assert row.tolist() == [1, 1, -1, 0, -1]
  assert index.duplicate() is None
  repeated = cache.IdIndex([np.asarray([b'x', b'y']),
                            np.asarray([b'z', b'y', b'x'])])
  # The first repeat met in table order: 'y' at table 1, row 1.
  assert repeated.duplicate() == (b'y', 1)


@pytest.mark.parametrize('topk', [False, True])
def test_writing_in_batches_gives_the_files_of_one_write(tmp_path, topk):
  rng = np.random.default_rng(1)
  ids = np.asarray([f'ex/{i}'.encode() for i in range(50)], object)
  labels = rng.integers(0, 5, 50)
  logits = rng.normal(size=(50, 3, 5)).astype(np.float32)  # 3 views.
  manifest = dict(dtype='float16', num_examples=50,
                  preprocessing=dict(num_views=3))
  arrays = ({'logits': logits} if not topk else dict(zip(
      cache.FORM_ARRAYS['topk'], cache.sparsify(logits, 2, 4.0))))
  cache.write_split(str(tmp_path / 'once'), ids=ids, labels=labels,
                    class_names=list('abcde'), manifest=manifest,
                    **({'logits': logits} if not topk else
                       {'topk': tuple(arrays.values())}))
  writer = cache.SplitWriter(str(tmp_path / 'batches'), dtype='float16',
                             topk=topk, class_names=list('abcde'))
  for start in range(0, 50, 16):
    rows = slice(start, start + 16)
    writer.add(ids[rows], labels[rows], {k: v[rows] for k, v in arrays.items()})
  writer.close(manifest)
  names = sorted(os.listdir(tmp_path / 'once'))
  assert names == sorted(os.listdir(tmp_path / 'batches'))
  assert ('topk.csv' if topk else 'logits.csv') in names
  for name in names:
    assert (open(tmp_path / 'once' / name, 'rb').read()
            == open(tmp_path / 'batches' / name, 'rb').read()), name


def test_a_nan_batch_stops_the_writer_and_leaves_no_split(tmp_path):
  logits = np.zeros((4, 3), np.float32)
  logits[2, 1] = np.nan
  with pytest.raises(ValueError, match=r"row 2 \(id 'c'\)"):
    cache.write_split(str(tmp_path / 'split'), ids=[b'a', b'b', b'c', b'd'],
                      labels=np.zeros(4), class_names=list('xyz'),
                      logits=logits,
                      manifest=dict(dtype='float32', num_examples=4,
                                    preprocessing=dict(num_views=1)))
  assert not os.path.exists(tmp_path / 'split')


def test_write_csv_false_leaves_out_only_the_csv(tmp_path):
  cache.write_split(str(tmp_path), ids=[b'a', b'b'], labels=[0, 1],
                    class_names=['x', 'y'], logits=np.eye(2, dtype=np.float32),
                    manifest=dict(dtype='float32', num_examples=2,
                                  preprocessing=dict(num_views=1)),
                    write_csv=False)
  assert sorted(os.listdir(tmp_path)) == [
      'ids.npy', 'labels.npy', 'logits.npy', cache.MANIFEST]
