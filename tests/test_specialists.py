"""Tests of kd_jax.specialists: Hinton et al. (2015) section 5."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import optimize
from scipy import special

from kd_jax import specialists


def _planted_block_probs(rng, num_examples=600):
  """Predictions over 12 classes that confuse 3 planted blocks of 4."""
  blocks = np.split(rng.permutation(12), 3)
  probs = np.zeros((num_examples, 12))
  for n in range(num_examples):
    block = blocks[rng.integers(3)]
    probs[n, block] = 0.95 * rng.dirichlet(np.ones(4))
    probs[n] += 0.05 * rng.dirichlet(np.ones(12))
  return probs, tuple(sorted(tuple(sorted(int(c) for c in b))
                             for b in blocks))


def _objective(log_q, generalist_probs, groups, specialist_probs):
  """The combination objective in float64 numpy, written independently."""
  def kl(p, log_r):
    return np.sum(np.where(p > 0, p * (np.log(np.where(p > 0, p, 1.0))
                                       - log_r), 0.0))
  value = kl(generalist_probs, log_q)
  for group, p in zip(groups, specialist_probs):
    outside = np.ones(len(log_q), bool)
    outside[list(group)] = False
    head = np.append(log_q[list(group)], special.logsumexp(log_q[outside]))
    value += kl(p, head)
  return value


def _head_probs(logits, group):
  """A padded specialist head's distribution over its classes and dustbin."""
  return special.softmax(np.append(logits[:len(group)], logits[-1]))


# Groups of confusable classes.


def test_confusion_covariance_is_the_covariance_over_examples():
  probs = special.softmax(np.random.default_rng(0).normal(size=(50, 5)), -1)
  np.testing.assert_allclose(specialists.confusion_covariance(probs),
                             np.cov(probs, rowvar=False, bias=True))


def test_clustering_recovers_planted_confusable_blocks():
  probs, planted = _planted_block_probs(np.random.default_rng(0))
  assert specialists.cluster_classes(probs, 3, seed=0) == planted
  assert specialists.cluster_classes(probs, 3, seed=7) == planted


def test_clustering_returns_a_sorted_partition_without_empty_groups():
  probs, _ = _planted_block_probs(np.random.default_rng(1), num_examples=200)
  for num_groups in (1, 5, 12):
    groups = specialists.cluster_classes(probs, num_groups, seed=3)
    assert len(groups) == num_groups
    assert all(groups) and all(list(g) == sorted(g) for g in groups)
    assert sorted(c for g in groups for c in g) == list(range(12))
    assert list(groups) == sorted(groups)


def test_clustering_rejects_more_clusters_than_classes():
  probs, _ = _planted_block_probs(np.random.default_rng(2), num_examples=20)
  with pytest.raises(ValueError, match='more clusters than classes'):
    specialists.cluster_classes(probs, 13)
  with pytest.raises(ValueError, match='num_groups=0'):
    specialists.cluster_classes(probs, 0)


NAMES = ('apple', 'bee', 'cat', 'dog', 'eel')


def test_resolve_groups_accepts_names_and_indices():
  groups = specialists.resolve_groups([['dog', 'cat'], (0, 'bee'), [4]], 5,
                                      NAMES, require_coverage=True)
  assert groups == ((2, 3), (0, 1), (4,))


@pytest.mark.parametrize('groups, kwargs, message', [
    ([['cat', 'dog'], ['dog']], {}, r"class 3 \('dog'\) is in group 0 and "
     'group 1'),
    ([['cat'], ['dog']], dict(require_coverage=True),
     r"3 classes are in no group: class 0 \('apple'\), class 1 \('bee'\), "
     r"class 4 \('eel'\)"),
    ([['cat', 'cow']], {}, r"unknown class name 'cow'; valid names are "
     "'apple', 'bee', 'cat', 'dog', 'eel'"),
    ([[0, 5]], {}, r'class index 5 is outside \[0, 5\)'),
    ([['cat'], []], {}, 'group 1 is empty'),
    ([['cat', 2]], {}, r"lists class 2 \('cat'\) twice"),
    (['cat'], {}, r"write it as \('cat',\)"),
])
def test_resolve_groups_errors_name_the_problem(groups, kwargs, message):
  with pytest.raises(ValueError, match=message):
    specialists.resolve_groups(groups, 5, NAMES, **kwargs)


def test_resolve_groups_allows_overlap_when_asked():
  groups = specialists.resolve_groups([[1, 2], [2, 3]], 4, allow_overlap=True)
  assert groups == ((1, 2), (2, 3))
  with pytest.raises(ValueError, match='no class_names were given'):
    specialists.resolve_groups([['cat']], 5)


def test_group_matrix_and_stacked_groups_agree():
  groups = ((4, 1), (0,), (2, 3, 4))
  membership = specialists.group_matrix(groups, 5)
  class_index, valid = specialists.stack_groups(groups)
  assert class_index.shape == valid.shape == (3, 3)
  for s, group in enumerate(groups):
    assert sorted(class_index[s][valid[s]]) == sorted(group)
    assert set(np.flatnonzero(membership[s])) == set(group)
  assert not valid[1, 1:].any() and (class_index[1, 1:] == 0).all()


# Training a specialist.


def test_specialist_targets_in_numpy_and_under_jit():
  labels = np.array([5, 2, 0, 2, 7])
  expected = np.array([1, 0, 2, 0, 2])
  np.testing.assert_array_equal(
      specialists.specialist_targets(labels, (2, 5)), expected)
  jitted = jax.jit(lambda y: specialists.specialist_targets(y, (2, 5),
                                                            head_size=4))
  np.testing.assert_array_equal(jitted(jnp.asarray(labels)),
                                np.where(expected == 2, 3, expected))


def test_sampling_weights_draw_the_in_group_fraction_uniformly_per_side():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 10, size=2000)
  group = (3, 7)
  weights = specialists.specialist_sampling_weights(labels, group, 0.5)
  in_group = np.isin(labels, group)
  np.testing.assert_allclose(weights.sum(), 1.0)
  np.testing.assert_allclose(weights[in_group].sum(), 0.5)
  assert np.ptp(weights[in_group]) == 0 and np.ptp(weights[~in_group]) == 0
  draws = rng.choice(labels.size, size=20_000, p=weights)
  assert abs(in_group[draws].mean() - 0.5) < 0.02


def test_oversampling_factor_is_the_ratio_of_group_odds():
  labels = np.repeat(np.arange(10), 10)  # The group (0,) holds 10%.
  assert specialists.oversampling_factor(labels, (0,)) == pytest.approx(9.0)
  assert specialists.oversampling_factor(labels, (0,), 0.25) == pytest.approx(
      3.0)
  with pytest.raises(ValueError, match='in_group_fraction=1.0'):
    specialists.oversampling_factor(labels, (0,), 1.0)


def test_dustbin_correction_recovers_the_natural_posterior():
  # Bayes-optimal specialist for 1-D Gaussian classes, trained on the
  # oversampled distribution; corrected, it must give natural posteriors.
  rng = np.random.default_rng(0)
  num_classes, group = 8, (2, 5)
  labels = rng.choice(num_classes, size=5000,
                      p=special.softmax(rng.normal(size=num_classes)))
  weights = specialists.specialist_sampling_weights(labels, group)
  natural_prior = np.bincount(labels, minlength=num_classes) / labels.size
  train_prior = np.bincount(labels, weights, minlength=num_classes)
  x = np.linspace(-4, 12, 50)[:, None]
  log_likelihood = -0.5 * (x - 1.3 * np.arange(num_classes))**2
  outside = np.setdiff1d(np.arange(num_classes), group)

  def head_logits(prior):
    joint = log_likelihood + np.log(prior)
    return np.concatenate(
        [joint[:, group], special.logsumexp(joint[:, outside], axis=1,
                                            keepdims=True)], axis=1)

  trained = head_logits(train_prior)
  natural = special.softmax(head_logits(natural_prior), axis=1)
  factor = specialists.oversampling_factor(labels, group)
  assert factor > 1.0  # The dustbin was under-sampled: raise its logit.
  corrected = specialists.correct_dustbin(trained.astype(np.float32), factor)
  np.testing.assert_allclose(jax.nn.softmax(corrected, axis=1), natural,
                             atol=1e-5)
  assert np.abs(special.softmax(trained, axis=1) - natural).max() > 0.1
  flipped = specialists.correct_dustbin(trained, 1.0 / factor)
  assert np.abs(jax.nn.softmax(flipped, axis=1) - natural).max() > 0.1


def test_correct_dustbin_moves_only_each_stacked_specialists_last_column():
  logits = jnp.zeros((2, 3, 4))
  corrected = specialists.correct_dustbin(logits, jnp.array([[2.0], [4.0]]))
  np.testing.assert_allclose(corrected[..., :-1], 0.0)
  np.testing.assert_allclose(corrected[0, :, -1], np.log(2.0))
  np.testing.assert_allclose(corrected[1, :, -1], np.log(4.0))


# Inference.


def test_active_specialists_are_those_meeting_the_top_n_classes():
  membership = specialists.group_matrix(((0, 1), (2,), (3, 4)), 5)
  logits = jnp.array([[5., 4., 0., 0., 3.], [0., .5, 1., .2, 0.]])
  np.testing.assert_array_equal(
      specialists.active_specialists(logits, membership, 1),
      [[True, False, False], [False, True, False]])
  np.testing.assert_array_equal(
      specialists.active_specialists(logits, membership, 3),
      [[True, False, True], [True, True, True]])


def _random_case(seed, num_classes=7, batch=6,
                 groups=((0, 3), (1, 2, 3, 4), (5,), (2, 6))):
  rng = np.random.default_rng(seed)
  head = max(len(g) for g in groups) + 1
  generalist_logits = (2 * rng.normal(size=(batch, num_classes))).astype(
      np.float32)
  specialist_logits = (2 * rng.normal(size=(len(groups), batch, head))).astype(
      np.float32)
  active = rng.random((batch, len(groups))) < 0.6
  active[0] = True
  return generalist_logits, specialist_logits, groups, active


def test_dustbin_bookkeeping_every_head_distribution_sums_to_one():
  generalist_logits, specialist_logits, groups, active = _random_case(0)
  log_q = specialists.combine(generalist_logits, specialist_logits, groups,
                              active)
  np.testing.assert_allclose(jnp.exp(log_q).sum(-1), 1.0, atol=1e-6)
  marginals = specialists.head_marginals(log_q, groups)
  log_p = specialists.specialist_log_probs(specialist_logits, groups)
  for log_probs in (marginals, log_p):
    np.testing.assert_allclose(jnp.exp(log_probs).sum(-1), 1.0, atol=1e-6)
    assert np.all(np.isneginf(log_probs[2, :, 1:-1]))  # Group (5,) padding.
  outside = np.delete(np.exp(np.asarray(log_q, np.float64)), [1, 2, 3, 4], 1)
  np.testing.assert_allclose(jnp.exp(marginals[1, :, -1]), outside.sum(-1),
                             rtol=1e-5)


@pytest.mark.parametrize('seed', [0] + [pytest.param(
    s, marks=pytest.mark.slow) for s in (1, 2)])
def test_combination_matches_scipy_minimisation(seed):
  generalist_logits, specialist_logits, groups, active = _random_case(seed)
  log_q = np.asarray(specialists.combine(
      generalist_logits, specialist_logits, groups, active), np.float64)
  ours = specialists.combination_objective(
      log_q.astype(np.float32), generalist_logits, specialist_logits, groups,
      active)
  for b in range(len(log_q)):
    on = [s for s in range(len(groups)) if active[b, s]]
    args = (special.softmax(generalist_logits[b].astype(np.float64)),
            [groups[s] for s in on],
            [_head_probs(specialist_logits[s, b].astype(np.float64),
                         groups[s]) for s in on])
    best = optimize.minimize(
        lambda z: _objective(special.log_softmax(z), *args),
        np.log(args[0]), method='BFGS', options=dict(gtol=1e-10))
    value = _objective(log_q[b], *args)
    assert value == pytest.approx(best.fun, abs=1e-6)
    assert ours[b] == pytest.approx(value, abs=1e-5)
    np.testing.assert_allclose(np.exp(log_q[b]), special.softmax(best.x),
                               atol=1e-5)


def test_combination_is_the_generalist_when_no_specialist_is_active():
  generalist_logits, specialist_logits, groups, active = _random_case(3)
  active[1:3] = False
  log_q = specialists.combine(generalist_logits, specialist_logits, groups,
                              active)
  expected = jax.nn.log_softmax(jnp.asarray(generalist_logits), axis=-1)
  np.testing.assert_array_equal(log_q[1:3], expected[1:3])


def test_a_specialist_that_agrees_with_the_generalist_changes_nothing():
  groups = ((1, 4), (0, 2, 3))
  generalist_logits = np.array([[1., 3., -1., 0.5, 2.], [0., -2., 4., 1., 1.]],
                               np.float32)
  log_p = np.asarray(jax.nn.log_softmax(generalist_logits, axis=-1))
  agreeing = np.full((2, 2, 4), -30.0, np.float32)  # Padding stays -30.
  for s, group in enumerate(groups):
    outside = np.delete(log_p, group, axis=1)
    agreeing[s, :, :len(group)] = log_p[:, group]
    agreeing[s, :, -1] = special.logsumexp(outside, axis=1)
  for active in ([[True, False], [False, True]], [[True, True]] * 2):
    log_q = specialists.combine(generalist_logits, agreeing, groups,
                                np.array(active))
    np.testing.assert_allclose(log_q, log_p, atol=1e-5)


def test_one_specialist_has_the_closed_form_even_when_probabilities_underflow():
  # One active specialist: q = w / 2 in its group and the rest keeps the
  # generalist's shape with mass (W_out + dustbin) / 2, even when the
  # generalist's mass outside the group underflows float32 (logit gap 95).
  groups = ((0, 1),)
  generalist_logits = np.array([[95., 0., -1., -2., -3.]], np.float32)
  specialist_logits = np.array([[[2., 1., 1.5]]], np.float32)
  log_q = specialists.combine(generalist_logits, specialist_logits, groups,
                              top_n=1)
  log_p = special.log_softmax(generalist_logits[0].astype(np.float64))
  head = special.log_softmax(specialist_logits[0, 0].astype(np.float64))
  expected = log_p - np.log(2)
  expected[:2] = np.logaddexp(log_p[:2], head[:2]) - np.log(2)
  log_out = special.logsumexp(log_p[2:])
  expected[2:] += np.logaddexp(log_out, head[2]) - log_out
  np.testing.assert_allclose(log_q[0], expected, atol=1e-5)


def test_combine_with_top_n_uses_the_active_specialists():
  generalist_logits, specialist_logits, groups, _ = _random_case(4)
  active = specialists.active_specialists(
      generalist_logits, specialists.group_matrix(groups, 7), 2)
  np.testing.assert_array_equal(
      specialists.combine(generalist_logits, specialist_logits, groups,
                          top_n=2),
      specialists.combine(generalist_logits, specialist_logits, groups,
                          active))


def test_combine_rejects_specialist_logits_that_do_not_fit_the_groups():
  generalist_logits, specialist_logits, groups, active = _random_case(5)
  with pytest.raises(ValueError, match=r'need \(4, 6, 5\).*column G'):
    specialists.combine(generalist_logits, specialist_logits[..., :-1],
                        groups, active)
  with pytest.raises(ValueError, match='exactly one of active'):
    specialists.combine(generalist_logits, specialist_logits, groups)
  with pytest.raises(ValueError, match='active has shape'):
    specialists.combine(generalist_logits, specialist_logits, groups,
                        active[:, :2])


# Evaluation.


def test_coverage_breakdown_counts_a_hand_made_example():
  membership = specialists.group_matrix(((0, 1), (1, 2)), 3)
  labels = np.array([0, 1, 1, 2, 2])
  active = np.array([[False, False], [True, True], [True, False],
                     [False, True], [True, True]])
  # Generalist predicts 0 everywhere; the combination fixes examples 1 and 3.
  generalist = np.eye(3)[[0, 0, 0, 0, 0]]
  combined = np.eye(3)[[0, 1, 0, 2, 0]]
  rows = specialists.coverage_breakdown(combined, generalist, labels,
                                        membership, active)
  assert [r['num_covering_specialists'] for r in rows] == [0, 1, 2]
  assert [r['num_examples'] for r in rows] == [1, 3, 1]
  assert [r['generalist_accuracy'] for r in rows] == [1.0, 0.0, 0.0]
  assert [r['combined_accuracy'] for r in rows] == [1.0, 1 / 3, 1.0]
  assert [r['correct_delta'] for r in rows] == [0, 1, 1]
  assert rows[0]['relative_improvement'] == 0.0
  assert np.isnan(rows[1]['relative_improvement'])
  masked = specialists.coverage_breakdown(
      combined, generalist, labels, membership, active,
      mask=np.array([True, True, True, True, False]))
  assert [r['num_examples'] for r in masked] == [1, 2, 1]
