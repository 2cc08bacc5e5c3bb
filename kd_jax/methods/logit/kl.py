"""KD's soft term (Hinton et al. 2015): ``T^2 KL(softmax(v/T) ||
softmax(z/T))``.

The only soft loss a top-k logits cache serves exactly: the KL over the
teacher's k classes and one rest bucket (`losses.topk_kl_divergence`).
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, temperature, **unused):
  del unused
  return losses.kl_divergence(student_logits, teacher_logits, temperature)


def topk(student_logits, topk_logits, topk_indices, rest_mass, *,
         temperature, where):
  return losses.topk_kl_divergence(student_logits, topk_logits, topk_indices,
                                   rest_mass, temperature, where=where)


METHOD = logit.register(logit.LogitMethod(name='kl', loss=loss, topk=topk))
