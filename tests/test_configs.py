"""Every config in configs/ trains and evaluates end to end in its runlocal form.

A config file without an entry in RUNS is still run (runlocal, with the data
its dataset field names), so a new config cannot go untested: if it needs set-up
this file cannot provide, its test fails and says so.
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import math
import os

import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from kd_jax import cluster_classes
from kd_jax import datasets as kd_datasets
from kd_jax import export_logits
from kd_jax import input_pipeline
from kd_jax import train
from kd_jax.config_lib import CONFIG_DIR
from kd_jax.config_lib import load_config

CONFIG_NAMES = sorted(os.path.basename(p)[:-len('.py')]
                      for p in glob.glob(os.path.join(CONFIG_DIR, '*.py')))
MOCK_EXAMPLES = 24
MNIST5K_TEST = 1000


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
    # ResNet-34 and ResNet-18 take about a minute each to compile on 2 CPU
    # cores; two steps show the same code paths as six.
    'imagenet_resnet34_resnet18': Run(roles=('teacher', 'distill'),
                                      arg='num_train_steps=2'),
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


def run_config(name, arg, workdir, eval_sizes):
  """Trains `name` with `arg` and checks the summary it writes."""
  config = load_config(name, arg)
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
  return config, summary


def join(*parts):
  return ','.join(filter(None, parts))


@pytest.mark.parametrize('name', CONFIG_NAMES)
def test_config_runs_end_to_end_in_runlocal_form(name, tmp_path):
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
      eval_sizes = {s: MNIST5K_TEST for s in base.eval_splits}
    arg = join('runlocal', plan.arg, data_arg)
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
        teacher_dir = tmp_path / 'teacher'
        run_config(plan.teacher, arg, teacher_dir, eval_sizes)
        run_arg = join(arg, f'teacher_workdir={teacher_dir}')
        if plan.export:
          cache_dir = tmp_path / 'cache'
          export_logits.export(load_config(name, run_arg), str(cache_dir))
          run_arg = join(run_arg, f'cache_dir={cache_dir}')
        _, summary = run_config(name, run_arg, tmp_path / 'run', eval_sizes)
        assert 'teacher_accuracy' in summary['eval'][base.eval_splits[0]]
      else:
        run_config(name, arg, tmp_path / 'run', eval_sizes)
    except Exception as e:
      if unknown:
        pytest.fail(f'{unknown} failed: {e!r}')
      raise


def test_every_config_in_runs_is_a_file_in_configs():
  # The parametrized test runs what glob finds; a renamed or moved config
  # would otherwise drop out of it silently.
  assert set(RUNS) <= set(CONFIG_NAMES)
