"""DIST (Huang et al. 2022): Pearson correlations of the tempered
distributions between (`beta`) and within (`gamma`) classes.

A batch-level loss: one value per batch, not a mean of per-example values,
so it has no per-example temperature (CTKD 'instance' is refused).
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, temperature, where, axis_name,
         beta, gamma, **unused):
  del unused
  return losses.dist(student_logits, teacher_logits, beta=beta, gamma=gamma,
                     temperature=temperature, where=where,
                     axis_name=axis_name)


def check(config, options, field):
  del config
  logit.non_negative(options, ('beta', 'gamma'), field)


METHOD = logit.register(logit.LogitMethod(
    name='dist', loss=loss, options={'beta': 1.0, 'gamma': 1.0},
    batch_level=True, check=check))
