"""Schedules over training that methods share: the epoch as the authors
count it, and a linear warm-up of a term."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def epoch_index(epoch: jax.Array) -> jax.Array:
  """1 during the first epoch, 2 in the second...: the authors' epoch count."""
  return jnp.floor(epoch) + 1.0


def warmup_factor(epoch: jax.Array | None, warmup_epochs: float) -> jax.Array:
  r"""A term's linear warm-up: :math:`\min(e / E_w, 1)`, e counted from 1 as
  mdistiller counts DKD's (the first epoch trains with weight 1/E_w).

  Example:
    >>> from kd_jax.methods import schedules
    >>> [round(float(schedules.warmup_factor(e, 20)), 3)
    ...  for e in (0.0, 0.5, 19.0, 30.0)]
    [0.05, 0.05, 1.0, 1.0]
  """
  if warmup_epochs <= 0:
    return jnp.ones(())
  if epoch is None:
    raise ValueError(
        'a term with warmup_epochs > 0 (config.distill.soft or a feature '
        'term) needs the epoch: pass steps_per_epoch to train.train_step.')
  return jnp.minimum(epoch_index(jnp.asarray(epoch, jnp.float32))
                     / warmup_epochs, 1.0)
