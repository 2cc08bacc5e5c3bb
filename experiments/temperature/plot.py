r"""What temperature does to a softmax: one teacher's dark knowledge, and the curves.

  python experiments/temperature/plot.py --teacher_workdir=workdirs/demo/teacher

Reuses the mnist5k teacher of `python -m kd_jax.demo --workdir=workdirs/demo`
(configs/mnist5k_teacher.py, 2x1200 MLP); if --teacher_workdir holds no
finished run, trains it there first with `kd_jax.train.train_and_evaluate`.
Then it restores the teacher's params, runs it on the mnist5k test split and
picks one digit by a fixed rule: among the test images of class --digit (4)
that the teacher classifies correctly, the one with the largest probability
of class --confusable (9) at T = 1. If the teacher gets none of them right
(an undertrained --tiny teacher), the rule runs over all test images of that
class. It writes to --out_dir:

* `dark_knowledge.png`: that image and bar charts of the teacher's softmax of
  its logits at T = 1, 2, 5, 10, 20;
* `softmax_curves.png`: `kd_jax.losses.tempered_softmax` of the fixed logits
  [1, 2, 3, 4, 5] at the same temperatures, per class and as T varies;
* `selected.json`: the chosen example, the rule and its probabilities;

and prints the probabilities as a markdown table. `--tiny` trains a
seconds-long runlocal teacher instead (for tests).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import matplotlib
import numpy as np

matplotlib.use('Agg')
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top

from kd_jax import checkpointing
from kd_jax import config_lib
from kd_jax import input_pipeline
from kd_jax import losses
from kd_jax import models
from kd_jax import rundir
from kd_jax import study

TEMPERATURES = (1.0, 2.0, 5.0, 10.0, 20.0)
GENERIC_LOGITS = (1.0, 2.0, 3.0, 4.0, 5.0)
TEACHER_CONFIG = 'mnist5k_teacher'
HERE = os.path.dirname(os.path.abspath(__file__))


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--teacher_workdir', default='workdirs/demo/teacher',
                      help='A finished mnist5k_teacher run (trained here if '
                      'it is missing or unfinished).')
  parser.add_argument('--out_dir', default=HERE,
                      help='Where the PNGs and selected.json go.')
  parser.add_argument('--digit', type=int, default=4,
                      help='The true class of the example to show.')
  parser.add_argument('--confusable', type=int, default=9,
                      help='The class whose teacher probability picks it.')
  parser.add_argument('--tiny', action='store_true',
                      help='Train a runlocal teacher (seconds; for tests).')
  args = parser.parse_args(argv)
  for name in ('digit', 'confusable'):
    if not 0 <= getattr(args, name) <= 9:
      raise ValueError(f'--{name}={getattr(args, name)}: mnist5k has classes '
                       f'0..9; pick one of them.')
  if args.digit == args.confusable:
    raise ValueError(f'--digit and --confusable are both {args.digit}: pick '
                     f'two different classes (e.g. 4 and 9).')
  return args


def ensure_teacher(config, workdir: str) -> None:
  """Trains the teacher in `workdir` unless a finished run of `config` is
  there (a finished run of another config is refused, naming the fields)."""
  study.run_or_read(config, workdir)


def restore_teacher(config, workdir: str):
  """(model, variables, run_info) of the latest checkpoint in `workdir`."""
  run_info = rundir.read_run_info(workdir)
  model = models.get_model(config.model, run_info['num_classes'])
  image_shape = tuple(run_info['image_shape'])
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *image_shape), jnp.float32)))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  variables, _ = checkpointing.restore_model(workdir, abstract)
  return model, variables, run_info


def teacher_test_logits(config, model, variables
                ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """(images, labels, ids, teacher logits) of the whole test split."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  images, labels, ids, logits = [], [], [], []
  for batch in input_pipeline.iterate_split(
      config, 'test', num_devices=1, process_index=0, process_count=1):
    keep = batch['mask']
    images.append(batch['image'][keep])
    labels.append(batch['label'][keep])
    ids.append(batch['id'][keep])
    logits.append(np.asarray(apply(variables, batch['image']))[keep])
  return tuple(np.concatenate(x) for x in (images, labels, ids, logits))


def select_example(labels: np.ndarray, logits: np.ndarray, digit: int,
                   confusable: int) -> tuple[int, str]:
  """Index of the example the rule picks, and which pool it was picked from.

  Among the examples of class `digit` that the teacher classifies correctly,
  the one with the largest softmax probability of `confusable` at T = 1; all
  examples of class `digit` if the teacher gets none right.
  """
  probs = np.asarray(losses.tempered_softmax(logits, 1.0))
  of_digit = labels == digit
  if not of_digit.any():
    raise ValueError(f'the test split has no example of class {digit}; '
                     f'pick another --digit.')
  correct = of_digit & (probs.argmax(-1) == digit)
  pool, pool_name = (correct, 'correctly classified') if correct.any() else (
      of_digit, 'all (the teacher classifies none correctly)')
  candidates = np.flatnonzero(pool)
  return int(candidates[np.argmax(probs[candidates, confusable])]), pool_name


def plot_dark_knowledge(path: str, image: np.ndarray, logits: np.ndarray,
                        label: int, confusable: int, example_id: str,
                        class_names: Sequence[str]) -> None:
  """The image, its logits, and its softmax per temperature (linear and log)."""
  columns = len(TEMPERATURES) + 1
  fig, axes = plt.subplots(2, columns, figsize=(3.0 * columns, 6.4))
  axes[0, 0].imshow(image[..., 0], cmap='gray')
  axes[0, 0].set_title(f'test image {example_id}\nlabel {class_names[label]}')
  axes[0, 0].axis('off')
  classes = np.arange(len(logits))
  colors = ['tab:gray'] * len(logits)
  colors[label] = 'tab:blue'
  colors[confusable] = 'tab:orange'
  axes[1, 0].bar(classes, logits, color=colors)
  axes[1, 0].set_xticks(classes, [str(c) for c in class_names])
  axes[1, 0].set_xlabel('class')
  axes[1, 0].set_ylabel('teacher logit z')
  axes[1, 0].set_title('logits')
  # One log-scale floor for all panels: a decade below the smallest T=1 prob.
  smallest = float(np.asarray(losses.tempered_softmax(logits, 1.0)).min())
  floor = 10.0 ** np.floor(np.log10(smallest) - 1)
  for column, temperature in enumerate(TEMPERATURES, start=1):
    probs = np.asarray(losses.tempered_softmax(logits, temperature))
    top, bottom = axes[0, column], axes[1, column]
    top.bar(classes, probs, color=colors)
    top.set_ylim(0, 1)
    top.set_title(f'T = {temperature:g}\np({class_names[confusable]}) = '
                  f'{probs[confusable]:.3g}')
    # Log scale: the tiny probabilities whose ratios are the dark knowledge.
    bottom.bar(classes, probs, color=colors)
    bottom.set_yscale('log')
    bottom.set_ylim(floor, 1)
    bottom.set_title(f'T = {temperature:g}, log scale')
    for ax in (top, bottom):
      ax.set_xticks(classes, [str(c) for c in class_names])
      ax.set_xlabel('class')
  axes[0, 1].set_ylabel('teacher probability')
  axes[1, 1].set_ylabel('teacher probability (log)')
  fig.suptitle('softmax(z / T) of the teacher at rising temperature (blue: '
               f'true class, orange: {class_names[confusable]})')
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def plot_softmax_curves(path: str) -> None:
  """tempered_softmax of GENERIC_LOGITS: per class at each T, and against T."""
  logits = jnp.asarray(GENERIC_LOGITS)
  classes = np.arange(1, len(GENERIC_LOGITS) + 1)
  fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
  for temperature in TEMPERATURES:
    probs = np.asarray(losses.tempered_softmax(logits, temperature))
    left.plot(classes, probs, marker='o', label=f'T = {temperature:g}')
  left.axhline(1 / len(GENERIC_LOGITS), color='k', ls=':', lw=1,
               label='uniform')
  left.set_xticks(classes, [f'{c}\n(z={z:g})' for c, z in
                            zip(classes, GENERIC_LOGITS)])
  left.set_xlabel('class (logit z)')
  left.set_ylabel('probability')
  left.set_title('softmax(z / T) for logits z = [1, 2, 3, 4, 5]')
  left.legend()
  grid = np.geomspace(0.5, 50.0, 200)
  curves = np.asarray(jax.vmap(losses.tempered_softmax, (None, 0))(
      logits, jnp.asarray(grid)))
  for i, z in enumerate(GENERIC_LOGITS):
    right.plot(grid, curves[:, i], label=f'z = {z:g}')
  for temperature in TEMPERATURES:
    right.axvline(temperature, color='k', ls=':', lw=0.8)
  right.set_xscale('log')
  right.set_xlabel('temperature T (log scale)')
  right.set_ylabel('probability')
  right.set_title('each class as T rises (dotted: T = 1, 2, 5, 10, 20)')
  right.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def markdown_table(rows: dict[str, Sequence[float]],
                   class_names: Sequence[str]) -> str:
  lines = ['| T | ' + ' | '.join(f'p({c})' for c in class_names) + ' |',
           '|---' * (len(class_names) + 1) + '|']
  for name, probs in rows.items():
    lines.append(f'| {name} | ' + ' | '.join(f'{p:.3g}' for p in probs) + ' |')
  return '\n'.join(lines)


def run(args: argparse.Namespace) -> dict[str, Any]:
  """Trains or restores the teacher, writes the figures; returns the record."""
  start = time.perf_counter()
  config = config_lib.load_config(TEACHER_CONFIG,
                                  'runlocal' if args.tiny else '')
  ensure_teacher(config, args.teacher_workdir)
  model, variables, run_info = restore_teacher(config, args.teacher_workdir)
  images, labels, ids, logits = teacher_test_logits(config, model, variables)
  index, pool = select_example(labels, logits, args.digit, args.confusable)
  class_names = [str(c) for c in run_info['class_names']]
  example_id = bytes(ids[index]).decode()
  os.makedirs(args.out_dir, exist_ok=True)
  plot_dark_knowledge(os.path.join(args.out_dir, 'dark_knowledge.png'),
                      images[index], logits[index], int(labels[index]),
                      args.confusable, example_id, class_names)
  plot_softmax_curves(os.path.join(args.out_dir, 'softmax_curves.png'))
  example_probs = {f'{t:g}': np.asarray(losses.tempered_softmax(
      logits[index], t)).tolist() for t in TEMPERATURES}
  generic_probs = {f'{t:g}': np.asarray(losses.tempered_softmax(
      jnp.asarray(GENERIC_LOGITS), t)).tolist() for t in TEMPERATURES}
  record = dict(
      teacher_workdir=args.teacher_workdir,
      rule=(f'among test examples of class {args.digit} ({pool}), the one '
            f'with the largest teacher p({args.confusable}) at T=1'),
      example_id=example_id, label=int(labels[index]),
      logits=logits[index].tolist(), probs=example_probs,
      generic_logits=list(GENERIC_LOGITS), generic_probs=generic_probs,
      seconds=time.perf_counter() - start)
  with open(os.path.join(args.out_dir, 'selected.json'), 'w') as f:
    json.dump(record, f, indent=2)
  return record


def main(argv: Sequence[str] | None = None) -> None:
  args = parse_args(argv)
  record = run(args)
  print(f'Selected {record["example_id"]} (label {record["label"]}): '
        f'{record["rule"]}.\n')
  print(markdown_table(record['probs'],
                       [str(c) for c in range(len(record['logits']))]))
  print('\nLogits [1, 2, 3, 4, 5]:\n')
  print(markdown_table(record['generic_probs'],
                       [f'z={z:g}' for z in GENERIC_LOGITS]))
  print(f'\nWrote {args.out_dir}/dark_knowledge.png, softmax_curves.png, '
        f'selected.json in {record["seconds"]:.1f} s.')


if __name__ == '__main__':
  main(sys.argv[1:])
