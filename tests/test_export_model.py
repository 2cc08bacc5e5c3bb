"""ONNX and TFLite exports of a run: same predictions, uint8 in, checked.

Needs the export extra (`pip install -e '.[export]'` and jax2onnx with
--no-deps); skipped without it.
"""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from kd_jax import export_model
from kd_jax import input_pipeline
from kd_jax import models
from kd_jax import rundir

pytest.importorskip('onnxruntime')
pytest.importorskip('jax2onnx')
pytest.importorskip('ai_edge_litert')

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One worker builds the module's exports.
# Slow: a trained student converted to ONNX and TFLite per module.
pytestmark = [pytest.mark.xdist_group('export_model'), pytest.mark.slow]
VAL = 'train[3600:]'  # mnist5k_student's validation split.


@pytest.fixture(scope='session')
def student_dir(finished_run):
  """The session's runlocal mnist5k student (conftest): read it only."""
  return finished_run('mnist5k_student')


@pytest.fixture(scope='session')
def exported(student_dir, tmp_path_factory):
  """{format: path} of the student exported to ONNX and TFLite."""
  out = tmp_path_factory.mktemp('exported')
  return {fmt: export_model.export(student_dir, fmt,
                                   str(out / f'student.{fmt}'))['path']
          for fmt in export_model.FORMATS}


@pytest.fixture(scope='session')
def eval_data(student_dir):
  config = export_model.stored_config(student_dir)
  return {split: export_model.eval_images(config, split)
          for split in (VAL, 'test')}


@pytest.mark.parametrize('fmt', export_model.FORMATS)
def test_exported_file_makes_exactly_the_summarys_errors(fmt, exported,
                                                         student_dir,
                                                         eval_data):
  run = export_model.load_exported(exported[fmt])
  summary = rundir.read_summary(student_dir)
  for split, (images, labels) in eval_data.items():
    assert images.dtype == np.uint8 and images.shape[1:] == (28, 28, 1)
    errors = int((run(images).argmax(-1) != labels).sum())
    assert errors == summary['eval'][split]['errors'], split
    assert len(labels) == summary['eval'][split]['num_examples']


@pytest.mark.parametrize('fmt', export_model.FORMATS)
def test_batch_sizes_one_and_seven_give_the_same_logits(fmt, exported,
                                                        eval_data):
  run = export_model.load_exported(exported[fmt])
  images = eval_data['test'][0][:7]
  seven = run(images)
  assert seven.shape == (7, 10) and seven.dtype == np.float32
  one = np.concatenate([run(images[i:i + 1]) for i in range(7)])
  np.testing.assert_allclose(one, seven, rtol=0, atol=1e-5)


def test_a_conv_nets_tflite_file_is_traced_at_batch_one_and_resizes(
    tmp_path):
  """The 3-layer CNN: traced at batch 1 (convolutions fused, in XNNPACK),
  the file's signature says 1, and LiteRT runs it resized to 7."""
  from ai_edge_litert import interpreter  # pylint: disable=g-import-not-at-top
  model = models.get_model({'name': 'cnn', 'features': (4, 8, 8),
                            'dense': 8}, 10)
  variables = jax.device_get(jax.jit(model.init)(
      jax.random.key(0), np.zeros((1, 28, 28, 1), np.float32)))
  run = export_model.Run('', dict(image_shape=[28, 28, 1], num_classes=10),
                         model, variables, np.float32(0.1307),
                         np.float32(0.3081))
  serve = export_model.serving_function(run)
  path = str(tmp_path / 'cnn.tflite')
  with open(path, 'wb') as f:
    f.write(export_model.to_tflite(serve, (28, 28, 1)))
  signature = interpreter.Interpreter(model_path=path).get_input_details()[0]
  assert list(signature['shape_signature']) == [1, 28, 28, 1]
  images = np.random.default_rng(0).integers(0, 256, (7, 28, 28, 1),
                                             np.uint8)
  run_file = export_model.load_exported(path)
  want = np.asarray(jax.jit(serve)(images))
  np.testing.assert_allclose(run_file(images), want, rtol=0, atol=1e-5)
  np.testing.assert_allclose(run_file(images[:1]), want[:1], rtol=0,
                             atol=1e-5)


def test_uint8_serving_function_is_the_pipelines_normalisation(student_dir):
  """Normalising inside the model gives the logits of the run's own eval
  path (the pipeline's float images), so the export's check against the
  serving function is a check against the run."""
  run = export_model.load_run(student_dir)
  config = export_model.stored_config(student_dir)
  batch = next(input_pipeline.iterate_split(config, 'test', num_devices=1,
                                            process_index=0, process_count=1))
  want = run.model.apply(run.variables, batch['image'], train=False)
  images, _ = export_model.eval_images(config, 'test', len(batch['image']))
  got = jax.jit(export_model.serving_function(run))(images)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_a_file_whose_logits_differ_is_refused_and_not_written(
    student_dir, tmp_path, monkeypatch):
  def off_by_a_little(serve, image_shape):
    return export_model.to_onnx(lambda x: serve(x) + 0.01, image_shape)
  monkeypatch.setitem(export_model.CONVERTERS, 'onnx', off_by_a_little)
  out = tmp_path / 'student.onnx'
  with pytest.raises(export_model.ExportMismatch,
                     match=r"onnx check on 64 images of split "
                     r"'train\[3600:\]': the file's logits differ from the "
                     r"JAX model's by up to 0\.01.*Nothing was written"):
    export_model.export(student_dir, 'onnx', str(out))
  assert not os.listdir(tmp_path)


def test_compare_names_the_largest_difference_and_nan():
  want = np.array([[1.0, 2.0], [3.0, 4.0]])
  assert export_model.compare(want + 1e-6, want, 1e-4, 'x') < 2e-6
  with pytest.raises(export_model.ExportMismatch,
                     match=r'0\.5 \(image 1, class 0: file 3\.5, JAX 3\)'):
    export_model.compare(want + [[0, 0], [0.5, 0]], want, 1e-4, 'x')
  with pytest.raises(export_model.ExportMismatch, match='up to inf'):
    export_model.compare(want * np.nan, want, 1e-4, 'x')


def test_refusals_name_the_flag(student_dir, tmp_path):
  with pytest.raises(ValueError, match=r"--format='tf'"):
    export_model.export(student_dir, 'tf', str(tmp_path / 'a.tf'))
  with pytest.raises(ValueError, match=r'name a \.tflite file'):
    export_model.export(student_dir, 'tflite', str(tmp_path / 'a.onnx'))
  (tmp_path / 'a.onnx').write_bytes(b'')
  with pytest.raises(FileExistsError, match='--overwrite'):
    export_model.export(student_dir, 'onnx', str(tmp_path / 'a.onnx'))
  with pytest.raises(FileNotFoundError, match='holds no trained run'):
    export_model.export(str(tmp_path / 'none'), 'onnx',
                        str(tmp_path / 'b.onnx'))


@pytest.mark.slow
def test_distilled_student_exports_with_its_errors(finished_run,
                                                   mnist5k_teacher_dir,
                                                   tmp_path):
  workdir = finished_run('mnist5k_distill',
                         f'runlocal,teacher_workdir={mnist5k_teacher_dir}')
  images, labels = export_model.eval_images(
      export_model.stored_config(workdir), 'test')
  summary = rundir.read_summary(workdir)
  for fmt in export_model.FORMATS:
    path = export_model.export(workdir, fmt, str(tmp_path / f'd.{fmt}'))
    run = export_model.load_exported(path['path'])
    assert (int((run(images).argmax(-1) != labels).sum())
            == summary['eval']['test']['errors'])


@pytest.mark.slow
def test_cli_prints_the_file_and_its_check(student_dir, tmp_path):
  done = subprocess.run(
      [sys.executable, '-m', 'kd_jax.export_model',
       f'--workdir={student_dir}', '--format=tflite',
       f'--out={tmp_path / "s.tflite"}'], cwd=ROOT, capture_output=True,
      text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  assert re.search(r"s\.tflite: tflite, [\d.]+ MB; image uint8 \['N', 28, "
                   r"28, 1\] -> logits float32 \['N', 10\]", done.stdout)
  assert "checked on 64 images of split 'train[3600:]'" in done.stdout


@pytest.mark.extended  # A benchmark script; the CLI test exports each format.
def test_size_speed_script_times_jax_onnx_and_tflite(tmp_path):
  out = tmp_path / 'exported.json'
  done = subprocess.run(
      [sys.executable, 'experiments/size_speed/exported.py',
       '--models=mnist_small_student', '--budget_s=0.05', f'--out={out}'],
      cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-3000:]
  (row,) = json.loads(out.read_text())['rows']
  for key in ('jax', 'onnx', 'onnx_1thread', 'tflite', 'tflite_1thread'):
    assert row[f'{key}_ms'] > 0
  for key in ('onnx', 'onnx_1thread', 'tflite', 'tflite_1thread'):
    assert row[f'{key}_max_abs_difference'] < 1e-4
  assert '| mnist_small_student | 28x28x1 | 24,790 |' in done.stdout
