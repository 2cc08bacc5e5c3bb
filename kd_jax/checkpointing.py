"""Orbax checkpoints of a run: what is saved, and how it comes back.

A checkpoint at `workdir/checkpoints/<step>/` holds three items:
- `model`: {'params', 'batch_stats'}: all that a later run needs to use the
  trained network, e.g. as a frozen teacher;
- `train`: {'opt_state', 'step', 'rng'}: what resuming needs on top;
- `meta`: JSON (step, the data position, the config fingerprint).
Teachers are never part of a student's checkpoint. Orbax writes each step into
a temporary folder and renames it when complete, so a run killed mid-save
keeps its previous checkpoint.
"""

from __future__ import annotations

import hashlib
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp

CHECKPOINT_DIR = 'checkpoints'


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def config_fingerprint(config_json: str) -> str:
  return hashlib.sha256(config_json.encode()).hexdigest()[:16]


def manager(workdir: str, keep: int) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      item_names=('model', 'train', 'meta'),
      options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True))


def save(mngr: ocp.CheckpointManager, state: dict[str, Any],
         meta: dict[str, Any]) -> None:
  step = int(jax.device_get(state['step']))
  model = {'params': state['params'], 'batch_stats': state['batch_stats']}
  train = {k: state[k] for k in ('opt_state', 'step', 'rng')}
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      train=ocp.args.StandardSave(train),
      meta=ocp.args.JsonSave(dict(meta, step=step))))


def restore(mngr: ocp.CheckpointManager, abstract_state: dict[str, Any]
            ) -> tuple[dict[str, Any], dict[str, Any]] | None:
  """The latest (state, meta), laid out like `abstract_state`; None if none."""
  step = mngr.latest_step()
  if step is None:
    return None
  model = {k: abstract_state[k] for k in ('params', 'batch_stats')}
  train = {k: abstract_state[k] for k in ('opt_state', 'step', 'rng')}
  out = mngr.restore(step, args=ocp.args.Composite(
      model=ocp.args.StandardRestore(model),
      train=ocp.args.StandardRestore(train),
      meta=ocp.args.JsonRestore()))
  return {**out['model'], **out['train']}, dict(out['meta'])


def latest_step(workdir: str) -> int | None:
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return None
  with ocp.CheckpointManager(path, item_names=('model', 'train', 'meta')) as m:
    return m.latest_step()


def restore_model(workdir: str, abstract_model: dict[str, Any],
                  step: int | None = None) -> tuple[dict[str, Any], int]:
  """The {'params', 'batch_stats'} of a finished run, and its step.

  Raises FileNotFoundError when `workdir` holds no checkpoint.
  """
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    raise FileNotFoundError(f'no checkpoint folder {path}')
  with ocp.CheckpointManager(path, item_names=('model', 'train', 'meta')) as m:
    step = m.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'no checkpoint in {path}')
    # Restored replicated over this run's devices, whatever the device layout
    # of the run that saved it (a teacher trained on another mesh).
    replicated = jax.sharding.NamedSharding(
        jax.make_mesh((jax.device_count(),), ('data',),
                      axis_types=(jax.sharding.AxisType.Auto,)),
        jax.sharding.PartitionSpec())
    abstract_model = jax.tree.map(
        lambda a: a if getattr(a, 'sharding', None) is not None
        else jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=replicated),
        abstract_model)
    out = m.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(abstract_model)))
  return out['model'], step


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
