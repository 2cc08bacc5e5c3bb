"""Specialist ensembles (Hinton et al. 2015, sec. 5) as a teacher.

A generalist and specialists trained by `config.specialist.index` runs,
combined by `specialists.combine` inside the compiled step.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpointing
from kd_jax import models
from kd_jax import rundir
from kd_jax.specialists import groups as specialist_groups
from kd_jax import specialists
from kd_jax.teachers import online
from kd_jax.teachers.base import Teacher


@dataclasses.dataclass(frozen=True)
class SpecialistEnsemble:
  """A generalist, its specialists and their groups, as arrays and functions.

  Attributes:
    variables: {'generalist': its variables (stacked, as `online.load_online`),
      'specialists': the specialists' variables (one stacked pytree when they
      share an architecture, else a list), 'oversampling_factor': [S]}.
    heads: `(variables, batch) -> (generalist_logits [B, C],
      specialist_logits [S, B, G + 1])`, pure and jittable; the specialists'
      heads are padded to G + 1 columns (dustbin last) and their dustbin
      logits already corrected by `log(oversampling_factor)`.
    groups: the S groups of class indices.
    membership: bool [S, C].
    top_n: the generalist's top classes that pick the active specialists.
    num_steps: SQUAREM steps of `specialists.combine`.
    fingerprint: identifies the generalist and specialists by content (a
      digest of their checkpoints' checksums and the groups).
    legacy_fingerprints: what earlier versions called the same combination
      (by workdir and step), so that runs distilled from it resume.
  """
  variables: Any
  heads: Callable[[Any, dict[str, jax.Array]],
                  tuple[jax.Array, jax.Array]]
  groups: specialists.Groups
  membership: np.ndarray
  top_n: int
  num_steps: int
  fingerprint: str
  legacy_fingerprints: tuple[str, ...] = ()

  def combine(self, variables, batch) -> dict[str, jax.Array]:
    """log q [B, C] of the combination, and what it was combined from."""
    generalist_logits, specialist_logits = self.heads(variables, batch)
    active = specialists.active_specialists(generalist_logits,
                                            self.membership, self.top_n)
    log_q = specialists.combine(generalist_logits, specialist_logits,
                                self.groups, active,
                                num_steps=self.num_steps)
    return dict(log_q=log_q, generalist_logits=generalist_logits,
                specialist_logits=specialist_logits, active=active)


def _pad_head(variables, padded_model, image_shape):
  """A specialist's variables with its head widened to the padded width.

  Columns are inserted (zeros) before the last one, the dustbin, on every
  leaf whose last axis differs between the two models: the head.
  """
  def shapes(m):
    return jax.eval_shape(lambda: m.init(
        jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)))

  padded = shapes(padded_model)
  padded = {'params': padded['params'],
            'batch_stats': padded.get('batch_stats', {})}

  def pad(leaf, target):
    if leaf.shape == target.shape:
      return leaf
    width = target.shape[-1] - leaf.shape[-1]
    zeros = jnp.zeros((*leaf.shape[:-1], width), leaf.dtype)
    return jnp.concatenate([leaf[..., :-1], zeros, leaf[..., -1:]], axis=-1)

  return jax.tree.map(pad, variables, padded)


def _load_specialist(index: int, teacher_cfg, group, info, head_size: int,
                     dtype):
  """(padded model, padded variables, run_info, step, checksum) of
  specialist `index`, its checkpoint checked against its checksum and for
  NaN or Inf."""
  where = f'config.teachers[{index + 1}] (workdir {teacher_cfg.workdir!r})'
  run_info = rundir.read_run_info(teacher_cfg.workdir,
                                  f'config.teachers[{index + 1}].workdir')
  recorded = run_info.get('specialist')
  if recorded is None:
    raise ValueError(
        f'{where} is not a specialist\'s run (its run_info.json has no '
        '"specialist"): train it with config.specialist.index='
        f'{index}, or fix the workdir.')
  names = [str(info.class_names[c]) for c in group]
  if (recorded['group'] != list(group)
      or recorded['dataset_class_names'] != list(info.class_names)):
    raise ValueError(
        f'{where} trained specialist {recorded["index"]} for classes '
        f'{recorded["group_names"]}, but group {index} of config.specialist '
        f'is {names}: list the specialists\' workdirs in group order in '
        'config.teachers[1:], or retrain this one with the current groups '
        '(the groups file changed since it was trained).')
  online.check_compatible(index + 1, teacher_cfg, run_info, len(group) + 1,
                          info.image_shape)
  spec = rundir.teacher_model(teacher_cfg, f'config.teachers[{index + 1}]')
  model = models.get_model(spec, len(group) + 1, dtype=dtype)
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *info.image_shape), jnp.float32)))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  train = (f'python -m kd_jax.main --config=<specialists config>.py:role='
           f'specialist,specialist.index={index} '
           f'--workdir={teacher_cfg.workdir}')
  try:
    variables, step, checksum = checkpointing.restore_model_checked(
        teacher_cfg.workdir, abstract)
  except FileNotFoundError as e:
    raise FileNotFoundError(
        f'{where}: {e}. Train the specialist first: {train}') from None
  except checkpointing.CheckpointDamaged as e:
    raise checkpointing.CheckpointDamaged(
        f'{where}: {e}. Restore that checkpoint folder from a copy, or train '
        f'the specialist again: {train}') from None
  if step != run_info.get('final_step', step):
    raise ValueError(f'{where} has not finished training: latest checkpoint '
                     f'step {step}, final step {run_info["final_step"]}.')
  checkpointing.refuse_nonfinite(
      variables, where, step, 'specialist',
      f'train it again with a lower learning rate: {train}')
  padded_model = models.get_model(spec, head_size, dtype=dtype)
  variables = _pad_head(variables, padded_model, info.image_shape)
  return padded_model, variables, run_info, step, checksum


def load_specialist_ensemble(config, info, dtype=jnp.float32
                             ) -> SpecialistEnsemble:
  """The generalist `config.teachers[0]` and specialists `config.teachers[1:]`.

  The groups are `config.specialist`'s (`specialist_groups.config_groups`);
  specialist s must have been trained for group s (its run_info records the
  group), and a groups file must have been clustered from this generalist.
  """
  groups = specialist_groups.config_groups(config, info.class_names)
  teacher_cfgs = list(config.teachers)
  if len(teacher_cfgs) != len(groups) + 1:
    raise ValueError(
        f'config.teachers has {len(teacher_cfgs)} entries but '
        f'teacher_source="specialists" with {len(groups)} groups needs '
        f'{len(groups) + 1}: the generalist, then one specialist per group in '
        'group order.')
  top_n = int(config.specialist.top_n)
  if not 1 <= top_n <= info.num_classes:
    raise ValueError(f'config.specialist.top_n={top_n} must be in [1, '
                     f'{info.num_classes}].')
  generalist = online.load_online(
      teacher_cfgs[:1], info.num_classes, info.image_shape, dtype=dtype,
      normalization=online.stream_normalization(info))
  generalist_print = specialist_groups.params_fingerprint(generalist.variables)
  if config.specialist.groups_file:
    recorded = specialist_groups.read_groups_file(
        config.specialist.groups_file).get('generalist_fingerprint')
    if recorded not in (None, generalist_print):
      raise ValueError(
          f'config.specialist.groups_file={config.specialist.groups_file!r} '
          'was clustered from another generalist than config.teachers[0] '
          f'(workdir {teacher_cfgs[0].workdir!r}): cluster again from this '
          'generalist, or point config.teachers[0] at the one it used.')

  head_size = max(len(g) for g in groups) + 1
  loaded = [_load_specialist(s, t, groups[s], info, head_size, dtype)
            for s, t in enumerate(teacher_cfgs[1:])]
  factors = np.asarray([run_info['specialist']['oversampling_factor']
                        for _, _, run_info, _, _ in loaded], np.float32)
  specs = {json.dumps(rundir.spec_dict(rundir.teacher_model(t)),
                      sort_keys=True) for t in teacher_cfgs[1:]}

  def apply(model, variables, images):
    return model.apply(variables, images, train=False).astype(jnp.float32)

  if len(specs) == 1:  # One architecture: a stacked pytree, vmapped.
    model = loaded[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs),
                           *[v for _, v, _, _, _ in loaded])

    def specialist_forward(variables, images):
      return jax.vmap(apply, in_axes=(None, 0, None))(model, variables,
                                                      images)
  else:
    mixed = [m for m, _, _, _, _ in loaded]
    stacked = [v for _, v, _, _, _ in loaded]

    def specialist_forward(variables, images):
      return jnp.stack([apply(m, v, images) for m, v in zip(mixed, variables)])

  def heads(variables, batch):
    generalist_logits = generalist.forward(variables['generalist'], batch)[0]
    specialist_logits = specialists.correct_dustbin(
        specialist_forward(variables['specialists'], batch['image']),
        variables['oversampling_factor'][:, None])
    return (jax.lax.stop_gradient(generalist_logits),
            jax.lax.stop_gradient(specialist_logits))

  variables = dict(generalist=generalist.variables, specialists=stacked,
                   oversampling_factor=jnp.asarray(factors))
  groups_json = json.dumps([list(g) for g in groups])
  # By content, as online teachers: the same checkpoints wherever they lie.
  prints = [generalist.fingerprint, groups_json] + [
      checksum for *_, checksum in loaded]
  legacy = [*generalist.legacy_fingerprints[:1], groups_json] + [
      f'{os.path.abspath(t.workdir)}@{step}'
      for t, (_, _, _, step, _) in zip(teacher_cfgs[1:], loaded)]
  return SpecialistEnsemble(
      variables=variables, heads=heads, groups=groups,
      membership=specialists.group_matrix(groups, info.num_classes),
      top_n=top_n, num_steps=int(config.specialist.num_steps),
      fingerprint=_digest(prints), legacy_fingerprints=(_digest(legacy),))


def _digest(parts: list[str]) -> str:
  return hashlib.sha256('|'.join(parts).encode()).hexdigest()[:16]


def load_specialists(config, info, dtype=jnp.float32, mesh=None) -> Teacher:
  """The combination of a generalist and its specialists, as one teacher
  (replicated on `mesh`: config.distill.shard_teacher is refused for it).

  Its forward runs the generalist and every specialist, corrects the
  dustbins, activates the specialists whose group meets the generalist's
  top `config.specialist.top_n` classes and returns the combination's
  log-probabilities (`specialists.combine`) as logits [1, B, C].
  """
  del mesh
  ensemble = load_specialist_ensemble(config, info, dtype=dtype)

  def forward(variables, batch):
    return ensemble.combine(variables, batch)['log_q'][None]

  return Teacher(variables=ensemble.variables, forward=forward,
                 names=('specialists',), weights=(1.0,),
                 fingerprint=ensemble.fingerprint,
                 legacy_fingerprints=ensemble.legacy_fingerprints)
