"""Data-layer plug-ins: a registered plug-in relabels a run and changes its
train stream; the data layer itself imports no plug-in."""

import ast
import dataclasses
import itertools
import os

import numpy as np
import pytest
import tensorflow as tf

from kd_jax import config_lib
from kd_jax import input_pipeline
from kd_jax.data import stream

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DATA_MODULES = [os.path.join('kd_jax', 'input_pipeline.py')] + [
    os.path.join('kd_jax', 'data', f)
    for f in sorted(os.listdir(os.path.join(REPO, 'kd_jax', 'data')))
    if f.endswith('.py')]


def _imports(path):
  tree = ast.parse(open(os.path.join(REPO, path)).read())
  for node in ast.walk(tree):
    if isinstance(node, ast.Import):
      yield from (a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom):
      yield from (f'{node.module}.{a.name}' for a in node.names)


@pytest.mark.parametrize('path', DATA_MODULES)
def test_data_layer_does_not_import_the_specialists(path):
  assert len(DATA_MODULES) >= 5
  assert not [m for m in _imports(path) if 'specialist' in m]


@dataclasses.dataclass(frozen=True)
class Parity:
  """Relabels digits to even (0) / odd (1); trains on even digits only."""
  class_names = ('even', 'odd')
  label_map = np.arange(10) % 2

  def train_stream(self, plan, examples, epochs):
    even = examples.filter(lambda ex: ex['label'] % 2 == 0)
    return tf.data.Dataset.range(2**62).flat_map(epochs(even, stream=1))

  def info(self, plan, first, keep):
    return {'plugin': 'parity', 'processes': plan.topology.process_count}


def _parity(config, class_names):
  return Parity() if config.get('parity') else None


def _config(data_dir, parity=True):
  config = config_lib.default_config()
  config.data_dir, config.dataset = data_dir, 'digits'
  config.batch_size = config.eval_batch_size = 64
  config.parity = parity
  return config


def test_a_registered_plugin_relabels_every_split_and_owns_the_stream(
    data_dir, monkeypatch):
  monkeypatch.setattr(stream, '_PLUGINS', [])
  input_pipeline.register_plugin(_parity)
  input_pipeline.register_plugin(_parity)  # Registering twice adds it once.
  data = input_pipeline.get_datasets(_config(data_dir), num_devices=1,
                                     process_index=0, process_count=1)
  assert data.info.class_names == ('even', 'odd')
  assert data.info.num_classes == 2
  assert data.info.specialist == {'plugin': 'parity', 'processes': 1}
  train = list(itertools.islice(data.train, 5))
  assert all((b['label'] == 0).all() for b in train)  # Even digits only.
  labels = np.concatenate([b['label'][b['mask']]
                           for b in data.eval['test']()])
  assert set(labels.tolist()) == {0, 1}
  assert abs(labels.mean() - 0.5) < 0.1

  plain = input_pipeline.get_datasets(_config(data_dir, parity=False),
                                      num_devices=1, process_index=0,
                                      process_count=1)
  assert plain.info.num_classes == 10 and plain.info.specialist is None


def test_two_plugins_for_one_run_are_refused(data_dir, monkeypatch):
  monkeypatch.setattr(stream, '_PLUGINS', [])
  input_pipeline.register_plugin(_parity)
  input_pipeline.register_plugin(lambda config, names: Parity())
  with pytest.raises(ValueError, match='2 data plug-ins apply'):
    input_pipeline.get_datasets(_config(data_dir), num_devices=1,
                                process_index=0, process_count=1)


def test_the_specialists_plugin_is_registered_by_importing_kd_jax():
  from kd_jax.specialists import data as specialist_data  # pylint: disable=g-import-not-at-top
  assert specialist_data.plugin in stream._PLUGINS  # pylint: disable=protected-access
