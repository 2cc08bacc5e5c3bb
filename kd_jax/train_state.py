"""The train state: every array a step reads and writes, in typed fields.

`TrainState`'s fields are the same for every run; what a config does not
use is an empty dict. Its parameters train in groups (`GROUPS`: the
student, CTKD's temperature, the feature terms' connectors), each with its
own state of the run's optimizer (`optim.per_group`), so that one update
serves them all and each keeps its own gradient clipping. `opt_state` holds
the groups the run trains.

A checkpoint stores the state as the dict that earlier versions of kd_jax
stored (`to_checkpoint`, `from_checkpoint`): the same paths, checksums and
shapes, so workdirs of earlier versions resume, and a run's model is
`{'params', 'batch_stats'}` as `kd_jax.checkpointing` expects.
"""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

# The trainable groups, in the order their updates are applied.
GROUPS = ('student', 'temperature', 'connectors')


@flax.struct.dataclass
class TrainState:
  """What one train step reads and writes.

  Attributes:
    step: the number of steps taken.
    params, batch_stats: the student's variables (the model).
    opt_state: {group: the optimizer's state} of each trained group.
    rng: the run's key; a step's randomness is `fold_in(rng, step)`.
    temperature_params: CTKD's temperature (`kd_jax.methods.ctkd`), {}
      without it.
    connector_params, connector_batch_stats: the feature terms' connectors
      (`kd_jax.objective.FeatureConnectors`), {} without them.
    example_state: {term: per-example state} of the feature methods that
      keep one (CRD's memory banks), {} without them.
  """
  step: jax.Array
  params: Any
  batch_stats: Any
  opt_state: dict[str, Any]
  rng: jax.Array
  temperature_params: Any
  connector_params: Any
  connector_batch_stats: Any
  example_state: Any

  def trainable(self) -> dict[str, Any]:
    """{group: params} of the groups this run trains."""
    params = dict(student=self.params, temperature=self.temperature_params,
                  connectors=self.connector_params)
    return {g: params[g] for g in GROUPS if g in self.opt_state}

  def with_trainable(self, trainable: dict[str, Any]) -> TrainState:
    """The state with the groups' params replaced by `trainable`'s."""
    return self.replace(
        params=trainable['student'],
        temperature_params=trainable.get('temperature',
                                         self.temperature_params),
        connector_params=trainable.get('connectors', self.connector_params))


# Checkpoint entries of each optional group, named as earlier versions did.
_CHECKPOINT_ENTRIES = {
    'temperature': ('temperature_params', 'temperature_opt_state'),
    'connectors': ('connector_params', 'connector_batch_stats',
                   'connector_opt_state', 'example_state'),
}
_OPT_STATE_ENTRY = {'temperature': 'temperature_opt_state',
                    'connectors': 'connector_opt_state'}


def to_checkpoint(state: TrainState) -> dict[str, Any]:
  """The dict a checkpoint stores: the student's entries, then each trained
  group's (`temperature_*`, `connector_*` and `example_state`)."""
  out = dict(step=state.step, params=state.params,
             batch_stats=state.batch_stats,
             opt_state=state.opt_state['student'], rng=state.rng)
  fields = dict(temperature_params=state.temperature_params,
                connector_params=state.connector_params,
                connector_batch_stats=state.connector_batch_stats,
                example_state=state.example_state)
  for group, entries in _CHECKPOINT_ENTRIES.items():
    if group in state.opt_state:
      for entry in entries:
        out[entry] = (state.opt_state[group]
                      if entry == _OPT_STATE_ENTRY[group] else fields[entry])
  return out


def from_checkpoint(stored: dict[str, Any]) -> TrainState:
  """The state a checkpoint's dict (`to_checkpoint`) holds."""
  opt_state = {'student': stored['opt_state']}
  for group, entry in _OPT_STATE_ENTRY.items():
    if entry in stored:
      opt_state[group] = stored[entry]
  return TrainState(
      step=stored['step'], params=stored['params'],
      batch_stats=stored['batch_stats'], opt_state=opt_state,
      rng=stored['rng'],
      temperature_params=stored.get('temperature_params', {}),
      connector_params=stored.get('connector_params', {}),
      connector_batch_stats=stored.get('connector_batch_stats', {}),
      example_state=stored.get('example_state', {}))
