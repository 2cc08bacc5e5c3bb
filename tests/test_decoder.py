"""The decoder-only transformer: causality, features, sizes, sampling."""

import functools
import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import models
from kd_jax.models import decoder
from kd_jax.models.features import apply_with_features

# Slow (seconds per test): the decoder compiled per case.
pytestmark = pytest.mark.slow

VOCAB = 32
LENGTH = 12


@pytest.fixture(scope='module')
def tiny():
  """decoder_tiny (2 blocks of width 16) at vocabulary 32, and its variables."""
  model = models.get_model({'name': 'decoder_tiny'}, VOCAB)
  variables = jax.jit(model.init)(jax.random.key(0),
                                  jnp.zeros((1, LENGTH), jnp.int32))
  return model, variables


@functools.partial(jax.jit, static_argnums=0)
def _apply(model, variables, tokens):
  return model.apply(variables, tokens)


@pytest.fixture(scope='module')
def tokens():
  return jax.random.randint(jax.random.key(1), (2, LENGTH), 0, VOCAB)


def _reference_count(vocab, width, depth, block):
  """Embeddings, blocks (LN, qkv, out, LN, MLP 4x, with biases), final LN."""
  block_params = (2 * width + 3 * width * width + 3 * width
                  + width * width + width + 2 * width
                  + 4 * width * width + 4 * width + 4 * width * width + width)
  return vocab * width + block * width + depth * block_params + 2 * width


@pytest.mark.parametrize('name,vocab,width,depth,block', [
    ('decoder_tiny', 32, 16, 2, 32),
    ('decoder_tiny', 256, 16, 2, 32),
    ('decoder_small', 256, 96, 4, 128),
    ('decoder_base', 256, 256, 6, 128),
])
def test_parameter_counts_of_the_presets_are_those_their_docstrings_give(
    name, vocab, width, depth, block):
  model = models.get_model({'name': name}, vocab)
  shapes = jax.eval_shape(model.init, jax.random.key(0),
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  expected = _reference_count(vocab, width, depth, block)
  assert models.param_count(shapes['params']) == expected
  assert f'{expected:,}' in inspect.getdoc(models.MODELS[name])


def test_the_student_is_a_tenth_of_the_teacher():
  small, base = (decoder.decoder_small(256), decoder.decoder_base(256))
  count = lambda m: models.param_count(jax.eval_shape(
      m.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 8), jnp.int32)))
  assert 9.5 < count(base) / count(small) < 10.5


def test_get_model_takes_num_classes_as_the_vocabulary_and_spec_kwargs():
  model = models.get_model({'name': 'decoder', 'width': 8, 'depth': 1,
                            'num_heads': 2, 'block_size': 16}, 40)
  assert (model.vocab_size, model.width, model.block_size) == (40, 8, 16)
  assert 'vocab_size' not in models.model_kwargs('decoder')


def test_changing_token_t_never_changes_the_logits_before_t(tiny, tokens):
  model, variables = tiny
  logits = _apply(model, variables, tokens)
  assert logits.shape == (2, LENGTH, VOCAB) and logits.dtype == jnp.float32
  t = 5
  changed = tokens.at[:, t].set((tokens[:, t] + 1) % VOCAB)
  changed_logits = _apply(model, variables, changed)
  np.testing.assert_array_equal(changed_logits[:, :t], logits[:, :t])
  assert np.abs(changed_logits[:, t:] - logits[:, t:]).max(axis=-1).min() > 0


def test_features_are_the_blocks_outputs_and_causal_attention_maps(
    tiny, tokens):
  model, variables = tiny
  logits, features = jax.jit(functools.partial(
      apply_with_features, model, train=False))(variables, tokens)
  assert sorted(features) == ['attn1', 'attn2', 'block1', 'block2',
                              'embedding']
  assert features['block2'].shape == features['embedding'].shape == (
      2, LENGTH, 16)
  attention = features['attn1']
  assert attention.shape == (2, 2, LENGTH, LENGTH)  # [B, heads, query, key]
  np.testing.assert_allclose(attention.sum(-1), 1.0, rtol=1e-6)
  assert not np.triu(np.asarray(attention), k=1).any()
  np.testing.assert_allclose(logits, _apply(model, variables, tokens),
                             atol=1e-6)


def test_dropout_draws_from_the_dropout_rng_in_train_mode_only(tiny, tokens):
  _, variables = tiny
  model = decoder.decoder_tiny(VOCAB, dropout=0.5)
  run = jax.jit(lambda seed: model.apply(
      variables, tokens, train=True, rngs={'dropout': jax.random.key(seed)}))
  np.testing.assert_array_equal(run(1), run(1))
  assert not np.allclose(run(1), run(2))
  np.testing.assert_array_equal(_apply(model, variables, tokens),
                                _apply(tiny[0], variables, tokens))


def test_bfloat16_computation_keeps_float32_params_and_logits(tiny, tokens):
  reference_model, variables = tiny
  model = decoder.decoder_tiny(VOCAB, dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), tokens)
  assert {p.dtype for p in jax.tree.leaves(shapes)} == {np.dtype('float32')}
  logits = _apply(model, variables, tokens)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, _apply(reference_model, variables, tokens),
                             atol=0.05)


def test_decoding_a_prompt_in_pieces_on_the_cache_equals_one_pass(
    tiny, tokens):
  model, variables = tiny

  @jax.jit
  def decode_in_pieces(variables, tokens):
    cache = decoder.init_cache(model, 2, LENGTH)
    pieces = []
    for part in (tokens[:, :5], tokens[:, 5:6], tokens[:, 6:]):
      logits, updates = model.apply({**variables, 'cache': cache}, part,
                                    decode=True, mutable=['cache'])
      cache = updates['cache']
      pieces.append(logits)
    return jnp.concatenate(pieces, axis=1)

  np.testing.assert_allclose(decode_in_pieces(variables, tokens),
                             _apply(model, variables, tokens), atol=1e-5)


@pytest.mark.parametrize('settings', [
    dict(temperature=0.0),
    dict(temperature=0.8, top_k=5, top_p=0.9),
], ids=['greedy', 'top_k_top_p'])
def test_sampling_with_the_cache_equals_recomputing_the_prefix(
    tiny, tokens, settings):
  model, variables = tiny
  prompt, key = tokens[:, :4], jax.random.key(3)
  run = lambda sample: sample(model, variables, prompt, key, num_tokens=8,
                              return_logits=True, **settings)
  cached, cached_logits = run(decoder.sample)
  full, full_logits = run(decoder.sample_without_cache)
  assert cached.shape == (2, 8) and cached.dtype == jnp.int32
  np.testing.assert_array_equal(cached, full)
  np.testing.assert_allclose(cached_logits, full_logits, atol=1e-5)
  # The logits are the model's on the prompt and the drawn tokens.
  sequence = jnp.concatenate([prompt, cached], axis=1)
  np.testing.assert_allclose(cached_logits,
                             _apply(model, variables, sequence)[:, 3:-1],
                             atol=1e-5)
  if settings['temperature'] == 0:
    np.testing.assert_array_equal(cached, cached_logits.argmax(-1))


def test_sampling_is_a_function_of_the_key(tiny, tokens):
  model, variables = tiny
  # The settings of the test above: the program compiled there.
  run = lambda seed: decoder.sample(
      model, variables, tokens[:, :4], jax.random.key(seed), num_tokens=8,
      temperature=0.8, top_k=5, top_p=0.9, return_logits=True)[0]
  np.testing.assert_array_equal(run(0), run(0))
  assert not np.array_equal(run(0), run(1))


def test_top_k_and_top_p_restrict_the_support():
  probs = jnp.array([0.05, 0.4, 0.1, 0.25, 0.2])
  logits = jnp.log(probs)[None]
  keys = jax.random.split(jax.random.key(0), 2000)

  def support(**settings):
    draws = jax.jit(jax.vmap(
        lambda k: decoder.sample_logits(logits, k, **settings)))(keys)
    return set(np.asarray(draws).ravel().tolist())

  assert support() == {0, 1, 2, 3, 4}
  assert support(top_k=2) == {1, 3}
  assert support(top_p=0.6) == {1, 3}  # 0.4 < 0.6 <= 0.4 + 0.25.
  assert support(top_p=0.7) == {1, 3, 4}
  assert support(top_k=2, top_p=0.3) == {1}
  assert support(top_k=1) == support(temperature=0.0) == {1}


def test_sampling_refuses_what_it_cannot_do_by_name(tiny, tokens):
  model, variables = tiny
  sample = functools.partial(decoder.sample, model, variables, tokens[:, :4],
                             jax.random.key(0))
  with pytest.raises(ValueError, match='block_size=32'):
    sample(num_tokens=29)
  with pytest.raises(ValueError, match='top_k=33'):
    sample(num_tokens=2, top_k=33)
  with pytest.raises(ValueError, match='top_p=0'):
    sample(num_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match='block_size is 32'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 33), jnp.int32))
  with pytest.raises(ValueError, match='integer token ids'):
    jax.eval_shape(model.apply, variables, jnp.zeros((1, 4, 4, 1)))
