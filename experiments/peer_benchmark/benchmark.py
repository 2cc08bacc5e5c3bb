r"""kd_jax's train step against the PyTorch loop users would write instead.

  pip install -e '.[bench]'    # PyTorch, CPU build; never a test dependency
  python experiments/peer_benchmark/benchmark.py             # ~5 min, 2 cores
  python experiments/peer_benchmark/benchmark.py --tiny      # seconds
  python experiments/peer_benchmark/benchmark.py --pairs=cifar --threads=2

For each teacher/student pair and each program (`student`: a supervised step
of the student; `teacher`: the frozen teacher's forward; `kd`: the
distillation step; `kd_minimal`: the least a JAX KD step must do, written
directly, against the same PyTorch KD step) there are two sides, each in
its own worker process:

* kd_jax: the real `kd_jax.train.train_step`, jitted with the state donated
  and replicated outputs as `train_and_evaluate` builds it, with the online
  teacher that `kd_jax.teachers.load_online` restores (random weights, from a
  checkpoint this script writes); the pair's optimizer, temperature and alpha
  come from its config in configs/.
* PyTorch: eager float32, written here after RepDistiller's `train_distill`
  (Tian et al. 2020): teacher forward under `no_grad` in eval mode, student
  forward, `alpha * T^2 * KL(teacher || student at T) + (1 - alpha) * CE`,
  SGD with the config's momentum and weight decay, then top-1 accuracy and
  `loss.item()` for the meters, as that loop does each step. The CIFAR
  ResNets follow RepDistiller's models/resnet.py (NCHW).

Both workers are pinned to the same `--threads` CPUs (sched_setaffinity, so
XLA sizes its thread pool to them) and PyTorch runs `--threads` intra-op
threads. After warm-up (compiles on the kd_jax side) they run `--steps` steps
in turn, `--rounds` times, the side that goes first alternating by round, so
that both see the same load on a shared machine. A round's time is the median
of its steps; the ratio kd_jax / PyTorch is taken per round and printed as
median [min-max] over rounds. The two workers of a pair serve all three
programs; each builds and warms up the KD step first, and its max RSS
(`resource.getrusage`) at that point is the peak memory of a process that
ran the KD step only (runtime and imports included), shown on the kd row.
Same random batch every step; the labels are random. With `kd` and
`kd_minimal` both measured, a last line per pair gives kd_jax's KD step over
the minimal one, per round: what kd_jax's own bookkeeping costs.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import resource
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import benchlib  # pylint: disable=g-import-not-at-top,wrong-import-position

PROGRAMS = ('student', 'teacher', 'kd', 'kd_minimal')


@dataclasses.dataclass(frozen=True)
class Pair:
  name: str
  config: str                 # configs/<config>.py, role distill.
  image_shape: tuple[int, int, int]   # NHWC; PyTorch gets NCHW.
  num_classes: int
  batch_size: int


def pairs(tiny: bool) -> dict[str, Pair]:
  if tiny:
    return {
        'mlp': Pair('mlp 2x1200 -> 2x800', 'mnist5k_distill', (8, 8, 1), 10,
                    16),
        'cifar': Pair('resnet32x4 -> resnet8x4', 'cifar100_crd', (16, 16, 3),
                      100, 4),
    }
  return {
      'mlp256': Pair('mlp 2x1200 -> 2x800', 'mnist5k_distill', (28, 28, 1),
                     10, 256),
      'mlp128': Pair('mlp 2x1200 -> 2x800', 'mnist5k_distill', (28, 28, 1),
                     10, 128),
      'cifar': Pair('resnet32x4 -> resnet8x4', 'cifar100_crd', (32, 32, 3),
                    100, 64),
  }




def random_batch(pair: Pair):
  import numpy as np  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  return dict(
      image=rng.standard_normal((pair.batch_size, *pair.image_shape),
                                np.float32),
      label=rng.integers(0, pair.num_classes, pair.batch_size).astype(
          np.int32),
      mask=np.ones(pair.batch_size, bool))


def load_pair_config(pair: Pair, teacher_workdir: str):
  from kd_jax import config_lib  # pylint: disable=g-import-not-at-top
  config = config_lib.load_config(pair.config,
                                  f'teacher_workdir={teacher_workdir}')
  config.batch_size = pair.batch_size
  return config


# --------------------------------------------------------------------------
# kd_jax side.
# --------------------------------------------------------------------------


def jax_program(pair: Pair, program: str, workdir: str):
  """A no-argument function that runs one step of `program` and blocks."""
  import functools  # pylint: disable=g-import-not-at-top
  import importlib.util  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding  # pylint: disable=g-import-not-at-top
  from jax.sharding import PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from kd_jax import models  # pylint: disable=g-import-not-at-top
  from kd_jax import teachers  # pylint: disable=g-import-not-at-top
  from kd_jax import train  # pylint: disable=g-import-not-at-top

  # The train-step benchmark owns "a finished teacher run with random
  # weights"; it is loaded by path (experiments/ is not a package).
  spec = importlib.util.spec_from_file_location(
      'train_step_benchmark', os.path.join(
          os.path.dirname(__file__), '..', 'train_step', 'benchmark.py'))
  train_step_benchmark = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = train_step_benchmark
  spec.loader.exec_module(train_step_benchmark)

  config = load_pair_config(pair, workdir)
  devices = jax.devices()[:1]
  mesh = jax.make_mesh((1,), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  replicated = NamedSharding(mesh, P())
  batch = {k: jax.device_put(v, NamedSharding(mesh, P('data')))
           for k, v in random_batch(pair).items()}
  train_step_benchmark.write_teacher_run(workdir, config, pair.num_classes,
                                         pair.image_shape)
  teacher = teachers.load_online(config.teachers, pair.num_classes,
                                 pair.image_shape)
  teacher_variables = jax.device_put(teacher.variables, replicated)
  if program == 'teacher':
    forward = jax.jit(teacher.forward, out_shardings=replicated)
    return lambda: jax.block_until_ready(forward(teacher_variables, batch))

  if program == 'student':
    config.distill.teacher_source = 'none'
    config.distill.alpha = 0.0
    teacher = None
  model = models.get_model(config.model, pair.num_classes)
  tx, schedule = train.make_optimizer(config, total_steps=10_000)
  state = jax.jit(functools.partial(train.init_state, model, tx,
                                    image_shape=pair.image_shape,
                                    distill=config.distill,
                                    num_classes=pair.num_classes),
                  out_shardings=replicated)(jax.random.key(0))
  step = jax.jit(functools.partial(
      train.train_step, model=model, tx=tx, schedule=schedule,
      teacher=teacher, distill=config.distill),
                 out_shardings=(replicated, replicated), donate_argnums=0)
  if program == 'kd_minimal':
    step = jax.jit(functools.partial(
        minimal_kd_step, model=model, tx=tx, teacher=teacher,
        temperature=config.distill.temperature, alpha=config.distill.alpha),
                   out_shardings=(replicated, replicated), donate_argnums=0)
  holder = [state]
  # A step between logging steps, as most of a run's steps are.
  extra = () if program == 'kd_minimal' else (False,)

  def run():
    holder[0], measurements = step(holder[0], batch, teacher_variables,
                                   *extra)
    jax.block_until_ready((holder[0], measurements))
  return run


def minimal_kd_step(state, batch, teacher_variables, *, model, tx, teacher,
                    temperature, alpha):
  """The least a KD step must do, written directly in JAX: the same teacher
  forward, student forward and backward, `alpha * T^2 * KL + (1 - alpha) *
  CE`, and the same optimizer update; nothing measured but the loss."""
  import jax  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top
  teacher_logits = jax.lax.stop_gradient(
      teacher.forward(teacher_variables, batch))
  rng = jax.random.fold_in(state.rng, state.step)

  def loss_fn(params):
    logits, new_model_state = model.apply(
        {'params': params, 'batch_stats': state.batch_stats},
        batch['image'], train=True, rngs={'dropout': rng},
        mutable=['batch_stats'])
    log_p = jax.nn.log_softmax(teacher_logits / temperature)
    log_q = jax.nn.log_softmax(logits / temperature)
    soft = temperature ** 2 * (jax.numpy.exp(log_p) * (log_p - log_q)).sum(
        -1).mean()
    hard = optax.softmax_cross_entropy_with_integer_labels(
        logits, batch['label']).mean()
    return alpha * soft + (1 - alpha) * hard, new_model_state

  (loss, new_model_state), grads = jax.value_and_grad(
      loss_fn, has_aux=True)(state.params)
  updates, opt_state = tx.update(grads, state.opt_state['student'],
                                 state.params)
  return state.replace(step=state.step + 1,
                       params=optax.apply_updates(state.params, updates),
                       opt_state={'student': opt_state},
                       batch_stats=new_model_state.get('batch_stats', {})), loss


# --------------------------------------------------------------------------
# PyTorch side, after RepDistiller (models/resnet.py, train_distill).
# --------------------------------------------------------------------------


def torch_models(config, num_classes: int, image_shape):
  """(student, teacher) torch modules for the pair's model specs."""
  import torch  # pylint: disable=g-import-not-at-top
  from torch import nn  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top

  class MLP(nn.Module):

    def __init__(self, hidden, dropout, input_dropout):
      super().__init__()
      layers, width = [nn.Flatten(), nn.Dropout(input_dropout)], 1
      for d in image_shape:
        width *= d
      for h in hidden:
        layers += [nn.Linear(width, h), nn.ReLU(), nn.Dropout(dropout)]
        width = h
      layers.append(nn.Linear(width, num_classes))
      self.net = nn.Sequential(*layers)

    def forward(self, x):
      return self.net(x)

  class BasicBlock(nn.Module):

    def __init__(self, inplanes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.downsample = None
      if stride != 1 or inplanes != planes:
        self.downsample = nn.Sequential(
            nn.Conv2d(inplanes, planes, 1, stride, bias=False),
            nn.BatchNorm2d(planes))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = self.bn2(self.conv2(out))
      residual = x if self.downsample is None else self.downsample(x)
      return F.relu(out + residual)

  class ResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 with basic blocks (RepDistiller's)."""

    def __init__(self, depth, filters):
      super().__init__()
      n = (depth - 2) // 6
      self.conv1 = nn.Conv2d(3, filters[0], 3, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(filters[0])
      blocks, inplanes = [], filters[0]
      for stage, planes in enumerate(filters[1:]):
        for i in range(n):
          blocks.append(BasicBlock(inplanes, planes,
                                   2 if stage > 0 and i == 0 else 1))
          inplanes = planes
      self.blocks = nn.Sequential(*blocks)
      self.fc = nn.Linear(inplanes, num_classes)
      for m in self.modules():
        if isinstance(m, nn.Conv2d):
          nn.init.kaiming_normal_(m.weight, mode='fan_out',
                                  nonlinearity='relu')

    def forward(self, x):
      x = self.blocks(F.relu(self.bn1(self.conv1(x))))
      return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))

  def build(spec):
    if spec.name == 'mlp':
      return MLP(spec.hidden, spec.get('dropout', 0.0),
                 spec.get('input_dropout', 0.0))
    resnets = {'resnet8x4': (8, (32, 64, 128, 256)),
               'resnet32x4': (32, (32, 64, 128, 256))}
    if spec.name not in resnets:
      raise ValueError(f'no PyTorch model for {spec.name!r} here; add it '
                       'to torch_models().')
    return ResNet(*resnets[spec.name])

  return build(config.model), build(config.teachers[0].model)


def torch_program(pair: Pair, program: str, threads: int, workdir: str):
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(threads)
  config = load_pair_config(pair, workdir)
  student, teacher = torch_models(config, pair.num_classes, pair.image_shape)
  host = random_batch(pair)
  image = torch.from_numpy(host['image']).permute(0, 3, 1, 2).contiguous()
  label = torch.from_numpy(host['label']).long()
  temperature, alpha = config.distill.temperature, config.distill.alpha
  optimizer = torch.optim.SGD(student.parameters(), lr=config.learning_rate,
                              momentum=config.momentum,
                              weight_decay=config.weight_decay,
                              nesterov=config.nesterov)
  teacher.eval()
  if program == 'teacher':
    def forward():
      with torch.no_grad():
        teacher(image)
    return forward

  def step():
    student.train()
    logits = student(image)
    loss = F.cross_entropy(logits, label)
    if program in ('kd', 'kd_minimal'):
      with torch.no_grad():
        teacher_logits = teacher(image)
      # RepDistiller's DistillKL: batchmean KL at T, times T^2.
      soft = F.kl_div(F.log_softmax(logits / temperature, dim=1),
                      F.softmax(teacher_logits / temperature, dim=1),
                      reduction='sum') * temperature ** 2 / logits.shape[0]
      loss = alpha * soft + (1 - alpha) * loss
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    (logits.argmax(1) == label).float().mean().item()
    loss.item()
  return step


# --------------------------------------------------------------------------
# Workers and the interleaved rounds.
# --------------------------------------------------------------------------


def worker(args) -> int:
  """Builds the programs (kd first), then answers `run PROGRAM N` / `quit`."""
  benchlib.pin(args.threads)
  pair = pairs(args.tiny)[args.pair]
  start = time.perf_counter()
  runs, kd_peak = {}, None
  with tempfile.TemporaryDirectory() as workdir:
    for program in sorted(args.program.split(','), key=lambda p: p != 'kd'):
      if args.worker == 'jax':
        runs[program] = jax_program(pair, program, os.path.join(workdir,
                                                                program))
      else:
        runs[program] = torch_program(pair, program, args.threads, workdir)
      for _ in range(args.warmup):
        runs[program]()
      if program == 'kd':  # The peak of a process that ran the KD step only.
        kd_peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(dict(ready=time.perf_counter() - start)), flush=True)
    for line in sys.stdin:
      if not line.startswith('run'):
        break
      _, program, steps = line.split()
      times = []
      for _ in range(int(steps)):
        t = time.perf_counter()
        runs[program]()
        times.append(time.perf_counter() - t)
      print(json.dumps(dict(times=times)), flush=True)
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
  print(json.dumps(dict(peak_rss=peak, kd_peak_rss=kd_peak)), flush=True)
  return 0


def start_worker(side: str, key: str, args):
  flags = [f'--worker={side}', f'--pair={key}', f'--program={args.programs}',
           f'--threads={args.threads}', f'--warmup={args.warmup}']
  return benchlib.start_worker(__file__, flags + ['--tiny'] * args.tiny)




def measure(key: str, args) -> list[dict]:
  """Rounds of every program of one pair; both sides' workers start at once."""
  procs = {side: start_worker(side, key, args) for side in ('jax', 'torch')}
  ready = {side: benchlib.reply(p)['ready'] for side, p in procs.items()}
  programs = args.programs.split(',')
  rounds = {(side, p): [] for side in procs for p in programs}
  for r in range(args.rounds):
    order = ('jax', 'torch') if r % 2 == 0 else ('torch', 'jax')
    for program in programs:
      for side in order:
        procs[side].stdin.write(f'run {program} {args.steps}\n')
        procs[side].stdin.flush()
        rounds[side, program].append(
            statistics.median(benchlib.reply(procs[side])['times']))
  peaks = {}
  for side, p in procs.items():
    p.stdin.write('quit\n')
    p.stdin.flush()
    peaks[side] = benchlib.reply(p)
    p.wait()
  out = []
  for program in programs:
    seconds = {side: rounds[side, program] for side in procs}
    out.append(dict(
        pair=key, program=program, ready_seconds=ready, round_seconds=seconds,
        ratios=[j / t for j, t in zip(seconds['jax'], seconds['torch'])],
        peak_rss={side: peaks[side]['kd_peak_rss' if program == 'kd'
                                    else 'peak_rss'] for side in procs}))
  return out


def spread(values) -> str:
  return (f'{statistics.median(values):.2f} '
          f'[{min(values):.2f}-{max(values):.2f}]')


def table(results, all_pairs) -> str:
  head = ('| pair | batch | program | kd_jax ms | PyTorch ms | kd_jax / '
          'PyTorch, median [min-max] | KD process peak RSS, kd_jax / PyTorch '
          '(MiB) |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in results:
    pair = all_pairs[r['pair']]
    jax_ms = 1e3 * statistics.median(r['round_seconds']['jax'])
    torch_ms = 1e3 * statistics.median(r['round_seconds']['torch'])
    mib = {s: v / 2 ** 20 for s, v in r['peak_rss'].items()}
    memory = (f"{mib['jax']:.0f} / {mib['torch']:.0f} = "
              f"{mib['jax'] / mib['torch']:.2f}" if r['program'] == 'kd'
              else '')
    lines.append(
        f"| {pair.name} | {pair.batch_size} | {r['program']} | "
        f"{jax_ms:.1f} | {torch_ms:.1f} | {spread(r['ratios'])} | "
        f"{memory} |")
  for key in dict.fromkeys(r['pair'] for r in results):
    mine = {r['program']: r['round_seconds']['jax'] for r in results
            if r['pair'] == key}
    if 'kd' in mine and 'kd_minimal' in mine:
      lines.append(
          f"\n{all_pairs[key].name}, batch {all_pairs[key].batch_size}: "
          f"kd_jax's KD step / the minimal JAX KD step (same teacher, "
          f"student, loss and optimizer, nothing measured), per round: "
          f"{spread([k / m for k, m in zip(mine['kd'], mine['kd_minimal'])])}")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='tiny shapes, few rounds: a seconds-long check')
  parser.add_argument('--pairs', default='',
                      help='comma-separated keys (mlp256, mlp128, cifar; '
                      'mlp, cifar with --tiny); default all')
  parser.add_argument('--programs', default=','.join(PROGRAMS),
                      help='comma-separated: student, teacher, kd, '
                      'kd_minimal (a bare JAX KD step; its PyTorch side is '
                      'the KD step)')
  parser.add_argument('--threads', type=int, default=1,
                      help='CPUs each side is pinned to and PyTorch threads')
  parser.add_argument('--rounds', type=int, default=None)
  parser.add_argument('--steps', type=int, default=None,
                      help='steps per round per side')
  parser.add_argument('--warmup', type=int, default=2)
  parser.add_argument('--out', default=os.path.join(
      tempfile.gettempdir(), 'kd_jax_peer_benchmark.json'))
  parser.add_argument('--worker', choices=('jax', 'torch'), default=None,
                      help=argparse.SUPPRESS)
  parser.add_argument('--pair', default=None, help=argparse.SUPPRESS)
  parser.add_argument('--program', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.worker:
    return worker(args)
  args.rounds = args.rounds or (2 if args.tiny else 5)
  args.steps = args.steps or (2 if args.tiny else 5)
  all_pairs = pairs(args.tiny)
  keys = [k for k in (args.pairs.split(',') if args.pairs else all_pairs)
          if k]
  unknown = [k for k in keys if k not in all_pairs]
  if unknown:
    raise SystemExit(f'--pairs: unknown {unknown}; choose from '
                     f'{list(all_pairs)}.')
  print(f'{args.threads} thread(s) per side; {args.rounds} rounds of '
        f'{args.steps} steps; load average {os.getloadavg()[0]:.1f}',
        flush=True)
  results = []
  for key in keys:
    results += measure(key, args)
    # Each pair's rows as soon as they are measured: a cut-short run keeps them.
    print(table(results[-len(args.programs.split(',')):], all_pairs),
          file=sys.stderr, flush=True)
  text = table(results, all_pairs)
  print(text)
  with open(args.out, 'w') as f:
    json.dump(dict(threads=args.threads, rounds=args.rounds,
                   steps=args.steps, tiny=args.tiny,
                   load_average=list(os.getloadavg()), results=results,
                   table=text), f, indent=2)
  print(f'wrote {args.out}; load average {os.getloadavg()[0]:.1f}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
