"""The multi-process flags the CLIs share, and joining the other processes.

Give every process the same --coordinator_address and --num_processes and
its own --process_id (or leave all three unset where
`jax.distributed.initialize()` detects them, e.g. on Cloud TPU);
--cpu_collectives=gloo for processes on CPUs.
"""

from __future__ import annotations

from absl import flags
import jax


def define_flags() -> None:
  """--coordinator_address, --num_processes, --process_id, --cpu_collectives."""
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, multi-process runs only.')
  flags.DEFINE_integer('num_processes', None,
                       'Process count, multi-process runs only.')
  flags.DEFINE_integer('process_id', None,
                       "This process's index, multi-process runs only.")
  flags.DEFINE_string('cpu_collectives', None,
                      "'gloo' for multi-process runs on CPUs.")


def requested(f: flags.FlagValues) -> bool:
  """Whether the flags ask for a multi-process run."""
  return bool(f.coordinator_address or f.num_processes)


def initialize(f: flags.FlagValues) -> None:
  """Sets the CPU collectives and, where the flags ask for it, joins the
  other processes (`jax.distributed.initialize`)."""
  if f.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', f.cpu_collectives)
  if requested(f):
    jax.distributed.initialize(f.coordinator_address, f.num_processes,
                               f.process_id)
