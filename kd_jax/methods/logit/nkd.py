"""Normalized KD (Yang et al. 2023): the teacher's target probability
weighs the student's target log-probability, and the non-target classes,
renormalised on both sides, are matched at temperature T (``gamma T^2``).

Options: `gamma`, the non-target term's weight (cls_KD: 1.5 with T = 1 on
ImageNet). The target term is untempered, so a per-example temperature
(CTKD 'instance') is refused; it reads the target class, so mixed examples
(mixup) are refused too. The authors add it to cross-entropy of weight 1:
``soft_weight=1, hard_weight=1``.
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, labels, temperature, where,
         gamma, **unused):
  del unused
  return losses.nkd_loss(student_logits, teacher_logits, labels, gamma=gamma,
                         temperature=temperature, where=where)


def check(config, options, field):
  del config
  logit.non_negative(options, ('gamma',), field)


METHOD = logit.register(logit.LogitMethod(
    name='nkd', loss=loss, options={'gamma': 1.5}, needs_target_class=True,
    standardizable=False, divides_logits=False, check=check))
