"""A decoder-only transformer language model (GPT-2's layout) and its sampler.

Pre-LayerNorm blocks (causal multi-head self-attention with biased q/k/v and
output projections, a GELU MLP of 4x width), learned position embeddings, a
final LayerNorm, and the output layer tied to the token embedding (Press &
Wolf 2017), as GPT-2 and nanoGPT; the vocabulary is bytes or characters
(`vocab_size`, 256 for `kd_jax.datasets`' byte-level text datasets).

`Decoder()(tokens [B, L] int32, train=False)` returns float32 logits
[B, L, V]: position t predicts token t + 1 from tokens 0..t. Params are
float32; `dtype` is the computation dtype (the attention softmax stays
float32). Dropout draws from the 'dropout' rng in train mode.

Named features (`kd_jax.models.features.apply_with_features`): 'block1'...
'blockN', the residual stream [B, L, D] after each block; 'attn1'...'attnN',
each block's attention probabilities [B, H, L, L] (query, key); 'embedding',
the final LayerNorm's output [B, L, D] that the tied head reads.

Generation: `decode=True` runs the model on a key-value cache (the 'cache'
collection, made by `init_cache`): each call appends its tokens (a whole
prompt, or one token) after those already cached and attends to all of them.
`sample` prefills the prompt once, then takes one token per `lax.scan` step;
`sample_without_cache` recomputes the whole prefix each step, the reference
that the cache must reproduce.

Parameter count with width D, depth N, vocabulary V and block size T:
V*D + T*D + N*(12*D^2 + 13*D) + 2*D (each factory's docstring gives its).
"""

from collections.abc import Mapping
import functools
import math
from typing import Any

import flax.linen as nn
import jax
from jax import lax
import jax.numpy as jnp

from kd_jax.models.taps import tap

_INIT = nn.initializers.normal(0.02)


class CausalSelfAttention(nn.Module):
  """Multi-head self-attention where position t attends to positions <= t.

  Returns the output [B, L, D] and the attention probabilities
  [B, H, L, K] (float32; K = L, or the cache length in decode mode).
  """
  num_heads: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, decode: bool
               ) -> tuple[jax.Array, jax.Array]:
    batch, length, width = x.shape
    head_dim = width // self.num_heads
    qkv = nn.DenseGeneral((3, self.num_heads, head_dim), dtype=self.dtype,
                          kernel_init=_INIT, name='qkv')(x)
    # Heads before positions, [B, H, L, Dh]: (batch, head) lead both
    # attention matmuls, as XLA's dot wants, so that a decoding step reads
    # the cache in place instead of transposing all of it in every block.
    query, key, value = jnp.moveaxis(qkv, (2, 3), (0, 2))
    query_positions = jnp.arange(length)
    if decode:
      key, value, offset = self._append_to_cache(key, value)
      query_positions = query_positions + offset
    key_positions = jnp.arange(key.shape[2])
    causal = query_positions[:, None] >= key_positions[None, :]
    scores = jnp.einsum('bhqd,bhkd->bhqk', query, key).astype(jnp.float32)
    scores = scores / math.sqrt(head_dim)
    scores = jnp.where(causal, scores, jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(self.dropout, deterministic=not train)(weights)
    y = jnp.einsum('bhqk,bhkd->bqhd', dropped.astype(self.dtype), value)
    y = nn.DenseGeneral(width, axis=(-2, -1), dtype=self.dtype,
                        kernel_init=_INIT, name='out')(y)
    return y, weights

  def _append_to_cache(self, key: jax.Array, value: jax.Array
                       ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Writes key/value [B, H, L, Dh] at the cache index; returns the whole
    cache and the index the new positions start at."""
    # Initialising (no cache yet) sizes the cache from the input's length.
    initialized = self.has_variable('cache', 'cached_key')
    cached_key = self.variable('cache', 'cached_key', jnp.zeros, key.shape,
                               key.dtype)
    cached_value = self.variable('cache', 'cached_value', jnp.zeros,
                                 value.shape, value.dtype)
    index = self.variable('cache', 'cache_index',
                          lambda: jnp.zeros((), jnp.int32))
    offset = index.value
    if initialized:
      start = (0, 0, offset, 0)
      cached_key.value = lax.dynamic_update_slice(cached_key.value, key, start)
      cached_value.value = lax.dynamic_update_slice(cached_value.value, value,
                                                    start)
      index.value = offset + key.shape[2]
      return cached_key.value, cached_value.value, offset
    return key, value, offset


class DecoderBlock(nn.Module):
  """x + attn(LN(x)), then x + MLP(LN(x)); returns (x, attention probs)."""
  num_heads: int
  mlp_dim: int
  dropout: float
  dtype: Any

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, decode: bool
               ) -> tuple[jax.Array, jax.Array]:
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln1')(x)
    y, weights = CausalSelfAttention(self.num_heads, self.dropout, self.dtype,
                                     name='attn')(y, train, decode)
    x = x + nn.Dropout(self.dropout, deterministic=not train)(y)
    y = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln2')(x)
    y = nn.Dense(self.mlp_dim, dtype=self.dtype, kernel_init=_INIT,
                 name='fc')(y)
    y = nn.Dense(x.shape[-1], dtype=self.dtype, kernel_init=_INIT,
                 name='proj')(nn.gelu(y, approximate=True))
    return x + nn.Dropout(self.dropout, deterministic=not train)(y), weights


class Decoder(nn.Module):
  """Decoder-only transformer LM with tied input/output embeddings.

  Attributes:
    vocab_size: number of token ids (and of logits per position).
    width: residual stream dimension D.
    depth: number of blocks.
    num_heads: attention heads; must divide `width`.
    block_size: longest sequence (learned position embeddings).
    mlp_ratio: MLP hidden width as a multiple of `width`.
    dropout: dropout rate on the embeddings, attention probabilities and
      each residual branch (train mode).
    dtype: computation dtype; params and logits are float32.
  """
  vocab_size: int
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  block_size: int = 128
  mlp_ratio: int = 4
  dropout: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, tokens: jax.Array, train: bool = False,
               decode: bool = False) -> jax.Array:
    if tokens.ndim != 2 or not jnp.issubdtype(tokens.dtype, jnp.integer):
      raise ValueError(f'Decoder takes integer token ids [batch, length]; got '
                       f'{tokens.dtype} {tokens.shape}.')
    if self.width % self.num_heads:
      raise ValueError(f'Decoder num_heads={self.num_heads} must divide '
                       f'width={self.width}.')
    length = tokens.shape[1]
    if length > self.block_size:
      raise ValueError(f'Decoder got {length} tokens per sequence; its '
                       f'block_size is {self.block_size}. Use windows of at '
                       'most block_size tokens, or a larger block_size.')
    embed = nn.Embed(self.vocab_size, self.width, dtype=self.dtype,
                     embedding_init=_INIT, name='embed')
    positions = self.param('pos_embed', _INIT, (self.block_size, self.width))
    start = jnp.zeros((), jnp.int32)
    if decode:  # New tokens continue after those already in the cache.
      index = self.variable('cache', 'position',
                            lambda: jnp.zeros((), jnp.int32))
      start = index.value
      if not self.is_initializing():
        index.value = start + length
    x = embed(tokens) + lax.dynamic_slice_in_dim(
        positions, start, length).astype(self.dtype)
    x = nn.Dropout(self.dropout, deterministic=not train)(x)
    for index in range(1, self.depth + 1):
      x, weights = DecoderBlock(
          self.num_heads, self.mlp_ratio * self.width, self.dropout,
          self.dtype, name=f'layer{index}')(x, train, decode)
      tap(self, f'block{index}', x)
      tap(self, f'attn{index}', weights)
    x = nn.LayerNorm(epsilon=1e-5, dtype=self.dtype, name='ln_f')(x)
    tap(self, 'embedding', x)
    return embed.attend(x).astype(jnp.float32)


def decoder(num_classes: int, dtype: Any = jnp.float32, width: int = 64,
            depth: int = 2, num_heads: int = 4, block_size: int = 128,
            mlp_ratio: int = 4, dropout: float = 0.0) -> Decoder:
  """A `Decoder` from a model spec: `num_classes` is the vocabulary size.

  `kd_jax.models.get_model(spec, num_classes)` passes `num_classes`; for a
  language model it is the number of token ids (256 for bytes), not a count
  of labels.
  """
  return Decoder(vocab_size=num_classes, width=width, depth=depth,
                 num_heads=num_heads, block_size=block_size,
                 mlp_ratio=mlp_ratio, dropout=dropout, dtype=dtype)


def decoder_tiny(num_classes: int, dtype: Any = jnp.float32,
                 block_size: int = 32, dropout: float = 0.0) -> Decoder:
  """Two blocks of width 16, 2 heads: for tests.

  7,616 params at vocabulary 32 and block 32; 11,200 at vocabulary 256.
  """
  return decoder(num_classes, dtype, width=16, depth=2, num_heads=2,
                 block_size=block_size, dropout=dropout)


def decoder_small(num_classes: int, dtype: Any = jnp.float32,
                  block_size: int = 128, dropout: float = 0.0) -> Decoder:
  """The student: 4 blocks of width 96, 4 heads of 24.

  484,416 params at vocabulary 256 (bytes) and block 128: a tenth of
  `decoder_base`.
  """
  return decoder(num_classes, dtype, width=96, depth=4, num_heads=4,
                 block_size=block_size, dropout=dropout)


def decoder_base(num_classes: int, dtype: Any = jnp.float32,
                 block_size: int = 128, dropout: float = 0.0) -> Decoder:
  """The teacher: 6 blocks of width 256, 8 heads of 32.

  4,837,376 params at vocabulary 256 (bytes) and block 128 (nanoGPT's
  character-level Shakespeare model is 6 x 384 with block 256).
  """
  return decoder(num_classes, dtype, width=256, depth=6, num_heads=8,
                 block_size=block_size, dropout=dropout)


def init_cache(model: Decoder, batch_size: int, length: int
               ) -> dict[str, Any]:
  """An empty key-value cache ('cache' collection) for `length` positions.

  Args:
    model: the decoder.
    batch_size: sequences decoded together.
    length: positions the cache holds (prompt and generated tokens); at most
      `model.block_size`.

  Returns:
    The 'cache' collection, zeros, to pass as `{'params': ...,
    'cache': cache}` with `decode=True, mutable=['cache']`.
  """
  if not 1 <= length <= model.block_size:
    raise ValueError(f'A cache of {length} positions does not fit the '
                     f'decoder: its block_size is {model.block_size}.')
  tokens = jax.ShapeDtypeStruct((batch_size, length), jnp.int32)
  shapes = jax.eval_shape(
      lambda t: model.init(jax.random.key(0), t, decode=True), tokens)
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes['cache'])


def _check_sampling(model: Decoder, prompt_tokens: jax.Array, num_tokens: int,
                    temperature: float, top_k: int | None,
                    top_p: float | None) -> None:
  if prompt_tokens.ndim != 2 or prompt_tokens.shape[1] < 1:
    raise ValueError('prompt_tokens must be token ids [batch, length >= 1]; '
                     f'got shape {prompt_tokens.shape}.')
  total = prompt_tokens.shape[1] + num_tokens
  if num_tokens < 1 or total > model.block_size:
    raise ValueError(
        f'num_tokens={num_tokens} after a prompt of {prompt_tokens.shape[1]} '
        f'must be >= 1 and fit in block_size={model.block_size} (the learned '
        'position embeddings end there): shorten the prompt or num_tokens.')
  if temperature < 0:
    raise ValueError(f'temperature={temperature} must be >= 0 (0: greedy).')
  if top_k is not None and not 1 <= top_k <= model.vocab_size:
    raise ValueError(f'top_k={top_k} must be in [1, vocab_size='
                     f'{model.vocab_size}], or None for no limit.')
  if top_p is not None and not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p} must be in (0, 1], or None.')


def sample_logits(logits: jax.Array, key: jax.Array, *,
                  temperature: float = 1.0, top_k: int | None = None,
                  top_p: float | None = None) -> jax.Array:
  """Draws one token id per row of `logits` [..., V].

  temperature 0 is the argmax. Otherwise logits / temperature, restricted to
  the `top_k` largest (exactly k; ties broken by index) and then to the
  smallest set of those whose probabilities sum to >= `top_p` (nucleus
  sampling, Holtzman et al. 2020; the most likely token is always kept).

  >>> logits = jnp.log(jnp.array([[0.5, 0.3, 0.2]]))
  >>> sample_logits(logits, jax.random.key(0), temperature=0.0)
  Array([0], dtype=int32)
  >>> keys = jax.random.split(jax.random.key(0), 100)
  >>> draws = jax.vmap(lambda k: sample_logits(logits, k, top_p=0.6))(keys)
  >>> sorted(set(draws.ravel().tolist()))  # 0.5 < 0.6 <= 0.5 + 0.3
  [0, 1]
  """
  if temperature == 0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits.astype(jnp.float32) / temperature
  if top_k is None and top_p is None:
    return jax.random.categorical(key, logits).astype(jnp.int32)
  values, indices = lax.top_k(logits, top_k or logits.shape[-1])  # Sorted.
  if top_p is not None:
    probs = jax.nn.softmax(values, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    values = jnp.where(mass_before < top_p, values, -jnp.inf)
  choice = jax.random.categorical(key, values)
  return jnp.take_along_axis(indices, choice[..., None], -1)[..., 0].astype(
      jnp.int32)


_STATIC = ('model', 'num_tokens', 'temperature', 'top_k', 'top_p',
           'return_logits')


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample(model: Decoder, variables: Mapping[str, Any],
           prompt_tokens: jax.Array, key: jax.Array, *, num_tokens: int,
           temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, return_logits: bool = False):
  """Continues each prompt by `num_tokens` tokens, with a key-value cache.

  The prompt goes through the model once (filling the cache); then each of
  `num_tokens - 1` `lax.scan` steps feeds the last token and reads one row of
  logits. Token t is drawn with `jax.random.fold_in(key, t)`, so the output
  is a function of (variables, prompt, key) alone.

  Args:
    model: a `Decoder`.
    variables: its variables ({'params': ...}).
    prompt_tokens: int [B, P], P >= 1; P + num_tokens <= model.block_size.
    key: the sampling key.
    num_tokens: tokens to generate per row.
    temperature: softmax temperature; 0 takes the argmax (greedy).
    top_k: sample among the k most likely tokens (None: all).
    top_p: nucleus sampling mass (None: off).
    return_logits: also return the logits each token was drawn from.

  Returns:
    int32 tokens [B, num_tokens], and with `return_logits` the float32
    logits [B, num_tokens, V] (before temperature) they were drawn from.

  >>> model = decoder_tiny(num_classes=32)
  >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))
  >>> prompt = jnp.array([[1, 2, 3], [4, 5, 6]])
  >>> sample(model, variables, prompt, jax.random.key(1), num_tokens=5).shape
  (2, 5)
  """
  _check_sampling(model, prompt_tokens, num_tokens, temperature, top_k, top_p)
  batch, prompt_length = prompt_tokens.shape
  params = {k: v for k, v in variables.items() if k != 'cache'}
  draw = functools.partial(sample_logits, temperature=temperature,
                           top_k=top_k, top_p=top_p)

  def run(cache, tokens):
    logits, updates = model.apply({**params, 'cache': cache}, tokens,
                                  decode=True, mutable=['cache'])
    return logits[:, -1], updates['cache']

  cache = init_cache(model, batch, prompt_length + num_tokens)
  logits, cache = run(cache, prompt_tokens.astype(jnp.int32))
  first = draw(logits, jax.random.fold_in(key, 0))

  def step(carry, t):
    cache, token = carry
    logits, cache = run(cache, token[:, None])
    next_token = draw(logits, jax.random.fold_in(key, t))
    return (cache, next_token), (next_token, logits)

  _, (tokens, step_logits) = lax.scan(step, (cache, first),
                                      jnp.arange(1, num_tokens))
  tokens = jnp.concatenate([first[:, None], tokens.T], axis=1)
  if not return_logits:
    return tokens
  step_logits = jnp.moveaxis(step_logits, 0, 1)
  return tokens, jnp.concatenate([logits[:, None], step_logits], axis=1)


@functools.partial(jax.jit, static_argnames=_STATIC)
def sample_without_cache(model: Decoder, variables: Mapping[str, Any],
                         prompt_tokens: jax.Array, key: jax.Array, *,
                         num_tokens: int, temperature: float = 1.0,
                         top_k: int | None = None, top_p: float | None = None,
                         return_logits: bool = False):
  """`sample` by recomputing the whole prefix for every token (no cache).

  The reference that `sample` must reproduce: same arguments, same keys per
  token, same outputs (up to float rounding in the logits). Each step runs
  the model on a [B, P + num_tokens] buffer whose unfilled tail causal
  attention never reads.
  """
  _check_sampling(model, prompt_tokens, num_tokens, temperature, top_k, top_p)
  batch, prompt_length = prompt_tokens.shape
  buffer = jnp.zeros((batch, prompt_length + num_tokens), jnp.int32)
  buffer = buffer.at[:, :prompt_length].set(prompt_tokens)
  draw = functools.partial(sample_logits, temperature=temperature,
                           top_k=top_k, top_p=top_p)

  def step(buffer, t):
    position = prompt_length + t - 1  # The last filled position.
    logits = model.apply(variables, buffer)[:, position]
    token = draw(logits, jax.random.fold_in(key, t))
    return buffer.at[:, position + 1].set(token), (token, logits)

  _, (tokens, logits) = lax.scan(step, buffer, jnp.arange(num_tokens))
  if not return_logits:
    return tokens.T
  return tokens.T, jnp.moveaxis(logits, 0, 1)
