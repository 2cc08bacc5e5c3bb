"""Specialist ensembles end to end: generalist -> groups -> specialists ->
combination -> one distilled student, and the inputs the pipeline refuses."""

import importlib.util
import json
import os
import re
import shutil

import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax.specialists import cluster as cluster_classes
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax.specialists import groups as specialist_groups
from kd_jax import specialists
from kd_jax import rundir
from kd_jax import teachers
from kd_jax import train
from kd_jax import warm_start
from kd_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = 'specialists_mnist5k'

# One worker runs experiments/specialists/run.py --tiny; its tests are slow.
pytestmark = pytest.mark.xdist_group('specialist_pipeline')


def tiny(root, arg=''):
  return load_config(NAME, ','.join(filter(None, [
      'runlocal', 'specialist.num_groups=2', f'root={root}', arg])))


@pytest.fixture(scope='session')
def pipeline(tmp_path_factory):
  """experiments/specialists/run.py --tiny: every run of the pipeline."""
  path = os.path.join(REPO, 'experiments', 'specialists', 'run.py')
  spec = importlib.util.spec_from_file_location('specialists_run', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  root = str(tmp_path_factory.mktemp('specialists'))
  return root, module.run(root, tiny=True)


@pytest.mark.extended
def test_groups_partition_the_classes_and_name_their_generalist(pipeline):
  root, _ = pipeline
  record = json.load(open(os.path.join(root, 'groups.json')))
  assert record['class_names'] == [str(d) for d in range(10)]
  assert len(record['groups']) == 2
  assert sorted(sum(record['groups'], [])) == list(range(10))
  generalist = teachers.load_online(tiny(root, 'role=distill').teachers[:1],
                                    10, (28, 28, 1))
  assert record['generalist_fingerprint'] == (
      specialist_groups.params_fingerprint(generalist.variables))


@pytest.mark.extended
def test_specialist_run_records_its_group_head_and_oversampling(pipeline):
  root, _ = pipeline
  groups = json.load(open(os.path.join(root, 'groups.json')))['groups']
  config = tiny(root)
  # The factor comes from the labels of the split the specialists train on.
  assert config.train_split == 'train[:3600]'
  labels = np.concatenate([b['label'][b['mask']] for b in
                           input_pipeline.iterate_split(
                               config, config.train_split, num_devices=1,
                               process_index=0, process_count=1)])
  assert len(labels) == 3600
  for k, group in enumerate(groups):
    info = json.load(open(os.path.join(root, f'specialist_{k}',
                                       'run_info.json')))
    assert info['num_classes'] == len(group) + 1
    assert info['class_names'] == [str(c) for c in group] + ['dustbin']
    recorded = info['specialist']
    assert recorded['group'] == group
    assert recorded['oversampling_factor'] == pytest.approx(
        specialists.oversampling_factor(labels, group, 0.5))


# The mnist5k config whose run each role makes, and the fields besides the
# specialist settings and the teachers that differ from it.
RECIPES = {
    'generalist': ('mnist5k_teacher', {}),
    # Fine-tunes the generalist: its weights, 15 epochs at the same lr.
    'specialist,specialist.index=0': ('mnist5k_teacher', dict(
        num_epochs=15.0, init_from='workdirs/specialists_mnist5k/generalist')),
    'distill': ('mnist5k_distill', {}),
    'distill_generalist': ('mnist5k_distill', {}),
    'student': ('mnist5k_student', {}),
}


@pytest.mark.parametrize('role', sorted(RECIPES))
def test_every_role_runs_the_validated_mnist5k_recipe(role):
  # The generalist is the teacher chosen on validation, the students the
  # mnist5k student and distilled student: same splits, model, optimiser.
  name, differ = RECIPES[role]
  run = json.loads(rundir.config_json(load_config(NAME, f'role={role}')))
  recipe = json.loads(rundir.config_json(load_config(name)))
  assert run['train_split'] == 'train[:3600]'
  assert run['eval_splits'] == ['train[3600:]', 'test']
  assert {k: run[k] for k in run if run[k] != recipe[k]
          and k not in ('specialist', 'teachers', 'distill')} == differ
  # Of the loss, only the source of the teacher may change.
  assert {k for k in run['distill'] if run['distill'][k] !=
          recipe['distill'][k]} <= {'teacher_source'}


@pytest.mark.slow  # Reads thousands of examples through tf.data.
def test_specialist_stream_draws_half_from_its_group_in_head_labels(tmp_path):
  config = tiny(tmp_path, 'role=generalist')
  config.specialist.groups_file = ''
  config.specialist.groups = ((3, 5, 8), (0, 1, 2, 4, 6, 7, 9))
  config.specialist.index = 0
  data = input_pipeline.get_datasets(config, num_devices=8)
  assert data.info.class_names == ('3', '5', '8', 'dustbin')
  labels = np.concatenate([next(data.train)['label'] for _ in range(40)])
  assert set(labels) <= {0, 1, 2, 3}
  # 640 draws at 1/2 from the group (30% of mnist5k): well inside 0.4..0.6.
  assert 0.4 < np.mean(labels < 3) < 0.6
  test = np.concatenate([b['label'][b['mask']]
                         for b in data.eval['test']()])
  assert len(test) == 1000 and np.mean(test < 3) < 0.4  # Natural prior.


@pytest.mark.slow  # Two streams through tf.data.
def test_resumed_specialist_stream_continues_where_it_stopped(tmp_path):
  config = tiny(tmp_path, 'role=generalist')
  config.specialist.groups_file = ''
  config.specialist.groups = ((3, 5), (0, 1, 2, 4, 6, 7, 8, 9))
  config.specialist.index = 1
  stream = input_pipeline.get_datasets(config, num_devices=8).train
  ids = [next(stream)['id'] for _ in range(5)]
  resumed = input_pipeline.get_datasets(config, start_step=3,
                                        num_devices=8).train
  np.testing.assert_array_equal(next(resumed)['id'], ids[3])
  np.testing.assert_array_equal(next(resumed)['id'], ids[4])


@pytest.mark.extended
def test_combination_teacher_is_what_the_distilled_student_saw(pipeline):
  _, results = pipeline
  # Validation: the 400 held-out train digits; test: the 1,000 test digits.
  sizes = dict(validation=400, test=1000)
  assert results['splits'] == dict(validation='train[3600:]', test='test')
  for name, split in results['splits'].items():
    combination = results['combination'][name]
    assert combination['split'] == split
    rows = combination['coverage_breakdown']
    assert sum(r['num_examples'] for r in rows) == sizes[name]
    assert sum(r['correct_delta'] for r in rows) == (
        combination['generalist_errors'] - combination['combined_errors'])
    # The same combination, computed by the train step's teacher forward.
    student = results['students']['distill'][name]
    assert student['teacher_accuracy'] == pytest.approx(
        combination['combined_accuracy'])
    assert results['generalist'][name]['accuracy'] == pytest.approx(
        combination['generalist_accuracy'])
    assert student['errors'] == round((1 - student['accuracy']) * sizes[name])


@pytest.mark.extended
def test_stacked_heads_are_padded_with_the_dustbin_last_and_corrected(
    pipeline):
  root, _ = pipeline
  config = tiny(root, 'role=distill')
  info = input_pipeline.get_datasets(config, num_devices=8).info
  ensemble = teachers.load_specialist_ensemble(config, info)
  images = next(input_pipeline.iterate_split(config, 'test'))['image'][:8]
  _, heads = ensemble.heads(ensemble.variables, {'image': images})
  head_size = max(len(g) for g in ensemble.groups) + 1
  assert heads.shape == (2, 8, head_size)
  for k, group in enumerate(ensemble.groups):
    own, _ = warm_start.restore_run(os.path.join(root, f'specialist_{k}'))
    model = models.get_model(config.teachers[k + 1].model, len(group) + 1)
    logits = model.apply(own, jnp.asarray(images), train=False)
    run_info = rundir.read_run_info(os.path.join(root, f'specialist_{k}'))
    factor = run_info['specialist']['oversampling_factor']
    np.testing.assert_allclose(heads[k, :, :len(group)],
                               logits[:, :len(group)], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(heads[k, :, -1], logits[:, -1] + np.log(factor),
                               rtol=1e-5, atol=1e-5)


def test_warm_start_copies_matches_and_maps_head_columns_by_name():
  source = {'hidden': {'kernel': np.full((2, 3), 7.0)},
            'head': {'kernel': np.arange(6.0).reshape(2, 3),
                     'bias': np.array([0.0, 1.0, 2.0])}}
  target = {'hidden': {'kernel': np.zeros((2, 3))},
            'head': {'kernel': np.zeros((2, 2)), 'bias': np.zeros(2)},
            'extra': np.ones(4)}
  merged, copied = warm_start.merge(source, target, ['a', 'b', 'c'],
                                    ['c', 'dustbin'])
  np.testing.assert_array_equal(merged['hidden']['kernel'], 7.0)
  # 'c' is column 2; the dustbin is the mean of the columns of 'a' and 'b',
  # and its bias also gets log 2 (their logsumexp when they are equal).
  np.testing.assert_array_equal(merged['head']['kernel'],
                                [[2.0, 0.5], [5.0, 3.5]])
  np.testing.assert_allclose(merged['head']['bias'], [2.0, 0.5 + np.log(2)])
  np.testing.assert_array_equal(merged['extra'], 1.0)
  assert "['extra']" not in copied


@pytest.mark.parametrize('groups, message', [
    (((0, 1, 2), (2, 3, 4, 5, 6, 7, 8, 9)),
     'set config.specialist.allow_overlap=True'),
    (((0, 1, 2), (3, 4)), 'set config.specialist.require_coverage=False'),
    ((('0', 'cat'), ('1',)), "unknown class name 'cat'"),
])
def test_bad_hand_groups_are_refused_naming_the_field(tmp_path, groups,
                                                      message):
  config = tiny(tmp_path, 'role=generalist')
  config.specialist.groups_file = ''
  config.specialist.groups = groups
  config.specialist.index = 0
  with pytest.raises(ValueError, match='config.specialist.groups') as e:
    input_pipeline.get_datasets(config, num_devices=8)
  assert message in str(e.value)


@pytest.mark.extended
def test_more_clusters_than_classes_is_refused(pipeline):
  root, _ = pipeline
  config = tiny(root, 'role=generalist,specialist.num_groups=11')
  with pytest.raises(ValueError, match='num_groups=11: more clusters than'):
    cluster_classes.cluster(config, os.path.join(root, 'generalist'),
                            os.path.join(root, 'unused.json'))


@pytest.mark.extended
def test_specialists_of_other_groups_are_refused(pipeline, tmp_path):
  root, _ = pipeline
  config = tiny(root, 'role=distill')
  info = input_pipeline.get_datasets(config, num_devices=8).info
  # Specialists listed out of group order.
  config.teachers = [config.teachers[0], config.teachers[2],
                     config.teachers[1]]
  with pytest.raises(ValueError, match=r'config.teachers\[1\].*trained '
                     'specialist 1'):
    teachers.load_specialist_ensemble(config, info)
  # Groups that changed after the specialists were trained.
  record = json.load(open(os.path.join(root, 'groups.json')))
  record['groups'] = [[0, 1], list(range(2, 10))]
  changed = str(tmp_path / 'groups.json')
  json.dump(record, open(changed, 'w'))
  config = tiny(root, f'role=distill,specialist.groups_file={changed}')
  with pytest.raises(ValueError, match='retrain this one'):
    teachers.load_specialist_ensemble(config, info)
  # Resuming a specialist's workdir under the changed groups.
  specialist = tiny(root, 'role=specialist,specialist.index=0,'
                    f'specialist.groups_file={changed},'
                    'allow_config_change=True')
  with pytest.raises(ValueError, match='use a fresh --workdir'):
    train.train_and_evaluate(specialist,
                             os.path.join(root, 'specialist_0'))


@pytest.mark.extended
def test_groups_from_another_generalist_are_refused(pipeline, tmp_path):
  root, _ = pipeline
  record = json.load(open(os.path.join(root, 'groups.json')))
  record['generalist_fingerprint'] = '0' * 16
  other = str(tmp_path / 'groups.json')
  json.dump(record, open(other, 'w'))
  config = tiny(root, f'role=distill,specialist.groups_file={other}')
  info = input_pipeline.get_datasets(config, num_devices=8).info
  with pytest.raises(ValueError, match='clustered from another generalist'):
    teachers.load_specialist_ensemble(config, info)


def _damage(workdir):
  """Flips bytes in the largest model file of the latest checkpoint."""
  steps = checkpointing.checkpoint_dir(workdir)
  latest = max((d for d in os.listdir(steps) if d.isdigit()), key=int)
  files = [os.path.join(d, f) for d, _, fs in os.walk(
      os.path.join(steps, latest, 'model')) for f in fs]
  path = max(files, key=os.path.getsize)
  data = bytearray(open(path, 'rb').read())
  for i in range(len(data) // 3, len(data) // 3 + 16):
    data[i] ^= 0xFF
  open(path, 'wb').write(bytes(data))


@pytest.mark.extended
def test_specialists_are_known_by_content_and_checked_on_restore(
    pipeline, tmp_path):
  root, _ = pipeline
  config = tiny(root, 'role=distill')
  info = input_pipeline.get_datasets(config, num_devices=8).info
  first = teachers.load_specialist_ensemble(config, info)
  # Moved elsewhere: the same combination; what earlier versions called it
  # (workdir@step) changes with the path.
  moved = str(tmp_path / 'specialist_1')
  shutil.copytree(config.teachers[2].workdir, moved)
  config.teachers[2].workdir = moved
  again = teachers.load_specialist_ensemble(config, info)
  assert again.fingerprint == first.fingerprint
  assert again.legacy_fingerprints != first.legacy_fingerprints
  # Damaged: refused naming the entry, not used.
  _damage(moved)
  with pytest.raises(checkpointing.CheckpointDamaged, match=re.escape(
      f"config.teachers[2] (workdir '{moved}')") + r'.*Restore that '
      'checkpoint folder from a copy'):
    teachers.load_specialist_ensemble(config, info)
