"""experiments/train_step/benchmark.py: its --tiny mode runs the real steps and
reports finite, positive figures for every program of the pair it measures."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import pytest

from kd_jax.config_lib import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(REPO, 'experiments', 'train_step', 'benchmark.py')
PROGRAMS = ('student', 'teacher', 'kd')


def _load_script():
  spec = importlib.util.spec_from_file_location('train_step_benchmark', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module  # Its dataclasses look their module up.
  spec.loader.exec_module(module)
  return module


def _positive_finite(x) -> bool:
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


@pytest.mark.slow  # A benchmark process.
def test_tiny_run_prints_and_writes_every_program_of_the_mlp_pair(tmp_path):
  out = tmp_path / 'bench.json'
  env = dict(os.environ, XLA_FLAGS='', JAX_PLATFORMS='cpu')
  result = subprocess.run(
      [sys.executable, SCRIPT, '--tiny', '--pairs=mlp', '--repeats=2',
       f'--out={out}'], cwd=REPO, env=env, capture_output=True, text=True,
      timeout=600)
  assert result.returncode == 0, result.stderr[-4000:]
  assert f'wrote {out}' in result.stdout
  record = json.loads(out.read_text())
  assert record['tiny'] and record['platform'] == 'cpu'
  assert len(record['devices']) == 1
  assert _positive_finite(record['matmul']['flops_per_second'])
  # XLA counts the matmul it compiled as 2 n^3 FLOPs, like the benchmark.
  assert record['matmul']['xla_flops'] == record['matmul']['flops']
  [pair] = record['pairs']
  assert pair['pair'].startswith('mlp') and pair['student'] == 'mlp'
  for program in PROGRAMS:
    figures = pair['programs'][program]
    for key in ('seconds', 'flops', 'examples_per_second', 'flops_per_second',
                'fraction_of_matmul', 'analytic_matmul_flops'):
      assert _positive_finite(figures[key]), (program, key, figures[key])
    # XLA's count holds the matmuls plus elementwise work: never fewer.
    assert 0.99 <= figures['flops'] / figures['analytic_matmul_flops'] < 1.5
  programs = pair['programs']
  # The KD step runs the teacher's forward and the student's step.
  assert programs['kd']['flops'] >= 0.99 * (
      programs['student']['flops'] + programs['teacher']['flops'])
  assert _positive_finite(pair['kd_over_student_plus_teacher'])
  assert _positive_finite(pair['matmul_flops_per_second'])
  rows = [line for line in result.stdout.splitlines()
          if line.startswith('| mlp')]
  assert [row.split('|')[2].strip() for row in rows] == list(PROGRAMS)
  assert record['table'] in result.stdout


def test_tiny_pairs_include_the_gpu_pair_in_bfloat16_on_request():
  script = _load_script()
  names = [p.name for p in script.pairs(tiny=True, gpu_pair=False)]
  assert [n.split()[0] for n in names] == ['mlp', 'resnet18', 'resnet32x4']
  gpu = script.pairs(tiny=True, gpu_pair=True)[-1]
  assert gpu.config == 'imagenet_resnet34_resnet18'
  assert load_config(gpu.config).dtype == 'bfloat16'
  full = script.pairs(tiny=False, gpu_pair=True)[-1]
  assert (full.image_shape, full.batch_size) == ((224, 224, 3), 256)
