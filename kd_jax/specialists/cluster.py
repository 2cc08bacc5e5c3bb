r"""Groups of confusable classes from a trained generalist, for specialists.

  python -m kd_jax.specialists.cluster \
      --config=configs/specialists_mnist5k.py:role=generalist \
      --workdir=workdirs/specialists_mnist5k/generalist \
      [--out=workdirs/specialists_mnist5k/groups.json]

runs the generalist (`config.model`, trained in `--workdir`) once over
`config.train_split` (un-augmented; labels are not used), takes the
covariance of its predicted probabilities at temperature
`config.specialist.cluster_temperature` and clusters the classes into
`config.specialist.num_groups` groups (`specialists.cluster_classes`, seeded
by `config.seed`), as Hinton, Vinyals & Dean (2015, sec. 5) do. The groups
file (`kd_jax.specialists.groups`) records the groups, the class names and a
fingerprint of the generalist's parameters; specialist runs read it through
`config.specialist.groups_file`, which is where --out defaults to.
"""

from __future__ import annotations

import os
from typing import Any

from absl import app
from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np

from kd_jax import config_lib
from kd_jax import input_pipeline
from kd_jax import progress
from kd_jax import rundir
from kd_jax.specialists import groups as specialist_groups
from kd_jax import specialists
from kd_jax import teachers

SINGLE_PROCESS = dict(num_devices=1, process_index=0, process_count=1)


def generalist_logits(config: ml_collections.ConfigDict, workdir: str,
                      split: str | None = None
                      ) -> tuple[np.ndarray, teachers.Teacher,
                                 input_pipeline.DatasetInfo]:
  """The logits [N, C] of the generalist trained in `workdir` on a split.

  Returns:
    (logits of every example of `split`, default config.train_split, in the
    split's stored order; the generalist as a `Teacher`; the dataset info).
  """
  if config.specialist.index >= 0:
    raise ValueError(
        f'config.specialist.index={config.specialist.index}: groups are formed '
        'from the generalist on all classes; pass the generalist\'s config '
        '(e.g. :role=generalist).')
  info = input_pipeline.get_datasets(config, **SINGLE_PROCESS).info
  generalist = teachers.load_online(
      [config_lib.teacher_config(config.model, workdir)], info.num_classes,
      info.image_shape,
      normalization=teachers.online.stream_normalization(info))
  forward = jax.jit(lambda v, images: generalist.forward(
      v, {'image': images})[0])
  rows = []
  for batch in input_pipeline.iterate_split(
      config, split or config.train_split, **SINGLE_PROCESS):
    logits = np.asarray(forward(generalist.variables, batch['image']))
    rows.append(logits[batch['mask']])
  return np.concatenate(rows), generalist, info


def cluster(config: ml_collections.ConfigDict, workdir: str,
            out: str | None = None) -> dict[str, Any]:
  """Clusters the classes as the generalist in `workdir` confuses them.

  Writes the groups file `out` (default `config.specialist.groups_file`) and
  returns what it holds.
  """
  out = out or config.specialist.groups_file
  if not out:
    raise ValueError('Where should the groups go? Pass --out (out=) or set '
                     'config.specialist.groups_file.')
  num_groups = int(config.specialist.num_groups)
  temperature = float(config.specialist.cluster_temperature)
  if not temperature > 0:
    raise ValueError(f'config.specialist.cluster_temperature={temperature} '
                     'must be > 0.')
  num_classes = rundir.read_run_info(workdir, '--workdir')['num_classes']
  if not 1 <= num_groups <= num_classes:
    raise ValueError(
        f'config.specialist.num_groups={num_groups}: more clusters than the '
        f'{num_classes} classes of the generalist in {workdir!r}, or fewer '
        f'than one; set it in [1, {num_classes}].')
  logits, generalist, info = generalist_logits(config, workdir)
  probs = np.asarray(jax.nn.softmax(logits / temperature, axis=-1))
  groups = specialists.cluster_classes(probs, num_groups, seed=config.seed)
  return specialist_groups.write_groups_file(
      out, groups, info.class_names, generalist=workdir,
      generalist_fingerprint=specialist_groups.params_fingerprint(
          generalist.variables),
      extra=dict(split=config.train_split, num_examples=len(logits),
                 cluster_temperature=temperature, seed=int(config.seed)))


def define_flags() -> None:
  """The CLI's flags, defined only when run as a program."""
  config_flags.DEFINE_config_file(
      'config', None, "The generalist's config, with :args after it.",
      lock_config=True)
  flags.DEFINE_string('workdir', None, 'Where the generalist was trained.')
  flags.DEFINE_string('out', None, 'The groups.json to write; default '
                      'config.specialist.groups_file.')
  flags.mark_flags_as_required(['config', 'workdir'])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f'Unexpected arguments: {argv[1:]}')
  f = flags.FLAGS
  record = cluster(f.config, f.workdir, f.out)
  for s, names in enumerate(record['group_names']):
    print(f'group {s}: {", ".join(names)}')
  print(f'wrote {os.path.abspath(f.out)}')


if __name__ == '__main__':
  progress.run_quiet_cli(main, define_flags)
