r"""Soft terms: how the student's logits are compared with the teacher's.

`config.distill.soft` names one, with its options, in one dict:

    config.distill.soft = dict(method='dkd', alpha=1.0, beta=8.0,
                               warmup_epochs=20.0)

(`'kl'` alone is short for `dict(method='kl')`). Each loss is a
:class:`LogitMethod` in its own module of this package, named for it,
registered where it is defined (`LOGIT_METHODS`); `kd_jax.objective` calls
its `loss` and knows it only by its capabilities:

====================  ========================================================
capability            what the objective does with it
====================  ========================================================
``batch_level``       the loss is one value per batch (DIST), not averaged;
                      no per-example temperature (CTKD 'instance') for it
``needs_target_class`` it reads the labels (DKD); a mixed example (mixup) has
                      no target class, so mixup is refused
``uses_temperature``  CTKD may learn its temperature (not ``logit_mse``)
``divides_logits``    its value at T is T^2 times its value at T = 1 on both
                      sides' logits divided by T, which is how a
                      per-example temperature (CTKD 'instance') is applied;
                      not NKD's or WTTM's (a side or a term is untempered)
``standardizable``    ``logit_standardization`` may z-score its logits
``topk``              the form a top-k logits cache trains with (KL over k
                      classes and a rest bucket), or None: every class needed
``student_head``      the student feature whose logits it trains (DeiT's
                      ``'dist_logits'``), or None for the model's logits
``teacher_prediction`` it compares with the teachers' predicted class, not
                      their distribution (DeiT's hard distillation)
====================  ========================================================

Every soft term also takes ``warmup_epochs`` (:data:`COMMON_OPTIONS`):
the term's weight rises linearly over the first epochs, as DKD's does.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from kd_jax import config_lib
from kd_jax import registry


@dataclasses.dataclass(frozen=True)
class LogitMethod:
  """One soft loss, as its module registers it.

  Attributes:
    name: the value of ``config.distill.soft['method']``.
    loss: ``(student_logits [B, C], teacher [B, C] logits (or [B] classes
      with `teacher_prediction`), *, labels [B], temperature, where [B],
      axis_name, **options) -> [B]`` per-example values (a scalar, the batch
      mean, when `batch_level`).
    options: the method's own options and their defaults.
    batch_level: see the module docstring; so are the other flags.
    needs_target_class: reads the labels' target class.
    uses_temperature: has a temperature that CTKD may learn.
    divides_logits: a per-example temperature may be applied by dividing
      both sides' logits and scaling by T^2.
    standardizable: logit standardization may apply.
    topk: ``(student_logits, topk_logits, topk_indices, rest_mass, *,
      temperature, where) -> [B]``, the loss on a top-k cache, or None.
    student_head: the student feature holding the logits it trains.
    teacher_prediction: compares with the teachers' argmax.
    check: ``(config, options, field) -> None``, raising ValueError for
      option values or run settings the method cannot take (value checks of
      `non_negative` kind, or the student it needs).
  """
  name: str
  loss: Callable[..., Any]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  batch_level: bool = False
  needs_target_class: bool = False
  uses_temperature: bool = True
  divides_logits: bool = True
  standardizable: bool = True
  topk: Callable[..., Any] | None = None
  student_head: str | None = None
  teacher_prediction: bool = False
  check: Callable[[Any, dict[str, Any], str], None] | None = None


LOGIT_METHODS: registry.Registry[LogitMethod] = registry.Registry(
    __name__, 'soft loss')
register = LOGIT_METHODS.register

# Options every soft term takes, and their defaults.
COMMON_OPTIONS = {'warmup_epochs': 0.0}
FIELD = 'config.distill.soft'


class SoftTerm(NamedTuple):
  """``config.distill.soft`` read: the method and every option's value."""
  method: LogitMethod
  options: tuple[tuple[str, Any], ...]
  warmup_epochs: float

  def kwargs(self) -> dict[str, Any]:
    """The method's own options, as its `loss` takes them."""
    return dict(self.options)


def soft_term(distill, field: str = FIELD) -> SoftTerm:
  """Reads ``distill.soft`` (a dict, or a method's name), defaults filled in.

  Raises:
    ValueError: naming the field, an unknown method or option, and the fix.
  """
  stale = sorted(k for k in config_lib.DEPRECATED_DISTILL_FIELDS
                 if k in distill)
  if stale:
    raise ValueError(
        f'config.distill holds the deprecated fields {stale}, which this '
        f'function does not read: pass config_lib.upgrade(config).distill, '
        f'which moves them into config.distill.soft and ctkd.')
  spec = distill.soft if hasattr(distill, 'soft') else distill['soft']
  if isinstance(spec, str):
    spec = {'method': spec}
  if not isinstance(spec, Mapping) or 'method' not in spec:
    raise ValueError(
        f'{field}={spec!r} must name a soft loss with its options, e.g. '
        f"{{'method': 'dkd', 'beta': 8.0}}, or be its name alone ('kl'); "
        f'losses: {LOGIT_METHODS.names()}.')
  method = LOGIT_METHODS.get(spec['method'], f'{field}.method')
  allowed = {**method.options, **COMMON_OPTIONS}
  unknown = sorted(set(spec) - {'method'} - set(allowed))
  if unknown:
    raise ValueError(
        f'{field} sets {unknown}, which {method.name!r} does not take; its '
        f'options are {sorted(allowed)}.')
  options = {k: spec.get(k, default) for k, default in method.options.items()}
  # A sequence option read back from config.json is a list: a tuple keeps
  # the term hashable and equal to the config that wrote it.
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in options.items()}
  warmup = spec.get('warmup_epochs', COMMON_OPTIONS['warmup_epochs'])
  return SoftTerm(method, tuple(sorted(options.items())), warmup)


def canonical(spec, field: str = FIELD) -> dict[str, Any]:
  """``distill.soft`` as config.json records it: the method and every option."""
  term = soft_term({'soft': spec}, field)
  return {'method': term.method.name, **dict(term.options),
          'warmup_epochs': term.warmup_epochs}


def non_negative(options: Mapping[str, Any], names, field: str) -> None:
  """Refuses any of `names` that is not a non-negative finite number."""
  for name in names:
    value = options[name]
    if (isinstance(value, bool) or not isinstance(value, (int, float))
        or not (math.isfinite(value) and value >= 0)):
      raise ValueError(f'{field}.{name}={value!r} must be a non-negative '
                       f'finite number.')


def check(config) -> SoftTerm:
  """The soft term's own checks: its option values and what it needs of the
  run (its `check`). Capabilities against the rest of the objective are
  `kd_jax.objective.validate`'s."""
  term = soft_term(config.distill)
  non_negative({'warmup_epochs': term.warmup_epochs}, ('warmup_epochs',),
               FIELD)
  if term.method.check is not None:
    term.method.check(config, term.kwargs(), FIELD)
  return term
