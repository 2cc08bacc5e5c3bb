"""What the byte-level text builders share: vocabulary, split rule, examples.

A text dataset stores its UTF-8 bytes as token ids 0..255: one fixed
vocabulary for every corpus, so that a teacher, a student and a logits cache
agree on it without a vocabulary file, and a corpus whose characters change
(Python's documentation, between releases) never shifts an id. For ASCII
text (tiny-shakespeare) a byte is a character, so bits per byte are bits
per character.

Splits follow nanoGPT's `prepare.py`: the first `int(0.9 * n)` bytes are
`train`, the rest `validation`. Each split is stored in order as examples of
`CHUNK` bytes (the last one shorter): `tokens` uint8 [<= CHUNK], `start`
(the chunk's offset in its split) and `id` (`'<name>/<split>/<chunk>'`).
`kd_jax.data.text` reads a split back as one array and cuts the windows.
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib

import numpy as np
import tensorflow_datasets as tfds

VOCAB_SIZE = 256  # Token ids are bytes.
CHUNK = 4096  # Bytes per stored example.
TRAIN_FRACTION = 0.9


def split_text(data: bytes) -> dict[str, np.ndarray]:
  """{'train': the first 90% of the bytes, 'validation': the rest} (uint8).

  >>> {k: v.tolist() for k, v in split_text(b'abcdefghijk').items()}
  {'train': [97, 98, 99, 100, 101, 102, 103, 104, 105], 'validation': [106, 107]}
  """
  tokens = np.frombuffer(data, np.uint8)
  cut = int(len(tokens) * TRAIN_FRACTION)  # As nanoGPT: int(n * 0.9).
  return {'train': tokens[:cut], 'validation': tokens[cut:]}


def features() -> tfds.features.FeaturesDict:
  return tfds.features.FeaturesDict({
      'tokens': tfds.features.Tensor(shape=(None,), dtype=np.uint8),
      'start': tfds.features.Scalar(dtype=np.int64),
      'id': tfds.features.Text(),
  })


def describe(data: bytes) -> dict[str, object]:
  """What the dataset info records of a corpus (`info.metadata`): the
  vocabulary, sizes and the SHA-256 of the whole text."""
  return dict(vocabulary='bytes', vocab_size=VOCAB_SIZE, num_bytes=len(data),
              num_symbols=len(set(data.decode('utf-8'))),
              sha256=hashlib.sha256(data).hexdigest(),
              num_tokens={k: len(v) for k, v in split_text(data).items()})


def generate_chunks(name: str, split: str, tokens: np.ndarray
                    ) -> Iterator[tuple[int, dict]]:
  """The examples of one split: consecutive chunks of `CHUNK` tokens."""
  for index, start in enumerate(range(0, len(tokens), CHUNK)):
    yield index, {'tokens': tokens[start:start + CHUNK], 'start': start,
                  'id': f'{name}/{split}/{index:05d}'}
