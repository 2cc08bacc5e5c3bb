"""Warm starts: a new run's parameters initialised from a finished run's.

`config.init_from` names the workdir of a finished run (e.g. the generalist
that a specialist starts from, Hinton et al. 2015, sec. 5). Every parameter
and batch statistic whose path and shape match is copied. Leaves that differ
only in their last axis, where that axis is the number of classes of each
run, are classifier heads: their columns are copied by class name, and a
column of the new head whose class the old run does not have gets the mean
of the old columns of the classes the new run does not have (for a
specialist: the classes outside its group), so that its logit starts as the
mean of theirs; a bias (a leaf of rank 1) also gets `log(count)` of those
classes, which makes the new logit `log sum exp` of theirs when they are
equal. Any other leaf keeps its fresh initialisation.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from kd_jax import checkpointing
from kd_jax import models
from kd_jax import rundir


def restore_run(workdir: str, field: str = 'config.init_from'
                ) -> tuple[dict[str, Any], dict[str, Any]]:
  """({'params', 'batch_stats'} of a finished run, its run_info)."""
  run_info = rundir.read_run_info(workdir, field)
  model = models.get_model(run_info['model'], run_info['num_classes'])
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *run_info['image_shape']),
                                   jnp.float32)))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  try:
    variables, step = checkpointing.restore_model(workdir, abstract)
  except FileNotFoundError as e:
    raise FileNotFoundError(f'{field}={workdir!r}: {e}; train that run '
                            'first.') from None
  except checkpointing.CheckpointDamaged as e:
    raise checkpointing.CheckpointDamaged(
        f'{field}={workdir!r} cannot be used: {e}') from None
  if step != run_info.get('final_step', step):
    raise ValueError(
        f'{field}={workdir!r} has not finished training: latest checkpoint '
        f'step {step}, final step {run_info["final_step"]}. Let it finish.')
  return jax.device_get(variables), run_info


def _head_columns(source_names, target_names) -> list[int | None]:
  """For each target class, its column in the source head, or None."""
  index = {name: i for i, name in enumerate(source_names)}
  return [index.get(name) for name in target_names]


def _transfer_head(source: np.ndarray, target: np.ndarray,
                   columns: list[int | None]) -> np.ndarray:
  unmatched = sorted(set(range(source.shape[-1])) -
                     {c for c in columns if c is not None})
  out = np.array(target, copy=True)
  for j, column in enumerate(columns):
    if column is not None:
      out[..., j] = source[..., column]
    elif unmatched:
      out[..., j] = source[..., unmatched].mean(axis=-1)
      if source.ndim == 1:  # A bias: mean + log(n) is logsumexp of n equals.
        out[..., j] += np.log(len(unmatched))
  return out


def merge(source: Any, target: Any, source_names, target_names
          ) -> tuple[Any, list[str]]:
  """`target` with every matching leaf of `source` copied in (see above).

  Returns:
    The merged pytree (numpy leaves) and the paths copied or mapped.
  """
  columns = _head_columns(source_names, target_names)
  flat_source = {jax.tree_util.keystr(p): np.asarray(v) for p, v in
                 jax.tree_util.tree_flatten_with_path(source)[0]}
  copied = []

  def pick(path, leaf):
    key = jax.tree_util.keystr(path)
    leaf = np.asarray(leaf)
    old = flat_source.get(key)
    if old is None:
      return leaf
    if old.shape == leaf.shape:
      copied.append(key)
      return old.astype(leaf.dtype)
    if (old.shape[:-1] == leaf.shape[:-1]
        and old.shape[-1] == len(source_names)
        and leaf.shape[-1] == len(target_names)):
      copied.append(key)
      return _transfer_head(old, leaf, columns).astype(leaf.dtype)
    return leaf

  return jax.tree_util.tree_map_with_path(pick, target), copied


def warm_start(workdir: str, params: Any, batch_stats: Any,
               class_names) -> tuple[Any, Any]:
  """(params, batch_stats) initialised from the finished run in `workdir`.

  Raises:
    ValueError: when no parameter at all matches (e.g. another architecture).
  """
  variables, run_info = restore_run(workdir)
  source_names = run_info['class_names']
  new_params, copied = merge(variables['params'], params, source_names,
                             class_names)
  new_stats, _ = merge(variables['batch_stats'], batch_stats, source_names,
                       class_names)
  if not copied:
    raise ValueError(
        f'config.init_from={workdir!r} trained {run_info["model"]}, which '
        'shares no parameter (same path and shape) with config.model: warm '
        'start from a run of the same architecture, or clear init_from.')
  return new_params, new_stats
