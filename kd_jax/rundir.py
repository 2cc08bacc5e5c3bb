"""The run directory: the one module that reads and writes what a run leaves
in its workdir besides checkpoints (`kd_jax.checkpointing`) and metrics.

* `config.json`: the resolved config; a rerun with another config is refused
  once a checkpoint exists (`check_config`).
* `run_info.json`: what a later run needs to use this one as a teacher or a
  warm start (model spec, classes, input shape, final step, a specialist's
  group).
* `summary.json`: the final results; its presence marks a finished run.
* `LOCK`: held while a run trains there (`lock`): host, pid and start time of
  the holder, so that a second run on the same workdir is refused by name.

`prepare` creates a workdir, refusing a path that is a file or that this
process cannot write, before anything is written there.
"""

from __future__ import annotations

import contextlib
import datetime
import difflib
import errno
import json
import os
import socket
from typing import Any, Iterator

from absl import logging
import ml_collections

CONFIG = 'config.json'
RUN_INFO = 'run_info.json'
SUMMARY = 'summary.json'
LOCK = 'LOCK'


def _path(workdir: str, name: str) -> str:
  return os.path.join(workdir, name)


def _write_json(path: str, value: Any) -> None:
  """Writes through a temporary file, so a killed writer leaves the old file."""
  tmp = f'{path}.tmp.{os.getpid()}'
  with open(tmp, 'w') as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


# ---------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------


def launch_fields(config: ml_collections.ConfigDict) -> list[str]:
  """A config file's own top-level fields: its launch-only variant switches.

  Fields such as `role`, `teacher_workdir`, `root`, `pair` or `method` are
  not in `config_lib.default_config()`: the trainer never reads them, they
  only choose the values of the run's fields when `get_config(arg)` runs.
  """
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  if config.get('task') == 'lm':  # kd_jax.lm_train reads all but these.
    return sorted(k for k in LM_LAUNCH_FIELDS if k in config)
  known = config_lib.default_config()
  return sorted(k for k in config.keys() if k not in known)


# The fields of a language-model config (task 'lm') that only choose its
# other fields' values (configs/shakespeare_char.py).
LM_LAUNCH_FIELDS = ('role', 'teacher_model', 'student_model')


def config_json(config: ml_collections.ConfigDict) -> str:
  """The resolved config as `config.json` stores it: every field the run
  reads, without the config file's launch-only fields (`launch_fields`)."""
  run = config.copy_and_resolve_references()
  with run.unlocked():
    for key in launch_fields(config):
      del run[key]
  return run.to_json_best_effort(indent=2, sort_keys=True)


class RunFinished(FileExistsError):
  """The workdir holds a finished run that this one would replace."""


def check_config(workdir: str, resolved_json: str, *, allow_change: bool,
                 has_checkpoint: bool, overwrite_finished: bool = False
                 ) -> None:
  """Refuses to resume a workdir whose checkpoints another config wrote, and
  to train afresh over a finished run.

  A workdir without a checkpoint accepts any config (a first attempt that
  failed before its first checkpoint must not lock out its fix); the change
  is logged. A finished run (summary.json) whose checkpoints are gone would
  be trained again from step 0 and its summary.json and config.json
  replaced: refused unless `overwrite_finished` (then the caller retires
  its summary, `retire_summary`).

  Raises:
    ValueError: the workdir holds checkpoints of a different config and
      `allow_change` is False.
    RunFinished: the workdir holds a finished run without checkpoints and
      `overwrite_finished` is False.
  """
  if is_finished(workdir) and not has_checkpoint and not overwrite_finished:
    raise RunFinished(
        f'workdir {workdir!r} holds a finished run ({_path(workdir, SUMMARY)}) '
        'whose checkpoints are gone: this run would train from step 0 and '
        'replace its summary.json and config.json. Use a fresh --workdir, or '
        'pass --overwrite_finished (train_and_evaluate(..., '
        'overwrite_finished=True)) to replace it.')
  diff = stored_config_diff(workdir, resolved_json)
  if not diff:
    return
  if not has_checkpoint:
    logging.warning('workdir %r holds the config of an earlier attempt that '
                    'wrote no checkpoint; starting afresh with the new config '
                    '(fields that differ: %s).', workdir, diff)
    return
  if allow_change:
    logging.warning('workdir %r: resuming with a changed config '
                    '(allow_config_change=True; fields that differ: %s).',
                    workdir, diff)
    return
  raise ValueError(
      f'workdir {workdir!r} holds a run of a different config (fields that '
      f'differ: {diff}). Use a fresh --workdir, or set '
      f'config.allow_config_change=True to resume it anyway.')


def stored_config_diff(workdir: str, resolved_json: str) -> list[str]:
  """`config_diff` between the workdir's config.json and `resolved_json`
  (`config_json` of a config); [] when the workdir holds none."""
  path = _path(workdir, CONFIG)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    previous = f.read()
  if previous == resolved_json:
    return []
  return config_diff(json.loads(previous), json.loads(resolved_json))


def _leaves(tree: Any, prefix: str = '') -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_leaves(value, f'{prefix}{key}.'))
    return out
  return {prefix[:-1]: tree}


def config_diff(previous: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """Dotted fields whose values differ between two resolved configs.

  `previous` is read in the current form first (`config_lib.upgrade_json`:
  fields that have moved since it was written are where they are now). A
  field that `previous` lacks and `now` holds at its default (one that a
  later kd_jax added to `default_config()`) is no difference, nor is a
  top-level field that `default_config()` lacks (a config file's launch-only
  field, which earlier versions stored): workdirs of earlier versions
  resume.
  """
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  # Language-model workdirs of kd_jax's first LM version stored no field
  # that the image config lacks (task, length, vocab_size, eval_split...):
  # what such a file does not hold, it cannot contradict.
  unrecorded_lm = now.get('task') == 'lm' and 'task' not in previous
  previous = config_lib.upgrade_json(previous)
  default = config_lib.default_config()
  defaults = _leaves(json.loads(config_json(default)))
  if now.get('task') == 'lm':
    defaults, launch = {}, set(LM_LAUNCH_FIELDS)
  else:
    launch = {k for k in set(previous) | set(now) if k not in default}
  old, new = _leaves(previous), _leaves(now)
  diff = []
  for key in sorted(set(old) | set(new)):
    if key not in old and key in defaults and new[key] == defaults[key]:
      continue
    if key not in old and unrecorded_lm:
      continue
    if key.split('.')[0] in launch:
      continue
    if key not in old or key not in new or not _same(key, old[key],
                                                     new[key]):
      diff.append(key)
  return diff


def _same(key: str, a: Any, b: Any) -> bool:
  """a == b, except that a directory field (`*dir`, `*workdir`, also
  inside lists such as `teachers`) written relative in one and absolute in
  the other is the same when both name the same directory."""
  if isinstance(a, dict) and isinstance(b, dict):
    return a.keys() == b.keys() and all(
        _same(f'{key}.{k}', a[k], b[k]) for k in a)
  if isinstance(a, list) and isinstance(b, list):
    return len(a) == len(b) and all(_same(key, x, y) for x, y in zip(a, b))
  if key.endswith('dir') and isinstance(a, str) and isinstance(b, str) and (
      a and b):
    return os.path.realpath(a) == os.path.realpath(b)
  return a == b


def write_config(workdir: str, resolved_json: str) -> None:
  tmp = _path(workdir, f'{CONFIG}.tmp.{os.getpid()}')
  with open(tmp, 'w') as f:
    f.write(resolved_json)
  os.replace(tmp, _path(workdir, CONFIG))


def unknown_fields(config: ml_collections.ConfigDict,
                   reference: ml_collections.ConfigDict,
                   prefix: str = '', options: tuple[str, ...] = ()
                   ) -> list[str]:
  """Messages for fields of `config` that `reference` lacks, with the
  nearest known name ("did you mean"); the dotted fields in `options` are a
  method's option dicts, whose keys the method checks."""
  out = []
  for key in config.keys():
    name = f'{prefix}{key}'
    if key not in reference:
      out.append(f'config.{name}{did_you_mean(key, reference.keys(), prefix)}')
    elif (name not in options
          and isinstance(config[key], ml_collections.ConfigDict)
          and isinstance(reference[key], ml_collections.ConfigDict)):
      out += unknown_fields(config[key], reference[key], f'{name}.', options)
  return out


def did_you_mean(key: str, known, prefix: str = '') -> str:
  """'; did you mean <prefix><nearest>?' or '' when nothing is near."""
  close = difflib.get_close_matches(key, [str(k) for k in known], n=1)
  return f' (did you mean {prefix}{close[0]}?)' if close else ''


# ---------------------------------------------------------------------------
# run_info.json
# ---------------------------------------------------------------------------


def teacher_train_command(workdir: str) -> str:
  return (f'python -m kd_jax.main --config=configs/<teacher config>.py '
          f'--workdir={workdir}')


def spec_dict(spec) -> dict[str, Any]:
  """A model spec (ConfigDict or dict) as JSON stores it."""
  spec = (spec.to_dict() if isinstance(spec, ml_collections.ConfigDict)
          else dict(spec))
  return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def has_run_info(workdir: str) -> bool:
  return os.path.exists(_path(workdir, RUN_INFO))


def teacher_model(teacher_cfg, field: str = 'config.teachers[0]'
                  ) -> ml_collections.ConfigDict:
  """A teacher entry's model spec: its own, or (model None) the one its run
  recorded in run_info.json."""
  if teacher_cfg.model is not None:
    return teacher_cfg.model
  return ml_collections.ConfigDict(
      read_run_info(teacher_cfg.workdir, f'{field}.workdir')['model'])


def read_run_info(workdir: str, field: str = 'teacher workdir'
                  ) -> dict[str, Any]:
  """The run_info of the run in `workdir`.

  Raises:
    FileNotFoundError: naming `field` (the config field that pointed here)
      and how to train that run.
  """
  path = _path(workdir, RUN_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'{field} {workdir!r} holds no trained run ({path} is missing). '
        f'Train that run first: {teacher_train_command(workdir)}, or fix '
        f'the path.')
  try:
    with open(path) as f:
      info = json.load(f)
  except (OSError, ValueError) as e:
    raise ValueError(f'{path} is unreadable ({e}); rerun the command that '
                     f'trained {workdir!r} to rewrite it.') from None
  missing = ([k for k in RUN_INFO_KEYS if k not in info]
             if isinstance(info, dict) else list(RUN_INFO_KEYS))
  if missing:
    raise ValueError(
        f'{path} lacks {missing} (a kd_jax run_info.json holds '
        f'{list(RUN_INFO_KEYS)}): it was not written by kd_jax or was edited; '
        f'rerun the command that trained {workdir!r} to rewrite it, or point '
        f'{field} at another run.')
  return info


# What every run_info.json holds; final_step (absent in runs still training
# before it was recorded) and specialist are optional.
RUN_INFO_KEYS = ('model', 'num_classes', 'class_names', 'image_shape',
                 'dataset')


def write_run_info(workdir: str, *, model_spec, num_classes: int,
                   class_names, image_shape, dataset: str,
                   final_step: int,
                   specialist: dict[str, Any] | None = None,
                   task: str | None = None) -> None:
  """`specialist`: a specialist's group (`DatasetInfo.specialist`); `task`:
  'lm' for a language model (`num_classes` its vocabulary, `image_shape`
  its window length)."""
  info = dict(model=spec_dict(model_spec), num_classes=int(num_classes),
              class_names=list(class_names),
              image_shape=[int(d) for d in image_shape], dataset=dataset,
              final_step=int(final_step))
  if specialist is not None:
    info['specialist'] = specialist
  if task is not None:
    info['task'] = task
  _write_json(_path(workdir, RUN_INFO), info)


# ---------------------------------------------------------------------------
# summary.json
# ---------------------------------------------------------------------------


def write_summary(workdir: str, summary: dict[str, Any]) -> None:
  _write_json(_path(workdir, SUMMARY), summary)


def read_summary(workdir: str) -> dict[str, Any] | None:
  """The run's summary, or None when it has not finished."""
  path = _path(workdir, SUMMARY)
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def is_finished(workdir: str) -> bool:
  return os.path.exists(_path(workdir, SUMMARY))


def retire_summary(workdir: str) -> str:
  """Renames summary.json to summary.replaced-<n>.json (the first free n),
  so that the workdir no longer reads as finished; returns the new path."""
  n = 0
  while os.path.exists(target := _path(workdir, f'summary.replaced-{n}.json')):
    n += 1
  os.rename(_path(workdir, SUMMARY), target)
  return target


# ---------------------------------------------------------------------------
# LOCK
# ---------------------------------------------------------------------------


class WorkdirLocked(RuntimeError):
  """Another run holds the workdir."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def _read_lock(path: str) -> dict[str, Any] | None:
  """The lock's holder; None if there is no lock, {} if it names none (it
  is being written, or holds something other than kd_jax's JSON object)."""
  try:
    with open(path) as f:
      held = json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}
  if not isinstance(held, dict) or not isinstance(held.get('host'), str):
    return {}
  try:
    held['pid'] = int(held.get('pid'))
  except (TypeError, ValueError):
    return {}
  return held if held['pid'] > 0 else {}


def _process_start(pid: int) -> str | None:
  """When process `pid` started (clock ticks since boot; Linux's /proc), or
  None where that is unknown. With the pid it names one process: pids are
  reused."""
  try:
    with open(f'/proc/{pid}/stat') as f:
      return f.read().rsplit(')', 1)[1].split()[19]
  except (OSError, IndexError):
    return None


def _process_command(pid: int) -> str:
  """' (it runs `<command line>`)' of process `pid`, or '' if unknown."""
  try:
    with open(f'/proc/{pid}/cmdline', 'rb') as f:
      command = f.read().replace(b'\0', b' ').decode(errors='replace').strip()
  except OSError:
    return ''
  return f' (it runs `{command[:200]}`)' if command else ''


def _holder(info: dict[str, Any]) -> str:
  return (f'pid {info.get("pid")} on host {info.get("host")!r}, started '
          f'{info.get("started")}')


class WorkdirUnusable(OSError):
  """--workdir is a file, or a folder this process cannot write."""


def prepare(workdir: str) -> None:
  """Creates `workdir` (and its parents) if missing.

  Raises:
    WorkdirUnusable: `workdir` is a file, or cannot be created.
  """
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise WorkdirUnusable(
        f'--workdir={workdir!r} is a file, not a folder: give the path of a '
        'folder (it is created if missing).')
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise WorkdirUnusable(
        f'cannot create --workdir={workdir!r} ({e.strerror}): give a path '
        'where this process can create a folder.') from None


def acquire_lock(workdir: str) -> dict[str, Any]:
  """Takes `workdir/LOCK` for this process; returns what it wrote.

  A lock left by a dead process of this host (or one whose pid now belongs
  to another process: the lock records its holder's start time) is taken
  over (logged). Created by hard-linking a complete file into place, which is atomic on local and
  network filesystems alike.

  Raises:
    WorkdirLocked: a live run (or one on another host) holds it; the message
      names the holder and how to remove a stale lock.
    WorkdirUnusable: `workdir` is a file or cannot be written.
  """
  prepare(workdir)
  path = _path(workdir, LOCK)
  host = socket.gethostname()
  mine = dict(host=host, pid=os.getpid(),
              started=datetime.datetime.now().isoformat(timespec='seconds'),
              process_start=_process_start(os.getpid()))
  tmp = f'{path}.{host}.{os.getpid()}'
  try:
    with open(tmp, 'w') as f:
      json.dump(mine, f)
  except OSError as e:
    raise WorkdirUnusable(
        f'cannot write in --workdir={workdir!r} ({e.strerror}): give a folder '
        'this process can write (check its permissions, or a read-only '
        'filesystem).') from None
  try:
    for _ in range(10):
      try:
        os.link(tmp, path)
        return mine
      except FileExistsError:
        pass
      except OSError as e:  # Filesystems without hard links.
        if e.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP):
          raise
        try:
          fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
          pass
        else:
          with os.fdopen(fd, 'w') as f:
            json.dump(mine, f)
          return mine
      held = _read_lock(path)
      if held is None:
        continue  # Released meanwhile.
      if not held:
        raise WorkdirLocked(
            f'workdir {workdir!r} is locked by {path}, which names no holder '
            f'(a run may be creating it, or it is not a kd_jax lock: one holds '
            f'a JSON object with host and pid). If no run is using this '
            f'workdir, remove {path} and start again.')
      pid = held['pid']
      if held['host'] == host and (
          not _pid_alive(pid) or held.get('process_start') not in (
              None, _process_start(pid))):
        logging.warning('workdir %r: taking over the stale lock of %s (that '
                        'process is gone%s).', workdir, _holder(held),
                        '' if not _pid_alive(pid) else
                        '; its pid now belongs to another process')
        if _read_lock(path) == held:
          with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        continue
      if held['host'] == host:
        # A lock without the holder's start time (an older kd_jax's) cannot
        # tell a live holder from another process that got its pid.
        unsure = ('' if held.get('process_start') else
                  f' If pid {pid} is not that run{_process_command(pid)}, '
                  f'the lock is stale: remove {path} and start again.')
        raise WorkdirLocked(
            f'workdir {workdir!r} is in use by another run ({_holder(held)}). '
            f'Wait for it to finish, or use another --workdir.{unsure}')
      raise WorkdirLocked(
          f'workdir {workdir!r} is in use by a run on another host '
          f'({_holder(held)}). If that run is gone (the host crashed), remove '
          f'{path} and start again; otherwise use another --workdir.')
    raise WorkdirLocked(f'could not take {path}: it changed hands repeatedly.')
  finally:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(tmp)


def release_lock(workdir: str, mine: dict[str, Any]) -> None:
  """Removes `workdir/LOCK` if this process still holds it."""
  path = _path(workdir, LOCK)
  if _read_lock(path) == mine:
    with contextlib.suppress(FileNotFoundError):
      os.unlink(path)


@contextlib.contextmanager
def lock(workdir: str, take: bool = True) -> Iterator[None]:
  """Holds the workdir's lock for the body; `take=False` (the other
  processes of a multi-process run, which share process 0's) holds nothing."""
  if not take:
    yield
    return
  mine = acquire_lock(workdir)
  try:
    yield
  finally:
    release_lock(workdir, mine)
