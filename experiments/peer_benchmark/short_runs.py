r"""How much of a short training run is overhead (imports, compiles, eval...).

  python experiments/peer_benchmark/short_runs.py              # ~5 min
  python experiments/peer_benchmark/short_runs.py --rounds=1 --epochs=1,2

Runs `python -m kd_jax.main --config=configs/mnist5k_student.py:num_epochs=N`
in a fresh process for N = E and N = 2E epochs (--epochs=E,2E), interleaved
by round, each into a new workdir, with no compilation cache and with a
persistent one (--compilation_cache_dir, warmed by a first run that is not
counted). A run of E epochs costs `overhead + E * per_epoch`, so from the
two wall times of one round

    per_epoch = (wall(2E) - wall(E)) / E,  overhead = wall(E) - E * per_epoch

and the overhead fraction of the E-epoch run is overhead / wall(E): what the
process spends outside its training epochs (interpreter start, imports, data
preparation, compiles, checkpoint manager, exit). Each epoch's evaluation
counts as training here, as it recurs with every epoch. It then times the
imports alone, each in a fresh process (`python -c "import ..."`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))))


def run_once(epochs: int, workdir: str, cache_dir: str | None,
             config: str) -> float:
  cmd = [sys.executable, '-m', 'kd_jax.main',
         f'--config={config}:num_epochs={epochs}', f'--workdir={workdir}']
  if cache_dir:
    cmd.append(f'--compilation_cache_dir={cache_dir}')
  start = time.perf_counter()
  subprocess.run(cmd, cwd=ROOT, check=True, stdout=subprocess.DEVNULL,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


IMPORTS = {
    'python -c pass': 'pass',
    'import jax': 'import jax',
    'import kd_jax.train': 'import kd_jax.train',
    'import tensorflow, tensorflow_datasets': (
        'import tensorflow, tensorflow_datasets'),
    'import kd_jax.main (the CLI)': 'import kd_jax.main',
}


def import_seconds(statement: str) -> float:
  start = time.perf_counter()
  subprocess.run([sys.executable, '-c', statement], cwd=ROOT, check=True,
                 stderr=subprocess.DEVNULL)
  return time.perf_counter() - start


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--epochs', default='5,10',
                      help='E,2E: the short run and its double')
  parser.add_argument('--rounds', type=int, default=3)
  parser.add_argument('--config', default='configs/mnist5k_student.py')
  args = parser.parse_args(argv)
  short, long = (int(e) for e in args.epochs.split(','))
  print(f'load average before: {os.getloadavg()}', flush=True)
  rows = []
  with tempfile.TemporaryDirectory() as tmp:
    cache_dir = os.path.join(tmp, 'cache')
    run_once(short, os.path.join(tmp, 'warm'), cache_dir, args.config)
    for r in range(args.rounds):
      for mode, cache in (('no cache', None), ('warm cache', cache_dir)):
        walls = {}
        for n in ((short, long) if r % 2 == 0 else (long, short)):
          walls[n] = run_once(n, os.path.join(tmp, f'{mode}{r}-{n}'), cache,
                              args.config)
        per_epoch = (walls[long] - walls[short]) / (long - short)
        overhead = walls[short] - short * per_epoch
        rows.append((mode, walls[short], walls[long], per_epoch, overhead,
                     overhead / walls[short]))
        print(f'round {r} {mode}: {short} epochs {walls[short]:.2f} s, '
              f'{long} epochs {walls[long]:.2f} s, per epoch '
              f'{per_epoch:.2f} s, overhead {overhead:.2f} s '
              f'({100 * overhead / walls[short]:.0f}%)', flush=True)
  imports = {name: statistics.median(import_seconds(stmt)
                                     for _ in range(args.rounds))
             for name, stmt in IMPORTS.items()}
  print(f'load average after: {os.getloadavg()}')
  print(f'\n| mode | {short} epochs s | {long} epochs s | per epoch s | '
        f'overhead s | overhead / {short}-epoch run |')
  print('|---|---|---|---|---|---|')
  for mode in ('no cache', 'warm cache'):
    sel = [row for row in rows if row[0] == mode]
    med = [statistics.median(row[i] for row in sel) for i in range(1, 6)]
    lo = min(row[5] for row in sel)
    hi = max(row[5] for row in sel)
    print(f'| {mode} | {med[0]:.2f} | {med[1]:.2f} | {med[2]:.2f} | '
          f'{med[3]:.2f} | {100 * med[4]:.0f}% [{100 * lo:.0f}-{100 * hi:.0f}%]'
          ' |')
  print('\n| fresh process | wall s (median) |\n|---|---|')
  for name, seconds in imports.items():
    print(f'| `{name}` | {seconds:.2f} |')
  return 0


if __name__ == '__main__':
  sys.exit(main())
