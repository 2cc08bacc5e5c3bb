"""What the side-by-side benchmark scripts share.

`experiments/peer_benchmark/benchmark.py`, `experiments/peer_benchmark/
token_kd.py` and `experiments/generation_speed/run.py` each time one JAX
and one PyTorch worker process on the same pinned CPUs. This module holds
the pieces that do not depend on what is timed: pinning a process before
JAX or PyTorch start, the CPU's name for the record, and a worker process
that answers each request with one JSON line. It imports neither JAX nor
PyTorch, so a worker may import it before it pins itself.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from collections.abc import Sequence


def pin(threads: int) -> None:
  """Pins this process to CPUs 0..threads-1, before JAX or torch start."""
  cpus = sorted(os.sched_getaffinity(0))[:threads]
  os.sched_setaffinity(0, cpus)


def cpu_name() -> str:
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          return line.split(':', 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def start_worker(script: str, flags: Sequence[str]) -> subprocess.Popen:
  """`python script *flags` with pipes for requests and JSON replies."""
  command = [sys.executable, os.path.abspath(script), *flags]
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL='2')
  return subprocess.Popen(command, stdin=subprocess.PIPE,
                          stdout=subprocess.PIPE, text=True, env=env)


def reply(proc: subprocess.Popen) -> dict:
  """The worker's next JSON line; an error naming it if it ended instead."""
  line = proc.stdout.readline()
  if not line:
    raise RuntimeError(f'worker {" ".join(proc.args[2:])} ended without a '
                       'reply; see its stderr above.')
  return json.loads(line)
