"""Specialist ensembles (Hinton, Vinyals & Dean 2015, section 5).

A generalist model is complemented by specialists, each telling apart the
classes of one group of often-confused classes, with one dustbin class for
everything else. The whole feature lives here:

* `method`: the mathematics (clustering, head targets, oversampling and its
  correction, the combination); its names are re-exported here, so
  `specialists.combine(...)` works on `from kd_jax import specialists`.
* `groups`: the groups as runs configure (`config.specialist`) and record
  them (`groups.json`).
* `data`: the data plug-in of a specialist's run (its head's labels, a train
  stream that oversamples its group), registered with `kd_jax.data.stream`.
* `teacher`: a generalist and its specialists as a teacher
  (`config.distill.teacher_source='specialists'`).
* CLIs: `python -m kd_jax.specialists.cluster_classes` (groups from a trained
  generalist) and `python -m kd_jax.specialists.evaluate` (generalist vs
  combination accuracy).
"""

from kd_jax.specialists.method import active_specialists
from kd_jax.specialists.method import cluster_classes
from kd_jax.specialists.method import combination_objective
from kd_jax.specialists.method import combine
from kd_jax.specialists.method import confusion_covariance
from kd_jax.specialists.method import correct_dustbin
from kd_jax.specialists.method import coverage_breakdown
from kd_jax.specialists.method import dustbin_logit_correction
from kd_jax.specialists.method import group_matrix
from kd_jax.specialists.method import Groups
from kd_jax.specialists.method import head_marginals
from kd_jax.specialists.method import oversampling_factor
from kd_jax.specialists.method import resolve_groups
from kd_jax.specialists.method import specialist_log_probs
from kd_jax.specialists.method import specialist_sampling_weights
from kd_jax.specialists.method import specialist_targets
from kd_jax.specialists.method import stack_groups

__all__ = [
    'active_specialists', 'cluster_classes', 'combination_objective',
    'combine', 'confusion_covariance', 'correct_dustbin',
    'coverage_breakdown', 'dustbin_logit_correction', 'group_matrix',
    'Groups', 'head_marginals', 'oversampling_factor', 'resolve_groups',
    'specialist_log_probs', 'specialist_sampling_weights',
    'specialist_targets', 'stack_groups',
]
