"""The `Teacher`: what every teacher source becomes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax


@dataclasses.dataclass(frozen=True)
class Teacher:
  """Teacher logits as a pytree of arrays and a pure forward pass.

  Attributes:
    variables: the teachers' variables: a stacked pytree for teachers of one
      architecture, a list otherwise, None for a logits cache.
    forward: `(variables, batch) -> logits [K, B, C]` (K teachers), pure; it
      runs inside the compiled train step.
    names: the K teachers' names, as eval results report them.
    weights: the K teachers' weights in an ensemble.
    fingerprint: identifies the teachers by content (a digest of their
      restored variables, or of the cache's arrays), so that the same
      teachers give the same fingerprint wherever they lie.
    host_lookup: host-side `(batch, step=None) -> batch` with
      'teacher_logits' added (logits caches); train batches pass their step
      (it picks multi-view views).
    forward_features: `(variables, batch) -> (logits [K, B, C],
      {name: [K, B, ...]})`: the same forward pass with the teachers' named
      features (online teachers of one architecture), for feature
      distillation.
    legacy_fingerprints: what earlier kd_jax versions called the same
      teachers (by path and step): a checkpoint that recorded one of them
      resumes.
  """
  variables: Any
  forward: Callable[[Any, dict[str, jax.Array]], jax.Array]
  names: tuple[str, ...]
  weights: tuple[float, ...]
  fingerprint: str
  host_lookup: Callable[..., dict[str, Any]] | None = None
  forward_features: Callable[[Any, dict[str, jax.Array]], Any] | None = None
  legacy_fingerprints: tuple[str, ...] = ()
