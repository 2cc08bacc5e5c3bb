"""The data plug-in of a specialist's run (`config.specialist.index >= 0`).

Every split's labels become the head's labels (the group's classes in group
order, then one dustbin class for the rest), and the train stream draws
`config.specialist.in_group_fraction` of its examples from the group and the
rest from the examples outside it (`tf.data.Dataset.sample_from_datasets`
over two seeded, reshuffled-per-epoch streams). `DatasetInfo.specialist` then
records the group and the oversampling factor whose log corrects the dustbin
logit (`specialists.oversampling_factor`).

Importing this module registers the plug-in with `kd_jax.data.stream`
(`kd_jax` does so on import).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
import dataclasses
from typing import Any

import numpy as np

from kd_jax.data import stream
from kd_jax.data import tf
from kd_jax.specialists import groups
from kd_jax.specialists import method


@dataclasses.dataclass(frozen=True)
class SpecialistData:
  """A `stream.Plugin`: one specialist's labels and train stream."""
  head: groups.SpecialistHead

  @property
  def class_names(self) -> tuple[str, ...]:
    return self.head.class_names

  @property
  def label_map(self) -> np.ndarray:
    return self.head.label_map

  def train_stream(self, plan: stream.Plan, examples: tf.data.Dataset,
                   epochs: Callable[..., Callable]) -> tf.data.Dataset:
    """Draws in_group_fraction of the examples from the group, the rest
    from outside it.

    Each side is its own endless stream of seeded epochs; the draws between
    them are seeded too, so the stream is the same on every run (a resumed
    run skips to its position in it).
    """
    member = np.zeros(len(plan.source.class_names), bool)
    member[list(self.head.group)] = True
    member = tf.constant(member)
    inside = examples.filter(lambda ex: tf.gather(member, ex['label']))
    outside = examples.filter(lambda ex: ~tf.gather(member, ex['label']))
    streams = [tf.data.Dataset.range(2**62).flat_map(epochs(ds, stream=1 + i))
               for i, ds in enumerate((inside, outside))]
    fraction = float(plan.config.specialist.in_group_fraction)
    seed = (plan.config.seed * 1_000_003 + plan.topology.process_index) % 2**31
    return tf.data.Dataset.sample_from_datasets(
        streams, weights=[fraction, 1.0 - fraction], seed=seed)

  def info(self, plan: stream.Plan, first: int | None,
           keep: np.ndarray | None) -> dict[str, Any]:
    """What a specialist's run records: its group and its oversampling."""
    source, head, count = plan.source, self.head, plan.topology.process_count
    config = plan.config
    shares = [source.labels(config.train_split, first, i, count)
              for i in range(count)]
    if keep is not None:
      shares = [share[keep[share]] for share in shares]
    inside = np.isin(shares[plan.topology.process_index], head.group)
    if inside.all() or not inside.any():
      # Either side of the sampling would be an endless stream of nothing.
      raise ValueError(
          f'Process {plan.topology.process_index} of {count} holds '
          f'{inside.sum()} of its {inside.size} train examples in the group of '
          f'config.specialist.index={head.index} '
          f'({list(head.class_names[:-1])}); a specialist needs examples '
          'inside and outside its group: use fewer processes or change the '
          'groups.')
    labels = np.concatenate(shares)
    fraction = float(config.specialist.in_group_fraction)
    try:
      factor = method.oversampling_factor(labels, head.group, fraction)
    except ValueError as e:
      raise ValueError(
          f'config.specialist (index {head.index}, classes '
          f'{list(head.class_names[:-1])}) on split '
          f'{config.train_split!r}: {e} Check '
          'config.specialist.in_group_fraction and config.transfer.') from None
    return dict(index=head.index, group=list(head.group),
                group_names=list(head.class_names[:-1]),
                dataset_class_names=list(source.class_names),
                in_group_fraction=fraction,
                natural_fraction=float(np.isin(labels, head.group).mean()),
                oversampling_factor=factor)


def plugin(config, class_names: Sequence[str]) -> SpecialistData | None:
  """The plug-in of a specialist's run; None for other runs."""
  if config.specialist.index < 0:
    return None
  return SpecialistData(groups.specialist_head(config, class_names))


stream.register_plugin(plugin)
