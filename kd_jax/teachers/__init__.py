"""Where teacher logits come from.

Every source becomes a `Teacher`: a pytree of arrays (`variables`) and a pure
`forward(variables, batch) -> logits [K, B, C]` (K teachers) that runs inside
the compiled train step. `config.distill.teacher_source` names a registered
source (`kd_jax.teachers.sources`, one module each: `SOURCES`), and `build`
loads it:

* 'online', 'ensemble' (`online`): teachers restored from the checkpoints of
  supervised runs; an ensemble of one architecture is one stacked pytree run
  with `jax.vmap`.
* 'cache' (`cache`): a logits cache written by `kd_jax.export_logits` puts the
  logits into the batch on the host, so its `forward` only reads them.
* 'specialists' (`kd_jax.specialists.teacher`): a generalist and its specialists
  (Hinton et al. 2015, sec. 5), combined inside the step.
* 'none': no teacher.
"""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from kd_jax.teachers import cache
from kd_jax.teachers import online
from kd_jax.teachers import sources
from kd_jax.teachers.sources import SOURCES
from kd_jax.teachers.base import Teacher
from kd_jax.teachers.cache import augment_views
from kd_jax.teachers.cache import cache_shards
from kd_jax.teachers.cache import check_finite
from kd_jax.teachers.cache import choose_views
from kd_jax.teachers.cache import dense_from_topk
from kd_jax.teachers.cache import FORM_ARRAYS
from kd_jax.teachers.cache import load_cache
from kd_jax.teachers.cache import MANIFEST
from kd_jax.teachers.cache import read_cache_arrays
from kd_jax.teachers.cache import read_cache_labels
from kd_jax.teachers.cache import read_cache_split
from kd_jax.teachers.cache import VIEW_AUGMENTATIONS
from kd_jax.teachers.cache import view_fill
from kd_jax.teachers.online import load_online
from kd_jax.teachers.online import teacher_shardings
from kd_jax.specialists.teacher import load_specialist_ensemble
from kd_jax.specialists.teacher import load_specialists
from kd_jax.specialists.teacher import SpecialistEnsemble

__all__ = [
    'FORM_ARRAYS',
    'MANIFEST',
    'SOURCES',
    'SpecialistEnsemble',
    'Teacher',
    'VIEW_AUGMENTATIONS',
    'augment_views',
    'cache_shards',
    'build',
    'check_finite',
    'choose_views',
    'dense_from_topk',
    'describe',
    'load_cache',
    'load_online',
    'load_specialist_ensemble',
    'load_specialists',
    'pipeline_config',
    'read_cache_arrays',
    'read_cache_labels',
    'read_cache_split',
    'teacher_shardings',
    'view_fill',
]


def describe(config, teacher: Teacher | None) -> list[dict[str, Any]]:
  """Who each `teacher{k}_accuracy` of the eval results is: name, weight
  and origin (workdir or cache) of every teacher; [] without one."""
  if teacher is None:
    return []
  rows = [dict(name=name, weight=weight)
          for name, weight in zip(teacher.names, teacher.weights)]
  origins = sources.get(config).origins
  for row, origin in zip(rows, origins(config) if origins else []):
    row.update(origin)
  return rows


def build(config, info, dtype=jnp.float32, mesh=None) -> Teacher | None:
  """The teacher `config.distill.teacher_source` names, or None for 'none'.

  Args:
    config: the run config.
    info: the run's `input_pipeline.DatasetInfo`.
    dtype: what restored teachers compute in.
    mesh: the run's device mesh; online teachers with
      `config.distill.shard_teacher` are restored split over it
      (`online.teacher_shardings`).

  Returns:
    The loaded `Teacher`, or None when the run has no teacher.

  Raises:
    ValueError: a source that `SOURCES` does not name, or what its loader
      refuses.
  """
  load = sources.get(config).load
  return None if load is None else load(config, info, dtype, mesh=mesh)


def pipeline_config(config):
  """The config the run's train stream is built from: the run's own, or
  what its teacher source makes of it (a multi-view cache's plain stream)."""
  make = sources.get(config).pipeline_config
  return config if make is None else make(config)
