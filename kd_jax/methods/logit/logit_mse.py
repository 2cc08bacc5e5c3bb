"""Logit matching: the squared error of the zero-mean logits, the high-T
limit of KD (Hinton et al. 2015, sec. 2.1). It has no temperature."""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, **unused):
  del unused
  return losses.logit_mse(student_logits, teacher_logits)


METHOD = logit.register(logit.LogitMethod(name='logit_mse', loss=loss,
                                          uses_temperature=False))
