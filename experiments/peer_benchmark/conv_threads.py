r"""How many cores XLA's CPU convolutions use, under each runtime option.

  python experiments/peer_benchmark/conv_threads.py            # ~3 min
  python experiments/peer_benchmark/conv_threads.py --tiny

Times one program (default: the resnet8x4 student step of the CIFAR pair,
batch 64, kd_jax's real train step) in a fresh process per XLA_FLAGS variant,
pinned to --threads CPUs, and PyTorch's eager step at the same threads for
reference. For each it prints the median step time over --rounds rounds
(variants interleaved by round) and the CPU seconds the process used per
wall second while stepping: 1.0 means one core busy, --threads means all.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import benchmark  # pylint: disable=g-import-not-at-top,wrong-import-position

VARIANTS = {
    'default': '',
    'no multi-thread eigen': '--xla_cpu_multi_thread_eigen=false',
    'xnnpack': '--xla_cpu_use_xnnpack=true',
    'onednn': '--xla_cpu_use_onednn=true',
    'concurrency scheduler':
        '--xla_cpu_enable_concurrency_optimized_scheduler=true',
    'fast math': '--xla_cpu_enable_fast_math=true',
}


def cpu_seconds() -> float:
  usage = resource.getrusage(resource.RUSAGE_SELF)
  return usage.ru_utime + usage.ru_stime


def worker(args) -> int:
  benchmark.pin(args.threads)
  pair = benchmark.pairs(args.tiny)['cifar']
  if args.batch:
    pair = benchmark.dataclasses.replace(pair, batch_size=args.batch)
  with tempfile.TemporaryDirectory() as workdir:
    if args.side == 'torch':
      run = benchmark.torch_program(pair, args.program, args.threads, workdir)
    else:
      run = benchmark.jax_program(pair, args.program, workdir)
    for _ in range(2):
      run()
    print('ready', flush=True)
    for line in sys.stdin:
      if not line.startswith('run'):
        break
      times, cpu, wall = [], cpu_seconds(), time.perf_counter()
      for _ in range(args.steps):
        t = time.perf_counter()
        run()
        times.append(time.perf_counter() - t)
      print(json.dumps(dict(
          seconds=statistics.median(times),
          cores=(cpu_seconds() - cpu) / (time.perf_counter() - wall))),
            flush=True)
  return 0


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--tiny', action='store_true')
  parser.add_argument('--threads', type=int, default=2)
  parser.add_argument('--program', default='student',
                      choices=benchmark.PROGRAMS)
  parser.add_argument('--batch', type=int, default=0,
                      help='batch size (default: the pair\'s, 64)')
  parser.add_argument('--variants', default=','.join(VARIANTS))
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--steps', type=int, default=3)
  parser.add_argument('--side', default=None, help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.side:
    return worker(args)
  names = [n for n in args.variants.split(',') if n]
  procs = {}
  for name in names + ['PyTorch']:
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2',
               XLA_FLAGS=VARIANTS.get(name, ''))
    command = [sys.executable, os.path.abspath(__file__),
               f'--side={"torch" if name == "PyTorch" else "jax"}',
               f'--threads={args.threads}', f'--program={args.program}',
               f'--steps={args.steps}', f'--batch={args.batch}']
    if args.tiny:
      command.append('--tiny')
    procs[name] = subprocess.Popen(command, stdin=subprocess.PIPE,
                                   stdout=subprocess.PIPE, text=True,
                                   env=env)
  for name, p in procs.items():
    if p.stdout.readline().strip() != 'ready':
      raise RuntimeError(f'variant {name!r} did not start; see stderr.')
  rows = {name: [] for name in procs}
  for _ in range(args.rounds):
    for name, p in procs.items():
      p.stdin.write('run\n')
      p.stdin.flush()
      rows[name].append(json.loads(p.stdout.readline()))
      print(name, rows[name][-1], file=sys.stderr, flush=True)
  for p in procs.values():
    p.stdin.write('quit\n')
    p.stdin.flush()
    p.wait()
  batch = args.batch or benchmark.pairs(args.tiny)['cifar'].batch_size
  print(f'cifar pair, {args.program} program, batch {batch}, {args.threads} '
        f'pinned CPUs; load average {os.getloadavg()[0]:.1f}')
  print('| variant | XLA_FLAGS | step ms | CPU-s per wall-s |')
  print('|---|---|---|---|')
  for name, r in rows.items():
    ms = 1e3 * statistics.median(x['seconds'] for x in r)
    cores = statistics.median(x['cores'] for x in r)
    print(f'| {name} | {VARIANTS.get(name, "(torch.set_num_threads)")} | '
          f'{ms:.1f} | {cores:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
