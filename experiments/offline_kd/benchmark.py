r"""Offline distillation figures: step time, cache throughput, ensembles, top-k.

  python experiments/offline_kd/benchmark.py   # all: ~20 min on 2 busy CPUs
  python experiments/offline_kd/benchmark.py --what=timing
  python experiments/offline_kd/benchmark.py --what=topk \
      --teacher_workdir=workdirs/mnist5k_ensemble/teacher0
  python experiments/offline_kd/benchmark.py --tiny     # seconds: a smoke run

Prints figures (no timing is checked) with the load average of the machine:

* timing: the mnist5k 2x800 student's train step at batch 128 (one device)
  supervised, distilled from a logits cache (logits in the batch), and
  distilled online from the 2x1200 teacher; the cache step also with its
  host-side lookup by id; the cache's write (npy + CSV + manifest) and read
  throughput; a 5-teacher ensemble's forward pass, vmapped over the stacked
  teachers vs 5 separate forwards.
* topk: test accuracy of students trained (60 epochs, configs/
  mnist5k_distill_cached.py) from the dense cache of a trained teacher and
  from its top-k caches, k = 1, 2, 3, with the caches' sizes. Trains the
  teacher (configs/mnist5k_teacher.py) into --teacher_workdir if it is not
  there. With --tiny: k = 2 only, runlocal runs of 2 steps.
* The timing section also prints XLA's flop count of each compiled step,
  which the machine's load does not disturb.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

# One CPU device: the step time of a single device, not of 8 simulated ones.
os.environ.setdefault('XLA_FLAGS', '')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import numpy as np

from kd_jax import config_lib
from kd_jax import export_logits
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax import teachers
from kd_jax import train
from kd_jax.teachers import cache as logits_cache


def _load() -> str:
  return ', '.join(f'{x:.2f}' for x in os.getloadavg())


def _median_ms(fn, repeats: int, rounds: int) -> float:
  """Median over rounds of the mean time of `repeats` calls, in ms."""
  fn()
  times = []
  for _ in range(rounds):
    start = time.perf_counter()
    for _ in range(repeats):
      out = fn()
    jax.block_until_ready(out)
    times.append((time.perf_counter() - start) / repeats * 1e3)
  return statistics.median(times)


def _step_fn(config, model, teacher):
  tx, schedule = train.make_optimizer(config, 1000)
  step = jax.jit(lambda state, batch, tv: train.train_step(
      state, batch, tv, model=model, tx=tx, schedule=schedule,
      teacher=teacher, distill=config.distill))
  state = train.init_state(model, tx, jax.random.key(0), (28, 28, 1))
  return step, state


def timing(tiny: bool, workdir: str) -> None:
  config = config_lib.load_config('mnist5k_distill_cached')
  batch_size = 32 if tiny else config.batch_size
  config.batch_size = batch_size
  hidden = (64, 64) if tiny else (800, 800)
  teacher_hidden = (64, 64) if tiny else (1200, 1200)
  repeats, rounds = (3, 2) if tiny else (20, 7)
  student = models.get_model(dict(name='mlp', hidden=hidden, dropout=0.0), 10)
  teacher_model = models.get_model(
      dict(name='mlp', hidden=teacher_hidden, dropout=0.0), 10)

  # A cache of random logits for every mnist5k id: the lookup is what counts.
  cache_dir = os.path.join(workdir, 'cache')
  config.distill.cache_dir = cache_dir
  info = input_pipeline.get_datasets(config, num_devices=1).info
  num_write = 2_000 if tiny else 100_000
  rng = np.random.default_rng(0)
  for split in (config.train_split, *config.eval_splits):
    batches = list(input_pipeline.iterate_split(config, split, num_devices=1))
    ids = np.concatenate([b['id'][b['mask']] for b in batches])
    labels = np.concatenate([b['label'][b['mask']] for b in batches])
    logits = rng.normal(size=(len(ids), 10)).astype(np.float32)
    manifest = logits_cache.make_manifest(
        config, info, split, fingerprint='random', teacher='random',
        num_examples=len(ids), dtype='float32')
    logits_cache.write_split(os.path.join(cache_dir, split), ids=ids,
                              labels=labels, logits=logits,
                              class_names=info.class_names, manifest=manifest)
  # Throughput on a larger synthetic split (ids need not exist to write).
  big = os.path.join(workdir, 'big')
  ids = np.asarray([f'mnist5k/{i:07d}'.encode() for i in range(num_write)],
                   object)
  logits = rng.normal(size=(num_write, 10)).astype(np.float32)
  manifest = logits_cache.make_manifest(
      config, info, 'big', fingerprint='random', teacher='random',
      num_examples=num_write, dtype='float32')
  start = time.perf_counter()
  logits_cache.write_split(big, ids=ids, labels=np.zeros(num_write),
                            logits=logits, class_names=info.class_names,
                            manifest=manifest)
  write_s = time.perf_counter() - start
  written = sum(os.path.getsize(os.path.join(big, f)) for f in os.listdir(big))
  start = time.perf_counter()
  np.save(os.path.join(big, 'logits.npy'), logits)
  np.save(os.path.join(big, 'ids.npy'), ids.astype(np.bytes_))
  npy_s = time.perf_counter() - start
  npy_bytes = logits.nbytes + ids.astype(np.bytes_).nbytes
  start = time.perf_counter()
  _, read_ids, read_logits = teachers.read_cache_split(workdir, 'big')
  read_s = time.perf_counter() - start
  read_bytes = read_ids.nbytes + read_logits.nbytes
  print(f'cache write: {num_write} examples x 10 classes in {write_s:.2f} s: '
        f'{num_write / write_s:,.0f} examples/s, {written / write_s / 1e6:.1f} '
        f'MB/s ({written / 1e6:.1f} MB of npy + csv + manifest)')
  print(f'cache write, npy only: {num_write / npy_s:,.0f} examples/s, '
        f'{npy_bytes / npy_s / 1e6:.0f} MB/s')
  print(f'cache read: {num_write} examples in {read_s * 1e3:.1f} ms: '
        f'{num_write / read_s:,.0f} examples/s, '
        f'{read_bytes / read_s / 1e6:.0f} MB/s (npy)')

  cache = teachers.load_cache(config, info)
  host = [b for _, b in zip(range(8), input_pipeline.get_datasets(
      config, num_devices=1).train)]
  lookup_ms = _median_ms(lambda: [cache.host_lookup(b) for b in host],
                         1, rounds) / len(host)
  print(f'cache lookup by id: {lookup_ms:.3f} ms per batch of {batch_size} '
        f'({batch_size / lookup_ms * 1e3:,.0f} examples/s)')

  supervised = config.copy_and_resolve_references()
  supervised.distill.alpha = 0.0
  device = [jax.device_put({k: v for k, v in cache.host_lookup(b).items()
                            if k != 'id'}) for b in host]
  sup_step, sup_state = _step_fn(supervised, student, None)
  off_step, off_state = _step_fn(config, student, cache)
  online_teacher = teachers.Teacher(
      variables=teacher_model.init(jax.random.key(1),
                                   jnp.zeros((1, 28, 28, 1))),
      forward=lambda v, b: teacher_model.apply(v, b['image'],
                                               train=False)[None],
      names=('teacher0',), weights=(1.0,), fingerprint='random')
  on_step, on_state = _step_fn(config, student, online_teacher)

  def run(step, state, teacher_variables, batches):
    def go():
      s = state
      for b in batches:
        s, m = step(s, b, teacher_variables)
      return m
    return go

  def with_lookup():
    s = off_state
    for b in host:
      b = cache.host_lookup(b)
      s, m = off_step(s, jax.device_put(
          {k: v for k, v in b.items() if k != 'id'}), None)
    return m

  def supervised_from_host():
    s = sup_state
    for b in host:
      s, m = sup_step(s, jax.device_put(
          {k: v for k, v in b.items() if k != 'id'}), None)
    return m

  def flops(step, state, teacher_variables):
    cost = step.lower(state, device[0], teacher_variables).compile(
        ).cost_analysis()
    cost = cost[0] if isinstance(cost, (list, tuple)) else cost
    return float(cost.get('flops', float('nan')))

  sup_flops = flops(sup_step, sup_state, None)
  off_flops = flops(off_step, off_state, None)
  on_flops = flops(on_step, on_state, online_teacher.variables)
  print(f'XLA cost analysis, flops per step (load-independent): supervised '
        f'{sup_flops:.4g}, offline KD {off_flops:.4g} '
        f'({off_flops / sup_flops:.4f}x), online KD {on_flops:.4g} '
        f'({on_flops / sup_flops:.3f}x)')

  figures = {}
  for _ in range(1 if tiny else 3):  # Interleaved, against load drift.
    for name, fn in (
        ('supervised', run(sup_step, sup_state, None, device)),
        ('offline', run(off_step, off_state, None, device)),
        ('online', run(on_step, on_state, online_teacher.variables, device)),
        ('supervised_host', supervised_from_host),
        ('offline_host', with_lookup)):
      figures.setdefault(name, []).append(
          _median_ms(fn, max(1, repeats // len(device)), rounds)
          / len(device))
  ms = {k: min(v) for k, v in figures.items()}
  print(f'train step, batch {batch_size}, student mlp {hidden}, 1 CPU device '
        f'(best of interleaved medians):')
  print(f'  supervised step:               {ms["supervised"]:.3f} ms')
  print(f'  offline KD step (cache):       {ms["offline"]:.3f} ms '
        f'({ms["offline"] / ms["supervised"]:.3f}x supervised)')
  print(f'  online KD step (mlp {teacher_hidden} teacher): '
        f'{ms["online"]:.3f} ms ({ms["online"] / ms["supervised"]:.3f}x)')
  print(f'  from host batches: supervised step {ms["supervised_host"]:.3f} '
        f'ms, offline KD step + lookup by id {ms["offline_host"]:.3f} ms '
        f'({ms["offline_host"] / ms["supervised_host"]:.3f}x)')

  ensemble(tiny, teacher_hidden, batch_size, repeats, rounds)


def ensemble(tiny: bool, hidden, batch_size: int, repeats: int,
             rounds: int) -> None:
  num = 5
  model = models.get_model(dict(name='mlp', hidden=hidden, dropout=0.0), 10)
  images = jax.random.normal(jax.random.key(0), (batch_size, 28, 28, 1))
  variables = [model.init(jax.random.key(k), images[:1]) for k in range(num)]
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *variables)
  vmapped = jax.jit(jax.vmap(lambda v, x: model.apply(v, x, train=False),
                             in_axes=(0, None)))
  single = jax.jit(lambda v, x: model.apply(v, x, train=False))
  looped = jax.jit(lambda vs, x: jnp.stack(
      [model.apply(v, x, train=False) for v in vs]))
  np.testing.assert_allclose(vmapped(stacked, images)[3],
                             single(variables[3], images), rtol=1e-4,
                             atol=1e-4)
  best = {}
  for _ in range(1 if tiny else 3):
    for name, fn in (
        ('vmapped', lambda: vmapped(stacked, images)),
        ('separate', lambda: [single(v, images) for v in variables]),
        ('looped', lambda: looped(variables, images))):
      t = _median_ms(fn, repeats, rounds)
      best[name] = min(best.get(name, t), t)
  print(f'ensemble forward, {num} teachers mlp {hidden}, batch {batch_size}:')
  print(f'  vmapped (one stacked pytree, one jit): {best["vmapped"]:.3f} ms')
  print(f'  {num} separate jitted forwards:          {best["separate"]:.3f} '
        f'ms ({best["separate"] / best["vmapped"]:.2f}x vmapped)')
  print(f'  Python loop in one jit (mixed archs):  {best["looped"]:.3f} ms')


def topk_study(tiny: bool, workdir: str, teacher_workdir: str | None) -> None:
  arg = 'runlocal,num_train_steps=2' if tiny else ''
  if teacher_workdir is None:
    teacher_workdir = os.path.join(workdir, 'teacher')
  if not os.path.exists(os.path.join(teacher_workdir, 'summary.json')):
    train.train_and_evaluate(config_lib.load_config('mnist5k_teacher', arg),
                             teacher_workdir)
  base = f'teacher_workdir={teacher_workdir}'
  rows = []
  for k in (2,) if tiny else (None, 1, 2, 3):
    cache = os.path.join(workdir, 'dense' if k is None else f'top{k}')
    config = config_lib.load_config('mnist5k_distill_cached',
                                    ','.join(filter(None, [arg, base])))
    manifests = export_logits.export(config, cache, top_k=k, overwrite=True)
    nbytes = manifests[config.train_split]['nbytes']
    dense_bytes = manifests[config.train_split]['dense_nbytes']
    config = config_lib.load_config('mnist5k_distill_cached', ','.join(
        filter(None, [arg, base, f'cache_dir={cache}'])))
    summary = train.train_and_evaluate(config, os.path.join(
        workdir, f'student_{os.path.basename(cache)}'))
    test = summary['eval']['test']
    rows.append(('dense' if k is None else f'top-{k}', nbytes,
                 test['accuracy'], test['errors'], test['teacher_accuracy'],
                 summary['train_seconds']))
  print(f'top-k study: mnist5k 2x800 student, T=20, alpha=0.9, teacher '
        f'{teacher_workdir} (test accuracy {rows[0][4]:.4f}):')
  print('  cache   train bytes   vs dense  test acc  errors  train s')
  for name, nbytes, acc, errors, _, seconds in rows:
    print(f'  {name:7s} {nbytes:11,d}  {nbytes / dense_bytes:6.3f}x   '
          f'{acc:.4f}    {errors:5.0f}  {seconds:7.1f}')


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true',
                      help='Small models, few steps: a smoke run.')
  parser.add_argument('--what', default='timing,topk',
                      help='Comma-separated sections: timing, topk.')
  parser.add_argument('--workdir', default=None,
                      help='Where caches and runs go (default: a temp dir).')
  parser.add_argument('--teacher_workdir', default=None,
                      help='A trained mnist5k teacher for the top-k study.')
  args = parser.parse_args(argv)
  print(f'load average (1, 5, 15 min): {_load()} on {os.cpu_count()} CPUs; '
        f'jax devices: {jax.devices()}')
  workdir = args.workdir or tempfile.mkdtemp(prefix='offline_kd_')
  try:
    what = set(args.what.split(','))
    if 'timing' in what:
      timing(args.tiny, os.path.join(workdir, 'timing'))
    if 'topk' in what:
      topk_study(args.tiny, os.path.join(workdir, 'topk'),
                 args.teacher_workdir)
  finally:
    if args.workdir is None:
      shutil.rmtree(workdir, ignore_errors=True)
  print(f'load average at the end: {_load()}')


if __name__ == '__main__':
  sys.exit(main())
