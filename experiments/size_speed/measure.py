r"""Size and CPU speed of every teacher/student pair of the project's configs.

  python experiments/size_speed/measure.py --train

For each model of the pairs (mnist5k MLPs 2x1200 -> 2x800 and 2x30;
configs/image_folder.py resnet18 -> cnn at 224x224 and 2 classes;
configs/cifar100_crd.py resnet32x4 -> resnet8x4; configs/imagenet_resnet34_resnet18.py
resnet34 -> resnet18) it measures:

* parameters (`kd_jax.models.param_count`) and their float32 bytes
  (`kd_jax.models.param_bytes`; BatchNorm statistics not included);
* checkpoint bytes: initialised {'params', 'batch_stats'} (`host_init`:
  Flax's default init scales, drawn on the host) saved as the `model` item of
  a kd_jax checkpoint (`kd_jax.checkpointing.manager`, orbax) in a temp dir,
  and the size of that item's folder on disk;
* FLOPs per image of the inference at batch 1, as XLA's cost analysis of
  the lowered computation counts them;
* CPU latency of the jitted inference `model.apply(variables, x, train=False)`
  on random inputs at batch 1 and batch 256: after compiling and one warm-up
  call, the median of repeated calls. The repeat count is as many calls as fit
  in --budget_s seconds (from the warm-up call's time), at least 3 and at most
  50 (batch 1) or 10 (batch 256); so slow models (resnet34 at 224 px, batch
  256) get 3 repeats of the full batch;
* mnist5k test accuracy, read from the summary.json of the runs of
  `python -m kd_jax.demo --workdir=<--demo_workdir>` (teacher, 2x800 from
  scratch and distilled) and of the 2x30 runs this script trains into
  --workdir (configs/mnist5k_student.py and configs/mnist5k_distill.py with
  model.hidden=(30, 30)). With --train, missing runs are trained first (the
  demo's through `kd_jax.demo.run_demo`); otherwise a missing run shows '-'.
  The other pairs are not trained on this machine: '-'.

Then every model of the zoo (`ZOO`, or the names in --zoo) by name, at the
input of the benchmark that uses it (CIFAR-100 models at 32x32 with 100
classes, the ImageNet ResNets, MobileNetV1 and ViTs at 224x224 with 1,000):
the same columns but accuracy, so that a user can pick a student by cost. A
model that a pair already measured at the same input is not measured twice.

It writes --out_dir/results.json and results.md (the pairs' table, then the
zoo's) and prints them. `--tiny` feeds the conv nets 16x16 images, times batches 1
and 2 with one repeat each, and trains nothing (seconds; for tests).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import demo
from kd_jax import models
from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
DEMO_COMMAND = 'python -m kd_jax.demo --workdir={}'
SMALL_HIDDEN = (30, 30)
TINY_IMAGE_SIZE = 16  # --tiny: conv nets see 16x16 images (compile-bound).


@dataclasses.dataclass(frozen=True)
class Entry:
  """One model of a pair: where its spec comes from and what it reads."""
  pair: str
  role: str
  model: Any                      # a model spec (ConfigDict)
  image_shape: tuple[int, int, int]
  num_classes: int
  summary: str | None = None      # a run's summary.json, if trained here
  command: str = ''               # the command that trains that run


# The zoo: every model by name at the input of the benchmarks that use it
# (CIFAR-100 32x32 or ImageNet 224x224; vit_mini and vit_tiny at mnist's
# 28x28):
# (num_classes, image shape). `mlp`, `cnn` and the generic `wrn` are sized
# by their configs (the generic `vit` too) and appear in the pairs above.
CIFAR100, IMAGENET = (100, (32, 32, 3)), (1000, (224, 224, 3))
ZOO = {
    **{name: CIFAR100 for name in (
        'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56',
        'resnet110', 'resnet8x4', 'resnet32x4', 'resnet50_cifar', 'wrn_16_1',
        'wrn_16_2', 'wrn_40_1', 'wrn_40_2', 'vgg8', 'vgg11', 'vgg13', 'vgg16',
        'vgg19', 'mobilenetv2', 'shufflenetv1', 'shufflenetv2')},
    **{name: IMAGENET for name in (
        'resnet18', 'resnet34', 'resnet50', 'mobilenetv1', 'vit_ti16',
        'vit_s16')},
    'vit_mini': (10, (28, 28, 1)),
    'vit_tiny': (10, (28, 28, 1)),
}

# CIFAR configs leave the image shape to the dataset.
_DATASET_SHAPES = {'cifar100': (32, 32, 3)}


def _spec(config_name: str, arg: str) -> tuple[Any, tuple[int, int, int]]:
  """A config's model spec and its input shape."""
  config = config_lib.load_config(config_name, arg)
  if config.image_size is None:
    return config.model, _DATASET_SHAPES[config.dataset]
  return config.model, (*config.image_size, config.channels)


def _small(spec):
  spec = spec.copy_and_resolve_references()
  spec.hidden = SMALL_HIDDEN
  return spec


def entries(demo_workdir: str, workdir: str, tiny: bool) -> list[Entry]:
  """The models of every pair, teacher first, in the order of the table."""
  mnist_shape = (28, 28, 1)
  teacher = config_lib.load_config('mnist5k_teacher').model
  student = config_lib.load_config('mnist5k_student').model
  demo_command = DEMO_COMMAND.format(demo_workdir)
  small_command = ('python experiments/size_speed/measure.py --train '
                   f'--workdir={workdir}')
  mnist = 'mnist5k MLP'
  rows = [
      Entry(mnist, 'teacher', teacher, mnist_shape, 10,
            os.path.join(demo_workdir, 'teacher', 'summary.json'),
            demo_command),
      Entry(mnist, 'student (scratch)', student, mnist_shape, 10,
            os.path.join(demo_workdir, 'student', 'summary.json'),
            demo_command),
      Entry(mnist, 'student (distilled)', student, mnist_shape, 10,
            os.path.join(demo_workdir, 'distill', 'summary.json'),
            demo_command),
      Entry(mnist, 'small student (scratch)', _small(student), mnist_shape,
            10, os.path.join(workdir, 'mnist5k_2x30', 'summary.json'),
            small_command),
      Entry(mnist, 'small student (distilled)', _small(student), mnist_shape,
            10, os.path.join(workdir, 'mnist5k_2x30_distill', 'summary.json'),
            small_command),
  ]
  for pair, name, classes in (
      ('image folder (2 classes)', 'image_folder', 2),
      ('CIFAR-100 (CRD)', 'cifar100_crd', 100),
      ('ImageNet (CRD)', 'imagenet_resnet34_resnet18', 1000)):
    for role in ('teacher', 'student'):
      spec, shape = _spec(name, f'role={role}')
      if tiny:
        shape = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, shape[-1])
      rows.append(Entry(pair, role, spec, shape, classes))
  return rows


def zoo_entries(names: Sequence[str], tiny: bool) -> list[Entry]:
  """One entry per zoo model named, at its benchmark input (16x16 if tiny)."""
  rows = []
  for name in names:
    num_classes, shape = ZOO[name]
    if tiny:
      shape = (TINY_IMAGE_SIZE, TINY_IMAGE_SIZE, shape[-1])
    rows.append(Entry('CIFAR-100' if (num_classes, shape[:2]) == (100, (
        32, 32)) else 'ImageNet' if num_classes == 1000 and not tiny else
                      'zoo', 'zoo', config_lib.model_config(name), shape,
                      num_classes))
  return rows


def train_missing(demo_workdir: str, workdir: str) -> None:
  """Trains the mnist5k runs that have not finished (a finished small run
  of another config is refused)."""
  if not all(os.path.exists(os.path.join(demo_workdir, sub, 'summary.json'))
             for sub in ('teacher', 'student', 'distill')):
    demo.run_demo(demo_workdir)
  teacher_workdir = os.path.join(demo_workdir, 'teacher')
  for sub, name, arg in (
      ('mnist5k_2x30', 'mnist5k_student', ''),
      ('mnist5k_2x30_distill', 'mnist5k_distill',
       f'teacher_workdir={teacher_workdir}')):
    config = config_lib.load_config(name, arg)
    config.model.hidden = SMALL_HIDDEN
    study.run_or_read(config, os.path.join(workdir, sub))


def directory_bytes(path: str) -> int:
  return sum(os.path.getsize(os.path.join(root, f))
             for root, _, files in os.walk(path) for f in files)


def checkpoint_bytes(variables: dict[str, Any]) -> int:
  """On-disk bytes of `variables` as the `model` item of a kd_jax checkpoint."""
  with tempfile.TemporaryDirectory() as workdir:
    mngr = checkpointing.manager(workdir, keep=1)
    mngr.save(0, args=ocp.args.Composite(
        model=ocp.args.StandardSave(variables)))
    mngr.wait_until_finished()
    mngr.close()
    return directory_bytes(
        os.path.join(checkpointing.checkpoint_dir(workdir), '0', 'model'))


def host_init(abstract: dict[str, Any], seed: int = 0) -> dict[str, Any]:
  """Float32 variables of `abstract`'s shapes, drawn with numpy on the host.

  Kernels ~ N(0, 1 / fan_in) (Flax's default LeCun-normal scale), biases and
  BatchNorm means 0, BatchNorm scales and variances 1: what an initialised
  model holds, without compiling `model.init` (which for the ResNets costs
  more CPU than every measurement here).
  """
  rng = np.random.default_rng(seed)

  def draw(path, leaf):
    name = path[-1].key
    if name == 'kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      return (rng.standard_normal(leaf.shape, np.float32)
              / np.float32(np.sqrt(fan_in)))
    fill = 1.0 if name in ('scale', 'var') else 0.0
    return np.full(leaf.shape, fill, np.float32)
  return jax.tree_util.tree_map_with_path(draw, abstract)


def median_seconds(fn: Callable[[], Any], max_repeats: int, budget_s: float,
                   min_repeats: int) -> tuple[float, int]:
  """(median seconds of `fn()`, repeats) after one warm-up call."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  warmup = time.perf_counter() - start
  repeats = int(np.clip(budget_s / max(warmup, 1e-6), min_repeats,
                        max_repeats))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - start)
  return statistics.median(times), repeats


def accuracy(entry: Entry) -> tuple[float | None, str]:
  if entry.summary is None:
    return None, 'not trained on this machine'
  if not os.path.exists(entry.summary):
    return None, f'missing {entry.summary} ({entry.command})'
  with open(entry.summary) as f:
    summary = json.load(f)
  return float(summary['eval']['test']['accuracy']), entry.command


def measure(entry: Entry, batch_sizes: Sequence[int],
            max_repeats: Sequence[int], budget_s: float,
            min_repeats: int) -> dict[str, Any]:
  """Sizes and latencies of one model (its row, less pair, role and
  accuracy: `run` adds those)."""
  model = models.get_model(entry.model, entry.num_classes)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(
      (1, *entry.image_shape), jnp.float32))
  variables = host_init({'params': abstract['params'],
                         'batch_stats': abstract.get('batch_stats', {})})
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  latency = {}
  rng = np.random.default_rng(0)
  for batch, repeats_cap in zip(batch_sizes, max_repeats):
    images = jnp.asarray(rng.standard_normal(
        (batch, *entry.image_shape), np.float32))
    start = time.perf_counter()
    lowered = apply.lower(variables, images)
    compiled = lowered.compile()
    compile_s = time.perf_counter() - start
    flops = (lowered.cost_analysis() or {}).get('flops')
    seconds, repeats = median_seconds(lambda: compiled(variables, images),
                                      repeats_cap, budget_s, min_repeats)
    latency[str(batch)] = dict(median_ms=1e3 * seconds, repeats=repeats,
                               images_per_s=batch / seconds,
                               compile_s=compile_s,
                               gflops_per_image=None if flops is None
                               else flops / batch / 1e9)
  spec = entry.model.to_dict()
  return dict(
      model=spec['name'],
      spec={k: list(v) if isinstance(v, tuple) else v
            for k, v in spec.items()},
      input_shape=list(entry.image_shape), num_classes=entry.num_classes,
      num_params=models.param_count(variables['params']),
      param_bytes=models.param_bytes(variables['params']),
      checkpoint_bytes=checkpoint_bytes(variables),
      latency=latency)


def model_label(row: dict[str, Any]) -> str:
  spec = row['spec']
  if spec['name'] == 'mlp':
    return 'mlp ' + 'x'.join(str(h) for h in spec['hidden'])
  return spec['name']


def _mflops(gflops: float | None) -> str:
  if gflops is None:
    return '-'
  return f'{1e3 * gflops:,.1f}' if gflops >= 1e-2 else f'{1e3 * gflops:.3f}'


def markdown_table(rows: Sequence[dict[str, Any]],
                   batch_sizes: Sequence[int], zoo: bool = False) -> str:
  """The pairs' table, or with `zoo` the zoo's (benchmark, model; no
  accuracy)."""
  first = ['benchmark'] if zoo else ['pair', 'role']
  header = (first + ['model', 'input', 'params', 'param MB',
                     'checkpoint MB', 'MFLOPs / image']
            + [f'CPU ms, batch {b}' for b in batch_sizes]
            + [f'images/s, batch {batch_sizes[-1]}']
            + ([] if zoo else ['test acc']))
  lines = ['| ' + ' | '.join(header) + ' |',
           '|' + '---|' * (len(first) + 1)
           + '---:|' * (len(header) - len(first) - 1)]
  for r in rows:
    acc = r['test_accuracy']
    lines.append('| ' + ' | '.join(
        ([r['pair']] if zoo else [r['pair'], r['role']]) + [model_label(r),
         'x'.join(str(d) for d in r['input_shape']),
         f'{r["num_params"]:,}', f'{r["param_bytes"] / 1e6:.2f}',
         f'{r["checkpoint_bytes"] / 1e6:.2f}',
         _mflops(r["latency"][str(batch_sizes[0])]["gflops_per_image"])]
        + [f'{r["latency"][str(b)]["median_ms"]:.2f}' for b in batch_sizes]
        + [f'{r["latency"][str(batch_sizes[-1])]["images_per_s"]:,.0f}']
        + ([] if zoo else ['-' if acc is None else f'{100 * acc:.2f}%']))
        + ' |')
  return '\n'.join(lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--demo_workdir', default='workdirs/demo',
                      help='Root of `python -m kd_jax.demo` runs.')
  parser.add_argument('--workdir', default='workdirs/size_speed',
                      help='Where the 2x30 mnist5k runs are (trained).')
  parser.add_argument('--out_dir', default=HERE,
                      help='Where results.json and results.md go.')
  parser.add_argument('--train', action='store_true',
                      help='Train the missing mnist5k runs first.')
  parser.add_argument('--budget_s', type=float, default=10.0,
                      help='Seconds of timed calls per model and batch size.')
  parser.add_argument('--zoo', default='all',
                      help='Comma-separated zoo models to measure besides the '
                      f'pairs (default all: {", ".join(ZOO)}); "" for none.')
  parser.add_argument('--tiny', action='store_true',
                      help='16x16 inputs to conv nets, batches 1 and 2, one '
                      'repeat, no training (seconds; for tests).')
  args = parser.parse_args(argv)
  if args.tiny and args.train:
    raise ValueError('--tiny measures only; drop --train (or --tiny to train '
                     'the mnist5k runs).')
  args.zoo = list(ZOO) if args.zoo == 'all' else [
      name for name in args.zoo.split(',') if name]
  unknown = [name for name in args.zoo if name not in ZOO]
  if unknown:
    raise ValueError(f'--zoo: unknown {unknown}; choose from {list(ZOO)} or '
                     '"all".')
  if args.budget_s <= 0:
    raise ValueError(f'--budget_s={args.budget_s} must be > 0.')
  return args


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Trains what --train asks for, measures every model, writes the results."""
  start = time.perf_counter()
  load_before = os.getloadavg()
  if args.train:
    train_missing(args.demo_workdir, args.workdir)
  if args.tiny:
    batch_sizes, max_repeats, min_repeats = (1, 2), (1, 1), 1
  else:
    batch_sizes, max_repeats, min_repeats = (1, 256), (50, 10), 3
  measured: dict[str, dict[str, Any]] = {}

  def measure_once(entry: Entry) -> dict[str, Any]:
    """A model measured once per spec and input, whichever table it is in."""
    key = json.dumps([entry.model.to_dict(), entry.image_shape,
                      entry.num_classes], sort_keys=True, default=list)
    if key not in measured:
      measured[key] = measure(entry, batch_sizes, max_repeats, args.budget_s,
                              min_repeats)
    test_accuracy, source = accuracy(entry)
    return dict(measured[key], pair=entry.pair, role=entry.role,
                test_accuracy=test_accuracy, accuracy_source=source)

  rows = [measure_once(e)
          for e in entries(args.demo_workdir, args.workdir, args.tiny)]
  zoo_rows = [measure_once(e) for e in zoo_entries(args.zoo, args.tiny)]
  table = markdown_table(rows, batch_sizes)
  if zoo_rows:
    table += ('\n\nEvery model of the zoo, by name, at its benchmark input '
              '(untrained: speed does not depend on the weights):\n\n'
              + markdown_table(zoo_rows, batch_sizes, zoo=True))
  record = dict(
      rows=rows, zoo_rows=zoo_rows, batch_sizes=list(batch_sizes),
      tiny=args.tiny,
      jax_version=jax.__version__, backend=jax.default_backend(),
      devices=[str(d) for d in jax.devices()], cpu_count=os.cpu_count(),
      load_average_before=list(load_before),
      load_average_after=list(os.getloadavg()),
      seconds=time.perf_counter() - start, table=table)
  os.makedirs(args.out_dir, exist_ok=True)
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  return record


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  record = run(args)
  print(record['table'])
  print()
  for row in record['rows']:
    if row['test_accuracy'] is not None:
      print(f'{row["pair"]} {row["role"]} ({model_label(row)}): test accuracy '
            f'from {row["accuracy_source"]}')
  print(f'\nLoad average (1, 5, 15 min) before: '
        f'{", ".join(f"{x:.2f}" for x in record["load_average_before"])}; '
        f'after: {", ".join(f"{x:.2f}" for x in record["load_average_after"])}.')
  print(f'Wrote {args.out_dir}/results.json and results.md in '
        f'{record["seconds"]:.0f} s.')


if __name__ == '__main__':
  main(sys.argv[1:])
