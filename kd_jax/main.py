"""Trains or distils as a config file says.

  python -m kd_jax.main --config=configs/mnist5k_teacher.py --workdir=/tmp/t

Multi-host: give every process the same --coordinator_address and
--num_processes, and its own --process_id (or leave all three unset where
`jax.distributed.initialize()` detects them, e.g. on Cloud TPU).

Prints a progress bar per run on stderr and the run's summary lines; library
INFO logs come back with --log_level=info.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags

from kd_jax import progress

with progress.quiet_native_imports(sys.argv):
  from kd_jax import train  # pylint: disable=g-import-not-at-top



def define_flags() -> None:
  """The CLI's flags; defined only when run as a program, so that importing
  the module (tests, doctests, other CLIs) never defines them twice."""
  config_flags.DEFINE_config_file(
      'config', None, 'A config file in configs/, with :args after it.',
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where checkpoints, metrics and the '
                      'summary go; a rerun resumes there.')
  flags.DEFINE_string('coordinator_address', None,
                      'host:port of process 0, multi-host only.')
  flags.DEFINE_integer('num_processes', None,
                       'Process count, multi-host only.')
  flags.DEFINE_integer('process_id', None,
                       "This process's index, multi-host only.")
  flags.DEFINE_string('cpu_collectives', None,
                      "'gloo' for multi-process runs on CPUs.")
  progress.define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  progress.apply_log_level_flag()
  if f.cpu_collectives:
    jax.config.update('jax_cpu_collectives_implementation', f.cpu_collectives)
  if f.coordinator_address or f.num_processes:
    jax.distributed.initialize(f.coordinator_address, f.num_processes,
                               f.process_id)
  logging.info('JAX process %d of %d, %d local / %d global devices.',
               jax.process_index(), jax.process_count(),
               jax.local_device_count(), jax.device_count())
  summary = train.train_and_evaluate(f.config, f.workdir)
  if jax.process_index() == 0:
    print(f'{summary["model"]}, {summary["num_params"]:,} params, '
          f'{summary["step"]} steps: {f.workdir}')
    print(progress.result_table(summary))


if __name__ == '__main__':
  define_flags()
  app.run(main)
