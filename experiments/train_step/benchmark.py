r"""Step time, FLOPs and FLOP/s of the student, teacher and distillation steps.

  python experiments/train_step/benchmark.py             # ~15 min, 2 busy cores
  python experiments/train_step/benchmark.py --tiny      # tiny shapes
  python experiments/train_step/benchmark.py --gpu_pair  # + ResNet-34 -> 18

For each teacher/student pair it times, on the local devices (1 device unless
--all_devices), three compiled programs on one random batch:
* `student`: the real `kd_jax.train.train_step`, jitted with the state
  donated exactly as `train_and_evaluate` builds it, without a teacher;
* `teacher`: the online teacher's forward pass alone (inference);
* `kd`: `train_step` with the online teacher inside (teacher forward, student
  forward and backward, loss, optimizer update), from a teacher checkpoint
  that `kd_jax.teachers.load_online` restores (random weights: the cost of a
  step does not depend on their values).
Each time is the median of --repeats runs after --warmup runs, each ended by
`block_until_ready`; the programs of a pair and a dense matmul run
round-robin, so that on a shared machine they see the same mix of load.
FLOPs per step come from XLA's cost analysis of the compiled program
(`jitted.lower(...).compile().cost_analysis()`); for the MLP pair they are
cross-checked against an analytic count of the matmuls. The
machine's dense matmul FLOP/s (an f32 product of two large square matrices
per device, jitted, median after warm-up) is measured in the same run, alone
and alongside each pair, and each program's achieved FLOP/s is given as a
fraction of the matmul FLOP/s measured alongside it. The table also gives
kd / (student + teacher): the cost of running the teacher inside the step
rather than as a separate program.

Results go to stdout as a markdown table and to the JSON file --out names.
experiments/train_step/README.md records the figures on the project's CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import models
from kd_jax import rundir
from kd_jax import teachers
from kd_jax import train


@dataclasses.dataclass(frozen=True)
class Pair:
  """A teacher/student pair: the config it comes from and the batch shapes."""
  name: str
  config: str           # configs/<config>.py, role=distill.
  image_shape: tuple[int, int, int]
  num_classes: int
  batch_size: int


def pairs(tiny: bool, gpu_pair: bool) -> list[Pair]:
  """The measured pairs; --tiny keeps the models and shrinks the shapes."""
  if tiny:
    out = [
        Pair('mlp 2x1200 -> 2x800', 'mnist5k_distill',
             (8, 8, 1), 10, 16),
        Pair('resnet18 -> cnn', 'image_folder', (32, 32, 3), 2, 2),
        Pair('resnet32x4 -> resnet8x4', 'cifar100_crd', (16, 16, 3),
             100, 2),
    ]
    if gpu_pair:
      out.append(Pair('resnet34 -> resnet18 (bf16)',
                      'imagenet_resnet34_resnet18', (32, 32, 3), 1000, 2))
    return out
  out = [
      Pair('mlp 2x1200 -> 2x800', 'mnist5k_distill', (28, 28, 1), 10, 256),
      Pair('resnet18 -> cnn', 'image_folder', (224, 224, 3), 2, 8),
      Pair('resnet32x4 -> resnet8x4', 'cifar100_crd', (32, 32, 3), 100,
           64),
  ]
  if gpu_pair:
    out.append(Pair('resnet34 -> resnet18 (bf16)',
                    'imagenet_resnet34_resnet18', (224, 224, 3), 1000,
                    256))
  return out


def median_seconds(fns: dict[str, Callable[[], Any]], warmup: int,
                   repeats: int) -> dict[str, float]:
  """Median wall time of each fn() (outputs blocked on) after warm-up runs.

  The fns run round-robin, so that on a shared machine they all see the same
  mix of load rather than one of them a quiet minute and another a busy one.
  """
  for fn in fns.values():
    for _ in range(warmup):
      jax.block_until_ready(fn())
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      start = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - start)
  return {name: statistics.median(t) for name, t in times.items()}


def xla_flops(compiled) -> float:
  """FLOPs that XLA's cost analysis counts for one run of a compiled program."""
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):  # Older JAX: one dict per program.
    cost = cost[0]
  return float(cost['flops'])


def matmul_program(mesh, size: int) -> tuple[Callable[[], Any], float, float]:
  """(run, FLOPs, XLA's FLOPs): one f32 size x size matmul per mesh device."""
  n_dev = mesh.devices.size
  sharding = NamedSharding(mesh, P('data'))
  keys = jax.random.split(jax.random.key(0), 2)
  a, b = (jax.device_put(jax.random.normal(k, (n_dev, size, size),
                                           jnp.float32), sharding)
          for k in keys)
  matmul = jax.jit(lambda x, y: jnp.einsum('dij,djk->dik', x, y),
                   out_shardings=sharding)
  compiled = matmul.lower(a, b).compile()
  return (lambda: compiled(a, b)), 2.0 * n_dev * size ** 3, xla_flops(compiled)


def mlp_matmul_flops(pair_config, image_shape, num_classes: int,
                     batch: int) -> dict[str, float]:
  """Analytic matmul FLOPs of the MLP pair: 2 per multiply-add.

  Forward: 2 B sum(in x out). Backward: the weight gradient of every layer
  and the input gradient of every layer but the first (the pixels need none),
  each as many FLOPs as that layer's forward matmul.
  """
  def layer_sizes(spec):
    widths = [math.prod(image_shape), *spec.hidden, num_classes]
    return [i * o for i, o in zip(widths[:-1], widths[1:])]

  student = layer_sizes(pair_config.model)
  teacher = layer_sizes(pair_config.teachers[0].model)
  forward = 2.0 * batch * sum(student)
  backward = 2.0 * batch * (2 * sum(student) - student[0])
  teacher_forward = 2.0 * batch * sum(teacher)
  return dict(student=forward + backward, teacher=teacher_forward,
              kd=forward + backward + teacher_forward)


def write_teacher_run(workdir: str, config, num_classes: int,
                      image_shape) -> None:
  """A finished teacher run (random weights) that load_online can restore."""
  spec = config.teachers[0].model
  model = models.get_model(spec, num_classes)
  variables = model.init(jax.random.key(1),
                         jnp.zeros((1, *image_shape), jnp.float32))
  state = dict(step=jnp.zeros((), jnp.int32), params=variables['params'],
               batch_stats=variables.get('batch_stats', {}),
               opt_state={}, rng=jax.random.key(2))
  mngr = checkpointing.manager(workdir, keep=1)
  checkpointing.save(mngr, state, dict(config_fingerprint='benchmark'))
  mngr.wait_until_finished()
  mngr.close()
  rundir.write_run_info(
      workdir, model_spec=spec, num_classes=num_classes,
      class_names=[str(i) for i in range(num_classes)],
      image_shape=image_shape, dataset=config.dataset, final_step=0)


def random_batch(mesh, image_shape, num_classes: int, batch: int
                 ) -> dict[str, jax.Array]:
  rng = np.random.default_rng(0)
  host = dict(
      image=rng.standard_normal((batch, *image_shape), np.float32),
      label=rng.integers(0, num_classes, batch).astype(np.int32),
      mask=np.ones(batch, bool))
  sharding = NamedSharding(mesh, P('data'))
  return {k: jax.device_put(v, sharding) for k, v in host.items()}


def measure_pair(pair: Pair, mesh, matmul, dtype_override: str | None,
                 warmup: int, repeats: int, workdir: str) -> dict[str, Any]:
  """Times and FLOPs of the student step, teacher forward and KD step.

  `matmul` (from matmul_program) runs round-robin with them: each program's
  FLOP/s is compared with the matmul FLOP/s measured alongside it.
  """
  config = config_lib.load_config(pair.config, f'teacher_workdir={workdir}')
  config.batch_size = pair.batch_size
  if dtype_override:
    config.dtype = dtype_override
  train.validate_config(config)
  dtype = train.DTYPES[config.dtype]
  write_teacher_run(workdir, config, pair.num_classes, pair.image_shape)
  teacher = teachers.load_online(config.teachers, pair.num_classes,
                                 pair.image_shape, dtype=dtype)
  replicated = NamedSharding(mesh, P())
  teacher_variables = jax.device_put(teacher.variables, replicated)

  model = models.get_model(config.model, pair.num_classes, dtype=dtype)
  tx, schedule = train.make_optimizer(config, total_steps=10_000)
  init_fn = jax.jit(functools.partial(train.init_state, model, tx,
                                      image_shape=pair.image_shape),
                    out_shardings=replicated)
  batch = random_batch(mesh, pair.image_shape, pair.num_classes,
                       pair.batch_size)

  supervised = config.distill.copy_and_resolve_references()
  supervised.teacher_source, supervised.alpha = 'none', 0.0

  def step_fn(with_teacher: bool):
    # As train_and_evaluate builds it: one jit, state donated.
    return jax.jit(functools.partial(
        train.train_step, model=model, tx=tx, schedule=schedule,
        teacher=teacher if with_teacher else None,
        distill=config.distill if with_teacher else supervised),
                   out_shardings=(replicated, replicated), donate_argnums=0)

  def compiled_step(with_teacher: bool):
    state = init_fn(jax.random.key(0))
    start = time.perf_counter()
    compiled = step_fn(with_teacher).lower(
        state, batch, teacher_variables).compile()
    compile_seconds = time.perf_counter() - start
    holder = [state]  # Donated each step: always pass the newest state.

    def run():
      holder[0], measurements = compiled(holder[0], batch, teacher_variables)
      return holder[0], measurements
    return run, xla_flops(compiled), compile_seconds

  programs = {'student': compiled_step(False)}
  forward = jax.jit(teacher.forward, out_shardings=replicated)
  start = time.perf_counter()
  compiled_forward = forward.lower(teacher_variables, batch).compile()
  programs['teacher'] = (lambda: compiled_forward(teacher_variables, batch),
                         xla_flops(compiled_forward),
                         time.perf_counter() - start)
  programs['kd'] = compiled_step(True)
  matmul_run, matmul_flops, _ = matmul
  seconds = median_seconds(
      {'matmul': matmul_run, **{k: v[0] for k, v in programs.items()}},
      warmup, repeats)
  peak = matmul_flops / seconds['matmul']
  rows = {}
  for program, (_, flops, compile_seconds) in programs.items():
    rows[program] = dict(
        seconds=seconds[program], flops=flops,
        compile_seconds=compile_seconds,
        examples_per_second=pair.batch_size / seconds[program],
        flops_per_second=flops / seconds[program],
        fraction_of_matmul=flops / seconds[program] / peak)
  if config.model.name == 'mlp':
    analytic = mlp_matmul_flops(config, pair.image_shape, pair.num_classes,
                                pair.batch_size)
    for program, flops in analytic.items():
      rows[program]['analytic_matmul_flops'] = flops
  return dict(
      pair=pair.name, student=config.model.name,
      teacher=config.teachers[0].model.name, dtype=config.dtype,
      optimizer=config.optimizer, batch_size=pair.batch_size,
      image_shape=list(pair.image_shape), num_classes=pair.num_classes,
      matmul_flops_per_second=peak, programs=rows,
      kd_over_student_plus_teacher=rows['kd']['seconds'] / (
          rows['student']['seconds'] + rows['teacher']['seconds']))


def markdown_table(results: list[dict[str, Any]]) -> str:
  head = ('| pair | program | batch | dtype | examples/s | step ms | '
          'GFLOP/step (XLA) | GFLOP/step (analytic) | GFLOP/s | '
          'matmul GFLOP/s | % of matmul | kd / (student + teacher) |')
  lines = [head, '|' + '---|' * (head.count('|') - 1)]
  for r in results:
    for program in ('student', 'teacher', 'kd'):
      p = r['programs'][program]
      analytic = p.get('analytic_matmul_flops')
      ratio = (f"{r['kd_over_student_plus_teacher']:.2f}"
               if program == 'kd' else '')
      lines.append(
          f"| {r['pair']} | {program} | {r['batch_size']} | {r['dtype']} | "
          f"{p['examples_per_second']:.1f} | {p['seconds'] * 1e3:.1f} | "
          f"{p['flops'] / 1e9:.3f} | "
          f"{'' if analytic is None else f'{analytic / 1e9:.3f}'} | "
          f"{p['flops_per_second'] / 1e9:.1f} | "
          f"{r['matmul_flops_per_second'] / 1e9:.1f} | "
          f"{100 * p['fraction_of_matmul']:.0f}% | {ratio} |")
  return '\n'.join(lines)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='tiny shapes and few repeats: a seconds-long check')
  parser.add_argument('--all_devices', action='store_true',
                      help='data-parallel over every local device (default 1)')
  parser.add_argument('--gpu_pair', action='store_true',
                      help='add ResNet-34 -> ResNet-18, 224 px, bfloat16, '
                      'batch 256 (32 px, batch 2 with --tiny)')
  parser.add_argument('--pairs', default='',
                      help='comma-separated substrings of pair names to run')
  parser.add_argument('--dtype', choices=tuple(train.DTYPES), default=None,
                      help="override every pair's config.dtype")
  parser.add_argument('--matmul_size', type=int, default=None)
  parser.add_argument('--warmup', type=int, default=None)
  parser.add_argument('--repeats', type=int, default=None)
  parser.add_argument('--out', default=os.path.join(
      tempfile.gettempdir(), 'kd_jax_train_step_benchmark.json'))
  args = parser.parse_args(argv)
  warmup = args.warmup if args.warmup is not None else (1 if args.tiny else 3)
  repeats = args.repeats or (3 if args.tiny else 10)
  matmul_size = args.matmul_size or (256 if args.tiny else 2048)

  devices = jax.devices() if args.all_devices else jax.devices()[:1]
  mesh = jax.make_mesh((len(devices),), ('data',), devices=devices,
                       axis_types=(jax.sharding.AxisType.Auto,))
  matmul = matmul_program(mesh, matmul_size)
  alone = median_seconds({'matmul': matmul[0]}, warmup, repeats)['matmul']
  print(f'{len(devices)} {devices[0].platform} device(s); dense f32 matmul '
        f'{matmul_size}^2 alone: {matmul[1] / alone / 1e9:.1f} GFLOP/s; load '
        f'average {os.getloadavg()[0]:.1f}', flush=True)

  wanted = [s.strip() for s in args.pairs.split(',') if s.strip()]
  results = []
  for pair in pairs(args.tiny, args.gpu_pair):
    if wanted and not any(w in pair.name for w in wanted):
      continue
    if pair.batch_size % len(devices):
      raise ValueError(f'batch {pair.batch_size} of pair {pair.name!r} does '
                       f'not divide over {len(devices)} devices; drop '
                       f'--all_devices or run fewer devices.')
    with tempfile.TemporaryDirectory() as workdir:
      results.append(measure_pair(pair, mesh, matmul, args.dtype, warmup,
                                  repeats, workdir))
    print(f'measured {pair.name}', file=sys.stderr, flush=True)

  table = markdown_table(results)
  print(table)
  record = dict(
      devices=[str(d) for d in devices], platform=devices[0].platform,
      jax_version=jax.__version__, tiny=args.tiny, warmup=warmup,
      repeats=repeats, load_average=list(os.getloadavg()),
      matmul=dict(size=matmul_size, flops=matmul[1], xla_flops=matmul[2],
                  seconds=alone, flops_per_second=matmul[1] / alone),
      pairs=results, table=table)
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=2)
  print(f'wrote {args.out}')
  return 0


if __name__ == '__main__':
  sys.exit(main())
