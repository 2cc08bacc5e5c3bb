"""The trainer: supervised and online-distilled runs, resume, scale, errors."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config_lib
from kd_jax import rundir
from kd_jax import train
from kd_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny(name, arg=''):
  return load_config(name, ','.join(filter(None, ['runlocal', arg])))


@pytest.fixture(scope='module')
def teacher_dir(mnist5k_teacher_dir):
  """The session's runlocal mnist5k teacher (conftest): read it only."""
  return mnist5k_teacher_dir


@pytest.fixture(scope='module')
def student_dir(finished_run):
  """A finished runlocal mnist5k_student run (shared: copy it to change it)."""
  return finished_run('mnist5k_student')


def copy_run(workdir, tmp_path):
  return str(shutil.copytree(workdir, tmp_path / 'run'))


def test_supervised_run_writes_summary_checkpoint_and_config(student_dir):
  summary = rundir.read_summary(student_dir)
  test = summary['eval']['test']
  assert test['num_examples'] == 1000
  assert 0.0 <= test['accuracy'] <= 1.0
  assert summary['num_params'] == 784 * 800 + 800 + 800 * 800 + 800 + 8010
  assert summary['step'] == 6
  assert os.path.exists(os.path.join(student_dir, 'config.json'))
  assert sorted(os.listdir(os.path.join(student_dir, 'checkpoints'))) == [
      '3', '6']


@pytest.mark.slow  # Trains to a real accuracy: about 40 s.
def test_student_learns_on_mnist5k(tmp_path):
  config = tiny('mnist5k_student', 'num_train_steps=60,batch_size=64')
  summary = train.train_and_evaluate(config, str(tmp_path))
  # Chance is 10%; 60 steps of SGD on an MLP get far beyond it.
  assert summary['eval']['test']['accuracy'] > 0.6


def test_same_config_and_seed_give_same_numbers(tmp_path, teacher_dir):
  a = rundir.read_summary(teacher_dir)
  b = train.train_and_evaluate(tiny('mnist5k_teacher'), str(tmp_path / 'b'))
  assert a['eval'] == b['eval']


@pytest.mark.slow  # A distillation run; the default set checks its step.
def test_online_distillation_reports_teacher_and_leaves_it_out_of_checkpoint(
    teacher_dir, finished_run):
  workdir = finished_run('mnist5k_distill',
                         f'runlocal,teacher_workdir={teacher_dir}')
  test = rundir.read_summary(workdir)['eval']['test']
  teacher_summary = json.load(open(os.path.join(teacher_dir, 'summary.json')))
  assert test['teacher_accuracy'] == pytest.approx(
      teacher_summary['eval']['test']['accuracy'])
  assert 0.0 <= test['agreement'] <= 1.0
  ckpt = pathlib.Path(workdir) / 'checkpoints' / '6' / 'model'
  sizes = sum(f.stat().st_size for f in ckpt.rglob('*') if f.is_file())
  # The 2x800 student alone is ~5 MB of float32; with the 2x1200 teacher it
  # would be ~15 MB.
  assert sizes < 8e6


@pytest.mark.slow  # Two full runs: about 25 s.
def test_distillation_with_alpha_one_needs_only_the_teacher(tmp_path,
                                                            teacher_dir):
  config = tiny('mnist5k_distill', f'teacher_workdir={teacher_dir},'
                'distill.alpha=1.0,num_train_steps=40')
  summary = train.train_and_evaluate(config, str(tmp_path))
  test = summary['eval']['test']
  # Trained only to imitate the teacher: it agrees with it far above chance.
  assert test['agreement'] > 0.5


def test_one_and_eight_devices_give_the_same_result(tmp_path, student_dir):
  assert jax.device_count() == 8
  one = train.train_and_evaluate(tiny('mnist5k_student'), str(tmp_path / 'one'),
                                 devices=jax.devices()[:1])
  eight = rundir.read_summary(student_dir)  # Trained on all 8 devices.
  for k in ('accuracy', 'loss'):
    assert one['eval']['test'][k] == pytest.approx(
        eight['eval']['test'][k], rel=1e-4, abs=1e-5)


def test_rerun_resumes_instead_of_restarting(tmp_path, student_dir):
  first = rundir.read_summary(student_dir)
  again = train.train_and_evaluate(tiny('mnist5k_student'),
                                   copy_run(student_dir, tmp_path))
  assert again['eval'] == first['eval']
  assert again['step'] == 6


def _run_main(config_arg, workdir, **popen_kwargs):
  env = dict(os.environ, PYTHONUNBUFFERED='1')
  return subprocess.Popen(
      [sys.executable, '-m', 'kd_jax.main',
       f'--config={REPO}/configs/mnist5k_student.py:{config_arg}',
       f'--workdir={workdir}'], cwd=REPO, env=env, **popen_kwargs)


@pytest.mark.slow  # Three CLI processes.
def test_killed_run_resumes_to_the_same_final_metrics(tmp_path):
  arg = ('runlocal,num_train_steps=40,checkpoint_every_steps=5,'
         'eval_every_steps=40,log_every_steps=5')
  whole = _run_main(arg, tmp_path / 'whole')
  assert whole.wait(timeout=300) == 0
  killed = _run_main(arg, tmp_path / 'killed')
  ckpt_dir = tmp_path / 'killed' / 'checkpoints'
  deadline = time.time() + 240
  while time.time() < deadline:
    steps = [int(p.name) for p in ckpt_dir.glob('*') if p.name.isdigit()]
    if steps and max(steps) >= 10:
      break
    time.sleep(0.05)
  killed.send_signal(signal.SIGKILL)
  killed.wait()
  assert not (tmp_path / 'killed' / 'summary.json').exists()
  resumed = _run_main(arg, tmp_path / 'killed')
  assert resumed.wait(timeout=300) == 0
  a = json.load(open(tmp_path / 'whole' / 'summary.json'))
  b = json.load(open(tmp_path / 'killed' / 'summary.json'))
  assert a['eval'] == b['eval']


def test_workdir_of_another_config_is_refused(tmp_path, student_dir):
  workdir = copy_run(student_dir, tmp_path)
  with pytest.raises(ValueError, match='different config.*learning_rate'):
    train.train_and_evaluate(tiny('mnist5k_student', 'learning_rate=0.5'),
                             workdir)


# Two runs; the default set stops a diverging run in tests/test_faults_divergence.py.
@pytest.mark.slow
def test_nan_loss_stops_with_the_step_and_keeps_good_checkpoints(tmp_path):
  config = tiny('mnist5k_student', 'num_train_steps=3')
  train.train_and_evaluate(config, str(tmp_path))
  config = tiny('mnist5k_student', 'num_train_steps=12,learning_rate=1e30,'
                'allow_config_change=True,log_every_steps=1')
  # Step 4 starts from good params (a finite loss) and blows them up.
  with pytest.raises(FloatingPointError,
                     match='parameter norm is inf at step 4.*healthy '
                           'checkpoint, step 3'):
    train.train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['3']


@pytest.mark.parametrize('arg, match', [
    ('model.name="vgg7"', 'config.model.name'),
    ('optimizer="lamb"', 'config.optimizer'),
    ('distill.alpha=0.5', 'config.distill.alpha'),
    ('batch_size=12', 'batch_size'),
])
def test_bad_config_values_are_named(tmp_path, arg, match):
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny('mnist5k_student', arg), str(tmp_path))


def test_invalid_loss_settings_are_named(tmp_path):
  config = tiny('mnist5k_distill', f'teacher_workdir={tmp_path},'
                'distill.temperature=0.0')
  with pytest.raises(ValueError, match='temperature'):
    train.validate_config(config)


def test_missing_teacher_says_how_to_train_it(tmp_path):
  config = tiny('mnist5k_distill', f'teacher_workdir={tmp_path}/nowhere')
  with pytest.raises(FileNotFoundError, match='python -m kd_jax.main'):
    train.train_and_evaluate(config, str(tmp_path / 'student'))


def test_teacher_with_other_class_count_is_refused(tmp_path, teacher_dir):
  info = json.load(open(os.path.join(teacher_dir, 'run_info.json')))
  assert info['num_classes'] == 10
  with open(tmp_path / 'run_info.json', 'w') as f:
    json.dump(dict(info, num_classes=3), f)
  config = tiny('mnist5k_distill', f'teacher_workdir={tmp_path}')
  with pytest.raises(ValueError, match='3 classes.*has 10'):
    train.train_and_evaluate(config, str(tmp_path / 'student'))


def test_config_arg_splits_at_commas_outside_brackets():
  config = load_config('mnist5k_student',
                       'model.hidden=(30,30),seed=2,distill.temperature=4.0')
  assert tuple(config.model.hidden) == (30, 30)
  assert config.seed == 2 and config.distill.temperature == 4.0
  with pytest.raises(ValueError, match='unknown field'):
    load_config('mnist5k_student', 'modle.hidden=(30,30)')


def test_a_teacher_entry_without_a_model_uses_its_runs_architecture(
    teacher_dir):
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  config = load_config('mnist5k_distill',
                       f'runlocal,teacher_workdir={teacher_dir}')
  explicit = config.teachers[0]
  implicit = config_lib.teacher_config(None, teacher_dir)
  assert (rundir.spec_dict(rundir.teacher_model(implicit))
          == rundir.spec_dict(explicit.model))
  batch = dict(image=np.random.default_rng(0).normal(
      size=(4, 28, 28, 1)).astype(np.float32))
  outputs = [jax.jit(t.forward)(t.variables, batch) for t in (
      teachers.load_online([entry], 10, (28, 28, 1))
      for entry in (explicit, implicit))]
  np.testing.assert_array_equal(*outputs)
  with pytest.raises(FileNotFoundError,
                     match=r'config.teachers\[0\].workdir .*nowhere'):
    rundir.teacher_model(config_lib.teacher_config(None, '/nowhere'))
