r"""Generation speed: the student decoder sampling with and without its
key-value cache, and the same decoder as a PyTorch module with a key-value
cache in a Python loop.

  pip install -e '.[bench]'      # PyTorch, CPU build; never a test dependency
  python experiments/generation_speed/run.py                  # 1 thread
  python experiments/generation_speed/run.py --threads=2
  python experiments/generation_speed/run.py --tiny           # seconds

The model is `decoder_small`'s architecture (4 blocks of width 96, 4 heads,
vocabulary 256), its learned positions extended to the prompt and the
completion (`block_size` = P + C), with random weights (the decoder's
initialisation: throughput does not depend on the values). Each row of a
batch is a window of random tokens; the first P are the prompt.

Three programs generate C tokens per row at temperature 1 from the full
softmax, each in its own worker process:

* `jax cache`: `kd_jax.generation.generate` (jitted; prefill the prompt,
  then one `lax.scan` step per token on the key-value cache).
* `jax no cache`: the same with `use_cache=False` (every step recomputes
  the whole [B, P + C] buffer).
* `torch cache`: the decoder written here as a PyTorch module, its weights
  copied from the JAX model's, with a preallocated key-value cache per block
  (`scaled_dot_product_attention` on the filled part), called once per token
  from a Python loop under `torch.inference_mode()`, each token drawn with
  `torch.multinomial`: the loop nanoGPT's users add a cache to.

Before timing, the PyTorch module is checked against JAX: its logits on a
whole sequence and its cached logits along JAX's greedy completion (fed one
token at a time) must equal JAX's within `--tolerance`; its own greedy
completion is compared token by token and reported.

Both workers are pinned to the same `--threads` CPUs (sched_setaffinity, so
XLA sizes its thread pool to them) and PyTorch runs `--threads` intra-op
threads. After compiling and a warm-up call, the parent asks each program in
turn, `--rounds` times, for as many calls as fill `--seconds` (at least
one), the side that goes first alternating by round, so that both see the
same load. A round's time is the median of its calls; tokens/s is B * C over
it; the ratios (no cache over cache; JAX's cache over PyTorch's) are taken
per round and printed as median [min-max].
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

SIDES = {'jax': ('cache', 'no_cache'), 'torch': ('cache',)}


@dataclasses.dataclass(frozen=True)
class Setting:
  vocab_size: int
  width: int
  depth: int
  num_heads: int
  prompt_length: int
  completion_length: int
  batch_sizes: tuple[int, ...]

  @property
  def block_size(self) -> int:
    return self.prompt_length + self.completion_length


def setting(tiny: bool, batch_sizes: str) -> Setting:
  if tiny:
    return Setting(32, 16, 2, 2, 4, 8, (2,))
  sizes = tuple(int(b) for b in batch_sizes.split(','))
  return Setting(256, 96, 4, 4, 32, 128, sizes)






# --------------------------------------------------------------------------
# JAX: the model, the reference the PyTorch module is checked against, and
# the timed programs.
# --------------------------------------------------------------------------


def jax_model(s: Setting):
  from kd_jax.models import decoder  # pylint: disable=g-import-not-at-top
  return decoder.decoder(s.vocab_size, width=s.width, depth=s.depth,
                         num_heads=s.num_heads, block_size=s.block_size)


def write_reference(s: Setting, path: str) -> None:
  """Writes the JAX weights and the logits PyTorch must reproduce (.npz)."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax.models import decoder  # pylint: disable=g-import-not-at-top
  model = jax_model(s)
  variables = jax.jit(model.init)(jax.random.key(0),
                                  jnp.zeros((1, 8), jnp.int32))
  tokens = jax.random.randint(jax.random.key(1), (2, s.block_size), 0,
                              s.vocab_size)
  prompt = tokens[:, :s.prompt_length]
  greedy, greedy_logits = decoder.sample(
      model, variables, prompt, jax.random.key(2),
      num_tokens=s.completion_length, temperature=0.0, return_logits=True)
  flat = {'/'.join(k.key for k in path): np.asarray(v) for path, v in
          jax.tree_util.tree_leaves_with_path(variables['params'])}
  np.savez(path, **{f'params/{k}': v for k, v in flat.items()},
           tokens=np.asarray(tokens),
           logits=np.asarray(jax.jit(model.apply)(variables, tokens)),
           greedy=np.asarray(greedy), greedy_logits=np.asarray(greedy_logits))


def jax_programs(s: Setting, reference: str) -> tuple[dict, dict]:
  """{(program, batch): a no-argument call that generates and blocks}."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax import generation  # pylint: disable=g-import-not-at-top
  model = jax_model(s)
  with np.load(reference) as arrays:
    flat = {k[len('params/'):]: arrays[k] for k in arrays.files
            if k.startswith('params/')}
  params = {}
  for name, value in flat.items():
    *parents, leaf = name.split('/')
    node = params
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value)
  variables = {'params': params}
  programs = {}
  for batch_size in s.batch_sizes:
    tokens = jax.random.randint(jax.random.key(batch_size),
                                (batch_size, s.block_size), 0, s.vocab_size)
    mask = jnp.ones(tokens.shape, bool)
    for program in SIDES['jax']:
      calls = [0]

      def run(program=program, tokens=tokens, mask=mask, calls=calls):
        calls[0] += 1
        out = generation.generate(
            model, variables, tokens, mask, jax.random.key(calls[0]),
            prompt_length=s.prompt_length,
            completion_length=s.completion_length, temperature=1.0,
            use_cache=program == 'cache')
        jax.block_until_ready(out)
      programs[program, batch_size] = run
  return programs, {'jax': jax.__version__}


# --------------------------------------------------------------------------
# PyTorch: the same decoder with a key-value cache, and its Python loop.
# --------------------------------------------------------------------------


def torch_decoder(s: Setting):
  """The decoder as a torch module: `model(tokens, cache, start)`."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln1 = nn.LayerNorm(s.width, eps=1e-5)
      self.qkv = nn.Linear(s.width, 3 * s.width)
      self.out = nn.Linear(s.width, s.width)
      self.ln2 = nn.LayerNorm(s.width, eps=1e-5)
      self.fc = nn.Linear(s.width, 4 * s.width)
      self.proj = nn.Linear(4 * s.width, s.width)

    def forward(self, x, cache, start):
      batch, length, _ = x.shape
      qkv = self.qkv(self.ln1(x)).view(batch, length, 3, s.num_heads, -1)
      query, key, value = qkv.permute(2, 0, 3, 1, 4)  # 3 x [B, H, L, Dh]
      keys, values = cache
      keys[:, :, start:start + length] = key
      values[:, :, start:start + length] = value
      end = start + length
      # A prompt from position 0 attends causally; one token, to all before.
      y = F.scaled_dot_product_attention(
          query, keys[:, :, :end], values[:, :, :end],
          is_causal=length > 1)
      y = y.transpose(1, 2).reshape(batch, length, s.width)
      x = x + self.out(y)
      return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate='tanh'))

  class Decoder(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(s.vocab_size, s.width)
      self.pos_embed = nn.Parameter(torch.zeros(s.block_size, s.width))
      self.blocks = nn.ModuleList(Block() for _ in range(s.depth))
      self.ln_f = nn.LayerNorm(s.width, eps=1e-5)

    def empty_cache(self, batch: int):
      shape = (batch, s.num_heads, s.block_size, s.width // s.num_heads)
      return [(torch.zeros(shape), torch.zeros(shape)) for _ in self.blocks]

    def forward(self, tokens, cache, start: int):
      if start and tokens.shape[1] > 1:
        raise ValueError('after the prompt, one token per call')
      x = self.embed(tokens) + self.pos_embed[start:start + tokens.shape[1]]
      for block, block_cache in zip(self.blocks, cache):
        x = block(x, block_cache, start)
      return self.ln_f(x) @ self.embed.weight.T

  return Decoder()


def load_jax_weights(model, s: Setting, arrays) -> None:
  """Copies the JAX params (flattened 'a/b/c' names) into the torch module."""
  import torch  # pylint: disable=g-import-not-at-top
  get = lambda name: torch.from_numpy(arrays[f'params/{name}'])
  state = {'embed.weight': get('embed/embedding'),
           'pos_embed': get('pos_embed')}
  for name in ('ln_f',):
    state[f'{name}.weight'] = get(f'{name}/scale')
    state[f'{name}.bias'] = get(f'{name}/bias')
  for i in range(s.depth):
    jax_block, block = f'layer{i + 1}', f'blocks.{i}'
    for ln in ('ln1', 'ln2'):
      state[f'{block}.{ln}.weight'] = get(f'{jax_block}/{ln}/scale')
      state[f'{block}.{ln}.bias'] = get(f'{jax_block}/{ln}/bias')
    # Flax kernels are [in, out] (qkv [D, 3, H, Dh], out [H, Dh, D]);
    # torch.nn.Linear weights are [out, in].
    state[f'{block}.qkv.weight'] = get(f'{jax_block}/attn/qkv/kernel').reshape(
        s.width, 3 * s.width).T
    state[f'{block}.qkv.bias'] = get(f'{jax_block}/attn/qkv/bias').reshape(-1)
    state[f'{block}.out.weight'] = get(f'{jax_block}/attn/out/kernel').reshape(
        s.width, s.width).T
    state[f'{block}.out.bias'] = get(f'{jax_block}/attn/out/bias')
    for dense in ('fc', 'proj'):
      state[f'{block}.{dense}.weight'] = get(f'{jax_block}/{dense}/kernel').T
      state[f'{block}.{dense}.bias'] = get(f'{jax_block}/{dense}/bias')
  model.load_state_dict({k: v.contiguous() for k, v in state.items()},
                        strict=True)


def torch_generate(model, prompt, num_tokens: int, *, generator=None,
                   greedy: bool = False, forced=None):
  """The Python loop: prefill, then one token per call on the cache.

  Returns the tokens [B, num_tokens] and the logits they were drawn from.
  `forced` [B, num_tokens] feeds those tokens instead of the drawn ones
  (teacher forcing, for the check).
  """
  import torch  # pylint: disable=g-import-not-at-top
  cache = model.empty_cache(prompt.shape[0])
  logits = model(prompt, cache, 0)[:, -1]
  tokens, all_logits = [], [logits]
  for t in range(num_tokens):
    if greedy:
      token = logits.argmax(-1, keepdim=True)
    else:
      token = torch.multinomial(torch.softmax(logits, -1), 1,
                                generator=generator)
    tokens.append(token)
    if t + 1 < num_tokens:
      fed = token if forced is None else forced[:, t:t + 1]
      logits = model(fed, cache, prompt.shape[1] + t)[:, -1]
      all_logits.append(logits)
  return torch.cat(tokens, 1), torch.stack(all_logits, 1)


def load_torch_decoder(s: Setting, reference: str):
  """The torch module with the reference's JAX weights, and its check: how
  far its logits are from JAX's on a whole sequence and, through its cache,
  along JAX's greedy completion, and the share of its own greedy tokens that
  equal JAX's."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  model = torch_decoder(s).eval()
  with np.load(reference) as arrays:
    load_jax_weights(model, s, arrays)
    ref = {k: arrays[k] for k in ('tokens', 'logits', 'greedy',
                                  'greedy_logits')}
  tokens = torch.from_numpy(ref['tokens']).long()
  prompt = tokens[:, :s.prompt_length]
  with torch.inference_mode():
    logits = model(tokens, model.empty_cache(tokens.shape[0]), 0).numpy()
    _, forced_logits = torch_generate(
        model, prompt, s.completion_length, greedy=True,
        forced=torch.from_numpy(ref['greedy']).long())
    greedy, _ = torch_generate(model, prompt, s.completion_length,
                               greedy=True)
  check = dict(
      max_abs_logit=float(np.abs(ref['logits']).max()),
      forward_max_abs_diff=float(np.abs(logits - ref['logits']).max()),
      cache_max_abs_diff=float(np.abs(forced_logits.numpy()
                                      - ref['greedy_logits']).max()),
      greedy_tokens_equal=float((greedy.numpy() == ref['greedy']).mean()))
  return model, check


def torch_programs(s: Setting, reference: str, threads: int
                   ) -> tuple[dict, dict]:
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  model, check = load_torch_decoder(s, reference)
  programs = {}
  generator = torch.Generator().manual_seed(0)
  for batch_size in s.batch_sizes:
    batch_prompt = torch.randint(0, s.vocab_size,
                                 (batch_size, s.prompt_length),
                                 generator=generator)

    def run(batch_prompt=batch_prompt):
      with torch.inference_mode():
        torch_generate(model, batch_prompt, s.completion_length,
                       generator=generator)
    programs['cache', batch_size] = run
  return programs, dict(torch=torch.__version__, check=check)


# --------------------------------------------------------------------------
# Workers and the interleaved rounds.
# --------------------------------------------------------------------------


def worker(args) -> int:
  """Builds and warms up its programs, then answers `run PROGRAM BATCH S`."""
  benchlib.pin(args.threads)
  s = setting(args.tiny, args.batch_sizes)
  start = time.perf_counter()
  if args.worker == 'jax':
    programs, info = jax_programs(s, args.reference)
  else:
    programs, info = torch_programs(s, args.reference, args.threads)
  for run in programs.values():
    run()  # Compiles (JAX), and warms up.
  print(json.dumps(dict(info, ready=time.perf_counter() - start)),
        flush=True)
  for line in sys.stdin:
    if not line.startswith('run'):
      break
    _, program, batch_size, seconds = line.split()
    run, times = programs[program, int(batch_size)], []
    begin = time.perf_counter()
    while not times or time.perf_counter() - begin < float(seconds):
      t = time.perf_counter()
      run()
      times.append(time.perf_counter() - t)
    print(json.dumps(dict(times=times)), flush=True)
  return 0


def start_worker(side: str, reference: str, args):
  flags = [f'--worker={side}', f'--reference={reference}',
           f'--threads={args.threads}', f'--batch_sizes={args.batch_sizes}']
  return benchlib.start_worker(__file__, flags + ['--tiny'] * args.tiny)




def spread(values) -> str:
  return (f'{statistics.median(values):.2f} '
          f'[{min(values):.2f}-{max(values):.2f}]')


def table(s: Setting, rounds: dict) -> str:
  head = ('| batch | JAX cache tokens/s | JAX no cache tokens/s | PyTorch '
          'cache tokens/s | no cache / cache time | JAX cache / PyTorch '
          'cache time |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for b in s.batch_sizes:
    times = {k: rounds[f'{k[0]} {k[1]} {b}'] for k in
             (('jax', 'cache'), ('jax', 'no_cache'), ('torch', 'cache'))}
    rate = lambda k: b * s.completion_length / statistics.median(times[k])
    per_round = lambda a, c: [x / y for x, y in zip(times[a], times[c])]
    lines.append(
        f"| {b} | {rate(('jax', 'cache')):,.0f} | "
        f"{rate(('jax', 'no_cache')):,.0f} | "
        f"{rate(('torch', 'cache')):,.0f} | "
        f"{spread(per_round(('jax', 'no_cache'), ('jax', 'cache')))} | "
        f"{spread(per_round(('jax', 'cache'), ('torch', 'cache')))} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='a width-16 decoder, batch 2, 8 tokens: a check')
  parser.add_argument('--batch_sizes', default='1,32')
  parser.add_argument('--threads', type=int, default=1,
                      help='CPUs each side is pinned to and PyTorch threads')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--seconds', type=float, default=None,
                      help='least time each program runs per round')
  parser.add_argument('--tolerance', type=float, default=1e-4,
                      help='largest |PyTorch - JAX| logit allowed')
  parser.add_argument('--out', default=os.path.join(
      os.path.dirname(os.path.abspath(__file__)), 'results.json'))
  parser.add_argument('--worker', choices=tuple(SIDES), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--reference', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)
  args.rounds = args.rounds or (2 if args.tiny else 5)
  args.seconds = args.seconds if args.seconds is not None else (
      0.0 if args.tiny else 3.0)
  s = setting(args.tiny, args.batch_sizes)
  load_before = os.getloadavg()
  print(f'{args.threads} thread(s) per side; prompt {s.prompt_length}, '
        f'completion {s.completion_length}; {args.rounds} rounds of >= '
        f'{args.seconds} s; load average {load_before[0]:.1f}', flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    reference = os.path.join(tmp, 'reference.npz')
    write_reference(s, reference)
    procs = {side: start_worker(side, reference, args) for side in SIDES}
    info = {side: benchlib.reply(p) for side, p in procs.items()}
  check = info['torch']['check']
  print('PyTorch against JAX: ' + ', '.join(
      f'{k} {v:.3g}' for k, v in check.items()), flush=True)
  worst = max(check['forward_max_abs_diff'], check['cache_max_abs_diff'])
  if worst > args.tolerance:
    for p in procs.values():
      p.kill()
    raise SystemExit(f'The PyTorch decoder\'s logits differ from JAX\'s by '
                     f'{worst:.3g} > --tolerance={args.tolerance}; nothing '
                     'was timed.')
  rounds = {f'{side} {program} {b}': [] for side, programs in SIDES.items()
            for program in programs for b in s.batch_sizes}
  for r in range(args.rounds):
    order = tuple(SIDES) if r % 2 == 0 else tuple(reversed(SIDES))
    for b in s.batch_sizes:
      for program in ('cache', 'no_cache'):
        for side in order:
          if program not in SIDES[side]:
            continue
          procs[side].stdin.write(f'run {program} {b} {args.seconds}\n')
          procs[side].stdin.flush()
          rounds[f'{side} {program} {b}'].append(
              statistics.median(benchlib.reply(procs[side])['times']))
    print(f'round {r + 1}/{args.rounds}: load average '
          f'{os.getloadavg()[0]:.1f}', file=sys.stderr, flush=True)
  for p in procs.values():
    p.stdin.write('quit\n')
    p.stdin.flush()
    p.wait()
  text = table(s, rounds)
  print(text)
  record = dict(
      setting=dataclasses.asdict(s), threads=args.threads,
      rounds=args.rounds, seconds=args.seconds, tiny=args.tiny,
      machine=dict(cpu=benchlib.cpu_name(), cpus=os.cpu_count(),
                   python=platform.python_version()),
      versions={**{k: v for k, v in info['jax'].items() if k == 'jax'},
                'torch': info['torch']['torch']},
      ready_seconds={side: i['ready'] for side, i in info.items()},
      load_average=dict(before=list(load_before),
                        after=list(os.getloadavg())),
      check=check, tolerance=args.tolerance, round_seconds=rounds,
      table=text)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.out}; load average {os.getloadavg()[0]:.1f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
