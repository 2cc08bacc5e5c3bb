r"""CPU latency at batch 1 of the JAX model beside its ONNX and TFLite files.

  pip install -e '.[export]' && pip install --no-deps jax2onnx==0.17.1
  python experiments/size_speed/exported.py [--models=mnist_student,cnn] \
      [--budget_s=10]

For each model (`MODELS`: the mnist5k teacher and students of
measure.py's pairs, the 3-layer CNN student of configs/image_folder.py and
its ResNet-18 teacher at 224x224x3 and 2 classes) with initialised weights
(latency does not depend on their values), it builds the function that
`kd_jax.export_model` exports (uint8 images in, the dataset's normalisation
inside, logits out), converts it to ONNX and TFLite, and times one image
(batch 1, a fixed uint8 image) in each runtime on this CPU:

* JAX: the jitted function (`jax.jit`), the input a NumPy array, as a
  caller holding decoded pixels would call it;
* ONNX: onnxruntime's CPU session; TFLite: LiteRT's interpreter (XNNPACK);
  each at its default thread count, and at one thread.

Times are medians over 5 rounds in which the five runtimes take turns
(about --budget_s seconds in all, at least one call each per round, after a
warm-up call), so that the load of a shared machine falls on all alike;
file sizes are the files' bytes. It writes --out (JSON) and prints a
Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time
from typing import Any

import jax
import numpy as np

from kd_jax import export_model
from kd_jax import models
from kd_jax.data import preprocess

HERE = os.path.dirname(os.path.abspath(__file__))

# name: (model spec, image shape, classes, dataset whose normalisation).
MODELS = {
    'mnist_teacher': ({'name': 'mlp', 'hidden': (1200, 1200)}, (28, 28, 1),
                      10, 'mnist5k'),
    'mnist_student': ({'name': 'mlp', 'hidden': (800, 800)}, (28, 28, 1), 10,
                      'mnist5k'),
    'mnist_small_student': ({'name': 'mlp', 'hidden': (30, 30)}, (28, 28, 1),
                            10, 'mnist5k'),
    'cnn': ({'name': 'cnn'}, (224, 224, 3), 2, 'image_folder'),
    'resnet18': ({'name': 'resnet18'}, (224, 224, 3), 2, 'image_folder'),
}


def interleaved_ms(fns: dict[str, Any], image: np.ndarray, budget_s: float,
                   rounds: int = 5) -> dict[str, tuple[float, int]]:
  """{name: (median ms of fn(image), calls)}: after a warm-up call each, the
  functions take turns for `rounds` rounds (so that the load of a shared
  machine falls on all of them alike), each round about budget_s / rounds
  seconds split evenly between them."""
  calls = {}
  for name, fn in fns.items():
    start = time.perf_counter()
    jax.block_until_ready(fn(image))
    seconds = time.perf_counter() - start
    calls[name] = int(np.clip(budget_s / rounds / len(fns) / max(seconds, 1e-6),
                              1, 200))
  times = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      for _ in range(calls[name]):
        start = time.perf_counter()
        jax.block_until_ready(fn(image))
        times[name].append(time.perf_counter() - start)
  return {name: (1e3 * statistics.median(t), len(t))
          for name, t in times.items()}


def measure(name: str, budget_s: float, root: str) -> dict[str, Any]:
  spec, shape, classes, dataset = MODELS[name]
  model = models.get_model(spec, classes)
  variables = jax.device_get(jax.jit(model.init)(
      jax.random.key(0), np.zeros((1, *shape), np.float32)))
  mean, std = preprocess.normalization(dataset, shape[2])
  run = export_model.Run('', dict(image_shape=list(shape),
                                  num_classes=classes),
                         model, variables, mean, std)
  serve = export_model.serving_function(run)
  image = np.random.default_rng(0).integers(0, 256, (1, *shape), np.uint8)
  row = dict(model=name, spec=spec, input=list(shape), classes=classes,
             params=models.param_count(variables['params']))
  jitted = jax.jit(serve)
  want = np.asarray(jitted(image))
  fns = {'jax': jitted}
  for fmt, convert in export_model.CONVERTERS.items():
    start = time.perf_counter()
    blob = convert(serve, shape)
    row[f'{fmt}_convert_s'] = time.perf_counter() - start
    path = os.path.join(root, f'{name}.{fmt}')
    with open(path, 'wb') as f:
      f.write(blob)
    row[f'{fmt}_mb'] = len(blob) / 1e6
    for threads, key in ((None, fmt), (1, f'{fmt}_1thread')):
      fns[key] = export_model.load_exported(path, num_threads=threads)
      row[f'{key}_max_abs_difference'] = float(
          np.abs(fns[key](image) - want).max())
  for key, (ms, calls) in interleaved_ms(fns, image, budget_s).items():
    row[f'{key}_ms'], row[f'{key}_calls'] = ms, calls
  return row


def table(rows) -> str:
  lines = ['| model | input | params | ONNX MB | TFLite MB | JAX ms | '
           'ONNX ms (1 thread) | TFLite ms (1 thread) |',
           '|---|---:|---:|---:|---:|---:|---:|---:|']
  for r in rows:
    lines.append(
        f'| {r["model"]} | {"x".join(map(str, r["input"]))} | '
        f'{r["params"]:,} | {r["onnx_mb"]:.2f} | {r["tflite_mb"]:.2f} | '
        f'{r["jax_ms"]:.3f} | {r["onnx_ms"]:.3f} ({r["onnx_1thread_ms"]:.3f}) '
        f'| {r["tflite_ms"]:.3f} ({r["tflite_1thread_ms"]:.3f}) |')
  return '\n'.join(lines)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--models', default=','.join(MODELS))
  parser.add_argument('--budget_s', type=float, default=10.0)
  parser.add_argument('--out', default=os.path.join(HERE, 'exported.json'))
  args = parser.parse_args()
  load_before = os.getloadavg()
  start = time.perf_counter()
  with tempfile.TemporaryDirectory() as root:
    rows = [measure(name, args.budget_s, root)
            for name in args.models.split(',') if name]
  record = dict(rows=rows, jax_version=jax.__version__,
                cpu_count=os.cpu_count(),
                load_average_before=list(load_before),
                load_average_after=list(os.getloadavg()),
                seconds=time.perf_counter() - start, table=table(rows))
  with open(args.out, 'w') as f:
    json.dump(record, f, indent=2)
  print(record['table'])
  print(f'load average {load_before[0]:.1f} before, '
        f'{os.getloadavg()[0]:.1f} after; {record["seconds"]:.0f} s')


if __name__ == '__main__':
  main()
