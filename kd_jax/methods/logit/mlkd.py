"""Multi-level logit distillation (Jin et al. 2023): instance (KL), batch
(the examples' Gram matrix) and class (the classes' Gram matrix) alignment
of the tempered distributions, summed over several temperatures.

Options: `temperatures` (the authors' 2 to 6; `config.distill.temperature`
is not read) and the three levels' weights. A batch-level loss: one value
per batch, the Gram matrices over the whole (global) batch; padded rows take
no part. This entry is the loss on one view of the batch; the authors also
apply the instance term to a RandAugment view of each image
(`kd_jax.data.augment`), which a second-view step would add.
"""

from kd_jax import losses
from kd_jax.methods import logit


def loss(student_logits, teacher_logits, *, where, axis_name, temperatures,
         instance_weight, batch_weight, class_weight, **unused):
  del unused
  if axis_name is not None:
    raise ValueError(
        "config.distill.soft='mlkd' relates every example of the batch, "
        'which a shard_map shard does not hold: train under jit over '
        'global arrays (kd_jax.train does), not shard_map.')
  return losses.mlkd_loss(student_logits, teacher_logits,
                          temperatures=tuple(temperatures),
                          instance_weight=instance_weight,
                          batch_weight=batch_weight,
                          class_weight=class_weight, where=where)


def check(config, options, field):
  del config
  logit.non_negative(options, ('instance_weight', 'batch_weight',
                               'class_weight'), field)
  temperatures = options['temperatures']
  if (isinstance(temperatures, (str, bytes))
      or not hasattr(temperatures, '__len__') or not temperatures
      or not all(isinstance(t, (int, float)) and not isinstance(t, bool)
                 and t > 0 for t in temperatures)):
    raise ValueError(
        f'{field}.temperatures={temperatures!r} must be a non-empty tuple of '
        f'positive numbers, e.g. the authors\' {losses.MLKD_TEMPERATURES}.')


METHOD = logit.register(logit.LogitMethod(
    name='mlkd', loss=loss,
    options={'temperatures': losses.MLKD_TEMPERATURES,
             'instance_weight': 1.0, 'batch_weight': 1.0,
             'class_weight': 1.0},
    batch_level=True, uses_temperature=False, standardizable=False,
    check=check))
