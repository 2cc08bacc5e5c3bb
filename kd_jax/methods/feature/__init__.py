r"""Feature terms: the student matches what the teacher computes inside.

``config.distill.features`` lists terms, each a dict naming its method, the
student's and the teacher's features (paired in order), a weight and the
method's options:

    dict(method='crd', student='embedding', teacher='embedding', weight=0.8,
         dim=128, num_negatives=16384)

Every term may also set ``warmup_epochs`` (:data:`COMMON_OPTIONS`): its
weight rises linearly over the first epochs (ReviewKD's 20 of 240).

Each method is a :class:`FeatureMethod` in its own module of this package,
named for it and registered where it is defined (`FEATURE_METHODS`): its
loss, its options, its learned connector (built inside
`kd_jax.objective.FeatureConnectors`, params in the train state) and, for a
method with per-example state (CRD's memory banks), how that state starts,
which of its entries are split over devices by rows, and what the loss
reads of the batch. `kd_jax.objective` runs any of them the same way.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

from kd_jax import registry


@dataclasses.dataclass(frozen=True)
class FeatureMethod:
  """One feature-distillation method, as its module registers it.

  Attributes:
    name: the value of a term's ``method``.
    loss: ``(student, teacher, *, extra, where, **options) -> scalar``, the
      batch's loss of one pair, on the connector's outputs (``extra``: what
      the connector adds, e.g. VID's variance); with `init_state`, also
      ``state``, ``batch`` and ``rng`` in, ``(scalar, new_state)`` out.
    options: the method's options and their defaults.
    connector: ``(options, name, student, teacher, train) -> (student,
      teacher, extra)``, called inside a Flax module's ``@compact`` call, so
      that the modules it creates (named from `name`) are its params; None:
      the features go to the loss as they are. With `joint_connector`, it
      is called once per term on the tuples of every pair's student and
      teacher features and returns one ``(student, teacher, extra)`` per
      pair (ReviewKD fuses each level with the deeper ones).
    init_state: ``(options, num_examples, rng) -> {name: array}``, the
      term's per-example state (one pair per term), or None.
    row_sharded: the entries of that state whose rows, one per train
      example, are split over devices.
    batch_keys: what the loss reads of the batch besides ``mask``.
    single_pair: the term takes one student and one teacher feature.
    joint_connector: the connector maps all of a term's pairs together.
    check: ``(options, field) -> None``, raising ValueError for option
      values the method cannot take.
  """
  name: str
  loss: Callable[..., Any]
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  connector: Callable[..., Any] | None = None
  init_state: Callable[..., Any] | None = None
  row_sharded: tuple[str, ...] = ()
  batch_keys: tuple[str, ...] = ()
  single_pair: bool = False
  joint_connector: bool = False
  check: Callable[[dict[str, Any], str], None] | None = None


FEATURE_METHODS: registry.Registry[FeatureMethod] = registry.Registry(
    __name__, 'feature method')
register = FEATURE_METHODS.register
TERM_KEYS = ('method', 'student', 'teacher', 'weight')
# Options every feature term takes, and their defaults.
COMMON_OPTIONS = {'warmup_epochs': 0.0}


class FeatureTerm(NamedTuple):
  """One normalised entry of ``config.distill.features`` (hashable).

  Attributes:
    method: one of `FEATURE_METHODS`.
    student: the student's feature names, one per pair.
    teacher: the teacher's feature names, paired with ``student``.
    weight: the term's weight in the loss.
    options: ``(name, value)`` pairs, the method's defaults filled in.
    warmup_epochs: epochs over which the weight rises linearly from 0 (0:
      none).
  """
  method: str
  student: tuple[str, ...]
  teacher: tuple[str, ...]
  weight: float
  options: tuple[tuple[str, Any], ...]
  warmup_epochs: float = 0.0

  def option(self, name: str) -> Any:
    return dict(self.options)[name]

  @property
  def record(self) -> FeatureMethod:
    return FEATURE_METHODS.get(self.method, 'config.distill.features.method')


def _names(value, field: str) -> tuple[str, ...]:
  names = (value,) if isinstance(value, str) else tuple(value or ())
  if not names or not all(isinstance(n, str) and n for n in names):
    raise ValueError(
        f'{field}={value!r} must name one feature or a tuple of them, e.g. '
        f"'embedding' or ('stage1', 'stage2', 'stage3'); "
        f'kd_jax/models/features.py lists each model\'s features.')
  return names


def _term(entry, field: str) -> FeatureTerm:
  if not hasattr(entry, 'keys'):
    raise ValueError(
        f'{field}={entry!r} must be a dict with keys {TERM_KEYS} and method '
        f"options, e.g. dict(method='at', student='stage1', "
        f"teacher='stage1', weight=1000.0).")
  entry = dict(entry)
  missing = [k for k in TERM_KEYS if k not in entry]
  if missing:
    raise ValueError(f'{field} lacks {missing}; each term needs '
                     f'{TERM_KEYS}.')
  method = FEATURE_METHODS.get(entry['method'], f'{field}.method')
  unknown = sorted(set(entry) - set(TERM_KEYS) - set(method.options)
                   - set(COMMON_OPTIONS))
  if unknown:
    raise ValueError(
        f'{field} sets {unknown}, which method {method.name!r} does not '
        f'take; its options are '
        f'{sorted({**method.options, **COMMON_OPTIONS})}.')
  student = _names(entry['student'], f'{field}.student')
  teacher = _names(entry['teacher'], f'{field}.teacher')
  if len(student) != len(teacher):
    raise ValueError(
        f'{field} pairs {len(student)} student features {student} with '
        f'{len(teacher)} teacher features {teacher}: name as many of each '
        f'(pair i is student[i] with teacher[i]).')
  if method.single_pair and len(student) != 1:
    raise ValueError(
        f'{field}: {method.name} keeps one state per side; name one student '
        f"and one teacher feature (RepDistiller: 'embedding').")
  weight = entry['weight']
  if isinstance(weight, bool) or not isinstance(weight, (int, float)) or (
      not (math.isfinite(weight) and weight >= 0)):
    raise ValueError(f'{field}.weight={weight!r} must be a non-negative '
                     f'finite number.')
  warmup = entry.get('warmup_epochs', COMMON_OPTIONS['warmup_epochs'])
  if isinstance(warmup, bool) or not isinstance(warmup, (int, float)) or (
      not (math.isfinite(warmup) and warmup >= 0)):
    raise ValueError(f'{field}.warmup_epochs={warmup!r} must be a '
                     f'non-negative finite number of epochs.')
  options = {**method.options,
             **{k: entry[k] for k in method.options if k in entry}}
  options = {k: tuple(v) if isinstance(v, list) else v
             for k, v in options.items()}
  if method.check is not None:
    method.check(options, field)
  return FeatureTerm(method.name, student, teacher, float(weight),
                     tuple(sorted(options.items())), float(warmup))


def terms(distill) -> tuple[FeatureTerm, ...]:
  """``config.distill.features`` checked and normalised (no shapes needed).

  Raises:
    ValueError: naming the entry, the bad key or value, and the fix.
  """
  return tuple(_term(entry, f'config.distill.features[{i}]')
               for i, entry in enumerate(distill.get('features', ()) or ()))
