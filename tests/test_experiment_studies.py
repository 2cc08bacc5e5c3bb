"""The three distillation studies under experiments/, run end to end, --tiny.

Each script drives the real `train.train_and_evaluate` for a few steps; the
tests check what their tables claim (the gap recovered, the bias chosen on
validation only, alpha = 0 being training from scratch) and that a finished
run is read, never retrained.
"""

import importlib.util
import json
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# One worker builds the studies' module fixture; the study runs are slow.
pytestmark = pytest.mark.xdist_group('experiment_studies')


def _load(study: str, script: str = 'run.py'):
  path = os.path.join(ROOT, 'experiments', study, script)
  spec = importlib.util.spec_from_file_location(
      f'{study}_{script[:-3]}', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.fixture(scope='module')
def hinton(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('hinton_mnist'))
  module = _load('hinton_mnist')
  return module, workdir, module.main(['--tiny', f'--workdir={workdir}'])


@pytest.mark.extended
def test_hinton_study_reports_every_model_and_the_gap_it_recovers(hinton):
  _, workdir, record = hinton
  groups = record['groups']
  assert list(groups) == ['teacher 2x1200', '2x800 scratch',
                          '2x800 distilled T=20', '2x30 scratch',
                          '2x30 distilled T=4']
  for g in groups.values():
    assert g['num_examples'] == 1000 and len(g['errors']) == 1
    assert g['mean'] == g['errors'][0]
  teacher = groups['teacher 2x1200']['mean']
  scratch = groups['2x800 scratch']['mean']
  distilled = groups['2x800 distilled T=20']['mean']
  if scratch != teacher:
    assert record['gap_recovered']['2x800 distilled T=20'] == pytest.approx(
        (scratch - distilled) / (scratch - teacher))
  for name in ('results.md', 'results.json', 'errors.png'):
    assert os.path.getsize(os.path.join(workdir, name)) > 0
  with open(os.path.join(workdir, 'results.md')) as f:
    assert '| 2x30 distilled T=4 |' in f.read()


@pytest.mark.extended
def test_hinton_study_reads_finished_runs_instead_of_retraining(
    hinton, monkeypatch):
  module, workdir, record = hinton

  def refuse(*args, **kwargs):
    raise AssertionError('a finished run was trained again')

  monkeypatch.setattr('kd_jax.train.train_and_evaluate', refuse)
  again = module.main(['--tiny', f'--workdir={workdir}'])
  assert again['groups'] == json.loads(json.dumps(record['groups']))


@pytest.mark.extended
def test_hinton_distilled_runs_learn_from_the_teacher_of_their_seed(hinton):
  _, workdir, record = hinton
  for run in record['runs']:
    with open(os.path.join(run['workdir'], 'config.json')) as f:
      config = json.load(f)
    if 'distilled' in run['group']:
      assert config['teachers'][0]['workdir'] == os.path.join(workdir,
                                                              'teacher_s0')
      assert config['distill']['temperature'] == run['temperature']
    hidden = config['model']['hidden']
    assert hidden == ([30, 30] if '2x30' in run['group'] else
                      [1200, 1200] if 'teacher' in run['group'] else [800, 800])


def test_bias_shift_is_chosen_on_validation_and_applied_to_the_params():
  module = _load('unseen_classes')
  labels = np.array([3, 3, 1, 1])
  # Class 3 sits 2.5 below the right answer on both of its examples.
  logits = np.array([[0, 2.5, 0, 0], [0, 2.5, 0, 0], [0, 1, 0, -5],
                     [0, 1, 0, -5]], float)
  logits = np.pad(logits, ((0, 0), (0, 6)), constant_values=-9)
  shift, counts = module.choose_shift(logits, labels, (3,),
                                      np.arange(0, 10, 1.0))
  assert shift == 3.0  # The first shift that fixes both 3s.
  assert counts[:4] == [2, 2, 2, 0]
  variables = {'params': {'Dense_2': {'bias': np.zeros(10, np.float32),
                                      'kernel': np.ones((2, 10))}}}
  edited = module.with_bias_shift(variables, 'Dense_2', (3, 5), 1.5)
  np.testing.assert_allclose(edited['params']['Dense_2']['bias'],
                             [0, 0, 0, 1.5, 0, 1.5, 0, 0, 0, 0])
  assert variables['params']['Dense_2']['bias'].sum() == 0


@pytest.mark.extended
def test_unseen_classes_study_tunes_on_held_out_train_digits(hinton):
  _, hinton_workdir, _ = hinton
  workdir = os.path.join(hinton_workdir, 'unseen')
  module = _load('unseen_classes')
  record = module.main(['--tiny', f'--workdir={workdir}', '--bias_grid=0:4:1',
                        '--variants=omit3', '--teacher_workdir=' +
                        os.path.join(hinton_workdir, 'teacher_s0')])
  (omit3,) = record['variants']
  assert omit3['variant'] == 'omit3' and omit3['unseen'] == [3]
  # 10% of mnist5k's 4,000 train digits, all classes; test stays whole.
  assert omit3['validation_examples'] == 400
  assert omit3['validation_unseen_examples'] > 0
  assert omit3['test']['before']['num_examples'] == 1000
  curve = omit3['curve']
  assert omit3['shift'] == curve['bias'][int(np.argmin(
      curve['validation_errors']))]
  chosen = curve['bias'].index(omit3['shift'])
  assert omit3['test']['after']['errors'] == curve['test_errors'][chosen]
  assert omit3['test']['before']['errors'] == curve['test_errors'][0]
  assert (omit3['test']['after']['unseen_errors']
          == curve['test_unseen_errors'][chosen])
  assert record['teacher_test']['unseen_examples'] == omit3['test']['before'][
      'unseen_examples']
  with open(os.path.join(workdir, 'student_omit3', 'config.json')) as f:
    config = json.load(f)
  assert config['transfer']['omit_classes'] == [3]
  # Trained on the held-in digits; b was chosen on the held-out ones.
  assert config['train_split'] == 'train[:3600]'
  assert 'train[3600:]' in config['eval_splits']
  assert os.path.getsize(os.path.join(workdir, 'bias_sweep.png')) > 0


@pytest.mark.extended
def test_alpha_zero_cell_is_the_scratch_student_and_fills_its_row(hinton):
  _, hinton_workdir, _ = hinton
  workdir = os.path.join(hinton_workdir, 'sweep')
  module = _load('alpha_temperature_sweep')
  # Two runs (scratch, alpha = 0) as two parallel subprocesses, reading the
  # Hinton study's seed-0 teacher.
  record = module.main([
      '--tiny', f'--workdir={workdir}', '--alphas=0', '--temperatures=2,4',
      '--parallel=2', '--seeds=0', f'--teachers_dir={hinton_workdir}'])
  assert sorted(os.listdir(workdir)) == [
      'alpha0_s0', 'heatmap.png', 'results.json', 'results.md', 'scratch_s0']
  for split in ('validation', 'test'):
    row = record['errors'][split][0]
    assert len(row) == 2 and row[0] == row[1]
    # alpha = 0 drops the soft term: same init, data and steps as scratch.
    assert row[0]['mean'] == record['references']['scratch'][split]['mean']
  assert record['chosen'] == dict(alpha=0.0, temperature=2.0)
  with open(os.path.join(workdir, 'alpha0_s0', 'config.json')) as f:
    config = json.load(f)
  assert config['distill']['alpha'] == 0.0
  assert config['teachers'][0]['workdir'] == os.path.join(hinton_workdir,
                                                          'teacher_s0')
  with open(os.path.join(workdir, 'results.md')) as f:
    table = f.read()
  assert '| 0 (T unused) |' in table and '| alpha \\ T | 2 | 4 |' in table
  assert 'Chosen on validation: alpha = 0, T = 2' in table
  assert os.path.getsize(os.path.join(workdir, 'heatmap.png')) > 0


def test_sweep_chooses_the_cell_with_the_fewest_validation_errors():
  module = _load('alpha_temperature_sweep')
  args = module.parse_args(['--alphas=0,0.5', '--temperatures=2,4'])
  grids = {'validation': [[dict(mean=9.0), dict(mean=9.0)],
                          [dict(mean=7.0), dict(mean=8.0)]],
           'test': [[dict(mean=1.0), dict(mean=1.0)],
                    [dict(mean=30.0), dict(mean=2.0)]]}
  # Test errors never choose: the cell with the fewest validation errors
  # wins even where its test errors are the worst.
  assert module.best_cell(args, grids) == (1, 0)


def test_hinton_student_options_reach_the_students_and_spare_the_teachers():
  module = _load('hinton_mnist')
  args = module.parse_args(['--seeds=0', '--small_widths=',
                            '--dataset=mnist_full', '--train_all',
                            '--student_augment=mnist_jitter',
                            '--temperature=8'])
  runs = {r['name']: r for r in module.plan_runs(args)}
  assert set(runs) == {'teacher_s0', 'student800_scratch_s0',
                       'student800_T8_s0'}
  teacher = runs.pop('teacher_s0')['overrides']
  assert 'augment' not in teacher
  assert teacher['train_split'] == 'train[:55000]'
  for run in runs.values():
    assert run['overrides']['augment'] == 'mnist_jitter'
    assert run['overrides']['train_split'] == 'train'
  assert 'distill.temperature=8.0' in runs['student800_T8_s0']['arg']
  args = module.parse_args(['--seeds=0', '--small_widths=30',
                            '--num_epochs=120', '--student_lr=0.03',
                            '--scratch_lr=0.1', '--scratch_epochs=60'])
  for run in module.plan_runs(args):
    if 'scratch' in run['name']:
      assert 'num_epochs=60,learning_rate=0.1' in run['arg'], run['name']
    elif 'teacher' not in run['name']:
      assert 'num_epochs=120,learning_rate=0.03' in run['arg'], run['name']
  # One rule for the students from scratch, in the plan and in the table:
  # their own flags, else the distilled students', else the config's.
  assert module.scratch_settings(args) == (60, 0.1)
  assert module.scratch_settings(module.parse_args(
      ['--num_epochs=120', '--scratch_lr=0.1'])) == (120, 0.1)
  assert module.scratch_settings(module.parse_args(
      ['--scratch_epochs=30'])) == (30, None)
  with pytest.raises(ValueError, match='drop --cache'):
    module.parse_args(['--student_augment=mnist_jitter', '--cache'])


def test_student_settings_choose_each_student_on_validation_only():
  module = _load('hinton_mnist', 'student_settings.py')

  def cell(lr, scratch, distilled):
    return {'lr': lr, '2x800 scratch': scratch, '2x800 distilled': distilled}
  cells = [cell(0.01, dict(val_errors=60.0, val_loss=0.07, test_errors=200),
                dict(val_errors=45.0, val_loss=0.036, test_errors=80)),
           cell(0.03, dict(val_errors=60.0, val_loss=0.06, test_errors=300),
                dict(val_errors=44.0, val_loss=0.040, test_errors=99))]
  best = module.choose(cells)
  # Ties on errors go to the lower loss; test errors never choose.
  assert best['2x800 scratch']['lr'] == 0.03
  assert best['2x800 distilled']['lr'] == 0.03
  # A diverged run (no summary) makes its cell unchoosable, not the grid fail.
  runs = [dict(seed=0, summary=None), dict(seed=1, summary={'eval': {
      'val': {'errors': 1, 'loss': 0.1}, 'test': {'errors': 2}}})]
  cells[1]['2x800 distilled'] = module.kind_result(runs, 'val')
  assert cells[1]['2x800 distilled']['diverged']
  assert module.choose(cells)['2x800 distilled']['lr'] == 0.01
  assert module.kind_result(runs[1:], 'val')['val_errors'] == 1


@pytest.mark.extended
def test_student_settings_run_a_grid_over_one_teacher(hinton):
  _, hinton_workdir, _ = hinton
  workdir = os.path.join(hinton_workdir, 'settings')
  out = _load('hinton_mnist', 'student_settings.py').main([
      '--tiny', f'--workdir={workdir}', f'--teachers_dir={hinton_workdir}',
      '--dataset=mnist5k', '--learning_rates=0.03,0.1', '--epochs=1',
      '--temperatures=4,20'])
  assert [(c['lr'], c['temperature']) for c in out['cells']] == [
      (0.03, 4.0), (0.03, 20.0), (0.1, 4.0), (0.1, 20.0)]
  # One scratch run per (lr, epochs), shared by both temperatures.
  for c in out['cells'][::2]:
    assert c['2x800 scratch'] == out['cells'][out['cells'].index(c) + 1][
        '2x800 scratch']
  assert os.path.isdir(os.path.join(workdir, 'lr0.1_e1', 'student800_T4_s0'))
  config = json.load(open(os.path.join(workdir, 'lr0.1_e1',
                                       'student800_T4_s0', 'config.json')))
  assert config['distill']['temperature'] == 4.0
  assert config['learning_rate'] == 0.1
  assert config['teachers'][0]['workdir'] == os.path.join(hinton_workdir,
                                                         'teacher_s0')


@pytest.mark.extended
def test_hinton_train_all_students_use_every_train_digit_and_the_same_teacher(
    hinton):
  module, hinton_workdir, _ = hinton
  workdir = os.path.join(hinton_workdir, 'train_all')
  record = module.main(['--tiny', '--cache', '--train_all', '--small_widths=',
                        f'--workdir={workdir}',
                        f'--teachers_dir={hinton_workdir}'])
  assert record['runs'][0]['summary'] == json.load(open(os.path.join(
      hinton_workdir, 'teacher_s0', 'summary.json')))
  for name in ('student800_scratch_s0', 'student800_T20_s0'):
    config = json.load(open(os.path.join(workdir, name, 'config.json')))
    assert (config['train_split'], config['eval_splits']) == ('train',
                                                              ['test'])
  cache_dir = os.path.join(hinton_workdir, 'teacher_s0_logits')
  assert {'train', 'test'} <= set(os.listdir(cache_dir))


def _finished(run, val_errors):
  split = _load('logit_methods').SPLITS[run['dataset']][1]
  return dict(run, summary={'eval': {split: {'errors': val_errors},
                                     'test': {'errors': 0}}})


def test_logit_methods_chooses_each_teacher_recipe_on_validation(tmp_path):
  study = _load('logit_methods')
  args = study.parse_args([f'--workdir={tmp_path}', '--seeds=3,4',
                           '--widths=30', '--methods=kd,dkd'])
  candidates = study.recipe_candidates(args)
  # mnist5k has one recipe (chosen by experiments/teacher_recipe); digits
  # tries each of its own on the first seed.
  assert [(r['dataset'], r['seed']) for r in candidates] == [
      ('digits', 3)] * len(study.TEACHER_RECIPES['digits'])
  recipes = list(study.TEACHER_RECIPES['digits'])
  finished = [_finished(r, val) for r, val in
              zip(candidates, [9, 4, 4][:len(candidates)])]
  chosen = study.choose_recipes(args, finished)
  assert chosen == {'mnist5k': 'recipe', 'digits': recipes[1]}
  runs = study.plan_runs(args, chosen)
  digits_teachers = [r for r in runs if r['dataset'] == 'digits'
                     and r['method'] == 'teacher']
  # The chosen candidate's own run is the first seed's teacher: not retrained.
  assert digits_teachers[0]['workdir'] == finished[1]['workdir']
  assert [r['seed'] for r in digits_teachers] == [3, 4]
  for r in digits_teachers:
    assert r['overrides']['augment'] == 'none'
  for r in runs:
    if r['method'] not in ('teacher', 'scratch'):
      teacher = next(t for t in runs if t['workdir'] == r['teacher'])
      assert (teacher['dataset'], teacher['seed']) == (r['dataset'],
                                                       r['seed'])
  # Validation chooses, never test: a candidate's test errors do not count.
  flipped = [dict(r, summary={'eval': {
      'train[1150:]': {'errors': e}, 'test': {'errors': 100 - e}}})
             for r, e in zip(candidates, [1, 5, 5])]
  assert study.choose_recipes(args, flipped)['digits'] == recipes[0]


def test_feature_methods_choose_each_students_rate_on_validation(tmp_path):
  study = _load('feature_methods')
  args = study.parse_args([f'--workdir={tmp_path}', '--seeds=0,1,2',
                           '--methods=kd,at', '--student_lrs=0.01,0.05'])
  teachers = {s: f'/t{s}' for s in args.seeds}
  candidates = study.candidate_runs(args, teachers)
  assert [(r['method'], r['lr'], r['seed']) for r in candidates] == [
      (m, lr, 0) for m in ('scratch', 'kd', 'at') for lr in (0.01, 0.05)]
  assert 'teacher' not in candidates[0] and candidates[2]['teacher'] == '/t0'
  assert len({r['workdir'] for r in candidates}) == len(candidates)
  val_errors = {('scratch', 0.01): 9, ('scratch', 0.05): 7,
                ('kd', 0.01): 5, ('kd', 0.05): 5,   # A tie: the lower rate.
                ('at', 0.01): 6, ('at', 0.05): 360}
  finished = [dict(r, summary={'eval': {
      study.VAL_SPLIT: {'errors': val_errors[r['method'], r['lr']]},
      # Test errors never choose: they favour the other rate here.
      'test': {'errors': 100 - val_errors[r['method'], r['lr']]}}})
              for r in candidates]
  lrs = study.chosen_lrs(finished)
  assert lrs == {'scratch': 0.05, 'kd': 0.01, 'at': 0.01}
  # A diverged run (summary None) is never chosen; all diverged: no rate.
  finished[4]['summary'] = None
  assert study.chosen_lrs(finished)['at'] == 0.05
  finished[5]['summary'] = None
  assert 'at' not in study.chosen_lrs(finished)
  assert [r['method'] for r in study.seed_runs(
      args, study.chosen_lrs(finished), teachers)] == ['scratch', 'kd'] * 2
  runs = study.seed_runs(args, lrs, teachers)
  assert [(r['method'], r['lr'], r['seed']) for r in runs] == [
      (m, lrs[m], s) for s in (1, 2) for m in ('scratch', 'kd', 'at')]
  assert all(r['overrides']['learning_rate'] == r['lr'] for r in runs)
  assert runs[1]['teacher'] == '/t1'


def test_logit_methods_scale_the_authors_schedules_to_the_study():
  study = _load('logit_methods')
  dkd = study.method_overrides('dkd', 60)
  assert dkd['distill.soft']['method'] == 'dkd'
  assert dkd['distill.soft']['warmup_epochs'] == pytest.approx(20 * 60 / 240)
  ctkd = study.method_overrides('ctkd', 24)
  assert ctkd['distill.ctkd']['mode'] == 'global'
  assert ctkd['distill.ctkd']['strength_epochs'] == pytest.approx(
      study.method_overrides('ctkd', 240)['distill.ctkd']['strength_epochs']
      / 10)


def test_deit_study_plans_scratch_soft_and_hard_students_per_seed(tmp_path):
  study = _load('deit_mnist5k')
  args = study.parse_args([f'--workdir={tmp_path}', '--seeds=1,2'])
  runs = study.plan_runs(args)
  assert [r['method'] for r in runs] == ['teacher'] * 2 + [
      'scratch', 'soft', 'hard'] * 2
  teachers = {r['seed']: r['workdir'] for r in runs[:2]}
  for run in runs[2:]:
    config = study.make(run)
    assert config.seed == run['seed'] and config.num_epochs == 60
    assert config.model.name == 'vit_mini'
    assert config.train_split == 'train[:3600]'
    assert config.eval_splits == ('train[3600:]', 'test')
    if run['method'] == 'scratch':
      assert config.distill.teacher_source == 'none'
      continue
    # Each distilled student learns from the teacher of its own seed, with
    # the architecture that configs/mnist5k_teacher.py trains.
    (teacher,) = config.teachers
    assert teacher.workdir == teachers[run['seed']]
    assert teacher.model == study.make(runs[0]).model
    assert config.model.distill_token == (run['method'] == 'hard')
    assert config.distill.soft['method'] == (
        'deit_hard' if run['method'] == 'hard' else 'kl')


@pytest.mark.extended
def test_transfer_size_study_compares_each_size_at_equal_steps(tmp_path):
  module = _load('hinton_mnist', 'transfer_size.py')
  workdir = str(tmp_path)
  record = module.main(['--tiny', f'--workdir={workdir}'])
  assert [r['size'] for r in record['rows']] == [1800, 3600]
  for row in record['rows']:
    scratch, distilled = row['scratch']['mean'], row['distilled']['mean']
    teacher = record['teacher']['mean']
    if scratch != teacher:
      assert row['gap_recovered'] == pytest.approx(
          (scratch - distilled) / (scratch - teacher))
  for run in record['runs']:
    with open(os.path.join(run['workdir'], 'config.json')) as f:
      config = json.load(f)
    if run['kind'] != 'teacher':
      assert config['train_split'] == f'train[:{run["size"]}]'
    if run['kind'] == 'distilled':
      assert config['teachers'][0]['workdir'] == os.path.join(
          workdir, 'teachers', f'teacher_s{run["seed"]}')
  assert os.path.exists(os.path.join(workdir, 'transfer_size.png'))


def test_test_reference_reads_the_test_curve_without_choosing_on_it():
  module = _load('unseen_classes')
  variant = dict(test=dict(before=dict(unseen_examples=10)), curve=dict(
      bias=[0.0, 1.0, 2.0, 3.0], test_errors=[30, 20, 25, 40],
      test_unseen_errors=[9, 4, 1, 0]))
  r = module.test_reference(variant)
  assert (r['best_bias'], r['best_errors'], r['best_unseen_right']) == (
      1.0, 20, 6)
  assert (r['share_bias'], r['share_errors']) == (2.0, 25)
  variant['curve']['test_unseen_errors'] = [9, 8, 5, 2]
  assert module.test_reference(variant)['share_bias'] is None


def _stats(*values):
  values = np.asarray(values, float)
  return dict(values=values.tolist(), mean=float(values.mean()),
              std=float(values.std(ddof=1)) if len(values) > 1 else 0.0,
              min=float(values.min()), max=float(values.max()))


def test_logit_methods_merge_keeps_other_rows_and_refuses_other_teachers():
  study = _load('logit_methods')
  teacher = dict(val=_stats(6, 8), test=_stats(26, 27))

  def row(method, *val, dataset='mnist5k'):
    return dict(dataset=dataset, width=30, method=method, val=_stats(*val),
                test=_stats(*val), teacher=teacher)

  previous = dict(command='old', num_runs=9, train_seconds=60.0, rows=[
      row('scratch', 30, 32), row('kd', 20, 22), row('dkd', 9, 9)])
  new = dict(rows=[row('scratch', 30, 32), row('nkd', 25, 25)])
  merged = study.merge(new, previous, num_seeds=2)
  assert [r['method'] for r in merged['rows']] == ['scratch', 'kd', 'dkd',
                                                   'nkd']
  # The best is chosen again over every row, kept ones included.
  assert [r['method'] for r in merged['rows'] if r.get('best')] == ['dkd']
  assert merged['kept_from']['rows'] == 2
  other = dict(new, rows=[dict(r, teacher=dict(teacher, val=_stats(7, 8)))
                          for r in new['rows']])
  with pytest.raises(ValueError, match='other errors'):
    study.merge(other, previous, num_seeds=2)


def test_feature_methods_merge_keeps_other_rows_and_refuses_other_teachers():
  study = _load('feature_methods')
  teacher = dict(method='teacher', val=_stats(9, 10), test=_stats(20, 21))

  def results(methods, teacher=teacher, lr=0.05):
    return dict(
        teacher=teacher, teacher_lr=lr,
        teacher_candidates=[dict(lr=lr, val_errors=9)],
        student_candidates={m: {'0.01': 10} for m in methods},
        rows=[dict(method=m, val=_stats(10, 11), test=_stats(30, 31),
                   lr=0.01, seeds=[0, 1], diverged=[]) for m in methods],
        command='old', num_runs=5, train_seconds=120.0)

  previous = results(('scratch', 'kd', 'fitnet'))
  previous['teacher_candidates'] *= 3
  merged = study.merge(results(('scratch', 'ofd')), previous)
  assert [r['method'] for r in merged['rows']] == ['scratch', 'kd', 'fitnet',
                                                   'ofd']
  assert list(merged['student_candidates']) == ['scratch', 'kd', 'fitnet',
                                                'ofd']
  assert len(merged['teacher_candidates']) == 3
  assert merged['kept_from']['methods'] == ['kd', 'fitnet']
  with pytest.raises(ValueError, match='rerun every method'):
    study.merge(results(('scratch', 'ofd'), lr=0.1), previous)
