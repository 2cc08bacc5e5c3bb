"""Registries: a method is one module found by its name, its capabilities
checked once; the README's worked example ("Adding a method") runs as
written."""

import os
import re

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import config_lib
from kd_jax import losses
from kd_jax import objective
from kd_jax import teachers
from kd_jax.config_lib import load_config
from kd_jax.data import sources
from kd_jax.methods import feature
from kd_jax.methods import logit

README = os.path.join(os.path.dirname(config_lib.CONFIG_DIR), 'README.md')


def readme_example() -> str:
  with open(README) as f:
    text = f.read()
  section = text[text.index('## Adding a method'):]
  return re.search(r'```python\n(.*?)```', section, re.S).group(1)


@pytest.fixture
def reverse_kl(monkeypatch):
  """The README's module, registered for this test only."""
  logit.LOGIT_METHODS.names()  # The built-in ones are registered first.
  monkeypatch.setattr(logit.LOGIT_METHODS, 'records',
                      dict(logit.LOGIT_METHODS.records))
  namespace = {}
  code = compile(readme_example(), 'README.md', 'exec')
  exec(code, namespace)  # pylint: disable=exec-used
  return namespace['METHOD']


def test_readme_example_trains_as_a_soft_term(reverse_kl):
  assert logit.LOGIT_METHODS.get('reverse_kl', 'soft') is reverse_kl
  config = load_config('mnist5k_distill', 'distill.soft=reverse_kl')
  assert config.distill.soft == {'method': 'reverse_kl', 'warmup_epochs': 0.0}
  objective.validate(config)
  rng = np.random.default_rng(0)
  student = jnp.asarray(rng.normal(size=(8, 10)), jnp.float32)
  teacher = jnp.asarray(rng.normal(size=(1, 8, 10)), jnp.float32)
  labels = jnp.asarray(rng.integers(0, 10, 8))
  mask = jnp.arange(8) < 6
  targets = objective.teacher_targets(teacher, {}, config.distill, (1.0,))
  _, terms = objective.loss(student, targets, labels, mask, config.distill)
  want = losses.masked_mean(losses.reverse_kl_divergence(
      student, teacher[0], config.distill.temperature), mask)
  assert float(terms['soft']) == float(want)


def test_readme_example_is_refused_where_it_cannot_serve(reverse_kl):
  del reverse_kl
  with pytest.raises(ValueError, match=r"does not take; its options are "
                     r"\['warmup_epochs'\]"):
    load_config('mnist5k_distill',
                'distill.soft=reverse_kl,distill.soft.beta=2.0')
  config = load_config('mnist5k_distill',
                       'distill.soft=reverse_kl,distill.temperature=4.0')
  with pytest.raises(ValueError, match='top-k'):
    teachers.cache.check_form(
        {'train': dict(form='topk', top_k=3, temperature=4.0)}, config)


@pytest.mark.parametrize('registry, name, match', [
    (logit.LOGIT_METHODS, 'dkx', r"soft loss \(did you mean 'dkd'\?\)"),
    (feature.FEATURE_METHODS, 'crdd',
     r"feature method \(did you mean 'crd'\?\)"),
    (teachers.SOURCES, 'onlne', r"teacher source \(did you mean 'online'\?\)"),
    (sources.DATASETS, 'cifar1000', r"dataset \(did you mean 'cifar100'\?\)"),
])
def test_unknown_names_are_refused_with_the_nearest_and_every_known_one(
    registry, name, match):
  with pytest.raises(ValueError, match=f"config.x='{name}' names no {match}"
                     ) as e:
    registry.get(name, 'config.x')
  assert all(repr(known) in str(e.value) for known in registry.names())


def test_every_builtin_lives_in_the_module_named_for_it():
  for registry in (logit.LOGIT_METHODS, feature.FEATURE_METHODS,
                   teachers.SOURCES, sources.DATASETS):
    for name in registry.names():
      record = registry.get(name, 'field')
      assert record.name == name


def test_old_flat_fields_move_into_the_option_dict_with_a_warning():
  with pytest.warns(FutureWarning, match=r"config.distill.dkd_beta is "
                    r"deprecated: write config.distill.soft = \{'method': "
                    r"'dkd', 'alpha': 1.0, 'beta': 4.0, 'warmup_epochs': 0.0"):
    config = load_config('mnist5k_distill',
                         "distill.soft='dkd',distill.dkd_beta=4.0")
  assert config.distill.soft == {'method': 'dkd', 'alpha': 1.0, 'beta': 4.0,
                                 'warmup_epochs': 0.0}
  assert 'dkd_beta' not in config.distill
  with pytest.warns(FutureWarning, match='without effect'):
    config = load_config('mnist5k_distill', 'distill.dist_beta=3.0')
  assert config.distill.soft == {'method': 'kl', 'warmup_epochs': 0.0}
  # An old config.json compares equal to the same run now.
  old = dict(config_lib.default_config().to_dict())
  old['distill'] = dict(old['distill'], soft='dkd', dkd_alpha=1.0,
                        dkd_beta=8.0, dkd_warmup_epochs=20.0, dist_beta=1.0,
                        dist_gamma=1.0, ctkd='none', ctkd_hidden=256)
  new = config_lib.default_config()
  new.distill.soft = dict(method='dkd', warmup_epochs=20.0)
  assert config_lib.upgrade_json(old)['distill'] == (
      config_lib.upgrade(new).distill.to_dict())
