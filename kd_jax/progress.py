"""What a run shows on the terminal: one progress line, and quiet libraries.

Everything a run measures goes to TensorBoard and its workdir; the terminal
gets a progress bar per run (steps, rate, ETA and the latest loss and eval
accuracy), redrawn in place on a TTY and printed as an occasional line in a
log file, then the CLI's result table. Library INFO logs (absl, orbax, TFDS,
JAX) are off unless a CLI is given `--log_level=info`. A refusal (a bad
field, file or state, raised by kd_jax with its fix) ends a CLI with its
message alone (`exit_on_refusal`); `--log_level=debug` shows its traceback.
"""

from __future__ import annotations

import contextlib
import linecache
import logging as std_logging
import os
import sys
import time
from typing import Any, Callable, Iterator, Sequence, TextIO

from absl import app
from absl import flags
from absl import logging

LOG_LEVELS = ('debug', 'info', 'warning', 'error')


def define_flags() -> None:
  """The `--log_level` flag of the CLIs that call `apply_log_level_flag`."""
  flags.DEFINE_enum(
      'log_level', 'warning', LOG_LEVELS,
      "Library logs (absl, orbax, TFDS, JAX) at this level and above go to "
      "stderr; 'info' brings back the INFO logs that are off by default. "
      'TensorFlow\'s C++ INFO logs follow TF_CPP_MIN_LOG_LEVEL=0.')


def apply_log_level_flag() -> None:
  """Applies --log_level (defined by `define_flags`), unless absl's own
  --verbosity/-v was given on the command line, which then wins."""
  if not flags.FLAGS['verbosity'].present:
    set_log_level(flags.FLAGS.log_level)


def set_log_level(level: str) -> None:
  """Drops Python log records below `level` ('debug' ... 'error').

  absl's handler sits on the root logger once `app.run` has started, so its
  level also filters orbax's, TFDS's and JAX's loggers.
  """
  if level not in LOG_LEVELS:
    raise ValueError(f'log level {level!r}; choose one of {LOG_LEVELS}.')
  logging.set_verbosity(level)
  # TensorFlow's own warnings here are deprecations inside TFDS's readers.
  std_logging.getLogger('tensorflow').setLevel(
      std_logging.ERROR if level == 'warning' else std_logging.NOTSET)


@contextlib.contextmanager
def quiet_native_imports(argv: Sequence[str]) -> Iterator[None]:
  """Imports in this block write no C++ INFO or WARNING lines to stderr.

  TensorFlow and XLA log through C++: TF_CPP_MIN_LOG_LEVEL=2 drops their INFO
  and WARNING lines once TensorFlow is imported, but TensorFlow writes a few
  INFO lines while it is being imported, before any level applies, so stderr
  is closed for the duration of the import. Nothing is hidden when the
  environment sets TF_CPP_MIN_LOG_LEVEL=0 or `argv` asks for
  `--log_level=info` or `debug`; a level above 2 is kept. (JAX's import
  sets the level to 1 where it is unset, so 1 does not say that a user
  asked for TensorFlow's warnings.)
  """
  verbose = any(a in (f'--log_level={level}', f'-log_level={level}')
                for a in argv for level in ('info', 'debug'))
  level = os.environ.get('TF_CPP_MIN_LOG_LEVEL', '')
  if verbose or level == '0':
    yield
    return
  if not level.isdigit() or int(level) < 2:
    os.environ['TF_CPP_MIN_LOG_LEVEL'] = '2'
  sys.stderr.flush()
  saved = os.dup(2)
  devnull = os.open(os.devnull, os.O_WRONLY)
  os.dup2(devnull, 2)
  try:
    yield
  finally:
    sys.stderr.flush()
    os.dup2(saved, 2)
    os.close(saved)
    os.close(devnull)


def run_quiet_cli(main: Callable[[list[str]], Any],
                  define_cli_flags: Callable[[], None]) -> None:
  """`app.run(main)` for a CLI that reads data: TensorFlow imported without
  its C++ lines, `--log_level` defined next to `define_cli_flags()`'s flags
  and applied before `main` runs, refusals shown as their message
  (`exit_on_refusal`)."""
  with quiet_native_imports(sys.argv):
    import tensorflow  # pylint: disable=g-import-not-at-top,unused-import,import-outside-toplevel
  define_cli_flags()
  define_flags()

  def quiet_main(argv):
    apply_log_level_flag()
    with exit_on_refusal(os.path.basename(argv[0])):
      return main(argv)
  app.run(quiet_main)


_PACKAGE = os.path.dirname(os.path.abspath(__file__))


def refusal(error: BaseException) -> bool:
  """Whether `error` is a refusal: a ValueError, OSError, FloatingPointError
  or kd_jax exception that a `raise` statement in kd_jax's own code raised,
  whose message names the field, file or state and the fix. Anything else
  (a library's error, a bug) is not, and keeps its traceback."""
  if not (isinstance(error, (ValueError, OSError, FloatingPointError))
          or type(error).__module__.split('.')[0] == 'kd_jax'):
    return False
  tb = error.__traceback__
  if tb is None:
    return False
  while tb.tb_next is not None:
    tb = tb.tb_next
  filename = os.path.abspath(tb.tb_frame.f_code.co_filename)
  return (filename.startswith(_PACKAGE + os.sep)
          and linecache.getline(filename, tb.tb_lineno).lstrip().startswith(
              'raise'))


@contextlib.contextmanager
def exit_on_refusal(program: str,
                    advice: Callable[[BaseException], str] | None = None,
                    exit_code: int = 1) -> Iterator[None]:
  """Ends the process (`exit_code`) with `program: <message>` on stderr,
  and nothing else, when the body raises a `refusal`; `advice(error)` may
  add to the message. With --log_level=debug (where defined) the error is
  raised with its traceback instead, as is anything that is not a refusal."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    debug = 'log_level' in flags.FLAGS and flags.FLAGS.log_level == 'debug'
    if debug or not refusal(e):
      raise
    message = ' '.join(str(e).split())
    if advice is not None:
      message += advice(e)
    logging.flush()
    sys.stderr.flush()
    print(f'{program}: {message}', file=sys.stderr, flush=True)
    sys.exit(exit_code)


def _clock(seconds: float) -> str:
  seconds = int(round(seconds))
  hours, rest = divmod(seconds, 3600)
  return (f'{hours}:{rest // 60:02d}:{rest % 60:02d}' if hours
          else f'{rest // 60}:{rest % 60:02d}')


def _format(value: Any) -> str:
  return f'{value:.4g}' if isinstance(value, float) else str(value)


class Progress:
  """A run's progress line on a stream (stderr by default).

  `update(step)` after each train step, `show(name=value)` when a metric is
  measured, `close()` when the run ends. On a TTY the line is redrawn in place
  at most every `interval` seconds (default 0.2); elsewhere (a log file, CI,
  a notebook) it is printed as a new line at most every `interval` seconds
  (default 30), and once more by `close()` with the final metrics.

  >>> import io
  >>> out = io.StringIO()
  >>> bar = Progress(4, label='teacher', stream=out, width=8)
  >>> for step in range(1, 5):
  ...   bar.update(step)
  >>> bar.show(loss=0.25, test_acc='97.50%')
  >>> bar.close()
  >>> out.getvalue().split(' [0:')[0]
  'teacher 100% [########] 4/4'
  >>> out.getvalue().rstrip().endswith('loss 0.25, test_acc 97.50%')
  True
  """

  def __init__(self, total_steps: int, first_step: int = 0, *,
               label: str = '', stream: TextIO | None = None,
               interval: float | None = None, width: int = 24,
               enabled: bool = True):
    self.total = max(int(total_steps), 1)
    self.step = int(first_step)
    self.label = label
    self.stream = sys.stderr if stream is None else stream
    isatty = getattr(self.stream, 'isatty', None)
    self.tty = bool(isatty and isatty())
    self.interval = (interval if interval is not None
                     else 0.2 if self.tty else 30.0)
    self.width = width
    self.enabled = enabled
    self.metrics: dict[str, Any] = {}
    self._start = time.monotonic()
    self._last_drawn = self._start
    # The rate is measured from the first finished step on, so that the
    # first step's compilation does not inflate the ETA.
    self._rate_origin: tuple[float, int] | None = None
    self._drawn: tuple[int, dict[str, Any]] | None = None

  def update(self, step: int) -> None:
    """Records that `step` has finished; redraws if it is time to."""
    self.step = int(step)
    now = time.monotonic()
    if self._rate_origin is None:
      self._rate_origin = (now, self.step)
    if self.enabled and now - self._last_drawn >= self.interval:
      self._draw(now)

  def show(self, **metrics: Any) -> None:
    """Sets metrics that the line shows from its next redraw on."""
    self.metrics.update(metrics)

  def close(self) -> None:
    """Draws the final line (if any step ran) and ends it."""
    if self.enabled and self._rate_origin is not None:
      self._draw(time.monotonic(), final=True)

  def line(self, now: float | None = None) -> str:
    """The progress line: label, bar, steps, elapsed<ETA, rate, metrics."""
    now = time.monotonic() if now is None else now
    fraction = min(self.step / self.total, 1.0)
    filled = int(round(fraction * self.width))
    parts = [self.label] if self.label else []
    parts.append(f'{100 * fraction:3.0f}% [{"#" * filled}'
                 f'{"." * (self.width - filled)}] {self.step}/{self.total}')
    elapsed = now - self._start
    rate = None
    if self._rate_origin is not None:
      origin_time, origin_step = self._rate_origin
      if self.step > origin_step and now > origin_time:
        rate = (self.step - origin_step) / (now - origin_time)
    eta = '?' if rate is None else _clock((self.total - self.step) / rate)
    timing = f'[{_clock(elapsed)}<{eta}'
    if rate is not None:
      timing += f', {rate:.3g} steps/s'
    parts.append(timing + ']')
    if self.metrics:
      parts.append(', '.join(f'{k} {_format(v)}'
                             for k, v in self.metrics.items()))
    return ' '.join(parts)

  def _draw(self, now: float, final: bool = False) -> None:
    if final and not self.tty and self._drawn == (self.step, self.metrics):
      return  # This line is already in the log.
    text = self.line(now)
    if self.tty:
      self.stream.write('\r' + text + '\x1b[K' + ('\n' if final else ''))
    else:
      self.stream.write(text + '\n')
    self.stream.flush()
    self._last_drawn = now
    self._drawn = (self.step, dict(self.metrics))


def result_table(summary: dict[str, Any]) -> str:
  """A finished run's summary (`train.train_and_evaluate`'s) as a Markdown
  table: one row per eval split.

  >>> print(result_table({'model': 'mlp', 'num_params': 24790, 'eval': {
  ...     'test': {'accuracy': 0.9, 'errors': 100.0, 'num_examples': 1000.0,
  ...              'loss': 0.3, 'teacher_accuracy': 0.95,
  ...              'agreement': 0.92}}}))
  | split | acc | errors | loss | teacher acc | agreement w/ teacher |
  |---|---|---|---|---|---|
  | test | 90.00% | 100 / 1000 | 0.3 | 95.00% | 92.00% |
  """
  splits = summary['eval']
  distilled = any('teacher_accuracy' in r for r in splits.values())
  header = ['split', 'acc', 'errors', 'loss']
  if distilled:
    header += ['teacher acc', 'agreement w/ teacher']
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for split, r in splits.items():
    row = [split, f'{100 * r["accuracy"]:.2f}%',
           f'{int(round(r["errors"]))} / {int(r["num_examples"])}',
           f'{r["loss"]:.4g}']
    if distilled:
      row += [f'{100 * r[k]:.2f}%' if k in r else '-'
              for k in ('teacher_accuracy', 'agreement')]
    lines.append('| ' + ' | '.join(row) + ' |')
  return '\n'.join(lines)
