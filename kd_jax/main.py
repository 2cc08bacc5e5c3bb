"""Trains or distils as a config file says.

  python -m kd_jax.main --config=configs/mnist5k_teacher.py --workdir=/tmp/t

Multi-host: give every process the same --coordinator_address and
--num_processes, and its own --process_id (or leave all three unset where
`jax.distributed.initialize()` detects them, e.g. on Cloud TPU). When a
process dies, every other one stops within --peer_timeout_s seconds with a
last line that names the lost process and says to rerun the same command on
every host, which resumes from the last checkpoint (each process runs as a
child of a small supervisor, which outlives the coordination service's
native abort). When one process fails with an error, the others stop within
about 15 s, naming it and its error.

Prints a progress bar per run on stderr and the run's summary lines; library
INFO logs come back with --log_level=info. A run that is refused (a bad
config field, workdir or teacher) or that diverges ends with exit code 1 and
one paragraph that names the cause and the fix (for a divergence, the exact
command that resumes from the last healthy checkpoint); --log_level=debug
adds the traceback. A finished run whose checkpoints were deleted is trained
again over its summary.json only with --overwrite_finished.
"""

import atexit
import gc
import os
import signal
import socket
import subprocess
import sys
import threading
import time

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from kd_jax import divergence
from kd_jax import multihost
from kd_jax import progress

# Seconds without a peer's heartbeat before a multi-process run stops.
PEER_TIMEOUT_S = 30.0
# The exit code of a process that stopped because a peer was lost.
PEER_LOST_EXIT = 75
# The exit code of a supervised process that ended with a refusal it printed
# (a divergence, which every process meets at the same step): its supervisor
# exits 1 and adds nothing, so that the message stays the last line.
REFUSED_EXIT = 76

with progress.quiet_native_imports(sys.argv):
  # Training reads data: TensorFlow, lazy in the library, loads here, where
  # its import-time C++ lines are silenced.
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top



def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so that importing
  the module (tests, doctests, other CLIs) never defines them twice."""
  config_flags.DEFINE_config_file(
      'config', None, 'A config file in configs/, with :args after it.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the '
                      'summary go; a rerun resumes there.')
  multihost.define_flags()
  flags.DEFINE_float('peer_timeout_s', PEER_TIMEOUT_S,
                     'Multi-process: seconds without a peer\'s heartbeat '
                     'before the run stops, naming the lost process.')
  flags.DEFINE_bool('overwrite_finished', False,
                    'Train a finished run (its summary.json) whose '
                    'checkpoints are gone again from step 0, replacing its '
                    'summary.json (kept as summary.replaced-<n>.json).')
  flags.DEFINE_string('compilation_cache_dir', None,
                      'A folder where compiled programs persist, so that a '
                      'rerun or a resume skips its compiles (any size).')
  progress.define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])


def use_compilation_cache(cache_dir: str) -> None:
  """Persists every compiled program in `cache_dir`, however small or quick
  to compile: a run's programs take a second or two each to compile on CPU,
  under JAX's default thresholds for caching them."""
  jax.config.update('jax_compilation_cache_dir', cache_dir)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', -1)


def _lost(process: int, count: int, why: str,
          then: str = 'rerun the same command on every host') -> None:
  """Ends this process with a last line that says what happened and what to
  do; os._exit, so that no collective's abort dump comes after it."""
  role = ' (the coordinator)' if process == 0 else ''
  line = (f'kd_jax: lost JAX process {process}{role} of {count}: {why}. '
          f'Checkpoints up to the last one are safe: {then} to resume from '
          'it.')
  logging.error(line)
  logging.flush()
  print(line, file=sys.stderr, flush=True)
  os._exit(PEER_LOST_EXIT)  # pylint: disable=protected-access


def _coordinator_reachable(address: str) -> bool:
  host, port = address.rsplit(':', 1)
  try:
    with socket.create_connection((host, int(port)), timeout=5):
      return True
  except OSError:
    return False


def supervise(process_id: int, num_processes: int,
              coordinator_address: str | None) -> int:
  """Runs this command in a child process; its exit code.

  The coordination service aborts a process whose coordinator died with a
  native dump that Python cannot intercept; run as a child, its death still
  ends with a last line that names the lost process (when the coordinator
  no longer answers) and says how to resume.
  """
  env = dict(os.environ, KD_JAX_SUPERVISED='1')
  child = subprocess.Popen([sys.executable, '-m', 'kd_jax.main',
                            *sys.argv[1:]], env=env)
  while True:
    try:
      code = child.wait()
      break
    except KeyboardInterrupt:
      child.send_signal(signal.SIGINT)
  if code in (0, PEER_LOST_EXIT):
    return code
  if code == REFUSED_EXIT:
    return 1
  how = (f'signal {signal.Signals(-code).name}' if code < 0
         else f'exit code {code}')
  if (process_id != 0 and coordinator_address
      and not _coordinator_reachable(coordinator_address)):
    _lost(0, num_processes, f'this process stopped ({how}) and the '
          f'coordinator at {coordinator_address} no longer answers')
  print(f'kd_jax: JAX process {process_id} of {num_processes} stopped '
        f'({how}). If a peer process died, rerun the same command on every '
        'host to resume from the last checkpoint.', file=sys.stderr,
        flush=True)
  return 1


# The exit code of this process once it has told its peers that it failed
# (`_announce_failure`); None while it has not.
_failure_code = None


def _announce_failure(error: BaseException, code: int) -> None:
  """Tells the peer processes that this one failed (and with what), so
  that a failure in one process ends every one of them instead of leaving
  the others waiting in a collective: see `watch_peers`."""
  global _failure_code
  _failure_code = code
  try:
    from jax._src import distributed  # pylint: disable=g-import-not-at-top
    text = ' '.join(f'{type(error).__name__}: {error}'.split())
    distributed.global_state.client.key_value_set(
        f'kd_jax/failed/{jax.process_index()}', text[:300] or 'an error',
        allow_overwrite=True)
  except Exception:  # pylint: disable=broad-except
    pass  # Its peers still notice when its heartbeat stops.


def _exit_failed() -> None:
  """Ends a process that failed (and said so) once its peers are gone."""
  logging.flush()
  sys.stdout.flush()
  sys.stderr.flush()
  os._exit(_failure_code)  # pylint: disable=protected-access


def watch_peers(interval_s: float = 2.0, timeout_s: float = PEER_TIMEOUT_S
                ) -> threading.Thread:
  """Starts a daemon thread that stops this process within about
  `timeout_s` seconds of a peer process's death.

  Each process writes a counter to the distributed key-value store every
  `interval_s` and reads the others'; a counter that stands still for
  `timeout_s`, or a store that no longer answers (process 0, which hosts
  it, is gone), ends the run with `_lost`'s message, well before the
  coordination service's own heartbeat timeout aborts it with a dump.

  A peer that failed says so (`_announce_failure`): unless this process
  fails too within `grace_s` (a divergence, met by every process at the same
  step, ends each with its own message), it ends naming that peer and its
  error (also when it notices the peer gone first). A process that failed
  itself ends with the exit code of its own error and no further line,
  `2 * interval_s + 1` seconds after its error (time for every peer to read
  it), without waiting in JAX's shutdown barrier for peers it ended.
  """
  from jax._src import distributed  # pylint: disable=g-import-not-at-top
  client = distributed.global_state.client
  me, count = jax.process_index(), jax.process_count()
  seen = {p: ('', time.monotonic()) for p in range(count) if p != me}
  grace_s = 3 * interval_s + 5
  # `at_exit` runs before JAX's own exit handler (registered earlier, so
  # run later) shuts the store down: the store of a process that is ending
  # stops answering, and that names no lost peer.
  exiting = threading.Event()
  failures: dict[int, tuple[str, float]] = {}  # Peer: (its error, seen at).

  def at_exit():
    exiting.set()
    if _failure_code is not None:
      # Long enough for every peer to read this process's failure, then
      # out, without waiting in JAX's shutdown barrier for peers it ended.
      time.sleep(2 * interval_s + 1)
      _exit_failed()

  atexit.register(at_exit)

  def lost(p: int, why: str) -> None:
    if p in failures:
      _lost(p, count, f'it failed with {failures[p][0]} (its own log has '
            'the rest)', then='fix that, then rerun the command on every host')
    _lost(p, count, why)

  def beat():
    n = 0
    while True:
      n += 1
      try:
        client.key_value_set(f'kd_jax/alive/{me}', str(n),
                             allow_overwrite=True)
      except Exception as e:  # pylint: disable=broad-except
        if _failure_code is not None:
          _exit_failed()
        if exiting.is_set():
          return
        lost(0, f'the key-value store it hosts does not answer '
             f'({type(e).__name__})')
      now = time.monotonic()
      for p, (value, since) in seen.items():
        try:
          current = client.key_value_try_get(f'kd_jax/alive/{p}')
        except Exception:  # pylint: disable=broad-except
          current = value  # Not written yet.
        if p not in failures:
          try:
            failures[p] = (client.key_value_try_get(f'kd_jax/failed/{p}'),
                           now)
          except Exception:  # pylint: disable=broad-except
            pass  # It has not failed.
        if current != value:
          seen[p] = (current, now)
        elif now - since > timeout_s:
          if _failure_code is not None:
            _exit_failed()
          lost(p, f'no heartbeat for {timeout_s:.0f} s')
        if (_failure_code is None and p in failures
            and now - failures[p][1] > grace_s):
          lost(p, '')
      time.sleep(interval_s)

  thread = threading.Thread(target=beat, name='kd_jax_peers', daemon=True)
  thread.start()
  return thread


def _rerun_advice(error: BaseException) -> str:
  """The command that resumes a diverged run with the settings it needs."""
  if isinstance(error, divergence.Diverged) and error.changes:
    return f' Command: {divergence.rerun_command(sys.argv, error.changes)}'
  return ''


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  progress.apply_log_level_flag()
  if f.compilation_cache_dir:
    use_compilation_cache(f.compilation_cache_dir)
  if (multihost.requested(f) and (f.num_processes or 0) > 1
      and not os.environ.get('KD_JAX_SUPERVISED')):
    sys.exit(supervise(f.process_id or 0, f.num_processes,
                       f.coordinator_address))
  multihost.initialize(f)
  logging.info('JAX process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  if jax.process_count() > 1:
    watch_peers(timeout_s=f.peer_timeout_s)
  refused = REFUSED_EXIT if os.environ.get('KD_JAX_SUPERVISED') else 1
  with progress.exit_on_refusal('kd_jax.main', _rerun_advice, refused):
    try:
      if f.config.get('task') == 'lm':
        summary = lm_train.train_and_evaluate(f.config, f.workdir)
      else:
        summary = train.train_and_evaluate(
            f.config, f.workdir, overwrite_finished=f.overwrite_finished)
    except Exception as e:  # pylint: disable=broad-except
      if jax.process_count() > 1:
        if not progress.refusal(e):
          # A collective that failed because a peer died: give the watcher
          # time to name it (it ends the process). A refusal is kd_jax's
          # own, never a lost peer's.
          logging.exception('the run failed; checking that every peer '
                            'process is alive.')
          time.sleep(f.peer_timeout_s + 5)
        _announce_failure(e, refused if progress.refusal(e) else 1)
      raise
  if jax.process_index() == 0:
    print(f'{summary["model"]}, {summary["num_params"]:,} params, '
          f'{summary["step"]} steps: {f.workdir}')
    if summary.get('task') == 'lm':
      print(lm_train.result_lines(summary))
    else:
      print(progress.result_table(summary))
  # The interpreter's last garbage collection, over TensorFlow's and JAX's
  # objects, took 2-6 s after every run ended; the process exits right away.
  gc.freeze()


if __name__ == '__main__':
  define_flags()
  app.run(main)
