"""Completions of transfer-text prompts: shapes, masks, keys, cache; and
the generation speed benchmark's PyTorch decoder and --tiny run."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import jax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import generation
from kd_jax.models import decoder

# Slow (seconds per test): sampling compiles a decoder per case.
pytestmark = pytest.mark.slow

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SPEED_SCRIPT = os.path.join(REPO, 'experiments', 'generation_speed', 'run.py')
VOCAB = 32
WINDOW = 12
PROMPT = 4
COMPLETION = 8
SAMPLING = dict(temperature=0.8, top_k=5, top_p=0.9)


@pytest.fixture(scope='module')
def tiny():
  model = decoder.decoder_tiny(VOCAB)
  variables = jax.jit(model.init)(jax.random.key(0),
                                  jnp.zeros((1, WINDOW), jnp.int32))
  return model, variables


@pytest.fixture(scope='module')
def batch():
  """A train batch of the text stream (kd_jax.data.text): 8 windows, every
  target present."""
  inputs = np.random.default_rng(0).integers(0, VOCAB, (8, WINDOW))
  return {'inputs': inputs.astype(np.int32),
          'mask': np.ones((8, WINDOW), bool)}


def _generate(model, variables, batch, key, **settings):
  settings = {**SAMPLING, **settings}
  return generation.generate(model, variables, batch['inputs'], batch['mask'],
                             key, prompt_length=PROMPT,
                             completion_length=COMPLETION, **settings)


def test_completions_follow_the_prompt_of_each_window(tiny, batch):
  out = _generate(*tiny, batch, jax.random.key(1))
  assert out['tokens'].shape == out['mask'].shape == (8, PROMPT + COMPLETION)
  assert out['tokens'].dtype == jnp.int32 and out['mask'].dtype == jnp.bool_
  np.testing.assert_array_equal(out['tokens'][:, :PROMPT],
                                batch['inputs'][:, :PROMPT])
  assert not out['mask'][:, :PROMPT].any() and out['mask'][:, PROMPT:].all()
  assert ((out['tokens'] >= 0) & (out['tokens'] < VOCAB)).all()


def test_rows_without_a_whole_prompt_are_masked(tiny, batch):
  # Masks as text.eval_batches makes them (targets present, then absent):
  # whole windows, short last windows of 7 and 4 targets and one of 3
  # (shorter than the prompt), and padding rows.
  targets = np.array([12, 12, 7, 4, 3, 0, 0, 0])
  last = dict(batch, mask=np.arange(WINDOW) < targets[:, None])
  out = _generate(*tiny, last, jax.random.key(1))
  generates = targets >= PROMPT
  np.testing.assert_array_equal(out['mask'][:, PROMPT:].any(axis=1),
                                generates)
  np.testing.assert_array_equal(out['mask'][:, PROMPT:].all(axis=1),
                                generates)


def test_the_same_key_gives_the_same_samples_whatever_came_before(
    tiny, batch):
  model, variables = tiny
  rng = jax.random.key(7)
  keys = [jax.random.fold_in(rng, step) for step in range(2)]
  uninterrupted = [_generate(model, variables, batch, k)['tokens']
                   for k in keys]
  resumed = _generate(model, variables, batch, keys[1])['tokens']
  np.testing.assert_array_equal(resumed, uninterrupted[1])
  assert not np.array_equal(uninterrupted[0], uninterrupted[1])


@pytest.mark.parametrize('settings', [dict(temperature=0.0), SAMPLING],
                         ids=['greedy', 'top_k_top_p'])
def test_the_cache_samples_what_recomputing_the_prefix_samples(
    tiny, batch, settings):
  model, variables = tiny
  key = jax.random.key(3)
  cached = _generate(model, variables, batch, key, **settings)
  uncached = _generate(model, variables, batch, key, use_cache=False,
                       **settings)
  np.testing.assert_array_equal(cached['tokens'], uncached['tokens'])
  np.testing.assert_array_equal(cached['mask'], uncached['mask'])
  if settings['temperature'] == 0:  # Each token is the model's argmax.
    logits = model.apply(variables, cached['tokens'])
    np.testing.assert_array_equal(
        cached['tokens'][:, PROMPT:],
        logits[:, PROMPT - 1:-1].argmax(-1))


def test_samples_do_not_depend_on_how_the_batch_is_sharded(tiny, batch):
  model, variables = tiny
  mesh = jax.make_mesh((jax.device_count(),), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  sharded = {k: jax.device_put(batch[k], NamedSharding(mesh, P('data')))
             for k in ('inputs', 'mask')}
  key = jax.random.key(1)
  np.testing.assert_array_equal(_generate(model, variables, sharded, key)[
      'tokens'], _generate(model, variables, batch, key)['tokens'])


def test_the_completion_batch_grades_only_generated_tokens(tiny, batch):
  out = _generate(*tiny, batch, jax.random.key(1))
  scored = generation.completion_batch(out)
  assert scored['inputs'].shape == (8, PROMPT + COMPLETION - 1)
  np.testing.assert_array_equal(scored['targets'][:, :-1],
                                scored['inputs'][:, 1:])
  np.testing.assert_array_equal(
      np.asarray(scored['targets'])[np.asarray(scored['mask'])].reshape(
          8, COMPLETION), out['tokens'][:, PROMPT:])


def test_generate_refuses_lengths_it_cannot_serve_by_name(tiny, batch):
  model, variables = tiny
  run = lambda **lengths: generation.generate(
      model, variables, batch['inputs'], batch['mask'], jax.random.key(0),
      **lengths)
  with pytest.raises(ValueError, match='prompt_length=13'):
    run(prompt_length=13, completion_length=2)
  with pytest.raises(ValueError, match='completion_length=0'):
    run(prompt_length=4, completion_length=0)
  with pytest.raises(ValueError, match='block_size=32'):
    run(prompt_length=4, completion_length=29)


def _speed_script():
  spec = importlib.util.spec_from_file_location('generation_speed',
                                                SPEED_SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def test_the_benchmarks_pytorch_decoder_computes_what_the_jax_one_does(
    tmp_path):
  pytest.importorskip('torch')
  script = _speed_script()
  setting = script.setting(tiny=True, batch_sizes='')
  reference = str(tmp_path / 'reference.npz')
  script.write_reference(setting, reference)
  _, check = script.load_torch_decoder(setting, reference)
  assert check['max_abs_logit'] > 0.1  # Logits that a wrong weight would move.
  assert check['forward_max_abs_diff'] < 1e-5
  assert check['cache_max_abs_diff'] < 1e-5
  assert check['greedy_tokens_equal'] == 1.0


def test_the_speed_benchmark_runs_tiny_and_writes_its_record(tmp_path):
  pytest.importorskip('torch')
  out = tmp_path / 'results.json'
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, SPEED_SCRIPT, '--tiny', f'--out={out}'], cwd=REPO,
      env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert f'wrote {out}' in result.stdout
  record = json.loads(out.read_text())
  assert record['tiny'] and record['setting']['batch_sizes'] == [2]
  assert set(record['round_seconds']) == {
      'jax cache 2', 'jax no_cache 2', 'torch cache 2'}
  for times in record['round_seconds'].values():
    assert len(times) == record['rounds']
    assert all(math.isfinite(t) and t > 0 for t in times)
  assert record['check']['forward_max_abs_diff'] <= record['tolerance']
  assert '| 2 |' in record['table'] and record['table'] in result.stdout
