"""The study scripts' plans and summaries over seeds (no training)."""

import importlib.util
import os

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _unseen():
  path = os.path.join(REPO, 'experiments', 'unseen_classes', 'run.py')
  spec = importlib.util.spec_from_file_location('unseen_classes_run', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _record(seed, teacher, before, after, shift):
  counts = lambda e, u: dict(errors=e, unseen_errors=u, num_examples=100,
                             unseen_examples=10)
  return dict(args=dict(seed=seed), teacher_test=dict(errors=teacher,
                                                      unseen_errors=1),
              variants=[dict(variant='omit3', unseen=[3], shift=shift,
                             test=dict(before=counts(*before),
                                       after=counts(*after)))])


def test_seeds_are_summarised_per_variant_with_mean_and_sample_std():
  module = _unseen()
  combined = module.combine_seeds([_record(0, 5, (20, 8), (12, 2), 1.5),
                                   _record(1, 7, (30, 6), (16, 4), 2.5)])
  assert combined['seeds'] == [0, 1]
  assert combined['teacher_errors'] == dict(values=[5, 7], mean=6.0,
                                            std=pytest.approx(2 ** 0.5))
  (omit3,) = combined['variants']
  assert omit3['after_errors']['values'] == [12, 16]
  assert omit3['after_errors']['mean'] == 14.0
  assert omit3['before_unseen_errors']['mean'] == 7.0
  assert omit3['shift']['values'] == [1.5, 2.5]
  table = module.combined_markdown(combined, 'mnist_full')
  assert '| omit3 | 10 | 2.0 +- 0.7 (1.5, 2.5) | 25.0 +- 7.1 (20, 30) |' in (
      table)


def test_seeds_give_each_seed_its_teacher_workdir_and_out_dir(tmp_path):
  module = _unseen()
  args = module.parse_args([f'--workdir={tmp_path}', '--seeds=1,2',
                            '--teachers_dir=/t', '--out_dir=/o'])
  one = module.seed_args(args, 2)
  assert (one.seed, one.seeds) == (2, None)
  assert one.workdir == os.path.join(str(tmp_path), 's2')
  assert one.teacher_workdir == '/t/teacher_s2'
  assert one.out_dir == '/o/seed2'
  with pytest.raises(ValueError, match='--seeds'):
    module.parse_args(['--seeds=,'])


def _hinton():
  path = os.path.join(REPO, 'experiments', 'hinton_mnist', 'run.py')
  spec = importlib.util.spec_from_file_location('hinton_mnist_run', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_hinton_small_widths_may_name_their_own_temperatures():
  module = _hinton()
  args = module.parse_args(['--seeds=0', '--small_widths=30:2.5,300:8/16',
                            '--tiny_temperatures=4'])
  names = [r['name'] for r in module.plan_runs(args)]
  assert names[3:] == ['student30_scratch_s0', 'student30_T2.5_s0',
                       'student300_scratch_s0', 'student300_T8_s0',
                       'student300_T16_s0']
  plain = module.parse_args(['--seeds=0', '--small_widths=30',
                             '--tiny_temperatures=2.5,4'])
  assert [r['name'] for r in module.plan_runs(plain)][4:] == [
      'student30_T2.5_s0', 'student30_T4_s0']
  with pytest.raises(ValueError, match='--small_widths'):
    module.parse_args(['--small_widths=30:x'])
