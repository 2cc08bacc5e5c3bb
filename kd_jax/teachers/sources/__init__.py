"""Teacher sources: where a run's teacher logits come from, one module each.

`config.distill.teacher_source` names a :class:`TeacherSource`, registered
in its own module of this package (`SOURCES`): how it loads the run's
`Teacher`, what `summary.json` records of where its teachers came from, and
what it can do, which the trainer checks once (`kd_jax.train.validate_config`,
`kd_jax.objective.validate_features`) instead of asking for its name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

from kd_jax import registry


@dataclasses.dataclass(frozen=True)
class TeacherSource:
  """One teacher source, as its module registers it.

  Attributes:
    name: the value of ``config.distill.teacher_source``.
    load: ``(config, info, dtype, mesh) -> Teacher``, or None for a run
      without a teacher.
    origins: ``config -> [{field: value}]``, where each teacher came from
      (its workdir, its cache), for summary.json.
    computes_features: its teacher gives named features with its logits
      (``Teacher.forward_features``), as feature terms need.
    shardable: its teachers' variables may be split over devices
      (``config.distill.shard_teacher``).
    sees_images: its teacher runs on the images it is given inside the step
      (not a lookup by example id), so it can score a second view of them
      (``config.distill.strong_view``).
    changed: what may have happened to a teacher that a resumed run finds
      changed ('retrained', 're-exported'), for the refusal.
    pipeline_config: ``config -> config`` the train stream is built from
      (a multi-view cache replays its views on the host), or None: the
      run's own.
    check: ``config -> None``, raising ValueError for settings the source
      cannot serve.
  """
  name: str
  load: Callable[..., Any] | None
  origins: Callable[[Any], list[dict[str, Any]]] | None = None
  computes_features: bool = False
  shardable: bool = False
  sees_images: bool = False
  changed: str = ''
  pipeline_config: Callable[[Any], Any] | None = None
  check: Callable[[Any], None] | None = None


SOURCES: registry.Registry[TeacherSource] = registry.Registry(
    __name__, 'teacher source')
register = SOURCES.register
FIELD = 'config.distill.teacher_source'


def get(config) -> TeacherSource:
  """The source `config.distill.teacher_source` names."""
  return SOURCES.get(config.distill.teacher_source, FIELD)


def workdir_origins(config) -> list[dict[str, Any]]:
  """Each of `config.teachers`' workdirs."""
  return [dict(workdir=t.workdir) for t in config.teachers]
