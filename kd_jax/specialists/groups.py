"""The groups of a specialist ensemble, as runs configure and record them.

Groups come from `config.specialist.groups_file` (a `groups.json` that
`python -m kd_jax.specialists.cluster` writes from a trained generalist) or from
`config.specialist.groups` (by hand: class indices or names, e.g. CIFAR-100's
coarse classes). Either way `config_groups` checks them against the
dataset's classes with `specialists.resolve_groups`. `specialist_head`
describes the head of specialist `config.specialist.index`: the classes of its
group in group order, then the dustbin.

groups.json holds `groups` (class indices), `group_names`, `class_names` (of
the dataset the generalist was trained on), `num_groups`, `generalist` (its
workdir), `generalist_fingerprint` (a hash of its parameters, see
`params_fingerprint`, so that a combination can refuse groups clustered from
another generalist) and how they were clustered (split, num_examples,
cluster_temperature, seed).
"""

from __future__ import annotations

from collections.abc import Sequence
import dataclasses
import hashlib
import json
import os
from typing import Any

import jax
import numpy as np

from kd_jax import rundir
from kd_jax import specialists

DUSTBIN = 'dustbin'
_CLUSTER_COMMAND = ('python -m kd_jax.specialists.cluster '
                    '--config=<generalist config> --out={path}')


@dataclasses.dataclass(frozen=True)
class SpecialistHead:
  """The head of one specialist.

  Attributes:
    index: the specialist's index in the groups.
    group: its classes (indices into the dataset's classes), sorted.
    class_names: the head's class names: the group's, then `DUSTBIN`.
    label_map: int32 [C]: dataset label -> head label (the dustbin is last).
  """
  index: int
  group: tuple[int, ...]
  class_names: tuple[str, ...]
  label_map: np.ndarray


def params_fingerprint(variables: Any) -> str:
  """A short hash of a pytree of arrays (e.g. a generalist's variables)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(variables)[0]:
    leaf = np.asarray(leaf)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(str(leaf.shape).encode())
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def write_groups_file(path: str, groups: specialists.Groups,
                      class_names: Sequence[str], *, generalist: str,
                      generalist_fingerprint: str,
                      extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Writes groups.json (see the module docstring); returns what it wrote."""
  record = dict(
      groups=[list(map(int, g)) for g in groups],
      group_names=[[str(class_names[c]) for c in g] for g in groups],
      class_names=[str(n) for n in class_names], num_groups=len(groups),
      generalist=os.path.abspath(generalist),
      generalist_fingerprint=generalist_fingerprint, **(extra or {}))
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  with open(path, 'w') as f:
    json.dump(record, f, indent=2)
  return record


def read_groups_file(path: str) -> dict[str, Any]:
  if not os.path.exists(path):
    raise FileNotFoundError(
        f'config.specialist.groups_file={path!r} does not exist; write it '
        f'from the trained generalist: {_CLUSTER_COMMAND.format(path=path)}')
  with open(path) as f:
    record = json.load(f)
  if 'groups' not in record or 'class_names' not in record:
    raise ValueError(f'config.specialist.groups_file={path!r} is not a '
                     'groups.json (it lacks "groups" or "class_names"); '
                     f'write it again: {_CLUSTER_COMMAND.format(path=path)}')
  return record


def _explain(error: ValueError, field: str) -> ValueError:
  """resolve_groups's message, phrased in terms of config fields."""
  message = str(error).replace(
      'pass allow_overlap=True', 'set config.specialist.allow_overlap=True'
  ).replace('pass require_coverage=False',
            'set config.specialist.require_coverage=False')
  return ValueError(f'{field}: {message}')


def config_groups(config, class_names: Sequence[str]) -> specialists.Groups:
  """The checked groups of `config.specialist`, as class indices.

  Args:
    config: a run config.
    class_names: the classes of the dataset (all of them, not a head's).

  Raises:
    ValueError: naming the field, for no groups or two sources of groups, a
      groups file of other classes, and any group `resolve_groups` refuses.
  """
  s = config.specialist
  class_names = tuple(str(n) for n in class_names)
  if s.groups is not None and s.groups_file:
    raise ValueError(
        f'config.specialist.groups={s.groups!r} and config.specialist.'
        f'groups_file={s.groups_file!r} are both set; keep one.')
  if s.groups is None and not s.groups_file:
    raise ValueError(
        'Specialists need groups: set config.specialist.groups_file to the '
        'groups.json of `python -m kd_jax.specialists.cluster`, or '
        'config.specialist.groups to class indices or names by hand.')
  if s.groups_file:
    field = f'config.specialist.groups_file={s.groups_file!r}'
    record = read_groups_file(s.groups_file)
    if tuple(record['class_names']) != class_names:
      raise ValueError(
          f'{field} groups the classes {record["class_names"]} but the '
          f'dataset config.dataset={config.dataset!r} has {list(class_names)}'
          ': cluster again with this dataset.')
    groups = record['groups']
  else:
    field = 'config.specialist.groups'
    groups = s.groups
  try:
    return specialists.resolve_groups(
        groups, len(class_names), class_names,
        allow_overlap=s.allow_overlap, require_coverage=s.require_coverage)
  except ValueError as e:
    raise _explain(e, field) from None


def specialist_head(config, class_names: Sequence[str]) -> SpecialistHead:
  """The head of specialist `config.specialist.index` (which must be >= 0)."""
  groups = config_groups(config, class_names)
  index = config.specialist.index
  if not 0 <= index < len(groups):
    raise ValueError(
        f'config.specialist.index={index} but there are {len(groups)} groups; '
        f'pick an index in [0, {len(groups)}).')
  group = groups[index]
  names = tuple(str(class_names[c]) for c in group) + (DUSTBIN,)
  label_map = specialists.specialist_targets(np.arange(len(class_names)),
                                             group)
  return SpecialistHead(index=index, group=group, class_names=names,
                        label_map=label_map)


def check_same_group(workdir: str, specialist: dict[str, Any]) -> None:
  """Refuses to resume a specialist's workdir that trained another group."""
  if not rundir.has_run_info(workdir):
    return
  previous = rundir.read_run_info(workdir).get('specialist')
  keys = ('index', 'group', 'dataset_class_names')
  if previous is None or any(previous.get(k) != specialist[k] for k in keys):
    before = (None if previous is None else
              {k: previous.get(k) for k in ('index', 'group_names')})
    raise ValueError(
        f'workdir {workdir!r} holds a run of specialist {before} but the '
        f'config asks for specialist index {specialist["index"]} with classes '
        f'{specialist["group_names"]} (config.specialist: its groups or '
        'groups_file changed): use a fresh --workdir for this group.')
