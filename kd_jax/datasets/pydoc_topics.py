"""`pydoc_topics`: the Python language reference that ships with Python itself.

`help('if')` reads its text from the standard library's `pydoc_data.topics`:
a dict of 79 topics (statements, expressions, data model, string methods;
about 0.47 MB of English prose and code). This builder joins them in sorted
key order, one blank line apart, and stores the UTF-8 bytes
(`kd_jax.datasets.text_bytes`: vocabulary 256) split as nanoGPT splits
tiny-shakespeare: `train` the first 90% of the bytes, `validation` the rest.
It needs no package and no network: the always-present text corpus.

The text changes between Python releases, patch releases included (the file
is regenerated at each release: 3.11.2 and 3.11.7 differ by about 1 KB), so
no one checksum can hold. Preparing verifies the structure instead (a dict
of strings, at least `MIN_TOPICS` topics including `REQUIRED_TOPICS`, a
size within `SIZE_RANGE`), verifies the checksum where this Python's release
is in `KNOWN_SHA256` (measured on those releases), and records in the
dataset info (`info.metadata`) the Python version, the number of topics and
the SHA-256 of the text, so that two runs can tell whether they read the
same corpus. The data directory keeps the text of the Python that prepared
it.
"""

from __future__ import annotations

from collections.abc import Iterator
from collections.abc import Mapping
import hashlib
import importlib
import platform

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kd_jax.datasets import text_bytes

MIN_TOPICS = 70
REQUIRED_TOPICS = ('assert', 'class', 'for', 'function', 'if', 'import',
                   'lambda', 'try', 'while', 'with')
SIZE_RANGE = (300_000, 2_000_000)  # Bytes of the joined text.
# SHA-256 of the joined text per Python release, measured on CPython builds.
KNOWN_SHA256 = {
    '3.10.13': 'b1882a33e8512d28c4e983e7376fdeac986c374348734197b7ac5dfcb93d6542',
    '3.11.2': 'b0796031be1d1b35e6efa46b7944effd47a0c52a48087d470dde314fe2d66968',
    '3.11.7': '2a95af4ac93f5b719944030ce3769070ddf827d847cba42192afa8da989e5dc4',
    '3.12.1': 'b5bb57d637a700f50d8c7309e7340f40a333fdf2cba89d3f1da81c1b74ee8952',
    '3.13.0': '4b7ff11aae42ee979a50edb5d279a88ae9d80d7216e9ba99add988136ded5fb2',
}
_FIX = ("pydoc_data is part of CPython's standard library; use a complete "
        "Python installation (some distributions' minimal images drop it), "
        "or config.dataset='shakespeare_char'.")


def read_text(topics: Mapping[str, str] | None = None,
              python_version: str | None = None) -> bytes:
  """The topics joined in sorted key order, as UTF-8, verified.

  Args:
    topics: the topics dict (default: this Python's `pydoc_data.topics`).
    python_version: the release whose known checksum applies (default:
      this Python's, `platform.python_version()`).

  Raises:
    FileNotFoundError: this Python has no `pydoc_data.topics`.
    ValueError: the topics do not have the structure of Python's (type,
      count, required topics, size), or differ from the known text of this
      release; the message says what differs.
  """
  where = 'the given topics'
  if topics is None:
    try:
      module = importlib.import_module('pydoc_data.topics')
    except ImportError as e:
      raise FileNotFoundError(f'The standard library has no pydoc_data.topics '
                              f'({e}). {_FIX}') from e
    topics, where = getattr(module, 'topics', None), module.__file__
    python_version = python_version or platform.python_version()
  if not isinstance(topics, Mapping) or not all(
      isinstance(k, str) and isinstance(v, str) for k, v in topics.items()):
    raise ValueError(f'{where} is not a dict of strings. {_FIX}')
  missing = sorted(set(REQUIRED_TOPICS) - set(topics))
  if len(topics) < MIN_TOPICS or missing:
    raise ValueError(f'{where} holds {len(topics)} topics (at least '
                     f'{MIN_TOPICS} expected), missing {missing}. {_FIX}')
  data = '\n'.join(topics[k] for k in sorted(topics)).encode('utf-8')
  if not SIZE_RANGE[0] <= len(data) <= SIZE_RANGE[1]:
    raise ValueError(f'{where} joins into {len(data):,} bytes, outside '
                     f'{SIZE_RANGE[0]:,}..{SIZE_RANGE[1]:,}. {_FIX}')
  digest = hashlib.sha256(data).hexdigest()
  known = KNOWN_SHA256.get(python_version)
  if known is not None and digest != known:
    raise ValueError(f'{where}: the SHA-256 of the joined topics is {digest}, '
                     f"not Python {python_version}'s {known}: the file was "
                     f'changed. {_FIX}')
  return data


class PydocTopics(tfds.core.GeneratorBasedBuilder):
  """Python's pydoc topics as bytes: 90% train / 10% validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'First release: sorted topics, split 90/10.'}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # See mnist5k.py.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=text_bytes.features(),
        homepage='https://docs.python.org/3/reference/',
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # The text's order.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The text ships with Python.
    from pydoc_data import topics  # pylint: disable=g-import-not-at-top
    data = read_text()
    self.info.metadata.update(
        text_bytes.describe(data), python_version=platform.python_version(),
        num_topics=len(topics.topics))
    return {split: self._generate_examples(split, tokens)
            for split, tokens in text_bytes.split_text(data).items()}

  def _generate_examples(self, split: str, tokens: np.ndarray
                         ) -> Iterator[tuple[int, dict]]:
    return text_bytes.generate_chunks(self.name, split, tokens)
