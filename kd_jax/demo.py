"""The one-command demo: teacher, student from scratch, distilled student.

  python -m kd_jax.demo --workdir=workdirs/demo

Trains the three mnist5k runs of configs/ (mnist5k_teacher, mnist5k_student,
mnist5k_distill) one after the other, each resuming if its workdir already
holds a finished or interrupted run, and prints one table of test accuracy,
test errors, parameters and agreement with the teacher. Each run shows a
progress bar on stderr; library INFO logs come back with --log_level=info.
"""

import os
import sys

from absl import app
from absl import flags
from absl import logging

from kd_jax import progress

with progress.quiet_native_imports(sys.argv):
  # Training reads data: TensorFlow, lazy in the library, loads here, where
  # its import-time C++ lines are silenced.
  import tensorflow  # pylint: disable=g-import-not-at-top,unused-import
  from kd_jax import train  # pylint: disable=g-import-not-at-top
from kd_jax.config_lib import load_config



def format_table(rows: list[dict]) -> str:
  header = ('run', 'test acc', 'test errors', 'params', 'agreement w/ teacher')
  lines = ['| ' + ' | '.join(header) + ' |', '|' + '---|' * len(header)]
  for r in rows:
    test = r['eval']['test']
    agreement = test.get('agreement')
    lines.append('| ' + ' | '.join([
        r['run'], f'{100 * test["accuracy"]:.2f}%',
        f'{int(round(test["errors"]))} / {int(test["num_examples"])}',
        f'{r["num_params"]:,}',
        '-' if agreement is None else f'{100 * agreement:.2f}%']) + ' |')
  return '\n'.join(lines)


def run_demo(root: str, arg: str = '') -> list[dict]:
  teacher_dir = os.path.join(root, 'teacher')
  runs = [('teacher', 'mnist5k_teacher', ''),
          ('student (scratch)', 'mnist5k_student', ''),
          ('student (distilled)', 'mnist5k_distill',
           f'teacher_workdir={teacher_dir}')]
  rows = []
  for (label, name, extra), sub in zip(runs, ('teacher', 'student',
                                              'distill')):
    config = load_config(name, ','.join(filter(None, [arg, extra])))
    logging.info('demo: %s (%s)', label, name)
    summary = train.train_and_evaluate(config, os.path.join(root, sub))
    rows.append(dict(summary, run=label))
  return rows


def main(argv):
  del argv
  progress.apply_log_level_flag()
  rows = run_demo(flags.FLAGS.workdir, flags.FLAGS.config_arg)
  print(format_table(rows))


if __name__ == '__main__':
  # Flags are defined only when run as a program, so that importing this
  # module (tests, doctests) never clashes with another CLI's flags.
  flags.DEFINE_string('workdir', 'workdirs/demo', 'Root of the runs.')
  flags.DEFINE_string('config_arg', '', 'Appended to every config arg, '
                      'e.g. "runlocal" or "seed=1".')
  progress.define_flags()
  app.run(main)
