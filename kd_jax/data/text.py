"""Text batches: fixed-length windows of a token split, train and eval.

A split of a text dataset (`kd_jax.datasets.TEXT_DATASETS`: byte ids,
vocabulary `VOCAB_SIZE`) fits in memory: `load_split` reads it as one uint8
array, and batches are cut from it with NumPy.

Every batch is a dict of NumPy arrays, one row per window of `length`
tokens:

* `inputs` int32 [B, L]: tokens start .. start + L - 1.
* `targets` int32 [B, L]: tokens start + 1 .. start + L (the next token of
  each input position).
* `mask` bool [B, L]: False where there is no target (padding).
* `start` int64 [B]: each window's offset in the split (-1 for a padding
  row), so target t of row b is token `start[b] + 1 + t` of the split
  (what a per-token teacher cache is keyed by).

Train batches (`train_batch`) are a pure function of (seed, step): the
global batch's window starts are hashed from them, never drawn from a
stateful generator, so a run resumed at step s reads exactly the batches an
uninterrupted run reads from step s on, on any number of processes. Eval
batches (`eval_batches`) cover the split once, in order, in windows that
do not overlap: every token but the first is a target exactly once, and
the last window's missing targets are masked. Each window restarts the
context, so eval losses are those of a model that sees at most `length`
tokens (and fewer at each window's beginning).

Processes: each global batch holds `batch_size` windows whatever the
process count; process p of P takes rows p * B/P .. (p + 1) * B/P, like the
image stream's process-local batches. A per-token cache exported by S
processes holds S shares of the tiling windows (`window_share`); drawn with
`shares=S`, row r of every batch comes from share r * S // B, so on S
processes each reads its own share only, and the batches are the same on
any process count.
"""

from __future__ import annotations

from collections.abc import Iterator
import itertools

import numpy as np

from kd_jax.data import sources
from kd_jax.datasets.text_bytes import VOCAB_SIZE

__all__ = ['VOCAB_SIZE', 'decode', 'encode', 'eval_batches', 'load_split',
           'num_eval_batches', 'num_windows', 'train_batch', 'train_batches',
           'window_share', 'windows_at']


def encode(text: str) -> np.ndarray:
  """Token ids (UTF-8 bytes) of `text`, uint8.

  >>> encode('Hi!').tolist()
  [72, 105, 33]
  """
  return np.frombuffer(text.encode('utf-8'), np.uint8).copy()


def decode(tokens) -> str:
  """The text of byte ids; invalid UTF-8 (a cut character) becomes U+FFFD.

  >>> decode([72, 105, 33])
  'Hi!'
  """
  return bytes(np.asarray(tokens, np.uint8).tolist()).decode(
      'utf-8', errors='replace')


def load_split(dataset: str, split: str, data_dir: str | None = None
               ) -> np.ndarray:
  """All tokens of `split` of a text dataset, in order, as uint8 [N].

  Args:
    dataset: a name in `kd_jax.datasets.TEXT_DATASETS`, e.g.
      'shakespeare_char'.
    split: a split or a TFDS slice of one ('train', 'validation',
      'train[:95%]'; slices cut at the stored 4,096-token chunks).
    data_dir: the TFDS data_dir (prepared there, offline, if need be).

  Raises:
    ValueError: the dataset is not a text dataset, or the split is empty.
  """
  builder = sources._prepared_builder(dataset, data_dir)  # pylint: disable=protected-access
  if 'tokens' not in builder.info.features:
    raise ValueError(f'Dataset {dataset!r} is not a text dataset (it has no '
                     'tokens); use one of kd_jax.datasets.TEXT_DATASETS.')
  ds = builder.as_dataset(split=split, shuffle_files=False)
  chunks, starts = [], []
  for example in ds.as_numpy_iterator():
    chunks.append(example['tokens'])
    starts.append(example['start'])
  if not chunks:
    raise ValueError(f'Split {split!r} of {dataset!r} holds no tokens.')
  # Stored in order (disable_shuffling): each chunk starts where the last ended.
  lengths = np.array([len(c) for c in chunks])
  if np.any(np.diff(starts) != lengths[:-1]):
    raise RuntimeError(f'The chunks of {dataset!r} {split!r} in '
                       f'{builder.data_dir} are not in order; delete that '
                       'folder to prepare the dataset again.')
  return np.concatenate(chunks)


def _check_batch(batch_size: int, length: int, process_index: int,
                 process_count: int) -> int:
  if length < 1:
    raise ValueError(f'length={length} must be >= 1 tokens per window.')
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index={process_index} is not in [0, '
                     f'process_count={process_count}).')
  if batch_size < 1 or batch_size % process_count:
    raise ValueError(f'batch_size={batch_size} must be a positive multiple '
                     f'of process_count={process_count}.')
  return batch_size // process_count


def _windows(tokens: np.ndarray, starts: np.ndarray, length: int
             ) -> dict[str, np.ndarray]:
  """Windows at `starts` (-1: padding); targets past the end are masked."""
  positions = starts[:, None] + np.arange(length + 1)
  valid = (starts[:, None] >= 0) & (positions < len(tokens))
  ids = np.where(valid, tokens[np.where(valid, positions, 0)], 0)
  ids = ids.astype(np.int32)
  return {'inputs': ids[:, :-1], 'targets': ids[:, 1:],
          'mask': valid[:, 1:], 'start': starts.astype(np.int64)}


def windows_at(tokens: np.ndarray, starts: np.ndarray, length: int
               ) -> dict[str, np.ndarray]:
  """The batch of windows at `starts` (-1: a padding row); targets past
  the split's end are masked.

  >>> windows_at(np.arange(6, dtype=np.uint8), np.array([3]), 4)['mask']
  array([[ True,  True, False, False]])
  """
  return _windows(tokens, np.asarray(starts, np.int64), length)


_MASK64 = (1 << 64) - 1


def _hash(*values: int | np.ndarray) -> np.ndarray:
  """SplitMix64 (Steele et al. 2014) chained over `values`: uint64, fixed
  forever (a NumPy release cannot change it, as it may a Generator's)."""
  state = np.zeros((), np.uint64)
  with np.errstate(over='ignore'):
    for value in values:
      z = state ^ np.asarray(value, np.uint64)
      z = z + np.uint64(0x9E3779B97F4A7C15)
      z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
      z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
      state = z ^ (z >> np.uint64(31))
  return state


def train_batch(tokens: np.ndarray, *, seed: int, step: int, batch_size: int,
                length: int, process_index: int = 0, process_count: int = 1,
                aligned: bool = False, shares: int = 1,
                stride: int | None = None) -> dict[str, np.ndarray]:
  """This process's rows of the train batch of `step`.

  The global batch is `batch_size` windows of `length` + 1 tokens whose
  starts are uniform over the split (a hash of (seed, step, row)); nothing
  else enters, so the batch of a step is the same in a resumed run and on
  any number of processes. `aligned` draws only the windows that
  `eval_batches` tiles the split with (starts at multiples of `length`,
  the last one's missing targets masked): those a per-token teacher cache
  holds (`kd_jax.lm_cache`), where each target was predicted from the same
  context. With `shares` S > 1, row r draws among the windows of share
  r * S // batch_size (`window_share`): those of the shard that process
  r * S // batch_size of a cache exported by S processes wrote. `stride`
  (with `aligned`; default `length`) draws among the windows at multiples
  of it instead, those of a per-token cache whose windows overlap.

  Args:
    tokens: the split (`load_split`), at least `length + 1` tokens.
    seed: the run's data seed, >= 0.
    step: the train step, >= 0.
    batch_size: windows per global batch; a multiple of `process_count`.
    length: tokens per window (inputs and targets each).
    process_index, process_count: this process and how many read.
    aligned: draw among the tiling windows only.
    shares: with `aligned`, the window shares the rows are drawn from.
    stride: with `aligned`, the windows' starts are its multiples.

  Returns:
    The batch described in the module docstring; `mask` is all True (but
    past the split's end in an aligned last window).

  >>> tokens = np.arange(100, dtype=np.uint8)
  >>> batch = train_batch(tokens, seed=0, step=3, batch_size=2, length=4)
  >>> bool((batch['targets'] == batch['inputs'] + 1).all())
  True
  """
  local = _check_batch(batch_size, length, process_index, process_count)
  num_starts = len(tokens) - length
  if num_starts < 1:
    raise ValueError(f'The split has {len(tokens)} tokens; a window of '
                     f'length={length} needs {length + 1}.')
  if seed < 0 or step < 0:
    raise ValueError(f'seed={seed} and step={step} must be >= 0.')
  rows = np.arange(process_index * local, (process_index + 1) * local)
  if aligned:
    stride = length if stride is None else stride
    if not 1 <= stride <= length:
      raise ValueError(f'stride={stride} must be in [1, length={length}].')
    windows = num_windows(len(tokens), stride)
    if not 1 <= shares <= windows:
      raise ValueError(f'shares={shares} must be in [1, the {windows} '
                       'windows of the split].')
    first, end = (np.asarray(b, np.uint64) for b in window_share(
        windows, rows * shares // batch_size, shares))
    starts = (first + _hash(seed, step, rows) % (end - first)) * np.uint64(
        stride)
  else:
    starts = _hash(seed, step, rows) % np.uint64(num_starts)
  return _windows(tokens, starts.astype(np.int64), length)


def aligned_windows(starts: np.ndarray, length: int
                    ) -> tuple[np.ndarray, np.ndarray]:
  """(window index, valid) of a batch's aligned `starts` (-1: padding rows,
  index 0); refuses a start that is not a multiple of `length` (the
  windows' stride).

  >>> [a.tolist() for a in aligned_windows(np.array([8, -1, 0]), 4)]
  [[2, 0, 0], [True, False, True]]
  """
  valid = starts >= 0
  if np.any(valid & (starts % length != 0)):
    raise ValueError('lookup takes aligned windows (starts at multiples of '
                     f'{length}): cut train batches with '
                     f'text.train_batch(aligned=True, stride={length}).')
  return np.where(valid, starts // length, 0), valid


def window_share(num_windows: int, index, count: int):
  """(first, end): the windows first .. end - 1 of share `index` of `count`
  that split `num_windows` tiling windows into contiguous runs whose sizes
  differ by at most one (what process `index` of a per-token cache exported
  by `count` processes holds). `index` may be an array.

  >>> [window_share(10, i, 3) for i in range(3)]
  [(0, 3), (3, 6), (6, 10)]
  """
  return index * num_windows // count, (index + 1) * num_windows // count


def num_windows(num_tokens: int, length: int) -> int:
  """Windows of `length` targets that tile a split of `num_tokens` tokens
  (the last one may be shorter); with `length` a stride S, the windows that
  start at multiples of S and hold a target.

  >>> num_windows(11, 4)  # Targets 1..10: 4 + 4 + 2.
  3
  """
  return -(-max(num_tokens - 1, 0) // length)


def train_batches(tokens: np.ndarray, *, seed: int, batch_size: int,
                  length: int, start_step: int = 0, process_index: int = 0,
                  process_count: int = 1, aligned: bool = False,
                  shares: int = 1, stride: int | None = None
                  ) -> Iterator[dict[str, np.ndarray]]:
  """`train_batch` of steps start_step, start_step + 1, ... forever."""
  for step in itertools.count(start_step):
    yield train_batch(tokens, seed=seed, step=step, batch_size=batch_size,
                      length=length, process_index=process_index,
                      process_count=process_count, aligned=aligned,
                      shares=shares, stride=stride)


def num_eval_batches(num_tokens: int, batch_size: int, length: int) -> int:
  """Global batches in an eval pass over `num_tokens` tokens.

  >>> num_eval_batches(num_tokens=11, batch_size=2, length=4)  # 3 windows.
  2
  """
  return max(1, -(-num_windows(num_tokens, length) // batch_size))


def eval_batches(tokens: np.ndarray, *, batch_size: int, length: int,
                 process_index: int = 0, process_count: int = 1
                 ) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the split in order: this process's rows of each batch.

  Window w starts at token w * length; the windows tile the targets
  1 .. N - 1 exactly once. Rows past the last window are padding (`start`
  -1, `mask` False), so every process yields `num_eval_batches` batches.

  >>> tokens = np.arange(11, dtype=np.uint8)  # 10 targets: 4 + 4 + 2.
  >>> [b['mask'].sum(axis=1).tolist()
  ...  for b in eval_batches(tokens, batch_size=2, length=4)]
  [[4, 4], [2, 0]]
  """
  local = _check_batch(batch_size, length, process_index, process_count)
  windows = num_windows(len(tokens), length)
  for batch in range(num_eval_batches(len(tokens), batch_size, length)):
    rows = batch * batch_size + process_index * local + np.arange(local)
    starts = np.where(rows < windows, rows * length, -1)
    yield _windows(tokens, starts, length)
