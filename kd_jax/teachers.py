"""Where teacher logits come from.

Every source becomes a `Teacher`: a pytree of arrays (`variables`) and a pure
`forward(variables, batch) -> logits [K, B, C]` (K teachers) that runs inside
the compiled train step. Online teachers are restored from the checkpoint of a
supervised run; an ensemble of teachers with the same architecture is one
stacked pytree run with `jax.vmap`; a logits cache puts the logits into the
batch on the host, so its `forward` only reads them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kd_jax import checkpointing
from kd_jax import models

RUN_INFO = 'run_info.json'


@dataclasses.dataclass(frozen=True)
class Teacher:
  variables: Any
  forward: Callable[[Any, dict[str, jax.Array]], jax.Array]
  names: tuple[str, ...]
  weights: tuple[float, ...]
  fingerprint: str
  # Host-side batch -> batch with 'teacher_logits' added (logits caches).
  host_lookup: Callable[[dict[str, Any]], dict[str, Any]] | None = None


def _spec_dict(spec) -> dict[str, Any]:
  spec = spec.to_dict() if isinstance(spec, ml_collections.ConfigDict) else dict(spec)
  return {k: list(v) if isinstance(v, tuple) else v for k, v in spec.items()}


def _teacher_train_command(workdir: str) -> str:
  return (f'python -m kd_jax.main --config=configs/<teacher config>.py '
          f'--workdir={workdir}')


def read_run_info(workdir: str) -> dict[str, Any]:
  path = os.path.join(workdir, RUN_INFO)
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'teacher workdir {workdir!r} holds no trained run ({path} is '
        f'missing). Train the teacher first: {_teacher_train_command(workdir)}, '
        f'or fix config.teachers[...].workdir.')
  with open(path) as f:
    return json.load(f)


def _check_compatible(index: int, teacher_cfg, run_info: dict[str, Any],
                      num_classes: int, image_shape: tuple[int, ...]) -> None:
  where = f'config.teachers[{index}] (workdir {teacher_cfg.workdir!r})'
  if run_info['num_classes'] != num_classes:
    raise ValueError(
        f'{where} was trained with {run_info["num_classes"]} classes but the '
        f'student dataset has {num_classes}: distil between runs on the same '
        f'classes, or set the student dataset to match.')
  if tuple(run_info['image_shape']) != tuple(image_shape):
    raise ValueError(
        f'{where} expects images of shape {tuple(run_info["image_shape"])} '
        f'but the student input pipeline gives {tuple(image_shape)}: set '
        f'config.image_size/config.channels to match the teacher.')
  trained_spec = run_info['model']
  if _spec_dict(teacher_cfg.model) != trained_spec:
    raise ValueError(
        f'{where}.model is {_spec_dict(teacher_cfg.model)} but that workdir '
        f'trained {trained_spec}: make config.teachers[{index}].model match '
        f'the trained run.')


def load_online(teacher_cfgs, num_classes: int, image_shape: tuple[int, ...],
                dtype=jnp.float32) -> Teacher:
  """Restores frozen teachers from their runs' latest checkpoints."""
  if not teacher_cfgs:
    raise ValueError(
        'config.distill.teacher_source is online/ensemble but config.teachers '
        'is empty: add teacher_config(model, workdir) entries.')
  loaded, specs, fingerprints = [], [], []
  for i, t in enumerate(teacher_cfgs):
    run_info = read_run_info(t.workdir)
    _check_compatible(i, t, run_info, num_classes, image_shape)
    model = models.get_model(t.model, num_classes, dtype=dtype)
    abstract = jax.eval_shape(
        lambda: model.init(jax.random.key(0),
                           jnp.zeros((1, *image_shape), jnp.float32)))
    abstract = {'params': abstract['params'],
                'batch_stats': abstract.get('batch_stats', {})}
    try:
      variables, step = checkpointing.restore_model(t.workdir, abstract)
    except FileNotFoundError as e:
      raise FileNotFoundError(
          f'config.teachers[{i}]: {e}. Train the teacher first: '
          f'{_teacher_train_command(t.workdir)}') from None
    if step != run_info.get('final_step', step):
      raise ValueError(
          f'config.teachers[{i}] (workdir {t.workdir!r}) has not finished '
          f'training: latest checkpoint step {step}, final step '
          f'{run_info["final_step"]}. Let it finish, or resume it.')
    loaded.append((model, variables))
    specs.append(json.dumps(_spec_dict(t.model), sort_keys=True))
    fingerprints.append(f'{os.path.abspath(t.workdir)}@{step}')

  names = tuple(f'teacher{i}' for i in range(len(loaded)))
  weights = tuple(float(t.get('weight', 1.0)) for t in teacher_cfgs)
  fingerprint = hashlib.sha256('|'.join(fingerprints).encode()).hexdigest()[:16]

  def apply(model, variables, images):
    logits = model.apply(variables, images, train=False)
    return jax.lax.stop_gradient(logits.astype(jnp.float32))

  if len(set(specs)) == 1:
    # Same architecture: one stacked pytree, one vmapped forward pass.
    model = loaded[0][0]
    stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *[v for _, v in loaded])

    def forward(variables, batch):
      return jax.vmap(apply, in_axes=(None, 0, None))(
          model, variables, batch['image'])
    return Teacher(stacked, forward, names, weights, fingerprint)

  mixed_models = [m for m, _ in loaded]

  def forward_mixed(variables, batch):
    return jnp.stack([apply(m, v, batch['image'])
                      for m, v in zip(mixed_models, variables)])
  return Teacher([v for _, v in loaded], forward_mixed, names, weights,
                 fingerprint)


def write_run_info(workdir: str, *, model_spec, num_classes: int,
                   class_names, image_shape, dataset: str,
                   final_step: int) -> None:
  info = dict(model=_spec_dict(model_spec), num_classes=int(num_classes),
              class_names=list(class_names),
              image_shape=[int(d) for d in image_shape], dataset=dataset,
              final_step=int(final_step))
  with open(os.path.join(workdir, RUN_INFO), 'w') as f:
    json.dump(info, f, indent=2)

