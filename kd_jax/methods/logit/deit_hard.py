"""DeiT's hard-label distillation (Touvron et al. 2021).

The student's distillation-token head (its feature 'dist_logits') learns the
teachers' argmax by cross-entropy; the hard term trains the class head on
the labels (``alpha=0.5`` gives DeiT's halves). It has no temperature or
logit scale, and needs a student with ``distill_token=True``.
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_prediction, **unused):
  del unused
  return losses.cross_entropy(student_logits, teacher_prediction)


def check(config, options, field):
  del options
  if not config.model.get('distill_token', False):
    raise ValueError(
        f"{field}='deit_hard' trains the student's distillation-token head "
        f"on the teacher's argmax, but the student {config.model.name!r} has "
        f'no distillation token: use a vit_* student with '
        f"config.model.distill_token=True, or soft='kl'.")
  if config.distill.teacher_source == 'none':
    raise ValueError(f"{field}='deit_hard' needs a teacher: set "
                     'config.distill.teacher_source.')


METHOD = logit.register(logit.LogitMethod(
    name='deit_hard', loss=loss, uses_temperature=False,
    standardizable=False, student_head='dist_logits', teacher_prediction=True,
    check=check))
