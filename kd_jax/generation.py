"""Completions of transfer-text prompts, sampled by a decoder (student or teacher).

On-policy and sequence-level distillation (GKD, Agarwal et al. 2024;
DistiLLM, Ko et al. 2024; Kim & Rush 2016) train on text that a model
generates from prompts. Here a prompt is the first `prompt_length` tokens of
each window of a text batch (`kd_jax.data.text`: `inputs` [B, L] and `mask`
[B, L]), and the model continues it by `completion_length` tokens with the
key-value cache sampler of `kd_jax.models.decoder` (one `lax.scan` step per
token), or, as a reference, by recomputing the prefix each step.

`generate` is pure and jitted: the samples are a function of (variables,
prompts, key, settings) alone, so a resumed run that derives its key as the
uninterrupted one did (e.g. `jax.random.fold_in(rng, step)`) generates the
same text. `completion_batch` turns its output into a batch in the text
stream's layout whose targets are the completion's tokens.
"""

from collections.abc import Mapping
import functools
from typing import Any

import jax
import jax.numpy as jnp

from kd_jax.models import decoder as decoder_lib

__all__ = ['completion_batch', 'generate']


def _check_lengths(tokens: jax.Array, mask: jax.Array, prompt_length: int,
                   completion_length: int) -> None:
  if tokens.ndim != 2 or mask.shape != tokens.shape:
    raise ValueError('generate takes a text batch\'s inputs and mask, both '
                     f'[batch, length]; got {tokens.shape} and {mask.shape}.')
  if not 1 <= prompt_length <= tokens.shape[1]:
    raise ValueError(f'prompt_length={prompt_length} must be in [1, the '
                     f'window length {tokens.shape[1]}]: the prompt is a '
                     'prefix of each window.')
  if completion_length < 1:
    raise ValueError(f'completion_length={completion_length} must be >= 1.')


@functools.partial(jax.jit, static_argnames=(
    'model', 'prompt_length', 'completion_length', 'temperature', 'top_k',
    'top_p', 'use_cache'))
def generate(model: decoder_lib.Decoder, variables: Mapping[str, Any],
             tokens: jax.Array, mask: jax.Array, key: jax.Array, *,
             prompt_length: int, completion_length: int,
             temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, use_cache: bool = True
             ) -> dict[str, jax.Array]:
  """Continues the first `prompt_length` tokens of each window.

  Args:
    model: the `Decoder` that samples (the student, or the teacher).
    variables: its variables ({'params': ...}).
    tokens: int [B, L], a text batch's `inputs`.
    mask: bool [B, L], the batch's `mask`. A row generates for training only
      if the mask is True over its whole prompt (every prompt token is text
      and has a successor); other rows (an eval pass's padding rows, a last
      window shorter than the prompt) are sampled too, for static shapes,
      but their completion is masked.
    key: the sampling key; token t of every completion is drawn with
      `jax.random.fold_in(key, t)`.
    prompt_length: P, tokens of each window kept as the prompt, 1 <= P <= L.
    completion_length: C, tokens generated per row; P + C <= block_size.
    temperature: softmax temperature; 0 is greedy (the argmax).
    top_k: sample among the k most likely tokens (None: all).
    top_p: nucleus sampling mass (None: off).
    use_cache: sample with the key-value cache (`decoder.sample`); False
      recomputes the whole prefix for every token
      (`decoder.sample_without_cache`), the same samples, slower.

  Returns:
    `tokens`: int32 [B, P + C], each row's prompt followed by its
    completion; `mask`: bool [B, P + C], True on the completion's positions
    of the rows that generate.

  >>> model = decoder_lib.decoder_tiny(num_classes=32)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  >>> inputs = jnp.arange(16).reshape(2, 8)
  >>> out = generate(model, variables, inputs, jnp.ones((2, 8), bool),
  ...                jax.random.key(1), prompt_length=3, completion_length=5)
  >>> out['tokens'].shape, out['mask'][0].tolist()
  ((2, 8), [False, False, False, True, True, True, True, True])
  >>> out['tokens'][:, :3].tolist()
  [[0, 1, 2], [8, 9, 10]]
  """
  _check_lengths(tokens, mask, prompt_length, completion_length)
  prompt = tokens[:, :prompt_length].astype(jnp.int32)
  sample = decoder_lib.sample if use_cache else (
      decoder_lib.sample_without_cache)
  completion = sample(model, variables, prompt, key,
                      num_tokens=completion_length, temperature=temperature,
                      top_k=top_k, top_p=top_p)
  generates = jnp.all(mask[:, :prompt_length], axis=1)
  completion_mask = jnp.broadcast_to(generates[:, None], completion.shape)
  return {
      'tokens': jnp.concatenate([prompt, completion], axis=1),
      'mask': jnp.concatenate(
          [jnp.zeros(prompt.shape, bool), completion_mask], axis=1),
  }


def completion_batch(generated: Mapping[str, jax.Array]
                     ) -> dict[str, jax.Array]:
  """`generate`'s output as a text batch whose targets are the completion.

  Returns `inputs` and `targets` int32 [B, P + C - 1] (`targets` the next
  token of each input position) and `mask` bool [B, P + C - 1], True where
  the target is a generated token: the prompt's last position and the
  completion's, but the last. A model scored on it sees the prompt as
  context and is graded on the completion only.

  >>> generated = {'tokens': jnp.array([[5, 6, 7, 8]]),
  ...              'mask': jnp.array([[False, False, True, True]])}
  >>> batch = completion_batch(generated)
  >>> batch['inputs'].tolist(), batch['targets'].tolist()
  ([[5, 6, 7]], [[6, 7, 8]])
  >>> batch['mask'].tolist()
  [[False, True, True]]
  """
  tokens = generated['tokens']
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:],
          'mask': generated['mask'][:, 1:]}
