"""Specialist ensembles (Hinton, Vinyals & Dean 2015, section 5).

A generalist model is complemented by specialists, each of which tells apart
the classes of one group of often-confused classes, with one extra *dustbin*
class for everything else. This module holds the mathematics of the method;
training the specialists and running the pipeline is the trainer's job.

1. Groups: `confusion_covariance` and `cluster_classes` (k-means on the
   columns of the covariance of the generalist's predicted probabilities), or
   groups given by hand, checked by `resolve_groups`.
2. Training data for specialist `s` with group `g`: `specialist_targets` (head
   labels), `specialist_sampling_weights` (half of the examples from `g`, half
   from the remainder) and, afterwards, `correct_dustbin` with
   `oversampling_factor` to undo the prior shift that the sampling caused.
3. Inference: `active_specialists` (groups that meet the generalist's top-n
   classes) and `combine`, which finds the full distribution
   `q = softmax(z)` minimising

     KL(p_g || q) + sum_{s active} KL(p_s || Q_s(q)),

   where `Q_s(q)` is `q` seen through specialist `s`'s head: `q` on the group's
   classes and the mass of `q` outside the group in the dustbin column.
4. `combine`'s log-probabilities are the teacher for a single student;
   `coverage_breakdown` gives the paper's table 5.

Stacked specialists (one pytree vmapped over specialists) have same-shaped
heads: with `G` the largest group size, every head has `G + 1` columns;
specialist `s` uses columns `0 .. len(groups[s]) - 1` for its classes in group
order, the LAST column (index `G`) for the dustbin, and ignores the columns in
between (padding). `stack_groups` and `specialist_log_probs` handle the
padding; `specialist_targets(labels, group, head_size=G + 1)` labels the
dustbin with that last column.
"""

from __future__ import annotations

from collections.abc import Sequence
import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

Groups = tuple[tuple[int, ...], ...]


# ----------------------------------------------------------------------------
# 1. Groups of confusable classes.
# ----------------------------------------------------------------------------


def confusion_covariance(probs: np.ndarray) -> np.ndarray:
  """Covariance over examples of the generalist's predicted probabilities.

  Classes that the generalist often predicts together (confuses) have a large
  positive covariance; Hinton et al. cluster the columns of this matrix.

  Args:
    probs: [N, C] predicted class probabilities on (unlabelled) data, N >= 2.

  Returns:
    [C, C] float64 covariance `mean_n (p_n - mean p)(p_n - mean p)^T`
    (normalised by N).

  >>> confusion_covariance(np.array([[1., 0.], [0., 1.]]))
  array([[ 0.25, -0.25],
         [-0.25,  0.25]])
  """
  probs = np.asarray(probs, dtype=np.float64)
  if probs.ndim != 2 or probs.shape[0] < 2:
    raise ValueError(
        f'probs must be [N, C] with N >= 2 examples, got shape {probs.shape}.')
  if not np.all(np.isfinite(probs)):
    raise ValueError('probs contains NaN or inf; pass softmax probabilities.')
  centred = probs - probs.mean(axis=0)
  return centred.T @ centred / probs.shape[0]


def _kmeans_plus_plus(points: np.ndarray, k: int,
                      rng: np.random.Generator) -> np.ndarray:
  """k-means++ seeding (Arthur & Vassilvitskii 2007): indices of k points."""
  n = len(points)
  chosen = [int(rng.integers(n))]
  dist2 = np.sum((points - points[chosen[0]])**2, axis=1)
  for _ in range(1, k):
    total = dist2.sum()
    if total > 0:
      index = int(rng.choice(n, p=dist2 / total))
    else:  # Fewer distinct points than clusters: any unchosen point will do.
      index = int(rng.choice(np.setdiff1d(np.arange(n), chosen)))
    chosen.append(index)
    dist2 = np.minimum(dist2, np.sum((points - points[index])**2, axis=1))
  return np.asarray(chosen)


def _kmeans(points: np.ndarray, k: int, rng: np.random.Generator,
            num_iters: int) -> tuple[np.ndarray, float]:
  """Lloyd's k-means from k-means++ seeds; no cluster is left empty."""
  centers = points[_kmeans_plus_plus(points, k, rng)].copy()
  assign = None
  for _ in range(num_iters):
    dist2 = np.sum((points[:, None, :] - centers[None, :, :])**2, axis=-1)
    new_assign = np.argmin(dist2, axis=1)
    for j in range(k):
      if np.any(new_assign == j):
        continue
      # Refill an empty cluster with the worst-fitting point of a cluster that
      # can spare one.
      sizes = np.bincount(new_assign, minlength=k)
      fit = dist2[np.arange(len(points)), new_assign]
      fit = np.where(sizes[new_assign] > 1, fit, -1.0)
      new_assign[int(np.argmax(fit))] = j
    if assign is not None and np.array_equal(new_assign, assign):
      break
    assign = new_assign
    centers = np.stack([points[assign == j].mean(axis=0) for j in range(k)])
  inertia = float(np.sum((points - centers[assign])**2))
  return assign, inertia


def cluster_classes(probs: np.ndarray, num_groups: int, *, seed: int = 0,
                    num_iters: int = 100, num_restarts: int = 10) -> Groups:
  """Groups of often-confused classes from the generalist's predictions.

  Runs k-means on the columns of `confusion_covariance(probs)` (each class is
  the point "its covariance with every class"), with k-means++ seeding and
  `num_restarts` restarts, keeping the lowest inertia. Hinton et al. used
  online k-means; batch Lloyd iterations find the same kind of partition and
  are deterministic given `seed`.

  Args:
    probs: [N, C] generalist probabilities on the training data (labels are
      not needed).
    num_groups: number of specialists, 1 <= num_groups <= C.
    seed: seed of the k-means++ draws.
    num_iters: most Lloyd iterations per restart.
    num_restarts: number of k-means++ restarts.

  Returns:
    A partition of `range(C)` into `num_groups` non-empty groups; each group
    is sorted and the groups are sorted by their smallest class.
  """
  probs = np.asarray(probs)
  num_classes = probs.shape[-1] if probs.ndim == 2 else None
  if num_classes is None:
    raise ValueError(f'probs must be [N, C], got shape {probs.shape}.')
  if not 1 <= num_groups <= num_classes:
    raise ValueError(
        f'num_groups={num_groups}: more clusters than classes '
        f'(C={num_classes}) or fewer than one; pass 1 <= num_groups <= '
        f'{num_classes}.')
  if num_restarts < 1 or num_iters < 1:
    raise ValueError(f'num_restarts={num_restarts} and num_iters={num_iters} '
                     'must both be >= 1.')
  points = confusion_covariance(probs)
  rng = np.random.default_rng(seed)
  best_assign, best_inertia = None, np.inf
  for _ in range(num_restarts):
    assign, inertia = _kmeans(points, num_groups, rng, num_iters)
    if inertia < best_inertia:
      best_assign, best_inertia = assign, inertia
  groups = [tuple(int(c) for c in np.flatnonzero(best_assign == j))
            for j in range(num_groups)]
  return tuple(sorted(groups))


def _describe(index: int, class_names: Sequence[str] | None) -> str:
  if class_names is None:
    return f'class {index}'
  return f'class {index} ({class_names[index]!r})'


def resolve_groups(groups: Sequence[Sequence[int | str]], num_classes: int,
                   class_names: Sequence[str] | None = None, *,
                   allow_overlap: bool = False,
                   require_coverage: bool = False) -> Groups:
  """Checks hand-made groups and turns class names into class indices.

  Args:
    groups: one sequence per specialist of class indices and/or class names,
      e.g. CIFAR-100's 20 coarse classes.
    num_classes: C, the number of classes of the generalist.
    class_names: the C class names, needed when groups use names.
    allow_overlap: whether a class may belong to several groups.
    require_coverage: whether every class must belong to some group.

  Returns:
    The groups as sorted tuples of class indices, in the order given (group
    `s` is specialist `s`).

  Raises:
    ValueError: for an empty group, an unknown name, an index outside
      `[0, num_classes)`, a class repeated within a group, a class in two
      groups (unless `allow_overlap`), or classes in no group (when
      `require_coverage`).

  >>> resolve_groups([['cat', 'dog'], [0]], 3, ['car', 'cat', 'dog'])
  ((1, 2), (0,))
  """
  if class_names is not None:
    class_names = [str(name) for name in class_names]
    if len(class_names) != num_classes:
      raise ValueError(f'class_names has {len(class_names)} names but '
                       f'num_classes={num_classes}; pass one name per class.')
    if len(set(class_names)) != num_classes:
      raise ValueError('class_names contains repeated names; names must be '
                       'unique to identify classes.')
  if isinstance(groups, (str, bytes)) or not len(groups):
    raise ValueError(f'groups={groups!r} must be a non-empty sequence of '
                     'groups of class indices or names.')
  name_to_index = ({name: i for i, name in enumerate(class_names)}
                   if class_names is not None else {})
  resolved = []
  for s, group in enumerate(groups):
    if isinstance(group, (str, bytes)) or not hasattr(group, '__len__'):
      raise ValueError(f'group {s} is {group!r}, not a sequence of classes; '
                       f'write it as ({group!r},) for a one-class group.')
    if not len(group):
      raise ValueError(f'group {s} is empty; every specialist needs at least '
                       'one class.')
    indices = []
    for member in group:
      if isinstance(member, str):
        if class_names is None:
          raise ValueError(f'group {s} names class {member!r} but no '
                           'class_names were given; pass class_names.')
        if member not in name_to_index:
          shown = ', '.join(repr(n) for n in class_names[:100])
          more = ', ...' if num_classes > 100 else ''
          raise ValueError(f'group {s}: unknown class name {member!r}; valid '
                           f'names are {shown}{more}.')
        index = name_to_index[member]
      elif isinstance(member, (int, np.integer)) and not isinstance(
          member, (bool, np.bool_)):
        index = int(member)
        if not 0 <= index < num_classes:
          raise ValueError(f'group {s}: class index {index} is outside '
                           f'[0, {num_classes}).')
      else:
        raise ValueError(f'group {s}: {member!r} is neither a class index '
                         'nor a class name.')
      if index in indices:
        raise ValueError(f'group {s} lists {_describe(index, class_names)} '
                         'twice; list each class once.')
      indices.append(index)
    resolved.append(tuple(sorted(indices)))

  owner: dict[int, int] = {}
  for s, group in enumerate(resolved):
    for index in group:
      if index in owner and not allow_overlap:
        raise ValueError(
            f'{_describe(index, class_names)} is in group {owner[index]} and '
            f'group {s}; remove it from one of them, or pass '
            'allow_overlap=True for overlapping specialists.')
      owner.setdefault(index, s)
  if require_coverage:
    uncovered = [i for i in range(num_classes) if i not in owner]
    if uncovered:
      listed = ', '.join(_describe(i, class_names) for i in uncovered)
      raise ValueError(f'{len(uncovered)} classes are in no group: {listed}; '
                       'add them to groups or pass require_coverage=False.')
  return tuple(resolved)


def group_matrix(groups: Sequence[Sequence[int]],
                 num_classes: int) -> np.ndarray:
  """Membership matrix: bool [S, C], True where class c is in group s.

  >>> group_matrix(((0, 2), (1,)), 3).astype(int)
  array([[1, 0, 1],
         [0, 1, 0]])
  """
  groups = _check_index_groups(groups, num_classes)
  membership = np.zeros((len(groups), num_classes), dtype=bool)
  for s, group in enumerate(groups):
    membership[s, list(group)] = True
  return membership


def stack_groups(groups: Sequence[Sequence[int]]) -> tuple[np.ndarray,
                                                            np.ndarray]:
  """Padded form of the groups for stacked specialists.

  Returns:
    class_index: int32 [S, G], `class_index[s, j]` is the class of head column
      j of specialist s, padded with 0; G is the largest group size.
    valid: bool [S, G], False on padding.

  >>> stack_groups(((3, 5), (1,)))
  (array([[3, 5],
         [1, 0]], dtype=int32), array([[ True,  True],
         [ True, False]]))
  """
  if not len(groups) or any(not len(g) for g in groups):
    raise ValueError(f'groups={groups!r} must be non-empty with non-empty '
                     'groups.')
  size = max(len(g) for g in groups)
  class_index = np.zeros((len(groups), size), dtype=np.int32)
  valid = np.zeros((len(groups), size), dtype=bool)
  for s, group in enumerate(groups):
    class_index[s, :len(group)] = group
    valid[s, :len(group)] = True
  return class_index, valid


def _check_index_groups(groups: Sequence[Sequence[int]],
                        num_classes: int) -> Groups:
  """Groups of in-range, distinct class indices (overlap between groups ok)."""
  if isinstance(groups, (str, bytes)) or not len(groups):
    raise ValueError(f'groups={groups!r} must be a non-empty sequence of '
                     'groups of class indices (see resolve_groups).')
  checked = []
  for s, group in enumerate(groups):
    group = tuple(int(c) for c in group)
    if not group:
      raise ValueError(f'group {s} is empty.')
    if len(set(group)) != len(group):
      raise ValueError(f'group {s}={group} repeats a class.')
    if min(group) < 0 or max(group) >= num_classes:
      raise ValueError(f'group {s}={group} has a class outside '
                       f'[0, {num_classes}); num_classes={num_classes}.')
    checked.append(group)
  return tuple(checked)


# ----------------------------------------------------------------------------
# 2. Training a specialist: targets, sampling and the dustbin correction.
# ----------------------------------------------------------------------------


def specialist_targets(labels: Any, group: Sequence[int], *,
                       head_size: int | None = None) -> Any:
  """Maps full-class labels to the labels of a specialist's head.

  Args:
    labels: int array of class indices (numpy, or jax inside or outside jit).
    group: the specialist's classes; head column j is class `group[j]`.
    head_size: number of head columns, `len(group) + 1` by default; pass
      `G + 1` for stacked (padded) specialists, whose dustbin is the last
      column.

  Returns:
    int32 array shaped like `labels`: the position of the label in `group`,
    or `head_size - 1` (the dustbin) for classes outside it. Numpy in, numpy
    out; jax in, jax out.

  >>> specialist_targets(np.array([4, 7, 1, 7]), (7, 4))
  array([1, 0, 2, 0], dtype=int32)
  >>> specialist_targets(np.array([4, 1]), (7, 4), head_size=5)
  array([1, 4], dtype=int32)
  """
  group = tuple(int(c) for c in group)
  if not group or len(set(group)) != len(group):
    raise ValueError(f'group={group} must be non-empty without repeats.')
  head_size = len(group) + 1 if head_size is None else int(head_size)
  if head_size < len(group) + 1:
    raise ValueError(f'head_size={head_size} leaves no dustbin column for a '
                     f'group of {len(group)} classes; use >= {len(group) + 1}.')
  xp = jnp if isinstance(labels, jax.Array) else np
  labels = xp.asarray(labels)
  matches = labels[..., None] == xp.asarray(group)
  position = xp.argmax(matches, axis=-1)
  return xp.where(matches.any(axis=-1), position,
                  head_size - 1).astype(xp.int32)


def _group_fraction(labels: np.ndarray, group: Sequence[int],
                    in_group_fraction: float) -> tuple[np.ndarray, float]:
  """In-group mask of the labels and the natural prior of the group."""
  labels = np.asarray(labels)
  if labels.ndim != 1 or not labels.size:
    raise ValueError(f'labels must be a non-empty 1-D array, got shape '
                     f'{labels.shape}.')
  if not 0.0 < in_group_fraction < 1.0:
    raise ValueError(f'in_group_fraction={in_group_fraction} must be in '
                     '(0, 1): the specialist needs examples of both its '
                     'group and its dustbin.')
  in_group = np.isin(labels, np.asarray(tuple(group)))
  natural = float(in_group.mean())
  if natural in (0.0, 1.0):
    raise ValueError(
        f'group {tuple(group)} holds {in_group.sum()} of {labels.size} '
        'examples; a specialist needs examples inside and outside its group.')
  return in_group, natural


def specialist_sampling_weights(labels: np.ndarray, group: Sequence[int],
                                in_group_fraction: float = 0.5) -> np.ndarray:
  """Per-example probabilities of the specialist's training distribution.

  Hinton et al.: "half its examples coming from its special subset and half
  sampled at random from the remainder of the training set". We read
  "remainder" as the examples outside the group: a fraction
  `in_group_fraction` of the draws is uniform over the group's examples and
  the rest uniform over the other examples. Sampling is uniform within each
  side, so the classes keep their natural proportions within the group and
  within the dustbin; only the group-vs-dustbin prior changes, which is what
  `oversampling_factor` undoes.

  Args:
    labels: int [N] labels of the training set.
    group: the specialist's classes.
    in_group_fraction: expected fraction of draws from the group, in (0, 1).

  Returns:
    float64 [N] probabilities summing to 1 (e.g. for `rng.choice(N, p=...)`).

  >>> specialist_sampling_weights(np.array([0, 1, 1, 2]), (0,))
  array([0.5       , 0.16666667, 0.16666667, 0.16666667])
  """
  in_group, _ = _group_fraction(labels, group, in_group_fraction)
  num_in = in_group.sum()
  return np.where(in_group, in_group_fraction / num_in,
                  (1.0 - in_group_fraction) / (in_group.size - num_in))


def oversampling_factor(labels: np.ndarray, group: Sequence[int],
                        in_group_fraction: float = 0.5) -> float:
  r"""Factor whose log corrects the dustbin logit of a trained specialist.

  Derivation (prior shift). Let :math:`\pi_y` be the natural class prior,
  :math:`\pi_g = \sum_{y \in g} \pi_y` the group's and :math:`f` the
  in-group fraction. `specialist_sampling_weights` keeps :math:`p(x|y)` and
  reweights the prior of each head class :math:`h` (a class of the group, or
  the dustbin :math:`d`) by :math:`\pi^{t}_h / \pi_h`, which is
  :math:`f / \pi_g` for every class of the group and
  :math:`(1 - f) / (1 - \pi_g)` for the dustbin. By Bayes' rule

  .. math::
    p_{nat}(h|x) \propto p(x|h)\,\pi_h \propto p_{train}(h|x)\,\pi_h/\pi^t_h,

  so adding :math:`\log(\pi_h/\pi^t_h)` to each logit restores the natural
  posterior. Softmax ignores a shift common to all logits, so it is enough to
  add to the dustbin logit alone

  .. math::
    \log \rho, \quad
    \rho = \frac{(1 - \pi_g)/(1 - f)}{\pi_g / f}
         = \frac{\text{odds}_{train}(g)}{\text{odds}_{nat}(g)}.

  :math:`\rho` is "the proportion by which the specialist classes are
  oversampled" relative to the dustbin. The dustbin was seen less often than
  naturally (:math:`f > \pi_g`), so :math:`\rho > 1` and its logit is RAISED.
  Note :math:`\rho` is not :math:`p_{nat}(d)/p_{train}(d)` alone: that
  ratio, :math:`(1 - \pi_g)/(1 - f)`, would also need the group's logits
  lowered by :math:`\log(f/\pi_g)`.

  Args:
    labels: int [N] labels of the set the weights were computed on.
    group: the specialist's classes.
    in_group_fraction: as in `specialist_sampling_weights`.

  Returns:
    :math:`\rho`, e.g. 9.0 for a group with a tenth of the data and f = 1/2.

  >>> oversampling_factor(np.arange(10), (0,))
  9.0
  """
  _, natural = _group_fraction(labels, group, in_group_fraction)
  return float((1.0 - natural) / (1.0 - in_group_fraction)
               * in_group_fraction / natural)


def dustbin_logit_correction(factor: Any) -> Any:
  """`log(factor)`: what to add to the dustbin logit (see oversampling_factor).

  >>> float(dustbin_logit_correction(1.0))
  0.0
  """
  if isinstance(factor, jax.Array):
    return jnp.log(factor)
  factor = np.asarray(factor, dtype=np.float64)
  if np.any(factor <= 0):
    raise ValueError(f'factor={factor} must be > 0 (a ratio of priors).')
  return np.log(factor)


def correct_dustbin(logits: Any, factor: Any) -> jax.Array:
  """Adds `log(factor)` to the last (dustbin) logit.

  Args:
    logits: [..., H] specialist logits, dustbin last (padded heads too).
    factor: `oversampling_factor(...)`, a scalar, or an array broadcasting
      against `logits[..., -1]`, e.g. shape [S, 1] for stacked logits
      [S, B, G + 1].

  Returns:
    The corrected logits.
  """
  logits = jnp.asarray(logits)
  correction = jnp.asarray(dustbin_logit_correction(factor), logits.dtype)
  return logits.at[..., -1].add(correction)


# ----------------------------------------------------------------------------
# 3. Inference: active specialists and the KL-minimising combination.
# ----------------------------------------------------------------------------


def active_specialists(generalist_logits: Any, membership: Any,
                       top_n: int) -> jax.Array:
  """Specialists whose group meets the generalist's `top_n` classes.

  Args:
    generalist_logits: [B, C].
    membership: bool [S, C] (`group_matrix`).
    top_n: how many of the generalist's most probable classes to look at.

  Returns:
    bool [B, S].
  """
  generalist_logits = jnp.asarray(generalist_logits)
  membership = jnp.asarray(membership, jnp.float32)
  num_classes = generalist_logits.shape[-1]
  if membership.shape[-1] != num_classes:
    raise ValueError(f'membership has {membership.shape[-1]} classes but '
                     f'generalist_logits has {num_classes}.')
  if not 1 <= top_n <= num_classes:
    raise ValueError(f'top_n={top_n} must be in [1, {num_classes}].')
  _, top = jax.lax.top_k(generalist_logits, top_n)
  in_top = jnp.zeros(generalist_logits.shape, bool).at[
      jnp.arange(generalist_logits.shape[0])[:, None], top].set(True)
  hits = in_top.astype(jnp.float32) @ membership.T
  return hits > 0


def _head_valid(groups: Groups) -> np.ndarray:
  """bool [S, G + 1]: True on group columns and on the (last) dustbin."""
  _, valid = stack_groups(groups)
  return np.concatenate([valid, np.ones((len(groups), 1), bool)], axis=1)


def specialist_log_probs(specialist_logits: Any,
                         groups: Sequence[Sequence[int]]) -> jax.Array:
  """Log-softmax of padded specialist heads, -inf on the padding columns.

  Args:
    specialist_logits: [S, ..., G + 1], column G the dustbin.
    groups: the S groups.

  Returns:
    [S, ..., G + 1] log-probabilities over each specialist's group classes
    and dustbin.
  """
  groups = tuple(tuple(int(c) for c in g) for g in groups)
  specialist_logits = jnp.asarray(specialist_logits)
  valid = _head_valid(groups)
  if (specialist_logits.ndim < 2
      or specialist_logits.shape[0] != len(groups)
      or specialist_logits.shape[-1] != valid.shape[1]):
    raise ValueError(
        f'specialist_logits has shape {specialist_logits.shape} but '
        f'{len(groups)} groups of at most G={valid.shape[1] - 1} classes '
        f'need [S={len(groups)}, ..., G+1={valid.shape[1]}] (column G is the '
        'dustbin; pad the heads of smaller groups).')
  valid = valid.reshape((len(groups),) + (1,) * (specialist_logits.ndim - 2)
                        + (valid.shape[1],))
  masked = jnp.where(valid, specialist_logits, -jnp.inf)
  return jax.nn.log_softmax(masked, axis=-1)


def _log_outside_mass(log_q: jax.Array, outside: jax.Array) -> jax.Array:
  """log of q's mass outside each group, [..., C] -> [..., S]."""
  top = jnp.max(log_q, axis=-1, keepdims=True)
  mass = jnp.exp(log_q - top) @ outside.T
  return top + jnp.log(jnp.maximum(mass, jnp.finfo(log_q.dtype).tiny))


def head_marginals(log_q: Any, groups: Sequence[Sequence[int]]) -> jax.Array:
  """`q` seen through each specialist's head: `Q_s(q)`.

  Args:
    log_q: [B, C] log-probabilities of a full distribution.
    groups: the S groups.

  Returns:
    [S, B, G + 1] log-probabilities: `log q` of the group's classes in group
    order, -inf on padding, and in the last column the log of q's total mass
    outside the group (what the specialist's dustbin is compared with).
  """
  log_q = jnp.asarray(log_q)
  groups = _check_index_groups(groups, log_q.shape[-1])
  class_index, valid = stack_groups(groups)
  outside = jnp.asarray(~group_matrix(groups, log_q.shape[-1]), log_q.dtype)
  in_group = jnp.where(valid[:, None, :], log_q[:, class_index].transpose(
      1, 0, 2), -jnp.inf)
  dustbin = _log_outside_mass(log_q, outside).T[..., None]
  return jnp.concatenate([in_group, dustbin], axis=-1)


def _check_combination_inputs(generalist_logits, specialist_logits, groups,
                              active) -> tuple[jax.Array, jax.Array, Groups]:
  generalist_logits = jnp.asarray(generalist_logits)
  specialist_logits = jnp.asarray(specialist_logits)
  if generalist_logits.ndim != 2:
    raise ValueError(f'generalist_logits must be [B, C], got shape '
                     f'{generalist_logits.shape}.')
  batch, num_classes = generalist_logits.shape
  groups = _check_index_groups(groups, num_classes)
  head = max(len(g) for g in groups) + 1
  expected = (len(groups), batch, head)
  if specialist_logits.shape != expected:
    raise ValueError(
        f'specialist_logits has shape {specialist_logits.shape} but '
        f'{len(groups)} groups and a batch of {batch} need {expected}: '
        f'[S, B, G+1] with G={head - 1} the largest group size, column G '
        'the dustbin, and smaller heads padded.')
  if active is not None and tuple(jnp.shape(active)) != (batch, len(groups)):
    raise ValueError(f'active has shape {jnp.shape(active)}; expected '
                     f'[B, S] = {(batch, len(groups))}.')
  return generalist_logits, specialist_logits, groups


def combination_objective(log_q: Any, generalist_logits: Any,
                          specialist_logits: Any,
                          groups: Sequence[Sequence[int]],
                          active: Any) -> jax.Array:
  r"""The objective that `combine` minimises, per example.

  .. math::
    \mathrm{KL}(p_g \| q) + \sum_{s\ \mathrm{active}}
    \mathrm{KL}(p_s \| Q_s(q))

  Args:
    log_q: [B, C] candidate log-probabilities.
    generalist_logits: [B, C].
    specialist_logits: [S, B, G + 1] (see the module docstring), already
      dustbin-corrected.
    groups: the S groups.
    active: bool [B, S].

  Returns:
    [B] objective values (nats).
  """
  generalist_logits, specialist_logits, groups = _check_combination_inputs(
      generalist_logits, specialist_logits, groups, active)
  log_q = jnp.asarray(log_q)

  def kl(log_p, log_r, axis):
    p = jnp.exp(log_p)
    return jnp.sum(jnp.where(p > 0, p * (log_p - log_r), 0.0), axis=axis)

  log_p_generalist = jax.nn.log_softmax(generalist_logits, axis=-1)
  per_specialist = kl(specialist_log_probs(specialist_logits, groups),
                      head_marginals(log_q, groups), axis=-1)  # [S, B]
  return kl(log_p_generalist, log_q, axis=-1) + jnp.sum(
      jnp.where(jnp.asarray(active, bool).T, per_specialist, 0.0), axis=0)


def _em_step(log_q, log_w, dustbin, outside):
  """One EM (minorise-minimise) step for a single example.

  The objective is, up to a constant, the negative log-likelihood of q given
  "soft counts": w_c on each class c, and b_s on "some class outside group s"
  (a censored observation). EM spreads each b_s over the classes outside
  group s in proportion to q, then renormalises: q_c <- (w_c + q_c kappa_c)/T
  with kappa_c = sum_{s: c outside s} b_s / u_s, u_s = q(outside s).
  Computed in log space, so classes with underflowing q stay exact.
  """
  log_u = _log_outside_mass(log_q, outside)
  ratio = jnp.where(dustbin > 0,
                    jnp.exp(jnp.minimum(jnp.log(dustbin) - log_u, 80.0)), 0.0)
  log_kappa = jnp.log(ratio @ outside)
  return jax.nn.log_softmax(jnp.logaddexp(log_w, log_q + log_kappa))


def _neg_log_likelihood(log_q, log_w, dustbin, outside):
  """The objective up to an additive constant, for one example."""
  w = jnp.exp(log_w)
  log_u = _log_outside_mass(log_q, outside)
  return -(jnp.sum(jnp.where(w > 0, w * log_q, 0.0))
           + jnp.sum(jnp.where(dustbin > 0, dustbin * log_u, 0.0)))


def _squarem_solve(log_w, dustbin, outside, num_steps):
  """Accelerated EM for one example: SQUAREM (Varadhan & Roland 2008).

  Each step takes two EM steps, extrapolates along their squared-difference
  path, stabilises the result with one more EM step, and keeps it only if it
  is at least as good as the plain two EM steps: the objective never
  increases and every iterate is a normalised distribution.
  """
  finite = jnp.isfinite(log_w)

  def body(_, log_q):
    em = functools.partial(_em_step, log_w=log_w, dustbin=dustbin,
                           outside=outside)
    nll = functools.partial(_neg_log_likelihood, log_w=log_w,
                            dustbin=dustbin, outside=outside)
    log_q1 = em(log_q)
    log_q2 = em(log_q1)
    r = jnp.where(finite, log_q1 - log_q, 0.0)
    v = jnp.where(finite, log_q2 - 2 * log_q1 + log_q, 0.0)
    r_norm, v_norm = jnp.linalg.norm(r), jnp.linalg.norm(v)
    alpha = jnp.where(v_norm > 0, -r_norm / jnp.where(v_norm > 0, v_norm, 1.0),
                      -1.0)
    alpha = jnp.clip(alpha, -1e3, -1.0)
    extrapolated = jax.nn.log_softmax(
        jnp.where(finite, log_q - 2 * alpha * r + alpha**2 * v, -jnp.inf))
    log_q3 = em(extrapolated)
    f3, f2 = nll(log_q3), nll(log_q2)
    accept = jnp.isfinite(f3) & (f3 <= f2) & jnp.all(
        jnp.isfinite(log_q3) | ~finite)
    return jnp.where(accept, log_q3, log_q2)

  return jax.lax.fori_loop(0, num_steps, body, jax.nn.log_softmax(log_w))


@functools.partial(jax.jit, static_argnames=('num_steps',))
def _combine_arrays(generalist_logits, specialist_log_probs_, active,
                    class_index, valid, outside, num_steps):
  batch, num_classes = generalist_logits.shape
  log_p_generalist = jax.nn.log_softmax(generalist_logits, axis=-1)
  # Soft counts on single classes: the generalist plus the active
  # specialists' in-group probabilities.
  in_group = jnp.where(valid[:, None, :] & active.T[:, :, None],
                       jnp.exp(specialist_log_probs_[..., :-1]), 0.0)
  in_group = jnp.transpose(in_group, (1, 0, 2)).reshape(batch, -1)
  specialist_mass = jnp.zeros((batch, num_classes), in_group.dtype).at[
      :, class_index.reshape(-1)].add(in_group)
  log_w = jnp.logaddexp(log_p_generalist, jnp.log(specialist_mass))
  # Soft counts on "outside group s": the active specialists' dustbins.
  dustbin = jnp.where(active, jnp.exp(specialist_log_probs_[..., -1]).T, 0.0)
  solve = jax.vmap(_squarem_solve, in_axes=(0, 0, None, None))
  log_q = solve(log_w, dustbin, outside, num_steps)
  return jnp.where(jnp.any(active, axis=-1, keepdims=True), log_q,
                   log_p_generalist)


def combine(generalist_logits: Any, specialist_logits: Any,
            groups: Sequence[Sequence[int]], active: Any = None, *,
            top_n: int | None = None, num_steps: int = 20) -> jax.Array:
  r"""The full distribution that best agrees with generalist and specialists.

  Finds, for each example, :math:`q = \mathrm{softmax}(z)` minimising
  `combination_objective`

  .. math::
    \mathrm{KL}(p_g \| q) + \sum_{s \in A} \mathrm{KL}(p_s \| Q_s(q)),

  where :math:`Q_s(q)` is q on group s's classes plus q's mass outside the
  group (compared with the specialist's dustbin). The objective is convex in
  q (not in z) with a unique minimiser; it is, up to a constant, the negative
  log-likelihood of q given soft counts
  :math:`w_c = p_g(c) + \sum_{s \in A,\, c \in g_s} p_s(c)` on classes and
  :math:`b_s = p_s(\text{dustbin})` on "outside group s". The solver is EM
  for this censored multinomial (a fixed point
  :math:`q_c = (w_c + q_c \sum_{s: c \notin g_s} b_s / q(\bar g_s)) / T`,
  :math:`T = 1 + |A|`), in log space, accelerated by SQUAREM, jitted and
  vmapped over the batch. It starts at :math:`q \propto w`; with one active
  specialist the first EM step is already the closed-form optimum.

  Args:
    generalist_logits: [B, C].
    specialist_logits: [S, B, G + 1] with G the largest group size: for
      specialist s, columns `0 .. len(groups[s]) - 1` are its classes in group
      order, column G (the last) its dustbin, other columns padding (ignored).
      Apply `correct_dustbin` first.
    groups: the S groups of class indices (overlaps allowed).
    active: bool [B, S]; or None with `top_n` given, to use
      `active_specialists(generalist_logits, group_matrix(...), top_n)`.
    top_n: see `active`.
    num_steps: SQUAREM steps (3 EM steps each).

  Returns:
    [B, C] log-probabilities of the combined distribution; exactly
    `log_softmax(generalist_logits)` for examples without active specialists.
  """
  if (active is None) == (top_n is None):
    raise ValueError('Pass exactly one of active ([B, S] bool) and top_n '
                     f'(an int); got active={active!r}, top_n={top_n!r}.')
  if num_steps < 1:
    raise ValueError(f'num_steps={num_steps} must be >= 1.')
  generalist_logits, specialist_logits, groups = _check_combination_inputs(
      generalist_logits, specialist_logits, groups, active)
  membership = group_matrix(groups, generalist_logits.shape[-1])
  if active is None:
    active = active_specialists(generalist_logits, membership, top_n)
  class_index, valid = stack_groups(groups)
  log_probs = specialist_log_probs(specialist_logits, groups)
  dtype = generalist_logits.dtype
  return _combine_arrays(generalist_logits, log_probs.astype(dtype),
                         jnp.asarray(active, bool), jnp.asarray(class_index),
                         jnp.asarray(valid), jnp.asarray(~membership, dtype),
                         num_steps=int(num_steps))


# ----------------------------------------------------------------------------
# 4. Evaluation: Hinton et al.'s table 5.
# ----------------------------------------------------------------------------


def coverage_breakdown(combined_logits: Any, generalist_logits: Any,
                       labels: Any, membership: Any, active: Any, *,
                       mask: Any = None) -> list[dict[str, float]]:
  """Accuracy gains by the number of active specialists covering the label.

  For each k, the examples whose true class is in the group of exactly k
  active specialists: how many, the generalist's and the combined top-1
  accuracy on them, the change in the number correct and the relative
  accuracy change `(combined - generalist) / generalist`.

  Args:
    combined_logits: [B, C] (e.g. `combine`'s log-probabilities).
    generalist_logits: [B, C].
    labels: int [B].
    membership: bool [S, C].
    active: bool [B, S].
    mask: optional bool [B], False for padding examples.

  Returns:
    One dict per k that occurs, in increasing k, with keys
    `num_covering_specialists`, `num_examples`, `generalist_accuracy`,
    `combined_accuracy`, `correct_delta`, `relative_improvement` (NaN when
    the generalist gets none right).
  """
  labels = np.asarray(labels)
  membership = np.asarray(membership, bool)
  active = np.asarray(active, bool)
  generalist_correct = np.argmax(np.asarray(generalist_logits), -1) == labels
  combined_correct = np.argmax(np.asarray(combined_logits), -1) == labels
  covering = np.sum(active & membership[:, labels].T, axis=-1)
  keep = np.ones(labels.shape, bool) if mask is None else np.asarray(mask,
                                                                     bool)
  rows = []
  for k in np.unique(covering[keep]):
    subset = keep & (covering == k)
    generalist_accuracy = float(generalist_correct[subset].mean())
    combined_accuracy = float(combined_correct[subset].mean())
    rows.append(dict(
        num_covering_specialists=int(k),
        num_examples=int(subset.sum()),
        generalist_accuracy=generalist_accuracy,
        combined_accuracy=combined_accuracy,
        correct_delta=int(combined_correct[subset].sum()
                          - generalist_correct[subset].sum()),
        relative_improvement=((combined_accuracy - generalist_accuracy)
                              / generalist_accuracy
                              if generalist_accuracy > 0 else float('nan'))))
  return rows
