"""Orbax checkpoints of a run: what is saved, and how it comes back.

A checkpoint at `workdir/checkpoints/<step>/` holds three items:
- `model`: {'params', 'batch_stats'}: all that a later run needs to use the
  trained network, e.g. as a frozen teacher;
- `train`: {'opt_state', 'step', 'rng'} and any other state entries (a
  learned temperature, `kd_jax.objective`): what resuming needs on top;
- `meta`: JSON (step, the data position, the config fingerprint).
Teachers are never part of a student's checkpoint. Orbax writes each step into
a temporary folder and renames it when complete, so a run killed mid-save
keeps its previous checkpoint.

`meta` also records a checksum of the saved values and one of the model
alone (`model_checksum`), the state's structure (paths, shapes, dtypes) and
whatever the trainer adds (topology, teacher fingerprint, health). `restore`
starts from the newest step and falls back to the newest one that restores
cleanly with a matching checksum; damaged steps are moved to
`workdir/checkpoints_broken/`, never deleted. `restore_model` (a finished
run as a teacher or a warm start) checks the model against its checksum
too, and its checksum is that model's identity.

The manager keeps the newest `keep` steps and any step the trainer pins (the
last healthy one of a diverging run, `kd_jax.divergence`); a run that
diverged moves the steps after it to `workdir/checkpoints_diverged/`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
import jax
import jax.numpy as jnp
from jax.experimental import multihost_utils
import numpy as np
import orbax.checkpoint as ocp

from kd_jax import train_state

CHECKPOINT_DIR = 'checkpoints'
BROKEN_DIR = 'checkpoints_broken'
DIVERGED_DIR = 'checkpoints_diverged'
# The state entries a trained model consists of (the rest resumes training).
MODEL_KEYS = ('params', 'batch_stats')


class NoUsableCheckpoint(RuntimeError):
  """Every checkpoint of a run failed to restore."""


class ModelChanged(ValueError):
  """The checkpoints hold a state of other paths, shapes or dtypes."""


class CheckpointDamaged(ValueError):
  """A checkpoint does not restore, or its values miss their checksum."""


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def config_fingerprint(config_json: str) -> str:
  return hashlib.sha256(config_json.encode()).hexdigest()[:16]


@dataclasses.dataclass
class _Pinned:
  """An orbax preservation policy: keeps the steps in `steps`, a set that
  its owner changes while the manager runs."""
  steps: set[int]

  def should_preserve(self, checkpoints, *, context) -> list[bool]:
    del context
    return [info.step in self.steps for info in checkpoints]


def manager(workdir: str, keep: int, pinned: set[int] | None = None
            ) -> ocp.CheckpointManager:
  """The run's checkpoint manager: keeps the newest `keep` steps, and the
  steps in `pinned` (a set the caller may change between saves) however
  old."""
  policies = ocp.checkpoint_managers
  return ocp.CheckpointManager(
      checkpoint_dir(workdir),
      item_names=('model', 'train', 'meta'),
      options=ocp.CheckpointManagerOptions(
          create=True, preservation_policy=policies.AnyPreservationPolicy(
              [policies.LatestN(n=keep), _Pinned(
                  pinned if pinned is not None else set())])))


def _host_array(leaf) -> np.ndarray:
  if jax.dtypes.issubdtype(leaf.dtype, jax.dtypes.prng_key):
    leaf = jax.random.key_data(leaf)
  if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
    if leaf.sharding.is_fully_replicated:
      leaf = leaf.addressable_shards[0].data  # Any copy will do.
    else:  # Split over processes (CRD's banks): every process gathers it.
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
  return np.asarray(jax.device_get(leaf))


def _hash_leaf(h, key: str, leaf) -> None:
  a = np.ascontiguousarray(_host_array(leaf))
  h.update(f'{key}:{a.dtype}:{a.shape}'.encode())
  h.update(a.tobytes())


def checksum(tree) -> str:
  """A hash of every leaf's path, dtype and bytes."""
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    _hash_leaf(h, jax.tree_util.keystr(path), leaf)
  return h.hexdigest()[:32]


def state_checksums(state: dict[str, Any]) -> tuple[str, str]:
  """(checksum(state), checksum of its model {'params', 'batch_stats'}), in
  one pass over the state: the model's leaves come in the same order and
  under the same paths in both."""
  whole, model = hashlib.sha256(), hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    a = np.ascontiguousarray(_host_array(leaf))
    for h in (whole, model) if path[0].key in MODEL_KEYS else (whole,):
      h.update(f'{key}:{a.dtype}:{a.shape}'.encode())
      h.update(a.tobytes())
  return whole.hexdigest()[:32], model.hexdigest()[:32]


def _path_tokens(key: str) -> tuple[str, ...]:
  """A leaf's path as tokens, whatever containers hold it (orbax restores a
  NamedTuple without a target as a dict): "['a'][0].b" -> ('a', '0', 'b')."""
  return tuple(''.join(t) for t in re.findall(
      r"\['((?:[^'\\]|\\.)*)'\]|\[(\d+)\]|\.(\w+)", key))


def _checksum_in_stored_order(tree, structure: dict[str, str]) -> str | None:
  """checksum() of the saved state, from `tree` restored without a target:
  its leaves hashed in the order and under the paths that the saved state's
  `structure` (meta) records; None if the leaves are not those."""
  leaves = {_path_tokens(jax.tree_util.keystr(p)): leaf
            for p, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]}
  h = hashlib.sha256()
  for key in structure:
    leaf = leaves.pop(_path_tokens(key), None)
    if leaf is None:
      return None
    _hash_leaf(h, key, leaf)
  return None if leaves else h.hexdigest()[:32]


def structure(tree) -> dict[str, str]:
  """{path: 'dtype[shape]'} of every leaf (arrays or ShapeDtypeStructs)."""
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    dtype = leaf.dtype
    if jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key):
      dtype = 'key'
    out[jax.tree_util.keystr(path)] = f'{dtype}{list(leaf.shape)}'
  return out


def _split(state):
  model = {k: state[k] for k in MODEL_KEYS}
  # Everything else resumes training only (e.g. a learned temperature).
  train = {k: v for k, v in state.items() if k not in model}
  return model, train


def save(mngr: ocp.CheckpointManager,
         state: dict[str, Any] | train_state.TrainState,
         meta: dict[str, Any]) -> None:
  """Saves `state` at its step, with `meta` plus checksum and structure; a
  `TrainState` as the dict `train_state.to_checkpoint` makes of it."""
  if isinstance(state, train_state.TrainState):
    state = train_state.to_checkpoint(state)
  step = int(jax.device_get(state['step']))
  model, train = _split(state)
  whole, model_checksum = state_checksums(state)
  meta = dict(meta, step=step, checksum=whole, model_checksum=model_checksum,
              structure=structure(state), state_layout=STATE_LAYOUT)
  mngr.save(step, args=ocp.args.Composite(
      model=ocp.args.StandardSave(model),
      train=ocp.args.StandardSave(train),
      meta=ocp.args.JsonSave(meta)))


def _short(e: BaseException) -> str:
  text = ' '.join(str(e).split())
  return f'{type(e).__name__}: {text[:300]}{"..." if len(text) > 300 else ""}'


def _model_change(workdir: str, step: int, stored: dict[str, str],
                  wanted: dict[str, str]) -> ModelChanged:
  differ = [f'{k}: stored {stored.get(k, "absent")}, this config '
            f'{wanted.get(k, "absent")}'
            for k in sorted(set(stored) | set(wanted))
            if stored.get(k) != wanted.get(k)]
  return ModelChanged(
      f'the checkpoints in {checkpoint_dir(workdir)} (step {step}) hold a '
      f'model or optimizer of other shapes than this config builds '
      f'({len(differ)} differ, e.g. {"; ".join(differ[:3])}). '
      f'config.allow_config_change=True resumes only changes that keep the '
      f'state\'s shapes: use a fresh --workdir for the new model, and set '
      f'config.init_from={workdir!r} to start it from these weights.')


# State entries that checkpoints of earlier layouts (meta without
# 'state_layout') saved under another name: name now -> name then. Such a
# checkpoint restores under the new name.
RENAMED = {'example_state': 'crd_state'}
STATE_LAYOUT = 2


def _renamed(state: dict[str, Any], names: dict[str, str]) -> dict[str, Any]:
  return {names.get(k, k): v for k, v in state.items()}


def _stored_names(meta: dict[str, Any], abstract_state) -> dict[str, str]:
  """{name now: name in this checkpoint} of the entries it saved renamed."""
  if meta.get('state_layout', 1) >= STATE_LAYOUT:
    return {}
  stored = {_path_tokens(k)[0] for k in meta.get('structure', {})}
  return {new: old for new, old in RENAMED.items()
          if new in abstract_state and new not in stored}


def _restore_step(mngr, step: int, abstract_state, workdir: str):
  """(state, meta) of `step`; raises ModelChanged or whatever damage does."""
  meta = dict(mngr.restore(step, args=ocp.args.Composite(
      meta=ocp.args.JsonRestore()))['meta'])
  names = _stored_names(meta, abstract_state)
  abstract_state = _renamed(abstract_state, names)
  wanted = structure(abstract_state)
  if 'structure' in meta and meta['structure'] != wanted:
    raise _model_change(workdir, step, meta['structure'], wanted)
  model, train = _split(abstract_state)
  try:
    out = mngr.restore(step, args=ocp.args.Composite(
        model=ocp.args.StandardRestore(model),
        train=ocp.args.StandardRestore(train)))
  except ValueError as e:
    if 'not compatible with the stored shape' in str(e) or 'strict' in str(e):
      raise ModelChanged(
          f'the checkpoints in {checkpoint_dir(workdir)} hold a model of '
          f'other shapes than this config builds ({_short(e)}). Use a fresh '
          f'--workdir for the new model, and set config.init_from='
          f'{workdir!r} to start it from these weights.') from None
    raise
  state = {**out['model'], **out['train']}
  if 'checksum' in meta and checksum(state) != meta['checksum']:
    raise ValueError('its values do not match the checksum recorded when it '
                     'was saved (the files were altered)')
  return _renamed(state, {old: new for new, old in names.items()}), meta


def _move_aside(workdir: str, step: int, folder: str = BROKEN_DIR) -> str:
  aside = os.path.join(os.path.abspath(workdir), folder)
  os.makedirs(aside, exist_ok=True)
  target, n = os.path.join(aside, str(step)), 0
  while os.path.exists(target):
    n += 1
    target = os.path.join(aside, f'{step}.{n}')
  os.rename(os.path.join(checkpoint_dir(workdir), str(step)), target)
  return target


def move_diverged(workdir: str, steps) -> str:
  """Moves the checkpoints of `steps` (saved while a run diverged) to
  `workdir/checkpoints_diverged/`, so that the run resumes from an earlier
  one; returns that folder. Call it with no save in flight."""
  for step in steps:
    _move_aside(workdir, step, DIVERGED_DIR)
  return os.path.join(os.path.abspath(workdir), DIVERGED_DIR)


def restore(mngr: ocp.CheckpointManager,
            abstract_state: dict[str, Any] | train_state.TrainState,
            workdir: str | None = None, move_broken: bool = True
            ) -> tuple[Any, dict[str, Any]] | None:
  """The newest (state, meta) that restores cleanly, laid out like
  `abstract_state` (a `TrainState` comes back as one); None if there is no
  checkpoint.

  A step that fails to restore (damaged files, unreadable metadata, values
  that miss their checksum) is logged and skipped for the next older one;
  once one restores, the damaged ones are moved to `checkpoints_broken/`
  (when `move_broken`, which only one process of a run should set) so that
  `latest_step` names the restored step.

  Raises:
    ModelChanged: the checkpoints hold a state of other shapes.
    NoUsableCheckpoint: no step restores; names each step and its error.
  """
  if isinstance(abstract_state, train_state.TrainState):
    restored = restore(mngr, train_state.to_checkpoint(abstract_state),
                       workdir, move_broken)
    return restored and (train_state.from_checkpoint(restored[0]),
                         restored[1])
  workdir = workdir or os.path.dirname(str(mngr.directory))
  steps = sorted(mngr.all_steps(), reverse=True)
  if not steps:
    return None
  failed = []
  for step in steps:
    try:
      state, meta = _restore_step(mngr, step, abstract_state, workdir)
    except ModelChanged:
      raise
    except Exception as e:  # pylint: disable=broad-except
      logging.warning('checkpoint step %d in %s does not restore (%s); '
                      'trying the next older one.', step,
                      checkpoint_dir(workdir), _short(e))
      failed.append((step, _short(e)))
      continue
    if failed:
      if move_broken:
        for bad, reason in failed:
          target = _move_aside(workdir, bad)
          logging.warning('moved the damaged checkpoint step %d to %s (%s); '
                          'resuming from step %d.', bad, target, reason, step)
      if jax.process_count() > 1:  # Every process sees them moved.
        multihost_utils.sync_global_devices('kd_jax_checkpoint_fallback')
      mngr.reload()
    return state, meta
  tried = '; '.join(f'step {s}: {r}' for s, r in failed)
  raise NoUsableCheckpoint(
      f'no checkpoint in {checkpoint_dir(workdir)} restores ({tried}). They '
      f'are left as they are. To start this run afresh, move that folder '
      f'aside (e.g. mv {checkpoint_dir(workdir)} '
      f'{os.path.join(os.path.abspath(workdir), BROKEN_DIR)}_all) and rerun '
      f'the same command; or use a fresh --workdir.')


def latest_step(workdir: str) -> int | None:
  """The newest committed checkpoint step in `workdir`, None if none.

  Read from the folder's names, not through a CheckpointManager, whose
  constructor is a barrier of all processes once the folder exists: a
  process that looked after process 0 had created it entered one barrier
  more than its peer, and the run hung at its first step.
  """
  steps = ocp.utils.checkpoint_steps(checkpoint_dir(workdir))
  return max(steps) if steps else None


def restore_model(workdir: str, abstract_model: dict[str, Any],
                  step: int | None = None) -> tuple[dict[str, Any], int]:
  """The {'params', 'batch_stats'} of a finished run, and its step, checked
  against the checksum recorded when it was saved (`restore_model_checked`).

  Raises FileNotFoundError when `workdir` holds no checkpoint, and
  CheckpointDamaged when it does not restore or misses its checksum.
  """
  variables, step, _ = restore_model_checked(workdir, abstract_model, step)
  return variables, step


def restore_model_checked(workdir: str, abstract_model: dict[str, Any],
                          step: int | None = None
                          ) -> tuple[dict[str, Any], int, str]:
  """`restore_model`'s (variables, step) and the variables' checksum, which
  identifies the model by content (the same wherever the run lies).

  A checkpoint of this version records the model's checksum; one of an
  earlier version only the whole state's, which is checked by restoring the
  rest of the state too (logged when even that cannot be checked).

  Raises:
    FileNotFoundError: `workdir` holds no checkpoint.
    ModelChanged: `abstract_model` has other shapes than the stored model.
    CheckpointDamaged: the step does not restore, or its values miss their
      checksum.
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
    where = f'checkpoint step {step} in {path}'
    try:
      meta = dict(m.restore(step, args=ocp.args.Composite(
          meta=ocp.args.JsonRestore()))['meta'])
      model = m.restore(step, args=ocp.args.Composite(
          model=ocp.args.StandardRestore(abstract_model)))['model']
    except Exception as e:  # pylint: disable=broad-except
      if 'not compatible with the stored shape' in str(e) or 'strict' in str(
          e):
        raise ModelChanged(f'{where} holds a model of other shapes than '
                           f'this config builds ({_short(e)}).') from None
      raise CheckpointDamaged(f'{where} does not restore ({_short(e)}): its '
                              'files are damaged or incomplete') from None
    model_checksum = checksum(model)
    if 'model_checksum' in meta:
      matches = model_checksum == meta['model_checksum']
    elif 'checksum' in meta and 'structure' in meta:
      matches = _matches_state_checksum(m, step, model, meta, where)
    else:
      matches = True  # Saved before checkpoints carried checksums.
  if not matches:
    raise CheckpointDamaged(
        f'{where} does not match the checksum recorded when it was saved: '
        'its files were altered or damaged')
  return model, step, model_checksum


def _matches_state_checksum(mngr, step: int, model, meta: dict[str, Any],
                            where: str) -> bool:
  """Whether `model` and the rest of the state, restored as saved, match the
  whole state's recorded checksum (a checkpoint of an earlier version); True,
  logged, when the rest cannot be restored to check."""
  try:
    train = mngr.restore(step, args=ocp.args.Composite(
        train=ocp.args.StandardRestore()))['train']
    found = _checksum_in_stored_order({**model, **train}, meta['structure'])
  except Exception as e:  # pylint: disable=broad-except
    found, reason = None, _short(e)
  else:
    reason = 'its state\'s leaves are not the ones it records'
  if found is None:
    logging.warning('%s predates model checksums and its state cannot be '
                    'checked (%s): its model is used unchecked.', where,
                    reason)
    return True
  return found == meta['checksum']


def nonfinite_arrays(tree) -> list[str]:
  """The paths of the arrays of `tree` that hold NaN or infinity."""
  return [jax.tree_util.keystr(p) for p, v in
          jax.tree_util.tree_flatten_with_path(tree)[0]
          if not bool(jnp.isfinite(v).all())]


def refuse_nonfinite(tree, where: str, step: int, what: str,
                     fix: str) -> None:
  """Raises ValueError naming `where`, `step` and the first array of `tree`
  that holds NaN or infinity (a teacher that diverged), and `fix`."""
  bad = nonfinite_arrays(tree)
  if bad:
    raise ValueError(f'{where}: checkpoint step {step} holds NaN or Inf in '
                     f'{len(bad)} arrays (e.g. {bad[0]}): that {what} '
                     f'diverged; {fix}')


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)
