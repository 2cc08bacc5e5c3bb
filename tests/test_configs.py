"""Every config in configs/ trains and evaluates end to end in its runlocal form.

A config file without an entry in RUNS is still run (runlocal, with the data
its dataset field names), so a new config cannot go untested: if it needs set-up
this file cannot provide, its test fails and says so.

The ImageNet and CIFAR ResNets run here as tiny ResNets of the same family
(same stem, block and stage count; one block per stage, 8 channels), which
go through the same code paths in a fraction of the compile time; their full
sizes are checked by parameter counts from `jax.eval_shape` in
tests/test_models.py.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import math
import os

import jax.numpy as jnp
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax.specialists import cluster as cluster_classes
from kd_jax import datasets as kd_datasets
from kd_jax import export_logits
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax import rundir
from kd_jax import train
from kd_jax.config_lib import CONFIG_DIR
from kd_jax.config_lib import load_config

CONFIG_NAMES = sorted(os.path.basename(p)[:-len('.py')]
                      for p in glob.glob(os.path.join(CONFIG_DIR, '*.py')))
MOCK_EXAMPLES = 24
# Configs whose every method another test runs in runlocal form (teacher and
# each method's distill run): the run of the default method here would
# repeat one of them. The language-model config's runs (kd_jax.lm_train)
# are tested with it.
RUN_ELSEWHERE = {
    'cifar100_logit_methods': ('tests/test_objective.py',
                               'test_every_cifar100_logit_method_runs_in_'
                               'runlocal_form'),
    'cifar100_feature_methods': ('tests/test_feature_kd.py',
                                 'test_every_cifar100_feature_method_runs_in_'
                                 'runlocal_form'),
    'shakespeare_char': ('tests/test_lm_train.py',
                         'test_distilled_run_reports_its_teacher_and_moves_'
                         'toward_it'),
}


def _tiny_resnet(num_classes, dtype=jnp.float32, *, stages, block, stem):
  return models.ResNet(num_classes=num_classes, stage_sizes=(1,) * stages,
                       stage_widths=(8,) * stages, stem_width=8, block=block,
                       stem=stem, dtype=dtype)


# Stand-ins for the full-size ResNets in the configs' runs.
TINY_MODELS = {
    'resnet18': functools.partial(_tiny_resnet, stages=4, block='basic',
                                  stem='imagenet'),
    'resnet34': functools.partial(_tiny_resnet, stages=4, block='basic',
                                  stem='imagenet'),
    'resnet50': functools.partial(_tiny_resnet, stages=4, block='bottleneck',
                                  stem='imagenet'),
    'resnet8x4': functools.partial(_tiny_resnet, stages=3, block='basic',
                                   stem='cifar'),
    'resnet32x4': functools.partial(_tiny_resnet, stages=3, block='basic',
                                    stem='cifar'),
}


@dataclasses.dataclass(frozen=True)
class Run:
  """How a config is run here.

  roles: for configs with a `role` field, the roles run in order (a 'distill'
    run gets the 'teacher' run's workdir as its teacher_workdir).
  teacher: for configs without roles, the config whose runlocal run is the
    teacher (passed as teacher_workdir).
  export: with `teacher`, export its logits (kd_jax.export_logits) and pass
    the cache as cache_dir.
  arg: appended to 'runlocal'.
  pipeline: for configs of several runs under one `root`
    (configs/specialists_*.py): (command, workdir, arg) steps run in order,
    with root=tmp_path; command 'train' trains in tmp_path/<workdir>,
    'cluster' writes the groups file of the generalist in tmp_path/<workdir>.
  """
  roles: tuple[str, ...] = ()
  teacher: str = ''
  export: bool = False
  arg: str = ''
  pipeline: tuple[tuple[str, str, str], ...] = ()


RUNS = {
    'mnist5k_teacher': Run(),
    'mnist5k_student': Run(),
    'mnist5k_distill': Run(teacher='mnist5k_teacher'),
    'mnist5k_distill_cached': Run(teacher='mnist5k_teacher', export=True),
    'mnist5k_ensemble': Run(arg='num_teachers=2', pipeline=(
        ('train', 'teacher0', 'role=teacher,seed=0'),
        ('train', 'teacher1', 'role=teacher,seed=1'),
        ('train', 'distill', 'role=distill,teacher_weights=2+1'),
    )),
    'mnist': Run(roles=('teacher', 'distill', 'student')),
    'cifar100_crd': Run(roles=('teacher', 'distill')),
    'imagenet_resnet34_resnet18': Run(roles=('teacher', 'distill')),
    'image_folder': Run(roles=('teacher', 'distill')),
    'specialists_mnist5k': Run(arg='specialist.num_groups=2', pipeline=(
        ('train', 'generalist', 'role=generalist'),
        ('cluster', 'generalist', 'role=generalist'),
        ('train', 'specialist_0', 'role=specialist,specialist.index=0'),
        ('train', 'specialist_1', 'role=specialist,specialist.index=1'),
        ('train', 'distill', 'role=distill'),
    )),
    'specialists_cifar100': Run(pipeline=(
        ('train', 'generalist', 'role=generalist'),
        ('train', 'specialist_0', 'role=specialist,specialist.index=0'),
        ('train', 'specialist_1', 'role=specialist,specialist.index=1'),
        ('train', 'distill', 'role=distill'),
    )),
}

# root/{train,val,test}/<class>/*.png, with a few files of mixed sizes.
FOLDER_FILES = {'train': 6, 'val': 3, 'test': 4}
FOLDER_CLASSES = {'NORMAL': 50, 'PNEUMONIA': 200}


def write_image_folder(root: str) -> str:
  for split, per_class in FOLDER_FILES.items():
    for cls, pixel in FOLDER_CLASSES.items():
      os.makedirs(os.path.join(root, split, cls))
      for i in range(per_class):
        image = tf.fill([20 + i, 24, 1 + 2 * (i % 2)],
                        tf.constant(pixel, tf.uint8))
        tf.io.write_file(os.path.join(root, split, cls, f'{i}.png'),
                         tf.io.encode_png(image))
  return root


def write_fake_metadata(data_dir: str, name: str, splits) -> None:
  """The dataset_info of a prepared dataset, so that mock_data can serve it."""
  builder = tfds.builder(name, data_dir=data_dir)
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[MOCK_EXAMPLES], num_bytes=0)
      for s in splits]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_path)


@contextlib.contextmanager
def provide_data(config, tmp_path):
  """Yields (config arg that points at the data, eval examples per split)."""
  splits = (config.train_split, *config.eval_splits)
  if config.dataset in kd_datasets.OFFLINE_DATASETS:
    # Built from installed packages into the per-worker TFDS_DATA_DIR.
    yield '', None
  elif config.dataset == input_pipeline.IMAGE_FOLDER:
    root = write_image_folder(str(tmp_path / 'images'))
    yield f'image_folder={root}', {
        s: FOLDER_FILES[s] * len(FOLDER_CLASSES) for s in config.eval_splits}
  else:
    data_dir = str(tmp_path / 'tfds')
    write_fake_metadata(data_dir, config.dataset, splits)
    with tfds.testing.mock_data(num_examples=MOCK_EXAMPLES, data_dir=data_dir):
      yield f'data_dir={data_dir}', {s: MOCK_EXAMPLES
                                     for s in config.eval_splits}


def run_config(name, arg, workdir, eval_sizes, shared_runs=None):
  """Trains `name` with `arg` and checks the summary it writes.

  With `shared_runs` (conftest's `finished_run`), reads the session's shared
  run of the same config instead of training it again.
  """
  config = load_config(name, arg)
  if shared_runs is not None:
    workdir = shared_runs(name, arg)
    summary = rundir.read_summary(workdir)
  else:
    summary = train.train_and_evaluate(config, str(workdir))
  assert summary['step'] == config.num_train_steps
  assert summary['model'] == config.model.name
  assert sorted(summary['eval']) == sorted(config.eval_splits)
  for split, r in summary['eval'].items():
    if eval_sizes is not None:
      assert r['num_examples'] == eval_sizes[split], split
    assert 0.0 <= r['accuracy'] <= 1.0
    assert math.isfinite(r['loss'])
    if config.distill.teacher_source != 'none':
      assert 0.0 <= r['agreement'] <= 1.0
  assert os.path.exists(os.path.join(workdir, 'summary.json'))
  assert os.path.exists(os.path.join(workdir, 'config.json'))
  return config, summary, workdir


def join(*parts):
  return ','.join(filter(None, parts))


# Configs whose runlocal runs take longest (ImageNet and CIFAR-100 pairs,
# DeiT, the CIFAR-100 specialists): with the extended set.
EXTENDED = ('imagenet_resnet50_mobilenetv1', 'imagenet_resnet34_resnet18',
            'specialists_cifar100', 'deit_mnist5k', 'cifar100_pairs',
            'cifar100_crd')


@pytest.mark.slow  # Every config trained tiny, end to end: 5-45 s each.
@pytest.mark.parametrize(
    'name', [pytest.param(n, marks=pytest.mark.extended) if n in EXTENDED
             else n for n in CONFIG_NAMES if n not in RUN_ELSEWHERE])
def test_config_runs_end_to_end_in_runlocal_form(name, tmp_path, monkeypatch,
                                                 data_dir, finished_run):
  monkeypatch.setattr(models, 'MODELS', {**models.MODELS, **{
      k: v for k, v in TINY_MODELS.items() if k in models.MODELS}})
  plan = RUNS.get(name)
  try:
    base = load_config(name, join('runlocal', plan and plan.arg))
  except Exception as e:  # Any failure: say what this test needs.
    pytest.fail(f'configs/{name}.py:runlocal does not load ({e!r}); add it to '
                f'RUNS in tests/test_configs.py with what it needs.')
  if plan is None:
    plan = Run(roles=('teacher', 'distill') if 'role' in base else ())
    unknown = (f'configs/{name}.py has no entry in RUNS of '
               f'tests/test_configs.py, and its runlocal run')
  else:
    unknown = ''

  with provide_data(base, tmp_path) as (data_arg, eval_sizes):
    if base.dataset == 'mnist5k':
      # TFDS's own count of each split or slice ('test', 'train[3600:]').
      splits = tfds.builder('mnist5k', data_dir=data_dir).info.splits
      eval_sizes = {s: splits[s].num_examples for s in base.eval_splits}
    arg = join('runlocal', plan.arg, data_arg)
    # The mnist5k teacher, student and distilled student of runlocal are
    # runs other test files make too: each is trained once per session.
    shared = finished_run if (arg == 'runlocal'
                              and base.dataset == 'mnist5k') else None
    try:
      if plan.pipeline:
        for command, workdir, step_arg in plan.pipeline:
          step_arg = join(arg, f'root={tmp_path}', step_arg)
          if command == 'cluster':
            cluster_classes.cluster(load_config(name, step_arg),
                                    str(tmp_path / workdir))
          else:
            run_config(name, step_arg, tmp_path / workdir, eval_sizes)
      elif plan.roles:
        teacher_dir = tmp_path / 'teacher'
        for role in plan.roles:
          extra = (f'teacher_workdir={teacher_dir}' if role == 'distill'
                   else '')
          run_config(name, join(arg, f'role={role}', extra),
                     tmp_path / role, eval_sizes)
      elif plan.teacher:
        *_, teacher_dir = run_config(plan.teacher, arg, tmp_path / 'teacher',
                                     eval_sizes, shared)
        run_arg = join(arg, f'teacher_workdir={teacher_dir}')
        if plan.export:
          cache_dir = tmp_path / 'cache'
          export_logits.export(load_config(name, run_arg), str(cache_dir))
          run_arg = join(run_arg, f'cache_dir={cache_dir}')
        _, summary, _ = run_config(name, run_arg, tmp_path / 'run',
                                   eval_sizes, None if plan.export else shared)
        assert 'teacher_accuracy' in summary['eval'][base.eval_splits[0]]
      else:
        run_config(name, arg, tmp_path / 'run', eval_sizes, shared)
    except Exception as e:
      if unknown:
        pytest.fail(f'{unknown} failed: {e!r}')
      raise


def test_every_config_in_runs_is_a_file_in_configs():
  # The parametrized test runs what glob finds; a renamed or moved config
  # would otherwise drop out of it silently.
  assert set(RUNS) <= set(CONFIG_NAMES)
  assert set(RUN_ELSEWHERE) <= set(CONFIG_NAMES)
  root = os.path.dirname(CONFIG_DIR)
  for path, test in RUN_ELSEWHERE.values():
    with open(os.path.join(root, path)) as f:
      assert f'def {test}(' in f.read(), (path, test)
