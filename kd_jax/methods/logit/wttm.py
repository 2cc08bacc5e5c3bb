"""Weighted transformed teacher matching (Zheng & Yang 2024):
``U_gamma(p) KL(p^gamma / sum p^gamma || softmax(z))`` with ``gamma = 1/T``.

The temperature acts on the teacher alone (the student's softmax is plain)
and there is no T^2 factor, so a per-example temperature (CTKD 'instance')
is refused. The authors weigh it far above cross-entropy: ``hard_weight=1``
and ``soft_weight`` their ``-b`` (45 with gamma = 0.1 in their README's
example, vgg13 -> vgg8).
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, temperature, where, **unused):
  del unused
  return losses.wttm_loss(student_logits, teacher_logits,
                          temperature=temperature, where=where)


METHOD = logit.register(logit.LogitMethod(
    name='wttm', loss=loss, standardizable=False, divides_logits=False))
