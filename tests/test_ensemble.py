"""Teacher ensembles: the vmapped stack, mixed architectures, the three
combination methods against NumPy, per-teacher eval reporting, export to a
cache, and a smoke run of experiments/offline_kd/benchmark.py --tiny."""

import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special

from kd_jax import config_lib
from kd_jax import export_logits
from kd_jax import input_pipeline
from kd_jax import losses
from kd_jax import objective
from kd_jax import teachers
from kd_jax import train
from kd_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker trains the module's teachers.
# Slow: module fixtures train teachers and export their logits.
pytestmark = [pytest.mark.xdist_group('ensemble'), pytest.mark.slow]


def ensemble_config(root, arg=''):
  return load_config('mnist5k_ensemble', ','.join(filter(None, [
      'runlocal', f'root={root}', 'num_teachers=2', arg])))


@pytest.fixture(scope='session')
def root(tmp_path_factory, finished_run):
  """Two tiny teachers that differ by seed, linked as root/teacher{0,1}, and
  a 2x800 student run of another architecture, root/other: trained once per
  session (`finished_run`), whichever worker runs these tests."""
  root = tmp_path_factory.mktemp('ensemble')
  runs = {f'teacher{k}': f'role=teacher,seed={k}' for k in range(2)}
  runs['other'] = 'role=student'
  for name, arg in runs.items():
    os.symlink(finished_run('mnist5k_ensemble',
                            f'runlocal,num_teachers=2,{arg}'), root / name)
  return root


@pytest.fixture(scope='session')
def test_batch(root):
  config = ensemble_config(root)
  return next(input_pipeline.iterate_split(config, 'test', num_devices=1))


def teacher_cfgs(root, names):
  models = {'other': config_lib.model_config('mlp', hidden=(800, 800),
                                             dropout=0.0)}
  teacher_model = load_config('mnist5k_ensemble', '').teacher_model
  return [config_lib.teacher_config(models.get(n, teacher_model),
                                    str(root / n)) for n in names]


def forward(root, names, batch):
  teacher = teachers.load_online(teacher_cfgs(root, names), 10, (28, 28, 1))
  return np.asarray(jax.jit(teacher.forward)(teacher.variables,
                                              {'image': batch['image']}))


def test_vmapped_ensemble_forward_equals_per_teacher_forwards(root,
                                                              test_batch):
  stacked = forward(root, ['teacher0', 'teacher1'], test_batch)
  assert stacked.shape == (2, len(test_batch['label']), 10)
  for k in range(2):
    np.testing.assert_allclose(
        stacked[k], forward(root, [f'teacher{k}'], test_batch)[0],
        rtol=1e-5, atol=1e-5)
  assert not np.allclose(stacked[0], stacked[1])  # Different seeds.


def test_mixed_architecture_ensemble_runs_each_teacher(root, test_batch):
  mixed = forward(root, ['teacher0', 'other'], test_batch)
  np.testing.assert_allclose(mixed[0], forward(root, ['teacher0'],
                                               test_batch)[0], rtol=1e-5,
                             atol=1e-5)
  np.testing.assert_allclose(mixed[1], forward(root, ['other'],
                                               test_batch)[0], rtol=1e-5,
                             atol=1e-5)


def numpy_soft_term(student, teacher_logits, weights, method, temperature):
  """The soft term of the step, in NumPy, for each combination method."""
  w = np.asarray(weights, np.float64)
  log_p = scipy.special.log_softmax(teacher_logits.astype(np.float64), -1)
  log_q = scipy.special.log_softmax(student.astype(np.float64) / temperature,
                                    -1)

  def kl(teacher):
    p = scipy.special.softmax(teacher / temperature, -1)
    return temperature**2 * np.mean(np.sum(
        p * (np.log(p) - log_q), -1))

  if method == 'sum_losses':
    return sum(wk * kl(t) for wk, t in zip(w, teacher_logits))
  w = w / w.sum()
  if method == 'mean_probs':
    combined = np.log(np.einsum('k,kbc->bc', w, np.exp(log_p)))
  else:
    combined = scipy.special.log_softmax(np.einsum('k,kbc->bc', w, log_p), -1)
  return kl(combined)


@pytest.mark.parametrize('method', ['mean_probs', 'mean_log_probs',
                                    'sum_losses'])
def test_ensemble_soft_term_matches_numpy(method):
  rng = np.random.default_rng(0)
  teacher_logits = (3 * rng.normal(size=(3, 8, 10))).astype(np.float32)
  student = (3 * rng.normal(size=(8, 10))).astype(np.float32)
  weights = (2.0, 1.0, 0.5)
  config = load_config('mnist5k_ensemble', f'distill.ensemble_method={method}')
  batch = dict(label=np.arange(8) % 10, mask=np.ones(8, bool))
  targets = objective.teacher_targets(jnp.asarray(teacher_logits), batch,
                                      config.distill, weights)
  _, terms = objective.loss(jnp.asarray(student), targets, batch['label'],
                            batch['mask'], config.distill)
  np.testing.assert_allclose(
      terms['soft'], numpy_soft_term(student, teacher_logits, weights,
                                     method, config.distill.temperature),
      rtol=1e-4)


@pytest.fixture(scope='session')
def distilled(root, tmp_path_factory):
  config = ensemble_config(root, 'role=distill,teacher_weights=3+1,'
                           'distill.ensemble_method=mean_log_probs')
  workdir = tmp_path_factory.mktemp('distilled')
  return config, train.train_and_evaluate(config, str(workdir))


@pytest.mark.slow  # Distils from three teachers: about 30 s.
def test_summary_reports_each_teacher_the_ensemble_and_the_student(
    root, distilled):
  config, summary = distilled
  test = summary['eval']['test']
  assert {'accuracy', 'teacher_accuracy', 'teacher0_accuracy',
          'teacher1_accuracy', 'agreement'} <= set(test)
  assert summary['teachers'] == [
      dict(name=f'teacher{k}', weight=w, workdir=str(root / f'teacher{k}'))
      for k, w in enumerate((3.0, 1.0))]
  # Each teacher's accuracy is the one its own run measured.
  for k in range(2):
    with open(root / f'teacher{k}' / 'summary.json') as f:
      own = json.load(f)['eval']['test']['accuracy']
    assert test[f'teacher{k}_accuracy'] == pytest.approx(own, abs=1e-6)
  # The ensemble's: argmax of the weighted geometric mean, over the split.
  cfgs = teacher_cfgs(root, ['teacher0', 'teacher1'])
  teacher = teachers.load_online(cfgs, 10, (28, 28, 1))
  correct = count = 0
  for batch in input_pipeline.iterate_split(config, 'test', num_devices=1):
    logits = np.asarray(teacher.forward(teacher.variables, batch), np.float64)
    log_p = scipy.special.log_softmax(logits, -1)
    combined = 0.75 * log_p[0] + 0.25 * log_p[1]
    correct += np.sum((combined.argmax(-1) == batch['label']) & batch['mask'])
    count += batch['mask'].sum()
  assert test['teacher_accuracy'] == pytest.approx(correct / count, abs=1e-6)


@pytest.mark.slow  # Uses the distilled run.
def test_ensemble_exports_to_a_cache_of_its_combined_logits(
    root, distilled, tmp_path, test_batch):
  config, _ = distilled
  export_logits.export(config, str(tmp_path), ['test'])
  _, ids, cached = teachers.read_cache_split(str(tmp_path), 'test')
  n = int(test_batch['mask'].sum())
  assert list(ids[:n]) == list(test_batch['id'][:n])
  logits = forward(root, ['teacher0', 'teacher1'], test_batch)
  expected = losses.combine_teachers(logits, 'mean_log_probs',
                                     weights=jnp.array([3.0, 1.0]))
  np.testing.assert_allclose(cached[:n], np.asarray(expected)[:n], rtol=1e-4,
                             atol=1e-4)


def test_sum_losses_ensemble_cannot_be_exported(tmp_path):
  # Refused before any teacher is read: the teachers need not exist.
  config = ensemble_config(tmp_path / 'none', 'role=distill,'
                           'distill.ensemble_method=sum_losses')
  with pytest.raises(ValueError, match='sum_losses.*mean_probs'):
    export_logits.export(config, str(tmp_path / 'cache'), ['test'])


@pytest.mark.slow  # experiments/offline_kd/benchmark.py
def test_benchmark_tiny_prints_every_figure(root, capsys):
  path = os.path.join(REPO, 'experiments', 'offline_kd', 'benchmark.py')
  spec = importlib.util.spec_from_file_location('offline_kd_benchmark', path)
  benchmark = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(benchmark)
  benchmark.main(['--tiny', f'--teacher_workdir={root / "teacher0"}'])
  out = capsys.readouterr().out
  for figure in ('offline KD step', 'supervised step', 'cache write',
                 'cache read', 'vmapped', 'separate', 'top-2', 'flops'):
    assert figure in out, (figure, out)
