r"""CTKD's learned temperature (Li et al., AAAI 2023).

``config.distill.ctkd`` is ``'none'``, ``'global'`` (one temperature),
``'instance'`` (one per example, an MLP of both sides' logits), or a dict
with the mode and the options of :data:`OPTIONS`:

    config.distill.ctkd = dict(mode='global', min_temperature=1.0,
                               temperature_range=20.0, strength_epochs=10.0)

:math:`T = T_\min + T_\text{range}\, \sigma(\theta)` replaces
``config.distill.temperature`` in the soft term. :math:`\theta` lives in the
train state beside the student and is trained by the same optimizer through
:func:`gradient_reversal`: it *ascends* the distillation loss, with a
strength that follows the authors' cosine curriculum
(:func:`curriculum_strength`), so the student meets ever harder
temperatures. It is checkpointed with the training state, never with the
model, so a run used as a teacher or exported restores the student alone.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from kd_jax.methods import schedules

MODES = ('none', 'global', 'instance')
# The options and their defaults: the authors' CIFAR-100 settings.
OPTIONS = {'min_temperature': 1.0, 'temperature_range': 20.0,
           'strength_start': 0.0, 'strength_end': 1.0,
           'strength_epochs': 10.0, 'hidden': 256}
FIELD = 'config.distill.ctkd'


class Settings(NamedTuple):
  """``config.distill.ctkd`` read, its defaults filled in."""
  mode: str
  min_temperature: float
  temperature_range: float
  strength_start: float
  strength_end: float
  strength_epochs: float
  hidden: int

  @property
  def learned(self) -> bool:
    return self.mode != 'none'


def settings(distill, field: str = FIELD) -> Settings:
  """Reads ``distill.ctkd``.

  Raises:
    ValueError: an unknown mode or option, or a range that is empty.
  """
  spec = distill.ctkd if hasattr(distill, 'ctkd') else distill['ctkd']
  if isinstance(spec, str):
    spec = {'mode': spec}
  if not isinstance(spec, Mapping) or spec.get('mode') not in MODES:
    raise ValueError(
        f'{field}={spec!r}; choose one of {MODES}, or a dict of the mode '
        f"and its options, e.g. {{'mode': 'global', 'strength_epochs': 10.0}} "
        f'(options: {sorted(OPTIONS)}).')
  unknown = sorted(set(spec) - {'mode'} - set(OPTIONS))
  if unknown:
    raise ValueError(f'{field} sets {unknown}; its options are '
                     f'{sorted(OPTIONS)}.')
  return Settings(mode=spec['mode'],
                  **{k: spec.get(k, v) for k, v in OPTIONS.items()})


def canonical(spec, field: str = FIELD) -> dict[str, Any]:
  """``distill.ctkd`` as config.json records it."""
  s = settings({'ctkd': spec}, field)
  return {'mode': 'none'} if not s.learned else s._asdict()


def check(s: Settings, field: str = FIELD) -> None:
  """Refuses option values the method cannot learn with."""
  if not (0 < s.min_temperature and 0 < s.temperature_range):
    raise ValueError(
        f'{field}.min_temperature={s.min_temperature} and '
        f'temperature_range={s.temperature_range} must be > 0 (the authors '
        f'use 1 and 20: T in (1, 21)).')
  if not s.strength_epochs > 0:
    raise ValueError(
        f'{field}.strength_epochs={s.strength_epochs} must be > 0 (the '
        f'authors ramp the strength over 10 epochs).')


def curriculum_strength(epoch: jax.Array, *, start: float = 0.0,
                        end: float = 1.0, epochs: float = 10.0) -> jax.Array:
  r"""CTKD's cosine curriculum of the gradient-reversal strength.

  .. math::
    \lambda(e) = \lambda_0 + (\lambda_1 - \lambda_0)
      \frac{1 - \cos(\pi \min(e, E) / E)}{2}

  with e the epoch counted from 1 as in the authors' loop; it rises from
  :math:`\lambda_0` to :math:`\lambda_1` over E epochs, then stays.

  Example:
    >>> from kd_jax.methods import ctkd
    >>> [round(float(ctkd.curriculum_strength(e, epochs=10)), 3)
    ...  for e in (0.0, 4.0, 9.0, 50.0)]
    [0.024, 0.5, 1.0, 1.0]

  References:
    Li et al., `Curriculum Temperature for Knowledge Distillation
    <https://arxiv.org/abs/2211.16231>`_, AAAI 2023, Eq. 9.
  """
  e = jnp.minimum(schedules.epoch_index(jnp.asarray(epoch, jnp.float32)),
                  epochs)
  return start + (end - start) * 0.5 * (1.0 - jnp.cos(jnp.pi * e / epochs))


@jax.custom_vjp
def gradient_reversal(x: jax.Array, strength: jax.Array) -> jax.Array:
  r"""Identity forward; multiplies the gradient by :math:`-\lambda` backward.

  Whatever sits below it ascends the loss that a descent step lowers
  (Ganin and Lempitsky, 2015): CTKD's temperature maximises the
  distillation loss that the student minimises.

  Example:
    >>> import jax
    >>> from kd_jax.methods import ctkd
    >>> float(jax.grad(lambda x: 3.0 * ctkd.gradient_reversal(x, 0.5))(1.0))
    -1.5
  """
  del strength
  return x


def _reversal_fwd(x, strength):
  return x, strength


def _reversal_bwd(strength, g):
  strength = jnp.asarray(strength)
  return (-strength.astype(g.dtype) * g, jnp.zeros_like(strength))


gradient_reversal.defvjp(_reversal_fwd, _reversal_bwd)


class GlobalTemperature(nn.Module):
  """One raw temperature parameter, initialised at 1 as the authors do."""

  @nn.compact
  def __call__(self, student_logits, teacher_logits):
    del student_logits, teacher_logits
    return self.param('raw', nn.initializers.ones, ())


class InstanceTemperature(nn.Module):
  """A raw temperature per example: an MLP of both sides' logits."""
  hidden: int = 256

  @nn.compact
  def __call__(self, student_logits, teacher_logits):
    x = jnp.concatenate([student_logits, teacher_logits], axis=-1)
    x = nn.relu(nn.Dense(self.hidden)(x))
    return nn.Dense(1)(x)[..., 0]


def temperature_module(s: Settings) -> nn.Module:
  if s.mode == 'global':
    return GlobalTemperature()
  return InstanceTemperature(hidden=int(s.hidden))


def init_params(s: Settings, num_classes: int, rng: jax.Array) -> Any:
  """The raw temperature's params (an empty dict when the mode is 'none')."""
  if not s.learned:
    return {}
  dummy = jnp.zeros((1, num_classes), jnp.float32)
  return temperature_module(s).init(rng, dummy, dummy)['params']


def learned_temperature(s: Settings, params, student_logits, teacher_logits,
                        epoch) -> tuple[jax.Array, jax.Array]:
  r"""This step's temperature and reversal strength.

  :math:`\theta` (a scalar, or one per example) passes through
  :func:`gradient_reversal` of strength :func:`curriculum_strength`. The
  instance-wise module reads both sides' logits without passing gradients
  into them.

  Returns:
    (temperature: a scalar or ``[B]``, strength: a scalar).
  """
  if epoch is None:
    raise ValueError('config.distill.ctkd needs the epoch: pass '
                     'steps_per_epoch to train.train_step.')
  strength = curriculum_strength(epoch, start=s.strength_start,
                                 end=s.strength_end,
                                 epochs=s.strength_epochs)
  raw = temperature_module(s).apply(
      {'params': params},
      jax.lax.stop_gradient(student_logits.astype(jnp.float32)),
      jax.lax.stop_gradient(teacher_logits))
  raw = gradient_reversal(raw, strength)
  temperature = s.min_temperature + s.temperature_range * jax.nn.sigmoid(raw)
  return temperature, strength
