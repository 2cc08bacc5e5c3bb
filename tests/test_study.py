"""The experiment scripts' shared helpers: configs with overrides, statistics
over seeds, run-or-read."""

import json
import math

import pytest

from kd_jax import rundir
from kd_jax import study


def test_overrides_reach_nested_fields_and_tuples():
  config = study.make_config('mnist5k_student', 'seed=3', {
      'model.hidden': (30, 30), 'eval_splits': ('train[3600:]', 'test')})
  assert config.seed == 3
  assert tuple(config.model.hidden) == (30, 30)
  assert tuple(config.eval_splits) == ('train[3600:]', 'test')


def test_stats_give_mean_and_sample_std():
  s = study.stats([1, 2, 3, 6])
  assert s['mean'] == 3.0 and s['min'] == 1 and s['max'] == 6
  assert s['std'] == pytest.approx(math.sqrt(14 / 3))
  assert study.stats([5])['std'] == 0.0
  assert study.fmt(study.stats([1, 3])) == '2.0 +- 1.4'


def test_gap_recovered_is_the_share_of_the_teacher_student_gap():
  assert study.gap_recovered(60, 30, 20) == 0.75
  assert study.gap_recovered(60, 70, 20) == -0.25
  assert math.isnan(study.gap_recovered(20, 20, 20))


def test_finished_runs_are_read_and_never_retrained(tmp_path, monkeypatch):
  summary = {'eval': {'test': {'errors': 7, 'accuracy': 0.993}}}
  rundir.write_summary(str(tmp_path), summary)
  from kd_jax import train  # pylint: disable=g-import-not-at-top

  def refuse(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr(train, 'train_and_evaluate', refuse)
  config = study.make_config('mnist5k_student', 'seed=3', {})
  rundir.write_config(str(tmp_path), rundir.config_json(config))
  runs = [dict(name='done', workdir=str(tmp_path))]
  trained, _ = study.run_all(runs, make=lambda run: config,
                             log=lambda line: None)
  assert trained == 0 and runs[0]['summary'] == summary
  assert study.errors(summary, 'test') == 7
  assert json.loads(json.dumps(study.run_or_read(config, str(tmp_path))[0])) \
      == summary


def test_a_diverged_run_is_recorded_only_when_asked(tmp_path, monkeypatch):
  from kd_jax import train  # pylint: disable=g-import-not-at-top

  def diverge(config, workdir):
    raise FloatingPointError('loss is nan at step 20; no checkpoint')

  monkeypatch.setattr(train, 'train_and_evaluate', diverge)
  runs = [dict(name='nan', workdir=str(tmp_path / 'nan'))]
  with pytest.raises(FloatingPointError, match='step 20'):
    study.run_all(runs, make=lambda run: None, log=lambda line: None)
  logged = []
  trained, _ = study.run_all(runs, make=lambda run: None, log=logged.append,
                             record_divergence=True)
  assert trained == 1 and runs[0]['summary'] is None
  assert 'step 20' in runs[0]['diverged'] and 'diverged' in logged[0]


def test_a_finished_run_of_another_config_is_refused_by_name(tmp_path):
  config = study.make_config('mnist5k_student', 'seed=3', {})
  rundir.write_config(str(tmp_path), rundir.config_json(config))
  rundir.write_summary(str(tmp_path), {'eval': {'test': {'errors': 7}}})
  other = study.make_config('mnist5k_student', 'seed=4', {})
  with pytest.raises(ValueError, match=r"different config.*'seed'"):
    study.run_or_read(other, str(tmp_path))
  runs = [dict(name='done', workdir=str(tmp_path))]
  with pytest.raises(ValueError, match='another --workdir'):
    study.run_all(runs, make=lambda run: other, log=lambda line: None)
  assert study.run_or_read(config, str(tmp_path))[1] is False


def test_a_directory_written_relative_or_absolute_is_the_same_run(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / 'teacher').mkdir()
  config = study.make_config('mnist5k_distill', 'teacher_workdir=teacher', {})
  stored = json.loads(rundir.config_json(study.make_config(
      'mnist5k_distill', f'teacher_workdir={tmp_path / "teacher"}', {})))
  assert rundir.config_diff(stored, json.loads(rundir.config_json(
      config))) == []
  other = study.make_config('mnist5k_distill', 'teacher_workdir=other', {})
  assert rundir.config_diff(stored, json.loads(rundir.config_json(
      other))) == ['teachers']


def test_an_lm_config_json_of_the_first_lm_version_compares_what_it_holds():
  config = study.make_config('shakespeare_char', 'role=student', {})
  now = json.loads(rundir.config_json(config))
  # That version stored no field the image config lacks.
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  image_fields = set(config_lib.default_config())
  legacy = {k: v for k, v in now.items() if k in image_fields}
  legacy['distill'] = {k: now['distill'][k] for k in (
      'alpha', 'beta', 'cache_dir', 'convention', 'divergence', 'skew',
      'teacher_workdir', 'temperature')}
  assert 'task' not in legacy and 'length' not in legacy
  assert rundir.config_diff(legacy, now) == []
  legacy['learning_rate'] = 1.0
  legacy['distill'] = dict(legacy['distill'], divergence='reverse_kl')
  assert rundir.config_diff(legacy, now) == ['distill.divergence',
                                             'learning_rate']
