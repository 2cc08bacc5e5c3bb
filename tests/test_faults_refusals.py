"""Refusals a user meets, each one clear paragraph that names the field,
file or state and the fix: a finished run is not overwritten, a workdir or
a LOCK that is not what kd_jax expects, settings that would fail mid-run,
images hidden in subfolders; and the CLI prints the paragraph alone.

Each test calls the refusing function directly; one slow test runs the CLI.
"""

import json
import os
import re
import shutil
import socket
import subprocess
import sys

import pytest

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import progress
from kd_jax import rundir
from kd_jax import train
from kd_jax.data import sources

ARG = 'runlocal,model.hidden=(8,)'


def tiny(arg=''):
  return config_lib.load_config('mnist5k_student',
                                ','.join(filter(None, [ARG, arg])))


@pytest.fixture(scope='module')
def finished(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('finished'))
  train.train_and_evaluate(tiny(), workdir)
  return workdir


# ---------------------------------------------------------------------------
# Item 7: a finished run is never overwritten without --overwrite_finished.
# ---------------------------------------------------------------------------


@pytest.mark.slow  # Two runs over one workdir.
def test_a_finished_run_without_checkpoints_is_not_trained_over(finished,
                                                                tmp_path):
  # Its checkpoints deleted to save disk, then rerun with another config.
  workdir = str(tmp_path / 'run')
  shutil.copytree(finished, workdir)
  shutil.rmtree(checkpointing.checkpoint_dir(workdir))
  files = {n: open(os.path.join(workdir, n)).read()
           for n in (rundir.SUMMARY, rundir.CONFIG)}
  with pytest.raises(rundir.RunFinished, match=(
      r'holds a finished run .*summary.json.* whose checkpoints are gone: this '
      r'run would train from step 0 and replace its summary.json and '
      r'config.json\. Use a fresh --workdir, or pass --overwrite_finished')):
    train.train_and_evaluate(tiny('learning_rate=0.5'), workdir)
  assert {n: open(os.path.join(workdir, n)).read() for n in files} == files
  # Asked for explicitly, it trains again; the old summary is kept.
  summary = train.train_and_evaluate(tiny('learning_rate=0.5'), workdir,
                                     overwrite_finished=True)
  assert rundir.read_summary(workdir) == summary
  assert open(os.path.join(workdir, 'summary.replaced-0.json')).read() == (
      files[rundir.SUMMARY])


# ---------------------------------------------------------------------------
# Item 8: clean refusals.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize('content', [
    '[1, 2]', '"busy"', '{"pid": 12}', '{"host": "h", "pid": "twelve"}',
    '{"host": "h", "pid": -1}'])
def test_a_lock_of_the_wrong_shape_names_no_holder(tmp_path, content):
  (tmp_path / rundir.LOCK).write_text(content)
  with pytest.raises(rundir.WorkdirLocked, match=(
      r'locked by .*LOCK, which names no holder .*not a kd_jax lock.*If no '
      r'run is using this workdir, remove .*LOCK')):
    rundir.acquire_lock(str(tmp_path))


def write_lock(workdir, **holder):
  with open(os.path.join(workdir, rundir.LOCK), 'w') as f:
    json.dump(dict(dict(host=socket.gethostname(), started='earlier'),
                   **holder), f)


def test_a_lock_whose_pid_now_names_another_process_is_taken_over(tmp_path):
  # This process is alive, but it is not the one that started then.
  write_lock(str(tmp_path), pid=os.getpid(), process_start='1')
  mine = rundir.acquire_lock(str(tmp_path))
  assert mine['pid'] == os.getpid() and mine['process_start'] != '1'
  rundir.release_lock(str(tmp_path), mine)


def test_an_old_lock_of_a_live_pid_says_it_may_be_removed(tmp_path):
  # Locks of earlier versions do not record when their holder started.
  holder = subprocess.Popen([sys.executable, '-c',
                             'import time; time.sleep(60)'])
  try:
    write_lock(str(tmp_path), pid=holder.pid)
    with pytest.raises(rundir.WorkdirLocked, match=(
        f'in use by another run \\(pid {holder.pid} .*If pid {holder.pid} is '
        r'not that run \(it runs `.*time.sleep\(60\)`\), the lock is stale: '
        r'remove .*LOCK and start again')):
      rundir.acquire_lock(str(tmp_path))
  finally:
    holder.kill()
    holder.wait()


def test_a_workdir_that_is_a_file_is_refused(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('x')
  with pytest.raises(rundir.WorkdirUnusable, match=(
      r"--workdir='.*notes.txt' is a file, not a folder")):
    train.train_and_evaluate(tiny(), str(path))
  with pytest.raises(rundir.WorkdirUnusable, match='cannot create'):
    rundir.prepare(str(path / 'sub'))


def _unwritable_folder(tmp_path):
  folder = tmp_path / 'readonly'
  folder.mkdir()
  folder.chmod(0o500)
  if os.access(folder, os.W_OK):  # Root writes anyway; sysfs refuses even it.
    folder = '/sys/kernel'
    if not os.path.isdir(folder):
      pytest.skip('no folder this process cannot write')
  return str(folder)


def test_a_read_only_workdir_is_refused(tmp_path):
  with pytest.raises(rundir.WorkdirUnusable, match=(
      r'cannot write in --workdir=.*: give a folder this process can write')):
    rundir.acquire_lock(_unwritable_folder(tmp_path))


@pytest.mark.parametrize('arg, match', [
    ('model.hidden=(0,)', r'config.model.hidden=\(0,\): every layer needs at '
     r'least one unit'),
    ('distill.label_smoothing=1.5', r'config.distill.label_smoothing=1.5 '
     r'must lie in \[0, 1\]'),
])
def test_settings_that_fail_mid_run_are_refused_before_anything_is_written(
    tmp_path, arg, match):
  workdir = tmp_path / 'run'
  with pytest.raises(ValueError, match=match):
    train.train_and_evaluate(tiny(arg), str(workdir))
  assert not workdir.exists()  # No config.json.


def test_a_refusal_is_printed_as_its_message_alone(tmp_path, capsys):
  path = tmp_path / 'notes.txt'
  path.write_text('x')
  with pytest.raises(SystemExit) as e:
    with progress.exit_on_refusal('kd_jax.main'):
      rundir.prepare(str(path))
  assert e.value.code == 1
  assert capsys.readouterr().err == (
      f"kd_jax.main: --workdir='{path}' is a file, not a folder: give the "
      'path of a folder (it is created if missing).\n')


def test_an_error_that_is_not_a_refusal_keeps_its_traceback():
  # A library's ValueError, not a kd_jax `raise`: a bug until shown otherwise.
  with pytest.raises(ValueError, match='invalid literal'):
    with progress.exit_on_refusal('kd_jax.main'):
      int('twelve')
  with pytest.raises(KeyError):
    with progress.exit_on_refusal('kd_jax.main'):
      raise KeyError('x')


@pytest.mark.slow
def test_the_cli_prints_a_refusal_without_traceback_unless_debug(tmp_path):
  path = tmp_path / 'notes.txt'
  path.write_text('x')
  command = [sys.executable, '-m', 'kd_jax.main',
             f'--config={config_lib.CONFIG_DIR}/mnist5k_student.py:{ARG}',
             f'--workdir={path}']
  done = subprocess.run(command, capture_output=True, text=True, timeout=300,
                        check=False)
  assert done.returncode == 1
  assert 'Traceback' not in done.stderr
  assert done.stderr.strip().splitlines()[-1] == (
      f"kd_jax.main: --workdir='{path}' is a file, not a folder: give the "
      'path of a folder (it is created if missing).')
  debug = subprocess.run(command + ['--log_level=debug'], capture_output=True,
                         text=True, timeout=300, check=False)
  assert debug.returncode == 1
  assert 'Traceback' in debug.stderr and 'WorkdirUnusable' in debug.stderr


# ---------------------------------------------------------------------------
# Item 9: image_folder refuses images hidden in subfolders of a class folder.
# ---------------------------------------------------------------------------


def test_a_folder_inside_a_class_folder_is_refused_naming_it(tmp_path):
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  png = tf.io.encode_png(tf.fill([4, 4, 1], tf.constant(9, tf.uint8)))
  for path in ('train/cat/a.png', 'train/dog/b.png',
               'train/dog/puppies/c.png'):
    os.makedirs(tmp_path / os.path.dirname(path), exist_ok=True)
    tf.io.write_file(str(tmp_path / path), png)
  with pytest.raises(ValueError, match=(
      re.escape(str(tmp_path / 'train' / 'dog' / 'puppies')) + ' is a folder '
      'inside the class folder .*its images would be left out')):
    sources._list_class_folders(str(tmp_path), 'train')  # pylint: disable=protected-access
  shutil.rmtree(tmp_path / 'train' / 'dog' / 'puppies')
  assert sources._list_class_folders(str(tmp_path), 'train') == {  # pylint: disable=protected-access
      'cat': ['train/cat/a.png'], 'dog': ['train/dog/b.png']}


@pytest.mark.parametrize('content, match', [
    ({}, r"lacks \['model', 'num_classes'"),
    ({'model': {'name': 'mlp'}, 'num_classes': 10, 'class_names': [],
      'image_shape': [28, 28, 1]}, r"lacks \['dataset'\]"),
    ([1, 2], 'lacks'),
])
def test_a_teachers_run_info_without_its_keys_is_refused_naming_them(
    tmp_path, content, match):
  with open(tmp_path / 'run_info.json', 'w') as f:
    json.dump(content, f)
  with pytest.raises(ValueError, match=match + r'.*config\.teachers\[0\]'):
    rundir.read_run_info(str(tmp_path), 'config.teachers[0].workdir')
