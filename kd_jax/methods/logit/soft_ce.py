"""Soft cross-entropy: ``-T^2 sum_i p_i log q_i``, KL plus the teacher's
entropy (the same gradient as `kl`, another value)."""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, temperature, **unused):
  del unused
  return losses.soft_cross_entropy(student_logits, teacher_logits,
                                   temperature)


METHOD = logit.register(logit.LogitMethod(name='soft_ce', loss=loss))
