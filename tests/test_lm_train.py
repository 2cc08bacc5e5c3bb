"""Language-model runs (kd_jax.lm_train): decoder_tiny on pydoc_topics (text
that ships with Python), teacher -> student distilled token by token."""

import functools
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kd_jax import checkpointing
from kd_jax import lm_train
from kd_jax import losses
from kd_jax import models
from kd_jax import rundir
from kd_jax import train
from kd_jax.config_lib import load_config
from kd_jax.data import text

pytestmark = pytest.mark.xdist_group('lm_train')

DATA = 'runlocal,dataset="pydoc_topics"'


def tiny(arg=''):
  return load_config('shakespeare_char', ','.join(filter(None, [DATA, arg])))


@pytest.fixture(scope='session')
def lm_teacher_dir(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('lm') / 'teacher')
  lm_train.train_and_evaluate(tiny('role=teacher,seed=1'), workdir)
  return workdir


def final_params(workdir, config):
  model = models.get_model(config.model, config.vocab_size)
  abstract = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, 1), jnp.int32))
  variables, _ = checkpointing.restore_model(
      workdir, {'params': abstract['params'], 'batch_stats': {}})
  return variables['params']


@pytest.mark.parametrize('arg, match', [
    ('role=distill,distill.teacher_workdir=""', 'needs a teacher'),
    ('distill.alpha=1.5', 'config.distill.alpha'),
    ('distill.divergence="js"', 'config.distill.divergence'),
    ('length=64', 'config.length=64'),
    ('batch_size=12', 'config.batch_size=12'),
    ('student_model.name="cnn"', 'not a language model'),
])
def test_bad_lm_config_values_are_named(arg, match):
  with pytest.raises(ValueError, match=match):
    lm_train.validate_config(tiny(arg))


@pytest.mark.slow  # Two tiny decoders trained; several steps compiled.
def test_distilled_step_is_the_token_mean_mix_of_ce_and_divergence(
    lm_teacher_dir):
  config = tiny(f'distill.teacher_workdir="{lm_teacher_dir}",'
                'distill.divergence="reverse_kl",distill.temperature=2.0,'
                'distill.alpha=0.3')
  mesh = jax.make_mesh((8,), ('data',),
                       axis_types=(jax.sharding.AxisType.Auto,))
  teacher, teacher_params, _ = lm_train._load_teacher(config, mesh)  # pylint: disable=protected-access
  model = models.get_model(config.model, config.vocab_size)
  tx, _ = train.make_optimizer(config, config.num_train_steps)
  init, _ = lm_train._abstract_state(model, tx, 0, config.length)  # pylint: disable=protected-access
  state = init(jax.random.key(0))
  tokens = text.load_split('pydoc_topics', 'validation[:5%]')
  batch = next(text.eval_batches(tokens, batch_size=16, length=32))
  batch['mask'][3, 10:] = False  # Padding counts in neither term.
  batch = {k: jnp.asarray(v) for k, v in batch.items() if k != 'start'}
  _, got = jax.jit(functools.partial(
      lm_train.lm_step, model=model, teacher_model=teacher, tx=tx,
      distill=config.distill))(dict(state), batch, teacher_params)
  rng = jax.random.fold_in(state['rng'], 0)
  logits = model.apply({'params': state['params']}, batch['inputs'],
                       train=True, rngs={'dropout': rng})
  teacher_logits = teacher.apply({'params': teacher_params}, batch['inputs'])
  mask = np.asarray(batch['mask'])
  log_q = np.asarray(jax.nn.log_softmax(logits), np.float64)
  ce = -np.take_along_axis(log_q, np.asarray(batch['targets'])[..., None],
                           -1)[..., 0][mask].mean()
  soft = np.asarray(losses.reverse_kl_divergence(
      logits, teacher_logits, temperature=2.0))[mask].mean()
  np.testing.assert_allclose(got['loss_hard'], ce, rtol=1e-5)
  np.testing.assert_allclose(got['loss_soft'], soft, rtol=1e-5)
  np.testing.assert_allclose(got['loss_total'], 0.7 * ce + 0.3 * soft,
                             rtol=1e-5)


@pytest.mark.slow  # Three tiny runs.
def test_distilled_run_reports_its_teacher_and_moves_toward_it(
    lm_teacher_dir, tmp_path):
  scratch = lm_train.train_and_evaluate(tiny('role=student'),
                                        str(tmp_path / 'scratch'))
  config = tiny(f'distill.teacher_workdir="{lm_teacher_dir}",'
                'distill.alpha=1.0,num_train_steps=12')
  summary = lm_train.train_and_evaluate(config, str(tmp_path / 'distill'))
  (split, r), = summary['eval'].items()
  assert split == 'validation[:5%]'
  assert 'kl_to_teacher' not in scratch['eval'][split]
  assert r['num_tokens'] == len(text.load_split('pydoc_topics', split)) - 1
  assert summary['teacher']['workdir'] == os.path.abspath(lm_teacher_dir)
  teacher = rundir.read_summary(lm_teacher_dir)
  assert r['teacher_loss'] == pytest.approx(
      teacher['eval'][split]['loss'], rel=1e-5)
  assert 0 <= r['kl_to_teacher'] and np.isfinite(r['bits_per_token'])
  # Trained on the teacher alone, the KL to it falls.
  first = summary['train_history'][0]['loss_soft']
  assert summary['train_history'][-1]['loss_soft'] < first


@pytest.mark.slow  # Two tiny runs and a resume.
def test_resumed_lm_run_ends_like_the_uninterrupted_one(lm_teacher_dir,
                                                        tmp_path):
  config = tiny(f'distill.teacher_workdir="{lm_teacher_dir}"')
  whole = str(tmp_path / 'whole')
  expected = lm_train.train_and_evaluate(config, whole)
  cut = str(tmp_path / 'cut')
  shutil.copytree(whole, cut)
  # Killed after the step-3 checkpoint: the last one and the summary gone.
  shutil.rmtree(os.path.join(cut, 'checkpoints', '6'))
  os.remove(os.path.join(cut, 'summary.json'))
  resumed = lm_train.train_and_evaluate(config, cut)
  assert resumed['start_step'] == 3
  assert resumed['eval'] == expected['eval']
  jax.tree.map(np.testing.assert_array_equal, final_params(cut, config),
               final_params(whole, config))


@pytest.mark.slow  # Two tiny runs.
def test_one_and_eight_devices_train_the_same_lm(lm_teacher_dir, tmp_path):
  config = tiny(f'distill.teacher_workdir="{lm_teacher_dir}"')
  one = lm_train.train_and_evaluate(config, str(tmp_path / 'one'),
                                    devices=jax.devices()[:1])
  eight = lm_train.train_and_evaluate(config, str(tmp_path / 'eight'))
  for k, v in one['eval']['validation[:5%]'].items():
    assert eight['eval']['validation[:5%]'][k] == pytest.approx(
        v, rel=1e-4, abs=1e-5), k


@pytest.mark.slow  # One tiny image run as the would-be teacher.
def test_an_image_run_or_another_vocabulary_is_refused_as_teacher(
    lm_teacher_dir, mnist5k_teacher_dir, tmp_path):
  with pytest.raises(ValueError, match='not a language-model run'):
    lm_train.train_and_evaluate(
        tiny(f'distill.teacher_workdir="{mnist5k_teacher_dir}"'),
        str(tmp_path / 'a'))
  with pytest.raises(ValueError, match='vocabulary of 256'):
    lm_train.train_and_evaluate(
        tiny(f'distill.teacher_workdir="{lm_teacher_dir}",vocab_size=128'),
        str(tmp_path / 'b'))
