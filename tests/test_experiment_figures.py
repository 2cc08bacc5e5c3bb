"""experiments/temperature/plot.py and experiments/size_speed/measure.py, tiny.

Both scripts run in-process in their --tiny mode: plot.py trains a runlocal
mnist5k teacher and draws its figures; measure.py then measures every model
of the project's pairs and reads that teacher's accuracy as a demo run's.
"""

import importlib.util
import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'

# One worker builds `tiny_runs`; the tests that read it are slow.
pytestmark = pytest.mark.xdist_group('experiment_figures')


def _load_script(relative_path: str, name: str):
  spec = importlib.util.spec_from_file_location(
      name, os.path.join(ROOT, relative_path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # dataclasses look their module up there.
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='session')
def plot():
  return _load_script('experiments/temperature/plot.py', 'temperature_plot')


@pytest.fixture(scope='session')
def measure():
  return _load_script('experiments/size_speed/measure.py',
                      'size_speed_measure')


@pytest.fixture(scope='session')
def tiny_runs(tmp_path_factory, plot, measure):
  """Runs plot.py --tiny, then measure.py --tiny on the teacher it trained."""
  root = tmp_path_factory.mktemp('experiments')
  demo = root / 'demo'
  plot.main(['--tiny', f'--teacher_workdir={demo / "teacher"}',
             f'--out_dir={root / "temperature"}'])
  measure.main(['--tiny', f'--demo_workdir={demo}',
                f'--workdir={root / "size_speed_runs"}',
                '--zoo=resnet8,vit_tiny,resnet18',
                f'--out_dir={root / "size_speed"}'])
  return root


def _is_png(path) -> bool:
  with open(path, 'rb') as f:
    return os.path.getsize(path) > 1000 and f.read(8) == PNG_MAGIC


@pytest.mark.extended
def test_temperature_script_writes_both_figures(tiny_runs):
  for name in ('dark_knowledge.png', 'softmax_curves.png'):
    assert _is_png(tiny_runs / 'temperature' / name), name


@pytest.mark.extended
def test_temperature_record_matches_softmax_of_the_logits(tiny_runs):
  with open(tiny_runs / 'temperature' / 'selected.json') as f:
    record = json.load(f)
  assert record['label'] == 4
  logits = np.asarray(record['logits'])
  for temperature in (1, 2, 5, 10, 20):
    scaled = np.exp((logits - logits.max()) / temperature)
    np.testing.assert_allclose(record['probs'][str(temperature)],
                               scaled / scaled.sum(), rtol=1e-4)
  generic = [record['generic_probs'][str(t)] for t in (1, 2, 5, 10, 20)]
  # Raising T moves every distribution towards uniform: the top class falls.
  assert all(a[-1] > b[-1] for a, b in zip(generic, generic[1:]))
  np.testing.assert_allclose(generic[0][-1], 1 / np.exp(-np.arange(5)).sum(),
                             rtol=1e-5)


def test_selection_picks_largest_confusable_mass_among_correct(plot):
  # Rows: label 4 right (p9 small), label 4 right (p9 larger), label 4 wrong
  # (p9 largest of all, predicted 9), label 9.
  logits = np.array([[0, 0, 0, 0, 5, 0, 0, 0, 0, 1],
                     [0, 0, 0, 0, 5, 0, 0, 0, 0, 4],
                     [0, 0, 0, 0, 1, 0, 0, 0, 0, 5],
                     [0, 0, 0, 0, 0, 0, 0, 0, 0, 9]], np.float32)
  labels = np.array([4, 4, 4, 9])
  index, pool = plot.select_example(labels, logits, digit=4, confusable=9)
  assert (index, pool) == (1, 'correctly classified')
  index, pool = plot.select_example(labels[2:], logits[2:], digit=4,
                                    confusable=9)
  assert index == 0 and pool.startswith('all')


@pytest.mark.extended
def test_size_speed_table_has_every_model_of_every_pair(tiny_runs):
  with open(tiny_runs / 'size_speed' / 'results.json') as f:
    record = json.load(f)
  rows = {(r['pair'], r['role']): r for r in record['rows']}
  assert [(r['pair'], r['model']) for r in record['rows']] == [
      ('mnist5k MLP', 'mlp')] * 5 + [
          ('image folder (2 classes)', 'resnet18'),
          ('image folder (2 classes)', 'cnn'),
          ('CIFAR-100 (CRD)', 'resnet32x4'), ('CIFAR-100 (CRD)', 'resnet8x4'),
          ('ImageNet (CRD)', 'resnet34'), ('ImageNet (CRD)', 'resnet18')]
  # Counts documented by the models: Hinton's nets and the screening CNN.
  assert rows['mnist5k MLP', 'teacher']['num_params'] == 2_395_210
  assert rows['mnist5k MLP', 'student (scratch)']['num_params'] == 1_276_810
  assert rows['mnist5k MLP', 'small student (scratch)']['num_params'] == 24_790
  assert rows['image folder (2 classes)', 'student']['num_params'] == 275_394
  for r in record['rows']:
    assert r['checkpoint_bytes'] > r['param_bytes'] // 2, r['model']
    assert r['param_bytes'] == 4 * r['num_params']  # float32
    for batch in ('1', '2'):
      assert r['latency'][batch]['median_ms'] > 0
  # At least the multiply-adds of the weight matrices (2 FLOPs each).
  small = rows['mnist5k MLP', 'small student (scratch)']
  assert small['latency']['1']['gflops_per_image'] * 1e9 >= 2 * (
      784 * 30 + 30 * 30 + 30 * 10)

  # The zoo table: each model named, measured once even where a pair has it.
  zoo = {r['model']: r for r in record['zoo_rows']}
  assert list(zoo) == ['resnet8', 'vit_tiny', 'resnet18']
  # RepDistiller's resnet8 for 100 classes (tests/test_zoo.py derives it).
  assert zoo['resnet8']['num_params'] == 83_892
  assert zoo['resnet18']['latency'] == rows['ImageNet (CRD)',
                                            'student']['latency']
  assert zoo['vit_tiny']['input_shape'] == [16, 16, 1]
  assert all(r['test_accuracy'] is None for r in record['zoo_rows'])

  table = (tiny_runs / 'size_speed' / 'results.md').read_text().splitlines()
  assert len(table) == 2 + len(record['rows']) + 5 + len(zoo)
  assert 'CPU ms, batch 1' in table[0] and 'checkpoint MB' in table[0]
  assert table[-len(zoo) - 2].startswith('| benchmark | model |')


@pytest.mark.extended
def test_size_speed_reads_accuracy_of_runs_made_here_only(tiny_runs):
  with open(tiny_runs / 'demo' / 'teacher' / 'summary.json') as f:
    teacher_accuracy = json.load(f)['eval']['test']['accuracy']
  with open(tiny_runs / 'size_speed' / 'results.json') as f:
    rows = json.load(f)['rows']
  assert rows[0]['test_accuracy'] == pytest.approx(teacher_accuracy)
  assert rows[0]['accuracy_source'].startswith('python -m kd_jax.demo')
  # The students were not trained (--tiny trains nothing); other pairs never.
  assert all(r['test_accuracy'] is None for r in rows[1:])
  table = (tiny_runs / 'size_speed' / 'results.md').read_text().splitlines()
  assert table[2].endswith(f'| {100 * teacher_accuracy:.2f}% |')
  assert all(line.endswith('| - |') for line in table[3:2 + len(rows)])
