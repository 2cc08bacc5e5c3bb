"""Decoupled KD (Zhao et al. 2022): ``T^2 (alpha TCKD + beta NCKD)``.

Options (mdistiller's CIFAR-100 settings: alpha 1, beta 8, and the term
warmed up over 20 epochs with ``warmup_epochs=20``): `alpha` weights the
target-class binary KL, `beta` the KL over the non-target classes. It reads
the target class, so mixed examples (mixup) are refused.
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, labels, temperature, where,
         alpha, beta, **unused):
  del unused
  return losses.dkd(student_logits, teacher_logits, labels, alpha=alpha,
                    beta=beta, temperature=temperature, where=where)


def check(config, options, field):
  del config
  logit.non_negative(options, ('alpha', 'beta'), field)


METHOD = logit.register(logit.LogitMethod(
    name='dkd', loss=loss, options={'alpha': 1.0, 'beta': 8.0},
    needs_target_class=True, check=check))
