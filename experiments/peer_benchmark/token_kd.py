r"""kd_jax's token KD step against a nanoGPT-style PyTorch loop.

  pip install -e '.[bench]'    # PyTorch, CPU build; never a test dependency
  python experiments/peer_benchmark/token_kd.py              # 1 and 2 threads
  python experiments/peer_benchmark/token_kd.py --threads=2
  python experiments/peer_benchmark/token_kd.py --tiny       # seconds, a check

The pair is experiments/token_kd's: teacher `decoder` 4 x 128 (4 heads,
834,304 params), student 2 x 48 (2 heads, 72,000 params), vocabulary 256,
windows of 64, batch 32, with the study's config (configs/
shakespeare_char.py, role distill: alpha 0.5, T = 1, forward KL; AdamW at
lr 1e-3, weight decay 0.1, clip 1.0, 100 warm-up steps then cosine).
Programs, each side in its own worker process:

* `kd`: kd_jax's `lm_train.lm_step`, jitted as `train_and_evaluate` builds
  it (state donated, outputs replicated, one device) with the online
  teacher, against a nanoGPT-style PyTorch step: the learning rate set for
  the step, the teacher in eval mode under `no_grad`, the student's
  forward, `(1 - alpha) CE + alpha T^2 KL(teacher || student)` as token
  means, `backward`, `clip_grad_norm_(1.0)`, `AdamW.step`,
  `zero_grad(set_to_none=True)`.
* `kd_minimal`: the least a JAX token KD step must do, written here (the
  same teacher and student forward, the same loss as plain token means,
  the same optax update; no mask, no measurements), against the same
  PyTorch KD step. `kd` over it is what lm_step's own work costs (the
  mask, the loss terms, accuracy, the gradient norm).
* `student` and `student_minimal`: the same without the teacher (lm_step of
  a student trained from scratch, alpha 0; and the bare CE step), against
  the PyTorch step without the teacher.

The PyTorch decoder is nanoGPT's layout with kd_jax's decoder's names
(`experiments/generation_speed/run.py`'s weight copy applies): pre-LN
blocks, one biased qkv projection, `scaled_dot_product_attention(
is_causal=True)`, tanh GELU MLP of 4x, learned positions, tied output
layer; eager float32, no `torch.compile`, AdamW's default (per-tensor)
implementation on CPU as nanoGPT picks it there, every parameter decayed as
kd_jax's optax.adamw decays them.

Before timing, PyTorch is checked against JAX on the same weights (the
JAX initialisation copied into torch) and the same batch: the loss of the
first `--warmup` KD steps on each side must agree within `--tolerance`.

Both workers are pinned to the same `--threads` CPUs (sched_setaffinity, so
XLA sizes its thread pool to them) and PyTorch runs `--threads` intra-op
threads. After warm-up (compiles on the JAX side) the two workers run
`--steps` steps of each program in turn, `--rounds` times, the side that
goes first alternating by round, so both see the same load. A round's time
is the median of its steps; tokens/s is batch x length over it; the ratio
kd_jax / PyTorch (time per token) is per round, median [min-max]. So is
the ratio of CPU time per step (`time.process_time`, all of a process's
threads): at one thread it measures the work whatever share of a core the
load left the process (a descheduled process accrues none); at two it also
counts threads that spin while they wait. Peak
memory is each worker's max RSS right after it built and warmed up the KD
step (built first): a process that ran the KD step only, runtime included.
The same random batch every step. Results go to `--out` (default
token_kd_results.json here) with versions, `ENVIRONMENT`, and `uptime`
before and after each thread count.

On a shared machine, run it with `OMP_WAIT_POLICY=PASSIVE`: PyTorch's
OpenMP threads otherwise spin at every barrier of every op, and when the
other thread of the pair is descheduled its two-thread steps take 5-10x
as long (README).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import types

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(os.path.dirname(HERE))
PROGRAMS = ('kd', 'kd_minimal', 'student', 'student_minimal')
# What the workers inherit that changes their speed (recorded).
ENVIRONMENT = ('OMP_WAIT_POLICY', 'OMP_NUM_THREADS', 'XLA_FLAGS')
# The PyTorch step each JAX program is compared with.
TORCH_PROGRAM = {'kd': 'kd', 'kd_minimal': 'kd', 'student': 'student',
                 'student_minimal': 'student'}


def _load(name: str, *path: str):
  """A script of experiments/ by path (experiments/ is not a package)."""
  spec = importlib.util.spec_from_file_location(name, os.path.join(REPO,
                                                                   *path))
  module = importlib.util.module_from_spec(spec)
  sys.modules[name] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


@dataclasses.dataclass(frozen=True)
class Setting:
  """What both sides need, as plain values (the PyTorch worker imports no
  kd_jax)."""
  teacher: dict               # decoder fields: width, depth, num_heads, ...
  student: dict
  vocab_size: int
  length: int
  batch_size: int
  temperature: float
  alpha: float
  learning_rate: float
  warmup_steps: int
  total_steps: int
  weight_decay: float
  grad_clip_norm: float

  @property
  def tokens(self) -> int:
    return self.batch_size * self.length


TINY_MODELS = dict(
    teacher=dict(name='decoder', width=32, depth=2, num_heads=2,
                 block_size=16, dropout=0.1),
    student=dict(name='decoder', width=16, depth=1, num_heads=2,
                 block_size=16, dropout=0.0))


def study_config(tiny: bool):
  """(the distilled student's config, the teacher's model spec) of
  experiments/token_kd (--tiny: smaller models, batch 4, windows of 16)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  token_kd = _load('token_kd_study', 'experiments', 'token_kd', 'run.py')
  args = types.SimpleNamespace(steps=2000, teacher_steps=3000, tiny=False)
  teacher, student = token_kd.TEACHER, token_kd.STUDENT
  fields = {}
  if tiny:
    teacher, student = TINY_MODELS['teacher'], TINY_MODELS['student']
    fields = {'length': 16, 'batch_size': 4,
              **{f'model.{k}': v for k, v in student.items()}}
  config = token_kd.config('distill', args, **fields)
  if config.optimizer != 'adamw' or config.distill.divergence != 'kl':
    raise ValueError(f'the PyTorch step here is AdamW with the forward KL; '
                     f'the study now uses {config.optimizer} and '
                     f'{config.distill.divergence}: update torch_step().')
  return config, ml_collections.ConfigDict(teacher)


def make_setting(tiny: bool) -> Setting:
  config, teacher = study_config(tiny)
  def model_fields(spec):
    return {k: spec[k] for k in ('width', 'depth', 'num_heads', 'block_size')}
  return Setting(
      teacher=model_fields(teacher), student=model_fields(config.model),
      vocab_size=config.vocab_size, length=config.length,
      batch_size=config.batch_size, temperature=config.distill.temperature,
      alpha=config.distill.alpha, learning_rate=config.learning_rate,
      warmup_steps=config.warmup_steps, total_steps=config.num_train_steps,
      weight_decay=config.weight_decay,
      grad_clip_norm=config.grad_clip_norm)


def random_tokens(s: Setting):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return rng.integers(0, s.vocab_size, (s.batch_size, s.length + 1)).astype(
      np.int32)






# --------------------------------------------------------------------------
# JAX side.
# --------------------------------------------------------------------------


def jax_programs(tiny: bool, reference: str, warmup: int):
  """({program: a no-argument call that runs one step and blocks}, info).

  Builds and warms up `kd` first; writes the initial weights, the batch and
  the warm-up steps' KD losses to `reference` (.npz) for the PyTorch check.
  """
  import functools  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from kd_jax import lm_train  # pylint: disable=g-import-not-at-top
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top

  config, teacher_spec = study_config(tiny)
  mesh = jax.make_mesh((1,), ('data',), devices=jax.devices()[:1],
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  tokens = random_tokens(make_setting(tiny))
  host = dict(inputs=tokens[:, :-1], targets=tokens[:, 1:],
              mask=np.ones(tokens[:, 1:].shape, bool))
  batch = {k: jax.device_put(v, NamedSharding(mesh, P('data')))
           for k, v in host.items()}
  model = models.get_model(config.model, config.vocab_size)
  teacher = models.get_model(teacher_spec, config.vocab_size)
  teacher_params = jax.jit(teacher.init, out_shardings=replicated)(
      jax.random.key(1), tokens[:1, :-1])['params']
  tx, _ = train.make_optimizer(config, config.num_train_steps)
  init, _ = lm_train._abstract_state(model, tx, config)  # pylint: disable=protected-access
  init = jax.jit(init, out_shardings=replicated)
  student_distill = config.distill.copy_and_resolve_references()
  student_distill.alpha = 0.0
  steps = {
      'kd': functools.partial(lm_train.lm_step, model=model,
                              teacher_model=teacher, tx=tx,
                              distill=config.distill),
      'student': functools.partial(lm_train.lm_step, model=model,
                                   teacher_model=None, tx=tx,
                                   distill=student_distill),
      'kd_minimal': functools.partial(
          minimal_step, model=model, teacher_model=teacher, tx=tx,
          temperature=config.distill.temperature,
          alpha=config.distill.alpha),
      'student_minimal': functools.partial(
          minimal_step, model=model, teacher_model=None, tx=tx,
          temperature=1.0, alpha=0.0),
  }
  programs, losses = {}, []
  for program, step in steps.items():
    step = jax.jit(step, out_shardings=(replicated, replicated),
                   donate_argnums=0)
    holder = [init(jax.random.key(config.seed))]
    if program == 'kd':
      weights = {
          f'{role}/' + '/'.join(k.key for k in path): np.asarray(v)
          for role, tree in (('student', holder[0]['params']),
                             ('teacher', teacher_params))
          for path, v in jax.tree_util.tree_leaves_with_path(
              jax.device_get(tree))}

    def run(step=step, holder=holder):
      holder[0], measurements = step(holder[0], batch, teacher_params)
      return jax.block_until_ready(measurements)
    programs[program] = run
    for _ in range(warmup):
      measurements = run()
      if program == 'kd':
        losses.append(float(measurements['loss_total']))
    if program == 'kd':
      np.savez(reference, tokens=tokens, kd_losses=np.asarray(losses),
               **weights)
      kd_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  return programs, dict(versions={'jax': jax.__version__,
                                  'jaxlib': importlib.metadata.version(
                                      'jaxlib')},
                        kd_losses=losses, kd_peak_rss=kd_peak)


def minimal_step(state, batch, teacher_params, *, model, teacher_model, tx,
                 temperature, alpha):
  """The least a token KD step must do, written directly in JAX: the
  teacher's forward, the student's forward and backward, `(1 - alpha) CE +
  alpha T^2 KL` as plain token means, the optax update; nothing measured
  but the loss. Without `teacher_model`, the CE step."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  if teacher_model is not None:
    teacher_logits = jax.lax.stop_gradient(teacher_model.apply(
        {'params': teacher_params}, batch['inputs']))

  def loss_fn(params):
    logits = model.apply({'params': params}, batch['inputs'])
    loss = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['targets']).mean()
    if teacher_model is not None:
      log_p = jax.nn.log_softmax(teacher_logits / temperature)
      log_q = jax.nn.log_softmax(logits / temperature)
      soft = temperature ** 2 * (jax.numpy.exp(log_p) * (log_p - log_q)).sum(
          -1).mean()
      loss = alpha * soft + (1 - alpha) * loss
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(state['params'])
  updates, opt_state = tx.update(grads, state['opt_state'], state['params'])
  return dict(state, step=state['step'] + 1,
              params=optax.apply_updates(state['params'], updates),
              opt_state=opt_state), loss


# --------------------------------------------------------------------------
# PyTorch side: nanoGPT's model and training loop, with a teacher.
# --------------------------------------------------------------------------


def torch_decoder(spec: dict, vocab_size: int):
  """nanoGPT's GPT with kd_jax's decoder's names: `model(tokens)` -> logits
  [B, L, V]."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  width, heads = spec['width'], spec['num_heads']

  class Block(nn.Module):

    def __init__(self):
      super().__init__()
      self.ln1 = nn.LayerNorm(width, eps=1e-5)
      self.qkv = nn.Linear(width, 3 * width)
      self.out = nn.Linear(width, width)
      self.ln2 = nn.LayerNorm(width, eps=1e-5)
      self.fc = nn.Linear(width, 4 * width)
      self.proj = nn.Linear(4 * width, width)

    def forward(self, x):
      batch, length, _ = x.shape
      q, k, v = self.qkv(self.ln1(x)).split(width, dim=2)
      q, k, v = (t.view(batch, length, heads, -1).transpose(1, 2)
                 for t in (q, k, v))
      y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
      y = y.transpose(1, 2).contiguous().view(batch, length, width)
      x = x + self.out(y)
      return x + self.proj(F.gelu(self.fc(self.ln2(x)), approximate='tanh'))

  class Decoder(nn.Module):

    def __init__(self):
      super().__init__()
      self.embed = nn.Embedding(vocab_size, width)
      self.pos_embed = nn.Parameter(torch.zeros(spec['block_size'], width))
      self.blocks = nn.ModuleList(Block() for _ in range(spec['depth']))
      self.ln_f = nn.LayerNorm(width, eps=1e-5)

    def forward(self, tokens):
      x = self.embed(tokens) + self.pos_embed[:tokens.shape[1]]
      for block in self.blocks:
        x = block(x)
      return self.ln_f(x) @ self.embed.weight.T  # Tied (Press & Wolf).

  return Decoder()


def learning_rate(s: Setting, step: int) -> float:
  """The config's schedule as nanoGPT's get_lr computes it per iteration:
  optax's linear warm-up from 0, then cosine decay to 0."""
  if step < s.warmup_steps:
    return s.learning_rate * step / s.warmup_steps
  decay_steps = max(s.total_steps - s.warmup_steps, 1)
  progress = min(step - s.warmup_steps, decay_steps) / decay_steps
  return s.learning_rate * 0.5 * (1 + math.cos(math.pi * progress))


def torch_programs(s: Setting, reference: str, threads: int, warmup: int):
  """({'kd', 'student': a no-argument call that runs one step}, info);
  checks the KD step against JAX's losses in `reference` on its weights."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  generation_speed = _load('generation_speed', 'experiments',
                           'generation_speed', 'run.py')
  with np.load(reference) as arrays:
    arrays = dict(arrays)

  def load(role: str):
    spec = getattr(s, role)
    model = torch_decoder(spec, s.vocab_size)
    generation_speed.load_jax_weights(
        model, types.SimpleNamespace(**spec),
        {f'params/{k[len(role) + 1:]}': v for k, v in arrays.items()
         if k.startswith(f'{role}/')})
    return model

  tokens = torch.from_numpy(arrays['tokens']).long()
  inputs, targets = tokens[:, :-1], tokens[:, 1:]
  teacher = load('teacher').eval()
  temperature, alpha = s.temperature, s.alpha

  def make_step(with_teacher: bool):
    student = load('student').train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=s.learning_rate,
                                  betas=(0.9, 0.999), eps=1e-8,
                                  weight_decay=s.weight_decay)
    it = [0]

    def step():
      for group in optimizer.param_groups:
        group['lr'] = learning_rate(s, it[0])
      logits = student(inputs)
      flat = logits.view(-1, logits.shape[-1])
      loss = F.cross_entropy(flat, targets.reshape(-1))
      if with_teacher:
        with torch.no_grad():
          teacher_logits = teacher(inputs)
        soft = F.kl_div(
            F.log_softmax(flat / temperature, dim=-1),
            F.log_softmax(teacher_logits.view_as(flat) / temperature, dim=-1),
            reduction='batchmean', log_target=True) * temperature ** 2
        loss = (1 - alpha) * loss + alpha * soft
      loss.backward()
      torch.nn.utils.clip_grad_norm_(student.parameters(), s.grad_clip_norm)
      optimizer.step()
      optimizer.zero_grad(set_to_none=True)
      it[0] += 1
      return loss.detach()
    return step

  programs = {'kd': make_step(True)}
  losses = [float(programs['kd']()) for _ in range(warmup)]
  kd_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  programs['student'] = make_step(False)
  for _ in range(warmup):
    programs['student']()
  jax_losses = arrays['kd_losses']
  check = dict(jax_kd_losses=jax_losses.tolist(), torch_kd_losses=losses,
               max_abs_loss_diff=float(np.abs(np.asarray(losses)
                                              - jax_losses).max()))
  return programs, dict(versions={'torch': torch.__version__}, check=check,
                        kd_peak_rss=kd_peak)


# --------------------------------------------------------------------------
# Workers and the interleaved rounds.
# --------------------------------------------------------------------------


def worker(args) -> int:
  """Builds its programs (kd first), then answers `run PROGRAM N` / `quit`."""
  threads = int(args.threads)
  benchlib.pin(threads)
  start = time.perf_counter()
  if args.worker == 'jax':
    programs, info = jax_programs(args.tiny, args.reference, args.warmup)
  else:
    s = Setting(**json.loads(args.setting))
    programs, info = torch_programs(s, args.reference, threads,
                                    args.warmup)
  print(json.dumps(dict(info, ready=time.perf_counter() - start)),
        flush=True)
  for line in sys.stdin:
    if not line.startswith('run'):
      break
    _, program, steps = line.split()
    times, cpu_times = [], []
    for _ in range(int(steps)):
      t, c = time.perf_counter(), time.process_time()
      programs[program]()
      times.append(time.perf_counter() - t)
      cpu_times.append(time.process_time() - c)
    print(json.dumps(dict(times=times, cpu_times=cpu_times)), flush=True)
  return 0


def start_worker(side: str, s: Setting, reference: str, threads: int, args):
  flags = [f'--worker={side}', f'--reference={reference}',
           f'--threads={threads}', f'--warmup={args.warmup}',
           f'--setting={json.dumps(dataclasses.asdict(s))}']
  return benchlib.start_worker(__file__, flags + ['--tiny'] * args.tiny)




def uptime() -> str:
  return subprocess.run(['uptime'], capture_output=True, text=True,
                        check=False).stdout.strip()


def measure(s: Setting, threads: int, args) -> dict:
  """Both workers at `threads` CPUs: the check, then `--rounds` rounds."""
  before = uptime()
  with tempfile.TemporaryDirectory() as tmp:
    reference = os.path.join(tmp, 'reference.npz')
    # JAX first: it writes the weights and losses the PyTorch side checks.
    procs = {'jax': start_worker('jax', s, reference, threads, args)}
    info = {'jax': benchlib.reply(procs['jax'])}
    procs['torch'] = start_worker('torch', s, reference, threads, args)
    info['torch'] = benchlib.reply(procs['torch'])
  check = info['torch']['check']
  print(f'{threads} thread(s): KD loss over the {args.warmup} warm-up steps, '
        f'JAX {check["jax_kd_losses"]}, PyTorch {check["torch_kd_losses"]}: '
        f'max |diff| {check["max_abs_loss_diff"]:.2g}', file=sys.stderr,
        flush=True)
  if not check['max_abs_loss_diff'] <= args.tolerance:
    for p in procs.values():
      p.kill()
    raise SystemExit(f'PyTorch\'s KD loss differs from JAX\'s by '
                     f'{check["max_abs_loss_diff"]:.3g} > --tolerance='
                     f'{args.tolerance}: the two steps do not compute the '
                     'same thing; nothing was timed.')
  rounds = {f'{side} {p}': [] for p in PROGRAMS for side in procs}
  cpu_rounds = {k: [] for k in rounds}
  for r in range(args.rounds):
    order = ('jax', 'torch') if r % 2 == 0 else ('torch', 'jax')
    for program in PROGRAMS:
      for side in order:
        name = program if side == 'jax' else TORCH_PROGRAM[program]
        procs[side].stdin.write(f'run {name} {args.steps}\n')
        procs[side].stdin.flush()
        answer = benchlib.reply(procs[side])
        rounds[f'{side} {program}'].append(statistics.median(answer['times']))
        cpu_rounds[f'{side} {program}'].append(
            statistics.median(answer['cpu_times']))
  for p in procs.values():
    p.stdin.write('quit\n')
    p.stdin.flush()
    p.wait()
  return dict(threads=threads, uptime_before=before, uptime_after=uptime(),
              ready_seconds={k: v['ready'] for k, v in info.items()},
              kd_peak_rss={k: v['kd_peak_rss'] for k, v in info.items()},
              versions={**info['jax']['versions'],
                        **info['torch']['versions']},
              check=check, round_seconds=rounds,
              round_cpu_seconds=cpu_rounds)


def spread(values) -> str:
  return (f'{statistics.median(values):.2f} '
          f'[{min(values):.2f}-{max(values):.2f}]')


def table(s: Setting, results: list[dict]) -> str:
  head = ('| threads | program | kd_jax ms/step | PyTorch ms/step | kd_jax '
          'tokens/s | PyTorch tokens/s | kd_jax / PyTorch time per token, '
          'median [min-max] | kd_jax / PyTorch CPU time per step | KD '
          'process peak RSS, kd_jax / PyTorch (MiB) |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  notes = []
  for r in results:
    seconds, cpu = r['round_seconds'], r['round_cpu_seconds']
    for program in PROGRAMS:
      jax_s, torch_s = seconds[f'jax {program}'], seconds[f'torch {program}']
      jax_c, torch_c = cpu[f'jax {program}'], cpu[f'torch {program}']
      jax_t, torch_t = statistics.median(jax_s), statistics.median(torch_s)
      mib = {k: v / 2 ** 20 for k, v in r['kd_peak_rss'].items()}
      memory = (f"{mib['jax']:.0f} / {mib['torch']:.0f} = "
                f"{mib['jax'] / mib['torch']:.2f}" if program == 'kd' else '')
      lines.append(
          f"| {r['threads']} | {program} (PyTorch: "
          f"{TORCH_PROGRAM[program]}) | {1e3 * jax_t:.1f} | "
          f"{1e3 * torch_t:.1f} | {s.tokens / jax_t:,.0f} | "
          f"{s.tokens / torch_t:,.0f} | "
          f"{spread([j / t for j, t in zip(jax_s, torch_s)])} | "
          f"{spread([j / t for j, t in zip(jax_c, torch_c)])} | {memory} |")
    for full, bare in (('kd', 'kd_minimal'), ('student', 'student_minimal')):
      per_round = [a / b for a, b in zip(seconds[f'jax {full}'],
                                          seconds[f'jax {bare}'])]
      notes.append(f"{r['threads']} thread(s): kd_jax's {full} step / the "
                   f"minimal JAX {full} step, per round: {spread(per_round)}")
  return '\n'.join(lines + [''] + notes)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='tiny decoders, batch 4, windows of 16: a check')
  parser.add_argument('--threads', default='1,2',
                      help='comma-separated: CPUs each side is pinned to and '
                      'PyTorch threads, one pair of workers per value')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None,
                      help='steps per round per side and program')
  parser.add_argument('--warmup', type=int, default=3,
                      help='steps before timing; the KD ones are checked')
  parser.add_argument('--tolerance', type=float, default=1e-5,
                      help='largest |PyTorch - JAX| KD loss allowed')
  parser.add_argument('--out', default=os.path.join(HERE,
                                                    'token_kd_results.json'))
  parser.add_argument('--worker', choices=('jax', 'torch'), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--reference', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--setting', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)
  args.rounds = args.rounds or (2 if args.tiny else 5)
  args.steps = args.steps or (2 if args.tiny else 10)
  s = make_setting(args.tiny)
  print(f'teacher {s.teacher}, student {s.student}, batch {s.batch_size} x '
        f'{s.length} tokens; {args.rounds} rounds of {args.steps} steps; '
        f'{uptime()}', flush=True)
  print(', '.join(f'{k}={os.environ.get(k)}' for k in ENVIRONMENT),
        flush=True)
  results = []
  for threads in (int(t) for t in args.threads.split(',')):
    results.append(measure(s, threads, args))
    print(table(s, results[-1:]), file=sys.stderr, flush=True)
  text = table(s, results)
  print(text)
  record = dict(
      setting=dataclasses.asdict(s), tokens_per_step=s.tokens,
      rounds=args.rounds, steps=args.steps, warmup=args.warmup,
      tiny=args.tiny, machine=dict(cpu=benchlib.cpu_name(), cpus=os.cpu_count(),
                                   python=platform.python_version()),
      environment={k: os.environ.get(k) for k in ENVIRONMENT},
      results=results, table=text)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.out}; {uptime()}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
