"""Nothing lost when training diverges: the run stops before a non-finite
state is checkpointed, every checkpoint it names is committed and healthy,
the last healthy one outlives the rotation, and a rerun with the lower
learning rate that the message gives resumes from it and finishes.

The end-to-end tests reproduce the audit's probes (configs/mnist5k_student
runlocal at learning rates 10 and 0.3); the rest call the pieces directly.
"""

import os
import re
import shlex
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import divergence
from kd_jax import progress
from kd_jax import train


def student(arg=''):
  return config_lib.load_config(
      'mnist5k_student', ','.join(filter(None, ['runlocal', arg])))


def committed_steps(workdir, folder=checkpointing.CHECKPOINT_DIR):
  """Step folders under workdir/folder; fails on anything unfinished."""
  path = os.path.join(workdir, folder)
  names = sorted(os.listdir(path)) if os.path.isdir(path) else []
  assert all(n.isdigit() for n in names), names  # No *-tmp folder.
  return sorted(int(n) for n in names)


# ---------------------------------------------------------------------------
# The audit's probes, end to end.
# ---------------------------------------------------------------------------


def test_learning_rate_10_stops_before_a_nonfinite_checkpoint(tmp_path):
  # A checkpoint every step: each failure meets a save in flight.
  workdir = str(tmp_path / 'run')
  with pytest.raises(divergence.Diverged) as e:
    train.train_and_evaluate(student(
        'num_train_steps=300,checkpoint_every_steps=1,log_every_steps=10,'
        'eval_every_steps=100,learning_rate=10.0'), workdir)
  message = str(e.value)
  assert re.match(r'training diverged: (loss|parameter norm) is (nan|inf) at '
                  r'step \d+\. It had been diverging since step 2 \(the '
                  r'train loss .* is over 100 times the first one', message)
  # Step 1's parameters gave step 2's exploding loss: nothing is healthy,
  # and what was saved since is set aside, never deleted.
  assert e.value.resume_step is None
  assert committed_steps(workdir) == []
  moved = committed_steps(workdir, checkpointing.DIVERGED_DIR)
  assert moved and f'Checkpoints {", ".join(map(str, moved))}' in message
  assert 'starts afresh and accepts a changed config' in message
  assert e.value.changes == dict(learning_rate=1.0)


@pytest.mark.slow
def test_a_diverged_run_resumes_from_its_last_healthy_checkpoint(tmp_path):
  workdir = str(tmp_path / 'run')
  arg = ('num_train_steps=60,checkpoint_every_steps=5,log_every_steps=5,'
         'eval_every_steps=1000')
  with pytest.raises(divergence.Diverged) as e:
    train.train_and_evaluate(student(f'{arg},learning_rate=0.3'), workdir)
  healthy = e.value.resume_step
  assert healthy and f'The last healthy checkpoint, step {healthy}, is kept' in (
      str(e.value))
  assert committed_steps(workdir) == [healthy]
  assert min(committed_steps(workdir, checkpointing.DIVERGED_DIR)) > healthy
  with checkpointing.manager(workdir, 2) as mngr:
    meta = mngr.restore(healthy, args=checkpointing.ocp.args.Composite(
        meta=checkpointing.ocp.args.JsonRestore()))['meta']
  assert meta['unhealthy'] is None
  # The rerun the message asks for resumes there and finishes.
  changes = ','.join(f'{k}={v!r}' for k, v in e.value.changes.items())
  assert changes == 'learning_rate=0.03,allow_config_change=True'
  summary = train.train_and_evaluate(student(f'{arg},{changes}'), workdir)
  assert summary['step'] == 60
  assert np.isfinite(summary['eval']['test']['loss'])
  assert summary['eval']['test']['accuracy'] > 0.5


@pytest.mark.slow
def test_the_cli_ends_with_the_message_and_the_command_that_resumes(tmp_path):
  workdir = str(tmp_path / 'run')
  config = os.path.join(config_lib.CONFIG_DIR, 'mnist5k_student.py')
  arg = ('runlocal,num_train_steps=60,checkpoint_every_steps=5,'
         'log_every_steps=5,eval_every_steps=1000')
  done = subprocess.run(
      [sys.executable, '-m', 'kd_jax.main',
       f'--config={config}:{arg},learning_rate=0.3', f'--workdir={workdir}'],
      capture_output=True, text=True, timeout=300, check=False)
  lines = done.stderr.strip().splitlines()
  assert done.returncode == 1, done.stderr[-3000:]
  assert 'Traceback' not in done.stderr
  assert lines[-1].startswith('kd_jax.main: training diverged: ')
  command = lines[-1].split(' Command: ')[1]
  assert command == (f'python -m kd_jax.main --config={config}:{arg},'
                     'learning_rate=0.03,allow_config_change=True '
                     f'--workdir={workdir}')
  resumed = subprocess.run([sys.executable, *shlex.split(command)[1:]],
                           capture_output=True, text=True, timeout=300,
                           check=False)
  assert resumed.returncode == 0, resumed.stderr[-3000:]


# ---------------------------------------------------------------------------
# The pieces.
# ---------------------------------------------------------------------------


def test_nonfinite_names_the_first_bad_step_and_what_went():
  window = [dict(loss_total=1.0, param_norm=0.0),
            dict(loss_total=2.0, param_norm=float('inf')),
            dict(loss_total=float('nan'), param_norm=3.0)]
  assert divergence.nonfinite(window, 11) == (
      'parameter norm is inf at step 12', 12)
  assert divergence.nonfinite(window[:1], 11) is None


@pytest.mark.parametrize('loss, param_norm, collapsed, reason', [
    (2.0, 41.0, False, None),
    (2.0 * divergence.LOSS_GROWTH + 1, 41.0, False, 'train loss'),
    (2.0, 40.0 * divergence.PARAM_NORM_GROWTH + 1, False, 'parameter norm'),
    (2.0, 41.0, True, 'accuracy collapsed'),
])
def test_exploding_loss_or_parameters_or_a_collapse_are_unhealthy(
    loss, param_norm, collapsed, reason):
  health = divergence.Health(param_norm=40.0, loss=2.0)
  found = divergence.unhealthy(loss, param_norm, health, collapsed)
  assert (found is None) == (reason is None)
  assert reason is None or reason in found


def test_a_checkpoint_is_healthy_once_the_loss_after_it_is():
  health = divergence.Health(param_norm=1.0, loss=1.0)
  health.saved(5)
  # Steps 6-10: step 6's loss is what step 5's parameters give.
  health.judge_unconfirmed(6, [1.0, 2.0, 1.5, 1.0, 1.2])
  health.saved(10)
  assert (health.last_healthy_step, health.unconfirmed_step) == (5, 10)
  health.judge_unconfirmed(11, [500.0, 3.0])  # Condemns step 10.
  health.reason = 'the train loss exploded'
  health.saved(12)  # Unhealthy: not even a candidate.
  assert (health.last_healthy_step, health.unconfirmed_step) == (5, None)
  health.reason = None
  health.saved(15)
  # Step 16's parameter norm may be infinite: step 15 gave a finite loss.
  health.judge_unconfirmed(16, [2.0])
  assert health.last_healthy_step == 15
  health.saved(20)
  health.judge_unconfirmed(21, [float('nan')])
  assert (health.last_healthy_step, health.unconfirmed_step) == (15, None)
  # A checkpoint records it, and a resume reads it back.
  health.saved(25)
  assert divergence.Health.from_meta(dict(health.meta(), step=25),
                                     99.0) == health
  # An earlier kd_jax's checkpoint counts as healthy.
  old = divergence.Health.from_meta(dict(step=7), 3.0)
  assert (old.last_healthy_step, old.param_norm, old.loss) == (7, 3.0, None)


def test_a_pinned_step_outlives_the_rotation_until_unpinned(tmp_path):
  state = dict(step=jnp.zeros((), jnp.int32), params={'w': jnp.ones(3)},
               batch_stats={})
  pinned = {1}
  with checkpointing.manager(str(tmp_path), 1, pinned) as mngr:
    for step in (1, 2, 3):
      checkpointing.save(mngr, dict(state, step=jnp.int32(step)), {})
      mngr.wait_until_finished()
    assert mngr.all_steps() == [1, 3]
    pinned.clear()
    checkpointing.save(mngr, dict(state, step=jnp.int32(4)), {})
    mngr.wait_until_finished()
    assert mngr.all_steps() == [4]


def test_message_says_what_to_change_and_from_where():
  common = dict(moved_to='/w/checkpoints_diverged', first_checkpoint=500,
                learning_rate=0.3, before_any_update=False)
  text, changes = divergence.message(
      'loss is nan at step 27', resume_step=10, moved=[15, 20],
      first_warning=dict(step=12, reason='the train loss 400 is over 100 '
                         'times the first one, 2.4'), **common)
  assert text == (
      'training diverged: loss is nan at step 27. It had been diverging '
      'since step 12 (the train loss 400 is over 100 times the first one, '
      '2.4). Checkpoints 15, 20, saved as it diverged, were moved to '
      '/w/checkpoints_diverged. The last healthy checkpoint, step 10, is kept '
      'and a rerun resumes from it: rerun with a lower config.learning_rate '
      '(e.g. 0.03, a tenth) or a config.grad_clip_norm > 0, and '
      'config.allow_config_change=True to resume it with changed settings.')
  assert changes == dict(learning_rate=0.03, allow_config_change=True)
  text, changes = divergence.message(
      'loss is nan at step 27', resume_step=None, moved=[],
      first_warning=None, **common)
  assert 'No checkpoint was written yet (the first comes at step 500' in text
  assert changes == dict(learning_rate=0.03)


def test_rerun_command_replaces_the_fields_in_the_config_argument():
  argv = ['kd_jax/main.py', '--config=configs/x.py:runlocal,model.hidden=(8,'
          '8),learning_rate=10.0', '--workdir=/w']
  assert divergence.rerun_command(argv, dict(
      learning_rate=1.0, allow_config_change=True)) == (
          "python -m kd_jax.main '--config=configs/x.py:runlocal,"
          "model.hidden=(8,8),learning_rate=1.0,allow_config_change=True' "
          '--workdir=/w')
  assert divergence.rerun_command(
      ['main.py', '--config', 'configs/x.py', '--workdir', '/w'],
      dict(learning_rate=0.5)) == (
          'python -m kd_jax.main --config configs/x.py:learning_rate=0.5 '
          '--workdir /w')
  # A multi-process run: each process reruns with its own --process_id.
  two = ['main.py', '--config=configs/x.py', '--workdir=/w',
         '--num_processes=2', '--process_id=1',
         '--coordinator_address=localhost:1234']
  command = divergence.rerun_command(two, dict(learning_rate=0.5))
  assert command.startswith(
      'python -m kd_jax.main --config=configs/x.py:learning_rate=0.5 '
      '--workdir=/w --num_processes=2 --process_id="$PROCESS_ID" '
      '--coordinator_address=localhost:1234')
  assert 'PROCESS_ID its index' in command and '=1' not in command
  assert '"$PROCESS_ID"' in divergence.rerun_command(
      ['main.py', '--process_id', '0'], {})


def test_cli_adds_the_command_to_a_diverged_run_s_message(monkeypatch):
  monkeypatch.setattr(sys, 'argv', ['kd_jax/main.py',
                                    '--config=configs/x.py', '--workdir=/w'])
  from kd_jax import main  # pylint: disable=g-import-not-at-top
  error = divergence.Diverged('training diverged: loss is nan at step 3.',
                              resume_step=None,
                              changes=dict(learning_rate=0.01))
  assert main._rerun_advice(error) == (  # pylint: disable=protected-access
      ' Command: python -m kd_jax.main --config=configs/x.py:'
      'learning_rate=0.01 --workdir=/w')
  assert main._rerun_advice(ValueError('x')) == ''  # pylint: disable=protected-access
