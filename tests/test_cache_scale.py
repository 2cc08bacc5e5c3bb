"""Logits caches at ImageNet scale: a synthetic 2M-example x 100-class
float16 cache, memory-mapped, indexed without a Python object per example,
read batch by batch at constant host memory."""

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
  """A dense cache split 'train' of NUM_IDS rows, written block by block
  into memory-mapped .npy files (never whole in memory)."""
  root = tmp_path_factory.mktemp('big_cache')
  directory = root / 'train'
  directory.mkdir()
  logits = npy_format.open_memmap(directory / 'logits.npy', mode='w+',
                                  dtype=np.float16,
                                  shape=(NUM_IDS, NUM_CLASSES))
  ids = npy_format.open_memmap(directory / 'ids.npy', mode='w+',
                               dtype='S10', shape=(NUM_IDS,))
  for start in range(0, NUM_IDS, 1 << 18):
    rows = np.arange(start, min(start + (1 << 18), NUM_IDS))
    logits[rows] = row_values(rows)
    ids[rows] = example_ids(rows)
  logits.flush()
  ids.flush()
  del logits, ids
  with open(directory / cache.MANIFEST, 'w') as f:
    json.dump(dict(form='dense', num_classes=NUM_CLASSES,
                   preprocessing=dict(num_views=1)), f)
  return str(root)


@pytest.mark.slow
def test_two_million_ids_are_read_at_constant_host_memory(big_cache):
  before = anonymous_rss_bytes()
  _, ids, arrays = cache.read_cache_arrays(big_cache, 'train', mmap=True)
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
                            num_classes=NUM_CLASSES, cache_dir=big_cache)
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
  _, ids, arrays = cache.read_cache_arrays(big_cache, 'train', mmap=True)
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
