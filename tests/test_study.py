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
  runs = [dict(name='done', workdir=str(tmp_path))]
  trained, _ = study.run_all(runs, make=refuse, log=lambda line: None)
  assert trained == 0 and runs[0]['summary'] == summary
  assert study.errors(summary, 'test') == 7
  assert json.loads(json.dumps(study.run_or_read(None, str(tmp_path))[0])) \
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
