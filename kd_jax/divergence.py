"""When training has diverged, and what a diverged run keeps.

The trainer checks each window of train measurements it fetches from the
devices (every log step, and every checkpoint step before it saves), from
values the step already returns (`train.train_step`'s measurements; the
parameter norm is computed on those steps; a language model's loop takes it
from the state after `lm_train.lm_step`), so the step's math is untouched:

* a non-finite loss or parameter norm stops the run before that state is
  checkpointed (`Diverged`);
* a loss over `LOSS_GROWTH` times the run's first logged loss, a parameter
  norm over `PARAM_NORM_GROWTH` times the initial parameters' norm, or a
  collapsed train accuracy (`train.COLLAPSE_DROP`) makes the state
  *unhealthy* (`unhealthy`): the run goes on and checkpoints it, but keeps
  the last healthy checkpoint out of rotation until a later one is healthy
  (`Health`: a checkpoint counts as healthy once the loss after it is).

A run that stops moves the checkpoints written after its last healthy one to
`checkpoints_diverged/` (`checkpointing.move_diverged`), so that a rerun
resumes from the healthy one; `Diverged` says which, and which settings to
change (`rerun_command` turns them into the command line).

A training loop (`train`'s for image runs, `lm_train`'s for language
models) feeds each fetched window to `observe` and `check`, calls `pin`
before each save and `release` at the end, and raises what `stop` returns.

An update norm has no such test: under a warm-up its reference, the first
update, is zero, and an exploding update shows in the next parameter norm.
"""

from __future__ import annotations

import dataclasses
import math
import os
import shlex
from typing import Any, Sequence

from absl import logging
import jax
import numpy as np

from kd_jax import checkpointing

# A loss this many times the run's first logged one is exploding (loss
# scales differ between objectives, so the reference is the run's own).
LOSS_GROWTH = 100.0
# Parameters whose norm grew this many times since initialisation.
PARAM_NORM_GROWTH = 100.0


class Diverged(FloatingPointError):
  """Training diverged: the loss or the parameters are no longer finite.

  Attributes:
    resume_step: the healthy checkpoint a rerun resumes from (None: the run
      starts afresh).
    changes: config fields (dotted name -> value) that the rerun should set.
  """

  def __init__(self, message: str, *, resume_step: int | None,
               changes: dict[str, Any]):
    super().__init__(message)
    self.resume_step = resume_step
    self.changes = changes


@dataclasses.dataclass
class Health:
  """What the checks compare against, and what they found so far.

  A checkpoint is healthy once the loss of the step after it (which its
  parameters give) is seen healthy too: a step's loss measures the
  parameters before its update, so an exploding loss condemns the
  checkpoint just before it (`judge_unconfirmed`).

  Attributes:
    param_norm: the parameters' norm before the run's first step (or at a
      resume from a checkpoint that does not record it).
    loss: the mean train loss of the run's first logged window; None until
      then, and for a run resumed from a checkpoint that does not record it.
    last_healthy_step: the latest checkpoint known healthy.
    unconfirmed_step: a later checkpoint saved in a healthy state, whose
      next loss has not been seen yet.
    reason: why the current state is unhealthy; None when it is healthy.
    warnings: each turn from healthy to unhealthy: {'step', 'reason'}.
  """
  param_norm: float
  loss: float | None = None
  last_healthy_step: int | None = None
  unconfirmed_step: int | None = None
  reason: str | None = None
  warnings: list[dict[str, Any]] = dataclasses.field(default_factory=list)

  def meta(self) -> dict[str, Any]:
    """What a checkpoint records of it (`from_meta` reads it back)."""
    return dict(reference_param_norm=self.param_norm,
                reference_loss=self.loss, unhealthy=self.reason,
                last_healthy_step=self.last_healthy_step,
                unconfirmed_step=self.unconfirmed_step,
                divergence_warnings=list(self.warnings))

  @classmethod
  def from_meta(cls, meta: dict[str, Any], param_norm: float) -> Health:
    """The health a checkpoint recorded; `param_norm` (the restored
    parameters') where it records none (an earlier kd_jax's checkpoint,
    whose step counts as healthy)."""
    step = meta.get('step')
    return cls(param_norm=float(meta.get('reference_param_norm', param_norm)),
               loss=meta.get('reference_loss'),
               last_healthy_step=meta.get('last_healthy_step', step),
               unconfirmed_step=meta.get('unconfirmed_step'),
               reason=meta.get('unhealthy'),
               warnings=list(meta.get('divergence_warnings', [])))

  def judge_unconfirmed(self, first_step: int, losses: Sequence[float]
                        ) -> None:
    """Confirms or condemns the unconfirmed checkpoint by the loss of the
    step after it, if it is among `losses` (of consecutive steps from
    `first_step`): finite and not exploding confirms it."""
    step = self.unconfirmed_step
    if step is None or not 0 <= step + 1 - first_step < len(losses):
      return
    loss = float(losses[step + 1 - first_step])
    if math.isfinite(loss) and (self.loss is None
                                or loss <= LOSS_GROWTH * self.loss):
      self.last_healthy_step = step
    self.unconfirmed_step = None

  def saved(self, step: int) -> None:
    """Records a checkpoint of `step`: healthy so far if `reason` is None,
    to be confirmed by the loss after it."""
    if self.reason is None:
      self.unconfirmed_step = step


def nonfinite(measurements: Sequence[dict[str, Any]], first_step: int
              ) -> tuple[str, int] | None:
  """('loss is nan at step 7', 7) for the first of consecutive steps'
  measurements (from `first_step` on) whose loss or parameter norm is not
  finite; None if all are."""
  for step, m in enumerate(measurements, first_step):
    for key, name in (('loss_total', 'loss'), ('param_norm',
                                               'parameter norm')):
      if key in m and not math.isfinite(float(m[key])):
        return f'{name} is {float(m[key])} at step {step}', step
  return None


def unhealthy(loss: float, param_norm: float, health: Health,
              collapsed: bool) -> str | None:
  """Why a state with this window's mean `loss` and this `param_norm` is
  diverging, or None if it is healthy."""
  if health.loss is not None and loss > LOSS_GROWTH * health.loss:
    return (f'the train loss {loss:.4g} is over {LOSS_GROWTH:g} times the '
            f'first one, {health.loss:.4g}')
  if health.param_norm > 0 and param_norm > (PARAM_NORM_GROWTH
                                             * health.param_norm):
    return (f'the parameter norm {param_norm:.4g} is over '
            f'{PARAM_NORM_GROWTH:g} times the initial one, '
            f'{health.param_norm:.4g}')
  if collapsed:
    return 'the train accuracy collapsed'
  return None


def observe(health: Health, first_step: int, window: Sequence[dict[str, Any]],
            run_start: bool) -> tuple[str, int] | None:
  """Feeds `health` the measurements of consecutive steps from `first_step`
  (the run's first window sets the reference loss when `run_start`, a run
  from step 0) and judges the unconfirmed checkpoint; what went non-finite
  first (`nonfinite`), or None."""
  step_losses = [float(m['loss_total']) for m in window]
  if health.loss is None and run_start:
    health.loss = float(np.mean(step_losses))
  health.judge_unconfirmed(first_step, step_losses)
  return nonfinite(window, first_step)


def check(health: Health, step: int, loss: float, param_norm: float,
          collapsed: bool = False) -> None:
  """Updates `health` with the window's mean `loss` and the `param_norm`
  fetched at `step` (a log or checkpoint step), warning when it turns
  unhealthy."""
  reason = unhealthy(loss, param_norm, health, collapsed)
  turned = reason is not None and health.reason is None
  health.reason = reason
  if turned:
    health.warnings.append(dict(step=int(step), reason=reason))
    logging.warning(
        'training is diverging at step %d: %s. The run goes on; its last '
        'healthy checkpoint (step %s) is kept until a later one is healthy, '
        'and summary.json lists this in divergence_warnings.', step, reason,
        health.last_healthy_step)


def pin(health: Health, pinned: set[int], mngr, step: int) -> None:
  """Before the checkpoint of `step`: keeps the last healthy checkpoint out
  of the rotation of `mngr` (whose preservation policy reads `pinned`)
  until a later one is healthy, and records the save in `health`."""
  keep = ({health.last_healthy_step}
          if health.last_healthy_step is not None else set())
  if keep != pinned:
    # No save may be finishing (and rotating) while the pins change.
    mngr.wait_until_finished()
    pinned.clear()
    pinned.update(keep)
  health.saved(step)


def release(health: Health, pinned: set[int], mngr, keep: int,
            workdir: str) -> None:
  """At the end of a run, with its saves finished: a healthy run drops the
  checkpoints it kept beyond the newest `keep`; a diverging one keeps its
  last healthy checkpoint, and says so."""
  if health.reason is None and pinned:
    pinned.clear()
    for old_step in sorted(mngr.all_steps())[:-keep]:
      mngr.delete(old_step)
  if health.reason is not None:
    logging.warning(
        'the run ended diverging (%s); its last healthy checkpoint, step '
        '%s, is kept in %s. summary.json lists it in divergence_warnings.',
        health.reason, health.last_healthy_step,
        checkpointing.checkpoint_dir(workdir))


def stop(what: str, step: int, mngr, workdir: str, config, health: Health,
         start_step: int, is_chief: bool) -> Diverged:
  """Stops a run that diverged at `step`: waits for the saves in flight,
  moves the checkpoints saved after the last healthy one to
  checkpoints_diverged/ (so that a rerun resumes from it) and returns the
  error naming it and what to change (`config.learning_rate`,
  `config.checkpoint_every_steps`)."""
  mngr.wait_until_finished()
  resume = health.last_healthy_step
  moved = sorted(s for s in mngr.all_steps()
                 if resume is None or s > resume)
  moved_to = os.path.join(os.path.abspath(workdir),
                          checkpointing.DIVERGED_DIR)
  if moved and is_chief:
    checkpointing.move_diverged(workdir, moved)
  if jax.process_count() > 1:  # Every process sees them moved.
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices('kd_jax_diverged')
  text, changes = message(
      what, resume_step=resume, moved=moved, moved_to=moved_to,
      first_warning=next((w for w in health.warnings
                          if resume is None or w['step'] > resume), None),
      first_checkpoint=config.checkpoint_every_steps,
      learning_rate=config.learning_rate,
      before_any_update=start_step == 0 and step == 1)
  return Diverged(text, resume_step=resume, changes=changes)


def lower_learning_rate(learning_rate: float) -> float:
  """A tenth of `learning_rate`, to three significant digits."""
  return float(f'{learning_rate / 10:.3g}')


def message(what: str, *, resume_step: int | None, moved: Sequence[int],
            moved_to: str, first_warning: dict[str, Any] | None,
            first_checkpoint: int, learning_rate: float,
            before_any_update: bool) -> tuple[str, dict[str, Any]]:
  """(the error message of a run that stops on `what`, the config changes
  a rerun should make)."""
  if before_any_update:
    # The first step's loss comes from the initial parameters.
    return (f'{what}, before any update: not the learning rate, but the '
            'inputs, the model or the teacher give non-finite values; fix '
            'them and rerun the same command.'), {}
  lower = lower_learning_rate(learning_rate)
  text = [f'training diverged: {what}.']
  if first_warning:
    text.append(f'It had been diverging since step {first_warning["step"]} '
                f'({first_warning["reason"]}).')
  if moved:
    many = len(moved) > 1
    text.append(f'Checkpoint{"s" if many else ""} '
                f'{", ".join(map(str, moved))}, saved as it diverged, '
                f'{"were" if many else "was"} moved to {moved_to}.')
  fix = (f'rerun with a lower config.learning_rate (e.g. {lower}, a tenth) '
         'or a config.grad_clip_norm > 0')
  if resume_step is not None:
    text.append(f'The last healthy checkpoint, step {resume_step}, is kept '
                f'and a rerun resumes from it: {fix}, and '
                'config.allow_config_change=True to resume it with changed '
                'settings.')
    return ' '.join(text), dict(learning_rate=lower, allow_config_change=True)
  if moved:
    text.append('No checkpoint was healthy, so the workdir starts afresh and '
                f'accepts a changed config: {fix}.')
  else:
    text.append('No checkpoint was written yet (the first comes at step '
                f'{first_checkpoint}, config.checkpoint_every_steps), so the '
                f'workdir accepts a changed config: {fix}.')
  return ' '.join(text), dict(learning_rate=lower)


def rerun_command(argv: Sequence[str], changes: dict[str, Any]) -> str:
  """`argv` (a `python -m kd_jax.main` command line) with `changes` added to
  its --config argument (replacing any earlier setting of those fields), as
  a shell command."""
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  args = list(argv[1:])
  for i, arg in enumerate(args):
    if arg.startswith(('--config=', '-config=')) or arg in ('--config',
                                                            '-config'):
      flag, value = (arg.split('=', 1) if '=' in arg
                     else (arg, args[i + 1] if i + 1 < len(args) else ''))
      path, _, config_arg = value.partition(':')
      parts = [p for p in config_lib._split_top_level(config_arg)  # pylint: disable=protected-access
               if p and p.split('=', 1)[0] not in changes]
      parts += [f'{k}={v!r}' for k, v in changes.items()]
      new = f'{path}:{",".join(parts)}'
      if '=' in arg:
        args[i] = f'{flag}={new}'
      else:
        args[i + 1] = new
      break
  words = ['python -m kd_jax.main'] + [shlex.quote(a) for a in args]
  # Every process of a multi-process run reruns it with its own index.
  for i, arg in enumerate(args):
    if arg.startswith(('--process_id=', '-process_id=')):
      words[i + 1] = '--process_id="$PROCESS_ID"'
    elif arg in ('--process_id', '-process_id') and i + 1 < len(args):
      words[i + 2] = '"$PROCESS_ID"'
  command = ' '.join(words)
  if '"$PROCESS_ID"' in command:
    command += ' (on every process, PROCESS_ID its index as before)'
  return command
