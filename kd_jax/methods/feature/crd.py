"""Contrastive representation distillation (Tian et al. 2020).

Each side's embedding (`CRDEmbed(dim)`) is contrasted with the other side's
memory bank: the example's own entry against `num_negatives` entries of
other classes (RepDistiller's `exact` sampler), NCE with the normalizers
`Z` set at the first step. The term's state: both banks `[N, dim]` over the
N train examples and the label of each example seen (split over devices by
rows), and the normalizers; the banks move towards each batch's embeddings
with `momentum`. The batch's `index` keys the banks. RepDistiller:
``feat[-1]``, 16384 negatives, dim 128, weight 0.8.
"""

import jax
import jax.numpy as jnp

from kd_jax import connectors
from kd_jax import feature_losses
from kd_jax.methods import feature


def connector(options, name, student, teacher, train):
  del train
  dim = options['dim']
  return (connectors.CRDEmbed(dim, True, name=f'{name}_student')(student),
          connectors.CRDEmbed(dim, True, name=f'{name}_teacher')(teacher),
          None)


def init_state(options, num_examples, rng):
  dim = options['dim']
  student_key, teacher_key = jax.random.split(rng)
  return dict(
      student_memory=feature_losses.crd_memory_init(num_examples, dim,
                                                    student_key),
      teacher_memory=feature_losses.crd_memory_init(num_examples, dim,
                                                    teacher_key),
      # Each example's label, once seen (-1 before): the exact negatives.
      labels=jnp.full((num_examples,), -1, jnp.int32),
      # Z of both sides, set from the first step's scores (0: not yet).
      normalizers=jnp.zeros((2,), jnp.float32))


def loss(student, teacher, *, where, state, batch, rng, num_negatives,
         temperature, momentum, exact_negatives, **unused):
  del unused
  indices = batch['index'].astype(jnp.int32)
  num_examples = state['student_memory'].shape[0]
  num_negatives = min(num_negatives, num_examples - 1)
  labels = None
  new_labels = state['labels']
  if exact_negatives:
    # Padded rows write nowhere (their index is pushed out of range).
    rows = jnp.where(where, indices, num_examples)
    new_labels = state['labels'].at[rows].set(
        batch['label'].astype(jnp.int32), mode='drop')
    labels = new_labels
  negatives = feature_losses.crd_sample_negatives(
      rng, indices, num_examples, num_negatives, example_labels=labels)
  args = (student, teacher, state['student_memory'], state['teacher_memory'],
          indices, negatives)
  first = feature_losses.crd_normalizers(*args, temperature=temperature,
                                         where=where)
  normalizers = jnp.where(state['normalizers'] > 0, state['normalizers'],
                          first)
  value = feature_losses.crd(*args, normalizers, temperature=temperature,
                             where=where)
  new_state = dict(
      student_memory=feature_losses.crd_memory_update(
          state['student_memory'], indices, student, momentum, where=where),
      teacher_memory=feature_losses.crd_memory_update(
          state['teacher_memory'], indices, teacher, momentum, where=where),
      labels=new_labels, normalizers=normalizers)
  return value, new_state


def check(options, field):
  if not (isinstance(options['num_negatives'], int)
          and options['num_negatives'] >= 1):
    raise ValueError(
        f'{field}.num_negatives={options["num_negatives"]!r} must be a '
        f'positive integer (RepDistiller: 16384; clipped to N - 1).')
  if not 0.0 <= options['momentum'] < 1.0:
    raise ValueError(f'{field}.momentum={options["momentum"]!r} must be '
                     f'in [0, 1) (RepDistiller: 0.5).')


METHOD = feature.register(feature.FeatureMethod(
    name='crd', loss=loss,
    options={'dim': 128, 'num_negatives': 16384, 'temperature': 0.07,
             'momentum': 0.5, 'exact_negatives': True},
    connector=connector, init_state=init_state,
    row_sharded=('student_memory', 'teacher_memory', 'labels'),
    batch_keys=('index', 'label'), single_pair=True, check=check))
